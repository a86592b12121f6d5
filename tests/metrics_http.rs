//! The metrics endpoint end to end: the real server on an ephemeral loopback port inside a glommio
//! executor on its own thread, spoken to by a plain `std::net::TcpStream` client. Checks that
//! published samples move the exposition, that `/readyz` follows `Health`, and that the server's
//! bounds (methods, head size, read timeout, concurrent connections) hold.
//!
//! The socket is bound before the executor starts, so a client may connect at once: the kernel
//! queues it until `serve` accepts. No test sleeps to wait for the server.

use sessionizer::config::{Stream, Transport};
use sessionizer::metrics::{self, http, Health, ShardSample};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Server {
    addr: SocketAddr,
    health: Arc<Health>,
    stop: Arc<AtomicBool>,
    thread: Option<glommio::ExecutorJoinHandle<()>>,
}

impl Server {
    fn start() -> Server {
        let handle = metrics::install().expect("recorder");
        assert!(metrics::install().is_ok(), "install is idempotent");
        let listener = http::bind("127.0.0.1:0".parse().unwrap()).expect("bind an ephemeral port");
        let addr = listener.local_addr().unwrap();
        let health = Arc::new(Health::new());
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (health.clone(), stop.clone());
        let thread = glommio::LocalExecutorBuilder::default()
            .name("metrics-http-test")
            .spawn(move || async move {
                let server = glommio::spawn_local(metrics::serve(
                    http::on_executor(listener),
                    handle.clone(),
                    h,
                ));
                let upkeep = glommio::spawn_local(metrics::upkeep_loop(handle));
                while !s.load(Ordering::Acquire) {
                    glommio::timer::sleep(Duration::from_millis(10)).await;
                }
                // Dropping a glommio task cancels it.
                drop(server);
                drop(upkeep);
            })
            .expect("start an executor (io_uring)");
        Server {
            addr,
            health,
            stop,
            thread: Some(thread),
        }
    }

    /// Send `request` verbatim; return (status, head, body) once the server closes.
    fn raw(&self, request: &[u8]) -> (u16, String, String) {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(request).unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).unwrap();
        let text = String::from_utf8(resp).unwrap();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no head end: {text:?}"));
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, head.to_string(), body.to_string())
    }

    fn get(&self, path: &str) -> (u16, String) {
        let (status, head, body) =
            self.raw(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes());
        assert!(head.contains("\r\nConnection: close"), "{head}");
        let len: usize = header(&head, "Content-Length").parse().unwrap();
        assert_eq!(len, body.len(), "Content-Length matches the body");
        (status, body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> &'a str {
    head.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no {name} in {head}"))
}

/// The value of the series `name` whose labels include every pair in `labels`.
fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, v) = l.rsplit_once(' ')?;
        let (n, rest) = series
            .split_once('{')
            .map_or((series, ""), |(n, r)| (n, r.trim_end_matches('}')));
        let all = labels
            .iter()
            .all(|(k, val)| rest.split(',').any(|p| p == format!("{k}=\"{val}\"")));
        (n == name && all).then(|| v.parse().unwrap())
    })
}

#[test]
fn readyz_is_503_until_ready_then_200_then_503_while_stopping() {
    let srv = Server::start();
    assert_eq!(srv.get("/readyz"), (503, "not ready\n".to_string()));
    assert_eq!(
        srv.get("/healthz"),
        (200, "ok\n".to_string()),
        "alive while not ready"
    );
    srv.health.set_ready();
    assert_eq!(srv.get("/readyz"), (200, "ready\n".to_string()));
    srv.health.set_stopping();
    assert_eq!(srv.get("/readyz"), (503, "stopping\n".to_string()));
    assert_eq!(srv.get("/healthz").0, 200);
}

