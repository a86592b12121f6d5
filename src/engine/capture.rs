//! Snapshot capture: the engine's state at one cut of the event stream, copied into owned
//! buffers ([`Captured`]) that `snapshot.rs` turns into the archive off the shard's executor.
//!
//! A *sliced* capture lets the shard go on processing events while it proceeds:
//! - [`Engine::capture_begin`], at a cut between events, records what is global (clocks, wheel
//!   cursors and bucket heads, the id sequence, the profiles) and marks every slot *pending* in
//!   the table's bitmap (`table.rs`: sized at construction, no allocation per event), which also
//!   starts following the free list as it was at the cut.
//! - [`Engine::capture_step`] records a budget of work: first the rest of the cut's free list
//!   (clearing the marks of free slots), then the pending sessions in slot order, each top-level
//!   session as a *unit* with its sub-sessions in the order of its sub-session slots.
//! - Copy on write: before the engine changes any head or payload of a pending slot (an event
//!   applied, an end by rule, expiry, eviction or max_duration, a merge, a sub-session created or
//!   ended under it, a key-chain or wheel relink that touches it as a neighbour, a free), it calls
//!   `State::cow`, which captures the slot's whole unit first. A sub-session's change captures its
//!   parent's unit. `cow` is one predictable branch while no capture is in progress.
//! - Sessions created after the cut are not pending (their slot left the free list after the cut,
//!   which clears its mark): their events follow the cut in the log, which replays them.
//! - [`Engine::capture_take`] once nothing is pending: the buffers and the cut's globals, owned.
//!
//! Invariants while a capture is in progress: a pending slot is unchanged since the cut; every
//! slot live at the cut is pending or has its unit (as at the cut) in the buffers, exactly once;
//! a unit's slots are pending together or captured together. Hence the buffers end up holding
//! every session live at the cut, as it was at the cut, and the serialised archive is the one a
//! capture of the whole engine at the cut would have produced, byte for byte.
//!
//! [`Engine::capture_all`] captures the whole engine in one call (`Engine::write_snapshot`,
//! `SnapshotWriter::begin`, `write_file`: tests and tools): the same unit capture and the same
//! serialisation, without marks.
//!
//! The buffers hold a copy of every captured session (a 56-byte record and its payload), about
//! the size of the archive; they are reserved at `capture_begin` for the sessions live at the cut
//! (so a step never reallocates) and handed back with each [`Captured`] for reuse.

use super::arena::Arena;
use super::rules::{Layout, Rules};
use super::snapshot::profile_descriptors;
use super::table::{Head, Run, Table, NIL};
use super::{payload, Engine, State, FLAG_SUB};

/// One captured record: its head as at the cut (wheel links included), slot and payload length.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CapRecord {
    pub head: Head,
    pub slot: u32,
    pub len: u32,
}

/// One top-level profile's wheel and clock at the cut.
#[derive(Debug, Default)]
pub(crate) struct WheelCut {
    pub cursor_s: i64,
    /// First slot of each list (`Wheel::lists`).
    pub lists: Vec<u32>,
    pub max_ts: i64,
    pub wall_last: i64,
}

/// Buffers a capture fills; a [`Captured`] hands them back for the next capture.
#[derive(Debug, Default)]
pub struct CaptureBuffers {
    /// Records in capture order, unit by unit.
    pub(crate) records: Vec<CapRecord>,
    /// Their payloads, back to back in the same order.
    pub(crate) payload: Vec<u8>,
    /// The table's free list at the cut.
    pub(crate) free_runs: Vec<Run>,
    /// One per top-level profile at the cut.
    pub(crate) wheels: Vec<WheelCut>,
}

impl CaptureBuffers {
    /// Bytes the buffers hold reserved.
    pub fn bytes_reserved(&self) -> u64 {
        (self.records.capacity() * std::mem::size_of::<CapRecord>()
            + self.payload.capacity()
            + self.free_runs.capacity() * std::mem::size_of::<Run>()
            + self
                .wheels
                .iter()
                .map(|w| 4 * w.lists.capacity())
                .sum::<usize>()) as u64
    }
}

/// What is global at the cut, besides the wheels.
#[derive(Debug)]
pub(crate) struct CutGlobals {
    pub table_capacity: u32,
    pub slots_max: u32,
    pub id_seq: u64,
    /// (name, descriptor, parent record profile or `u32::MAX`) per record profile.
    pub profiles: Vec<(String, String, u32)>,
    /// The configuration text of the rules at the cut ([`super::rules::Rules::source`]).
    pub config: std::sync::Arc<str>,
}

