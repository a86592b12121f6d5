//! The hot-path JSON decoder: validates a whole event line as an RFC 8259 object and picks out
//! the few fields a profile needs, without building a document tree, in one pass over the line
//! (`scan`). It also re-emits the line with one top-level member spliced in.
//!
//! Invariants: a [`Decoder`] owns all scratch memory, sized at construction from
//! `line_bytes_max` (about 2 bytes per line byte: a padded copy of the line and unescape
//! scratch) and `depth_max`, so `decode`, `Event::get` and `Event::write_enriched` never
//! allocate (the last needs `out` to have capacity). An [`Event`] exists only for a line that
//! validated completely; every `Field` it hands out is valid JSON token text (`raw_json`) and,
//! for strings, valid UTF-8 text. A top-level `"_session"` member is tracked like an extracted
//! field (a second one is `DuplicateField`) because `write_enriched` replaces it.
//!
//! Submodules: `table` (compiled paths), `fast` (the fast path: the line classified 64 bytes at
//! a time, then its tokens walked), `scan` (grammar and field extraction byte by byte, for every
//! line `fast` declines), `chunk` (the SIMD string-body classifier `scan` skips strings with),
//! `escape` (string bodies both ways), `splice` (`write_enriched`).

mod chunk;
mod escape;
mod fast;
#[cfg(test)]
mod fast_tests;
mod scan;
mod splice;
mod table;
#[cfg(test)]
mod tests;

pub use escape::write_json_string;
pub use table::{FieldTable, PATHS_MAX, SEGMENT_BYTES_MAX};

use scan::{Frame, KeyMemo, SessionSpan, Slot, SlotKind};

/// Index of a path in the slice given to [`FieldTable::new`].
pub type FieldId = u16;

/// Owns all scratch memory; constructed once per shard. `decode` performs no heap allocation.
pub struct Decoder {
    table: FieldTable,
    depth_max: u32,
    line_bytes_max: usize,
    /// The line being decoded followed by `scan::LINE_PAD` zero bytes, so the scanner reads
    /// past its end without bounds arithmetic and meets a byte no rule accepts.
    line: Box<[u8]>,
    /// One frame per open container; `min(depth_max, line_bytes_max)` long, since nesting can
    /// exceed neither the limit nor the number of bytes.
    frames: Box<[Frame]>,
    /// Unescaped text of keys and extracted strings. Unescaping never grows text and the strings
    /// of one line are disjoint, so `line_bytes_max` bytes always suffice.
    scratch: Box<[u8]>,
    /// One result per distinct path; valid only where the decode's `seen` bit is set.
    slots: Box<[Slot]>,
    /// The top-level keys of the lines before, by member position (`scan::top_key`).
    key_memo: Box<[KeyMemo]>,
    /// The fast path's kernel, when the CPU has what it needs (`fast`).
    fast: Option<fast::Kernel>,
    /// The fast path's marks of the line being decoded.
    marks: Box<fast::Marks>,
}

impl Decoder {
    pub fn new(table: FieldTable, depth_max: u32, line_bytes_max: usize) -> Decoder {
        assert!(depth_max >= 1, "depth_max must allow the top-level object");
        assert!(line_bytes_max >= 2, "line_bytes_max must allow \"{{}}\"");
        // Offsets are stored as u32 to keep frames and slots small.
        assert!(line_bytes_max < u32::MAX as usize);
        let frames_len = (depth_max as usize).min(line_bytes_max);
        Decoder {
            line: vec![0u8; line_bytes_max + scan::LINE_PAD].into_boxed_slice(),
            frames: vec![Frame::default(); frames_len].into_boxed_slice(),
            scratch: vec![0u8; line_bytes_max].into_boxed_slice(),
            slots: vec![Slot::default(); table.slot_count()].into_boxed_slice(),
            key_memo: vec![KeyMemo::default(); scan::KEY_MEMOS].into_boxed_slice(),
            fast: fast::Kernel::detect(),
            marks: Box::new(fast::Marks::new()),
            table,
            depth_max,
            line_bytes_max,
        }
    }

    pub fn table(&self) -> &FieldTable {
        &self.table
    }
}

