//! The DR stream's frames: `Resume`, `Write`, `Zero`, `Sum`, `CopyDone`, `Rebase` and `Gap`
//! (production to DR), `Ack`, `Hello`, `Want`, `Promoted` and `Stopped` (DR to production).
//!
//! Every frame is a 40-byte header (magic, kind, member, sequence, epoch, offset, payload length,
//! four reserved bytes) followed by the payload; integers are little-endian.

use super::Member;
use thiserror::Error;

const MAGIC: u32 = 0x4E56_4452; // "NVDR"
/// Bytes before a frame's payload.
pub const HEADER_LEN: usize = 40;
/// The largest payload a frame carries.
pub const MAX_PAYLOAD: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrFrame {
    /// One host write of the group, in the group's order.
    Write { seq: u64, epoch: u64, member: Member, offset: u64, data: Vec<u8> },
    /// Every write up to and including `seq` is durable at the DR site.
    Ack { seq: u64 },
    /// The DR site's first words on a connection: it holds everything through `applied_seq`,
    /// of the stream of producer `producer` (0: none named yet).
    Hello { applied_seq: u64, producer: u64 },
    /// The production site's answer to a `Hello` naming it: its stream goes on.
    Resume { producer: u64 },
    /// The full copy of every member ended with write `seq`: an image that holds it durably is
    /// consistent (before it, it was being copied, not crash-consistent).
    CopyDone { seq: u64 },
    /// The stream goes on after `seq` (above anything the DR site holds): writes numbered
    /// before a restart of the production site were lost with its send buffer, so the image is
    /// not consistent until the full copy that follows ends (`CopyDone`). Also how a producer
    /// takes the stream over from another (the other site of a metro pair after a failover):
    /// from then on the DR site takes the stream of `producer` only.
    Rebase { seq: u64, producer: u64 },
    /// DR site to production: this image was promoted and serves hosts; the stream is refused.
    Promoted,
    /// Long-throw overflow: writes after `seq` were not all numbered, so an image holding any
    /// of them is not consistent until the catch-up copy ends (`CopyDone`).
    Gap { seq: u64 },
    /// A copy's checksum (CRC32C) of `len` bytes at `offset` of `member`, in the group's order
    /// like a write: the DR site compares its own bytes there when it gets to it.
    Sum { seq: u64, epoch: u64, member: Member, offset: u64, len: u64, crc: u32 },
    /// DR site to production: the range differs here (after a `Sum`): send its data.
    Want { member: Member, offset: u64, len: u64 },
    /// A host's Write Zeroes or Deallocate of `len` bytes, in the group's order like a write.
    Zero { seq: u64, epoch: u64, member: Member, offset: u64, len: u64 },
    /// DR site to production: its image stopped taking writes (a member's disk or its state
    /// failed): the stream is refused until the DR site is repaired and restarted.
    Stopped,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("not a DR frame (magic {0:#010x})")]
    Magic(u32),
    #[error("unknown DR frame kind {0}")]
    Kind(u8),
    #[error("DR frame payload of {0} bytes exceeds {MAX_PAYLOAD}")]
    TooLong(usize),
    #[error("a {0} frame carries no payload, this one has {1} bytes")]
    UnexpectedPayload(&'static str, usize),
    #[error("a {0} frame carries {1} bytes, this one has {2}")]
    PayloadLength(&'static str, usize, usize),
}

impl DrFrame {
    /// Writes the frame; a payload is at most [`MAX_PAYLOAD`] (the sequencer refuses larger).
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut extra = [0u8; 12];
        let (kind, member, seq, epoch, offset, data): (u8, Member, u64, u64, u64, &[u8]) = match self {
            DrFrame::Write { seq, epoch, member, offset, data } => {
                assert!(data.len() <= MAX_PAYLOAD, "a DR frame payload of {} bytes", data.len());
                (1, *member, *seq, *epoch, *offset, data)
            }
            DrFrame::Ack { seq } => (2, 0, *seq, 0, 0, &[]),
            DrFrame::Hello { applied_seq, producer } => (3, 0, *applied_seq, *producer, 0, &[]),
            DrFrame::Resume { producer } => (12, 0, 0, *producer, 0, &[]),
            DrFrame::CopyDone { seq } => (4, 0, *seq, 0, 0, &[]),
            DrFrame::Rebase { seq, producer } => (5, 0, *seq, *producer, 0, &[]),
            DrFrame::Promoted => (6, 0, 0, 0, 0, &[]),
            DrFrame::Stopped => (11, 0, 0, 0, 0, &[]),
            DrFrame::Gap { seq } => (7, 0, *seq, 0, 0, &[]),
            DrFrame::Sum { seq, epoch, member, offset, len, crc } => {
                extra[..8].copy_from_slice(&len.to_le_bytes());
                extra[8..].copy_from_slice(&crc.to_le_bytes());
                (8, *member, *seq, *epoch, *offset, &extra[..])
            }
            DrFrame::Want { member, offset, len } => {
                extra[..8].copy_from_slice(&len.to_le_bytes());
                (9, *member, 0, 0, *offset, &extra[..8])
            }
            DrFrame::Zero { seq, epoch, member, offset, len } => {
                extra[..8].copy_from_slice(&len.to_le_bytes());
                (10, *member, *seq, *epoch, *offset, &extra[..8])
            }
        };
        out.extend_from_slice(&MAGIC.to_le_bytes());
        out.push(kind);
        out.push(0);
        out.extend_from_slice(&member.to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&epoch.to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(data);
    }

    /// A whole frame at the start of `buf` and its length; `None` while incomplete.
    pub fn parse(buf: &[u8]) -> Result<Option<(DrFrame, usize)>, FrameError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let u64_at = |at: usize| u64::from_le_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
        let magic = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes"));
        if magic != MAGIC {
            return Err(FrameError::Magic(magic));
        }
        let kind = buf[4];
        let member = u16::from_le_bytes([buf[6], buf[7]]);
        let seq = u64_at(8);
        let epoch = u64_at(16);
        let offset = u64_at(24);
        let len = u32::from_le_bytes(buf[32..36].try_into().expect("4 bytes")) as usize;
        if len > MAX_PAYLOAD {
            return Err(FrameError::TooLong(len));
        }
        let frame = match kind {
            1 => {
                if buf.len() < HEADER_LEN + len {
                    return Ok(None);
                }
                DrFrame::Write { seq, epoch, member, offset, data: buf[HEADER_LEN..HEADER_LEN + len].to_vec() }
            }
            2..=7 if len > 0 => {
                return Err(FrameError::UnexpectedPayload(
                    ["Ack", "Hello", "CopyDone", "Rebase", "Promoted", "Gap"][kind as usize - 2],
                    len,
                ))
            }
            2 => DrFrame::Ack { seq },
            3 => DrFrame::Hello { applied_seq: seq, producer: epoch },
            4 => DrFrame::CopyDone { seq },
            5 => DrFrame::Rebase { seq, producer: epoch },
            6 => DrFrame::Promoted,
            11 if len > 0 => return Err(FrameError::UnexpectedPayload("Stopped", len)),
            11 => DrFrame::Stopped,
            12 if len > 0 => return Err(FrameError::UnexpectedPayload("Resume", len)),
            12 => DrFrame::Resume { producer: epoch },
            7 => DrFrame::Gap { seq },
            8..=10 => {
                let (name, want) = [("Sum", 12), ("Want", 8), ("Zero", 8)][kind as usize - 8];
                if len != want {
                    return Err(FrameError::PayloadLength(name, want, len));
                }
                if buf.len() < HEADER_LEN + len {
                    return Ok(None);
                }
                let n = u64_at(HEADER_LEN);
                match kind {
                    8 => {
                        let crc = u32::from_le_bytes(buf[HEADER_LEN + 8..HEADER_LEN + 12].try_into().expect("4 bytes"));
                        DrFrame::Sum { seq, epoch, member, offset, len: n, crc }
                    }
                    9 => DrFrame::Want { member, offset, len: n },
                    _ => DrFrame::Zero { seq, epoch, member, offset, len: n },
                }
            }
            k => return Err(FrameError::Kind(k)),
        };
        Ok(Some((frame, HEADER_LEN + len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip_and_wait_for_their_whole_payload() {
        let w = DrFrame::Write { seq: 7, epoch: 3, member: 2, offset: (1 << 39) - 512, data: vec![5; 4096] };
        let mut b = Vec::new();
        w.encode(&mut b);
        DrFrame::Ack { seq: 9 }.encode(&mut b);
        DrFrame::CopyDone { seq: 11 }.encode(&mut b);
        assert_eq!(DrFrame::parse(&b[..HEADER_LEN + 100]), Ok(None));
        for f in [
            DrFrame::Sum { seq: 3, epoch: 2, member: 1, offset: 1 << 20, len: 1 << 20, crc: 0xdead_beef },
            DrFrame::Want { member: 1, offset: 4096, len: 1 << 20 },
            DrFrame::Hello { applied_seq: 7, producer: 0x1234_5678_9abc },
            DrFrame::Resume { producer: 99 },
            DrFrame::Rebase { seq: 70, producer: u64::MAX },
        ] {
            let mut one = Vec::new();
            f.encode(&mut one);
            assert_eq!(DrFrame::parse(&one), Ok(Some((f.clone(), one.len()))));
            assert_eq!(DrFrame::parse(&one[..one.len() - 1]), Ok(None));
        }
        let (f, n) = DrFrame::parse(&b).unwrap().unwrap();
        assert_eq!((f, n), (w, HEADER_LEN + 4096));
        assert_eq!(DrFrame::parse(&b[n..]), Ok(Some((DrFrame::Ack { seq: 9 }, HEADER_LEN))));
        assert_eq!(DrFrame::parse(&b[n + HEADER_LEN..]), Ok(Some((DrFrame::CopyDone { seq: 11 }, HEADER_LEN))));
    }

    #[test]
    fn bad_frames_are_errors_that_say_why() {
        let mut b = Vec::new();
        DrFrame::Hello { applied_seq: 1, producer: 2 }.encode(&mut b);
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert!(matches!(DrFrame::parse(&bad), Err(FrameError::Magic(_))));
        let mut bad = b.clone();
        bad[4] = 42;
        assert_eq!(DrFrame::parse(&bad), Err(FrameError::Kind(42)));
        let mut bad = b.clone();
        bad[34] = 0x20;
        assert_eq!(DrFrame::parse(&bad), Err(FrameError::TooLong(0x20 << 16)));
        let mut bad = b;
        bad[32] = 1;
        assert_eq!(DrFrame::parse(&bad), Err(FrameError::UnexpectedPayload("Hello", 1)));
    }

    proptest! {
        #[test]
        fn any_bytes_parse_to_a_frame_an_error_or_a_wait(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(Some((f, n))) = DrFrame::parse(&bytes) {
                prop_assert!(n <= bytes.len());
                let mut again = Vec::new();
                f.encode(&mut again);
                prop_assert_eq!(DrFrame::parse(&again), Ok(Some((f, again.len()))));
            }
        }

        #[test]
        fn writes_round_trip_whole_and_never_parse_cut_short(
            seq in any::<u64>(), epoch in any::<u64>(), member in any::<u16>(), offset in any::<u64>(),
            data in proptest::collection::vec(any::<u8>(), 0..3000), cut in any::<prop::sample::Index>(),
        ) {
            let w = DrFrame::Write { seq, epoch, member, offset, data };
            let mut b = Vec::new();
            w.encode(&mut b);
            prop_assert_eq!(DrFrame::parse(&b), Ok(Some((w, b.len()))));
            prop_assert_eq!(DrFrame::parse(&b[..cut.index(b.len())]), Ok(None));
        }
    }
}
