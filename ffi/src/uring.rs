use crate::{DmaBuf, IoBuf, IoBufMut};
use io_uring::{opcode, squeue, types, IoUring};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One operation for the ring. The ring keeps the file and buffer alive until the kernel is done.
#[derive(Debug)]
pub enum UringOp {
    Read {
        file: Arc<File>,
        offset: u64,
        buf: DmaBuf,
    },
    /// A read into a pooled buffer offered by the caller (one it can send from uncopied); the
    /// completion gives it back in `into`.
    ReadInto {
        file: Arc<File>,
        offset: u64,
        buf: IoBufMut,
    },
    Write {
        file: Arc<File>,
        offset: u64,
        buf: DmaBuf,
    },
    /// A write from shared memory (a payload other holders still read): the ring holds its
    /// clone until the completion, and the completion carries no buffer.
    WriteShared {
        file: Arc<File>,
        offset: u64,
        buf: IoBuf,
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
    /// The buffer of a [`UringOp::ReadInto`].
    pub into: Option<IoBufMut>,
}

struct Inflight {
    tag: u64,
    expected: usize,
    buf: Option<DmaBuf>,
    into: Option<IoBufMut>,
    /// Keeps a shared write's bytes alive (and, being shared, unwritable) until the kernel is done.
    _shared: Option<IoBuf>,
    _file: Arc<File>,
}

/// user_data of the cancel requests [`Uring`]'s drop sends (slots are indices, never this large).
const CANCEL: u64 = u64::MAX;
/// How long dropping a ring waits for the kernel to give its buffers back before leaking them.
const DROP_PATIENCE: Duration = Duration::from_secs(10);

/// A per-reactor io_uring. Completions also signal an eventfd, so a parked reactor wakes up.
///
/// Every operation's buffer and file are owned by the ring from [`Uring::push`] until its
/// completion is reaped. Dropping the ring cancels what is in flight and waits for every
/// completion before it frees anything the kernel may still write to (and leaks, rather than
/// frees, the buffers of operations the kernel has not given back within 10 seconds).
pub struct Uring {
    ring: IoUring,
    slots: Vec<Option<Inflight>>,
    free: Vec<usize>,
    unsubmitted: usize,
    eventfd: OwnedFd,
    #[cfg(test)]
    fail_submit: bool,
}

impl Uring {
    pub fn new(entries: u32) -> io::Result<Uring> {
        let ring = IoUring::new(entries)?;
        let eventfd = crate::eventfd()?;
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Uring {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            unsubmitted: 0,
            eventfd,
            #[cfg(test)]
            fail_submit: false,
        })
    }

    /// The eventfd that is signalled when completions arrive (watch it edge-triggered: it is
    /// never drained).
    pub fn eventfd(&self) -> RawFd {
        self.eventfd.as_raw_fd()
    }

