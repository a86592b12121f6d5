//! Snapshot loading (`persist::snapshot_file`: `LoadedSnapshot::open`, `open_latest_with_report`,
//! `persist::inspect`) and restoring what validated into an engine
//! (`Engine::restore_from_with`, given the configuration the file keeps).
//!
//! The first byte picks the mode: the rest is a whole snapshot file, or only a body, for which
//! the target writes a header with the right length and checksums (taking shard, shard count,
//! generation, log position and session counts from the archive when it validates) and appends the seeds'
//! configuration, so that mutations of a real archive get past the CRC into rkyv's validation
//! and the restore's own checks. The second byte
//! picks the restoring shard and shard count and the engine's rules (the seeds' own, for the
//! exact slot-for-slot restore, or different ones, for the compact path). Checked:
//! - nothing panics, whatever the file;
//! - a file is used only if it validated: its length is the header's, its header and body
//!   checksums hold, the archive passes `access_body`, and header and body agree; `inspect`
//!   succeeds exactly when loading does;
//! - a body that validates, given a correct header, is loaded (no false rejections);
//! - restoring accounts for every record exactly once (imported, another shard's, of a changed
//!   profile (ended with the kept configuration's rules, or dropped), invalid, or without
//!   room), one end marker for each record without room or of a changed profile ended, the engine holds exactly the sessions imported, and
//!   driving it afterwards (events, timers, the end of input) keeps the engine's invariants,
//!   with every session ended at the end.

#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use rkyv_align::Aligned;
use sessionizer::config::Config;
use sessionizer::decode::Decoder;
use sessionizer::engine::rules::Rules;
use sessionizer::engine::snapshot::RECORD_FLAG_SUB;
use sessionizer::engine::{Clock, Engine, Out};
use sessionizer::persist::inspect::inspect;
use sessionizer::persist::snapshot_file::{
    access_body, file_name, open_latest_with_report, LoadedSnapshot, SnapshotHeader,
    FORMAT_VERSION, HEADER_BYTES,
};
use sessionizer_fuzz::{clear_dir, scratch_dir, Bytes, ENGINE_CONFIG, ENGINE_CONFIG_OTHER};

/// An 8-byte aligned copy of bytes (rkyv reads archives in place and needs the alignment the
/// file's mapping gives).
mod rkyv_align {
    pub struct Aligned(Vec<u64>, usize);

    impl Aligned {
        pub fn new(bytes: &[u8]) -> Aligned {
            let mut words = vec![0u64; bytes.len().div_ceil(8)];
            for (w, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
                let mut b = [0u8; 8];
                b[..chunk.len()].copy_from_slice(chunk);
                *w = u64::from_ne_bytes(b);
            }
            Aligned(words, bytes.len())
        }

        pub fn bytes(&self) -> &[u8] {
            // SAFETY: the Vec<u64> owns at least `self.1` initialized bytes (len.div_ceil(8)
            // words), u8 has no alignment requirement, and the borrow ties the slice to `self`.
            unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast::<u8>(), self.1) }
        }
    }
}

struct Fixture {
    configs: [(Config, Arc<Rules>); 2],
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let load = |text: &str| {
            let cfg = Config::from_toml(text).expect("the fuzz config is valid");
            let rules = Arc::new(Rules::compile(&cfg).expect("the fuzz rules compile"));
            (cfg, rules)
        };
        Fixture {
            configs: [load(ENGINE_CONFIG), load(ENGINE_CONFIG_OTHER)],
        }
    })
}

const GENERATION_IN_NAME: u64 = 7;

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let mode = b.u8();
    let sel = b.u8();
    let rest = b.rest();
    let file = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        with_header(rest)
    };
    let shards = u32::from(sel & 3) + 1;
    let shard = u32::from(sel >> 2) % shards;
    let config = usize::from(sel >> 4 & 1);
    check(&file, shards, shard, config);
});

