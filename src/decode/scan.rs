//! Decoding in one pass: walks the line byte by byte with an explicit frame stack (no
//! recursion, so nesting is bounded by `depth_max`, not by the thread's stack), checking the
//! grammar as it goes, skipping string bodies 16 bytes at a time (`chunk`), and walking the
//! path trie in step with the objects it enters.
//!
//! Invariants: the scanner reads a copy of the line followed by `LINE_PAD` zero bytes, so every
//! read a rule makes past the end yields byte 0, which no rule accepts (an unterminated string
//! meets it as a control byte); no read goes more than `LINE_PAD` bytes past the end.
//! `frames[..depth - 1]` hold the ancestors of the innermost open container `cur`; a frame's
//! `node` is the trie node of the path that led to it, or `NODE_NONE` when nothing at or below
//! it is extracted (then keys are not looked up). A slot is written at most once per decode
//! (the `seen` bit guards it: a second write is `DuplicateField`). `scratch[..scratch_len]`
//! holds the text of extracted escaped strings; other strings are unescaped past `scratch_len`
//! only to validate them and never committed. UTF-8 is checked, over the whole line, only when
//! the line holds a byte >= 0x80 (the copy notes it), and only once the grammar held.
//!
//! Error order differs from the two-pass decoder only for lines with several faults: errors
//! are now reported in line order, where a raw control byte or an unterminated string used to
//! win over an earlier bad escape or grammar error.

use super::chunk::classify16;
use super::escape::unescape;
use super::fast;
use super::table::{key_prefix, prefix8, FieldTable, NODE_NONE, NODE_ROOT, SLOT_NONE};
use super::{DecodeError, Decoder, Event};

/// Zero bytes after the copy of the line. The furthest any rule reads past the end is a
/// 16-byte chunk starting at the end itself (a string running into the padding).
pub(super) const LINE_PAD: usize = 32;
const _: () = assert!(LINE_PAD >= 16 + 8);

#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Frame {
    node: u32,
    /// Offset of the opening bracket, for extracting a container as a whole.
    start: u32,
    is_array: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum SlotKind {
    #[default]
    Null,
    True,
    False,
    Number,
    /// Text is `line[text]`.
    String,
    /// Text is `scratch[text]` (the raw token had escapes).
    StringScratch,
    Object,
    Array,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Slot {
    pub(super) kind: SlotKind,
    pub(super) raw_start: u32,
    pub(super) raw_end: u32,
    pub(super) text_start: u32,
    pub(super) text_end: u32,
}

/// The top-level key last seen at one member position and its trie child (see `top_key`);
/// `len` is `u32::MAX` until one was.
#[derive(Clone, Copy, Debug)]
pub(super) struct KeyMemo {
    prefix: u64,
    len: u32,
    target: u32,
}

impl Default for KeyMemo {
    fn default() -> KeyMemo {
        KeyMemo {
            prefix: 0,
            len: u32::MAX,
            target: NODE_NONE,
        }
    }
}

/// Top-level member positions remembered by `top_key`.
pub(super) const KEY_MEMOS: usize = 16;

/// Where the top-level `"_session"` member sits, for `write_enriched` to cut it out. Its end
/// is found there (a cold path) rather than tracked after every value here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SessionSpan {
    /// Offset of the key's opening quote.
    pub(super) start: u32,
    /// Offset of the comma before the member, or `COMMA_NONE` when it is the first member.
    pub(super) comma: u32,
}

pub(super) const COMMA_NONE: u32 = u32::MAX;

/// The copy of the line followed by `LINE_PAD` zero bytes, with unchecked reads.
///
/// The scanner keeps one rule: it moves past a byte only after examining it and finding it is
/// not zero (a zero ends every string, number, literal and whitespace run, and no grammar rule
/// accepts it). The line's end is followed by a zero, so no position passes it, and every read
/// is at most `LINE_PAD` bytes past the end: `word8` one after a quote (a key), `chunk16` at a
/// position. The reads are checked in debug builds, which the tests and proptests run.
#[derive(Clone, Copy)]
struct Padded<'a> {
    b: &'a [u8],
}

