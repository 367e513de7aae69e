//! A consistency group at the DR site, with I/O: an acceptor thread authenticates connections
//! from the production site ([`super::link`]); the stream's thread drives the [`Applier`] over
//! the members' bdevs and keeps the state file: the sequence applied durably, and whether the
//! image is consistent (a full copy, initial or after a `Rebase`, makes it inconsistent until its
//! `CopyDone`). A newer authenticated connection replaces the current one (the production site
//! reconnected); a connection that fails authentication is closed and counted.
//!
//! The image holds the stream of one producer (a group's id at the production site, kept in the
//! state): a connection names itself with `Resume` (its stream goes on) or `Rebase` (the stream
//! goes on after a sequence, with a copy; how the other site of a metro pair takes the stream
//! over after a failover). Once a `Rebase` of another producer took effect, the old producer's
//! `Resume` is refused: a site that lost its metro role never streams stale writes here.
//!
//! Hosts at the DR site may be given the members as namespaces: they are Inaccessible (ANA) until
//! an operator promotes the image (`nvmetro dr promote GROUP`), which is refused while the
//! production site streams here or the image is not consistent, unless forced. A promotion is
//! durable before the first host write; from then on the stream is refused (`Promoted`).
//!
//! A DR test (`nvmetro dr test GROUP start`) gives those hosts a writable point-in-time view of
//! the image instead ([`super::test_view`]) while the stream keeps being applied: before the
//! stream first overwrites a block of the image, the block's bytes are kept in the view's store.
//! `... stop` discards the view; the image never saw the test's writes.
//!
//! Here: the replica, its acceptor and the stream's thread (frames, the applier's outputs, the
//! members' completions). `host`: the members as the DR site's hosts see them; `keep`: writes
//! of the stream held until a view kept what they overwrite; `operator`: promotion and the DR
//! test's view, run on the stream's thread.

mod host;
mod keep;
mod operator;

use super::applier::{Applier, ApplyOutput};
use super::frame::DrFrame;
use super::link::{authenticate, FramedConn};
use super::state::RecordFile;
use super::test_view::TestView;
use crate::{Bdev, BdevChannel, BdevCompletion, BdevOp};
use arc_swap::ArcSwapOption;
use host::ReplicaMember;
use keep::Keep;
use mio::{Events, Interest, Poll, Token, Waker};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct DrReplicaSettings {
    pub name: String,
    pub listen: SocketAddr,
    pub secret: Vec<u8>,
    pub state: PathBuf,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrReplicaStatus {
    pub name: String,
    pub members: Vec<String>,
    pub listen: String,
    pub connected: bool,
    pub applied_seq: u64,
    pub consistent: bool,
    /// Why the applier stopped (a member's disk failed), if it did.
    pub failed: Option<String>,
    pub refused_connections: u64,
    /// Milliseconds since a write was last applied durably (none yet: `None`).
    pub last_applied_ago_ms: Option<u64>,
    /// Promoted: the members serve hosts read-write and the stream is refused.
    pub promoted: bool,
    /// A DR test's view is open, taken at this applied sequence.
    pub test_view_since: Option<u64>,
    /// Bytes the test view holds (kept from the image before the stream overwrote them, or
    /// written by the test's hosts).
    pub test_view_held_bytes: u64,
    /// While the image is not consistent: the applied sequence of the last consistent image
    /// kept (a promotion rolls back to it), and the bytes kept.
    pub rollback_since: Option<u64>,
    pub rollback_bytes: u64,
}

/// Where an operator request's outcome goes.
type Reply = mpsc::Sender<Result<String, String>>;

struct Shared {
    waker: Waker,
    stop: AtomicBool,
    status: Mutex<DrReplicaStatus>,
    refused: AtomicU64,
    /// The members serve hosts (set once the promotion is durable).
    promoted: AtomicBool,
    /// An operator's promotion request (`force`) and where its outcome goes.
    promote: Mutex<Option<(bool, Reply)>>,
    /// The DR test's view hosts are served from, while one is open.
    view: ArcSwapOption<TestView>,
    /// An operator's request to open (true) or discard the test view, and where its outcome goes.
    test: Mutex<Option<(bool, Reply)>>,
}

#[derive(Debug)]
pub struct DrReplica {
    shared: Arc<Shared>,
    members: Vec<Arc<dyn Bdev>>,
    inner_members: Vec<Arc<dyn Bdev>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DrReplica")
    }
}

