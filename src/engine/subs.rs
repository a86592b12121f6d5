//! Sub-sessions: started and ended within their parent session, keyed by the parent's id and an
//! optional extra field, each in its own record linked into the parent's wheel. Invariant: a
//! sub-session ends before its parent: the parent's payload holds the slots of its open
//! sub-sessions, and ending the parent ends them first.

use super::markers;
use super::payload;
use super::rules::{self, Rules};
use super::table::{Head, NIL};
use super::{due_s, summary, Clock, EndReason, Out, State, FLAG_SUB};
use crate::decode::Event;

impl State {
    /// Sub-sessions of the parent `parent` for this event (processing-time profiles).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_event_subs(
        &mut self,
        rules: &Rules,
        p: usize,
        parent: u32,
        ev: &Event<'_>,
        t: i64,
        clock: Clock,
        out: &mut Out,
    ) {
        let rule = &rules.profiles[p];
        let parent_id = self.table.get(parent).id;
        for (j, sub) in rule.subs.iter().enumerate() {
            let sub_key: &[u8] = match sub.key {
                None => b"",
                Some(f) => match ev.get(f).key_bytes() {
                    Some(k) if k.len() <= self.key_bytes_max => k,
                    _ => continue,
                },
            };
            self.keybuf.clear();
            self.keybuf.extend_from_slice(&parent_id.to_le_bytes());
            self.keybuf.extend_from_slice(sub_key);
            let rp = sub.record_profile;
            let hash = self.sub_key_hash(rp, &self.keybuf);
            let mut s = {
                let (table, arena, key) = (&self.table, &self.arena, &self.keybuf);
                self.index
                    .find(hash, |x| {
                        let h = table.get(x);
                        h.profile == rp
                            && h.key_len as usize == key.len()
                            && arena.eq_at(h.data, 0, key)
                    })
                    .unwrap_or(NIL)
            };
            if s != NIL {
                let h = self.table.get(s);
                if t - h.last_ts > sub.idle_timeout_ms {
                    self.end_sub(rules, s, EndReason::Idle, out);
                    s = NIL;
                } else if rules.eval_opt(sub.starts_when, ev) {
                    self.end_sub(rules, s, EndReason::StartsWhen, out);
                    s = NIL;
                }
            }
            if s == NIL {
                if sub.starts_when.is_some_and(|w| !rules.eval(w, ev)) {
                    continue;
                }
                s = match self.create_sub(rules, p, j, parent, hash, t, clock) {
                    Some(s) => s,
                    None => continue,
                };
                let h = *self.table.get(s);
                self.parent_key(parent);
                let key_opt = sub.key.map(|_| sub_key);
                markers::sub_session_start(
                    out,
                    rule,
                    sub,
                    &self.pkey,
                    key_opt,
                    summary(&h),
                    parent_id,
                );
            }
            self.cow(s);
            let old_len = self.load(s, true);
            let base = self.table.get(s).key_len as usize;
            let layout = rules::layout_for(sub.counters.len(), 0, 0, 0);
            for (i, c) in sub.counters.iter().enumerate() {
                if c.when.is_none_or(|w| rules.eval(w, ev)) {
                    payload::counter_add(&mut self.pay2, base, &layout, i, 1);
                }
            }
            let data = self.table.get(s).data;
            self.arena.write(data, 0, &self.pay2[..old_len]);
            let h = self.table.get_mut(s);
            h.count = h.count.saturating_add(1);
            h.last_ts = h.last_ts.max(t);
            if rules.eval_opt(sub.ends_when, ev) {
                self.end_sub(rules, s, EndReason::EndsWhen, out);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn create_sub(
        &mut self,
        rules: &Rules,
        p: usize,
        j: usize,
        parent: u32,
        hash: u64,
        t: i64,
        clock: Clock,
    ) -> Option<u32> {
        let rule = &rules.profiles[p];
        let sub = &rule.subs[j];
        let pl = &rule.layout;
        self.cow(parent);
        let parent_h = *self.table.get(parent);
        let parent_base = parent_h.key_len as usize;
        // Find a free sub-session slot in the parent's payload.
        let free_i = (0..payload::sub_slots(pl)).find(|&i| {
            let mut b = [0u8; 4];
            self.arena
                .read(parent_h.data, parent_base + pl.subs_off + 4 * i, &mut b);
            u32::from_le_bytes(b) == NIL
        });
        let Some(free_i) = free_i else {
            self.stats.sub_session_limit += 1;
            return None;
        };
        let layout = rules::layout_for(sub.counters.len(), 0, 0, 0);
        let len = self.keybuf.len() + layout.fixed_bytes;
        let Some(slot) = self.table.alloc() else {
            self.stats.sub_sessions_full += 1;
            return None;
        };
        let Some(data) = self.arena.alloc(len) else {
            self.table.free(slot);
            self.stats.sub_sessions_full += 1;
            return None;
        };
        self.pay2.clear();
        self.pay2.extend_from_slice(&self.keybuf);
        self.pay2.resize(len, 0);
        self.arena.write(data, 0, &self.pay2);
        self.arena.write(
            parent_h.data,
            parent_base + pl.subs_off + 4 * free_i,
            &slot.to_le_bytes(),
        );
        let id = self.ids.next(clock);
        *self.table.get_mut(slot) = Head {
            id,
            start_ts: t,
            last_ts: t,
            count: 0,
            data,
            link: parent,
            profile: sub.record_profile,
            flags: FLAG_SUB,
            key_len: self.keybuf.len() as u16,
            ..*self.table.get(slot)
        };
        self.index.insert(hash, slot);
        let due = due_s(t + sub.idle_timeout_ms);
        self.link_new(p, slot, due, t);
        self.stats.sub_sessions_started += 1;
        self.stats.active_by_profile[sub.record_profile as usize] += 1;
        Some(slot)
    }

    /// Copy a parent session's key into `pkey` (`keybuf` may hold a sub-session key in use).
    pub(super) fn parent_key(&mut self, parent: u32) {
        let h = *self.table.get(parent);
        self.pkey.clear();
        self.pkey.resize(h.key_len as usize, 0);
        self.arena.read(h.data, 0, &mut self.pkey);
    }

    pub(super) fn end_sub(&mut self, rules: &Rules, s: u32, reason: EndReason, out: &mut Out) {
        // Captures the parent's unit, whose payload changes too.
        self.cow(s);
        let h = *self.table.get(s);
        debug_assert!(h.flags & FLAG_SUB != 0);
        let (pp, si) = self.sub_of[h.profile as usize];
        let rule = &rules.profiles[pp as usize];
        let sub = &rule.subs[si as usize];
        let len = self.load(s, true);
        let parent = h.link;
        let parent_h = *self.table.get(parent);
        let parent_id = u64::from_le_bytes(self.pay2[..8].try_into().expect("8 bytes"));
        debug_assert_eq!(parent_id, parent_h.id);
        // Clear the parent's reference to this sub-session.
        let pl = &rule.layout;
        let pbase = parent_h.key_len as usize;
        for i in 0..payload::sub_slots(pl) {
            let mut b = [0u8; 4];
            self.arena
                .read(parent_h.data, pbase + pl.subs_off + 4 * i, &mut b);
            if u32::from_le_bytes(b) == s {
                self.arena.write(
                    parent_h.data,
                    pbase + pl.subs_off + 4 * i,
                    &NIL.to_le_bytes(),
                );
            }
        }
        self.parent_key(parent);
        let key_len = h.key_len as usize;
        let sub_key = sub.key.map(|_| &self.pay2[8..key_len]);
        markers::sub_session_end(
            out,
            rule,
            sub,
            &self.pkey,
            sub_key,
            summary(&h),
            parent_id,
            reason,
            &self.pay2[..len],
            key_len,
        );
        let hash = self.sub_key_hash(h.profile, &self.pay2[..key_len]);
        self.index.remove(hash, s);
        self.release(pp as usize, s);
        self.stats.sub_sessions_ended += 1;
    }

    /// After a reload that appended `shift` profiles: sub-session kinds are numbered after the
    /// top-level profiles, so every kind moved up by `shift`. Each open sub-session takes its new
    /// number (the snapshot capture's copy made first); its index entry stays, hashed by what
    /// the kind is rather than its number (`sub_key_hash`). One pass over the table's heads,
    /// while the shard takes no events.
    pub(super) fn renumber_subs(&mut self, shift: u8) {
        for s in 0..self.table.high_water() {
            if !self.table.is_live(s) || self.table.get(s).flags & FLAG_SUB == 0 {
                continue;
            }
            self.cow(s);
            self.table.get_mut(s).profile += shift;
        }
    }
}
