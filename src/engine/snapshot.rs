//! Engine state export and import: the body of a snapshot file (`docs/storage-format.md`).
//!
//! Export ([`Captured::write_body`]) streams an rkyv 0.8 archive of [`SnapshotBody`] from a
//! capture (`capture.rs`: every session live at the cut, copied with its head as at the cut, and
//! the cut's clocks, wheels and free list) into any `io::Write`; it does not need the engine, so
//! the runtime runs it off the shard's executor. Records are listed in slot order, each top-level
//! session followed by its sub-sessions in the order of its sub-session slots, so a
//! sub-session's `parent` is the index of the nearest preceding top-level record; the wheel
//! buckets are rebuilt from the list heads at the cut and the captured heads' links (a bucket's
//! lanes back to back, which a restore's links put back into the same lanes). The
//! archive is the same, byte for byte, whether the capture was sliced between events or taken
//! in one call ([`Engine::write_snapshot`]).
//!
//! Import is `restore.rs`.

use std::io::{self, Write};

use rkyv::munge::munge;
use rkyv::rancor::{Fallible, Source};
use rkyv::ser::{Allocator, Writer, WriterExt};
use rkyv::vec::{ArchivedVec, VecResolver};
use rkyv::{Archive, Place, Serialize};

pub use super::capture::{CaptureBuffers, Captured};
use super::rules::{ProfileRule, Rules};
use super::table::{FLAGS_ENGINE, FLAG_WHEEL_LINKED, NIL};
use super::wheel::LANES;
use super::{Engine, FLAG_SUB, NONE_TS};

/// Version of the body layout below; bumped on any change to the archived types.
pub const BODY_FORMAT: u32 = 1;

/// `wheel.rs` marks the first entry of a list by storing `BUCKET_BIT | list` in `wheel_prev`.
/// Private there; duplicated here and pinned by the test `bucket_bit_matches_the_wheel`.
const WHEEL_BUCKET_BIT: u32 = 1 << 31;

/// Bit of [`RecordImage::flags`] marking a sub-session (the engine's own flag, stored as is).
pub const RECORD_FLAG_SUB: u8 = FLAG_SUB;

/// How many records ahead restore hashes keys and prefetches index buckets and heads.
pub(super) const PREFETCH_AHEAD: usize = 16;
/// Records per pass between two calls of a paced export's hook (well under a millisecond).
const PACE_RECORDS: usize = 4096;

/// Timestamps outside +-this many milliseconds (about year 33658) are rejected on import, so
/// deadline arithmetic cannot overflow.
pub(super) const TS_ABS_MAX: i64 = 1_000_000_000_000_000;

/// What the caller knows about the snapshot being written (the engine knows the rest).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotMeta {
    pub shard: u32,
    pub shards: u32,
    pub generation: u64,
    /// Wall time of the capture, epoch milliseconds.
    pub wall_ms: i64,
    /// Sequence of the last log record applied to the engine before the capture (0: none).
    pub log_seq: u64,
}

/// What `write_snapshot` wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotSummary {
    /// Top-level sessions.
    pub sessions: u64,
    pub sub_sessions: u64,
    pub payload_bytes: u64,
    /// Length of the archive written.
    pub body_bytes: u64,
    /// CRC-32 (IEEE, as `crc32fast`) of the archive written.
    pub body_crc32: u32,
    pub id_seq: u64,
    /// Smallest `max_ts` over profiles that have seen an event (`i64::MIN` if none has).
    pub min_clock_ms: i64,
    /// Smallest wheel cursor over profiles, in seconds.
    pub wheel_cursor_s: i64,
}

