//! A metro site paused (SIGSTOP) and resumed (SIGCONT), as a VM freezes or a process is
//! descheduled: while it stood still its lease ran out and the other site may have taken over and
//! acknowledged writes, so the paused site must never answer a read from its lapsed lease (tracker
//! issue 15). Every read is checked against the writes acknowledged before it was sent: its
//! content must be no older than the last of them (an error status is always allowed).
//!
//! The moments are random: the seed is printed, and `PAUSE_SEED=<seed>` repeats a run.

use nvmetro_perf::Queue;
use nvmetro_proto::cmds;
use nvmetro_proto::nvme::{Completion, Status};
use nvmetro_tests::stamped::{block, check_read, ms, seed, session, stamp_of, tally, worker, BlockLog, Figures, Rng, Shared, BASE, BLOCKS};
use nvmetro_tests::{metro, serves, wait_until, Metro, TargetProcess};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const SITES: [&str; 2] = ["A", "B"];

fn sites(m: &Metro, paused: usize) -> (&TargetProcess, &TargetProcess) {
    if paused == 0 {
        (&m.a, &m.b)
    } else {
        (&m.b, &m.a)
    }
}

/// What a read got.
enum Answer {
    Stamp(u64),
    Status(Status),
    /// The connection failed (a path error for the host).
    Lost(String),
    Garbled(String),
}

fn answer(c: &Completion, data: &[u8], lba: u64) -> Answer {
    if !c.status().is_success() {
        return Answer::Status(c.status());
    }
    match stamp_of(data, lba) {
        Ok(s) => Answer::Stamp(s),
        Err(e) => Answer::Garbled(e),
    }
}

/// A read sent to the paused site's connection.
struct Read {
    cid: u16,
    sent: Instant,
    when: &'static str,
}

fn send_read(q: &mut Queue, lba: u64, when: &'static str) -> Read {
    let sent = Instant::now();
    let cid = q.submit(cmds::read(0, 1, lba, 1), vec![], 512);
    // A failed send shows as a lost answer below.
    let _ = q.flush();
    Read { cid, sent, when }
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    /// Reads queued and in flight when the site stops, right after one completed.
    Burst,
    /// Nothing in flight when the site stops.
    Idle,
}

struct Scenario {
    paused: usize,
    pause: Duration,
    mode: Mode,
}

#[derive(Default)]
struct Totals {
    reads: usize,
    path_errors: usize,
    /// Reads sent once Y was acknowledged: they must return Y or fail.
    after_ack: usize,
    stale: Vec<String>,
    unexpected: Vec<String>,
    not_acked: Vec<String>,
}

/// Writes Y to `lba` through `t` until it is acknowledged (sending the moment on `acked`) or
/// `deadline` passes; returns what refused it meanwhile.
fn write_until_acked(t: &TargetProcess, lba: u64, y: u64, deadline: Instant, acked: mpsc::Sender<Instant>) -> Vec<String> {
    let mut refusals = Vec::new();
    while Instant::now() < deadline {
        let mut s = match session(t) {
            Ok(s) => s,
            Err(e) => {
                refusals.push(format!("connect: {e}"));
                std::thread::sleep(Duration::from_millis(50)); // retry backoff
                continue;
            }
        };
        while Instant::now() < deadline {
            match s.q.execute(cmds::write(0, 1, lba, 1), block(y, lba), 0) {
                Ok((c, _)) if c.status().is_success() => {
                    let _ = acked.send(Instant::now());
                    return refusals;
                }
                Ok((c, _)) => {
                    refusals.push(c.status().to_string());
                    std::thread::sleep(Duration::from_millis(20)); // retry backoff
                }
                Err(e) => {
                    refusals.push(e.to_string());
                    break;
                }
            }
        }
    }
    refusals
}

