//! The brute-force reference model of docs/semantics.md, for one profile on one shard.
//!
//! It is meant to be obviously correct rather than fast: processing time walks the events in
//! arrival order and applies the boundary rules of the doc in their order of precedence; event
//! time first marks late events by replaying the watermark in arrival order, then sorts each key's
//! accepted events by time and walks them the same way (with out-of-order input only the idle gap
//! may split, which makes the walk exactly "connected components of events closer than idle").
//!
//! What the doc leaves to timing (whether the wheel or the next event ended a session whose
//! deadlines had both passed, and the one-second slack of the wheel at end of input) is modelled
//! as a set of acceptable end reasons; membership, times and statistics are exact.

use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet};

pub const IDLE: &str = "idle";
pub const MAX: &str = "max_duration";
pub const ENDS: &str = "ends_when";
pub const STARTS: &str = "starts_when";
pub const SPLIT: &str = "split_on_change";
pub const EOI: &str = "end_of_input";
pub const PARENT: &str = "parent_ended";

/// Wheel slack: a timed end is emitted within one second of its deadline (docs/semantics.md).
pub const WHEEL_SLACK_MS: i64 = 1000;

/// Every generated timestamp is this plus a small offset, so times look like real epoch ms.
pub const BASE_MS: i64 = 1_750_000_000_000;

/// One generated event. `n` is its arrival index and identifies it in the engine's output.
#[derive(Clone, Debug, PartialEq)]
pub struct Ev {
    pub n: u32,
    pub key: u8,
    pub ts: i64,
    pub ty: &'static str,
    pub camp: Option<u8>,
    pub v: Option<i64>,
    pub page: Option<u8>,
    pub tab: Option<u8>,
    /// Absent from some events: metadata is the first value seen.
    pub ip: Option<u8>,
}

