//! The RDMA connection manager (librdmacm): a non-blocking event channel, rdma_cm ids, RC queue
//! pairs and the work requests posted on them.

use super::verbs::{CompletionQueue, Device, ProtectionDomain};
use super::zerocopy::HeldBuffers;
use super::{os_error, RdmaError};
use rdma_sys as sys;
use std::ffi::CStr;
use std::fmt;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;

/// The channel every rdma_cm event of its ids arrives on; its descriptor is non-blocking, for a
/// reactor to poll next to its sockets.
pub struct EventChannel {
    ch: NonNull<sys::rdma_event_channel>,
}

// SAFETY: rdma_get_cm_event and rdma_ack_cm_event may be called from any thread.
unsafe impl Send for EventChannel {}
// SAFETY: as above; librdmacm locks its id table internally.
unsafe impl Sync for EventChannel {}

/// Which rdma_cm id an event is about (compare with [`CmId::handle`]). Unique among live ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CmHandle(usize);

/// The kind of an rdma_cm event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CmEventKind {
    AddrResolved,
    AddrError,
    RouteResolved,
    RouteError,
    /// A peer asks to connect; the event carries the new id in [`CmEvent::request`].
    ConnectRequest,
    ConnectResponse,
    ConnectError,
    Unreachable,
    Rejected,
    Established,
    Disconnected,
    DeviceRemoval,
    TimewaitExit,
    AddrChange,
    Other(u32),
}

/// One rdma_cm event, copied out and already acknowledged.
#[derive(Debug)]
pub struct CmEvent {
    pub kind: CmEventKind,
    /// The id the event is about (for a connect request: the new id, also in `request`).
    pub id: CmHandle,
    /// For a connect request: the listening id it arrived on.
    pub listener: Option<CmHandle>,
    /// For a connect request: the new id, to accept (after `create_qp`) or reject or drop.
    pub request: Option<CmId>,
    /// The event's status (a negative errno, or the peer's reject reason).
    pub status: i32,
    /// Private data of a connect request, accept or reject. Over some transports it arrives
    /// padded with zeroes to the maximum length, so a protocol must carry its own length.
    pub private_data: Vec<u8>,
    /// For a connect request: RDMA READs the peer may have outstanding at us.
    pub initiator_depth: u8,
    /// For a connect request: RDMA READs the peer can answer for us.
    pub responder_resources: u8,
}

impl EventChannel {
    /// A non-blocking event channel. Fails with [`RdmaError::NoDevice`] when the machine has no
    /// RDMA device (no rdma_cm char device, or no device behind it).
    pub fn new() -> Result<Arc<EventChannel>, RdmaError> {
        // SAFETY: no arguments; the result is checked for NULL.
        let ch = unsafe { sys::rdma_create_event_channel() };
        let Some(ch) = NonNull::new(ch) else {
            let e = os_error("rdma_create_event_channel");
            return Err(match Device::list() {
                Err(RdmaError::NoDevice) => RdmaError::NoDevice,
                _ => e,
            });
        };
        let this = Arc::new(EventChannel { ch });
        super::set_nonblocking(this.fd().as_raw_fd(), "fcntl(rdma_cm event channel, O_NONBLOCK)")?;
        Ok(this)
    }

