//! The appliance under the harness's own control, for the commands that reproduce the figures of
//! `bench/RESULTS.md` end to end (`suite`): write a configuration, start `sessionizer run` on it,
//! read the addresses it bound from its `READY {json}` line on stderr (every port in these
//! configurations is 0), stop it with SIGTERM, and read the per-shard counters it logs on the way
//! out (`shard stats: {json}`). Also CPU placement: the appliance's shards on some cores, the
//! harness on the others, so the two do not take turns on one core.
//!
//! The harness still does not link the sessionizer library: it runs the binary (by default the
//! `sessionizer` next to `sessionizer-bench`) and speaks to it over sockets, like any client.
//! Every wait has a deadline; the child's stderr is copied line by line to a log file in the
//! run directory, so a failed run leaves its evidence.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// How long start-up may take: reserving memory, binding, and (persistence on) recovering.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the appliance may take to stop: its drain budget, its final snapshot, the outputs.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(90);
/// Largest CPU id the affinity helpers handle (`CPU_SETSIZE`).
const CPUS_MAX: usize = 1024;

/// The `sessionizer` binary: `explicit`, or the one next to this executable.
pub fn binary(explicit: Option<&Path>) -> Result<PathBuf, String> {
    let path = match explicit {
        Some(p) => p.to_path_buf(),
        None => std::env::current_exe()
            .map_err(|e| format!("locating sessionizer-bench: {e}"))?
            .with_file_name("sessionizer"),
    };
    if !path.is_file() {
        return Err(format!(
            "{}: no sessionizer binary there; build it (cargo build --release --bins) or pass --sessionizer PATH",
            path.display()
        ));
    }
    Ok(path)
}

/// CPU ids this process may run on.
pub fn online_cpus() -> Vec<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid out-parameter of the size passed; pid 0 is this
    // thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return vec![0];
        }
        (0..CPUS_MAX)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Pin the calling thread (and the threads it starts afterwards) to `cpus`; empty does nothing.
pub fn pin_current_thread(cpus: &[usize]) -> Result<(), String> {
    if cpus.is_empty() {
        return Ok(());
    }
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes inside it (ids are checked below
    // CPUS_MAX); sched_setaffinity(0) applies to the calling thread only.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &c in cpus {
            assert!(c < CPUS_MAX, "cpu {c} out of range");
            libc::CPU_SET(c, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(format!(
            "pinning to cpus {cpus:?}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Run `f` on a thread pinned to `cpus`: whatever it starts inherits the placement (baseline
/// receivers stand where the appliance's shards stand).
pub fn on_cpus<T: Send + 'static>(
    cpus: &[usize],
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    let cpus = cpus.to_vec();
    std::thread::Builder::new()
        .name("pinned".to_string())
        .spawn(move || pin_current_thread(&cpus).map(|()| f()))
        .map_err(|e| format!("spawning a pinned thread: {e}"))?
        .join()
        .map_err(|_| "a pinned thread panicked".to_string())?
}

/// Place a child between fork and exec: on `cpus`, or (empty) anywhere again, so a child
/// started from a pinned thread does not inherit the harness's cpus (the appliance places its
/// own shard threads; its other threads float).
fn place_child(cmd: &mut Command, cpus: &[usize]) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes inside it (ids below CPUS_MAX). Bits
    // of absent CPUs are ignored by the kernel.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for c in 0..CPUS_MAX {
            if cpus.is_empty() || cpus.contains(&c) {
                libc::CPU_SET(c, &mut set);
            }
        }
        set
    };
    // SAFETY: the closure runs in the forked child before exec and makes one raw syscall on a
    // set it owns; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
            Ok(())
        });
    }
}

/// Run `cmd` to its end on `cpus` (empty: anywhere): its exit status (or 128 + signal), wall
/// time, and CPU time (user + system, from `wait4`).
pub fn run_timed(mut cmd: Command, cpus: &[usize]) -> Result<(i32, Duration, Duration), String> {
    place_child(&mut cmd, cpus);
    let t0 = Instant::now();
    let child = cmd
        .spawn()
        .map_err(|e| format!("starting {:?}: {e}", cmd.get_program()))?;
    let mut status: libc::c_int = 0;
    // SAFETY: a zeroed rusage is a valid out-parameter; wait4 reaps our own child (std's Child
    // is not waited on afterwards, and dropping it does not wait).
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let rc = loop {
        // SAFETY: as above; `status` and `ru` are live and writable.
        let rc = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut ru) };
        if rc == -1 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        break rc;
    };
    let wall = t0.elapsed();
    if rc == -1 {
        return Err(format!("wait4: {}", std::io::Error::last_os_error()));
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1_000);
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    Ok((code, wall, tv(ru.ru_utime) + tv(ru.ru_stime)))
}

