//! The engine's acceptance test: property tests that drive the real engine (one shard, the real
//! decoder, on the replay clock or on a wall clock given per event) with generated event streams
//! and compare every session it ends with a brute-force reference model of docs/semantics.md
//! (`model/reference.rs`), or a wall-clock run with the replay the reference checks.
//!
//! Compared exactly: which events form each session (after `session_merged`), its key, times,
//! count, counters, aggregates, metadata, state and lists, sub-sessions, and the late set; the end
//! reason must be one the doc allows (a set only where the doc leaves timing open). The harness
//! (`model/harness.rs`) checks the structural promises on every run: one start and one end per
//! id, enriched events inside their session's lifetime, sub-sessions ending before their parent,
//! the table bound, and `Stats` agreeing with the records; and after every `advance`, sessions
//! more than the wheel's one-second slack past their deadline must have ended.
//!
//! A failing case panics with the config and the event lines; proptest then shrinks it, prints
//! the minimal input, and saves its seed in `tests/model/proptest-regressions.txt`, which later
//! runs replay first.

#[path = "model/harness.rs"]
mod harness;
#[path = "model/reference.rs"]
mod reference;

use harness::{header, run, run_wall, run_wall_at, Observed, Run};
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, FileFailurePersistence};
use reference::{expected_stats, Ev, RefSession, RefSub, Spec, SubSpec, Time, BASE_MS};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

// ---------------------------------------------------------------------------------------------
// Generation.
// ---------------------------------------------------------------------------------------------

/// How far an event lands after the previous event of its key.
#[derive(Clone, Copy, Debug)]
enum Gap {
    Zero,
    Small,
    Medium,
    IdleMinus1,
    Idle,
    IdlePlus1,
    Large,
    /// Before the latest event, placed as `Back` says (a step back for the monotone replay clock,
    /// or far-late for event time).
    Back,
}

/// A generated event before it is laid on a timeline (shrinks well: every part is independent).
#[derive(Clone, Copy)]
struct Raw {
    key: u8,
    gap: Gap,
    jitter: u16,
    ty: u8,
    camp: Option<u8>,
    v: Option<i64>,
    page: Option<u8>,
    tab: u8,
    ip: Option<u8>,
}

/// One line per event in proptest's "minimal failing input".
impl std::fmt::Debug for Raw {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "k{} {:?}/{} ty{} camp{:?} v{:?} page{:?} tab{} ip{:?}",
            self.key,
            self.gap,
            self.jitter,
            self.ty,
            self.camp,
            self.v,
            self.page,
            self.tab,
            self.ip
        )
    }
}

fn gap() -> impl Strategy<Value = Gap> {
    prop_oneof![
        3 => Just(Gap::Zero),
        10 => Just(Gap::Small),
        5 => Just(Gap::Medium),
        2 => Just(Gap::IdleMinus1),
        3 => Just(Gap::Idle),
        3 => Just(Gap::IdlePlus1),
        2 => Just(Gap::Large),
        1 => Just(Gap::Back),
    ]
}

fn raw() -> impl Strategy<Value = Raw> {
    (
        0u8..64,
        gap(),
        any::<u16>(),
        any::<u8>(),
        proptest::option::weighted(0.7, 0u8..3),
        proptest::option::weighted(0.8, -5i64..20),
        proptest::option::weighted(0.7, 0u8..5),
        0u8..3,
        proptest::option::weighted(0.8, 0u8..4),
    )
        .prop_map(|(key, gap, jitter, ty, camp, v, page, tab, ip)| Raw {
            key,
            gap,
            jitter,
            ty,
            camp,
            v,
            page,
            tab,
            ip,
        })
}

fn raws(max_len: usize) -> impl Strategy<Value = Vec<Raw>> {
    proptest::collection::vec(raw(), 1..max_len)
}

/// How `Gap::Back` events are placed.
#[derive(Clone, Copy, PartialEq)]
enum Back {
    /// Like `Gap::Zero`.
    None,
    /// Up to 0.7 s before the latest event (processing time: the replay clock holds).
    Step,
    /// This far (plus up to 1 s) before the latest event, arriving in generation order: with
    /// event time, late whatever the reordering.
    FarLate(i64),
}

/// Lay raw events on a timeline in generation order; `ts` never goes back except for
/// `Gap::Back` (see `Back`). Returns the events and, per event, the time it is "sent" (its `ts`,
/// or for a far-late event the latest time so far) for `arrive`. `types` is sampled by `Raw::ty`
/// (repeat an entry to weight it).
fn timeline(
    raws: &[Raw],
    keys: u8,
    idle: i64,
    types: &[&'static str],
    back: Back,
) -> (Vec<Ev>, Vec<i64>) {
    timeline_with(raws, keys, idle, types, back, false)
}

/// `timeline`; with `strict`, each key's times strictly increase (no ties within a key, so
/// "first" and "last" mean the same in arrival and in time order).
fn timeline_with(
    raws: &[Raw],
    keys: u8,
    idle: i64,
    types: &[&'static str],
    back: Back,
    strict: bool,
) -> (Vec<Ev>, Vec<i64>) {
    let mut latest = BASE_MS;
    let mut key_last: BTreeMap<u8, i64> = BTreeMap::new();
    let mut evs = Vec::with_capacity(raws.len());
    let mut sent = Vec::with_capacity(raws.len());
    for (n, r) in raws.iter().enumerate() {
        let key = r.key % keys;
        let prev = key_last.get(&key).copied().unwrap_or(latest);
        let j = i64::from(r.jitter);
        let want = match r.gap {
            Gap::Zero => prev,
            Gap::Small => prev + j % (idle / 4 + 1),
            Gap::Medium => prev + idle / 2 + j % (idle / 2 + 1),
            Gap::IdleMinus1 => prev + idle - 1,
            Gap::Idle => prev + idle,
            Gap::IdlePlus1 => prev + idle + 1,
            Gap::Large => prev + idle + j % (2 * idle),
            Gap::Back => match back {
                Back::None => prev,
                Back::Step => latest - j % 700,
                Back::FarLate(ms) => latest - ms - j % 1000,
            },
        };
        let backwards = matches!(r.gap, Gap::Back) && back != Back::None;
        let mut ts = if want >= latest || backwards {
            want
        } else {
            latest + j % 50
        };
        if strict && !backwards && key_last.contains_key(&key) {
            ts = ts.max(prev + 1);
        }
        sent.push(if backwards { latest } else { ts });
        latest = latest.max(ts);
        if !backwards {
            key_last.insert(key, ts);
        }
        evs.push(Ev {
            n: n as u32,
            key,
            ts,
            ty: types[usize::from(r.ty) % types.len()],
            camp: r.camp,
            v: r.v,
            page: r.page,
            tab: Some(r.tab),
            ip: r.ip,
        });
    }
    (evs, sent)
}

/// Reorder events into an arrival order: each arrives at `sent + delay`, where the delay is
/// drawn per event (`per_event`) or per key (keeps each key in order). Arrival indices are
/// renumbered.
fn arrive(evs: Vec<Ev>, sent: &[i64], delays: &[u16], scale_ms: i64, per_event: bool) -> Vec<Ev> {
    arrive_at(evs, sent, delays, scale_ms, per_event).0
}

/// `arrive`, with each event's arrival time (in arrival order, so never decreasing).
fn arrive_at(
    evs: Vec<Ev>,
    sent: &[i64],
    delays: &[u16],
    scale_ms: i64,
    per_event: bool,
) -> (Vec<Ev>, Vec<i64>) {
    let mut timed: Vec<(i64, Ev)> = evs
        .into_iter()
        .map(|e| {
            let d = if per_event {
                delays[e.n as usize % delays.len()]
            } else {
                delays[usize::from(e.key) % delays.len()]
            };
            (
                sent[e.n as usize] + i64::from(d) * scale_ms / i64::from(u16::MAX),
                e,
            )
        })
        .collect();
    timed.sort_by_key(|(at, e)| (*at, e.n));
    timed
        .into_iter()
        .enumerate()
        .map(|(n, (at, mut e))| {
            e.n = n as u32;
            (e, at)
        })
        .unzip()
}

// ---------------------------------------------------------------------------------------------
// Checking.
// ---------------------------------------------------------------------------------------------

fn lines(evs: &[Ev]) -> String {
    evs.iter().fold(String::new(), |mut s, e| {
        let _ = writeln!(s, "{}", e.line());
        s
    })
}

/// Run `f`; if it panics, panic again with the config and events appended, so the failure shows
/// the whole case (proptest then shrinks and prints the minimal one).
fn with_case<T>(toml: &str, evs: &[Ev], advance: &[bool], f: impl FnOnce() -> T) -> T {
    with_case_timed(toml, evs, advance, "", f)
}

/// `with_case`, the failure also showing `timing` (the clocks of a wall-clock run).
fn with_case_timed<T>(
    toml: &str,
    evs: &[Ev],
    advance: &[bool],
    timing: &str,
    f: impl FnOnce() -> T,
) -> T {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(t) => t,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let adv: Vec<usize> = (0..evs.len())
                .filter(|&i| advance.get(i).copied().unwrap_or(false))
                .collect();
            panic!("{msg}\n# --- config:\n{toml}# --- advance after events: {adv:?}\n{timing}# --- events (arrival order):\n{}", lines(evs));
        }
    }
}

