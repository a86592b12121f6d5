//! The session engine: the pure core one shard owns outright. No sockets, threads or wall clock:
//! time arrives as an argument (`Clock`), so tests and `replay` drive it deterministically.
//!
//! Storage is reserved at construction: a table of 48-byte session heads, a block arena for
//! payloads (key, counters, captured values), a hash index keyed by (profile, key), and one
//! per-second slot wheel per profile clock. The event path allocates nothing.
//!
//! Invariants:
//! - Every live top-level session is reachable from the index through its key's chain
//!   (`Head::link`, newest start first), and is linked in its profile's wheel at or before its
//!   deadline second (lazily: a session whose deadline moved later stays in its earlier bucket and
//!   is re-linked when that bucket fires).
//! - A sub-session's `Head::link` is its parent's slot; the parent's payload lists it; it ends
//!   before its parent.
//! - An ended session leaves exactly one end marker (or is absorbed by a `session_merged`).
//!
//! `docs/semantics.md` is the contract this implements.

mod apply;
pub mod arena;
pub mod capture;
mod ending;
pub mod ids;
mod in_block;
pub mod index;
pub mod markers;
pub mod numa;
pub mod out;
pub mod payload;
pub mod prefetch;
pub mod restore;
pub mod rules;
pub mod snapshot;
mod subs;
pub mod table;
pub mod wheel;

use std::hash::BuildHasher;
use std::sync::Arc;

use crate::config::{Config, OnFull, TimeMode, RECORD_BYTES_MAX};
use crate::decode::Event;
use arena::Arena;
pub use arena::Pages;
use ids::IdGen;
use index::Index;
use markers::Summary;
use payload::Shape;
use rules::{ProfileId, ProfileRule, Rules};
use table::{Head, Table, NIL};
use wheel::Wheel;

pub use out::Out;

/// What one expiry pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// It stopped with due sessions left for another pass (after the output is delivered).
    pub left: bool,
    /// It ended at least one session (the runtime logs such a pass at once: see
    /// `runtime::durable`).
    pub ended: bool,
    /// It changed the engine: ended a session, held an event-time watermark
    /// (`ProfileClock::hold`), which the next accepted event of that profile is judged by, or
    /// moved a wheel on (re-linking what it found early), where later passes, evictions and
    /// links depend on it. A pass that did none of these can be left out of a replay.
    pub changed: bool,
}

/// Where time comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    /// A live run: the wall clock in epoch milliseconds.
    Wall(i64),
    /// Replay and tests: time comes only from the events themselves.
    Replay,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    Idle,
    MaxDuration,
    EndsWhen,
    StartsWhen,
    SplitOnChange,
    Evicted,
    EndOfInput,
    ParentEnded,
}

impl EndReason {
    pub const COUNT: usize = 8;
    pub const ALL: [EndReason; EndReason::COUNT] = [
        EndReason::Idle,
        EndReason::MaxDuration,
        EndReason::EndsWhen,
        EndReason::StartsWhen,
        EndReason::SplitOnChange,
        EndReason::Evicted,
        EndReason::EndOfInput,
        EndReason::ParentEnded,
    ];

    pub const fn label(self) -> &'static str {
        match self {
            EndReason::Idle => "idle",
            EndReason::MaxDuration => "max_duration",
            EndReason::EndsWhen => "ends_when",
            EndReason::StartsWhen => "starts_when",
            EndReason::SplitOnChange => "split_on_change",
            EndReason::Evicted => "evicted",
            EndReason::EndOfInput => "end_of_input",
            EndReason::ParentEnded => "parent_ended",
        }
    }
}

/// Plain per-shard counters; the runtime publishes them periodically (no atomics per event).
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub events: u64,
    pub enriched: u64,
    pub sessions_started: u64,
    pub sessions_ended: [u64; EndReason::COUNT],
    pub sub_sessions_started: u64,
    pub sub_sessions_ended: u64,
    /// Sub-sessions not started because the parent had `sub_sessions_per_session_max` open.
    pub sub_session_limit: u64,
    /// Sub-sessions not started because the session table or the arena was full: a
    /// sub-session does not evict (its parent's event has been applied already).
    pub sub_sessions_full: u64,
    pub merges: u64,
    pub late: u64,
    pub evictions: u64,
    pub rejections: u64,
    pub dead_letters: u64,
    /// Dead letters by reason (`session_table_full` is `rejections`); each is also counted in
    /// `dead_letters`.
    pub missing_keys: u64,
    pub keys_too_long: u64,
    pub bad_timestamps: u64,
    pub captures_dropped: u64,
    pub blocks_used: u64,
    pub blocks_total: u64,
    /// Live sessions per record profile (top-level profiles, then sub-session kinds).
    pub active_by_profile: Vec<u64>,
}

/// Which shard owns an event's session for one profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    Owner(u32),
    MissingKey,
    KeyTooLong,
}

/// FNV-1a, 32 bits, over the key's bytes: the documented hash clients put in the UDP steering
/// header. Chosen because every language can compute it in three lines.
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for &b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// Always inlined: it runs once per line on the ingest and replay paths, where the call cost
/// more than the key lookup it makes (replay 0.6–0.8% faster inlined).
#[inline(always)]
pub fn route(rules: &Rules, p: ProfileId, ev: &Event<'_>, shards: u32) -> Route {
    debug_assert!(shards > 0);
    match ev.get(rules.profiles[p as usize].key).key_bytes() {
        None => Route::MissingKey,
        Some(k) if k.len() > rules.key_bytes_max as usize => Route::KeyTooLong,
        // One shard owns every key: no hash to compute.
        Some(_) if shards == 1 => Route::Owner(0),
        Some(k) => Route::Owner(shard_of(fnv1a32(k), shards)),
    }
}

/// `hash % shards`, the documented owner rule, without a division for the usual power-of-two
/// shard counts (the division was a quarter of `route`'s time on one shard).
#[inline(always)]
pub fn shard_of(hash: u32, shards: u32) -> u32 {
    if shards.is_power_of_two() {
        hash & (shards - 1)
    } else {
        hash % shards
    }
}

/// Per-profile clock state on this shard.
#[derive(Clone, Copy, Debug)]
struct ProfileClock {
    /// Largest event time accepted (event time) or the monotone arrival time (processing). In
    /// event time on the wall clock, also raised to the watermark an expiry pass used plus
    /// the lateness ([`ProfileClock::hold`]).
    max_ts: i64,
    /// Wall time of the last event of this profile (event time: drives the idle advance).
    wall_last: i64,
}

const NONE_TS: i64 = i64::MIN;

