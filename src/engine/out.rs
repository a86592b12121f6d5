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
    /// For the `start_ts` of enriched events (see [`HighDigits`]).
    pub high: HighDigits,
    /// Whether the events stream (enriched and passed-through events) is written. The runtime
    /// turns it off when no output subscribes to that stream: a deployment that keeps only
    /// the markers then does not copy every event into a batch that no sink takes. The
    /// engine's work and its other records do not change.
    pub events: bool,
}

impl Out {
    pub fn with_capacity(bytes: usize, records: usize) -> Out {
        Out {
            buf: Vec::with_capacity(bytes),
            recs: Vec::with_capacity(records),
            high: HighDigits::default(),
            events: true,
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
        self.end_record(stream);
    }

    /// [`Out::finish`] for a record whose newline is written already.
    #[inline]
    pub fn end_record(&mut self, stream: Stream) {
        debug_assert_eq!(self.buf.last(), Some(&b'\n'));
        debug_assert!(self.buf.len() <= u32::MAX as usize);
        self.recs.push(Rec {
            stream,
            end: self.buf.len() as u32,
        });
    }

    /// An event no profile matched: passed through untouched on the events stream.
    pub fn passthrough(&mut self, raw: &[u8]) {
        if !self.events {
            return;
        }
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
    t[1..17].copy_from_slice(&hex16(id));
    t
}

/// The 16 lowercase hex digits of `v`, most significant first: each byte split into its two
/// nibbles in one vector, then mapped to digits or letters.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn hex16(v: u64) -> [u8; 16] {
    use core::arch::x86_64::*;
    // SAFETY: SSE2 is part of the x86_64 baseline; the result is 16 plain bytes.
    unsafe {
        // Byte k is the k-th most significant byte of `v`.
        let x = _mm_cvtsi64_si128(v.swap_bytes() as i64);
        let nibble = _mm_set1_epi8(0x0f);
        // A 16-bit shift moves the neighbour's low nibble into bits 4..8: masked off.
        let high = _mm_and_si128(_mm_srli_epi16::<4>(x), nibble);
        let low = _mm_and_si128(x, nibble);
        let d = _mm_unpacklo_epi8(high, low);
        let letters = _mm_and_si128(
            _mm_cmpgt_epi8(d, _mm_set1_epi8(9)),
            _mm_set1_epi8((b'a' - b'0' - 10) as i8),
        );
        let text = _mm_add_epi8(_mm_add_epi8(d, _mm_set1_epi8(b'0' as i8)), letters);
        std::mem::transmute::<__m128i, [u8; 16]>(text)
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn hex16(v: u64) -> [u8; 16] {
    let mut t = [0; 16];
    t[..8].copy_from_slice(&hex8((v >> 32) as u32));
    t[8..].copy_from_slice(&hex8(v as u32));
    t
}

/// The 8 lowercase hex digits of `v`, most significant first.
#[cfg(not(target_arch = "x86_64"))]
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

/// Appends into a `Vec`'s spare capacity through a raw cursor, for a record part of bounded
/// length written on every event (the `_session` member): one capacity reservation for the whole
/// part, no check per piece, and fixed-size stores instead of a `memcpy` call per piece.
///
/// The pieces are `unsafe`: their caller proves, usually with a `const` assertion over the
/// pieces' sizes, that everything written since [`Tail::new`] fits in the `bytes` it reserved.
/// A check per piece was a seventh of the `_session` member's instructions (callgrind).
pub struct Tail<'a> {
    buf: &'a mut Vec<u8>,
    /// `buf`'s allocation, taken once: `buf` is borrowed exclusively, so it cannot move, and
    /// a copy here lets the compiler keep it in a register (a byte store through a pointer may
    /// alias the `Vec` itself, which would make it reload the pointer after every piece).
    base: *mut u8,
    at: usize,
    end: usize,
}

impl<'a> Tail<'a> {
    /// Room for `bytes` more bytes; stores may reach up to [`Tail::SLACK`] bytes past what is
    /// kept, so `bytes` must count that slack once.
    #[inline]
    pub fn new(buf: &'a mut Vec<u8>, bytes: usize) -> Tail<'a> {
        buf.reserve(bytes);
        let at = buf.len();
        Tail {
            base: buf.as_mut_ptr(),
            buf,
            at,
            end: at + bytes,
        }
    }

    /// How far past the kept bytes a number store may write.
    pub const SLACK: usize = 8;

    /// A constant piece: the copy of a literal compiles to a few moves.
    ///
    /// # Safety
    /// `N` more bytes fit in what `new` reserved (see [`Tail`]).
    #[inline(always)]
    pub unsafe fn put<const N: usize>(&mut self, bytes: &[u8; N]) {
        debug_assert!(self.at + N <= self.end);
        // SAFETY: `at + N <= end <= capacity` (the caller's promise, the reservation in
        // `new`); the source is a separate array, not part of `buf`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(self.at), N) };
        self.at += N;
    }

    /// The first `keep` bytes of `bytes`, copied whole (a copy of a constant size is a few
    /// vector moves), with `patch` written over them at `patch_at`.
    ///
    /// # Safety
    /// `N` more bytes fit in what `new` reserved (see [`Tail`]); `patch_at + M <= keep <= N`.
    #[inline(always)]
    pub unsafe fn put_patched<const N: usize, const M: usize>(
        &mut self,
        bytes: &[u8; N],
        keep: usize,
        patch_at: usize,
        patch: &[u8; M],
    ) {
        debug_assert!(self.at + N <= self.end && patch_at + M <= keep && keep <= N);
        // SAFETY: `[at, at + N)` lies inside the capacity reserved in `new`, and the patch
        // inside that (the caller's promise); the sources are separate arrays.
        unsafe {
            let dst = self.base.add(self.at);
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, N);
            std::ptr::copy_nonoverlapping(patch.as_ptr(), dst.add(patch_at), M);
        }
        self.at += keep;
    }

    /// A short variable piece (an end reason's label) by overlapping word stores; longer ones
    /// by copy.
    ///
    /// # Safety
    /// `bytes.len()` more bytes fit in what `new` reserved (see [`Tail`]).
    #[inline(always)]
    pub unsafe fn put_slice(&mut self, bytes: &[u8]) {
        let n = bytes.len();
        debug_assert!(self.at + n <= self.end);
        // SAFETY: `[at, at + n)` lies inside the capacity reserved in `new` (the caller's
        // promise); `bytes` cannot alias the spare capacity of `buf`.
        unsafe { super::payload::copy_short_to(self.base.add(self.at), bytes) };
        self.at += n;
    }

    /// A piece of any length (an event's bytes), by one copy.
    ///
    /// # Safety
    /// `bytes.len()` more bytes fit in what `new` reserved (see [`Tail`]).
    #[inline(always)]
    pub unsafe fn put_long(&mut self, bytes: &[u8]) {
        debug_assert!(self.at + bytes.len() <= self.end);
        // SAFETY: as `put_slice`.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(self.at), bytes.len())
        };
        self.at += bytes.len();
    }

    /// A u64 in decimal. Below 10^16 (every epoch-millisecond time, every sequence) as two
    /// eight-digit words; above, through `itoa`.
    ///
    /// # Safety
    /// 20 bytes (the longest u64), or the number's digits and [`Tail::SLACK`], fit in what `new`
    /// reserved (see [`Tail`]).
    #[inline(always)]
    pub unsafe fn put_u64(&mut self, v: u64) {
        // SAFETY: the caller's promise.
        unsafe { self.put_u64_high(v, digits8_trimmed) }
    }

    /// A u32 in decimal; below 10^4 (the sequence number of nearly every event) in one
    /// four-digit word.
    ///
    /// # Safety
    /// As [`Tail::put_u64`].
    #[inline(always)]
    pub unsafe fn put_u32(&mut self, v: u32) {
        if v >= 10_000 {
            // SAFETY: the caller's promise.
            unsafe { self.put_u64(u64::from(v)) };
            return;
        }
        let (word, len) = digits4_trimmed(v);
        debug_assert!(self.at + 4 <= self.end);
        // SAFETY: the store lies in `[at, at + 4)`, within the 20 bytes the caller promised.
        unsafe {
            self.base
                .add(self.at)
                .cast::<u32>()
                .write_unaligned(word.to_le())
        };
        self.at += len;
    }

    /// `put_u64`, with `high(hi)` giving the trimmed digits of `hi = v / 10^8` when it is not 0.
    ///
    /// # Safety
    /// As [`Tail::put_u64`].
    #[inline(always)]
    unsafe fn put_u64_high(&mut self, v: u64, high: impl FnOnce(u32) -> (u64, usize)) {
        const E8: u64 = 100_000_000;
        if v >= E8 * E8 {
            std::hint::cold_path();
            let mut b = itoa::Buffer::new();
            // SAFETY: at most 20 digits, within the caller's promise.
            unsafe { self.put_slice(b.format(v).as_bytes()) };
            return;
        }
        debug_assert!(self.at + 16 <= self.end);
        let (hi, lo) = ((v / E8) as u32, (v % E8) as u32);
        // SAFETY: both stores lie in `[at, at + 16)`: at most 16 digits, or fewer and the
        // slack, inside the reserved capacity by the caller's promise.
        unsafe {
            let dst = self.base.add(self.at);
            if hi == 0 {
                let (word, len) = digits8_trimmed(lo);
                dst.cast::<u64>().write_unaligned(word.to_le());
                self.at += len;
            } else {
                let (word, len) = high(hi);
                dst.cast::<u64>().write_unaligned(word.to_le());
                dst.add(len)
                    .cast::<u64>()
                    .write_unaligned(digits8(lo).to_le());
                self.at += len + 8;
            }
        }
    }

    /// # Safety
    /// As [`Tail::put_u64`], and one byte more for a sign.
    #[inline(always)]
    pub unsafe fn put_i64(&mut self, v: i64) {
        // SAFETY: the caller's promise.
        unsafe { self.put_i64_high(v, digits8_trimmed) }
    }

    /// [`Tail::put_i64`] with the digits of the high eight-digit half taken from `high`.
    ///
    /// # Safety
    /// As [`Tail::put_i64`].
    #[inline(always)]
    pub unsafe fn put_i64_cached(&mut self, v: i64, high: &mut HighDigits) {
        // SAFETY: the caller's promise.
        unsafe { self.put_i64_high(v, |hi| high.of(hi)) }
    }

    /// # Safety
    /// As [`Tail::put_i64`].
    #[inline(always)]
    unsafe fn put_i64_high(&mut self, v: i64, high: impl FnOnce(u32) -> (u64, usize)) {
        // SAFETY: the sign and the digits are within the caller's promise.
        unsafe {
            if v < 0 {
                self.put(b"-");
            }
            self.put_u64_high(v.unsigned_abs(), high);
        }
    }
}

/// The trimmed digits of the last high half (`v / 10^8`) written through
/// [`Tail::put_i64_cached`]. Epoch-millisecond times keep theirs for 27 hours, so the
/// `start_ts` of nearly every enriched event needs only its low eight digits made.
#[derive(Clone, Copy, Debug)]
pub struct HighDigits {
    hi: u32,
    word: u64,
    len: usize,
}

impl Default for HighDigits {
    fn default() -> Self {
        let (word, len) = digits8_trimmed(0);
        HighDigits { hi: 0, word, len }
    }
}

impl HighDigits {
    /// `digits8_trimmed(hi)`, made only when `hi` differs from the last one.
    #[inline(always)]
    fn of(&mut self, hi: u32) -> (u64, usize) {
        if hi != self.hi {
            std::hint::cold_path();
            let (word, len) = digits8_trimmed(hi);
            *self = HighDigits { hi, word, len };
        }
        (self.word, self.len)
    }
}

impl Drop for Tail<'_> {
    fn drop(&mut self) {
        debug_assert!(self.at <= self.end);
        // SAFETY: every byte below `at` was written by a `put*` (they advance `at` only over
        // the bytes they stored), and `at <= end <= capacity`.
        unsafe { self.buf.set_len(self.at) };
    }
}

