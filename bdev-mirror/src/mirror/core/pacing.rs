//! The resync's pace while hosts write: an additive-increase, multiplicative-decrease controller
//! over the regions a resync keeps in flight (DRBD's dynamic resync controller, SPDK raid's
//! process window), steering the hosts' write latency at this leg towards a
//! [`ResyncLatencyTarget`]: by default [`LATENCY_TARGET_PERCENT`] of what it was with no resync
//! running, or a fixed latency, or no target at all. Every [`PERIOD_MS`] of host writes during a
//! resync, a mean above the target halves the window, one at or below it widens it by a region.
//! Without host writes (or without a target) the resync takes the whole window; the window never
//! closes, so a resync always finishes. `resync_rate`, when set, caps the rate on top.

/// Regions in flight when no host writes.
pub(super) const WINDOW_MAX: usize = 16;
/// The window a resync starts with while hosts write.
const WINDOW_START: usize = 2;
/// Host write latency allowed during a resync, relative to the latency without one (IOPS at
/// queue depth 1 stay within 80 % of what they were).
pub const LATENCY_TARGET_PERCENT: u64 = 125;
/// The host write latency a resync steers to (a mirror's `resync_latency_target`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResyncLatencyTarget {
    /// This percentage of the host write latency without a resync (at least
    /// [`LATENCY_TARGET_FLOOR_US`]).
    Relative(u64),
    /// A fixed latency in microseconds.
    Absolute(u64),
    /// No controller: the resync keeps its whole window (only `resync_rate` limits it).
    Off,
}

impl Default for ResyncLatencyTarget {
    fn default() -> Self {
        ResyncLatencyTarget::Relative(LATENCY_TARGET_PERCENT)
    }
}

impl std::fmt::Display for ResyncLatencyTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResyncLatencyTarget::Relative(p) => write!(f, "{p}% of the latency without a resync"),
            ResyncLatencyTarget::Absolute(us) => write!(f, "{us} us"),
            ResyncLatencyTarget::Off => write!(f, "off"),
        }
    }
}

/// The lowest relative target (µs): below it the scheduling noise of a shared core decides, not the resync.
pub const LATENCY_TARGET_FLOOR_US: u64 = 100;
/// Length of a measurement period.
pub(super) const PERIOD_MS: u64 = 20;

#[derive(Debug, Clone)]
pub(super) struct ResyncPacer {
    /// Mean host write latency with no resync running (µs, moving average), once measured.
    baseline_us: Option<u64>,
    target: ResyncLatencyTarget,
    window: usize,
    /// The current period: its start, and its samples' sum and count.
    period_ms: u64,
    sum_us: u64,
    samples: u64,
}

impl Default for ResyncPacer {
    fn default() -> Self {
        ResyncPacer { baseline_us: None, target: ResyncLatencyTarget::default(), window: WINDOW_START, period_ms: 0, sum_us: 0, samples: 0 }
    }
}

impl ResyncPacer {
    /// A host write took `latency_us`; `resyncing`: a resync was running.
    pub(super) fn observe(&mut self, latency_us: u64, resyncing: bool) {
        if resyncing {
            self.sum_us += latency_us;
            self.samples += 1;
        } else {
            // Moving average over about 64 writes.
            self.baseline_us = Some(match self.baseline_us {
                None => latency_us,
                Some(b) => b - b / 64 + latency_us / 64,
            });
        }
    }

    pub(super) fn set_target(&mut self, target: ResyncLatencyTarget) {
        self.target = target;
    }

    /// The latency the controller steers to (µs); none without a controller.
    pub(super) fn target_us(&self) -> Option<u64> {
        match self.target {
            ResyncLatencyTarget::Relative(p) => Some(self.baseline_us.map_or(0, |b| b * p / 100).max(LATENCY_TARGET_FLOOR_US)),
            ResyncLatencyTarget::Absolute(us) => Some(us),
            ResyncLatencyTarget::Off => None,
        }
    }

    /// Called on every tick: closes a period that is over.
    pub(super) fn tick(&mut self, now_ms: u64) {
        if now_ms.saturating_sub(self.period_ms) < PERIOD_MS {
            return;
        }
        if let (Some(mean), Some(target)) = (self.sum_us.checked_div(self.samples), self.target_us()) {
            self.window = if mean > target { (self.window / 2).max(1) } else { (self.window + 1).min(WINDOW_MAX) };
        }
        self.period_ms = now_ms;
        self.sum_us = 0;
        self.samples = 0;
    }

    /// Regions the resync may have in flight now.
    pub(super) fn window(&self, hosts_writing: bool) -> usize {
        if hosts_writing && self.target != ResyncLatencyTarget::Off {
            self.window
        } else {
            WINDOW_MAX
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn period(p: &mut ResyncPacer, now: &mut u64, latency_us: u64) {
        for _ in 0..10 {
            p.observe(latency_us, true);
        }
        *now += PERIOD_MS;
        p.tick(*now);
    }

    #[test]
    fn the_window_halves_above_the_target_and_grows_below_it() {
        let mut p = ResyncPacer::default();
        for _ in 0..1000 {
            p.observe(200, false);
        }
        assert_eq!(p.target_us(), Some(250), "125 % of the latency without a resync");
        let mut now = 0;
        for _ in 0..20 {
            period(&mut p, &mut now, 240);
        }
        assert_eq!(p.window(true), WINDOW_MAX, "under the target the window opens to the maximum");
        period(&mut p, &mut now, 900);
        assert_eq!(p.window(true), WINDOW_MAX / 2);
        for _ in 0..10 {
            period(&mut p, &mut now, 900);
        }
        assert_eq!(p.window(true), 1, "never closed: the resync goes on at one region");
        assert_eq!(p.window(false), WINDOW_MAX, "no host writes: the whole window");
    }

    #[test]
    fn a_period_without_host_writes_changes_nothing_and_the_target_has_a_floor() {
        let mut p = ResyncPacer::default();
        assert_eq!(p.target_us(), Some(LATENCY_TARGET_FLOOR_US), "nothing measured yet");
        p.tick(PERIOD_MS);
        assert_eq!(p.window(true), WINDOW_START);
        p.observe(10, false);
        assert_eq!(p.target_us(), Some(LATENCY_TARGET_FLOOR_US));
    }

    #[test]
    fn a_fixed_target_ignores_the_baseline_and_no_target_keeps_the_whole_window() {
        let mut p = ResyncPacer::default();
        p.set_target(ResyncLatencyTarget::Absolute(1000));
        for _ in 0..1000 {
            p.observe(200, false);
        }
        assert_eq!(p.target_us(), Some(1000));
        let mut now = 0;
        period(&mut p, &mut now, 900);
        assert_eq!(p.window(true), WINDOW_START + 1, "900 us is under a 1 ms target");
        period(&mut p, &mut now, 1100);
        assert_eq!(p.window(true), 1, "halved from {}", WINDOW_START + 1);

        p.set_target(ResyncLatencyTarget::Off);
        assert_eq!(p.window(true), WINDOW_MAX, "without a controller the resync takes the whole window");
        period(&mut p, &mut now, 100_000);
        assert_eq!(p.window(true), WINDOW_MAX, "however slow the host writes are");
    }
}
