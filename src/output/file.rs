//! The `file` sink: one JSON-lines file per shard, `<path>/shard-<i>.jsonl`, written through a
//! `BufWriter` of [`FILE_BUFFER_BYTES`] by the sink thread. An existing file is appended to.
//!
//! Rotation: before a record that would take the current file past `rotate_bytes`, the file is
//! flushed, fsynced and renamed to `shard-<i>.<unix-ms>.jsonl`, the directory is fsynced, and a
//! new `shard-<i>.jsonl` is started. Rotation happens at record boundaries, so a file never
//! exceeds `rotate_bytes` unless it holds a single record longer than that (which then gets a
//! file of its own). `<unix-ms>` is the wall clock at rotation, raised when needed so that, within
//! a run, names are unique and increase (sorting rotated files numerically by it gives write
//! order); an existing name is never overwritten.
//!
//! Durability: buffered bytes go to the kernel whenever the queue runs empty; `sync_data` runs at
//! most every `fsync_interval` (only for files written since their last sync), at rotation and at
//! shutdown. Every [`WRITEBACK_STEP`] bytes handed to the kernel, their writeback to disk is
//! started without waiting (`sync_file_range`), so that a sync finds little left to write: a
//! sync that waited for a whole interval's or a whole file's bytes (hundreds of MB flat out)
//! stalled the sink long enough to fill its queue and stop ingest. A write error drops (and
//! counts) the records of the failed write and is logged, rate-limited; the sink goes on with
//! the next batch. The sink never blocks shards: when the disk is slow, the queue fills and the
//! output's `when_full` policy applies.

use super::{count_lines, Batch, Counters, RateLimit, Sink, FILE_BUFFER_BYTES};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Bytes in the kernel after which their writeback is started.
const WRITEBACK_STEP: u64 = 8 << 20;

struct ShardFile {
    shard: usize,
    path: PathBuf,
    w: BufWriter<File>,
    /// Bytes in the current file, buffered ones included.
    len: u64,
    /// Bytes sit in `w`'s buffer.
    buffered: bool,
    /// Bytes were written since the last `sync_data`.
    unsynced: bool,
    /// Offset up to which writeback has been started (or the file was synced).
    written_back: u64,
}

impl ShardFile {
    /// Start writing the bytes the kernel holds past `written_back` to disk, once there are
    /// `WRITEBACK_STEP` of them. A hint: it fails only where the file system cannot take it,
    /// and the next sync writes the bytes all the same.
    fn start_writeback(&mut self) {
        let in_kernel = self.len - self.w.buffer().len() as u64;
        if in_kernel < self.written_back + WRITEBACK_STEP {
            return;
        }
        // SAFETY: sync_file_range on a file descriptor this struct owns; no memory is passed.
        unsafe {
            libc::sync_file_range(
                self.w.get_ref().as_raw_fd(),
                self.written_back as libc::off64_t,
                (in_kernel - self.written_back) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.written_back = in_kernel;
    }
}

pub(crate) struct FileSink {
    dir: PathBuf,
    files: Vec<ShardFile>,
    rotate_bytes: u64,
    fsync_interval: Duration,
    last_sync: Instant,
    /// The last `<unix-ms>` used in a rotated name.
    last_rotated_ms: u64,
    errors: RateLimit,
}

impl FileSink {
    /// Creates `dir` and opens (appends to) every shard's file.
    pub(crate) fn open(
        dir: &Path,
        shards: usize,
        rotate_bytes: u64,
        fsync_interval: Duration,
    ) -> io::Result<FileSink> {
        assert!(rotate_bytes > 0);
        fs::create_dir_all(dir)?;
        let mut files = Vec::with_capacity(shards);
        for shard in 0..shards {
            let path = dir.join(format!("shard-{shard}.jsonl"));
            let f = open_append(&path)?;
            let len = cut_torn_tail(&f, &path)?;
            files.push(ShardFile {
                shard,
                path,
                w: BufWriter::with_capacity(FILE_BUFFER_BYTES, f),
                len,
                buffered: false,
                unsynced: false,
                written_back: len,
            });
        }
        Ok(FileSink {
            dir: dir.to_path_buf(),
            files,
            rotate_bytes,
            fsync_interval,
            last_sync: Instant::now(),
            last_rotated_ms: 0,
            errors: RateLimit::default(),
        })
    }

    fn warn(&mut self, what: &str, path: &Path, e: &io::Error) {
        if let Some(n) = self.errors.ready() {
            log::warn!(
                "output file:{}: {what} {}: {e} ({n} similar errors suppressed)",
                self.dir.display(),
                path.display()
            );
        }
    }

    /// Close the shard's current file under a rotated name and start a new one.
    fn rotate(&mut self, i: usize) -> io::Result<()> {
        let f = &mut self.files[i];
        f.w.flush()?;
        f.w.get_ref().sync_data()?;
        f.unsynced = false;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut ms = now_ms.max(self.last_rotated_ms + 1);
        let target = loop {
            let t = self.dir.join(format!("shard-{}.{ms}.jsonl", f.shard));
            if !t.exists() {
                break t;
            }
            ms += 1;
        };
        self.last_rotated_ms = ms;
        fs::rename(&f.path, &target)?;
        // From here the old file is out of the way; on failure to open the new one, keep
        // writing to the old handle (under its rotated name) and retry at the next rotation.
        let new = open_append(&f.path)?;
        // The buffer is empty (flushed above), so swapping the file under it loses nothing.
        debug_assert!(f.w.buffer().is_empty());
        *f.w.get_mut() = new;
        f.len = 0;
        f.written_back = 0;
        File::open(&self.dir)?.sync_all()
    }
}

/// A file left by an unclean stop may end inside a record (a buffer flushed mid-line, or a
/// write cut short by SIGKILL). Appending to it would fuse that piece with the next record, so
/// the piece is cut off; the record itself is emitted again by recovery (at-least-once).
/// Returns the file's length afterwards.
fn cut_torn_tail(f: &File, path: &Path) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let len = f.metadata()?.len();
    let mut end = len;
    let mut chunk = [0u8; 4096];
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let part = &mut chunk[..(end - start) as usize];
        f.read_exact_at(part, start)?;
        if let Some(nl) = memchr::memrchr(b'\n', part) {
            end = start + nl as u64 + 1;
            break;
        }
        end = start;
    }
    if end < len {
        f.set_len(end)?;
        log::warn!(
            "output {}: cut off a torn last record of {} bytes left by an unclean stop",
            path.display(),
            len - end
        );
    }
    Ok(end)
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
}

