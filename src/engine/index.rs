//! The per-shard hash index from a session key's 64-bit hash to its table slot.
//!
//! Open addressing with linear probing over a fixed array of 8-byte entries `(tag, slot)`, sized
//! once for `max_entries` at a load factor of at most 7/8 and never resized. The engine hashes
//! (profile, key bytes) itself; the index keeps only the hash's high 32 bits as a tag and asks the
//! engine, through a callback, to confirm a tag match against the full key in the table.
//!
//! The home bucket is `fastrange(tag)`: a function of the stored tag, not of the hash's low bits,
//! so that deletion can recompute the home of every entry it shifts. That is what lets deletion be
//! a backward shift (no tombstones, so probe lengths never degrade over a long run) without storing
//! anything beyond tag and slot. The capacity need not be a power of two, since fastrange maps the
//! tag onto any range.
//!
//! Invariants:
//! - An entry is empty iff its slot is [`NIL`]; a stored slot is never `NIL`.
//! - `len <= len_max < capacity`, so at least one entry is empty and every probe terminates.
//! - Every entry lies on the probe path from its home bucket with no empty entry in between.

use super::table::NIL;

#[derive(Clone, Copy, Debug, PartialEq)]
#[repr(C, align(8))]
struct Entry {
    tag: u32,
    slot: u32,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 8);

const EMPTY: Entry = Entry { tag: 0, slot: NIL };

/// The smallest capacity: below this the 7/8 rule leaves clusters no room to end.
const CAPACITY_MIN: u32 = 16;

pub struct Index {
    entries: Box<[Entry]>,
    len: u32,
    len_max: u32,
    /// Bumped by every change to `entries`: a lookup's answer stays valid while it is unchanged.
    version: u64,
}

impl Index {
    /// Capacity `max(16, ceil(max_entries * 8 / 7))`, allocated and written once.
    pub fn new(max_entries: u32) -> Index {
        Index::try_new(max_entries).expect("memory for the index")
    }

