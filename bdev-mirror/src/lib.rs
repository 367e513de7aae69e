//! Block devices (SPDK's bdev model): a [`Bdev`] describes a device and opens one [`BdevChannel`]
//! per reactor; each channel takes operations tagged by the caller and reports completions from
//! [`BdevChannel::poll`], never blocking. Channels that wait on the kernel expose a file
//! descriptor that becomes readable when completions arrive, so a parked reactor wakes up.
//!
//! * [`malloc`]: RAM, optionally on 2 MiB hugepages, shared by all reactors.
//! * [`null`]: discards writes, reads zeroes; for measuring the target itself.
//! * [`file`]: a file or block device through io_uring, O_DIRECT by default.
//! * [`range_lock`]: lock-free LBA range locks (the file bdev's fused Compare+Write atomicity).
//! * [`error`]: error injection over another bdev (fails, delays or drops selected commands).
//!
//! * [`mirror`]: two-site synchronous replication: the sans-IO core (ordering, resync, quorum,
//!   failing legs), its driver and link, the wire format, metadata and the witness protocol.
//!
//! Write payloads are [`IoBuf`]s: shared, pooled and page-aligned, so one buffer serves the
//! local write and the replication frame.

pub mod dr;
pub mod error;
pub mod file;
pub mod malloc;
pub mod mirror;
pub mod null;
pub mod range_lock;

pub use mirror::core::Access;
pub use nvmetro_ffi::{IoBuf, IoBufMut, IoBufPool};

use std::os::fd::RawFd;
use std::sync::Arc;

/// What a block device is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BdevInfo {
    pub name: String,
    pub block_size: u32,
    pub blocks: u64,
    /// Writes may sit in a volatile cache until Flush.
    pub volatile_cache: bool,
}

impl BdevInfo {
    pub fn size_bytes(&self) -> u64 {
        self.blocks * u64::from(self.block_size)
    }
}

/// An operation on a block device; offsets and lengths are in bytes, block-aligned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BdevOp {
    Read {
        offset: u64,
        len: usize,
    },
    /// `data` is shared, not copied: the mirror hands the same bytes to its local leg and to the
    /// replication link.
    Write {
        offset: u64,
        data: IoBuf,
        fua: bool,
    },
    /// Succeeds with [`BdevOutput::Miscompare`] when the bytes differ.
    Compare {
        offset: u64,
        expected: Vec<u8>,
    },
    /// Compare, and only if equal write, atomically against every other write to the range.
    CompareAndWrite {
        offset: u64,
        expected: Vec<u8>,
        data: Vec<u8>,
    },
    WriteZeroes {
        offset: u64,
        len: u64,
    },
    Deallocate {
        offset: u64,
        len: u64,
    },
    Flush,
}

impl BdevOp {
    /// The byte range the operation touches, if any.
    pub fn range(&self) -> Option<(u64, u64)> {
        match self {
            BdevOp::Read { offset, len } => Some((*offset, *len as u64)),
            BdevOp::Write { offset, data, .. } => Some((*offset, data.len() as u64)),
            BdevOp::Compare { offset, expected } | BdevOp::CompareAndWrite { offset, expected, .. } => {
                Some((*offset, expected.len() as u64))
            }
            BdevOp::WriteZeroes { offset, len } | BdevOp::Deallocate { offset, len } => Some((*offset, *len)),
            BdevOp::Flush => None,
        }
    }

    /// Whether the operation only reads (Read, Compare): nothing to replicate or mark dirty.
    pub fn reads_only(&self) -> bool {
        matches!(self, BdevOp::Read { .. } | BdevOp::Compare { .. })
    }
}

/// What a finished operation returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BdevOutput {
    Done,
    Data(Vec<u8>),
    /// A read's data in the buffer offered with [`BdevChannel::submit_read_buf`].
    Buffer(IoBuf),
    Miscompare,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BdevError {
    #[error("range {offset}+{len} is beyond the device's {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("I/O error: {0}")]
    Io(String),
    #[error("no space left on the device")]
    NoSpace,
    /// A mirror leg that may not serve now (the peer is lost and this site is not the survivor,
    /// or it is being resynced): hosts get ANA Inaccessible and retry on another path.
    #[error("this mirror leg is fenced")]
    Fenced,
    /// A metro leg deciding whether it serves (its peer was just lost, the witness is being
    /// asked): hosts get ANA Transition and retry.
    #[error("this mirror leg is changing state")]
    Transition,
}

