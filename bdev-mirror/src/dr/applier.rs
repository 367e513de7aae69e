//! The DR side of a consistency group's stream, without I/O.
//!
//! Writes arrive in sequence order. Those of one epoch go to the members' disks as they arrive
//! (a write that overlaps an earlier one still in flight waits for it); a write of a later epoch
//! waits until every write before it has completed, the members are flushed and the applied
//! sequence is persisted. Only then is that sequence acknowledged, so what the production site
//! drops from its buffer is durable here, and a restart resumes from the persisted sequence
//! (writes after it are sent again and applied again, which is harmless: same data, same order).

use super::frame::DrFrame;
use super::Member;
use std::collections::VecDeque;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApplyOutput {
    /// Compare `len` bytes at `offset` of `member` with the production site's CRC32C `crc`;
    /// on a difference ask for the region's data; report [`Applier::write_done`] with `id`.
    Verify { id: u64, member: Member, offset: u64, len: u64, crc: u32 },
    /// Write zeroes over `len` bytes at `offset` of `member`; report [`Applier::write_done`].
    WriteZeroes { id: u64, member: Member, offset: u64, len: u64 },
    /// Write `data` at `offset` of `member`; report [`Applier::write_done`] with `id`.
    Write { id: u64, member: Member, offset: u64, data: Vec<u8> },
    /// Make every completed write durable on every member; report [`Applier::flush_done`].
    Flush,
    /// Record durably that everything through `seq` is applied; report [`Applier::persisted`].
    Persist { seq: u64 },
    /// Send this frame to the production site.
    Send(DrFrame),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Writes may be issued.
    Open,
    /// Waiting for a flush, then for the persisted sequence.
    Flushing,
    Persisting,
}

/// What a sequenced operation does to its range.
#[derive(Debug)]
enum Op {
    Write(Vec<u8>),
    /// A copy's checksum of the range as the production site had it.
    Sum {
        len: u64,
        crc: u32,
    },
    Zero {
        len: u64,
    },
}

impl Op {
    fn len(&self) -> u64 {
        match self {
            Op::Write(d) => d.len() as u64,
            Op::Sum { len, .. } | Op::Zero { len } => *len,
        }
    }
}

#[derive(Debug)]
pub struct Applier {
    /// Everything through this is durable here (persisted).
    applied: u64,
    /// Writes (and checksums) received and not yet issued, in order: (seq, epoch, member,
    /// offset, what).
    queued: VecDeque<(u64, u64, Member, u64, Op)>,
    /// Issued, not completed: (seq, member, offset, len).
    in_flight: Vec<(u64, Member, u64, u64)>,
    /// The epoch of the writes issued since the last flush.
    epoch: Option<u64>,
    /// A member's write or flush failed: the applier takes nothing more (the daemon restarts it
    /// from the persisted sequence once the disk is back).
    failed: Option<String>,
    /// The highest sequence issued.
    issued: u64,
    stage: Stage,
    /// The sequence the flush in progress covers.
    flushing: u64,
}

/// Why a frame from the production site was refused (the connection ends; what is durable stays).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApplyError {
    #[error("write {got} out of order: expected {expected}")]
    OutOfOrder { expected: u64, got: u64 },
    #[error("write {seq} goes back to epoch {epoch} after epoch {after}")]
    EpochBackwards { seq: u64, epoch: u64, after: u64 },
    #[error("the production site sent a {0} frame")]
    Unexpected(&'static str),
    #[error("a member's disk failed ({0}): nothing after the last durable epoch is acknowledged")]
    Disk(String),
}

impl Applier {
    /// `applied`: the sequence persisted by the last run (0 for a new group).
    pub fn new(applied: u64) -> Applier {
        Applier {
            applied,
            queued: VecDeque::new(),
            in_flight: Vec::new(),
            epoch: None,
            failed: None,
            issued: applied,
            stage: Stage::Open,
            flushing: 0,
        }
    }

    /// A new connection from the production site: say what is durable here (the production
    /// site keeps everything after it, and sends it again); writes not yet issued are dropped,
    /// writes issued are not applied a second time.
    /// `producer` names whose stream the image holds (0: none named yet).
    pub fn connected(&mut self, producer: u64, out: &mut Vec<ApplyOutput>) {
        self.queued.clear();
        out.push(ApplyOutput::Send(DrFrame::Hello { applied_seq: self.applied, producer }));
    }

    /// Nothing issued is outstanding and nothing waits for a flush or a store.
    pub fn idle(&self) -> bool {
        self.in_flight.is_empty() && self.stage == Stage::Open && self.issued == self.applied
    }

    /// The highest sequence persisted.
    pub fn applied(&self) -> u64 {
        self.applied
    }

