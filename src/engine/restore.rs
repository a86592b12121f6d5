//! Snapshot import: [`Engine::restore_from`] reads a validated archive (`snapshot.rs`) in place
//! and rebuilds table heads, arena payloads, the index, the wheels, the clocks and the id sequence.
//!
//! Two modes:
//! - *exact*: the engine is empty and the archive is its own shard's, with the same table capacity
//!   and wheel size, and every record is importable. Every session goes back to its old slot, the
//!   table's free list, the key chains and the wheel buckets (down to the order within a bucket)
//!   are reproduced, so the restored engine makes exactly the decisions the original would have
//!   made (end markers in the same order, the same eviction victims): replaying the log after the
//!   snapshot re-emits byte-identical output.
//! - *compact*: anything else (another shard count, another capacity, a changed profile, several
//!   archives into one engine). Sessions owned by this shard (`fnv1a32(key) % shards`) get fresh
//!   slots, chains are rebuilt newest-first and sessions are linked at their deadline second.
//!
//! Records of a profile whose fingerprint (name, key, time mode, payload layout, captured fields,
//! sub-session kinds) changed or that no longer exists are not imported; neither is a record that
//! fails validation (a checksum-valid file written by a buggy or foreign build). Timeouts are not
//! part of the fingerprint: deadlines are recomputed with the current rules, and a session placed
//! in a wheel bucket later than its new deadline is moved forward. Records the table or the arena
//! has no room for are not dropped unannounced: [`Engine::end_unrestored`] ends them as an
//! eviction would, each with its marker and its data. Nor are those of a changed profile, when
//! the snapshot kept the configuration it was written with ([`Engine::restore_from_with`]):
//! they are validated against that configuration's rules and ended with them, rendered as the
//! old profile rendered them.
//!
//! Sessions whose deadline passed while the process was down are ordinary wheel entries at or
//! before their deadline second: the first `advance(Clock::Wall(now))` drains and ends them with
//! their normal reason, once (ending releases the record).

use std::sync::Arc;

use super::markers::{self, Summary};
use super::payload;
use super::rules::{Layout, Rules};
use super::snapshot::{
    fnv1a64, profile_descriptors, ArchivedRecordImage, ArchivedSnapshotBody, RestoreReport,
    BODY_FORMAT, PREFETCH_AHEAD, TS_ABS_MAX,
};
use super::table::{Head, FLAGS_ENGINE, NIL};
use super::wheel::Wheel;
use super::{due_s, fnv1a32, shard_of, EndReason, Engine, Kinds, Out, State, Stats, FLAG_SUB};
use crate::config::{Config, RECORD_BYTES_MAX};

impl Engine {
    /// Import the sessions of `body` that shard `shard` of `shards` owns. Call it once per
    /// archive of the previous run (only this shard's when the shard count is unchanged; every
    /// old shard's when it changed) on an engine nobody has fed yet. See the module doc.
    pub fn restore_from(
        &mut self,
        body: &ArchivedSnapshotBody,
        shards: u32,
        shard: u32,
    ) -> RestoreReport {
        self.restore_from_with(body, shards, shard, None)
    }

    /// [`Engine::restore_from`], given the configuration text the snapshot kept
    /// (`LoadedSnapshot::config`): the records of a profile whose session data changed since, or
    /// that is gone, are then not dropped but checked against that configuration's rules
    /// (`report.retired`), for [`Engine::end_unrestored`] to end with their data.
    pub fn restore_from_with(
        &mut self,
        body: &ArchivedSnapshotBody,
        shards: u32,
        shard: u32,
        config: Option<&str>,
    ) -> RestoreReport {
        assert!(shards > 0 && shard < shards, "shard {shard} of {shards}");
        assert!(
            !self.st.table.cut_active(),
            "restore during a snapshot capture"
        );
        let rules = &*self.rules;
        let st = &mut self.st;
        let mut report = RestoreReport::default();
        let map = profile_map(rules, body, &mut report);
        if body.format.to_native() != BODY_FORMAT {
            report.invalid = body.records.len() as u64;
            log::warn!(
                "snapshot body format {} is not {BODY_FORMAT}; nothing imported",
                body.format.to_native()
            );
            return report;
        }
        // Exact mode validates as it imports, so that the archive is streamed once; a record or
        // structure it cannot reproduce undoes the import, and the archive is restored compactly.
        if st.exact_eligible(body, &map, shards, shard) {
            match st.import_exact(rules, body, &map, shards, shard) {
                Ok(imported) => {
                    report.exact = true;
                    report.sessions = imported.sessions;
                    report.sub_sessions = imported.sub_sessions;
                    st.restore_clocks(body, &map, true);
                    st.finish_exact(rules, body, &map);
                }
                Err(reason) => {
                    log::warn!(
                        "snapshot of shard {shard} cannot be restored slot for slot ({reason}); restoring compactly"
                    );
                    st.undo_import();
                }
            }
        }
        if !report.exact {
            let previous = match config {
                Some(text) if map.iter().any(Option::is_none) => {
                    Previous::compile(text, body, &map).map(Arc::new)
                }
                _ => None,
            };
            st.restore_clocks(body, &map, false);
            st.import_compact(
                rules,
                body,
                &map,
                previous.as_deref(),
                shards,
                shard,
                &mut report,
            );
            report.unplaced.previous = previous;
        }
        st.stats.blocks_used = u64::from(st.arena.blocks_total() - st.arena.blocks_free());
        if report.dropped() > 0 || !report.changed_profiles.is_empty() {
            log::warn!(
                "snapshot of shard {} generation {}: {} sessions and {} sub-sessions restored; not restored: {} of changed or removed profiles {:?} (ended as evicted, with the configuration the snapshot kept), {} more of them (dropped: the snapshot kept no configuration that describes them), {} invalid, {} without room (ended as evicted)",
                body.shard.to_native(),
                body.generation.to_native(),
                report.sessions,
                report.sub_sessions,
                report.retired,
                report.changed_profiles,
                report.profile_changed,
                report.invalid,
                report.no_room
            );
        }
        report
    }
}

