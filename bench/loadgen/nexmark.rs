//! Nexmark q11-style bids: "how many bids did a user make in each session they were active",
//! with a 10 s session gap keyed by `bidder`.
//!
//! Bids are `{"bidder":<id>,"auction":<id>,"price":<cents>,"date_time":<epoch ms>,
//! "sent_ns":<monotonic ns>,"extra":"…"}`. Bidders are the keys of the same bursty-session
//! scheduler as the clickstream (see `traffic.rs`); the defaults keep every in-session gap below
//! the 10 s session gap (exponential mean 500 ms, capped at 10 × the mean) and every pause above
//! it (12 s). Auctions open at a steady rate of model time; half the bids go to the 100 newest
//! ("hot") auctions, the rest to the last 10,000. Prices follow Nexmark's generator:
//! `round(10^(6u) × 100)` cents for a uniform `u`.
//!
//! The steering key of a bid is the bidder number's decimal text (e.g. `42`), the unescaped
//! bytes of the `bidder` member as the appliance sees them.

use crate::traffic::{self, Pick, Rng};
use crate::wire;

/// The q11 session gap the appliance profile is expected to use.
pub const SESSION_GAP_MS: u64 = 10_000;
/// Defaults that respect the session gap.
pub const GAP_MEAN_MS_DEFAULT: u64 = 500;
pub const PAUSE_MS_DEFAULT: u64 = 12_000;
pub const BURST_MEAN_DEFAULT: f64 = 20.0;
pub const BIDDERS_DEFAULT: u64 = 200_000;

// The defaults keep sessions apart: the longest in-session gap stays under the session gap and
// every pause exceeds it.
const _: () = assert!(GAP_MEAN_MS_DEFAULT * traffic::GAP_CAP_FACTOR < SESSION_GAP_MS);
const _: () = assert!(PAUSE_MS_DEFAULT > SESSION_GAP_MS);

const FIRST_AUCTION_ID: u64 = 1000;
const HOT_AUCTIONS: u64 = 100;
const OPEN_AUCTIONS: u64 = 10_000;

#[derive(Clone, Debug, serde::Serialize)]
pub struct BidParams {
    pub payload_bytes: usize,
    /// New auctions per second of model time.
    pub auctions_per_s: u64,
}

/// Writes bid events.
pub struct BidEncoder {
    params: BidParams,
}

impl BidEncoder {
    pub fn new(params: BidParams) -> BidEncoder {
        assert!(params.payload_bytes <= traffic::PAYLOAD_BYTES_MAX);
        BidEncoder { params }
    }

    /// Appends one bid for `pick` at model time `model_ns` to `out`; returns the steering hash.
    pub fn encode(
        &self,
        out: &mut Vec<u8>,
        pick: Pick,
        model_ns: u64,
        ts_ms: u64,
        sent_ns: Option<u64>,
        rng: &mut Rng,
    ) -> u32 {
        let start = out.len();
        let mut digits = [0u8; wire::U64_DIGITS_MAX];
        let bidder = wire::format_u64(pick.key, &mut digits);
        let hash = wire::fnv1a32(bidder);
        out.extend_from_slice(b"{\"bidder\":");
        out.extend_from_slice(bidder);
        let opened = (u128::from(model_ns) * u128::from(self.params.auctions_per_s) / 1_000_000_000)
            as u64
            + 1;
        let window = if rng.below(2) == 0 {
            HOT_AUCTIONS
        } else {
            OPEN_AUCTIONS
        };
        let auction = FIRST_AUCTION_ID + opened - 1 - rng.below(window.min(opened));
        out.extend_from_slice(b",\"auction\":");
        wire::write_u64(out, auction);
        out.extend_from_slice(b",\"price\":");
        wire::write_u64(out, (10f64.powf(rng.unit() * 6.0) * 100.0).round() as u64);
        out.extend_from_slice(b",\"date_time\":");
        wire::write_u64(out, ts_ms);
        if let Some(sent_ns) = sent_ns {
            out.extend_from_slice(b",\"sent_ns\":");
            wire::write_u64(out, sent_ns);
        }
        traffic::write_padding(out, start, b"extra", self.params.payload_bytes);
        hash
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traffic::{Encoder, Generator, SessionModel};

    #[test]
    fn bids_are_json_keyed_by_bidder() {
        let model = SessionModel {
            gap_mean_ns: GAP_MEAN_MS_DEFAULT * 1_000_000,
            pause_ns: PAUSE_MS_DEFAULT * 1_000_000,
            burst_mean: BURST_MEAN_DEFAULT,
        };
        let encoder = Encoder::Bid(BidEncoder::new(BidParams {
            payload_bytes: 120,
            auctions_per_s: 100,
        }));
        let mut generator = Generator::new(model, 5_000, encoder, 1, 0, 1);
        let mut out = Vec::new();
        for i in 0..5_000u64 {
            out.clear();
            let emitted = generator.next(i * 1_000_000, 1_732_500_000_000 + i, Some(i), &mut out);
            assert_eq!(out.len(), 120);
            let bid: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
            let bidder = bid["bidder"].as_u64().expect("bidder");
            assert_eq!(emitted.hash, wire::fnv1a32(bidder.to_string().as_bytes()));
            assert!(bid["auction"].as_u64().unwrap() >= FIRST_AUCTION_ID);
            assert!(bid["price"].as_u64().unwrap() >= 100);
            assert_eq!(bid["date_time"].as_u64(), Some(1_732_500_000_000 + i));
        }
    }
}