    /// Readable when an event is pending.
    pub fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the descriptor stays open until rdma_destroy_event_channel in Drop, which
        // cannot run while self is borrowed.
        unsafe { BorrowedFd::borrow_raw((*self.ch.as_ptr()).fd) }
    }

    /// The next event, without waiting (`Ok(None)` when none is pending).
    pub fn get_event(self: &Arc<Self>) -> Result<Option<CmEvent>, RdmaError> {
        let mut ev: *mut sys::rdma_cm_event = std::ptr::null_mut();
        loop {
            // SAFETY: the channel is live and `ev` is a valid out-pointer; the descriptor is
            // non-blocking, so this fails with EAGAIN instead of waiting.
            let rc = unsafe { sys::rdma_get_cm_event(self.ch.as_ptr(), &mut ev) };
            if rc == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            match e.kind() {
                std::io::ErrorKind::WouldBlock => return Ok(None),
                std::io::ErrorKind::Interrupted => continue,
                _ => return Err(RdmaError::Os { op: "rdma_get_cm_event", source: e }),
            }
        }
        // SAFETY: rdma_get_cm_event succeeded, so `ev` points to an event valid until acked.
        let e = unsafe { &*ev };
        let kind = kind_of(e.event);
        let (mut private_data, mut initiator_depth, mut responder_resources) = (Vec::new(), 0, 0);
        if matches!(kind, CmEventKind::ConnectRequest | CmEventKind::Established | CmEventKind::Rejected | CmEventKind::ConnectResponse) {
            // SAFETY: for these events on a connected (RC) port space the union holds `conn`.
            let conn = unsafe { &e.param.conn };
            if !conn.private_data.is_null() && conn.private_data_len > 0 {
                // SAFETY: librdmacm points private_data at private_data_len bytes inside the
                // event, valid until the event is acknowledged below.
                private_data = unsafe { std::slice::from_raw_parts(conn.private_data.cast::<u8>(), conn.private_data_len.into()) }.to_vec();
            }
            initiator_depth = conn.initiator_depth;
            responder_resources = conn.responder_resources;
        }
        let id = CmHandle(e.id as usize);
        let status = e.status;
        let (listener, request) = match (kind, NonNull::new(e.id)) {
            (CmEventKind::ConnectRequest, Some(new)) => {
                // The new id is ours to accept, reject or destroy; it reports on this channel.
                (Some(CmHandle(e.listen_id as usize)), Some(CmId { id: new, qp: None, _channel: self.clone() }))
            }
            _ => (None, None),
        };
        // SAFETY: the event came from rdma_get_cm_event and is acknowledged once; nothing read
        // from it is used after this (the private data was copied).
        unsafe { sys::rdma_ack_cm_event(ev) };
        Ok(Some(CmEvent { kind, id, listener, request, status, private_data, initiator_depth, responder_resources }))
    }

    /// Waits up to `timeout` for the next event (for tools and tests; a reactor polls
    /// [`Self::fd`] instead).
    pub fn wait_event(self: &Arc<Self>, timeout: Duration) -> Result<Option<CmEvent>, RdmaError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(ev) = self.get_event()? {
                return Ok(Some(ev));
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut ready = [false];
            crate::wait_readable(&[self.fd()], left, &mut ready)
                .map_err(|source| RdmaError::Os { op: "poll(rdma_cm event channel)", source })?;
        }
    }
}

impl Drop for EventChannel {
    fn drop(&mut self) {
        // SAFETY: every id on this channel holds an Arc of it, so none is left; destroyed once.
        unsafe { sys::rdma_destroy_event_channel(self.ch.as_ptr()) }
    }
}

impl fmt::Debug for EventChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventChannel(fd {})", self.fd().as_raw_fd())
    }
}

fn kind_of(t: sys::rdma_cm_event_type::Type) -> CmEventKind {
    use sys::rdma_cm_event_type as t;
    match t {
        t::RDMA_CM_EVENT_ADDR_RESOLVED => CmEventKind::AddrResolved,
        t::RDMA_CM_EVENT_ADDR_ERROR => CmEventKind::AddrError,
        t::RDMA_CM_EVENT_ROUTE_RESOLVED => CmEventKind::RouteResolved,
        t::RDMA_CM_EVENT_ROUTE_ERROR => CmEventKind::RouteError,
        t::RDMA_CM_EVENT_CONNECT_REQUEST => CmEventKind::ConnectRequest,
        t::RDMA_CM_EVENT_CONNECT_RESPONSE => CmEventKind::ConnectResponse,
        t::RDMA_CM_EVENT_CONNECT_ERROR => CmEventKind::ConnectError,
        t::RDMA_CM_EVENT_UNREACHABLE => CmEventKind::Unreachable,
        t::RDMA_CM_EVENT_REJECTED => CmEventKind::Rejected,
        t::RDMA_CM_EVENT_ESTABLISHED => CmEventKind::Established,
        t::RDMA_CM_EVENT_DISCONNECTED => CmEventKind::Disconnected,
        t::RDMA_CM_EVENT_DEVICE_REMOVAL => CmEventKind::DeviceRemoval,
        t::RDMA_CM_EVENT_TIMEWAIT_EXIT => CmEventKind::TimewaitExit,
        t::RDMA_CM_EVENT_ADDR_CHANGE => CmEventKind::AddrChange,
        other => CmEventKind::Other(other),
    }
}

