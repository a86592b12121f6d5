//! Event-log reading (`persist::log::LogReader`) over damaged files, and resuming a writer after
//! it, as recovery does.
//!
//! The first byte picks the mode: up to three raw files, or well-formed files built from a model
//! (records with fuzzer-chosen bytes and times, files covering consecutive, overlapping or gapped
//! ranges of them, first sequence numbers at the edges of u64) that are then damaged (cut, a byte
//! flipped, zeros or garbage appended, a header overwritten, a file removed). A file that starts
//! past `SEQ_MAX`, which no writer produces, counts as damage too. The reader starts
//! after a fuzzer-chosen sequence, as after a snapshot. Checked:
//! - nothing panics; reading never fails (damage is reported, not an error: the files are on
//!   tmpfs, so there is no real I/O error);
//! - the records returned are numbered `after + 1, after + 2, ...` without a hole, and in the
//!   built mode each is exactly the model's record of that number;
//! - undamaged, gap-free files give back every record after the start, with nothing reported;
//! - reading again returns the same records and finds no torn tail (the first read truncated it);
//! - a writer resumed at `next_seq` continues the log: when the first read met no gap and no
//!   corruption, a new read returns the old records and then the new one; past `SEQ_MAX` (only
//!   after a crafted start position) resuming is a typed error, not a file nobody can read.

#![no_main]

use std::path::Path;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use sessionizer::config::FsyncPolicy;
use sessionizer::persist::log::{
    file_name, LogConfig, LogError, LogHeader, LogReadReport, LogReader, LogWriter,
    FORMAT_VERSION, FRAME_HEADER_BYTES, HEADER_BYTES, SEQ_MAX,
};
use sessionizer_fuzz::{clear_dir, scratch_dir, Bytes};

/// One record of the model: (sequence, wall ms, raw bytes).
type Record = (u64, i64, Vec<u8>);

fuzz_target!(|data: &[u8]| {
    let mut b = Bytes::new(data);
    let mode = b.u8();
    let dir = scratch_dir();
    clear_dir(dir);
    // Recovery starts after a loaded snapshot's log position, which validation bounds.
    let after_seq = b.interesting_u64().min(SEQ_MAX);
    let model = if mode & 1 == 0 {
        raw_files(&mut b, dir);
        None
    } else {
        Some(built_files(&mut b, dir))
    };
    check(dir, after_seq, model.as_ref());
});

fn raw_files(b: &mut Bytes<'_>, dir: &Path) {
    let files = 1 + b.below(3);
    for g in 1..=files {
        let bytes = if g == files {
            b.rest()
        } else {
            let len = usize::from(b.u16());
            b.take_exact(len)
        };
        std::fs::write(dir.join(file_name(0, g as u64)), bytes).expect("write a log file");
    }
}

fn frame(out: &mut Vec<u8>, wall_ms: i64, raw: &[u8]) {
    let len = raw.len() as u32;
    let mut h = crc32fast::Hasher::new();
    h.update(&len.to_le_bytes());
    h.update(&wall_ms.to_le_bytes());
    h.update(raw);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(&wall_ms.to_le_bytes());
    out.extend_from_slice(raw);
}

/// The model's records and the files written from them; returns (damaged?, records).
struct Model {
    records: Vec<Record>,
    /// The files cover the records from the first file's start to the end, without a hole.
    gap_free: bool,
    damaged: bool,
    first_seq: u64,
}

