//! Memory hints for the data path. Software prefetch: a hint that memory will be read soon, so the cache misses of several
//! upcoming events overlap instead of stalling one after another.

#[inline(always)]
pub fn read<T>(ptr: *const T) {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: prefetch is a hint that never faults, whatever the address; SSE is part of the
        // x86_64 baseline.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}

/// Ask for transparent huge pages on the page-aligned interior of a fresh, untouched allocation
/// of `len` elements: random lookups in the session table and index then miss the TLB far less.
/// Advisory; errors (no THP, old kernel) are ignored.
pub fn advise_huge_pages<T>(ptr: *mut T, len: usize) {
    const PAGE: usize = 4096;
    let start = (ptr as usize).next_multiple_of(PAGE);
    let end = (ptr as usize + len * std::mem::size_of::<T>()) & !(PAGE - 1);
    if end > start {
        // SAFETY: madvise only changes paging policy of memory this allocation owns (the range
        // lies inside it); it never faults or moves data.
        let _ =
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    }
}
