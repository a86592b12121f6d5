//! Engine throughput against its physical reference, in one run on one core.
//!
//! - `hashmap_baseline/foldhash_update_1M_keys`: a pre-sized hashbrown map with foldhash,
//!   `[u8; 16]` keys -> `(count, last_ts)`, updated in the same random key order as the engine
//!   benches. This is the floor a per-event session lookup cannot beat by much.
//! - `engine_web_1M_keys/on_batch`: the engine alone on pre-parsed events (decoded once, before
//!   the measurement) for the reference web-analytics profile (metadata ip and ua, state page,
//!   counters clicks and page_views, ends on logout) with 1M live sessions, `Clock::Replay`,
//!   time advancing 1 ms per 100 events, events handed over in batches of [`BATCH_EVENTS`]
//!   (`Engine::on_batch`), `advance` once per iteration and the output batch cleared every
//!   1024 events, as the runtime does. This is the figure the engine target is about.
//! - `engine_web_1M_keys/on_batch_live_clock`: the same on the wall clock (`Clock::Wall`, read
//!   once per batch), as the appliance runs this processing-time profile: an event's time is
//!   its arrival, so its `ts` is not read. The clock is the time the batch's lines carry, so
//!   sessions age as in the other rows.
//! - `engine_web_1M_keys/on_batch_hot_input`: the same, but each batch's lines are decoded
//!   just before it is handed over (not timed), so the events arrive in cache as they do
//!   behind the decoder; `on_batch` reads them from a million pre-parsed events in memory.
//! - `engine_web_1M_keys/on_batch_hot_live_clock`: both, the input in cache and the wall clock:
//!   the engine as the appliance's shards run it (decoded a window before, arrival time).
//! - `engine_web_1M_keys/on_batch_hot_live_clock_markers_only`: the same with the events stream
//!   off (`Out::events`), as the shards run when no output carries it: markers only.
//! - `engine_web_1M_keys/on_event`: the same, one `on_event` call per event (no lookahead).
//! - `engine_web_1M_keys/decode_only`: the JSON decoder alone on the same lines, for scale.
//! - `reload_1M_sessions/shorten_idle_timeout`: `Engine::set_rules` with the idle timeout cut from
//!   30 to 20 minutes, which moves every open session to its new deadline (the reload's one pass
//!   over the table, while the shard takes no events); the rules are put back, untimed, after
//!   each call. Per reload, not per event.
//! - `reload_1M_sessions/append_profile_renumber_subs`: `Engine::set_rules` appending a profile
//!   to one whose 1M sessions each hold an open sub-session: the sub-session kinds are numbered
//!   after every profile, so the reload gives the 1M open sub-sessions their new numbers.
//!
//! Memory per session is printed once, after the 1M sessions are open.
//!
//! Times are this thread's CPU time (`CLOCK_THREAD_CPUTIME_ID`), not wall time, so that other
//! work on a shared machine does not count as ours (it still costs us caches); `BENCH_CLOCK=wall`
//! switches to wall time. On an idle, dedicated core the two agree.
//!
//! Run: `cargo bench --bench engine -- --warm-up-time 1 --measurement-time 5`.

use criterion::{Criterion, SamplingMode, Throughput};
use sessionizer::config::Config;
use sessionizer::decode::{Decoder, Event, FieldTable, Parsed};
use sessionizer::engine::rules::{ProfileId, Rules};
use sessionizer::engine::{Clock, Engine, Out};
use std::hash::BuildHasher;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Live keys (one session each). `BENCH_KEYS` overrides it for profiling runs (e.g. under
/// callgrind, or with every session in cache); the recorded figures use the default.
static KEYS: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
    std::env::var("BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
});
/// Events per measured iteration.
const BATCH: usize = 100_000;
/// Events between `Out::clear` (the runtime's hand-over to sinks).
const OUT_EVERY: usize = 1024;
/// Events per `Engine::on_batch` call.
const BATCH_EVENTS: usize = 256;
const MAX_SESSIONS: u32 = 1_200_000;
const ARENA_MIB: u64 = 512;
const BLOCK_BYTES: u64 = 64;
const T0_MS: i64 = 1_750_000_000_000;
/// Width of every `ts` in the lines, so passes can restamp them in place.
const TS_DIGITS: usize = 13;

