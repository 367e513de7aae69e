//! Devices, protection domains, memory regions, completion channels and completion queues.

use super::{os_error, RdmaError};
use crate::{DmaBuf, SharedMem};
use rdma_sys as sys;
use std::ffi::CStr;
use std::fmt;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::Arc;

/// librdmacm's device list: every context in it stays open until the list is freed.
struct DeviceList {
    list: NonNull<*mut sys::ibv_context>,
}

// SAFETY: the list is written once by rdma_get_devices and only read afterwards; librdmacm
// serialises rdma_free_devices with its own mutex, so any thread may free it.
unsafe impl Send for DeviceList {}
// SAFETY: as above: shared access only reads the array.
unsafe impl Sync for DeviceList {}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the list came from rdma_get_devices and is freed once, here, after every
        // Device (each holds an Arc of this list) and so every object made on its contexts is gone.
        unsafe { sys::rdma_free_devices(self.list.as_ptr()) }
    }
}

/// An RDMA device as librdmacm opened it: the verbs context that rdma_cm ids on this device use,
/// so a protection domain allocated here can carry the queue pairs of its connections.
#[derive(Clone)]
pub struct Device {
    _list: Arc<DeviceList>,
    ctx: NonNull<sys::ibv_context>,
    name: String,
}

// SAFETY: an ibv_context may be used from any thread (libibverbs and its providers lock
// internally); the context stays open while the Arc'd list lives.
unsafe impl Send for Device {}
// SAFETY: as above: every verb taking the context is thread-safe.
unsafe impl Sync for Device {}

/// What a device can do (ibv_query_device), the limits a transport sizes its queues by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceAttributes {
    pub max_qp_wr: u32,
    pub max_sge: u32,
    pub max_cqe: u32,
    pub max_mr_size: u64,
    /// RDMA READs a queue pair can answer at once (the responder resources it can grant).
    pub max_qp_rd_atom: u32,
    /// RDMA READs a queue pair can have outstanding as the initiator.
    pub max_qp_init_rd_atom: u32,
}

impl Device {
    /// Every RDMA device of this machine, or [`RdmaError::NoDevice`] when there is none.
    pub fn list() -> Result<Vec<Device>, RdmaError> {
        let mut n: libc::c_int = 0;
        // SAFETY: rdma_get_devices writes the count through the valid pointer and returns a
        // NULL-terminated array it owns (or NULL), released by rdma_free_devices.
        let raw = unsafe { sys::rdma_get_devices(&mut n) };
        let Some(list) = NonNull::new(raw) else { return Err(RdmaError::NoDevice) };
        let list = Arc::new(DeviceList { list });
        let mut out = Vec::new();
        for i in 0..n.max(0) as usize {
            // SAFETY: the array holds `n` context pointers (then NULL), and the list is alive.
            let ctx = unsafe { *list.list.as_ptr().add(i) };
            let Some(ctx) = NonNull::new(ctx) else { break };
            // SAFETY: `ctx` is an open context whose `device` is valid while it is open, and
            // ibv_get_device_name returns a NUL-terminated string owned by the device.
            let name = unsafe { CStr::from_ptr(sys::ibv_get_device_name((*ctx.as_ptr()).device)) };
            // SAFETY: the context is open; its async descriptor is read only by
            // Device::take_async_events, which expects it non-blocking.
            super::set_nonblocking(unsafe { (*ctx.as_ptr()).async_fd }, "fcntl(device async fd, O_NONBLOCK)")?;
            out.push(Device { _list: list.clone(), ctx, name: name.to_string_lossy().into_owned() });
        }
        if out.is_empty() {
            return Err(RdmaError::NoDevice);
        }
        Ok(out)
    }

