//! Deterministic examples of the engine's contract (docs/semantics.md); the exhaustive check
//! against a reference model is `tests/model.rs`.

use super::*;
use crate::config::{Config, Stream};
use crate::decode::Decoder;

struct Rig {
    engine: Engine,
    dec: Decoder,
    out: Out,
}

impl Rig {
    fn new(profiles: &str) -> Rig {
        Rig::with_memory("arena_bytes = \"1MiB\"\nmax_sessions = 1000", profiles)
    }

    /// An engine with `memory` as its `[memory]` table.
    fn with_memory(memory: &str, profiles: &str) -> Rig {
        let cfg = Config::from_toml(&format!("[memory]\n{memory}\n{profiles}")).unwrap();
        let rules = Arc::new(Rules::compile(&cfg).unwrap());
        let dec = Decoder::new(rules.field_table(), 32, 65536);
        Rig {
            engine: Engine::new(rules, &cfg, 0, None).unwrap(),
            dec,
            out: Out::with_capacity(1 << 16, 1024),
        }
    }

    /// `Engine::set_rules` with `profiles` under [`Rig::new`]'s memory; the decoder takes the
    /// new rules' fields, as the runtime's does.
    fn reload(&mut self, profiles: &str) -> Result<(), String> {
        let cfg = Config::from_toml(&format!(
            "[memory]\narena_bytes = \"1MiB\"\nmax_sessions = 1000\n{profiles}"
        ))
        .unwrap();
        let rules = Arc::new(Rules::compile(&cfg).unwrap());
        self.engine.set_rules(rules.clone())?;
        self.dec = Decoder::new(rules.field_table(), 32, 65536);
        Ok(())
    }

    fn send(&mut self, line: &str) {
        let ev = self.dec.decode(line.as_bytes()).unwrap();
        let ps: Vec<_> = self.engine.rules().matching(&ev).collect();
        for p in ps {
            self.engine.on_event(p, &ev, Clock::Replay, &mut self.out);
        }
    }

    fn records(&mut self) -> Vec<serde_json::Value> {
        let v = self
            .out
            .iter()
            .map(|(_, l)| serde_json::from_slice(l).unwrap())
            .collect();
        self.out.clear();
        v
    }

    fn ends(recs: &[serde_json::Value]) -> Vec<&serde_json::Value> {
        recs.iter().filter(|r| r["kind"] == "session_end").collect()
    }
}

const WEB: &str = r#"
[[profile]]
name = "web"
key = "user"
timestamp = { field = "ts" }
idle_timeout = "10s"
ends_when = { field = "type", eq = "logout" }
metadata = ["ip"]
state = ["page"]
[[profile.counter]]
name = "clicks"
when = { field = "type", eq = "click" }
[[profile.aggregate]]
name = "spent"
field = "price"
op = "sum"
[[profile.list]]
name = "pages"
field = "page"
max_len = 2
unique = true
"#;

