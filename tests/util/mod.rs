//! Helpers for tests that run the real `sessionizer` binary: each test gets a fresh temporary
//! directory and its own configuration (port 0 everywhere), starts the appliance, waits for its
//! `READY {json}` line (never a sleep), talks to it over real sockets, and kills it on drop.
//! Every wait has a deadline and fails with what it saw.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_sessionizer");
/// A liveness bound, not a speed target: on a loaded 2-vCPU machine a shard's thread can wait
/// seconds for its CPU while it reserves and prefaults its arena.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The standard test configuration: loopback listeners and a TCP output on port 0, a file
/// output in `dir/out`, small memory, one processing-time profile keyed by `user` that ends on
/// `type = "logout"`. `extra` is appended verbatim (more listeners, limits, ...).
pub fn config(dir: &Path, cores: &[usize], extra: &str) -> String {
    let out = dir.join("out");
    format!(
        r#"cores = {cores:?}

[memory]
arena_bytes = "2MiB"
max_sessions = 20000

[log]
level = "info"

[[listener]]
kind = "udp"
address = "127.0.0.1:0"

[[listener]]
kind = "tcp"
address = "127.0.0.1:0"

[[output]]
kind = "tcp"
address = "127.0.0.1:0"

[[output]]
kind = "file"
path = "{out}"

[[profile]]
name = "web"
key = "user"
time = "processing"
idle_timeout = "30m"
ends_when = {{ field = "type", eq = "logout" }}

{extra}
"#,
        out = out.display()
    )
}

