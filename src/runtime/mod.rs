//! The live appliance: one pinned glommio executor per configured core, each a shard.
//!
//! Start-up order (the parent thread): signal handling, then every listener socket (bound in
//! shard order, see `ingest`), then the outputs, then the hand-off queues for every (from, to)
//! pair, then the executors. Each shard creates its engine on its own pinned thread (so the
//! arena is first touched on the shard's NUMA node), connects its queues, wraps its sockets,
//! starts its tasks and reports ready; when all have, the parent prints the single
//! `READY {json}` line on stderr.
//!
//! Shutdown (SIGTERM/SIGINT): the parent raises the stop flag; each shard stops ingest (tasks
//! read what the kernel already holds, then end), seals and sends its last hand-off batches,
//! closes its senders, drains its receivers until every peer has closed, flushes its output and
//! reports. The parent then shuts the outputs down (5 s), logs each shard's counters and
//! returns. A watchdog ends the process with exit code 1 if all that takes more than 10 s.

pub mod counters;
pub mod durable;
pub mod handoff;
pub mod ops;
pub mod shard;

use crate::config::{Config, SnapshotWriteRate, Transport};
use crate::decode::Decoder;
use crate::engine::rules::Rules;
use crate::engine::{numa, Engine};
use crate::ingest::{self, Listeners, ShardSocket};
use crate::output::{Outputs, ShardOutput};
use counters::ShardCounters;
use glommio::channels::shared_channel::{self, ConnectedReceiver, SharedReceiver, SharedSender};
use glommio::{LocalExecutorBuilder, Placement};
use handoff::{Batch, HandoffOut};
use shard::{now_ms, Ctx, IngestLimits, Shard};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// Engine timers run at least this often.
const ADVANCE_INTERVAL_MS: i64 = 50;
/// Output is flushed at least this often while some is pending (the tick period).
const TICK: Duration = Duration::from_millis(1);
/// Counters are published this often.
const PUBLISH_INTERVAL_MS: i64 = 1000;
/// A shard's share of the shutdown: stop ingest, drain hand-offs, flush.
const SHARD_DRAIN_BUDGET: Duration = Duration::from_secs(3);
/// How long the outputs get to drain at shutdown.
const OUTPUT_SHUTDOWN: Duration = Duration::from_secs(5);
/// From the stop signal to process exit, whatever happens.
const SHUTDOWN_HARD_CAP: Duration = Duration::from_secs(10);
/// Shards must be ready within this long (engine reservation, queue connection).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The same with persistence on: recovery restores the snapshot and replays the log first.
const START_TIMEOUT_RECOVERING: Duration = Duration::from_secs(600);
/// With persistence on, the shutdown's extra allowance for the final snapshot.
const FINAL_SNAPSHOT_BUDGET: Duration = Duration::from_secs(60);
/// glommio's preemption tick: how long a busy task may run before `yield_if_needed` yields,
/// and so how often a busy executor polls its timers and I/O.
const PREEMPT: Duration = Duration::from_millis(5);
/// How often the kicker checks that every shard's ticker still advances (see [`Beat`]).
const KICK_CHECK: Duration = Duration::from_millis(1);
/// How long a shard's ticker (every `TICK`) may stand still while its thread sleeps before the
/// kicker wakes it: the bound on a park-race stall. Two ticks, so that a ticker merely late by
/// a timer's slack is not woken for nothing.
const KICK_AFTER: Duration = Duration::from_millis(2);

#[derive(Debug)]
pub enum RunError {
    /// The configuration could not be compiled (exit code 2).
    Config(crate::config::ConfigError),
    /// Anything at run time (exit code 1).
    Runtime(String),
}

