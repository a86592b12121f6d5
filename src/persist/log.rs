//! The event log: per shard, append-only files `log-<shard>-<generation>.szl` holding every
//! accepted event with its arrival wall time, and the expiry passes a replay must run where they
//! ran ([`PASS`]), so recovery can replay what came after the newest snapshot through the
//! restored engine (`docs/storage-format.md` documents every byte).
//!
//! Each file starts with a 64-byte header (magic, shard, generation, the sequence number of its
//! first record); records are framed as `[len u32][crc32 u32][arrival wall ms i64][raw bytes]`
//! and numbered implicitly from the header's first sequence. The CRC-32 covers the length, the
//! wall time and the raw bytes.
//!
//! Writing is group commit: [`LogWriter::append`] frames a record into a bounded buffer and
//! returns its sequence number; [`LogWriter::commit`], called by a periodic task, writes the
//! buffer and fdatasyncs per `persist.fsync` (`always`: every commit; `interval`: at most every
//! `fsync_interval`, or when the buffer is half full; `never`: never). It returns the durable
//! sequence: every record at or below it survives a crash (`never`: a process crash only).
//! An I/O error (a full disk) leaves the buffer intact and is returned; the next commit resumes
//! where the write stopped. A failed fsync may have lost written pages, so the writer moves to a
//! new file and writes every not-yet-durable record again there (readers skip the duplicates).
//!
//! With [`LogWriter::sync_in_background`] (the runtime's choice) the fdatasync runs on a helper
//! thread instead: a commit writes the buffer and, when a sync is due, hands a duplicate of the
//! file descriptor to the helper and returns; a later commit collects the result and moves the
//! durable sequence. Only one sync is in flight; the buffer keeps every record until a sync
//! covering it completed (a failed one is handled as above). A rotation then switches files
//! without syncing on the caller's thread: the next sync covers the previous file's tail, the new
//! file and the directory. Why: a shard waiting in fdatasync processes nothing, and on a busy
//! disk that wait is milliseconds every `fsync_interval`.
//!
//! Reading ([`LogReader`]) walks the files in generation order from a sequence number on. Damage
//! policy: a torn tail (a record cut short by the end of the newest file, a last record with a bad
//! CRC, or zeros to the end) is truncated away with a warning and counted; any other damage (a
//! bad CRC with data after it, an implausible length, a torn tail in an older file) stops reading
//! that file at that point, leaves it untouched, warns and counts it; reading continues in the
//! next file only if that file starts at or before the next expected sequence (a writer resumed
//! after recovery does exactly that), otherwise it stops with a gap reported.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{fsync_dir, list_files};
use crate::config::{FsyncPolicy, Persist};

pub const MAGIC: [u8; 8] = *b"SZLOG001";
/// Version 2 logs the expiry passes that matter to a replay ([`PASS`]); version 1 files are read
/// too, and their replay runs its own passes at the records' arrival times.
pub const FORMAT_VERSION: u32 = 2;
const FORMAT_VERSION_MIN: u32 = 1;
/// The first version with pass records.
const PASSES_LOGGED_FROM: u32 = 2;
/// The raw bytes of an expiry-pass record, whose wall time is the pass's: one control byte,
/// which no event line starts with (like the producer tags, `persist::producer`).
pub const PASS: &[u8] = &[0x1C];
pub const HEADER_BYTES: usize = 64;
/// Offset of the header checksum: CRC-32 of bytes `0..HEADER_CRC_AT`.
const HEADER_CRC_AT: usize = 60;
/// `[len u32][crc32 u32][wall ms i64]` before the raw bytes.
pub const FRAME_HEADER_BYTES: usize = 16;
/// Longest raw event a record may hold (`limits.line_bytes_max` is at most 16 MiB).
pub const RAW_BYTES_MAX: usize = 16 << 20;
/// Largest first sequence a log header, or log position a snapshot header, may carry. At ten
/// million records a second a log takes about 14,000 years to get there, so a larger value comes
/// only from a damaged or foreign file; refusing it keeps every `seq + n` the reader, the writer
/// resumed after it and recovery compute far from overflow.
pub const SEQ_MAX: u64 = 1 << 62;
pub const PREFIX: &str = "log-";
pub const SUFFIX: &str = ".szl";

/// Which expiry passes the log records, and where (`docs/storage-format.md`, "Record kinds"):
/// a pass that ended a session at once, before its end markers leave; of those that changed the
/// engine otherwise (held a watermark, moved a wheel on), the last before the next event or
/// pass record, just before it; none that changed nothing. A pass so left out ended nothing,
/// and the next one logged does all it did (a later hold covers an earlier one; a wheel drained
/// up to a later second re-links what an earlier drain would have, in the same order). Apart
/// from the writer so that the model tests keep a log exactly as the shard does.
#[derive(Clone, Copy, Debug, Default)]
pub struct PassRecorder {
    pending: Option<i64>,
}

impl PassRecorder {
    /// After a pass at `wall_ms`: the times of the pass records to append now (at most two: the
    /// one left pending, then this one), in order.
    pub fn after_pass(
        &mut self,
        wall_ms: i64,
        pass: crate::engine::Pass,
    ) -> impl Iterator<Item = i64> {
        let mut now = [None, None];
        if pass.ended {
            now = [self.pending.take(), Some(wall_ms)];
        } else if pass.changed {
            self.pending = Some(wall_ms);
        }
        now.into_iter().flatten()
    }

