//! The byte layout of a session's payload and the operations on it. A payload is loaded from the
//! arena into a reusable buffer, changed there, and stored back, so every rule works on one
//! contiguous slice whatever the block size.
//!
//! ```text
//! [key bytes][counters u32 LE x C][aggregates f64 LE x A][split hashes u64 LE x S]
//! [sub-session slots u32 LE x N][var_len u16 LE][var area]
//! var area = values x (state + metadata), each [len u16][JSON bytes] (len 0 = not seen yet),
//!            then lists, each [count u8] + count x [len u16][JSON bytes]
//! ```
//! A sub-session's key is its parent's id (8 bytes) followed by its own key value; it has only
//! counters. State values come first because they change on most events: the engine reads the
//! var area only as far as it needs, and a state value of the same length is rewritten in
//! place near the start of the payload, while metadata, once captured, is never read again. Aggregates start as NaN (sum) / +inf (min) / -inf (max), which render as `null`.

use super::rules::{Layout, ListRule};
use crate::config::AggregateOp;

/// Captured values (metadata and state) per profile: the size of [`VarEdits::values`].
/// `Config` validation holds profiles to this and the next two.
pub const VALUES_MAX: usize = 64;
/// Lists per profile: the size of [`VarEdits::appends`].
pub const LISTS_MAX: usize = 16;
/// Aggregates per profile: the size of the array their operations are gathered in when a
/// session is created.
pub const AGGREGATES_MAX: usize = 32;
const NIL: u32 = u32::MAX;

/// Shape of a record kind: enough to initialise and walk its payload.
#[derive(Clone, Copy)]
pub struct Shape<'a> {
    pub layout: &'a Layout,
    pub aggregates: &'a [AggregateOp],
    pub values: usize,
    pub lists: &'a [ListRule],
}

pub fn init(buf: &mut Vec<u8>, key: &[u8], shape: Shape<'_>) {
    let l = shape.layout;
    buf.clear();
    buf.extend_from_slice(key);
    buf.resize(key.len() + l.fixed_bytes, 0);
    let base = key.len();
    for (i, op) in shape.aggregates.iter().enumerate() {
        let init = match op {
            AggregateOp::Sum => f64::NAN,
            AggregateOp::Min => f64::INFINITY,
            AggregateOp::Max => f64::NEG_INFINITY,
        };
        put_f64(buf, base + l.aggregates_off + 8 * i, init);
    }
    for off in (base + l.subs_off..base + l.var_len_off).step_by(4) {
        put_u32(buf, off, NIL);
    }
    let var_start = buf.len();
    buf.resize(var_start + 2 * shape.values + shape.lists.len(), 0);
    let var_len = buf.len() - var_start;
    put_u16(buf, base + l.var_len_off, var_len as u16);
}

/// Total payload length implied by the header bytes (`head` must hold at least the fixed part).
pub fn total_len(head: &[u8], key_len: usize, layout: &Layout) -> usize {
    key_len + layout.fixed_bytes + get_u16(head, key_len + layout.var_len_off) as usize
}

pub fn counter_add(buf: &mut [u8], base: usize, layout: &Layout, i: usize, n: u32) {
    let off = base + layout.counters_off + 4 * i;
    put_u32(buf, off, get_u32(buf, off).saturating_add(n));
}

pub fn counter(buf: &[u8], base: usize, layout: &Layout, i: usize) -> u32 {
    get_u32(buf, base + layout.counters_off + 4 * i)
}

pub fn aggregate_apply(
    buf: &mut [u8],
    base: usize,
    layout: &Layout,
    i: usize,
    op: AggregateOp,
    v: f64,
) {
    let off = base + layout.aggregates_off + 8 * i;
    put_f64(buf, off, combine(op, get_f64(buf, off), v));
}

pub fn aggregate(buf: &[u8], base: usize, layout: &Layout, i: usize) -> f64 {
    get_f64(buf, base + layout.aggregates_off + 8 * i)
}

