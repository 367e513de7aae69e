//! Two target processes on 127.0.0.1 forming a two-site mirror: writes at either site read back
//! identically at both; SIGKILL of either site mid-write, a restart and a resync lose no
//! acknowledged write (every acknowledged stamp is read back from both sites).

use nvmetro_perf::load::{self, PathIo, Pattern, Workload};
use nvmetro_perf::{ConnectOptions, Host, HostError};
use nvmetro_proto::nvme::Status;
use nvmetro_tests::{free_port, mirror_status, Proxy, TargetProcess, HOSTNQN};
use std::collections::HashMap;
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2026-11.io.nvmetro:metro-e2e";

fn site_config(preferred: bool, link: u16) -> String {
    site_config_with(preferred, link, "")
}

fn site_config_with(preferred: bool, link: u16, extra: &str) -> String {
    nvmetro_tests::mirror_site_config(NQN, preferred, link, "", extra)
}

fn connect(t: &TargetProcess) -> Result<Host, HostError> {
    let mut o = ConnectOptions::new(t.addr, NQN);
    o.hostnqn = HOSTNQN.into();
    o.timeout = Duration::from_secs(5);
    Host::connect(&o)
}

/// Waits until a write through `t` succeeds (its leg serves: in sync, or the survivor).
fn wait_serving(t: &TargetProcess) -> Host {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut h) = connect(t) {
            if let Ok((c, _)) = h.io_cmd(0, nvmetro_proto::cmds::read(0, 1, 0, 1), vec![], 512) {
                if c.status().is_success() {
                    return h;
                }
            }
        }
        assert!(Instant::now() < deadline, "site {} never started serving:\n{}", t.addr, t.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn workload(read_pct: u32, secs: u64, verify: bool) -> Workload {
    Workload {
        nsid: 1,
        pattern: Pattern::Random,
        read_pct,
        block_size: 4096,
        qd: 8,
        duration: Duration::from_secs(secs),
        ramp: Duration::ZERO,
        max_ios: None,
        rate: None,
        verify,
        region: (0, 16384), // the first 8 MiB
        seed: 3,
    }
}

/// Reads every block of the region through `h` and checks it against `gens`.
fn verify_all(h: Host, gens: &mut HashMap<u64, u64>) -> usize {
    // The admin queue stays open for the run: without it the controller (and its I/O queues) goes.
    let (_admin, mut io) = h.into_parts();
    let mut path = PathIo::single(io.remove(0));
    let check = Workload {
        read_pct: 100,
        pattern: Pattern::Sequential,
        max_ios: Some(16384 / 8),
        duration: Duration::from_secs(120),
        ..workload(100, 0, true)
    };
    let r = load::run(&mut path, &check, 512, gens).unwrap();
    assert_eq!(r.errors, 0, "{:?}", r.first_error);
    assert!(r.mismatches.is_empty(), "acknowledged data lost: {:?}", &r.mismatches[..r.mismatches.len().min(5)]);
    r.ios() as usize
}

fn pair() -> (TargetProcess, TargetProcess) {
    let link = free_port();
    let a = TargetProcess::start(&site_config(true, link));
    let b = TargetProcess::start(&site_config(false, link));
    (a, b)
}

#[test]
fn writes_at_either_site_read_back_identically_at_both() {
    let (a, b) = pair();
    let mut ha = wait_serving(&a);
    let mut hb = wait_serving(&b);
    ha.write(1, 10, vec![0xa1; 4096], 512).unwrap();
    assert_eq!(hb.read(1, 10, 8, 512).unwrap(), vec![0xa1; 4096], "A's write is on B");
    hb.write(1, 100, vec![0xb2; 8192], 512).unwrap();
    assert_eq!(ha.read(1, 100, 16, 512).unwrap(), vec![0xb2; 8192], "B's write is on A");

    // Both sites write the same blocks at once; afterwards both copies agree byte for byte.
    let da = both_sites_write_the_same_blocks(&a, &b, 0);
    assert!(da.iter().any(|&x| x != 0));
}

/// Both sites write the same 256 blocks from `lba` on at once, 2 s; returns the copy, which is
/// the same at both.
fn both_sites_write_the_same_blocks(a: &TargetProcess, b: &TargetProcess, lba: u64) -> Vec<u8> {
    let run = |h: Host, seed: u64| {
        std::thread::spawn(move || {
            let (_admin, mut io) = h.into_parts();
            let mut p = PathIo::single(io.remove(0));
            let wl = Workload { region: (lba, 256), seed, ..workload(0, 2, false) };
            load::run(&mut p, &wl, 512, &mut HashMap::new()).unwrap()
        })
    };
    let (ta, tb) = (run(wait_serving(a), 1), run(wait_serving(b), 2));
    let (ra, rb) = (ta.join().unwrap(), tb.join().unwrap());
    assert_eq!((ra.errors, rb.errors), (0, 0));
    assert!(ra.ios() > 50 && rb.ios() > 50, "both sites wrote: {} {}", ra.ios(), rb.ios());
    let (da, db) = (connect(a).unwrap().read(1, lba, 256, 512).unwrap(), connect(b).unwrap().read(1, lba, 256, 512).unwrap());
    assert!(da == db, "the two copies differ after concurrent writes at both sites");
    da
}

#[test]
fn sigkill_of_the_secondary_mid_write_loses_nothing() {
    let (a, b) = pair();
    let _ = wait_serving(&b);
    kill_the_secondary_mid_write(&a, b, |_| {});
}

/// A verifying workload on A; B dies in the middle of it; `restarted` runs once B is back.
/// B resyncs, and then both sites hold every acknowledged write.
fn kill_the_secondary_mid_write(a: &TargetProcess, mut b: TargetProcess, restarted: impl FnOnce(&TargetProcess)) {
    let (_admin, mut io) = wait_serving(a).into_parts();
    let mut path = PathIo::single(io.remove(0));
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(700));
        b.kill();
        b
    });
    let mut gens = HashMap::new();
    let r = load::run(&mut path, &workload(30, 2, true), 512, &mut gens).unwrap();
    let mut b = killer.join().unwrap();
    assert_eq!(r.errors, 0, "the preferred site kept serving: {:?}", r.first_error);
    assert!(r.mismatches.is_empty());
    b.restart();
    restarted(&b);
    let n = verify_all(wait_serving(&b), &mut gens);
    assert!(n >= 2048, "read back the whole region: {n}");
    verify_all(wait_serving(a), &mut gens);
}

