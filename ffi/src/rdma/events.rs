//! A device's asynchronous events (ibv_get_async_event): a port going down, a queue pair that
//! failed outside any work request, the first message on a connection the passive side has not
//! seen established yet. Read without blocking from the device's async descriptor.

use super::verbs::{CqHandle, Device};
use super::RdmaError;
use rdma_sys as sys;
use std::os::fd::BorrowedFd;

/// struct ibv_async_event with the event type as a plain integer, so that a type this build does
/// not know (a newer kernel's) is a value, not an invalid Rust enum.
#[repr(C)]
struct RawAsyncEvent {
    /// union { cq, qp, srq, wq pointers; int port_num }
    element: u64,
    event_type: u32,
}

const _: () = assert!(std::mem::size_of::<RawAsyncEvent>() == std::mem::size_of::<sys::ibv_async_event>());

/// What an asynchronous event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsyncEventKind {
    CqErr,
    QpFatal,
    QpReqErr,
    QpAccessErr,
    /// A message arrived on a queue pair before the passive side saw Established.
    CommEst,
    SqDrained,
    PathMig,
    PathMigErr,
    DeviceFatal,
    PortActive,
    PortErr,
    LidChange,
    PkeyChange,
    SmChange,
    SrqErr,
    SrqLimitReached,
    QpLastWqeReached,
    ClientReregister,
    GidChange,
    WqFatal,
    Other(u32),
}

/// One asynchronous event, already acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncEvent {
    pub kind: AsyncEventKind,
    /// For queue-pair events: the QP's number.
    pub qp_num: Option<u32>,
    /// For completion-queue events: the CQ.
    pub cq: Option<CqHandle>,
    /// For port events: the port number.
    pub port: Option<u32>,
}

fn kind_of(t: u32) -> AsyncEventKind {
    use sys::ibv_event_type as e;
    use AsyncEventKind as k;
    const KINDS: [(sys::ibv_event_type, AsyncEventKind); 20] = [
        (e::IBV_EVENT_CQ_ERR, k::CqErr),
        (e::IBV_EVENT_QP_FATAL, k::QpFatal),
        (e::IBV_EVENT_QP_REQ_ERR, k::QpReqErr),
        (e::IBV_EVENT_QP_ACCESS_ERR, k::QpAccessErr),
        (e::IBV_EVENT_COMM_EST, k::CommEst),
        (e::IBV_EVENT_SQ_DRAINED, k::SqDrained),
        (e::IBV_EVENT_PATH_MIG, k::PathMig),
        (e::IBV_EVENT_PATH_MIG_ERR, k::PathMigErr),
        (e::IBV_EVENT_DEVICE_FATAL, k::DeviceFatal),
        (e::IBV_EVENT_PORT_ACTIVE, k::PortActive),
        (e::IBV_EVENT_PORT_ERR, k::PortErr),
        (e::IBV_EVENT_LID_CHANGE, k::LidChange),
        (e::IBV_EVENT_PKEY_CHANGE, k::PkeyChange),
        (e::IBV_EVENT_SM_CHANGE, k::SmChange),
        (e::IBV_EVENT_SRQ_ERR, k::SrqErr),
        (e::IBV_EVENT_SRQ_LIMIT_REACHED, k::SrqLimitReached),
        (e::IBV_EVENT_QP_LAST_WQE_REACHED, k::QpLastWqeReached),
        (e::IBV_EVENT_CLIENT_REREGISTER, k::ClientReregister),
        (e::IBV_EVENT_GID_CHANGE, k::GidChange),
        (e::IBV_EVENT_WQ_FATAL, k::WqFatal),
    ];
    KINDS.iter().find(|(raw, _)| *raw as u32 == t).map_or(AsyncEventKind::Other(t), |(_, kind)| *kind)
}

impl Device {
    /// Readable when the device has an asynchronous event (non-blocking; see
    /// [`Device::take_async_events`]).
    pub fn async_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the context's async descriptor stays open while the context does, which is at
        // least as long as this Device (it holds the device list).
        unsafe { BorrowedFd::borrow_raw((*self.context()).async_fd) }
    }

    /// Reads and acknowledges the pending asynchronous events without waiting, calling `f` with
    /// each; returns how many there were.
    pub fn take_async_events(&self, mut f: impl FnMut(AsyncEvent)) -> Result<usize, RdmaError> {
        let mut n = 0;
        loop {
            let mut ev = RawAsyncEvent { element: 0, event_type: 0 };
            // SAFETY: the context is open; RawAsyncEvent has ibv_async_event's layout (a union of
            // pointers and an int, then a 32-bit enum; the sizes are asserted equal). The async
            // descriptor is non-blocking (set by Device::list), so this fails with EAGAIN when idle.
            let rc = unsafe { sys::ibv_get_async_event(self.context(), (&mut ev as *mut RawAsyncEvent).cast()) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                return match e.kind() {
                    std::io::ErrorKind::WouldBlock => Ok(n),
                    std::io::ErrorKind::Interrupted => continue,
                    _ => Err(RdmaError::Os { op: "ibv_get_async_event", source: e }),
                };
            }
            let kind = kind_of(ev.event_type);
            let (mut qp_num, mut cq, mut port) = (None, None, None);
            use AsyncEventKind as k;
            match kind {
                k::QpFatal
                | k::QpReqErr
                | k::QpAccessErr
                | k::CommEst
                | k::SqDrained
                | k::PathMig
                | k::PathMigErr
                | k::QpLastWqeReached => {
                    // SAFETY: for QP events the union holds the QP, which stays alive until this
                    // event is acknowledged (ibv_destroy_qp waits for that).
                    qp_num = Some(unsafe { (*(ev.element as usize as *const sys::ibv_qp)).qp_num });
                }
                k::CqErr => cq = Some(CqHandle::from_raw(ev.element as usize)),
                k::PortActive | k::PortErr | k::LidChange | k::PkeyChange | k::SmChange | k::ClientReregister | k::GidChange => {
                    let b = ev.element.to_ne_bytes();
                    port = Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]])); // the int member
                }
                _ => {}
            }
            // SAFETY: the event came from ibv_get_async_event and is acknowledged once; nothing
            // read through it is used afterwards.
            unsafe { sys::ibv_ack_async_event((&mut ev as *mut RawAsyncEvent).cast()) };
            n += 1;
            f(AsyncEvent { kind, qp_num, cq, port });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn async_event_kinds_map_from_the_raw_values() {
        assert_eq!(kind_of(sys::ibv_event_type::IBV_EVENT_QP_FATAL as u32), AsyncEventKind::QpFatal);
        assert_eq!(kind_of(sys::ibv_event_type::IBV_EVENT_COMM_EST as u32), AsyncEventKind::CommEst);
        assert_eq!(kind_of(sys::ibv_event_type::IBV_EVENT_WQ_FATAL as u32), AsyncEventKind::WqFatal);
        assert_eq!(kind_of(1000), AsyncEventKind::Other(1000));
    }
}
