//! Host data without a copy: a pool of I/O buffers carved out of memory registered with a
//! device once ([`RegisteredPool`], on 2 MiB hugepages when they are reserved), RDMA READs and
//! RECVs straight into one of its buffers ([`CmId::post_read_into`], [`CmId::post_recv_into`])
//! and RDMA WRITEs straight from one ([`CmId::post_write_from`]).
//!
//! The buffers are ordinary [`IoBufMut`]s: filled, frozen and shared with the local write and the
//! replication frame like any other, and back in the pool when the last holder drops them. The
//! device may write a buffer only while a [`PostedBuffer`] owns it (and reads one a
//! [`PostedWrite`] holds a clone of, so nobody writes it meanwhile), which gives it back only for
//! its own work completion: matched by queue pair and by a wr_id that no other request carries
//! (taken from a process-wide 62-bit counter, so never repeated; `post_send` and `post_recv`
//! refuse wr_ids with [`ZERO_COPY_WR_ID`] set). A request dropped before its completion came
//! leaves its buffer with the queue pair until the queue pair is destroyed, since the device
//! could still be writing it.
//!
//! The memory is registered for local writes only (no rkey is handed out), so a peer can never
//! write it; only the requests posted here do.

use super::cm::CmId;
use super::verbs::{ProtectionDomain, RemoteBuf, Sge, WcError, WorkCompletion};
use super::{os_error, RdmaError};
use crate::iobuf::Arena;
use crate::{IoBuf, IoBufMut, IoBufPool};
use rdma_sys as sys;
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Work request ids with this bit set belong to [`Posted`] requests: `post_send` and `post_recv`
/// refuse them, so no other completion can be taken for one of theirs.
pub const ZERO_COPY_WR_ID: u64 = 1 << 63;

static NEXT_WR_ID: AtomicU64 = AtomicU64::new(1);

/// A wr_id no request has carried (2^62 of them: 146 years at a billion a second).
fn unique_wr_id() -> u64 {
    ZERO_COPY_WR_ID | (NEXT_WR_ID.fetch_add(1, Ordering::Relaxed) & ((1 << 62) - 1))
}

/// The mapping and its registration.
struct RegisteredArena {
    ptr: NonNull<u8>,
    map_len: usize,
    size: usize,
    on_hugepages: bool,
    mr: NonNull<sys::ibv_mr>,
    lkey: u32,
    pd: Arc<ProtectionDomain>,
}

// SAFETY: the mapping is plain memory reached only through the pool's buffers (each owned by one
// holder at a time, or shared read-only), and ibv_dereg_mr may be called from any thread.
unsafe impl Send for RegisteredArena {}
// SAFETY: &RegisteredArena gives out only the base address, the size and the lkey.
unsafe impl Sync for RegisteredArena {}

// SAFETY: the anonymous mapping is zero-filled (initialised), fixed, and unmapped only in Drop;
// it is registered for local writes only, so the writers besides the buffers' owners are the
// device serving a request posted by `post_read_into` or `post_recv_into` and the kernel serving
// an io_uring read (`UringOp::ReadInto`), each owning the buffer it writes meanwhile.
unsafe impl Arena for RegisteredArena {
    fn base(&self) -> NonNull<u8> {
        self.ptr
    }
    fn size(&self) -> usize {
        self.size
    }
}

impl Drop for RegisteredArena {
    fn drop(&mut self) {
        // SAFETY: every buffer of the arena holds an Arc of it, so none is left, and no request
        // targets it; the MR was registered once and is deregistered once, before the PD (held
        // in self.pd) can go.
        let rc = unsafe { sys::ibv_dereg_mr(self.mr.as_ptr()) };
        if rc == 0 {
            // SAFETY: ptr/map_len are what mmap returned; deregistered, nothing reaches it.
            unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
        }
        // else: leak the mapping, the device may still reach it.
    }
}

/// I/O buffers in memory registered once with a protection domain's device.
#[derive(Clone)]
pub struct RegisteredPool {
    arena: Arc<RegisteredArena>,
    pool: IoBufPool,
}

