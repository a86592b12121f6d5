//! Rendering of session markers: the JSON contract of `session_start`, `session_end`,
//! `sub_session_start`, `sub_session_end`, `session_merged` and `late_event` records, and of the
//! `_session` member spliced into enriched events. Values captured from events are copied as the
//! JSON tokens they were, so nothing is re-escaped.

use super::out::{id_text, write_f64, write_i64, write_id, write_u64, HighDigits, Out, Tail};
use super::payload::{self, VarReader};
use super::rules::{ProfileRule, SubRule};
use super::EndReason;
use crate::config::{Stream, PROFILE_NAME_MAX};
use crate::decode::write_json_string;

/// Hot fields of a session, copied out of its table head for rendering.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub id: u64,
    pub start_ts: i64,
    pub last_ts: i64,
    pub count: u32,
}

/// A profile's constant marker text, JSON-escaped once when the rules are compiled, so that a
/// marker copies each piece whole instead of escaping the same names again (markers are a large
/// part of the output when sessions are short).
#[derive(Clone, Debug, Default)]
pub struct ProfileText {
    /// `{"kind":"session_start","profile":"<name>","key":`
    start_open: Box<[u8]>,
    /// `{"kind":"session_end","profile":"<name>","key":`
    end_open: Box<[u8]>,
    /// `"<path>":` of each metadata field, in the profile's order; likewise state.
    metadata: Box<[Box<[u8]>]>,
    state: Box<[Box<[u8]>]>,
    /// `"<name>":` of each counter, aggregate and list.
    counters: Box<[Box<[u8]>]>,
    aggregates: Box<[Box<[u8]>]>,
    lists: Box<[Box<[u8]>]>,
    pub member_head: MemberHead,
}

impl ProfileText {
    pub fn new(rule: &ProfileRule, fields: &[String]) -> ProfileText {
        let open = |kind: &str| {
            let mut b = Vec::new();
            b.extend_from_slice(b"{\"kind\":\"");
            b.extend_from_slice(kind.as_bytes());
            b.extend_from_slice(b"\",\"profile\":");
            write_json_string(rule.name.as_bytes(), &mut b);
            b.extend_from_slice(b",\"key\":");
            b.into_boxed_slice()
        };
        let member = |name: &str| {
            let mut b = Vec::new();
            write_json_string(name.as_bytes(), &mut b);
            b.push(b':');
            b.into_boxed_slice()
        };
        let paths = |ids: &[crate::decode::FieldId]| {
            ids.iter()
                .map(|&f| member(&fields[usize::from(f)]))
                .collect()
        };
        ProfileText {
            start_open: open("session_start"),
            end_open: open("session_end"),
            metadata: paths(&rule.metadata),
            state: paths(&rule.state),
            counters: rule.counters.iter().map(|c| member(&c.name)).collect(),
            aggregates: rule.aggregates.iter().map(|a| member(&a.name)).collect(),
            lists: rule.lists.iter().map(|l| member(&l.name)).collect(),
            member_head: MemberHead::new(&rule.name),
        }
    }
}

/// The start of the `_session` member, `"_session":{"id":"<id>","profile":"<name>","seq":`,
/// made once per profile with the id left blank and padded to a fixed size: an enriched event
/// copies it whole and writes the id over the blank, where piece by piece it took five copies,
/// one of a variable length.
#[derive(Clone, Debug)]
pub struct MemberHead {
    bytes: [u8; MEMBER_HEAD_BYTES],
    len: usize,
}

/// The member head's bytes besides the profile name.
const MEMBER_HEAD_FIXED: usize = 18 + 16 + 13 + 8;
/// Room for the longest member head. Profile names need no escaping (`[A-Za-z0-9_-]`).
const MEMBER_HEAD_BYTES: usize = 128;
const _: () = assert!(MEMBER_HEAD_FIXED + PROFILE_NAME_MAX <= MEMBER_HEAD_BYTES);
/// A member head this long or shorter (a profile name of up to 9 characters) is copied as its
/// first half.
const MEMBER_HEAD_SHORT: usize = MEMBER_HEAD_BYTES / 2;
/// Where the id's quoted digits go in the member head.
const MEMBER_ID_AT: usize = 17;

impl Default for MemberHead {
    fn default() -> Self {
        MemberHead::new("")
    }
}

