//! One shard: the state a pinned executor owns (engine, decoder, output batch, sink handle,
//! outgoing hand-offs, counters) and the synchronous data path over it.
//!
//! Every task of a shard (UDP loops, TCP connections, hand-off receivers, the ticker) reaches
//! this state through `Ctx::st`, a `RefCell` borrowed only between awaits, never across one.
//! What must be awaited (a full hand-off queue, a full `block` sink) is decided here and done by
//! the async helpers at the bottom, so a task that waits never blocks the others.
//!
//! Routing invariant: an event is processed by a profile only on the shard that owns the
//! profile's key (`route`); an event is handed to each other owner at most once, and the receiver
//! runs only the profiles it owns. Unmatched events pass through on the receiving shard.

use super::counters::LocalCounters;
use super::durable::Durable;
use super::handoff::{batch_lines, Batch, HandoffOut};
use super::ops::ShardMetrics;
use crate::config::{Stream, Transport};
use crate::decode::{Decoder, Parsed};
use crate::engine::rules::{ProfileId, Rules};
use crate::engine::{route, Clock, Engine, Out, Route};
use crate::ingest::lines::TOO_LONG_PREFIX_BYTES;
use crate::ingest::transport_label;
use crate::output::ShardOutput;
use crate::persist::producer;
use glommio::channels::shared_channel::ConnectedSender;
use glommio::sync::Semaphore;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

/// Lines decoded ahead of the engine: their events owned here are applied as one batch
/// (`Engine::on_batch_by`, which overlaps their session lookups). Within a window, dead letters
/// and pass-throughs are written as their lines are read, the engine's records after them.
pub const WINDOW_LINES: usize = 64;

/// Where one matching profile sends an event.
#[derive(Clone, Copy)]
enum Dest {
    Here,
    Peer,
    MissingKey,
    KeyTooLong,
}

/// Outcome of feeding a run of lines to the shard.
#[derive(Debug, Default, Clone, Copy)]
pub struct Progress {
    /// Bytes of the input consumed (whole lines).
    pub consumed: usize,
    /// Stopped before a line that needs a hand-off buffer: send ready batches, then resume.
    pub stalled: bool,
    /// Stopped because a `block` sink's queue is full and its pending batch has started to
    /// grow: wait until the output takes it, then resume.
    pub output_full: bool,
    /// Events that needed at least one hand-off.
    pub handed_off: u32,
    /// Lines consumed (non-empty ones: each has a producer sequence number).
    pub lines: u64,
}

/// The producer an acknowledged connection named in its hello line, and the sequence number
/// its next line gets (`persist::producer`).
#[derive(Debug, Clone)]
pub struct ProducerCursor {
    pub id: Vec<u8>,
    pub next: u64,
}

pub struct Shard {
    pub id: u32,
    pub shards: u32,
    rules: Arc<Rules>,
    pub engine: Engine,
    dec: Decoder,
    pub out: Out,
    pub output: ShardOutput,
    pub handoff: HandoffOut,
    pub c: LocalCounters,
    /// Scratch: (profile, destination) of the event being routed; capacity = profile count.
    routes: Vec<(ProfileId, Dest, u32)>,
    line_bytes_max: usize,
    /// Deliver the output batch to the sinks once it holds this many bytes.
    deliver_bytes: usize,
    /// Latency histogram, records per stream, and the published sample (`runtime::ops`).
    pub metrics: ShardMetrics,
    /// The event log and its bookkeeping, when `persist.dir` is set (`runtime::durable`).
    pub durable: Option<Durable>,
    /// Scratch for the tagged form of a producer's line.
    tagged: Vec<u8>,
    /// The window: decoded lines not yet applied, where each lies in the input being fed, and
    /// the (profile, line) pairs this shard applies. Empty between calls.
    parsed: Vec<Parsed>,
    spans: Vec<(u32, u32)>,
    batch: Vec<(ProfileId, u16)>,
    /// Input bytes in the window; it is applied at `window_bytes_max`, which bounds the
    /// records a window adds to `out` past `deliver_bytes`.
    window_bytes: usize,
    window_bytes_max: usize,
}