/// X is written through the site to pause; it stops; Y is written through the other site while
/// reads of the block wait in the paused site's socket; it resumes. Every read must return Y if Y
/// was acknowledged before it was sent, X or Y otherwise, or an error.
fn pause_scenario(m: &Metro, sc: &Scenario, lba: u64, x: u64, y: u64, rng: &mut Rng, totals: &mut Totals) {
    let (p, o) = sites(m, sc.paused);
    let name = format!("{} paused {} ms ({:?})", SITES[sc.paused], ms(sc.pause), sc.mode);
    let mut sp = session(p).expect("connect to the site to pause");
    let (c, _) = sp.q.execute(cmds::write(0, 1, lba, 1), block(x, lba), 0).expect("write X");
    assert!(c.status().is_success(), "{name}: X written: {}", c.status());
    let mut reads = Vec::new();
    let mut answers: HashMap<u16, Answer> = HashMap::new();
    match sc.mode {
        Mode::Idle => std::thread::sleep(rng.ms(0, 150)),
        Mode::Burst => {
            let n = 5 + rng.below(60);
            let qd = 1 + rng.below(4);
            for _ in 0..qd {
                reads.push(send_read(&mut sp.q, lba, "before the pause"));
            }
            let mut done = 0;
            while done < n {
                let mut out = Vec::new();
                sp.q.wait_any(&mut out).expect("reads before the pause");
                for (c, data) in out {
                    answers.insert(c.cid, answer(&c, &data, lba));
                    done += 1;
                    reads.push(send_read(&mut sp.q, lba, "before the pause"));
                }
            }
            let spin = Instant::now() + Duration::from_micros(rng.below(500));
            while Instant::now() < spin {
                std::hint::spin_loop();
            }
        }
    }
    let in_flight = reads.iter().filter(|r| !answers.contains_key(&r.cid)).count();
    p.signal("STOP");
    let stopped = Instant::now();
    let resume_at = stopped + sc.pause;
    let deadline = resume_at + Duration::from_secs(20);
    let (tx, rx) = mpsc::channel();
    let (y_ack, refusals) = std::thread::scope(|s| {
        let writer = s.spawn(move || write_until_acked(o, lba, y, deadline, tx));
        let r1_at = stopped + rng.ms(0, ms(sc.pause) as u64 - 1);
        let (mut y_ack, mut r1) = (None, false);
        loop {
            let now = Instant::now();
            if !r1 && now >= r1_at {
                reads.push(send_read(&mut sp.q, lba, "during the pause"));
                r1 = true;
                continue;
            }
            if now >= resume_at {
                break;
            }
            let next = if r1 { resume_at } else { r1_at.min(resume_at) };
            match rx.recv_timeout(next - now) {
                Ok(t) => {
                    y_ack = Some(t);
                    reads.push(send_read(&mut sp.q, lba, "during the pause, after Y's acknowledgement"));
                }
                Err(RecvTimeoutError::Timeout) => {}
                // The writer gave up: the pause itself is all there is left to wait for.
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(next.saturating_duration_since(Instant::now())),
            }
        }
        p.signal("CONT");
        reads.push(send_read(&mut sp.q, lba, "right after SIGCONT"));
        if y_ack.is_none() {
            if let Ok(t) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                y_ack = Some(t);
                reads.push(send_read(&mut sp.q, lba, "after the pause, after Y's acknowledgement"));
            }
        }
        for r in &reads {
            if let std::collections::hash_map::Entry::Vacant(e) = answers.entry(r.cid) {
                e.insert(match sp.q.wait_for(r.cid) {
                    Ok((c, data)) => answer(&c, &data, lba),
                    Err(e) => Answer::Lost(e.to_string()),
                });
            }
        }
        (y_ack, writer.join().expect("writer"))
    });
    let since_stop = |t: Instant| ms(t.saturating_duration_since(stopped));
    let y_at = y_ack.map_or("never".to_string(), |t| format!("{} ms after SIGSTOP", since_stop(t)));
    let (mut got_x, mut got_y, mut errors) = (0, 0, Vec::new());
    let (mut after_ack, mut after_ack_y) = (0, 0);
    for r in &reads {
        let floor = if y_ack.is_some_and(|a| a < r.sent) { y } else { x };
        if r.sent >= stopped && floor == y {
            after_ack += 1;
            after_ack_y += usize::from(matches!(answers[&r.cid], Answer::Stamp(s) if s == y));
        }
        let sent = if r.sent < stopped { "before SIGSTOP".to_string() } else { format!("{} ms after SIGSTOP", since_stop(r.sent)) };
        totals.reads += 1;
        match &answers[&r.cid] {
            Answer::Stamp(s) if *s >= floor && (*s == x || *s == y) => {
                if *s == x {
                    got_x += 1
                } else {
                    got_y += 1
                }
            }
            Answer::Stamp(s) => totals.stale.push(format!(
                "{name}: a read sent {sent} ({}) returned stamp {s} (X = {x}) though Y = {y} was acknowledged {y_at}",
                r.when
            )),
            Answer::Status(st) if st.is_path_error() => errors.push(st.to_string()),
            Answer::Lost(e) => errors.push(format!("connection: {e}")),
            Answer::Status(st) => totals.unexpected.push(format!("{name}: a read sent {sent} ({}) failed with {st}", r.when)),
            Answer::Garbled(e) => totals.unexpected.push(format!("{name}: a read sent {sent} ({}): {e}", r.when)),
        }
    }
    totals.path_errors += errors.len();
    totals.after_ack += after_ack;
    eprintln!(
        "{name}: {in_flight} reads in flight at SIGSTOP; Y acknowledged {y_at} after {} refusals [{}]; {} reads: X {got_x}, Y {got_y}, errors {} [{}]; sent after Y's acknowledgement: {after_ack} (Y {after_ack_y})",
        refusals.len(),
        tally(&refusals),
        reads.len(),
        errors.len(),
        tally(&errors)
    );
    if y_ack.is_none() {
        totals.not_acked.push(format!("{name}: Y was never acknowledged: {}", tally(&refusals)));
    }
    drop(sp);
    wait_until("both sites serve again", Duration::from_secs(60), || serves(&m.a) == Some(true) && serves(&m.b) == Some(true));
    // Both copies hold what was acknowledged last.
    let want = if y_ack.is_some() { y } else { x };
    for (i, t) in [&m.a, &m.b].into_iter().enumerate() {
        let mut s = session(t).expect("connect after the pause");
        let (c, data) = s.q.execute(cmds::read(0, 1, lba, 1), vec![], 512).expect("read after the pause");
        assert!(c.status().is_success(), "{name}: read at {} after both serve: {}", SITES[i], c.status());
        let got = stamp_of(&data, lba);
        if got.as_ref().map_or(true, |s| *s < want) {
            totals.stale.push(format!("{name}: once both serve, {} returns {got:?} for block {lba}, want stamp {want}", SITES[i]));
        }
    }
}

