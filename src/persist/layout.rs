//! The shard count a persist directory was written with. A key's events and sessions live on
//! the shard `fnv1a32(key) % shards` picks, and each shard recovers its own snapshots and log:
//! with another count, keys would come back on the wrong shard, or not at all (their log
//! belongs to a shard that no longer runs). So a directory keeps its count in `SHARDS`, and
//! start-up refuses another one before any shard runs.

use std::io::Write;
use std::path::Path;

/// The file that records the count: its decimal value and a newline.
pub const FILE: &str = "SHARDS";

/// Check that `dir` was written by `shards` shards (or by none yet), and record the count. A
/// directory from before `SHARDS` existed is checked against its file names: a snapshot or log
/// of shard `s` means at least `s + 1` shards wrote it.
pub fn check_and_record(dir: &Path, shards: u32) -> Result<(), String> {
    if !check(dir, shards)? {
        record(dir, shards).map_err(|e| format!("writing {}: {e}", dir.join(FILE).display()))?;
    }
    Ok(())
}

/// [`check_and_record`] without the record: whether `SHARDS` holds the count already, or an
/// error when `dir` was written by another count.
pub fn check(dir: &Path, shards: u32) -> Result<bool, String> {
    let path = dir.join(FILE);
    let refuse = |written: String| {
        Err(format!(
            "{} was written by {written} shards and this configuration runs {shards}: a key's sessions and log records belong to the shard its hash picks among them, so they would be recovered on the wrong shard; start with the same `cores`, or move {} aside to start empty",
            dir.display(),
            dir.display()
        ))
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let Ok(written) = text.trim().parse::<u32>() else {
                return Err(format!(
                    "{} does not hold a shard count (`{}`); write the count the directory was written with, or move {} aside to start empty",
                    path.display(),
                    text.trim(),
                    dir.display()
                ));
            };
            if written != shards {
                return refuse(written.to_string());
            }
            return Ok(true);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    }
    if let Some(highest) = highest_shard(dir)? {
        if highest >= shards {
            return refuse(format!("at least {}", u64::from(highest) + 1));
        }
    }
    Ok(false)
}

/// The highest shard id among the snapshot and log files in `dir`.
fn highest_shard(dir: &Path) -> Result<Option<u32>, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("listing {}: {e}", dir.display()))?;
    let mut highest = None;
    for entry in entries {
        let entry = entry.map_err(|e| format!("listing {}: {e}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let shard = super::parse_name(
            name,
            super::snapshot_file::PREFIX,
            super::snapshot_file::SUFFIX,
        )
        .or_else(|| super::parse_name(name, super::log::PREFIX, super::log::SUFFIX))
        .map(|(s, _)| s);
        highest = highest.max(shard);
    }
    Ok(highest)
}

/// Write `SHARDS` durably: a temp file, fsync, rename, directory fsync.
fn record(dir: &Path, shards: u32) -> std::io::Result<()> {
    let tmp = dir.join(format!(".{FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    writeln!(f, "{shards}")?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(FILE))?;
    super::fsync_dir(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_is_recorded_and_another_refused() {
        let dir = tempfile::tempdir().unwrap();
        // `check` (what `check-config` asks) judges without writing.
        assert_eq!(check(dir.path(), 2), Ok(false));
        assert!(!dir.path().join(FILE).exists());
        check_and_record(dir.path(), 2).unwrap();
        assert_eq!(check(dir.path(), 2), Ok(true));
        assert!(check(dir.path(), 3).is_err());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(FILE)).unwrap(),
            "2\n"
        );
        check_and_record(dir.path(), 2).unwrap();
        for other in [1, 3] {
            let e = check_and_record(dir.path(), other).unwrap_err();
            assert!(
                e.contains("written by 2 shards") && e.contains(&format!("runs {other}")),
                "{e}"
            );
        }
        std::fs::write(dir.path().join(FILE), "two\n").unwrap();
        let e = check_and_record(dir.path(), 2).unwrap_err();
        assert!(e.contains("does not hold a shard count"), "{e}");
    }

    /// A directory written before `SHARDS` existed: its file names bound the count from below.
    #[test]
    fn older_directories_are_judged_by_their_file_names() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["log-0-1.szl", "snap-1-4.szs", "log-1-2.szl", "notes.txt"] {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        let e = check_and_record(dir.path(), 1).unwrap_err();
        assert!(e.contains("at least 2 shards"), "{e}");
        assert!(
            !dir.path().join(FILE).exists(),
            "nothing recorded on a refusal"
        );
        check_and_record(dir.path(), 2).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(FILE)).unwrap(),
            "2\n"
        );
    }
}
