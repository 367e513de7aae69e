//! The event stream (`nvmetro events`, DRBD's `drbdsetup events2`): the changes of the state an
//! operator watches, as one JSON object per line. The state is compared every [`WATCH_INTERVAL`],
//! as often as a mirror publishes its status, so a state that lasts less may not show.
//!
//! A watcher thread looks at the target every [`WATCH_INTERVAL`] (the mirrors publish their
//! status as often) and records each difference from the last look as an event: mirror disk,
//! peer disk, link, access, role and failure; the witness reachable or not; resync start, each
//! tenth of its progress and end; ANA state per subsystem, listener and group (old and new);
//! controllers per host (connects and disconnects); applied reloads (with what they changed).
//! A subscriber first gets the current state as `exists` events, then every `change` as it is
//! recorded. The last [`KEEP`] events stay for subscribers that fall behind.

use crate::Target;
use serde_json::{json, Value};
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How often the watcher compares the target's state with its last look.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(100);
/// Events kept for subscribers.
pub const KEEP: usize = 4096;

/// (event type, object) -> state, as the watcher last saw it.
type Snapshot = BTreeMap<(&'static str, String), String>;

#[derive(Default)]
pub struct EventLog {
    inner: Mutex<Inner>,
    grew: Condvar,
}

#[derive(Default)]
struct Inner {
    /// The sequence number the next event gets (the first is 1).
    next: u64,
    recent: VecDeque<Value>,
    last: Snapshot,
}

impl std::fmt::Debug for EventLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventLog")
    }
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn event(seq: u64, change: &str, kind: &str, object: &str, old: Option<&str>, new: &str, detail: Value) -> Value {
    let mut e = json!({"seq": seq, "time": now(), "change": change, "type": kind, "object": object, "old": old, "new": new});
    if !detail.is_null() {
        e["detail"] = detail;
    }
    e
}

impl EventLog {
    /// Records an event that no snapshot shows (a reload).
    pub fn push(&self, kind: &str, object: &str, new: &str, detail: Value) {
        let Ok(mut g) = self.inner.lock() else { return };
        g.record(event(0, "change", kind, object, None, new, detail));
        self.grew.notify_all();
    }

    /// Compares `now` with the last look; records each difference.
    fn observe(&self, now: Snapshot) {
        let Ok(mut g) = self.inner.lock() else { return };
        let mut changed = false;
        let last = std::mem::take(&mut g.last);
        for (key, new) in &now {
            if last.get(key) != Some(new) {
                g.record(event(0, "change", key.0, &key.1, last.get(key).map(String::as_str), new, Value::Null));
                changed = true;
            }
        }
        for (key, old) in &last {
            if !now.contains_key(key) {
                g.record(event(0, "change", key.0, &key.1, Some(old), "none", Value::Null));
                changed = true;
            }
        }
        g.last = now;
        if changed {
            self.grew.notify_all();
        }
    }

    /// The state as `exists` events, and the sequence number of the next change.
    pub fn current(&self) -> (Vec<Value>, u64) {
        let Ok(g) = self.inner.lock() else { return (Vec::new(), 1) };
        let events = g.last.iter().map(|(k, v)| event(0, "exists", k.0, &k.1, None, v, Value::Null)).collect();
        (events, g.next.max(1))
    }

    /// Events from sequence `from` on, waiting up to `wait` for one; and the next to ask for.
    /// A subscriber that fell more than [`KEEP`] behind gets a `lost` event saying how many.
    pub fn since(&self, from: u64, wait: Duration) -> (Vec<Value>, u64) {
        let Ok(mut g) = self.inner.lock() else { return (Vec::new(), from) };
        if g.next <= from {
            g = match self.grew.wait_timeout(g, wait) {
                Ok((g, _)) => g,
                Err(_) => return (Vec::new(), from),
            };
        }
        let first = g.recent.front().and_then(|e| e["seq"].as_u64()).unwrap_or(g.next);
        let mut out = Vec::new();
        if from < first && g.next > from {
            out.push(json!({"seq": first - 1, "time": now(), "change": "lost", "type": "events", "object": "", "old": null, "new": format!("{} events", first - from)}));
        }
        out.extend(g.recent.iter().filter(|e| e["seq"].as_u64().is_some_and(|s| s >= from)).cloned());
        (out, g.next.max(from))
    }
}