/// A correct header for `body`: right length and CRCs, and the archive's own shard, shard count,
/// generation and log position when it validates; the seeds' configuration after the body.
fn with_header(body: &[u8]) -> Vec<u8> {
    let config = ENGINE_CONFIG.as_bytes();
    let aligned = Aligned::new(body);
    let (shard, shards, generation, log_seq, sessions, sub_sessions) =
        match access_body(aligned.bytes()) {
            Ok(a) => {
                let subs = a
                    .records
                    .iter()
                    .filter(|r| r.flags & RECORD_FLAG_SUB != 0)
                    .count() as u64;
                (
                    a.shard.to_native(),
                    a.shards.to_native(),
                    a.generation.to_native(),
                    a.log_seq.to_native(),
                    a.records.len() as u64 - subs,
                    subs,
                )
            }
            Err(_) => (0, 1, GENERATION_IN_NAME, 0, 0, 0),
        };
    let header = SnapshotHeader {
        version: FORMAT_VERSION,
        shard,
        shards,
        generation,
        body_len: body.len() as u64,
        body_crc32: crc32fast::hash(body),
        wall_ms: 1_700_000_000_000,
        log_seq,
        id_seq: 0,
        min_clock_ms: i64::MIN,
        wheel_cursor_s: 0,
        sessions,
        sub_sessions,
        config_len: config.len() as u32,
        config_crc32: crc32fast::hash(config),
    };
    let mut file = header.encode().to_vec();
    file.extend_from_slice(body);
    file.extend_from_slice(config);
    file
}

fn check(file: &[u8], shards: u32, shard: u32, config: usize) {
    let dir = scratch_dir();
    clear_dir(dir);
    // The file is named for the shard its header claims (when it decodes), as publish names it.
    let header = SnapshotHeader::decode(file).ok();
    let name_shard = header.as_ref().map_or(0, |h| h.shard);
    let path = dir.join(file_name(name_shard, GENERATION_IN_NAME));
    std::fs::write(&path, file).expect("write the scratch file");

    let opened = LoadedSnapshot::open(&path);
    let mut report = Vec::new();
    let inspected = inspect(&path, true, &mut report);
    assert_eq!(
        inspected.is_ok(),
        opened.is_ok(),
        "inspect and load disagree: {inspected:?} vs {opened:?}"
    );
    let latest = open_latest_with_report(dir, name_shard).expect("list the scratch directory");
    assert_eq!(latest.snapshot.is_some(), opened.is_ok());
    assert_eq!(latest.rejected.len(), usize::from(opened.is_err()));

    // The body is what the header says, when it decodes; the configuration section follows.
    let after = file.get(HEADER_BYTES..).unwrap_or(&[]);
    let body_len = header
        .as_ref()
        .map_or(after.len(), |h| (h.body_len.min(after.len() as u64)) as usize);
    let (body, kept) = after.split_at(body_len);
    let aligned = Aligned::new(body);
    let archive_ok = access_body(aligned.bytes()).is_ok();
    let snap = match opened {
        Ok(s) => s,
        Err(_) => {
            // No false rejection of a correct file: a body that validates under a header
            // written for it (`with_header`) loads.
            if let Some(h) = &header {
                let consistent = h.body_len == body.len() as u64
                    && u64::from(h.config_len) == kept.len() as u64
                    && h.body_crc32 == crc32fast::hash(body)
                    && h.config_crc32 == crc32fast::hash(kept)
                    && std::str::from_utf8(kept).is_ok()
                    && archive_ok;
                if consistent {
                    let a = access_body(aligned.bytes()).expect("validated above");
                    let agree = a.shard.to_native() == h.shard
                        && a.shards.to_native() == h.shards
                        && a.generation.to_native() == h.generation
                        && a.log_seq.to_native() == h.log_seq;
                    assert!(!agree, "a correct snapshot file was rejected");
                }
            }
            return;
        }
    };

    // Loaded: so it validated, every part of it.
    let h = header.expect("a loaded file has a header that decodes");
    assert_eq!(snap.header(), &h);
    assert_eq!(
        file.len() as u64,
        HEADER_BYTES as u64 + h.body_len + u64::from(h.config_len)
    );
    assert_eq!(crc32fast::hash(body), h.body_crc32);
    assert_eq!(crc32fast::hash(kept), h.config_crc32);
    assert_eq!(snap.config().map(str::as_bytes), Some(kept).filter(|c| !c.is_empty()));
    assert!(archive_ok, "loaded an archive that does not validate");
    let archived = snap.body();
    assert_eq!(archived.shard.to_native(), h.shard);
    assert_eq!(archived.shards.to_native(), h.shards);
    assert_eq!(archived.generation.to_native(), h.generation);
    assert_eq!(archived.log_seq.to_native(), h.log_seq);

    restore_and_drive(&snap, shards, shard, config);
    drop(snap);
    let _ = std::fs::remove_file(&path);
    assert!(!Path::new(&path).exists());
}

