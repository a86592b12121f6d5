//! Damage and failure handling of the persist layer: snapshot files cut short or bit-flipped
//! fall back to the previous generation (and to nothing, with the reasons, when both are bad);
//! torn log tails are truncated and the records before them survive; damage in the middle of a
//! log stops replay there, and a writer resumed after recovery continues the sequence; a full
//! file system turns into typed errors the caller can retry, never a panic.
//!
//! The full-disk tests mount a 64 KiB tmpfs (the tests run as root). Where mounting is not
//! permitted they re-run themselves in a child process under `RLIMIT_FSIZE` instead.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sessionizer::config::{Config, FsyncPolicy};
use sessionizer::decode::Decoder;
use sessionizer::engine::rules::Rules;
use sessionizer::engine::snapshot::SnapshotMeta;
use sessionizer::engine::{Clock, Engine, Out};
use sessionizer::persist::log::{self as plog, LogConfig, LogError, LogReader, LogWriter};
use sessionizer::persist::preview;
use sessionizer::persist::snapshot_file::{
    self, open_latest, open_latest_with_report, LoadedSnapshot, SnapshotError, SnapshotWriter,
    HEADER_BYTES,
};

const CONFIG: &str = r#"
[memory]
arena_bytes = "1MiB"
max_sessions = 1000

[[profile]]
name = "web"
key = "user"
timestamp = { field = "ts" }
idle_timeout = "30m"
metadata = ["ip"]
state = ["page"]
[[profile.counter]]
name = "clicks"
when = { field = "type", eq = "click" }
"#;

/// An engine holding `sessions` sessions (asserted: a decoder that lost the key would make every
/// test below pass on empty snapshots).
fn engine_with(sessions: u32) -> Engine {
    engine_of(CONFIG, sessions)
}

fn engine_of(config: &str, sessions: u32) -> Engine {
    engine_from(Config::from_toml(config).unwrap(), sessions)
}

fn engine_from(cfg: Config, sessions: u32) -> Engine {
    let rules = Arc::new(Rules::compile(&cfg).unwrap());
    let mut e = Engine::new(rules.clone(), &cfg, 0, None).unwrap();
    let mut dec = Decoder::new(rules.field_table(), 32, 65536);
    let mut out = Out::with_capacity(1 << 16, 256);
    for i in 0..sessions {
        let line = format!(
            r#"{{"user":"u{i}","ts":{},"ip":"10.0.0.{}","page":"/p{i}","type":"click"}}"#,
            1_700_000_000_000i64 + i64::from(i),
            i % 256
        );
        let ev = dec.decode(line.as_bytes()).unwrap();
        e.on_event(0, &ev, Clock::Replay, &mut out);
        out.clear();
    }
    assert_eq!(e.live_sessions(), sessions, "every event starts a session");
    e
}

fn meta(generation: u64) -> SnapshotMeta {
    SnapshotMeta {
        shard: 0,
        shards: 1,
        generation,
        wall_ms: 1_700_000_000_000,
        log_seq: generation * 10,
    }
}

fn flip(path: &Path, offset: u64) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0x10;
    f.write_all_at(&b, offset).unwrap();
}

/// Two generations on disk: generation 1 with 10 sessions, generation 2 with 20.
fn two_generations(dir: &Path) -> (PathBuf, PathBuf) {
    let (p1, _) = snapshot_file::write_file(dir, &engine_with(10), meta(1)).unwrap();
    let (p2, _) = snapshot_file::write_file(dir, &engine_with(20), meta(2)).unwrap();
    (p1, p2)
}

#[test]
fn newest_valid_generation_is_loaded() {
    let dir = tempfile::tempdir().unwrap();
    two_generations(dir.path());
    let s = open_latest(dir.path(), 0).unwrap().unwrap();
    assert_eq!(s.header().generation, 2);
    assert_eq!(s.header().sessions, 20);
    assert_eq!(s.body().records.len(), 20);
    let cfg = Config::from_toml(CONFIG).unwrap();
    let mut e = Engine::new(Arc::new(Rules::compile(&cfg).unwrap()), &cfg, 0, None).unwrap();
    let r = e.restore_from(s.body(), 1, 0);
    assert_eq!((r.sessions, r.exact), (20, true));
}

#[test]
fn truncated_newest_falls_back_to_previous() {
    let dir = tempfile::tempdir().unwrap();
    let (_, p2) = two_generations(dir.path());
    let len = fs::metadata(&p2).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&p2)
        .unwrap()
        .set_len(len - 100)
        .unwrap();
    let report = open_latest_with_report(dir.path(), 0).unwrap();
    assert_eq!(report.snapshot.as_ref().unwrap().header().generation, 1);
    assert!(
        matches!(report.rejected[..], [SnapshotError::Length { .. }]),
        "{:?}",
        report.rejected
    );
}

