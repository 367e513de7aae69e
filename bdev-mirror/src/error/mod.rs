//! The error-injection device (SPDK's `bdev_error`, Linux's dm-flakey): it wraps another bdev and
//! fails, delays or swallows the commands that match live-settable [`FaultRule`]s.
//!
//! * A rule picks commands by kind ([`OpKind`]) and optionally by byte range, then skips the
//!   first `after_n` of them, fires on a `fraction` of the rest (a seeded, deterministic PRNG),
//!   and stops after `count` faults.
//! * Firing, it fails the command with `error` (the inner device never sees it), optionally
//!   after `delay`; or with only `delay` the command runs on the inner device and its completion
//!   is held back; or with `drop` the command is swallowed and never completes.
//! * Rules are evaluated in order; a rule that matches but does not fire (still skipping, missed
//!   by the fraction, used up) lets the next rule decide; rules after the one that fires do not
//!   see the command (their `after_n` and counters ignore it). Commands no rule fires on pass
//!   through.
//! * One [`ErrorControl`] per device, shared by its channels: [`ErrorControl::set`] and
//!   [`ErrorControl::clear`] change the rules live; without rules a command costs one atomic
//!   load on top of the inner device's channel, with rules one uncontended mutex.
//! * Delays never sleep on the data path: held completions carry a deadline and leave in a later
//!   [`BdevChannel::poll`]; the channel's wake descriptor (an eventfd a helper thread rings at the
//!   earliest deadline, started by the channel's first delay) wakes a parked reactor in time.
//! * [`BdevChannel::outstanding`] counts held completions, and dropped commands forever: a
//!   channel with a dropped command never drains (a reload that removes the device waits for
//!   it), which is what a device that lost a command looks like.
//!
//! Rules also come as JSON for the management socket, see [`parse_rule`]:
//! `{"op":"write","error":"nospace","offset":0,"len":1048576,"after":3}`.
//!
//! The rules are in `rule`, the live settings and decisions in `control`, the data path in
//! `channel`; this module holds the device.

mod channel;
mod control;
mod rule;
#[cfg(test)]
mod tests;

pub use control::{ErrorControl, FaultStats, RuleStats};
pub use rule::{parse_rule, parse_rules, FaultRule, OpKind, RuleError};

use crate::{Access, Bdev, BdevChannel, BdevInfo, Poller};
use channel::ErrorChannel;
use std::sync::Arc;

/// A device that injects faults into another.
#[derive(Debug)]
pub struct ErrorBdev {
    info: BdevInfo,
    inner: Arc<dyn Bdev>,
    control: Arc<ErrorControl>,
}

impl ErrorBdev {
    /// Wraps `inner` under a new name, with no rules yet.
    pub fn new(name: &str, inner: Arc<dyn Bdev>) -> ErrorBdev {
        ErrorBdev::with_control(name, inner, ErrorControl::new())
    }

    pub fn with_control(name: &str, inner: Arc<dyn Bdev>, control: Arc<ErrorControl>) -> ErrorBdev {
        let info = BdevInfo { name: name.into(), ..inner.info().clone() };
        ErrorBdev { info, inner, control }
    }

    pub fn control(&self) -> &Arc<ErrorControl> {
        &self.control
    }

    pub fn inner(&self) -> &Arc<dyn Bdev> {
        &self.inner
    }
}

impl Bdev for ErrorBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }
    fn serving(&self) -> bool {
        self.inner.serving()
    }
    fn access(&self) -> Access {
        self.inner.access()
    }
    fn tune(&self, tuning: crate::mirror::driver::MirrorTuning) {
        self.inner.tune(tuning)
    }
    fn failback(&self) -> bool {
        self.inner.failback()
    }
    fn take_poller(&self) -> Option<Box<dyn Poller>> {
        self.inner.take_poller()
    }
    fn take_helper_pollers(&self) -> Vec<Box<dyn Poller>> {
        self.inner.take_helper_pollers()
    }
    fn mirror_status(&self) -> Option<crate::mirror::driver::StatusReport> {
        self.inner.mirror_status()
    }
    fn as_mirror(&self) -> Option<&crate::mirror::driver::MirrorBdev> {
        self.inner.as_mirror()
    }
    fn as_error(&self) -> Option<&ErrorBdev> {
        Some(self)
    }
    fn channel(self: Arc<Self>) -> std::io::Result<Box<dyn BdevChannel>> {
        let inner = self.inner.clone().channel()?;
        Ok(Box::new(ErrorChannel::new(inner, self.control.clone(), self.info.size_bytes())?))
    }
}
