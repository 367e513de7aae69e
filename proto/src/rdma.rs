//! The NVMe-oF RDMA transport binding, sans-IO: the RDMA CM private data a host and a target
//! exchange (NVMe RDMA Transport Specification 1.0b, figures 5-7; Linux's
//! `include/linux/nvme-rdma.h`), the plan of how a command's data moves (from its SGL
//! descriptor), and the discovery log's transport-specific address subtype (TSAS) for RDMA.
//!
//! * [`ConnectRequest`]: the host's private data (32 bytes: RECFMT 0, QID, HRQSIZE, HSQSIZE,
//!   CNTLID), parsed with [`ConnectRequest::parse`] (errors carry the [`RejectStatus`] to send).
//! * [`ConnectAccept`] (RECFMT, CRQSIZE) and [`Reject`] (RECFMT, STS) encoded by the target.
//! * [`plan_data`]: a command's keyed SGL data block (type 4, subtype 0 address or Fh
//!   invalidate key) becomes an RDMA READ from the host (writes) or an RDMA WRITE to it (reads);
//!   an in-capsule data block (type 0, subtype 1 offset) is data already in the capsule. Bad
//!   descriptors give the NVMe status to complete the command with.
//! * [`tsas`]: the 256-byte TSAS of a discovery log entry for an RDMA listener.

use crate::nvme::{put16, Command, DataDirection, Status};

/// NVMe/RDMA in the discovery log's TRTYPE.
pub const TRTYPE_RDMA: u8 = 1;
/// NVMe/TCP in the discovery log's TRTYPE.
pub const TRTYPE_TCP: u8 = 3;
/// RDMA_QPTYPE: reliable connected.
pub const QPTYPE_RELIABLE_CONNECTED: u8 = 1;
/// RDMA_PRTYPE: no provider specified (Linux's NVMF_RDMA_PRTYPE_NOT_SPECIFIED).
pub const PRTYPE_NOT_SPECIFIED: u8 = 1;
/// RDMA_CMS: the RDMA connection manager.
pub const CMS_RDMA_CM: u8 = 1;
/// Length of the host's connect private data and of the target's accept private data.
pub const PRIVATE_DATA_LEN: usize = 32;
/// Bytes of a command capsule before any in-capsule data.
pub const SQE_LEN: usize = 64;
/// Bytes of a response capsule (a completion queue entry).
pub const CQE_LEN: usize = 16;
/// The only record format there is (1.0).
pub const RECFMT: u16 = 0;
/// Admin queue entries a Linux host asks for (NVME_AQ_DEPTH); more are refused on queue 0.
pub const ADMIN_QUEUE_DEPTH: u16 = 32;

/// Why a target rejects an RDMA CM connect request (the STS of the reject private data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RejectStatus {
    #[error("invalid private data length")]
    InvalidLength = 0x01,
    #[error("invalid record format")]
    InvalidRecfmt = 0x02,
    #[error("invalid queue ID")]
    InvalidQid = 0x03,
    #[error("invalid host submission queue size")]
    InvalidHsqsize = 0x04,
    #[error("invalid host receive queue size")]
    InvalidHrqsize = 0x05,
    #[error("no resources")]
    NoResources = 0x06,
    #[error("invalid IRD")]
    InvalidIrd = 0x07,
    #[error("invalid ORD")]
    InvalidOrd = 0x08,
    #[error("invalid controller ID")]
    InvalidCntlid = 0x09,
}

/// The host's RDMA CM connect private data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectRequest {
    pub qid: u16,
    /// Entries of the host's receive queue (responses it can take at once).
    pub hrqsize: u16,
    /// The host's submission queue size, zero-based (commands outstanding minus one).
    pub hsqsize: u16,
    pub cntlid: u16,
}

