//! A per-second expiry wheel for one profile clock: which sessions fall due in which second.
//!
//! `slots_max` one-second buckets cover the window `[cursor_s, cursor_s + slots_max - 1]`; second
//! `s` lives in bucket `s mod slots_max`. Each bucket is an intrusive doubly-linked list threaded
//! through the table's [`Head::wheel_prev`]/[`Head::wheel_next`], so the wheel itself is only one
//! `u32` per second and linking, unlinking and relinking are O(1) with no allocation.
//!
//! The first entry of a bucket stores `BUCKET_BIT | bucket` in `wheel_prev` instead of a slot (as
//! in the kernel's hlist, the back link of the first node names the list head), so an entry can be
//! unlinked knowing only its slot. That needs slots below 2^31, which the table guarantees for
//! any configured size (`max_sessions <= 2^30`) and `link` asserts.
//!
//! Deadlines outside the window are clamped into it: one already past fires at the next drain, one
//! beyond the horizon sits in the last second of the window and the engine re-links it when it
//! fires early (it must check each drained session's real deadline anyway).
//!
//! Invariants:
//! - A slot is linked in at most one wheel, iff its [`FLAG_WHEEL_LINKED`] bit is set; `len` counts
//!   the slots linked in this wheel.
//! - Every linked slot is in the bucket of a second within the window.
//! - Unlinked and drained slots have their linked bit clear; their links mean nothing.

use super::table::{Head, FLAG_FREE, FLAG_WHEEL_LINKED, NIL};

/// Marks a `wheel_prev` that names a bucket rather than a slot.
const BUCKET_BIT: u32 = 1 << 31;

#[derive(Clone)]
pub struct Wheel {
    /// First slot linked in each bucket, `NIL` if none.
    buckets: Box<[u32]>,
    /// The next second not yet drained: the start of the window.
    cursor_s: i64,
    len: u32,
}

impl Wheel {
    pub fn new(slots_max: u32, start_s: i64) -> Wheel {
        assert!(slots_max > 0);
        assert!(slots_max < BUCKET_BIT);
        // Keeps `cursor_s + slots_max` and `until_s + 1` from overflowing.
        assert!(
            start_s > i64::MIN / 2 && start_s < i64::MAX / 2,
            "start_s {start_s}"
        );
        Wheel {
            buckets: vec![NIL; slots_max as usize].into_boxed_slice(),
            cursor_s: start_s,
            len: 0,
        }
    }

