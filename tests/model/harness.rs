//! Drives the real engine the way `replay` does (one shard, `Clock::Replay`; or on a wall clock
//! given per event, as the appliance runs), parses every record
//! it writes with serde_json, and rebuilds from them what the engine claims happened: sessions
//! with their end markers, the events enriched into each (resolved through `session_merged`),
//! sub-sessions, late events and dead letters. It also checks the structural promises that hold
//! whatever the input: one start and one end (or one merge) per id, enriched events only inside
//! their session's lifetime, sub-sessions ending before their parent, stats matching records.

use serde_json::Value;
use sessionizer::config::{Config, Stream};
use sessionizer::decode::{Decoder, Event, Parsed};
use sessionizer::engine::rules::{ProfileId, Rules};
use sessionizer::engine::{route, Clock, Engine, Out, Route};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::reference::Ev;

/// Small per-test memory so hundreds of proptest cases stay fast in debug builds.
pub fn header(max_sessions: u32, on_full: &str) -> String {
    format!(
        "[memory]\narena_bytes = \"256KiB\"\nmax_sessions = {max_sessions}\non_full = \"{on_full}\"\n\
         [slots]\nmax = 256\n[limits]\nopen_sessions_per_key_max = 32\n"
    )
}

/// A record as the engine wrote it, with its position in the output.
#[derive(Clone, Debug)]
pub struct Rec {
    pub pos: usize,
    pub stream: Stream,
    pub v: Value,
}

pub struct Run {
    pub records: Vec<Rec>,
    /// (index of the event after which `advance` ran, number of records written by then).
    pub advances: Vec<(usize, usize)>,
    pub stats: sessionizer::engine::Stats,
    pub max_sessions: u32,
}

/// Feed `evs` in order; after event i, call `advance` when `advance_after[i]` (missing = false).
pub fn run(toml: &str, evs: &[Ev], advance_after: &[bool]) -> Run {
    let lines: Vec<String> = evs.iter().map(Ev::line).collect();
    run_lines(toml, &lines, advance_after)
}

/// `run` on raw JSON lines (which must decode). The lines go through the engine twice, one
/// `on_event` call per event and in `on_batch` batches (cut at each advance): both must give
/// the same records, in the same order, and the same counters.
///
/// A third run expires in bounded steps (`advance_bounded` once per advance, `finish_bounded`,
/// into an output batch with no reserved room, so most steps stop early and put due sessions
/// back): it must end the same sessions with the same records, in whatever order.
pub fn run_lines(toml: &str, lines: &[String], advance_after: &[bool]) -> Run {
    run_clocked(toml, lines, None, advance_after)
}

/// `run` on the wall clock, as the appliance runs: event `i` arrives at `wall[i]` (epoch ms),
/// and the advance after it runs at that time too. The same three runs, compared alike.
pub fn run_wall(toml: &str, evs: &[Ev], wall: &[i64], advance_after: &[bool]) -> Run {
    assert_eq!(evs.len(), wall.len(), "one arrival time per event");
    let lines: Vec<String> = evs.iter().map(Ev::line).collect();
    run_clocked(toml, &lines, Some(wall), advance_after)
}

/// `run_wall` with expiry passes at wall times of their own: after event `i`, one at
/// `advance_at[i]` (no earlier than `wall[i]`; the next arrival may read an earlier clock, as
/// after a step back of the host's) when it is set. Between arrivals the clock runs on with no
/// input, so event-time watermarks advance while it is quiet.
pub fn run_wall_at(toml: &str, evs: &[Ev], wall: &[i64], advance_at: &[Option<i64>]) -> Run {
    assert_eq!(evs.len(), wall.len(), "one arrival time per event");
    assert_eq!(
        evs.len(),
        advance_at.len(),
        "one advance time (or none) per event"
    );
    for (i, at) in advance_at.iter().enumerate() {
        if let Some(at) = *at {
            assert!(
                wall[i] <= at,
                "a pass after event {i} runs no earlier than it"
            );
        }
    }
    let lines: Vec<String> = evs.iter().map(Ev::line).collect();
    let advance_after: Vec<bool> = advance_at.iter().map(Option::is_some).collect();
    let passes: Vec<i64> = advance_at
        .iter()
        .zip(wall)
        .map(|(at, &w)| at.unwrap_or(w))
        .collect();
    run_clocked_at(toml, &lines, Some(wall), Some(&passes), &advance_after)
}

