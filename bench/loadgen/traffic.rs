//! The traffic model: which key sends next, and the bytes of each event, deterministic from a
//! seed.
//!
//! A key lives through bursts and pauses. A burst (a session) has a geometric number of events
//! (mean `burst_mean`) separated by exponential in-session gaps (mean `gap_mean_ns`, capped at
//! [`GAP_CAP_FACTOR`] × the mean so a gap can never look like an idle timeout); after its last
//! event the key rests at least `pause_ns` (set it above the profile's idle timeout) in a FIFO.
//! The [`Scheduler`] is driven by the send loop's clock (the intended send time when open-loop):
//! at each send slot it emits the active key that is due, or when none is due it starts a new
//! session with the key that has rested longest. The number of concurrently active sessions thus
//! settles by itself at about `rate × gap`, whatever the rate; keys that are asked to start
//! before their pause is over, or an active key emitted early because every key is busy, are
//! counted (`pause_violations`, `early_emits`) and reported, since they mean `--keys` is too
//! small for the rate.
//!
//! Memory is bounded by the key count: a FIFO slot per key, and a ring of time buckets holding
//! at most one entry per key; buckets reach their working size in the first gaps of a run and
//! keep it, so emitting an event allocates nothing after that warm-up. Every decision
//! draws from one [`Rng`], so the same seed, key range and clock give the same bytes.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::Path;

use crate::nexmark::BidEncoder;
use crate::wire;

/// The longest in-session gap, as a multiple of its mean (e^-10 of the draws are capped).
pub const GAP_CAP_FACTOR: u64 = 10;
/// Time buckets per mean gap (about): the scheduler may emit an event up to one bucket early.
const BUCKETS_PER_GAP: u64 = 32;
/// Buckets are 2^10 ns (≈1 µs) to 2^20 ns (≈1 ms) wide, and their number a power of two, so
/// that finding one is a shift and a mask.
const BUCKET_SHIFT_MIN: u32 = 10;
const BUCKET_SHIFT_MAX: u32 = 20;
/// Longest session, in events.
pub const BURST_EVENTS_MAX: u32 = 1_000_000;
/// Keys one generator can hold (≈24 bytes each).
pub const KEYS_MAX: u64 = 50_000_000;
/// Longest generated event, padding included.
pub const PAYLOAD_BYTES_MAX: usize = 16 * 1024;

/// wyrand: a small, fast, statistically sound generator; not for cryptography.
#[derive(Clone, Debug)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // splitmix64 of the seed so that nearby seeds start far apart.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng {
            state: z ^ (z >> 31),
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.state) * u128::from(self.state ^ 0xe703_7ed1_a0b4_28db);
        (t >> 64) as u64 ^ t as u64
    }

    /// Uniform in `0..n` (Lemire's multiply-shift; the bias is below 2^-64 × n).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Exponential with mean `mean_ns`, capped at `cap_ns`.
    pub fn exp_ns(&mut self, mean_ns: u64, cap_ns: u64) -> u64 {
        if mean_ns == 0 {
            return 0;
        }
        let draw = -(1.0 - self.unit()).ln() * mean_ns as f64;
        (draw as u64).min(cap_ns)
    }

    /// Geometric on 1, 2, … with mean `mean` (1 when `mean` <= 1), capped.
    pub fn geometric(&mut self, mean: f64, cap: u32) -> u32 {
        if mean <= 1.0 {
            return 1;
        }
        let p = 1.0 / mean;
        let u = 1.0 - self.unit(); // (0, 1]
        let extra = (u.ln() / (1.0 - p).ln()).floor();
        if extra >= f64::from(cap) {
            cap
        } else {
            1 + extra as u32
        }
    }
}

/// Per-key timing of the bursty-session model.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct SessionModel {
    pub gap_mean_ns: u64,
    pub pause_ns: u64,
    pub burst_mean: f64,
}

impl SessionModel {
    /// Keys the model needs at `rate` events/s so that no key restarts before its pause ends:
    /// sessions start at `rate / burst` per second, each holds its key for about
    /// `(burst - 1) × gap + pause`.
    pub fn keys_needed(&self, rate: f64) -> f64 {
        let burst = self.burst_mean.max(1.0);
        let held_s = ((burst - 1.0) * self.gap_mean_ns as f64 + self.pause_ns as f64) / 1e9;
        rate / burst * held_s
    }
}

/// One scheduling decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pick {
    /// The global key id.
    pub key: u64,
    /// The first event of a session.
    pub first: bool,
    /// The last event of a session (it may also be the first).
    pub last: bool,
}

