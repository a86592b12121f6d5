//! Operations of the real binary: the metrics endpoint and `/readyz`, `sd_notify` (READY=1,
//! WATCHDOG=1, STOPPING=1 on a `NOTIFY_SOCKET` bound here), and SIGHUP reloads of the rules
//! (a changed `ends_when` applies to new events; a broken file keeps the running rules and says
//! why). Each test runs the binary in a fresh directory with port 0 everywhere; every wait has a
//! deadline and waits for a signal (a stderr line, a datagram, a scrape), never for a sleep.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_sessionizer");
const WAIT: Duration = Duration::from_secs(10);

fn config(dir: &Path, ends_on: &str) -> String {
    format!(
        r#"cores = [0, 1]

[memory]
arena_bytes = "2MiB"
max_sessions = 20000

[log]
level = "info"

[[listener]]
kind = "udp"
address = "127.0.0.1:0"

[[output]]
kind = "file"
path = "{out}"

[metrics]
address = "127.0.0.1:0"
publish_interval = "100ms"

[[profile]]
name = "web"
key = "user"
time = "processing"
idle_timeout = "30m"
ends_when = {{ field = "type", eq = "{ends_on}" }}
"#,
        out = dir.join("out").display()
    )
}

#[derive(Default)]
struct Lines {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

/// The binary under test, killed on drop.
struct App {
    dir: tempfile::TempDir,
    cfg_path: PathBuf,
    child: Child,
    stderr: Arc<Lines>,
    ready: serde_json::Value,
    notify: UnixDatagram,
}

impl App {
    fn start(watchdog_usec: Option<&str>) -> App {
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = dir.path().join("sessionizer.toml");
        std::fs::write(&cfg_path, config(dir.path(), "logout")).unwrap();
        let sock = dir.path().join("notify.sock");
        let notify = UnixDatagram::bind(&sock).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("run")
            .arg("--config")
            .arg(&cfg_path)
            .env("NOTIFY_SOCKET", &sock)
            .env_remove("WATCHDOG_PID")
            .env_remove("WATCHDOG_USEC")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(u) = watchdog_usec {
            // Without WATCHDOG_PID the interval is taken as ours (notify::watchdog_interval).
            cmd.env("WATCHDOG_USEC", u);
        }
        let mut child = cmd.spawn().expect("spawn sessionizer");
        let stderr = Arc::new(Lines::default());
        let (pipe, sink) = (child.stderr.take().unwrap(), stderr.clone());
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                sink.lines.lock().unwrap().push(line);
                sink.grew.notify_all();
            }
        });
        let mut app = App {
            dir,
            cfg_path,
            child,
            stderr,
            ready: serde_json::Value::Null,
            notify,
        };
        let line = app.wait_stderr(|l| l.starts_with("READY "));
        app.ready = serde_json::from_str(&line["READY ".len()..]).expect("READY json");
        app
    }

    fn wait_stderr(&self, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + WAIT;
        let mut lines = self.stderr.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| pred(l)) {
                return l.clone();
            }
            let now = Instant::now();
            assert!(
                now < deadline,
                "no matching stderr line within {WAIT:?}; stderr:\n{}",
                lines.join("\n")
            );
            lines = self
                .stderr
                .grew
                .wait_timeout(lines, deadline - now)
                .unwrap()
                .0;
        }
    }

    fn metrics_addr(&self) -> SocketAddr {
        self.ready["metrics"]
            .as_str()
            .unwrap_or_else(|| panic!("no metrics address in READY: {}", self.ready))
            .parse()
            .unwrap()
    }

    fn udp_addr(&self) -> SocketAddr {
        self.ready["listeners"][0]["address"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    }

    fn send(&self, payload: &str) {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.send_to(payload.as_bytes(), self.udp_addr()).unwrap();
    }

    /// The next notification datagram, within `WAIT`.
    fn next_notification(&self) -> String {
        self.notify.set_read_timeout(Some(WAIT)).unwrap();
        let mut buf = [0u8; 4096];
        let n = self
            .notify
            .recv(&mut buf)
            .expect("a notification within the deadline");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Read notifications until one equals `want` (others, e.g. WATCHDOG=1, are skipped).
    fn wait_notification(&self, want: &str) {
        let deadline = Instant::now() + WAIT;
        let mut seen = Vec::new();
        while Instant::now() < deadline {
            let n = self.next_notification();
            if n == want {
                return;
            }
            seen.push(n);
        }
        panic!("no {want:?} within {WAIT:?}; saw {seen:?}");
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.child.id() as i32, sig) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Every line of the file output, parsed (partial last lines are skipped).
    fn output(&self) -> Vec<serde_json::Value> {
        let mut v = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.dir.path().join("out")) else {
            return v;
        };
        let mut paths: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            if let Ok(text) = std::fs::read_to_string(&p) {
                v.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
            }
        }
        v
    }

    fn wait_output(&self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(l) = self.output().into_iter().find(|l| pred(l)) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "no such output line within {WAIT:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 GET over a plain TcpStream: (status, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status = resp
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("bad response: {resp:?}"));
    let body = resp
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// Sum of every sample of `name` whose labels contain `label` (e.g. `transport="udp"`).
fn sum(body: &str, name: &str, label: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn metrics_readiness_and_sd_notify_follow_the_runtime() {
    let mut app = App::start(Some("200000"));
    app.wait_notification("READY=1");
    let m = app.metrics_addr();
    assert_ne!(m.port(), 0, "the bound port is reported");
    let (status, body) = get(m, "/readyz");
    assert_eq!((status, body.trim()), (200, "ready"));
    assert_eq!(get(m, "/healthz").0, 200);
    // Both shards beat, so the watchdog (200 ms, pinged every 100 ms) is fed.
    app.wait_notification("WATCHDOG=1");

    let events = 20;
    for i in 0..events {
        app.send(&format!("{{\"user\":\"u{i}\",\"type\":\"click\"}}\n"));
    }
    let deadline = Instant::now() + WAIT;
    let body = loop {
        let (status, body) = get(m, "/metrics");
        assert_eq!(status, 200);
        let seen = sum(&body, "sessionizer_events_in_total", "transport=\"udp\"");
        if seen >= f64::from(events) {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "events_in stayed at {seen} of {events}:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(sum(&body, "sessionizer_events_out_total", "stream=\"events\"") >= 1.0);
    assert!(body.contains("sessionizer_ready 1"), "{body}");

    app.signal(libc::SIGTERM);
    app.wait_notification("STOPPING=1");
    let st = app.child.wait().unwrap();
    assert!(st.success(), "exit status {st}");
}

#[test]
fn sighup_reloads_the_rules_and_a_broken_file_keeps_them() {
    let app = App::start(None);
    app.wait_notification("READY=1");
    let seq_of_bye = |user: &str| {
        let u = user.to_string();
        app.wait_output(move |l| l["user"] == u.as_str() && l["type"] == "bye")["_session"]["seq"]
            .as_u64()
            .unwrap()
    };
    // Old rules: "logout" ends the session, so "bye" opens a new one.
    app.send("{\"user\":\"a\",\"type\":\"click\"}\n{\"user\":\"a\",\"type\":\"logout\"}\n{\"user\":\"a\",\"type\":\"bye\"}\n");
    assert_eq!(seq_of_bye("a"), 1);

    std::fs::write(&app.cfg_path, config(app.dir.path(), "bye")).unwrap();
    app.signal(libc::SIGHUP);
    assert!(app
        .next_notification()
        .starts_with("RELOADING=1\nMONOTONIC_USEC="));
    app.wait_notification("READY=1");
    app.wait_stderr(|l| l.contains("reloaded rules"));
    // New rules: "logout" is an ordinary event; "bye" ends the session as its third event.
    app.send("{\"user\":\"b\",\"type\":\"click\"}\n{\"user\":\"b\",\"type\":\"logout\"}\n{\"user\":\"b\",\"type\":\"bye\"}\n");
    assert_eq!(seq_of_bye("b"), 3);
    app.wait_output(|l| l["kind"] == "session_end" && l["key"] == "b");

    std::fs::write(&app.cfg_path, "[[profile]\nname = ").unwrap();
    app.signal(libc::SIGHUP);
    let why = app.wait_stderr(|l| l.contains("reload failed"));
    assert!(
        why.contains("ERROR") && why.contains("sessionizer.toml"),
        "the error names the file and the reason: {why}"
    );
    app.wait_notification("READY=1");
    // Still the reloaded rules.
    app.send("{\"user\":\"c\",\"type\":\"click\"}\n{\"user\":\"c\",\"type\":\"logout\"}\n{\"user\":\"c\",\"type\":\"bye\"}\n");
    assert_eq!(seq_of_bye("c"), 3);
}