fn combine(op: AggregateOp, acc: f64, v: f64) -> f64 {
    match op {
        AggregateOp::Sum if acc.is_nan() => v,
        AggregateOp::Sum if v.is_nan() => acc,
        AggregateOp::Sum => acc + v,
        AggregateOp::Min => acc.min(v),
        AggregateOp::Max => acc.max(v),
    }
}

pub fn split_hash(buf: &[u8], base: usize, layout: &Layout, i: usize) -> u64 {
    get_u64(buf, base + layout.split_off + 8 * i)
}

pub fn set_split_hash(buf: &mut [u8], base: usize, layout: &Layout, i: usize, h: u64) {
    put_u64(buf, base + layout.split_off + 8 * i, h);
}

pub fn sub_slot(buf: &[u8], base: usize, layout: &Layout, i: usize) -> u32 {
    get_u32(buf, base + layout.subs_off + 4 * i)
}

pub fn set_sub_slot(buf: &mut [u8], base: usize, layout: &Layout, i: usize, slot: u32) {
    put_u32(buf, base + layout.subs_off + 4 * i, slot);
}

pub fn sub_slots(layout: &Layout) -> usize {
    (layout.var_len_off - layout.subs_off) / 4
}

pub fn var_area<'a>(buf: &'a [u8], base: usize, layout: &Layout) -> &'a [u8] {
    let start = base + layout.fixed_bytes;
    let len = get_u16(buf, base + layout.var_len_off) as usize;
    &buf[start..start + len]
}

/// Walks a var area: `values` captured values, then the lists.
#[derive(Clone)]
pub struct VarReader<'a> {
    area: &'a [u8],
    pos: usize,
}

impl<'a> VarReader<'a> {
    pub fn new(area: &'a [u8]) -> Self {
        VarReader { area, pos: 0 }
    }

    /// Next captured value; an empty slice means "not seen".
    pub fn value(&mut self) -> &'a [u8] {
        let len = get_u16(self.area, self.pos) as usize;
        let v = &self.area[self.pos + 2..self.pos + 2 + len];
        self.pos += 2 + len;
        v
    }

    /// Step over `n` captured values.
    pub fn skip(&mut self, n: usize) {
        for _ in 0..n {
            self.value();
        }
    }

    pub fn list_len(&mut self) -> usize {
        let n = self.area[self.pos] as usize;
        self.pos += 1;
        n
    }
}

/// Whether the first `n` captured values lie wholly within `front`, a prefix of a var area.
pub fn values_within(front: &[u8], n: usize) -> bool {
    let mut at = 0;
    for _ in 0..n {
        if at + 2 > front.len() {
            return false;
        }
        at += 2 + get_u16(front, at) as usize;
    }
    at <= front.len()
}

