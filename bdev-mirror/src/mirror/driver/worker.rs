//! Lanes driven by reactors of their own. The link thread runs the core and lane 0; each
//! further lane's connection can be handed to a [`LaneWorker`], a poller that another reactor
//! runs. The worker encodes the frames the link queues for its lane (their payload CRC
//! included), writes them, reads what the peer sends on the lane, parses and checks it, and hands
//! the frames back: the syscalls and checksums of replication spread over the reactors while
//! the core keeps one thread.
//!
//! The two ends share a [`LanePort`]: two bounded lock-free queues of frames, a slot for handing
//! over a connection, and the failure the worker saw. Each end wakes the other only when the
//! other is parked. A link goes down as a whole: the link moves to a new epoch, and a worker
//! drops its connection, and every frame, of an older one. A lane whose worker no reactor runs
//! stays with the link thread.

use super::Shared;
use crate::mirror::frame::Frame;
use crate::mirror::outbox::{Conn, RESYNC_RECHECK};
use crate::IoBufPool;
use crossbeam_queue::ArrayQueue;
use mio::{Events, Poll, Token, Waker};
use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Frames a port holds each way; more wait at the link (to the peer) or in the worker (from it).
const PORT_DEPTH: usize = 4096;
const WAKER: Token = Token(0);
const CONN: Token = Token(1);
/// How often a worker looks at its connection whether or not it announced anything.
const TICK: Duration = Duration::from_millis(10);

/// What a link and the worker of one of its lanes share.
pub(super) struct LanePort {
    /// Frames for the peer: (epoch, frame).
    to_peer: ArrayQueue<(u64, Frame)>,
    /// Frames from the peer: (epoch, frame).
    from_peer: ArrayQueue<(u64, Frame)>,
    /// A connection for the worker: (epoch, lane, connection).
    handoff: Mutex<Option<(u64, usize, Conn)>>,
    handoff_pending: AtomicBool,
    /// The link's epoch: a connection of an older one is dropped.
    epoch: AtomicU64,
    /// Why the worker's connection failed, and in which epoch.
    failure: Mutex<Option<(u64, String)>>,
    failed: AtomicBool,
    waker: Waker,
    parked: AtomicBool,
    /// A reactor runs the worker.
    running: AtomicBool,
    /// Which ([`super::channel::thread_tag`] of its thread; 0: none yet).
    reactor: AtomicU64,
    /// The emulated link delay, in nanoseconds (changed by a reload).
    delay_ns: AtomicU64,
    /// Frames the worker sent since start.
    frames_sent: AtomicU64,
}

impl LanePort {
    /// Whether a reactor runs this port's worker (only then is it handed a lane).
    pub(super) fn running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// Frames the worker sent since start.
    pub(super) fn frames_sent(&self) -> u64 {
        self.frames_sent.load(Ordering::Relaxed)
    }

    /// The reactor that runs the worker ([`super::channel::thread_tag`]; 0: none yet).
    pub(super) fn reactor(&self) -> u64 {
        self.reactor.load(Ordering::Relaxed)
    }

    fn wake_worker(&self) {
        fence(Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            let _ = self.waker.wake();
        }
    }

    /// At the link: the worker drives `conn` as lane `lane` of the link in `epoch` from now on.
    pub(super) fn hand_over(&self, epoch: u64, lane: usize, conn: Conn) {
        if let Ok(mut slot) = self.handoff.lock() {
            *slot = Some((epoch, lane, conn));
        }
        self.handoff_pending.store(true, Ordering::Release);
        self.wake_worker();
    }

    /// At the link: the link went down (it is in `epoch` now); the worker drops its connection.
    pub(super) fn new_epoch(&self, epoch: u64) {
        self.epoch.store(epoch, Ordering::Release);
        self.discard_stale();
        self.wake_worker();
    }

    /// At the link: the emulated link delay changed.
    pub(super) fn set_delay(&self, delay: Duration) {
        self.delay_ns.store(delay.as_nanos() as u64, Ordering::Relaxed);
    }

    /// At the link: queues `f` for the peer, or gives it back when the queue is full.
    pub(super) fn send(&self, epoch: u64, f: Frame) -> Result<(), Frame> {
        self.to_peer.push((epoch, f)).map_err(|(_, f)| f)
    }

    /// At the link, after a batch of [`LanePort::send`]s.
    pub(super) fn sent(&self) {
        self.wake_worker();
    }

    /// At the link: the next frame the peer sent on this lane in `epoch`.
    pub(super) fn receive(&self, epoch: u64) -> Option<Frame> {
        loop {
            let (e, f) = self.from_peer.pop()?;
            if e == epoch {
                return Some(f);
            }
        }
    }