    /// The kernel's name for the device (`rxe0`, `mlx5_0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The device's limits.
    pub fn attributes(&self) -> Result<DeviceAttributes, RdmaError> {
        // SAFETY: ibv_device_attr is plain data; all-zero is a valid value.
        let mut a: sys::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: the context is open (the list lives) and `a` is a valid, writable attribute struct.
        let rc = unsafe { sys::ibv_query_device(self.ctx.as_ptr(), &mut a) };
        if rc != 0 {
            return Err(RdmaError::os_code("ibv_query_device", rc));
        }
        let u = |v: libc::c_int| v.max(0) as u32;
        Ok(DeviceAttributes {
            max_qp_wr: u(a.max_qp_wr),
            max_sge: u(a.max_sge),
            max_cqe: u(a.max_cqe),
            max_mr_size: a.max_mr_size,
            max_qp_rd_atom: u(a.max_qp_rd_atom),
            max_qp_init_rd_atom: u(a.max_qp_init_rd_atom),
        })
    }

    pub(crate) fn context(&self) -> *mut sys::ibv_context {
        self.ctx.as_ptr()
    }
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Device({})", self.name)
    }
}

/// A protection domain: the memory regions and queue pairs that may address each other.
pub struct ProtectionDomain {
    pd: NonNull<sys::ibv_pd>,
    device: Device,
}

// SAFETY: PD verbs (reg_mr, create_qp, dealloc) are thread-safe in libibverbs.
unsafe impl Send for ProtectionDomain {}
// SAFETY: as above.
unsafe impl Sync for ProtectionDomain {}

impl ProtectionDomain {
    /// Allocates a protection domain on `device`.
    pub fn new(device: &Device) -> Result<Arc<ProtectionDomain>, RdmaError> {
        // SAFETY: the context is open while `device` (and the clone kept below) lives.
        let pd = unsafe { sys::ibv_alloc_pd(device.context()) };
        let pd = NonNull::new(pd).ok_or_else(|| os_error("ibv_alloc_pd"))?;
        Ok(Arc::new(ProtectionDomain { pd, device: device.clone() }))
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Registers `mem` once, for the device to read and write by lkey and (with the remote
    /// flags) the peer by rkey. The region owns the memory until it is dropped or
    /// [`MemoryRegion::into_inner`] deregisters it.
    pub fn register<M: RdmaMemory>(self: &Arc<Self>, mut mem: M, access: Access) -> Result<MemoryRegion<M>, RdmaError> {
        let (ptr, len) = mem.region();
        if len == 0 {
            return Err(RdmaError::Invalid("cannot register an empty buffer"));
        }
        let mut flags = access.0;
        if flags & (Access::REMOTE_WRITE.0 | Access::REMOTE_ATOMIC.0) != 0 {
            flags |= Access::LOCAL_WRITE.0; // the verbs refuse remote write without local write
        }
        // SAFETY: `ptr` is valid for `len` bytes for as long as `mem` lives (RdmaMemory's
        // contract), and the region keeps `mem` until the MR is deregistered; the PD is live.
        let mr = unsafe { sys::ibv_reg_mr(self.pd.as_ptr(), ptr.cast(), len, flags as libc::c_int) };
        let mr = NonNull::new(mr).ok_or_else(|| os_error("ibv_reg_mr"))?;
        Ok(MemoryRegion { mr, ptr, len, mem: ManuallyDrop::new(mem), pd: self.clone() })
    }

    pub(crate) fn raw(&self) -> *mut sys::ibv_pd {
        self.pd.as_ptr()
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: every MR and QP on this PD holds an Arc of it, so none is left; the PD was
        // allocated by ibv_alloc_pd and is freed once. A failure (EBUSY) leaves it allocated.
        unsafe { sys::ibv_dealloc_pd(self.pd.as_ptr()) };
    }
}

impl fmt::Debug for ProtectionDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProtectionDomain({})", self.device.name)
    }
}

/// Access rights of a memory region (ibv_access_flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access(u32);

impl Access {
    /// The local device may write the region (RECV and RDMA READ targets).
    pub const LOCAL_WRITE: Access = Access(sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0);
    /// The peer may RDMA WRITE into the region (implies LOCAL_WRITE).
    pub const REMOTE_WRITE: Access = Access(sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE.0);
    /// The peer may RDMA READ the region.
    pub const REMOTE_READ: Access = Access(sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ.0);
    /// The peer may run atomics on the region (implies LOCAL_WRITE).
    pub const REMOTE_ATOMIC: Access = Access(sys::ibv_access_flags::IBV_ACCESS_REMOTE_ATOMIC.0);
    /// No access but the local device's reads (SEND and RDMA WRITE sources).
    pub const LOCAL_READ: Access = Access(0);
}

