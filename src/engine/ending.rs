//! Ending sessions: with their end marker and the release of their record (`end_session`), to
//! make room when the table or the arena is full (`make_room`), and when the expiry wheel finds
//! them due (`expire`). Invariant: every live session is linked in its profile's wheel at or
//! before its deadline's second, so an expiry pass up to a second ends every session due by it.

use super::markers;
use super::payload;
use super::rules::Rules;
use super::table::NIL;
use super::{
    due_by, due_s, summary, Clock, EndReason, Out, State, Stop, EVICT_SCAN_MAX, EXPIRE_AHEAD_HEAD,
    EXPIRE_AHEAD_PAYLOAD, EXPIRE_CHUNK, FLAG_SUB, NONE_TS,
};

impl State {
    /// Moves every open session of a record profile marked in `shrank` to the wheel slot of its
    /// deadline under `rules` (see `Engine::set_rules`). A deadline already past lands in the
    /// slot the next expiry pass drains.
    pub(super) fn relink_shortened(&mut self, rules: &Rules, shrank: &[bool]) {
        for s in 0..self.table.high_water() {
            if !self.table.is_live(s) {
                continue;
            }
            let h = *self.table.get(s);
            if !shrank.get(h.profile as usize).copied().unwrap_or(false) {
                continue;
            }
            let w = if h.flags & FLAG_SUB != 0 {
                self.sub_of[h.profile as usize].0 as usize
            } else {
                h.profile as usize
            };
            self.relink_at_deadline(rules, w, s);
        }
    }

    /// Moves session `s` to its deadline's second in wheel `w` (the snapshot capture's copies
    /// made first).
    pub(super) fn relink_at_deadline(&mut self, rules: &Rules, w: usize, s: u32) {
        let due = due_s(self.deadline(rules, s));
        self.cow_unlink(s);
        self.cow_link(w, s, due);
        self.wheels[w].relink(self.table.heads_mut(), s, due);
    }

    /// Return a record's wheel link, arena chain and table slot.
    pub(super) fn release(&mut self, wheel: usize, s: u32) {
        self.cow_unlink(s);
        let h = *self.table.get(s);
        if self.wheels[wheel].is_linked(self.table.heads(), s) {
            self.wheels[wheel].unlink(self.table.heads_mut(), s);
        }
        self.arena.free(h.data);
        self.table.free(s);
        self.stats.active_by_profile[h.profile as usize] -= 1;
    }

    /// Drop a top-level record without an end marker (it was absorbed by a merge).
    pub(super) fn remove_record(&mut self, p: u8, s: u32, hash: u64, key: &[u8]) {
        self.chain_remove(p, s, hash, key);
        self.release(p as usize, s);
    }

    /// End a session (its open sub-sessions first) and emit its end marker.
    pub(super) fn end_session(
        &mut self,
        rules: &Rules,
        s: u32,
        reason: EndReason,
        now: i64,
        out: &mut Out,
    ) {
        self.cow(s);
        let h = *self.table.get(s);
        if h.flags & FLAG_SUB != 0 {
            self.end_sub(rules, s, reason, out);
            return;
        }
        let p = h.profile as usize;
        let rule = &rules.profiles[p];
        self.end_subs(rules, s, reason, now, out);
        let len = self.load(s, false);
        let key_len = h.key_len as usize;
        markers::session_end(
            out,
            rule,
            &self.pay[..key_len],
            summary(&h),
            reason,
            &self.pay[..len],
        );
        self.stats.sessions_ended[reason as usize] += 1;
        let hash = self.key_hash(h.profile, &self.pay[..key_len]);
        self.keybuf.clear();
        self.keybuf.extend_from_slice(&self.pay[..key_len]);
        let key = std::mem::take(&mut self.keybuf);
        self.chain_remove(h.profile, s, hash, &key);
        self.keybuf = key;
        self.release(p, s);
    }

    /// End the open sub-sessions of session `s`, which ends with `reason` at clock `now`
    /// (`NONE_TS`: unknown): each idle if its own deadline passed, `end_of_input` with its parent,
    /// otherwise `parent_ended`. Uses `pay`.
    pub(super) fn end_subs(
        &mut self,
        rules: &Rules,
        s: u32,
        reason: EndReason,
        now: i64,
        out: &mut Out,
    ) {
        let h = *self.table.get(s);
        let rule = &rules.profiles[h.profile as usize];
        if rule.subs.is_empty() {
            return;
        }
        self.load(s, false);
        let base = h.key_len as usize;
        for i in 0..payload::sub_slots(&rule.layout) {
            let sub = payload::sub_slot(&self.pay, base, &rule.layout, i);
            if sub == NIL {
                continue;
            }
            let sub_reason = if now != NONE_TS && now > self.deadline(rules, sub) {
                EndReason::Idle
            } else if reason == EndReason::EndOfInput {
                EndReason::EndOfInput
            } else {
                EndReason::ParentEnded
            };
            self.end_sub(rules, sub, sub_reason, out);
        }
    }

    /// Make room, before anything is evicted or refused, by ending one session that is due: the
    /// expiry pass due now, stopped at its first end. Passes judge deadlines by the second (see
    /// `expire`), and every session is linked at or before its deadline's second, so room is
    /// made exactly when some session's deadline second is before the clock's, whatever the
    /// order within a wheel's seconds and however far earlier bounded passes got.
    pub(super) fn end_one_due(&mut self, rules: &Rules, clock: Clock, out: &mut Out) -> bool {
        let live = self.table.live();
        for q in 0..self.wheels.len() {
            self.expire(rules, q, clock, out, Stop::FirstEnd);
            if self.table.live() < live {
                return true;
            }
        }
        false
    }

