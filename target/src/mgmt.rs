//! The management socket: JSON-RPC 2.0 over a local Unix socket (mode 0600), one request per
//! line. Method names and shapes follow SPDK's where SPDK has the same thing.
//!
//! * `nvmetro_status`: subsystems, namespaces, ANA state per listener, mirror state.
//! * `bdev_get_bdevs`: bdevs with block size, block count and replication state.
//! * `nvmf_get_subsystems`: subsystems with listeners, hosts and namespaces.
//! * `nvmf_subsystem_listener_set_ana_state`: set a listener's ANA state (SPDK's parameters).
//! * `mirror_resync`, `mirror_failback`, `mirror_promote`, `mirror_switchover`, `nvmetro_reload`:
//!   see each function.
//! * `nvmetro_events`: the connection becomes an event stream ([`crate::events`]): the current
//!   state as `exists` events, then every change, one JSON object per line, until it closes.
//! * `dr_status`: DR groups streamed from here (mode, recovery point, full copy) and DR replicas
//!   applied here; `dr_promote` (`group`, `force`): see [`dr_promote`]; `dr_test` (`group`,
//!   `action`: `start` or `stop`): see [`dr_test`].
//! * `bdev_error_inject` (`name`, `rules`: one fault rule or an array, replacing the rules),
//!   `bdev_error_clear` (`name`) and `bdev_error_stats` (`name`: rules, their counters, faults
//!   injected) for error bdevs (SPDK's `bdev_error_inject_error`, with nvmetro's rules).

use crate::Target;
use nvmetro_bdev::mirror::driver::StatusReport;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

/// Binds the socket (replacing a stale one), mode 0600. Bound before the target starts, so that
/// it answers as soon as the NVMe listeners do.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(std::io::ErrorKind::AddrInUse, format!("{}: another target is running", path.display())));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves the bound socket from a thread.
pub fn serve(listener: UnixListener, target: Arc<Target>) -> std::io::Result<()> {
    crate::events::watch(target.clone())?;
    std::thread::Builder::new().name("mgmt".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let target = target.clone();
            std::thread::spawn(move || handle(conn, &target));
        }
    })?;
    Ok(())
}

fn handle(conn: UnixStream, target: &Target) {
    let Ok(mut out) = conn.try_clone() else { return };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Value>(&line) {
            Ok(req) => {
                let id = req.get("id").cloned().unwrap_or(Value::Null);
                let params = req.get("params").cloned().unwrap_or(Value::Null);
                match req.get("method").and_then(Value::as_str) {
                    Some("nvmetro_events") => return stream_events(out, target),
                    Some(m) => match call(target, m, &params) {
                        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
                        Err((code, message)) => json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}}),
                    },
                    None => json!({"jsonrpc": "2.0", "id": id, "error": {"code": -32600, "message": "request without a method"}}),
                }
            }
            Err(e) => json!({"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": format!("parse error: {e}")}}),
        };
        if writeln!(out, "{reply}").is_err() {
            return;
        }
    }
}

/// Writes the event stream to `out` until the subscriber goes away or the target stops.
fn stream_events(mut out: UnixStream, target: &Target) {
    // A subscriber that stops reading is dropped, not waited for.
    let _ = out.set_write_timeout(Some(std::time::Duration::from_secs(10)));
    let (exists, mut next) = target.events.current();
    for e in exists {
        if writeln!(out, "{e}").is_err() {
            return;
        }
    }
    while !target.stopping() {
        let (events, n) = target.events.since(next, std::time::Duration::from_millis(500));
        next = n;
        for e in events {
            if writeln!(out, "{e}").is_err() {
                return;
            }
        }
    }
}

