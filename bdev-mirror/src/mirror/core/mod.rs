//! One mirror leg as a state machine without I/O: [`MirrorCore::handle`] takes an [`Input`] (a
//! host write, a local completion, a frame from the peer, the link going up or down, a tick) and
//! appends [`Output`]s (issue a local operation, send a frame, complete a host operation, make the
//! metadata durable). The driver executes outputs in order; `Persist` must be durable before it
//! executes anything after it.
//!
//! The state machine's parts: [`ordering`] (range admission, issuing and completing operations),
//! [`wire`] (frames from the peer), [`resync`] (handshake, sync direction, resync and sweep),
//! [`pacing`] (how fast a resync goes while hosts write),
//! [`quorum`] (metro mode: witness, pre-election, elections), [`metro`] (its lease timers),
//! [`failure`] (failing legs), [`switchover`] (metro mode: planned switchover and planned
//! departure) and [`show`] (whether a leg serves, its paths' ANA state, the status snapshot).
//!
//! Ordering, so both copies end byte-identical (active-active):
//! * The preferred leg orders every write. Its own writes hold an exclusive range lock from issue
//!   until both legs have them, and are replicated in that order.
//! * The secondary never applies a host write directly: it forwards it; the preferred executes it
//!   under the same locks and answers `ForwardDone`; only then does the secondary apply it.
//! * The secondary applies everything the preferred sends (replicated writes, forwarded writes
//!   it was told to apply, resync data) in arrival order, overlapping ones one after another.
//!   Fused compare-and-write runs only on the preferred leg, so it is atomic across both sites.
//!
//! Loss, without a witness: the preferred leg keeps serving alone (dirty bits, made durable
//! before each write, record what the peer lacks); the secondary fences itself (host I/O fails
//! with `Fenced`, which the target reports as ANA Inaccessible) until it is resynced.
//!
//! Loss in metro mode ([`Metro`], with a witness): the role that orders writes is not fixed.
//! * Connected, both legs serve; each stops serving the moment it has heard nothing from its peer
//!   for `fence_ms` (its lease from the peer ran out), before the peer can declare the link lost.
//! * A leg that loses its peer holds the writes waiting for it, answers new I/O with
//!   `Transition` (ANA Change) and asks the witness ([`super::witness`]). Granted, it takes the
//!   new generation the witness recorded, becomes the ordering leg and, once `settle_ms` have
//!   passed since the loss (so the other leg's lease has surely run out), serves alone and
//!   completes the held writes. Denied, it is Outdated and fences (ANA Inaccessible).
//! * Pre-election: while connected, the legs tell each other whether they reach the witness. When
//!   neither does, the leg that does not order writes defers (durably, then says so) and the leg
//!   that orders them, on that word, arms: a later link loss is then decided without the witness,
//!   and the survivor is the site hosts were sent to (after a switchover: the new site). Each leg
//!   decides from its own role only, so the two cannot disagree: a leg arms only on a deferral
//!   it received while it ordered writes, and an armed leg that stops ordering disarms. While a
//!   switchover runs nobody arms (the deferral repeats and arms the new orderer afterwards). A
//!   deferral ends only over the link: by a release that echoes every deferral sent (the armed
//!   leg releases once it is disarmed, when the peer reaches the witness again), or when the
//!   deferring leg takes ordering from a peer that hands it over (never armed meanwhile). So the
//!   two can never both believe they may serve.
//! * The leg that was lost comes back Outdated, is resynced (the union of both legs' dirty
//!   bitmaps) and serves again on its own (automatic failback), or after the operator says so.
//!
//! Leases (both modes, wherever a leg serves only while it has its peer): a leg may serve until
//! `T = t_ping + fence`, where `t_ping` is the time *on its own clock* at which it sent a Ping
//! that the peer answered. Frames that sat in a socket while a site was paused therefore extend
//! nothing: only the echo of a Ping sent after the pause does. The driver gives the core the
//! clock before every input ([`MirrorCore::observe_clock`]) and publishes `T`
//! ([`MirrorCore::lease_deadline_ms`]), which reactors compare with the clock when they admit a
//! read and again before they complete it. The peer answered that Ping no later than its last
//! Pong, sent at `p`; the leg that takes over serves alone only from `p + settle`. With clocks
//! whose rates differ by at most ρ, `T` has passed in real time by then when
//! `settle ≥ fence·(1 + ρ) + ε` ([`Metro::check`]: ρ = 10 %, ε = 25 ms). With the default 1 s
//! heartbeat: fence 500 ms, settle 600 ms ≥ 575 ms; Pings every 200 ms.
//! Each Ping carries its sender's fence; the leg that takes over settles for at least
//! `fence·1.1 + 25 ms` of the longest fence it granted, so sites with different timers are safe.
//!
//! Failing legs (DRBD's `on-io-error detach`, Mayastor's child faulting): a leg whose device fails
//! a write (or a resync read) records itself `Failed` durably (and the failed range dirty), sends
//! `Failed` to its peer, and only then acknowledges anything; from then on nothing is read from
//! or written to its device. Its peer, on `Failed` or on an error acknowledgement, starts a new
//! generation (durable before any completion that follows), keeps every dirty region (the sweep
//! stops) and becomes the ordering leg if it was not. While connected to that UpToDate peer, the
//! failed leg serves through it ([`Access::Remote`], ANA Non-Optimized): reads, compares and
//! writes are forwarded, and the peer's answer is the answer; otherwise it serves nothing. The failed leg retries ([`MirrorCore::set_retry_ms`],
//! [`Input::Resync`]) with a new Hello on the live connection: a resync of the dirty regions makes
//! it UpToDate again, or it fails again.

