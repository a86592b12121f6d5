//! `sessionizer inspect-snapshot PATH [--sessions]`: prints a snapshot file's header, whether
//! it validates, its profiles and a summary (sessions per profile, sub-sessions, start-time range,
//! id sequence), and with `--sessions` one JSON line per session.
//!
//! The header is printed before the body is validated, so a damaged file still shows what it
//! claims to be; the function then returns the validation error. It reads the file through the
//! same validation as recovery and never modifies it.

use std::io::Write;
use std::path::Path;

use super::snapshot_file::{LoadedSnapshot, SnapshotHeader, HEADER_BYTES};
use crate::decode::write_json_string;
use crate::engine::out::{write_i64, write_id, write_u64};
use crate::engine::snapshot::RECORD_FLAG_SUB;

/// Writes the configuration text the snapshot at `path` keeps (after validating the whole
/// file); errs when it keeps none (format version 2, or a configuration too large to keep).
pub fn kept_config(path: &Path, out: &mut dyn Write) -> Result<(), String> {
    let snap = LoadedSnapshot::open(path).map_err(|e| e.to_string())?;
    let text = snap.config().ok_or_else(|| {
        format!(
            "keeps no configuration (format version {})",
            snap.header().version
        )
    })?;
    out.write_all(text.as_bytes())
        .map_err(|e| format!("writing the configuration: {e}"))
}

pub fn inspect(path: &Path, sessions: bool, out: &mut dyn Write) -> Result<(), String> {
    let io = |e: std::io::Error| format!("writing the report: {e}");
    let mut head = [0u8; HEADER_BYTES];
    let read = std::fs::File::open(path)
        .and_then(|f| {
            use std::os::unix::fs::FileExt;
            f.read_at(&mut head, 0)
        })
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let header =
        SnapshotHeader::decode(&head[..read]).map_err(|e| format!("{}: {e}", path.display()))?;
    print_header(path, &header, out).map_err(io)?;
    let snap = LoadedSnapshot::open(path).map_err(|e| {
        let _ = writeln!(out, "valid:          no ({e})");
        e.to_string()
    })?;
    let body = snap.body();
    let records = body.records.as_slice();
    let subs = records
        .iter()
        .filter(|r| r.flags & RECORD_FLAG_SUB != 0)
        .count() as u64;
    let top = records.len() as u64 - subs;
    // Recovery does not read the header's counts, but a header that misstates them is not the
    // header of this body.
    if (header.sessions, header.sub_sessions) != (top, subs) {
        let e = format!(
            "the header counts {} sessions and {} sub-sessions, the body holds {top} and {subs}",
            header.sessions, header.sub_sessions
        );
        let _ = writeln!(out, "valid:          no ({e})");
        return Err(e);
    }
    writeln!(
        out,
        "valid:          yes (header, length, body CRC-32, archive and counts checked)"
    )
    .map_err(io)?;
    writeln!(
        out,
        "table:          capacity {} slots, {} free runs; wheel {} one-second slots",
        body.table_capacity.to_native(),
        body.free_runs.len(),
        body.slots_max.to_native()
    )
    .map_err(io)?;

    let profiles = body.profiles.as_slice();
    let mut per_profile = vec![0u64; profiles.len()];
    let (mut start_min, mut start_max) = (i64::MAX, i64::MIN);
    let mut payload_bytes = 0u64;
    for r in records {
        if let Some(n) = per_profile.get_mut(r.profile as usize) {
            *n += 1;
        }
        if r.flags & RECORD_FLAG_SUB == 0 {
            start_min = start_min.min(r.start_ts.to_native());
            start_max = start_max.max(r.start_ts.to_native());
        }
        payload_bytes += u64::from(r.payload_len.to_native());
    }
    writeln!(out, "profiles:").map_err(io)?;
    for (i, p) in profiles.iter().enumerate() {
        let clock = if p.parent.to_native() == u32::MAX {
            format!(
                " max_ts {} wall_last {} wheel_cursor_s {}",
                ts(p.max_ts.to_native()),
                ts(p.wall_last.to_native()),
                p.wheel_cursor_s.to_native()
            )
        } else {
            String::new()
        };
        writeln!(
            out,
            "  [{i}] {}: {} records; fingerprint {:016x};{clock}",
            p.name.as_str(),
            per_profile[i],
            p.fingerprint.to_native()
        )
        .map_err(io)?;
        writeln!(out, "      {}", p.descriptor.as_str()).map_err(io)?;
    }
    writeln!(out, "summary:").map_err(io)?;
    writeln!(
        out,
        "  sessions:     {top} top-level, {subs} sub-sessions, {payload_bytes} payload bytes"
    )
    .map_err(io)?;
    if start_min <= start_max {
        writeln!(
            out,
            "  start_ts:     {} .. {}",
            ts(start_min),
            ts(start_max)
        )
        .map_err(io)?;
    }
    writeln!(out, "  id sequence:  {}", body.id_seq.to_native()).map_err(io)?;

    if sessions {
        let payload = body.payload.as_slice();
        let mut line = Vec::with_capacity(256);
        let mut parent_id = 0u64;
        for r in records {
            line.clear();
            let off = r.payload_off.to_native() as usize;
            let key_len = r.key_len.to_native() as usize;
            // Records are validated one by one only on restore: the range may be anything.
            let key = off
                .checked_add(key_len)
                .and_then(|end| payload.get(off..end))
                .unwrap_or(b"");
            let is_sub = r.flags & RECORD_FLAG_SUB != 0;
            if !is_sub {
                parent_id = r.id.to_native();
            }
            line.extend_from_slice(b"{\"id\":");
            write_id(&mut line, r.id.to_native());
            line.extend_from_slice(b",\"profile\":");
            write_u64(&mut line, u64::from(r.profile));
            line.extend_from_slice(b",\"profile_name\":");
            let name = profiles
                .get(r.profile as usize)
                .map_or("?", |p| p.name.as_str());
            write_json_string(name.as_bytes(), &mut line);
            line.extend_from_slice(b",\"key\":");
            // A sub-session's key is its parent's id (8 bytes) and then its own key value.
            write_json_string(
                if is_sub {
                    key.get(8..).unwrap_or(b"")
                } else {
                    key
                },
                &mut line,
            );
            if is_sub {
                line.extend_from_slice(b",\"parent_id\":");
                write_id(&mut line, parent_id);
            }
            line.extend_from_slice(b",\"start_ts\":");
            write_i64(&mut line, r.start_ts.to_native());
            line.extend_from_slice(b",\"last_ts\":");
            write_i64(&mut line, r.last_ts.to_native());
            line.extend_from_slice(b",\"count\":");
            write_u64(&mut line, u64::from(r.count.to_native()));
            line.extend_from_slice(b",\"payload_len\":");
            write_u64(&mut line, u64::from(r.payload_len.to_native()));
            line.extend_from_slice(b"}\n");
            out.write_all(&line).map_err(io)?;
        }
    }
    Ok(())
}

