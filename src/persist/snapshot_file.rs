//! Snapshot files: `snap-<shard>-<generation>.szs` in the persist directory, one per shard and
//! generation, laid out as a 128-byte header followed by the engine's rkyv body
//! (`docs/storage-format.md` documents every byte).
//!
//! Writing ([`SnapshotWriter`]) serialises a capture of the engine (`engine::capture`: a sliced
//! one the runtime takes between events, or a whole one from [`SnapshotWriter::begin`]) into an
//! in-memory buffer first, then writes the file in chunks the caller bounds: temp file
//! `.snap-<shard>-<generation>.szs.tmp`, writeback started per chunk with `sync_file_range`,
//! fsync, and only on [`SnapshotWriter::publish`] the rename, the directory fsync and the removal
//! of generations older than the previous one. [`write_file`] does the same in one blocking call,
//! streaming the body from a whole capture without the buffer.
//!
//! Loading ([`open_latest`]) maps the newest generation, validates the header, its checksum, the
//! body length and CRC-32 and the archive (rkyv `access` with bytecheck), and falls back to the
//! previous generation on any failure (with a warning), and to the one before that, until one
//! loads: a publish leaves two, but files under newer names that are not snapshots (a copy, a
//! damaged disk) must not hide the valid ones. The mapping stays open and
//! [`LoadedSnapshot::body`] reads the archive in place.
//!
//! Invariants: a file under its final name is complete and fsynced (the rename comes after the
//! fsync); at most two final generations exist per shard after a publish; the body starts at
//! offset 128, so it is 8-byte aligned in a page-aligned mapping.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::{Mmap, MmapOptions};
use rkyv::util::AlignedVec;

use super::{fsync_dir, list_files};
use crate::engine::snapshot::{ArchivedSnapshotBody, Captured, SnapshotMeta, SnapshotSummary};
use crate::engine::Engine;

pub const MAGIC: [u8; 8] = *b"SZSNAP01";
/// 2: a session payload's var area holds state values before metadata values (1: after), and
/// head flag bit 1 marks metadata fully captured. 3: the configuration text the rules were
/// compiled from follows the body (header bytes 104..112 give its length and CRC-32).
pub const FORMAT_VERSION: u32 = 3;
/// The oldest version read: a version 2 file is a version 3 file without the configuration.
const FORMAT_VERSION_MIN: u32 = 2;
/// The largest configuration section written or read. A larger configuration is left out of
/// the snapshot (with a warning): a restart that changes its profiles then cannot end the old
/// profiles' sessions with their data.
pub const CONFIG_BYTES_MAX: usize = 1 << 20;
pub const HEADER_BYTES: usize = 128;
/// Offset of the header checksum: CRC-32 of bytes `0..HEADER_CRC_AT`.
const HEADER_CRC_AT: usize = 124;
pub const PREFIX: &str = "snap-";
pub const SUFFIX: &str = ".szs";
/// The fixed header, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotHeader {
    pub version: u32,
    pub shard: u32,
    pub shards: u32,
    pub generation: u64,
    pub body_len: u64,
    pub body_crc32: u32,
    pub wall_ms: i64,
    /// Last log record applied before the capture: recovery replays the log after it.
    pub log_seq: u64,
    pub id_seq: u64,
    /// Smallest per-profile clock (`i64::MIN`: no profile has seen an event).
    pub min_clock_ms: i64,
    /// Smallest wheel cursor, seconds.
    pub wheel_cursor_s: i64,
    pub sessions: u64,
    pub sub_sessions: u64,
    /// Bytes of the configuration text after the body (0: none), and its CRC-32.
    pub config_len: u32,
    pub config_crc32: u32,
}