use super::frame::{caps, flags, status, Frame, Hello, Kind, OpCode};
use super::meta::{Meta, SyncDirection};
use super::DiskState;
use crate::{BdevError, BdevOp, BdevOutput};
use std::collections::{HashMap, VecDeque};

mod failure;
mod metro;
mod ordering;
mod pacing;
mod quorum;
mod resync;
mod show;
mod switchover;
#[cfg(test)]
mod testkit;
mod wire;

use metro::lease_settle;
pub use metro::Metro;
use ordering::{code_error, error_code, frame_op};
pub use pacing::{ResyncLatencyTarget, LATENCY_TARGET_PERCENT};
pub use show::{MetroStatus, MirrorStatus};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Preferred,
    Secondary,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    Down,
    /// Connected, waiting for the peer's Hello.
    Handshake,
    /// Connected, resyncing; `source` when this leg sends.
    Syncing {
        source: bool,
    },
    Connected,
    /// The peer was refused (split brain, unrelated data, misconfiguration).
    Refused(String),
}

/// Why a leg's device is Failed: what failed, where, and since when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub error: String,
    pub offset: u64,
    pub len: u64,
    pub since_ms: u64,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at bytes {}..{}", self.error, self.offset, self.offset + self.len)
    }
}

/// How hosts should see this leg's paths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Serving with its peer: hosts of this site Optimized, others Non-Optimized.
    Serving,
    /// Serving alone: every host's path here is Optimized (the other site cannot serve).
    Sole,
    /// Deciding (ANA Change).
    Transition,
    /// Not serving (ANA Inaccessible).
    Fenced,
    /// This leg's device failed: it serves through its peer, every read and write going over
    /// the link (ANA Non-Optimized for every host).
    Remote,
    /// Serving with its peer, and ordering writes since an operator's switchover moved the
    /// sites' roles: every host's path here is Optimized.
    Leading,
    /// Serving with its peer, which an operator's switchover made the ordering site: every
    /// host's path here is Non-Optimized.
    Standby,
}

