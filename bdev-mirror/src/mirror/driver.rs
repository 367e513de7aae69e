//! The mirror bdev: binds a [`MirrorCore`] to a local bdev, a TCP replication link, the metadata
//! file, and the reactors.
//!
//! One link per mirror owns the core, the connection and a channel on the local bdev. In the
//! target it runs as a poller on a reactor (tests may give it a thread of its own). Reactors
//! hand it write-type operations through a lock-free queue (waking it with a mio waker when it
//! is parked) and get completions back on a per-channel lock-free queue with an eventfd that
//! wakes a parked reactor (not signalled when the link runs on the reactor that polls the
//! channel). Reads go straight to the local leg while it is serving. A poller turn makes
//! syscalls only for descriptors that turned ready, plus a look at everything on its 10 ms tick;
//! frames leave through the two lanes of [`super::outbox`] (resync data yields to host frames).
//!
//! The link is a [`Transport`]: over TCP the preferred leg listens and the secondary dials it,
//! with backoff. A new connection first proves that it knows the shared secret ([`super::auth`],
//! HMAC-SHA256 challenge-response both ways); only then does it become the link, replacing the
//! old one if there was one. Connections that fail, stay silent past [`AUTH_TIMEOUT`] or exceed
//! [`MAX_PENDING`] are closed (and logged, at most once a second) without touching the live link.
//! The core's Pings (every fifth of the heartbeat timeout) keep the lease and measure the
//! replication round trip; a heartbeat timeout without a byte from the peer counts as a lost link.
//!
//! In metro mode the link thread also talks to the witness over UDP (one datagram per report,
//! see [`super::witness`]). After every input it publishes the leg's [`Access`] (for ANA) and the
//! deadline of its lease: reactors read the clock on every read they admit and again before they
//! complete it, and serve it only before the deadline (see [`super::core`] on leases), so a site
//! that was paused never answers from a lapsed lease.
//!
//! A metadata store that fails stops the batch of outputs it belongs to (nothing after it is
//! issued, sent or completed), fences the leg for good (until a restart) and drops the link.
//!
//! This file holds the state the link shares with the reactors, the bdev, and the link thread:
//! feeding the core, running its outputs, and the loop. The rest is in submodules: `settings`
//! (how a leg is set up and tuned), `channel` (the reactors' channels and their queues to the
//! link), `link` (the replication connections: handshakes, receiving, flushing), `status`
//! (what the link publishes for the reactors and the operator) and `planned` (switchover and
//! departure).

use super::core::{Access, Input, MirrorCore, Output};
use super::frame::{Frame, Kind};
use super::meta::MetaFile;
use super::outbox::RESYNC_RECHECK;
use super::transport::Transport;
use super::DiskState;
use crate::{Bdev, BdevChannel, BdevCompletion, BdevError, BdevInfo};
use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod channel;
mod lanes;
mod link;
mod planned;
mod settings;
mod status;
mod worker;
use channel::{thread_tag, ChanQueue, MirrorChannel, CHANNEL_DEPTH};
pub use lanes::MAX_LANES;
use lanes::{Lane, LaneLink};
use link::{PendingConn, RefusalLog};
pub use link::{AUTH_TIMEOUT, MAX_PENDING};
pub use planned::DEPART_WAIT;
pub use settings::{MetroSettings, MirrorSettings, MirrorTuning};
pub use status::StatusReport;
use status::{access_code, access_of};
use worker::{LanePort, LaneWorker};

struct Shared {
    channels: ArcSwap<Vec<Arc<ChanQueue>>>,
    /// [`Access`] as a number (see [`access_code`]).
    access: AtomicU8,
    /// This leg orders writes ([`MirrorCore::orders_writes`]).
    orders: AtomicBool,
    /// Host I/O may be served until then (milliseconds since `started`; see
    /// [`MirrorCore::lease_deadline_ms`]).
    lease_until_ms: AtomicU64,
    /// The link thread's clock origin, shared with the reactors' lease checks.
    started: Instant,
    /// Operator request: a Failed leg retries now.
    resync: AtomicBool,
    status: Mutex<StatusReport>,
    /// Operator requests for the link thread (manual failback).
    failback: AtomicBool,
    /// Operator request: a forced promotion, and where its outcome goes.
    promote: Mutex<Option<std::sync::mpsc::Sender<Result<String, String>>>>,
    /// Operator request: a planned switchover, and where its outcome goes.
    switchover: Mutex<Option<std::sync::mpsc::Sender<Result<String, String>>>>,
    /// A clean stop: depart (let the peer take over) and say how it went.
    depart: Mutex<Option<std::sync::mpsc::Sender<String>>>,
    /// New settings for the link thread (taken on its next turn).
    tuning: Mutex<Option<MirrorTuning>>,
    tuning_pending: AtomicBool,
    waker: Waker,
    parked: AtomicBool,
    stop: AtomicBool,
}

