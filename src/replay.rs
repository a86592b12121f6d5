//! `sessionizer replay FILE...`: the live engine, driven by the events' own time.
//!
//! One `Engine` per configured shard, all in this thread (`numa_node` None; arena and session table
//! backed and written as first used: `Pages::OnDemand`); every event is routed to its owner exactly
//! as in the live run (`route`), so a replay produces the sessions the appliance would have
//! produced. Files are read in order through a fixed buffer (`ingest::lines::LineBuf`, memchr
//! splitting); every engine's timers run (`advance` with `Clock::Replay`) every
//! [`ADVANCE_EVERY_EVENTS`] events and at the end, then every engine `finish`es. Lines are decoded
//! a window of [`WINDOW_LINES`] at a time and each engine gets its events of the window as one
//! batch (`Engine::on_batch_by`, which overlaps their session lookups); so within a window, dead
//! letters and pass-throughs come first, then each shard's records in shard order. The order
//! depends only on the input: the same input gives byte-identical output. Undecodable lines become
//! dead-letter records with transport "replay".

use crate::config::Config;
use crate::decode::{Decoder, Parsed};
use crate::engine::rules::{ProfileId, Rules};
use crate::engine::{route, Clock, Engine, Out, Pages, Route};
use crate::ingest::lines::{Chunk, LineBuf, TOO_LONG_PREFIX_BYTES};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Engines' timers run once this many events have passed (at the end of a window).
pub const ADVANCE_EVERY_EVENTS: u64 = 10_000;
/// Lines decoded before the engines run them.
pub const WINDOW_LINES: usize = 256;
/// Bytes read from a file at a time, and output bytes written at a time: small enough that the
/// lines read and the records written stay in the core's cache until used (4 MiB and 1 MiB
/// measured 1–3% slower).
const READ_CHUNK_BYTES: usize = 256 << 10;
/// Output records are written once they hold this many bytes.
const OUT_WRITE_BYTES: usize = 256 << 10;
const TRANSPORT: &str = "replay";

#[derive(Debug)]
pub enum ReplayError {
    Config(crate::config::ConfigError),
    Io {
        what: String,
        source: io::Error,
    },
    /// The files named cannot be used as asked (an output that is also an input).
    Files(String),
}

impl std::fmt::Display for ReplayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplayError::Config(e) => write!(f, "{e}"),
            ReplayError::Io { what, source } => write!(f, "{what}: {source}"),
            ReplayError::Files(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ReplayError {}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ReplayError {
    let what = what.into();
    move |source| ReplayError::Io { what, source }
}

/// What a replay did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ReplaySummary {
    pub lines: u64,
    pub events: u64,
    pub undecodable: u64,
    pub records: u64,
    pub bytes_in: u64,
}

/// Replay `files` in order and write every record to `output` (`-` = stdout).
pub fn run(cfg: &Config, files: &[PathBuf], output: &str) -> Result<ReplaySummary, ReplayError> {
    // Before the output file is created, so that a refusal leaves nothing behind (and a
    // truncated output cannot be an input).
    cfg.check_replayable().map_err(ReplayError::Config)?;
    check_files(files, output)?;
    if output == "-" {
        let stdout = io::stdout();
        let lock = stdout.lock();
        replay_to(cfg, files, lock, "stdout")
    } else {
        let f = File::create(output).map_err(io_err(format!("creating {output}")))?;
        replay_to(cfg, files, f, output)
    }
}

/// Every input exists, and none is the output file (creating the output would empty it).
fn check_files(files: &[PathBuf], output: &str) -> Result<(), ReplayError> {
    use std::os::unix::fs::MetadataExt;
    let out = (output != "-")
        .then(|| std::fs::metadata(output).ok())
        .flatten()
        .map(|m| (m.dev(), m.ino()));
    for path in files {
        let name = path.display();
        let m = std::fs::metadata(path).map_err(io_err(format!("opening {name}")))?;
        if out == Some((m.dev(), m.ino())) {
            return Err(ReplayError::Files(format!(
                "the output {output} is the input {name}: replay would empty it before reading it; write the output to another file"
            )));
        }
    }
    Ok(())
}