impl ConnectRequest {
    /// Parses the private data of a connect request (transports may pad it with zeroes).
    pub fn parse(b: &[u8]) -> Result<ConnectRequest, RejectStatus> {
        if b.len() < PRIVATE_DATA_LEN {
            return Err(RejectStatus::InvalidLength);
        }
        let u = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        if u(0) != RECFMT {
            return Err(RejectStatus::InvalidRecfmt);
        }
        let req = ConnectRequest { qid: u(2), hrqsize: u(4), hsqsize: u(6), cntlid: u(8) };
        if req.hrqsize == 0 {
            return Err(RejectStatus::InvalidHrqsize);
        }
        if req.qid == 0 && u32::from(req.hsqsize) + 1 > u32::from(ADMIN_QUEUE_DEPTH) {
            return Err(RejectStatus::InvalidHsqsize);
        }
        if u32::from(req.hsqsize) + 1 > u32::from(crate::identify::MAX_QUEUE_ENTRIES) {
            return Err(RejectStatus::InvalidHsqsize);
        }
        Ok(req)
    }

    pub fn encode(&self) -> [u8; PRIVATE_DATA_LEN] {
        let mut b = [0u8; PRIVATE_DATA_LEN];
        put16(&mut b, 0, RECFMT);
        put16(&mut b, 2, self.qid);
        put16(&mut b, 4, self.hrqsize);
        put16(&mut b, 6, self.hsqsize);
        put16(&mut b, 8, self.cntlid);
        b
    }

    /// Command capsules the target must be able to receive at once: the host's submission
    /// queue size (HSQSIZE + 1), which is the CRQSIZE of the accept and never more than HRQSIZE
    /// (each command's response needs one of the host's receives).
    pub fn target_recv_depth(&self) -> u16 {
        (self.hsqsize.saturating_add(1)).min(self.hrqsize)
    }
}

/// The target's accept private data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectAccept {
    /// Entries of the target's receive queue (command capsules it takes at once).
    pub crqsize: u16,
}

impl ConnectAccept {
    pub fn encode(&self) -> [u8; PRIVATE_DATA_LEN] {
        let mut b = [0u8; PRIVATE_DATA_LEN];
        put16(&mut b, 0, RECFMT);
        put16(&mut b, 2, self.crqsize);
        b
    }

    pub fn parse(b: &[u8]) -> Option<ConnectAccept> {
        (b.len() >= 4 && u16::from_le_bytes([b[0], b[1]]) == RECFMT).then(|| ConnectAccept { crqsize: u16::from_le_bytes([b[2], b[3]]) })
    }
}

/// The target's reject private data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reject(pub RejectStatus);

impl Reject {
    pub fn encode(&self) -> [u8; 4] {
        let mut b = [0u8; 4];
        put16(&mut b, 0, RECFMT);
        put16(&mut b, 2, self.0 as u16);
        b
    }
}

/// SGL descriptor identifiers the RDMA transport uses (type in the high nibble).
pub mod sgl {
    /// Keyed SGL data block, address subtype.
    pub const KEYED_ADDRESS: u8 = 0x40;
    /// Keyed SGL data block, invalidate-key subtype (the host may ask for SEND with invalidate).
    pub const KEYED_INVALIDATE: u8 = 0x4f;
    /// SGL data block, offset subtype: the data is in the capsule.
    pub const IN_CAPSULE: u8 = 0x01;
}

/// The host's memory a keyed SGL data block names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostBuffer {
    pub addr: u64,
    pub len: u32,
    pub key: u32,
    /// The host asked for the key to be invalidated with the response (SEND with invalidate).
    pub invalidate: bool,
}

/// How a command's data moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataPlan {
    /// No data.
    None,
    /// `len` bytes of in-capsule data at `offset` past the 64-byte SQE.
    InCapsule { offset: usize, len: usize },
    /// RDMA READ the host's buffer into the target (a write-like command), then run it.
    ReadFromHost(HostBuffer),
    /// Run the command, then RDMA WRITE up to the buffer's length to the host (a read-like one).
    WriteToHost(HostBuffer),
}