fn num_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| num_eq(v, w)))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| num_eq(v, w))
        }
        _ => a == b,
    }
}

/// Compare the engine's ended sessions of `profile` with the reference, exactly.
fn compare(
    profile: &str,
    spec: &Spec,
    evs: &[Ev],
    refs: &[RefSession],
    late: &BTreeSet<u32>,
    o: &Observed,
) {
    compare_clocked(profile, spec, evs, refs, late, o, &BTreeMap::new());
}

/// `compare`, where `pass_clock` gives the profile's clock at the passes after some events (by
/// event index) when it is not the replay's (the wall clock's idle advance).
fn compare_clocked(
    profile: &str,
    spec: &Spec,
    evs: &[Ev],
    refs: &[RefSession],
    late: &BTreeSet<u32>,
    o: &Observed,
    pass_clock: &BTreeMap<usize, i64>,
) {
    let by_n: BTreeMap<u32, &Ev> = evs.iter().map(|e| (e.n, e)).collect();
    // Every non-late event is enriched exactly once; late ones never.
    let mut seen = BTreeSet::new();
    for e in o.enriched.iter().filter(|e| e.profile == profile) {
        assert!(
            seen.insert(e.n),
            "event n={} enriched twice by {profile}",
            e.n
        );
        assert!(!late.contains(&e.n), "late event n={} was enriched", e.n);
        assert_eq!(by_n[&e.n].ts, e.ts, "the enriched copy keeps ts");
    }
    let want: BTreeSet<u32> = evs
        .iter()
        .map(|e| e.n)
        .filter(|n| !late.contains(n))
        .collect();
    assert_eq!(
        seen, want,
        "enriched events (left) vs accepted events (right)"
    );
    let late_here: BTreeSet<u32> = o
        .late_records
        .iter()
        .filter(|(p, _)| p == profile)
        .map(|(_, n)| *n)
        .collect();
    assert_eq!(
        late_here, *late,
        "late events of {profile}: engine (left) vs reference (right)"
    );

    // Sessions never span an idle gap (times as the profile saw them: the replay clock is the
    // running maximum of `ts` in processing time).
    let mut clock = i64::MIN;
    let time_of: BTreeMap<u32, i64> = evs
        .iter()
        .map(|e| {
            clock = clock.max(e.ts);
            (
                e.n,
                if spec.time == Time::Processing {
                    clock
                } else {
                    e.ts
                },
            )
        })
        .collect();

    let finals = o.finals(profile);
    for (id, es) in &finals {
        let mut ts: Vec<i64> = es.iter().map(|e| time_of[&e.n]).collect();
        ts.sort_unstable();
        let end = o.end(id);
        let (first, last) = (end["start_ts"].as_i64(), end["last_ts"].as_i64());
        assert!(
            first <= ts.first().copied() && ts.last().copied() <= last,
            "events at {ts:?} resolve to session {id} spanning [{first:?}, {last:?}]"
        );
        assert!(
            ts.windows(2).all(|w| w[1] - w[0] <= spec.idle_ms),
            "session {id} spans an idle gap: {ts:?}"
        );
    }
    let got: BTreeMap<Vec<u32>, &str> = finals
        .iter()
        .map(|(id, es)| (es.iter().map(|e| e.n).collect(), id.as_str()))
        .collect();
    let exp: BTreeMap<Vec<u32>, &RefSession> = refs.iter().map(|r| (r.events.clone(), r)).collect();
    if got.keys().ne(exp.keys()) {
        let only_got: Vec<_> = got.keys().filter(|k| !exp.contains_key(*k)).collect();
        let only_exp: Vec<_> = exp.keys().filter(|k| !got.contains_key(*k)).collect();
        panic!(
            "session membership differs ({} engine vs {} reference sessions)\n  engine only (event n's): {only_got:?}\n  reference only: {only_exp:?}",
            got.len(),
            exp.len()
        );
    }
    for (events, r) in &exp {
        let id = got[events];
        let end = o.end(id);
        let what = format!("session {id} (events {events:?}): {end}");
        assert_eq!(end["key"], format!("k{}", r.key), "{what}");
        assert_eq!(end["start_ts"], r.start_ts, "start_ts; {what}");
        assert_eq!(end["last_ts"], r.last_ts, "last_ts; {what}");
        assert_eq!(end["count"], events.len(), "count; {what}");
        let reason = end["reason"].as_str().unwrap_or("");
        assert!(
            r.reasons.contains(&reason),
            "reason `{reason}` is not one of {:?}; {what}",
            r.reasons
        );
        let members: Vec<&Ev> = events.iter().map(|n| by_n[n]).collect();
        for (k, v) in expected_stats(spec, &members) {
            assert!(
                num_eq(&end[&k], &v),
                "{k}: engine {} vs reference {v}; {what}",
                end[&k]
            );
        }
        if !o.merged(id) {
            let seqs: Vec<u64> = finals[id].iter().map(|e| e.seq).collect();
            let one_to_n: Vec<u64> = (1..=events.len() as u64).collect();
            assert_eq!(
                seqs, one_to_n,
                "seq of an unmerged session is 1..=count in arrival order; {what}"
            );
        }
        if spec.sub.is_some() {
            compare_subs(id, &r.subs, o);
        }
    }
    check_timely(spec, evs, refs, late, o, &got, pass_clock);
}