impl SnapshotHeader {
    fn new(meta: &SnapshotMeta, s: &SnapshotSummary, config: &[u8]) -> SnapshotHeader {
        SnapshotHeader {
            version: FORMAT_VERSION,
            shard: meta.shard,
            shards: meta.shards,
            generation: meta.generation,
            body_len: s.body_bytes,
            body_crc32: s.body_crc32,
            wall_ms: meta.wall_ms,
            log_seq: meta.log_seq,
            id_seq: s.id_seq,
            min_clock_ms: s.min_clock_ms,
            wheel_cursor_s: s.wheel_cursor_s,
            sessions: s.sessions,
            sub_sessions: s.sub_sessions,
            config_len: config.len() as u32,
            config_crc32: crc32fast::hash(config),
        }
    }

    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&(HEADER_BYTES as u32).to_le_bytes());
        b[16..20].copy_from_slice(&self.shard.to_le_bytes());
        b[20..24].copy_from_slice(&self.shards.to_le_bytes());
        b[24..32].copy_from_slice(&self.generation.to_le_bytes());
        b[32..40].copy_from_slice(&self.body_len.to_le_bytes());
        b[40..44].copy_from_slice(&self.body_crc32.to_le_bytes());
        // 44..48: flags, zero.
        b[48..56].copy_from_slice(&self.wall_ms.to_le_bytes());
        b[56..64].copy_from_slice(&self.log_seq.to_le_bytes());
        b[64..72].copy_from_slice(&self.id_seq.to_le_bytes());
        b[72..80].copy_from_slice(&self.min_clock_ms.to_le_bytes());
        b[80..88].copy_from_slice(&self.wheel_cursor_s.to_le_bytes());
        b[88..96].copy_from_slice(&self.sessions.to_le_bytes());
        b[96..104].copy_from_slice(&self.sub_sessions.to_le_bytes());
        b[104..108].copy_from_slice(&self.config_len.to_le_bytes());
        b[108..112].copy_from_slice(&self.config_crc32.to_le_bytes());
        // 112..124: reserved, zero.
        let crc = crc32fast::hash(&b[..HEADER_CRC_AT]);
        b[HEADER_CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<SnapshotHeader, &'static str> {
        if b.len() < HEADER_BYTES {
            return Err("shorter than the header");
        }
        if b[0..8] != MAGIC {
            return Err("bad magic");
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        if crc32fast::hash(&b[..HEADER_CRC_AT]) != u32_at(HEADER_CRC_AT) {
            return Err("header checksum mismatch");
        }
        let version = u32_at(8);
        if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&version) {
            return Err("unsupported format version");
        }
        let config_len = u32_at(104);
        if config_len as usize > CONFIG_BYTES_MAX {
            return Err("configuration section larger than a snapshot keeps");
        }
        if u32_at(12) as usize != HEADER_BYTES {
            return Err("unexpected header length");
        }
        // Recovery reads the log after this position and resumes it past the end: a value
        // beyond any real log would overflow those sequence numbers.
        if u64_at(56) > super::log::SEQ_MAX {
            return Err("log position out of range");
        }
        Ok(SnapshotHeader {
            version,
            shard: u32_at(16),
            shards: u32_at(20),
            generation: u64_at(24),
            body_len: u64_at(32),
            body_crc32: u32_at(40),
            wall_ms: u64_at(48) as i64,
            log_seq: u64_at(56),
            id_seq: u64_at(64),
            min_clock_ms: u64_at(72) as i64,
            wheel_cursor_s: u64_at(80) as i64,
            sessions: u64_at(88),
            sub_sessions: u64_at(96),
            // Reserved and zero in version 2.
            config_len,
            config_crc32: u32_at(108),
        })
    }
}

