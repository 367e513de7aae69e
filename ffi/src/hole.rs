//! Holes in files: a range deallocated in place (it reads as zeroes), the file's size kept.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Deallocates `len` bytes of `file` at `offset` (they read as zeroes from then on) without
/// changing its size: `fallocate(PUNCH_HOLE | KEEP_SIZE)`.
pub fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "range beyond off_t"));
    };
    // SAFETY: fallocate only reads its integer arguments; `file` keeps the descriptor open for
    // the call.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, off, n) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
