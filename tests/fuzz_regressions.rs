//! Findings of the fuzz targets (`fuzz/`), each kept as a test with its input inline so that the
//! normal test suite keeps it fixed. A test names the target and the input as the target saw it
//! (a target's input starts with its mode byte: see the target's header), then checks the
//! behaviour the fix gives, through the same public API the target drives.

use std::fs;
use std::path::Path;
use std::time::Duration;

use sessionizer::config::{Config, FsyncPolicy};
use sessionizer::engine::rules::Rules;
use sessionizer::engine::snapshot::BODY_FORMAT;
use sessionizer::persist::log::{
    file_name, LogConfig, LogError, LogHeader, LogReader, LogWriter,
    FORMAT_VERSION as LOG_FORMAT_VERSION, SEQ_MAX,
};
use sessionizer::persist::snapshot_file::{SnapshotHeader, FORMAT_VERSION};

fn log_config() -> LogConfig {
    LogConfig {
        fsync: FsyncPolicy::Always,
        fsync_interval: Duration::from_millis(10),
        buffer_bytes: 1 << 12,
    }
}

/// A log file as the writer frames it: header, then `[len][crc32][wall ms][raw]` per record.
fn write_log(dir: &Path, generation: u64, first_seq: u64, records: &[&[u8]]) {
    let header = LogHeader {
        version: LOG_FORMAT_VERSION,
        shard: 0,
        generation,
        first_seq,
        created_wall_ms: 1_700_000_000_000,
    };
    let mut bytes = header.encode().to_vec();
    for (i, raw) in records.iter().enumerate() {
        let len = raw.len() as u32;
        let wall = 1_700_000_000_000i64 + i as i64;
        let mut h = crc32fast::Hasher::new();
        h.update(&len.to_le_bytes());
        h.update(&wall.to_le_bytes());
        h.update(raw);
        bytes.extend_from_slice(&len.to_le_bytes());
        bytes.extend_from_slice(&h.finalize().to_le_bytes());
        bytes.extend_from_slice(&wall.to_le_bytes());
        bytes.extend_from_slice(raw);
    }
    fs::write(dir.join(file_name(0, generation)), bytes).unwrap();
}

/// fuzz/log, input `ff 01 01 00 00 00`: recovery starting after log position `u64::MAX - 1`
/// (a snapshot's `log_seq`) resumed the writer at `u64::MAX`, and its first append overflowed
/// the sequence. A log header's `first_seq` near `u64::MAX` overflowed the reader the same way.
/// Both positions are now bounded by `SEQ_MAX` when the headers are validated.
#[test]
fn log_positions_near_u64_max_fail_validation() {
    // The snapshot header that would start recovery there no longer loads.
    let mut h = SnapshotHeader {
        version: FORMAT_VERSION,
        shard: 0,
        shards: 1,
        generation: 1,
        body_len: 0,
        body_crc32: 0,
        wall_ms: 0,
        log_seq: u64::MAX - 1,
        id_seq: 0,
        min_clock_ms: i64::MIN,
        wheel_cursor_s: 0,
        sessions: 0,
        sub_sessions: 0,
        config_len: 0,
        config_crc32: 0,
    };
    assert_eq!(
        SnapshotHeader::decode(&h.encode()),
        Err("log position out of range")
    );
    h.log_seq = SEQ_MAX;
    assert_eq!(
        SnapshotHeader::decode(&h.encode()).unwrap().log_seq,
        SEQ_MAX
    );

    // A log file that claims to start there is an unreadable header, not an overflow.
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 1, u64::MAX - 1, &[b"{}", b"{\"a\":1}"]);
    let mut r = LogReader::open(dir.path(), 0, 0).unwrap();
    assert!(r.next_record().unwrap().is_none());
    assert_eq!(r.report().bad_headers, 1);
    assert_eq!(r.next_seq(), 1);
    let mut w = LogWriter::resume(dir.path(), 0, r.next_seq(), log_config()).unwrap();
    assert_eq!(w.append(1, b"{}").unwrap(), 1);
    w.commit_durable().unwrap();
}