impl MemberHead {
    /// For a profile name of at most [`PROFILE_NAME_MAX`] bytes (configuration validation's
    /// limit).
    pub fn new(profile: &str) -> MemberHead {
        assert!(
            profile.len() <= PROFILE_NAME_MAX,
            "profile name `{profile}` longer than {PROFILE_NAME_MAX}"
        );
        let mut text = Vec::with_capacity(MEMBER_HEAD_BYTES);
        text.extend_from_slice(b"\"_session\":{\"id\":");
        text.extend_from_slice(&id_text(0));
        text.extend_from_slice(b",\"profile\":\"");
        text.extend_from_slice(profile.as_bytes());
        text.extend_from_slice(b"\",\"seq\":");
        debug_assert_eq!(text.len(), MEMBER_HEAD_FIXED + profile.len());
        let mut bytes = [0; MEMBER_HEAD_BYTES];
        bytes[..text.len()].copy_from_slice(&text);
        MemberHead {
            bytes,
            len: text.len(),
        }
    }
}

/// `,"<name>":` as one constant piece.
macro_rules! member {
    ($name:literal) => {
        concat!(",\"", $name, "\":").as_bytes()
    };
}

/// Room for the longest `_session` member: its head, a `seq` of 10 digits,
/// `,"start_ts":`, a sign and 19 digits, `}`, and the slack of the number stores.
pub const SESSION_MEMBER_ROOM: usize = MEMBER_HEAD_FIXED + PROFILE_NAME_MAX + 43 + Tail::SLACK;
const _: () = assert!(MEMBER_HEAD_BYTES <= SESSION_MEMBER_ROOM);

/// `"_session":{"id":"<hex>","profile":"<name>","seq":<n>,"start_ts":<ms>}`, on every enriched
/// event: written in one piece into reserved room (see [`Tail`]).
#[inline]
pub fn session_member(
    buf: &mut Vec<u8>,
    head: &MemberHead,
    high: &mut HighDigits,
    id: u64,
    seq: u32,
    start_ts: i64,
) {
    let mut t = Tail::new(buf, SESSION_MEMBER_ROOM);
    // SAFETY: the member and the slack fit in the room reserved.
    unsafe { put_session_member(&mut t, head, high, id, seq, start_ts) };
}

/// An enriched event with nothing cut out of it (see [`crate::decode::Event::enriched_head`]):
/// `event`, the comma when `comma`, the `_session` member, the closing brace and the newline,
/// in one reservation, as a record of the events stream.
#[inline]
pub fn enriched_event(
    out: &mut Out,
    event: &[u8],
    comma: bool,
    head: &MemberHead,
    id: u64,
    seq: u32,
    start_ts: i64,
) {
    let high = &mut out.high;
    let mut t = Tail::new(&mut out.buf, event.len() + 1 + SESSION_MEMBER_ROOM + 2);
    // SAFETY: `event`, a comma, the member and its slack, and `}\n` fit in the room reserved.
    unsafe {
        t.put_long(event);
        if comma {
            t.put(b",");
        }
        put_session_member(&mut t, head, high, id, seq, start_ts);
        t.put(b"}\n");
    }
    drop(t);
    out.end_record(Stream::Events);
}

/// # Safety
/// [`SESSION_MEMBER_ROOM`] fits in what `t` has left.
#[inline(always)]
unsafe fn put_session_member(
    t: &mut Tail<'_>,
    head: &MemberHead,
    high: &mut HighDigits,
    id: u64,
    seq: u32,
    start_ts: i64,
) {
    // SAFETY: the head's whole array, then after its kept part a u32 of 10 digits,
    // `,"start_ts":`, an i64 of a sign and 19 digits, `}` and the slack: all within
    // `SESSION_MEMBER_ROOM`, the caller's promise. The id lies inside the kept part.
    unsafe {
        const _: () = assert!(MEMBER_ID_AT + 18 <= MEMBER_HEAD_FIXED);
        // Most profile names leave the head within its first half: half the copy.
        if head.len <= MEMBER_HEAD_SHORT {
            let short: &[u8; MEMBER_HEAD_SHORT] = head.bytes.first_chunk().expect("in the array");
            t.put_patched(short, head.len, MEMBER_ID_AT, &id_text(id));
        } else {
            t.put_patched(&head.bytes, head.len, MEMBER_ID_AT, &id_text(id));
        }
        t.put_u32(seq);
        t.put(b",\"start_ts\":");
        t.put_i64_cached(start_ts, high);
        t.put(b"}");
    }
}

fn open(out: &mut Out, kind: &str, profile: &str, key: &[u8]) {
    let b = &mut out.buf;
    b.extend_from_slice(b"{\"kind\":\"");
    b.extend_from_slice(kind.as_bytes());
    b.extend_from_slice(b"\",\"profile\":\"");
    b.extend_from_slice(profile.as_bytes());
    b.extend_from_slice(b"\",\"key\":");
    write_json_string(key, b);
}

/// `,"<object>":{"<name>":<value>,...}` with the captured values read in order from `r`.
fn values_object(b: &mut Vec<u8>, object: &[u8], names: &[Box<[u8]>], r: &mut VarReader<'_>) {
    b.extend_from_slice(object);
    b.push(b'{');
    for (n, name) in names.iter().enumerate() {
        if n > 0 {
            b.push(b',');
        }
        b.extend_from_slice(name);
        let v = r.value();
        b.extend_from_slice(if v.is_empty() { b"null" } else { v });
    }
    b.push(b'}');
}