fn run_clocked(toml: &str, lines: &[String], wall: Option<&[i64]>, advance_after: &[bool]) -> Run {
    run_clocked_at(toml, lines, wall, wall, advance_after)
}

/// `passes[i]`: the wall time of the pass after event `i` (with `wall`).
fn run_clocked_at(
    toml: &str,
    lines: &[String],
    wall: Option<&[i64]>,
    passes: Option<&[i64]>,
    advance_after: &[bool],
) -> Run {
    let clocks = Clocks { wall, passes };
    let single = run_mode(toml, lines, clocks, advance_after, Mode::Single);
    let batched = run_mode(toml, lines, clocks, advance_after, Mode::Batched);
    let bounded = run_mode(toml, lines, clocks, advance_after, Mode::Bounded);
    let sorted = |run: &Run| {
        let mut v: Vec<String> = run
            .records
            .iter()
            .map(|r| format!("{:?} {}", r.stream, r.v))
            .collect();
        v.sort();
        v
    };
    let (a, b) = (sorted(&single), sorted(&bounded));
    if a != b {
        let only = |x: &[String], y: &[String]| -> Vec<String> {
            x.iter().filter(|r| !y.contains(r)).cloned().collect()
        };
        panic!(
            "bounded expiry ends other sessions or writes other records:\nonly unbounded: {:#?}\nonly bounded: {:#?}",
            only(&a, &b),
            only(&b, &a)
        );
    }
    assert_eq!(
        single.records.len(),
        batched.records.len(),
        "on_batch emits as many records"
    );
    for (a, b) in single.records.iter().zip(&batched.records) {
        assert_eq!(
            (a.stream, &a.v),
            (b.stream, &b.v),
            "on_batch differs at record {}",
            a.pos
        );
    }
    assert_eq!(single.advances, batched.advances);
    assert_eq!(
        format!("{:?}", single.stats),
        format!("{:?}", batched.stats)
    );
    single
}

/// The clocks a run gives the engine: none (replay), or per event its arrival and the time of
/// the pass after it.
#[derive(Clone, Copy)]
struct Clocks<'a> {
    wall: Option<&'a [i64]>,
    passes: Option<&'a [i64]>,
}

impl Clocks<'_> {
    /// The clock of event `i`.
    fn event(&self, i: usize) -> Clock {
        self.wall.map_or(Clock::Replay, |w| Clock::Wall(w[i]))
    }

    /// The clock of the pass after event `i`.
    fn pass(&self, i: usize) -> Clock {
        self.passes.map_or(Clock::Replay, |w| Clock::Wall(w[i]))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One `on_event` call per event.
    Single,
    /// `on_batch` batches cut at each advance.
    Batched,
    /// As `Single`, with bounded expiry and finish.
    Bounded,
}

/// The config, rules and decoder of a test's TOML.
fn compile(toml: &str) -> (Config, Arc<Rules>, Decoder) {
    let cfg =
        Config::from_toml(toml).unwrap_or_else(|e| panic!("test config is invalid: {e}\n{toml}"));
    let rules = Arc::new(Rules::compile(&cfg).expect("valid rules"));
    let dec = Decoder::new(
        rules.field_table(),
        cfg.limits.json_depth_max,
        cfg.limits.line_bytes_max as usize,
    );
    (cfg, rules, dec)
}

/// Move what `out` holds to `records`, parsed.
fn drain(out: &mut Out, records: &mut Vec<Rec>) {
    for (stream, line) in out.iter() {
        assert_eq!(line.last(), Some(&b'\n'), "records end with a newline");
        let v: Value = serde_json::from_slice(line).unwrap_or_else(|e| {
            panic!(
                "record is not JSON ({e}): {}",
                String::from_utf8_lossy(line)
            )
        });
        records.push(Rec {
            pos: records.len(),
            stream,
            v,
        });
    }
    out.clear();
}