/// Connections in their handshake at once; more are closed at once (and counted).
const MAX_HANDSHAKES: usize = 8;

const WAKER: Token = Token(0);
const CONN: Token = Token(1);
const MEMBERS: Token = Token(2);

impl DrReplica {
    pub fn start(settings: DrReplicaSettings, members: Vec<Arc<dyn Bdev>>) -> std::io::Result<Arc<DrReplica>> {
        // A new image (all zeroes) is not a copy of anything until the production site's full
        // copy ends.
        let (state, [applied, consistent, promoted, gap, producer]) = RecordFile::open(&settings.state)?;
        let (consistent, promoted) = (consistent == 1, promoted == 1);
        let geometry: Vec<(u64, u32)> = members.iter().map(|m| (m.info().size_bytes(), m.info().block_size)).collect();
        // The last consistent image, kept while the image is not consistent.
        let rollback = match (consistent || promoted, super::rollback::RollbackLog::open(keep::rollback_path(&settings.state), &geometry)?)
        {
            (false, log) => log,
            (true, Some(log)) => {
                // Consistent (or promoted) was recorded; removing the log did not happen.
                log.remove();
                None
            }
            (true, None) => None,
        };
        let wants_file = super::state::StateFile::new(&settings.state.with_extension("wants"));
        let wants: Vec<(u16, u64, u64)> = wants_file
            .load()?
            .unwrap_or_default()
            .keys()
            .filter_map(|k| {
                let mut p = k.split('.').skip(1).map(|x| x.parse::<u64>().ok());
                Some((u16::try_from(p.next()??).ok()?, p.next()??, p.next()??))
            })
            .collect();
        let poll = Poll::new()?;
        let shared = Arc::new(Shared {
            waker: Waker::new(poll.registry(), WAKER)?,
            stop: AtomicBool::new(false),
            status: Mutex::new(DrReplicaStatus {
                name: settings.name.clone(),
                members: members.iter().map(|m| m.info().name.clone()).collect(),
                listen: settings.listen.to_string(),
                applied_seq: applied,
                consistent,
                promoted,
                ..Default::default()
            }),
            refused: AtomicU64::new(0),
            promoted: AtomicBool::new(promoted),
            promote: Mutex::new(None),
            view: ArcSwapOption::empty(),
            test: Mutex::new(None),
        });
        // A test view does not survive a restart.
        super::test_view::remove_stale_stores(&settings.state);
        let mut member_ch = Vec::new();
        for m in &members {
            let ch = m.clone().channel()?;
            for fd in ch.wake_fds() {
                poll.registry().register(&mut mio::unix::SourceFd(&fd), MEMBERS, Interest::READABLE)?;
            }
            member_ch.push(ch);
        }
        // mio's bind sets SO_REUSEADDR: a restarted DR site listens again at once.
        let listener = mio::net::TcpListener::bind(settings.listen)?;
        let (tx, accepted) = mpsc::channel();
        let acceptor = spawn_acceptor(&settings, listener, shared.clone(), tx)?;
        let engine = Stream {
            name: settings.name.clone(),
            applier: Applier::new(applied),
            producer,
            conn_producer: None,
            state,
            consistent,
            gap: gap.checked_sub(1),
            wants,
            wants_file,
            verifies: Default::default(),
            dirty: vec![false; members.len()],
            shared: shared.clone(),
            poll,
            events: Events::with_capacity(64),
            member_ch,
            conn: None,
            accepted,
            held: VecDeque::new(),
            out: Vec::new(),
            flushes: 0,
            flush_error: None,
            failed: None,
            last_applied: None,
            completions: Vec::new(),
            frames: Vec::new(),
            promotion: None,
            geometry,
            view_state: settings.state.clone(),
            keeping: Default::default(),
            next_keep: 0,
            test_open: None,
            views_opened: 0,
            rollback_gap: rollback.as_ref().map(|r| r.since).filter(|_| gap > 0),
            rollback,
            rollback_io: None,
        };
        let thread = std::thread::Builder::new().name(format!("dr-replica-{}", settings.name)).spawn(move || engine.run())?;
        let inner_members = members.clone();
        let members = members
            .into_iter()
            .enumerate()
            .map(|(member, inner)| Arc::new(ReplicaMember { inner, member, shared: shared.clone() }) as Arc<dyn Bdev>)
            .collect();
        Ok(Arc::new(DrReplica { shared, members, inner_members, threads: Mutex::new(vec![thread, acceptor]) }))
    }