impl RegisteredPool {
    /// Maps and registers `count` buffers of `size` bytes for each `(size, count)` of `slots`
    /// (sizes are 4 KiB times a power of two, at most 128 KiB), on hugepages when `hugepages`
    /// is set and enough are free.
    pub fn new(pd: &Arc<ProtectionDomain>, slots: &[(usize, usize)], hugepages: bool) -> Result<RegisteredPool, RdmaError> {
        let size = slots.iter().try_fold(0usize, |sum, &(s, n)| s.checked_mul(n).and_then(|b| sum.checked_add(b)));
        let size = size.ok_or(RdmaError::Invalid("a registered pool that large cannot be mapped"))?;
        if size == 0 {
            return Err(RdmaError::Invalid("a registered pool needs at least one buffer"));
        }
        if slots.iter().any(|&(s, _)| !s.is_power_of_two() || !(4096..=crate::IOBUF_POOLED_MAX).contains(&s)) {
            return Err(RdmaError::Invalid("registered pool buffers are 4 KiB times a power of two, at most 128 KiB"));
        }
        let huge = hugepages
            .then(|| size.next_multiple_of(crate::shmem::HUGEPAGE))
            .and_then(|len| crate::shmem::map(len, libc::MAP_HUGETLB).ok().map(|p| (p, len, true)));
        let (ptr, map_len, on_hugepages) = match huge {
            Some(m) => m,
            None => (crate::shmem::map(size, 0).map_err(|source| RdmaError::Os { op: "mmap", source })?, size, false),
        };
        let flags = sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0 as libc::c_int;
        // SAFETY: the mapping is valid for `size` bytes and stays until the arena's Drop, which
        // deregisters first; the PD is live (the arena keeps it).
        let mr = unsafe { sys::ibv_reg_mr(pd.raw(), ptr.as_ptr().cast(), size, flags) };
        let Some(mr) = NonNull::new(mr) else {
            let e = os_error("ibv_reg_mr");
            // SAFETY: ptr/map_len are what mmap returned, and nothing else knows the mapping.
            unsafe { libc::munmap(ptr.as_ptr().cast(), map_len) };
            return Err(e);
        };
        // SAFETY: the MR is registered; lkey is read-only after registration.
        let lkey = unsafe { (*mr.as_ptr()).lkey };
        let arena = Arc::new(RegisteredArena { ptr, map_len, size, on_hugepages, mr, lkey, pd: pd.clone() });
        let pool = IoBufPool::over_arena(arena.clone(), slots);
        Ok(RegisteredPool { arena, pool })
    }

    /// An idle buffer of `len` bytes, or None when every buffer that could hold it is out
    /// (never allocates).
    pub fn take(&self, len: usize) -> Option<IoBufMut> {
        self.pool.take_idle(len)
    }

    /// Buffers idle now.
    pub fn idle(&self) -> usize {
        self.pool.idle()
    }

    /// Bytes registered.
    pub fn size(&self) -> usize {
        self.arena.size
    }

    pub fn on_hugepages(&self) -> bool {
        self.arena.on_hugepages
    }

    /// Whether `buf`'s bytes are this pool's.
    pub fn contains(&self, buf: &IoBuf) -> bool {
        self.locate_bytes(buf.as_ptr(), buf.len()).is_some()
    }

    fn locate_bytes(&self, ptr: *const u8, len: usize) -> Option<(u64, u32)> {
        let base = self.arena.ptr.as_ptr() as usize;
        let start = (ptr as usize).checked_sub(base)?;
        (len > 0 && start + len <= self.arena.size).then_some(())?;
        Some((ptr as u64, u32::try_from(len).ok()?))
    }
}

impl fmt::Debug for RegisteredPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let pages = if self.arena.on_hugepages { "hugepages" } else { "ordinary pages" };
        write!(f, "RegisteredPool({} bytes on {pages}, {} idle)", self.arena.size, self.idle())
    }
}

/// A buffer a request in flight holds: one the device writes, or one it reads.
pub enum Held {
    Filling(IoBufMut),
    Sending(IoBuf),
}

/// The buffer types a [`Posted`] request holds.
pub trait HeldBuf: Sized + sealed::Sealed {
    /// Whether the buffer has one owner, so that a device may write it (not a shared one).
    #[doc(hidden)]
    const EXCLUSIVE: bool;
    #[doc(hidden)]
    fn into_held(self) -> Held;
    /// Its bytes: (first, length); for a writer, taken through the only reference.
    #[doc(hidden)]
    fn bytes(&mut self) -> (*const u8, usize);
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for crate::IoBufMut {}
    impl Sealed for crate::IoBuf {}
}