impl std::ops::BitOr for Access {
    type Output = Access;
    fn bitor(self, rhs: Access) -> Access {
        Access(self.0 | rhs.0)
    }
}

/// Memory a [`MemoryRegion`] can own.
///
/// # Safety
///
/// `region` must return a pointer valid for reads and writes of the returned length that stays
/// at that address, valid, for as long as the value lives (moving the value must not move the
/// bytes), and while the value is registered nothing may hold a Rust reference to those bytes:
/// the device and the peer write them at any time, so they may only be copied through raw
/// pointers.
pub unsafe trait RdmaMemory: Send {
    fn region(&mut self) -> (*mut u8, usize);
}

// SAFETY: a DmaBuf's bytes live in a heap allocation that moves with the value only by pointer;
// once the region owns it, nothing else can borrow it (the region hands out no references).
unsafe impl RdmaMemory for DmaBuf {
    fn region(&mut self) -> (*mut u8, usize) {
        (self.as_mut_ptr(), self.len())
    }
}

// SAFETY: the mapping stays put until the last Arc is dropped, and SharedMem never hands out
// references to its bytes, only copies made through raw pointers under its stripe locks.
unsafe impl RdmaMemory for Arc<SharedMem> {
    fn region(&mut self) -> (*mut u8, usize) {
        (self.base_ptr(), self.len())
    }
}

/// Registered memory: owns its buffer, names it to the device by lkey and to the peer by rkey.
///
/// Its bytes are reachable only by copies ([`MemoryRegion::read`], [`MemoryRegion::write`]),
/// since the device and the peer may write them at any moment: read a RECV or RDMA READ target
/// only after its completion, and a region the peer RDMA WRITEs only after the peer said so.
pub struct MemoryRegion<M: RdmaMemory> {
    mr: NonNull<sys::ibv_mr>,
    ptr: *mut u8,
    len: usize,
    mem: ManuallyDrop<M>,
    pd: Arc<ProtectionDomain>,
}

// SAFETY: the MR handle is usable from any thread and the memory is Send (RdmaMemory: Send).
unsafe impl<M: RdmaMemory> Send for MemoryRegion<M> {}
// SAFETY: &MemoryRegion only reads the bytes (copies out); writes need &mut.
unsafe impl<M: RdmaMemory> Sync for MemoryRegion<M> {}

impl<M: RdmaMemory> MemoryRegion<M> {
    pub fn lkey(&self) -> u32 {
        // SAFETY: the MR is registered until Drop, and lkey is read-only after registration.
        unsafe { (*self.mr.as_ptr()).lkey }
    }

    pub fn rkey(&self) -> u32 {
        // SAFETY: as in lkey.
        unsafe { (*self.mr.as_ptr()).rkey }
    }

    /// The address the device knows the first byte by (the virtual address: iova = addr).
    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn protection_domain(&self) -> &Arc<ProtectionDomain> {
        &self.pd
    }

