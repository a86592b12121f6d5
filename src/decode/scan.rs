//! Stage 2 of decoding: walks the token offsets from `index` with an explicit frame stack (no
//! recursion, so nesting is bounded by `depth_max`, not by the thread's stack), checking the
//! grammar token by token and walking the path trie in step with the objects it enters.
//!
//! Invariants: `frames[..depth - 1]` hold the ancestors of the innermost open container `cur`;
//! a frame's `node` is the trie node of the path that led to it, or `NODE_NONE` when nothing at
//! or below it is extracted (then keys are not looked up). A slot is written at most once per
//! decode (the `seen` bit guards it: a second write is `DuplicateField`).
//! `scratch[..scratch_len]` holds the text of extracted escaped strings; other strings are
//! unescaped past `scratch_len` only to validate them and never committed. Token offsets end
//! with a sentinel equal to the line length, where `at` yields byte 0, which no rule accepts.

use super::escape::unescape;
use super::index;
use super::table::{key_prefix, FieldTable, NODE_NONE, NODE_ROOT, SLOT_NONE};
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
    let end = line
        .iter()
        .rposition(|&c| !is_ws(c))
        .map_or(start, |p| p + 1);
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
    any_backslash: bool,
    /// Per 64-byte block, the backslashes inside strings (from `index::build`).
    escapes: &'s [u64],
    seen: u64,
    scratch_len: usize,
    session: Option<SessionSpan>,
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
        let index = index::build(self.isa, b, &mut self.tokens, &mut self.escapes)?;
        let mut s = Scanner {
            table: &self.table,
            frames: &mut self.frames,
            scratch: &mut self.scratch,
            slots: &mut self.slots,
            depth_max: self.depth_max as usize,
            any_backslash: index.any_backslash,
            escapes: &self.escapes,
            seen: 0,
            scratch_len: 0,
            session: None,
            root_members: 0,
        };
        s.run(b, &self.tokens[..=index.count])?;
        let (seen, session, root_members) = (s.seen, s.session, s.root_members);
        // Only string bodies can hold non-ASCII bytes once the grammar held (anywhere else they
        // were rejected as garbage), so one pass over the line checks exactly them.
        if index.any_non_ascii && std::str::from_utf8(b).is_err() {
            return Err(DecodeError::InvalidUtf8);
        }
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
    /// `toks` are the token offsets plus the sentinel.
    fn run(&mut self, b: &[u8], toks: &[u32]) -> Result<(), DecodeError> {
        debug_assert_eq!(b.first(), Some(&b'{'));
        debug_assert_eq!(toks.first(), Some(&0));
        let count = toks.len() - 1;
        let tok = |k: usize| toks[k] as usize;
        // `cur` is the innermost open container, kept in registers; `frames[..depth - 1]` hold
        // its ancestors and are touched only on open and close.
        let mut cur = Frame::default();
        let mut depth = 0usize;
        let mut k = 0usize;
        let mut target = NODE_ROOT;
        'value: loop {
            // A value starts at token `k`; `target` is its trie node (or NODE_NONE).
            let p = tok(k);
            match at(b, p) {
                c @ (b'{' | b'[') => {
                    if depth == self.depth_max {
                        return Err(DecodeError::TooDeep);
                    }
                    if depth > 0 {
                        self.frames[depth - 1] = cur;
                    }
                    let is_array = c == b'[';
                    cur = Frame {
                        node: self.container_node(target, is_array),
                        start: p as u32,
                        is_array,
                    };
                    depth += 1;
                    k += 1;
                    let q = tok(k);
                    if at(b, q) != if is_array { b']' } else { b'}' } {
                        if is_array {
                            target = NODE_NONE;
                        } else {
                            (k, target) = self.key(b, toks, k, cur.node, depth, COMMA_NONE)?;
                        }
                        continue 'value;
                    }
                    k += 1;
                    self.close(cur, q + 1)?;
                    depth -= 1;
                    if depth == 0 {
                        return finish(k, count);
                    }
                    cur = self.frames[depth - 1];
                }
                b'"' => {
                    let close = tok(k + 1);
                    self.string_value(b, p, close, target)?;
                    k += 2;
                }
                c => {
                    let end = match c {
                        b't' => self.literal(b, p, target, b"true", SlotKind::True)?,
                        b'f' => self.literal(b, p, target, b"false", SlotKind::False)?,
                        b'n' => self.literal(b, p, target, b"null", SlotKind::Null)?,
                        b'-' | b'0'..=b'9' => {
                            let end = skip_number(b, p)?;
                            self.scalar(target, SlotKind::Number, p, end)?;
                            end
                        }
                        _ => return Err(DecodeError::Syntax),
                    };
                    k += 1;
                    // The run this token starts must be exactly the scalar: "truex", "1.2.3".
                    if end != tok(k) && !is_ws(at(b, end)) {
                        return Err(DecodeError::Syntax);
                    }
                }
            }
            // A value ended: a separator or the enclosing container's close must follow as
            // token `k`.
            loop {
                let p = tok(k);
                let c = at(b, p);
                if c == b',' {
                    k += 1;
                    if cur.is_array {
                        target = NODE_NONE;
                    } else {
                        (k, target) = self.key(b, toks, k, cur.node, depth, p as u32)?;
                    }
                    continue 'value;
                }
                if c == if cur.is_array { b']' } else { b'}' } {
                    k += 1;
                    self.close(cur, p + 1)?;
                    depth -= 1;
                    if depth == 0 {
                        return finish(k, count);
                    }
                    cur = self.frames[depth - 1];
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

    /// Does the string body `b[open + 1..close]` need unescaping? Only lines that hold a
    /// backslash at all look at the per-block masks.
    #[inline(always)]
    fn has_escape(&self, open: usize, close: usize) -> bool {
        if !self.any_backslash {
            return false;
        }
        let (first, last) = (open + 1, close); // bits first..last
        let mut word = first / 64;
        let mut mask = self.escapes[word] & (!0u64 << (first % 64));
        while word < last / 64 {
            if mask != 0 {
                return true;
            }
            word += 1;
            mask = self.escapes[word];
        }
        mask & !(!0u64 << (last % 64)) != 0
    }

    #[inline(always)]
    fn string_value(
        &mut self,
        b: &[u8],
        open: usize,
        close: usize,
        target: u32,
    ) -> Result<(), DecodeError> {
        debug_assert!(b[open] == b'"' && b[close] == b'"' && open < close);
        let body = &b[open + 1..close];
        let slot = if target == NODE_NONE {
            SLOT_NONE
        } else {
            self.table.node(target).slot
        };
        let (raw_start, raw_end) = (open as u32, (close + 1) as u32);
        if self.has_escape(open, close) {
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
        Ok(())
    }

    /// Takes `"key" :` at token `k` inside an object whose trie node is `node`, at nesting
    /// `depth`, and returns the token of the value and its trie node. `comma` is the offset of
    /// the separator before the key, for `_session`.
    #[inline(always)]
    fn key(
        &mut self,
        b: &[u8],
        toks: &[u32],
        k: usize,
        node: u32,
        depth: usize,
        comma: u32,
    ) -> Result<(usize, u32), DecodeError> {
        let open = toks[k] as usize;
        if at(b, open) != b'"' {
            return Err(DecodeError::Syntax);
        }
        let close = toks[k + 1] as usize;
        if at(b, toks[k + 2] as usize) != b':' {
            return Err(DecodeError::Syntax);
        }
        let body = &b[open + 1..close];
        let escaped = self.has_escape(open, close);
        let mut target = NODE_NONE;
        if node != NODE_NONE || depth == 1 {
            let (key, prefix) = if escaped {
                let at = self.scratch_len;
                let n = unescape(body, &mut self.scratch[at..])?;
                (&self.scratch[at..at + n], key_prefix(self.scratch, at, n))
            } else {
                (body, key_prefix(b, open + 1, body.len()))
            };
            if node != NODE_NONE {
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
            unescape(body, &mut self.scratch[self.scratch_len..])?;
        }
        Ok((k + 3, target))
    }
}

const SESSION_KEY: &[u8; 8] = b"_session";
const SESSION_PREFIX: u64 = u64::from_le_bytes(*SESSION_KEY);

/// The top-level object closed just before token `k`; anything after it is trailing.
#[inline(always)]
fn finish(k: usize, count: usize) -> Result<(), DecodeError> {
    if k == count {
        Ok(())
    } else {
        Err(DecodeError::TrailingBytes)
    }
}
