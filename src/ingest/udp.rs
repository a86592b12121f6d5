//! The UDP receive loop of one shard on one listener.
//!
//! Datagrams are read 64 at a time with `recvmmsg(MSG_DONTWAIT)` into buffers reserved at start
//! (64 × `limits.datagram_bytes_max`); when the socket is empty the task awaits glommio's
//! `peek_from` of one byte as the readiness wait (the fastest combination measured, see
//! shared/PLATFORM.md). Each datagram is checked against the allowlist, its length against the
//! limit (`MSG_TRUNC`: the kernel cut it, so it was longer than the buffer), its optional steering
//! header stripped, and its '\n'-separated events fed to the shard. The socket's kernel drop
//! counter arrives with every datagram as an `SO_RXQ_OVFL` control message, and its kernel
//! receive time as an `SCM_TIMESTAMPNS` one: the latency metric starts there, so it includes
//! the time a datagram waited in the socket while the shard was busy or descheduled.

use crate::config::Transport;
use crate::ingest::lines::TOO_LONG_PREFIX_BYTES;
use crate::ingest::steering::strip_header;
use crate::ingest::ShardSocket;
use crate::runtime::shard::{end_round, first, now_ms, run_lines, wait_unblocked, Ctx, Either};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::rc::Rc;
use std::time::Duration;

/// Datagrams per `recvmmsg`.
pub const BATCH_DATAGRAMS: usize = 64;
/// Control buffer per message, 8-byte aligned: room for `SO_RXQ_OVFL` (a u32, 24 bytes with
/// its header) and `SCM_TIMESTAMPNS` (a timespec, 32 bytes with its header).
const CMSG_WORDS: usize = 8;
/// At shutdown, datagrams already queued in the kernel are still read, up to this many rounds.
const DRAIN_ROUNDS_MAX: u32 = 1024;

/// `recvmmsg` state: buffers and headers that point into them, built once.
struct RecvBatch {
    bufs: Box<[u8]>,
    slot_bytes: usize,
    iov: Box<[libc::iovec]>,
    addrs: Box<[libc::sockaddr_storage]>,
    cmsg: Box<[[u64; CMSG_WORDS]]>,
    hdrs: Box<[libc::mmsghdr]>,
}