/// Sizes of a queue pair's queues.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpCaps {
    pub max_send_wr: u32,
    pub max_recv_wr: u32,
    pub max_send_sge: u32,
    pub max_recv_sge: u32,
    /// Bytes a SendFlags::INLINE request may carry (copied at post time, no lkey needed).
    pub max_inline_data: u32,
}

impl Default for QpCaps {
    fn default() -> QpCaps {
        QpCaps { max_send_wr: 128, max_recv_wr: 128, max_send_sge: 4, max_recv_sge: 4, max_inline_data: 64 }
    }
}

/// Parameters of rdma_connect and rdma_accept.
#[derive(Debug, Clone, Copy)]
pub struct ConnParam<'a> {
    /// At most 56 bytes for a connect, 196 for an accept.
    pub private_data: &'a [u8],
    /// RDMA READs the peer may have outstanding at us (255: as many as the device allows).
    pub responder_resources: u8,
    /// RDMA READs we may have outstanding at the peer (255: as many as the device allows).
    pub initiator_depth: u8,
    /// Transport retries before a send fails (0-7).
    pub retry_count: u8,
    /// Retries when the peer has no receive posted (7: forever).
    pub rnr_retry_count: u8,
}

impl Default for ConnParam<'_> {
    fn default() -> Self {
        ConnParam { private_data: &[], responder_resources: 255, initiator_depth: 255, retry_count: 7, rnr_retry_count: 7 }
    }
}

impl ConnParam<'_> {
    fn raw(&self) -> Result<sys::rdma_conn_param, RdmaError> {
        let len = u8::try_from(self.private_data.len()).map_err(|_| RdmaError::Invalid("private data is at most 196 bytes"))?;
        Ok(sys::rdma_conn_param {
            private_data: if len == 0 { std::ptr::null() } else { self.private_data.as_ptr().cast() },
            private_data_len: len,
            responder_resources: self.responder_resources,
            initiator_depth: self.initiator_depth,
            flow_control: 1,
            retry_count: self.retry_count.min(7),
            rnr_retry_count: self.rnr_retry_count.min(7),
            srq: 0,
            qp_num: 0,
        })
    }
}

// rdma_cma.h's option levels and names (anonymous enums, so not in the bindings).
const RDMA_OPTION_ID: libc::c_int = 0;
const RDMA_OPTION_ID_TOS: libc::c_int = 0;
const RDMA_OPTION_ID_REUSEADDR: libc::c_int = 1;

/// The resources a queue pair uses, kept alive until it is destroyed.
struct QpParts {
    qp: NonNull<sys::ibv_qp>,
    /// Buffers of zero-copy requests dropped before completing, released once the QP is destroyed.
    held: Arc<HeldBuffers>,
    pd: Arc<ProtectionDomain>,
    _send_cq: Arc<CompletionQueue>,
    _recv_cq: Arc<CompletionQueue>,
}

/// An rdma_cm id: a listener, or one side of a connection with its RC queue pair.
pub struct CmId {
    id: NonNull<sys::rdma_cm_id>,
    qp: Option<QpParts>,
    _channel: Arc<EventChannel>,
}

// SAFETY: librdmacm's calls on an id, and the verbs on its QP, may come from any thread; the id
// is used by one owner at a time (CmId is not Sync).
unsafe impl Send for CmId {}

