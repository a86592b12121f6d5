//! A per-second expiry wheel for one profile clock: which sessions fall due in which second.
//!
//! `slots_max` one-second buckets cover the window `[cursor_s, cursor_s + slots_max - 1]`; second
//! `s` lives in bucket `s mod slots_max`. Each bucket is [`LANES`] intrusive doubly-linked lists
//! threaded through the table's [`Head::wheel_prev`]/[`Head::wheel_next`], a session going to the
//! lane its id hashes to ([`lane_of`]); so the wheel itself is `LANES` `u32`s per second and
//! linking, unlinking and relinking are O(1) with no allocation.
//!
//! Why lanes: walking one list is a chain of dependent cache misses, one per session (the table
//! is far larger than the caches). A drain walks a bucket's lists side by side, so that up to
//! `LANES` of those misses are in flight at once. The order within a second is therefore the
//! lanes' entries taken in turn. The lane comes from the session id, not the slot: which slot a
//! session gets depends on when earlier sessions ended (a bounded expiry pass ends them later
//! than a full one), its id does not, so the order within a second, and with it the session
//! [`Wheel::earliest`] picks, is the same however the expiry passes were cut.
//!
//! The first entry of a list stores `BUCKET_BIT | list` in `wheel_prev` instead of a slot (as in
//! the kernel's hlist, the back link of the first node names the list head), where `list` is
//! `bucket * LANES + lane`, so an entry can be unlinked knowing only its slot. That needs slots
//! below 2^31, which the table guarantees for any configured size (`max_sessions <= 2^30`) and
//! `link` asserts, and lists below 2^31 (`slots_max * LANES`, which `new` asserts).
//!
//! Deadlines outside the window are clamped into it: one already past fires at the next drain, one
//! beyond the horizon sits in the last second of the window and the engine re-links it when it
//! fires early (it must check each drained session's real deadline anyway).
//!
//! Invariants:
//! - A slot is linked in at most one wheel, iff its [`FLAG_WHEEL_LINKED`] bit is set; `len` counts
//!   the slots linked in this wheel.
//! - Every linked slot is in the list of its lane in the bucket of a second within the window.
//! - Unlinked and drained slots have their linked bit clear; their links mean nothing.

use super::table::{Head, FLAG_FREE, FLAG_WHEEL_LINKED, NIL};

/// Marks a `wheel_prev` that names a list rather than a slot.
const BUCKET_BIT: u32 = 1 << 31;

/// Lists per bucket (a power of two): the misses a drain overlaps.
pub const LANES: u32 = 8;
const _: () = assert!(LANES.is_power_of_two());

/// The lane of the session with id `id` within any bucket: the top bits of a multiplicative
/// hash, since an id's low bits may not vary (a quiet live shard's sequence follows the clock in
/// steps of eight).
#[inline(always)]
pub fn lane_of(id: u64) -> u32 {
    (id.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - LANES.trailing_zeros())) as u32
}

#[derive(Clone)]
pub struct Wheel {
    /// First slot linked in each list (`bucket * LANES + lane`), `NIL` if none.
    lists: Box<[u32]>,
    /// The next second not yet drained: the start of the window.
    cursor_s: i64,
    len: u32,
}

