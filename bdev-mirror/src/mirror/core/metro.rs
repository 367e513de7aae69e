//! Metro-mode timers: the lease a leg's answered Ping gives and the settle time that outlasts it
//! (the module docs' lease inequality).

/// Metro-mode settings: a witness decides who serves when the legs lose each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metro {
    /// The witness's name for this mirror (both sites use the same). The pre-elected survivor
    /// (when the witness was lost first) is the leg that orders writes then.
    pub resource: String,
    /// After a resync, wait for [`super::Input::Failback`] before serving again.
    pub manual_failback: bool,
    /// Stop serving after this long without a frame from the connected peer.
    pub fence_ms: u64,
    /// After losing the peer, serve alone no sooner than this (must exceed the peer's `fence_ms`).
    pub settle_ms: u64,
    /// At start, wait this long for the peer before asking the witness.
    pub startup_grace_ms: u64,
    /// Report Transition (ANA Change) at most this long, then Inaccessible while undecided.
    pub transition_ms: u64,
}

/// Clock-rate difference the lease inequality allows between two sites (10 %).
const CLOCK_RATE_MARGIN_PERCENT: u64 = 10;
/// Scheduling slack the lease inequality allows, in milliseconds.
const LEASE_SLACK_MS: u64 = 25;

impl Metro {
    /// Settings for mirror `resource` with timers derived from the link's heartbeat timeout.
    pub fn new(resource: &str, manual_failback: bool, heartbeat_ms: u64) -> Metro {
        let mut m = Metro {
            resource: resource.to_string(),
            manual_failback,
            fence_ms: 0,
            settle_ms: 0,
            startup_grace_ms: 0,
            transition_ms: 10_000,
        };
        m.set_heartbeat(heartbeat_ms);
        m
    }

    /// A leg's lease lasts `h/2` from a Ping its peer answered; a leg that lost its peer serves
    /// alone only `max(h/2 + 100 ms, h/2 × 1.1 + 25 ms)` after the last Pong it sent, when the
    /// other leg's lease has surely run out ([`Metro::check`] holds for every `h`).
    pub fn set_heartbeat(&mut self, h: u64) {
        self.fence_ms = h / 2;
        self.settle_ms = (h / 2 + 100).max(lease_settle(h / 2));
        self.startup_grace_ms = 2 * h;
    }

    /// The lease inequality (module docs): a leg that takes over waits until its peer's lease has
    /// surely run out, even if the peer's clock runs 10 % slower.
    pub fn check(&self) -> Result<(), String> {
        let needed = lease_settle(self.fence_ms);
        if self.fence_ms == 0 || self.settle_ms < needed {
            return Err(format!(
                "metro timers unsafe: settle {} ms must be at least fence {} ms x 1.{} + {} ms = {needed} ms",
                self.settle_ms, self.fence_ms, CLOCK_RATE_MARGIN_PERCENT, LEASE_SLACK_MS
            ));
        }
        Ok(())
    }
}

/// The least settle time that is safe for a lease of `fence_ms` (the module docs' inequality).
pub(super) fn lease_settle(fence_ms: u64) -> u64 {
    fence_ms + fence_ms * CLOCK_RATE_MARGIN_PERCENT / 100 + LEASE_SLACK_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_inequality_holds_for_every_heartbeat() {
        for h in [2, 10, 100, 500, 1000, 1500, 2000, 3000, 10_000, 60_000] {
            let m = Metro::new("m", false, h);
            assert_eq!(m.check(), Ok(()), "heartbeat {h} ms: {m:?}");
            assert!(m.settle_ms >= m.fence_ms * 11 / 10 + 25);
        }
        let d = Metro::new("m", false, 1000);
        assert_eq!((d.fence_ms, d.settle_ms), (500, 600), "the default timers");
        let unsafe_timers = Metro { settle_ms: 520, ..d };
        assert!(unsafe_timers.check().is_err(), "a settle within the lease's clock margin is refused");
    }
}
