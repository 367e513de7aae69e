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

use super::core::{Access, Input, LinkState, Metro, MirrorCore, MirrorStatus, Output, ResyncLatencyTarget, Role};
use super::frame::{Frame, Kind};
use super::meta::MetaFile;
use super::outbox::{Conn, RESYNC_RECHECK};
use super::transport::{LinkStream, Transport};
use super::DiskState;
use crate::{Bdev, BdevChannel, BdevCompletion, BdevError, BdevInfo, BdevOp};
use arc_swap::ArcSwap;
use crossbeam_queue::ArrayQueue;
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod planned;
pub use planned::DEPART_WAIT;

/// How a mirror leg is set up.
#[derive(Debug, Clone)]
pub struct MirrorSettings {
    pub role: Role,
    pub site: u8,
    pub meta_path: PathBuf,
    /// Regions of `1 << region_shift` bytes (dirty tracking and resync unit).
    pub region_shift: u32,
    /// Resync budget in bytes per second; 0 for unlimited.
    pub resync_rate: u64,
    /// The host write latency a resync steers to.
    pub resync_latency_target: ResyncLatencyTarget,
    pub heartbeat_timeout: Duration,
    /// Added to every frame this leg sends (emulated distance).
    pub link_delay: Duration,
    /// How long the idle link thread keeps polling (yielding the CPU between turns) before it
    /// sleeps in epoll; zero sleeps at once, which leaves the cores to reactors on small machines.
    pub spin: Duration,
    /// Metro mode: a witness decides who serves alone.
    pub metro: Option<MetroSettings>,
    /// How often a leg whose device failed retries to resync (zero: only `nvmetro resync`).
    pub retry_interval: Duration,
    /// The replication link's shared secret (both sites the same). Empty: connections still
    /// make the handshake (a stray or garbled connection never becomes the link), but anyone
    /// who speaks the protocol passes it.
    pub secret: Vec<u8>,
}

/// A connection must finish the authentication handshake within this.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections in their handshake at once; a newer one closes the oldest.
pub const MAX_PENDING: usize = 8;

/// The replication settings a running mirror takes without a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MirrorTuning {
    /// Bytes per second; 0 for unlimited.
    pub resync_rate: u64,
    pub resync_latency_target: ResyncLatencyTarget,
    pub link_delay: Duration,
    pub heartbeat_timeout: Duration,
    pub manual_failback: bool,
}

/// A metro leg's witness and timers.
#[derive(Debug, Clone)]
pub struct MetroSettings {
    pub witness: std::net::SocketAddr,
    pub secret: Vec<u8>,
    pub core: Metro,
}

/// What `nvmetro status` shows of a mirror.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StatusReport {
    pub role: String,
    pub disk: String,
    pub peer_disk: String,
    pub link: String,
    pub serving: bool,
    pub out_of_sync_bytes: u64,
    pub sync_total_bytes: u64,
    pub synced_bytes: u64,
    pub sync_bytes_per_second: u64,
    pub replication_rtt_us: Option<u64>,
    pub peer: String,
    /// "serving", "serving alone", "transition" or "fenced".
    pub access: String,
    pub metro: Option<super::core::MetroStatus>,
    pub witness_rtt_us: Option<u64>,
    /// Why this leg's device is Failed (what, where, for how long).
    pub failure: Option<String>,
    /// Why the peer's device is Failed, as it reported.
    pub peer_failure: Option<String>,
    /// Seconds this leg's device has been Failed.
    pub failed_for_seconds: Option<u64>,
    /// Metadata writes (each with its sync) since start.
    pub metadata_syncs: u64,
    /// Times this leg's device failed (and the leg was faulted) since start.
    pub leg_failures: u64,
    /// Replication connections refused since start (handshake failed or timed out, too many).
    pub link_refusals: u64,
}

impl StatusReport {
    /// Percentage of the current resync done: 100 when in sync, none while out of sync with no
    /// resync under way (disconnected, or the peer Failed).
    pub fn sync_percent(&self) -> Option<f64> {
        if self.out_of_sync_bytes == 0 {
            Some(100.0)
        } else if self.sync_total_bytes == 0 || !self.link.starts_with("Sync") {
            None
        } else {
            Some(100.0 * self.synced_bytes as f64 / self.sync_total_bytes as f64)
        }
    }

    /// Seconds left at the current resync speed.
    pub fn eta_seconds(&self) -> Option<u64> {
        (self.out_of_sync_bytes > 0 && self.sync_bytes_per_second > 0).then(|| self.out_of_sync_bytes / self.sync_bytes_per_second)
    }
}