/// Counters of the traffic model, summed over sender threads in the report.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct TrafficStats {
    pub sessions_started: u64,
    /// A key restarted before `pause_ns` had passed: raise `--keys` or lower the rate.
    pub pause_violations: u64,
    /// An active key was emitted before it was due because every key was busy.
    pub early_emits: u64,
    /// Replayed lines without the key member (hash 0: steered to one core, one connection).
    pub replay_lines_without_key: u64,
}

impl TrafficStats {
    pub fn add(&mut self, other: &TrafficStats) {
        self.sessions_started += other.sessions_started;
        self.pause_violations += other.pause_violations;
        self.early_emits += other.early_emits;
        self.replay_lines_without_key += other.replay_lines_without_key;
    }
}

/// A key in a session: who, and how many events it still has to emit after the pending one.
#[derive(Clone, Copy, Debug)]
struct Active {
    key: u32,
    left: u32,
}

/// Picks which key emits at each send slot (see the module documentation).
pub struct Scheduler {
    model: SessionModel,
    rng: Rng,
    key_base: u64,
    key_stride: u64,
    keys: usize,
    gap_cap_ns: u64,
    bucket_shift: u32,
    /// Absolute index of the oldest bucket that may hold entries.
    cursor: u64,
    /// A ring of time buckets, each a stack of the keys due in it. The state of an active key
    /// lives in its entry, so emitting reads memory in order rather than chasing keys.
    buckets: Vec<Vec<Active>>,
    active: usize,
    /// Keys not in a session, with the time their pause ends, oldest first.
    resting: VecDeque<(u32, u64)>,
    stats: TrafficStats,
}

