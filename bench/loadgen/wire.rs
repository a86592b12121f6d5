//! The appliance's wire protocol as the harness speaks it, and the byte-level helpers the send
//! loop uses without allocating.
//!
//! - UDP: one datagram carries one or more JSON events separated by `\n`. With steering, the
//!   datagram starts with [`STEER_MAGIC`] and the big-endian FNV-1a 32-bit hash of the session
//!   key's unescaped UTF-8 bytes; every event of such a datagram has that one key.
//! - TCP ingest and the TCP output: newline-delimited JSON.
//!
//! Invariants: [`write_u64`] writes exactly the decimal digits (no sign, no padding);
//! [`fnv1a32`] is the reference FNV-1a 32 (offset basis 0x811c9dc5, prime 0x01000193), kept here
//! on purpose rather than imported from the library crate so the harness checks the appliance
//! against an independent implementation.

/// The four magic bytes that open a steered UDP datagram.
pub const STEER_MAGIC: [u8; 4] = *b"SZH1";
/// Magic plus the big-endian u32 key hash.
pub const STEER_HEADER_BYTES: usize = 8;

const FNV_OFFSET_BASIS: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

/// FNV-1a 32-bit hash of `bytes`.
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    fnv1a32_continue(FNV_OFFSET_BASIS, bytes)
}

/// Continues an FNV-1a 32 hash over more bytes; `fnv1a32_continue(fnv1a32(a), b)` equals the
/// hash of `a` followed by `b`, so a key built from a prefix and digits needs no buffer.
pub fn fnv1a32_continue(mut hash: u32, bytes: &[u8]) -> u32 {
    for &byte in bytes {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// Writes the steering header for `key_hash` into the first [`STEER_HEADER_BYTES`] of `out`.
pub fn write_steer_header(out: &mut [u8], key_hash: u32) {
    assert!(out.len() >= STEER_HEADER_BYTES);
    out[..4].copy_from_slice(&STEER_MAGIC);
    out[4..8].copy_from_slice(&key_hash.to_be_bytes());
}

/// Longest decimal u64 (18446744073709551615).
pub const U64_DIGITS_MAX: usize = 20;

/// "00" to "99", two digits per division in [`format_u64`].
const DIGIT_PAIRS: [u8; 200] = {
    let mut pairs = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        pairs[2 * i] = b'0' + (i / 10) as u8;
        pairs[2 * i + 1] = b'0' + (i % 10) as u8;
        i += 1;
    }
    pairs
};

/// Formats `value` in decimal into `digits` and returns the used tail of it.
pub fn format_u64(value: u64, digits: &mut [u8; U64_DIGITS_MAX]) -> &[u8] {
    let mut at = U64_DIGITS_MAX;
    let mut rest = value;
    while rest >= 100 {
        let pair = (rest % 100) as usize * 2;
        rest /= 100;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    }
    if rest >= 10 {
        let pair = rest as usize * 2;
        at -= 2;
        digits[at..at + 2].copy_from_slice(&DIGIT_PAIRS[pair..pair + 2]);
    } else {
        at -= 1;
        digits[at] = b'0' + rest as u8;
    }
    &digits[at..]
}

/// Appends `value` in decimal to `out` (no allocation once `out` has capacity).
pub fn write_u64(out: &mut Vec<u8>, value: u64) {
    let mut digits = [0u8; U64_DIGITS_MAX];
    out.extend_from_slice(format_u64(value, &mut digits));
}

/// Parses a run of ASCII digits at the start of `bytes` (after optional spaces); `None` when
/// there is no digit or the value overflows u64.
pub fn parse_u64_prefix(bytes: &[u8]) -> Option<u64> {
    let start = bytes.iter().position(|&b| b != b' ')?;
    let mut value: u64 = 0;
    let mut seen = false;
    for &byte in &bytes[start..] {
        if !byte.is_ascii_digit() {
            break;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(byte - b'0'))?;
        seen = true;
    }
    seen.then_some(value)
}

/// Finds a member `"name"` in a JSON line and returns its raw value token: the contents of a
/// string (without quotes, escapes left as they are) or the literal of a number, `true`, `false`
/// or `null`. It is a scan, not a parser: a `"name"` inside another string can match, which the
/// harness accepts for its own well-formed traffic and documents for replay files.
pub fn member_value<'a>(line: &'a [u8], quoted_name: &memchr::memmem::Finder) -> Option<&'a [u8]> {
    let mut from = 0;
    while let Some(found) = quoted_name.find(&line[from..]) {
        let mut at = from + found + quoted_name.needle().len();
        from = at;
        while at < line.len() && line[at].is_ascii_whitespace() {
            at += 1;
        }
        if at >= line.len() || line[at] != b':' {
            continue; // The name was a value, not a member name.
        }
        at += 1;
        while at < line.len() && line[at].is_ascii_whitespace() {
            at += 1;
        }
        if at >= line.len() {
            return None;
        }
        if line[at] == b'"' {
            let body = at + 1;
            let mut end = body;
            while end < line.len() {
                match line[end] {
                    b'\\' => end += 2,
                    b'"' => return Some(&line[body..end]),
                    _ => end += 1,
                }
            }
            return None;
        }
        let end = line[at..]
            .iter()
            .position(|&b| b == b',' || b == b'}' || b == b']' || b.is_ascii_whitespace())
            .map_or(line.len(), |n| at + n);
        return Some(&line[at..end]);
    }
    None
}

