//! Planned switchover and planned departure (metro mode), DRBD's and ActiveCluster's planned
//! maintenance: the operator moves write ordering and the hosts' Optimized paths to the other
//! site, then stops this one without a failover stall.
//!
//! Switchover, run at the ordering leg A, its peer B connected and UpToDate:
//! 1. A asks B (`ASK`); B answers `READY` or `REFUSE` (with why) from its own state. Nothing
//!    changes before the answer, so a refusal leaves everything as it was.
//! 2. A drains: host writes arriving here are parked, writes B forwards are held unexecuted,
//!    until every operation A ordered has ended (its own writes acknowledged by B, B's forwarded
//!    ones executed here and answered). Nothing is failed: hosts only wait.
//! 3. A records durably that B orders (and that the roles are the operator's), sends
//!    `HANDOVER`, and forwards its parked writes to B; they travel behind the `HANDOVER`.
//! 4. B takes ordering: the writes it had forwarded that A held (every one still waiting for an
//!    answer: frames arrive in order, and A answered everything it executed before the
//!    `HANDOVER`) are started here as B's own; A's late refusals of them are ignored. B answers
//!    `TAKEN`.
//!
//! If the link goes in the middle, A's parked writes are answered as after any link loss (hosts
//! retry on a serving path) and the witness decides who serves: both legs hold the same data
//! lineage, so this is an ordinary election, whichever leg thinks it orders.
//!
//! Departure, at a clean stop of a leg that does not order writes (after a switchover; a clean
//! stop of the ordering leg has the driver switch over first, `driver/planned.rs`): the leg
//! stops serving (published before anything is sent), then sends `LEAVE`. Its lease is void from
//! then on, so the peer takes the witness's authority for a new generation *while still
//! connected* (writes keep replicating to the departing leg meanwhile, so hosts see no pause)
//! and answers `LEAVE_OK`; the departing leg closes the link, and the peer starts the granted
//! generation and serves alone at once, without settling. (It does not write under the new
//! generation while the departing leg still applies its writes: should it fail then, the
//! departing leg holds every acknowledged write under the old one, and no lineage forks.) The
//! departed leg's data descends from the generation the peer left: if it returns it is resynced
//! before it serves, and the witness denies it while the peer is away.

use super::*;

/// [`Kind::Switchover`] `arg` values.
mod sw {
    /// Ordering leg to peer: can you take over ordering?
    pub const ASK: u32 = 0;
    pub const READY: u32 = 1;
    /// Either way: no (payload: why).
    pub const REFUSE: u32 = 2;
    /// Ordering leg to peer: every write I ordered is done at both legs; you order from now.
    pub const HANDOVER: u32 = 3;
    pub const TAKEN: u32 = 4;
    /// A leg that does not order writes: I stopped serving and am going away.
    pub const LEAVE: u32 = 5;
    /// The peer holds the witness's authority and serves alone: close the link.
    pub const LEAVE_OK: u32 = 6;
}

fn frame(arg: u32) -> Frame {
    let mut f = Frame::new(Kind::Switchover, 0);
    f.arg = arg;
    f
}

/// A switchover never waits longer than this for the peer's answer to `ASK`.
const ASK_TIMEOUT_MS: u64 = 5_000;

/// What a draining switchover holds back: host writes that arrived here, and the peer's
/// forwarded writes (frames that came on connection `epoch`).
#[derive(Debug, Default)]
pub(super) struct Parked {
    hosts: Vec<(u64, BdevOp)>,
    forwards: Vec<Frame>,
    epoch: u64,
}

/// Where a switchover at the ordering leg stands.
#[derive(Debug)]
pub(super) enum Handover {
    /// Asked the peer; serving as before.
    Asking { since_ms: u64 },
    /// Host writes parked here, the peer's forwarded writes held, until nothing is in flight.
    Draining { since_ms: u64, parked: Parked },
    /// `HANDOVER` sent; waiting for `TAKEN`.
    Handed,
}

