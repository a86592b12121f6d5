//! Newline framing for byte streams (TCP connections, replay files): a fixed buffer that is
//! filled from the source, handed out as runs of complete lines, and compacted in place.
//!
//! Invariants: the buffer never grows (its size is `line_bytes_max + read_chunk`, fixed at
//! construction); a partial line longer than `line_bytes_max` is reported once as
//! [`Chunk::TooLong`] with at most [`TOO_LONG_PREFIX_BYTES`] of its start, and everything up to
//! and including its terminating '\n' is then skipped, so the stream stays usable.

use std::ops::Range;

/// How much of an oversized line a dead-letter record keeps.
pub const TOO_LONG_PREFIX_BYTES: usize = 1024;

/// What [`LineBuf::next_chunk`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chunk {
    /// `buf[range]` is one or more complete lines, each ending in '\n'.
    Lines(Range<usize>),
    /// A line exceeded `line_bytes_max`; `buf[range]` is its first bytes (for the dead letter).
    TooLong(Range<usize>),
}

pub struct LineBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    line_bytes_max: usize,
    /// Discarding the rest of an oversized line until its '\n'.
    skipping: bool,
}

impl LineBuf {
    pub fn new(line_bytes_max: usize, read_chunk: usize) -> LineBuf {
        assert!(line_bytes_max > 0 && read_chunk > 0);
        LineBuf {
            buf: vec![0u8; line_bytes_max + read_chunk].into_boxed_slice(),
            start: 0,
            end: 0,
            line_bytes_max,
            skipping: false,
        }
    }

    /// Free space to read into, after moving any partial line to the front. Never empty: a
    /// partial line kept here is at most `line_bytes_max` bytes.
    pub fn spare_mut(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        debug_assert!(self.end <= self.line_bytes_max);
        &mut self.buf[self.end..]
    }

    /// `n` bytes were written at the start of the last `spare_mut` slice.
    pub fn commit(&mut self, n: usize) {
        assert!(self.end + n <= self.buf.len());
        self.end += n;
    }

    pub fn bytes(&self, r: Range<usize>) -> &[u8] {
        &self.buf[r]
    }

    /// The next run of complete lines, or the report of an oversized one; `None` when only a
    /// partial line (within the limit) is left. A returned range stays valid until the next
    /// `spare_mut`.
    pub fn next_chunk(&mut self) -> Option<Chunk> {
        loop {
            if self.start == self.end {
                return None;
            }
            if self.skipping {
                match memchr::memchr(b'\n', &self.buf[self.start..self.end]) {
                    Some(i) => {
                        self.start += i + 1;
                        self.skipping = false;
                        continue;
                    }
                    None => {
                        self.start = self.end;
                        return None;
                    }
                }
            }
            let pending = &self.buf[self.start..self.end];
            // Only the first line can be over the limit when the previous call handed out
            // every complete line; later ones are checked line by line by the consumer.
            if let Some(i) = memchr::memrchr(b'\n', pending) {
                let r = self.start..self.start + i + 1;
                self.start = r.end;
                return Some(Chunk::Lines(r));
            }
            if pending.len() > self.line_bytes_max {
                let r = self.start..self.start + TOO_LONG_PREFIX_BYTES.min(pending.len());
                self.skipping = true;
                self.start = self.end;
                return Some(Chunk::TooLong(r));
            }
            return None;
        }
    }

    /// At end of input: the last line if it had no '\n' (and was not being skipped).
    pub fn finish(&mut self) -> Option<Range<usize>> {
        if self.skipping || self.start == self.end {
            self.start = self.end;
            return None;
        }
        let r = self.start..self.end;
        self.start = self.end;
        Some(r)
    }
}

/// Calls `f` for each line of `data` (split on '\n'; a trailing '\r' is removed; empty lines
/// are skipped; a last line without '\n' counts).
#[inline]
pub fn for_each_line(data: &[u8], mut f: impl FnMut(&[u8])) {
    let mut pos = 0;
    while pos < data.len() {
        let end = memchr::memchr(b'\n', &data[pos..]).map_or(data.len(), |i| pos + i);
        let mut line = &data[pos..end];
        if let [rest @ .., b'\r'] = line {
            line = rest;
        }
        if !line.is_empty() {
            f(line);
        }
        pos = end + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(lb: &mut LineBuf, data: &[u8]) -> Vec<String> {
        let mut got = Vec::new();
        let mut data = data;
        while !data.is_empty() {
            let spare = lb.spare_mut();
            let n = spare.len().min(data.len()).min(7);
            spare[..n].copy_from_slice(&data[..n]);
            lb.commit(n);
            data = &data[n..];
            while let Some(c) = lb.next_chunk() {
                match c {
                    Chunk::Lines(r) => for_each_line(lb.bytes(r), |l| {
                        if l.len() > 10 {
                            got.push("TOO_LONG".into())
                        } else {
                            got.push(String::from_utf8_lossy(l).into_owned())
                        }
                    }),
                    Chunk::TooLong(r) => {
                        assert!(lb.bytes(r).len() <= TOO_LONG_PREFIX_BYTES);
                        got.push("TOO_LONG".into())
                    }
                }
            }
        }
        if let Some(r) = lb.finish() {
            got.push(format!("LAST:{}", String::from_utf8_lossy(lb.bytes(r))));
        }
        got
    }

    #[test]
    fn splits_skips_oversized_and_keeps_going() {
        let mut lb = LineBuf::new(10, 4);
        let got = feed(
            &mut lb,
            b"abc\r\n\nde\n0123456789ABCDEF\nok\n0123456789\ntail",
        );
        assert_eq!(
            got,
            vec!["abc", "de", "TOO_LONG", "ok", "0123456789", "LAST:tail"]
        );
    }

    #[test]
    fn oversized_last_line_is_not_emitted_at_eof() {
        let mut lb = LineBuf::new(4, 4);
        assert_eq!(feed(&mut lb, b"a\n123456789"), vec!["a", "TOO_LONG"]);
    }

    #[test]
    fn line_of_exactly_the_limit_passes() {
        let mut lb = LineBuf::new(4, 1);
        assert_eq!(feed(&mut lb, b"1234\n5678"), vec!["1234", "LAST:5678"]);
    }
}
