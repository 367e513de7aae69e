//! Reload (SIGHUP, `nvmetro reload`, RPC `nvmetro_reload`): read the config file again, validate
//! all of it, compute what differs from the running target, and apply only that, live, the way
//! `drbdadm adjust` does. Connections and I/O that a change does not concern are not touched.
//!
//! The plan is computed first ([`plan`]); a dry run stops there. Applying goes in an order that
//! keeps every step safe for running I/O:
//! 1. everything that can fail is prepared first (new bdevs opened, new listeners bound); a
//!    failure there changes nothing;
//! 2. new bdevs join the bdev table, new listener slots get views in every subsystem;
//! 3. the config, then each subsystem's settings and namespace table are swapped (arc-swap):
//!    new commands for a removed namespace fail with *Invalid Namespace*, those already at the
//!    bdev complete (the namespace drains before its bdev is released), connected hosts get the
//!    namespace-attribute and ANA change notices, and added namespaces appear;
//! 4. removed listeners stop accepting; removed bdevs are released once drained; ANA states,
//!    host sites and the discovery log follow the new config.
//!
//! DR groups and replicas (`dr`) are started in step 1 and serve in their members' places in
//! step 2; those removed stop in step 4, after their namespaces drained.
//!
//! What cannot change live is refused up front (the whole reload is then refused, with the
//! reason), so a reload is all or nothing.

mod dr;

use crate::subsys::{Namespace, Subsystem};
use crate::Target;
use nvmetro_bdev::Bdev;
use nvmetro_conf::{BdevConfig, BdevKind, Config, SubsystemConfig};
use serde_json::json;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a reload would do.
#[derive(Debug, Default)]
pub struct Plan {
    /// One line per change, for operators.
    pub changes: Vec<String>,
    /// Changes that cannot be made live; any of them refuses the reload.
    pub refused: Vec<String>,
    new_bdevs: Vec<BdevConfig>,
    removed_bdevs: Vec<String>,
    tunings: Vec<(String, nvmetro_conf::MirrorConfig)>,
    /// DR groups whose mode or limits changed.
    dr_tunings: Vec<nvmetro_conf::DrGroupConfig>,
    added_dr_groups: Vec<nvmetro_conf::DrGroupConfig>,
    removed_dr_groups: Vec<String>,
    added_dr_replicas: Vec<nvmetro_conf::DrReplicaConfig>,
    removed_dr_replicas: Vec<String>,
    /// The running config's DR tables (the members of what is removed).
    old_dr: (Vec<nvmetro_conf::DrGroupConfig>, Vec<nvmetro_conf::DrReplicaConfig>),
    /// Error bdevs whose configured fault rules changed (JSON; `None`: none).
    fault_rules: Vec<(String, Option<String>)>,
    added_listeners: Vec<nvmetro_conf::ListenerConfig>,
    removed_listeners: Vec<std::net::SocketAddr>,
    added_subsystems: Vec<SubsystemConfig>,
    removed_subsystems: Vec<String>,
    changed_subsystems: Vec<SubsystemConfig>,
    poll_mode: Option<nvmetro_conf::PollMode>,
    sites_changed: bool,
}

/// The outcome reported to operators.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub changes: Vec<String>,
    pub applied: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("the target runs the built-in default config: there is no file to reload")]
    NoFile,
    /// The file is invalid: nothing changed.
    #[error("{0}")]
    Invalid(#[from] nvmetro_conf::ConfigError),
    #[error("cannot be changed without a restart (nothing was changed): {}", .0.join("; "))]
    Refused(Vec<String>),
    #[error("applying failed before anything changed: {0}")]
    Prepare(String),
    #[error("another reload is running")]
    Busy,
    #[error("{0} is not the file the target runs with ({1}): preview it with --dry-run, or edit that file and reload")]
    NotTheRunningFile(String, String),
}

fn describe_ns(n: &nvmetro_conf::NamespaceConfig) -> String {
    format!("NSID {} on bdev {}", n.nsid, n.bdev)
}