    /// Operations handed to the kernel (or queued for it) and not yet reaped.
    pub fn inflight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    fn submit(&mut self) -> io::Result<usize> {
        #[cfg(test)]
        if self.fail_submit {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        self.ring.submit()
    }

    /// Queues an operation; it reaches the kernel at the next [`Uring::flush`]. On an error the
    /// operation is not queued and takes no slot: its buffer and file are dropped.
    pub fn push(&mut self, tag: u64, op: UringOp) -> io::Result<()> {
        let (entry, inflight) = match op {
            UringOp::Read { file, offset, mut buf } => {
                let len = u32::try_from(buf.len()).map_err(|_| io::Error::other("read too large"))?;
                let e = opcode::Read::new(types::Fd(file.as_raw_fd()), buf.as_mut_ptr(), len).offset(offset).build();
                (e, Inflight { tag, expected: len as usize, buf: Some(buf), into: None, _shared: None, _file: file })
            }
            UringOp::ReadInto { file, offset, mut buf } => {
                let len = u32::try_from(buf.len()).map_err(|_| io::Error::other("read too large"))?;
                let e = opcode::Read::new(types::Fd(file.as_raw_fd()), buf.as_mut_ptr(), len).offset(offset).build();
                (e, Inflight { tag, expected: len as usize, buf: None, into: Some(buf), _shared: None, _file: file })
            }
            UringOp::Write { file, offset, buf } => {
                let len = u32::try_from(buf.len()).map_err(|_| io::Error::other("write too large"))?;
                let e = opcode::Write::new(types::Fd(file.as_raw_fd()), buf.as_ptr(), len).offset(offset).build();
                (e, Inflight { tag, expected: len as usize, buf: Some(buf), into: None, _shared: None, _file: file })
            }
            UringOp::WriteShared { file, offset, buf } => {
                let len = u32::try_from(buf.len()).map_err(|_| io::Error::other("write too large"))?;
                let e = opcode::Write::new(types::Fd(file.as_raw_fd()), buf.as_ptr(), len).offset(offset).build();
                (e, Inflight { tag, expected: len as usize, buf: None, into: None, _shared: Some(buf), _file: file })
            }
            UringOp::Fsync { file } => {
                let e = opcode::Fsync::new(types::Fd(file.as_raw_fd())).flags(types::FsyncFlags::DATASYNC).build();
                (e, Inflight { tag, expected: 0, buf: None, into: None, _shared: None, _file: file })
            }
            UringOp::Fallocate { file, offset, len, mode } => {
                let e = opcode::Fallocate::new(types::Fd(file.as_raw_fd()), len).offset(offset).mode(mode).build();
                (e, Inflight { tag, expected: 0, buf: None, into: None, _shared: None, _file: file })
            }
        };
        let slot = self.free.pop().unwrap_or_else(|| {
            self.slots.push(None);
            self.slots.len() - 1
        });
        let entry = entry.user_data(slot as u64);
        self.slots[slot] = Some(inflight);
        if let Err(e) = self.push_entry(&entry) {
            // Never reached the ring: the slot (and with it the buffer) goes back.
            self.slots[slot] = None;
            self.free.push(slot);
            return Err(e);
        }
        Ok(())
    }

    /// Puts `entry` on the submission queue, handing the queue to the kernel first when full.
    fn push_entry(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: whatever the entry points at (a buffer and a file owned by its slot, or
            // nothing for a cancel) stays alive, unmoved (DmaBuf's heap allocation does not move
            // with the struct, nor do an IoBuf's or IoBufMut's bytes), until its completion is
            // reaped; a buffer the kernel writes is owned by the slot alone (an IoBufMut is never
            // shared), so no reference reaches it meanwhile; a shared
            // buffer the kernel reads is not written meanwhile, since writing an IoBuf's bytes
            // needs its only reference and the slot holds one: `reap` frees a slot only on its
            // completion, and `Drop` waits for every completion before the slots are freed (or
            // leaks them). When this push fails the entry is not in the queue and the caller
            // may free what it points at.
            let pushed = unsafe { self.ring.submission().push(entry) };
            if pushed.is_ok() {
                self.unsubmitted += 1;
                return Ok(());
            }
            self.submit()?; // queue full: hand the batch to the kernel first
            self.unsubmitted = 0;
        }
    }

    /// Hands queued operations to the kernel (one syscall for the batch).
    pub fn flush(&mut self) -> io::Result<()> {
        if self.unsubmitted > 0 {
            self.submit()?;
            self.unsubmitted = 0;
        }
        Ok(())
    }

    /// Collects finished operations into `out`; returns how many.
    pub fn reap(&mut self, out: &mut Vec<UringCompletion>) -> usize {
        let mut n = 0;
        // No syscall here, not even to drain the eventfd: its watchers are edge-triggered (epoll
        // through mio), and the kernel's every signal is a new edge whatever the count.
        if self.inflight() == 0 {
            return 0;
        }
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
            out.push(UringCompletion { tag: done.tag, result, buf: done.buf, into: done.into });
            n += 1;
        }
        n
    }