fn config() -> String {
    format!(
        r#"
[memory]
arena_bytes = "{ARENA_MIB}MiB"
block_bytes = {BLOCK_BYTES}
max_sessions = {MAX_SESSIONS}

[[profile]]
name = "web"
key = "user"
time = "processing"
timestamp = {{ field = "ts", format = "epoch_ms" }}
idle_timeout = "30m"
max_duration = "12h"
ends_when = {{ field = "type", eq = "logout" }}
metadata = ["ip", "ua"]
state = ["page"]

[[profile.counter]]
name = "clicks"
when = {{ field = "type", eq = "click" }}

[[profile.counter]]
name = "page_views"
when = {{ field = "type", eq = "page" }}
"#
    )
}

/// A start point of the benchmark clock (see the file comment).
#[derive(Clone, Copy)]
struct Stamp(Duration);

impl Stamp {
    fn now() -> Stamp {
        if wall_clock() {
            return Stamp(EPOCH.with(|e| e.elapsed()));
        }
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux supports.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
        Stamp(Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }

    fn elapsed(self) -> Duration {
        Stamp::now().0 - self.0
    }
}

thread_local! {
    static EPOCH: Instant = Instant::now();
}

fn wall_clock() -> bool {
    std::env::var("BENCH_CLOCK").is_ok_and(|v| v == "wall")
}

/// SplitMix64: deterministic data without an RNG dependency.
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

/// One event per key, in a random key order; all lines in one buffer.
struct Lines {
    buf: Vec<u8>,
    /// `(start, end, ts_offset)` of each line.
    spans: Vec<(u32, u32, u32)>,
    /// The key of each line, as the hash-map baseline's 16-byte key.
    keys: Vec<[u8; 16]>,
    /// Average bytes of the values a session captures (ip and ua tokens, page token).
    captured_bytes_avg: f64,
    key_bytes_avg: f64,
}

impl Lines {
    fn new(rng: &mut Rng) -> Lines {
        let mut order: Vec<u32> = (0..*KEYS as u32).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut buf = Vec::with_capacity(*KEYS * 180);
        let mut spans = Vec::with_capacity(*KEYS);
        let mut keys = Vec::with_capacity(*KEYS);
        let (mut captured, mut key_bytes) = (0usize, 0usize);
        for &k in &order {
            // Metadata is a function of the key, so every pass sees the same ip and ua.
            let ip = format!("\"10.{}.{}.{}\"", k >> 16, (k >> 8) & 255, k & 255);
            let ua = format!(
                "\"Mozilla/5.0 (X11; Linux x86_64; rv:{}) Gecko/20100101 Firefox/{}\"",
                100 + k % 30,
                100 + k % 30
            );
            let page = format!("\"/p/{}\"", k % 50);
            let ty = match rng.below(512) {
                0 => "logout",
                1..=200 => "page",
                _ => "click",
            };
            let key = format!("u{k}");
            let start = buf.len();
            buf.extend_from_slice(format!("{{\"user\":\"{key}\",\"ts\":").as_bytes());
            let ts_at = buf.len();
            buf.extend_from_slice(format!("{T0_MS:0w$}", w = TS_DIGITS).as_bytes());
            buf.extend_from_slice(
                format!(",\"type\":\"{ty}\",\"ip\":{ip},\"ua\":{ua},\"page\":{page}}}").as_bytes(),
            );
            spans.push((start as u32, buf.len() as u32, ts_at as u32));
            let mut kb = [0u8; 16];
            kb[..key.len()].copy_from_slice(key.as_bytes());
            keys.push(kb);
            captured += ip.len() + ua.len() + page.len();
            key_bytes += key.len();
        }
        Lines {
            buf,
            spans,
            keys,
            captured_bytes_avg: captured as f64 / *KEYS as f64,
            key_bytes_avg: key_bytes as f64 / *KEYS as f64,
        }
    }

