//! NVMe submission and completion queue entries, opcodes and status codes (NVMe Base 2.0).

use std::fmt;

pub(crate) fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
pub(crate) fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}
pub(crate) fn le64(b: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(b[off..off + 8].try_into().expect("8 bytes"))
}
pub(crate) fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
/// Copies an ASCII string into a fixed field, padding with `pad` (spaces for SN/MN/FR, NUL for NQNs).
pub(crate) fn put_str(b: &mut [u8], s: &str, pad: u8) {
    let n = s.len().min(b.len());
    b[..n].copy_from_slice(&s.as_bytes()[..n]);
    b[n..].fill(pad);
}
/// Reads a NUL- or space-terminated ASCII field.
pub fn get_str(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).trim_end().to_string()
}

/// Little-endian field readers for hosts and tests that inspect returned data.
pub fn le_u16(b: &[u8], off: usize) -> u16 {
    le16(b, off)
}
pub fn le_u32(b: &[u8], off: usize) -> u32 {
    le32(b, off)
}
pub fn le_u64(b: &[u8], off: usize) -> u64 {
    le64(b, off)
}

/// Admin command opcodes.
pub mod admin {
    pub const GET_LOG_PAGE: u8 = 0x02;
    pub const IDENTIFY: u8 = 0x06;
    pub const ABORT: u8 = 0x08;
    pub const SET_FEATURES: u8 = 0x09;
    pub const GET_FEATURES: u8 = 0x0a;
    pub const ASYNC_EVENT_REQUEST: u8 = 0x0c;
    pub const KEEP_ALIVE: u8 = 0x18;
    pub const FABRICS: u8 = 0x7f;
}

/// NVM command set I/O opcodes.
pub mod io {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const COMPARE: u8 = 0x05;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
}

/// Fabrics command types (byte 4 of a command with opcode 0x7f).
pub mod fctype {
    pub const PROPERTY_SET: u8 = 0x00;
    pub const CONNECT: u8 = 0x01;
    pub const PROPERTY_GET: u8 = 0x04;
    pub const AUTH_SEND: u8 = 0x05;
    pub const AUTH_RECV: u8 = 0x06;
    pub const DISCONNECT: u8 = 0x08;
}

/// Direction of a command's data transfer, from the low bits of its opcode (or fctype).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDirection {
    None,
    HostToController,
    ControllerToHost,
    Bidirectional,
}

/// Fused operation marker (bits 1:0 of the command's flags byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fuse {
    Normal,
    First,
    Second,
    Reserved,
}

/// A 64-byte submission queue entry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Command(pub [u8; 64]);

