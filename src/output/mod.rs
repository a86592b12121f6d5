//! CONTRACT SKELETON written by the lead: the runtime is being coded against exactly this API.
//! The outputs engineer replaces the bodies and this header, keeping names and signatures:
//!
//! use sessionizer::output::{Outputs, ShardOutput, OutputStats};
//! impl Outputs {
//!     /// Opens/creates file directories, binds every tcp output listener (port 0 allowed: report the bound address),
//!     /// starts one std thread per sink (plus an acceptor per tcp sink). Returns the hub and one ShardOutput per shard.
//!     pub fn start(cfg: &sessionizer::config::Config, shards: usize) -> std::io::Result<(Outputs, Vec<ShardOutput>)>;
//!     /// What each output is bound to, in config order: ("tcp", "127.0.0.1:40123"), ("file", "/path"), ("udp", "127.0.0.1:9"), ("stdout", "-").
//!     pub fn bound(&self) -> Vec<(&'static str, String)>;
//!     /// Per-sink counters (records written, records dropped, bytes, queue depth, consumers) for metrics.
//!     pub fn stats(&self) -> Vec<OutputStats>;
//!     /// Drain every queue, flush and fsync files, close consumers; bounded by `timeout`.
//!     pub fn shutdown(self, timeout: std::time::Duration);
//! }
//! // ShardOutput is Send (moved into its shard's executor thread), used only by that shard.
//! impl ShardOutput {
//!     /// Copy each record of `out` into the pending batch of every sink subscribed to its stream. Never blocks.
//!     /// Full batches are handed to the sink thread through a bounded queue (recycled buffers).
//!     pub fn deliver(&mut self, out: &sessionizer::engine::Out);
//!     /// Hand partial batches over (call after each processing round / at least every millisecond).
//!     /// Returns false if a sink with when_full = "block" has no room yet: the caller must stop taking input,
//!     /// yield/sleep briefly, and call flush again until it returns true. Sinks with when_full = "drop" drop
//!     /// (and count) the batch instead and never make flush return false.
//!     pub fn flush(&mut self) -> bool;
//!     /// True when nothing is pending in this shard's batches.
//!     pub fn is_idle(&self) -> bool;
//! }

use crate::config::Config;
use crate::engine::Out;
use std::time::Duration;

pub struct Outputs {}
pub struct ShardOutput {}

#[derive(Debug, Clone, Default)]
pub struct OutputStats {
    pub name: String,
    pub kind: &'static str,
    pub records: u64,
    pub bytes: u64,
    pub dropped: u64,
    pub queue_depth: u64,
    pub consumers: u64,
}

impl Outputs {
    pub fn start(_cfg: &Config, _shards: usize) -> std::io::Result<(Outputs, Vec<ShardOutput>)> {
        todo!("outputs engineer")
    }
    pub fn bound(&self) -> Vec<(&'static str, String)> {
        todo!("outputs engineer")
    }
    pub fn stats(&self) -> Vec<OutputStats> {
        todo!("outputs engineer")
    }
    pub fn shutdown(self, _timeout: Duration) {
        todo!("outputs engineer")
    }
}

impl ShardOutput {
    pub fn deliver(&mut self, _out: &Out) {
        todo!("outputs engineer")
    }
    pub fn flush(&mut self) -> bool {
        todo!("outputs engineer")
    }
    pub fn is_idle(&self) -> bool {
        todo!("outputs engineer")
    }
}
