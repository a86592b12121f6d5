//! A timing harness for snapshot write and recovery at scale, callable from a test (there is no
//! `[[bench]]` for it): builds one shard's engine with `sessions` sessions of a web profile (two
//! metadata fields, one state field, two counters), then times capture, the chunked and the
//! streamed file writes, and recovery (open + validate, restore into a fresh engine).
//!
//! It only measures and reports; the figures go to `bench/RESULTS.md` by hand with the command,
//! machine and date. Memory: about 2.3 GB per engine and 1.2 GB of capture buffer at 10M sessions.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::snapshot_file::{self, SnapshotWriter};
use crate::config::Config;
use crate::decode::Decoder;
use crate::engine::rules::Rules;
use crate::engine::snapshot::SnapshotMeta;
use crate::engine::{Clock, Engine, Out};

/// The web profile measured.
pub fn config(sessions: u64) -> Result<Config, String> {
    let max_sessions = (sessions + sessions / 20).max(1024);
    // ~60 payload bytes a session, two 32-byte blocks; 150 bytes a session leaves room.
    let arena_bytes = (sessions * 150).max(1 << 20);
    let text = format!(
        r#"
[memory]
arena_bytes = {arena_bytes}
block_bytes = 32
max_sessions = {max_sessions}

[[profile]]
name = "web"
key = "user"
timestamp = {{ field = "ts" }}
idle_timeout = "30m"
metadata = ["ip", "ua"]
state = ["page"]
[[profile.counter]]
name = "clicks"
when = {{ field = "type", eq = "click" }}
[[profile.counter]]
name = "views"
when = {{ field = "type", eq = "view" }}
"#
    );
    Config::from_toml(&text).map_err(|e| e.to_string())
}

#[derive(Clone, Debug, Default)]
pub struct BenchReport {
    pub sessions: u64,
    pub body_bytes: u64,
    pub engine_new_ms: f64,
    pub populate_ms: f64,
    /// Engine -> in-memory archive (the part that holds the shard), into a fresh buffer (page
    /// faults included) and into a reused one.
    pub capture_cold_ms: f64,
    pub capture_ms: f64,
    /// A sliced capture with no events in between (`Engine::capture_begin`/`capture_step`):
    /// the cut, all the slices together, the longest slice and the slices' count (budget
    /// `SLICE_BUDGET`), with reused buffers; then building the archive from it (off the shard).
    pub sliced_cut_ms: f64,
    pub sliced_held_ms: f64,
    pub sliced_longest_ms: f64,
    pub sliced_slices: u64,
    pub sliced_archive_ms: f64,
    /// SnapshotWriter: capture + chunked writes + fsync, and the publish step.
    pub chunked_write_ms: f64,
    pub publish_ms: f64,
    /// `write_file`: streamed from the engine through a buffered writer, fsync, rename.
    pub streamed_write_ms: f64,
    /// open_latest: mmap (populated), header, CRC-32, archive validation.
    pub open_validate_ms: f64,
    /// restore_from into an empty engine.
    pub restore_ms: f64,
    /// restore_from into an engine of another capacity (compact mode).
    pub compact_restore_ms: f64,
    pub exact: bool,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "sessions            {}", self.sessions)?;
        writeln!(
            f,
            "body bytes          {} ({:.1} B/session)",
            self.body_bytes,
            self.body_bytes as f64 / self.sessions.max(1) as f64
        )?;
        writeln!(
            f,
            "engine new          {:.1} ms (reserve + prefault; start-up, not recovery)",
            self.engine_new_ms
        )?;
        writeln!(f, "populate            {:.1} ms", self.populate_ms)?;
        writeln!(
            f,
            "capture (memory)    {:.1} ms into a reused buffer, {:.1} ms into a fresh one",
            self.capture_ms, self.capture_cold_ms
        )?;
        writeln!(
            f,
            "sliced capture      cut {:.3} ms, {:.1} ms in {} slices of budget {SLICE_BUDGET}, longest {:.3} ms; archive built in {:.1} ms",
            self.sliced_cut_ms,
            self.sliced_held_ms,
            self.sliced_slices,
            self.sliced_longest_ms,
            self.sliced_archive_ms
        )?;
        writeln!(
            f,
            "chunked write+fsync {:.1} ms (incl. capture), publish {:.1} ms",
            self.chunked_write_ms, self.publish_ms
        )?;
        writeln!(
            f,
            "streamed write      {:.1} ms (write_file: stream, fsync, rename)",
            self.streamed_write_ms
        )?;
        writeln!(
            f,
            "recovery open       {:.1} ms (mmap, CRC-32, validation)",
            self.open_validate_ms
        )?;
        writeln!(
            f,
            "recovery restore    {:.1} ms (exact = {})",
            self.restore_ms, self.exact
        )?;
        writeln!(
            f,
            "recovery total      {:.1} ms",
            self.open_validate_ms + self.restore_ms
        )?;
        write!(
            f,
            "compact restore     {:.1} ms (another table size or shard count)",
            self.compact_restore_ms
        )
    }
}