/// After each `advance`, every session more than the wheel's one-second slack past its deadline
/// (by the profile's clock then: the replay clock, or the watermark; `pass_clock` where given)
/// has ended.
fn check_timely(
    spec: &Spec,
    evs: &[Ev],
    refs: &[RefSession],
    late: &BTreeSet<u32>,
    o: &Observed,
    got: &BTreeMap<Vec<u32>, &str>,
    pass_clock: &BTreeMap<usize, i64>,
) {
    for &(at, written) in &o.advances {
        let seen = evs
            .iter()
            .filter(|e| e.n as usize <= at && !late.contains(&e.n));
        let clock = match spec.time {
            _ if pass_clock.contains_key(&at) => Some(pass_clock[&at]),
            Time::Processing => seen.map(|e| e.ts).max(),
            Time::Event => seen.map(|e| e.ts).max().map(|m| m - spec.lateness_ms),
        };
        let Some(clock) = clock else { continue };
        for r in refs
            .iter()
            .filter(|r| r.events.iter().all(|&n| n as usize <= at))
        {
            let deadline =
                (r.last_ts + spec.idle_ms).min(spec.max_ms.map_or(i64::MAX, |m| r.start_ts + m));
            if deadline < clock - reference::WHEEL_SLACK_MS {
                let id = got[&r.events];
                let end_pos = o.sessions[id].end_pos.expect("final sessions end");
                assert!(
                    end_pos < written,
                    "session {id} (events {:?}, deadline {deadline}) still open after advance at clock {clock} (after event {at})",
                    r.events
                );
            }
        }
    }
}

fn compare_subs(parent: &str, refs: &[RefSub], o: &Observed) {
    type Row = (String, i64, i64, u64, u64);
    let mut got: Vec<(Row, &str, &Value)> = o
        .subs
        .iter()
        .filter(|s| s.parent == parent)
        .map(|s| {
            let e = &s.end;
            let row = (
                s.tab.clone(),
                e["start_ts"].as_i64().unwrap_or(-1),
                e["last_ts"].as_i64().unwrap_or(-1),
                e["count"].as_u64().unwrap_or(0),
                e["counters"]["clicks"].as_u64().unwrap_or(u64::MAX),
            );
            (row, e["reason"].as_str().unwrap_or(""), e)
        })
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let mut exp: Vec<(Row, &RefSub)> = refs
        .iter()
        .map(|r| {
            (
                (
                    format!("t{}", r.tab),
                    r.start_ts,
                    r.last_ts,
                    r.events.len() as u64,
                    r.clicks,
                ),
                r,
            )
        })
        .collect();
    exp.sort_by(|a, b| a.0.cmp(&b.0));
    let got_rows: Vec<&Row> = got.iter().map(|g| &g.0).collect();
    let exp_rows: Vec<&Row> = exp.iter().map(|e| &e.0).collect();
    assert_eq!(
        got_rows, exp_rows,
        "sub-sessions of {parent} (tab, start, last, count, clicks): engine (left) vs reference (right); reference: {refs:?}"
    );
    for ((_, reason, e), (_, r)) in got.iter().zip(&exp) {
        assert!(
            r.reasons.contains(reason),
            "sub-session reason `{reason}` not in {:?}: {e}",
            r.reasons
        );
    }
}

fn config(header: &str, specs: &[(&str, &Spec)]) -> String {
    let mut t = header.to_string();
    for (name, spec) in specs {
        t += &spec.toml(name);
    }
    t
}

/// Run one profile on `evs` and compare with the reference.
fn check_one(spec: &Spec, evs: &[Ev], advance: &[bool]) {
    check_many(&[("p", spec)], evs, advance);
}

/// Run several profiles in one engine on `evs`; each sees the events its `match` accepts and
/// must behave exactly as if it ran alone.
fn check_many(specs: &[(&str, &Spec)], evs: &[Ev], advance: &[bool]) {
    let toml = config(&header(4096, "evict_oldest"), specs);
    with_case(&toml, evs, advance, || {
        let r = run(&toml, evs, advance);
        let o = Observed::new(&r);
        assert!(o.dead.is_empty(), "unexpected dead letters: {:?}", o.dead);
        let unmatched = evs
            .iter()
            .filter(|e| specs.iter().all(|(_, s)| Some(e.ty) == s.skip_type))
            .count();
        assert_eq!(
            o.passthrough, unmatched,
            "events no profile matches pass through"
        );
        let mut late_all = BTreeSet::new();
        for (name, spec) in specs {
            let mine = spec.matching(evs);
            let (refs, late) = match spec.time {
                Time::Processing => (reference::processing(spec, &mine), BTreeSet::new()),
                Time::Event => reference::event_time(spec, &mine),
            };
            compare(name, spec, &mine, &refs, &late, &o);
            late_all.extend(late);
        }
        assert_eq!(
            o.late_set(),
            late_all,
            "late events: engine (left) vs reference (right)"
        );
    });
}

/// Run one gap-only event-time profile on the wall clock, `evs` arriving at `wall` and expiry
/// passes at `passes` (see `harness::run_wall_at`), and compare with the reference's watermark
/// on the wall clock.
fn check_wall(spec: &Spec, evs: &[Ev], wall: &[i64], passes: &[Option<i64>]) {
    let toml = config(&header(4096, "evict_oldest"), &[("p", spec)]);
    let advance: Vec<bool> = passes.iter().map(Option::is_some).collect();
    let timing = format!(
        "# --- arrival times (wall ms - {BASE_MS}): {:?}\n# --- passes (event index, wall ms - {BASE_MS}): {:?}\n",
        wall.iter().map(|w| w - BASE_MS).collect::<Vec<_>>(),
        passes
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.map(|p| (i, p - BASE_MS)))
            .collect::<Vec<_>>()
    );
    with_case_timed(&toml, evs, &advance, &timing, || {
        let r = run_wall_at(&toml, evs, wall, passes);
        let o = Observed::new(&r);
        assert!(o.dead.is_empty(), "unexpected dead letters: {:?}", o.dead);
        let (refs, late, pass_clock) = reference::event_time_wall(spec, evs, wall, passes);
        compare_clocked("p", spec, evs, &refs, &late, &o, &pass_clock);
        assert_eq!(
            o.late_set(),
            late,
            "late events: engine (left) vs reference (right)"
        );
    });
}

