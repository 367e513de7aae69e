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

use crate::{Access, Bdev, BdevChannel, BdevCompletion, BdevError, BdevInfo, BdevOp, BdevOutput, Poller};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Which commands a rule looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// Every command.
    #[default]
    Any,
    Read,
    /// Write only.
    Write,
    /// Every command that changes data: Write, CompareAndWrite, WriteZeroes, Deallocate.
    Writes,
    /// Compare and CompareAndWrite.
    Compare,
    #[serde(alias = "writezeroes")]
    WriteZeroes,
    Deallocate,
    Flush,
}

impl OpKind {
    pub fn matches(self, op: &BdevOp) -> bool {
        match self {
            OpKind::Any => true,
            OpKind::Read => matches!(op, BdevOp::Read { .. }),
            OpKind::Write => matches!(op, BdevOp::Write { .. }),
            OpKind::Writes => {
                matches!(op, BdevOp::Write { .. } | BdevOp::CompareAndWrite { .. } | BdevOp::WriteZeroes { .. } | BdevOp::Deallocate { .. })
            }
            OpKind::Compare => matches!(op, BdevOp::Compare { .. } | BdevOp::CompareAndWrite { .. }),
            OpKind::WriteZeroes => matches!(op, BdevOp::WriteZeroes { .. }),
            OpKind::Deallocate => matches!(op, BdevOp::Deallocate { .. }),
            OpKind::Flush => matches!(op, BdevOp::Flush),
        }
    }
}

/// One fault to inject. In JSON the fields are `op`, `error`, `offset`, `len`, `after`,
/// `fraction`, `count`, `delay_ms`, `drop`, `seed`, all optional but a rule must do something
/// (fail, delay or drop).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultRule {
    /// Which command kinds.
    #[serde(rename = "op", alias = "ops")]
    pub ops: OpKind,
    /// Fail with this (the inner device never sees the command). An [`BdevError::OutOfRange`]
    /// is filled in with the command's range and the device's size. JSON: `"eio"`, `"nospace"`
    /// (or `"enospc"`), `"fenced"`, `"transition"`, `"out_of_range"`, `{"io": "message"}`.
    #[serde(with = "error_name", skip_serializing_if = "Option::is_none")]
    pub error: Option<BdevError>,
    /// Only commands touching bytes from `offset` (default 0)...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// ...for `len` bytes (default: to the end). A rule with a range never matches Flush.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub len: Option<u64>,
    /// Let the first N matching commands through.
    #[serde(rename = "after", alias = "after_n")]
    pub after_n: u64,
    /// Fire on this fraction of the matching commands (0.0 to 1.0; default all).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fraction: Option<f64>,
    /// Fire this many times, then let everything through.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Complete this late: the error if there is one, else the inner device's completion.
    #[serde(rename = "delay_ms", with = "millis", skip_serializing_if = "Option::is_none")]
    pub delay: Option<Duration>,
    /// Swallow the command: it never reaches the inner device and never completes.
    pub drop: bool,
    /// Seed of the fraction's PRNG (default: a fixed seed per rule position).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleError {
    #[error("bad fault rule: {0}")]
    Json(String),
    #[error("bad fault rule: {0}")]
    Invalid(&'static str),
}

impl FaultRule {
    /// Fails `ops` commands with `error`, from now on.
    pub fn fail(ops: OpKind, error: BdevError) -> FaultRule {
        FaultRule { ops, error: Some(error), ..FaultRule::default() }
    }

    pub fn validate(&self) -> Result<(), RuleError> {
        if let Some(f) = self.fraction {
            if !(0.0..=1.0).contains(&f) {
                return Err(RuleError::Invalid("fraction must be between 0 and 1"));
            }
        }
        if self.len == Some(0) {
            return Err(RuleError::Invalid("len must not be 0"));
        }
        if self.offset.unwrap_or(0).checked_add(self.len.unwrap_or(0)).is_none() {
            return Err(RuleError::Invalid("offset + len overflows"));
        }
        if self.ops == OpKind::Flush && self.has_range() {
            return Err(RuleError::Invalid("flushes have no range: a flush rule cannot have offset or len"));
        }
        if self.drop && (self.error.is_some() || self.delay.is_some()) {
            return Err(RuleError::Invalid("a dropped command neither fails nor completes late: drop excludes error and delay"));
        }
        if !self.drop && self.error.is_none() && self.delay.is_none() {
            return Err(RuleError::Invalid("the rule injects nothing: give it an error, a delay or drop"));
        }
        Ok(())
    }

