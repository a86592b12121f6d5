//! Time for the harness: CLOCK_MONOTONIC nanoseconds, the shared start of a run, and the
//! mapping from monotonic to epoch time used for the events' `ts`.
//!
//! Sender and receiver run on the same machine and read the same CLOCK_MONOTONIC, so an event's
//! `sent_ns` can be subtracted from the receiver's clock directly. The epoch offset is read once
//! per run: `ts` then moves exactly with the send schedule, with no clock read per event.

use std::time::Duration;

/// CLOCK_MONOTONIC in nanoseconds.
pub fn mono_ns() -> u64 {
    read(libc::CLOCK_MONOTONIC)
}

/// CLOCK_REALTIME in nanoseconds since the Unix epoch.
pub fn real_ns() -> u64 {
    read(libc::CLOCK_REALTIME)
}

fn read(clock: libc::clockid_t) -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; both clock ids exist on every Linux.
    let rc = unsafe { libc::clock_gettime(clock, &mut now) };
    assert_eq!(rc, 0, "clock_gettime({clock}) failed");
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// The start of a run on the monotonic clock, and the epoch offset at that moment.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub start_ns: u64,
    real_minus_mono_ns: u64,
}

impl Clock {
    /// A run that starts `lead` from now (time for every thread to be waiting on it).
    pub fn starting_in(lead: Duration) -> Clock {
        let mono = mono_ns();
        let real = real_ns();
        assert!(real > mono, "CLOCK_REALTIME behind CLOCK_MONOTONIC");
        Clock {
            start_ns: mono + lead.as_nanos() as u64,
            real_minus_mono_ns: real - mono,
        }
    }

    /// Epoch milliseconds of the monotonic instant `mono_ns`.
    pub fn real_ms(&self, mono_ns: u64) -> u64 {
        (mono_ns + self.real_minus_mono_ns) / 1_000_000
    }

    /// Nanoseconds from the start to `mono_ns` (0 before the start).
    pub fn since_start_ns(&self, mono_ns: u64) -> u64 {
        mono_ns.saturating_sub(self.start_ns)
    }
}

/// Sleeps until the monotonic instant `deadline_ns` (returns at once if it has passed).
pub fn sleep_until(deadline_ns: u64) {
    let now = mono_ns();
    if deadline_ns > now {
        std::thread::sleep(Duration::from_nanos(deadline_ns - now));
    }
}

/// Lowers this thread's timer slack (default 50 µs) so short pacing sleeps end on time.
pub fn set_timer_slack_ns(slack_ns: u64) {
    // SAFETY: PR_SET_TIMERSLACK takes one unsigned long by value and only affects this thread.
    let rc = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, slack_ns as libc::c_ulong, 0, 0, 0) };
    if rc != 0 {
        log::debug!(
            "PR_SET_TIMERSLACK failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_maps_to_epoch() {
        let clock = Clock::starting_in(Duration::ZERO);
        let epoch_ms = real_ns() / 1_000_000;
        assert!(clock.real_ms(mono_ns()).abs_diff(epoch_ms) < 50);
        assert_eq!(clock.since_start_ns(0), 0);
    }
}