/// Steering hash of a member value as [`member_value`] returns it: the FNV-1a of its unescaped
/// bytes. Values with escapes are rare in practice; they take a slow path through serde_json.
pub fn key_hash_of_raw(raw: &[u8]) -> u32 {
    if !raw.contains(&b'\\') {
        return fnv1a32(raw);
    }
    let mut quoted = Vec::with_capacity(raw.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(raw);
    quoted.push(b'"');
    match serde_json::from_slice::<String>(&quoted) {
        Ok(unescaped) => fnv1a32(unescaped.as_bytes()),
        Err(_) => fnv1a32(raw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a32_reference_vectors() {
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn fnv1a32_continue_equals_concatenation() {
        assert_eq!(fnv1a32_continue(fnv1a32(b"u"), b"123"), fnv1a32(b"u123"));
        assert_eq!(fnv1a32_continue(fnv1a32(b"foo"), b"bar"), 0xbf9c_f968);
    }

    #[test]
    fn steer_header_layout() {
        let mut out = [0u8; 8];
        write_steer_header(&mut out, 0x0102_0304);
        assert_eq!(&out, b"SZH1\x01\x02\x03\x04");
    }

    #[test]
    fn u64_formatting() {
        for value in [
            0,
            7,
            10,
            99,
            100,
            101,
            999,
            1000,
            1_732_500_000_123,
            u64::MAX - 1,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            write_u64(&mut out, value);
            assert_eq!(out, value.to_string().as_bytes());
            assert_eq!(parse_u64_prefix(&out), Some(value));
        }
        assert_eq!(parse_u64_prefix(b"18446744073709551616"), None);
        assert_eq!(parse_u64_prefix(b"x1"), None);
        assert_eq!(parse_u64_prefix(b" 12,"), Some(12));
    }

    #[test]
    fn member_values() {
        let user = memchr::memmem::Finder::new(b"\"user\"");
        let bidder = memchr::memmem::Finder::new(b"\"bidder\"");
        let line = br#"{"type":"user","user" : "u\"1","bidder":42}"#;
        assert_eq!(member_value(line, &user), Some(&br#"u\"1"#[..]));
        assert_eq!(member_value(line, &bidder), Some(&b"42"[..]));
        assert_eq!(key_hash_of_raw(br#"u\"1"#), fnv1a32(b"u\"1"));
        assert_eq!(member_value(br#"{"a":1}"#, &user), None);
    }
}