    fn has_range(&self) -> bool {
        self.offset.is_some() || self.len.is_some()
    }

    /// Whether the rule looks at `op` (kind and range; not the counters).
    pub fn selects(&self, op: &BdevOp) -> bool {
        if !self.ops.matches(op) {
            return false;
        }
        if !self.has_range() {
            return true;
        }
        let Some((offset, len)) = op.range() else { return false };
        let start = self.offset.unwrap_or(0);
        let end = self.len.map_or(u64::MAX, |l| start.saturating_add(l));
        offset < end && offset.saturating_add(len.max(1)) > start
    }
}

/// Parses one rule from JSON, e.g. `{"op":"write","error":"nospace","offset":0,"len":1048576,"after":3}`.
pub fn parse_rule(json: &str) -> Result<FaultRule, RuleError> {
    let rule: FaultRule = serde_json::from_str(json).map_err(|e| RuleError::Json(e.to_string()))?;
    rule.validate()?;
    Ok(rule)
}

/// Parses a JSON array of rules, or a single rule. Errors say which rule of an array is wrong
/// and why (an unknown field, a bad value, a rule that injects nothing).
pub fn parse_rules(json: &str) -> Result<Vec<FaultRule>, RuleError> {
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| RuleError::Json(e.to_string()))?;
    let one = |v: serde_json::Value| -> Result<FaultRule, RuleError> {
        if !v.is_object() {
            return Err(RuleError::Json(format!("a rule is a JSON object, not {v}")));
        }
        let rule: FaultRule = serde_json::from_value(v).map_err(|e| RuleError::Json(e.to_string()))?;
        rule.validate()?;
        Ok(rule)
    };
    match value {
        serde_json::Value::Array(items) => items
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                one(v).map_err(|e| match e {
                    RuleError::Json(m) => RuleError::Json(format!("rule {}: {m}", i + 1)),
                    RuleError::Invalid(m) => RuleError::Json(format!("rule {}: {m}", i + 1)),
                })
            })
            .collect(),
        v => Ok(vec![one(v)?]),
    }
}

/// The JSON names of the errors a rule injects.
mod error_name {
    use crate::BdevError;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "snake_case")]
    enum Name {
        Eio,
        Io(String),
        #[serde(alias = "nospace", alias = "enospc")]
        NoSpace,
        Fenced,
        Transition,
        OutOfRange,
    }

    pub fn serialize<S: Serializer>(e: &Option<BdevError>, s: S) -> Result<S::Ok, S::Error> {
        let name = match e {
            None => return s.serialize_none(),
            Some(BdevError::Io(m)) if m == "EIO" => Name::Eio,
            Some(BdevError::Io(m)) => Name::Io(m.clone()),
            Some(BdevError::NoSpace) => Name::NoSpace,
            Some(BdevError::Fenced) => Name::Fenced,
            Some(BdevError::Transition) => Name::Transition,
            Some(BdevError::OutOfRange { .. }) => Name::OutOfRange,
        };
        name.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BdevError>, D::Error> {
        Ok(Option::<Name>::deserialize(d)?.map(|n| match n {
            Name::Eio => BdevError::Io("EIO".into()),
            Name::Io(m) => BdevError::Io(m),
            Name::NoSpace => BdevError::NoSpace,
            Name::Fenced => BdevError::Fenced,
            Name::Transition => BdevError::Transition,
            Name::OutOfRange => BdevError::OutOfRange { offset: 0, len: 0, size: 0 },
        }))
    }
}

/// Durations as (fractional) milliseconds.
mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_f64(d.as_secs_f64() * 1000.0),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<f64>::deserialize(d)? {
            None => Ok(None),
            Some(ms) => Duration::try_from_secs_f64(ms / 1000.0).map(Some).map_err(serde::de::Error::custom),
        }
    }
}

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
enum Action {
    Pass,
    Fail(BdevError, Option<Duration>),
    Delay(Duration),
    Drop,
}

/// The live fault settings of one [`ErrorBdev`], shared by its channels and whoever injects.
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

    fn decide(&self, op: &BdevOp) -> Action {
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
        let alarm = Alarm::new()?;
        Ok(Box::new(ErrorChannel {
            inner,
            control: self.control.clone(),
            size: self.info.size_bytes(),
            ready: Vec::new(),
            held: Vec::new(),
            delayed: HashMap::new(),
            dropped: 0,
            alarm,
        }))
    }
}