/// Replay into any writer (buffered here); `run` has checked the config and the files.
fn replay_to<W: Write>(
    cfg: &Config,
    files: &[PathBuf],
    sink: W,
    sink_name: &str,
) -> Result<ReplaySummary, ReplayError> {
    let mut r = Replayer::new(cfg)?;
    let mut w = io::BufWriter::with_capacity(OUT_WRITE_BYTES, sink);
    let write_err = io_err(format!("writing {sink_name}"));
    for path in files {
        r.feed_file(path, &mut w)?;
    }
    r.finish(&mut w)
        .map_err(io_err(format!("writing {sink_name}")))?;
    w.flush().map_err(write_err)?;
    Ok(r.summary)
}

struct Replayer {
    rules: Arc<Rules>,
    engines: Vec<Engine>,
    dec: Decoder,
    /// The window's decoded lines, and where each lies in the data being fed.
    parsed: Vec<Parsed>,
    spans: Vec<(usize, usize)>,
    /// Per engine, the window's events it owns: (profile, index in the window).
    batches: Vec<Vec<(ProfileId, u16)>>,
    out: Out,
    shards: u32,
    line_bytes_max: usize,
    since_advance: u64,
    summary: ReplaySummary,
}

impl Replayer {
    fn new(cfg: &Config) -> Result<Replayer, ReplayError> {
        let rules = Arc::new(Rules::compile(cfg).map_err(ReplayError::Config)?);
        let shards = cfg.core_list().len() as u32;
        assert!(shards >= 1);
        let engines = (0..shards)
            .map(|i| {
                Engine::with_pages(rules.clone(), cfg, i as u8, None, Pages::OnDemand)
                    .map_err(io_err(format!("reserving memory for shard {i}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let line_bytes_max = cfg.limits.line_bytes_max as usize;
        let dec = Decoder::new(
            rules.field_table(),
            cfg.limits.json_depth_max,
            line_bytes_max,
        );
        let parsed = (0..WINDOW_LINES)
            .map(|_| Parsed::new(dec.table(), 0))
            .collect();
        Ok(Replayer {
            batches: vec![Vec::with_capacity(WINDOW_LINES * rules.profiles.len()); engines.len()],
            rules,
            engines,
            dec,
            parsed,
            spans: Vec::with_capacity(WINDOW_LINES),
            out: Out::with_capacity(2 * OUT_WRITE_BYTES + 4 * line_bytes_max, 1 << 16),
            shards,
            line_bytes_max,
            since_advance: 0,
            summary: ReplaySummary::default(),
        })
    }

    fn feed_file<W: Write>(&mut self, path: &Path, w: &mut W) -> Result<(), ReplayError> {
        let name = path.display().to_string();
        let mut f = File::open(path).map_err(io_err(format!("opening {name}")))?;
        let mut lb = LineBuf::new(self.line_bytes_max, READ_CHUNK_BYTES);
        loop {
            let n = match f.read(lb.spare_mut()) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_err(format!("reading {name}"))(e)),
            };
            lb.commit(n);
            self.summary.bytes_in += n as u64;
            while let Some(chunk) = lb.next_chunk() {
                match chunk {
                    Chunk::Lines(r) => self.lines(lb.bytes(r), w),
                    Chunk::TooLong(r) => self.too_long(lb.bytes(r)),
                }
                .map_err(io_err("writing output"))?;
            }
        }
        if let Some(r) = lb.finish() {
            self.lines(lb.bytes(r), w)
                .map_err(io_err("writing output"))?;
        }
        Ok(())
    }

    fn too_long(&mut self, prefix: &[u8]) -> io::Result<()> {
        self.summary.lines += 1;
        self.summary.undecodable += 1;
        self.out.dead_letter("line_too_long", TRANSPORT, prefix);
        Ok(())
    }

    fn lines<W: Write>(&mut self, data: &[u8], w: &mut W) -> io::Result<()> {
        let mut pos = 0;
        while pos < data.len() {
            let end = memchr::memchr(b'\n', &data[pos..]).map_or(data.len(), |i| pos + i);
            let mut line = (pos, end);
            pos = end + 1;
            if data[line.0..line.1].last() == Some(&b'\r') {
                line.1 -= 1;
            }
            if line.0 == line.1 {
                continue;
            }
            self.line(data, line);
            if self.spans.len() == WINDOW_LINES {
                self.run_window(data);
                if self.out.buf.len() >= OUT_WRITE_BYTES || self.out.half_full() {
                    self.write_out(w)?;
                }
            }
        }
        self.run_window(data);
        Ok(())
    }

    /// Decode one line into the window and route its events; what needs no engine (dead
    /// letters, pass-through) is written at once.
    #[inline]
    fn line(&mut self, data: &[u8], (start, end): (usize, usize)) {
        self.summary.lines += 1;
        let line = &data[start..end];
        if line.len() > self.line_bytes_max {
            self.summary.undecodable += 1;
            let prefix = &line[..TOO_LONG_PREFIX_BYTES.min(line.len())];
            self.out.dead_letter("line_too_long", TRANSPORT, prefix);
            return;
        }
        let k = self.spans.len();
        if let Err(e) = self.dec.decode_into(line, &mut self.parsed[k]) {
            self.summary.undecodable += 1;
            self.out.dead_letter(e.label(), TRANSPORT, line);
            return;
        }
        let ev = self.parsed[k].event(line, self.dec.table());
        self.summary.events += 1;
        let mut matched = false;
        for p in self.rules.matching(&ev) {
            matched = true;
            match route(&self.rules, p, &ev, self.shards) {
                Route::Owner(o) => self.batches[o as usize].push((p, k as u16)),
                Route::MissingKey => self.out.dead_letter_event(
                    "missing_key",
                    &self.rules.profiles[p as usize].name,
                    ev.raw(),
                ),
                Route::KeyTooLong => self.out.dead_letter_event(
                    "key_too_long",
                    &self.rules.profiles[p as usize].name,
                    ev.raw(),
                ),
            }
        }
        if !matched {
            self.out.passthrough(ev.raw());
        }
        self.spans.push((start, end));
    }

    /// Each engine runs its events of the window; timers run when their interval has passed.
    fn run_window(&mut self, data: &[u8]) {
        let table = self.dec.table();
        let (parsed, spans) = (&self.parsed, &self.spans);
        for (engine, batch) in self.engines.iter_mut().zip(&mut self.batches) {
            engine.on_batch_by(
                batch.len(),
                |i| {
                    let (p, k) = batch[i];
                    let (a, b) = spans[usize::from(k)];
                    (p, parsed[usize::from(k)].event(&data[a..b], table))
                },
                Clock::Replay,
                &mut self.out,
            );
            batch.clear();
        }
        self.since_advance += self.spans.len() as u64;
        self.spans.clear();
        if self.since_advance >= ADVANCE_EVERY_EVENTS {
            self.since_advance = 0;
            for e in &mut self.engines {
                if e.advance_bounded(Clock::Replay, &mut self.out).left {
                    // The rest after this window's output is written.
                    self.since_advance = ADVANCE_EVERY_EVENTS;
                }
            }
        }
    }

    fn write_out<W: Write>(&mut self, w: &mut W) -> io::Result<()> {
        // Records are whole lines laid end to end in production order: the buffer is the output.
        self.summary.records += self.out.len() as u64;
        let end = self.out.recs.last().map_or(0, |r| r.end as usize);
        w.write_all(&self.out.buf[..end])?;
        self.out.clear();
        Ok(())
    }

    /// End every open session (`end_of_input` unless due), writing the output in batches.
    fn finish<W: Write>(&mut self, w: &mut W) -> io::Result<()> {
        for i in 0..self.engines.len() {
            while self.engines[i]
                .advance_bounded(Clock::Replay, &mut self.out)
                .left
            {
                self.write_out(w)?;
            }
        }
        for i in 0..self.engines.len() {
            while self.engines[i].finish_bounded(&mut self.out) {
                self.write_out(w)?;
            }
        }
        self.write_out(w)
    }
}