impl Wheel {
    pub fn new(slots_max: u32, start_s: i64) -> Wheel {
        assert!(slots_max > 0);
        assert!(slots_max < BUCKET_BIT / LANES);
        // Keeps `cursor_s + slots_max` and `until_s + 1` from overflowing.
        assert!(
            start_s > i64::MIN / 2 && start_s < i64::MAX / 2,
            "start_s {start_s}"
        );
        Wheel {
            lists: vec![NIL; (slots_max * LANES) as usize].into_boxed_slice(),
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
        self.lists.len() as u32 / LANES
    }

    /// Link `slot` to fire at second `due_s`. A due second before the cursor fires at the next
    /// drain; one beyond the horizon (cursor + slots_max - 1) is clamped to the horizon (the engine
    /// re-links it when it fires and is not yet due). Asserts the slot is not linked already.
    pub fn link(&mut self, heads: &mut [Head], slot: u32, due_s: i64) {
        assert!(
            slot < BUCKET_BIT,
            "slot {slot} too large for the wheel's back links"
        );
        let list = self.list_of(due_s, &heads[slot as usize]);
        let first = self.lists[list as usize];
        let head = &mut heads[slot as usize];
        debug_assert!(head.flags & FLAG_FREE == 0, "link of free slot {slot}");
        assert!(
            head.flags & FLAG_WHEEL_LINKED == 0,
            "slot {slot} linked twice"
        );
        head.flags |= FLAG_WHEEL_LINKED;
        head.wheel_prev = BUCKET_BIT | list;
        head.wheel_next = first;
        if first != NIL {
            debug_assert_eq!(heads[first as usize].wheel_prev, BUCKET_BIT | list);
            heads[first as usize].wheel_prev = slot;
        }
        self.lists[list as usize] = slot;
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
            let list = prev & !BUCKET_BIT;
            assert_eq!(
                self.lists.get(list as usize).copied(),
                Some(slot),
                "slot {slot} unlinked from a wheel it is not in"
            );
            self.lists[list as usize] = next;
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
    /// linked. O(1). A no-op when the slot is the first of its list in that bucket already; a
    /// slot deeper in that list moves to its front, which changes nothing but the order within
    /// the second.
    ///
    /// The wheel cannot tell in O(1) which bucket a slot deeper in a list is in, and moving it
    /// touches the heads of its two neighbours: a caller that knows the previous due second
    /// should skip the call when it is unchanged.
    pub fn relink(&mut self, heads: &mut [Head], slot: u32, due_s: i64) {
        let head = &heads[slot as usize];
        if head.flags & FLAG_WHEEL_LINKED != 0 {
            let list = self.list_of(due_s, head);
            if head.wheel_prev == BUCKET_BIT | list {
                debug_assert_eq!(self.lists[list as usize], slot);
                return;
            }
            self.unlink(heads, slot);
        }
        self.link(heads, slot, due_s);
    }

    /// Move the cursor back to `until_s` right after a complete drain up to it, so that what is
    /// linked at `until_s` now fires at the next drain (an expiry pass putting back what it did
    /// not reach). Entries linked meanwhile stay where they are: one clamped to the old horizon
    /// shares the bucket of `until_s` and fires early, which the engine handles by re-linking.
    pub fn rewind(&mut self, until_s: i64) {
        assert_eq!(
            self.cursor_s,
            until_s + 1,
            "rewind({until_s}) is only valid right after a drain up to {until_s}"
        );
        self.cursor_s = until_s;
    }

    pub fn is_linked(&self, heads: &[Head], slot: u32) -> bool {
        heads[slot as usize].flags & FLAG_WHEEL_LINKED != 0
    }

    /// Detach the sessions linked in seconds [cursor, until_s], earliest second first (within a
    /// second, the lanes' entries in turn), appending them to `into`, and stop after `max` of
    /// them: the caller handles a bounded number of sessions, whose heads are still in the cache,
    /// instead of all of a second's. The detached entries are no longer linked (their links mean
    /// nothing); the caller may link them again. Returns whether it drained everything up to
    /// `until_s` (the cursor is then `until_s + 1`; a `until_s` before the cursor drains nothing
    /// and leaves it); if not, the cursor is at the second it stopped in, whose bucket keeps the
    /// rest. A range covering the whole wheel is drained in one call whatever `max` is, so that
    /// each bucket is visited once.
    pub fn drain_some_into(
        &mut self,
        heads: &mut [Head],
        until_s: i64,
        max: usize,
        into: &mut Vec<u32>,
    ) -> bool {
        assert!(until_s < i64::MAX / 2, "until_s {until_s}");
        if until_s < self.cursor_s {
            return true;
        }
        let slots_max = self.slots_max();
        let (mut bucket, buckets) = self.drained_buckets(until_s);
        let whole_wheel = buckets == slots_max;
        let max = if whole_wheel { usize::MAX } else { max };
        let mut drained = 0usize;
        let mut stopped_at = None;
        for k in 0..buckets {
            let base = (bucket * LANES) as usize;
            let mut cur = [NIL; LANES as usize];
            cur.copy_from_slice(&self.lists[base..base + LANES as usize]);
            let firsts = cur;
            let mut open = cur.iter().filter(|&&s| s != NIL).count();
            // One entry of each open list a round: the loads of a round do not depend on one
            // another, so their misses overlap.
            'rounds: while open > 0 {
                for c in &mut cur {
                    let slot = *c;
                    if slot == NIL {
                        continue;
                    }
                    if drained == max {
                        break 'rounds;
                    }
                    let head = &mut heads[slot as usize];
                    debug_assert!(head.flags & FLAG_WHEEL_LINKED != 0);
                    *c = head.wheel_next;
                    head.flags &= !FLAG_WHEEL_LINKED;
                    head.wheel_prev = NIL;
                    drained += 1;
                    into.push(slot);
                    if *c == NIL {
                        open -= 1;
                    }
                }
            }
            // What is left of each list becomes the list (a list not walked keeps its front).
            for (lane, (&rest, &first)) in cur.iter().zip(&firsts).enumerate() {
                if rest != first {
                    self.lists[base + lane] = rest;
                    if rest != NIL {
                        heads[rest as usize].wheel_prev = BUCKET_BIT | (base + lane) as u32;
                    }
                }
            }
            if open > 0 {
                stopped_at = Some(k);
                break;
            }
            bucket += 1;
            if bucket == slots_max {
                bucket = 0;
            }
        }
        let drained = drained as u32;
        assert!(drained <= self.len);
        self.len -= drained;
        match stopped_at {
            Some(k) => {
                self.cursor_s += i64::from(k);
                false
            }
            None => {
                debug_assert!(!whole_wheel || self.len == 0);
                self.cursor_s = until_s + 1;
                true
            }
        }
    }

    /// Move the cursor of an empty wheel to `until_s + 1` (as draining up to `until_s` would),
    /// if it is behind.
    pub fn skip_empty_until(&mut self, until_s: i64) {
        assert!(
            self.is_empty(),
            "skip_empty_until on a wheel of len {}",
            self.len
        );
        assert!(until_s < i64::MAX / 2, "until_s {until_s}");
        self.cursor_s = self.cursor_s.max(until_s + 1);
    }

    /// Slot of a linked session with the earliest due second (for on_full = evict_oldest):
    /// scans buckets from the cursor, stops at the first non-empty one. O(slots_max) worst case.
    pub fn earliest(&self, heads: &[Head]) -> Option<u32> {
        if self.len == 0 {
            return None;
        }
        let mut bucket = self.bucket_of(self.cursor_s);
        for _ in 0..self.slots_max() {
            if let Some(&slot) = self.bucket_lists(bucket).iter().find(|&&s| s != NIL) {
                debug_assert!(heads[slot as usize].flags & FLAG_WHEEL_LINKED != 0);
                return Some(slot);
            }
            bucket += 1;
            if bucket == self.slots_max() {
                bucket = 0;
            }
        }
        panic!("wheel of len {} has no linked slot", self.len);
    }

    /// First slot of each list ([`NIL`]: empty), list `bucket * LANES + lane`: with the slots'
    /// links, the whole wheel (what a snapshot stores).
    pub fn lists(&self) -> &[u32] {
        &self.lists
    }

    /// First slot of each of `bucket`'s lists, by lane.
    pub fn bucket_lists(&self, bucket: u32) -> &[u32] {
        &self.lists[(bucket * LANES) as usize..][..LANES as usize]
    }

    /// First slot of each list of the cursor's second (the next to drain), by lane.
    #[cfg(test)]
    pub fn cursor_lists(&self) -> &[u32] {
        self.bucket_lists(self.bucket_of(self.cursor_s))
    }

    /// The slot a `link` of `slot` at `due_s` would put `slot` in front of ([`NIL`] if none):
    /// the one entry besides `slot` whose head that `link` changes.
    pub fn first_at(&self, heads: &[Head], slot: u32, due_s: i64) -> u32 {
        self.lists[self.list_of(due_s, &heads[slot as usize]) as usize]
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

    /// The buckets a drain up to `until_s` would detach from, in its order: `(first, count)`,
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
        self.lists.len() as u64 * std::mem::size_of::<u32>() as u64
    }

    /// The bucket `due_s` lands in after clamping it into the window.
    #[inline]
    fn bucket_of(&self, due_s: i64) -> u32 {
        let slots_max = i64::from(self.slots_max());
        let due_s = due_s.clamp(self.cursor_s, self.cursor_s + slots_max - 1);
        due_s.rem_euclid(slots_max) as u32
    }

    /// The list the session with `head` goes to when linked at `due_s`.
    #[inline]
    fn list_of(&self, due_s: i64, head: &Head) -> u32 {
        self.bucket_of(due_s) * LANES + lane_of(head.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeMap, BTreeSet};

    /// Heads with distinct ids (the lane comes from the id).
    fn heads(n: usize) -> Vec<Head> {
        (0..n)
            .map(|i| Head {
                id: i as u64 + 1,
                ..Head::FRESH
            })
            .collect()
    }

    /// The slots among `heads` whose session is in `lane`.
    fn in_lane(heads: &[Head], lane: u32) -> Vec<u32> {
        (0..heads.len() as u32)
            .filter(|&s| lane_of(heads[s as usize].id) == lane)
            .collect()
    }

    #[test]
    fn ids_spread_over_the_lanes() {
        let mut per_lane = [0u32; LANES as usize];
        // Sequences a quiet live shard hands out, in steps of eight.
        for id in (1..=8 * 8_000u64).step_by(8) {
            per_lane[lane_of(id) as usize] += 1;
        }
        for n in per_lane {
            assert!((800..1_200).contains(&n), "{per_lane:?}");
        }
    }

    /// Drains without a limit, checking that the drain completes and appends.
    fn drain(wheel: &mut Wheel, heads: &mut [Head], until_s: i64) -> Vec<u32> {
        let mut into = vec![7];
        assert!(wheel.drain_some_into(heads, until_s, usize::MAX, &mut into));
        assert_eq!(into[0], 7, "appends");
        into.split_off(1)
    }

    #[test]
    fn a_drain_in_steps_stops_inside_a_second_and_resumes_there() {
        let mut heads = heads(8 * LANES as usize);
        let mut wheel = Wheel::new(8, 0);
        for slot in 0..20 {
            wheel.link(&mut heads, slot, 1 + i64::from(slot % 2));
        }
        let mut got = Vec::new();
        assert!(!wheel.drain_some_into(&mut heads, 3, 7, &mut got));
        assert_eq!((got.len(), wheel.cursor_s(), wheel.len()), (7, 1, 13));
        // The rest of second 1 is still linked, and unlinks from its new list front.
        let front = *wheel.cursor_lists().iter().find(|&&s| s != NIL).unwrap();
        wheel.unlink(&mut heads, front);
        assert!(!wheel.drain_some_into(&mut heads, 3, 7, &mut got));
        assert_eq!(
            wheel.cursor_s(),
            2,
            "second 1 (10 entries, one unlinked) is done"
        );
        assert!(wheel.drain_some_into(&mut heads, 3, 7, &mut got));
        assert_eq!((got.len(), wheel.cursor_s(), wheel.len()), (19, 4, 0));
        assert!(got[..9].iter().all(|s| s % 2 == 0) && got[9..].iter().all(|s| s % 2 == 1));
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
        let mut second = drain(&mut wheel, &mut heads, 108);
        second.sort_unstable();
        assert_eq!(second, vec![0, 3]);
        assert!(!wheel.is_linked(&heads, 0));
        assert_eq!(wheel.earliest(&heads), Some(2));
        assert_eq!(drain(&mut wheel, &mut heads, 109), vec![2]);
        assert!(wheel.is_empty());
        assert_eq!(wheel.earliest(&heads), None);
    }

    #[test]
    fn relink_what_a_drain_detached() {
        let mut heads = heads(8);
        let mut wheel = Wheel::new(4, 0);
        for slot in 0..6 {
            wheel.link(&mut heads, slot, 1);
        }
        let mut seen = 0;
        for slot in drain(&mut wheel, &mut heads, 1) {
            wheel.link(&mut heads, slot, 3);
            seen += 1;
        }
        assert_eq!(seen, 6);
        assert_eq!(wheel.len(), 6);
        assert_eq!(drain(&mut wheel, &mut heads, 1_000).len(), 6);
        assert_eq!(wheel.cursor_s(), 1_001);
    }

    #[test]
    fn relink_to_the_same_list_front_is_a_no_op() {
        let mut heads = heads(8 * LANES as usize);
        let mut wheel = Wheel::new(8, 0);
        let lane0 = in_lane(&heads, 0);
        let (a, b, c) = (lane0[0], lane0[1], in_lane(&heads, 1)[0]);
        wheel.link(&mut heads, a, 3);
        wheel.link(&mut heads, b, 3);
        let before = heads.clone();
        wheel.relink(&mut heads, b, 3);
        assert_eq!(heads, before);
        wheel.relink(&mut heads, a, 3); // deeper in the list: moves to the front
        assert_ne!(heads, before);
        wheel.relink(&mut heads, c, 4); // not linked: links
        assert_eq!(wheel.len(), 3);
        assert_eq!(drain(&mut wheel, &mut heads, 4), vec![a, b, c]);
    }

    #[test]
    fn a_second_drains_its_lanes_in_turn() {
        let mut heads = heads(8 * LANES as usize);
        let mut wheel = Wheel::new(8, 0);
        let (x, y, z) = (in_lane(&heads, 1), in_lane(&heads, 4), in_lane(&heads, 6));
        for slot in [x[0], x[1], x[2], y[0], y[1]] {
            wheel.link(&mut heads, slot, 2);
        }
        wheel.link(&mut heads, z[0], 3);
        wheel.link(&mut heads, z[1], 2);
        assert_eq!(
            drain(&mut wheel, &mut heads, 3),
            vec![x[2], y[1], z[1], x[1], y[0], x[0], z[0]]
        );
        assert!(wheel.is_empty());
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
                        let detached = drain(&mut wheel, &mut heads, until_s);
                        if until_s < cursor_before {
                            prop_assert_eq!(wheel.cursor_s(), cursor_before);
                        } else {
                            prop_assert_eq!(wheel.cursor_s(), until_s + 1);
                        }
                        let mut got = BTreeSet::new();
                        let mut due_last_s = i64::MIN;
                        prop_assert!(detached.len() <= SLOTS as usize, "a slot detached twice");
                        for slot in detached {
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

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Draining in steps of `max` detaches, over its calls, what one drain does, earliest
        /// second first, with the cursor never past a second that still holds entries; what a
        /// step leaves stays linked (its list fronts unlink), and a range covering the whole
        /// wheel goes in one call.
        #[test]
        fn drains_in_steps_detach_what_one_drain_does(
            slots_max in 2u32..10,
            dues in prop::collection::vec(-2i64..14, 0..60),
            until_s in -1i64..16,
            max in 1usize..9,
            unlink_bits in any::<u64>(),
        ) {
            let mut heads = heads(dues.len());
            let mut whole = Wheel::new(slots_max, 0);
            for (slot, &due_s) in dues.iter().enumerate() {
                whole.link(&mut heads, slot as u32, due_s);
            }
            let (mut stepped, mut heads_stepped) = (whole.clone(), heads.clone());
            let mut expected = Vec::new();
            prop_assert!(whole.drain_some_into(&mut heads, until_s, usize::MAX, &mut expected));
            let mut got = Vec::new();
            let mut unlinked = Vec::new();
            let mut calls = 0u32;
            while !stepped.drain_some_into(&mut heads_stepped, until_s, max, &mut got) {
                calls += 1;
                prop_assert!(calls <= dues.len() as u32, "no progress");
                prop_assert!(until_s - stepped.cursor_s() < i64::from(slots_max) - 1);
                prop_assert!(stepped.cursor_s() <= until_s);
                prop_assert!(stepped.cursor_lists().iter().any(|&s| s != NIL));
                if unlink_bits & (1 << (calls % 64)) != 0 {
                    let front = *stepped.cursor_lists().iter().find(|&&s| s != NIL).unwrap();
                    stepped.unlink(&mut heads_stepped, front);
                    unlinked.push(front);
                }
            }
            prop_assert_eq!(stepped.cursor_s(), whole.cursor_s());
            prop_assert_eq!(stepped.len(), whole.len());
            let mut want: Vec<u32> = expected.iter().copied().filter(|s| !unlinked.contains(s)).collect();
            let mut have = got.clone();
            want.sort_unstable();
            have.sort_unstable();
            prop_assert_eq!(have, want);
            // Earliest second first: the clamped second each slot was linked at.
            let second = |slot: u32| dues[slot as usize].max(0);
            prop_assert!(got.windows(2).all(|w| second(w[0]) <= second(w[1]) || second(w[0]) >= i64::from(slots_max)));
            for slot in 0..dues.len() as u32 {
                prop_assert_eq!(
                    stepped.is_linked(&heads_stepped, slot),
                    whole.is_linked(&heads, slot) && !unlinked.contains(&slot)
                );
            }
        }
    }
}