/// A complete capture: every session live at the cut and the cut's globals, independent of the
/// engine (it can move to another thread and be serialised there, see `snapshot.rs`).
#[derive(Debug)]
pub struct Captured {
    pub(crate) bufs: CaptureBuffers,
    pub(crate) globals: CutGlobals,
    /// Units captured by copy on write (before a change) rather than by a slice's sweep.
    copied_on_write: u64,
}

impl Captured {
    /// The buffers, for the next capture.
    pub fn into_buffers(self) -> CaptureBuffers {
        self.bufs
    }

    /// The configuration text of the rules at the cut: a snapshot file keeps it beside the
    /// body, for a restart whose profiles changed (`Engine::restore_from_with`).
    pub fn config(&self) -> &std::sync::Arc<str> {
        &self.globals.config
    }

    /// Top-level sessions the engine copied before changing them (the rest were swept).
    pub fn copied_on_write(&self) -> u64 {
        self.copied_on_write
    }

    /// Top-level sessions captured.
    pub fn sessions(&self) -> u64 {
        self.bufs
            .records
            .iter()
            .filter(|r| r.head.flags & FLAG_SUB == 0)
            .count() as u64
    }
}

/// A capture in progress (inside the engine's state).
#[derive(Debug, Default)]
pub(crate) struct Capture {
    /// Next slot the sweep looks at.
    cursor: u32,
    copied_on_write: u64,
    bufs: CaptureBuffers,
    globals: Option<CutGlobals>,
    /// Per wheel, the last second whose range `cow_drain` walked in this cut.
    drained_through: Vec<i64>,
}

/// Cost, in budget units (roughly one cache miss each), of capturing a record, per payload
/// bytes copied, and of scanning bitmap words.
const RECORD_COST: u32 = 1;
const PAYLOAD_BYTES_PER_UNIT: u32 = 256;
const WORDS_PER_UNIT: usize = 16;

fn reserve_fresh<T>(v: &mut Vec<T>, n: usize) {
    v.clear();
    if v.capacity() < n {
        // A fresh allocation rather than `reserve`: nothing to copy over.
        *v = Vec::with_capacity(n);
    }
}

/// Payload length of a live record.
fn record_len(arena: &Arena, layouts: &[Layout], sub_counters: &[usize], h: &Head) -> u32 {
    let (fixed, var_len_off) = if h.flags & FLAG_SUB != 0 {
        let n = sub_counters[h.profile as usize];
        (4 * n + 2, 4 * n)
    } else {
        let l = &layouts[h.profile as usize];
        (l.fixed_bytes, l.var_len_off)
    };
    let mut b = [0u8; 2];
    arena.read(h.data, h.key_len as usize + var_len_off, &mut b);
    (h.key_len as usize + fixed + usize::from(u16::from_le_bytes(b))) as u32
}

fn push_record(arena: &Arena, bufs: &mut CaptureBuffers, slot: u32, h: &Head, len: u32) {
    assert!(
        bufs.records.len() < bufs.records.capacity(),
        "capture records reserved at the cut"
    );
    bufs.records.push(CapRecord {
        head: *h,
        slot,
        len,
    });
    let len = len as usize;
    let at = bufs.payload.len();
    assert!(
        at + len <= bufs.payload.capacity(),
        "capture payload reserved at the cut"
    );
    match arena.slice(h.data, 0, len) {
        Some(bytes) => bufs.payload.extend_from_slice(bytes),
        None => {
            bufs.payload.resize(at + len, 0);
            arena.read(h.data, 0, &mut bufs.payload[at..]);
        }
    }
}

/// Append the unit of top-level session `top` as it is now: the session, then its sub-sessions in
/// the order of its sub-session slots. Returns (records, payload bytes) appended.
fn capture_unit(
    table: &Table,
    arena: &Arena,
    layouts: &[Layout],
    sub_counters: &[usize],
    bufs: &mut CaptureBuffers,
    top: u32,
) -> (u32, u32) {
    let h = *table.get(top);
    assert!(h.flags & FLAG_SUB == 0, "slot {top} heads no unit");
    let len = record_len(arena, layouts, sub_counters, &h);
    let at = bufs.payload.len();
    push_record(arena, bufs, top, &h, len);
    let mut records = 1;
    let mut bytes = len;
    let layout = &layouts[h.profile as usize];
    let base = at + h.key_len as usize;
    for i in 0..payload::sub_slots(layout) {
        let sub = payload::sub_slot(&bufs.payload, base, layout, i);
        if sub == NIL {
            continue;
        }
        let sh = *table.get(sub);
        assert!(
            sh.flags & FLAG_SUB != 0 && sh.link == top,
            "sub-session {sub} of {top} is not linked to it"
        );
        let len = record_len(arena, layouts, sub_counters, &sh);
        push_record(arena, bufs, sub, &sh, len);
        records += 1;
        bytes += len;
    }
    (records, bytes)
}

