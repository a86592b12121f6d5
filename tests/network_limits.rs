//! Network limits of the real appliance: the TCP connection cap, the idle timeout, the line
//! limit on a live connection, many idle and half-open connections next to a working client,
//! per-listener source allowlists, and a default configuration that binds only loopback.

mod util;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};
use util::*;

const T: Duration = Duration::from_secs(10);

fn sum(stats: &[serde_json::Value], field: &str) -> u64 {
    stats.iter().map(|s| s[field].as_u64().unwrap_or(0)).sum()
}

/// Reads until the server closes the connection (EOF or reset); panics if it stays open
/// past `timeout`. Data the server sends is discarded (ingest never sends any).
fn wait_closed_by_server(s: &mut TcpStream, timeout: Duration) {
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return, // reset: closed too
        }
        assert!(
            Instant::now() < deadline,
            "connection still open after {timeout:?}"
        );
    }
}

/// True when the connection is still open after `for_` (the read times out without EOF).
fn stays_open(s: &mut TcpStream, for_: Duration) -> bool {
    s.set_read_timeout(Some(for_)).unwrap();
    let mut buf = [0u8; 16];
    matches!(
        s.read(&mut buf),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
    )
}

fn logout(user: &str) -> String {
    format!("{{\"user\":\"{user}\",\"type\":\"logout\"}}\n")
}

fn click(user: &str) -> String {
    format!("{{\"user\":\"{user}\",\"type\":\"click\"}}\n")
}

fn ended(lines: &[String], user: &str) -> bool {
    json_lines(lines)
        .iter()
        .any(|v| v["kind"] == "session_end" && v["key"] == user)
}

#[test]
fn connections_over_the_limit_are_closed_and_counted_and_the_others_keep_working() {
    // One shard, so its share of the limit is the whole limit.
    let mut app = Appliance::start(|d| config(d, &[0], "[limits]\ntcp_connections_max = 4\n"));
    let mut out = app.consumer();
    let mut conns: Vec<TcpStream> = (0..4)
        .map(|i| tcp_send(app.tcp_addr(), click(&format!("c{i}")).as_bytes()))
        .collect();
    // Each connection's first event is enriched only once it was admitted.
    out.read_until(T, |l| count_kind(l, "session_start") == 4);

    let mut extra = tcp_send(app.tcp_addr(), b"");
    wait_closed_by_server(&mut extra, T);
    // Whatever it managed to send before the close is not processed.
    let _ = extra.write_all(click("extra").as_bytes());

    for (i, c) in conns.iter_mut().enumerate() {
        c.write_all(logout(&format!("c{i}")).as_bytes()).unwrap();
    }
    let lines = out
        .read_until(T, |l| (0..4).all(|i| ended(l, &format!("c{i}"))))
        .to_vec();
    assert!(!lines.iter().any(|l| l.contains("\"extra\"")));

    // A freed slot admits a new connection.
    drop(conns.pop());
    let deadline = Instant::now() + T;
    loop {
        let mut again = tcp_send(app.tcp_addr(), logout("again").as_bytes());
        if stays_open(&mut again, Duration::from_millis(200)) {
            break;
        }
        // The close of the dropped connection may not have been seen yet: that attempt was over
        // the limit too. Try again until the deadline.
        assert!(Instant::now() < deadline, "no slot freed");
    }
    out.read_until(T, |l| ended(l, "again"));

    let (status, _) = app.terminate(T);
    assert!(status.success());
    let stats = app.shard_stats();
    let over = sum(&stats, "tcp_over_limit");
    assert!(over >= 1, "{stats:?}");
    assert_eq!(
        sum(&stats, "tcp_accepted"),
        5,
        "four, then one after a slot freed: {stats:?}"
    );
}