/// Why a snapshot file was not used, or could not be written.
#[derive(Debug)]
pub enum SnapshotError {
    Io {
        path: PathBuf,
        op: &'static str,
        source: io::Error,
    },
    Header {
        path: PathBuf,
        reason: &'static str,
    },
    Length {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    Checksum {
        path: PathBuf,
        expected: u32,
        found: u32,
    },
    Archive {
        path: PathBuf,
        message: String,
    },
    Mismatch {
        path: PathBuf,
        reason: String,
    },
}

impl SnapshotError {
    /// Static label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            SnapshotError::Io { .. } => "io",
            SnapshotError::Header { .. } => "header",
            SnapshotError::Length { .. } => "length",
            SnapshotError::Checksum { .. } => "checksum",
            SnapshotError::Archive { .. } => "archive",
            SnapshotError::Mismatch { .. } => "mismatch",
        }
    }

    fn io(path: &Path, op: &'static str, source: io::Error) -> SnapshotError {
        SnapshotError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    }
}

impl fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SnapshotError::Io { path, op, source } => {
                write!(f, "{}: {op}: {source}", path.display())
            }
            SnapshotError::Header { path, reason } => write!(f, "{}: {reason}", path.display()),
            SnapshotError::Length {
                path,
                expected,
                found,
            } => {
                write!(
                    f,
                    "{}: file is {found} bytes, header says {expected} (truncated or extended)",
                    path.display()
                )
            }
            SnapshotError::Checksum {
                path,
                expected,
                found,
            } => {
                write!(
                    f,
                    "{}: body CRC-32 is {found:08x}, header says {expected:08x}",
                    path.display()
                )
            }
            SnapshotError::Archive { path, message } => {
                write!(f, "{}: invalid archive: {message}", path.display())
            }
            SnapshotError::Mismatch { path, reason } => write!(f, "{}: {reason}", path.display()),
        }
    }
}

impl std::error::Error for SnapshotError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SnapshotError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

pub fn file_name(shard: u32, generation: u64) -> String {
    format!("{PREFIX}{shard}-{generation}{SUFFIX}")
}

fn temp_name(shard: u32, generation: u64) -> String {
    format!(".{PREFIX}{shard}-{generation}{SUFFIX}.tmp")
}

/// `(generation, path)` of this shard's snapshot files, oldest first.
pub fn list_generations(dir: &Path, shard: u32) -> io::Result<Vec<(u64, PathBuf)>> {
    list_files(dir, PREFIX, SUFFIX, shard)
}

/// Bodies at least this large are checksummed by two threads, half each.
const PARALLEL_CHECK_BYTES: usize = 8 << 20;

/// The body's CRC-32 and its validated archive. In the release build validation costs next to
/// nothing (the per-element checks of plain records compile away), so the CRC is recovery's
/// pass over the whole body: a large body's second half is checksummed on a helper thread while
/// this one does the first half and the validation, and the halves are combined. The caller
/// compares the CRC before it uses the archive; validation is safe on any bytes.
fn check_body(body: &[u8]) -> (u32, Result<&ArchivedSnapshotBody, String>) {
    if body.len() >= PARALLEL_CHECK_BYTES {
        let (first, second) = body.split_at(body.len() / 2);
        let pair = std::thread::scope(|s| {
            let tail = std::thread::Builder::new()
                .name("snapshot-crc".into())
                .spawn_scoped(s, || {
                    let mut h = crc32fast::Hasher::new();
                    h.update(second);
                    h
                })
                .ok()?;
            let mut crc = crc32fast::Hasher::new();
            crc.update(first);
            let archived = access_body(body);
            crc.combine(&tail.join().ok()?);
            Some((crc.finalize(), archived))
        });
        if let Some(pair) = pair {
            return pair;
        }
    }
    (crc32fast::hash(body), access_body(body))
}

/// Validate an in-memory body (8-byte aligned) and view it in place.
pub fn access_body(bytes: &[u8]) -> Result<&ArchivedSnapshotBody, String> {
    rkyv::access::<ArchivedSnapshotBody, rkyv::rancor::BoxedError>(bytes).map_err(|e| e.to_string())
}

enum Stage {
    Writing,
    Syncing,
    Durable,
}