impl Ev {
    /// The JSON line fed to the decoder.
    pub fn line(&self) -> String {
        let mut s = format!(
            r#"{{"n":{},"user":"k{}","ts":{},"type":"{}""#,
            self.n, self.key, self.ts, self.ty
        );
        if let Some(ip) = self.ip {
            s += &format!(r#","ip":"10.0.0.{ip}""#);
        }
        if let Some(c) = self.camp {
            s += &format!(r#","camp":"{}""#, camp_name(c));
        }
        if let Some(v) = self.v {
            s += &format!(r#","v":{v}"#);
        }
        if let Some(p) = self.page {
            s += &format!(r#","page":"/p{p}""#);
        }
        if let Some(t) = self.tab {
            s += &format!(r#","tab":"t{t}""#);
        }
        s.push('}');
        s
    }

    pub fn key_str(&self) -> String {
        format!("k{}", self.key)
    }
}

fn camp_name(c: u8) -> &'static str {
    ["a", "b", "c", "d"][usize::from(c) % 4]
}

/// The engine-visible time of a profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Time {
    Processing,
    Event,
}

#[derive(Clone, Debug)]
pub struct SubSpec {
    pub idle_ms: i64,
    /// `type` value that starts a sub-session (None: every event may start one).
    pub starts: Option<&'static str>,
    pub ends: Option<&'static str>,
}

/// What the reference needs to know about a profile; `toml` renders the same profile for the
/// engine so the two cannot drift apart.
#[derive(Clone, Debug)]
pub struct Spec {
    pub time: Time,
    pub idle_ms: i64,
    pub lateness_ms: i64,
    pub max_ms: Option<i64>,
    /// `type` value matching `starts_when` / `ends_when`.
    pub starts: Option<&'static str>,
    pub ends: Option<&'static str>,
    /// `split_on_change = ["camp"]`.
    pub split_camp: bool,
    /// metadata ip, state page, counters, aggregates and lists (see `expected_stats`).
    pub stats: bool,
    /// With `stats`: leave the lists out, so that events whose payload changes in place (the
    /// engine's in-block path) are compared too; a list append always rewrites the payload.
    pub no_lists: bool,
    pub sub: Option<SubSpec>,
    /// `match = { field = "type", ne = .. }`: events of this type are not the profile's.
    pub skip_type: Option<&'static str>,
}

impl Spec {
    pub fn gap_only(time: Time, idle_ms: i64) -> Spec {
        Spec {
            time,
            idle_ms,
            lateness_ms: 0,
            max_ms: None,
            starts: None,
            ends: None,
            split_camp: false,
            stats: false,
            no_lists: false,
            sub: None,
            skip_type: None,
        }
    }

    /// The events this profile sees (its `match`), arrival indices kept.
    pub fn matching(&self, evs: &[Ev]) -> Vec<Ev> {
        evs.iter()
            .filter(|e| Some(e.ty) != self.skip_type)
            .cloned()
            .collect()
    }

    fn has_rules(&self) -> bool {
        self.max_ms.is_some() || self.starts.is_some() || self.ends.is_some() || self.split_camp
    }

    /// The `[[profile]]` table (and its sub-tables) for this spec.
    pub fn toml(&self, name: &str) -> String {
        let mut t = format!(
            "[[profile]]\nname = \"{name}\"\nkey = \"user\"\ntime = \"{}\"\n\
             timestamp = {{ field = \"ts\", format = \"epoch_ms\" }}\nidle_timeout = \"{}ms\"\n",
            match self.time {
                Time::Processing => "processing",
                Time::Event => "event",
            },
            self.idle_ms
        );
        if let Some(ty) = self.skip_type {
            t += &format!("match = {{ field = \"type\", ne = \"{ty}\" }}\n");
        }
        if self.time == Time::Event {
            t += &format!("allowed_lateness = \"{}ms\"\n", self.lateness_ms);
        }
        if let Some(m) = self.max_ms {
            t += &format!("max_duration = \"{m}ms\"\n");
        }
        if let Some(s) = self.starts {
            t += &format!("starts_when = {{ field = \"type\", eq = \"{s}\" }}\n");
        }
        if let Some(s) = self.ends {
            t += &format!("ends_when = {{ field = \"type\", eq = \"{s}\" }}\n");
        }
        if self.split_camp {
            t += "split_on_change = [\"camp\"]\n";
        }
        if self.stats {
            t += "metadata = [\"ip\"]\nstate = [\"page\"]\n";
        }
        t += "[[profile.counter]]\nname = \"all\"\n";
        t +=
            "[[profile.counter]]\nname = \"clicks\"\nwhen = { field = \"type\", eq = \"click\" }\n";
        t += "[[profile.aggregate]]\nname = \"v_sum\"\nfield = \"v\"\nop = \"sum\"\n";
        t += "[[profile.aggregate]]\nname = \"v_min\"\nfield = \"v\"\nop = \"min\"\n\
              when = { field = \"type\", eq = \"click\" }\n";
        t += "[[profile.aggregate]]\nname = \"v_max\"\nfield = \"v\"\nop = \"max\"\n";
        if self.stats && !self.no_lists {
            t += "[[profile.list]]\nname = \"pages\"\nfield = \"page\"\nmax_len = 3\nunique = true\n";
            t += "[[profile.list]]\nname = \"camps\"\nfield = \"camp\"\nmax_len = 4\n\
                  when = { field = \"type\", eq = \"view\" }\n";
        }
        if let Some(sub) = &self.sub {
            t += &format!(
                "[[profile.sub_session]]\nname = \"tab\"\nkey = \"tab\"\nidle_timeout = \"{}ms\"\n",
                sub.idle_ms
            );
            if let Some(s) = sub.starts {
                t += &format!("starts_when = {{ field = \"type\", eq = \"{s}\" }}\n");
            }
            if let Some(s) = sub.ends {
                t += &format!("ends_when = {{ field = \"type\", eq = \"{s}\" }}\n");
            }
            t += "[[profile.sub_session.counter]]\nname = \"clicks\"\n\
                  when = { field = \"type\", eq = \"click\" }\n";
        }
        t
    }
}

/// One session the reference says must end.
#[derive(Clone, Debug, PartialEq)]
pub struct RefSession {
    pub key: u8,
    /// Arrival indices of its events, ascending.
    pub events: Vec<u32>,
    pub start_ts: i64,
    pub last_ts: i64,
    /// Every end reason the doc allows for it, sorted.
    pub reasons: Vec<&'static str>,
    pub subs: Vec<RefSub>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RefSub {
    pub tab: u8,
    pub events: Vec<u32>,
    pub start_ts: i64,
    pub last_ts: i64,
    pub clicks: u64,
    pub reasons: Vec<&'static str>,
}

/// A session being built: its events with the time the profile gave each.
struct Open<'a> {
    events: Vec<(&'a Ev, i64)>,
    start: i64,
    last: i64,
    camp: Option<u8>,
}

impl<'a> Open<'a> {
    fn new() -> Open<'a> {
        Open {
            events: Vec::new(),
            start: i64::MAX,
            last: i64::MIN,
            camp: None,
        }
    }

    fn push(&mut self, e: &'a Ev, t: i64) {
        self.events.push((e, t));
        self.start = self.start.min(t);
        self.last = self.last.max(t);
        if e.camp.is_some() {
            self.camp = e.camp;
        }
    }

    /// Reasons whose deadline the clock has passed (`deadline < clock`).
    fn passed(&self, spec: &Spec, clock: i64) -> BTreeSet<&'static str> {
        let mut r = BTreeSet::new();
        if self.last + spec.idle_ms < clock {
            r.insert(IDLE);
        }
        if spec.max_ms.is_some_and(|m| self.start + m < clock) {
            r.insert(MAX);
        }
        r
    }

    /// Reasons for a session still open when input ends with the clock at `clock`: its own timed
    /// reason if it is due, and also `end_of_input` when every deadline it passed is within the
    /// wheel's one-second slack.
    fn at_finish(&self, spec: &Spec, clock: i64) -> BTreeSet<&'static str> {
        let mut r = self.passed(spec, clock);
        let must_fire = self.last + spec.idle_ms < clock - WHEEL_SLACK_MS
            || spec
                .max_ms
                .is_some_and(|m| self.start + m < clock - WHEEL_SLACK_MS);
        if !must_fire {
            r.insert(EOI);
        }
        r
    }

    /// The boundary rule (in the doc's order of precedence) that keeps `e` at time `t` out of
    /// this session, if any.
    fn boundary(&self, spec: &Spec, e: &Ev, t: i64) -> Option<&'static str> {
        if t - self.last > spec.idle_ms {
            Some(IDLE)
        } else if spec.max_ms.is_some_and(|m| t - self.start > m) {
            Some(MAX)
        } else if spec.starts == Some(e.ty) {
            Some(STARTS)
        } else if spec.split_camp && e.camp.is_some() && self.camp.is_some() && e.camp != self.camp
        {
            Some(SPLIT)
        } else {
            None
        }
    }

