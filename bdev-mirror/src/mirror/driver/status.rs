//! What the link thread publishes: the leg's [`Access`], lease deadline and ordering (for the
//! reactors, at once after every input; [`access_code`] and [`access_of`] encode the access in
//! an atomic), and the [`StatusReport`] that `nvmetro status` shows (every 100 ms).

use super::LinkThread;
use crate::mirror::core::{Access, LinkState, MirrorStatus, Role};
use crate::mirror::DiskState;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

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
    pub metro: Option<crate::mirror::core::MetroStatus>,
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
    /// Connections the link is made of now (0: down), and how many it takes.
    pub lanes_up: usize,
    pub lanes_wanted: usize,
    /// Lanes up that workers on reactors other than the link's drive.
    pub lanes_on_reactors: usize,
    /// Frames those workers sent since start.
    pub frames_sent_by_reactors: u64,
    /// Times the link came up since start (a link that flaps counts up).
    pub link_ups: u64,
    /// Why the link last went down (a lane broke, the peer broke the lane rules, silence past
    /// the heartbeat, ...), and how many seconds ago.
    pub last_link_down: Option<(String, u64)>,
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

pub(super) fn access_code(a: Access) -> u8 {
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

pub(super) fn access_of(code: u8) -> Access {
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

impl LinkThread {
    /// Access and lease for the reactors, at once (not at the end of the turn): a leg that just
    /// fenced itself must not serve one more read while its answers leave.
    pub(super) fn publish_access(&mut self) {
        let (access, lease) = if self.broken { (Access::Fenced, 0) } else { (self.core.access(), self.core.lease_deadline_ms()) };
        self.shared.lease_until_ms.store(lease, Ordering::Release);
        self.shared.access.store(access_code(access), Ordering::Release);
        self.shared.orders.store(!self.broken && self.core.orders_writes(), Ordering::Release);
    }

    pub(super) fn publish(&mut self) {
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
        let ago = |f: &crate::mirror::core::Failure| now_ms.saturating_sub(f.since_ms) / 1000;
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
            lanes_up: self.lanes_up(),
            lanes_wanted: self.lanes.wanted,
            lanes_on_reactors: self.lanes_on_reactors(),
            frames_sent_by_reactors: self.ports.iter().map(|p| p.frames_sent()).sum(),
            link_ups: self.link_ups,
            last_link_down: self.last_down.as_ref().map(|(why, at)| (why.clone(), now.duration_since(*at).as_secs())),
            failed_for_seconds: st.failure.as_ref().map(&ago),
            failure: st.failure.as_ref().map(|f| format!("{f}, {} s ago", ago(f))),
            peer_failure: st.peer_failure.as_ref().map(|f| format!("{f}, {} s ago", ago(f))),
        };
        if let Ok(mut s) = self.shared.status.lock() {
            *s = report;
        }
    }
}