/// Compares the running config with `new`.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let mut p = Plan::default();
    if old.cores != new.cores {
        p.refused.push(format!("target.cores {:?} -> {:?} (reactors are pinned threads)", old.cores, new.cores));
    }
    if old.socket != new.socket {
        p.refused.push("target.socket (the management socket this reload came through)".into());
    }
    if old.metrics != new.metrics {
        p.refused.push("metrics.address".into());
    }
    if (old.in_capsule_data_size, old.max_h2c_data_size) != (new.in_capsule_data_size, new.max_h2c_data_size) {
        p.refused
            .push("target.in_capsule_data_size / max_h2c_data_size (hosts size their commands by what they were told at connect)".into());
    }
    if old.rdma_zero_copy != new.rdma_zero_copy {
        let onoff = |b: bool| if b { "on" } else { "off" };
        p.changes.push(format!(
            "NVMe/RDMA zero copy {} -> {} (for queue pairs that connect from now on)",
            onoff(old.rdma_zero_copy),
            onoff(new.rdma_zero_copy)
        ));
    }
    if old.discovery != new.discovery {
        p.refused.push("target.discovery listeners".into());
    }
    dr::dr_changes(old, new, &mut p);
    if old.witness != new.witness {
        p.refused.push("[witness] (mirrors hold their witness for their lifetime)".into());
    }
    if old.poll_mode != new.poll_mode {
        p.changes.push(format!("poll mode {:?} -> {:?}", old.poll_mode, new.poll_mode));
        p.poll_mode = Some(new.poll_mode);
    }
    if old.site != new.site || old.host_sites != new.host_sites {
        p.sites_changed = true;
        if old.site != new.site {
            p.changes.push(format!("this target's site {:?} -> {:?}", old.site, new.site));
        }
        for (host, site) in &new.host_sites {
            match old.host_sites.get(host) {
                None => p.changes.push(format!("host {host}: home site {site}")),
                Some(was) if was != site => p.changes.push(format!("host {host}: home site {was} -> {site}")),
                _ => {}
            }
        }
        for host in old.host_sites.keys().filter(|h| !new.host_sites.contains_key(*h)) {
            p.changes.push(format!("host {host}: no home site"));
        }
    }
    // Bdevs, by name.
    for b in &new.bdevs {
        match old.bdevs.iter().find(|o| o.name == b.name) {
            None => {
                p.changes.push(format!("add bdev {} ({:?})", b.name, b.kind));
                p.new_bdevs.push(b.clone());
            }
            Some(o) if o == b => {}
            // An error bdev's rules are replaced live, as `bdev_error_inject` does.
            Some(o)
                if matches!((&o.error, &b.error), (Some(oe), Some(ne)) if oe.base == ne.base)
                    && BdevConfig { error: b.error.clone(), ..o.clone() } == *b =>
            {
                let rules = b.error.as_ref().and_then(|e| e.rules.clone());
                p.changes.push(format!("bdev {}: fault rules {}", b.name, rules.as_deref().unwrap_or("cleared")));
                p.fault_rules.push((b.name.clone(), rules));
            }
            Some(o) => {
                // A mirror's replication settings change live; its identity (role, site,
                // addresses, metadata, leg, region size) does not.
                let tunable = match (&o.mirror, &b.mirror) {
                    (Some(om), Some(nm)) => {
                        let same_identity = nvmetro_conf::MirrorConfig {
                            resync_rate: nm.resync_rate,
                            resync_latency_target: nm.resync_latency_target,
                            link_delay_us: nm.link_delay_us,
                            heartbeat_timeout_ms: nm.heartbeat_timeout_ms,
                            manual_failback: nm.manual_failback,
                            ..om.clone()
                        } == *nm;
                        same_identity && BdevConfig { mirror: b.mirror.clone(), ..o.clone() } == *b
                    }
                    _ => false,
                };
                if let (true, Some(om), Some(nm)) = (tunable, &o.mirror, &b.mirror) {
                    let mut what = Vec::new();
                    if om.resync_rate != nm.resync_rate {
                        what.push(format!(
                            "resync rate {}",
                            if nm.resync_rate == 0 { "unlimited".into() } else { format!("{} B/s", nm.resync_rate) }
                        ));
                    }
                    if om.resync_latency_target != nm.resync_latency_target {
                        what.push(format!("resync latency target {}", nm.resync_latency_target));
                    }
                    if om.link_delay_us != nm.link_delay_us {
                        what.push(format!("link delay {} us", nm.link_delay_us));
                    }
                    if om.heartbeat_timeout_ms != nm.heartbeat_timeout_ms {
                        what.push(format!("heartbeat timeout {:?} ms", nm.heartbeat_timeout_ms));
                    }
                    if om.manual_failback != nm.manual_failback {
                        what.push(format!("failback {}", if nm.manual_failback { "manual" } else { "automatic" }));
                    }
                    p.changes.push(format!("bdev {}: {}", b.name, what.join(", ")));
                    p.tunings.push((b.name.clone(), nm.clone()));
                } else {
                    p.refused.push(format!(
                        "bdev {}: its settings changed; remove it (and its namespace), reload, then add it under a new name",
                        b.name
                    ));
                }
            }
        }
    }
    for o in old.bdevs.iter().filter(|o| !new.bdevs.iter().any(|b| b.name == o.name)) {
        if o.kind == BdevKind::Mirror {
            p.refused.push(format!("removing mirror bdev {} (its replication link runs for the target's lifetime)", o.name));
        } else if old.bdevs.iter().any(|m| m.mirror.as_ref().is_some_and(|m| m.local == o.name)) {
            p.refused.push(format!("removing bdev {}: it is a mirror's leg", o.name));
        } else {
            p.changes.push(format!("remove bdev {}", o.name));
            p.removed_bdevs.push(o.name.clone());
        }
    }
    // Listeners, by address.
    for l in &new.listeners {
        match old.listeners.iter().find(|o| o.address == l.address) {
            None if l.transport == nvmetro_conf::Transport::Rdma && !cfg!(feature = "rdma") => {
                p.refused.push(format!("adding listener {}: NVMe/RDMA needs nvmetro-tgt built with the `rdma` cargo feature", l.address));
            }
            Some(o) if o.transport != l.transport => {
                p.refused.push(format!("listener {}: its transport cannot change on reload (remove it, reload, add it back)", l.address));
            }
            None => {
                p.changes.push(format!("add listener {}", l.address));
                p.added_listeners.push(l.clone());
            }
            Some(o) if o.ana_states != l.ana_states => p.changes.push(format!("listener {}: ANA states {:?}", l.address, l.ana_states)),
            Some(_) => {}
        }
    }
    for o in old.listeners.iter().filter(|o| !new.listeners.iter().any(|l| l.address == o.address)) {
        p.changes.push(format!("remove listener {} (its connections end)", o.address));
        p.removed_listeners.push(o.address);
    }
    // Subsystems, by NQN.
    for s in &new.subsystems {
        let Some(o) = old.subsystems.iter().find(|o| o.nqn == s.nqn) else {
            p.changes.push(format!("add subsystem {} with {} namespace(s)", s.nqn, s.namespaces.len()));
            p.added_subsystems.push(s.clone());
            continue;
        };
        if o == s {
            continue;
        }
        if o.serial != s.serial || o.model != s.model {
            p.refused.push(format!("subsystem {}: serial/model (hosts identify the subsystem by them)", s.nqn));
        }
        if o.allowed_hosts != s.allowed_hosts || o.allow_any_host != s.allow_any_host {
            p.changes.push(format!(
                "subsystem {}: allowed hosts {}",
                s.nqn,
                if s.allow_any_host { "any".to_string() } else { format!("{:?}", s.allowed_hosts) }
            ));
        }
        if (o.cntlid_min, o.cntlid_max, o.max_namespaces, o.ana_transition_time)
            != (s.cntlid_min, s.cntlid_max, s.max_namespaces, s.ana_transition_time)
        {
            p.changes.push(format!("subsystem {}: controller ID range, namespace limit or ANATT", s.nqn));
        }
        for n in &s.namespaces {
            match o.namespaces.iter().find(|x| x.nsid == n.nsid) {
                None => p.changes.push(format!("subsystem {}: add {}", s.nqn, describe_ns(n))),
                Some(x) if x != n => p.changes.push(format!("subsystem {}: replace {} by {}", s.nqn, describe_ns(x), describe_ns(n))),
                _ => {}
            }
        }
        for x in o.namespaces.iter().filter(|x| !s.namespaces.iter().any(|n| n.nsid == x.nsid)) {
            p.changes.push(format!("subsystem {}: remove {} (drained first)", s.nqn, describe_ns(x)));
        }
        p.changed_subsystems.push(s.clone());
    }
    for o in old.subsystems.iter().filter(|o| !new.subsystems.iter().any(|s| s.nqn == o.nqn)) {
        p.changes.push(format!("remove subsystem {} (its namespaces drain, its controllers end)", o.nqn));
        p.removed_subsystems.push(o.nqn.clone());
    }
    p
}