/// A run's records, per key in the order written, with every session id replaced by the
/// session's place among its key's (`k3/0` is key `k3`'s first session, `k3/sub0` its first
/// sub-session) and the enriched events
/// without their own `ts`. Runs on different clocks issue different ids for the same sessions
/// (the wall clock sets a floor under the id sequence), and the ids decide the order in which
/// sessions ending together do (see below); on the wall clock the `ts` an event carries is not
/// its time.
fn per_key_records(run: &Run) -> BTreeMap<String, Vec<(sessionizer::config::Stream, Value)>> {
    fn rename(v: &mut Value, names: &BTreeMap<String, String>) {
        match v {
            Value::String(s) => {
                if let Some(name) = names.get(s.as_str()) {
                    *s = name.clone();
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|x| rename(x, names)),
            Value::Object(o) => o.values_mut().for_each(|x| rename(x, names)),
            _ => {}
        }
    }
    let mut names = BTreeMap::new();
    let mut per_key_count: BTreeMap<String, usize> = BTreeMap::new();
    for r in &run.records {
        let kind = if r.v["kind"] == "session_start" {
            ""
        } else if r.v["kind"] == "sub_session_start" {
            "sub"
        } else {
            continue;
        };
        let key = r.v["key"].as_str().expect("a start names its key");
        let n = per_key_count.entry(format!("{key}{kind}")).or_insert(0);
        let id = r.v["session_id"].as_str().expect("a start names its id");
        names.insert(id.to_string(), format!("{key}/{kind}{n}"));
        *n += 1;
    }
    let mut by_key: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for r in &run.records {
        let mut v = r.v.clone();
        let key = if r.stream == sessionizer::config::Stream::Events {
            v.as_object_mut()
                .expect("an event is an object")
                .remove("ts");
            v["user"].as_str().unwrap_or_default().to_string()
        } else {
            v["key"].as_str().unwrap_or_default().to_string()
        };
        rename(&mut v, &names);
        by_key.entry(key).or_default().push((r.stream, v));
    }
    // Sessions of a key ending together (one expiry pass, the finish) end in the order of
    // their wheel lanes or table slots, both set by the ids: compare such a run as a set.
    for records in by_key.values_mut() {
        let is_end = |r: &(sessionizer::config::Stream, Value)| {
            r.1["kind"] == "session_end" || r.1["kind"] == "sub_session_end"
        };
        let mut at = 0;
        while at < records.len() {
            let run = records[at..].iter().take_while(|r| is_end(r)).count();
            records[at..at + run].sort_by_key(|r| r.1.to_string());
            at += run.max(1);
        }
    }
    by_key
}

/// The engine on the wall clock (`carried` arriving at `wall`) writes, per key and in order,
/// the records of the replay of `replayed`, ids aside, with the same counters. The live run's
/// expiry passes run at the events' arrivals, or at `passes` (see `harness::run_wall_at`);
/// the replay's after the same events.
fn assert_wall_equals_replay(
    spec: &Spec,
    replayed: &[Ev],
    carried: &[Ev],
    wall: &[i64],
    advance: &[bool],
    passes: Option<&[Option<i64>]>,
) {
    let toml = config(&header(4096, "evict_oldest"), &[("p", spec)]);
    with_case(&toml, replayed, advance, || {
        let live = match passes {
            Some(passes) => {
                assert!(
                    (0..carried.len())
                        .all(|i| passes[i].is_some() == advance.get(i).copied().unwrap_or(false)),
                    "passes after the events the replay advances after"
                );
                run_wall_at(&toml, carried, wall, passes)
            }
            None => run_wall(&toml, carried, wall, advance),
        };
        let replay = run(&toml, replayed, advance);
        assert_eq!(format!("{:?}", live.stats), format!("{:?}", replay.stats));
        let (l, r) = (per_key_records(&live), per_key_records(&replay));
        assert_eq!(
            l.keys().collect::<Vec<_>>(),
            r.keys().collect::<Vec<_>>(),
            "keys with records"
        );
        for (key, lv) in &l {
            let rv = &r[key];
            if let Some(i) = (0..lv.len().max(rv.len())).find(|&i| lv.get(i) != rv.get(i)) {
                panic!(
                    "key {key}: wall clock (left) and replay (right) differ at its record {i} of {}/{}:\n{:?}\n{:?}",
                    lv.len(),
                    rv.len(),
                    lv.get(i),
                    rv.get(i)
                );
            }
        }
    });
}

/// Expiry passes after the events `advance` marks, each at a point of the gap between the
/// clock so far (the latest arrival) and the next arrival (`into_gap`, a fraction of it in
/// 1/65535ths), the last up to `tail` ms after it. A clock that steps back (the next arrival
/// earlier) gets its pass at the latest arrival. (A comparison with a replay takes no tail: the
/// replay ends at its last event's clock, which a pass beyond it would have passed.)
fn gap_passes(wall: &[i64], advance: &[bool], into_gap: &[u16], tail: i64) -> Vec<Option<i64>> {
    let mut latest = i64::MIN;
    (0..wall.len())
        .map(|i| {
            latest = latest.max(wall[i]);
            advance.get(i).copied().unwrap_or(false).then(|| {
                let next = wall
                    .get(i + 1)
                    .copied()
                    .unwrap_or(latest + tail)
                    .max(latest);
                let f = i64::from(into_gap[i % into_gap.len()]);
                latest + (next - latest) * f / i64::from(u16::MAX)
            })
        })
        .collect()
}

/// `cases` per property, or `MODEL_CASES` when set: a long campaign runs the same properties
/// deeper (`MODEL_CASES=20000 cargo test --release --test model`).
fn prop_config(cases: u32) -> PropConfig {
    let cases = std::env::var("MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    PropConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/model/proptest-regressions.txt",
        ))),
        ..PropConfig::default()
    }
}

/// Event indices after which the test calls `advance` (the wheel runs there).
fn advance_schedule() -> impl Strategy<Value = BTreeSet<usize>> {
    proptest::collection::btree_set(0usize..200, 0..24)
}

fn schedule(at: &BTreeSet<usize>) -> Vec<bool> {
    (0..200).map(|i| at.contains(&i)).collect()
}

/// A profile with every boundary rule, counters, aggregates, metadata, state and lists (unless
/// `lists` is false), on `time`.
fn every_rule(
    time: Time,
    idle: i64,
    max_mul: Option<i64>,
    starts: bool,
    ends: bool,
    split: bool,
    lists: bool,
) -> Spec {
    Spec {
        max_ms: max_mul.map(|m| m * idle + idle / 3),
        starts: starts.then_some("start"),
        ends: ends.then_some("end"),
        split_camp: split,
        stats: true,
        no_lists: !lists,
        ..Spec::gap_only(time, idle)
    }
}

/// A processing-time profile with one sub-session kind keyed by `tab`, opened and closed by
/// event type, with a shorter idle timeout; parents end on logout or idle.
fn sub_session_case() -> impl Strategy<Value = (Spec, Vec<Ev>, Vec<bool>)> {
    (
        raws(160),
        1u8..=3,
        2_000i64..20_000,
        1i64..=4,
        (any::<bool>(), any::<bool>()),
        advance_schedule(),
    )
        .prop_map(
            |(raws, keys, idle, sub_idle_div, (starts, ends), advance)| {
                let spec = Spec {
                    ends: Some("logout"),
                    sub: Some(SubSpec {
                        idle_ms: idle / sub_idle_div,
                        starts: starts.then_some("open"),
                        ends: ends.then_some("close"),
                    }),
                    ..Spec::gap_only(Time::Processing, idle)
                };
                let types = ["click", "click", "view", "open", "open", "close", "logout"];
                let (evs, _) = timeline(&raws, keys, idle, &types, Back::None);
                (spec, evs, schedule(&advance))
            },
        )
}

