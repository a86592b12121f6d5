//! `baseline-recv`: the raw receive ceiling of the appliance's kind of sockets, measured in the
//! same run as the appliance so absolute figures become ratios.
//!
//! UDP: one SO_REUSEPORT socket per thread, created and bound in order by the parent, each
//! drained with `recvmmsg` in batches of 64 into a fixed 4 MiB arena. TCP: one thread per
//! connection (at most [`TCP_CONNECTIONS_MAX`]), each with a fixed 256 KiB buffer. Nothing is
//! parsed: events are counted as `\n`-separated pieces (a steering header is skipped).
//!
//! With `--echo ADDR` it doubles as a stand-in for the appliance when testing the harness: every
//! event comes back on a TCP output at ADDR as an "enriched" line (the event with
//! `,"_session":{"id":"echo"}` appended). Echo batches go through a bounded channel of recycled
//! buffers; when the channel is full or no client is connected they are dropped and counted.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use socket2::{Domain, Protocol, Socket, Type};

use crate::send::Transport;
use crate::wire;

pub const DATAGRAMS_PER_RECV: usize = 64;
const DATAGRAM_BYTES: usize = 65_536;
const TCP_BUFFER_BYTES: usize = 256 * 1024;
pub const TCP_CONNECTIONS_MAX: usize = 256;
const UDP_RECV_BUFFER_BYTES: usize = 16 << 20;
const POLL: Duration = Duration::from_millis(100);
const ECHO_BATCHES: usize = 64;
const ECHO_BATCH_BYTES: usize = 256 * 1024;
const ECHO_SUBMIT_BYTES: usize = 64 * 1024;
const ECHO_SUBMIT_NS: u64 = 1_000_000;
const ECHO_SUFFIX: &[u8] = b",\"_session\":{\"id\":\"echo\"}}\n";

/// Counters shared by the receiving threads.
#[derive(Debug, Default)]
pub struct BaselineCounters {
    pub events: AtomicU64,
    pub datagrams: AtomicU64,
    pub bytes: AtomicU64,
    pub connections: AtomicU64,
    pub connections_refused: AtomicU64,
    pub echo_dropped: AtomicU64,
    pub stop: AtomicBool,
}

/// Totals of a baseline receiver.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct BaselineTotals {
    pub events: u64,
    pub datagrams: u64,
    pub bytes: u64,
    pub echo_dropped: u64,
}

impl BaselineCounters {
    pub fn totals(&self) -> BaselineTotals {
        BaselineTotals {
            events: self.events.load(Ordering::Relaxed),
            datagrams: self.datagrams.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            echo_dropped: self.echo_dropped.load(Ordering::Relaxed),
        }
    }
}

/// A running baseline receiver.
pub struct Baseline {
    handles: Vec<JoinHandle<()>>,
    pub counters: Arc<BaselineCounters>,
    pub local_address: SocketAddr,
}

/// Events in a datagram or a chunk of a stream: `\n`-separated pieces.
fn count_events(payload: &[u8]) -> u64 {
    let payload = strip_header(payload);
    if payload.is_empty() {
        return 0;
    }
    let newlines = memchr::memchr_iter(b'\n', payload).count() as u64;
    newlines + u64::from(payload[payload.len() - 1] != b'\n')
}

fn strip_header(payload: &[u8]) -> &[u8] {
    if payload.len() >= wire::STEER_HEADER_BYTES && payload[..4] == wire::STEER_MAGIC {
        &payload[wire::STEER_HEADER_BYTES..]
    } else {
        payload
    }
}

/// The echo path: recycled batch buffers, a bounded queue, one writer thread.
#[derive(Clone)]
struct Echo {
    full: Sender<Vec<u8>>,
    empty: Receiver<Vec<u8>>,
    counters: Arc<BaselineCounters>,
}