#[test]
fn a_paused_site_never_answers_a_read_from_a_lapsed_lease() {
    let mut rng = Rng(seed("a_paused_site_never_answers_a_read_from_a_lapsed_lease"));
    let m = metro(false, "");
    let started = Instant::now();
    let mut scenarios = Vec::new();
    for paused in 0..2 {
        // Below the lease (500 ms), around it and the takeover (about 1 s), above both.
        for pause in [rng.ms(150, 250), rng.ms(500, 700), rng.ms(1400, 1600), rng.ms(2800, 3200)] {
            for mode in [Mode::Burst, Mode::Idle] {
                scenarios.push(Scenario { paused, pause, mode });
            }
        }
    }
    rng.shuffle(&mut scenarios);
    let mut totals = Totals::default();
    for (i, sc) in scenarios.iter().enumerate() {
        let i = i as u64;
        pause_scenario(&m, sc, 100 + i, 2 * i + 1, 2 * i + 2, &mut rng, &mut totals);
    }
    eprintln!(
        "{} pauses tried; {} reads checked ({} sent after Y's acknowledgement): stale {}, path errors {}, unexpected {}; Y acknowledged in {} of {}; {:.1} s",
        scenarios.len(),
        totals.reads,
        totals.after_ack,
        totals.stale.len(),
        totals.path_errors,
        totals.unexpected.len(),
        scenarios.len() - totals.not_acked.len(),
        scenarios.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(totals.stale.is_empty(), "stale reads:\n{}", totals.stale.join("\n"));
    assert!(totals.unexpected.is_empty(), "unexpected answers:\n{}", totals.unexpected.join("\n"));
    assert!(totals.not_acked.is_empty(), "{}", totals.not_acked.join("\n"));
}

#[test]
fn reads_under_load_are_never_stale_while_sites_pause_at_random() {
    let seed = seed("reads_under_load_are_never_stale_while_sites_pause_at_random");
    let mut rng = Rng(seed);
    let m = metro(false, "");
    let sh = Shared {
        blocks: (0..BLOCKS).map(|_| Mutex::new(BlockLog::default())).collect(),
        next_stamp: AtomicU64::new(1),
        stop: AtomicBool::new(false),
        t0: Instant::now(),
    };
    // Below the lease (500 ms), around it and the takeover (about 1 s), above both; four each.
    let classes = [("below", 100, 400), ("around", 450, 800), ("above", 1200, 3000)];
    let mut plan: Vec<(usize, usize)> = (0..12).map(|i| (i % 3, rng.below(2) as usize)).collect();
    rng.shuffle(&mut plan);
    let mut pauses = Vec::new();
    let mut figs = Figures::default();
    std::thread::scope(|s| {
        let workers: Vec<_> = [(&m.a, "A"), (&m.b, "B")]
            .into_iter()
            .enumerate()
            .map(|(i, (t, name))| {
                let (sh, seed) = (&sh, seed.wrapping_add(i as u64 + 1));
                s.spawn(move || worker(name, t.addr, sh, seed))
            })
            .collect();
        for (class, site) in plan {
            if sh.t0.elapsed() > Duration::from_secs(55) {
                break;
            }
            std::thread::sleep(rng.ms(300, 1200)); // a random moment under load
            let (name, lo, hi) = classes[class];
            let d = rng.ms(lo, hi);
            let t = sites(&m, site).0;
            let at = ms(sh.t0.elapsed());
            t.signal("STOP");
            std::thread::sleep(d);
            t.signal("CONT");
            let resumed = Instant::now();
            wait_until("both sites serve again", Duration::from_secs(60), || serves(&m.a) == Some(true) && serves(&m.b) == Some(true));
            let line = format!("{} {} ms ({name}) at {at} ms, both serve {} ms after SIGCONT", SITES[site], ms(d), ms(resumed.elapsed()));
            eprintln!("pause: {line}");
            pauses.push(line);
        }
        std::thread::sleep(rng.ms(300, 1000)); // more load once both serve
        sh.stop.store(true, Ordering::Release);
        for w in workers {
            figs.add(w.join().expect("worker"));
        }
    });
    // Both copies hold, for every block, at least what was acknowledged last.
    let end = Instant::now();
    let mut final_reads = 0;
    for (i, t) in [&m.a, &m.b].into_iter().enumerate() {
        let mut s = session(t).expect("connect at the end");
        for lba in BASE..BASE + BLOCKS {
            let (c, data) = s.q.execute(cmds::read(0, 1, lba, 1), vec![], 512).expect("read at the end");
            assert!(c.status().is_success(), "read of {lba} at {} once both serve: {}", SITES[i], c.status());
            check_read(&sh, &format!("{} at the end", SITES[i]), lba, end, &data, &mut figs);
            final_reads += 1;
        }
    }
    eprintln!(
        "{} pauses tried: {}\nreads checked {} (of which {final_reads} at the end), stale reads {}, garbled {}; writes acknowledged {} of {} sent; \
         write refusals {} [{}]; read errors {} [{}]; commands lost with their connection {}; {:.1} s",
        pauses.len(),
        pauses.join("; "),
        figs.reads_checked,
        figs.stale.len(),
        figs.garbled.len(),
        figs.writes_acked,
        figs.writes_sent,
        figs.write_refusals.len(),
        tally(&figs.write_refusals),
        figs.read_errors.len(),
        tally(&figs.read_errors),
        figs.lost,
        sh.t0.elapsed().as_secs_f64()
    );
    assert!(figs.stale.is_empty(), "stale reads:\n{}", figs.stale.join("\n"));
    assert!(figs.garbled.is_empty(), "{}", figs.garbled.join("\n"));
    assert!(figs.hung.is_empty(), "{}", figs.hung.join("\n"));
    assert!(pauses.len() >= 6, "only {} pauses fitted in the time", pauses.len());
    assert!(figs.writes_acked > 0 && figs.reads_checked > final_reads, "the workload ran");
}