    /// Asks the kernel to cancel every operation in flight (the cancels' own completions carry
    /// [`CANCEL`] and are ignored). Operations already running on a device finish normally.
    fn cancel_all(&mut self) {
        let live: Vec<u64> = self.slots.iter().enumerate().filter(|(_, s)| s.is_some()).map(|(i, _)| i as u64).collect();
        for slot in live {
            let cancel = opcode::AsyncCancel::new(slot).build().user_data(CANCEL);
            if self.push_entry(&cancel).is_err() {
                return; // the ring refuses work; waiting below still reaps what completes
            }
        }
        let _ = self.flush();
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        if self.inflight() == 0 {
            return;
        }
        #[cfg(test)]
        {
            self.fail_submit = false;
        }
        // Queued entries reach the kernel with the cancels (there is no taking them back).
        let start = Instant::now();
        let mut last_cancel = None::<Instant>;
        let mut done = Vec::new();
        while self.inflight() > 0 {
            if last_cancel.is_none_or(|t| t.elapsed() >= Duration::from_millis(500)) {
                // Again every half second: an operation the kernel could not cancel while it was
                // being issued may be cancellable once it waits.
                self.cancel_all();
                last_cancel = Some(Instant::now());
            }
            if self.submit().is_err() {
                std::thread::sleep(Duration::from_millis(1));
            }
            done.clear();
            let reaped = self.reap(&mut done);
            #[cfg(test)]
            tests::DROP_REAPED.with(|n| n.set(n.get() + reaped));
            if reaped == 0 {
                if start.elapsed() > DROP_PATIENCE {
                    // The kernel still holds these buffers: leak them rather than let it write
                    // into freed memory.
                    std::mem::forget(std::mem::take(&mut self.slots));
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
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
    use std::os::fd::OwnedFd;

    thread_local! {
        /// Completions the rings dropped on this thread reaped while dropping.
        pub(super) static DROP_REAPED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

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

    fn scratch(name: &str) -> (std::path::PathBuf, Arc<File>) {
        let path = std::env::temp_dir().join(format!("nvmetro-uring-{name}-{}", std::process::id()));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        (path, Arc::new(file))
    }

    #[test]
    fn failed_push_gives_its_slot_back() {
        let (path, file) = scratch("failed-push");
        let mut ring = Uring::new(1).unwrap();
        ring.push(1, UringOp::Fsync { file: file.clone() }).unwrap();
        assert_eq!(ring.inflight(), 1);
        // The queue is full and the kernel refuses the batch: the second push fails...
        ring.fail_submit = true;
        let e = ring.push(2, UringOp::Write { file: file.clone(), offset: 0, buf: DmaBuf::zeroed(4096) }).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EBUSY));
        // ...and takes no slot.
        assert_eq!(ring.inflight(), 1, "a failed push must not stay counted");
        assert!(ring.flush().is_err());
        ring.fail_submit = false;
        ring.flush().unwrap();
        let mut out = Vec::new();
        while out.is_empty() {
            ring.reap(&mut out);
        }
        assert_eq!((out.len(), out[0].tag), (1, 1));
        assert_eq!(ring.inflight(), 0, "everything reaped: nothing outstanding");
        // The slot is reusable.
        ring.push(3, UringOp::Fsync { file }).unwrap();
        ring.flush().unwrap();
        out.clear();
        while out.is_empty() {
            ring.reap(&mut out);
        }
        assert_eq!((out[0].tag, ring.inflight()), (3, 0));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn drop_cancels_and_reaps_reads_that_never_complete() {
        let (reader, mut writer) = std::io::pipe().unwrap();
        let reader = Arc::new(File::from(OwnedFd::from(reader)));
        let mut ring = Uring::new(4).unwrap();
        // More reads than the queue holds, some handed to the kernel, the last ones only queued.
        for tag in 0..6 {
            ring.push(tag, UringOp::Read { file: reader.clone(), offset: 0, buf: DmaBuf::zeroed(4096) }).unwrap();
        }
        ring.flush().unwrap();
        ring.push(6, UringOp::Read { file: reader.clone(), offset: 0, buf: DmaBuf::zeroed(4096) }).unwrap();
        let mut out = Vec::new();
        ring.reap(&mut out);
        assert!(out.is_empty(), "nothing was written to the pipe: {out:?}");
        assert_eq!(ring.inflight(), 7);
        let started = Instant::now();
        DROP_REAPED.with(|n| n.set(0));
        drop(ring);
        assert!(started.elapsed() < Duration::from_secs(5), "drop took {:?}", started.elapsed());
        assert_eq!(DROP_REAPED.with(|n| n.get()), 7, "the drop waited for every read's completion");
        // The reads were cancelled, not left pending: data written now stays in the pipe.
        writer.write_all(b"after drop").unwrap();
        drop(writer);
        let mut got = String::new();
        std::io::Read::read_to_string(&mut &*reader, &mut got).unwrap();
        assert_eq!(got, "after drop");
        assert_eq!(Arc::strong_count(&reader), 1, "the ring gave every file back");
    }

    #[test]
    fn drop_waits_for_file_io_in_flight() {
        let (path, file) = scratch("drop-io");
        file.set_len(1 << 20).unwrap();
        let mut ring = Uring::new(8).unwrap();
        for tag in 0..32u64 {
            let op = if tag % 2 == 0 {
                UringOp::Write { file: file.clone(), offset: tag * 4096, buf: DmaBuf::from_slice(&[tag as u8; 4096]) }
            } else {
                UringOp::Read { file: file.clone(), offset: tag * 4096, buf: DmaBuf::zeroed(4096) }
            };
            ring.push(tag, op).unwrap();
        }
        ring.flush().unwrap();
        DROP_REAPED.with(|n| n.set(0));
        drop(ring);
        assert_eq!(DROP_REAPED.with(|n| n.get()), 32, "every operation was reaped before the drop returned");
        assert_eq!(Arc::strong_count(&file), 1);
        std::fs::remove_file(path).unwrap();
    }
}
