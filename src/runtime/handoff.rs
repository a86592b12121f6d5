//! Cross-core hand-off of events to the shard that owns their session key.
//!
//! Per (from, to) shard pair there is one bounded data queue of [`Batch`]es and one return queue
//! that brings the emptied buffers back, so after warm-up no batch is allocated: a pair owns at
//! most `limits.handoff_queue_batches + 2` buffers of `limits.handoff_batch_bytes`, created on
//! first need. A batch holds whole event lines (each ending in '\n'), at most
//! `limits.handoff_batch_events` of them; it is queued when full and at the end of every receive
//! round.
//!
//! Queues. The data queue is a glommio `shared_channel` (bounded SPSC ring; a send to a full
//! queue parks the sending task until the receiver makes room, and a receive on an empty queue
//! parks the receiving executor until the sender pushes, with a cross-core wake-up through the
//! receiver's eventfd). The return queue is a `crossbeam_channel::bounded` polled with `try_recv`
//! from the synchronous data path: nobody ever waits on it except a sender whose every buffer is
//! in flight, which is backpressure, not the steady state, and then backs off in 100 µs steps.
//!
//! Measured on this 2-core VM (shared with other builds, so noisy), 256 events of 150 B per
//! batch, producer on CPU 0 filling each batch, consumer on CPU 1 reading every byte
//! (`handoff_channel_throughput` below; `HANDOFF_BATCHES=40000 cargo test --release --lib
//! handoff_channel_throughput -- --nocapture`), three runs on 2026-11-25: glommio `shared_channel` 12.6 / 3.7 /
//! 4.3 M events/s, crossbeam bounded array queue polled every 50 µs 14.1 / 3.4 / 4.0 M events/s.
//! Both are bound by copying the bytes, far above one shard's ~1 M events/s of decoding and
//! sessionizing, so throughput does not decide. Wake-ups do: the polled queue costs an idle
//! core 20 000 timer wake-ups a second and adds up to the poll period of latency to every
//! batch, while the shared channel sleeps until a batch arrives. Hence the shared channel.
//!
//! Ordering. Batches to one peer are queued and sent in FIFO order under a per-peer send lock,
//! so events of one key from one connection reach the owner in the order they arrived.

use std::collections::VecDeque;

/// One hand-off batch: event lines, each terminated by '\n'.
pub struct Batch {
    pub buf: Vec<u8>,
    pub events: u32,
}

impl Batch {
    fn with_capacity(bytes: usize) -> Batch {
        Batch {
            buf: Vec::with_capacity(bytes),
            events: 0,
        }
    }

    pub fn clear(&mut self) {
        self.buf.clear();
        self.events = 0;
    }
}

/// The sender's side of one peer.
struct Dest {
    /// The batch being filled.
    cur: Option<Batch>,
    /// Empty buffers ready for reuse.
    free: Vec<Batch>,
    /// Filled batches waiting for the send lock, oldest first.
    ready: VecDeque<Batch>,
    /// Buffers created so far for this pair (at most `pool_max`).
    created: u32,
    /// Emptied buffers coming back from the peer.
    returns: Option<crossbeam_channel::Receiver<Batch>>,
}

/// All outgoing hand-off state of one shard. Lives inside the shard's `RefCell`; the async send
/// side (`runtime::shard::send_ready`) pops from `ready` and never holds a borrow across an await.
pub struct HandoffOut {
    me: u32,
    dests: Vec<Dest>,
    batch_events_max: u32,
    batch_bytes_max: usize,
    pool_max: u32,
    /// Bit per peer with a non-empty `ready` queue.
    pub ready_mask: u64,
}

impl HandoffOut {
    pub fn new(
        me: u32,
        returns: Vec<Option<crossbeam_channel::Receiver<Batch>>>,
        batch_events_max: u32,
        batch_bytes_max: usize,
        queue_batches: u32,
    ) -> HandoffOut {
        assert!(returns.len() <= 64, "a shard mask is a u64");
        assert!(batch_events_max >= 1 && batch_bytes_max >= 1 && queue_batches >= 1);
        let pool_max = queue_batches + 2;
        let dests = returns
            .into_iter()
            .map(|r| Dest {
                cur: None,
                free: Vec::with_capacity(pool_max as usize),
                ready: VecDeque::with_capacity(pool_max as usize),
                created: 0,
                returns: r,
            })
            .collect();
        HandoffOut {
            me,
            dests,
            batch_events_max,
            batch_bytes_max,
            pool_max,
            ready_mask: 0,
        }
    }