/// A snapshot being written in caller-sized chunks (see the module doc). Dropping it before
/// `publish` leaves a temp file that the next publish of this shard removes.
pub struct SnapshotWriter {
    dir: PathBuf,
    shard: u32,
    generation: u64,
    tmp: PathBuf,
    path: PathBuf,
    file: File,
    header: [u8; HEADER_BYTES],
    body: AlignedVec,
    /// The configuration section, after the body.
    config: Arc<str>,
    /// Bytes of header + body written so far.
    written: u64,
    stage: Stage,
    summary: SnapshotSummary,
}

impl SnapshotWriter {
    /// Capture the engine (the only step that reads it) and create the temp file.
    pub fn begin(
        dir: &Path,
        engine: &Engine,
        meta: SnapshotMeta,
    ) -> Result<SnapshotWriter, SnapshotError> {
        SnapshotWriter::begin_with_buffer(dir, engine, meta, AlignedVec::new())
    }

    /// [`SnapshotWriter::begin`] capturing into `buffer` (cleared first), e.g. the one a previous
    /// [`SnapshotWriter::publish`] returned: a warm buffer spares the page faults of a fresh one
    /// (about a third of the capture time).
    pub fn begin_with_buffer(
        dir: &Path,
        engine: &Engine,
        meta: SnapshotMeta,
        buffer: AlignedVec,
    ) -> Result<SnapshotWriter, SnapshotError> {
        let captured = engine.capture_all();
        SnapshotWriter::from_capture(dir, &captured, meta, buffer)
    }

    /// [`SnapshotWriter::begin_with_buffer`] from a finished capture (e.g. a sliced one,
    /// `engine::capture`): serialises it into `buffer` and creates the temp file. It does not
    /// need the engine, so it can run off the shard's executor.
    pub fn from_capture(
        dir: &Path,
        captured: &Captured,
        meta: SnapshotMeta,
        buffer: AlignedVec,
    ) -> Result<SnapshotWriter, SnapshotError> {
        let tmp = dir.join(temp_name(meta.shard, meta.generation));
        let mut body = buffer;
        body.clear();
        body.reserve(captured.body_bytes_hint());
        // Paced: this runs on the blocking thread that shares the shard's CPU (`pace`).
        let summary = captured
            .write_body_paced(
                super::pace::Paced::new(&mut body),
                meta,
                &mut super::pace::yield_cpu,
            )
            .map_err(|e| SnapshotError::io(&tmp, "capture", e))?;
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(|e| SnapshotError::io(&tmp, "create", e))?;
        let config = config_section(captured.config());
        Ok(SnapshotWriter {
            dir: dir.to_path_buf(),
            shard: meta.shard,
            generation: meta.generation,
            path: dir.join(file_name(meta.shard, meta.generation)),
            tmp,
            file,
            header: SnapshotHeader::new(&meta, &summary, config.as_bytes()).encode(),
            body,
            config,
            written: 0,
            stage: Stage::Writing,
            summary,
        })
    }