impl<'a> Padded<'a> {
    #[inline(always)]
    fn new(b: &'a [u8], n: usize) -> Padded<'a> {
        assert_eq!(b.len(), n + LINE_PAD);
        debug_assert!(b[n..].iter().all(|&c| c == 0));
        Padded { b }
    }

    #[inline(always)]
    fn array<const N: usize>(self, i: usize) -> &'a [u8; N] {
        debug_assert!(i + N <= self.b.len(), "read past the padding at {i}");
        // SAFETY: `i + N <= self.b.len()` by the scanner's rule (see the type's comment): `i`
        // is at most one past the line's end and `N <= 16 < LINE_PAD`. The slice is exactly N
        // bytes, so the cast to `&[u8; N]` matches its layout.
        unsafe { &*self.b.as_ptr().add(i).cast::<[u8; N]>() }
    }

    #[inline(always)]
    fn chunk16(self, i: usize) -> &'a [u8; 16] {
        self.array::<16>(i)
    }

    #[inline(always)]
    fn word8(self, i: usize) -> u64 {
        u64::from_le_bytes(*self.array::<8>(i))
    }

    #[inline(always)]
    fn word4(self, i: usize) -> u32 {
        u32::from_le_bytes(*self.array::<4>(i))
    }

    /// `b[start..end]`, checked (key and escaped string bodies).
    #[inline(always)]
    fn slice(self, start: usize, end: usize) -> &'a [u8] {
        &self.b[start..end]
    }
}

impl std::ops::Index<usize> for Padded<'_> {
    type Output = u8;

    #[inline(always)]
    fn index(&self, i: usize) -> &u8 {
        &self.array::<1>(i)[0]
    }
}

/// Byte `i` of `b`, or 0 past its end. For `splice`, which works on the unpadded line.
#[inline(always)]
pub(super) fn at(b: &[u8], i: usize) -> u8 {
    b.get(i).copied().unwrap_or(0)
}

#[inline(always)]
fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

/// For `splice`, which works on the unpadded line.
#[inline(always)]
pub(super) fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while is_ws(at(b, i)) {
        i += 1;
    }
    i
}

/// The first byte at or after `i` that is not JSON whitespace, in the padded line (which ends
/// in zeros, so the loop stops). Most producers write compact JSON: one compare and out.
#[inline(always)]
fn ws(b: Padded<'_>, mut i: usize) -> usize {
    // Every JSON whitespace byte is <= ' ': one compare settles the usual case.
    if b[i] > b' ' {
        return i;
    }
    while is_ws(b[i]) {
        i += 1;
    }
    i
}

/// Trims JSON whitespace (which includes the '\r' of CRLF framing) from both ends. Form feed and
/// other ASCII whitespace are not JSON whitespace and stay, to be rejected.
#[inline(always)]
pub(super) fn trim(line: &[u8]) -> &[u8] {
    let mut s = line;
    while let [c, rest @ ..] = s {
        if !is_ws(*c) {
            break;
        }
        s = rest;
    }
    while let [rest @ .., c] = s {
        if !is_ws(*c) {
            break;
        }
        s = rest;
    }
    s
}

/// The first offset at or after `i` that is not an ASCII digit, eight bytes at a time (a
/// timestamp is 13 digits). A byte is a digit iff its high nibble is 3 both as is and after
/// adding 6; the add can carry into the next byte only from a byte that is not a digit, so the
/// lowest flagged byte is exact.
#[inline(always)]
fn digits(b: Padded<'_>, mut i: usize) -> usize {
    const HIGH: u64 = 0xf0f0_f0f0_f0f0_f0f0;
    const THREES: u64 = 0x3030_3030_3030_3030;
    loop {
        let w = b.word8(i);
        let not_digit =
            ((w & HIGH) ^ THREES) | ((w.wrapping_add(0x0606_0606_0606_0606) & HIGH) ^ THREES);
        if not_digit != 0 {
            return i + (not_digit.trailing_zeros() / 8) as usize;
        }
        i += 8;
    }
}

/// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`; returns the offset past it. What
/// follows is checked by the caller's structural rules (so "01" and "1x" fail there).
#[inline(always)]
fn skip_number(b: Padded<'_>, mut i: usize) -> Result<usize, DecodeError> {
    if b[i] == b'-' {
        i += 1;
    }
    match b[i] {
        b'0' => i += 1,
        b'1'..=b'9' => i = digits(b, i + 1),
        _ => return Err(DecodeError::Syntax),
    }
    if b[i] == b'.' {
        if !b[i + 1].is_ascii_digit() {
            return Err(DecodeError::Syntax);
        }
        i = digits(b, i + 2);
    }
    if b[i] | 0x20 == b'e' {
        i += 1;
        if matches!(b[i], b'+' | b'-') {
            i += 1;
        }
        if !b[i].is_ascii_digit() {
            return Err(DecodeError::Syntax);
        }
        i = digits(b, i + 1);
    }
    Ok(i)
}

/// Finds the closing quote of the string opened at `open`, 16 bytes at a time. Returns its
/// offset and whether the body holds a backslash (then its text differs from its bytes). A raw
/// control byte is a syntax error; so is the end of the line (the zero padding).
#[inline(always)]
fn string_end(b: Padded<'_>, open: usize) -> Result<(usize, bool), DecodeError> {
    let mut i = open + 1;
    loop {
        let special = classify16(b.chunk16(i));
        if special != 0 {
            let j = i + special.trailing_zeros() as usize;
            if b[j] == b'"' {
                return Ok((j, false));
            }
            return string_end_escaped(b, j).map(|close| (close, true));
        }
        i += 16;
    }
}

/// `string_end` from the first byte that is not plain text, at `j`: skips the byte after each
/// backslash (escapes themselves are checked by `unescape`). A raw control byte, one right
/// after a backslash included, is a syntax error.
#[cold]
#[inline(never)]
fn string_end_escaped(b: Padded<'_>, mut j: usize) -> Result<usize, DecodeError> {
    loop {
        match b[j] {
            b'"' => return Ok(j),
            b'\\' if b[j + 1] >= 0x20 => j += 2,
            c if c < 0x20 || c == b'\\' => return Err(DecodeError::Syntax),
            _ => j += 1,
        }
    }
}

/// Copies `b` into `padded[..n]` and zeroes `padded[n..]` (`LINE_PAD` bytes).
#[inline(always)]
fn copy_padded(b: &[u8], padded: &mut [u8]) {
    let n = b.len();
    assert_eq!(padded.len(), n + LINE_PAD);
    padded[..n].copy_from_slice(b);
    padded[n..].fill(0);
}

/// Whether any byte is >= 0x80 (then the line's UTF-8 needs checking). An OR-reduction LLVM
/// vectorizes.
#[inline(always)]
fn any_high(b: &[u8]) -> bool {
    b.iter().fold(0u8, |acc, &c| acc | c) >= 0x80
}

/// The trie child of the root for the top-level `key` of at most 8 bytes, whose zero-padded
/// bytes are `prefix` (which then determine the key), at member position `m`. Producers write
/// their members in the same order line after line, so the answer for the same position last
/// time (`KeyMemo`) is usually this one, settled by one compare instead of a table probe.
#[inline(always)]
pub(super) fn top_key(
    memo: &mut [KeyMemo],
    table: &FieldTable,
    m: u32,
    key: &[u8],
    prefix: u64,
) -> u32 {
    debug_assert!(key.len() <= 8);
    let Some(memo) = memo.get_mut(m as usize) else {
        return table.child(NODE_ROOT, key, prefix);
    };
    if memo.len == key.len() as u32 && memo.prefix == prefix {
        return memo.target;
    }
    let target = table.child(NODE_ROOT, key, prefix);
    *memo = KeyMemo {
        prefix,
        len: key.len() as u32,
        target,
    };
    target
}

struct Scanner<'s> {
    b: Padded<'s>,
    table: &'s FieldTable,
    memo: &'s mut [KeyMemo],
    frames: &'s mut [Frame],
    scratch: &'s mut [u8],
    slots: &'s mut [Slot],
    depth_max: usize,
    seen: u64,
    scratch_len: usize,
    session: Option<SessionSpan>,
    root_members: u32,
}

/// What a scan found, beside the slots it filled.
pub(super) struct Scanned {
    /// Offset of the trimmed object in the line given.
    pub(super) start: usize,
    pub(super) len: usize,
    pub(super) seen: u64,
    pub(super) session: Option<SessionSpan>,
    pub(super) root_members: u32,
    /// Bytes of `Decoder::scratch` holding extracted escaped strings.
    pub(super) scratch_len: usize,
}