impl ProfileClock {
    /// The clock a profile's sessions expire by: arrival time (processing) or the watermark.
    fn now(self, rule: &ProfileRule, clock: Clock) -> i64 {
        match (rule.time, clock) {
            (TimeMode::Processing, Clock::Wall(now)) => now.max(self.max_ts),
            (TimeMode::Processing, Clock::Replay) => self.max_ts,
            (TimeMode::Event, _) if self.max_ts == NONE_TS => NONE_TS,
            (TimeMode::Event, Clock::Wall(now)) => {
                let idle_advance = if self.wall_last == NONE_TS {
                    0
                } else {
                    (now - self.wall_last).max(0)
                };
                self.max_ts.saturating_add(idle_advance) - rule.allowed_lateness_ms
            }
            (TimeMode::Event, Clock::Replay) => self.max_ts - rule.allowed_lateness_ms,
        }
    }

    /// Keep the watermark an expiry pass is about to end sessions by: fold the idle advance
    /// into `max_ts`. Why: the next accepted event resets the idle advance, and the watermark
    /// would fall back to that event's own time less the lateness; an event behind the pass
    /// would then be accepted where the pass had already ended its key's session, and start
    /// another instead of joining it or being late.
    /// Returns whether it moved `max_ts` (the next event's watermark depends on it).
    fn hold(&mut self, rule: &ProfileRule, clock: Clock) -> bool {
        if let (TimeMode::Event, Clock::Wall(now)) = (rule.time, clock) {
            if self.max_ts != NONE_TS && self.wall_last != NONE_TS && now > self.wall_last {
                self.max_ts = self.max_ts.saturating_add(now - self.wall_last);
                self.wall_last = now;
                return true;
            }
        }
        false
    }
}

/// How many events ahead `on_batch` requests each level of a session's memory: the index
/// entry first, then the head it names, then the payload the head names, each level a few
/// events after the one it depends on has had time to arrive.
const LOOKAHEAD_INDEX: usize = 12;
const LOOKAHEAD_HEAD: usize = 8;
const LOOKAHEAD_PAYLOAD: usize = 4;
/// How far ahead an expiry pass requests the heads, then the payloads, of the sessions it
/// is about to end.
const EXPIRE_AHEAD_HEAD: usize = 8;
const EXPIRE_AHEAD_PAYLOAD: usize = 4;
/// Sessions an expiry pass detaches from its wheel at a time: few enough that their heads,
/// read by the drain, are still in the cache when the pass ends or re-links them.
const EXPIRE_CHUNK: usize = 256;
/// Lookahead state per event in flight; a power of two above the longest distance.
const LOOKAHEAD_RING: usize = 16;
const _: () = assert!(LOOKAHEAD_INDEX < LOOKAHEAD_RING && LOOKAHEAD_RING.is_power_of_two());
const _: () = assert!(LOOKAHEAD_PAYLOAD < LOOKAHEAD_HEAD && LOOKAHEAD_HEAD < LOOKAHEAD_INDEX);

/// What `on_batch` learnt about an upcoming event while requesting its memory.
#[derive(Clone, Copy, Debug)]
struct Lookahead<'e> {
    /// The key and its hash, when the event has a usable key (reused when it is processed).
    keyed: Option<(&'e [u8], u64)>,
    /// The slot its index entry probably names (`NIL`: none).
    slot: u32,
    /// The index's version when `slot` was read (`u64::MAX`: never).
    version: u64,
}

impl Lookahead<'_> {
    const NONE: Self = Lookahead {
        keyed: None,
        slot: NIL,
        version: u64::MAX,
    };
}
/// Record flag (engine-owned bit): the record is a sub-session.
const FLAG_SUB: u8 = 1;
/// Record flag (engine-owned bit): every metadata value of the session is captured, so its
/// events need not look at metadata any more (first seen wins). Only ever set by `apply`
/// from the stored payload; a merge keeps the survivor's, which stays true (it keeps its own
/// metadata when it has it).
const FLAG_META_DONE: u8 = 2;
/// How much of a var area `apply` reads when it looks only at state values (which come first).
const VAR_FRONT_BYTES: usize = 64;
/// Attempts to find a victim whose wheel bucket is accurate before evicting anyway.
const EVICT_SCAN_MAX: u32 = 64;

pub struct Engine {
    rules: Arc<Rules>,
    st: State,
}

struct State {
    table: Table,
    arena: Arena,
    index: Index,
    wheels: Vec<Wheel>,
    clocks: Vec<ProfileClock>,
    /// Record profile -> (parent profile, sub index), for sub-session kinds.
    sub_of: Vec<(u8, u8)>,
    /// Payload layout of each top-level profile (copied so `State` needs no `Rules` to load).
    layouts: Vec<rules::Layout>,
    /// Counter count of each record profile (used for sub-session kinds).
    sub_counters: Vec<usize>,
    ids: IdGen,
    hasher: foldhash::fast::FixedState,
    on_full: OnFull,
    key_bytes_max: usize,
    value_bytes_max: usize,
    open_per_key_max: u32,
    future_skew_ms: i64,
    /// Loaded payload of the session being worked on.
    pay: Vec<u8>,
    /// Second payload (merge partner, sub-session).
    pay2: Vec<u8>,
    /// Var-area rebuild target.
    var: Vec<u8>,
    /// Composite key of a sub-session (or a session's key while it is unchained).
    keybuf: Vec<u8>,
    /// A parent session's key while a sub-session marker is rendered.
    pkey: Vec<u8>,
    /// Sessions detached from a wheel bucket, processed after the drain.
    expired: Vec<u32>,
    /// The next slot a bounded `finish` looks at.
    finish_from: u32,
    stats: Stats,
    /// A sliced snapshot capture in progress, if any (`capture.rs`).
    cap: capture::Capture,
}

/// What the engine keeps of each record profile (top-level profiles, then sub-session kinds),
/// derived from the rules: `State`'s copies, and restore's for the rules of an older
/// configuration.
struct Kinds {
    /// Record profile -> (parent profile, sub index), for sub-session kinds.
    sub_of: Vec<(u8, u8)>,
    /// Payload layout of each top-level profile.
    layouts: Vec<rules::Layout>,
    /// Counter count of each record profile (used for sub-session kinds).
    sub_counters: Vec<usize>,
}

impl Kinds {
    fn of(rules: &Rules) -> Kinds {
        let top = rules.profiles.len();
        let mut sub_of = vec![(0u8, 0u8); top];
        for (pi, p) in rules.profiles.iter().enumerate() {
            for (si, s) in p.subs.iter().enumerate() {
                assert_eq!(s.record_profile as usize, sub_of.len());
                sub_of.push((pi as u8, si as u8));
            }
        }
        let sub_counters = (0..rules.record_profile_count())
            .map(|rp| match rp.checked_sub(top) {
                None => 0,
                Some(_) => {
                    let (pp, si) = sub_of[rp];
                    rules.profiles[pp as usize].subs[si as usize].counters.len()
                }
            })
            .collect();
        Kinds {
            layouts: rules.profiles.iter().map(|p| p.layout).collect(),
            sub_of,
            sub_counters,
        }
    }
}

