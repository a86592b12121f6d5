//! The per-shard block arena that holds every variable-size session payload (key bytes, counters,
//! captured values, lists).
//!
//! The arena is one anonymous mapping of `blocks_total` fixed-size blocks, reserved, placed on the
//! shard's NUMA node and faulted in at start-up, so the data path neither allocates nor takes a
//! page fault (a replay's arena, [`Pages::OnDemand`], is backed as it is used instead). A payload
//! of `len` bytes occupies a chain of `blocks_for(len)` blocks; its handle is the index of the
//! first block, which never changes for the life of the chain (a resize keeps it). Chain links live
//! beside the blocks, in `next` (one `u32` per block), so a block is all payload and a small record
//! is one contiguous, 8-byte-aligned slice.
//!
//! The arena does not record chain lengths: the engine stores each payload's length and passes it
//! back to `resize`. Accesses are checked against the chain itself: touching a byte past the last
//! block of a chain is a bug and asserts.
//!
//! Invariants:
//! - Every block is either on exactly one live chain or on the free list; a chain ends in
//!   [`NIL`]. The free list is the linked list from `free_head` (ending in [`NIL`]) followed by
//!   the blocks never taken, `fresh..blocks_total`, in ascending order: the order a list written
//!   at construction would have. Links at and past `fresh` are unread: unwritten
//!   ([`Pages::OnDemand`]) or left from before a `reset`. [`Pages::Prefault`] writes every link
//!   at construction (`fresh == blocks_total`).
//! - `blocks_free` is the length of the free list.
//! - Blocks handed out by `alloc`, and bytes exposed by a growing `resize`, read as zero.
//! - The free list is LIFO, so the blocks freed last (the likeliest to be in cache) are reused first.

use std::io;
use std::ptr::NonNull;

use super::numa;
use super::table::NIL;

pub struct Arena {
    /// Start of the mapping; page-aligned.
    base: NonNull<u8>,
    /// Length of the mapping: `blocks_total * block_bytes` rounded up to whole pages.
    map_bytes: usize,
    block_bytes: u32,
    blocks_total: u32,
    blocks_free: u32,
    free_head: u32,
    /// Blocks at and past this one were never taken (see the module doc).
    fresh: u32,
    /// The block after each block on its chain or on the free list; `NIL` ends a list.
    next: Box<[u32]>,
}

// SAFETY: the arena exclusively owns its mapping (like a `Box<[u8]>`); nothing in it is tied to the
// thread that created it, so it may be built on one thread and moved to the shard that uses it.
unsafe impl Send for Arena {}
// SAFETY: methods taking `&self` only read the mapping; every write goes through `&mut self`.
unsafe impl Sync for Arena {}

/// When the pages of an arena (and of a shard's session table, `Table::with_pages`) are backed
/// by memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pages {
    /// Written at construction, so that the data path never takes a page fault (the appliance).
    Prefault,
    /// Charged to the system's commit limit at construction, but backed on first use: a replay
    /// is a batch job, and it touches only the part of the arena and the table its live
    /// sessions need.
    OnDemand,
}

impl Arena {
    /// Reserves `arena_bytes / block_bytes` blocks. With `numa_node`, the mapping's preferred node is
    /// set before any page is touched; failing to set it is logged and otherwise ignored (the
    /// arena is as correct, only possibly remote). Errors only when the mapping itself fails.
    pub fn new(arena_bytes: u64, block_bytes: u32, numa_node: Option<u32>) -> io::Result<Arena> {
        Self::with_pages(arena_bytes, block_bytes, numa_node, Pages::Prefault)
    }

