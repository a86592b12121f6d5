//! The common case of an event joining its session, done inside the session's first arena block.
//!
//! Most events of a long session change only the fixed part of its payload (counters,
//! aggregates, split hashes) and perhaps a state value of the same length. When all of that lies
//! in the first block, it is updated where it lies: no copy of the payload into the scratch
//! buffer and back, which is most of what `State::apply` costs per event. State values that
//! change length (a page path) are rewritten here too when the whole record stays in the first
//! block (`apply_in_block_resizing`, kept out of line so the usual event does not pay for it).
//! Anything else (a metadata value to capture, a list append, a record that spans blocks)
//! takes the general path, with nothing changed here. Its way there is marked `cold_path`, as
//! in `State::on_event`, so that the in-place path is laid out straight.

use super::rules::{short_eq, LastField, ProfileRule, Rules};
use super::{captured, payload, value_hash, State, FLAG_META_DONE};
use crate::decode::Event;

/// State values remembered between the length check and the write (JSON tokens are never
/// empty, so an empty slice means absent); further ones are looked up again.
const STATE_KEPT: usize = 4;

impl State {
    /// Applies `ev` to session `s` in place and returns true, or returns false having changed
    /// nothing when the event needs the general path. The caller has made the copy-on-write
    /// copy of `s` and updates the head (count, times) afterwards.
    #[inline(always)]
    pub(super) fn apply_in_block<'e>(
        &mut self,
        rules: &Rules,
        rule: &ProfileRule,
        s: u32,
        ev: &Event<'e>,
        t: i64,
        last: &mut LastField<'e>,
    ) -> bool {
        let h = *self.table.get(s);
        // Metadata still being captured needs the general path only when the event carries
        // some: a session whose sources never send a field stays on this path.
        if h.flags & FLAG_META_DONE == 0 && rule.metadata.iter().any(|&f| ev.has(f)) {
            std::hint::cold_path();
            return false;
        }
        let base = h.key_len as usize;
        let l = &rule.layout;
        let fixed_end = base + l.fixed_bytes;
        let block = self.arena.block_bytes() as usize;
        if fixed_end > block {
            std::hint::cold_path();
            return false;
        }
        let lists_touched = rule.lists.iter().any(|list| {
            list.when.is_none_or(|w| rules.eval(w, ev)) && !ev.get(list.field).is_missing()
        });
        if lists_touched {
            std::hint::cold_path();
            return false;
        }
        let max = self.value_bytes_max;
        let hasher = &self.hasher;
        let Some(head) = self.arena.slice_mut(h.data, 0, block) else {
            std::hint::cold_path();
            return false;
        };

        // State (the front of the var area): every value the event carries must lie in this
        // block; one that changes length sends the event to `apply_in_block_resizing`. Checked
        // before anything is written; the first values found are kept for the write (an empty
        // slice: absent from the event).
        let state = !rule.state.is_empty() && (t >= h.last_ts || h.count == 0);
        if state && rule.state.len() == 1 {
            // One state value, the usual case: checked, then written after the fixed part,
            // without the list of values found that several need.
            let at = fixed_end;
            if at + 2 > block {
                std::hint::cold_path();
                return false;
            }
            let len = usize::from(payload::get_u16(head, at));
            let v = ev.token(rule.state[0]).map(|raw| captured(raw, max));
            if let Some(v) = v {
                if at + 2 + len > block {
                    std::hint::cold_path();
                    return false;
                }
                if v.len() != len {
                    std::hint::cold_path();
                    return self.apply_in_block_resizing(rules, rule, s, ev, last);
                }
            }
            fixed_part(head, rules, rule, ev, last, base, hasher);
            if let Some(v) = v {
                payload::copy_short(&mut head[at + 2..at + 2 + len], v);
            }
            return true;
        }
        let mut found: [&[u8]; STATE_KEPT] = [&[]; STATE_KEPT];
        if state {
            let mut at = fixed_end;
            for (k, &f) in rule.state.iter().enumerate() {
                if at + 2 > block {
                    return false;
                }
                let len = usize::from(payload::get_u16(head, at));
                if let Some(raw) = ev.token(f) {
                    let v = captured(raw, max);
                    if at + 2 + len > block {
                        return false;
                    }
                    if v.len() != len {
                        // Nothing is written yet: start over on the path that moves values.
                        return self.apply_in_block_resizing(rules, rule, s, ev, last);
                    }
                    if k < STATE_KEPT {
                        found[k] = v;
                    }
                }
                at += 2 + len;
            }
        }

        fixed_part(head, rules, rule, ev, last, base, hasher);
        if state {
            let mut at = fixed_end;
            for (k, &f) in rule.state.iter().enumerate() {
                let len = usize::from(payload::get_u16(head, at));
                let v = match found.get(k) {
                    Some(v) => Some(*v).filter(|v| !v.is_empty()),
                    None => ev.token(f).map(|raw| captured(raw, max)),
                };
                if let Some(v) = v {
                    payload::copy_short(&mut head[at + 2..at + 2 + len], v);
                }
                at += 2 + len;
            }
        }
        true
    }

    /// `apply_in_block` for an event whose state values change length: when the event carries
    /// every state value and the whole record lies in the first block before and after, the var
    /// area after the state values moves by the difference and the values are rewritten in
    /// place. Otherwise returns false having changed nothing.
    #[inline(never)]
    fn apply_in_block_resizing<'e>(
        &mut self,
        rules: &Rules,
        rule: &ProfileRule,
        s: u32,
        ev: &Event<'e>,
        last: &mut LastField<'e>,
    ) -> bool {
        let h = *self.table.get(s);
        let base = h.key_len as usize;
        let l = &rule.layout;
        let fixed_end = base + l.fixed_bytes;
        let block = self.arena.block_bytes() as usize;
        let max = self.value_bytes_max;
        if rule.state.len() > STATE_KEPT {
            return false;
        }
        let hasher = &self.hasher;
        let Some(head) = self.arena.slice_mut(h.data, 0, block) else {
            return false;
        };
        let mut found: [&[u8]; STATE_KEPT] = [&[]; STATE_KEPT];
        let (mut at, mut new_end) = (fixed_end, fixed_end);
        for (k, &f) in rule.state.iter().enumerate() {
            let Some(raw) = ev.token(f) else {
                return false;
            };
            if at + 2 > block {
                return false;
            }
            at += 2 + usize::from(payload::get_u16(head, at));
            found[k] = captured(raw, max);
            new_end += 2 + found[k].len();
        }
        let end = fixed_end + usize::from(payload::get_u16(head, base + l.var_len_off));
        if at > end || end > block || end + new_end - at > block {
            return false;
        }

        fixed_part(head, rules, rule, ev, last, base, hasher);
        // The record stays in its one block: no chain to resize. Bytes past a shrunk record
        // are left as they are, as `Arena::resize` leaves them.
        head.copy_within(at..end, new_end);
        let var_len = end + new_end - at - fixed_end;
        payload::put_u16(head, base + l.var_len_off, var_len as u16);
        let mut w = fixed_end;
        for v in &found[..rule.state.len()] {
            payload::put_u16(head, w, v.len() as u16);
            payload::copy_short(&mut head[w + 2..w + 2 + v.len()], v);
            w += 2 + v.len();
        }
        debug_assert_eq!(w, new_end);
        true
    }
}