impl Engine {
    /// The engine of shard `shard`, its memory reserved and written now.
    pub fn new(
        rules: Arc<Rules>,
        cfg: &Config,
        shard: u8,
        numa_node: Option<u32>,
    ) -> std::io::Result<Engine> {
        Self::with_pages(rules, cfg, shard, numa_node, Pages::Prefault)
    }

    /// [`Engine::new`], with the pages of the arena and the session table backed as `pages` says.
    pub fn with_pages(
        rules: Arc<Rules>,
        cfg: &Config,
        shard: u8,
        numa_node: Option<u32>,
        pages: Pages,
    ) -> std::io::Result<Engine> {
        let m = &cfg.memory;
        let top = rules.profiles.len();
        let Kinds {
            sub_of,
            layouts,
            sub_counters,
        } = Kinds::of(&rules);
        let arena = Arena::with_pages(m.arena_bytes.0, m.block_bytes, numa_node, pages)?;
        let stats = Stats {
            blocks_total: u64::from(arena.blocks_total()),
            active_by_profile: vec![0; rules.record_profile_count()],
            ..Stats::default()
        };
        // The allocator refuses what the machine cannot give: an error naming the key, not an
        // abort (the arena's own reservation reports its failure the same way).
        let no_memory = || {
            let n = u64::from(m.max_sessions);
            let head = std::mem::size_of::<Head>() as u64;
            let mib = (n * head + n * 8 * 8 / 7 + n * 4) >> 20;
            std::io::Error::new(
                std::io::ErrorKind::OutOfMemory,
                format!("memory.max_sessions = {n}: the session table, index and expiry list need about {mib} MiB per shard, and that much could not be allocated; lower max_sessions"),
            )
        };
        let table = Table::try_with_pages(m.max_sessions, pages).ok_or_else(no_memory)?;
        let index = Index::try_new(m.max_sessions).ok_or_else(no_memory)?;
        let mut expired = Vec::new();
        expired
            .try_reserve_exact(m.max_sessions as usize)
            .map_err(|_| no_memory())?;
        let st = State {
            table,
            arena,
            index,
            wheels: (0..top).map(|_| Wheel::new(cfg.slots.max, 0)).collect(),
            clocks: vec![
                ProfileClock {
                    max_ts: NONE_TS,
                    wall_last: NONE_TS
                };
                top
            ],
            sub_of,
            layouts,
            sub_counters,
            ids: IdGen::new(cfg.node_id, shard),
            hasher: foldhash::fast::FixedState::with_seed(0x5e55_1011_2e5e_ed01),
            on_full: m.on_full,
            key_bytes_max: cfg.limits.key_bytes_max as usize,
            value_bytes_max: cfg.limits.value_bytes_max as usize,
            open_per_key_max: cfg.limits.open_sessions_per_key_max,
            future_skew_ms: cfg.limits.future_skew_max.as_ms(),
            pay: Vec::with_capacity(RECORD_BYTES_MAX + 4096),
            pay2: Vec::with_capacity(RECORD_BYTES_MAX + 4096),
            var: Vec::with_capacity(RECORD_BYTES_MAX + 4096),
            keybuf: Vec::with_capacity(cfg.limits.key_bytes_max as usize + 16),
            pkey: Vec::with_capacity(cfg.limits.key_bytes_max as usize + 16),
            expired,
            finish_from: 0,
            stats,
            cap: capture::Capture::default(),
        };
        Ok(Engine { rules, st })
    }

    pub fn rules(&self) -> &Arc<Rules> {
        &self.rules
    }

    pub fn stats(&self) -> &Stats {
        &self.st.stats
    }

    pub fn live_sessions(&self) -> u32 {
        self.st.table.live()
    }

    /// Bytes reserved at construction: table, index, arena and wheels.
    pub fn bytes_reserved(&self) -> u64 {
        let s = &self.st;
        u64::from(s.table.capacity()) * std::mem::size_of::<Head>() as u64
            + s.index.bytes_reserved()
            + s.arena.bytes_reserved()
            + s.wheels.iter().map(|w| w.bytes_reserved()).sum::<u64>()
    }

    /// The last session-id sequence issued (carried across restarts by snapshots).
    pub fn id_sequence(&self) -> u64 {
        self.st.ids.seq()
    }

    pub fn on_event(&mut self, p: ProfileId, ev: &Event<'_>, clock: Clock, out: &mut Out) {
        self.st
            .on_event(&self.rules, p, ev, clock, out, Lookahead::NONE);
    }