impl HeldBuf for IoBufMut {
    const EXCLUSIVE: bool = true;
    fn into_held(self) -> Held {
        Held::Filling(self)
    }
    fn bytes(&mut self) -> (*const u8, usize) {
        let (ptr, len) = self.raw_parts();
        (ptr, len)
    }
}

impl HeldBuf for IoBuf {
    const EXCLUSIVE: bool = false;
    fn into_held(self) -> Held {
        Held::Sending(self)
    }
    fn bytes(&mut self) -> (*const u8, usize) {
        (self.as_ptr(), self.len())
    }
}

/// What a request posted on a pool buffer does with it.
#[derive(Clone, Copy)]
enum PoolOp<'a> {
    /// RDMA READ from the peer into the buffer.
    Read(RemoteBuf),
    /// RDMA WRITE of the buffer to the peer.
    Write(RemoteBuf),
    /// RECV of a message: its head into an ordinary region's bytes, the rest into the buffer.
    Recv(Sge<'a>),
}

/// Buffers of requests dropped before their completion, kept until the queue pair is destroyed.
#[derive(Default)]
pub(super) struct HeldBuffers {
    /// (the queue pair is gone, the buffers kept, leak instead of release)
    inner: Mutex<(bool, Vec<Held>, bool)>,
}

impl HeldBuffers {
    fn keep(&self, buf: Held) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if g.2 {
            std::mem::forget(buf);
        } else if !g.0 {
            g.1.push(buf);
        }
        // else: the QP is gone, so the device cannot reach the buffer: it goes back now.
    }

    /// The queue pair was destroyed: the kept buffers go back to their pools.
    pub(super) fn release(&self) {
        let kept = {
            let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            g.0 = true;
            std::mem::take(&mut g.1)
        };
        drop(kept);
    }

    /// The queue pair could not be destroyed: the device may still reach the kept buffers, and
    /// any dropped later, so they are leaked rather than reused.
    pub(super) fn leak(&self) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.0 = true;
        std::mem::forget(std::mem::take(&mut g.1));
        g.2 = true;
    }
}

/// A request in flight on a buffer of a [`RegisteredPool`]: holds the buffer until its work
/// completion comes ([`Posted::complete`]).
pub struct Posted<B: HeldBuf> {
    buf: Option<B>,
    wr_id: u64,
    qp_num: u32,
    held: Arc<HeldBuffers>,
}

/// An RDMA READ or a RECV into a pool buffer, which it owns until its completion.
pub type PostedBuffer = Posted<IoBufMut>;
/// An RDMA WRITE from a pool buffer, which it holds (a clone, so nobody can write it) until its
/// completion.
pub type PostedWrite = Posted<IoBuf>;

impl<B: HeldBuf> Posted<B> {
    /// The wr_id its completion carries (it has [`ZERO_COPY_WR_ID`] set).
    pub fn wr_id(&self) -> u64 {
        self.wr_id
    }

    /// Whether `wc` is this request's completion.
    pub fn is_completed_by(&self, wc: &WorkCompletion) -> bool {
        wc.wr_id() == self.wr_id && wc.qp_num() == self.qp_num
    }

    /// The buffer back, with the error if the request failed (its bytes are then unspecified),
    /// for this request's own completion; any other completion gives the request back.
    pub fn complete(mut self, wc: &WorkCompletion) -> Result<(B, Option<WcError>), Posted<B>> {
        if !self.is_completed_by(wc) {
            return Err(self);
        }
        let buf = self.buf.take().expect("a posted request owns its buffer until it completes");
        Ok((buf, wc.error()))
    }
}

impl<B: HeldBuf> Drop for Posted<B> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.held.keep(buf.into_held());
        }
    }
}

impl<B: HeldBuf> fmt::Debug for Posted<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Posted(wr {:#x}, qp {})", self.wr_id, self.qp_num)
    }
}

impl CmId {
    /// RDMA READs `remote` into `buf`, which must come from `pool` and be as long as the data
    /// (set its length first); the read is signaled. On failure the buffer comes back with the
    /// error.
    pub fn post_read_into(&self, pool: &RegisteredPool, buf: IoBufMut, remote: RemoteBuf) -> Result<PostedBuffer, (IoBufMut, RdmaError)> {
        self.post_on_pool(pool, buf, PoolOp::Read(remote))
    }

