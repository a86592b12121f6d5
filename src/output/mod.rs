//! Output sinks: the hub ([`Outputs`]) that owns one std thread per `[[output]]` (plus an acceptor
//! thread per TCP output), and the per-shard handle ([`ShardOutput`]) that copies each shard's
//! records into batches and hands them to those threads. Sinks are threads, not tasks: a slow
//! disk or socket must never stall an executor, and blocking I/O is simplest on its own thread.
//!
//! Data path. For every sink, each shard owns one *pending batch*: a buffer of whole,
//! newline-terminated records of the streams the sink subscribes to, from that shard only, in
//! production order. [`ShardOutput::deliver`] checks each record against the sink's stream mask
//! and copies it into the pending batch; when the next record would not fit, the batch is handed
//! to the sink thread with a non-blocking `try_send` on a bounded queue, and a fresh buffer is
//! taken from the sink's pool. The sink thread writes the batch and returns its buffer to the pool.
//! [`ShardOutput::flush`] hands partial batches over. Records are never split across batches, so
//! every sink sees whole lines, and one shard's records reach a sink in the order it produced them
//! (records of different shards interleave batch by batch).
//!
//! Bounds, all fixed at [`Outputs::start`] from the output's `queue_bytes` (see [`Geometry`]):
//! - batch capacity `batch_bytes` = `queue_bytes / 4` clamped to 1 KiB..=64 KiB;
//! - queue length `queue_batches` = `queue_bytes / batch_bytes` (at least 4) batches;
//! - buffers per sink = `queue_batches` + one pending per shard + one being written by the sink,
//!   all allocated at start and recycled, so steady state allocates nothing. The counting
//!   argument (at most `queue_batches` queued, one per shard, one in the sink) guarantees the pool
//!   is never empty after a successful hand-over.
//! - A record longer than `batch_bytes` travels alone in a batch that grows to hold it (an
//!   allocation, only for such records); the sink shrinks the buffer back before recycling it.
//! - TCP: at most [`CONSUMERS_MAX`] consumers, each with its own buffer of
//!   `min(queue_bytes, CONSUMER_BUFFER_BYTES_MAX)` bytes.
//!
//! Policy when a sink cannot keep up (its queue holds `queue_batches` batches):
//! - `when_full = "drop"` (the default): the batch that cannot be queued, whether full in
//!   `deliver` or partial in `flush`, is dropped and all its records are counted in that sink's
//!   `dropped`. `flush` never returns false because of a drop sink; after `flush` returns, its
//!   pending batches are empty.
//! - `when_full = "block"`: nothing is dropped at the queue. `flush` keeps the batch and returns
//!   false until the queue has room; the caller stops taking input (TCP ingest stops reading, UDP
//!   ingest overflows in the kernel where it is counted), yields, and calls `flush` again. If
//!   `deliver` fills a batch while the queue is full, the pending batch grows past `batch_bytes`
//!   (an allocation under backpressure only) up to `max(queue_bytes, batch_bytes)` bytes; beyond
//!   that the shard's thread waits for the sink to take the batch (the runtime stops reading
//!   input as soon as a lane is backlogged, so only an output burst no input bounds, such as a
//!   mass expiry, waits there). Nothing is dropped unless the sink thread is gone.
//! - A sink whose thread is gone (after shutdown) drops and counts, whatever its policy.
//! - Per sink, once a batch is queued: `file` and `stdout` write everything (a write error drops
//!   and counts the records it lost); `udp` drops (and counts) records longer than 65507 bytes and
//!   datagrams the kernel refuses; `tcp` copies the batch into every consumer's buffer, and a
//!   consumer whose buffer cannot take the whole batch gets the longest prefix of whole lines that
//!   fits, the rest being dropped for that consumer only and counted once per consumer and record.
//!   A slow consumer therefore never stalls the others, nor the queue.
//!
//! Counters ([`OutputStats`]): `records`/`bytes` are records/bytes written by the sink (for `tcp`,
//! record deliveries into consumer buffers and bytes written to consumer sockets, both summed over
//! consumers); `dropped` sums queue drops (added by the shard once per batch) and the sink's own
//! drops; `queue_depth` is the number of batches waiting; `consumers` is connected TCP consumers.
//!
//! Shutdown ([`Outputs::shutdown`]): call it after the shards' last `flush`. Each sink writes the
//! batches already queued, then flushes and fsyncs its files, or writes out its consumers' buffers
//! and closes them, before 80% of the timeout; threads still running at the timeout are detached
//! with a warning. A [`ShardOutput`] that is dropped hands its partial batches over once,
//! dropping (and counting) what does not fit.

mod file;
mod stdout;
mod tcp;
mod udp;