    /// `on_event` for each item in order, with the same result, but with the memory of later
    /// items' sessions requested while earlier ones are processed: at 1M live sessions nearly
    /// every lookup misses the caches three times in a row (index entry, head, payload), and
    /// this overlaps those misses across events instead of paying them one after another.
    pub fn on_batch(&mut self, items: &[(ProfileId, Event<'_>)], clock: Clock, out: &mut Out) {
        self.on_batch_by(items.len(), |i| items[i], clock, out);
    }

    /// [`Engine::on_batch`] over `n` items produced by `item(i)` (called more than once per
    /// index, so it must be cheap and give the same item each time): callers that hold their
    /// events as detached [`crate::decode::Parsed`] views build them on the fly.
    pub fn on_batch_by<'e>(
        &mut self,
        n: usize,
        item: impl Fn(usize) -> (ProfileId, Event<'e>),
        clock: Clock,
        out: &mut Out,
    ) {
        let rules = &*self.rules;
        let st = &mut self.st;
        // The events in flight, by position modulo the ring size. Only the first level reads
        // the event; the others work from what it left in the ring.
        let mut ring = [Lookahead::NONE; LOOKAHEAD_RING];
        let request_index = |st: &State, ring: &mut [Lookahead<'e>; LOOKAHEAD_RING], j: usize| {
            if j < n {
                let (p, ev) = item(j);
                st.lookahead_index(rules, p, &ev, &mut ring[j % LOOKAHEAD_RING]);
            }
        };
        for j in 0..LOOKAHEAD_INDEX.min(n) {
            request_index(st, &mut ring, j);
        }
        for j in 0..LOOKAHEAD_HEAD.min(n) {
            st.lookahead_head(&mut ring[j % LOOKAHEAD_RING]);
        }
        for j in 0..LOOKAHEAD_PAYLOAD.min(n) {
            st.lookahead_payload(&ring[j % LOOKAHEAD_RING]);
        }
        for i in 0..n {
            request_index(st, &mut ring, i + LOOKAHEAD_INDEX);
            if i + LOOKAHEAD_HEAD < n {
                st.lookahead_head(&mut ring[(i + LOOKAHEAD_HEAD) % LOOKAHEAD_RING]);
            }
            if i + LOOKAHEAD_PAYLOAD < n {
                st.lookahead_payload(&ring[(i + LOOKAHEAD_PAYLOAD) % LOOKAHEAD_RING]);
            }
            let la = ring[i % LOOKAHEAD_RING];
            let (p, ev) = item(i);
            st.on_event(rules, p, &ev, clock, out, la);
        }
    }

    /// Swap in reloaded rules. Predicates, timeouts and new profiles (appended) apply at once;
    /// a change to an existing profile's session data layout (its captured fields, counters,
    /// aggregates, lists, sub-sessions or time mode), or a removed or reordered profile, cannot
    /// apply to live sessions: the reload is refused with the reason and the old rules stay.
    /// A shortened timeout applies to the open sessions too: they move to their new deadline's
    /// wheel slot here (one pass over the table, only when some timeout shrank), since left at
    /// the old one they would end only when the old timeout passed. Appended profiles renumber
    /// the sub-session kinds (numbered after every profile): the open sub-sessions take their
    /// new numbers here, in another such pass.
    pub fn set_rules(&mut self, rules: Arc<Rules>) -> Result<(), String> {
        check_compatible(&self.rules, &rules)?;
        let shrank = shortened_timeouts(&self.rules, &rules);
        let st = &mut self.st;
        let old_top = self.rules.profiles.len();
        // Sub-session kinds are numbered after every top-level profile: appended profiles move
        // each kind up by their number.
        let shift = rules.profiles.len() - old_top;
        let slots_max = st.wheels.first().map(|w| w.slots_max()).unwrap_or(7200);
        for _ in old_top..rules.profiles.len() {
            st.wheels.push(Wheel::new(slots_max, 0));
            st.clocks.push(ProfileClock {
                max_ts: NONE_TS,
                wall_last: NONE_TS,
            });
        }
        // Before the kinds change: a capture in progress copies what the pass changes as it
        // was, by the numbering it was cut with.
        if shift > 0 && self.rules.record_profile_count() > old_top {
            st.renumber_subs(shift as u8);
        }
        Kinds {
            sub_of: st.sub_of,
            layouts: st.layouts,
            sub_counters: st.sub_counters,
        } = Kinds::of(&rules);
        let mut active = vec![0; rules.record_profile_count()];
        for (rp, &n) in st.stats.active_by_profile.iter().enumerate() {
            active[if rp < old_top { rp } else { rp + shift }] = n;
        }
        st.stats.active_by_profile = active;
        st.key_bytes_max = rules.key_bytes_max as usize;
        st.value_bytes_max = rules.value_bytes_max as usize;
        self.rules = rules;
        if shrank.iter().any(|&s| s) {
            self.st.relink_shortened(&self.rules, &shrank);
        }
        Ok(())
    }

    /// End every session whose time has come by `clock` (tools and tests; the runtime uses
    /// [`Engine::advance_bounded`]).
    pub fn advance(&mut self, clock: Clock, out: &mut Out) {
        self.advance_with(clock, out, false);
    }

    /// [`Engine::advance`] that stops adding end markers to `out` once it is half full
    /// ([`Out::half_full`]), having ended at least one session per profile with any due. The
    /// sessions it did not reach stay due at the front of their wheel and the next call ends
    /// them; an event for one of them meanwhile ends it first, as it would any due session.
    /// [`Pass::left`] says whether some are left. Why: a mass expiry (a clock jump, a restart
    /// after downtime, the end of a burst of keys) would otherwise write every marker at once,
    /// and `out` would grow past its reserved size instead of being delivered in steps.
    pub fn advance_bounded(&mut self, clock: Clock, out: &mut Out) -> Pass {
        self.advance_with(clock, out, true)
    }

    fn advance_with(&mut self, clock: Clock, out: &mut Out, bounded: bool) -> Pass {
        let rules = &*self.rules;
        let live = self.st.table.live();
        // Every profile's hold first, to know whether the pass moved any (`expire` holds again
        // at the same clock: a no-op).
        let mut changed = false;
        for (c, rule) in self.st.clocks.iter_mut().zip(&rules.profiles) {
            changed |= c.hold(rule, clock);
        }
        let mut left = false;
        for p in 0..rules.profiles.len() {
            let stop = if bounded { Stop::HalfFull } else { Stop::Never };
            let cursor = self.st.wheels[p].cursor_s();
            left |= self.st.expire(rules, p, clock, out, stop);
            // A wheel drains only when its cursor moves on (then to the next second).
            changed |= self.st.wheels[p].cursor_s() != cursor;
        }
        self.st.stats.blocks_used =
            u64::from(self.st.arena.blocks_total() - self.st.arena.blocks_free());
        let ended = self.st.table.live() < live;
        Pass {
            left,
            ended,
            changed: changed || ended,
        }
    }

    /// End every open session: the due ones with their reason, the rest with `end_of_input`.
    pub fn finish(&mut self, out: &mut Out) {
        self.finish_with(out, false);
    }

    /// [`Engine::finish`] in steps bounded like [`Engine::advance_bounded`]: true while sessions
    /// are left for another call (after `out` is delivered).
    pub fn finish_bounded(&mut self, out: &mut Out) -> bool {
        self.finish_with(out, true)
    }

    fn finish_with(&mut self, out: &mut Out, bounded: bool) -> bool {
        if self.advance_with(Clock::Replay, out, bounded).left {
            return true;
        }
        let rules = &*self.rules;
        let st = &mut self.st;
        let mut ended = false;
        while st.finish_from < st.table.high_water() {
            let s = st.finish_from;
            if !st.table.is_live(s) || st.table.get(s).flags & FLAG_SUB != 0 {
                st.finish_from += 1;
                continue;
            }
            if bounded && ended && out.half_full() {
                return true;
            }
            ended = true;
            st.finish_from += 1;
            let p = st.table.get(s).profile as usize;
            let now = st.profile_clock(&rules.profiles[p], p, Clock::Replay);
            let reason = st
                .due_reason(&rules.profiles[p], s, now)
                .unwrap_or(EndReason::EndOfInput);
            st.end_session(rules, s, reason, now, out);
        }
        st.finish_from = 0;
        debug_assert_eq!(st.table.live(), 0);
        st.stats.blocks_used = u64::from(st.arena.blocks_total() - st.arena.blocks_free());
        false
    }
}

impl State {
    fn key_hash(&self, p: u8, key: &[u8]) -> u64 {
        self.hasher.hash_one((p, key))
    }

    /// The index hash of a sub-session of record kind `kind` (its key holds the parent's id):
    /// by the parent profile and the sub-session's place in it, not by the kind's number, which
    /// a reload that appends profiles moves up (`renumber_subs`), so that such a reload leaves
    /// the index alone.
    fn sub_key_hash(&self, kind: u8, key: &[u8]) -> u64 {
        self.hasher.hash_one((self.sub_of[kind as usize], key))
    }

    /// The first level of `on_batch`'s lookahead for an upcoming event: find its key, hash it
    /// and request the index entry. Like the next two levels, a hint only: nothing here changes
    /// the engine, and a wrong guess costs a wasted request. Writes its ring entry in place:
    /// returned from a call, the entry went through the stack and its wide reloads stalled on
    /// the narrower stores just made.
    #[inline]
    fn lookahead_index<'e>(
        &self,
        rules: &Rules,
        p: ProfileId,
        ev: &Event<'e>,
        la: &mut Lookahead<'e>,
    ) {
        let key = ev.key_text(rules.profiles[p as usize].key);
        la.keyed = key
            .filter(|k| k.len() <= self.key_bytes_max)
            .map(|k| (k, self.key_hash(p, k)));
        la.slot = NIL;
        if let Some((_, h)) = la.keyed {
            self.index.prefetch(h);
        }
    }

    /// The second level: read the index entry (now cached) and request the head it names.
    #[inline]
    fn lookahead_head(&self, la: &mut Lookahead<'_>) {
        if let Some((_, h)) = la.keyed {
            la.slot = self.index.guess(h);
            la.version = self.index.version();
            self.table.prefetch(la.slot);
        }
    }

    /// The third level: read the head (now cached) and request the first payload block.
    #[inline]
    fn lookahead_payload(&self, la: &Lookahead<'_>) {
        if la.slot != NIL && self.table.is_live(la.slot) {
            self.arena.prefetch(self.table.get(la.slot).data);
        }
    }

    fn find(&self, p: u8, hash: u64, key: &[u8]) -> u32 {
        self.index
            .find(hash, |s| self.is_key(s, p, key))
            .unwrap_or(NIL)
    }

    /// Whether the indexed session in slot `s` is profile `p`'s session of `key`.
    #[inline(always)]
    fn is_key(&self, s: u32, p: u8, key: &[u8]) -> bool {
        let h = self.table.get(s);
        h.profile == p && h.key_len as usize == key.len() && self.arena.starts_with(h.data, key)
    }

    /// `find`, answered by the lookahead's guess when the index has not changed since it was
    /// made and the guessed slot is the key's (the common case: no probe, and its slot and
    /// head are in the cache already).
    #[inline(always)]
    fn find_from(&self, la: &Lookahead<'_>, p: u8, hash: u64, key: &[u8]) -> u32 {
        if la.version == self.index.version() && (la.slot == NIL || self.is_key(la.slot, p, key)) {
            debug_assert_eq!(la.slot, self.find(p, hash, key));
            return la.slot;
        }
        self.find(p, hash, key)
    }

    /// The clock profile `p`'s sessions expire by (see [`ProfileClock::now`]).
    fn profile_clock(&self, rule: &ProfileRule, p: usize, clock: Clock) -> i64 {
        self.clocks[p].now(rule, clock)
    }

    /// The time of an event for its profile `rule`, whose clock has reached `max_ts`, or None
    /// when its timestamp is unusable (`future_skew_ms`: how far ahead of the reference clock
    /// an event time may be).
    fn event_time(
        rule: &ProfileRule,
        ev: &Event<'_>,
        clock: Clock,
        max_ts: i64,
        future_skew_ms: i64,
    ) -> Option<i64> {
        let from_field = || {
            rule.timestamp
                .and_then(|(f, fmt)| rules::event_timestamp_ms(ev, f, fmt))
        };
        match (rule.time, clock) {
            (TimeMode::Processing, Clock::Wall(now)) => Some(now.max(max_ts)),
            (TimeMode::Processing, Clock::Replay) => from_field().map(|t| t.max(max_ts)),
            (TimeMode::Event, _) => {
                let t = from_field()?;
                let reference = match clock {
                    Clock::Wall(now) => now,
                    Clock::Replay => max_ts,
                };
                (reference == NONE_TS || t <= reference.saturating_add(future_skew_ms)).then_some(t)
            }
        }
    }

    fn deadline(&self, rules: &Rules, s: u32) -> i64 {
        let h = self.table.get(s);
        if h.flags & FLAG_SUB != 0 {
            let (pp, si) = self.sub_of[h.profile as usize];
            return h.last_ts + rules.profiles[pp as usize].subs[si as usize].idle_timeout_ms;
        }
        let rule = &rules.profiles[h.profile as usize];
        let idle = h.last_ts + rule.idle_timeout_ms;
        match rule.max_duration_ms {
            Some(m) => idle.min(h.start_ts.saturating_add(m)),
            None => idle,
        }
    }

    /// Why a top-level session is over at clock `now`, if it is: the deadline it passed first
    /// (idle on a tie), so the reason does not depend on how late the expiry runs.
    fn due_reason(&self, rule: &ProfileRule, s: u32, now: i64) -> Option<EndReason> {
        let h = self.table.get(s);
        let idle = h.last_ts + rule.idle_timeout_ms;
        let max = rule.max_duration_ms.map(|m| h.start_ts.saturating_add(m));
        match max {
            Some(m) if m < idle && now > m => Some(EndReason::MaxDuration),
            _ if now > idle => Some(EndReason::Idle),
            _ => None,
        }
    }

    /// Why session `s` of `rule`'s wheel, past its deadline at `now`, ends: a sub-session idles
    /// out; a session ends with the deadline it passed first.
    fn timed_reason(&self, rule: &ProfileRule, s: u32, now: i64) -> EndReason {
        if self.table.get(s).flags & FLAG_SUB != 0 {
            EndReason::Idle
        } else {
            self.due_reason(rule, s, now).unwrap_or(EndReason::Idle)
        }
    }

    /// `la`: what the caller's lookahead found of the event's key and its session already
    /// (`on_batch`: its key and hash, an event without a usable key has none; the index entry
    /// it probably has), or [`Lookahead::NONE`].
    ///
    /// The branches marked `cold_path` are those an event joining its open session does not
    /// take (the steady state, nearly every event): the compiler then lays that path out as
    /// one straight run instead of jumping around the rare ones.
    fn on_event<'e>(
        &mut self,
        rules: &Rules,
        p: ProfileId,
        ev: &Event<'e>,
        clock: Clock,
        out: &mut Out,
        la: Lookahead<'e>,
    ) {
        let keyed = la.keyed;
        let pi = p as usize;
        let rule = &rules.profiles[pi];
        self.stats.events += 1;
        let key = match keyed.map(|(k, _)| k).or_else(|| ev.key_text(rule.key)) {
            Some(k) if k.len() <= self.key_bytes_max => k,
            found => {
                std::hint::cold_path();
                let reason = if found.is_some() {
                    self.stats.keys_too_long += 1;
                    "key_too_long"
                } else {
                    self.stats.missing_keys += 1;
                    "missing_key"
                };
                self.stats.dead_letters += 1;
                out.dead_letter_event(reason, &rule.name, ev.raw());
                return;
            }
        };
        // The profile's clock, read and updated here once.
        let c = &mut self.clocks[pi];
        let Some(t) = Self::event_time(rule, ev, clock, c.max_ts, self.future_skew_ms) else {
            std::hint::cold_path();
            self.stats.bad_timestamps += 1;
            self.stats.dead_letters += 1;
            out.dead_letter_event("bad_timestamp", &rule.name, ev.raw());
            return;
        };
        if rule.time == TimeMode::Event {
            let wm = c.now(rule, clock);
            if wm != NONE_TS && t < wm {
                std::hint::cold_path();
                self.stats.late += 1;
                markers::late_event(out, rule, key, t, wm, ev.raw());
                return;
            }
        }
        // Live, the watermark never runs ahead of the wall clock: an event from a fast clock
        // (within `future_skew_max`) joins its session at its own time but moves `max_ts` only
        // up to its arrival, so one bad source cannot make every other source's events late.
        let advance_to = match clock {
            Clock::Wall(now) => t.min(now),
            Clock::Replay => t,
        };
        c.max_ts = c.max_ts.max(advance_to);
        if let Clock::Wall(now) = clock {
            c.wall_last = now;
        }
        let now = c.now(rule, clock);
        let hash = keyed.map_or_else(|| self.key_hash(p, key), |(_, h)| h);
        debug_assert_eq!(hash, self.key_hash(p, key));

        // Walk the key's open sessions: end the ones already due, keep those the event touches.
        let mut cands = [NIL; 2];
        let mut n = 0;
        let mut s = self.find_from(&la, p, hash, key);
        while s != NIL {
            let next = self.table.get(s).link;
            if let Some(reason) = self.due_reason(rule, s, now) {
                std::hint::cold_path();
                self.end_session(rules, s, reason, now, out);
            } else {
                let h = self.table.get(s);
                if h.start_ts - rule.idle_timeout_ms <= t
                    && t <= h.last_ts + rule.idle_timeout_ms
                    && n < 2
                {
                    cands[n] = s;
                    n += 1;
                }
            }
            s = next;
        }

        let mut target = match n {
            0 => NIL,
            1 => cands[0],
            _ => {
                std::hint::cold_path();
                self.merge_or_pick(rules, pi, cands, t, key, hash, out)
            }
        };
        if target != NIL {
            if let Some(reason) = self.split_reason(rules, rule, target, ev, t) {
                std::hint::cold_path();
                self.end_session(rules, target, reason, now, out);
                target = NIL;
            }
        }
        let created = target == NIL;
        if created {
            std::hint::cold_path();
            target = match self.create(rules, pi, key, hash, t, clock, now, out) {
                Some(s) => s,
                None => {
                    self.stats.rejections += 1;
                    self.stats.dead_letters += 1;
                    out.dead_letter_event("session_table_full", &rule.name, ev.raw());
                    return;
                }
            };
        }
        let mut last = rules::LastField::NONE;
        self.apply(rules, rule, target, ev, t, &mut last);
        let h = *self.table.get(target);
        if created {
            std::hint::cold_path();
            self.stats.sessions_started += 1;
            let summary = summary(&h);
            markers::session_start(
                out,
                rule,
                &self.pay[..h.key_len as usize],
                summary,
                &self.pay,
            );
        }
        match ev.enriched_head() {
            _ if !out.events => {}
            Some((head, comma)) => {
                let member = &rule.text.member_head;
                markers::enriched_event(out, head, comma, member, h.id, h.count, h.start_ts)
            }
            None => {
                std::hint::cold_path();
                out.buf
                    .reserve(ev.raw().len() + markers::SESSION_MEMBER_ROOM);
                let member = &rule.text.member_head;
                ev.write_enriched_with(&mut out.buf, |b| {
                    markers::session_member(b, member, &mut out.high, h.id, h.count, h.start_ts)
                });
                out.finish(crate::config::Stream::Events);
            }
        }
        self.stats.enriched += 1;

        if !rule.subs.is_empty() {
            self.on_event_subs(rules, pi, target, ev, t, clock, out);
        }
        let ends = match rule.ends_when {
            Some(w) => rules.eval_reusing(w, ev, &mut last),
            None => false,
        };
        if ends {
            std::hint::cold_path();
            self.end_session(rules, target, EndReason::EndsWhen, now, out);
        }
    }

