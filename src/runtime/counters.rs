//! Per-shard counters. Each shard counts into a plain [`LocalCounters`] it owns (no atomics, no
//! sharing on the data path) and publishes a copy into its slot of the process-wide
//! `Arc<[ShardCounters]>` about once a second (and once more at shutdown). Readers (the metrics
//! exporter, the shutdown log) only ever see published values.
//!
//! Every counter is a monotonically increasing `u64` except the gauges marked as such.

use crate::decode::DecodeError;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Number of decode error kinds; `decode_errors[i]` counts `DecodeError::ALL[i]`.
pub const DECODE_ERRORS: usize = DecodeError::ALL.len();

macro_rules! counters {
    ($( $(#[$meta:meta])* $name:ident ),* $(,)?) => {
        /// A shard's own counters, updated on the data path without synchronisation.
        #[derive(Debug, Default, Clone, PartialEq, Eq)]
        pub struct LocalCounters {
            $( $(#[$meta])* pub $name: u64, )*
            /// Undecodable lines by kind, indexed like `DecodeError::ALL`.
            pub decode_errors: [u64; DECODE_ERRORS],
        }

        /// The published copy of one shard's counters.
        #[derive(Debug, Default)]
        pub struct ShardCounters {
            $( pub $name: AtomicU64, )*
            pub decode_errors: [AtomicU64; DECODE_ERRORS],
        }

        impl LocalCounters {
            /// Static metric names, in the order of [`LocalCounters::values`].
            pub const NAMES: &'static [&'static str] = &[$( stringify!($name), )*];

            pub fn values(&self) -> Vec<u64> {
                vec![$( self.$name, )*]
            }

            pub fn publish(&self, to: &ShardCounters) {
                $( to.$name.store(self.$name, Relaxed); )*
                for (a, v) in to.decode_errors.iter().zip(self.decode_errors.iter()) {
                    a.store(*v, Relaxed);
                }
            }
        }

        impl ShardCounters {
            pub fn load(&self) -> LocalCounters {
                let mut c = LocalCounters {
                    $( $name: self.$name.load(Relaxed), )*
                    decode_errors: [0; DECODE_ERRORS],
                };
                for (v, a) in c.decode_errors.iter_mut().zip(self.decode_errors.iter()) {
                    *v = a.load(Relaxed);
                }
                c
            }
        }
    };
}

counters! {
    /// Lines received on UDP listeners (empty lines excluded).
    udp_events,
    /// Lines received on TCP connections (empty lines excluded).
    tcp_events,
    /// Events this shard handed to another shard (one per (event, owner shard) pair).
    handoff_events_out,
    /// Events other shards handed to this one.
    handoff_events_in,
    handoff_batches_out,
    handoff_batches_in,
    /// Events in batches that could not be delivered because the receiving shard was gone
    /// (only possible during a shutdown that hit its deadline).
    handoff_events_lost,
    /// Times a sender found every hand-off buffer to a peer in flight and had to wait.
    handoff_stalls,
    /// Gauge: hand-off batches this shard has filled and not yet had back from its peers
    /// (waiting to be sent, queued, or being processed), over every peer.
    handoff_in_flight,
    udp_datagrams,
    udp_bytes,
    /// Datagrams refused by the listener's allowlist.
    udp_refused,
    /// Datagrams longer than `limits.datagram_bytes_max` (dead-lettered `datagram_too_long`).
    udp_too_long,
    /// Kernel receive-queue drops on this shard's UDP sockets (from `SO_RXQ_OVFL`).
    udp_drops,
    /// Datagrams carrying the `SZH1` steering header.
    udp_steered,
    /// Steered datagrams with at least one event that still needed a hand-off (should be 0).
    udp_steered_handoff,
    /// Steered datagrams whose header hash names another shard (steering program missing?).
    udp_missteered,
    tcp_bytes,
    tcp_accepted,
    /// Connections over this shard's share of `limits.tcp_connections_max`: accepted and closed.
    tcp_over_limit,
    /// Connections refused by the listener's allowlist.
    tcp_refused,
    /// Connections closed after `limits.tcp_idle_timeout` without data.
    tcp_idle_closed,
    /// Gauge: connections open on this shard.
    tcp_open,
    /// Lines longer than `limits.line_bytes_max` (dead-lettered `line_too_long`).
    lines_too_long,
    /// Events no profile matched (passed through).
    passthrough,
    /// Events dead-lettered by routing because a matching profile found no usable key
    /// (`missing_key`: absent, null, an object or an array).
    route_missing_key,
    /// Events dead-lettered by routing because the key is over `limits.key_bytes_max`
    /// (`key_too_long`).
    route_key_too_long,
    /// Socket errors other than would-block (receive, accept).
    io_errors,
    /// Times a `block` sink was full and this shard stopped reading.
    output_blocked,
    /// Gauge: how late the last expiry pass finished, in microseconds: from when it was due
    /// (`ADVANCE_INTERVAL_MS` after the previous one) to its end, so it includes the pass itself.
    expiry_lag_us,
    /// Times the kicker found this shard's executor asleep with its ticker stalled and woke it
    /// (the glommio park race, `runtime::Beat`); each is a stall of up to `KICK_AFTER` or so.
    executor_kicks,
    /// Gauge: CPU time the shard's thread has used (user + system), in microseconds, as of the
    /// last publication. Load tests divide events by it to get events per CPU-second.
    cpu_us,
    /// Durability (`runtime::durable`): records appended to the event log.
    log_appended,
    log_commits,
    log_fsyncs,
    log_bytes,
    /// Log writes or syncs that failed (retried), e.g. a full disk.
    log_errors,
    /// Events applied, or expiry passes run, without a log record (the log buffer was full: a
    /// failing disk).
    log_unlogged,
    /// Gauge: sequence of the last durable log record.
    log_durable_seq,
    /// Log flushes: syncs of the written log to disk (`persist::log`, on its helper thread).
    log_flushes,
    /// Log writes and syncs that failed (retried).
    log_flush_errors,
    /// Time of the log flushes, in microseconds (hand-over to the helper to its result).
    log_flush_us_total,
    /// Gauge: duration of the last log flush, in microseconds.
    log_flush_last_us,
    /// Producer lines skipped because this shard had applied them already.
    producer_duplicates,
    /// Producers forgotten because `limits.producers_max` was reached.
    producer_evictions,
    snapshots,
    snapshot_errors,
    /// Gauge: duration of the last published snapshot, capture to log truncation.
    snapshot_last_us,
    /// Time spent in published snapshots, capture to log truncation, in microseconds.
    snapshot_us_total,
    /// Gauge: the longest the last snapshot's capture held the engine at once (its cut or one of
    /// its slices; ingest waits meanwhile), in microseconds.
    snapshot_capture_last_us,
    /// Gauge: the last periodic snapshot's write budget, bytes a second (0: unpaced).
    snapshot_write_rate,
    /// Sessions restored from the snapshot at start.
    recovered_sessions,
    /// Logged events replayed at start.
    replayed_events,
    /// Acknowledgement lines written to acknowledged TCP connections.
    acks_sent,
}

/// CPU time (user + system) of the calling thread, in microseconds.
pub fn thread_cpu_us() -> u64 {
    // SAFETY: a zeroed rusage is a valid out-parameter; RUSAGE_THREAD reports the caller only.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live, writable rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return 0;
    }
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(ru.ru_utime) + us(ru.ru_stime)
}

impl LocalCounters {
    pub fn count_decode_error(&mut self, e: DecodeError) {
        let i = DecodeError::ALL
            .iter()
            .position(|k| *k == e)
            .expect("DecodeError::ALL lists every kind");
        self.decode_errors[i] += 1;
    }

    /// One JSON object with every counter (decode errors by label), for logs and tests.
    pub fn to_json(&self, shard: u32) -> String {
        let mut m = serde_json::Map::new();
        m.insert("shard".into(), shard.into());
        for (name, v) in Self::NAMES.iter().zip(self.values()) {
            m.insert((*name).into(), v.into());
        }
        let mut errs = serde_json::Map::new();
        for (k, v) in DecodeError::ALL.iter().zip(self.decode_errors.iter()) {
            errs.insert(k.label().into(), (*v).into());
        }
        m.insert("decode_errors".into(), errs.into());
        serde_json::Value::Object(m).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_then_load_round_trips() {
        let mut c = LocalCounters {
            udp_events: 3,
            handoff_events_out: 7,
            ..Default::default()
        };
        c.count_decode_error(DecodeError::Syntax);
        let shared = ShardCounters::default();
        c.publish(&shared);
        assert_eq!(shared.load(), c);
        let j: serde_json::Value = serde_json::from_str(&c.to_json(1)).unwrap();
        assert_eq!(j["handoff_events_out"], 7);
        assert_eq!(j["decode_errors"]["invalid_json"], 1);
    }
}