/// The eight decimal digits of `v < 10^8`, leading zeros included, as ASCII bytes in a
/// little-endian word (the first digit in the lowest byte). Each step splits every lane in two
/// by a multiply-shift that is exact in the lane's range: 4+4 digits, then 2+2, then 1+1.
#[inline(always)]
fn digits8(v: u32) -> u64 {
    debug_assert!(v < 100_000_000);
    let v = u64::from(v);
    let x = (v / 10_000) | ((v % 10_000) << 32);
    // x / 100 per 32-bit lane: (x * 5243) >> 19 is exact below 43_699.
    let q = ((x * 5243) >> 19) & 0x0000_007f_0000_007f;
    let x = q | ((x - q * 100) << 16);
    // x / 10 per 16-bit lane: (x * 103) >> 10 is exact below 179.
    let q = ((x * 103) >> 10) & 0x000f_000f_000f_000f;
    let x = q | ((x - q * 10) << 8);
    x + 0x3030_3030_3030_3030
}

/// The four decimal digits of `v < 10^4` without their leading zeros (at least one digit), as
/// ASCII bytes in the low bytes of a little-endian word, and their number: `digits8`'s last two
/// steps on the 2+2 split.
#[inline(always)]
fn digits4_trimmed(v: u32) -> (u32, usize) {
    debug_assert!(v < 10_000);
    let x = (v / 100) | ((v % 100) << 16);
    // x / 10 per 16-bit lane: (x * 103) >> 10 is exact below 179.
    let q = ((x * 103) >> 10) & 0x000f_000f;
    let word = (q | ((x - q * 10) << 8)) + 0x3030_3030;
    let zeros = ((word ^ 0x3030_3030) | (u32::from(v == 0) << 24)).trailing_zeros() / 8;
    (word >> (8 * zeros), 4 - zeros as usize)
}