    /// Posts a RECV that scatters a message first into `head` (bytes of an ordinary region)
    /// and the rest into `buf`, which must come from `pool` (the completion's byte length
    /// counts both). On failure the buffer comes back with the error.
    pub fn post_recv_into(&self, pool: &RegisteredPool, head: Sge<'_>, buf: IoBufMut) -> Result<PostedBuffer, (IoBufMut, RdmaError)> {
        self.post_on_pool(pool, buf, PoolOp::Recv(head))
    }

    /// RDMA WRITEs all of `buf`, which must come from `pool`, into `remote`; the write is
    /// signaled, and holds `buf` (unwritable while it does) until its completion.
    pub fn post_write_from(&self, pool: &RegisteredPool, buf: IoBuf, remote: RemoteBuf) -> Result<PostedWrite, (IoBuf, RdmaError)> {
        self.post_on_pool(pool, buf, PoolOp::Write(remote))
    }

    /// Posts `op` on `buf`, a buffer of `pool`, signaled; the returned request holds `buf` until
    /// its completion.
    fn post_on_pool<B: HeldBuf>(&self, pool: &RegisteredPool, mut buf: B, op: PoolOp<'_>) -> Result<Posted<B>, (B, RdmaError)> {
        let (qp, pd, held) = match self.qp_for_reads() {
            Ok(parts) => parts,
            Err(e) => return Err((buf, e)),
        };
        if !Arc::ptr_eq(pd, &pool.arena.pd) {
            return Err((buf, RdmaError::Invalid("the pool is registered with another protection domain than the queue pair's")));
        }
        if !matches!(op, PoolOp::Write(_)) && !B::EXCLUSIVE {
            return Err((buf, RdmaError::Invalid("a device may write only a buffer with one owner")));
        }
        let (ptr, len) = buf.bytes();
        let Some((addr, len)) = pool.locate_bytes(ptr, len) else {
            return Err((buf, RdmaError::Invalid("the buffer is empty or not one of the pool's")));
        };
        if matches!(op, PoolOp::Read(r) | PoolOp::Write(r) if len > r.len) {
            return Err((buf, RdmaError::Invalid("the request is longer than the remote buffer")));
        }
        let qp_num = self.qp_num().expect("the queue pair exists");
        let wr_id = unique_wr_id();
        let mine = sys::ibv_sge { addr, length: len, lkey: pool.arena.lkey };
        let (rc, verb) = match op {
            PoolOp::Read(remote) | PoolOp::Write(remote) => {
                let mut sge = mine;
                // SAFETY: ibv_send_wr is plain data; all-zero is valid.
                let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
                wr.wr_id = wr_id;
                wr.sg_list = &mut sge;
                wr.num_sge = 1;
                wr.opcode = match op {
                    PoolOp::Read(_) => sys::ibv_wr_opcode::IBV_WR_RDMA_READ,
                    _ => sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE,
                };
                wr.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
                wr.wr.rdma = sys::rdma_t { remote_addr: remote.addr, rkey: remote.rkey };
                let mut bad: *mut sys::ibv_send_wr = std::ptr::null_mut();
                // SAFETY: the QP is live (self keeps it) and on the pool's PD; `wr` and its entry
                // are valid for the call. The entry names `len` bytes of `buf`, inside the
                // registered arena (checked), and the Posted made below holds `buf` until this
                // request's own completion or the QP's destruction: a READ writes them while
                // that buffer has one owner (checked), out of every reference's reach; a WRITE
                // only reads them, and a shared buffer held here stays mapped and unwritten.
                (unsafe { sys::ibv_post_send(qp, &mut wr, &mut bad) }, "ibv_post_send")
            }
            PoolOp::Recv(head) => {
                let mut sges = [head.raw(), mine];
                let mut wr = sys::ibv_recv_wr { wr_id, next: std::ptr::null_mut(), sg_list: sges.as_mut_ptr(), num_sge: 2 };
                let mut bad: *mut sys::ibv_recv_wr = std::ptr::null_mut();
                // SAFETY: as for a READ; the head entry names bytes of a live region (borrowed
                // for the call), which the device may write at any time by that region's rules.
                (unsafe { sys::ibv_post_recv(qp, &mut wr, &mut bad) }, "ibv_post_recv")
            }
        };
        if rc != 0 {
            return Err((buf, RdmaError::os_code(verb, rc)));
        }
        Ok(Posted { buf: Some(buf), wr_id, qp_num, held: held.clone() })
    }
}