/// Outcome of [`Engine::restore_from`] for one archive.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreReport {
    /// Top-level sessions imported.
    pub sessions: u64,
    pub sub_sessions: u64,
    /// Records (and their sub-sessions) whose key another shard owns now.
    pub other_shard: u64,
    /// Records of a profile that changed or no longer exists, dropped: the snapshot kept no
    /// configuration that describes them (see `retired`).
    pub profile_changed: u64,
    /// Records of a profile that changed or no longer exists, checked against the rules of the
    /// configuration the snapshot kept, to be ended with them by
    /// [`super::Engine::end_unrestored`].
    pub retired: u64,
    /// Records that failed validation.
    pub invalid: u64,
    /// Records refused because the table or the arena is full.
    pub no_room: u64,
    /// Whether slots, free list, chains and wheel order were reproduced exactly.
    pub exact: bool,
    /// Names of archived profiles whose records were not imported.
    pub changed_profiles: Vec<String>,
    /// The records counted in `no_room` and `retired`, for [`super::Engine::end_unrestored`].
    pub unplaced: super::restore::Unplaced,
}

impl RestoreReport {
    pub fn dropped(&self) -> u64 {
        self.profile_changed + self.retired + self.invalid + self.no_room
    }
}

/// The archived root. Only its archived form is ever read; export writes it with a streaming
/// serializer and tests may build one by hand.
#[derive(Archive, Serialize, Debug, Default)]
pub struct SnapshotBody {
    pub format: u32,
    pub shard: u32,
    pub shards: u32,
    pub table_capacity: u32,
    pub slots_max: u32,
    pub generation: u64,
    pub log_seq: u64,
    pub wall_ms: i64,
    /// `IdGen::seq` at capture.
    pub id_seq: u64,
    /// One per record profile (top-level profiles, then sub-session kinds), by old index.
    pub profiles: Vec<ProfileImage>,
    /// The table's free list, in order, as runs of consecutive ascending slots.
    pub free_runs: Vec<SlotRun>,
    /// Every record's payload, concatenated in record order.
    pub payload: Vec<u8>,
    pub records: Vec<RecordImage>,
}

#[derive(Archive, Serialize, Debug, Clone, Default)]
pub struct ProfileImage {
    /// Profile name; `parent/sub` for a sub-session kind.
    pub name: String,
    /// Human-readable text the fingerprint hashes (shown by `inspect-snapshot`).
    pub descriptor: String,
    /// FNV-1a 64 of `descriptor`.
    pub fingerprint: u64,
    /// Record-profile index of the parent of a sub-session kind; `u32::MAX` for a top-level one.
    pub parent: u32,
    pub max_ts: i64,
    pub wall_last: i64,
    /// Wheel of a top-level profile: its cursor, then its non-empty buckets, each with the slots
    /// linked in it in list order (`wheel_slots` holds the spans back to back).
    pub wheel_cursor_s: i64,
    pub wheel_spans: Vec<WheelSpan>,
    pub wheel_slots: Vec<u32>,
}

#[derive(Archive, Serialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WheelSpan {
    pub bucket: u32,
    pub len: u32,
}

#[derive(Archive, Serialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotRun {
    pub start: u32,
    pub len: u32,
}

/// One session or sub-session: 56 bytes archived.
#[derive(Archive, Serialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecordImage {
    pub id: u64,
    pub start_ts: i64,
    pub last_ts: i64,
    /// Offset of the payload in `SnapshotBody::payload`.
    pub payload_off: u64,
    pub count: u32,
    /// Table slot at capture.
    pub slot: u32,
    /// `Head::link` at capture: next older session of the key (top-level), parent slot (sub).
    pub link: u32,
    /// Index of the parent record for a sub-session, `u32::MAX` for a top-level one.
    pub parent: u32,
    pub payload_len: u32,
    pub key_len: u16,
    /// Old record-profile index (into `SnapshotBody::profiles`).
    pub profile: u8,
    /// Engine-owned head flags (`FLAG_SUB`).
    pub flags: u8,
}

const _: () = assert!(std::mem::size_of::<ArchivedRecordImage>() == 56);

