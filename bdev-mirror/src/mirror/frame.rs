//! The replication link's wire format: a 48-byte header (magic, kind, operation, flags, sequence
//! number, offset, 64-bit length, status, payload length, lane barrier count, CRC32C of the
//! header), the payload's
//! CRC32C, and the payload. Parsing never panics and checks both checksums; a bad frame ends the
//! link (it reconnects), it is never applied.

use crate::{IoBuf, IoBufPool};
use std::fmt;

pub const MAGIC: u32 = 0x5244_4d4e; // "NMDR" little-endian: nvmetro mirror
pub const HEADER: usize = 48;
/// Largest payload accepted (a 1 MiB resync chunk plus an expected image for compare-and-write).
pub const MAX_PAYLOAD: usize = 2 << 20;

/// What a frame asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Both sides, on connect: site id and generation identifiers (payload: [`Hello`]).
    Hello = 1,
    /// Preferred to secondary: apply this operation, in order, and acknowledge.
    Replicate = 2,
    /// Secondary to preferred: the operation is applied.
    ReplicateAck = 3,
    /// Secondary to preferred: execute this host operation for me (it is ordered there).
    Forward = 4,
    /// Preferred to secondary: the forwarded operation's result; on success the secondary
    /// applies its copy before completing.
    ForwardDone = 5,
    /// Preferred to secondary: resync data for a dirty region.
    Resync = 6,
    ResyncAck = 7,
    Ping = 8,
    Pong = 9,
    /// Sync target to source, after Hello: its own dirty bitmap (payload: little-endian words),
    /// which the source adds to what it sends.
    Bitmap = 10,
    /// Metro mode, both ways: witness reachability and pre-election (`arg`: see
    /// [`crate::mirror::core`]).
    Witness = 11,
    /// Either way: the sender's leg failed I/O and is now `Failed` (durably, and fenced);
    /// `arg`: the status code, `offset`/`len`: the byte range that failed.
    Failed = 12,
    /// Sync source to target, once it knows what it will send: `offset` = the bytes to copy
    /// (so the target shows the resync's progress too).
    ResyncPlan = 13,
    /// Metro mode, both ways: a planned switchover or a planned departure (`arg`: see
    /// [`crate::mirror::core`]; a refusal carries its reason as the payload).
    Switchover = 14,
    /// Driver to driver on a link of several lanes (see [`crate::mirror::lanes`]; never reaches
    /// the core, not counted in barriers): `arg` 0, on lane 0, announces the lanes the sender
    /// wants (`offset`) and, from the acceptor, the link's session (`seq`); `arg` k > 0 is the
    /// first frame on lane k and names the session it joins.
    Lane = 15,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Replicate,
            3 => Kind::ReplicateAck,
            4 => Kind::Forward,
            5 => Kind::ForwardDone,
            6 => Kind::Resync,
            7 => Kind::ResyncAck,
            8 => Kind::Ping,
            9 => Kind::Pong,
            10 => Kind::Bitmap,
            11 => Kind::Witness,
            12 => Kind::Failed,
            13 => Kind::ResyncPlan,
            14 => Kind::Switchover,
            15 => Kind::Lane,
            _ => return None,
        })
    }
}

/// The operation a Replicate or Forward frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum OpCode {
    None = 0,
    Write = 1,
    WriteZeroes = 2,
    Deallocate = 3,
    Flush = 4,
    /// Payload: expected image then new data, `len` bytes each.
    CompareAndWrite = 5,
    /// Forwarded by a leg serving through its peer: the ForwardDone carries the data.
    Read = 6,
    /// Forwarded by a leg serving through its peer; payload: the expected image.
    Compare = 7,
}

impl OpCode {
    fn from_u8(v: u8) -> Option<OpCode> {
        Some(match v {
            0 => OpCode::None,
            1 => OpCode::Write,
            2 => OpCode::WriteZeroes,
            3 => OpCode::Deallocate,
            4 => OpCode::Flush,
            5 => OpCode::CompareAndWrite,
            6 => OpCode::Read,
            7 => OpCode::Compare,
            _ => return None,
        })
    }
}

/// Result codes carried in acknowledgements.
pub mod status {
    pub const OK: u32 = 0;
    pub const MISCOMPARE: u32 = 1;
    pub const IO_ERROR: u32 = 2;
    pub const NO_SPACE: u32 = 3;
    pub const OUT_OF_RANGE: u32 = 4;
    /// The preferred site cannot serve (it is fenced or resyncing as a target).
    pub const NOT_SERVING: u32 = 5;
}

/// Frame flags.
pub mod flags {
    /// A write the host sent with Force Unit Access: durable on the peer before it is acknowledged.
    pub const FUA: u8 = 1;
}

