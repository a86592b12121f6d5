//! Proof that the event path allocates nothing once the engine is built: a counting global
//! allocator (wrapping `System`) counts every allocation made on this test's thread while it is
//! armed, and the test arms it around 100k events over 10k keys that exercise every kind of work
//! the engine does per event: new sessions, existing sessions, metadata/state/counters/
//! aggregates/lists, sub-sessions, event-time merges and late events, ends by rule, expiry by
//! `advance`, and output into a reused `Out`. It runs twice: once event by event
//! (`Engine::on_event`) and once a window at a time (`Decoder::decode_into` into reused
//! `Parsed` slots, then `Engine::on_batch_by`), the two paths the appliance and replay use.
//!
//! The flag and the count are thread-local so the test harness's own threads, and the other test, cannot disturb the count. Set
//! `ALLOC_TRACE=1` to print a backtrace of each counted allocation.

use sessionizer::config::Config;
use sessionizer::decode::{Decoder, Parsed};
use sessionizer::engine::rules::{ProfileId, Rules};
use sessionizer::engine::snapshot::{CaptureBuffers, SnapshotMeta};
use sessionizer::engine::{route, Clock, Engine, Out, Route};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

struct Counting;

thread_local! {
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}
static TRACE: AtomicBool = AtomicBool::new(false);

impl Counting {
    fn note(&self) {
        // `try_with`: the thread-local may already be gone while a thread shuts down.
        if ARMED.try_with(|a| a.replace(false)).unwrap_or(false) {
            COUNT.with(|c| c.set(c.get() + 1));
            if TRACE.load(Ordering::Relaxed) {
                // Disarmed while printing, so the backtrace's own allocations do not count.
                eprintln!(
                    "allocation on the event path:\n{}",
                    std::backtrace::Backtrace::force_capture()
                );
            }
            ARMED.with(|a| a.set(true));
        }
    }
}

// SAFETY: every method forwards to `System` unchanged; counting touches only an atomic and a
// const-initialized thread-local, neither of which allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.note();
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.note();
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.note();
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const CONFIG: &str = r#"
[memory]
arena_bytes = "64MiB"
max_sessions = 65536
[slots]
max = 4096

[[profile]]
name = "web"
key = "user"
time = "processing"
timestamp = { field = "ts", format = "epoch_ms" }
idle_timeout = "30s"
max_duration = "10m"
ends_when = { field = "type", eq = "logout" }
split_on_change = ["camp"]
metadata = ["ip", "ua"]
state = ["page"]
[[profile.counter]]
name = "clicks"
when = { field = "type", eq = "click" }
[[profile.counter]]
name = "pages"
when = { field = "type", eq = "page" }
[[profile.aggregate]]
name = "v_sum"
field = "v"
op = "sum"
[[profile.aggregate]]
name = "v_max"
field = "v"
op = "max"
[[profile.list]]
name = "pages"
field = "page"
max_len = 8
unique = true
[[profile.sub_session]]
name = "tab"
key = "tab"
idle_timeout = "10s"
starts_when = { field = "type", eq = "page" }
[[profile.sub_session.counter]]
name = "clicks"
when = { field = "type", eq = "click" }

[[profile]]
name = "ev"
key = "user"
time = "event"
timestamp = { field = "ts", format = "epoch_ms" }
allowed_lateness = "5s"
idle_timeout = "20s"
[[profile.counter]]
name = "all"
"#;

