//! A consistency group at the production site, with I/O: its members' writes go through one
//! [`Sequencer`] on a thread of its own, and the stream goes to the DR site over an
//! authenticated TCP connection ([`super::link`]) that a dialer thread (re)establishes.
//!
//! * Reactors hand each write their member completed to the group through a lock-free queue
//!   per channel (a channel has at most [`CHANNEL_DEPTH`] writes with the group; more wait in
//!   the channel) and get the release back on another, with an eventfd that wakes a parked
//!   reactor ([`super::member`]). Zeroes and deallocations travel as one small frame each.
//! * A new group (no state file) first copies every member to the DR site, interleaved with host
//!   writes under the same range locks, sending only the regions whose checksums differ
//!   ([`copy`]); the DR image is consistent from `CopyDone`. A new group refuses a DR site that
//!   already holds a stream.
//! * Durable state (`state` in the config): the highest sequence the DR site acknowledged, a
//!   numbering reservation (written before any number past it is used, so a restart never
//!   reuses one), whether the full copy ended, and whether the last stop was clean (everything
//!   numbered was acknowledged). After an unclean stop the writes in the lost send buffer never
//!   reach the DR site: the stream goes on after the reservation (`Rebase`) with a new full copy.
//! * The recovery point (writes, bytes and age not yet durable at the DR site) is published
//!   every 100 ms; crossing `rpo_target` logs a warning (and its end a notice) and counts.
//! * The stream is the group's, named by a producer id kept in the state: the DR site takes a
//!   `Resume` only from the producer whose stream it holds.
//! * Over metro mirrors ([`DrGroupSettings::follows_metro`]) both sites run the group, its
//!   members wrapping each mirror's local leg, so every write either site applies passes it. The
//!   group streams only while its site orders writes for every member and serves
//!   ([`DrGroup::start_with`]'s `active`); otherwise it stands by: it drops its connection and
//!   buffer, lets writes pass, and owes a copy. A group that becomes active and finds the DR site
//!   holding another producer's stream (the other site fed it until a failover or a
//!   switchover) takes it over: `Rebase` past what the DR site holds, then a copy that compares
//!   every region by checksum and sends only what differs, so the writes the old site streamed
//!   but this one never got are replaced by this site's data. The DR image is not consistent
//!   until that copy ends.
//!
//! This file holds the group's API, its shared state and the engine's state and loop; the rest
//! of the engine is in submodules: `writes` (host writes into the sequencer, its outputs), `conn`
//! (the connection to the DR site and its frames), `copy` (full and catch-up copies),
//! `journal` (long-throw journal and overflows), `metro` (over metro mirrors: standing by,
//! taking over), `status` (what `nvmetro status` shows) and `dialer` (the dialer thread).

mod conn;
mod copy;
mod dialer;
mod journal;
mod metro;
mod status;
mod writes;

use super::frame::{DrFrame, MAX_PAYLOAD};
use super::link::FramedConn;
use super::member::DrMemberBdev;
use super::sequencer::{SeqOutput, Sequencer};
use super::state::StateFile;
use super::{DrMode, Member};
use crate::range_lock::{Mode, RangeLocks};
use crate::{Bdev, BdevChannel, BdevCompletion, BdevOp, BdevOutput};
use copy::Copy;
use crossbeam_queue::ArrayQueue;
use dialer::spawn_dialer;
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub use status::DrGroupStatus;