    fn check(&self, offset: usize, len: usize) -> Result<(), RdmaError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(RdmaError::OutOfRange { offset, len, size: self.len }),
        }
    }

    /// A scatter/gather entry for `len` bytes at `offset`, for a work request.
    pub fn sge(&self, offset: usize, len: usize) -> Result<Sge<'_>, RdmaError> {
        self.check(offset, len)?;
        let length = u32::try_from(len).map_err(|_| RdmaError::Invalid("a scatter/gather entry is at most 4 GiB"))?;
        Ok(Sge { raw: sys::ibv_sge { addr: self.addr() + offset as u64, length, lkey: self.lkey() }, _mr: PhantomData })
    }

    /// What the peer needs to RDMA READ or WRITE `len` bytes at `offset` (send it in a message).
    pub fn remote(&self, offset: usize, len: usize) -> Result<RemoteBuf, RdmaError> {
        self.check(offset, len)?;
        let len = u32::try_from(len).map_err(|_| RdmaError::Invalid("a remote buffer is at most 4 GiB"))?;
        Ok(RemoteBuf { addr: self.addr() + offset as u64, rkey: self.rkey(), len })
    }

    /// Copies the bytes at `offset` into `out`.
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), RdmaError> {
        self.check(offset, out.len())?;
        // SAFETY: the range is inside the registered memory (checked), which the region owns;
        // no reference to it exists (only raw copies), and `out` is a distinct Rust slice.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Copies `data` into the region at `offset`.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> Result<(), RdmaError> {
        self.check(offset, data.len())?;
        // SAFETY: in bounds (checked); &mut self excludes every other Rust access to the bytes
        // during the copy, and `data` cannot overlap memory the region owns exclusively.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(offset), data.len()) };
        Ok(())
    }

    /// Deregisters the region and gives the memory back. Should deregistration fail, the memory
    /// is leaked rather than returned, since the device could still reach it.
    pub fn into_inner(self) -> Result<M, RdmaError> {
        let mut this = ManuallyDrop::new(self);
        // SAFETY: the MR is registered and deregistered once: `this` is never dropped.
        let rc = unsafe { sys::ibv_dereg_mr(this.mr.as_ptr()) };
        // SAFETY: the Arc is read out once and `this` is never used or dropped again.
        let pd = unsafe { std::ptr::read(&this.pd) };
        drop(pd);
        if rc != 0 {
            return Err(RdmaError::os_code("ibv_dereg_mr", rc));
        }
        // SAFETY: after a successful ibv_dereg_mr the device no longer reaches the memory; the
        // value is taken once and `this` is never dropped.
        Ok(unsafe { ManuallyDrop::take(&mut this.mem) })
    }
}

impl<M: RdmaMemory> Drop for MemoryRegion<M> {
    fn drop(&mut self) {
        // SAFETY: the MR is registered (into_inner never lets Drop run) and deregistered once,
        // before the PD (self.pd is dropped after this body) can be deallocated.
        let rc = unsafe { sys::ibv_dereg_mr(self.mr.as_ptr()) };
        if rc == 0 {
            // SAFETY: deregistered, so the device no longer reaches the memory; dropped once.
            unsafe { ManuallyDrop::drop(&mut self.mem) };
        }
        // else: leak the memory, the device may still write it.
    }
}

impl<M: RdmaMemory> fmt::Debug for MemoryRegion<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MemoryRegion({} bytes at {:#x}, lkey {:#x}, rkey {:#x})", self.len, self.addr(), self.lkey(), self.rkey())
    }
}

/// A scatter/gather entry: bytes of a registered region, borrowed from it for as long as the
/// entry lives (so an inline send can read them when it is posted).
#[repr(transparent)]
#[derive(Clone, Copy)]
pub struct Sge<'a> {
    raw: sys::ibv_sge,
    _mr: PhantomData<&'a ()>,
}

impl Sge<'_> {
    pub(super) fn raw(&self) -> sys::ibv_sge {
        self.raw
    }
    pub fn addr(&self) -> u64 {
        self.raw.addr
    }
    pub fn len(&self) -> u32 {
        self.raw.length
    }
    pub fn is_empty(&self) -> bool {
        self.raw.length == 0
    }
    pub fn lkey(&self) -> u32 {
        self.raw.lkey
    }
}

impl fmt::Debug for Sge<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sge({} bytes at {:#x}, lkey {:#x})", self.raw.length, self.raw.addr, self.raw.lkey)
    }
}

/// A peer's registered buffer, as the peer advertised it: the target of an RDMA READ or WRITE.
/// The peer's device checks the rkey and bounds; a wrong one fails the work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteBuf {
    pub addr: u64,
    pub rkey: u32,
    pub len: u32,
}

impl RemoteBuf {
    /// Size of [`RemoteBuf::to_bytes`].
    pub const WIRE_LEN: usize = 16;

