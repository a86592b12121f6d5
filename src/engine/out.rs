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
pub fn id_text(id: u64) -> [u8; 18] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut t = [b'"'; 18];
    for (i, d) in t[1..17].iter_mut().enumerate() {
        *d = HEX[((id >> ((15 - i) * 4)) & 0xf) as usize];
    }
    t
}

pub fn id_string(id: u64) -> String {
    format!("{id:016x}")
}
