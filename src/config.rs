//! TOML configuration: parsing into typed structs, then validation into a `Config` whose every
//! limit is explicit and whose relations hold (timeouts fit the slot wheel, a sub-session's idle
//! timeout is no longer than its parent's, arena and block sizes agree).
//!
//! Unknown keys are rejected. Every validation error names the key, the value, the limit and the
//! likely fix, because an operator reads it at 3 a.m. from `check-config` or from the journal.

use serde::Deserialize;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// The embedded default: the same text as `conf/sessionizer.toml`.
pub const DEFAULT_TOML: &str = include_str!("../conf/sessionizer.toml");

/// The wheel cannot hold deadlines further out than this many one-second slots.
pub const SLOTS_MAX_LIMIT: u32 = 1 << 20;
/// Shard ids occupy 6 bits of a session id.
pub const SHARDS_MAX: usize = 64;
/// Upper bound on profiles (sub-session profiles included): the profile id is a `u8` in records.
pub const PROFILES_MAX: usize = 200;
/// Upper bound on distinct field paths all rules together may read.
pub const FIELDS_MAX: usize = 64;
/// The longest profile name (its characters are `[A-Za-z0-9_-]`).
pub const PROFILE_NAME_MAX: usize = 64;
/// A session's payload (key, counters, captured values, lists) is bounded by a `u16` length.
pub const RECORD_BYTES_MAX: usize = 60_000;

#[derive(Debug)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config key `{}`: {}", self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

fn err(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: key.into(),
        message: message.into(),
    }
}

/// A duration written as a human string (`"30m"`, `"1h 30m"`, `"250ms"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub fn as_ms(self) -> i64 {
        i64::try_from(self.0.as_millis()).unwrap_or(i64::MAX)
    }
}

/// The longest duration any key accepts (100 years): longer ones are typing mistakes, and they
/// would overflow the clock arithmetic that adds them to an instant.
pub const DURATION_MAX: Duration = Duration::from_secs(100 * 365 * 86_400);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let d = humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "`{s}` is not a duration ({e}); write e.g. \"30m\", \"1h\", \"250ms\""
            ))
        })?;
        if d > DURATION_MAX {
            return Err(serde::de::Error::custom(format!(
                "`{s}` is longer than the limit of 100 years; write e.g. \"30m\", \"1h\", \"7d\""
            )));
        }
        Ok(HumanDuration(d))
    }
}

/// The lowest non-zero `persist.snapshot_write_rate`, bytes a second.
pub const SNAPSHOT_WRITE_RATE_MIN: u64 = 1 << 20;

/// A byte size: an integer, or a string with a binary unit (`"256MiB"`, `"64KiB"`, `"4GiB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

/// A TOML value that is a count or a string with a unit (sizes, rates).
#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrText {
    Int(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match IntOrText::deserialize(d)? {
            IntOrText::Int(n) => Ok(ByteSize(n)),
            IntOrText::Text(s) => parse_byte_size(&s)
                .map(ByteSize)
                .map_err(serde::de::Error::custom),
        }
    }
}

pub fn parse_byte_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| {
        format!("`{s}` is not a byte size; write e.g. 65536, \"64KiB\", \"256MiB\"")
    })?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" | "K" | "KB" => 1 << 10,
        "MiB" | "M" | "MB" => 1 << 20,
        "GiB" | "G" | "GB" => 1 << 30,
        other => {
            return Err(format!(
                "`{s}`: unknown unit `{other}`; use B, KiB, MiB or GiB"
            ))
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("`{s}` overflows 64 bits"))
}

// ---------------------------------------------------------------------------------------------
// The TOML schema, as written by operators.
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// 0..=65535; part of every session id so ids are unique across hosts.
    #[serde(default)]
    pub node_id: u16,
    /// `"all"` or a list of CPU ids; one shard per core.
    #[serde(default)]
    pub cores: Cores,
    #[serde(default)]
    pub memory: Memory,
    #[serde(default)]
    pub slots: Slots,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<Listener>,
    #[serde(default, rename = "output")]
    pub outputs: Vec<Output>,
    #[serde(default)]
    pub persist: Persist,
    #[serde(default)]
    pub metrics: Metrics,
    #[serde(default)]
    pub log: Log,
    #[serde(rename = "profile")]
    pub profiles: Vec<Profile>,
    /// The TOML text this was parsed from. Snapshots keep it, so that a restart whose profiles
    /// changed can still end the sessions of the old ones with their data (`engine::restore`).
    #[serde(skip)]
    pub source: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Cores {
    #[default]
    All,
    List(Vec<usize>),
}