/// FNV-1a, 64 bits: stable across builds (unlike the engine's seeded hasher).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// (name, descriptor, parent record profile or `u32::MAX`) of every record profile, by index.
pub fn profile_descriptors(rules: &Rules) -> Vec<(String, String, u32)> {
    let field = |id: u16| rules.fields[id as usize].as_str();
    let mut out: Vec<Option<(String, String, u32)>> = vec![None; rules.record_profile_count()];
    for (pi, p) in rules.profiles.iter().enumerate() {
        let subs: Vec<String> = p.subs.iter().map(|s| sub_descriptor(rules, p, s)).collect();
        let l = &p.layout;
        let descriptor = format!(
            "profile {name}; key {key}; time {time:?}; layout {c} {a} {s} {u} {v} {f}; counters {counters:?}; \
             aggregates {aggs:?}; split_on_change {split:?}; metadata {meta:?}; state {state:?}; lists {lists:?}; \
             sub_sessions {subs:?}",
            name = p.name,
            key = field(p.key),
            time = p.time,
            c = l.counters_off,
            a = l.aggregates_off,
            s = l.split_off,
            u = l.subs_off,
            v = l.var_len_off,
            f = l.fixed_bytes,
            counters = p.counters.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            aggs = p.aggregates.iter().map(|a| (a.name.as_str(), field(a.field), a.op)).collect::<Vec<_>>(),
            split = p.split_on_change.iter().map(|&f| field(f)).collect::<Vec<_>>(),
            meta = p.metadata.iter().map(|&f| field(f)).collect::<Vec<_>>(),
            state = p.state.iter().map(|&f| field(f)).collect::<Vec<_>>(),
            lists = p.lists.iter().map(|x| (x.name.as_str(), field(x.field), x.max_len, x.unique)).collect::<Vec<_>>(),
        );
        out[pi] = Some((p.name.clone(), descriptor, u32::MAX));
        for (s, d) in p.subs.iter().zip(subs) {
            out[s.record_profile as usize] = Some((format!("{}/{}", p.name, s.name), d, pi as u32));
        }
    }
    out.into_iter()
        .map(|d| d.expect("every record profile is a profile or a sub-session kind"))
        .collect()
}

fn sub_descriptor(rules: &Rules, p: &ProfileRule, s: &super::rules::SubRule) -> String {
    format!(
        "sub_session {}/{}; key {:?}; counters {:?}",
        p.name,
        s.name,
        s.key.map(|f| rules.fields[f as usize].as_str()),
        s.counters
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
    )
}

// ---------------------------------------------------------------------------------------------
// Export.
// ---------------------------------------------------------------------------------------------

/// One unit of a capture: a top-level session and its sub-sessions, consecutive in the capture.
/// The archive lists units by their top-level slot.
#[derive(Clone, Copy, Debug)]
struct Unit {
    slot: u32,
    /// Its first record in the capture, and how many.
    first: u32,
    records: u32,
    /// Its payload bytes in the capture.
    payload_at: u64,
    payload_len: u64,
}

/// What export computes from a capture before writing anything.
struct Plan {
    /// Units in archive order.
    units: Vec<Unit>,
    payload_bytes: u64,
    sessions: u64,
    sub_sessions: u64,
    profiles: Vec<ProfileImage>,
    free_runs: Vec<SlotRun>,
}

/// The streaming source whose archived form is [`ArchivedSnapshotBody`].
struct BodySource<'c> {
    cap: &'c Captured,
    meta: SnapshotMeta,
    plan: Plan,
}

struct BodyResolver {
    profiles: VecResolver,
    free_runs: VecResolver,
    payload: VecResolver,
    records: VecResolver,
}