impl Command {
    pub fn new(opcode: u8, cid: u16) -> Command {
        let mut c = Command([0; 64]);
        c.0[0] = opcode;
        put16(&mut c.0, 2, cid);
        c
    }
    pub fn from_bytes(b: &[u8]) -> Command {
        let mut c = Command([0; 64]);
        c.0.copy_from_slice(&b[..64]);
        c
    }
    pub fn opcode(&self) -> u8 {
        self.0[0]
    }
    pub fn fuse(&self) -> Fuse {
        match self.0[1] & 3 {
            0 => Fuse::Normal,
            1 => Fuse::First,
            2 => Fuse::Second,
            _ => Fuse::Reserved,
        }
    }
    pub fn set_fuse(&mut self, f: Fuse) {
        let bits = match f {
            Fuse::Normal => 0,
            Fuse::First => 1,
            Fuse::Second => 2,
            Fuse::Reserved => 3,
        };
        self.0[1] = (self.0[1] & !3) | bits;
    }
    pub fn cid(&self) -> u16 {
        le16(&self.0, 2)
    }
    pub fn nsid(&self) -> u32 {
        le32(&self.0, 4)
    }
    pub fn set_nsid(&mut self, v: u32) {
        put32(&mut self.0, 4, v)
    }
    /// Fabrics command type (only meaningful when the opcode is 0x7f).
    pub fn fctype(&self) -> u8 {
        self.0[4]
    }
    pub fn cdw(&self, n: usize) -> u32 {
        debug_assert!((10..=15).contains(&n));
        le32(&self.0, n * 4)
    }
    pub fn set_cdw(&mut self, n: usize, v: u32) {
        put32(&mut self.0, n * 4, v)
    }
    /// The SGL descriptor's address (in-capsule offset for NVMe/TCP).
    pub fn sgl_addr(&self) -> u64 {
        le64(&self.0, 24)
    }
    pub fn sgl_len(&self) -> u32 {
        le32(&self.0, 32)
    }
    /// SGL descriptor identifier: type in the high nibble, subtype in the low.
    pub fn sgl_type(&self) -> u8 {
        self.0[39]
    }
    /// Describes the data with one SGL descriptor and marks the command as using SGLs (PSDT 01b,
    /// which every fabrics command must carry: Linux's target refuses commands without it).
    pub fn set_sgl(&mut self, addr: u64, len: u32, sgl_type: u8) {
        self.0[1] = (self.0[1] & 0x3f) | 0x40;
        put64(&mut self.0, 24, addr);
        put32(&mut self.0, 32, len);
        self.0[36..39].fill(0);
        self.0[39] = sgl_type;
    }
    /// As [`Command::set_sgl`], with a keyed SGL data block (NVMe/RDMA): `len` bytes (below
    /// 16 MiB; 0 is the null descriptor a command without data carries) of host memory at `addr`
    /// that the target reaches under `key`.
    pub fn set_keyed_sgl(&mut self, addr: u64, len: u32, key: u32) {
        self.set_sgl(addr, len & 0x00ff_ffff, crate::rdma::sgl::KEYED_ADDRESS);
        put32(&mut self.0, 35, key);
    }
    /// Starting LBA of an NVM read/write-like command.
    pub fn slba(&self) -> u64 {
        le64(&self.0, 40)
    }
    /// Number of logical blocks (the wire field is zero-based).
    pub fn nlb(&self) -> u32 {
        (self.cdw(12) & 0xffff) + 1
    }
    pub fn direction(&self) -> DataDirection {
        let bits = if self.opcode() == admin::FABRICS { self.fctype() } else { self.opcode() };
        match bits & 3 {
            0 => DataDirection::None,
            1 => DataDirection::HostToController,
            2 => DataDirection::ControllerToHost,
            _ => DataDirection::Bidirectional,
        }
    }
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Command(opc={:#04x} cid={} nsid={} fuse={:?})", self.opcode(), self.cid(), self.nsid(), self.fuse())
    }
}

/// SGL identifiers used by NVMe/TCP.
pub mod sgl {
    /// Data block, offset subtype: data is in the capsule.
    pub const IN_CAPSULE: u8 = 0x01;
    /// Transport data block, transport-specific subtype: data moves by R2T/H2CData or C2HData.
    pub const TRANSPORT: u8 = 0x5a;
}

/// Status code type and code, as carried in a completion (without phase, More and DNR bits).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Status(pub u16);

impl Status {
    pub const SUCCESS: Status = Status(0);
    // Generic command status (type 0).
    pub const INVALID_OPCODE: Status = Status(0x01);
    pub const INVALID_FIELD: Status = Status(0x02);
    pub const CID_CONFLICT: Status = Status(0x03);
    pub const DATA_TRANSFER_ERROR: Status = Status(0x04);
    pub const INTERNAL_ERROR: Status = Status(0x06);
    pub const ABORT_REQUESTED: Status = Status(0x07);
    pub const ABORTED_SQ_DELETION: Status = Status(0x08);
    pub const FUSED_FAILED: Status = Status(0x09);
    pub const FUSED_MISSING: Status = Status(0x0a);
    pub const INVALID_NAMESPACE: Status = Status(0x0b);
    pub const COMMAND_SEQUENCE_ERROR: Status = Status(0x0c);
    pub const DATA_SGL_LENGTH_INVALID: Status = Status(0x0d);
    pub const SGL_DATA_LENGTH_INVALID: Status = Status(0x0f);
    pub const SGL_DESCRIPTOR_TYPE_INVALID: Status = Status(0x11);
    pub const LBA_OUT_OF_RANGE: Status = Status(0x80);
    pub const CAPACITY_EXCEEDED: Status = Status(0x81);
    pub const NAMESPACE_NOT_READY: Status = Status(0x82);
    // Command specific status (type 1).
    pub const ASYNC_EVENT_LIMIT: Status = Status(0x105);
    pub const INVALID_LOG_PAGE: Status = Status(0x109);
    pub const FEATURE_NOT_SAVEABLE: Status = Status(0x10d);
    pub const CONNECT_INCOMPATIBLE_FORMAT: Status = Status(0x180);
    pub const CONNECT_CONTROLLER_BUSY: Status = Status(0x181);
    pub const CONNECT_INVALID_PARAMETERS: Status = Status(0x182);
    pub const CONNECT_INVALID_HOST: Status = Status(0x184);
    // Media and data integrity errors (type 2).
    pub const WRITE_FAULT: Status = Status(0x280);
    pub const UNRECOVERED_READ_ERROR: Status = Status(0x281);
    pub const COMPARE_FAILURE: Status = Status(0x285);
    // Path related status (type 3): the host retries these on another path.
    pub const ANA_PERSISTENT_LOSS: Status = Status(0x301);
    pub const ANA_INACCESSIBLE: Status = Status(0x302);
    pub const ANA_TRANSITION: Status = Status(0x303);