    /// `close_clock`: the clock when the session ended (None: at end of input, `final_clock`).
    fn close(
        self,
        spec: &Spec,
        reasons: BTreeSet<&'static str>,
        close_clock: Option<i64>,
        final_clock: i64,
    ) -> RefSession {
        let e0 = self.events[0].0;
        let subs = match &spec.sub {
            Some(sub) => sub_sessions(sub, &self.events, close_clock, final_clock),
            None => Vec::new(),
        };
        let mut events: Vec<u32> = self.events.iter().map(|(e, _)| e.n).collect();
        events.sort_unstable();
        RefSession {
            key: e0.key,
            events,
            start_ts: self.start,
            last_ts: self.last,
            reasons: reasons.into_iter().collect(),
            subs,
        }
    }
}

/// Processing time in replay: an event's time is `max(previous, ts)` over the shard's arrivals.
pub fn processing(spec: &Spec, evs: &[Ev]) -> Vec<RefSession> {
    assert_eq!(spec.time, Time::Processing);
    let mut open: BTreeMap<u8, Open<'_>> = BTreeMap::new();
    let mut done = Vec::new();
    let mut clock = i64::MIN;
    for e in evs {
        clock = clock.max(e.ts);
        let t = clock;
        if let Some(cur) = open.get(&e.key) {
            if let Some(rule) = cur.boundary(spec, e, t) {
                let cur = open.remove(&e.key).expect("present");
                let mut reasons = cur.passed(spec, t);
                reasons.insert(rule);
                done.push(cur.close(spec, reasons, Some(t), t));
            }
        }
        let cur = open.entry(e.key).or_insert_with(Open::new);
        cur.push(e, t);
        if spec.ends == Some(e.ty) {
            let cur = open.remove(&e.key).expect("present");
            done.push(cur.close(spec, [ENDS].into(), Some(t), t));
        }
    }
    for (_, cur) in open {
        let reasons = cur.at_finish(spec, clock);
        done.push(cur.close(spec, reasons, None, clock));
    }
    done.sort_by_key(|s| s.events[0]);
    done
}

