//! What a leg shows: whether it serves, how hosts should see its paths, and the status snapshot.

use super::*;

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

/// A snapshot for status displays.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorStatus {
    /// Whether this leg orders writes now (a failover or a failed leg can move it).
    pub role: Role,
    /// The role the configuration gives.
    pub configured_role: Role,
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
    /// Times this leg's device failed since start.
    pub leg_failures: u64,
}

impl MirrorCore {
    /// Whether host I/O may be served by this leg now.
    pub fn serving(&self) -> bool {
        let leased = self.last_tick_ms < self.peer_lease_until_ms;
        if self.through_peer() {
            return true;
        }
        if self.metro.is_none() {
            return match self.role {
                Role::Preferred => self.disk == DiskState::UpToDate,
                Role::Secondary => self.link == LinkState::Connected && self.disk == DiskState::UpToDate && leased,
            };
        }
        if self.disk != DiskState::UpToDate || self.failback_hold || self.leaving {
            return false;
        }
        let solo = self.quorum == Quorum::Solo;
        match self.link {
            LinkState::Connected | LinkState::Syncing { source: true } => solo || leased,
            _ => solo,
        }
    }

    /// A Failed leg whose peer orders writes and holds the data: it serves every host command by
    /// forwarding it (reads too), while its lease from the peer holds.
    pub(super) fn through_peer(&self) -> bool {
        self.disk == DiskState::Failed
            && self.role == Role::Secondary
            && self.link == LinkState::Connected
            && self.peer.is_some_and(|p| p.disk == DiskState::UpToDate)
            && self.last_tick_ms < self.peer_lease_until_ms
    }

    /// This leg orders writes (every write reaches its device first).
    pub fn orders_writes(&self) -> bool {
        self.role == Role::Preferred
    }

    /// How hosts should see this leg's paths.
    pub fn access(&self) -> Access {
        if self.through_peer() {
            return Access::Remote;
        }
        if self.serving() {
            let alone = self.metro.is_some() && (self.quorum == Quorum::Solo || self.peer_failure.is_some());
            return match (alone, self.metro.is_some() && self.meta.switched, self.role) {
                (true, _, _) => Access::Sole,
                (false, true, Role::Preferred) => Access::Leading,
                (false, true, Role::Secondary) => Access::Standby,
                (false, false, _) => Access::Serving,
            };
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
    pub(super) fn refusal(&self) -> BdevError {
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
        // dirty bitmap while apart or while the peer's device is Failed (connected, it gets
        // nothing until its resync).
        let regions = match self.link {
            LinkState::Connected if self.peer_failure.is_none() => 0,
            LinkState::Syncing { source: true } => {
                self.to_sync[self.sync_cursor.min(self.to_sync.len())..].len() as u64 + self.resync_inflight as u64
            }
            // The target, from the source's plan and what has arrived.
            LinkState::Syncing { source: false } => self.sync_total.saturating_sub(self.resynced_bytes).div_ceil(region),
            _ if self.role == Role::Preferred => self.meta.dirty_count(),
            _ => 0,
        };
        MirrorStatus {
            role: self.role,
            configured_role: if self.configured_preferred { Role::Preferred } else { Role::Secondary },
            disk: self.disk,
            peer_disk: self.peer.map(|p| p.disk),
            link: self.link.clone(),
            serving: self.serving(),
            out_of_sync_bytes: (regions * region).min(self.size),
            sync_total_bytes: self.sync_total,
            synced_bytes: if self.link == (LinkState::Syncing { source: false }) {
                self.resynced_bytes.min(self.sync_total)
            } else {
                self.resynced_bytes
            },
            access: self.access(),
            failure: self.failure.clone(),
            leg_failures: self.leg_failures,
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

    pub(super) fn lease(&self) -> String {
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
}
