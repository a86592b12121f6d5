//! The `tcp` sink: a listener on the output's `address` (SO_REUSEADDR; port 0 allowed) whose
//! consumers each receive every record of the subscribed streams, from all shards, from the
//! moment the sink registers them (`consumers` in the stats counts registered ones).
//!
//! Threads: an acceptor thread accepts connections and hands them to the sink thread; at most
//! [`CONSUMERS_MAX`] are admitted, further ones are accepted and closed at once. The sink thread
//! owns every consumer socket, nonblocking, and a buffer of its own per consumer
//! (`min(queue_bytes, CONSUMER_BUFFER_BYTES_MAX)` bytes, allocated at connect).
//!
//! Why one thread with nonblocking writes rather than a writer thread per consumer: the thread
//! count stays fixed (two per sink) whatever connects; a batch is copied once into each consumer's
//! buffer and its buffer recycled at once, where per-consumer threads would need shared,
//! reference-counted batches that a stalled consumer pins; and a slow consumer costs one
//! `EAGAIN` per attempt. The price is polling: while some consumer has unsent bytes the thread
//! retries every 1 ms, backing off to 16 ms while no consumer makes progress.
//!
//! Invariants: a consumer's buffer only ever receives whole lines, and its bytes are written in
//! order, so a consumer never sees a partial line followed by another (only a connection closed
//! mid-write can end in a partial line). When a batch does not fit in a consumer's free space,
//! that consumer gets the longest prefix of whole lines that fits; the other records are dropped
//! for it alone and counted in `dropped` (once per consumer and record): a slow consumer loses
//! records, and never stalls the others nor the shards.
//!
//! A consumer is removed when a write or read fails (reset, broken pipe) or returns 0. Consumers
//! are not expected to send; what they send is read and discarded every 250 ms. A half-close
//! (the consumer shutting down its sending side) is not a disconnect: a consumer that closed
//! entirely is found at the next write to it. At shutdown, consumers' buffers are written out
//! until the deadline; what remains is counted as dropped, and sockets are shut down.

use super::{count_lines, Batch, Counters, RateLimit, Sink, CONSUMERS_MAX};
use crossbeam_channel::{bounded, Receiver, Sender};
use socket2::{Domain, Protocol, Socket, Type};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Listen backlog of the consumer socket.
const LISTEN_BACKLOG: i32 = 128;
/// The acceptor checks its stop flag at least this often (ms).
const ACCEPT_POLL_MS: i32 = 100;
/// After an accept error such as EMFILE, wait this long rather than spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);
/// Sink tick while no consumer has unsent bytes: the delay to register a new consumer.
const IDLE_WAIT: Duration = Duration::from_millis(10);
const BACKLOG_WAIT_MIN: Duration = Duration::from_millis(1);
const BACKLOG_WAIT_MAX: Duration = Duration::from_millis(16);
/// Bytes per `write` to a consumer. On loopback the kernel delivers to the reader inside the
/// writer's system call, which is not preempted: a multi-megabyte write held a CPU that a shard
/// was waiting for for 12 ms (`perf sched`). Smaller writes return to user space in between.
const MAX_WRITE_BYTES: usize = 64 << 10;
/// How often consumers are read from (to discard input and notice resets).
const PROBE_INTERVAL: Duration = Duration::from_millis(250);

/// Binds the listener; returns the sink, its acceptor and the bound address.
pub(crate) fn bind(
    addr: SocketAddr,
    buffer_bytes: usize,
    stop: Arc<AtomicBool>,
) -> io::Result<(TcpSink, Acceptor, SocketAddr)> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    let listener: TcpListener = socket.into();
    let local = listener.local_addr()?;
    let (tx, rx) = bounded(CONSUMERS_MAX);
    let admitted = Arc::new(AtomicUsize::new(0));
    let sink = TcpSink {
        local,
        consumers: Vec::with_capacity(CONSUMERS_MAX),
        incoming: rx,
        admitted: admitted.clone(),
        stop: stop.clone(),
        buffer_bytes,
        backlog_wait: BACKLOG_WAIT_MIN,
        last_probe: Instant::now(),
        errors: RateLimit::default(),
    };
    let acceptor = Acceptor {
        local,
        listener,
        outgoing: tx,
        admitted,
        stop,
        errors: RateLimit::default(),
    };
    Ok((sink, acceptor, local))
}

