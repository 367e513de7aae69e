//! Disaster recovery over a metro pair: both metro sites run the DR group over the mirror (it
//! wraps each site's leg), the site that orders the writes feeds a third site, and after a
//! failover the survivor takes the stream over (a `Rebase`, then a copy that compares every
//! region and sends only what differs), and so does the old site when a planned switchover
//! gives it the ordering back. Five processes: two metro sites, the witness, the DR
//! site, and the test as the host.

use nvmetro_perf::{ConnectOptions, Host};
use nvmetro_tests::{rpc, serves, site, switchover, wait_until, TargetProcess, WitnessProcess, HOSTNQN, METRO_NQN};
use std::time::{Duration, Instant};

const SECRET: &str = "dr-metro-stream-secret-0123456789";
/// The metro mirror's size (`mirror_site_config`'s leg).
const MEMBER: u64 = 32 << 20;

fn dr_site_config() -> String {
    nvmetro_tests::dr_site_toml(&[("dr0", MEMBER)], SECRET)
}

/// Metro site `n` with the DR group over its mirror, its link to the DR site `link_delay` long.
fn metro_site(n: u8, link: u16, witness: std::net::SocketAddr, dr: std::net::SocketAddr, link_delay: &str) -> String {
    site(n, link, witness, "")
        + &format!("\n[[dr_group]]\nname = \"g1\"\nmembers = [\"m\"]\ndr_site = \"{dr}\"\nstate = \"{{DIR}}/g1.dr\"\nsecret = \"{SECRET}\"\nlink_delay = \"{link_delay}\"\n")
}

fn host(t: &TargetProcess) -> Host {
    let mut o = ConnectOptions::new(t.addr, METRO_NQN);
    o.hostnqn = HOSTNQN.into();
    o.kato_ms = 0;
    o.timeout = Duration::from_secs(20);
    Host::connect(&o).expect("connect to a metro site")
}

/// Writes `count` 4 KiB blocks stamped with `stamp` at LBAs spread over the mirror.
fn write_stamped(t: &TargetProcess, stamp: u8, count: u64, salt: u64) {
    let blocks = MEMBER / 4096;
    write_blocks(t, stamp, (0..count).map(|i| (i + salt, ((i * 2_654_435_761 + salt) % blocks) * 8)));
}

/// Writes 4 KiB blocks stamped with `stamp` and a number, at (number, LBA).
fn write_blocks(t: &TargetProcess, stamp: u8, blocks: impl Iterator<Item = (u64, u64)>) {
    let mut h = host(t);
    for (i, lba) in blocks {
        let mut data = vec![stamp; 4096];
        data[..8].copy_from_slice(&i.to_le_bytes());
        let (c, _) = h.io_cmd(0, nvmetro_proto::cmds::write(0, 1, lba, 8), data, 0).expect("write");
        assert!(c.status().is_success(), "write {i} at LBA {lba} through {}: {:?}", t.addr, c.status());
    }
}

fn group(t: &TargetProcess) -> serde_json::Value {
    rpc(t, "dr_status", serde_json::json!({})).expect("dr_status")["groups"][0].clone()
}

fn replica(dr: &TargetProcess) -> serde_json::Value {
    rpc(dr, "dr_status", serde_json::json!({})).expect("dr_status")["replicas"][0].clone()
}

