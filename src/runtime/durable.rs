//! One shard's durability state: its event log, its producers' high-water marks, and the
//! bookkeeping that tells acknowledged TCP connections which of their lines are durable.
//!
//! Who logs what. A shard logs every event it *applies* (runs at least one of its own profiles on,
//! or passes through because no profile matches), before applying it, whether the event arrived
//! on its own socket or was handed over by a peer. Its snapshot and its log therefore describe
//! exactly its own engine, and recovery is per shard (`recover`).
//!
//! When is a line durable. A line received by shard A is durable once A's own part is (its log
//! record is at or below A's durable sequence) and every peer it was handed to has made it durable
//! in turn. Hand-offs of one pair are FIFO, so "peer B has made durable the first k events A sent
//! it" is one number per ordered pair: B publishes it in the shared matrix ([`Handoffs`]) after each
//! commit, and A compares it with how many it had sent when the line was processed. A records that
//! requirement as a *mark* ([`Marks`]) after each run of lines of an acknowledged connection; marks
//! become durable in order, and a connection acknowledges up to the last line of its last durable
//! mark.
//!
//! When the log cannot take an event (its buffer is full because the disk refuses writes), the
//! event is applied anyway, so ingest never stops, and counted as unlogged; nothing applied after
//! it is reported durable until a snapshot captured after it is published.
//!
//! Expiry passes are logged too ([`Durable::pass_ran`]), so that a replay runs them where the
//! live shard did: an event-time pass holds the watermark it used, and with it which later
//! events are late, and a pass moves its wheel on, which decides the order of later ends and
//! which session an eviction picks. A pass that ended a session is logged at once, before its
//! end markers leave; of the others that changed the engine, the last before the next record
//! is logged then (`PassRecorder`). An idle shard therefore writes nothing, and a busy one a
//! record per pass at most.

use super::shard::Shard;
use crate::config::{Config, SnapshotWriteRate};
use crate::engine::snapshot::{CaptureBuffers, SnapshotMeta};
use crate::engine::{Engine, Pass};
use crate::persist::log::PassRecorder;
use crate::persist::pace::WriteRate;
use crate::persist::producer::{self, Producers, Seen};
use crate::persist::snapshot_file::{self, open_latest_with_report};
use crate::persist::{LogConfig, LogError, LogReader, LogWriter, SnapshotWriter};
use rkyv::util::AlignedVec;
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// In-flight marks per shard; a connection that finds them all taken waits for durability.
pub const MARKS_MAX: usize = 1 << 14;
/// Hand-off durability notices waiting for a commit, per shard; the oldest is dropped when full
/// (a later notice of the same peer supersedes it, so acknowledgements are only delayed).
const NOTICES_MAX: usize = 1 << 12;

/// `durable[from * n + to]`: how many events shard `from` handed to shard `to` that `to` has
/// made durable (or found already applied). Written only by `to`, read by `from`.
pub struct Handoffs {
    n: usize,
    durable: Box<[AtomicU64]>,
}

