//! The per-shard table of hot session headers, addressed by slot.
//!
//! Every session (and sub-session) a shard holds has one 48-byte [`Head`] here; its variable-size
//! payload lives in the arena and its deadline in a wheel, both reached from the head. The table is
//! allocated and touched once in [`Table::new`] and never grows: a full table is an operating
//! condition the engine handles (`alloc` returns `None`), not a reason to allocate.
//!
//! Invariants:
//! - `live + (length of the free list) == capacity`, and the free list holds exactly the slots whose
//!   [`FLAG_FREE`] bit is set, linked through [`Head::link`] and ending in [`NIL`].
//! - Slot [`NIL`] is never a valid slot, so `capacity < NIL`.
//! - Bits 6 and 7 of [`Head::flags`] are reserved for the storage layer ([`FLAGS_RESERVED`]); the
//!   engine owns bits 0..=5 ([`FLAGS_ENGINE`]) and must leave the reserved bits alone.

/// The "no slot / no handle" marker shared by the table, the arena, the index and the wheels.
pub const NIL: u32 = u32::MAX;

/// Set while a slot is on the free list. Reserved: lets `free` catch a double free and
/// `is_live` answer without a side array.
pub const FLAG_FREE: u8 = 1 << 7;
/// Set while the slot is linked into some wheel. Reserved: owned by `wheel.rs`.
pub const FLAG_WHEEL_LINKED: u8 = 1 << 6;
/// The flag bits the storage layer owns.
pub const FLAGS_RESERVED: u8 = FLAG_FREE | FLAG_WHEEL_LINKED;
/// The flag bits the engine may use freely.
pub const FLAGS_ENGINE: u8 = !FLAGS_RESERVED;

/// The hot header of one session. `repr(C)` so that the layout (and the 48 bytes, which put four
/// heads in three cache lines) does not depend on the compiler's field reordering.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[repr(C)]
pub struct Head {
    pub id: u64,
    /// Epoch milliseconds.
    pub start_ts: i64,
    /// Epoch milliseconds.
    pub last_ts: i64,
    pub count: u32,
    /// Arena handle of this session's payload chain ([`NIL`] = none).
    pub data: u32,
    /// Intrusive wheel links, owned by `wheel.rs`.
    pub wheel_prev: u32,
    pub wheel_next: u32,
    /// Free-list link while free; engine-defined while live.
    pub link: u32,
    pub profile: u8,
    /// Bits 6 and 7 reserved (see [`FLAGS_RESERVED`]).
    pub flags: u8,
    pub key_len: u16,
}

const _: () = assert!(std::mem::size_of::<Head>() == 48);
const _: () = assert!(std::mem::align_of::<Head>() == 8);
const _: () = assert!(FLAG_FREE & FLAG_WHEEL_LINKED == 0);

impl Head {
    /// What `Table::alloc` hands out: all zero, except that every handle and link is [`NIL`].
    pub const FRESH: Head = Head {
        id: 0,
        start_ts: 0,
        last_ts: 0,
        count: 0,
        data: NIL,
        wheel_prev: NIL,
        wheel_next: NIL,
        link: NIL,
        profile: 0,
        flags: 0,
        key_len: 0,
    };
}

pub struct Table {
    heads: Box<[Head]>,
    free_head: u32,
    live: u32,
}

impl Table {
    /// Allocates `capacity` heads and writes every one of them (so every page is faulted in now, not
    /// on the data path). Slots are handed out in ascending order at first.
    pub fn new(capacity: u32) -> Table {
        assert!(capacity > 0);
        assert!(capacity < NIL);
        let mut heads: Vec<Head> = Vec::with_capacity(capacity as usize);
        super::prefetch::advise_huge_pages(heads.as_mut_ptr(), heads.capacity());
        heads.extend((0..capacity).map(|slot| Head {
            flags: FLAG_FREE,
            link: if slot + 1 == capacity { NIL } else { slot + 1 },
            ..Head::FRESH
        }));
        let heads = heads.into_boxed_slice();
        assert_eq!(heads.len(), capacity as usize);
        Table {
            heads,
            free_head: 0,
            live: 0,
        }
    }

    pub fn capacity(&self) -> u32 {
        self.heads.len() as u32
    }

    pub fn live(&self) -> u32 {
        self.live
    }

    /// O(1). `None` when the table is full. The most recently freed slot is reused first: its
    /// cache lines are the likeliest to still be warm.
    pub fn alloc(&mut self) -> Option<u32> {
        let slot = self.free_head;
        if slot == NIL {
            debug_assert_eq!(self.live, self.capacity());
            return None;
        }
        debug_assert!(self.live < self.capacity());
        let head = &mut self.heads[slot as usize];
        assert!(
            head.flags & FLAG_FREE != 0,
            "free list holds live slot {slot}"
        );
        self.free_head = head.link;
        *head = Head::FRESH;
        self.live += 1;
        Some(slot)
    }

