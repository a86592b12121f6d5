//! systemd integration without a crate: `sd_notify(3)` datagrams (`READY=1`, `STATUS=`,
//! `STOPPING=1`, `WATCHDOG=1`, `RELOADING=1` + `MONOTONIC_USEC=`), the watchdog interval from
//! `WATCHDOG_USEC`/`WATCHDOG_PID`, and a progress-aware watchdog: systemd is pinged only while
//! every shard's heartbeat keeps advancing, so a shard stuck in a loop gets the process killed
//! and restarted (and recovery restores its state) instead of running on half-dead.
//!
//! Outside systemd (`NOTIFY_SOCKET` unset) every call is a no-op returning `Ok(false)`. The
//! protocol is one datagram per call on an `AF_UNIX` socket named by `NOTIFY_SOCKET` (a path, or
//! `@name` for the abstract namespace), newline-separated `KEY=VALUE` assignments.
//!
//! Heartbeats cost one relaxed store per shard loop iteration or timer tick (never per event),
//! each on its own cache line so shards never share one.

use crate::config::SHARDS_MAX;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The environment variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";
pub const WATCHDOG_USEC_ENV: &str = "WATCHDOG_USEC";
pub const WATCHDOG_PID_ENV: &str = "WATCHDOG_PID";
/// A `STATUS=` text longer than this is cut (systemd shows one line in `systemctl status`).
pub const STATUS_BYTES_MAX: usize = 512;

/// A resolved notification socket.
#[derive(Debug, Clone)]
pub struct Notifier {
    addr: SocketAddr,
}

impl Notifier {
    /// The socket named by `NOTIFY_SOCKET`, or `None` when the variable is unset or empty (not
    /// started by systemd, or `NotifyAccess=none`).
    pub fn from_env() -> io::Result<Option<Notifier>> {
        match std::env::var_os(NOTIFY_SOCKET_ENV) {
            None => Ok(None),
            Some(v) if v.is_empty() => Ok(None),
            Some(v) => Notifier::new(&v).map(Some),
        }
    }

    /// A socket given as `NOTIFY_SOCKET` spells it: an absolute path, or `@name` (abstract).
    pub fn new(socket: &OsStr) -> io::Result<Notifier> {
        let b = socket.as_bytes();
        let addr = match b.first() {
            Some(b'/') => SocketAddr::from_pathname(socket)?,
            Some(b'@') => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(&b[1..])?
            }
            // `vsock:` (systemd ≥ 254, for VMs) and relative paths are not used on a host.
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("{NOTIFY_SOCKET_ENV}={socket:?}: only absolute paths and @abstract names are supported"),
                ))
            }
        };
        Ok(Notifier { addr })
    }

    /// Send one datagram of newline-separated `KEY=VALUE` assignments.
    pub fn send(&self, state: &str) -> io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let n = sock.send_to_addr(state.as_bytes(), &self.addr)?;
        if n != state.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "short notification datagram",
            ));
        }
        Ok(())
    }
}

fn notify(state: &str) -> io::Result<bool> {
    match Notifier::from_env()? {
        None => Ok(false),
        Some(n) => n.send(state).map(|()| true),
    }
}

/// Start-up (or a reload) is complete: systemd moves the unit to "active (running)".
pub fn ready() -> io::Result<bool> {
    notify("READY=1")
}

/// One line shown by `systemctl status`. Newlines would start new assignments, so they become
/// spaces; the text is cut at [`STATUS_BYTES_MAX`] on a character boundary.
pub fn status(msg: &str) -> io::Result<bool> {
    notify(&status_datagram(msg))
}

fn status_datagram(msg: &str) -> String {
    let mut end = msg.len().min(STATUS_BYTES_MAX);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    let line: String = msg[..end]
        .chars()
        .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
        .collect();
    format!("STATUS={line}")
}