/// Writes a channel may have with the group at once (more wait in the channel).
pub(super) const CHANNEL_DEPTH: usize = 1024;
/// Numbers reserved durably at a time.
const RESERVE: u64 = 1 << 16;
/// The full copy reads this much at a time, with this many reads at once.
const COPY_CHUNK: u64 = 1 << 20;
const COPY_READS: usize = 4;
/// A clean stop waits this long for the DR site to acknowledge what is buffered.
pub const DRAIN_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct DrGroupSettings {
    pub name: String,
    pub dr_site: SocketAddr,
    pub mode: DrMode,
    /// Bytes the send buffer holds at most (short-throw).
    pub buffer_limit: u64,
    pub rpo_target: Option<Duration>,
    pub secret: Vec<u8>,
    pub state: PathBuf,
    /// Added to each direction of the stream (emulated distance, for tests and benchmarks).
    pub link_delay: Duration,
    /// Bytes per second a copy reads at most (none: as fast as the send buffer lets it).
    pub copy_rate: Option<u64>,
    /// Long-throw (async only): the journal file the send buffer spills to, and its size
    /// (0: none; writes overflow as soon as the buffer is full).
    pub journal: Option<(PathBuf, u64)>,
    /// The members are metro mirrors' legs, fed at both sites: the group may take the stream
    /// over from the other site's group (see the module docs).
    pub follows_metro: bool,
}

/// Whether the group's site feeds the DR site now (over metro mirrors: it orders writes for
/// every member and serves).
pub type ActiveCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// The settings a running group takes without a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrTuning {
    pub mode: DrMode,
    pub buffer_limit: u64,
    pub rpo_target: Option<Duration>,
    pub link_delay: Duration,
    pub copy_rate: Option<u64>,
}

/// What a member's channel hands the group: a write its bdev completed.
pub(super) struct Item {
    pub chan: usize,
    pub tag: u64,
    pub member: Member,
    pub offset: u64,
    pub payload: Payload,
}

pub(super) enum Payload {
    Data(Vec<u8>),
    Zeros(u64),
}

pub(super) struct ChanQueue {
    pub inbox: ArrayQueue<Item>,
    /// Tags the group released.
    pub done: ArrayQueue<u64>,
    pub eventfd: OwnedFd,
    /// The channel has writes waiting for a range lock: an unlock elsewhere signals it.
    pub lock_waiters: AtomicBool,
}

impl ChanQueue {
    /// Hands a write back to its channel: the group holds it no longer. There is room: a
    /// channel has at most [`CHANNEL_DEPTH`] writes with the group.
    pub fn release(&self, tag: u64) {
        let pushed = self.done.push(tag);
        debug_assert!(pushed.is_ok(), "a channel had more than {CHANNEL_DEPTH} writes with its DR group");
        nvmetro_ffi::eventfd_signal(&self.eventfd);
    }
}

pub struct GroupShared {
    channels: arc_swap::ArcSwap<Vec<Arc<ChanQueue>>>,
    waker: Waker,
    parked: AtomicBool,
    stop: AtomicBool,
    /// Stopping because the group is removed (a reload): its members may be written without it
    /// before it is added again, so that start compares every region.
    removed: AtomicBool,
    /// The group's thread ended: member channels complete writes without it.
    pub(super) gone: AtomicBool,
    status: Mutex<DrGroupStatus>,
    /// Writes members applied locally that the group has not numbered yet.
    pub(super) unsequenced: std::sync::atomic::AtomicU64,
    /// New settings from a reload, taken on the thread's next turn.
    tuning: Mutex<Option<DrTuning>>,
}

impl std::fmt::Debug for GroupShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DrGroup({})", self.status.lock().map(|s| s.name.clone()).unwrap_or_default())
    }
}

impl GroupShared {
    pub(super) fn add_channel(&self) -> std::io::Result<(usize, Arc<ChanQueue>)> {
        let q = Arc::new(ChanQueue {
            inbox: ArrayQueue::new(CHANNEL_DEPTH),
            done: ArrayQueue::new(CHANNEL_DEPTH),
            eventfd: nvmetro_ffi::eventfd()?,
            lock_waiters: AtomicBool::new(false),
        });
        let mut index = 0;
        self.channels.rcu(|v| {
            let mut v = (**v).clone();
            index = v.len();
            v.push(q.clone());
            v
        });
        Ok((index, q))
    }

    /// A range was unlocked: channels (other than `except`) with writes waiting for a lock look
    /// again.
    pub(super) fn wake_lock_waiters(&self, except: usize) {
        for (i, q) in self.channels.load().iter().enumerate() {
            if i != except && q.lock_waiters.swap(false, Ordering::AcqRel) {
                nvmetro_ffi::eventfd_signal(&q.eventfd);
            }
        }
    }