    pub fn pool_max(&self) -> u32 {
        self.pool_max
    }

    /// Batches filled for peers and not back yet (waiting for the send lock, in a queue, or
    /// being processed by the peer), summed over peers: the `handoff_queue_batches` gauge.
    /// Buffers returned but not yet collected count as back.
    pub fn in_flight(&self) -> u32 {
        let mut n = 0;
        for d in &self.dests {
            let at_hand = d.free.len()
                + usize::from(d.cur.is_some())
                + d.returns.as_ref().map_or(0, |r| r.len());
            debug_assert!(at_hand <= d.created as usize, "a buffer counted twice");
            n += (d.created as usize).saturating_sub(at_hand);
        }
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Make sure every peer in `mask` has a current batch with room for a `len`-byte line.
    /// False when some peer has every buffer in flight: the caller must send ready batches and
    /// retry (nothing was consumed).
    pub fn reserve(&mut self, mask: u64, len: usize) -> bool {
        let mut m = mask;
        while m != 0 {
            let o = m.trailing_zeros() as usize;
            m &= m - 1;
            debug_assert_ne!(o as u32, self.me);
            let d = &mut self.dests[o];
            if let Some(b) = &d.cur {
                if b.buf.len() + len <= self.batch_bytes_max {
                    continue;
                }
                let full = d.cur.take().expect("checked above");
                d.ready.push_back(full);
                self.ready_mask |= 1 << o;
            }
            let fresh = match d.free.pop() {
                Some(b) => Some(b),
                None => match d.returns.as_ref().and_then(|r| r.try_recv().ok()) {
                    Some(mut b) => {
                        b.clear();
                        Some(b)
                    }
                    None if d.created < self.pool_max => {
                        d.created += 1;
                        Some(Batch::with_capacity(self.batch_bytes_max))
                    }
                    None => None,
                },
            };
            match fresh {
                Some(b) => d.cur = Some(b),
                None => return false,
            }
        }
        true
    }

    /// Append one event line to peer `o`'s current batch (after a successful `reserve`).
    pub fn push(&mut self, o: u32, line: &[u8]) {
        let d = &mut self.dests[o as usize];
        let b = d.cur.as_mut().expect("reserve() before push()");
        debug_assert!(b.buf.len() + line.len() < self.batch_bytes_max);
        b.buf.extend_from_slice(line);
        b.buf.push(b'\n');
        b.events += 1;
        if b.events >= self.batch_events_max {
            let full = d.cur.take().expect("present");
            d.ready.push_back(full);
            self.ready_mask |= 1 << o;
        }
    }

    /// End of a receive round: queue every partly filled batch.
    pub fn seal_all(&mut self) {
        for (o, d) in self.dests.iter_mut().enumerate() {
            if d.cur.as_ref().is_some_and(|b| b.events > 0) {
                let b = d.cur.take().expect("present");
                d.ready.push_back(b);
                self.ready_mask |= 1 << o;
            }
        }
    }

    pub fn pop_ready(&mut self, o: u32) -> Option<Batch> {
        let d = &mut self.dests[o as usize];
        let b = d.ready.pop_front();
        if d.ready.is_empty() {
            self.ready_mask &= !(1u64 << o);
        }
        b
    }

    /// True when nothing is waiting to be sent (current batches may hold events).
    pub fn nothing_ready(&self) -> bool {
        self.ready_mask == 0
    }

    /// Pull returned buffers into the free lists (lets a stalled sender see them).
    pub fn collect_returns(&mut self) -> bool {
        let mut any = false;
        for d in &mut self.dests {
            if let Some(r) = &d.returns {
                while let Ok(mut b) = r.try_recv() {
                    b.clear();
                    d.free.push(b);
                    any = true;
                }
            }
        }
        any
    }
}

/// Lines of a batch.
pub fn batch_lines(b: &Batch) -> impl Iterator<Item = &[u8]> + '_ {
    let buf = &b.buf[..];
    let mut pos = 0;
    std::iter::from_fn(move || {
        if pos >= buf.len() {
            return None;
        }
        let end = memchr::memchr(b'\n', &buf[pos..]).map_or(buf.len(), |i| pos + i);
        let line = &buf[pos..end];
        pos = end + 1;
        Some(line)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `handoff_queue_batches` gauge: a batch counts from the moment it is filled until the
    /// peer's emptied buffer is back, whether or not it has been collected.
    #[test]
    fn in_flight_counts_batches_until_they_come_back() {
        let (ret_tx, ret_rx) = crossbeam_channel::bounded::<Batch>(4);
        let mut h = HandoffOut::new(0, vec![None, Some(ret_rx)], 2, 1024, 2);
        assert_eq!(h.in_flight(), 0);
        assert!(h.reserve(0b10, 10));
        h.push(1, b"a");
        assert_eq!(h.in_flight(), 0, "a batch being filled is at hand");
        h.push(1, b"b");
        assert_eq!(h.in_flight(), 1, "full, waiting to be sent");
        let sent = h.pop_ready(1).expect("ready");
        assert_eq!(h.in_flight(), 1, "in the queue or at the peer");
        assert!(h.reserve(0b10, 10));
        h.push(1, b"c");
        h.seal_all();
        assert_eq!(h.in_flight(), 2);
        ret_tx.send(sent).unwrap();
        assert_eq!(h.in_flight(), 1, "returned, not yet collected");
        assert!(h.collect_returns());
        assert_eq!(h.in_flight(), 1);
    }

    /// Throughput of the two queue designs considered, 256 events of 150 B per batch, producer
    /// on CPU 0, consumer on CPU 1 touching every byte, recycled buffers in both:
    /// `HANDOFF_BATCHES=40000 cargo test --release --lib handoff_channel_throughput -- --nocapture`.
    #[test]
    fn handoff_channel_throughput() {
        use glommio::channels::shared_channel;
        use glommio::{LocalExecutorBuilder, Placement};
        use std::time::{Duration, Instant};
        // Small in CI; the recorded figures used 40 000 (HANDOFF_BATCHES).
        let batches: usize = std::env::var("HANDOFF_batches")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2_000);
        const EVENTS: usize = 256;
        const QUEUE: usize = 64;
        const LINE: [u8; 149] = [b'x'; 149];
        fn fill(b: &mut Batch) {
            b.clear();
            for _ in 0..EVENTS {
                b.buf.extend_from_slice(&LINE);
                b.buf.push(b'\n');
            }
            b.events = EVENTS as u32;
        }
        fn touch(b: &Batch) -> u64 {
            b.buf.iter().map(|&x| u64::from(x)).sum::<u64>()
        }
        let report = |name: &str, t: Duration| {
            let ev = (batches * EVENTS) as f64;
            eprintln!(
                "HANDOFF {name}: {:.1} M events/s ({:.0} k batches/s)",
                ev / t.as_secs_f64() / 1e6,
                batches as f64 / t.as_secs_f64() / 1e3
            );
        };

        // A: glommio shared_channel (parks and wakes across cores) + crossbeam return queue.
        let (tx, rx) = shared_channel::new_bounded::<Batch>(QUEUE);
        let (rtx, rrx) = crossbeam_channel::bounded::<Batch>(QUEUE + 2);
        let t0 = Instant::now();
        let p = LocalExecutorBuilder::new(Placement::Fixed(0))
            .spawn(move || async move {
                let tx = tx.connect().await;
                let mut made = 0;
                for _ in 0..batches {
                    let mut b = match rrx.try_recv() {
                        Ok(b) => b,
                        Err(_) if made < QUEUE + 2 => {
                            made += 1;
                            Batch::with_capacity(64 << 10)
                        }
                        Err(_) => loop {
                            if let Ok(b) = rrx.try_recv() {
                                break b;
                            }
                            glommio::timer::sleep(Duration::from_micros(100)).await;
                        },
                    };
                    fill(&mut b);
                    if tx.send(b).await.is_err() {
                        break;
                    }
                }
            })
            .unwrap();
        let c = LocalExecutorBuilder::new(Placement::Fixed(1))
            .spawn(move || async move {
                let rx = rx.connect().await;
                let mut sum = 0u64;
                while let Some(b) = rx.recv().await {
                    sum += touch(&b);
                    let _ = rtx.try_send(b);
                }
                sum
            })
            .unwrap();
        p.join().unwrap();
        assert!(c.join().unwrap() > 0);
        report("glommio shared_channel", t0.elapsed());

        // B: crossbeam bounded array queue, both sides polling with a 50 us timer when idle.
        let (tx, rx) = crossbeam_channel::bounded::<Batch>(QUEUE);
        let (rtx, rrx) = crossbeam_channel::bounded::<Batch>(QUEUE + 2);
        let t0 = Instant::now();
        let p = LocalExecutorBuilder::new(Placement::Fixed(0))
            .spawn(move || async move {
                let mut made = 0;
                for _ in 0..batches {
                    let mut b = loop {
                        if let Ok(b) = rrx.try_recv() {
                            break b;
                        }
                        if made < QUEUE + 2 {
                            made += 1;
                            break Batch::with_capacity(64 << 10);
                        }
                        glommio::timer::sleep(Duration::from_micros(50)).await;
                    };
                    fill(&mut b);
                    let mut item = b;
                    loop {
                        match tx.try_send(item) {
                            Ok(()) => break,
                            Err(e) => item = e.into_inner(),
                        }
                        glommio::timer::sleep(Duration::from_micros(50)).await;
                    }
                }
            })
            .unwrap();
        let c = LocalExecutorBuilder::new(Placement::Fixed(1))
            .spawn(move || async move {
                let mut sum = 0u64;
                let mut got = 0;
                while got < batches {
                    match rx.try_recv() {
                        Ok(b) => {
                            sum += touch(&b);
                            got += 1;
                            let _ = rtx.try_send(b);
                        }
                        Err(_) => glommio::timer::sleep(Duration::from_micros(50)).await,
                    }
                }
                sum
            })
            .unwrap();
        p.join().unwrap();
        assert!(c.join().unwrap() > 0);
        report("crossbeam array queue, 50us polling", t0.elapsed());
    }

    #[test]
    fn batches_fill_seal_and_recycle() {
        let (ret_tx, ret_rx) = crossbeam_channel::bounded(8);
        let mut h = HandoffOut::new(0, vec![None, Some(ret_rx)], 2, 64, 2);
        assert_eq!(h.pool_max(), 4);
        for i in 0..8 {
            assert!(h.reserve(0b10, 10), "event {i}");
            h.push(1, b"{\"a\":1}");
        }
        // 8 events, 2 per batch: 4 batches, all buffers used.
        assert!(!h.reserve(0b10, 10));
        let mut got = Vec::new();
        while let Some(b) = h.pop_ready(1) {
            assert_eq!(batch_lines(&b).count(), 2);
            got.push(b);
        }
        assert!(h.nothing_ready());
        for b in got {
            ret_tx.send(b).unwrap();
        }
        assert!(h.reserve(0b10, 10));
        h.push(1, b"{}");
        h.seal_all();
        let b = h.pop_ready(1).unwrap();
        assert_eq!(b.events, 1);
        assert_eq!(b.buf, b"{}\n");
    }

    #[test]
    fn a_batch_is_sealed_before_it_overflows_its_bytes() {
        let mut h = HandoffOut::new(1, vec![None, None], 100, 16, 4);
        assert!(h.reserve(1, 10));
        h.push(0, b"123456789");
        assert!(h.reserve(1, 10));
        assert!(
            !h.nothing_ready(),
            "the first batch was sealed to make room"
        );
        h.push(0, b"123456789");
        assert_eq!(h.pop_ready(0).unwrap().events, 1);
    }
}