/// DR groups streamed from here and DR replicas applied here.
pub fn dr_json(t: &Target) -> Value {
    let groups: Vec<Value> = t
        .dr_groups
        .load()
        .iter()
        .map(|g| {
            let s = g.status();
            let copy = (s.copy_total_bytes > 0).then(|| {
                let left = s.copy_total_bytes.saturating_sub(s.copy_done_bytes);
                json!({"done_bytes": s.copy_done_bytes, "total_bytes": s.copy_total_bytes,
                       "percent": 100.0 * s.copy_done_bytes as f64 / s.copy_total_bytes as f64,
                       "bytes_per_second": s.copy_bytes_per_second,
                       "eta_seconds": (s.copy_bytes_per_second > 0).then(|| left / s.copy_bytes_per_second)})
            });
            json!({"name": s.name, "members": s.members, "mode": s.mode, "dr_site": s.dr_site, "connected": s.connected,
                   "state": s.state, "behind_writes": s.behind_writes, "behind_bytes": s.behind_bytes, "behind_ms": s.behind_ms,
                   "buffered_bytes": s.buffered_bytes, "buffer_limit": s.buffer_limit,
                   "journal_bytes": s.journal_bytes, "journal_limit": s.journal_limit, "overflows": s.overflows,
                   "last_copy": {"read_bytes": s.last_copy_read_bytes, "sent_bytes": s.last_copy_sent_bytes}, "rpo_target_ms": s.rpo_target_ms,
                   "rpo_alarm": s.rpo_alarm, "rpo_alarms": s.rpo_alarms, "copy": copy,
                   "acked_seq": s.acked_seq, "numbered_seq": s.numbered_seq})
        })
        .collect();
    let replicas: Vec<Value> = t
        .dr_replicas
        .load()
        .iter()
        .map(|r| {
            let s = r.status();
            json!({"name": s.name, "members": s.members, "listen": s.listen, "connected": s.connected, "applied_seq": s.applied_seq,
                   "consistent": s.consistent, "failed": s.failed, "refused_connections": s.refused_connections,
                   "last_applied_ms_ago": s.last_applied_ago_ms, "promoted": s.promoted,
                   "test_view": s.test_view_since.map(|since| json!({"since_seq": since, "held_bytes": s.test_view_held_bytes})),
                   "last_consistent": s.rollback_since.map(|since| json!({"since_seq": since, "kept_bytes": s.rollback_bytes}))})
        })
        .collect();
    json!({"groups": groups, "replicas": replicas})
}

pub fn mirror_json(m: &StatusReport) -> Value {
    json!({
        "role": m.role, "disk": m.disk, "peer_disk": m.peer_disk, "link": m.link, "serving": m.serving,
        "peer": m.peer, "out_of_sync_bytes": m.out_of_sync_bytes, "sync_percent": m.sync_percent(),
        "sync_bytes_per_second": m.sync_bytes_per_second, "eta_seconds": m.eta_seconds(),
        "replication_rtt_us": m.replication_rtt_us, "access": m.access,
        "lanes_up": m.lanes_up, "lanes": m.lanes_wanted, "lanes_on_reactors": m.lanes_on_reactors,
        "frames_sent_by_reactors": m.frames_sent_by_reactors, "link_ups": m.link_ups,
        "last_link_down": m.last_link_down.as_ref().map(|(why, ago)| json!({"why": why, "seconds_ago": ago})),
        "failure": m.failure, "peer_failure": m.peer_failure,
        "metro": m.metro.as_ref().map(|x| json!({
            "witness_reachable": x.witness_reachable, "witness_seen_ms_ago": x.witness_seen_ms_ago,
            "witness_rtt_us": m.witness_rtt_us,
            "witness_authority": format!("{:x}", x.witness_authority), "witness_holder_site": x.witness_holder,
            "quorum": x.quorum, "lease": x.lease, "why": x.why, "pre_election": x.pre_elected, "failback_pending": x.failback_pending,
        })),
    })
}