    /// An event within reach of two sessions of its key merges them (event time), unless the
    /// merged session would break `max_duration`; then it goes to the nearer one.
    #[allow(clippy::too_many_arguments)]
    fn merge_or_pick(
        &mut self,
        rules: &Rules,
        p: usize,
        cands: [u32; 2],
        t: i64,
        key: &[u8],
        hash: u64,
        out: &mut Out,
    ) -> u32 {
        let rule = &rules.profiles[p];
        let (a, b) = (*self.table.get(cands[0]), *self.table.get(cands[1]));
        let (early, late) = if (a.start_ts, a.id) <= (b.start_ts, b.id) {
            (cands[0], cands[1])
        } else {
            (cands[1], cands[0])
        };
        let (e, l) = (*self.table.get(early), *self.table.get(late));
        let span = e.last_ts.max(l.last_ts).max(t) - e.start_ts.min(l.start_ts).min(t);
        if rule.max_duration_ms.is_some_and(|m| span > m) {
            return if t >= l.start_ts { late } else { early };
        }
        self.merge(rules, p, early, late, t, key, hash, out);
        early
    }

    #[allow(clippy::too_many_arguments)]
    fn merge(
        &mut self,
        rules: &Rules,
        p: usize,
        early: u32,
        late: u32,
        t: i64,
        key: &[u8],
        hash: u64,
        out: &mut Out,
    ) {
        let rule = &rules.profiles[p];
        let l = &rule.layout;
        let base = key.len();
        self.cow(early);
        self.cow(late);
        // Sub-sessions live on processing-time profiles, which hold one open session per key and
        // so never merge; a restored archive can still hold two (it is checked record by record,
        // not against every invariant). The absorbed session's sub-sessions end with it rather
        // than outlive it.
        self.end_subs(rules, late, EndReason::ParentEnded, NONE_TS, out);
        let e_len = self.load(early, false);
        self.load(late, true);
        for i in 0..rule.counters.len() {
            payload::counter_add(
                &mut self.pay,
                base,
                l,
                i,
                payload::counter(&self.pay2, base, l, i),
            );
        }
        for (i, a) in rule.aggregates.iter().enumerate() {
            let v = payload::aggregate(&self.pay2, base, l, i);
            if !(v.is_nan() || v.is_infinite()) {
                payload::aggregate_apply(&mut self.pay, base, l, i, a.op, v);
            }
        }
        for i in 0..rule.split_on_change.len() {
            let h = payload::split_hash(&self.pay2, base, l, i);
            if h != 0 {
                payload::set_split_hash(&mut self.pay, base, l, i, h);
            }
        }
        self.var.clear();
        payload::merge_var(
            payload::var_area(&self.pay, base, l),
            payload::var_area(&self.pay2, base, l),
            rule.state.len(),
            rule.metadata.len(),
            &rule.lists,
            &mut self.var,
        );
        self.replace_var(early, e_len, base, l);
        let lh = *self.table.get(late);
        let eh = self.table.get_mut(early);
        eh.start_ts = eh.start_ts.min(lh.start_ts);
        eh.last_ts = eh.last_ts.max(lh.last_ts);
        eh.count = eh.count.saturating_add(lh.count);
        let survivor = eh.id;
        markers::session_merged(out, rule, key, survivor, lh.id, t);
        self.stats.merges += 1;
        self.remove_record(p as u8, late, hash, key);
    }