/// A processing-time case: a profile with every boundary rule, counters, aggregates, metadata,
/// state and (some of the time) lists; in-order events with a few steps back that the monotone
/// clock absorbs; where `advance` runs.
fn processing_case() -> impl Strategy<Value = (Spec, Vec<Ev>, Vec<bool>)> {
    (
        raws(160),
        1u8..=5,
        1_000i64..20_000,
        proptest::option::of(1i64..4),
        (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        advance_schedule(),
    )
        .prop_map(
            |(raws, keys, idle, max_mul, (starts, ends, split, lists), advance)| {
                let spec = every_rule(Time::Processing, idle, max_mul, starts, ends, split, lists);
                let types = ["click", "click", "click", "view", "view", "start", "end"];
                let (evs, _) = timeline(&raws, keys, idle, &types, Back::Step);
                (spec, evs, schedule(&advance))
            },
        )
}

// ---------------------------------------------------------------------------------------------
// Properties.
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(prop_config(200))]

    /// a) Processing time, in-order arrival (with a few steps back that the monotone replay clock
    /// absorbs): every boundary rule, counters, aggregates, metadata, state and lists.
    #[test]
    fn processing_time_matches_reference((spec, evs, advance) in processing_case()) {
        check_one(&spec, &evs, &advance);
    }

    /// b) Event time, out of order within (and some beyond) the allowed lateness, gap-only
    /// profile: islands merge, far-late events are reported late and never join.
    #[test]
    fn event_time_out_of_order_matches_reference(
        raws in raws(160),
        keys in 1u8..=4,
        idle in 1_000i64..20_000,
        lateness_mul in 0i64..=2,
        delays in proptest::collection::vec(any::<u16>(), 1..64),
        delay_mul in 0i64..=3,
        advance in advance_schedule(),
    ) {
        let mut spec = Spec::gap_only(Time::Event, idle);
        spec.lateness_ms = lateness_mul * idle + idle / 2;
        let far = spec.lateness_ms + idle;
        let (evs, sent) = timeline(&raws, keys, idle, &["click", "view"], Back::FarLate(far));
        // Delays up to 1.5x lateness: most arrive within it, some are late.
        let evs = arrive(evs, &sent, &delays, delay_mul * spec.lateness_ms / 2, true);
        check_one(&spec, &evs, &schedule(&advance));
    }

    /// c) Event time, in order per key but interleaved across keys (each key lags by its own
    /// delay, so some keys' events are late): max_duration, starts_when, ends_when, split.
    #[test]
    fn event_time_in_order_per_key_matches_reference(
        raws in raws(160),
        keys in 1u8..=5,
        idle in 1_000i64..20_000,
        lateness_mul in 0i64..=2,
        max_mul in proptest::option::of(1i64..4),
        starts in any::<bool>(),
        ends in any::<bool>(),
        split in any::<bool>(),
        lists in any::<bool>(),
        key_delays in proptest::collection::vec(any::<u16>(), 5),
        advance in advance_schedule(),
    ) {
        let spec = Spec {
            lateness_ms: lateness_mul * idle,
            ..every_rule(Time::Event, idle, max_mul, starts, ends, split, lists)
        };
        let types = ["click", "click", "view", "view", "start", "end"];
        let (evs, sent) = timeline_with(&raws, keys, idle, &types, Back::None, true);
        let evs = arrive(evs, &sent, &key_delays, spec.lateness_ms * 3 / 2 + 1, false);
        check_one(&spec, &evs, &schedule(&advance));
    }

    /// h) Processing time on the wall clock, as the appliance runs it: an event's time is its
    /// arrival, whatever `ts` it carries. Each key's records, in order, equal those of the
    /// replay of the same events stamped with their arrival times (which (a) checks against the
    /// reference), ids aside, and so do the counters; on the wall clock too `on_event`,
    /// `on_batch` and the bounded expiry agree (`run_wall`). The live run's expiry passes run
    /// in the gaps between arrivals, as the shard's timer runs them: whether a pass or the
    /// key's next event ends a session changes no key's records.
    #[test]
    fn processing_time_on_the_wall_clock_equals_the_replay_of_arrivals(
        (spec, arrivals, sched) in processing_case(),
        skew in any::<i32>(),
        into_gap in proptest::collection::vec(any::<u16>(), 1..32),
    ) {
        let wall: Vec<i64> = arrivals.iter().map(|e| e.ts).collect();
        let carried: Vec<Ev> = arrivals
            .iter()
            .map(|e| Ev {
                ts: e.ts + i64::from(skew) * (i64::from(e.n % 7) - 3),
                ..e.clone()
            })
            .collect();
        let passes = gap_passes(&wall, &sched, &into_gap, 0);
        assert_wall_equals_replay(&spec, &arrivals, &carried, &wall, &sched, Some(&passes));
    }

    /// i) Event time on a wall clock that reads the newest event time seen (a source whose
    /// clock agrees with its events and never idles): the watermark is the replay's, so each
    /// key's records, late events and merges included, equal the replay's, ids aside.
    #[test]
    fn event_time_on_a_wall_clock_at_the_newest_event_equals_the_replay(
        raws in raws(160),
        keys in 1u8..=4,
        idle in 1_000i64..20_000,
        lateness_mul in 0i64..=2,
        max_mul in proptest::option::of(1i64..4),
        rules in (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        delays in proptest::collection::vec(any::<u16>(), 1..64),
        delay_mul in 0i64..=3,
        advance in advance_schedule(),
    ) {
        let (starts, ends, split, lists) = rules;
        let spec = Spec {
            lateness_ms: lateness_mul * idle + idle / 2,
            ..every_rule(Time::Event, idle, max_mul, starts, ends, split, lists)
        };
        let far = spec.lateness_ms + idle;
        let types = ["click", "click", "view", "view", "start", "end"];
        let (evs, sent) = timeline(&raws, keys, idle, &types, Back::FarLate(far));
        let evs = arrive(evs, &sent, &delays, delay_mul * spec.lateness_ms / 2, true);
        let wall: Vec<i64> = evs
            .iter()
            .scan(i64::MIN, |newest, e| {
                *newest = (*newest).max(e.ts);
                Some(*newest)
            })
            .collect();
        assert_wall_equals_replay(&spec, &evs, &evs, &wall, &schedule(&advance), None);
    }

    /// k) Event time on a wall clock that runs on between arrivals, as live: each event arrives
    /// at its send time plus a delay of its own (out of order within and beyond the lateness),
    /// and expiry passes run in the gaps between arrivals, where the watermark advances with
    /// the wall clock alone (the idle advance) and ends quiet keys' sessions. Equal to the
    /// reference's watermark on the wall clock: sessions and their data, merges, the late set.
    #[test]
    fn event_time_with_the_idle_advance_matches_reference(
        raws in raws(160),
        keys in 1u8..=4,
        idle in 1_000i64..20_000,
        lateness_halves in 0i64..=4,
        delays in proptest::collection::vec(any::<u16>(), 1..64),
        delay_mul in 0i64..=3,
        advance in advance_schedule(),
        into_gap in proptest::collection::vec(any::<u16>(), 1..32),
    ) {
        let spec = Spec {
            lateness_ms: lateness_halves * idle / 2,
            ..Spec::gap_only(Time::Event, idle)
        };
        let far = spec.lateness_ms + idle;
        let (evs, sent) = timeline(&raws, keys, idle, &["click", "view"], Back::FarLate(far));
        let (evs, wall) = arrive_at(evs, &sent, &delays, (delay_mul * spec.lateness_ms / 2).max(idle / 4), true);
        let passes = gap_passes(&wall, &schedule(&advance), &into_gap, 3 * idle + spec.lateness_ms);
        check_wall(&spec, &evs, &wall, &passes);
    }

    /// d) Sub-sessions in a processing-time profile: one kind keyed by `tab`, opened and closed by
    /// event type, with a shorter idle timeout; parents end on logout or idle.
    #[test]
    fn sub_sessions_match_reference((spec, evs, advance) in sub_session_case()) {
        check_one(&spec, &evs, &advance);
    }

    /// j) Sub-sessions on the wall clock, as (h): each key's records, sub-session markers
    /// included, equal those of the replay of the events stamped with their arrival times.
    /// Passes run at arrivals: a pass in a gap ends an idle sub-session ahead of the key's next
    /// events, where the replay ends it after them (a key's sub-sessions end independently).
    #[test]
    fn sub_sessions_on_the_wall_clock_equal_the_replay_of_arrivals(
        (spec, arrivals, advance) in sub_session_case(),
    ) {
        let wall: Vec<i64> = arrivals.iter().map(|e| e.ts).collect();
        let carried: Vec<Ev> = arrivals.iter().map(|e| Ev { ts: 1, ..e.clone() }).collect();
        assert_wall_equals_replay(&spec, &arrivals, &carried, &wall, &advance, None);
    }
}