impl CmId {
    /// A new id for reliable connections (RDMA_PS_TCP), reporting on `channel`.
    pub fn new(channel: &Arc<EventChannel>) -> Result<CmId, RdmaError> {
        let mut id: *mut sys::rdma_cm_id = std::ptr::null_mut();
        // SAFETY: the channel is live and kept alive by the id's Arc; `id` is a valid out-pointer.
        let rc = unsafe { sys::rdma_create_id(channel.ch.as_ptr(), &mut id, std::ptr::null_mut(), sys::rdma_port_space::RDMA_PS_TCP) };
        if rc != 0 {
            return Err(os_error("rdma_create_id"));
        }
        let id = NonNull::new(id).ok_or(RdmaError::Invalid("rdma_create_id returned no id"))?;
        Ok(CmId { id, qp: None, _channel: channel.clone() })
    }

    pub fn handle(&self) -> CmHandle {
        CmHandle(self.id.as_ptr() as usize)
    }

    /// Lets a listener bind an address whose earlier connections are still in time-wait (as
    /// SO_REUSEADDR), so a restarted target can listen at once. Call before `listen`.
    pub fn set_reuse_addr(&self, on: bool) -> Result<(), RdmaError> {
        let mut v: libc::c_int = on.into();
        self.set_option(RDMA_OPTION_ID_REUSEADDR, (&mut v as *mut libc::c_int).cast(), std::mem::size_of::<libc::c_int>())
    }

    /// The IP type of service (DSCP and ECN bits) of this id's traffic. Call before connecting.
    pub fn set_tos(&self, tos: u8) -> Result<(), RdmaError> {
        let mut v = tos;
        self.set_option(RDMA_OPTION_ID_TOS, (&mut v as *mut u8).cast(), 1)
    }

    fn set_option(&self, name: libc::c_int, val: *mut libc::c_void, len: usize) -> Result<(), RdmaError> {
        // SAFETY: the id is live and `val` points to `len` readable bytes of the type the option
        // takes (the callers pass an int for REUSEADDR and a u8 for TOS), valid during the call.
        if unsafe { sys::rdma_set_option(self.id.as_ptr(), RDMA_OPTION_ID, name, val, len) } != 0 {
            return Err(os_error("rdma_set_option"));
        }
        Ok(())
    }

    /// Tells the connection manager that a message arrived on the queue pair before Established
    /// was seen (on AsyncEventKind::CommEst), so the connection is completed now.
    pub fn notify_comm_est(&self) -> Result<(), RdmaError> {
        // SAFETY: the id is live; IBV_EVENT_COMM_EST is a valid event type.
        if unsafe { sys::rdma_notify(self.id.as_ptr(), sys::ibv_event_type::IBV_EVENT_COMM_EST) } != 0 {
            return Err(os_error("rdma_notify"));
        }
        Ok(())
    }

    /// Moves this id to `channel`: its events from now on, and those not yet taken, are
    /// reported there (a connection accepted by one reactor and served by another).
    pub fn migrate(&mut self, channel: &Arc<EventChannel>) -> Result<(), RdmaError> {
        // SAFETY: the id and both channels are live (the id holds its current channel; `channel`
        // is borrowed); every event taken from the old channel was acknowledged when taken, as
        // rdma_migrate_id requires.
        if unsafe { sys::rdma_migrate_id(self.id.as_ptr(), channel.ch.as_ptr()) } != 0 {
            return Err(os_error("rdma_migrate_id"));
        }
        self._channel = channel.clone();
        Ok(())
    }

    /// Binds to `addr` (port 0: any free port) and listens; connect requests arrive as events.
    pub fn listen(&self, addr: SocketAddr, backlog: i32) -> Result<(), RdmaError> {
        let (mut sa, _) = sockaddr_of(&addr);
        // SAFETY: the id is live and `sa` is a valid sockaddr of the address's family.
        if unsafe { sys::rdma_bind_addr(self.id.as_ptr(), (&mut sa as *mut libc::sockaddr_storage).cast()) } != 0 {
            return Err(bind_error("rdma_bind_addr", addr));
        }
        // SAFETY: the id is live and bound.
        if unsafe { sys::rdma_listen(self.id.as_ptr(), backlog) } != 0 {
            return Err(os_error("rdma_listen"));
        }
        Ok(())
    }