/// Operations a channel may have with the link at once; more wait in the channel (backpressure).
const CHANNEL_DEPTH: usize = 1024;

/// A reactor's channel to the link: bounded, lock-free, one producer and one consumer each way.
struct ChanQueue {
    /// Operations for the link: (the channel's tag, operation).
    inbox: ArrayQueue<(u64, BdevOp)>,
    /// Completions for the channel; never fuller than `inbox` was (one per operation).
    done: ArrayQueue<BdevCompletion>,
    eventfd: OwnedFd,
    /// The thread that last polled the channel ([`thread_tag`]): when the link runs on that same
    /// thread (a poller on the channel's reactor) the reactor polls the queue in the same turn,
    /// and the eventfd signal (a syscall) is skipped.
    consumer: AtomicU64,
}

/// A number for the calling thread, unique in the process.
fn thread_tag() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TAG: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TAG.with(|t| *t)
}

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

fn access_code(a: Access) -> u8 {
    match a {
        Access::Serving => 0,
        Access::Sole => 1,
        Access::Transition => 2,
        Access::Fenced => 3,
        Access::Remote => 4,
        Access::Leading => 5,
        Access::Standby => 6,
    }
}

fn access_of(code: u8) -> Access {
    match code {
        0 => Access::Serving,
        1 => Access::Sole,
        2 => Access::Transition,
        4 => Access::Remote,
        5 => Access::Leading,
        6 => Access::Standby,
        _ => Access::Fenced,
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

/// A connection proving itself (see [`super::auth`]).
struct PendingConn {
    sock: Box<dyn LinkStream>,
    handshake: super::auth::Handshake,
    /// Handshake bytes not yet written.
    tx: Vec<u8>,
    since: Instant,
}

/// Log lines about refused connections: at most one a second, with a count of the rest.
struct RefusalLog {
    last: Option<Instant>,
    suppressed: u64,
    total: u64,
}

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
            conn: None,
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
            refusals: RefusalLog { last: None, suppressed: 0, total: 0 },
            last_publish: Instant::now() - Duration::from_secs(1),
            switch_reply: None,
            depart_reply: None,
            stop_switch: None,
            departed: false,
        };
        link.run_outputs(&mut { first });
        link.publish();
        link.deliver();
        let info = BdevInfo { name: name.to_string(), ..local.info().clone() };
        let (thread, poller) = if on_reactor {
            (None, Some(link))
        } else {
            (Some(std::thread::Builder::new().name(format!("mirror-{name}")).spawn(move || link.run())?), None)
        };
        Ok(Arc::new(MirrorBdev { info, local, shared, thread: Mutex::new(thread), poller: Mutex::new(poller) }))
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
        Ok(Box::new(MirrorChannel {
            local: self.local.clone().channel()?,
            queue,
            shared: self.shared.clone(),
            inflight: 0,
            waiting: std::collections::VecDeque::new(),
            refused: Vec::new(),
        }))
    }
}

struct MirrorChannel {
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
    conn: Option<Conn>,
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

