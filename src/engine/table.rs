//! The per-shard table of hot session headers, addressed by slot.
//!
//! Every session (and sub-session) a shard holds has one 48-byte [`Head`] here; its variable-size
//! payload lives in the arena and its deadline in a wheel, both reached from the head. The table is
//! allocated once and never grows: a full table is an operating condition the engine handles
//! (`alloc` returns `None`), not a reason to allocate. [`Table::new`] writes every head at once
//! (every page faulted in now, not on the data path); [`Table::with_pages`] with
//! [`Pages::OnDemand`] leaves the heads unwritten until first used, for batch jobs (a replay)
//! that would otherwise spend their start writing a table they mostly never touch.
//!
//! Invariants:
//! - The free list is the linked list from `free_head` (through [`Head::link`], ending in
//!   [`NIL`]) followed by the slots never handed out, `fresh..capacity`, in ascending order:
//!   the order an eagerly written table's list would have. Heads at and past `fresh` are
//!   unread (unwritten, or left from before a `reset`); `is_live` is false for them.
//! - `live + (length of the free list) == capacity`, and the linked part holds exactly the slots
//!   below `fresh` whose [`FLAG_FREE`] bit is set.
//! - Slot [`NIL`] is never a valid slot, so `capacity < NIL`.
//! - Bits 6 and 7 of [`Head::flags`] are reserved for the storage layer ([`FLAGS_RESERVED`]); the
//!   engine owns bits 0..=5 ([`FLAGS_ENGINE`]) and must leave the reserved bits alone.
//!
//! The table also keeps what a sliced snapshot (`engine::capture`) needs of it while one is in
//! progress: a copy-on-write mark per slot (*pending*: live at the cut and not captured yet, or
//! free at the cut and not yet known to be) and the free list as it was at the cut. The free list
//! is a stack, so the cut's list is whatever left its front since the cut (recorded as it leaves,
//! in `alloc`) followed by the part still under the slots freed since; `cut_walk` records that
//! part a budget at a time. A cut first writes any heads not yet written (`fresh == capacity`
//! while it is active), so it only ever walks links. Invariants while a cut is active:
//! - A pending slot is unchanged since the cut (head, and for a live one its payload): the engine
//!   captures it before any change (`get_mut` and `free` assert this for the head).
//! - The free list is `above` slots freed since the cut, then the cut's list from position
//!   `popped` on; positions `0..walked` of the cut's list are recorded in `runs`, `popped <=
//!   walked`, and `next` is position `walked` (or [`NIL`] past its end).

use super::arena::Pages;

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

/// `len` heads of zero bytes (a valid [`Head`]: every field is an integer), straight from the
/// allocator's zeroed memory, so no page is touched here; None when the allocator cannot give
/// that much memory.
fn zeroed_heads(len: usize) -> Option<Box<[Head]>> {
    let layout = std::alloc::Layout::array::<Head>(len).ok()?;
    assert!(layout.size() > 0);
    // SAFETY: the layout is non-zero-sized; a null return is handled. The memory is zeroed, and
    // all-zero bytes are a valid `Head` (`repr(C)`, integer fields only), so the `len` elements
    // are initialized; `Box` frees it with the same layout (that of `[Head]` of `len`).
    unsafe {
        let p = std::alloc::alloc_zeroed(layout).cast::<Head>();
        if p.is_null() {
            return None;
        }
        super::prefetch::advise_huge_pages(p, len);
        Some(Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, len)))
    }
}

/// A consecutive, ascending run of slots of a free list (the snapshot format's `SlotRun`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Run {
    pub start: u32,
    pub len: u32,
}

/// The state of a sliced snapshot's cut (see the module doc).
struct Cut {
    active: bool,
    /// One bit per slot.
    pending: Box<[u64]>,
    above: u32,
    popped: u32,
    walked: u32,
    next: u32,
    runs: Vec<Run>,
}

pub struct Table {
    heads: Box<[Head]>,
    /// Slots at and past this one were never handed out (see the module doc).
    fresh: u32,
    free_head: u32,
    live: u32,
    cut: Cut,
}