impl std::fmt::Display for RunError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RunError::Config(e) => write!(f, "{e}"),
            RunError::Runtime(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for RunError {}

/// Liveness of one shard's executor, watched by the parent's kicker thread.
///
/// Why: glommio 0.9.0 can park an executor that still has runnable tasks. `run_task_queues`
/// returns "nothing ran" when the preemption timer fires between its I/O poll and its first
/// check, and the run loop then parks; if no timer or I/O completion is pending (every task is
/// runnable, e.g. connections with data waiting), it sleeps in `io_uring_enter` for ever. Seen
/// here under load (a shard asleep with full socket buffers); fixed upstream in glommio/glommio
/// PR #53 ("do not park the executor while a task queue is still runnable"). Any foreign wake
/// gets it going again, so the ticker bumps `ticks` every millisecond (and so does each round
/// of input processed, [`shard::Ctx::beat`]) and the kicker wakes the
/// ticker's task from outside when a shard's `ticks` stood still for `KICK_AFTER` while its
/// thread sleeps (a shard that is merely busy, or waiting for a CPU, is runnable, not sleeping,
/// and is left alone). Healthy shards cost the kicker one atomic load per check.
#[derive(Default)]
pub struct Beat {
    ticks: AtomicU64,
    /// Kicks while the ticker ran. Before it starts and after it ends (queue connection, the
    /// shutdown's drain and final snapshot) the shard's ticks stand still by design, so a wake
    /// then is not evidence of the race: it is made (harmless) but not counted.
    kicks: AtomicU64,
    ticking: AtomicBool,
    /// The shard thread's kernel thread id, to read its scheduler state.
    tid: std::sync::atomic::AtomicI32,
    /// The ticker task's waker; taken back (and dropped) on the shard's own thread at exit.
    waker: Mutex<Option<Waker>>,
}

impl Beat {
    /// Only the shard's own thread writes `ticks`: a load and a store, no locked add.
    #[inline]
    fn beat(&self) {
        let t = self.ticks.load(Ordering::Relaxed);
        self.ticks.store(t.wrapping_add(1), Ordering::Relaxed);
    }
}

fn spawn_kicker(beats: Arc<[Beat]>, done: Arc<AtomicBool>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("shard-kicker".into())
        .spawn(move || {
            // Per shard: the ticks last seen, and since when they stand still.
            let mut last: Vec<(u64, Instant)> = beats
                .iter()
                .map(|b| (b.ticks.load(Ordering::Relaxed), Instant::now()))
                .collect();
            while !done.load(Ordering::Acquire) {
                std::thread::sleep(KICK_CHECK);
                for (b, (seen, since)) in beats.iter().zip(last.iter_mut()) {
                    let now = b.ticks.load(Ordering::Relaxed);
                    if now != *seen {
                        (*seen, *since) = (now, Instant::now());
                    } else if since.elapsed() >= KICK_AFTER
                        && thread_sleeping(b.tid.load(Ordering::Relaxed))
                    {
                        if let Ok(w) = b.waker.lock() {
                            if let Some(w) = w.as_ref() {
                                w.wake_by_ref();
                                if b.ticking.load(Ordering::Relaxed) {
                                    b.kicks.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        // Counted once per stall; woken again only if it lasts another period.
                        *since = Instant::now();
                    }
                }
            }
        })
        .map(|_| ())
}

/// Keeps the threads that are not shards (sinks, metrics, signals, the kicker) off the shards'
/// CPUs when the process may run on others: a file sink writing hundreds of MB/s would
/// otherwise take its time from a shard. The calling thread's allowed CPUs lose the shards'
/// ones, and threads it starts later inherit that; shards pin themselves to their own CPU.
/// When every allowed CPU holds a shard (`cores = "all"`), nothing changes.
fn place_helpers(shard_cpus: &[usize]) {
    // SAFETY: a zeroed cpu_set_t is a valid, empty set; the calls read and write only it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return;
        }
        for &cpu in shard_cpus {
            if cpu < libc::CPU_SETSIZE as usize {
                libc::CPU_CLR(cpu, &mut set);
            }
        }
        if libc::CPU_COUNT(&set) == 0 {
            return;
        }
        let helpers: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect();
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0 {
            log::info!("helper threads on cpus {helpers:?}, off the shards' cpus");
        }
    }
}

/// Whether thread `tid` of this process is in an interruptible sleep (state `S`).
fn thread_sleeping(tid: i32) -> bool {
    if tid <= 0 {
        return false;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself contain spaces.
    stat.rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('S'))
}

fn rt(context: &str) -> impl Fn(&dyn std::fmt::Display) -> RunError + '_ {
    move |e| RunError::Runtime(format!("{context}: {e}"))
}

/// Messages from shards and the signal thread to the parent.
enum Msg {
    Ready(u32),
    Failed(u32, String),
    Exited(u32),
    Signal(i32),
}

/// Everything a shard thread starts with (all `Send`).
struct ShardArgs {
    id: u32,
    cpu: usize,
    cfg: Arc<Config>,
    rules: Arc<Rules>,
    output: ShardOutput,
    sockets: Vec<ShardSocket>,
    /// Data queues to each peer / from each peer (`None` at own index).
    data_tx: Vec<Option<SharedSender<Batch>>>,
    data_rx: Vec<Option<SharedReceiver<Batch>>>,
    /// Where this shard returns emptied buffers to each peer.
    ret_tx: Vec<Option<crossbeam_channel::Sender<Batch>>>,
    /// Where this shard's buffers to each peer come back.
    ret_rx: Vec<Option<crossbeam_channel::Receiver<Batch>>>,
    counters: Arc<[ShardCounters]>,
    beats: Arc<[Beat]>,
    stop: Arc<AtomicBool>,
    msgs: mpsc::Sender<Msg>,
    /// Metrics, health, heartbeats, reloads (`ops`).
    ops: Arc<ops::Ops>,
    /// Which handed-off events each shard has made durable (`durable`).
    handoffs: Arc<durable::Handoffs>,
}

/// Run the appliance until SIGTERM/SIGINT, without a config file to reload on SIGHUP.
pub fn run(cfg: Config) -> Result<(), RunError> {
    run_with(cfg, None)
}

/// Run the appliance until SIGTERM/SIGINT; SIGHUP re-reads `config_path` (see `ops`).
pub fn run_with(cfg: Config, config_path: Option<std::path::PathBuf>) -> Result<(), RunError> {
    let cores = cfg.core_list();
    assert!(!cores.is_empty() && cores.len() <= crate::config::SHARDS_MAX);
    let shards = cores.len() as u32;
    let rules = Arc::new(Rules::compile(&cfg).map_err(RunError::Config)?);
    let cfg = Arc::new(cfg);
    let (msg_tx, msg_rx) = mpsc::channel::<Msg>();
    // Before any thread starts: every thread but the shards inherits this placement.
    place_helpers(&cores);

    // Signals first, so a SIGTERM during start-up is a clean stop, not a kill.
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ])
    .map_err(|e| rt("installing signal handlers")(&e))?;
    {
        let tx = msg_tx.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for s in signals.forever() {
                    if tx.send(Msg::Signal(s)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| rt("starting the signal thread")(&e))?;
    }

    // Held until the process exits: one process per persist directory.
    let _dir_lock = match cfg.persist.dir.as_deref() {
        Some(dir) => {
            let dir = std::path::Path::new(dir);
            let lock = durable::lock_dir(dir).map_err(RunError::Runtime)?;
            crate::persist::layout::check_and_record(dir, shards).map_err(RunError::Runtime)?;
            Some(lock)
        }
        None => None,
    };
    let listeners = Listeners::bind(&cfg, shards).map_err(|e| rt("binding listeners")(&e))?;
    // The metrics endpoint next: a busy port fails start-up before any shard runs.
    let ops = Arc::new(ops::Ops::start(&cfg, shards as usize).map_err(RunError::Runtime)?);
    let mut coord = ops::Coordinator::new(config_path, (*cfg).clone(), rules.clone());
    for g in &listeners.groups {
        log::info!(
            "listening on {} {} ({} sockets{})",
            ingest::transport_label(g.kind),
            g.address,
            shards,
            if g.steering {
                ", steering attached"
            } else {
                ""
            }
        );
    }
    let (outputs, shard_outputs) =
        Outputs::start(&cfg, shards as usize).map_err(|e| rt("starting outputs")(&e))?;
    if shard_outputs.len() != shards as usize {
        return Err(RunError::Runtime(format!(
            "outputs returned {} shard handles for {shards} shards",
            shard_outputs.len()
        )));
    }

    // Hand-off queues: one data queue and one return queue per ordered pair.
    let n = shards as usize;
    let q = cfg.limits.handoff_queue_batches as usize;
    let pool = q + 2;
    let mut data_tx: Vec<Vec<Option<SharedSender<Batch>>>> = (0..n).map(|_| none_vec(n)).collect();
    let mut data_rx: Vec<Vec<Option<SharedReceiver<Batch>>>> =
        (0..n).map(|_| none_vec(n)).collect();
    let mut ret_tx: Vec<Vec<Option<crossbeam_channel::Sender<Batch>>>> =
        (0..n).map(|_| none_vec(n)).collect();
    let mut ret_rx: Vec<Vec<Option<crossbeam_channel::Receiver<Batch>>>> =
        (0..n).map(|_| none_vec(n)).collect();
    for from in 0..n {
        for to in 0..n {
            if from == to {
                continue;
            }
            let (tx, rx) = shared_channel::new_bounded(q);
            data_tx[from][to] = Some(tx);
            data_rx[to][from] = Some(rx);
            let (rtx, rrx) = crossbeam_channel::bounded(pool);
            ret_tx[to][from] = Some(rtx);
            ret_rx[from][to] = Some(rrx);
        }
    }

    let counters: Arc<[ShardCounters]> = (0..n).map(|_| ShardCounters::default()).collect();
    let handoffs = Arc::new(durable::Handoffs::new(n));
    let persist = cfg.persist.dir.is_some();
    let beats: Arc<[Beat]> = (0..n).map(|_| Beat::default()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let kicker_done = Arc::new(AtomicBool::new(false));
    spawn_kicker(beats.clone(), kicker_done.clone())
        .map_err(|e| rt("starting the shard kicker")(&e))?;
    let mut handles = Vec::with_capacity(n);
    let mut shard_outputs = shard_outputs.into_iter();
    for (i, &cpu) in cores.iter().enumerate() {
        let args = ShardArgs {
            id: i as u32,
            cpu,
            cfg: cfg.clone(),
            rules: rules.clone(),
            output: shard_outputs.next().expect("one output per shard"),
            sockets: listeners
                .for_shard(i as u32)
                .map_err(|e| rt("duplicating listener sockets")(&e))?,
            data_tx: std::mem::take(&mut data_tx[i]),
            data_rx: std::mem::take(&mut data_rx[i]),
            ret_tx: std::mem::take(&mut ret_tx[i]),
            ret_rx: std::mem::take(&mut ret_rx[i]),
            counters: counters.clone(),
            beats: beats.clone(),
            stop: stop.clone(),
            msgs: msg_tx.clone(),
            ops: ops.clone(),
            handoffs: handoffs.clone(),
        };
        let h = LocalExecutorBuilder::new(Placement::Fixed(cpu))
            .name(&format!("shard{i}"))
            .preempt_timer(PREEMPT)
            .spawn(move || shard_main(args))
            .map_err(|e| rt(&format!("starting shard {i} on cpu {cpu}"))(&e))?;
        handles.push(h);
    }
    drop(msg_tx);

    // Wait for every shard (or the first failure, or a signal).
    let started = Instant::now();
    let mut ready = 0;
    let mut failure: Option<String> = None;
    // Recovery (restore, replay) happens before a shard reports ready.
    let start_timeout = if persist {
        START_TIMEOUT_RECOVERING
    } else {
        START_TIMEOUT
    };
    // Shards that have sent their one last message (`Failed` or `Exited`): the shutdown below
    // waits only for the others.
    let mut gone = 0;
    while ready < n && failure.is_none() {
        let left = start_timeout.saturating_sub(started.elapsed());
        match msg_rx.recv_timeout(left) {
            Ok(Msg::Ready(i)) => {
                log::debug!("shard {i} ready");
                ready += 1;
            }
            Ok(Msg::Failed(i, e)) => {
                gone += 1;
                failure = Some(format!("shard {i}: {e}"));
            }
            Ok(Msg::Exited(i)) => {
                gone += 1;
                failure = Some(format!("shard {i} exited during start-up"));
            }
            Ok(Msg::Signal(signal_hook::consts::SIGHUP)) => {
                log::warn!("SIGHUP during start-up: ignored (send it again once READY)");
            }
            Ok(Msg::Signal(s)) => {
                log::info!("signal {s} during start-up: stopping");
                break;
            }
            Err(_) => failure = Some(format!("shards not ready after {start_timeout:?}")),
        }
    }
    if ready == n && failure.is_none() {
        // `/readyz` 200 and systemd READY=1 (a no-op outside systemd) with the READY line.
        ops.set_ready();
        println_ready(&listeners, &outputs, shards, ops.metrics_addr);
        log::info!("running {shards} shards on cpus {cores:?}");
        // Run until a signal or a shard failure.
        loop {
            match msg_rx.recv_timeout(coord.until_next_publish()) {
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    coord.publish_outputs(&ops, &outputs, false)
                }
                Ok(Msg::Signal(signal_hook::consts::SIGHUP)) => coord.reload(&ops),
                Ok(Msg::Signal(s)) => {
                    log::info!("signal {s}: shutting down");
                    break;
                }
                Ok(Msg::Failed(i, e)) => {
                    gone += 1;
                    failure = Some(format!("shard {i}: {e}"));
                    break;
                }
                Ok(Msg::Exited(i)) => {
                    gone += 1;
                    failure = Some(format!("shard {i} stopped unexpectedly"));
                    break;
                }
                Ok(Msg::Ready(_)) => {}
                Err(_) => {
                    failure = Some("every shard is gone".into());
                    break;
                }
            }
        }
    }

    // Shutdown, bounded by the watchdog.
    let t0 = Instant::now();
    ops.set_stopping();
    stop.store(true, Ordering::Release);
    // The final snapshot gets its own share of the shutdown when persistence is on.
    let snapshot_budget = if persist {
        FINAL_SNAPSHOT_BUDGET
    } else {
        Duration::ZERO
    };
    let hard_cap = SHUTDOWN_HARD_CAP + snapshot_budget;
    std::thread::Builder::new()
        .name("shutdown-watchdog".into())
        .spawn(move || {
            std::thread::sleep(hard_cap);
            log::error!("shutdown took longer than {hard_cap:?}: exiting without a full flush");
            std::process::exit(1);
        })
        .map_err(|e| rt("starting the shutdown watchdog")(&e))?;
    let mut exited = gone;
    let shard_budget = SHARD_DRAIN_BUDGET + snapshot_budget + Duration::from_secs(1);
    let shard_deadline = t0 + shard_budget;
    while exited < n {
        let left = shard_deadline.saturating_duration_since(Instant::now());
        match msg_rx.recv_timeout(left) {
            Ok(Msg::Exited(_)) => exited += 1,
            Ok(Msg::Failed(i, e)) => {
                exited += 1;
                failure.get_or_insert(format!("shard {i}: {e}"));
            }
            Ok(_) => {}
            Err(_) => {
                log::error!(
                    "{} shards did not finish within {shard_budget:?}",
                    n - exited
                );
                failure.get_or_insert("shards did not stop in time".into());
                break;
            }
        }
    }
    if exited == n {
        for (i, h) in handles.into_iter().enumerate() {
            if let Err(e) = h.join() {
                failure.get_or_insert(format!("shard {i} thread: {e}"));
            }
        }
    }
    kicker_done.store(true, Ordering::Release);
    coord.publish_outputs(&ops, &outputs, true);
    outputs.shutdown(OUTPUT_SHUTDOWN);
    for (i, c) in counters.iter().enumerate() {
        log::info!("shard stats: {}", c.load().to_json(i as u32));
        let kicks = beats[i].kicks.load(Ordering::Relaxed);
        if kicks > 0 {
            log::warn!("shard {i}: executor found parked with work and woken {kicks} times (glommio park race, see runtime::Beat)");
        }
    }
    // The sockets stay open until here: a closed member would reshuffle the reuseport group.
    drop(listeners);
    log::info!("stopped in {:?}", t0.elapsed());
    match failure {
        None => Ok(()),
        Some(f) => Err(RunError::Runtime(f)),
    }
}

