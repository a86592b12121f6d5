//! Acknowledged TCP ingest (`ack = true` on a TCP listener): the server tells the client, on the
//! same connection, how many of its lines are durable. Protocol (README, "Acknowledged ingest"):
//!
//! - The client may start with a hello line `{"hello":"<producer id>","seq":<n>}`: its lines are
//!   then numbered from `n` (1 for a new producer; after a reconnect, the last acknowledged number
//!   plus one). Without a hello, lines are numbered from 1 on this connection.
//! - Every non-empty line after the hello counts, including lines that are dead-lettered.
//! - The server writes `{"ack":<k>}\n` whenever its durable frontier moves: every line numbered
//!   at or below `k` is durable per `persist.fsync` and will survive a crash. Acks are
//!   cumulative; a client may read them at its own pace (unread ones are coalesced).
//! - A malformed hello gets `{"error":"<reason>"}\n` and the connection is closed.
//!
//! A client that resends everything after its last acknowledgement, under the same producer id,
//! loses nothing across a crash and changes no session twice: every shard skips a producer's lines
//! at or below the highest it applied (`persist::producer`).

use crate::config::Transport;
use crate::persist::producer;
use crate::runtime::shard::{run_lines, Ctx, ProducerCursor};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

/// Pending (mark, last line number) pairs per connection; when full, the newest replaces the last.
const PENDING_MAX: usize = 1024;
/// How often a connection with unacknowledged lines checks the durable frontier while idle.
pub const ACK_POLL: Duration = Duration::from_millis(2);

enum Hello {
    /// The first line has not arrived yet.
    Awaited,
    Anonymous,
    Producer(ProducerCursor),
}

pub struct Acks {
    hello: Hello,
    /// Anonymous connections: lines consumed so far.
    lines: u64,
    /// Number of the last line processed.
    last: u64,
    pending: VecDeque<(u64, u64)>,
    acked: u64,
    /// Ack bytes not yet written, and how many of them are.
    out: Vec<u8>,
    out_sent: usize,
}

impl Default for Acks {
    fn default() -> Self {
        Acks::new()
    }
}

impl Acks {
    pub fn new() -> Acks {
        Acks {
            hello: Hello::Awaited,
            lines: 0,
            last: 0,
            pending: VecDeque::with_capacity(PENDING_MAX),
            acked: 0,
            out: Vec::with_capacity(64),
            out_sent: 0,
        }
    }

    /// Lines not yet acknowledged (or an acknowledgement not yet written).
    pub fn waiting(&self) -> bool {
        !self.pending.is_empty() || self.out_sent < self.out.len()
    }

    /// Process complete lines from the connection. `Err(reason)`: a malformed hello; the caller
    /// writes it ([`Acks::error_line`]) and closes.
    pub async fn lines_in(&mut self, ctx: &Rc<Ctx>, data: &[u8], now: i64) -> Result<(), String> {
        let mut data = data;
        if matches!(self.hello, Hello::Awaited) {
            let end = memchr::memchr(b'\n', data).map_or(data.len(), |i| i + 1);
            let first = data[..end].trim_ascii_end();
            self.hello = match producer::parse_hello(first) {
                Some(Ok((id, next))) => {
                    data = &data[end..];
                    Hello::Producer(ProducerCursor {
                        id: id.into_bytes(),
                        next,
                    })
                }
                Some(Err(reason)) => return Err(reason),
                None => Hello::Anonymous,
            };
            if let Hello::Producer(c) = &self.hello {
                self.last = c.next - 1;
                self.acked = self.last;
            }
        }
        let cursor = match &mut self.hello {
            Hello::Producer(c) => Some(c),
            _ => None,
        };
        let p = run_lines(ctx, data, Transport::Tcp, now, cursor).await;
        self.lines += p.lines;
        self.last = match &self.hello {
            Hello::Producer(c) => c.next - 1,
            _ => self.lines,
        };
        Ok(())
    }

    /// A line too long to buffer was dead-lettered: it still has a number.
    pub fn skipped_line(&mut self) {
        match &mut self.hello {
            Hello::Producer(c) => {
                c.next += 1;
                self.last = c.next - 1;
            }
            Hello::Awaited => {
                self.hello = Hello::Anonymous;
                self.lines += 1;
                self.last = self.lines;
            }
            Hello::Anonymous => {
                self.lines += 1;
                self.last = self.lines;
            }
        }
    }

    /// After a round's output and hand-offs went out: remember what this connection's lines so
    /// far need before they count as durable. Waits while the shard has no mark free.
    pub async fn record(&mut self, ctx: &Rc<Ctx>) {
        let newest = self.pending.back().map_or(self.acked, |&(_, l)| l);
        if self.last <= newest {
            return;
        }
        let mark = loop {
            let got = {
                let mut st = ctx.st.borrow_mut();
                match st.durable.as_mut() {
                    Some(d) => {
                        let m = d.mark();
                        if m.is_none() {
                            d.commit();
                        }
                        m
                    }
                    // Config validation ties `ack` to `persist.dir`.
                    None => return,
                }
            };
            match got {
                Some(m) => break m,
                None => glommio::timer::sleep(Duration::from_millis(1)).await,
            }
        };
        if self.pending.len() == PENDING_MAX {
            self.pending.pop_back();
        }
        self.pending.push_back((mark, self.last));
    }

    /// Write an acknowledgement if the durable frontier moved (never blocks: what the socket
    /// does not take now is written on a later call). False if the connection is broken.
    pub fn flush(&mut self, ctx: &Rc<Ctx>, fd: i32) -> bool {
        if !self.pending.is_empty() {
            let durable = {
                let mut st = ctx.st.borrow_mut();
                st.durable.as_mut().map_or(0, |d| d.durable_mark())
            };
            let mut to = self.acked;
            while let Some(&(m, l)) = self.pending.front() {
                if m > durable {
                    break;
                }
                to = l;
                self.pending.pop_front();
            }
            if to > self.acked {
                self.acked = to;
                // Cumulative: a line not yet started is replaced by the newer one.
                let keep = if self.out_sent == 0 {
                    0
                } else {
                    memchr::memchr(b'\n', &self.out[self.out_sent - 1..])
                        .map_or(self.out.len(), |i| self.out_sent + i)
                };
                self.out.truncate(keep);
                self.out.extend_from_slice(b"{\"ack\":");
                self.out
                    .extend_from_slice(itoa::Buffer::new().format(to).as_bytes());
                self.out.extend_from_slice(b"}\n");
                ctx.st.borrow_mut().c.acks_sent += 1;
            }
        }
        while self.out_sent < self.out.len() {
            let rest = &self.out[self.out_sent..];
            // SAFETY: `rest` is a live buffer of `rest.len()` bytes; `fd` is the open connection.
            let n = unsafe {
                libc::send(
                    fd,
                    rest.as_ptr().cast(),
                    rest.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n > 0 {
                self.out_sent += n as usize;
                continue;
            }
            let e = std::io::Error::last_os_error();
            return matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            );
        }
        self.out.clear();
        self.out_sent = 0;
        true
    }

    /// The line sent before closing a connection whose hello was refused.
    pub fn error_line(reason: &str) -> Vec<u8> {
        let mut line = serde_json::json!({ "error": reason })
            .to_string()
            .into_bytes();
        line.push(b'\n');
        line
    }
}
