//! DR groups and replicas on reload: what may change live ([`dr_changes`]), starting what is
//! added before anything changes, serving its members in their bdevs' places, and stopping what
//! is removed once its namespaces drained.

use super::{Plan, ReloadError};
use crate::Target;
use nvmetro_bdev::dr::group::DrGroup;
use nvmetro_bdev::dr::replica::DrReplica;
use nvmetro_bdev::Bdev;
use nvmetro_conf::Config;
use std::sync::Arc;

/// The namespaces of `config` served by bdev `name`, described.
fn namespaces_over(config: &Config, name: &str) -> Vec<String> {
    config
        .subsystems
        .iter()
        .flat_map(|s| s.namespaces.iter().filter(|n| n.bdev == name).map(move |n| format!("{} nsid {}", s.nqn, n.nsid)))
        .collect()
}

/// DR groups: mode, buffer, RPO target and link delay change live. A group or a replica is
/// added when no namespace the running config has is served by its members (new bdevs, or bdevs
/// no host uses: namespaces over them may come in the same reload), so every host write is
/// sequenced, or refused until promotion, from the first; one is removed when none of the new
/// config's namespaces is served by its members (they may go in the same reload). Groups over
/// metro mirrors, and changes to a group's members, DR site, state, secret or long-throw journal
/// or to a replica need a restart (or a removal and an addition, in two reloads).
pub(super) fn dr_changes(old: &Config, new: &Config, p: &mut Plan) {
    p.old_dr = (old.dr_groups.clone(), old.dr_replicas.clone());
    let busy_in =
        |config: &Config, members: &[String]| -> Vec<String> { members.iter().flat_map(|m| namespaces_over(config, m)).collect() };
    // A bdev a running group or replica wraps (even one this reload removes) is not free yet:
    // its wrapper goes back only after the namespaces drained.
    let held_now = |members: &[String]| -> Option<String> {
        members.iter().find_map(|m| {
            old.dr_groups
                .iter()
                .filter(|o| o.members.contains(m))
                .map(|o| format!("bdev {m} is a member of DR group {} now", o.name))
                .chain(
                    old.dr_replicas
                        .iter()
                        .filter(|o| o.members.contains(m))
                        .map(|o| format!("bdev {m} is a member of DR replica {} now", o.name)),
                )
                .next()
        })
    };
    for g in &new.dr_groups {
        match old.dr_groups.iter().find(|o| o.name == g.name) {
            None if g.follows_metro => {
                p.refused.push(format!("add DR group {} (a DR group over metro mirrors is set up when the target starts)", g.name))
            }
            None if held_now(&g.members).is_some() || old.dr_groups.iter().any(|o| o.state == g.state) => p.refused.push(format!(
                "add DR group {}: {} (remove that one in one reload, add this one in the next)",
                g.name,
                held_now(&g.members).unwrap_or_else(|| format!("its state {} is another group's", g.state.display()))
            )),
            None => match busy_in(old, &g.members)[..] {
                [] => {
                    p.changes.push(format!("add DR group {} over {} (streamed to {})", g.name, g.members.join(", "), g.dr_site));
                    p.added_dr_groups.push(g.clone());
                }
                ref busy => p.refused.push(format!(
                    "add DR group {}: its members serve {} now, whose writes so far the group never saw (add it over bdevs no namespace serves yet, or restart)",
                    g.name,
                    busy.join(", ")
                )),
            },
            Some(o) if o == g => {}
            // Long-throw (its journal) is set up at start; sync and async switch live.
            Some(o)
                if o.members == g.members
                    && o.dr_site == g.dr_site
                    && o.state == g.state
                    && o.secret == g.secret
                    && o.journal == g.journal
                    && (o.mode == nvmetro_conf::DrModeConfig::LongThrow) == (g.mode == nvmetro_conf::DrModeConfig::LongThrow) =>
            {
                let mut what = Vec::new();
                if o.mode != g.mode {
                    what.push(format!("mode {:?} -> {:?}", o.mode, g.mode));
                }
                if o.buffer != g.buffer {
                    what.push(format!("buffer {} -> {}", o.buffer, g.buffer));
                }
                if o.rpo_target != g.rpo_target {
                    what.push(format!("rpo_target {:?} -> {:?}", o.rpo_target, g.rpo_target));
                }
                if o.link_delay != g.link_delay {
                    what.push(format!("link_delay {:?} -> {:?}", o.link_delay, g.link_delay));
                }
                if o.copy_rate != g.copy_rate {
                    what.push(format!("copy_rate {:?} -> {:?}", o.copy_rate, g.copy_rate));
                }
                p.changes.push(format!("DR group {}: {}", g.name, what.join(", ")));
                p.dr_tunings.push(g.clone());
            }
            Some(_) => p.refused.push(format!(
                "DR group {}: its members, dr_site, state, secret, or long-throw and its journal (remove the group in one reload and add it in the next, or restart)",
                g.name
            )),
        }
    }
    for o in old.dr_groups.iter().filter(|o| !new.dr_groups.iter().any(|g| g.name == o.name)) {
        match busy_in(new, &o.members)[..] {
            _ if o.follows_metro => {
                p.refused.push(format!("remove DR group {} (a DR group over metro mirrors is set up when the target starts)", o.name))
            }
            [] => {
                p.changes.push(format!(
                    "remove DR group {} (it gives its DR site what it buffered, then stops; added again, it compares every region first)",
                    o.name
                ));
                p.removed_dr_groups.push(o.name.clone());
            }
            ref busy => p.refused.push(format!(
                "remove DR group {}: its members still serve {} (remove those namespaces in the same reload, or restart)",
                o.name,
                busy.join(", ")
            )),
        }
    }
    for r in &new.dr_replicas {
        match old.dr_replicas.iter().find(|o| o.name == r.name) {
            None if held_now(&r.members).is_some() || old.dr_replicas.iter().any(|o| o.state == r.state) => p.refused.push(format!(
                "add DR replica {}: {} (remove that one in one reload, add this one in the next)",
                r.name,
                held_now(&r.members).unwrap_or_else(|| format!("its state {} is another replica's", r.state.display()))
            )),
            None => match busy_in(old, &r.members)[..] {
                [] => {
                    p.changes.push(format!("add DR replica {} over {} (listening on {})", r.name, r.members.join(", "), r.listen));
                    p.added_dr_replicas.push(r.clone());
                }
                ref busy => p.refused.push(format!(
                    "add DR replica {}: its members serve {} now (hosts there could have written the image; add it over bdevs no namespace serves yet, or restart)",
                    r.name,
                    busy.join(", ")
                )),
            },
            Some(o) if o == r => {}
            Some(_) => p.refused.push(format!(
                "DR replica {}: its settings (remove it in one reload and add it in the next, or restart)",
                r.name
            )),
        }
    }
    for o in old.dr_replicas.iter().filter(|o| !new.dr_replicas.iter().any(|r| r.name == o.name)) {
        match busy_in(new, &o.members)[..] {
            [] => {
                p.changes.push(format!("remove DR replica {} (its stream ends; its image stays as applied)", o.name));
                p.removed_dr_replicas.push(o.name.clone());
            }
            ref busy => p.refused.push(format!(
                "remove DR replica {}: its members still serve {} (remove those namespaces in the same reload, or restart)",
                o.name,
                busy.join(", ")
            )),
        }
    }
}