/// Decodes the SGL of the SQE at the start of `capsule` (`capsule.len()` bytes were received:
/// SQE plus in-capsule data). `in_capsule`: the in-capsule data this queue accepts;
/// `max_transfer`: the most bytes one command moves. Returns the status to fail the command with.
pub fn plan_data(capsule: &[u8], in_capsule: usize, max_transfer: usize) -> Result<DataPlan, Status> {
    let Some(sqe) = capsule.first_chunk::<SQE_LEN>() else {
        return Err(Status::INVALID_FIELD);
    };
    plan_sqe(sqe, capsule.len(), in_capsule, max_transfer)
}

/// [`plan_data`] of a capsule whose SQE was copied out: `received` bytes arrived in all (the
/// in-capsule data stays where it landed).
pub fn plan_sqe(sqe: &[u8; SQE_LEN], received: usize, in_capsule: usize, max_transfer: usize) -> Result<DataPlan, Status> {
    if received < SQE_LEN {
        return Err(Status::INVALID_FIELD);
    }
    let cmd = Command::from_bytes(sqe);
    let d = &sqe[24..40];
    let id = d[15];
    let addr = u64::from_le_bytes(d[0..8].try_into().expect("8 bytes"));
    let dir = cmd.direction();
    if dir == DataDirection::None {
        // No data moves, whatever the descriptor says (SPDK reads no SGL for these either).
        return Ok(DataPlan::None);
    }
    match id {
        sgl::KEYED_ADDRESS | sgl::KEYED_INVALIDATE => {
            let len = u32::from_le_bytes([d[8], d[9], d[10], 0]);
            let key = u32::from_le_bytes(d[11..15].try_into().expect("4 bytes"));
            if len == 0 {
                return Ok(DataPlan::None);
            }
            if len as usize > max_transfer {
                return Err(Status::SGL_DATA_LENGTH_INVALID);
            }
            let buf = HostBuffer { addr, len, key, invalidate: id == sgl::KEYED_INVALIDATE };
            match dir {
                DataDirection::HostToController => Ok(DataPlan::ReadFromHost(buf)),
                DataDirection::ControllerToHost => Ok(DataPlan::WriteToHost(buf)),
                DataDirection::None => Ok(DataPlan::None),
                DataDirection::Bidirectional => Err(Status::INVALID_FIELD),
            }
        }
        sgl::IN_CAPSULE => {
            let len = u32::from_le_bytes(d[8..12].try_into().expect("4 bytes")) as usize;
            if len == 0 {
                return Ok(DataPlan::None);
            }
            if dir != DataDirection::HostToController {
                return Err(Status::INVALID_FIELD);
            }
            let data = received - SQE_LEN;
            let end = addr.checked_add(len as u64);
            if len > in_capsule || end.is_none_or(|e| e > data as u64) {
                return Err(Status::DATA_SGL_LENGTH_INVALID);
            }
            Ok(DataPlan::InCapsule { offset: SQE_LEN + addr as usize, len })
        }
        _ => Err(Status::SGL_DESCRIPTOR_TYPE_INVALID),
    }
}