    /// Starts resolving `dst` to a device and port; completes with AddrResolved or AddrError.
    pub fn resolve_addr(&self, src: Option<SocketAddr>, dst: SocketAddr, timeout: Duration) -> Result<(), RdmaError> {
        let mut s = src.map(|a| sockaddr_of(&a).0);
        let (mut d, _) = sockaddr_of(&dst);
        let sp = s.as_mut().map_or(std::ptr::null_mut(), |s| (s as *mut libc::sockaddr_storage).cast());
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: the id is live; both addresses are valid sockaddrs (or NULL for the source)
        // that librdmacm copies before returning.
        if unsafe { sys::rdma_resolve_addr(self.id.as_ptr(), sp, (&mut d as *mut libc::sockaddr_storage).cast(), ms) } != 0 {
            return Err(bind_error("rdma_resolve_addr", dst));
        }
        Ok(())
    }

    /// After AddrResolved: starts resolving the route; completes with RouteResolved or RouteError.
    pub fn resolve_route(&self, timeout: Duration) -> Result<(), RdmaError> {
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: the id is live.
        if unsafe { sys::rdma_resolve_route(self.id.as_ptr(), ms) } != 0 {
            return Err(os_error("rdma_resolve_route"));
        }
        Ok(())
    }

    /// Whether this id is bound to `device` (after address resolution, or for a connect
    /// request): its queue pair must then come from a protection domain of that device.
    pub fn is_on(&self, device: &Device) -> bool {
        // SAFETY: the id is live; `verbs` is set by librdmacm once the id is bound to a device.
        unsafe { (*self.id.as_ptr()).verbs == device.context() }
    }