/// Changes to apply to a var area in one rebuild. Indexes follow the stored order (state,
/// then metadata; lists by position).
pub struct VarEdits<'a> {
    /// For each value: the new JSON bytes, and whether to set it only if not yet seen.
    pub values: [Option<(&'a [u8], bool)>; VALUES_MAX],
    pub appends: [Option<&'a [u8]>; LISTS_MAX],
    pub any: bool,
}

impl Default for VarEdits<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'a> VarEdits<'a> {
    pub fn new() -> Self {
        VarEdits {
            values: [None; VALUES_MAX],
            appends: [None; LISTS_MAX],
            any: false,
        }
    }
}

/// Build the edited var area of `src` (values, lists) into `dst`, appending. Returns false when
/// nothing changed (dst is then left as it was) so the caller can skip the store.
pub fn rebuild_var(
    src: &[u8],
    values: usize,
    lists: &[ListRule],
    edits: &VarEdits<'_>,
    dst: &mut Vec<u8>,
) -> bool {
    let mark = dst.len();
    let mut changed = false;
    let mut r = VarReader::new(src);
    for i in 0..values {
        let old = r.value();
        let new = match edits.values[i] {
            Some((v, only_if_unset)) if (!only_if_unset || old.is_empty()) && v != old => {
                changed = true;
                v
            }
            _ => old,
        };
        push_value(dst, new);
    }
    for (i, rule) in lists.iter().enumerate() {
        let n = r.list_len();
        let count_at = dst.len();
        dst.push(n as u8);
        let mut dup = false;
        for _ in 0..n {
            let item = r.value();
            dup |= edits.appends[i].is_some_and(|a| rule.unique && a == item);
            push_value(dst, item);
        }
        if let Some(a) = edits.appends[i] {
            if !dup && n < rule.max_len as usize {
                push_value(dst, a);
                dst[count_at] += 1;
                changed = true;
            }
        }
    }
    if !changed {
        dst.truncate(mark);
    }
    changed
}

/// Var area of a merge: state from `late` (falling back to `early`), metadata from `early`
/// (falling back to `late`), lists `early` then `late` within their limits.
pub fn merge_var(
    early: &[u8],
    late: &[u8],
    state: usize,
    metadata: usize,
    lists: &[ListRule],
    dst: &mut Vec<u8>,
) {
    let (mut e, mut l) = (VarReader::new(early), VarReader::new(late));
    for i in 0..state + metadata {
        let (a, b) = (e.value(), l.value());
        let pick = match (i >= state, a.is_empty(), b.is_empty()) {
            (true, false, _) | (false, false, true) => a,
            _ => b,
        };
        push_value(dst, pick);
    }
    for rule in lists {
        let count_at = dst.len();
        dst.push(0);
        let items_start = dst.len();
        for reader in [&mut e, &mut l] {
            let n = reader.list_len();
            for _ in 0..n {
                let item = reader.value();
                let full = dst[count_at] as usize >= rule.max_len as usize;
                if full || (rule.unique && contains_item(&dst[items_start..], item)) {
                    continue;
                }
                push_value(dst, item);
                dst[count_at] += 1;
            }
        }
    }
}

fn contains_item(mut items: &[u8], item: &[u8]) -> bool {
    while items.len() >= 2 {
        let len = get_u16(items, 0) as usize;
        if &items[2..2 + len] == item {
            return true;
        }
        items = &items[2 + len..];
    }
    false
}

fn push_value(dst: &mut Vec<u8>, v: &[u8]) {
    dst.extend_from_slice(&(v.len() as u16).to_le_bytes());
    dst.extend_from_slice(v);
}

/// `dst.copy_from_slice(src)` for the short values of the event path (state values, keys).
#[inline(always)]
pub fn copy_short(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len());
    // SAFETY: `dst` is `src.len()` writable bytes and, borrowed mutably, cannot alias `src`.
    unsafe { copy_short_to(dst.as_mut_ptr(), src) }
}

/// Copies `src` to `dst`: up to 16 bytes by overlapping word (or byte) stores instead of a
/// `memcpy` call, longer ones by `memcpy`.
///
/// # Safety
/// `dst` must be valid for `src.len()` byte writes and must not overlap `src`.
#[inline(always)]
pub unsafe fn copy_short_to(dst: *mut u8, src: &[u8]) {
    let n = src.len();
    let s = src.as_ptr();
    // SAFETY (every arm): each load lies inside `src` and each store inside
    // `[dst, dst + n)`, by the arm's range of `n`; the caller guarantees the rest.
    unsafe {
        match n {
            8..=16 => {
                dst.cast::<u64>()
                    .write_unaligned(s.cast::<u64>().read_unaligned());
                dst.add(n - 8)
                    .cast::<u64>()
                    .write_unaligned(s.add(n - 8).cast::<u64>().read_unaligned());
            }
            4..=7 => {
                dst.cast::<u32>()
                    .write_unaligned(s.cast::<u32>().read_unaligned());
                dst.add(n - 4)
                    .cast::<u32>()
                    .write_unaligned(s.add(n - 4).cast::<u32>().read_unaligned());
            }
            1..=3 => {
                *dst = *s;
                *dst.add(n / 2) = *s.add(n / 2);
                *dst.add(n - 1) = *s.add(n - 1);
            }
            _ => std::ptr::copy_nonoverlapping(s, dst, n),
        }
    }
}

pub fn get_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
pub fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn get_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
pub fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub fn get_u64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}
pub fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
pub fn get_f64(b: &[u8], off: usize) -> f64 {
    f64::from_bits(get_u64(b, off))
}
pub fn put_f64(b: &mut [u8], off: usize, v: f64) {
    put_u64(b, off, v.to_bits());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::rules::layout_for;

    #[test]
    fn copy_short_copies_every_length_and_nothing_else() {
        let src: Vec<u8> = (1..=40u8).collect();
        for n in 0..=40 {
            let mut dst = [0u8; 48];
            copy_short(&mut dst[3..3 + n], &src[..n]);
            assert_eq!(&dst[3..3 + n], &src[..n], "len {n}");
            assert!(
                dst[..3].iter().chain(&dst[3 + n..]).all(|&b| b == 0),
                "len {n}"
            );
        }
    }

    fn list(max_len: u8, unique: bool) -> ListRule {
        ListRule {
            name: "l".into(),
            field: 0,
            max_len,
            unique,
            when: None,
        }
    }

    #[test]
    fn init_edit_and_merge_round_trip() {
        let layout = layout_for(2, 1, 1, 2);
        let lists = [list(3, true)];
        let shape = Shape {
            layout: &layout,
            aggregates: &[AggregateOp::Min],
            values: 2,
            lists: &lists,
        };
        let mut buf = Vec::new();
        init(&mut buf, b"alice", shape);
        assert_eq!(total_len(&buf, 5, &layout), buf.len());
        assert_eq!(sub_slot(&buf, 5, &layout, 1), NIL);
        counter_add(&mut buf, 5, &layout, 1, 2);
        aggregate_apply(&mut buf, 5, &layout, 0, AggregateOp::Min, 4.0);
        aggregate_apply(&mut buf, 5, &layout, 0, AggregateOp::Min, 7.0);
        assert_eq!(counter(&buf, 5, &layout, 1), 2);
        assert_eq!(aggregate(&buf, 5, &layout, 0), 4.0);

        let mut edits = VarEdits::new();
        edits.values[0] = Some((b"\"ip\"", true));
        edits.values[1] = Some((b"\"/a\"", false));
        edits.appends[0] = Some(b"1");
        let mut dst = Vec::new();
        assert!(rebuild_var(
            var_area(&buf, 5, &layout),
            2,
            &lists,
            &edits,
            &mut dst
        ));
        let mut again = Vec::new();
        assert!(
            !rebuild_var(&dst, 2, &lists, &edits, &mut again),
            "same values, unique list: nothing changes"
        );
        let again = dst.clone();
        let mut r = VarReader::new(&again);
        assert_eq!(r.value(), b"\"ip\"");
        assert_eq!(r.value(), b"\"/a\"");
        assert_eq!(r.list_len(), 1, "unique list keeps one copy");

        let mut merged = Vec::new();
        merge_var(&again, &dst, 1, 1, &lists, &mut merged);
        let mut r = VarReader::new(&merged);
        assert_eq!(r.value(), b"\"ip\"");
        assert_eq!(r.value(), b"\"/a\"");
        assert_eq!(r.list_len(), 1);
    }

    #[test]
    fn unchanged_rebuild_leaves_destination_alone() {
        let lists = [list(1, false)];
        let src = [0u8, 0, 1, 1, 0, b'7'];
        let mut edits = VarEdits::new();
        edits.appends[0] = Some(b"8");
        let mut dst = vec![9];
        assert!(
            !rebuild_var(&src, 1, &lists, &edits, &mut dst),
            "list is at max_len"
        );
        assert_eq!(dst, vec![9]);
    }
}
