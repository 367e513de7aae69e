//! A replication link of several lanes (connections to the same peer), without I/O: which lane a
//! frame takes, the barrier count it carries, and the order in which the receiver hands frames
//! to the core.
//!
//! Lane 0 carries every control frame (Hello, pings, flushes, resync, witness, switchover...):
//! the core relies on their order among themselves and relative to the writes around them.
//! Replicated writes and their acknowledgements are *data* frames and may take any lane: they
//! may overtake each other (conflicting writes are range-locked at the ordering leg until both
//! legs hold them, so two writes in flight never overlap). `tests/sim.rs` runs its histories with
//! exactly that freedom (`lanes: true`) and finds no lost write and no two writers.
//!
//! What keeps data and control in order across lanes is a barrier count in each frame (header
//! bytes 40..44, a wrapping u32): a data frame carries the number of control frames sent before
//! it, a control frame the number of data frames sent before it. The receiver hands a frame on
//! only once it has handed on that many of the other class, so
//! - a data frame never passes a control frame sent before it, and
//! - a control frame never passes a data frame sent before it,
//!
//! while data frames pass each other freely. Each lane is FIFO, so the earliest frame not yet
//! handed on is always at the front of its lane with its count met: the receiver never waits
//! on itself, only on bytes still on their way.
//!
//! Resync data is a third class, *bulk*: it keeps to lane 0's own queue, which yields to every
//! other frame (see [`super::outbox`]), so frames sent after it overtake it, as they do on a
//! single connection. It is not counted and never waits (the region it copies is range-locked
//! at the sync source until the target acknowledged it).
//!
//! Both ends count every frame from the moment the link (lane 0) comes up. A sender writes the
//! count into its frames only once the peer's Hello said it understands lanes
//! ([`super::frame::caps::LANES`]): an older peer requires those bytes to be zero, and the frames
//! sent before the Hello are all on lane 0, whose order is the wire's.

use super::frame::{Frame, Kind, OpCode};
use std::collections::VecDeque;

/// Frames a receiver holds per lane, waiting for another lane, before it stops reading that lane
/// (its socket's buffer then pushes back on the sender).
pub const HOLD_PER_LANE: usize = 4096;

/// How a frame is ordered on a link of several lanes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A replicated write or its acknowledgement: any lane, overtakes others of its class.
    Data,
    /// Everything else but resync data: lane 0, in order with everything.
    Control,
    /// Resync data: lane 0's yielding queue, not counted, never held.
    Bulk,
}

impl Class {
    pub fn of(f: &Frame) -> Class {
        match f.kind {
            // A flush covers the writes sent before it.
            Kind::Replicate if !matches!(f.op, OpCode::Flush | OpCode::None) => Class::Data,
            // `arg` 1 confirms a forwarded write; it keeps its order with everything (the
            // simulation finds no history that needs it, but it is rare and costs nothing).
            Kind::ReplicateAck if f.arg != 1 => Class::Data,
            Kind::Resync if !f.payload.is_empty() => Class::Bulk,
            _ => Class::Control,
        }
    }
}

/// The count `have` (wrapping) has reached `need`.
fn reached(have: u32, need: u32) -> bool {
    have.wrapping_sub(need) < 1 << 31
}

/// The sending end: picks each frame's lane and stamps its barrier count.
#[derive(Debug, Clone)]
pub struct LaneSender {
    lanes: usize,
    data_sent: u32,
    control_sent: u32,
    /// The peer understands the counts (its Hello said so).
    stamping: bool,
}

impl LaneSender {
    /// A sender for a link that came up now with `lanes` lanes (at least 1).
    pub fn new(lanes: usize) -> LaneSender {
        LaneSender { lanes: lanes.max(1), data_sent: 0, control_sent: 0, stamping: false }
    }

    /// From now on the counts go into the frames.
    pub fn start_stamping(&mut self) {
        self.stamping = true;
    }

    /// Lanes usable now (lanes join after lane 0; their number only grows while the link is up).
    /// Without counts in the frames there is only lane 0.
    pub fn set_lanes(&mut self, lanes: usize) {
        if self.stamping {
            self.lanes = lanes.max(self.lanes);
        }
    }

    /// Stamps `f` and returns its lane: control frames on lane 0, data frames spread by their
    /// sequence number (a write and its acknowledgement take the same lane).
    pub fn send(&mut self, f: &mut Frame) -> usize {
        self.send_on(f, None)
    }