/// Room for unescaped strings in each window slot; a slot grows (once, up to the line limit)
/// only for a line with more escaped text than that.
const PARSED_SCRATCH_BYTES: usize = 4096;

fn window_slots(dec: &Decoder) -> Vec<Parsed> {
    (0..WINDOW_LINES)
        .map(|_| Parsed::new(dec.table(), PARSED_SCRATCH_BYTES))
        .collect()
}

impl Shard {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u32,
        shards: u32,
        rules: Arc<Rules>,
        engine: Engine,
        dec: Decoder,
        out_bytes: usize,
        output: ShardOutput,
        handoff: HandoffOut,
        line_bytes_max: usize,
    ) -> Shard {
        assert!(id < shards && shards as usize <= crate::config::SHARDS_MAX);
        let profiles = rules.profiles.len();
        let metrics = ShardMetrics::new(&rules);
        let parsed = window_slots(&dec);
        let mut out = Out::with_capacity(out_bytes, 8192);
        out.events = output.subscribes(Stream::Events);
        Shard {
            id,
            shards,
            rules,
            engine,
            dec,
            out,
            output,
            handoff,
            c: LocalCounters::default(),
            routes: Vec::with_capacity(profiles),
            line_bytes_max,
            deliver_bytes: out_bytes / 2,
            metrics,
            durable: None,
            tagged: Vec::with_capacity(line_bytes_max + producer::TAG_BYTES_MAX),
            parsed,
            spans: Vec::with_capacity(WINDOW_LINES),
            batch: Vec::with_capacity(WINDOW_LINES * profiles),
            window_bytes: 0,
            window_bytes_max: (out_bytes / 8).max(4096),
        }
    }

    /// Feed the '\n'-separated lines of `data` (a last line without '\n' counts; empty lines
    /// and a trailing '\r' are ignored).
    /// Lines of an acknowledged connection with a producer are numbered by `cursor`.
    pub fn process_lines(
        &mut self,
        data: &[u8],
        t: Transport,
        now_ms: i64,
        mut cursor: Option<&mut ProducerCursor>,
    ) -> Progress {
        let mut p = Progress::default();
        self.metrics
            .round_begin(self.c.udp_events + self.c.tcp_events);
        let mut pos = 0;
        while pos < data.len() {
            let end = memchr::memchr(b'\n', &data[pos..]).map_or(data.len(), |i| pos + i);
            let mut line = &data[pos..end];
            if let [rest @ .., b'\r'] = line {
                line = rest;
            }
            if !line.is_empty() {
                let tag = cursor.as_deref().map(|c| (&c.id[..], c.next));
                match self.process_line(data, (pos, pos + line.len()), t, now_ms, tag) {
                    None => {
                        p.stalled = true;
                        break;
                    }
                    Some(handed) => p.handed_off += u32::from(handed),
                }
                p.lines += 1;
                if let Some(c) = cursor.as_deref_mut() {
                    c.next += 1;
                }
                if self.window_full() {
                    self.apply_window(data, now_ms);
                }
            }
            pos = (end + 1).min(data.len());
            // One read can hold far more output than a sink's queue (a flood of new keys makes
            // ~8× its bytes in records): stop here rather than let the pending batch outgrow
            // its bound.
            if self.output.backlogged() {
                p.output_full = true;
                break;
            }
        }
        self.apply_window(data, now_ms);
        p.consumed = pos;
        p
    }

    /// The line at `data[span.0..span.1]` joins the window (its events are in `batch`).
    #[inline]
    fn window_push(&mut self, span: (usize, usize)) {
        self.spans.push((span.0 as u32, span.1 as u32));
        self.window_bytes += span.1 - span.0;
    }

    #[inline]
    fn window_full(&self) -> bool {
        self.spans.len() == WINDOW_LINES || self.window_bytes >= self.window_bytes_max
    }

    /// Apply the window's events (their lines are in `data`) and empty it.
    fn apply_window(&mut self, data: &[u8], now_ms: i64) {
        if !self.batch.is_empty() {
            let (batch, parsed, spans, table) =
                (&self.batch, &self.parsed, &self.spans, self.dec.table());
            self.engine.on_batch_by(
                batch.len(),
                |i| {
                    let (p, k) = batch[i];
                    let (a, b) = spans[usize::from(k)];
                    let line = &data[a as usize..b as usize];
                    (p, parsed[usize::from(k)].event(line, table))
                },
                Clock::Wall(now_ms),
                &mut self.out,
            );
            self.batch.clear();
        }
        self.spans.clear();
        self.window_bytes = 0;
        self.deliver_if_large();
    }

    /// One received line. `None`: a hand-off buffer is needed first (nothing was done).
    /// `Some(true)`: the event was handed to at least one other shard.
    /// `tag`: the line's producer and sequence number (acknowledged connections only).
    /// The line is `data[span.0..span.1]`; if this shard applies it, it joins the window.
    fn process_line(
        &mut self,
        data: &[u8],
        span: (usize, usize),
        t: Transport,
        now_ms: i64,
        tag: Option<(&[u8], u64)>,
    ) -> Option<bool> {
        let line = &data[span.0..span.1];
        if line.len() > self.line_bytes_max {
            self.c.lines_too_long += 1;
            self.count_event(t);
            let prefix = &line[..TOO_LONG_PREFIX_BYTES.min(line.len())];
            self.out
                .dead_letter("line_too_long", transport_label(t), prefix);
            self.deliver_if_large();
            return Some(false);
        }
        let k = self.spans.len();
        if let Err(e) = self.dec.decode_into(line, &mut self.parsed[k]) {
            self.c.count_decode_error(e);
            self.count_event(t);
            self.out.dead_letter(e.label(), transport_label(t), line);
            self.deliver_if_large();
            return Some(false);
        }
        let ev = self.parsed[k].event(line, self.dec.table());
        self.routes.clear();
        let mut peers = 0u64;
        for p in self.rules.matching(&ev) {
            let (d, o) = match route(&self.rules, p, &ev, self.shards) {
                Route::Owner(o) if o == self.id => (Dest::Here, o),
                Route::Owner(o) => {
                    debug_assert!(o < self.shards);
                    peers |= 1u64 << o;
                    (Dest::Peer, o)
                }
                Route::MissingKey => (Dest::MissingKey, 0),
                Route::KeyTooLong => (Dest::KeyTooLong, 0),
            };
            self.routes.push((p, d, o));
        }
        // What is logged and handed off: the line, tagged with its producer if it has one.
        let carried: &[u8] = match tag {
            Some((id, seq)) => {
                producer::tag(&mut self.tagged, id, seq, ev.raw());
                &self.tagged
            }
            None => ev.raw(),
        };
        if peers != 0 && !self.handoff.reserve(peers, carried.len() + 1) {
            self.c.handoff_stalls += 1;
            return None;
        }
        match t {
            Transport::Udp => self.c.udp_events += 1,
            Transport::Tcp => self.c.tcp_events += 1,
        }
        let local = self.routes.is_empty() || self.routes.iter().any(|r| matches!(r.1, Dest::Here));
        let mut apply = true;
        if let (true, Some(d)) = (local, self.durable.as_mut()) {
            apply = d.admit(tag);
            if apply {
                d.log_event(now_ms, carried);
            }
        }
        if self.routes.is_empty() && apply {
            self.c.passthrough += 1;
            self.out.passthrough(ev.raw());
        }
        let mut windowed = false;
        for &(p, d, _) in &self.routes {
            if !apply {
                break;
            }
            match d {
                Dest::Here => {
                    self.batch.push((p, k as u16));
                    windowed = true;
                }
                Dest::Peer => {}
                Dest::MissingKey | Dest::KeyTooLong => {
                    let reason = if matches!(d, Dest::MissingKey) {
                        self.c.route_missing_key += 1;
                        "missing_key"
                    } else {
                        self.c.route_key_too_long += 1;
                        "key_too_long"
                    };
                    let name = &self.rules.profiles[p as usize].name;
                    self.out.dead_letter_event(reason, name, ev.raw());
                }
            }
        }
        let mut m = peers;
        while m != 0 {
            let o = m.trailing_zeros();
            m &= m - 1;
            self.handoff.push(o, carried);
            self.c.handoff_events_out += 1;
            if let Some(d) = self.durable.as_mut() {
                d.sent[o as usize] += 1;
            }
        }
        if windowed {
            self.window_push(span);
        }
        self.deliver_if_large();
        Some(peers != 0)
    }

    fn count_event(&mut self, t: Transport) {
        match t {
            Transport::Udp => self.c.udp_events += 1,
            Transport::Tcp => self.c.tcp_events += 1,
        }
    }

    /// A batch handed over by shard `from`: run the profiles this shard owns.
    pub fn process_handoff(&mut self, b: &Batch, from: u32, now_ms: i64) {
        let data = &b.buf[..];
        for carried in batch_lines(b) {
            let tagged = producer::untag(carried);
            let line = tagged.line;
            let k = self.spans.len();
            if let Err(e) = self.dec.decode_into(line, &mut self.parsed[k]) {
                // The sender decoded these exact bytes with the same field table: this is a
                // bug. Keep the event (dead letter) and the evidence (counter).
                debug_assert!(false, "hand-off line failed to decode: {e}");
                self.c.count_decode_error(e);
                self.out.dead_letter(e.label(), "handoff", line);
                continue;
            }
            self.c.handoff_events_in += 1;
            if let Some(d) = self.durable.as_mut() {
                if !d.admit(tagged.producer) {
                    continue;
                }
                d.log_event(now_ms, carried);
            }
            let ev = self.parsed[k].event(line, self.dec.table());
            let before = self.batch.len();
            for p in self.rules.matching(&ev) {
                if let Route::Owner(o) = route(&self.rules, p, &ev, self.shards) {
                    if o == self.id {
                        self.batch.push((p, k as u16));
                    }
                }
            }
            if self.batch.len() > before {
                let start = line.as_ptr() as usize - data.as_ptr() as usize;
                self.window_push((start, start + line.len()));
                if self.window_full() {
                    self.apply_window(data, now_ms);
                }
            }
            self.deliver_if_large();
        }
        self.apply_window(data, now_ms);
        self.c.handoff_batches_in += 1;
        if let Some(d) = self.durable.as_mut() {
            d.handoff_done(from, b.events);
        }
    }

    /// A logged event, replayed at recovery with its recorded arrival time: the profiles this
    /// shard owns, or the pass-through if none matches (what was done when it was logged).
    pub fn replay_line(&mut self, line: &[u8], wall_ms: i64) {
        let Ok(ev) = self.dec.decode(line) else {
            // Logged lines decoded when they were accepted; only a rule change between runs
            // (a field table that no longer extracts the same fields) can get here.
            return;
        };
        let mut matched = false;
        for p in self.rules.matching(&ev) {
            matched = true;
            if let Route::Owner(o) = route(&self.rules, p, &ev, self.shards) {
                if o == self.id {
                    self.engine
                        .on_event(p, &ev, Clock::Wall(wall_ms), &mut self.out);
                }
            }
        }
        if !matched {
            self.out.passthrough(ev.raw());
        }
        self.deliver_if_large();
    }

    /// A record that never reached the decoder (an oversized datagram or stream line).
    pub fn dead_letter_raw(&mut self, reason: &str, t: Transport, raw: &[u8]) {
        self.out.dead_letter(reason, transport_label(t), raw);
        self.deliver_if_large();
    }

    #[inline]
    fn deliver_if_large(&mut self) {
        if self.out.buf.len() >= self.deliver_bytes {
            self.commit_log();
            self.output.deliver(&self.out);
            self.metrics.count_out(&self.out);
            self.out.clear();
        }
    }

    /// Outputs leave only after the log records of the events that produced them are written:
    /// a consumer never sees a session start or id that a crash could make the replay re-assign.
    #[inline]
    fn commit_log(&mut self) {
        if let Some(d) = self.durable.as_mut() {
            d.commit();
        }
    }

    /// Hand the output batch to the sinks. False: a `block` sink is full.
    pub fn deliver_and_flush(&mut self) -> bool {
        if !self.out.is_empty() {
            self.commit_log();
            self.output.deliver(&self.out);
            self.metrics.count_out(&self.out);
            self.out.clear();
        }
        self.output.flush()
    }

    /// Swap in reloaded rules (already checked compatible) and the decoder for their fields.
    pub fn set_rules(&mut self, rules: Arc<Rules>, dec: Decoder) -> Result<(), String> {
        debug_assert!(self.spans.is_empty(), "no window spans calls");
        self.engine.set_rules(rules.clone())?;
        self.parsed = window_slots(&dec);
        self.dec = dec;
        self.routes.reserve(rules.profiles.len());
        self.metrics.set_rules(&rules);
        self.rules = rules;
        Ok(())
    }

    /// Copy the durability figures into the counters (before publishing them).
    pub fn sync_durable_counters(&mut self) {
        let Some(d) = self.durable.as_ref() else {
            return;
        };
        let l = d.log.stats();
        let c = &mut self.c;
        c.log_appended = l.appended;
        c.log_commits = l.commits;
        c.log_fsyncs = l.fsyncs;
        c.log_bytes = l.bytes_written;
        c.log_errors = d.stats.log_errors;
        c.log_unlogged = d.stats.unlogged;
        c.log_durable_seq = d.log.durable_seq();
        c.producer_duplicates = d.stats.duplicates;
        c.producer_evictions = d.producers.evictions;
        c.snapshots = d.stats.snapshots;
        c.snapshot_errors = d.stats.snapshot_errors;
        c.snapshot_last_us = d.stats.snapshot_last_us;
        c.snapshot_us_total = d.stats.snapshot_us_total;
        c.snapshot_capture_last_us = d.stats.snapshot_capture_last_us;
        c.snapshot_write_rate = d.stats.snapshot_write_rate;
        c.log_flushes = l.fsyncs;
        c.log_flush_errors = l.write_errors + l.fsync_errors;
        c.log_flush_us_total = l.sync_us_total;
        c.log_flush_last_us = l.sync_last_us;
        c.recovered_sessions = d.stats.recovered_sessions;
        c.replayed_events = d.stats.replayed;
    }

    /// One bounded expiry pass (`Engine::advance_bounded`), logged as `runtime::durable`
    /// says: true when due sessions are left for another pass once `out` has been delivered.
    pub fn advance(&mut self, now_ms: i64) -> bool {
        let pass = self
            .engine
            .advance_bounded(Clock::Wall(now_ms), &mut self.out);
        if let Some(d) = self.durable.as_mut() {
            d.pass_ran(now_ms, pass);
        }
        pass.left
    }
}

