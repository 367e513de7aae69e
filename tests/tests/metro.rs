//! Metro HA end to end: site A, site B and the witness as separate processes on 127.0.0.1, a
//! verifying workload through the multipath initiator. SIGKILL of a site, a cut link, a lost
//! witness and restarts of each: at most one site serves while they are apart, no acknowledged
//! write is lost, and the initiator resumes on the surviving path.

use nvmetro_perf::load::{run_paths, JobResult, PathIo, PathShared, Pattern, Workload};
use nvmetro_perf::paths::{ana_state, PathMonitor};
use nvmetro_perf::{ConnectOptions, Host};
use nvmetro_proto::nvme::Status;
use nvmetro_tests::{connect, metro, serves, switchover, wait_until, Metro, TargetProcess, HOSTNQN, HOST_B, METRO_NQN as NQN};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// ANA states as the log page reports them.
const OPTIMIZED: u8 = 1;
const NON_OPTIMIZED: u8 = 2;

/// The status a write gets at `t` (None: the site is down).
fn write_status(t: &TargetProcess) -> Option<Status> {
    let mut h = connect(t)?;
    let (c, _) = h.io_cmd(0, nvmetro_proto::cmds::write(0, 1, 60_001, 1), vec![8; 512], 0).ok()?;
    Some(c.status())
}

fn ana_of(t: &TargetProcess) -> Option<u8> {
    let h = connect(t)?;
    let (mut admin, _) = h.into_parts();
    ana_state(&mut admin, 1).ok()
}

fn workload(secs: u64, seed: u64) -> Workload {
    nvmetro_tests::mixed_workload(secs, 4, true, seed)
}

/// One worker's queues on each site, with path monitors that follow ANA and reconnect.
fn connect_paths(sites: &[&TargetProcess]) -> (Vec<PathIo>, Vec<PathMonitor>) {
    let addrs: Vec<SocketAddr> = sites.iter().map(|t| t.addr).collect();
    nvmetro_tests::connect_paths(&addrs, NQN, HOSTNQN)
}

/// Reads the whole region through `t` and checks every acknowledged stamp.
fn verify_at(t: &TargetProcess, gens: &mut HashMap<u64, u64>) {
    let (mut paths, monitors) = connect_paths(&[t]);
    let check = Workload {
        read_pct: 100,
        pattern: Pattern::Sequential,
        max_ios: Some(8192 / 8),
        duration: Duration::from_secs(120),
        ..workload(0, 1)
    };
    let r = run_paths(&mut paths, &check, 512, gens, 0, None).unwrap();
    monitors.into_iter().for_each(PathMonitor::stop);
    assert_eq!(r.errors, 0, "{:?}", r.first_error);
    assert!(r.mismatches.is_empty(), "acknowledged data lost at {}: {:?}", t.addr, &r.mismatches[..r.mismatches.len().min(5)]);
}

/// Runs `wl` over `paths` while `fail` happens `after` into it, then stops the monitors:
/// every command must complete (on one site or the other) and read back what was acknowledged.
fn load_through(
    paths: &mut [PathIo],
    monitors: Vec<PathMonitor>,
    wl: &Workload,
    gens: &mut HashMap<u64, u64>,
    after: Duration,
    fail: impl FnOnce() + Send,
) -> JobResult {
    let r = std::thread::scope(|s| {
        s.spawn(move || {
            std::thread::sleep(after);
            fail();
        });
        run_paths(paths, wl, 512, gens, 0, None).unwrap()
    });
    monitors.into_iter().for_each(PathMonitor::stop);
    assert_eq!(r.errors, 0, "every command completed on one site or the other: {:?}", r.first_error);
    assert!(r.mismatches.is_empty(), "{:?}", &r.mismatches[..r.mismatches.len().min(5)]);
    r
}