/// SPDK's `nvmf_subsystem_listener_set_ana_state`: params `nqn`, `listen_address` (`traddr`,
/// `trsvcid`), `ana_state` (`optimized`, `non_optimized`, `inaccessible`, `persistent_loss`) and
/// optionally `anagrpid` (default: every group). A fenced mirror leg stays inaccessible.
fn set_ana_state(t: &Target, p: &Value) -> Result<Value, (i64, String)> {
    let bad = |m: &str| (-32602, m.to_string());
    let nqn = p["nqn"].as_str().ok_or_else(|| bad("missing nqn"))?;
    let subsystem = t.subsystem(nqn).ok_or_else(|| bad("no such subsystem"))?;
    let la = &p["listen_address"];
    let (addr, port) = (la["traddr"].as_str().unwrap_or(""), la["trsvcid"].as_str().unwrap_or(""));
    let listener = t
        .listeners()
        .into_iter()
        .filter(|(_, l)| l.is_some())
        .map(|(a, _)| a)
        .find(|a| a.ip().to_string() == addr && a.port().to_string() == port)
        .ok_or_else(|| bad("no listener at that listen_address"))?;
    let state = p["ana_state"].as_str().and_then(nvmetro_proto::subsystem::AnaState::parse).ok_or_else(|| bad("bad ana_state"))?;
    let groups: Vec<u32> = match p["anagrpid"].as_u64() {
        Some(g) => vec![g as u32],
        None => (1..=subsystem.config().ana_groups).collect(),
    };
    for g in groups {
        t.override_ana(nqn, listener, g, state);
    }
    t.refresh_ana();
    Ok(Value::Bool(true))
}

/// `mirror_failback`, params `name` (a mirror bdev): a leg held after its resync (manual
/// failback) serves again. Returns whether it was held.
fn failback(t: &Target, p: &Value) -> Result<Value, (i64, String)> {
    let name = p["name"].as_str().ok_or((-32602, "missing name".to_string()))?;
    let live = t.live_bdevs();
    let bdev = live.iter().map(|(_, b)| b).find(|b| b.info().name == name).ok_or((-32602, format!("no bdev {name}")))?;
    if bdev.mirror_status().is_none() {
        return Err((-32602, format!("{name} is not a mirror")));
    }
    Ok(Value::Bool(bdev.failback()))
}

/// `mirror_promote`, params `name`, `force` (must be true): the operator makes a metro leg serve
/// alone while its peer and the witness are both lost. Returns what happened; a refusal is an
/// error that says why.
fn promote(t: &Target, p: &Value) -> Result<Value, (i64, String)> {
    let name = p["name"].as_str().ok_or((-32602, "missing name".to_string()))?;
    if p["force"] != Value::Bool(true) {
        return Err((-32602, "a promotion is only ever forced (`force`: true): the witness decides otherwise".into()));
    }
    let live = t.live_bdevs();
    let bdev = live.iter().map(|(_, b)| b).find(|b| b.info().name == name).ok_or((-32602, format!("no bdev {name}")))?;
    let mirror = bdev.as_mirror().ok_or((-32602, format!("{name} is not a mirror")))?;
    mirror.force_promote().map(Value::String).map_err(|why| (-32000, format!("{name}: refused: {why}")))
}

/// `mirror_switchover`, params `name`: planned switchover of a metro mirror, run at the site that
/// orders writes: ordering and the hosts' Optimized paths move to the peer, no host I/O fails.
/// Returns what happened once the peer orders; a refusal (or a switchover that could not
/// complete) is an error that says why.
fn switchover(t: &Target, p: &Value) -> Result<Value, (i64, String)> {
    let name = p["name"].as_str().ok_or((-32602, "missing name".to_string()))?;
    let live = t.live_bdevs();
    let bdev = live.iter().map(|(_, b)| b).find(|b| b.info().name == name).ok_or((-32602, format!("no bdev {name}")))?;
    let mirror = bdev.as_mirror().ok_or((-32602, format!("{name} is not a mirror")))?;
    let outcome = mirror.switchover().map(Value::String).map_err(|why| (-32000, format!("{name}: switchover refused: {why}")));
    // Hosts see the new paths now rather than at the next refresh.
    t.refresh_ana();
    outcome
}

/// The DR replica of `group` at this site.
fn dr_replica(t: &Target, group: &str, hint: &str) -> Result<Arc<nvmetro_bdev::dr::replica::DrReplica>, (i64, String)> {
    t.dr_replicas
        .load()
        .iter()
        .find(|r| r.status().name == group)
        .cloned()
        .ok_or((-32602, format!("no DR replica {group} at this site ({hint})")))
}