    /// The member bdevs hosts may be given (Inaccessible until the image is promoted).
    pub fn members(&self) -> Vec<Arc<dyn Bdev>> {
        self.members.clone()
    }

    /// The bdevs the members wrap (served again in their place when the replica is removed).
    pub fn inner_members(&self) -> Vec<Arc<dyn Bdev>> {
        self.inner_members.clone()
    }

    /// `nvmetro dr promote GROUP`: the DR image serves hosts read-write from now on and the
    /// stream is refused. Refused (unless `force`) while the production site streams here or
    /// while the image is not consistent; what happened, or why not.
    pub fn promote(&self, force: bool) -> Result<String, String> {
        self.ask(&self.shared.promote, force, "a promotion")
    }

    /// Hands an operator's request to the stream's thread and waits for its outcome.
    fn ask(&self, slot: &Mutex<Option<(bool, Reply)>>, request: bool, what: &str) -> Result<String, String> {
        let (tx, rx) = mpsc::channel();
        {
            let mut slot = slot.lock().map_err(|_| "the DR replica's thread is gone".to_string())?;
            if slot.is_some() {
                return Err(format!("another request for {what} is pending"));
            }
            *slot = Some((request, tx));
        }
        let _ = self.shared.waker.wake();
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| Err("the DR replica did not answer in 30 s: see `nvmetro dr status`".into()))
    }

    /// `nvmetro dr test GROUP start|stop`: opens a writable point-in-time view of the image for
    /// the DR site's hosts while the stream keeps arriving, or discards it; what happened, or
    /// why not.
    pub fn test_view(&self, open: bool) -> Result<String, String> {
        self.ask(&self.shared.test, open, "a DR test")
    }

    pub fn status(&self) -> DrReplicaStatus {
        let mut s = self.shared.status.lock().map(|s| s.clone()).unwrap_or_default();
        s.refused_connections = self.shared.refused.load(Ordering::Relaxed);
        s
    }

    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.shared.waker.wake();
        let threads: Vec<JoinHandle<()>> = self.threads.lock().map(|mut t| t.drain(..).collect()).unwrap_or_default();
        for t in threads {
            let _ = t.join();
        }
    }
}

