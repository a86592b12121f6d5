//! Producers: the identity and numbering that make acknowledged TCP ingest exactly-once in effect.
//!
//! A client of an `ack = true` listener may open its connection with a hello line naming itself
//! and the number of its next line (`{"hello":"<producer id>","seq":<n>}`). The shard that
//! receives the connection then tags every line with `(producer, seq)` before it logs or hands
//! it off; see [`tag`]. Each shard keeps, per producer, the highest sequence it has applied
//! ([`Producers`]) and skips a tagged line at or below it: a client that resends everything after
//! its last acknowledgement (some of which the server had already applied) changes no state twice.
//! Lines of one producer reach a shard in order (one connection at a time per producer, FIFO
//! hand-off queues), so one high-water mark per producer and shard suffices.
//!
//! The table survives a crash with the log: a tagged line is logged as tagged, and right after a
//! snapshot is captured the shard appends a checkpoint record of the whole table, so replay from
//! that snapshot's `log_seq` starts with the table as it was at the capture.
//!
//! Byte formats (documented in `docs/storage-format.md`, "Tagged log records"):
//! - tagged line: `0x1E <producer id> ' ' <seq, decimal> 0x1E <line>`;
//! - checkpoint: `0x1D` then, per producer, `<producer id> ' ' <high-water mark, decimal> '\n'`.
//!
//! Neither can be mistaken for an event: a JSON line never starts with a control character.

use std::collections::HashMap;

/// First byte of a tagged line.
pub const TAG: u8 = 0x1E;
/// First byte of a checkpoint record.
pub const CHECKPOINT: u8 = 0x1D;
/// Longest producer id accepted in a hello line.
pub const ID_BYTES_MAX: usize = 64;
/// Bytes a tag adds at most: two markers, the id, a space, 20 digits.
pub const TAG_BYTES_MAX: usize = 2 + ID_BYTES_MAX + 1 + 20;

/// Whether `id` is a usable producer id: 1..=64 bytes of `[A-Za-z0-9._:@/-]`.
pub fn valid_id(id: &[u8]) -> bool {
    !id.is_empty()
        && id.len() <= ID_BYTES_MAX
        && id
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b"._:@/-".contains(&b))
}

/// Parse a hello line: `Some((id, next_seq))`, or `None` when `line` is not a hello (an event).
/// `Err` for a hello that is malformed (a bad id, a seq of 0 or missing).
pub fn parse_hello(line: &[u8]) -> Option<Result<(String, u64), String>> {
    let trimmed = line.trim_ascii_start();
    if !trimmed.starts_with(b"{") || memchr::memmem::find(line, b"\"hello\"").is_none() {
        return None;
    }
    let v: serde_json::Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(_) => return None,
    };
    let obj = v.as_object()?;
    let hello = obj.get("hello")?;
    Some((|| {
        let id = hello
            .as_str()
            .ok_or("`hello` must be a string producer id")?;
        if !valid_id(id.as_bytes()) {
            return Err(format!(
                "producer id `{id}` must be 1..={ID_BYTES_MAX} characters of [A-Za-z0-9._:@/-]"
            ));
        }
        let seq = obj.get("seq").map_or(Some(1), |s| s.as_u64()).unwrap_or(0);
        if seq == 0 {
            return Err(
                "`seq` must be the positive number of the next line (1 for a new producer)".into(),
            );
        }
        Ok((id.to_string(), seq))
    })())
}

/// Write the tagged form of `line` into `out` (cleared first).
pub fn tag(out: &mut Vec<u8>, id: &[u8], seq: u64, line: &[u8]) {
    out.clear();
    out.push(TAG);
    out.extend_from_slice(id);
    out.push(b' ');
    out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    out.push(TAG);
    out.extend_from_slice(line);
}

/// A line split into its producer tag (if any) and the event bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tagged<'a> {
    pub producer: Option<(&'a [u8], u64)>,
    pub line: &'a [u8],
}