impl From<std::io::Error> for BdevError {
    fn from(e: std::io::Error) -> BdevError {
        if e.raw_os_error() == Some(28) {
            BdevError::NoSpace
        } else {
            BdevError::Io(e.to_string())
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BdevCompletion {
    pub tag: u64,
    pub result: Result<BdevOutput, BdevError>,
}

/// Work a bdev needs done on a reactor's loop (SPDK's pollers): the mirror's replication link.
pub trait Poller: Send {
    /// One turn; returns whether anything was done. `ready`: one of its [`Poller::wake_fds`]
    /// turned ready since the last turn (without it, a poller skips the syscalls that would only
    /// find nothing).
    fn poll(&mut self, ready: bool) -> bool;
    /// Descriptors whose readiness must wake the reactor when it sleeps.
    fn wake_fds(&self) -> Vec<RawFd>;
    /// The reactor is about to sleep (true) or woke up (false).
    fn parking(&mut self, parked: bool);
    /// The next moment work falls due without any descriptor turning ready (a timer, a frame
    /// held back by an emulated delay): a sleeping reactor wakes then. `None`: nothing is due.
    fn next_deadline(&self) -> Option<std::time::Instant> {
        None
    }
}

/// A block device shared by all reactors.
pub trait Bdev: Send + Sync + std::fmt::Debug {
    fn info(&self) -> &BdevInfo;
    /// Whether this device may serve host I/O now (a fenced mirror leg may not).
    fn serving(&self) -> bool {
        matches!(self.access(), Access::Serving | Access::Sole | Access::Remote | Access::Leading | Access::Standby)
    }
    /// How hosts should see paths to this device (a metro mirror leg may be serving alone,
    /// deciding, or fenced).
    fn access(&self) -> Access {
        Access::Serving
    }
    /// Mirror: replication settings changed by a reload, applied live.
    fn tune(&self, _tuning: mirror::driver::MirrorTuning) {}
    /// Metro mirror, manual failback: let a resynced leg serve again. Returns whether it was held.
    fn failback(&self) -> bool {
        false
    }
    /// A poller the device needs run on a reactor; handed out once.
    fn take_poller(&self) -> Option<Box<dyn Poller>> {
        None
    }
    /// Pollers that spread the device's work over further reactors (a mirror's lanes), each on
    /// a reactor other than [`Bdev::take_poller`]'s; handed out once. The device works without
    /// them: their work then stays with its main poller.
    fn take_helper_pollers(&self) -> Vec<Box<dyn Poller>> {
        Vec::new()
    }
    /// Replication state, for devices that have one.
    /// The mirror behind this bdev, for mirror-only operations (resync).
    fn as_mirror(&self) -> Option<&mirror::driver::MirrorBdev> {
        None
    }
    /// The error-injection device behind this bdev, for setting its fault rules.
    fn as_error(&self) -> Option<&error::ErrorBdev> {
        None
    }
    fn mirror_status(&self) -> Option<mirror::driver::StatusReport> {
        None
    }
    /// Opens a channel for the calling reactor.
    fn channel(self: Arc<Self>) -> std::io::Result<Box<dyn BdevChannel>>;
}

/// A reactor's handle on a device.
pub trait BdevChannel: Send {
    /// Queues an operation; its completion comes from a later [`BdevChannel::poll`].
    fn submit(&mut self, tag: u64, op: BdevOp);
    /// Queues `BdevOp::Read { offset, len }`, offering `buf` (a recycled buffer whose contents
    /// do not matter) to hold the data: the completion's [`BdevOutput::Data`] is `buf` refilled by
    /// channels that can read into it, or a buffer of their own (the default drops `buf`).
    fn submit_read(&mut self, tag: u64, offset: u64, len: usize, buf: Vec<u8>) {
        drop(buf);
        self.submit(tag, BdevOp::Read { offset, len });
    }
    /// Queues `BdevOp::Read { offset, len }` into `buf` (capacity at least `len`; a buffer
    /// the transport can send from without a copy, such as registered RDMA memory): channels
    /// that can read into it complete with [`BdevOutput::Buffer`] holding it, the others (the
    /// default drops `buf`) with [`BdevOutput::Data`].
    fn submit_read_buf(&mut self, tag: u64, offset: u64, len: usize, buf: IoBufMut) {
        drop(buf);
        self.submit(tag, BdevOp::Read { offset, len });
    }
    /// Hands queued operations to the device and collects finished ones into `done`.
    fn poll(&mut self, done: &mut Vec<BdevCompletion>) -> usize;
    /// Operations submitted and not yet completed.
    fn outstanding(&self) -> usize;
    /// Descriptors that become readable when completions are ready, for channels that wait on
    /// the kernel or on another thread.
    fn wake_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
}

/// A device that completes every operation within `submit` (RAM, null).
pub trait Synchronous: Send + Sync + 'static {
    fn execute(&self, op: BdevOp) -> Result<BdevOutput, BdevError>;
    /// `BdevOp::Read { offset, len }` into `buf` (see [`BdevChannel::submit_read`]); the default
    /// executes the Read and drops `buf`.
    fn read_into(&self, offset: u64, len: usize, buf: Vec<u8>) -> Result<BdevOutput, BdevError> {
        drop(buf);
        self.execute(BdevOp::Read { offset, len })
    }
    /// `BdevOp::Read { offset, len }` into `buf` (see [`BdevChannel::submit_read_buf`]); the
    /// default executes the Read and drops `buf`.
    fn read_into_buf(&self, offset: u64, len: usize, buf: IoBufMut) -> Result<BdevOutput, BdevError> {
        drop(buf);
        self.execute(BdevOp::Read { offset, len })
    }
}

/// The channel of a [`Synchronous`] device: completions wait in a list for the next poll.
pub struct SyncChannel<D: Synchronous> {
    device: Arc<D>,
    done: Vec<BdevCompletion>,
}

impl<D: Synchronous> SyncChannel<D> {
    pub fn boxed(device: Arc<D>) -> Box<dyn BdevChannel> {
        Box::new(SyncChannel { device, done: Vec::new() })
    }
}

impl<D: Synchronous> BdevChannel for SyncChannel<D> {
    fn submit(&mut self, tag: u64, op: BdevOp) {
        let result = self.device.execute(op);
        self.done.push(BdevCompletion { tag, result });
    }
    fn submit_read(&mut self, tag: u64, offset: u64, len: usize, buf: Vec<u8>) {
        let result = self.device.read_into(offset, len, buf);
        self.done.push(BdevCompletion { tag, result });
    }
    fn submit_read_buf(&mut self, tag: u64, offset: u64, len: usize, buf: IoBufMut) {
        if buf.capacity() < len {
            return self.submit(tag, BdevOp::Read { offset, len });
        }
        let result = self.device.read_into_buf(offset, len, buf);
        self.done.push(BdevCompletion { tag, result });
    }
    fn poll(&mut self, done: &mut Vec<BdevCompletion>) -> usize {
        let n = self.done.len();
        done.append(&mut self.done);
        n
    }
    fn outstanding(&self) -> usize {
        self.done.len()
    }
}

/// Checks that an operation fits the device.
pub fn check_range(info: &BdevInfo, op: &BdevOp) -> Result<(), BdevError> {
    if let Some((offset, len)) = op.range() {
        let size = info.size_bytes();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(BdevError::OutOfRange { offset, len, size });
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod conformance {
    //! Behaviour every bdev must show, run against each kind.
    use super::*;

    pub fn run_to_completion(ch: &mut dyn BdevChannel, tag: u64, op: BdevOp) -> Result<BdevOutput, BdevError> {
        ch.submit(tag, op);
        wait_for(ch, tag)
    }

    /// [`BdevChannel::submit_read`] with `buf`, run to completion.
    pub fn read_into(ch: &mut dyn BdevChannel, tag: u64, offset: u64, len: usize, buf: Vec<u8>) -> Result<BdevOutput, BdevError> {
        ch.submit_read(tag, offset, len, buf);
        wait_for(ch, tag)
    }

    /// [`BdevChannel::submit_read_buf`] with `buf`, run to completion; the data, whichever
    /// way it came, and whether it came in `buf` (its first byte's address).
    pub fn read_into_buf(ch: &mut dyn BdevChannel, tag: u64, offset: u64, len: usize, buf: IoBufMut) -> (Result<Vec<u8>, BdevError>, bool) {
        let addr = buf.as_ptr();
        ch.submit_read_buf(tag, offset, len, buf);
        match wait_for(ch, tag) {
            Ok(BdevOutput::Buffer(b)) => (Ok(b.to_vec()), b.as_ptr() == addr),
            Ok(BdevOutput::Data(d)) => (Ok(d), false),
            Ok(other) => panic!("a read completed with {other:?}"),
            Err(e) => (Err(e), false),
        }
    }

    fn wait_for(ch: &mut dyn BdevChannel, tag: u64) -> Result<BdevOutput, BdevError> {
        let mut done = Vec::new();
        for _ in 0..1_000_000 {
            ch.poll(&mut done);
            if let Some(c) = done.iter().find(|c| c.tag == tag) {
                return c.result.clone();
            }
            std::thread::yield_now();
        }
        panic!("operation {tag} never completed");
    }

    pub fn check(bdev: Arc<dyn Bdev>) {
        check_reads_into(bdev.clone(), true);
        let bs = bdev.info().block_size as usize;
        let size = bdev.info().size_bytes();
        let mut ch = bdev.clone().channel().unwrap();
        let pattern: Vec<u8> = (0..bs * 2).map(|i| (i * 7) as u8).collect();
        let run = |ch: &mut Box<dyn BdevChannel>, op| run_to_completion(ch.as_mut(), 1, op);
        assert_eq!(run(&mut ch, BdevOp::Write { offset: bs as u64, data: pattern.clone().into(), fua: false }), Ok(BdevOutput::Done));
        assert_eq!(run(&mut ch, BdevOp::Read { offset: bs as u64, len: bs * 2 }), Ok(BdevOutput::Data(pattern.clone())));
        // A read offered a recycled buffer (longer, shorter, or empty) returns the same bytes.
        for recycled in [vec![0x55; bs * 3], vec![0x55; bs], Vec::new()] {
            assert_eq!(read_into(ch.as_mut(), 1, bs as u64, bs * 2, recycled), Ok(BdevOutput::Data(pattern.clone())));
        }
        assert!(matches!(read_into(ch.as_mut(), 1, size, bs, vec![0; bs]), Err(BdevError::OutOfRange { .. })));
        assert_eq!(run(&mut ch, BdevOp::Compare { offset: bs as u64, expected: pattern.clone() }), Ok(BdevOutput::Done));
        let other = vec![0xeeu8; bs * 2];
        assert_eq!(run(&mut ch, BdevOp::Compare { offset: bs as u64, expected: other.clone() }), Ok(BdevOutput::Miscompare));
        assert_eq!(
            run(&mut ch, BdevOp::CompareAndWrite { offset: bs as u64, expected: other.clone(), data: other.clone() }),
            Ok(BdevOutput::Miscompare)
        );
        assert_eq!(
            run(&mut ch, BdevOp::CompareAndWrite { offset: bs as u64, expected: pattern.clone(), data: other.clone() }),
            Ok(BdevOutput::Done)
        );
        assert_eq!(run(&mut ch, BdevOp::Read { offset: bs as u64, len: bs * 2 }), Ok(BdevOutput::Data(other)));
        assert_eq!(run(&mut ch, BdevOp::WriteZeroes { offset: bs as u64, len: bs as u64 }), Ok(BdevOutput::Done));
        assert_eq!(run(&mut ch, BdevOp::Deallocate { offset: 2 * bs as u64, len: bs as u64 }), Ok(BdevOutput::Done));
        assert_eq!(run(&mut ch, BdevOp::Read { offset: bs as u64, len: bs * 2 }), Ok(BdevOutput::Data(vec![0; bs * 2])));
        assert_eq!(run(&mut ch, BdevOp::Flush), Ok(BdevOutput::Done));
        assert!(matches!(run(&mut ch, BdevOp::Read { offset: size, len: bs }), Err(BdevError::OutOfRange { .. })));
        assert_eq!(ch.outstanding(), 0);
    }

    /// Reads into an offered buffer return the same bytes as reads, in that buffer when
    /// `in_place` (the device reads into it), and a read past the end fails either way.
    pub fn check_reads_into(bdev: Arc<dyn Bdev>, in_place: bool) {
        let bs = bdev.info().block_size as usize;
        let size = bdev.info().size_bytes();
        let mut ch = bdev.clone().channel().unwrap();
        let pattern: Vec<u8> = (0..bs * 2).map(|i| (i * 11 + 3) as u8).collect();
        assert_eq!(
            run_to_completion(ch.as_mut(), 1, BdevOp::Write { offset: 0, data: pattern.clone().into(), fua: false }),
            Ok(BdevOutput::Done)
        );
        let pool = IoBufPool::new();
        // A buffer with stale bytes and a longer capacity: only `len` bytes come back.
        let mut stale = pool.take(bs * 4);
        stale.fill(0x5a);
        let (got, placed) = read_into_buf(ch.as_mut(), 2, 0, bs * 2, stale);
        assert_eq!(got, Ok(pattern.clone()));
        assert_eq!(placed, in_place, "read in the offered buffer");
        let (got, _) = read_into_buf(ch.as_mut(), 3, size, bs, pool.take(bs));
        assert!(matches!(got, Err(BdevError::OutOfRange { .. })), "{got:?}");
        assert_eq!(ch.outstanding(), 0);
    }
}