impl Drop for DrReplica {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_acceptor(
    settings: &DrReplicaSettings,
    listener: mio::net::TcpListener,
    shared: Arc<Shared>,
    tx: mpsc::Sender<(std::net::TcpStream, Vec<u8>)>,
) -> std::io::Result<JoinHandle<()>> {
    let (name, secret) = (settings.name.clone(), settings.secret.clone());
    std::thread::Builder::new().name(format!("dr-accept-{name}")).spawn(move || {
        let pending = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        while !shared.stop.load(Ordering::Acquire) {
            let (mut sock, from) = match listener.accept() {
                Ok((s, from)) => (std::net::TcpStream::from(std::os::fd::OwnedFd::from(s)), from),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    // Nothing to wait on but the listener and the stop flag.
                    std::thread::park_timeout(Duration::from_millis(20));
                    continue;
                }
                Err(_) => continue,
            };
            let _ = sock.set_nonblocking(false);
            // A few handshakes at once, each on its own thread: strangers cannot queue up the
            // production site behind them.
            if pending.load(Ordering::Acquire) >= MAX_HANDSHAKES {
                shared.refused.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            pending.fetch_add(1, Ordering::AcqRel);
            let (tx, secret, shared, name, mine) = (tx.clone(), secret.clone(), shared.clone(), name.clone(), pending.clone());
            let spawned = std::thread::Builder::new().name("dr-handshake".into()).spawn(move || {
                match authenticate(&mut sock, &secret, crate::mirror::auth::Side::Acceptor) {
                    Ok(early) => {
                        if tx.send((sock, early)).is_ok() {
                            let _ = shared.waker.wake();
                        }
                    }
                    Err(e) => {
                        shared.refused.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(group = %name, %from, "DR stream connection refused: {e}");
                    }
                }
                mine.fetch_sub(1, Ordering::AcqRel);
            });
            if spawned.is_err() {
                pending.fetch_sub(1, Ordering::AcqRel);
            }
        }
    })
}

struct Stream {
    name: String,
    applier: Applier,
    /// Whose stream the image holds (0: none named yet).
    producer: u64,
    /// The producer the current connection named (by `Resume` or `Rebase`).
    conn_producer: Option<u64>,
    state: RecordFile,
    consistent: bool,
    /// The production site overflowed after this write (see [`DrFrame::Gap`]).
    gap: Option<u64>,
    /// Regions a copy's checksum found different, asked for and not yet received (durable in
    /// `wants_file`).
    wants: Vec<(u16, u64, u64)>,
    wants_file: super::state::StateFile,
    /// Checksum reads in flight: tag -> (member, offset, len, crc).
    verifies: std::collections::HashMap<u64, (u16, u64, u64, u32)>,
    /// Members written since the last flush (only they are flushed).
    dirty: Vec<bool>,
    shared: Arc<Shared>,
    poll: Poll,
    events: Events,
    member_ch: Vec<Box<dyn BdevChannel>>,
    conn: Option<FramedConn>,
    accepted: mpsc::Receiver<(std::net::TcpStream, Vec<u8>)>,
    /// Frames after a `Rebase` that waits for the applier to be idle.
    held: VecDeque<DrFrame>,
    out: Vec<ApplyOutput>,
    /// Member flushes outstanding.
    flushes: usize,
    flush_error: Option<String>,
    failed: Option<String>,
    last_applied: Option<Instant>,
    completions: Vec<BdevCompletion>,
    frames: Vec<DrFrame>,
    /// A promotion waiting for the applier to finish what it issued: who waits, what was forced.
    promotion: Option<(Reply, String)>,
    /// Each member's size in bytes and block size (for a test view).
    geometry: Vec<(u64, u32)>,
    /// The state file's path (test views keep their stores beside it).
    view_state: PathBuf,
    /// Writes of the stream waiting for the test view to keep the image's bytes first: the
    /// read's tag -> the write.
    keeping: std::collections::HashMap<u64, Keep>,
    next_keep: u64,
    /// A test view to open once the applier is idle (no frame is taken meanwhile): who waits.
    test_open: Option<Reply>,
    /// Test views opened since the start (each one's stores have names of their own).
    views_opened: u64,
    /// While the image is not consistent: the last consistent image's bytes it overwrote.
    rollback: Option<super::rollback::RollbackLog>,
    /// The rollback log keeps the image as of this gap (none: as of before a `Rebase`, in the
    /// numbering before it).
    rollback_gap: Option<u64>,
    /// A promotion's rollback to the last consistent image, under way.
    rollback_io: Option<operator::RollbackIo>,
}

/// Flush tags are above every write's sequence.
const FLUSH_TAG: u64 = 1 << 63;

impl Stream {
    /// The durable record: applied sequence, consistent, promoted, the gap (+1; 0: none) and
    /// the producer.
    fn record(&self, applied: u64) -> [u64; super::state::RECORD_VALUES] {
        [applied, u64::from(self.consistent), u64::from(self.promoted()), self.gap.map_or(0, |g| g + 1), self.producer]
    }

    fn store_wants(&self) -> std::io::Result<()> {
        self.wants_file.store(&self.wants.iter().map(|(m, o, l)| (format!("want.{m}.{o}.{l}"), 1)).collect())
    }

    fn promoted(&self) -> bool {
        self.shared.promoted.load(Ordering::Acquire)
    }

    fn store(&mut self) -> std::io::Result<()> {
        self.state.store(self.record(self.applier.applied()))
    }

    fn fail(&mut self, why: String) {
        if self.failed.is_none() {
            tracing::error!(group = %self.name, "DR image stops taking writes: {why}");
            self.failed = Some(why);
        }
        self.drop_conn("the DR image stopped taking writes");
    }

    fn drop_conn(&mut self, why: &str) {
        if let Some(mut c) = self.conn.take() {
            let _ = self.poll.registry().deregister(&mut c.sock);
            tracing::warn!(group = %self.name, "DR stream connection ends: {why}");
        }
        self.held.clear();
        self.conn_producer = None;
    }

