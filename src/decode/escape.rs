//! String escapes both ways: unescaping a body into caller-owned scratch (validating every
//! escape on the way), and escaping arbitrary bytes as a JSON string literal.
//!
//! Invariants: `unescape` accepts exactly RFC 8259 escapes, with `\u` surrogates only as a high
//! then low pair, and never writes more bytes than it reads, so scratch the size of the line
//! always suffices; `write_json_string` always emits a valid JSON string literal.

use super::DecodeError;

#[inline(always)]
fn hex4(body: &[u8], at: usize) -> Result<u32, DecodeError> {
    let digits = body.get(at..at + 4).ok_or(DecodeError::InvalidEscape)?;
    let mut v = 0u32;
    for &d in digits {
        let n = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            _ => return Err(DecodeError::InvalidEscape),
        };
        v = v << 4 | u32::from(n);
    }
    Ok(v)
}

/// Unescapes a string body (between the quotes, free of raw control bytes) into `out` and
/// returns the number of bytes written. Rejects unknown escapes, bad hex and lone surrogates.
pub(super) fn unescape(body: &[u8], out: &mut [u8]) -> Result<usize, DecodeError> {
    // Bodies are short (a page path, a campaign name): a byte loop costs about a third of the
    // instructions that `memchr` plus `copy_from_slice` per run of plain bytes did.
    let out = &mut out[..body.len()];
    let mut r = 0;
    let mut w = 0;
    while let Some(&c) = body.get(r) {
        r += 1;
        if c != b'\\' {
            out[w] = c;
            w += 1;
            continue;
        }
        let e = *body.get(r).ok_or(DecodeError::InvalidEscape)?;
        r += 1;
        let byte = match e {
            b'"' => b'"',
            b'\\' => b'\\',
            b'/' => b'/',
            b'b' => 0x08,
            b'f' => 0x0c,
            b'n' => b'\n',
            b'r' => b'\r',
            b't' => b'\t',
            b'u' => {
                let mut cp = hex4(body, r)?;
                r += 4;
                if (0xd800..0xdc00).contains(&cp) {
                    if body.get(r..r + 2) != Some(b"\\u") {
                        return Err(DecodeError::InvalidEscape);
                    }
                    let low = hex4(body, r + 2)?;
                    if !(0xdc00..0xe000).contains(&low) {
                        return Err(DecodeError::InvalidEscape);
                    }
                    r += 6;
                    cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
                } else if (0xdc00..0xe000).contains(&cp) {
                    return Err(DecodeError::InvalidEscape);
                }
                let ch = char::from_u32(cp).ok_or(DecodeError::InvalidEscape)?;
                w += ch.encode_utf8(&mut out[w..]).len();
                continue;
            }
            _ => return Err(DecodeError::InvalidEscape),
        };
        out[w] = byte;
        w += 1;
    }
    debug_assert!(w <= body.len());
    Ok(w)
}

/// Escape arbitrary bytes as a JSON string literal (with quotes) into `out`; invalid UTF-8
/// becomes U+FFFD. Used for dead-letter records and for keys in markers.
pub fn write_json_string(bytes: &[u8], out: &mut Vec<u8>) {
    // Keys and names are almost always printable ASCII: copied whole, without the per-char
    // walk (which was a tenth of a marker's cost when sessions are short).
    if is_plain_ascii(bytes) {
        out.reserve(bytes.len() + 2);
        out.push(b'"');
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    out.push(b'"');
    for chunk in bytes.utf8_chunks() {
        escape_str(chunk.valid().as_bytes(), out);
        if !chunk.invalid().is_empty() {
            out.extend_from_slice("\u{fffd}".as_bytes());
        }
    }
    out.push(b'"');
}

/// No byte needs an escape and all are ASCII (so the bytes are valid UTF-8 as they are). A
/// fold without early exit, so that it vectorizes.
#[inline]
fn is_plain_ascii(bytes: &[u8]) -> bool {
    !bytes.iter().fold(false, |bad, &c| {
        bad | !(0x20..0x80).contains(&c) | (c == b'"') | (c == b'\\')
    })
}

fn escape_str(s: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut start = 0;
    for (i, &c) in s.iter().enumerate() {
        let short: &[u8] = match c {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&s[start..i]);
        if short.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(c >> 4)]);
            out.push(HEX[usize::from(c & 0xf)]);
        } else {
            out.extend_from_slice(short);
        }
        start = i + 1;
    }
    out.extend_from_slice(&s[start..]);
}