impl Table {
    /// Allocates `capacity` heads and writes every one of them (so every page is faulted in now, not
    /// on the data path). Slots are handed out in ascending order at first.
    pub fn new(capacity: u32) -> Table {
        Self::with_pages(capacity, Pages::Prefault)
    }

    /// A table whose heads are written now (`Prefault`, as [`Table::new`]) or as slots are first
    /// handed out (`OnDemand`: the memory comes zeroed from the allocator, and its pages are
    /// backed on first use).
    pub fn with_pages(capacity: u32, pages: Pages) -> Table {
        Table::try_with_pages(capacity, pages).expect("memory for the session table")
    }

    /// [`Table::with_pages`], or None when the memory cannot be allocated.
    pub fn try_with_pages(capacity: u32, pages: Pages) -> Option<Table> {
        assert!(capacity > 0);
        assert!(capacity < NIL);
        let heads = zeroed_heads(capacity as usize)?;
        assert_eq!(heads.len(), capacity as usize);
        let mut table = Table {
            heads,
            fresh: 0,
            free_head: NIL,
            live: 0,
            cut: Cut {
                active: false,
                pending: vec![0u64; (capacity as usize).div_ceil(64)].into_boxed_slice(),
                above: 0,
                popped: 0,
                walked: 0,
                next: NIL,
                runs: Vec::new(),
            },
        };
        if pages == Pages::Prefault {
            table.write_fresh();
        }
        Some(table)
    }

    /// A fresh table's free list runs through the slots in ascending order.
    fn initial_head(slot: u32, capacity: u32) -> Head {
        Head {
            flags: FLAG_FREE,
            link: if slot + 1 == capacity { NIL } else { slot + 1 },
            ..Head::FRESH
        }
    }

    /// Frees every slot at once, in O(1): every slot is never-used again, so the free list is
    /// the one `new` made and heads are rewritten as slots are handed out. Not during a capture.
    pub fn reset(&mut self) {
        assert!(!self.cut.active, "table reset during a capture");
        self.fresh = 0;
        self.free_head = NIL;
        self.live = 0;
    }

    /// No slot at or past this one has been handed out since the table was made or reset: a
    /// walk over the live slots can stop here.
    pub fn high_water(&self) -> u32 {
        self.fresh
    }

    /// Writes the heads not yet written as the linked free list's tail, so that the whole list
    /// is linked (its order unchanged): at construction when prefaulting, and before a cut.
    /// Walks the linked part once to find its end.
    fn write_fresh(&mut self) {
        let capacity = self.capacity();
        if self.fresh == capacity {
            return;
        }
        let first = self.fresh;
        for slot in first..capacity {
            self.heads[slot as usize] = Self::initial_head(slot, capacity);
        }
        self.fresh = capacity;
        if self.free_head == NIL {
            self.free_head = first;
            return;
        }
        let mut s = self.free_head;
        while self.heads[s as usize].link != NIL {
            s = self.heads[s as usize].link;
        }
        self.heads[s as usize].link = first;
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
            return self.alloc_fresh();
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
        if self.cut.active {
            self.cut_alloc(slot);
        }
        Some(slot)
    }

    /// The next slot never handed out, its head written now.
    fn alloc_fresh(&mut self) -> Option<u32> {
        if self.fresh == self.capacity() {
            debug_assert_eq!(self.live, self.capacity());
            return None;
        }
        // A cut writes every head first, so no fresh slot is handed out during one.
        debug_assert!(!self.cut.active);
        let slot = self.fresh;
        self.fresh += 1;
        self.heads[slot as usize] = Head::FRESH;
        self.live += 1;
        Some(slot)
    }

    /// O(1). The caller must have unlinked the slot from its wheel and released its arena chain
    /// first: the table cannot do either for it, and a slot freed while linked would corrupt a
    /// wheel list.
    pub fn free(&mut self, slot: u32) {
        assert!(slot < self.capacity());
        if self.cut.active {
            assert!(
                !self.is_pending(slot),
                "slot {slot} freed before its capture"
            );
            self.cut.above += 1;
        }
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
        debug_assert!(slot < self.fresh, "get of never-used slot {slot}");
        let head = &self.heads[slot as usize];
        debug_assert!(head.flags & FLAG_FREE == 0, "get of free slot {slot}");
        head
    }