struct ErrorChannel {
    inner: Box<dyn BdevChannel>,
    control: Arc<ErrorControl>,
    size: u64,
    /// Failed at once, for the next poll.
    ready: Vec<BdevCompletion>,
    /// Completions waiting for their deadline.
    held: Vec<(Instant, BdevCompletion)>,
    /// Tags at the inner device whose completions are to be held until the deadline.
    delayed: HashMap<u64, Instant>,
    /// Commands swallowed (outstanding forever).
    dropped: usize,
    alarm: Alarm,
}

impl ErrorChannel {
    fn hold(&mut self, deadline: Instant, c: BdevCompletion) {
        self.alarm.arm(deadline);
        self.held.push((deadline, c));
    }
}

impl BdevChannel for ErrorChannel {
    fn submit(&mut self, tag: u64, op: BdevOp) {
        match self.control.decide(&op) {
            Action::Pass => self.inner.submit(tag, op),
            Action::Drop => self.dropped += 1,
            Action::Delay(d) => {
                self.delayed.insert(tag, Instant::now() + d);
                self.inner.submit(tag, op);
            }
            Action::Fail(mut e, delay) => {
                if let BdevError::OutOfRange { offset, len, size } = &mut e {
                    (*offset, *len) = op.range().unwrap_or((0, 0));
                    *size = self.size;
                }
                let c = BdevCompletion { tag, result: Err::<BdevOutput, _>(e) };
                match delay {
                    Some(d) => self.hold(Instant::now() + d, c),
                    None => self.ready.push(c),
                }
            }
        }
    }

    fn poll(&mut self, done: &mut Vec<BdevCompletion>) -> usize {
        let start = done.len();
        self.inner.poll(done);
        if !self.delayed.is_empty() && done.len() > start {
            for c in done.split_off(start) {
                match self.delayed.remove(&c.tag) {
                    Some(deadline) => self.hold(deadline, c),
                    None => done.push(c),
                }
            }
        }
        done.append(&mut self.ready);
        self.alarm.acknowledge();
        if !self.held.is_empty() {
            let now = Instant::now();
            let mut i = 0;
            while i < self.held.len() {
                if self.held[i].0 <= now {
                    done.push(self.held.remove(i).1);
                } else {
                    i += 1;
                }
            }
            if let Some(next) = self.held.iter().map(|h| h.0).min() {
                self.alarm.arm(next);
            }
        }
        done.len() - start
    }

    fn outstanding(&self) -> usize {
        self.inner.outstanding() + self.ready.len() + self.held.len() + self.dropped
    }

    fn wake_fds(&self) -> Vec<RawFd> {
        let mut fds = self.inner.wake_fds();
        fds.push(self.alarm.shared.fd.as_raw_fd());
        fds
    }
}

/// Rings an eventfd at the earliest deadline of the held completions, so a parked reactor wakes
/// to release them. Its thread starts on the first deadline.
struct Alarm {
    shared: Arc<AlarmShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct AlarmShared {
    fd: OwnedFd,
    /// The deadline to ring at, and whether the thread must stop.
    next: Mutex<(Option<Instant>, bool)>,
    wake: Condvar,
    rang: AtomicBool,
}

impl Alarm {
    fn new() -> std::io::Result<Alarm> {
        let fd = nvmetro_ffi::eventfd()?;
        let shared = AlarmShared { fd, next: Mutex::new((None, false)), wake: Condvar::new(), rang: AtomicBool::new(false) };
        Ok(Alarm { shared: Arc::new(shared), thread: None })
    }

    fn lock(&self) -> MutexGuard<'_, (Option<Instant>, bool)> {
        self.shared.next.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn arm(&mut self, deadline: Instant) {
        if self.thread.is_none() {
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new().name("bdev-error-alarm".into()).spawn(move || shared.run());
            match spawned {
                Ok(t) => self.thread = Some(t),
                // Held completions still leave when the reactor next polls (its tick at worst).
                Err(e) => {
                    tracing::warn!("cannot start the error bdev's alarm thread: {e}");
                    return;
                }
            }
        }
        let mut next = self.lock();
        if next.0.is_none_or(|n| deadline < n) {
            next.0 = Some(deadline);
            self.shared.wake.notify_one();
        }
    }