    /// Before an event's record: the time of a pass record to append first, if any.
    pub fn before_event(&mut self) -> Option<i64> {
        self.pending.take()
    }
}

/// How the writer buffers and syncs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogConfig {
    pub fsync: FsyncPolicy,
    pub fsync_interval: Duration,
    /// Capacity of the in-memory buffer of records not yet durable.
    pub buffer_bytes: usize,
}

impl LogConfig {
    pub fn from_persist(p: &Persist, buffer_bytes: usize) -> LogConfig {
        LogConfig {
            fsync: p.fsync,
            fsync_interval: p.fsync_interval.0,
            buffer_bytes,
        }
    }
}

#[derive(Debug)]
pub enum LogError {
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    /// The buffer cannot take the record before a commit makes room.
    BufferFull {
        needed: usize,
        free: usize,
    },
    /// A record longer than [`RAW_BYTES_MAX`] (or the whole buffer).
    TooLarge {
        len: usize,
    },
    Header {
        path: PathBuf,
        reason: &'static str,
    },
}

impl LogError {
    /// Static label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            LogError::Io { source, .. } if source.kind() == io::ErrorKind::StorageFull => {
                "disk_full"
            }
            LogError::Io { .. } => "io",
            LogError::BufferFull { .. } => "buffer_full",
            LogError::TooLarge { .. } => "too_large",
            LogError::Header { .. } => "header",
        }
    }

    fn io(path: &Path, op: &'static str, source: io::Error) -> LogError {
        LogError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}

impl fmt::Display for LogError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogError::Io { path, op, source } => write!(f, "{}: {op}: {source}", path.display()),
            LogError::BufferFull { needed, free } => write!(
                f,
                "log buffer full ({needed} bytes needed, {free} free); commit first"
            ),
            LogError::TooLarge { len } => write!(f, "a {len}-byte record does not fit the log"),
            LogError::Header { path, reason } => write!(f, "{}: {reason}", path.display()),
        }
    }
}

impl std::error::Error for LogError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            LogError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

pub fn file_name(shard: u32, generation: u64) -> String {
    format!("{PREFIX}{shard}-{generation}{SUFFIX}")
}

/// `(generation, path)` of this shard's log files, oldest first.
pub fn list_generations(dir: &Path, shard: u32) -> io::Result<Vec<(u64, PathBuf)>> {
    list_files(dir, PREFIX, SUFFIX, shard)
}

/// A log file's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogHeader {
    /// [`FORMAT_VERSION`] when written by this build; an older one when read.
    pub version: u32,
    pub shard: u32,
    pub generation: u64,
    /// Sequence number of the file's first record.
    pub first_seq: u64,
    pub created_wall_ms: i64,
}

impl LogHeader {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_BYTES as u32).to_le_bytes());
        b[16..20].copy_from_slice(&self.shard.to_le_bytes());
        // 20..24 reserved
        b[24..32].copy_from_slice(&self.generation.to_le_bytes());
        b[32..40].copy_from_slice(&self.first_seq.to_le_bytes());
        b[40..48].copy_from_slice(&self.created_wall_ms.to_le_bytes());
        // 48..60 reserved
        let crc = crc32fast::hash(&b[..HEADER_CRC_AT]);
        b[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<LogHeader, &'static str> {
        if b.len() < HEADER_BYTES {
            return Err("shorter than the log header");
        }
        if b[0..8] != MAGIC {
            return Err("bad log magic");
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if crc32fast::hash(&b[..HEADER_CRC_AT]) != u32_at(HEADER_CRC_AT) {
            return Err("log header checksum mismatch");
        }
        let version = u32_at(8);
        if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version)
            || u32_at(12) as usize != HEADER_BYTES
        {
            return Err("unsupported log format version");
        }
        if u64_at(32) > SEQ_MAX {
            return Err("log first sequence out of range");
        }
        Ok(LogHeader {
            version,
            shard: u32_at(16),
            generation: u64_at(24),
            first_seq: u64_at(32),
            created_wall_ms: u64_at(40) as i64,
        })
    }

    pub fn read(path: &Path) -> Result<LogHeader, LogError> {
        let file = super::open_regular(path).map_err(|e| LogError::io(path, "open", e))?;
        let mut b = [0u8; HEADER_BYTES];
        let n = read_full(&file, &mut b, 0).map_err(|e| LogError::io(path, "read", e))?;
        LogHeader::decode(&b[..n]).map_err(|reason| LogError::Header {
            path: path.to_path_buf(),
            reason,
        })
    }
}

fn frame_crc(len: u32, wall_ms: i64, raw: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(&wall_ms.to_le_bytes());
    h.update(raw);
    h.finalize()
}