impl Decoder {
    /// `line` is one event without its trailing '\n' (a trailing '\r' and surrounding JSON
    /// whitespace are allowed and trimmed).
    pub fn decode<'a>(&'a mut self, line: &'a [u8]) -> Result<Event<'a>, DecodeError> {
        let mut slots = std::mem::take(&mut self.slots);
        let scanned = self.scan_into(line, &mut slots);
        self.slots = slots;
        let sc = scanned?;
        Ok(Event {
            raw: &line[sc.start..sc.start + sc.len],
            table: &self.table,
            slots: &self.slots,
            scratch: &self.scratch,
            seen: sc.seen,
            session: sc.session,
            root_members: sc.root_members,
        })
    }

    /// The decode, with the extracted fields written to `slots` (this decoder's table's
    /// `slot_count` long): the caller's own, so that a detached [`super::Parsed`] is filled
    /// without a copy. Always inlined into its two callers (replay 0.8–1.0% faster), which
    /// copy its result straight out; `fast::scan` and `scan_full` stay calls.
    #[inline(always)]
    pub(super) fn scan_into(
        &mut self,
        line: &[u8],
        slots: &mut [Slot],
    ) -> Result<Scanned, DecodeError> {
        if line.len() > self.line_bytes_max {
            return Err(DecodeError::TooLong);
        }
        let b = trim(line);
        match b.first() {
            None => return Err(DecodeError::Empty),
            Some(b'{') => {}
            Some(_) => return Err(DecodeError::NotObject),
        }
        let start = b.as_ptr() as usize - line.as_ptr() as usize;
        if let Some(kernel) = self.fast {
            let (table, memo, marks) = (&self.table, &mut self.key_memo, &mut self.marks);
            let depth_max = self.depth_max as usize;
            if let Some(f) = fast::scan(kernel, b, depth_max, table, memo, slots, marks) {
                return Ok(Scanned {
                    start,
                    len: b.len(),
                    seen: f.seen,
                    session: f.session,
                    root_members: f.root_members,
                    scratch_len: 0,
                });
            }
        }
        self.scan_full(b, start, slots)
    }

    /// `scan_into` by the byte-at-a-time scanner alone, on the trimmed line `b` (at `start` in
    /// the line given): every line `fast` declines, and every error.
    pub(super) fn scan_full(
        &mut self,
        b: &[u8],
        start: usize,
        slots: &mut [Slot],
    ) -> Result<Scanned, DecodeError> {
        let n = b.len();
        copy_padded(b, &mut self.line[..n + LINE_PAD]);
        let padded = &self.line[..n + LINE_PAD];
        let mut s = Scanner {
            b: Padded::new(padded, n),
            table: &self.table,
            memo: &mut self.key_memo,
            frames: &mut self.frames,
            scratch: &mut self.scratch,
            slots,
            depth_max: self.depth_max as usize,
            seen: 0,
            scratch_len: 0,
            session: None,
            root_members: 0,
        };
        let end = s.run()?;
        if end != n {
            return Err(DecodeError::TrailingBytes);
        }
        // Only string bodies can hold non-ASCII bytes once the grammar held (anywhere else they
        // were rejected as garbage), so one pass over the line checks exactly them.
        if any_high(b) && std::str::from_utf8(b).is_err() {
            return Err(DecodeError::InvalidUtf8);
        }
        Ok(Scanned {
            start,
            len: n,
            seen: s.seen,
            session: s.session,
            root_members: s.root_members,
            scratch_len: s.scratch_len,
        })
    }
}