    pub(super) fn wake(&self) {
        if self.parked.load(Ordering::SeqCst) {
            let _ = self.waker.wake();
        }
    }
}

/// A running consistency group.
#[derive(Debug)]
pub struct DrGroup {
    shared: Arc<GroupShared>,
    members: Vec<Arc<DrMemberBdev>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// A group whose members are being wrapped one by one (each before the bdev built on it opens),
/// not running yet.
pub struct DrGroupBuilder {
    settings: DrGroupSettings,
    shared: Arc<GroupShared>,
    poll: Poll,
    wrapped: Vec<Option<Arc<DrMemberBdev>>>,
}

impl DrGroupBuilder {
    /// Wraps member `index` (in the group's order); use the returned bdev in its place.
    pub fn wrap(&mut self, index: usize, bdev: Arc<dyn Bdev>) -> Arc<dyn Bdev> {
        let m = Arc::new(DrMemberBdev::new(bdev, index as Member, self.shared.clone()));
        self.wrapped[index] = Some(m.clone());
        m
    }

    /// Starts the group once every member is wrapped; `active` (none: always) says whether it
    /// feeds the DR site now.
    pub fn start_with(self, active: Option<ActiveCheck>) -> std::io::Result<Arc<DrGroup>> {
        let DrGroupBuilder { settings, shared, poll, wrapped } = self;
        let Some(wrapped) = wrapped.into_iter().collect::<Option<Vec<_>>>() else {
            return Err(std::io::Error::other(format!("DR group {}: a member was not wrapped", settings.name)));
        };
        if let Ok(mut s) = shared.status.lock() {
            s.members = wrapped.iter().map(|m| m.info().name.clone()).collect();
        }
        let engine = Engine::new(settings, &wrapped, shared.clone(), poll, active)?;
        let thread = std::thread::Builder::new().name(format!("dr-{}", engine.settings.name)).spawn(move || engine.run())?;
        Ok(Arc::new(DrGroup { shared, members: wrapped, thread: Mutex::new(Some(thread)) }))
    }
}

impl DrGroup {
    /// Starts the group over `members` (in the group's order); serve the returned member bdevs
    /// in their place.
    pub fn start(settings: DrGroupSettings, members: Vec<Arc<dyn Bdev>>) -> std::io::Result<Arc<DrGroup>> {
        let mut b = DrGroup::builder(settings, members.len())?;
        for (i, m) in members.into_iter().enumerate() {
            b.wrap(i, m);
        }
        b.start_with(None)
    }

    /// A group of `members` members, to wrap them one by one ([`DrGroupBuilder::wrap`]).
    pub fn builder(settings: DrGroupSettings, members: usize) -> std::io::Result<DrGroupBuilder> {
        let poll = Poll::new()?;
        let shared = Arc::new(GroupShared {
            channels: arc_swap::ArcSwap::from_pointee(Vec::new()),
            waker: Waker::new(poll.registry(), WAKER)?,
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            unsequenced: Default::default(),
            tuning: Mutex::new(None),
            status: Mutex::new(DrGroupStatus { name: settings.name.clone(), ..Default::default() }),
        });
        Ok(DrGroupBuilder { settings, shared, poll, wrapped: vec![None; members] })
    }

    /// The member bdevs to serve, in the group's order.
    pub fn members(&self) -> Vec<Arc<dyn Bdev>> {
        self.members.iter().map(|m| m.clone() as Arc<dyn Bdev>).collect()
    }

    /// The bdevs the members wrap, in the group's order (served again in their place when the
    /// group is removed).
    pub fn inner_members(&self) -> Vec<Arc<dyn Bdev>> {
        self.members.iter().map(|m| m.inner().clone()).collect()
    }