    pub fn summary(&self) -> &SnapshotSummary {
        &self.summary
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Total bytes of the file.
    pub fn file_bytes(&self) -> u64 {
        (HEADER_BYTES + self.body.len() + self.config.len()) as u64
    }

    /// Bytes of the file written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Write up to `budget_bytes` more (at least one byte); once everything is written, one
    /// further call fsyncs the file. `Ok(true)` once the temp file is durable: then [`publish`].
    /// After an error (e.g. a full disk) the call can be retried: it resumes where it stopped.
    ///
    /// [`publish`]: SnapshotWriter::publish
    pub fn write_chunk(&mut self, budget_bytes: usize) -> io::Result<bool> {
        match self.stage {
            Stage::Writing => {
                let total = self.file_bytes();
                let mut budget = budget_bytes.max(1) as u64;
                let start = self.written;
                while budget > 0 && self.written < total {
                    let at = self.written as usize;
                    let body_end = HEADER_BYTES + self.body.len();
                    let (src, src_at) = if at < HEADER_BYTES {
                        (&self.header[..], at)
                    } else if at < body_end {
                        (&self.body[..], at - HEADER_BYTES)
                    } else {
                        (self.config.as_bytes(), at - body_end)
                    };
                    let n = ((src.len() - src_at) as u64).min(budget) as usize;
                    let done = self.file.write_at(&src[src_at..src_at + n], self.written)?;
                    if done == 0 {
                        return Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "snapshot write made no progress",
                        ));
                    }
                    self.written += done as u64;
                    budget -= done as u64;
                }
                // Start writeback of what this chunk wrote, so the final fsync has little left.
                start_writeback(&self.file, start, self.written - start);
                if self.written == total {
                    self.stage = Stage::Syncing;
                }
                Ok(false)
            }
            Stage::Syncing => {
                self.file.sync_all()?;
                self.stage = Stage::Durable;
                Ok(true)
            }
            Stage::Durable => Ok(true),
        }
    }

    /// Rename the durable temp file to its final name, fsync the directory, and delete this
    /// shard's generations older than the previous one (and stale temp files). Call it once every
    /// output produced before the capture is acknowledged (`docs/storage-format.md`, "Ack protocol").
    /// Returns the final path and the capture buffer (emptied), for the next
    /// [`SnapshotWriter::begin_with_buffer`].
    pub fn publish(self) -> Result<(PathBuf, AlignedVec), SnapshotError> {
        if !matches!(self.stage, Stage::Durable) {
            return Err(SnapshotError::Mismatch {
                path: self.tmp,
                reason: "publish before write_chunk reported the file durable".into(),
            });
        }
        drop(self.file);
        fs::rename(&self.tmp, &self.path).map_err(|e| SnapshotError::io(&self.tmp, "rename", e))?;
        fsync_dir(&self.dir).map_err(|e| SnapshotError::io(&self.dir, "fsync directory", e))?;
        prune(&self.dir, self.shard, self.generation);
        let mut buffer = self.body;
        buffer.clear();
        Ok((self.path, buffer))
    }

    /// Give up: remove the temp file.
    pub fn abort(self) {
        drop(self.file);
        if let Err(e) = fs::remove_file(&self.tmp) {
            log::warn!("cannot remove {}: {e}", self.tmp.display());
        }
    }
}

fn start_writeback(file: &File, offset: u64, len: u64) {
    if len == 0 {
        return;
    }
    // SAFETY: sync_file_range only reads the descriptor, which `file` keeps open for the call;
    // it is advisory here (errors surface at the fsync that follows).
    let _ = unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    };
}