use crate::config::{Config, Output, OutputKind, Stream, WhenFull, SHARDS_MAX};
use crate::engine::out::Rec;
use crate::engine::Out;
use crossbeam_channel::{bounded, select, Receiver, RecvTimeoutError, Sender, TrySendError};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Largest batch a shard fills before handing it over.
pub const BATCH_BYTES_MAX: usize = 64 << 10;
/// Smallest batch (the config allows `queue_bytes` down to 4 KiB).
pub const BATCH_BYTES_MIN: usize = 1 << 10;
/// A queue holds at least this many batches, so a sink can be busy with one while shards fill more.
pub const QUEUE_BATCHES_MIN: usize = 4;
/// The smallest `queue_bytes` config validation admits.
pub const QUEUE_BYTES_MIN: usize = 4 << 10;
/// TCP consumers per sink; further connections are accepted and closed at once.
pub const CONSUMERS_MAX: usize = 64;
/// A TCP consumer's buffer is `queue_bytes`, capped here (64 consumers × 64 MiB at most).
pub const CONSUMER_BUFFER_BYTES_MAX: usize = 64 << 20;
/// UDP datagrams are packed with whole lines up to this size (an Ethernet MTU minus IP/UDP headers).
pub const UDP_DATAGRAM_BYTES: usize = 1472;
/// A longer record cannot be sent as one UDP datagram and is dropped.
pub const UDP_RECORD_BYTES_MAX: usize = 65_507;
/// File sinks buffer this much per shard file before writing.
pub const FILE_BUFFER_BYTES: usize = 256 << 10;
/// How long a sink may take to finish when its hub is dropped without `shutdown`.
const FINISH_DEFAULT: Duration = Duration::from_secs(1);

const _: () = {
    assert!(BATCH_BYTES_MIN <= BATCH_BYTES_MAX);
    assert!(QUEUE_BATCHES_MIN * BATCH_BYTES_MIN <= QUEUE_BYTES_MIN);
    assert!(UDP_DATAGRAM_BYTES <= UDP_RECORD_BYTES_MAX);
    assert!(QUEUE_BYTES_MIN <= CONSUMER_BUFFER_BYTES_MAX);
    assert!(SHARDS_MAX <= u16::MAX as usize);
};

/// Per-sink counters for metrics.
#[derive(Debug, Clone, Default)]
pub struct OutputStats {
    pub name: String,
    pub kind: &'static str,
    pub records: u64,
    pub bytes: u64,
    pub dropped: u64,
    pub queue_depth: u64,
    pub consumers: u64,
}

/// Sizes derived from one output's `queue_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub batch_bytes: usize,
    pub queue_batches: usize,
    /// Under `when_full = "block"`, how far a pending batch may grow while the queue is full.
    pub pending_bytes_max: usize,
}

impl Geometry {
    pub fn of(queue_bytes: u64) -> Geometry {
        let queue_bytes = usize::try_from(queue_bytes)
            .unwrap_or(usize::MAX)
            .max(QUEUE_BYTES_MIN);
        let batch_bytes = (queue_bytes / QUEUE_BATCHES_MIN).clamp(BATCH_BYTES_MIN, BATCH_BYTES_MAX);
        let queue_batches = (queue_bytes / batch_bytes).max(QUEUE_BATCHES_MIN);
        let g = Geometry {
            batch_bytes,
            queue_batches,
            pending_bytes_max: queue_bytes.max(batch_bytes),
        };
        assert!(g.batch_bytes * g.queue_batches <= queue_bytes);
        g
    }
}

/// One hand-over from a shard to a sink: whole records of one shard, concatenated.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub(crate) shard: u16,
    /// Number of records (newlines) in `buf`.
    pub(crate) records: u64,
    pub(crate) buf: Vec<u8>,
}

