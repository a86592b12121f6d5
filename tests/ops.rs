//! Operations of the real binary: the metrics endpoint and `/readyz`, `sd_notify` (READY=1,
//! WATCHDOG=1, STOPPING=1 on a `NOTIFY_SOCKET` bound here), SIGHUP reloads of the rules
//! (a changed `ends_when` applies to new events; a broken file keeps the running rules and says
//! why), and the runtime's own gauges and counters (hand-offs, expiry lag, snapshots, log
//! flushes) moving with traffic and persistence. Each test runs the binary in a fresh directory
//! with port 0 everywhere; every wait has a deadline and waits for a signal (a stderr line, a
//! datagram, a scrape), never for a sleep.

mod util;

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
        App::start_with(watchdog_usec, |dir| config(dir, "logout"))
    }

    /// [`App::start`] on the config `text` makes for the test's directory.
    fn start_with(watchdog_usec: Option<&str>, text: impl FnOnce(&Path) -> String) -> App {
        let dir = tempfile::tempdir().unwrap();
        let cfg_path = dir.path().join("sessionizer.toml");
        std::fs::write(&cfg_path, text(dir.path())).unwrap();
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

/// The procedure of docs/operations.md, "Changing a profile's session data": a reload cannot
/// change a profile's session data, so the changed profile is appended under a new name and the
/// old one gets a `match` nothing satisfies. New events go to the new profile at once; the old
/// profile's open session, and its open sub-session, end with their markers and statistics when
/// their timeouts pass. (Appending a profile renumbers the sub-session kinds, which the reload
/// carries the open sub-sessions through.)
#[test]
fn a_profile_is_retired_by_reload_without_losing_its_sessions() {
    let short = |dir: &Path| {
        config(dir, "logout").replace(r#"idle_timeout = "30m""#, r#"idle_timeout = "2s""#)
            + "[[profile.sub_session]]\nname = \"tab\"\nkey = \"tab\"\nidle_timeout = \"2s\"\n"
    };
    let app = App::start_with(None, short);
    app.wait_notification("READY=1");
    app.send("{\"user\":\"a\",\"tab\":\"t\",\"type\":\"click\",\"page\":\"/1\"}\n{\"user\":\"a\",\"tab\":\"t\",\"type\":\"click\",\"page\":\"/2\"}\n");
    let first = app.wait_output(|l| l["user"] == "a" && l["page"] == "/2");
    assert_eq!(first["_session"]["profile"], "web");
    let old_id = first["_session"]["id"].clone();
    let tab = app.wait_output(|l| l["kind"] == "sub_session_start");
    assert_eq!(tab["parent_session_id"], old_id);

    // Changing `web`'s session data in place is refused: the running rules stay.
    let changed = short(app.dir.path()).replace("ends_when", "state = [\"page\"]\nends_when");
    std::fs::write(&app.cfg_path, &changed).unwrap();
    app.signal(libc::SIGHUP);
    let why = app.wait_stderr(|l| l.contains("reload failed"));
    assert!(why.contains("web"), "{why}");

    // Retired: `web` matches nothing; its successor carries the change.
    let retired = short(app.dir.path()).replace(
        "name = \"web\"",
        "name = \"web\"\nmatch = { field = \"_retired\", exists = true }",
    ) + r#"
[[profile]]
name = "web_v2"
key = "user"
time = "processing"
idle_timeout = "30m"
state = ["page"]
"#;
    std::fs::write(&app.cfg_path, &retired).unwrap();
    app.signal(libc::SIGHUP);
    app.wait_stderr(|l| l.contains("reloaded rules"));
    app.send("{\"user\":\"a\",\"type\":\"click\",\"page\":\"/3\"}\n");
    let next = app.wait_output(|l| l["user"] == "a" && l["page"] == "/3");
    assert_eq!(next["_session"]["profile"], "web_v2");
    assert_ne!(next["_session"]["id"], old_id);

    let end = app.wait_output(|l| l["kind"] == "session_end" && l["profile"] == "web");
    assert_eq!(end["session_id"], old_id);
    assert_eq!(
        (end["count"].as_u64(), end["reason"].as_str()),
        (Some(2), Some("idle"))
    );
    let tab_end = app.wait_output(|l| l["kind"] == "sub_session_end");
    assert_eq!(tab_end["session_id"], tab["session_id"]);
    assert_eq!(tab_end["count"], 2, "{tab_end}");
}

/// Per-shard value of `name` (`labels` narrow it), for shards 0 and 1.
fn per_shard(body: &str, name: &str, labels: &[(&str, &str)]) -> [f64; 2] {
    [0, 1].map(|sh| {
        let sh = sh.to_string();
        let mut l = labels.to_vec();
        l.push(("shard", &sh));
        util::metric_sum(body, name, &l)
    })
}

/// Whether `name` has a sample for each of shards 0 and 1.
fn on_both_shards(body: &str, name: &str) -> bool {
    ["0", "1"].iter().all(|sh| {
        body.lines()
            .any(|l| l.starts_with(&format!("{name}{{")) && l.contains(&format!("shard=\"{sh}\"")))
    })
}

/// Two shards with persistence (snapshots every 200 ms) and unsteered UDP from one socket: the
/// kernel gives every datagram to one shard, so the events of keys the other shard owns are
/// handed over. The runtime's own series move: hand-offs out and in, snapshots with their
/// durations, log flushes with theirs, and the expiry lag of every shard.
#[test]
fn handoff_expiry_snapshot_and_log_metrics_move() {
    let app = util::Appliance::start(|dir| {
        util::config(
            dir,
            &[0, 1],
            &format!(
                r#"[metrics]
address = "127.0.0.1:0"
publish_interval = "100ms"

[persist]
dir = "{}"
snapshot_interval = "200ms"
fsync = "interval"
fsync_interval = "5ms"
"#,
                dir.join("state").display()
            ),
        )
    });
    let keys: Vec<String> = (0..2)
        .flat_map(|sh| (0..5).map(move |i| util::key_on_shard(&format!("k{i}-"), sh, 2)))
        .collect();
    let udp = util::udp_sender();
    let rounds = 20;
    for r in 0..rounds {
        let datagram: String = keys
            .iter()
            .map(|k| format!("{{\"user\":\"{k}\",\"type\":\"click\",\"n\":{r}}}\n"))
            .collect();
        udp.send_to(datagram.as_bytes(), app.udp_addr()).unwrap();
    }
    // Half the keys belong to the shard that did not receive the datagrams.
    let handed = (rounds * keys.len() / 2) as f64;
    // The lag is a gauge that may read 0 µs at one publish: it must be seen above 0 once.
    let lag_seen = std::cell::Cell::new([false; 2]);
    let body = util::wait_metrics(&app, WAIT, |b| {
        let lag = per_shard(b, "sessionizer_expiry_lag_seconds", &[]);
        let mut seen = lag_seen.get();
        for (s, v) in seen.iter_mut().zip(lag) {
            *s |= v > 0.0;
        }
        lag_seen.set(seen);
        let out = util::metric_sum(
            b,
            "sessionizer_handoff_events_total",
            &[("direction", "out")],
        );
        let inn = util::metric_sum(
            b,
            "sessionizer_handoff_events_total",
            &[("direction", "in")],
        );
        let min = |v: [f64; 2]| v[0].min(v[1]);
        out >= handed
            && inn >= handed
            && min(per_shard(b, "sessionizer_snapshots_total", &[])) >= 2.0
            && min(per_shard(b, "sessionizer_snapshot_microseconds_total", &[])) > 0.0
            && min(per_shard(
                b,
                "sessionizer_snapshot_last_duration_seconds",
                &[],
            )) > 0.0
            // `"auto"` pacing: at least its floor of 1 MiB a second.
            && min(per_shard(b, "sessionizer_snapshot_write_rate_bytes", &[])) >= 1_048_576.0
            && min(per_shard(b, "sessionizer_log_flushes_total", &[])) >= 1.0
            && min(per_shard(
                b,
                "sessionizer_log_flush_microseconds_total",
                &[],
            )) > 0.0
            && min(per_shard(
                b,
                "sessionizer_log_flush_last_duration_seconds",
                &[],
            )) > 0.0
            && seen == [true, true]
    });
    let out = util::metric_sum(
        &body,
        "sessionizer_handoff_events_total",
        &[("direction", "out")],
    );
    assert_eq!(
        out, handed,
        "exactly the other shard's events cross:\n{body}"
    );
    for name in [
        "sessionizer_handoff_queue_batches",
        "sessionizer_expiry_lag_seconds",
        "sessionizer_snapshot_failures_total",
        "sessionizer_log_flush_failures_total",
    ] {
        assert!(on_both_shards(&body, name), "{name} missing:\n{body}");
    }
    // Nothing is in flight once the traffic is processed; at most the pair's buffers ever are.
    let q = per_shard(&body, "sessionizer_handoff_queue_batches", &[]);
    assert!(q.iter().all(|&v| (0.0..=66.0).contains(&v)), "{q:?}");
    // A healthy shard runs its expiry passes on time: well under a second late.
    let lag = per_shard(&body, "sessionizer_expiry_lag_seconds", &[]);
    assert!(lag.iter().all(|&v| (0.0..1.0).contains(&v)), "{lag:?}");
    for name in [
        "sessionizer_snapshot_failures_total",
        "sessionizer_log_flush_failures_total",
    ] {
        assert_eq!(util::metric_sum(&body, name, &[]), 0.0, "{name}:\n{body}");
    }
}
