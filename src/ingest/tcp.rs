//! TCP ingest of one shard: an accept loop per listener and one task per connection.
//!
//! Connections land on any shard (one listener per shard in a reuseport group; TCP cannot be
//! steered by payload). Each shard admits at most its share of `limits.tcp_connections_max`
//! (`max / shards`, at least 1); an extra connection is accepted and closed at once, and counted.
//!
//! A connection task owns a fixed buffer of `line_bytes_max + 64 KiB` (allocated at accept) and
//! reads with `recv(MSG_DONTWAIT)`, awaiting glommio's one-byte `peek` as the readiness wait.
//! Lines longer than `limits.line_bytes_max` are dead-lettered (`line_too_long`, first 1 KiB)
//! and skipped up to their '\n'; the connection stays up. A connection idle for
//! `limits.tcp_idle_timeout` is closed. Backpressure: while a hand-off queue to another shard
//! or a `block` sink is full, the task does not read, so the kernel's window closes on the
//! client; TCP data is never dropped. Each connection is its own task with its own buffer, so a
//! slow or half-open peer holds only its own task.

use crate::config::Transport;
use crate::ingest::ack::{Acks, ACK_POLL};
use crate::ingest::lines::{Chunk, LineBuf};
use crate::ingest::ShardSocket;
use crate::runtime::shard::{end_round, first, now_ms, run_lines, wait_unblocked, Ctx, Either};
use std::cell::Cell;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Bytes a connection reads at most per `recv`, on top of room for one partial line.
pub const READ_CHUNK_BYTES: usize = 64 << 10;
/// At shutdown, bytes already queued in the kernel are still read, up to this many rounds.
const DRAIN_ROUNDS_MAX: u32 = 1024;
/// After the client's end of stream, an acknowledged connection stays open this long at most
/// for its last lines to become durable and be acknowledged.
const ACK_LINGER: Duration = Duration::from_secs(5);