impl Scheduler {
    /// A scheduler over the global keys `key_base + i × key_stride` for `i` in `0..keys`.
    pub fn new(
        model: SessionModel,
        keys: u64,
        key_base: u64,
        key_stride: u64,
        seed: u64,
    ) -> Scheduler {
        assert!(
            keys > 0 && keys <= KEYS_MAX,
            "keys {keys} not in 1..={KEYS_MAX}"
        );
        assert!(key_stride > 0);
        let keys = keys as usize;
        let mut rng = Rng::new(seed);
        let gap_cap_ns = model.gap_mean_ns.saturating_mul(GAP_CAP_FACTOR);
        let bucket_shift = (model.gap_mean_ns / BUCKETS_PER_GAP)
            .max(1)
            .ilog2()
            .clamp(BUCKET_SHIFT_MIN, BUCKET_SHIFT_MAX);
        let ring = ((gap_cap_ns >> bucket_shift) as usize + 2).next_power_of_two();
        let mut order: Vec<u32> = (0..keys as u32).collect();
        for i in (1..keys).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            order.swap(i, j);
        }
        let mut resting = VecDeque::with_capacity(keys);
        resting.extend(order.into_iter().map(|key| (key, 0u64)));
        // Buckets grow to their working size in the first gaps and keep it; together they never
        // hold more than `keys` entries.
        let bucket_capacity = (keys / ring).clamp(1, 1024);
        Scheduler {
            model,
            rng,
            key_base,
            key_stride,
            keys,
            gap_cap_ns,
            bucket_shift,
            cursor: 0,
            buckets: (0..ring)
                .map(|_| Vec::with_capacity(bucket_capacity))
                .collect(),
            active: 0,
            resting,
            stats: TrafficStats::default(),
        }
    }

    pub fn stats(&self) -> TrafficStats {
        self.stats
    }

    /// Sessions in progress.
    #[cfg(test)]
    pub fn active(&self) -> usize {
        self.active
    }

    /// The key that emits at model time `now_ns` (non-decreasing from call to call).
    pub fn next(&mut self, now_ns: u64) -> Pick {
        if let Some(entry) = self.pop_due(now_ns) {
            return self.continue_session(entry, now_ns);
        }
        match self.resting.pop_front() {
            Some((key, rest_until_ns)) => {
                if rest_until_ns > now_ns {
                    self.stats.pause_violations += 1;
                }
                self.stats.sessions_started += 1;
                let burst = self.rng.geometric(self.model.burst_mean, BURST_EVENTS_MAX);
                let last = self.after_emit(
                    Active {
                        key,
                        left: burst - 1,
                    },
                    now_ns,
                );
                Pick {
                    key: self.global(key),
                    first: true,
                    last,
                }
            }
            None => {
                // Every key is in a session: emit the earliest one ahead of its time.
                self.stats.early_emits += 1;
                let entry = self.pop_earliest();
                self.continue_session(entry, now_ns)
            }
        }
    }

    fn continue_session(&mut self, entry: Active, now_ns: u64) -> Pick {
        assert!(entry.left > 0);
        self.active -= 1;
        let last = self.after_emit(
            Active {
                key: entry.key,
                left: entry.left - 1,
            },
            now_ns,
        );
        Pick {
            key: self.global(entry.key),
            first: false,
            last,
        }
    }

    /// Files a key after it emitted at `now_ns`: into a bucket if its session goes on, else
    /// into the resting FIFO. Returns whether that was the session's last event.
    fn after_emit(&mut self, entry: Active, now_ns: u64) -> bool {
        if entry.left == 0 {
            assert!(self.resting.len() < self.keys);
            self.resting
                .push_back((entry.key, now_ns.saturating_add(self.model.pause_ns)));
            return true;
        }
        let gap_ns = self.rng.exp_ns(self.model.gap_mean_ns, self.gap_cap_ns);
        self.insert(entry, now_ns.saturating_add(gap_ns), now_ns);
        false
    }

    fn global(&self, local: u32) -> u64 {
        self.key_base + u64::from(local) * self.key_stride
    }

    fn ring(&self) -> u64 {
        self.buckets.len() as u64
    }

    fn slot(&self, index: u64) -> usize {
        (index & (self.ring() - 1)) as usize
    }

    fn insert(&mut self, entry: Active, due_ns: u64, now_ns: u64) {
        if self.active == 0 {
            self.cursor = now_ns >> self.bucket_shift;
        }
        let index = (due_ns >> self.bucket_shift).clamp(self.cursor, self.cursor + self.ring() - 1);
        let slot = self.slot(index);
        // Order within one bucket (1/32 of a mean gap) does not matter: a stack will do.
        self.buckets[slot].push(entry);
        self.active += 1;
        assert!(self.active <= self.keys);
    }

    fn pop_due(&mut self, now_ns: u64) -> Option<Active> {
        if self.active == 0 {
            return None;
        }
        // Entries lie in [cursor, cursor + ring): at most `ring` empty buckets are skipped.
        let now_index = now_ns >> self.bucket_shift;
        while self.cursor <= now_index {
            let slot = self.slot(self.cursor);
            if let Some(entry) = self.buckets[slot].pop() {
                return Some(entry);
            }
            if self.cursor == now_index {
                return None;
            }
            self.cursor += 1;
        }
        None
    }

    fn pop_earliest(&mut self) -> Active {
        assert!(self.active > 0);
        for offset in 0..self.ring() {
            let slot = self.slot(self.cursor + offset);
            if let Some(entry) = self.buckets[slot].pop() {
                return entry;
            }
        }
        unreachable!("{} active keys but every bucket is empty", self.active);
    }
}

/// Shape of the clickstream events (`run`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClickParams {
    pub tenants: u32,
    pub pages: u32,
    pub payload_bytes: usize,
    /// Percent of sessions whose last event is a `logout`.
    pub logout_pct: u32,
}

/// `type` weights of the events that are not a session's closing logout.
const TYPE_WEIGHTS: [(&str, u64); 4] = [("page", 55), ("click", 30), ("cart", 10), ("buy", 5)];
const PAD: [u8; 1024] = [b'x'; 1024];

/// Appends `,"<name>":"` + filler + `"}` so the event that starts at `out[start]` is
/// `target_bytes` long (or as short as it can be when its fields already exceed that).
pub fn write_padding(out: &mut Vec<u8>, start: usize, name: &[u8], target_bytes: usize) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name);
    out.extend_from_slice(b"\":\"");
    let mut missing = target_bytes.saturating_sub(out.len() - start + 2);
    while missing > 0 {
        let take = missing.min(PAD.len());
        out.extend_from_slice(&PAD[..take]);
        missing -= take;
    }
    out.extend_from_slice(b"\"}");
}

/// Writes clickstream events.
pub struct ClickEncoder {
    params: ClickParams,
    /// FNV-1a of the key prefix `u`.
    prefix_hash: u32,
}

impl ClickEncoder {
    pub fn new(params: ClickParams) -> ClickEncoder {
        assert!(params.tenants > 0 && params.pages > 0 && params.logout_pct <= 100);
        assert!(params.payload_bytes <= PAYLOAD_BYTES_MAX);
        ClickEncoder {
            params,
            prefix_hash: wire::fnv1a32(b"u"),
        }
    }