impl Inner {
    fn record(&mut self, mut e: Value) {
        self.next = self.next.max(1);
        e["seq"] = json!(self.next);
        self.next += 1;
        tracing::debug!(event = %e, "event");
        self.recent.push_back(e);
        if self.recent.len() > KEEP {
            self.recent.pop_front();
        }
    }
}

/// What an operator watches, now.
fn snapshot(t: &Target) -> Snapshot {
    let mut s = Snapshot::new();
    for a in t.ana_groups() {
        s.insert(("ana", format!("{} {} group {}", a.subsystem.config().nqn, a.address, a.group)), a.state.name().to_string());
    }
    for sub in t.subsystems().iter() {
        let nqn = &sub.config().nqn;
        for (host, n) in sub.controllers_by_host() {
            s.insert(("controllers", format!("{nqn} {host}")), n.to_string());
        }
    }
    for (_, b) in t.live_bdevs() {
        let Some(m) = b.mirror_status() else { continue };
        let name = b.info().name.clone();
        s.insert(("mirror-disk", name.clone()), m.disk.clone());
        s.insert(("mirror-peer-disk", name.clone()), m.peer_disk.clone());
        s.insert(("mirror-link", name.clone()), m.link.clone());
        s.insert(("mirror-access", name.clone()), m.access.clone());
        s.insert(("mirror-role", name.clone()), m.role.clone());
        s.insert(
            ("mirror-failure", name.clone()),
            m.failure.clone().map_or("none".into(), |f| f.split(',').next().unwrap_or_default().to_string()),
        );
        if let Some(x) = &m.metro {
            s.insert(("witness", name.clone()), if x.witness_reachable { "reachable" } else { "unreachable" }.into());
        }
        let syncing = m.link.starts_with("Sync");
        s.insert(("resync", name.clone()), if syncing { "running" } else { "idle" }.into());
        if let Some(p) = m.sync_percent().filter(|_| syncing) {
            s.insert(("resync-progress", name), format!("{}%", (p / 10.0).floor() as u64 * 10));
        }
    }
    s
}

/// Starts the watcher thread (it ends when the target stops).
pub fn watch(t: Arc<Target>) -> std::io::Result<()> {
    std::thread::Builder::new().name("events".into()).spawn(move || {
        while !t.stopping() {
            t.events.observe(snapshot(&t));
            std::thread::sleep(WATCH_INTERVAL);
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(pairs: &[(&'static str, &str, &str)]) -> Snapshot {
        pairs.iter().map(|(k, o, v)| ((*k, o.to_string()), v.to_string())).collect()
    }

    #[test]
    fn differences_become_events_in_order_and_a_late_subscriber_learns_what_it_lost() {
        let log = EventLog::default();
        log.observe(snap(&[("mirror-link", "m", "Connected"), ("controllers", "s h", "1")]));
        let (exists, next) = log.current();
        assert_eq!(exists.len(), 2);
        assert!(exists.iter().all(|e| e["change"] == "exists"));
        log.observe(snap(&[("mirror-link", "m", "Disconnected")]));
        let (events, after) = log.since(next, Duration::ZERO);
        let got: Vec<(String, String, Value, String)> = events
            .iter()
            .map(|e| {
                (
                    e["type"].as_str().unwrap().into(),
                    e["object"].as_str().unwrap().into(),
                    e["old"].clone(),
                    e["new"].as_str().unwrap().into(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("mirror-link".into(), "m".into(), json!("Connected"), "Disconnected".into()),
                ("controllers".into(), "s h".into(), json!("1"), "none".into())
            ]
        );
        assert_eq!(log.since(after, Duration::ZERO).0, Vec::<Value>::new(), "nothing new");
        for i in 0..KEEP + 10 {
            log.push("reload", "config", &i.to_string(), Value::Null);
        }
        let (events, _) = log.since(after, Duration::ZERO);
        assert_eq!(events[0]["change"], "lost", "{}", events[0]);
        assert_eq!(events.len(), KEEP + 1);
    }
}