/// The child's stderr, line by line, shared with the reader thread.
#[derive(Default)]
struct Lines {
    lines: Mutex<Vec<String>>,
    grew: Condvar,
}

/// A running appliance, killed if dropped before [`Appliance::stop`].
pub struct Appliance {
    child: Option<Child>,
    lines: Arc<Lines>,
    reader: Option<std::thread::JoinHandle<()>>,
    pub ready: serde_json::Value,
    pub log: PathBuf,
}

/// What a stopped appliance reported.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Stopped {
    /// Each shard's counters, by shard id (`shard stats: {json}` lines).
    pub shard_stats: Vec<serde_json::Value>,
    /// CPU time (user + system) of the whole appliance, every thread, read just before the
    /// SIGTERM (so without the shutdown's final drain).
    pub process_cpu_s: f64,
    /// What the `file` outputs wrote, summed (their `stopped:` log lines).
    pub file_outputs: FileOutputs,
    pub exit_code: Option<i32>,
    pub stop_s: f64,
}

/// Totals of an appliance's `file` outputs, from the line each logs when it stops:
/// `output file:<dir> stopped: R records, B bytes, D dropped`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct FileOutputs {
    pub outputs: u32,
    pub records: u64,
    pub bytes: u64,
    pub dropped: u64,
}

impl FileOutputs {
    fn from_lines(lines: &[String]) -> FileOutputs {
        let mut f = FileOutputs::default();
        for line in lines {
            let Some((_, rest)) = line.split_once("output file:") else {
                continue;
            };
            let Some((_, counts)) = rest.split_once(" stopped: ") else {
                continue;
            };
            let n: Vec<u64> = counts
                .split(|c: char| !c.is_ascii_digit())
                .filter_map(|w| w.parse().ok())
                .collect();
            if let [records, bytes, dropped] = n[..] {
                f.outputs += 1;
                f.records += records;
                f.bytes += bytes;
                f.dropped += dropped;
            }
        }
        f
    }
}

/// User + system CPU time of process `pid` so far (`/proc/<pid>/stat`), in seconds.
fn process_cpu_s(pid: u32) -> Result<f64, String> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    // The command name may hold spaces; the fields counted here follow its closing paren.
    let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64, String> {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .map(|t| t as f64)
            .ok_or_else(|| format!("{path}: no field {i}"))
    };
    // SAFETY: sysconf with a valid name has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the paren.
    Ok((ticks(11)? + ticks(12)?) / hz)
}

impl Stopped {
    /// A counter summed over shards (0 when absent).
    pub fn sum(&self, field: &str) -> u64 {
        self.shard_stats
            .iter()
            .filter_map(|s| s[field].as_u64())
            .sum()
    }
}