/// SIGKILL of site A under a verifying multipath workload; returns the longest I/O stall.
fn kill_a_under_load(m: &mut Metro, gens: &mut HashMap<u64, u64>, seed: u64) -> Duration {
    let (mut paths, monitors) = connect_paths(&[&m.a, &m.b]);
    assert_eq!(paths[0].shared.ana.load(Ordering::Acquire), OPTIMIZED, "the host's own site is Optimized");
    assert_eq!(paths[1].shared.ana.load(Ordering::Acquire), NON_OPTIMIZED, "the other site is Non-Optimized");
    let a = &mut m.a;
    let r = load_through(&mut paths, monitors, &workload(5, seed), gens, Duration::from_millis(1500), move || a.kill());
    assert!(paths[0].result.ios() > 0 && paths[1].result.ios() > 0, "I/O ran on A, then on B");
    r.stalls.iter().map(|s| s.duration).max().expect("the failover was measured")
}

/// `nvmetro-witness --config CONFIG status [--json]`: (success, stdout, stderr).
fn witness_status(config: &std::path::Path, json: bool) -> (bool, String, String) {
    let mut c = std::process::Command::new(nvmetro_tests::binary("nvmetro-witness"));
    c.arg("--config").arg(config).arg("status");
    if json {
        c.arg("--json");
    }
    let out = c.output().unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// The mirror's entry in the witness's status: (authority, holder, [(site, in sync)]).
type WitnessView = (String, Option<u64>, Vec<(u64, bool)>);

fn witness_view(config: &std::path::Path) -> Option<WitnessView> {
    let (ok, out, _) = witness_status(config, true);
    let v: serde_json::Value = serde_json::from_str(&out).ok().filter(|_| ok)?;
    let r = v["resources"].as_array()?.iter().find(|r| r["name"] == "m")?.clone();
    let sites = r["sites"].as_array()?.iter().map(|s| (s["site"].as_u64().unwrap_or(0), s["in_sync"] == true)).collect();
    Some((r["authority"].as_str()?.to_string(), r["holder"].as_u64(), sites))
}

#[test]
fn the_witness_status_shows_the_authority_the_grant_and_each_sites_reports() {
    let mut m = metro(false, "");
    let config = m.w.config_path.clone();
    wait_until("the witness saw both sites in sync", Duration::from_secs(20), || {
        witness_view(&config).is_some_and(|(auth, holder, sites)| !auth.is_empty() && holder.is_none() && sites == [(1, true), (2, true)])
    });
    let (before, _, _) = witness_view(&config).unwrap();
    let (ok, text, _) = witness_status(&config, false);
    assert!(ok && text.contains("mirror m: authority generation") && text.contains("no grant outstanding"), "{text}");
    assert!(text.contains("site 1: holds generation") && text.contains("site 2: holds generation"), "{text}");

    // B dies: A asks the witness to serve alone, and the status shows the grant.
    m.b.kill();
    wait_until("the witness granted site 1", Duration::from_secs(20), || {
        witness_view(&config).is_some_and(|(_, holder, _)| holder == Some(1))
    });
    let (after, _, _) = witness_view(&config).unwrap();
    assert_ne!(before, after, "the grant moved the authority to A's new generation");
    let (_, text, _) = witness_status(&config, false);
    assert!(text.contains("site 1 serves alone under a grant"), "{text}");

    // A status request with the wrong secret gets no answer: a clear error, not a guess.
    let wrong = m.w.config_path.with_file_name("wrong-secret.toml");
    std::fs::write(&wrong, std::fs::read_to_string(&config).unwrap().replace(nvmetro_tests::WITNESS_SECRET, "not-the-witness-secret"))
        .unwrap();
    let (ok, _, err) = witness_status(&wrong, false);
    assert!(!ok && err.contains("no answer from the witness") && err.contains("same secret"), "{err}");
}

/// Whether the management status at `t` mentions `what`.
fn status_says(t: &TargetProcess, what: &str) -> bool {
    let st = nvmetro_tests::rpc(t, "nvmetro_status", serde_json::json!({})).unwrap_or_default();
    st.to_string().contains(what)
}

/// Until the witness has heard both sites report in sync (a switchover needs its answers).
fn wait_for_witness_in_sync(m: &Metro) {
    let witness = m.w.config_path.clone();
    wait_until("the witness saw both sites in sync", Duration::from_secs(20), || {
        witness_view(&witness).is_some_and(|(auth, holder, sites)| !auth.is_empty() && holder.is_none() && sites == [(1, true), (2, true)])
    });
}

/// `nvmetro promote m --force --yes` at `t`: (success, stdout + stderr).
fn promote(t: &TargetProcess) -> (bool, String) {
    let out = std::process::Command::new(nvmetro_tests::binary("nvmetro"))
        .arg("--config")
        .arg(&t.config_path)
        .args(["promote", "m", "--force", "--yes"])
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn a_forced_promotion_serves_the_survivor_when_peer_and_witness_are_lost_and_resyncs_the_returning_site() {
    let mut m = metro(false, "");
    let (ok, out) = promote(&m.b);
    assert!(!ok && out.contains("the peer answers"), "refused while the sites are together: {out}");

    // The witness is lost first: the sites pre-elect A (the preferred) and B defers to it.
    m.w.kill();
    let says = status_says;
    wait_until("B defers to A", Duration::from_secs(20), || says(&m.b, "the peer survives a link loss"));
    m.a.kill();
    wait_until("B, without peer and witness, stays out", Duration::from_secs(20), || {
        serves(&m.b) == Some(false) && says(&m.b, "the pre-elected peer survives")
    });

    // The operator forces B.
    let (ok, out) = promote(&m.b);
    assert!(ok && out.contains("serving alone under generation"), "{out}");
    wait_until("B serves alone", Duration::from_secs(10), || serves(&m.b) == Some(true));
    let status =
        std::process::Command::new(nvmetro_tests::binary("nvmetro")).arg("--config").arg(&m.b.config_path).arg("status").output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("FORCED by the operator"), "{status}");
    let mut h = connect(&m.b).expect("a controller at B");
    let marker = vec![0x5a; 4096];
    h.write(1, 4096, marker.clone(), 512).expect("B takes writes");
    let (ok, out) = promote(&m.b);
    assert!(!ok && out.contains("already serves alone"), "{out}");

    // A returns (the witness still lost): it descends from the generation B left, so it is
    // resynced from B before it serves, and then holds B's writes.
    m.a.restart();
    wait_until("A serves again, resynced from B", Duration::from_secs(30), || serves(&m.a) == Some(true));
    let mut ha = connect(&m.a).expect("a controller at A");
    assert_eq!(ha.read(1, 4096, 8, 512).expect("A reads"), marker, "A holds what B wrote while forced");
    assert_eq!(serves(&m.b), Some(true), "B serves with its peer");
}

#[test]
fn sigkill_of_a_site_fails_over_and_the_site_fails_back_after_its_resync() {
    let mut m = metro(false, "");
    let mut gens = HashMap::new();
    let stall = kill_a_under_load(&mut m, &mut gens, 1);
    eprintln!("failover after SIGKILL of site A: I/O stood still for {stall:?}");
    // B serves alone: the host's path there is Optimized now, and `nvmetro status` says so.
    assert_eq!(ana_of(&m.b), Some(OPTIMIZED));
    let status =
        std::process::Command::new(nvmetro_tests::binary("nvmetro")).arg("--config").arg(&m.b.config_path).arg("status").output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    for want in ["serving alone", "granted by the witness", "witness reachable", "lease: witness grant"] {
        assert!(status.contains(want), "status shows {want:?}:\n{status}");
    }
    // A returns: the witness keeps it out until it is resynced, then it serves again and the
    // paths go back to Optimized (A) and Non-Optimized (B).
    m.a.restart();
    wait_until("A serves again", Duration::from_secs(30), || serves(&m.a) == Some(true));
    wait_until("A is Optimized again", Duration::from_secs(10), || ana_of(&m.a) == Some(OPTIMIZED));
    wait_until("B is Non-Optimized again", Duration::from_secs(10), || ana_of(&m.b) == Some(NON_OPTIMIZED));
    verify_at(&m.a, &mut gens);
    verify_at(&m.b, &mut gens);
}

#[test]
fn a_cut_link_leaves_exactly_one_writer_and_heals() {
    link_loss_leaves_exactly_one_writer_and_heals(false);
}

#[test]
fn a_silent_link_loss_leaves_exactly_one_writer_and_heals() {
    link_loss_leaves_exactly_one_writer_and_heals(true);
}

/// The link is cut (connections reset) or goes silent (only heartbeats tell) under a verifying
/// multipath workload.
fn link_loss_leaves_exactly_one_writer_and_heals(silent: bool) {
    let m = metro(true, "");
    let proxy = m.proxy.as_ref().unwrap();
    let (mut paths, monitors) = connect_paths(&[&m.a, &m.b]);
    let mut gens = HashMap::new();
    load_through(&mut paths, monitors, &workload(5, 2), &mut gens, Duration::from_millis(1000), move || {
        if silent {
            proxy.go_silent();
        } else {
            proxy.cut();
        }
    });
    // Exactly one site serves; the other reports ANA Inaccessible.
    let (sa, sb) = (write_status(&m.a).unwrap(), write_status(&m.b).unwrap());
    assert!(sa.is_success() != sb.is_success(), "exactly one writer while cut: A {sa:?}, B {sb:?}");
    let loser = if sa.is_success() { &m.b } else { &m.a };
    assert_eq!(write_status(loser), Some(Status::ANA_INACCESSIBLE));
    proxy.restore();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !(serves(&m.a) == Some(true) && serves(&m.b) == Some(true)) {
        let tail = |log: String| log.lines().filter(|l| !l.contains("controller")).rev().take(15).collect::<Vec<_>>().join("\n");
        assert!(Instant::now() < deadline, "both serve after the heal:\nA:\n{}\nB:\n{}", tail(m.a.log()), tail(m.b.log()));
        std::thread::sleep(Duration::from_millis(100));
    }
    verify_at(&m.a, &mut gens);
    verify_at(&m.b, &mut gens);
}

#[test]
fn witness_lost_first_then_the_link_the_pre_elected_site_survives() {
    let mut m = metro(true, "");
    let mut gens = HashMap::new();
    m.w.kill();
    // Both sites notice and agree on the survivor (site 1) over the link.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(serves(&m.a), Some(true), "losing only the witness changes nothing for hosts");
    assert_eq!(serves(&m.b), Some(true));
    m.proxy.as_ref().unwrap().cut();
    wait_until("B fences", Duration::from_secs(10), || write_status(&m.b) == Some(Status::ANA_INACCESSIBLE));
    wait_until("A serves alone", Duration::from_secs(10), || serves(&m.a) == Some(true));
    let (mut paths, monitors) = connect_paths(&[&m.a]);
    let r = run_paths(&mut paths, &workload(1, 3), 512, &mut gens, 0, None).unwrap();
    monitors.into_iter().for_each(PathMonitor::stop);
    assert_eq!(r.errors, 0);
    // The witness returns and B restarts: B still may not serve (it deferred, durably).
    m.w.restart();
    m.b.restart();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(write_status(&m.b), Some(Status::ANA_INACCESSIBLE), "B stays out until resynced");
    m.proxy.as_ref().unwrap().restore();
    wait_until("B serves after its resync", Duration::from_secs(30), || serves(&m.b) == Some(true));
    verify_at(&m.b, &mut gens);
}

#[test]
fn a_restarted_witness_and_a_returning_site_keep_the_decision() {
    let mut m = metro(true, "");
    let mut gens = HashMap::new();
    // B dies; A is granted and serves alone; the link to B is also cut.
    m.b.kill();
    m.proxy.as_ref().unwrap().cut();
    wait_until("A serves alone", Duration::from_secs(10), || serves(&m.a) == Some(true));
    let (mut paths, monitors) = connect_paths(&[&m.a]);
    let r = run_paths(&mut paths, &workload(1, 4), 512, &mut gens, 0, None).unwrap();
    monitors.into_iter().for_each(PathMonitor::stop);
    assert_eq!(r.errors, 0);
    // The witness restarts (its decision is on disk); B returns, still cut off from A: the
    // witness must not let the stale copy serve.
    m.w.restart();
    m.b.restart();
    std::thread::sleep(Duration::from_millis(3000));
    assert_eq!(write_status(&m.b), Some(Status::ANA_INACCESSIBLE), "a stale site never serves:\n{}", m.w.log());
    assert_eq!(serves(&m.a), Some(true));
    m.proxy.as_ref().unwrap().restore();
    wait_until("B serves after its resync", Duration::from_secs(30), || serves(&m.b) == Some(true));
    verify_at(&m.b, &mut gens);
}

#[test]
fn uniform_and_non_uniform_hosts() {
    let mut m = metro(false, "");
    // Uniform: the site-A host has paths to both sites (see the other tests). Non-uniform: a
    // host of site B connects to site B only; its path there is Optimized, and stays usable
    // when site A dies.
    let connect_b = |t: &TargetProcess| {
        let mut o = ConnectOptions::new(t.addr, NQN);
        o.hostnqn = HOST_B.into();
        Host::connect(&o).unwrap()
    };
    let (mut admin_a, _) = connect_b(&m.a).into_parts();
    assert_eq!(ana_state(&mut admin_a, 1).unwrap(), NON_OPTIMIZED, "site A is the other site for this host");
    let h = connect_b(&m.b);
    let (mut admin, mut io) = h.into_parts();
    assert_eq!(ana_state(&mut admin, 1).unwrap(), OPTIMIZED);
    let shared = Arc::new(PathShared::new("siteB", 1));
    shared.ana.store(OPTIMIZED, Ordering::Release);
    let mut o = ConnectOptions::new(m.b.addr, NQN);
    o.hostnqn = HOST_B.into();
    let monitor = PathMonitor::start(shared.clone(), Some(admin), o, 1);
    let mut paths = vec![PathIo::new(shared, io.pop())];
    let a = &mut m.a;
    load_through(&mut paths, vec![monitor], &workload(3, 9), &mut HashMap::new(), Duration::from_millis(1000), move || a.kill());
    assert_eq!(ana_of_host(&m.b, HOST_B), Some(OPTIMIZED), "alone, site B is Optimized for its own host");
}

fn ana_of_host(t: &TargetProcess, host: &str) -> Option<u8> {
    let mut o = ConnectOptions::new(t.addr, NQN);
    o.hostnqn = host.into();
    let (mut admin, _) = Host::connect(&o).ok()?.into_parts();
    ana_state(&mut admin, 1).ok()
}

/// A failure under a verifying multipath workload from a host of site A, 1.5 s into a 5 s run;
/// returns the longest interruption the load tool saw.
fn stall_under_load(mut paths: Vec<PathIo>, monitors: Vec<PathMonitor>, seed: u64, fail: impl FnOnce() + Send) -> Duration {
    let r = load_through(&mut paths, monitors, &workload(5, seed), &mut HashMap::new(), Duration::from_millis(1500), fail);
    // The interruption a host saw: the longest stall (failed commands until one succeeded) or
    // the slowest command (writes held while the sites decided), whichever is longer.
    let slowest = paths.iter().map(|p| Duration::from_nanos(p.result.latency_ns.max())).max().unwrap_or_default();
    r.stalls.iter().map(|s| s.duration).max().unwrap_or_default().max(slowest)
}

/// Failover time, measured: `cargo test --release -p nvmetro-tests --test metro -- --ignored
/// --nocapture` (vendor-scripts/bench-failover.sh). Prints the median and worst of 10 runs
/// (FAILOVER_RUNS) for SIGKILL of the host's own site and for a cut replication link.
#[test]
#[ignore]
fn failover_time_benchmark() {
    let runs: usize = std::env::var("FAILOVER_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    for (what, mode) in
        [("SIGKILL of the host's own site", 0), ("replication link cut (connections reset)", 1), ("silent link loss (heartbeats)", 2)]
    {
        let mut stalls = Vec::new();
        for i in 0..runs {
            let mut m = metro(mode > 0, "");
            let (paths, monitors) = connect_paths(&[&m.a, &m.b]);
            let seed = i as u64 + 10;
            let stall = match (m.proxy.as_ref(), mode) {
                (Some(p), 1) => stall_under_load(paths, monitors, seed, move || p.cut()),
                (Some(p), _) => stall_under_load(paths, monitors, seed, move || p.go_silent()),
                (None, _) => {
                    let a = &mut m.a;
                    stall_under_load(paths, monitors, seed, move || a.kill())
                }
            };
            eprintln!("run {} ({what}): I/O interrupted for {:.0} ms", i + 1, ms(stall));
            stalls.push(stall);
        }
        stalls.sort();
        println!(
            "failover ({what}, default timers): median {:.0} ms, worst {:.0} ms, best {:.0} ms over {runs} runs",
            ms(stalls[runs / 2]),
            ms(stalls[runs - 1]),
            ms(stalls[0])
        );
    }
}

/// What `nvmetro status` at `t` prints.
fn status_text(t: &TargetProcess) -> String {
    let out =
        std::process::Command::new(nvmetro_tests::binary("nvmetro")).arg("--config").arg(&t.config_path).arg("status").output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The host-visible pause of a run: the slowest command, or the longest time I/O stood still
/// (failed commands until one succeeded), whichever is longer.
fn pause_of(paths: &[PathIo], r: &JobResult) -> Duration {
    let slowest = paths.iter().map(|p| Duration::from_nanos(p.result.latency_ns.max())).max().unwrap_or_default();
    r.stalls.iter().map(|s| s.duration).max().unwrap_or_default().max(slowest)
}

/// A verifying load from a host of site A through both sites with `nvmetro switchover` at A
/// 1.5 s in, then another with SIGTERM of A 1.5 s in: no command fails, B orders and serves
/// alone with the witness's grant. Returns the host-visible pauses (switchover, stop).
fn switch_over_then_stop_a(m: &mut Metro, gens: &mut HashMap<u64, u64>, seed: u64) -> (Duration, Duration) {
    let witness = m.w.config_path.clone();
    wait_until("the witness saw both sites in sync", Duration::from_secs(20), || {
        witness_view(&witness).is_some_and(|(auth, holder, sites)| !auth.is_empty() && holder.is_none() && sites == [(1, true), (2, true)])
    });
    let (mut paths, monitors) = connect_paths(&[&m.a, &m.b]);
    assert_eq!(paths[0].shared.ana.load(Ordering::Acquire), OPTIMIZED);
    let (a, b) = (&m.a, &m.b);
    let r = load_through(&mut paths, monitors, &workload(4, seed), gens, Duration::from_millis(1500), move || {
        let (ok, out) = switchover(a);
        assert!(ok && out.contains("site 2 orders writes now"), "{out}");
        wait_until("A Non-Optimized, B Optimized", Duration::from_secs(10), || {
            ana_of(a) == Some(NON_OPTIMIZED) && ana_of(b) == Some(OPTIMIZED)
        });
    });
    let switch_pause = pause_of(&paths, &r);
    assert!(paths[1].result.ios() > 0, "the load moved to B's path");
    let b_status = status_text(&m.b);
    assert!(b_status.contains("ordering writes (planned switchover"), "B orders writes:\n{b_status}");
    let a_status = status_text(&m.a);
    assert!(a_status.contains("the peer orders writes (planned switchover"), "A does not:\n{a_status}");

    // The old site is stopped (SIGTERM) under load: it departs, B takes the witness's
    // authority and serves alone, no command fails.
    let (mut paths, monitors) = connect_paths(&[&m.a, &m.b]);
    assert_eq!(paths[1].shared.ana.load(Ordering::Acquire), OPTIMIZED, "B is the host's Optimized path");
    let a = &mut m.a;
    let r = load_through(&mut paths, monitors, &workload(4, seed + 1), gens, Duration::from_millis(1500), move || a.terminate());
    let stop_pause = pause_of(&paths, &r);
    let log = m.a.log();
    assert!(log.contains("planned departure: the peer serves alone"), "A departed cleanly:\n{log}");
    assert_eq!(ana_of(&m.b), Some(OPTIMIZED));
    let b_status = status_text(&m.b);
    assert!(b_status.contains("serving alone"), "{b_status}");
    wait_until("the witness granted B", Duration::from_secs(10), || witness_view(&witness).is_some_and(|(_, holder, _)| holder == Some(2)));
    (switch_pause, stop_pause)
}

#[test]
fn a_planned_switchover_moves_ordering_and_paths_and_the_old_site_then_stops_without_a_stall() {
    let mut m = metro(false, "");
    let (ok, out) = switchover(&m.b);
    assert!(!ok && out.contains("does not order writes"), "refused at the site that does not order: {out}");
    let mut gens = HashMap::new();
    let (switch_pause, stop_pause) = switch_over_then_stop_a(&mut m, &mut gens, 31);
    verify_at(&m.b, &mut gens);
    eprintln!(
        "planned switchover: host-visible pause {:.1} ms (goal <= 50 ms); SIGTERM of the old site afterwards: {:.1} ms",
        switch_pause.as_secs_f64() * 1000.0,
        stop_pause.as_secs_f64() * 1000.0
    );
    // A returns: resynced from B, which keeps ordering; the paths stay as the switchover set them.
    m.a.restart();
    wait_until("A serves again", Duration::from_secs(30), || serves(&m.a) == Some(true));
    wait_until("A Non-Optimized, B Optimized after A's return", Duration::from_secs(10), || {
        ana_of(&m.a) == Some(NON_OPTIMIZED) && ana_of(&m.b) == Some(OPTIMIZED)
    });
    verify_at(&m.a, &mut gens);
}

/// The host-visible pause of a planned switchover and of the old site's stop after it,
/// measured: `vendor-scripts/bench-switchover.sh` (SWITCHOVER_RUNS, default 5). The pause is
/// the slowest command of a verifying QD4 load (or the longest stall, if longer).
#[test]
#[ignore]
fn switchover_pause_benchmark() {
    let runs: usize = std::env::var("SWITCHOVER_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let (mut quiet, mut switches, mut stops) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let mut m = metro(false, "");
        // The same load with nothing happening: the slowest command on this machine anyway.
        let mut gens = HashMap::new();
        let (mut paths, monitors) = connect_paths(&[&m.a, &m.b]);
        let r = load_through(&mut paths, monitors, &workload(4, 39), &mut gens, Duration::ZERO, || {});
        let base = pause_of(&paths, &r);
        let (switch, stop) = switch_over_then_stop_a(&mut m, &mut gens, 40 + 2 * i as u64);
        eprintln!(
            "run {}: switchover pause {:.1} ms, stop of the old site {:.1} ms (slowest command without either: {:.1} ms)",
            i + 1,
            ms(switch),
            ms(stop),
            ms(base)
        );
        quiet.push(base);
        switches.push(switch);
        stops.push(stop);
    }
    for (what, v) in
        [("no event (baseline)", &mut quiet), ("planned switchover", &mut switches), ("SIGTERM of the old site after it", &mut stops)]
    {
        v.sort();
        println!(
            "{what}: host-visible pause median {:.1} ms, worst {:.1} ms, best {:.1} ms over {runs} runs (goal <= 50 ms)",
            ms(v[runs / 2]),
            ms(v[runs - 1]),
            ms(v[0])
        );
    }
}

#[test]
fn a_switchover_is_refused_unless_the_peer_is_connected_and_in_sync_and_then_changes_nothing() {
    let mut m = metro(false, "");
    m.b.kill();
    wait_until("A serves alone", Duration::from_secs(20), || serves(&m.a) == Some(true) && ana_of(&m.a) == Some(OPTIMIZED));
    let (ok, out) = switchover(&m.a);
    assert!(!ok && out.contains("the peer link is Down") && out.contains("connected and in sync"), "{out}");
    assert_eq!(serves(&m.a), Some(true), "A still serves");
    let a_status = status_text(&m.a);
    assert!(a_status.contains("serving alone"), "{a_status}");
    // B returns and is resynced; once in sync the switchover is accepted.
    m.b.restart();
    wait_until("both serve", Duration::from_secs(30), || serves(&m.a) == Some(true) && serves(&m.b) == Some(true));
    wait_until("the switchover is accepted", Duration::from_secs(20), || switchover(&m.a).0);
    wait_until("B Optimized", Duration::from_secs(10), || ana_of(&m.b) == Some(OPTIMIZED));
}

#[test]
fn after_a_switchover_the_witness_then_the_link_is_lost_and_the_ordering_site_survives() {
    let mut m = metro(true, "");
    wait_for_witness_in_sync(&m);
    let (ok, out) = switchover(&m.a);
    assert!(ok && out.contains("site 2 orders writes now"), "{out}");
    wait_until("B Optimized", Duration::from_secs(10), || ana_of(&m.b) == Some(OPTIMIZED));
    let mut gens = HashMap::new();
    let (mut paths, monitors) = connect_paths(&[&m.a, &m.b]);
    let r = run_paths(&mut paths, &workload(1, 61), 512, &mut gens, 0, None).unwrap();
    monitors.into_iter().for_each(PathMonitor::stop);
    assert_eq!(r.errors, 0, "{:?}", r.first_error);

    // The witness is lost first: the sites pre-elect B, which orders writes, and A defers.
    m.w.kill();
    wait_until("B is the pre-elected survivor and A defers", Duration::from_secs(20), || {
        status_says(&m.b, "this site survives a link loss") && status_says(&m.a, "the peer survives a link loss")
    });
    m.proxy.as_ref().unwrap().cut();
    wait_until("A fences", Duration::from_secs(10), || write_status(&m.a) == Some(Status::ANA_INACCESSIBLE));
    wait_until("B serves alone", Duration::from_secs(10), || serves(&m.b) == Some(true));
    assert!(status_says(&m.b, "pre-elected survivor"), "{}", status_text(&m.b));
    assert_eq!(ana_of(&m.b), Some(OPTIMIZED));
    let (mut paths, monitors) = connect_paths(&[&m.b]);
    let r = run_paths(&mut paths, &workload(1, 62), 512, &mut gens, 0, None).unwrap();
    monitors.into_iter().for_each(PathMonitor::stop);
    assert_eq!(r.errors, 0, "B serves alone: {:?}", r.first_error);
    assert_eq!(write_status(&m.a), Some(Status::ANA_INACCESSIBLE), "A stays fenced");

    // The witness and the link return: A is resynced from B and holds everything B took.
    m.w.restart();
    m.proxy.as_ref().unwrap().restore();
    wait_until("A serves after its resync", Duration::from_secs(30), || serves(&m.a) == Some(true));
    verify_at(&m.a, &mut gens);
}

/// A verifying load through both sites while the site that orders writes (A, the configured
/// preferred) is stopped with SIGTERM.
#[test]
fn a_clean_stop_of_the_ordering_site_switches_over_first_and_fails_no_command() {
    let mut m = metro(false, "");
    wait_for_witness_in_sync(&m);
    let mut gens = HashMap::new();
    let (mut paths, monitors) = connect_paths(&[&m.a, &m.b]);
    assert_eq!(paths[0].shared.ana.load(Ordering::Acquire), OPTIMIZED, "A orders writes: the host's Optimized path");
    let a = &mut m.a;
    load_through(&mut paths, monitors, &workload(4, 63), &mut gens, Duration::from_millis(1500), move || a.terminate());
    assert!(paths[1].result.ios() > 0, "the load moved to B's path");
    let log = m.a.log();
    assert!(log.contains("clean stop: this site orders writes; switching over to the peer first"), "{log}");
    assert!(log.contains("planned switchover done") && log.contains("planned departure: the peer serves alone"), "{log}");
    assert_eq!(ana_of(&m.b), Some(OPTIMIZED));
    let b_status = status_text(&m.b);
    assert!(b_status.contains("serving alone"), "{b_status}");
    assert!(status_says(&m.b, "the peer stopped (planned)"), "B took over from a departure, not by a failover:\n{b_status}");
    let witness = m.w.config_path.clone();
    wait_until("the witness granted B", Duration::from_secs(10), || witness_view(&witness).is_some_and(|(_, holder, _)| holder == Some(2)));
    verify_at(&m.b, &mut gens);

    // A returns: resynced from B, which keeps ordering.
    m.a.restart();
    wait_until("A serves again", Duration::from_secs(30), || serves(&m.a) == Some(true));
    wait_until("A Non-Optimized, B Optimized after A's return", Duration::from_secs(10), || {
        ana_of(&m.a) == Some(NON_OPTIMIZED) && ana_of(&m.b) == Some(OPTIMIZED)
    });
    verify_at(&m.a, &mut gens);
}

#[test]
fn a_clean_stop_of_the_ordering_site_without_the_witness_says_why_it_does_not_switch_over() {
    let mut m = metro(false, "");
    wait_for_witness_in_sync(&m);
    m.w.kill();
    wait_until("the sites miss the witness", Duration::from_secs(20), || status_says(&m.b, "the peer survives a link loss"));
    m.a.terminate();
    let log = m.a.log();
    assert!(log.contains("clean stop: no switchover to the peer first (the witness does not answer"), "{log}");
    assert!(!log.contains("planned departure: the peer serves alone"), "{log}");
}