impl Echo {
    fn start(
        address: SocketAddr,
        counters: Arc<BaselineCounters>,
    ) -> Result<(Echo, JoinHandle<()>), String> {
        let listener = TcpListener::bind(address)
            .map_err(|e| format!("binding the echo output {address}: {e}"))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("echo output: {e}"))?;
        let (full_tx, full_rx) = bounded::<Vec<u8>>(ECHO_BATCHES);
        let (empty_tx, empty_rx) = bounded::<Vec<u8>>(ECHO_BATCHES);
        for _ in 0..ECHO_BATCHES {
            empty_tx
                .send(Vec::with_capacity(ECHO_BATCH_BYTES))
                .expect("the pool has room for every buffer");
        }
        let writer_counters = Arc::clone(&counters);
        let handle = std::thread::Builder::new()
            .name("echo".to_string())
            .spawn(move || echo_writer(listener, full_rx, empty_tx, writer_counters))
            .map_err(|e| format!("spawning the echo writer: {e}"))?;
        Ok((
            Echo {
                full: full_tx,
                empty: empty_rx,
                counters,
            },
            handle,
        ))
    }

    /// Appends the enriched form of each complete line of `payload` to `batch`.
    fn enrich(batch: &mut Vec<u8>, payload: &[u8]) -> u64 {
        let mut lines = 0;
        for line in strip_header(payload).split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(body) = line.strip_suffix(b"}") {
                batch.extend_from_slice(body);
                batch.extend_from_slice(ECHO_SUFFIX);
                lines += 1;
            }
        }
        lines
    }

    fn take(&self) -> Option<Vec<u8>> {
        self.empty.try_recv().ok()
    }

    fn submit(&self, batch: Vec<u8>, events: u64) {
        if let Err(TrySendError::Full(batch) | TrySendError::Disconnected(batch)) =
            self.full.try_send(batch)
        {
            self.counters
                .echo_dropped
                .fetch_add(events, Ordering::Relaxed);
            drop(batch); // Lost from the pool: the pool shrinks rather than blocks.
        }
    }
}

fn echo_writer(
    listener: TcpListener,
    full: Receiver<Vec<u8>>,
    empty: Sender<Vec<u8>>,
    counters: Arc<BaselineCounters>,
) {
    let mut client: Option<TcpStream> = None;
    while !counters.stop.load(Ordering::Relaxed) {
        if let Ok((stream, _)) = listener.accept() {
            let _ = stream.set_nonblocking(false);
            let _ = stream.set_nodelay(true);
            client = Some(stream);
        }
        let Ok(mut batch) = full.recv_timeout(Duration::from_millis(20)) else {
            continue;
        };
        let lines = memchr::memchr_iter(b'\n', &batch).count() as u64;
        let written = match client.as_mut() {
            Some(stream) => stream.write_all(&batch).is_ok(),
            None => false,
        };
        if !written {
            client = None;
            counters.echo_dropped.fetch_add(lines, Ordering::Relaxed);
        }
        batch.clear();
        let _ = empty.try_send(batch);
    }
}

impl Baseline {
    /// Binds and starts the receiving threads (and the echo output when asked).
    pub fn start(
        transport: Transport,
        listen: SocketAddr,
        threads: u32,
        echo: Option<SocketAddr>,
    ) -> Result<Baseline, String> {
        assert!(threads > 0);
        let counters = Arc::new(BaselineCounters::default());
        let mut handles = Vec::new();
        let echo = match echo {
            Some(address) => {
                let (echo, handle) = Echo::start(address, Arc::clone(&counters))?;
                handles.push(handle);
                Some(echo)
            }
            None => None,
        };
        let local_address = match transport {
            Transport::Udp => start_udp(listen, threads, &counters, echo, &mut handles)?,
            Transport::Tcp => start_tcp(listen, &counters, echo, &mut handles)?,
        };
        Ok(Baseline {
            handles,
            counters,
            local_address,
        })
    }

    pub fn stop(self) -> BaselineTotals {
        self.counters.stop.store(true, Ordering::Relaxed);
        for handle in self.handles {
            let _ = handle.join();
        }
        self.counters.totals()
    }
}

fn start_udp(
    listen: SocketAddr,
    threads: u32,
    counters: &Arc<BaselineCounters>,
    echo: Option<Echo>,
    handles: &mut Vec<JoinHandle<()>>,
) -> Result<SocketAddr, String> {
    // Sockets are created and bound in order here: bind order is the index in the group.
    let mut address = listen;
    let mut sockets = Vec::with_capacity(threads as usize);
    for _ in 0..threads {
        let socket = Socket::new(
            Domain::for_address(address),
            Type::DGRAM,
            Some(Protocol::UDP),
        )
        .map_err(|e| format!("UDP socket: {e}"))?;
        socket
            .set_reuse_port(true)
            .map_err(|e| format!("SO_REUSEPORT: {e}"))?;
        set_receive_buffer(&socket, UDP_RECV_BUFFER_BYTES);
        // With an echo, a quiet socket must still hand over its partial batch within 1 ms.
        let timeout = if echo.is_some() {
            Duration::from_nanos(ECHO_SUBMIT_NS)
        } else {
            POLL
        };
        socket
            .set_read_timeout(Some(timeout))
            .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
        socket
            .bind(&address.into())
            .map_err(|e| format!("binding UDP {address}: {e}"))?;
        // A port 0 request binds the rest of the group to the port the first one got.
        address = socket
            .local_addr()
            .ok()
            .and_then(|a| a.as_socket())
            .unwrap_or(address);
        sockets.push(socket);
    }
    for (index, socket) in sockets.into_iter().enumerate() {
        let counters = Arc::clone(counters);
        let echo = echo.clone();
        let handle = std::thread::Builder::new()
            .name(format!("baseline-udp-{index}"))
            .spawn(move || udp_loop(socket, &counters, echo.as_ref()))
            .map_err(|e| format!("spawning a receiver: {e}"))?;
        handles.push(handle);
    }
    Ok(address)
}