/// A decoded event detached from its decoder, so that several can be held at once (a window
/// of events whose session lookups overlap, or pre-decoded events for a benchmark). Filled by
/// [`Decoder::decode_into`]; viewed as an [`Event`] together with the line it was decoded from.
/// Its buffers are sized at construction, so refilling it allocates nothing.
pub struct Parsed {
    slots: Box<[Slot]>,
    /// The extracted strings that had escapes (the decoder's committed scratch).
    scratch: Vec<u8>,
    seen: u64,
    session: Option<SessionSpan>,
    root_members: u32,
    /// `(start, end)` of the trimmed object within the line given to `decode_into`.
    raw: (u32, u32),
    line_len: u32,
}

impl Parsed {
    /// For events decoded with `table`; `scratch_bytes` of room for unescaped strings, so
    /// refilling it from lines of up to that many bytes never allocates.
    pub fn new(table: &FieldTable, scratch_bytes: usize) -> Parsed {
        Parsed {
            slots: vec![Slot::default(); table.slot_count()].into_boxed_slice(),
            scratch: Vec::with_capacity(scratch_bytes),
            seen: 0,
            session: None,
            root_members: 0,
            raw: (0, 0),
            line_len: 0,
        }
    }

    /// The event, given the very bytes passed to [`Decoder::decode_into`] (the fields are
    /// offsets into them) and the decoder's table.
    #[inline]
    pub fn event<'a>(&'a self, line: &'a [u8], table: &'a FieldTable) -> Event<'a> {
        debug_assert_eq!(line.len(), self.line_len as usize, "not the decoded line");
        debug_assert_eq!(
            self.slots.len(),
            table.slot_count(),
            "not the decoder's table"
        );
        Event {
            raw: &line[self.raw.0 as usize..self.raw.1 as usize],
            table,
            slots: &self.slots,
            scratch: &self.scratch,
            seen: self.seen,
            session: self.session,
            root_members: self.root_members,
        }
    }
}

impl Decoder {
    /// [`Decoder::decode`] into a detached [`Parsed`] (made for this decoder's table). On an
    /// error, `p` holds nothing usable.
    pub fn decode_into(&mut self, line: &[u8], p: &mut Parsed) -> Result<(), DecodeError> {
        // A failed scan may have rewritten some slots for this line: none of them is seen
        // until one succeeds, so they are never read against the line before.
        p.seen = 0;
        let sc = self.scan_into(line, &mut p.slots)?;
        p.raw = (sc.start as u32, (sc.start + sc.len) as u32);
        p.line_len = line.len() as u32;
        p.seen = sc.seen;
        p.session = sc.session;
        p.root_members = sc.root_members;
        p.scratch.clear();
        if sc.scratch_len > 0 {
            p.scratch.extend_from_slice(&self.scratch[..sc.scratch_len]);
        }
        Ok(())
    }
}

/// A validated event line and the fields extracted from it.
///
/// Invariant, kept by the decoder (the only writer of slots and `seen`): every slot whose
/// `seen` bit is set lies in `slots` (a bit is set only for a slot the scan wrote), its raw
/// range lies within the decoded object, and so does its text range when its kind is
/// `String`. `raw` always has the decoded object's length, whatever line a detached
/// [`Parsed`] is viewed with: [`Parsed::event`] cuts it at the decoded offsets. So
/// [`Event::get`] reads a seen slot without bounds checks: they were ~80 instructions of an
/// engine event (callgrind). A check per view instead, in `Parsed::event`, cost the replay
/// ~9% of its CPU time (bench/RESULTS.md).
#[derive(Clone, Copy)]
pub struct Event<'a> {
    raw: &'a [u8],
    table: &'a FieldTable,
    slots: &'a [Slot],
    scratch: &'a [u8],
    /// Bit per slot: set when the path occurred in this line.
    seen: u64,
    session: Option<SessionSpan>,
    root_members: u32,
}

impl<'a> Event<'a> {
    /// The object's bytes, from '{' to the matching '}' inclusive (whitespace trimmed).
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// Whether the path occurred in the line: `!get(id).is_missing()` without building the
    /// field (an `exists` predicate, often a profile's `match`, asks only this).
    #[inline(always)]
    pub fn has(&self, id: FieldId) -> bool {
        self.seen & (1u64 << self.table.slot_of(id)) != 0
    }