#[test]
fn bit_flipped_body_falls_back_to_previous() {
    let dir = tempfile::tempdir().unwrap();
    let (_, p2) = two_generations(dir.path());
    flip(&p2, HEADER_BYTES as u64 + 77);
    let report = open_latest_with_report(dir.path(), 0).unwrap();
    assert_eq!(report.snapshot.as_ref().unwrap().header().generation, 1);
    assert!(
        matches!(report.rejected[..], [SnapshotError::Checksum { .. }]),
        "{:?}",
        report.rejected
    );
}

/// A body of several megabytes is checksummed on a helper thread while the archive is validated
/// (`snapshot_file::open`): a flipped bit there is still rejected, and an intact one loads.
#[test]
fn large_body_checked_in_parallel_is_rejected_when_flipped() {
    let config = CONFIG
        .replace(r#"arena_bytes = "1MiB""#, r#"arena_bytes = "64MiB""#)
        .replace("max_sessions = 1000", "max_sessions = 200000");
    let dir = tempfile::tempdir().unwrap();
    let (p1, _) = snapshot_file::write_file(dir.path(), &engine_of(&config, 100), meta(1)).unwrap();
    let (p2, _) =
        snapshot_file::write_file(dir.path(), &engine_of(&config, 150_000), meta(2)).unwrap();
    let len = fs::metadata(&p2).unwrap().len();
    assert!(
        len > 12 << 20,
        "{len} bytes: too small for the parallel check"
    );
    let s = LoadedSnapshot::open(&p2).unwrap();
    assert_eq!(s.body().records.len(), 150_000);
    drop(s);
    // The body's two halves are checksummed by two threads: a flip in either is caught.
    for at in [len - 4096, 8192] {
        flip(&p2, at);
        let report = open_latest_with_report(dir.path(), 0).unwrap();
        assert_eq!(report.snapshot.as_ref().unwrap().path(), p1.as_path());
        assert!(
            matches!(report.rejected[..], [SnapshotError::Checksum { .. }]),
            "flipped at {at}: {:?}",
            report.rejected
        );
        flip(&p2, at);
        assert!(LoadedSnapshot::open(&p2).is_ok(), "flipped back at {at}");
    }
}

#[test]
fn bit_flipped_header_falls_back_to_previous() {
    let dir = tempfile::tempdir().unwrap();
    let (_, p2) = two_generations(dir.path());
    flip(&p2, 33);
    let report = open_latest_with_report(dir.path(), 0).unwrap();
    assert_eq!(report.snapshot.as_ref().unwrap().header().generation, 1);
    assert!(
        matches!(report.rejected[..], [SnapshotError::Header { .. }]),
        "{:?}",
        report.rejected
    );
}

/// A body whose checksum matches but whose archive is malformed (a record count past the end)
/// is caught by validation, not trusted.
#[test]
fn checksum_valid_but_malformed_archive_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let (_, p2) = two_generations(dir.path());
    let mut bytes = fs::read(&p2).unwrap();
    let mut header = snapshot_file::SnapshotHeader::decode(&bytes).unwrap();
    // The root is the last thing in the body (the configuration follows it); its last field is
    // `records` (offset i32, len u32).
    let body_end = HEADER_BYTES + header.body_len as usize;
    bytes[body_end - 1] = 0x7f;
    header.body_crc32 = crc32fast::hash(&bytes[HEADER_BYTES..body_end]);
    bytes[..HEADER_BYTES].copy_from_slice(&header.encode());
    fs::write(&p2, &bytes).unwrap();
    let report = open_latest_with_report(dir.path(), 0).unwrap();
    assert_eq!(report.snapshot.as_ref().unwrap().header().generation, 1);
    assert!(
        matches!(report.rejected[..], [SnapshotError::Archive { .. }]),
        "{:?}",
        report.rejected
    );
}

#[test]
fn both_generations_damaged_gives_none_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let (p1, p2) = two_generations(dir.path());
    flip(&p1, HEADER_BYTES as u64 + 5);
    flip(&p2, HEADER_BYTES as u64 + 5);
    let report = open_latest_with_report(dir.path(), 0).unwrap();
    assert!(report.snapshot.is_none());
    assert_eq!(report.rejected.len(), 2, "{:?}", report.rejected);
    assert!(report.rejected.iter().all(|e| e.label() == "checksum"));
    assert!(open_latest(dir.path(), 0).unwrap().is_none());
}

/// Files under newer snapshot names that are not snapshots (copied in, damaged) do not hide the
/// valid generations: every generation is tried, newest first, until one loads.
#[test]
fn junk_under_newer_names_does_not_hide_the_valid_generations() {
    let dir = tempfile::tempdir().unwrap();
    two_generations(dir.path());
    for g in [7, 9] {
        fs::write(
            dir.path().join(snapshot_file::file_name(0, g)),
            b"not a snapshot",
        )
        .unwrap();
    }
    let report = open_latest_with_report(dir.path(), 0).unwrap();
    assert_eq!(report.snapshot.as_ref().unwrap().header().generation, 2);
    assert_eq!(report.rejected.len(), 2, "{:?}", report.rejected);

    // With the newest valid one damaged too, the one before it loads.
    let newest = dir.path().join(snapshot_file::file_name(0, 2));
    flip(&newest, HEADER_BYTES as u64 + 5);
    let report = open_latest_with_report(dir.path(), 0).unwrap();
    assert_eq!(report.snapshot.as_ref().unwrap().header().generation, 1);
    assert_eq!(report.rejected.len(), 3, "{:?}", report.rejected);
}