/// `dr_test`, params `group`, `action` (`start` or `stop`): at the DR site, opens a writable
/// point-in-time view of the group's image for hosts here while the stream keeps being applied,
/// or discards it.
fn dr_test(t: &Target, p: &Value) -> Result<Value, (i64, String)> {
    let group = p["group"].as_str().ok_or((-32602, "missing group".to_string()))?;
    let open = match p["action"].as_str() {
        Some("start") => true,
        Some("stop") => false,
        _ => return Err((-32602, "action is `start` or `stop`".to_string())),
    };
    let r = dr_replica(t, group, "a DR test runs at the DR site")?;
    let outcome = r.test_view(open).map(Value::String).map_err(|why| (-32000, format!("{group}: {why}")));
    t.refresh_ana();
    outcome
}

/// `dr_promote`, params `group`, `force`: at the DR site, the group's image serves hosts
/// read-write and the stream is refused from then on. Refused without `force` while the
/// production site streams here or the image is not consistent.
fn dr_promote(t: &Target, p: &Value) -> Result<Value, (i64, String)> {
    let group = p["group"].as_str().ok_or((-32602, "missing group".to_string()))?;
    let force = p["force"].as_bool().unwrap_or(false);
    let r = dr_replica(t, group, "promote at the DR site")?;
    let outcome = r.promote(force).map(Value::String).map_err(|why| (-32000, format!("{group}: {why}")));
    // Hosts see the namespaces become accessible now rather than at the next refresh.
    t.refresh_ana();
    outcome
}

/// `mirror_resync`, params `name`: a leg whose device failed retries its resync now. Returns
/// whether the leg was Failed.
fn resync(t: &Target, p: &Value) -> Result<Value, (i64, String)> {
    let name = p["name"].as_str().ok_or((-32602, "missing name".to_string()))?;
    let live = t.live_bdevs();
    let bdev = live.iter().map(|(_, b)| b).find(|b| b.info().name == name).ok_or((-32602, format!("no bdev {name}")))?;
    let mirror = bdev.as_mirror().ok_or((-32602, format!("{name} is not a mirror")))?;
    Ok(Value::Bool(mirror.resync()))
}

/// The error bdev `params.name` names.
fn error_bdev(t: &Target, p: &Value) -> Result<(String, Arc<dyn nvmetro_bdev::Bdev>), (i64, String)> {
    let name = p["name"].as_str().ok_or((-32602, "missing name".to_string()))?;
    let live = t.live_bdevs();
    let bdev = live.into_iter().map(|(_, b)| b).find(|b| b.info().name == name).ok_or((-32602, format!("no bdev {name}")))?;
    if bdev.as_error().is_none() {
        return Err((-32602, format!("{name} is not an error bdev (kind = \"error\")")));
    }
    Ok((name.to_string(), bdev))
}

/// What an error bdev injects: its rules with their counters, and the faults so far.
pub fn error_json(e: &nvmetro_bdev::error::ErrorBdev) -> Value {
    let c = e.control();
    let rules: Vec<Value> =
        c.rules().iter().zip(c.rule_stats()).map(|(r, st)| json!({"rule": r, "matched": st.matched, "fired": st.fired})).collect();
    json!({"base": e.inner().info().name, "rules": rules, "injected": c.stats()})
}