#[test]
fn published_samples_move_the_exposition() {
    let srv = Server::start();
    // Shard 0 (which closes latency windows) is used by this test only.
    let profiles: Arc<[metrics::SharedString]> =
        Arc::from(vec![metrics::SharedString::from("web")]);
    let (mut s, mut prev) = (
        ShardSample::new(profiles.clone()),
        ShardSample::new(profiles),
    );
    s.events_in[metrics::transport_index(Transport::Udp)] = 5;
    s.events_out[metrics::stream_index(Stream::Markers)] = 2;
    s.engine.sessions_started = 2;
    s.engine.active_by_profile = vec![2];
    for us in 1..=1000u64 {
        metrics::record_latency_ns(&mut s.latency, us * 1_000);
    }
    metrics::publish(0, &s, &mut prev);

    let (status, head, body) = srv.raw(b"GET /metrics HTTP/1.1\r\nHost: t\r\nAccept: */*\r\n\r\n");
    assert_eq!(status, 200);
    assert_eq!(header(&head, "Content-Type"), http::METRICS_CONTENT_TYPE);
    assert!(
        body.contains("# TYPE sessionizer_events_in_total counter"),
        "{body}"
    );
    assert!(
        body.contains("# HELP sessionizer_events_in_total "),
        "described"
    );
    let sh = ("shard", "0");
    assert_eq!(
        value(&body, metrics::EVENTS_IN, &[("transport", "udp"), sh]),
        Some(5.0)
    );
    assert_eq!(
        value(&body, metrics::EVENTS_OUT, &[("stream", "markers"), sh]),
        Some(2.0)
    );
    assert_eq!(
        value(&body, metrics::SESSIONS_ACTIVE, &[("profile", "web"), sh]),
        Some(2.0)
    );
    assert_eq!(
        value(
            &body,
            metrics::BUILD_INFO,
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    let p50 = value(&body, metrics::EVENT_LATENCY, &[("quantile", "0.5")]).unwrap();
    let p999 = value(&body, metrics::EVENT_LATENCY, &[("quantile", "0.999")]).unwrap();
    assert!((p50 - 500e-6).abs() < 10e-6, "p50 {p50}");
    assert!((p999 - 1e-3).abs() < 20e-6, "p999 {p999}");
    assert!(value(&body, metrics::EVENT_LATENCY_WINDOW_SAMPLES, &[]).unwrap() >= 1000.0);
    assert!(value(&body, metrics::EVENT_LATENCY_SAMPLES, &[]).unwrap() >= 1000.0);

    // The next tick: counters advance by the difference, gauges follow.
    s.events_in[metrics::transport_index(Transport::Udp)] = 12;
    s.engine.active_by_profile = vec![1];
    metrics::publish(0, &s, &mut prev);
    let (status, body) = srv.get("/metrics");
    assert_eq!(status, 200);
    assert_eq!(
        value(&body, metrics::EVENTS_IN, &[("transport", "udp"), sh]),
        Some(12.0)
    );
    assert_eq!(
        value(&body, metrics::SESSIONS_ACTIVE, &[("profile", "web"), sh]),
        Some(1.0)
    );

    // HEAD: the same head, no body.
    let (status, head, body) = srv.raw(b"HEAD /metrics HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_eq!(status, 200);
    assert!(header(&head, "Content-Length").parse::<usize>().unwrap() > 1000);
    assert!(body.is_empty());
}

#[test]
fn refuses_what_it_does_not_serve() {
    let srv = Server::start();
    assert_eq!(srv.get("/nope").0, 404);
    let (status, head, _) = srv.raw(b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, 405);
    assert_eq!(header(&head, "Allow"), "GET, HEAD");
    assert_eq!(srv.raw(b"hello\r\n\r\n").0, 400);
    assert_eq!(srv.raw(b"GET /metrics HTTP/2.0\r\n\r\n").0, 505);
    let big = format!(
        "GET /metrics HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(http::REQUEST_HEAD_BYTES_MAX)
    );
    assert_eq!(srv.raw(big.as_bytes()).0, 431);
    // A head split across many small writes is still read whole.
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.set_nodelay(true).unwrap();
    for b in b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n" {
        s.write_all(&[*b]).unwrap();
    }
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");

    // Refusals are counted by status (a publish makes the next render fresh).
    let profiles: Arc<[metrics::SharedString]> = Arc::from(Vec::new());
    let (s, mut prev) = (
        ShardSample::new(profiles.clone()),
        ShardSample::new(profiles),
    );
    metrics::publish(63, &s, &mut prev);
    let (_, body) = srv.get("/metrics");
    assert!(value(&body, metrics::HTTP_REQUESTS, &[("code", "404")]).unwrap() >= 1.0);
    assert!(value(&body, metrics::HTTP_REQUESTS, &[("code", "431")]).unwrap() >= 1.0);
}

#[test]
fn a_silent_client_neither_blocks_others_nor_holds_its_slot() {
    let srv = Server::start();
    let started = Instant::now();
    let mut silent = TcpStream::connect(srv.addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    // Others are served while the silent connection waits.
    assert_eq!(srv.get("/healthz").0, 200);
    // It gets 408 once the read timeout expires, and is closed.
    let mut resp = String::new();
    silent.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 408 "), "{resp}");
    let waited = started.elapsed();
    assert!(
        waited >= http::READ_TIMEOUT - Duration::from_millis(100),
        "closed early: {waited:?}"
    );
    assert!(waited < http::READ_TIMEOUT * 3, "closed late: {waited:?}");
}

#[test]
fn connections_beyond_the_limit_wait_in_the_backlog() {
    let srv = Server::start();
    // Fill every slot with a connection that has sent half a head.
    let held: Vec<TcpStream> = (0..http::CONNECTIONS_MAX)
        .map(|_| {
            let mut s = TcpStream::connect(srv.addr).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\n").unwrap();
            s
        })
        .collect();
    // One more connects (the kernel accepts it into the backlog) but is served only once a slot
    // frees; completing the held requests frees them.
    let mut extra = TcpStream::connect(srv.addr).unwrap();
    extra.write_all(b"GET /healthz HTTP/1.1\r\n\r\n").unwrap();
    extra
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let blocked = extra.read(&mut [0u8; 1]).unwrap_err().kind();
    assert!(
        matches!(
            blocked,
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{blocked:?}"
    );
    extra
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    for mut s in held {
        s.write_all(b"\r\n").unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
    }
    let mut resp = String::new();
    extra.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200 "), "{resp}");
}