fn none_vec<T>(n: usize) -> Vec<Option<T>> {
    (0..n).map(|_| None).collect()
}

/// The one readiness line tests and service managers wait for:
/// `READY {"shards":N,"listeners":[{"kind":..,"address":..}],"outputs":[..],"metrics":..}` (keys
/// in this order; `metrics` is the endpoint's bound address, or null when it is off).
fn println_ready(
    listeners: &Listeners,
    outputs: &Outputs,
    shards: u32,
    metrics: Option<std::net::SocketAddr>,
) {
    let entry = |kind: &str, address: &str| {
        format!(
            "{{\"kind\":{},\"address\":{}}}",
            serde_json::Value::from(kind),
            serde_json::Value::from(address)
        )
    };
    let ls: Vec<String> = listeners
        .groups
        .iter()
        .map(|g| entry(ingest::transport_label(g.kind), &g.address.to_string()))
        .collect();
    let os: Vec<String> = outputs
        .bound()
        .into_iter()
        .map(|(kind, address)| entry(kind, &address))
        .collect();
    let metrics = metrics.map_or(serde_json::Value::Null, |a| a.to_string().into());
    eprintln!(
        "READY {{\"shards\":{shards},\"listeners\":[{}],\"outputs\":[{}],\"metrics\":{metrics}}}",
        ls.join(","),
        os.join(",")
    );
}

