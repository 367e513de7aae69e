//! RDMA verbs and the RDMA connection manager, behind safe types (cargo feature `rdma`; needs
//! Debian's `libibverbs-dev`, `librdmacm-dev`, `libclang-dev` to build and `ibverbs-providers`
//! to run). Built on the `rdma-sys` bindings to rdma-core.
//!
//! Made for a polled reactor: nothing here blocks unless its name says `wait`.
//!
//! * [`Device::list`]: the machine's devices as librdmacm opened them, the contexts its ids use.
//! * [`ProtectionDomain`] and [`MemoryRegion`]: memory is registered once (a [`DmaBuf`], or the
//!   whole hugepage pool, an `Arc<`[`SharedMem`]`>`) and owned by its region, giving the lkey for
//!   local work requests ([`MemoryRegion::sge`]) and the rkey the peer needs
//!   ([`MemoryRegion::remote`], a [`RemoteBuf`] with a 16-byte wire form).
//! * [`CompletionQueue::poll`] moves completions into a caller-owned array of
//!   [`WorkCompletion`]; a [`CompletionChannel`]'s descriptor lets an adaptive reactor park (see
//!   its docs for the arm-then-poll-again protocol).
//! * [`EventChannel`]: rdma_cm events on a non-blocking descriptor; [`CmId`]: listen, resolve,
//!   connect, accept, and its RC queue pair with [`CmId::post_send`] (SEND, SEND with immediate,
//!   RDMA WRITE, WRITE with immediate, RDMA READ) and [`CmId::post_recv`], each with a wr_id, or
//!   a turn's worth behind one doorbell ([`CmId::post_sends`], [`CmId::post_recvs`]).
//!
//! Lifetimes follow the verbs' rules through `Arc`s: a CmId keeps its queue pair's PD and CQs and
//! its event channel alive and destroys its QP before its id; a memory region keeps its PD; a CQ
//! keeps its completion channel; all keep the device list, and so the device contexts, open.
//!
//! * [`RegisteredPool`]: I/O buffers ([`IoBufMut`]) in memory registered once, on hugepages
//!   when reserved; [`CmId::post_read_into`] RDMA READs a peer's data straight into one and
//!   [`CmId::post_recv_into`] receives a message's tail into one; the [`PostedBuffer`] each
//!   returns owns the buffer until that request's own completion.
//! * [`Device::async_fd`] and [`Device::take_async_events`]: port and queue-pair failures, and
//!   the first message on a connection not yet seen established ([`AsyncEventKind::CommEst`]).
//!
//! A host without RDMA (no `rdma_rxe` link, no NIC) gets [`RdmaError::NoDevice`], whose message
//! says how to make a Soft-RoCE device. `examples/rdma_pingpong.rs` exercises every verb between
//! two ends over rdma_cm (the lab runs it in a guest with `rdma_rxe`).
//!
//! [`DmaBuf`]: crate::DmaBuf
//! [`SharedMem`]: crate::SharedMem
//! [`IoBufMut`]: crate::IoBufMut

mod cm;
mod events;
mod post;
mod verbs;
mod zerocopy;

pub use cm::{event_name, CmEvent, CmEventKind, CmHandle, CmId, ConnParam, EventChannel, QpCaps};
pub use events::{AsyncEvent, AsyncEventKind};
pub use post::{RecvRequest, SendFlags, SendOp, SendRequest};
pub use verbs::{
    Access, CompletionChannel, CompletionQueue, CqHandle, Device, DeviceAttributes, MemoryRegion, ProtectionDomain, RdmaMemory, RemoteBuf,
    Sge, WcError, WcOpcode, WorkCompletion,
};
pub use zerocopy::{Held, HeldBuf, Posted, PostedBuffer, PostedWrite, RegisteredPool, ZERO_COPY_WR_ID};

use std::io;
use std::net::SocketAddr;