    /// Appends one event for `pick` to `out`; returns the steering hash of its key.
    pub fn encode(
        &self,
        out: &mut Vec<u8>,
        pick: Pick,
        ts_ms: u64,
        sent_ns: Option<u64>,
        rng: &mut Rng,
    ) -> u32 {
        let start = out.len();
        let mut digits = [0u8; wire::U64_DIGITS_MAX];
        let key_digits = wire::format_u64(pick.key, &mut digits);
        let hash = wire::fnv1a32_continue(self.prefix_hash, key_digits);
        out.extend_from_slice(b"{\"user\":\"u");
        out.extend_from_slice(key_digits);
        out.extend_from_slice(b"\",\"tenant\":\"t");
        // The tenant is a property of the user: a mix of the key, not of the thread.
        let tenant =
            (pick.key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) % u64::from(self.params.tenants);
        wire::write_u64(out, tenant);
        out.extend_from_slice(b"\",\"type\":\"");
        let kind = if pick.last && rng.below(100) < u64::from(self.params.logout_pct) {
            "logout"
        } else {
            let mut draw = rng.below(100);
            let mut chosen = TYPE_WEIGHTS[0].0;
            for (name, weight) in TYPE_WEIGHTS {
                if draw < weight {
                    chosen = name;
                    break;
                }
                draw -= weight;
            }
            chosen
        };
        out.extend_from_slice(kind.as_bytes());
        out.extend_from_slice(b"\",\"page\":\"/p/");
        wire::write_u64(out, rng.below(u64::from(self.params.pages)));
        out.extend_from_slice(b"\",\"ts\":");
        wire::write_u64(out, ts_ms);
        if let Some(sent_ns) = sent_ns {
            out.extend_from_slice(b",\"sent_ns\":");
            wire::write_u64(out, sent_ns);
        }
        write_padding(out, start, b"pad", self.params.payload_bytes);
        hash
    }
}

/// The event formats the generator can write.
pub enum Encoder {
    Click(ClickEncoder),
    Bid(BidEncoder),
}

/// A synthetic source: the scheduler picks the key, the encoder writes the event.
pub struct Generator {
    scheduler: Scheduler,
    rng: Rng,
    encoder: Encoder,
}

impl Generator {
    /// The generator of sender `thread` of `threads`: it owns every `threads`-th key, so
    /// threads never share a key and each thread's stream is deterministic.
    pub fn new(
        model: SessionModel,
        keys: u64,
        encoder: Encoder,
        seed: u64,
        thread: u32,
        threads: u32,
    ) -> Generator {
        assert!(thread < threads);
        let owned =
            keys / u64::from(threads) + u64::from(u64::from(thread) < keys % u64::from(threads));
        assert!(
            owned > 0,
            "fewer keys ({keys}) than sender threads ({threads})"
        );
        let thread_seed = seed ^ u64::from(thread).wrapping_mul(0xd6e8_feb8_6659_fd93);
        Generator {
            scheduler: Scheduler::new(
                model,
                owned,
                u64::from(thread),
                u64::from(threads),
                thread_seed,
            ),
            rng: Rng::new(thread_seed ^ 0x5555_5555_5555_5555),
            encoder,
        }
    }

    /// Appends the event of model time `model_ns` to `out` (which must hold only complete
    /// events: the encoder pads what it appends).
    pub fn next(
        &mut self,
        model_ns: u64,
        ts_ms: u64,
        sent_ns: Option<u64>,
        out: &mut Vec<u8>,
    ) -> Emitted {
        let pick = self.scheduler.next(model_ns);
        let hash = match &self.encoder {
            Encoder::Click(encoder) => encoder.encode(out, pick, ts_ms, sent_ns, &mut self.rng),
            Encoder::Bid(encoder) => {
                encoder.encode(out, pick, model_ns, ts_ms, sent_ns, &mut self.rng)
            }
        };
        Emitted {
            key: pick.key,
            hash,
        }
    }

    pub fn stats(&self) -> TrafficStats {
        self.scheduler.stats()
    }
}

/// What the sink needs to know of an event besides its bytes.
#[derive(Clone, Copy, Debug)]
pub struct Emitted {
    /// Key identity for batching (the global key id, or the key hash for replay).
    pub key: u64,
    /// FNV-1a 32 of the key, for the steering header.
    pub hash: u32,
}

/// A JSON-lines file sent line by line.
pub struct Replay {
    reader: BufReader<File>,
    line: Vec<u8>,
    key_name: memchr::memmem::Finder<'static>,
    lines_without_key: u64,
}