    /// Drains the eventfd if the alarm rang.
    fn acknowledge(&self) {
        if self.shared.rang.swap(false, Ordering::AcqRel) {
            nvmetro_ffi::eventfd_drain(&self.shared.fd);
        }
    }
}

impl AlarmShared {
    fn run(&self) {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match *next {
                (_, true) => return,
                (None, false) => next = self.wake.wait(next).unwrap_or_else(|p| p.into_inner()),
                (Some(at), false) => {
                    let now = Instant::now();
                    if at <= now {
                        next.0 = None;
                        self.rang.store(true, Ordering::Release);
                        nvmetro_ffi::eventfd_signal(&self.fd);
                    } else {
                        next = self.wake.wait_timeout(next, at - now).unwrap_or_else(|p| p.into_inner()).0;
                    }
                }
            }
        }
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.lock().1 = true;
            self.shared.wake.notify_one();
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::{check, run_to_completion};
    use crate::malloc::MallocBdev;

    const BS: usize = 512;

    fn device() -> Arc<ErrorBdev> {
        let inner: Arc<dyn Bdev> = Arc::new(MallocBdev::new("m", BS as u32, 1 << 20, false).unwrap());
        Arc::new(ErrorBdev::new("e", inner))
    }

    fn write(offset: u64) -> BdevOp {
        BdevOp::Write { offset, data: vec![0xab; BS].into(), fua: false }
    }

    fn read(offset: u64) -> BdevOp {
        BdevOp::Read { offset, len: BS }
    }