/// Reads the target's config file again and applies (or, with `dry_run`, only describes) the
/// difference.
pub fn reload(t: &Target, dry_run: bool) -> Result<Outcome, ReloadError> {
    reload_from(t, dry_run, None)
}

/// As [`reload`], reading `candidate` instead of the file the target runs with: a dry run
/// previews an edited copy; applying is only from the running file.
pub fn reload_from(t: &Target, dry_run: bool, candidate: Option<&std::path::Path>) -> Result<Outcome, ReloadError> {
    let running = t.config_path.clone();
    let path = match (candidate, &running) {
        (Some(c), Some(r)) if !dry_run && !same_file(c, r) => {
            return Err(ReloadError::NotTheRunningFile(c.display().to_string(), r.display().to_string()))
        }
        (Some(c), _) if dry_run => c.to_path_buf(),
        (_, Some(r)) => r.clone(),
        (_, None) => return Err(ReloadError::NoFile),
    };
    let new = nvmetro_conf::load(&path)?;
    let _one = t.reload_lock.try_lock().map_err(|_| ReloadError::Busy)?;
    let old = t.config();
    let p = plan(&old, &new);
    if !p.refused.is_empty() {
        return Err(ReloadError::Refused(p.refused));
    }
    if dry_run || p.changes.is_empty() {
        return Ok(Outcome { changes: p.changes, applied: false });
    }
    let outcome = apply(t, p, new)?;
    t.events.push("reload", &path.display().to_string(), "applied", json!({"changes": outcome.changes}));
    Ok(outcome)
}

fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Waits until none of `namespaces` has a command at its bdev (bounded: a stuck bdev must not
/// hold the reload forever; it is then released with commands still at it, which complete
/// against the retired bdev).
fn drain(namespaces: &[Namespace]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while namespaces.iter().any(|n| n.stats.inflight.load(Ordering::Acquire) > 0) {
        if Instant::now() > deadline {
            tracing::warn!("namespaces still busy after 30 s of draining; releasing them anyway");
            return;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn apply(t: &Target, p: Plan, new: Config) -> Result<Outcome, ReloadError> {
    // 1. Prepare what can fail.
    let live: Vec<(usize, Arc<dyn Bdev>)> = t.live_bdevs();
    let mut opened: Vec<Arc<dyn Bdev>> = Vec::new();
    // Each after the bdev it is built on (which may be running already).
    let order = nvmetro_conf::dependency_order(&p.new_bdevs, |name| live.iter().any(|(_, x)| x.info().name == name));
    for b in order.iter().map(|&i| &p.new_bdevs[i]) {
        let leg_of = |name: &str| {
            opened
                .iter()
                .find(|x| x.info().name == name)
                .cloned()
                .or_else(|| live.iter().find(|(_, x)| x.info().name == name).map(|(_, x)| x.clone()))
        };
        let bdev = crate::open_bdev(b, &leg_of, new.poll_mode, new.witness.as_ref(), crate::min_anatt(&new))
            .map_err(|e| ReloadError::Prepare(format!("{e:#}")))?;
        opened.push(bdev);
    }
    let mut sockets = Vec::new();
    #[cfg(feature = "rdma")]
    let mut rdma_listeners = Vec::new();
    for l in &p.added_listeners {
        #[cfg(feature = "rdma")]
        if l.transport == nvmetro_conf::Transport::Rdma {
            rdma_listeners.push(crate::rdma::RdmaListener::bind(l.address).map_err(|e| ReloadError::Prepare(format!("{e:#}")))?);
            continue;
        }
        sockets.push((l.address, crate::bind(l.address).map_err(|e| ReloadError::Prepare(format!("{e:#}")))?));
    }
    // DR groups and replicas added: started over their members (new bdevs or unused ones).
    let added_dr = dr::start_added(&p, &opened, &live)?;
    // 2. New bdevs and listener slots.
    let reactors = t.reactors();
    if !opened.is_empty() {
        t.bdevs.rcu(|v| {
            let mut v = (**v).clone();
            v.extend(opened.iter().cloned());
            v
        });
        let n = reactors.len().max(1);
        for (i, b) in opened.iter().enumerate() {
            let main = (n - 1 + i) % n;
            let run = |r: &crate::reactor::ReactorHandle, poller: Box<dyn nvmetro_bdev::Poller>, what: &'static str| {
                r.send(Box::new(move |r| {
                    if let Err(e) = r.add_poller(poller) {
                        tracing::error!("cannot run a new bdev's {what}: {e}");
                    }
                }))
            };
            if let (Some(poller), Some(r)) = (b.take_poller(), reactors.get(main)) {
                run(r, poller, "poller");
                for (h, helper) in crate::helpers_of(b.as_ref(), reactors.len()) {
                    if let Some(r) = reactors.get(crate::helper_reactor(main, h, n)) {
                        run(r, helper, "helper poller");
                    }
                }
            }
        }
    }
    // DR members serve in their bdevs' places (no namespace served those yet).
    dr::serve_added(t, reactors, added_dr);
    for l in &p.added_listeners {
        // An address removed by an earlier reload comes back in its old slot (its views kept).
        if !t.listener_slots.load().contains(&l.address) {
            t.listener_slots.rcu(|v| {
                let mut v = (**v).clone();
                v.push(l.address);
                v
            });
            for s in t.subsystems().iter() {
                s.add_listener(l);
            }
        }
    }
    // 3. The config, then subsystems.
    t.config.store(Arc::new(new.clone()));
    for (name, rules) in &p.fault_rules {
        let rules = match rules {
            Some(json) => nvmetro_bdev::error::parse_rules(json).unwrap_or_default(), // validated with the config
            None => Vec::new(),
        };
        for (_, b) in live.iter().filter(|(_, b)| b.info().name == *name) {
            if let Some(e) = b.as_error() {
                if let Err(err) = e.control().set(rules.clone()) {
                    tracing::error!(bdev = %name, "fault rules not applied: {err}");
                }
            }
        }
    }
    let bdevs = t.bdevs();
    let slot_of = |name: &str| bdevs.iter().rposition(|b| b.info().name == name).expect("validated: every namespace's bdev exists");
    let mut retired_namespaces = Vec::new();
    for sc in &p.changed_subsystems {
        let Some(s) = t.subsystem(&sc.nqn) else { continue };
        let old_ns = s.namespaces();
        let mut changed = Vec::new();
        let namespaces: Vec<Namespace> = sc
            .namespaces
            .iter()
            .map(|n| {
                let slot = slot_of(&n.bdev);
                match old_ns.iter().find(|x| x.info.nsid == n.nsid && x.bdev == slot) {
                    Some(kept) if kept.info.nguid == n.nguid && kept.info.ana_group == n.ana_group => kept.clone(),
                    _ => {
                        changed.push(n.nsid);
                        crate::namespace(n, slot, bdevs[slot].as_ref())
                    }
                }
            })
            .collect();
        for x in old_ns.iter() {
            if !namespaces.iter().any(|n| n.info.nsid == x.info.nsid && Arc::ptr_eq(&n.stats, &x.stats)) {
                if !changed.contains(&x.info.nsid) {
                    changed.push(x.info.nsid);
                }
                retired_namespaces.push(x.clone());
            }
        }
        changed.sort_unstable();
        s.update(sc.clone(), namespaces, changed);
    }
    let listeners: Vec<Option<nvmetro_conf::ListenerConfig>> = t.listeners().into_iter().map(|(_, l)| l).collect();
    let mut removed_subsystems = Vec::new();
    if !p.added_subsystems.is_empty() || !p.removed_subsystems.is_empty() {
        let mut table: Vec<Arc<Subsystem>> = t.subsystems().iter().cloned().collect();
        for s in table.iter().filter(|s| p.removed_subsystems.contains(&s.config().nqn)) {
            retired_namespaces.extend(s.namespaces().iter().cloned());
            removed_subsystems.push(s.clone());
        }
        table.retain(|s| !p.removed_subsystems.contains(&s.config().nqn));
        for sc in &p.added_subsystems {
            let namespaces = sc
                .namespaces
                .iter()
                .map(|n| {
                    let i = slot_of(&n.bdev);
                    crate::namespace(n, i, bdevs[i].as_ref())
                })
                .collect();
            table.push(Arc::new(Subsystem::new(sc.clone(), namespaces, &listeners)));
        }
        t.subsystems.store(Arc::new(table));
    }
    for (address, sock) in sockets {
        if let Some(r0) = reactors.first() {
            let kind = crate::conn::ListenerKind::Subsystems(
                t.listener_slots.load().iter().position(|a| *a == address).expect("slot added above"),
            );
            r0.send(Box::new(move |r| {
                if let Err(e) = r.add_listener(sock, kind) {
                    tracing::error!(%address, "cannot serve the new listener: {e}");
                } else {
                    tracing::info!(%address, "listening (added by reload)");
                }
            }));
        }
    }
    #[cfg(feature = "rdma")]
    for l in rdma_listeners {
        if let Some(r0) = reactors.first() {
            let address = l.address;
            let kind = crate::conn::ListenerKind::Subsystems(
                t.listener_slots.load().iter().position(|a| *a == address).expect("slot added above"),
            );
            r0.send(Box::new(move |r| {
                if let Err(e) = r.add_rdma_listener(l, kind) {
                    tracing::error!(%address, "cannot serve the new NVMe/RDMA listener: {e}");
                } else {
                    tracing::info!(%address, transport = "rdma", "listening (added by reload)");
                }
            }));
        }
    }
    // 4. What goes away, after its I/O drained.
    // Removed DR groups stop first: a write they hold (a sync group whose DR site is gone)
    // completes once they are gone, so the drain does not wait for it.
    let removed_dr = dr::stop_removed(t, &p);
    drain(&retired_namespaces);
    for s in &removed_subsystems {
        s.remove_all_controllers();
        for r in reactors {
            let nqn = s.config().nqn.clone();
            r.send(Box::new(move |r| r.end_connections(|c| c.serves(&nqn), "subsystem removed by a reload")));
        }
    }
    for &address in &p.removed_listeners {
        let slot = t.listener_slots.load().iter().position(|a| *a == address);
        if let Some(r0) = reactors.first() {
            r0.send(Box::new(move |r| r.remove_listener(address)));
        }
        // Its hosts go (they reconnect through the listeners that remain).
        for r in reactors {
            r.send(Box::new(move |r| r.end_connections(|c| slot.is_some() && c.listener_slot() == slot, "listener removed by a reload")));
        }
    }
    // DR groups and replicas removed (no namespace serves their members any more): the bdevs
    // they wrap serve in their places again (before a removed bdev's slot is retired).
    dr::serve_removed(t, reactors, removed_dr);
    for name in &p.removed_bdevs {
        if let Some(slot) = t.bdevs().iter().rposition(|b| b.info().name == *name) {
            let retired: Arc<dyn Bdev> = Arc::new(Retired(t.bdev(slot).info().clone()));
            t.bdevs.rcu(|v| {
                let mut v = (**v).clone();
                v[slot] = retired.clone();
                v
            });
            for r in reactors {
                r.send(Box::new(move |r| r.channels().close(slot)));
            }
        }
    }
    for g in &p.dr_tunings {
        if let Some(group) = t.dr_groups.load().iter().find(|x| x.status().name == g.name) {
            group.tune(crate::dr_tuning(g));
        }
    }
    for (name, m) in &p.tunings {
        if let Some((_, b)) = t.live_bdevs().into_iter().find(|(_, b)| b.info().name == *name) {
            b.tune(crate::mirror_tuning(m, new.witness.is_some()));
        }
    }
    if let Some(mode) = p.poll_mode {
        for r in reactors {
            r.send(Box::new(move |r| r.set_mode(mode)));
        }
    }
    t.config_generation.fetch_add(1, Ordering::AcqRel);
    if p.sites_changed {
        for s in t.subsystems().iter() {
            s.announce_ana_change();
        }
    }
    t.discovery.rebuild(&new);
    t.refresh_ana();
    let active: BTreeSet<String> = t.subsystems().iter().map(|s| s.config().nqn.clone()).collect();
    tracing::info!(subsystems = ?active, changes = p.changes.len(), "reload applied");
    for c in &p.changes {
        tracing::info!("reload: {c}");
    }
    Ok(Outcome { changes: p.changes, applied: true })
}

/// What a removed bdev's slot holds once its namespaces drained: the device itself is released
/// when the last reactor closes its channel.
#[derive(Debug)]
struct Retired(nvmetro_bdev::BdevInfo);

impl Bdev for Retired {
    fn info(&self) -> &nvmetro_bdev::BdevInfo {
        &self.0
    }

    fn access(&self) -> nvmetro_bdev::Access {
        nvmetro_bdev::Access::Fenced
    }

    fn channel(self: Arc<Self>) -> std::io::Result<Box<dyn nvmetro_bdev::BdevChannel>> {
        Err(std::io::Error::other(format!("bdev {} was removed by a reload", self.0.name)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[[bdev]]
name = "a"
kind = "malloc"
size = "8MiB"
[[bdev]]
name = "b"
kind = "malloc"
size = "8MiB"
[[subsystem]]
nqn = "nqn.2026-11.io.nvmetro:r"
allow_any_host = true
[[subsystem.namespace]]
nsid = 1
bdev = "a"
[[subsystem.namespace]]
nsid = 2
bdev = "b"
[[listener]]
address = "127.0.0.1:4420"
"#;

    fn cfg(text: &str) -> Config {
        nvmetro_conf::parse(text, "t.toml").unwrap()
    }

    #[test]
    fn the_plan_names_each_difference_and_nothing_else() {
        let old = cfg(BASE);
        assert!(plan(&old, &old).changes.is_empty());
        let new = BASE.replace("nsid = 2\nbdev = \"b\"", "nsid = 3\nbdev = \"b\"")
            + "[[listener]]\naddress = \"127.0.0.1:4421\"\n[[bdev]]\nname = \"c\"\nkind = \"null\"\nsize = \"1MiB\"\n";
        let p = plan(&old, &cfg(&new));
        assert!(p.refused.is_empty(), "{:?}", p.refused);
        let text = p.changes.join("\n");
        for want in ["add bdev c", "add listener 127.0.0.1:4421", "add NSID 3 on bdev b", "remove NSID 2 on bdev b"] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        assert_eq!(p.changes.len(), 4, "{text}");
    }

    #[test]
    fn replication_settings_change_live_but_a_mirror_s_identity_does_not() {
        let mirror = |extra: &str, role: &str| {
            format!(
                "[[bdev]]\nname = \"leg\"\nkind = \"file\"\npath = \"/tmp/leg\"\nsize = \"8MiB\"\n\
                 [[bdev]]\nname = \"m\"\nkind = \"mirror\"\nlocal = \"leg\"\n{role}\nmetadata = \"/tmp/leg.meta\"\n{extra}\n\
                 [[subsystem]]\nnqn = \"nqn.2026-11.io.nvmetro:m\"\nallow_any_host = true\n[[subsystem.namespace]]\nnsid = 1\nbdev = \"m\"\n\
                 [[listener]]\naddress = \"127.0.0.1:4420\"\n"
            )
        };
        let preferred = "role = \"preferred\"\nlisten = \"127.0.0.1:7700\"";
        let old = cfg(&mirror("", preferred));
        let p = plan(&old, &cfg(&mirror("resync_rate = \"100MiB\"\nheartbeat_timeout = \"2s\"", preferred)));
        assert!(p.refused.is_empty(), "{:?}", p.refused);
        assert!(p.changes[0].contains("resync rate") && p.changes[0].contains("heartbeat timeout"), "{:?}", p.changes);
        let p = plan(&old, &cfg(&mirror("resync_latency_target = \"2ms\"", preferred)));
        assert!(p.refused.is_empty(), "{:?}", p.refused);
        assert!(p.changes[0].contains("resync latency target 2000 us"), "{:?}", p.changes);
        assert!(
            p.tunings.iter().any(|(name, m)| name == "m" && m.resync_latency_target == nvmetro_conf::ResyncLatencyTarget::Absolute(2000)),
            "the new target goes to the running mirror"
        );
        let p = plan(&old, &cfg(&mirror("", "role = \"secondary\"\npeer = \"127.0.0.1:7700\"")));
        assert!(p.refused.iter().any(|r| r.contains("bdev m")), "a role change is refused: {:?}", p.refused);
    }

    #[test]
    fn what_cannot_change_live_is_refused() {
        let old = cfg(BASE);
        let p = plan(&old, &cfg(&BASE.replace("size = \"8MiB\"\n[[bdev]]\nname = \"b\"", "size = \"16MiB\"\n[[bdev]]\nname = \"b\"")));
        assert!(p.refused.iter().any(|r| r.contains("bdev a")), "{:?}", p.refused);
        let p = plan(&old, &cfg(&format!("[target]\ncores = [0, 1]\n{BASE}")));
        assert!(p.refused.iter().any(|r| r.contains("cores")));
    }
}