impl MirrorCore {
    /// The operator moves write ordering (and the hosts' Optimized paths) to the peer (`nvmetro
    /// switchover NAME`). Refused, changing nothing, unless this metro leg orders writes and is
    /// in sync with its connected, UpToDate peer. The outcome comes later
    /// ([`MirrorCore::take_switchover_outcome`]): the peer may still refuse.
    pub fn switchover(&mut self, out: &mut Vec<Output>) -> Result<(), String> {
        if self.metro.is_none() {
            return Err("a switchover is for metro mirrors (with a witness)".into());
        }
        if self.handover.is_some() {
            return Err("a switchover is already under way".into());
        }
        if self.role != Role::Preferred {
            return Err("this site does not order writes: the peer does (run the switchover there to move it back)".into());
        }
        self.can_switch()?;
        if self.armed {
            return Err("the witness was lost and the sites pre-elected this one to survive a link loss: restore the witness first".into());
        }
        self.handover = Some(Handover::Asking { since_ms: self.last_tick_ms });
        self.switchover_outcome = None;
        tracing::info!("planned switchover: asking the peer to take over ordering");
        out.push(Output::Send(frame(sw::ASK)));
        Ok(())
    }

    /// How the last switchover ended, once it has (taken: reported once).
    pub fn take_switchover_outcome(&mut self) -> Option<Result<String, String>> {
        self.switchover_outcome.take()
    }

    /// Why a role change by the operator cannot happen now, on this leg's side.
    fn can_switch(&self) -> Result<(), String> {
        if self.link != LinkState::Connected {
            return Err(format!("the peer link is {:?}: a switchover needs the peer connected and in sync", self.link));
        }
        if self.disk != DiskState::UpToDate || self.failure.is_some() {
            return Err(format!("this copy is {}", self.disk.name()));
        }
        match self.peer {
            Some(p) if p.disk == DiskState::UpToDate && self.peer_failure.is_none() => {}
            p => {
                return Err(format!(
                    "the peer is {}: a switchover needs it UpToDate",
                    p.map_or("unknown", |p| if self.peer_failure.is_some() { "Failed" } else { p.disk.name() })
                ))
            }
        }
        if !self.peer_can(caps::SWITCHOVER) {
            return Err("the peer runs an older nvmetro without planned switchover (it would reset the link): upgrade it first".into());
        }
        if self.quorum != Quorum::Peer || self.failback_hold || self.leaving || self.peer_leaving {
            return Err(format!("this leg is not simply serving with its peer ({})", self.why));
        }
        if !self.serving() {
            return Err("this leg does not serve now".into());
        }
        if !self.witness_reachable() {
            return Err("the witness does not answer: it must be able to decide who serves if a site is lost during the switchover".into());
        }
        if self.meta.deferred {
            return Err("this site deferred to the peer while the witness was lost".into());
        }
        Ok(())
    }

    pub(super) fn on_switchover_frame(&mut self, f: Frame, out: &mut Vec<Output>) {
        match f.arg {
            sw::ASK => {
                let answer = match self.role {
                    Role::Preferred => Err("this site orders writes itself".to_string()),
                    Role::Secondary => self.can_switch(),
                };
                let mut r = frame(sw::READY);
                match answer {
                    Ok(()) => r.arg = sw::READY,
                    Err(why) => {
                        r.arg = sw::REFUSE;
                        r.payload = why.into_bytes().into();
                    }
                }
                out.push(Output::Send(r));
            }
            sw::READY if matches!(self.handover, Some(Handover::Asking { .. })) => {
                tracing::info!("planned switchover: the peer is ready; draining the writes in flight");
                let parked = Parked { epoch: self.link_epoch, ..Parked::default() };
                self.handover = Some(Handover::Draining { since_ms: self.last_tick_ms, parked });
            }
            sw::REFUSE if matches!(self.handover, Some(Handover::Asking { .. })) => {
                self.handover = None;
                let why = String::from_utf8_lossy(&f.payload).into_owned();
                tracing::warn!("planned switchover refused by the peer: {why}");
                self.switchover_outcome = Some(Err(format!("the peer refused: {why}; nothing changed")));
            }
            sw::HANDOVER if self.role == Role::Secondary && self.can_take_over() => self.take_ordering(out),
            sw::HANDOVER => {
                // (Its device failed meanwhile, say: the peer keeps ordering, or takes it back.)
                let mut r = frame(sw::REFUSE);
                r.payload = format!("the peer could not take over after all ({})", self.why).into_bytes().into();
                out.push(Output::Send(r));
            }
            sw::REFUSE if matches!(self.handover, Some(Handover::Handed)) => {
                self.handover = None;
                let why = String::from_utf8_lossy(&f.payload).into_owned();
                if self.role == Role::Secondary && self.disk == DiskState::UpToDate && self.peer_failure.is_none() {
                    // Nobody orders: this leg takes it back (the peer refused, so it does not).
                    self.switch_role(Role::Preferred, out);
                }
                tracing::warn!("planned switchover failed at the last step: {why}");
                self.switchover_outcome = Some(Err(format!("{why}; this site orders writes again")));
            }
            sw::TAKEN if matches!(self.handover, Some(Handover::Handed)) => {
                self.handover = None;
                tracing::info!("planned switchover done: the peer orders writes");
                self.switchover_outcome = Some(Ok(format!(
                    "site {} orders writes now; hosts' paths to it are Optimized, to this site Non-Optimized; this site can be stopped",
                    self.peer.map_or(0, |p| p.site)
                )));
            }
            sw::REFUSE if self.leaving => {
                tracing::warn!("planned departure: the peer cannot take over now; closing the link (it fails over)");
                self.left = Some(false);
            }
            sw::LEAVE => self.peer_leaves(out),
            sw::LEAVE_OK if self.leaving => {
                tracing::info!("planned departure: the peer serves alone; closing the link");
                self.left = Some(true);
            }
            _ => {}
        }
    }