/// Wall clock in epoch milliseconds.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Limits the async side needs without borrowing the shard.
#[derive(Clone, Copy, Debug)]
pub struct IngestLimits {
    pub line_bytes_max: usize,
    pub datagram_bytes_max: usize,
    pub tcp_idle_timeout: Duration,
    pub tcp_connections_per_shard: u32,
}

/// What every task of a shard shares.
pub struct Ctx {
    pub id: u32,
    pub shards: u32,
    pub st: RefCell<Shard>,
    pub limits: IngestLimits,
    /// Senders to each peer (`None` at this shard's own index).
    pub tx: Vec<Option<ConnectedSender<Batch>>>,
    /// One permit per peer: whoever holds it sends that peer's ready batches, in order.
    tx_lock: Vec<Semaphore>,
    /// Zero permits; closed when ingest must stop, which wakes every waiter.
    stop: Semaphore,
    /// Set when ingest must stop; shared with the snapshot writer (`durable::Pace`), which
    /// checks it between steps.
    pub stopping: Arc<AtomicBool>,
    /// A `block` sink is full: ingest must not read until a flush succeeds.
    pub blocked: Cell<bool>,
    /// Live ingest tasks (listeners and connections); shutdown waits for zero.
    pub ingest_tasks: Cell<u32>,
    /// Every shard's heartbeat; this one's is `beats[id]` (see [`super::Beat`]).
    beats: Arc<[super::Beat]>,
    /// A permit asks the snapshot task for a snapshot now rather than at its next interval.
    snapshot_asked: Semaphore,
}

