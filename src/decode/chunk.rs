//! The string-body classifier: which of 16 bytes can end the fast path of a string body (a
//! quote, a backslash, a raw control byte).
//!
//! Invariants: `classify16` and `classify16_scalar` return identical masks for every input
//! (tested); bit `j` of a mask is byte `j` of the chunk. Both only read the 16 bytes given.

/// Portable classifier; the reference the SIMD one is tested against.
#[cfg_attr(all(target_arch = "x86_64", not(test)), allow(dead_code))]
#[inline(always)]
pub(super) fn classify16_scalar(chunk: &[u8; 16]) -> u32 {
    let mut special = 0;
    for (j, &c) in chunk.iter().enumerate() {
        if c == b'"' || c == b'\\' || c < 0x20 {
            special |= 1 << j;
        }
    }
    special
}

/// SSE2 classifier: six vector instructions and a mask move per 16 bytes. SSE2 is part of the
/// x86_64 baseline, so it needs no runtime detection and inlines into the string loop.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn classify16(chunk: &[u8; 16]) -> u32 {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };
    // SAFETY: every intrinsic here requires only SSE2, which all x86_64 CPUs have (the
    // target's baseline enables it). `_mm_loadu_si128` reads exactly the 16 bytes of `chunk`
    // and has no alignment requirement.
    unsafe {
        let v = _mm_loadu_si128(chunk.as_ptr().cast::<__m128i>());
        let quote = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'"' as i8));
        let backslash = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\\' as i8));
        let control = _mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1f)), v);
        _mm_movemask_epi8(_mm_or_si128(_mm_or_si128(quote, backslash), control)) as u32
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
pub(super) fn classify16(chunk: &[u8; 16]) -> u32 {
    classify16_scalar(chunk)
}