    /// [`Arena::new`], with its pages backed as `pages` says.
    pub fn with_pages(
        arena_bytes: u64,
        block_bytes: u32,
        numa_node: Option<u32>,
        pages: Pages,
    ) -> io::Result<Arena> {
        // Multiples of 8 keep every block 8-byte aligned, so the engine may lay out u64 records.
        assert!(
            block_bytes >= 8 && block_bytes.is_multiple_of(8),
            "block_bytes {block_bytes}"
        );
        let blocks_total = arena_bytes / u64::from(block_bytes);
        assert!(
            blocks_total > 0,
            "arena of {arena_bytes} bytes holds no block"
        );
        assert!(
            blocks_total < u64::from(NIL),
            "arena of {blocks_total} blocks"
        );
        let blocks_total = blocks_total as u32;

        let page_bytes = numa::page_bytes();
        let data_bytes = blocks_total as usize * block_bytes as usize;
        let map_bytes = data_bytes.div_ceil(page_bytes) * page_bytes;
        assert!(map_bytes >= data_bytes);

        // NORESERVE when prefaulting, because the prefault below commits the pages; otherwise
        // the mapping is charged to the commit limit now, so that a later fault does not find
        // the memory promised elsewhere.
        let noreserve = match pages {
            Pages::Prefault => libc::MAP_NORESERVE,
            Pages::OnDemand => 0,
        };
        // SAFETY: a fresh anonymous private mapping at an address of the kernel's choosing; it
        // aliases nothing. Checked for MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | noreserve,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(ptr.cast::<u8>()).expect("mmap returned null");
        assert_eq!(base.as_ptr() as usize % page_bytes, 0);

        // From here on `arena` owns the mapping, so an early return or a panic unmaps it. The
        // links come zeroed from the allocator (pages backed on first use), every block never
        // taken; they are written as blocks are first taken, or all now when prefaulting.
        let mut arena = Arena {
            base,
            map_bytes,
            block_bytes,
            blocks_total,
            blocks_free: blocks_total,
            free_head: NIL,
            fresh: 0,
            next: vec![0u32; blocks_total as usize].into(),
        };
        if pages == Pages::Prefault {
            arena.free_head = arena.link_fresh(blocks_total);
        }

        // Random access over a large arena is TLB-bound; huge pages help if the system allows
        // them. Advisory only: an error (THP disabled) changes nothing we rely on.
        // SAFETY: the range is exactly our mapping; madvise does not access its contents.
        let _ = unsafe { libc::madvise(ptr, map_bytes, libc::MADV_HUGEPAGE) };

        if let Some(node) = numa_node {
            if let Err(e) = numa::bind(base.as_ptr(), map_bytes, node) {
                log::warn!(
                    "arena of {map_bytes} bytes not bound to NUMA node {node}: {e}; using the default placement"
                );
            }
        }

        // Prefault: write every page so the data path never takes a fault. Volatile so the
        // compiler cannot drop writes of the zero the page already reads as.
        let mut offset = 0;
        while pages == Pages::Prefault && offset < map_bytes {
            // SAFETY: `offset < map_bytes`, so the byte is inside our writable mapping, and no
            // reference to the mapping exists yet.
            unsafe { base.as_ptr().add(offset).write_volatile(0) };
            offset += page_bytes;
        }

        arena.verify();
        Ok(arena)
    }

    /// Frees every chain at once, in O(1): every block is never-taken again, so the free list
    /// is the one `new` made and links are rewritten as blocks are taken. The mapping is kept (a
    /// block is zeroed when it is next taken).
    pub fn reset(&mut self) {
        self.free_head = NIL;
        self.fresh = 0;
        self.blocks_free = self.blocks_total;
    }

    pub fn block_bytes(&self) -> u32 {
        self.block_bytes
    }

    pub fn blocks_total(&self) -> u32 {
        self.blocks_total
    }

    pub fn blocks_free(&self) -> u32 {
        self.blocks_free
    }

    /// Blocks in a chain that holds `len` bytes: `ceil(len / block_bytes)`, at least 1 (so every
    /// payload, even an empty one, has a stable handle). Saturates for absurd lengths, which then
    /// never fit.
    pub fn blocks_for(&self, len: usize) -> u32 {
        let blocks = (len as u64).div_ceil(u64::from(self.block_bytes)).max(1);
        blocks.min(u64::from(u32::MAX)) as u32
    }

    /// Allocate a zeroed chain able to hold `len` bytes. None if not enough free blocks (nothing
    /// allocated then).
    pub fn alloc(&mut self, len: usize) -> Option<u32> {
        let blocks = self.blocks_for(len);
        if blocks > self.blocks_free {
            return None;
        }
        let handle = self.take(blocks);
        debug_assert!(handle < self.blocks_total);
        Some(handle)
    }

    /// `alloc(src.len())` then `write(handle, 0, src)`, storing each byte once: only the last
    /// block's bytes past `src` are zeroed. For bulk imports, where the copy is the cost.
    pub fn alloc_copy(&mut self, src: &[u8]) -> Option<u32> {
        let blocks = self.blocks_for(src.len());
        if blocks > self.blocks_free {
            return None;
        }
        let block_bytes = self.block_bytes as usize;
        let handle = if self.free_prefix_is_consecutive(blocks) {
            // One copy for the whole chain: in a fresh arena, as at restore, it always is.
            let first = self.free_front();
            // SAFETY: blocks `first..first + blocks` are distinct blocks of the arena, so all
            // `blocks * block_bytes` bytes from the first one's start lie in the mapping; they
            // are free, so no chain (and no slice handed out) covers them, and `&mut self` is held.
            let dst = unsafe {
                std::slice::from_raw_parts_mut(self.block_ptr(first), blocks as usize * block_bytes)
            };
            dst[..src.len()].copy_from_slice(src);
            dst[src.len()..].fill(0);
            self.take_with(blocks, |_| {})
        } else {
            let mut pieces = src.chunks(block_bytes);
            self.take_with(blocks, |dst| {
                let piece = pieces.next().unwrap_or_default();
                dst[..piece.len()].copy_from_slice(piece);
                dst[piece.len()..].fill(0);
            })
        };
        debug_assert!(handle < self.blocks_total);
        Some(handle)
    }