impl Ctx {
    pub fn new(
        st: Shard,
        limits: IngestLimits,
        tx: Vec<Option<ConnectedSender<Batch>>>,
        beats: Arc<[super::Beat]>,
    ) -> Ctx {
        let (id, shards) = (st.id, st.shards);
        let tx_lock = (0..tx.len()).map(|_| Semaphore::new(1)).collect();
        Ctx {
            id,
            shards,
            st: RefCell::new(st),
            limits,
            tx,
            tx_lock,
            stop: Semaphore::new(0),
            stopping: Arc::new(AtomicBool::new(false)),
            blocked: Cell::new(false),
            ingest_tasks: Cell::new(0),
            beats,
            snapshot_asked: Semaphore::new(0),
        }
    }

    /// Ask for a snapshot now (see `snapshot_asked`); several asks before it starts make one.
    pub fn ask_snapshot(&self) {
        if self.snapshot_asked.available() == 0 {
            self.snapshot_asked.signal(1);
        }
    }

    /// Resolves when a snapshot is asked for.
    pub async fn snapshot_asked(&self) {
        // `acquire` takes the permit for good (no guard gives it back).
        let _ = self.snapshot_asked.acquire(1).await;
    }

    /// Tells the kicker that this executor runs. Under load the ticker's timer waits for the
    /// preemption tick (up to `PREEMPT`), longer than the kicker's `KICK_AFTER`; without this
    /// the kicker would read a busy shard's scheduler state from `/proc` every check, on the
    /// shard's CPU.
    #[inline]
    pub fn beat(&self) {
        self.beats[self.id as usize].beat();
    }