fn run_mode(
    toml: &str,
    lines: &[String],
    clocks: Clocks<'_>,
    advance_after: &[bool],
    mode: Mode,
) -> Run {
    let batched = mode == Mode::Batched;
    let clock = |i: usize| clocks.event(i);
    let (cfg, rules, mut dec) = compile(toml);
    let mut engine = Engine::new(rules.clone(), &cfg, 0, None).expect("engine reserves its memory");
    let mut out = if mode == Mode::Bounded {
        Out::with_capacity(0, 0)
    } else {
        Out::with_capacity(1 << 16, 1024)
    };
    let mut records = Vec::new();
    let mut profiles: Vec<ProfileId> = Vec::new();
    let mut advances = Vec::new();
    if batched {
        let parsed: Vec<Parsed> = lines
            .iter()
            .map(|line| {
                let mut p = Parsed::new(dec.table(), line.len());
                dec.decode_into(line.as_bytes(), &mut p)
                    .unwrap_or_else(|err| panic!("decode {line}: {err}"));
                p
            })
            .collect();
        let table = dec.table();
        let mut items: Vec<(ProfileId, Event<'_>)> = Vec::new();
        // A batch takes one clock: it ends where the clock changes.
        let mut batch_clock = if lines.is_empty() {
            Clock::Replay
        } else {
            clock(0)
        };
        for (i, line) in lines.iter().enumerate() {
            let ev = parsed[i].event(line.as_bytes(), table);
            if clock(i) != batch_clock {
                engine.on_batch(&items, batch_clock, &mut out);
                items.clear();
                batch_clock = clock(i);
            }
            let before = items.len();
            items.extend(rules.matching(&ev).map(|p| (p, ev)));
            if items.len() == before {
                // A pass-through goes out in order with what the engine emits around it.
                engine.on_batch(&items, batch_clock, &mut out);
                items.clear();
                out.passthrough(ev.raw());
            }
            let advanced = advance_after.get(i).copied().unwrap_or(false);
            if advanced || i + 1 == lines.len() {
                engine.on_batch(&items, batch_clock, &mut out);
                items.clear();
            }
            if advanced {
                engine.advance(clocks.pass(i), &mut out);
                drain(&mut out, &mut records);
                advances.push((i, records.len()));
            }
        }
        drain(&mut out, &mut records);
        engine.finish(&mut out);
        drain(&mut out, &mut records);
        assert_eq!(engine.live_sessions(), 0, "finish ends every session");
        return Run {
            records,
            advances,
            stats: engine.stats().clone(),
            max_sessions: cfg.memory.max_sessions,
        };
    }
    for (i, line) in lines.iter().enumerate() {
        let ev = dec
            .decode(line.as_bytes())
            .unwrap_or_else(|err| panic!("decode {line}: {err}"));
        profiles.clear();
        profiles.extend(rules.matching(&ev));
        if profiles.is_empty() {
            out.passthrough(ev.raw());
        }
        for &p in &profiles {
            match route(&rules, p, &ev, 1) {
                Route::Owner(0) => engine.on_event(p, &ev, clock(i), &mut out),
                r => panic!("generated events always have a short key: {r:?}"),
            }
        }
        let advanced = advance_after.get(i).copied().unwrap_or(false);
        // A bounded step may leave due sessions for later: no promise to check after it.
        let mut complete = advanced;
        if advanced && mode == Mode::Bounded {
            complete = !engine.advance_bounded(clocks.pass(i), &mut out).left;
        } else if advanced {
            engine.advance(clocks.pass(i), &mut out);
        }
        drain(&mut out, &mut records);
        if complete {
            advances.push((i, records.len()));
        }
    }
    if mode == Mode::Bounded {
        while engine.finish_bounded(&mut out) {
            drain(&mut out, &mut records);
        }
    } else {
        engine.finish(&mut out);
    }
    drain(&mut out, &mut records);
    assert_eq!(engine.live_sessions(), 0, "finish ends every session");
    Run {
        records,
        advances,
        stats: engine.stats().clone(),
        max_sessions: cfg.memory.max_sessions,
    }
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v[k].as_str()
        .unwrap_or_else(|| panic!("record lacks string `{k}`: {v}"))
}

fn i(v: &Value, k: &str) -> i64 {
    v[k].as_i64()
        .unwrap_or_else(|| panic!("record lacks integer `{k}`: {v}"))
}

/// An enriched copy of an event.
#[derive(Clone, Debug)]
pub struct Enriched {
    pub n: u32,
    pub ts: i64,
    pub profile: String,
    pub id: String,
    pub seq: u64,
}

/// A top-level session as the records tell it.
#[derive(Clone, Debug, Default)]
pub struct Session {
    pub id: String,
    pub profile: String,
    pub key: String,
    pub end_pos: Option<usize>,
    pub end: Option<Value>,
    /// The survivor of the merge that absorbed it.
    pub absorbed_by: Option<String>,
    /// Ids it absorbed (directly).
    pub absorbed: Vec<String>,
}

#[derive(Clone, Debug)]
pub struct Sub {
    pub parent: String,
    pub tab: String,
    pub end: Value,
}

/// Everything the records say, indexed.
pub struct Observed {
    pub sessions: BTreeMap<String, Session>,
    pub enriched: Vec<Enriched>,
    pub subs: Vec<Sub>,
    /// (profile, arrival index) of `late_event` records.
    pub late_records: Vec<(String, u32)>,
    /// (reason, arrival index) of dead letters.
    pub dead: Vec<(String, u32)>,
    pub passthrough: usize,
    /// Copied from `Run::advances`.
    pub advances: Vec<(usize, usize)>,
}

impl Observed {
    /// Parse and check the structural promises. Panics with a message on any violation.
    pub fn new(run: &Run) -> Observed {
        let mut o = Observed {
            sessions: BTreeMap::new(),
            enriched: Vec::new(),
            subs: Vec::new(),
            late_records: Vec::new(),
            dead: Vec::new(),
            passthrough: 0,
            advances: run.advances.clone(),
        };
        let mut sub_starts: BTreeMap<String, (String, String)> = BTreeMap::new();
        // Live top-level sessions plus sub-sessions, to check the table bound.
        let mut live = 0u32;
        for r in &run.records {
            let v = &r.v;
            if let Some(sess) = v.get("_session") {
                assert_eq!(
                    r.stream,
                    Stream::Events,
                    "enriched events go to the events stream: {v}"
                );
                let id = s(sess, "id").to_string();
                let ses = o
                    .sessions
                    .get(&id)
                    .unwrap_or_else(|| panic!("enriched event before its session_start: {v}"));
                assert!(
                    ses.end_pos.is_none() && ses.absorbed_by.is_none(),
                    "enriched event after its session ended: {v}"
                );
                assert_eq!(s(sess, "profile"), ses.profile, "{v}");
                assert_eq!(
                    s(v, "user"),
                    ses.key,
                    "enriched into a session of another key: {v}"
                );
                o.enriched.push(Enriched {
                    n: i(v, "n") as u32,
                    ts: i(v, "ts"),
                    profile: ses.profile.clone(),
                    id,
                    seq: sess["seq"]
                        .as_u64()
                        .unwrap_or_else(|| panic!("no seq: {v}")),
                });
                continue;
            }
            let kind = v.get("kind").and_then(Value::as_str);
            match (r.stream, kind) {
                (Stream::Markers, Some("session_start")) => {
                    let id = s(v, "session_id").to_string();
                    let prev = o.sessions.insert(
                        id.clone(),
                        Session {
                            id: id.clone(),
                            profile: s(v, "profile").into(),
                            key: s(v, "key").into(),
                            ..Session::default()
                        },
                    );
                    assert!(prev.is_none(), "session id {id} started twice");
                    live += 1;
                }
                (Stream::Markers, Some("session_end")) => {
                    let id = s(v, "session_id");
                    let ses = o
                        .sessions
                        .get_mut(id)
                        .unwrap_or_else(|| panic!("session_end without session_start: {v}"));
                    assert!(ses.end_pos.is_none(), "session {id} ended twice: {v}");
                    assert!(
                        ses.absorbed_by.is_none(),
                        "session {id} ended after it was absorbed: {v}"
                    );
                    assert_eq!(
                        (s(v, "profile"), s(v, "key")),
                        (ses.profile.as_str(), ses.key.as_str()),
                        "{v}"
                    );
                    assert_eq!(
                        i(v, "duration_ms"),
                        i(v, "last_ts") - i(v, "start_ts"),
                        "{v}"
                    );
                    assert!(i(v, "count") >= 1, "{v}");
                    ses.end_pos = Some(r.pos);
                    ses.end = Some(v.clone());
                    live -= 1;
                }
                (Stream::Markers, Some("session_merged")) => {
                    let (keep, gone) = (
                        s(v, "session_id").to_string(),
                        s(v, "absorbed_session_id").to_string(),
                    );
                    for id in [&keep, &gone] {
                        let ses = o
                            .sessions
                            .get(id)
                            .unwrap_or_else(|| panic!("merge names an unknown session: {v}"));
                        assert!(
                            ses.end_pos.is_none() && ses.absorbed_by.is_none(),
                            "merge of a closed session: {v}"
                        );
                        assert_eq!(
                            (s(v, "profile"), s(v, "key")),
                            (ses.profile.as_str(), ses.key.as_str()),
                            "{v}"
                        );
                    }
                    assert_ne!(keep, gone, "{v}");
                    o.sessions.get_mut(&gone).expect("checked").absorbed_by = Some(keep.clone());
                    o.sessions
                        .get_mut(&keep)
                        .expect("checked")
                        .absorbed
                        .push(gone);
                    live -= 1;
                }
                (Stream::Markers, Some("sub_session_start")) => {
                    let id = s(v, "session_id").to_string();
                    let parent = s(v, "parent_session_id").to_string();
                    let p = o
                        .sessions
                        .get(&parent)
                        .unwrap_or_else(|| panic!("sub-session of an unknown parent: {v}"));
                    assert!(
                        p.end_pos.is_none(),
                        "sub-session started in an ended parent: {v}"
                    );
                    let tab = v["sub_key"].as_str().unwrap_or("").to_string();
                    let prev = sub_starts.insert(id.clone(), (parent, tab));
                    assert!(prev.is_none(), "sub-session {id} started twice");
                    assert!(
                        !o.sessions.contains_key(&id),
                        "sub-session id {id} is also a session id"
                    );
                    live += 1;
                }
                (Stream::Markers, Some("sub_session_end")) => {
                    let id = s(v, "session_id").to_string();
                    let (parent, tab) = sub_starts.remove(&id).unwrap_or_else(|| {
                        panic!("sub_session_end without sub_session_start (or twice): {v}")
                    });
                    assert_eq!(s(v, "parent_session_id"), parent, "{v}");
                    assert_eq!(v["sub_key"].as_str().unwrap_or(""), tab, "{v}");
                    let p = &o.sessions[&parent];
                    assert!(
                        p.end_pos.is_none(),
                        "sub_session_end after its parent's session_end: {v}"
                    );
                    o.subs.push(Sub {
                        parent,
                        tab,
                        end: v.clone(),
                    });
                    live -= 1;
                }
                (Stream::Late, Some("late_event")) => {
                    assert!(
                        i(v, "ts") < i(v, "watermark"),
                        "late event not below the watermark: {v}"
                    );
                    o.late_records
                        .push((s(v, "profile").into(), i(&v["event"], "n") as u32));
                }
                (Stream::DeadLetter, Some("dead_letter")) => {
                    o.dead
                        .push((s(v, "reason").into(), i(&v["event"], "n") as u32));
                }
                (Stream::Events, None) => o.passthrough += 1,
                _ => panic!("unexpected record on {:?}: {v}", r.stream),
            }
            assert!(
                live <= run.max_sessions,
                "more than memory.max_sessions = {} live at record {}",
                run.max_sessions,
                r.pos
            );
        }
        assert!(
            sub_starts.is_empty(),
            "sub-sessions never ended: {sub_starts:?}"
        );
        for ses in o.sessions.values() {
            assert!(
                ses.end_pos.is_some() != ses.absorbed_by.is_some(),
                "session {} must end exactly once or be absorbed exactly once: {ses:?}",
                ses.id
            );
        }
        o.check_stats(run);
        o
    }

    fn check_stats(&self, run: &Run) {
        let st = &run.stats;
        let ends: Vec<&Value> = self
            .sessions
            .values()
            .filter_map(|s| s.end.as_ref())
            .collect();
        assert_eq!(
            st.sessions_started,
            self.sessions.len() as u64,
            "stats.sessions_started"
        );
        assert_eq!(st.enriched, self.enriched.len() as u64, "stats.enriched");
        assert_eq!(st.late, self.late_records.len() as u64, "stats.late");
        assert_eq!(
            st.merges,
            self.sessions
                .values()
                .filter(|s| s.absorbed_by.is_some())
                .count() as u64,
            "stats.merges"
        );
        assert_eq!(
            st.sub_sessions_started,
            self.subs.len() as u64,
            "stats.sub_sessions_started"
        );
        assert_eq!(
            st.sub_sessions_ended,
            self.subs.len() as u64,
            "stats.sub_sessions_ended"
        );
        let evicted = ends.iter().filter(|v| v["reason"] == "evicted").count() as u64;
        assert_eq!(st.evictions, evicted, "stats.evictions");
        let full = self
            .dead
            .iter()
            .filter(|(r, _)| r == "session_table_full")
            .count() as u64;
        assert_eq!(st.rejections, full, "stats.rejections");
        for (k, reason) in sessionizer::engine::EndReason::ALL.iter().enumerate() {
            let n = ends
                .iter()
                .filter(|v| v["reason"] == reason.label())
                .count() as u64;
            // Sub-session ends may be counted with the top-level ones; never fewer.
            assert!(
                st.sessions_ended[k] >= n,
                "stats.sessions_ended[{}] = {} < {n}",
                reason.label(),
                st.sessions_ended[k]
            );
        }
    }

    /// The survivor an id resolves to through merges.
    pub fn resolve<'a>(&'a self, mut id: &'a str) -> &'a str {
        while let Some(next) = self.sessions[id].absorbed_by.as_deref() {
            id = next;
        }
        id
    }

    /// Whether the session or any session it absorbed (transitively) took part in a merge.
    pub fn merged(&self, id: &str) -> bool {
        !self.sessions[id].absorbed.is_empty()
    }

    /// Final (ended) sessions of `profile`, each with its enriched events (arrival order).
    pub fn finals(&self, profile: &str) -> BTreeMap<String, Vec<&Enriched>> {
        let mut m: BTreeMap<String, Vec<&Enriched>> = BTreeMap::new();
        for ses in self.sessions.values() {
            if ses.profile == profile && ses.end.is_some() {
                m.insert(ses.id.clone(), Vec::new());
            }
        }
        for e in &self.enriched {
            if e.profile == profile {
                let root = self.resolve(&e.id).to_string();
                m.get_mut(&root)
                    .expect("resolved ids are ended sessions")
                    .push(e);
            }
        }
        for evs in m.values_mut() {
            evs.sort_by_key(|e| e.n);
        }
        m
    }

    pub fn end(&self, id: &str) -> &Value {
        self.sessions[id]
            .end
            .as_ref()
            .expect("a final session has an end")
    }

    /// Arrival indices of events reported late by any profile.
    pub fn late_set(&self) -> BTreeSet<u32> {
        let set: BTreeSet<&(String, u32)> = self.late_records.iter().collect();
        assert_eq!(
            set.len(),
            self.late_records.len(),
            "an event was reported late twice by one profile"
        );
        self.late_records.iter().map(|(_, n)| *n).collect()
    }
}

/// The snapshot body of `engine` with `log_seq` records of its log applied.
fn snapshot_of(engine: &Engine, log_seq: usize) -> rkyv::util::AlignedVec<16> {
    let meta = sessionizer::engine::snapshot::SnapshotMeta {
        shard: 0,
        shards: 1,
        generation: 1,
        wall_ms: 0,
        log_seq: log_seq as u64,
    };
    let mut bytes = rkyv::util::AlignedVec::<16>::new();
    engine.write_snapshot(&mut bytes, meta).expect("snapshot");
    bytes
}

/// A record of the log a shard keeps (`persist::log`): an event (its index) with its arrival
/// time, or an expiry pass with its time.
#[derive(Clone, Copy, Debug)]
enum Logged {
    Event(usize, i64),
    Pass(i64),
}

/// What the live run wrote after the cut, and what recovery from the cut wrote.
pub struct Recovered {
    pub live: Vec<Rec>,
    pub recovered: Vec<Rec>,
    /// Records of the log after the cut: (events, passes).
    pub replayed: (usize, usize),
}

/// The engine run live as a shard runs it, its log kept as the shard keeps it
/// (`PassRecorder`), and a recovery from a snapshot taken part-way: event `i` arrives at
/// `wall[i]`; when `passes[i]` is set a pass runs after it at that time, in `steps` (an output
/// batch with no room, so each step ends little and the next goes on a millisecond later, as
/// the shard's ticker does after delivering the batch) or at once. Once the log holds `cut`
/// records the engine is snapshotted; a second engine restored from the snapshot replays the
/// records after it as `runtime::durable::recover` does (each event at its time, a pass run to
/// its end at each pass record). The live run ends with a pass at `end`, logged as any other, so
/// every session ends. (A crash loses the passes still pending; the start-up pass of that
/// recovery then ends the same sessions, possibly in another order, and nothing live is left to
/// compare it with.)
pub fn live_and_recovered(
    toml: &str,
    lines: &[String],
    wall: &[i64],
    passes: &[Option<i64>],
    cut: usize,
    steps: bool,
    end: i64,
) -> Recovered {
    use sessionizer::persist::log::PassRecorder;
    use sessionizer::persist::snapshot_file::access_body;

    let (cfg, rules, mut dec) = compile(toml);
    let new_engine =
        || Engine::new(rules.clone(), &cfg, 0, None).expect("engine reserves its memory");
    let mut out = if steps {
        Out::with_capacity(0, 0)
    } else {
        Out::with_capacity(1 << 16, 1024)
    };
    let apply = |engine: &mut Engine, dec: &mut Decoder, out: &mut Out, line: &str, at: i64| {
        let ev = dec.decode(line.as_bytes()).expect("generated lines decode");
        let mut any = false;
        for p in rules.matching(&ev) {
            any = true;
            engine.on_event(p, &ev, Clock::Wall(at), out);
        }
        if !any {
            out.passthrough(ev.raw());
        }
    };
    // A pass as recovery runs it: to its end at one clock.
    let pass_to_end = |engine: &mut Engine, out: &mut Out, records: &mut Vec<Rec>, at: i64| {
        while engine.advance_bounded(Clock::Wall(at), out).left {
            drain(out, records);
        }
        drain(out, records);
    };

    let mut live = new_engine();
    let mut log: Vec<Logged> = Vec::new();
    let mut recorder = PassRecorder::default();
    // What the live run writes after the cut (cleared when the cut is taken).
    let mut after = Vec::new();
    let mut snapshot: Option<(rkyv::util::AlignedVec<16>, usize)> = None;
    // The cut: every record logged so far applied, nothing else; at the end at the latest.
    let take_cut = |engine: &Engine,
                    log: &[Logged],
                    snapshot: &mut Option<_>,
                    after: &mut Vec<Rec>,
                    end: bool| {
        if snapshot.is_none() && (log.len() >= cut || end) {
            after.clear();
            *snapshot = Some((snapshot_of(engine, log.len()), log.len()));
        }
    };
    take_cut(&live, &log, &mut snapshot, &mut after, false);
    // Each event and the pass after it; then, the input over, a last pass at `end`.
    for i in 0..=lines.len() {
        let pass_at = if let Some(line) = lines.get(i) {
            if let Some(at) = recorder.before_event() {
                log.push(Logged::Pass(at));
            }
            log.push(Logged::Event(i, wall[i]));
            apply(&mut live, &mut dec, &mut out, line, wall[i]);
            drain(&mut out, &mut after);
            take_cut(&live, &log, &mut snapshot, &mut after, false);
            passes[i]
        } else {
            take_cut(&live, &log, &mut snapshot, &mut after, true);
            Some(end)
        };
        let Some(mut at) = pass_at else { continue };
        loop {
            let pass = live.advance_bounded(Clock::Wall(at), &mut out);
            log.extend(recorder.after_pass(at, pass).map(Logged::Pass));
            drain(&mut out, &mut after);
            take_cut(&live, &log, &mut snapshot, &mut after, false);
            if !pass.left {
                break;
            }
            at += 1;
        }
    }

    let (bytes, from) = snapshot.expect("the cut is taken by the end");
    let mut rec = new_engine();
    let report = rec.restore_from(access_body(&bytes).expect("a valid archive"), 1, 0);
    assert_eq!(
        report.dropped(),
        0,
        "the restore takes every session: {report:?}"
    );
    assert!(
        snapshot_of(&rec, from)[..] == bytes[..],
        "the restored engine's snapshot differs from the one it was restored from"
    );
    let mut recovered = Vec::new();
    let mut replayed = (0, 0);
    for r in &log[from..] {
        match *r {
            Logged::Event(i, at) => {
                apply(&mut rec, &mut dec, &mut out, &lines[i], at);
                drain(&mut out, &mut recovered);
                replayed.0 += 1;
            }
            Logged::Pass(at) => {
                pass_to_end(&mut rec, &mut out, &mut recovered, at);
                replayed.1 += 1;
            }
        }
    }
    Recovered {
        live: after,
        recovered,
        replayed,
    }
}
