//! Kernel steering of UDP datagrams to the shard that owns their session.
//!
//! # The steering header
//!
//! A client that knows the session key of the events in a datagram may prefix the datagram with
//! an 8-byte header:
//!
//! ```text
//! offset 0: 4 bytes  magic  b"SZH1" (0x53 0x5A 0x48 0x31)
//! offset 4: 4 bytes  hash   big-endian u32 = fnv1a32(session key bytes)
//! offset 8: payload  one or more '\n'-separated JSON events, all of that key
//! ```
//!
//! `fnv1a32` is 32-bit FNV-1a (offset basis 0x811c9dc5, prime 0x01000193) over the key's bytes as
//! the engine sees them: a string key's unescaped UTF-8 text, a number's literal text, or
//! `true`/`false` (see docs/semantics.md). The owning shard is `hash % shards`, exactly the
//! engine's `route`, so a correctly steered event never needs a cross-core hand-off. The header is
//! stripped before parsing; a datagram without it is accepted as well (the kernel then picks a
//! socket by its 4-tuple hash and the runtime hands events to their owners).
//!
//! # The program
//!
//! One classic BPF program is attached with `SO_ATTACH_REUSEPORT_CBPF` to each UDP reuseport
//! group (one socket per shard, bound in shard order, so socket index = shard id):
//!
//! ```text
//! A = len;              if A < 8        return shards   // too short: kernel hash
//! A = word[0];          if A != "SZH1"  return shards   // no header: kernel hash
//! A = word[4]; A %= shards; return A                    // the owner's socket index
//! ```
//!
//! The length is checked first because an out-of-bounds load makes a classic program return 0,
//! which would send every short datagram to socket 0; an index >= group size falls back to the
//! kernel's hash. Word loads are big-endian, hence the big-endian hash. Offset 0 is the first byte
//! of the UDP payload.

use std::io;
use std::os::fd::AsRawFd;

/// `b"SZH1"` as a big-endian word.
pub const MAGIC: [u8; 4] = *b"SZH1";
pub const HEADER_BYTES: usize = 8;

/// `SO_ATTACH_REUSEPORT_CBPF` from `<asm-generic/socket.h>` (same value on every architecture
/// this runs on; not exported by every libc version).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

// Classic BPF opcodes (`<linux/filter.h>`).
const BPF_LD: u16 = 0x00;
const BPF_ALU: u16 = 0x04;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_W: u16 = 0x00;
const BPF_ABS: u16 = 0x20;
const BPF_LEN: u16 = 0x80;
const BPF_JGE: u16 = 0x30;
const BPF_JEQ: u16 = 0x10;
const BPF_MOD: u16 = 0x90;
const BPF_K: u16 = 0x00;
const BPF_A: u16 = 0x10;