/// The largest valid position still reads: a file starting at `SEQ_MAX` is read after a snapshot
/// at `SEQ_MAX - 1` (its records run past it: they are not headers), and the log is exhausted
/// after it, so resuming is a typed error.
#[test]
fn log_at_seq_max_reads_back() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 1, SEQ_MAX, &[b"{}", b"{\"a\":1}"]);
    let mut r = LogReader::open(dir.path(), 0, SEQ_MAX - 1).unwrap();
    let mut seqs = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        seqs.push(rec.seq);
    }
    assert_eq!(seqs, [SEQ_MAX, SEQ_MAX + 1]);
    assert!(!r.report().damaged());
    assert_eq!(r.next_seq(), SEQ_MAX + 2);
    assert!(matches!(
        LogWriter::resume(dir.path(), 0, r.next_seq(), log_config()),
        Err(LogError::Header { .. })
    ));
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
}

/// fuzz/log, built mode, input `01 49 c2 7c e6 05 0a 00 00 00 ff ff ...` (after a snapshot at
/// `SEQ_MAX`; five records from `SEQ_MAX - 4` in one file, then an empty file starting right
/// after them, at `SEQ_MAX + 1`). The reader reports the second file's header as bad, as it
/// should: no writer starts a file past `SEQ_MAX`. The target's model had counted the files as
/// sound; it now counts a file it starts past `SEQ_MAX` as damage. The records of the sound
/// file are read, and the exhausted log refuses to resume with a typed error.
#[test]
fn a_log_file_starting_past_seq_max_is_a_bad_header_beside_sound_ones() {
    let dir = tempfile::tempdir().unwrap();
    let records: [&[u8]; 5] = [b"{}", b"{\"a\":1}", b"{}", b"{}", b"{\"b\":2}"];
    write_log(dir.path(), 1, SEQ_MAX - 4, &records);
    write_log(dir.path(), 2, SEQ_MAX + 1, &[]);
    for (after, want) in [(SEQ_MAX, vec![]), (SEQ_MAX - 2, vec![SEQ_MAX - 1, SEQ_MAX])] {
        let mut r = LogReader::open(dir.path(), 0, after).unwrap();
        let mut seqs = Vec::new();
        while let Some(rec) = r.next_record().unwrap() {
            seqs.push(rec.seq);
        }
        assert_eq!(seqs, want, "after {after}");
        assert_eq!(r.report().bad_headers, 1);
        assert_eq!(r.next_seq(), SEQ_MAX + 1);
        assert!(matches!(
            LogWriter::resume(dir.path(), 0, r.next_seq(), log_config()),
            Err(LogError::Header { .. })
        ));
    }
}

/// fuzz/config, generated mode, input
/// `29 66 75 74 78 78 70 00 00 00 00 72 65 f3 5f 2a 73 6b 65 77 5f 6d 61 78 3e 3e 3e 3e 31 3e 75
/// 74 03 3b`, which stands for the text below: an idle timeout as long as a duration goes
/// (`as_ms` saturates at `i64::MAX`) plus any allowed lateness overflowed the slot-wheel check, a
/// panic with overflow checks, and in a release build a wrapped, negative sum that let such a
/// config through (in event-time mode). The sum now saturates; the check refuses it, naming the
/// key.
#[test]
fn idle_timeout_plus_lateness_does_not_overflow_the_wheel_check() {
    let found = r#"
[log]
level = ""
[[profile]]
name = "x-y_z"
key = "f107"
idle_timeout = "584542046090y"
allowed_lateness = "2h"
split_on_change = []
metadata = ["x", "x", "x"]
state = []
"#;
    // Durations past 100 years are now refused where they are read; below that the sum cannot
    // overflow, and the wheel check names the key.
    let e = Config::from_toml(found).unwrap_err();
    assert!(
        e.message.contains("longer than the limit of 100 years"),
        "{e}"
    );
    for (idle, lateness) in [
        ("18446744073709551615s", "1s"),
        ("1s", "18446744073709551615s"),
        ("18446744073709551615s", "18446744073709551615s"),
    ] {
        let text = format!(
            "[[profile]]\nname = \"web\"\nkey = \"user\"\ntime = \"event\"\n\
             timestamp = {{ field = \"ts\" }}\nidle_timeout = \"{idle}\"\n\
             allowed_lateness = \"{lateness}\"\n"
        );
        let e = Config::from_toml(&text).unwrap_err();
        assert!(
            e.message.contains("longer than the limit of 100 years"),
            "{e}"
        );
    }
    for (idle, lateness) in [("99y", "1s"), ("1s", "99y"), ("99y", "99y")] {
        let text = format!(
            "[[profile]]\nname = \"web\"\nkey = \"user\"\ntime = \"event\"\n\
             timestamp = {{ field = \"ts\" }}\nidle_timeout = \"{idle}\"\n\
             allowed_lateness = \"{lateness}\"\n"
        );
        let e = Config::from_toml(&text).unwrap_err();
        assert_eq!(e.key, "profile[0] (web).idle_timeout", "{e}");
        assert!(e.message.contains("does not fit the slot wheel"), "{e}");
    }
}

