//! A mirror leg whose device fails writes, end to end: each site's local leg is an error bdev
//! (`kind = "error"`) over its file leg, and faults are injected over the site's management
//! socket (`bdev_error_inject`) while a verifying workload runs through both sites.
//!
//! What must hold: every write acknowledged at either site is read back with its content; no read
//! at any site returns stale data; the failing leg records itself Failed and answers ANA
//! Inaccessible (a path error, which hosts retry on the other site); the peer serves on (taking
//! over write ordering when the failing leg was the preferred one) and reports the peer's
//! failure in its status and metrics; after the fault is cleared a resync makes the failed leg
//! UpToDate again and it holds every acknowledged write.

use nvmetro_perf::load::{run_paths, JobResult, Pattern, Workload};
use nvmetro_perf::paths::{ana_state, PathMonitor};
use nvmetro_perf::{ConnectOptions, Host};
use nvmetro_proto::nvme::Status;
use nvmetro_tests::{free_port, mirror_status, rpc, with_error_leg, TargetProcess, HOSTNQN};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2026-11.io.nvmetro:faults-e2e";
/// ANA states as the ANA log reports them.
const ANA_NON_OPTIMIZED: u8 = 2;
/// Each worker's region, in 512-byte blocks: A's worker writes the first 2 MiB, B's the next.
const REGION_A: (u64, u64) = (0, 4096);
const REGION_B: (u64, u64) = (4096, 4096);

/// One site: its local leg is the error bdev `flaky` over the file bdev `leg`; a management
/// socket and a metrics endpoint; `retry` is the mirror's retry_interval.
fn site_config(preferred: bool, link: u16, retry: &str) -> String {
    let target = "socket = \"{DIR}/mgmt.sock\"\n\n[metrics]\naddress = \"127.0.0.1:{PORT2}\"\n";
    with_error_leg(nvmetro_tests::mirror_site_config(NQN, preferred, link, target, &format!("retry_interval = \"{retry}\"")))
}

/// The mirror's status at `t` (nvmetro_status → namespace 1 → mirror).
/// The metrics page of `t`.
fn metrics(t: &TargetProcess) -> String {
    let mut s = TcpStream::connect(t.addr2).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body
}

/// The last lines of a log.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines().find(|l| l.starts_with(name) && l.contains("bdev=\"m\"")).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

fn connect(t: &TargetProcess) -> Option<Host> {
    let mut o = ConnectOptions::new(t.addr, NQN);
    o.hostnqn = HOSTNQN.into();
    o.timeout = Duration::from_secs(3);
    Host::connect(&o).ok()
}

/// The status a 4 KiB write (`write`) or read gets at `t`, on a block outside the workers'
/// regions.
fn io_status(t: &TargetProcess, write: bool) -> Option<Status> {
    let mut h = connect(t)?;
    let cmd = if write { nvmetro_proto::cmds::write(0, 1, 60_000, 8) } else { nvmetro_proto::cmds::read(0, 1, 60_000, 8) };
    let (data, len) = if write { (vec![7; 4096], 0) } else { (vec![], 4096) };
    let (c, _) = h.io_cmd(0, cmd, data, len).ok()?;
    Some(c.status())
}

fn ana_of(t: &TargetProcess) -> Option<u8> {
    let (mut admin, _) = connect(t)?.into_parts();
    ana_state(&mut admin, 1).ok()
}

fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn workload(region: (u64, u64), secs: u64, seed: u64) -> Workload {
    Workload { region, ..nvmetro_tests::mixed_workload(secs, 4, true, seed) }
}

/// A worker through `first` (preferred while it serves) and `second` (where commands go when
/// `first` answers with path errors): runs `wl` and checks that every command completed and
/// every read returned the last acknowledged data.
fn run_through(first: &TargetProcess, second: &TargetProcess, wl: &Workload, gens: &mut HashMap<u64, u64>) -> (JobResult, [u64; 2]) {
    let (mut paths, monitors) = nvmetro_tests::connect_paths(&[first.addr, second.addr], NQN, HOSTNQN);
    let r = run_paths(&mut paths, wl, 512, gens, 0, None).unwrap();
    monitors.into_iter().for_each(PathMonitor::stop);
    assert_eq!(r.errors, 0, "every command completed at one site or the other: {:?}", r.first_error);
    assert!(r.mismatches.is_empty(), "a read returned stale or lost data: {:?}", &r.mismatches[..r.mismatches.len().min(5)]);
    (r, [paths[0].result.ios(), paths[1].result.ios()])
}