fn restore_and_drive(snap: &LoadedSnapshot, shards: u32, shard: u32, config: usize) {
    let (cfg, rules) = &fixture().configs[config];
    let mut engine = Engine::new(rules.clone(), cfg, shard as u8, None).expect("a small engine");
    let body = snap.body();
    let mut r = engine.restore_from_with(body, shards, shard, snap.config());
    let records = body.records.len() as u64;
    assert_eq!(
        r.sessions + r.sub_sessions + r.other_shard + r.dropped(),
        records,
        "every record is accounted for once: {r:?}"
    );
    assert_eq!(
        u64::from(engine.live_sessions()),
        r.sessions + r.sub_sessions,
        "{r:?}"
    );

    // The records without room end, each with a marker, in batches that never grow the output.
    let mut out = Out::with_capacity(1 << 16, 256);
    let ended_before =
        engine.stats().sessions_ended.iter().sum::<u64>() + engine.stats().sub_sessions_ended;
    let mut markers = 0u64;
    while engine.end_unrestored(body, &mut r.unplaced, &mut out) {
        markers += out.len() as u64;
        out.clear();
    }
    markers += out.len() as u64;
    out.clear();
    let ended =
        engine.stats().sessions_ended.iter().sum::<u64>() + engine.stats().sub_sessions_ended;
    assert_eq!(
        markers,
        r.no_room + r.retired,
        "one marker per record without room or of a changed profile ended: {r:?}"
    );
    assert_eq!(ended - ended_before, r.no_room + r.retired, "{r:?}");
    assert!(r.unplaced.is_empty());

    // Drive the restored engine: events for the seeds' keys, timers, then the end of input.
    let mut dec = Decoder::new(rules.field_table(), 32, 4096);
    let base = body
        .profiles
        .iter()
        .map(|p| p.max_ts.to_native())
        .filter(|&t| (0..=4_000_000_000_000).contains(&t))
        .max()
        .unwrap_or(1_700_000_000_000);
    for (i, line) in [
        r#"{"user":"u0","ts":TS,"type":"click","page":"/a","tab":"t0","ip":"10.0.0.1","price":2}"#,
        r#"{"user":"u1","ts":TS,"type":"close","tab":"t1"}"#,
        r#"{"dev":"d0","ets":TS,"temp":21,"fw":"2"}"#,
        r#"{"user":"u2","ts":TS,"type":"logout"}"#,
        r#"{"dev":"d1","ets":TS,"temp":5,"fw":"1"}"#,
    ]
    .iter()
    .enumerate()
    {
        let now = base + 1000 * i as i64;
        let line = line.replace("TS", &now.to_string());
        let ev = dec
            .decode(line.as_bytes())
            .expect("the driving events decode");
        let matching: Vec<_> = rules.matching(&ev).collect();
        for p in matching {
            engine.on_event(p, &ev, Clock::Wall(now), &mut out);
        }
        out.clear();
    }
    engine.advance(Clock::Wall(base + 45_000), &mut out);
    out.clear();
    engine.advance(Clock::Wall(base + 400_000), &mut out);
    out.clear();
    engine.finish(&mut out);
    assert_eq!(
        engine.live_sessions(),
        0,
        "the end of input ends every session"
    );
}