/// `bdev_error_inject`: params `name` and `rules` (a rule object or an array of them, as JSON or
/// as a string of JSON); replaces the device's rules. Returns the new state.
fn error_inject(t: &Target, p: &Value) -> Result<Value, (i64, String)> {
    let (name, bdev) = error_bdev(t, p)?;
    let text = match &p["rules"] {
        Value::Null => return Err((-32602, "missing rules".into())),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    let rules = nvmetro_bdev::error::parse_rules(&text).map_err(|e| (-32602, e.to_string()))?;
    let e = bdev.as_error().expect("checked");
    e.control().set(rules.clone()).map_err(|e| (-32602, e.to_string()))?;
    tracing::warn!(bdev = %name, ?rules, "error injection: rules set");
    Ok(error_json(e))
}

fn call(t: &Target, method: &str, params: &Value) -> Result<Value, (i64, String)> {
    match method {
        "bdev_error_inject" => return error_inject(t, params),
        "bdev_error_clear" => {
            let (name, bdev) = error_bdev(t, params)?;
            let e = bdev.as_error().expect("checked");
            e.control().clear();
            tracing::warn!(bdev = %name, "error injection: rules cleared");
            return Ok(error_json(e));
        }
        "bdev_error_stats" => {
            let (_, bdev) = error_bdev(t, params)?;
            return Ok(error_json(bdev.as_error().expect("checked")));
        }
        "mirror_resync" => return resync(t, params),
        "nvmf_subsystem_listener_set_ana_state" => return set_ana_state(t, params),
        "mirror_failback" => return failback(t, params),
        "mirror_promote" => return promote(t, params),
        "mirror_switchover" => return switchover(t, params),
        "nvmetro_reload" => {
            let dry_run = params["dry_run"].as_bool().unwrap_or(false);
            let candidate = params["config"].as_str().map(std::path::Path::new);
            return match crate::reload::reload_from(t, dry_run, candidate) {
                Ok(o) => Ok(json!({"applied": o.applied, "dry_run": dry_run, "changes": o.changes})),
                Err(e) => Err((-32000, e.to_string())),
            };
        }
        _ => {}
    }
    Ok(match method {
        "nvmetro_status" => {
            let listeners = t.listeners();
            let subsystems: Vec<Value> = t
                .subsystems()
                .iter()
                .map(|s| {
                    let namespaces: Vec<Value> = s
                        .namespaces()
                        .iter()
                        .map(|ns| {
                            let bdev = t.bdev(ns.bdev);
                            let ana: serde_json::Map<String, Value> = listeners
                                .iter()
                                .enumerate()
                                .filter(|(_, (_, l))| l.is_some())
                                .map(|(i, (a, _))| (a.to_string(), json!(s.view(i).ana_state(ns.info.ana_group).name())))
                                .collect();
                            json!({"nsid": ns.info.nsid, "bdev": bdev.info().name, "ana_group": ns.info.ana_group, "ana": ana,
                                   "serving": bdev.serving(), "mirror": bdev.mirror_status().map(|m| mirror_json(&m))})
                        })
                        .collect();
                    json!({"nqn": s.config().nqn, "controllers": s.controller_count(), "namespaces": namespaces})
                })
                .collect();
            json!({"version": env!("CARGO_PKG_VERSION"), "uptime_ms": t.now_ms(), "subsystems": subsystems, "dr": dr_json(t)})
        }
        "dr_status" => dr_json(t),
        "dr_promote" => return dr_promote(t, params),
        "dr_test" => return dr_test(t, params),
        "bdev_get_bdevs" => Value::Array(
            t.live_bdevs()
                .iter()
                .map(|(_, b)| {
                    let i = b.info();
                    json!({"name": i.name, "block_size": i.block_size, "num_blocks": i.blocks, "volatile_cache": i.volatile_cache,
                           "mirror": b.mirror_status().map(|m| mirror_json(&m)), "error": b.as_error().map(error_json)})
                })
                .collect(),
        ),
        "nvmf_get_subsystems" => Value::Array(
            t.subsystems()
                .iter()
                .map(|s| {
                    let c = s.config();
                    json!({
                        "nqn": c.nqn, "subtype": "NVMe", "serial_number": c.serial, "model_number": c.model,
                        "allow_any_host": c.allow_any_host,
                        "hosts": c.allowed_hosts.iter().map(|h| json!({"nqn": h})).collect::<Vec<_>>(),
                        "listen_addresses": t.config().listeners.iter().map(|l| json!({"trtype": "TCP", "adrfam": if l.address.is_ipv4() { "IPv4" } else { "IPv6" },
                            "traddr": l.address.ip().to_string(), "trsvcid": l.address.port().to_string()})).collect::<Vec<_>>(),
                        "namespaces": s.namespaces().iter().map(|n| json!({"nsid": n.info.nsid, "bdev_name": t.bdev(n.bdev).info().name,
                            "nguid": n.info.nguid.iter().map(|b| format!("{b:02X}")).collect::<String>(), "anagrpid": n.info.ana_group})).collect::<Vec<_>>(),
                    })
                })
                .collect(),
        ),
        _ => return Err((-32601, format!("no method {method}"))),
    })
}
