//! The decoder's fast path, for lines without escapes or control bytes, which most event lines
//! are. It classifies the whole line 64 bytes at a time into bit masks first, compresses the
//! tokens' offsets out of them, then walks those: `walk_flat` when no container opens past the
//! first byte, `walk_nested` otherwise. Finding the next token is a load from that list, where
//! `scan` follows a chain of dependent loads from one string's end to the next (a 140-byte flat
//! line of six members: 82 -> 55 ns; a 185-byte line with nested objects and an array: 136 ->
//! 124 ns; `bench/RESULTS.md`, "JSON decoder").
//!
//! Invariants: the fast path only ever accepts. A line it is not sure of makes it decline:
//! a backslash, a raw control byte (tabs and CRs between tokens included: producers write
//! compact or space-separated JSON), a byte >= 0x80 in a line that is not UTF-8, any grammar
//! fault, a duplicate field, nesting past `depth_max` or `NESTING_MAX`, a line of more than
//! `BLOCKS_MAX` blocks. `scan` then decodes the line again and names the fault, so errors and
//! their order are `scan`'s alone. On the lines it accepts, the two give the same slots,
//! members and `_session` span (proptests check it on the same lines). It reads the line in
//! place, never past its end (the last block's load is masked, or copied for AVX2), and, like
//! `scan`, writes a slot at most once.

use super::scan::{container_node, record_slot, top_key, KeyMemo, SessionSpan, Slot, SlotKind};
use super::scan::{COMMA_NONE, SESSION_KEY, SESSION_PREFIX};
use super::table::{key_prefix, FieldTable, NODE_NONE, NODE_ROOT, SLOT_NONE};

/// Lines of up to 16 blocks (1 KiB) take the fast path.
pub(super) const BLOCKS_MAX: usize = 16;
const BLOCK: usize = 64;
/// Room for a token at every byte, and for the last block's full-width store of offsets.
const OFFSETS_CAP: usize = BLOCKS_MAX * BLOCK + BLOCK;
/// Offset 0 written after the last token: the line's opening '{', which `walk_flat` refuses
/// wherever it reads a token (a key's quote, a colon, a value, a separator), so a walk that
/// reaches the end of the list fails at that check with no test of the list's length.
const SENTINEL: u16 = 0;
const _: () = assert!(OFFSETS_CAP > BLOCKS_MAX * BLOCK);

/// The vector instruction set the classifier runs on, chosen once per decoder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kernel {
    /// AVX-512BW with VBMI2, whose byte compress turns a mask into offsets at once.
    Avx512,
    /// AVX2: two 32-byte halves a block, and offsets by a loop over the mask's bits.
    Avx2,
}

impl Kernel {
    /// The best this CPU has, or None (then every line takes `scan`).
    pub(super) fn detect() -> Option<Kernel> {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if !has!("pclmulqdq") || !has!("popcnt") {
                return None;
            }
            if has!("avx512bw") && has!("avx512vbmi2") {
                return Some(Kernel::Avx512);
            }
            if has!("avx2") && has!("bmi1") {
                return Some(Kernel::Avx2);
            }
        }
        None
    }
}

/// One block's bytes of each class, bit `j` for byte `j`.
#[derive(Clone, Copy, Default)]
struct Classes {
    quote: u64,
    backslash: u64,
    /// Below 0x20.
    control: u64,
    /// ' ' (other JSON whitespace is a control byte, which the fast path declines).
    space: u64,
    /// ',' and ':'.
    separator: u64,
    /// '{' and '['.
    open: u64,
    /// '}' and ']'.
    close: u64,
    /// '0' to '9'.
    digit: u64,
    /// 0x80 and above.
    high: u64,
}

/// The line's marks: its tokens as offsets in order, and which bytes are scalars and digits.
/// Lives in the decoder; only the first `blocks` words of each mask and the counted offsets
/// belong to the current line.
pub(super) struct Marks {
    /// Structural bytes outside strings, quotes (a string's closing quote is the token right
    /// after its opening one), and the first byte of each scalar.
    tokens: [u16; OFFSETS_CAP],
    token_count: usize,
    /// Bytes outside strings that are neither whitespace nor structural (numbers, literals, and
    /// garbage the walk rejects).
    scalar: [u64; BLOCKS_MAX],
    digit: [u64; BLOCKS_MAX],
    blocks: usize,
    high: bool,
    /// A container opens somewhere past the line's first byte.
    nested: bool,
}