/// A shard's executor: set up, report ready, run until stopped, drain, report exit.
async fn shard_main(a: ShardArgs) {
    let id = a.id;
    let msgs = a.msgs.clone();
    match shard_run(a).await {
        Ok(()) => {
            let _ = msgs.send(Msg::Exited(id));
        }
        Err(e) => {
            log::error!("shard {id}: {e}");
            let _ = msgs.send(Msg::Failed(id, e));
        }
    }
}

async fn shard_run(a: ShardArgs) -> Result<(), String> {
    let id = a.id;
    let shards = a.data_tx.len() as u32;
    let cfg = &a.cfg;
    let node = numa::node_of_cpu(a.cpu);
    log::info!("shard {id}: cpu {} numa node {node:?}", a.cpu);
    let engine = Engine::new(a.rules.clone(), cfg, id as u8, node)
        .map_err(|e| format!("reserving engine memory: {e}"))?;
    let line_bytes_max = cfg.limits.line_bytes_max as usize;
    let dec = Decoder::new(
        a.rules.field_table(),
        cfg.limits.json_depth_max,
        line_bytes_max,
    );
    // A batch holds at least one line of the longest kind: tagged, with its newline.
    let batch_bytes = (cfg.limits.handoff_batch_bytes as usize)
        .max(line_bytes_max + crate::persist::producer::TAG_BYTES_MAX + 1);
    let handoff = HandoffOut::new(
        id,
        a.ret_rx,
        cfg.limits.handoff_batch_events,
        batch_bytes,
        cfg.limits.handoff_queue_batches,
    );
    // Room for a round's records: several enriched copies of the longest line, at least 1 MiB.
    let out_bytes = (1usize << 20).max(4 * (line_bytes_max + 4096) * (a.rules.profiles.len() + 1));
    let st = Shard::new(
        id,
        shards,
        a.rules.clone(),
        engine,
        dec,
        out_bytes,
        a.output,
        handoff,
        line_bytes_max,
    );

    let mut st = st;
    // Without an endpoint nobody reads the latency histogram or the per-stream counts: the
    // data path skips them (the shutdown log's counters are kept either way).
    st.metrics.set_enabled(a.ops.metrics_enabled());
    if let Some(dir) = cfg.persist.dir.as_deref() {
        let t0 = Instant::now();
        let rec = durable::recover(&mut st, cfg, std::path::Path::new(dir), a.handoffs.clone())
            .await
            .map_err(|e| format!("recovering from {dir}: {e}"))?;
        log::info!(
            "shard {id}: recovered in {:?}: {} sessions from {}, {} logged events replayed ({} duplicates skipped, {} covered records read past) and {} logged expiry passes run; open {:?}, restore {:?}, replay {:?}",
            t0.elapsed(),
            rec.sessions,
            rec.snapshot
                .as_ref()
                .map_or("no snapshot".to_string(), |(p, g)| format!("{} (generation {g})", p.display())),
            rec.replayed,
            rec.duplicates,
            rec.read_past,
            rec.passes,
            rec.open,
            rec.restore,
            rec.replay
        );
    }

    // The park race (see `Beat`) can also strike while the queue ends connect below, before
    // the ticker runs: let the kicker wake this task from the start.
    let beat = &a.beats[id as usize];
    // SAFETY: gettid has no preconditions.
    beat.tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
    std::future::poll_fn(|cx| {
        if let Ok(mut w) = beat.waker.lock() {
            *w = Some(cx.waker().clone());
        }
        Poll::Ready(())
    })
    .await;

    // Connect every queue end concurrently: a connect waits for its peer's.
    let tx_tasks: Vec<_> = a
        .data_tx
        .into_iter()
        .map(|s| s.map(|s| glommio::spawn_local(s.connect())))
        .collect();
    let rx_tasks: Vec<_> = a
        .data_rx
        .into_iter()
        .map(|r| r.map(|r| glommio::spawn_local(r.connect())))
        .collect();
    let mut tx = Vec::with_capacity(shards as usize);
    for t in tx_tasks {
        tx.push(match t {
            Some(t) => Some(t.await),
            None => None,
        });
    }
    let mut rx: Vec<Option<ConnectedReceiver<Batch>>> = Vec::with_capacity(shards as usize);
    for t in rx_tasks {
        rx.push(match t {
            Some(t) => Some(t.await),
            None => None,
        });
    }

    let limits = IngestLimits {
        line_bytes_max,
        datagram_bytes_max: cfg.limits.datagram_bytes_max as usize,
        tcp_idle_timeout: cfg.limits.tcp_idle_timeout.0,
        tcp_connections_per_shard: (cfg.limits.tcp_connections_max / shards).max(1),
    };
    let ctx = Rc::new(Ctx::new(st, limits, tx, a.beats.clone()));

    let mut receivers = Vec::new();
    for ((from, r), ret) in rx.into_iter().enumerate().zip(a.ret_tx) {
        if let (Some(r), Some(ret)) = (r, ret) {
            receivers.push(glommio::spawn_local(handoff_receiver(
                ctx.clone(),
                r,
                ret,
                from as u32,
            )));
        }
    }
    for s in a.sockets {
        match s.kind {
            Transport::Udp => glommio::spawn_local(ingest::udp::run(ctx.clone(), s)).detach(),
            Transport::Tcp => {
                glommio::spawn_local(ingest::tcp::run_listener(ctx.clone(), s)).detach()
            }
        };
    }
    if id == 0 {
        a.ops.spawn_shard0_tasks();
    }
    let snapshots = cfg.persist.dir.is_some().then(|| {
        glommio::spawn_local(snapshot_loop(
            ctx.clone(),
            cfg.persist.snapshot_interval.0,
            cfg.persist.snapshot_write_rate,
        ))
    });
    let _ = a.msgs.send(Msg::Ready(id));

    // The ticker: engine timers, output flushes, counter publication, the stop flag, and the
    // heartbeat the kicker watches.
    let beat = &a.beats[id as usize];
    // SAFETY: gettid has no preconditions.
    beat.tid.store(unsafe { libc::gettid() }, Ordering::Relaxed);
    std::future::poll_fn(|cx| {
        if let Ok(mut w) = beat.waker.lock() {
            *w = Some(cx.waker().clone());
        }
        Poll::Ready(())
    })
    .await;
    // When the next expiry pass is due, on the monotonic clock (a step of the wall clock neither
    // rushes nor stalls the passes; the engine is still given the wall time it runs on).
    let mut advance_due = Instant::now() + Duration::from_millis(ADVANCE_INTERVAL_MS as u64);
    let mut last_publish = now_ms();
    let mut ops_tick = ops::ShardTick::new(last_publish);
    beat.ticking.store(true, Ordering::Relaxed);
    while !a.stop.load(Ordering::Acquire) {
        glommio::timer::sleep(TICK).await;
        beat.beat();
        a.ops.beats.beat(id as usize);
        let now = now_ms();
        let mut st = ctx.st.borrow_mut();
        st.c.executor_kicks = beat.kicks.load(Ordering::Relaxed);
        let started = Instant::now();
        if started >= advance_due {
            let left = st.advance(now);
            // A busy executor runs the ticker late, and a large expiry burst makes the pass
            // itself long: both delay the end of sessions whose time has come.
            st.c.expiry_lag_us = u64::try_from(
                Instant::now()
                    .saturating_duration_since(advance_due)
                    .as_micros(),
            )
            .unwrap_or(u64::MAX);
            // A pass stopped by a full output batch goes on at the next tick, after delivery.
            advance_due = if left {
                started
            } else {
                started + Duration::from_millis(ADVANCE_INTERVAL_MS as u64)
            };
        }
        if (!st.out.is_empty() || !st.output.is_idle() || ctx.blocked.get())
            && st.deliver_and_flush()
        {
            ctx.blocked.set(false);
        }
        if let Some(d) = st.durable.as_mut() {
            // Group commit for whatever the rounds left buffered (and interval fsyncs).
            d.commit();
        }
        if now - last_publish >= PUBLISH_INTERVAL_MS {
            st.sync_durable_counters();
            st.c.handoff_in_flight = u64::from(st.handoff.in_flight());
            st.c.cpu_us = counters::thread_cpu_us();
            st.c.publish(&a.counters[id as usize]);
            last_publish = now;
            if log::log_enabled!(log::Level::Debug) {
                log::debug!("shard counters: {}", st.c.to_json(id));
            }
        }
        a.ops.publish_shard(&mut st, &mut ops_tick, now, false);
        if a.ops.apply_rules_if_offered(&mut st, &mut ops_tick, cfg) {
            // The log does not record the rules: a replay runs every record under those of the
            // restart. A snapshot cut now leaves only records applied under the new rules to
            // replay, once it is published.
            ctx.ask_snapshot();
        }
    }
    beat.ticking.store(false, Ordering::Relaxed);

    // Shutdown.
    let deadline = Instant::now() + SHARD_DRAIN_BUDGET;
    ctx.stop_ingest();
    while ctx.ingest_tasks.get() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(TICK).await;
    }
    if ctx.ingest_tasks.get() > 0 {
        log::warn!(
            "shard {id}: {} ingest tasks still running at the deadline",
            ctx.ingest_tasks.get()
        );
    }
    ctx.st.borrow_mut().handoff.seal_all();
    let left = deadline.saturating_duration_since(Instant::now());
    if glommio::timer::timeout(left, async {
        shard::send_ready(&ctx).await;
        Ok(())
    })
    .await
    .is_err()
    {
        log::warn!("shard {id}: hand-off queues still full at the deadline");
    }
    for t in ctx.tx.iter().flatten() {
        t.close();
    }
    for r in receivers {
        let left = deadline.saturating_duration_since(Instant::now());
        if glommio::timer::timeout(left, async {
            r.await;
            Ok(())
        })
        .await
        .is_err()
        {
            log::warn!("shard {id}: a peer did not finish its hand-offs in time");
            break;
        }
    }
    loop {
        let done = {
            let mut st = ctx.st.borrow_mut();
            st.deliver_and_flush() && st.output.is_idle()
        };
        if done || Instant::now() >= deadline {
            if !done {
                log::warn!("shard {id}: output still pending at the deadline");
            }
            break;
        }
        glommio::timer::sleep(TICK).await;
    }
    if let Some(task) = snapshots {
        // The periodic task ends at the stop (a snapshot it is writing is abandoned at its next
        // step); then take the final one, so a restart resumes every open session without
        // replaying a log.
        task.await;
        match durable::snapshot(&ctx, None).await {
            Ok(Some(t)) => log::info!("shard {id}: final snapshot written: {t}"),
            Ok(None) => {}
            Err(e) => log::error!(
                "shard {id}: final snapshot failed (the log still covers everything): {e}"
            ),
        }
        let mut st = ctx.st.borrow_mut();
        if let Some(d) = st.durable.as_mut() {
            d.commit();
        }
        st.sync_durable_counters();
    }
    // The waker must be dropped on this thread, before the task it points to ends.
    let waker = beat.waker.lock().ok().and_then(|mut w| w.take());
    drop(waker);
    let mut st = ctx.st.borrow_mut();
    st.c.cpu_us = counters::thread_cpu_us();
    st.c.publish(&a.counters[id as usize]);
    a.ops.publish_shard(&mut st, &mut ops_tick, now_ms(), true);
    log::debug!(
        "shard {id}: {} live sessions at exit",
        st.engine.live_sessions()
    );
    Ok(())
}

