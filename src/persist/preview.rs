//! What a start on a configuration would do with the durable state in its persist directory,
//! found without changing anything there: `check-config` prints it, so that an operator learns
//! before a restart, not from its log after, that a changed profile's open sessions will not come
//! back or that the table no longer holds them all. It reads what recovery reads (the shard
//! count, each shard's newest valid snapshot) and judges the snapshot's profiles by the rule
//! restore applies (name and fingerprint); it does not restore anything, so it stays cheap.

use std::path::Path;

use crate::config::Config;
use crate::engine::restore::profile_map;
use crate::engine::rules::Rules;
use crate::engine::snapshot::{RestoreReport, RECORD_FLAG_SUB};

use super::{layout, snapshot_file};

/// One shard's newest snapshot, as a start on the configuration would take it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ShardPreview {
    pub shard: u32,
    /// The snapshot's generation, or None when the shard has none that loads (its log alone is
    /// replayed).
    pub generation: Option<u64>,
    /// Newer snapshot files that do not load (recovery skips them with a warning).
    pub rejected: usize,
    pub sessions: u64,
    pub sub_sessions: u64,
    /// Profiles of the snapshot whose records will not be restored (changed or removed), with
    /// their records (sessions and sub-sessions).
    pub dropped: Vec<(String, u64)>,
    /// Records beyond `memory.max_sessions`: restored up to the limit, the rest ended as evicted.
    pub over_capacity: u64,
}

/// The preview of every shard, or None when the configuration keeps no state or its directory
/// does not exist yet. Errs when a start would be refused (another shard count) or the directory
/// cannot be read.
pub fn preview(cfg: &Config, rules: &Rules) -> Result<Option<Vec<ShardPreview>>, String> {
    let Some(dir) = cfg.persist.dir.as_deref() else {
        return Ok(None);
    };
    let dir = Path::new(dir);
    if !dir.is_dir() {
        return Ok(None);
    }
    let shards = cfg.core_list().len() as u32;
    layout::check(dir, shards)?;
    (0..shards)
        .map(|shard| shard_preview(dir, shard, cfg.memory.max_sessions, rules))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn shard_preview(
    dir: &Path,
    shard: u32,
    max_sessions: u32,
    rules: &Rules,
) -> Result<ShardPreview, String> {
    let latest = snapshot_file::open_latest_with_report(dir, shard).map_err(|e| e.to_string())?;
    let mut p = ShardPreview {
        shard,
        rejected: latest.rejected.len(),
        ..ShardPreview::default()
    };
    let Some(snap) = latest.snapshot else {
        return Ok(p);
    };
    p.generation = Some(snap.header().generation);
    let body = snap.body();
    let mut report = RestoreReport::default();
    let map = profile_map(rules, body, &mut report);
    // A sub-session kind (`parent/sub`) is reported under its parent, whose change drops it too.
    let top_name = |name: &str| name.split('/').next().unwrap_or(name).to_string();
    for name in &report.changed_profiles {
        let top = top_name(name);
        if !p.dropped.iter().any(|(n, _)| *n == top) {
            p.dropped.push((top, 0));
        }
    }
    let mut kept = 0u64;
    for r in body.records.iter() {
        if r.flags & RECORD_FLAG_SUB != 0 {
            p.sub_sessions += 1;
        } else {
            p.sessions += 1;
        }
        let old = r.profile as usize;
        match map.get(old) {
            Some(Some(_)) => kept += 1,
            Some(None) => {
                let top = top_name(body.profiles[old].name.as_str());
                if let Some((_, n)) = p.dropped.iter_mut().find(|(n, _)| *n == top) {
                    *n += 1;
                }
            }
            None => {}
        }
    }
    p.over_capacity = kept.saturating_sub(u64::from(max_sessions));
    Ok(p)
}

/// The lines `check-config` prints for `previews` of the state in `dir`: one per shard, and a
/// `warning:` line for what will not come back as it was.
pub fn describe(dir: &str, previews: &[ShardPreview], max_sessions: u32) -> Vec<String> {
    let mut lines = Vec::new();
    for p in previews {
        let s = p.shard;
        match p.generation {
            Some(g) => lines.push(format!(
                "state: {dir}: shard {s}: snapshot generation {g}: {} sessions, {} sub-sessions; the log after it is replayed at start",
                p.sessions, p.sub_sessions
            )),
            None => lines.push(format!(
                "state: {dir}: shard {s}: no snapshot; its log, if any, is replayed at start"
            )),
        }
        if p.rejected > 0 {
            lines.push(format!(
                "warning: shard {s}: {} newer snapshot file(s) do not load and will be skipped (the start-up log names why)",
                p.rejected
            ));
        }
        for (name, records) in p.dropped.iter().filter(|(_, n)| *n > 0) {
            lines.push(format!(
                "warning: shard {s}: profile \"{name}\" changed its session data (key, time mode, captured fields, counters, aggregates, lists or sub-sessions) or was removed: its {records} open sessions and sub-sessions in the snapshot will not be restored and end without a marker; to keep them, retire the profile instead (docs/operations.md, \"Changing a profile's session data\")"
            ));
        }
        if p.over_capacity > 0 {
            lines.push(format!(
                "warning: shard {s}: the snapshot holds {} more sessions and sub-sessions than memory.max_sessions = {max_sessions}: they will end as evicted at start",
                p.over_capacity
            ));
        }
    }
    lines
}
