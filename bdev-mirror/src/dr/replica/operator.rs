//! The operator's requests at the DR site, run on the stream's thread: promotion (checked, then
//! recorded durably once the applier is idle) and the DR test's view (opened once the applier
//! is idle, discarded at once).

use super::*;

impl Stream {
    /// An operator's promotion: checked, then (once everything issued is applied and durable)
    /// recorded durably before a host may write.
    pub(super) fn take_promotion(&mut self) {
        let Some((force, reply)) = self.shared.promote.lock().ok().and_then(|mut p| p.take()) else { return };
        if self.promoted() {
            let _ = reply.send(Ok(format!("already promoted: serving read-write at write {}", self.applier.applied())));
            return;
        }
        let mut risks = Vec::new();
        if self.conn.is_some() {
            risks.push("the production site is streaming to this DR site now (stop it or its group first)");
        }
        if !self.consistent {
            risks.push("the DR image is not consistent (its full copy has not ended): it would serve a torn image");
        }
        if let Some(why) = &self.failed {
            let _ = reply.send(Err(format!("the DR image stopped taking writes ({why}): repair the member first")));
            return;
        }
        if let Some(v) = self.shared.view.load_full() {
            let _ = reply.send(Err(format!(
                "a DR test's view is open (taken at write {}): discard it first (`nvmetro dr test GROUP stop`)",
                v.since
            )));
            return;
        }
        if !risks.is_empty() && !force {
            let _ = reply.send(Err(format!("refused: {}; add --force to promote anyway", risks.join("; "))));
            return;
        }
        self.drop_conn("the DR image is being promoted");
        self.promotion = Some((reply, risks.join("; ")));
    }

    /// Completes a promotion once the applier has nothing in flight.
    pub(super) fn finish_promotion(&mut self) {
        if self.promotion.is_none() || !self.applier.idle() {
            return;
        }
        let (reply, risks) = self.promotion.take().expect("checked");
        // Durable before the first host write: a restart must not take the stream again.
        let applied = self.applier.applied();
        let mut record = self.record(applied);
        record[2] = 1;
        if let Err(e) = self.state.store(record) {
            let _ = reply.send(Err(format!("cannot record the promotion: {e}; nothing changed")));
            return;
        }
        self.shared.promoted.store(true, Ordering::Release);
        let forced = if risks.is_empty() { String::new() } else { format!(" (forced: {risks})") };
        tracing::warn!(group = %self.name, applied, "DR image PROMOTED: serving hosts read-write as of write {applied}{forced}; the stream from the production site is refused from now on");
        let _ = reply.send(Ok(format!("promoted: the members serve hosts read-write as of write {applied}{forced}")));
    }

    pub(super) fn discard_view(&mut self, why: &str) {
        if let Some(v) = self.shared.view.swap(None) {
            tracing::error!(group = %self.name, since = v.since, "DR test view discarded: {why}; the stream goes on, the members are Inaccessible again");
        }
    }

    /// An operator's DR test request: opening waits for the applier to be idle (no frame is
    /// taken meanwhile), so the view is an image the production site could have had.
    pub(super) fn take_test(&mut self) {
        let Some((open, reply)) = self.shared.test.lock().ok().and_then(|mut t| t.take()) else { return };
        if !open {
            let outcome = match self.shared.view.swap(None) {
                Some(v) => {
                    let held = v.held_bytes();
                    tracing::warn!(group = %self.name, since = v.since, held, "DR test view discarded: the members are Inaccessible again");
                    Ok(format!(
                        "test view discarded (taken at write {}, it held {held} bytes); the members are Inaccessible again",
                        v.since
                    ))
                }
                None => Err("no DR test view is open".to_string()),
            };
            let _ = reply.send(outcome);
            return;
        }
        let refusal = if self.promoted() || self.promotion.is_some() {
            Some("the image is promoted: its members serve hosts already".to_string())
        } else if let Some(v) = self.shared.view.load_full() {
            Some(format!("a test view is open already (taken at write {})", v.since))
        } else if let Some(why) = &self.failed {
            Some(format!("the DR image stopped taking writes ({why})"))
        } else if !self.consistent {
            Some("the DR image is not consistent (a copy or catch-up is under way): a view of it would be torn; open it once `nvmetro dr status` shows it consistent".to_string())
        } else if self.test_open.is_some() {
            Some("a test view is being opened".to_string())
        } else {
            None
        };
        match refusal {
            Some(why) => {
                let _ = reply.send(Err(format!("refused: {why}")));
            }
            None => self.test_open = Some(reply),
        }
    }

    pub(super) fn finish_test_open(&mut self) {
        if self.test_open.is_none() || !self.applier.idle() {
            return;
        }
        let reply = self.test_open.take().expect("checked");
        let since = self.applier.applied();
        let state = self.view_state.clone();
        match TestView::open(since, &self.geometry, |i| view_store(&state, i)) {
            Ok(v) => {
                self.shared.view.store(Some(Arc::new(v)));
                tracing::warn!(group = %self.name, since, "DR test view open: hosts here read and write a point-in-time image as of write {since}; the stream keeps being applied");
                let _ = reply.send(Ok(format!(
                    "test view open as of write {since}: the members serve hosts read-write; the stream keeps being applied; `nvmetro dr test GROUP stop` discards it"
                )));
            }
            Err(e) => {
                let _ = reply.send(Err(format!("cannot create the test view's store beside {}: {e}", state.display())));
            }
        }
    }
}