/// `check-config`'s preview of a restart predicts what the restore then does: the records it
/// says a smaller table or arena has no room for are those the restore ends as evicted, and a
/// changed profile's records are those it ends with the configuration the snapshot kept, or,
/// from a snapshot without one, drops.
#[test]
fn the_restart_preview_predicts_the_restore() {
    let kept = tempfile::tempdir().unwrap();
    snapshot_file::write_file(kept.path(), &engine_with(300), meta(1)).unwrap();
    // A snapshot of rules whose configuration text is unknown keeps none.
    let none = tempfile::tempdir().unwrap();
    let mut cfg = Config::from_toml(CONFIG).unwrap();
    cfg.source.clear();
    let anonymous = engine_from(cfg, 300);
    snapshot_file::write_file(none.path(), &anonymous, meta(1)).unwrap();

    let same = "arena_bytes = \"1MiB\"\nmax_sessions = 1000";
    let cases = [
        (same, false, true, (0, 0, 0)),
        (
            "arena_bytes = \"1MiB\"\nmax_sessions = 100",
            false,
            true,
            (200, 0, 0),
        ),
        // 128 blocks of 64 bytes, one a session.
        (
            "arena_bytes = \"8KiB\"\nmax_sessions = 1000",
            false,
            true,
            (172, 0, 0),
        ),
        (same, true, true, (0, 300, 0)),
        (same, true, false, (0, 0, 300)),
    ];
    for (memory, change_profile, keeps_config, (no_room, ended, dropped)) in cases {
        let dir = if keeps_config { &kept } else { &none };
        let mut text = format!("cores = [0]\n[persist]\ndir = {:?}\n", dir.path())
            + &CONFIG.replace(same, memory);
        if change_profile {
            text = text.replace(r#"state = ["page"]"#, r#"state = ["page", "type"]"#);
        }
        let cfg = Config::from_toml(&text).unwrap();
        let rules = Arc::new(Rules::compile(&cfg).unwrap());
        let previews = preview::preview(&cfg, &rules)
            .unwrap()
            .expect("a state dir");
        let [p] = &previews[..] else {
            panic!("one shard: {previews:?}")
        };
        assert_eq!((p.generation, p.sessions, p.rejected), (Some(1), 300, 0));
        let sum = |l: &[(String, u64)]| l.iter().map(|(_, n)| n).sum::<u64>();
        assert_eq!(
            (p.over_capacity, sum(&p.ended), sum(&p.dropped)),
            (no_room, ended, dropped),
            "{memory} {p:?}"
        );

        let snap = open_latest(dir.path(), 0).unwrap().unwrap();
        assert_eq!(snap.config().is_some(), keeps_config);
        let mut e = Engine::new(rules, &cfg, 0, None).unwrap();
        let r = e.restore_from_with(snap.body(), 1, 0, snap.config());
        assert_eq!(
            (r.no_room, r.retired, r.profile_changed),
            (no_room, ended, dropped),
            "{r:?}"
        );
    }
}

/// A FIFO under the newest snapshot's name is rejected like a damaged file (recovery falls back
/// to the previous generation) instead of blocking the open until something writes to it; a
/// FIFO under a log name is a read error, not a hang.
#[test]
fn a_fifo_under_a_snapshot_or_log_name_is_rejected_not_waited_on() {
    let dir = tempfile::tempdir().unwrap();
    let (_, p2) = two_generations(dir.path());
    let fifo = dir.path().join(snapshot_file::file_name(0, 3));
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: mkfifo(3) with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let report = open_latest_with_report(dir.path(), 0).unwrap();
    assert_eq!(report.snapshot.unwrap().path(), p2);
    assert_eq!(report.rejected.len(), 1, "{:?}", report.rejected);

    let log = dir.path().join("log-0-1.szl");
    let c = std::ffi::CString::new(log.to_str().unwrap()).unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let e = plog::LogHeader::read(&log).unwrap_err();
    assert!(e.to_string().contains("not a regular file"), "{e}");
}

#[test]
fn chunked_writer_publishes_and_keeps_two_generations() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with(50);
    for g in 1..=4 {
        let mut w = SnapshotWriter::begin(dir.path(), &engine, meta(g)).unwrap();
        let mut calls = 0;
        while !w.write_chunk(512).unwrap() {
            calls += 1;
        }
        assert!(calls > 2, "small chunks take several calls");
        let (path, _buffer) = w.publish().unwrap();
        assert!(path.ends_with(format!("snap-0-{g}.szs")));
    }
    // An abandoned write leaves nothing behind once aborted.
    let w = SnapshotWriter::begin(dir.path(), &engine, meta(5)).unwrap();
    w.abort();
    let mut names: Vec<String> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, vec!["snap-0-3.szs", "snap-0-4.szs"]);
    let s = open_latest(dir.path(), 0).unwrap().unwrap();
    assert_eq!(
        (
            s.header().generation,
            s.header().log_seq,
            s.header().sessions
        ),
        (4, 40, 50)
    );
}