    fn run_outputs(&mut self) {
        let mut out = std::mem::take(&mut self.out);
        let mut i = 0;
        while i < out.len() {
            match std::mem::replace(&mut out[i], ApplyOutput::Flush) {
                ApplyOutput::Write { id, member, offset, data } => match self.member_ch.get(member as usize) {
                    Some(_) => {
                        self.dirty[member as usize] = true;
                        let len = data.len() as u64;
                        self.submit_write(member as usize, id, BdevOp::Write { offset, data: data.into(), fua: false });
                        // The data it asked for: should this epoch not become durable, the
                        // production site sends it again (it holds it until acknowledged).
                        if self.wants.contains(&(member, offset, len)) {
                            self.wants.retain(|w| *w != (member, offset, len));
                            if let Err(e) = self.store_wants() {
                                self.fail(format!("cannot store the regions asked for: {e}"));
                            }
                        }
                    }
                    None => {
                        self.fail(format!("the stream names member {member}, the group has {}", self.member_ch.len()));
                    }
                },
                ApplyOutput::WriteZeroes { id, member, offset, len } => match self.member_ch.get(member as usize) {
                    Some(_) => {
                        self.dirty[member as usize] = true;
                        self.submit_write(member as usize, id, BdevOp::WriteZeroes { offset, len });
                    }
                    None => {
                        self.fail(format!("the stream names member {member}, the group has {}", self.member_ch.len()));
                    }
                },
                ApplyOutput::Verify { id, member, offset, len, crc } => match self.member_ch.get_mut(member as usize) {
                    Some(ch) => {
                        ch.submit(id, BdevOp::Read { offset, len: len as usize });
                        self.verifies.insert(id, (member, offset, len, crc));
                    }
                    None => {
                        self.fail(format!("the stream names member {member}, the group has {}", self.member_ch.len()));
                    }
                },
                ApplyOutput::Flush => {
                    // Only what was written since the last flush needs one; a flush of nothing
                    // (writes that were all resends) completes at once.
                    self.flushes = 0;
                    for (ch, dirty) in self.member_ch.iter_mut().zip(self.dirty.iter_mut()) {
                        if std::mem::take(dirty) {
                            self.flushes += 1;
                            ch.submit(FLUSH_TAG, BdevOp::Flush);
                        }
                    }
                    if self.flushes == 0 {
                        if let Err(e) = self.applier.flush_done(Ok(()), &mut out) {
                            self.fail(e.to_string());
                        }
                    }
                }
                ApplyOutput::Persist { seq } => {
                    let before = self.applier.applied();
                    if self.consistent && self.gap.is_some_and(|g| seq > g) {
                        tracing::warn!(group = %self.name, seq, "DR image no longer consistent: it holds writes past an overflow at the production site, until the catch-up ends");
                        self.consistent = false;
                    }
                    // The store covers `seq`: the applier takes it as persisted only after it.
                    match self.state.store(self.record(seq)) {
                        Ok(()) => {
                            self.applier.persisted(&mut out);
                            self.last_applied = Some(Instant::now());
                            debug_assert!(self.applier.applied() >= before);
                        }
                        Err(e) => self.fail(format!("cannot store the applied sequence: {e}")),
                    }
                }
                ApplyOutput::Send(f) => {
                    if let Some(c) = self.conn.as_mut() {
                        c.queue(&f);
                    }
                }
            }
            i += 1;
        }
        out.clear();
        self.out = out;
    }

