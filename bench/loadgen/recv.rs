//! The latency receiver: a TCP client of the appliance's output that classifies each
//! newline-delimited JSON record and measures event-to-enriched-event latency.
//!
//! A record is a marker when it has `"kind"` with one of [`MARKER_KINDS`]; otherwise it is an
//! enriched event when it has a `"_session"` member; anything else counts as `other`. An
//! enriched event's latency is the receiver's CLOCK_MONOTONIC at the read that delivered it
//! minus its `sent_ns` (the intended send time when the run is open-loop). Enriched events stamped
//! before this run started are left out as `stale` (left over from an earlier run).
//!
//! The read buffer is fixed (1 MiB); a record longer than that is skipped and counted. Counts are
//! published to atomics once per read, latencies go into a run histogram and a per-second one;
//! the per-second list is capped at [`crate::report::TIMELINE_ROWS_MAX`] entries.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};
use hdrhistogram::Histogram;
use memchr::memmem::Finder;

use crate::clock::{self, Clock};
use crate::report::TIMELINE_ROWS_MAX;
use crate::wire;

/// Marker kinds of the appliance's output, in report order.
pub const MARKER_KINDS: [&str; 7] = [
    "session_start",
    "session_end",
    "sub_session_start",
    "sub_session_end",
    "session_merged",
    "late_event",
    "dead_letter",
];
const READ_BUFFER_BYTES: usize = 1 << 20;
/// Bytes per `read`. The receive time is taken after the read returns, and a 1 MiB read on
/// loopback ran ~9 ms in the kernel, not preempted, on a CPU a shard was waiting for: short
/// reads keep both the timestamps and the appliance's CPU share honest.
const MAX_READ_BYTES: usize = 64 << 10;
const READ_TIMEOUT: Duration = Duration::from_millis(50);
/// Latencies are recorded in ns from 1 µs resolution up to an hour, 3 significant digits.
const LATENCY_NS_LOW: u64 = 1_000;
const LATENCY_NS_HIGH: u64 = 3_600_000_000_000;

/// A histogram for latencies in nanoseconds.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(LATENCY_NS_LOW, LATENCY_NS_HIGH, 3)
        .expect("static histogram bounds are valid")
}

/// Counters the progress line reads while the receiver runs.
#[derive(Debug, Default)]
pub struct RecvShared {
    pub enriched: AtomicU64,
    pub markers: [AtomicU64; MARKER_KINDS.len()],
    /// Records with a `kind` the harness does not know.
    pub markers_other: AtomicU64,
    pub other: AtomicU64,
    pub stale: AtomicU64,
    pub bytes: AtomicU64,
    /// p99 of the last complete second, ns (0: no sample).
    pub last_second_p99_ns: AtomicU64,
    /// Monotonic time of the last read that delivered data.
    pub last_data_ns: AtomicU64,
    pub stop: AtomicBool,
}

/// Latency of the events received during one second of the run.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct LatencySecond {
    pub second: u32,
    pub count: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

/// What the receiver hands back when it stops.
pub struct RecvReport {
    pub latency: Histogram<u64>,
    pub seconds: Vec<LatencySecond>,
    /// Enriched events without a `sent_ns` (replay files): counted, not timed.
    pub untimed: u64,
    pub records_oversize: u64,
    /// Why the receiver stopped early, if it did.
    pub error: Option<String>,
}

/// A running receiver.
pub struct Receiver {
    handle: JoinHandle<RecvReport>,
    clock_tx: Sender<Clock>,
    pub shared: Arc<RecvShared>,
}