impl Marks {
    pub(super) fn new() -> Marks {
        Marks {
            tokens: [0; OFFSETS_CAP],
            token_count: 0,
            scalar: [0; BLOCKS_MAX],
            digit: [0; BLOCKS_MAX],
            blocks: 0,
            high: false,
            nested: false,
        }
    }
}

/// The end of the run of set bits of `words` that starts at bit `i` (`i` itself when that
/// bit is clear).
#[inline(always)]
fn run_end(words: &[u64], i: usize) -> usize {
    let (mut k, mut bit) = (i / BLOCK, i % BLOCK);
    loop {
        let ones = (!(words[k] >> bit)).trailing_zeros() as usize;
        if bit + ones < BLOCK || k + 1 == words.len() {
            return k * BLOCK + (bit + ones).min(BLOCK);
        }
        k += 1;
        bit = 0;
    }
}

/// What the walk found beside the slots it filled.
#[derive(Default)]
pub(super) struct Found {
    pub(super) seen: u64,
    pub(super) session: Option<SessionSpan>,
    pub(super) root_members: u32,
}

/// Decodes the object `b` (trimmed, `b[0] == '{'`), or None when it is not one the fast path
/// is sure of. Reads `b` in place: no read goes past its end. Not inlined into `scan`'s
/// caller, whose full scanner would crowd the walk's registers.
#[inline(never)]
pub(super) fn scan(
    kernel: Kernel,
    b: &[u8],
    depth_max: usize,
    table: &FieldTable,
    memo: &mut [KeyMemo],
    slots: &mut [Slot],
    marks: &mut Marks,
) -> Option<Found> {
    if b.len() > BLOCKS_MAX * BLOCK {
        return None;
    }
    if !mark(kernel, b, marks) {
        return None;
    }
    // The first token is the '{' at 0; the last must be the '}' that ends the line.
    let last = *marks.tokens[..marks.token_count].last()?;
    if usize::from(last) != b.len() - 1 || b[b.len() - 1] != b'}' {
        return None;
    }
    let found = if marks.nested {
        walk_nested(marks, b, depth_max, table, memo, slots)?
    } else {
        walk_flat(marks, b, table, memo, slots)?
    };
    // Only string bodies can hold high bytes once the walk accepted (anywhere else they are
    // scalar garbage), so one check of the line covers them.
    if marks.high && std::str::from_utf8(b).is_err() {
        return None;
    }
    Some(found)
}

/// Fills `m` for `b`; false when `b` is certainly not an object the walks accept.
fn mark(kernel: Kernel, b: &[u8], m: &mut Marks) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `Kernel::detect` returned this kernel only if the CPU has its features.
        unsafe {
            match kernel {
                Kernel::Avx512 => x86::mark_avx512(b, m),
                Kernel::Avx2 => x86::mark_avx2(b, m),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (kernel, b, m);
        false
    }
}

/// Folds the classes of each block into marks, carrying strings and scalars across blocks.
/// `classify(start, len)` gives the classes of `b[start..start + len]` (`len <= 64`; bytes
/// past `len` may be in any class: they are masked off here), `prefix_xor` the running XOR of
/// a word's bits, and `offsets(bits, base, out)` writes `base` plus the offset of each set bit
/// to `out`, lowest first (it may write up to 64 entries; `out` has room).
#[inline(always)]
fn mark_with(
    b: &[u8],
    m: &mut Marks,
    classify: impl Fn(usize, usize) -> Classes,
    prefix_xor: impl Fn(u64) -> u64,
    offsets: impl Fn(u64, u16, &mut [u16]),
) -> bool {
    let n = b.len();
    let blocks = n.div_ceil(BLOCK);
    let (mut in_string, mut in_scalar) = (0u64, 0u64);
    let (mut refuse, mut high, mut nested) = (0u64, 0u64, 0u64);
    let mut token_count = 0usize;
    for k in 0..blocks {
        let len = (n - k * BLOCK).min(BLOCK);
        let c = classify(k * BLOCK, len);
        let valid = if len == BLOCK {
            u64::MAX
        } else {
            (1u64 << len) - 1
        };
        let quote = c.quote & valid;
        // From an opening quote (included) to its closing quote (excluded).
        let inside = prefix_xor(quote) ^ in_string;
        in_string = ((inside as i64) >> 63) as u64;
        let outside = valid & !(inside | quote);
        let space = c.space & outside;
        let structural = (c.separator | c.open | c.close) & outside;
        let scalar = outside & !space & !structural;
        let scalar_start = scalar & !((scalar << 1) | in_scalar);
        in_scalar = scalar >> 63;
        refuse |= (c.backslash | c.control) & valid;
        nested |= c.open & outside & if k == 0 { !1 } else { u64::MAX };
        high |= c.high & valid;
        let tokens = structural | quote | scalar_start;
        offsets(tokens, (k * BLOCK) as u16, &mut m.tokens[token_count..]);
        token_count += tokens.count_ones() as usize;
        m.scalar[k] = scalar;
        m.digit[k] = c.digit & scalar;
    }
    m.tokens[token_count] = SENTINEL;
    m.blocks = blocks;
    m.token_count = token_count;
    m.high = high != 0;
    m.nested = nested != 0;
    refuse == 0 && in_string == 0
}