/// A file of format version 2 (written before snapshots kept their configuration: no section,
/// header bytes 104..112 zero) still loads, and keeps no configuration; a version 3 header that
/// claims a section the file does not hold, or whose section fails its checksum, does not.
#[test]
fn version_2_files_load_without_a_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::from_toml(CONFIG).unwrap();
    cfg.source.clear();
    let (path, _) = snapshot_file::write_file(dir.path(), &engine_from(cfg, 5), meta(1)).unwrap();
    let mut bytes = fs::read(&path).unwrap();
    let mut header = snapshot_file::SnapshotHeader::decode(&bytes).unwrap();
    assert_eq!((header.version, header.config_len), (3, 0));
    header.version = 2;
    bytes[..HEADER_BYTES].copy_from_slice(&header.encode());
    fs::write(&path, &bytes).unwrap();
    let s = snapshot_file::LoadedSnapshot::open(&path).unwrap();
    assert_eq!((s.header().version, s.header().sessions), (2, 5));
    assert_eq!(s.config(), None);

    // A section the file does not hold, then one that fails its checksum.
    header.version = 3;
    header.config_len = 4;
    header.config_crc32 = crc32fast::hash(b"[x]\n");
    bytes[..HEADER_BYTES].copy_from_slice(&header.encode());
    fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        snapshot_file::LoadedSnapshot::open(&path),
        Err(SnapshotError::Length { .. })
    ));
    bytes.extend_from_slice(b"[y]\n");
    fs::write(&path, &bytes).unwrap();
    assert!(matches!(
        snapshot_file::LoadedSnapshot::open(&path),
        Err(SnapshotError::Mismatch { .. })
    ));
}

#[test]
fn inspect_prints_header_summary_and_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let (_, p2) = two_generations(dir.path());
    let mut out = Vec::new();
    sessionizer::persist::inspect::inspect(&p2, true, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains("generation:     2"), "{text}");
    assert!(text.contains("20 top-level, 0 sub-sessions"), "{text}");
    assert!(
        text.contains(&format!(
            "configuration:  {} bytes, CRC-32 {:08x} (the rules' TOML, after the body)",
            CONFIG.len(),
            crc32fast::hash(CONFIG.as_bytes())
        )),
        "{text}"
    );
    let mut kept = Vec::new();
    sessionizer::persist::inspect::kept_config(&p2, &mut kept).unwrap();
    assert_eq!(kept, CONFIG.as_bytes());
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 20);
    assert_eq!(lines[0]["key"], "u0");
    assert_eq!(lines[0]["id"].as_str().unwrap().len(), 16);
    // A damaged file still shows its header, then the reason.
    flip(&p2, HEADER_BYTES as u64 + 9);
    let mut out = Vec::new();
    let err = sessionizer::persist::inspect::inspect(&p2, false, &mut out).unwrap_err();
    assert!(err.contains("CRC-32"), "{err}");
    assert!(String::from_utf8(out)
        .unwrap()
        .contains("valid:          no"));
}

/// A header whose counts do not match its body (checksum made good) is not called valid.
#[test]
fn inspect_checks_the_header_counts_against_the_body() {
    let dir = tempfile::tempdir().unwrap();
    let (_, p2) = two_generations(dir.path());
    let bytes = fs::read(&p2).unwrap();
    let mut header = snapshot_file::SnapshotHeader::decode(&bytes[..HEADER_BYTES]).unwrap();
    header.sessions = u64::MAX;
    let f = OpenOptions::new().write(true).open(&p2).unwrap();
    f.write_all_at(&header.encode(), 0).unwrap();
    let mut out = Vec::new();
    let err = sessionizer::persist::inspect::inspect(&p2, false, &mut out).unwrap_err();
    assert!(err.contains("the body holds 20 and 0"), "{err}");
    assert!(String::from_utf8(out)
        .unwrap()
        .contains("valid:          no"));
}

// ---------------------------------------------------------------------------------------------
// The log.
// ---------------------------------------------------------------------------------------------

fn cfg(fsync: FsyncPolicy) -> LogConfig {
    LogConfig {
        fsync,
        fsync_interval: Duration::from_millis(10),
        buffer_bytes: 1 << 16,
    }
}