    /// The device among `devices` this id is bound to.
    pub fn device_in<'d>(&self, devices: &'d [Device]) -> Option<&'d Device> {
        devices.iter().find(|d| self.is_on(d))
    }

    /// Creates this id's RC queue pair on `pd` (which must be of this id's device), sending
    /// completions to `send_cq` and `recv_cq`. Every request is signaled only if it asks to be.
    pub fn create_qp(
        &mut self,
        pd: &Arc<ProtectionDomain>,
        send_cq: &Arc<CompletionQueue>,
        recv_cq: &Arc<CompletionQueue>,
        caps: QpCaps,
    ) -> Result<(), RdmaError> {
        if self.qp.is_some() {
            return Err(RdmaError::Invalid("this rdma_cm id already has a queue pair"));
        }
        if !self.is_on(pd.device()) || !self.is_on(send_cq.device()) || !self.is_on(recv_cq.device()) {
            return Err(RdmaError::WrongDevice { device: pd.device().name().to_string() });
        }
        // SAFETY: ibv_qp_init_attr is plain data; all-zero is valid (no SRQ, no context).
        let mut attr: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        attr.send_cq = send_cq.raw();
        attr.recv_cq = recv_cq.raw();
        attr.cap = sys::ibv_qp_cap {
            max_send_wr: caps.max_send_wr,
            max_recv_wr: caps.max_recv_wr,
            max_send_sge: caps.max_send_sge,
            max_recv_sge: caps.max_recv_sge,
            max_inline_data: caps.max_inline_data,
        };
        attr.qp_type = sys::ibv_qp_type::IBV_QPT_RC;
        attr.sq_sig_all = 0;
        // SAFETY: the id is live and on the same device as the PD and both CQs (checked), which
        // the QpParts below keep alive until rdma_destroy_qp; `attr` is valid for the call.
        if unsafe { sys::rdma_create_qp(self.id.as_ptr(), pd.raw(), &mut attr) } != 0 {
            return Err(os_error("rdma_create_qp"));
        }
        // SAFETY: rdma_create_qp succeeded, so id->qp is the new QP.
        let qp = NonNull::new(unsafe { (*self.id.as_ptr()).qp }).ok_or(RdmaError::Invalid("rdma_create_qp left no QP"))?;
        self.qp = Some(QpParts { qp, held: Arc::default(), pd: pd.clone(), _send_cq: send_cq.clone(), _recv_cq: recv_cq.clone() });
        Ok(())
    }

    /// The local queue pair number, once created.
    pub fn qp_num(&self) -> Option<u32> {
        // SAFETY: the QP is live while self.qp holds it.
        self.qp.as_ref().map(|q| unsafe { (*q.qp.as_ptr()).qp_num })
    }

    /// Connects (after RouteResolved and create_qp); completes with Established, or Rejected,
    /// Unreachable or ConnectError.
    pub fn connect(&self, param: &ConnParam<'_>) -> Result<(), RdmaError> {
        let mut p = param.raw()?;
        // SAFETY: the id is live; `p` and the private data it points to outlive the call, which
        // copies them.
        if unsafe { sys::rdma_connect(self.id.as_ptr(), &mut p) } != 0 {
            return Err(os_error("rdma_connect"));
        }
        Ok(())
    }

    /// Accepts a connect request (after create_qp); completes with Established.
    pub fn accept(&self, param: &ConnParam<'_>) -> Result<(), RdmaError> {
        let mut p = param.raw()?;
        // SAFETY: as in connect.
        if unsafe { sys::rdma_accept(self.id.as_ptr(), &mut p) } != 0 {
            return Err(os_error("rdma_accept"));
        }
        Ok(())
    }

    /// Refuses a connect request, telling the peer `private_data` (at most 148 bytes).
    pub fn reject(&self, private_data: &[u8]) -> Result<(), RdmaError> {
        let len = u8::try_from(private_data.len()).map_err(|_| RdmaError::Invalid("reject private data too long"))?;
        // SAFETY: the id is live and `private_data` is valid for `len` bytes during the call.
        if unsafe { sys::rdma_reject(self.id.as_ptr(), private_data.as_ptr().cast(), len) } != 0 {
            return Err(os_error("rdma_reject"));
        }
        Ok(())
    }

    /// Disconnects; both sides then get Disconnected, and outstanding requests are flushed.
    pub fn disconnect(&self) -> Result<(), RdmaError> {
        // SAFETY: the id is live.
        if unsafe { sys::rdma_disconnect(self.id.as_ptr()) } != 0 {
            return Err(os_error("rdma_disconnect"));
        }
        Ok(())
    }

    /// The local address (a listener bound to port 0 learns its port here).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        // SAFETY: the id is live; route.addr's storage is plain data written by librdmacm.
        socket_addr_of(unsafe { &(*self.id.as_ptr()).route.addr.src_addr_union.src_storage })
    }

    pub fn peer_addr(&self) -> Option<SocketAddr> {
        // SAFETY: as in local_addr.
        socket_addr_of(unsafe { &(*self.id.as_ptr()).route.addr.dst_addr_union.dst_storage })
    }

    pub(super) fn qp(&self) -> Result<*mut sys::ibv_qp, RdmaError> {
        self.qp.as_ref().map(|q| q.qp.as_ptr()).ok_or(RdmaError::NoQp)
    }

    /// The QP, its PD and where it keeps the buffers of reads dropped in flight.
    pub(super) fn qp_for_reads(&self) -> Result<(*mut sys::ibv_qp, &Arc<ProtectionDomain>, &Arc<HeldBuffers>), RdmaError> {
        self.qp.as_ref().map(|q| (q.qp.as_ptr(), &q.pd, &q.held)).ok_or(RdmaError::NoQp)
    }
}