/// Checks the token sequence `{ (key : value (, key : value)*)? }` of a line without nested
/// containers and fills the slots: the common case, with less to track than `walk_nested`.
#[inline(always)]
fn walk_flat(
    m: &Marks,
    b: &[u8],
    table: &FieldTable,
    memo: &mut [KeyMemo],
    slots: &mut [Slot],
) -> Option<Found> {
    let count = m.token_count;
    // The tokens with the sentinel after them. Every read below is at most at `count`: a
    // member starts at `i <= count` (after a real separator); a quote token at `i` opens a
    // string, as the walk takes quotes in pairs and strings hold no tokens, so its close at
    // `i + 1` is real (`mark` refused unclosed strings); each later read follows a real
    // token, and the sentinel fails the check that reads it.
    let tokens = &m.tokens[..count + 1];
    debug_assert_eq!(tokens[count], SENTINEL);
    debug_assert_eq!(b[usize::from(SENTINEL)], b'{');
    let token = |i: usize| {
        debug_assert!(i <= count);
        // SAFETY: `i <= count` (above), and `tokens` has `count + 1` entries.
        usize::from(unsafe { *tokens.get_unchecked(i) })
    };
    let byte = |t: usize| {
        debug_assert!(t < b.len());
        // SAFETY: every token is the offset of a byte of `b` (`mark` sets bits only for
        // `b`'s bytes; the sentinel is 0 and `b` is not empty).
        unsafe { *b.get_unchecked(t) }
    };
    let mut found = Found::default();
    if count == 2 {
        return Some(found);
    }
    let mut i = 1;
    let mut comma = COMMA_NONE;
    loop {
        let t = token(i);
        if byte(t) != b'"' {
            return None;
        }
        let target = top_member(&mut found, memo, table, b, (t, token(i + 1)), comma)?;
        if byte(token(i + 2)) != b':' {
            return None;
        }
        let v = token(i + 3);
        i += 4;
        let (kind, value_end, text) = if byte(v) == b'"' {
            let close = token(i);
            i += 1;
            (SlotKind::String, close + 1, (v + 1, close))
        } else {
            let (kind, end) = scalar_at(m, b, v)?;
            (kind, end, (0, 0))
        };
        record(
            table,
            slots,
            &mut found.seen,
            target,
            kind,
            (v, value_end),
            text,
        )?;
        let s = token(i);
        i += 1;
        match byte(s) {
            b',' => comma = s as u32,
            b'}' => break,
            _ => return None,
        }
    }
    if i != count {
        return None;
    }
    Some(found)
}

/// An open container during the walk.
#[derive(Clone, Copy)]
struct Open {
    /// Its trie node (`NODE_NONE` when nothing at or below it is extracted), as in `scan`.
    node: u32,
    /// Offset of its bracket.
    start: u32,
    is_array: bool,
}

impl Open {
    fn closer(self) -> u8 {
        if self.is_array {
            b']'
        } else {
            b'}'
        }
    }
}

/// The trie node of the top-level key quoted at `quotes` (the offsets of its two quotes),
/// `comma` the separator before it: counts the member and notes a `_session` one (None on a
/// second).
#[inline(always)]
fn top_member(
    found: &mut Found,
    memo: &mut [KeyMemo],
    table: &FieldTable,
    b: &[u8],
    (open, close): (usize, usize),
    comma: u32,
) -> Option<u32> {
    let len = close - open - 1;
    let prefix = key_prefix(b, open + 1, len);
    let key = &b[open + 1..close];
    let target = if len <= 8 {
        top_key(memo, table, found.root_members, key, prefix)
    } else {
        table.child(NODE_ROOT, key, prefix)
    };
    found.root_members += 1;
    if len == SESSION_KEY.len() && prefix == SESSION_PREFIX {
        if found.session.is_some() {
            return None;
        }
        found.session = Some(SessionSpan {
            start: open as u32,
            comma,
        });
    }
    Some(target)
}

