//! Reactors: one thread per configured core, pinned, owning its connections and its bdev
//! channels (SPDK's model). Work crosses cores only as messages on a lock-free queue
//! ([`ReactorHandle::send`], SPDK's `send_msg`).
//!
//! Each loop turn drains messages, runs pollers, polls sockets (epoll with a zero timeout), polls
//! bdev channels, and flushes responses, batching every response of the turn into one send per
//! connection. In `busy` mode that is all it does. In `adaptive` mode an idle reactor polls on for
//! up to [`SPIN`] and then parks in epoll until a socket, a bdev completion (its eventfd), a
//! message (a mio waker), a poller's descriptor or the earliest deadline a poller named (a
//! timerfd, for sub-millisecond precision) wakes it. It never `sched_yield`s: a yielding thread
//! waits out the time slice of whatever else runs on its core, a parked one is woken at once.
//! A reactor that finds it shares its core (the scheduler switched it out involuntarily within
//! the last [`CONTENDED_FOR`]: another reactor, a second site, a spinning host) does not spin at
//! all, so that whatever it waits for can run.

use crate::conn::{Conn, ConnLimits, ConnMap, Ctx, ListenerKind};
use crate::Target;
use crossbeam_queue::SegQueue;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use nvmetro_bdev::{BdevChannel, BdevCompletion, Poller};
use nvmetro_conf::PollMode;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A message: a closure run on the receiving reactor.
pub type Message = Box<dyn FnOnce(&mut Reactor) + Send>;

const WAKER: Token = Token(usize::MAX);
const LISTENER_BASE: usize = 1 << 40;
const CHANNEL_BASE: usize = 1 << 41;
const POLLER_BASE: usize = 1 << 42;
/// An RDMA listener's rdma_cm event channel, by listener.
#[cfg(feature = "rdma")]
const RDMA_CM_BASE: usize = 1 << 43;
/// An RDMA device's completion channel, by device.
#[cfg(feature = "rdma")]
const RDMA_CC_BASE: usize = 1 << 44;
/// The reactor's own rdma_cm event channel (of the RDMA connections handed to it).
#[cfg(feature = "rdma")]
const RDMA_OWN_CM: usize = RDMA_CC_BASE - 1;
const TIMER: Token = Token(usize::MAX - 1);
const TICK: Duration = Duration::from_millis(100);
/// How long an idle reactor that has its core to itself keeps polling before it parks.
pub const SPIN: Duration = Duration::from_millis(1);
/// After the scheduler took the core from the reactor, it parks as soon as it is idle for this long.
pub const CONTENDED_FOR: Duration = Duration::from_millis(100);
/// How often an idle reactor asks the kernel whether it was switched out (one getrusage).
const CONTENTION_CHECK: Duration = Duration::from_micros(250);
/// Deadlines nearer than this use the timerfd (epoll's timeout counts whole milliseconds).
const PRECISE: Duration = Duration::from_millis(2);

struct Shared {
    queue: SegQueue<Message>,
    parked: AtomicBool,
    waker: Waker,
    rdma_data: Arc<RdmaDataStats>,
}

/// Host data a reactor's NVMe/RDMA queue pairs moved, by whether it was copied between the
/// queue pair's registered staging memory and the bdev's buffers. Written by that reactor only;
/// the metrics sum the reactors'.
#[derive(Debug, Default)]
pub struct RdmaDataStats {
    /// Write data that landed by RDMA READ or RECV straight in the buffer the bdev writes from.
    pub from_host_zero_copy: AtomicU64,
    pub from_host_copied: AtomicU64,
    /// Read data sent by RDMA WRITE straight from the buffer the bdev read into.
    pub to_host_zero_copy: AtomicU64,
    pub to_host_copied: AtomicU64,
}

impl RdmaDataStats {
    /// Adds to one counter (only this reactor writes it: no read-modify-write race).
    pub fn add(counter: &AtomicU64, bytes: usize) {
        counter.store(counter.load(Ordering::Relaxed) + bytes as u64, Ordering::Relaxed);
    }
}

/// Whether the reactor shares its core: the scheduler switched it out involuntarily lately.
#[derive(Default)]
struct Contention {
    switches: u64,
    checked: Option<Instant>,
    until: Option<Instant>,
}

impl Contention {
    fn contended(&mut self, now: Instant) -> bool {
        if self.checked.is_none_or(|t| now - t >= CONTENTION_CHECK) {
            self.checked = Some(now);
            let switches = nvmetro_ffi::involuntary_switches();
            if switches != self.switches {
                if self.switches != 0 {
                    self.until = Some(now + CONTENDED_FOR);
                }
                self.switches = switches;
            }
        }
        self.until.is_some_and(|t| now < t)
    }
}