impl Drop for CmId {
    fn drop(&mut self) {
        if let Some(q) = &self.qp {
            // What rdma_destroy_qp does (this id's CQs are the caller's, so it has none of its
            // own to destroy), keeping the result, which rdma_destroy_qp drops.
            // SAFETY: the QP was made by rdma_create_qp on this id and is destroyed once, before
            // its PD and CQs (held in self.qp, dropped after this body); id->qp is cleared so
            // that rdma_destroy_id does not see it again.
            let rc = unsafe { sys::ibv_destroy_qp(q.qp.as_ptr()) };
            if rc == 0 {
                // SAFETY: the id is live; its qp field is plain data librdmacm reads.
                unsafe { (*self.id.as_ptr()).qp = std::ptr::null_mut() };
                // The device no longer reaches the buffers of requests that never completed.
                q.held.release();
            } else {
                q.held.leak();
            }
        }
        // SAFETY: the id is live and destroyed once, after its QP; every event about it was
        // acknowledged in get_event, so this does not wait; the channel outlives it (its Arc is
        // dropped after this body).
        unsafe { sys::rdma_destroy_id(self.id.as_ptr()) };
    }
}

impl fmt::Debug for CmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CmId")
            .field("handle", &self.handle())
            .field("qp_num", &self.qp_num())
            .field("local", &self.local_addr())
            .field("peer", &self.peer_addr())
            .finish()
    }
}

fn bind_error(op: &'static str, addr: SocketAddr) -> RdmaError {
    let source = std::io::Error::last_os_error();
    match source.raw_os_error() {
        Some(libc::ENODEV) | Some(libc::EADDRNOTAVAIL) => RdmaError::NoDeviceFor { op, addr, source },
        _ => RdmaError::Os { op, source },
    }
}

/// A socket address as a sockaddr_storage, and its length.
pub(crate) fn sockaddr_of(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid (AF_UNSPEC) value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
            unsafe { std::ptr::write((&mut ss as *mut libc::sockaddr_storage).cast(), sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

/// The socket address in `ss`, if it holds an IPv4 or IPv6 one.
pub(crate) fn socket_addr_of(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match i32::from(ss.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in, which it is aligned for.
            let sin = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(sin.sin_addr.s_addr.to_ne_bytes().into(), u16::from_be(sin.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: as above, for sockaddr_in6.
            let s = unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(s.sin6_addr.s6_addr.into(), u16::from_be(s.sin6_port), s.sin6_flowinfo, s.sin6_scope_id)))
        }
        _ => None,
    }
}

/// librdmacm's name of an event kind, for logs.
pub fn event_name(kind: CmEventKind) -> String {
    use sys::rdma_cm_event_type as t;
    let raw = match kind {
        CmEventKind::AddrResolved => t::RDMA_CM_EVENT_ADDR_RESOLVED,
        CmEventKind::AddrError => t::RDMA_CM_EVENT_ADDR_ERROR,
        CmEventKind::RouteResolved => t::RDMA_CM_EVENT_ROUTE_RESOLVED,
        CmEventKind::RouteError => t::RDMA_CM_EVENT_ROUTE_ERROR,
        CmEventKind::ConnectRequest => t::RDMA_CM_EVENT_CONNECT_REQUEST,
        CmEventKind::ConnectResponse => t::RDMA_CM_EVENT_CONNECT_RESPONSE,
        CmEventKind::ConnectError => t::RDMA_CM_EVENT_CONNECT_ERROR,
        CmEventKind::Unreachable => t::RDMA_CM_EVENT_UNREACHABLE,
        CmEventKind::Rejected => t::RDMA_CM_EVENT_REJECTED,
        CmEventKind::Established => t::RDMA_CM_EVENT_ESTABLISHED,
        CmEventKind::Disconnected => t::RDMA_CM_EVENT_DISCONNECTED,
        CmEventKind::DeviceRemoval => t::RDMA_CM_EVENT_DEVICE_REMOVAL,
        CmEventKind::TimewaitExit => t::RDMA_CM_EVENT_TIMEWAIT_EXIT,
        CmEventKind::AddrChange => t::RDMA_CM_EVENT_ADDR_CHANGE,
        CmEventKind::Other(x) => x,
    };
    // SAFETY: rdma_event_str returns a static NUL-terminated string for any value.
    unsafe { CStr::from_ptr(sys::rdma_event_str(raw)) }.to_string_lossy().into_owned()
}