#[derive(Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub op: OpCode,
    /// [`flags`].
    pub flags: u8,
    pub seq: u64,
    pub offset: u64,
    /// Bytes the operation covers (for zeroes and deallocate, the payload is empty).
    pub len: u64,
    /// Status in acknowledgements.
    pub arg: u32,
    /// On a link of several lanes, the count of frames of the other class sent before this one
    /// (see [`super::lanes`]); zero otherwise.
    pub barrier: u32,
    /// Shared, not copied: a replicated write's frame holds the same bytes as its local write.
    pub payload: IoBuf,
}

impl fmt::Debug for Frame {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Frame({:?} {:?} seq={} off={} len={} arg={} payload={}B)",
            self.kind,
            self.op,
            self.seq,
            self.offset,
            self.len,
            self.arg,
            self.payload.len()
        )
    }
}

impl Frame {
    pub fn new(kind: Kind, seq: u64) -> Frame {
        Frame { kind, op: OpCode::None, flags: 0, seq, offset: 0, len: 0, arg: 0, barrier: 0, payload: IoBuf::empty() }
    }

    /// The whole frame, header and payload, appended to `out` (a copy of the payload).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.encode_header());
        out.extend_from_slice(&self.payload);
    }

    /// The bytes before the payload (header and payload checksum): a sender writes them and then
    /// the payload from where it is, without copying it.
    pub fn encode_header(&self) -> [u8; HEADER + 4] {
        let mut h = [0u8; HEADER + 4];
        h[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        h[4] = self.kind as u8;
        h[5] = self.op as u8;
        h[6] = self.flags;
        h[8..16].copy_from_slice(&self.seq.to_le_bytes());
        h[16..24].copy_from_slice(&self.offset.to_le_bytes());
        h[24..32].copy_from_slice(&self.len.to_le_bytes());
        h[32..36].copy_from_slice(&self.arg.to_le_bytes());
        let plen = self.payload.len() as u32;
        h[36..40].copy_from_slice(&plen.to_le_bytes());
        h[40..44].copy_from_slice(&self.barrier.to_le_bytes());
        let hcrc = crc32c::crc32c(&h[..44]);
        h[44..48].copy_from_slice(&hcrc.to_le_bytes());
        h[HEADER..].copy_from_slice(&crc32c::crc32c(&self.payload).to_le_bytes());
        h
    }

    /// Parses one frame from the front of `buf`: `Ok(None)` until it is complete. The payload is
    /// copied into memory of its own.
    pub fn parse(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        Frame::parse_into(buf, None)
    }

    /// [`Frame::parse`], copying the payload into a buffer from `pool` (when given).
    pub fn parse_into(buf: &[u8], pool: Option<&IoBufPool>) -> Result<Option<(Frame, usize)>, FrameError> {
        if buf.len() < HEADER {
            return Ok(None);
        }
        let u32at = |o: usize| u32::from_le_bytes(buf[o..o + 4].try_into().expect("4 bytes"));
        let u64at = |o: usize| u64::from_le_bytes(buf[o..o + 8].try_into().expect("8 bytes"));
        if u32at(0) != MAGIC {
            return Err(FrameError::BadMagic);
        }
        if crc32c::crc32c(&buf[..44]) != u32at(44) {
            return Err(FrameError::HeaderChecksum);
        }
        if buf[7] != 0 {
            return Err(FrameError::Reserved);
        }
        let kind = Kind::from_u8(buf[4]).ok_or(FrameError::UnknownKind(buf[4]))?;
        let op = OpCode::from_u8(buf[5]).ok_or(FrameError::UnknownOp(buf[5]))?;
        let plen = u32at(36) as usize;
        if plen > MAX_PAYLOAD {
            return Err(FrameError::TooLarge(plen));
        }
        let total = HEADER + 4 + plen;
        if buf.len() < total {
            return Ok(None);
        }
        let payload = &buf[HEADER + 4..total];
        if crc32c::crc32c(payload) != u32at(HEADER) {
            return Err(FrameError::PayloadChecksum);
        }
        let payload = match pool {
            Some(pool) if !payload.is_empty() => pool.copy_of(payload),
            _ => IoBuf::from(payload),
        };
        let frame = Frame {
            kind,
            op,
            flags: buf[6],
            seq: u64at(8),
            offset: u64at(16),
            len: u64at(24),
            arg: u32at(32),
            barrier: u32at(40),
            payload,
        };
        Ok(Some((frame, total)))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("bad magic: not an nvmetro replication link")]
    BadMagic,
    #[error("header checksum mismatch")]
    HeaderChecksum,
    #[error("payload checksum mismatch")]
    PayloadChecksum,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("unknown operation {0}")]
    UnknownOp(u8),
    #[error("payload of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("reserved header byte is not zero")]
    Reserved,
}