impl Appliance {
    /// Write `config` to `dir/<name>.toml`, start the appliance on it and wait for READY. Its
    /// stderr goes to `dir/<name>.log`.
    pub fn start(binary: &Path, dir: &Path, name: &str, config: &str) -> Result<Appliance, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let cfg_path = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg_path, config).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
        let log = dir.join(format!("{name}.log"));
        let mut log_file =
            std::fs::File::create(&log).map_err(|e| format!("{}: {e}", log.display()))?;
        let mut cmd = Command::new(binary);
        cmd.arg("run")
            .arg("--config")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        place_child(&mut cmd, &[]);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", binary.display()))?;
        let pipe = child.stderr.take().expect("stderr is piped");
        let lines = Arc::new(Lines::default());
        let sink = Arc::clone(&lines);
        let reader = std::thread::Builder::new()
            .name("appliance-stderr".to_string())
            .spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let _ = writeln!(log_file, "{line}");
                    sink.lines.lock().expect("lines").push(line);
                    sink.grew.notify_all();
                }
                // End of stream: wake a waiter so it sees the child is gone.
                sink.grew.notify_all();
            })
            .map_err(|e| format!("spawning the stderr reader: {e}"))?;
        let mut app = Appliance {
            child: Some(child),
            lines,
            reader: Some(reader),
            ready: serde_json::Value::Null,
            log,
        };
        let line = app.wait_line(READY_TIMEOUT, |l| l.starts_with("READY "))?;
        app.ready = serde_json::from_str(&line["READY ".len()..])
            .map_err(|e| format!("READY line {line:?}: {e}"))?;
        Ok(app)
    }

    /// The first stderr line matching `pred`, within `timeout`; fails early if the child exits.
    pub fn wait_line(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let lines = self.lines.lines.lock().expect("lines");
                if let Some(l) = lines.iter().find(|l| pred(l)) {
                    return Ok(l.clone());
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(format!(
                        "no expected line from the appliance within {timeout:?}; see {}",
                        self.log.display()
                    ));
                }
                // Short waits: the child may exit without another line.
                let wait = (deadline - now).min(Duration::from_millis(100));
                drop(self.lines.grew.wait_timeout(lines, wait).expect("lines"));
            }
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    let lines = self.lines.lines.lock().expect("lines");
                    if let Some(l) = lines.iter().find(|l| pred(l)) {
                        return Ok(l.clone());
                    }
                    return Err(format!(
                        "the appliance exited ({status}) before the expected line; see {}",
                        self.log.display()
                    ));
                }
            }
        }
    }

    fn address(&self, section: &str, kind: &str) -> Option<SocketAddr> {
        self.ready[section]
            .as_array()?
            .iter()
            .find(|x| x["kind"] == kind)?["address"]
            .as_str()?
            .parse()
            .ok()
    }

    pub fn listener(&self, kind: &str) -> Result<SocketAddr, String> {
        self.address("listeners", kind)
            .ok_or_else(|| format!("no {kind} listener in READY {}", self.ready))
    }

    pub fn tcp_output(&self) -> Result<SocketAddr, String> {
        self.address("outputs", "tcp")
            .ok_or_else(|| format!("no tcp output in READY {}", self.ready))
    }

    /// `http://ADDR/metrics`, when the endpoint is on.
    pub fn metrics_url(&self) -> Option<String> {
        self.ready["metrics"]
            .as_str()
            .map(|a| format!("http://{a}/metrics"))
    }

    /// Every stderr line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lines.lock().expect("lines").clone()
    }

    /// SIGTERM, wait for the exit, and collect the per-shard counters it logged.
    pub fn stop(mut self) -> Result<Stopped, String> {
        let t0 = Instant::now();
        let mut child = self.child.take().expect("running until stopped");
        let cpu_s = process_cpu_s(child.id());
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("SIGTERM: {e}"));
        }
        let status = loop {
            if let Some(status) = child.try_wait().map_err(|e| format!("waiting: {e}"))? {
                break status;
            }
            if t0.elapsed() > STOP_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the appliance did not stop within {STOP_TIMEOUT:?} of SIGTERM; see {}",
                    self.log.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        if let Some(reader) = self.reader.take() {
            // The pipe closed with the exit: every line is in.
            let _ = reader.join();
        }
        let mut shard_stats: Vec<serde_json::Value> = self
            .lines()
            .iter()
            .filter_map(|l| l.split_once("shard stats: ").map(|(_, j)| j.to_string()))
            .filter_map(|j| serde_json::from_str(&j).ok())
            .collect();
        shard_stats.sort_by_key(|s| s["shard"].as_u64());
        if !status.success() {
            return Err(format!(
                "the appliance exited with {status}; see {}",
                self.log.display()
            ));
        }
        let lines = self.lines();
        Ok(Stopped {
            shard_stats,
            process_cpu_s: cpu_s?,
            file_outputs: FileOutputs::from_lines(&lines),
            exit_code: status.code(),
            stop_s: t0.elapsed().as_secs_f64(),
        })
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

/// Options of the configurations the suite writes (every address loopback, port 0).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ConfigSpec {
    /// The `cores` value: `[0]`, `"all"`, ...
    pub cores: String,
    pub arena_bytes: u64,
    pub max_sessions: u64,
    /// `[metrics]` with this publish interval; `None`: no section (no endpoint).
    pub metrics_publish: Option<String>,
    /// `[persist]` dir and snapshot interval; `None`: no durability.
    pub persist: Option<(PathBuf, String)>,
    /// `persist.snapshot_write_rate` (with `persist` only); `None`: the appliance's default.
    pub snapshot_write_rate: Option<String>,
    /// The profile's idle timeout (`"1s"` for the clickstream bench, `"30m"` to keep sessions).
    pub idle_timeout: String,
    /// A `file` output carrying every stream into this directory, with `when_full = "block"`
    /// (ingest waits for the writer, so a run's rate includes writing every record); `None`:
    /// no file output.
    pub file_output: Option<PathBuf>,
    /// The outputs carry the markers, late and dead-letter streams but not the enriched
    /// events (the shards then do not write them, docs/operations.md).
    pub markers_only: bool,
}