fn record(i: u64) -> Vec<u8> {
    format!(r#"{{"user":"u{i}","n":{i}}}"#).into_bytes()
}

/// Writes records 1..=n to a fresh log; returns its path.
fn log_of(dir: &Path, n: u64) -> PathBuf {
    let mut w = LogWriter::create(dir, 0, 1, 1, cfg(FsyncPolicy::Always)).unwrap();
    for i in 1..=n {
        assert_eq!(w.append(1000 + i as i64, &record(i)).unwrap(), i);
    }
    assert_eq!(w.commit().unwrap(), n);
    w.path().to_path_buf()
}

/// (seq, wall_ms, raw) of every record read.
type Records = Vec<(u64, i64, Vec<u8>)>;

fn read_all(dir: &Path, after: u64) -> (Records, plog::LogReadReport, u64) {
    let mut r = LogReader::open(dir, 0, after).unwrap();
    let mut out = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        out.push((rec.seq, rec.wall_ms, rec.raw.to_vec()));
    }
    (out, r.report().clone(), r.next_seq())
}

#[test]
fn log_round_trip_and_start_after_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    log_of(dir.path(), 30);
    let (recs, report, next) = read_all(dir.path(), 0);
    assert_eq!(recs.len(), 30);
    assert_eq!(recs[4], (5, 1005, record(5)));
    assert!(!report.damaged());
    assert_eq!(next, 31);
    let (recs, report, _) = read_all(dir.path(), 12);
    assert_eq!(recs.first().unwrap().0, 13);
    assert_eq!(report.skipped, 12);
}

/// Rewrite a log file's header version (and its checksum).
fn set_log_version(path: &Path, version: u32) {
    let mut bytes = fs::read(path).unwrap();
    bytes[8..12].copy_from_slice(&version.to_le_bytes());
    let crc = crc32fast::hash(&bytes[..60]);
    bytes[60..64].copy_from_slice(&crc.to_le_bytes());
    fs::write(path, bytes).unwrap();
}

/// A log written before the expiry passes were logged (version 1) reads on into the files a
/// resumed writer adds, each record flagged by its own file's version; versions this build
/// does not know make the file unreadable (skipped, counted), not misread.
#[test]
fn a_first_version_log_reads_on_into_the_current_version() {
    let dir = tempfile::tempdir().unwrap();
    let old = log_of(dir.path(), 3);
    set_log_version(&old, 1);
    assert_eq!(plog::LogHeader::read(&old).unwrap().version, 1);
    let mut w = LogWriter::resume(dir.path(), 0, 4, cfg(FsyncPolicy::Always)).unwrap();
    w.append(2000, plog::PASS).unwrap();
    w.append(2001, &record(5)).unwrap();
    w.commit().unwrap();
    drop(w);
    let mut r = LogReader::open(dir.path(), 0, 0).unwrap();
    let mut got = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        got.push((rec.seq, rec.passes_logged, rec.raw == plog::PASS));
    }
    assert_eq!(
        got,
        [
            (1, false, false),
            (2, false, false),
            (3, false, false),
            (4, true, true),
            (5, true, false)
        ]
    );
    for version in [0, plog::FORMAT_VERSION + 1] {
        set_log_version(&old, version);
        let (recs, report, _) = read_all(dir.path(), 0);
        assert_eq!(report.bad_headers, 1, "version {version}");
        assert!(
            recs.is_empty(),
            "the next file does not continue at record 1"
        );
    }
}

#[test]
fn torn_tail_is_truncated_and_earlier_records_survive() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 10);
    let good_len = fs::metadata(&path).unwrap().len();
    // Half a frame: a crash in the middle of a write.
    let f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all_at(&[40, 0, 0, 0, 1, 2, 3], good_len).unwrap();
    let (recs, report, next) = read_all(dir.path(), 0);
    assert_eq!(recs.len(), 10);
    assert_eq!((report.torn_tails, report.torn_bytes), (1, 7));
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        good_len,
        "the tail is cut off"
    );
    assert_eq!(next, 11);
    // Reading again finds a clean log.
    assert!(!read_all(dir.path(), 0).1.damaged());
}

#[test]
fn bad_crc_in_last_record_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 5);
    let len = fs::metadata(&path).unwrap().len();
    flip(&path, len - 2);
    let (recs, report, _) = read_all(dir.path(), 0);
    assert_eq!(recs.len(), 4);
    assert_eq!(report.torn_tails, 1);
    assert!(fs::metadata(&path).unwrap().len() < len);
}

#[test]
fn zeroed_tail_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 5);
    let len = fs::metadata(&path).unwrap().len();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len + 4096)
        .unwrap();
    let (recs, report, _) = read_all(dir.path(), 0);
    assert_eq!(recs.len(), 5);
    assert_eq!((report.torn_tails, report.torn_bytes), (1, 4096));
}