    /// At the end of every input while a switchover runs: moves it on, or ends it when this
    /// leg's state no longer allows it.
    pub(super) fn advance_handover(&mut self, out: &mut Vec<Output>) {
        let broken = match &self.handover {
            Some(Handover::Handed) | None => None,
            _ if self.role != Role::Preferred
                || self.disk != DiskState::UpToDate
                || self.link != LinkState::Connected
                || self.peer_failure.is_some()
                || self.quorum != Quorum::Peer =>
            {
                Some(format!("this leg's state changed meanwhile ({}); the sites' roles are as they were", self.why))
            }
            Some(Handover::Asking { since_ms }) if self.last_tick_ms.saturating_sub(*since_ms) > ASK_TIMEOUT_MS => {
                Some("the peer did not answer; nothing changed".into())
            }
            Some(Handover::Draining { since_ms, .. }) if self.last_tick_ms.saturating_sub(*since_ms) > ASK_TIMEOUT_MS => {
                Some("the writes in flight did not finish in time; the sites' roles are as they were".into())
            }
            _ => None,
        };
        if let Some(why) = broken {
            let parked = self.abort_handover(&why);
            return self.resubmit(parked, out);
        }
        // (Writes this leg executed for the peer need not be applied there yet: answered before
        // the HANDOVER, they are ahead of every write the peer orders after it.)
        if !matches!(self.handover, Some(Handover::Draining { .. })) || !self.ops.is_empty() {
            return;
        }
        // Drained: every write this leg ordered is done at both legs.
        let Some(Handover::Draining { mut parked, .. }) = self.handover.replace(Handover::Handed) else { unreachable!("checked") };
        // The peer starts these itself once it orders (they are the ones it still waits for).
        parked.forwards.clear();
        self.switch_role(Role::Secondary, out);
        // The operator's roles, unless the switchover restored the configured ones.
        self.meta.switched = self.configured_preferred;
        // Durable before the peer may order: a restart here never orders again on its own.
        out.push(Output::Persist);
        out.push(Output::Send(frame(sw::HANDOVER)));
        self.why = "serving with the peer, which orders writes (planned switchover)".into();
        // Behind the HANDOVER on the link: the peer orders them.
        self.resubmit(parked, out);
    }

    /// Whether this leg can order writes from now on (checked when the `HANDOVER` arrives).
    fn can_take_over(&self) -> bool {
        self.peer_reachable()
            && self.disk == DiskState::UpToDate
            && self.failure.is_none()
            && self.peer_failure.is_none()
            && !self.leaving
            && self.quorum == Quorum::Peer
    }