/// The runtime's slice budget (`runtime::durable`).
const SLICE_BUDGET: u32 = 1024;

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Run the measurement with files in `dir` (which should be on the disk being measured).
pub fn run(sessions: u64, dir: &Path) -> Result<BenchReport, String> {
    let cfg = config(sessions)?;
    let rules = Arc::new(Rules::compile(&cfg).map_err(|e| e.to_string())?);
    let mut report = BenchReport {
        sessions,
        ..BenchReport::default()
    };

    let t = Instant::now();
    let mut engine = Engine::new(rules.clone(), &cfg, 0, None).map_err(|e| e.to_string())?;
    report.engine_new_ms = ms(t);

    let t = Instant::now();
    let mut dec = Decoder::new(rules.field_table(), 32, 65536);
    let mut out = Out::with_capacity(1 << 16, 64);
    let mut line = String::with_capacity(256);
    let base_ms = 1_760_000_000_000i64;
    for i in 0..sessions {
        use std::fmt::Write as _;
        line.clear();
        let _ = write!(
            line,
            r#"{{"user":"u{i:010}","ts":{},"ip":"10.{}.{}.{}","ua":"Mozilla/5.0","page":"/p/{}","type":"{}"}}"#,
            base_ms + (i / 1000) as i64,
            (i >> 16) & 255,
            (i >> 8) & 255,
            i & 255,
            i % 1000,
            if i % 3 == 0 { "click" } else { "view" }
        );
        let ev = dec.decode(line.as_bytes()).map_err(|e| format!("{e:?}"))?;
        engine.on_event(0, &ev, Clock::Replay, &mut out);
        out.clear();
    }
    report.populate_ms = ms(t);
    if u64::from(engine.live_sessions()) != sessions {
        return Err(format!(
            "{} sessions live, {sessions} expected",
            engine.live_sessions()
        ));
    }

    let meta = |generation| SnapshotMeta {
        shard: 0,
        shards: 1,
        generation,
        wall_ms: super::wall_ms_now(),
        log_seq: sessions,
    };
    {
        let mut buf = rkyv::util::AlignedVec::<16>::with_capacity(engine.snapshot_bytes_hint());
        let t = Instant::now();
        let s = engine
            .write_snapshot(&mut buf, meta(0))
            .map_err(|e| e.to_string())?;
        report.capture_cold_ms = ms(t);
        report.body_bytes = s.body_bytes;
        // Again into the same buffer: the steady state of a shard that keeps its buffer.
        buf.clear();
        let t = Instant::now();
        engine
            .write_snapshot(&mut buf, meta(0))
            .map_err(|e| e.to_string())?;
        report.capture_ms = ms(t);
        // Sliced, twice so that the second one reuses warm buffers as a running shard does.
        let mut bufs = crate::engine::snapshot::CaptureBuffers::default();
        for _ in 0..2 {
            let t = Instant::now();
            engine.capture_begin(bufs);
            report.sliced_cut_ms = ms(t);
            report.sliced_held_ms = report.sliced_cut_ms;
            report.sliced_longest_ms = 0.0;
            report.sliced_slices = 0;
            loop {
                let t = Instant::now();
                let done = engine.capture_step(SLICE_BUDGET);
                let step = ms(t);
                report.sliced_held_ms += step;
                report.sliced_longest_ms = report.sliced_longest_ms.max(step);
                report.sliced_slices += 1;
                if done {
                    break;
                }
            }
            let captured = engine.capture_take();
            buf.clear();
            let t = Instant::now();
            let s = captured
                .write_body(&mut buf, meta(0))
                .map_err(|e| e.to_string())?;
            report.sliced_archive_ms = ms(t);
            if s.body_bytes != report.body_bytes {
                return Err("the sliced capture's archive differs in length".into());
            }
            bufs = captured.into_buffers();
        }
    }
    {
        let t = Instant::now();
        let mut w = SnapshotWriter::begin(dir, &engine, meta(1)).map_err(|e| e.to_string())?;
        while !w.write_chunk(4 << 20).map_err(|e| e.to_string())? {}
        report.chunked_write_ms = ms(t);
        let t = Instant::now();
        w.publish().map_err(|e| e.to_string())?;
        report.publish_ms = ms(t);
    }
    let t = Instant::now();
    snapshot_file::write_file(dir, &engine, meta(2)).map_err(|e| e.to_string())?;
    report.streamed_write_ms = ms(t);
    drop(engine);

    let mut restored = Engine::new(rules, &cfg, 0, None).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let snap = snapshot_file::open_latest(dir, 0)
        .map_err(|e| e.to_string())?
        .ok_or("no snapshot found")?;
    report.open_validate_ms = ms(t);
    let t = Instant::now();
    let r = restored.restore_from(snap.body(), 1, 0);
    report.restore_ms = ms(t);
    report.exact = r.exact;
    if r.sessions != sessions {
        return Err(format!(
            "restored {} sessions of {sessions}: {r:?}",
            r.sessions
        ));
    }
    drop(restored);
    // Compact mode (what a changed shard count or table size gets): one slot more.
    let mut cfg2 = cfg.clone();
    cfg2.memory.max_sessions += 1;
    let rules2 = Arc::new(Rules::compile(&cfg2).map_err(|e| e.to_string())?);
    let mut compact = Engine::new(rules2, &cfg2, 0, None).map_err(|e| e.to_string())?;
    let t = Instant::now();
    let r = compact.restore_from(snap.body(), 1, 0);
    report.compact_restore_ms = ms(t);
    if r.exact || r.sessions != sessions {
        return Err(format!("compact restore: {r:?}"));
    }
    Ok(report)
}