/// `digits8(v)` without its leading zeros (at least one digit), moved to the lowest bytes, and
/// the number of digits.
#[inline(always)]
fn digits8_trimmed(v: u32) -> (u64, usize) {
    let word = digits8(v);
    // A leading zero is a low byte equal to '0'; for zero, a bit in the top byte keeps one.
    let zeros = ((word ^ 0x3030_3030_3030_3030) | (u64::from(v == 0) << 56)).trailing_zeros() / 8;
    (word >> (8 * zeros), 8 - zeros as usize)
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

    #[test]
    fn tail_numbers_match_itoa() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut values: Vec<i64> = vec![0, 1, 9, 10, 99, 100, -1, i64::MIN, i64::MAX];
        for k in 0..19 {
            let p = 10i64.pow(k);
            values.extend([p - 1, p, p + 1, -p, 1_750_000_000_000 + p]);
        }
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            values.push(x as i64);
            values.push((x % 100_000_000_000_000_000) as i64);
            values.push((x % 1_000_000_000) as i64);
        }
        values.extend(0..100_000);
        // Runs of one high half, as epoch times come, and changes of it every value.
        values.extend((0..1000).map(|k| 1_750_000_000_000 + k * 99_991));
        let mut buf = b"x".to_vec();
        let mut high = HighDigits::default();
        for v in values {
            for cached in [false, true] {
                buf.truncate(1);
                let mut t = Tail::new(&mut buf, 48);
                // SAFETY: a sign, 20 digits and a comma (or 17 and the slack) fit in 48 bytes.
                unsafe {
                    if cached {
                        t.put_i64_cached(v, &mut high);
                    } else {
                        t.put_i64(v);
                    }
                    t.put(b",");
                }
                drop(t);
                assert_eq!(&buf[1..], format!("{v},").as_bytes(), "{v} cached {cached}");
            }
        }
    }

    #[test]
    fn tail_u32_matches_itoa() {
        let mut values: Vec<u32> = (0..100_000).collect();
        values.extend([
            u32::MAX,
            u32::MAX - 1,
            99_999_999,
            100_000_000,
            4_000_000_000,
        ]);
        let mut buf = b"x".to_vec();
        for v in values {
            buf.truncate(1);
            let mut t = Tail::new(&mut buf, 32);
            // SAFETY: 10 digits and a comma (or 16 and the slack) fit in 32 bytes.
            unsafe {
                t.put_u32(v);
                t.put(b",");
            }
            drop(t);
            assert_eq!(&buf[1..], format!("{v},").as_bytes(), "{v}");
        }
    }

    #[test]
    fn tail_short_slices_are_copied_whole() {
        let text: Vec<u8> = (b'a'..=b'z').collect();
        for n in 0..=text.len() {
            let mut buf = Vec::new();
            let mut t = Tail::new(&mut buf, n + 1);
            // SAFETY: `n` bytes and one more, as reserved.
            unsafe {
                t.put_slice(&text[..n]);
                t.put(b"!");
            }
            drop(t);
            assert_eq!(&buf[..n], &text[..n]);
            assert_eq!(buf[n..], *b"!");
        }
    }
}
