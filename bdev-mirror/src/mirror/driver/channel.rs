//! The host side of the mirror: a reactor's [`MirrorChannel`] (reads straight to the local leg
//! under the lease, everything else to the link with backpressure), the lock-free [`ChanQueue`]
//! each channel shares with the link, and the link's end of those queues (taking the channels'
//! operations as one batch, delivering their completions).

use super::{access_of, LinkThread, Shared};
use crate::mirror::core::{Access, Input, Output};
use crate::mirror::frame::Kind;
use crate::{BdevChannel, BdevCompletion, BdevError, BdevOp};
use crossbeam_queue::ArrayQueue;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Operations a channel may have with the link at once; more wait in the channel (backpressure).
pub(super) const CHANNEL_DEPTH: usize = 1024;

/// A reactor's channel to the link: bounded, lock-free, one producer and one consumer each way.
pub(super) struct ChanQueue {
    /// Operations for the link: (the channel's tag, operation).
    pub(super) inbox: ArrayQueue<(u64, BdevOp)>,
    /// Completions for the channel; never fuller than `inbox` was (one per operation).
    pub(super) done: ArrayQueue<BdevCompletion>,
    pub(super) eventfd: OwnedFd,
    /// The thread that last polled the channel ([`thread_tag`]): when the link runs on that same
    /// thread (a poller on the channel's reactor) the reactor polls the queue in the same turn,
    /// and the eventfd signal (a syscall) is skipped.
    pub(super) consumer: AtomicU64,
}

/// A number for the calling thread, unique in the process.
pub(super) fn thread_tag() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TAG: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TAG.with(|t| *t)
}

pub(super) struct MirrorChannel {
    local: Box<dyn BdevChannel>,
    queue: Arc<ChanQueue>,
    shared: Arc<Shared>,
    /// Operations with the link (in its inbox, being handled, or completed and not yet polled).
    inflight: usize,
    /// Operations for the link while it has CHANNEL_DEPTH of this channel's, in order.
    waiting: std::collections::VecDeque<(u64, BdevOp)>,
    refused: Vec<BdevCompletion>,
}

impl MirrorChannel {
    pub(super) fn new(local: Box<dyn BdevChannel>, queue: Arc<ChanQueue>, shared: Arc<Shared>) -> MirrorChannel {
        MirrorChannel { local, queue, shared, inflight: 0, waiting: std::collections::VecDeque::new(), refused: Vec::new() }
    }

    /// Hands waiting operations to the link while its inbox has room.
    fn hand_over(&mut self) {
        let mut handed = false;
        while self.inflight < CHANNEL_DEPTH {
            let Some((tag, op)) = self.waiting.pop_front() else { break };
            if let Err((tag, op)) = self.queue.inbox.push((tag, op)) {
                self.waiting.push_front((tag, op));
                break;
            }
            self.inflight += 1;
            handed = true;
        }
        if handed && self.shared.parked.load(Ordering::SeqCst) {
            let _ = self.shared.waker.wake();
        }
    }
}

impl BdevChannel for MirrorChannel {
    /// A read the local leg serves (under the lease) fills `buf`; any other goes as a Read.
    fn submit_read_buf(&mut self, tag: u64, offset: u64, len: usize, buf: crate::IoBufMut) {
        let access = access_of(self.shared.access.load(Ordering::Acquire));
        let local = matches!(access, Access::Serving | Access::Sole | Access::Leading | Access::Standby) && self.shared.leased();
        if local {
            self.local.submit_read_buf(tag, offset, len, buf);
        } else {
            self.submit(tag, BdevOp::Read { offset, len });
        }
    }

    fn submit(&mut self, tag: u64, op: BdevOp) {
        let access = access_of(self.shared.access.load(Ordering::Acquire));
        match op {
            _ if op.reads_only() && access != Access::Remote => match access {
                Access::Serving | Access::Sole | Access::Leading | Access::Standby if self.shared.leased() => self.local.submit(tag, op),
                Access::Serving | Access::Sole | Access::Leading | Access::Standby | Access::Transition | Access::Remote => {
                    self.refused.push(BdevCompletion { tag, result: Err(BdevError::Transition) })
                }
                Access::Fenced => self.refused.push(BdevCompletion { tag, result: Err(BdevError::Fenced) }),
            },
            // Writes, and every command of a leg serving through its peer, go to the link.
            _ => {
                self.waiting.push_back((tag, op));
                self.hand_over();
            }
        }
    }