impl RecvBatch {
    fn new(slot_bytes: usize) -> RecvBatch {
        let n = BATCH_DATAGRAMS;
        let mut bufs = vec![0u8; n * slot_bytes].into_boxed_slice();
        // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
        let mut addrs: Box<[libc::sockaddr_storage]> =
            (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
        let mut cmsg = vec![[0u64; CMSG_WORDS]; n].into_boxed_slice();
        let mut iov: Box<[libc::iovec]> = (0..n)
            .map(|i| libc::iovec {
                iov_base: bufs[i * slot_bytes..].as_mut_ptr().cast(),
                iov_len: slot_bytes,
            })
            .collect();
        let hdrs = (0..n)
            .map(|i| {
                // SAFETY: mmsghdr is plain old data; all-zero is a valid (empty) value.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_storage).cast();
                h.msg_hdr.msg_iov = &mut iov[i];
                h.msg_hdr.msg_iovlen = 1;
                h.msg_hdr.msg_control = cmsg[i].as_mut_ptr().cast();
                h
            })
            .collect();
        // The boxes never move or resize after this point, so the pointers above stay valid.
        RecvBatch {
            bufs,
            slot_bytes,
            iov,
            addrs,
            cmsg,
            hdrs,
        }
    }

    /// One non-blocking `recvmmsg`: the number of datagrams received.
    fn recv(&mut self, fd: RawFd) -> io::Result<usize> {
        for h in self.hdrs.iter_mut() {
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as _;
            h.msg_hdr.msg_controllen = (CMSG_WORDS * 8) as _;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        debug_assert_eq!(self.iov.len(), self.hdrs.len());
        debug_assert_eq!(self.addrs.len(), self.cmsg.len());
        // SAFETY: every header points at buffers owned by `self` (name, iov -> bufs, control)
        // whose lengths are set above; `self` is borrowed mutably for the call, so nothing else
        // touches them; the kernel writes at most those lengths.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                self.hdrs.len() as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    fn datagram(&self, i: usize) -> (&[u8], bool) {
        let h = &self.hdrs[i];
        let len = (h.msg_len as usize).min(self.slot_bytes);
        let truncated = h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0;
        (
            &self.bufs[i * self.slot_bytes..i * self.slot_bytes + len],
            truncated,
        )
    }

    fn source(&self, i: usize) -> Option<IpAddr> {
        let a = &self.addrs[i];
        match a.ss_family as libc::c_int {
            libc::AF_INET => {
                // SAFETY: the family says the storage holds a sockaddr_in; storage is large
                // and aligned enough for every sockaddr type.
                let v4 =
                    unsafe { &*(a as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
                Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr))))
            }
            libc::AF_INET6 => {
                // SAFETY: as above, for sockaddr_in6.
                let v6 =
                    unsafe { &*(a as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
                Some(IpAddr::V6(Ipv6Addr::from(v6.sin6_addr.s6_addr)))
            }
            _ => None,
        }
    }

    /// What the kernel attached to datagram `i`: the socket's cumulative drop counter and the
    /// datagram's receive time (`CLOCK_REALTIME`, ns), each if present.
    fn control(&self, i: usize) -> Control {
        let mut found = Control::default();
        let h = &self.hdrs[i].msg_hdr;
        if (h.msg_controllen as u64) < std::mem::size_of::<libc::cmsghdr>() as u64 {
            return found;
        }
        // SAFETY: the CMSG_* helpers walk the control buffer the kernel filled, bounded by
        // msg_controllen, which the kernel set to the bytes it wrote (at most our buffer); each
        // payload is read unaligned, at the size its type has.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(h);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET {
                    let data = libc::CMSG_DATA(c);
                    match (*c).cmsg_type {
                        crate::ingest::SO_RXQ_OVFL => {
                            found.drops = Some(std::ptr::read_unaligned(data.cast::<u32>()));
                        }
                        libc::SCM_TIMESTAMPNS => {
                            let ts = std::ptr::read_unaligned(data.cast::<libc::timespec>());
                            found.received_ns = Some(timespec_ns(&ts));
                        }
                        _ => {}
                    }
                }
                c = libc::CMSG_NXTHDR(h, c);
            }
        }
        found
    }
}

/// Control messages of one datagram.
#[derive(Default)]
struct Control {
    drops: Option<u32>,
    received_ns: Option<i128>,
}

fn timespec_ns(ts: &libc::timespec) -> i128 {
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// `CLOCK_REALTIME` in ns: the clock of the kernel's receive times.
fn realtime_ns() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec the call may write.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    timespec_ns(&ts)
}

/// How long a datagram received at `received_ns` had waited at `now_ns`; 0 when the kernel
/// gave no time or the clock was stepped back, and at most a minute (the histogram's ceiling).
fn waited_ns(received_ns: Option<i128>, now_ns: i128) -> u64 {
    received_ns.map_or(0, |r| (now_ns - r).clamp(0, 60_000_000_000) as u64)
}