fn built_files(b: &mut Bytes<'_>, dir: &Path) -> Model {
    let first_seq = b.interesting_u64();
    let count = b.below(12);
    let mut records = Vec::new();
    for i in 0..count as u64 {
        let Some(seq) = first_seq.checked_add(i) else {
            break;
        };
        let wall = b.u64() as i64;
        records.push((seq, wall, b.take(40).to_vec()));
    }
    // Files: each starts at or before where the previous ended (a rewrite after a failed fsync
    // repeats records), or after it (a hole).
    let files = 1 + b.below(3);
    let mut start = 0usize;
    let mut gap_free = true;
    let mut damaged_header = false;
    for g in 1..=files {
        let end = if g == files {
            records.len()
        } else {
            (start + b.below(records.len() + 1)).min(records.len())
        };
        let seq = first_seq.wrapping_add(start as u64);
        // The writer never starts a file past SEQ_MAX (resuming there is a typed error), and the
        // reader reports such a header as bad: a file the model writes there is damage.
        if seq > SEQ_MAX {
            damaged_header = true;
        }
        let header = LogHeader {
            version: FORMAT_VERSION,
            shard: 0,
            generation: g as u64,
            first_seq: seq,
            created_wall_ms: 1_700_000_000_000,
        };
        let mut bytes = header.encode().to_vec();
        for r in &records[start..end] {
            frame(&mut bytes, r.1, &r.2);
        }
        std::fs::write(dir.join(file_name(0, g as u64)), &bytes).expect("write a log file");
        // The next file starts back a little, right here, or further on.
        let next = match b.u8() % 4 {
            0 => end.saturating_sub(b.below(3)),
            1 => {
                gap_free &= end == records.len();
                (end + 1 + b.below(2)).min(records.len())
            }
            _ => end,
        };
        start = next.min(records.len());
        if start > end {
            gap_free = false;
        }
    }
    let mut damaged = damaged_header;
    for _ in 0..b.below(4) {
        damaged = true;
        let g = 1 + b.below(files) as u64;
        let path = dir.join(file_name(0, g));
        let Ok(mut bytes) = std::fs::read(&path) else {
            continue;
        };
        match b.u8() % 6 {
            0 => bytes.truncate(b.below(bytes.len() + 1)),
            1 => {
                if !bytes.is_empty() {
                    let at = b.below(bytes.len());
                    bytes[at] ^= 1 << (b.u8() % 8);
                }
            }
            2 => bytes.extend(std::iter::repeat_n(
                0u8,
                b.below(2 * FRAME_HEADER_BYTES + 8),
            )),
            3 => bytes.extend_from_slice(b.take(32)),
            4 => {
                let n = b.below(HEADER_BYTES).min(bytes.len());
                let junk = b.take(n);
                bytes[..junk.len()].copy_from_slice(junk);
            }
            _ => {
                let _ = std::fs::remove_file(&path);
                continue;
            }
        }
        std::fs::write(&path, &bytes).expect("rewrite a log file");
    }
    Model {
        records,
        gap_free,
        damaged,
        first_seq,
    }
}

/// Reads every record after `after_seq`: the records, the report and `next_seq`.
fn read_all(dir: &Path, after_seq: u64) -> (Vec<Record>, LogReadReport, u64) {
    let mut reader = LogReader::open(dir, 0, after_seq).expect("list the scratch directory");
    let mut got = Vec::new();
    while let Some(r) = reader
        .next_record()
        .expect("damage is reported, never an error")
    {
        got.push((r.seq, r.wall_ms, r.raw.to_vec()));
    }
    (got, reader.report().clone(), reader.next_seq())
}

fn check(dir: &Path, after_seq: u64, model: Option<&Model>) {
    let (got, report, next_seq) = read_all(dir, after_seq);

    assert_eq!(report.records, got.len() as u64);
    for (i, r) in got.iter().enumerate() {
        let want = after_seq as u128 + 1 + i as u128;
        assert_eq!(
            u128::from(r.0),
            want,
            "records are numbered after the start, without a hole"
        );
    }
    if let Some(last) = got.last() {
        assert_eq!(u128::from(next_seq), u128::from(last.0) + 1);
    }
    if let Some(m) = model {
        for r in &got {
            let i = r.0 - m.first_seq;
            assert_eq!(
                Some(r),
                m.records.get(i as usize),
                "a record differs from what was written"
            );
        }
        let starts_in_time = m.first_seq as u128 <= after_seq as u128 + 1;
        if !m.damaged && m.gap_free && starts_in_time {
            let want: Vec<&Record> = m.records.iter().filter(|r| r.0 > after_seq).collect();
            assert_eq!(
                got.iter().collect::<Vec<_>>(),
                want,
                "undamaged records were lost"
            );
            assert!(
                !report.damaged(),
                "damage reported on sound files: {report:?}"
            );
        }
    }

    // Recovery is repeatable: the torn tail is gone, the records are the same.
    let (again, report2, next2) = read_all(dir, after_seq);
    assert_eq!(again, got, "a second read differs");
    assert_eq!(report2.torn_tails, 0, "a torn tail survived its truncation");
    assert_eq!(next2, next_seq);

    // A writer resumed where the reader stopped continues the log.
    let cfg = LogConfig {
        fsync: FsyncPolicy::Always,
        fsync_interval: Duration::from_millis(10),
        buffer_bytes: 1 << 12,
    };
    if next_seq > SEQ_MAX {
        // Past the last sequence a header may carry, the log is exhausted: a typed error.
        assert!(matches!(
            LogWriter::resume(dir, 0, next_seq, cfg),
            Err(LogError::Header { .. })
        ));
        return;
    }
    let mut w = LogWriter::resume(dir, 0, next_seq, cfg).expect("resume the log");
    let seq = w.append(42, b"{\"resumed\":true}").expect("append");
    assert_eq!(seq, next_seq.max(1));
    w.commit_durable().expect("commit");
    drop(w);
    if report.gap.is_none() && report.corrupt.is_empty() {
        let (after, _, _) = read_all(dir, after_seq);
        let mut want = got.clone();
        if seq > after_seq {
            want.push((seq, 42, b"{\"resumed\":true}".to_vec()));
        }
        assert_eq!(after, want, "the resumed log does not continue the old one");
    }
}
