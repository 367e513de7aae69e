//! What `nvmetro status` and the metrics show of a group ([`DrGroupStatus`]), published every
//! 100 ms from the group's thread, with the recovery point and its alarm against `rpo_target`.

use super::*;

/// What `nvmetro status` and the metrics show of a group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrGroupStatus {
    pub name: String,
    pub members: Vec<String>,
    pub mode: String,
    pub dr_site: String,
    pub connected: bool,
    /// "replicating", "copying", "waiting for the DR site", or why the DR site was refused.
    pub state: String,
    pub behind_writes: u64,
    pub behind_bytes: u64,
    pub behind_ms: u64,
    pub buffered_bytes: u64,
    pub buffer_limit: u64,
    /// Long-throw: bytes in the journal, and its size.
    pub journal_bytes: u64,
    pub journal_limit: Option<u64>,
    /// Long-throw: writes not numbered because buffer and journal were full, since start.
    pub overflows: u64,
    /// The last copy that ended: bytes it read, and bytes of data it sent (the rest matched by
    /// checksum).
    pub last_copy_read_bytes: u64,
    pub last_copy_sent_bytes: u64,
    pub rpo_target_ms: Option<u64>,
    pub rpo_alarm: bool,
    pub rpo_alarms: u64,
    pub copy_done_bytes: u64,
    pub copy_total_bytes: u64,
    pub copy_bytes_per_second: u64,
    pub acked_seq: u64,
    pub numbered_seq: u64,
}

impl Engine {
    pub(super) fn publish(&mut self) {
        let now = self.now_ms();
        let rp = self.seq.recovery_point(now);
        let target_ms = self.settings.rpo_target.map(|t| t.as_millis() as u64);
        let alarm = target_ms.is_some_and(|t| rp.age_ms > t);
        if alarm != self.alarm {
            self.alarm = alarm;
            if alarm {
                self.alarms += 1;
                tracing::warn!(group = %self.settings.name, behind_ms = rp.age_ms, rpo_target_ms = target_ms, "DR group: the recovery point is behind its target");
            } else {
                tracing::info!(group = %self.settings.name, "DR group: the recovery point is within its target again");
            }
        }
        let (copy_done, copy_total, speed) = match self.copy.as_mut() {
            Some(c) => {
                let dt = c.speed.0.elapsed();
                if dt >= Duration::from_secs(1) {
                    c.speed = (Instant::now(), c.done_bytes, (c.done_bytes - c.speed.1) * 1000 / dt.as_millis().max(1) as u64);
                }
                (c.done_bytes, c.total, c.speed.2)
            }
            None => (0, 0, 0),
        };
        let connected = self.conn.is_some() && self.greeted;
        let state = match (&self.refused, connected, self.copy.as_ref().map(|c| c.catch_up)) {
            _ if self.broken.is_some() => {
                format!("STOPPED: {} (host writes go on without the DR site)", self.broken.as_deref().unwrap_or(""))
            }
            _ if self.standby => "standing by (the other metro site feeds the DR site)".into(),
            (Some(why), _, _) => format!("refused: {why}"),
            (None, false, _) => "waiting for the DR site".into(),
            (None, true, Some(false)) => "copying".into(),
            (None, true, Some(true)) => "catching up after an overflow (the DR image is not consistent until it ends)".into(),
            (None, true, None) => "replicating".into(),
        };
        if let Ok(mut s) = self.shared.status.lock() {
            s.mode = match (self.settings.mode, &self.journal) {
                (DrMode::Sync, _) => "sync",
                (DrMode::Async, Some(_)) => "long-throw",
                (DrMode::Async, None) => "async",
            }
            .into();
            s.dr_site = self.settings.dr_site.to_string();
            s.connected = connected;
            s.state = state;
            s.behind_writes = rp.writes;
            s.behind_bytes = rp.bytes;
            s.behind_ms = rp.age_ms;
            s.buffered_bytes = self.seq.buffered_bytes();
            s.journal_bytes = self.seq.spilled_bytes();
            s.journal_limit = self.journal.as_ref().map(|j| if self.journal_off { 0 } else { j.1 });
            s.overflows = self.overflows;
            (s.last_copy_read_bytes, s.last_copy_sent_bytes) = self.copy_sent;
            s.buffer_limit = self.settings.buffer_limit;
            s.rpo_target_ms = target_ms;
            s.rpo_alarm = alarm;
            s.rpo_alarms = self.alarms;
            s.copy_done_bytes = copy_done;
            s.copy_total_bytes = copy_total;
            s.copy_bytes_per_second = speed;
            s.acked_seq = self.seq.acked();
            s.numbered_seq = self.seq.last_numbered();
        }
    }
}