/// Sends work to a reactor from any thread.
#[derive(Clone)]
pub struct ReactorHandle {
    pub index: usize,
    pub core: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ReactorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ReactorHandle({} on core {})", self.index, self.core)
    }
}

impl ReactorHandle {
    pub fn rdma_data(&self) -> &RdmaDataStats {
        &self.shared.rdma_data
    }

    pub fn send(&self, msg: Message) {
        self.shared.queue.push(msg);
        // Pairs with the reactor's store before it parks: either it sees the message, or we see
        // it parked and wake it.
        if self.shared.parked.load(Ordering::SeqCst) {
            let _ = self.shared.waker.wake();
        }
    }
}

/// The bdev channels a reactor has opened, by bdev index.
#[derive(Default)]
pub struct Channels {
    open: Vec<Option<Box<dyn BdevChannel>>>,
    /// Channels to close once their last operation completed.
    closing: Vec<usize>,
}

impl Channels {
    /// The reactor's channel for bdev `index`, opened on first use (its eventfd is registered
    /// with the reactor's poller so completions wake a parked reactor).
    pub fn get(&mut self, index: usize, target: &Target, registry: &mio::Registry) -> io::Result<&mut Box<dyn BdevChannel>> {
        if self.open.len() <= index {
            self.open.resize_with(index + 1, || None);
        }
        if self.open[index].is_none() {
            let ch = target.bdev(index).channel()?;
            for fd in ch.wake_fds() {
                registry.register(&mut mio::unix::SourceFd(&(fd as RawFd)), Token(CHANNEL_BASE + index), Interest::READABLE)?;
            }
            self.open[index] = Some(ch);
        }
        Ok(self.open[index].as_mut().expect("opened above"))
    }

    /// Closes the channel to a bdev a reload removed (after its namespaces drained).
    /// (A command that raced the reload may still be at it: the channel closes when it is done.)
    pub fn close(&mut self, index: usize) {
        self.closing.push(index);
        self.close_idle();
    }

    fn close_idle(&mut self) {
        let open = &mut self.open;
        self.closing.retain(|&i| match open.get_mut(i) {
            Some(slot) if slot.as_ref().is_some_and(|ch| ch.outstanding() > 0) => true,
            Some(slot) => {
                *slot = None;
                false
            }
            None => false,
        });
    }

    fn poll_all(&mut self, out: &mut Vec<BdevCompletion>) -> usize {
        let mut n = 0;
        for ch in self.open.iter_mut().flatten() {
            if ch.outstanding() > 0 {
                n += ch.poll(out);
            }
        }
        if !self.closing.is_empty() {
            self.close_idle();
        }
        n
    }
}

pub struct Reactor {
    pub index: usize,
    pub core: usize,
    mode: PollMode,
    poll: Poll,
    shared: Arc<Shared>,
    target: Arc<Target>,
    conns: ConnMap,
    /// By token; a removed listener leaves None so the others keep their tokens.
    listeners: Vec<Option<(TcpListener, ListenerKind)>>,
    channels: Channels,
    pollers: Vec<Box<dyn Poller>>,
    /// Per poller: one of its descriptors turned ready since its last turn.
    poller_ready: Vec<bool>,
    timer: nvmetro_ffi::Timer,
    contention: Contention,
    completions: Vec<BdevCompletion>,
    next_token: u32,
    next_reactor: usize,
    #[cfg(feature = "rdma")]
    rdma: crate::rdma::RdmaReactor,
}