/// The TSAS of an RDMA discovery log entry (bytes 768..1024 of the entry).
pub fn tsas() -> [u8; 256] {
    let mut t = [0u8; 256];
    t[0] = QPTYPE_RELIABLE_CONNECTED;
    t[1] = PRTYPE_NOT_SPECIFIED;
    t[2] = CMS_RDMA_CM;
    put16(&mut t, 8, 0); // RDMA_PKEY
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::{io, Command};
    use proptest::prelude::*;

    fn keyed(opcode: u8, addr: u64, len: u32, key: u32, id: u8) -> Vec<u8> {
        let mut c = Command::new(opcode, 7);
        c.set_sgl(addr, 0, 0);
        let mut b = c.0.to_vec();
        b[32..35].copy_from_slice(&len.to_le_bytes()[..3]);
        b[35..39].copy_from_slice(&key.to_le_bytes());
        b[39] = id;
        b
    }

    #[test]
    fn connect_request_round_trips_and_negotiates_depth() {
        let r = ConnectRequest { qid: 3, hrqsize: 128, hsqsize: 127, cntlid: 5 };
        let b = r.encode();
        assert_eq!(ConnectRequest::parse(&b), Ok(r));
        assert_eq!(r.target_recv_depth(), 128);
        let mut padded = b.to_vec();
        padded.resize(56, 0);
        assert_eq!(ConnectRequest::parse(&padded), Ok(r));
        assert_eq!(ConnectRequest { hrqsize: 16, ..r }.target_recv_depth(), 16);
    }

    #[test]
    fn bad_connect_requests_name_their_reject_status() {
        let ok = ConnectRequest { qid: 0, hrqsize: 32, hsqsize: 31, cntlid: 0xffff }.encode();
        assert_eq!(ConnectRequest::parse(&ok[..31]), Err(RejectStatus::InvalidLength));
        let mut b = ok;
        b[0] = 1;
        assert_eq!(ConnectRequest::parse(&b), Err(RejectStatus::InvalidRecfmt));
        let admin_too_deep = ConnectRequest { qid: 0, hrqsize: 64, hsqsize: 63, cntlid: 0 }.encode();
        assert_eq!(ConnectRequest::parse(&admin_too_deep), Err(RejectStatus::InvalidHsqsize));
        let no_recv = ConnectRequest { qid: 1, hrqsize: 0, hsqsize: 3, cntlid: 0 }.encode();
        assert_eq!(ConnectRequest::parse(&no_recv), Err(RejectStatus::InvalidHrqsize));
        assert_eq!(Reject(RejectStatus::InvalidQid).encode(), [0, 0, 3, 0]);
        assert_eq!(RejectStatus::NoResources.to_string(), "no resources");
    }

    #[test]
    fn accept_carries_crqsize() {
        let a = ConnectAccept { crqsize: 32 }.encode();
        assert_eq!(&a[..4], &[0, 0, 32, 0]);
        assert_eq!(ConnectAccept::parse(&a), Some(ConnectAccept { crqsize: 32 }));
    }

    #[test]
    fn keyed_sgls_plan_rdma_reads_and_writes() {
        let w = keyed(io::WRITE, 0x1000, 65536, 0xabcd, sgl::KEYED_INVALIDATE);
        let want = HostBuffer { addr: 0x1000, len: 65536, key: 0xabcd, invalidate: true };
        assert_eq!(plan_data(&w, 8192, 131072), Ok(DataPlan::ReadFromHost(want)));
        let r = keyed(io::READ, 0x1000, 4096, 9, sgl::KEYED_ADDRESS);
        assert_eq!(
            plan_data(&r, 8192, 131072),
            Ok(DataPlan::WriteToHost(HostBuffer { addr: 0x1000, len: 4096, key: 9, invalidate: false }))
        );
        let none = keyed(io::FLUSH, 0, 0, 0, sgl::KEYED_ADDRESS);
        assert_eq!(plan_data(&none, 8192, 131072), Ok(DataPlan::None));
        let big = keyed(io::WRITE, 0, 131073, 1, sgl::KEYED_ADDRESS);
        assert_eq!(plan_data(&big, 8192, 131072), Err(Status::SGL_DATA_LENGTH_INVALID));
        let mut built = Command::new(io::WRITE, 3);
        built.set_keyed_sgl(0x2000, 8192, 0x1234_5678);
        let want = HostBuffer { addr: 0x2000, len: 8192, key: 0x1234_5678, invalidate: false };
        assert_eq!(plan_data(&built.0, 8192, 131072), Ok(DataPlan::ReadFromHost(want)), "set_keyed_sgl builds what plan_data reads");
        let null_block = keyed(io::FLUSH, 0, 0, 0, 0x00);
        assert_eq!(plan_data(&null_block, 8192, 131072), Ok(DataPlan::None), "a command without data ignores its descriptor");
        let bad = keyed(io::WRITE, 0, 512, 1, 0x5a);
        assert_eq!(plan_data(&bad, 8192, 131072), Err(Status::SGL_DESCRIPTOR_TYPE_INVALID));
        assert_eq!(plan_data(&bad[..63], 8192, 131072), Err(Status::INVALID_FIELD));
    }

    #[test]
    fn in_capsule_data_must_be_within_the_capsule_and_the_limit() {
        let mut c = Command::new(io::WRITE, 1);
        c.set_sgl(0, 4096, sgl::IN_CAPSULE);
        let mut b = c.0.to_vec();
        b.resize(64 + 4096, 0xee);
        assert_eq!(plan_data(&b, 8192, 131072), Ok(DataPlan::InCapsule { offset: 64, len: 4096 }));
        assert_eq!(plan_data(&b, 2048, 131072), Err(Status::DATA_SGL_LENGTH_INVALID));
        assert_eq!(plan_data(&b[..64 + 4095], 8192, 131072), Err(Status::DATA_SGL_LENGTH_INVALID));
        let mut r = Command::new(io::READ, 1);
        r.set_sgl(0, 512, sgl::IN_CAPSULE);
        assert_eq!(plan_data(&r.0, 8192, 131072), Err(Status::INVALID_FIELD));
    }

    #[test]
    fn rdma_tsas_is_reliable_connected_over_rdma_cm() {
        let t = tsas();
        assert_eq!(&t[..4], &[QPTYPE_RELIABLE_CONNECTED, PRTYPE_NOT_SPECIFIED, CMS_RDMA_CM, 0]);
        assert_eq!(&t[8..10], &[0, 0]);
    }

    proptest! {
        #[test]
        fn any_capsule_plans_within_bounds(bytes in proptest::collection::vec(any::<u8>(), 0..300), in_capsule in 0usize..256) {
            match plan_data(&bytes, in_capsule, 4096) {
                Ok(DataPlan::InCapsule { offset, len }) => prop_assert!(offset + len <= bytes.len() && len <= in_capsule),
                Ok(DataPlan::ReadFromHost(b) | DataPlan::WriteToHost(b)) => prop_assert!(b.len as usize <= 4096 && b.len > 0),
                Ok(DataPlan::None) | Err(_) => {}
            }
        }

        #[test]
        fn connect_requests_round_trip(qid in any::<u16>(), hrq in 1u16.., hsq in 0u16..1023, cntlid in any::<u16>()) {
            let r = ConnectRequest { qid, hrqsize: hrq, hsqsize: hsq, cntlid };
            match ConnectRequest::parse(&r.encode()) {
                Ok(p) => { prop_assert_eq!(p, r); prop_assert!(p.target_recv_depth() <= hrq); }
                Err(e) => prop_assert!(qid == 0 && e == RejectStatus::InvalidHsqsize),
            }
        }
    }
}