    pub fn status(&self) -> DrGroupStatus {
        self.shared.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Changes mode and limits live (a reload): sync to async releases what sync held back; a
    /// larger buffer admits waiting writes; a smaller one holds new writes until it has room.
    pub fn tune(&self, tuning: DrTuning) {
        if let Ok(mut t) = self.shared.tuning.lock() {
            *t = Some(tuning);
        }
        let _ = self.shared.waker.wake();
    }

    /// Stops the group for good (a reload removed it): as [`DrGroup::stop`], and a later start
    /// over the same state compares every region with the DR site's.
    pub fn remove(&self) {
        self.shared.removed.store(true, Ordering::Release);
        self.stop();
    }

    /// Stops the group once hosts no longer write: waits up to [`DRAIN_WAIT`] for the DR site to
    /// acknowledge what is buffered and records whether the stop was clean.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.shared.waker.wake();
        if let Some(t) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = t.join();
        }
    }
}

impl Drop for DrGroup {
    fn drop(&mut self) {
        self.stop();
    }
}

const WAKER: Token = Token(0);
const CONN: Token = Token(1);
const MEMBERS: Token = Token(2);

struct Engine {
    settings: DrGroupSettings,
    shared: Arc<GroupShared>,
    seq: Sequencer,
    member_ch: Vec<Box<dyn BdevChannel>>,
    member_size: Vec<u64>,
    locks: Vec<Arc<RangeLocks>>,
    poll: Poll,
    events: Events,
    conn: Option<FramedConn>,
    /// The DR site said hello on `conn`.
    greeted: bool,
    /// When `conn` was set up.
    conn_started: Option<Instant>,
    dialed: mpsc::Receiver<(std::net::TcpStream, Vec<u8>)>,
    want_conn: Arc<AtomicBool>,
    /// Sequencer tag -> (channel, the channel's tag, parts not yet released).
    hosts: HashMap<u64, (usize, u64, u32)>,
    /// Sequencer tags of host writes' parts -> their first part's tag.
    parts: HashMap<u64, u64>,
    next_tag: u64,
    state: StateFile,
    reserved: u64,
    copy: Option<Copy>,
    /// The full copy ended with this write (0: no copy was ever needed or it ended long ago).
    copy_done_seq: Option<u64>,
    copied: bool,
    /// Each connection first tells the DR site that the stream goes on after this, until the DR
    /// site shows it took it (it holds a write past it).
    rebase: Option<u64>,
    /// A new group (no state file): the DR site must be new too (unless it follows a metro).
    fresh: bool,
    /// The group's stream's name at the DR site (kept in the state).
    producer: u64,
    /// Whether this site feeds the DR site now (none: always).
    active: Option<ActiveCheck>,
    /// Standing by: the other metro site feeds the DR site; writes pass unnumbered.
    standby: bool,
    /// Standing by, writes passed unnumbered: the next stream starts with a `Rebase` and a copy.
    behind: bool,
    /// Long-throw: the journal file and its size.
    journal: Option<(std::fs::File, u64)>,
    /// A journal write failed: nothing more is spilled until a restart.
    journal_off: bool,
    /// Journal positions whose write failed (sent as zeroes; a full copy follows).
    journal_lost: std::collections::HashSet<u64>,
    /// Writes after this were lost to an overflow: the DR image is not consistent past it until
    /// the catch-up copy ends.
    gap: Option<u64>,
    overflows: u64,
    /// The last copy: bytes read (compared or sent) and bytes of data sent.
    copy_sent: (u64, u64),
    /// `copy_rate`'s token bucket: when it was last filled, and the bytes it holds.
    copy_tokens: (Instant, f64),
    refused: Option<String>,
    /// The stream stopped for good (until a restart): why.
    broken: Option<String>,
    redial_at: Option<Instant>,
    /// Frames held back by the emulated link delay, each way.
    tx_delayed: std::collections::VecDeque<(Instant, DrFrame)>,
    rx_delayed: std::collections::VecDeque<(Instant, DrFrame)>,
    alarm: bool,
    alarms: u64,
    last_publish: Instant,
    started: Instant,
    out: Vec<SeqOutput>,
    frames: Vec<DrFrame>,
    completions: Vec<BdevCompletion>,
}

