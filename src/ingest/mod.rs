//! Ingest: the listening sockets and the receive loops that feed a shard.
//!
//! The parent thread binds every listener before any executor starts: for each configured
//! listener, one `SO_REUSEPORT` socket per shard, created and bound in shard order (bind order is
//! the socket's index in the kernel's reuseport group, which is what the UDP steering program
//! returns). A configured port 0 is resolved by the first bind and reused by the others. The
//! parent keeps every socket open for the process lifetime (when a member closes, the kernel moves
//! the last socket into its slot and steering would point at the wrong shard); each shard gets a
//! duplicate descriptor, wrapped into glommio types on the shard's own thread.
//!
//! `udp` and `tcp` hold the receive loops, `steering` the header and BPF program, `lines` the
//! stream framing shared with `replay`.

pub mod ack;
pub mod lines;
pub mod steering;
pub mod tcp;
pub mod udp;

use crate::config::{Config, Transport};
use crate::netfilter::Allowlist;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

/// Kernel receive buffer asked for on each UDP socket (the kernel caps it at rmem_max).
const UDP_RCVBUF_BYTES: usize = 8 << 20;
/// `listen(2)` backlog per TCP socket.
const TCP_BACKLOG: i32 = 1024;
/// `SO_RXQ_OVFL` from `<asm-generic/socket.h>`: ask for the socket's drop counter as a cmsg.
pub(crate) const SO_RXQ_OVFL: libc::c_int = 40;

pub fn transport_label(t: Transport) -> &'static str {
    match t {
        Transport::Udp => "udp",
        Transport::Tcp => "tcp",
    }
}

/// One configured listener: its reuseport group, one socket per shard, in shard order.
pub struct ListenerGroup {
    pub kind: Transport,
    /// The bound address (the ephemeral port resolved when the config said 0).
    pub address: SocketAddr,
    pub allow: Allowlist,
    pub steering: bool,
    /// TCP: acknowledge durable lines on the connection (`ingest::ack`).
    pub ack: bool,
    sockets: Vec<Socket>,
}

/// Everything a shard needs to run one listener: a duplicate of its socket, owned by the shard.
pub struct ShardSocket {
    pub listener: usize,
    pub kind: Transport,
    pub address: SocketAddr,
    pub allow: Allowlist,
    pub ack: bool,
    pub fd: OwnedFd,
}

pub struct Listeners {
    pub groups: Vec<ListenerGroup>,
}

#[derive(Debug)]
pub struct BindError {
    pub listener: usize,
    pub address: SocketAddr,
    pub source: io::Error,
}

impl std::fmt::Display for BindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "listener[{}] ({}): cannot bind: {}",
            self.listener, self.address, self.source
        )
    }
}

impl std::error::Error for BindError {}

impl Listeners {
    /// Bind every configured listener, `shards` sockets each, in order.
    pub fn bind(cfg: &Config, shards: u32) -> Result<Listeners, BindError> {
        assert!(shards >= 1);
        let mut groups = Vec::with_capacity(cfg.listeners.len());
        for (i, l) in cfg.listeners.iter().enumerate() {
            let fail = |address: SocketAddr, source: io::Error| BindError {
                listener: i,
                address,
                source,
            };
            let allow = Allowlist::parse(&l.allow).map_err(|m| {
                fail(
                    l.address,
                    io::Error::new(io::ErrorKind::InvalidInput, format!("allow: {m}")),
                )
            })?;
            let mut address = l.address;
            if address.port() != 0 {
                probe_unshared(l.kind, address).map_err(|e| fail(address, e))?;
            }
            let mut sockets = Vec::with_capacity(shards as usize);
            for _ in 0..shards {
                let s = bind_one(l.kind, address).map_err(|e| fail(address, e))?;
                if address.port() == 0 {
                    address = s
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_socket())
                        .ok_or_else(|| fail(address, io::Error::other("no local address")))?;
                }
                sockets.push(s);
            }
            let mut steering = false;
            if l.kind == Transport::Udp && shards > 1 {
                match steering::attach(&sockets[0], shards) {
                    Ok(()) => steering = true,
                    // Steering is an optimisation: without it every event still reaches its
                    // owner through a hand-off.
                    Err(e) => log::warn!(
                        "listener[{i}] udp {address}: steering program not attached ({e}); events will be handed off between shards"
                    ),
                }
            }
            groups.push(ListenerGroup {
                kind: l.kind,
                address,
                allow,
                steering,
                ack: l.ack,
                sockets,
            });
        }
        Ok(Listeners { groups })
    }

    /// Duplicates of shard `shard`'s sockets, one per listener, for that shard to own.
    pub fn for_shard(&self, shard: u32) -> io::Result<Vec<ShardSocket>> {
        self.groups
            .iter()
            .enumerate()
            .map(|(i, g)| {
                Ok(ShardSocket {
                    listener: i,
                    kind: g.kind,
                    address: g.address,
                    allow: g.allow.clone(),
                    ack: g.ack,
                    fd: g.sockets[shard as usize].as_fd().try_clone_to_owned()?,
                })
            })
            .collect()
    }
}

/// Fail if anything is bound to `addr` already. Why: SO_REUSEPORT would let this process join
/// another process's group on the same port (a second instance started by mistake, same user)
/// and silently take a share of its traffic.
fn probe_unshared(kind: Transport, addr: SocketAddr) -> io::Result<()> {
    let domain = Domain::for_address(addr);
    let s = match kind {
        Transport::Udp => Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?,
        Transport::Tcp => Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?,
    };
    if kind == Transport::Tcp {
        // Connections of a previous run in TIME_WAIT must not count as "in use".
        s.set_reuse_address(true)?;
    }
    s.bind(&SockAddr::from(addr)).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            io::Error::new(
                e.kind(),
                "address already in use (another process, perhaps a second sessionizer, is bound to it)",
            )
        } else {
            e
        }
    })
}

pub(crate) fn bind_one(kind: Transport, addr: SocketAddr) -> io::Result<Socket> {
    let domain = Domain::for_address(addr);
    let s = match kind {
        Transport::Udp => Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?,
        Transport::Tcp => Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?,
    };
    s.set_reuse_port(true)?;
    if kind == Transport::Tcp {
        s.set_reuse_address(true)?;
    }
    s.set_nonblocking(true)?;
    s.set_cloexec(true)?;
    if kind == Transport::Udp {
        // Best effort: the kernel clamps to net.core.rmem_max.
        let _ = s.set_recv_buffer_size(UDP_RCVBUF_BYTES);
        // The drop counter, and each datagram's kernel receive time (the latency metric
        // counts the time a datagram waited in the socket).
        for (option, name) in [
            (SO_RXQ_OVFL, "SO_RXQ_OVFL"),
            (libc::SO_TIMESTAMPNS, "SO_TIMESTAMPNS"),
        ] {
            let one: libc::c_int = 1;
            // SAFETY: a valid socket fd and a c_int option value that outlives the call.
            let rc = unsafe {
                libc::setsockopt(
                    std::os::fd::AsRawFd::as_raw_fd(&s),
                    libc::SOL_SOCKET,
                    option,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            if rc != 0 {
                log::debug!("{name} not available: {}", io::Error::last_os_error());
            }
        }
    }
    s.bind(&SockAddr::from(addr))?;
    if kind == Transport::Tcp {
        s.listen(TCP_BACKLOG)?;
    }
    Ok(s)
}