    pub fn get_mut(&mut self, slot: u32) -> &mut Head {
        if self.cut.active {
            assert!(
                !self.is_pending(slot),
                "slot {slot} changed before its capture"
            );
        }
        debug_assert!(slot < self.fresh, "get_mut of never-used slot {slot}");
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

    /// `false` for free slots and for slots beyond the capacity (so it can vet untrusted slots,
    /// e.g. from a snapshot).
    pub fn is_live(&self, slot: u32) -> bool {
        slot < self.fresh && self.heads[slot as usize].flags & FLAG_FREE == 0
    }
}

/// The sliced snapshot's side of the table (see the module doc).
impl Table {
    /// Take the cut: every slot pending, the free list's head remembered. `runs` (cleared) will
    /// hold the cut's free list; it is given capacity for every free slot now, so recording
    /// never reallocates.
    pub fn cut_begin(&mut self, mut runs: Vec<Run>) {
        assert!(!self.cut.active, "a cut is already in progress");
        self.write_fresh();
        let free = (self.capacity() - self.live) as usize;
        runs.clear();
        if runs.capacity() < free {
            runs = Vec::with_capacity(free);
        }
        let cap = self.capacity() as usize;
        let c = &mut self.cut;
        c.pending.fill(u64::MAX);
        if !cap.is_multiple_of(64) {
            *c.pending.last_mut().expect("capacity > 0") = (1u64 << (cap % 64)) - 1;
        }
        c.above = 0;
        c.popped = 0;
        c.walked = 0;
        c.next = self.free_head;
        c.runs = runs;
        c.active = true;
    }

    /// The free list now, as runs (for a capture of the whole table at once).
    pub fn free_runs(&self, runs: &mut Vec<Run>) {
        runs.clear();
        let free = self.capacity() - self.live;
        let mut s = self.free_head;
        let mut walked = 0u32;
        while s != NIL {
            walked += 1;
            assert!(
                walked <= free,
                "the free list is longer than the free slots"
            );
            match runs.last_mut() {
                Some(r) if r.start + r.len == s => r.len += 1,
                _ => runs.push(Run { start: s, len: 1 }),
            }
            s = self.heads[s as usize].link;
        }
        let never_used = self.capacity() - self.fresh;
        if never_used > 0 {
            walked += never_used;
            match runs.last_mut() {
                Some(r) if r.start + r.len == self.fresh => r.len += never_used,
                _ => runs.push(Run {
                    start: self.fresh,
                    len: never_used,
                }),
            }
        }
        assert_eq!(walked, free, "the free list holds every free slot");
    }

    pub fn cut_active(&self) -> bool {
        self.cut.active
    }

    #[inline]
    pub fn is_pending(&self, slot: u32) -> bool {
        self.cut.pending[slot as usize / 64] & (1 << (slot % 64)) != 0
    }

    pub fn clear_pending(&mut self, slot: u32) {
        self.cut.pending[slot as usize / 64] &= !(1 << (slot % 64));
    }

    /// The first pending slot at or after `from` within `words_max` bitmap words: `Ok(slot)`, or
    /// `Err(resume)` with where to look next (`capacity` once the whole map is clear).
    pub fn next_pending(&self, from: u32, words_max: usize) -> Result<u32, u32> {
        let cap = self.capacity();
        let map = &self.cut.pending;
        let mut w = from as usize / 64;
        if w >= map.len() {
            return Err(cap);
        }
        let mut bits = map[w] & (u64::MAX << (from % 64));
        for _ in 0..words_max.max(1) {
            if bits != 0 {
                return Ok((w * 64) as u32 + bits.trailing_zeros());
            }
            w += 1;
            if w == map.len() {
                return Err(cap);
            }
            bits = map[w];
        }
        Err((w * 64) as u32)
    }