impl Sink for FileSink {
    fn write(&mut self, batch: &Batch, counters: &Counters) {
        let i = usize::from(batch.shard);
        assert!(
            i < self.files.len(),
            "batch from shard {i} of {}",
            self.files.len()
        );
        let mut rest = &batch.buf[..];
        while !rest.is_empty() {
            let f = &self.files[i];
            let room = self.rotate_bytes.saturating_sub(f.len);
            let take = if rest.len() as u64 <= room {
                rest.len()
            } else {
                let fits = &rest[..room as usize];
                match memchr::memrchr(b'\n', fits) {
                    Some(nl) => nl + 1,
                    None if f.len > 0 => {
                        if let Err(e) = self.rotate(i) {
                            let path = self.files[i].path.clone();
                            self.warn("cannot rotate", &path, &e);
                            // Write the rest unsplit; the next batch retries rotation.
                            rest.len()
                        } else {
                            continue;
                        }
                    }
                    // A single record longer than rotate_bytes, alone in a fresh file.
                    None => memchr::memchr(b'\n', rest).map_or(rest.len(), |nl| nl + 1),
                }
            };
            let f = &mut self.files[i];
            f.buffered = true;
            f.unsynced = true;
            if let Err(e) = f.w.write_all(&rest[..take]) {
                let path = f.path.clone();
                let lost = count_lines(rest);
                counters.dropped(lost);
                counters.written(
                    batch.records.saturating_sub(lost),
                    (batch.buf.len() - rest.len()) as u64,
                );
                self.warn("cannot write", &path, &e);
                return;
            }
            f.len += take as u64;
            f.start_writeback();
            rest = &rest[take..];
        }
        counters.written(batch.records, batch.buf.len() as u64);
    }

    fn tick(&mut self, now: Instant, queue_empty: bool, _counters: &Counters) {
        let sync = now.duration_since(self.last_sync) >= self.fsync_interval;
        if !queue_empty && !sync {
            return;
        }
        let mut synced = false;
        for i in 0..self.files.len() {
            let f = &mut self.files[i];
            if f.buffered {
                f.buffered = false;
                if let Err(e) = f.w.flush() {
                    let path = f.path.clone();
                    self.warn("cannot write", &path, &e);
                    continue;
                }
            }
            if sync && f.unsynced {
                f.unsynced = false;
                synced = true;
                if let Err(e) = f.w.get_ref().sync_data() {
                    let path = f.path.clone();
                    self.warn("cannot fsync", &path, &e);
                }
            }
        }
        if synced {
            self.last_sync = now;
        }
    }

    fn wait(&self) -> Duration {
        self.fsync_interval
            .clamp(Duration::from_millis(1), Duration::from_secs(1))
    }

    fn finish(&mut self, _deadline: Instant, _counters: &Counters) {
        for i in 0..self.files.len() {
            let f = &mut self.files[i];
            let r = f.w.flush().and_then(|()| f.w.get_ref().sync_data());
            if let Err(e) = r {
                let path = f.path.clone();
                log::warn!(
                    "output file:{}: cannot flush {} at shutdown: {e}",
                    self.dir.display(),
                    path.display()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writeback starts once `WRITEBACK_STEP` bytes are in the kernel, from where it last
    /// started, and a rotation starts the count again; the bytes all land in the files.
    #[test]
    fn writeback_starts_every_step_and_restarts_at_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let rotate = 3 * WRITEBACK_STEP;
        let mut sink = FileSink::open(dir.path(), 1, rotate, Duration::from_secs(3600)).unwrap();
        let counters = Counters::default();
        let line = [b"x".repeat(1023), b"\n".to_vec()].concat();
        let batch = Batch {
            shard: 0,
            records: 64,
            buf: line.repeat(64),
        };
        let mut sent = 0u64;
        let mut back = vec![];
        while sent < 4 * WRITEBACK_STEP {
            sink.write(&batch, &counters);
            sent += batch.buf.len() as u64;
            back.push(sink.files[0].written_back);
        }
        let f = &sink.files[0];
        assert!(
            f.written_back <= f.len
                && f.len - f.written_back < WRITEBACK_STEP + FILE_BUFFER_BYTES as u64
        );
        assert!(
            back.windows(2)
                .all(|w| w[1] >= w[0] || w[1] < WRITEBACK_STEP),
            "{back:?}"
        );
        assert!(
            back.iter().any(|&b| b >= WRITEBACK_STEP),
            "writeback started"
        );
        assert!(back.iter().any(|&b| b >= 2 * WRITEBACK_STEP), "and went on");
        sink.finish(Instant::now(), &counters);
        let total: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(total, sent);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            2,
            "one rotation"
        );
    }
}