/// Reads the whole of `region` at `t` alone and checks every acknowledged block.
fn verify_at(t: &TargetProcess, region: (u64, u64), gens: &mut HashMap<u64, u64>) -> u64 {
    let (mut paths, monitors) = nvmetro_tests::connect_paths(&[t.addr], NQN, HOSTNQN);
    let check = Workload {
        read_pct: 100,
        pattern: Pattern::Sequential,
        max_ios: Some(region.1 / 8),
        duration: Duration::from_secs(120),
        ..workload(region, 0, 1)
    };
    let r = run_paths(&mut paths, &check, 512, gens, 0, None).unwrap();
    monitors.into_iter().for_each(PathMonitor::stop);
    assert_eq!(r.errors, 0, "verify at {}: {:?}", t.addr, r.first_error);
    assert!(r.mismatches.is_empty(), "acknowledged data lost at {}: {:?}", t.addr, &r.mismatches[..r.mismatches.len().min(5)]);
    r.ios()
}

struct Pair {
    a: TargetProcess,
    b: TargetProcess,
}

fn pair(retry: &str) -> Pair {
    let link = free_port();
    let a = TargetProcess::start(&site_config(true, link, retry));
    let b = TargetProcess::start(&site_config(false, link, retry));
    let serves = |t: &TargetProcess| io_status(t, true).is_some_and(Status::is_success);
    wait_until("both sites serve", Duration::from_secs(30), || serves(&a) && serves(&b));
    Pair { a, b }
}

/// How the failing leg recovers once its fault is cleared.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// `mirror_resync` (retry_interval "0s": only on request).
    Rpc,
    /// The mirror retries by itself (retry_interval "1s"; retries while the fault lasts fail
    /// again).
    Timer,
}

/// The figures a scenario reports.
#[derive(Debug)]
struct Figures {
    writes_acknowledged: u64,
    reads_verified: u64,
    faults_injected: u64,
    commands_on_failing_site: u64,
    _commands_moved_to_peer: u64,
}