    /// Record up to `budget` more entries of the cut's free list. Returns the entries recorded;
    /// [`Table::cut_walked`] tells when the list is complete.
    pub fn cut_walk(&mut self, budget: u32) -> u32 {
        let mut done = 0;
        while done < budget && self.cut.next != NIL {
            let s = self.cut.next;
            debug_assert!(self.heads[s as usize].flags & FLAG_FREE != 0);
            self.cut_record(s);
            self.cut.next = self.heads[s as usize].link;
            done += 1;
        }
        done
    }

    pub fn cut_walked(&self) -> bool {
        self.cut.next == NIL
    }

    /// End the cut: the free list as it was at the cut. Asserts it is complete and that no slot
    /// is pending any more.
    pub fn cut_end(&mut self) -> Vec<Run> {
        assert!(
            self.cut.active && self.cut_walked(),
            "the cut is not complete"
        );
        assert!(
            self.cut.pending.iter().all(|&w| w == 0),
            "a slot live at the cut was not captured"
        );
        // (Summing the runs takes as long as there are runs: a debug check.)
        debug_assert_eq!(
            self.cut.runs.iter().map(|r| u64::from(r.len)).sum::<u64>(),
            u64::from(self.cut.walked),
            "the cut's free list is recorded once"
        );
        self.cut.active = false;
        std::mem::take(&mut self.cut.runs)
    }

    /// Give up the cut (the capture is abandoned); returns the runs buffer for reuse.
    pub fn cut_abort(&mut self) -> Vec<Run> {
        self.cut.active = false;
        self.cut.pending.fill(0);
        std::mem::take(&mut self.cut.runs)
    }

    /// `slot` just left the front of the free list.
    #[cold]
    fn cut_alloc(&mut self, slot: u32) {
        let c = &mut self.cut;
        if c.above > 0 {
            // One of the slots freed since the cut.
            c.above -= 1;
            return;
        }
        // The cut's list at position `popped`.
        assert!(c.popped <= c.walked);
        if c.popped == c.walked {
            debug_assert_eq!(c.next, slot);
            self.cut_record(slot);
            self.cut.next = self.free_head;
        }
        self.cut.popped += 1;
        self.clear_pending(slot);
    }