impl ConfigSpec {
    /// Every output's `streams` value.
    fn streams(&self) -> &'static str {
        if self.markers_only {
            r#"["markers", "late", "dead_letter"]"#
        } else {
            r#"["events", "markers", "late", "dead_letter"]"#
        }
    }

    /// The TOML text. The profile is the clickstream bench profile of `bench/README.md`
    /// ("Profiles for benchmarking"): keyed by user, ended by a logout or the idle timeout, with
    /// the `ts` field as its replay time.
    pub fn toml(&self) -> String {
        let mut t = format!(
            r#"# Written by sessionizer-bench (bench/loadgen/appliance.rs).
cores = {cores}

[memory]
arena_bytes = {arena}
max_sessions = {max_sessions}

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
streams = {streams}
"#,
            cores = self.cores,
            arena = self.arena_bytes,
            max_sessions = self.max_sessions,
            streams = self.streams(),
        );
        if let Some(dir) = &self.file_output {
            t += &format!(
                "\n[[output]]\nkind = \"file\"\npath = {}\nwhen_full = \"block\"\nstreams = {}\n",
                serde_json::Value::from(dir.display().to_string()),
                self.streams()
            );
        }
        if let Some(interval) = &self.metrics_publish {
            t += &format!(
                "\n[metrics]\naddress = \"127.0.0.1:0\"\npublish_interval = \"{interval}\"\n"
            );
        }
        if let Some((dir, interval)) = &self.persist {
            t += &format!(
                "\n[persist]\ndir = {}\nsnapshot_interval = \"{interval}\"\n",
                serde_json::Value::from(dir.display().to_string())
            );
            if let Some(rate) = &self.snapshot_write_rate {
                t += &format!("snapshot_write_rate = \"{rate}\"\n");
            }
        }
        t += &format!(
            r#"
[[profile]]
name = "bench"
match = {{ field = "user", exists = true }}
key = "user"
time = "processing"
timestamp = {{ field = "ts", format = "epoch_ms" }}
idle_timeout = "{idle}"
ends_when = {{ field = "type", eq = "logout" }}
metadata = ["tenant"]
state = ["page"]

[[profile.counter]]
name = "clicks"
when = {{ field = "type", eq = "click" }}
"#,
            idle = self.idle_timeout
        );
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_text_has_the_sections_asked_for() {
        let mut spec = ConfigSpec {
            cores: "[0]".to_string(),
            arena_bytes: 64 << 20,
            max_sessions: 500_000,
            metrics_publish: None,
            persist: None,
            snapshot_write_rate: None,
            idle_timeout: "1s".to_string(),
            file_output: None,
            markers_only: false,
        };
        let plain = spec.toml();
        assert!(plain.contains("cores = [0]") && plain.contains("idle_timeout = \"1s\""));
        assert!(!plain.contains("[metrics]") && !plain.contains("[persist]"));
        spec.metrics_publish = Some("1s".to_string());
        spec.persist = Some((PathBuf::from("/tmp/x y"), "100ms".to_string()));
        assert!(!plain.contains("kind = \"file\""));
        spec.file_output = Some(PathBuf::from("/tmp/out"));
        let full = spec.toml();
        assert!(full.contains("[metrics]\naddress = \"127.0.0.1:0\""));
        assert!(full.contains("dir = \"/tmp/x y\"\nsnapshot_interval = \"100ms\""));
        assert!(full.contains("kind = \"file\"\npath = \"/tmp/out\"\nwhen_full = \"block\""));
        assert_eq!(full.matches(r#"streams = ["events", "markers""#).count(), 2);
        spec.markers_only = true;
        let markers = spec.toml();
        assert!(!markers.contains("\"events\""), "{markers}");
        assert_eq!(
            markers
                .matches(r#"streams = ["markers", "late", "dead_letter"]"#)
                .count(),
            2
        );
    }

    #[test]
    fn file_output_totals_come_from_the_stop_lines() {
        let lines = [
            "[2026-12-06T15:25:20.123Z INFO  sessionizer::output] output file:/tmp/a stopped: 10 records, 2200 bytes, 0 dropped",
            "[2026-12-06T15:25:20.123Z INFO  sessionizer::output] output tcp:127.0.0.1:9 stopped: 5 records, 7 bytes, 1 dropped",
            "[2026-12-06T15:25:20.124Z INFO  sessionizer::output] output file:/tmp/b2 stopped: 3 records, 600 bytes, 4 dropped",
        ]
        .map(String::from);
        assert_eq!(
            FileOutputs::from_lines(&lines),
            FileOutputs {
                outputs: 2,
                records: 13,
                bytes: 2800,
                dropped: 4
            }
        );
    }

    #[test]
    fn pinned_threads_report_their_placement() {
        let cpus = online_cpus();
        assert!(!cpus.is_empty());
        let first = cpus[0];
        let seen = on_cpus(&[first], online_cpus).unwrap();
        assert_eq!(seen, vec![first]);
    }
}
