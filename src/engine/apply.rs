//! Applying an event to its session's data: the head (count, times) and the payload, in place
//! when `in_block.rs` can, otherwise on the general path here, which copies the payload out,
//! changes it (counters, aggregates, split hashes, captured values, lists) and writes it back.
//! Every change to a live session's record goes through `cow` first, so that a sliced snapshot
//! capture in progress sees the record as it was at its cut.

use super::in_block;
use super::payload::{self, VarEdits};
use super::rules::{self, ProfileRule, Rules};
use super::{captured, State, FLAG_META_DONE, VAR_FRONT_BYTES};
use crate::decode::Event;

impl State {
    /// Update session `s` with the event: head fields, counters, aggregates, captured values.
    ///
    /// Most events are applied inside the payload's first block (`in_block`). Otherwise only
    /// the fixed part of the payload (key, counters, aggregates, split hashes) is read and
    /// written on every event. The var area is read only when a value or list may change:
    /// metadata until all of it is captured (`FLAG_META_DONE`), state, lists. A state value
    /// of unchanged length is overwritten in place; anything else rebuilds the var area.
    ///
    /// `last`: see [`Rules::eval_reusing`].
    pub(super) fn apply<'e>(
        &mut self,
        rules: &Rules,
        rule: &ProfileRule,
        s: u32,
        ev: &Event<'e>,
        t: i64,
        last: &mut rules::LastField<'e>,
    ) {
        self.cow(s);
        if !self.apply_in_block(rules, rule, s, ev, t, last) {
            std::hint::cold_path();
            self.apply_general(rules, rule, s, ev, t);
        }
        let h = self.table.get_mut(s);
        h.count = h.count.saturating_add(1);
        h.last_ts = h.last_ts.max(t);
        if t < h.start_ts {
            std::hint::cold_path();
            h.start_ts = t;
            let w = h.profile as usize;
            // A start moved back can bring the max_duration deadline forward.
            if rule.max_duration_ms.is_some() {
                self.relink_at_deadline(rules, w, s);
            }
        }
    }

    /// `apply` for what `apply_in_block` leaves: the payload copied out, changed, written back.
    /// Out of line, with `apply_in_block` inlined, so that `apply` is the in-place path in a
    /// small frame rather than a call into it from the large one this path needs.
    #[inline(never)]
    pub(super) fn apply_general(
        &mut self,
        rules: &Rules,
        rule: &ProfileRule,
        s: u32,
        ev: &Event<'_>,
        t: i64,
    ) {
        let old = *self.table.get(s);
        let base = old.key_len as usize;
        let l = &rule.layout;
        let fixed_end = base + l.fixed_bytes;
        self.pay.clear();
        self.pay.resize(fixed_end, 0);
        self.arena.read(old.data, 0, &mut self.pay);
        let mut last = rules::LastField::NONE;
        let fixed_dirty = in_block::fixed_part(
            &mut self.pay,
            rules,
            rule,
            ev,
            &mut last,
            base,
            &self.hasher,
        );
        let metadata = old.flags & FLAG_META_DONE == 0 && !rule.metadata.is_empty();
        // State is the last value seen: in event time, that of the latest event.
        let state = !rule.state.is_empty() && (t >= old.last_ts || old.count == 0);
        let stored = if metadata || state || !rule.lists.is_empty() {
            self.apply_var(rules, rule, s, ev, metadata, state)
        } else {
            false
        };
        if fixed_dirty && !stored {
            self.arena.write(old.data, base, &self.pay[base..fixed_end]);
        }
    }

    /// The var-area part of `apply`, with the fixed part already updated in `pay`. Returns
    /// whether it stored the payload from the start of the fixed part on (so `apply` need not).
    pub(super) fn apply_var(
        &mut self,
        rules: &Rules,
        rule: &ProfileRule,
        s: u32,
        ev: &Event<'_>,
        metadata: bool,
        state: bool,
    ) -> bool {
        let h = *self.table.get(s);
        let base = h.key_len as usize;
        let l = &rule.layout;
        let fixed_end = base + l.fixed_bytes;
        let var_len = payload::get_u16(&self.pay, base + l.var_len_off) as usize;
        let old_len = fixed_end + var_len;
        let max = self.value_bytes_max;
        let lists_touched = rule.lists.iter().any(|list| {
            list.when.is_none_or(|w| rules.eval(w, ev)) && !ev.get(list.field).is_missing()
        });
        // With only state to look at, read the front of the var area, where state lives, and
        // the rest only if the state values reach past it.
        let front = if metadata || lists_touched {
            var_len
        } else {
            var_len.min(VAR_FRONT_BYTES)
        };
        self.pay.resize(fixed_end + front, 0);
        self.arena
            .read(h.data, fixed_end, &mut self.pay[fixed_end..]);
        if front < var_len && !payload::values_within(&self.pay[fixed_end..], rule.state.len()) {
            self.load_rest(h.data, old_len);
        }

        // In place when nothing changes length: state values of the stored length, metadata
        // all captured (or absent from the event), no list append.
        let mut in_place = !lists_touched;
        let mut differs = false;
        let mut at = fixed_end;
        for &f in &rule.state {
            let len = usize::from(payload::get_u16(&self.pay, at));
            if state {
                if let Some(raw) = ev.get(f).raw_json() {
                    let new = captured(raw, max);
                    if new.len() != len {
                        in_place = false;
                        break;
                    }
                    differs |= new != &self.pay[at + 2..at + 2 + len];
                }
            }
            at += 2 + len;
        }
        if in_place && metadata {
            for &f in &rule.metadata {
                let len = usize::from(payload::get_u16(&self.pay, at));
                if len == 0 && !ev.get(f).is_missing() {
                    in_place = false;
                    break;
                }
                at += 2 + len;
            }
        }
        if in_place {
            if !differs {
                return false;
            }
            let mut at = fixed_end;
            let mut end = fixed_end;
            for &f in &rule.state {
                let len = usize::from(payload::get_u16(&self.pay, at));
                if let Some(raw) = ev.get(f).raw_json() {
                    self.pay[at + 2..at + 2 + len].copy_from_slice(captured(raw, max));
                    end = at + 2 + len;
                }
                at += 2 + len;
            }
            self.arena.write(h.data, base, &self.pay[base..end]);
            return true;
        }

        self.load_rest(h.data, old_len);
        let mut edits = VarEdits::new();
        if state {
            for (j, &f) in rule.state.iter().enumerate() {
                if let Some(raw) = ev.get(f).raw_json() {
                    edits.values[j] = Some((captured(raw, max), false));
                    edits.any = true;
                }
            }
        }
        if metadata {
            for (i, &f) in rule.metadata.iter().enumerate() {
                if let Some(raw) = ev.get(f).raw_json() {
                    edits.values[rule.state.len() + i] = Some((captured(raw, max), true));
                    edits.any = true;
                }
            }
        }
        for (k, list) in rule.lists.iter().enumerate() {
            if list.when.is_none_or(|w| rules.eval(w, ev)) {
                if let Some(raw) = ev.get(list.field).raw_json() {
                    edits.appends[k] = Some(captured(raw, max));
                    edits.any = true;
                }
            }
        }
        self.var.clear();
        let changed = edits.any
            && payload::rebuild_var(
                payload::var_area(&self.pay, base, l),
                rule.state.len() + rule.metadata.len(),
                &rule.lists,
                &edits,
                &mut self.var,
            );
        if changed {
            self.replace_var(s, old_len, base, l);
        }
        if metadata {
            let mut r = payload::VarReader::new(payload::var_area(&self.pay, base, l));
            r.skip(rule.state.len());
            if rule.metadata.iter().all(|_| !r.value().is_empty()) {
                self.table.get_mut(s).flags |= FLAG_META_DONE;
            }
        }
        changed
    }
}
