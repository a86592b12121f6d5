//! The output batch a shard fills while it processes events: newline-terminated JSON records,
//! each tagged with its stream (events, markers, late, dead-letter), in the order they were
//! produced. Sinks read the records they subscribe to; the runtime clears the batch after each
//! hand-over. The buffer is reserved at start and reused, so steady-state output allocates nothing.
//!
//! Every JSON record format the appliance emits is written here or in `markers.rs`, so the
//! output contract lives in one place.

use crate::config::Stream;
use crate::decode::write_json_string;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rec {
    pub stream: Stream,
    /// Exclusive end offset of this record (its '\n' included) in `Out::buf`.
    pub end: u32,
}

pub struct Out {
    pub buf: Vec<u8>,
    pub recs: Vec<Rec>,
}

impl Out {
    pub fn with_capacity(bytes: usize, records: usize) -> Out {
        Out {
            buf: Vec::with_capacity(bytes),
            recs: Vec::with_capacity(records),
        }
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.recs.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }

    pub fn len(&self) -> usize {
        self.recs.len()
    }

    /// Half its reserved bytes or records used: producers of many records at once (a mass
    /// expiry) stop here and resume after the batch is delivered, so it never grows.
    pub fn half_full(&self) -> bool {
        self.buf.len() >= self.buf.capacity() / 2 || self.recs.len() >= self.recs.capacity() / 2
    }

    /// Records in production order: (stream, line bytes including the trailing '\n').
    pub fn iter(&self) -> impl Iterator<Item = (Stream, &[u8])> + '_ {
        let mut start = 0usize;
        self.recs.iter().map(move |r| {
            let line = &self.buf[start..r.end as usize];
            start = r.end as usize;
            (r.stream, line)
        })
    }

    /// Close the record whose bytes were appended to `buf` since the previous record.
    pub fn finish(&mut self, stream: Stream) {
        self.buf.push(b'\n');
        debug_assert!(self.buf.len() <= u32::MAX as usize);
        self.recs.push(Rec {
            stream,
            end: self.buf.len() as u32,
        });
    }

    /// An event no profile matched: passed through untouched on the events stream.
    pub fn passthrough(&mut self, raw: &[u8]) {
        self.buf.extend_from_slice(raw);
        self.finish(Stream::Events);
    }

    /// A record that could not be decoded or admitted. `raw` need not be valid JSON or UTF-8:
    /// it is embedded as a JSON string.
    pub fn dead_letter(&mut self, reason: &str, transport: &str, raw: &[u8]) {
        self.buf
            .extend_from_slice(b"{\"kind\":\"dead_letter\",\"reason\":\"");
        self.buf.extend_from_slice(reason.as_bytes());
        self.buf.extend_from_slice(b"\",\"transport\":\"");
        self.buf.extend_from_slice(transport.as_bytes());
        self.buf.extend_from_slice(b"\",\"raw\":");
        write_json_string(raw, &mut self.buf);
        self.buf.push(b'}');
        self.finish(Stream::DeadLetter);
    }

    /// A decoded event refused by the engine (e.g. a full session table under `on_full = "reject"`):
    /// the event is valid JSON and is embedded as an object.
    pub fn dead_letter_event(&mut self, reason: &str, profile: &str, event: &[u8]) {
        self.buf
            .extend_from_slice(b"{\"kind\":\"dead_letter\",\"reason\":\"");
        self.buf.extend_from_slice(reason.as_bytes());
        self.buf.extend_from_slice(b"\",\"profile\":\"");
        self.buf.extend_from_slice(profile.as_bytes());
        self.buf.extend_from_slice(b"\",\"event\":");
        self.buf.extend_from_slice(event);
        self.buf.push(b'}');
        self.finish(Stream::DeadLetter);
    }
}

pub fn write_i64(out: &mut Vec<u8>, v: i64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

pub fn write_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// Finite floats as shortest round-trip text; non-finite (an aggregate that saw no value) as null.
pub fn write_f64(out: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        if v == v.trunc() && v.abs() < 1e15 {
            write_i64(out, v as i64);
        } else {
            out.extend_from_slice(ryu::Buffer::new().format_finite(v).as_bytes());
        }
    } else {
        out.extend_from_slice(b"null");
    }
}

/// Session ids render as 16 lowercase hex digits.
pub fn write_id(out: &mut Vec<u8>, id: u64) {
    out.extend_from_slice(&id_text(id));
}

/// `"<16 hex digits>"`, quotes included, built on the stack (this is on every enriched event).
/// Eight digits at a time in a u64 (SWAR), since a digit loop was a visible share of an event.
pub fn id_text(id: u64) -> [u8; 18] {
    let mut t = [b'"'; 18];
    t[1..9].copy_from_slice(&hex8((id >> 32) as u32));
    t[9..17].copy_from_slice(&hex8(id as u32));
    t
}

/// The 8 lowercase hex digits of `v`, most significant first.
fn hex8(v: u32) -> [u8; 8] {
    // Nibble k to byte k (little-endian), then reversed so the most significant comes first.
    let mut x = u64::from(v);
    x = (x | (x << 16)) & 0x0000_ffff_0000_ffff;
    x = (x | (x << 8)) & 0x00ff_00ff_00ff_00ff;
    x = (x | (x << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    let x = x.swap_bytes();
    // Per byte d <= 15: '0' + d, plus 'a' - '0' - 10 where d > 9 (then d + 6 reaches bit 4).
    // No byte carries into the next: 0x30 + 15 + 39 < 256.
    let letters = ((x + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    (x + 0x3030_3030_3030_3030 + letters * u64::from(b'a' - b'0' - 10)).to_le_bytes()
}

pub fn id_string(id: u64) -> String {
    format!("{id:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_text_is_the_quoted_16_digit_lowercase_hex() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for id in [
            0,
            1,
            9,
            10,
            15,
            16,
            0xdead_beef,
            u64::MAX,
            0x0123_4567_89ab_cdef,
        ] {
            assert_eq!(id_text(id), format!("\"{id:016x}\"").as_bytes(), "{id:x}");
        }
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            assert_eq!(id_text(x), format!("\"{x:016x}\"").as_bytes(), "{x:x}");
        }
    }
}