    /// Complete `pay`, which holds a prefix of the payload at `data`, to its `len` bytes.
    fn load_rest(&mut self, data: u32, len: usize) {
        let have = self.pay.len();
        if have < len {
            self.pay.resize(len, 0);
            self.arena.read(data, have, &mut self.pay[have..]);
        }
    }

    /// Store `self.var` as the var area of the payload in `self.pay` (length `old_len`) of
    /// session `s`. If the arena cannot grow it, keep the old var area and count the loss.
    fn replace_var(&mut self, s: u32, old_len: usize, base: usize, l: &rules::Layout) {
        self.cow(s);
        let fixed_end = base + l.fixed_bytes;
        let new_len = fixed_end + self.var.len();
        let data = self.table.get(s).data;
        if new_len <= RECORD_BYTES_MAX
            && (new_len == old_len || self.arena.resize(data, old_len, new_len))
        {
            self.pay.truncate(fixed_end);
            self.pay.extend_from_slice(&self.var);
            payload::put_u16(&mut self.pay, base + l.var_len_off, self.var.len() as u16);
            self.arena.write(data, 0, &self.pay);
        } else {
            self.stats.captures_dropped += 1;
            self.arena.write(data, 0, &self.pay[..fixed_end]);
        }
    }

    /// Load a session's payload into `pay` (or `pay2`); returns its length.
    fn load(&mut self, s: u32, second: bool) -> usize {
        let h = *self.table.get(s);
        let (layout_fixed, var_len_off) = self.fixed_of(h.profile, h.flags);
        let key_len = h.key_len as usize;
        let buf = if second {
            &mut self.pay2
        } else {
            &mut self.pay
        };
        buf.clear();
        buf.resize(key_len + layout_fixed, 0);
        self.arena.read(h.data, 0, buf);
        let var_len = payload::get_u16(buf, key_len + var_len_off) as usize;
        buf.resize(key_len + layout_fixed + var_len, 0);
        self.arena.read(
            h.data,
            key_len + layout_fixed,
            &mut buf[key_len + layout_fixed..],
        );
        buf.len()
    }