impl Archive for BodySource<'_> {
    type Archived = ArchivedSnapshotBody;
    type Resolver = BodyResolver;

    fn resolve(&self, resolver: BodyResolver, out: Place<ArchivedSnapshotBody>) {
        munge!(let ArchivedSnapshotBody {
            format, shard, shards, table_capacity, slots_max, generation, log_seq, wall_ms, id_seq,
            profiles, free_runs, payload, records,
        } = out);
        let g = &self.cap.globals;
        BODY_FORMAT.resolve((), format);
        self.meta.shard.resolve((), shard);
        self.meta.shards.resolve((), shards);
        g.table_capacity.resolve((), table_capacity);
        g.slots_max.resolve((), slots_max);
        self.meta.generation.resolve((), generation);
        self.meta.log_seq.resolve((), log_seq);
        self.meta.wall_ms.resolve((), wall_ms);
        g.id_seq.resolve((), id_seq);
        ArchivedVec::resolve_from_len(self.plan.profiles.len(), resolver.profiles, profiles);
        ArchivedVec::resolve_from_len(self.plan.free_runs.len(), resolver.free_runs, free_runs);
        ArchivedVec::resolve_from_len(self.plan.payload_bytes as usize, resolver.payload, payload);
        ArchivedVec::resolve_from_len(self.cap.bufs.records.len(), resolver.records, records);
    }
}

impl<S> Serialize<S> for BodySource<'_>
where
    S: Fallible + Writer + Allocator + ?Sized,
    S::Error: Source,
{
    fn serialize(&self, s: &mut S) -> Result<BodyResolver, S::Error> {
        let profiles = ArchivedVec::serialize_from_slice(&self.plan.profiles, s)?;
        let free_runs = ArchivedVec::serialize_from_slice(&self.plan.free_runs, s)?;
        // Payloads a unit at a time (a unit's are contiguous in the capture).
        let payload_pos = s.pos();
        let bytes = &self.cap.bufs.payload;
        for u in &self.plan.units {
            s.write(&bytes[u.payload_at as usize..(u.payload_at + u.payload_len) as usize])?;
        }
        debug_assert_eq!((s.pos() - payload_pos) as u64, self.plan.payload_bytes);
        let mut records = RecordIter {
            cap: self.cap,
            units: &self.plan.units,
            unit: 0,
            within: 0,
            at: 0,
            top: u32::MAX,
            payload_off: 0,
        };
        let records = ArchivedVec::<ArchivedRecordImage>::serialize_from_unknown_length_iter::<
            RecordImage,
            _,
            _,
        >(&mut records, s)?;
        s.align_for::<ArchivedSnapshotBody>()?;
        Ok(BodyResolver {
            profiles,
            free_runs,
            payload: VecResolver::from_pos(payload_pos),
            records,
        })
    }
}

struct RecordIter<'p> {
    cap: &'p Captured,
    units: &'p [Unit],
    unit: usize,
    /// Next record within the unit.
    within: u32,
    /// Index in the archive of the next record.
    at: u32,
    /// Index of the last top-level record yielded.
    top: u32,
    payload_off: u64,
}

impl Iterator for RecordIter<'_> {
    type Item = RecordImage;

    fn next(&mut self) -> Option<RecordImage> {
        let u = self.units.get(self.unit)?;
        let r = &self.cap.bufs.records[(u.first + self.within) as usize];
        self.within += 1;
        if self.within == u.records {
            self.unit += 1;
            self.within = 0;
        }
        let h = &r.head;
        let is_sub = h.flags & FLAG_SUB != 0;
        if !is_sub {
            self.top = self.at;
        }
        let rec = RecordImage {
            id: h.id,
            start_ts: h.start_ts,
            last_ts: h.last_ts,
            payload_off: self.payload_off,
            count: h.count,
            slot: r.slot,
            link: h.link,
            parent: if is_sub { self.top } else { u32::MAX },
            payload_len: r.len,
            key_len: h.key_len,
            profile: h.profile,
            flags: h.flags & FLAGS_ENGINE,
        };
        debug_assert!(!is_sub || self.top != u32::MAX);
        self.payload_off += u64::from(r.len);
        self.at += 1;
        Some(rec)
    }
}