/// Bytes the replay reader buffers.
const REPLAY_BUFFER_BYTES: usize = 1 << 20;

impl Replay {
    pub fn open(path: &Path, key_field: &str) -> io::Result<Replay> {
        let file = File::open(path)?;
        let quoted = format!("\"{key_field}\"").into_bytes();
        Ok(Replay {
            reader: BufReader::with_capacity(REPLAY_BUFFER_BYTES, file),
            line: Vec::with_capacity(64 * 1024),
            key_name: memchr::memmem::Finder::new(&quoted).into_owned(),
            lines_without_key: 0,
        })
    }

    /// Appends the next non-empty line (without its newline) to `out`; `None` at the end.
    pub fn next(&mut self, out: &mut Vec<u8>) -> io::Result<Option<Emitted>> {
        loop {
            self.line.clear();
            if self.reader.read_until(b'\n', &mut self.line)? == 0 {
                return Ok(None);
            }
            while matches!(self.line.last(), Some(b'\n' | b'\r')) {
                self.line.pop();
            }
            if self.line.is_empty() {
                continue;
            }
            let hash = match wire::member_value(&self.line, &self.key_name) {
                Some(raw) => wire::key_hash_of_raw(raw),
                None => {
                    self.lines_without_key += 1;
                    0
                }
            };
            out.extend_from_slice(&self.line);
            return Ok(Some(Emitted {
                key: u64::from(hash),
                hash,
            }));
        }
    }

    pub fn lines_without_key(&self) -> u64 {
        self.lines_without_key
    }
}

/// Where a sender thread's events come from.
pub enum Source {
    Generated(Box<Generator>),
    Replay(Box<Replay>),
}

impl Source {
    /// Appends the next event to `out`; `None` when the source is exhausted (replay only).
    pub fn next(
        &mut self,
        model_ns: u64,
        ts_ms: u64,
        sent_ns: Option<u64>,
        out: &mut Vec<u8>,
    ) -> io::Result<Option<Emitted>> {
        match self {
            Source::Generated(generator) => Ok(Some(generator.next(model_ns, ts_ms, sent_ns, out))),
            Source::Replay(replay) => replay.next(out),
        }
    }