/// fuzz/config, generated mode, input (84 bytes)
/// `8f df 6e 00 00 00 00 30 00 00 00 00 31 2e 20 3d 7f a6 74 2e 70 00 30 00 00 00 00 31 2e 20 3d
/// 7f a6 74 2e 70 3b 6f 66 69 6c 65 bc 3d 6f 74 5b 5b 6c 69 5b 25 00 00 00 74 5d 20 23 0a 3b 6f
/// 66 69 6c 65 bc 3d 6f 74 5b 5b 6c 69 5b 25 00 00 00 74 5d 20 23 0a`, which stands for the text
/// below: a field path with a key segment over the decoder's 128 bytes passed validation (the
/// rule compiler checked only for empty segments), and `Rules::field_table`, which `run` and
/// `replay` call right after, panicked on it. The compiler now refuses the path, naming the key.
#[test]
fn field_path_segments_longer_than_the_decoder_takes_are_config_errors() {
    let found = r#"
[log]
level = ""
[[profile]]
name = "x-y_z"
key = "dev"
idle_timeout = "1m"
time = "processing"
timestamp = { field = "x", format = "epoch_s" }
[[profile.counter]]
name = "b"
[[profile.sub_session]]
name = "bad name"
key = "ctx"
ends_when = { field = "ctx.sssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssss", le = 542995456 }
[[profile.sub_session]]
name = "b"
key = "ctx.ssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssssss"
[[profile.sub_session.counter]]
name = "iot"
"#;
    let e = Config::from_toml(found).unwrap_err();
    assert!(
        e.key.starts_with("profile[0] (x-y_z).")
            && e.key.ends_with("sub_session (bad name).ends_when"),
        "{e}"
    );
    assert!(e.message.contains("131 bytes; the limit is 128"), "{e}");

    // At the limit the path is fine, and the field table the runtime builds from it too.
    let ok = |segment: usize| {
        Config::from_toml(&format!(
            "[[profile]]\nname = \"web\"\nkey = \"a.{}\"\nidle_timeout = \"1m\"\n",
            "k".repeat(segment)
        ))
    };
    let cfg = ok(128).unwrap();
    let rules = Rules::compile(&cfg).unwrap();
    assert_eq!(rules.field_table().len(), 1);
    let e = ok(129).unwrap_err();
    assert_eq!(e.key, "profile[0] (web).key", "{e}");
}