/// The archived records a compact restore did not import but ends, each list in archive order
/// (a session before its sub-sessions): those it had no room for, and those of profiles that
/// changed, checked against the rules of the configuration the snapshot kept. Ended by
/// [`Engine::end_unrestored`].
#[derive(Clone, Default)]
pub struct Unplaced {
    /// Checked against the current rules.
    records: Vec<Checked>,
    ended: usize,
    /// Checked against `previous`.
    retired: Vec<Checked>,
    retired_ended: usize,
    previous: Option<Arc<Previous>>,
}

impl Unplaced {
    pub fn is_empty(&self) -> bool {
        self.ended == self.records.len() && self.retired_ended == self.retired.len()
    }
}

impl PartialEq for Unplaced {
    /// The records and how far they are ended (the rules they were checked against follow
    /// from the archive).
    fn eq(&self, other: &Unplaced) -> bool {
        (&self.records, self.ended, &self.retired, self.retired_ended)
            == (
                &other.records,
                other.ended,
                &other.retired,
                other.retired_ended,
            )
    }
}

impl Eq for Unplaced {}

impl std::fmt::Debug for Unplaced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} without room ended, {} of {} of changed profiles ended",
            self.ended,
            self.records.len(),
            self.retired_ended,
            self.retired.len()
        )
    }
}

/// The rules of the configuration a snapshot kept, for its records of profiles that changed
/// since (or are gone): they are validated against these rules and ended with them, their
/// markers rendered as the old profile rendered them.
pub(super) struct Previous {
    rules: Rules,
    kinds: Kinds,
    /// Archived record profile -> record profile of `rules` (every one `rules` describes as
    /// the archive does: a sub-session kind that did not change still ends with its parent).
    map: Vec<Option<u8>>,
}

impl Previous {
    /// None, with a warning, when the text no longer loads, or when none of the archive's
    /// changed profiles is in it as the archive describes it (its name and fingerprint).
    fn compile(
        text: &str,
        body: &ArchivedSnapshotBody,
        current: &[Option<u8>],
    ) -> Option<Previous> {
        let rules = match Config::from_toml(text).and_then(|cfg| Rules::compile(&cfg)) {
            Ok(rules) => rules,
            Err(e) => {
                log::warn!(
                    "the configuration the snapshot kept does not load any more ({e}): the sessions of its changed profiles cannot be ended with their data"
                );
                return None;
            }
        };
        let old = profile_descriptors(&rules);
        let map: Vec<Option<u8>> = body
            .profiles
            .iter()
            .map(|image| {
                old.iter()
                    .position(|(name, descriptor, _)| {
                        name.as_str() == image.name.as_str()
                            && fnv1a64(descriptor.as_bytes()) == image.fingerprint.to_native()
                    })
                    .and_then(|q| u8::try_from(q).ok())
            })
            .collect();
        if !map
            .iter()
            .zip(current)
            .any(|(then, now)| then.is_some() && now.is_none())
        {
            log::warn!(
                "the configuration the snapshot kept does not describe its changed profiles: their sessions cannot be ended with their data"
            );
            return None;
        }
        Some(Previous {
            kinds: Kinds::of(&rules),
            rules,
            map,
        })
    }

    fn against(&self) -> Against<'_> {
        Against {
            rules: &self.rules,
            map: &self.map,
            layouts: &self.kinds.layouts,
            sub_counters: &self.kinds.sub_counters,
            key_bytes_max: self.rules.key_bytes_max as usize,
        }
    }
}

impl Engine {
    /// Ends, each with its marker, the archived sessions `restore_from` had no room for
    /// (`report.unplaced`, from the same `body`), as an eviction ends them live: a session
    /// `evicted` after its sub-sessions (`parent_ended`); a sub-session of a restored session
    /// `evicted`. Nothing of an archive is dropped unannounced for want of room. Stops once
    /// `out` is half full and returns whether some are left: call again after handing `out`
    /// over, so that it never grows.
    ///
    /// The records of changed profiles (`report.retired`) end the same way, rendered with the
    /// rules of the configuration the snapshot kept: the old sessions end with the data they
    /// had, and the log's events after the snapshot open new sessions under the new profiles.
    pub fn end_unrestored(
        &mut self,
        body: &ArchivedSnapshotBody,
        unplaced: &mut Unplaced,
        out: &mut Out,
    ) -> bool {
        let stats = &mut self.st.stats;
        let now = Ending {
            rules: &self.rules,
            sub_of: &self.st.sub_of,
            body,
        };
        if now.end_all(&unplaced.records, &mut unplaced.ended, stats, out) {
            return true;
        }
        match &unplaced.previous {
            Some(previous) => Ending {
                rules: &previous.rules,
                sub_of: &previous.kinds.sub_of,
                body,
            }
            .end_all(&unplaced.retired, &mut unplaced.retired_ended, stats, out),
            None => false,
        }
    }
}

/// Ends archived records that are not in the engine, rendered with `rules`.
struct Ending<'a> {
    rules: &'a Rules,
    /// `rules`' record profile -> (parent profile, sub index), for sub-session kinds.
    sub_of: &'a [(u8, u8)],
    body: &'a ArchivedSnapshotBody,
}