proptest! {
    #![proptest_config(prop_config(150))]

    /// g) Two profiles in one engine: a processing-time one that skips `view` events and an
    /// event-time one that sees everything. Each must behave exactly as if it ran alone.
    #[test]
    fn profiles_are_independent(
        raws in raws(120),
        keys in 1u8..=4,
        idle in 1_000i64..20_000,
        lateness_mul in 0i64..=2,
        delays in proptest::collection::vec(any::<u16>(), 1..32),
        advance in advance_schedule(),
    ) {
        let a = Spec {
            ends: Some("end"),
            skip_type: Some("view"),
            stats: true,
            ..Spec::gap_only(Time::Processing, idle)
        };
        let b = Spec {
            lateness_ms: lateness_mul * idle + idle / 2,
            ..Spec::gap_only(Time::Event, idle * 2 / 3)
        };
        let (evs, sent) = timeline(&raws, keys, idle, &["click", "view", "view", "end"], Back::None);
        // Mild reordering: the processing profile's replay clock absorbs it.
        let evs = arrive(evs, &sent, &delays, idle / 2, true);
        check_many(&[("a", &a), ("b", &b)], &evs, &schedule(&advance));
    }

    /// e) A tiny session table under many keys: with `evict_oldest` every event is admitted and
    /// every session still ends exactly once; with `reject` refused events are dead letters.
    #[test]
    fn full_table_evicts_or_rejects(
        raws in raws(200),
        keys in 8u8..40,
        max_sessions in 2u32..12,
        idle in 1_000i64..20_000,
        reject in any::<bool>(),
        advance in advance_schedule(),
    ) {
        let spec = Spec::gap_only(Time::Processing, idle);
        let (evs, _) = timeline(&raws, keys, idle / 4, &["click", "view"], Back::None);
        let on_full = if reject { "reject" } else { "evict_oldest" };
        let toml = config(&header(max_sessions, on_full), &[("p", &spec)]);
        let advance = schedule(&advance);
        with_case(&toml, &evs, &advance, || check_full_table(&spec, &evs, &advance, &toml, reject));
    }
}