/// Record the cut's globals into `bufs` (wheels) and reserve its buffers for what is live now.
fn cut_globals(st: &State, rules: &Rules, bufs: &mut CaptureBuffers) -> CutGlobals {
    let live = st.table.live() as usize;
    let blocks_used = (st.arena.blocks_total() - st.arena.blocks_free()) as usize;
    reserve_fresh(&mut bufs.records, live);
    reserve_fresh(
        &mut bufs.payload,
        blocks_used * st.arena.block_bytes() as usize,
    );
    let top = st.wheels.len();
    bufs.wheels.truncate(top);
    bufs.wheels.resize_with(top, WheelCut::default);
    for (p, w) in bufs.wheels.iter_mut().enumerate() {
        w.cursor_s = st.wheels[p].cursor_s();
        w.lists.clear();
        w.lists.extend_from_slice(st.wheels[p].lists());
        w.max_ts = st.clocks[p].max_ts;
        w.wall_last = st.clocks[p].wall_last;
    }
    CutGlobals {
        table_capacity: st.table.capacity(),
        slots_max: st.wheels.first().map_or(0, |w| w.slots_max()),
        id_seq: st.ids.seq(),
        profiles: profile_descriptors(rules),
        config: rules.source.clone(),
    }
}

impl Engine {
    /// Take a cut now (between events) and start a sliced capture into `bufs` (see the module
    /// doc). Asserts no capture is in progress, and the engine must not be restored into until
    /// the capture is taken or aborted.
    pub fn capture_begin(&mut self, mut bufs: CaptureBuffers) {
        let st = &mut self.st;
        assert!(!st.table.cut_active(), "a capture is already in progress");
        let globals = cut_globals(st, &self.rules, &mut bufs);
        let runs = std::mem::take(&mut bufs.free_runs);
        st.table.cut_begin(runs);
        st.cap = Capture {
            cursor: 0,
            copied_on_write: 0,
            bufs,
            globals: Some(globals),
            drained_through: vec![i64::MIN; st.wheels.len()],
        };
    }

    pub fn capture_in_progress(&self) -> bool {
        self.st.table.cut_active()
    }

    /// Capture about `budget` units of work (one unit is about one session or one cache miss);
    /// true once nothing is pending ([`Engine::capture_take`] then).
    pub fn capture_step(&mut self, budget: u32) -> bool {
        let st = &mut self.st;
        assert!(st.table.cut_active(), "no capture in progress");
        let mut used = 0u32;
        if !st.table.cut_walked() {
            used += st.table.cut_walk(budget);
            if !st.table.cut_walked() {
                return false;
            }
        }
        let cap = st.table.capacity();
        while used < budget && st.cap.cursor < cap {
            let words = WORDS_PER_UNIT * (budget - used) as usize;
            match st.table.next_pending(st.cap.cursor, words) {
                Err(resume) => {
                    used += ((resume - st.cap.cursor) as usize / 64 / WORDS_PER_UNIT) as u32 + 1;
                    st.cap.cursor = resume;
                }
                Ok(s) => {
                    st.cap.cursor = s + 1;
                    let h = st.table.heads()[s as usize];
                    assert!(
                        st.table.is_live(s),
                        "free slot {s} still pending after the free list was walked"
                    );
                    if h.flags & FLAG_SUB != 0 {
                        // Captured with its parent, which is pending too and later in the sweep.
                        continue;
                    }
                    let (records, bytes) = st.cow_unit(s);
                    used += records * RECORD_COST + bytes / PAYLOAD_BYTES_PER_UNIT;
                }
            }
        }
        st.cap.cursor >= cap
    }

    /// The finished capture. Asserts [`Engine::capture_step`] returned true.
    pub fn capture_take(&mut self) -> Captured {
        let st = &mut self.st;
        assert!(st.cap.cursor >= st.table.capacity(), "capture not complete");
        let runs = st.table.cut_end();
        let mut cap = std::mem::take(&mut st.cap);
        cap.bufs.free_runs = runs;
        Captured {
            bufs: cap.bufs,
            globals: cap.globals.expect("a capture in progress has globals"),
            copied_on_write: cap.copied_on_write,
        }
    }

    /// Abandon a capture in progress (if any); returns its buffers for reuse.
    pub fn capture_abort(&mut self) -> CaptureBuffers {
        let st = &mut self.st;
        if !st.table.cut_active() {
            return std::mem::take(&mut st.cap.bufs);
        }
        let runs = st.table.cut_abort();
        let mut cap = std::mem::take(&mut st.cap);
        cap.bufs.free_runs = runs;
        cap.bufs
    }