    /// Evict the session of profile `p` (or any profile) closest to its deadline.
    pub(super) fn make_room(&mut self, rules: &Rules, p: usize, now: i64, out: &mut Out) -> bool {
        let order = std::iter::once(p).chain((0..self.wheels.len()).filter(|&q| q != p));
        for q in order {
            let mut victim = None;
            for _ in 0..EVICT_SCAN_MAX {
                let Some(v) = self.wheels[q].earliest(self.table.heads()) else {
                    break;
                };
                // The bucket may be stale (lazy re-linking): re-link to the true deadline and
                // accept the candidate once it stays the earliest.
                self.relink_at_deadline(rules, q, v);
                victim = Some(v);
                if self.wheels[q].earliest(self.table.heads()) == Some(v) {
                    break;
                }
            }
            if let Some(v) = victim {
                self.stats.evictions += 1;
                let vclock = self
                    .profile_clock(&rules.profiles[q], q, Clock::Replay)
                    .max(now);
                self.end_session(rules, v, EndReason::Evicted, vclock, out);
                return true;
            }
        }
        false
    }

    /// Drain profile `p`'s wheel up to its clock's second `until_s`: end what is due by then,
    /// re-link what is not. A session is due when its deadline's second is before `until_s`
    /// ([`due_by`]), not when the deadline is before the clock: a session whose deadline fell
    /// in the clock's own second waits for the next second, as it would linked where it
    /// belongs. So what a pass ends does not depend on where lazy re-linking left a session, and
    /// a full table finds a due session with one stopped pass, not a walk of a whole second.
    /// Returns whether `stop` stopped it with due sessions left (see `advance_bounded`).
    pub(super) fn expire(
        &mut self,
        rules: &Rules,
        p: usize,
        clock: Clock,
        out: &mut Out,
        stop: Stop,
    ) -> bool {
        let rule = &rules.profiles[p];
        self.clocks[p].hold(rule, clock);
        let now = self.profile_clock(rule, p, clock);
        if now == NONE_TS {
            return false;
        }
        let until_s = now.div_euclid(1000);
        self.cow_drain(p, until_s);
        let mut ended = false;
        // Looking for one session to end, take one at a time: nothing is left to put back.
        let chunk = if stop == Stop::FirstEnd {
            1
        } else {
            EXPIRE_CHUNK
        };
        loop {
            self.expired.clear();
            let complete = self.wheels[p].drain_some_into(
                self.table.heads_mut(),
                until_s,
                chunk,
                &mut self.expired,
            );
            for i in 0..self.expired.len() {
                // The drain read the heads; a chunk as large as a whole wheel can outgrow the
                // caches, and the payloads are still to be read: request both ahead, so that
                // their misses overlap instead of stalling one after another.
                if let Some(&ahead) = self.expired.get(i + EXPIRE_AHEAD_HEAD) {
                    self.table.prefetch(ahead);
                }
                if let Some(&ahead) = self.expired.get(i + EXPIRE_AHEAD_PAYLOAD) {
                    if self.table.is_live(ahead) {
                        self.arena.prefetch(self.table.get(ahead).data);
                    }
                }
                let s = self.expired[i];
                // Ending a parent ends its sub-sessions, which may be later in this list.
                if !self.table.is_live(s) || self.wheels[p].is_linked(self.table.heads(), s) {
                    continue;
                }
                let stops = match stop {
                    Stop::Never => false,
                    Stop::HalfFull => out.half_full(),
                    Stop::FirstEnd => true,
                };
                if ended && stops {
                    self.requeue_expired(rules, p, i, until_s, complete);
                    return true;
                }
                let deadline = self.deadline(rules, s);
                if due_by(deadline, until_s) {
                    ended = true;
                    let reason = self.timed_reason(rule, s, now);
                    self.end_session(rules, s, reason, now, out);
                } else {
                    // Its second is after `until_s`: the drain does not meet it again.
                    self.cow_link(p, s, due_s(deadline));
                    self.wheels[p].link(self.table.heads_mut(), s, due_s(deadline));
                }
            }
            if ended && stop == Stop::FirstEnd {
                // Nothing drained is left over (one at a time), unless a range covering the
                // whole wheel was taken at once: then the loop above put the rest back.
                return !complete;
            }
            if complete {
                return false;
            }
        }
    }

    /// Put the drained sessions from `expired[from..]` that are still live and detached back:
    /// the due ones where the next drain starts (at `until_s`, the cursor moved back to it,
    /// after a `complete` drain; else at the cursor's second, whose bucket keeps the rest), the
    /// others (drained early) at their own second, as the pass would have.
    pub(super) fn requeue_expired(
        &mut self,
        rules: &Rules,
        p: usize,
        from: usize,
        until_s: i64,
        complete: bool,
    ) {
        let next_s = if complete {
            self.wheels[p].rewind(until_s);
            until_s
        } else {
            self.wheels[p].cursor_s()
        };
        for i in from..self.expired.len() {
            let s = self.expired[i];
            if self.table.is_live(s) && !self.wheels[p].is_linked(self.table.heads(), s) {
                let deadline = self.deadline(rules, s);
                let due = if due_by(deadline, until_s) {
                    next_s
                } else {
                    due_s(deadline)
                };
                self.cow_link(p, s, due);
                self.wheels[p].link(self.table.heads_mut(), s, due);
            }
        }
    }
}