    /// Ask every ingest task to finish.
    pub fn stop_ingest(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.stop.close();
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Resolves once `stop_ingest` was called.
    pub async fn stopped(&self) {
        // Nobody ever signals this semaphore: an acquire returns only when `close` fails it.
        let _ = self.stop.acquire(1).await;
    }

    /// Registers an ingest task until the guard drops.
    pub fn ingest_guard(self: &Rc<Self>) -> IngestGuard {
        self.ingest_tasks.set(self.ingest_tasks.get() + 1);
        IngestGuard(self.clone())
    }
}

pub struct IngestGuard(Rc<Ctx>);

impl Drop for IngestGuard {
    fn drop(&mut self) {
        let n = self.0.ingest_tasks.get();
        debug_assert!(n > 0);
        self.0.ingest_tasks.set(n.saturating_sub(1));
    }
}

pub enum Either<A, B> {
    Left(A),
    Right(B),
}

/// Polls both futures; resolves with whichever finishes first (the other is dropped).
pub async fn first<A: Future, B: Future>(a: A, b: B) -> Either<A::Output, B::Output> {
    let mut a = pin!(a);
    let mut b = pin!(b);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = a.as_mut().poll(cx) {
            return Poll::Ready(Either::Left(v));
        }
        if let Poll::Ready(v) = b.as_mut().poll(cx) {
            return Poll::Ready(Either::Right(v));
        }
        Poll::Pending
    })
    .await
}