    fn poll(&mut self, done: &mut Vec<BdevCompletion>) -> usize {
        let first = done.len();
        let mut n = self.local.poll(done);
        // Reads completed by the local leg: answered only while the lease still holds (the data
        // may be stale once the peer could have taken over).
        if n > 0 && !self.shared.leased() {
            for c in &mut done[first..] {
                c.result = Err(BdevError::Transition);
            }
        }
        n += self.refused.len();
        done.append(&mut self.refused);
        self.queue.consumer.store(thread_tag(), Ordering::Relaxed);
        // The eventfd is never drained: reactors watch it edge-triggered, and every signal is a
        // new edge whatever its count, so a read here would be a syscall for nothing.
        while let Some(c) = self.queue.done.pop() {
            self.inflight -= 1;
            done.push(c);
            n += 1;
        }
        if !self.waiting.is_empty() {
            self.hand_over();
        }
        n
    }

    fn outstanding(&self) -> usize {
        self.local.outstanding() + self.inflight + self.waiting.len() + self.refused.len()
    }

    fn wake_fds(&self) -> Vec<RawFd> {
        let mut v = self.local.wake_fds();
        v.push(self.queue.eventfd.as_raw_fd());
        v
    }
}

impl LinkThread {
    /// Every operation the channels sent, handled as one batch: the core sees them all before
    /// any output runs, so the metadata they dirty is made durable with one sync, not one each
    /// (each output still runs after the store that covers it: the first store writes the
    /// core's state after the whole batch, and [`MetaFile::store`](crate::mirror::meta::MetaFile::store) skips the ones after it).
    pub(super) fn take_host_operations(&mut self) -> bool {
        if self.shared.inbox_empty() {
            return false;
        }
        let channels = self.shared.channels.load_full();
        self.handle_batch(|link, out| {
            let now = Instant::now();
            for (chan, q) in channels.iter().enumerate() {
                while let Some((tag, op)) = q.inbox.pop() {
                    let t = link.next_tag;
                    link.next_tag += 1;
                    let write = matches!(op, BdevOp::Write { .. } | BdevOp::WriteZeroes { .. });
                    link.pending.insert(t, (chan, tag, write.then_some(now)));
                    let first = out.len();
                    link.feed(Input::Host { tag: t, op }, out);
                    // Its replicated frames take the lane its reactor drives.
                    for o in &out[first..] {
                        if let Output::Send(f) = o {
                            if f.kind == Kind::Replicate {
                                if let Some(lane) = link.lane_of_reactor(q.consumer.load(Ordering::Relaxed), f.seq) {
                                    link.lanes.hint(f.seq, lane);
                                }
                            }
                        }
                    }
                }
            }
        });
        true
    }

    /// Hands the completions of the last input to the reactors.
    pub(super) fn deliver(&mut self) {
        let mut ready = std::mem::take(&mut self.ready);
        let mut now = None;
        for (tag, result) in ready.drain(..) {
            if let Some((chan, orig, arrived)) = self.pending.remove(&tag) {
                if let (Some(at), Ok(_)) = (arrived, &result) {
                    let now = *now.get_or_insert_with(Instant::now);
                    self.core.observe_host_write(now.duration_since(at).as_micros() as u64);
                }
                if let Some(q) = self.shared.channels.load().get(chan) {
                    // There is room: a channel has at most CHANNEL_DEPTH operations with the link
                    // (MirrorChannel::hand_over), each completed once.
                    let pushed = q.done.push(BdevCompletion { tag: orig, result });
                    assert!(pushed.is_ok(), "a mirror channel had more than {CHANNEL_DEPTH} operations with the link");
                    self.signal.push(chan);
                }
            }
        }
        // Kept for its capacity: delivering a completion allocates nothing.
        self.ready = ready;
    }
}
