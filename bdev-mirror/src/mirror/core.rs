//! One mirror leg as a state machine without I/O: [`MirrorCore::handle`] takes an [`Input`] (a
//! host write, a local completion, a frame from the peer, the link going up or down, a tick) and
//! appends [`Output`]s (issue a local operation, send a frame, complete a host operation, make the
//! metadata durable). The driver executes outputs in order; `Persist` must be durable before it
//! executes anything after it.
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
//!   neither does, the non-survivor defers (durably) and the survivor arms: a later link loss is
//!   then decided without the witness. The non-survivor is released only over the link, once it
//!   reaches the witness again, so the two can never both believe they may serve.
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
//!
//! Failing legs (DRBD's `on-io-error detach`, Mayastor's child faulting): a leg whose device fails
//! a write (or a resync read) records itself `Failed` durably (and the failed range dirty), sends
//! `Failed` to its peer, and only then acknowledges anything; it serves nothing (ANA
//! Inaccessible). Its peer, on `Failed` or on an error acknowledgement, starts a new generation
//! (durable before any completion that follows), keeps every dirty region (the sweep stops) and
//! becomes the ordering leg if it was not. The failed leg retries ([`MirrorCore::set_retry_ms`],
//! [`Input::Resync`]) with a new Hello on the live connection: a resync of the dirty regions makes
//! it UpToDate again, or it fails again.

use super::frame::{flags, status, Frame, Hello, Kind, OpCode};
use super::meta::{Meta, SyncDirection};
use super::DiskState;
use crate::{BdevError, BdevOp, BdevOutput};
use std::collections::{HashMap, VecDeque};

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

/// Metro-mode settings: a witness decides who serves when the legs lose each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metro {
    /// The witness's name for this mirror (both sites use the same). The pre-elected survivor
    /// (when the witness was lost first) is the configured preferred leg.
    pub resource: String,
    /// After a resync, wait for [`Input::Failback`] before serving again.
    pub manual_failback: bool,
    /// Stop serving after this long without a frame from the connected peer.
    pub fence_ms: u64,
    /// After losing the peer, serve alone no sooner than this (must exceed the peer's `fence_ms`).
    pub settle_ms: u64,
    /// At start, wait this long for the peer before asking the witness.
    pub startup_grace_ms: u64,
    /// Report Transition (ANA Change) at most this long, then Inaccessible while undecided.
    pub transition_ms: u64,
}

/// Clock-rate difference the lease inequality allows between two sites (10 %).
const CLOCK_RATE_MARGIN_PERCENT: u64 = 10;
/// Scheduling slack the lease inequality allows, in milliseconds.
const LEASE_SLACK_MS: u64 = 25;

impl Metro {
    /// Settings for mirror `resource` with timers derived from the link's heartbeat timeout.
    pub fn new(resource: &str, manual_failback: bool, heartbeat_ms: u64) -> Metro {
        let mut m = Metro {
            resource: resource.to_string(),
            manual_failback,
            fence_ms: 0,
            settle_ms: 0,
            startup_grace_ms: 0,
            transition_ms: 10_000,
        };
        m.set_heartbeat(heartbeat_ms);
        m
    }

    /// A leg stops serving after `h/2` of silence from its peer; a leg that lost its peer (after
    /// `h`) serves alone only `h/2 + 100 ms` later, when the other leg has surely stopped.
    pub fn set_heartbeat(&mut self, h: u64) {
        self.fence_ms = h / 2;
        self.settle_ms = h / 2 + 100;
        self.startup_grace_ms = 2 * h;
    }

    /// The lease inequality (module docs): a leg that takes over waits until its peer's lease has
    /// surely run out, even if the peer's clock runs 10 % slower.
    pub fn check(&self) -> Result<(), String> {
        let needed = lease_settle(self.fence_ms);
        if self.fence_ms == 0 || self.settle_ms < needed {
            return Err(format!(
                "metro timers unsafe: settle {} ms must be at least fence {} ms x 1.{} + {} ms = {needed} ms",
                self.settle_ms, self.fence_ms, CLOCK_RATE_MARGIN_PERCENT, LEASE_SLACK_MS
            ));
        }
        Ok(())
    }
}

/// The least settle time that is safe for a lease of `fence_ms` (the module docs' inequality).
fn lease_settle(fence_ms: u64) -> u64 {
    fence_ms + fence_ms * CLOCK_RATE_MARGIN_PERCENT / 100 + LEASE_SLACK_MS
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
    /// The sender defers to the receiver: it will not serve alone after a link loss.
    pub const DEFER: u32 = 2;
    /// The receiver no longer counts on the sender deferring.
    pub const RELEASE: u32 = 3;
}

/// What status displays show of the witness and the election.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetroStatus {
    pub witness_reachable: bool,
    /// Milliseconds since the witness last answered.
    pub witness_seen_ms_ago: Option<u64>,
    pub witness_authority: u64,
    pub witness_holder: u8,
    pub quorum: String,
    /// What this leg's right to serve rests on now, and when it lapses.
    pub lease: String,
    pub why: String,
    pub pre_elected: String,
    pub failback_pending: bool,
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
    Witness(super::witness::Reply),
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
    Witness(super::witness::Request),
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
}

const RESYNC_WINDOW: usize = 16;
/// A confirmed region's dirty bit is cleared only after this long without writes, so a hot
/// region does not pay a metadata write (and sync) again and again (DRBD's activity log).
const ACTIVITY_IDLE_MS: u64 = 5_000;

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
    active: Vec<u64>,
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
    /// Survivor: the peer deferred to this leg.
    armed: bool,
    failback_hold: bool,
    last_report_ms: u64,
    /// The last witness request's sequence number (grows for the site's whole life).
    witness_seq: u64,
    /// A grant that arrived while a connection was in its handshake (see `on_witness`).
    pending_grant: Option<u64>,
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
    /// Why the peer's device is Failed, as it told this leg.
    peer_failure: Option<Failure>,
    /// A Failed leg retries this often (0: only when the operator asks).
    retry_ms: u64,
    last_retry_ms: u64,
    /// The current resync lost a region (a failed read here or write there): the target is not
    /// a faithful copy at its end.
    sync_errors: bool,
}

impl std::fmt::Debug for MirrorCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MirrorCore({:?} {:?} {:?} {} ops)", self.role, self.disk, self.link, self.ops.len())
    }
}