/// Send every ready hand-off batch, in order per peer, waiting for queue room (backpressure).
pub async fn send_ready(ctx: &Rc<Ctx>) {
    loop {
        let mask = ctx.st.borrow().handoff.ready_mask;
        if mask == 0 {
            return;
        }
        let o = mask.trailing_zeros();
        let Ok(_permit) = ctx.tx_lock[o as usize].acquire_permit(1).await else {
            return;
        };
        loop {
            let Some(b) = ctx.st.borrow_mut().handoff.pop_ready(o) else {
                break;
            };
            let events = u64::from(b.events);
            let Some(tx) = ctx.tx[o as usize].as_ref() else {
                debug_assert!(false, "a batch for shard {o} without a sender");
                continue;
            };
            match tx.send(b).await {
                Ok(()) => ctx.st.borrow_mut().c.handoff_batches_out += 1,
                Err(_) => {
                    // The peer is gone: only during a shutdown past its deadline.
                    let mut st = ctx.st.borrow_mut();
                    st.c.handoff_events_lost += events;
                }
            }
        }
    }
}

/// Feed lines to the shard, handling hand-off stalls (send, wait for buffers, resume).
/// Returns how many events needed a hand-off.
pub async fn run_lines(
    ctx: &Rc<Ctx>,
    data: &[u8],
    t: Transport,
    now_ms: i64,
    mut cursor: Option<&mut ProducerCursor>,
) -> Progress {
    let mut pos = 0;
    let mut total = Progress::default();
    loop {
        let p = ctx
            .st
            .borrow_mut()
            .process_lines(&data[pos..], t, now_ms, cursor.as_deref_mut());
        ctx.beat();
        pos += p.consumed;
        total.handed_off += p.handed_off;
        total.lines += p.lines;
        if p.output_full {
            wait_output(ctx).await;
            if pos < data.len() {
                continue;
            }
        }
        if !p.stalled {
            total.consumed = pos;
            return total;
        }
        send_ready(ctx).await;
        // Every buffer to some peer may still be in flight; wait for one to come back.
        let mut waited = 0u32;
        while !ctx.st.borrow_mut().handoff.collect_returns() {
            glommio::timer::sleep(Duration::from_micros(100)).await;
            waited += 1;
            if waited.is_multiple_of(10_000) {
                log::warn!(
                    "shard {}: waiting {} s for hand-off buffers to come back",
                    ctx.id,
                    waited / 10_000
                );
            }
        }
    }
}