fn values(v: &[(&str, u64)]) -> BTreeMap<String, u64> {
    v.iter().map(|(k, x)| (k.to_string(), *x)).collect()
}

impl Engine {
    fn new(
        settings: DrGroupSettings,
        members: &[Arc<DrMemberBdev>],
        shared: Arc<GroupShared>,
        poll: Poll,
        active: Option<ActiveCheck>,
    ) -> std::io::Result<Engine> {
        let state = StateFile::new(&settings.state);
        let stored = state.load()?;
        let get = |k: &str| stored.as_ref().and_then(|s| s.get(k).copied()).unwrap_or(0);
        let (acked, reserved, copied, clean) = (get("acked"), get("reserved"), get("copied") == 1, get("clean") == 1);
        let (stored_rebase, copy_done) = (get("rebase"), get("copy_done"));
        let fresh = stored.is_none();
        let producer = match get("producer") {
            0 => new_producer_id(),
            p => p,
        };
        let mut member_ch = Vec::new();
        for m in members {
            let ch = m.inner().clone().channel()?;
            for fd in ch.wake_fds() {
                poll.registry().register(&mut mio::unix::SourceFd(&fd), MEMBERS, Interest::READABLE)?;
            }
            member_ch.push(ch);
        }
        let member_size: Vec<u64> = members.iter().map(|m| m.info().size_bytes()).collect();
        // After an unclean stop the numbers up to the reservation may have been used.
        let (base, rebase, copied) = match stored {
            None => (0, None, false),
            // A Rebase the DR site never confirmed is still owed.
            Some(_) if clean => (acked, (stored_rebase > 0).then_some(stored_rebase), copied),
            Some(_) => {
                tracing::warn!(group = %settings.name, "DR group: the last stop was not clean; writes in its send buffer never reached the DR site: a full copy follows");
                (reserved, Some(reserved), false)
            }
        };
        let copy = (!copied).then(|| Copy::full(&member_size));
        let copy_done_seq = (copied && copy_done > 0).then_some(copy_done);
        let journal = match &settings.journal {
            Some((path, size)) => {
                let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
                nvmetro_ffi::lock_exclusive(&f, path)?;
                Some((f, *size))
            }
            None => None,
        };
        let reserved = base + RESERVE;
        state.store(&values(&[
            ("acked", base),
            ("reserved", reserved),
            ("copied", u64::from(copied)),
            ("clean", 0),
            ("rebase", rebase.unwrap_or(0)),
            ("copy_done", copy_done_seq.unwrap_or(0)),
            ("producer", producer),
        ]))?;
        // Over metro mirrors a site dials once it is seen to order writes.
        let want_conn = Arc::new(AtomicBool::new(active.is_none()));
        let (tx, dialed) = mpsc::channel();
        spawn_dialer(&settings, shared.clone(), want_conn.clone(), tx)?;
        let mut seq = Sequencer::new(settings.mode, settings.buffer_limit, base);
        seq.set_journal(settings.journal.as_ref().map(|j| j.1), &mut Vec::new());
        Ok(Engine {
            seq,
            journal,
            journal_off: false,
            journal_lost: Default::default(),
            gap: None,
            overflows: 0,
            copy_sent: (0, 0),
            copy_tokens: (Instant::now(), COPY_CHUNK as f64),
            settings,
            shared,
            member_ch,
            member_size,
            locks: members.iter().map(|m| m.locks()).collect(),
            poll,
            events: Events::with_capacity(64),
            conn: None,
            greeted: false,
            conn_started: None,
            dialed,
            want_conn,
            hosts: HashMap::new(),
            parts: HashMap::new(),
            next_tag: 1,
            state,
            reserved,
            copy,
            copy_done_seq,
            fresh,
            copied,
            rebase,
            producer,
            // Over metro mirrors a site feeds the DR site only once it is seen to order writes.
            standby: active.is_some(),
            active,
            behind: false,
            refused: None,
            broken: None,
            redial_at: None,
            tx_delayed: Default::default(),
            rx_delayed: Default::default(),
            alarm: false,
            alarms: 0,
            last_publish: Instant::now() - Duration::from_secs(1),
            started: Instant::now(),
            out: Vec::new(),
            frames: Vec::new(),
            completions: Vec::new(),
        })
    }