/// The scenario: the leg at `failing` (A when `preferred`) fails every write with `error`
/// 1.5 s into a verifying workload that runs through both sites.
fn leg_fails(preferred: bool, error: &str, recovery: Recovery) -> Figures {
    let p = pair(if recovery == Recovery::Rpc { "0s" } else { "1s" });
    let (failing, peer) = if preferred { (&p.a, &p.b) } else { (&p.b, &p.a) };
    let (mut gens_a, mut gens_b) = (HashMap::new(), HashMap::new());
    // Data on both legs before the fault.
    run_through(&p.a, &p.b, &workload(REGION_A, 1, 11), &mut gens_a);
    run_through(&p.b, &p.a, &workload(REGION_B, 1, 12), &mut gens_b);

    // A worker at each site (each fails over to the other), the fault injected under them.
    let rules = json!([{"op": "writes", "error": error}]);
    let (ra, rb) = std::thread::scope(|s| {
        let wa = s.spawn(|| run_through(&p.a, &p.b, &workload(REGION_A, 5, 21), &mut gens_a));
        let wb = s.spawn(|| run_through(&p.b, &p.a, &workload(REGION_B, 5, 22), &mut gens_b));
        std::thread::sleep(Duration::from_millis(1500));
        let st = rpc(failing, "bdev_error_inject", json!({"name": "flaky", "rules": rules})).unwrap();
        assert_eq!(st["rules"].as_array().map(Vec::len), Some(1), "{st}");
        let (ra, rb) = (wa.join(), wb.join());
        if ra.is_err() || rb.is_err() {
            panic!(
                "a worker failed (A's: {}, B's: {}); A: {}\n{}\nB: {}\n{}",
                ra.is_err(),
                rb.is_err(),
                mirror_status(&p.a),
                tail(&p.a.log()),
                mirror_status(&p.b),
                tail(&p.b.log())
            );
        }
        (ra.unwrap(), rb.unwrap())
    });
    // Each worker wrote on its own site throughout (the failing site serving through its peer
    // once Failed), moving to the other only for path errors during the change.
    let (own, moved) = if preferred { (ra.1, ra.1[1]) } else { (rb.1, rb.1[1]) };
    assert!(own[0] > 0, "the failing site's worker ran there: {own:?}");
    let writes_acknowledged = ra.0.writes + rb.0.writes;
    let faults = rpc(failing, "bdev_error_stats", json!({"name": "flaky"})).unwrap();
    let faults_injected = faults["injected"]["errors"].as_u64().unwrap();
    assert!(faults_injected > 0, "the leg failed writes: {faults}");
    assert_eq!(rpc(peer, "bdev_error_stats", json!({"name": "flaky"})).unwrap()["injected"]["errors"], 0);

    // The failing leg is Failed and says so; its site serves through the peer (ANA
    // Non-Optimized, every command over the link); the peer serves without it and says so.
    let m = mirror_status(failing);
    assert_eq!(m["disk"], "Failed", "{m}");
    assert!(m["failure"].is_string(), "{m}");
    let mp = mirror_status(peer);
    assert!(mp["peer_failure"].is_string(), "{mp}");
    assert_eq!(
        (mp["disk"].as_str(), mp["peer_disk"].as_str(), mp["serving"].as_bool()),
        (Some("UpToDate"), Some("Failed"), Some(true)),
        "{mp}"
    );
    assert!(mp["role"].as_str().is_some_and(|r| r.starts_with("Preferred")), "the peer orders writes now: {mp}");
    assert!(mp["out_of_sync_bytes"].as_u64().is_some_and(|b| b > 0), "the regions the Failed leg lacks: {mp}");
    // (With a retry timer the leg retries its resync every second: a moment of ANA Change.)
    wait_until("the failed site serves through its peer", Duration::from_secs(10), || {
        let m = mirror_status(failing);
        m["serving"] == true && m["access"].as_str().is_some_and(|a| a.starts_with("serving through the peer"))
    });
    for write in [false, true] {
        wait_until("reads and writes at the failed site succeed (through the peer)", Duration::from_secs(10), || {
            io_status(failing, write).is_some_and(Status::is_success)
        });
        assert!(io_status(peer, write).unwrap().is_success(), "the peer serves");
    }
    wait_until("the failed site's paths are Non-Optimized", Duration::from_secs(10), || ana_of(failing) == Some(ANA_NON_OPTIMIZED));
    let (mf, mpe) = (metrics(failing), metrics(peer));
    assert!(sample(&mf, "nvmetro_mirror_failed_seconds").is_some_and(|s| s >= 0.0), "{mf}");
    assert_eq!(sample(&mpe, "nvmetro_mirror_peer_failed"), Some(1.0), "{mpe}");
    assert_eq!(sample(&mpe, "nvmetro_mirror_failed_seconds"), None, "the peer's own leg did not fail");
    assert!(sample(&mf, "nvmetro_mirror_leg_failures_total").is_some_and(|n| n >= 1.0), "the failure is counted: {mf}");
    assert_eq!(sample(&mpe, "nvmetro_mirror_leg_failures_total"), Some(0.0), "{mpe}");

    // A verifying workload at the failed site, served through the peer, while the leg stays
    // failed (with a timer, its retries fail again meanwhile).
    let (r, _) = run_through(
        failing,
        peer,
        &workload(if preferred { REGION_A } else { REGION_B }, 2, 31),
        if preferred { &mut gens_a } else { &mut gens_b },
    );
    let writes_acknowledged = writes_acknowledged + r.writes;
    if recovery == Recovery::Timer {
        let retried = rpc(failing, "bdev_error_stats", json!({"name": "flaky"})).unwrap()["injected"]["errors"].as_u64().unwrap();
        assert_eq!(mirror_status(failing)["disk"], "Failed", "retries fail while the fault lasts");
        assert!(retried >= faults_injected);
    }

    // Cleared and resynced, the leg is UpToDate, serves again and holds every acknowledged write.
    let cleared = rpc(failing, "bdev_error_clear", json!({"name": "flaky"})).unwrap();
    assert_eq!(cleared["rules"].as_array().map(Vec::len), Some(0), "{cleared}");
    let faults_injected = cleared["injected"]["errors"].as_u64().unwrap();
    if recovery == Recovery::Rpc {
        assert_eq!(rpc(failing, "mirror_resync", json!({"name": "m"})).unwrap(), Value::Bool(true), "the leg was Failed");
    }
    wait_until("the failed leg is UpToDate again", Duration::from_secs(30), || {
        let m = mirror_status(failing);
        m["disk"] == "UpToDate" && m["failure"].is_null() && m["serving"] == true
    });
    wait_until("the peer no longer reports its failure", Duration::from_secs(10), || mirror_status(peer)["peer_failure"].is_null());
    assert_eq!(sample(&metrics(peer), "nvmetro_mirror_peer_failed"), Some(0.0));
    assert_eq!(sample(&metrics(failing), "nvmetro_mirror_failed_seconds"), None);
    wait_until("the recovered leg serves I/O", Duration::from_secs(10), || io_status(failing, true).is_some_and(Status::is_success));
    let mut reads_verified = 0;
    for t in [failing, peer] {
        reads_verified += verify_at(t, REGION_A, &mut gens_a) + verify_at(t, REGION_B, &mut gens_b);
    }
    // And both sites serve a verifying workload again.
    let (r2, _) = run_through(&p.a, &p.b, &workload(REGION_A, 1, 41), &mut gens_a);
    let (r3, _) = run_through(&p.b, &p.a, &workload(REGION_B, 1, 42), &mut gens_b);
    let figures = Figures {
        writes_acknowledged: writes_acknowledged + r2.writes + r3.writes,
        reads_verified,
        faults_injected,
        commands_on_failing_site: own[0],
        _commands_moved_to_peer: moved,
    };
    eprintln!("{} leg, {error}: {figures:?}", if preferred { "preferred" } else { "secondary" });
    figures
}