/// Wait until every sink has taken this shard's pending batches. Also while stopping: the
/// lines already read were accepted and their records must not be dropped.
async fn wait_output(ctx: &Rc<Ctx>) {
    ctx.st.borrow_mut().c.output_blocked += 1;
    send_ready(ctx).await;
    while !ctx.st.borrow_mut().output.flush() {
        glommio::timer::sleep(Duration::from_micros(200)).await;
    }
}

/// End of a receive round: queue partial hand-off batches, send them, deliver output.
pub async fn end_round(ctx: &Rc<Ctx>) {
    let ok = {
        let mut st = ctx.st.borrow_mut();
        st.handoff.seal_all();
        let ok = st.deliver_and_flush();
        let events = st.c.udp_events + st.c.tcp_events;
        st.metrics.round_end(events);
        if let Some(d) = st.durable.as_mut() {
            d.commit();
        }
        ok
    };
    if !ok {
        ctx.blocked.set(true);
    }
    send_ready(ctx).await;
}

/// Before reading input: wait while a `block` sink is full. False when ingest is stopping.
pub async fn wait_unblocked(ctx: &Rc<Ctx>) -> bool {
    if !ctx.blocked.get() {
        return !ctx.is_stopping();
    }
    ctx.st.borrow_mut().c.output_blocked += 1;
    loop {
        if ctx.is_stopping() {
            return false;
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
        if !ctx.blocked.get() || ctx.st.borrow_mut().output.flush() {
            ctx.blocked.set(false);
            return true;
        }
    }
}