/// Updated by sink threads per batch (and by shards once per dropped batch); read by `stats`.
#[derive(Debug)]
pub(crate) struct Counters {
    pub(crate) records: AtomicU64,
    pub(crate) bytes: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) consumers: AtomicU64,
    /// Per shard: batches the sink has written out of its own buffers (to the file, the
    /// sockets), published whenever its queue runs empty. A snapshot waits for it
    /// ([`ShardOutput::queues_drained`]).
    pub(crate) done: Box<[AtomicU64]>,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            records: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            consumers: AtomicU64::new(0),
            done: (0..SHARDS_MAX).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Counters {
    pub(crate) fn written(&self, records: u64, bytes: u64) {
        self.records.fetch_add(records, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn dropped(&self, records: u64) {
        if records > 0 {
            self.dropped.fetch_add(records, Ordering::Relaxed);
        }
    }
}

/// What a sink thread does with batches; the loop around it is [`run_sink`].
pub(crate) trait Sink: Send + 'static {
    /// Write one batch. Records it loses are added to `counters.dropped`.
    fn write(&mut self, batch: &Batch, counters: &Counters);
    /// Called after every batch and at least every `wait()`: timers, retries, housekeeping.
    /// `queue_empty` says no batch is waiting (a good moment to flush buffers).
    fn tick(&mut self, now: Instant, queue_empty: bool, counters: &Counters);
    /// How long the loop may sleep waiting for a batch before calling `tick`.
    fn wait(&self) -> Duration;
    /// After the queue is drained: flush, fsync, close. Should return by `deadline`.
    fn finish(&mut self, deadline: Instant, counters: &Counters);
}

/// Logs the first of a run of similar failures and then at most one every 10 s, with the count
/// of those suppressed, so a dead disk or consumer does not flood the journal.
#[derive(Debug, Default)]
pub(crate) struct RateLimit {
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    const PERIOD: Duration = Duration::from_secs(10);

    /// `Some(n)` when the caller should log now (`n` similar messages were suppressed since).
    pub(crate) fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < Self::PERIOD => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[inline]
fn stream_bit(s: Stream) -> u8 {
    match s {
        Stream::Events => 1,
        Stream::Markers => 2,
        Stream::Late => 4,
        Stream::DeadLetter => 8,
    }
}

// ---------------------------------------------------------------------------------------------
// Shard side.
// ---------------------------------------------------------------------------------------------

/// One shard's connection to one sink.
struct Lane {
    shard: u16,
    mask: u8,
    block: bool,
    /// Set while recovery replays the log: the lane waits for room like a `block` sink
    /// whatever its policy, since what it carries re-emits what a crash may have lost.
    lossless: bool,
    geometry: Geometry,
    /// Hand the pending batch over when a record would take it past this many bytes:
    /// `batch_bytes`, raised by `batch_bytes` after each failed hand-over of a block sink.
    limit: usize,
    pending: Batch,
    queue: Sender<Batch>,
    pool: Receiver<Batch>,
    counters: Arc<Counters>,
    /// Batches handed to the sink so far.
    handed: u64,
}

impl Lane {
    #[cfg(test)]
    fn push(&mut self, line: &[u8]) {
        self.push_run(line, 1);
    }

    /// `records` whole records laid end to end. A run longer than one record always fits the
    /// pending batch (`push_records` builds it so), so batches are cut where pushing the records
    /// one by one would cut them.
    #[inline]
    fn push_run(&mut self, run: &[u8], records: u64) {
        if self.pending.buf.len() + run.len() > self.limit && !self.pending.buf.is_empty() {
            debug_assert_eq!(records, 1);
            self.hand_over_full(run.len());
        }
        self.pending.buf.extend_from_slice(run);
        self.pending.records += records;
    }

    /// The records of `recs` (laid end to end in `buf`) that this lane subscribes to, in order.
    /// Consecutive ones that fit the pending batch are copied as one run: the usual sink takes
    /// every stream, and one copy per round is far cheaper than one per record.
    #[inline]
    fn push_records(&mut self, buf: &[u8], recs: &[Rec]) {
        let (mut start, mut run, mut n) = (0usize, 0usize, 0u64);
        for r in recs {
            let end = r.end as usize;
            if self.mask & stream_bit(r.stream) == 0 {
                if n > 0 {
                    self.push_run(&buf[run..start], n);
                    n = 0;
                }
                run = end;
            } else if n > 0 && self.pending.buf.len() + (end - run) > self.limit {
                // The run so far fits; this record starts the next one.
                self.push_run(&buf[run..start], n);
                (run, n) = (start, 1);
            } else {
                n += 1;
            }
            start = end;
        }
        if n > 0 {
            self.push_run(&buf[run..start], n);
        }
    }

    /// The pending batch cannot take a record of `next` bytes: hand it over.
    #[cold]
    fn hand_over_full(&mut self, next: usize) {
        if self.hand_over() {
            return;
        }
        // A block sink with a full queue: keep growing, but never past `pending_bytes_max`.
        debug_assert!(self.block || self.lossless);
        let g = self.geometry;
        if self.pending.buf.len() + next > g.pending_bytes_max {
            self.hand_over_waiting();
        } else {
            self.limit = (self.pending.buf.len() + g.batch_bytes).min(g.pending_bytes_max);
        }
    }

    /// The pending batch of a block (or lossless) sink reached its bound with the queue still
    /// full: wait on this thread for the sink to take it. The runtime stops reading input as
    /// soon as a lane is backlogged, so only an output burst that no input bounds (a mass
    /// expiry) gets here; stalling the shard then is what `block` promises, dropping is not.
    #[cold]
    fn hand_over_waiting(&mut self) {
        let batch = std::mem::take(&mut self.pending);
        match self.queue.send(batch) {
            Ok(()) => {
                self.handed += 1;
                self.limit = self.geometry.batch_bytes;
                self.pending = self.next_buffer();
            }
            // The sink thread is gone: nothing can take it.
            Err(e) => {
                self.pending = e.into_inner();
                self.drop_pending();
            }
        }
    }

    /// A recycled buffer for the next pending batch.
    fn next_buffer(&mut self) -> Batch {
        match self.pool.try_recv() {
            Ok(mut b) => {
                debug_assert!(b.buf.is_empty() && b.records == 0);
                b.shard = self.shard;
                b
            }
            // Unreachable while the sink runs: at most `queue_batches` batches are queued,
            // one is pending per shard and one is in the sink, and the pool was given that
            // many. Allocating (rather than stopping the shard) covers a sink thread that died
            // holding buffers.
            Err(_) => Batch {
                shard: self.shard,
                records: 0,
                buf: Vec::with_capacity(self.geometry.batch_bytes),
            },
        }
    }

    /// Queue the pending batch. False only for a block sink whose queue is full (the batch stays
    /// pending); a drop sink drops (and counts) the batch instead.
    fn hand_over(&mut self) -> bool {
        debug_assert!(!self.pending.buf.is_empty());
        match self.queue.try_send(std::mem::take(&mut self.pending)) {
            Ok(()) => {
                self.handed += 1;
                self.limit = self.geometry.batch_bytes;
                self.pending = self.next_buffer();
                true
            }
            Err(TrySendError::Full(b)) => {
                self.pending = b;
                if self.block || self.lossless {
                    return false;
                }
                self.drop_pending();
                true
            }
            Err(TrySendError::Disconnected(b)) => {
                self.pending = b;
                self.drop_pending();
                true
            }
        }
    }

    fn drop_pending(&mut self) {
        self.counters.dropped(self.pending.records);
        self.pending.buf.clear();
        self.pending.records = 0;
        self.limit = self.geometry.batch_bytes;
    }
}

/// One shard's handle on every sink. `Send`, so it can move into the shard's executor thread;
/// used only by that shard.
pub struct ShardOutput {
    lanes: Vec<Lane>,
}

const _: fn() = || {
    fn is_send<T: Send>() {}
    is_send::<ShardOutput>();
    is_send::<Outputs>();
};

impl ShardOutput {
    /// Whether some sink takes `stream`'s records (the shard leaves unwritten a stream none
    /// takes, see [`Out::events`]).
    pub fn subscribes(&self, stream: Stream) -> bool {
        self.lanes.iter().any(|l| l.mask & stream_bit(stream) != 0)
    }

    /// Copy each record of `out` into the pending batch of every sink subscribed to its stream.
    /// Never blocks. Full batches are handed to the sink thread through a bounded queue
    /// (recycled buffers); see the module doc for what happens when the queue is full.
    pub fn deliver(&mut self, out: &Out) {
        if self.lanes.is_empty() {
            return;
        }
        if cfg!(debug_assertions) {
            for (_, line) in out.iter() {
                assert!(
                    line.last() == Some(&b'\n'),
                    "a record ends with its newline"
                );
                assert!(
                    memchr::memchr(b'\n', &line[..line.len() - 1]).is_none(),
                    "a record is one line"
                );
            }
        }
        for lane in &mut self.lanes {
            lane.push_records(&out.buf, &out.recs);
        }
    }

    /// Hand partial batches over (call after each processing round, at least every millisecond).
    /// Returns false if a sink with `when_full = "block"` has no room yet: the caller must stop
    /// taking input, yield or sleep briefly, and call `flush` again until it returns true. Sinks
    /// with `when_full = "drop"` drop (and count) the batch instead and never make it return false.
    pub fn flush(&mut self) -> bool {
        let mut ready = true;
        for lane in &mut self.lanes {
            if !lane.pending.buf.is_empty() && !lane.hand_over() {
                ready = false;
            }
        }
        ready
    }

    /// While on, every lane waits for room instead of dropping (see [`Lane::lossless`]); the
    /// caller must then call [`ShardOutput::flush`] until it returns true whenever
    /// [`ShardOutput::backlogged`] says a hand-over failed.
    pub fn set_lossless(&mut self, on: bool) {
        for lane in &mut self.lanes {
            lane.lossless = on;
        }
    }

    /// True when a hand-over failed for want of room and the pending batch is growing.
    pub fn backlogged(&self) -> bool {
        self.lanes.iter().any(|l| l.limit > l.geometry.batch_bytes)
    }

    /// True when nothing is pending in this shard's batches.
    pub fn is_idle(&self) -> bool {
        self.lanes.iter().all(|l| l.pending.buf.is_empty())
    }

    /// True when nothing is pending here and every sink has written out every batch this shard
    /// handed it (a snapshot waits for this before it lets the log go).
    pub fn queues_drained(&self) -> bool {
        self.lanes.iter().all(|l| {
            l.pending.buf.is_empty()
                && l.counters.done[usize::from(l.shard) % SHARDS_MAX].load(Ordering::Acquire)
                    >= l.handed
        })
    }
}

impl Drop for ShardOutput {
    fn drop(&mut self) {
        for lane in &mut self.lanes {
            if !lane.pending.buf.is_empty() && !lane.hand_over() {
                lane.drop_pending();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hub side.
// ---------------------------------------------------------------------------------------------

struct SinkHandle {
    kind: &'static str,
    bound: String,
    name: String,
    counters: Arc<Counters>,
    /// A clone kept only to read the queue depth; never received from.
    queue: Receiver<Batch>,
    /// Carries the finish deadline; dropping it also stops the sink.
    ctrl: Option<Sender<Instant>>,
    /// Stops a TCP acceptor thread.
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// The sink threads and their counters.
pub struct Outputs {
    sinks: Vec<SinkHandle>,
    /// Every sink and acceptor thread holds a sender; it disconnects when the last one exits.
    done: Receiver<()>,
}

/// A sink opened in the first phase of `start`, before any thread runs.
enum Opened {
    File(file::FileSink),
    Tcp(tcp::TcpSink, tcp::Acceptor),
    Udp(udp::UdpSink),
    Stdout(stdout::StdoutSink),
}

fn kind_name(kind: OutputKind) -> &'static str {
    match kind {
        OutputKind::File => "file",
        OutputKind::Tcp => "tcp",
        OutputKind::Udp => "udp",
        OutputKind::Stdout => "stdout",
    }
}

fn open_sink(o: &Output, shards: usize, stop: &Arc<AtomicBool>) -> io::Result<(Opened, String)> {
    let missing =
        |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("missing `{what}`"));
    match o.kind {
        OutputKind::File => {
            let dir = o.path.as_deref().ok_or_else(|| missing("path"))?;
            let sink =
                file::FileSink::open(dir.as_ref(), shards, o.rotate_bytes.0, o.fsync_interval.0)?;
            Ok((Opened::File(sink), dir.to_string()))
        }
        OutputKind::Tcp => {
            let addr = o.address.ok_or_else(|| missing("address"))?;
            let buffer_bytes = usize::try_from(o.queue_bytes.0)
                .unwrap_or(usize::MAX)
                .clamp(QUEUE_BYTES_MIN, CONSUMER_BUFFER_BYTES_MAX);
            let (sink, acceptor, local) = tcp::bind(addr, buffer_bytes, stop.clone())?;
            Ok((Opened::Tcp(sink, acceptor), local.to_string()))
        }
        OutputKind::Udp => {
            let addr = o.address.ok_or_else(|| missing("address"))?;
            Ok((Opened::Udp(udp::UdpSink::open(addr)?), addr.to_string()))
        }
        OutputKind::Stdout => Ok((Opened::Stdout(stdout::StdoutSink::new()), "-".to_string())),
    }
}

impl Outputs {
    /// Opens/creates file directories, binds every tcp output listener (port 0 allowed: `bound`
    /// reports the address), starts one std thread per sink (plus an acceptor per tcp sink).
    /// Returns the hub and one `ShardOutput` per shard. Every file, socket and buffer is opened
    /// or allocated before the first thread starts, so a bad path or a taken port fails here.
    pub fn start(cfg: &Config, shards: usize) -> io::Result<(Outputs, Vec<ShardOutput>)> {
        assert!(
            (1..=SHARDS_MAX).contains(&shards),
            "shards = {shards} is outside 1..={SHARDS_MAX}"
        );
        let mut opened = Vec::with_capacity(cfg.outputs.len());
        for (i, o) in cfg.outputs.iter().enumerate() {
            let stop = Arc::new(AtomicBool::new(false));
            let (sink, bound) = open_sink(o, shards, &stop).map_err(|e| {
                let at = o
                    .path
                    .clone()
                    .or(o.address.map(|a| a.to_string()))
                    .unwrap_or_default();
                io::Error::new(
                    e.kind(),
                    format!("output[{i}] ({} {at}): {e}", kind_name(o.kind)),
                )
            })?;
            opened.push((o, sink, bound, stop));
        }

        let (done_tx, done) = bounded::<()>(0);
        let mut hub = Outputs {
            sinks: Vec::with_capacity(opened.len()),
            done,
        };
        let mut lanes: Vec<Vec<Lane>> = (0..shards)
            .map(|_| Vec::with_capacity(opened.len()))
            .collect();
        for (i, (o, sink, bound, stop)) in opened.into_iter().enumerate() {
            let kind = kind_name(o.kind);
            let g = Geometry::of(o.queue_bytes.0);
            let buffers = g.queue_batches + shards + 1;
            let (queue_tx, queue_rx) = bounded::<Batch>(g.queue_batches);
            let (pool_tx, pool_rx) = bounded::<Batch>(buffers);
            let new_batch = |shard: usize| Batch {
                shard: shard as u16,
                records: 0,
                buf: Vec::with_capacity(g.batch_bytes),
            };
            for _ in 0..buffers - shards {
                pool_tx
                    .try_send(new_batch(0))
                    .expect("the pool holds every buffer");
            }
            let counters = Arc::new(Counters::default());
            let mask = o.streams.iter().fold(0u8, |m, s| m | stream_bit(*s));
            assert!(
                mask != 0,
                "config validation rejects an output without streams"
            );
            for (shard, shard_lanes) in lanes.iter_mut().enumerate() {
                shard_lanes.push(Lane {
                    shard: shard as u16,
                    mask,
                    block: o.when_full == WhenFull::Block,
                    lossless: false,
                    geometry: g,
                    limit: g.batch_bytes,
                    pending: new_batch(shard),
                    queue: queue_tx.clone(),
                    pool: pool_rx.clone(),
                    counters: counters.clone(),
                    handed: 0,
                });
            }
            drop(queue_tx);

            let name = format!("{kind}:{bound}");
            let (ctrl_tx, ctrl_rx) = bounded::<Instant>(1);
            let mut threads = Vec::with_capacity(2);
            let thread_name = format!("out-{kind}-{i}");
            let loop_parts = (
                queue_rx.clone(),
                pool_tx,
                ctrl_rx,
                counters.clone(),
                g.batch_bytes,
            );
            let spawned = match sink {
                Opened::File(s) => spawn_sink(&thread_name, s, loop_parts, done_tx.clone()),
                Opened::Udp(s) => spawn_sink(&thread_name, s, loop_parts, done_tx.clone()),
                Opened::Stdout(s) => spawn_sink(&thread_name, s, loop_parts, done_tx.clone()),
                Opened::Tcp(s, acceptor) => {
                    let done = done_tx.clone();
                    std::thread::Builder::new()
                        .name(format!("out-tcp-accept-{i}"))
                        .spawn(move || {
                            acceptor.run();
                            drop(done);
                        })
                        .and_then(|t| {
                            threads.push(t);
                            spawn_sink(&thread_name, s, loop_parts, done_tx.clone())
                        })
                }
            };
            let handle = SinkHandle {
                kind,
                bound,
                name,
                counters,
                queue: queue_rx,
                ctrl: Some(ctrl_tx),
                stop,
                threads,
            };
            hub.sinks.push(handle);
            // On error, dropping `hub` stops what already runs.
            hub.sinks
                .last_mut()
                .expect("just pushed")
                .threads
                .push(spawned?);
            log::info!(
                "output {} started",
                hub.sinks.last().expect("just pushed").name
            );
        }
        let shard_outputs = lanes
            .into_iter()
            .map(|lanes| ShardOutput { lanes })
            .collect();
        Ok((hub, shard_outputs))
    }

    /// What each output is bound to, in config order: ("tcp", "127.0.0.1:40123"),
    /// ("file", "/path"), ("udp", "127.0.0.1:9"), ("stdout", "-").
    pub fn bound(&self) -> Vec<(&'static str, String)> {
        self.sinks
            .iter()
            .map(|s| (s.kind, s.bound.clone()))
            .collect()
    }

    /// Per-sink counters (records written, records dropped, bytes, queue depth, consumers).
    pub fn stats(&self) -> Vec<OutputStats> {
        self.sinks
            .iter()
            .map(|s| OutputStats {
                name: s.name.clone(),
                kind: s.kind,
                records: s.counters.records.load(Ordering::Relaxed),
                bytes: s.counters.bytes.load(Ordering::Relaxed),
                dropped: s.counters.dropped.load(Ordering::Relaxed),
                queue_depth: s.queue.len() as u64,
                consumers: s.counters.consumers.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Drain every queue, flush and fsync files, close consumers; bounded by `timeout`. Threads
    /// still running at the timeout are detached with a warning.
    pub fn shutdown(mut self, timeout: Duration) {
        let start = Instant::now();
        let deadline = start + timeout;
        // Sinks get 80% of the time, so they can close cleanly before the hub gives up on them.
        let sink_deadline = start + timeout * 4 / 5;
        let sinks = std::mem::take(&mut self.sinks);
        for s in &sinks {
            s.stop.store(true, Ordering::Release);
            if let Some(ctrl) = &s.ctrl {
                // Capacity 1 and sent once: cannot be full; a gone sink needs no message.
                let _ = ctrl.try_send(sink_deadline);
            }
        }
        let all_done = matches!(
            self.done.recv_deadline(deadline),
            Err(RecvTimeoutError::Disconnected)
        );
        for s in sinks {
            for t in s.threads {
                let thread = t.thread().name().unwrap_or("?").to_string();
                if all_done || t.is_finished() {
                    if t.join().is_err() {
                        log::error!("output {}: thread {thread} panicked", s.name);
                    }
                } else {
                    log::warn!(
                        "output {}: thread {thread} did not finish within {timeout:?}; detached (its unwritten records are lost)",
                        s.name
                    );
                }
            }
            let c = &s.counters;
            log::info!(
                "output {} stopped: {} records, {} bytes, {} dropped",
                s.name,
                c.records.load(Ordering::Relaxed),
                c.bytes.load(Ordering::Relaxed),
                c.dropped.load(Ordering::Relaxed)
            );
        }
    }
}

impl Drop for Outputs {
    /// Without `shutdown`: stop acceptors and let sinks finish on their own (not joined).
    fn drop(&mut self) {
        for s in &mut self.sinks {
            s.stop.store(true, Ordering::Release);
            s.ctrl = None;
        }
    }
}

type LoopParts = (
    Receiver<Batch>,
    Sender<Batch>,
    Receiver<Instant>,
    Arc<Counters>,
    usize,
);

fn spawn_sink<S: Sink>(
    name: &str,
    sink: S,
    parts: LoopParts,
    done: Sender<()>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let (queue, pool, ctrl, counters, batch_bytes) = parts;
            run_sink(sink, &queue, &pool, &ctrl, &counters, batch_bytes);
            drop(done);
        })
}

/// The sink thread: write batches as they come, tick, and on the stop signal drain the queue and
/// finish. Runs until stopped (`ctrl` message or hub dropped) or every `ShardOutput` is gone.
fn run_sink<S: Sink>(
    mut sink: S,
    queue: &Receiver<Batch>,
    pool: &Sender<Batch>,
    ctrl: &Receiver<Instant>,
    counters: &Counters,
    batch_bytes: usize,
) {
    let mut written = [0u64; SHARDS_MAX];
    let mut unpublished = false;
    let deadline = loop {
        select! {
            recv(queue) -> msg => match msg {
                Ok(batch) => {
                    sink.write(&batch, counters);
                    written[usize::from(batch.shard) % SHARDS_MAX] += 1;
                    unpublished = true;
                    recycle(batch, pool, batch_bytes);
                }
                Err(_) => break Instant::now() + FINISH_DEFAULT,
            },
            recv(ctrl) -> msg => break msg.unwrap_or_else(|_| Instant::now() + FINISH_DEFAULT),
            default(sink.wait()) => {}
        }
        let empty = queue.is_empty();
        sink.tick(Instant::now(), empty, counters);
        // With the queue empty, `tick` has flushed the sink's own buffers.
        if empty && unpublished {
            for (d, w) in counters.done.iter().zip(written.iter()) {
                d.store(*w, Ordering::Release);
            }
            unpublished = false;
        }
    };
    // Write what the shards queued before the stop; past the deadline, count it as dropped.
    let mut late = 0u64;
    while let Ok(batch) = queue.try_recv() {
        if Instant::now() < deadline {
            sink.write(&batch, counters);
        } else {
            late += batch.records;
        }
        recycle(batch, pool, batch_bytes);
    }
    if late > 0 {
        counters.dropped(late);
        log::warn!("output sink: {late} queued records not written before the shutdown deadline");
    }
    sink.finish(deadline, counters);
}

fn recycle(mut batch: Batch, pool: &Sender<Batch>, batch_bytes: usize) {
    batch.buf.clear();
    batch.records = 0;
    if batch.buf.capacity() > 2 * batch_bytes {
        // It grew for an oversized record or under backpressure; give the memory back.
        batch.buf.shrink_to(batch_bytes);
    }
    // The pool has room for every buffer; it fails only when every shard is gone.
    let _ = pool.try_send(batch);
}

/// Counts records (newlines) in a slice of whole or partial lines; a trailing partial line counts.
pub(crate) fn count_lines(bytes: &[u8]) -> u64 {
    let n = memchr::memchr_iter(b'\n', bytes).count() as u64;
    n + u64::from(bytes.last().is_some_and(|&b| b != b'\n'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_respects_bounds() {
        for q in [4096u64, 5000, 65536, 256 << 10, 8 << 20, 1 << 34] {
            let g = Geometry::of(q);
            assert!(
                (BATCH_BYTES_MIN..=BATCH_BYTES_MAX).contains(&g.batch_bytes),
                "{q}: {g:?}"
            );
            assert!(g.queue_batches >= QUEUE_BATCHES_MIN, "{q}: {g:?}");
            assert!((g.batch_bytes * g.queue_batches) as u64 <= q, "{q}: {g:?}");
        }
        assert_eq!(Geometry::of(8 << 20).batch_bytes, 64 << 10);
        assert_eq!(Geometry::of(8 << 20).queue_batches, 128);
        assert_eq!(Geometry::of(4096).batch_bytes, 1024);
    }

    /// A lane whose queue nobody drains, with `queue_batches` slots.
    fn lane(block: bool, queue_bytes: u64) -> (Lane, Receiver<Batch>) {
        let g = Geometry::of(queue_bytes);
        let (queue, queue_rx) = bounded(g.queue_batches);
        let (pool_tx, pool) = bounded(g.queue_batches + 2);
        for _ in 0..g.queue_batches + 1 {
            pool_tx.try_send(Batch::default()).unwrap();
        }
        let lane = Lane {
            shard: 1,
            mask: 0xf,
            block,
            lossless: false,
            geometry: g,
            limit: g.batch_bytes,
            pending: Batch {
                shard: 1,
                ..Batch::default()
            },
            queue,
            pool,
            counters: Arc::new(Counters::default()),
            handed: 0,
        };
        (lane, queue_rx)
    }

    #[test]
    fn drop_policy_drops_whole_batches_when_the_queue_is_full() {
        let (mut lane, rx) = lane(false, 4096);
        let line = [b'x'; 99].iter().chain(b"\n").copied().collect::<Vec<u8>>();
        // 4 queue slots of 1 KiB batches (10 records each); then every full batch is dropped.
        for _ in 0..100 {
            lane.push(&line);
        }
        assert_eq!(rx.len(), 4);
        assert!(rx.iter().take(4).all(|b| b.records == 10 && b.shard == 1));
        assert_eq!(lane.counters.dropped.load(Ordering::Relaxed), 50);
        assert_eq!(lane.pending.records, 10);
    }

    #[test]
    fn block_policy_grows_the_pending_batch_up_to_queue_bytes_then_waits() {
        let (mut lane, rx) = lane(true, 4096);
        let line = [b'x'; 99].iter().chain(b"\n").copied().collect::<Vec<u8>>();
        // 10 records (1000 bytes) per 1 KiB batch: 4 batches fill the queue.
        for _ in 0..41 {
            lane.push(&line);
        }
        assert_eq!(rx.len(), 4, "the queue is full");
        assert_eq!(lane.pending.records, 1);
        assert!(!lane.hand_over(), "flush would return false");
        // The pending batch grows past batch_bytes, up to queue_bytes.
        for _ in 0..39 {
            lane.push(&line);
        }
        assert_eq!(lane.pending.buf.len(), 4000);
        assert_eq!(lane.counters.dropped.load(Ordering::Relaxed), 0);
        // The record that would take it past queue_bytes: the lane waits until the sink takes
        // a batch, then queues the grown one whole.
        let sink = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            let first = rx.recv().unwrap();
            (first.records, rx)
        });
        lane.push(&line);
        let (first, rx) = sink.join().unwrap();
        assert_eq!(first, 10);
        assert_eq!(lane.counters.dropped.load(Ordering::Relaxed), 0);
        assert_eq!(lane.pending.records, 1);
        assert_eq!(
            lane.limit, lane.geometry.batch_bytes,
            "no longer backlogged"
        );
        let queued: Vec<u64> = rx.try_iter().map(|b| b.records).collect();
        assert_eq!(queued, [10, 10, 10, 40]);
        // Room again: the batch goes and a pooled buffer replaces it.
        assert!(lane.hand_over());
        assert!(lane.pending.buf.is_empty());
    }

    #[test]
    fn a_lossless_drop_lane_waits_for_room_instead_of_dropping() {
        let (mut lane, rx) = lane(false, 4096);
        lane.lossless = true;
        let line = [b'x'; 99].iter().chain(b"\n").copied().collect::<Vec<u8>>();
        // 40 records fill the 4 queue slots; the 51st finds the queue full.
        for _ in 0..51 {
            lane.push(&line);
        }
        assert_eq!(rx.len(), 4, "the queue is full");
        assert_eq!(
            lane.pending.records, 11,
            "the batch stays pending and grows"
        );
        assert!(lane.limit > lane.geometry.batch_bytes, "backlogged");
        assert!(!lane.hand_over());
        assert_eq!(lane.counters.dropped.load(Ordering::Relaxed), 0);
        drop(rx.recv().unwrap());
        assert!(lane.hand_over());
        assert_eq!(lane.limit, lane.geometry.batch_bytes);
        lane.lossless = false;
        for _ in 0..100 {
            lane.push(&line);
        }
        assert!(
            lane.counters.dropped.load(Ordering::Relaxed) > 0,
            "drops again"
        );
    }

    /// Runs cut the same batches, drop the same ones and leave the same pending batch as
    /// pushing every subscribed record by itself, whatever the streams, sizes and queue room.
    #[test]
    fn runs_cut_batches_where_single_records_would() {
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut rand = move |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        let streams = [
            Stream::Events,
            Stream::Markers,
            Stream::Late,
            Stream::DeadLetter,
        ];
        for case in 0..200 {
            let mut out = Out::with_capacity(1 << 16, 1 << 10);
            for _ in 0..rand(120) {
                let longest = if rand(10) == 0 { 1500 } else { 150 };
                let len = 1 + rand(longest) as usize;
                out.buf
                    .extend(std::iter::repeat_n(b'a' + rand(26) as u8, len));
                out.finish(streams[rand(4) as usize]);
            }
            let mask = 1 + rand(15) as u8;
            // Drop lanes with queues that fill (so batches are dropped); block lanes with room
            // for everything (a full one would wait for a sink these tests do not run).
            let (block, queue_bytes) = if rand(2) == 0 {
                (false, 4096 << rand(3))
            } else {
                (true, 1 << 20)
            };
            let (mut by_run, rx_run) = lane(block, queue_bytes);
            let (mut by_record, rx_record) = lane(block, queue_bytes);
            by_run.mask = mask;
            by_run.push_records(&out.buf, &out.recs);
            for (stream, line) in out.iter() {
                if mask & stream_bit(stream) != 0 {
                    by_record.push(line);
                }
            }
            let batches = |rx: Receiver<Batch>| {
                rx.try_iter()
                    .map(|b| (b.records, b.buf))
                    .collect::<Vec<_>>()
            };
            assert_eq!(batches(rx_run), batches(rx_record), "case {case}");
            assert_eq!(by_run.pending.buf, by_record.pending.buf, "case {case}");
            assert_eq!(by_run.pending.records, by_record.pending.records);
            assert_eq!(
                by_run.counters.dropped.load(Ordering::Relaxed),
                by_record.counters.dropped.load(Ordering::Relaxed)
            );
        }
    }

    #[test]
    fn count_lines_counts_partial_tail() {
        assert_eq!(count_lines(b""), 0);
        assert_eq!(count_lines(b"a\nb\n"), 2);
        assert_eq!(count_lines(b"a\nb"), 2);
    }
}