/// fuzz/log, built mode, input `05 04 01 00 00 00 7d 01 00`: starting after a snapshot at
/// exactly `SEQ_MAX`, with log files that hold nothing after it, the writer resumed at
/// `SEQ_MAX + 1` and wrote a file whose header the reader refuses as out of range: the appended
/// record was unreadable at the next recovery. Starting a file past `SEQ_MAX` is now a typed
/// error (the log is exhausted), and nothing is written.
#[test]
fn resuming_the_log_past_seq_max_is_an_error_not_an_unreadable_file() {
    let dir = tempfile::tempdir().unwrap();
    write_log(dir.path(), 1, 0, &[]);
    let mut r = LogReader::open(dir.path(), 0, SEQ_MAX).unwrap();
    assert!(r.next_record().unwrap().is_none());
    assert_eq!(r.next_seq(), SEQ_MAX + 1);
    match LogWriter::resume(dir.path(), 0, r.next_seq(), log_config()) {
        Err(e @ LogError::Header { .. }) => assert_eq!(e.label(), "header"),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a log file was started past SEQ_MAX"),
    }
    assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    // At SEQ_MAX itself the file is written, and its record read back.
    let mut w = LogWriter::resume(dir.path(), 0, SEQ_MAX, log_config()).unwrap();
    assert_eq!(w.append(7, b"{}").unwrap(), SEQ_MAX);
    w.commit_durable().unwrap();
    drop(w);
    let mut r = LogReader::open(dir.path(), 0, SEQ_MAX - 1).unwrap();
    assert_eq!(r.next_record().unwrap().map(|rec| rec.seq), Some(SEQ_MAX));
    assert!(r.next_record().unwrap().is_none());
    assert!(!r.report().damaged(), "{:?}", r.report());
}