/// Counts bytes and checksums them on their way to the inner writer; keeps the first I/O error so
/// its kind (e.g. `StorageFull`) survives rkyv's error type.
struct CrcWriter<W> {
    inner: W,
    crc: crc32fast::Hasher,
    bytes: u64,
    error: Option<io::Error>,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.inner.write(buf) {
            Ok(n) => {
                self.crc.update(&buf[..n]);
                self.bytes += n as u64;
                Ok(n)
            }
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted && self.error.is_none() {
                    self.error = Some(io::Error::new(e.kind(), e.to_string()));
                }
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl Captured {
    /// Units in slot order, the profile images with their wheels, the free runs. `pace` is
    /// called every [`PACE_RECORDS`] records of each pass.
    fn plan(&self, pace: &mut dyn FnMut()) -> Plan {
        let recs = &self.bufs.records;
        let mut units: Vec<Unit> = Vec::with_capacity(recs.len());
        let mut at = 0u64;
        let (mut sessions, mut sub_sessions) = (0u64, 0u64);
        for (i, r) in recs.iter().enumerate() {
            if i % PACE_RECORDS == PACE_RECORDS - 1 {
                pace();
            }
            if r.head.flags & FLAG_SUB == 0 {
                sessions += 1;
                units.push(Unit {
                    slot: r.slot,
                    first: i as u32,
                    records: 0,
                    payload_at: at,
                    payload_len: 0,
                });
            } else {
                sub_sessions += 1;
            }
            let u = units
                .last_mut()
                .expect("a capture starts with a top-level record");
            assert!(
                r.head.flags & FLAG_SUB == 0 || r.head.link == u.slot,
                "sub-session {} captured outside its parent's unit",
                r.slot
            );
            u.records += 1;
            u.payload_len += u64::from(r.len);
            at += u64::from(r.len);
        }
        assert_eq!(at, self.bufs.payload.len() as u64);
        units.sort_unstable_by_key(|u| u.slot);
        // Slot -> record, for the wheel walks (and to assert each slot is captured once).
        let mut rec_of = vec![NIL; self.globals.table_capacity as usize];
        for (i, r) in recs.iter().enumerate() {
            if i % PACE_RECORDS == PACE_RECORDS - 1 {
                pace();
            }
            let e = &mut rec_of[r.slot as usize];
            assert!(*e == NIL, "slot {} captured twice", r.slot);
            *e = i as u32;
        }
        let mut profiles: Vec<ProfileImage> = self
            .globals
            .profiles
            .iter()
            .map(|(name, descriptor, parent)| ProfileImage {
                fingerprint: fnv1a64(descriptor.as_bytes()),
                name: name.clone(),
                descriptor: descriptor.clone(),
                parent: *parent,
                max_ts: NONE_TS,
                wall_last: NONE_TS,
                wheel_cursor_s: 0,
                wheel_spans: Vec::new(),
                wheel_slots: Vec::new(),
            })
            .collect();
        // Each wheel's buckets by their first slot (the order a sweep of the table meets them),
        // each walked lane by lane through the captured heads' links, which are as at the cut.
        let mut firsts: Vec<(u32, u32)> = Vec::new();
        for (image, w) in profiles.iter_mut().zip(&self.bufs.wheels) {
            image.max_ts = w.max_ts;
            image.wall_last = w.wall_last;
            image.wheel_cursor_s = w.cursor_s;
            firsts.clear();
            firsts.extend(w.lists.chunks_exact(LANES as usize).enumerate().filter_map(
                |(b, lanes)| {
                    let first = lanes.iter().copied().find(|&s| s != NIL)?;
                    Some((first, b as u32))
                },
            ));
            firsts.sort_unstable();
            for &(_, bucket) in &firsts {
                let start = image.wheel_slots.len();
                let lanes = &w.lists[(bucket * LANES) as usize..][..LANES as usize];
                for (lane, &first) in lanes.iter().enumerate() {
                    let list = bucket * LANES + lane as u32;
                    let mut s = first;
                    while s != NIL {
                        if image.wheel_slots.len() % PACE_RECORDS == PACE_RECORDS - 1 {
                            pace();
                        }
                        let r = rec_of.get(s as usize).copied().unwrap_or(NIL);
                        assert!(r != NIL, "wheel entry {s} was not captured");
                        let h = &recs[r as usize].head;
                        assert!(
                            h.flags & FLAG_WHEEL_LINKED != 0
                                && (s != first || h.wheel_prev == WHEEL_BUCKET_BIT | list),
                            "wheel entry {s} is not linked where its list says"
                        );
                        assert!(image.wheel_slots.len() < recs.len(), "a wheel list loops");
                        image.wheel_slots.push(s);
                        s = h.wheel_next;
                    }
                }
                image.wheel_spans.push(WheelSpan {
                    bucket,
                    len: (image.wheel_slots.len() - start) as u32,
                });
            }
        }
        let free = self
            .bufs
            .free_runs
            .iter()
            .map(|r| u64::from(r.len))
            .sum::<u64>();
        assert_eq!(
            free + recs.len() as u64,
            u64::from(self.globals.table_capacity),
            "the free list and the live sessions at the cut cover the table"
        );
        let free_runs = self
            .bufs
            .free_runs
            .iter()
            .map(|r| SlotRun {
                start: r.start,
                len: r.len,
            })
            .collect();
        Plan {
            units,
            payload_bytes: at,
            sessions,
            sub_sessions,
            profiles,
            free_runs,
        }
    }

    /// An upper estimate of the body's size, for sizing its buffer.
    pub fn body_bytes_hint(&self) -> usize {
        self.bufs.payload.len()
            + self.bufs.records.len() * (std::mem::size_of::<ArchivedRecordImage>() + 4)
            + 8 * self.bufs.free_runs.len()
            + self
                .globals
                .profiles
                .iter()
                .map(|p| 256 + p.0.len() + p.1.len())
                .sum::<usize>()
            + 8 * self
                .bufs
                .wheels
                .iter()
                .map(|w| w.lists.len() / LANES as usize)
                .sum::<usize>()
            + (1 << 16)
    }

    /// Stream the snapshot body (an rkyv archive of [`SnapshotBody`]) into `w`, computing its
    /// length and CRC-32 on the way. Fails with `InvalidInput` (before writing anything) when the
    /// body would exceed what 32-bit relative pointers reach (2 GiB).
    pub fn write_body<W: Write>(&self, w: W, meta: SnapshotMeta) -> io::Result<SnapshotSummary> {
        self.write_body_paced(w, meta, &mut || {})
    }

    /// [`Captured::write_body`] calling `pace` every few thousand records while it plans the
    /// archive (the caller's writer sees the bytes as they are produced, and can pace those).
    /// Why: a background thread sharing a shard's CPU gives the CPU back there
    /// (`persist::pace`).
    pub fn write_body_paced<W: Write>(
        &self,
        w: W,
        meta: SnapshotMeta,
        pace: &mut dyn FnMut(),
    ) -> io::Result<SnapshotSummary> {
        let plan = self.plan(pace);
        let records = self.bufs.records.len() as u64;
        let estimate = plan.payload_bytes
            + records * std::mem::size_of::<ArchivedRecordImage>() as u64
            + plan
                .profiles
                .iter()
                .map(|p| 256 + p.descriptor.len() as u64 + 8 * p.wheel_slots.len() as u64)
                .sum::<u64>()
            + 8 * plan.free_runs.len() as u64;
        if estimate > i32::MAX as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("snapshot body of ~{estimate} bytes exceeds the 2 GiB reach of rkyv's 32-bit offsets; enable rkyv's `pointer_width_64` feature or split the shard"),
            ));
        }
        let wheels = &self.bufs.wheels;
        let min_clock_ms = wheels
            .iter()
            .map(|w| w.max_ts)
            .filter(|&t| t != NONE_TS)
            .min()
            .unwrap_or(NONE_TS);
        let wheel_cursor_s = wheels.iter().map(|w| w.cursor_s).min().unwrap_or(0);
        let (sessions, sub_sessions, payload_bytes) =
            (plan.sessions, plan.sub_sessions, plan.payload_bytes);
        let source = BodySource {
            cap: self,
            meta,
            plan,
        };
        let mut writer = CrcWriter {
            inner: w,
            crc: crc32fast::Hasher::new(),
            bytes: 0,
            error: None,
        };
        let result = rkyv::api::high::to_bytes_in::<_, rkyv::rancor::BoxedError>(
            &source,
            rkyv::ser::writer::IoWriter::new(&mut writer),
        );
        if let Err(e) = result {
            return Err(writer
                .error
                .take()
                .unwrap_or_else(|| io::Error::other(e.to_string())));
        }
        writer.flush()?;
        Ok(SnapshotSummary {
            sessions,
            sub_sessions,
            payload_bytes,
            body_bytes: writer.bytes,
            body_crc32: writer.crc.finalize(),
            id_seq: self.globals.id_seq,
            min_clock_ms,
            wheel_cursor_s,
        })
    }
}