#[cfg(test)]
mod discovery_tests {
    use crate::subsystem::{DiscoveryEntry, SubsystemView};

    #[test]
    fn discovery_log_entries_carry_trtype_and_the_rdma_tsas() {
        let entry = |rdma| DiscoveryEntry {
            portid: 1,
            ipv6: false,
            traddr: "10.0.2.15".into(),
            trsvcid: "4420".into(),
            subnqn: "nqn.2026-11.io.nvmetro:x".into(),
            subtype: 2,
            rdma,
        };
        let log = crate::identify::discovery_log(&SubsystemView::discovery(vec![entry(true), entry(false)], 1));
        let (r, t) = (&log[1024..2048], &log[2048..3072]);
        assert_eq!(r[0], super::TRTYPE_RDMA);
        assert_eq!(&r[768..771], &[super::QPTYPE_RELIABLE_CONNECTED, super::PRTYPE_NOT_SPECIFIED, super::CMS_RDMA_CM]);
        assert_eq!(t[0], super::TRTYPE_TCP);
        assert!(t[768..1024].iter().all(|&b| b == 0));
    }

    #[test]
    fn identify_controller_advertises_keyed_sgls_only_over_rdma() {
        let view = SubsystemView::discovery(Vec::new(), 1);
        let sgls = |keyed| crate::nvme::le_u32(&crate::identify::controller(&view, 1, 8192, keyed), 536);
        assert_eq!(sgls(true) & 0x4, 0x4);
        assert_eq!(sgls(false) & 0x4, 0);
        assert_eq!(sgls(true) & (1 << 20 | 1), 1 << 20 | 1);
    }
}