impl Figures {
    fn check(&self) {
        assert!(self.writes_acknowledged > 100, "{self:?}");
        assert!(self.faults_injected > 0, "{self:?}");
        assert!(self.commands_on_failing_site > 0, "{self:?}");
        // Both regions read back whole at both sites.
        assert_eq!(self.reads_verified, 2 * (REGION_A.1 + REGION_B.1) / 8, "{self:?}");
    }
}

#[test]
fn secondary_leg_out_of_space_fences_it_and_a_resync_brings_it_back() {
    leg_fails(false, "nospace", Recovery::Rpc).check();
}

#[test]
fn secondary_leg_io_errors_fence_it_and_the_retry_timer_brings_it_back() {
    leg_fails(false, "eio", Recovery::Timer).check();
}

#[test]
fn preferred_leg_failing_hands_ordering_to_the_secondary_and_a_resync_brings_it_back() {
    leg_fails(true, "eio", Recovery::Rpc).check();
}

/// The operator's view: `nvmetro error` sets, shows and clears rules; bad rules are refused;
/// the error RPCs refuse bdevs that are not error bdevs.
#[test]
fn nvmetro_error_cli_and_rpcs() {
    let link = free_port();
    let a = TargetProcess::start(&site_config(true, link, "0s"));
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(nvmetro_tests::binary("nvmetro"))
            .arg("--config")
            .arg(&a.config_path)
            .args(args)
            .output()
            .expect("run nvmetro");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
    };
    let (ok, out) = cli(&["error", "flaky"]);
    assert!(ok && out.contains("no rules") && out.contains("over leg"), "{out}");
    let (ok, out) = cli(&["error", "flaky", "--set", r#"[{"op":"read","error":"eio","after":5},{"op":"write","delay_ms":1}]"#]);
    assert!(ok && out.contains("rule 1") && out.contains("rule 2"), "{out}");
    let st = rpc(&a, "bdev_error_stats", json!({"name": "flaky"})).unwrap();
    assert_eq!(st["rules"][0]["rule"]["after"], 5, "{st}");
    let (ok, out) = cli(&["error", "flaky", "--set", r#"{"op":"write"}"#]);
    assert!(!ok && out.contains("injects nothing"), "{out}");
    assert_eq!(
        rpc(&a, "bdev_error_stats", json!({"name": "flaky"})).unwrap()["rules"].as_array().map(Vec::len),
        Some(2),
        "a refused set changes nothing"
    );
    let (ok, out) = cli(&["error", "flaky", "--clear"]);
    assert!(ok && out.contains("no rules"), "{out}");
    // Rules as a string of JSON, as the config takes them.
    rpc(&a, "bdev_error_inject", json!({"name": "flaky", "rules": "{\"op\":\"flush\",\"error\":\"eio\"}"})).unwrap();
    let e =
        rpc(&a, "bdev_error_inject", json!({"name": "flaky", "rules": [{"error": "eio"}, {"op": "read", "colour": "red"}]})).unwrap_err();
    assert!(e.contains("rule 2") && e.contains("colour"), "{e}");
    assert!(rpc(&a, "bdev_error_inject", json!({"name": "m", "rules": {"error": "eio"}})).unwrap_err().contains("not an error bdev"));
    assert!(rpc(&a, "bdev_error_clear", json!({"name": "nothere"})).unwrap_err().contains("no bdev"));
    assert!(rpc(&a, "bdev_error_inject", json!({"name": "flaky"})).unwrap_err().contains("missing rules"));
    let (ok, out) = cli(&["error", "leg"]);
    assert!(!ok && out.contains("not an error bdev"), "{out}");
    let bdevs = rpc(&a, "bdev_get_bdevs", json!({})).unwrap();
    let flaky = bdevs.as_array().unwrap().iter().find(|b| b["name"] == "flaky").unwrap().clone();
    assert_eq!(flaky["error"]["base"], "leg", "{flaky}");
}