    pub fn on_frame(&mut self, frame: DrFrame, out: &mut Vec<ApplyOutput>) -> Result<(), ApplyError> {
        if let Some(why) = &self.failed {
            return Err(ApplyError::Disk(why.clone()));
        }
        let (seq, epoch, member, offset, op) = match frame {
            DrFrame::Write { seq, epoch, member, offset, data } => (seq, epoch, member, offset, Op::Write(data)),
            DrFrame::Sum { seq, epoch, member, offset, len, crc } => (seq, epoch, member, offset, Op::Sum { len, crc }),
            DrFrame::Zero { seq, epoch, member, offset, len } => (seq, epoch, member, offset, Op::Zero { len }),
            DrFrame::Ack { .. } => return Err(ApplyError::Unexpected("Ack")),
            DrFrame::Hello { .. } => return Err(ApplyError::Unexpected("Hello")),
            DrFrame::CopyDone { .. } => return Err(ApplyError::Unexpected("CopyDone")),
            DrFrame::Promoted => return Err(ApplyError::Unexpected("Promoted")),
            DrFrame::Stopped => return Err(ApplyError::Unexpected("Stopped")),
            DrFrame::Gap { .. } => return Err(ApplyError::Unexpected("Gap")),
            DrFrame::Rebase { .. } => return Err(ApplyError::Unexpected("Rebase")),
            DrFrame::Resume { .. } => return Err(ApplyError::Unexpected("Resume")),
            DrFrame::Want { .. } => return Err(ApplyError::Unexpected("Want")),
        };
        let expected = self.last_received() + 1;
        if seq < expected {
            // Sent again after a reconnect, and already here.
            return Ok(());
        }
        if seq != expected {
            return Err(ApplyError::OutOfOrder { expected, got: seq });
        }
        let last_epoch = self.queued.back().map(|q| q.1).or(self.epoch).unwrap_or(0);
        if epoch < last_epoch {
            return Err(ApplyError::EpochBackwards { seq, epoch, after: last_epoch });
        }
        self.queued.push_back((seq, epoch, member, offset, op));
        self.pump(out);
        Ok(())
    }

    /// A write issued with `id` completed; an error stops the applier (see [`ApplyError::Disk`]).
    pub fn write_done(&mut self, id: u64, result: Result<(), String>, out: &mut Vec<ApplyOutput>) -> Result<(), ApplyError> {
        if let Err(why) = result {
            self.failed = Some(format!("write {id}: {why}"));
        }
        if let Some(why) = &self.failed {
            return Err(ApplyError::Disk(why.clone()));
        }
        if let Some(i) = self.in_flight.iter().position(|w| w.0 == id) {
            self.in_flight.swap_remove(i);
        }
        self.pump(out);
        Ok(())
    }

    /// The flush completed; an error stops the applier.
    pub fn flush_done(&mut self, result: Result<(), String>, out: &mut Vec<ApplyOutput>) -> Result<(), ApplyError> {
        if let Err(why) = result {
            self.failed = Some(format!("flush: {why}"));
        }
        if let Some(why) = &self.failed {
            return Err(ApplyError::Disk(why.clone()));
        }
        if self.stage == Stage::Flushing {
            self.stage = Stage::Persisting;
            out.push(ApplyOutput::Persist { seq: self.flushing });
        }
        Ok(())
    }

    pub fn persisted(&mut self, out: &mut Vec<ApplyOutput>) {
        if self.stage == Stage::Persisting {
            self.applied = self.flushing;
            self.stage = Stage::Open;
            self.epoch = None;
            out.push(ApplyOutput::Send(DrFrame::Ack { seq: self.applied }));
            self.pump(out);
        }
    }

    /// The highest sequence received (issued, queued or persisted).
    fn last_received(&self) -> u64 {
        self.queued.back().map_or(self.issued, |q| q.0)
    }