/// A snapshot for status displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorStatus {
    pub role: Role,
    pub disk: DiskState,
    pub peer_disk: Option<DiskState>,
    pub link: LinkState,
    pub serving: bool,
    pub out_of_sync_bytes: u64,
    pub sync_total_bytes: u64,
    pub synced_bytes: u64,
    pub access: Access,
    pub metro: Option<MetroStatus>,
    /// Why this leg is Failed, and since when (core clock).
    pub failure: Option<Failure>,
    pub peer_failure: Option<Failure>,
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
        let disk = if role == Role::Preferred || meta.generations.current != 0 { DiskState::UpToDate } else { DiskState::Inconsistent };
        if role == Role::Preferred && meta.generations.current == 0 {
            // The first preferred leg founds the data lineage.
            meta.generations.current = seed | 1;
            out.push(Output::Persist);
        }
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
            configured_preferred: role == Role::Preferred,
            awaiting_bitmap: false,
            metro: None,
            quorum: Quorum::Peer,
            why: String::new(),
            witness_seen_ms: None,
            witness_authority: 0,
            witness_holder: 0,
            peer_reaches_witness: true,
            armed: false,
            failback_hold: false,
            last_report_ms: 0,
            witness_seq: 0,
            pending_grant: None,
            prev_tick_ms: 0,
            lease_ms: DEFAULT_LEASE_MS,
            peer_lease_until_ms: 0,
            last_pong_sent_ms: None,
            last_ping_ms: 0,
            alone_at_ms: None,
            failure: None,
            peer_failure: None,
            retry_ms: 30_000,
            last_retry_ms: 0,
            sync_errors: false,
        };
        (core, out)
    }

    /// Switches to metro mode (before the first input): the witness decides who serves alone.
    /// `seq_base` must exceed every sequence number an earlier run of this site sent (the
    /// driver uses the wall clock in microseconds).
    pub fn set_metro(&mut self, metro: Metro, seq_base: u64) {
        self.witness_seq = seq_base;
        if self.meta.generations.current != 0 && !self.meta.failed {
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

    /// How often a Failed leg retries to resync (0: only on [`Input::Resync`]).
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
            Some(_) => self.quorum != Quorum::Solo,
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

    /// Whether host I/O may be served by this leg now.
    pub fn serving(&self) -> bool {
        let leased = self.last_tick_ms < self.peer_lease_until_ms;
        if self.metro.is_none() {
            return match self.role {
                Role::Preferred => self.disk == DiskState::UpToDate,
                Role::Secondary => self.link == LinkState::Connected && self.disk == DiskState::UpToDate && leased,
            };
        }
        if self.disk != DiskState::UpToDate || self.failback_hold {
            return false;
        }
        let solo = self.quorum == Quorum::Solo;
        match self.link {
            LinkState::Connected | LinkState::Syncing { source: true } => solo || leased,
            _ => solo,
        }
    }

    /// How hosts should see this leg's paths.
    pub fn access(&self) -> Access {
        if self.serving() {
            let alone = self.metro.is_some() && (self.quorum == Quorum::Solo || self.peer_failure.is_some());
            return if alone { Access::Sole } else { Access::Serving };
        }
        match (&self.metro, &self.quorum) {
            (Some(_), Quorum::Won { .. }) => Access::Transition,
            (Some(m), Quorum::Electing { since_ms, .. }) if self.last_tick_ms.saturating_sub(*since_ms) < m.transition_ms => {
                Access::Transition
            }
            _ => Access::Fenced,
        }
    }

    /// The error host I/O gets while this leg does not serve.
    fn refusal(&self) -> BdevError {
        if self.access() == Access::Transition {
            BdevError::Transition
        } else {
            BdevError::Fenced
        }
    }

    pub fn status(&self) -> MirrorStatus {
        let region = 1u64 << self.meta.region_shift;
        // What a resync would have to copy: nothing while connected (hot regions stay marked for
        // crash safety, but the peer has them), the rest of the sync set while syncing, and the
        // dirty bitmap while apart.
        let regions = match self.link {
            LinkState::Connected => 0,
            LinkState::Syncing { source: true } => {
                self.to_sync[self.sync_cursor.min(self.to_sync.len())..].len() as u64 + self.resync_inflight as u64
            }
            _ if self.role == Role::Preferred => self.meta.dirty_count(),
            _ => 0,
        };
        MirrorStatus {
            role: self.role,
            disk: self.disk,
            peer_disk: self.peer.map(|p| p.disk),
            link: self.link.clone(),
            serving: self.serving(),
            out_of_sync_bytes: (regions * region).min(self.size),
            sync_total_bytes: self.sync_total,
            synced_bytes: self.resynced_bytes,
            access: self.access(),
            failure: self.failure.clone(),
            peer_failure: self.peer_failure.clone(),
            metro: self.metro.as_ref().map(|_| MetroStatus {
                witness_reachable: self.witness_reachable(),
                witness_seen_ms_ago: self.witness_seen_ms.map(|t| self.last_tick_ms.saturating_sub(t)),
                witness_authority: self.witness_authority,
                witness_holder: self.witness_holder,
                quorum: match self.quorum {
                    Quorum::Starting => "starting",
                    Quorum::Peer => "with peer",
                    Quorum::Electing { .. } => "electing",
                    Quorum::Won { .. } => "won, settling",
                    Quorum::Solo => "serving alone",
                    Quorum::Fenced => "fenced",
                }
                .into(),
                lease: self.lease(),
                why: self.why.clone(),
                pre_elected: if self.armed {
                    "this site survives a link loss (witness lost)".into()
                } else if self.meta.deferred {
                    "the peer survives a link loss (witness lost)".into()
                } else {
                    String::new()
                },
                failback_pending: self.failback_hold,
            }),
        }
    }

    fn lease(&self) -> String {
        let Some(m) = &self.metro else { return String::new() };
        match (&self.quorum, &self.link) {
            (Quorum::Solo, _) if self.witness_authority == self.meta.generations.current => {
                format!("witness grant for generation {:x} (held until the peer is resynced)", self.meta.generations.current)
            }
            (Quorum::Solo, _) => {
                format!("pre-election (generation {:x}; recorded at the witness when it answers)", self.meta.generations.current)
            }
            (_, LinkState::Connected | LinkState::Syncing { source: true }) => {
                let now = self.last_tick_ms;
                if now < self.peer_lease_until_ms {
                    format!(
                        "from the peer: lapses in {} ms unless a Ping is answered ({} ms each)",
                        self.peer_lease_until_ms - now,
                        m.fence_ms
                    )
                } else {
                    format!("lapsed {} ms ago: no Ping answered", now - self.peer_lease_until_ms)
                }
            }
            _ => "none".into(),
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
        out.push(Output::Send(f));
    }

    fn dispatch(&mut self, input: Input, out: &mut Vec<Output>) {
        match input {
            Input::Host { tag, op } => self.on_host(tag, op, out),
            Input::LocalDone { id, result } => self.on_local_done(id, result, out),
            Input::Frame(f) => self.on_frame(f, out),
            Input::LinkUp => {
                // A connection is not yet a peer (a half-dead path connects and then says
                // nothing): an election goes on until the peer's Hello arrives.
                self.link = LinkState::Handshake;
                let mut f = Frame::new(Kind::Hello, 0);
                f.payload = self.hello().to_payload();
                out.push(Output::Send(f));
                // The first answered Ping gives the lease.
                self.send_ping(out);
            }
            Input::LinkDown => self.on_link_down(out),
            Input::Tick { now_ms } => {
                self.observe_clock(now_ms);
                let now_ms = self.last_tick_ms;
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

    /// This leg's device failed an operation on `range`: record it durably (with the range dirty,
    /// so whichever way the next resync goes it covers the range), tell the peer, stop serving.
    /// Everything output after this runs only once the Persist is durable.
    fn local_failed(&mut self, error: &BdevError, range: Option<(u64, u64)>, out: &mut Vec<Output>) {
        let (offset, len) = range.unwrap_or((0, 0));
        if let Some(r) = range {
            self.meta.mark(r.0, r.1);
        }
        let first = self.failure.is_none();
        self.disk = DiskState::Failed;
        self.meta.failed = true;
        out.push(Output::Persist);
        // Every failure is told (a resync under way must know it did not make a copy).
        if self.peer_reachable() || self.link == LinkState::Handshake {
            let mut f = Frame::new(Kind::Failed, 0);
            f.arg = error_code(error);
            f.offset = offset;
            f.len = len;
            out.push(Output::Send(f));
        }
        if !first {
            return;
        }
        let failure = Failure { error: error.to_string(), offset, len, since_ms: self.last_tick_ms };
        self.why = format!("fenced: this leg's device failed: {failure}");
        tracing::error!("mirror leg failed: {failure}; fenced until a resync from the peer");
        self.failure = Some(failure);
        self.last_retry_ms = self.last_tick_ms;
        // The peer orders writes from now on (it takes over on our Failed frame); writes this
        // leg ordered and has not answered are answered with an error: hosts retry there.
        if self.role == Role::Preferred && self.peer_reachable() && self.peer.is_some_and(|p| p.disk == DiskState::UpToDate) {
            self.switch_role(Role::Secondary, out);
        }
        if self.metro.is_some() {
            self.quorum = Quorum::Fenced;
        }
        self.release_held(Err(BdevError::Fenced), out);
    }

    /// The peer's device failed (its `Failed` frame, or an error acknowledgement): it is no
    /// longer a copy. Start a new generation (durable before anything output after this), keep
    /// every dirty region until a resync, and order writes here.
    fn peer_failed(&mut self, code: u32, offset: u64, len: u64, out: &mut Vec<Output>) {
        // A resync under way cannot make the peer a faithful copy any more.
        self.sync_errors = true;
        if self.peer_failure.is_some() {
            return;
        }
        let failure = Failure { error: code_error(code).to_string(), offset, len, since_ms: self.last_tick_ms };
        tracing::error!("mirror peer's device failed: {failure}; serving without it until it is resynced");
        self.peer_failure = Some(failure);
        if let Some(p) = self.peer.as_mut() {
            p.disk = DiskState::Failed;
        }
        if self.disk != DiskState::UpToDate {
            // Neither leg is a faithful copy: nothing may be served.
            self.why = "fenced: both legs failed or are out of date".into();
            return;
        }
        self.diverge(out);
        if self.role != Role::Preferred {
            self.fail_forwarded(BdevError::Transition, out);
            self.switch_role(Role::Preferred, out);
        }
        if self.metro.is_some() {
            self.quorum = Quorum::Peer;
        }
        self.why = "serving without the peer: its device failed".into();
    }

    /// A Failed leg tries again: a new Hello on the live connection asks the peer for a resync
    /// (the peer answers with its own). Without a connection, the next one resyncs anyway.
    fn retry_failed(&mut self, out: &mut Vec<Output>) {
        self.last_retry_ms = self.last_tick_ms;
        if !self.peer_reachable() {
            return;
        }
        tracing::info!("mirror leg failed: retrying (resync from the peer)");
        self.link = LinkState::Handshake;
        let mut f = Frame::new(Kind::Hello, 0);
        f.arg = HELLO_AGAIN;
        f.payload = self.hello().to_payload();
        out.push(Output::Send(f));
    }

    fn hello(&self) -> Hello {
        Hello {
            site: self.site,
            preferred: self.configured_preferred,
            generations: self.meta.generations,
            disk: self.disk,
            size: self.size,
        }
    }

    /// Metro mode, every tick: reports to the witness and the peer, elections, settling.
    fn metro_tick(&mut self, out: &mut Vec<Output>) {
        let Some(m) = self.metro.clone() else { return };
        let now = self.last_tick_ms;
        match self.quorum {
            Quorum::Starting if self.link == LinkState::Connected => self.quorum = Quorum::Peer,
            Quorum::Starting if now >= m.startup_grace_ms && self.link != LinkState::Handshake && !self.peer_reachable() => {
                self.elect(out);
            }
            Quorum::Solo | Quorum::Fenced if self.link == LinkState::Connected && self.disk == DiskState::UpToDate => {
                self.quorum = Quorum::Peer;
                if !self.failback_hold {
                    self.why = "in sync with the peer".into();
                }
            }
            Quorum::Won { at_ms } if now >= at_ms => {
                self.quorum = Quorum::Solo;
                self.why = if self.armed {
                    "serving alone: pre-elected survivor (peer and witness lost)".into()
                } else {
                    format!("serving alone: granted by the witness (generation {:x})", self.meta.generations.current)
                };
                tracing::warn!("{}", self.why);
                self.release_held(Ok(()), out);
            }
            _ => {}
        }
        // The witness: elections ask often; everything else reports at the interval.
        let due = match self.quorum {
            Quorum::Electing { last_ask_ms, .. } => now.saturating_sub(last_ask_ms) >= 100,
            _ => now.saturating_sub(self.last_report_ms) >= WITNESS_INTERVAL_MS,
        };
        if due {
            self.last_report_ms = now;
            let in_sync = self.link == LinkState::Connected
                && self.disk == DiskState::UpToDate
                && self.peer.is_some_and(|p| p.disk == DiskState::UpToDate);
            let g = self.meta.generations;
            let alone = !self.peer_reachable();
            let (ask, next, nonce) = match &mut self.quorum {
                Quorum::Electing { next, nonce, last_ask_ms, .. } => {
                    *last_ask_ms = now;
                    (super::witness::Ask::Acquire, *next, *nonce)
                }
                // Serving alone: confirm the grant (and, after a pre-election, record it).
                Quorum::Solo | Quorum::Won { .. } if alone => (super::witness::Ask::Acquire, 0, 0),
                _ => (super::witness::Ask::Report, 0, 0),
            };
            self.witness_seq += 1;
            out.push(Output::Witness(super::witness::Request {
                ask,
                seq: self.witness_seq,
                site: self.site,
                in_sync,
                nonce,
                current: g.current,
                bitmap: g.bitmap,
                next,
                resource: m.resource.clone(),
            }));
            if self.link == LinkState::Connected {
                self.pre_elect(&m, out);
            }
        }
    }

    /// While connected: tell the peer whether the witness answers; when neither leg reaches it,
    /// agree that the survivor serves after a link loss.
    fn pre_elect(&mut self, m: &Metro, out: &mut Vec<Output>) {
        // Just started and not heard from yet is not lost: give the witness the startup grace.
        let reachable = self.witness_reachable() || (self.witness_seen_ms.is_none() && self.last_tick_ms < m.startup_grace_ms);
        let mut arg = if reachable { wit::REACHABLE } else { wit::UNREACHABLE };
        if !self.configured_preferred && !reachable && !self.peer_reaches_witness && self.disk == DiskState::UpToDate {
            if !self.meta.deferred {
                self.meta.deferred = true;
                out.push(Output::Persist);
                tracing::warn!("witness lost by both sites: the pre-elected peer survives a link loss");
            }
            arg = wit::DEFER;
        }
        let mut f = Frame::new(Kind::Witness, 0);
        f.arg = arg;
        out.push(Output::Send(f));
    }

    fn on_witness_frame(&mut self, arg: u32, out: &mut Vec<Output>) {
        let survivor = self.configured_preferred;
        match arg {
            wit::DEFER if survivor => {
                self.peer_reaches_witness = false;
                if !self.armed {
                    tracing::warn!("witness lost by both sites: this site survives a link loss");
                }
                self.armed = true;
            }
            wit::REACHABLE | wit::UNREACHABLE => {
                self.peer_reaches_witness = arg == wit::REACHABLE;
                if survivor && self.armed && arg == wit::REACHABLE {
                    self.armed = false;
                }
                if survivor && !self.armed {
                    let mut f = Frame::new(Kind::Witness, 0);
                    f.arg = wit::RELEASE;
                    out.push(Output::Send(f));
                }
            }
            wit::RELEASE if self.meta.deferred && self.witness_reachable() => {
                self.meta.deferred = false;
                out.push(Output::Persist);
            }
            _ => {}
        }
    }

    /// Lost the peer (or started without it): decide how to ask for the right to serve alone.
    fn elect(&mut self, out: &mut Vec<Output>) {
        let now = self.last_tick_ms;
        if self.meta.deferred {
            self.quorum = Quorum::Fenced;
            self.disk = DiskState::Outdated;
            self.why = "fenced: the pre-elected peer survives (the witness was lost first)".into();
            self.release_held(Err(BdevError::Fenced), out);
        } else if self.disk != DiskState::UpToDate {
            self.quorum = Quorum::Fenced;
            self.why = format!("fenced: this copy is {}", self.disk.name());
            self.release_held(Err(BdevError::Fenced), out);
        } else if self.armed {
            self.diverge(out);
            self.become_orderer(out);
            self.quorum = Quorum::Won { at_ms: self.settle_at() };
            self.why = "pre-elected survivor: settling".into();
        } else {
            let next = if self.meta.generations.bitmap == 0 { self.fresh_generation() } else { 0 };
            let nonce = self.fresh_generation();
            self.quorum = Quorum::Electing { since_ms: now, next, nonce, last_ask_ms: 0 };
            self.pending_grant = None;
            self.why = "peer lost: asking the witness".into();
        }
    }

    /// When this leg may serve alone: once the lease its last Pong could have given the peer has
    /// surely run out (module docs), and not before now.
    fn settle_at(&self) -> u64 {
        let settle = self.metro.as_ref().map_or(lease_settle(self.lease_ms), |m| m.settle_ms);
        self.last_pong_sent_ms.map_or(self.last_tick_ms, |p| (p + settle).max(self.last_tick_ms))
    }

    fn on_witness(&mut self, reply: super::witness::Reply, out: &mut Vec<Output>) {
        use super::witness::Verdict;
        self.witness_seen_ms = Some(self.last_tick_ms);
        self.witness_authority = reply.authority;
        self.witness_holder = reply.holder;
        match (self.quorum.clone(), reply.verdict) {
            (Quorum::Electing { nonce, next, .. }, Verdict::Granted) if nonce == reply.nonce && self.link == LinkState::Handshake => {
                // Our Hello went out with the old generations: diverging now would confuse the
                // handshake. Keep the grant for the case the connection dies without a Hello.
                self.pending_grant = Some(next);
            }
            (Quorum::Electing { nonce, next, .. }, Verdict::Granted) if nonce == reply.nonce => {
                self.take_grant(next, out);
            }
            (Quorum::Electing { nonce, .. }, Verdict::Denied) if nonce == reply.nonce => {
                self.quorum = Quorum::Fenced;
                self.disk = DiskState::Outdated;
                self.why = format!("fenced: site {} won the witness; waiting to be resynced", reply.holder);
                tracing::warn!("{}", self.why);
                self.release_held(Err(BdevError::Fenced), out);
            }
            (Quorum::Solo, Verdict::Denied) if reply.nonce == 0 && !self.peer_reachable() => {
                // The witness says another lineage holds the authority (an operator reset it):
                // stop, never risk two writers.
                self.quorum = Quorum::Fenced;
                self.disk = DiskState::Outdated;
                self.why = format!("fenced: the witness no longer grants this site (holder: site {})", reply.holder);
                tracing::error!("{}", self.why);
            }
            _ => {}
        }
    }

    /// The witness granted this leg the right to serve alone under generation `next`.
    fn take_grant(&mut self, next: u64, out: &mut Vec<Output>) {
        let g = &mut self.meta.generations;
        if next != 0 && g.bitmap == 0 {
            g.history = 0;
            g.bitmap = g.current;
            g.current = next;
            out.push(Output::Persist);
        }
        self.become_orderer(out);
        self.quorum = Quorum::Won { at_ms: self.settle_at() };
        self.why = "granted by the witness: settling".into();
    }

    /// Becomes the leg that orders writes (a secondary promoted by an election).
    fn become_orderer(&mut self, out: &mut Vec<Output>) {
        if self.role != Role::Preferred {
            self.switch_role(Role::Preferred, out);
        }
    }

    fn switch_role(&mut self, role: Role, out: &mut Vec<Output>) {
        let err = self.refusal();
        // Host writes in flight were started under the old role's rules: answer them (hosts
        // retry) and only release their ranges when the local halves end.
        let ids: Vec<u64> = self.ops.iter().filter(|(_, o)| matches!(o.origin, Origin::Host(_))).map(|(id, _)| *id).collect();
        for id in ids {
            let o = self.ops.get_mut(&id).expect("listed");
            if let Origin::Host(tag) = o.origin {
                out.push(Output::Complete { tag, result: Err(err.clone()) });
            }
            o.origin = Origin::Orphan;
            if o.stage != Stage::Running || o.local_done {
                self.ops.remove(&id);
                self.active.retain(|x| *x != id);
                self.waiting.retain(|x| *x != id);
            }
        }
        tracing::info!("mirror leg role: {:?} -> {:?}", self.role, role);
        self.role = role;
    }

    /// Ends the wait of writes held since the peer was lost: complete them (this leg serves
    /// alone) or fail them (hosts retry where the data is served).
    fn release_held(&mut self, verdict: Result<(), BdevError>, out: &mut Vec<Output>) {
        let held: Vec<u64> = self.ops.iter().filter(|(_, o)| o.remote_pending).map(|(id, _)| *id).collect();
        for id in held {
            if let Some(o) = self.ops.get_mut(&id) {
                o.remote_pending = false;
                if let Err(e) = &verdict {
                    o.result = Some(Err(e.clone()));
                }
            }
            self.try_finish(id, out);
        }
    }

    fn new_op(&mut self, origin: Origin, op: BdevOp) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let range = op.range();
        self.ops.insert(id, Op { origin, op, range, stage: Stage::Queued, local_done: false, remote_pending: false, result: None });
        id
    }

    fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
        a.0 < b.0 + b.1.max(1) && b.0 < a.0 + a.1.max(1)
    }

    /// Whether `id` overlaps a running operation or one of `ahead` (earlier waiting ones).
    fn conflicts<'a>(&self, id: u64, ahead: impl IntoIterator<Item = &'a u64>) -> bool {
        let Some(r) = self.ops[&id].range else { return false };
        self.active
            .iter()
            .copied()
            .chain(ahead.into_iter().copied())
            .any(|o| self.ops.get(&o).and_then(|x| x.range).is_some_and(|x| Self::overlaps(r, x)))
    }

    /// Starts `id` when its range is free of running and earlier waiting operations.
    fn admit(&mut self, id: u64, out: &mut Vec<Output>) {
        if self.conflicts(id, &self.waiting) {
            self.waiting.push_back(id);
        } else {
            self.active.push(id);
            self.begin(id, out);
        }
    }

    fn release(&mut self, id: u64, out: &mut Vec<Output>) {
        self.active.retain(|x| *x != id);
        let mut still = VecDeque::new();
        while let Some(w) = self.waiting.pop_front() {
            if self.conflicts(w, &still) {
                still.push_back(w);
            } else {
                self.active.push(w);
                self.begin(w, out);
            }
        }
        self.waiting = still;
    }

    fn mark(&mut self, range: Option<(u64, u64)>, out: &mut Vec<Output>) {
        if let Some((off, len)) = range {
            if self.meta.mark(off, len) {
                out.push(Output::Persist);
            }
        }
    }

    fn on_host(&mut self, tag: u64, op: BdevOp, out: &mut Vec<Output>) {
        if !self.serving() {
            return out.push(Output::Complete { tag, result: Err(self.refusal()) });
        }
        let id = self.new_op(Origin::Host(tag), op);
        match self.role {
            Role::Preferred => self.admit(id, out),
            Role::Secondary => {
                let o = self.ops.get_mut(&id).expect("just added");
                o.stage = Stage::Forwarded;
                let f = op_frame(Kind::Forward, id, &o.op);
                out.push(Output::Send(f));
            }
        }
    }

    /// The operation has its range: issue it.
    fn begin(&mut self, id: u64, out: &mut Vec<Output>) {
        let (origin, range) = {
            let o = &self.ops[&id];
            (o.origin, o.range)
        };
        match (self.role, origin) {
            (Role::Preferred, Origin::Host(_) | Origin::Forwarded(_)) => {
                if !self.peer_reachable() {
                    if self.metro.is_some() && self.quorum != Quorum::Solo {
                        // The peer was lost while this write waited for its range, and this leg
                        // has not been granted to serve alone: it must not run. Answer the host
                        // (it retries where the data is served); a no-op keeps the range until
                        // the queue behind it moves on.
                        let err = self.refusal();
                        let o = self.ops.get_mut(&id).expect("op");
                        if let Origin::Host(tag) = o.origin {
                            out.push(Output::Complete { tag, result: Err(err) });
                        }
                        o.origin = Origin::Orphan;
                        o.stage = Stage::Running;
                        return out.push(Output::Local { id, op: BdevOp::Flush });
                    }
                    self.diverge(out);
                }
                self.mark(range, out);
                let reachable = self.replicating();
                let hold = self.alone_at_ms.is_some();
                let o = self.ops.get_mut(&id).expect("op");
                o.stage = Stage::Running;
                // Alone, but the peer's lease may not have run out yet: complete later.
                o.remote_pending |= hold && !reachable;
                let caw = matches!(o.op, BdevOp::CompareAndWrite { .. });
                // Replicate now, except compare-and-write (only if the compare succeeds) and
                // forwarded writes (the secondary applies its own copy on ForwardDone).
                if reachable && !caw && matches!(origin, Origin::Host(_)) {
                    o.remote_pending = true;
                    let f = op_frame(Kind::Replicate, id, &o.op);
                    out.push(Output::Send(f));
                }
                if let Some((off, len)) = range {
                    for r in self.meta.regions_of(off, len) {
                        self.last_write.insert(r, self.last_tick_ms);
                        if reachable {
                            *self.unconfirmed.entry(r).or_default() += 1;
                        }
                    }
                }
                // The data is not needed here any more, except by a compare-and-write (which
                // replicates its data once the compare succeeds): move it rather than copy it.
                let o = self.ops.get_mut(&id).expect("op");
                let op =
                    if matches!(o.op, BdevOp::CompareAndWrite { .. }) { o.op.clone() } else { std::mem::replace(&mut o.op, BdevOp::Flush) };
                out.push(Output::Local { id, op });
            }
            (_, Origin::ResyncOut(_)) => {
                let o = self.ops.get_mut(&id).expect("op");
                o.stage = Stage::Running;
                let op = o.op.clone();
                out.push(Output::Local { id, op });
            }
            (_, _) => {
                // Applying what the source/preferred leg ordered (or, on the secondary, a host
                // write the preferred has executed).
                // The applying leg keeps no dirty regions of its own: only `written` matters.
                if let Some((off, len)) = range {
                    if self.meta.mark_written(off, len) {
                        out.push(Output::Persist);
                    }
                }
                let o = self.ops.get_mut(&id).expect("op");
                o.stage = Stage::Running;
                let op = match std::mem::replace(&mut o.op, BdevOp::Flush) {
                    BdevOp::CompareAndWrite { offset, data, .. } => BdevOp::Write { offset, data, fua: false },
                    other => other,
                };
                out.push(Output::Local { id, op });
            }
        }
    }

    /// The preferred leg takes writes its peer will not see: start a new generation (once).
    fn diverge(&mut self, out: &mut Vec<Output>) {
        if self.meta.generations.bitmap == 0 {
            let g = &mut self.meta.generations;
            g.history = g.bitmap;
            g.bitmap = g.current;
            let fresh = self.fresh_generation();
            self.meta.generations.current = fresh;
            out.push(Output::Persist);
        }
    }

    fn on_local_done(&mut self, id: u64, result: Result<BdevOutput, BdevError>, out: &mut Vec<Output>) {
        if let (Err(e @ (BdevError::Io(_) | BdevError::NoSpace)), Some(o)) = (&result, self.ops.get(&id)) {
            let range = o.range;
            if matches!(o.origin, Origin::ResyncOut(_)) {
                self.sync_errors = true;
            }
            self.local_failed(e, range, out);
        }
        let reachable = self.replicating();
        let Some(o) = self.ops.get_mut(&id) else { return };
        o.local_done = true;
        let origin = o.origin;
        match origin {
            Origin::Orphan => {
                self.ops.remove(&id);
                self.release(id, out);
            }
            Origin::Host(_) if self.role == Role::Preferred => {
                let undecided = self.metro.is_some() && self.quorum != Quorum::Solo;
                if matches!(o.op, BdevOp::CompareAndWrite { .. })
                    && result == Ok(BdevOutput::Done)
                    && !reachable
                    && undecided
                    && o.result.is_none()
                {
                    // Written here after the peer was lost: held like every write waiting for
                    // the peer, until the election says whether this leg serves alone.
                    o.result = Some(result);
                    o.remote_pending = true;
                    return;
                }
                if matches!(o.op, BdevOp::CompareAndWrite { .. })
                    && result == Ok(BdevOutput::Done)
                    && reachable
                    && !o.remote_pending
                    && o.result.is_none()
                {
                    // The compare succeeded and the data is written here: now the peer.
                    o.result = Some(result);
                    o.remote_pending = true;
                    let (offset, data) = match &o.op {
                        BdevOp::CompareAndWrite { offset, data, .. } => (*offset, data.clone()),
                        _ => unreachable!("checked above"),
                    };
                    let f = op_frame(Kind::Replicate, id, &BdevOp::Write { offset, data, fua: false });
                    out.push(Output::Send(f));
                    return;
                }
                if o.result.is_none() {
                    o.result = Some(result);
                }
                self.try_finish(id, out);
            }
            Origin::Forwarded(seq) => {
                let code = match &result {
                    Ok(BdevOutput::Miscompare) => status::MISCOMPARE,
                    Ok(_) => status::OK,
                    Err(e) => error_code(e),
                };
                let mut f = Frame::new(Kind::ForwardDone, seq);
                f.arg = code;
                out.push(Output::Send(f));
                if let (Some((off, len)), true) = (o.range, code == status::OK) {
                    self.forwarded.insert(seq, (off, len));
                } else if let Some((off, len)) = o.range {
                    self.unconfirm(off, len);
                }
                self.ops.remove(&id);
                self.release(id, out);
            }
            Origin::Host(tag) => {
                // Secondary: the forwarded write is now applied here too.
                out.push(Output::Complete { tag, result: result.clone() });
                let mut f = Frame::new(Kind::ReplicateAck, id);
                f.arg = 1; // confirms a forwarded write
                out.push(Output::Send(f));
                self.ops.remove(&id);
                self.release(id, out);
            }
            Origin::Replicated(seq) | Origin::ResyncIn(seq) => {
                let kind = if matches!(origin, Origin::Replicated(_)) { Kind::ReplicateAck } else { Kind::ResyncAck };
                let mut f = Frame::new(kind, seq);
                f.arg = result.as_ref().map_or_else(error_code, |_| status::OK);
                out.push(Output::Send(f));
                self.ops.remove(&id);
                self.release(id, out);
            }
            Origin::ResyncOut(region) => {
                match result {
                    Ok(BdevOutput::Data(data)) if self.peer_reachable() => {
                        let offset = region << self.meta.region_shift;
                        let mut f = Frame::new(Kind::Resync, id);
                        f.op = OpCode::Write;
                        f.offset = offset;
                        f.len = data.len() as u64;
                        f.payload = data;
                        out.push(Output::Send(f));
                    }
                    _ => {
                        // Link gone or read failed: the region stays dirty for the next attempt.
                        self.resync_inflight -= 1;
                        self.ops.remove(&id);
                        self.release(id, out);
                    }
                }
            }
        }
    }

    fn unconfirm(&mut self, off: u64, len: u64) {
        for r in self.meta.regions_of(off, len) {
            if let Some(c) = self.unconfirmed.get_mut(&r) {
                *c = c.saturating_sub(1);
            }
        }
    }

    /// Completes a preferred-leg host operation once local and remote halves are done.
    fn try_finish(&mut self, id: u64, out: &mut Vec<Output>) {
        let o = &self.ops[&id];
        if !o.local_done || o.remote_pending {
            return;
        }
        let o = self.ops.remove(&id).expect("op");
        if let Origin::Host(tag) = o.origin {
            out.push(Output::Complete { tag, result: o.result.unwrap_or(Ok(BdevOutput::Done)) });
        }
        self.release(id, out);
    }

    fn on_frame(&mut self, f: Frame, out: &mut Vec<Output>) {
        match f.kind {
            Kind::Witness => self.on_witness_frame(f.arg, out),
            Kind::Bitmap => self.on_peer_bitmap(&f.payload, out),
            Kind::Hello if f.arg == HELLO_AGAIN && self.peer_reachable() => {
                // The peer's device failed and it asks for a resync: a new handshake on this
                // connection.
                let mut h = Frame::new(Kind::Hello, 0);
                h.payload = self.hello().to_payload();
                out.push(Output::Send(h));
                self.on_hello(&f, out);
            }
            Kind::Hello => self.on_hello(&f, out),
            Kind::Ping => {
                self.last_pong_sent_ms = Some(self.last_tick_ms);
                let mut p = Frame::new(Kind::Pong, f.seq);
                p.offset = f.offset;
                out.push(Output::Send(p));
            }
            // The echo of one of our Pings: the peer was alive after we sent it. An echo from the
            // future is not ours.
            Kind::Pong if f.offset <= self.last_tick_ms => {
                self.peer_lease_until_ms = self.peer_lease_until_ms.max(f.offset + self.fence());
            }
            Kind::Pong => {}
            Kind::Failed => self.peer_failed(f.arg, f.offset, f.len, out),
            Kind::Replicate if self.peer_reachable() || self.link == LinkState::Handshake => {
                let id = self.new_op(Origin::Replicated(f.seq), frame_op(f));
                self.admit(id, out);
            }
            Kind::ReplicateAck if f.arg == 1 => {
                // The secondary applied a forwarded write.
                if let Some((off, len)) = self.forwarded.remove(&f.seq) {
                    self.unconfirm(off, len);
                }
            }
            Kind::ReplicateAck => {
                let Some(o) = self.ops.get_mut(&f.seq) else { return };
                o.remote_pending = false;
                let range = o.range;
                if let Some((off, len)) = range {
                    self.unconfirm(off, len);
                }
                if f.arg != status::OK {
                    // The peer could not apply it: it is Failed, and this leg records that (a
                    // new generation, durable) before the write completes here; the region stays
                    // dirty until a resync.
                    let (off, len) = range.unwrap_or((0, 0));
                    self.peer_failed(f.arg, off, len, out);
                }
                self.try_finish(f.seq, out);
            }
            Kind::Forward => {
                if !self.serving() {
                    let mut r = Frame::new(Kind::ForwardDone, f.seq);
                    r.arg = status::NOT_SERVING;
                    return out.push(Output::Send(r));
                }
                let id = self.new_op(Origin::Forwarded(f.seq), frame_op(f));
                self.admit(id, out);
            }
            Kind::ForwardDone => {
                let Some(o) = self.ops.get_mut(&f.seq) else { return };
                let Origin::Host(tag) = o.origin else { return };
                if f.arg == status::OK {
                    o.stage = Stage::Queued;
                    self.admit(f.seq, out);
                } else {
                    let result = match f.arg {
                        status::MISCOMPARE => Ok(BdevOutput::Miscompare),
                        status::NOT_SERVING => Err(self.refusal()),
                        code => Err(code_error(code)),
                    };
                    self.ops.remove(&f.seq);
                    out.push(Output::Complete { tag, result });
                }
            }
            Kind::Resync if f.op == OpCode::None && f.arg == RESYNC_INCOMPLETE => {
                // A write failed here during the resync: still not a copy; the next retry tries
                // again.
                self.link = LinkState::Connected;
                self.disk = DiskState::Failed;
                self.meta.failed = true;
                self.last_retry_ms = self.last_tick_ms;
                out.push(Output::Persist);
            }
            Kind::Resync if f.op == OpCode::None && self.disk == DiskState::Failed => {
                // The source sent everything, but a write failed here after its last
                // acknowledgement left: this leg holds the source's generation except in its own
                // dirty regions (the failed ranges among them), which it keeps. The source learns
                // of the failure from our Failed frame and starts a new generation.
                self.meta.generations.current = f.offset;
                self.meta.generations.bitmap = 0;
                self.link = LinkState::Connected;
                self.last_retry_ms = self.last_tick_ms;
                out.push(Output::Persist);
            }
            Kind::Resync if f.op == OpCode::None => {
                // The source has sent everything: this leg is a faithful copy again.
                if self.meta.failed {
                    tracing::info!("mirror leg resynced after its device failed: UpToDate again");
                }
                self.meta.failed = false;
                self.failure = None;
                self.meta.generations.current = f.offset;
                self.meta.generations.bitmap = 0;
                self.disk = DiskState::UpToDate;
                self.link = LinkState::Connected;
                if self.role == Role::Secondary {
                    for w in self.meta.dirty.iter_mut() {
                        *w = 0;
                    }
                }
                if self.metro.as_ref().is_some_and(|m| m.manual_failback) && self.quorum != Quorum::Peer {
                    self.failback_hold = true;
                    self.why = "resynced: waiting for the operator's failback".into();
                }
                out.push(Output::Persist);
            }
            Kind::Resync => {
                let id = self.new_op(Origin::ResyncIn(f.seq), frame_op(f));
                self.admit(id, out);
            }
            Kind::ResyncAck => {
                let Some(o) = self.ops.remove(&f.seq) else { return };
                if let Origin::ResyncOut(region) = o.origin {
                    self.resync_inflight -= 1;
                    if f.arg == status::OK {
                        self.resynced_bytes += o.range.map_or(0, |r| r.1);
                        if self.unconfirmed.get(&region).copied().unwrap_or(0) == 0 {
                            self.meta.clear_dirty(region);
                            self.lazy_persist = true;
                        }
                    } else {
                        self.sync_errors = true;
                        let (off, len) = o.range.unwrap_or((0, 0));
                        self.peer_failed(f.arg, off, len, out);
                    }
                    self.release(f.seq, out);
                    self.pump_resync(out);
                }
            }
            _ => {}
        }
    }

    fn on_hello(&mut self, f: &Frame, out: &mut Vec<Output>) {
        let Some(peer) = Hello::from_payload(&f.payload) else {
            self.link = LinkState::Refused("malformed hello".into());
            return;
        };
        self.peer = Some(peer);
        if peer.size != self.size {
            self.link = LinkState::Refused(format!("peer device is {} bytes, this one {}", peer.size, self.size));
            return;
        }
        if peer.preferred == self.configured_preferred {
            self.link = LinkState::Refused("both legs have the same role; exactly one must be preferred".into());
            return;
        }
        let dir = self.meta.generations.compare(&peer.generations);
        let source = match dir {
            SyncDirection::InSync => self.configured_preferred,
            SyncDirection::ThisIsSource | SyncDirection::FullToPeer => true,
            SyncDirection::PeerIsSource | SyncDirection::FullFromPeer => false,
            SyncDirection::SplitBrain | SyncDirection::Unrelated => {
                self.link = LinkState::Refused(format!("{dir:?}: the legs' data diverged; resolve by discarding one leg"));
                tracing::error!("mirror peer refused: {dir:?}");
                return;
            }
        };
        // Same lineage: a Failed leg is never the source.
        let source = match (dir, self.disk == DiskState::Failed, peer.disk == DiskState::Failed) {
            (SyncDirection::InSync, true, true) => {
                self.link = LinkState::Refused("both legs' devices failed".into());
                return;
            }
            (SyncDirection::InSync, true, false) => false,
            (SyncDirection::InSync, false, true) => true,
            _ => source,
        };
        if matches!(self.quorum, Quorum::Electing { .. }) {
            // The peer is back before the election ended: the handshake decides. A grant held
            // back meanwhile is dropped (the witness heals it once both legs report in sync).
            self.quorum = Quorum::Starting;
            self.pending_grant = None;
            self.why = "peer back during the election".into();
            // Writes held for the verdict never reached the peer: hosts retry them (their regions
            // are dirty, so the resync covers whatever this leg applied).
            self.release_held(Err(BdevError::Transition), out);
        }
        // The sync source orders writes (after a failover that may be the configured secondary).
        let role = if source { Role::Preferred } else { Role::Secondary };
        if role != self.role {
            self.switch_role(role, out);
        }
        if source {
            if dir == SyncDirection::FullToPeer {
                self.meta.dirty_all_written();
            }
            self.to_sync = (0..self.meta.regions).filter(|r| self.meta.is_dirty(*r)).collect();
            self.sync_cursor = 0;
            self.sync_total = self.to_sync.len() as u64 * (1u64 << self.meta.region_shift);
            self.resynced_bytes = 0;
            self.sync_errors = false;
            self.link = LinkState::Syncing { source: true };
            // Wait for the target's bitmap: it may have written regions this leg never saw.
            self.awaiting_bitmap = true;
        } else {
            if dir != SyncDirection::InSync || self.meta.dirty_count() > 0 {
                self.disk = DiskState::Inconsistent;
            }
            self.link = LinkState::Syncing { source: false };
            let mut f = Frame::new(Kind::Bitmap, 0);
            f.payload = self.meta.dirty.iter().flat_map(|w| w.to_le_bytes()).collect();
            out.push(Output::Send(f));
        }
    }

    /// Source: the target's dirty regions join the resync.
    fn on_peer_bitmap(&mut self, payload: &[u8], out: &mut Vec<Output>) {
        if !self.awaiting_bitmap || self.link != (LinkState::Syncing { source: true }) {
            return;
        }
        self.awaiting_bitmap = false;
        let mut added = false;
        for (i, chunk) in payload.chunks_exact(8).enumerate().take(self.meta.dirty.len()) {
            let w = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            added |= w & !self.meta.dirty[i] != 0;
            self.meta.dirty[i] |= w;
        }
        if added {
            out.push(Output::Persist);
        }
        // Everything dirty now: this leg's bits (including writes since the Hello) and the peer's.
        self.to_sync = (0..self.meta.regions).filter(|r| self.meta.is_dirty(*r)).collect();
        self.sync_cursor = 0;
        self.sync_total = self.to_sync.len() as u64 * (1u64 << self.meta.region_shift);
        self.pump_resync(out);
    }

    /// Sends the next dirty regions, within the window and the rate budget.
    fn pump_resync(&mut self, out: &mut Vec<Output>) {
        if self.link != (LinkState::Syncing { source: true }) || self.awaiting_bitmap {
            return;
        }
        let region_len = 1u64 << self.meta.region_shift;
        while self.resync_inflight < RESYNC_WINDOW && self.sync_cursor < self.to_sync.len() {
            if self.resync_rate > 0 {
                if self.tokens < region_len.min(self.resync_rate) {
                    return;
                }
                self.tokens -= region_len.min(self.tokens);
            }
            let region = self.to_sync[self.sync_cursor];
            self.sync_cursor += 1;
            let offset = region << self.meta.region_shift;
            let len = region_len.min(self.size - offset);
            self.resync_inflight += 1;
            let id = self.new_op(Origin::ResyncOut(region), BdevOp::Read { offset, len: len as usize });
            self.admit(id, out);
        }
        if self.sync_cursor >= self.to_sync.len() && self.resync_inflight == 0 && self.sync_errors {
            // A region could not be copied: it stays dirty, the target stays Failed (and
            // retries), this leg keeps its diverged generation.
            let mut f = Frame::new(Kind::Resync, 0);
            f.arg = RESYNC_INCOMPLETE;
            out.push(Output::Send(f));
            self.link = LinkState::Connected;
            self.to_sync.clear();
            tracing::warn!("mirror resync ended with regions not copied; they stay dirty");
            return;
        }
        if self.sync_cursor >= self.to_sync.len() && self.resync_inflight == 0 {
            // Everything sent and acknowledged: the peer is a faithful copy again.
            self.peer_failure = None;
            let mut f = Frame::new(Kind::Resync, 0);
            f.offset = self.meta.generations.current;
            out.push(Output::Send(f));
            self.meta.generations.bitmap = 0;
            self.link = LinkState::Connected;
            if self.disk == DiskState::Outdated {
                // Outdated only by a lost election in the same lineage: both copies now match.
                self.disk = DiskState::UpToDate;
            }
            self.to_sync.clear();
            if let Some(p) = self.peer.as_mut() {
                p.disk = DiskState::UpToDate;
            }
            out.push(Output::Persist);
        }
    }

    /// Clears dirty bits of regions the peer has fully confirmed (preferred leg, in sync).
    fn sweep(&mut self, out: &mut Vec<Output>) {
        // A Failed peer confirms nothing: every region stays dirty until its resync.
        if self.role != Role::Preferred || self.link != LinkState::Connected || self.peer.is_none() || self.peer_failure.is_some() {
            if std::mem::take(&mut self.lazy_persist) {
                out.push(Output::Persist);
            }
            return;
        }
        let now = self.last_tick_ms;
        let mut cleared = false;
        for r in 0..self.meta.regions {
            let idle = self.last_write.get(&r).is_none_or(|t| now.saturating_sub(*t) >= ACTIVITY_IDLE_MS);
            if idle && self.meta.is_dirty(r) && self.unconfirmed.get(&r).copied().unwrap_or(0) == 0 {
                self.meta.clear_dirty(r);
                self.last_write.remove(&r);
                cleared = true;
            }
        }
        self.unconfirmed.retain(|_, c| *c > 0);
        if cleared || std::mem::take(&mut self.lazy_persist) {
            out.push(Output::Persist);
        }
    }

    fn on_link_down(&mut self, out: &mut Vec<Output>) {
        let was = std::mem::replace(&mut self.link, LinkState::Down);
        self.peer = None;
        self.peer_lease_until_ms = 0;
        self.to_sync.clear();
        self.sync_cursor = 0;
        self.awaiting_bitmap = false;
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

    fn metro_link_down(&mut self, was: LinkState, out: &mut Vec<Output>) {
        self.unconfirmed.clear();
        self.forwarded.clear();
        self.fail_forwarded(BdevError::Transition, out);
        match self.quorum {
            // Already serving alone (the peer was resyncing) or already out: nothing to decide.
            Quorum::Solo | Quorum::Won { .. } => self.release_held(Ok(()), out),
            Quorum::Electing { .. } => {
                // The connection that held a grant back died without a Hello: take it now.
                if let Some(next) = self.pending_grant.take() {
                    self.take_grant(next, out);
                }
            }
            Quorum::Fenced => {}
            Quorum::Starting | Quorum::Peer => {
                if matches!(was, LinkState::Syncing { source: false }) && self.disk == DiskState::UpToDate {
                    self.disk = DiskState::Inconsistent;
                }
                self.elect(out);
            }
        }
    }
}

fn error_code(e: &BdevError) -> u32 {
    match e {
        BdevError::NoSpace => status::NO_SPACE,
        BdevError::OutOfRange { .. } => status::OUT_OF_RANGE,
        BdevError::Fenced | BdevError::Transition => status::NOT_SERVING,
        BdevError::Io(_) => status::IO_ERROR,
    }
}

fn code_error(code: u32) -> BdevError {
    match code {
        status::NO_SPACE => BdevError::NoSpace,
        status::NOT_SERVING => BdevError::Fenced,
        _ => BdevError::Io(format!("peer reported error {code}")),
    }
}

/// A Replicate or Forward frame for an operation.
fn op_frame(kind: Kind, seq: u64, op: &BdevOp) -> Frame {
    let mut f = Frame::new(kind, seq);
    match op {
        BdevOp::Write { offset, data, fua } => {
            f.op = OpCode::Write;
            f.offset = *offset;
            f.len = data.len() as u64;
            f.payload = data.clone();
            if *fua {
                f.flags |= flags::FUA;
            }
        }
        BdevOp::WriteZeroes { offset, len } => {
            f.op = OpCode::WriteZeroes;
            f.offset = *offset;
            f.len = *len;
        }
        BdevOp::Deallocate { offset, len } => {
            f.op = OpCode::Deallocate;
            f.offset = *offset;
            f.len = *len;
        }
        BdevOp::CompareAndWrite { offset, expected, data } => {
            f.op = OpCode::CompareAndWrite;
            f.offset = *offset;
            f.len = data.len() as u64;
            f.payload = [expected.as_slice(), data.as_slice()].concat();
        }
        BdevOp::Flush => f.op = OpCode::Flush,
        BdevOp::Read { .. } | BdevOp::Compare { .. } => unreachable!("reads are not replicated"),
    }
    f
}

/// The operation a Replicate, Forward or Resync frame carries (its payload moves into it).
fn frame_op(mut f: Frame) -> BdevOp {
    let len = usize::try_from(f.len).unwrap_or(usize::MAX);
    match f.op {
        OpCode::Write => BdevOp::Write { offset: f.offset, data: f.payload, fua: f.flags & flags::FUA != 0 },
        OpCode::WriteZeroes => BdevOp::WriteZeroes { offset: f.offset, len: f.len },
        OpCode::Deallocate => BdevOp::Deallocate { offset: f.offset, len: f.len },
        OpCode::CompareAndWrite if f.payload.len() == 2 * len => {
            let data = f.payload.split_off(len);
            BdevOp::CompareAndWrite { offset: f.offset, expected: f.payload, data }
        }
        OpCode::Flush | OpCode::None | OpCode::CompareAndWrite => BdevOp::Flush,
    }
}