/// Shutdown has begun (call it first thing on SIGTERM).
pub fn stopping() -> io::Result<bool> {
    notify("STOPPING=1")
}

/// Keep-alive for `WatchdogSec=`; prefer [`watchdog_loop`], which pings only on progress.
pub fn watchdog() -> io::Result<bool> {
    notify("WATCHDOG=1")
}

/// A reload (SIGHUP) has begun. `MONOTONIC_USEC` is what systemd ≥ 253 requires with
/// `Type=notify-reload`; older systemd (and `Type=notify` with `ExecReload=kill -HUP`, which the
/// shipped unit uses) ignores it. Send [`ready`] when the reload is done, successful or not.
pub fn reloading() -> io::Result<bool> {
    notify(&reloading_datagram(monotonic_usec()))
}

fn reloading_datagram(usec: u64) -> String {
    format!("RELOADING=1\nMONOTONIC_USEC={usec}")
}

/// `CLOCK_MONOTONIC` in µs: the clock systemd compares `MONOTONIC_USEC` against.
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC is always supported on Linux,
    // so the call cannot fail (asserted).
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC)");
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1_000
}

/// The watchdog interval systemd expects pings within, if the watchdog is on and meant for this
/// process (`WATCHDOG_PID`, when set, must be ours).
pub fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var(WATCHDOG_USEC_ENV).ok();
    let pid = std::env::var(WATCHDOG_PID_ENV).ok();
    parse_watchdog(usec.as_deref(), pid.as_deref(), std::process::id())
}

fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(p) = pid {
        if p.trim().parse::<u32>().ok()? != own_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// How often [`watchdog_loop`] checks progress and pings: half the interval, as sd_watchdog_enabled(3)
/// recommends, so one late check still leaves time for the next.
pub fn ping_period(interval: Duration) -> Duration {
    (interval / 2).max(Duration::from_millis(1))
}

/// A shard's heartbeat slot, alone on its cache line (128 bytes: adjacent-line prefetch pairs).
#[repr(align(128))]
#[derive(Debug, Default)]
struct Beat(AtomicU64);

/// Per-shard heartbeat counters. Each shard calls [`Heartbeats::beat`] with its own index once
/// per loop iteration or timer tick; the watchdog task reads them all.
#[derive(Debug)]
pub struct Heartbeats {
    beats: Box<[Beat]>,
}

impl Heartbeats {
    pub fn new(shards: usize) -> Heartbeats {
        assert!((1..=SHARDS_MAX).contains(&shards), "shards = {shards}");
        Heartbeats {
            beats: (0..shards).map(|_| Beat::default()).collect(),
        }
    }

    pub fn shards(&self) -> usize {
        self.beats.len()
    }

    /// Record progress of `shard`. Only that shard writes its slot, so a load and a store
    /// (no read-modify-write, no fence) are enough.
    #[inline]
    pub fn beat(&self, shard: usize) {
        let b = &self.beats[shard].0;
        b.store(b.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
    }

    pub fn load(&self, shard: usize) -> u64 {
        self.beats[shard].0.load(Ordering::Relaxed)
    }

    /// Whether every shard beat since the values in `last` (those of the previous ping). On
    /// `true` `last` takes the current values; on `false` it is left alone, so the next check
    /// still asks for progress since the last ping.
    pub fn all_progressed(&self, last: &mut [u64]) -> bool {
        assert_eq!(last.len(), self.beats.len());
        let all = (0..self.beats.len()).all(|i| self.load(i) != last[i]);
        if all {
            for (i, l) in last.iter_mut().enumerate() {
                *l = self.load(i);
            }
        }
        all
    }

    /// The shards that have not beaten since `last` (for the log line).
    pub fn stalled(&self, last: &[u64]) -> Vec<usize> {
        (0..self.beats.len())
            .filter(|&i| self.load(i) == last[i])
            .collect()
    }
}

/// Ping the systemd watchdog every [`ping_period`] of `interval`, but only while every shard
/// makes progress. Spawn it on shard 0 when [`watchdog_interval`] is `Some`; it runs until the
/// executor ends. If a shard stalls, pings stop and systemd kills the process after `interval`
/// (`WatchdogSec=`), then restarts it (`Restart=on-failure`).
pub async fn watchdog_loop(heartbeats: Arc<Heartbeats>, interval: Duration) {
    let period = ping_period(interval);
    let mut last = vec![0u64; heartbeats.shards()];
    let mut warned = false;
    loop {
        glommio::timer::sleep(period).await;
        if heartbeats.all_progressed(&mut last) {
            if let Err(e) = watchdog() {
                log::warn!("watchdog ping failed: {e}");
            }
            warned = false;
        } else if !warned {
            // Once per stall: the journal then shows which shard made systemd pull the trigger.
            log::error!(
                "shard(s) {:?} made no progress for {period:?}; withholding the watchdog ping (systemd restarts the service after {interval:?})",
                heartbeats.stalled(&last)
            );
            warned = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Tests that read or write the process environment run one at a time.
    static ENV: Mutex<()> = Mutex::new(());

    fn socket() -> (tempfile::TempDir, std::path::PathBuf, UnixDatagram) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (dir, path, rx)
    }

    fn recv(rx: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = rx.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn free_functions_send_the_exact_datagrams_to_notify_socket() {
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let (_dir, path, rx) = socket();
        std::env::set_var(NOTIFY_SOCKET_ENV, &path);
        assert!(ready().unwrap());
        assert_eq!(recv(&rx), "READY=1");
        assert!(status("recovered 3 shards\nlistening").unwrap());
        assert_eq!(recv(&rx), "STATUS=recovered 3 shards listening");
        assert!(watchdog().unwrap());
        assert_eq!(recv(&rx), "WATCHDOG=1");
        assert!(stopping().unwrap());
        assert_eq!(recv(&rx), "STOPPING=1");
        let before = monotonic_usec();
        assert!(reloading().unwrap());
        let got = recv(&rx);
        let usec: u64 = got
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .expect(&got)
            .parse()
            .unwrap();
        assert!(
            usec >= before && usec <= monotonic_usec(),
            "{usec} not in [{before}, now]"
        );
        std::env::remove_var(NOTIFY_SOCKET_ENV);
        assert!(!ready().unwrap(), "no socket: a no-op");
        std::env::set_var(NOTIFY_SOCKET_ENV, "");
        assert!(!ready().unwrap(), "empty: a no-op");
        std::env::remove_var(NOTIFY_SOCKET_ENV);
    }

    #[test]
    fn abstract_socket_names_are_supported() {
        let name = format!("sessionizer-notify-test-{}", std::process::id());
        use std::os::linux::net::SocketAddrExt;
        let rx = UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
            .unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::new(OsStr::new(&format!("@{name}"))).unwrap();
        n.send("READY=1\nSTATUS=up").unwrap();
        assert_eq!(recv(&rx), "READY=1\nSTATUS=up");
    }

    #[test]
    fn unsupported_and_missing_sockets_are_errors() {
        assert_eq!(
            Notifier::new(OsStr::new("vsock:2:1234"))
                .unwrap_err()
                .kind(),
            io::ErrorKind::Unsupported
        );
        let dir = tempfile::tempdir().unwrap();
        let n = Notifier::new(dir.path().join("absent.sock").as_os_str()).unwrap();
        assert!(n.send("READY=1").is_err());
    }

    #[test]
    fn status_is_one_bounded_line() {
        assert_eq!(status_datagram("a\r\nb"), "STATUS=a  b");
        let long = "é".repeat(STATUS_BYTES_MAX);
        let d = status_datagram(&long);
        assert!(d.len() <= "STATUS=".len() + STATUS_BYTES_MAX);
        assert!(d.ends_with('é'));
        assert_eq!(reloading_datagram(42), "RELOADING=1\nMONOTONIC_USEC=42");
    }

    #[test]
    fn watchdog_interval_honours_usec_and_pid() {
        assert_eq!(
            parse_watchdog(Some("10000000"), None, 7),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_watchdog(Some("10000000"), Some("7"), 7),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_watchdog(Some("10000000"), Some("8"), 7),
            None,
            "another process's watchdog"
        );
        assert_eq!(parse_watchdog(Some("0"), None, 7), None);
        assert_eq!(parse_watchdog(Some("soon"), None, 7), None);
        assert_eq!(parse_watchdog(None, Some("7"), 7), None);
        assert_eq!(ping_period(Duration::from_secs(10)), Duration::from_secs(5));

        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        std::env::set_var(WATCHDOG_USEC_ENV, "3000000");
        std::env::set_var(WATCHDOG_PID_ENV, std::process::id().to_string());
        assert_eq!(watchdog_interval(), Some(Duration::from_secs(3)));
        std::env::remove_var(WATCHDOG_PID_ENV);
        std::env::remove_var(WATCHDOG_USEC_ENV);
        assert_eq!(watchdog_interval(), None);
    }

    #[test]
    fn heartbeats_require_every_shard_to_progress_since_the_last_ping() {
        let hb = Heartbeats::new(3);
        let mut last = vec![0; 3];
        assert!(!hb.all_progressed(&mut last), "nobody beat yet");
        hb.beat(0);
        hb.beat(1);
        assert!(!hb.all_progressed(&mut last));
        assert_eq!(hb.stalled(&last), vec![2]);
        assert_eq!(
            last,
            vec![0, 0, 0],
            "a failed check keeps the last ping's values"
        );
        hb.beat(2);
        assert!(hb.all_progressed(&mut last));
        assert_eq!(last, vec![1, 1, 1]);
        hb.beat(0);
        hb.beat(2);
        hb.beat(2);
        assert!(!hb.all_progressed(&mut last));
        assert_eq!(hb.stalled(&last), vec![1]);
        hb.beat(1);
        assert!(hb.all_progressed(&mut last));
        assert_eq!(last, vec![2, 2, 3]);
        assert_eq!(std::mem::align_of::<Beat>(), 128);
    }

    #[test]
    fn watchdog_loop_pings_only_while_all_shards_progress() {
        let _g = ENV.lock().unwrap_or_else(|e| e.into_inner());
        let (_dir, path, rx) = socket();
        std::env::set_var(NOTIFY_SOCKET_ENV, &path);
        let hb = Arc::new(Heartbeats::new(2));
        let hb2 = hb.clone();
        let interval = Duration::from_millis(40);
        let ex = glommio::LocalExecutorBuilder::default().spawn(move || async move {
            let wd = glommio::spawn_local(watchdog_loop(hb2.clone(), interval));
            // Both shards beat for five ping periods: pings flow.
            for _ in 0..20 {
                hb2.beat(0);
                hb2.beat(1);
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            drop(wd);
        });
        ex.unwrap().join().unwrap();
        assert_eq!(recv(&rx), "WATCHDOG=1");
        // Shard 1 never beats: no ping however long shard 0 does.
        rx.set_nonblocking(true).unwrap();
        while rx.recv(&mut [0u8; 64]).is_ok() {}
        let hb2 = Arc::new(Heartbeats::new(2));
        let ex = glommio::LocalExecutorBuilder::default().spawn(move || async move {
            let wd = glommio::spawn_local(watchdog_loop(hb2.clone(), interval));
            for _ in 0..20 {
                hb2.beat(0);
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            drop(wd);
        });
        ex.unwrap().join().unwrap();
        std::env::remove_var(NOTIFY_SOCKET_ENV);
        assert!(
            rx.recv(&mut [0u8; 64]).is_err(),
            "a stalled shard must withhold the ping"
        );
    }
}