    /// Polls until `tag` completes or `limit` passes.
    fn wait_for(ch: &mut dyn BdevChannel, tag: u64, limit: Duration) -> Option<BdevCompletion> {
        let until = Instant::now() + limit;
        let mut done = Vec::new();
        while Instant::now() < until {
            ch.poll(&mut done);
            if let Some(i) = done.iter().position(|c| c.tag == tag) {
                return Some(done.swap_remove(i));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    #[test]
    fn passes_everything_through_without_rules() {
        let dev = device();
        assert_eq!(dev.info().name, "e");
        assert_eq!(dev.info().size_bytes(), 1 << 20);
        check(dev.clone());
        // With a rule that never selects anything, too.
        dev.control().set(vec![FaultRule { ops: OpKind::Flush, drop: true, ..FaultRule::default() }]).unwrap();
        let mut ch = dev.clone().channel().unwrap();
        assert_eq!(run_to_completion(ch.as_mut(), 1, write(0)), Ok(BdevOutput::Done));
        assert_eq!(dev.control().stats(), FaultStats::default());
    }

    #[test]
    fn errors_only_in_range() {
        let dev = device();
        let rule = FaultRule { offset: Some(4096), len: Some(4096), ..FaultRule::fail(OpKind::Write, BdevError::NoSpace) };
        dev.control().set(vec![rule]).unwrap();
        let mut ch = dev.clone().channel().unwrap();
        let ch = ch.as_mut();
        assert_eq!(run_to_completion(ch, 1, write(0)), Ok(BdevOutput::Done));
        assert_eq!(run_to_completion(ch, 2, write(3584)), Ok(BdevOutput::Done));
        assert_eq!(run_to_completion(ch, 3, write(4096)), Err(BdevError::NoSpace));
        assert_eq!(run_to_completion(ch, 4, write(8192 - 512)), Err(BdevError::NoSpace));
        assert_eq!(run_to_completion(ch, 5, write(8192)), Ok(BdevOutput::Done));
        // Overlapping the range's start is enough.
        let big = BdevOp::Write { offset: 3584, data: vec![1; 1024].into(), fua: false };
        assert_eq!(run_to_completion(ch, 6, big), Err(BdevError::NoSpace));
        // Other kinds pass, and the failed writes never reached the disk.
        assert_eq!(run_to_completion(ch, 7, read(4096)), Ok(BdevOutput::Data(vec![0; BS])));
        assert_eq!(run_to_completion(ch, 8, BdevOp::Flush), Ok(BdevOutput::Done));
        assert_eq!(dev.control().stats().errors, 3);
        assert_eq!(dev.control().rule_stats(), vec![RuleStats { matched: 3, fired: 3 }]);
        assert_eq!(ch.outstanding(), 0);
    }

    #[test]
    fn after_n_lets_the_first_ones_through() {
        let dev = device();
        dev.control().set(vec![FaultRule { after_n: 3, ..FaultRule::fail(OpKind::Writes, BdevError::Io("EIO".into())) }]).unwrap();
        let mut ch = dev.clone().channel().unwrap();
        let results: Vec<bool> = (0..6).map(|i| run_to_completion(ch.as_mut(), i, write(i * 512)).is_ok()).collect();
        assert_eq!(results, [true, true, true, false, false, false]);
        // Reads are not writes; write zeroes and deallocate are.
        assert!(run_to_completion(ch.as_mut(), 10, read(0)).is_ok());
        assert!(run_to_completion(ch.as_mut(), 11, BdevOp::WriteZeroes { offset: 0, len: 512 }).is_err());
        assert!(run_to_completion(ch.as_mut(), 12, BdevOp::Deallocate { offset: 0, len: 512 }).is_err());
    }

    #[test]
    fn fraction_fails_roughly_that_share_reproducibly() {
        let dev = device();
        let rule = FaultRule { fraction: Some(0.3), seed: Some(42), ..FaultRule::fail(OpKind::Read, BdevError::Io("EIO".into())) };
        let mut ch = dev.clone().channel().unwrap();
        let mut pattern = |dev: &ErrorBdev| {
            dev.control().set(vec![rule.clone()]).unwrap();
            (0..1000).map(|i| run_to_completion(ch.as_mut(), i, read(0)).is_err()).collect::<Vec<bool>>()
        };
        let first = pattern(&dev);
        let failed = first.iter().filter(|&&f| f).count();
        assert!((240..=360).contains(&failed), "{failed} of 1000 failed");
        assert_eq!(pattern(&dev), first, "same seed, same faults");
        assert_eq!(dev.control().stats().errors, 2 * failed as u64);
    }

    #[test]
    fn count_fails_that_many_then_passes() {
        let dev = device();
        dev.control().set(vec![FaultRule { count: Some(2), ..FaultRule::fail(OpKind::Any, BdevError::Fenced) }]).unwrap();
        let mut ch = dev.clone().channel().unwrap();
        assert_eq!(run_to_completion(ch.as_mut(), 1, BdevOp::Flush), Err(BdevError::Fenced));
        assert_eq!(run_to_completion(ch.as_mut(), 2, read(0)), Err(BdevError::Fenced));
        assert!(run_to_completion(ch.as_mut(), 3, read(0)).is_ok());
        assert!(run_to_completion(ch.as_mut(), 4, BdevOp::Flush).is_ok());
        assert_eq!(dev.control().rule_stats(), vec![RuleStats { matched: 4, fired: 2 }]);
    }

    #[test]
    fn rules_are_tried_in_order() {
        let dev = device();
        dev.control()
            .set(vec![
                FaultRule { count: Some(1), ..FaultRule::fail(OpKind::Read, BdevError::Transition) },
                FaultRule::fail(OpKind::Read, BdevError::Fenced),
            ])
            .unwrap();
        let mut ch = dev.clone().channel().unwrap();
        assert_eq!(run_to_completion(ch.as_mut(), 1, read(0)), Err(BdevError::Transition));
        assert_eq!(run_to_completion(ch.as_mut(), 2, read(0)), Err(BdevError::Fenced));
        // Out of range is filled in with the command's range.
        dev.control().set(vec![FaultRule::fail(OpKind::Read, BdevError::OutOfRange { offset: 0, len: 0, size: 0 })]).unwrap();
        assert_eq!(run_to_completion(ch.as_mut(), 3, read(1024)), Err(BdevError::OutOfRange { offset: 1024, len: 512, size: 1 << 20 }));
    }

    #[test]
    fn delay_holds_completions_until_the_deadline() {
        let dev = device();
        let delay = Duration::from_millis(60);
        dev.control()
            .set(vec![
                FaultRule { ops: OpKind::Write, delay: Some(delay), ..FaultRule::default() },
                FaultRule { delay: Some(delay), ..FaultRule::fail(OpKind::Flush, BdevError::NoSpace) },
            ])
            .unwrap();
        let mut ch = dev.clone().channel().unwrap();
        let start = Instant::now();
        ch.submit(1, write(0));
        ch.submit(2, BdevOp::Flush);
        ch.submit(3, read(512));
        let mut done = Vec::new();
        ch.poll(&mut done);
        // The undelayed read comes at once; the others wait, and count as outstanding.
        assert_eq!(done.iter().map(|c| c.tag).collect::<Vec<_>>(), [3]);
        assert_eq!(ch.outstanding(), 2);
        done.clear();
        while done.len() < 2 {
            assert!(start.elapsed() < Duration::from_secs(10), "the delayed completions never came");
            ch.poll(&mut done);
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(start.elapsed() >= delay);
        done.sort_by_key(|c| c.tag);
        assert_eq!(done[0], BdevCompletion { tag: 1, result: Ok(BdevOutput::Done) });
        assert_eq!(done[1], BdevCompletion { tag: 2, result: Err(BdevError::NoSpace) });
        assert_eq!(ch.outstanding(), 0);
        // The write was done on the disk.
        assert_eq!(run_to_completion(ch.as_mut(), 4, read(0)), Ok(BdevOutput::Data(vec![0xab; BS])));
        assert_eq!(dev.control().stats(), FaultStats { errors: 1, delayed: 2, dropped: 0 });
    }

    #[test]
    fn the_wake_descriptor_rings_at_the_deadline() {
        let dev = device();
        dev.control()
            .set(vec![FaultRule { delay: Some(Duration::from_millis(20)), ..FaultRule::fail(OpKind::Read, BdevError::NoSpace) }])
            .unwrap();
        let mut ch = dev.clone().channel().unwrap();
        let fds = ch.wake_fds();
        assert_eq!(fds.len(), 1);
        ch.submit(1, read(0));
        let mut poll = mio::Poll::new().unwrap();
        poll.registry().register(&mut mio::unix::SourceFd(&fds[0]), mio::Token(0), mio::Interest::READABLE).unwrap();
        let mut events = mio::Events::with_capacity(4);
        let start = Instant::now();
        while events.is_empty() {
            poll.poll(&mut events, Some(Duration::from_secs(10))).unwrap();
            assert!(start.elapsed() < Duration::from_secs(10), "the alarm never rang");
        }
        let mut done = Vec::new();
        ch.poll(&mut done);
        assert_eq!(done.len(), 1);
        assert!(start.elapsed() >= Duration::from_millis(15));
        drop(ch);
    }

    #[test]
    fn dropped_commands_never_complete_and_stay_outstanding() {
        let dev = device();
        dev.control().set(vec![FaultRule { ops: OpKind::Write, count: Some(1), drop: true, ..FaultRule::default() }]).unwrap();
        let mut ch = dev.clone().channel().unwrap();
        ch.submit(1, write(0));
        assert_eq!(run_to_completion(ch.as_mut(), 2, write(512)), Ok(BdevOutput::Done));
        assert!(wait_for(ch.as_mut(), 1, Duration::from_millis(20)).is_none());
        dev.control().clear();
        assert_eq!(ch.outstanding(), 1);
        assert_eq!(dev.control().stats().dropped, 1);
        // Never written.
        assert_eq!(run_to_completion(ch.as_mut(), 3, read(0)), Ok(BdevOutput::Data(vec![0; BS])));
    }

    #[test]
    fn clear_restores_and_outstanding_returns_to_zero() {
        let dev = device();
        dev.control().add(FaultRule::fail(OpKind::Any, BdevError::Io("EIO".into()))).unwrap();
        let mut ch = dev.clone().channel().unwrap();
        ch.submit(1, write(0));
        assert_eq!(ch.outstanding(), 1);
        assert_eq!(wait_for(ch.as_mut(), 1, Duration::from_secs(1)).unwrap().result, Err(BdevError::Io("EIO".into())));
        assert_eq!(ch.outstanding(), 0);
        dev.control().clear();
        assert!(dev.control().rules().is_empty());
        assert_eq!(run_to_completion(ch.as_mut(), 2, write(0)), Ok(BdevOutput::Done));
        assert_eq!(ch.outstanding(), 0);
        // Another channel shares the control.
        let mut other = dev.clone().channel().unwrap();
        dev.control().add(FaultRule::fail(OpKind::Read, BdevError::NoSpace)).unwrap();
        assert_eq!(run_to_completion(other.as_mut(), 3, read(0)), Err(BdevError::NoSpace));
        assert_eq!(run_to_completion(ch.as_mut(), 4, read(0)), Err(BdevError::NoSpace));
    }

    #[test]
    fn rules_parse_from_json() {
        let r = parse_rule(r#"{"op":"write","error":"nospace","offset":0,"len":1048576,"after":3}"#).unwrap();
        assert_eq!(r, FaultRule { offset: Some(0), len: Some(1 << 20), after_n: 3, ..FaultRule::fail(OpKind::Write, BdevError::NoSpace) });
        let r = parse_rule(r#"{"error":"eio","fraction":0.5,"count":10,"seed":7}"#).unwrap();
        assert_eq!(
            (r.ops, r.error, r.fraction, r.count, r.seed),
            (OpKind::Any, Some(BdevError::Io("EIO".into())), Some(0.5), Some(10), Some(7))
        );
        let r = parse_rule(r#"{"op":"flush","delay_ms":2.5}"#).unwrap();
        assert_eq!(r.delay, Some(Duration::from_micros(2500)));
        assert_eq!(parse_rule(r#"{"op":"read","error":{"io":"medium error"}}"#).unwrap().error, Some(BdevError::Io("medium error".into())));
        assert_eq!(parse_rule(r#"{"op":"write_zeroes","error":"enospc"}"#).unwrap().ops, OpKind::WriteZeroes);
        assert!(parse_rule(r#"{"op":"read","drop":true}"#).unwrap().drop);

        for bad in [
            r#"{"op":"write"}"#,
            r#"{"op":"wrte","error":"eio"}"#,
            r#"{"error":"eio","fraction":1.5}"#,
            r#"{"error":"eio","len":0}"#,
            r#"{"error":"eio","colour":"red"}"#,
            r#"{"op":"flush","error":"eio","offset":0}"#,
            r#"{"drop":true,"error":"eio"}"#,
            r#"{"error":"eio","delay_ms":-1}"#,
            r#"{"error":"bogus"}"#,
            "not json",
        ] {
            assert!(parse_rule(bad).is_err(), "{bad} parsed");
        }

        let rules = parse_rules(r#"[{"op":"read","error":"fenced"},{"op":"write","error":"transition","after":1}]"#).unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(parse_rules(r#"{"error":"eio"}"#).unwrap().len(), 1);
        assert!(parse_rules(r#"[{"error":"eio"},{"op":"read"}]"#).is_err());

        // What the rules say about themselves reads back the same.
        for r in rules.iter().chain(&[
            parse_rule(r#"{"op":"write","error":"nospace","offset":0,"len":1048576,"after":3,"delay_ms":5}"#).unwrap(),
            parse_rule(r#"{"error":{"io":"x"},"fraction":0.25,"seed":1,"count":2}"#).unwrap(),
        ]) {
            assert_eq!(&parse_rule(&serde_json::to_string(r).unwrap()).unwrap(), r);
        }
        assert!(ErrorControl::new().set(vec![FaultRule::default()]).is_err());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]
        /// Whatever the mix of faults, every command not dropped completes exactly once and
        /// `outstanding` counts exactly those that have not.
        #[test]
        fn every_command_completes_once_and_outstanding_tells_the_truth(
            ops in proptest::collection::vec((0u8..4, 0u64..16), 1..40),
            delay_us in 0u64..500,
            fail_fraction in 0.0f64..1.0,
            drops in 0u64..3,
        ) {
            let dev = device();
            dev.control().set(vec![
                FaultRule { ops: OpKind::Write, drop: true, count: Some(drops), ..FaultRule::default() },
                FaultRule { fraction: Some(fail_fraction), ..FaultRule::fail(OpKind::Read, BdevError::Io("EIO".into())) },
                FaultRule { delay: Some(Duration::from_micros(delay_us)), fraction: Some(0.5), ..FaultRule::default() },
            ]).unwrap();
            let mut ch = dev.clone().channel().unwrap();
            for (tag, &(kind, block)) in ops.iter().enumerate() {
                let op = match kind {
                    0 => read(block * 512),
                    1 => write(block * 512),
                    2 => BdevOp::Flush,
                    _ => BdevOp::WriteZeroes { offset: block * 512, len: 512 },
                };
                ch.submit(tag as u64, op);
            }
            let mut done = Vec::new();
            let start = Instant::now();
            let dropped = || dev.control().stats().dropped as usize;
            while done.len() + dropped() < ops.len() {
                proptest::prop_assert!(start.elapsed() < Duration::from_secs(10), "commands never completed");
                ch.poll(&mut done);
                proptest::prop_assert_eq!(ch.outstanding(), ops.len() - done.len());
            }
            let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
            tags.sort_unstable();
            tags.dedup();
            proptest::prop_assert_eq!(tags.len(), done.len());
            proptest::prop_assert_eq!(ch.outstanding(), dropped());
        }
    }
}