impl Reactor {
    pub fn new(index: usize, core: usize, target: Arc<Target>) -> io::Result<(Reactor, ReactorHandle)> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let shared = Arc::new(Shared { queue: SegQueue::new(), parked: AtomicBool::new(false), waker, rdma_data: Arc::default() });
        let handle = ReactorHandle { index, core, shared: shared.clone() };
        let mode = target.config().poll_mode;
        let timer = nvmetro_ffi::Timer::new()?;
        poll.registry().register(&mut mio::unix::SourceFd(&timer.fd()), TIMER, Interest::READABLE)?;
        let reactor = Reactor {
            index,
            core,
            mode,
            poll,
            shared,
            target,
            conns: ConnMap::default(),
            listeners: Vec::new(),
            channels: Channels::default(),
            pollers: Vec::new(),
            poller_ready: Vec::new(),
            timer,
            contention: Contention::default(),
            completions: Vec::new(),
            next_token: 1,
            next_reactor: index,
            #[cfg(feature = "rdma")]
            rdma: Default::default(),
        };
        Ok((reactor, handle))
    }

    /// Takes over a bound listener; its connections are spread over all reactors.
    pub fn add_listener(&mut self, std_listener: std::net::TcpListener, kind: ListenerKind) -> io::Result<()> {
        std_listener.set_nonblocking(true)?;
        let mut l = TcpListener::from_std(std_listener);
        let token = Token(LISTENER_BASE + self.listeners.len());
        self.poll.registry().register(&mut l, token, Interest::READABLE)?;
        self.listeners.push(Some((l, kind)));
        Ok(())
    }

    /// Takes over a bound NVMe/RDMA listener; its queue pairs are served on this reactor.
    #[cfg(feature = "rdma")]
    pub fn add_rdma_listener(&mut self, l: crate::rdma::RdmaListener, kind: ListenerKind) -> io::Result<()> {
        let fd = l.fd();
        let index = self.rdma.add_listener(l, kind);
        self.poll.registry().register(&mut mio::unix::SourceFd(&fd), Token(RDMA_CM_BASE + index), Interest::READABLE)
    }

    /// Connect requests (handed out round-robin over the reactors) and connection ends.
    #[cfg(feature = "rdma")]
    fn rdma_cm_events(&mut self, source: crate::rdma::CmSource, dirty: &mut Vec<u32>) {
        use crate::rdma::CmOutcome;
        for outcome in self.rdma.cm_events(source) {
            match outcome {
                CmOutcome::Request(h) => {
                    let handles = self.target.reactors();
                    self.next_reactor = (self.next_reactor + 1) % handles.len().max(1);
                    let dest = self.next_reactor;
                    if dest == self.index || handles.is_empty() {
                        self.adopt_rdma(h, false);
                    } else {
                        handles[dest].send(Box::new(move |r: &mut Reactor| r.adopt_rdma(h, true)));
                    }
                }
                CmOutcome::Ended(token, why) => {
                    if let Some(c) = self.conns.get_mut(&token) {
                        c.end(why);
                        dirty.push(token);
                    }
                }
            }
        }
    }

    /// Serves an RDMA connect request here (`migrate`: it came from another reactor's listener).
    #[cfg(feature = "rdma")]
    fn adopt_rdma(&mut self, h: crate::rdma::Handoff, migrate: bool) {
        let cfg = self.target.config();
        let limits = ConnLimits::of(&cfg);
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(1);
        let registry = self.poll.registry();
        let register = |fd: RawFd, token: usize, what: &str| {
            if let Err(e) = registry.register(&mut mio::unix::SourceFd(&fd), Token(token), Interest::READABLE) {
                tracing::error!("cannot register {what}: {e}");
            }
        };
        let kind = h.kind;
        let accepted = self.rdma.accept(
            h,
            migrate,
            limits,
            token,
            &self.shared.rdma_data,
            |fd| register(fd, RDMA_OWN_CM, "the reactor's rdma_cm channel"),
            |port, fd| register(fd, RDMA_CC_BASE + port, "an RDMA completion channel"),
        );
        if let Some((wire, peer)) = accepted {
            tracing::debug!(%peer, reactor = self.index, "RDMA connection accepted");
            self.conns.insert(token, Conn::rdma(token, *wire, peer, kind, limits));
        }
    }

    /// Stops accepting on the listener bound to `address` (a reload removed it).
    pub fn remove_listener(&mut self, address: SocketAddr) {
        #[cfg(feature = "rdma")]
        if let Some(fd) = self.rdma.remove_listener(address) {
            let _ = self.poll.registry().deregister(&mut mio::unix::SourceFd(&fd));
        }
        for entry in self.listeners.iter_mut() {
            if entry.as_ref().is_some_and(|(l, _)| l.local_addr().is_ok_and(|a| a == address)) {
                if let Some((mut l, _)) = entry.take() {
                    let _ = self.poll.registry().deregister(&mut l);
                }
            }
        }
    }

    /// Ends the connections `which` selects (a reload removed what they serve).
    pub fn end_connections(&mut self, which: impl Fn(&Conn) -> bool, reason: &str) {
        for conn in self.conns.values_mut().filter(|c| which(c)) {
            conn.end(reason);
        }
    }

    /// A reload changed the poll mode.
    pub fn set_mode(&mut self, mode: PollMode) {
        self.mode = mode;
    }

    pub fn channels(&mut self) -> &mut Channels {
        &mut self.channels
    }

    /// Runs `poller` on this reactor's loop from now on.
    pub fn add_poller(&mut self, poller: Box<dyn Poller>) -> io::Result<()> {
        for fd in poller.wake_fds() {
            self.poll.registry().register(&mut mio::unix::SourceFd(&fd), Token(POLLER_BASE + self.pollers.len()), Interest::READABLE)?;
        }
        self.pollers.push(poller);
        self.poller_ready.push(true);
        Ok(())
    }

    /// Takes a connection accepted on another reactor.
    fn adopt(&mut self, mut sock: TcpStream, peer: SocketAddr, kind: ListenerKind) {
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(1);
        if let Err(e) = self.poll.registry().register(&mut sock, Token(token as usize), Interest::READABLE | Interest::WRITABLE) {
            tracing::error!(%peer, "cannot register connection: {e}");
            return;
        }
        tracing::debug!(%peer, reactor = self.index, "connection accepted");
        let cfg = self.target.config();
        let limits = ConnLimits::of(&cfg);
        self.conns.insert(token, Conn::new(token, sock, peer, kind, limits));
    }

    fn accept(&mut self, listener: usize) {
        loop {
            let Some((l, kind)) = self.listeners.get(listener).and_then(Option::as_ref) else { return };
            let kind = *kind;
            let (sock, peer) = match l.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    return;
                }
            };
            let _ = sock.set_nodelay(true);
            let handles = self.target.reactors();
            self.next_reactor = (self.next_reactor + 1) % handles.len().max(1);
            let dest = self.next_reactor;
            if dest == self.index || handles.is_empty() {
                self.adopt(sock, peer, kind);
            } else {
                handles[dest].send(Box::new(move |r: &mut Reactor| r.adopt(sock, peer, kind)));
            }
        }
    }

    /// Parks: tells the pollers, then waits until the earliest deadline (none while messages
    /// wait or a poller has work due now). Returns epoll's timeout.
    fn park_timeout(&mut self, now: Instant, next_tick: Instant) -> Option<Duration> {
        self.shared.parked.store(true, Ordering::SeqCst);
        for p in self.pollers.iter_mut() {
            p.parking(true);
        }
        // After `parked` is visible: a message or a poller's work that came before it is seen
        // here, one that comes after it wakes the poll.
        if !self.shared.queue.is_empty() {
            return Some(Duration::ZERO);
        }
        let deadline = self.pollers.iter().filter_map(|p| p.next_deadline()).fold(next_tick, Instant::min);
        let wait = deadline.saturating_duration_since(now);
        if wait.is_zero() {
            return Some(Duration::ZERO);
        }
        if wait < PRECISE {
            if let Err(e) = self.timer.arm(wait) {
                tracing::warn!("cannot arm the reactor's timer: {e}");
                return Some(Duration::ZERO);
            }
            return Some(next_tick.saturating_duration_since(now));
        }
        Some(wait)
    }

    /// Runs until the target stops.
    pub fn run(mut self) {
        if let Err(e) = nvmetro_ffi::pin_current_thread(self.core) {
            tracing::warn!(reactor = self.index, core = self.core, "cannot pin to core: {e}");
        }
        tracing::info!(reactor = self.index, core = self.core, mode = ?self.mode, "reactor running");
        let mut events = Events::with_capacity(1024);
        let mut idle_since: Option<Instant> = None;
        let mut next_tick = Instant::now() + TICK;
        let mut dirty: Vec<u32> = Vec::new();
        while !self.target.stopping() {
            let mut work = 0usize;
            while let Some(msg) = self.shared.queue.pop() {
                msg(&mut self);
                work += 1;
            }
            for (p, ready) in self.pollers.iter_mut().zip(self.poller_ready.iter_mut()) {
                work += usize::from(p.poll(std::mem::take(ready)));
            }

            // Decide how long epoll may wait: not at all while busy or spinning, until the
            // earliest deadline once parked.
            let now = Instant::now();
            let mut timeout = Some(Duration::ZERO);
            // (Not after messages or pollers did work in this turn: what they handed over, such
            // as mirror completions, is polled below before the reactor may park.)
            if self.mode == PollMode::Adaptive && work == 0 {
                if let Some(since) = idle_since {
                    let spin = if self.contention.contended(now) { Duration::ZERO } else { SPIN };
                    if now - since >= spin {
                        timeout = self.park_timeout(now, next_tick);
                    }
                }
            }
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("poll failed: {e}");
                }
            }
            if self.shared.parked.swap(false, Ordering::SeqCst) {
                for p in self.pollers.iter_mut() {
                    p.parking(false);
                }
            }
            let now_ms = self.target.now_ms();
            // The clock for this step (a busy turn that found nothing keeps the one read above).
            let mut turn = if events.is_empty() { now } else { Instant::now() };
            for ev in events.iter() {
                let t = ev.token().0;
                if t == TIMER.0 {
                    self.timer.clear();
                    continue;
                }
                #[cfg(feature = "rdma")]
                if (RDMA_CM_BASE..RDMA_CC_BASE).contains(&t) {
                    work += 1;
                    let source =
                        if t == RDMA_OWN_CM { crate::rdma::CmSource::Own } else { crate::rdma::CmSource::Listener(t - RDMA_CM_BASE) };
                    self.rdma_cm_events(source, &mut dirty);
                    continue;
                }
                #[cfg(feature = "rdma")]
                if (RDMA_CC_BASE..TIMER.0).contains(&t) {
                    // Armed CQs that completed something: armed again here, polled below.
                    for token in self.rdma.completion_events(t - RDMA_CC_BASE) {
                        if let Some(w) = self.conns.get_mut(&token).and_then(Conn::rdma_wire) {
                            w.arm();
                        }
                    }
                    continue;
                }
                if (POLLER_BASE..TIMER.0).contains(&t) {
                    if let Some(ready) = self.poller_ready.get_mut(t - POLLER_BASE) {
                        *ready = true;
                    }
                    continue;
                }
                if t == WAKER.0 || t >= CHANNEL_BASE {
                    continue; // messages and bdev channels are polled every turn anyway
                }
                work += 1;
                if t >= LISTENER_BASE {
                    self.accept(t - LISTENER_BASE);
                    continue;
                }
                let token = t as u32;
                if let Some(conn) = self.conns.get_mut(&token) {
                    let registry = self.poll.registry();
                    let mut ctx = Ctx { target: &self.target, channels: &mut self.channels, registry, now_ms, now: turn };
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        conn.on_readable(&mut ctx, ev.is_read_closed() || ev.is_error());
                    }
                    dirty.push(token);
                }
            }

            #[cfg(feature = "rdma")]
            for i in 0..self.rdma.tokens.len() {
                let token = self.rdma.tokens[i];
                if let Some(conn) = self.conns.get_mut(&token) {
                    let registry = self.poll.registry();
                    let mut ctx = Ctx { target: &self.target, channels: &mut self.channels, registry, now_ms, now: turn };
                    if conn.on_rdma_completions(&mut ctx) {
                        work += 1;
                        dirty.push(token);
                    }
                }
            }

            self.completions.clear();
            work += self.channels.poll_all(&mut self.completions);
            if !self.completions.is_empty() {
                turn = Instant::now();
            }
            for c in self.completions.drain(..) {
                let token = (c.tag >> 32) as u32;
                if let Some(conn) = self.conns.get_mut(&token) {
                    let registry = self.poll.registry();
                    let mut ctx = Ctx { target: &self.target, channels: &mut self.channels, registry, now_ms, now: turn };
                    conn.on_completion(c.tag as u32, c.result, &mut ctx);
                    dirty.push(token);
                }
            }

            if Instant::now() >= next_tick {
                next_tick = Instant::now() + TICK;
                for (token, conn) in self.conns.iter_mut() {
                    let registry = self.poll.registry();
                    let mut ctx = Ctx { target: &self.target, channels: &mut self.channels, registry, now_ms, now: turn };
                    conn.on_tick(&mut ctx);
                    dirty.push(*token);
                }
            }

            dirty.sort_unstable();
            dirty.dedup();
            for token in dirty.drain(..) {
                let Some(conn) = self.conns.get_mut(&token) else { continue };
                conn.flush();
                // Backpressure lifted: read what the socket will not announce again. Each turn
                // either reads the socket dry or pauses with a send buffer the socket would not
                // take (a writable event follows).
                while conn.should_resume_reading() {
                    let registry = self.poll.registry();
                    let mut ctx = Ctx { target: &self.target, channels: &mut self.channels, registry, now_ms, now: turn };
                    conn.on_readable(&mut ctx, false);
                    conn.flush();
                }
                if conn.finished() {
                    let mut conn = self.conns.remove(&token).expect("present");
                    if let Some(sock) = conn.socket() {
                        let _ = self.poll.registry().deregister(sock);
                    }
                    #[cfg(feature = "rdma")]
                    if let Some(w) = conn.rdma_wire() {
                        self.rdma.forget(token, w);
                    }
                    conn.close(&self.target);
                }
            }

            if work == 0 {
                idle_since.get_or_insert(now);
            } else {
                idle_since = None;
            }
        }
        for (_, mut conn) in self.conns.drain() {
            conn.close(&self.target);
        }
        tracing::info!(reactor = self.index, "reactor stopped");
    }
}
