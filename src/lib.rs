//! sessionizer: a thread-per-core appliance that turns raw event streams into sessions.
//!
//! `engine` is the pure core (no sockets, threads or wall clock); `decode` extracts the fields
//! the rules need from a JSON line without building a tree; everything else wires them to the
//! network, the disk and the operator.

pub mod config;
pub mod decode;
pub mod engine;
pub mod ingest;
pub mod metrics;
pub mod netfilter;
pub mod notify;
pub mod output;
pub mod persist;
pub mod replay;
pub mod runtime;
