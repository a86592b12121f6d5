//! Session ids: 64 bits, `node_id` (16) | shard (6) | sequence (42), printed as 16 hex digits.
//!
//! The sequence is strictly increasing per shard. Live, it never falls behind eight ticks per
//! millisecond since 2025-01-01, so a restarted shard (which may have lost its in-memory
//! sequence) cannot reissue an id unless it previously ran more than `downtime` ahead of the
//! clock; snapshots carry the sequence across restarts to close that gap. In replay there is no
//! wall clock and the sequence starts at 1, so the same input yields the same ids.

use super::Clock;

/// 2025-01-01T00:00:00Z in epoch milliseconds.
const EPOCH_MS: i64 = 1_735_689_600_000;
const SEQ_BITS: u32 = 42;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
const TICKS_PER_MS: u64 = 8;

#[derive(Debug, Clone)]
pub struct IdGen {
    prefix: u64,
    seq: u64,
}

impl IdGen {
    pub fn new(node_id: u16, shard: u8) -> IdGen {
        assert!(shard < 64, "shard ids occupy 6 bits");
        IdGen {
            prefix: (u64::from(node_id) << 48) | (u64::from(shard) << SEQ_BITS),
            seq: 0,
        }
    }

    pub fn next(&mut self, clock: Clock) -> u64 {
        let floor = match clock {
            Clock::Wall(now_ms) => {
                (now_ms.saturating_sub(EPOCH_MS).max(0) as u64).saturating_mul(TICKS_PER_MS)
            }
            Clock::Replay => 0,
        };
        self.seq = (self.seq + 1).max(floor) & SEQ_MASK;
        self.prefix | self.seq
    }

    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// Resume after recovery: never reissue a sequence at or below `seq`.
    pub fn resume_after(&mut self, seq: u64) {
        self.seq = self.seq.max(seq & SEQ_MASK);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_carry_node_and_shard_and_increase() {
        let mut g = IdGen::new(0xabcd, 5);
        let a = g.next(Clock::Replay);
        let b = g.next(Clock::Replay);
        assert_eq!(a >> 48, 0xabcd);
        assert_eq!((a >> 42) & 63, 5);
        assert_eq!(a & SEQ_MASK, 1);
        assert!(b > a);
        let live = g.next(Clock::Wall(EPOCH_MS + 1000));
        assert_eq!(live & SEQ_MASK, 8000);
        assert!(g.next(Clock::Wall(EPOCH_MS + 1000)) > live);
        // A clock far beyond the sequence's range keeps node and shard (it once overflowed).
        let far = IdGen::new(0xabcd, 5).next(Clock::Wall(i64::MAX));
        assert_eq!((far >> 48, (far >> 42) & 63), (0xabcd, 5));
    }
}