    /// Every operation the channels sent, handled as one batch: the core sees them all before
    /// any output runs, so the metadata they dirty is made durable with one sync, not one each
    /// (each output still runs after the store that covers it: the first store writes the
    /// core's state after the whole batch, and [`MetaFile::store`] skips the ones after it).
    fn take_host_operations(&mut self) -> bool {
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
                    link.feed(Input::Host { tag: t, op }, out);
                }
            }
        });
        true
    }

    /// Hands the completions of the last input to the reactors.
    fn deliver(&mut self) {
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

    /// Access and lease for the reactors, at once (not at the end of the turn): a leg that just
    /// fenced itself must not serve one more read while its answers leave.
    fn publish_access(&mut self) {
        let (access, lease) = if self.broken { (Access::Fenced, 0) } else { (self.core.access(), self.core.lease_deadline_ms()) };
        self.shared.lease_until_ms.store(lease, Ordering::Release);
        self.shared.access.store(access_code(access), Ordering::Release);
        self.shared.orders.store(!self.broken && self.core.orders_writes(), Ordering::Release);
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
                Output::Send(f) => {
                    if f.kind == Kind::Ping {
                        self.ping_sent = Some(Instant::now());
                    }
                    if let Some(c) = self.conn.as_mut() {
                        let resync_data = f.kind == Kind::Resync && !f.payload.is_empty();
                        if self.settings.link_delay.is_zero() && !resync_data {
                            c.queue(&f);
                        } else {
                            let mut bytes = Vec::with_capacity(f.payload.len() + 64);
                            f.encode(&mut bytes);
                            if self.settings.link_delay.is_zero() {
                                c.bulk.push_back(bytes);
                            } else {
                                c.delayed.push_back((Instant::now() + self.settings.link_delay, bytes, resync_data));
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

    /// An authenticated connection becomes the link; `early` are frame bytes that arrived with
    /// the end of the handshake, `proof` the handshake bytes still to send (before any frame).
    fn link_up(&mut self, mut sock: Box<dyn LinkStream>, early: &[u8], proof: Vec<u8>) {
        if self.broken {
            return;
        }
        if self.conn.is_some() {
            self.link_down("replaced by the peer's new, authenticated connection");
        }
        if sock.register(self.poll.registry(), CONN).is_err() {
            return;
        }
        tracing::info!(mirror = %self.name, peer = %self.transport.describe(), "replication link up (authenticated)");
        let mut rx = vec![0; 4 << 20];
        rx[..early.len()].copy_from_slice(early);
        let mut conn = Conn::new(sock, rx, early.len());
        conn.tx = proof;
        self.conn = Some(conn);
        self.handle(Input::LinkUp);
    }

    fn refused(&mut self, why: &str) {
        self.refusals.total += 1;
        let now = Instant::now();
        if self.refusals.last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            let more = std::mem::take(&mut self.refusals.suppressed);
            let more = if more > 0 { format!(" ({more} more refused in the last second)") } else { String::new() };
            tracing::warn!(mirror = %self.name, "replication connection refused: {why}{more}");
            self.refusals.last = Some(now);
        } else {
            self.refusals.suppressed += 1;
        }
    }

    /// A new connection starts its handshake (the live link, if any, is not touched).
    fn start_handshake(&mut self, mut sock: Box<dyn LinkStream>) {
        let nonce = match super::auth::fresh_nonce() {
            Ok(n) => n,
            Err(e) => return self.refused(&format!("no randomness for a nonce: {e}")),
        };
        if sock.register(self.poll.registry(), PENDING).is_err() {
            return;
        }
        if self.pending_conns.len() >= MAX_PENDING {
            let mut oldest = self.pending_conns.remove(0);
            oldest.sock.deregister(self.poll.registry());
            self.refused("too many connections in their handshake: closed the oldest");
        }
        let mut handshake = super::auth::Handshake::new(&self.settings.secret, self.transport.side(), nonce);
        let tx = handshake.take_output();
        self.pending_conns.push(PendingConn { sock, handshake, tx, since: Instant::now() });
    }

    /// Moves every handshake on; promotes the first that completes to the link.
    fn drive_handshakes(&mut self) -> bool {
        let mut work = false;
        let mut i = 0;
        while i < self.pending_conns.len() {
            let p = &mut self.pending_conns[i];
            let mut outcome: Result<Option<Vec<u8>>, String> = Ok(None);
            // Write what the handshake has to say.
            while !p.tx.is_empty() {
                match p.sock.write(&p.tx) {
                    Ok(0) => break,
                    Ok(n) => {
                        p.tx.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        outcome = Err(format!("write: {e}"));
                        break;
                    }
                }
            }
            let mut buf = [0u8; 4096];
            while outcome == Ok(None) {
                match p.sock.read(&mut buf) {
                    Ok(0) => {
                        outcome = Err(p.handshake.on_eof().err().map_or("closed".to_string(), |e| e.to_string()));
                    }
                    Ok(n) => {
                        work = true;
                        match p.handshake.on_bytes(&buf[..n]) {
                            Ok(progress) => {
                                p.tx.extend(p.handshake.take_output());
                                if progress.done {
                                    outcome = Ok(Some(buf[progress.consumed..n].to_vec()));
                                }
                            }
                            Err(e) => outcome = Err(e.to_string()),
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => outcome = Err(format!("read: {e}")),
                }
            }
            if outcome == Ok(None) && p.since.elapsed() > AUTH_TIMEOUT {
                outcome = Err("no handshake within the timeout".into());
            }
            match outcome {
                Ok(None) => i += 1,
                Ok(Some(early)) => {
                    let mut p = self.pending_conns.remove(i);
                    // Our proof may still be on its way: it goes out before any frame.
                    let mut proof = std::mem::take(&mut p.tx);
                    proof.extend(p.handshake.take_output());
                    p.sock.deregister(self.poll.registry());
                    self.link_up(p.sock, &early, proof);
                    work = true;
                }
                Err(why) => {
                    let mut p = self.pending_conns.remove(i);
                    p.sock.deregister(self.poll.registry());
                    self.transport.failed();
                    self.refused(&why);
                }
            }
        }
        work
    }

    fn link_down(&mut self, why: &str) {
        if let Some(mut c) = self.conn.take() {
            c.sock.deregister(self.poll.registry());
            tracing::warn!(mirror = %self.name, "replication link down: {why}");
            self.ping_sent = None;
            self.handle(Input::LinkDown);
            self.transport.failed();
        }
    }

    fn connect_or_accept(&mut self) {
        if self.departed {
            // A clean stop handed the namespace to the peer: this leg stays away.
            return;
        }
        if let Some(sock) = self.transport.poll_connect(self.conn.is_some() || !self.pending_conns.is_empty()) {
            self.start_handshake(sock);
        }
    }

    /// Reads and handles everything the peer sent; returns whether anything arrived. Frames are
    /// handled as they complete, so the receive buffer only ever holds one partial frame.
    fn receive(&mut self) -> bool {
        let mut got = false;
        loop {
            let Some(c) = self.conn.as_mut() else { return got };
            let space = c.rx.len() - c.rx_len;
            let n = match c.sock.read(&mut c.rx[c.rx_len..]) {
                Ok(0) => {
                    self.link_down("peer closed the link");
                    return got;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.link_down(&format!("read: {e}"));
                    return got;
                }
            };
            c.rx_len += n;
            c.last_rx = Instant::now();
            got = true;
            let mut used = 0;
            let mut frames = std::mem::take(&mut self.frames);
            let mut bad = None;
            loop {
                match Frame::parse_into(&c.rx[used..c.rx_len], Some(&self.payloads)) {
                    Ok(Some((f, len))) => {
                        used += len;
                        frames.push(f);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        bad = Some(e);
                        break;
                    }
                }
            }
            c.rx.copy_within(used..c.rx_len, 0);
            c.rx_len -= used;
            let full = c.rx_len == c.rx.len();
            for f in frames.drain(..) {
                if f.kind == Kind::Pong {
                    if let Some(t) = self.ping_sent.take() {
                        self.rtt = Some(t.elapsed());
                    }
                }
                self.handle(Input::Frame(f));
            }
            self.frames = frames;
            if let Some(e) = bad {
                self.link_down(&format!("bad frame: {e}"));
                return got;
            }
            if full {
                self.link_down("frame larger than the receive buffer");
                return got;
            }
            if n < space {
                // A short read emptied the socket: the next byte brings a new readiness edge
                // (and the tick looks anyway), so no read that would only say EAGAIN.
                return got;
            }
        }
    }

    /// Hands the witness's answers to the core; datagrams that fail authentication are dropped.
    fn receive_witness(&mut self) -> bool {
        let mut got = false;
        let mut buf = [0u8; 512];
        loop {
            let Some(w) = self.witness.as_mut() else { return got };
            let n = match w.sock.recv_from(&mut buf) {
                Ok((n, from)) if from == w.addr => n,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return got,
            };
            match super::witness::Reply::parse(&buf[..n], &w.secret) {
                Ok(reply) => {
                    if let Some(t) = w.sent.take() {
                        w.rtt = Some(t.elapsed());
                    }
                    got = true;
                    self.handle(Input::Witness(reply));
                }
                Err(e) => tracing::warn!(mirror = %self.name, "witness reply dropped: {e}"),
            }
        }
    }

    fn flush(&mut self) {
        let Some(c) = self.conn.as_mut() else { return };
        let now = Instant::now();
        while c.delayed.front().is_some_and(|(due, _, _)| *due <= now) {
            let (_, bytes, resync_data) = c.delayed.pop_front().expect("front");
            if resync_data {
                c.bulk.push_back(bytes);
            } else {
                c.tx.extend_from_slice(&bytes);
            }
        }
        if let Err(why) = c.write_out(now) {
            c.clear();
            self.link_down(&why);
        }
    }

    fn publish(&mut self) {
        let st: MirrorStatus = self.core.status();
        self.publish_access();
        let now = Instant::now();
        if now.duration_since(self.speed.0) >= Duration::from_secs(1) {
            let secs = now.duration_since(self.speed.0).as_secs_f64();
            let delta = st.synced_bytes.saturating_sub(self.speed.1);
            self.speed = (now, st.synced_bytes, (delta as f64 / secs) as u64);
        }
        let link = match &st.link {
            LinkState::Down => "Disconnected".to_string(),
            LinkState::Handshake => "Connecting".to_string(),
            LinkState::Syncing { source: true } => "SyncSource".to_string(),
            LinkState::Syncing { source: false } => "SyncTarget".to_string(),
            LinkState::Connected => "Connected".to_string(),
            LinkState::Refused(why) => format!("StandAlone ({why})"),
        };
        let now_ms = self.shared.now_ms();
        let ago = |f: &super::core::Failure| now_ms.saturating_sub(f.since_ms) / 1000;
        let report = StatusReport {
            role: match (st.role, st.configured_role) {
                (Role::Preferred, Role::Preferred) => "Preferred".into(),
                (Role::Secondary, Role::Secondary) => "Secondary".into(),
                (Role::Preferred, Role::Secondary) => "Preferred (orders writes; configured secondary)".into(),
                (Role::Secondary, Role::Preferred) => "Secondary (the peer orders writes; configured preferred)".into(),
            },
            disk: st.disk.name().into(),
            peer_disk: st.peer_disk.map_or("DUnknown", DiskState::name).into(),
            link,
            serving: st.serving,
            out_of_sync_bytes: st.out_of_sync_bytes,
            sync_total_bytes: st.sync_total_bytes,
            synced_bytes: st.synced_bytes,
            sync_bytes_per_second: self.speed.2,
            replication_rtt_us: self.rtt.map(|d| d.as_micros() as u64),
            peer: self.transport.describe(),
            witness_rtt_us: self.witness.as_ref().and_then(|w| w.rtt).map(|d| d.as_micros() as u64),
            access: match st.access {
                Access::Serving => "serving",
                Access::Sole => "serving alone",
                Access::Transition => "transition",
                Access::Fenced => "fenced",
                Access::Remote => "serving through the peer (this leg's device failed)",
                Access::Leading => "serving, ordering writes (planned switchover: Optimized for every host)",
                Access::Standby => "serving, the peer orders writes (planned switchover: Non-Optimized for every host)",
            }
            .into(),
            metro: st.metro,
            metadata_syncs: self.meta_file.syncs(),
            leg_failures: st.leg_failures,
            link_refusals: self.refusals.total,
            failed_for_seconds: st.failure.as_ref().map(&ago),
            failure: st.failure.as_ref().map(|f| format!("{f}, {} s ago", ago(f))),
            peer_failure: st.peer_failure.as_ref().map(|f| format!("{f}, {} s ago", ago(f))),
        };
        if let Ok(mut s) = self.shared.status.lock() {
            *s = report;
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
            if self.conn.as_ref().is_some_and(|c| c.last_rx.elapsed() > self.settings.heartbeat_timeout) {
                self.link_down("peer silent past the heartbeat timeout");
            }
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
        self.conn.as_ref().is_some_and(|c| c.sock.pending()) || self.pending_conns.iter().any(|p| !p.tx.is_empty() || p.sock.pending())
    }

    fn holding(&self) -> bool {
        self.needs_io() || self.conn.as_ref().is_some_and(|c| !c.delayed.is_empty() || c.fill_blocked)
    }

    /// The link on its own thread: spin (yielding) for `settings.spin`, then sleep in epoll.
    fn run(mut self) {
        let mut idle_since: Option<Instant> = None;
        while !self.shared.stop.load(Ordering::Acquire) {
            let timeout = match idle_since {
                _ if self.holding() => Duration::ZERO,
                Some(t) if t.elapsed() > self.settings.spin => {
                    self.shared.parked.store(true, Ordering::SeqCst);
                    if self.shared.inbox_empty() {
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
    }

    fn next_deadline(&self) -> Option<Instant> {
        let now = Instant::now();
        if self.bytes_due_in_memory() || self.more_events || !self.shared.inbox_empty() {
            return Some(now);
        }
        let mut at = self.last_tick + TICK;
        if let Some((due, _, _)) = self.conn.as_ref().and_then(|c| c.delayed.front()) {
            at = at.min(*due);
        }
        if self.conn.as_ref().is_some_and(|c| c.fill_blocked) {
            at = at.min(now + RESYNC_RECHECK);
        }
        if self.transport.connecting() {
            // A dial in progress announces nothing: look again soon.
            at = at.min(now + Duration::from_millis(1));
        }
        Some(at)
    }
}