/// Reads at `offset` until `buf` is full or the file ends; returns the bytes read.
fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Writer counters, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogStats {
    pub appended: u64,
    pub commits: u64,
    pub fsyncs: u64,
    pub write_errors: u64,
    pub fsync_errors: u64,
    pub bytes_written: u64,
    /// Time of the syncs counted in `fsyncs` (a background one from hand-over to result), in
    /// microseconds, and of the last one.
    pub sync_us_total: u64,
    pub sync_last_us: u64,
}

impl LogStats {
    fn synced(&mut self, started: Instant) {
        let us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.fsyncs += 1;
        self.sync_us_total += us;
        self.sync_last_us = us;
    }
}

/// What the helper thread syncs: the files written since the last completed sync (the previous
/// ones of a rotation first, then the current one) and, after a rotation, the directory.
struct SyncJob {
    files: Vec<File>,
    dir: Option<PathBuf>,
}

/// One sync handed to the helper: it covers records up to `seq`, the first `bytes` of the buffer.
struct InFlight {
    seq: u64,
    bytes: usize,
    started: Instant,
}

/// The helper thread: syncs jobs one at a time, answers each. Ends when the writer drops it.
struct Syncer {
    jobs: crossbeam_channel::Sender<SyncJob>,
    done: crossbeam_channel::Receiver<io::Result<()>>,
}