    pub fn cursor_s(&self) -> i64 {
        self.cursor_s
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn slots_max(&self) -> u32 {
        self.buckets.len() as u32
    }

    /// Link `slot` to fire at second `due_s`. A due second before the cursor fires at the next
    /// drain; one beyond the horizon (cursor + slots_max - 1) is clamped to the horizon (the engine
    /// re-links it when it fires and is not yet due). Asserts the slot is not linked already.
    pub fn link(&mut self, heads: &mut [Head], slot: u32, due_s: i64) {
        assert!(
            slot < BUCKET_BIT,
            "slot {slot} too large for the wheel's back links"
        );
        let bucket = self.bucket_of(due_s);
        let first = self.buckets[bucket as usize];
        let head = &mut heads[slot as usize];
        debug_assert!(head.flags & FLAG_FREE == 0, "link of free slot {slot}");
        assert!(
            head.flags & FLAG_WHEEL_LINKED == 0,
            "slot {slot} linked twice"
        );
        head.flags |= FLAG_WHEEL_LINKED;
        head.wheel_prev = BUCKET_BIT | bucket;
        head.wheel_next = first;
        if first != NIL {
            debug_assert_eq!(heads[first as usize].wheel_prev, BUCKET_BIT | bucket);
            heads[first as usize].wheel_prev = slot;
        }
        self.buckets[bucket as usize] = slot;
        self.len += 1;
    }

    /// Asserts the slot is linked (in this wheel, as far as a debug build can tell).
    pub fn unlink(&mut self, heads: &mut [Head], slot: u32) {
        let head = &mut heads[slot as usize];
        assert!(
            head.flags & FLAG_WHEEL_LINKED != 0,
            "unlink of unlinked slot {slot}"
        );
        let prev = head.wheel_prev;
        let next = head.wheel_next;
        head.flags &= !FLAG_WHEEL_LINKED;
        head.wheel_prev = NIL;
        head.wheel_next = NIL;
        if prev & BUCKET_BIT != 0 {
            let bucket = prev & !BUCKET_BIT;
            assert_eq!(
                self.buckets[bucket as usize], slot,
                "slot {slot} unlinked from a wheel it is not in"
            );
            self.buckets[bucket as usize] = next;
        } else {
            debug_assert_eq!(heads[prev as usize].wheel_next, slot);
            heads[prev as usize].wheel_next = next;
        }
        if next != NIL {
            debug_assert_eq!(heads[next as usize].wheel_prev, slot);
            heads[next as usize].wheel_prev = prev;
        }
        debug_assert!(self.len > 0);
        self.len -= 1;
    }

    /// Moves `slot` to the bucket of `due_s` (clamped as in `link`), or links it if it is not
    /// linked. O(1). A no-op when the slot is the first of that bucket already; a slot deeper in
    /// that bucket moves to its front, which changes nothing but the order within the second.
    ///
    /// The wheel cannot tell in O(1) which bucket a slot deeper in a list is in, and moving it
    /// touches the heads of its two neighbours: a caller that knows the previous due second
    /// should skip the call when it is unchanged.
    pub fn relink(&mut self, heads: &mut [Head], slot: u32, due_s: i64) {
        let head = &heads[slot as usize];
        if head.flags & FLAG_WHEEL_LINKED != 0 {
            if head.wheel_prev == BUCKET_BIT | self.bucket_of(due_s) {
                debug_assert_eq!(self.buckets[self.bucket_of(due_s) as usize], slot);
                return;
            }
            self.unlink(heads, slot);
        }
        self.link(heads, slot, due_s);
    }

    /// Move the cursor back to `until_s` right after `drain_until(until_s)`, so that what is
    /// linked at `until_s` now fires at the next drain (an expiry pass putting back what it did
    /// not reach). Entries linked meanwhile stay where they are: one clamped to the old horizon
    /// shares the bucket of `until_s` and fires early, which the engine handles by re-linking.
    pub fn rewind(&mut self, until_s: i64) {
        assert_eq!(
            self.cursor_s,
            until_s + 1,
            "rewind({until_s}) is only valid right after drain_until({until_s})"
        );
        self.cursor_s = until_s;
    }

    pub fn is_linked(&self, heads: &[Head], slot: u32) -> bool {
        heads[slot as usize].flags & FLAG_WHEEL_LINKED != 0
    }

    /// Detach and return every session linked in seconds [cursor, until_s], as a list threaded
    /// through `wheel_next` (walk it with [`Wheel::next_detached`]), earliest second first;
    /// advances the cursor to until_s + 1. The detached entries are no longer linked. Returns
    /// [`NIL`] (and leaves the cursor) when until_s is before the cursor. Touches at most
    /// `slots_max` buckets, however far until_s jumps.
    ///
    /// The caller may link the detached entries again while walking, but linking overwrites
    /// `wheel_next`: read `next_detached` of an entry before re-linking it.
    pub fn drain_until(&mut self, heads: &mut [Head], until_s: i64) -> u32 {
        self.drain(heads, until_s, |_| {})
    }

    /// [`Wheel::drain_until`] that also appends each detached entry to `into`, earliest second
    /// first, in the same walk: the entries are scattered over the table, so walking the
    /// detached list again would miss the cache on every entry a second time.
    pub fn drain_until_into(&mut self, heads: &mut [Head], until_s: i64, into: &mut Vec<u32>) {
        self.drain(heads, until_s, |slot| into.push(slot));
    }

    #[inline(always)]
    fn drain(&mut self, heads: &mut [Head], until_s: i64, mut visit: impl FnMut(u32)) -> u32 {
        assert!(until_s < i64::MAX / 2, "until_s {until_s}");
        if until_s < self.cursor_s {
            return NIL;
        }
        let slots_max = self.slots_max();
        let seconds = (until_s - self.cursor_s).saturating_add(1);
        let buckets = seconds.min(i64::from(slots_max)) as u32;
        let mut bucket = self.bucket_of(self.cursor_s);
        let mut first = NIL;
        let mut tail = NIL;
        let mut drained = 0u32;
        for _ in 0..buckets {
            let mut slot = self.buckets[bucket as usize];
            self.buckets[bucket as usize] = NIL;
            if slot != NIL {
                if tail == NIL {
                    first = slot;
                } else {
                    heads[tail as usize].wheel_next = slot;
                }
                while slot != NIL {
                    let head = &mut heads[slot as usize];
                    debug_assert!(head.flags & FLAG_WHEEL_LINKED != 0);
                    head.flags &= !FLAG_WHEEL_LINKED;
                    head.wheel_prev = NIL;
                    drained += 1;
                    tail = slot;
                    visit(slot);
                    slot = head.wheel_next;
                }
            }
            bucket += 1;
            if bucket == slots_max {
                bucket = 0;
            }
        }
        assert!(drained <= self.len);
        self.len -= drained;
        debug_assert!(seconds < i64::from(slots_max) || self.len == 0);
        self.cursor_s = until_s + 1;
        first
    }

    /// The entry after `slot` on a list returned by [`Wheel::drain_until`], `NIL` at the end.
    pub fn next_detached(heads: &[Head], slot: u32) -> u32 {
        let head = &heads[slot as usize];
        debug_assert!(
            head.flags & FLAG_WHEEL_LINKED == 0,
            "slot {slot} is linked, not detached"
        );
        head.wheel_next
    }

    /// Slot of the linked session with the earliest due second (for on_full = evict_oldest):
    /// scans buckets from the cursor, stops at the first non-empty one. O(slots_max) worst case.
    pub fn earliest(&self, heads: &[Head]) -> Option<u32> {
        if self.len == 0 {
            return None;
        }
        let slots_max = self.slots_max();
        let mut bucket = self.bucket_of(self.cursor_s);
        for _ in 0..slots_max {
            let slot = self.buckets[bucket as usize];
            if slot != NIL {
                debug_assert!(heads[slot as usize].flags & FLAG_WHEEL_LINKED != 0);
                return Some(slot);
            }
            bucket += 1;
            if bucket == slots_max {
                bucket = 0;
            }
        }
        panic!("wheel of len {} has no linked slot", self.len);
    }

    /// First slot of each bucket ([`NIL`]: empty), by bucket: with the slots' links, the whole
    /// wheel (what a snapshot stores).
    pub fn buckets(&self) -> &[u32] {
        &self.buckets
    }

    /// The slot a `link` at `due_s` would put `slot` in front of ([`NIL`] if none): the one entry
    /// besides `slot` whose head that `link` changes.
    pub fn first_at(&self, due_s: i64) -> u32 {
        self.buckets[self.bucket_of(due_s) as usize]
    }

    /// The linked slots whose heads an `unlink` of `slot` changes besides its own: its previous
    /// and next entries ([`NIL`] where there is none, or when `slot` is not linked).
    pub fn neighbours(heads: &[Head], slot: u32) -> [u32; 2] {
        let h = &heads[slot as usize];
        if h.flags & FLAG_WHEEL_LINKED == 0 {
            return [NIL, NIL];
        }
        let prev = if h.wheel_prev & BUCKET_BIT != 0 {
            NIL
        } else {
            h.wheel_prev
        };
        [prev, h.wheel_next]
    }

    /// The buckets `drain_until(until_s)` would detach, in the order it would: `(first, count)`,
    /// bucket indices `first, first + 1, ...` modulo `slots_max`.
    pub fn drained_buckets(&self, until_s: i64) -> (u32, u32) {
        if until_s < self.cursor_s {
            return (0, 0);
        }
        let seconds = (until_s - self.cursor_s).saturating_add(1);
        let n = seconds.min(i64::from(self.slots_max())) as u32;
        (self.bucket_of(self.cursor_s), n)
    }

    pub fn bytes_reserved(&self) -> u64 {
        self.buckets.len() as u64 * std::mem::size_of::<u32>() as u64
    }

    /// The bucket `due_s` lands in after clamping it into the window.
    #[inline]
    fn bucket_of(&self, due_s: i64) -> u32 {
        let slots_max = i64::from(self.slots_max());
        let due_s = due_s.clamp(self.cursor_s, self.cursor_s + slots_max - 1);
        due_s.rem_euclid(slots_max) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn heads(n: usize) -> Vec<Head> {
        vec![Head::FRESH; n]
    }

    /// Drains by both `drain_until` (the list walked) and `drain_until_into`, on copies, and
    /// checks they detach the same entries in the same order and leave the same state.
    fn drain(wheel: &mut Wheel, heads: &mut [Head], until_s: i64) -> Vec<u32> {
        let (mut wheel_into, mut heads_into) = (wheel.clone(), heads.to_vec());
        let mut into = vec![7];
        wheel_into.drain_until_into(&mut heads_into, until_s, &mut into);
        let mut out = Vec::new();
        let mut slot = wheel.drain_until(heads, until_s);
        while slot != NIL {
            out.push(slot);
            slot = Wheel::next_detached(heads, slot);
        }
        assert_eq!(into[0], 7, "appends");
        assert_eq!(into[1..], out[..]);
        assert_eq!(heads_into, heads);
        assert_eq!(wheel_into.len(), wheel.len());
        assert_eq!(wheel_into.cursor_s(), wheel.cursor_s());
        out
    }

    #[test]
    fn drains_in_due_order_with_clamping() {
        let mut heads = heads(8);
        let mut wheel = Wheel::new(10, 100);
        wheel.link(&mut heads, 0, 105);
        wheel.link(&mut heads, 1, 50); // past: fires at the next drain
        wheel.link(&mut heads, 2, 1_000); // beyond the horizon: clamped to 109
        wheel.link(&mut heads, 3, 105);
        assert_eq!(wheel.len(), 4);
        assert_eq!(wheel.earliest(&heads), Some(1));
        assert_eq!(drain(&mut wheel, &mut heads, 99), Vec::<u32>::new());
        assert_eq!(wheel.cursor_s(), 100);
        assert_eq!(drain(&mut wheel, &mut heads, 104), vec![1]);
        assert_eq!(wheel.cursor_s(), 105);
        assert_eq!(drain(&mut wheel, &mut heads, 108), vec![3, 0]);
        assert!(!wheel.is_linked(&heads, 0));
        assert_eq!(wheel.earliest(&heads), Some(2));
        assert_eq!(drain(&mut wheel, &mut heads, 109), vec![2]);
        assert!(wheel.is_empty());
        assert_eq!(wheel.earliest(&heads), None);
    }

    #[test]
    fn relink_while_walking_the_detached_list() {
        let mut heads = heads(8);
        let mut wheel = Wheel::new(4, 0);
        for slot in 0..6 {
            wheel.link(&mut heads, slot, 1);
        }
        let mut slot = wheel.drain_until(&mut heads, 1);
        let mut seen = 0;
        while slot != NIL {
            let next = Wheel::next_detached(&heads, slot);
            wheel.link(&mut heads, slot, 3);
            seen += 1;
            slot = next;
        }
        assert_eq!(seen, 6);
        assert_eq!(wheel.len(), 6);
        assert_eq!(drain(&mut wheel, &mut heads, 1_000).len(), 6);
        assert_eq!(wheel.cursor_s(), 1_001);
    }

    #[test]
    fn relink_to_the_same_bucket_front_is_a_no_op() {
        let mut heads = heads(4);
        let mut wheel = Wheel::new(8, 0);
        wheel.link(&mut heads, 0, 3);
        wheel.link(&mut heads, 1, 3);
        let before = heads.clone();
        wheel.relink(&mut heads, 1, 3);
        assert_eq!(heads, before);
        wheel.relink(&mut heads, 0, 3); // deeper in the bucket: moves to the front
        wheel.relink(&mut heads, 2, 4); // not linked: links
        assert_eq!(wheel.len(), 3);
        assert_eq!(drain(&mut wheel, &mut heads, 4), vec![0, 1, 2]);
    }

    #[test]
    #[should_panic(expected = "not in")]
    fn unlink_from_the_wrong_wheel_panics() {
        let mut heads = heads(2);
        let mut a = Wheel::new(8, 0);
        let mut b = Wheel::new(8, 0);
        a.link(&mut heads, 0, 3);
        b.unlink(&mut heads, 0);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Link(u32, i64),
        Unlink(u32),
        Relink(u32, i64),
        Drain(i64, u32),
        Earliest,
    }

    const SLOTS: u32 = 24;

    fn op(slots_max: u32) -> impl Strategy<Value = Op> {
        let due = -3i64..i64::from(slots_max) + 3;
        prop_oneof![
            4 => (0..SLOTS, due.clone()).prop_map(|(s, d)| Op::Link(s, d)),
            2 => (0..SLOTS).prop_map(Op::Unlink),
            3 => (0..SLOTS, due).prop_map(|(s, d)| Op::Relink(s, d)),
            2 => (prop_oneof![4 => -2i64..4, 1 => 0i64..3 * i64::from(slots_max)], any::<u32>())
                .prop_map(|(a, r)| Op::Drain(a, r)),
            1 => Just(Op::Earliest),
        ]
    }

    fn case() -> impl Strategy<Value = (u32, i64, Vec<Op>)> {
        (1u32..12, -20i64..20).prop_flat_map(|(slots_max, start_s)| {
            (
                Just(slots_max),
                Just(start_s),
                prop::collection::vec(op(slots_max), 0..200),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Against a `BTreeMap<slot, due_s>` holding each linked slot's clamped due second: what
        /// each drain returns (and in which second order), `len`, `is_linked` and `earliest`.
        /// Drains re-link some of what they return while walking, as the engine does.
        #[test]
        fn matches_model((slots_max, start_s, ops) in case()) {
            let mut heads = heads(SLOTS as usize);
            let mut wheel = Wheel::new(slots_max, start_s);
            let mut model: BTreeMap<u32, i64> = BTreeMap::new();
            let clamp = |wheel: &Wheel, due_s: i64| {
                due_s.clamp(wheel.cursor_s(), wheel.cursor_s() + i64::from(slots_max) - 1)
            };
            for op in ops {
                match op {
                    Op::Link(slot, offset_s) if !model.contains_key(&slot) => {
                        let due_s = wheel.cursor_s() + offset_s;
                        model.insert(slot, clamp(&wheel, due_s));
                        wheel.link(&mut heads, slot, due_s);
                    }
                    Op::Unlink(slot) if model.contains_key(&slot) => {
                        model.remove(&slot);
                        wheel.unlink(&mut heads, slot);
                    }
                    Op::Relink(slot, offset_s) => {
                        let due_s = wheel.cursor_s() + offset_s;
                        model.insert(slot, clamp(&wheel, due_s));
                        wheel.relink(&mut heads, slot, due_s);
                    }
                    Op::Drain(advance_s, relink_bits) => {
                        let until_s = wheel.cursor_s() - 1 + advance_s;
                        let cursor_before = wheel.cursor_s();
                        let expected: BTreeSet<u32> = model
                            .iter()
                            .filter(|(_, &due_s)| due_s <= until_s)
                            .map(|(&slot, _)| slot)
                            .collect();
                        let dues: BTreeMap<u32, i64> = model.clone();
                        model.retain(|_, due_s| *due_s > until_s);
                        let mut slot = wheel.drain_until(&mut heads, until_s);
                        if until_s < cursor_before {
                            prop_assert_eq!(wheel.cursor_s(), cursor_before);
                        } else {
                            prop_assert_eq!(wheel.cursor_s(), until_s + 1);
                        }
                        let mut got = BTreeSet::new();
                        let mut due_last_s = i64::MIN;
                        let mut walked = 0;
                        while slot != NIL {
                            walked += 1;
                            prop_assert!(walked <= SLOTS, "detached list loops");
                            let next = Wheel::next_detached(&heads, slot);
                            prop_assert!(!wheel.is_linked(&heads, slot));
                            prop_assert!(got.insert(slot));
                            // Earliest second first.
                            prop_assert!(dues[&slot] >= due_last_s);
                            due_last_s = dues[&slot];
                            if relink_bits & (1 << (slot % 32)) != 0 {
                                let due_s = wheel.cursor_s() + i64::from(slot % 5) - 1;
                                model.insert(slot, clamp(&wheel, due_s));
                                wheel.link(&mut heads, slot, due_s);
                            }
                            slot = next;
                        }
                        prop_assert_eq!(got, expected);
                    }
                    Op::Earliest => {
                        let earliest_s = model.values().min().copied();
                        let got = wheel.earliest(&heads).map(|slot| model[&slot]);
                        prop_assert_eq!(got, earliest_s);
                    }
                    _ => {}
                }
                prop_assert_eq!(wheel.len(), model.len() as u32);
                for slot in 0..SLOTS {
                    prop_assert_eq!(wheel.is_linked(&heads, slot), model.contains_key(&slot));
                }
            }
        }
    }
}