#[test]
fn boundary_event_exactly_idle_later_stays_one_ms_more_splits() {
    let mut r = Rig::new(WEB);
    r.send(r#"{"user":"a","ts":1000}"#);
    r.send(r#"{"user":"a","ts":11000}"#);
    r.send(r#"{"user":"a","ts":21001}"#);
    r.engine.finish(&mut r.out);
    let recs = r.records();
    let ends = Rig::ends(&recs);
    assert_eq!(ends.len(), 2, "{recs:#?}");
    assert_eq!(ends[0]["count"], 2);
    assert_eq!(ends[0]["reason"], "idle");
    assert_eq!(ends[1]["count"], 1);
    assert_eq!(ends[1]["reason"], "end_of_input");
}

#[test]
fn enriched_events_markers_and_statistics() {
    let mut r = Rig::new(WEB);
    r.send(r#"{"user":"a","ts":1000,"ip":"1.1.1.1","type":"click","page":"/a","price":2.5}"#);
    r.send(r#"{"user":"a","ts":2000,"ip":"2.2.2.2","type":"view","page":"/b","price":1}"#);
    r.send(r#"{"user":"a","ts":3000,"type":"click","page":"/a"}"#);
    r.send(r#"{"user":"a","ts":4000,"type":"logout","page":"/c"}"#);
    let recs = r.records();
    assert_eq!(recs[0]["kind"], "session_start");
    assert_eq!(recs[0]["metadata"]["ip"], "1.1.1.1");
    let id = recs[0]["session_id"].clone();
    assert_eq!(recs[1]["_session"]["id"], id);
    assert_eq!(recs[1]["_session"]["seq"], 1);
    assert_eq!(recs[1]["price"], 2.5, "original members survive");
    let end = Rig::ends(&recs)[0];
    assert_eq!(end["reason"], "ends_when");
    assert_eq!(end["count"], 4);
    assert_eq!(end["session_id"], id);
    assert_eq!(end["metadata"]["ip"], "1.1.1.1");
    assert_eq!(end["state"]["page"], "/c");
    assert_eq!(end["counters"]["clicks"], 2);
    assert_eq!(end["aggregates"]["spent"], 3.5);
    assert_eq!(end["lists"]["pages"], serde_json::json!(["/a", "/b"]));
    assert_eq!(end["duration_ms"], 3000);
    assert_eq!(r.engine.live_sessions(), 0);
}

#[test]
fn event_time_merges_out_of_order_islands_and_reports_late_events() {
    let mut r = Rig::new(
        r#"
[[profile]]
name = "iot"
key = "dev"
time = "event"
timestamp = { field = "ts", format = "epoch_s" }
allowed_lateness = "60s"
idle_timeout = "10s"
"#,
    );
    r.send(r#"{"dev":"d","ts":100}"#);
    r.send(r#"{"dev":"d","ts":118}"#);
    r.send(r#"{"dev":"d","ts":109}"#);
    let recs = r.records();
    let merged: Vec<_> = recs
        .iter()
        .filter(|x| x["kind"] == "session_merged")
        .collect();
    assert_eq!(merged.len(), 1, "{recs:#?}");
    assert_eq!(
        merged[0]["session_id"], recs[0]["session_id"],
        "the earlier session survives"
    );
    r.send(r#"{"dev":"d","ts":300}"#);
    r.send(r#"{"dev":"d","ts":200}"#);
    r.engine.advance(Clock::Replay, &mut r.out);
    let recs = r.records();
    assert!(
        recs.iter()
            .any(|x| x["kind"] == "late_event" && x["ts"] == 200_000),
        "{recs:#?}"
    );
    let ends = Rig::ends(&recs);
    assert_eq!(
        ends.len(),
        1,
        "watermark 240s closes the first session: {recs:#?}"
    );
    assert_eq!(ends[0]["count"], 3);
    assert_eq!(ends[0]["start_ts"], 100_000);
    assert_eq!(ends[0]["last_ts"], 118_000);
}

const SHOP: &str = r#"
[[profile]]
name = "shop"
key = "user"
timestamp = { field = "ts" }
idle_timeout = "30s"
[[profile.sub_session]]
name = "checkout"
starts_when = { field = "type", eq = "cart" }
ends_when = { field = "type", eq = "buy" }
idle_timeout = "10s"
[[profile.sub_session.counter]]
name = "steps"
"#;

#[test]
fn sub_sessions_end_before_their_parent() {
    let mut r = Rig::new(SHOP);
    r.send(r#"{"user":"u","ts":1000,"type":"view"}"#);
    r.send(r#"{"user":"u","ts":2000,"type":"cart"}"#);
    r.send(r#"{"user":"u","ts":3000,"type":"pay"}"#);
    r.send(r#"{"user":"u","ts":4000,"type":"buy"}"#);
    r.send(r#"{"user":"u","ts":5000,"type":"cart"}"#);
    r.engine.finish(&mut r.out);
    let recs = r.records();
    let kinds: Vec<_> = recs
        .iter()
        .map(|x| x["kind"].as_str().unwrap_or("event"))
        .collect();
    let subs_end: Vec<_> = recs
        .iter()
        .filter(|x| x["kind"] == "sub_session_end")
        .collect();
    assert_eq!(subs_end.len(), 2, "{kinds:?}");
    assert_eq!(subs_end[0]["reason"], "ends_when");
    assert_eq!(subs_end[0]["count"], 3);
    assert_eq!(subs_end[0]["counters"]["steps"], 3);
    assert_eq!(subs_end[1]["reason"], "end_of_input");
    let parent_end = recs
        .iter()
        .position(|x| x["kind"] == "session_end")
        .unwrap();
    let last_sub_end = recs
        .iter()
        .rposition(|x| x["kind"] == "sub_session_end")
        .unwrap();
    assert!(last_sub_end < parent_end);
    assert_eq!(
        subs_end[1]["parent_session_id"],
        recs[parent_end]["session_id"]
    );
}

/// A sub-session that finds the session table full is not started and is counted; it does not
/// evict, and its parent takes the event as usual.
#[test]
fn sub_session_without_room_is_counted_and_the_parent_goes_on() {
    let mut r = Rig::with_memory("arena_bytes = \"64KiB\"\nmax_sessions = 1", SHOP);
    r.send(r#"{"user":"u","ts":1000,"type":"view"}"#);
    r.send(r#"{"user":"u","ts":2000,"type":"cart"}"#);
    let stats = r.engine.stats();
    assert_eq!(stats.sub_sessions_full, 1);
    assert_eq!(stats.sub_sessions_started, 0);
    assert_eq!(stats.evictions, 0);
    let recs = r.records();
    let seqs: Vec<_> = recs
        .iter()
        .filter_map(|r| r["_session"]["seq"].as_u64())
        .collect();
    assert_eq!(seqs, [1, 2], "both events joined the one session");
    assert!(recs
        .iter()
        .all(|r| r["kind"] != "sub_session_start" && r["kind"] != "session_end"));
}

/// A session whose record is larger than the whole arena is refused at once: with
/// `evict_oldest` it once ended every other session first, in vain.
#[test]
fn a_record_larger_than_the_arena_evicts_nothing() {
    let mut r = Rig::with_memory(
        "arena_bytes = \"1KiB\"\nblock_bytes = 16\nmax_sessions = 100\n[limits]\nkey_bytes_max = 4096",
        WEB,
    );
    r.send(r#"{"user":"a","ts":1000}"#);
    r.send(&format!(r#"{{"user":"{}","ts":2000}}"#, "k".repeat(2000)));
    let stats = r.engine.stats();
    assert_eq!((stats.evictions, stats.rejections), (0, 1));
    assert_eq!(r.engine.live_sessions(), 1);
    let recs = r.records();
    assert!(Rig::ends(&recs).is_empty(), "nothing ended");
    assert!(recs.iter().any(|v| v["reason"] == "session_table_full"));
}

/// Feeds `lines` (replay clock) to an engine of `max_sessions` sessions for one profile keyed
/// by `k`; returns the records and the sessions left open.
fn small_table(
    max_sessions: u32,
    on_full: &str,
    idle: &str,
    lines: &[&str],
) -> (Vec<serde_json::Value>, u32) {
    let cfg = Config::from_toml(&format!(
        "[memory]\narena_bytes = \"64KiB\"\nmax_sessions = {max_sessions}\non_full = \"{on_full}\"\n[[profile]]\nname = \"w\"\nkey = \"k\"\ntimestamp = {{ field = \"ts\" }}\nidle_timeout = \"{idle}\"\n",
    ))
    .unwrap();
    let rules = Arc::new(Rules::compile(&cfg).unwrap());
    let mut dec = Decoder::new(rules.field_table(), 32, 1024);
    let mut engine = Engine::new(rules, &cfg, 0, None).unwrap();
    let mut out = Out::with_capacity(4096, 64);
    for line in lines {
        let ev = dec.decode(line.as_bytes()).unwrap();
        engine.on_event(0, &ev, Clock::Replay, &mut out);
    }
    let recs = out
        .iter()
        .map(|(_, l)| serde_json::from_slice(l).unwrap())
        .collect();
    (recs, engine.live_sessions())
}

#[test]
fn full_table_evicts_the_session_closest_to_its_deadline() {
    let (recs, live) = small_table(
        2,
        "evict_oldest",
        "10s",
        &[
            r#"{"k":"a","ts":1000}"#,
            r#"{"k":"b","ts":2000}"#,
            r#"{"k":"a","ts":3000}"#,
            r#"{"k":"c","ts":4000}"#,
        ],
    );
    let ends: Vec<_> = recs.iter().filter(|x| x["kind"] == "session_end").collect();
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0]["key"], "b", "b expires first");
    assert_eq!(ends[0]["reason"], "evicted");
    assert_eq!(live, 2);
}

/// A full table makes room with a session whose deadline fell in a second before the clock's
/// (it ends idle), not with one whose deadline passed within the clock's own second (then the
/// table is full: evict or refuse).
#[test]
fn full_table_makes_room_with_a_session_due_by_the_second() {
    let ends = |on_full: &str, lines: &[&str]| {
        small_table(1, on_full, "1s", lines)
            .0
            .iter()
            .filter(|v| v["kind"] == "session_end" || v["kind"] == "dead_letter")
            .map(|v| format!("{} {}", v["kind"], v["reason"]))
            .collect::<Vec<_>>()
    };
    // a's deadline 2,300 falls in second 2: at 3,000 the clock is in second 3.
    let earlier = [r#"{"k":"a","ts":1300}"#, r#"{"k":"b","ts":3000}"#];
    assert_eq!(ends("reject", &earlier), [r#""session_end" "idle""#]);
    // At 2,900 the clock is still in second 2: a is past its deadline but not due yet.
    let same = [r#"{"k":"a","ts":1300}"#, r#"{"k":"b","ts":2900}"#];
    assert_eq!(
        ends("reject", &same),
        [r#""dead_letter" "session_table_full""#]
    );
    assert_eq!(ends("evict_oldest", &same), [r#""session_end" "evicted""#]);
}

#[test]
fn reload_changes_predicates_in_place_and_refuses_layout_changes() {
    let mut r = Rig::new(WEB);
    r.send(r#"{"user":"a","ts":1000,"type":"logout"}"#);
    assert_eq!(Rig::ends(&r.records()).len(), 1);
    r.reload(&WEB.replace(r#"eq = "logout""#, r#"eq = "bye""#))
        .unwrap();
    r.send(r#"{"user":"a","ts":2000,"type":"logout"}"#);
    assert!(
        Rig::ends(&r.records()).is_empty(),
        "logout no longer ends sessions"
    );
    let err = r
        .reload(&WEB.replace(r#"metadata = ["ip"]"#, r#"metadata = ["ip", "ua"]"#))
        .unwrap_err();
    assert!(err.contains("needs a restart"), "{err}");
}

/// A reload that shortens the timeouts reaches the open sessions at once: each moves to its new
/// deadline's wheel slot, so the next expiry pass past it ends the session (`idle`) instead of
/// the pass the old timeout would have fired. A sub-session's own timeout the same way, while its
/// parent, still within its timeout, goes on.
#[test]
fn a_reload_shortening_timeouts_moves_open_sessions_to_their_new_deadlines() {
    let long = SHOP
        .replace(r#"idle_timeout = "30s""#, r#"idle_timeout = "1h""#)
        .replace(r#"idle_timeout = "10s""#, r#"idle_timeout = "30m""#);
    let mut r = Rig::new(&long);
    r.send(r#"{"user":"a","ts":1000,"type":"view"}"#);
    r.send(r#"{"user":"b","ts":1000,"type":"cart"}"#);
    r.send(r#"{"user":"b","ts":15000,"type":"view"}"#);
    r.records();
    // Longer timeouts move nothing earlier.
    r.reload(&long.replace(r#""1h""#, r#""90m""#)).unwrap();
    // The clock (the newest event time, in replay) reaches 32 s: under the old timeouts nothing
    // is due; under SHOP's (30 s, sub-session 10 s) `b`'s sub-session (last at 15 s) and `a`'s
    // session (last at 1 s) are, and `b`'s session (last at 15 s) is not.
    r.reload(SHOP).unwrap();
    r.send(r#"{"user":"c","ts":32000,"type":"view"}"#);
    r.engine.advance(Clock::Replay, &mut r.out);
    let recs = r.records();
    let ended: Vec<_> = recs
        .iter()
        .filter(|x| x["kind"].as_str().is_some_and(|k| k.ends_with("_end")))
        .map(|x| {
            (
                x["kind"].as_str().unwrap(),
                x["key"].as_str().unwrap(),
                x["reason"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ended,
        [
            ("sub_session_end", "b", "idle"),
            ("session_end", "a", "idle")
        ],
        "{recs:?}"
    );
    assert_eq!(r.engine.live_sessions(), 2, "b's session and c's");
}

/// A reload that appends a profile, beside one with sub-sessions, renumbers the sub-session
/// kinds (they come after every top-level profile): the open sub-sessions take their new
/// numbers and go on (same id, their counters continuing), the appended profile's own
/// sub-sessions work, and a snapshot taken after the reload restores both.
#[test]
fn a_reload_appending_a_profile_keeps_the_open_sub_sessions() {
    let mut r = Rig::new(SHOP);
    r.send(r#"{"user":"u","ts":1000,"type":"view"}"#);
    r.send(r#"{"user":"u","ts":2000,"type":"cart"}"#);
    r.send(r#"{"user":"u","ts":3000,"type":"pay"}"#);
    let started = r.records();
    let sub_id = started
        .iter()
        .find(|x| x["kind"] == "sub_session_start")
        .expect("the checkout started")["session_id"]
        .clone();
    let more = format!(
        "{SHOP}{}",
        SHOP.replace(r#"name = "shop""#, r#"name = "store""#)
            .replace(r#"key = "user""#, r#"key = "shopper""#)
    );
    // A sliced capture cut before the reload and finished after it holds the state at its cut,
    // by the old numbering.
    let meta = snapshot::SnapshotMeta {
        shard: 0,
        shards: 1,
        generation: 1,
        wall_ms: 0,
        log_seq: 0,
    };
    let mut at_cut = rkyv::util::AlignedVec::<16>::new();
    r.engine.write_snapshot(&mut at_cut, meta).unwrap();
    r.engine.capture_begin(snapshot::CaptureBuffers::default());
    r.reload(&more).unwrap();
    while !r.engine.capture_step(1) {}
    let mut sliced = rkyv::util::AlignedVec::<16>::new();
    r.engine
        .capture_take()
        .write_body(&mut sliced, meta)
        .unwrap();
    assert!(sliced[..] == at_cut[..], "the capture saw the reload");
    r.send(r#"{"user":"u","ts":4000,"type":"pay"}"#);
    r.send(r#"{"shopper":"s","ts":4000,"type":"cart"}"#);
    r.send(r#"{"user":"u","ts":5000,"type":"buy"}"#);
    let recs = r.records();
    let ends: Vec<_> = recs
        .iter()
        .filter(|x| x["kind"] == "sub_session_end")
        .collect();
    assert_eq!(ends.len(), 1, "{recs:?}");
    assert_eq!(ends[0]["session_id"], sub_id, "the same checkout went on");
    assert_eq!(ends[0]["reason"], "ends_when");
    assert_eq!(ends[0]["counters"]["steps"], 4, "cart, pay, pay, buy");
    assert_eq!(
        recs.iter()
            .filter(|x| x["kind"] == "sub_session_start" && x["profile"] == "store")
            .count(),
        1,
        "{recs:?}"
    );

    // Round trip: the store's open checkout comes back under its number.
    let mut bytes = rkyv::util::AlignedVec::<16>::new();
    r.engine.write_snapshot(&mut bytes, meta).unwrap();
    let body = crate::persist::snapshot_file::access_body(&bytes).unwrap();
    let mut again = Rig::new(&more);
    let report = again.engine.restore_from(body, 1, 0);
    assert_eq!((report.sessions, report.sub_sessions), (2, 1), "{report:?}");
    assert_eq!(report.dropped(), 0, "{report:?}");
    again.send(r#"{"shopper":"s","ts":6000,"type":"buy"}"#);
    let recs = again.records();
    let end = recs
        .iter()
        .find(|x| x["kind"] == "sub_session_end")
        .expect("the store's checkout ended");
    assert_eq!(end["profile"], "store");
    assert_eq!(end["counters"]["steps"], 2, "{recs:?}");
}

/// A state value that changes length inside the first block is rewritten there, moving the
/// metadata after it; one that would leave the block, or an event without it, takes the
/// general path. Either way the end marker shows the last page and the first metadata. (The
/// default block is 64 bytes.)
#[test]
fn state_changing_length_in_the_first_block_keeps_the_metadata_after_it() {
    let mut r = Rig::new(
        r#"
[[profile]]
name = "p"
key = "user"
timestamp = { field = "ts" }
idle_timeout = "10s"
ends_when = { field = "type", eq = "logout" }
metadata = ["tenant"]
state = ["page"]
[[profile.counter]]
name = "clicks"
when = { field = "type", eq = "click" }
"#,
    );
    let pages = [
        "/a",
        "/bbbbbbbb",
        "/c",
        "/dddd",
        &"/".repeat(50),
        "/e",
        "/ffffff",
    ];
    for (i, page) in pages.iter().enumerate() {
        r.send(&format!(
            r#"{{"user":"u1","ts":{i},"type":"click","tenant":"t{i}","page":"{page}"}}"#
        ));
        if i == 3 {
            r.send(r#"{"user":"u1","ts":3,"type":"view"}"#);
        }
    }
    r.send(r#"{"user":"u1","ts":9,"type":"logout","page":"/gg"}"#);
    let recs = r.records();
    let ends = Rig::ends(&recs);
    assert_eq!(ends.len(), 1);
    let e = ends[0];
    assert_eq!(e["metadata"], serde_json::json!({"tenant": "t0"}));
    assert_eq!(e["state"], serde_json::json!({"page": "/gg"}));
    assert_eq!(e["counters"], serde_json::json!({"clicks": 7}));
    assert_eq!(e["count"], 9);

    // The last value of the same length as the one before it is written in place.
    for (ts, page) in [(20, "/hh"), (21, "/ii")] {
        r.send(&format!(
            r#"{{"user":"u2","ts":{ts},"type":"click","tenant":"t","page":"{page}"}}"#
        ));
    }
    r.send(r#"{"user":"u2","ts":22,"type":"logout"}"#);
    let recs = r.records();
    assert_eq!(
        Rig::ends(&recs)[0]["state"],
        serde_json::json!({"page": "/ii"})
    );
}

/// Several state and metadata fields whose values change length, go missing, arrive late,
/// and outgrow the front of the var area `apply` reads first: every end marker shows the
/// first-seen metadata and the last-seen state (the in-place and rebuild paths agree).
#[test]
fn captured_values_across_length_changes_and_missing_fields() {
    let mut r = Rig::new(
        r#"
[[profile]]
name = "p"
key = "user"
timestamp = { field = "ts" }
idle_timeout = "10s"
ends_when = { field = "type", eq = "logout" }
metadata = ["ip", "ua"]
state = ["page", "step"]
[[profile.list]]
name = "steps"
field = "step"
max_len = 3
"#,
    );
    let long = "x".repeat(100);
    r.send(r#"{"user":"a","ts":1,"page":"/a"}"#);
    r.send(r#"{"user":"a","ts":2,"page":"/b","ip":"10.0.0.1"}"#);
    r.send(r#"{"user":"a","ts":3,"page":"/cc","ip":"10.9.9.9","step":1}"#);
    r.send(&format!(
        r#"{{"user":"a","ts":4,"page":"/{long}","ua":"agent"}}"#
    ));
    r.send(r#"{"user":"a","ts":5,"page":"/d","step":22,"ua":"other"}"#);
    r.send(r#"{"user":"a","ts":6,"page":"/e"}"#);
    r.send(r#"{"user":"a","ts":7,"type":"logout"}"#);
    let recs = r.records();
    let ends = Rig::ends(&recs);
    assert_eq!(ends.len(), 1);
    let e = ends[0];
    assert_eq!(
        e["metadata"],
        serde_json::json!({"ip": "10.0.0.1", "ua": "agent"})
    );
    assert_eq!(e["state"], serde_json::json!({"page": "/e", "step": 22}));
    assert_eq!(e["lists"], serde_json::json!({"steps": [1, 22]}));
    assert_eq!(e["count"], 7);
    let start = recs.iter().find(|v| v["kind"] == "session_start").unwrap();
    assert_eq!(
        start["metadata"],
        serde_json::json!({"ip": null, "ua": null})
    );

    // A session whose state stays the same length is rewritten in place; its end says so too.
    for (ts, page) in [(20, "/p1"), (21, "/p2"), (22, "/p3")] {
        r.send(&format!(
            r#"{{"user":"b","ts":{ts},"page":"{page}","ip":"1.1.1.1","ua":"u"}}"#
        ));
    }
    r.send(r#"{"user":"b","ts":23,"type":"logout"}"#);
    let recs = r.records();
    let e = Rig::ends(&recs)[0].clone();
    assert_eq!(e["state"], serde_json::json!({"page": "/p3", "step": null}));
    assert_eq!(
        e["metadata"],
        serde_json::json!({"ip": "1.1.1.1", "ua": "u"})
    );
}

/// A mass expiry in bounded steps: each step stops at half the output batch's reserved room
/// (which therefore never grows), the sessions left stay due at the front of the wheel, and the
/// steps together end exactly the sessions one unbounded pass ends. The same for `finish`.
#[test]
fn bounded_expiry_and_finish_end_everything_in_steps_within_the_batch() {
    let mut r = Rig::new(WEB);
    for i in 0..600 {
        r.send(&format!(
            r#"{{"user":"u{i}","ts":{},"page":"/p"}}"#,
            1000 + 3 * i
        ));
    }
    r.records();
    // The sessions whose deadline fell in second 11 are due once this event moves the clock
    // into second 12 (the wheel drains whole seconds).
    r.send(r#"{"user":"late","ts":12600}"#);
    r.records();
    let mut twin = Rig::new(WEB);
    for i in 0..600 {
        twin.send(&format!(
            r#"{{"user":"u{i}","ts":{},"page":"/p"}}"#,
            1000 + 3 * i
        ));
    }
    twin.send(r#"{"user":"late","ts":12600}"#);
    twin.records();
    twin.engine.advance(Clock::Replay, &mut twin.out);
    let mut expected: Vec<String> = twin.records().iter().map(|v| v.to_string()).collect();
    let due = expected.len();
    assert_eq!(due, 334, "sessions u0..=u333 are due");

    let mut small = Out::with_capacity(8 << 10, 64);
    let (bytes, recs) = (small.buf.capacity(), small.recs.capacity());
    let mut got = Vec::new();
    let mut steps = 0;
    loop {
        let left = r.engine.advance_bounded(Clock::Replay, &mut small).left;
        assert_eq!(
            (small.buf.capacity(), small.recs.capacity()),
            (bytes, recs),
            "the batch never grows"
        );
        got.extend(small.iter().map(|(_, l)| {
            serde_json::from_slice::<serde_json::Value>(l)
                .unwrap()
                .to_string()
        }));
        small.clear();
        steps += 1;
        if !left {
            break;
        }
    }
    assert!(
        steps > 5,
        "{steps} steps: the batch should have stopped the pass"
    );
    expected.sort();
    got.sort();
    assert_eq!(got, expected);
    assert_eq!(r.engine.live_sessions() as usize, 601 - due);

    let mut ends = 0;
    while {
        let left = r.engine.finish_bounded(&mut small);
        assert_eq!((small.buf.capacity(), small.recs.capacity()), (bytes, recs));
        ends += small
            .iter()
            .filter(|(_, l)| l.starts_with(br#"{"kind":"session_end""#))
            .count();
        small.clear();
        left
    } {}
    assert_eq!((ends, r.engine.live_sessions()), (601 - due, 0));
}

/// An enriched event is the original bytes with the `_session` member last; one that carries
/// a `_session` member of its own (our output fed back) has it replaced, wherever it was.
#[test]
fn enriched_event_bytes_with_and_without_an_old_session_member() {
    let mut r = Rig::new(WEB);
    let lines = [
        r#"{"user":"a","ts":1000}"#,
        r#"{"_session":{"id":"old","seq":9},"user":"a","ts":2000}"#,
        r#"{"user":"a", "_session":1 ,"ts":3000}"#,
        r#"{"user":"a","ts":4000,"_session":null}"#,
    ];
    for line in lines {
        r.send(line);
    }
    let text: Vec<String> = r
        .out
        .iter()
        .map(|(_, l)| String::from_utf8(l.to_vec()).unwrap())
        .collect();
    let start: serde_json::Value = serde_json::from_str(&text[0]).unwrap();
    let id = start["session_id"].as_str().unwrap();
    let member = |seq: u32| {
        format!(r#""_session":{{"id":"{id}","profile":"web","seq":{seq},"start_ts":1000}}"#)
    };
    assert_eq!(
        &text[1..],
        [
            format!("{{\"user\":\"a\",\"ts\":1000,{}}}\n", member(1)),
            format!("{{\"user\":\"a\",\"ts\":2000,{}}}\n", member(2)),
            format!("{{\"user\":\"a\" ,\"ts\":3000,{}}}\n", member(3)),
            format!("{{\"user\":\"a\",\"ts\":4000,{}}}\n", member(4)),
        ]
    );
}

/// Each enriched event carries its own session's `start_ts`, also when consecutive events'
/// sessions started on either side of a multiple of 10^8 ms (the digits above the low eight,
/// which the output keeps between events, differ from one event to the next).
#[test]
fn enriched_start_ts_across_a_change_of_its_high_digits() {
    let mut r = Rig::new(WEB);
    let t0: i64 = 1_750_000_000_000;
    // Times rise from event to event (processing time), each session's every 3 s.
    let mut sent = Vec::new();
    for k in 0..6 {
        for (user, start) in [("a", t0 - 1000), ("b", t0 + 1000)] {
            r.send(&format!(r#"{{"user":"{user}","ts":{}}}"#, start + 3000 * k));
            sent.push((user, start));
        }
    }
    let enriched: Vec<(String, i64)> = r
        .records()
        .iter()
        .filter(|rec| rec.get("_session").is_some())
        .map(|rec| {
            let user = rec["user"].as_str().unwrap().to_string();
            (user, rec["_session"]["start_ts"].as_i64().unwrap())
        })
        .collect();
    let want: Vec<(String, i64)> = sent.iter().map(|(u, s)| (u.to_string(), *s)).collect();
    assert_eq!(enriched, want);
    assert_ne!((t0 - 1000) / 100_000_000, (t0 + 1000) / 100_000_000);
}

/// Counters that all test one field for a string read it once an event; a profile with one
/// more counter of another kind evaluates each `when` as a predicate. Both count the same.
#[test]
fn counters_by_value_count_as_their_predicates() {
    let profile = |name: &str, extra: &str| {
        format!(
            r#"
[[profile]]
name = "{name}"
key = "user"
timestamp = {{ field = "ts" }}
idle_timeout = "10s"
state = ["page"]
[[profile.counter]]
name = "clicks"
when = {{ field = "type", eq = "click" }}
[[profile.counter]]
name = "all"
[[profile.counter]]
name = "pages"
when = {{ field = "type", eq = "page" }}
{extra}"#
        )
    };
    let mut r = Rig::new(
        &(profile("by_value", "")
            + &profile(
                "by_predicate",
                "[[profile.counter]]\nname = \"kinds\"\nwhen = { field = \"kind\", exists = true }\n",
            )),
    );
    let rules = r.engine.rules().clone();
    assert!(rules.profiles[0].counters_by_value.is_some());
    assert!(rules.profiles[1].counters_by_value.is_none());
    for (i, ty) in [
        r#""click""#,
        r#""page""#,
        r#""clic""#,
        r#""pages""#,
        "1",
        "null",
        r#""click""#,
        "",
        r#""page""#,
        r#""click""#,
    ]
    .iter()
    .enumerate()
    {
        let ty = if ty.is_empty() {
            String::new()
        } else {
            format!(r#","type":{ty}"#)
        };
        // Same-length pages keep the session on the in-block path; the last one moves it.
        let page = if i == 9 { "/longer" } else { "/a" };
        r.send(&format!(
            r#"{{"user":"u","ts":{}{ty},"page":"{page}"}}"#,
            1000 + i
        ));
    }
    r.engine.finish(&mut r.out);
    let recs = r.records();
    let ends = Rig::ends(&recs);
    assert_eq!(ends.len(), 2, "{recs:#?}");
    for end in ends {
        let c = &end["counters"];
        assert_eq!(
            (&c["clicks"], &c["all"], &c["pages"]),
            (&3.into(), &10.into(), &2.into()),
            "{end}"
        );
    }
}

/// The owner rule clients compute for the steering header is `hash % shards`; the mask used
/// for power-of-two shard counts must agree with it everywhere.
/// A profile at the limits of session data (16 lists, 32 aggregates; 60 captured values, as
/// many distinct fields as fit the 64 field paths beside the key, the time and the aggregated
/// field) captures and reports every one of them, the last as the first.
#[test]
fn session_data_at_every_limit_is_kept_whole() {
    let mut p = String::from("[[profile]]\nname = \"web\"\nkey = \"user\"\ntimestamp = { field = \"ts\" }\nidle_timeout = \"10s\"\n");
    let fields = |prefix: &str| {
        (0..29)
            .map(|i| format!("\"{prefix}{i}\""))
            .collect::<Vec<_>>()
            .join(",")
    };
    p += &format!("metadata = [\"ip\",{}]\n", fields("m"));
    p += &format!("state = [\"page\",{}]\n", fields("s"));
    for i in 0..16 {
        p += &format!("[[profile.list]]\nname = \"l{i}\"\nfield = \"page\"\nmax_len = 2\n");
    }
    for i in 0..32 {
        let op = ["sum", "min", "max"][i % 3];
        p += &format!("[[profile.aggregate]]\nname = \"a{i}\"\nfield = \"v\"\nop = \"{op}\"\n");
    }
    let mut r = Rig::new(&p);
    r.send(r#"{"user":"a","ts":1000,"ip":"1.1.1.1","page":"/a","v":5}"#);
    r.send(r#"{"user":"a","ts":2000,"page":"/b","v":7}"#);
    r.engine.finish(&mut r.out);
    let recs = r.records();
    let end = Rig::ends(&recs)[0];
    for i in 0..32 {
        let want = [12.0, 5.0, 7.0][i % 3];
        assert_eq!(end["aggregates"][format!("a{i}")], want, "aggregate {i}");
    }
    for i in 0..16 {
        assert_eq!(
            end["lists"][format!("l{i}")],
            serde_json::json!(["/a", "/b"]),
            "list {i}"
        );
    }
    assert_eq!(end["metadata"]["ip"], "1.1.1.1");
    assert_eq!(end["state"]["page"], "/b");
}

#[test]
fn shard_of_is_hash_modulo_shards() {
    let mut h: u32 = 0x9e37_79b9;
    for _ in 0..10_000 {
        h ^= h << 13;
        h ^= h >> 17;
        h ^= h << 5;
        for shards in 1..=crate::config::SHARDS_MAX as u32 {
            assert_eq!(
                shard_of(h, shards),
                h % shards,
                "hash {h:#x}, {shards} shards"
            );
        }
    }
    for shards in 1..=crate::config::SHARDS_MAX as u32 {
        assert_eq!(shard_of(u32::MAX, shards), u32::MAX % shards);
        assert_eq!(shard_of(0, shards), 0);
    }
}

/// With the events stream off (no output carries it) the engine writes every other record as
/// before, byte for byte and in order, and no event; the passed-through events go too.
#[test]
fn events_stream_off_leaves_every_other_record_unchanged() {
    let lines = [
        r#"{"user":"a","ts":1000,"type":"click","ip":"1.2.3.4","page":"/x"}"#,
        r#"{"user":"b","ts":1500,"type":"click","page":"/y","price":3}"#,
        r#"{"user":"a","ts":2000,"type":"page","page":"/zz","price":2}"#,
        r#"{"user":"a","ts":2500,"type":"logout"}"#,
        r#"{"ts":2600,"type":"click"}"#,
        r#"{"user":"b","ts":30000,"type":"click"}"#,
    ];
    let run = |events: bool| {
        let mut r = Rig::new(WEB);
        r.out.events = events;
        for l in lines {
            r.send(l);
        }
        r.out.passthrough(b"{\"unmatched\":1}");
        r.engine.finish(&mut r.out);
        let recs: Vec<(Stream, Vec<u8>)> = r.out.iter().map(|(s, l)| (s, l.to_vec())).collect();
        (recs, r.engine.stats().clone())
    };
    let (on, stats_on) = run(true);
    let (off, stats_off) = run(false);
    assert_eq!(on.iter().filter(|(s, _)| *s == Stream::Events).count(), 6);
    assert!(off.iter().all(|(s, _)| *s != Stream::Events), "{off:?}");
    let rest: Vec<_> = on
        .into_iter()
        .filter(|(s, _)| *s != Stream::Events)
        .collect();
    assert!(rest.iter().any(|(s, _)| *s == Stream::Markers));
    assert_eq!(off, rest);
    assert_eq!(format!("{stats_on:?}"), format!("{stats_off:?}"));
}

const IOT: &str = r#"
[[profile]]
name = "iot"
key = "dev"
time = "event"
timestamp = { field = "ts" }
allowed_lateness = "5s"
idle_timeout = "10s"
"#;

/// Event time on the wall clock: while the input is quiet the watermark moves on with the wall
/// clock (`max_ts + idle_advance - lateness`), so a quiet key's session ends without another
/// event, once the wall clock has run `idle + lateness` past its last event's arrival.
#[test]
fn event_time_sessions_end_on_the_wall_clock_while_input_is_quiet() {
    let mut r = Rig::new(IOT);
    let w0 = 1_750_000_000_000i64;
    // Each event arrives 2 s after its own time.
    for (ts, wall) in [(w0 - 2_000, w0), (w0 - 1_000, w0 + 1_000)] {
        let line = format!(r#"{{"dev":"d1","ts":{ts}}}"#);
        let ev = r.dec.decode(line.as_bytes()).unwrap();
        r.engine.on_event(0, &ev, Clock::Wall(wall), &mut r.out);
    }
    let last = w0 - 1_000;
    let arrived = w0 + 1_000;
    // Watermark at `arrived + 14 s`: last + 14 s - 5 s, before the deadline (last + 10 s).
    r.engine.advance(Clock::Wall(arrived + 14_000), &mut r.out);
    assert!(Rig::ends(&r.records()).is_empty());
    // At `arrived + 17 s` it is last + 12 s: past the deadline's second.
    r.engine.advance(Clock::Wall(arrived + 17_000), &mut r.out);
    let recs = r.records();
    let ends = Rig::ends(&recs);
    assert_eq!(ends.len(), 1, "{recs:#?}");
    assert_eq!(ends[0]["reason"], "idle");
    assert_eq!(ends[0]["count"], 2);
    assert_eq!(ends[0]["last_ts"], last);
    // In replay there is no wall clock: the same session stays open until more input.
    let mut replay = Rig::new(IOT);
    replay.send(&format!(r#"{{"dev":"d1","ts":{last}}}"#));
    replay.engine.advance(Clock::Replay, &mut replay.out);
    assert!(Rig::ends(&replay.records()).is_empty());
}

/// An expiry pass on the wall clock ends sessions by the watermark the quiet spell advanced; the
/// watermark then stays there. Before, the next accepted event set it back to that event's own
/// `ts - lateness`, and an event behind the pass but within a session it had ended was accepted
/// into a new session of its key: the "accepted events never need a closed session" promise of
/// docs/semantics.md broken.
#[test]
fn the_watermark_an_expiry_pass_used_does_not_move_back() {
    let mut r = Rig::new(IOT);
    let w0 = 1_750_000_000_000i64;
    let send = |r: &mut Rig, dev: &str, ts: i64, wall: i64| {
        let line = format!(r#"{{"dev":"{dev}","ts":{ts}}}"#);
        let ev = r.dec.decode(line.as_bytes()).unwrap();
        r.engine.on_event(0, &ev, Clock::Wall(wall), &mut r.out);
    };
    send(&mut r, "d1", w0, w0);
    // 17 s of quiet: the watermark is w0 + 17 s - 5 s, past d1's deadline (w0 + 10 s).
    r.engine.advance(Clock::Wall(w0 + 17_000), &mut r.out);
    let recs = r.records();
    assert_eq!(Rig::ends(&recs).len(), 1, "{recs:#?}");
    // Within lateness of that watermark: accepted.
    send(&mut r, "d2", w0 + 12_500, w0 + 17_000);
    // Behind the pass's watermark (w0 + 12 s), though within d1's ended session: late.
    send(&mut r, "d1", w0 + 9_000, w0 + 17_000);
    let recs = r.records();
    let kinds: Vec<&str> = recs
        .iter()
        .map(|v| v["kind"].as_str().unwrap_or("event"))
        .collect();
    assert_eq!(kinds, ["session_start", "event", "late_event"], "{recs:#?}");
    assert_eq!(recs[2]["watermark"], w0 + 12_000);
    assert_eq!(r.engine.stats().late, 1);
}

/// A pass reports whether it ended a session (the runtime logs those at once), whether it
/// changed the engine otherwise (the runtime logs the last such before its next record), and
/// whether it stopped with due sessions left.
#[test]
fn a_pass_reports_what_it_did() {
    let w0 = 1_750_000_000_000i64;
    let changed = Pass {
        changed: true,
        ..Pass::default()
    };
    let mut r = Rig::new(IOT);
    for dev in ["d1", "d2", "d3"] {
        let line = format!(r#"{{"dev":"{dev}","ts":{w0}}}"#);
        let ev = r.dec.decode(line.as_bytes()).unwrap();
        r.engine.on_event(0, &ev, Clock::Wall(w0), &mut r.out);
    }
    r.records();
    let mut pass_at = |wall: i64| r.engine.advance_bounded(Clock::Wall(wall), &mut r.out);
    // The watermark reaches w0 + 3 s, short of the deadlines (w0 + 10 s), and is held there.
    assert_eq!(pass_at(w0 + 8_000), changed);
    // At the same wall time nothing is left to hold, and the wheel is at that second.
    assert_eq!(pass_at(w0 + 8_000), Pass::default());
    // Past the deadlines, with room in the output for every end.
    let ended = Pass {
        left: false,
        ended: true,
        changed: true,
    };
    assert_eq!(pass_at(w0 + 17_000), ended);
    assert_eq!(pass_at(w0 + 18_000), changed, "nothing is left to end");
    assert_eq!(Rig::ends(&r.records()).len(), 3);

    // Processing time holds nothing: a pass changes the engine when its wheel moves on to
    // another second, whether or not a session is open.
    let mut r = Rig::new(WEB);
    let mut pass_at = |wall: i64| r.engine.advance_bounded(Clock::Wall(wall), &mut r.out);
    assert_eq!(pass_at(w0), changed);
    assert_eq!(pass_at(w0 + 999), Pass::default());
    assert_eq!(pass_at(w0 + 1_000), changed);
}