/// Shared view of the child's stderr, line by line.
#[derive(Default)]
struct Lines {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

pub struct Appliance {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    stderr: Arc<Lines>,
    pub ready: serde_json::Value,
}

impl Appliance {
    /// Start with the configuration `make_config(dir)`; wait for READY.
    pub fn start(make_config: impl FnOnce(&Path) -> String) -> Appliance {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg_path = dir.path().join("sessionizer.toml");
        std::fs::write(&cfg_path, make_config(dir.path())).expect("write config");
        let mut child = Command::new(BIN)
            .arg("run")
            .arg("--config")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sessionizer");
        let stderr = Arc::new(Lines::default());
        let pipe = child.stderr.take().expect("stderr piped");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                if std::env::var_os("SESSIONIZER_TEST_ECHO").is_some() {
                    eprintln!("child: {line}");
                }
                sink.lines.lock().unwrap().push(line);
                sink.grew.notify_all();
            }
        });
        let mut a = Appliance {
            dir,
            child: Some(child),
            stderr,
            ready: serde_json::Value::Null,
        };
        let line = a.wait_stderr(READY_TIMEOUT, |l| l.starts_with("READY "));
        a.ready = serde_json::from_str(&line["READY ".len()..]).expect("READY json");
        a
    }

    /// The first stderr line matching `pred`, waiting up to `timeout`.
    pub fn wait_stderr(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
        self.try_wait_stderr(timeout, pred).unwrap_or_else(|| {
            panic!(
                "no matching stderr line within {timeout:?}; stderr:\n{}",
                self.stderr_lines().join("\n")
            )
        })
    }

    pub fn try_wait_stderr(
        &self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.stderr.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            lines = self
                .stderr
                .grew
                .wait_timeout(lines, deadline - now)
                .unwrap()
                .0;
        }
    }

    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lines.lock().unwrap().clone()
    }

    fn address(&self, section: &str, kind: &str) -> String {
        self.ready[section]
            .as_array()
            .and_then(|a| a.iter().find(|x| x["kind"] == kind))
            .and_then(|x| x["address"].as_str())
            .unwrap_or_else(|| panic!("no {kind} in READY {section}: {}", self.ready))
            .to_string()
    }

    /// Every address of `kind` in a READY section, in configuration order.
    pub fn addresses(&self, section: &str, kind: &str) -> Vec<SocketAddr> {
        self.ready[section]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|x| x["kind"] == kind)
                    .filter_map(|x| x["address"].as_str()?.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn udp_addr(&self) -> SocketAddr {
        self.address("listeners", "udp").parse().unwrap()
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.address("listeners", "tcp").parse().unwrap()
    }

    pub fn output_tcp_addr(&self) -> SocketAddr {
        self.address("outputs", "tcp").parse().unwrap()
    }

    pub fn output_dir(&self) -> PathBuf {
        PathBuf::from(self.address("outputs", "file"))
    }

    /// Connect a consumer to the TCP output and wait until the appliance logged it connected,
    /// so that no record produced afterwards can miss it.
    pub fn consumer(&self) -> Consumer {
        let s = TcpStream::connect(self.output_tcp_addr()).expect("connect to tcp output");
        let local = s.local_addr().unwrap().to_string();
        self.wait_stderr(Duration::from_secs(5), |l| {
            l.contains(&local) && l.contains("connected")
        });
        Consumer::new(s)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running").id() as i32
    }

    /// SIGTERM, then wait for the exit (up to `timeout`): the status and how long it took.
    pub fn terminate(&mut self, timeout: Duration) -> (ExitStatus, Duration) {
        let t0 = Instant::now();
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
        let child = self.child.as_mut().expect("running");
        loop {
            if let Some(st) = child.try_wait().expect("try_wait") {
                self.child = None;
                // Let the stderr reader catch the last lines.
                self.try_wait_stderr(Duration::from_secs(2), |l| l.contains("stopped in"));
                return (st, t0.elapsed());
            }
            if t0.elapsed() > timeout {
                panic!(
                    "no exit within {timeout:?} of SIGTERM; stderr:\n{}",
                    self.stderr_lines().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The per-shard counters the appliance logs at shutdown (`shard stats: {json}`).
    pub fn shard_stats(&self) -> Vec<serde_json::Value> {
        let mut v: Vec<serde_json::Value> = self
            .stderr_lines()
            .iter()
            .filter_map(|l| l.split_once("shard stats: ").map(|(_, j)| j.to_string()))
            .map(|j| serde_json::from_str(&j).expect("shard stats json"))
            .collect();
        v.sort_by_key(|s| s["shard"].as_u64());
        v
    }

    /// Every line of every file in the file output directory.
    pub fn file_lines(&self) -> Vec<String> {
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(self.output_dir()) else {
            return out;
        };
        let mut paths: Vec<PathBuf> = rd.flatten().map(|e| e.path()).collect();
        paths.sort();
        for p in paths {
            if let Ok(text) = std::fs::read_to_string(&p) {
                out.extend(text.lines().map(str::to_string));
            }
        }
        out
    }

    /// Poll the file output until `pred` holds on its lines.
    pub fn wait_files(&self, timeout: Duration, pred: impl Fn(&[String]) -> bool) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.file_lines();
            if pred(&lines) {
                return lines;
            }
            if Instant::now() >= deadline {
                panic!(
                    "file output never matched within {timeout:?}; {} lines",
                    lines.len()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Appliance {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A reader of the TCP output.
pub struct Consumer {
    stream: TcpStream,
    buf: Vec<u8>,
    pub lines: Vec<String>,
}

impl Consumer {
    fn new(stream: TcpStream) -> Consumer {
        stream
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        Consumer {
            stream,
            buf: Vec::new(),
            lines: Vec::new(),
        }
    }

    /// Read until `pred(all lines so far)` holds; panics at the deadline showing the lines.
    pub fn read_until(&mut self, timeout: Duration, pred: impl Fn(&[String]) -> bool) -> &[String] {
        let deadline = Instant::now() + timeout;
        let mut chunk = vec![0u8; 1 << 16];
        while !pred(&self.lines) {
            if Instant::now() >= deadline {
                let tail: Vec<&String> = self.lines.iter().rev().take(20).collect();
                panic!(
                    "tcp output: condition not met within {timeout:?}; {} lines, last ones: {tail:#?}",
                    self.lines.len()
                );
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("tcp output closed; {} lines", self.lines.len()),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    while let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = self.buf.drain(..=i).collect();
                        self.lines
                            .push(String::from_utf8_lossy(&line[..line.len() - 1]).into_owned());
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("tcp output: {e}"),
            }
        }
        &self.lines
    }
}

/// Lines parsed as JSON (lines that are not JSON are skipped).
pub fn json_lines(lines: &[String]) -> Vec<serde_json::Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

pub fn count_kind(lines: &[String], kind: &str) -> usize {
    let needle = format!("\"kind\":\"{kind}\"");
    lines.iter().filter(|l| l.contains(&needle)).count()
}

pub fn udp_sender() -> UdpSocket {
    UdpSocket::bind("127.0.0.1:0").expect("bind udp client")
}

/// A datagram with the steering header for `key`, then the payload.
pub fn steered(key: &str, payload: &[u8]) -> Vec<u8> {
    let mut d = sessionizer::ingest::steering::header_for_key(key.as_bytes()).to_vec();
    d.extend_from_slice(payload);
    d
}

pub fn tcp_send(addr: SocketAddr, data: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect tcp listener");
    s.write_all(data).expect("tcp write");
    s
}

/// A small deterministic RNG (xorshift64*), so failing randomized tests can print their seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The metrics endpoint's bound address from the READY line (`"metrics"`).
pub fn metrics_addr(app: &Appliance) -> SocketAddr {
    app.ready["metrics"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no metrics address in READY: {}", app.ready))
}

/// One HTTP/1.1 GET: (status, body). The endpoint closes every connection after answering.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to metrics");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read http response");
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

/// Sum of every sample of `name` whose label set contains each of `labels` (`("reason", "x")`).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Scrape `/metrics` until `pred` holds on the text; panics at the deadline with the last one.
pub fn wait_metrics(app: &Appliance, timeout: Duration, pred: impl Fn(&str) -> bool) -> String {
    let addr = metrics_addr(app);
    let deadline = Instant::now() + timeout;
    loop {
        let (status, body) = http_get(addr, "/metrics");
        assert_eq!(status, 200, "{body}");
        if pred(&body) {
            return body;
        }
        if Instant::now() >= deadline {
            panic!("metrics never matched within {timeout:?}:\n{body}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Resident memory of a process in KiB (`VmRSS` of /proc/<pid>/status).
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// A key (`{prefix}{n}`) whose owner shard (`fnv1a32(key) % shards`) is `shard`.
pub fn key_on_shard(prefix: &str, shard: u32, shards: u32) -> String {
    (0..)
        .map(|n| format!("{prefix}{n}"))
        .find(|k| sessionizer::engine::fnv1a32(k.as_bytes()) % shards == shard)
        .expect("some key lands on every shard")
}