    /// The raw text of the field when it is a number, else None: `get(id)` narrowed to
    /// [`Field::Number`] without the match over every kind (a timestamp is read this way on
    /// every event).
    #[inline(always)]
    pub fn number(&self, id: FieldId) -> Option<&'a [u8]> {
        let s = self.seen_slot(id)?;
        (s.kind == SlotKind::Number).then(|| self.line_range(s.raw_start, s.raw_end))
    }

    /// The slot of a field the line had, or None.
    #[inline(always)]
    fn seen_slot(&self, id: FieldId) -> Option<Slot> {
        let slot = self.table.slot_of(id);
        if self.seen & (1u64 << slot) == 0 {
            return None;
        }
        debug_assert!(usize::from(slot) < self.slots.len());
        // SAFETY: the slot is seen, so it lies in `slots` (the invariant on `Event`).
        Some(unsafe { *self.slots.get_unchecked(usize::from(slot)) })
    }

    /// `line[start..end]` of a seen slot's range.
    #[inline(always)]
    fn line_range(&self, start: u32, end: u32) -> &'a [u8] {
        let line: &'a [u8] = self.raw;
        debug_assert!(start <= end && end as usize <= line.len());
        // SAFETY: a seen slot's raw range, and a `String` slot's text range, lie in `raw` (the
        // invariant on `Event`).
        unsafe { line.get_unchecked(start as usize..end as usize) }
    }

    /// `get(id).raw_json()` without the match over every kind: a seen slot's raw range is its
    /// token, the literals `true`, `false` and `null` included (state and metadata values are
    /// read this way).
    #[inline(always)]
    pub fn token(&self, id: FieldId) -> Option<&'a [u8]> {
        let s = self.seen_slot(id)?;
        let raw = self.line_range(s.raw_start, s.raw_end);
        debug_assert_eq!(Some(raw), self.get(id).raw_json());
        Some(raw)
    }

    /// `get(id).key_bytes()` without building the field (keys are read this way).
    #[inline(always)]
    pub fn key_text(&self, id: FieldId) -> Option<&'a [u8]> {
        let s = self.seen_slot(id)?;
        let text = match s.kind {
            // The literal's token is its text.
            SlotKind::Number | SlotKind::True | SlotKind::False => {
                Some(self.line_range(s.raw_start, s.raw_end))
            }
            _ => self.slot_text(s),
        };
        debug_assert_eq!(text, self.get(id).key_bytes());
        text
    }

    /// The unescaped text of a string field, or None (what predicates compare).
    #[inline(always)]
    pub fn string(&self, id: FieldId) -> Option<&'a [u8]> {
        self.slot_text(self.seen_slot(id)?)
    }

    /// The unescaped text of a seen string slot, from the line or (escaped in it) the scratch.
    #[inline(always)]
    fn slot_text(&self, s: Slot) -> Option<&'a [u8]> {
        match s.kind {
            SlotKind::String => Some(self.line_range(s.text_start, s.text_end)),
            SlotKind::StringScratch => {
                let scratch: &'a [u8] = self.scratch;
                Some(&scratch[s.text_start as usize..s.text_end as usize])
            }
            _ => None,
        }
    }

    /// `#[inline(always)]`: callers ask for a handful of constant ids per event (half a dozen
    /// per event in the engine), and inlined the call and the `Field` copy-out mostly disappear.
    #[inline(always)]
    pub fn get(&self, id: FieldId) -> Field<'a> {
        let Some(s) = self.seen_slot(id) else {
            return Field::Missing;
        };
        let raw = self.line_range(s.raw_start, s.raw_end);
        match s.kind {
            SlotKind::Null => Field::Null,
            SlotKind::True => Field::Bool(true),
            SlotKind::False => Field::Bool(false),
            SlotKind::Number => Field::Number(raw),
            SlotKind::String | SlotKind::StringScratch => Field::String {
                raw,
                text: self.slot_text(s).unwrap_or_default(),
            },
            SlotKind::Object => Field::Object(raw),
            SlotKind::Array => Field::Array(raw),
        }
    }
}