impl Syncer {
    fn start(shard: u32) -> io::Result<Syncer> {
        let (jobs, job_rx) = crossbeam_channel::bounded::<SyncJob>(1);
        let (done_tx, done) = crossbeam_channel::bounded(1);
        std::thread::Builder::new()
            .name(format!("log-sync-{shard}"))
            .spawn(move || {
                for job in job_rx {
                    let r = job
                        .files
                        .iter()
                        .try_for_each(File::sync_data)
                        .and_then(|()| job.dir.as_deref().map_or(Ok(()), fsync_dir));
                    if done_tx.send(r).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Syncer { jobs, done })
    }
}

/// The appending side of one shard's log (see the module doc).
pub struct LogWriter {
    dir: PathBuf,
    shard: u32,
    cfg: LogConfig,
    generation: u64,
    path: PathBuf,
    file: File,
    /// Length of the file as far as this writer has written it.
    file_len: u64,
    /// Framed records not yet durable: `buf[..buf_written]` is in the file already.
    buf: Vec<u8>,
    buf_written: usize,
    /// Sequence of the first record in `buf` (= durable + 1).
    buf_first_seq: u64,
    /// Sequence the next append gets.
    next_seq: u64,
    durable_seq: u64,
    last_sync: Instant,
    /// A fsync failed: the next commit starts a new file before writing.
    fresh_file_needed: bool,
    stats: LogStats,
    /// Background syncing (see the module doc): the helper, the sync it is doing, files rotated
    /// away from whose tail is not synced yet, whether the directory needs a sync, and a sync
    /// asked for regardless of the policy's interval.
    syncer: Option<Syncer>,
    in_flight: Option<InFlight>,
    unsynced_files: Vec<File>,
    dir_unsynced: bool,
    sync_requested: bool,
}

impl LogWriter {
    /// Start log generation `generation` for `shard` at sequence `first_seq` (1 for a new log).
    /// Fails if that file exists: a resumed writer uses [`LogWriter::resume`].
    pub fn create(
        dir: &Path,
        shard: u32,
        generation: u64,
        first_seq: u64,
        cfg: LogConfig,
    ) -> Result<LogWriter, LogError> {
        assert!(first_seq >= 1, "sequence numbers start at 1");
        let (path, file) = create_file(dir, shard, generation, first_seq)?;
        Ok(LogWriter {
            dir: dir.to_path_buf(),
            shard,
            cfg,
            generation,
            path,
            file,
            file_len: HEADER_BYTES as u64,
            buf: Vec::with_capacity(cfg.buffer_bytes),
            buf_written: 0,
            buf_first_seq: first_seq,
            next_seq: first_seq,
            durable_seq: first_seq - 1,
            last_sync: Instant::now(),
            fresh_file_needed: false,
            stats: LogStats::default(),
            syncer: None,
            in_flight: None,
            unsynced_files: Vec::new(),
            dir_unsynced: false,
            sync_requested: false,
        })
    }

    /// From now on, fdatasync on a helper thread (see the module doc); `commit` never waits
    /// for the disk, except [`LogWriter::commit_durable`], which still does.
    pub fn sync_in_background(&mut self) -> Result<(), LogError> {
        if self.syncer.is_none() {
            self.syncer = Some(
                Syncer::start(self.shard)
                    .map_err(|e| LogError::io(&self.dir, "start the log sync thread", e))?,
            );
        }
        Ok(())
    }

    /// Have the next commit start a sync whatever the policy's interval (background syncing;
    /// with inline syncing use [`LogWriter::commit_durable`]). Watch [`LogWriter::durable_seq`].
    pub fn request_sync(&mut self) {
        self.sync_requested = true;
    }

    /// Collect the background sync's result, if it is in (waiting for it with `block`).
    fn collect_sync(&mut self, block: bool) -> Result<(), LogError> {
        let (Some(job), Some(syncer)) = (self.in_flight.as_ref(), self.syncer.as_ref()) else {
            return Ok(());
        };
        let result = if block {
            syncer.done.recv().map_err(|_| ())
        } else {
            match syncer.done.try_recv() {
                Ok(r) => Ok(r),
                Err(crossbeam_channel::TryRecvError::Empty) => return Ok(()),
                Err(crossbeam_channel::TryRecvError::Disconnected) => Err(()),
            }
        };
        let (seq, bytes, started) = (job.seq, job.bytes, job.started);
        self.in_flight = None;
        let result =
            result.unwrap_or_else(|()| Err(io::Error::other("the log sync thread is gone")));
        match result {
            Ok(()) => {
                self.stats.synced(started);
                debug_assert!(bytes <= self.buf_written && seq < self.next_seq);
                self.durable_seq = seq;
                self.buf.drain(..bytes);
                self.buf_written -= bytes;
                self.buf_first_seq = seq + 1;
                self.last_sync = started;
                Ok(())
            }
            Err(e) => {
                // As for an inline fsync: rewrite every record not yet durable to a new file.
                self.stats.fsync_errors += 1;
                self.fresh_file_needed = true;
                Err(LogError::io(&self.path, "fdatasync (background)", e))
            }
        }
    }

    /// Hand the helper a sync of everything written so far.
    fn start_sync(&mut self, now: Instant) -> Result<(), LogError> {
        let Some(syncer) = self.syncer.as_ref() else {
            return Ok(());
        };
        debug_assert!(self.in_flight.is_none());
        let current = self
            .file
            .try_clone()
            .map_err(|e| LogError::io(&self.path, "dup for fdatasync", e))?;
        let mut files = std::mem::take(&mut self.unsynced_files);
        files.push(current);
        let dir = self.dir_unsynced.then(|| self.dir.clone());
        if syncer.jobs.send(SyncJob { files, dir }).is_err() {
            return Err(LogError::io(
                &self.path,
                "fdatasync (background)",
                io::Error::other("the log sync thread is gone"),
            ));
        }
        self.dir_unsynced = false;
        self.sync_requested = false;
        self.in_flight = Some(InFlight {
            seq: self.next_seq - 1,
            bytes: self.buf_written,
            started: now,
        });
        Ok(())
    }

    /// Continue the log after recovery in a new file (generation = newest existing + 1), so that
    /// nothing is ever appended after a damaged or truncated tail. `next_seq` is
    /// [`LogReader::next_seq`] of the recovery that just replayed the log.
    pub fn resume(
        dir: &Path,
        shard: u32,
        next_seq: u64,
        cfg: LogConfig,
    ) -> Result<LogWriter, LogError> {
        let gens = list_generations(dir, shard).map_err(|e| LogError::io(dir, "list", e))?;
        let generation = gens.last().map_or(1, |(g, _)| g + 1);
        LogWriter::create(dir, shard, generation, next_seq.max(1), cfg)
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sequence of the last record appended (0 if none ever was).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// Every record at or below this sequence is durable per the fsync policy.
    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// Bytes buffered and not yet durable.
    pub fn pending_bytes(&self) -> usize {
        self.buf.len()
    }

    pub fn stats(&self) -> &LogStats {
        &self.stats
    }

    /// Frame one record into the buffer; returns its sequence number. No I/O.
    pub fn append(&mut self, wall_ms: i64, raw: &[u8]) -> Result<u64, LogError> {
        let needed = FRAME_HEADER_BYTES + raw.len();
        if raw.len() > RAW_BYTES_MAX || needed > self.cfg.buffer_bytes {
            return Err(LogError::TooLarge { len: raw.len() });
        }
        let free = self.cfg.buffer_bytes - self.buf.len();
        if needed > free {
            return Err(LogError::BufferFull { needed, free });
        }
        let len = raw.len() as u32;
        self.buf.extend_from_slice(&len.to_le_bytes());
        self.buf
            .extend_from_slice(&frame_crc(len, wall_ms, raw).to_le_bytes());
        self.buf.extend_from_slice(&wall_ms.to_le_bytes());
        self.buf.extend_from_slice(raw);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.stats.appended += 1;
        Ok(seq)
    }

    /// Write what is buffered and sync per policy; returns the durable sequence.
    pub fn commit(&mut self) -> Result<u64, LogError> {
        self.commit_at(Instant::now())
    }

    /// [`LogWriter::commit`] with the caller's clock (tests, and a runtime that has `now` already).
    pub fn commit_at(&mut self, now: Instant) -> Result<u64, LogError> {
        if self.syncer.is_some() {
            return self.commit_background(now);
        }
        self.stats.commits += 1;
        if self.fresh_file_needed {
            self.start_generation(self.generation + 1, self.buf_first_seq)?;
            self.buf_written = 0;
            self.fresh_file_needed = false;
        }
        self.write_buffered()?;
        // Every buffered record is in the file now.
        let written_seq = self.next_seq - 1;
        let sync = match self.cfg.fsync {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval => {
                now.saturating_duration_since(self.last_sync) >= self.cfg.fsync_interval
                    || self.buf.len() * 2 >= self.cfg.buffer_bytes
            }
            FsyncPolicy::Never => false,
        };
        if sync && written_seq > self.durable_seq {
            let started = Instant::now();
            if let Err(e) = self.file.sync_data() {
                // The kernel may have dropped the failed pages and cleared the error: the bytes
                // in the file are not to be trusted. Keep the buffer; rewrite it to a new file.
                self.stats.fsync_errors += 1;
                self.fresh_file_needed = true;
                return Err(LogError::io(&self.path, "fdatasync", e));
            }
            self.stats.synced(started);
            self.last_sync = now;
        }
        if sync || self.cfg.fsync == FsyncPolicy::Never {
            self.durable_seq = written_seq;
            self.buf.clear();
            self.buf_written = 0;
            self.buf_first_seq = self.next_seq;
        }
        Ok(self.durable_seq)
    }

    /// A commit with the sync on the helper: collect a finished sync, write the buffer, start a
    /// sync if one is due and none is in flight. Never waits for the disk.
    fn commit_background(&mut self, now: Instant) -> Result<u64, LogError> {
        self.stats.commits += 1;
        self.collect_sync(false)?;
        if self.fresh_file_needed && self.in_flight.is_none() {
            // Every file written since the last good sync is suspect; the new one starts at the
            // first record not durable and gets everything again (synced before it counts).
            self.unsynced_files.clear();
            self.start_generation(self.generation + 1, self.buf_first_seq)?;
            self.buf_written = 0;
            self.fresh_file_needed = false;
        }
        self.write_buffered()?;
        let written_seq = self.next_seq - 1;
        if self.cfg.fsync == FsyncPolicy::Never {
            // Written is durable (against a process crash only); rotated files are never synced.
            self.unsynced_files.clear();
            self.dir_unsynced = false;
            self.durable_seq = written_seq;
            self.buf.clear();
            self.buf_written = 0;
            self.buf_first_seq = self.next_seq;
            return Ok(self.durable_seq);
        }
        let due = match self.cfg.fsync {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval => {
                now.saturating_duration_since(self.last_sync) >= self.cfg.fsync_interval
                    || self.buf.len() * 2 >= self.cfg.buffer_bytes
            }
            FsyncPolicy::Never => false,
        };
        if self.in_flight.is_none()
            && (due || self.sync_requested)
            && written_seq > self.durable_seq
        {
            self.start_sync(now)?;
        }
        Ok(self.durable_seq)
    }

    /// Write what is buffered and not written yet to the current file.
    fn write_buffered(&mut self) -> Result<(), LogError> {
        while self.buf_written < self.buf.len() {
            match self
                .file
                .write_at(&self.buf[self.buf_written..], self.file_len)
            {
                Ok(0) => {
                    self.stats.write_errors += 1;
                    return Err(LogError::io(
                        &self.path,
                        "write",
                        io::Error::new(io::ErrorKind::WriteZero, "no progress"),
                    ));
                }
                Ok(n) => {
                    self.buf_written += n;
                    self.file_len += n as u64;
                    self.stats.bytes_written += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.stats.write_errors += 1;
                    return Err(LogError::io(&self.path, "write", e));
                }
            }
        }
        Ok(())
    }

    /// Commit (durably, whatever the policy) and continue in a new file, `generation + 1`.
    /// With background syncing, nothing waits for the disk: everything buffered is written to
    /// the current file, the new file is created with its header, and the next sync covers the
    /// previous file's tail, the new file and the directory (a crash before it may leave the new
    /// file without a durable header: readers skip such a file, and no record in it counted as
    /// durable).
    pub fn rotate(&mut self) -> Result<u64, LogError> {
        if self.syncer.is_none() {
            self.commit_durable()?;
            self.start_generation(self.generation + 1, self.next_seq)?;
            return Ok(self.generation);
        }
        self.collect_sync(false)?;
        if self.fresh_file_needed {
            // A failed sync is handled by a commit first (it rewrites to a fresh file).
            self.commit_background(Instant::now())?;
        }
        self.write_buffered()?;
        let (path, file) =
            create_file_unsynced(&self.dir, self.shard, self.generation + 1, self.next_seq)?;
        let previous = std::mem::replace(&mut self.file, file);
        // Records up to here may be in the previous file only: it is synced with the next job.
        if self.buf_written > 0 || self.in_flight.is_some() {
            self.unsynced_files.push(previous);
        }
        self.generation += 1;
        self.path = path;
        self.file_len = HEADER_BYTES as u64;
        self.dir_unsynced = true;
        Ok(self.generation)
    }

    /// Call once snapshot `generation` of this shard is published: rotates to a new log file and
    /// deletes the files whose records are all covered by every snapshot still kept (a record is
    /// covered by a snapshot when its sequence is at most the snapshot's `log_seq`), so recovery
    /// from either kept generation still finds the log it needs. Returns the files deleted.
    pub fn truncate_after_snapshot(&mut self, generation: u64) -> Result<u32, LogError> {
        self.rotate()?;
        delete_covered(&self.dir, self.shard, generation, self.generation)
    }

    /// The directory this log lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Commit and fsync regardless of the policy's interval, on this thread (with background
    /// syncing: after waiting for the sync in flight).
    pub fn commit_durable(&mut self) -> Result<u64, LogError> {
        if self.syncer.is_some() {
            return self.commit_durable_background();
        }
        let policy = self.cfg.fsync;
        if policy == FsyncPolicy::Interval {
            self.cfg.fsync = FsyncPolicy::Always;
        }
        let r = self.commit();
        self.cfg.fsync = policy;
        r
    }

    /// [`LogWriter::commit_durable`] for a writer that syncs in the background: wait for the
    /// helper, then write and sync everything here, previous files and directory included.
    fn commit_durable_background(&mut self) -> Result<u64, LogError> {
        self.stats.commits += 1;
        self.collect_sync(true)?;
        if self.fresh_file_needed {
            self.unsynced_files.clear();
            self.start_generation(self.generation + 1, self.buf_first_seq)?;
            self.buf_written = 0;
            self.fresh_file_needed = false;
        }
        self.write_buffered()?;
        let written_seq = self.next_seq - 1;
        if written_seq > self.durable_seq || !self.unsynced_files.is_empty() || self.dir_unsynced {
            let started = Instant::now();
            let result = self
                .unsynced_files
                .iter()
                .chain(std::iter::once(&self.file))
                .try_for_each(File::sync_data)
                .and_then(|()| {
                    if self.dir_unsynced {
                        fsync_dir(&self.dir)
                    } else {
                        Ok(())
                    }
                });
            if let Err(e) = result {
                self.stats.fsync_errors += 1;
                self.fresh_file_needed = true;
                return Err(LogError::io(&self.path, "fdatasync", e));
            }
            self.stats.synced(started);
            self.last_sync = Instant::now();
            self.unsynced_files.clear();
            self.dir_unsynced = false;
        }
        self.durable_seq = written_seq;
        self.buf.clear();
        self.buf_written = 0;
        self.buf_first_seq = self.next_seq;
        Ok(self.durable_seq)
    }

    fn start_generation(&mut self, generation: u64, first_seq: u64) -> Result<(), LogError> {
        let (path, file) = create_file(&self.dir, self.shard, generation, first_seq)?;
        self.generation = generation;
        self.path = path;
        self.file = file;
        self.file_len = HEADER_BYTES as u64;
        Ok(())
    }
}

/// The deleting half of [`LogWriter::truncate_after_snapshot`], for a caller that rotated already
/// and wants the unlinks and the directory fsync off its thread: deletes `shard`'s log files
/// older than `current` (the generation being written, never touched) whose records are all
/// covered by every snapshot at or below `snapshot_generation` that is still kept. Only files
/// below `current` are read or removed, so the writer may go on appending meanwhile.
pub fn delete_covered(
    dir: &Path,
    shard: u32,
    snapshot_generation: u64,
    current: u64,
) -> Result<u32, LogError> {
    let snaps = super::snapshot_file::list_generations(dir, shard)
        .map_err(|e| LogError::io(dir, "list", e))?;
    let mut covered = u64::MAX;
    let mut any = false;
    for (g, path) in snaps.iter().filter(|(g, _)| *g <= snapshot_generation) {
        match read_snapshot_log_seq(path) {
            Some(seq) => {
                covered = covered.min(seq);
                any = true;
            }
            None => log::warn!(
                "snapshot {} (generation {g}) has an unreadable header; it does not cover any log",
                path.display()
            ),
        }
    }
    if !any {
        return Ok(0);
    }
    let logs = list_generations(dir, shard).map_err(|e| LogError::io(dir, "list", e))?;
    let mut deleted = 0;
    for pair in logs.windows(2) {
        let ((g, path), (_, next)) = (&pair[0], &pair[1]);
        if *g >= current {
            break;
        }
        // A file's records end where the next file starts.
        let Ok(next_header) = LogHeader::read(next) else {
            break;
        };
        if next_header.first_seq.saturating_sub(1) <= covered {
            super::pace::remove_file(path).map_err(|e| LogError::io(path, "remove", e))?;
            deleted += 1;
        } else {
            break;
        }
    }
    if deleted > 0 {
        fsync_dir(dir).map_err(|e| LogError::io(dir, "fsync directory", e))?;
    }
    Ok(deleted)
}

/// Creates a log file with its header, not synced (the caller syncs it, and the directory, before
/// any record in it counts as durable). Leaves no headerless file behind on an error.
fn create_file_unsynced(
    dir: &Path,
    shard: u32,
    generation: u64,
    first_seq: u64,
) -> Result<(PathBuf, File), LogError> {
    let path = dir.join(file_name(shard, generation));
    // A header past SEQ_MAX would be unreadable, and its records lost at the next recovery: the
    // log is exhausted (never in practice; only a crafted snapshot position gets here).
    if first_seq > SEQ_MAX {
        return Err(LogError::Header {
            path,
            reason: "log first sequence out of range",
        });
    }
    let file = OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .open(&path)
        .map_err(|e| LogError::io(&path, "create", e))?;
    let header = LogHeader {
        version: FORMAT_VERSION,
        shard,
        generation,
        first_seq,
        created_wall_ms: super::wall_ms_now(),
    };
    if let Err(e) = file.write_all_at(&header.encode(), 0) {
        let _ = fs::remove_file(&path);
        return Err(LogError::io(&path, "write header", e));
    }
    Ok((path, file))
}

/// Creates a log file with its header, fsynced, and fsyncs the directory.
fn create_file(
    dir: &Path,
    shard: u32,
    generation: u64,
    first_seq: u64,
) -> Result<(PathBuf, File), LogError> {
    let (path, file) = create_file_unsynced(dir, shard, generation, first_seq)?;
    if let Err(e) = file.sync_all().and_then(|()| fsync_dir(dir)) {
        // Leave no headerless file behind: a full disk must not poison the directory.
        let _ = fs::remove_file(&path);
        return Err(LogError::io(&path, "write header", e));
    }
    Ok((path, file))
}

fn read_snapshot_log_seq(path: &Path) -> Option<u64> {
    let file = super::open_regular(path).ok()?;
    let mut b = [0u8; super::snapshot_file::HEADER_BYTES];
    let n = read_full(&file, &mut b, 0).ok()?;
    super::snapshot_file::SnapshotHeader::decode(&b[..n])
        .ok()
        .map(|h| h.log_seq)
}

/// One record, borrowed from the reader's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogRecord<'a> {
    pub seq: u64,
    pub wall_ms: i64,
    pub raw: &'a [u8],
    /// The record's file logs the expiry passes (version 2 on): a replay runs passes at the
    /// [`PASS`] records and nowhere else.
    pub passes_logged: bool,
}

/// What a [`LogReader`] met.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LogReadReport {
    pub files: u32,
    /// Records returned.
    pub records: u64,
    /// Valid records at or below the starting sequence, skipped.
    pub skipped: u64,
    /// Duplicates of records already returned (a rewrite after a failed fsync).
    pub duplicates: u64,
    /// Torn tails truncated away, and their bytes.
    pub torn_tails: u32,
    pub torn_bytes: u64,
    /// Damage that stopped reading a file, as (file, byte offset of the damaged record).
    pub corrupt: Vec<(PathBuf, u64)>,
    /// Reading stopped before the end: the next file did not continue the sequence
    /// (expected, found), or a file could not be read.
    pub gap: Option<(u64, u64)>,
    /// Files whose header was unreadable.
    pub bad_headers: u32,
}

impl LogReadReport {
    /// True when something was lost or left unread.
    pub fn damaged(&self) -> bool {
        self.torn_tails > 0
            || !self.corrupt.is_empty()
            || self.gap.is_some()
            || self.bad_headers > 0
    }
}

/// The file a [`LogReader`] is in.
struct OpenLog {
    reader: BufReader<File>,
    path: PathBuf,
    len: u64,
    /// Offset of the next record.
    offset: u64,
    /// Sequence of the next record.
    seq: u64,
    /// The file's version logs the expiry passes.
    passes_logged: bool,
}

/// Iterates one shard's logged records with sequence > `after_seq` (see the module doc).
pub struct LogReader {
    files: Vec<(u64, PathBuf)>,
    /// Index into `files` of the open file.
    at: usize,
    file: Option<OpenLog>,
    after_seq: u64,
    /// Sequence the next returned record must have.
    expected: u64,
    buf: Vec<u8>,
    done: bool,
    report: LogReadReport,
}

impl LogReader {
    /// `after_seq` is 0 or a validated snapshot's log position, so at most [`SEQ_MAX`].
    pub fn open(dir: &Path, shard: u32, after_seq: u64) -> Result<LogReader, LogError> {
        assert!(
            after_seq <= SEQ_MAX,
            "log position {after_seq} out of range"
        );
        let files = list_generations(dir, shard).map_err(|e| LogError::io(dir, "list", e))?;
        Ok(LogReader {
            files,
            at: 0,
            file: None,
            after_seq,
            expected: 0,
            buf: Vec::with_capacity(1 << 16),
            done: false,
            report: LogReadReport::default(),
        })
    }