impl Handoffs {
    pub fn new(n: usize) -> Handoffs {
        Handoffs {
            n,
            durable: (0..n * n).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn get(&self, from: usize, to: usize) -> u64 {
        self.durable[from * self.n + to].load(Ordering::Acquire)
    }

    fn set(&self, from: usize, to: usize, v: u64) {
        self.durable[from * self.n + to].store(v, Ordering::Release);
    }
}

/// The requirement recorded at one mark.
struct Mark {
    id: u64,
    local_seq: u64,
    /// Applied-event count at the mark (see `Durable::applied`).
    applied: u64,
    /// Events sent to each peer so far.
    sent: Box<[u64]>,
}

/// A shard's marks, oldest first, in a ring allocated at start.
pub struct Marks {
    ring: VecDeque<Mark>,
    spare: Vec<Box<[u64]>>,
    next_id: u64,
    /// Every mark with an id at or below this is durable.
    durable_id: u64,
}

impl Marks {
    fn new(shards: usize) -> Marks {
        Marks {
            ring: VecDeque::with_capacity(MARKS_MAX),
            spare: (0..MARKS_MAX)
                .map(|_| vec![0u64; shards].into_boxed_slice())
                .collect(),
            next_id: 1,
            durable_id: 0,
        }
    }
}

pub struct Durable {
    pub dir: PathBuf,
    shard: u32,
    shards: u32,
    pub log: LogWriter,
    pub producers: Producers,
    handoffs: Arc<Handoffs>,
    /// Events applied by this shard since start (logged or not).
    applied: u64,
    /// Applied-event count of the first event since the last published snapshot's capture that
    /// could not be logged; marks at or past it are not durable until a later snapshot publishes.
    first_unlogged: Option<u64>,
    /// The same, for events applied while a snapshot is in flight (after its capture).
    first_unlogged_after_capture: Option<u64>,
    /// Applied-event count at the capture of the snapshot in flight.
    capture_applied: Option<u64>,
    /// Log sequence of the producers' checkpoint record of the snapshot in flight.
    checkpoint_seq: u64,
    /// Every event up to this applied count is in a published snapshot.
    snapshot_applied: u64,
    /// Events received from each peer so far.
    received: Vec<u64>,
    /// Events sent to each peer so far.
    pub sent: Vec<u64>,
    /// `(log seq after a peer's batch, peer, received from it)`, waiting for that seq to be durable.
    notices: VecDeque<(u64, u32, u64)>,
    pub marks: Marks,
    /// Next snapshot generation.
    pub generation: u64,
    /// Archive buffer kept between snapshots (its pages stay warm).
    pub snap_buffer: Option<AlignedVec>,
    /// The sliced capture's buffers, kept between snapshots likewise.
    pub capture_buffers: Option<CaptureBuffers>,
    /// Scratch for checkpoint records.
    scratch: Vec<u8>,
    /// Which expiry passes to log, and when.
    passes: PassRecorder,
    pub stats: DurableStats,
}

/// Counters the shard publishes (see `counters.rs`).
#[derive(Debug, Default, Clone)]
pub struct DurableStats {
    pub unlogged: u64,
    pub log_errors: u64,
    pub duplicates: u64,
    pub snapshots: u64,
    pub snapshot_errors: u64,
    pub snapshot_last_us: u64,
    pub snapshot_us_total: u64,
    pub snapshot_capture_last_us: u64,
    /// The last periodic snapshot's write budget, bytes a second (0: unpaced).
    pub snapshot_write_rate: u64,
    pub recovered_sessions: u64,
    pub replayed: u64,
}

impl Durable {
    fn new(
        dir: PathBuf,
        shard: u32,
        shards: u32,
        log: LogWriter,
        producers: Producers,
        handoffs: Arc<Handoffs>,
        generation: u64,
    ) -> Durable {
        let n = shards as usize;
        Durable {
            dir,
            shard,
            shards,
            log,
            producers,
            handoffs,
            applied: 0,
            first_unlogged: None,
            first_unlogged_after_capture: None,
            capture_applied: None,
            checkpoint_seq: 0,
            snapshot_applied: 0,
            received: vec![0; n],
            sent: vec![0; n],
            notices: VecDeque::with_capacity(NOTICES_MAX),
            marks: Marks::new(n),
            generation,
            snap_buffer: None,
            capture_buffers: None,
            scratch: Vec::new(),
            passes: PassRecorder::default(),
            stats: DurableStats::default(),
        }
    }

    /// Whether a tagged line must be applied here (and remember it), or is a duplicate.
    pub fn admit(&mut self, producer: Option<(&[u8], u64)>) -> bool {
        match producer {
            Some((id, seq)) if self.producers.observe(id, seq) == Seen::Duplicate => {
                self.stats.duplicates += 1;
                false
            }
            _ => true,
        }
    }

    /// Log one event about to be applied (its raw line, tagged if it has a producer).
    pub fn log_event(&mut self, wall_ms: i64, raw: &[u8]) {
        if let Some(at) = self.passes.before_event() {
            self.log_pass(at);
        }
        self.applied += 1;
        self.append(wall_ms, raw, "event applied", self.applied);
    }

    /// An expiry pass ran at `wall_ms` (see the module doc): logged now if it ended a session,
    /// before the next event if it changed the engine otherwise.
    pub fn pass_ran(&mut self, wall_ms: i64, pass: Pass) {
        for at in self.passes.after_pass(wall_ms, pass) {
            self.log_pass(at);
        }
    }

    fn log_pass(&mut self, wall_ms: i64) {
        // Should it not be logged, what is applied after it is not reported durable.
        let next = self.applied + 1;
        self.append(wall_ms, crate::persist::log::PASS, "expiry pass run", next);
    }

    /// Append a record. If the log cannot take it, what was applied from the applied-event
    /// count `unlogged_from` on is not reported durable until a snapshot captured after it is
    /// published (a replay could not re-create it).
    fn append(&mut self, wall_ms: i64, raw: &[u8], what: &str, unlogged_from: u64) {
        let mut result = self.log.append(wall_ms, raw);
        if matches!(result, Err(LogError::BufferFull { .. })) {
            // Make room: write and sync what is buffered, on this thread (the disk is behind:
            // waiting for it here is the backpressure), then try once more.
            if let Err(e) = self.flush_log(true) {
                self.log_error(&e);
            }
            result = self.log.append(wall_ms, raw);
        }
        if let Err(e) = result {
            self.stats.unlogged += 1;
            if self.stats.unlogged.is_power_of_two() {
                log::warn!(
                    "shard {}: {what} without being logged ({} so far): {e}",
                    self.shard,
                    self.stats.unlogged
                );
            }
            let slot = if self.capture_applied.is_some() {
                &mut self.first_unlogged_after_capture
            } else {
                &mut self.first_unlogged
            };
            slot.get_or_insert(unlogged_from);
        }
    }

    /// Commit the log: per policy (with background syncing, never waiting for the disk), or
    /// durably on this thread whatever the policy.
    fn flush_log(&mut self, durable: bool) -> Result<u64, LogError> {
        if durable {
            self.log.commit_durable()
        } else {
            self.log.commit()
        }
    }

    fn log_error(&mut self, e: &LogError) {
        self.stats.log_errors += 1;
        if self.stats.log_errors.is_power_of_two() {
            log::warn!(
                "shard {}: event log: {e} ({} errors so far; retrying)",
                self.shard,
                self.stats.log_errors
            );
        }
    }

    /// A batch of `events` from peer `from` was processed.
    pub fn handoff_done(&mut self, from: u32, events: u32) {
        self.received[from as usize] += u64::from(events);
        if self.notices.len() == NOTICES_MAX {
            self.notices.pop_front();
        }
        self.notices
            .push_back((self.log.last_seq(), from, self.received[from as usize]));
    }

    fn applied_durable(&self, applied: u64, local_seq: u64) -> bool {
        applied <= self.snapshot_applied
            || (local_seq <= self.log.durable_seq()
                && self.first_unlogged.is_none_or(|f| applied < f)
                && self
                    .first_unlogged_after_capture
                    .is_none_or(|f| applied < f))
    }

    /// Write and sync the log per policy, then publish which peers' events are durable here.
    pub fn commit(&mut self) {
        if self.log.pending_bytes() > 0 {
            if let Err(e) = self.flush_log(false) {
                self.log_error(&e);
            }
        }
        while let Some(&(seq, from, count)) = self.notices.front() {
            if !self.applied_durable(self.applied, seq) {
                break;
            }
            self.handoffs.set(from as usize, self.shard as usize, count);
            self.notices.pop_front();
        }
    }

    /// Record a mark for what this shard has applied and sent so far. `None`: every mark is in
    /// flight; commit and retry later.
    pub fn mark(&mut self) -> Option<u64> {
        let m = &mut self.marks;
        if let Some(last) = m.ring.back() {
            if last.local_seq == self.log.last_seq()
                && last.applied == self.applied
                && *last.sent == self.sent[..]
            {
                return Some(last.id);
            }
        }
        let mut sent = m.spare.pop()?;
        sent.copy_from_slice(&self.sent);
        let id = m.next_id;
        m.next_id += 1;
        m.ring.push_back(Mark {
            id,
            local_seq: self.log.last_seq(),
            applied: self.applied,
            sent,
        });
        Some(id)
    }

    /// Every mark at or below the returned id is durable.
    pub fn durable_mark(&mut self) -> u64 {
        while let Some(front) = self.marks.ring.front() {
            let local = self.applied_durable(front.applied, front.local_seq);
            let me = self.shard as usize;
            let peers = (0..self.shards as usize)
                .filter(|&o| o != me)
                .all(|o| self.handoffs.get(me, o) >= front.sent[o]);
            if !(local && peers) {
                break;
            }
            let m = self.marks.ring.pop_front().expect("front exists");
            self.marks.durable_id = m.id;
            self.marks.spare.push(m.sent);
        }
        self.marks.durable_id
    }

    /// Take the cut of a snapshot of `shard`'s engine (start its sliced capture, see
    /// `engine::capture`) and log the producers' checkpoint right after it. Everything applied so
    /// far is in the snapshot, nothing applied later is.
    fn capture_begin(&mut self, engine: &mut Engine) -> Result<SnapshotMeta, String> {
        // The cut sees everything applied so far; the checkpoint record must directly follow
        // `log_seq`, so it is appended before anything else can be. (A pass still pending
        // may follow it: the snapshot holds what that pass did, and a replay from an older
        // snapshot meets it before the next event, where it ran.)
        let meta = SnapshotMeta {
            shard: self.shard,
            shards: self.shards,
            generation: self.generation,
            wall_ms: crate::persist::wall_ms_now(),
            log_seq: self.log.last_seq(),
        };
        engine.capture_begin(self.capture_buffers.take().unwrap_or_default());
        // A new log file starts with the checkpoint, so every earlier file is covered by this
        // snapshot once it is published (and deleted in turn), and recovery from it opens the
        // new file without reading through the old ones. If the rotation fails the checkpoint
        // goes to the current file: recovery reads the same, only further.
        if let Err(e) = self.log.rotate() {
            self.log_error(&e);
        }
        self.producers.checkpoint(&mut self.scratch);
        let mut appended = self.log.append(meta.wall_ms, &self.scratch);
        if appended.is_err() {
            if let Err(e) = self.flush_log(true) {
                self.log_error(&e);
            }
            appended = self.log.append(meta.wall_ms, &self.scratch);
        }
        match appended {
            Ok(seq) => self.checkpoint_seq = seq,
            Err(e) => {
                self.capture_buffers = Some(engine.capture_abort());
                return Err(format!("cannot log the producer checkpoint: {e}"));
            }
        }
        self.capture_applied = Some(self.applied);
        Ok(meta)
    }

    /// The snapshot captured by `capture` is published.
    fn published(&mut self) {
        if let Some(c) = self.capture_applied.take() {
            self.snapshot_applied = c;
            self.first_unlogged = self.first_unlogged_after_capture.take();
        }
        self.generation += 1;
        self.stats.snapshots += 1;
    }

    fn capture_failed(&mut self) {
        self.capture_dropped();
        self.stats.snapshot_errors += 1;
    }

    /// The snapshot of the capture in flight will not be published.
    fn capture_dropped(&mut self) {
        self.capture_applied = None;
        if let Some(f) = self.first_unlogged_after_capture.take() {
            self.first_unlogged.get_or_insert(f);
        }
    }
}

/// Work per capture slice (`Engine::capture_step`: about one session or one cache miss per
/// unit): ~0.1-0.3 ms on the executor, so an event waits for at most about that long.
const CAPTURE_STEP_BUDGET: u32 = 1024;
/// Pause between capture slices, during which the executor polls its I/O and runs what is
/// runnable (an idle executor parks until it ends: the capture takes a little longer).
const CAPTURE_SLICE_PAUSE: std::time::Duration = std::time::Duration::from_micros(20);
/// Bytes written per `write` of a snapshot (each chunk also starts its writeback, so the final
/// fsync has little left). Small, and the thread yields between chunks: a `write` is not
/// preempted, and 1 MiB ones held the shard's CPU for milliseconds (`persist::pace`).
const SNAPSHOT_CHUNK_BYTES: usize = 128 << 10;
/// Attempts at writing a snapshot file before the snapshot fails (the previous one stays valid).
const SNAPSHOT_WRITE_ATTEMPTS: u32 = 5;
/// How long a snapshot waits for the log to be durable up to its checkpoint before it fails.
const LOG_SYNC_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a snapshot waits for the shard's outputs to reach their sinks before publishing.
const OUTPUT_DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Where the time of one published snapshot went. Only the capture's cut and its slices hold
/// the executor (no event is processed during one, and events are processed between them); the
/// archive is built, the file written, synced and published on the executor's blocking thread
/// and the log synced on its helper while the shard goes on with its events.
#[derive(Debug, Default, Clone, Copy)]
pub struct SnapshotTimes {
    pub generation: u64,
    pub sessions: u64,
    pub bytes: u64,
    /// Capture start to the deletion of the logs it covers.
    pub total_us: u64,
    /// The capture, from its cut to its last slice (events are processed in between).
    pub capture_us: u64,
    /// The cut: on the executor.
    pub capture_begin_us: u64,
    /// The cut and every slice: the time the capture held the executor in all.
    pub capture_held_us: u64,
    /// The longest single hold (the cut or one slice): what an event may wait for.
    pub capture_longest_us: u64,
    /// Slices.
    pub capture_steps: u64,
    /// Sessions the engine copied before changing them during the capture.
    pub capture_copied_on_write: u64,
    /// Building the archive, writing the file and its fsync, off the executor.
    pub write_us: u64,
    /// The file's write budget, bytes a second (0: none).
    pub write_rate: u64,
    /// Waiting for the outputs of the captured events to reach the sinks (yields while waiting).
    pub drain_us: u64,
    /// Waiting (yielding) for the log to be durable up to the producers' checkpoint, and the
    /// switch to a new log file (whose syncs follow in the background).
    pub log_us: u64,
    /// Rename, directory fsync, pruning and the deletion of covered logs, off the executor.
    pub publish_us: u64,
}

impl std::fmt::Display for SnapshotTimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |us: u64| us as f64 / 1e3;
        write!(
            f,
            "generation {}: {} sessions, {} bytes in {:.1} ms (capture {:.1} ms held in {} slices over {:.1} ms, {} sessions copied on write, longest slice {:.3} ms, cut {:.3} ms, write {:.1} ms {}, drain {:.1} ms, log {:.1} ms, publish {:.1} ms)",
            self.generation,
            self.sessions,
            self.bytes,
            ms(self.total_us),
            ms(self.capture_held_us),
            self.capture_steps,
            ms(self.capture_us),
            self.capture_copied_on_write,
            ms(self.capture_longest_us),
            ms(self.capture_begin_us),
            ms(self.write_us),
            match self.write_rate {
                0 => "unpaced".to_string(),
                r => format!("at {:.1} MiB/s", r as f64 / f64::from(1 << 20)),
            },
            ms(self.drain_us),
            ms(self.log_us),
            ms(self.publish_us)
        )
    }
}

