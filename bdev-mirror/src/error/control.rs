//! The live rules of one error bdev ([`ErrorControl`]), shared by its channels: installing and
//! clearing rules, each rule's counters and PRNG, the device's fault counters, and the decision
//! taken for each command.

use super::{FaultRule, RuleError};
use crate::{BdevError, BdevOp};
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Faults injected so far (not reset by [`ErrorControl::set`] or [`ErrorControl::clear`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FaultStats {
    /// Commands failed.
    pub errors: u64,
    /// Completions held back (failed or not).
    pub delayed: u64,
    /// Commands swallowed.
    pub dropped: u64,
}

/// One installed rule's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RuleStats {
    /// Commands the rule selected (including those it let through).
    pub matched: u64,
    /// Commands it fired on.
    pub fired: u64,
}

struct Armed {
    rule: FaultRule,
    stats: RuleStats,
    rng: u64,
}

impl Armed {
    fn new(index: usize, rule: FaultRule) -> Armed {
        let rng = rule.seed.unwrap_or(0x6e76_6d65_7472_6f00 ^ index as u64);
        Armed { rule, stats: RuleStats::default(), rng }
    }

    /// splitmix64, mapped onto [0, 1).
    fn next_unit(&mut self) -> f64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64
    }

    fn fires(&mut self, op: &BdevOp) -> bool {
        if !self.rule.selects(op) {
            return false;
        }
        self.stats.matched += 1;
        if self.stats.matched <= self.rule.after_n || self.rule.count.is_some_and(|c| self.stats.fired >= c) {
            return false;
        }
        if let Some(f) = self.rule.fraction {
            if self.next_unit() >= f {
                return false;
            }
        }
        self.stats.fired += 1;
        true
    }
}

/// What to do with a command.
pub(super) enum Action {
    Pass,
    Fail(BdevError, Option<Duration>),
    Delay(Duration),
    Drop,
}

/// The live fault settings of one [`ErrorBdev`](super::ErrorBdev), shared by its channels and whoever injects.
#[derive(Default)]
pub struct ErrorControl {
    active: AtomicBool,
    rules: Mutex<Vec<Armed>>,
    errors: AtomicU64,
    delayed: AtomicU64,
    dropped: AtomicU64,
}

impl std::fmt::Debug for ErrorControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ErrorControl").field("rules", &self.rules()).field("stats", &self.stats()).finish()
    }
}

impl ErrorControl {
    pub fn new() -> Arc<ErrorControl> {
        Arc::new(ErrorControl::default())
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Armed>> {
        self.rules.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the rules (their counters start over).
    pub fn set(&self, rules: Vec<FaultRule>) -> Result<(), RuleError> {
        rules.iter().try_for_each(FaultRule::validate)?;
        let mut guard = self.lock();
        *guard = rules.into_iter().enumerate().map(|(i, r)| Armed::new(i, r)).collect();
        self.active.store(!guard.is_empty(), Ordering::Release);
        Ok(())
    }

    /// Appends a rule.
    pub fn add(&self, rule: FaultRule) -> Result<(), RuleError> {
        rule.validate()?;
        let mut guard = self.lock();
        let index = guard.len();
        guard.push(Armed::new(index, rule));
        self.active.store(true, Ordering::Release);
        Ok(())
    }

    /// Removes every rule: commands pass through again (those already held or dropped stay so).
    pub fn clear(&self) {
        let mut guard = self.lock();
        guard.clear();
        self.active.store(false, Ordering::Release);
    }

    pub fn rules(&self) -> Vec<FaultRule> {
        self.lock().iter().map(|a| a.rule.clone()).collect()
    }

    /// Counters of the installed rules, in order.
    pub fn rule_stats(&self) -> Vec<RuleStats> {
        self.lock().iter().map(|a| a.stats).collect()
    }

    pub fn stats(&self) -> FaultStats {
        FaultStats {
            errors: self.errors.load(Ordering::Relaxed),
            delayed: self.delayed.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
        }
    }

    pub(super) fn decide(&self, op: &BdevOp) -> Action {
        if !self.active.load(Ordering::Acquire) {
            return Action::Pass;
        }
        let mut rules = self.lock();
        // Every rule that selects the command counts it, up to the first that fires.
        let Some(i) = rules.iter_mut().position(|a| a.fires(op)) else { return Action::Pass };
        let rule = &rules[i].rule;
        if rule.drop {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Action::Drop;
        }
        if rule.delay.is_some() {
            self.delayed.fetch_add(1, Ordering::Relaxed);
        }
        match (&rule.error, rule.delay) {
            (Some(e), delay) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
                Action::Fail(e.clone(), delay)
            }
            (None, Some(d)) => Action::Delay(d),
            (None, None) => Action::Pass,
        }
    }
}