    /// O(1). The caller must have unlinked the slot from its wheel and released its arena chain
    /// first: the table cannot do either for it, and a slot freed while linked would corrupt a
    /// wheel list.
    pub fn free(&mut self, slot: u32) {
        assert!(slot < self.capacity());
        let free_head = self.free_head;
        let head = &mut self.heads[slot as usize];
        assert!(head.flags & FLAG_FREE == 0, "double free of slot {slot}");
        assert!(
            head.flags & FLAG_WHEEL_LINKED == 0,
            "slot {slot} freed while linked in a wheel"
        );
        debug_assert!(self.live > 0);
        // Keep the freed contents visible in a debugger; only the reserved bits and the link
        // change meaning.
        head.flags = FLAG_FREE;
        head.link = free_head;
        self.free_head = slot;
        self.live -= 1;
    }

    pub fn get(&self, slot: u32) -> &Head {
        let head = &self.heads[slot as usize];
        debug_assert!(head.flags & FLAG_FREE == 0, "get of free slot {slot}");
        head
    }

    pub fn get_mut(&mut self, slot: u32) -> &mut Head {
        let head = &mut self.heads[slot as usize];
        debug_assert!(head.flags & FLAG_FREE == 0, "get_mut of free slot {slot}");
        head
    }

    /// All heads, live and free, for the wheels (which link through them). Free heads must not be
    /// modified through this.
    pub fn heads_mut(&mut self) -> &mut [Head] {
        &mut self.heads
    }

    /// All heads, live and free; use [`Table::is_live`] to tell them apart.
    pub fn heads(&self) -> &[Head] {
        &self.heads
    }

    /// `false` for free slots and for slots beyond the capacity (so it can vet untrusted slots,
    /// e.g. from a snapshot).
    /// Hint that the head of `slot` will be read soon.
    #[inline]
    pub fn prefetch(&self, slot: u32) {
        if let Some(h) = self.heads.get(slot as usize) {
            // A 48-byte head straddles two cache lines half the time.
            let p: *const Head = h;
            super::prefetch::read(p);
            super::prefetch::read(p.cast::<u8>().wrapping_add(47));
        }
    }

    pub fn is_live(&self, slot: u32) -> bool {
        self.heads
            .get(slot as usize)
            .is_some_and(|head| head.flags & FLAG_FREE == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fresh_head_is_nil_linked() {
        let mut table = Table::new(3);
        let slot = table.alloc().unwrap();
        assert_eq!(*table.get(slot), Head::FRESH);
        assert_eq!(table.get(slot).data, NIL);
        assert_eq!(table.get(slot).wheel_prev, NIL);
        assert_eq!(table.get(slot).wheel_next, NIL);
    }

    #[test]
    fn exhaustion_and_reuse() {
        let mut table = Table::new(4);
        let slots: Vec<u32> = (0..4).map(|_| table.alloc().unwrap()).collect();
        assert_eq!(slots, vec![0, 1, 2, 3]);
        assert_eq!(table.live(), 4);
        assert_eq!(table.alloc(), None);
        table.get_mut(2).id = 7;
        table.get_mut(2).flags = FLAGS_ENGINE;
        table.free(2);
        assert!(!table.is_live(2));
        assert!(table.is_live(1));
        assert!(!table.is_live(4));
        assert!(!table.is_live(NIL));
        assert_eq!(table.alloc(), Some(2));
        assert_eq!(*table.get(2), Head::FRESH);
        assert_eq!(table.alloc(), None);
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_panics() {
        let mut table = Table::new(2);
        let slot = table.alloc().unwrap();
        table.free(slot);
        table.free(slot);
    }

    #[test]
    #[should_panic(expected = "linked in a wheel")]
    fn free_while_wheel_linked_panics() {
        let mut table = Table::new(2);
        let slot = table.alloc().unwrap();
        table.get_mut(slot).flags |= FLAG_WHEEL_LINKED;
        table.free(slot);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Against a model set of live slots: alloc succeeds exactly while the model is not full,
        /// never returns a live slot, and reuses the most recently freed slot first.
        #[test]
        fn matches_model(capacity in 1u32..40, ops in prop::collection::vec((any::<bool>(), any::<u32>()), 0..400)) {
            let mut table = Table::new(capacity);
            let mut live: Vec<u32> = Vec::new();
            let mut last_freed: Option<u32> = None;
            for (is_alloc, pick) in ops {
                if is_alloc {
                    match table.alloc() {
                        Some(slot) => {
                            prop_assert!(slot < capacity);
                            prop_assert!(!live.contains(&slot));
                            if let Some(freed) = last_freed.take() {
                                prop_assert_eq!(slot, freed);
                            }
                            live.push(slot);
                        }
                        None => prop_assert_eq!(live.len() as u32, capacity),
                    }
                } else if !live.is_empty() {
                    let slot = live.swap_remove(pick as usize % live.len());
                    table.free(slot);
                    last_freed = Some(slot);
                }
                prop_assert_eq!(table.live(), live.len() as u32);
                for slot in 0..capacity {
                    prop_assert_eq!(table.is_live(slot), live.contains(&slot));
                }
            }
        }
    }
}
