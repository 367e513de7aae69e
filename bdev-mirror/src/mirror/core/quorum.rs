//! Metro mode: reports to the witness and the peer, pre-election, elections and their outcome,
//! settling until the other leg's lease has surely run out.
//!
//! Pre-election (module docs of [`super`]): the survivor is the leg that orders writes when
//! both lose the witness, the configured preferred or, after a switchover, its peer. It is
//! agreed by a deferral that the non-ordering leg makes durable before it sends it, and that the
//! ordering leg alone arms on (never while a switchover runs). The invariant: a leg is armed only
//! while its peer is durably deferred. Everything that ends a deferral preserves it: a release
//! must echo the count of every deferral sent on the connection (one still on its way is not
//! released), the releasing leg is not armed and arms again only on a new deferral, and taking
//! ordering by a switchover ends it because the handing-over leg is not armed and, Secondary from
//! then on, never arms (an armed leg that stops ordering disarms).

use super::*;

/// After a link loss, the leg that did not order writes asks the witness this much later.
const ORDERER_HEAD_START_MS: u64 = 100;

impl MirrorCore {
    /// Metro mode, every tick: reports to the witness and the peer, elections, settling.
    pub(super) fn metro_tick(&mut self, out: &mut Vec<Output>) {
        let Some(m) = self.metro.clone() else { return };
        let now = self.last_tick_ms;
        match self.quorum {
            Quorum::Starting if self.link == LinkState::Connected => {
                self.quorum = Quorum::Peer;
                self.why = "serving with the peer".into();
            }
            Quorum::Starting if now >= m.startup_grace_ms && self.link != LinkState::Handshake && !self.peer_reachable() => {
                self.elect(out);
            }
            Quorum::Solo | Quorum::Fenced
                if self.link == LinkState::Connected && self.disk == DiskState::UpToDate && !self.peer_leaving =>
            {
                self.quorum = Quorum::Peer;
                self.forced = false;
                if !self.failback_hold {
                    self.why = "in sync with the peer".into();
                }
            }
            Quorum::Won { at_ms } if now >= at_ms => {
                self.quorum = Quorum::Solo;
                self.why = if self.forced {
                    "serving alone: FORCED by the operator (peer and witness lost)".into()
                } else if self.armed {
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
                    (crate::mirror::witness::Ask::Acquire, *next, *nonce)
                }
                // Serving alone: confirm the grant (and, after a pre-election, record it).
                Quorum::Solo | Quorum::Won { .. } if alone => (crate::mirror::witness::Ask::Acquire, 0, 0),
                _ => (crate::mirror::witness::Ask::Report, 0, 0),
            };
            self.witness_seq += 1;
            out.push(Output::Witness(crate::mirror::witness::Request {
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
    /// the leg that does not order writes defers (durably) to the one that does, which arms.
    pub(super) fn pre_elect(&mut self, m: &Metro, out: &mut Vec<Output>) {
        // Just started and not heard from yet is not lost: give the witness the startup grace.
        let reachable = self.witness_reachable() || (self.witness_seen_ms.is_none() && self.last_tick_ms < m.startup_grace_ms);
        let mut f = Frame::new(Kind::Witness, 0);
        f.arg = if reachable { wit::REACHABLE } else { wit::UNREACHABLE };
        // Only the leg that does not order defers. While a switchover hands ordering over both
        // legs may be Secondary for a moment and both defer: the new orderer's deferral ends
        // when it takes ordering (its peer, now Secondary, never arms), so it is harmless.
        if self.role == Role::Secondary && !reachable && !self.peer_reaches_witness && self.disk == DiskState::UpToDate {
            if !self.meta.deferred {
                self.meta.deferred = true;
                out.push(Output::Persist);
                tracing::warn!("witness lost by both sites: the peer, which orders writes, survives a link loss");
            }
            self.defers_sent += 1;
            f.arg = wit::DEFER;
            f.offset = self.defers_sent;
        }
        out.push(Output::Send(f));
    }

    pub(super) fn on_witness_frame(&mut self, f: &Frame, out: &mut Vec<Output>) {
        match f.arg {
            wit::DEFER => {
                self.defers_seen = f.offset;
                self.peer_reaches_witness = false;
                // The survivor is the leg that orders writes, which the deferring peer does not.
                // Not while a switchover moves ordering: the peer's deferral may end when it takes
                // ordering; it defers again once the roles have settled, and this leg (then
                // Secondary) never arms on it.
                if self.role == Role::Preferred && self.handover.is_none() && !self.leaving {
                    if !self.armed {
                        tracing::warn!("witness lost by both sites: this site, which orders writes, survives a link loss");
                    }
                    self.armed = true;
                }
            }
            wit::REACHABLE | wit::UNREACHABLE => {
                self.peer_reaches_witness = f.arg == wit::REACHABLE;
                if self.armed && f.arg == wit::REACHABLE {
                    self.armed = false;
                }
                if !self.armed {
                    // Echoes the last deferral seen: one still on its way is not released.
                    let mut r = Frame::new(Kind::Witness, 0);
                    r.arg = wit::RELEASE;
                    r.offset = self.defers_seen;
                    out.push(Output::Send(r));
                }
            }
            // The peer saw every deferral this leg sent on this connection and was not armed
            // after the last: it arms again only on a new one, so the promise is not needed.
            // (An older peer echoes nothing; it releases only a leg that reaches the witness.)
            wit::RELEASE
                if self.meta.deferred
                    && if self.peer_can(caps::RELEASE_ECHO) { f.offset == self.defers_sent } else { self.witness_reachable() } =>
            {
                self.meta.deferred = false;
                out.push(Output::Persist);
                tracing::info!("pre-election released: the peer does not count on this site deferring");
            }
            _ => {}
        }
    }

    /// The operator makes this leg serve alone (`nvmetro promote NAME --force`, DRBD's `primary
    /// --force`): only in metro mode, only while neither the peer nor the witness answers, only
    /// with a whole copy (UpToDate, or Outdated by the loss). The leg starts a new generation
    /// (durable first), orders writes and serves once the peer's lease has surely run out. A
    /// returning peer descends from the generation it left, so it is resynced from this leg
    /// before it serves; once the witness answers again this leg's confirmation moves its
    /// authority here. The risk: if the peer also served meanwhile (it reached the witness, or
    /// was the pre-elected survivor), the copies diverged and the peer's writes since are lost
    /// to this lineage. Returns what happened, or why it was refused.
    pub fn force_promote(&mut self, out: &mut Vec<Output>) -> Result<String, String> {
        if self.metro.is_none() {
            return Err(
                "forced promotion is for metro mirrors (with a witness); without one the preferred site serves alone on its own".into()
            );
        }
        if self.link != LinkState::Down {
            // Refused (split brain) included: that peer answers, and it has served alone.
            return Err(format!("the peer answers (link {:?}): nothing to force", self.link));
        }
        match self.quorum {
            Quorum::Solo | Quorum::Won { .. } => return Err("this leg already serves alone (or is about to)".into()),
            // Just started: the peer's lease and the witness are not known to be lost yet.
            Quorum::Starting | Quorum::Peer => {
                return Err("this leg has not yet found its peer and the witness lost (just started?): try again shortly".into())
            }
            Quorum::Electing { .. } | Quorum::Fenced => {}
        }
        if self.witness_reachable() {
            return Err(
                "the witness answers and decides who serves: a forced promotion is only for when the peer and the witness are both lost"
                    .into(),
            );
        }
        if self.meta.failed
            || self.meta.inconsistent
            || self.meta.generations.current == 0
            || !matches!(self.disk, DiskState::UpToDate | DiskState::Outdated)
        {
            return Err(format!("this copy is {}: serving it would serve data that is not whole", self.disk.name()));
        }
        self.meta.deferred = false;
        self.disk = DiskState::UpToDate;
        self.diverge(out);
        out.push(Output::Persist);
        self.become_orderer(out);
        self.forced = true;
        self.quorum = Quorum::Won { at_ms: self.settle_at() };
        self.why = "FORCED by the operator: settling".into();
        Ok(format!(
            "serving alone under generation {:x} once the peer's lease has run out; a peer that returns with the older data is resynced from here, one that served meanwhile is refused (split brain)",
            self.meta.generations.current
        ))
    }

    /// Lost the peer (or started without it): decide how to ask for the right to serve alone.
    pub(super) fn elect(&mut self, out: &mut Vec<Output>) {
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
            let next = self.election_next();
            let nonce = self.fresh_generation();
            // The leg that ordered writes asks at once; the other gives it a head start, so that
            // when both are alive (a partition) the witness keeps the ordering site serving, the
            // one hosts were sent to (after a switchover: the new site). A lost orderer costs the
            // other leg little: its settling mostly covers the head start.
            let first_ask = if self.role == Role::Preferred { 0 } else { (now + ORDERER_HEAD_START_MS).saturating_sub(100) };
            self.quorum = Quorum::Electing { since_ms: now, next, nonce, last_ask_ms: first_ask };
            self.pending_grant = None;
            self.why = "peer lost: asking the witness".into();
        }
    }

    /// The generation an election asks to write under (0: it keeps its diverged one). The same
    /// for every election from one generation: an election that ended without taking its grant
    /// (the peer came back) may still have won it, late datagrams included, and the witness then
    /// denies any other successor of the generation both legs hold until their in-sync reports
    /// heal it (asking for the same one is granted, and nobody else could have won since).
    pub(super) fn election_next(&mut self) -> u64 {
        let g = self.meta.generations;
        if g.bitmap != 0 {
            return 0;
        }
        match self.election_next {
            Some((from, next)) if from == g.current => next,
            _ => {
                let next = self.fresh_generation();
                self.election_next = Some((g.current, next));
                next
            }
        }
    }

    /// When this leg may serve alone: once the lease its last Pong could have given the peer has
    /// surely run out (module docs), and not before now.
    pub(super) fn settle_at(&self) -> u64 {
        if self.peer_leaving {
            // The peer stopped serving before it said it leaves: no lease of its to wait out.
            return self.last_tick_ms;
        }
        let own = self.metro.as_ref().map_or(lease_settle(self.lease_ms), |m| m.settle_ms);
        // The peer's fence, as its Pings said, may be longer than ours.
        let settle = own.max(lease_settle(self.peer_fence_ms));
        self.last_pong_sent_ms.map_or(self.last_tick_ms, |p| (p + settle).max(self.last_tick_ms))
    }

    pub(super) fn on_witness(&mut self, reply: crate::mirror::witness::Reply, out: &mut Vec<Output>) {
        use crate::mirror::witness::Verdict;
        self.witness_seen_ms = Some(self.last_tick_ms);
        self.witness_authority = reply.authority;
        self.witness_holder = reply.holder;
        match (self.quorum.clone(), reply.verdict) {
            (Quorum::Electing { nonce, next, .. }, Verdict::Granted) if nonce == reply.nonce && self.link == LinkState::Handshake => {
                // Our Hello went out with the old generations: diverging now would confuse the
                // handshake. Keep the grant for the case the connection dies without a Hello.
                self.pending_grant = Some(next);
            }
            (Quorum::Electing { nonce, next, .. }, Verdict::Granted)
                if nonce == reply.nonce && self.peer_leaving && self.peer_reachable() =>
            {
                // The departing peer still applies what this leg writes: the new generation
                // starts once it has gone (writing under it now would fork the lineage should
                // this leg fail before then, the peer holding everything under the old one).
                let first = self.pending_grant.replace(next).is_none();
                if first {
                    self.why = "the peer is stopping (planned): granted; serving alone once it has gone".into();
                    self.confirm_departure(out);
                }
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
            (Quorum::Solo | Quorum::Won { .. }, Verdict::Denied) if reply.nonce == 0 && !self.peer_reachable() => {
                // The witness says another lineage holds the authority (the peer won it while
                // this leg served without the witness, or an operator reset it): stop, never
                // risk two writers; writes held while settling fail.
                self.quorum = Quorum::Fenced;
                self.disk = DiskState::Outdated;
                self.forced = false;
                self.why = format!("fenced: the witness no longer grants this site (holder: site {})", reply.holder);
                tracing::error!("{}", self.why);
                self.release_held(Err(BdevError::Fenced), out);
            }
            _ => {}
        }
    }

    /// The witness granted this leg the right to serve alone under generation `next`.
    pub(super) fn take_grant(&mut self, next: u64, out: &mut Vec<Output>) {
        let g = &mut self.meta.generations;
        if next != 0 && g.bitmap == 0 {
            g.history = 0;
            g.bitmap = g.current;
            g.current = next;
            out.push(Output::Persist);
        }
        self.become_orderer(out);
        if self.peer_leaving {
            // The peer stopped serving before it left: no lease of its to wait out.
            self.quorum = Quorum::Solo;
            self.why = format!("serving alone: the peer stopped (planned); granted generation {:x}", self.meta.generations.current);
            tracing::info!("{}", self.why);
            return self.release_held(Ok(()), out);
        }
        self.quorum = Quorum::Won { at_ms: self.settle_at() };
        self.why = "granted by the witness: settling".into();
    }

    /// Becomes the leg that orders writes (a secondary promoted by an election).
    pub(super) fn become_orderer(&mut self, out: &mut Vec<Output>) {
        if self.role != Role::Preferred {
            self.switch_role(Role::Preferred, out);
        }
    }

    pub(super) fn metro_link_down(&mut self, was: LinkState, out: &mut Vec<Output>) {
        self.unconfirmed.clear();
        self.forwarded.clear();
        self.fail_forwarded(BdevError::Transition, out);
        if self.leaving {
            // Departed (or departing): this leg serves nothing and asks for nothing.
            self.quorum = Quorum::Fenced;
            self.why = "stopped: the peer took over (planned departure)".into();
            self.left.get_or_insert(false);
            return self.release_held(Err(BdevError::Fenced), out);
        }
        if was == LinkState::Connected
            && self.disk == DiskState::UpToDate
            && !self.peer_leaving
            && matches!(self.quorum, Quorum::Solo | Quorum::Won { .. } | Quorum::Fenced)
        {
            // In sync and connected, the peer served on this leg's leases even if the tick that
            // records it (metro_tick) has not come yet: serving on alone under the old grant
            // would write under a generation the witness never heard of while it grants the
            // peer, which holds the authority's generation too.
            self.quorum = Quorum::Peer;
            self.forced = false;
        }
        match self.quorum {
            // Already serving alone (the peer was resyncing) or already out: nothing to decide.
            Quorum::Solo | Quorum::Won { .. } => self.release_held(Ok(()), out),
            Quorum::Electing { .. } => {
                // The connection that held a grant back died without a Hello: take it now.
                if let Some(next) = self.pending_grant.take() {
                    self.take_grant(next, out);
                }
            }
            // Fenced, this leg cannot complete alone the writes it replicated: the peer's
            // answers are lost with the link, so they fail (hosts retry them where the data is
            // served; their regions stay dirty here).
            Quorum::Fenced => self.release_held(Err(BdevError::Fenced), out),
            Quorum::Starting | Quorum::Peer => {
                if matches!(was, LinkState::Syncing { source: false }) && self.disk == DiskState::UpToDate {
                    self.disk = DiskState::Inconsistent;
                }
                self.elect(out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::*;

    /// A leg is armed only while its peer is durably deferred.
    fn assert_safe(a: &MirrorCore, b: &MirrorCore) {
        assert!(!a.armed || b.meta.deferred, "A armed, B not deferred");
        assert!(!b.armed || a.meta.deferred, "B armed, A not deferred");
    }

    /// Ticks both connected legs from `from` to `until` in 50 ms steps, pumping what they send;
    /// the witness answers every tick while `witness`.
    fn run(a: &mut MirrorCore, b: &mut MirrorCore, from: u64, until: u64, witness: bool) {
        for t in (from..until).step_by(50) {
            let (mut oa, mut ob) = (Vec::new(), Vec::new());
            a.handle(Input::Tick { now_ms: t }, &mut oa);
            b.handle(Input::Tick { now_ms: t }, &mut ob);
            if witness {
                witness_answers(a);
                witness_answers(b);
            }
            pump(a, b, oa, ob);
            assert_safe(a, b);
        }
    }

    /// Ticks a leg whose link is down (its frames go nowhere; its device answers).
    fn run_alone(c: &mut MirrorCore, from: u64, until: u64) {
        for t in (from..until).step_by(50) {
            let mut out = Vec::new();
            c.handle(Input::Tick { now_ms: t }, &mut out);
            while let Some(o) = out.pop() {
                if let Output::Local { id, .. } = o {
                    c.handle(Input::LocalDone { id, result: Ok(BdevOutput::Done) }, &mut out);
                }
            }
        }
    }

    fn cut(a: &mut MirrorCore, b: &mut MirrorCore) {
        a.handle(Input::LinkDown, &mut Vec::new());
        b.handle(Input::LinkDown, &mut Vec::new());
    }

    #[test]
    fn the_configured_preferred_survives_when_the_witness_is_lost_and_then_the_link() {
        let (mut a, mut b) = connected();
        run(&mut a, &mut b, 30, 500, true);
        run(&mut a, &mut b, 500, 2500, false);
        assert!(a.armed && b.meta.deferred, "{:?} {:?}", a.status().metro, b.status().metro);
        cut(&mut a, &mut b);
        run_alone(&mut a, 2500, 4000);
        run_alone(&mut b, 2500, 4000);
        assert_eq!((a.access(), b.access()), (Access::Sole, Access::Fenced));
    }

    #[test]
    fn after_a_switchover_the_site_that_orders_writes_is_the_pre_elected_survivor() {
        let (mut a, mut b) = connected();
        witness_answers(&mut a);
        witness_answers(&mut b);
        let mut oa = Vec::new();
        a.switchover(&mut oa).unwrap();
        pump(&mut a, &mut b, oa, Vec::new());
        assert_eq!((a.status().role, b.status().role), (Role::Secondary, Role::Preferred));
        run(&mut a, &mut b, 30, 500, true);
        assert!(!a.meta.deferred && !b.meta.deferred && !a.armed && !b.armed, "nothing to pre-elect while the witness answers");
        run(&mut a, &mut b, 500, 2500, false);
        assert!(b.armed && a.meta.deferred, "the ordering site B survives: {:?} {:?}", a.status().metro, b.status().metro);
        assert!(!a.armed && !b.meta.deferred, "the configured preferred A defers");
        assert!(b.status().metro.unwrap().pre_elected.contains("this site survives"));
        assert!(a.status().metro.unwrap().pre_elected.contains("the peer survives"));
        cut(&mut a, &mut b);
        run_alone(&mut a, 2500, 4000);
        run_alone(&mut b, 2500, 4000);
        assert_eq!(b.access(), Access::Sole, "{:?}", b.status());
        assert_eq!(a.access(), Access::Fenced, "{:?}", a.status());
        assert!(b.status().metro.unwrap().why.contains("pre-elected survivor"));
    }

    #[test]
    fn nobody_arms_while_a_switchover_moves_ordering_and_the_new_orderer_arms_after_it() {
        let (mut a, mut b) = connected();
        run(&mut a, &mut b, 30, 500, true);
        // A write of A's in flight (its halves held back) keeps the switchover draining.
        let mut held = Vec::new();
        a.handle(write(1), &mut held);
        let mut oa = Vec::new();
        a.switchover(&mut oa).unwrap();
        pump(&mut a, &mut b, oa, Vec::new());
        assert!(matches!(a.handover, Some(switchover::Handover::Draining { .. })));
        // Both lose the witness meanwhile: B (still not ordering) defers, A does not arm on it.
        run(&mut a, &mut b, 500, 2500, false);
        assert!(b.meta.deferred && b.defers_sent > 0, "{:?}", b.status().metro);
        assert!(!a.armed && !b.armed, "no survivor while ordering moves");
        // The drain ends: B takes ordering (its deferral is void), then A defers and B arms.
        let done = pump(&mut a, &mut b, held, Vec::new());
        assert_eq!(done[0], [(1, true)]);
        assert_eq!((a.status().role, b.status().role), (Role::Secondary, Role::Preferred));
        assert!(!b.meta.deferred && !a.armed, "{:?}", a.status().metro);
        run(&mut a, &mut b, 2500, 3500, false);
        assert!(b.armed && a.meta.deferred && !a.armed && !b.meta.deferred);
        cut(&mut a, &mut b);
        run_alone(&mut a, 3500, 5000);
        run_alone(&mut b, 3500, 5000);
        assert_eq!((a.access(), b.access()), (Access::Fenced, Access::Sole));
    }

    /// The first request to the witness `c` sends at a tick from `from`.
    fn ask(c: &mut MirrorCore, from: u64) -> crate::mirror::witness::Request {
        for t in (from..from + 1000).step_by(50) {
            let mut out = Vec::new();
            c.handle(Input::Tick { now_ms: t }, &mut out);
            if let Some(r) = out.into_iter().find_map(|o| if let Output::Witness(r) = o { Some(r) } else { None }) {
                return r;
            }
        }
        panic!("no request to the witness: {:?}", c.status());
    }

    #[test]
    fn an_election_the_peers_return_cut_short_is_asked_again_for_the_same_generation() {
        use crate::mirror::witness::{Ask, Verdict, WitnessState};
        let (mut a, mut b) = connected();
        let mut w = WitnessState::default();
        cut(&mut a, &mut b);
        let first = ask(&mut a, 30);
        assert_eq!(first.ask, Ask::Acquire);
        // The witness grants it, but its answer comes after the peer is back: A never takes it.
        assert_eq!(w.handle(&first, 30).verdict, Verdict::Granted);
        let (mut oa, mut ob) = (Vec::new(), Vec::new());
        a.handle(Input::LinkUp, &mut oa);
        b.handle(Input::LinkUp, &mut ob);
        pump(&mut a, &mut b, oa, ob);
        assert_eq!(a.meta.generations.bitmap, 0, "the grant was not taken");
        // Lost again before the sites' in-sync reports healed the witness: the same successor is
        // asked for, and granted (another would be denied: nobody would serve).
        cut(&mut a, &mut b);
        let again = ask(&mut a, 2000);
        assert_ne!(again.nonce, first.nonce);
        assert_eq!(again.next, first.next, "the same successor generation");
        assert_eq!(w.handle(&again, 2000).verdict, Verdict::Granted);
    }

    #[test]
    fn a_leg_serving_alone_whose_peer_just_came_in_sync_asks_the_witness_when_the_link_goes_again() {
        let (mut a, mut b) = connected();
        // The resync into B ended; the tick that records A serving with its peer has not come.
        a.quorum = Quorum::Solo;
        let g = a.meta.generations;
        cut(&mut a, &mut b);
        assert!(matches!(a.quorum, Quorum::Electing { .. }), "{:?}", a.status().metro);
        let mut out = Vec::new();
        a.handle(write(7), &mut out);
        assert_eq!(a.meta.generations, g, "no write under a generation the witness never granted");
        assert!(!a.serving());
    }

    #[test]
    fn a_release_that_does_not_echo_every_deferral_sent_is_stale() {
        let (mut a, mut b) = connected();
        run(&mut a, &mut b, 30, 2500, false);
        assert!(a.armed && b.meta.deferred);
        let sent = b.defers_sent;
        let release = |n: u64| {
            let mut f = Frame::new(Kind::Witness, 0);
            f.arg = wit::RELEASE;
            f.offset = n;
            Input::Frame(f)
        };
        // One sent before the last deferral arrived (the peer may have armed on that one).
        b.handle(release(sent - 1), &mut Vec::new());
        assert!(b.meta.deferred, "a stale release changes nothing");
        b.handle(release(sent), &mut Vec::new());
        assert!(!b.meta.deferred, "a release of every deferral ends it");
        // An armed leg that stops ordering (its device failed, say) disarms.
        let mut out = Vec::new();
        a.switch_role(Role::Secondary, &mut out);
        assert!(!a.armed);
    }

    #[test]
    fn a_forced_promotion_is_refused_unless_peer_and_witness_are_lost_and_the_copy_is_whole() {
        let mut meta = Meta::new(1 << 20, 16);
        meta.generations.current = 0x77;
        let (mut core, _) = MirrorCore::new(Role::Secondary, 2, 1 << 20, meta, 1);
        let mut out = Vec::new();
        let no_metro = core.force_promote(&mut out).unwrap_err();
        assert!(no_metro.contains("metro"), "{no_metro}");
        core.set_metro(Metro::new("m", false, 1000), 1);
        core.handle(Input::Tick { now_ms: 10 }, &mut out);
        let e = core.force_promote(&mut out).unwrap_err();
        assert!(e.contains("just started"), "{e}");
        core.quorum = Quorum::Fenced;
        core.link = LinkState::Refused("SplitBrain".into());
        let e = core.force_promote(&mut out).unwrap_err();
        assert!(e.contains("the peer answers"), "a refused peer still answers: {e}");
        core.link = LinkState::Down;
        core.witness_seen_ms = Some(10);
        let e = core.force_promote(&mut out).unwrap_err();
        assert!(e.contains("the witness answers"), "{e}");
        core.witness_seen_ms = None;
        core.disk = DiskState::Inconsistent;
        let e = core.force_promote(&mut out).unwrap_err();
        assert!(e.contains("Inconsistent"), "{e}");
        core.disk = DiskState::Outdated;
        core.meta.deferred = true;
        out.clear();
        let ok = core.force_promote(&mut out).unwrap();
        assert!(ok.contains("serving alone under generation"), "{ok}");
        let g = core.meta.generations;
        assert_ne!(g.current, 0x77, "a new generation");
        assert_eq!(g.bitmap, 0x77, "diverged from the one the peer holds");
        assert!(!core.meta.deferred, "the deferral is overridden");
        assert!(out.contains(&Output::Persist), "the new generation is made durable");
        assert_eq!(core.role, Role::Preferred, "the forced leg orders writes");
        let again = core.force_promote(&mut out).unwrap_err();
        assert!(again.contains("already serves alone"), "{again}");
        // Still settling when the witness returns and says the peer holds the authority: out.
        assert!(matches!(core.quorum, Quorum::Won { .. }));
        let denied = crate::mirror::witness::Reply {
            verdict: crate::mirror::witness::Verdict::Denied,
            nonce: 0,
            authority: 0x99,
            holder: 1,
            resource: "m".into(),
        };
        core.handle(Input::Witness(denied), &mut out);
        assert_eq!(core.quorum, Quorum::Fenced, "a denial while settling fences the forced leg");
        assert!(!core.serving());

        // A leg that restarts in the middle of a resync into it is no whole copy: it says so,
        // and cannot be forced.
        let mut meta = Meta::new(1 << 20, 16);
        meta.generations.current = 0x77;
        meta.inconsistent = true;
        let (mut torn, _) = MirrorCore::new(Role::Preferred, 1, 1 << 20, meta, 1);
        torn.set_metro(Metro::new("m", false, 1000), 1);
        assert_eq!(torn.disk, DiskState::Inconsistent);
        torn.quorum = Quorum::Fenced;
        let e = torn.force_promote(&mut out).unwrap_err();
        assert!(e.contains("Inconsistent"), "{e}");
    }
}