/// Accepts consumers and hands them to the sink thread.
pub(crate) struct Acceptor {
    local: SocketAddr,
    listener: TcpListener,
    outgoing: Sender<(TcpStream, SocketAddr)>,
    /// Consumers handed over and not yet removed by the sink; at most `CONSUMERS_MAX`.
    admitted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    errors: RateLimit,
}

impl Acceptor {
    /// Runs until the stop flag is set; the listener closes when it returns.
    pub(crate) fn run(mut self) {
        let fd = self.listener.as_raw_fd();
        while !self.stop.load(Ordering::Acquire) {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: `pfd` is one initialized pollfd living across the call (nfds = 1), and
            // `fd` belongs to `self.listener`, open for the whole loop.
            let ready = unsafe { libc::poll(&mut pfd, 1, ACCEPT_POLL_MS) };
            if ready <= 0 {
                continue; // timeout or EINTR: check the stop flag
            }
            loop {
                match self.listener.accept() {
                    Ok((stream, peer)) => self.admit(stream, peer),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        if let Some(n) = self.errors.ready() {
                            log::warn!(
                                "output tcp:{}: accept failed: {e} ({n} similar errors suppressed)",
                                self.local
                            );
                        }
                        std::thread::sleep(ACCEPT_ERROR_BACKOFF);
                        break;
                    }
                }
            }
        }
    }

    fn admit(&mut self, stream: TcpStream, peer: SocketAddr) {
        if self.admitted.fetch_add(1, Ordering::AcqRel) >= CONSUMERS_MAX {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            drop(stream);
            if let Some(n) = self.errors.ready() {
                log::warn!(
                    "output tcp:{}: consumer {peer} refused: {CONSUMERS_MAX} consumers connected ({n} similar messages suppressed)",
                    self.local
                );
            }
            return;
        }
        // The channel holds CONSUMERS_MAX and fewer are admitted: it fails only when the sink
        // thread is gone, and then the connection is closed.
        if self.outgoing.try_send((stream, peer)).is_err() {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

struct Consumer {
    stream: TcpStream,
    peer: SocketAddr,
    /// Whole lines; `buf[sent..]` is still to be written. Never grows past its capacity.
    buf: Vec<u8>,
    sent: usize,
}

impl Consumer {
    fn backlog(&self) -> usize {
        self.buf.len() - self.sent
    }

    /// Copy the longest prefix of whole lines of `data` that fits; returns the records taken.
    fn enqueue(&mut self, data: &[u8], records: u64) -> u64 {
        let room = self.buf.capacity() - self.backlog();
        let (take, taken) = if data.len() <= room {
            (data.len(), records)
        } else {
            let take = memchr::memrchr(b'\n', &data[..room]).map_or(0, |nl| nl + 1);
            (take, records.saturating_sub(count_lines(&data[take..])))
        };
        if take == 0 {
            return taken;
        }
        if self.buf.len() + take > self.buf.capacity() {
            self.buf.copy_within(self.sent.., 0);
            self.buf.truncate(self.buf.len() - self.sent);
            self.sent = 0;
        }
        let capacity = self.buf.capacity();
        self.buf.extend_from_slice(&data[..take]);
        assert_eq!(
            self.buf.capacity(),
            capacity,
            "a consumer buffer never grows"
        );
        taken
    }

    /// Write what the socket takes now. Ok(bytes written) or Err when the consumer is gone.
    fn pump(&mut self) -> io::Result<usize> {
        let mut written = 0;
        while self.sent < self.buf.len() {
            let end = self.buf.len().min(self.sent + MAX_WRITE_BYTES);
            match self.stream.write(&self.buf[self.sent..end]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.sent += n;
                    written += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.sent == self.buf.len() {
            self.buf.clear();
            self.sent = 0;
        }
        Ok(written)
    }

    /// Read and discard what the consumer sent. Err when it reset the connection.
    fn probe(&mut self) -> io::Result<()> {
        let mut scratch = [0u8; 4096];
        loop {
            match self.stream.read(&mut scratch) {
                // A half-close: the consumer may still read; a full close shows at the next write.
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

pub(crate) struct TcpSink {
    local: SocketAddr,
    consumers: Vec<Consumer>,
    incoming: Receiver<(TcpStream, SocketAddr)>,
    admitted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    buffer_bytes: usize,
    backlog_wait: Duration,
    last_probe: Instant,
    errors: RateLimit,
}

impl TcpSink {
    fn register(&mut self, counters: &Counters) {
        while let Ok((stream, peer)) = self.incoming.try_recv() {
            if let Err(e) = stream.set_nonblocking(true) {
                log::warn!("output tcp:{}: consumer {peer} dropped: {e}", self.local);
                self.admitted.fetch_sub(1, Ordering::AcqRel);
                continue;
            }
            // Batches are large; Nagle would only delay the tail of a quiet stream.
            let _ = stream.set_nodelay(true);
            assert!(
                self.consumers.len() < CONSUMERS_MAX,
                "the acceptor admits at most CONSUMERS_MAX"
            );
            log::info!("output tcp:{}: consumer {peer} connected", self.local);
            self.consumers.push(Consumer {
                stream,
                peer,
                buf: Vec::with_capacity(self.buffer_bytes),
                sent: 0,
            });
        }
        counters
            .consumers
            .store(self.consumers.len() as u64, Ordering::Relaxed);
    }

    fn remove(&mut self, i: usize, why: &io::Error, counters: &Counters) {
        let c = self.consumers.swap_remove(i);
        let lost = count_lines(&c.buf[c.sent..]);
        counters.dropped(lost);
        self.admitted.fetch_sub(1, Ordering::AcqRel);
        counters
            .consumers
            .store(self.consumers.len() as u64, Ordering::Relaxed);
        log::info!(
            "output tcp:{}: consumer {} removed ({why}); {lost} buffered records lost",
            self.local,
            c.peer
        );
    }

    /// Write every consumer's backlog as far as its socket takes it; remove the dead.
    /// Returns whether any bytes were written.
    fn pump_all(&mut self, counters: &Counters) -> bool {
        let mut written = 0u64;
        let mut i = 0;
        while i < self.consumers.len() {
            match self.consumers[i].pump() {
                Ok(n) => {
                    written += n as u64;
                    i += 1;
                }
                Err(e) => self.remove(i, &e, counters),
            }
        }
        counters.written(0, written);
        written > 0
    }
}

impl Sink for TcpSink {
    fn write(&mut self, batch: &Batch, counters: &Counters) {
        // With no consumer, records go nowhere and are not counted: nobody asked for them.
        let mut taken = 0u64;
        let mut dropped = 0u64;
        for c in &mut self.consumers {
            let t = c.enqueue(&batch.buf, batch.records);
            taken += t;
            dropped += batch.records - t;
        }
        counters.written(taken, 0);
        counters.dropped(dropped);
        if dropped > 0 {
            if let Some(n) = self.errors.ready() {
                log::warn!(
                    "output tcp:{}: slow consumer: {dropped} records dropped ({n} similar messages suppressed)",
                    self.local
                );
            }
        }
        if self.pump_all(counters) {
            self.backlog_wait = BACKLOG_WAIT_MIN;
        }
    }

    fn tick(&mut self, now: Instant, _queue_empty: bool, counters: &Counters) {
        self.register(counters);
        if self.pump_all(counters) {
            self.backlog_wait = BACKLOG_WAIT_MIN;
        } else {
            self.backlog_wait = (self.backlog_wait * 2).min(BACKLOG_WAIT_MAX);
        }
        if now.duration_since(self.last_probe) >= PROBE_INTERVAL {
            self.last_probe = now;
            let mut i = 0;
            while i < self.consumers.len() {
                match self.consumers[i].probe() {
                    Ok(()) => i += 1,
                    Err(e) => self.remove(i, &e, counters),
                }
            }
        }
    }

    fn wait(&self) -> Duration {
        if self.consumers.iter().any(|c| c.backlog() > 0) {
            self.backlog_wait
        } else {
            IDLE_WAIT
        }
    }

    fn finish(&mut self, deadline: Instant, counters: &Counters) {
        self.stop.store(true, Ordering::Release);
        self.register(counters);
        loop {
            self.pump_all(counters);
            if self.consumers.iter().all(|c| c.backlog() == 0) || Instant::now() >= deadline {
                break;
            }
            // Shutdown only: wait for slow consumers to take their bytes, up to the deadline.
            std::thread::sleep(BACKLOG_WAIT_MIN);
        }
        for c in self.consumers.drain(..) {
            let lost = count_lines(&c.buf[c.sent..]);
            if lost > 0 {
                counters.dropped(lost);
                log::warn!(
                    "output tcp:{}: consumer {} closed at shutdown with {lost} records unsent",
                    self.local,
                    c.peer
                );
            }
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
            self.admitted.fetch_sub(1, Ordering::AcqRel);
        }
        counters.consumers.store(0, Ordering::Relaxed);
    }
}