/// Where the leg stands in metro mode.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Quorum {
    /// Just started: waiting for the peer before asking the witness.
    Starting,
    /// With the peer (or resyncing it from a state that needed no election).
    Peer,
    /// Asking the witness; `next` is the generation to write under once granted.
    Electing {
        since_ms: u64,
        next: u64,
        nonce: u64,
        last_ask_ms: u64,
    },
    /// Granted (or pre-elected): serves alone from `at_ms` on.
    Won {
        at_ms: u64,
    },
    Solo,
    Fenced,
}

/// A resync's final frame's `arg`: regions could not be copied, the target stays Failed.
const RESYNC_INCOMPLETE: u32 = 1;

/// A Hello's `arg`: a Failed leg asks for a new handshake (and a resync) on a live connection.
const HELLO_AGAIN: u32 = 1;

/// Witness `arg` values in [`Kind::Witness`] frames.
mod wit {
    pub const UNREACHABLE: u32 = 0;
    pub const REACHABLE: u32 = 1;
    /// The sender, which does not order writes, defers to the receiver: it will not serve alone
    /// after a link loss (`offset`: how many deferrals it sent on this connection).
    pub const DEFER: u32 = 2;
    /// The sender does not count on the receiver deferring (`offset`: the count of the last
    /// deferral it received; a release that does not echo the receiver's count is stale).
    pub const RELEASE: u32 = 3;
}

#[derive(Debug)]
pub enum Input {
    /// A write-type host operation (reads are served by the local leg directly).
    Host {
        tag: u64,
        op: BdevOp,
    },
    LocalDone {
        id: u64,
        result: Result<BdevOutput, BdevError>,
    },
    Frame(Frame),
    LinkUp,
    LinkDown,
    Tick {
        now_ms: u64,
    },
    /// Metro mode: the witness answered.
    Witness(crate::mirror::witness::Reply),
    /// Metro mode, manual failback: the operator lets a resynced leg serve again.
    Failback,
    /// The operator asks a Failed leg to retry now (`nvmetro resync NAME`).
    Resync,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    Local {
        id: u64,
        op: BdevOp,
    },
    Send(Frame),
    Complete {
        tag: u64,
        result: Result<BdevOutput, BdevError>,
    },
    /// Make [`MirrorCore::meta`] durable before executing the next output.
    Persist,
    /// Metro mode: send this to the witness.
    Witness(crate::mirror::witness::Request),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Host(u64),
    /// Preferred: a write the secondary forwarded (its sequence number).
    Forwarded(u64),
    /// Secondary: an operation the preferred replicated, or a resync chunk.
    Replicated(u64),
    ResyncIn(u64),
    /// This leg reading a region to send it.
    ResyncOut(u64),
    /// A host write whose leg changed role while it ran: already answered; only its range is
    /// released when it ends.
    Orphan,
    /// Preferred: the flush of both legs that lets the sweep clear dirty bits.
    Sweep,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Waiting for its range.
    Queued,
    /// Secondary: forwarded, waiting for ForwardDone.
    Forwarded,
    Running,
}

#[derive(Debug)]
struct Op {
    origin: Origin,
    op: BdevOp,
    range: Option<(u64, u64)>,
    stage: Stage,
    local_done: bool,
    /// Waiting for the peer's acknowledgement.
    remote_pending: bool,
    result: Option<Result<BdevOutput, BdevError>>,
    /// The connection it came with: answers owed to an earlier connection are never sent on a
    /// later one (the peer may have restarted and reused the sequence number).
    epoch: u64,
    /// A region being resynced: chunks sent whose acknowledgement has not come yet.
    parts: u32,
    /// The connection (link epoch) its replica went out on, while it waits for that answer.
    sent_on: Option<u64>,
}