    /// (fixed bytes, var_len offset) of a record kind.
    fn fixed_of(&self, profile: u8, flags: u8) -> (usize, usize) {
        // Sub-session records keep only counters: their layout is derived on the fly.
        if flags & FLAG_SUB != 0 {
            let n = self.sub_counters[profile as usize];
            return (4 * n + 2, 4 * n);
        }
        let l = &self.layouts[profile as usize];
        (l.fixed_bytes, l.var_len_off)
    }
}

/// Why `new` cannot replace `old` under live sessions, if it cannot. Public so that the
/// runtime can check a reload once, before any shard applies it (every shard would decide alike).
/// Per record profile of `old` (top-level profiles, then sub-session kinds, numbered alike in
/// `new` since the two are compatible): whether `new` gives its sessions an earlier deadline (a
/// shorter idle timeout, or a shorter or new `max_duration`).
fn shortened_timeouts(old: &Rules, new: &Rules) -> Vec<bool> {
    let max = |p: &ProfileRule| p.max_duration_ms.unwrap_or(i64::MAX);
    let mut shrank = vec![false; new.record_profile_count()];
    for (pi, (a, b)) in old.profiles.iter().zip(&new.profiles).enumerate() {
        shrank[pi] = b.idle_timeout_ms < a.idle_timeout_ms || max(b) < max(a);
        for (x, y) in a.subs.iter().zip(&b.subs) {
            shrank[y.record_profile as usize] = y.idle_timeout_ms < x.idle_timeout_ms;
        }
    }
    shrank
}

pub fn check_compatible(old: &Rules, new: &Rules) -> Result<(), String> {
    if new.profiles.len() < old.profiles.len() {
        return Err(format!(
            "{} profiles were removed; removing a profile needs a restart",
            old.profiles.len() - new.profiles.len()
        ));
    }
    for (a, b) in old.profiles.iter().zip(&new.profiles) {
        let why = if a.name != b.name {
            Some("a profile was renamed or reordered")
        } else if a.time != b.time {
            Some("its time mode changed")
        } else if a.metadata.len() != b.metadata.len() || a.state.len() != b.state.len() {
            Some("its metadata or state fields changed in number")
        } else if a.counters.len() != b.counters.len()
            || a.split_on_change.len() != b.split_on_change.len()
        {
            Some("its counters or split_on_change fields changed in number")
        } else if a
            .aggregates
            .iter()
            .map(|x| x.op)
            .ne(b.aggregates.iter().map(|x| x.op))
        {
            Some("its aggregates changed")
        } else if a.lists.len() != b.lists.len() {
            Some("its lists changed in number")
        } else if a.subs.len() != b.subs.len()
            || a.subs
                .iter()
                .zip(&b.subs)
                .any(|(x, y)| x.counters.len() != y.counters.len())
        {
            Some("its sub-sessions changed")
        } else {
            None
        };
        if let Some(why) = why {
            return Err(format!("profile `{}`: {why}; the session data layout differs, so this change needs a restart", a.name));
        }
    }
    Ok(())
}

fn summary(h: &Head) -> Summary {
    Summary {
        id: h.id,
        start_ts: h.start_ts,
        last_ts: h.last_ts,
        count: h.count,
    }
}

/// A captured value as stored: the JSON token, or `null` when it exceeds the value limit.
fn captured(raw: &[u8], max: usize) -> &[u8] {
    if raw.len() > max {
        b"null"
    } else {
        raw
    }
}

/// A split-on-change field's stored hash; zero marks "never seen" in the payload.
fn value_hash(hasher: &impl BuildHasher, f: crate::decode::Field<'_>) -> Option<u64> {
    let bytes = f.key_bytes().or_else(|| f.raw_json())?;
    Some(hasher.hash_one(bytes).max(1))
}