/// A small deterministic generator (SplitMix64), so the test needs no RNG crate.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// `count` event lines over `keys` keys (half the events on 500 hot keys, so sessions continue
/// as well as start), time advancing 10 ms per event from `t0`, with a few out-of-order and
/// far-late timestamps for the event-time profile.
fn lines(rng: &mut Rng, count: usize, keys: u64, t0: i64) -> Vec<String> {
    const TYPES: [&str; 6] = ["click", "click", "page", "page", "view", "logout"];
    (0..count)
        .map(|i| {
            let key = if rng.below(2) == 0 { rng.below(500) } else { rng.below(keys) };
            let mut ts = t0 + 10 * i as i64;
            match rng.below(100) {
                0..=4 => ts -= rng.below(3_000) as i64,
                5 => ts -= 60_000,
                _ => {}
            }
            let ty = if rng.below(50) == 0 { "logout" } else { TYPES[rng.below(5) as usize] };
            let camps = if rng.below(20) == 0 { 3 } else { 1 };
            format!(
                r#"{{"user":"u{key}","ts":{ts},"type":"{ty}","ip":"10.{}.{}.{}","ua":"Mozilla/5.0 (X11; Linux x86_64) test/{}","page":"/p/{}","camp":"c{}","tab":"t{}","v":{}}}"#,
                rng.below(256),
                rng.below(256),
                rng.below(256),
                rng.below(100),
                rng.below(40),
                rng.below(camps),
                rng.below(3),
                rng.below(1000),
            )
        })
        .collect()
}

struct Rig {
    rules: Arc<Rules>,
    dec: Decoder,
    engine: Engine,
    out: Out,
    profiles: Vec<ProfileId>,
    /// For the batched path: one window's decoded lines and the (profile, line) items.
    parsed: Vec<Parsed>,
    items: Vec<(ProfileId, usize)>,
    /// A sliced snapshot capture in progress: a slice of this budget after each window.
    slice_budget: Option<u32>,
    /// Slices until the capture completed.
    slices: u32,
}

/// Lines per batch on the batched path; also how often `advance` runs, on both paths.
const WINDOW: usize = 128;

impl Rig {
    fn feed(&mut self, lines: &[String], batched: bool) {
        if batched {
            for window in lines.chunks(WINDOW) {
                self.feed_window(window);
                self.advance();
            }
        } else {
            self.feed_each(lines);
        }
    }

    fn advance(&mut self) {
        if let Some(budget) = self.slice_budget {
            if self.engine.capture_step(budget) {
                self.slice_budget = None;
            } else {
                self.slices += 1;
            }
        }
        self.engine.advance(Clock::Replay, &mut self.out);
        assert!(
            self.out.len() < 60_000,
            "batch too large for the reserved Out"
        );
        self.out.clear();
    }

    fn feed_window(&mut self, window: &[String]) {
        self.items.clear();
        for (k, line) in window.iter().enumerate() {
            self.dec
                .decode_into(line.as_bytes(), &mut self.parsed[k])
                .expect("generated lines are valid");
            let ev = self.parsed[k].event(line.as_bytes(), self.dec.table());
            for p in self.rules.matching(&ev) {
                match route(&self.rules, p, &ev, 1) {
                    Route::Owner(_) => self.items.push((p, k)),
                    r => panic!("unexpected route {r:?}"),
                }
            }
        }
        let (items, parsed, table) = (&self.items, &self.parsed, self.dec.table());
        self.engine.on_batch_by(
            items.len(),
            |i| {
                let (p, k) = items[i];
                (p, parsed[k].event(window[k].as_bytes(), table))
            },
            Clock::Replay,
            &mut self.out,
        );
    }

    fn feed_each(&mut self, lines: &[String]) {
        for (i, line) in lines.iter().enumerate() {
            let ev = self
                .dec
                .decode(line.as_bytes())
                .expect("generated lines are valid");
            self.profiles.clear();
            self.profiles.extend(self.rules.matching(&ev));
            for &p in &self.profiles {
                match route(&self.rules, p, &ev, 1) {
                    Route::Owner(_) => self.engine.on_event(p, &ev, Clock::Replay, &mut self.out),
                    r => panic!("unexpected route {r:?}"),
                }
            }
            if (i + 1) % WINDOW == 0 {
                self.advance();
            }
        }
    }
}

#[test]
fn event_path_does_not_allocate() {
    event_path_allocates_nothing(false);
}

#[test]
fn batched_event_path_does_not_allocate() {
    event_path_allocates_nothing(true);
}

/// The same while a sliced snapshot capture is in progress: its copy-on-write hook and its
/// slices use only the buffers reserved when it began.
#[test]
fn event_path_does_not_allocate_during_a_capture() {
    event_path_allocates_nothing_with(false, true);
}