    /// The peer handed ordering over: the writes this leg forwarded that it held start here.
    fn take_ordering(&mut self, out: &mut Vec<Output>) {
        tracing::info!("planned switchover: this site orders writes now");
        self.role = Role::Preferred;
        self.meta.ordering = (!self.configured_preferred).then_some(true);
        self.meta.switched = !self.configured_preferred;
        // A deferral made while the peer was handing over is void: the peer never arms while a
        // switchover runs (nor starts one while armed) and, Secondary from now on, never will.
        self.meta.deferred = false;
        out.push(Output::Persist);
        let mut held: Vec<u64> = self.ops.iter().filter(|(_, o)| o.stage == Stage::Forwarded).map(|(id, _)| *id).collect();
        held.sort_unstable();
        for id in held {
            if let Some(o) = self.ops.get_mut(&id) {
                o.stage = Stage::Queued;
            }
            self.admit(id, out);
        }
        self.why = "serving with the peer; this site orders writes (planned switchover)".into();
        out.push(Output::Send(frame(sw::TAKEN)));
    }

    /// Ends a switchover that cannot finish: returns what it had held back (the caller
    /// resubmits it once the state it meets is settled).
    pub(super) fn abort_handover(&mut self, why: &str) -> Parked {
        let parked = match self.handover.take() {
            None => return Parked::default(),
            Some(Handover::Draining { parked, .. }) => parked,
            Some(_) => Parked::default(),
        };
        tracing::warn!("planned switchover ended: {why}");
        self.switchover_outcome = Some(Err(format!("{why} (the switchover did not complete)")));
        parked
    }

    /// Host writes held back go their way now; the peer's forwarded writes too, if the
    /// connection they came on is still up (otherwise the peer has failed them itself).
    pub(super) fn resubmit(&mut self, parked: Parked, out: &mut Vec<Output>) {
        if parked.epoch == self.link_epoch && self.peer_reachable() {
            for f in parked.forwards {
                self.on_frame(f, out);
            }
        }
        for (tag, op) in parked.hosts {
            self.on_host(tag, op, out);
        }
    }

    /// A host write arriving while the switchover drains: parked (true) until ordering moved.
    pub(super) fn park(&mut self, tag: u64, op: BdevOp) -> Result<(), BdevOp> {
        match &mut self.handover {
            Some(Handover::Draining { parked, .. }) => {
                parked.hosts.push((tag, op));
                Ok(())
            }
            _ => Err(op),
        }
    }

    /// A write the peer forwarded while the switchover drains: held unexecuted (the peer starts
    /// it itself once it orders; if the switchover ends first, it is executed then).
    pub(super) fn hold_forward(&mut self, f: Frame) -> Result<(), Frame> {
        match &mut self.handover {
            Some(Handover::Draining { parked, .. }) => {
                parked.forwards.push(f);
                Ok(())
            }
            _ => Err(f),
        }
    }

    /// A clean stop (the driver, before it closes the link): a leg that serves with the peer
    /// that orders writes stops serving and, with [`MirrorCore::send_leave`], lets the peer take
    /// over without a failover. Returns whether it will (otherwise it just stops, and the peer
    /// fails over as after any loss).
    pub fn leave(&mut self) -> bool {
        if self.metro.is_none() || self.role != Role::Secondary || self.can_switch().is_err() {
            return false;
        }
        self.leaving = true;
        self.why = "stopping: the peer takes over (planned departure)".into();
        tracing::info!("planned departure: stopped serving; the peer takes over");
        true
    }

    /// After [`MirrorCore::leave`], once the driver has published that this leg serves nothing.
    pub fn send_leave(&mut self, out: &mut Vec<Output>) {
        if self.leaving && self.peer_reachable() {
            out.push(Output::Send(frame(sw::LEAVE)));
        }
    }

    /// The departure is over: the link may close ([`MirrorCore::peer_took_over`] says how).
    pub fn left(&self) -> bool {
        self.left.is_some()
    }

    /// The peer serves alone after this leg's departure.
    pub fn peer_took_over(&self) -> bool {
        self.left == Some(true)
    }