/// Waits until `site` feeds the DR site, has nothing outstanding, the DR image is consistent,
/// and the DR image equals `site`'s leg byte for byte.
fn wait_caught_up_and_compare(site: &TargetProcess, dr: &TargetProcess, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let g = group(site);
        let caught_up = g["connected"] == true && g["behind_writes"] == 0 && g["copy"].is_null() && replica(dr)["consistent"] == true;
        let why = if caught_up {
            let (x, y) =
                (std::fs::read(site.scratch().join("leg.img")).expect("leg"), std::fs::read(dr.scratch().join("dr0.img")).expect("dr0"));
            x.iter().zip(&y).position(|(p, q)| p != q).map(|at| format!("the leg and the DR image differ first at byte {at}"))
        } else {
            Some(format!("not caught up: {g}"))
        };
        match why {
            None => return,
            Some(why) => assert!(Instant::now() < deadline, "{what}: {why}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// With `DR_METRO_LOGS=DIR`, the processes' logs go to DIR (to read after a failure).
fn dump_logs(sites: &[(&str, &TargetProcess)]) {
    if let Ok(dir) = std::env::var("DR_METRO_LOGS") {
        std::fs::create_dir_all(&dir).expect("log dir");
        for (name, t) in sites {
            std::fs::write(format!("{dir}/{name}.log"), t.log()).expect("log copy");
        }
    }
}

#[test]
fn the_dr_stream_follows_the_ordering_site_through_a_failover_and_a_switchover_sending_only_what_differs() {
    let _serial = nvmetro_tests::ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let dr = TargetProcess::start(&dr_site_config());
    let w = WitnessProcess::start();
    let link = nvmetro_tests::free_port();
    // A's frames to the DR site take 1 s: what it acknowledged just before it dies is lost with
    // it (asynchronous DR), and B's copy must send it.
    let mut a = TargetProcess::start(&metro_site(1, link, w.addr, dr.addr2, "1s"));
    let b = TargetProcess::start(&metro_site(2, link, w.addr, dr.addr2, "0s"));
    wait_until("both sites serve", Duration::from_secs(30), || serves(&a) == Some(true) && serves(&b) == Some(true));

    // A orders the writes and feeds the DR site; B stands by. Writes through either site reach
    // the DR site (B's through A, which orders them).
    write_stamped(&a, 0xa1, 300, 0);
    write_stamped(&b, 0xb1, 100, 7);
    wait_caught_up_and_compare(&a, &dr, "fed by site A");
    let standing = group(&b);
    assert!(standing["state"].as_str().is_some_and(|s| s.starts_with("standing by")) && standing["connected"] == false, "{standing}");

    // A acknowledges 4 writes in the first copy region (on B's leg too: the metro is
    // synchronous) and dies before they leave it; B wins the witness, orders the writes, and
    // takes the stream over.
    write_blocks(&a, 0xa3, (0..4).map(|i| (i, 64 + i * 512)));
    a.kill();
    wait_until("site B serves alone", Duration::from_secs(30), || serves(&b) == Some(true));
    write_stamped(&b, 0xb2, 200, 1000);
    wait_caught_up_and_compare(&b, &dr, "after the failover, fed by site B");
    assert!(dr.log().contains("taken over by another producer"), "{}", dr.log());
    assert!(b.log().contains("takes the stream over"), "{}", b.log());
    // The copy read every region (checksums) but sent only what differed: the region of A's
    // lost writes (B's writes numbered before it took the stream over go on after the Rebase,
    // in their order, and send nothing).
    dump_logs(&[("b", &b), ("dr", &dr)]);
    let last = &group(&b)["last_copy"];
    let sent = last["sent_bytes"].as_u64().expect("sent");
    assert_eq!(last["read_bytes"].as_u64(), Some(MEMBER + sent), "each region read for its checksum, and again where it differed: {last}");
    eprintln!("takeover copy: read {} MiB, sent {} KiB", MEMBER >> 20, sent >> 10);
    assert!(sent >= 4 * 4096, "the takeover sent {sent} bytes: A's lost writes were not among them");
    assert!(sent < MEMBER / 4, "the takeover sent {sent} of {MEMBER} bytes: it compared nothing");

    // A returns, is resynced from B and stands by: B keeps feeding the DR site undisturbed.
    a.restart();
    wait_until("site A serves again", Duration::from_secs(60), || serves(&a) == Some(true));
    wait_until("site A stands by", Duration::from_secs(30), || {
        let g = group(&a);
        g["state"].as_str().is_some_and(|s| s.starts_with("standing by")) && g["connected"] == false
    });
    write_stamped(&a, 0xa2, 100, 5000);
    write_stamped(&b, 0xb3, 100, 9000);
    dump_logs(&[("a", &a), ("b", &b), ("dr", &dr)]);
    wait_caught_up_and_compare(&b, &dr, "with site A back");
    assert_eq!(dr.log().matches("taken over by another producer").count(), 1, "A took nothing back: {}", dr.log());

    // The operator moves the ordering back to A (a planned switchover at B): A takes the
    // stream over and B stands by; the DR image follows A's leg.
    wait_until("the switchover to A is accepted", Duration::from_secs(30), || switchover(&b).0);
    wait_until("site B stands by", Duration::from_secs(30), || {
        let g = group(&b);
        g["state"].as_str().is_some_and(|s| s.starts_with("standing by")) && g["connected"] == false
    });
    write_stamped(&a, 0xa4, 100, 13000);
    write_stamped(&b, 0xb4, 100, 17000);
    dump_logs(&[("a", &a), ("b", &b), ("dr", &dr)]);
    wait_caught_up_and_compare(&a, &dr, "after the switchover back, fed by site A");
    let last = &group(&a)["last_copy"];
    eprintln!(
        "switchover copy: read {} MiB, sent {} KiB",
        last["read_bytes"].as_u64().unwrap_or(0) >> 20,
        last["sent_bytes"].as_u64().unwrap_or(0) >> 10
    );
    assert_eq!(dr.log().matches("taken over by another producer").count(), 2, "one takeover per change of the ordering site: {}", dr.log());
}
