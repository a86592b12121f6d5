//! Stage 1 of decoding: the structural index. Classifies the line 64 bytes at a time into
//! bitmasks (quotes, backslashes, whitespace, structural characters, control bytes, non-ASCII)
//! and from them writes the offsets of every token start: structural characters outside
//! strings, every unescaped quote (opening and closing), and the first byte of every run of
//! other bytes outside strings (a literal, a number, or garbage for stage 2 to reject).
//!
//! Invariants kept for stage 2 (`scan`): offsets are strictly increasing and followed by a
//! sentinel equal to the line length; quote offsets alternate opening, closing, so the token
//! after an opening quote is its closing quote; between two consecutive tokens outside a string
//! there is only JSON whitespace, or the tail of the run the first one starts. A line whose
//! strings hold a raw control byte or never close is rejected here, so stage 2 never sees one.
//! Escapes and UTF-8 are only summarised here (`any_backslash`, `any_non_ascii`): stage 2
//! validates the few strings that need it.
//!
//! This is the simdjson stage-1 design. Its cost is per 64 bytes, whatever the strings hold, so
//! long values (user agents, URLs) cost no more per byte than short ones; a token-at-a-time
//! scanner with an eight-byte string loop measured about the same on the ~190-byte clickstream
//! bench (~4.8k instructions per event either way) but loops per eight bytes of every string.

use super::DecodeError;

/// What the classifier found in one 64-byte block; bit `j` is byte `j` of the block.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Masks {
    pub(super) quote: u64,
    pub(super) backslash: u64,
    /// ' ', '\t', '\n', '\r'.
    pub(super) whitespace: u64,
    /// '{', '}', '[', ']', ':', ','.
    pub(super) structural: u64,
    /// Bytes < 0x20.
    pub(super) control: u64,
    /// Bytes >= 0x80.
    pub(super) non_ascii: u64,
}

/// Portable classifier; the reference the SIMD one is tested against.
#[cfg_attr(all(target_arch = "x86_64", not(test)), allow(dead_code))]
pub(super) fn classify_scalar(block: &[u8; 64]) -> Masks {
    let mut m = Masks::default();
    for (j, &c) in block.iter().enumerate() {
        let bit = 1u64 << j;
        match c {
            b'"' => m.quote |= bit,
            b'\\' => m.backslash |= bit,
            b'{' | b'}' | b'[' | b']' | b':' | b',' => m.structural |= bit,
            _ => {}
        }
        if matches!(c, b' ' | b'\t' | b'\n' | b'\r') {
            m.whitespace |= bit;
        }
        if c < 0x20 {
            m.control |= bit;
        }
        if c >= 0x80 {
            m.non_ascii |= bit;
        }
    }
    m
}

/// SSE2 classifier. SSE2 is part of the x86_64 baseline, so no runtime detection is needed;
/// it is not a `#[target_feature]` function so that it can inline into the block loop.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) fn classify(block: &[u8; 64]) -> Masks {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };
    let mut m = Masks::default();
    for (j, chunk) in block.chunks_exact(16).enumerate() {
        let shift = 16 * j;
        // SAFETY: every intrinsic here requires only SSE2, which all x86_64 CPUs have (the
        // target's baseline enables it). `_mm_loadu_si128` reads exactly the 16 bytes of
        // `chunk`, a 16-byte slice (`chunks_exact`), and has no alignment requirement.
        unsafe {
            let v = _mm_loadu_si128(chunk.as_ptr().cast::<__m128i>());
            let eq = |c: u8| _mm_cmpeq_epi8(v, _mm_set1_epi8(c as i8));
            let bits = |x| u64::from(_mm_movemask_epi8(x) as u16) << shift;
            // c | 0x20 folds '[' onto '{' and ']' onto '}'.
            let folded = _mm_or_si128(v, _mm_set1_epi8(0x20));
            let fold_eq = |c: u8| _mm_cmpeq_epi8(folded, _mm_set1_epi8(c as i8));
            m.quote |= bits(eq(b'"'));
            m.backslash |= bits(eq(b'\\'));
            m.whitespace |= bits(_mm_or_si128(
                _mm_or_si128(eq(b' '), eq(b'\t')),
                _mm_or_si128(eq(b'\n'), eq(b'\r')),
            ));
            m.structural |= bits(_mm_or_si128(
                _mm_or_si128(fold_eq(b'{'), fold_eq(b'}')),
                _mm_or_si128(eq(b':'), eq(b',')),
            ));
            m.control |= bits(_mm_cmpeq_epi8(_mm_min_epu8(v, _mm_set1_epi8(0x1f)), v));
            m.non_ascii |= bits(v);
        }
    }
    m
}

