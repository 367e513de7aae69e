//! Writes of the stream that wait until the image's bytes they overwrite are kept, read first
//! (in chunks): for a DR test's view (in its store) and, while the image is not consistent, for
//! the rollback log that keeps the last consistent image (durably before the write).

use super::host::BdevResult;
use super::*;

/// A write of the stream held until the image's bytes it overwrites are kept (for the test view
/// and the rollback log, whichever needs them).
pub(super) struct Keep {
    view: Option<Arc<TestView>>,
    member: usize,
    id: u64,
    op: BdevOp,
    /// The range being read now, and those to read after it.
    reading: (u64, u64),
    rest: VecDeque<(u64, u64)>,
}

/// The image's bytes kept at a time, before a write of the stream.
const KEEP_CHUNK: u64 = 1 << 20;
/// The most one write of the stream may have kept before it (larger: the view or the rollback
/// log is given up rather than the stream stalled).
const KEEP_LIMIT: u64 = 1 << 30;
/// Tags of the reads that keep the image's bytes (below [`FLUSH_TAG`], above every write's
/// sequence and the rollback's tags).
const KEEP_TAG: u64 = 1 << 62;

/// Byte ranges merged where they overlap or touch, in order.
fn merged(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (o, l) in runs {
        match out.last_mut() {
            Some((po, pl)) if *po + *pl >= o => *pl = (*pl).max(o + l - *po),
            _ => out.push((o, l)),
        }
    }
    out
}

impl Stream {
    /// Submits a write of the stream: while a test view is open or the last consistent image is
    /// kept, only once the image's bytes it overwrites are kept.
    pub(super) fn submit_write(&mut self, member: usize, id: u64, op: BdevOp) {
        let Some((offset, len)) = op.range() else { return self.member_ch[member].submit(id, op) };
        // The first write past an overflow ends the consistent image: it is kept from now on.
        if self.consistent && self.rollback.is_none() && self.gap.is_some_and(|g| id > g) {
            let since = self.gap.expect("checked");
            self.start_rollback(since, true);
        }
        let mut view = self.shared.view.load_full();
        let mut runs = view.as_ref().map(|v| v.members[member].unheld(offset, len)).unwrap_or_default();
        if runs.iter().map(|r| r.1).sum::<u64>() > KEEP_LIMIT {
            // A deallocation of a whole device, say: keeping it would stall the stream.
            self.discard_view(&format!("the stream overwrites {len} bytes at once, more than a view keeps for one write"));
            (view, runs) = (None, Vec::new());
        }
        if let Some(log) = &self.rollback {
            let more = log.unheld(member, offset, len);
            if more.iter().map(|r| r.1).sum::<u64>() > KEEP_LIMIT {
                self.drop_rollback(&format!("the stream overwrites {len} bytes at once, more than it keeps for one write"));
            } else {
                runs.extend(more);
            }
        }
        let mut rest: VecDeque<(u64, u64)> = VecDeque::new();
        for (mut at, mut n) in merged(runs) {
            while n > 0 {
                let step = n.min(KEEP_CHUNK);
                rest.push_back((at, step));
                (at, n) = (at + step, n - step);
            }
        }
        match rest.pop_front() {
            Some(reading) => self.keep_next(Keep { view, member, id, op, reading, rest }),
            None => self.member_ch[member].submit(id, op),
        }
    }

    /// Starts keeping the image as it is now, consistent at `since` (before anything makes it
    /// inconsistent); without the log a promotion needs `--force` until the image is consistent.
    pub(super) fn start_rollback(&mut self, since: u64, at_gap: bool) {
        if self.promoted() {
            return;
        }
        match super::super::rollback::RollbackLog::create(rollback_path(&self.view_state), since, &self.geometry) {
            Ok(log) => {
                tracing::info!(group = %self.name, since, "DR image: keeping its last consistent state (as of write {since}) while it is not consistent");
                self.rollback = Some(log);
                self.rollback_gap = at_gap.then_some(since);
            }
            Err(e) => {
                tracing::error!(group = %self.name, "cannot keep the last consistent DR image ({e}): until the image is consistent again, a promotion needs --force")
            }
        }
    }

    /// The last consistent image can no longer be kept (why): its log goes, and until the image
    /// is consistent again a promotion needs `--force`.
    pub(super) fn drop_rollback(&mut self, why: &str) {
        if let Some(log) = self.rollback.take() {
            tracing::error!(group = %self.name, since = log.since, "the last consistent DR image is no longer kept: {why}; until the image is consistent again, a promotion needs --force");
            log.remove();
        }
    }

    fn keep_next(&mut self, k: Keep) {
        let tag = KEEP_TAG | self.next_keep;
        self.next_keep += 1;
        self.member_ch[k.member].submit(tag, BdevOp::Read { offset: k.reading.0, len: k.reading.1 as usize });
        self.keeping.insert(tag, k);
    }

    /// The image's bytes were read: kept (durably in the rollback log, in the view's store),
    /// then the next range or the write.
    pub(super) fn kept(&mut self, mut k: Keep, read: BdevResult) {
        let data = match read {
            Ok(crate::BdevOutput::Data(d)) => Ok(d),
            Ok(_) => Err("a read returned no data".to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Some(log) = self.rollback.as_mut() {
            if let Err(e) = data.as_ref().map_err(|e| e.clone()).and_then(|d| log.keep(k.member, k.reading.0, d).map_err(|e| e.to_string()))
            {
                self.drop_rollback(&format!("its bytes could not be kept ({e})"));
            }
        }
        if let Some(view) = k.view.clone().filter(|v| self.shared.view.load_full().is_some_and(|c| Arc::ptr_eq(&c, v))) {
            if let Err(e) =
                data.as_ref().map_err(|e| e.clone()).and_then(|d| view.members[k.member].keep(k.reading.0, d).map_err(|e| e.to_string()))
            {
                // The stream goes on; a view that cannot be kept is no view.
                self.discard_view(&format!("the image's bytes could not be kept for it ({e})"));
            }
        }
        if let Some(next) = k.rest.pop_front() {
            k.reading = next;
            return self.keep_next(k);
        }
        self.member_ch[k.member].submit(k.id, k.op);
    }
}

/// Where the last consistent image is kept: beside the replica's state.
pub(super) fn rollback_path(state: &std::path::Path) -> PathBuf {
    state.with_extension("rollback")
}