/// Host writes within this count as hosts writing.
const HOST_ACTIVE_MS: u64 = 50;
/// A region travels in Resync frames of at most this many bytes, so that the frames of host
/// writes (and Pings) never wait behind a whole region on the link.
pub const RESYNC_CHUNK: usize = 64 * 1024;
/// A confirmed region's dirty bit is cleared only after this long without writes, so a hot
/// region does not pay a metadata write (and sync) again and again (DRBD's activity log).
const ACTIVITY_IDLE_MS: u64 = 5_000;

/// A sweep under way: regions to clear once both legs have flushed everything written before
/// `started_ms`.
#[derive(Debug)]
struct SweepFlush {
    id: u64,
    regions: Vec<u64>,
    started_ms: u64,
    local_ok: bool,
    remote_ok: bool,
}

pub struct MirrorCore {
    role: Role,
    site: u8,
    size: u64,
    meta: Meta,
    disk: DiskState,
    link: LinkState,
    peer: Option<Hello>,
    ops: HashMap<u64, Op>,
    next_id: u64,
    /// Running operations with their ranges (kept here: admission compares against every one).
    active: Vec<(u64, Option<(u64, u64)>)>,
    waiting: VecDeque<u64>,
    /// Preferred: writes in flight per region, not yet confirmed by the peer.
    unconfirmed: HashMap<u64, u32>,
    /// Preferred: when each region was last written (for the activity-log style sweep).
    last_write: HashMap<u64, u64>,
    /// Forwarded writes (by the secondary's sequence) awaiting its apply confirmation.
    forwarded: HashMap<u64, (u64, u64)>,
    /// Regions this leg must still send (when it is the sync source).
    to_sync: Vec<u64>,
    sync_cursor: usize,
    resync_inflight: usize,
    /// Cleared bits not yet persisted (clearing late is always safe: at worst a region is
    /// resynced again), written out with the next once-a-second sweep.
    lazy_persist: bool,
    /// Resync budget: bytes per second (0 = unlimited), refilled by ticks.
    resync_rate: u64,
    tokens: u64,
    last_tick_ms: u64,
    resynced_bytes: u64,
    sync_total: u64,
    random: u64,
    configured_preferred: bool,
    /// Source: the peer's dirty bitmap has not arrived yet (resync waits for it).
    awaiting_bitmap: bool,
    metro: Option<Metro>,
    quorum: Quorum,
    why: String,
    witness_seen_ms: Option<u64>,
    witness_authority: u64,
    witness_holder: u8,
    peer_reaches_witness: bool,
    /// Survivor: the peer deferred to this leg, which orders writes (cleared when it stops).
    armed: bool,
    /// Deferrals sent to the peer on this connection, and the count the peer's last one
    /// carried: a release must echo every deferral sent (see `on_witness_frame`).
    defers_sent: u64,
    defers_seen: u64,
    /// Metro mode: the operator forced this leg to serve alone (`nvmetro promote --force`).
    forced: bool,
    /// A planned switchover under way at this (ordering) leg.
    handover: Option<switchover::Handover>,
    /// How the last switchover asked for here ended (the driver answers the operator with it).
    switchover_outcome: Option<Result<String, String>>,
    /// Planned departure (a clean stop): this leg stopped serving and told its peer.
    leaving: bool,
    /// The departure is over (the link may close): `Some(true)` the peer took over,
    /// `Some(false)` it could not (it fails over as after any loss).
    left: Option<bool>,
    /// The peer told, on this connection, that it stopped serving and is going away: its lease
    /// is void, so taking over needs no settling.
    peer_leaving: bool,
    failback_hold: bool,
    last_report_ms: u64,
    /// The last witness request's sequence number (grows for the site's whole life).
    witness_seq: u64,
    /// A grant that arrived while a connection was in its handshake (see `on_witness`).
    pending_grant: Option<u64>,
    /// The generation elections from generation `.0` ask for (see `election_next`).
    election_next: Option<(u64, u64)>,
    /// When the last tick came (resync budget and the once-a-second sweep); `last_tick_ms` is
    /// the clock, advanced before every input.
    prev_tick_ms: u64,
    /// Outside metro mode: how long an answered Ping lets the leg serve (metro: `fence_ms`).
    lease_ms: u64,
    /// This leg may serve with its peer until then (see the module docs).
    peer_lease_until_ms: u64,
    /// When this leg last answered a Ping: the last moment it extended its peer's lease.
    last_pong_sent_ms: Option<u64>,
    last_ping_ms: u64,
    /// Outside metro mode, the preferred leg after losing its peer: writes complete alone only
    /// from then on (the peer's lease has surely run out).
    alone_at_ms: Option<u64>,
    /// Why this leg's device is Failed.
    failure: Option<Failure>,
    /// Times this leg's device failed (a new [`Failure`] each), since start.
    leg_failures: u64,
    /// Why the peer's device is Failed, as it told this leg.
    peer_failure: Option<Failure>,
    /// A Failed leg retries this often (0: only when the operator asks).
    retry_ms: u64,
    last_retry_ms: u64,
    /// The current resync lost a region (a failed read here or write there): the target is not
    /// a faithful copy at its end.
    sync_errors: bool,
    sweep_flush: Option<SweepFlush>,
    /// Regions written within this are not swept (DRBD's activity log).
    activity_idle_ms: u64,
    /// Counts connections (LinkUp).
    link_epoch: u64,
    /// When the last host write-type operation arrived (the resync's window shrinks meanwhile).
    last_host_ms: Option<u64>,
    /// How many regions the resync keeps in flight while hosts write.
    pacer: pacing::ResyncPacer,
    /// Largest Resync frame payload ([`RESYNC_CHUNK`] unless a test sets it).
    resync_chunk: usize,
    /// The longest lease this leg's Pongs granted (the peer sends its fence in each Ping): the
    /// settle time covers it even when the sites' timers differ.
    peer_fence_ms: u64,
}