#[test]
fn damage_in_the_middle_stops_replay_and_a_resumed_writer_continues() {
    let dir = tempfile::tempdir().unwrap();
    let path = log_of(dir.path(), 10);
    let len = fs::metadata(&path).unwrap().len();
    // Inside record 4's raw bytes (64-byte header, then 16 + ~19 bytes a record).
    flip(&path, 64 + 3 * 35 + 20);
    let (recs, report, next) = read_all(dir.path(), 0);
    assert_eq!(recs.len(), 3);
    assert_eq!(report.corrupt.len(), 1);
    assert_eq!(report.torn_tails, 0);
    assert_eq!(
        fs::metadata(&path).unwrap().len(),
        len,
        "a damaged log is left for inspection"
    );
    assert_eq!(next, 4);
    // Recovery resumes the writer at record 4 in a new file; the next recovery reads 1..=3 from
    // the damaged file, then continues in the new one.
    let mut w = LogWriter::resume(dir.path(), 0, next, cfg(FsyncPolicy::Always)).unwrap();
    assert_eq!(w.generation(), 2);
    for i in 4..=6 {
        assert_eq!(w.append(0, &record(i)).unwrap(), i);
    }
    w.commit().unwrap();
    let (recs, report, next) = read_all(dir.path(), 0);
    assert_eq!(
        recs.iter().map(|r| r.0).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    assert_eq!(report.corrupt.len(), 1);
    assert_eq!(next, 7);
}

#[test]
fn a_missing_stretch_of_log_is_reported_as_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    log_of(dir.path(), 5);
    let mut w = LogWriter::create(dir.path(), 0, 2, 9, cfg(FsyncPolicy::Always)).unwrap();
    w.append(0, b"{}").unwrap();
    w.commit().unwrap();
    let (recs, report, _) = read_all(dir.path(), 0);
    assert_eq!(recs.len(), 5);
    assert_eq!(report.gap, Some((6, 9)));
}

#[test]
fn fsync_policies() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = LogWriter::create(dir.path(), 0, 1, 1, cfg(FsyncPolicy::Interval)).unwrap();
    let t = Instant::now();
    w.append(0, b"a").unwrap();
    // Within the interval: written, not yet durable.
    assert_eq!(w.commit_at(t).unwrap(), 0);
    w.append(0, b"b").unwrap();
    assert_eq!(w.commit_at(t + Duration::from_millis(11)).unwrap(), 2);
    assert_eq!(w.stats().fsyncs, 1);
    let mut n = LogWriter::create(dir.path(), 1, 1, 1, cfg(FsyncPolicy::Never)).unwrap();
    n.append(0, b"a").unwrap();
    assert_eq!(n.commit().unwrap(), 1);
    assert_eq!(n.stats().fsyncs, 0);
    // A full buffer is a typed refusal, not a panic; a commit makes room.
    let mut small = LogWriter::create(
        dir.path(),
        2,
        1,
        1,
        LogConfig {
            buffer_bytes: 64,
            ..cfg(FsyncPolicy::Always)
        },
    )
    .unwrap();
    small.append(0, &[b'x'; 40]).unwrap();
    assert!(matches!(
        small.append(0, &[b'x'; 40]),
        Err(LogError::BufferFull { .. })
    ));
    assert!(matches!(
        small.append(0, &[b'x'; 100]),
        Err(LogError::TooLarge { .. })
    ));
    small.commit().unwrap();
    small.append(0, &[b'x'; 40]).unwrap();
}

#[test]
fn truncate_after_snapshot_deletes_only_covered_logs() {
    truncate_deletes_only_covered_logs(false);
}

#[test]
fn truncate_after_snapshot_deletes_only_covered_logs_syncing_in_background() {
    truncate_deletes_only_covered_logs(true);
}

fn truncate_deletes_only_covered_logs(background: bool) {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine_with(3);
    let mut w = LogWriter::create(dir.path(), 0, 1, 1, cfg(FsyncPolicy::Always)).unwrap();
    if background {
        w.sync_in_background().unwrap();
    }
    let snapshot = |g: u64, log_seq: u64| {
        let m = SnapshotMeta { log_seq, ..meta(g) };
        snapshot_file::write_file(dir.path(), &engine, m).unwrap();
    };
    for i in 1..=5 {
        w.append(0, &record(i)).unwrap();
    }
    snapshot(1, 5);
    assert_eq!(
        w.truncate_after_snapshot(1).unwrap(),
        1,
        "log 1 holds records 1..=5, all covered"
    );
    for i in 6..=8 {
        w.append(0, &record(i)).unwrap();
    }
    snapshot(2, 7);
    // Snapshots 1 (log_seq 5) and 2 (log_seq 7) are kept: log 2 (6..=8) is still needed.
    assert_eq!(w.truncate_after_snapshot(2).unwrap(), 0);
    snapshot(3, 8);
    // Snapshots 2 and 3 are kept now (1 was pruned): covered = 7, log 2 ends at 8: kept.
    assert_eq!(w.truncate_after_snapshot(3).unwrap(), 0);
    w.append(0, &record(9)).unwrap();
    snapshot(4, 9);
    // Covered = 8: log 2 (6..=8) and log 3 (rotated at snapshot 3, empty) go; log 4 (9) stays.
    assert_eq!(w.truncate_after_snapshot(4).unwrap(), 2);
    let (recs, report, _) = read_all(dir.path(), 8);
    assert_eq!(recs.iter().map(|r| r.0).collect::<Vec<_>>(), vec![9]);
    assert!(!report.damaged(), "{report:?}");
}

