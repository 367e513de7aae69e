//! A group over metro mirrors ([`DrGroupSettings::follows_metro`]): standing by while the other
//! site feeds the DR site (writes pass unnumbered and a copy is owed), becoming active again, and
//! taking over the stream the other site fed (`Rebase` past what the DR site holds, then a copy
//! that sends what differs).

use super::*;

impl Engine {
    /// Over metro mirrors: this site no longer orders every member's writes (or no longer
    /// serves): the other site feeds the DR site. Writes pass unnumbered from now on, so the
    /// next time this site feeds it, it starts with a `Rebase` and a copy (recorded first).
    pub(super) fn stand_by(&mut self) {
        tracing::info!(group = %self.settings.name, "DR group stands by: this site does not order every member's writes; the other metro site feeds the DR site");
        self.standby = true;
        self.conn_lost("standing by");
        self.want_conn.store(false, Ordering::Release);
        self.redial_at = None;
        self.release_held();
        self.drop_copy();
        self.fall_behind();
    }

    /// Writes pass unnumbered (standing by): the stream goes on after what may have been
    /// numbered, with a copy (recorded before the first such write passes).
    pub(super) fn fall_behind(&mut self) {
        if self.behind {
            return;
        }
        self.behind = true;
        let base = self.reserved;
        self.new_sequencer(base);
        self.reserved = base + RESERVE;
        self.rebase = Some(base);
        self.copied = false;
        self.copy_done_seq = None;
        self.gap = None;
        if let Err(e) = self.persist(false) {
            self.break_off(&format!("cannot store the group's state: {e}"));
        }
    }

    /// This site feeds the DR site (again): a copy follows the `Rebase` if writes passed while
    /// it stood by (a site that starts and feeds at once goes on where it stopped).
    pub(super) fn become_active(&mut self) {
        tracing::info!(group = %self.settings.name, "DR group active: this site orders every member's writes and feeds the DR site");
        self.standby = false;
        self.behind = false;
        self.refused = None;
        if !self.copied && self.copy.is_none() {
            self.copy = Some(Copy::full(&self.member_size));
        }
        self.want_conn.store(true, Ordering::Release);
    }

    /// The DR site holds another producer's stream (the other metro site fed it): go on after
    /// what it holds with a copy that sends what differs, and name this group's stream there.
    pub(super) fn take_over(&mut self, applied: u64, from: u64) -> Result<(), String> {
        let base = applied.max(self.reserved);
        tracing::warn!(group = %self.settings.name, from = format!("{from:#x}"), base, "DR group takes the stream over from the other metro site: a copy compares every region and sends what differs; the DR image is not consistent until it ends");
        // What was numbered since this site became active was never sent: it goes on after
        // the base, in its order, and so does the copy already under way.
        match self.seq.renumber_after(base) {
            Some(delta) => {
                // The copy ends once the DR site acknowledged its last region, renumbered too.
                if let Some(last) = self.copy.as_mut().and_then(|c| c.last_seq.as_mut()) {
                    *last += delta;
                }
            }
            None => {
                self.release_held();
                self.drop_copy();
                self.new_sequencer(base);
            }
        }
        if self.copy.as_ref().is_none_or(|c| c.catch_up) {
            self.drop_copy();
            self.copy = Some(Copy::full(&self.member_size));
        }
        self.reserved = self.seq.last_numbered() + self.seq.waiting_writes() + RESERVE;
        self.rebase = Some(base);
        self.copied = false;
        self.copy_done_seq = None;
        self.gap = None;
        self.persist(false).map_err(|e| format!("cannot store the group's state: {e}"))
    }
}