    /// Whether this site feeds the DR site now (over metro mirrors: it orders the writes).
    fn feeds_now(&self) -> bool {
        self.active.as_ref().is_none_or(|f| f())
    }

    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn persist(&mut self, clean: bool) -> std::io::Result<()> {
        let v = values(&[
            ("acked", self.seq.acked()),
            ("reserved", self.reserved),
            ("copied", u64::from(self.copied)),
            ("clean", u64::from(clean)),
            ("rebase", self.rebase.unwrap_or(0)),
            ("copy_done", self.copy_done_seq.unwrap_or(0)),
            ("producer", self.producer),
        ]);
        self.state.store(&v)
    }

    /// The stream cannot go on safely (its state cannot be stored): host writes go on without
    /// it (every one held is released, later ones at once), the DR image falls behind, and the
    /// next start, finding the last stored state unclean, copies what differs.
    fn break_off(&mut self, why: &str) {
        if self.broken.is_some() {
            return;
        }
        tracing::error!(group = %self.settings.name, "DR stream stopped: {why}; host writes go on without it, the DR image falls behind until a restart copies what differs");
        self.broken = Some(why.to_string());
        self.conn_lost("stopped");
        self.want_conn.store(false, Ordering::Release);
        self.release_held();
        self.drop_copy();
    }

    /// Every write the group holds goes back to its channel (the stream will not carry it).
    fn release_held(&mut self) {
        let channels = self.shared.channels.load_full();
        for (_, (chan, tag, _)) in self.hosts.drain() {
            if let Some(q) = channels.get(chan) {
                q.release(tag);
            }
        }
        self.parts.clear();
    }

    /// Ends the copy; the ranges its reads in flight hold are unlocked (their completions are
    /// dropped).
    fn drop_copy(&mut self) {
        if let Some(copy) = self.copy.take() {
            for (member, offset, len, _) in copy.reads.into_values() {
                self.locks[member].unlock(offset, len, Mode::Exclusive);
            }
            self.shared.wake_lock_waiters(usize::MAX);
        }
    }

    /// A fresh sequencer numbering after `base` (what the old one held is dropped).
    fn new_sequencer(&mut self, base: u64) {
        let mut seq = Sequencer::new(self.settings.mode, self.settings.buffer_limit, base);
        // A journal retired by a failure stays retired (until a restart).
        let journal = self.settings.journal.as_ref().map(|j| if self.journal_off { 0 } else { j.1 });
        seq.set_journal(journal, &mut Vec::new());
        self.seq = seq;
        // Positions of the old sequencer's journal mean nothing to the new one.
        self.journal_lost.clear();
    }

    fn retune(&mut self, t: DrTuning) {
        tracing::info!(group = %self.settings.name, mode = ?t.mode, buffer = t.buffer_limit, rpo_target = ?t.rpo_target, link_delay = ?t.link_delay, copy_rate = ?t.copy_rate, "DR group settings changed");
        self.settings.mode = t.mode;
        self.settings.buffer_limit = t.buffer_limit;
        self.settings.rpo_target = t.rpo_target;
        self.settings.link_delay = t.link_delay;
        self.settings.copy_rate = t.copy_rate;
        self.seq.set_mode(t.mode, &mut self.out);
        self.seq.set_buffer_limit(t.buffer_limit, &mut self.out);
        // Shown at once.
        self.last_publish = Instant::now() - Duration::from_secs(1);
    }