    fn pump(&mut self, out: &mut Vec<ApplyOutput>) {
        if self.stage != Stage::Open {
            return;
        }
        while let Some(&(_, epoch, member, offset, ref op)) = self.queued.front() {
            let len = op.len();
            let same_epoch = self.epoch.is_none_or(|e| e == epoch);
            let overlaps = self.in_flight.iter().any(|w| w.1 == member && w.2 < offset + len && offset < w.2 + w.3);
            if !same_epoch || overlaps {
                break;
            }
            let (seq, _, member, offset, op) = self.queued.pop_front().expect("front");
            self.issued = seq;
            self.epoch = Some(epoch);
            self.in_flight.push((seq, member, offset, len));
            out.push(match op {
                Op::Write(data) => ApplyOutput::Write { id: seq, member, offset, data },
                Op::Sum { len, crc } => ApplyOutput::Verify { id: seq, member, offset, len, crc },
                Op::Zero { len } => ApplyOutput::WriteZeroes { id: seq, member, offset, len },
            });
        }
        // Flush when the epoch can go no further (the next write is of a later epoch) or when
        // nothing more has arrived: everything issued is complete and not yet durable.
        let next_is_later = self.queued.front().is_some_and(|q| self.epoch.is_some_and(|e| q.1 != e));
        let idle = self.queued.is_empty();
        if self.in_flight.is_empty() && self.issued > self.applied && (next_is_later || idle) {
            self.stage = Stage::Flushing;
            self.flushing = self.issued;
            out.push(ApplyOutput::Flush);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(seq: u64, epoch: u64, member: Member, offset: u64) -> DrFrame {
        DrFrame::Write { seq, epoch, member, offset, data: vec![seq as u8; 512] }
    }

    #[test]
    fn a_checksum_is_compared_in_order_after_the_writes_it_overlaps() {
        let mut a = Applier::new(0);
        let mut out = Vec::new();
        a.on_frame(w(1, 1, 0, 0), &mut out).unwrap();
        a.on_frame(DrFrame::Sum { seq: 2, epoch: 1, member: 0, offset: 0, len: 4096, crc: 7 }, &mut out).unwrap();
        a.on_frame(DrFrame::Sum { seq: 3, epoch: 1, member: 1, offset: 0, len: 4096, crc: 9 }, &mut out).unwrap();
        let issued = |out: &[ApplyOutput]| -> Vec<u64> {
            out.iter()
                .filter_map(|o| match o {
                    ApplyOutput::Write { id, .. } | ApplyOutput::Verify { id, .. } => Some(*id),
                    _ => None,
                })
                .collect()
        };
        assert_eq!(issued(&out), [1], "the checksum over write 1 waits for it (and what follows, in order)");
        out.clear();
        a.write_done(1, Ok(()), &mut out).unwrap();
        assert_eq!(issued(&out), [2, 3]);
        assert!(out.contains(&ApplyOutput::Verify { id: 3, member: 1, offset: 0, len: 4096, crc: 9 }));
        a.write_done(2, Ok(()), &mut out).unwrap();
        a.write_done(3, Ok(()), &mut out).unwrap();
        assert!(out.contains(&ApplyOutput::Flush), "an epoch of writes and checksums ends with a flush");
    }

    fn writes(out: &[ApplyOutput]) -> Vec<u64> {
        out.iter().filter_map(|o| if let ApplyOutput::Write { id, .. } = o { Some(*id) } else { None }).collect()
    }

    #[test]
    fn an_epoch_is_durable_and_persisted_before_the_next_one_reaches_a_disk() {
        let mut a = Applier::new(0);
        let mut out = Vec::new();
        a.connected(0, &mut out);
        assert_eq!(out, [ApplyOutput::Send(DrFrame::Hello { applied_seq: 0, producer: 0 })]);
        out.clear();
        for f in [w(1, 1, 0, 0), w(2, 1, 1, 0), w(3, 2, 1, 512)] {
            a.on_frame(f, &mut out).unwrap();
        }
        assert_eq!(writes(&out), [1, 2], "epoch 1 goes out at once; epoch 2 waits");
        out.clear();
        a.write_done(2, Ok(()), &mut out).unwrap();
        assert!(out.is_empty(), "write 1 is still in flight: {out:?}");
        a.write_done(1, Ok(()), &mut out).unwrap();
        assert_eq!(out, [ApplyOutput::Flush]);
        out.clear();
        a.flush_done(Ok(()), &mut out).unwrap();
        assert_eq!(out, [ApplyOutput::Persist { seq: 2 }]);
        out.clear();
        a.persisted(&mut out);
        assert_eq!(out[0], ApplyOutput::Send(DrFrame::Ack { seq: 2 }));
        assert_eq!(writes(&out), [3], "epoch 2 only after epoch 1 is durable and recorded");
        assert_eq!(a.applied(), 2);
    }

    #[test]
    fn overlapping_writes_of_one_epoch_go_in_order_and_resent_writes_are_skipped() {
        let mut a = Applier::new(10);
        let mut out = Vec::new();
        a.on_frame(w(11, 1, 0, 0), &mut out).unwrap();
        a.on_frame(w(12, 1, 0, 256), &mut out).unwrap();
        assert_eq!(writes(&out), [11], "12 overlaps 11");
        out.clear();
        a.write_done(11, Ok(()), &mut out).unwrap();
        assert_eq!(writes(&out), [12]);
        a.on_frame(w(11, 1, 0, 0), &mut out).unwrap();
        assert_eq!(writes(&out), [12], "a write sent again is not applied twice");
        assert_eq!(a.on_frame(w(14, 1, 0, 0), &mut out), Err(ApplyError::OutOfOrder { expected: 13, got: 14 }));
        assert_eq!(a.on_frame(w(13, 0, 0, 0), &mut out), Err(ApplyError::EpochBackwards { seq: 13, epoch: 0, after: 1 }));
        assert_eq!(a.on_frame(DrFrame::Ack { seq: 1 }, &mut out), Err(ApplyError::Unexpected("Ack")));
        // A failed write: nothing more is taken, nothing more acknowledged.
        out.clear();
        assert!(matches!(a.write_done(12, Err("ENOSPC".into()), &mut out), Err(ApplyError::Disk(_))));
        assert!(matches!(a.on_frame(w(13, 1, 0, 4096), &mut out), Err(ApplyError::Disk(_))));
        assert!(!out.iter().any(|o| matches!(o, ApplyOutput::Send(DrFrame::Ack { .. }) | ApplyOutput::Persist { .. })), "{out:?}");
    }
}