/// Waits until both sites show `lanes` lanes up on a connected link, `on_reactors` of them
/// driven by reactors other than the link's.
fn wait_lanes(a: &TargetProcess, b: &TargetProcess, lanes: u64, on_reactors: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (ma, mb) = (mirror_status(a), mirror_status(b));
        if [&ma, &mb]
            .iter()
            .all(|m| m["lanes_up"] == lanes && m["lanes"] == lanes && m["lanes_on_reactors"] == on_reactors && m["link"] == "Connected")
        {
            return;
        }
        assert!(Instant::now() < deadline, "the link never had {lanes} lanes: {ma} {mb}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Over a link of three lanes (three TCP connections between the processes, each site with two
/// reactors: the link on one, the workers of lanes 1 and 2 on the other): concurrent writes at
/// both sites leave identical copies, and a SIGKILL of the secondary mid-write, its restart and
/// the resync lose no acknowledged write; the link comes back with its three lanes.
#[test]
fn over_three_lanes_both_sites_agree_and_a_sigkill_of_the_secondary_loses_nothing() {
    let link = free_port();
    let site = |preferred| {
        nvmetro_tests::mirror_site_config(NQN, preferred, link, "socket = \"{DIR}/mgmt.sock\"", "lanes = 3")
            .replace("cores = [0]", "cores = [0, 1]")
    };
    let a = TargetProcess::start(&site(true));
    let b = TargetProcess::start(&site(false));
    wait_lanes(&a, &b, 3, 2);
    let ups = mirror_status(&a)["link_ups"].as_u64().unwrap();
    // Past the region the verifying workload below checks (it expects what it did not write to
    // be zeroes).
    both_sites_write_the_same_blocks(&a, &b, 20_000);
    assert_eq!(mirror_status(&a)["link_ups"], ups, "the link stayed up");
    assert!(mirror_status(&a)["last_link_down"].is_null(), "the link has not been down");
    assert!(mirror_status(&a)["frames_sent_by_reactors"].as_u64().is_some_and(|n| n > 0), "the workers sent the writes' frames");
    kill_the_secondary_mid_write(&a, b, |b| wait_lanes(&a, b, 3, 2));
    // Status says why the link went down: B's connections closed under its SIGKILL.
    let down = &mirror_status(&a)["last_link_down"];
    assert!(down["why"].as_str().is_some_and(|w| w.contains("closed") || w.contains("reset")), "{down}");
    assert!(down["seconds_ago"].is_u64(), "{down}");
}

#[test]
fn sigkill_of_the_preferred_fences_the_secondary_until_it_returns() {
    let (mut a, b) = pair();
    let _ = wait_serving(&a);
    let hb = wait_serving(&b);
    let (_admin, mut io) = hb.into_parts();
    let mut path = PathIo::single(io.remove(0));
    let mut gens = HashMap::new();
    let r = load::run(&mut path, &workload(30, 1, true), 512, &mut gens).unwrap();
    assert_eq!(r.errors, 0);
    a.kill();
    // Without the preferred site B may not serve: I/O there fails with a path error.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut h = connect(&b).unwrap();
        let (c, _) = h.io_cmd(0, nvmetro_proto::cmds::write(0, 1, 0, 1), vec![1; 512], 0).unwrap();
        if c.status() == Status::ANA_INACCESSIBLE {
            break;
        }
        assert!(Instant::now() < deadline, "B kept serving without A: {:?}", c.status());
        std::thread::sleep(Duration::from_millis(100));
    }
    a.restart();
    let ha = wait_serving(&a);
    verify_all(ha, &mut gens);
    verify_all(wait_serving(&b), &mut gens);
}

#[test]
fn cutting_and_restoring_the_link() {
    let link = free_port();
    let a = TargetProcess::start(&site_config(true, link));
    let proxy = Proxy::start(format!("127.0.0.1:{link}").parse().unwrap());
    let b = TargetProcess::start(&site_config(false, proxy.addr.port()));
    let _ = wait_serving(&b);
    let ha = wait_serving(&a);
    let (_admin, mut io) = ha.into_parts();
    let mut path = PathIo::single(io.remove(0));
    let mut gens = HashMap::new();
    let cutter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(500));
        proxy.cut();
        proxy
    });
    let r = load::run(&mut path, &workload(30, 2, true), 512, &mut gens).unwrap();
    let proxy = cutter.join().unwrap();
    assert_eq!(r.errors, 0, "the preferred site kept serving through the cut: {:?}", r.first_error);
    // While cut, B is fenced.
    let mut hb = connect(&b).unwrap();
    let (c, _) = hb.io_cmd(0, nvmetro_proto::cmds::read(0, 1, 0, 1), vec![], 512).unwrap();
    assert_eq!(c.status(), Status::ANA_INACCESSIBLE);
    proxy.restore();
    verify_all(wait_serving(&b), &mut gens);
}

