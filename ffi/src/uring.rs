use crate::DmaBuf;
use io_uring::{opcode, types, IoUring};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

/// One operation for the ring. The ring keeps the file and buffer alive until the kernel is done.
#[derive(Debug)]
pub enum UringOp {
    Read {
        file: Arc<File>,
        offset: u64,
        buf: DmaBuf,
    },
    Write {
        file: Arc<File>,
        offset: u64,
        buf: DmaBuf,
    },
    /// fdatasync of the whole file.
    Fsync {
        file: Arc<File>,
    },
    /// fallocate with `mode` (punching holes for deallocation).
    Fallocate {
        file: Arc<File>,
        offset: u64,
        len: u64,
        mode: i32,
    },
}

/// A finished operation: the caller's tag, bytes moved or the OS error, and the buffer back.
#[derive(Debug)]
pub struct UringCompletion {
    pub tag: u64,
    pub result: io::Result<usize>,
    pub buf: Option<DmaBuf>,
}

struct Inflight {
    tag: u64,
    expected: usize,
    buf: Option<DmaBuf>,
    _file: Arc<File>,
}

/// A per-reactor io_uring. Completions also signal an eventfd, so a parked reactor wakes up.
pub struct Uring {
    ring: IoUring,
    slots: Vec<Option<Inflight>>,
    free: Vec<usize>,
    unsubmitted: usize,
    eventfd: OwnedFd,
}

impl Uring {
    pub fn new(entries: u32) -> io::Result<Uring> {
        let ring = IoUring::new(entries)?;
        let eventfd = crate::eventfd()?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Uring { ring, slots: Vec::new(), free: Vec::new(), unsubmitted: 0, eventfd })
    }

    /// The eventfd that becomes readable when completions arrive.
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Operations handed to the kernel and not yet reaped.
    pub fn inflight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queues an operation; it reaches the kernel at the next [`Uring::flush`].
    pub fn push(&mut self, tag: u64, op: UringOp) -> io::Result<()> {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let (entry, inflight) = match op {
            UringOp::Read { file, offset, mut buf } => {
                let len = u32::try_from(buf.len()).map_err(|_| io::Error::other("read too large"))?;
                let e = opcode::Read::new(types::Fd(file.as_raw_fd()), buf.as_mut_ptr(), len).offset(offset).build();
                (e, Inflight { tag, expected: len as usize, buf: Some(buf), _file: file })
            }
            UringOp::Write { file, offset, buf } => {
                let len = u32::try_from(buf.len()).map_err(|_| io::Error::other("write too large"))?;
                let e = opcode::Write::new(types::Fd(file.as_raw_fd()), buf.as_ptr(), len).offset(offset).build();
                (e, Inflight { tag, expected: len as usize, buf: Some(buf), _file: file })
            }
            UringOp::Fsync { file } => {
                let e = opcode::Fsync::new(types::Fd(file.as_raw_fd())).flags(types::FsyncFlags::DATASYNC).build();
                (e, Inflight { tag, expected: 0, buf: None, _file: file })
            }
            UringOp::Fallocate { file, offset, len, mode } => {
                let e = opcode::Fallocate::new(types::Fd(file.as_raw_fd()), len).offset(offset).mode(mode).build();
                (e, Inflight { tag, expected: 0, buf: None, _file: file })
            }
        };
        let entry = entry.user_data(slot as u64);
        self.slots[slot] = Some(inflight);
        loop {
            // SAFETY: the buffer and file the entry points at are owned by `self.slots[slot]` and
            // stay alive, unmoved (DmaBuf's heap allocation does not move with the struct), until
            // its completion is reaped.
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                break;
            }
            self.ring.submit()?; // queue full: hand the batch to the kernel first
            self.unsubmitted = 0;
        }
        self.unsubmitted += 1;
        Ok(())
    }

    /// Hands queued operations to the kernel (one syscall for the batch).
    pub fn flush(&mut self) -> io::Result<()> {
        if self.unsubmitted > 0 {
            self.ring.submit()?;
            self.unsubmitted = 0;
        }
        Ok(())
    }

    /// Collects finished operations into `out`; returns how many.
    pub fn reap(&mut self, out: &mut Vec<UringCompletion>) -> usize {
        let mut n = 0;
        if self.inflight() == 0 {
            return 0;
        }
        crate::eventfd_drain(&self.eventfd);
        for cqe in self.ring.completion() {
            let slot = cqe.user_data() as usize;
            let Some(done) = self.slots.get_mut(slot).and_then(Option::take) else { continue };
            self.free.push(slot);
            let res = cqe.result();
            let result = if res < 0 {
                Err(io::Error::from_raw_os_error(-res))
            } else if (res as usize) < done.expected {
                Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("short transfer: {res} of {}", done.expected)))
            } else {
                Ok(res as usize)
            };
            out.push(UringCompletion { tag: done.tag, result, buf: done.buf });
            n += 1;
        }
        n
    }
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Uring({} in flight)", self.inflight())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn write_then_read_back() {
        let dir = std::env::temp_dir().join(format!("nvmetro-uring-{}", std::process::id()));
        let mut f = File::create(&dir).unwrap();
        f.write_all(&[0u8; 16384]).unwrap();
        let file = Arc::new(std::fs::OpenOptions::new().read(true).write(true).open(&dir).unwrap());
        let mut ring = Uring::new(8).unwrap();
        ring.push(1, UringOp::Write { file: file.clone(), offset: 4096, buf: DmaBuf::from_slice(&[7u8; 4096]) }).unwrap();
        ring.push(2, UringOp::Fsync { file: file.clone() }).unwrap();
        ring.flush().unwrap();
        let mut out = Vec::new();
        while out.len() < 2 {
            ring.reap(&mut out);
        }
        assert!(out.iter().all(|c| c.result.is_ok()));
        ring.push(3, UringOp::Read { file, offset: 4096, buf: DmaBuf::zeroed(4096) }).unwrap();
        ring.flush().unwrap();
        out.clear();
        while out.is_empty() {
            ring.reap(&mut out);
        }
        assert_eq!(out[0].tag, 3);
        assert!(out[0].buf.as_ref().unwrap().iter().all(|&b| b == 7));
        std::fs::remove_file(dir).unwrap();
    }
}