/// Accept connections on one listener until the shard stops.
pub async fn run_listener(ctx: Rc<Ctx>, sock: ShardSocket) {
    let _guard = ctx.ingest_guard();
    // SAFETY: the descriptor is a bound, listening TCP socket we own (a duplicate made for
    // this shard); ownership moves into the glommio listener, which closes it on drop.
    let listener = unsafe { glommio::net::TcpListener::from_raw_fd(sock.fd.into_raw_fd()) };
    let open = Rc::new(Cell::new(0u32));
    loop {
        let accepted = match first(listener.accept(), ctx.stopped()).await {
            Either::Right(()) => break,
            Either::Left(r) => r,
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                ctx.st.borrow_mut().c.io_errors += 1;
                log::warn!("shard {} tcp {}: accept: {e}", ctx.id, sock.address);
                // Out of descriptors or memory: back off instead of spinning.
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let peer = stream.peer_addr().ok();
        if !peer.is_some_and(|p| sock.allow.allows(p.ip())) {
            ctx.st.borrow_mut().c.tcp_refused += 1;
            log::debug!(
                "shard {} tcp {}: refused {peer:?} (allowlist)",
                ctx.id,
                sock.address
            );
            continue;
        }
        if open.get() >= ctx.limits.tcp_connections_per_shard {
            ctx.st.borrow_mut().c.tcp_over_limit += 1;
            log::debug!(
                "shard {} tcp {}: refused {peer:?} (connection limit)",
                ctx.id,
                sock.address
            );
            continue;
        }
        ctx.st.borrow_mut().c.tcp_accepted += 1;
        glommio::spawn_local(connection(ctx.clone(), stream, open.clone(), sock.ack)).detach();
    }
}

/// Keeps the per-shard and per-listener connection gauges right however the task ends.
struct Open {
    ctx: Rc<Ctx>,
    listener: Rc<Cell<u32>>,
}

impl Open {
    fn new(ctx: Rc<Ctx>, listener: Rc<Cell<u32>>) -> Open {
        listener.set(listener.get() + 1);
        ctx.st.borrow_mut().c.tcp_open += 1;
        Open { ctx, listener }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.listener.set(self.listener.get().saturating_sub(1));
        let mut st = self.ctx.st.borrow_mut();
        st.c.tcp_open = st.c.tcp_open.saturating_sub(1);
    }
}

enum Wait {
    Ready,
    Failed,
    Idle,
}

async fn connection(ctx: Rc<Ctx>, stream: glommio::net::TcpStream, open: Rc<Cell<u32>>, ack: bool) {
    let _guard = ctx.ingest_guard();
    let _open = Open::new(ctx.clone(), open);
    let fd = stream.as_raw_fd();
    let mut lb = LineBuf::new(ctx.limits.line_bytes_max, READ_CHUNK_BYTES);
    let idle = ctx.limits.tcp_idle_timeout;
    let mut draining = 0u32;
    let mut peek = [0u8; 1];
    let mut acks = ack.then(Acks::new);
    let mut last_input = Instant::now();
    'conn: loop {
        if draining == 0 && !wait_unblocked(&ctx).await {
            if ctx.blocked.get() {
                break;
            }
            draining = 1;
        }
        let spare = lb.spare_mut();
        // SAFETY: `spare` is a live, exclusively borrowed buffer of `spare.len()` bytes; `fd` is
        // the connection's socket, open while `stream` lives.
        let n = unsafe {
            libc::recv(
                fd,
                spare.as_mut_ptr().cast(),
                spare.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n > 0 {
            let n = n as usize;
            lb.commit(n);
            ctx.st.borrow_mut().c.tcp_bytes += n as u64;
            let now = now_ms();
            last_input = Instant::now();
            while let Some(chunk) = lb.next_chunk() {
                match chunk {
                    Chunk::Lines(r) => match acks.as_mut() {
                        None => {
                            run_lines(&ctx, lb.bytes(r), Transport::Tcp, now, None).await;
                        }
                        Some(a) => {
                            if let Err(reason) = a.lines_in(&ctx, lb.bytes(r), now).await {
                                refuse_hello(&ctx, fd, &reason);
                                break 'conn;
                            }
                        }
                    },
                    Chunk::TooLong(r) => {
                        let mut st = ctx.st.borrow_mut();
                        st.c.lines_too_long += 1;
                        st.c.tcp_events += 1;
                        st.dead_letter_raw("line_too_long", Transport::Tcp, lb.bytes(r));
                        if let Some(a) = acks.as_mut() {
                            a.skipped_line();
                        }
                    }
                }
            }
            end_round(&ctx).await;
            if let Some(a) = acks.as_mut() {
                a.record(&ctx).await;
                if !a.flush(&ctx, fd) {
                    break;
                }
            }
            if draining > 0 {
                draining += 1;
                if draining > DRAIN_ROUNDS_MAX {
                    break;
                }
            }
            glommio::yield_if_needed().await;
            continue;
        }
        if n == 0 {
            // End of stream: a last line without '\n' still counts.
            if let Some(r) = lb.finish() {
                match acks.as_mut() {
                    None => {
                        run_lines(&ctx, lb.bytes(r), Transport::Tcp, now_ms(), None).await;
                    }
                    Some(a) => {
                        if let Err(reason) = a.lines_in(&ctx, lb.bytes(r), now_ms()).await {
                            refuse_hello(&ctx, fd, &reason);
                            break;
                        }
                    }
                }
                end_round(&ctx).await;
            }
            if let Some(a) = acks.as_mut() {
                a.record(&ctx).await;
                linger_for_acks(&ctx, fd, a).await;
            }
            break;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock if draining > 0 => break,
            io::ErrorKind::WouldBlock => {}
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted => break,
            _ => {
                ctx.st.borrow_mut().c.io_errors += 1;
                log::debug!("shard {} tcp: recv: {e}", ctx.id);
                break;
            }
        }
        // Unacknowledged lines: wake up often to acknowledge them as they become durable.
        let ack_waiting = acks.as_ref().is_some_and(Acks::waiting);
        let idle_left = idle.saturating_sub(last_input.elapsed());
        let wait = if ack_waiting {
            idle_left.min(ACK_POLL)
        } else {
            idle_left
        };
        let readiness = async {
            match first(stream.peek(&mut peek), glommio::timer::sleep(wait)).await {
                Either::Left(Ok(_)) => Wait::Ready,
                Either::Left(Err(_)) => Wait::Failed,
                Either::Right(()) => Wait::Idle,
            }
        };
        match first(readiness, ctx.stopped()).await {
            Either::Left(Wait::Ready) => {}
            Either::Left(Wait::Failed) => break,
            Either::Left(Wait::Idle) => {
                if let Some(a) = acks.as_mut() {
                    if !a.flush(&ctx, fd) {
                        break;
                    }
                }
                if last_input.elapsed() >= idle {
                    ctx.st.borrow_mut().c.tcp_idle_closed += 1;
                    break;
                }
            }
            Either::Right(()) => draining = 1,
        }
    }
}

/// Tell the client why its hello was refused (best effort: the connection closes next).
fn refuse_hello(ctx: &Ctx, fd: i32, reason: &str) {
    log::debug!("shard {} tcp: hello refused: {reason}", ctx.id);
    let line = Acks::error_line(reason);
    // SAFETY: `line` is a live buffer; `fd` is the open connection.
    unsafe {
        libc::send(
            fd,
            line.as_ptr().cast(),
            line.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}

/// The client ended its stream: acknowledge what becomes durable within [`ACK_LINGER`].
async fn linger_for_acks(ctx: &Rc<Ctx>, fd: i32, acks: &mut Acks) {
    let deadline = Instant::now() + ACK_LINGER;
    while acks.waiting() && Instant::now() < deadline && !ctx.is_stopping() {
        if !acks.flush(ctx, fd) {
            return;
        }
        glommio::timer::sleep(ACK_POLL).await;
    }
}