/// Counters, aggregates and split hashes: the fixed part of the payload, updated in `head`
/// (the session's first block here, the copied-out payload on the general path). Returns
/// whether anything changed.
#[inline(always)]
pub(super) fn fixed_part<'e>(
    head: &mut [u8],
    rules: &Rules,
    rule: &ProfileRule,
    ev: &Event<'e>,
    last: &mut LastField<'e>,
    base: usize,
    hasher: &foldhash::fast::FixedState,
) -> bool {
    let l = &rule.layout;
    let mut changed = false;
    if let Some(by) = &rule.counters_by_value {
        if let Some(value) = last.text(by.field, ev) {
            for (i, text) in by.candidates(value) {
                if short_eq(text, value) {
                    payload::counter_add(head, base, l, *i, 1);
                    changed = true;
                }
            }
        }
        for &i in by.every.iter() {
            payload::counter_add(head, base, l, i, 1);
            changed = true;
        }
    } else {
        for (i, c) in rule.counters.iter().enumerate() {
            if c.when.is_none_or(|w| rules.eval_reusing(w, ev, last)) {
                payload::counter_add(head, base, l, i, 1);
                changed = true;
            }
        }
    }
    for (i, a) in rule.aggregates.iter().enumerate() {
        if a.when.is_none_or(|w| rules.eval(w, ev)) {
            if let Some(v) = ev.get(a.field).as_f64() {
                payload::aggregate_apply(head, base, l, i, a.op, v);
                changed = true;
            }
        }
    }
    for (i, &f) in rule.split_on_change.iter().enumerate() {
        if let Some(h) = value_hash(hasher, ev.get(f)) {
            payload::set_split_hash(head, base, l, i, h);
            changed = true;
        }
    }
    changed
}
