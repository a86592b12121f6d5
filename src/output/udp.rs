//! The `udp` sink: forwards records as datagrams from an unconnected socket bound to `0.0.0.0:0`
//! (or `[::]:0` for an IPv6 destination) to the output's `address`.
//!
//! Each batch is cut into datagrams of consecutive whole lines (newlines included) of at most
//! [`UDP_DATAGRAM_BYTES`]; a record longer than that is sent alone, up to
//! [`UDP_RECORD_BYTES_MAX`]; a longer one is dropped and counted. Datagrams are slices of the batch
//! (no copy). A datagram the kernel refuses (send error) drops and counts its records; the error
//! is logged, rate-limited. Delivery is UDP's: the receiver may lose datagrams uncounted here.
//! A full socket send buffer makes the send block, the queue fills, and `when_full` applies.

use super::{Batch, Counters, RateLimit, Sink, UDP_DATAGRAM_BYTES, UDP_RECORD_BYTES_MAX};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

pub(crate) struct UdpSink {
    socket: UdpSocket,
    dest: SocketAddr,
    errors: RateLimit,
}

impl UdpSink {
    pub(crate) fn open(dest: SocketAddr) -> io::Result<UdpSink> {
        let any: SocketAddr = match dest {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        Ok(UdpSink {
            socket: UdpSocket::bind(any)?,
            dest,
            errors: RateLimit::default(),
        })
    }

    /// Send one datagram of `records` records; count it as written or dropped.
    fn send(&mut self, datagram: &[u8], records: u64, sent: &mut (u64, u64), counters: &Counters) {
        debug_assert!(datagram.len() <= UDP_RECORD_BYTES_MAX);
        loop {
            match self.socket.send_to(datagram, self.dest) {
                Ok(_) => {
                    sent.0 += records;
                    sent.1 += datagram.len() as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    counters.dropped(records);
                    if let Some(n) = self.errors.ready() {
                        log::warn!(
                            "output udp:{}: cannot send {} bytes: {e} ({n} similar errors suppressed)",
                            self.dest,
                            datagram.len()
                        );
                    }
                }
            }
            return;
        }
    }
}

impl Sink for UdpSink {
    fn write(&mut self, batch: &Batch, counters: &Counters) {
        let buf = &batch.buf[..];
        let mut sent = (0u64, 0u64);
        let mut too_long = 0u64;
        // The datagram being packed is buf[start..pos], holding `lines` whole lines.
        let (mut start, mut pos, mut lines) = (0usize, 0usize, 0u64);
        while pos < buf.len() {
            let end = memchr::memchr(b'\n', &buf[pos..]).map_or(buf.len(), |nl| pos + nl + 1);
            if end - start > UDP_DATAGRAM_BYTES && lines > 0 {
                self.send(&buf[start..pos], lines, &mut sent, counters);
                (start, lines) = (pos, 0);
            }
            if end - start > UDP_DATAGRAM_BYTES {
                // One line, alone, longer than a packed datagram.
                debug_assert!(start == pos && lines == 0);
                if end - pos <= UDP_RECORD_BYTES_MAX {
                    self.send(&buf[pos..end], 1, &mut sent, counters);
                } else {
                    too_long += 1;
                }
                start = end;
            } else {
                lines += 1;
            }
            pos = end;
        }
        if lines > 0 {
            self.send(&buf[start..pos], lines, &mut sent, counters);
        }
        if too_long > 0 {
            counters.dropped(too_long);
            if let Some(n) = self.errors.ready() {
                log::warn!(
                    "output udp:{}: {too_long} records longer than {UDP_RECORD_BYTES_MAX} bytes dropped ({n} similar messages suppressed)",
                    self.dest
                );
            }
        }
        counters.written(sent.0, sent.1);
    }

    fn tick(&mut self, _now: Instant, _queue_empty: bool, _counters: &Counters) {}

    fn wait(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn finish(&mut self, _deadline: Instant, _counters: &Counters) {}
}