    /// [`LaneSender::send`], with a data frame on lane `hint` when the link has it (any lane
    /// is correct for a data frame: the driver picks the one the submitting reactor drives).
    pub fn send_on(&mut self, f: &mut Frame, hint: Option<usize>) -> usize {
        // Each class counts the other's frames sent before it.
        let (count, lane) = match Class::of(f) {
            Class::Data => {
                self.data_sent = self.data_sent.wrapping_add(1);
                let lane = hint.filter(|&l| l < self.lanes).unwrap_or((f.seq % self.lanes as u64) as usize);
                (self.control_sent, lane)
            }
            Class::Control => {
                self.control_sent = self.control_sent.wrapping_add(1);
                (self.data_sent, 0)
            }
            Class::Bulk => (0, 0),
        };
        f.barrier = if self.stamping { count } else { 0 };
        lane
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaneError {
    #[error("a control or resync frame ({0:?}) arrived on lane {1}: those use lane 0")]
    OffLane0(Kind, usize),
    #[error("a frame arrived on lane {0}, but the link has {1}")]
    NoSuchLane(usize, usize),
}

/// The receiving end: takes each lane's frames as they arrive and hands them on in an order the
/// barrier counts allow.
#[derive(Debug)]
pub struct LaneReceiver {
    held: Vec<VecDeque<Frame>>,
    data_seen: u32,
    control_seen: u32,
    /// The peer stamps its frames (both Hellos said lanes).
    checking: bool,
}

impl LaneReceiver {
    pub fn new(lanes: usize) -> LaneReceiver {
        LaneReceiver { held: (0..lanes.max(1)).map(|_| VecDeque::new()).collect(), data_seen: 0, control_seen: 0, checking: false }
    }

    /// From now on the peer's frames carry counts.
    pub fn start_checking(&mut self) {
        self.checking = true;
    }

    /// A lane joined.
    pub fn set_lanes(&mut self, lanes: usize) {
        let lanes = lanes.max(self.held.len());
        self.held.resize_with(lanes, VecDeque::new);
    }

    /// Whether `lane` may be read now (it holds fewer than [`HOLD_PER_LANE`] frames).
    pub fn wants(&self, lane: usize) -> bool {
        self.held.get(lane).is_some_and(|q| q.len() < HOLD_PER_LANE)
    }

    /// Frames held, on every lane.
    pub fn holding(&self) -> usize {
        self.held.iter().map(VecDeque::len).sum()
    }

    /// A frame arrived on `lane`.
    pub fn push(&mut self, lane: usize, f: Frame) -> Result<(), LaneError> {
        let lanes = self.held.len();
        let q = self.held.get_mut(lane).ok_or(LaneError::NoSuchLane(lane, lanes))?;
        if lane != 0 && Class::of(&f) != Class::Data {
            return Err(LaneError::OffLane0(f.kind, lane));
        }
        q.push_back(f);
        Ok(())
    }

    /// The next frame the core may have, if one has arrived.
    pub fn pop(&mut self) -> Option<Frame> {
        let (data_seen, control_seen, checking) = (self.data_seen, self.control_seen, self.checking);
        let lane = self.held.iter().position(|q| {
            q.front().is_some_and(|f| {
                !checking
                    || match Class::of(f) {
                        Class::Data => reached(control_seen, f.barrier),
                        Class::Control => reached(data_seen, f.barrier),
                        Class::Bulk => true,
                    }
            })
        })?;
        let f = self.held[lane].pop_front()?;
        match Class::of(&f) {
            Class::Data => self.data_seen = self.data_seen.wrapping_add(1),
            Class::Control => self.control_seen = self.control_seen.wrapping_add(1),
            Class::Bulk => {}
        }
        Some(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(seq: u64) -> Frame {
        let mut f = Frame::new(Kind::Replicate, seq);
        f.op = OpCode::Write;
        f
    }

    fn control(seq: u64) -> Frame {
        Frame::new(Kind::Ping, seq)
    }

    /// A frame of class `class` (0 data, 1 control, 2 resync data) with its index in `offset`
    /// (data frames spread over lanes by `seq`).
    fn frame(class: u8, i: usize) -> Frame {
        let mut f = match class {
            0 => data(i as u64),
            1 => control(i as u64),
            _ => {
                let mut f = Frame::new(Kind::Resync, i as u64);
                f.op = OpCode::Write;
                f.payload = vec![1; 8].into();
                f
            }
        };
        f.offset = i as u64;
        f
    }

    /// Sends `frames` over `lanes` lanes, the first `unstamped` before the peer's Hello;
    /// delivers them lane by lane in the order `picks` chooses (resync data from lane 0's
    /// yielding queue, which anything may overtake); returns the indexes in the order the
    /// receiver handed them on.
    fn deliver(frames: &[u8], lanes: usize, unstamped: usize, picks: &[u8]) -> Vec<u64> {
        let mut tx = LaneSender::new(1);
        let mut rx = LaneReceiver::new(lanes);
        // One queue per lane, then lane 0's bulk queue.
        let mut wire: Vec<VecDeque<Frame>> = (0..=lanes).map(|_| VecDeque::new()).collect();
        for (i, &class) in frames.iter().enumerate() {
            if i == unstamped {
                tx.start_stamping();
                tx.set_lanes(lanes);
                rx.start_checking();
            }
            let mut f = frame(class, i);
            // Sometimes (picks from 128) a lane chosen by the caller, or one the link lacks.
            let pick = picks[i % picks.len()];
            let lane = tx.send_on(&mut f, (pick >= 128).then_some(usize::from(pick) % (lanes + 1)));
            let queue = if Class::of(&f) == Class::Bulk { lanes } else { lane };
            wire[queue].push_back(f);
        }
        let mut out = Vec::new();
        let mut picks = picks.iter().cycle();
        while wire.iter().any(|w| !w.is_empty()) {
            let ready: Vec<usize> = (0..=lanes).filter(|&l| !wire[l].is_empty()).collect();
            let queue = ready[usize::from(*picks.next().expect("cycle")) % ready.len()];
            let lane = if queue == lanes { 0 } else { queue };
            rx.push(lane, wire[queue].pop_front().expect("front")).unwrap();
            while let Some(f) = rx.pop() {
                out.push(f.offset);
            }
        }
        assert_eq!(rx.holding(), 0, "everything sent was handed on");
        out
    }

    proptest! {
        /// Whatever the lanes' timing, the receiver hands on every frame once, and no frame
        /// passes one of the other class (nor a control frame another control frame) sent
        /// before it; resync data keeps its own order.
        #[test]
        fn frames_pass_only_frames_of_their_own_data_class(
            frames in proptest::collection::vec(0u8..3, 1..200),
            lanes in 1usize..5,
            unstamped in 0usize..8,
            picks in proptest::collection::vec(any::<u8>(), 1..64),
        ) {
            let out = deliver(&frames, lanes, unstamped, &picks);
            let mut sorted = out.clone();
            sorted.sort_unstable();
            prop_assert_eq!(sorted, (0..frames.len() as u64).collect::<Vec<_>>());
            let mut position = vec![0; frames.len()];
            for (at, &i) in out.iter().enumerate() {
                position[i as usize] = at;
            }
            for j in 0..frames.len() {
                for i in 0..j {
                    let ordered = match (frames[i], frames[j]) {
                        (0, 0) => false,
                        (2, 2) => true,
                        (2, _) | (_, 2) => false,
                        _ => true,
                    };
                    if ordered {
                        prop_assert!(position[i] < position[j], "frame {} overtook {} ({:?})", j, i, frames);
                    }
                }
            }
        }
    }

    #[test]
    fn data_frames_do_overtake_each_other() {
        // Lane 1 delivers first: its data frame is handed on before lane 0's.
        let out = deliver(&[0, 0], 2, 0, &[1, 0]);
        assert_eq!(out, vec![1, 0]);
        // A control frame sent ahead of both goes first; then data frame 2 overtakes 1.
        let out = deliver(&[1, 0, 0], 2, 0, &[0]);
        assert_eq!(out, vec![0, 2, 1]);
    }

    #[test]
    fn resync_data_is_overtaken_without_holding_anything() {
        // A resync chunk, then a control frame and a data frame that overtake it: both go on
        // at once, and so does the chunk when it arrives.
        let out = deliver(&[2, 1, 0], 2, 0, &[0]);
        assert_eq!(out, vec![1, 2, 0]);
        let mut rx = LaneReceiver::new(2);
        assert_eq!(rx.push(1, frame(2, 0)), Err(LaneError::OffLane0(Kind::Resync, 1)));
    }

    /// A sender and a receiver on `lanes` lanes, both past the Hellos (counting).
    fn counting_pair(lanes: usize) -> (LaneSender, LaneReceiver) {
        let mut tx = LaneSender::new(1);
        tx.start_stamping();
        tx.set_lanes(lanes);
        let mut rx = LaneReceiver::new(lanes);
        rx.start_checking();
        (tx, rx)
    }

    #[test]
    fn the_counts_wrap() {
        let (mut tx, mut rx) = counting_pair(2);
        (tx.data_sent, tx.control_sent) = (u32::MAX - 1, u32::MAX);
        (rx.data_seen, rx.control_seen) = (u32::MAX - 1, u32::MAX);
        let mut sent = Vec::new();
        for i in 0..6u64 {
            let mut f = if i % 3 == 2 { control(i) } else { data(i) };
            let lane = tx.send(&mut f);
            sent.push((lane, f));
        }
        // Lane 1 first, then lane 0: the control frames still wait for their data frames.
        sent.sort_by_key(|(lane, _)| usize::from(*lane == 0));
        let mut out = Vec::new();
        for (lane, f) in sent {
            rx.push(lane, f).unwrap();
            while let Some(f) = rx.pop() {
                out.push((f.seq, Class::of(&f)));
            }
        }
        let control_at = |seq| out.iter().position(|&(s, _)| s == seq).unwrap();
        assert!(control_at(2) > control_at(0) && control_at(2) > control_at(1));
        assert!(control_at(5) > control_at(3) && control_at(5) > control_at(4));
        assert_eq!(out.len(), 6);
    }

    #[test]
    fn a_control_frame_off_lane_0_and_an_unknown_lane_are_errors() {
        let mut rx = LaneReceiver::new(2);
        assert_eq!(rx.push(1, control(1)), Err(LaneError::OffLane0(Kind::Ping, 1)));
        assert_eq!(rx.push(2, data(1)), Err(LaneError::NoSuchLane(2, 2)));
        rx.set_lanes(3);
        assert_eq!(rx.push(2, data(1)), Ok(()));
    }

    #[test]
    fn a_lane_full_of_held_frames_is_not_read() {
        let (mut tx, mut rx) = counting_pair(2);
        // A data frame on lane 1, then control frames behind it on lane 0.
        let mut first = data(1);
        assert_eq!(tx.send(&mut first), 1);
        for i in 0..HOLD_PER_LANE as u64 {
            let mut f = control(i);
            assert_eq!(tx.send(&mut f), 0);
            assert!(rx.wants(0));
            rx.push(0, f).unwrap();
            assert!(rx.pop().is_none(), "held for the data frame sent before it");
        }
        assert!(!rx.wants(0) && rx.wants(1));
        rx.push(1, first).unwrap();
        assert_eq!(std::iter::from_fn(|| rx.pop()).count(), HOLD_PER_LANE + 1);
    }

    #[test]
    fn without_counts_everything_takes_lane_0() {
        let mut tx = LaneSender::new(1);
        tx.set_lanes(4);
        for seq in 0..8 {
            let mut f = data(seq);
            assert_eq!(tx.send(&mut f), 0);
            assert_eq!(f.barrier, 0);
        }
    }

    #[test]
    fn classes() {
        let mut flush = data(1);
        flush.op = OpCode::Flush;
        let mut confirm = Frame::new(Kind::ReplicateAck, 1);
        confirm.arg = 1;
        let mut failed_ack = Frame::new(Kind::ReplicateAck, 1);
        failed_ack.arg = super::super::frame::status::IO_ERROR;
        assert_eq!(Class::of(&data(1)), Class::Data);
        assert_eq!(Class::of(&Frame::new(Kind::ReplicateAck, 1)), Class::Data);
        assert_eq!(Class::of(&failed_ack), Class::Data);
        assert_eq!(Class::of(&frame(2, 0)), Class::Bulk);
        for f in [flush, confirm, control(1), Frame::new(Kind::Hello, 0), Frame::new(Kind::Resync, 0), Frame::new(Kind::Forward, 0)] {
            assert_eq!(Class::of(&f), Class::Control, "{f:?}");
        }
    }
}