    fn cut_record(&mut self, slot: u32) {
        let c = &mut self.cut;
        match c.runs.last_mut() {
            Some(r) if r.start + r.len == slot => r.len += 1,
            _ => {
                assert!(
                    c.runs.len() < c.runs.capacity(),
                    "free runs reserved at the cut"
                );
                c.runs.push(Run {
                    start: slot,
                    len: 1,
                });
            }
        }
        c.walked += 1;
        c.pending[slot as usize / 64] &= !(1 << (slot % 64));
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
    fn reset_frees_every_slot_in_the_initial_order() {
        let mut table = Table::new(4);
        for _ in 0..3 {
            table.alloc().unwrap();
        }
        table.get_mut(1).flags = FLAGS_ENGINE | FLAG_WHEEL_LINKED;
        table.free(2);
        table.reset();
        assert_eq!(table.live(), 0);
        assert!((0..4).all(|s| !table.is_live(s)));
        let slots: Vec<u32> = (0..4).map(|_| table.alloc().unwrap()).collect();
        assert_eq!(slots, vec![0, 1, 2, 3]);
        assert!(slots.iter().all(|&s| *table.get(s) == Head::FRESH));
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

    fn pages(on_demand: bool) -> Pages {
        if on_demand {
            Pages::OnDemand
        } else {
            Pages::Prefault
        }
    }

    /// The free list in allocation order: the linked part, then the slots never used.
    fn free_list(table: &Table) -> Vec<u32> {
        let mut list = Vec::new();
        let mut s = table.free_head;
        while s != NIL {
            list.push(s);
            s = table.heads[s as usize].link;
        }
        list.extend(table.fresh..table.capacity());
        list
    }

    #[test]
    fn on_demand_heads_are_written_as_slots_are_first_used() {
        let mut table = Table::with_pages(4, Pages::OnDemand);
        assert_eq!(table.high_water(), 0);
        assert!((0..4).all(|s| !table.is_live(s)));
        assert_eq!(table.alloc(), Some(0));
        assert_eq!(table.alloc(), Some(1));
        assert_eq!(table.high_water(), 2);
        table.free(0);
        assert_eq!(table.alloc(), Some(0));
        assert_eq!(*table.get(0), Head::FRESH);
        assert_eq!(table.alloc(), Some(2));
        assert_eq!(table.alloc(), Some(3));
        assert_eq!(table.alloc(), None);
        assert_eq!(table.high_water(), 4);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// A table written on demand hands out the slots an eagerly written one would, in the
        /// same order, and says the same of every slot.
        #[test]
        fn on_demand_behaves_as_written_now(
            capacity in 1u32..40,
            ops in prop::collection::vec((any::<bool>(), any::<u32>()), 0..400),
        ) {
            let mut now = Table::new(capacity);
            let mut later = Table::with_pages(capacity, Pages::OnDemand);
            let mut live: Vec<u32> = Vec::new();
            for (is_alloc, pick) in ops {
                if is_alloc {
                    let slot = now.alloc();
                    prop_assert_eq!(later.alloc(), slot);
                    live.extend(slot);
                } else if !live.is_empty() {
                    let slot = live.swap_remove(pick as usize % live.len());
                    now.free(slot);
                    later.free(slot);
                }
                prop_assert_eq!(free_list(&later), free_list(&now));
                for slot in 0..capacity {
                    prop_assert_eq!(later.is_live(slot), now.is_live(slot));
                }
            }
        }

        /// Against a model set of live slots: alloc succeeds exactly while the model is not full,
        /// never returns a live slot, and reuses the most recently freed slot first.
        #[test]
        fn matches_model(
            capacity in 1u32..40,
            on_demand in any::<bool>(),
            ops in prop::collection::vec((any::<bool>(), any::<u32>()), 0..400),
        ) {
            let mut table = Table::with_pages(capacity, pages(on_demand));
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

        /// A cut interleaved with allocations, frees and walk steps records exactly the free
        /// list of the moment it was taken, and leaves pending exactly the live slots not yet
        /// captured.
        #[test]
        fn cut_records_the_free_list_of_its_moment(
            capacity in 1u32..40,
            on_demand in any::<bool>(),
            before in prop::collection::vec((any::<bool>(), any::<u32>()), 0..200),
            after in prop::collection::vec((0u8..3, any::<u32>()), 0..200),
        ) {
            let mut table = Table::with_pages(capacity, pages(on_demand));
            let mut live: Vec<u32> = Vec::new();
            for (is_alloc, pick) in before {
                if is_alloc {
                    if let Some(s) = table.alloc() {
                        live.push(s);
                    }
                } else if !live.is_empty() {
                    table.free(live.swap_remove(pick as usize % live.len()));
                }
            }
            let expected = free_list(&table);
            let mut runs = Vec::new();
            table.free_runs(&mut runs);
            let listed: Vec<u32> = runs.iter().flat_map(|r| r.start..r.start + r.len).collect();
            prop_assert_eq!(&listed, &expected);
            let mut untouched = live.clone();
            table.cut_begin(Vec::new());
            for (op, pick) in after {
                match op {
                    0 => {
                        if let Some(s) = table.alloc() {
                            prop_assert!(!table.is_pending(s));
                            live.push(s);
                        }
                    }
                    1 if !live.is_empty() => {
                        let s = live.swap_remove(pick as usize % live.len());
                        // The engine captures a pending slot before it frees it.
                        table.clear_pending(s);
                        untouched.retain(|&u| u != s);
                        table.free(s);
                    }
                    _ => {
                        table.cut_walk(pick % 4);
                    }
                }
            }
            while !table.cut_walked() {
                table.cut_walk(3);
            }
            for s in 0..capacity {
                prop_assert_eq!(table.is_pending(s), untouched.contains(&s));
                table.clear_pending(s);
            }
            let runs = table.cut_end();
            let got: Vec<u32> = runs.iter().flat_map(|r| r.start..r.start + r.len).collect();
            prop_assert_eq!(got, expected);
        }
    }
}