#[derive(Debug)]
pub struct MirrorBdev {
    info: BdevInfo,
    local: Arc<dyn Bdev>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The link, until a reactor takes it (control path only).
    poller: Mutex<Option<LinkThread>>,
    /// Workers for the link's lanes 1.., until reactors take them.
    helpers: Mutex<Vec<LaneWorker>>,
}

impl std::fmt::Debug for LinkThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MirrorLink({})", self.name)
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MirrorShared(access: {})", self.access.load(Ordering::Relaxed))
    }
}

const WAKER: Token = Token(0);
const LISTENER: Token = Token(1);
const CONN: Token = Token(2);
const LOCAL: Token = Token(3);
const WITNESS: Token = Token(4);
const PENDING: Token = Token(5);
/// How often the link thread ticks the core (timers, resync budget) and looks at every
/// descriptor whether or not it announced anything.
const TICK: Duration = Duration::from_millis(10);

impl MirrorBdev {
    /// Opens the metadata and starts the link: on its own thread, or (`on_reactor`) as a poller
    /// that a reactor takes with [`Bdev::take_poller`] and runs on its loop.
    pub fn start(
        name: &str,
        local: Arc<dyn Bdev>,
        settings: MirrorSettings,
        mut transport: Box<dyn Transport>,
        on_reactor: bool,
    ) -> io::Result<Arc<MirrorBdev>> {
        let size = local.info().size_bytes();
        let (meta_file, meta) = MetaFile::open(&settings.meta_path, size, settings.region_shift)?;
        let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
            ^ u64::from(std::process::id());
        let (mut core, first) = MirrorCore::new(settings.role, settings.site, size, meta, seed);
        core.set_resync_rate(settings.resync_rate);
        core.set_resync_latency_target(settings.resync_latency_target);
        core.set_lease_ms(settings.heartbeat_timeout.as_millis() as u64 / 2);
        core.set_retry_ms(settings.retry_interval.as_millis() as u64);
        if let Some(m) = &settings.metro {
            m.core.check().map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let now_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
            core.set_metro(m.core.clone(), now_us);
        }
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let shared = Arc::new(Shared {
            channels: ArcSwap::from_pointee(Vec::new()),
            access: AtomicU8::new(access_code(core.access())),
            orders: AtomicBool::new(false),
            lease_until_ms: AtomicU64::new(core.lease_deadline_ms()),
            started: Instant::now(),
            resync: AtomicBool::new(false),
            status: Mutex::new(StatusReport::default()),
            failback: AtomicBool::new(false),
            promote: Mutex::new(None),
            switchover: Mutex::new(None),
            depart: Mutex::new(None),
            tuning: Mutex::new(None),
            tuning_pending: AtomicBool::new(false),
            waker,
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        transport.register(poll.registry(), LISTENER)?;
        let local_ch = local.clone().channel()?;
        for fd in local_ch.wake_fds() {
            poll.registry().register(&mut mio::unix::SourceFd(&fd), LOCAL, Interest::READABLE)?;
        }
        let witness = match &settings.metro {
            Some(m) => {
                let bind: std::net::SocketAddr = if m.witness.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
                let mut sock = mio::net::UdpSocket::bind(bind)?;
                poll.registry().register(&mut sock, WITNESS, Interest::READABLE)?;
                Some(WitnessLink { sock, addr: m.witness, secret: m.secret.clone(), sent: None, rtt: None })
            }
            None => None,
        };
        let mut link = LinkThread {
            witness,
            name: name.to_string(),
            core,
            meta_file,
            local_ch,
            poll,
            transport,
            conns: Vec::new(),
            ports: Vec::new(),
            port_overflow: Vec::new(),
            ports_sent: 0,
            epoch: 0,
            lanes: LaneLink::new(),
            link_ups: 0,
            last_down: None,
            pending: HashMap::new(),
            next_tag: 1,
            settings,
            shared: shared.clone(),
            ping_sent: None,
            rtt: None,
            speed: (Instant::now(), 0, 0),
            signal: Vec::new(),
            ready: Vec::new(),
            frames: Vec::new(),
            outputs: Vec::new(),
            payloads: crate::IoBufPool::new(),
            events: Events::with_capacity(64),
            more_events: false,
            completions: Vec::new(),
            last_tick: Instant::now(),
            broken: false,
            pending_conns: Vec::new(),
            refusals: RefusalLog::new(),
            last_publish: Instant::now() - Duration::from_secs(1),
            switch_reply: None,
            depart_reply: None,
            stop_switch: None,
            departed: false,
        };
        // On reactors: a worker per lane past the first, for other reactors to take (lane k:
        // port k - 1). A link on a thread of its own drives every lane itself.
        let mut helpers = Vec::new();
        for _ in 1..if on_reactor { link.settings.lanes.clamp(1, MAX_LANES) } else { 1 } {
            let (worker, port) = LaneWorker::new(shared.clone(), link.payloads.clone(), link.settings.link_delay)?;
            link.ports.push(port);
            link.port_overflow.push(std::collections::VecDeque::new());
            helpers.push(worker);
        }
        link.run_outputs(&mut { first });
        link.publish();
        link.deliver();
        let info = BdevInfo { name: name.to_string(), ..local.info().clone() };
        let (thread, poller) = if on_reactor {
            (None, Some(link))
        } else {
            (Some(std::thread::Builder::new().name(format!("mirror-{name}")).spawn(move || link.run())?), None)
        };
        Ok(Arc::new(MirrorBdev {
            info,
            local,
            shared,
            thread: Mutex::new(thread),
            poller: Mutex::new(poller),
            helpers: Mutex::new(helpers),
        }))
    }

    pub fn status(&self) -> StatusReport {
        self.shared.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The operator forces this metro leg to serve alone ([`MirrorCore::force_promote`]); what
    /// happened, or why it was refused.
    pub fn force_promote(&self) -> Result<String, String> {
        let (tx, rx) = std::sync::mpsc::channel();
        {
            let mut slot = self.shared.promote.lock().map_err(|_| "the mirror's link thread is gone".to_string())?;
            if slot.is_some() {
                return Err("another promotion request is pending".into());
            }
            *slot = Some(tx);
        }
        let _ = self.shared.waker.wake();
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(outcome) => outcome,
            Err(_) => {
                // Taken back if the link thread has not seen it: then nothing happened.
                let untouched = self.shared.promote.lock().map(|mut s| s.take().is_some()).unwrap_or(false);
                Err(if untouched {
                    "the mirror's link thread did not answer: nothing changed".into()
                } else {
                    "the mirror's link thread took the request but did not answer in 5 s: see `nvmetro status`".into()
                })
            }
        }
    }

    /// This site sees every write first and serves with a live lease: the site whose writes
    /// feed a DR group over the mirror (see [`crate::dr::group`]).
    pub fn feeds_dr(&self) -> bool {
        self.shared.orders.load(Ordering::Acquire)
            && matches!(self.access(), Access::Serving | Access::Sole | Access::Leading)
            && self.shared.leased()
    }

    /// A Failed leg retries its resync now (`nvmetro resync NAME`); returns whether the leg is
    /// Failed (otherwise there is nothing to retry).
    pub fn resync(&self) -> bool {
        let failed = self.status().disk == DiskState::Failed.name();
        self.shared.resync.store(true, Ordering::Release);
        let _ = self.shared.waker.wake();
        failed
    }
}

impl Shared {
    /// No channel has an operation for the link.
    fn inbox_empty(&self) -> bool {
        self.channels.load().iter().all(|q| q.inbox.is_empty())
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Whether host I/O may be served at this instant.
    fn leased(&self) -> bool {
        self.now_ms() < self.lease_until_ms.load(Ordering::Acquire)
    }
}

impl Drop for MirrorBdev {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.shared.waker.wake();
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

impl Bdev for MirrorBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }

    fn access(&self) -> Access {
        access_of(self.shared.access.load(Ordering::Acquire))
    }

    fn tune(&self, tuning: MirrorTuning) {
        if let Ok(mut t) = self.shared.tuning.lock() {
            *t = Some(tuning);
            self.shared.tuning_pending.store(true, Ordering::Release);
        }
        let _ = self.shared.waker.wake();
    }

    fn failback(&self) -> bool {
        let held = self.status().metro.is_some_and(|m| m.failback_pending);
        self.shared.failback.store(true, Ordering::Release);
        let _ = self.shared.waker.wake();
        held
    }

    fn mirror_status(&self) -> Option<StatusReport> {
        Some(self.status())
    }

    fn as_mirror(&self) -> Option<&MirrorBdev> {
        Some(self)
    }

    fn take_poller(&self) -> Option<Box<dyn crate::Poller>> {
        self.poller.lock().ok()?.take().map(|l| Box::new(l) as Box<dyn crate::Poller>)
    }

    fn take_helper_pollers(&self) -> Vec<Box<dyn crate::Poller>> {
        let workers = self.helpers.lock().map(|mut h| std::mem::take(&mut *h)).unwrap_or_default();
        workers.into_iter().map(|w| Box::new(w) as Box<dyn crate::Poller>).collect()
    }

    fn channel(self: Arc<Self>) -> io::Result<Box<dyn BdevChannel>> {
        let queue = Arc::new(ChanQueue {
            inbox: ArrayQueue::new(CHANNEL_DEPTH),
            done: ArrayQueue::new(CHANNEL_DEPTH),
            eventfd: nvmetro_ffi::eventfd()?,
            consumer: AtomicU64::new(thread_tag()),
        });
        self.shared.channels.rcu(|v| {
            let mut v = (**v).clone();
            v.push(queue.clone());
            v
        });
        Ok(Box::new(MirrorChannel::new(self.local.clone().channel()?, queue, self.shared.clone())))
    }
}

/// The metro leg's UDP socket to the witness.
struct WitnessLink {
    sock: mio::net::UdpSocket,
    addr: std::net::SocketAddr,
    secret: Vec<u8>,
    /// When the last request went out (for the round trip).
    sent: Option<Instant>,
    rtt: Option<Duration>,
}

struct LinkThread {
    witness: Option<WitnessLink>,
    events: Events,
    /// The last poll filled its event buffer: more may be waiting.
    more_events: bool,
    completions: Vec<BdevCompletion>,
    last_tick: Instant,
    last_publish: Instant,
    /// Where the outcome of the switchover under way goes.
    switch_reply: Option<std::sync::mpsc::Sender<Result<String, String>>>,
    /// A planned departure under way: who waits, since when.
    depart_reply: Option<(std::sync::mpsc::Sender<String>, Instant)>,
    /// A clean stop of the ordering leg switching over first: who waits for the departure after.
    stop_switch: Option<(std::sync::mpsc::Sender<String>, Instant)>,
    /// Departed: the link stays closed until this leg stops.
    departed: bool,
    /// The metadata could not be stored: fenced until a restart.
    broken: bool,
    /// Connections in their authentication handshake.
    pending_conns: Vec<PendingConn>,
    refusals: RefusalLog,
    name: String,
    core: MirrorCore,
    meta_file: MetaFile,
    local_ch: Box<dyn BdevChannel>,
    poll: Poll,
    transport: Box<dyn Transport>,
    /// The link's lanes, lane 0 first (none: the link is down).
    conns: Vec<Lane>,
    /// The workers that can drive lanes 1.. on reactors of their own (lane k: `ports[k - 1]`).
    ports: Vec<Arc<LanePort>>,
    /// Frames for a port whose queue was full, in order.
    port_overflow: Vec<std::collections::VecDeque<Frame>>,
    /// Ports that were sent frames in this turn (a bit each).
    ports_sent: u32,
    /// Counts the links that went down: a worker drops a connection of an older epoch.
    epoch: u64,
    lanes: LaneLink,
    /// Times the link came up.
    link_ups: u64,
    /// Why the link last went down, and when.
    last_down: Option<(String, Instant)>,
    /// Core tag -> (channel index, reactor tag, when a write arrived).
    pending: HashMap<u64, (usize, u64, Option<Instant>)>,
    next_tag: u64,
    settings: MirrorSettings,
    shared: Arc<Shared>,
    ping_sent: Option<Instant>,
    rtt: Option<Duration>,
    /// (when, synced bytes then, bytes per second)
    speed: (Instant, u64, u64),
    signal: Vec<usize>,
    /// Completions waiting for [`LinkThread::deliver`].
    ready: Vec<(u64, Result<crate::BdevOutput, BdevError>)>,
    /// Frames of the last read, between parsing and handling (kept for its capacity).
    frames: Vec<Frame>,
    /// The core's outputs for the input being handled (kept for its capacity).
    outputs: Vec<Output>,
    /// Buffers for the payloads the peer sends (writes to apply, resync data).
    payloads: crate::IoBufPool,
}

impl LinkThread {
    fn handle(&mut self, input: Input) {
        self.handle_batch(|link, out| link.feed(input, out));
    }

    /// Hands the core the inputs `feed` gives it (through [`LinkThread::feed`]), all of them
    /// before any output runs.
    fn handle_batch(&mut self, feed: impl FnOnce(&mut Self, &mut Vec<Output>)) {
        self.core.observe_clock(self.shared.now_ms());
        // The outputs' vector is kept for its capacity (a write's handling allocates nothing).
        let mut out = std::mem::take(&mut self.outputs);
        feed(self, &mut out);
        self.run_outputs(&mut out);
        // Narrower access first, completions after: a host that saw an answer never finds this
        // leg serving a read on the state before it.
        self.publish_access();
        self.deliver();
        self.outputs = out;
    }

    /// One input for the core, inside [`LinkThread::handle_batch`].
    fn feed(&mut self, input: Input, out: &mut Vec<Output>) {
        if self.broken {
            // The core's state is ahead of its durable metadata: it decides nothing any more.
            if let Input::Host { tag, .. } = input {
                self.complete(tag, Err(BdevError::Fenced));
            }
            return;
        }
        self.core.handle(input, out);
    }

    /// A host operation's completion, delivered by [`LinkThread::deliver`].
    fn complete(&mut self, tag: u64, result: Result<crate::BdevOutput, BdevError>) {
        self.ready.push((tag, result));
    }

    /// Executes (and removes) `out` in order.
    fn run_outputs(&mut self, out: &mut Vec<Output>) {
        for o in out.drain(..) {
            match o {
                Output::Local { id, op } => self.local_ch.submit(id, op),
                Output::Send(mut f) => {
                    if f.kind == Kind::Ping {
                        self.ping_sent = Some(Instant::now());
                    }
                    if !self.conns.is_empty() {
                        let hint = self.lanes.hinted(f.seq);
                        let lane = self.lanes.tx.send_on(&mut f, hint);
                        match &mut self.conns[lane] {
                            Lane::Here(c) => c.queue_frame(&f, self.settings.link_delay, Instant::now()),
                            Lane::Reactor(i) => {
                                let i = *i;
                                self.send_on_port(i, f);
                            }
                        }
                    }
                }
                Output::Complete { tag, result } => self.complete(tag, result),
                Output::Persist => {
                    if let Err(e) = self.meta_file.store(self.core.meta()) {
                        // Without durable metadata nothing after it may happen: not the writes it
                        // was to precede, not a frame, not a completion.
                        tracing::error!(mirror = %self.name, "cannot persist mirror metadata: {e}; fenced until restarted");
                        self.broken = true;
                        self.publish_access();
                        self.link_down("metadata cannot be stored");
                        let tags: Vec<u64> = self.pending.keys().copied().collect();
                        for tag in tags {
                            self.complete(tag, Err(BdevError::Fenced));
                        }
                        return;
                    }
                }
                Output::Witness(req) => {
                    if let Some(w) = self.witness.as_mut() {
                        let bytes = req.encode(&w.secret);
                        if w.sock.send_to(&bytes, w.addr).is_ok() && w.sent.is_none() {
                            w.sent = Some(Instant::now());
                        }
                    }
                }
            }
        }
    }

    /// One turn of the link: returns whether any work was done. `ready`: the link's descriptors
    /// may have something (on a reactor, its epoll set turned readable). Without it, and with no
    /// tick due, the turn makes no syscall that could only find nothing: the host operations,
    /// local completions and operator requests it looks at are in memory.
    fn turn(&mut self, timeout: Duration, ready: bool) -> bool {
        let mut work = false;
        // Every tick looks at everything: a safety net under the readiness events.
        let look_everywhere = |l: &LinkThread| Instant::now().duration_since(l.last_tick) >= TICK || l.more_events || l.needs_io();
        let (mut conn, mut witness, mut accept) = (false, false, false);
        if ready || !timeout.is_zero() || look_everywhere(self) {
            let mut events = std::mem::replace(&mut self.events, Events::with_capacity(0));
            let _ = self.poll.poll(&mut events, Some(timeout));
            // A full batch may leave events behind that no new edge will announce.
            self.more_events = events.iter().count() >= events.capacity();
            for ev in events.iter() {
                match ev.token() {
                    CONN => conn = true,
                    WITNESS => witness = true,
                    LISTENER | PENDING => accept = true,
                    _ => {}
                }
            }
            self.events = events;
        }
        if look_everywhere(self) {
            (conn, witness, accept) = (true, true, true);
        }
        // Workers on other reactors announce frames and failures by waking the link.
        conn |= self.ports_have_news();
        if accept {
            self.connect_or_accept();
            work |= self.drive_handshakes();
        }
        work |= self.take_host_operations();
        if conn {
            work |= self.receive();
        }
        if witness {
            work |= self.receive_witness();
        }
        if self.shared.failback.swap(false, Ordering::AcqRel) {
            self.handle(Input::Failback);
        }
        if let Some(tx) = self.shared.promote.lock().ok().and_then(|mut p| p.take()) {
            let mut outcome = Err("the mirror's metadata cannot be stored: fenced until restarted".to_string());
            if !self.broken {
                self.handle_batch(|link, out| outcome = link.core.force_promote(out));
            }
            if self.broken && outcome.is_ok() {
                outcome = Err("the new generation could not be stored: fenced until restarted".into());
            }
            match &outcome {
                Ok(what) => tracing::error!(mirror = %self.name, "FORCED PROMOTION by the operator: {what}"),
                Err(why) => tracing::warn!(mirror = %self.name, "forced promotion refused: {why}"),
            }
            let _ = tx.send(outcome);
        }
        if self.shared.resync.swap(false, Ordering::AcqRel) {
            self.handle(Input::Resync);
        }
        self.planned_requests();
        if self.shared.tuning_pending.swap(false, Ordering::AcqRel) {
            if let Some(t) = self.shared.tuning.lock().ok().and_then(|mut t| t.take()) {
                self.core.set_resync_rate(t.resync_rate);
                self.core.set_resync_latency_target(t.resync_latency_target);
                self.settings.link_delay = t.link_delay;
                for port in &self.ports {
                    port.set_delay(t.link_delay);
                }
                self.settings.heartbeat_timeout = t.heartbeat_timeout;
                if let Some(m) = self.settings.metro.as_mut() {
                    m.core.manual_failback = t.manual_failback;
                    m.core.set_heartbeat(t.heartbeat_timeout.as_millis() as u64);
                    self.core.set_metro_timers(m.core.clone());
                }
                tracing::info!(mirror = %self.name, ?t, "replication settings changed");
            }
        }
        let mut completions = std::mem::take(&mut self.completions);
        if self.local_ch.outstanding() > 0 && self.local_ch.poll(&mut completions) > 0 {
            work = true;
            for c in completions.drain(..) {
                self.handle(Input::LocalDone { id: c.tag, result: c.result });
            }
        }
        self.completions = completions;
        let now = Instant::now();
        if now.duration_since(self.last_tick) >= TICK {
            self.last_tick = now;
            self.handle(Input::Tick { now_ms: self.shared.now_ms() });
            // (The core pings the peer; its answers keep the lease.)
            if self.conns.first().and_then(Lane::here_ref).is_some_and(|c| c.last_rx.elapsed() > self.settings.heartbeat_timeout) {
                self.link_down("peer silent past the heartbeat timeout");
            }
            if self.lanes.held_since().is_some_and(|t| t.elapsed() > self.settings.heartbeat_timeout) {
                self.link_down("a lane is stuck: frames waited past the heartbeat timeout for frames sent before them");
            }
            self.dial_lanes();
            self.move_lanes_to_reactors();
            self.discard_stale_ports();
        }
        self.flush();
        // Completions handed over count as work: the reactor polls its channels before it may
        // park (and gets no signal for a channel it polls itself).
        work |= !self.signal.is_empty();
        self.signal.sort_unstable();
        self.signal.dedup();
        let channels = self.shared.channels.load();
        let here = thread_tag();
        for chan in self.signal.drain(..) {
            if let Some(q) = channels.get(chan).filter(|q| q.consumer.load(Ordering::Relaxed) != here) {
                nvmetro_ffi::eventfd_signal(&q.eventfd);
            }
        }
        if now.duration_since(self.last_publish) >= Duration::from_millis(100) {
            self.last_publish = now;
            self.publish();
        }
        work
    }

    /// Descriptors must be looked at whether or not they announced anything: an in-memory link
    /// with bytes due, a dial in progress, a handshake with bytes to write.
    fn needs_io(&self) -> bool {
        self.bytes_due_in_memory() || self.transport.connecting()
    }

    /// An in-memory link or a handshake has bytes to move now (no descriptor announces them).
    fn bytes_due_in_memory(&self) -> bool {
        self.here().any(|c| c.sock.pending() || c.rx_fresh) || self.pending_conns.iter().any(|p| !p.tx.is_empty() || p.sock.pending())
    }

    fn holding(&self) -> bool {
        self.needs_io() || self.here().any(|c| !c.delayed.is_empty() || c.fill_blocked)
    }

    /// The link on its own thread: spin (yielding) for `settings.spin`, then sleep in epoll.
    fn run(mut self) {
        let mut idle_since: Option<Instant> = None;
        while !self.shared.stop.load(Ordering::Acquire) {
            let timeout = match idle_since {
                _ if self.holding() => Duration::ZERO,
                Some(t) if t.elapsed() > self.settings.spin => {
                    self.shared.parked.store(true, Ordering::SeqCst);
                    if self.shared.inbox_empty() && !self.ports_have_news() {
                        Duration::from_millis(10)
                    } else {
                        Duration::ZERO
                    }
                }
                Some(_) if !self.settings.spin.is_zero() => {
                    std::thread::yield_now();
                    Duration::ZERO
                }
                _ => Duration::ZERO,
            };
            let work = self.turn(timeout, true);
            self.shared.parked.store(false, Ordering::SeqCst);
            if work {
                idle_since = None;
            } else {
                idle_since.get_or_insert(Instant::now());
            }
        }
    }
}

impl crate::Poller for LinkThread {
    fn poll(&mut self, ready: bool) -> bool {
        self.turn(Duration::ZERO, ready)
    }

    fn wake_fds(&self) -> Vec<RawFd> {
        // The link's own epoll set (socket, listener, waker, local completions) is itself a
        // descriptor that turns readable when any of them does.
        vec![self.poll.as_raw_fd()]
    }

    fn parking(&mut self, parked: bool) {
        self.shared.parked.store(parked, Ordering::SeqCst);
        // Before next_deadline's loads: a push after them sees `parked` and wakes the link.
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    fn next_deadline(&self) -> Option<Instant> {
        let now = Instant::now();
        if self.bytes_due_in_memory() || self.more_events || !self.shared.inbox_empty() || self.ports_have_news() {
            return Some(now);
        }
        let mut at = self.last_tick + TICK;
        for (due, _, _) in self.here().filter_map(|c| c.delayed.front()) {
            at = at.min(*due);
        }
        if self.here().any(|c| c.fill_blocked) {
            at = at.min(now + RESYNC_RECHECK);
        }
        if self.transport.connecting() {
            // A dial in progress announces nothing: look again soon.
            at = at.min(now + Duration::from_millis(1));
        }
        Some(at)
    }
}