impl Engine {
    /// An upper estimate of the snapshot body's size, for sizing a capture buffer.
    pub fn snapshot_bytes_hint(&self) -> usize {
        let st = &self.st;
        let blocks_used = (st.arena.blocks_total() - st.arena.blocks_free()) as usize;
        blocks_used * st.arena.block_bytes() as usize
            + st.table.live() as usize * (std::mem::size_of::<ArchivedRecordImage>() + 4)
            + 8 * st.table.capacity() as usize / 64
            + (1 << 16)
    }

    /// Capture the whole engine now ([`Engine::capture_all`]) and stream its snapshot body into
    /// `w` ([`Captured::write_body`]). The engine is only read.
    pub fn write_snapshot<W: Write>(
        &self,
        w: W,
        meta: SnapshotMeta,
    ) -> io::Result<SnapshotSummary> {
        self.capture_all().write_body(w, meta)
    }
}

#[cfg(test)]
mod tests {
    use super::super::table::Head;
    use super::super::wheel::Wheel;
    use super::*;

    #[test]
    fn bucket_bit_matches_the_wheel() {
        let mut heads = vec![Head::FRESH; 4];
        let mut wheel = Wheel::new(8, 0);
        let (a, b) = (2, 3); // ids 0: the same lane
        wheel.link(&mut heads, a, 5);
        wheel.link(&mut heads, b, 5);
        let list = 5 * LANES + super::super::wheel::lane_of(0);
        assert_eq!(heads[b as usize].wheel_prev, WHEEL_BUCKET_BIT | list);
        assert_eq!(heads[a as usize].wheel_prev, b);
        assert_eq!(
            heads[b as usize].flags & FLAG_WHEEL_LINKED,
            FLAG_WHEEL_LINKED
        );
    }

