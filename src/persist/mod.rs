//! Durability: snapshot files, the event log, and the `inspect-snapshot` printer.
//!
//! The engine knows how to export and import its state (`engine::snapshot`); this module owns
//! the files: their byte formats (`docs/storage-format.md`), the write protocol (temp file, fsync,
//! rename, directory fsync, two generations kept), validation on load with fallback to the
//! previous generation, and the append-only log of accepted events with group commit. Nothing
//! here panics on an I/O error: every failure is a typed value the runtime counts and retries.

pub mod bench;
pub mod inspect;
pub mod layout;
pub mod log;
pub mod pace;
pub mod preview;
pub mod producer;
pub mod snapshot_file;

pub use crate::engine::snapshot::{
    ArchivedSnapshotBody, RestoreReport, SnapshotMeta, SnapshotSummary,
};
pub use log::{LogConfig, LogError, LogReadReport, LogReader, LogRecord, LogWriter};
pub use snapshot_file::{
    open_latest, LoadedSnapshot, SnapshotError, SnapshotHeader, SnapshotWriter,
};

use std::fs::File;
use std::io;
use std::path::Path;

/// fsync a directory, so a rename or an unlink in it is durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Open `path` for reading, refusing anything but a regular file: a FIFO under a snapshot or
/// log name would block the open, and with it recovery, until something wrote to it.
pub(crate) fn open_regular(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // O_NONBLOCK keeps a FIFO's open from waiting for a writer; it changes nothing for a
    // regular file.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    if !f.metadata()?.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file",
        ));
    }
    Ok(f)
}

/// Milliseconds since the epoch by the system clock (only for header fields; the engine gets its
/// time from the runtime).
pub fn wall_ms_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The highest file generation this program writes or reads. Generations count up by one per
/// file from 1, so no run reaches it; a file named with a larger one is not ours, and taking it
/// would make the next generation wrap around to names already in use.
pub const GENERATION_MAX: u64 = 1 << 62;

/// Parses `<prefix><shard>-<generation><suffix>`, e.g. `snap-3-17.szs` (a generation above
/// [`GENERATION_MAX`] does not parse).
pub(crate) fn parse_name(name: &str, prefix: &str, suffix: &str) -> Option<(u32, u64)> {
    let rest = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    let (shard, generation) = rest.split_once('-')?;
    let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(shard) || !all_digits(generation) {
        return None;
    }
    let generation = generation.parse().ok().filter(|&g| g <= GENERATION_MAX)?;
    Some((shard.parse().ok()?, generation))
}

/// `(generation, path)` of every `<prefix><shard>-<generation><suffix>` file in `dir`, ascending.
pub(crate) fn list_files(
    dir: &Path,
    prefix: &str,
    suffix: &str,
    shard: u32,
) -> io::Result<Vec<(u64, std::path::PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some((s, g)) = parse_name(name, prefix, suffix) {
            if s == shard {
                out.push((g, entry.path()));
            }
        }
    }
    out.sort_unstable_by_key(|(g, _)| *g);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_parse_with_their_shard_and_a_generation_in_range() {
        assert_eq!(parse_name("log-3-17.szl", "log-", ".szl"), Some((3, 17)));
        assert_eq!(
            parse_name(&format!("snap-0-{GENERATION_MAX}.szs"), "snap-", ".szs"),
            Some((0, GENERATION_MAX))
        );
        for foreign in [
            "log-0-18446744073709551615.szl",
            "log-0-4611686018427387905.szl",
            "log-0-99999999999999999999.szl",
            "log--1.szl",
            "log-0-.szl",
            "log-0-1.szl.tmp",
            "log-a-1.szl",
        ] {
            assert_eq!(parse_name(foreign, "log-", ".szl"), None, "{foreign}");
        }
    }
}
