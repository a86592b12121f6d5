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
//! in a wheel bucket later than its new deadline is moved forward.
//!
//! Sessions whose deadline passed while the process was down are ordinary wheel entries at or
//! before their deadline second: the first `advance(Clock::Wall(now))` drains and ends them with
//! their normal reason, once (ending releases the record).

use std::hash::BuildHasher;

use super::payload;
use super::rules::{Layout, Rules};
use super::snapshot::{
    fnv1a64, profile_descriptors, ArchivedRecordImage, ArchivedSnapshotBody, RestoreReport,
    BODY_FORMAT, PREFETCH_AHEAD, TS_ABS_MAX,
};
use super::table::{Head, FLAGS_ENGINE, NIL};
use super::wheel::Wheel;
use super::{due_s, fnv1a32, Engine, State, FLAG_SUB};
use crate::config::RECORD_BYTES_MAX;

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
        assert!(shards > 0 && shard < shards, "shard {shard} of {shards}");
        assert!(
            !self.st.table.cut_active(),
            "restore during a snapshot capture"
        );
        let rules = &*self.rules;
        let st = &mut self.st;
        let mut report = RestoreReport::default();
        let map = profile_map(rules, body, &mut report);
        let exact = st.exact_plan(rules, body, &map, shards, shard);
        report.exact = exact.is_some();
        if body.format.to_native() != BODY_FORMAT {
            report.invalid = body.records.len() as u64;
            log::warn!(
                "snapshot body format {} is not {BODY_FORMAT}; nothing imported",
                body.format.to_native()
            );
            return report;
        }

        // Clocks: the latest over every archive restored.
        for (old, image) in body.profiles.iter().enumerate() {
            let Some(p) = map[old] else { continue };
            if (p as usize) < st.clocks.len() {
                let c = &mut st.clocks[p as usize];
                c.max_ts = c.max_ts.max(image.max_ts.to_native());
                c.wall_last = c.wall_last.max(image.wall_last.to_native());
                // A wheel starting near the archived cursor avoids re-linking every session at
                // the first drain (far deadlines would otherwise sit clamped at the horizon).
                let cursor = image.wheel_cursor_s.to_native();
                let w = &mut st.wheels[p as usize];
                if exact.is_some() || (w.is_empty() && cursor_ok(cursor) && cursor > w.cursor_s()) {
                    *w = Wheel::new(w.slots_max(), cursor);
                }
            }
        }
        st.ids.resume_after(body.id_seq.to_native());

        if exact.is_some() {
            // Every slot live, records in place, then free the rest in reverse free-list order.
            while st.table.alloc().is_some() {}
        }
        let records = body.records.as_slice();
        let payload = body.payload.as_slice();
        // Fate of the last top-level record, which its sub-sessions share.
        enum Top {
            None,
            Imported { index: u32, slot: u32 },
            OtherShard,
            Dropped,
        }
        let mut top = Top::None;
        // Compact mode inserts into the index (and walks chains) as it goes: keys are hashed a
        // few records ahead and their buckets prefetched. Exact mode collects (hash, slot) and
        // inserts in bucket order at the end, turning random index writes into a sweep.
        let mut ring = [None; PREFETCH_AHEAD];
        if exact.is_none() {
            for (i, r) in records.iter().enumerate().take(PREFETCH_AHEAD) {
                ring[i] = st.prefetch_index(body, &map, r);
            }
        }
        let mut pending = PendingIndex::default();
        if exact.is_some() {
            pending.reserve(records.len());
        }
        for (i, r) in records.iter().enumerate() {
            let is_sub = r.flags & FLAG_SUB != 0;
            if !is_sub {
                top = Top::None;
            } else {
                match top {
                    Top::Imported { index, .. } if r.parent.to_native() == index => {}
                    Top::OtherShard => {
                        report.other_shard += 1;
                        continue;
                    }
                    Top::Dropped => {
                        report.profile_changed += 1;
                        continue;
                    }
                    _ => {
                        report.invalid += 1;
                        continue;
                    }
                }
            }
            // Hash the key of a record a few ahead and prefetch its index bucket, so the index
            // inserts below overlap their cache misses.
            // (The slot of record i in the ring is reused for record i + PREFETCH_AHEAD.)
            let ahead_hash = ring[i % PREFETCH_AHEAD];
            if exact.is_none() {
                if let Some(ahead) = records.get(i + PREFETCH_AHEAD) {
                    ring[i % PREFETCH_AHEAD] = st.prefetch_index(body, &map, ahead);
                }
            }
            let checked = match st.check_record(rules, body, &map, r, exact.is_none()) {
                Ok(c) => c,
                Err(Reject::ProfileChanged) => {
                    report.profile_changed += 1;
                    if !is_sub {
                        top = Top::Dropped;
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
                        top = Top::Dropped;
                    }
                    continue;
                }
            };
            let bytes = &payload[checked.off..checked.off + checked.len];
            let key = &bytes[..r.key_len.to_native() as usize];
            if !is_sub && exact.is_none() && fnv1a32(key) % shards != shard {
                report.other_shard += 1;
                top = Top::OtherShard;
                continue;
            }
            // Where the parent keeps this sub-session: the position of its old slot.
            let parent = match top {
                Top::Imported { index, slot } if is_sub => {
                    let parent_rec = &records[index as usize];
                    let layout = st.layouts[st.table.get(slot).profile as usize];
                    let position = sub_position(body, parent_rec, &layout, r.slot.to_native());
                    match position.filter(|_| key[..8] == parent_rec.id.to_native().to_le_bytes()) {
                        Some(pos) => Some((slot, pos)),
                        None => {
                            report.invalid += 1;
                            continue;
                        }
                    }
                }
                _ => None,
            };
            let slot = match &exact {
                Some(_) => r.slot.to_native(),
                None => match st.table.alloc() {
                    Some(s) => s,
                    None => {
                        report.no_room += 1;
                        if !is_sub {
                            top = Top::Dropped;
                        }
                        continue;
                    }
                },
            };
            let Some(data) = st.arena.alloc(bytes.len()) else {
                debug_assert!(exact.is_none(), "exact mode checked the arena has room");
                st.table.free(slot);
                report.no_room += 1;
                if !is_sub {
                    top = Top::Dropped;
                }
                continue;
            };
            st.arena.write(data, 0, bytes);
            let p = checked.profile;
            let base = key.len();
            if !is_sub {
                // Sub-session slots start empty; imported sub-sessions fill their old positions.
                let layout = st.layouts[p as usize];
                for k in 0..payload::sub_slots(&layout) {
                    st.arena
                        .write(data, base + layout.subs_off + 4 * k, &NIL.to_le_bytes());
                }
            }
            let link = match (&exact, parent) {
                (_, Some((parent_slot, _))) => parent_slot,
                (Some(_), None) => r.link.to_native(),
                (None, None) => NIL,
            };
            *st.table.get_mut(slot) = Head {
                id: r.id.to_native(),
                start_ts: r.start_ts.to_native(),
                last_ts: r.last_ts.to_native(),
                count: r.count.to_native(),
                data,
                link,
                profile: p,
                flags: r.flags & FLAGS_ENGINE,
                key_len: key.len() as u16,
                ..*st.table.get(slot)
            };
            st.stats.active_by_profile[p as usize] += 1;
            if let Some((parent_slot, pos)) = parent {
                let ph = *st.table.get(parent_slot);
                let layout = st.layouts[ph.profile as usize];
                st.arena.write(
                    ph.data,
                    ph.key_len as usize + layout.subs_off + 4 * pos,
                    &slot.to_le_bytes(),
                );
                let hash = st.hasher.hash_one((p, key));
                if exact.is_some() {
                    pending.push(hash, slot);
                } else {
                    st.index.insert(hash, slot);
                    let due = due_s(st.deadline(rules, slot));
                    let wheel = ph.profile as usize;
                    st.wheels[wheel].link(st.table.heads_mut(), slot, due);
                }
                report.sub_sessions += 1;
            } else {
                let hash = match ahead_hash {
                    Some((q, h)) if q == p => h,
                    _ => st.key_hash(p, key),
                };
                debug_assert_eq!(hash, st.key_hash(p, key));
                match &exact {
                    Some(plan) => {
                        if !plan.referenced.get(slot as usize) {
                            pending.push(hash, slot);
                        }
                    }
                    None => {
                        st.chain_insert(p, slot, hash, key);
                        let due = due_s(st.deadline(rules, slot));
                        st.wheels[p as usize].link(st.table.heads_mut(), slot, due);
                    }
                }
                top = Top::Imported {
                    index: i as u32,
                    slot,
                };
                report.sessions += 1;
            }
        }

        if let Some(plan) = &exact {
            for run in body.free_runs.iter().rev() {
                let (start, len) = (run.start.to_native(), run.len.to_native());
                for s in (start..start + len).rev() {
                    st.table.free(s);
                }
            }
            debug_assert_eq!(st.table.live() as usize, records.len());
            pending.insert_all(&mut st.index);
            st.relink_exact(rules, body, &map, plan);
        }
        st.stats.blocks_used = u64::from(st.arena.blocks_total() - st.arena.blocks_free());
        if report.dropped() > 0 || !report.changed_profiles.is_empty() {
            log::warn!(
                "snapshot of shard {} generation {}: {} sessions and {} sub-sessions restored; {} of changed profiles {:?}, {} invalid, {} without room not restored",
                body.shard.to_native(),
                body.generation.to_native(),
                report.sessions,
                report.sub_sessions,
                report.profile_changed,
                report.changed_profiles,
                report.invalid,
                report.no_room
            );
        }
        report
    }
}

