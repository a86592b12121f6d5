//! The validating scanner: one left-to-right pass with an explicit frame stack (no recursion,
//! so nesting is bounded by `depth_max`, not by the thread's stack), walking the path trie in
//! step with the objects it enters.
//!
//! Invariants: `frames[..depth]` are the open containers, outermost first; a frame's `node` is
//! the trie node of the path that led to it, or `NODE_NONE` when nothing below it is extracted
//! (then keys are validated but not looked up). A slot is written at most once per decode (the
//! `seen` bit guards it: a second write is `DuplicateField`). `scratch[..scratch_len]` holds the
//! text of extracted escaped strings; keys are unescaped past `scratch_len` and never committed.
//! Reading past the end of the line yields byte 0, which no grammar rule accepts, so every
//! truncated construct ends as `Syntax` without a separate bounds check.

use super::escape::{skip_string, unescape};
use super::table::{FieldTable, NODE_NONE, NODE_ROOT, SLOT_NONE};
use super::{DecodeError, Decoder, Event};

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

#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Slot {
    pub(super) kind: SlotKind,
    pub(super) raw_start: u32,
    pub(super) raw_end: u32,
    pub(super) text_start: u32,
    pub(super) text_end: u32,
}

/// Where the top-level `"_session"` member sits, for `write_enriched` to cut it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SessionSpan {
    /// Offset of the key's opening quote.
    pub(super) start: u32,
    /// Offset just past the member's value.
    pub(super) end: u32,
    /// Offset of the comma before the member, or `COMMA_NONE` when it is the first member.
    pub(super) comma: u32,
}

pub(super) const COMMA_NONE: u32 = u32::MAX;

#[inline(always)]
pub(super) fn at(b: &[u8], i: usize) -> u8 {
    b.get(i).copied().unwrap_or(0)
}

#[inline(always)]
fn is_ws(c: u8) -> bool {
    matches!(c, b' ' | b'\t' | b'\n' | b'\r')
}

#[inline(always)]
pub(super) fn skip_ws(b: &[u8], mut i: usize) -> usize {
    // Most producers write compact JSON: one compare and out.
    while is_ws(at(b, i)) {
        i += 1;
    }
    i
}

/// Trims JSON whitespace (which includes the '\r' of CRLF framing) from both ends. Form feed and
/// other ASCII whitespace are not JSON whitespace and stay, to be rejected.
fn trim(line: &[u8]) -> &[u8] {
    let start = line.iter().position(|&c| !is_ws(c)).unwrap_or(line.len());
    let end = line.iter().rposition(|&c| !is_ws(c)).map_or(start, |p| p + 1);
    &line[start..end]
}

#[inline(always)]
fn digits(b: &[u8], mut i: usize) -> usize {
    while at(b, i).is_ascii_digit() {
        i += 1;
    }
    i
}

/// `-? (0 | [1-9][0-9]*) (. [0-9]+)? ([eE] [+-]? [0-9]+)?`; returns the offset past it. What
/// follows is checked by the caller's structural rules (so "01" fails there).
#[inline(always)]
fn skip_number(b: &[u8], mut i: usize) -> Result<usize, DecodeError> {
    if at(b, i) == b'-' {
        i += 1;
    }
    match at(b, i) {
        b'0' => i += 1,
        b'1'..=b'9' => i = digits(b, i + 1),
        _ => return Err(DecodeError::Syntax),
    }
    if at(b, i) == b'.' {
        if !at(b, i + 1).is_ascii_digit() {
            return Err(DecodeError::Syntax);
        }
        i = digits(b, i + 1);
    }
    if at(b, i) | 0x20 == b'e' {
        i += 1;
        if matches!(at(b, i), b'+' | b'-') {
            i += 1;
        }
        if !at(b, i).is_ascii_digit() {
            return Err(DecodeError::Syntax);
        }
        i = digits(b, i + 1);
    }
    Ok(i)
}

struct Scanner<'s> {
    table: &'s FieldTable,
    frames: &'s mut [Frame],
    scratch: &'s mut [u8],
    slots: &'s mut [Slot],
    depth_max: usize,
    seen: u64,
    scratch_len: usize,
    session: Option<SessionSpan>,
    /// The value of a top-level "_session" member is being scanned; its end is still open.
    session_open: bool,
    root_members: u32,
}