/// Split a possibly tagged line. A line that starts with [`TAG`] but is not a well-formed tag is
/// returned whole, untagged (it then fails to decode as JSON and is dead-lettered).
pub fn untag(raw: &[u8]) -> Tagged<'_> {
    let whole = Tagged {
        producer: None,
        line: raw,
    };
    if raw.first() != Some(&TAG) {
        return whole;
    }
    let head_end = raw.len().min(TAG_BYTES_MAX);
    let Some(end) = memchr::memchr(TAG, &raw[1..head_end]).map(|i| i + 1) else {
        return whole;
    };
    let head = &raw[1..end];
    let Some(space) = memchr::memchr(b' ', head) else {
        return whole;
    };
    let (id, digits) = (&head[..space], &head[space + 1..]);
    match parse_u64(digits) {
        Some(seq) if valid_id(id) && seq > 0 => Tagged {
            producer: Some((id, seq)),
            line: &raw[end + 1..],
        },
        _ => whole,
    }
}

fn parse_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 20 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// One shard's high-water marks, bounded (see [`Producers::observe`] for the policy when full).
pub struct Producers {
    marks: HashMap<Box<[u8]>, Mark>,
    capacity: usize,
    /// Logical clock for least-recently-used eviction.
    tick: u64,
    pub evictions: u64,
}

struct Mark {
    high: u64,
    used: u64,
}

/// What [`Producers::observe`] decided for one tagged line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Seen {
    /// New: apply it (the mark moved up to it).
    Fresh,
    /// At or below the mark: already applied, skip it.
    Duplicate,
}