/// AVX2 classifier: the same masks as `classify`, 32 bytes per instruction. Called (not
/// inlined) from the baseline block loop: compiling that loop for AVX2 made LLVM vectorize the
/// offset stores badly (measured 2x slower), and one call per 64 bytes is cheap.
///
/// Measured per event on the clickstream bench (CPU time, loaded 2-vCPU box): AVX2 ~305-330 ns,
/// SSE2 ~337 ns (10% more instructions), `classify_scalar` ~790 ns. The SIMD `unsafe` pays.
///
/// # Safety
/// The CPU must support AVX2 (see `Isa::detect`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
pub(super) unsafe fn classify_avx2(block: &[u8; 64]) -> Masks {
    use std::arch::x86_64::{
        __m256i, _mm256_cmpeq_epi8, _mm256_loadu_si256, _mm256_min_epu8, _mm256_movemask_epi8,
        _mm256_or_si256, _mm256_set1_epi8,
    };
    let mut m = Masks::default();
    for (j, chunk) in block.chunks_exact(32).enumerate() {
        let shift = 32 * j;
        // SAFETY: `_mm256_loadu_si256` reads exactly the 32 bytes of `chunk`, a valid
        // 32-byte slice (`chunks_exact`), and has no alignment requirement; AVX2 is enabled here.
        unsafe {
            let v = _mm256_loadu_si256(chunk.as_ptr().cast::<__m256i>());
            let eq = |c: u8| _mm256_cmpeq_epi8(v, _mm256_set1_epi8(c as i8));
            let bits = |x| u64::from(_mm256_movemask_epi8(x) as u32) << shift;
            let folded = _mm256_or_si256(v, _mm256_set1_epi8(0x20));
            let fold_eq = |c: u8| _mm256_cmpeq_epi8(folded, _mm256_set1_epi8(c as i8));
            m.quote |= bits(eq(b'"'));
            m.backslash |= bits(eq(b'\\'));
            m.whitespace |= bits(_mm256_or_si256(
                _mm256_or_si256(eq(b' '), eq(b'\t')),
                _mm256_or_si256(eq(b'\n'), eq(b'\r')),
            ));
            m.structural |= bits(_mm256_or_si256(
                _mm256_or_si256(fold_eq(b'{'), fold_eq(b'}')),
                _mm256_or_si256(eq(b':'), eq(b',')),
            ));
            m.control |= bits(_mm256_cmpeq_epi8(
                _mm256_min_epu8(v, _mm256_set1_epi8(0x1f)),
                v,
            ));
            m.non_ascii |= bits(v);
        }
    }
    m
}

/// Which classifier the CPU allows; detected once per `Decoder`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Isa {
    /// SSE2 on x86_64, scalar elsewhere.
    Baseline,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Isa {
    pub(super) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            return Isa::Avx2;
        }
        Isa::Baseline
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
pub(super) fn classify(block: &[u8; 64]) -> Masks {
    classify_scalar(block)
}

/// Bit `j` set when byte `j` of the block is escaped by a backslash. `carry` says the previous
/// block ended with an escaping backslash, and is updated for the next block. Backslashes are
/// rare, so a sequential walk over them is cheaper than it looks and obviously right.
#[inline(always)]
pub(super) fn escaped_bits(backslash: u64, carry: &mut bool) -> u64 {
    let mut escaped = u64::from(*carry);
    *carry = false;
    let mut rest = backslash;
    while rest != 0 {
        let p = rest.trailing_zeros();
        rest &= rest - 1;
        if escaped & (1u64 << p) != 0 {
            continue; // an escaped backslash escapes nothing
        }
        if p == 63 {
            *carry = true;
        } else {
            escaped |= 1u64 << (p + 1);
        }
    }
    escaped
}

/// Bit `j` set when an odd number of bits at or below `j` are set: turns quote positions into
/// "inside a string" (opening quote and body set, closing quote clear).
#[inline(always)]
fn prefix_xor(mut x: u64) -> u64 {
    x ^= x << 1;
    x ^= x << 2;
    x ^= x << 4;
    x ^= x << 8;
    x ^= x << 16;
    x ^= x << 32;
    x
}