#[test]
fn batched_event_path_does_not_allocate_during_a_capture() {
    event_path_allocates_nothing_with(true, true);
}

fn event_path_allocates_nothing(batched: bool) {
    event_path_allocates_nothing_with(batched, false);
}

fn event_path_allocates_nothing_with(batched: bool, capturing: bool) {
    TRACE.store(std::env::var_os("ALLOC_TRACE").is_some(), Ordering::Relaxed);
    let cfg = Config::from_toml(CONFIG).expect("valid config");
    let rules = Arc::new(Rules::compile(&cfg).expect("valid rules"));
    let table = rules.field_table();
    let mut rig = Rig {
        dec: Decoder::new(
            rules.field_table(),
            cfg.limits.json_depth_max,
            cfg.limits.line_bytes_max as usize,
        ),
        engine: Engine::new(rules.clone(), &cfg, 0, None).expect("engine"),
        out: Out::with_capacity(8 << 20, 65_536),
        profiles: Vec::with_capacity(rules.profiles.len()),
        parsed: (0..WINDOW)
            .map(|_| Parsed::new(&table, cfg.limits.line_bytes_max as usize))
            .collect(),
        items: Vec::with_capacity(WINDOW * rules.profiles.len()),
        rules,
        slice_budget: None,
        slices: 0,
    };
    let mut rng = Rng(0x5e55_1011);
    let t0 = 1_750_000_000_000;
    let warm = lines(&mut rng, 5_000, 10_000, t0);
    let hot = lines(&mut rng, 100_000, 10_000, t0 + 50_000);
    rig.feed(&warm, batched);
    rig.out.clear();
    let before = rig.engine.stats().clone();
    assert!(
        rig.engine.live_sessions() > 1_000,
        "warm-up leaves sessions open"
    );

    let live_at_cut = rig.engine.live_sessions();
    if capturing {
        // Slices small enough that the capture (~60k free slots to walk, then the sessions)
        // spans most of the run, so that events meet pending sessions and copy them on write.
        rig.engine.capture_begin(CaptureBuffers::default());
        rig.slice_budget = Some(128);
    }
    ARMED.with(|a| a.set(true));
    rig.feed(&hot, batched);
    ARMED.with(|a| a.set(false));
    let allocations = COUNT.with(Cell::get);
    if capturing {
        assert!(
            rig.slice_budget.is_none(),
            "the capture did not complete during the run"
        );
        assert!(rig.slices > 100, "only {} slices", rig.slices);
        let captured = rig.engine.capture_take();
        let mut body = rkyv::util::AlignedVec::<16>::new();
        let meta = SnapshotMeta {
            shard: 0,
            shards: 1,
            generation: 1,
            wall_ms: 0,
            log_seq: 0,
        };
        let summary = captured.write_body(&mut body, meta).expect("to memory");
        assert_eq!(
            summary.sessions + summary.sub_sessions,
            u64::from(live_at_cut)
        );
        sessionizer::persist::snapshot_file::access_body(&body).expect("a valid archive");
    }

    // The measured stretch did all the kinds of work it claims to.
    let s = rig.engine.stats();
    let ended = |st: &sessionizer::engine::Stats| st.sessions_ended.iter().sum::<u64>();
    let did = [
        ("events", s.events - before.events),
        (
            "sessions started",
            s.sessions_started - before.sessions_started,
        ),
        ("sessions ended", ended(s) - ended(&before)),
        (
            "sub-sessions started",
            s.sub_sessions_started - before.sub_sessions_started,
        ),
        ("merges", s.merges - before.merges),
        ("late events", s.late - before.late),
    ];
    for (what, n) in did {
        assert!(n > 0, "the measured events did no {what}: {did:?}");
    }
    assert_eq!(allocations, 0, "{allocations} allocations while processing 100k events ({did:?}); rerun with ALLOC_TRACE=1");
    rig.engine.finish(&mut rig.out);
}