/// Raises SO_RCVBUF past `rmem_max` when root (SO_RCVBUFFORCE), else as far as allowed.
pub(crate) fn set_receive_buffer(socket: &Socket, bytes: usize) {
    let value = bytes as libc::c_int;
    // SAFETY: the option value is a live c_int of the size passed; the fd is open.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let _ = socket.set_recv_buffer_size(bytes);
    }
}

fn udp_loop(socket: Socket, counters: &BaselineCounters, echo: Option<&Echo>) {
    let mut arena = vec![0u8; DATAGRAM_BYTES * DATAGRAMS_PER_RECV];
    let base = arena.as_mut_ptr();
    let mut iov: Vec<libc::iovec> = (0..DATAGRAMS_PER_RECV)
        .map(|slot| libc::iovec {
            // SAFETY: each slot lies within the arena.
            iov_base: unsafe { base.add(slot * DATAGRAM_BYTES) }.cast(),
            iov_len: DATAGRAM_BYTES,
        })
        .collect();
    let mut msgs: Vec<libc::mmsghdr> = (0..DATAGRAMS_PER_RECV)
        .map(|slot| {
            // SAFETY: an all-zero mmsghdr is valid; the iovec pointer is set right after.
            let mut msg: libc::mmsghdr = unsafe { std::mem::zeroed() };
            msg.msg_hdr.msg_iov = &mut iov[slot];
            msg.msg_hdr.msg_iovlen = 1;
            msg
        })
        .collect();
    let mut batch = echo.and_then(Echo::take);
    let mut batch_events = 0u64;
    let mut batch_since_ns: Option<u64> = None;
    while !counters.stop.load(Ordering::Relaxed) {
        // SAFETY: the messages point at iovecs over the live arena with their full slot lengths;
        // MSG_WAITFORONE blocks (up to SO_RCVTIMEO) for the first datagram only.
        let rc = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                DATAGRAMS_PER_RECV as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if rc <= 0 {
            // Timeout (EAGAIN) or EINTR: hand over what waits, then look at the stop flag.
            if let (Some(echo), true) = (echo, batch_events > 0) {
                if let Some(buffer) = batch.take() {
                    echo.submit(buffer, batch_events);
                }
                batch_events = 0;
                batch_since_ns = None;
                batch = echo.take();
            }
            continue;
        }
        let received = rc as usize;
        let (mut events, mut bytes) = (0u64, 0u64);
        for (slot, msg) in msgs.iter().enumerate().take(received) {
            let len = msg.msg_len as usize;
            let payload = &arena[slot * DATAGRAM_BYTES..slot * DATAGRAM_BYTES + len];
            events += count_events(payload);
            bytes += len as u64;
            if let (Some(_), Some(buffer)) = (echo, batch.as_mut()) {
                batch_events += Echo::enrich(buffer, payload);
            }
        }
        counters.events.fetch_add(events, Ordering::Relaxed);
        counters
            .datagrams
            .fetch_add(received as u64, Ordering::Relaxed);
        counters.bytes.fetch_add(bytes, Ordering::Relaxed);
        let Some(echo) = echo else { continue };
        if batch.is_none() {
            counters.echo_dropped.fetch_add(events, Ordering::Relaxed);
            batch = echo.take();
            continue;
        }
        // Batches leave when large or 1 ms old, so the writer makes few, large writes.
        let now = crate::clock::mono_ns();
        let since = *batch_since_ns.get_or_insert(now);
        let len = batch.as_ref().map_or(0, Vec::len);
        if len >= ECHO_SUBMIT_BYTES || now - since >= ECHO_SUBMIT_NS {
            batch_since_ns = None;
            if let Some(buffer) = batch.take() {
                echo.submit(buffer, batch_events);
            }
            batch_events = 0;
            batch = echo.take();
        }
    }
}

