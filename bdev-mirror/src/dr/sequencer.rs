//! The production side of a consistency group's DR stream, without I/O.
//!
//! Every host write of any member gets the group's next sequence number and an epoch
//! ([`super`] explains epochs). The sequencer keeps each write until the DR site acknowledges it
//! durable, so a connection that drops loses nothing: the next one resends from what the DR site
//! says it holds. What it keeps is bounded by `buffer_limit` bytes; in [`DrMode::Async`] a write
//! is released to its host as soon as it is queued, and a write that finds the buffer full waits
//! (in order) until acknowledgements make room: backpressure, never loss. In [`DrMode::Sync`]
//! a write is released when the DR site acknowledges it.
//!
//! Long-throw ([`Sequencer::set_journal`]): a write that finds the buffer full is queued in a
//! journal (the caller keeps its bytes in a file at the position [`SeqOutput::Spill`] names) and
//! released at once; when the journal is full too, the write is not numbered at all
//! ([`SeqOutput::Overflow`]): released, its range left for the caller to copy again later. Host
//! writes then never wait, and the DR image is not consistent past the last write numbered
//! before the first overflow until that catch-up ends.
//!
//! The caller reports when each released write completed to its host
//! ([`Sequencer::host_completed`]): the next write submitted after that starts a new epoch.

use super::frame::DrFrame;
use super::{DrMode, Member};
use std::collections::VecDeque;

/// Why the sequencer refused an input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeqError {
    #[error("a {0}-byte write exceeds the DR frame's {max} bytes: split it", max = super::frame::MAX_PAYLOAD)]
    TooLarge(usize),
    #[error("the DR site holds through {applied} but had acknowledged {acked}: its state was lost or restored; it needs a full resync")]
    DrBehind { applied: u64, acked: u64 },
    #[error("the DR site holds through {applied}, beyond the last write numbered here ({last}): numbers were reused after a restart; it needs a full resync")]
    DrAhead { applied: u64, last: u64 },
}

/// What the sequencer asks of its caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeqOutput {
    /// Send this frame to the DR site (only while connected).
    Send(DrFrame),
    /// The DR stream no longer holds back this host write (its host may get its completion once
    /// the local legs have it too).
    Release(u64),
    /// Long-throw: keep `data` in the journal at logical position `at` (a ring of the journal's
    /// size: `at % size`, wrapping at its end) until it is sent and acknowledged; it is write
    /// `seq`.
    Spill { seq: u64, at: u64, data: Vec<u8> },
    /// Send write `seq`, whose bytes are the `len` at journal position `at`.
    SendSpilled { seq: u64, epoch: u64, member: Member, offset: u64, at: u64, len: u64 },
    /// Long-throw, buffer and journal full: this write was not numbered (and is released); its
    /// range must reach the DR site by a later copy, and an image holding any write after
    /// `after` is not consistent until that copy ends.
    Overflow { tag: u64, member: Member, offset: u64, len: u64, after: u64 },
}

/// How far the DR image is behind the production site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RecoveryPoint {
    /// Host writes not yet durable at the DR site.
    pub writes: u64,
    pub bytes: u64,
    /// Age of the oldest write not yet durable at the DR site (0 when none).
    pub age_ms: u64,
}

#[derive(Debug)]
struct Held {
    tag: u64,
    seq: u64,
    /// Its Write frame.
    frame: DrFrame,
    len: u64,
    at_ms: u64,
    released: bool,
    /// Its bytes are in the journal at this position (the frame carries none).
    spilled: Option<u64>,
}

#[derive(Debug)]
pub struct Sequencer {
    mode: DrMode,
    buffer_limit: u64,
    /// Writes sent or to send, not yet acknowledged, in sequence order.
    held: VecDeque<Held>,
    held_bytes: u64,
    /// Writes that found the buffer full, in submission order: (tag, member, offset, data, when).
    waiting: VecDeque<(u64, Member, u64, Vec<u8>, u64)>,
    next_seq: u64,
    epoch: u64,
    /// A write was released to its host since the current epoch began.
    completed_in_epoch: bool,
    /// The highest sequence durable at the DR site.
    acked: u64,
    /// Connected, and the first unsent write's index in `held`.
    connected: bool,
    /// A connection saw this sequencer's numbers (they can no longer change).
    ever_connected: bool,
    unsent: usize,
    /// Long-throw: the journal's size in bytes.
    journal: Option<u64>,
    /// Bytes of held writes in the journal, and the next journal position.
    spilled_bytes: u64,
    journal_tail: u64,
}

