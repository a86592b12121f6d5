//! Operations wiring of the live runtime: the metrics endpoint and per-shard publication,
//! readiness (`/readyz`, `sd_notify` READY/STOPPING), the progress-aware systemd watchdog, and
//! SIGHUP reloads of the profile rules.
//!
//! Three owners, three types:
//! - [`Ops`] is shared by the parent and every shard (`Arc`, all atomics or cold mutexes): the
//!   health flags, the heartbeats, the bound metrics listener until shard 0 takes it, and the
//!   reload slot. Shards touch it once per tick (one heartbeat store, one atomic load of the
//!   reload generation), never per event.
//! - [`ShardMetrics`] lives inside each `Shard` and is touched on the data path: one clock read
//!   per receive round (not per event) and one weighted histogram record per datagram (UDP, with
//!   the datagram's wait in the socket added) or per round (TCP) when the round's records are
//!   handed to the sinks; one increment per output record by stream. Without a
//!   metrics endpoint none of that happens (one predictable branch per round and batch).
//! - [`Coordinator`] is the parent's: it publishes the output sinks' counters on the metrics
//!   cadence and performs reloads.
//!
//! Reload invariant: every shard runs the same rules. The parent checks compatibility once
//! (`engine::check_compatible`, the very check `Engine::set_rules` makes, deterministic) and
//! offers the new rules only if it passes; each shard swaps them in at its next tick. Between
//! the first and the last shard's swap (at most a tick, ~1 ms) an event handed between two
//! shards may meet different rules on each side; nothing else can differ. Only `[[profile]]`
//! sections apply live; every other section keeps its running value and a changed one is
//! named in a "needs a restart" warning.

use super::shard::Shard;
use crate::config::Config;
use crate::decode::{DecodeError, Decoder};
use crate::engine::rules::Rules;
use crate::metrics::{self, Health, ShardSample};
use crate::notify::{self, Heartbeats};
use crate::output::{OutputStats, Outputs};
use metrics_exporter_prometheus::PrometheusHandle;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long the parent waits for every shard to confirm a reload.
const RELOAD_APPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// What the parent and all shards share for operations.
pub struct Ops {
    pub health: Arc<Health>,
    pub beats: Arc<Heartbeats>,
    /// `None` when `[metrics] address` is unset: nothing is installed, served or published.
    handle: Option<PrometheusHandle>,
    /// Bound by the parent; taken (once) by shard 0.
    listener: Mutex<Option<std::net::TcpListener>>,
    /// The endpoint's actual address (port 0 resolved), for the READY line.
    pub metrics_addr: Option<SocketAddr>,
    pub publish_interval_ms: i64,
    reload: ReloadSlot,
}