fn start_tcp(
    listen: SocketAddr,
    counters: &Arc<BaselineCounters>,
    echo: Option<Echo>,
    handles: &mut Vec<JoinHandle<()>>,
) -> Result<SocketAddr, String> {
    let listener = TcpListener::bind(listen).map_err(|e| format!("binding TCP {listen}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("TCP listener: {e}"))?;
    let address = listener
        .local_addr()
        .map_err(|e| format!("TCP listener: {e}"))?;
    let counters = Arc::clone(counters);
    let handle = std::thread::Builder::new()
        .name("baseline-accept".to_string())
        .spawn(move || {
            let mut connections: Vec<JoinHandle<()>> = Vec::new();
            while !counters.stop.load(Ordering::Relaxed) {
                connections.retain(|h| !h.is_finished());
                match listener.accept() {
                    Ok((stream, _)) if connections.len() < TCP_CONNECTIONS_MAX => {
                        counters.connections.fetch_add(1, Ordering::Relaxed);
                        let counters = Arc::clone(&counters);
                        let echo = echo.clone();
                        match std::thread::Builder::new()
                            .name("baseline-tcp".to_string())
                            .spawn(move || tcp_loop(stream, &counters, echo.as_ref()))
                        {
                            Ok(handle) => connections.push(handle),
                            Err(error) => log::warn!("spawning a connection thread: {error}"),
                        }
                    }
                    Ok(_) => {
                        counters.connections_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
            for handle in connections {
                let _ = handle.join();
            }
        })
        .map_err(|e| format!("spawning the acceptor: {e}"))?;
    handles.push(handle);
    Ok(address)
}

fn tcp_loop(mut stream: TcpStream, counters: &BaselineCounters, echo: Option<&Echo>) {
    if stream.set_nonblocking(false).is_err() || stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let mut buffer = vec![0u8; TCP_BUFFER_BYTES];
    // Bytes of an unfinished line kept for the echo (which needs whole lines).
    let mut carry = 0usize;
    let mut open_line = false;
    while !counters.stop.load(Ordering::Relaxed) {
        let n = match stream.read(&mut buffer[carry..]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => break,
        };
        let chunk = &buffer[carry..carry + n];
        let newlines = memchr::memchr_iter(b'\n', chunk).count() as u64;
        open_line = chunk[n - 1] != b'\n';
        counters.events.fetch_add(newlines, Ordering::Relaxed);
        counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
        let Some(echo) = echo else { continue };
        let end = carry + n;
        let complete = memchr::memrchr(b'\n', &buffer[..end]).map_or(0, |at| at + 1);
        if complete > 0 {
            match echo.take() {
                Some(mut batch) => {
                    let lines = Echo::enrich(&mut batch, &buffer[..complete - 1]);
                    echo.submit(batch, lines);
                }
                None => {
                    counters.echo_dropped.fetch_add(newlines, Ordering::Relaxed);
                }
            }
        }
        buffer.copy_within(complete..end, 0);
        carry = end - complete;
        if carry == buffer.len() {
            carry = 0; // A line longer than the buffer is not echoed.
        }
    }
    if open_line {
        counters.events.fetch_add(1, Ordering::Relaxed);
    }
}

/// Options of the `baseline-recv` command.
pub struct BaselineCommand {
    pub transport: Transport,
    pub listen: SocketAddr,
    pub threads: u32,
    pub duration: Option<Duration>,
    pub echo: Option<SocketAddr>,
    pub quiet: bool,
}

/// Runs `baseline-recv` until the duration ends or Ctrl-C, printing a line per second.
pub fn command(options: &BaselineCommand) -> Result<BaselineTotals, String> {
    let baseline = Baseline::start(
        options.transport,
        options.listen,
        options.threads,
        options.echo,
    )?;
    eprintln!(
        "baseline-recv: {:?} on {} with {} thread(s){}",
        options.transport,
        baseline.local_address,
        options.threads,
        options
            .echo
            .map(|a| format!(", echo output on {a}"))
            .unwrap_or_default()
    );
    let started = Instant::now();
    let mut last = baseline.counters.totals();
    let mut first_event: Option<(Instant, u64)> = None;
    let mut last_event = started;
    let mut tick = started;
    loop {
        tick += Duration::from_secs(1);
        while Instant::now() < tick {
            if crate::interrupted() || options.duration.is_some_and(|d| started.elapsed() >= d) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let now = baseline.counters.totals();
        if now.events > last.events {
            first_event.get_or_insert((Instant::now(), last.events));
            last_event = Instant::now();
        }
        if !options.quiet {
            eprintln!(
                "[{:>4}s] {:>10} events/s {:>9} datagrams/s {:>8.1} MB/s",
                started.elapsed().as_secs(),
                now.events - last.events,
                now.datagrams - last.datagrams,
                (now.bytes - last.bytes) as f64 / 1e6
            );
        }
        last = now;
        if crate::interrupted() || options.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
    }
    let totals = baseline.stop();
    let rate = match first_event {
        Some((first, before)) if last_event > first => {
            (totals.events - before) as f64 / last_event.duration_since(first).as_secs_f64()
        }
        _ => 0.0,
    };
    println!(
        "baseline-recv: {} events, {} datagrams, {} bytes; {:.0} events/s while traffic flowed{}",
        totals.events,
        totals.datagrams,
        totals.bytes,
        rate,
        if options.echo.is_some() {
            format!("; echo dropped {}", totals.echo_dropped)
        } else {
            String::new()
        }
    );
    Ok(totals)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;

    #[test]
    fn counts_events_of_datagrams() {
        assert_eq!(count_events(b""), 0);
        assert_eq!(count_events(b"{}"), 1);
        assert_eq!(count_events(b"{}\n{}"), 2);
        assert_eq!(count_events(b"{}\n{}\n"), 2);
        assert_eq!(count_events(b"SZH1\n\n\n\n{}\n{}"), 2);
    }

    fn wait_for(counters: &BaselineCounters, events: u64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while counters.events.load(Ordering::Relaxed) < events && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn udp_baseline_counts_and_echoes() {
        let echo_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let echo_address = echo_listener.local_addr().unwrap();
        drop(echo_listener);
        let baseline = Baseline::start(
            Transport::Udp,
            "127.0.0.1:0".parse().unwrap(),
            2,
            Some(echo_address),
        )
        .unwrap();
        let mut client = TcpStream::connect(echo_address).unwrap();
        client
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        // The writer thread picks the client up on its next turn; it is ready once a probe
        // datagram's echo arrives.
        let sender = UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut text = Vec::new();
        let mut buffer = [0u8; 4096];
        let deadline = Instant::now() + Duration::from_secs(10);
        while text.is_empty() {
            assert!(Instant::now() < deadline, "the echo output never answered");
            sender
                .send_to(b"{\"probe\":1}", baseline.local_address)
                .unwrap();
            match client.read(&mut buffer) {
                Ok(n) => text.extend_from_slice(&buffer[..n]),
                Err(_) => continue,
            }
        }
        let probes = baseline.counters.events.load(Ordering::Relaxed);
        let dropped_probes = baseline.counters.echo_dropped.load(Ordering::Relaxed);
        for _ in 0..100 {
            sender
                .send_to(
                    b"SZH1\x00\x00\x00\x01{\"a\":1}\n{\"a\":2}",
                    baseline.local_address,
                )
                .unwrap();
        }
        wait_for(&baseline.counters, probes + 200);
        let totals = baseline.stop();
        assert_eq!(totals.events, probes + 200);
        assert_eq!(totals.datagrams, probes + 100);
        client
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        while let Ok(n) = client.read(&mut buffer) {
            if n == 0 {
                break;
            }
            text.extend_from_slice(&buffer[..n]);
        }
        let text = String::from_utf8(text).unwrap();
        let echoed = text.lines().filter(|l| l.starts_with("{\"a\"")).count() as u64;
        assert_eq!(echoed + totals.echo_dropped - dropped_probes, 200);
        for line in text.lines() {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(value.get("_session").is_some());
        }
    }

    #[test]
    fn tcp_baseline_counts_lines() {
        let baseline =
            Baseline::start(Transport::Tcp, "127.0.0.1:0".parse().unwrap(), 1, None).unwrap();
        let mut stream = TcpStream::connect(baseline.local_address).unwrap();
        for _ in 0..1000 {
            stream.write_all(b"{\"user\":\"u1\"}\n").unwrap();
        }
        stream.write_all(b"{\"last\":1}").unwrap();
        drop(stream);
        wait_for(&baseline.counters, 1001);
        assert_eq!(baseline.stop().events, 1001);
    }
}