impl Scanner<'_> {
    /// Validates the object at offset 0 and returns the offset just past its closing brace.
    fn run(&mut self) -> Result<usize, DecodeError> {
        let b = self.b;
        debug_assert_eq!(b[0], b'{');
        // `cur` is the innermost open container, kept in registers; `frames[..depth - 1]` hold
        // its ancestors and are touched only on open and close.
        let mut cur = Frame::default();
        let mut depth = 0usize;
        let mut i = 0usize;
        let mut target = NODE_ROOT;
        'value: loop {
            // A value starts at `i` (whitespace skipped); `target` is its trie node (or NODE_NONE).
            match b[i] {
                c @ (b'{' | b'[') => {
                    if depth == self.depth_max {
                        return Err(DecodeError::TooDeep);
                    }
                    if depth > 0 {
                        self.frames[depth - 1] = cur;
                    }
                    let is_array = c == b'[';
                    cur = Frame {
                        node: container_node(self.table, target, is_array),
                        start: i as u32,
                        is_array,
                    };
                    depth += 1;
                    i = ws(b, i + 1);
                    if b[i] != c + 2 {
                        // '{' + 2 == '}', '[' + 2 == ']'
                        if is_array {
                            target = NODE_NONE;
                        } else {
                            (i, target) = self.key(i, cur.node, depth, COMMA_NONE)?;
                        }
                        continue 'value;
                    }
                    self.close(cur, i + 1)?;
                    depth -= 1;
                    if depth == 0 {
                        return Ok(i + 1);
                    }
                    cur = self.frames[depth - 1];
                    i += 1;
                }
                b'"' => i = self.string_value(i, target)? + 1,
                b't' => i = self.literal(i, target, b"true", SlotKind::True)?,
                b'f' => i = self.literal(i, target, b"fals", SlotKind::False)?,
                b'n' => i = self.literal(i, target, b"null", SlotKind::Null)?,
                b'-' | b'0'..=b'9' => {
                    let end = skip_number(b, i)?;
                    self.scalar(target, SlotKind::Number, i, end)?;
                    i = end;
                }
                _ => return Err(DecodeError::Syntax),
            }
            // A value ended at `i`: a separator or the enclosing container's close must follow.
            loop {
                i = ws(b, i);
                let c = b[i];
                if c == b',' {
                    let comma = i;
                    i = ws(b, i + 1);
                    if cur.is_array {
                        target = NODE_NONE;
                    } else {
                        (i, target) = self.key(i, cur.node, depth, comma as u32)?;
                    }
                    continue 'value;
                }
                if c == if cur.is_array { b']' } else { b'}' } {
                    self.close(cur, i + 1)?;
                    depth -= 1;
                    if depth == 0 {
                        return Ok(i + 1);
                    }
                    cur = self.frames[depth - 1];
                    i += 1;
                    continue;
                }
                return Err(DecodeError::Syntax);
            }
        }
    }

    #[inline(always)]
    fn close(&mut self, frame: Frame, end: usize) -> Result<(), DecodeError> {
        if frame.node == NODE_NONE {
            return Ok(());
        }
        let kind = if frame.is_array {
            SlotKind::Array
        } else {
            SlotKind::Object
        };
        self.scalar(frame.node, kind, frame.start as usize, end)
    }

    /// Records a value whose text is `line[start..end]` if `target` is an extracted path.
    #[inline(always)]
    fn scalar(
        &mut self,
        target: u32,
        kind: SlotKind,
        start: usize,
        end: usize,
    ) -> Result<(), DecodeError> {
        if target == NODE_NONE {
            return Ok(());
        }
        let slot = self.table.node(target).slot;
        if slot == SLOT_NONE {
            return Ok(());
        }
        self.record(
            slot,
            Slot {
                kind,
                raw_start: start as u32,
                raw_end: end as u32,
                text_start: 0,
                text_end: 0,
            },
        )
    }

    #[inline(always)]
    fn record(&mut self, slot: u8, value: Slot) -> Result<(), DecodeError> {
        if record_slot(self.slots, &mut self.seen, slot, value) {
            Ok(())
        } else {
            Err(DecodeError::DuplicateField)
        }
    }

    /// `true`, `false` or `null` at `i`; `word` is its first four bytes (the caller checks the
    /// 'e' of "false" here too). Returns the offset past it.
    #[inline(always)]
    fn literal(
        &mut self,
        i: usize,
        target: u32,
        word: &'static [u8; 4],
        kind: SlotKind,
    ) -> Result<usize, DecodeError> {
        let b = self.b;
        let mut end = i + 4;
        if b.word4(i) != u32::from_le_bytes(*word) {
            return Err(DecodeError::Syntax);
        }
        if kind == SlotKind::False {
            if b[end] != b'e' {
                return Err(DecodeError::Syntax);
            }
            end += 1;
        }
        self.scalar(target, kind, i, end)?;
        Ok(end)
    }

    /// The string value opened at `open`; returns the offset of its closing quote.
    #[inline(always)]
    fn string_value(&mut self, open: usize, target: u32) -> Result<usize, DecodeError> {
        let b = self.b;
        let (close, escaped) = string_end(b, open)?;
        let slot = if target == NODE_NONE {
            SLOT_NONE
        } else {
            self.table.node(target).slot
        };
        let (raw_start, raw_end) = (open as u32, (close + 1) as u32);
        if escaped {
            let n = unescape(
                b.slice(open + 1, close),
                &mut self.scratch[self.scratch_len..],
            )?;
            if slot != SLOT_NONE {
                let text_start = self.scratch_len;
                self.record(
                    slot,
                    Slot {
                        kind: SlotKind::StringScratch,
                        raw_start,
                        raw_end,
                        text_start: text_start as u32,
                        text_end: (text_start + n) as u32,
                    },
                )?;
                self.scratch_len += n;
            }
        } else if slot != SLOT_NONE {
            self.record(
                slot,
                Slot {
                    kind: SlotKind::String,
                    raw_start,
                    raw_end,
                    text_start: raw_start + 1,
                    text_end: raw_end - 1,
                },
            )?;
        }
        Ok(close)
    }

    /// Takes `"key" :` at `open` inside an object whose trie node is `node`, at nesting
    /// `depth`, and returns the offset of the value (whitespace skipped) and its trie node.
    /// `comma` is the offset of the separator before the key, for `_session`.
    #[inline(always)]
    fn key(
        &mut self,
        open: usize,
        node: u32,
        depth: usize,
        comma: u32,
    ) -> Result<(usize, u32), DecodeError> {
        let b = self.b;
        if b[open] != b'"' {
            return Err(DecodeError::Syntax);
        }
        let (close, escaped) = string_end(b, open)?;
        let mut colon = close + 1;
        if b[colon] != b':' {
            colon = ws(b, colon);
            if b[colon] != b':' {
                return Err(DecodeError::Syntax);
            }
        }
        let value = ws(b, colon + 1);
        let mut target = NODE_NONE;
        if node != NODE_NONE || depth == 1 {
            let (key, prefix) = if escaped {
                let at = self.scratch_len;
                let n = unescape(b.slice(open + 1, close), &mut self.scratch[at..])?;
                (&self.scratch[at..at + n], key_prefix(self.scratch, at, n))
            } else {
                let key = b.slice(open + 1, close);
                (key, prefix8(b.word8(open + 1), key.len()))
            };
            if depth == 1 && node == NODE_ROOT && key.len() <= 8 {
                target = top_key(self.memo, self.table, self.root_members, key, prefix);
            } else if node != NODE_NONE {
                target = self.table.child(node, key, prefix);
            }
            if depth == 1 {
                self.root_members += 1;
                if key.len() == SESSION_KEY.len() && prefix == SESSION_PREFIX {
                    if self.session.is_some() {
                        return Err(DecodeError::DuplicateField);
                    }
                    self.session = Some(SessionSpan {
                        start: open as u32,
                        comma,
                    });
                }
            }
        } else if escaped {
            // Nothing to match: unescape only to validate, into scratch that is not committed.
            unescape(
                b.slice(open + 1, close),
                &mut self.scratch[self.scratch_len..],
            )?;
        }
        Ok((value, target))
    }
}

/// The frame node for a container opened at `target`: kept only if something is extracted
/// at or (for objects) below it, so untracked subtrees skip key lookups. `fast` keeps the same.
#[inline(always)]
pub(super) fn container_node(table: &FieldTable, target: u32, is_array: bool) -> u32 {
    if target == NODE_NONE {
        return NODE_NONE;
    }
    let extracted = table.node(target).slot != SLOT_NONE;
    if extracted || (!is_array && table.has_children(target)) {
        target
    } else {
        NODE_NONE
    }
}

/// Writes `value` to `slot` unless this decode already did (a duplicate field: false). A slot
/// is written at most once per decode, by either scanner.
#[inline(always)]
pub(super) fn record_slot(slots: &mut [Slot], seen: &mut u64, slot: u8, value: Slot) -> bool {
    let bit = 1u64 << slot;
    if *seen & bit != 0 {
        return false;
    }
    *seen |= bit;
    slots[usize::from(slot)] = value;
    true
}

pub(super) const SESSION_KEY: &[u8; 8] = b"_session";
pub(super) const SESSION_PREFIX: u64 = u64::from_le_bytes(*SESSION_KEY);