    /// Give pass `pass` its timestamps: 1 ms per 100 events, continuing across passes.
    fn stamp(&mut self, pass: u64) {
        for (i, &(_, _, at)) in self.spans.iter().enumerate() {
            let ts = T0_MS + ((pass * *KEYS as u64 + i as u64) / 100) as i64;
            let digits = format!("{ts:0w$}", w = TS_DIGITS);
            self.buf[at as usize..at as usize + TS_DIGITS].copy_from_slice(digits.as_bytes());
        }
    }

    fn line(&self, i: usize) -> &[u8] {
        let (a, b, _) = self.spans[i];
        &self.buf[a as usize..b as usize]
    }
}

/// How [`Rig::feed`] hands events over.
#[derive(Clone, Copy, PartialEq)]
enum Feed {
    /// `Engine::on_batch`, `Clock::Replay`: each event's time is its `ts`.
    Batches,
    /// `Engine::on_batch` on the wall clock, as the appliance runs a processing-time profile:
    /// the clock reads, per batch, the time the lines carry.
    BatchesLive,
    /// `Engine::on_event` per event, `Clock::Replay`.
    Single,
}

struct Rig {
    rules: Arc<Rules>,
    dec: Decoder,
    engine: Engine,
    out: Out,
    lines: Lines,
    /// Every line decoded once, before measuring (restamping keeps the offsets valid: the
    /// timestamps have a fixed width).
    parsed: Vec<Parsed>,
    /// One batch's lines decoded just before it is handed over (`feed_hot`).
    window: Vec<Parsed>,
    /// Next line, and the pass it belongs to.
    cursor: usize,
    pass: u64,
}

impl Rig {
    /// Feed `n` pre-parsed events; returns the time spent, excluding restamping between passes.
    fn feed(&mut self, n: usize, how: Feed) -> Duration {
        let mut spent = Duration::ZERO;
        let mut left = n;
        while left > 0 {
            let take = self.run_length(left);
            let table = self.dec.table();
            let mut items: Vec<(ProfileId, Event<'_>)> = Vec::with_capacity(BATCH_EVENTS);
            let t = Stamp::now();
            let mut i = self.cursor;
            while i < self.cursor + take {
                let end = (i + BATCH_EVENTS).min(self.cursor + take);
                items.clear();
                let parsed = &self.parsed;
                push_items(
                    &self.rules,
                    table,
                    &self.lines,
                    i..end,
                    |j| &parsed[j],
                    &mut items,
                );
                match how {
                    Feed::Batches => self.engine.on_batch(&items, Clock::Replay, &mut self.out),
                    Feed::BatchesLive => {
                        let now = self.lines_ts(i);
                        self.engine
                            .on_batch(&items, Clock::Wall(now), &mut self.out)
                    }
                    Feed::Single => {
                        for (p, ev) in &items {
                            self.engine.on_event(*p, ev, Clock::Replay, &mut self.out);
                        }
                    }
                }
                if self.out.len() >= OUT_EVERY {
                    self.out.clear();
                }
                i = end;
            }
            self.end_run(take, how == Feed::BatchesLive);
            spent += t.elapsed();
            left -= take;
        }
        spent
    }

    /// The timestamp the current pass gave line `i` (see [`Lines::stamp`]): the wall clock of
    /// [`Feed::BatchesLive`], so that it moves as the replayed events' times do.
    fn lines_ts(&self, i: usize) -> i64 {
        T0_MS + ((self.pass * *KEYS as u64 + i as u64) / 100) as i64
    }

    /// [`Rig::feed`] in batches, with each batch's lines decoded just before it is handed over
    /// (not timed): the engine meets its input in cache, as it does behind the decoder in the
    /// replay and the appliance. `feed` reads its events from a million pre-parsed ones, mostly
    /// from memory. Times each batch on its own, so the clock's two reads per 256 events count.
    fn feed_hot(&mut self, n: usize, live: bool) -> Duration {
        let mut spent = Duration::ZERO;
        let mut left = n;
        while left > 0 {
            let take = self.run_length(left);
            let mut i = self.cursor;
            while i < self.cursor + take {
                let end = (i + BATCH_EVENTS).min(self.cursor + take);
                for j in i..end {
                    self.dec
                        .decode_into(self.lines.line(j), &mut self.window[j - i])
                        .expect("valid line");
                }
                let table = self.dec.table();
                let mut items: Vec<(ProfileId, Event<'_>)> = Vec::with_capacity(BATCH_EVENTS);
                let t = Stamp::now();
                let window = &self.window;
                push_items(
                    &self.rules,
                    table,
                    &self.lines,
                    i..end,
                    |j| &window[j - i],
                    &mut items,
                );
                let clock = if live {
                    Clock::Wall(self.lines_ts(i))
                } else {
                    Clock::Replay
                };
                self.engine.on_batch(&items, clock, &mut self.out);
                if self.out.len() >= OUT_EVERY {
                    self.out.clear();
                }
                spent += t.elapsed();
                i = end;
            }
            let t = Stamp::now();
            self.end_run(take, live);
            spent += t.elapsed();
            left -= take;
        }
        spent
    }

    /// Starts the next pass (restamped) when this one is over; then the events of this pass to
    /// feed next, at most `left`.
    fn run_length(&mut self, left: usize) -> usize {
        if self.cursor == *KEYS {
            self.cursor = 0;
            self.pass += 1;
            self.lines.stamp(self.pass);
        }
        left.min(*KEYS - self.cursor)
    }

    /// After a run of `take` events: the engine's timers run (on the wall clock when `live`),
    /// its output is handed over.
    fn end_run(&mut self, take: usize, live: bool) {
        let clock = if live {
            Clock::Wall(self.lines_ts(self.cursor + take))
        } else {
            Clock::Replay
        };
        self.engine.advance(clock, &mut self.out);
        self.out.clear();
        self.cursor += take;
    }

    fn decode_only(&mut self, n: usize) -> Duration {
        let t = Stamp::now();
        for j in 0..n {
            let ev = self
                .dec
                .decode(self.lines.line((self.cursor + j) % *KEYS))
                .expect("valid line");
            black_box(ev.raw().len());
        }
        t.elapsed()
    }
}

/// Appends the `(profile, event)` pairs of the lines in `range` to `items`, line `j` decoded in
/// `parsed(j)`.
fn push_items<'a>(
    rules: &Rules,
    table: &'a FieldTable,
    lines: &'a Lines,
    range: std::ops::Range<usize>,
    parsed: impl Fn(usize) -> &'a Parsed,
    items: &mut Vec<(ProfileId, Event<'a>)>,
) {
    for j in range {
        let ev = parsed(j).event(lines.line(j), table);
        for p in rules.matching(&ev) {
            items.push((p, ev));
        }
    }
}

fn setup() -> Rig {
    let cfg = Config::from_toml(&config()).expect("bench config is valid");
    let rules = Arc::new(Rules::compile(&cfg).expect("rules"));
    let dec = Decoder::new(
        rules.field_table(),
        cfg.limits.json_depth_max,
        cfg.limits.line_bytes_max as usize,
    );
    let engine = Engine::new(rules.clone(), &cfg, 0, None).expect("engine reserves its memory");
    let mut rng = Rng(0xbe9c_4a11);
    let mut lines = Lines::new(&mut rng);
    lines.stamp(0);
    let mut dec = dec;
    let parsed = (0..*KEYS)
        .map(|i| {
            let mut p = Parsed::new(dec.table(), 0);
            dec.decode_into(lines.line(i), &mut p).expect("valid line");
            p
        })
        .collect();
    let window = (0..BATCH_EVENTS)
        .map(|_| Parsed::new(dec.table(), 0))
        .collect();
    let mut rig = Rig {
        rules,
        dec,
        engine,
        out: Out::with_capacity(4 << 20, 4 * OUT_EVERY + BATCH_EVENTS * 4),
        lines,
        parsed,
        window,
        cursor: 0,
        pass: 0,
    };
    // Open every key's session (a logout line ends its session; the next pass reopens it).
    rig.feed(*KEYS, Feed::Batches);
    print_memory(&rig);
    rig
}

fn print_memory(rig: &Rig) {
    let live = f64::from(rig.engine.live_sessions());
    let st = rig.engine.stats();
    let slots = f64::from(MAX_SESSIONS);
    let table = 48.0 * slots;
    let index = (u64::from(MAX_SESSIONS) * 8).div_ceil(7) as f64 * 8.0;
    let arena_used = st.blocks_used as f64 * BLOCK_BYTES as f64;
    let arena_links = st.blocks_used as f64 * 4.0;
    let total = table + index + arena_used + arena_links;
    let per = total / live;
    let captured = rig.lines.captured_bytes_avg;
    let key = rig.lines.key_bytes_avg;
    println!("\n== memory per session ({live:.0} live sessions, max_sessions {MAX_SESSIONS}, block_bytes {BLOCK_BYTES}) ==");
    println!(
        "  table : 48 B x {MAX_SESSIONS} slots              = {:>7.1} MiB  {:>6.1} B/live session",
        table / 1048576.0,
        table / live
    );
    println!(
        "  index : 8 B x ceil(8/7 x slots) (9.14 B/slot)  = {:>7.1} MiB  {:>6.1} B/live session",
        index / 1048576.0,
        index / live
    );
    println!(
        "  arena : {} of {} blocks used x {BLOCK_BYTES} B          = {:>7.1} MiB  {:>6.1} B/live session ({:.2} blocks/session)",
        st.blocks_used,
        st.blocks_total,
        arena_used / 1048576.0,
        arena_used / live,
        st.blocks_used as f64 / live
    );
    println!(
        "  arena next-links: 4 B x blocks used                {:>7.1} MiB  {:>6.1} B/live session",
        arena_links / 1048576.0,
        arena_links / live
    );
    println!("  total {:.1} B/session; captured values (ip+ua+page JSON tokens) avg {captured:.1} B, key avg {key:.1} B", per);
    println!(
        "  => overhead {:.1} B/session beyond captured values ({:.1} B beyond captured values and key)",
        per - captured,
        per - captured - key
    );
    println!(
        "  (engine.bytes_reserved() = {:.1} MiB incl. the whole arena)\n",
        rig.engine.bytes_reserved() as f64 / 1048576.0
    );
}

fn hashmap_baseline(c: &mut Criterion, keys: &[[u8; 16]]) {
    let mut map: hashbrown::HashMap<[u8; 16], (u64, u64), foldhash::fast::FixedState> =
        hashbrown::HashMap::with_capacity_and_hasher(
            *KEYS,
            foldhash::fast::FixedState::with_seed(7),
        );
    for (i, k) in keys.iter().enumerate() {
        map.insert(*k, (1, i as u64));
    }
    let mut g = c.benchmark_group("hashmap_baseline");
    g.throughput(Throughput::Elements(BATCH as u64))
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20);
    let mut cursor = 0usize;
    let mut ts = 0u64;
    g.bench_function("foldhash_update_1M_keys", |b| {
        b.iter_custom(|iters| {
            let t = Stamp::now();
            for _ in 0..iters {
                for _ in 0..BATCH {
                    let e = map.entry(keys[cursor]).or_insert((0, 0));
                    e.0 += 1;
                    e.1 = ts;
                    ts += 1;
                    cursor += 1;
                    if cursor == *KEYS {
                        cursor = 0;
                    }
                }
            }
            t.elapsed()
        })
    });
    g.finish();
    black_box(map.hasher().hash_one(keys[0]));
}

fn engine_benches(c: &mut Criterion, rig: &mut Rig) {
    let mut g = c.benchmark_group("engine_web_1M_keys");
    g.throughput(Throughput::Elements(BATCH as u64))
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20);
    g.bench_function("on_batch", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| rig.feed(BATCH, Feed::Batches)).sum())
    });
    g.bench_function("on_batch_live_clock", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| rig.feed(BATCH, Feed::BatchesLive)).sum())
    });
    g.bench_function("on_batch_hot_input", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| rig.feed_hot(BATCH, false)).sum())
    });
    g.bench_function("on_batch_hot_live_clock", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| rig.feed_hot(BATCH, true)).sum())
    });
    // As the appliance runs it when no output carries the events stream (`Out::events`).
    rig.out.events = false;
    g.bench_function("on_batch_hot_live_clock_markers_only", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| rig.feed_hot(BATCH, true)).sum())
    });
    rig.out.events = true;
    g.bench_function("on_event", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| rig.feed(BATCH, Feed::Single)).sum())
    });
    g.bench_function("decode_only", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| rig.decode_only(BATCH)).sum())
    });
    g.finish();
    assert!(
        rig.engine.live_sessions() as usize > *KEYS * 9 / 10,
        "sessions stayed open during the run"
    );
}