    /// The byte offsets `docs/storage-format.md` documents.
    #[test]
    fn archived_layout_matches_the_document() {
        use std::mem::{offset_of, size_of};
        assert_eq!(size_of::<ArchivedSnapshotBody>(), 88);
        assert_eq!(offset_of!(ArchivedSnapshotBody, generation), 24);
        assert_eq!(offset_of!(ArchivedSnapshotBody, id_seq), 48);
        assert_eq!(offset_of!(ArchivedSnapshotBody, profiles), 56);
        assert_eq!(offset_of!(ArchivedSnapshotBody, records), 80);
        assert_eq!(size_of::<ArchivedProfileImage>(), 72);
        assert_eq!(offset_of!(ArchivedProfileImage, parent), 24);
        assert_eq!(offset_of!(ArchivedProfileImage, max_ts), 32);
        assert_eq!(offset_of!(ArchivedProfileImage, wheel_spans), 56);
        assert_eq!(offset_of!(ArchivedProfileImage, wheel_slots), 64);
        assert_eq!(size_of::<ArchivedSlotRun>(), 8);
        assert_eq!(offset_of!(ArchivedRecordImage, payload_off), 24);
        assert_eq!(offset_of!(ArchivedRecordImage, slot), 36);
        assert_eq!(offset_of!(ArchivedRecordImage, payload_len), 48);
        assert_eq!(offset_of!(ArchivedRecordImage, key_len), 52);
        assert_eq!(offset_of!(ArchivedRecordImage, flags), 55);
    }

    #[test]
    fn fnv64_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    }
}
