//! Disaster recovery at a third site: a consistency group of two namespaces at the production
//! site streamed to a DR site, each a real `nvmetro-tgt` process, and a host on NVMe/TCP.
//!
//! The crash-consistency workload writes dependent pairs: a data block on namespace 1, and,
//! once it completed, a commit record on namespace 2 naming it. At every cut (the DR site
//! killed mid-stream, the production site killed mid-stream) the DR image must never show a
//! commit whose data is missing.

use nvmetro_perf::{ConnectOptions, Host};
use nvmetro_tests::{rpc, wait_until, TargetProcess, HOSTNQN};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const NQN: &str = "nqn.2026-12.io.nvmetro:dr";
const SECRET: &str = "dr-stream-secret-0123456789";
/// Each member: 4 MiB of 512-byte blocks.
const MEMBER: u64 = 4 << 20;
const STREAMS: u64 = 4;
/// Data slots per stream on namespace 1 and commit slots per stream on namespace 2.
const DATA_SLOTS: u64 = 1000;
const COMMIT_SLOTS: u64 = 8;

fn dr_site_config() -> String {
    nvmetro_tests::dr_site_toml(&[("dr0", MEMBER), ("dr1", MEMBER)], SECRET)
}

/// The DR site with its members given to hosts (Inaccessible until promoted).
fn dr_site_serving_config() -> String {
    dr_site_config().replace(
        "[[subsystem.namespace]]\nnsid = 1\nbdev = \"ram\"",
        "[[subsystem.namespace]]\nnsid = 1\nbdev = \"dr0\"\n\n[[subsystem.namespace]]\nnsid = 2\nbdev = \"dr1\"",
    )
}

fn production_config(dr: std::net::SocketAddr, extra: &str) -> String {
    format!(
        r#"
[target]
cores = [0]
socket = "{{DIR}}/mgmt.sock"

[[bdev]]
name = "p0"
kind = "file"
path = "{{DIR}}/p0.img"
size = "{MEMBER}"

[[bdev]]
name = "p1"
kind = "file"
path = "{{DIR}}/p1.img"
size = "{MEMBER}"

[[subsystem]]
nqn = "{NQN}"
allow_any_host = true

[[subsystem.namespace]]
nsid = 1
bdev = "p0"

[[subsystem.namespace]]
nsid = 2
bdev = "p1"

[[listener]]
address = "127.0.0.1:{{PORT}}"

[[dr_group]]
name = "g1"
members = ["p0", "p1"]
dr_site = "{dr}"
state = "{{DIR}}/g1.dr"
secret = "{SECRET}"
{extra}
"#
    )
}

fn host(t: &TargetProcess) -> Host {
    host_of(t, NQN)
}

fn host_of(t: &TargetProcess, nqn: &str) -> Host {
    let mut o = ConnectOptions::new(t.addr, nqn);
    o.hostnqn = HOSTNQN.into();
    o.kato_ms = 0;
    o.timeout = Duration::from_secs(20);
    Host::connect(&o).expect("connect to the production site")
}

fn write(h: &mut Host, nsid: u32, lba: u64, data: Vec<u8>) -> bool {
    let blocks = (data.len() / 512) as u32;
    match h.io_cmd(0, nvmetro_proto::cmds::write(0, nsid, lba, blocks), data, 0) {
        Ok((c, _)) => c.status().is_success(),
        Err(_) => false,
    }
}

/// A block holding (stream, n, extra) repeated.
fn record(stream: u64, n: u64, extra: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(512);
    while b.len() < 512 {
        b.extend_from_slice(&(stream + 1).to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&extra.to_le_bytes());
        b.extend_from_slice(&0x4e564d4554524f21u64.to_le_bytes());
    }
    b
}

/// (stream, n, extra) of a block, or None for a block never written (or torn).
fn parse(b: &[u8]) -> Option<(u64, u64, u64)> {
    let word = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    (word(0) != 0 && word(3) == 0x4e564d4554524f21 && b[..32].repeat(16) == b[..512]).then(|| (word(0) - 1, word(1), word(2)))
}

fn data_lba(stream: u64, n: u64) -> u64 {
    stream * DATA_SLOTS + n % DATA_SLOTS
}

/// Streams of dependent pairs until `stop`: returns how many pairs completed, per stream.
fn dependent_pairs(t: &TargetProcess, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) -> Vec<std::thread::JoinHandle<u64>> {
    (0..STREAMS)
        .map(|s| {
            let mut h = host(t);
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let lba = data_lba(s, n);
                    if !write(&mut h, 1, lba, record(s, n, lba)) {
                        break;
                    }
                    // Only after the data completed: the commit depends on it.
                    if !write(&mut h, 2, s * COMMIT_SLOTS + n % COMMIT_SLOTS, record(s, n, lba)) {
                        break;
                    }
                    n += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                n
            })
        })
        .collect()
}

/// Checks an image of the group: every commit record's data is there (the same or a later
/// write of its slot). Returns how many commits the image holds.
fn check_image(data: &[u8], commits: &[u8], what: &str) -> usize {
    let mut found = 0;
    for (i, c) in commits.chunks(512).enumerate().take((STREAMS * COMMIT_SLOTS) as usize) {
        let Some((s, n, lba)) = parse(c) else { continue };
        assert_eq!(s, i as u64 / COMMIT_SLOTS, "{what}: commit slot {i} holds stream {s}'s record");
        assert_eq!(lba, data_lba(s, n), "{what}: commit {s}/{n} names the wrong block");
        let block = &data[lba as usize * 512..lba as usize * 512 + 512];
        match parse(block) {
            Some((ds, dn, _)) if ds == s && dn >= n => found += 1,
            other => panic!("{what}: commit {s}/{n} is in the DR image but its data block {lba} holds {other:?}"),
        }
    }
    found
}

fn dr_image(dr: &TargetProcess, what: &str) -> usize {
    let data = std::fs::read(dr.scratch().join("dr0.img")).expect("dr0");
    let commits = std::fs::read(dr.scratch().join("dr1.img")).expect("dr1");
    check_image(&data, &commits, what)
}

fn dr_status(t: &TargetProcess) -> serde_json::Value {
    rpc(t, "dr_status", serde_json::json!({})).expect("dr_status")
}

fn consistent(dr: &TargetProcess) -> bool {
    dr_status(dr)["replicas"][0]["consistent"] == serde_json::Value::Bool(true)
}