/// Records the value of `node`'s path, if extracted: a `kind` whose token is `b[raw]` and
/// whose text (for strings) `b[text]`. None on a second value for its slot.
#[inline(always)]
fn record(
    table: &FieldTable,
    slots: &mut [Slot],
    seen: &mut u64,
    node: u32,
    kind: SlotKind,
    raw: (usize, usize),
    text: (usize, usize),
) -> Option<()> {
    if node == NODE_NONE {
        return Some(());
    }
    let at = table.node(node).slot;
    if at == SLOT_NONE {
        return Some(());
    }
    let value = Slot {
        kind,
        raw_start: raw.0 as u32,
        raw_end: raw.1 as u32,
        text_start: text.0 as u32,
        text_end: text.1 as u32,
    };
    record_slot(slots, seen, at, value).then_some(())
}

/// Containers open at once on the fast path; deeper lines take `scan`.
const NESTING_MAX: usize = 32;

/// Checks the tokens as one JSON object (objects, arrays, strings and scalars within), walks
/// the field trie in step as `scan` does, and fills the slots. Not inlined: `walk_flat`, the
/// common case, keeps `scan`'s registers to itself.
#[inline(never)]
fn walk_nested(
    m: &Marks,
    b: &[u8],
    depth_max: usize,
    table: &FieldTable,
    memo: &mut [KeyMemo],
    slots: &mut [Slot],
) -> Option<Found> {
    let tokens = &m.tokens[..m.token_count];
    let token = |i: usize| tokens.get(i).map(|&t| usize::from(t));
    let mut found = Found::default();
    let depth_max = depth_max.min(NESTING_MAX);
    let mut outer = [Open {
        node: NODE_NONE,
        start: 0,
        is_array: false,
    }; NESTING_MAX];
    let mut cur = Open {
        node: NODE_ROOT,
        start: 0,
        is_array: false,
    };
    let mut depth = 1;
    let mut i = 1;
    let mut comma = COMMA_NONE;
    let mut just_opened = true;
    'member: loop {
        // A member or element of `cur` starts at token `i`, or `cur` closes empty.
        let mut closed_at = None;
        if just_opened {
            just_opened = false;
            let c = token(i)?;
            if b[c] == cur.closer() {
                i += 1;
                closed_at = Some(c);
            }
        }
        if closed_at.is_none() {
            let target = if cur.is_array {
                NODE_NONE
            } else {
                let (t, close, colon) = (token(i)?, token(i + 1)?, token(i + 2)?);
                if b[t] != b'"' || b[colon] != b':' {
                    return None;
                }
                i += 3;
                if depth == 1 {
                    top_member(&mut found, memo, table, b, (t, close), comma)?
                } else if cur.node != NODE_NONE {
                    let len = close - t - 1;
                    table.child(cur.node, &b[t + 1..close], key_prefix(b, t + 1, len))
                } else {
                    NODE_NONE
                }
            };
            let v = token(i)?;
            i += 1;
            let (kind, end, text) = match b[v] {
                b'"' => {
                    let close = token(i)?;
                    i += 1;
                    (SlotKind::String, close + 1, (v + 1, close))
                }
                c @ (b'{' | b'[') => {
                    if depth == depth_max {
                        return None;
                    }
                    let is_array = c == b'[';
                    outer[depth - 1] = cur;
                    cur = Open {
                        node: container_node(table, target, is_array),
                        start: v as u32,
                        is_array,
                    };
                    depth += 1;
                    just_opened = true;
                    continue 'member;
                }
                _ => {
                    let (kind, end) = scalar_at(m, b, v)?;
                    (kind, end, (0, 0))
                }
            };
            record(table, slots, &mut found.seen, target, kind, (v, end), text)?;
        }
        // After a value: a separator, or the close of `cur` (and maybe of its outer ones).
        loop {
            if let Some(c) = closed_at.take() {
                let kind = if cur.is_array {
                    SlotKind::Array
                } else {
                    SlotKind::Object
                };
                let raw = (cur.start as usize, c + 1);
                record(table, slots, &mut found.seen, cur.node, kind, raw, (0, 0))?;
                depth -= 1;
                if depth == 0 {
                    break 'member;
                }
                cur = outer[depth - 1];
            }
            let s = token(i)?;
            i += 1;
            if b[s] == b',' {
                if depth == 1 {
                    comma = s as u32;
                }
                continue 'member;
            }
            if b[s] != cur.closer() {
                return None;
            }
            closed_at = Some(s);
        }
    }
    if i != tokens.len() {
        return None;
    }
    Some(found)
}

