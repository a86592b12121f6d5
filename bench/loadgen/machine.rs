//! The machine a result came from, for `machine.txt` and the run directory's name: cores, CPU
//! model, kernel, memory, hostname, and whether it looks virtualised. Read from `/proc` and
//! `uname`; anything unreadable is reported as `unknown` rather than failing the run.

use std::fmt::Write;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Machine {
    pub hostname: String,
    pub cores_online: usize,
    pub cpu_model: String,
    pub cpu_mhz: String,
    pub hypervisor: bool,
    pub kernel: String,
    pub memory_total: String,
    pub loadavg: String,
}

/// CPU time the hypervisor gave to others while this VM's CPUs wanted to run ("steal", summed
/// over CPUs, from `/proc/stat`), ms since boot; `None` where the kernel does not count it.
pub fn steal_ms() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    steal_ms_in(&stat, clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// The `cpu` line's eighth number (steal, in clock ticks), in ms.
fn steal_ms_in(stat: &str, ticks_per_second: f64) -> Option<f64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: f64 = line.split_whitespace().nth(8)?.parse().ok()?;
    Some(ticks * 1e3 / ticks_per_second)
}

fn read_trimmed(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn cpuinfo_field(cpuinfo: &str, field: &str) -> Option<String> {
    cpuinfo
        .lines()
        .find(|l| l.split(':').next().is_some_and(|k| k.trim() == field))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// `uname -r`.
fn kernel_release() -> Option<String> {
    // SAFETY: utsname is plain old data; uname fills it with NUL-terminated strings.
    let mut name: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `name` is a valid, writable utsname.
    if unsafe { libc::uname(&mut name) } != 0 {
        return None;
    }
    let bytes: Vec<u8> = name
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8(bytes).ok()
}

pub fn hostname() -> String {
    read_trimmed("/proc/sys/kernel/hostname")
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_string())
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let unknown = || "unknown".to_string();
        Machine {
            hostname: hostname(),
            cores_online: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu_model: cpuinfo_field(&cpuinfo, "model name").unwrap_or_else(unknown),
            cpu_mhz: cpuinfo_field(&cpuinfo, "cpu MHz").unwrap_or_else(unknown),
            hypervisor: cpuinfo_field(&cpuinfo, "flags")
                .is_some_and(|f| f.split_whitespace().any(|x| x == "hypervisor")),
            kernel: kernel_release().unwrap_or_else(unknown),
            memory_total: read_trimmed("/proc/meminfo")
                .and_then(|m| {
                    m.lines()
                        .find(|l| l.starts_with("MemTotal:"))
                        .map(|l| l["MemTotal:".len()..].trim().to_string())
                })
                .unwrap_or_else(unknown),
            loadavg: read_trimmed("/proc/loadavg").unwrap_or_else(unknown),
        }
    }

    /// The text of `machine.txt`.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "hostname: {}", self.hostname);
        let _ = writeln!(out, "cores_online: {}", self.cores_online);
        let _ = writeln!(out, "cpu_model: {}", self.cpu_model);
        let _ = writeln!(out, "cpu_mhz: {}", self.cpu_mhz);
        let _ = writeln!(
            out,
            "virtualised: {}",
            if self.hypervisor {
                "yes (hypervisor flag)"
            } else {
                "no hypervisor flag"
            }
        );
        let _ = writeln!(out, "kernel: {}", self.kernel);
        let _ = writeln!(out, "memory_total: {}", self.memory_total);
        let _ = writeln!(out, "loadavg_at_start: {}", self.loadavg);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_this_machine() {
        let machine = Machine::probe();
        assert!(machine.cores_online > 0);
        assert!(!machine.kernel.is_empty());
        assert!(machine.to_text().contains("cpu_model: "));
        assert_eq!(
            cpuinfo_field("model name\t: AMD EPYC\nflags : a b", "model name").as_deref(),
            Some("AMD EPYC")
        );
    }

    #[test]
    fn steal_is_the_cpu_lines_eighth_number() {
        let stat =
            "cpu  8698750 208 994887 1791616 479852 0 68309 84990 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n";
        assert_eq!(steal_ms_in(stat, 100.0), Some(849_900.0));
        assert_eq!(steal_ms_in("cpu  1 2 3\n", 100.0), None);
        assert!(steal_ms().is_some_and(|ms| ms >= 0.0));
    }
}