impl std::fmt::Debug for MirrorCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MirrorCore({:?} {:?} {:?} {} ops)", self.role, self.disk, self.link, self.ops.len())
    }
}

/// How often the legs report to the witness and to each other (metro mode).
const WITNESS_INTERVAL_MS: u64 = 250;
/// The witness counts as reachable while it answered within this.
const WITNESS_ALIVE_MS: u64 = 1_000;
/// Outside metro mode, the lease an answered Ping gives (half the default 3 s heartbeat).
const DEFAULT_LEASE_MS: u64 = 1_500;

impl MirrorCore {
    /// A leg over a device of `size` bytes with the metadata it persisted. `seed` draws new
    /// generation identifiers.
    pub fn new(role: Role, site: u8, size: u64, mut meta: Meta, seed: u64) -> (MirrorCore, Vec<Output>) {
        let mut out = Vec::new();
        let configured = role;
        if role == Role::Preferred && meta.generations.current == 0 {
            // The first preferred leg founds the data lineage.
            meta.generations.current = seed | 1;
            out.push(Output::Persist);
        }
        // Who orders writes survives a restart (see `Meta::ordering`).
        let role = match meta.ordering {
            Some(true) => Role::Preferred,
            Some(false) => Role::Secondary,
            None => role,
        };
        let disk = if (role == Role::Preferred || meta.generations.current != 0) && !meta.inconsistent {
            DiskState::UpToDate
        } else {
            DiskState::Inconsistent
        };
        let disk = if role == Role::Secondary && disk == DiskState::UpToDate { DiskState::Outdated } else { disk };
        let disk = if meta.failed { DiskState::Failed } else { disk };
        let core = MirrorCore {
            role,
            site,
            size,
            meta,
            disk,
            link: LinkState::Down,
            peer: None,
            ops: HashMap::new(),
            next_id: 1,
            active: Vec::new(),
            waiting: VecDeque::new(),
            unconfirmed: HashMap::new(),
            last_write: HashMap::new(),
            forwarded: HashMap::new(),
            to_sync: Vec::new(),
            lazy_persist: false,
            sync_cursor: 0,
            resync_inflight: 0,
            resync_rate: 0,
            tokens: 0,
            last_tick_ms: 0,
            resynced_bytes: 0,
            sync_total: 0,
            random: seed ^ 0x9e37_79b9_7f4a_7c15,
            configured_preferred: configured == Role::Preferred,
            awaiting_bitmap: false,
            metro: None,
            quorum: Quorum::Peer,
            why: String::new(),
            witness_seen_ms: None,
            witness_authority: 0,
            witness_holder: 0,
            peer_reaches_witness: true,
            armed: false,
            defers_sent: 0,
            defers_seen: 0,
            forced: false,
            handover: None,
            switchover_outcome: None,
            leaving: false,
            left: None,
            peer_leaving: false,
            failback_hold: false,
            last_report_ms: 0,
            witness_seq: 0,
            pending_grant: None,
            election_next: None,
            prev_tick_ms: 0,
            lease_ms: DEFAULT_LEASE_MS,
            peer_lease_until_ms: 0,
            last_pong_sent_ms: None,
            last_ping_ms: 0,
            alone_at_ms: None,
            failure: None,
            leg_failures: 0,
            peer_failure: None,
            retry_ms: 30_000,
            last_retry_ms: 0,
            sync_errors: false,
            sweep_flush: None,
            activity_idle_ms: ACTIVITY_IDLE_MS,
            link_epoch: 0,
            resync_chunk: RESYNC_CHUNK,
            last_host_ms: None,
            pacer: pacing::ResyncPacer::default(),
            peer_fence_ms: 0,
        };
        (core, out)
    }

