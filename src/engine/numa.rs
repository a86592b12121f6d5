//! NUMA placement for a shard's start-up reservations.
//!
//! A shard's arena should live on the memory node of the core that runs the shard (the
//! Seastar/ScyllaDB layout): [`node_of_cpu`] finds that node from sysfs and [`bind`] sets the
//! preferred node of a range before it is first touched. Both are used at start-up only, so they may
//! allocate and read files. Neither is required for correctness: on a single-node machine, or where
//! `mbind` is not permitted, callers log the error and go on with the kernel's default placement.

use std::io;

/// `MPOL_PREFERRED` from `<linux/mempolicy.h>`: allocate on the node if it has memory, else fall
/// back. Preferred rather than bound so that a full node degrades speed, not availability.
const MPOL_PREFERRED: libc::c_int = 1;

/// NUMA node of a CPU (from `/sys/devices/system/cpu/cpuN/nodeM`), `None` if unknown.
pub fn node_of_cpu(cpu: usize) -> Option<u32> {
    let dir = std::fs::read_dir(format!("/sys/devices/system/cpu/cpu{cpu}")).ok()?;
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(digits) = name.strip_prefix("node") else {
            continue;
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(node) = digits.parse::<u32>() {
            return Some(node);
        }
    }
    None
}

/// `mbind(MPOL_PREFERRED)` the range `[ptr, ptr + len)` to `node`. `ptr` must be page-aligned; the
/// kernel rounds `len` up to whole pages. Only pages faulted in after the call follow the policy,
/// which is why the arena binds before it prefaults.
pub fn bind(ptr: *mut u8, len: usize, node: u32) -> io::Result<()> {
    assert!(!ptr.is_null());
    assert!(len > 0);
    let page_bytes = page_bytes();
    assert_eq!(ptr as usize % page_bytes, 0, "bind of an unaligned range");
    // The kernel reads `maxnode - 1` bits on some versions and `maxnode` on others; one spare
    // zeroed word keeps either reading inside the buffer.
    let mask_words = node as usize / 64 + 1;
    let mut mask = vec![0u64; mask_words + 1];
    mask[node as usize / 64] |= 1u64 << (node % 64);
    let maxnode = (mask_words * 64 + 1) as libc::c_ulong;
    // SAFETY: mbind only changes the memory policy of the range (no memory is read or written
    // through `ptr`); the caller owns the mapping. `mask` outlives the call and holds at least
    // `maxnode` bits.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            ptr as libc::c_ulong,
            len as libc::c_ulong,
            MPOL_PREFERRED as libc::c_ulong,
            mask.as_ptr() as libc::c_ulong,
            maxnode,
            0 as libc::c_ulong,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn page_bytes() -> usize {
    // SAFETY: sysconf has no preconditions.
    let page_bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    assert!(page_bytes > 0);
    let page_bytes = page_bytes as usize;
    assert!(page_bytes.is_power_of_two());
    page_bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_zero_has_a_node_when_sysfs_says_so() {
        let sysfs_has_node = std::fs::read_dir("/sys/devices/system/cpu/cpu0")
            .map(|dir| {
                dir.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("node"))
            })
            .unwrap_or(false);
        assert_eq!(node_of_cpu(0).is_some(), sysfs_has_node);
        assert_eq!(node_of_cpu(1 << 20), None);
    }

    #[test]
    fn bind_accepts_the_local_node_or_reports_an_error() {
        let len = page_bytes() * 4;
        // SAFETY: a fresh anonymous private mapping; checked for MAP_FAILED below, unmapped at
        // the end of the test.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let node = node_of_cpu(0).unwrap_or(0);
        match bind(ptr.cast(), len, node) {
            Ok(()) => {}
            // Sandboxes may forbid mbind; that is the "log and go on" case, not a test failure.
            Err(e) => assert!(
                matches!(
                    e.raw_os_error(),
                    Some(libc::EPERM | libc::ENOSYS | libc::EINVAL)
                ),
                "{e}"
            ),
        }
        // A node that cannot exist on any machine is refused.
        assert!(bind(ptr.cast(), len, 1 << 20).is_err());
        // SAFETY: `ptr`/`len` are exactly the mapping created above, no longer used.
        assert_eq!(unsafe { libc::munmap(ptr, len) }, 0);
    }
}