    /// Capture the whole engine now, in one call: the capture a sliced one run to completion
    /// without events in between produces.
    pub fn capture_all(&self) -> Captured {
        let st = &self.st;
        assert!(
            !st.table.cut_active(),
            "capture_all during a sliced capture"
        );
        let mut bufs = CaptureBuffers::default();
        let globals = cut_globals(st, &self.rules, &mut bufs);
        st.table.free_runs(&mut bufs.free_runs);
        let heads = st.table.heads();
        for s in 0..st.table.capacity() {
            if st.table.is_live(s) && heads[s as usize].flags & FLAG_SUB == 0 {
                capture_unit(
                    &st.table,
                    &st.arena,
                    &st.layouts,
                    &st.sub_counters,
                    &mut bufs,
                    s,
                );
            }
        }
        assert_eq!(
            bufs.records.len(),
            st.table.live() as usize,
            "every live sub-session is listed by its parent"
        );
        Captured {
            bufs,
            globals,
            copied_on_write: 0,
        }
    }
}

impl State {
    /// Copy on write: call before changing the head or payload of slot `s` (any slot, live or
    /// `NIL`): while a capture is in progress and `s` is pending, its unit is captured first.
    #[inline]
    pub(super) fn cow(&mut self, s: u32) {
        if self.table.cut_active() {
            self.cow_cold(s);
        }
    }

    #[cold]
    #[inline(never)]
    fn cow_cold(&mut self, s: u32) {
        if s == NIL || !self.table.is_pending(s) {
            return;
        }
        let h = self.table.heads()[s as usize];
        debug_assert!(self.table.is_live(s), "cow of free slot {s}");
        let top = if h.flags & FLAG_SUB != 0 { h.link } else { s };
        self.cow_unit(top);
        self.cap.copied_on_write += 1;
    }

    /// Capture the pending unit of top-level `top` and clear its marks.
    fn cow_unit(&mut self, top: u32) -> (u32, u32) {
        assert!(self.table.is_pending(top), "unit {top} captured twice");
        let bufs = &mut self.cap.bufs;
        let first = bufs.records.len();
        let (records, bytes) = capture_unit(
            &self.table,
            &self.arena,
            &self.layouts,
            &self.sub_counters,
            bufs,
            top,
        );
        for r in &bufs.records[first..] {
            assert!(
                self.table.is_pending(r.slot),
                "slot {} captured twice",
                r.slot
            );
            self.table.clear_pending(r.slot);
        }
        (records, bytes)
    }

    /// `cow` for every entry a wheel `link` of `s` at `due_s` in wheel `w` changes.
    #[inline]
    pub(super) fn cow_link(&mut self, w: usize, s: u32, due_s: i64) {
        if self.table.cut_active() {
            self.cow_cold(s);
            let first = self.wheels[w].first_at(self.table.heads(), s, due_s);
            self.cow_cold(first);
        }
    }

    /// `cow` for every entry an `unlink` of `s` changes (also covers `relink`'s unlink half).
    #[inline]
    pub(super) fn cow_unlink(&mut self, s: u32) {
        if self.table.cut_active() {
            self.cow_cold(s);
            for n in super::wheel::Wheel::neighbours(self.table.heads(), s) {
                self.cow_cold(n);
            }
        }
    }

    /// `cow` for every entry a drain of wheel `w` up to `until_s` detaches, and for those a
    /// drain that stops inside a second makes the front of their list.
    #[inline]
    pub(super) fn cow_drain(&mut self, w: usize, until_s: i64) {
        if !self.table.cut_active() {
            return;
        }
        // Within a range walked before in this cut, a drain changes only heads captured then or
        // linked into the range since (each captured by `cow_link`): a full table's expiry,
        // which drains one session at a time, does not walk the range again for every event.
        if self
            .cap
            .drained_through
            .get(w)
            .is_some_and(|&through| until_s <= through)
        {
            return;
        }
        let (first, n) = self.wheels[w].drained_buckets(until_s);
        let slots_max = self.wheels[w].slots_max();
        for k in 0..n {
            let b = (first + k) % slots_max;
            for lane in 0..super::wheel::LANES {
                let mut s = self.wheels[w].bucket_lists(b)[lane as usize];
                while s != NIL {
                    // Capturing reads heads, never changes them: the link stays valid.
                    let next = self.table.heads()[s as usize].wheel_next;
                    self.cow_cold(s);
                    s = next;
                }
            }
        }
        if let Some(through) = self.cap.drained_through.get_mut(w) {
            *through = until_s;
        }
    }
}