    /// Frees the whole chain. Its blocks go to the front of the free list, in chain order.
    pub fn free(&mut self, handle: u32) {
        assert!(handle < self.blocks_total, "free of handle {handle}");
        self.give(handle);
    }

    /// Grow or shrink the chain so it holds `new_len` bytes, keeping the first min(old,new) bytes;
    /// bytes in `[old_len, new_len)` read as zero afterwards. false (and unchanged) if not enough
    /// free blocks. The handle stays the same.
    pub fn resize(&mut self, handle: u32, old_len: usize, new_len: usize) -> bool {
        assert!(handle < self.blocks_total, "resize of handle {handle}");
        let blocks_old = self.blocks_for(old_len);
        let blocks_new = self.blocks_for(new_len);
        if blocks_new > blocks_old {
            let blocks_more = blocks_new - blocks_old;
            if blocks_more > self.blocks_free {
                return false;
            }
            let tail = self.walk(handle, blocks_old - 1);
            debug_assert_eq!(
                self.next[tail as usize], NIL,
                "old_len disagrees with the chain"
            );
            let more = self.take(blocks_more);
            self.next[tail as usize] = more;
        } else if blocks_new < blocks_old {
            let tail = self.walk(handle, blocks_new - 1);
            let rest = self.next[tail as usize];
            assert_ne!(rest, NIL, "old_len disagrees with the chain");
            self.next[tail as usize] = NIL;
            let blocks_released = self.give(rest);
            debug_assert_eq!(blocks_released, blocks_old - blocks_new);
        }
        if new_len > old_len {
            // Blocks just taken are zero already; this clears what is left of the old tail block
            // (the engine may have written there past `old_len`, or the chain may have been
            // shrunk within that block earlier).
            let capacity_old = blocks_old as usize * self.block_bytes as usize;
            let zero_end = new_len.min(capacity_old);
            if zero_end > old_len {
                self.span(handle, old_len, zero_end - old_len, |ptr, _, piece| {
                    // SAFETY: `span` yields in-bounds pieces of this chain; `&mut self` is held.
                    unsafe { ptr.write_bytes(0, piece) };
                    true
                });
            }
        }
        true
    }

    /// Copies `[offset, offset + dst.len())` of the chain into `dst`; spans blocks.
    pub fn read(&self, handle: u32, offset: usize, dst: &mut [u8]) {
        let dst_ptr = dst.as_mut_ptr();
        self.span(handle, offset, dst.len(), |ptr, done, piece| {
            // SAFETY: `span` yields an in-bounds piece of the mapping; `done + piece <=
            // dst.len()`; `dst` is a distinct Rust allocation, so the ranges do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(ptr, dst_ptr.add(done), piece) };
            true
        });
    }