    fn turn(&mut self, timeout: Duration) -> bool {
        self.shared.parked.store(!timeout.is_zero(), Ordering::SeqCst);
        let timeout =
            if timeout.is_zero() || self.shared.channels.load().iter().any(|q| !q.inbox.is_empty()) { Duration::ZERO } else { timeout };
        let _ = self.poll.poll(&mut self.events, Some(timeout));
        self.shared.parked.store(false, Ordering::SeqCst);
        if self.redial_at.is_some_and(|t| Instant::now() >= t) && self.broken.is_none() {
            self.redial_at = None;
            self.want_conn.store(true, Ordering::Release);
        }
        if let Some(t) = self.shared.tuning.lock().ok().and_then(|mut t| t.take()) {
            self.retune(t);
        }
        if self.broken.is_none() {
            let active = self.feeds_now();
            if !active && !self.standby {
                self.stand_by();
            } else if active && self.standby {
                self.become_active();
            }
        }
        let mut work = self.take_host_writes();
        work |= self.drive_conn();
        if !self.standby {
            work |= self.pump_copy();
        }
        if self.copy.is_none() || self.standby {
            // Completions of the members' channels (none are expected without a copy).
            self.completions.clear();
            for ch in self.member_ch.iter_mut() {
                ch.poll(&mut self.completions);
            }
        }
        self.run_outputs();
        self.send_due();
        self.flush_conn();
        if self.last_publish.elapsed() >= Duration::from_millis(100) {
            self.last_publish = Instant::now();
            self.publish();
        }
        work
    }

    fn run(mut self) {
        let mut idle = 0u32;
        while !self.shared.stop.load(Ordering::Acquire) {
            let mut timeout = if idle > 2 { Duration::from_millis(10) } else { Duration::ZERO };
            if let Some(due) = self.next_due() {
                timeout = timeout.min(due.saturating_duration_since(Instant::now()));
            }
            if self.turn(timeout) {
                idle = 0;
            } else {
                idle += 1;
                if idle <= 2 {
                    std::thread::yield_now();
                }
            }
        }
        // A clean stop: hosts write no more; give the DR site what is buffered.
        let until = Instant::now() + DRAIN_WAIT;
        while (self.seq.acked() < self.seq.last_numbered() || self.seq.waiting_writes() > 0) && Instant::now() < until {
            self.turn(Duration::from_millis(10));
        }
        // Clean only if every write applied locally reached the DR site: none still at a
        // member's bdev or in a queue (reactors stopped with them), none waiting for room.
        let unsequenced = self.shared.unsequenced.load(Ordering::Acquire);
        let clean = self.seq.acked() == self.seq.last_numbered() && self.seq.waiting_writes() == 0 && unsequenced == 0;
        if !clean {
            tracing::warn!(group = %self.settings.name, behind = self.seq.last_numbered() - self.seq.acked(), unsequenced, "DR group stops with writes the DR site does not hold: a copy follows the next start");
        }
        if self.shared.removed.load(Ordering::Acquire) && clean {
            // Added again, it first names a Rebase at what the DR site holds: the DR image is
            // not consistent while the copy that follows sends what was written without it.
            tracing::info!(group = %self.settings.name, "DR group removed: if it is added again, it restarts the stream after what the DR site holds and compares every region first (its members may be written without it meanwhile)");
            self.copied = false;
            self.rebase = Some(self.seq.acked());
        }
        if let Err(e) = self.persist(clean) {
            tracing::error!(group = %self.settings.name, "cannot store the DR group's state at stop: {e}");
        }
        self.want_conn.store(false, Ordering::Release);
        // Writes still held (the DR site never acknowledged them in time) or queued complete now,
        // and from now on the members pass writes straight through (a removed group).
        self.shared.gone.store(true, Ordering::SeqCst);
        self.release_held();
        for q in self.shared.channels.load().iter() {
            while let Some(item) = q.inbox.pop() {
                self.shared.unsequenced.fetch_sub(1, Ordering::AcqRel);
                q.release(item.tag);
            }
            nvmetro_ffi::eventfd_signal(&q.eventfd);
        }
    }
}

/// A producer id no other group is likely to have (never 0: "none named").
fn new_producer_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.write_u32(std::process::id());
    h.finish().max(1)
}