/// Groups and replicas a reload adds, started over their members (not served yet), with their
/// members' names.
pub(super) struct Added {
    groups: Vec<(Vec<String>, Arc<DrGroup>)>,
    replicas: Vec<(Vec<String>, Arc<DrReplica>)>,
}

/// Starts what the plan adds over its members (bdevs just opened, or running ones no namespace
/// serves); a failure changes nothing that runs.
pub(super) fn start_added(p: &Plan, opened: &[Arc<dyn Bdev>], live: &[(usize, Arc<dyn Bdev>)]) -> Result<Added, ReloadError> {
    let bdev_named = |name: &str| {
        opened
            .iter()
            .find(|x| x.info().name == name)
            .cloned()
            .or_else(|| live.iter().rev().find(|(_, x)| x.info().name == name).map(|(_, x)| x.clone()))
    };
    let members_of = |what: &str, names: &[String]| {
        names
            .iter()
            .map(|m| bdev_named(m).ok_or_else(|| ReloadError::Prepare(format!("{what}: member {m} is not a bdev"))))
            .collect::<Result<Vec<_>, _>>()
    };
    let mut groups = Vec::new();
    for g in &p.added_dr_groups {
        let what = format!("DR group {}", g.name);
        let group = DrGroup::start(crate::dr_group_settings(g), members_of(&what, &g.members)?)
            .map_err(|e| ReloadError::Prepare(format!("{what} (state {}): {e}", g.state.display())))?;
        groups.push((g.members.clone(), group));
    }
    let mut replicas = Vec::new();
    for r in &p.added_dr_replicas {
        let what = format!("DR replica {}", r.name);
        let replica = DrReplica::start(crate::dr_replica_settings(r), members_of(&what, &r.members)?)
            .map_err(|e| ReloadError::Prepare(format!("{what} (listen {}, state {}): {e}", r.listen, r.state.display())))?;
        replicas.push((r.members.clone(), replica));
    }
    Ok(Added { groups, replicas })
}