    pub fn report(&self) -> &LogReadReport {
        &self.report
    }

    /// The sequence a resumed writer continues at: one past the last record read, or past
    /// `after_seq` if none was.
    pub fn next_seq(&self) -> u64 {
        self.expected.max(self.after_seq + 1)
    }

    /// The next record, or `None` at the end of the log (or where damage stops it: see
    /// [`LogReader::report`]). Errs only on an I/O error other than damage.
    pub fn next_record(&mut self) -> Result<Option<LogRecord<'_>>, LogError> {
        loop {
            if self.done {
                return Ok(None);
            }
            if self.file.is_none() && !self.open_next()? {
                self.done = true;
                return Ok(None);
            }
            let passes_logged = self.file.as_ref().is_some_and(|f| f.passes_logged);
            match self.read_one()? {
                Some((seq, wall_ms)) => {
                    if seq <= self.after_seq {
                        self.report.skipped += 1;
                        continue;
                    }
                    if self.expected != 0 && seq < self.expected {
                        self.report.duplicates += 1;
                        continue;
                    }
                    self.expected = seq + 1;
                    self.report.records += 1;
                    return Ok(Some(LogRecord {
                        seq,
                        wall_ms,
                        raw: &self.buf,
                        passes_logged,
                    }));
                }
                None => {
                    self.file = None;
                    self.at += 1;
                }
            }
        }
    }

