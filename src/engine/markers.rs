//! Rendering of session markers: the JSON contract of `session_start`, `session_end`,
//! `sub_session_start`, `sub_session_end`, `session_merged` and `late_event` records, and of the
//! `_session` member spliced into enriched events. Values captured from events are copied as the
//! JSON tokens they were, so nothing is re-escaped.

use super::out::{write_f64, write_i64, write_id, write_u64, Out, Tail};
use super::payload::{self, VarReader};
use super::rules::{ProfileRule, SubRule};
use super::EndReason;
use crate::config::Stream;
use crate::decode::write_json_string;

/// Hot fields of a session, copied out of its table head for rendering.
#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub id: u64,
    pub start_ts: i64,
    pub last_ts: i64,
    pub count: u32,
}

/// The longest `session_member` beyond the profile name's bytes (99 at most, and the slack of
/// its number stores).
pub const SESSION_MEMBER_BYTES_MAX: usize = 128;

/// `"_session":{"id":"<hex>","profile":"<name>","seq":<n>,"start_ts":<ms>}`, on every enriched
/// event: written in one piece into reserved room (see [`Tail`]).
#[inline]
pub fn session_member(buf: &mut Vec<u8>, profile: &str, id: u64, seq: u32, start_ts: i64) {
    const _: () =
        assert!(17 + 18 + 13 + 8 + 10 + 12 + 20 + 1 + Tail::SLACK <= SESSION_MEMBER_BYTES_MAX);
    let mut t = Tail::new(buf, SESSION_MEMBER_BYTES_MAX + profile.len());
    t.put(b"\"_session\":{\"id\":");
    t.put(&super::out::id_text(id));
    t.put(b",\"profile\":\"");
    t.put_slice(profile.as_bytes());
    t.put(b"\",\"seq\":");
    t.put_u64(u64::from(seq));
    t.put(b",\"start_ts\":");
    t.put_i64(start_ts);
    t.put(b"}");
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

fn field(b: &mut Vec<u8>, name: &str) {
    b.extend_from_slice(b",\"");
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(b"\":");
}

fn values_object(
    b: &mut Vec<u8>,
    name: &str,
    paths: impl Iterator<Item = (usize, usize)>,
    fields: &[String],
    r: &mut VarReader<'_>,
) {
    field(b, name);
    b.push(b'{');
    for (n, (_, field_id)) in paths.enumerate() {
        if n > 0 {
            b.push(b',');
        }
        write_json_string(fields[field_id].as_bytes(), b);
        b.push(b':');
        let v = r.value();
        b.extend_from_slice(if v.is_empty() { b"null" } else { v });
    }
    b.push(b'}');
}

pub fn session_start(
    out: &mut Out,
    rule: &ProfileRule,
    fields: &[String],
    key: &[u8],
    s: Summary,
    pay: &[u8],
) {
    open(out, "session_start", &rule.name, key);
    let b = &mut out.buf;
    field(b, "session_id");
    write_id(b, s.id);
    field(b, "start_ts");
    write_i64(b, s.start_ts);
    let mut r = VarReader::new(payload::var_area(pay, key.len(), &rule.layout));
    r.skip(rule.state.len());
    values_object(
        b,
        "metadata",
        rule.metadata.iter().map(|&f| f as usize).enumerate(),
        fields,
        &mut r,
    );
    b.push(b'}');
    out.finish(Stream::Markers);
}

pub fn session_end(
    out: &mut Out,
    rule: &ProfileRule,
    fields: &[String],
    key: &[u8],
    s: Summary,
    reason: EndReason,
    pay: &[u8],
) {
    open(out, "session_end", &rule.name, key);
    let base = key.len();
    let l = &rule.layout;
    let b = &mut out.buf;
    field(b, "session_id");
    write_id(b, s.id);
    common_end(b, s, reason);
    // Stored state first, metadata after; rendered metadata first, as the contract lists them.
    let mut state = VarReader::new(payload::var_area(pay, base, l));
    let mut metadata = state.clone();
    metadata.skip(rule.state.len());
    values_object(
        b,
        "metadata",
        rule.metadata.iter().map(|&f| f as usize).enumerate(),
        fields,
        &mut metadata,
    );
    values_object(
        b,
        "state",
        rule.state.iter().map(|&f| f as usize).enumerate(),
        fields,
        &mut state,
    );
    // Lists follow the metadata values.
    let mut r = metadata;
    field(b, "counters");
    b.push(b'{');
    for (i, c) in rule.counters.iter().enumerate() {
        if i > 0 {
            b.push(b',');
        }
        write_json_string(c.name.as_bytes(), b);
        b.push(b':');
        write_u64(b, u64::from(payload::counter(pay, base, l, i)));
    }
    b.push(b'}');
    field(b, "aggregates");
    b.push(b'{');
    for (i, a) in rule.aggregates.iter().enumerate() {
        if i > 0 {
            b.push(b',');
        }
        write_json_string(a.name.as_bytes(), b);
        b.push(b':');
        write_f64(b, payload::aggregate(pay, base, l, i));
    }
    b.push(b'}');
    field(b, "lists");
    b.push(b'{');
    for (i, list) in rule.lists.iter().enumerate() {
        if i > 0 {
            b.push(b',');
        }
        write_json_string(list.name.as_bytes(), b);
        b.extend_from_slice(b":[");
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

fn common_end(b: &mut Vec<u8>, s: Summary, reason: EndReason) {
    field(b, "start_ts");
    write_i64(b, s.start_ts);
    field(b, "last_ts");
    write_i64(b, s.last_ts);
    field(b, "duration_ms");
    write_i64(b, s.last_ts - s.start_ts);
    field(b, "count");
    write_u64(b, u64::from(s.count));
    field(b, "reason");
    b.push(b'"');
    b.extend_from_slice(reason.label().as_bytes());
    b.push(b'"');
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
    field(b, "sub_session");
    write_json_string(sub.name.as_bytes(), b);
    if let Some(k) = sub_key {
        field(b, "sub_key");
        write_json_string(k, b);
    }
    field(b, "session_id");
    write_id(b, id);
    field(b, "parent_session_id");
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
    field(&mut out.buf, "start_ts");
    write_i64(&mut out.buf, s.start_ts);
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
    common_end(b, s, reason);
    field(b, "counters");
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
    field(b, "session_id");
    write_id(b, survivor);
    field(b, "absorbed_session_id");
    write_id(b, absorbed);
    field(b, "ts");
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
    field(b, "ts");
    write_i64(b, ts);
    field(b, "watermark");
    write_i64(b, watermark);
    field(b, "event");
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
        ] {
            let mut buf = b"{\"a\":1,".to_vec();
            session_member(&mut buf, name, id, seq, start_ts);
            let want = format!(
                "{{\"a\":1,\"_session\":{{\"id\":\"{id:016x}\",\"profile\":\"{name}\",\"seq\":{seq},\"start_ts\":{start_ts}}}"
            );
            assert_eq!(String::from_utf8(buf).unwrap(), want);
        }
    }
}
