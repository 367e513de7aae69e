//! The operator's requests at the DR site, run on the stream's thread: promotion (checked, then
//! recorded durably once the applier is idle) and the DR test's view (opened once the applier
//! is idle, discarded at once).

use super::*;

/// Writes back in flight at once during a rollback.
const ROLLBACK_WINDOW: usize = 16;
/// Tags of a rollback's writes (with the kept record's index) and flushes: below the keep and
/// flush tags, above every write's sequence.
const ROLLBACK_TAG: u64 = 1 << 61;
const ROLLBACK_FLUSH: u64 = ROLLBACK_TAG | (1 << 60);

pub(super) fn is_rollback_tag(tag: u64) -> bool {
    tag >> 61 == 1
}

/// A promotion's rollback under way.
#[derive(Debug, Default)]
pub(super) struct RollbackIo {
    next: usize,
    in_flight: usize,
    flushing: bool,
    done: bool,
    bytes: u64,
    error: Option<String>,
}

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
        if !self.consistent && self.rollback.is_none() {
            risks.push("the DR image is not consistent (its full copy has not ended) and its last consistent state was not kept: it would serve a torn image");
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

    /// Completes a promotion once the applier has nothing in flight: an image that is not
    /// consistent is first rolled back to the last consistent one kept (written back and
    /// flushed), then the promotion is recorded.
    pub(super) fn finish_promotion(&mut self) {
        if self.promotion.is_none() || !self.applier.idle() || !self.keeping.is_empty() {
            return;
        }
        let mut rolled_back = None;
        if !self.consistent && self.rollback.is_some() {
            let io = self.rollback_io.get_or_insert_with(RollbackIo::default);
            if !io.done {
                return self.pump_rollback();
            }
            let io = self.rollback_io.take().expect("present");
            if let Some(e) = io.error {
                let (reply, _) = self.promotion.take().expect("checked");
                let _ = reply.send(Err(format!(
                    "rolling the image back to its last consistent state failed ({e}); nothing was promoted (the kept state stays: promote again)"
                )));
                return;
            }
            let since = self.rollback.as_ref().expect("checked").since;
            self.applier = Applier::new(since);
            self.consistent = true;
            self.gap = None;
            rolled_back = Some(io.bytes);
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
        if let Some(log) = self.rollback.take() {
            log.remove();
        }
        let forced = if risks.is_empty() { String::new() } else { format!(" (forced: {risks})") };
        let rolled = rolled_back.map_or(String::new(), |bytes| {
            format!(" (rolled back to the last consistent image: {bytes} bytes the copy or catch-up under way had overwritten were written back)")
        });
        tracing::warn!(group = %self.name, applied, "DR image PROMOTED: serving hosts read-write as of write {applied}{rolled}{forced}; the stream from the production site is refused from now on");
        let _ = reply.send(Ok(format!("promoted: the members serve hosts read-write as of write {applied}{rolled}{forced}")));
    }

    /// Writes the kept bytes back (a window at a time), then flushes every member.
    fn pump_rollback(&mut self) {
        let (Some(log), Some(io)) = (self.rollback.as_ref(), self.rollback_io.as_mut()) else { return };
        while io.error.is_none() && io.in_flight < ROLLBACK_WINDOW && io.next < log.kept().len() {
            let k = log.kept()[io.next];
            match log.read(&k) {
                Ok(data) => {
                    io.bytes += k.len;
                    self.member_ch[k.member]
                        .submit(ROLLBACK_TAG | io.next as u64, BdevOp::Write { offset: k.offset, data: data.into(), fua: false });
                    io.in_flight += 1;
                }
                Err(e) => io.error = Some(format!("reading the kept bytes: {e}")),
            }
            io.next += 1;
        }
        if io.in_flight == 0 && !io.flushing && (io.next >= log.kept().len() || io.error.is_some()) {
            if io.error.is_some() {
                io.done = true;
                return;
            }
            io.flushing = true;
            for ch in self.member_ch.iter_mut() {
                ch.submit(ROLLBACK_FLUSH, BdevOp::Flush);
                io.in_flight += 1;
            }
        }
    }

    /// A write back or flush of the rollback completed.
    pub(super) fn rollback_done(&mut self, tag: u64, result: Result<crate::BdevOutput, crate::BdevError>) {
        let Some(io) = self.rollback_io.as_mut() else { return };
        io.in_flight = io.in_flight.saturating_sub(1);
        if let Err(e) = result {
            io.error.get_or_insert(format!("{} failed: {e}", if tag == ROLLBACK_FLUSH { "a flush" } else { "writing back" }));
        }
        if io.flushing && io.in_flight == 0 {
            io.done = true;
        }
        self.pump_rollback();
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
        // Checked again: the epoch it waited for may have passed a gap or a Rebase.
        if !self.consistent || self.failed.is_some() || self.promoted() || self.promotion.is_some() {
            let _ =
                reply.send(Err("refused: the DR image stopped being consistent (or was promoted) while the view was being opened".into()));
            return;
        }
        let since = self.applier.applied();
        let state = self.view_state.clone();
        self.views_opened += 1;
        let n = self.views_opened;
        match TestView::open(since, &self.geometry, |i| super::super::test_view::store_path(&state, i, n)) {
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