#[test]
fn an_idle_connection_is_closed_and_a_busy_one_is_not() {
    let mut app = Appliance::start(|d| {
        config(
            d,
            &[0],
            "[limits]\ntcp_idle_timeout = \"1s\"\nline_bytes_max = 1024\n",
        )
    });
    let mut out = app.consumer();
    let mut idle = tcp_send(app.tcp_addr(), b"");
    // A partial line does not count as activity forever: the connection is idle after it.
    let mut partial = tcp_send(app.tcp_addr(), br#"{"user":"partial","ty"#);
    let mut busy = tcp_send(app.tcp_addr(), b"");
    let t0 = Instant::now();
    // The busy connection sends well within every second, including an over-long line, which is
    // dead-lettered while the connection goes on.
    let long = format!("{{\"user\":\"busy\",\"pad\":\"{}\"}}\n", "x".repeat(3000));
    let mut n = 0;
    while t0.elapsed() < Duration::from_millis(2500) {
        busy.write_all(click("busy").as_bytes()).unwrap();
        n += 1;
        if n == 3 {
            busy.write_all(long.as_bytes()).unwrap();
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    wait_closed_by_server(&mut idle, T);
    wait_closed_by_server(&mut partial, T);
    busy.write_all(logout("busy").as_bytes()).unwrap();
    let lines = out.read_until(T, |l| ended(l, "busy")).to_vec();
    let end = json_lines(&lines)
        .into_iter()
        .find(|v| v["kind"] == "session_end" && v["key"] == "busy")
        .unwrap();
    assert_eq!(end["count"], n + 1, "{end}");
    let dead: Vec<serde_json::Value> = json_lines(&lines)
        .into_iter()
        .filter(|v| v["kind"] == "dead_letter")
        .collect();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["reason"], "line_too_long");
    assert_eq!(dead[0]["transport"], "tcp");
    assert!(!lines.iter().any(|l| l.contains("\"partial\"")));

    let (status, _) = app.terminate(T);
    assert!(status.success());
    let stats = app.shard_stats();
    assert_eq!(sum(&stats, "tcp_idle_closed"), 2, "{stats:?}");
    assert_eq!(sum(&stats, "lines_too_long"), 1, "{stats:?}");
}

#[test]
fn many_idle_and_half_open_connections_do_not_starve_a_working_client() {
    const IDLE: usize = 200;
    let extra = "[limits]\nline_bytes_max = 4096\n\n[metrics]\naddress = \"127.0.0.1:0\"\npublish_interval = \"100ms\"\n";
    let mut app = Appliance::start(|d| config(d, &[0, 1], extra));
    let mut out = app.consumer();
    let mut idle: Vec<TcpStream> = Vec::with_capacity(IDLE);
    for i in 0..IDLE {
        let mut s = TcpStream::connect(app.tcp_addr()).unwrap();
        match i % 3 {
            // A partial line and nothing more.
            0 => s.write_all(br#"{"user":"half","type":"cl"#).unwrap(),
            // Half-closed: the client's sending side is shut, nothing sent; the server sees EOF
            // and closes its end.
            1 => s.shutdown(std::net::Shutdown::Write).unwrap(),
            // Silent.
            _ => {}
        }
        idle.push(s);
    }
    wait_metrics_tcp_connections(&app, IDLE * 2 / 3);

    // The working client gets its events processed while the others hang around.
    let keys: Vec<String> = (0..20)
        .flat_map(|i| [format!("tcp-worker-{i}"), format!("udp-worker-{i}")])
        .collect();
    let mut worker = TcpStream::connect(app.tcp_addr()).unwrap();
    let udp = udp_sender();
    for k in &keys {
        let two = click(k) + &logout(k);
        if k.starts_with("tcp") {
            worker.write_all(two.as_bytes()).unwrap();
        } else {
            udp.send_to(two.as_bytes(), app.udp_addr()).unwrap();
        }
    }
    let lines = out
        .read_until(T, |l| keys.iter().all(|k| ended(l, k)))
        .to_vec();
    for k in &keys {
        let end = json_lines(&lines)
            .into_iter()
            .find(|v| v["kind"] == "session_end" && v["key"] == k.as_str())
            .unwrap();
        assert_eq!(end["reason"], "ends_when", "{end}");
        assert_eq!(end["count"], 2, "{end}");
    }
    assert!(!lines.iter().any(|l| l.contains("\"half\"")));
    drop(idle);
    let (status, _) = app.terminate(T);
    assert!(status.success());
    let stats = app.shard_stats();
    assert_eq!(sum(&stats, "tcp_accepted"), IDLE as u64 + 1, "{stats:?}");
    assert_eq!(sum(&stats, "tcp_over_limit"), 0, "{stats:?}");
}

/// Waits until the process reports at least `n` open ingest connections.
fn wait_metrics_tcp_connections(app: &Appliance, n: usize) {
    let deadline = Instant::now() + T;
    loop {
        let (_, body) = http_get(metrics_addr(app), "/metrics");
        if metric_sum(&body, "sessionizer_tcp_connections", &[]) as usize >= n {
            return;
        }
        assert!(Instant::now() < deadline, "fewer than {n} connections open");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sources_outside_a_listener_allowlist_are_refused_and_counted() {
    let extra = r#"
[metrics]
address = "127.0.0.1:0"
publish_interval = "100ms"

[[listener]]
kind = "udp"
address = "127.0.0.1:0"
allow = ["10.0.0.0/8"]

[[listener]]
kind = "tcp"
address = "127.0.0.1:0"
allow = ["10.0.0.0/8", "192.168.0.0/16"]

[[listener]]
kind = "udp"
address = "127.0.0.1:0"
allow = ["127.0.0.0/8"]

[[listener]]
kind = "tcp"
address = "127.0.0.1:0"
allow = ["::1", "127.0.0.1/32"]
"#;
    let mut app = Appliance::start(|d| config(d, &[0, 1], extra));
    let mut out = app.consumer();
    let udp: Vec<SocketAddr> = app.addresses("listeners", "udp");
    let tcp: Vec<SocketAddr> = app.addresses("listeners", "tcp");
    assert_eq!((udp.len(), tcp.len()), (3, 3), "{}", app.ready);

    // Refused: loopback is not in 10.0.0.0/8.
    let sender = udp_sender();
    for i in 0..5 {
        sender
            .send_to(click(&format!("udp-refused-{i}")).as_bytes(), udp[1])
            .unwrap();
    }
    let mut refused = TcpStream::connect(tcp[1]).unwrap();
    let _ = refused.write_all(click("tcp-refused").as_bytes());
    wait_closed_by_server(&mut refused, T);

    // Allowed: an explicit loopback allowlist, and the listeners without one.
    sender
        .send_to(logout("udp-allowed").as_bytes(), udp[2])
        .unwrap();
    sender
        .send_to(logout("udp-open").as_bytes(), udp[0])
        .unwrap();
    let _a = tcp_send(tcp[2], logout("tcp-allowed").as_bytes());
    let _b = tcp_send(tcp[0], logout("tcp-open").as_bytes());
    let lines = out
        .read_until(T, |l| {
            ["udp-allowed", "udp-open", "tcp-allowed", "tcp-open"]
                .iter()
                .all(|k| ended(l, k))
        })
        .to_vec();
    assert!(!lines.iter().any(|l| l.contains("refused")), "{lines:?}");

    let m = wait_metrics(&app, T, |m| {
        metric_sum(m, "sessionizer_refused_total", &[("transport", "udp")]) == 5.0
            && metric_sum(m, "sessionizer_refused_total", &[("transport", "tcp")]) == 1.0
    });
    assert_eq!(
        metric_sum(&m, "sessionizer_events_in_total", &[]),
        4.0,
        "refused input never reaches the shards"
    );
    let (status, _) = app.terminate(T);
    assert!(status.success());
    let stats = app.shard_stats();
    assert_eq!(sum(&stats, "udp_refused"), 5, "{stats:?}");
    assert_eq!(sum(&stats, "tcp_refused"), 1, "{stats:?}");
}

#[test]
fn the_default_configuration_binds_only_loopback() {
    let cfg = sessionizer::config::Config::default_embedded();
    assert!(!cfg.listeners.is_empty());
    for l in &cfg.listeners {
        assert!(l.address.ip().is_loopback(), "listener {:?}", l.address);
    }
    for o in &cfg.outputs {
        if let Some(a) = o.address {
            assert!(a.ip().is_loopback(), "output {a}");
        }
    }
    let m = cfg
        .metrics
        .address
        .expect("the shipped config has a metrics endpoint");
    assert!(m.ip().is_loopback(), "metrics {m}");
    // The same holds for what the binary itself reports about its embedded default.
    let out = std::process::Command::new(BIN)
        .arg("check-config")
        .output()
        .expect("run check-config");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let addrs: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("listener:") || l.starts_with("metrics:"))
        .collect();
    assert_eq!(addrs.len(), cfg.listeners.len() + 1, "{text}");
    for l in addrs {
        assert!(l.contains("127.0.0.1:"), "{l}");
    }
    // And the README tells how to open it deliberately.
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).expect("README");
    assert!(
        readme.contains("## Opening the appliance to a network"),
        "README lacks the section the reference config points to"
    );
}