fn print_header(path: &Path, h: &SnapshotHeader, out: &mut dyn Write) -> std::io::Result<()> {
    writeln!(out, "file:           {}", path.display())?;
    writeln!(out, "format:         SZSNAP01 version {}", h.version)?;
    writeln!(out, "shard:          {} of {}", h.shard, h.shards)?;
    writeln!(out, "generation:     {}", h.generation)?;
    writeln!(out, "written:        {}", ts(h.wall_ms))?;
    writeln!(
        out,
        "body:           {} bytes, CRC-32 {:08x}",
        h.body_len, h.body_crc32
    )?;
    if h.config_len > 0 {
        writeln!(
            out,
            "configuration:  {} bytes, CRC-32 {:08x} (the rules' TOML, after the body)",
            h.config_len, h.config_crc32
        )?;
    } else {
        writeln!(out, "configuration:  none")?;
    }
    writeln!(
        out,
        "log_seq:        {} (recovery replays the log after this record)",
        h.log_seq
    )?;
    writeln!(out, "id_seq:         {}", h.id_seq)?;
    writeln!(out, "min clock:      {}", ts(h.min_clock_ms))?;
    writeln!(out, "wheel cursor:   {} s", h.wheel_cursor_s)?;
    writeln!(
        out,
        "sessions:       {} top-level, {} sub-sessions",
        h.sessions, h.sub_sessions
    )
}

/// Epoch milliseconds as RFC 3339 with the raw number, or `none`.
fn ts(ms: i64) -> String {
    if ms == i64::MIN {
        return "none".into();
    }
    match u64::try_from(ms) {
        Ok(v) if v < 253_402_300_800_000 => {
            let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(v);
            format!("{} ({ms})", humantime::format_rfc3339_millis(t))
        }
        _ => ms.to_string(),
    }
}
