//! Sharing a core politely: a timer descriptor that wakes a parked reactor at a precise moment
//! (epoll's own timeout has millisecond granularity), and the count of involuntary context
//! switches, which tells a polling thread that another task wanted its core.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// A non-blocking monotonic timerfd: readable once the armed moment has passed.
#[derive(Debug)]
pub struct Timer {
    fd: OwnedFd,
}

impl Timer {
    pub fn new() -> io::Result<Timer> {
        // SAFETY: timerfd_create takes no pointers; the returned descriptor is checked.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        Ok(Timer { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// Fires once, `after` from now (at least 1 ns: a zero value would disarm it).
    pub fn arm(&self, after: Duration) -> io::Result<()> {
        let after = after.max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec { tv_sec: after.as_secs() as libc::time_t, tv_nsec: after.subsec_nanos() as libc::c_long },
        };
        // SAFETY: `spec` is a valid itimerspec that outlives the call; the old value is not asked for.
        let rc = unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Consumes an expiry so the descriptor stops being readable.
    pub fn clear(&self) {
        let mut expirations = 0u64;
        // SAFETY: a valid pointer to 8 writable bytes, what a timerfd read fills.
        unsafe {
            libc::read(self.fd.as_raw_fd(), (&mut expirations as *mut u64).cast(), 8);
        }
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Involuntary context switches of the calling thread so far: it grows when the scheduler
/// took the core from this thread for another runnable task.
pub fn involuntary_switches() -> u64 {
    // SAFETY: rusage is plain data; zeroed is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable rusage for the call to fill.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
    if rc != 0 {
        return 0;
    }
    usage.ru_nivcsw as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_armed_timer_turns_readable_and_clears() {
        let t = Timer::new().unwrap();
        let mut pfd = libc::pollfd { fd: t.fd(), events: libc::POLLIN, revents: 0 };
        let poll = |pfd: &mut libc::pollfd, ms: i32| {
            // SAFETY: one valid pollfd, its count alongside.
            unsafe { libc::poll(pfd, 1, ms) }
        };
        assert_eq!(poll(&mut pfd, 0), 0, "not armed: not readable");
        t.arm(Duration::from_micros(200)).unwrap();
        assert_eq!(poll(&mut pfd, 5_000), 1, "fires");
        t.clear();
        assert_eq!(poll(&mut pfd, 0), 0, "cleared");
    }

    #[test]
    fn a_thread_that_shares_its_core_is_switched_out_involuntarily() {
        // Two spinning threads pinned to one core: the scheduler must take the core from each.
        let core = 0;
        let spin = move || {
            crate::pin_current_thread(core).unwrap();
            let before = involuntary_switches();
            let start = std::time::Instant::now();
            while involuntary_switches() == before && start.elapsed() < Duration::from_secs(20) {
                std::hint::spin_loop();
            }
            involuntary_switches() > before
        };
        let other = std::thread::spawn(spin);
        let mine = std::thread::spawn(spin).join().unwrap();
        assert!(mine && other.join().unwrap(), "each spinner saw itself preempted");
    }
}