/// Event time in replay (no idle advance of the watermark). Returns the sessions and the arrival
/// indices of the late events. With `max_duration`, `starts_when`, `ends_when` or
/// `split_on_change` the input must be in order per key (the doc defines those boundaries on
/// arrival, which the sorted walk equals only then).
pub fn event_time(spec: &Spec, evs: &[Ev]) -> (Vec<RefSession>, BTreeSet<u32>) {
    assert_eq!(spec.time, Time::Event);
    // 1. The watermark at each arrival, and the late set.
    let mut max_ts: Option<i64> = None;
    let mut late = BTreeSet::new();
    let mut wm_at: Vec<i64> = Vec::with_capacity(evs.len());
    for e in evs {
        let wm = max_ts.map_or(i64::MIN, |m| m - spec.lateness_ms);
        wm_at.push(wm);
        if e.ts < wm {
            late.insert(e.n);
        } else {
            max_ts = Some(max_ts.map_or(e.ts, |m| m.max(e.ts)));
        }
    }
    let wm_final = max_ts.map_or(i64::MIN, |m| m - spec.lateness_ms);
    (by_time(spec, evs, &late, &wm_at, wm_final), late)
}

/// Event time on the wall clock (docs/semantics.md, "Time"): event `i` arrives at `wall[i]`
/// and, when `passes[i]` is set, an expiry pass runs at that wall time after it. The watermark
/// is `max_ts + idle_advance - lateness`, the idle advance being the wall time since the last
/// accepted event; an accepted event moves `max_ts` up to its time but no further than its
/// arrival; a pass keeps the watermark it ended sessions by (its idle advance joins
/// `max_ts`). End of input runs on the replay clock (no idle advance). The input must be gap
/// only (no rule boundaries). Also returns the watermark at each pass, by the index of the
/// event it follows.
pub fn event_time_wall(
    spec: &Spec,
    evs: &[Ev],
    wall: &[i64],
    passes: &[Option<i64>],
) -> (Vec<RefSession>, BTreeSet<u32>, BTreeMap<usize, i64>) {
    assert_eq!(spec.time, Time::Event);
    assert!(
        !spec.has_rules(),
        "reference: the wall clock is modelled for gap-only profiles"
    );
    let mut max_ts: Option<i64> = None;
    let mut wall_last = i64::MIN;
    let mut late = BTreeSet::new();
    let mut wm_at: Vec<i64> = Vec::with_capacity(evs.len());
    let mut pass_wm = BTreeMap::new();
    for (i, e) in evs.iter().enumerate() {
        let wm = max_ts.map_or(i64::MIN, |m| {
            m + (wall[i] - wall_last).max(0) - spec.lateness_ms
        });
        wm_at.push(wm);
        if e.ts < wm {
            late.insert(e.n);
        } else {
            let upto = e.ts.min(wall[i]);
            max_ts = Some(max_ts.map_or(upto, |m| m.max(upto)));
            wall_last = wall[i];
        }
        if let (Some(at), Some(m)) = (passes[i], max_ts) {
            let held = if at > wall_last {
                let held = m + (at - wall_last);
                wall_last = at;
                held
            } else {
                m
            };
            max_ts = Some(held);
            pass_wm.insert(i, held - spec.lateness_ms);
        }
    }
    let wm_final = max_ts.map_or(i64::MIN, |m| m - spec.lateness_ms);
    (by_time(spec, evs, &late, &wm_at, wm_final), late, pass_wm)
}