#[test]
fn restarting_the_survivor_during_a_resync() {
    // A slow resync (1 MiB/s over 8 MiB of dirty regions) gives time to kill A in the middle.
    let link = free_port();
    let extra = "resync_rate = \"1MiB\"";
    let mut a = TargetProcess::start(&site_config_with(true, link, extra));
    let mut b = TargetProcess::start(&site_config_with(false, link, extra));
    let _ = wait_serving(&b);
    b.kill();
    let ha = wait_serving(&a);
    let (_admin, mut io) = ha.into_parts();
    let mut path = PathIo::single(io.remove(0));
    let mut gens = HashMap::new();
    // (The first writes alone wait until B's lease has surely lapsed: long enough a run leaves
    // many regions dirty after that.)
    let r = load::run(&mut path, &workload(0, 4, true), 512, &mut gens).unwrap();
    assert_eq!(r.errors, 0);
    drop(path);
    b.restart();
    std::thread::sleep(Duration::from_millis(1500));
    let mut hb = connect(&b).unwrap();
    let (c, _) = hb.io_cmd(0, nvmetro_proto::cmds::read(0, 1, 0, 1), vec![], 512).unwrap();
    assert_eq!(c.status(), Status::ANA_INACCESSIBLE, "B is still a resync target");
    a.kill();
    a.restart();
    // The resync resumes from the persistent bitmap and completes; nothing acknowledged is lost.
    let a_host = wait_serving(&a);
    verify_all(a_host, &mut gens);
    let deadline = Instant::now() + Duration::from_secs(60);
    let hb = loop {
        if let Ok(mut h) = connect(&b) {
            if h.io_cmd(0, nvmetro_proto::cmds::read(0, 1, 0, 1), vec![], 512).is_ok_and(|(c, _)| c.status().is_success()) {
                break h;
            }
        }
        assert!(Instant::now() < deadline, "resync did not finish");
        std::thread::sleep(Duration::from_millis(200));
    };
    verify_all(hb, &mut gens);
}

#[test]
fn compare_and_write_is_atomic_across_both_sites() {
    // Hosts at both sites increment one counter block with read + fused Compare+Write (as VMFS
    // does its locking): the final count must equal the successful Compare+Writes of both.
    let (a, b) = pair();
    let _ = wait_serving(&b);
    let mut ha = wait_serving(&a);
    ha.write(1, 200, vec![0; 512], 512).unwrap();
    let run = |h: Host| {
        std::thread::spawn(move || {
            let (_admin, mut io) = h.into_parts();
            nvmetro_tests::caw_increment(&mut io[0], 200, 150)
        })
    };
    let (ta, tb) = (run(ha), run(wait_serving(&b)));
    let total = ta.join().unwrap() + tb.join().unwrap();
    let mut ha = connect(&a).unwrap();
    let mut hb = connect(&b).unwrap();
    let at_a = u64::from_le_bytes(ha.read(1, 200, 1, 512).unwrap()[..8].try_into().unwrap());
    let at_b = u64::from_le_bytes(hb.read(1, 200, 1, 512).unwrap()[..8].try_into().unwrap());
    assert_eq!((at_a, at_b), (total, total), "every successful Compare+Write counted once, on both sites");
    assert!(total >= 150);
}

#[test]
fn a_second_process_on_the_same_files_refuses_to_start() {
    let link = free_port();
    let a = TargetProcess::start(&site_config_with(true, link, ""));
    let _ = wait_serving(&a);
    // The same leg and metadata files, other ports and socket: a second writer to be.
    let log = TargetProcess::start_expecting_refusal(&site_config_with(true, free_port(), ""), a.scratch());
    let leg = a.scratch().join("leg.img");
    assert!(log.contains(&leg.display().to_string()), "the refusal names the file: {log}");
    assert!(log.contains("holds its lock"), "and says which process holds it: {log}");
    // The first site never noticed.
    let _ = wait_serving(&a);
}