/// Receive on one UDP socket until the shard stops.
pub async fn run(ctx: Rc<Ctx>, sock: ShardSocket) {
    let _guard = ctx.ingest_guard();
    // SAFETY: the descriptor is a bound UDP socket we own (a duplicate made for this shard);
    // ownership moves into the glommio socket, which closes it on drop.
    let socket = unsafe { glommio::net::UdpSocket::from_raw_fd(sock.fd.into_raw_fd()) };
    let fd = socket.as_raw_fd();
    let mut rx = RecvBatch::new(ctx.limits.datagram_bytes_max);
    let allow_all = sock.allow.allows(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        && sock.allow.allows(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
    let mut drops_seen: u32 = 0;
    let mut draining = 0u32;
    let mut peek = [0u8; 1];
    loop {
        if draining == 0 && !wait_unblocked(&ctx).await {
            if ctx.blocked.get() {
                break;
            }
            draining = 1;
        }
        let n = match rx.recv(fd) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if draining > 0 {
                    break;
                }
                match first(socket.peek_from(&mut peek), ctx.stopped()).await {
                    Either::Left(Ok(_)) => continue,
                    Either::Left(Err(e)) => {
                        ctx.st.borrow_mut().c.io_errors += 1;
                        log::warn!("shard {} udp {}: readiness wait: {e}", ctx.id, sock.address);
                        glommio::timer::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                    Either::Right(()) => {
                        draining = 1;
                        continue;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                ctx.st.borrow_mut().c.io_errors += 1;
                log::warn!("shard {} udp {}: recvmmsg: {e}", ctx.id, sock.address);
                glommio::timer::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let now = now_ms();
        let now_rt = realtime_ns();
        for i in 0..n {
            let (d, truncated) = rx.datagram(i);
            let control = rx.control(i);
            let refused = !allow_all && !rx.source(i).is_some_and(|ip| sock.allow.allows(ip));
            let header = {
                let mut st = ctx.st.borrow_mut();
                st.c.udp_datagrams += 1;
                st.c.udp_bytes += d.len() as u64;
                if let Some(total) = control.drops {
                    st.c.udp_drops += u64::from(total.wrapping_sub(drops_seen));
                    drops_seen = total;
                }
                if refused {
                    st.c.udp_refused += 1;
                    continue;
                }
                if truncated {
                    st.c.udp_too_long += 1;
                    let prefix = &d[..TOO_LONG_PREFIX_BYTES.min(d.len())];
                    st.dead_letter_raw("datagram_too_long", Transport::Udp, prefix);
                    continue;
                }
                let (h, _) = strip_header(d);
                if let Some(h) = h {
                    st.c.udp_steered += 1;
                    if h % st.shards != st.id {
                        st.c.udp_missteered += 1;
                    }
                }
                let events = st.c.udp_events + st.c.tcp_events;
                st.metrics
                    .datagram_begin(events, waited_ns(control.received_ns, now_rt));
                h
            };
            let payload = strip_header(d).1;
            let handed = run_lines(&ctx, payload, Transport::Udp, now, None)
                .await
                .handed_off;
            if header.is_some() && handed > 0 {
                ctx.st.borrow_mut().c.udp_steered_handoff += 1;
            }
        }
        end_round(&ctx).await;
        if draining > 0 {
            draining += 1;
            if draining > DRAIN_ROUNDS_MAX {
                break;
            }
        }
        glommio::yield_if_needed().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::bind_one;
    use std::os::fd::AsRawFd;

    /// The kernel's receive time arrives with the datagram, so a datagram left in the socket
    /// for a while is seen to have waited at least that long. The kernel turns receive
    /// timestamps on asynchronously after the first socket asks for them (until then it stamps
    /// a datagram when it is read), hence a few attempts.
    #[test]
    fn a_datagram_carries_its_kernel_receive_time() {
        let sock = bind_one(Transport::Udp, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = sock.local_addr().unwrap().as_socket().unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let mut rx = RecvBatch::new(2048);
        let pause = Duration::from_millis(30);
        let mut waits = Vec::new();
        for _ in 0..10 {
            client.send_to(b"{\"user\":\"a\"}\n", addr).unwrap();
            std::thread::sleep(pause);
            assert_eq!(rx.recv(sock.as_raw_fd()).unwrap(), 1);
            let now = realtime_ns();
            let control = rx.control(0);
            assert!(control.received_ns.is_some(), "SCM_TIMESTAMPNS attached");
            // (No SO_RXQ_OVFL message: the kernel attaches it only once the socket dropped.)
            assert_eq!(control.drops, None);
            assert_eq!(rx.datagram(0).0, b"{\"user\":\"a\"}\n");
            waits.push(waited_ns(control.received_ns, now));
            if waits.last() >= Some(&(pause.as_nanos() as u64)) {
                return;
            }
        }
        panic!("no datagram was seen to wait {pause:?}: {waits:?} ns");
    }

    #[test]
    fn a_wait_is_never_negative_nor_over_a_minute() {
        assert_eq!(waited_ns(None, 5), 0);
        assert_eq!(waited_ns(Some(10), 5), 0, "clock stepped back");
        assert_eq!(waited_ns(Some(0), 7), 7);
        assert_eq!(waited_ns(Some(0), i128::from(u64::MAX)), 60_000_000_000);
    }
}
