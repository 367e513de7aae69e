//! A member of a consistency group at the production site: a bdev that passes every operation
//! to the bdev beneath it and, for each write that bdev completed, has the group sequence it
//! before the host sees the completion.
//!
//! Overlapping writes are applied one after another, whichever reactor they come from: a write
//! holds its range (exclusive, [`RangeLocks`]) from before it reaches the bdev beneath until the
//! group released it, so the group numbers overlapping writes in the order the local copy
//! applied them, and the DR image ends with the same bytes. Reads, compares and flushes pass
//! straight through.

use super::group::{GroupShared, Item, Payload, CHANNEL_DEPTH};
use super::Member;
use crate::range_lock::{Mode, RangeLocks};
use crate::{Access, Bdev, BdevChannel, BdevCompletion, BdevInfo, BdevOp, BdevOutput};
use std::collections::{HashMap, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A member's range locks have 4 KiB stripes, coarser on large devices (at most 2^20 stripes).
fn lock_shift(size: u64) -> u32 {
    let mut shift = 12;
    while size >> shift > 1 << 20 {
        shift += 1;
    }
    shift
}

#[derive(Debug)]
pub struct DrMemberBdev {
    inner: Arc<dyn Bdev>,
    member: Member,
    group: Arc<GroupShared>,
    locks: Arc<RangeLocks>,
}

impl DrMemberBdev {
    pub fn new(inner: Arc<dyn Bdev>, member: Member, group: Arc<GroupShared>) -> DrMemberBdev {
        let locks = Arc::new(RangeLocks::new(inner.info().size_bytes(), lock_shift(inner.info().size_bytes())));
        DrMemberBdev { inner, member, group, locks }
    }

    pub(super) fn locks(&self) -> Arc<RangeLocks> {
        self.locks.clone()
    }

    pub fn inner(&self) -> &Arc<dyn Bdev> {
        &self.inner
    }
}

impl Bdev for DrMemberBdev {
    fn info(&self) -> &BdevInfo {
        self.inner.info()
    }
    fn access(&self) -> Access {
        self.inner.access()
    }
    fn tune(&self, tuning: crate::mirror::driver::MirrorTuning) {
        self.inner.tune(tuning)
    }
    fn failback(&self) -> bool {
        self.inner.failback()
    }
    fn take_poller(&self) -> Option<Box<dyn crate::Poller>> {
        self.inner.take_poller()
    }
    fn take_helper_pollers(&self) -> Vec<Box<dyn crate::Poller>> {
        self.inner.take_helper_pollers()
    }
    fn as_mirror(&self) -> Option<&crate::mirror::driver::MirrorBdev> {
        self.inner.as_mirror()
    }
    fn as_error(&self) -> Option<&crate::error::ErrorBdev> {
        self.inner.as_error()
    }
    fn mirror_status(&self) -> Option<crate::mirror::driver::StatusReport> {
        self.inner.mirror_status()
    }
    fn channel(self: Arc<Self>) -> std::io::Result<Box<dyn BdevChannel>> {
        let (chan, queue) = self.group.add_channel()?;
        Ok(Box::new(MemberChannel {
            inner: self.inner.clone().channel()?,
            member: self.member,
            locks: self.locks.clone(),
            group: self.group.clone(),
            chan,
            queue,
            lock_wait: VecDeque::new(),
            next_id: 1,
            writing: HashMap::new(),
            at_group: HashMap::new(),
            to_group: VecDeque::new(),
        }))
    }
}

/// What a write will give the group once the bdev beneath completed it.
enum Pending {
    Data(crate::IoBuf),
    /// Compare-and-write: its data, if the compare matched.
    Compared(Vec<u8>),
    Zeros(u64),
}

struct MemberChannel {
    inner: Box<dyn BdevChannel>,
    member: Member,
    locks: Arc<RangeLocks>,
    group: Arc<GroupShared>,
    chan: usize,
    queue: Arc<super::group::ChanQueue>,
    /// Writes whose range another write holds, in arrival order.
    lock_wait: VecDeque<(u64, BdevOp)>,
    /// Writes get ids of their own: the ranges of one Dataset Management command share their
    /// host's tag.
    next_id: u64,
    /// Id -> (host tag, range, what to sequence) for writes at the bdev beneath.
    writing: HashMap<u64, (u64, (u64, u64), Pending)>,
    /// Id -> (host tag, range) of writes handed to the group, until it releases them.
    at_group: HashMap<u64, (u64, (u64, u64))>,
    /// Items for the group while it holds CHANNEL_DEPTH of this channel's (its queues are that
    /// deep: nothing is ever pushed into a full one).
    to_group: VecDeque<Item>,
}

fn write_range(op: &BdevOp) -> Option<(u64, u64)> {
    match op {
        BdevOp::Write { .. } | BdevOp::WriteZeroes { .. } | BdevOp::Deallocate { .. } | BdevOp::CompareAndWrite { .. } => op.range(),
        _ => None,
    }
}

impl MemberChannel {
    /// Starts the write if its range is free; returns it otherwise.
    fn try_start(&mut self, tag: u64, op: BdevOp) -> Option<(u64, BdevOp)> {
        let range = write_range(&op).expect("a write");
        if !self.locks.try_lock(range.0, range.1, Mode::Exclusive) {
            return Some((tag, op));
        }
        let pending = match &op {
            BdevOp::Write { data, .. } => Pending::Data(data.clone()),
            BdevOp::CompareAndWrite { data, .. } => Pending::Compared(data.clone()),
            _ => Pending::Zeros(range.1),
        };
        let id = self.next_id;
        self.next_id += 1;
        // Written locally and not yet numbered: a clean stop now is not clean for the DR site.
        self.group.unsequenced.fetch_add(1, Ordering::AcqRel);
        self.writing.insert(id, (tag, range, pending));
        self.inner.submit(id, op);
        None
    }

    fn hand_to_group(&mut self) {
        if self.group.gone.load(Ordering::Acquire) {
            // Nobody takes them any more: they are released here (completed on the next poll).
            for item in self.to_group.drain(..) {
                self.group.unsequenced.fetch_sub(1, Ordering::AcqRel);
                self.queue.release(item.tag);
            }
            return;
        }
        let mut handed = false;
        // Those already handed over (and not yet released) bound what may be pushed.
        let with_group = self.at_group.len() - self.to_group.len();
        for _ in with_group..CHANNEL_DEPTH {
            let Some(item) = self.to_group.pop_front() else { break };
            if let Err(item) = self.queue.inbox.push(item) {
                self.to_group.push_front(item);
                break;
            }
            handed = true;
        }
        if handed {
            self.group.wake();
        }
        if self.group.gone.load(Ordering::SeqCst) {
            // Pushed as the group's thread ended, after its last look at the inbox.
            while let Some(item) = self.queue.inbox.pop() {
                self.group.unsequenced.fetch_sub(1, Ordering::AcqRel);
                self.queue.release(item.tag);
            }
        }
    }

    fn unlock(&self, range: (u64, u64)) {
        self.locks.unlock(range.0, range.1, Mode::Exclusive);
        self.group.wake_lock_waiters(self.chan);
    }
}

impl BdevChannel for MemberChannel {
    fn submit_read_buf(&mut self, tag: u64, offset: u64, len: usize, buf: crate::IoBufMut) {
        self.inner.submit_read_buf(tag, offset, len, buf);
    }

    fn submit(&mut self, tag: u64, op: BdevOp) {
        if write_range(&op).is_none() {
            return self.inner.submit(tag, op);
        }
        if let Some(w) = self.try_start(tag, op) {
            self.lock_wait.push_back(w);
        }
    }

    fn poll(&mut self, done: &mut Vec<BdevCompletion>) -> usize {
        let first = done.len();
        self.inner.poll(done);
        let mut i = first;
        while i < done.len() {
            // Reads and flushes pass through under their host's tag.
            let Some((tag, range, pending)) = self.writing.remove(&done[i].tag) else {
                i += 1;
                continue;
            };
            let id = done[i].tag;
            done[i].tag = tag;
            let payload = match (&done[i].result, pending) {
                (Ok(BdevOutput::Done), Pending::Data(d)) => Some(Payload::Data(d.to_vec())),
                (Ok(BdevOutput::Done), Pending::Compared(d)) => Some(Payload::Data(d)),
                (Ok(BdevOutput::Done), Pending::Zeros(len)) => Some(Payload::Zeros(len)),
                // Failed or miscompared: nothing to sequence (a failed write's bytes are
                // undefined at both sites).
                _ => None,
            };
            match payload {
                // The group is gone (removed by a reload): the write completes without it.
                Some(_) if self.group.gone.load(Ordering::Acquire) => {
                    self.group.unsequenced.fetch_sub(1, Ordering::AcqRel);
                    self.unlock(range);
                    i += 1;
                }
                Some(payload) => {
                    done.swap_remove(i);
                    self.at_group.insert(id, (tag, range));
                    self.to_group.push_back(Item { chan: self.chan, tag: id, member: self.member, offset: range.0, payload });
                }
                None => {
                    self.group.unsequenced.fetch_sub(1, Ordering::AcqRel);
                    self.unlock(range);
                    i += 1;
                }
            }
        }
        while let Some(id) = self.queue.done.pop() {
            if let Some((tag, range)) = self.at_group.remove(&id) {
                self.unlock(range);
                done.push(BdevCompletion { tag, result: Ok(BdevOutput::Done) });
            }
        }
        self.queue.lock_waiters.store(false, Ordering::Release);
        for _ in 0..self.lock_wait.len() {
            let (tag, op) = self.lock_wait.pop_front().expect("counted");
            if let Some(w) = self.try_start(tag, op) {
                self.lock_wait.push_back(w);
            }
        }
        if !self.lock_wait.is_empty() {
            // Another reactor's (or the copy's) unlock signals this channel's eventfd.
            self.queue.lock_waiters.store(true, Ordering::Release);
        }
        if !self.to_group.is_empty() {
            self.hand_to_group();
        }
        done.len() - first
    }

    fn outstanding(&self) -> usize {
        self.inner.outstanding() + self.lock_wait.len() + self.at_group.len()
    }

    fn wake_fds(&self) -> Vec<RawFd> {
        let mut v = self.inner.wake_fds();
        v.push(self.queue.eventfd.as_raw_fd());
        v
    }
}