    fn on_frame(&mut self, f: DrFrame) -> Result<(), String> {
        if !self.held.is_empty() {
            self.held.push_back(f);
            return Ok(());
        }
        match f {
            DrFrame::Resume { producer } => {
                if self.producer != 0 && producer != self.producer {
                    return Err(format!(
                        "producer {producer:#x} resumes a stream that producer {:#x} took over (the other site of the metro pair streams here now)",
                        self.producer
                    ));
                }
                if self.producer == 0 {
                    // An image from before producers were named: the first to resume owns it.
                    self.producer = producer;
                    self.store().map_err(|e| format!("cannot store the state: {e}"))?;
                }
                self.conn_producer = Some(producer);
                Ok(())
            }
            DrFrame::Rebase { seq, producer } => {
                // Another producer (the other metro site) takes over from whatever this image
                // applied by the time the Rebase takes effect: its copy sends what differs.
                if seq < self.applier.applied() && producer == self.producer {
                    return Err(format!("Rebase to {seq} below the applied {}", self.applier.applied()));
                }
                self.conn_producer = Some(producer);
                self.held.push_back(DrFrame::Rebase { seq, producer });
                Ok(())
            }
            f if self.conn_producer.is_none() => Err(format!("{f:?} before the production site named its stream (Resume or Rebase)")),
            DrFrame::CopyDone { seq } => {
                // Regions it asked for and has not received keep the image inconsistent (the
                // production site copies them and says CopyDone again).
                if self.applier.applied() >= seq && self.wants.is_empty() && (!self.consistent || self.gap.is_some()) {
                    self.consistent = true;
                    self.gap = None;
                    self.store().map_err(|e| format!("cannot store the state: {e}"))?;
                    tracing::info!(group = %self.name, seq, "DR copy ended: the DR image is consistent");
                    if let Some(log) = self.rollback.take() {
                        log.remove();
                    }
                }
                Ok(())
            }
            DrFrame::Gap { seq } => {
                // A later Gap may name an earlier write (a journal entry found lost when sent).
                if self.gap.is_none_or(|g| seq < g) {
                    if self.rollback_gap.is_some_and(|g| g > seq) {
                        // What it kept is past the new gap: not a consistent image.
                        self.drop_rollback(&format!("what it kept is past an earlier gap (write {seq})"));
                    }
                    self.gap = Some(seq);
                    self.store().map_err(|e| format!("cannot store the state: {e}"))?;
                    tracing::warn!(group = %self.name, seq, "the production site overflowed: the image stays consistent at write {seq} and is not once it holds more, until the catch-up ends");
                }
                Ok(())
            }
            f => self.applier.on_frame(f, &mut self.out).map_err(|e| e.to_string()),
        }
    }

    /// A held `Rebase` takes effect once nothing is in flight; the frames behind it follow.
    fn release_rebase(&mut self) -> Result<(), String> {
        if !matches!(self.held.front(), Some(DrFrame::Rebase { .. })) || !self.applier.idle() {
            return Ok(());
        }
        let Some(DrFrame::Rebase { seq, producer }) = self.held.pop_front() else { unreachable!() };
        if self.consistent && self.rollback.is_none() {
            // The copy that follows overwrites the consistent image: keep it first.
            self.start_rollback(self.applier.applied(), false);
        }
        self.applier = Applier::new(seq);
        self.consistent = false;
        if self.producer == 0 {
            self.producer = producer;
        } else if producer != self.producer {
            tracing::warn!(group = %self.name, seq, from = format!("{:#x}", self.producer), to = format!("{producer:#x}"), "DR stream taken over by another producer (the other site of a metro pair): the old one is refused from now on");
            self.producer = producer;
        }
        self.store().map_err(|e| format!("cannot store the state: {e}"))?;
        tracing::warn!(group = %self.name, seq, "DR stream restarts after {seq}: the image is not consistent until the full copy that follows ends");
        let held: Vec<DrFrame> = self.held.drain(..).collect();
        for f in held {
            self.on_frame(f)?;
        }
        Ok(())
    }

    fn member_completions(&mut self) -> bool {
        self.completions.clear();
        for ch in self.member_ch.iter_mut() {
            ch.poll(&mut self.completions);
        }
        let mut completions = std::mem::take(&mut self.completions);
        let any = !completions.is_empty();
        for c in completions.drain(..) {
            if let Some(k) = self.keeping.remove(&c.tag) {
                self.kept(k, c.result);
                continue;
            }
            if operator::is_rollback_tag(c.tag) {
                self.rollback_done(c.tag, c.result);
                continue;
            }
            if let Some((member, offset, len, crc)) = self.verifies.remove(&c.tag) {
                // A copy's checksum: where this image differs, ask for the data (durably first:
                // the answer may be lost with the connection, the request must not be).
                let result = match c.result {
                    Ok(crate::BdevOutput::Data(d)) => {
                        if crc32c::crc32c(&d) != crc {
                            self.wants.push((member, offset, len));
                            match self.store_wants() {
                                Ok(()) => {
                                    if let Some(conn) = self.conn.as_mut() {
                                        conn.queue(&DrFrame::Want { member, offset, len });
                                    }
                                    Ok(())
                                }
                                Err(e) => Err(format!("cannot store the regions asked for: {e}")),
                            }
                        } else {
                            Ok(())
                        }
                    }
                    Ok(_) => Err("a read returned no data".to_string()),
                    Err(e) => Err(e.to_string()),
                };
                if let Err(e) = self.applier.write_done(c.tag, result, &mut self.out) {
                    self.fail(e.to_string());
                }
                continue;
            }
            let result = c.result.map(|_| ()).map_err(|e| e.to_string());
            let r = if c.tag == FLUSH_TAG {
                if let Err(e) = result {
                    self.flush_error = Some(e);
                }
                self.flushes -= 1;
                if self.flushes > 0 {
                    continue;
                }
                let result = self.flush_error.take().map_or(Ok(()), Err);
                self.applier.flush_done(result, &mut self.out)
            } else {
                self.applier.write_done(c.tag, result, &mut self.out)
            };
            if let Err(e) = r {
                self.fail(e.to_string());
            }
        }
        self.completions = completions;
        any
    }