    /// The peer is going away and serves nothing any more: take the witness's authority for a
    /// new generation (still replicating to the peer while it is connected), then serve alone.
    fn peer_leaves(&mut self, out: &mut Vec<Output>) {
        if self.role != Role::Preferred || self.can_switch().is_err() {
            let mut r = frame(sw::REFUSE);
            r.payload = b"the peer cannot take over now".to_vec().into();
            tracing::warn!("the peer is stopping, but this leg cannot take over now ({}): a failover follows", self.why);
            return out.push(Output::Send(r));
        }
        self.peer_leaving = true;
        let next = self.election_next();
        let nonce = self.fresh_generation();
        // Electing while connected: still serving with the peer (its lease holds) until granted.
        self.quorum = Quorum::Electing { since_ms: self.last_tick_ms, next, nonce, last_ask_ms: 0 };
        self.pending_grant = None;
        self.why = "the peer is stopping (planned): taking the witness's authority".into();
        tracing::info!("{}", self.why);
    }

    /// Granted because the peer leaves: tell it to go.
    pub(super) fn confirm_departure(&mut self, out: &mut Vec<Output>) {
        if self.peer_leaving && self.peer_reachable() {
            out.push(Output::Send(frame(sw::LEAVE_OK)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testkit::*;
    use super::super::*;

    #[test]
    fn a_switchover_moves_ordering_without_failing_a_write_and_is_refused_unless_in_sync() {
        let (mut a, mut b) = connected();
        let mut oa = Vec::new();
        let e = a.switchover(&mut oa).unwrap_err();
        assert!(e.contains("witness"), "{e}");
        witness_answers(&mut a);
        let e = b.switchover(&mut oa).unwrap_err();
        assert!(e.contains("does not order writes"), "{e}");
        // The peer does not reach the witness: it refuses, nothing changes.
        a.switchover(&mut oa).unwrap();
        let done = pump(&mut a, &mut b, oa, Vec::new());
        assert!(done.iter().all(Vec::is_empty));
        let e = a.take_switchover_outcome().unwrap().unwrap_err();
        assert!(e.contains("the peer refused") && e.contains("witness"), "{e}");
        assert_eq!((a.status().role, b.status().role), (Role::Preferred, Role::Secondary));

        // Writes in flight at both sites while the switchover runs: all complete, none fails.
        witness_answers(&mut b);
        let (mut oa, mut ob) = (Vec::new(), Vec::new());
        a.handle(write(1), &mut oa);
        b.handle(write(2), &mut ob);
        a.switchover(&mut oa).unwrap();
        a.handle(write(3), &mut oa);
        b.handle(write(4), &mut ob);
        let done = pump(&mut a, &mut b, oa, ob);
        let ok: Vec<u64> = done.iter().flatten().filter(|(_, ok)| *ok).map(|(t, _)| *t).collect();
        assert_eq!(done.iter().flatten().count(), 4, "{done:?}");
        assert_eq!(ok.len(), 4, "no write failed: {done:?}");
        assert!(a.take_switchover_outcome().unwrap().unwrap().contains("site 2 orders writes"));
        assert_eq!((a.status().role, b.status().role), (Role::Secondary, Role::Preferred));
        assert_eq!((a.access(), b.access()), (Access::Standby, Access::Leading));
        assert!(a.meta().switched && b.meta().switched && b.meta().ordering == Some(true));
        // Writes after it: B orders them, A forwards.
        let (mut oa, mut ob) = (Vec::new(), Vec::new());
        a.handle(write(5), &mut oa);
        b.handle(write(6), &mut ob);
        let done = pump(&mut a, &mut b, oa, ob);
        assert_eq!(done.iter().flatten().filter(|(_, ok)| *ok).count(), 2);
        // A reconnection in sync keeps the operator's roles.
        let (mut oa, mut ob) = (Vec::new(), Vec::new());
        a.handle(Input::LinkDown, &mut oa);
        b.handle(Input::LinkDown, &mut ob);
        a.handle(Input::LinkUp, &mut oa);
        b.handle(Input::LinkUp, &mut ob);
        pump(&mut a, &mut b, oa, ob);
        assert_eq!((a.status().role, b.status().role), (Role::Secondary, Role::Preferred));
        // Refused while the peer is not connected.
        let (mut oa, mut ob) = (Vec::new(), Vec::new());
        a.handle(Input::LinkDown, &mut oa);
        b.handle(Input::LinkDown, &mut ob);
        witness_answers(&mut b);
        let e = b.switchover(&mut ob).unwrap_err();
        assert!(e.contains("peer link is Down"), "{e}");
    }

    #[test]
    fn a_switchover_that_ends_while_draining_answers_everything_it_held() {
        let (mut a, mut b) = connected();
        witness_answers(&mut a);
        witness_answers(&mut b);
        // A write in flight at A (neither its local half nor the peer's answer back yet).
        let mut oa = Vec::new();
        a.handle(write(1), &mut oa);
        let mut held_a = std::mem::take(&mut oa);
        a.switchover(&mut oa).unwrap();
        let mut ob = Vec::new();
        for f in frames(&mut oa) {
            b.handle(Input::Frame(f), &mut ob);
        }
        for f in frames(&mut ob) {
            a.handle(Input::Frame(f), &mut oa); // READY: A drains
        }
        a.handle(write(3), &mut oa);
        assert!(oa.is_empty(), "a host write is parked while draining: {oa:?}");
        b.handle(write(2), &mut ob);
        for f in frames(&mut ob) {
            a.handle(Input::Frame(f), &mut oa);
        }
        assert!(oa.is_empty(), "the peer's forwarded write is held while draining: {oa:?}");
        // The peer departs meanwhile: the switchover ends, with the link up.
        assert!(b.leave());
        b.send_leave(&mut ob);
        for f in frames(&mut ob) {
            a.handle(Input::Frame(f), &mut oa);
        }
        held_a.append(&mut oa);
        let done = pump(&mut a, &mut b, held_a, ob);
        let mut at_a = done[0].clone();
        at_a.sort_unstable();
        assert_eq!(at_a, [(1, true), (3, true)], "A's writes, parked one included, complete");
        assert_eq!(done[1], [(2, true)], "the peer's held forwarded write is executed and answered");
        let e = a.take_switchover_outcome().unwrap().unwrap_err();
        assert!(e.contains("did not complete"), "{e}");
        assert_eq!(a.status().role, Role::Preferred, "A still orders writes");
    }

    #[test]
    fn after_a_switchover_the_new_site_wins_a_partition_at_the_witness() {
        let (mut a, mut b) = connected();
        witness_answers(&mut a);
        witness_answers(&mut b);
        let mut oa = Vec::new();
        a.switchover(&mut oa).unwrap();
        pump(&mut a, &mut b, oa, Vec::new());
        assert_eq!(b.status().role, Role::Preferred);
        // The link is cut; both are alive and reach the witness, which answers at once.
        let mut w = crate::mirror::witness::WitnessState::default();
        let mut cores = [a, b];
        for c in cores.iter_mut() {
            c.handle(Input::LinkDown, &mut Vec::new());
        }
        for t in (30..1000).step_by(10) {
            for c in cores.iter_mut() {
                let mut out = Vec::new();
                c.handle(Input::Tick { now_ms: t }, &mut out);
                for o in out {
                    if let Output::Witness(req) = o {
                        let reply = w.handle(&req, t);
                        c.handle(Input::Witness(reply), &mut Vec::new());
                    }
                }
            }
        }
        let [a, b] = cores;
        assert_eq!(b.access(), Access::Sole, "the site that orders writes since the switchover serves: {:?}", b.status());
        assert_eq!(a.access(), Access::Fenced, "{:?}", a.status());
        assert_eq!(w.resources["m"].holder, 2);
    }

    #[test]
    fn a_departing_leg_fences_first_and_its_peer_takes_the_witness_authority_while_connected() {
        let (mut a, mut b) = connected();
        witness_answers(&mut a);
        witness_answers(&mut b);
        assert!(!a.leave(), "the ordering leg does not depart this way");
        let mut oa = Vec::new();
        a.switchover(&mut oa).unwrap();
        pump(&mut a, &mut b, oa, Vec::new());
        assert!(a.leave());
        assert!(!a.serving() && a.access() == Access::Fenced, "fenced before anything is sent");
        let mut oa = Vec::new();
        a.send_leave(&mut oa);
        pump(&mut a, &mut b, oa, Vec::new());
        assert!(b.serving(), "still serving with the leaving peer while it asks the witness");
        let mut ob = Vec::new();
        b.handle(Input::Tick { now_ms: 500 }, &mut ob);
        let req = ob.iter().find_map(|o| if let Output::Witness(r) = o { Some(r.clone()) } else { None }).expect("asks the witness");
        assert_eq!(req.ask, crate::mirror::witness::Ask::Acquire);
        let mut w = crate::mirror::witness::WitnessState::default();
        let reply = w.handle(&req, 0);
        assert_eq!(reply.verdict, crate::mirror::witness::Verdict::Granted);
        b.handle(Input::Witness(reply), &mut ob);
        assert_eq!(b.meta().generations.bitmap, 0, "no new generation while the departing leg still applies writes");
        pump(&mut a, &mut b, Vec::new(), ob);
        assert!(a.left() && a.peer_took_over(), "the departing leg may close the link");
        let mut ob = Vec::new();
        b.handle(write(9), &mut ob);
        b.handle(Input::LinkDown, &mut ob);
        assert_eq!(b.access(), Access::Sole, "serves alone without settling: the peer's lease is void");
        let done = pump(&mut a, &mut b, Vec::new(), ob);
        assert_eq!(done[1], [(9, true)], "a write in flight completes without the departed leg");
        assert_eq!(w.resources["m"].holder, 2, "the witness's authority is at site 2");
        assert_eq!(w.resources["m"].authority, b.meta().generations.current, "site 2 writes under the granted generation");
        assert_ne!(b.meta().generations.bitmap, 0);
    }
}

#[cfg(test)]
mod compat_tests {
    use super::super::testkit::*;
    use super::super::*;

    /// A and B connected, B's Hello as an older release sends it (no capability byte).
    fn with_older_b() -> (MirrorCore, MirrorCore) {
        let (mut a, mut b) = pair();
        let (mut oa, mut ob) = (Vec::new(), Vec::new());
        a.handle(Input::LinkUp, &mut oa);
        b.handle(Input::LinkUp, &mut ob);
        let mut from_b = frames(&mut ob);
        for f in from_b.iter_mut().filter(|f| f.kind == Kind::Hello) {
            let mut p = f.payload.to_vec();
            p[4] = 0;
            f.payload = p.into();
        }
        ob.extend(from_b.into_iter().map(Output::Send));
        pump(&mut a, &mut b, oa, ob);
        let (mut oa, mut ob) = (Vec::new(), Vec::new());
        for t in [10, 20] {
            a.handle(Input::Tick { now_ms: t }, &mut oa);
            b.handle(Input::Tick { now_ms: t }, &mut ob);
        }
        pump(&mut a, &mut b, oa, ob);
        assert_eq!(a.status().link, LinkState::Connected);
        (a, b)
    }

    #[test]
    fn an_older_peer_gets_no_switchover_frame_and_the_switchover_says_why() {
        let (mut a, mut b) = with_older_b();
        witness_answers(&mut a);
        witness_answers(&mut b);
        let mut oa = Vec::new();
        let e = a.switchover(&mut oa).unwrap_err();
        assert!(e.contains("older nvmetro") && e.contains("upgrade"), "{e}");
        assert!(frames(&mut oa).iter().all(|f| f.kind != Kind::Switchover), "nothing the peer cannot parse");
        assert_eq!(a.status().role, Role::Preferred, "nothing changed");
        assert!(b.peer_can(caps::SWITCHOVER) && !a.peer_can(caps::SWITCHOVER), "each leg goes by its peer's Hello");
        // Nor a LEAVE: a clean stop of a leg whose peer is older just stops (the peer fails over).
        a.role = Role::Secondary;
        assert!(!a.leave(), "no departure frame to an older peer");
    }

    #[test]
    fn an_older_peers_release_counts_only_once_the_witness_answers() {
        let (mut a, _b) = with_older_b();
        // A, Secondary here, deferred to B; B (older) releases without an echo.
        a.role = Role::Secondary;
        a.meta.deferred = true;
        let mut release = Frame::new(Kind::Witness, 0);
        release.arg = wit::RELEASE;
        a.handle(Input::Frame(release.clone()), &mut Vec::new());
        assert!(a.meta.deferred, "the witness does not answer: the deferral stays");
        witness_answers(&mut a);
        a.handle(Input::Frame(release), &mut Vec::new());
        assert!(!a.meta.deferred, "released as an older peer means it");
    }
}