pub fn session_start(out: &mut Out, rule: &ProfileRule, key: &[u8], s: Summary, pay: &[u8]) {
    let text = &rule.text;
    let b = &mut out.buf;
    b.extend_from_slice(&text.start_open);
    write_json_string(key, b);
    b.extend_from_slice(member!("session_id"));
    write_id(b, s.id);
    times(b, s, None);
    let mut r = VarReader::new(payload::var_area(pay, key.len(), &rule.layout));
    r.skip(rule.state.len());
    values_object(b, member!("metadata"), &text.metadata, &mut r);
    b.push(b'}');
    out.finish(Stream::Markers);
}

pub fn session_end(
    out: &mut Out,
    rule: &ProfileRule,
    key: &[u8],
    s: Summary,
    reason: EndReason,
    pay: &[u8],
) {
    let text = &rule.text;
    let base = key.len();
    let l = &rule.layout;
    let b = &mut out.buf;
    b.extend_from_slice(&text.end_open);
    write_json_string(key, b);
    b.extend_from_slice(member!("session_id"));
    write_id(b, s.id);
    times(b, s, Some(reason));
    // Stored state first, metadata after; rendered metadata first, as the contract lists them.
    let mut state = VarReader::new(payload::var_area(pay, base, l));
    let mut metadata = state.clone();
    metadata.skip(rule.state.len());
    values_object(b, member!("metadata"), &text.metadata, &mut metadata);
    values_object(b, member!("state"), &text.state, &mut state);
    // Lists follow the metadata values.
    let mut r = metadata;
    b.extend_from_slice(member!("counters"));
    b.push(b'{');
    for (i, name) in text.counters.iter().enumerate() {
        if i > 0 {
            b.push(b',');
        }
        b.extend_from_slice(name);
        write_u64(b, u64::from(payload::counter(pay, base, l, i)));
    }
    b.push(b'}');
    b.extend_from_slice(member!("aggregates"));
    b.push(b'{');
    for (i, name) in text.aggregates.iter().enumerate() {
        if i > 0 {
            b.push(b',');
        }
        b.extend_from_slice(name);
        write_f64(b, payload::aggregate(pay, base, l, i));
    }
    b.push(b'}');
    b.extend_from_slice(member!("lists"));
    b.push(b'{');
    for (i, name) in text.lists.iter().enumerate() {
        if i > 0 {
            b.push(b',');
        }
        b.extend_from_slice(name);
        b.push(b'[');
        for j in 0..r.list_len() {
            if j > 0 {
                b.push(b',');
            }
            b.extend_from_slice(r.value());
        }
        b.push(b']');
    }
    b.extend_from_slice(b"}}");
    out.finish(Stream::Markers);
}

/// Room for `times`: the pieces' text, a sign and 20 digits per number, the longest reason,
/// and the slack of a number store.
const TIMES_BYTES_MAX: usize = 12 + 11 + 15 + 9 + 11 + 1 + 4 * 21 + REASON_BYTES_MAX + Tail::SLACK;
const REASON_BYTES_MAX: usize = 16;
const _: () = {
    let mut i = 0;
    while i < EndReason::COUNT {
        assert!(EndReason::ALL[i].label().len() <= REASON_BYTES_MAX);
        i += 1;
    }
};