/// The newest offered rules and each shard's answer. The generation is the only thing shards
/// read every tick; the mutexes are taken only when it moved (a reload) or by the parent.
struct ReloadSlot {
    generation: AtomicU64,
    rules: Mutex<Option<Arc<Rules>>>,
    /// Per shard: the last generation it handled, and why it refused it (if it did).
    answers: Mutex<Vec<(u64, Option<String>)>>,
    answered: Condvar,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing here can be left half-updated by a panic worth refusing to read.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ops {
    /// Parent thread, before the executors start: install the recorder and bind the endpoint
    /// (a busy port fails start-up: there is no `SO_REUSEPORT` on it).
    pub fn start(cfg: &Config, shards: usize) -> Result<Ops, String> {
        let (handle, listener, metrics_addr) = match cfg.metrics.address {
            None => (None, None, None),
            Some(addr) => {
                let handle = metrics::install()?;
                let l = metrics::http::bind(addr)
                    .map_err(|e| format!("binding the metrics endpoint {addr}: {e}"))?;
                let bound = l
                    .local_addr()
                    .map_err(|e| format!("metrics endpoint address: {e}"))?;
                (Some(handle), Some(l), Some(bound))
            }
        };
        let publish_interval_ms = cfg.metrics.publish_interval.as_ms().max(1);
        Ok(Ops {
            health: Arc::new(Health::new()),
            beats: Arc::new(Heartbeats::new(shards)),
            handle,
            listener: Mutex::new(listener),
            metrics_addr,
            publish_interval_ms,
            reload: ReloadSlot {
                generation: AtomicU64::new(0),
                rules: Mutex::new(None),
                answers: Mutex::new(vec![(0, None); shards]),
                answered: Condvar::new(),
            },
        })
    }

    pub fn metrics_enabled(&self) -> bool {
        self.handle.is_some()
    }

    /// Shard 0's executor: the endpoint, the recorder's upkeep, and the watchdog. They run
    /// until the executor ends.
    pub fn spawn_shard0_tasks(&self) {
        let listener = lock(&self.listener).take();
        if let (Some(handle), Some(l)) = (self.handle.clone(), listener) {
            let l = metrics::http::on_executor(l);
            glommio::spawn_local(metrics::serve(l, handle.clone(), self.health.clone())).detach();
            glommio::spawn_local(metrics::upkeep_loop(handle)).detach();
        }
        if let Some(iv) = notify::watchdog_interval() {
            log::info!("systemd watchdog: {iv:?}, pinged while every shard progresses");
            glommio::spawn_local(notify::watchdog_loop(self.beats.clone(), iv)).detach();
        }
    }

    /// After every shard reported ready (the moment of the READY line).
    pub fn set_ready(&self) {
        self.health.set_ready();
        if let Err(e) = notify::ready() {
            log::warn!("sd_notify READY=1: {e}");
        }
    }

    /// First thing on SIGTERM/SIGINT (or a failure): `/readyz` 503, systemd told.
    pub fn set_stopping(&self) {
        self.health.set_stopping();
        if let Err(e) = notify::stopping() {
            log::warn!("sd_notify STOPPING=1: {e}");
        }
    }

    /// Offer new rules to every shard; returns their generation.
    fn offer(&self, rules: Arc<Rules>) -> u64 {
        *lock(&self.reload.rules) = Some(rules);
        self.reload.generation.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Wait until every shard answered generation `gen`: the refusals, or the shards that did
    /// not answer in time.
    fn wait_answers(&self, gen: u64, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut answers = lock(&self.reload.answers);
        loop {
            if answers.iter().all(|(g, _)| *g >= gen) {
                let refused: Vec<String> = answers
                    .iter()
                    .enumerate()
                    .filter_map(|(i, (_, e))| e.as_ref().map(|e| format!("shard {i}: {e}")))
                    .collect();
                return if refused.is_empty() {
                    Ok(())
                } else {
                    Err(refused.join("; "))
                };
            }
            let now = Instant::now();
            if now >= deadline {
                let late: Vec<usize> = (0..answers.len()).filter(|&i| answers[i].0 < gen).collect();
                return Err(format!(
                    "shards {late:?} did not confirm within {timeout:?} (they apply at their next tick)"
                ));
            }
            answers = self
                .reload
                .answered
                .wait_timeout(answers, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Shard ticker: swap in newly offered rules, if any (one atomic load when there are none).
    /// Returns whether this shard now runs new rules.
    pub fn apply_rules_if_offered(&self, st: &mut Shard, m: &mut ShardTick, cfg: &Config) -> bool {
        let gen = self.reload.generation.load(Ordering::Acquire);
        if gen == m.rules_generation {
            return false;
        }
        m.rules_generation = gen;
        let Some(rules) = lock(&self.reload.rules).clone() else {
            return false;
        };
        let line_bytes_max = cfg.limits.line_bytes_max as usize;
        let dec = Decoder::new(
            rules.field_table(),
            cfg.limits.json_depth_max,
            line_bytes_max,
        );
        let answer = match st.set_rules(rules, dec) {
            Ok(()) => None,
            Err(e) => {
                log::error!("shard {}: reload refused: {e}", st.id);
                Some(e)
            }
        };
        let applied = answer.is_none();
        lock(&self.reload.answers)[st.id as usize] = (gen, answer);
        self.reload.answered.notify_all();
        applied
    }

    /// Shard ticker: publish this shard's sample every `publish_interval` (and with
    /// `force`, at shutdown).
    pub fn publish_shard(&self, st: &mut Shard, m: &mut ShardTick, now_ms: i64, force: bool) {
        if !self.metrics_enabled()
            || (!force && now_ms - m.last_publish_ms < self.publish_interval_ms)
        {
            return;
        }
        m.last_publish_ms = now_ms;
        st.sync_durable_counters();
        st.c.handoff_in_flight = u64::from(st.handoff.in_flight());
        let id = st.id as usize;
        let c = &st.c;
        let sm = &mut st.metrics;
        let s = &mut sm.sample;
        s.copy_engine(st.engine.stats());
        s.events_in = [c.udp_events, c.tcp_events];
        s.parse_errors = c.decode_errors;
        // Oversized lines never reach the decoder, but they are the decoder's `TooLong` kind.
        let too_long = DecodeError::ALL
            .iter()
            .position(|k| *k == DecodeError::TooLong)
            .expect("DecodeError::ALL lists TooLong");
        s.parse_errors[too_long] += c.lines_too_long;
        s.ingest_dead_letters = s.parse_errors.iter().sum::<u64>()
            + c.udp_too_long
            + c.route_missing_key
            + c.route_key_too_long;
        let e = st.engine.stats();
        let r = &mut s.dead_letter_reasons;
        r.fill(0);
        for (k, v) in DecodeError::ALL.iter().zip(s.parse_errors) {
            r[metrics::dead_letter_reason_index(k.label())] += v;
        }
        r[metrics::dead_letter_reason_index("datagram_too_long")] += c.udp_too_long;
        r[metrics::dead_letter_reason_index("missing_key")] += c.route_missing_key + e.missing_keys;
        r[metrics::dead_letter_reason_index("key_too_long")] +=
            c.route_key_too_long + e.keys_too_long;
        r[metrics::dead_letter_reason_index("bad_timestamp")] += e.bad_timestamps;
        r[metrics::dead_letter_reason_index("session_table_full")] += e.rejections;
        s.handoff_events_out = c.handoff_events_out;
        s.handoff_events_in = c.handoff_events_in;
        s.handoff_queue_batches = c.handoff_in_flight;
        s.handoff_lost_events = c.handoff_events_lost;
        s.handoff_stalls = c.handoff_stalls;
        s.executor_kicks = c.executor_kicks;
        s.refused = [c.udp_refused, c.tcp_refused];
        s.udp_kernel_drops = c.udp_drops;
        s.tcp_connections = c.tcp_open;
        s.expiry_lag_us = c.expiry_lag_us;
        // Durability (zero while `persist.dir` is unset).
        s.snapshots = c.snapshots;
        s.snapshot_failures = c.snapshot_errors;
        s.snapshot_us_total = c.snapshot_us_total;
        s.snapshot_last_us = c.snapshot_last_us;
        s.snapshot_write_rate = c.snapshot_write_rate;
        s.log_flushes = c.log_flushes;
        s.log_flush_failures = c.log_flush_errors;
        s.log_flush_us_total = c.log_flush_us_total;
        s.log_flush_last_us = c.log_flush_last_us;
        metrics::publish(id, &sm.sample, &mut sm.prev);
    }
}

/// A shard's ticker bookkeeping for operations (lives on the shard's stack).
#[derive(Debug, Default)]
pub struct ShardTick {
    rules_generation: u64,
    last_publish_ms: i64,
}

impl ShardTick {
    pub fn new(now_ms: i64) -> ShardTick {
        ShardTick {
            rules_generation: 0,
            last_publish_ms: now_ms,
        }
    }
}

/// The metric state a shard keeps next to its data (inside `Shard`).
pub struct ShardMetrics {
    pub sample: ShardSample,
    prev: ShardSample,
    /// When the current receive round's first line was taken up, and the shard's event count
    /// then; `None` between rounds.
    round: Option<(Instant, u64)>,
    /// The round's datagrams ([`ShardMetrics::datagram_begin`]): how long each had waited in
    /// the socket when the round began, and the event count before its first line.
    waits: [(u64, u64); crate::ingest::udp::BATCH_DATAGRAMS],
    waits_len: usize,
    /// False when there is no endpoint: rounds are not timed and records not counted by stream.
    enabled: bool,
}

impl ShardMetrics {
    pub fn new(rules: &Rules) -> ShardMetrics {
        let p = metrics::profile_labels(rules);
        ShardMetrics {
            sample: ShardSample::new(p.clone()),
            prev: ShardSample::new(p),
            round: None,
            waits: [(0, 0); crate::ingest::udp::BATCH_DATAGRAMS],
            waits_len: 0,
            enabled: true,
        }
    }

    /// Whether the data path feeds the latency histogram and the per-stream counts (set once,
    /// before the shard starts; `[metrics] address` unset means nobody would read them).
    pub fn set_enabled(&mut self, enabled: bool) {
        self.enabled = enabled;
        self.round = None;
        self.waits_len = 0;
    }

    /// New rules: new `profile` labels (appended profiles only, see `check_compatible`).
    pub fn set_rules(&mut self, rules: &Rules) {
        self.sample.profiles = metrics::profile_labels(rules);
    }

    /// The first line of a receive round is being processed (`events` = events counted so far).
    /// One clock read per round, whatever the number of lines.
    #[inline]
    pub fn round_begin(&mut self, events: u64) {
        if self.enabled && self.round.is_none() {
            self.round = Some((Instant::now(), events));
        }
    }

    /// A datagram is about to be fed (`events` = events counted so far) that had waited
    /// `waited_ns` in the socket, by the kernel's receive time, when the round began: its
    /// events' latency includes that wait. Opens the round if it is the first.
    #[inline]
    pub fn datagram_begin(&mut self, events: u64, waited_ns: u64) {
        if !self.enabled {
            return;
        }
        self.round_begin(events);
        if let Some(w) = self.waits.get_mut(self.waits_len) {
            *w = (waited_ns, events);
            self.waits_len += 1;
        }
    }

    /// The round's records were handed to the sinks: every event of the round waited this long,
    /// plus, for a datagram's events, the datagram's wait in the socket.
    #[inline]
    pub fn round_end(&mut self, events: u64) {
        let waits = std::mem::take(&mut self.waits_len);
        if let Some((t0, e0)) = self.round.take() {
            let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
            // Events before the first datagram, then each datagram's up to the next one's.
            let latency = &mut self.sample.latency;
            // `record_latency_ns` once per event would be the same values n times.
            let mut record = |ns: u64, n: u64| {
                if n > 0 {
                    latency.saturating_record_n(ns, n);
                }
            };
            let mut from = e0;
            let mut waited = 0;
            for &(w, start) in &self.waits[..waits] {
                record(ns.saturating_add(waited), start.saturating_sub(from));
                (from, waited) = (start, w);
            }
            record(ns.saturating_add(waited), events.saturating_sub(from));
        }
    }

    /// Count an output batch's records by stream; call before the batch is cleared.
    #[inline]
    pub fn count_out(&mut self, out: &crate::engine::Out) {
        if self.enabled {
            metrics::count_streams(out, &mut self.sample.events_out);
        }
    }
}

/// The parent's share: output publication on the metrics cadence, and reloads.
pub struct Coordinator {
    config_path: Option<PathBuf>,
    /// The configuration shards run with (profiles replaced at each successful reload).
    running: Config,
    rules: Arc<Rules>,
    prev_outputs: Vec<OutputStats>,
    publish_every: Duration,
    next_publish: Instant,
}

impl Coordinator {
    pub fn new(config_path: Option<PathBuf>, running: Config, rules: Arc<Rules>) -> Coordinator {
        let publish_every = running
            .metrics
            .publish_interval
            .0
            .max(Duration::from_millis(1));
        Coordinator {
            config_path,
            running,
            rules,
            prev_outputs: Vec::new(),
            publish_every,
            next_publish: Instant::now() + publish_every,
        }
    }

    /// How long the parent may block before the next output publication is due.
    pub fn until_next_publish(&self) -> Duration {
        self.next_publish.saturating_duration_since(Instant::now())
    }

    /// Publish the sinks' counters if due (or `force`).
    pub fn publish_outputs(&mut self, ops: &Ops, outputs: &Outputs, force: bool) {
        let now = Instant::now();
        if !force && now < self.next_publish {
            return;
        }
        self.next_publish = now + self.publish_every;
        if ops.metrics_enabled() {
            metrics::publish_outputs(&outputs.stats(), &mut self.prev_outputs);
        }
    }

    /// SIGHUP: re-read the config file, apply the profiles to every shard or keep the old ones.
    /// systemd sees RELOADING=1, then READY=1 whatever the outcome.
    pub fn reload(&mut self, ops: &Ops) {
        if let Err(e) = notify::reloading() {
            log::warn!("sd_notify RELOADING=1: {e}");
        }
        let t0 = Instant::now();
        match self.try_reload(ops) {
            Ok(profiles) => log::info!(
                "reloaded rules: {profiles} profiles applied on every shard in {:?}",
                t0.elapsed()
            ),
            Err(e) => log::error!("reload failed, keeping the running rules: {e}"),
        }
        if let Err(e) = notify::ready() {
            log::warn!("sd_notify READY=1: {e}");
        }
    }

    fn try_reload(&mut self, ops: &Ops) -> Result<usize, String> {
        let Some(path) = self.config_path.as_ref() else {
            return Err("started without --config: there is no file to re-read".into());
        };
        let new = Config::load(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let fixed = restart_only_changes(&self.running, &new);
        if !fixed.is_empty() {
            log::warn!(
                "reload: [{}] changed and needs a restart; the running values stay",
                fixed.join(", ")
            );
        }
        // Only the profiles apply live; validate them against the running limits and wheel.
        let effective = Config {
            profiles: new.profiles,
            source: new.source,
            ..self.running.clone()
        };
        effective.validate().map_err(|e| {
            format!(
                "{}: {e} (checked against the running settings)",
                path.display()
            )
        })?;
        let rules = Arc::new(Rules::compile(&effective).map_err(|e| e.to_string())?);
        crate::engine::check_compatible(&self.rules, &rules)?;
        let gen = ops.offer(rules.clone());
        // Offered is applied: a late shard still takes these rules at its next tick.
        let n = rules.profiles.len();
        self.rules = rules;
        self.running = effective;
        ops.wait_answers(gen, RELOAD_APPLY_TIMEOUT)
            .map_err(|e| format!("rules offered, but {e}"))?;
        Ok(n)
    }
}

/// The sections that differ between `running` and `new` and cannot change without a restart.
/// (`Debug` text comparison: these types are not `PartialEq`, and this runs once per SIGHUP.)
fn restart_only_changes(running: &Config, new: &Config) -> Vec<&'static str> {
    let d = |x: &dyn std::fmt::Debug| format!("{x:?}");
    let pairs: [(&'static str, String, String); 10] = [
        ("node_id", d(&running.node_id), d(&new.node_id)),
        ("cores", d(&running.cores), d(&new.cores)),
        ("memory", d(&running.memory), d(&new.memory)),
        ("slots", d(&running.slots), d(&new.slots)),
        ("limits", d(&running.limits), d(&new.limits)),
        ("listener", d(&running.listeners), d(&new.listeners)),
        ("output", d(&running.outputs), d(&new.outputs)),
        ("persist", d(&running.persist), d(&new.persist)),
        ("metrics", d(&running.metrics), d(&new.metrics)),
        ("log", d(&running.log), d(&new.log)),
    ];
    pairs
        .into_iter()
        .filter(|(_, a, b)| a != b)
        .map(|(k, _, _)| k)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[[profile]]
name = "web"
key = "user"
time = "processing"
idle_timeout = "30m"
"#;

    #[test]
    fn restart_only_changes_names_sections_not_profiles() {
        let a = Config::from_toml(MIN).unwrap();
        let b = Config::from_toml(&MIN.replace("30m", "10m")).unwrap();
        assert!(restart_only_changes(&a, &b).is_empty());
        let c = Config::from_toml(&format!("[memory]\nmax_sessions = 1000\n{MIN}")).unwrap();
        assert_eq!(restart_only_changes(&a, &c), vec!["memory"]);
    }

    #[test]
    fn a_round_records_one_latency_per_event() {
        let rules = Rules::compile(&Config::from_toml(MIN).unwrap()).unwrap();
        let mut m = ShardMetrics::new(&rules);
        m.round_end(10);
        assert_eq!(m.sample.latency.len(), 0, "no round open");
        m.round_begin(3);
        m.round_begin(5);
        m.round_end(10);
        assert_eq!(m.sample.latency.len(), 7, "from the first begin");
        m.round_begin(10);
        m.round_end(10);
        assert_eq!(m.sample.latency.len(), 7, "an empty round records nothing");
    }

    #[test]
    fn a_datagram_adds_its_socket_wait_to_its_events() {
        let rules = Rules::compile(&Config::from_toml(MIN).unwrap()).unwrap();
        let mut m = ShardMetrics::new(&rules);
        let ms = 1_000_000;
        m.datagram_begin(0, 50 * ms);
        m.datagram_begin(3, 90 * ms); // no events: its lines were all empty
        m.datagram_begin(3, 20 * ms);
        m.datagram_begin(5, 0);
        m.round_end(6);
        let h = &m.sample.latency;
        assert_eq!(h.len(), 6);
        let at_least = |lo: u64| {
            h.iter_recorded()
                .filter(|v| v.value_iterated_to() >= lo)
                .map(|v| v.count_at_value())
                .sum::<u64>()
        };
        assert_eq!(at_least(90 * ms), 0, "the empty datagram records nothing");
        assert_eq!(at_least(49 * ms), 3);
        assert_eq!(at_least(19 * ms), 5);
        // The next round starts afresh.
        m.round_begin(6);
        m.round_end(7);
        assert_eq!(m.sample.latency.len(), 7);
        assert_eq!(
            m.sample.latency.count_between(0, ms),
            2,
            "the last datagram's event and the new round's"
        );
    }
}