    /// [`Index::new`], or None when the memory cannot be allocated.
    pub fn try_new(max_entries: u32) -> Option<Index> {
        assert!(max_entries > 0);
        assert!(max_entries < NIL);
        let capacity = (u64::from(max_entries) * 8)
            .div_ceil(7)
            .max(u64::from(CAPACITY_MIN));
        assert!(
            capacity <= u64::from(u32::MAX),
            "index of {capacity} entries"
        );
        let capacity = capacity as u32;
        assert!(capacity > max_entries);
        let mut entries = Vec::new();
        entries.try_reserve_exact(capacity as usize).ok()?;
        super::prefetch::advise_huge_pages(entries.as_mut_ptr(), entries.capacity());
        entries.resize(capacity as usize, EMPTY);
        let entries = entries.into_boxed_slice();
        Some(Index {
            entries,
            len: 0,
            len_max: max_entries,
            version: 0,
        })
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> u32 {
        self.entries.len() as u32
    }

    /// Changes whenever an entry does (see [`Index::guess`]).
    #[inline]
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn is_full(&self) -> bool {
        debug_assert!(self.len <= self.len_max);
        self.len == self.len_max
    }

    /// Find the slot whose key matches: iterates entries with equal tag and calls `is_key(slot)` to
    /// confirm.
    #[inline]
    pub fn find(&self, hash: u64, mut is_key: impl FnMut(u32) -> bool) -> Option<u32> {
        let tag = tag_of(hash);
        let mut at = self.home(tag);
        let mut probes = 0u32;
        loop {
            let entry = self.entries[at as usize];
            if entry.slot == NIL {
                return None;
            }
            if entry.tag == tag && is_key(entry.slot) {
                return Some(entry.slot);
            }
            probes += 1;
            debug_assert!(probes < self.capacity(), "index has no empty entry");
            at = self.next(at);
        }
    }

    /// The slot of the first entry whose tag matches `hash`, unconfirmed: a guess for
    /// prefetching the session it likely names (a tag collision only wastes the prefetch).
    /// While [`Index::version`] is what it was, it is also what `find` answers when the
    /// slot is the key's (`find` stops at the same entry), and `NIL` is `find`'s `None`.
    #[inline]
    pub fn guess(&self, hash: u64) -> u32 {
        let tag = tag_of(hash);
        let mut at = self.home(tag);
        loop {
            let entry = self.entries[at as usize];
            if entry.slot == NIL || entry.tag == tag {
                return entry.slot;
            }
            at = self.next(at);
        }
    }

    /// Insert a new entry (caller guarantees the key is absent and !is_full()).
    pub fn insert(&mut self, hash: u64, slot: u32) {
        self.insert_unless(hash, slot, |indexed| {
            debug_assert_ne!(indexed, slot, "insert of an entry already present");
            false
        });
    }

    /// [`Index::insert`], unless an entry of the same tag already names the same key
    /// (`same(slot)` of its slot, asked only on a tag match): then nothing is inserted and the
    /// answer is false. For entries from outside the engine (a restored archive), whose keys are
    /// not known to be unique.
    pub fn insert_unless(
        &mut self,
        hash: u64,
        slot: u32,
        mut same: impl FnMut(u32) -> bool,
    ) -> bool {
        assert_ne!(slot, NIL);
        assert!(self.len < self.len_max, "insert into a full index");
        let tag = tag_of(hash);
        let mut at = self.home(tag);
        loop {
            let entry = self.entries[at as usize];
            if entry.slot == NIL {
                break;
            }
            if entry.tag == tag && same(entry.slot) {
                return false;
            }
            at = self.next(at);
        }
        self.entries[at as usize] = Entry { tag, slot };
        self.len += 1;
        self.version += 1;
        true
    }

    /// Empty every entry (a restore that found an archive unusable starts over).
    pub fn clear(&mut self) {
        self.entries.fill(EMPTY);
        self.len = 0;
        self.version += 1;
    }

    /// Replace the slot stored for an existing key entry (entry identified by hash + current
    /// slot).
    pub fn replace(&mut self, hash: u64, old_slot: u32, new_slot: u32) {
        assert_ne!(new_slot, NIL);
        let at = self.position(hash, old_slot);
        self.entries[at as usize].slot = new_slot;
        self.version += 1;
    }

    /// Remove the entry (hash, slot); asserts it exists. Entries after it in the cluster that may
    /// move closer to their home are shifted back into the hole.
    pub fn remove(&mut self, hash: u64, slot: u32) {
        let mut hole = self.position(hash, slot);
        let mut at = self.next(hole);
        loop {
            let entry = self.entries[at as usize];
            if entry.slot == NIL {
                break;
            }
            // The entry may fill the hole iff its home is not cyclically within (hole, at]: it
            // must stay reachable from its home without crossing an empty entry.
            let home = self.home(entry.tag);
            if self.distance(home, at) >= self.distance(hole, at) {
                self.entries[hole as usize] = entry;
                hole = at;
            }
            at = self.next(at);
        }
        self.entries[hole as usize] = EMPTY;
        self.len -= 1;
        self.version += 1;
    }

    /// Issue a prefetch for the bucket of `hash`, so that a batch can overlap the cache misses of
    /// several lookups.
    #[inline]
    pub fn prefetch(&self, hash: u64) {
        let at = self.home(tag_of(hash));
        let ptr = self.entries[at as usize..].as_ptr();
        #[cfg(target_arch = "x86_64")]
        {
            use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            // SAFETY: prefetch is a hint that never faults, and `ptr` points into `entries`
            // anyway; SSE is part of the x86_64 baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.cast::<i8>()) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = ptr;
    }

    pub fn bytes_reserved(&self) -> u64 {
        self.entries.len() as u64 * std::mem::size_of::<Entry>() as u64
    }

    /// The bucket a tag hashes to: fastrange, i.e. the high part of `tag * capacity`.
    #[inline]
    fn home(&self, tag: u32) -> u32 {
        let at = ((u64::from(tag) * u64::from(self.capacity())) >> 32) as u32;
        debug_assert!(at < self.capacity());
        at
    }

    #[inline]
    fn next(&self, at: u32) -> u32 {
        let at = at + 1;
        if at == self.capacity() {
            0
        } else {
            at
        }
    }

    /// Probe steps from `from` forward to `to`, wrapping around.
    fn distance(&self, from: u32, to: u32) -> u32 {
        if to >= from {
            to - from
        } else {
            to + self.capacity() - from
        }
    }

    /// Where the entry (hash, slot) is stored; asserts it exists.
    fn position(&self, hash: u64, slot: u32) -> u32 {
        assert_ne!(slot, NIL);
        let tag = tag_of(hash);
        let mut at = self.home(tag);
        loop {
            let entry = self.entries[at as usize];
            assert_ne!(entry.slot, NIL, "index has no entry for slot {slot}");
            if entry.tag == tag && entry.slot == slot {
                return at;
            }
            at = self.next(at);
        }
    }

    /// Checks every invariant by brute force. O(capacity^2) worst case; for tests.
    #[cfg(test)]
    fn verify(&self) {
        let mut len = 0;
        for (at, entry) in self.entries.iter().enumerate() {
            if entry.slot == NIL {
                continue;
            }
            len += 1;
            let mut probe = self.home(entry.tag);
            while probe != at as u32 {
                assert_ne!(
                    self.entries[probe as usize].slot, NIL,
                    "entry {at} unreachable"
                );
                probe = self.next(probe);
            }
        }
        assert_eq!(len, self.len);
        assert!(self.len <= self.len_max);
    }
}

#[inline]
fn tag_of(hash: u64) -> u32 {
    (hash >> 32) as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    #[test]
    fn capacity_rule() {
        assert_eq!(Index::new(1).capacity(), 16);
        assert_eq!(Index::new(14).capacity(), 16);
        assert_eq!(Index::new(15).capacity(), 18);
        assert_eq!(Index::new(700).capacity(), 800);
        assert_eq!(Index::new(701).capacity(), 802);
        assert_eq!(Index::new(700).bytes_reserved(), 6400);
    }

    #[test]
    fn full_index_of_identical_tags() {
        // Every key has the same tag, so every lookup walks the one cluster and the callback
        // alone tells the keys apart; the cluster wraps around the end of the array.
        let mut index = Index::new(20);
        let tag = u64::from(u32::MAX) << 32;
        for slot in 0..20 {
            index.insert(tag | u64::from(slot), slot);
        }
        assert!(index.is_full());
        index.verify();
        for slot in 0..20 {
            assert_eq!(index.find(tag, |s| s == slot), Some(slot));
        }
        assert_eq!(index.find(tag, |_| false), None);
        for slot in (0..20).step_by(3) {
            index.remove(tag, slot);
            index.verify();
        }
        for slot in 0..20 {
            let present = slot % 3 != 0;
            assert_eq!(index.find(tag, |s| s == slot).is_some(), present);
        }
        index.prefetch(tag);
    }

    #[test]
    #[should_panic(expected = "no entry")]
    fn remove_of_absent_entry_panics() {
        let mut index = Index::new(4);
        index.insert(1 << 32, 3);
        index.remove(1 << 32, 4);
    }

    /// `insert_unless` asks about entries of the same tag only, inserts unless one names the
    /// same key, and `clear` empties the index.
    #[test]
    fn insert_unless_refuses_a_second_entry_for_a_key() {
        let mut index = Index::new(8);
        let (tag_a, tag_b) = (1u64 << 32, 2u64 << 32);
        assert!(index.insert_unless(tag_a, 1, |_| unreachable!("nothing indexed yet")));
        let mut asked = Vec::new();
        assert!(index.insert_unless(tag_b, 2, |s| {
            asked.push(s);
            true
        }));
        assert!(
            asked.is_empty(),
            "another tag is not asked about: {asked:?}"
        );
        // Same tag: a different key goes in, the same key does not.
        assert!(index.insert_unless(tag_a, 3, |s| s != 1));
        assert!(!index.insert_unless(tag_a, 4, |s| s == 3));
        assert_eq!(index.len(), 3);
        assert_eq!(index.find(tag_a, |s| s == 3), Some(3));
        index.clear();
        assert!(index.is_empty());
        assert_eq!(index.find(tag_a, |_| true), None);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Insert(u64),
        Find(u64),
        Remove(usize),
        Replace(usize),
    }

    /// Hashes from a few tags (so that tags and buckets collide often, including at the wrap
    /// around the end of the array) mixed with arbitrary ones.
    fn hash() -> impl Strategy<Value = u64> {
        prop_oneof![
            (
                prop::sample::select(vec![0u32, 1, 7, 1 << 31, u32::MAX - 1, u32::MAX]),
                0u32..4
            )
                .prop_map(|(tag, low)| (u64::from(tag) << 32) | u64::from(low)),
            (0u32..64, any::<u32>())
                .prop_map(|(tag, low)| (u64::from(tag) << 26 << 32) | u64::from(low)),
            any::<u64>(),
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => hash().prop_map(Op::Insert),
            3 => hash().prop_map(Op::Find),
            3 => any::<usize>().prop_map(Op::Remove),
            1 => any::<usize>().prop_map(Op::Replace),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Against a `HashMap<u64, u32>` from hash (standing in for the key) to slot; the engine's
        /// key check is modelled by looking the slot's hash up in the reverse map.
        #[test]
        fn matches_model(max_entries in 1u32..60, ops in prop::collection::vec(op(), 0..300)) {
            let mut index = Index::new(max_entries);
            let mut model: HashMap<u64, u32> = HashMap::new();
            let mut hash_of_slot: HashMap<u32, u64> = HashMap::new();
            let mut slot_next = 0u32;
            // Earlier guesses (hash, slot, version): valid answers while the version holds.
            let mut guesses: Vec<(u64, u32, u64)> = Vec::new();
            for op in ops {
                let version = index.version();
                let len = index.len();
                match op {
                    Op::Insert(hash) => {
                        if model.contains_key(&hash) || index.is_full() {
                            prop_assert_eq!(index.is_full(), model.len() as u32 == max_entries);
                            continue;
                        }
                        index.insert(hash, slot_next);
                        model.insert(hash, slot_next);
                        hash_of_slot.insert(slot_next, hash);
                        slot_next += 1;
                    }
                    Op::Find(hash) => {
                        let found = index.find(hash, |slot| hash_of_slot[&slot] == hash);
                        prop_assert_eq!(found, model.get(&hash).copied());
                        guesses.push((hash, index.guess(hash), index.version()));
                    }
                    Op::Remove(pick) if !model.is_empty() => {
                        let mut hashes: Vec<u64> = model.keys().copied().collect();
                        hashes.sort_unstable();
                        let hash = hashes[pick % hashes.len()];
                        let slot = model.remove(&hash).unwrap();
                        hash_of_slot.remove(&slot);
                        index.remove(hash, slot);
                    }
                    Op::Replace(pick) if !model.is_empty() => {
                        let mut hashes: Vec<u64> = model.keys().copied().collect();
                        hashes.sort_unstable();
                        let hash = hashes[pick % hashes.len()];
                        let old = model[&hash];
                        index.replace(hash, old, slot_next);
                        hash_of_slot.remove(&old);
                        hash_of_slot.insert(slot_next, hash);
                        model.insert(hash, slot_next);
                        slot_next += 1;
                    }
                    _ => {}
                }
                // Every change to the entries (here: every insert, remove and replace made)
                // moves the version on.
                let changed = index.len() != len || matches!(op, Op::Replace(_) if !model.is_empty());
                prop_assert_eq!(index.version() != version, changed);
                for &(hash, guess, at) in &guesses {
                    let confirmed = guess == NIL || hash_of_slot.get(&guess) == Some(&hash);
                    if at == index.version() && confirmed {
                        let answer = (guess != NIL).then_some(guess);
                        prop_assert_eq!(answer, model.get(&hash).copied());
                    }
                }
                prop_assert_eq!(index.len(), model.len() as u32);
                prop_assert_eq!(index.is_empty(), model.is_empty());
                prop_assert_eq!(index.is_full(), model.len() as u32 == max_entries);
                index.verify();
            }
            for (&hash, &slot) in &model {
                prop_assert_eq!(index.find(hash, |s| hash_of_slot[&s] == hash), Some(slot));
            }
        }
    }
}