/// The summary stage 2 needs besides the offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Index {
    /// Number of token offsets written; `tokens[count]` is the sentinel `line.len()`.
    pub(super) count: usize,
    pub(super) any_backslash: bool,
    pub(super) any_non_ascii: bool,
}

/// Slack `tokens` needs past `line.len() + 1`: a block's offsets are written eight at a time
/// without checking how many there are (branch-free), and up to 64 may be stored.
pub(super) const TOKENS_SLACK: usize = 64;

/// Writes the token offsets of `b` into `tokens` (at least `b.len() + 1 + TOKENS_SLACK` long) and,
/// per 64-byte block, the backslashes inside strings into `escapes` (at least
/// `b.len().div_ceil(64)` long), so stage 2 can tell which strings need unescaping.
pub(super) fn build(
    isa: Isa,
    b: &[u8],
    tokens: &mut [u32],
    escapes: &mut [u64],
) -> Result<Index, DecodeError> {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => build_with(b, tokens, escapes, |block| {
            // SAFETY: `Isa::Avx2` is only ever produced by `Isa::detect` on a CPU with AVX2.
            unsafe { classify_avx2(block) }
        }),
        Isa::Baseline => build_with(b, tokens, escapes, classify),
    }
}

/// Stores the offsets of the lowest eight set bits of `t` (clearing them), and garbage for the
/// missing ones. Straight-line on purpose: as a loop LLVM vectorized it into byte inserts.
#[inline(always)]
fn emit8(dst: &mut [u32; 8], base: u32, t: &mut u64) {
    macro_rules! one {
        ($i:expr) => {
            dst[$i] = base + t.trailing_zeros();
            *t &= t.wrapping_sub(1);
        };
    }
    one!(0);
    one!(1);
    one!(2);
    one!(3);
    one!(4);
    one!(5);
    one!(6);
    one!(7);
}

#[inline(always)]
fn build_with(
    b: &[u8],
    tokens: &mut [u32],
    escapes: &mut [u64],
    classify: impl Fn(&[u8; 64]) -> Masks,
) -> Result<Index, DecodeError> {
    let n = b.len();
    assert!(
        tokens.len() >= n + 1 + TOKENS_SLACK
            && escapes.len() >= n.div_ceil(64)
            && n < u32::MAX as usize
    );
    let mut count = 0usize;
    let mut inside_carry = 0u64; // all ones when the previous block ended inside a string
    let mut escape_carry = false;
    let mut run_carry = 0u64; // 1 when the previous block ended inside a run of other bytes
    let (mut any_backslash, mut any_non_ascii, mut bad) = (0u64, 0u64, 0u64);
    let mut base = 0usize;
    while base < n {
        let m = match b.get(base..base + 64) {
            Some(block) => classify(block.try_into().expect("64 bytes")),
            None => {
                // Spaces make no tokens and no errors, so the tail needs no validity mask.
                let mut block = [b' '; 64];
                block[..n - base].copy_from_slice(&b[base..]);
                classify(&block)
            }
        };
        let escaped = if m.backslash == 0 && !escape_carry {
            0
        } else {
            escaped_bits(m.backslash, &mut escape_carry)
        };
        let quote = m.quote & !escaped;
        let inside = prefix_xor(quote) ^ inside_carry;
        inside_carry = ((inside as i64) >> 63) as u64;
        bad |= m.control & inside;
        let run = !(m.whitespace | m.structural | quote | inside);
        let run_start = run & !((run << 1) | run_carry);
        run_carry = run >> 63;
        any_backslash |= m.backslash;
        any_non_ascii |= m.non_ascii;
        escapes[base / 64] = m.backslash & inside;

        let mut t = (m.structural & !inside) | quote | run_start;
        let found = t.count_ones() as usize;
        let groups = tokens[count..count + TOKENS_SLACK].chunks_exact_mut(8);
        // Eight at a time, past the last one found if need be (those are overwritten by the
        // next block or the sentinel): one predictable branch per eight tokens instead of an
        // unpredictable one per token.
        for group in groups.take(found.div_ceil(8)) {
            emit8(
                group.try_into().expect("eight offsets"),
                base as u32,
                &mut t,
            );
        }
        count += found;
        base += 64;
    }
    if inside_carry != 0 || bad != 0 {
        return Err(DecodeError::Syntax);
    }
    tokens[count] = n as u32;
    Ok(Index {
        count,
        any_backslash: any_backslash != 0,
        any_non_ascii: any_non_ascii != 0,
    })
}