impl Ending<'_> {
    /// Ends `list[*ended..]` as `Engine::end_unrestored` describes; true when it stopped at a
    /// half-full `out`.
    fn end_all(
        &self,
        list: &[Checked],
        ended: &mut usize,
        stats: &mut Stats,
        out: &mut Out,
    ) -> bool {
        let body = self.body;
        let is_sub_of = |c: &Checked, parent: u32| {
            let r = &body.records[c.index as usize];
            r.flags & FLAG_SUB != 0 && r.parent.to_native() == parent
        };
        while let Some(&c) = list.get(*ended) {
            if out.half_full() {
                return true;
            }
            if body.records[c.index as usize].flags & FLAG_SUB != 0 {
                // Its parent was restored.
                self.end(&c, EndReason::Evicted, stats, out);
                *ended += 1;
                continue;
            }
            let subs = list[*ended + 1..]
                .iter()
                .take_while(|s| is_sub_of(s, c.index))
                .count();
            for s in &list[*ended + 1..][..subs] {
                self.end(s, EndReason::ParentEnded, stats, out);
            }
            self.end(&c, EndReason::Evicted, stats, out);
            *ended += 1 + subs;
        }
        false
    }

    /// Emits the end marker of archived record `c`, which is not in the engine, with `reason`;
    /// a sub-session's names its parent, the archived record its `parent` field gives.
    fn end(&self, c: &Checked, reason: EndReason, stats: &mut Stats, out: &mut Out) {
        let (rules, body) = (self.rules, self.body);
        let payload = body.payload.as_slice();
        let r = &body.records[c.index as usize];
        let bytes = &payload[c.off..c.off + c.len];
        let key_len = r.key_len.to_native() as usize;
        let s = Summary {
            id: r.id.to_native(),
            start_ts: r.start_ts.to_native(),
            last_ts: r.last_ts.to_native(),
            count: r.count.to_native(),
        };
        if r.flags & FLAG_SUB == 0 {
            let rule = &rules.profiles[c.profile as usize];
            markers::session_end(out, rule, &bytes[..key_len], s, reason, bytes);
            stats.sessions_ended[reason as usize] += 1;
            stats.evictions += 1;
            return;
        }
        // `check_record` passed both records and `names_parent` the pair: the ranges lie in
        // the payload.
        let pr = &body.records[r.parent.to_native() as usize];
        let poff = pr.payload_off.to_native() as usize;
        let parent_key = &payload[poff..poff + pr.key_len.to_native() as usize];
        let (pp, si) = self.sub_of[c.profile as usize];
        let rule = &rules.profiles[pp as usize];
        let sub = &rule.subs[si as usize];
        let sub_key = sub.key.map(|_| &bytes[8..key_len]);
        let parent_id = pr.id.to_native();
        markers::sub_session_end(
            out, rule, sub, parent_key, sub_key, s, parent_id, reason, bytes, key_len,
        );
        stats.sub_sessions_ended += 1;
    }
}

impl State {
    /// Clocks and wheel cursors: the latest over every archive restored. The id sequence resumes
    /// after the archive's.
    fn restore_clocks(&mut self, body: &ArchivedSnapshotBody, map: &[Option<u8>], exact: bool) {
        // A clock outside the range of a record's timestamps is not one this engine kept (the
        // clock arithmetic would overflow on it): the profile's clock starts over instead.
        let usable = |t: i64| {
            if (-TS_ABS_MAX..=TS_ABS_MAX).contains(&t) {
                t
            } else {
                super::NONE_TS
            }
        };
        for (old, image) in body.profiles.iter().enumerate() {
            let Some(p) = map[old] else { continue };
            if (p as usize) < self.clocks.len() {
                let c = &mut self.clocks[p as usize];
                c.max_ts = c.max_ts.max(usable(image.max_ts.to_native()));
                c.wall_last = c.wall_last.max(usable(image.wall_last.to_native()));
                // A wheel starting near the archived cursor avoids re-linking every session at
                // the first drain (far deadlines would otherwise sit clamped at the horizon).
                let cursor = image.wheel_cursor_s.to_native();
                let w = &mut self.wheels[p as usize];
                if exact || (w.is_empty() && cursor_ok(cursor) && cursor > w.cursor_s()) {
                    *w = Wheel::new(w.slots_max(), cursor);
                }
            }
        }
        self.ids.resume_after(body.id_seq.to_native());
    }