    /// Switches to metro mode (before the first input): the witness decides who serves alone.
    /// `seq_base` must exceed every sequence number an earlier run of this site sent (the
    /// driver uses the wall clock in microseconds).
    pub fn set_metro(&mut self, metro: Metro, seq_base: u64) {
        self.witness_seq = seq_base;
        if self.meta.generations.current != 0 && !self.meta.failed && !self.meta.inconsistent {
            // Whether this copy is current is the witness's call (its authority generation).
            self.disk = DiskState::UpToDate;
        }
        self.quorum = Quorum::Starting;
        self.why = "starting: waiting for the peer".into();
        self.metro = Some(metro);
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    pub fn set_resync_rate(&mut self, bytes_per_second: u64) {
        self.resync_rate = bytes_per_second;
    }

    /// Outside metro mode: how long an answered Ping lets this leg serve with its peer.
    pub fn set_lease_ms(&mut self, ms: u64) {
        self.lease_ms = ms;
    }

    /// Resync frames carry at most `bytes` (a multiple of the block size; tests shrink it so
    /// that every region travels in several chunks).
    pub fn set_resync_chunk(&mut self, bytes: usize) {
        self.resync_chunk = bytes.max(1);
    }

    /// Regions written within `ms` keep their dirty bits (tests shorten it).
    pub fn set_activity_idle_ms(&mut self, ms: u64) {
        self.activity_idle_ms = ms;
    }

    /// How often a Failed leg retries to resync (0: only on [`Input::Resync`]).
    /// The host write latency a resync steers to.
    pub fn set_resync_latency_target(&mut self, target: ResyncLatencyTarget) {
        self.pacer.set_target(target);
    }

    /// A host write completed at this leg after `latency_us`: the resync paces itself by it.
    pub fn observe_host_write(&mut self, latency_us: u64) {
        let resyncing = self.link == (LinkState::Syncing { source: true });
        self.pacer.observe(latency_us, resyncing);
    }

    pub fn set_retry_ms(&mut self, ms: u64) {
        self.retry_ms = ms;
    }

    /// The time now (milliseconds, this leg's monotonic clock). The driver calls this before
    /// every input, so no decision is taken on a clock that stood still while the site was paused.
    pub fn observe_clock(&mut self, now_ms: u64) {
        self.last_tick_ms = self.last_tick_ms.max(now_ms);
    }

    /// The lease this leg serves on: the peer's (`fence_ms` in metro mode).
    fn fence(&self) -> u64 {
        self.metro.as_ref().map_or(self.lease_ms, |m| m.fence_ms)
    }

    /// Until when (core clock) host I/O may be served: `u64::MAX` when no peer's lease bounds it
    /// (serving alone), 0 when not serving. Reactors check it against the clock per command.
    pub fn lease_deadline_ms(&self) -> u64 {
        if !self.serving() {
            return 0;
        }
        let bounded = match &self.metro {
            Some(_) => self.quorum != Quorum::Solo || self.through_peer(),
            None => self.role == Role::Secondary,
        };
        if bounded {
            self.peer_lease_until_ms
        } else {
            u64::MAX
        }
    }

    /// Metro mode: new timers and failback policy (a reload); the election state is kept.
    pub fn set_metro_timers(&mut self, metro: Metro) {
        if self.metro.is_some() {
            self.metro = Some(metro);
        }
    }

    fn witness_reachable(&self) -> bool {
        self.witness_seen_ms.is_some_and(|t| self.last_tick_ms.saturating_sub(t) <= WITNESS_ALIVE_MS)
    }

    fn fresh_generation(&mut self) -> u64 {
        self.random ^= self.random << 13;
        self.random ^= self.random >> 7;
        self.random ^= self.random << 17;
        self.random | 1
    }

    /// Whether the peer's Hello on this connection advertised `cap` ([`caps`]).
    fn peer_can(&self, cap: u8) -> bool {
        self.peer.is_some_and(|p| p.caps & cap != 0)
    }

    fn peer_reachable(&self) -> bool {
        matches!(self.link, LinkState::Connected | LinkState::Syncing { .. })
    }

    /// Whether writes go to the peer: it is connected and its device works (or it is being
    /// resynced, which must see every write made meanwhile).
    fn replicating(&self) -> bool {
        self.peer_reachable() && (self.peer_failure.is_none() || matches!(self.link, LinkState::Syncing { source: true }))
    }

    pub fn handle(&mut self, input: Input, out: &mut Vec<Output>) {
        self.dispatch(input, out);
        if self.handover.is_some() {
            self.advance_handover(out);
        }
        self.ping_if_due(out);
    }

    /// Pings the peer every 2/5 of the lease: each answer extends the lease (module docs).
    fn ping_if_due(&mut self, out: &mut Vec<Output>) {
        let now = self.last_tick_ms;
        if matches!(self.link, LinkState::Down | LinkState::Refused(_)) || now.saturating_sub(self.last_ping_ms) < self.fence() * 2 / 5 {
            return;
        }
        self.send_ping(out);
    }

    fn send_ping(&mut self, out: &mut Vec<Output>) {
        self.last_ping_ms = self.last_tick_ms;
        let mut f = Frame::new(Kind::Ping, 0);
        f.offset = self.last_tick_ms;
        // The lease an answer gives this leg: the peer's settle time must cover it.
        f.len = self.fence();
        out.push(Output::Send(f));
    }

    fn dispatch(&mut self, input: Input, out: &mut Vec<Output>) {
        match input {
            Input::Host { tag, op } => self.on_host(tag, op, out),
            Input::LocalDone { id, result } => self.on_local_done(id, result, out),
            Input::Frame(f) => self.on_frame(f, out),
            Input::LinkUp => {
                let parked = self.abort_handover("the link to the peer was replaced");
                self.peer_leaving = false;
                // A connection is not yet a peer (a half-dead path connects and then says
                // nothing): an election goes on until the peer's Hello arrives.
                self.link = LinkState::Handshake;
                self.link_epoch += 1;
                self.defers_sent = 0;
                self.defers_seen = 0;
                out.push(Output::Send(self.hello_frame(0)));
                // The first answered Ping gives the lease.
                self.send_ping(out);
                self.resubmit(parked, out);
            }
            Input::LinkDown => {
                let parked = self.abort_handover("the link to the peer was lost");
                self.on_link_down(out);
                self.resubmit(parked, out);
            }
            Input::Tick { now_ms } => {
                self.observe_clock(now_ms);
                let now_ms = self.last_tick_ms;
                self.pacer.tick(now_ms);
                let elapsed = now_ms.saturating_sub(self.prev_tick_ms);
                self.prev_tick_ms = now_ms;
                if self.alone_at_ms.is_some_and(|t| now_ms >= t) {
                    self.alone_at_ms = None;
                    self.release_held(Ok(()), out);
                }
                if self.disk == DiskState::Failed && self.retry_ms > 0 && now_ms.saturating_sub(self.last_retry_ms) >= self.retry_ms {
                    self.retry_failed(out);
                }
                if self.resync_rate > 0 {
                    self.tokens = (self.tokens + self.resync_rate * elapsed / 1000).min(self.resync_rate);
                }
                self.pump_resync(out);
                if now_ms / 1000 != (now_ms - elapsed) / 1000 {
                    self.sweep(out);
                }
                if self.metro.is_some() {
                    self.metro_tick(out);
                }
            }
            Input::Witness(reply) => self.on_witness(reply, out),
            Input::Failback => {
                if self.failback_hold {
                    self.failback_hold = false;
                    self.why = "failed back by the operator".into();
                }
            }
            Input::Resync => {
                if self.disk == DiskState::Failed {
                    self.retry_failed(out);
                }
            }
        }
    }

    fn on_link_down(&mut self, out: &mut Vec<Output>) {
        let was = std::mem::replace(&mut self.link, LinkState::Down);
        self.peer = None;
        self.peer_lease_until_ms = 0;
        self.to_sync.clear();
        self.sync_cursor = 0;
        self.awaiting_bitmap = false;
        // Regions sent whose acknowledgement will never come: they stay dirty; their ranges free.
        let sent: Vec<u64> =
            self.ops.iter().filter(|(_, o)| matches!(o.origin, Origin::ResyncOut(_)) && o.local_done).map(|(id, _)| *id).collect();
        for id in sent {
            self.ops.remove(&id);
            self.resync_inflight = self.resync_inflight.saturating_sub(1);
            self.release(id, out);
        }
        if self.metro.is_some() {
            return self.metro_link_down(was, out);
        }
        match self.role {
            Role::Preferred => {
                if was != LinkState::Down {
                    self.diverge(out);
                }
                self.unconfirmed.clear();
                self.forwarded.clear();
                // Writes waiting for the peer complete here (their regions stay dirty), but only
                // once the peer's lease has surely run out: until then it may still serve reads.
                let at = self.settle_at();
                if self.last_tick_ms >= at {
                    self.release_held(Ok(()), out);
                } else {
                    self.alone_at_ms = Some(at);
                }
            }
            Role::Secondary => {
                if self.disk == DiskState::UpToDate {
                    self.disk = DiskState::Outdated;
                }
                self.fail_forwarded(BdevError::Fenced, out);
            }
        }
        // Resync reads in flight finish on their own; their data is not sent.
    }

    /// Writes this leg forwarded that the peer may or may not have executed: the hosts retry them
    /// on a serving path (the peer's dirty bits cover whatever it applied).
    fn fail_forwarded(&mut self, error: BdevError, out: &mut Vec<Output>) {
        let forwarded: Vec<(u64, u64)> = self
            .ops
            .iter()
            .filter(|(_, o)| o.stage == Stage::Forwarded)
            .filter_map(|(id, o)| if let Origin::Host(tag) = o.origin { Some((*id, tag)) } else { None })
            .collect();
        for (id, tag) in forwarded {
            self.ops.remove(&id);
            out.push(Output::Complete { tag, result: Err(error.clone()) });
        }
    }
}
