//! Planned operations through the link thread: the operator's switchover and a clean stop's
//! departure ([`crate::mirror::core::MirrorCore::switchover`],
//! [`crate::mirror::core::MirrorCore::leave`]), requested from any thread and answered once the
//! core has decided.

use super::{LinkThread, MirrorBdev, Shared};
use crate::mirror::core::Role;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long the operator's `switchover` waits for the outcome (the peer's answers and the drain
/// of the writes in flight take a few round trips; the core gives up on a silent peer in 5 s).
const SWITCHOVER_WAIT: Duration = Duration::from_secs(10);
/// How long a clean stop waits for the peer to take over before it just closes the link.
pub const DEPART_WAIT: Duration = Duration::from_secs(3);
/// A clean stop of the leg that orders writes first switches over to the peer, for at most this
/// long (a switchover takes a few round trips; the core ends one whose peer is silent or whose
/// drain stalls within this), then departs as a leg that does not order.
pub const STOP_SWITCHOVER_WAIT: Duration = SWITCHOVER_WAIT;

/// Puts a request for the link thread in `slot` and waits up to `wait` for its answer.
fn ask_link<T>(shared: &Shared, slot: &Mutex<Option<std::sync::mpsc::Sender<T>>>, wait: Duration) -> Result<T, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    {
        let mut slot = slot.lock().map_err(|_| "the mirror's link thread is gone".to_string())?;
        if slot.is_some() {
            return Err("another such request is pending".into());
        }
        *slot = Some(tx);
    }
    let _ = shared.waker.wake();
    rx.recv_timeout(wait).map_err(|_| {
        // Taken back if the link thread has not seen it: then nothing happened.
        if slot.lock().map(|mut s| s.take().is_some()).unwrap_or(false) {
            "the mirror's link thread did not answer: nothing changed".to_string()
        } else {
            format!("the mirror's link thread took the request but did not answer in {} s: see `nvmetro status`", wait.as_secs())
        }
    })
}

impl MirrorBdev {
    /// The operator moves write ordering and the hosts' Optimized paths to the peer
    /// ([`crate::mirror::core::MirrorCore::switchover`]): what happened, or why it was refused
    /// or did not complete.
    pub fn switchover(&self) -> Result<String, String> {
        ask_link(&self.shared, &self.shared.switchover, SWITCHOVER_WAIT)?
    }

    /// A clean stop of a metro leg: one that orders writes first switches over to its peer (at
    /// most [`STOP_SWITCHOVER_WAIT`]); then, as a leg whose peer orders writes, it stops serving
    /// and lets the peer take over without a failover
    /// ([`crate::mirror::core::MirrorCore::leave`]), waiting at most [`DEPART_WAIT`] for it.
    /// Returns what happened (for the log).
    pub fn depart(&self) -> String {
        let wait = STOP_SWITCHOVER_WAIT + DEPART_WAIT + Duration::from_secs(1);
        ask_link(&self.shared, &self.shared.depart, wait).unwrap_or_else(|e| e)
    }
}

impl LinkThread {
    /// The operator's switchover and a clean stop's departure: started, followed, answered.
    pub(super) fn planned_requests(&mut self) {
        if let Some(tx) = self.shared.switchover.lock().ok().and_then(|mut p| p.take()) {
            let mut started = Err("the mirror's metadata cannot be stored: fenced until restarted".to_string());
            if !self.broken {
                self.handle_batch(|link, out| started = link.core.switchover(out));
            }
            match started {
                Ok(()) => {
                    tracing::info!(mirror = %self.name, "planned switchover requested by the operator");
                    self.switch_reply = Some(tx);
                }
                Err(why) => {
                    tracing::warn!(mirror = %self.name, "planned switchover refused: {why}");
                    let _ = tx.send(Err(why));
                }
            }
        }
        if let Some(outcome) = self.core.take_switchover_outcome() {
            if self.broken {
                tracing::error!(mirror = %self.name, "planned switchover: the metadata could not be stored; fenced until restarted");
            }
            match &outcome {
                Ok(what) => tracing::info!(mirror = %self.name, "planned switchover done: {what}"),
                Err(why) => tracing::warn!(mirror = %self.name, "planned switchover did not complete: {why}"),
            }
            if let Some((tx, _)) = self.stop_switch.take() {
                if let Err(why) = &outcome {
                    tracing::warn!(mirror = %self.name, "clean stop: the switchover to the peer did not complete ({why}); the peer fails over");
                }
                self.start_departure(tx);
            }
            if let Some(tx) = self.switch_reply.take() {
                let _ = tx.send(outcome);
            }
        }
        if self.stop_switch.as_ref().is_some_and(|(_, since)| since.elapsed() > STOP_SWITCHOVER_WAIT) {
            let (tx, _) = self.stop_switch.take().expect("checked");
            tracing::warn!(
                mirror = %self.name,
                "clean stop: the switchover to the peer did not end in {} s; the peer fails over",
                STOP_SWITCHOVER_WAIT.as_secs()
            );
            self.start_departure(tx);
        }
        if let Some(tx) = self.shared.depart.lock().ok().and_then(|mut p| p.take()) {
            let st = self.core.status();
            if !self.broken && st.metro.is_some() && st.role == Role::Preferred {
                // Hosts then only wait for the drain of the writes in flight, not for a failover.
                let mut started = Ok(());
                self.handle_batch(|link, out| started = link.core.switchover(out));
                match started {
                    Ok(()) => {
                        tracing::info!(mirror = %self.name, "clean stop: this site orders writes; switching over to the peer first");
                        self.stop_switch = Some((tx, Instant::now()));
                    }
                    Err(why) => {
                        tracing::warn!(mirror = %self.name, "clean stop: no switchover to the peer first ({why}); the peer fails over");
                        self.start_departure(tx);
                    }
                }
            } else {
                self.start_departure(tx);
            }
        }
        if let Some((_, since)) = &self.depart_reply {
            let (left, gone) = (self.core.peer_took_over(), self.conns.is_empty() || self.core.left());
            if left || gone || since.elapsed() > DEPART_WAIT {
                let (tx, _) = self.depart_reply.take().expect("checked");
                self.departed = true;
                // The acknowledgements of the peer's last writes go out before the link closes.
                self.flush();
                self.link_down("planned departure: the peer took over");
                let _ = tx.send(match (left, gone) {
                    (true, _) => "planned departure: the peer serves alone".to_string(),
                    (false, true) => "planned departure: the link went down or the peer could not take over; it fails over".to_string(),
                    (false, false) => "planned departure: the peer did not confirm in time; it fails over".to_string(),
                });
            }
        }
    }

    /// A clean stop of a leg that does not order writes (now): it fences, then tells the peer.
    fn start_departure(&mut self, tx: std::sync::mpsc::Sender<String>) {
        let mut leaving = false;
        if !self.broken {
            // Fenced and published (handle_batch) before the peer is told.
            self.handle_batch(|link, _| leaving = link.core.leave());
        }
        if leaving {
            self.handle_batch(|link, out| link.core.send_leave(out));
            self.depart_reply = Some((tx, Instant::now()));
        } else {
            let _ = tx.send(
                "no planned departure (the peer is not connected and in sync, or this site orders writes): the peer fails over".into(),
            );
        }
    }
}
