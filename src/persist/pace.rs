//! Background file work that gives its CPU back often.
//!
//! Snapshots are built, written and deleted on the executor's blocking thread, which shares the
//! shard's CPU at `SCHED_IDLE`. That class alone does not keep the shard from waiting: on a
//! kernel without full preemption a woken shard only gets the CPU at the next tick (4 ms at
//! HZ=250) while the background thread runs in user space, and not before a long system call
//! returns (the unlink of a snapshot whose tens of megabytes are in the page cache ran 12 ms in
//! one go, measured with `perf sched`). So the work is cut into small steps with a
//! `sched_yield` between them: the shard, when it is waiting, runs at the next step boundary;
//! when it is not, the yield returns at once.

use crate::config::{SnapshotWriteRate, SNAPSHOT_WRITE_RATE_MIN};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

/// Bytes serialised between two yields (tens of microseconds of work).
pub const PACE_BYTES: usize = 16 << 10;
/// Bytes of page cache dropped per step before a file is deleted.
const EVICT_STEP_BYTES: u64 = 1 << 20;

/// Let a runnable thread of a better class have this CPU now.
pub fn yield_cpu() {
    std::thread::yield_now();
}

/// A writer that yields the CPU after every [`PACE_BYTES`] written through it. A larger write
/// (the archive's payload is one slice of tens of megabytes) is taken [`PACE_BYTES`] at a time;
/// `write_all`, which rkyv's writer uses, comes back for the rest.
pub struct Paced<W> {
    inner: W,
    since_yield: usize,
}

impl<W: Write> Paced<W> {
    pub fn new(inner: W) -> Paced<W> {
        Paced {
            inner,
            since_yield: 0,
        }
    }
}

impl<W: Write> Write for Paced<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(&buf[..buf.len().min(PACE_BYTES)])?;
        self.since_yield += n;
        if self.since_yield >= PACE_BYTES {
            self.since_yield = 0;
            yield_cpu();
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// A byte budget per second for a background write. Why a budget at all: on a VM whose host
/// does the guest's disk I/O on the guest's own CPU allowance, every megabyte written takes CPU
/// time from the VM, in stalls of 15-20 ms at a time (`bench/RESULTS.md`, "Snapshot latency");
/// a write spread over time spreads those stalls too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteRate {
    bytes_per_second: u64,
}

impl WriteRate {
    /// `bytes_per_second` 0: no limit.
    pub fn new(bytes_per_second: u64) -> WriteRate {
        WriteRate { bytes_per_second }
    }

    pub fn unlimited() -> WriteRate {
        WriteRate::new(0)
    }

    /// The budget of one shard's periodic snapshot file of `file_bytes`, under `setting`, with
    /// snapshots every `interval` and `shards` shards writing theirs at the same time.
    pub fn for_snapshot(
        setting: SnapshotWriteRate,
        interval: Duration,
        shards: u32,
        file_bytes: u64,
    ) -> WriteRate {
        let bytes_per_second = match setting {
            SnapshotWriteRate::Unlimited => 0,
            SnapshotWriteRate::BytesPerSecond(b) => (b / u64::from(shards.max(1))).max(1),
            SnapshotWriteRate::Auto => {
                let half = (interval.as_secs_f64() / 2.0).max(1e-3);
                ((file_bytes as f64 / half) as u64).max(SNAPSHOT_WRITE_RATE_MIN)
            }
        };
        WriteRate::new(bytes_per_second)
    }

    pub fn bytes_per_second(&self) -> u64 {
        self.bytes_per_second
    }

    /// How long to wait, `elapsed` after the write began with `written` bytes done, so as to
    /// stay within the budget; `None`: go on now.
    pub fn delay(&self, written: u64, elapsed: Duration) -> Option<Duration> {
        if self.bytes_per_second == 0 {
            return None;
        }
        let due = Duration::from_secs_f64(written as f64 / self.bytes_per_second as f64);
        due.checked_sub(elapsed).filter(|d| !d.is_zero())
    }