/// `,"start_ts":<ms>` and, for an end, `,"last_ts":..,"duration_ms":..,"count":..,
/// "reason":".."`, the same in every marker: in one piece into reserved room, like the
/// `_session` member (these numbers are on every marker).
fn times(b: &mut Vec<u8>, s: Summary, end: Option<EndReason>) {
    let mut t = Tail::new(b, TIMES_BYTES_MAX);
    // SAFETY: the pieces, four numbers, the longest reason and the slack fit in
    // `TIMES_BYTES_MAX`, which counts each of them.
    unsafe {
        t.put(b",\"start_ts\":");
        t.put_i64(s.start_ts);
        if let Some(reason) = end {
            t.put(b",\"last_ts\":");
            t.put_i64(s.last_ts);
            t.put(b",\"duration_ms\":");
            t.put_i64(s.last_ts.wrapping_sub(s.start_ts));
            t.put(b",\"count\":");
            t.put_u32(s.count);
            t.put(b",\"reason\":\"");
            t.put_slice(reason.label().as_bytes());
            t.put(b"\"");
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn sub_open(
    out: &mut Out,
    kind: &str,
    rule: &ProfileRule,
    sub: &SubRule,
    parent_key: &[u8],
    sub_key: Option<&[u8]>,
    id: u64,
    parent_id: u64,
) {
    open(out, kind, &rule.name, parent_key);
    let b = &mut out.buf;
    b.extend_from_slice(member!("sub_session"));
    write_json_string(sub.name.as_bytes(), b);
    if let Some(k) = sub_key {
        b.extend_from_slice(member!("sub_key"));
        write_json_string(k, b);
    }
    b.extend_from_slice(member!("session_id"));
    write_id(b, id);
    b.extend_from_slice(member!("parent_session_id"));
    write_id(b, parent_id);
}

#[allow(clippy::too_many_arguments)]
pub fn sub_session_start(
    out: &mut Out,
    rule: &ProfileRule,
    sub: &SubRule,
    parent_key: &[u8],
    sub_key: Option<&[u8]>,
    s: Summary,
    parent_id: u64,
) {
    sub_open(
        out,
        "sub_session_start",
        rule,
        sub,
        parent_key,
        sub_key,
        s.id,
        parent_id,
    );
    times(&mut out.buf, s, None);
    out.buf.push(b'}');
    out.finish(Stream::Markers);
}

#[allow(clippy::too_many_arguments)]
pub fn sub_session_end(
    out: &mut Out,
    rule: &ProfileRule,
    sub: &SubRule,
    parent_key: &[u8],
    sub_key: Option<&[u8]>,
    s: Summary,
    parent_id: u64,
    reason: EndReason,
    pay: &[u8],
    base: usize,
) {
    sub_open(
        out,
        "sub_session_end",
        rule,
        sub,
        parent_key,
        sub_key,
        s.id,
        parent_id,
    );
    let b = &mut out.buf;
    times(b, s, Some(reason));
    b.extend_from_slice(member!("counters"));
    b.push(b'{');
    let layout = super::rules::layout_for(sub.counters.len(), 0, 0, 0);
    for (i, c) in sub.counters.iter().enumerate() {
        if i > 0 {
            b.push(b',');
        }
        write_json_string(c.name.as_bytes(), b);
        b.push(b':');
        write_u64(b, u64::from(payload::counter(pay, base, &layout, i)));
    }
    b.extend_from_slice(b"}}");
    out.finish(Stream::Markers);
}

pub fn session_merged(
    out: &mut Out,
    rule: &ProfileRule,
    key: &[u8],
    survivor: u64,
    absorbed: u64,
    ts: i64,
) {
    open(out, "session_merged", &rule.name, key);
    let b = &mut out.buf;
    b.extend_from_slice(member!("session_id"));
    write_id(b, survivor);
    b.extend_from_slice(member!("absorbed_session_id"));
    write_id(b, absorbed);
    b.extend_from_slice(member!("ts"));
    write_i64(b, ts);
    b.push(b'}');
    out.finish(Stream::Markers);
}

pub fn late_event(
    out: &mut Out,
    rule: &ProfileRule,
    key: &[u8],
    ts: i64,
    watermark: i64,
    event: &[u8],
) {
    open(out, "late_event", &rule.name, key);
    let b = &mut out.buf;
    b.extend_from_slice(member!("ts"));
    write_i64(b, ts);
    b.extend_from_slice(member!("watermark"));
    write_i64(b, watermark);
    b.extend_from_slice(member!("event"));
    b.extend_from_slice(event);
    b.push(b'}');
    out.finish(Stream::Late);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_member_renders_the_contract() {
        for (name, id, seq, start_ts) in [
            ("web", 0x0001_0400_0000_002a_u64, 1u32, 1_750_000_000_000i64),
            ("", 0, 0, 0),
            (
                "a profile name longer than sixteen",
                u64::MAX,
                u32::MAX,
                i64::MIN,
            ),
            ("checkout", 7, 123_456_789, -5),
            ("seven77", 1 << 42, 99_999_999, 99_999_999_999_999_999),
            // The longest head copied as its first half, and the shortest copied whole.
            ("ninechars", 3, 4, 5),
            ("ten_chars_", 3, 4, 5),
            (&"n".repeat(PROFILE_NAME_MAX), u64::MAX, u32::MAX, i64::MIN),
        ] {
            let mut buf = b"{\"a\":1,".to_vec();
            let head = MemberHead::new(name);
            assert_eq!(head.len <= MEMBER_HEAD_SHORT, name.len() <= 9, "{name}");
            let high = &mut HighDigits::default();
            session_member(&mut buf, &head, high, id, seq, start_ts);
            let want = format!(
                "{{\"a\":1,\"_session\":{{\"id\":\"{id:016x}\",\"profile\":\"{name}\",\"seq\":{seq},\"start_ts\":{start_ts}}}"
            );
            assert_eq!(String::from_utf8(buf).unwrap(), want);
        }
    }
}