/// Waits until the DR site holds everything the production site numbered, then compares the
/// members byte for byte.
fn wait_caught_up_and_compare(p: &TargetProcess, dr: &TargetProcess) {
    // The status is a snapshot (published every 100 ms): the images themselves decide.
    let differ = || {
        [("p0.img", "dr0.img"), ("p1.img", "dr1.img")].into_iter().find_map(|(a, b)| {
            let (x, y) = (std::fs::read(p.scratch().join(a)).expect(a), std::fs::read(dr.scratch().join(b)).expect(b));
            let first = x.iter().zip(&y).position(|(p, q)| p != q)?;
            Some(format!("{a} and the DR site's {b} differ, first at byte {first}: {} vs {}", x[first], y[first]))
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let g = &dr_status(p)["groups"][0];
        let caught_up = consistent(dr) && g["connected"] == true && g["behind_writes"] == 0 && g["copy"].is_null();
        let why = if caught_up { differ() } else { Some(format!("not caught up: {g}")) };
        match why {
            None => return,
            Some(why) => assert!(std::time::Instant::now() < deadline, "the DR site did not catch up: {why}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_dr_image_of_a_group_never_shows_a_commit_without_its_data_at_any_cut_and_catches_up_after_a_crash() {
    let mut dr = TargetProcess::start(&dr_site_config());
    // Data from before the group existed reaches the DR site through the full copy.
    let p_config = production_config(dr.addr2, "");
    let alone = &p_config[..p_config.find("[[dr_group]]").expect("group")];
    let mut p = TargetProcess::start(alone);
    {
        let mut h = host(&p);
        assert!(write(&mut h, 1, 7000, vec![0xab; 4096]));
    }
    // The group is added (a restart) to a namespace that holds data.
    p.terminate();
    let text = std::fs::read_to_string(&p.config_path).expect("config");
    std::fs::write(
        &p.config_path,
        text + &p_config[p_config.find("[[dr_group]]").expect("group")..].replace("{DIR}", &p.scratch().display().to_string()),
    )
    .expect("config");
    p.restart();
    wait_caught_up_and_compare(&p, &dr);
    assert!(dr.log().contains("the DR image is consistent"), "{}", dr.log());
    // The copy compared every region (read once for its checksum) and sent only the one ever
    // written (read again for its data).
    let last = &dr_status(&p)["groups"][0]["last_copy"];
    assert_eq!((last["read_bytes"].as_u64(), last["sent_bytes"].as_u64()), (Some(2 * MEMBER + (1 << 20)), Some(1 << 20)), "{last}");

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writers = dependent_pairs(&p, stop.clone(), done.clone());
    // Cuts at the DR site: SIGKILL mid-stream, the image checked as the disk holds it, back up.
    let mut rng = nvmetro_tests::stamped::Rng(nvmetro_tests::stamped::seed("dr_cuts"));
    let mut commits_seen = 0;
    for cut in 0..4 {
        let at = done.load(Ordering::Relaxed) + 50 + rng.below(300);
        wait_until("the host wrote more pairs", Duration::from_secs(60), || done.load(Ordering::Relaxed) >= at);
        dr.kill();
        commits_seen = commits_seen.max(dr_image(&dr, &format!("DR site killed, cut {cut}")));
        dr.restart();
    }
    // And the production site dies mid-stream.
    let at = done.load(Ordering::Relaxed) + 200;
    wait_until("the host wrote more pairs", Duration::from_secs(60), || done.load(Ordering::Relaxed) >= at);
    p.kill();
    stop.store(true, Ordering::Relaxed);
    let pairs: u64 = writers.into_iter().map(|w| w.join().expect("writer")).sum();
    // Whatever reached the DR site is applied (or not) epoch by epoch.
    wait_until("the DR site has applied what it received", Duration::from_secs(20), || {
        dr_status(&dr)["replicas"][0]["connected"] == serde_json::Value::Bool(false)
    });
    dr.kill();
    let after_crash = dr_image(&dr, "production site killed");
    commits_seen = commits_seen.max(after_crash);
    eprintln!("dependent pairs written: {pairs}; commits in the DR image at the cuts: up to {commits_seen}, after the production crash {after_crash}");
    assert!(commits_seen >= STREAMS as usize, "the DR image holds commits ({commits_seen} of {pairs} pairs written)");

    // The production site comes back: its lost send buffer means a new full copy.
    dr.restart();
    p.restart();
    assert!(p.log().contains("the last stop was not clean"), "{}", p.log());
    {
        let mut h = host(&p);
        assert!(write(&mut h, 2, 7000, vec![0xcd; 4096]));
    }
    wait_caught_up_and_compare(&p, &dr);
    assert!(dr.log().contains("DR stream restarts after"), "{}", dr.log());
    // Only what the DR image missed travelled: the pairs' regions at most, not the members.
    let last = &dr_status(&p)["groups"][0]["last_copy"];
    let sent = last["sent_bytes"].as_u64().unwrap_or(u64::MAX);
    eprintln!("copy after the crash: {last}");
    assert!(last["read_bytes"].as_u64() == Some(2 * MEMBER + sent) && sent <= 4 << 20, "{last}");
    // A clean stop leaves nothing behind: the next start resumes without a copy.
    p.terminate();
    let state = std::fs::read_to_string(p.scratch().join("g1.dr")).expect("state");
    assert!(state.contains("clean = 1"), "{state}");
    let before = p.log().len();
    p.restart();
    {
        let mut h = host(&p);
        assert!(write(&mut h, 1, 100, vec![0x11; 512]));
    }
    wait_caught_up_and_compare(&p, &dr);
    let log = p.log();
    assert!(
        !log[before..].contains("not clean") && !log[before..].contains("full copy"),
        "a clean restart copies nothing again: {}",
        &log[before..]
    );
}

/// A member read whole through NVMe/TCP.
fn read_member(h: &mut Host, nsid: u32) -> Vec<u8> {
    let mut image = Vec::new();
    for lba in (0..MEMBER / 512).step_by(256) {
        let (c, data) = h.io_cmd(0, nvmetro_proto::cmds::read(0, nsid, lba, 256), Vec::new(), 256 * 512).expect("read");
        assert!(c.status().is_success(), "read nsid {nsid} lba {lba}: {:?}", c.status());
        image.extend_from_slice(&data);
    }
    image
}

fn promote(dr: &TargetProcess, force: bool) -> Result<serde_json::Value, String> {
    rpc(dr, "dr_promote", serde_json::json!({"group": "g1", "force": force}))
}

#[test]
fn a_promotion_is_refused_while_production_streams_then_serves_the_consistent_image_and_refuses_the_stream() {
    let mut dr = TargetProcess::start(&dr_site_serving_config());
    let mut p = TargetProcess::start(&production_config(dr.addr2, ""));
    wait_caught_up_and_compare(&p, &dr);
    const DR_NQN: &str = "nqn.2026-12.io.nvmetro:dr-site";
    let mut at_dr = host_of(&dr, DR_NQN);
    let (c, _) = at_dr.io_cmd(0, nvmetro_proto::cmds::write(0, 1, 0, 1), vec![1; 512], 0).expect("write at the DR site");
    assert!(!c.status().is_success(), "an unpromoted DR image takes no host write");
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let writers = dependent_pairs(&p, stop.clone(), done.clone());
    wait_until("the host wrote pairs", Duration::from_secs(60), || done.load(Ordering::Relaxed) >= 300);
    let e = promote(&dr, false).expect_err("refused while the production site streams");
    assert!(e.contains("streaming to this DR site now") && e.contains("--force"), "{e}");
    // The production site is lost mid-stream; the DR image is promoted.
    p.kill();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().expect("writer");
    }
    wait_until("the stream is gone", Duration::from_secs(20), || dr_status(&dr)["replicas"][0]["connected"] == false);
    let what = promote(&dr, false).expect("promoted");
    assert!(what.as_str().unwrap_or("").contains("promoted"), "{what}");
    // Hosts read the last consistent image through NVMe and may write.
    let mut at_dr = host_of(&dr, DR_NQN);
    let (data, commits) = (read_member(&mut at_dr, 1), read_member(&mut at_dr, 2));
    let found = check_image(&data, &commits, "the promoted DR image read by a host");
    assert!(found >= STREAMS as usize, "the promoted image holds {found} commits");
    assert!(write(&mut at_dr, 1, 0, vec![2; 512]), "a promoted DR image takes host writes");
    // The old production site returns: its stream is refused, and stays refused across restarts.
    p.restart();
    wait_until("the production site sees the promotion", Duration::from_secs(30), || {
        dr_status(&p)["groups"][0]["state"].as_str().unwrap_or("").contains("promoted")
    });
    dr.restart();
    assert_eq!(dr_status(&dr)["replicas"][0]["promoted"], true);
    let mut at_dr = host_of(&dr, DR_NQN);
    assert!(write(&mut at_dr, 2, 0, vec![3; 512]), "still promoted after a restart");
    let before = read_member(&mut at_dr, 1);
    assert_eq!(&before[..512], &[2; 512][..], "the host's write, not the stream's");
}

fn dr_test(dr: &TargetProcess, action: &str) -> Result<serde_json::Value, String> {
    rpc(dr, "dr_test", serde_json::json!({"group": "g1", "action": action}))
}

/// `len` bytes of `byte` written at `lba` of both production namespaces, in 64 KiB commands.
fn fill(h: &mut Host, lba: u64, len: u64, byte: u8) {
    for nsid in [1, 2] {
        for at in (0..len).step_by(64 << 10) {
            assert!(write(h, nsid, lba + at / 512, vec![byte; (64 << 10).min(len - at) as usize]), "nsid {nsid} at {at}");
        }
    }
}

#[test]
fn a_dr_test_view_is_a_writable_point_in_time_image_while_the_stream_keeps_arriving_and_leaves_no_trace() {
    const DR_NQN: &str = "nqn.2026-12.io.nvmetro:dr-site";
    let dr = TargetProcess::start(&dr_site_serving_config());
    let p = TargetProcess::start(&production_config(dr.addr2, ""));
    let mut h = host(&p);
    fill(&mut h, 0, 1 << 20, 0xa1);
    wait_caught_up_and_compare(&p, &dr);
    let pit = [std::fs::read(p.scratch().join("p0.img")).expect("p0"), std::fs::read(p.scratch().join("p1.img")).expect("p1")];
    let e = dr_test(&dr, "stop").expect_err("nothing to discard");
    assert!(e.contains("no DR test view is open"), "{e}");

    let what = dr_test(&dr, "start").expect("a test view opens while the stream is connected");
    assert!(what.as_str().unwrap_or("").contains("test view open"), "{what}");
    let e = dr_test(&dr, "start").expect_err("one view at a time");
    assert!(e.contains("open already"), "{e}");
    let e = promote(&dr, true).expect_err("no promotion over an open test");
    assert!(e.contains("discard it first"), "{e}");
    let mut at_dr = host_of(&dr, DR_NQN);
    assert_eq!([read_member(&mut at_dr, 1), read_member(&mut at_dr, 2)], pit, "the view is the image as it was");

    // The production site overwrites what the view shows and more; the stream is applied (the
    // image follows the production site), the view does not change.
    // A reader at the DR site checks the view all along, as the stream's writes land.
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, pit, addr) = (stop.clone(), pit.clone(), dr.addr);
        std::thread::spawn(move || {
            let mut o = ConnectOptions::new(addr, DR_NQN);
            o.hostnqn = HOSTNQN.into();
            o.kato_ms = 0;
            let mut h = Host::connect(&o).expect("connect to the DR site");
            let mut rounds = 0;
            while !stop.load(Ordering::Relaxed) || rounds == 0 {
                assert_eq!([read_member(&mut h, 1), read_member(&mut h, 2)], pit, "round {rounds}: the view changed under the stream");
                rounds += 1;
            }
            rounds
        })
    };
    fill(&mut h, 1024, 2 << 20, 0xb2);
    wait_caught_up_and_compare(&p, &dr);
    stop.store(true, Ordering::Relaxed);
    let rounds = reader.join().expect("the view never changed while the stream was applied");
    eprintln!("the view was read whole {rounds} times while the stream was applied");
    assert_eq!([read_member(&mut at_dr, 1), read_member(&mut at_dr, 2)], pit, "the view kept the image's bytes the stream overwrote");
    let view = &dr_status(&dr)["replicas"][0]["test_view"];
    assert!(view["held_bytes"].as_u64().is_some_and(|b| b >= 2 * (2 << 20)), "it holds what the stream overwrote: {view}");

    // The DR test's host writes into the view: it reads its own writes, the image never sees
    // them, and the stream's later writes there do not reach the view.
    assert!(write(&mut at_dr, 1, 8, vec![0xc3; 4096]), "the view takes host writes");
    assert!(write(&mut at_dr, 2, 4096, vec![0xc4; 8192]));
    fill(&mut h, 0, 8192, 0xd5);
    wait_caught_up_and_compare(&p, &dr);
    let mut expected = pit.clone();
    expected[0][8 * 512..8 * 512 + 4096].fill(0xc3);
    expected[1][4096 * 512..4096 * 512 + 8192].fill(0xc4);
    assert_eq!([read_member(&mut at_dr, 1), read_member(&mut at_dr, 2)], expected, "the view: its own writes over the image as it was");

    // Discarded: the namespaces are Inaccessible again, the store is gone, the image is the
    // production site's (the test left no trace) and the stream goes on.
    let what = dr_test(&dr, "stop").expect("discarded");
    assert!(what.as_str().unwrap_or("").contains("discarded"), "{what}");
    assert!(!write(&mut at_dr, 1, 0, vec![1; 512]), "no view, no host writes");
    assert!(!dr.scratch().join("g1.view0").exists() && !dr.scratch().join("g1.view1").exists(), "the view's stores are removed");
    fill(&mut h, 2048, 4096, 0xe6);
    wait_caught_up_and_compare(&p, &dr);
    assert!(dr_status(&dr)["replicas"][0]["test_view"].is_null());
}

#[test]
fn a_promotion_during_a_copy_rolls_the_image_back_to_its_last_consistent_state_even_after_a_crash() {
    let mut dr = TargetProcess::start(&dr_site_config());
    let mut p = TargetProcess::start(&production_config(dr.addr2, ""));
    let mut h = host(&p);
    fill(&mut h, 0, 256 << 10, 0xa1);
    wait_caught_up_and_compare(&p, &dr);
    drop(h);
    // The production site crashes; the DR image, consistent, is what it last applied.
    p.kill();
    wait_until("the stream is gone", Duration::from_secs(20), || dr_status(&dr)["replicas"][0]["connected"] == false);
    let dir = dr.scratch().clone();
    let image = || [std::fs::read(dir.join("dr0.img")).expect("dr0"), std::fs::read(dir.join("dr1.img")).expect("dr1")];
    let last_consistent = image();
    assert_eq!(dr_status(&dr)["replicas"][0]["consistent"], true);
    // It comes back over a slow link (1 s each way): a Rebase and a copy, during which its new
    // writes overwrite the DR image (not consistent until the copy ends).
    let text = std::fs::read_to_string(&p.config_path).expect("config");
    std::fs::write(&p.config_path, text.replace("[[dr_group]]\n", "[[dr_group]]\nlink_delay = \"1s\"\n")).expect("config");
    p.restart();
    let mut h = host(&p);
    fill(&mut h, 64, 512 << 10, 0xb2);
    wait_until("the DR image holds new writes over its last consistent state", Duration::from_secs(30), || {
        let r = &dr_status(&dr)["replicas"][0];
        r["consistent"] == false && r["last_consistent"]["kept_bytes"].as_u64().unwrap_or(0) > 0
    });
    // The production site is lost again before the copy ends, and the DR site crashes too.
    p.kill();
    assert_ne!(image(), last_consistent, "the copy overwrote the image");
    dr.kill();
    dr.restart();
    assert_eq!(dr_status(&dr)["replicas"][0]["consistent"], false);
    let what = promote(&dr, false).expect("promoted without --force: the last consistent state was kept");
    assert!(what.as_str().unwrap_or("").contains("rolled back to the last consistent image"), "{what}");
    assert!(image() == last_consistent, "the promoted image is the last consistent one, byte for byte");
    assert!(!dir.join("g1.rollback").exists(), "the kept state goes once promoted");
}

#[test]
fn a_full_send_buffer_holds_host_writes_back_until_the_dr_site_returns_and_nothing_is_lost() {
    let dr = TargetProcess::start(&dr_site_config());
    let p = TargetProcess::start(&production_config(dr.addr2, "buffer = \"1MiB\"\nrpo_target = \"300ms\""));
    wait_caught_up_and_compare(&p, &dr);
    dr.signal("STOP");
    const WRITES: u64 = 300;
    let done = Arc::new(AtomicU64::new(0));
    let writer = {
        let mut h = host(&p);
        let done = done.clone();
        std::thread::spawn(move || {
            for i in 0..WRITES {
                // 8 KiB writes: 128 fill the buffer.
                assert!(write(&mut h, 1, (i * 16) % (MEMBER / 512 - 16), record(0, i, 0).repeat(16)), "write {i}");
                done.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    wait_until("the send buffer is full", Duration::from_secs(30), || {
        dr_status(&p)["groups"][0]["buffered_bytes"].as_u64().unwrap_or(0) + 8192 > 1 << 20
    });
    wait_until("the recovery point alarm is raised", Duration::from_secs(30), || dr_status(&p)["groups"][0]["rpo_alarm"] == true);
    let completed = done.load(Ordering::Relaxed);
    assert!(completed <= 128 + 1, "with the DR site stopped, {completed} writes completed past a 1 MiB buffer");
    let g = &dr_status(&p)["groups"][0];
    assert!(g["buffered_bytes"].as_u64().unwrap_or(u64::MAX) <= 1 << 20, "{g}");
    dr.signal("CONT");
    writer.join().expect("every write completes once the DR site is back");
    assert_eq!(done.load(Ordering::Relaxed), WRITES);
    wait_caught_up_and_compare(&p, &dr);
    assert!(p.log().contains("the recovery point is behind its target"), "{}", p.log());
    assert!(p.log().contains("within its target again"), "{}", p.log());
}

#[test]
fn in_sync_mode_a_completed_write_is_already_on_the_dr_sites_disk() {
    let dr = TargetProcess::start(&dr_site_config());
    let p = TargetProcess::start(&production_config(dr.addr2, "mode = \"sync\""));
    wait_caught_up_and_compare(&p, &dr);
    let mut h = host(&p);
    for i in 0..100u64 {
        let lba = (i * 37) % (MEMBER / 512);
        let data = record(1, i, lba);
        assert!(write(&mut h, 1 + (i % 2) as u32, lba, data.clone()), "write {i}");
        let member = dr.scratch().join(if i % 2 == 0 { "dr0.img" } else { "dr1.img" });
        let image = std::fs::read(member).expect("DR member");
        assert_eq!(&image[lba as usize * 512..lba as usize * 512 + 512], &data[..], "write {i} completed before the DR site held it");
    }
}

#[test]
fn a_stranger_and_a_wrong_secret_never_become_the_dr_stream() {
    let dr = TargetProcess::start(&dr_site_config());
    let refused = || dr_status(&dr)["replicas"][0]["refused_connections"].as_u64().unwrap_or(0);
    // A stranger that sends garbage, alone first: it is refused by itself.
    {
        use std::io::Write;
        let mut s = std::net::TcpStream::connect(dr.addr2).expect("connect");
        let _ = s.write_all(&[0x55; 200]);
    }
    wait_until("the stranger is refused", Duration::from_secs(30), || refused() >= 1);
    // Then a production site with the wrong secret.
    let wrong = TargetProcess::start(
        &production_config(dr.addr2, "").replace(&format!("secret = \"{SECRET}\""), "secret = \"not-the-dr-secret-at-all\""),
    );
    let before = refused();
    wait_until("the wrong secret is refused", Duration::from_secs(30), || refused() > before);
    let r = &dr_status(&dr)["replicas"][0];
    assert_eq!(r["applied_seq"], 0, "{r}");
    assert_eq!(r["consistent"], false, "{r}");
    assert_eq!(r["connected"], false, "{r}");
    let g = &dr_status(&wrong)["groups"][0];
    assert_eq!(g["connected"], false, "{g}");
    assert!(dr.log().contains("DR stream connection refused"), "{}", dr.log());
}

/// DR figures: `cargo test --release -p nvmetro-tests --test dr -- --ignored --nocapture`
/// (vendor-scripts/bench-dr.sh). Both sites are adaptive on core 0, the host (this process) runs
/// on any core. For 0, 1 and 10 ms added to each direction of the DR link: 8 KiB random writes at
/// QD1 for `DR_SECS` (default 4) in async and in sync mode, with the host's latency and, in async
/// mode, the recovery point sampled every 50 ms (`DR_RATE=N`: a steady N writes/s instead of as
/// fast as QD1 goes); then the full copy's speed on 2 × 256 MiB.
#[test]
#[ignore]
fn dr_figures_benchmark() {
    let secs: u64 = std::env::var("DR_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let pct = |v: &mut Vec<f64>, p: f64| {
        v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        v[((v.len() - 1) as f64 * p) as usize]
    };
    println!("| DR link delay (each way) | mode | writes/s | host p50 | host p99 | RPO median | RPO max |");
    println!("|---|---|---|---|---|---|---|");
    // Each case as fast as QD1 goes, and paced at a steady 1,000 writes/s.
    let rate: Option<u64> = std::env::var("DR_RATE").ok().and_then(|v| v.parse().ok());
    let cases = [(0u64, "none"), (0, "async"), (0, "sync"), (1, "async"), (1, "sync"), (10, "async"), (10, "sync")];
    for (delay_ms, mode) in cases {
        {
            let dr = TargetProcess::start(&dr_site_config());
            let config = production_config(dr.addr2, &format!("mode = \"{mode}\"\nlink_delay = \"{delay_ms}ms\""));
            // "none": the same production site without its group (the baseline).
            let config = if mode == "none" { config[..config.find("[[dr_group]]").expect("group")].to_string() } else { config };
            let p = TargetProcess::start(&config);
            if mode != "none" {
                wait_caught_up_and_compare(&p, &dr);
            }
            let stop = Arc::new(AtomicBool::new(false));
            let sampler = {
                let (stop, port) = (stop.clone(), p.scratch().clone());
                std::thread::spawn(move || {
                    let mut rpo = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let s = std::os::unix::net::UnixStream::connect(port.join("mgmt.sock"));
                        if let Ok(mut s) = s {
                            use std::io::{BufRead, Write};
                            let _ = writeln!(s, "{}", serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "dr_status", "params": {}}));
                            let mut line = String::new();
                            let _ = std::io::BufReader::new(s).read_line(&mut line);
                            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                                rpo.push(v["result"]["groups"][0]["behind_ms"].as_f64().unwrap_or(0.0));
                            }
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    rpo
                })
            };
            let mut h = host(&p);
            let mut lat = Vec::new();
            let mut rng = nvmetro_tests::stamped::Rng(delay_ms + 7);
            let t0 = std::time::Instant::now();
            let mut next = t0;
            while t0.elapsed() < Duration::from_secs(secs) {
                if let Some(r) = rate {
                    // A steady load: the next write at its slot, not sooner.
                    next += Duration::from_micros(1_000_000 / r);
                    std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
                }
                let lba = rng.below(MEMBER / 8192) * 16;
                let at = std::time::Instant::now();
                assert!(write(&mut h, 1, lba, vec![lba as u8; 8192]));
                lat.push(at.elapsed().as_secs_f64() * 1e6);
            }
            let rate = lat.len() as f64 / t0.elapsed().as_secs_f64();
            stop.store(true, Ordering::Relaxed);
            let mut rpo = sampler.join().expect("sampler");
            let (rpo_med, rpo_max) = match mode {
                "async" if !rpo.is_empty() => (format!("{:.1} ms", pct(&mut rpo, 0.5)), format!("{:.1} ms", pct(&mut rpo, 1.0))),
                "sync" => ("0 (sync)".into(), "0 (sync)".into()),
                _ => ("-".into(), "-".into()),
            };
            println!(
                "| {delay_ms} ms | {mode} | {rate:.0} | {:.0} µs | {:.0} µs | {rpo_med} | {rpo_max} |",
                pct(&mut lat, 0.5),
                pct(&mut lat, 0.99)
            );
        }
    }
    // Catch-up: a new group's full copy of 2 × 256 MiB.
    let big = |c: String| c.replace(&format!("size = \"{MEMBER}\""), "size = \"256MiB\"");
    let dr = TargetProcess::start(&big(dr_site_config()));
    let t0 = std::time::Instant::now();
    let p = TargetProcess::start(&big(production_config(dr.addr2, "")));
    wait_until("the full copy ends", Duration::from_secs(300), || consistent(&dr));
    let took = t0.elapsed().as_secs_f64();
    println!(
        "full copy of 2 x 256 MiB: {took:.2} s, {:.0} MiB/s (both sites on core 0, file bdevs on {})",
        512.0 / took,
        p.scratch().display()
    );
}

#[test]
fn a_reload_changes_mode_and_buffer_live_and_async_releases_what_sync_held_back() {
    let dr = TargetProcess::start(&dr_site_config());
    let config = production_config(dr.addr2, "mode = \"sync\"");
    let p = TargetProcess::start(&config);
    wait_caught_up_and_compare(&p, &dr);
    // Sync mode with the DR site stopped: a host write waits for it.
    dr.signal("STOP");
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let mut h = host(&p);
        let done = done.clone();
        std::thread::spawn(move || {
            let ok = write(&mut h, 1, 64, vec![9; 4096]);
            done.store(true, Ordering::Release);
            ok
        })
    };
    wait_until("the write is held for the DR site", Duration::from_secs(20), || {
        dr_status(&p)["groups"][0]["behind_writes"].as_u64().unwrap_or(0) >= 1
    });
    assert!(!done.load(Ordering::Acquire), "a sync write completed while the DR site was stopped");
    let reload = |text: &str| {
        let text = text
            .replace("{PORT}", &p.addr.port().to_string())
            .replace("{PORT2}", &p.addr2.port().to_string())
            .replace("{DIR}", &p.scratch().display().to_string());
        std::fs::write(&p.config_path, text).expect("config");
        rpc(&p, "nvmetro_reload", serde_json::json!({}))
    };
    let out = reload(&config.replace("mode = \"sync\"", "mode = \"async\"\nbuffer = \"2MiB\"")).expect("reload");
    assert!(out.to_string().contains("DR group g1: mode Sync -> Async, buffer"), "{out}");
    assert!(writer.join().expect("writer"), "the held write completes once the group is async");
    wait_until("the status shows the new mode and buffer", Duration::from_secs(10), || {
        let g = &dr_status(&p)["groups"][0];
        (g["mode"].as_str(), g["buffer_limit"].as_u64()) == (Some("async"), Some(2 << 20))
    });
    // What cannot change live is refused, and nothing changes.
    let e = reload(&config.replace("mode = \"sync\"", "").replace(&dr.addr2.to_string(), "127.0.0.1:1")).expect_err("refused");
    assert!(e.contains("DR group g1: its members, dr_site, state, secret"), "{e}");
    dr.signal("CONT");
    wait_caught_up_and_compare(&p, &dr);
}

/// Writes `text` (its placeholders filled for `t`) as `t`'s config file and reloads it.
fn reload_with(t: &TargetProcess, text: &str) -> Result<serde_json::Value, String> {
    let text = text
        .replace("{PORT}", &t.addr.port().to_string())
        .replace("{PORT2}", &t.addr2.port().to_string())
        .replace("{DIR}", &t.scratch().display().to_string());
    std::fs::write(&t.config_path, text).expect("config");
    rpc(t, "nvmetro_reload", serde_json::json!({}))
}

#[test]
fn a_reload_adds_and_removes_groups_and_replicas_over_bdevs_no_host_used_and_refuses_the_rest() {
    let full_dr = dr_site_config();
    let bare_dr = full_dr[..full_dr.find("[[dr_replica]]").expect("replica")].to_string();
    let dr = TargetProcess::start(&bare_dr);
    let full_p = production_config(dr.addr2, "");
    let namespaces = "[[subsystem.namespace]]\nnsid = 1\nbdev = \"p0\"\n\n[[subsystem.namespace]]\nnsid = 2\nbdev = \"p1\"\n";
    assert!(full_p.contains(namespaces));
    let no_group = full_p[..full_p.find("[[dr_group]]").expect("group")].to_string();
    let bare_p = no_group.replace(namespaces, "");
    let p = TargetProcess::start(&bare_p);

    // The DR site gets its replica; the production site its group, with the namespaces over its
    // members in the same reload (no host wrote them before the group saw it).
    let out = reload_with(&dr, &full_dr).expect("replica added");
    assert!(out.to_string().contains("add DR replica g1"), "{out}");
    let out = reload_with(&p, &full_p).expect("group added");
    assert!(out.to_string().contains("add DR group g1 over p0, p1"), "{out}");
    let mut h = host(&p);
    fill(&mut h, 0, 64 << 10, 0x71);
    wait_caught_up_and_compare(&p, &dr);

    // Refused, nothing changed: the group removed while its namespaces stay; another group
    // over the same bdevs in the same reload (its wrapper goes only once the namespaces drained).
    let e = reload_with(&p, &no_group).expect_err("refused");
    assert!(e.contains("remove DR group g1: its members still serve"), "{e}");
    let renamed = bare_p.clone() + &full_p[full_p.find("[[dr_group]]").expect("group")..].replace("name = \"g1\"", "name = \"g2\"");
    let e = reload_with(&p, &renamed).expect_err("refused");
    assert!(e.contains("add DR group g2: bdev p0 is a member of DR group g1 now"), "{e}");
    fill(&mut h, 128, 64 << 10, 0x72);
    wait_caught_up_and_compare(&p, &dr);
    drop(h);

    // Removed with its namespaces: it gives the DR site what it buffered and stops clean.
    let out = reload_with(&p, &bare_p).expect("group removed");
    assert!(out.to_string().contains("remove DR group g1"), "{out}");
    assert_eq!(dr_status(&p)["groups"], serde_json::json!([]));
    // Served without the group (hosts write what it never sees), the group cannot be added back
    // over the namespaces; removed and added again, it compares every region and sends what
    // differs.
    reload_with(&p, &no_group).expect("namespaces without the group");
    let mut h = host(&p);
    fill(&mut h, 256, 64 << 10, 0x73);
    drop(h);
    let e = reload_with(&p, &full_p).expect_err("refused");
    assert!(e.contains("add DR group g1: its members serve"), "{e}");
    reload_with(&p, &bare_p).expect("namespaces removed");
    let out = reload_with(&p, &full_p).expect("group added again");
    assert!(out.to_string().contains("add DR group g1"), "{out}");
    let mut h = host(&p);
    wait_caught_up_and_compare(&p, &dr);
    assert_eq!(p.log().matches("DR copy ended").count(), 2, "the group added again copied: {}", p.log());
    // And it restarted the stream (a Rebase at what the DR site held): the DR image was not
    // consistent while the copy sent what was written without the group.
    assert_eq!(dr.log().matches("DR stream restarts after").count(), 1, "{}", dr.log());
    let last = &dr_status(&p)["groups"][0]["last_copy"];
    assert_eq!(last["sent_bytes"].as_u64(), Some(2 << 20), "only the region of each member written without the group: {last}");

    // The DR site's replica is removed: the production site waits for it; back, the stream goes on.
    let out = reload_with(&dr, &bare_dr).expect("replica removed");
    assert!(out.to_string().contains("remove DR replica g1"), "{out}");
    wait_until("the production site waits for the DR site", Duration::from_secs(20), || dr_status(&p)["groups"][0]["connected"] == false);
    fill(&mut h, 384, 64 << 10, 0x74);
    reload_with(&dr, &full_dr).expect("replica added again");
    wait_caught_up_and_compare(&p, &dr);
    assert_eq!(p.log().matches("DR copy ended").count(), 2, "the stream resumed without a copy: {}", p.log());
}

#[test]
fn removing_a_sync_group_whose_dr_site_is_gone_completes_the_writes_it_holds() {
    let dr = TargetProcess::start(&dr_site_config());
    let full_p = production_config(dr.addr2, "mode = \"sync\"");
    let namespaces = "[[subsystem.namespace]]\nnsid = 1\nbdev = \"p0\"\n\n[[subsystem.namespace]]\nnsid = 2\nbdev = \"p1\"\n";
    let bare_p = full_p[..full_p.find("[[dr_group]]").expect("group")].replace(namespaces, "");
    let p = TargetProcess::start(&full_p);
    wait_caught_up_and_compare(&p, &dr);
    // The DR site stops answering: a sync write waits for it.
    dr.signal("STOP");
    let (done, completed) = std::sync::mpsc::channel();
    {
        let mut h = host(&p);
        std::thread::spawn(move || done.send(write(&mut h, 1, 0, vec![9; 4096])));
    }
    wait_until("the group holds the write", Duration::from_secs(20), || {
        dr_status(&p)["groups"][0]["behind_writes"].as_u64().unwrap_or(0) >= 1
    });
    // The operator removes the group (and its namespaces): the write it held completes.
    let out = reload_with(&p, &bare_p).expect("group removed");
    assert!(out.to_string().contains("remove DR group g1"), "{out}");
    let ok = completed.recv_timeout(Duration::from_secs(60)).expect("the held write completes once the group is gone");
    assert!(ok, "and succeeds (it is on the local disk)");
    assert_eq!(std::fs::read(p.scratch().join("p0.img")).expect("p0")[..4096], [9; 4096]);
    dr.signal("CONT");
}

#[test]
fn copy_rate_caps_what_a_copy_reads_per_second_and_a_reload_lifts_it() {
    let dr = TargetProcess::start(&dr_site_config());
    let since = std::time::Instant::now();
    let config = production_config(dr.addr2, "copy_rate = \"2MiB\"");
    let p = TargetProcess::start(&config);
    // The new group's copy reads 2 x 4 MiB at 2 MiB a second at most (one region may go at once).
    let mut seen = 0;
    wait_until("the copy read 3 MiB", Duration::from_secs(60), || {
        let done = dr_status(&p)["groups"][0]["copy"]["done_bytes"].as_u64().unwrap_or(0);
        // One region at once, then 2 MiB a second; one region of slack for a read under way.
        let cap = (1 << 20) as f64 * (2.0 + 2.0 * since.elapsed().as_secs_f64());
        assert!(done as f64 <= cap, "read {done} bytes {:?} after the start, over the copy rate", since.elapsed());
        seen = seen.max(done);
        done >= 3 << 20
    });
    let out = reload_with(&p, &config.replace("copy_rate = \"2MiB\"", "")).expect("reload");
    assert!(out.to_string().contains("copy_rate Some(2097152) -> None"), "{out}");
    wait_caught_up_and_compare(&p, &dr);
    assert!(seen >= 3 << 20);
}

#[test]
fn long_throw_never_holds_host_writes_spills_to_the_journal_overflows_and_catches_up() {
    let dr = TargetProcess::start(&dr_site_config());
    let p = TargetProcess::start(&production_config(
        dr.addr2,
        "mode = \"long-throw\"\nbuffer = \"1MiB\"\njournal = \"{DIR}/g1.journal\"\njournal_size = \"1MiB\"",
    ));
    wait_caught_up_and_compare(&p, &dr);
    // The DR site stops answering: 3 MiB of writes fill the buffer and the journal and overflow,
    // and every one completes (short-throw would hold them at 1 MiB).
    dr.signal("STOP");
    let mut h = host(&p);
    for i in 0..384u64 {
        assert!(write(&mut h, 1 + (i % 2) as u32, (i * 16) % (MEMBER / 512 - 16), record(2, i, 0).repeat(16)), "write {i}");
    }
    wait_until("the group shows the journal in use and the overflow", Duration::from_secs(20), || {
        let g = &dr_status(&p)["groups"][0];
        g["overflows"].as_u64().unwrap_or(0) > 0 && g["journal_bytes"].as_u64().unwrap_or(0) > 0 && g["mode"] == "long-throw"
    });
    assert!(p.log().contains("writes are tracked by region and copied later"), "{}", p.log());
    dr.signal("CONT");
    // The queue drains from memory and journal, the catch-up copies what overflowed, and the
    // image is consistent and equal again.
    wait_caught_up_and_compare(&p, &dr);
    assert!(dr.log().contains("the production site overflowed"), "{}", dr.log());
    assert!(dr.log().contains("DR copy ended: the DR image is consistent"), "{}", dr.log());
    // Past the overflow the last consistent image was kept, and dropped once consistent again.
    assert!(dr.log().contains("keeping its last consistent state"), "{}", dr.log());
    assert!(!dr.scratch().join("g1.rollback").exists());
}

#[test]
fn a_journal_on_a_full_disk_fails_its_writes_and_a_full_copy_makes_the_image_whole() {
    // The journal is /dev/full: every spill fails with ENOSPC (reads give zeroes).
    let dr = TargetProcess::start(&dr_site_config());
    let p = TargetProcess::start(&production_config(
        dr.addr2,
        "mode = \"long-throw\"\nbuffer = \"1MiB\"\njournal = \"/dev/full\"\njournal_size = \"1MiB\"",
    ));
    wait_caught_up_and_compare(&p, &dr);
    dr.signal("STOP");
    let mut h = host(&p);
    for i in 0..256u64 {
        assert!(
            write(&mut h, 1 + (i % 2) as u32, (i * 16) % (MEMBER / 512 - 16), record(4, i, 0).repeat(16)),
            "write {i}: hosts never wait"
        );
    }
    wait_until("the journal write fails", Duration::from_secs(20), || p.log().contains("DR journal write failed"));
    dr.signal("CONT");
    // What the journal lost comes by the full copy; until it ends the image is not consistent.
    wait_caught_up_and_compare(&p, &dr);
    assert!(dr.log().contains("the production site overflowed"), "{}", dr.log());
}

#[test]
fn a_journal_entry_that_cannot_be_read_goes_by_the_full_copy_and_the_stream_goes_on() {
    let mut dr = TargetProcess::start(&dr_site_config());
    let p = TargetProcess::start(&production_config(
        dr.addr2,
        "mode = \"long-throw\"\nbuffer = \"1MiB\"\njournal = \"{DIR}/g1.journal\"\njournal_size = \"2MiB\"",
    ));
    wait_caught_up_and_compare(&p, &dr);
    // The DR site goes away: what does not fit the buffer waits in the journal, unsent.
    dr.kill();
    let mut h = host(&p);
    for i in 0..160u64 {
        assert!(write(&mut h, 1 + (i % 2) as u32, (i * 16) % (MEMBER / 512 - 16), record(5, i, 0).repeat(16)), "write {i}");
    }
    wait_until("the journal holds writes", Duration::from_secs(20), || {
        dr_status(&p)["groups"][0]["journal_bytes"].as_u64().unwrap_or(0) > 0
    });
    // The journal's bytes are gone (its file cut to nothing) before they are sent.
    std::fs::OpenOptions::new().write(true).open(p.scratch().join("g1.journal")).expect("journal").set_len(0).expect("truncate");
    dr.restart();
    wait_until("the journal read fails", Duration::from_secs(20), || p.log().contains("DR journal read failed"));
    wait_caught_up_and_compare(&p, &dr);
    assert!(!p.log().contains("the stream stops"), "{}", p.log());
}

/// Replaces the DR tables of `t`'s config file with `tables` (placeholders already filled).
fn with_dr_tables(t: &TargetProcess, tables: &str) {
    let text = std::fs::read_to_string(&t.config_path).expect("config");
    let cut = ["[[dr_group]]", "[[dr_replica]]"].iter().filter_map(|k| text.find(k)).min().unwrap_or(text.len());
    std::fs::write(&t.config_path, format!("{}{tables}", &text[..cut])).expect("config");
}

#[test]
fn after_a_promotion_reverse_replication_sends_the_old_production_site_only_what_differs() {
    let mut dr = TargetProcess::start(&dr_site_serving_config());
    let mut p = TargetProcess::start(&production_config(dr.addr2, ""));
    {
        let mut h = host(&p);
        for i in 0..64u64 {
            assert!(write(&mut h, 1 + (i % 2) as u32, i * 97, record(3, i, 0)));
        }
    }
    wait_caught_up_and_compare(&p, &dr);
    // Disaster: the production site is lost; the DR image is promoted and hosts write there.
    p.kill();
    wait_until("the stream is gone", Duration::from_secs(20), || dr_status(&dr)["replicas"][0]["connected"] == false);
    promote(&dr, false).expect("promoted");
    const DR_NQN: &str = "nqn.2026-12.io.nvmetro:dr-site";
    {
        let mut at_dr = host_of(&dr, DR_NQN);
        assert!(write(&mut at_dr, 2, 3 << 11, vec![0x5a; 8192]), "a write after the promotion, in region 3 of member 1");
    }
    // Reverse: the promoted site streams to the old production site, which becomes the replica.
    let dir = |t: &TargetProcess| t.scratch().display().to_string();
    with_dr_tables(
        &dr,
        &format!("[[dr_group]]\nname = \"g1\"\nmembers = [\"dr0\", \"dr1\"]\ndr_site = \"{}\"\nstate = \"{}/g1.reverse\"\nsecret = \"{SECRET}\"\n", p.addr2, dir(&dr)),
    );
    with_dr_tables(
        &p,
        &format!("[[dr_replica]]\nname = \"g1\"\nmembers = [\"p0\", \"p1\"]\nlisten = \"{}\"\nstate = \"{}/g1.reverse-applied\"\nsecret = \"{SECRET}\"\n", p.addr2, dir(&p)),
    );
    p.restart();
    dr.restart();
    // The new DR site (the old production one) serves nothing until it is promoted back.
    let mut at_p = host(&p);
    let (c, _) = at_p.io_cmd(0, nvmetro_proto::cmds::write(0, 1, 0, 1), vec![1; 512], 0).expect("write");
    assert!(!c.status().is_success(), "the old production site is a replica now");
    wait_until("the reverse copy ends", Duration::from_secs(60), || {
        let g = &dr_status(&dr)["groups"][0];
        g["connected"] == true && g["copy"].is_null() && g["behind_writes"] == 0 && dr_status(&p)["replicas"][0]["consistent"] == true
    });
    // (The status is a snapshot: the images decide.)
    wait_until("the old production site's image equals the promoted one", Duration::from_secs(30), || {
        [("dr0.img", "p0.img"), ("dr1.img", "p1.img")]
            .into_iter()
            .all(|(a, b)| std::fs::read(dr.scratch().join(a)).expect(a) == std::fs::read(p.scratch().join(b)).expect(b))
    });
    let last = &dr_status(&dr)["groups"][0]["last_copy"];
    assert_eq!(last["sent_bytes"].as_u64(), Some(1 << 20), "only the region written after the promotion travels: {last}");
}

#[test]
fn a_multi_range_deallocate_and_write_zeroes_reach_the_dr_site_as_small_frames_and_complete() {
    let dr = TargetProcess::start(&dr_site_config());
    let p = TargetProcess::start(&production_config(dr.addr2, ""));
    let mut h = host(&p);
    // Data in three places, then one Dataset Management command deallocating two of them (in
    // different lock stripes) and a Write Zeroes over the third.
    for lba in [0u64, 2048, 6000] {
        assert!(write(&mut h, 1, lba, vec![0x77; 8 * 512]));
    }
    wait_caught_up_and_compare(&p, &dr);
    let (cmd, ranges) = nvmetro_proto::cmds::deallocate(0, 1, &[(0, 8), (2048, 8)]);
    let (c, _) = h.io_cmd(0, cmd, ranges, 0).expect("deallocate");
    assert!(c.status().is_success(), "{:?}", c.status());
    let (c, _) = h.io_cmd(0, nvmetro_proto::cmds::write_zeroes(0, 1, 6000, 8, false), Vec::new(), 0).expect("write zeroes");
    assert!(c.status().is_success(), "{:?}", c.status());
    // A write over a deallocated range afterwards: its stripe was unlocked.
    assert!(write(&mut h, 1, 2048, vec![0x78; 512]));
    wait_caught_up_and_compare(&p, &dr);
    let image = std::fs::read(dr.scratch().join("dr0.img")).expect("dr0");
    assert!(image[6000 * 512..6008 * 512].iter().all(|b| *b == 0), "the zeroes reached the DR site");
    assert!(image[..8 * 512].iter().all(|b| *b == 0) && image[2048 * 512] == 0x78, "both ranges and the write after them");
}

#[test]
fn a_new_group_refuses_a_dr_site_that_holds_another_stream() {
    let dr = TargetProcess::start(&dr_site_config());
    let mut p = TargetProcess::start(&production_config(dr.addr2, ""));
    {
        let mut h = host(&p);
        assert!(write(&mut h, 1, 0, vec![1; 512]));
    }
    wait_caught_up_and_compare(&p, &dr);
    // The production site loses its state (a rebuild): it must not take the DR image as its own.
    p.terminate();
    std::fs::remove_file(p.scratch().join("g1.dr")).expect("state");
    p.restart();
    wait_until("the DR site is refused", Duration::from_secs(20), || {
        dr_status(&p)["groups"][0]["state"].as_str().unwrap_or("").contains("this group is new")
    });
}

#[test]
fn a_second_production_site_with_the_right_secret_never_becomes_the_stream_and_the_first_goes_on() {
    let dr = TargetProcess::start(&dr_site_config());
    let p = TargetProcess::start(&production_config(dr.addr2, ""));
    let mut h = host(&p);
    fill(&mut h, 0, 64 << 10, 0x81);
    wait_caught_up_and_compare(&p, &dr);
    // A second site is configured with the same group, DR site and secret (a copied config).
    let other = TargetProcess::start(&production_config(dr.addr2, ""));
    {
        let mut h2 = host(&other);
        assert!(write(&mut h2, 1, 64, vec![0x99; 4096]), "the other site serves its own hosts");
    }
    wait_until("the second site is refused", Duration::from_secs(20), || {
        dr_status(&other)["groups"][0]["state"].as_str().unwrap_or("").contains("this group is new")
    });
    // The first site's stream goes on (it reconnects if the newer connection displaced it), and
    // the DR image stays the first site's, byte for byte.
    fill(&mut h, 256, 64 << 10, 0x82);
    wait_caught_up_and_compare(&p, &dr);
    assert!(!dr.log().contains("taken over by another producer"), "{}", dr.log());
}

#[test]
fn a_group_whose_state_cannot_be_stored_stops_its_stream_and_host_writes_go_on() {
    let dr = TargetProcess::start(&dr_site_config());
    let state_dir = std::env::temp_dir().join(format!("nvmetro-dr-state-{}", std::process::id()));
    std::fs::create_dir_all(&state_dir).expect("state dir");
    let config =
        production_config(dr.addr2, "mode = \"long-throw\"\nbuffer = \"1MiB\"\njournal = \"{DIR}/g1.journal\"\njournal_size = \"1MiB\"")
            .replace("{DIR}/g1.dr", &format!("{}/g1.dr", state_dir.display()));
    let p = TargetProcess::start(&config);
    wait_caught_up_and_compare(&p, &dr);
    // The state's directory goes away; the DR site stops answering, so the next writes
    // overflow, and recording that needs the state.
    std::fs::remove_dir_all(&state_dir).expect("remove the state dir");
    dr.signal("STOP");
    let mut h = host(&p);
    for i in 0..400u64 {
        assert!(write(&mut h, 1, (i * 16) % (MEMBER / 512 - 16), vec![i as u8; 8192]), "write {i} fails");
    }
    wait_until("the group shows the stream stopped", Duration::from_secs(20), || {
        dr_status(&p)["groups"][0]["state"].as_str().unwrap_or("").starts_with("STOPPED: cannot store the group's state")
    });
    // Host writes still complete.
    assert!(write(&mut h, 2, 0, vec![1; 4096]));
    assert!(p.log().contains("DR stream stopped"), "{}", p.log());
    dr.signal("CONT");
}

/// `config` with the first member `base` (and its namespace) behind an error bdev `name`
/// starting with `rules`.
fn behind_error_bdev(config: String, base: &str, name: &str, rules: Option<&str>) -> String {
    let rules = rules.map(|r| format!("rules = '{r}'\n")).unwrap_or_default();
    config
        .replace(&format!("members = [\"{base}\""), &format!("members = [\"{name}\""))
        .replace(&format!("bdev = \"{base}\""), &format!("bdev = \"{name}\""))
        .replace("[[subsystem]]", &format!("[[bdev]]\nname = \"{name}\"\nkind = \"error\"\nbase = \"{base}\"\n{rules}\n[[subsystem]]"))
}

#[test]
fn a_copy_read_that_fails_is_read_again_and_the_image_still_ends_consistent_and_equal() {
    // The new group's full copy reads p0 through an error bdev that fails its first 3 reads.
    let dr = TargetProcess::start(&dr_site_config());
    let p = TargetProcess::start(&behind_error_bdev(
        production_config(dr.addr2, ""),
        "p0",
        "flaky-p0",
        Some(r#"[{"op":"read","error":"eio","count":3}]"#),
    ));
    {
        let mut h = host(&p);
        assert!(write(&mut h, 1, 4096, vec![0x5a; 8192]));
    }
    wait_caught_up_and_compare(&p, &dr);
    let stats = rpc(&p, "bdev_error_stats", serde_json::json!({"name": "flaky-p0"})).expect("stats");
    assert_eq!(stats["injected"]["errors"].as_u64(), Some(3), "the copy's reads met the faults: {stats}");
    assert_eq!(p.log().matches("reading the member failed").count(), 3, "{}", p.log());
    // The regions whose checksum read failed were read again and sent whole.
    let last = &dr_status(&p)["groups"][0]["last_copy"];
    assert!(last["sent_bytes"].as_u64().is_some_and(|s| s >= 1 << 20), "{last}");
}

#[test]
fn a_failed_local_write_is_not_streamed_and_a_failed_dr_disk_stops_the_image_with_a_reason() {
    // Production: member p0 behind an error bdev; DR: member dr0 behind one too.
    let errors = |c: String, base: &str, name: &str| behind_error_bdev(c, base, name, None);
    let dr = TargetProcess::start(&errors(dr_site_config(), "dr0", "flaky-dr0"));
    let p = TargetProcess::start(&errors(production_config(dr.addr2, ""), "p0", "flaky-p0"));
    wait_caught_up_and_compare(&p, &dr);
    let mut h = host(&p);
    // A write that fails locally completes with an error, is not sent, and frees its range.
    rpc(&p, "bdev_error_inject", serde_json::json!({"name": "flaky-p0", "rules": {"op": "write", "error": "eio", "count": 1}}))
        .expect("inject");
    assert!(!write(&mut h, 1, 64, vec![0xee; 512]), "the injected local failure reaches the host");
    assert!(write(&mut h, 1, 64, vec![0xef; 512]), "the range is free again");
    wait_caught_up_and_compare(&p, &dr);
    // The DR site's disk fails: its image stops, and the production site says why.
    rpc(&dr, "bdev_error_inject", serde_json::json!({"name": "flaky-dr0", "rules": {"op": "write", "error": "eio"}})).expect("inject");
    assert!(write(&mut h, 1, 128, vec![0x11; 512]));
    wait_until("the DR image stops", Duration::from_secs(20), || dr_status(&dr)["replicas"][0]["failed"].is_string());
    wait_until("the production site shows why", Duration::from_secs(30), || {
        dr_status(&p)["groups"][0]["state"].as_str().unwrap_or("").contains("stopped taking writes")
    });
    assert!(write(&mut h, 2, 0, vec![2; 512]), "async: host writes go on while the buffer has room");
}