    /// Little-endian address, rkey and length, for a message to the peer.
    pub fn to_bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.rkey.to_le_bytes());
        b[12..].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    pub fn from_bytes(b: &[u8]) -> Option<RemoteBuf> {
        let b: &[u8; 16] = b.get(..16)?.try_into().ok()?;
        Some(RemoteBuf {
            addr: u64::from_le_bytes(b[..8].try_into().ok()?),
            rkey: u32::from_le_bytes(b[8..12].try_into().ok()?),
            len: u32::from_le_bytes(b[12..].try_into().ok()?),
        })
    }

    /// The part of this buffer from `offset` on, or None past its end.
    pub fn offset(&self, offset: u32) -> Option<RemoteBuf> {
        let len = self.len.checked_sub(offset)?;
        Some(RemoteBuf { addr: self.addr + u64::from(offset), rkey: self.rkey, len })
    }
}

/// A completion channel: one file descriptor that turns readable when an armed completion queue
/// gets a completion, so a polling reactor can park on it (epoll, poll) instead of spinning.
///
/// The parking protocol: poll the CQ; when empty, [`CompletionQueue::arm`], poll once more (a
/// completion that raced the arming is found here), and only then park on [`Self::fd`]. When it
/// turns readable, [`Self::take_events`] (which acknowledges) and poll again.
pub struct CompletionChannel {
    ch: NonNull<sys::ibv_comp_channel>,
    device: Device,
}

// SAFETY: ibv_get_cq_event and ibv_ack_cq_events may run on any thread.
unsafe impl Send for CompletionChannel {}
// SAFETY: as above.
unsafe impl Sync for CompletionChannel {}

/// Which completion queue an event or completion came from (compare with
/// [`CompletionQueue::handle`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CqHandle(usize);

impl CqHandle {
    pub(crate) fn from_raw(cq: usize) -> CqHandle {
        CqHandle(cq)
    }
}

impl CompletionChannel {
    /// A non-blocking completion channel on `device`.
    pub fn new(device: &Device) -> Result<Arc<CompletionChannel>, RdmaError> {
        // SAFETY: the context is open while `device` (and the clone kept below) lives.
        let ch = unsafe { sys::ibv_create_comp_channel(device.context()) };
        let ch = NonNull::new(ch).ok_or_else(|| os_error("ibv_create_comp_channel"))?;
        let this = Arc::new(CompletionChannel { ch, device: device.clone() });
        super::set_nonblocking(this.fd().as_raw_fd(), "fcntl(completion channel, O_NONBLOCK)")?;
        Ok(this)
    }

    /// Readable when an armed CQ of this channel has a completion event.
    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the channel's descriptor stays open until ibv_destroy_comp_channel in Drop,
        // which needs &mut self, so it outlives the borrow of self.
        unsafe { BorrowedFd::borrow_raw((*self.ch.as_ptr()).fd) }
    }

    /// Reads and acknowledges the pending events without waiting, calling `f` with each one's
    /// CQ; returns how many there were. Each such CQ is disarmed until armed again.
    pub fn take_events(&self, mut f: impl FnMut(CqHandle)) -> Result<usize, RdmaError> {
        let mut n = 0;
        loop {
            let mut cq: *mut sys::ibv_cq = std::ptr::null_mut();
            let mut ctx: *mut libc::c_void = std::ptr::null_mut();
            // SAFETY: the channel is live and both out-pointers are valid; the descriptor is
            // non-blocking, so this returns -1 with EAGAIN when nothing is pending.
            let rc = unsafe { sys::ibv_get_cq_event(self.ch.as_ptr(), &mut cq, &mut ctx) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                return match e.kind() {
                    std::io::ErrorKind::WouldBlock => Ok(n),
                    std::io::ErrorKind::Interrupted => continue,
                    _ => Err(RdmaError::Os { op: "ibv_get_cq_event", source: e }),
                };
            }
            // SAFETY: `cq` is the CQ this event is for, and it is still alive: ibv_destroy_cq
            // waits until every event it reported is acknowledged, which is this call.
            unsafe { sys::ibv_ack_cq_events(cq, 1) };
            n += 1;
            f(CqHandle(cq as usize));
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }
}

impl Drop for CompletionChannel {
    fn drop(&mut self) {
        // SAFETY: every CQ using this channel holds an Arc of it, so none is left; destroyed once.
        unsafe { sys::ibv_destroy_comp_channel(self.ch.as_ptr()) };
    }
}

