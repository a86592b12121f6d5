//! The UDP receive loop of one shard on one listener.
//!
//! Datagrams are read 64 at a time with `recvmmsg(MSG_DONTWAIT)` into buffers reserved at start
//! (64 × `limits.datagram_bytes_max`); when the socket is empty the task awaits glommio's
//! `peek_from` of one byte as the readiness wait (the fastest combination measured, see
//! shared/PLATFORM.md). Each datagram is checked against the allowlist, its length against the
//! limit (`MSG_TRUNC`: the kernel cut it, so it was longer than the buffer), its optional steering
//! header stripped, and its '\n'-separated events fed to the shard. The socket's kernel drop
//! counter arrives with every datagram as an `SO_RXQ_OVFL` control message.

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
/// Control buffer per message: room for `SO_RXQ_OVFL` (a u32) with headers, 8-byte aligned.
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

    /// The socket's cumulative drop counter, if the kernel attached it to datagram `i`.
    fn drops(&self, i: usize) -> Option<u32> {
        let h = &self.hdrs[i].msg_hdr;
        if (h.msg_controllen as u64) < std::mem::size_of::<libc::cmsghdr>() as u64 {
            return None;
        }
        // SAFETY: the CMSG_* helpers walk the control buffer the kernel filled, bounded by
        // msg_controllen, which the kernel set to the bytes it wrote (at most our buffer).
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(h);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET
                    && (*c).cmsg_type == crate::ingest::SO_RXQ_OVFL
                {
                    return Some(std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<u32>()));
                }
                c = libc::CMSG_NXTHDR(h, c);
            }
        }
        None
    }
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
        for i in 0..n {
            let (d, truncated) = rx.datagram(i);
            let refused = !allow_all && !rx.source(i).is_some_and(|ip| sock.allow.allows(ip));
            let header = {
                let mut st = ctx.st.borrow_mut();
                st.c.udp_datagrams += 1;
                st.c.udp_bytes += d.len() as u64;
                if let Some(total) = rx.drops(i) {
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