/// Snapshots every `interval` until the shard stops, each file written at the pace `rate`
/// sets.
async fn snapshot_loop(ctx: Rc<Ctx>, interval: Duration, rate: SnapshotWriteRate) {
    let pace = durable::Pace {
        rate,
        interval,
        stop: ctx.stopping.clone(),
    };
    loop {
        let due = shard::first(glommio::timer::sleep(interval), ctx.snapshot_asked());
        match shard::first(due, ctx.stopped()).await {
            shard::Either::Left(_) => {}
            shard::Either::Right(()) => return,
        }
        match durable::snapshot(&ctx, Some(&pace)).await {
            Ok(Some(t)) => log::info!("shard {}: snapshot written: {t}", ctx.id),
            Ok(None) => {}
            Err(e) => log::warn!(
                "shard {}: snapshot failed (retried at the next interval): {e}",
                ctx.id
            ),
        }
    }
}

/// Receives the batches one peer hands to this shard, until that peer closes its sender.
async fn handoff_receiver(
    ctx: Rc<Ctx>,
    rx: ConnectedReceiver<Batch>,
    ret: crossbeam_channel::Sender<Batch>,
    from: u32,
) {
    while let Some(b) = rx.recv().await {
        // A full `block` sink stops this shard's processing, which fills the queue, which
        // stops the sender's reading: backpressure end to end.
        while ctx.blocked.get() {
            glommio::timer::sleep(TICK).await;
            if ctx.st.borrow_mut().output.flush() {
                ctx.blocked.set(false);
            }
        }
        let ok = {
            let mut st = ctx.st.borrow_mut();
            st.process_handoff(&b, from, now_ms());
            st.deliver_and_flush()
        };
        ctx.beat();
        if !ok {
            ctx.blocked.set(true);
        }
        // Capacity equals the pair's buffer count, so this fails only once the peer is gone.
        if ret.try_send(b).is_err() {
            log::debug!(
                "shard {}: buffer from shard {from} not returned (peer gone)",
                ctx.id
            );
        }
        glommio::yield_if_needed().await;
    }
}