impl fmt::Debug for CompletionChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CompletionChannel({}, fd {})", self.device.name, self.fd().as_raw_fd())
    }
}

/// A completion queue, polled by its reactor into a caller-owned array.
pub struct CompletionQueue {
    cq: NonNull<sys::ibv_cq>,
    device: Device,
    _channel: Option<Arc<CompletionChannel>>,
}

// SAFETY: ibv_poll_cq, ibv_req_notify_cq and ibv_destroy_cq are thread-safe (providers lock).
unsafe impl Send for CompletionQueue {}
// SAFETY: as above.
unsafe impl Sync for CompletionQueue {}

impl CompletionQueue {
    /// A CQ of at least `depth` entries on `device`, reporting to `channel` when armed.
    pub fn new(device: &Device, depth: u32, channel: Option<&Arc<CompletionChannel>>) -> Result<Arc<CompletionQueue>, RdmaError> {
        if let Some(ch) = channel {
            if ch.device.ctx != device.ctx {
                return Err(RdmaError::Invalid("the completion channel belongs to another device"));
            }
        }
        let depth = libc::c_int::try_from(depth.max(1)).map_err(|_| RdmaError::Invalid("CQ depth too large"))?;
        let ch = channel.map_or(std::ptr::null_mut(), |c| c.ch.as_ptr());
        // SAFETY: the context is open (device lives) and `ch`, when not NULL, is a live channel
        // of the same context that the CQ keeps alive through its Arc.
        let cq = unsafe { sys::ibv_create_cq(device.context(), depth, std::ptr::null_mut(), ch, 0) };
        let cq = NonNull::new(cq).ok_or_else(|| os_error("ibv_create_cq"))?;
        Ok(Arc::new(CompletionQueue { cq, device: device.clone(), _channel: channel.cloned() }))
    }

    /// Moves up to `out.len()` completions into `out`, without waiting; returns how many.
    pub fn poll(&self, out: &mut [WorkCompletion]) -> Result<usize, RdmaError> {
        let n = libc::c_int::try_from(out.len()).unwrap_or(libc::c_int::MAX);
        // SAFETY: the CQ is live and `out` is valid for `n` ibv_wc (WorkCompletion is
        // repr(transparent) over ibv_wc), which is all ibv_poll_cq writes.
        let rc = unsafe { sys::ibv_poll_cq(self.cq.as_ptr(), n, out.as_mut_ptr().cast()) };
        if rc < 0 {
            // ibv_poll_cq reports a failure as a negative count, without an errno.
            return Err(RdmaError::Os { op: "ibv_poll_cq", source: std::io::Error::other(format!("returned {rc}")) });
        }
        Ok(rc as usize)
    }

    /// Asks for one event on the channel at the next completion (all of them, or only
    /// solicited ones). Poll again after arming: a completion may have arrived in between.
    pub fn arm(&self, solicited_only: bool) -> Result<(), RdmaError> {
        // SAFETY: the CQ is live.
        let rc = unsafe { sys::ibv_req_notify_cq(self.cq.as_ptr(), i32::from(solicited_only)) };
        if rc != 0 {
            return Err(RdmaError::os_code("ibv_req_notify_cq", rc));
        }
        Ok(())
    }

    pub fn handle(&self) -> CqHandle {
        CqHandle(self.cq.as_ptr() as usize)
    }

    /// Entries the CQ really has (at least the depth asked for).
    pub fn capacity(&self) -> u32 {
        // SAFETY: the CQ is live; cqe is fixed after creation (we never resize).
        unsafe { (*self.cq.as_ptr()).cqe.max(0) as u32 }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub(crate) fn raw(&self) -> *mut sys::ibv_cq {
        self.cq.as_ptr()
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: every QP using this CQ holds an Arc of it, so none is left; destroyed once,
        // before the channel (dropped after this body); its events were all acknowledged.
        unsafe { sys::ibv_destroy_cq(self.cq.as_ptr()) };
    }
}

impl fmt::Debug for CompletionQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CompletionQueue({}, {} entries)", self.device.name, self.capacity())
    }
}