impl State {
    /// A rule boundary between session `s` and the event (precedence per docs/semantics.md).
    fn split_reason(
        &mut self,
        rules: &Rules,
        rule: &ProfileRule,
        s: u32,
        ev: &Event<'_>,
        t: i64,
    ) -> Option<EndReason> {
        let h = *self.table.get(s);
        if let Some(m) = rule.max_duration_ms {
            if t.max(h.last_ts) - t.min(h.start_ts) > m {
                return Some(EndReason::MaxDuration);
            }
        }
        if rules.eval_opt(rule.starts_when, ev) {
            return Some(EndReason::StartsWhen);
        }
        if !rule.split_on_change.is_empty() {
            self.load(s, false);
            let base = h.key_len as usize;
            for (i, &f) in rule.split_on_change.iter().enumerate() {
                let stored = payload::split_hash(&self.pay, base, &rule.layout, i);
                if let Some(v) = value_hash(&self.hasher, ev.get(f)) {
                    if stored != 0 && stored != v {
                        return Some(EndReason::SplitOnChange);
                    }
                }
            }
        }
        None
    }

    /// Open a new session for (p, key) at time `t`, making room per `on_full` if needed.
    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        rules: &Rules,
        p: usize,
        key: &[u8],
        hash: u64,
        t: i64,
        clock: Clock,
        now: i64,
        out: &mut Out,
    ) -> Option<u32> {
        let rule = &rules.profiles[p];
        // Bound the open sessions of one key (out-of-order islands in event time).
        let mut chain_len = 0;
        let mut oldest = NIL;
        let mut s = self.find(p as u8, hash, key);
        while s != NIL {
            chain_len += 1;
            oldest = s;
            s = self.table.get(s).link;
        }
        if chain_len >= self.open_per_key_max && oldest != NIL {
            self.stats.evictions += 1;
            self.end_session(rules, oldest, EndReason::Evicted, now, out);
        }
        let len = key.len()
            + rule.layout.fixed_bytes
            + 2 * (rule.metadata.len() + rule.state.len())
            + rule.lists.len();
        if self.arena.blocks_for(len) > self.arena.blocks_total() {
            // Larger than the whole arena: no eviction could make room for it.
            return None;
        }
        let (slot, data) = loop {
            let slot = self.table.alloc();
            let data = if slot.is_some() {
                self.arena.alloc(len)
            } else {
                None
            };
            match (slot, data) {
                (Some(slot), Some(data)) => break (slot, data),
                (Some(slot), None) => self.table.free(slot),
                _ => {}
            }
            if self.end_one_due(rules, clock, out) {
                continue;
            }
            if self.on_full == OnFull::Reject || !self.make_room(rules, p, now, out) {
                return None;
            }
        };
        debug_assert!(
            rule.aggregates.len() <= payload::AGGREGATES_MAX,
            "config validation"
        );
        let ops = &mut [crate::config::AggregateOp::Sum; payload::AGGREGATES_MAX]
            [..rule.aggregates.len().min(payload::AGGREGATES_MAX)];
        for (o, a) in ops.iter_mut().zip(&rule.aggregates) {
            *o = a.op;
        }
        payload::init(
            &mut self.pay,
            key,
            Shape {
                layout: &rule.layout,
                aggregates: ops,
                values: rule.metadata.len() + rule.state.len(),
                lists: &rule.lists,
            },
        );
        debug_assert_eq!(self.pay.len(), len);
        self.arena.write(data, 0, &self.pay);
        let id = self.ids.next(clock);
        *self.table.get_mut(slot) = Head {
            id,
            start_ts: t,
            last_ts: t,
            count: 0,
            data,
            profile: p as u8,
            key_len: key.len() as u16,
            ..*self.table.get(slot)
        };
        self.chain_insert(p as u8, slot, hash, key);
        let due = due_s(self.deadline(rules, slot));
        self.link_new(p, slot, due, now);
        self.stats.active_by_profile[p] += 1;
        Some(slot)
    }

    /// Insert a new session into its key's chain (newest start first).
    fn chain_insert(&mut self, p: u8, slot: u32, hash: u64, key: &[u8]) {
        let head = self.find(p, hash, key);
        let start = self.table.get(slot).start_ts;
        if head == NIL {
            self.table.get_mut(slot).link = NIL;
            self.index.insert(hash, slot);
            return;
        }
        if start >= self.table.get(head).start_ts {
            self.table.get_mut(slot).link = head;
            self.index.replace(hash, head, slot);
            return;
        }
        let mut prev = head;
        loop {
            let next = self.table.get(prev).link;
            if next == NIL || start >= self.table.get(next).start_ts {
                self.table.get_mut(slot).link = next;
                self.cow(prev);
                self.table.get_mut(prev).link = slot;
                return;
            }
            prev = next;
        }
    }

    /// Unlink a top-level session from its key's chain and the index.
    fn chain_remove(&mut self, p: u8, slot: u32, hash: u64, key: &[u8]) {
        let head = self.find(p, hash, key);
        assert!(head != NIL, "a live session is reachable from the index");
        let next = self.table.get(slot).link;
        if head == slot {
            if next == NIL {
                self.index.remove(hash, slot);
            } else {
                self.index.replace(hash, slot, next);
            }
            return;
        }
        let mut prev = head;
        while self.table.get(prev).link != slot {
            prev = self.table.get(prev).link;
            assert!(prev != NIL, "a live session is on its key's chain");
        }
        self.cow(prev);
        self.table.get_mut(prev).link = next;
    }

    /// Link a new record into profile `p`'s wheel. An empty wheel first moves its cursor up to
    /// the deadline: a cursor left far behind (at start, or after a quiet spell) would clamp every
    /// deadline into its horizon bucket and blind `earliest()`.
    fn link_new(&mut self, p: usize, slot: u32, due: i64, now: i64) {
        let wheel = &mut self.wheels[p];
        // Never past the clock: an out-of-order session linked next may be due before `due`.
        let until = due.min(now.div_euclid(1000) + 1) - 1;
        if wheel.is_empty() {
            // No head changes.
            wheel.skip_empty_until(until);
        }
        self.cow_link(p, slot, due);
        self.wheels[p].link(self.table.heads_mut(), slot, due);
    }
}

/// When an expiry pass stops before everything due is ended (having ended at least one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    Never,
    /// Once the output is half full (`Engine::advance_bounded`).
    HalfFull,
    /// After one session (`end_one_due`): whatever the output holds, so that an event's
    /// records do not depend on how much of the output its caller delivered before.
    FirstEnd,
}

/// The wheel second at which a deadline has certainly passed (fires when clock >= due * 1000).
fn due_s(deadline_ms: i64) -> i64 {
    deadline_ms.div_euclid(1000) + 1
}

/// Whether an expiry pass up to second `until_s` ends a session with this deadline.
fn due_by(deadline_ms: i64, until_s: i64) -> bool {
    due_s(deadline_ms) <= until_s
}

#[cfg(test)]
mod tests;
