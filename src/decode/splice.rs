//! Re-emitting an event with our `"_session"` member as its last top-level member.
//!
//! Invariants: the output is the validated input with at most one byte range cut out (an old
//! top-level `"_session"` member together with exactly one adjacent comma) and one member plus,
//! when other members remain, one comma inserted before the closing brace; so it is valid JSON
//! whenever `member` is a valid `"name":value` pair. Only `extend_from_slice`/`push` touch
//! `out`, so nothing allocates when it has the capacity.

use super::scan::{at, skip_ws, COMMA_NONE};
use super::Event;

impl<'a> Event<'a> {
    /// Writes raw() with `member` (e.g. br#""_session":{"id":"x"}"#) inserted as the LAST member
    /// of the top-level object (adding the comma when the object is non-empty). An existing
    /// top-level "_session" member is removed first, so re-feeding our own output works.
    /// Appends to `out`; no trailing newline.
    pub fn write_enriched(&self, member: &[u8], out: &mut Vec<u8>) {
        self.write_enriched_with(out, |out| out.extend_from_slice(member));
    }

    /// When [`Event::write_enriched`] would cut nothing out (the event has no `"_session"`
    /// member, the usual case): the bytes it keeps before the member, and whether a comma
    /// goes between them and the member. The caller then writes the event in one piece.
    #[inline]
    pub fn enriched_head(&self) -> Option<(&'a [u8], bool)> {
        match self.session {
            None => Some(self.uncut_head()),
            Some(_) => None,
        }
    }

    /// The bytes before the closing brace, and whether the object has a member.
    #[inline(always)]
    fn uncut_head(&self) -> (&'a [u8], bool) {
        (&self.raw[..self.close()], self.root_members > 0)
    }

    /// Offset of the object's closing brace.
    #[inline(always)]
    fn close(&self) -> usize {
        let close = self.raw.len() - 1;
        assert_eq!(self.raw[close], b'}');
        close
    }

    /// [`Event::write_enriched`] with the member written by `member` straight into `out`
    /// (no copy of it through a scratch buffer: this runs for every enriched event).
    #[inline]
    pub fn write_enriched_with(&self, out: &mut Vec<u8>, member: impl FnOnce(&mut Vec<u8>)) {
        let comma = match self.session {
            None => {
                let (head, comma) = self.uncut_head();
                out.extend_from_slice(head);
                comma
            }
            Some(s) => {
                let (raw, close) = (self.raw, self.close());
                let start = s.start as usize;
                let end = member_end(raw, start);
                debug_assert!(start < end && end <= close);
                let (cut_start, cut_end) = if s.comma != COMMA_NONE {
                    (s.comma as usize, end)
                } else {
                    // First member: take the comma after it, if another member follows.
                    let j = skip_ws(raw, end);
                    if at(raw, j) == b',' {
                        (start, j + 1)
                    } else {
                        (start, end)
                    }
                };
                out.extend_from_slice(&raw[..cut_start]);
                out.extend_from_slice(&raw[cut_end..close]);
                self.root_members > 1
            }
        };
        if comma {
            out.push(b',');
        }
        member(out);
        out.push(b'}');
    }
}

/// Offset just past the value of the member whose key starts at `key` (its opening quote).
/// `raw` is a validated object, so this only has to skip, not check.
fn member_end(raw: &[u8], key: usize) -> usize {
    let colon = skip_ws(raw, string_end(raw, key));
    debug_assert_eq!(raw[colon], b':');
    let value = skip_ws(raw, colon + 1);
    match raw[value] {
        b'"' => string_end(raw, value),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut i = value;
            loop {
                match raw[i] {
                    b'"' => i = string_end(raw, i),
                    b'{' | b'[' => {
                        depth += 1;
                        i += 1;
                    }
                    b'}' | b']' => {
                        depth -= 1;
                        i += 1;
                        if depth == 0 {
                            return i;
                        }
                    }
                    _ => i += 1,
                }
            }
        }
        _ => {
            let mut i = value;
            while !matches!(
                at(raw, i),
                b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'
            ) {
                i += 1;
            }
            i
        }
    }
}

/// Offset just past the string whose opening quote is at `open`.
fn string_end(raw: &[u8], open: usize) -> usize {
    let mut i = open + 1;
    loop {
        match raw[i] {
            b'"' => return i + 1,
            b'\\' => i += 2,
            _ => i += 1,
        }
    }
}
