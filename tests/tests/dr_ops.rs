//! Operating a DR site, end to end with real processes: promotion (refused while production
//! streams, after a copy rolled back to the last consistent image), reverse replication, the DR
//! test's writable point-in-time view, and reload of the DR tables (mode and limits live, groups
//! and replicas added and removed, `copy_rate`).

use nvmetro_perf::{ConnectOptions, Host};
use nvmetro_tests::dr::*;
use nvmetro_tests::{rpc, wait_until, TargetProcess, HOSTNQN};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
    let stores = || {
        std::fs::read_dir(dr.scratch()).expect("dir").flatten().filter(|e| e.file_name().to_string_lossy().starts_with("g1.view")).count()
    };
    assert_eq!(stores(), 2, "one store per member while the view is open");
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
    assert_eq!(stores(), 0, "the view's stores are removed");
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

/// What keeping the last consistent image costs a copy (`cargo test --release -p nvmetro-tests
/// --test dr_ops rollback_cost_benchmark -- --ignored --nocapture`): the same 2 x 256 MiB sent
/// whole into an empty DR image (never consistent: nothing kept) and over a consistent one
/// (every block kept in the rollback log first). Both sites adaptive on core 0.
#[test]
#[ignore]
fn rollback_cost_benchmark() {
    const BIG: &str = "256MiB";
    let big = |c: String| c.replace(&format!("size = \"{MEMBER}\""), &format!("size = \"{BIG}\""));
    let dr = TargetProcess::start(&big(dr_site_config()));
    let full = big(production_config(dr.addr2, ""));
    let alone = full[..full.find("[[dr_group]]").expect("group")].to_string();
    let mut p = TargetProcess::start(&alone);
    let bytes = 256u64 << 20;
    let mut h = host(&p);
    fill(&mut h, 0, bytes, 0x3c);
    drop(h);
    p.terminate();
    let timed = |what: &str| {
        let t = std::time::Instant::now();
        wait_until(what, Duration::from_secs(600), || {
            let r = &dr_status(&dr)["replicas"][0];
            r["consistent"] == true && dr_status(&dr)["replicas"][0]["connected"] == true
        });
        t.elapsed()
    };
    // Into the empty image: nothing is kept.
    std::fs::write(&p.config_path, full.replace("{DIR}", &p.scratch().display().to_string()).replace("{PORT}", &p.addr.port().to_string()))
        .expect("config");
    p.restart();
    let plain = timed("the first copy ends");
    // Over the consistent image: the production site's bytes change while it is down, and it
    // comes back unclean (a Rebase and a copy of all of it); every block is kept first.
    p.kill();
    for f in ["p0.img", "p1.img"] {
        std::fs::write(p.scratch().join(f), vec![0xd7; bytes as usize]).expect("rewrite");
    }
    p.restart();
    wait_until("the copy started", Duration::from_secs(60), || dr_status(&dr)["replicas"][0]["consistent"] == false);
    let kept = timed("the second copy ends");
    let mib = 2.0 * bytes as f64 / (1 << 20) as f64;
    println!("| copy of 2 x {BIG}, all of it sent | time | MiB/s |");
    println!("|---|---|---|");
    println!("| into an empty DR image (nothing kept) | {:.2} s | {:.0} |", plain.as_secs_f64(), mib / plain.as_secs_f64());
    println!("| over a consistent image (each block kept first) | {:.2} s | {:.0} |", kept.as_secs_f64(), mib / kept.as_secs_f64());
    println!("ratio: {:.2}x the time", kept.as_secs_f64() / plain.as_secs_f64());
}