/// Commit until the log is durable through `seq` (background syncing), within a deadline.
fn durable_through(w: &mut LogWriter, seq: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while w.commit().unwrap() < seq {
        assert!(
            Instant::now() < deadline,
            "durable_seq stuck at {}",
            w.durable_seq()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Background syncing: the durable sequence moves once the helper is done, never past what was
/// written; a rotation waits for nothing and the records read back across the files; a
/// requested sync happens whatever the interval; `commit_durable` still syncs on the spot.
#[test]
fn background_sync_moves_the_durable_sequence_and_rotates_without_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let mut long = cfg(FsyncPolicy::Interval);
    long.fsync_interval = Duration::from_secs(3600);
    let mut w = LogWriter::create(dir.path(), 0, 1, 1, long).unwrap();
    w.sync_in_background().unwrap();
    for i in 1..=10 {
        w.append(1000 + i as i64, &record(i)).unwrap();
    }
    // The interval is an hour: only a requested sync makes them durable.
    for _ in 0..3 {
        assert_eq!(w.commit().unwrap(), 0);
    }
    w.request_sync();
    durable_through(&mut w, 10);
    assert_eq!(w.stats().fsyncs, 1);
    assert_eq!(w.pending_bytes(), 0, "synced records leave the buffer");
    for i in 11..=15 {
        w.append(1000 + i as i64, &record(i)).unwrap();
    }
    w.request_sync();
    w.commit().unwrap();
    // A sync may be in flight on generation 1; the rotation does not wait for it.
    assert_eq!(w.rotate().unwrap(), 2);
    for i in 16..=20 {
        w.append(1000 + i as i64, &record(i)).unwrap();
    }
    w.request_sync();
    durable_through(&mut w, 20);
    assert_eq!(w.last_seq(), 20);
    let (recs, report, next) = read_all(dir.path(), 0);
    assert_eq!(
        recs.iter().map(|r| r.0).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
    assert_eq!(recs[15], (16, 1016, record(16)));
    assert!(!report.damaged(), "{report:?}");
    assert_eq!(next, 21);
    w.append(0, &record(21)).unwrap();
    assert_eq!(w.commit_durable().unwrap(), 21);
    assert!(w.stats().sync_us_total > 0 && w.stats().fsync_errors == 0);
}

// ---------------------------------------------------------------------------------------------
// A full file system.
// ---------------------------------------------------------------------------------------------

/// A 64 KiB tmpfs, unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount() -> Option<SmallFs> {
        let dir = tempfile::tempdir().ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallFs { dir })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// How a test takes the free space away and gives it back.
enum Space {
    /// A 64 KiB tmpfs: a filler file takes what is left.
    Tmpfs,
    /// `RLIMIT_FSIZE` in a child process: 64 KiB per file, 0 while exhausted.
    Rlimit,
}

impl Space {
    fn exhaust(&self, dir: &Path) {
        match self {
            Space::Tmpfs => {
                let f = fs::File::create(dir.join("filler")).unwrap();
                let chunk = vec![7u8; 4096];
                let mut at = 0u64;
                while f.write_all_at(&chunk, at).is_ok() {
                    at += chunk.len() as u64;
                }
            }
            Space::Rlimit => set_fsize(0),
        }
    }

    fn restore(&self, dir: &Path) {
        match self {
            Space::Tmpfs => {
                fs::remove_file(dir.join("filler")).unwrap();
                // A child another test forks at that moment holds the filler's descriptor
                // until it execs, and tmpfs frees the pages only then: wait for them.
                let deadline = Instant::now() + Duration::from_secs(5);
                while free_bytes(dir) < 32 << 10 {
                    assert!(
                        Instant::now() < deadline,
                        "the filler's space was not freed"
                    );
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            Space::Rlimit => set_fsize(libc::RLIM_INFINITY),
        }
    }
}

/// Bytes an unprivileged writer may still allocate on `dir`'s file system.
fn free_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs writes only into the zeroed struct we pass; `path` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(path.as_ptr(), &mut st) }, 0);
    st.f_bavail * st.f_frsize
}

fn set_fsize(bytes: libc::rlim_t) {
    let lim = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct we pass; it affects only this (child) process.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_FSIZE, &lim) }, 0);
}