impl Receiver {
    /// Connects to the output, retrying for up to `wait` (the appliance may still be starting).
    pub fn connect(address: SocketAddr, wait: Duration) -> Result<Receiver, String> {
        let deadline = Instant::now() + wait;
        let stream = loop {
            match TcpStream::connect_timeout(&address, Duration::from_millis(500)) {
                Ok(stream) => break stream,
                Err(error) if Instant::now() >= deadline => {
                    return Err(format!(
                        "connecting to the output {address}: {error} (is the appliance running with a TCP output there? use --no-output to skip latency)"
                    ))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        stream
            .set_read_timeout(Some(READ_TIMEOUT))
            .map_err(|e| format!("output socket: {e}"))?;
        let shared = Arc::new(RecvShared::default());
        let (clock_tx, clock_rx) = bounded::<Clock>(1);
        let thread_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("recv".to_string())
            .spawn(move || {
                let mut state = State::new(thread_shared);
                let error = state
                    .read_loop(stream, &clock_rx)
                    .err()
                    .map(|e| e.to_string());
                state.finish(error)
            })
            .map_err(|e| format!("spawning the receiver: {e}"))?;
        Ok(Receiver {
            handle,
            clock_tx,
            shared,
        })
    }

    /// Tells the receiver when the run started (for per-second rows and stale records).
    pub fn begin(&self, clock: Clock) {
        let _ = self.clock_tx.send(clock);
    }

    pub fn stop(self) -> RecvReport {
        self.shared.stop.store(true, Ordering::Relaxed);
        match self.handle.join() {
            Ok(report) => report,
            Err(_) => RecvReport {
                latency: latency_histogram(),
                seconds: Vec::new(),
                untimed: 0,
                records_oversize: 0,
                error: Some("the receiver thread panicked".to_string()),
            },
        }
    }
}

/// Record counts of one read, published together.
#[derive(Default)]
struct Counts {
    enriched: u64,
    markers: [u64; MARKER_KINDS.len()],
    markers_other: u64,
    other: u64,
    stale: u64,
}

struct State {
    shared: Arc<RecvShared>,
    clock: Option<Clock>,
    kind: Finder<'static>,
    session: Finder<'static>,
    sent_ns: Finder<'static>,
    latency: Histogram<u64>,
    second_latency: Histogram<u64>,
    second: u32,
    seconds: Vec<LatencySecond>,
    untimed: u64,
    records_oversize: u64,
}

impl State {
    fn new(shared: Arc<RecvShared>) -> State {
        State {
            shared,
            clock: None,
            kind: Finder::new(b"\"kind\"").into_owned(),
            session: Finder::new(b"\"_session\"").into_owned(),
            sent_ns: Finder::new(b"\"sent_ns\"").into_owned(),
            latency: latency_histogram(),
            second_latency: latency_histogram(),
            second: 0,
            seconds: Vec::with_capacity(64),
            untimed: 0,
            records_oversize: 0,
        }
    }

    fn read_loop(
        &mut self,
        mut stream: TcpStream,
        clock_rx: &crossbeam_channel::Receiver<Clock>,
    ) -> io::Result<()> {
        let mut buffer = vec![0u8; READ_BUFFER_BYTES];
        let mut filled = 0usize;
        let mut discarding = false;
        while !self.shared.stop.load(Ordering::Relaxed) {
            let upto = buffer.len().min(filled + MAX_READ_BYTES);
            let read = match stream.read(&mut buffer[filled..upto]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the output closed the connection",
                    ))
                }
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) =>
                {
                    0
                }
                Err(e) => return Err(e),
            };
            let now = clock::mono_ns();
            // After the read: the clock is sent before the first event leaves, so any record
            // of this run that a read returns finds it here.
            if self.clock.is_none() {
                self.clock = clock_rx.try_recv().ok();
            }
            if read > 0 {
                self.shared.bytes.fetch_add(read as u64, Ordering::Relaxed);
                self.shared.last_data_ns.store(now, Ordering::Relaxed);
                let end = filled + read;
                let mut counts = Counts::default();
                let mut line_start = 0;
                for newline in memchr::memchr_iter(b'\n', &buffer[filled..end]) {
                    let line_end = filled + newline;
                    if discarding {
                        discarding = false;
                    } else {
                        self.classify(&buffer[line_start..line_end], now, &mut counts);
                    }
                    line_start = line_end + 1;
                }
                buffer.copy_within(line_start..end, 0);
                filled = end - line_start;
                if filled == buffer.len() {
                    self.records_oversize += 1;
                    discarding = true;
                    filled = 0;
                }
                self.publish(&counts);
            }
            self.rotate(now);
        }
        Ok(())
    }

    fn classify(&mut self, line: &[u8], now_ns: u64, counts: &mut Counts) {
        if let Some(kind) = wire::member_value(line, &self.kind) {
            if let Some(index) = MARKER_KINDS.iter().position(|k| k.as_bytes() == kind) {
                counts.markers[index] += 1;
                return;
            }
            if self.session.find(line).is_none() {
                counts.markers_other += 1;
                return;
            }
        }
        if self.session.find(line).is_none() {
            counts.other += 1;
            return;
        }
        let Some(sent_ns) =
            wire::member_value(line, &self.sent_ns).and_then(wire::parse_u64_prefix)
        else {
            counts.enriched += 1;
            self.untimed += 1;
            return;
        };
        match self.clock {
            Some(clock) if sent_ns >= clock.start_ns => {
                counts.enriched += 1;
                let latency_ns = now_ns.saturating_sub(sent_ns);
                self.latency.saturating_record(latency_ns);
                self.second_latency.saturating_record(latency_ns);
            }
            _ => counts.stale += 1,
        }
    }

    fn publish(&self, counts: &Counts) {
        let shared = &self.shared;
        shared
            .enriched
            .fetch_add(counts.enriched, Ordering::Relaxed);
        for (total, count) in shared.markers.iter().zip(counts.markers) {
            if count > 0 {
                total.fetch_add(count, Ordering::Relaxed);
            }
        }
        shared
            .markers_other
            .fetch_add(counts.markers_other, Ordering::Relaxed);
        shared.other.fetch_add(counts.other, Ordering::Relaxed);
        shared.stale.fetch_add(counts.stale, Ordering::Relaxed);
    }

    /// Closes the per-second histogram when the run clock enters a new second.
    fn rotate(&mut self, now_ns: u64) {
        let Some(clock) = self.clock else { return };
        let second = (clock.since_start_ns(now_ns) / 1_000_000_000) as u32;
        if second != self.second {
            self.close_second();
            self.second = second;
        }
    }

    fn close_second(&mut self) {
        let h = &self.second_latency;
        let row = LatencySecond {
            second: self.second,
            count: h.len(),
            p50_ns: if h.is_empty() {
                0
            } else {
                h.value_at_quantile(0.5)
            },
            p99_ns: if h.is_empty() {
                0
            } else {
                h.value_at_quantile(0.99)
            },
            max_ns: if h.is_empty() { 0 } else { h.max() },
        };
        self.shared
            .last_second_p99_ns
            .store(row.p99_ns, Ordering::Relaxed);
        if row.count > 0 && self.seconds.len() < TIMELINE_ROWS_MAX {
            self.seconds.push(row);
        }
        self.second_latency.reset();
    }

    fn finish(mut self, error: Option<String>) -> RecvReport {
        if self.clock.is_some() {
            self.close_second();
        }
        RecvReport {
            latency: self.latency,
            seconds: self.seconds,
            untimed: self.untimed,
            records_oversize: self.records_oversize,
            error,
        }
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;

    /// A stand-in for the appliance's output: once told to go, serves `lines` to the first
    /// client in pieces that split records across writes, then waits to be told again to close.
    pub fn fake_output(
        lines: Vec<String>,
    ) -> (SocketAddr, crossbeam_channel::Sender<()>, JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let (release_tx, release_rx) = bounded::<()>(1);
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let _ = release_rx.recv();
            let text: Vec<u8> = lines.concat().into_bytes();
            for piece in text.chunks(97) {
                stream.write_all(piece).unwrap();
            }
            let _ = release_rx.recv();
        });
        (address, release_tx, handle)
    }

    #[test]
    fn receiver_classifies_and_times_records() {
        // Events stamped 2 ms ago, by a run that started 1 ms before that.
        let sent = clock::mono_ns() - 2_000_000;
        let mut clock = Clock::starting_in(Duration::ZERO);
        clock.start_ns = sent - 1_000_000;
        let mut lines = Vec::new();
        for i in 0..1000 {
            lines.push(format!(
                "{{\"user\":\"u{i}\",\"type\":\"click\",\"sent_ns\":{sent},\"_session\":{{\"id\":\"s{i}\",\"seq\":1}}}}\n"
            ));
        }
        for kind in MARKER_KINDS {
            lines.push(format!(
                "{{\"kind\":\"{kind}\",\"key\":\"u1\",\"session\":{{}}}}\n"
            ));
        }
        lines.push("{\"kind\":\"session_end\",\"event\":{\"sent_ns\":1}}\n".to_string());
        lines.push("{\"user\":\"old\",\"sent_ns\":1,\"_session\":{}}\n".to_string());
        lines.push("{\"user\":\"replayed\",\"_session\":{}}\n".to_string());
        lines.push("{\"something\":\"else\"}\n".to_string());
        let (address, release, server) = fake_output(lines);
        let receiver = Receiver::connect(address, Duration::from_secs(2)).unwrap();
        receiver.begin(clock);
        release.send(()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while receiver.shared.other.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let shared = Arc::clone(&receiver.shared);
        let report = receiver.stop();
        release.send(()).unwrap();
        server.join().unwrap();
        assert_eq!(shared.enriched.load(Ordering::Relaxed), 1001);
        assert_eq!(report.untimed, 1);
        assert_eq!(shared.stale.load(Ordering::Relaxed), 1);
        assert_eq!(shared.markers[1].load(Ordering::Relaxed), 2);
        for (index, count) in shared.markers.iter().enumerate() {
            if index != 1 {
                assert_eq!(count.load(Ordering::Relaxed), 1, "{}", MARKER_KINDS[index]);
            }
        }
        assert_eq!(shared.other.load(Ordering::Relaxed), 1);
        assert_eq!(report.latency.len(), 1000);
        assert!(
            report.latency.min() >= 1_000_000,
            "latency {}",
            report.latency.min()
        );
        assert!(report.error.is_none(), "{:?}", report.error);
        assert_eq!(report.seconds.iter().map(|s| s.count).sum::<u64>(), 1000);
    }
}