/// The scalar whose first byte is at `v`: its kind and end. A scalar is the whole run of
/// scalar bytes, so "01" and "truex" are none.
#[inline(always)]
fn scalar_at(m: &Marks, b: &[u8], v: usize) -> Option<(SlotKind, usize)> {
    let end = run_end(&m.scalar[..m.blocks], v);
    if b[v].wrapping_sub(b'1') < 9 && run_end(&m.digit[..m.blocks], v) == end {
        return Some((SlotKind::Number, end));
    }
    let kind = match &b[v..end] {
        b"true" => SlotKind::True,
        b"false" => SlotKind::False,
        b"null" => SlotKind::Null,
        s if is_number(s) => SlotKind::Number,
        _ => return None,
    };
    Some((kind, end))
}

/// Whether `s` is exactly one JSON number: `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`.
#[inline(always)]
fn is_number(s: &[u8]) -> bool {
    let digits = |s: &[u8]| s.iter().take_while(|c| c.is_ascii_digit()).count();
    let mut i = usize::from(s.first() == Some(&b'-'));
    match s.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i += 1 + digits(&s[i + 1..]),
        _ => return false,
    }
    if s.get(i) == Some(&b'.') {
        let d = digits(&s[i + 1..]);
        if d == 0 {
            return false;
        }
        i += 1 + d;
    }
    if matches!(s.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(s.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        let d = digits(&s[i..]);
        if d == 0 {
            return false;
        }
        i += d;
    }
    i == s.len()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{mark_with, Classes, Marks, BLOCK};
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must have AVX-512BW (and so AVX-512F), AVX-512VBMI2, PCLMULQDQ and POPCNT.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi2,pclmulqdq,popcnt")]
    pub(super) unsafe fn mark_avx512(b: &[u8], m: &mut Marks) -> bool {
        mark_with(
            b,
            m,
            |start, len| {
                let keep = if len == BLOCK {
                    u64::MAX
                } else {
                    (1u64 << len) - 1
                };
                // SAFETY: the masked load touches only `b[start..start + len]` (masked-off
                // bytes are neither read nor faulted on) and zeroes the rest.
                let v = unsafe { _mm512_maskz_loadu_epi8(keep, b.as_ptr().add(start).cast()) };
                classify_avx512(v)
            },
            |x| prefix_xor(x),
            |bits, base, out| offsets_avx512(bits, base, out),
        )
    }

    /// # Safety
    /// The CPU must have AVX2, BMI1, PCLMULQDQ and POPCNT.
    #[target_feature(enable = "avx2,bmi1,pclmulqdq,popcnt")]
    pub(super) unsafe fn mark_avx2(b: &[u8], m: &mut Marks) -> bool {
        mark_with(
            b,
            m,
            |start, len| {
                if len == BLOCK {
                    return classify_avx2(b[start..start + BLOCK].try_into().expect("a block"));
                }
                let mut tail = [0u8; BLOCK];
                tail[..len].copy_from_slice(&b[start..start + len]);
                classify_avx2(&tail)
            },
            |x| prefix_xor(x),
            |mut bits, base, out| {
                let mut at = 0;
                while bits != 0 {
                    out[at] = base + bits.trailing_zeros() as u16;
                    bits &= bits - 1;
                    at += 1;
                }
            },
        )
    }

    /// Bit `j` is the XOR of bits `0..=j`: a carry-less multiply by all ones.
    #[target_feature(enable = "pclmulqdq")]
    #[inline]
    fn prefix_xor(x: u64) -> u64 {
        let r = _mm_clmulepi64_si128(_mm_set_epi64x(0, x as i64), _mm_set1_epi8(-1), 0);
        _mm_cvtsi128_si64(r) as u64
    }

    /// The offsets of `bits` plus `base` into `out[..64]`: one byte compress of 0..63 under
    /// the mask, widened to u16. No branch per bit, so no misprediction per block.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi2")]
    #[inline]
    fn offsets_avx512(bits: u64, base: u16, out: &mut [u16]) {
        assert!(out.len() >= BLOCK);
        let iota = _mm512_set_epi8(
            63, 62, 61, 60, 59, 58, 57, 56, 55, 54, 53, 52, 51, 50, 49, 48, 47, 46, 45, 44, 43, 42,
            41, 40, 39, 38, 37, 36, 35, 34, 33, 32, 31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20,
            19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0,
        );
        let packed = _mm512_maskz_compress_epi8(bits, iota);
        let base = _mm512_set1_epi16(base as i16);
        let low = _mm512_add_epi16(_mm512_cvtepu8_epi16(_mm512_castsi512_si256(packed)), base);
        // SAFETY: `out` holds at least 64 u16, so both 32-entry stores stay inside it.
        unsafe { _mm512_storeu_si512(out.as_mut_ptr().cast(), low) };
        if bits.count_ones() > 32 {
            let high = _mm512_add_epi16(
                _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(packed, 1)),
                base,
            );
            // SAFETY: as above.
            unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(32).cast(), high) };
        }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    fn classify_avx512(v: __m512i) -> Classes {
        let eq = |c: u8| _mm512_cmpeq_epi8_mask(v, _mm512_set1_epi8(c as i8));
        // '{' | 0x20 == '[' | 0x20, and likewise '}' and ']'.
        let folded = _mm512_or_si512(v, _mm512_set1_epi8(0x20));
        let from_zero = _mm512_sub_epi8(v, _mm512_set1_epi8(b'0' as i8));
        Classes {
            quote: eq(b'"'),
            backslash: eq(b'\\'),
            control: _mm512_cmplt_epu8_mask(v, _mm512_set1_epi8(0x20)),
            space: eq(b' '),
            separator: eq(b',') | eq(b':'),
            open: _mm512_cmpeq_epi8_mask(folded, _mm512_set1_epi8(b'{' as i8)),
            close: _mm512_cmpeq_epi8_mask(folded, _mm512_set1_epi8(b'}' as i8)),
            digit: _mm512_cmplt_epu8_mask(from_zero, _mm512_set1_epi8(10)),
            high: _mm512_movepi8_mask(v),
        }
    }

    /// Not inlined: inlined, LLVM takes the mask moves apart into single bits (thousands of
    /// instructions a line, measured under callgrind).
    #[target_feature(enable = "avx2")]
    #[inline(never)]
    fn classify_avx2(blk: &[u8; BLOCK]) -> Classes {
        let half = |at: usize| {
            // SAFETY: reads bytes `at..at + 32` of the 64 in `blk`, unaligned loads allowed.
            let v = unsafe { _mm256_loadu_si256(blk.as_ptr().add(at).cast()) };
            let mask = |m: __m256i| u64::from(_mm256_movemask_epi8(m) as u32);
            let eq = |c: u8| _mm256_cmpeq_epi8(v, _mm256_set1_epi8(c as i8));
            let below = |x: __m256i, c: u8| {
                _mm256_cmpeq_epi8(_mm256_min_epu8(x, _mm256_set1_epi8(c as i8)), x)
            };
            let or = _mm256_or_si256;
            let folded = or(v, _mm256_set1_epi8(0x20));
            let from_zero = _mm256_sub_epi8(v, _mm256_set1_epi8(b'0' as i8));
            Classes {
                quote: mask(eq(b'"')),
                backslash: mask(eq(b'\\')),
                control: mask(below(v, 0x1f)),
                space: mask(eq(b' ')),
                separator: mask(or(eq(b','), eq(b':'))),
                open: mask(_mm256_cmpeq_epi8(folded, _mm256_set1_epi8(b'{' as i8))),
                close: mask(_mm256_cmpeq_epi8(folded, _mm256_set1_epi8(b'}' as i8))),
                digit: mask(below(from_zero, 9)),
                high: mask(v),
            }
        };
        let (lo, hi) = (half(0), half(32));
        let join = |a: u64, b: u64| a | b << 32;
        Classes {
            quote: join(lo.quote, hi.quote),
            backslash: join(lo.backslash, hi.backslash),
            control: join(lo.control, hi.control),
            space: join(lo.space, hi.space),
            separator: join(lo.separator, hi.separator),
            open: join(lo.open, hi.open),
            close: join(lo.close, hi.close),
            digit: join(lo.digit, hi.digit),
            high: join(lo.high, hi.high),
        }
    }
}