/// The reload that shortens a timeout, with the rig's sessions open (see the file comment).
fn reload_bench(c: &mut Criterion, rig: &mut Rig) {
    let shorter = |text: String| {
        let cfg =
            Config::from_toml(&text.replace(r#"idle_timeout = "30m""#, r#"idle_timeout = "20m""#))
                .expect("bench config is valid");
        Arc::new(Rules::compile(&cfg).expect("rules"))
    };
    let (short, long) = (shorter(config()), rig.rules.clone());
    let mut g = c.benchmark_group("reload_1M_sessions");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    g.bench_function("shorten_idle_timeout", |b| {
        b.iter_custom(|iters| {
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                let t = Stamp::now();
                rig.engine.set_rules(short.clone()).expect("compatible");
                spent += t.elapsed();
                rig.engine.set_rules(long.clone()).expect("compatible");
            }
            spent
        })
    });
    g.finish();
    println!(
        "reload that shortens the idle timeout, {} open sessions: {:.1} ms (median)",
        rig.engine.live_sessions(),
        median_ns("reload_1M_sessions", "shorten_idle_timeout").unwrap_or(f64::NAN) / 1e6
    );
}

/// A processing-time profile whose every session holds one open sub-session, followed by
/// `extra` profiles that match nothing (what a reload appends).
fn sub_config(extra: usize) -> String {
    let mut t = format!(
        r#"
[memory]
arena_bytes = "{ARENA_MIB}MiB"
block_bytes = {BLOCK_BYTES}
max_sessions = {sub_max}

[[profile]]
name = "app"
key = "user"
time = "processing"
idle_timeout = "30m"

[[profile.sub_session]]
name = "tab"
key = "tab"
idle_timeout = "10m"
"#,
        sub_max = 2 * *KEYS + 1024,
    );
    for i in 0..extra {
        t += &format!(
            "\n[[profile]]\nname = \"x{i}\"\nmatch = {{ field = \"never\", exists = true }}\nkey = \"user\"\nidle_timeout = \"1m\"\n"
        );
    }
    t
}

/// An engine on [`sub_config`] with no extra profile, a session and a sub-session open for
/// each of the bench's keys.
fn sub_engine() -> Engine {
    let cfg = Config::from_toml(&sub_config(0)).expect("bench config is valid");
    let rules = Arc::new(Rules::compile(&cfg).expect("rules"));
    let mut engine = Engine::new(rules.clone(), &cfg, 0, None).expect("engine reserves memory");
    let mut dec = Decoder::new(rules.field_table(), 32, 4096);
    let mut out = Out::with_capacity(4 << 20, 4096);
    for k in 0..*KEYS {
        let line = format!(r#"{{"user":"u{k}","tab":"t{}"}}"#, k % 7);
        let ev = dec.decode(line.as_bytes()).expect("valid line");
        engine.on_event(0, &ev, Clock::Wall(T0_MS), &mut out);
        if out.half_full() {
            out.clear();
        }
    }
    engine
}

/// The reload that appends a profile with every key's sub-session open: sub-session kinds are
/// numbered after every profile, so the reload gives each open sub-session its new number in
/// one pass over the table, while the shard takes no events. Each call appends one more
/// profile; the engine is rebuilt, untimed, before the config's limit of 200 profiles.
fn renumber_bench(c: &mut Criterion) {
    // Built on the first call: a filtered run that skips this bench skips its set-up too.
    let mut engine: Option<Engine> = None;
    let mut appended: Vec<Arc<Rules>> = Vec::new();
    let mut next = 0;
    let mut g = c.benchmark_group("reload_1M_sessions");
    g.sampling_mode(SamplingMode::Flat).sample_size(10);
    g.bench_function("append_profile_renumber_subs", |b| {
        b.iter_custom(|iters| {
            if appended.is_empty() {
                // Rules with 1, 2, ... profiles appended: reload `n` takes the `n`th.
                appended = (1..150)
                    .map(|n| {
                        let cfg = Config::from_toml(&sub_config(n)).expect("bench config is valid");
                        Arc::new(Rules::compile(&cfg).expect("rules"))
                    })
                    .collect();
            }
            let mut spent = Duration::ZERO;
            for _ in 0..iters {
                if engine.is_none() || next == appended.len() {
                    engine = Some(sub_engine());
                    next = 0;
                }
                let e = engine.as_mut().expect("built above");
                let t = Stamp::now();
                e.set_rules(appended[next].clone())
                    .expect("an appended profile is compatible");
                spent += t.elapsed();
                next += 1;
            }
            spent
        })
    });
    g.finish();
    if let Some(engine) = &engine {
        println!(
            "reload that appends a profile, {} open sessions and sub-sessions: {:.1} ms (median)",
            engine.live_sessions(),
            median_ns("reload_1M_sessions", "append_profile_renumber_subs").unwrap_or(f64::NAN)
                / 1e6
        );
    }
}

/// Criterion's median (ns per iteration) of a finished benchmark, from its estimates file.
fn median_ns(group: &str, bench: &str) -> Option<f64> {
    let target = std::env::var("CARGO_TARGET_DIR").unwrap_or_else(|_| "target".into());
    let path = format!("{target}/criterion/{group}/{bench}/new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["median"]["point_estimate"].as_f64()
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let mut rig = setup();
    hashmap_baseline(&mut c, &rig.lines.keys);
    engine_benches(&mut c, &mut rig);
    reload_bench(&mut c, &mut rig);
    drop(rig);
    renumber_bench(&mut c);
    c.final_summary();

    let per_event = |g: &str, b: &str| median_ns(g, b).map(|ns| ns / BATCH as f64);
    let base = per_event("hashmap_baseline", "foldhash_update_1M_keys");
    let batch = per_event("engine_web_1M_keys", "on_batch");
    let live = per_event("engine_web_1M_keys", "on_batch_live_clock");
    let hot = per_event("engine_web_1M_keys", "on_batch_hot_input");
    let hot_live = per_event("engine_web_1M_keys", "on_batch_hot_live_clock");
    let markers_only = per_event("engine_web_1M_keys", "on_batch_hot_live_clock_markers_only");
    let single = per_event("engine_web_1M_keys", "on_event");
    let dec = per_event("engine_web_1M_keys", "decode_only");
    let clock = if wall_clock() {
        "wall time"
    } else {
        "thread CPU time"
    };
    println!("\n== per-event medians (ns, {clock}) and throughput ==");
    let show = |name: &str, ns: Option<f64>| match (ns, base) {
        (Some(ns), Some(b)) => println!(
            "  {name:<34} {ns:>7.1} ns/event  {:>6.2} M events/s  {:>5.2} x baseline",
            1e3 / ns,
            b / ns
        ),
        (Some(ns), None) => println!(
            "  {name:<34} {ns:>7.1} ns/event  {:>6.2} M events/s",
            1e3 / ns
        ),
        (None, _) => println!("  {name:<34} (no criterion estimate found; filtered out?)"),
    };
    show("hashmap baseline (foldhash, 1M)", base);
    show("engine, on_batch (pre-parsed)", batch);
    show("engine, on_batch (wall clock)", live);
    show("engine, on_batch (input in cache)", hot);
    show("engine, on_batch (in cache, wall)", hot_live);
    show("  the same, markers only", markers_only);
    show("engine, on_event (pre-parsed)", single);
    show("decode only", dec);
}