impl Sequencer {
    /// `acked`: the highest sequence the DR site had made durable (0 for a new group).
    pub fn new(mode: DrMode, buffer_limit: u64, acked: u64) -> Sequencer {
        Sequencer {
            mode,
            buffer_limit: buffer_limit.max(1),
            held: VecDeque::new(),
            held_bytes: 0,
            waiting: VecDeque::new(),
            next_seq: acked + 1,
            epoch: 1,
            completed_in_epoch: false,
            acked,
            connected: false,
            unsent: 0,
            ever_connected: false,
            journal: None,
            spilled_bytes: 0,
            journal_tail: 0,
        }
    }

    /// Long-throw with a journal of `size` bytes (0: overflow as soon as the buffer is full);
    /// `None`: short-throw (writes wait for room). Writes in the journal stay there.
    pub fn set_journal(&mut self, size: Option<u64>, out: &mut Vec<SeqOutput>) {
        self.journal = size;
        if size.is_some() {
            // Nothing waits in long-throw: what waited goes to the journal or overflows.
            for (tag, member, offset, data, at) in std::mem::take(&mut self.waiting) {
                self.place(tag, member, offset, data, at, out);
            }
        }
    }

    /// Writes submitted and not numbered yet (short-throw: waiting for room).
    pub fn waiting_writes(&self) -> u64 {
        self.waiting.len() as u64
    }

    /// Bytes of held writes in the journal.
    pub fn spilled_bytes(&self) -> u64 {
        self.spilled_bytes
    }

    pub fn set_mode(&mut self, mode: DrMode, out: &mut Vec<SeqOutput>) {
        self.mode = mode;
        self.release_queued(out);
    }

    /// A host write to `member` (its data as the host sent it), at `now_ms`; at most
    /// [`MAX_PAYLOAD`](super::frame::MAX_PAYLOAD) bytes.
    pub fn submit(
        &mut self,
        tag: u64,
        member: Member,
        offset: u64,
        data: Vec<u8>,
        now_ms: u64,
        out: &mut Vec<SeqOutput>,
    ) -> Result<(), SeqError> {
        if data.len() > super::frame::MAX_PAYLOAD {
            return Err(SeqError::TooLarge(data.len()));
        }
        if self.journal.is_none() && (!self.waiting.is_empty() || !self.has_room(data.len() as u64)) {
            self.waiting.push_back((tag, member, offset, data, now_ms));
            return Ok(());
        }
        self.place(tag, member, offset, data, now_ms, out);
        Ok(())
    }

    /// In the buffer if it has room; otherwise (long-throw) in the journal, or overflowed.
    fn place(&mut self, tag: u64, member: Member, offset: u64, data: Vec<u8>, now_ms: u64, out: &mut Vec<SeqOutput>) {
        let len = data.len() as u64;
        if self.has_room(len) {
            return self.admit(tag, member, offset, data, now_ms, out);
        }
        match self.journal {
            Some(size) if self.spilled_bytes + len <= size => {
                let at = self.journal_tail;
                self.journal_tail += len;
                self.spilled_bytes += len;
                out.push(SeqOutput::Spill { seq: self.next_seq, at, data });
                self.number(tag, member, offset, Vec::new(), len, Some(at), now_ms, out);
            }
            Some(_) if self.mode == DrMode::Async => {
                out.push(SeqOutput::Release(tag));
                out.push(SeqOutput::Overflow { tag, member, offset, len, after: self.next_seq - 1 });
            }
            // Sync mode never releases what the DR site does not hold: it waits.
            _ => self.waiting.push_back((tag, member, offset, data, now_ms)),
        }
    }