    /// Compact mode: every importable record this shard owns, in a fresh slot, its key chain and
    /// wheel bucket rebuilt; the others are counted in `report`. Those of changed profiles are
    /// checked against `previous`, when given, and kept to be ended (`report.retired`).
    #[allow(clippy::too_many_arguments)]
    fn import_compact(
        &mut self,
        rules: &Rules,
        body: &ArchivedSnapshotBody,
        map: &[Option<u8>],
        previous: Option<&Previous>,
        shards: u32,
        shard: u32,
        report: &mut RestoreReport,
    ) {
        let records = body.records.as_slice();
        let payload = body.payload.as_slice();
        let mut top = Top::None;
        // Keys are hashed a few records ahead and their index buckets prefetched, so the index
        // inserts below overlap their cache misses. The slot of record i in the ring is reused
        // for record i + PREFETCH_AHEAD.
        let mut ring = [None; PREFETCH_AHEAD];
        for (i, r) in records.iter().enumerate().take(PREFETCH_AHEAD) {
            ring[i] = self.prefetch_index(body, map, r);
        }
        for (i, r) in records.iter().enumerate() {
            let is_sub = r.flags & FLAG_SUB != 0;
            if !is_sub {
                top = Top::None;
            } else {
                match &top {
                    Top::Imported { index, .. } if r.parent.to_native() == *index => {}
                    Top::OtherShard => {
                        report.other_shard += 1;
                        continue;
                    }
                    &Top::Evicted { index } => {
                        match self.check_record(rules, body, map, i) {
                            Ok(c) if r.parent.to_native() == index && names_parent(body, &c) => {
                                report.no_room += 1;
                                report.unplaced.records.push(c);
                            }
                            Err(Reject::ProfileChanged) => report.profile_changed += 1,
                            _ => report.invalid += 1,
                        }
                        continue;
                    }
                    &Top::Retired { index } => {
                        match previous.map(|p| p.against().check(body, i)) {
                            Some(Ok(c))
                                if r.parent.to_native() == index && names_parent(body, &c) =>
                            {
                                report.retired += 1;
                                report.unplaced.retired.push(c);
                            }
                            Some(Err(Reject::ProfileChanged)) | None => {
                                report.profile_changed += 1;
                            }
                            _ => report.invalid += 1,
                        }
                        continue;
                    }
                    &Top::Dropped(why) => {
                        match why {
                            Lost::ProfileChanged => report.profile_changed += 1,
                            Lost::Invalid => report.invalid += 1,
                        }
                        continue;
                    }
                    _ => {
                        report.invalid += 1;
                        continue;
                    }
                }
            }
            let ahead_hash = ring[i % PREFETCH_AHEAD];
            if let Some(ahead) = records.get(i + PREFETCH_AHEAD) {
                ring[i % PREFETCH_AHEAD] = self.prefetch_index(body, map, ahead);
            }
            let checked = match self.check_record(rules, body, map, i) {
                Ok(c) => c,
                Err(Reject::ProfileChanged) => {
                    // A sub-session here has a restored parent (`top`), which it ends before.
                    let retired = previous
                        .and_then(|p| p.against().check(body, i).ok())
                        .filter(|c| !is_sub || names_parent(body, c));
                    let owned = |c: &Checked| {
                        let key = &payload[c.off..c.off + r.key_len.to_native() as usize];
                        shard_of(fnv1a32(key), shards) == shard
                    };
                    match retired {
                        Some(c) if !is_sub && !owned(&c) => {
                            report.other_shard += 1;
                            top = Top::OtherShard;
                        }
                        Some(c) => {
                            report.retired += 1;
                            report.unplaced.retired.push(c);
                            if !is_sub {
                                top = Top::Retired { index: c.index };
                            }
                        }
                        None => {
                            report.profile_changed += 1;
                            if !is_sub {
                                top = Top::Dropped(Lost::ProfileChanged);
                            }
                        }
                    }
                    continue;
                }
                Err(Reject::Invalid(why)) => {
                    report.invalid += 1;
                    if report.invalid <= 8 {
                        log::warn!(
                            "snapshot record {i} (slot {}) is invalid: {why}; not imported",
                            r.slot.to_native()
                        );
                    }
                    if !is_sub {
                        top = Top::Dropped(Lost::Invalid);
                    }
                    continue;
                }
            };
            let bytes = &payload[checked.off..checked.off + checked.len];
            let key = &bytes[..r.key_len.to_native() as usize];
            if !is_sub && shard_of(fnv1a32(key), shards) != shard {
                report.other_shard += 1;
                top = Top::OtherShard;
                continue;
            }
            // Where the parent keeps this sub-session: the position of its old slot.
            let parent = match top {
                Top::Imported { index, slot } if is_sub => {
                    let parent_rec = &records[index as usize];
                    let layout = self.layouts[self.table.get(slot).profile as usize];
                    let position = sub_position(body, parent_rec, &layout, r.slot.to_native());
                    // A position another sub-session took already (two records under one old
                    // slot) would leave one unknown to its parent, to outlive it.
                    let usable = |pos: &usize| {
                        names_parent(body, &checked) && self.sub_slot(slot, *pos) == NIL
                    };
                    match position.filter(usable) {
                        Some(pos) => Some((slot, pos)),
                        None => {
                            report.invalid += 1;
                            continue;
                        }
                    }
                }
                _ => None,
            };
            let room = self
                .table
                .alloc()
                .and_then(|slot| match self.arena.alloc_copy(bytes) {
                    Some(data) => Some((slot, data)),
                    None => {
                        self.table.free(slot);
                        None
                    }
                });
            let Some((slot, data)) = room else {
                report.no_room += 1;
                if !is_sub {
                    top = Top::Evicted {
                        index: checked.index,
                    };
                }
                report.unplaced.records.push(checked);
                continue;
            };
            let p = checked.profile;
            let link = parent.map_or(NIL, |(parent_slot, _)| parent_slot);
            self.place(r, slot, data, p, key.len(), link);
            if let Some((parent_slot, pos)) = parent {
                self.set_sub_slot(parent_slot, pos, slot);
                self.index.insert(self.sub_key_hash(p, key), slot);
                let due = due_s(self.deadline(rules, slot));
                let wheel = self.table.get(parent_slot).profile as usize;
                self.wheels[wheel].link(self.table.heads_mut(), slot, due);
                report.sub_sessions += 1;
            } else {
                let hash = match ahead_hash {
                    Some((q, h)) if q == p => h,
                    _ => self.key_hash(p, key),
                };
                debug_assert_eq!(hash, self.key_hash(p, key));
                self.chain_insert(p, slot, hash, key);
                let due = due_s(self.deadline(rules, slot));
                self.wheels[p as usize].link(self.table.heads_mut(), slot, due);
                top = Top::Imported {
                    index: i as u32,
                    slot,
                };
                report.sessions += 1;
            }
        }
    }

    /// Fills the head of `slot` for record `r`, whose payload is in `data`. A top-level
    /// record's sub-session slots start empty (its imported sub-sessions fill them).
    fn place(
        &mut self,
        r: &ArchivedRecordImage,
        slot: u32,
        data: u32,
        p: u8,
        key_len: usize,
        link: u32,
    ) {
        if r.flags & FLAG_SUB == 0 {
            let layout = self.layouts[p as usize];
            for k in 0..payload::sub_slots(&layout) {
                self.arena
                    .write(data, key_len + layout.subs_off + 4 * k, &NIL.to_le_bytes());
            }
        }
        *self.table.get_mut(slot) = Head {
            id: r.id.to_native(),
            start_ts: r.start_ts.to_native(),
            last_ts: r.last_ts.to_native(),
            count: r.count.to_native(),
            data,
            link,
            profile: p,
            flags: r.flags & FLAGS_ENGINE,
            key_len: key_len as u16,
            ..*self.table.get(slot)
        };
        self.stats.active_by_profile[p as usize] += 1;
    }

    /// Records sub-session `slot` at position `pos` of its parent's sub-session slots.
    /// The slot at position `pos` of `parent_slot`'s sub-session slots (`NIL`: none).
    fn sub_slot(&self, parent_slot: u32, pos: usize) -> u32 {
        let ph = self.table.get(parent_slot);
        let layout = self.layouts[ph.profile as usize];
        let mut b = [0u8; 4];
        self.arena.read(
            ph.data,
            ph.key_len as usize + layout.subs_off + 4 * pos,
            &mut b,
        );
        u32::from_le_bytes(b)
    }

    fn set_sub_slot(&mut self, parent_slot: u32, pos: usize, slot: u32) {
        let ph = *self.table.get(parent_slot);
        let layout = self.layouts[ph.profile as usize];
        self.arena.write(
            ph.data,
            ph.key_len as usize + layout.subs_off + 4 * pos,
            &slot.to_le_bytes(),
        );
    }
}

/// What validating a record needs of the rules it is checked against: the current ones, or
/// those of the configuration a snapshot kept ([`Previous`]).
struct Against<'a> {
    rules: &'a Rules,
    /// Archived record profile -> record profile of `rules`.
    map: &'a [Option<u8>],
    layouts: &'a [Layout],
    sub_counters: &'a [usize],
    key_bytes_max: usize,
}