/// Keep this shard's two newest generations (the one just published and the previous one);
/// delete older ones and temp files of generations at or below the newest. Failures are logged:
/// an extra file costs disk space, not correctness.
fn prune(dir: &Path, shard: u32, newest: u64) {
    match list_generations(dir, shard) {
        Ok(gens) => {
            let keep_from = gens
                .iter()
                .rev()
                .map(|(g, _)| *g)
                .filter(|&g| g <= newest)
                .nth(1)
                .unwrap_or(newest);
            for (g, path) in gens {
                if g < keep_from {
                    if let Err(e) = super::pace::remove_file(&path) {
                        log::warn!("cannot remove old snapshot {}: {e}", path.display());
                    }
                }
            }
        }
        Err(e) => log::warn!("cannot list {} to prune snapshots: {e}", dir.display()),
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let stale = name
                .strip_prefix('.')
                .and_then(|n| n.strip_suffix(".tmp"))
                .and_then(|n| super::parse_name(n, PREFIX, SUFFIX))
                .is_some_and(|(s, g)| s == shard && g <= newest);
            if stale {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// Write snapshot `meta.generation` of `engine` to `dir` in one blocking call, streaming the
/// body from the engine (no capture buffer): temp file, header, body, fsync, rename, directory
/// fsync, prune. For shutdown, tools and tests; a running shard uses [`SnapshotWriter`].
pub fn write_file(
    dir: &Path,
    engine: &Engine,
    meta: SnapshotMeta,
) -> Result<(PathBuf, SnapshotSummary), SnapshotError> {
    let tmp = dir.join(temp_name(meta.shard, meta.generation));
    let path = dir.join(file_name(meta.shard, meta.generation));
    let tmp_ref = &tmp;
    let io = |op| move |e| SnapshotError::io(tmp_ref, op, e);
    let write = || -> Result<SnapshotSummary, SnapshotError> {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(io("create"))?;
        file.seek(SeekFrom::Start(HEADER_BYTES as u64))
            .map_err(io("seek"))?;
        let mut w = BufWriter::with_capacity(1 << 20, &mut file);
        let summary = engine.write_snapshot(&mut w, meta).map_err(io("write"))?;
        w.flush().map_err(io("write"))?;
        drop(w);
        let config = config_section(&engine.rules().source);
        file.write_all_at(config.as_bytes(), HEADER_BYTES as u64 + summary.body_bytes)
            .map_err(io("write configuration"))?;
        let header = SnapshotHeader::new(&meta, &summary, config.as_bytes()).encode();
        file.write_all_at(&header, 0).map_err(io("write header"))?;
        file.sync_all().map_err(io("fsync"))?;
        Ok(summary)
    };
    let summary = match write() {
        Ok(s) => s,
        Err(e) => {
            // A partial temp file only takes space (a full disk is the likely cause).
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    fs::rename(&tmp, &path).map_err(io("rename"))?;
    fsync_dir(dir).map_err(|e| SnapshotError::io(dir, "fsync directory", e))?;
    prune(dir, meta.shard, meta.generation);
    Ok((path, summary))
}

/// The configuration section for `text` (shared, not copied): empty when it is larger than
/// [`CONFIG_BYTES_MAX`].
fn config_section(text: &Arc<str>) -> Arc<str> {
    if text.len() > CONFIG_BYTES_MAX {
        log::warn!(
            "the configuration ({} bytes) is larger than a snapshot keeps ({CONFIG_BYTES_MAX}); \
             a restart that changes its profiles will not end their open sessions with their data",
            text.len()
        );
        return Arc::from("");
    }
    text.clone()
}

/// A validated snapshot file, mapped read-only.
pub struct LoadedSnapshot {
    path: PathBuf,
    header: SnapshotHeader,
    map: Mmap,
}

impl fmt::Debug for LoadedSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedSnapshot")
            .field("path", &self.path)
            .field("header", &self.header)
            .finish()
    }
}

impl LoadedSnapshot {
    /// Map and fully validate one file: header and its checksum, length, body CRC-32, archive.
    pub fn open(path: &Path) -> Result<LoadedSnapshot, SnapshotError> {
        let file = super::open_regular(path).map_err(|e| SnapshotError::io(path, "open", e))?;
        let len = file
            .metadata()
            .map_err(|e| SnapshotError::io(path, "stat", e))?
            .len();
        if len < HEADER_BYTES as u64 {
            return Err(SnapshotError::Header {
                path: path.to_path_buf(),
                reason: "shorter than the header",
            });
        }
        // SAFETY: the mapping is read-only and private to this process; snapshot files are
        // written under a temp name and renamed complete, and nothing rewrites a published file,
        // so its bytes do not change under the mapping. (A foreign process truncating it would
        // fault, as for any mapped file; the persist directory is ours alone.)
        let map = unsafe { MmapOptions::new().populate().map(&file) }
            .map_err(|e| SnapshotError::io(path, "mmap", e))?;
        let header = SnapshotHeader::decode(&map).map_err(|reason| SnapshotError::Header {
            path: path.to_path_buf(),
            reason,
        })?;
        let expected = (HEADER_BYTES as u64)
            .saturating_add(header.body_len)
            .saturating_add(u64::from(header.config_len));
        if expected != len {
            return Err(SnapshotError::Length {
                path: path.to_path_buf(),
                expected,
                found: len,
            });
        }
        let body_end = HEADER_BYTES + header.body_len as usize;
        let config = &map[body_end..];
        if crc32fast::hash(config) != header.config_crc32 || std::str::from_utf8(config).is_err() {
            return Err(SnapshotError::Mismatch {
                path: path.to_path_buf(),
                reason: "the configuration section does not match its checksum or is not UTF-8"
                    .into(),
            });
        }
        let body = &map[HEADER_BYTES..body_end];
        let (crc, archived) = check_body(body);
        if crc != header.body_crc32 {
            return Err(SnapshotError::Checksum {
                path: path.to_path_buf(),
                expected: header.body_crc32,
                found: crc,
            });
        }
        let archived = archived.map_err(|message| SnapshotError::Archive {
            path: path.to_path_buf(),
            message,
        })?;
        let same = archived.shard.to_native() == header.shard
            && archived.shards.to_native() == header.shards
            && archived.generation.to_native() == header.generation
            && archived.log_seq.to_native() == header.log_seq;
        if !same {
            return Err(SnapshotError::Mismatch {
                path: path.to_path_buf(),
                reason: "header and body disagree on shard, generation or log position".into(),
            });
        }
        Ok(LoadedSnapshot {
            path: path.to_path_buf(),
            header,
            map,
        })
    }

    pub fn header(&self) -> &SnapshotHeader {
        &self.header
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The archive, in place.
    pub fn body(&self) -> &ArchivedSnapshotBody {
        // SAFETY: `open` validated exactly these bytes with `rkyv::access` (bytecheck), and the
        // read-only mapping they live in is owned by `self` and never written.
        unsafe { rkyv::access_unchecked::<ArchivedSnapshotBody>(&self.map[self.body_range()]) }
    }

    fn body_range(&self) -> std::ops::Range<usize> {
        HEADER_BYTES..HEADER_BYTES + self.header.body_len as usize
    }

    /// The configuration text the snapshot's rules were compiled from; `None` in a version 2
    /// file, or when the configuration was too large to keep.
    pub fn config(&self) -> Option<&str> {
        let config = &self.map[self.body_range().end..];
        // `open` checked it is UTF-8.
        std::str::from_utf8(config).ok().filter(|c| !c.is_empty())
    }
}

/// What [`open_latest_with_report`] found.
#[derive(Debug, Default)]
pub struct LatestReport {
    pub snapshot: Option<LoadedSnapshot>,
    /// Newer generations that failed validation, newest first.
    pub rejected: Vec<SnapshotError>,
}

/// The newest valid snapshot of `shard` in `dir`, trying older generations in turn when the newest
/// fails validation; `None` when there is none (or none is valid: see the warnings, or use
/// [`open_latest_with_report`]). Errs only when the directory cannot be listed.
pub fn open_latest(dir: &Path, shard: u32) -> Result<Option<LoadedSnapshot>, SnapshotError> {
    Ok(open_latest_with_report(dir, shard)?.snapshot)
}

pub fn open_latest_with_report(dir: &Path, shard: u32) -> Result<LatestReport, SnapshotError> {
    let gens = list_generations(dir, shard).map_err(|e| SnapshotError::io(dir, "list", e))?;
    let mut report = LatestReport::default();
    for (_, path) in gens.iter().rev() {
        match LoadedSnapshot::open(path) {
            Ok(s) if s.header.shard == shard => {
                report.snapshot = Some(s);
                break;
            }
            Ok(s) => {
                let e = SnapshotError::Mismatch {
                    path: path.clone(),
                    reason: format!(
                        "file name says shard {shard}, header says {}",
                        s.header.shard
                    ),
                };
                log::warn!("snapshot not used: {e}");
                report.rejected.push(e);
            }
            Err(e) => {
                log::warn!("snapshot not used: {e}; trying the previous generation");
                report.rejected.push(e);
            }
        }
    }
    Ok(report)
}
