//! A bounded soak of a metro (site A, site B, the witness, a proxy standing in for the link):
//! random faults, one after another, under a stamped verifying workload through both sites.
//! Faults: SIGKILL of either site (restarted after a while), SIGSTOP/SIGCONT of either site for
//! below, around or above its lease, a cut link (restored later), the witness killed (restarted
//! later), either site's leg failing writes with ENOSPC or EIO (cleared later, then resynced). After each, both sites must serve again; throughout, no read at either site may
//! return data older than a write acknowledged before it was sent; at the end every block at
//! both sites holds at least its last acknowledged write (nothing acknowledged is lost).
//!
//! `SOAK_SECONDS` (default 60) bounds the faults' time; `PAUSE_SEED` repeats a run.

use nvmetro_proto::cmds;
use nvmetro_tests::stamped::{check_read, ms, seed, session, tally, worker, BlockLog, Figures, Rng, Shared, BASE, BLOCKS};
use nvmetro_tests::{metro_with, rpc, serves, wait_until, with_error_leg, Metro};
use serde_json::json;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Injects one random fault and heals it; returns what it did.
fn fault(m: &mut Metro, rng: &mut Rng) -> String {
    let site = rng.below(2) as usize;
    let name = ["A", "B"][site];
    match rng.below(5) {
        4 => {
            let d = rng.ms(300, 2000);
            let t = if site == 0 { &m.a } else { &m.b };
            let error = ["nospace", "eio"][rng.below(2) as usize];
            rpc(t, "bdev_error_inject", json!({"name": "flaky", "rules": [{"op": "writes", "error": error}]})).expect("inject");
            std::thread::sleep(d);
            rpc(t, "bdev_error_clear", json!({"name": "flaky"})).expect("clear");
            rpc(t, "mirror_resync", json!({"name": "m"})).expect("resync");
            format!("{name}'s leg failing writes with {error} for {} ms, then resynced", ms(d))
        }
        0 => {
            let down = rng.ms(200, 2000);
            let t = if site == 0 { &mut m.a } else { &mut m.b };
            t.kill();
            std::thread::sleep(down);
            t.restart();
            format!("SIGKILL {name}, restarted after {} ms", ms(down))
        }
        1 => {
            let d = [rng.ms(100, 400), rng.ms(450, 800), rng.ms(1200, 3000)][rng.below(3) as usize];
            let t = if site == 0 { &m.a } else { &m.b };
            t.signal("STOP");
            std::thread::sleep(d);
            t.signal("CONT");
            format!("SIGSTOP {name} for {} ms", ms(d))
        }
        2 => {
            let d = rng.ms(300, 3000);
            let p = m.proxy.as_ref().expect("the soak's metro has a proxy on the link");
            p.cut();
            std::thread::sleep(d);
            p.restore();
            format!("link cut for {} ms", ms(d))
        }
        _ => {
            let d = rng.ms(500, 3000);
            m.w.kill();
            std::thread::sleep(d);
            m.w.restart();
            format!("witness down for {} ms", ms(d))
        }
    }
}

#[test]
fn a_bounded_soak_of_random_faults_loses_nothing_and_never_reads_stale() {
    let seed = seed("a_bounded_soak_of_random_faults_loses_nothing_and_never_reads_stale");
    let budget = Duration::from_secs(std::env::var("SOAK_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60));
    let mut rng = Rng(seed);
    let mut m = metro_with(true, "retry_interval = \"1s\"", with_error_leg);
    let (addr_a, addr_b) = (m.a.addr, m.b.addr);
    let sh = Shared {
        blocks: (0..BLOCKS).map(|_| Mutex::new(BlockLog::default())).collect(),
        next_stamp: AtomicU64::new(1),
        stop: AtomicBool::new(false),
        t0: Instant::now(),
    };
    let mut faults = Vec::new();
    let mut figs = Figures::default();
    std::thread::scope(|s| {
        let workers: Vec<_> = [(addr_a, "A"), (addr_b, "B")]
            .into_iter()
            .enumerate()
            .map(|(i, (addr, name))| {
                let (sh, seed) = (&sh, seed.wrapping_add(i as u64 + 1));
                s.spawn(move || worker(name, addr, sh, seed))
            })
            .collect();
        while sh.t0.elapsed() < budget {
            std::thread::sleep(rng.ms(300, 1200)); // load between faults
            let at = ms(sh.t0.elapsed());
            let what = fault(&mut m, &mut rng);
            let healed = Instant::now();
            wait_until("both sites serve again", Duration::from_secs(90), || serves(&m.a) == Some(true) && serves(&m.b) == Some(true));
            let line = format!("{what} at {at} ms; both serve {} ms later", ms(healed.elapsed()));
            eprintln!("fault: {line}");
            faults.push(line);
        }
        std::thread::sleep(Duration::from_millis(500));
        sh.stop.store(true, Ordering::Release);
        for w in workers {
            figs.add(w.join().expect("worker"));
        }
    });
    // Nothing acknowledged is lost: every block at both sites holds at least its last
    // acknowledged write.
    let end = Instant::now();
    let (before, mut lost) = (figs.stale.len(), 0);
    for (i, t) in [&m.a, &m.b].into_iter().enumerate() {
        let mut s = session(t).expect("connect at the end");
        for lba in BASE..BASE + BLOCKS {
            let (c, data) = s.q.execute(cmds::read(0, 1, lba, 1), vec![], 512).expect("read at the end");
            assert!(c.status().is_success(), "read of {lba} at site {i} once both serve: {}", c.status());
            check_read(&sh, &format!("{} at the end", ["A", "B"][i]), lba, end, &data, &mut figs);
        }
        lost = figs.stale.len() - before;
    }
    eprintln!(
        "soak: {} faults in {:.0} s [{}]\nwrites acknowledged {} of {} sent; reads checked {}; stale reads {}; acknowledged writes lost {}; \
         write refusals {} [{}]; read errors {} [{}]; commands lost with their connection {}",
        faults.len(),
        sh.t0.elapsed().as_secs_f64(),
        faults.join("; "),
        figs.writes_acked,
        figs.writes_sent,
        figs.reads_checked,
        before,
        lost,
        figs.write_refusals.len(),
        tally(&figs.write_refusals),
        figs.read_errors.len(),
        tally(&figs.read_errors),
        figs.lost,
    );
    assert!(figs.stale.is_empty(), "stale reads or lost writes:\n{}", figs.stale.join("\n"));
    assert!(figs.garbled.is_empty(), "{}", figs.garbled.join("\n"));
    assert!(figs.hung.is_empty(), "{}", figs.hung.join("\n"));
    assert!(faults.len() >= 5 && figs.writes_acked > 0, "the soak ran: {} faults", faults.len());
}
