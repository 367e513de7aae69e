//! Disaster recovery at a third site: a consistency group of two namespaces at the production
//! site streamed to a DR site, each a real `nvmetro-tgt` process, and a host on NVMe/TCP.
//!
//! The crash-consistency workload writes dependent pairs: a data block on namespace 1, and,
//! once it completed, a commit record on namespace 2 naming it. At every cut (the DR site
//! killed mid-stream, the production site killed mid-stream) the DR image must never show a
//! commit whose data is missing.

use nvmetro_tests::dr::*;
use nvmetro_tests::{rpc, wait_until, TargetProcess};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