fn us_since(t: Instant) -> u64 {
    u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// How a shard's periodic snapshots are written (the one at shutdown goes flat out).
pub struct Pace {
    pub rate: SnapshotWriteRate,
    pub interval: Duration,
    /// Set when shutdown begins: a periodic snapshot still being written is abandoned, since
    /// the final snapshot, taken right after, supersedes it.
    pub stop: Arc<AtomicBool>,
}

/// Why a snapshot file was not written.
enum WriteEnd {
    /// Shutdown began (`Pace::stop`); the temp file is removed.
    Abandoned,
    Failed(String),
}

/// Write the snapshot's temp file and fsync it, off the executor, retrying a failing write a
/// few times (a disk that fills up may free space). Under a write rate the file goes to the
/// blocking thread a step at a time, and the wait between steps is a timer on the executor: the
/// blocking thread is shared (metrics rendering, log deletion) and must not sleep. Before each
/// step, `stop` (when given) abandons the write. On failure the temp file is removed.
async fn write_file(
    mut w: SnapshotWriter,
    rate: WriteRate,
    stop: Option<&AtomicBool>,
) -> Result<SnapshotWriter, WriteEnd> {
    let step = rate.step_bytes();
    let start = Instant::now();
    let mut failures = 0u32;
    loop {
        // Wait until the budget covers the step about to be written: never ahead of it.
        let next = w.written().saturating_add(step).min(w.file_bytes());
        if let Some(d) = rate.delay(next, start.elapsed()) {
            glommio::timer::sleep(d).await;
        }
        if stop.is_some_and(|s| s.load(Ordering::Relaxed)) {
            w.abort();
            return Err(WriteEnd::Abandoned);
        }
        let (back, r) = glommio::executor()
            .spawn_blocking(move || {
                let r = write_step(&mut w, step);
                (w, r)
            })
            .await;
        w = back;
        match r {
            Ok(true) => return Ok(w),
            Ok(false) => {}
            Err(e) => {
                failures += 1;
                if failures >= SNAPSHOT_WRITE_ATTEMPTS {
                    let generation = w.generation();
                    w.abort();
                    return Err(WriteEnd::Failed(format!(
                        "writing snapshot generation {generation}: {e}"
                    )));
                }
                glommio::timer::sleep(Duration::from_millis(100 << failures)).await;
            }
        }
    }
}

/// Write up to `step` more bytes of the file (once all are written, the fsync), yielding the
/// CPU between chunks. `Ok(true)` once the file is durable.
fn write_step(w: &mut SnapshotWriter, step: u64) -> std::io::Result<bool> {
    let until = w.written().saturating_add(step);
    loop {
        let left = usize::try_from(until - w.written()).unwrap_or(usize::MAX);
        if w.write_chunk(SNAPSHOT_CHUNK_BYTES.min(left))? {
            return Ok(true);
        }
        if w.written() >= until {
            return Ok(false);
        }
        crate::persist::pace::yield_cpu();
    }
}

/// Put the calling thread (the executor's blocking thread) in the `SCHED_IDLE` class, once.
///
/// Why: that thread shares the shard's CPU, and building a snapshot's archive keeps it busy for
/// a few hundred milliseconds per snapshot. At normal priority the kernel shares the CPU between
/// it and the shard, which then waits for milliseconds at a time with events queued; a
/// `SCHED_IDLE` thread is preempted as soon as the shard wakes. What else runs there (metrics
/// rendering, the snapshot's file I/O) is background work too. An unprivileged thread cannot
/// leave the class again, hence once per thread; failure only costs latency, so it is logged.
fn yield_cpu_to_shards() {
    thread_local! {
        static DONE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }
    if DONE.with(|d| d.replace(true)) {
        return;
    }
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param for the call.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc != 0 {
        log::warn!(
            "the snapshot thread keeps its scheduling class (SCHED_IDLE refused: {}); snapshots may delay events",
            std::io::Error::last_os_error()
        );
    }
}

/// Take one snapshot of the shard behind `ctx`: take its cut and capture the engine in slices
/// between the shard's other tasks (`engine::capture`: copy on write, so the snapshot is the
/// engine as at the cut while events go on being applied), build the archive and write and sync
/// the file off the executor, wait for the outputs produced before the cut to reach the sinks,
/// wait for the log to be durable up to the cut's checkpoint and switch to a new log file,
/// publish the file and delete the logs it covers off the executor. `Ok(None)`: persistence is
/// off.
///
/// Why: serialising the engine in one step held the executor ~0.1 s per million sessions, and
/// writing tens of megabytes and the fsyncs take as long as the disk takes; a shard waiting on
/// either processes nothing. Now the executor is held for the cut and for slices of
/// `CAPTURE_STEP_BUDGET`, with a pause between slices in which the shard polls its I/O and
/// processes what arrived.
pub async fn snapshot(
    ctx: &super::shard::Ctx,
    pace: Option<&Pace>,
) -> Result<Option<SnapshotTimes>, String> {
    let t0 = Instant::now();
    let mut times = SnapshotTimes::default();
    // The cut, then the capture in slices between the shard's other tasks.
    let begun = {
        let mut st = ctx.st.borrow_mut();
        let st = &mut *st;
        match st.durable.as_mut() {
            None => return Ok(None),
            Some(d) => d.capture_begin(&mut st.engine),
        }
    };
    times.capture_begin_us = us_since(t0);
    times.capture_held_us = times.capture_begin_us;
    times.capture_longest_us = times.capture_begin_us;
    let meta = match begun {
        Ok(meta) => meta,
        Err(e) => {
            if let Some(d) = ctx.st.borrow_mut().durable.as_mut() {
                d.capture_failed();
            }
            return Err(e);
        }
    };
    let captured = loop {
        // Not `yield_if_needed`: a task that stays runnable keeps the executor from polling its
        // I/O ring until the preemption timer fires (5 ms), and arrived events would wait that
        // long. Sleeping lets the executor run what is runnable, poll its I/O and come back.
        glommio::timer::sleep(CAPTURE_SLICE_PAUSE).await;
        let t = Instant::now();
        let mut st = ctx.st.borrow_mut();
        let done = st.engine.capture_step(CAPTURE_STEP_BUDGET);
        let captured = done.then(|| st.engine.capture_take());
        drop(st);
        let us = us_since(t);
        times.capture_steps += 1;
        times.capture_held_us += us;
        times.capture_longest_us = times.capture_longest_us.max(us);
        if let Some(c) = captured {
            break c;
        }
    };
    times.capture_us = us_since(t0);
    times.capture_copied_on_write = captured.copied_on_write();
    // Serialise the capture and write the file off the executor.
    let (dir, buffer) = {
        let mut st = ctx.st.borrow_mut();
        let Some(d) = st.durable.as_mut() else {
            return Ok(None);
        };
        (d.dir.clone(), d.snap_buffer.take().unwrap_or_default())
    };
    let t_write = Instant::now();
    let (captured, built) = glommio::executor()
        .spawn_blocking(move || {
            yield_cpu_to_shards();
            let w = SnapshotWriter::from_capture(&dir, &captured, meta, buffer);
            (captured, w.map_err(|e| e.to_string()))
        })
        .await;
    if let Some(d) = ctx.st.borrow_mut().durable.as_mut() {
        d.capture_buffers = Some(captured.into_buffers());
    }
    let written = match built {
        Ok(w) => {
            let rate = pace.map_or_else(WriteRate::unlimited, |p| {
                WriteRate::for_snapshot(p.rate, p.interval, ctx.shards, w.file_bytes())
            });
            times.write_rate = rate.bytes_per_second();
            write_file(w, rate, pace.map(|p| &*p.stop)).await
        }
        Err(e) => Err(WriteEnd::Failed(e)),
    };
    times.write_us = us_since(t_write);
    let w = {
        let mut st = ctx.st.borrow_mut();
        let Some(d) = st.durable.as_mut() else {
            if let Ok(w) = written {
                w.abort();
            }
            return Ok(None);
        };
        match written {
            Ok(w) => w,
            Err(WriteEnd::Abandoned) => {
                d.capture_dropped();
                log::info!(
                    "shard {}: snapshot abandoned at shutdown (the final snapshot supersedes it)",
                    ctx.id
                );
                return Ok(None);
            }
            Err(WriteEnd::Failed(e)) => {
                d.capture_failed();
                return Err(e);
            }
        }
    };
    let generation = w.generation();
    times.generation = generation;
    times.sessions = w.summary().sessions;
    times.bytes = w.file_bytes();
    // Outputs produced before the capture must be with the sinks before the log that would
    // re-create them after a crash is truncated (at-least-once).
    let t_drain = Instant::now();
    let deadline = Instant::now() + OUTPUT_DRAIN_WAIT;
    loop {
        let drained = {
            let mut st = ctx.st.borrow_mut();
            st.deliver_and_flush() && st.output.queues_drained()
        };
        if drained || Instant::now() >= deadline {
            if !drained {
                log::warn!(
                    "shard {}: outputs not drained after {OUTPUT_DRAIN_WAIT:?}; publishing snapshot {generation} anyway",
                    ctx.id
                );
            }
            break;
        }
        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
    }
    times.drain_us = us_since(t_drain);
    // Recovery from this snapshot rebuilds the producers' table from the checkpoint record that
    // follows its `log_seq`: that record must be on disk before the snapshot can be found. The
    // log syncs in the background: ask for a sync now and wait for it without holding the shard.
    let t_log = Instant::now();
    let deadline = Instant::now() + LOG_SYNC_WAIT;
    let mut failed = None;
    loop {
        let durable = {
            let mut st = ctx.st.borrow_mut();
            let Some(d) = st.durable.as_mut() else {
                w.abort();
                return Ok(None);
            };
            d.log.request_sync();
            if let Err(e) = d.flush_log(false) {
                d.log_error(&e);
                failed = Some(e.to_string());
            }
            d.log.durable_seq() >= d.checkpoint_seq
        };
        if durable {
            break;
        }
        if Instant::now() >= deadline {
            let why = failed.unwrap_or_else(|| format!("no sync within {LOG_SYNC_WAIT:?}"));
            w.abort();
            if let Some(d) = ctx.st.borrow_mut().durable.as_mut() {
                d.capture_failed();
            }
            return Err(format!(
                "snapshot generation {generation} not published: its log checkpoint is not durable: {why}"
            ));
        }
        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
    }
    // The log moved to a new file at the cut: the files before it can go once the snapshot is
    // published (a failed publish leaves them all: a split log reads the same).
    let (dir, log_generation) = {
        let st = ctx.st.borrow();
        let Some(d) = st.durable.as_ref() else {
            w.abort();
            return Ok(None);
        };
        (d.log.dir().to_path_buf(), d.log.generation())
    };
    times.log_us = us_since(t_log);
    let t_publish = Instant::now();
    let shard = ctx.id;
    let published = glommio::executor()
        .spawn_blocking(move || {
            let (_, buffer) = w.publish().map_err(|e| e.to_string())?;
            let deleted =
                crate::persist::log::delete_covered(&dir, shard, generation, log_generation);
            Ok::<_, String>((buffer, deleted))
        })
        .await;
    times.publish_us = us_since(t_publish);
    let mut st = ctx.st.borrow_mut();
    let Some(d) = st.durable.as_mut() else {
        return Ok(None);
    };
    match published {
        Ok((buffer, deleted)) => {
            d.snap_buffer = Some(buffer);
            d.published();
            if let Err(e) = deleted {
                d.log_error(&e);
            }
            times.total_us = us_since(t0);
            let s = &mut d.stats;
            s.snapshot_last_us = times.total_us;
            s.snapshot_us_total += times.total_us;
            s.snapshot_capture_last_us = times.capture_longest_us;
            if pace.is_some() {
                s.snapshot_write_rate = times.write_rate;
            }
            Ok(Some(times))
        }
        Err(e) => {
            d.capture_failed();
            Err(format!("publishing snapshot generation {generation}: {e}"))
        }
    }
}

/// What recovery found, for the start-up log.
#[derive(Debug, Default)]
pub struct Recovered {
    pub snapshot: Option<(PathBuf, u64)>,
    pub sessions: u64,
    pub replayed: u64,
    /// Expiry passes the log recorded, run again.
    pub passes: u64,
    pub duplicates: u64,
    /// Log records the snapshot already covered that recovery read through to reach the rest
    /// (0 unless a rotation at a snapshot's cut failed).
    pub read_past: u64,
    /// Where the time went: finding, mapping and validating the snapshot; restoring it into
    /// the engine; replaying the log and ending what fell due meanwhile.
    pub open: Duration,
    pub restore: Duration,
    pub replay: Duration,
}

/// Build the shard's durable state from `dir`: restore the newest valid snapshot, replay the log
/// after it through the shard (outputs go to the sinks again: at-least-once), end the sessions
/// whose timeout passed meanwhile, and open a new log file. Nothing is accepted before this ends.
pub async fn recover(
    st: &mut Shard,
    cfg: &Config,
    dir: &Path,
    handoffs: Arc<Handoffs>,
) -> Result<Recovered, String> {
    let (id, shards) = (st.id, st.shards);
    let mut rec = Recovered::default();
    let t = Instant::now();
    let latest = open_latest_with_report(dir, id).map_err(|e| e.to_string())?;
    rec.open = t.elapsed();
    let mut after = 0;
    let mut generation = 1;
    // What recovery emits (the ends of sessions without room, then the replay's re-emission of
    // what the crash may have lost, at least once) must not meet a `drop` sink's full queue, so
    // every output waits for room until ingest starts.
    st.output.set_lossless(true);
    if let Some(s) = &latest.snapshot {
        let h = s.header();
        if h.shards != shards {
            return Err(format!(
                "{} was written by {} shards and this configuration runs {shards}; start with the same `cores`, or move {} aside to start empty",
                s.path().display(),
                h.shards,
                dir.display()
            ));
        }
        let t = Instant::now();
        let mut report = st
            .engine
            .restore_from_with(s.body(), shards, id, s.config());
        rec.restore = t.elapsed();
        if report.dropped() > 0 {
            log::warn!("shard {id}: snapshot restore dropped records: {report:?}");
        }
        // Sessions without room, and those of profiles whose session data changed, end now, as
        // evicted, before the log's events meet their keys.
        while st
            .engine
            .end_unrestored(s.body(), &mut report.unplaced, &mut st.out)
        {
            drain_outputs(st).await;
        }
        rec.sessions = report.sessions;
        rec.snapshot = Some((s.path().to_path_buf(), h.generation));
        after = h.log_seq;
        generation = h.generation + 1;
    }
    if let Some(g) = snapshot_file::list_generations(dir, id)
        .map_err(|e| format!("listing {}: {e}", dir.display()))?
        .last()
    {
        generation = generation.max(g.0 + 1);
    }
    drop(latest);
    let t_replay = Instant::now();

    let mut producers = Producers::new(cfg.limits.producers_max as usize);
    let mut reader = LogReader::open(dir, id, after).map_err(|e| e.to_string())?;
    let mut last_advance = i64::MIN;
    // A record's arrival time lies in the past: one stamped after this start (a clock set back
    // since, or a damaged record whose checksum still holds) is taken as arriving now, so it
    // cannot push every session's clock into the future.
    let recovered_at = crate::persist::wall_ms_now();
    let mut clamped = 0u64;
    while let Some(mut r) = reader.next_record().map_err(|e| e.to_string())? {
        if !(0..=recovered_at).contains(&r.wall_ms) {
            clamped += 1;
            r.wall_ms = r.wall_ms.clamp(0, recovered_at);
        }
        if Producers::is_checkpoint(r.raw) {
            if !producers.apply_checkpoint(r.raw) {
                log::warn!(
                    "shard {id}: log record {} is a malformed producer checkpoint; ignored",
                    r.seq
                );
            }
            continue;
        }
        if r.passes_logged && r.raw == crate::persist::log::PASS {
            // In one go what the live shard may have done in steps (the rest of a stopped pass
            // went on at a later one, logged in turn): the same sessions end, by the same
            // clocks.
            while st.advance(r.wall_ms) {
                drain_outputs(st).await;
            }
            rec.passes += 1;
            continue;
        }
        let t = producer::untag(r.raw);
        if let Some((pid, seq)) = t.producer {
            if producers.observe(pid, seq) == Seen::Duplicate {
                rec.duplicates += 1;
                continue;
            }
        }
        // A file of the first version did not log its passes: run them at arrival times.
        if !r.passes_logged && r.wall_ms >= last_advance.saturating_add(super::ADVANCE_INTERVAL_MS)
        {
            while st.advance(r.wall_ms) {
                drain_outputs(st).await;
            }
            last_advance = r.wall_ms;
        }
        st.replay_line(t.line, r.wall_ms);
        rec.replayed += 1;
        if st.output.backlogged() {
            drain_outputs(st).await;
        }
    }
    if clamped > 0 {
        log::warn!("shard {id}: {clamped} log records stamped outside 0..=now ({recovered_at} ms) were replayed as arriving at the nearest of the two");
    }
    let report = reader.report();
    rec.read_past = report.skipped;
    if report.damaged() {
        log::warn!("shard {id}: event log damage handled during recovery: {report:?}");
    }
    let mut log = LogWriter::resume(
        dir,
        id,
        reader.next_seq(),
        LogConfig::from_persist(&cfg.persist, cfg.persist.log_buffer_bytes.0 as usize),
    )
    .map_err(|e| e.to_string())?;
    // The shard must not wait in fdatasync (`persist::log`): its helper thread does.
    log.sync_in_background().map_err(|e| e.to_string())?;
    let mut d = Durable::new(
        dir.to_path_buf(),
        id,
        shards,
        log,
        producers,
        handoffs,
        generation,
    );
    d.stats.recovered_sessions = rec.sessions;
    d.stats.replayed = rec.replayed;
    st.durable = Some(d);
    // Sessions whose time passed while the process was down end now, a batch at a time, by a
    // pass logged as any other.
    let now = super::shard::now_ms();
    while st.advance(now) {
        drain_outputs(st).await;
    }
    drain_outputs(st).await;
    st.output.set_lossless(false);
    rec.replay = t_replay.elapsed();
    Ok(rec)
}

/// Hand everything the shard has produced to the sinks, waiting while a queue is full.
async fn drain_outputs(st: &mut Shard) {
    while !st.deliver_and_flush() {
        glommio::timer::sleep(std::time::Duration::from_millis(1)).await;
    }
}

/// Create `dir` if needed and take an exclusive lock on `dir/LOCK` for the life of the returned
/// file, so two processes never write the same snapshots and logs.
pub fn lock_dir(dir: &Path) -> Result<std::fs::File, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let path = dir.join("LOCK");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    };
    if rc != 0 {
        return Err(format!(
            "{} is locked by another process (a second sessionizer on the same persist.dir?): {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(f)
}