    /// At the link: whether a failure waits for it, or frames (`frames_wanted`: the lane's
    /// receiver takes frames now; a held lane's frames wait without news).
    pub(super) fn has_news(&self, frames_wanted: bool) -> bool {
        (frames_wanted && !self.from_peer.is_empty()) || self.failed.load(Ordering::Acquire)
    }

    /// At the link: drops what a worker of no live lane left (frames and a failure of a link
    /// that is gone).
    pub(super) fn discard_stale(&self) {
        if self.failed.swap(false, Ordering::AcqRel) {
            if let Ok(mut f) = self.failure.lock() {
                *f = None;
            }
        }
        while self.from_peer.pop().is_some() {}
    }

    /// At the link: why the worker's connection of `epoch` failed, if it did.
    pub(super) fn failure(&self, epoch: u64) -> Option<String> {
        if !self.failed.swap(false, Ordering::AcqRel) {
            return None;
        }
        let failure = self.failure.lock().ok()?.take()?;
        (failure.0 == epoch).then_some(failure.1)
    }
}

/// The poller that drives one lane's connection on a reactor (see the module docs).
pub struct LaneWorker {
    port: Arc<LanePort>,
    link: Arc<Shared>,
    poll: Poll,
    events: Events,
    /// The lane it drives: (epoch, lane, connection).
    conn: Option<(u64, usize, Conn)>,
    /// Frames read but not yet taken by the link (its queue was full).
    backlog: VecDeque<Frame>,
    /// The socket may hold more than was read (reading stopped at the backlog's bound): no
    /// new readiness edge announces it.
    unread: bool,
    frames: Vec<Frame>,
    payloads: IoBufPool,
    last_tick: Instant,
}

impl std::fmt::Debug for LaneWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LaneWorker(lane {:?})", self.conn.as_ref().map(|c| c.1))
    }
}

impl LaneWorker {
    /// A worker and the port the link keeps of it.
    pub(super) fn new(link: Arc<Shared>, payloads: IoBufPool, delay: Duration) -> io::Result<(LaneWorker, Arc<LanePort>)> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let port = Arc::new(LanePort {
            to_peer: ArrayQueue::new(PORT_DEPTH),
            from_peer: ArrayQueue::new(PORT_DEPTH),
            handoff: Mutex::new(None),
            handoff_pending: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            failure: Mutex::new(None),
            failed: AtomicBool::new(false),
            waker,
            parked: AtomicBool::new(false),
            running: AtomicBool::new(false),
            reactor: AtomicU64::new(0),
            delay_ns: AtomicU64::new(delay.as_nanos() as u64),
            frames_sent: AtomicU64::new(0),
        });
        let worker = LaneWorker {
            port: port.clone(),
            link,
            poll,
            events: Events::with_capacity(8),
            conn: None,
            backlog: VecDeque::new(),
            unread: false,
            frames: Vec::new(),
            payloads,
            last_tick: Instant::now(),
        };
        Ok((worker, port))
    }

    fn wake_link(&self) {
        fence(Ordering::SeqCst);
        if self.link.parked.load(Ordering::SeqCst) {
            let _ = self.link.waker.wake();
        }
    }

    fn drop_conn(&mut self) {
        if let Some((_, _, mut c)) = self.conn.take() {
            c.sock.deregister(self.poll.registry());
        }
        self.backlog.clear();
        self.unread = false;
    }

    /// Takes a connection the link handed over; false if there was none.
    fn take_handoff(&mut self) -> bool {
        if !self.port.handoff_pending.swap(false, Ordering::AcqRel) {
            return false;
        }
        let Some((epoch, lane, mut conn)) = self.port.handoff.lock().ok().and_then(|mut s| s.take()) else { return false };
        self.drop_conn();
        if let Err(e) = conn.sock.register(self.poll.registry(), CONN) {
            self.conn = Some((epoch, lane, conn));
            self.fail(format!("lane {lane} could not be registered on its reactor: {e}"));
            return true;
        }
        self.conn = Some((epoch, lane, conn));
        true
    }

    fn fail(&mut self, why: String) {
        let epoch = self.conn.as_ref().map_or(0, |c| c.0);
        self.drop_conn();
        if let Ok(mut f) = self.port.failure.lock() {
            *f = Some((epoch, why));
        }
        self.port.failed.store(true, Ordering::Release);
        self.wake_link();
    }

    /// Frames the link queued: onto the connection they are for (frames of an older link
    /// are dropped with it).
    fn take_frames(&mut self, now: Instant) -> bool {
        let mut sent = 0;
        let delay = Duration::from_nanos(self.port.delay_ns.load(Ordering::Relaxed));
        while let Some((epoch, f)) = self.port.to_peer.pop() {
            if self.conn.as_ref().is_none_or(|c| c.0 != epoch) {
                // The link hands a connection over before it queues frames for it.
                self.take_handoff();
            }
            if let Some((e, _, c)) = self.conn.as_mut() {
                if *e == epoch {
                    c.queue_frame(&f, delay, now);
                    sent += 1;
                }
            }
        }
        if sent > 0 {
            self.port.frames_sent.fetch_add(sent, Ordering::Relaxed);
        }
        sent > 0
    }

    /// Reads what the peer sent while the link has room for it, and hands it on.
    fn read_and_hand_on(&mut self, readable: bool) -> Result<bool, String> {
        let mut work = false;
        let Some((epoch, lane, c)) = self.conn.as_mut() else { return Ok(false) };
        let (epoch, lane) = (*epoch, *lane);
        if readable && !self.backlog.is_empty() {
            // The edge is taken now; the bytes it announced are read once the backlog is gone.
            self.unread = true;
        }
        if self.backlog.is_empty() && (readable || self.unread || c.rx_fresh || c.sock.pending()) {
            self.unread = false;
            let mut frames = std::mem::take(&mut self.frames);
            loop {
                let read = c.read_frames(lane, &self.payloads, &mut frames);
                self.backlog.extend(frames.drain(..));
                let (got, empty) = match read {
                    Ok(r) => r,
                    Err(why) => {
                        self.frames = frames;
                        return Err(why);
                    }
                };
                work |= got;
                if empty || !got {
                    break;
                }
                if self.backlog.len() >= PORT_DEPTH {
                    self.unread = true;
                    break;
                }
            }
            self.frames = frames;
        }
        let mut handed = false;
        while let Some(f) = self.backlog.pop_front() {
            if let Err((_, f)) = self.port.from_peer.push((epoch, f)) {
                self.backlog.push_front(f);
                break;
            }
            handed = true;
        }
        if handed {
            self.wake_link();
        }
        Ok(work || handed)
    }
}