impl Producers {
    pub fn new(capacity: usize) -> Producers {
        let capacity = capacity.max(1);
        Producers {
            marks: HashMap::with_capacity(capacity),
            capacity,
            tick: 0,
            evictions: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.marks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.marks.is_empty()
    }

    pub fn high(&self, id: &[u8]) -> Option<u64> {
        self.marks.get(id).map(|m| m.high)
    }

    /// Decide whether line `seq` of producer `id` is new here, and remember it if so. When the
    /// table is full, a new producer takes the place of the least recently active one, whose
    /// lines could then be applied twice if it resent old ones: counted in `evictions` (size
    /// `limits.producers_max` for the number of producers that write at once).
    pub fn observe(&mut self, id: &[u8], seq: u64) -> Seen {
        self.tick += 1;
        if let Some(m) = self.marks.get_mut(id) {
            m.used = self.tick;
            if seq <= m.high {
                return Seen::Duplicate;
            }
            m.high = seq;
            return Seen::Fresh;
        }
        self.insert(id, seq);
        Seen::Fresh
    }

    fn insert(&mut self, id: &[u8], high: u64) {
        if self.marks.len() >= self.capacity {
            let oldest = self
                .marks
                .iter()
                .min_by_key(|(_, m)| m.used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.marks.remove(&k);
                self.evictions += 1;
            }
        }
        self.marks.insert(
            id.into(),
            Mark {
                high,
                used: self.tick,
            },
        );
    }

    /// The checkpoint record of the whole table, written into `out` (cleared first).
    pub fn checkpoint(&self, out: &mut Vec<u8>) {
        out.clear();
        out.push(CHECKPOINT);
        let mut entries: Vec<(&[u8], u64)> =
            self.marks.iter().map(|(k, m)| (&k[..], m.high)).collect();
        entries.sort_unstable();
        for (id, high) in entries {
            out.extend_from_slice(id);
            out.push(b' ');
            out.extend_from_slice(itoa::Buffer::new().format(high).as_bytes());
            out.push(b'\n');
        }
    }

    /// Merge a checkpoint record (taking the higher mark per producer). False if `record` is not
    /// a well-formed checkpoint; nothing is merged then.
    pub fn apply_checkpoint(&mut self, record: &[u8]) -> bool {
        let Some(body) = record.strip_prefix(&[CHECKPOINT]) else {
            return false;
        };
        let mut parsed = Vec::new();
        for entry in body.split(|&b| b == b'\n').filter(|e| !e.is_empty()) {
            let Some(space) = memchr::memchr(b' ', entry) else {
                return false;
            };
            let (id, digits) = (&entry[..space], &entry[space + 1..]);
            match parse_u64(digits) {
                Some(high) if valid_id(id) => parsed.push((id, high)),
                _ => return false,
            }
        }
        for (id, high) in parsed {
            self.tick += 1;
            match self.marks.get_mut(id) {
                Some(m) => m.high = m.high.max(high),
                None => self.insert(id, high),
            }
        }
        true
    }

    /// Whether `record` is a checkpoint (not an event).
    pub fn is_checkpoint(record: &[u8]) -> bool {
        record.first() == Some(&CHECKPOINT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_round_trips_and_rejects_lookalikes() {
        let mut b = Vec::new();
        tag(&mut b, b"client-7", 42, br#"{"user":"u"}"#);
        let t = untag(&b);
        assert_eq!(t.producer, Some((&b"client-7"[..], 42)));
        assert_eq!(t.line, br#"{"user":"u"}"#);
        assert_eq!(untag(br#"{"a":1}"#).producer, None);
        for bad in [
            &b"\x1eid\x1e{}"[..],
            b"\x1eid 0\x1e{}",
            b"\x1eid x\x1e{}",
            b"\x1e",
            b"\x1e\x1e",
        ] {
            let t = untag(bad);
            assert_eq!((t.producer, t.line), (None, bad), "{bad:?}");
        }
    }

    #[test]
    fn hello_lines() {
        assert_eq!(
            parse_hello(br#"{"hello":"p1","seq":5}"#),
            Some(Ok(("p1".into(), 5)))
        );
        assert_eq!(
            parse_hello(br#"{"hello":"p1"}"#),
            Some(Ok(("p1".into(), 1)))
        );
        assert!(matches!(parse_hello(br#"{"hello":"a b"}"#), Some(Err(_))));
        assert!(matches!(
            parse_hello(br#"{"hello":"p","seq":0}"#),
            Some(Err(_))
        ));
        assert!(matches!(parse_hello(br#"{"hello":7}"#), Some(Err(_))));
        assert_eq!(parse_hello(br#"{"user":"hello"}"#), None);
        assert_eq!(parse_hello(br#"{"user":"u","note":"\"hello\""}"#), None);
    }

    #[test]
    fn marks_deduplicate_and_survive_a_checkpoint() {
        let mut p = Producers::new(4);
        assert_eq!(p.observe(b"a", 1), Seen::Fresh);
        assert_eq!(p.observe(b"a", 2), Seen::Fresh);
        assert_eq!(p.observe(b"a", 2), Seen::Duplicate);
        assert_eq!(p.observe(b"a", 1), Seen::Duplicate);
        assert_eq!(p.observe(b"b", 9), Seen::Fresh);
        let mut cp = Vec::new();
        p.checkpoint(&mut cp);
        let mut q = Producers::new(4);
        assert!(q.apply_checkpoint(&cp));
        assert_eq!(q.high(b"a"), Some(2));
        assert_eq!(q.high(b"b"), Some(9));
        assert_eq!(q.observe(b"b", 9), Seen::Duplicate);
        assert!(!q.apply_checkpoint(b"\x1dbad entry\n"));
        assert!(!q.apply_checkpoint(br#"{"a":1}"#));
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_active() {
        let mut p = Producers::new(2);
        p.observe(b"a", 1);
        p.observe(b"b", 1);
        p.observe(b"a", 2);
        p.observe(b"c", 1);
        assert_eq!(p.len(), 2);
        assert_eq!(p.evictions, 1);
        assert_eq!(p.high(b"b"), None);
        assert_eq!(p.high(b"a"), Some(2));
    }
}