/// What an RDMA call can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    #[error("no RDMA device: load rdma_rxe and run `rdma link add rxe0 type rxe netdev IFACE` (Soft-RoCE), or install ibverbs-providers for the NIC")]
    NoDevice,
    #[error(
        "{op} for {addr}: {source} (no RDMA device on the interface holding that address? `rdma link add rxe0 type rxe netdev IFACE`)"
    )]
    NoDeviceFor {
        op: &'static str,
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("{op} failed: {source}")]
    Os {
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("range {offset}+{len} is outside the {size}-byte memory region")]
    OutOfRange { offset: usize, len: usize, size: usize },
    #[error("this rdma_cm id has no queue pair: call create_qp first")]
    NoQp,
    #[error("the protection domain or a completion queue is on device {device}, but the rdma_cm id is bound to another device")]
    WrongDevice { device: String },
    #[error("{0}")]
    Invalid(&'static str),
}

impl RdmaError {
    /// For verbs that return an errno value instead of setting errno.
    pub(crate) fn os_code(op: &'static str, code: i32) -> RdmaError {
        RdmaError::Os { op, source: io::Error::from_raw_os_error(code) }
    }

    /// Whether this is the "no RDMA device here" error (of either kind).
    pub fn is_no_device(&self) -> bool {
        matches!(self, RdmaError::NoDevice | RdmaError::NoDeviceFor { .. })
    }
}

impl From<RdmaError> for io::Error {
    fn from(e: RdmaError) -> io::Error {
        let kind = match &e {
            RdmaError::NoDevice | RdmaError::NoDeviceFor { .. } => io::ErrorKind::NotFound,
            RdmaError::Os { source, .. } => source.kind(),
            _ => io::ErrorKind::InvalidInput,
        };
        io::Error::new(kind, e)
    }
}

/// The error errno holds after a call that returned -1 or NULL.
pub(crate) fn os_error(op: &'static str) -> RdmaError {
    RdmaError::Os { op, source: io::Error::last_os_error() }
}