impl Against<'_> {
    /// Validates one record, its captured values included.
    fn check(&self, body: &ArchivedSnapshotBody, index: usize) -> Result<Checked, Reject> {
        let (rules, map) = (self.rules, self.map);
        let r = &body.records[index];
        let index = index as u32;
        let old = r.profile as usize;
        let Some(&mapped) = map.get(old) else {
            return Err(Reject::Invalid("profile index out of range"));
        };
        let Some(p) = mapped else {
            return Err(Reject::ProfileChanged);
        };
        let is_sub = r.flags & FLAG_SUB != 0;
        let top = self.layouts.len();
        if is_sub != (p as usize >= top) {
            return Err(Reject::Invalid(
                "sub-session flag disagrees with the profile kind",
            ));
        }
        let payload = body.payload.as_slice();
        let off = usize::try_from(r.payload_off.to_native())
            .map_err(|_| Reject::Invalid("payload offset"))?;
        let len = r.payload_len.to_native() as usize;
        if off.checked_add(len).is_none_or(|end| end > payload.len()) {
            return Err(Reject::Invalid("payload range outside the archive"));
        }
        if len > RECORD_BYTES_MAX {
            return Err(Reject::Invalid("payload longer than a record may be"));
        }
        let (start_ts, last_ts) = (r.start_ts.to_native(), r.last_ts.to_native());
        if !(-TS_ABS_MAX..=TS_ABS_MAX).contains(&start_ts)
            || !(start_ts..=TS_ABS_MAX).contains(&last_ts)
        {
            return Err(Reject::Invalid("timestamps out of range"));
        }
        let bytes = &payload[off..off + len];
        let key_len = r.key_len.to_native() as usize;
        if is_sub {
            let n = self.sub_counters[p as usize];
            if key_len < 8
                || key_len > self.key_bytes_max + 8
                || len != key_len + 4 * n + 2
                || payload::get_u16(bytes, key_len + 4 * n) != 0
            {
                return Err(Reject::Invalid(
                    "sub-session payload does not match its kind",
                ));
            }
        } else {
            let l = &self.layouts[p as usize];
            if key_len > self.key_bytes_max || len < key_len + l.fixed_bytes {
                return Err(Reject::Invalid(
                    "payload shorter than its key and fixed part",
                ));
            }
            let var_len = payload::get_u16(bytes, key_len + l.var_len_off) as usize;
            if len != key_len + l.fixed_bytes + var_len {
                return Err(Reject::Invalid("payload length disagrees with its var_len"));
            }
            let rule = &rules.profiles[p as usize];
            if !var_area_ok(
                &bytes[key_len + l.fixed_bytes..],
                rule.metadata.len() + rule.state.len(),
                rule.lists.len(),
            ) {
                return Err(Reject::Invalid("malformed captured values"));
            }
        }
        Ok(Checked {
            index,
            profile: p,
            off,
            len,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Import helpers.
// ---------------------------------------------------------------------------------------------

/// Why a top-level record was not imported; its sub-sessions are counted the same way.
#[derive(Clone, Copy)]
enum Lost {
    ProfileChanged,
    Invalid,
}

/// Fate of the last top-level record in a compact import, which its sub-sessions share.
enum Top {
    None,
    Imported {
        index: u32,
        slot: u32,
    },
    OtherShard,
    Dropped(Lost),
    /// Without room: it and its sub-sessions wait in [`Unplaced`] to be ended.
    Evicted {
        index: u32,
    },
    /// Of a changed profile: it and its sub-sessions wait in [`Unplaced`] to be ended with the
    /// rules of the configuration the snapshot kept.
    Retired {
        index: u32,
    },
}

/// Whether checked sub-session record `c`'s key starts with its parent's id, as every
/// sub-session's does (the parent's marker is named from it).
fn names_parent(body: &ArchivedSnapshotBody, c: &Checked) -> bool {
    let r = &body.records[c.index as usize];
    let parent = &body.records[r.parent.to_native() as usize];
    body.payload.as_slice()[c.off..c.off + 8] == parent.id.to_native().to_le_bytes()
}

enum Reject {
    ProfileChanged,
    Invalid(&'static str),
}

/// A record that passed validation: its new record profile and its payload range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Checked {
    /// The record's position in the archive.
    index: u32,
    profile: u8,
    off: usize,
    len: usize,
}

/// An exact import that checked out, its index entries inserted.
struct ExactImport {
    sessions: u64,
    sub_sessions: u64,
}

/// Exact import's per-slot state once a slot's wheel entry is found (see `import_exact`).
const SEEN: u8 = u8::MAX;

/// Index entries collected during an exact restore, inserted sorted by their hash's top bits:
/// the index's home bucket is a monotone function of those bits, so the inserts sweep the index
/// instead of missing the cache on every one. The index keeps only a hash's high 32 bits (its
/// tag), so an entry packs into one u64: tag << 32 | slot.
#[derive(Default)]
struct PendingIndex {
    packed: Vec<u64>,
}

impl PendingIndex {
    const BUCKET_BITS: u32 = 10;
    const TAG_MASK: u64 = 0xffff_ffff_0000_0000;

    fn reserve(&mut self, n: usize) {
        self.packed.reserve_exact(n);
    }

    fn push(&mut self, hash: u64, slot: u32) {
        self.packed.push((hash & Self::TAG_MASK) | u64::from(slot));
    }

    fn retain(&mut self, mut keep: impl FnMut(u32) -> bool) {
        self.packed.retain(|&e| keep(e as u32));
    }

    /// Counting sort on the top `BUCKET_BITS` bits (within a bucket the order is free: its
    /// entries' homes lie within a few tens of kilobytes of each other), then insert. Stops at
    /// an entry whose key `same(indexed, new)` says an indexed slot has already: false.
    fn insert_all(
        self,
        index: &mut super::index::Index,
        mut same: impl FnMut(u32, u32) -> bool,
    ) -> bool {
        let shift = 64 - Self::BUCKET_BITS;
        let mut starts = vec![0usize; (1 << Self::BUCKET_BITS) + 1];
        for &e in &self.packed {
            starts[(e >> shift) as usize + 1] += 1;
        }
        for b in 1..starts.len() {
            starts[b] += starts[b - 1];
        }
        let mut sorted = vec![0u64; self.packed.len()];
        for &e in &self.packed {
            let b = (e >> shift) as usize;
            sorted[starts[b]] = e;
            starts[b] += 1;
        }
        drop(self);
        sorted.into_iter().all(|e| {
            let slot = e as u32;
            index.insert_unless(e & Self::TAG_MASK, slot, |indexed| same(indexed, slot))
        })
    }
}

struct Bitmap(Vec<u64>);

impl Bitmap {
    fn new(bits: usize) -> Bitmap {
        Bitmap(vec![0; bits.div_ceil(64)])
    }
    fn get(&self, i: usize) -> bool {
        self.0[i / 64] & (1 << (i % 64)) != 0
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
}

/// A cache hint: no effect on state, never faults (any address).
#[inline(always)]
fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint that never faults, whatever the address; SSE is part of the
    // x86_64 baseline.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

fn cursor_ok(cursor_s: i64) -> bool {
    cursor_s > i64::MIN / 2 && cursor_s < i64::MAX / 2
}

/// Old record-profile index -> new one, for profiles whose name and fingerprint are unchanged.
pub(crate) fn profile_map(
    rules: &Rules,
    body: &ArchivedSnapshotBody,
    report: &mut RestoreReport,
) -> Vec<Option<u8>> {
    let current = profile_descriptors(rules);
    body.profiles
        .iter()
        .map(|image| {
            let found = current
                .iter()
                .position(|(name, _, _)| name.as_str() == image.name.as_str());
            match found {
                Some(p)
                    if fnv1a64(current[p].1.as_bytes()) == image.fingerprint.to_native()
                        && p <= u8::MAX as usize =>
                {
                    Some(p as u8)
                }
                _ => {
                    report
                        .changed_profiles
                        .push(image.name.as_str().to_string());
                    None
                }
            }
        })
        .collect()
}

/// Per archived record profile: whether `Engine::restore_from_with` given `config` ends its
/// records with their data (its profile changed, `map` gives it no current one, and `config`
/// describes it as the archive does).
pub(crate) fn retirable(
    config: Option<&str>,
    body: &ArchivedSnapshotBody,
    map: &[Option<u8>],
) -> Vec<bool> {
    let previous = config
        .filter(|_| map.iter().any(Option::is_none))
        .and_then(|text| Previous::compile(text, body, map));
    match previous {
        Some(p) => p
            .map
            .iter()
            .zip(map)
            .map(|(then, now)| then.is_some() && now.is_none())
            .collect(),
        None => vec![false; map.len()],
    }
}

/// Position in the parent's sub-session slots (as archived) that names `old_slot`.
fn sub_position(
    body: &ArchivedSnapshotBody,
    parent: &ArchivedRecordImage,
    layout: &Layout,
    old_slot: u32,
) -> Option<usize> {
    let off = usize::try_from(parent.payload_off.to_native()).ok()?;
    let bytes = body
        .payload
        .as_slice()
        .get(off..off + parent.payload_len.to_native() as usize)?;
    let base = parent.key_len.to_native() as usize + layout.subs_off;
    (0..payload::sub_slots(layout)).find(|&i| {
        bytes
            .get(base + 4 * i..base + 4 * i + 4)
            .is_some_and(|b| payload::get_u32(b, 0) == old_slot)
    })
}

/// Walks a var area: `values` captured values then `lists` lists; true iff it is exactly consumed.
fn var_area_ok(area: &[u8], values: usize, lists: usize) -> bool {
    let mut pos = 0usize;
    let value = |pos: &mut usize| -> bool {
        if *pos + 2 > area.len() {
            return false;
        }
        *pos += 2 + payload::get_u16(area, *pos) as usize;
        *pos <= area.len()
    };
    for _ in 0..values {
        if !value(&mut pos) {
            return false;
        }
    }
    for _ in 0..lists {
        let Some(&n) = area.get(pos) else {
            return false;
        };
        pos += 1;
        for _ in 0..n {
            if !value(&mut pos) {
                return false;
            }
        }
    }
    pos == area.len()
}

impl State {
    /// For a top-level record whose profile maps: its new profile and key hash, with the index
    /// bucket prefetched. Reads only in-bounds bytes; validation comes later.
    #[inline]
    fn prefetch_index(
        &self,
        body: &ArchivedSnapshotBody,
        map: &[Option<u8>],
        r: &ArchivedRecordImage,
    ) -> Option<(u8, u64)> {
        if r.flags & FLAG_SUB != 0 {
            return None;
        }
        let p = (*map.get(r.profile as usize)?)?;
        let off = usize::try_from(r.payload_off.to_native()).ok()?;
        let key = body
            .payload
            .as_slice()
            .get(off..off.checked_add(r.key_len.to_native() as usize)?)?;
        let hash = self.key_hash(p, key);
        self.index.prefetch(hash);
        Some((p, hash))
    }

    /// Validates one record against the current rules, its captured values included.
    fn check_record(
        &self,
        rules: &Rules,
        body: &ArchivedSnapshotBody,
        map: &[Option<u8>],
        index: usize,
    ) -> Result<Checked, Reject> {
        Against {
            rules,
            map,
            layouts: &self.layouts,
            sub_counters: &self.sub_counters,
            key_bytes_max: self.key_bytes_max,
        }
        .check(body, index)
    }

    /// Whether `body` may be restored exactly, by what is known before reading its records: the
    /// engine is empty, and the archive is this shard's, of this table capacity and wheel size,
    /// with every profile unchanged.
    fn exact_eligible(
        &self,
        body: &ArchivedSnapshotBody,
        map: &[Option<u8>],
        shards: u32,
        shard: u32,
    ) -> bool {
        let eligible = self.table.live() == 0
            && self.arena.blocks_free() == self.arena.blocks_total()
            && body.shard.to_native() == shard
            && body.shards.to_native() == shards
            && body.table_capacity.to_native() == self.table.capacity()
            && self
                .wheels
                .first()
                .is_some_and(|w| w.slots_max() == body.slots_max.to_native())
            && map.iter().all(Option::is_some);
        if !eligible {
            return false;
        }
        // Exact mode relinks wheels by each image's archived kind and indexes them by its
        // current profile: the two must agree (a forged `parent` would index past the wheels).
        let top = self.layouts.len();
        let kinds_agree = body.profiles.iter().zip(map).all(|(image, p)| {
            let archived_top = image.parent.to_native() == u32::MAX;
            p.is_some_and(|p| (usize::from(p) < top) == archived_top)
        });
        if !kinds_agree {
            log::warn!(
                "snapshot of shard {shard} cannot be restored slot for slot (a profile image of another kind than the rules' profile); restoring compactly"
            );
        }
        kinds_agree
    }

    /// Exact mode's import, validating as it goes: every record into its old slot, checking
    /// every structural reference exact mode follows (slots, sub-session parents, key chains,
    /// the free list, wheel membership). Writes only table heads, arena payloads and the
    /// per-profile counts: on `Err` [`State::undo_import`] returns the engine to empty. The
    /// index, wheels and free list are rebuilt by [`State::finish_exact`] once all is checked.
    fn import_exact(
        &mut self,
        rules: &Rules,
        body: &ArchivedSnapshotBody,
        map: &[Option<u8>],
        shards: u32,
        shard: u32,
    ) -> Result<ExactImport, &'static str> {
        let cap = self.table.capacity();
        let records = body.records.as_slice();
        if records.len() > cap as usize {
            return Err("more records than slots");
        }
        let payload = body.payload.as_slice();
        let key_of = |r: &ArchivedRecordImage| {
            let off = r.payload_off.to_native() as usize;
            &payload[off..off + r.key_len.to_native() as usize]
        };
        // Per slot: 0 free, 1 + wheel index while live, SEEN once found in a wheel list.
        let mut slot_state = vec![0u8; cap as usize];
        let mut pending = PendingIndex::default();
        pending.reserve(records.len());
        // Every slot live, records in place; the free list is rebuilt from the archive's.
        while self.table.alloc().is_some() {}
        let mut top = u32::MAX;
        let (mut tops, mut subs, mut links) = (0u64, 0u64, 0u64);
        for (i, r) in records.iter().enumerate() {
            let c = self
                .check_record(rules, body, map, i)
                .map_err(|e| match e {
                    Reject::Invalid(reason) => reason,
                    Reject::ProfileChanged => "a changed profile",
                })?;
            let slot = r.slot.to_native();
            if slot >= cap || slot_state[slot as usize] != 0 {
                return Err("a slot out of range or used twice");
            }
            let bytes = &payload[c.off..c.off + c.len];
            let key = &bytes[..r.key_len.to_native() as usize];
            let (wheel, parent, link) = if r.flags & FLAG_SUB != 0 {
                let Some(parent) = records.get(top as usize) else {
                    return Err("a sub-session without a parent");
                };
                let layout = &self.layouts
                    [map[parent.profile as usize].ok_or("a changed profile")? as usize];
                let position = sub_position(body, parent, layout, slot).filter(|_| {
                    r.parent.to_native() == top
                        && r.link.to_native() == parent.slot.to_native()
                        && key[..8] == parent.id.to_native().to_le_bytes()
                });
                let Some(pos) = position else {
                    return Err("a sub-session disagrees with its parent");
                };
                let parent_slot = parent.slot.to_native();
                let wheel = body.profiles[r.profile as usize].parent.to_native();
                (wheel, Some((parent_slot, pos)), parent_slot)
            } else {
                top = i as u32;
                tops += 1;
                links += u64::from(r.link.to_native() != NIL);
                if shard_of(fnv1a32(key), shards) != shard {
                    return Err("a key another shard owns");
                }
                (u32::from(r.profile), None, r.link.to_native())
            };
            if wheel >= u32::from(SEEN) - 1 {
                return Err("a wheel index out of range");
            }
            slot_state[slot as usize] = wheel as u8 + 1;
            let Some(data) = self.arena.alloc_copy(bytes) else {
                return Err("the arena is smaller");
            };
            let p = c.profile;
            self.place(r, slot, data, p, key.len(), link);
            let hash = match parent {
                Some((parent_slot, pos)) => {
                    self.set_sub_slot(parent_slot, pos, slot);
                    subs += 1;
                    self.sub_key_hash(p, key)
                }
                None => self.key_hash(p, key),
            };
            pending.push(hash, slot);
        }
        // Chains: each link names a live, older session of the same profile and key, each slot
        // is linked to at most once, and walking from the heads reaches every session (no cycle).
        // Only chain heads are indexed.
        if links > 0 {
            let mut referenced = Bitmap::new(cap as usize);
            let mut slot_rec = vec![NIL; cap as usize];
            for (i, r) in records.iter().enumerate() {
                slot_rec[r.slot.to_native() as usize] = i as u32;
            }
            for r in records.iter().filter(|r| r.flags & FLAG_SUB == 0) {
                let link = r.link.to_native();
                if link == NIL {
                    continue;
                }
                let Some(&t) = slot_rec.get(link as usize).filter(|&&t| t != NIL) else {
                    return Err("a chain link to a free slot");
                };
                let tr = &records[t as usize];
                if tr.flags & FLAG_SUB != 0
                    || tr.profile != r.profile
                    || key_of(tr) != key_of(r)
                    || tr.start_ts.to_native() > r.start_ts.to_native()
                    || referenced.get(link as usize)
                {
                    return Err("a malformed key chain");
                }
                referenced.set(link as usize);
            }
            let mut reached = 0u64;
            for r in records
                .iter()
                .filter(|r| r.flags & FLAG_SUB == 0 && !referenced.get(r.slot.to_native() as usize))
            {
                reached += 1;
                let mut s = r.link.to_native();
                while s != NIL && reached <= tops {
                    reached += 1;
                    s = records[slot_rec[s as usize] as usize].link.to_native();
                }
            }
            if reached != tops {
                return Err("a cycle in a key chain");
            }
            pending.retain(|slot| !referenced.get(slot as usize));
        }
        // Free list: the complement of the live slots, each free slot once.
        let mut total = records.len() as u64;
        for run in body.free_runs.iter() {
            let (start, len) = (run.start.to_native(), run.len.to_native());
            if start.checked_add(len).is_none_or(|end| end > cap) {
                return Err("a free run out of range");
            }
            for s in &mut slot_state[start as usize..(start + len) as usize] {
                if *s != 0 {
                    return Err("a slot both free and live, or free twice");
                }
                *s = SEEN;
            }
            total += u64::from(len);
        }
        if total != u64::from(cap) {
            return Err("the free list does not cover the free slots");
        }
        // Wheels: every record in exactly one bucket of its own wheel.
        let slots_max = body.slots_max.to_native();
        let mut linked = 0u64;
        for (old, image) in body.profiles.iter().enumerate() {
            let spans = image.wheel_spans.as_slice();
            let slots = image.wheel_slots.as_slice();
            if image.parent.to_native() != u32::MAX {
                if !spans.is_empty() || !slots.is_empty() {
                    return Err("a wheel on a sub-session kind");
                }
                continue;
            }
            if !cursor_ok(image.wheel_cursor_s.to_native())
                || spans
                    .iter()
                    .map(|s| u64::from(s.len.to_native()))
                    .sum::<u64>()
                    != slots.len() as u64
            {
                return Err("a malformed wheel");
            }
            let mut buckets = Bitmap::new(slots_max as usize);
            for span in spans {
                let b = span.bucket.to_native();
                if b >= slots_max || buckets.get(b as usize) {
                    return Err("a wheel bucket out of range or listed twice");
                }
                buckets.set(b as usize);
            }
            for (k, &s) in slots.iter().enumerate() {
                if let Some(&ahead) = slots.get(k + PREFETCH_AHEAD) {
                    prefetch(slot_state.as_ptr().wrapping_add(ahead.to_native() as usize));
                }
                match slot_state.get_mut(s.to_native() as usize) {
                    Some(state)
                        if *state != 0 && *state != SEEN && usize::from(*state - 1) == old =>
                    {
                        *state = SEEN
                    }
                    _ => {
                        return Err(
                            "a wheel entry for a free slot, in the wrong wheel, or listed twice",
                        )
                    }
                }
                linked += 1;
            }
        }
        if linked != records.len() as u64 {
            return Err("a session in no wheel");
        }
        // One index entry per key: a chain head or a sub-session whose key another one has too
        // would be unreachable, and ending it would not find it.
        let (table, arena, key) = (&self.table, &self.arena, &mut self.keybuf);
        let unique = pending.insert_all(&mut self.index, |indexed, new| {
            let (a, b) = (table.get(indexed), table.get(new));
            key.clear();
            key.resize(b.key_len as usize, 0);
            arena.read(b.data, 0, key);
            a.profile == b.profile && a.key_len == b.key_len && arena.starts_with(a.data, key)
        });
        if !unique {
            return Err("two sessions of one key outside a chain");
        }
        Ok(ExactImport {
            sessions: tops,
            sub_sessions: subs,
        })
    }

    /// Exact mode, once the import checked out: the archive's free list (in its order) and the
    /// wheels as archived.
    fn finish_exact(&mut self, rules: &Rules, body: &ArchivedSnapshotBody, map: &[Option<u8>]) {
        // Freed in reverse, so the free list pops in the archived order.
        for run in body.free_runs.iter().rev() {
            let (start, len) = (run.start.to_native(), run.len.to_native());
            for s in (start..start + len).rev() {
                self.table.free(s);
            }
        }
        debug_assert_eq!(self.table.live() as usize, body.records.len());
        self.relink_exact(rules, body, map);
    }

    /// Back to the empty engine an exact import started from: every slot and block free, in
    /// their initial order, no index entry, and no session counted. The wheels were not touched
    /// yet.
    fn undo_import(&mut self) {
        self.table.reset();
        self.arena.reset();
        if !self.index.is_empty() {
            self.index.clear();
        }
        self.stats.active_by_profile.fill(0);
    }

    /// Exact mode: relink every wheel bucket as archived, list order included (links push to the
    /// front, so each bucket is linked back to front). A session whose bucket is later than its
    /// deadline under the current rules (a shortened timeout) is moved to its deadline second,
    /// unless it is in the cursor's bucket, where the deadline's second would put it too: an
    /// overdue session a stopped expiry pass put back there (`requeue_expired`) stays in its
    /// place, as it was captured.
    fn relink_exact(&mut self, rules: &Rules, body: &ArchivedSnapshotBody, map: &[Option<u8>]) {
        let mut early = Vec::new();
        for (old, image) in body.profiles.iter().enumerate() {
            if image.parent.to_native() != u32::MAX {
                continue;
            }
            let p = map[old].expect("exact mode maps every profile") as usize;
            let cursor = self.wheels[p].cursor_s();
            let m = i64::from(self.wheels[p].slots_max());
            let slots = image.wheel_slots.as_slice();
            let mut end = slots.len();
            for span in image.wheel_spans.iter().rev() {
                let start = end - span.len.to_native() as usize;
                let second = cursor + (i64::from(span.bucket.to_native()) - cursor).rem_euclid(m);
                for k in (start..end).rev() {
                    if let Some(ahead) = k.checked_sub(PREFETCH_AHEAD) {
                        prefetch(
                            self.table
                                .heads()
                                .as_ptr()
                                .wrapping_add(slots[ahead].to_native() as usize),
                        );
                    }
                    let s = slots[k].to_native();
                    self.wheels[p].link(self.table.heads_mut(), s, second);
                    let due = due_s(self.deadline(rules, s));
                    if due.max(cursor) < second {
                        early.push((p, s, due));
                    }
                }
                end = start;
            }
        }
        for (p, s, due) in early {
            self.wheels[p].relink(self.table.heads_mut(), s, due);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn var_area_walk() {
        // Two values ("a", unset) and one list of one item.
        let area = [1u8, 0, b'a', 0, 0, 1, 1, 0, b'x'];
        assert!(var_area_ok(&area, 2, 1));
        assert!(!var_area_ok(&area[..8], 2, 1));
        assert!(!var_area_ok(&area, 3, 1));
        assert!(!var_area_ok(&[5, 0, b'a'], 1, 0));
    }
}