/// What a site's software understands beyond the first release's protocol, advertised in its
/// Hello (byte 4, zero from older sites): a leg sends a peer only what the peer understands (an
/// older site resets the link on an unknown frame kind).
pub mod caps {
    /// [`super::Kind::Switchover`] frames: planned switchover and planned departure.
    pub const SWITCHOVER: u8 = 1;
    /// Pre-election deferrals carry their count and releases echo it (see `mirror::core`).
    pub const RELEASE_ECHO: u8 = 2;
    /// Barrier counts in frames, [`super::Kind::Lane`] frames, and links of several lanes
    /// ([`crate::mirror::lanes`]).
    pub const LANES: u8 = 4;
    /// Everything this build understands.
    pub const ALL: u8 = SWITCHOVER | RELEASE_ECHO | LANES;
}

/// The Hello payload: who a site is and what its data descends from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub site: u8,
    pub preferred: bool,
    /// [`caps`] the sender understands.
    pub caps: u8,
    /// This leg orders writes because an operator's switchover made it (see
    /// [`crate::mirror::meta::Meta::switched`]): a reconnection in sync keeps it ordering.
    pub orders: bool,
    pub generations: crate::mirror::meta::Generations,
    pub disk: crate::mirror::DiskState,
    pub size: u64,
}

impl Hello {
    pub fn to_payload(&self) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = self.site;
        p[1] = self.preferred as u8;
        p[2] = self.disk as u8;
        p[3] = self.orders as u8;
        p[4] = self.caps;
        p[8..16].copy_from_slice(&self.generations.current.to_le_bytes());
        p[16..24].copy_from_slice(&self.generations.bitmap.to_le_bytes());
        p[24..32].copy_from_slice(&self.generations.history.to_le_bytes());
        p[32..40].copy_from_slice(&self.size.to_le_bytes());
        p
    }

    pub fn from_payload(p: &[u8]) -> Option<Hello> {
        if p.len() < 40 {
            return None;
        }
        let u64at = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().expect("8 bytes"));
        Some(Hello {
            site: p[0],
            preferred: p[1] != 0,
            orders: p[3] != 0,
            caps: p[4],
            disk: crate::mirror::DiskState::from_u8(p[2])?,
            generations: crate::mirror::meta::Generations { current: u64at(8), bitmap: u64at(16), history: u64at(24) },
            size: u64at(32),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_hello_carries_the_switchover_role_and_switchover_frames_parse() {
        let hello = Hello {
            site: 2,
            preferred: false,
            orders: true,
            caps: caps::ALL,
            generations: crate::mirror::meta::Generations { current: 5, bitmap: 3, history: 1 },
            disk: crate::mirror::DiskState::UpToDate,
            size: 1 << 20,
        };
        assert_eq!(Hello::from_payload(&hello.to_payload()), Some(hello));
        // A peer from before the switchover sends 0 there: it orders by configuration only.
        let mut old = hello.to_payload();
        old[3] = 0;
        old[4] = 0;
        let old = Hello::from_payload(&old).unwrap();
        assert!(!old.orders);
        assert_eq!(old.caps, 0, "an older peer advertises nothing: it gets no Switchover frame");
        let mut f = Frame::new(Kind::Switchover, 0);
        f.arg = 2;
        f.payload = b"why".to_vec().into();
        let mut b = Vec::new();
        f.encode(&mut b);
        assert_eq!(Frame::parse(&b).unwrap(), Some((f, b.len())));
    }

    #[test]
    fn round_trip_and_damage() {
        let f = Frame {
            kind: Kind::Replicate,
            op: OpCode::Write,
            flags: flags::FUA,
            seq: 9,
            offset: 4096,
            len: 512,
            arg: 0,
            barrier: 0xfeed_0001,
            payload: vec![5; 512].into(),
        };
        let mut b = Vec::new();
        f.encode(&mut b);
        assert_eq!(Frame::parse(&b).unwrap(), Some((f.clone(), b.len())));
        for cut in 0..b.len() {
            assert_eq!(Frame::parse(&b[..cut]).unwrap(), None);
        }
        let mut bad = b.clone();
        bad[10] ^= 1;
        assert_eq!(Frame::parse(&bad), Err(FrameError::HeaderChecksum));
        let mut bad = b.clone();
        bad[100] ^= 1;
        assert_eq!(Frame::parse(&bad), Err(FrameError::PayloadChecksum));
        assert_eq!(Frame::parse(&[0u8; 64]), Err(FrameError::BadMagic));
        // Lengths beyond 4 GiB (Write Zeroes, Deallocate) survive the link.
        let mut big = Frame::new(Kind::Replicate, 1);
        big.op = OpCode::Deallocate;
        big.len = 5 << 30;
        let mut b = Vec::new();
        big.encode(&mut b);
        assert_eq!(Frame::parse(&b).unwrap().unwrap().0.len, 5 << 30);
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Frame::parse(&bytes);
        }
    }
}