/// Structural checks for a full table (there is no reference for which session the policy picks
/// beyond "closest to its deadline", checked with the wheel's one-second granularity).
fn check_full_table(spec: &Spec, evs: &[Ev], advance: &[bool], toml: &str, reject: bool) {
    let r = run(toml, evs, advance);
    let o = Observed::new(&r);
    let by_n: BTreeMap<u32, &Ev> = evs.iter().map(|e| (e.n, e)).collect();
    // Every event is enriched exactly once, or (reject only) dead-lettered exactly once.
    let mut fate: BTreeMap<u32, &str> = BTreeMap::new();
    for e in &o.enriched {
        assert!(
            fate.insert(e.n, "enriched").is_none(),
            "event n={} enriched twice",
            e.n
        );
    }
    for (reason, n) in &o.dead {
        assert_eq!(reason, "session_table_full", "dead letter n={n}");
        assert!(reject, "evict_oldest never refuses an event (n={n})");
        assert!(
            fate.insert(*n, "dead").is_none(),
            "event n={n} both enriched and dead-lettered (or dead twice)"
        );
    }
    assert_eq!(
        fate.len(),
        evs.len(),
        "every event is enriched or dead-lettered"
    );

    // Replay the records in order: live sessions with their last event time, per key.
    let mut live: BTreeMap<String, (String, i64)> = BTreeMap::new();
    let mut dead_iter = o.dead.iter().map(|(_, n)| *n).collect::<BTreeSet<u32>>();
    for rec in &r.records {
        let v = &rec.v;
        if let Some(s) = v.get("_session") {
            let id = s["id"].as_str().expect("id").to_string();
            let ts = v["ts"].as_i64().expect("ts");
            live.entry(id).or_insert((String::new(), ts)).1 = ts;
            continue;
        }
        match v["kind"].as_str() {
            Some("session_start") => {
                let id = v["session_id"].as_str().expect("id").to_string();
                live.insert(id, (v["key"].as_str().expect("key").into(), i64::MIN));
            }
            Some("session_end") => {
                let id = v["session_id"].as_str().expect("id");
                let (_, last) = live.remove(id).expect("ended a live session");
                if v["reason"] == "evicted" {
                    let min_last = live.values().map(|l| l.1).min().unwrap_or(i64::MAX);
                    assert_eq!(
                        live.len() as u32 + 1,
                        r.max_sessions,
                        "evicted only when the table is full: {v}"
                    );
                    assert!(
                        last <= min_last + 1000,
                        "evict_oldest picked a session (last event {last}) while one idle since {min_last} was live: {v}"
                    );
                }
            }
            Some("dead_letter") => {
                let n = v["event"]["n"].as_u64().expect("n") as u32;
                assert!(dead_iter.remove(&n));
                let key = by_n[&n].key_str();
                assert!(
                    !live.values().any(|l| l.0 == key),
                    "event n={n} refused although its key has a live session: {v}"
                );
                assert_eq!(
                    live.len() as u32,
                    r.max_sessions,
                    "refused while the table had room: {v}"
                );
            }
            _ => {}
        }
    }

    // Per key, the admitted events split into contiguous runs, one per session, with no idle gap
    // inside a run and a justified boundary between runs.
    let finals = o.finals("p");
    let mut runs: BTreeMap<u8, Vec<(&str, Vec<u32>)>> = BTreeMap::new();
    for (id, es) in &finals {
        let ns: Vec<u32> = es.iter().map(|e| e.n).collect();
        assert!(!ns.is_empty(), "session {id} ended without events");
        runs.entry(by_n[&ns[0]].key)
            .or_default()
            .push((id.as_str(), ns));
    }
    for (key, mut rs) in runs {
        rs.sort_by_key(|r| r.1[0]);
        let admitted: Vec<u32> = evs
            .iter()
            .filter(|e| e.key == key && fate[&e.n] == "enriched")
            .map(|e| e.n)
            .collect();
        let concat: Vec<u32> = rs.iter().flat_map(|r| r.1.iter().copied()).collect();
        assert_eq!(
            concat, admitted,
            "sessions of k{key} are not contiguous runs of its events"
        );
        for (j, (id, ns)) in rs.iter().enumerate() {
            let end = o.end(id);
            let ts: Vec<i64> = ns.iter().map(|n| by_n[n].ts).collect();
            assert_eq!(end["start_ts"], ts[0], "{end}");
            assert_eq!(end["last_ts"], *ts.last().expect("non-empty"), "{end}");
            assert_eq!(end["count"], ns.len(), "{end}");
            assert!(
                ts.windows(2).all(|w| w[1] - w[0] <= spec.idle_ms),
                "a session spans an idle gap: {end}"
            );
            let seqs: Vec<u64> = finals[*id].iter().map(|e| e.seq).collect();
            assert_eq!(
                seqs,
                (1..=ns.len() as u64).collect::<Vec<_>>(),
                "seq: {end}"
            );
            let next = rs.get(j + 1).map(|r| by_n[&r.1[0]].ts);
            match end["reason"].as_str().unwrap_or("") {
                "evicted" => assert!(!reject, "reject never evicts: {end}"),
                "idle" => {
                    if let Some(t) = next {
                        assert!(
                            t - ts[ts.len() - 1] > spec.idle_ms,
                            "ended idle but the next event was within idle: {end}"
                        );
                    }
                }
                "end_of_input" => assert!(
                    next.is_none(),
                    "end_of_input before the key's last session: {end}"
                ),
                other => panic!("unexpected reason {other}: {end}"),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// f) Deterministic cases.
// ---------------------------------------------------------------------------------------------

fn ev(n: u32, key: u8, offset_ms: i64, ty: &'static str) -> Ev {
    Ev {
        n,
        key,
        ts: BASE_MS + offset_ms,
        ty,
        camp: None,
        v: None,
        page: None,
        tab: Some(0),
        ip: Some(0),
    }
}

/// An event exactly `idle` after the previous one stays in the session; `idle + 1` splits. Both
/// time modes, with and without the wheel running in between.
#[test]
fn idle_boundary_is_inclusive() {
    for time in [Time::Processing, Time::Event] {
        for advance in [false, true] {
            let spec = Spec::gap_only(time, 1000);
            let evs = [
                ev(0, 0, 0, "x"),
                ev(1, 0, 1000, "x"),
                ev(2, 0, 2001, "x"),
                ev(3, 0, 3001, "x"),
            ];
            let adv = vec![advance; evs.len()];
            check_one(&spec, &evs, &adv);
            let toml = config(&header(64, "evict_oldest"), &[("p", &spec)]);
            let o = Observed::new(&run(&toml, &evs, &adv));
            let mut groups: Vec<Vec<u32>> = o
                .finals("p")
                .values()
                .map(|es| es.iter().map(|e| e.n).collect())
                .collect();
            groups.sort();
            assert_eq!(
                groups,
                vec![vec![0, 1], vec![2, 3]],
                "{time:?} advance={advance}"
            );
        }
    }
}

/// max_duration: exactly `max` after the start stays, one more millisecond splits.
#[test]
fn max_duration_boundary_is_inclusive() {
    let spec = Spec {
        max_ms: Some(1500),
        ..Spec::gap_only(Time::Processing, 1000)
    };
    let evs = [
        ev(0, 0, 0, "x"),
        ev(1, 0, 800, "x"),
        ev(2, 0, 1500, "x"),
        ev(3, 0, 2300, "x"),
        ev(4, 0, 3001, "x"),
    ];
    check_one(&spec, &evs, &[]);
    let refs = reference::processing(&spec, &evs);
    let groups: Vec<&[u32]> = refs.iter().map(|r| r.events.as_slice()).collect();
    assert_eq!(groups, vec![&[0, 1, 2][..], &[3, 4][..]]);
}

/// The reference itself: one out-of-order event bridging two islands merges them.
#[test]
fn bridging_event_merges_islands() {
    let mut spec = Spec::gap_only(Time::Event, 1000);
    spec.lateness_ms = 10_000;
    let evs = [ev(0, 0, 0, "x"), ev(1, 0, 1800, "x"), ev(2, 0, 900, "x")];
    check_one(&spec, &evs, &[]);
    let toml = config(&header(64, "evict_oldest"), &[("p", &spec)]);
    let o = Observed::new(&run(&toml, &evs, &[]));
    assert_eq!(
        o.sessions
            .values()
            .filter(|s| s.absorbed_by.is_some())
            .count(),
        1,
        "one merge"
    );
    let f = o.finals("p");
    assert_eq!(f.len(), 1);
    let (id, _) = f.iter().next().expect("one");
    assert_eq!(o.end(id)["count"], 3);
}

/// Sub-sessions: an open sub-session whose own idle timeout passed ends (reason idle) when the
/// next event of its parent session arrives. (Minimal case found by `sub_sessions_match_reference`.)
#[test]
fn sub_session_idles_out_inside_its_parent() {
    let spec = Spec {
        sub: Some(SubSpec {
            idle_ms: 1000,
            starts: None,
            ends: None,
        }),
        ..Spec::gap_only(Time::Processing, 2000)
    };
    let tab = |mut e: Ev, t: u8| {
        e.tab = Some(t);
        e
    };
    let evs = [
        tab(ev(0, 0, 0, "click"), 0),
        tab(ev(1, 0, 1000, "click"), 1),
        tab(ev(2, 0, 1001, "click"), 0),
    ];
    check_one(&spec, &evs, &[]);
}

/// `on_full = "evict_oldest"` ends the session closest to its deadline, also before the wheel has
/// ever been advanced. (Minimal case found by `full_table_evicts_or_rejects`: with two slots,
/// k0 idle since 0 must be evicted for k2, not k1 which was active at 1001.)
#[test]
fn evict_oldest_picks_the_session_closest_to_its_deadline() {
    let spec = Spec::gap_only(Time::Processing, 8000);
    let evs = [
        ev(0, 0, 0, "click"),
        ev(1, 1, 1001, "click"),
        ev(2, 2, 1001, "click"),
    ];
    for advance in [false, true] {
        let toml = config(&header(2, "evict_oldest"), &[("p", &spec)]);
        let adv = vec![advance; evs.len()];
        with_case(&toml, &evs, &adv, || {
            check_full_table(&spec, &evs, &adv, &toml, false)
        });
    }
}

/// Event time: a missing, malformed or too-far-future timestamp dead-letters the event with
/// `bad_timestamp` (in replay, "too far" is measured from the profile's `max_ts`).
#[test]
fn bad_timestamps_are_dead_letters() {
    let spec = Spec {
        lateness_ms: 1000,
        ..Spec::gap_only(Time::Event, 5000)
    };
    let toml = config(&header(64, "evict_oldest"), &[("p", &spec)])
        .replace("[limits]\n", "[limits]\nfuture_skew_max = \"10s\"\n");
    let t = BASE_MS;
    let lines: Vec<String> = [
        format!(r#"{{"n":0,"user":"k0","ts":{t}}}"#),
        r#"{"n":1,"user":"k0"}"#.to_string(),
        r#"{"n":2,"user":"k0","ts":"soon"}"#.to_string(),
        format!(r#"{{"n":3,"user":"k0","ts":{}}}"#, t + 10_001),
        format!(r#"{{"n":4,"user":"k0","ts":{}}}"#, t + 10_000),
        r#"{"n":5,"user":"k0","ts":null}"#.to_string(),
    ]
    .into();
    let o = Observed::new(&harness::run_lines(&toml, &lines, &[]));
    let dead: Vec<(&str, u32)> = o.dead.iter().map(|(r, n)| (r.as_str(), *n)).collect();
    assert_eq!(
        dead,
        [
            ("bad_timestamp", 1),
            ("bad_timestamp", 2),
            ("bad_timestamp", 3),
            ("bad_timestamp", 5)
        ]
    );
    let enriched: Vec<u32> = o.enriched.iter().map(|e| e.n).collect();
    assert_eq!(enriched, [0, 4]);
}

/// Recovery from a snapshot taken part-way and the log after it (`harness::live_and_recovered`)
/// writes what the live run wrote after the cut. With passes run at once, record for record;
/// with passes in steps (the live run's mass expiry goes on at later steps, the recovery ends
/// at the first record all that was due), the same records, and in the same order within each
/// session and among the records of no session (late events, dead letters).
fn check_recovery(
    toml: &str,
    evs: &[Ev],
    wall: &[i64],
    passes: &[Option<i64>],
    cut: u16,
    steps: bool,
) {
    let lines: Vec<String> = evs.iter().map(Ev::line).collect();
    let advance: Vec<bool> = passes.iter().map(Option::is_some).collect();
    let timing = format!(
        "# --- arrival times (wall ms - {BASE_MS}): {:?}\n# --- passes (event index, wall ms - {BASE_MS}): {:?}\n# --- log cut at {cut}/65535 of the records, passes in steps: {steps}\n",
        wall.iter().map(|w| w - BASE_MS).collect::<Vec<_>>(),
        passes
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.map(|p| (i, p - BASE_MS)))
            .collect::<Vec<_>>()
    );
    with_case_timed(toml, evs, &advance, &timing, || {
        // The records the log will hold: at most one pass before each event and one per step.
        let most = 2 * evs.len() + passes.iter().flatten().count();
        let cut = most * usize::from(cut) / usize::from(u16::MAX);
        let end = wall
            .iter()
            .chain(passes.iter().flatten())
            .max()
            .copied()
            .unwrap_or(BASE_MS)
            + 86_400_000;
        let r = harness::live_and_recovered(toml, &lines, wall, passes, cut, steps, end);
        let text = |recs: &[harness::Rec]| -> Vec<String> {
            recs.iter()
                .map(|r| format!("{:?} {}", r.stream, r.v))
                .collect()
        };
        let (live, recovered) = (text(&r.live), text(&r.recovered));
        if !steps {
            if let Some(i) =
                (0..live.len().max(recovered.len())).find(|&i| live.get(i) != recovered.get(i))
            {
                let window = |v: &[String]| {
                    v[i.saturating_sub(3).min(v.len())..(i + 3).min(v.len())].to_vec()
                };
                panic!(
                    "live and recovered records differ at {i} (of {} and {}), after {:?} replayed:\nlive: {:#?}\nrecovered: {:#?}",
                    live.len(),
                    recovered.len(),
                    r.replayed,
                    window(&live),
                    window(&recovered)
                );
            }
            return;
        }
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        assert_eq!(
            sorted(live.clone()),
            sorted(recovered.clone()),
            "live (left) vs recovered (right), any order"
        );
        let by_session = |recs: &[harness::Rec]| {
            let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for r in recs {
                let id = r.v["session_id"]
                    .as_str()
                    .or_else(|| r.v["_session"]["id"].as_str())
                    .unwrap_or("-");
                m.entry(id.to_string())
                    .or_default()
                    .push(format!("{:?} {}", r.stream, r.v));
            }
            m
        };
        assert_eq!(
            by_session(&r.live),
            by_session(&r.recovered),
            "live (left) vs recovered (right), per session"
        );
    });
}

proptest! {
    #![proptest_config(prop_config(150))]

    /// l) Event time on the wall clock, out of order, every boundary rule, passes in the gaps,
    /// a table that may be full: recovery from a snapshot and the log (which records the passes
    /// the watermark depends on) writes what the live run wrote, late verdicts included.
    #[test]
    fn recovery_from_the_log_equals_the_live_run_in_event_time(
        raws in raws(120),
        keys in 1u8..=5,
        idle in 1_000i64..20_000,
        lateness_halves in 0i64..=4,
        max_mul in proptest::option::of(1i64..4),
        rules in (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()),
        delays in proptest::collection::vec(any::<u16>(), 1..64),
        delay_mul in 0i64..=3,
        advance in advance_schedule(),
        into_gap in proptest::collection::vec(any::<u16>(), 1..32),
        (cut, steps, tight) in (any::<u16>(), any::<bool>(), any::<bool>()),
    ) {
        let (starts, ends, split, lists) = rules;
        let spec = Spec {
            lateness_ms: lateness_halves * idle / 2,
            ..every_rule(Time::Event, idle, max_mul, starts, ends, split, lists)
        };
        let types = ["click", "click", "click", "view", "view", "start", "end"];
        let far = spec.lateness_ms + idle;
        let (evs, sent) = timeline(&raws, keys, idle, &types, Back::FarLate(far));
        let (evs, wall) = arrive_at(evs, &sent, &delays, (delay_mul * spec.lateness_ms / 2).max(idle / 4), true);
        let passes = gap_passes(&wall, &schedule(&advance), &into_gap, 3 * idle + spec.lateness_ms);
        let sessions = if tight { 6 } else { 4096 };
        let toml = config(&header(sessions, "evict_oldest"), &[("p", &spec)]);
        check_recovery(&toml, &evs, &wall, &passes, cut, steps);
    }

    /// m) The same for processing time: every boundary rule, or sub-sessions.
    #[test]
    fn recovery_from_the_log_equals_the_live_run_in_processing_time(
        (spec, evs, sched) in prop_oneof![processing_case(), sub_session_case()],
        into_gap in proptest::collection::vec(any::<u16>(), 1..32),
        (cut, steps, tight) in (any::<u16>(), any::<bool>(), any::<bool>()),
    ) {
        let wall: Vec<i64> = evs.iter().map(|e| e.ts).collect();
        let passes = gap_passes(&wall, &sched, &into_gap, 3 * spec.idle_ms);
        let sessions = if tight { 6 } else { 4096 };
        let toml = config(&header(sessions, "evict_oldest"), &[("p", &spec)]);
        check_recovery(&toml, &evs, &wall, &passes, cut, steps);
    }
}