    /// A copy's checksum of `len` bytes at `offset` of `member`, numbered like a write (it is
    /// compared at the DR site in the group's order) and released at once (it is no host's).
    /// It takes no room in the buffer: the copy that sends it bounds how many are in flight.
    pub fn submit_sum(&mut self, tag: u64, member: Member, offset: u64, len: u64, crc: u32, now_ms: u64, out: &mut Vec<SeqOutput>) {
        self.number_small(tag, |seq, epoch| DrFrame::Sum { seq, epoch, member, offset, len, crc }, true, now_ms, out);
    }

    /// A host's Write Zeroes or Deallocate of `len` bytes: numbered like a write and released
    /// by the mode, but sent as one small frame whatever its length (it takes no room).
    pub fn submit_zeroes(&mut self, tag: u64, member: Member, offset: u64, len: u64, now_ms: u64, out: &mut Vec<SeqOutput>) {
        let release = self.mode == DrMode::Async;
        self.number_small(tag, |seq, epoch| DrFrame::Zero { seq, epoch, member, offset, len }, release, now_ms, out);
    }

    fn number_small(&mut self, tag: u64, frame: impl FnOnce(u64, u64) -> DrFrame, released: bool, now_ms: u64, out: &mut Vec<SeqOutput>) {
        if self.completed_in_epoch {
            self.epoch += 1;
            self.completed_in_epoch = false;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.held.push_back(Held { tag, seq, frame: frame(seq, self.epoch), len: 0, at_ms: now_ms, released, spilled: None });
        if released {
            out.push(SeqOutput::Release(tag));
        }
        self.send_unsent(out);
    }

    /// A write this sequencer released has completed to its host: writes submitted from now on
    /// may depend on it.
    pub fn host_completed(&mut self, _tag: u64) {
        self.completed_in_epoch = true;
    }

    /// The DR site holds everything through `seq` durably.
    pub fn on_ack(&mut self, seq: u64, out: &mut Vec<SeqOutput>) {
        while self.held.front().is_some_and(|h| h.seq <= seq) {
            let h = self.held.pop_front().expect("front");
            match h.spilled {
                Some(_) => self.spilled_bytes -= h.len,
                None => self.held_bytes -= h.len,
            }
            self.unsent = self.unsent.saturating_sub(1);
            if !h.released {
                out.push(SeqOutput::Release(h.tag));
            }
        }
        self.acked = self.acked.max(seq);
        self.admit_waiting(out);
    }

    /// A new send buffer size, live: a larger one admits waiting writes at once; a smaller one
    /// holds new writes until acknowledgements bring the buffer under it.
    pub fn set_buffer_limit(&mut self, limit: u64, out: &mut Vec<SeqOutput>) {
        self.buffer_limit = limit.max(1);
        self.admit_waiting(out);
    }

    fn admit_waiting(&mut self, out: &mut Vec<SeqOutput>) {
        while let Some((_, _, _, data, _)) = self.waiting.front() {
            if !self.has_room(data.len() as u64) {
                break;
            }
            let (tag, member, offset, data, at) = self.waiting.pop_front().expect("front");
            self.admit(tag, member, offset, data, at, out);
        }
    }

    /// A connection to the DR site said hello: it holds everything through `applied_seq`.
    /// Everything after it is sent (again) in order. A DR site that holds less than it
    /// acknowledged, or more than was ever numbered here, is refused (the connection ends).
    pub fn connected(&mut self, applied_seq: u64, out: &mut Vec<SeqOutput>) -> Result<(), SeqError> {
        if applied_seq < self.acked {
            return Err(SeqError::DrBehind { applied: applied_seq, acked: self.acked });
        }
        if applied_seq >= self.next_seq {
            return Err(SeqError::DrAhead { applied: applied_seq, last: self.next_seq - 1 });
        }
        self.on_ack(applied_seq, out);
        self.connected = true;
        self.ever_connected = true;
        self.unsent = 0;
        self.send_unsent(out);
        Ok(())
    }

    /// Moves every number given so far to go on after `base` instead of after the last
    /// acknowledged one: a stream taken over continues after what the DR site holds, and the
    /// writes numbered while it was not yet connected keep their order. Refused (false) once a
    /// connection has seen the numbers, or for a `base` below the acknowledged sequence (none);
    /// otherwise how far every number moved.
    pub fn renumber_after(&mut self, base: u64) -> Option<u64> {
        if self.ever_connected || base < self.acked {
            return None;
        }
        let delta = base - self.acked;
        self.acked = base;
        self.next_seq += delta;
        for h in self.held.iter_mut() {
            h.seq += delta;
            if let DrFrame::Write { seq, .. } | DrFrame::Sum { seq, .. } | DrFrame::Zero { seq, .. } = &mut h.frame {
                *seq += delta;
            }
        }
        Some(delta)
    }

    pub fn disconnected(&mut self) {
        self.connected = false;
        self.unsent = 0;
    }

    /// The highest sequence numbered so far (0 when none).
    pub fn last_numbered(&self) -> u64 {
        self.next_seq - 1
    }

    /// The highest sequence the DR site holds durably (to persist beside the group's metadata).
    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn recovery_point(&self, now_ms: u64) -> RecoveryPoint {
        let waiting_bytes: u64 = self.waiting.iter().map(|w| w.3.len() as u64).sum();
        let oldest = self.held.front().map(|h| h.at_ms).or(self.waiting.front().map(|w| w.4));
        RecoveryPoint {
            writes: (self.held.len() + self.waiting.len()) as u64,
            bytes: self.held_bytes + self.spilled_bytes + waiting_bytes,
            age_ms: oldest.map_or(0, |t| now_ms.saturating_sub(t)),
        }
    }

    /// Bytes held for the DR site (never above the buffer limit but for one oversized write).
    pub fn buffered_bytes(&self) -> u64 {
        self.held_bytes
    }

    fn has_room(&self, len: u64) -> bool {
        // A write larger than the whole buffer goes alone, when the buffer is empty.
        self.held_bytes + len <= self.buffer_limit || self.held.is_empty()
    }

    fn admit(&mut self, tag: u64, member: Member, offset: u64, data: Vec<u8>, now_ms: u64, out: &mut Vec<SeqOutput>) {
        let len = data.len() as u64;
        self.held_bytes += len;
        self.number(tag, member, offset, data, len, None, now_ms, out);
    }

    /// Numbers a write (its bytes in `data`, or in the journal at `spilled`) and holds it.
    #[allow(clippy::too_many_arguments)]
    fn number(
        &mut self,
        tag: u64,
        member: Member,
        offset: u64,
        data: Vec<u8>,
        len: u64,
        spilled: Option<u64>,
        now_ms: u64,
        out: &mut Vec<SeqOutput>,
    ) {
        if self.completed_in_epoch {
            self.epoch += 1;
            self.completed_in_epoch = false;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        // Long-throw releases what the journal holds too: hosts never wait there.
        let released = self.mode == DrMode::Async;
        self.held.push_back(Held {
            tag,
            seq,
            frame: DrFrame::Write { seq, epoch: self.epoch, member, offset, data },
            len,
            at_ms: now_ms,
            released,
            spilled,
        });
        if released {
            out.push(SeqOutput::Release(tag));
        }
        self.send_unsent(out);
    }

    /// Switching to async releases what sync mode held back.
    fn release_queued(&mut self, out: &mut Vec<SeqOutput>) {
        if self.mode == DrMode::Async {
            for h in self.held.iter_mut().filter(|h| !h.released) {
                h.released = true;
                out.push(SeqOutput::Release(h.tag));
            }
        }
    }

    fn send_unsent(&mut self, out: &mut Vec<SeqOutput>) {
        if !self.connected {
            return;
        }
        while let Some(h) = self.held.get(self.unsent) {
            match (h.spilled, &h.frame) {
                (Some(at), DrFrame::Write { seq, epoch, member, offset, .. }) => {
                    out.push(SeqOutput::SendSpilled { seq: *seq, epoch: *epoch, member: *member, offset: *offset, at, len: h.len })
                }
                _ => out.push(SeqOutput::Send(h.frame.clone())),
            }
            self.unsent += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sends(out: &[SeqOutput]) -> Vec<(u64, u64)> {
        out.iter()
            .filter_map(|o| match o {
                SeqOutput::Send(DrFrame::Write { seq, epoch, .. }) => Some((*seq, *epoch)),
                _ => None,
            })
            .collect()
    }

    fn released(out: &[SeqOutput]) -> Vec<u64> {
        out.iter().filter_map(|o| if let SeqOutput::Release(t) = o { Some(*t) } else { None }).collect()
    }

    #[test]
    fn numbers_given_before_any_connection_move_after_a_taken_over_base_and_never_after() {
        let mut s = Sequencer::new(DrMode::Async, 1 << 20, 100);
        let mut out = Vec::new();
        s.submit(1, 0, 0, vec![1; 512], 0, &mut out).unwrap();
        s.submit_sum(2, 0, 4096, 4096, 7, 0, &mut out);
        assert_eq!(s.renumber_after(99), None, "below the acknowledged sequence");
        assert_eq!(s.renumber_after(5000), Some(4900));
        assert_eq!((s.acked(), s.last_numbered()), (5000, 5002));
        out.clear();
        s.connected(5000, &mut out).unwrap();
        let seqs: Vec<u64> = out
            .iter()
            .filter_map(|o| match o {
                SeqOutput::Send(DrFrame::Write { seq, .. } | DrFrame::Sum { seq, .. }) => Some(*seq),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, [5001, 5002], "in their order, after the new base");
        assert_eq!(s.renumber_after(9000), None, "a connection saw the numbers");
        assert_eq!(s.last_numbered(), 5002);
    }

    #[test]
    fn a_write_after_a_completion_starts_a_new_epoch() {
        let mut s = Sequencer::new(DrMode::Async, 1 << 20, 0);
        let mut out = Vec::new();
        s.connected(0, &mut out).unwrap();
        s.submit(1, 0, 0, vec![1; 512], 0, &mut out).unwrap();
        s.submit(2, 1, 0, vec![2; 512], 0, &mut out).unwrap();
        s.host_completed(1);
        s.submit(3, 1, 512, vec![3; 512], 0, &mut out).unwrap();
        s.submit(4, 0, 512, vec![4; 512], 0, &mut out).unwrap();
        assert_eq!(sends(&out), [(1, 1), (2, 1), (3, 2), (4, 2)]);
        assert_eq!(released(&out), [1, 2, 3, 4], "async: released once queued");
    }

    #[test]
    fn a_full_buffer_holds_new_writes_in_order_until_acks_make_room() {
        let mut s = Sequencer::new(DrMode::Async, 8192, 0);
        let mut out = Vec::new();
        for tag in 1..=4 {
            s.submit(tag, 0, tag * 4096, vec![0; 4096], 10, &mut out).unwrap();
        }
        assert_eq!(released(&out), [1, 2], "two fit in 8 KiB; the others wait");
        assert_eq!(s.buffered_bytes(), 8192);
        assert_eq!(s.recovery_point(30), RecoveryPoint { writes: 4, bytes: 16384, age_ms: 20 });
        out.clear();
        s.connected(0, &mut out).unwrap();
        assert_eq!(sends(&out), [(1, 1), (2, 1)], "not connected before: sent now");
        out.clear();
        s.on_ack(1, &mut out);
        assert_eq!(released(&out), [3]);
        assert_eq!(sends(&out), [(3, 1)]);
        out.clear();
        s.on_ack(3, &mut out);
        assert_eq!(released(&out), [4]);
        assert_eq!(s.recovery_point(40).writes, 1);
        s.on_ack(4, &mut out);
        assert_eq!(s.recovery_point(50), RecoveryPoint::default());
    }

    #[test]
    fn long_throw_spills_to_the_journal_then_overflows_and_never_holds_a_host_write() {
        let mut s = Sequencer::new(DrMode::Async, 4096, 0);
        let mut out = Vec::new();
        s.set_journal(Some(8192), &mut out);
        for tag in 1..=4 {
            s.submit(tag, 0, tag * 4096, vec![tag as u8; 4096], 0, &mut out).unwrap();
        }
        assert_eq!(released(&out), [1, 2, 3, 4], "nothing waits in long-throw");
        let spills: Vec<u64> = out.iter().filter_map(|o| if let SeqOutput::Spill { at, .. } = o { Some(*at) } else { None }).collect();
        assert_eq!(spills, [0, 4096], "writes 2 and 3 go to the journal");
        let overflows: Vec<u64> =
            out.iter().filter_map(|o| if let SeqOutput::Overflow { tag, .. } = o { Some(*tag) } else { None }).collect();
        assert_eq!(overflows, [4], "write 4 finds both full");
        assert_eq!((s.last_numbered(), s.buffered_bytes(), s.spilled_bytes()), (3, 4096, 8192));
        out.clear();
        s.connected(0, &mut out).unwrap();
        assert_eq!(sends(&out), [(1, 1)]);
        let spilled: Vec<(u64, u64)> =
            out.iter().filter_map(|o| if let SeqOutput::SendSpilled { seq, at, .. } = o { Some((*seq, *at)) } else { None }).collect();
        assert_eq!(spilled, [(2, 0), (3, 4096)], "journal writes are sent from the journal, in order");
        out.clear();
        s.on_ack(2, &mut out);
        assert_eq!((s.buffered_bytes(), s.spilled_bytes()), (0, 4096));
        s.submit(5, 0, 0, vec![5; 4096], 0, &mut out).unwrap();
        assert_eq!(sends(&out), [(4, 1)], "room in the buffer again: numbered after 3, in memory");
    }

    #[test]
    fn a_larger_buffer_set_live_admits_the_waiting_writes() {
        let mut s = Sequencer::new(DrMode::Async, 4096, 0);
        let mut out = Vec::new();
        for tag in 1..=3 {
            s.submit(tag, 0, tag * 4096, vec![0; 4096], 0, &mut out).unwrap();
        }
        assert_eq!(released(&out), [1]);
        out.clear();
        s.set_buffer_limit(8192, &mut out);
        assert_eq!(released(&out), [2], "room for one more");
        out.clear();
        s.set_buffer_limit(1 << 20, &mut out);
        assert_eq!(released(&out), [3]);
    }

    #[test]
    fn sync_mode_releases_on_the_ack_and_a_reconnect_resends_what_was_not_durable() {
        let mut s = Sequencer::new(DrMode::Sync, 1 << 20, 41);
        let mut out = Vec::new();
        s.connected(41, &mut out).unwrap();
        s.submit(1, 0, 0, vec![1; 512], 0, &mut out).unwrap();
        s.submit(2, 0, 512, vec![2; 512], 0, &mut out).unwrap();
        s.submit(3, 0, 1024, vec![3; 512], 0, &mut out).unwrap();
        assert_eq!(sends(&out), [(42, 1), (43, 1), (44, 1)], "sequences go on from what the DR site holds");
        assert!(released(&out).is_empty(), "sync: nothing released before the DR site has it");
        out.clear();
        s.on_ack(42, &mut out);
        assert_eq!(released(&out), [1]);
        s.disconnected();
        out.clear();
        s.connected(43, &mut out).unwrap();
        assert_eq!(released(&out), [2], "the hello acknowledges what the DR site holds");
        assert_eq!(sends(&out), [(44, 1)], "and what it lacks goes again");
        out.clear();
        s.set_mode(DrMode::Async, &mut out);
        assert_eq!(released(&out), [3], "switching to async releases what sync held back");
        assert_eq!(s.acked(), 43);
        s.disconnected();
        assert_eq!(s.connected(40, &mut out), Err(SeqError::DrBehind { applied: 40, acked: 43 }), "a DR site that lost state");
        assert_eq!(s.connected(45, &mut out), Err(SeqError::DrAhead { applied: 45, last: 44 }), "numbers reused");
        assert_eq!(
            s.submit(9, 0, 0, vec![0; super::super::frame::MAX_PAYLOAD + 1], 0, &mut out),
            Err(SeqError::TooLarge(super::super::frame::MAX_PAYLOAD + 1))
        );
    }
}
