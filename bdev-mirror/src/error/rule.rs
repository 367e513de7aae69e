//! What a fault rule is: the commands it selects ([`OpKind`], a byte range), when it fires and
//! what it injects ([`FaultRule`]), its checks ([`FaultRule::validate`]) and its JSON form
//! ([`parse_rule`], [`parse_rules`]).

use crate::{BdevError, BdevOp};
use serde::{Deserialize, Serialize};
use std::time::Duration;

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