    pub fn stats(&self) -> TrafficStats {
        match self {
            Source::Generated(generator) => generator.stats(),
            Source::Replay(replay) => TrafficStats {
                replay_lines_without_key: replay.lines_without_key(),
                ..TrafficStats::default()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn model() -> SessionModel {
        SessionModel {
            gap_mean_ns: 50_000_000,
            pause_ns: 2_000_000_000,
            burst_mean: 20.0,
        }
    }

    fn click() -> Encoder {
        Encoder::Click(ClickEncoder::new(ClickParams {
            tenants: 4,
            pages: 1000,
            payload_bytes: 150,
            logout_pct: 30,
        }))
    }

    fn stream(seed: u64, events: u64) -> Vec<u8> {
        let mut generator = Generator::new(model(), 10_000, click(), seed, 0, 1);
        let mut out = Vec::new();
        for i in 0..events {
            let t = i * 100_000; // 10k events/s of model time.
            generator.next(t, 1_732_500_000_000 + t / 1_000_000, Some(t), &mut out);
            out.push(b'\n');
        }
        out
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let a = stream(7, 20_000);
        assert_eq!(a, stream(7, 20_000));
        assert_ne!(a, stream(8, 20_000));
    }

    #[test]
    fn events_are_json_of_the_requested_size() {
        let bytes = stream(1, 2_000);
        for line in bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            assert_eq!(line.len(), 150, "{}", String::from_utf8_lossy(line));
            let value: serde_json::Value = serde_json::from_slice(line).expect("valid JSON");
            let user = value["user"].as_str().expect("user");
            assert!(user.starts_with('u'));
            assert!(value["ts"].as_u64().is_some() && value["sent_ns"].as_u64().is_some());
            assert!(["page", "click", "cart", "buy", "logout"]
                .contains(&value["type"].as_str().unwrap()));
        }
    }

    #[test]
    fn hash_is_fnv_of_the_user_string() {
        let mut generator = Generator::new(model(), 1000, click(), 3, 0, 1);
        let mut out = Vec::new();
        let emitted = generator.next(0, 0, None, &mut out);
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            emitted.hash,
            wire::fnv1a32(value["user"].as_str().unwrap().as_bytes())
        );
    }

    /// Gap, pause and burst statistics over 3M events (300 s of model time at 10k/s).
    #[test]
    fn gaps_pauses_and_bursts_follow_the_model() {
        for seed in [1u64, 2] {
            let model = model();
            let rate = 10_000u64;
            let keys = (model.keys_needed(rate as f64) * 2.0) as u64;
            let mut scheduler = Scheduler::new(model, keys, 0, 1, seed);
            let mut last_ns: HashMap<u64, u64> = HashMap::new();
            let (mut gap_sum, mut gaps, mut pause_min, mut pauses) = (0u64, 0u64, u64::MAX, 0u64);
            let (mut sessions, mut events) = (0u64, 0u64);
            let period_ns = 1_000_000_000 / rate;
            for i in 0..3_000_000u64 {
                let now = i * period_ns;
                let pick = scheduler.next(now);
                events += 1;
                if pick.first {
                    sessions += 1;
                }
                if let Some(previous) = last_ns.insert(pick.key, now) {
                    if pick.first {
                        pause_min = pause_min.min(now - previous);
                        pauses += 1;
                    } else {
                        gap_sum += now - previous;
                        gaps += 1;
                    }
                }
            }
            let stats = scheduler.stats();
            assert_eq!(stats.pause_violations, 0, "seed {seed}");
            assert_eq!(stats.early_emits, 0, "seed {seed}");
            assert!(pauses > 1000, "seed {seed}: {pauses} pauses");
            assert!(
                pause_min >= model.pause_ns,
                "seed {seed}: pause {pause_min}"
            );
            let gap_mean = gap_sum as f64 / gaps as f64;
            let expected = model.gap_mean_ns as f64;
            assert!(
                (gap_mean / expected - 1.0).abs() < 0.05,
                "seed {seed}: gap mean {gap_mean}"
            );
            let burst_mean = events as f64 / sessions as f64;
            assert!(
                (burst_mean / model.burst_mean - 1.0).abs() < 0.05,
                "seed {seed}: burst {burst_mean}"
            );
            // Little's law: about rate × gap × (burst-1)/burst sessions are active.
            let active = scheduler.active() as f64;
            let little = rate as f64 * 0.05 * 19.0 / 20.0;
            assert!(
                (active / little - 1.0).abs() < 0.25,
                "seed {seed}: active {active} vs {little}"
            );
        }
    }

    #[test]
    fn too_few_keys_is_counted_not_hidden() {
        let mut scheduler = Scheduler::new(model(), 10, 0, 1, 1);
        for i in 0..100_000u64 {
            scheduler.next(i * 100_000);
        }
        let stats = scheduler.stats();
        assert!(stats.pause_violations + stats.early_emits > 0);
    }

    #[test]
    fn threads_own_disjoint_keys() {
        let mut seen = [
            std::collections::HashSet::new(),
            std::collections::HashSet::new(),
        ];
        for (thread, keys) in seen.iter_mut().enumerate() {
            let mut scheduler = Scheduler::new(model(), 50, thread as u64, 2, 9);
            for i in 0..10_000u64 {
                keys.insert(scheduler.next(i * 1_000_000).key);
            }
        }
        assert!(seen[0].is_disjoint(&seen[1]));
        assert!(seen[0].iter().all(|k| k % 2 == 0) && seen[1].iter().all(|k| k % 2 == 1));
    }

    #[test]
    fn zero_gap_makes_contiguous_bursts() {
        let model = SessionModel {
            gap_mean_ns: 0,
            pause_ns: 1_000_000,
            burst_mean: 5.0,
        };
        let mut scheduler = Scheduler::new(model, 100, 0, 1, 4);
        let mut current = None;
        for i in 0..10_000u64 {
            let pick = scheduler.next(i * 1_000);
            if !pick.first {
                assert_eq!(Some(pick.key), current);
            }
            current = Some(pick.key);
        }
    }

    #[test]
    fn geometric_and_exponential_means() {
        let mut rng = Rng::new(11);
        let n = 200_000;
        let geo: u64 = (0..n)
            .map(|_| u64::from(rng.geometric(20.0, BURST_EVENTS_MAX)))
            .sum();
        assert!((geo as f64 / n as f64 / 20.0 - 1.0).abs() < 0.03);
        let exp: u64 = (0..n).map(|_| rng.exp_ns(1_000_000, u64::MAX)).sum();
        assert!((exp as f64 / n as f64 / 1e6 - 1.0).abs() < 0.03);
        assert!((0..n).all(|_| rng.below(7) < 7));
    }
}