impl Decoder {
    /// `line` is one event without its trailing '\n' (a trailing '\r' and surrounding JSON
    /// whitespace are allowed and trimmed).
    pub fn decode<'a>(&'a mut self, line: &'a [u8]) -> Result<Event<'a>, DecodeError> {
        if line.len() > self.line_bytes_max {
            return Err(DecodeError::TooLong);
        }
        let b = trim(line);
        match b.first() {
            None => return Err(DecodeError::Empty),
            Some(b'{') => {}
            Some(_) => return Err(DecodeError::NotObject),
        }
        let mut s = Scanner {
            table: &self.table,
            frames: &mut self.frames,
            scratch: &mut self.scratch,
            slots: &mut self.slots,
            depth_max: self.depth_max as usize,
            seen: 0,
            scratch_len: 0,
            session: None,
            session_open: false,
            root_members: 0,
        };
        s.run(b)?;
        debug_assert!(!s.session_open);
        let (seen, session, root_members) = (s.seen, s.session, s.root_members);
        Ok(Event {
            raw: b,
            table: &self.table,
            slots: &self.slots,
            scratch: &self.scratch,
            seen,
            session,
            root_members,
        })
    }
}

impl Scanner<'_> {
    fn run(&mut self, b: &[u8]) -> Result<(), DecodeError> {
        debug_assert_eq!(b.first(), Some(&b'{'));
        let mut depth = 0usize;
        let mut i = 0usize;
        let mut target = NODE_ROOT;
        'value: loop {
            // A value starts at `i`; `target` is its trie node (or NODE_NONE).
            match at(b, i) {
                c @ (b'{' | b'[') => {
                    if depth == self.depth_max {
                        return Err(DecodeError::TooDeep);
                    }
                    let is_array = c == b'[';
                    let node = self.container_node(target, is_array);
                    self.frames[depth] = Frame { node, start: i as u32, is_array };
                    depth += 1;
                    i = skip_ws(b, i + 1);
                    if at(b, i) == if is_array { b']' } else { b'}' } {
                        i += 1;
                        depth -= 1;
                        self.close(self.frames[depth], i)?;
                        if depth == 0 {
                            return finish(b, i);
                        }
                    } else if is_array {
                        target = NODE_NONE;
                        continue 'value;
                    } else {
                        (i, target) = self.key(b, i, depth, COMMA_NONE)?;
                        continue 'value;
                    }
                }
                b'"' => i = self.string_value(b, i, target)?,
                b't' => i = self.literal(b, i, target, b"true", SlotKind::True)?,
                b'f' => i = self.literal(b, i, target, b"false", SlotKind::False)?,
                b'n' => i = self.literal(b, i, target, b"null", SlotKind::Null)?,
                b'-' | b'0'..=b'9' => {
                    let end = skip_number(b, i)?;
                    self.scalar(target, SlotKind::Number, i, end)?;
                    i = end;
                }
                _ => return Err(DecodeError::Syntax),
            }
            // A value ended at `i`: a separator or the enclosing container's close must follow.
            loop {
                if self.session_open && depth == 1 {
                    self.session_open = false;
                    if let Some(s) = self.session.as_mut() {
                        s.end = i as u32;
                    }
                }
                i = skip_ws(b, i);
                let frame = self.frames[depth - 1];
                let c = at(b, i);
                if c == b',' {
                    let comma = i;
                    i = skip_ws(b, i + 1);
                    if frame.is_array {
                        target = NODE_NONE;
                    } else {
                        (i, target) = self.key(b, i, depth, comma as u32)?;
                    }
                    continue 'value;
                }
                if c == if frame.is_array { b']' } else { b'}' } {
                    i += 1;
                    depth -= 1;
                    self.close(frame, i)?;
                    if depth == 0 {
                        return finish(b, i);
                    }
                    continue;
                }
                return Err(DecodeError::Syntax);
            }
        }
    }

    /// The frame node for a container opened at `target`: kept only if something is extracted
    /// at or (for objects) below it, so untracked subtrees skip key lookups.
    #[inline(always)]
    fn container_node(&self, target: u32, is_array: bool) -> u32 {
        if target == NODE_NONE {
            return NODE_NONE;
        }
        let extracted = self.table.node(target).slot != SLOT_NONE;
        if extracted || (!is_array && self.table.has_children(target)) {
            target
        } else {
            NODE_NONE
        }
    }

    #[inline(always)]
    fn close(&mut self, frame: Frame, end: usize) -> Result<(), DecodeError> {
        if frame.node == NODE_NONE {
            return Ok(());
        }
        let kind = if frame.is_array { SlotKind::Array } else { SlotKind::Object };
        self.scalar(frame.node, kind, frame.start as usize, end)
    }

    /// Records a value whose text is `line[start..end]` if `target` is an extracted path.
    #[inline(always)]
    fn scalar(&mut self, target: u32, kind: SlotKind, start: usize, end: usize) -> Result<(), DecodeError> {
        if target == NODE_NONE {
            return Ok(());
        }
        let slot = self.table.node(target).slot;
        if slot == SLOT_NONE {
            return Ok(());
        }
        self.record(slot, Slot { kind, raw_start: start as u32, raw_end: end as u32, text_start: 0, text_end: 0 })
    }

    #[inline(always)]
    fn record(&mut self, slot: u8, value: Slot) -> Result<(), DecodeError> {
        let bit = 1u64 << slot;
        if self.seen & bit != 0 {
            return Err(DecodeError::DuplicateField);
        }
        self.seen |= bit;
        self.slots[usize::from(slot)] = value;
        Ok(())
    }

    #[inline(always)]
    fn literal(
        &mut self,
        b: &[u8],
        i: usize,
        target: u32,
        word: &'static [u8],
        kind: SlotKind,
    ) -> Result<usize, DecodeError> {
        let end = i + word.len();
        if b.get(i..end) != Some(word) {
            return Err(DecodeError::Syntax);
        }
        self.scalar(target, kind, i, end)?;
        Ok(end)
    }

    #[inline(always)]
    fn string_value(&mut self, b: &[u8], i: usize, target: u32) -> Result<usize, DecodeError> {
        let scan = skip_string(b, i + 1)?;
        let body = &b[i + 1..scan.end];
        if scan.non_ascii && std::str::from_utf8(body).is_err() {
            return Err(DecodeError::InvalidUtf8);
        }
        let slot = if target == NODE_NONE { SLOT_NONE } else { self.table.node(target).slot };
        let (raw_start, raw_end) = (i as u32, (scan.end + 1) as u32);
        if scan.escaped {
            let n = unescape(body, &mut self.scratch[self.scratch_len..])?;
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
        Ok(scan.end + 1)
    }

    /// Scans `"key" :` at `i` inside the object `frames[depth - 1]` and returns the offset of
    /// the value and its trie node. `comma` is the separator before the key, for `_session`.
    #[inline(always)]
    fn key(&mut self, b: &[u8], i: usize, depth: usize, comma: u32) -> Result<(usize, u32), DecodeError> {
        if at(b, i) != b'"' {
            return Err(DecodeError::Syntax);
        }
        let scan = skip_string(b, i + 1)?;
        let body = &b[i + 1..scan.end];
        if scan.non_ascii && std::str::from_utf8(body).is_err() {
            return Err(DecodeError::InvalidUtf8);
        }
        let key: &[u8] = if scan.escaped {
            let n = unescape(body, &mut self.scratch[self.scratch_len..])?;
            &self.scratch[self.scratch_len..self.scratch_len + n]
        } else {
            body
        };
        let node = self.frames[depth - 1].node;
        let target = if node == NODE_NONE { NODE_NONE } else { self.table.child(node, key) };
        if depth == 1 {
            self.root_members += 1;
            if key == b"_session" {
                if self.session.is_some() {
                    return Err(DecodeError::DuplicateField);
                }
                self.session = Some(SessionSpan { start: i as u32, end: 0, comma });
                self.session_open = true;
            }
        }
        let j = skip_ws(b, scan.end + 1);
        if at(b, j) != b':' {
            return Err(DecodeError::Syntax);
        }
        Ok((skip_ws(b, j + 1), target))
    }
}

/// The top-level object closed at `i`; `b` is trimmed, so anything left is not whitespace.
#[inline(always)]
fn finish(b: &[u8], i: usize) -> Result<(), DecodeError> {
    if i == b.len() {
        Ok(())
    } else {
        Err(DecodeError::TrailingBytes)
    }
}