/// Event time, step 2: each key's accepted events in time order, split where the profile's
/// boundaries fall. `wm_at[i]`: the watermark when event `i` arrived; `wm_final`: at end of
/// input.
fn by_time(
    spec: &Spec,
    evs: &[Ev],
    late: &BTreeSet<u32>,
    wm_at: &[i64],
    wm_final: i64,
) -> Vec<RefSession> {
    // 2. Per key, the accepted events in time order (stable: equal times keep arrival order).
    let mut by_key: BTreeMap<u8, Vec<(usize, &Ev)>> = BTreeMap::new();
    for (i, e) in evs.iter().enumerate() {
        if !late.contains(&e.n) {
            by_key.entry(e.key).or_default().push((i, e));
        }
    }
    let mut done = Vec::new();
    for (_, mut list) in by_key {
        if spec.has_rules() {
            assert!(
                list.windows(2).all(|w| w[0].1.ts <= w[1].1.ts),
                "reference: rule boundaries are modelled for in-order-per-key input only"
            );
        }
        list.sort_by_key(|&(i, e)| (e.ts, i));
        let mut cur: Option<Open<'_>> = None;
        for (i, e) in list {
            let t = e.ts;
            if let Some(c) = cur.take() {
                match c.boundary(spec, e, t) {
                    // Not closed at once: the watermark closes it.
                    Some(IDLE) => {
                        let reasons = c.at_finish(spec, wm_final);
                        done.push(c.close(spec, reasons, None, wm_final));
                    }
                    // Closed at once when `e` arrives; the watermark may have closed it earlier.
                    Some(rule) => {
                        let mut reasons = c.passed(spec, wm_at[i]);
                        reasons.insert(rule);
                        done.push(c.close(spec, reasons, Some(t), t));
                    }
                    None => cur = Some(c),
                }
            }
            let c = cur.get_or_insert_with(Open::new);
            c.push(e, t);
            if spec.ends == Some(e.ty) {
                let c = cur.take().expect("present");
                done.push(c.close(spec, [ENDS].into(), Some(t), t));
            }
        }
        if let Some(c) = cur {
            let reasons = c.at_finish(spec, wm_final);
            done.push(c.close(spec, reasons, None, wm_final));
        }
    }
    done.sort_by_key(|s| s.events[0]);
    done
}

/// The sub-sessions of one parent session, walking its events (with their times) in order.
/// `close_clock` is the clock when the parent ended, or None when it ended at end of input
/// (clock `final_clock`, with the wheel's slack).
fn sub_sessions(
    sub: &SubSpec,
    parent: &[(&Ev, i64)],
    close_clock: Option<i64>,
    final_clock: i64,
) -> Vec<RefSub> {
    let mut open: BTreeMap<u8, RefSub> = BTreeMap::new();
    let mut done = Vec::new();
    for &(e, t) in parent {
        let tab = e.tab.expect("sub-session tests give every event a tab");
        if let Some(s) = open.get(&tab) {
            let reason = if t - s.last_ts > sub.idle_ms {
                Some(IDLE)
            } else if sub.starts == Some(e.ty) {
                Some(STARTS)
            } else {
                None
            };
            if let Some(r) = reason {
                let mut s = open.remove(&tab).expect("present");
                s.reasons = vec![r];
                done.push(s);
            }
        }
        if !open.contains_key(&tab) && (sub.starts.is_none() || sub.starts == Some(e.ty)) {
            open.insert(
                tab,
                RefSub {
                    tab,
                    events: Vec::new(),
                    start_ts: t,
                    last_ts: t,
                    clicks: 0,
                    reasons: Vec::new(),
                },
            );
        }
        if let Some(s) = open.get_mut(&tab) {
            s.events.push(e.n);
            s.last_ts = t;
            s.clicks += u64::from(e.ty == "click");
            if sub.ends == Some(e.ty) {
                let mut s = open.remove(&tab).expect("present");
                s.reasons = vec![ENDS];
                done.push(s);
            }
        }
    }
    for (_, mut s) in open {
        let deadline = s.last_ts + sub.idle_ms;
        s.reasons = match close_clock {
            Some(c) if deadline < c => vec![IDLE],
            Some(_) => vec![PARENT],
            // At end of input the engine says `end_of_input` where the doc's sub-session section
            // says `parent_ended`; both name the same cause, so either is accepted.
            None if deadline < final_clock - WHEEL_SLACK_MS => vec![IDLE],
            None if deadline < final_clock => vec![EOI, IDLE, PARENT],
            None => vec![EOI, PARENT],
        };
        done.push(s);
    }
    done.sort_by_key(|s| (s.tab, s.start_ts, s.events[0]));
    done
}

