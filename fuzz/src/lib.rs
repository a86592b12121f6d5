//! Shared pieces of the fuzz targets: a reader that turns the fuzzer's bytes into choices, the
//! configuration the snapshot and log targets build engines from, a per-process scratch
//! directory, and a classic-BPF interpreter for the steering program.
//!
//! Invariants: everything here is deterministic in its input (no clock, no randomness), so a
//! crashing input replays exactly; the scratch directory is private to the process (its pid is in
//! the name), so parallel fuzzing jobs never see each other's files.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Choices drawn from the fuzzer's bytes. Past the end every read yields zero, so any input is a
/// complete (if short) description and the fuzzer never wastes runs on "not enough bytes".
pub struct Bytes<'a> {
    data: &'a [u8],
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Bytes<'a> {
        Bytes { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | u64::from(self.u32()) << 32
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// An index below `n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0);
        if n <= 256 {
            usize::from(self.u8()) % n
        } else {
            self.u32() as usize % n
        }
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())]
    }

    /// Up to `max` bytes, the length chosen by the input.
    pub fn take(&mut self, max: usize) -> &'a [u8] {
        let n = self.below(max + 1).min(self.data.len());
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        head
    }

    /// Exactly `n` bytes, or what is left if fewer.
    pub fn take_exact(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    /// Everything that is left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }

    /// A u64 biased towards the edges that break arithmetic: 0, 1, small, near 2^32, near 2^62
    /// (the log's `SEQ_MAX`), near 2^63, near 2^64.
    pub fn interesting_u64(&mut self) -> u64 {
        let small = u64::from(self.u8());
        match self.u8() % 8 {
            0 => small,
            1 => u64::MAX - small,
            2 => (1u64 << 63).wrapping_add(small).wrapping_sub(128),
            3 => (1u64 << 32).wrapping_add(small).wrapping_sub(128),
            4 => self.u64(),
            6 => (1u64 << 62).wrapping_add(small).wrapping_sub(128),
            _ => small % 16,
        }
    }
}

/// A per-process scratch directory on tmpfs when there is one (the snapshot and log targets
/// write a file per run; tmpfs keeps that, and the fsyncs the code under test does, cheap).
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("sessionizer-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the scratch directory");
        dir
    })
}

/// Empties `dir` (files only; the targets create no subdirectories).
pub fn clear_dir(dir: &Path) {
    for entry in std::fs::read_dir(dir).expect("list the scratch directory") {
        let path = entry.expect("directory entry").path();
        std::fs::remove_file(&path).expect("remove a scratch file");
    }
}

/// The rules the snapshot and log seeds were written with: a processing-time profile with
/// captured values, counters, an aggregate, a list and a sub-session kind, and an event-time
/// profile, so that every part of a snapshot record is present. Small memory: engines are built
/// per run.
pub const ENGINE_CONFIG: &str = r#"
[memory]
arena_bytes = "256KiB"
max_sessions = 256

[slots]
max = 600

[limits]
open_sessions_per_key_max = 4
sub_sessions_per_session_max = 2

[[profile]]
name = "web"
key = "user"
match = { field = "user", exists = true }
timestamp = { field = "ts" }
idle_timeout = "60s"
max_duration = "300s"
ends_when = { field = "type", eq = "logout" }
metadata = ["ip"]
state = ["page"]
[[profile.counter]]
name = "clicks"
when = { field = "type", eq = "click" }
[[profile.aggregate]]
name = "spent"
field = "price"
op = "sum"
[[profile.list]]
name = "pages"
field = "page"
max_len = 3
unique = true
[[profile.sub_session]]
name = "tab"
key = "tab"
idle_timeout = "30s"
ends_when = { field = "type", eq = "close" }
[[profile.sub_session.counter]]
name = "n"

[[profile]]
name = "iot"
key = "dev"
match = { field = "dev", exists = true }
time = "event"
timestamp = { field = "ets" }
allowed_lateness = "20s"
idle_timeout = "30s"
split_on_change = ["fw"]
state = ["temp"]
[[profile.aggregate]]
name = "tmax"
field = "temp"
op = "max"
"#;

/// `ENGINE_CONFIG` with another table capacity and no sub-session kind: restoring into it takes
/// the compact path, and the `web` profile's fingerprint differs (its records are dropped).
pub const ENGINE_CONFIG_OTHER: &str = r#"
[memory]
arena_bytes = "128KiB"
max_sessions = 100

[slots]
max = 300

[[profile]]
name = "iot"
key = "dev"
match = { field = "dev", exists = true }
time = "event"
timestamp = { field = "ets" }
allowed_lateness = "20s"
idle_timeout = "30s"
split_on_change = ["fw"]
state = ["temp"]
[[profile.aggregate]]
name = "tmax"
field = "temp"
op = "max"

[[profile]]
name = "web"
key = "user"
timestamp = { field = "ts" }
idle_timeout = "60s"
"#;

/// Runs a classic BPF program over a packet: the subset of opcodes `ingest::steering::program`
/// uses, with the kernel's rule that an out-of-bounds load returns 0.
pub fn run_bpf(prog: &[libc::sock_filter], pkt: &[u8]) -> u32 {
    // `<linux/filter.h>`: BPF_LD|BPF_W|BPF_LEN, BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JGE|BPF_K,
    // BPF_JMP|BPF_JEQ|BPF_K, BPF_ALU|BPF_MOD|BPF_K, BPF_RET|BPF_K, BPF_RET|BPF_A.
    const LD_W_LEN: u16 = 0x80;
    const LD_W_ABS: u16 = 0x20;
    const JGE_K: u16 = 0x35;
    const JEQ_K: u16 = 0x15;
    const MOD_K: u16 = 0x94;
    const RET_K: u16 = 0x06;
    const RET_A: u16 = 0x16;
    let mut a: u32 = 0;
    let mut pc = 0usize;
    loop {
        let i = prog[pc];
        pc += 1;
        match i.code {
            LD_W_LEN => a = pkt.len() as u32,
            LD_W_ABS => {
                let k = i.k as usize;
                match pkt.get(k..k + 4) {
                    Some(w) => a = u32::from_be_bytes([w[0], w[1], w[2], w[3]]),
                    None => return 0,
                }
            }
            JGE_K => pc += usize::from(if a >= i.k { i.jt } else { i.jf }),
            JEQ_K => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
            MOD_K => a %= i.k,
            RET_K => return i.k,
            RET_A => return a,
            other => panic!("opcode {other:#x} not interpreted"),
        }
    }
}
