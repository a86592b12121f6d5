//! What a start on a configuration would do with the durable state in its persist directory,
//! found without changing anything there: `check-config` prints it, so that an operator learns
//! before a restart, not from its log after, that a changed profile's open sessions will end at
//! the start (or, with no configuration in the snapshot to render them, vanish) or that the table
//! no longer holds them all. It reads what recovery reads (the shard
//! count, each shard's newest valid snapshot) and judges the snapshot's profiles by the rule
//! restore applies (name and fingerprint). It restores nothing: it costs what opening the
//! snapshots costs (their checksums) and one pass over their records.

use std::path::Path;

use crate::config::{Config, Memory};
use crate::engine::restore::{profile_map, retirable};
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
    /// Profiles of the snapshot whose records will not be restored (changed or removed) and
    /// that the configuration the snapshot kept describes: their records (sessions and
    /// sub-sessions) end at start, as evicted, with their data.
    pub ended: Vec<(String, u64)>,
    /// The other changed or removed profiles, whose records are dropped without a marker (a
    /// snapshot written before snapshots kept the configuration, or one whose configuration no
    /// longer loads).
    pub dropped: Vec<(String, u64)>,
    /// Records the table (`memory.max_sessions`) or the arena (`memory.arena_bytes`) has no room
    /// for, with the sub-sessions of those: ended as evicted at start.
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
        .map(|shard| shard_preview(dir, shard, &cfg.memory, rules))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

fn shard_preview(
    dir: &Path,
    shard: u32,
    memory: &Memory,
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
    let retired = retirable(snap.config(), body, &map);
    // A sub-session kind (`parent/sub`) is reported under its parent, whose change drops it too.
    let top_name = |name: &str| name.split('/').next().unwrap_or(name).to_string();
    // Room as a compact restore into a fresh engine takes it: records in archive order, each a
    // table slot and its payload's blocks. A sub-session shares its parent's fate: no room, or
    // its profile's change.
    let block_bytes = u64::from(memory.block_bytes);
    let blocks_total = memory.arena_bytes.0 / block_bytes;
    let (mut slots, mut blocks) = (0u64, 0u64);
    // The last session's fate: placed, or changed (as record profile `old`).
    let mut parent: Result<(), Option<usize>> = Err(None);
    for r in body.records.iter() {
        let is_sub = r.flags & RECORD_FLAG_SUB != 0;
        if is_sub {
            p.sub_sessions += 1;
        } else {
            p.sessions += 1;
        }
        let old = r.profile as usize;
        let changed = match (is_sub, parent, map.get(old)) {
            (true, Err(Some(top)), _) => Some(top),
            (_, _, Some(None)) => Some(old),
            _ => None,
        };
        if let Some(changed) = changed {
            let top = top_name(body.profiles[changed].name.as_str());
            // A changed sub-session of a session without room is dropped: the ends of changed
            // profiles come after those of sessions without room, too late for its parent's.
            let ends = retired[changed] && !(is_sub && parent == Err(None));
            let list = if ends { &mut p.ended } else { &mut p.dropped };
            match list.iter_mut().find(|(n, _)| *n == top) {
                Some((_, n)) => *n += 1,
                None => list.push((top, 1)),
            }
            if !is_sub {
                parent = Err(Some(old));
            }
            continue;
        }
        if map.get(old).is_none() {
            continue;
        }
        let need = u64::from(r.payload_len.to_native())
            .div_ceil(block_bytes)
            .max(1);
        let fits = (!is_sub || parent.is_ok())
            && slots < u64::from(memory.max_sessions)
            && blocks + need <= blocks_total;
        if fits {
            slots += 1;
            blocks += need;
        } else {
            p.over_capacity += 1;
        }
        if !is_sub {
            parent = if fits { Ok(()) } else { Err(None) };
        }
    }
    Ok(p)
}

/// The lines `check-config` prints for `previews` of the state in `dir`: one per shard, and a
/// `warning:` line for what will not come back as it was.
pub fn describe(dir: &str, previews: &[ShardPreview]) -> Vec<String> {
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
        for (name, records) in p.ended.iter().filter(|(_, n)| *n > 0) {
            lines.push(format!(
                "warning: shard {s}: profile \"{name}\" changed its session data (key, time mode, captured fields, counters, aggregates, lists or sub-sessions) or was removed: its {records} open sessions and sub-sessions in the snapshot will end at start, as evicted, with the data they have (rendered by the profile as the snapshot's configuration had it); to let them run their course instead, retire the profile (docs/operations.md, \"Changing a profile's session data\")"
            ));
        }
        for (name, records) in p.dropped.iter().filter(|(_, n)| *n > 0) {
            lines.push(format!(
                "warning: shard {s}: profile \"{name}\" changed its session data (key, time mode, captured fields, counters, aggregates, lists or sub-sessions) or was removed: its {records} open sessions and sub-sessions in the snapshot will not be restored and end without a marker; to keep them, retire the profile instead (docs/operations.md, \"Changing a profile's session data\")"
            ));
        }
        if p.over_capacity > 0 {
            lines.push(format!(
                "warning: shard {s}: the snapshot holds {} more sessions and sub-sessions than memory.max_sessions and memory.arena_bytes have room for: they will end as evicted at start",
                p.over_capacity
            ));
        }
    }
    lines
}