/// `metadata`, `state`, `counters`, `aggregates` and `lists` of a session_end record of a
/// `Spec::toml` profile, from the session's events in arrival order. Without `spec.stats` only
/// counters and aggregates (which merges combine exactly) are given.
pub fn expected_stats(spec: &Spec, events: &[&Ev]) -> Map<String, Value> {
    let num = |x: Option<i64>| x.map_or(Value::Null, |v| json!(v));
    let v_all = events.iter().filter_map(|e| e.v);
    let v_clicks = events
        .iter()
        .filter(|e| e.ty == "click")
        .filter_map(|e| e.v);
    let sum = events.iter().filter_map(|e| e.v).reduce(|a, b| a + b);
    let mut m = Map::new();
    m.insert(
        "counters".into(),
        json!({ "all": events.len(), "clicks": events.iter().filter(|e| e.ty == "click").count() }),
    );
    m.insert(
        "aggregates".into(),
        json!({ "v_sum": num(sum), "v_min": num(v_clicks.min()), "v_max": num(v_all.max()) }),
    );
    if spec.stats {
        m.insert(
            "metadata".into(),
            json!({ "ip": events.iter().find_map(|e| e.ip).map(|ip| format!("10.0.0.{ip}")) }),
        );
        let page = events
            .iter()
            .rev()
            .find_map(|e| e.page)
            .map(|p| format!("/p{p}"));
        m.insert("state".into(), json!({ "page": page }));
        let mut pages: Vec<String> = Vec::new();
        for p in events.iter().filter_map(|e| e.page) {
            let p = format!("/p{p}");
            if pages.len() < 3 && !pages.contains(&p) {
                pages.push(p);
            }
        }
        let camps: Vec<&str> = events
            .iter()
            .filter(|e| e.ty == "view")
            .filter_map(|e| e.camp.map(camp_name))
            .take(4)
            .collect();
        if !spec.no_lists {
            m.insert("lists".into(), json!({ "pages": pages, "camps": camps }));
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(n: u32, key: u8, ts: i64, ty: &'static str) -> Ev {
        Ev {
            n,
            key,
            ts,
            ty,
            camp: None,
            v: None,
            page: None,
            tab: Some(0),
            ip: Some(0),
        }
    }

    #[test]
    fn reference_splits_on_idle_plus_one_only() {
        let spec = Spec::gap_only(Time::Processing, 1000);
        let evs = [ev(0, 0, 0, "x"), ev(1, 0, 1000, "x"), ev(2, 0, 2001, "x")];
        let s = processing(&spec, &evs);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].events, vec![0, 1]);
        assert_eq!(s[0].reasons, vec![IDLE]);
        assert_eq!(s[1].events, vec![2]);
        assert_eq!(s[1].reasons, vec![EOI]);
    }

    #[test]
    fn reference_event_time_joins_out_of_order_islands() {
        let mut spec = Spec::gap_only(Time::Event, 1000);
        spec.lateness_ms = 5000;
        // 0 and 1800 are islands until 900 arrives and bridges them; 100 is late.
        let evs = [
            ev(0, 0, 0, "x"),
            ev(1, 0, 1800, "x"),
            ev(2, 0, 900, "x"),
            ev(3, 0, 8000, "x"),
            ev(4, 0, 100, "x"),
        ];
        let (s, late) = event_time(&spec, &evs);
        assert_eq!(late, [4].into());
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].events, vec![0, 1, 2]);
        // The final watermark 3000 passed 1800 + 1000 by less than the wheel's slack.
        assert_eq!(s[0].reasons, vec![EOI, IDLE]);
        assert_eq!(s[1].events, vec![3]);
    }
}