/// Runs `body` on a 64 KiB file system: a tmpfs if this process may mount one, else (in a child
/// process, so the limit does not leak into other tests) a directory under `RLIMIT_FSIZE`.
fn on_small_fs(test_name: &str, body: fn(&Path, &Space)) {
    const CHILD: &str = "PERSIST_FAULTS_FSIZE_CHILD";
    if let Ok(dir) = std::env::var(CHILD) {
        // SAFETY: ignoring SIGXFSZ makes writes past the limit fail with EFBIG instead of
        // killing the process; nothing else in this child handles that signal.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
        set_fsize(64 << 10);
        body(Path::new(&dir), &Space::Rlimit);
        return;
    }
    if let Some(small) = SmallFs::mount() {
        body(small.dir.path(), &Space::Tmpfs);
        return;
    }
    eprintln!("{test_name}: cannot mount a tmpfs; running under RLIMIT_FSIZE in a child process");
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env(CHILD, dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "child run of {test_name} failed");
}

#[test]
fn log_filling_the_disk_returns_errors_and_keeps_what_was_durable() {
    on_small_fs(
        "log_filling_the_disk_returns_errors_and_keeps_what_was_durable",
        |dir, _| {
            let mut w = LogWriter::create(dir, 0, 1, 1, cfg(FsyncPolicy::Always)).unwrap();
            let raw = vec![b'e'; 1000];
            let (mut durable, mut errors, mut appended) = (0, 0, 0);
            for _ in 0..200 {
                match w.append(0, &raw) {
                    Ok(seq) => appended = seq,
                    Err(LogError::BufferFull { .. }) => {}
                    Err(e) => panic!("unexpected {e}"),
                }
                match w.commit() {
                    Ok(d) => durable = d,
                    Err(e) => {
                        assert!(matches!(e, LogError::Io { .. }), "{e}");
                        errors += 1;
                    }
                }
            }
            assert!(errors > 0, "a 64 KiB file system fills up");
            assert!(durable > 0 && durable < appended, "{durable} of {appended}");
            assert_eq!(w.durable_seq(), durable);
            drop(w);
            // Recovery on the full disk: the partly written frame at the end is a torn tail.
            let (recs, _, next) = read_all(dir, 0);
            assert!(
                recs.len() as u64 >= durable,
                "every durable record is read back"
            );
            assert!(recs
                .iter()
                .enumerate()
                .all(|(i, r)| r.0 == i as u64 + 1 && r.2 == raw));
            assert_eq!(next, recs.len() as u64 + 1);
        },
    );
}

#[test]
fn log_commit_resumes_after_space_is_freed() {
    on_small_fs("log_commit_resumes_after_space_is_freed", |dir, space| {
        let mut w = LogWriter::create(dir, 0, 1, 1, cfg(FsyncPolicy::Always)).unwrap();
        space.exhaust(dir);
        // More than the page the log file already has (tmpfs allocates whole pages).
        for i in 1..=300 {
            w.append(0, &record(i)).unwrap();
        }
        let e = w.commit().unwrap_err();
        assert!(matches!(e, LogError::Io { .. }), "{e}");
        assert_eq!(w.durable_seq(), 0);
        // Retrying without space fails the same way, and does not duplicate bytes.
        assert!(w.commit().is_err());
        space.restore(dir);
        assert_eq!(w.commit().unwrap(), 300);
        drop(w);
        let (recs, report, _) = read_all(dir, 0);
        assert_eq!(recs.len(), 300);
        assert!(!report.damaged(), "{report:?}");
    });
}

#[test]
fn snapshot_on_a_full_disk_returns_errors_and_keeps_the_previous() {
    on_small_fs(
        "snapshot_on_a_full_disk_returns_errors_and_keeps_the_previous",
        |dir, _| {
            let small = engine_with(5);
            snapshot_file::write_file(dir, &small, meta(1)).unwrap();
            let big = engine_with(900);
            // Streamed: a typed error, and generation 1 still loads.
            let e = snapshot_file::write_file(dir, &big, meta(2)).unwrap_err();
            assert!(matches!(e, SnapshotError::Io { .. }), "{e}");
            let leftovers = fs::read_dir(dir)
                .unwrap()
                .filter(|e| {
                    e.as_ref()
                        .unwrap()
                        .file_name()
                        .to_string_lossy()
                        .ends_with(".tmp")
                })
                .count();
            assert_eq!(leftovers, 0, "a failed write removes its temp file");
            assert_eq!(open_latest(dir, 0).unwrap().unwrap().header().generation, 1);
            // Chunked: write_chunk errs, can be retried, and abort cleans up.
            let mut w = SnapshotWriter::begin(dir, &big, meta(3)).unwrap();
            let mut err = None;
            for _ in 0..10_000 {
                match w.write_chunk(8192) {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
            assert!(
                err.is_some(),
                "a {}-byte snapshot does not fit",
                w.file_bytes()
            );
            assert!(
                w.write_chunk(8192).is_err(),
                "retrying without space fails again"
            );
            w.abort();
            assert_eq!(open_latest(dir, 0).unwrap().unwrap().header().generation, 1);
        },
    );
}