/// One extracted value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Field<'a> {
    Missing,
    Null,
    Bool(bool),
    /// Raw number text as in the input, e.g. b"-1.5e3".
    Number(&'a [u8]),
    /// `raw`: the token including quotes, still escaped (valid JSON to copy verbatim into output).
    /// `text`: the unescaped UTF-8 contents (borrowed from the line when it had no escapes, else
    /// from the decoder's scratch).
    String {
        raw: &'a [u8],
        text: &'a [u8],
    },
    /// Raw token text of a nested object / array (valid JSON).
    Object(&'a [u8]),
    Array(&'a [u8]),
}

impl<'a> Field<'a> {
    pub fn is_missing(&self) -> bool {
        matches!(self, Field::Missing)
    }

    /// Number -> parsed f64 (None if not finite); other kinds -> None.
    pub fn as_f64(&self) -> Option<f64> {
        let Field::Number(text) = *self else {
            return None;
        };
        // The scanner admitted only JSON number grammar, a subset of what `f64::from_str` takes.
        let v: f64 = std::str::from_utf8(text).ok()?.parse().ok()?;
        v.is_finite().then_some(v)
    }

    /// Number -> exact i64 if the text is an integer that fits; else None. By hand rather
    /// than `str::parse`: every event-time event's timestamp goes through here, and the
    /// scanner has already admitted only JSON number grammar (`-?(0|[1-9][0-9]*)` for an
    /// integer), so digits are all that is left to check. The 9-to-16-digit case (epoch times)
    /// is read inline; the rest in `integer_any`.
    #[inline(always)]
    pub fn as_i64(&self) -> Option<i64> {
        let Field::Number(text) = *self else {
            return None;
        };
        integer(text)
    }

    /// The JSON token text to copy verbatim into output. Missing -> None.
    pub fn raw_json(&self) -> Option<&'a [u8]> {
        match *self {
            Field::Missing => None,
            Field::Null => Some(b"null"),
            Field::Bool(true) => Some(b"true"),
            Field::Bool(false) => Some(b"false"),
            Field::Number(raw)
            | Field::String { raw, .. }
            | Field::Object(raw)
            | Field::Array(raw) => Some(raw),
        }
    }

    /// Bytes used as a session key / comparison text: String -> text (unescaped), Number -> raw
    /// text, Bool -> "true"/"false"; others None.
    pub fn key_bytes(&self) -> Option<&'a [u8]> {
        match *self {
            Field::String { text, .. } => Some(text),
            Field::Number(raw) => Some(raw),
            Field::Bool(true) => Some(b"true"),
            Field::Bool(false) => Some(b"false"),
            Field::Missing | Field::Null | Field::Object(_) | Field::Array(_) => None,
        }
    }
}

/// The number text of a [`Field::Number`] (JSON number grammar) as an exact i64 if it is an
/// integer that fits; else None. See [`Field::as_i64`].
#[inline(always)]
pub fn integer(text: &[u8]) -> Option<i64> {
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    if let Some(v) = digits_9_to_16(digits) {
        // Below 10^16: no overflow either way.
        return Some(if negative { -(v as i64) } else { v as i64 });
    }
    integer_any(negative, digits)
}

/// An integer's digits (sign already taken off) as an i64, if they are all digits and it fits.
#[inline(never)]
fn integer_any(negative: bool, digits: &[u8]) -> Option<i64> {
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    if digits.len() <= 19 {
        // 19 digits stay below 10^19 < 2^64: no overflow to check.
        let mut digits = digits;
        while let Some((chunk, rest)) = digits.split_first_chunk::<8>() {
            v = v * 100_000_000 + eight_digits(u64::from_le_bytes(*chunk))?;
            digits = rest;
        }
        for &c in digits {
            let d = c.wrapping_sub(b'0');
            if d > 9 {
                return None;
            }
            v = v * 10 + u64::from(d);
        }
    } else {
        for &c in digits {
            let d = c.wrapping_sub(b'0');
            if d > 9 {
                return None;
            }
            v = v.checked_mul(10)?.checked_add(u64::from(d))?;
        }
    }
    if negative {
        // Down to i64::MIN, whose magnitude is one more than i64::MAX.
        (v <= i64::MAX as u64 + 1).then(|| (v as i64).wrapping_neg())
    } else {
        i64::try_from(v).ok()
    }
}

/// The value of 9 to 16 ASCII digits (every epoch-millisecond time from 2001 to 2286 has 12 or
/// 13, epoch seconds have 10), else None: two eight-digit words instead of one word and a digit
/// loop. The first word is the leading digits shifted up, below '0' padding.
#[inline(always)]
fn digits_9_to_16(text: &[u8]) -> Option<u64> {
    let n = text.len();
    if !(9..=16).contains(&n) {
        return None;
    }
    let word = |at: usize| u64::from_le_bytes(text[at..at + 8].try_into().expect("8 bytes"));
    let lead = n - 8;
    // Little-endian: the first digit is the lowest byte, so shifting up by the bytes the
    // leading part lacks puts its digits in the top bytes; '0's fill the bytes shifted in.
    let pad = 8 * (8 - lead) as u32;
    let hi = (word(0) << pad) | (0x3030_3030_3030_3030u64.checked_shr(64 - pad).unwrap_or(0));
    sixteen_digits(hi, word(lead))
}