    fn turn(&mut self, timeout: Duration) -> bool {
        let _ = self.poll.poll(&mut self.events, Some(timeout));
        let mut work = false;
        while let Ok((sock, early)) = self.accepted.try_recv() {
            work = true;
            if self.failed.is_some() {
                // Say why rather than close silently (the production site would redial at once).
                if let Ok(mut c) = FramedConn::new(sock, early) {
                    c.queue(&DrFrame::Stopped);
                    let _ = c.flush();
                }
                continue;
            }
            let Ok(mut c) = FramedConn::new(sock, early) else { continue };
            if self.promoted() || self.promotion.is_some() {
                // Tell the production site why, then close.
                c.queue(&DrFrame::Promoted);
                let _ = c.flush();
                continue;
            }
            if self.poll.registry().register(&mut c.sock, CONN, Interest::READABLE | Interest::WRITABLE).is_err() {
                continue;
            }
            if self.conn.is_some() {
                self.drop_conn("replaced by a newer authenticated connection");
            }
            tracing::info!(group = %self.name, applied = self.applier.applied(), "DR stream connected");
            self.conn = Some(c);
            self.applier.connected(self.producer, &mut self.out);
            // What was asked for before and may not have arrived.
            for &(member, offset, len) in &self.wants {
                self.out.push(ApplyOutput::Send(DrFrame::Want { member, offset, len }));
            }
        }
        work |= self.member_completions();
        if let Some(c) = self.conn.as_mut().filter(|_| self.test_open.is_none()) {
            let mut frames = std::mem::take(&mut self.frames);
            let read = c.read_frames(&mut frames);
            work |= !frames.is_empty();
            let refused = super::link::each_frame(&mut frames, |f| self.on_frame(f));
            self.frames = frames;
            if let Some(why) = refused {
                tracing::error!(group = %self.name, "DR stream refused: {why}");
                self.drop_conn("refused");
            } else if let Err(e) = read {
                self.drop_conn(&e.to_string());
            }
        }
        if let Err(why) = self.release_rebase() {
            self.fail(why);
        }
        self.take_promotion();
        self.take_test();
        self.run_outputs();
        self.finish_promotion();
        self.finish_test_open();
        if let Some(c) = self.conn.as_mut() {
            if let Err(e) = c.flush() {
                self.drop_conn(&format!("write: {e}"));
            }
        }
        if let Ok(mut s) = self.shared.status.lock() {
            s.connected = self.conn.is_some();
            s.applied_seq = self.applier.applied();
            s.consistent = self.consistent;
            s.failed = self.failed.clone();
            s.last_applied_ago_ms = self.last_applied.map(|t| t.elapsed().as_millis() as u64);
            s.promoted = self.promoted();
            let view = self.shared.view.load();
            s.test_view_since = view.as_ref().map(|v| v.since);
            s.test_view_held_bytes = view.as_ref().map_or(0, |v| v.held_bytes());
            s.rollback_since = self.rollback.as_ref().map(|r| r.since);
            s.rollback_bytes = self.rollback.as_ref().map_or(0, |r| r.kept_bytes());
        }
        work
    }

    fn run(mut self) {
        let mut idle = 0u32;
        while !self.shared.stop.load(Ordering::Acquire) {
            let timeout = if idle > 2 { Duration::from_millis(10) } else { Duration::ZERO };
            if self.turn(timeout) {
                idle = 0;
            } else {
                idle += 1;
            }
        }
    }
}