/// The added groups' and replicas' members serve in their bdevs' places; they join the target's
/// tables.
pub(super) fn serve_added(t: &Target, reactors: &[crate::reactor::ReactorHandle], added: Added) {
    for (names, group) in &added.groups {
        serve_in_place(t, reactors, names, group.members());
        tracing::info!(group = %group.status().name, members = ?names, "DR group started (added by reload)");
    }
    for (names, replica) in &added.replicas {
        serve_in_place(t, reactors, names, replica.members());
        tracing::info!(group = %replica.status().name, members = ?names, "DR replica listening (added by reload)");
    }
    if !added.groups.is_empty() {
        t.dr_groups.rcu(|v| v.iter().cloned().chain(added.groups.iter().map(|(_, g)| g.clone())).collect::<Vec<_>>());
    }
    if !added.replicas.is_empty() {
        t.dr_replicas.rcu(|v| v.iter().cloned().chain(added.replicas.iter().map(|(_, r)| r.clone())).collect::<Vec<_>>());
    }
}

/// What a reload removed: the members' names and the bdevs they wrap.
pub(super) type Removed = Vec<(Vec<String>, Vec<Arc<dyn Bdev>>)>;

/// Stops the groups and replicas the plan removes (no namespace of the new config serves their
/// members; those retired may still drain): a stopped group completes what it held, and its
/// members pass writes straight through.
pub(super) fn stop_removed(t: &Target, p: &Plan) -> Removed {
    let (old_groups, old_replicas) = &p.old_dr;
    let mut removed = Vec::new();
    for name in &p.removed_dr_groups {
        let Some(group) = t.dr_groups.load().iter().find(|g| g.status().name == *name).cloned() else { continue };
        t.dr_groups.rcu(|v| v.iter().filter(|g| !Arc::ptr_eq(g, &group)).cloned().collect::<Vec<_>>());
        group.remove();
        let names = old_groups.iter().find(|g| g.name == *name).map(|g| g.members.clone()).unwrap_or_default();
        removed.push((names, group.inner_members()));
        tracing::info!(group = %name, "DR group stopped (removed by reload)");
    }
    for name in &p.removed_dr_replicas {
        let Some(replica) = t.dr_replicas.load().iter().find(|r| r.status().name == *name).cloned() else { continue };
        t.dr_replicas.rcu(|v| v.iter().filter(|r| !Arc::ptr_eq(r, &replica)).cloned().collect::<Vec<_>>());
        replica.stop();
        let names = old_replicas.iter().find(|r| r.name == *name).map(|r| r.members.clone()).unwrap_or_default();
        removed.push((names, replica.inner_members()));
        tracing::info!(group = %name, "DR replica stopped (removed by reload)");
    }
    removed
}

/// Once the retired namespaces drained: the bdevs removed groups and replicas wrapped serve in
/// their places again.
pub(super) fn serve_removed(t: &Target, reactors: &[crate::reactor::ReactorHandle], removed: Removed) {
    for (names, bdevs) in removed {
        serve_in_place(t, reactors, &names, bdevs);
    }
}

/// Puts each of `bdevs` in the slot of the bdev named as it is in `names` (a DR member in its
/// bdev's place, or the bdev back in its member's); reactors reopen the slot's channel.
fn serve_in_place(t: &Target, reactors: &[crate::reactor::ReactorHandle], names: &[String], bdevs: Vec<Arc<dyn Bdev>>) {
    for (name, bdev) in names.iter().zip(bdevs) {
        let Some(slot) = t.bdevs().iter().rposition(|b| b.info().name == *name) else { continue };
        t.bdevs.rcu(|v| {
            let mut v = (**v).clone();
            v[slot] = bdev.clone();
            v
        });
        for r in reactors {
            r.send(Box::new(move |r| r.channels().close(slot)));
        }
    }
}