pub(crate) fn set_nonblocking(fd: std::os::fd::RawFd, op: &'static str) -> Result<(), RdmaError> {
    // SAFETY: F_GETFL/F_SETFL take and return plain integers; `fd` is open (owned by the caller).
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(os_error(op));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::cm::{sockaddr_of, socket_addr_of};
    use super::*;

    #[test]
    fn remote_buf_wire_form_round_trips() {
        let r = RemoteBuf { addr: 0x7f00_dead_beef_1000, rkey: 0x1234_5678, len: 65536 };
        let b = r.to_bytes();
        assert_eq!(b.len(), RemoteBuf::WIRE_LEN);
        assert_eq!(RemoteBuf::from_bytes(&b), Some(r));
        assert_eq!(RemoteBuf::from_bytes(&b[..15]), None);
        assert_eq!(r.offset(4096), Some(RemoteBuf { addr: r.addr + 4096, rkey: r.rkey, len: 65536 - 4096 }));
        assert_eq!(r.offset(65537), None);
    }

    #[test]
    fn socket_addresses_round_trip_through_sockaddr() {
        for a in ["127.0.0.1:4420", "10.0.2.15:1", "[::1]:4420", "[fe80::1%2]:7"] {
            let a: SocketAddr = a.parse().unwrap();
            let (ss, len) = sockaddr_of(&a);
            assert_eq!(socket_addr_of(&ss), Some(a));
            let want = if a.is_ipv4() { std::mem::size_of::<libc::sockaddr_in>() } else { std::mem::size_of::<libc::sockaddr_in6>() };
            assert_eq!(len as usize, want);
        }
        // SAFETY: sockaddr_storage is plain data; all-zero is AF_UNSPEC.
        let empty: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        assert_eq!(socket_addr_of(&empty), None);
    }

    #[test]
    fn work_completion_decodes_status_and_immediate() {
        let mut wc = WorkCompletion::default();
        assert!(wc.is_ok() && wc.error().is_none() && wc.imm_data().is_none());
        assert_eq!(wc.opcode(), WcOpcode::Send);
        // SAFETY: WorkCompletion is repr(transparent) over ibv_wc; the test writes plain fields.
        let raw = unsafe { &mut *(&mut wc as *mut WorkCompletion).cast::<rdma_sys::ibv_wc>() };
        raw.opcode = rdma_sys::ibv_wc_opcode::IBV_WC_RECV_RDMA_WITH_IMM;
        raw.wc_flags = rdma_sys::ibv_wc_flags::IBV_WC_WITH_IMM.0;
        raw.imm_data_invalidated_rkey_union.imm_data = 0xC0FF_EE00u32.to_be();
        assert_eq!(wc.opcode(), WcOpcode::RecvRdmaWithImm);
        assert_eq!(wc.imm_data(), Some(0xC0FF_EE00));
        // SAFETY: as above.
        let raw = unsafe { &mut *(&mut wc as *mut WorkCompletion).cast::<rdma_sys::ibv_wc>() };
        raw.status = rdma_sys::ibv_wc_status::IBV_WC_REM_ACCESS_ERR;
        let e = wc.error().expect("an error status");
        assert!(e.is_remote_access() && !e.is_flush());
        assert!(e.to_string().contains("remote access error"), "{e}");
        assert_eq!(std::mem::size_of::<WorkCompletion>(), 48, "ibv_wc of rdma-core");
    }

    #[test]
    fn event_names_come_from_librdmacm() {
        assert_eq!(event_name(CmEventKind::Established), "RDMA_CM_EVENT_ESTABLISHED");
        assert_eq!(event_name(CmEventKind::ConnectRequest), "RDMA_CM_EVENT_CONNECT_REQUEST");
    }

    #[test]
    fn errors_say_how_to_get_a_device() {
        let msg = RdmaError::NoDevice.to_string();
        assert!(msg.contains("rdma_rxe") && msg.contains("rdma link add"), "{msg}");
        let io: io::Error = RdmaError::NoDevice.into();
        assert_eq!(io.kind(), io::ErrorKind::NotFound);
    }

    /// On a host with no RDMA (this project's build machines) every entry point says so plainly;
    /// with a device, the basic objects can be made and a region registered and bounds-checked.
    #[test]
    fn devices_or_a_clear_no_device_error() {
        let devices = match Device::list() {
            Err(e) => {
                assert!(e.is_no_device(), "{e}");
                let ch = EventChannel::new();
                assert!(matches!(ch, Err(RdmaError::NoDevice)) || ch.is_ok(), "{ch:?}");
                eprintln!("no RDMA device on this host ({e}); the device checks run in the lab (rdma_pingpong)");
                return;
            }
            Ok(d) => d,
        };
        let dev = &devices[0];
        let attrs = dev.attributes().unwrap();
        assert!(attrs.max_qp_wr > 0 && attrs.max_cqe > 0, "{attrs:?}");
        let pd = ProtectionDomain::new(dev).unwrap();
        let mut mr = pd.register(crate::DmaBuf::zeroed(8192), Access::LOCAL_WRITE | Access::REMOTE_READ).unwrap();
        mr.write(4096, b"abc").unwrap();
        let mut out = [0u8; 3];
        mr.read(4096, &mut out).unwrap();
        assert_eq!(&out, b"abc");
        assert!(matches!(mr.sge(8190, 3), Err(RdmaError::OutOfRange { .. })));
        assert_eq!(mr.remote(0, 8192).unwrap().rkey, mr.rkey());
        let buf = mr.into_inner().unwrap();
        assert_eq!(&buf[4096..4099], b"abc");
        assert!(matches!(RegisteredPool::new(&pd, &[(6000, 2)], false), Err(RdmaError::Invalid(_))));
        let zc = RegisteredPool::new(&pd, &[(16384, 2), (131072, 1)], false).unwrap();
        assert_eq!((zc.size(), zc.idle(), zc.on_hugepages()), (163840, 3, false));
        let taken: Vec<_> = (0..3).map(|_| zc.take(8192).expect("an idle buffer")).collect();
        assert!(zc.take(1).is_none());
        drop(taken);
        assert_eq!(zc.idle(), 3);
        let ch = CompletionChannel::new(dev).unwrap();
        let cq = CompletionQueue::new(dev, 16, Some(&ch)).unwrap();
        let mut wcs: [WorkCompletion; 4] = Default::default();
        assert_eq!(cq.poll(&mut wcs).unwrap(), 0);
        cq.arm(false).unwrap();
        assert_eq!(ch.take_events(|_| ()).unwrap(), 0);
        assert_eq!(dev.take_async_events(|e| panic!("unexpected {e:?}")).unwrap(), 0);
        eprintln!("rdma unit checks passed on device {}", dev.name());
    }
}