fn op(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The steering program for a group of `shards` sockets.
pub fn program(shards: u32) -> Vec<libc::sock_filter> {
    assert!(shards >= 1);
    let magic = u32::from_be_bytes(MAGIC);
    vec![
        /* 0 */ op(BPF_LD | BPF_W | BPF_LEN, 0, 0, 0),
        /* 1 */ op(BPF_JMP | BPF_JGE | BPF_K, 1, 0, HEADER_BYTES as u32),
        /* 2 */ op(BPF_RET | BPF_K, 0, 0, shards),
        /* 3 */ op(BPF_LD | BPF_W | BPF_ABS, 0, 0, 0),
        /* 4 */ op(BPF_JMP | BPF_JEQ | BPF_K, 1, 0, magic),
        /* 5 */ op(BPF_RET | BPF_K, 0, 0, shards),
        /* 6 */ op(BPF_LD | BPF_W | BPF_ABS, 0, 0, 4),
        /* 7 */ op(BPF_ALU | BPF_MOD | BPF_K, 0, 0, shards),
        /* 8 */ op(BPF_RET | BPF_A, 0, 0, 0),
    ]
}

/// Attach the steering program to a reuseport group through any one member.
pub fn attach(member: &impl AsRawFd, shards: u32) -> io::Result<()> {
    let mut prog = program(shards);
    let fprog = libc::sock_fprog {
        len: prog.len() as libc::c_ushort,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: `fprog` points at `prog`, which outlives the call; the kernel copies the program
    // and validates it; the fd is a live socket owned by the caller.
    let rc = unsafe {
        libc::setsockopt(
            member.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Splits an optional steering header off a datagram: `(Some(hash), payload)` or
/// `(None, datagram)`.
#[inline]
pub fn strip_header(datagram: &[u8]) -> (Option<u32>, &[u8]) {
    match datagram {
        [a, b, c, d, h0, h1, h2, h3, rest @ ..] if [*a, *b, *c, *d] == MAGIC => {
            (Some(u32::from_be_bytes([*h0, *h1, *h2, *h3])), rest)
        }
        _ => (None, datagram),
    }
}

/// The header a client prepends for events of `key` (used by tests and the load generator).
pub fn header_for_key(key: &[u8]) -> [u8; HEADER_BYTES] {
    let h = crate::engine::fnv1a32(key).to_be_bytes();
    let mut out = [0u8; HEADER_BYTES];
    out[..4].copy_from_slice(&MAGIC);
    out[4..].copy_from_slice(&h);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny interpreter for the subset of classic BPF the program uses, to check its logic
    /// without a kernel (the kernel path is covered by tests/appliance.rs).
    fn run(prog: &[libc::sock_filter], pkt: &[u8]) -> u32 {
        let mut a: u32 = 0;
        let mut pc = 0usize;
        loop {
            let i = prog[pc];
            pc += 1;
            match i.code {
                c if c == BPF_LD | BPF_W | BPF_LEN => a = pkt.len() as u32,
                c if c == BPF_LD | BPF_W | BPF_ABS => {
                    let k = i.k as usize;
                    match pkt.get(k..k + 4) {
                        Some(w) => a = u32::from_be_bytes([w[0], w[1], w[2], w[3]]),
                        None => return 0,
                    }
                }
                c if c == BPF_JMP | BPF_JGE | BPF_K => {
                    pc += if a >= i.k { i.jt } else { i.jf } as usize
                }
                c if c == BPF_JMP | BPF_JEQ | BPF_K => {
                    pc += if a == i.k { i.jt } else { i.jf } as usize
                }
                c if c == BPF_ALU | BPF_MOD | BPF_K => a %= i.k,
                c if c == BPF_RET | BPF_K => return i.k,
                c if c == BPF_RET | BPF_A => return a,
                other => panic!("opcode {other:#x} not interpreted"),
            }
        }
    }

    #[test]
    fn program_picks_owner_or_falls_back() {
        for shards in [1u32, 2, 3, 7] {
            let p = program(shards);
            for key in [&b"alice"[..], b"bob", b"42", b""] {
                let mut d = header_for_key(key).to_vec();
                d.extend_from_slice(b"{\"user\":\"x\"}");
                assert_eq!(run(&p, &d), crate::engine::fnv1a32(key) % shards);
                assert_eq!(run(&p, &d[..8]), crate::engine::fnv1a32(key) % shards);
            }
            assert_eq!(run(&p, b"{\"user\":\"alice\"}"), shards);
            assert_eq!(run(&p, b"SZH1abc"), shards, "short datagram");
            assert_eq!(run(&p, b""), shards);
        }
    }

    #[test]
    fn strip_header_only_strips_the_magic() {
        let h = header_for_key(b"k");
        let mut d = h.to_vec();
        d.extend_from_slice(b"{}");
        assert_eq!(
            strip_header(&d),
            (Some(crate::engine::fnv1a32(b"k")), &b"{}"[..])
        );
        assert_eq!(strip_header(b"{}"), (None, &b"{}"[..]));
        assert_eq!(strip_header(b"SZH1abc"), (None, &b"SZH1abc"[..]));
    }
}
