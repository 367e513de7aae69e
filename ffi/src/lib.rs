//! Everything in nvmetro that needs `unsafe` lives here, behind safe types:
//!
//! * [`DmaBuf`]: a heap buffer aligned to 4 KiB, the unit every block I/O moves (O_DIRECT needs the
//!   alignment, and the NVMe/TCP path reads and writes sockets straight into it).
//! * [`SharedMem`]: a large anonymous mapping, on 2 MiB hugepages when they are reserved, shared by
//!   all reactors. Access goes through stripe locks taken with atomics, so two reactors can never
//!   copy into the same bytes at once and every copy is free of data races.
//! * [`IoBuf`], [`IoBufMut`] and [`IoBufPool`]: pooled, shared I/O buffers, so one payload serves
//!   the local write and the replication frame without a copy and without an allocation.
//! * [`Uring`]: an io_uring instance per reactor that owns each buffer while the kernel uses it.
//! * [`lock_exclusive`]: one owner per copy, an exclusive OFD lock on a bdev's or a metadata file.
//! * [`Timer`] and [`involuntary_switches`]: how a polling reactor parks precisely and notices
//!   that it shares its core.
//! * [`CountingAllocator`]: a global allocator that counts, for tests proving a path allocates
//!   nothing per I/O.
//! * [`pin_current_thread`] and [`eventfd`] helpers.
//! * `rdma` (cargo feature `rdma`): RDMA verbs and rdma_cm for a polled reactor.
#![deny(unsafe_op_in_unsafe_fn)]

mod counting;
mod dmabuf;
mod hole;
mod iobuf;
mod lock;
#[cfg(feature = "rdma")]
pub mod rdma;
mod sched;
mod shmem;
mod uring;

pub use counting::CountingAllocator;
pub use dmabuf::DmaBuf;
pub use hole::punch_hole;
pub use iobuf::{IoBuf, IoBufMut, IoBufPool, IOBUF_POOLED_MAX};
pub use lock::lock_exclusive;
pub use sched::{involuntary_switches, Timer};
pub use shmem::{OutOfRange, SharedMem};
pub use uring::{Uring, UringCompletion, UringOp};

/// fallocate mode that frees blocks and keeps the file size: reads of the range return zeroes.
pub const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// open(2) flag for direct I/O.
pub const O_DIRECT: i32 = libc::O_DIRECT;

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};

/// Creates a non-blocking, close-on-exec eventfd (used to wake a parked reactor from io_uring).
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers; the returned descriptor is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Drains an eventfd's counter so that level-triggered waiters stop waking.
pub fn eventfd_drain(fd: &OwnedFd) {
    use std::os::fd::AsRawFd;
    let mut value = 0u64;
    // SAFETY: we pass a valid pointer to 8 writable bytes, which is what eventfd reads need.
    unsafe {
        libc::read(fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8);
    }
}

/// Adds one to an eventfd's counter, waking whoever polls it.
pub fn eventfd_signal(fd: &OwnedFd) {
    use std::os::fd::AsRawFd;
    let one = 1u64;
    // SAFETY: we pass a valid pointer to 8 readable bytes, which is what eventfd writes need.
    unsafe {
        libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8);
    }
}

/// Pins the calling thread to one CPU. Errors when the CPU does not exist or is not allowed.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; zeroed is its empty value.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "cpu index too large"));
    }
    // SAFETY: `cpu` was bounds-checked against CPU_SETSIZE above.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid, initialised cpu_set_t and its size is passed alongside.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes a TCP socket holds that the peer has not acknowledged yet (SIOCOUTQ): how much a new
/// frame would queue behind.
pub fn tcp_unsent_bytes(fd: std::os::fd::RawFd) -> io::Result<usize> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the valid pointer passed.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(queued.max(0) as usize)
}

/// Number of free 2 MiB hugepages the kernel currently has reserved.
pub fn free_hugepages_2m() -> u64 {
    std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether this process may write `path` (a file, or a directory to create files in), as
/// access(2) answers it: also refused on a read-only file system.
pub fn check_writable(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c` is a NUL-terminated string that outlives the call; access only reads it.
    let rc = unsafe { libc::access(c.as_ptr(), libc::W_OK) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads what `fd` (a socket) holds without waiting, whatever its O_NONBLOCK setting: recv(2)
/// with MSG_DONTWAIT, so a blocking socket needs no fcntl round trip for a single poll.
/// `Ok(0)` means the peer closed; an empty socket gives `ErrorKind::WouldBlock`.
pub fn recv_nonblocking(fd: std::os::fd::BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: `buf` is valid for `buf.len()` writable bytes for the duration of the call, and
        // `fd` is a descriptor the borrow keeps open.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Waits until at least one of `fds` is readable (or has an error or hang-up pending), or
/// `timeout` has passed: poll(2). Sets `ready[i]` for each such descriptor and returns how many
/// there are (0 on timeout). `ready` must be as long as `fds`.
pub fn wait_readable(fds: &[std::os::fd::BorrowedFd<'_>], timeout: std::time::Duration, ready: &mut [bool]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    assert_eq!(fds.len(), ready.len(), "one ready flag per descriptor");
    let mut pfds: Vec<libc::pollfd> = fds.iter().map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 }).collect();
    let ms = i32::try_from(timeout.as_micros().div_ceil(1000)).unwrap_or(i32::MAX);
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structures for the duration of the
    // call, and every descriptor in it is kept open by its borrow.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            ready.fill(false);
            return Ok(0);
        }
        return Err(e);
    }
    for (r, p) in ready.iter_mut().zip(&pfds) {
        *r = p.revents != 0;
    }
    Ok(n as usize)
}