impl<'de> Deserialize<'de> for Cores {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            List(Vec<usize>),
        }
        match Raw::deserialize(d)? {
            Raw::Word(w) if w == "all" => Ok(Cores::All),
            Raw::Word(w) => Err(serde::de::Error::custom(format!(
                "cores = \"{w}\": write \"all\" or a list of CPU ids like [0, 1]"
            ))),
            Raw::List(l) => Ok(Cores::List(l)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// End the session that would expire soonest (reason `evicted`) and admit the new one.
    #[default]
    EvictOldest,
    /// Refuse the new session; its event goes to the dead-letter output.
    Reject,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Memory {
    /// Block arena per shard, reserved at start-up on the shard's NUMA node.
    pub arena_bytes: ByteSize,
    /// Arena block size; a session spans several blocks when its data is large.
    pub block_bytes: u32,
    /// Index capacity per shard (open sessions and sub-sessions).
    pub max_sessions: u32,
    pub on_full: OnFull,
}

impl Default for Memory {
    fn default() -> Self {
        Memory {
            arena_bytes: ByteSize(64 << 20),
            block_bytes: 64,
            max_sessions: 500_000,
            on_full: OnFull::EvictOldest,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Slots {
    /// Number of one-second slots in each expiry wheel; every idle timeout must fit.
    pub max: u32,
}

impl Default for Slots {
    fn default() -> Self {
        Slots { max: 7200 }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub datagram_bytes_max: u32,
    pub line_bytes_max: u32,
    pub key_bytes_max: u32,
    /// A captured value (metadata, state, list item) longer than this is stored as `null`.
    pub value_bytes_max: u32,
    pub json_depth_max: u32,
    pub tcp_connections_max: u32,
    pub tcp_idle_timeout: HumanDuration,
    /// Open sessions of one key in event-time mode (out-of-order islands not yet merged).
    pub open_sessions_per_key_max: u32,
    /// Open sub-sessions per session.
    pub sub_sessions_per_session_max: u32,
    /// Events per cross-core hand-off batch, and batches in flight per (from, to) pair.
    pub handoff_batch_events: u32,
    pub handoff_batch_bytes: u32,
    pub handoff_queue_batches: u32,
    /// An event timestamp further than this from the shard's clock is dead-lettered.
    pub future_skew_max: HumanDuration,
    /// Producers (acknowledged connections' hello ids) whose high-water marks a shard keeps;
    /// beyond it the least recently active is forgotten (`persist::producer`).
    pub producers_max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            datagram_bytes_max: 65_507,
            line_bytes_max: 65_536,
            key_bytes_max: 256,
            value_bytes_max: 512,
            json_depth_max: 32,
            tcp_connections_max: 1024,
            tcp_idle_timeout: HumanDuration(Duration::from_secs(300)),
            open_sessions_per_key_max: 8,
            sub_sessions_per_session_max: 8,
            handoff_batch_events: 256,
            handoff_batch_bytes: 64 << 10,
            handoff_queue_batches: 64,
            future_skew_max: HumanDuration(Duration::from_secs(86_400)),
            producers_max: 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    Udp,
    Tcp,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub kind: Transport,
    /// Loopback by default; opening it to a network is a deliberate edit.
    pub address: SocketAddr,
    /// Source networks allowed to send (CIDR strings); empty = any.
    #[serde(default)]
    pub allow: Vec<String>,
    /// TCP only: acknowledge durable events on the connection (see the durability docs).
    #[serde(default)]
    pub ack: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stream {
    Events,
    Markers,
    Late,
    DeadLetter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    File,
    Tcp,
    Udp,
    Stdout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Drop the record and count it (the default for network consumers: a slow reader must not
    /// stall sessionization for everyone).
    #[default]
    Drop,
    /// Stop taking input until the sink drains (TCP ingest backs off; UDP drops in the kernel).
    Block,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Output {
    pub kind: OutputKind,
    #[serde(default = "all_streams")]
    pub streams: Vec<Stream>,
    /// file: directory for per-shard files.
    pub path: Option<String>,
    /// tcp: listen address for consumers; udp: destination.
    pub address: Option<SocketAddr>,
    #[serde(default = "default_rotate")]
    pub rotate_bytes: ByteSize,
    #[serde(default = "default_fsync_interval")]
    pub fsync_interval: HumanDuration,
    #[serde(default = "default_queue_bytes")]
    pub queue_bytes: ByteSize,
    #[serde(default)]
    pub when_full: WhenFull,
}

fn all_streams() -> Vec<Stream> {
    vec![
        Stream::Events,
        Stream::Markers,
        Stream::Late,
        Stream::DeadLetter,
    ]
}
fn default_rotate() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_fsync_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(1))
}
fn default_queue_bytes() -> ByteSize {
    ByteSize(8 << 20)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum FsyncPolicy {
    Always,
    #[default]
    Interval,
    Never,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Persist {
    /// Directory for snapshots and logs; `None` disables durability.
    pub dir: Option<String>,
    pub snapshot_interval: HumanDuration,
    pub fsync: FsyncPolicy,
    pub fsync_interval: HumanDuration,
    /// Per shard: log records not yet durable are buffered up to this many bytes; when it is
    /// full the shard writes it out at once (and, if the disk refuses, applies events unlogged:
    /// counted, and not acknowledged until the next snapshot).
    pub log_buffer_bytes: ByteSize,
    /// How fast periodic snapshot files are written. Why not flat out: on hosts where disk
    /// writes cost CPU time (a VM whose host does its I/O on the VM's own CPU allowance), a
    /// snapshot written at full speed takes the CPU from ingest in stalls of tens of
    /// milliseconds. A periodic snapshot still being written when shutdown begins is
    /// abandoned; the final snapshot is written at full speed.
    pub snapshot_write_rate: SnapshotWriteRate,
}

/// `persist.snapshot_write_rate`: `"auto"` (the default), `0` (no limit), or bytes a second
/// summed over the shards (`"8MiB"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapshotWriteRate {
    /// Each shard spreads its file over half the snapshot interval (at least
    /// [`SNAPSHOT_WRITE_RATE_MIN`] a second): as gently as the interval allows, and done
    /// before the next snapshot is due.
    #[default]
    Auto,
    Unlimited,
    /// Bytes a second for the whole appliance; each shard writes its share.
    BytesPerSecond(u64),
}

impl<'de> Deserialize<'de> for SnapshotWriteRate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes = match IntOrText::deserialize(d)? {
            IntOrText::Text(s) if s.trim() == "auto" => return Ok(SnapshotWriteRate::Auto),
            IntOrText::Int(n) => n,
            IntOrText::Text(s) => parse_byte_size(&s).map_err(|e| {
                serde::de::Error::custom(format!("{e}, or \"auto\", or 0 for no limit"))
            })?,
        };
        Ok(if bytes == 0 {
            SnapshotWriteRate::Unlimited
        } else {
            SnapshotWriteRate::BytesPerSecond(bytes)
        })
    }
}

impl Default for Persist {
    fn default() -> Self {
        Persist {
            dir: None,
            snapshot_interval: HumanDuration(Duration::from_secs(60)),
            fsync: FsyncPolicy::Interval,
            fsync_interval: HumanDuration(Duration::from_millis(10)),
            log_buffer_bytes: ByteSize(16 << 20),
            snapshot_write_rate: SnapshotWriteRate::Auto,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Metrics {
    /// The endpoint's address; unset = no endpoint. Not defaulted: the endpoint binds without
    /// `SO_REUSEPORT`, so a default port would make every config without `[metrics]` collide with
    /// any other instance (the shipped `conf/sessionizer.toml` sets `127.0.0.1:9999`).
    pub address: Option<SocketAddr>,
    pub publish_interval: HumanDuration,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            address: None,
            publish_interval: HumanDuration(Duration::from_secs(1)),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TimeMode {
    #[default]
    Processing,
    Event,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum TsFormat {
    EpochS,
    #[default]
    EpochMs,
    EpochUs,
    Rfc3339,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timestamp {
    pub field: String,
    #[serde(default)]
    pub format: TsFormat,
}

/// A structured predicate. Exactly one operator per table; combinators nest.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PredicateSpec {
    pub field: Option<String>,
    pub eq: Option<toml::Value>,
    pub ne: Option<toml::Value>,
    #[serde(rename = "in")]
    pub in_: Option<Vec<toml::Value>>,
    pub exists: Option<bool>,
    pub gt: Option<f64>,
    pub ge: Option<f64>,
    pub lt: Option<f64>,
    pub le: Option<f64>,
    pub prefix: Option<String>,
    pub all: Option<Vec<PredicateSpec>>,
    pub any: Option<Vec<PredicateSpec>>,
    pub not: Option<Box<PredicateSpec>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CounterSpec {
    pub name: String,
    /// Absent: count every event.
    pub when: Option<PredicateSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AggregateOp {
    Sum,
    Min,
    Max,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateSpec {
    pub name: String,
    pub field: String,
    pub op: AggregateOp,
    pub when: Option<PredicateSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListSpec {
    pub name: String,
    pub field: String,
    pub max_len: u32,
    #[serde(default)]
    pub unique: bool,
    pub when: Option<PredicateSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubSessionSpec {
    pub name: String,
    /// Extra key field: one sub-session per distinct value within the parent session.
    pub key: Option<String>,
    pub starts_when: Option<PredicateSpec>,
    pub ends_when: Option<PredicateSpec>,
    /// Defaults to the parent's; must not be longer.
    pub idle_timeout: Option<HumanDuration>,
    #[serde(default, rename = "counter")]
    pub counters: Vec<CounterSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    #[serde(rename = "match")]
    pub match_: Option<PredicateSpec>,
    pub key: String,
    #[serde(default)]
    pub time: TimeMode,
    /// Required in event-time mode; in processing-time mode used only by `replay`.
    pub timestamp: Option<Timestamp>,
    pub allowed_lateness: Option<HumanDuration>,
    pub idle_timeout: HumanDuration,
    pub max_duration: Option<HumanDuration>,
    pub starts_when: Option<PredicateSpec>,
    pub ends_when: Option<PredicateSpec>,
    #[serde(default)]
    pub split_on_change: Vec<String>,
    #[serde(default)]
    pub metadata: Vec<String>,
    #[serde(default)]
    pub state: Vec<String>,
    #[serde(default, rename = "counter")]
    pub counters: Vec<CounterSpec>,
    #[serde(default, rename = "aggregate")]
    pub aggregates: Vec<AggregateSpec>,
    #[serde(default, rename = "list")]
    pub lists: Vec<ListSpec>,
    #[serde(default, rename = "sub_session")]
    pub sub_sessions: Vec<SubSessionSpec>,
}

// ---------------------------------------------------------------------------------------------
// Loading and validation.
// ---------------------------------------------------------------------------------------------

impl Config {
    /// Parse and validate. The error string is meant for an operator, verbatim.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| {
            let span = e.span().map(|s| line_of(text, s.start)).unwrap_or(0);
            err(
                if span > 0 {
                    format!("line {span}")
                } else {
                    "<document>".into()
                },
                e.message().to_string(),
            )
        })?;
        cfg.validate()?;
        cfg.source = text.to_string();
        Ok(cfg)
    }

    pub fn load(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("<file>", format!("cannot read {}: {e}", path.display())))?;
        Config::from_toml(&text)
    }

    /// Whether `replay` can run these profiles: it has no wall clock, so every event's time is
    /// read from its profile's `timestamp`, which a processing-time profile may leave out.
    pub fn check_replayable(&self) -> Result<(), ConfigError> {
        match self.profiles.iter().position(|p| p.timestamp.is_none()) {
            Some(i) => Err(err(
                format!("profile[{i}] ({}).timestamp", self.profiles[i].name),
                "missing; replay reads each event's time from it (a processing-time profile needs it only here); add timestamp = { field = \"ts\", format = \"epoch_ms\" }",
            )),
            None => Ok(()),
        }
    }

    pub fn default_embedded() -> Config {
        Config::from_toml(DEFAULT_TOML).expect("the embedded default config is valid")
    }

    /// CPU ids the shards run on, in shard order.
    pub fn core_list(&self) -> Vec<usize> {
        match &self.cores {
            Cores::All => {
                let n = std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1);
                (0..n.min(SHARDS_MAX)).collect()
            }
            Cores::List(l) => l.clone(),
        }
    }

    /// Check every limit and relation (also used on a reloaded config merged with the running
    /// one, see `runtime::ops`).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Cores::List(l) = &self.cores {
            if l.is_empty() || l.len() > SHARDS_MAX {
                return Err(err(
                    "cores",
                    format!("{} cores listed; the limit is 1..={SHARDS_MAX}; list the CPU ids to run shards on, or \"all\"", l.len()),
                ));
            }
            let mut seen = l.clone();
            seen.sort_unstable();
            seen.dedup();
            if seen.len() != l.len() {
                return Err(err(
                    "cores",
                    format!("{l:?} lists a CPU twice; each shard needs its own core"),
                ));
            }
        }
        self.validate_memory()?;
        self.validate_limits()?;
        self.validate_intervals()?;
        if self
            .persist
            .dir
            .as_deref()
            .is_some_and(|d| d.trim().is_empty())
        {
            return Err(err(
                "persist.dir",
                "empty; set a directory path, or remove the key for no durability",
            ));
        }
        validate_log_level(&self.log.level)?;
        for (i, o) in self.outputs.iter().enumerate() {
            validate_output(i, o)?;
        }
        for (i, l) in self.listeners.iter().enumerate() {
            if l.ack && l.kind == Transport::Udp {
                return Err(err(format!("listener[{i}].ack"), "true on a UDP listener; acknowledgements exist only for TCP; remove `ack` or set kind = \"tcp\""));
            }
            if l.ack && self.persist.dir.is_none() {
                return Err(err(format!("listener[{i}].ack"), "true, but persist.dir is not set: an acknowledgement says an event is durable; set persist.dir or remove `ack`"));
            }
            for a in &l.allow {
                crate::netfilter::Cidr::parse(a)
                    .map_err(|m| err(format!("listener[{i}].allow"), format!("`{a}`: {m}")))?;
            }
        }
        if self.profiles.is_empty() {
            return Err(err(
                "profile",
                "no [[profile]] defined; at least one is needed to sessionize anything",
            ));
        }
        let total: usize = self.profiles.iter().map(|p| 1 + p.sub_sessions.len()).sum();
        if total > PROFILES_MAX {
            return Err(err(
                "profile",
                format!("{total} profiles and sub-sessions; the limit is {PROFILES_MAX}"),
            ));
        }
        for (i, p) in self.profiles.iter().enumerate() {
            self.validate_profile(i, p)?;
        }
        let mut names: Vec<&str> = self.profiles.iter().map(|p| p.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(err(
                "profile.name",
                format!("`{}` is used twice; profile names must be unique", w[0]),
            ));
        }
        // Field-table and predicate compilation catch the remaining errors (too many fields,
        // bad literals) with their own key names.
        crate::engine::rules::Rules::compile(self)?;
        Ok(())
    }

    fn validate_memory(&self) -> Result<(), ConfigError> {
        let m = &self.memory;
        if !(16..=4096).contains(&m.block_bytes) || !m.block_bytes.is_multiple_of(8) {
            return Err(err(
                "memory.block_bytes",
                format!(
                    "{} is outside 16..=4096 or not a multiple of 8; 32 or 64 suit most profiles",
                    m.block_bytes
                ),
            ));
        }
        let blocks = m.arena_bytes.0 / u64::from(m.block_bytes);
        if blocks < 64 {
            return Err(err(
                "memory.arena_bytes",
                format!(
                    "{} bytes hold only {blocks} blocks of {}; give the arena at least 64 blocks",
                    m.arena_bytes.0, m.block_bytes
                ),
            ));
        }
        if blocks >= u64::from(u32::MAX) {
            return Err(err("memory.arena_bytes", format!("{} bytes make {blocks} blocks; the limit is {} blocks per shard; raise memory.block_bytes or lower arena_bytes", m.arena_bytes.0, u32::MAX - 1)));
        }
        if m.max_sessions == 0 || m.max_sessions > (1 << 30) {
            return Err(err(
                "memory.max_sessions",
                format!("{} is outside 1..={}", m.max_sessions, 1u32 << 30),
            ));
        }
        if self.slots.max < 4 || self.slots.max > SLOTS_MAX_LIMIT {
            return Err(err(
                "slots.max",
                format!("{} is outside 4..={SLOTS_MAX_LIMIT}", self.slots.max),
            ));
        }
        Ok(())
    }

    /// The intervals the runtime's timers run at: zero would spin (a snapshot or publish loop
    /// with no pause) and very long ones defeat what they are for.
    fn validate_intervals(&self) -> Result<(), ConfigError> {
        let within = |key: &str, v: HumanDuration, lo: Duration, hi: Duration| {
            if (lo..=hi).contains(&v.0) {
                return Ok(());
            }
            let f = humantime::format_duration;
            Err(err(
                key,
                format!(
                    "{} is outside {}..={}; set it within that range",
                    f(v.0),
                    f(lo),
                    f(hi)
                ),
            ))
        };
        let (ms, s) = (Duration::from_millis, Duration::from_secs);
        within(
            "metrics.publish_interval",
            self.metrics.publish_interval,
            ms(10),
            s(3600),
        )?;
        within(
            "limits.tcp_idle_timeout",
            self.limits.tcp_idle_timeout,
            s(1),
            s(30 * 86_400),
        )?;
        within(
            "persist.snapshot_interval",
            self.persist.snapshot_interval,
            ms(100),
            s(7 * 86_400),
        )?;
        within(
            "persist.fsync_interval",
            self.persist.fsync_interval,
            ms(1),
            s(3600),
        )?;
        for (i, o) in self.outputs.iter().enumerate() {
            let key = format!("output[{i}].fsync_interval");
            within(&key, o.fsync_interval, ms(1), s(3600))?;
        }
        Ok(())
    }

    fn validate_limits(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let checks: [(&str, u64, u64, u64); 10] = [
            ("limits.producers_max", l.producers_max.into(), 1, 1 << 20),
            (
                "limits.datagram_bytes_max",
                l.datagram_bytes_max.into(),
                64,
                65_507,
            ),
            (
                "limits.line_bytes_max",
                l.line_bytes_max.into(),
                64,
                16 << 20,
            ),
            ("limits.key_bytes_max", l.key_bytes_max.into(), 1, 4096),
            (
                "limits.value_bytes_max",
                l.value_bytes_max.into(),
                8,
                16_384,
            ),
            ("limits.json_depth_max", l.json_depth_max.into(), 1, 256),
            (
                "limits.tcp_connections_max",
                l.tcp_connections_max.into(),
                1,
                1 << 20,
            ),
            (
                "limits.open_sessions_per_key_max",
                l.open_sessions_per_key_max.into(),
                1,
                1024,
            ),
            (
                "limits.handoff_batch_events",
                l.handoff_batch_events.into(),
                1,
                1 << 16,
            ),
            (
                "limits.handoff_queue_batches",
                l.handoff_queue_batches.into(),
                2,
                1 << 16,
            ),
        ];
        for (key, v, lo, hi) in checks {
            if v < lo || v > hi {
                return Err(err(
                    key,
                    format!("{v} is outside {lo}..={hi}; set it within that range"),
                ));
            }
        }
        if l.handoff_batch_bytes < l.line_bytes_max {
            return Err(err("limits.handoff_batch_bytes", format!("{} is below limits.line_bytes_max = {}; a batch must hold at least one line; raise it", l.handoff_batch_bytes, l.line_bytes_max)));
        }
        let log_min = 2 * (u64::from(l.line_bytes_max) + 1024);
        let log_bytes = self.persist.log_buffer_bytes.0;
        if log_bytes < log_min || log_bytes > 1 << 30 {
            return Err(err("persist.log_buffer_bytes", format!("{log_bytes} is outside {log_min}..={}; it must hold two of the longest lines (limits.line_bytes_max = {}) and stays below 1 GiB", 1u64 << 30, l.line_bytes_max)));
        }
        if let SnapshotWriteRate::BytesPerSecond(rate) = self.persist.snapshot_write_rate {
            if rate < SNAPSHOT_WRITE_RATE_MIN {
                return Err(err("persist.snapshot_write_rate", format!("{rate} bytes a second is below the limit {SNAPSHOT_WRITE_RATE_MIN} (1 MiB); a snapshot of a million sessions (~90 MB) would take minutes while the log grows; raise it, or write \"auto\" or 0 for no limit")));
            }
        }
        if l.sub_sessions_per_session_max > 64 {
            return Err(err(
                "limits.sub_sessions_per_session_max",
                format!("{} is above the limit 64", l.sub_sessions_per_session_max),
            ));
        }
        Ok(())
    }

    fn validate_profile(&self, i: usize, p: &Profile) -> Result<(), ConfigError> {
        let at = |k: &str| format!("profile[{i}] ({}).{k}", p.name);
        if p.name.is_empty()
            || p.name.len() > PROFILE_NAME_MAX
            || !p
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(err(
                format!("profile[{i}].name"),
                format!("`{}` must be 1..=64 characters of [A-Za-z0-9_-]", p.name),
            ));
        }
        let slot_horizon_ms = (i64::from(self.slots.max) - 2) * 1000;
        let idle = p.idle_timeout.as_ms();
        if idle <= 0 {
            return Err(err(
                at("idle_timeout"),
                format!("{idle}ms; it must be positive, e.g. \"30m\""),
            ));
        }
        let lateness = p.allowed_lateness.map(|d| d.as_ms()).unwrap_or(0);
        // Saturating: either duration may be as long as `as_ms` goes (i64::MAX), and a wrapped
        // sum would pass this check.
        let horizon_needed_ms = idle.saturating_add(lateness);
        if horizon_needed_ms > slot_horizon_ms {
            return Err(err(
                at("idle_timeout"),
                format!(
                    "{}ms (plus allowed_lateness {lateness}ms) does not fit the slot wheel: slots.max = {} one-second slots hold at most {slot_horizon_ms}ms; raise slots.max to at least {} or shorten the timeout",
                    idle,
                    self.slots.max,
                    horizon_needed_ms / 1000 + 3
                ),
            ));
        }
        if let Some(md) = p.max_duration {
            if md.as_ms() < idle {
                return Err(err(at("max_duration"), format!("{}ms is shorter than idle_timeout {idle}ms; a session could never idle out; raise max_duration or remove it", md.as_ms())));
            }
        }
        match p.time {
            TimeMode::Event => {
                if p.timestamp.is_none() {
                    return Err(err(at("timestamp"), "missing; time = \"event\" needs timestamp = { field = \"ts\", format = \"epoch_ms\" }"));
                }
            }
            TimeMode::Processing => {
                if p.allowed_lateness.is_some() {
                    return Err(err(at("allowed_lateness"), "set on a processing-time profile, where nothing is late; remove it or set time = \"event\""));
                }
            }
        }
        for (j, s) in p.sub_sessions.iter().enumerate() {
            if let Some(si) = s.idle_timeout {
                if si.as_ms() > idle || si.as_ms() <= 0 {
                    return Err(err(
                        format!("{}.sub_session[{j}] ({}).idle_timeout", at(""), s.name),
                        format!("{}ms must be positive and no longer than the parent's idle_timeout {idle}ms, so a sub-session always ends before its parent", si.as_ms()),
                    ));
                }
            }
        }
        for (j, l) in p.lists.iter().enumerate() {
            if l.max_len == 0 || l.max_len > 255 {
                return Err(err(
                    format!("{}list[{j}] ({}).max_len", at(""), l.name),
                    format!(
                        "{} is outside 1..=255; a list keeps at most 255 values",
                        l.max_len
                    ),
                ));
            }
        }
        self.validate_record_shape(i, p)
    }

    /// The session data a profile declares must fit the engine's fixed per-event arrays and,
    /// empty, one record (a session whose record cannot be written could not be snapshotted
    /// or restored either).
    fn validate_record_shape(&self, i: usize, p: &Profile) -> Result<(), ConfigError> {
        use crate::engine::payload::{AGGREGATES_MAX, LISTS_MAX, VALUES_MAX};
        let at = |k: &str| format!("profile[{i}] ({}).{k}", p.name);
        let values = p.metadata.len() + p.state.len();
        if values > VALUES_MAX {
            return Err(err(at("metadata"), format!("{} metadata and {} state fields ({values} values); the limit is {VALUES_MAX} per profile; capture fewer fields", p.metadata.len(), p.state.len())));
        }
        if p.lists.len() > LISTS_MAX {
            return Err(err(
                at("list"),
                format!(
                    "{} lists; the limit is {LISTS_MAX} per profile; drop some lists",
                    p.lists.len()
                ),
            ));
        }
        if p.aggregates.len() > AGGREGATES_MAX {
            return Err(err(at("aggregate"), format!("{} aggregates; the limit is {AGGREGATES_MAX} per profile; drop some aggregates", p.aggregates.len())));
        }
        let key_max = self.limits.key_bytes_max as usize;
        let layout = crate::engine::rules::layout_for(
            p.counters.len(),
            p.aggregates.len(),
            p.split_on_change.len(),
            p.sub_sessions.len(),
        );
        let empty = key_max + layout.fixed_bytes + 2 * values + p.lists.len();
        if empty > RECORD_BYTES_MAX {
            // Named after what takes the most room.
            let largest = [
                (4 * p.counters.len(), "counter"),
                (8 * p.aggregates.len(), "aggregate"),
                (8 * p.split_on_change.len(), "split_on_change"),
                (4 * p.sub_sessions.len(), "sub_session"),
                (2 * values, "metadata"),
                (p.lists.len(), "list"),
            ]
            .into_iter()
            .max_by_key(|&(bytes, _)| bytes)
            .map_or("counter", |(_, key)| key);
            return Err(err(at(largest), format!("{} counters, {} aggregates, {} split_on_change fields, {} sub-sessions, {values} values and {} lists with a key of limits.key_bytes_max = {key_max} bytes make a session record of {empty} bytes before any value is captured; the limit is {RECORD_BYTES_MAX}; declare fewer", p.counters.len(), p.aggregates.len(), p.split_on_change.len(), p.sub_sessions.len(), p.lists.len())));
        }
        for (j, s) in p.sub_sessions.iter().enumerate() {
            // A sub-session's key is its parent's id (8 bytes) and its own key value.
            let layout = crate::engine::rules::layout_for(s.counters.len(), 0, 0, 0);
            let empty = 8 + key_max + layout.fixed_bytes;
            if empty > RECORD_BYTES_MAX {
                return Err(err(format!("{}sub_session[{j}] ({}).counter", at(""), s.name), format!("{} counters with a key of limits.key_bytes_max = {key_max} bytes make a record of {empty} bytes; the limit is {RECORD_BYTES_MAX}; declare fewer", s.counters.len())));
            }
        }
        Ok(())
    }
}

/// `log.level` is an `env_logger` filter: a level, or comma-separated `module=level` directives
/// (empty: errors only). Anything else would be read as a module name and silence every other
/// log line.
fn validate_log_level(spec: &str) -> Result<(), ConfigError> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let is_level = |l: &str| LEVELS.iter().any(|x| x.eq_ignore_ascii_case(l.trim()));
    let ok = spec.trim().is_empty()
        || spec.split(',').all(|d| match d.split_once('=') {
            Some((module, level)) => !module.trim().is_empty() && is_level(level),
            None => is_level(d),
        });
    if ok {
        Ok(())
    } else {
        Err(err("log.level", format!("`{spec}` is not a level; write one of off, error, warn, info, debug, trace, or module=level directives separated by commas")))
    }
}

fn validate_output(i: usize, o: &Output) -> Result<(), ConfigError> {
    let key = |k: &str| format!("output[{i}].{k}");
    if o.streams.is_empty() {
        return Err(err(
            key("streams"),
            "empty; list at least one of events, markers, late, dead_letter",
        ));
    }
    match o.kind {
        OutputKind::File if o.path.as_deref().is_none_or(|p| p.trim().is_empty()) => Err(err(
            key("path"),
            "missing or empty; a file output needs a directory path",
        )),
        OutputKind::Tcp | OutputKind::Udp if o.address.is_none() => Err(err(
            key("address"),
            "missing; tcp outputs listen on it, udp outputs send to it",
        )),
        _ if o.queue_bytes.0 < 4096 || o.queue_bytes.0 > (1 << 34) => Err(err(
            key("queue_bytes"),
            format!("{} is outside 4KiB..=16GiB", o.queue_bytes.0),
        )),
        _ if o.rotate_bytes.0 < 4096 => Err(err(
            key("rotate_bytes"),
            format!("{} is below 4KiB", o.rotate_bytes.0),
        )),
        _ => Ok(()),
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
[[profile]]
name = "web"
key = "user"
idle_timeout = "30m"
"#;

    #[test]
    fn embedded_default_is_valid() {
        let c = Config::default_embedded();
        assert!(!c.profiles.is_empty());
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(MIN).unwrap();
        assert_eq!(c.memory.block_bytes, 64);
        assert_eq!(c.profiles[0].idle_timeout.as_ms(), 30 * 60 * 1000);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_line() {
        let e = Config::from_toml(&format!("{MIN}\nbogus = 1\n")).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
    }

    #[test]
    fn timeout_beyond_wheel_names_key_value_limit_and_fix() {
        let text = format!("[slots]\nmax = 600\n{MIN}");
        let e = Config::from_toml(&text).unwrap_err().to_string();
        assert!(e.contains("idle_timeout"), "{e}");
        assert!(e.contains("1800000ms"), "{e}");
        assert!(e.contains("slots.max = 600"), "{e}");
        assert!(e.contains("raise slots.max to at least"), "{e}");
    }

    #[test]
    fn sub_session_longer_than_parent_is_rejected() {
        let text = format!("{MIN}\n[[profile.sub_session]]\nname = \"s\"\nidle_timeout = \"1h\"\n");
        let e = Config::from_toml(&text).unwrap_err().to_string();
        assert!(e.contains("no longer than the parent"), "{e}");
    }

    /// Profiles at the engine's limits of session data load; one past any of them is an error
    /// naming the key and the limit (these once panicked or silently miscounted on the first
    /// event).
    #[test]
    fn session_data_beyond_the_engine_limits_is_rejected() {
        let lists = |n: usize| -> String {
            (0..n)
                .map(|i| format!("[[profile.list]]\nname = \"l{i}\"\nfield = \"f\"\nmax_len = 2\n"))
                .collect()
        };
        let aggregates = |n: usize| -> String {
            (0..n)
                .map(|i| {
                    format!("[[profile.aggregate]]\nname = \"a{i}\"\nfield = \"v\"\nop = \"min\"\n")
                })
                .collect()
        };
        let values = |m: usize, s: usize| {
            let f = |prefix: &str, n: usize| {
                (0..n)
                    .map(|i| format!("\"{prefix}{i}\""))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            format!("metadata = [{}]\nstate = [{}]\n", f("m", m), f("s", s))
        };
        let counters = |n: usize, table: &str| -> String {
            (0..n)
                .map(|i| format!("[[{table}]]\nname = \"c{i}\"\n"))
                .collect()
        };
        // 60 distinct captured fields: with the key and the list's and aggregates' fields, as
        // many as the 64 field paths allow (64 values need repeats, which are refused).
        let at_limit = format!("{MIN}{}{}{}", values(30, 30), lists(16), aggregates(32));
        Config::from_toml(&at_limit).expect("a profile at every limit loads");
        for (extra, key, limit) in [
            (
                values(33, 32),
                "(web).metadata",
                "65 values); the limit is 64",
            ),
            (
                "metadata = [\"a\", \"b\", \"a\"]\n".into(),
                "(web).metadata",
                "`a` is listed twice",
            ),
            (lists(17), "(web).list", "17 lists; the limit is 16"),
            (
                aggregates(33),
                "(web).aggregate",
                "33 aggregates; the limit is 32",
            ),
            (
                counters(15_000, "profile.counter"),
                "(web).counter",
                "the limit is 60000",
            ),
            (
                format!(
                    "[[profile.sub_session]]\nname = \"s\"\n{}",
                    counters(15_000, "profile.sub_session.counter")
                ),
                "(web).sub_session[0] (s).counter",
                "the limit is 60000",
            ),
        ] {
            let e = Config::from_toml(&format!("{MIN}{extra}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key) && e.contains(limit), "{e}");
        }
    }

    /// Timer intervals out of range (zero spun, a huge one overflowed the clock and panicked a
    /// thread), empty paths and a log level that is not one are errors naming the key.
    #[test]
    fn intervals_paths_and_log_level_are_checked() {
        let huge = "\"18446744073709551615s\"";
        for (bad, key) in [
            (format!("[metrics]\npublish_interval = {huge}\n"), "line 2"),
            (format!("[limits]\ntcp_idle_timeout = {huge}\n"), "line 2"),
            (
                "[metrics]\npublish_interval = \"0s\"\n".into(),
                "metrics.publish_interval",
            ),
            (
                "[limits]\ntcp_idle_timeout = \"0s\"\n".into(),
                "limits.tcp_idle_timeout",
            ),
            (
                "[persist]\ndir = \"/x\"\nsnapshot_interval = \"0s\"\n".into(),
                "persist.snapshot_interval",
            ),
            (
                "[persist]\ndir = \"/x\"\nsnapshot_interval = \"8d\"\n".into(),
                "persist.snapshot_interval",
            ),
            (
                "[persist]\nfsync_interval = \"0s\"\n".into(),
                "persist.fsync_interval",
            ),
            ("[persist]\ndir = \"\"\n".into(), "persist.dir"),
            (
                "[[output]]\nkind = \"file\"\npath = \" \"\n".into(),
                "output[0].path",
            ),
            (
                "[[output]]\nkind = \"file\"\npath = \"/x\"\nfsync_interval = \"0s\"\n".into(),
                "output[0].fsync_interval",
            ),
            ("[log]\nlevel = \"bogus\"\n".into(), "log.level"),
            ("[log]\nlevel = \"info,=debug\"\n".into(), "log.level"),
        ] {
            let e = Config::from_toml(&format!("{bad}{MIN}")).unwrap_err();
            assert_eq!(e.key, key, "{bad}: {e}");
        }
        for good in ["", "warn", "info,sessionizer::runtime=debug", "TRACE"] {
            Config::from_toml(&format!("[log]\nlevel = \"{good}\"\n{MIN}")).expect(good);
        }
    }

    #[test]
    fn byte_sizes_parse_with_units() {
        assert_eq!(parse_byte_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_byte_size("2GiB").unwrap(), 2 << 30);
        assert!(parse_byte_size("12 parsecs").is_err());
    }

    #[test]
    fn hostile_values_are_errors_not_panics() {
        for bad in [
            "[memory]\nblock_bytes = 3\n",
            "[memory]\narena_bytes = \"99999999999GiB\"\n",
            "[memory]\narena_bytes = 0\n",
            "[limits]\nkey_bytes_max = 0\n",
            "cores = []\n",
            "cores = \"some\"\n",
            "[slots]\nmax = 0\n",
            "[persist]\nsnapshot_write_rate = \"1KiB\"\n",
        ] {
            assert!(Config::from_toml(&format!("{bad}{MIN}")).is_err(), "{bad}");
        }
    }

    #[test]
    fn snapshot_write_rate_is_auto_unlimited_or_at_least_a_mebibyte() {
        let rate = |v: &str| {
            Config::from_toml(&format!("[persist]\nsnapshot_write_rate = {v}\n{MIN}"))
                .map(|c| c.persist.snapshot_write_rate)
        };
        use SnapshotWriteRate::*;
        assert_eq!(
            Config::from_toml(MIN).unwrap().persist.snapshot_write_rate,
            Auto
        );
        assert_eq!(rate("\"auto\"").unwrap(), Auto);
        assert_eq!(rate("0").unwrap(), Unlimited);
        assert_eq!(rate("\"0MiB\"").unwrap(), Unlimited);
        assert_eq!(
            rate("\"1MiB\"").unwrap(),
            BytesPerSecond(SNAPSHOT_WRITE_RATE_MIN)
        );
        assert_eq!(rate("\"64MiB\"").unwrap(), BytesPerSecond(64 << 20));
        let e = rate("1048575").unwrap_err().to_string();
        assert!(
            e.contains("persist.snapshot_write_rate") && e.contains("raise it"),
            "{e}"
        );
        let e = rate("\"fast\"").unwrap_err().to_string();
        assert!(e.contains("auto"), "{e}");
    }
}