    /// Opens `files[at..]` in turn until one continues the sequence; false at the end.
    fn open_next(&mut self) -> Result<bool, LogError> {
        while self.at < self.files.len() {
            let path = self.files[self.at].1.clone();
            // Skip whole files that lie at or below `after_seq`: the next file starts within it.
            if let Some((_, next)) = self.files.get(self.at + 1) {
                if let Ok(h) = LogHeader::read(next) {
                    if h.first_seq <= self.after_seq + 1 && self.expected == 0 {
                        self.at += 1;
                        continue;
                    }
                }
            }
            let header = match LogHeader::read(&path) {
                Ok(h) => h,
                Err(e) => {
                    log::warn!("log file not read: {e}");
                    self.report.bad_headers += 1;
                    self.at += 1;
                    continue;
                }
            };
            let expected = if self.expected == 0 {
                self.after_seq + 1
            } else {
                self.expected
            };
            if header.first_seq > expected {
                log::warn!(
                    "log {} starts at record {} but record {expected} is missing; replay stops here",
                    path.display(),
                    header.first_seq
                );
                self.report.gap = Some((expected, header.first_seq));
                self.done = true;
                return Ok(false);
            }
            let file = super::open_regular(&path).map_err(|e| LogError::io(&path, "open", e))?;
            let len = file
                .metadata()
                .map_err(|e| LogError::io(&path, "stat", e))?
                .len();
            let mut reader = BufReader::with_capacity(1 << 20, file);
            io::copy(
                &mut (&mut reader).take(HEADER_BYTES as u64),
                &mut io::sink(),
            )
            .map_err(|e| LogError::io(&path, "read", e))?;
            self.report.files += 1;
            self.file = Some(OpenLog {
                reader,
                path,
                len,
                offset: HEADER_BYTES as u64,
                seq: header.first_seq,
                passes_logged: header.version >= PASSES_LOGGED_FROM,
            });
            return Ok(true);
        }
        Ok(false)
    }