// ---------------------------------------------------------------------------------------------
// Import helpers.
// ---------------------------------------------------------------------------------------------

enum Reject {
    ProfileChanged,
    Invalid(&'static str),
}

/// A record that passed validation: its new record profile and its payload range.
struct Checked {
    profile: u8,
    off: usize,
    len: usize,
}

/// What exact mode needs beyond the archive: which slots some older chain member links to (so
/// the others are chain heads, reachable from the index).
struct ExactPlan {
    referenced: Bitmap,
}

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

    /// Counting sort on the top `BUCKET_BITS` bits (within a bucket the order is free: its
    /// entries' homes lie within a few tens of kilobytes of each other), then insert.
    fn insert_all(self, index: &mut super::index::Index) {
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
        for e in sorted {
            index.insert(e & Self::TAG_MASK, e as u32);
        }
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
fn profile_map(
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

    /// Validates one record; `full` also walks the captured values (skipped when exact mode
    /// validated the whole archive already).
    fn check_record(
        &self,
        rules: &Rules,
        body: &ArchivedSnapshotBody,
        map: &[Option<u8>],
        r: &ArchivedRecordImage,
        full: bool,
    ) -> Result<Checked, Reject> {
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
            if full
                && !var_area_ok(
                    &bytes[key_len + l.fixed_bytes..],
                    rule.metadata.len() + rule.state.len(),
                    rule.lists.len(),
                )
            {
                return Err(Reject::Invalid("malformed captured values"));
            }
        }
        Ok(Checked {
            profile: p,
            off,
            len,
        })
    }

    /// Whether `body` can be restored exactly (see the module doc), checking every structural
    /// reference exact mode would follow. Its random accesses go to a byte per slot (wheel
    /// membership) rather than to the archive, so it stays cheap at ten million sessions.
    fn exact_plan(
        &self,
        rules: &Rules,
        body: &ArchivedSnapshotBody,
        map: &[Option<u8>],
        shards: u32,
        shard: u32,
    ) -> Option<ExactPlan> {
        let cap = self.table.capacity();
        let eligible = self.table.live() == 0
            && body.format.to_native() == BODY_FORMAT
            && body.shard.to_native() == shard
            && body.shards.to_native() == shards
            && body.table_capacity.to_native() == cap
            && self
                .wheels
                .first()
                .is_some_and(|w| w.slots_max() == body.slots_max.to_native())
            && map.iter().all(Option::is_some);
        if !eligible {
            return None;
        }
        let why = |reason: &str| {
            log::warn!("snapshot of shard {shard} cannot be restored slot for slot ({reason}); restoring compactly");
        };
        // Exact mode relinks wheels by each image's archived kind and indexes them by its
        // current profile: the two must agree (a forged `parent` would index past the wheels).
        let top = self.layouts.len();
        let kinds_agree = body.profiles.iter().zip(map).all(|(image, p)| {
            let archived_top = image.parent.to_native() == u32::MAX;
            p.is_some_and(|p| (usize::from(p) < top) == archived_top)
        });
        if !kinds_agree {
            why("a profile image of another kind than the rules' profile");
            return None;
        }
        let records = body.records.as_slice();
        if records.len() > cap as usize {
            why("more records than slots");
            return None;
        }
        let payload = body.payload.as_slice();
        let key_of = |r: &ArchivedRecordImage| {
            let off = r.payload_off.to_native() as usize;
            &payload[off..off + r.key_len.to_native() as usize]
        };
        // Per slot: 0 free, 1 + wheel index while live, SEEN once found in a wheel list.
        const SEEN: u8 = u8::MAX;
        let mut slot_state = vec![0u8; cap as usize];
        let mut blocks = 0u64;
        let mut top = u32::MAX;
        let mut tops = 0u64;
        let mut links = 0u64;
        for (i, r) in records.iter().enumerate() {
            let c = match self.check_record(rules, body, map, r, true) {
                Ok(c) => c,
                Err(Reject::Invalid(reason)) => {
                    why(reason);
                    return None;
                }
                Err(Reject::ProfileChanged) => return None,
            };
            let slot = r.slot.to_native();
            if slot >= cap || slot_state[slot as usize] != 0 {
                why("a slot out of range or used twice");
                return None;
            }
            blocks += u64::from(self.arena.blocks_for(c.len));
            let wheel = if r.flags & FLAG_SUB != 0 {
                let Some(parent) = records.get(top as usize) else {
                    why("a sub-session without a parent");
                    return None;
                };
                let layout = &self.layouts[map[parent.profile as usize]? as usize];
                let ok = r.parent.to_native() == top
                    && r.link.to_native() == parent.slot.to_native()
                    && key_of(r)[..8] == parent.id.to_native().to_le_bytes()
                    && sub_position(body, parent, layout, slot).is_some();
                if !ok {
                    why("a sub-session disagrees with its parent");
                    return None;
                }
                body.profiles[r.profile as usize].parent.to_native()
            } else {
                top = i as u32;
                tops += 1;
                links += u64::from(r.link.to_native() != NIL);
                if fnv1a32(key_of(r)) % shards != shard {
                    why("a key another shard owns");
                    return None;
                }
                u32::from(r.profile)
            };
            if wheel >= u32::from(SEEN) - 1 {
                why("a wheel index out of range");
                return None;
            }
            slot_state[slot as usize] = wheel as u8 + 1;
        }
        if blocks > u64::from(self.arena.blocks_free()) {
            why("the arena is smaller");
            return None;
        }
        // Chains: each link names a live, older session of the same profile and key, each slot
        // is linked to at most once, and walking from the heads reaches every session (no cycle).
        let mut referenced = Bitmap::new(cap as usize);
        if links > 0 {
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
                    why("a chain link to a free slot");
                    return None;
                };
                let tr = &records[t as usize];
                if tr.flags & FLAG_SUB != 0
                    || tr.profile != r.profile
                    || key_of(tr) != key_of(r)
                    || tr.start_ts.to_native() > r.start_ts.to_native()
                    || referenced.get(link as usize)
                {
                    why("a malformed key chain");
                    return None;
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
                why("a cycle in a key chain");
                return None;
            }
        }
        // Free list: the complement of the live slots, each free slot once.
        let mut total = records.len() as u64;
        for run in body.free_runs.iter() {
            let (start, len) = (run.start.to_native(), run.len.to_native());
            if start.checked_add(len).is_none_or(|end| end > cap) {
                why("a free run out of range");
                return None;
            }
            for s in &mut slot_state[start as usize..(start + len) as usize] {
                if *s != 0 {
                    why("a slot both free and live, or free twice");
                    return None;
                }
                *s = SEEN;
            }
            total += u64::from(len);
        }
        if total != u64::from(cap) {
            why("the free list does not cover the free slots");
            return None;
        }
        // Wheels: every record in exactly one bucket of its own wheel.
        let slots_max = body.slots_max.to_native();
        let mut linked = 0u64;
        for (old, image) in body.profiles.iter().enumerate() {
            let spans = image.wheel_spans.as_slice();
            let slots = image.wheel_slots.as_slice();
            if image.parent.to_native() != u32::MAX {
                if !spans.is_empty() || !slots.is_empty() {
                    why("a wheel on a sub-session kind");
                    return None;
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
                why("a malformed wheel");
                return None;
            }
            let mut buckets = Bitmap::new(slots_max as usize);
            for span in spans {
                let b = span.bucket.to_native();
                if b >= slots_max || buckets.get(b as usize) {
                    why("a wheel bucket out of range or listed twice");
                    return None;
                }
                buckets.set(b as usize);
            }
            for (k, &s) in slots.iter().enumerate() {
                if let Some(&ahead) = slots.get(k + PREFETCH_AHEAD) {
                    prefetch(slot_state.as_ptr().wrapping_add(ahead.to_native() as usize));
                }
                let state = slot_state.get_mut(s.to_native() as usize);
                match state {
                    Some(state)
                        if *state != 0 && *state != SEEN && usize::from(*state - 1) == old =>
                    {
                        *state = SEEN
                    }
                    _ => {
                        why("a wheel entry for a free slot, in the wrong wheel, or listed twice");
                        return None;
                    }
                }
                linked += 1;
            }
        }
        if linked != records.len() as u64 {
            why("a session in no wheel");
            return None;
        }
        Some(ExactPlan { referenced })
    }

    /// Exact mode: relink every wheel bucket as archived, list order included (links push to the
    /// front, so each bucket is linked back to front). A session whose bucket is later than its
    /// deadline under the current rules (a shortened timeout) is moved to its deadline second.
    fn relink_exact(
        &mut self,
        rules: &Rules,
        body: &ArchivedSnapshotBody,
        map: &[Option<u8>],
        _plan: &ExactPlan,
    ) {
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
                    if due < second {
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