    /// Copies `src` into `[offset, offset + src.len())` of the chain; spans blocks.
    pub fn write(&mut self, handle: u32, offset: usize, src: &[u8]) {
        self.span(handle, offset, src.len(), |ptr, done, piece| {
            // SAFETY: as in `read`, with the roles swapped; `&mut self` is held, so nothing else
            // reads the chain meanwhile. `src` cannot point into the mapping while we hold
            // `&mut self` (every view of the mapping borrows the arena).
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(done), ptr, piece) };
            true
        });
    }

    /// Contiguous view when [offset, offset+len) lies within one block (the fast path for small
    /// records), else None.
    pub fn slice(&self, handle: u32, offset: usize, len: usize) -> Option<&[u8]> {
        let ptr = self.piece(handle, offset, len)?;
        // SAFETY: `piece` checked the range lies inside one block of this chain; the borrow of
        // `self` keeps the mapping alive and unwritten for the slice's lifetime.
        Some(unsafe { std::slice::from_raw_parts(ptr, len) })
    }

    pub fn slice_mut(&mut self, handle: u32, offset: usize, len: usize) -> Option<&mut [u8]> {
        let ptr = self.piece(handle, offset, len)?;
        // SAFETY: as in `slice`; the exclusive borrow of `self` makes the view unique.
        Some(unsafe { std::slice::from_raw_parts_mut(ptr, len) })
    }

    /// Whether the chain starts with `bytes` (a key lookup's confirmation, on every event: a
    /// key within the first block, nearly all, is compared in place by word loads rather than a
    /// `bcmp` call).
    #[inline(always)]
    pub fn starts_with(&self, handle: u32, bytes: &[u8]) -> bool {
        assert!(handle < self.blocks_total, "handle {handle}");
        if bytes.len() <= self.block_bytes as usize {
            // SAFETY: `handle < blocks_total`, so the block's `block_bytes` bytes lie in the
            // mapping; `&self` keeps them unwritten while the slice lives.
            let first = unsafe { std::slice::from_raw_parts(self.block_ptr(handle), bytes.len()) };
            return super::rules::short_eq(first, bytes);
        }
        self.eq_at(handle, 0, bytes)
    }

    /// Compare bytes at [offset, offset+other.len()) with `other` without copying.
    pub fn eq_at(&self, handle: u32, offset: usize, other: &[u8]) -> bool {
        self.span(handle, offset, other.len(), |ptr, done, piece| {
            // SAFETY: `span` yields an in-bounds piece; `&self` keeps it unwritten.
            let mine = unsafe { std::slice::from_raw_parts(ptr, piece) };
            mine == &other[done..done + piece]
        })
    }

    /// Mapped bytes plus the chain links: what this arena holds for its whole life.
    pub fn bytes_reserved(&self) -> u64 {
        self.map_bytes as u64 + self.next.len() as u64 * std::mem::size_of::<u32>() as u64
    }

    /// Pops `blocks` zeroed blocks off the free list as one chain and returns its first block.
    /// The chain is the free list's prefix, so this needs no relinking beyond cutting it off.
    fn take(&mut self, blocks: u32) -> u32 {
        self.take_with(blocks, |block| block.fill(0))
    }

    /// [`Arena::take`], with each block's bytes, in chain order, set by `fill` instead of zeroed.
    fn take_with(&mut self, blocks: u32, mut fill: impl FnMut(&mut [u8])) -> u32 {
        assert!(blocks > 0);
        assert!(blocks <= self.blocks_free);
        if self.free_head == NIL {
            self.free_head = self.link_fresh(blocks);
        }
        let first = self.free_head;
        let mut block = first;
        for taken in 1..=blocks {
            debug_assert_ne!(block, NIL, "free list shorter than blocks_free");
            // SAFETY: `block` came off the free list, so `block < blocks_total` and
            // `block_bytes` bytes from its start lie in the mapping; `&mut self` is held and no
            // chain (so no slice handed out) covers a free block.
            let bytes = unsafe {
                std::slice::from_raw_parts_mut(self.block_ptr(block), self.block_bytes as usize)
            };
            fill(bytes);
            if taken < blocks {
                if self.next[block as usize] == NIL {
                    // The linked part ends here: the never-taken blocks follow.
                    self.next[block as usize] = self.link_fresh(blocks - taken);
                }
                block = self.next[block as usize];
            }
        }
        self.free_head = self.next[block as usize];
        self.next[block as usize] = NIL;
        self.blocks_free -= blocks;
        debug_assert!(self.blocks_free == 0 || self.free_front() != NIL);
        first
    }

    /// Links the next `blocks` never-taken blocks as a list ending in [`NIL`]; returns its first.
    fn link_fresh(&mut self, blocks: u32) -> u32 {
        let first = self.fresh;
        let end = first + blocks;
        assert!(
            end <= self.blocks_total,
            "free list shorter than blocks_free"
        );
        for block in first..end {
            self.next[block as usize] = if block + 1 == end { NIL } else { block + 1 };
        }
        self.fresh = end;
        first
    }

    /// The block the free list starts with (`NIL` when none is free).
    fn free_front(&self) -> u32 {
        if self.free_head != NIL || self.fresh == self.blocks_total {
            self.free_head
        } else {
            self.fresh
        }
    }

    /// Whether the first `blocks` blocks of the free list (at least that many are free) are
    /// consecutive in memory.
    fn free_prefix_is_consecutive(&self, blocks: u32) -> bool {
        let mut block = self.free_front();
        for _ in 1..blocks {
            let next = match self.next_free(block) {
                NIL => return false,
                next => next,
            };
            if next != block + 1 {
                return false;
            }
            block = next;
        }
        true
    }

    /// The block after free block `block` on the free list (`NIL` at its end).
    fn next_free(&self, block: u32) -> u32 {
        if block >= self.fresh {
            return if block + 1 < self.blocks_total {
                block + 1
            } else {
                NIL
            };
        }
        match self.next[block as usize] {
            NIL if self.fresh < self.blocks_total => self.fresh,
            next => next,
        }
    }

    /// Pushes the chain starting at `first` onto the front of the free list; returns its length.
    fn give(&mut self, first: u32) -> u32 {
        let blocks_used = self.blocks_total - self.blocks_free;
        let mut blocks = 1;
        let mut tail = first;
        while self.next[tail as usize] != NIL {
            tail = self.next[tail as usize];
            blocks += 1;
            // A chain longer than every block in use is a cycle, i.e. a double free or a
            // corrupted link.
            assert!(blocks <= blocks_used, "chain {first} is not a live chain");
        }
        assert!(blocks <= blocks_used, "chain {first} is not a live chain");
        self.next[tail as usize] = self.free_head;
        self.free_head = first;
        self.blocks_free += blocks;
        blocks
    }

    /// The block `steps` links along the chain from `handle`. Asserts the chain is that long.
    fn walk(&self, handle: u32, steps: u32) -> u32 {
        debug_assert!(handle < self.blocks_total);
        let mut block = handle;
        for _ in 0..steps {
            block = self.next[block as usize];
            assert_ne!(block, NIL, "access beyond the chain of handle {handle}");
        }
        block
    }

    /// Position of byte `offset` of a chain: (block number along the chain, offset in that
    /// block). Offsets in the first block skip the division: most records live there.
    fn locate(&self, offset: usize) -> (u32, usize) {
        let block_bytes = self.block_bytes as usize;
        if offset < block_bytes {
            return (0, offset);
        }
        let steps = offset / block_bytes;
        assert!(
            steps < self.blocks_total as usize,
            "offset {offset} beyond any chain"
        );
        (steps as u32, offset % block_bytes)
    }

    /// Hint that the head block of `handle` (and its chain link) will be read soon. The cache
    /// line after the block's start is requested too: a chain allocated in one piece continues
    /// there, and the fixed part and state values of a payload usually span it.
    #[inline]
    pub fn prefetch(&self, handle: u32) {
        if handle < self.blocks_total {
            // SAFETY: `handle < blocks_total`, so the block lies inside the mapping.
            let block = unsafe { self.block_ptr(handle) };
            super::prefetch::read(block);
            // A hint never faults, even past the mapping's end.
            super::prefetch::read(block.wrapping_add(64));
            super::prefetch::read(&self.next[handle as usize]);
        }
    }

    /// Pointer to `[offset, offset + len)` of the chain if that lies within one block.
    fn piece(&self, handle: u32, offset: usize, len: usize) -> Option<*mut u8> {
        assert!(handle < self.blocks_total, "handle {handle}");
        if len == 0 {
            return Some(NonNull::dangling().as_ptr());
        }
        let (steps, within) = self.locate(offset);
        if within + len > self.block_bytes as usize {
            return None;
        }
        let block = self.walk(handle, steps);
        // SAFETY: `block < blocks_total` and `within + len <= block_bytes`.
        Some(unsafe { self.block_ptr(block).add(within) })
    }

    /// Calls `f(ptr, done, piece)` for each within-block piece of `[offset, offset + len)` of the
    /// chain, in order, where `done` bytes precede the piece; stops early (and returns false) when
    /// `f` does. Asserts the whole range lies on the chain.
    fn span(
        &self,
        handle: u32,
        offset: usize,
        len: usize,
        mut f: impl FnMut(*mut u8, usize, usize) -> bool,
    ) -> bool {
        assert!(handle < self.blocks_total, "handle {handle}");
        if len == 0 {
            return true;
        }
        let block_bytes = self.block_bytes as usize;
        let (steps, mut within) = self.locate(offset);
        let mut block = self.walk(handle, steps);
        let mut done = 0;
        loop {
            let piece = (block_bytes - within).min(len - done);
            debug_assert!(piece > 0);
            // SAFETY: `block < blocks_total` and `within + piece <= block_bytes`.
            let ptr = unsafe { self.block_ptr(block).add(within) };
            if !f(ptr, done, piece) {
                return false;
            }
            done += piece;
            if done == len {
                return true;
            }
            block = self.next[block as usize];
            assert_ne!(block, NIL, "access beyond the chain of handle {handle}");
            within = 0;
        }
    }

    /// Start of `block` in the mapping.
    ///
    /// # Safety
    /// `block < blocks_total` (debug-asserted), so `block_bytes` bytes from the result lie in the
    /// mapping.
    unsafe fn block_ptr(&self, block: u32) -> *mut u8 {
        debug_assert!(block < self.blocks_total);
        // SAFETY: per the contract, the offset is within the mapping of `map_bytes` bytes.
        unsafe {
            self.base
                .as_ptr()
                .add(block as usize * self.block_bytes as usize)
        }
    }

    /// Checks the free-list invariants by walking the free list. O(blocks); for construction
    /// and tests.
    fn verify(&self) {
        assert_eq!(self.next.len(), self.blocks_total as usize);
        assert!(self.blocks_free <= self.blocks_total);
        assert!(self.fresh <= self.blocks_total);
        let mut blocks = self.blocks_total - self.fresh;
        let mut block = self.free_head;
        while block != NIL {
            assert!(
                block < self.fresh,
                "a never-taken block {block} on the linked list"
            );
            blocks += 1;
            assert!(
                blocks <= self.blocks_free,
                "free list longer than blocks_free"
            );
            block = self.next[block as usize];
        }
        assert_eq!(blocks, self.blocks_free);
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        // SAFETY: `base`/`map_bytes` are exactly the mapping made in `new`; every view of it
        // borrows the arena, so none outlives this call.
        let rc = unsafe { libc::munmap(self.base.as_ptr().cast(), self.map_bytes) };
        debug_assert_eq!(rc, 0, "munmap: {}", io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arena(blocks: u64, block_bytes: u32) -> Arena {
        Arena::new(blocks * u64::from(block_bytes), block_bytes, None).unwrap()
    }

    #[test]
    fn geometry() {
        let arena = arena(100, 24);
        assert_eq!(arena.blocks_total(), 100);
        assert_eq!(arena.blocks_free(), 100);
        assert_eq!(arena.block_bytes(), 24);
        assert_eq!(arena.blocks_for(0), 1);
        assert_eq!(arena.blocks_for(1), 1);
        assert_eq!(arena.blocks_for(24), 1);
        assert_eq!(arena.blocks_for(25), 2);
        assert_eq!(arena.blocks_for(usize::MAX), u32::MAX);
        assert!(arena.bytes_reserved() >= 100 * 24 + 100 * 4);
        // A remainder smaller than a block is not a block.
        let arena = Arena::new(100 * 24 + 23, 24, None).unwrap();
        assert_eq!(arena.blocks_total(), 100);
    }

    #[test]
    fn numa_node_is_best_effort() {
        let node = numa::node_of_cpu(0).unwrap_or(0);
        let mut arena = Arena::new(1 << 20, 64, Some(node)).unwrap();
        let handle = arena.alloc(100).unwrap();
        arena.write(handle, 90, b"0123456789");
        assert!(arena.eq_at(handle, 90, b"0123456789"));
    }

    #[test]
    fn pages_backed_on_demand_read_as_zero_and_hold_what_is_written() {
        let mut arena = Arena::with_pages(64 << 20, 64, None, Pages::OnDemand).unwrap();
        assert_eq!(arena.blocks_total(), 1 << 20);
        let first = arena.alloc(100).unwrap();
        let mut zeros = [1u8; 100];
        arena.read(first, 0, &mut zeros);
        assert_eq!(zeros, [0u8; 100]);
        arena.write(first, 90, b"0123456789");
        assert!(arena.eq_at(first, 90, b"0123456789"));
        // Far into the mapping, on pages nothing has touched yet.
        let rest = arena.alloc(63 << 20).unwrap();
        arena.write(rest, (63 << 20) - 10, b"0123456789");
        assert!(arena.eq_at(rest, (63 << 20) - 10, b"0123456789"));
        arena.verify();
    }

    #[test]
    fn freed_blocks_are_reused_first() {
        let mut arena = arena(16, 8);
        let a = arena.alloc(24).unwrap();
        let b = arena.alloc(8).unwrap();
        assert_eq!((a, b), (0, 3));
        arena.free(a);
        assert_eq!(arena.alloc(8), Some(a));
        // The rest of a's old chain is next in line.
        assert_eq!(arena.alloc(16), Some(1));
        assert!(arena.resize(b, 8, 9));
        arena.free(b);
        assert_eq!(arena.alloc(1), Some(b));
    }

    #[test]
    fn slices_are_8_byte_aligned_and_bounded_by_one_block() {
        let mut arena = arena(8, 24);
        let handle = arena.alloc(60).unwrap();
        for offset in [0, 24, 48] {
            let slice = arena.slice(handle, offset, 8).unwrap();
            assert_eq!(slice.as_ptr() as usize % 8, 0);
        }
        assert!(arena.slice(handle, 20, 4).is_some());
        assert!(arena.slice(handle, 20, 5).is_none());
        assert_eq!(arena.slice(handle, 71, 0), Some(&[][..]));
        arena
            .slice_mut(handle, 30, 3)
            .unwrap()
            .copy_from_slice(b"abc");
        let mut out = [0u8; 5];
        arena.read(handle, 29, &mut out);
        assert_eq!(&out, b"\0abc\0");
    }

    #[test]
    fn grow_zeroes_bytes_past_the_old_length() {
        let mut arena = arena(8, 16);
        let handle = arena.alloc(16).unwrap();
        arena.write(handle, 0, &[0xff; 16]);
        assert!(arena.resize(handle, 16, 4));
        assert!(arena.resize(handle, 4, 40));
        let mut out = [0xaau8; 40];
        arena.read(handle, 0, &mut out);
        assert_eq!(&out[..4], &[0xff; 4]);
        assert!(out[4..].iter().all(|&b| b == 0));
    }

    #[test]
    #[should_panic(expected = "beyond the chain")]
    fn write_past_the_chain_panics() {
        let mut arena = arena(8, 16);
        let handle = arena.alloc(20).unwrap();
        arena.write(handle, 30, b"xyz");
    }

    #[test]
    #[should_panic(expected = "beyond the chain")]
    fn slice_past_the_chain_panics() {
        let mut arena = arena(8, 16);
        let handle = arena.alloc(16).unwrap();
        let _ = arena.slice(handle, 16, 1);
    }

    #[test]
    #[should_panic(expected = "not a live chain")]
    fn freeing_the_whole_free_list_panics() {
        let mut arena = arena(4, 8);
        let handle = arena.alloc(8).unwrap();
        arena.free(handle);
        // The handle is now the head of the free list: freeing it again walks all of it.
        arena.free(handle);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Alloc(usize),
        AllocCopy(Vec<u8>),
        Free(usize),
        Reset,
        Resize(usize, usize),
        Write(usize, usize, Vec<u8>),
        Read(usize, usize, usize),
        Slice(usize, usize, usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0usize..100).prop_map(Op::Alloc),
            2 => prop::collection::vec(any::<u8>(), 0..100).prop_map(Op::AllocCopy),
            2 => any::<usize>().prop_map(Op::Free),
            2 => (any::<usize>(), 0usize..100).prop_map(|(i, n)| Op::Resize(i, n)),
            3 => (any::<usize>(), any::<usize>(), prop::collection::vec(any::<u8>(), 0..40))
                .prop_map(|(i, o, b)| Op::Write(i, o, b)),
            2 => (any::<usize>(), any::<usize>(), any::<usize>()).prop_map(|(i, o, n)| Op::Read(i, o, n)),
            1 => (any::<usize>(), any::<usize>(), any::<usize>()).prop_map(|(i, o, n)| Op::Slice(i, o, n)),
            1 => Just(Op::Reset),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Against a `Vec<Vec<u8>>` model (one zero-filled `Vec` per live chain): contents,
        /// exhaustion and exact `blocks_free` accounting after every step.
        #[test]
        fn matches_model(
            blocks in 1u64..48,
            block_bytes in prop::sample::select(vec![8u32, 16, 24, 64]),
            on_demand in any::<bool>(),
            ops in prop::collection::vec(op(), 0..200),
        ) {
            let pages = if on_demand { Pages::OnDemand } else { Pages::Prefault };
            let mut arena =
                Arena::with_pages(blocks * u64::from(block_bytes), block_bytes, None, pages).unwrap();
            let blocks_for = |len: usize| (len.div_ceil(block_bytes as usize)).max(1) as u32;
            let mut model: Vec<(u32, Vec<u8>)> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc(len) => {
                        let fits = blocks_for(len) <= arena.blocks_free();
                        match arena.alloc(len) {
                            Some(handle) => {
                                prop_assert!(fits);
                                prop_assert!(model.iter().all(|(h, _)| *h != handle));
                                model.push((handle, vec![0; len]));
                            }
                            None => prop_assert!(!fits),
                        }
                    }
                    Op::AllocCopy(src) => {
                        let fits = blocks_for(src.len()) <= arena.blocks_free();
                        match arena.alloc_copy(&src) {
                            Some(handle) => {
                                prop_assert!(fits);
                                prop_assert!(model.iter().all(|(h, _)| *h != handle));
                                model.push((handle, src));
                            }
                            None => prop_assert!(!fits),
                        }
                    }
                    Op::Reset => {
                        arena.reset();
                        model.clear();
                        prop_assert_eq!(arena.alloc(0), Some(0), "the free list starts over");
                        model.push((0, Vec::new()));
                    }
                    Op::Free(i) if !model.is_empty() => {
                        let (handle, _) = model.swap_remove(i % model.len());
                        arena.free(handle);
                    }
                    Op::Resize(i, new_len) if !model.is_empty() => {
                        let i = i % model.len();
                        let (handle, ref mut bytes) = model[i];
                        let old_len = bytes.len();
                        let fits = blocks_for(new_len).saturating_sub(blocks_for(old_len)) <= arena.blocks_free();
                        let free_before = arena.blocks_free();
                        let resized = arena.resize(handle, old_len, new_len);
                        prop_assert_eq!(resized, fits);
                        if resized {
                            bytes.resize(new_len, 0);
                        } else {
                            prop_assert_eq!(arena.blocks_free(), free_before);
                        }
                    }
                    Op::Write(i, offset, src) if !model.is_empty() => {
                        let i = i % model.len();
                        let (handle, ref mut bytes) = model[i];
                        if src.len() <= bytes.len() {
                            let offset = offset % (bytes.len() - src.len() + 1);
                            arena.write(handle, offset, &src);
                            bytes[offset..offset + src.len()].copy_from_slice(&src);
                        }
                    }
                    Op::Read(i, offset, len) if !model.is_empty() => {
                        let (handle, ref bytes) = model[i % model.len()];
                        let offset = offset % (bytes.len() + 1);
                        let len = len % (bytes.len() - offset + 1);
                        let mut dst = vec![0xa5; len];
                        arena.read(handle, offset, &mut dst);
                        prop_assert_eq!(&dst[..], &bytes[offset..offset + len]);
                        prop_assert!(arena.eq_at(handle, offset, &bytes[offset..offset + len]));
                        if len > 0 {
                            let mut other = bytes[offset..offset + len].to_vec();
                            other[len - 1] ^= 1;
                            prop_assert!(!arena.eq_at(handle, offset, &other));
                        }
                    }
                    Op::Slice(i, offset, len) if !model.is_empty() => {
                        let (handle, ref bytes) = model[i % model.len()];
                        let offset = offset % (bytes.len() + 1);
                        let len = len % (bytes.len() - offset + 1);
                        let one_block = len == 0
                            || offset / block_bytes as usize == (offset + len - 1) / block_bytes as usize;
                        match arena.slice(handle, offset, len) {
                            Some(view) => {
                                prop_assert!(one_block);
                                prop_assert_eq!(view, &bytes[offset..offset + len]);
                            }
                            None => prop_assert!(!one_block),
                        }
                    }
                    _ => {}
                }
                let used: u32 = model.iter().map(|(_, bytes)| blocks_for(bytes.len())).sum();
                prop_assert_eq!(arena.blocks_free(), arena.blocks_total() - used);
                arena.verify();
            }
            for (handle, _) in model {
                arena.free(handle);
            }
            prop_assert_eq!(arena.blocks_free(), arena.blocks_total());
        }

        /// An arena whose links are written on demand hands out the handles one written at
        /// construction would, for the same operations.
        #[test]
        fn on_demand_takes_the_blocks_written_now_would(
            blocks in 1u64..48,
            ops in prop::collection::vec(op(), 0..200),
        ) {
            let bytes = blocks * 16;
            let mut now = Arena::with_pages(bytes, 16, None, Pages::Prefault).unwrap();
            let mut later = Arena::with_pages(bytes, 16, None, Pages::OnDemand).unwrap();
            let mut live: Vec<(u32, usize)> = Vec::new();
            for op in ops {
                match op {
                    Op::Alloc(len) => {
                        let h = now.alloc(len);
                        prop_assert_eq!(later.alloc(len), h);
                        live.extend(h.map(|h| (h, len)));
                    }
                    Op::AllocCopy(src) => {
                        let h = now.alloc_copy(&src);
                        prop_assert_eq!(later.alloc_copy(&src), h);
                        live.extend(h.map(|h| (h, src.len())));
                    }
                    Op::Free(i) if !live.is_empty() => {
                        let (h, _) = live.swap_remove(i % live.len());
                        now.free(h);
                        later.free(h);
                    }
                    Op::Resize(i, len) if !live.is_empty() => {
                        let i = i % live.len();
                        let (h, old) = live[i];
                        let resized = now.resize(h, old, len);
                        prop_assert_eq!(later.resize(h, old, len), resized);
                        if resized {
                            live[i].1 = len;
                        }
                    }
                    Op::Reset => {
                        now.reset();
                        later.reset();
                        live.clear();
                    }
                    _ => {}
                }
                prop_assert_eq!(later.blocks_free(), now.blocks_free());
                later.verify();
            }
        }
    }
}