    /// Reads the next record of the open file into `buf`: `Some((seq, wall_ms))`, or `None` at
    /// its end (clean, or damage handled per policy).
    fn read_one(&mut self) -> Result<Option<(u64, i64)>, LogError> {
        let newest = self.at + 1 == self.files.len();
        let Some(OpenLog {
            reader,
            path,
            len,
            offset,
            seq,
            ..
        }) = self.file.as_mut()
        else {
            return Ok(None);
        };
        let start = *offset;
        if start == *len {
            return Ok(None);
        }
        let rest = *len - start;
        let mut fh = [0u8; FRAME_HEADER_BYTES];
        let damage = 'frame: {
            if rest < FRAME_HEADER_BYTES as u64 {
                break 'frame Some(true);
            }
            reader
                .read_exact(&mut fh)
                .map_err(|e| LogError::io(path, "read", e))?;
            let raw_len = u32::from_le_bytes(fh[0..4].try_into().expect("4 bytes"));
            let crc = u32::from_le_bytes(fh[4..8].try_into().expect("4 bytes"));
            let wall_ms = i64::from_le_bytes(fh[8..16].try_into().expect("8 bytes"));
            if raw_len as usize > RAW_BYTES_MAX {
                break 'frame Some(false);
            }
            let end = start + FRAME_HEADER_BYTES as u64 + u64::from(raw_len);
            if end > *len {
                // Cut short by the end of the file.
                break 'frame Some(true);
            }
            self.buf.resize(raw_len as usize, 0);
            reader
                .read_exact(&mut self.buf)
                .map_err(|e| LogError::io(path, "read", e))?;
            if frame_crc(raw_len, wall_ms, &self.buf) != crc {
                break 'frame Some(end == *len);
            }
            *offset = end;
            let s = *seq;
            *seq += 1;
            return Ok(Some((s, wall_ms)));
        };
        let Some(mut torn) = damage else {
            return Ok(None);
        };
        let path = path.clone();
        let len = *len;
        if !torn {
            torn = zeros_to_end(&path, start, len).map_err(|e| LogError::io(&path, "read", e))?;
        }
        self.file = None;
        if torn && newest {
            log::warn!(
                "log {}: torn tail of {} bytes at offset {start} truncated (an interrupted write)",
                path.display(),
                len - start
            );
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|e| LogError::io(&path, "open for truncation", e))?;
            f.set_len(start)
                .and_then(|()| f.sync_all())
                .map_err(|e| LogError::io(&path, "truncate", e))?;
            self.report.torn_tails += 1;
            self.report.torn_bytes += len - start;
        } else {
            log::warn!("log {}: damaged record at offset {start} ({} bytes left unread); reading of this file stops there", path.display(), len - start);
            self.report.corrupt.push((path, start));
        }
        Ok(None)
    }
}

/// Whether every byte of `path` from `from` to `len` is zero (a tail the file system extended
/// but never wrote).
fn zeros_to_end(path: &Path, from: u64, len: u64) -> io::Result<bool> {
    let file = File::open(path)?;
    let mut buf = vec![0u8; 1 << 16];
    let mut at = from;
    while at < len {
        let n = read_full(&file, &mut buf[..((len - at) as usize).min(1 << 16)], at)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return Ok(false);
        }
        at += n as u64;
    }
    Ok(true)
}
