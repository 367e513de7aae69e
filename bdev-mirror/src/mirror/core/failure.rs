//! Failing legs: a leg whose device fails records itself Failed (durably) and fences; its peer
//! records that, keeps every dirty region and orders writes; the Failed leg retries by a resync.

use super::*;

impl MirrorCore {
    /// This leg's device failed an operation on `range`: record it durably (with the range dirty,
    /// so whichever way the next resync goes it covers the range), tell the peer, stop serving.
    /// Everything output after this runs only once the Persist is durable.
    pub(super) fn local_failed(&mut self, error: &BdevError, range: Option<(u64, u64)>, out: &mut Vec<Output>) {
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
        self.leg_failures += 1;
        self.last_retry_ms = self.last_tick_ms;
        // The peer orders writes from now on (it takes over on our Failed frame); writes this
        // leg ordered and has not answered are answered with an error: hosts retry there.
        // (Not to a peer that is departing: it serves nothing any more.)
        if self.role == Role::Preferred
            && self.peer_reachable()
            && self.peer.is_some_and(|p| p.disk == DiskState::UpToDate)
            && !self.peer_leaving
        {
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
    pub(super) fn peer_failed(&mut self, code: u32, offset: u64, len: u64, out: &mut Vec<Output>) {
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
        if self.leaving {
            // Departing: this leg serves nothing and takes nothing over (the peer may already
            // write under the generation the witness granted it); the departure is over.
            tracing::warn!("planned departure: the peer's device failed; closing the link");
            self.left.get_or_insert(false);
            return;
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
    pub(super) fn retry_failed(&mut self, out: &mut Vec<Output>) {
        self.last_retry_ms = self.last_tick_ms;
        if !self.peer_reachable() {
            return;
        }
        tracing::info!("mirror leg failed: retrying (resync from the peer)");
        self.link = LinkState::Handshake;
        out.push(Output::Send(self.hello_frame(HELLO_AGAIN)));
    }
}