impl crate::Poller for LaneWorker {
    fn poll(&mut self, ready: bool) -> bool {
        if !self.port.running.load(Ordering::Relaxed) {
            self.port.reactor.store(super::channel::thread_tag(), Ordering::Relaxed);
            self.port.running.store(true, Ordering::Release);
        }
        let now = Instant::now();
        let tick = now.duration_since(self.last_tick) >= TICK;
        if tick {
            self.last_tick = now;
        }
        let mut readable = tick;
        if ready || tick {
            // Readiness is edge-triggered: taking the events clears the worker's descriptor.
            if self.poll.poll(&mut self.events, Some(Duration::ZERO)).is_ok() {
                readable |= self.events.iter().any(|e| e.token() == CONN);
            }
        }
        let mut work = self.take_handoff();
        if self.conn.as_ref().is_some_and(|c| c.0 != self.port.epoch.load(Ordering::Acquire)) {
            // The link went down: this lane with it.
            self.drop_conn();
            work = true;
        }
        work |= self.take_frames(now);
        let Some((_, lane, c)) = self.conn.as_mut() else { return work };
        if let Err(why) = c.send_due(*lane, now) {
            self.fail(why);
            return true;
        }
        match self.read_and_hand_on(readable) {
            Ok(w) => work | w,
            Err(why) => {
                self.fail(why);
                true
            }
        }
    }

    fn wake_fds(&self) -> Vec<RawFd> {
        vec![self.poll.as_raw_fd()]
    }

    fn parking(&mut self, parked: bool) {
        self.port.parked.store(parked, Ordering::SeqCst);
        // Before next_deadline's loads: a push after them sees `parked` and wakes us.
        fence(Ordering::SeqCst);
    }

    fn next_deadline(&self) -> Option<Instant> {
        let now = Instant::now();
        let p = &self.port;
        if !p.to_peer.is_empty() || p.handoff_pending.load(Ordering::Acquire) {
            return Some(now);
        }
        let (epoch, _, c) = self.conn.as_ref()?;
        if *epoch != p.epoch.load(Ordering::Acquire) || c.sock.pending() || c.rx_fresh || (self.unread && self.backlog.is_empty()) {
            return Some(now);
        }
        let mut at = self.last_tick + TICK;
        if !self.backlog.is_empty() || c.fill_blocked {
            // The link's queue was full (it takes frames without telling): look again soon.
            at = at.min(now + RESYNC_RECHECK);
        }
        if let Some((due, _, _)) = c.delayed.front() {
            at = at.min(*due);
        }
        Some(at)
    }
}