/// One work completion, exactly as the device wrote it (repr(transparent) over ibv_wc).
#[repr(transparent)]
pub struct WorkCompletion {
    raw: sys::ibv_wc,
}

/// What a completion completed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WcOpcode {
    Send,
    RdmaWrite,
    RdmaRead,
    Recv,
    /// A RECV consumed by the peer's RDMA WRITE with immediate.
    RecvRdmaWithImm,
    Other(u32),
}

impl Default for WorkCompletion {
    fn default() -> WorkCompletion {
        // SAFETY: ibv_wc is plain data (integers and a union of integers); all-zero is valid.
        WorkCompletion { raw: unsafe { std::mem::zeroed() } }
    }
}

impl WorkCompletion {
    pub fn wr_id(&self) -> u64 {
        self.raw.wr_id
    }

    /// The raw ibv_wc_status (0: success).
    pub fn status_code(&self) -> u32 {
        self.raw.status
    }

    pub fn is_ok(&self) -> bool {
        self.raw.status == sys::ibv_wc_status::IBV_WC_SUCCESS
    }

    /// The failure, if any: a transport or protection error, or a flush after an earlier one.
    pub fn error(&self) -> Option<WcError> {
        (!self.is_ok()).then_some(WcError { status: self.raw.status, vendor_err: self.raw.vendor_err })
    }

    /// Valid only for successful completions (a failed one's opcode is undefined).
    pub fn opcode(&self) -> WcOpcode {
        use sys::ibv_wc_opcode as o;
        match self.raw.opcode {
            o::IBV_WC_SEND => WcOpcode::Send,
            o::IBV_WC_RDMA_WRITE => WcOpcode::RdmaWrite,
            o::IBV_WC_RDMA_READ => WcOpcode::RdmaRead,
            o::IBV_WC_RECV => WcOpcode::Recv,
            o::IBV_WC_RECV_RDMA_WITH_IMM => WcOpcode::RecvRdmaWithImm,
            other => WcOpcode::Other(other),
        }
    }

    /// Bytes received (for RECV completions).
    pub fn byte_len(&self) -> u32 {
        self.raw.byte_len
    }

    /// The immediate data of a SEND or RDMA WRITE with immediate, in host order.
    pub fn imm_data(&self) -> Option<u32> {
        let with_imm = self.raw.wc_flags & sys::ibv_wc_flags::IBV_WC_WITH_IMM.0 != 0;
        // SAFETY: with IBV_WC_WITH_IMM set the union holds imm_data; both members are u32.
        with_imm.then(|| u32::from_be(unsafe { self.raw.imm_data_invalidated_rkey_union.imm_data }))
    }

    /// The local QP number this completion belongs to.
    pub fn qp_num(&self) -> u32 {
        self.raw.qp_num
    }
}

impl fmt::Debug for WorkCompletion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.error() {
            None => {
                write!(f, "WorkCompletion(wr {}, {:?}, {} bytes, imm {:?})", self.wr_id(), self.opcode(), self.byte_len(), self.imm_data())
            }
            Some(e) => write!(f, "WorkCompletion(wr {}, {e})", self.wr_id()),
        }
    }
}

/// A failed work completion's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WcError {
    pub status: u32,
    pub vendor_err: u32,
}

impl WcError {
    /// The remote side refused the access (a wrong rkey, or a range outside its region).
    pub fn is_remote_access(&self) -> bool {
        self.status == sys::ibv_wc_status::IBV_WC_REM_ACCESS_ERR
    }

    /// The request was flushed because the queue pair had already failed.
    pub fn is_flush(&self) -> bool {
        self.status == sys::ibv_wc_status::IBV_WC_WR_FLUSH_ERR
    }
}

impl fmt::Display for WcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // SAFETY: ibv_wc_status_str returns a static NUL-terminated string for any value.
        let s = unsafe { CStr::from_ptr(sys::ibv_wc_status_str(self.status)) };
        write!(f, "work request failed: {} (status {}, vendor error {:#x})", s.to_string_lossy(), self.status, self.vendor_err)
    }
}

impl std::error::Error for WcError {}