    /// Bytes to write between two waits: about 50 ms of the budget (within 128 KiB..=4 MiB), so
    /// the writes come in small, even steps; everything at once without a budget.
    pub fn step_bytes(&self) -> u64 {
        if self.bytes_per_second == 0 {
            u64::MAX
        } else {
            (self.bytes_per_second / 20).clamp(128 << 10, 4 << 20)
        }
    }
}

/// Delete a file whose pages may be in the page cache: drop them a step at a time first, so
/// that the unlink has nothing left to free in one long system call. The pages of a published
/// snapshot or a finished log are clean (they were synced), so dropping them writes nothing.
pub fn remove_file(path: &Path) -> io::Result<()> {
    if let Ok(file) = File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut at = 0;
        while at < len {
            // SAFETY: fadvise only reads the descriptor, which `file` keeps open for the call;
            // it is advice (an error leaves the pages to the unlink).
            unsafe {
                libc::posix_fadvise(
                    file.as_raw_fd(),
                    at as libc::off_t,
                    EVICT_STEP_BYTES as libc::off_t,
                    libc::POSIX_FADV_DONTNEED,
                );
            }
            at += EVICT_STEP_BYTES;
            yield_cpu();
        }
    }
    std::fs::remove_file(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paced_writer_passes_every_byte_through() {
        let mut out = Vec::new();
        let mut w = Paced::new(&mut out);
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        for piece in data.chunks(777) {
            w.write_all(piece).unwrap();
        }
        assert_eq!(
            w.write(&data).unwrap(),
            PACE_BYTES,
            "a large write is taken in steps"
        );
        w.write_all(&data[PACE_BYTES..]).unwrap();
        w.flush().unwrap();
        let mut twice = data.clone();
        twice.extend_from_slice(&data);
        assert_eq!(out, twice);
    }

    #[test]
    fn write_rate_waits_for_the_budget() {
        let rate = WriteRate::new(1 << 20);
        let ms = Duration::from_millis;
        // Half a MiB is due at 500 ms.
        assert_eq!(rate.delay(512 << 10, ms(200)), Some(ms(300)));
        assert_eq!(rate.delay(512 << 10, ms(500)), None);
        assert_eq!(rate.delay(512 << 10, ms(900)), None, "behind: no wait");
        assert_eq!(WriteRate::unlimited().delay(u64::MAX, ms(0)), None);
        assert_eq!(rate.step_bytes(), 128 << 10);
        assert_eq!(WriteRate::new(40 << 20).step_bytes(), 2 << 20);
        assert_eq!(WriteRate::unlimited().step_bytes(), u64::MAX);
    }

    #[test]
    fn a_snapshot_budget_is_the_shards_share_or_half_the_interval() {
        let secs = Duration::from_secs;
        let of = |setting, interval, shards, bytes| {
            WriteRate::for_snapshot(setting, interval, shards, bytes).bytes_per_second()
        };
        use SnapshotWriteRate::*;
        assert_eq!(of(Unlimited, secs(60), 2, 1 << 30), 0);
        assert_eq!(of(BytesPerSecond(8 << 20), secs(60), 2, 1 << 30), 4 << 20);
        // 900 MB over half a minute.
        assert_eq!(of(Auto, secs(60), 2, 900_000_000), 30_000_000);
        // A small file is still written at the floor, not over the whole half interval.
        assert_eq!(of(Auto, secs(60), 2, 1 << 20), SNAPSHOT_WRITE_RATE_MIN);
        assert_eq!(of(Auto, Duration::ZERO, 1, 1 << 20), (1 << 20) * 1000);
    }

    #[test]
    fn remove_file_removes_cached_and_empty_files() {
        let dir = std::env::temp_dir().join(format!("sz-pace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let big = dir.join("big");
        std::fs::write(&big, vec![7u8; 3 * EVICT_STEP_BYTES as usize + 5]).unwrap();
        let empty = dir.join("empty");
        std::fs::write(&empty, b"").unwrap();
        remove_file(&big).unwrap();
        remove_file(&empty).unwrap();
        assert!(!big.exists() && !empty.exists());
        assert_eq!(
            remove_file(&big).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        std::fs::remove_dir(&dir).unwrap();
    }
}