    pub fn sct(self) -> u8 {
        (self.0 >> 8) as u8 & 7
    }
    pub fn sc(self) -> u8 {
        self.0 as u8
    }
    pub fn is_success(self) -> bool {
        self.0 == 0
    }
    pub fn is_path_error(self) -> bool {
        self.sct() == 3
    }
    /// Whether a host should not retry: everything but path errors, transitions and internal errors.
    pub fn do_not_retry(self) -> bool {
        !(self.is_success() || self.is_path_error() || self == Status::INTERNAL_ERROR || self == Status::NAMESPACE_NOT_READY)
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Status(sct={} sc={:#04x})", self.sct(), self.sc())
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match *self {
            Status::SUCCESS => "success",
            Status::INVALID_OPCODE => "invalid opcode",
            Status::INVALID_FIELD => "invalid field",
            Status::INVALID_NAMESPACE => "invalid namespace",
            Status::LBA_OUT_OF_RANGE => "LBA out of range",
            Status::COMPARE_FAILURE => "compare failure",
            Status::FUSED_FAILED => "aborted: fused command failed",
            Status::FUSED_MISSING => "aborted: fused command missing",
            Status::CONNECT_INVALID_HOST => "connect: host not allowed",
            Status::CONNECT_INVALID_PARAMETERS => "connect: invalid parameters",
            Status::ANA_INACCESSIBLE => "ANA inaccessible",
            Status::ANA_TRANSITION => "ANA transition",
            Status::ANA_PERSISTENT_LOSS => "ANA persistent loss",
            Status::INTERNAL_ERROR => "internal error",
            _ => "error",
        };
        write!(f, "{name} ({:#05x})", self.0)
    }
}

/// A 16-byte completion queue entry.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Completion {
    pub result: u64,
    pub sqhd: u16,
    pub sqid: u16,
    pub cid: u16,
    /// Status type+code in bits 10:0 (as [`Status`]), More in bit 13, DNR in bit 14.
    pub status: u16,
}

impl Completion {
    pub fn new(cid: u16, status: Status) -> Completion {
        let dnr = if status.do_not_retry() { 1 << 14 } else { 0 };
        Completion { cid, status: (status.0 & 0x7ff) | dnr, ..Default::default() }
    }
    pub fn with_result(mut self, result: u64) -> Completion {
        self.result = result;
        self
    }
    pub fn status(&self) -> Status {
        Status(self.status & 0x7ff)
    }
    pub fn dnr(&self) -> bool {
        self.status & (1 << 14) != 0
    }
    pub fn encode(&self, out: &mut [u8]) {
        put64(out, 0, self.result);
        put16(out, 8, self.sqhd);
        put16(out, 10, self.sqid);
        put16(out, 12, self.cid);
        // The wire status field has the phase tag in bit 0.
        put16(out, 14, self.status << 1);
    }
    pub fn decode(b: &[u8]) -> Completion {
        Completion { result: le64(b, 0), sqhd: le16(b, 8), sqid: le16(b, 10), cid: le16(b, 12), status: le16(b, 14) >> 1 }
    }
}

impl fmt::Debug for Completion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Completion(cid={} {:?} result={:#x})", self.cid, self.status(), self.result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_round_trip_and_dnr() {
        let c = Completion::new(7, Status::LBA_OUT_OF_RANGE).with_result(0x1234);
        let mut b = [0u8; 16];
        c.encode(&mut b);
        assert_eq!(le16(&b, 14), (0x80 | 1 << 14) << 1);
        let d = Completion::decode(&b);
        assert_eq!(d, c);
        assert!(d.dnr());
        assert!(!Completion::new(1, Status::ANA_INACCESSIBLE).dnr());
    }

    #[test]
    fn command_fields() {
        let mut c = Command::new(io::WRITE, 42);
        c.set_nsid(1);
        c.set_cdw(10, 100);
        c.set_cdw(12, 1);
        c.set_fuse(Fuse::Second);
        assert_eq!((c.cid(), c.nsid(), c.slba(), c.nlb(), c.fuse()), (42, 1, 100, 2, Fuse::Second));
        assert_eq!(c.direction(), DataDirection::HostToController);
        c.set_sgl(0, 4096, sgl::TRANSPORT);
        assert_eq!((c.0[1] >> 6, c.fuse()), (1, Fuse::Second), "PSDT set, fuse bits kept");
        assert_eq!(Command::new(io::READ, 0).direction(), DataDirection::ControllerToHost);
    }
}