/// fuzz/snapshot, body mode (a mutated seed archive, 1.6 KB, so rebuilt here): a record whose
/// `payload_off` is near `u64::MAX` overflowed `inspect-snapshot --sessions` while it cut the
/// record's key out of the payload (records are checked one by one only on restore, so a
/// checksum-valid archive may hold any offset). The key is now read with a checked range and
/// printed empty when the range is out of the payload.
#[test]
fn inspect_prints_a_record_with_a_wild_payload_offset() {
    use sessionizer::engine::snapshot::{RecordImage, SnapshotBody};
    use sessionizer::persist::inspect::inspect;
    use sessionizer::persist::snapshot_file::{file_name, LoadedSnapshot};

    let body = SnapshotBody {
        format: BODY_FORMAT,
        shard: 0,
        shards: 1,
        generation: 1,
        payload: b"alice".to_vec(),
        records: vec![
            RecordImage {
                id: 1,
                payload_off: u64::MAX - 2,
                payload_len: 5,
                key_len: 5,
                ..RecordImage::default()
            },
            RecordImage {
                id: 2,
                payload_off: 0,
                payload_len: 5,
                key_len: 5,
                ..RecordImage::default()
            },
        ],
        ..SnapshotBody::default()
    };
    let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&body).unwrap();
    let header = SnapshotHeader {
        version: FORMAT_VERSION,
        shard: 0,
        shards: 1,
        generation: 1,
        body_len: bytes.len() as u64,
        body_crc32: crc32fast::hash(&bytes),
        wall_ms: 0,
        log_seq: 0,
        id_seq: 0,
        min_clock_ms: i64::MIN,
        wheel_cursor_s: 0,
        sessions: 2,
        sub_sessions: 0,
        config_len: 0,
        config_crc32: 0,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(file_name(0, 1));
    let mut file = header.encode().to_vec();
    file.extend_from_slice(&bytes);
    fs::write(&path, &file).unwrap();
    assert!(LoadedSnapshot::open(&path).is_ok(), "the archive validates");

    let mut out = Vec::new();
    inspect(&path, true, &mut out).unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.contains(r#""key":"","#), "{text}");
    assert!(text.contains(r#""key":"alice","#), "{text}");
}

/// Found while writing the snapshot target, by reading the restore next to it (the target had
/// not reached it in its runs): a checksum-valid archive whose profile images name the current
/// profiles with the right fingerprints, but mark a sub-session kind as top-level (`parent` =
/// `u32::MAX`), passed the exact-restore plan, and the wheel relink indexed the wheels with the
/// sub-session kind's id, past their end: a panic at recovery. The opposite forgery (a top-level
/// profile marked as a sub-session kind) skipped the check of its wheel cursor and restored an
/// unchecked one. An image whose kind disagrees with the current profile now makes the restore
/// compact, which checks what it uses.
#[test]
fn snapshot_images_whose_kind_disagrees_with_the_rules_restore_compactly() {
    use sessionizer::decode::Decoder;
    use sessionizer::engine::snapshot::{
        fnv1a64, profile_descriptors, ProfileImage, SlotRun, SnapshotBody,
    };
    use sessionizer::engine::{Clock, Engine, Out};
    use sessionizer::persist::snapshot_file::access_body;
    use std::sync::Arc;

    let text = r#"
[memory]
arena_bytes = "256KiB"
max_sessions = 64
[slots]
max = 600
[[profile]]
name = "web"
key = "user"
idle_timeout = "60s"
[[profile.sub_session]]
name = "tab"
key = "tab"
"#;
    let cfg = Config::from_toml(text).unwrap();
    let rules = Arc::new(Rules::compile(&cfg).unwrap());
    let descriptors = profile_descriptors(&rules);
    assert_eq!(descriptors.len(), 2, "web and web/tab");
    // (forged parent of each image, wheel cursor of each image)
    let forgeries: [([u32; 2], [i64; 2]); 2] =
        [([u32::MAX, u32::MAX], [0, 0]), ([0, 0], [i64::MIN, 0])];
    for (parents, cursors) in forgeries {
        let body = SnapshotBody {
            format: BODY_FORMAT,
            shard: 0,
            shards: 1,
            table_capacity: 64,
            slots_max: 600,
            profiles: descriptors
                .iter()
                .zip(parents.iter().zip(cursors))
                .map(|((name, descriptor, _), (&parent, cursor))| ProfileImage {
                    name: name.clone(),
                    descriptor: descriptor.clone(),
                    fingerprint: fnv1a64(descriptor.as_bytes()),
                    parent,
                    max_ts: i64::MIN,
                    wall_last: i64::MIN,
                    wheel_cursor_s: cursor,
                    ..ProfileImage::default()
                })
                .collect(),
            free_runs: vec![SlotRun { start: 0, len: 64 }],
            ..SnapshotBody::default()
        };
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&body).unwrap();
        let archived = access_body(&bytes).unwrap();
        let mut engine = Engine::new(rules.clone(), &cfg, 0, None).unwrap();
        let report = engine.restore_from(archived, 1, 0);
        assert!(!report.exact, "{parents:?}: {report:?}");
        assert_eq!(report.dropped(), 0, "{report:?}");

        // The engine works afterwards.
        let mut dec = Decoder::new(rules.field_table(), 32, 4096);
        let mut out = Out::with_capacity(1 << 16, 64);
        let ev = dec.decode(br#"{"user":"u","tab":"t"}"#).unwrap();
        engine.on_event(0, &ev, Clock::Wall(1_700_000_000_000), &mut out);
        engine.advance(Clock::Wall(1_700_000_100_000), &mut out);
        engine.finish(&mut out);
        assert_eq!(engine.live_sessions(), 0);
    }
}

/// fuzz/snapshot, body mode (found once the target's own headers carried the current format
/// version, so that its mutated archives reached the restore again): an archived profile clock
/// far outside any real time (`wall_last` near `i64::MIN`, a `max_ts` near `i64::MAX`) was
/// restored as it was, and the first event on the wall clock overflowed the watermark's
/// arithmetic. Archived clocks outside the range of record timestamps are now not taken: the
/// profile's clock starts over.
#[test]
fn archived_clocks_out_of_range_are_not_restored() {
    use sessionizer::decode::Decoder;
    use sessionizer::engine::snapshot::{
        fnv1a64, profile_descriptors, ProfileImage, SlotRun, SnapshotBody,
    };
    use sessionizer::engine::{Clock, Engine, Out};
    use sessionizer::persist::snapshot_file::access_body;
    use std::sync::Arc;

    let text = r#"
[memory]
arena_bytes = "256KiB"
max_sessions = 64
[[profile]]
name = "iot"
key = "dev"
time = "event"
timestamp = { field = "ets" }
allowed_lateness = "20s"
idle_timeout = "60s"
"#;
    let cfg = Config::from_toml(text).unwrap();
    let rules = Arc::new(Rules::compile(&cfg).unwrap());
    let descriptors = profile_descriptors(&rules);
    for (max_ts, wall_last) in [
        (1_700_000_000_000, i64::MIN + 1),
        (i64::MAX - 1, 1_700_000_000_000),
        (i64::MIN + 1, 1_700_000_000_000),
    ] {
        let body = SnapshotBody {
            format: BODY_FORMAT,
            shard: 0,
            shards: 1,
            table_capacity: 64,
            slots_max: cfg.slots.max,
            profiles: descriptors
                .iter()
                .map(|(name, descriptor, parent)| ProfileImage {
                    name: name.clone(),
                    descriptor: descriptor.clone(),
                    fingerprint: fnv1a64(descriptor.as_bytes()),
                    parent: *parent,
                    max_ts,
                    wall_last,
                    ..ProfileImage::default()
                })
                .collect(),
            free_runs: vec![SlotRun { start: 0, len: 64 }],
            ..SnapshotBody::default()
        };
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&body).unwrap();
        let mut engine = Engine::new(rules.clone(), &cfg, 0, None).unwrap();
        let report = engine.restore_from(access_body(&bytes).unwrap(), 1, 0);
        assert_eq!(report.dropped(), 0, "{report:?}");

        let mut dec = Decoder::new(rules.field_table(), 32, 4096);
        let mut out = Out::with_capacity(1 << 16, 64);
        let ev = dec.decode(br#"{"dev":"d","ets":1700000000000}"#).unwrap();
        engine.on_event(0, &ev, Clock::Wall(1_700_000_000_500), &mut out);
        engine.advance(Clock::Wall(1_700_000_100_000), &mut out);
        assert_eq!(engine.live_sessions(), 0, "{max_ts} {wall_last}");
    }
}

/// A small engine with one processing-time profile keyed by `user` (the archives below).
const SMALL_WEB: &str = r#"
[memory]
arena_bytes = "256KiB"
max_sessions = 64
[[profile]]
name = "web"
key = "user"
idle_timeout = "60s"
"#;

/// fuzz/snapshot, body mode (`fuzz/corpus/snapshot/body-two-sessions-of-a-key`, a mutated seed
/// archive whose records give one key of a processing-time profile two open sessions, the
/// later one with an open sub-session): an event of that key merged the two, the absorbed
/// session was freed with its sub-session still open and linked to it, and the sub-session's
/// expiry then read its parent's freed slot (a panic). Live, such a profile never holds two
/// sessions of a key; the merge now ends the absorbed session's sub-sessions (`parent_ended`).
/// Restoring one archive twice into an engine makes the same state.
#[test]
fn a_merge_ends_the_sub_sessions_of_the_session_it_absorbs() {
    use sessionizer::decode::Decoder;
    use sessionizer::engine::{Clock, Engine, Out};
    use sessionizer::persist::snapshot_file::access_body;

    let text = format!(
        r#"{SMALL_WEB}[[profile.sub_session]]
name = "tab"
key = "tab"
idle_timeout = "30s"
"#
    );
    let t0 = 1_700_000_000_000;
    let (cfg, rules, bytes) = archive_after(&text, &[r#"{"user":"u","tab":"t"}"#], t0);
    let body = access_body(&bytes).unwrap();
    let mut dec = Decoder::new(rules.field_table(), 32, 4096);
    let mut out = Out::with_capacity(1 << 16, 64);

    let mut engine = Engine::new(rules.clone(), &cfg, 0, None).unwrap();
    for _ in 0..2 {
        let report = engine.restore_from(body, 1, 0);
        assert_eq!((report.sessions, report.sub_sessions), (1, 1), "{report:?}");
    }
    out.clear();
    let ev = dec.decode(br#"{"user":"u"}"#).unwrap();
    engine.on_event(0, &ev, Clock::Wall(t0 + 1_000), &mut out);
    let kinds: Vec<String> = out
        .iter()
        .map(|(_, l)| serde_json::from_slice::<serde_json::Value>(l).unwrap())
        .filter_map(|v| Some(format!("{} {}", v["kind"].as_str()?, v["reason"])))
        .collect();
    assert_eq!(
        kinds,
        ["sub_session_end \"parent_ended\"", "session_merged null"],
        "{kinds:?}"
    );
    assert_eq!(engine.live_sessions(), 2, "the survivor and its tab");
    engine.advance(Clock::Wall(t0 + 600_000), &mut out);
    assert_eq!(engine.live_sessions(), 0);
}

/// fuzz/snapshot, body mode (`fuzz/corpus/snapshot/body-two-chains-of-a-key`): an archive whose
/// two sessions of one key each head a chain of their own passed the exact restore's checks
/// (each chain is well formed), and both were indexed under the key. Ending the one the index
/// does not answer for walked the other's chain without finding it (a panic). The exact restore
/// now inserts one index entry per key and, finding a second, restores compactly, which chains
/// them. Made here by renaming one key of a real archive to the other.
#[test]
fn two_chains_of_one_key_restore_compactly() {
    use sessionizer::engine::{Clock, Engine, Out};
    use sessionizer::persist::snapshot_file::access_body;

    let t0 = 1_700_000_000_000;
    let lines = [r#"{"user":"key-A"}"#, r#"{"user":"key-B"}"#];
    let (cfg, rules, mut bytes) = archive_after(SMALL_WEB, &lines, t0);
    let mut out = Out::with_capacity(1 << 16, 64);
    let at = bytes
        .windows(5)
        .position(|w| w == b"key-B")
        .expect("the key in the payload");
    bytes[at + 4] = b'A';
    let body = access_body(&bytes).unwrap();

    let mut engine = Engine::new(rules.clone(), &cfg, 0, None).unwrap();
    let report = engine.restore_from(body, 1, 0);
    assert!(!report.exact, "{report:?}");
    assert_eq!((report.sessions, report.dropped()), (2, 0), "{report:?}");
    out.clear();
    engine.advance(Clock::Wall(t0 + 600_000), &mut out);
    assert_eq!(engine.live_sessions(), 0);
    let ends = out
        .iter()
        .filter(|(_, l)| l.windows(11).any(|w| w == b"session_end"))
        .count();
    assert_eq!(ends, 2);
}

/// An engine on `text`'s rules fed `lines` (profile 0, on the wall clock at `t0`): its config,
/// its rules and the archive of its state, as the restore regressions start from.
fn archive_after(
    text: &str,
    lines: &[&str],
    t0: i64,
) -> (Config, std::sync::Arc<Rules>, rkyv::util::AlignedVec<16>) {
    use sessionizer::decode::Decoder;
    use sessionizer::engine::snapshot::SnapshotMeta;
    use sessionizer::engine::{Clock, Engine, Out};

    let cfg = Config::from_toml(text).unwrap();
    let rules = std::sync::Arc::new(Rules::compile(&cfg).unwrap());
    let mut dec = Decoder::new(rules.field_table(), 32, 4096);
    let mut out = Out::with_capacity(1 << 16, 64);
    let mut engine = Engine::new(rules.clone(), &cfg, 0, None).unwrap();
    for line in lines {
        let ev = dec.decode(line.as_bytes()).unwrap();
        engine.on_event(0, &ev, Clock::Wall(t0), &mut out);
    }
    let meta = SnapshotMeta {
        shard: 0,
        shards: 1,
        generation: 1,
        wall_ms: t0,
        log_seq: 0,
    };
    let mut bytes = rkyv::util::AlignedVec::<16>::new();
    engine.write_snapshot(&mut bytes, meta).unwrap();
    (cfg, rules, bytes)
}