/// Two words of eight ASCII digits each (as [`eight_digits`] takes them) as the value of the
/// sixteen, `hi`'s first; None unless all are digits. Both words at once in one vector.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn sixteen_digits(hi: u64, lo: u64) -> Option<u64> {
    use core::arch::x86_64::*;
    // SAFETY: SSE2 is part of the x86_64 baseline; only register values are involved.
    unsafe {
        let d = _mm_sub_epi8(
            _mm_set_epi64x(lo as i64, hi as i64),
            _mm_set1_epi8(b'0' as i8),
        );
        // A digit is 0..=9 after the subtraction, anything else above 9 (unsigned).
        let nine = _mm_set1_epi8(9);
        if _mm_movemask_epi8(_mm_cmpeq_epi8(_mm_max_epu8(d, nine), nine)) != 0xffff {
            return None;
        }
        // Each 16-bit lane holds a digit pair, the first in its low byte: times 0x0a01 its
        // high byte is first * 10 + second (at most 99, nothing carries out of the lane).
        let pairs = _mm_srli_epi16::<8>(_mm_mullo_epi16(d, _mm_set1_epi16(0x0a01)));
        // Pairs of pairs into 32-bit lanes of four digits, then (narrowed back to 16 bits,
        // each at most 9999) into the two eight-digit halves.
        let quads = _mm_madd_epi16(pairs, _mm_set1_epi32(0x0001_0064));
        let halves = _mm_madd_epi16(_mm_packs_epi32(quads, quads), _mm_set1_epi32(0x0001_2710));
        let x = _mm_cvtsi128_si64(halves) as u64;
        Some((x & 0xffff_ffff) * 100_000_000 + (x >> 32))
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn sixteen_digits(hi: u64, lo: u64) -> Option<u64> {
    Some(eight_digits(hi)? * 100_000_000 + eight_digits(lo)?)
}

/// Eight ASCII digits, the first in the lowest byte, as their value; None unless all are digits.
#[inline(always)]
fn eight_digits(chunk: u64) -> Option<u64> {
    let d = chunk.wrapping_sub(0x3030_3030_3030_3030);
    // A byte below '0' leaves a high nibble (it wraps to 0xcf or more); one above '9' reaches
    // 0x10 once 6 is added.
    if (d | d.wrapping_add(0x0606_0606_0606_0606)) & 0xf0f0_f0f0_f0f0_f0f0 != 0 {
        return None;
    }
    // Pairs of digits into bytes, then pairs of pairs into the two halves, then the halves.
    let d = d * 10 + (d >> 8);
    let hi = (d & 0x0000_00ff_0000_00ff).wrapping_mul(100 + (1_000_000 << 32));
    let lo = ((d >> 16) & 0x0000_00ff_0000_00ff).wrapping_mul(1 + (10_000 << 32));
    Some(hi.wrapping_add(lo) >> 32)
}

/// Why a line was rejected. Each kind has a static metric / dead-letter label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    Empty,
    TooLong,
    NotObject,
    Syntax,
    InvalidUtf8,
    InvalidEscape,
    TooDeep,
    TrailingBytes,
    DuplicateField,
}

impl DecodeError {
    pub const ALL: [DecodeError; 9] = [
        DecodeError::Empty,
        DecodeError::TooLong,
        DecodeError::NotObject,
        DecodeError::Syntax,
        DecodeError::InvalidUtf8,
        DecodeError::InvalidEscape,
        DecodeError::TooDeep,
        DecodeError::TrailingBytes,
        DecodeError::DuplicateField,
    ];

    /// Static snake_case metric / dead-letter label.
    pub fn label(self) -> &'static str {
        match self {
            DecodeError::Empty => "empty_line",
            DecodeError::TooLong => "line_too_long",
            DecodeError::NotObject => "not_object",
            DecodeError::Syntax => "invalid_json",
            DecodeError::InvalidUtf8 => "invalid_utf8",
            DecodeError::InvalidEscape => "invalid_escape",
            DecodeError::TooDeep => "too_deep",
            DecodeError::TrailingBytes => "trailing_bytes",
            DecodeError::DuplicateField => "duplicate_field",
        }
    }
}

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.label())
    }
}

impl std::error::Error for DecodeError {}
