//! A metro site paused (SIGSTOP) and resumed (SIGCONT), as a VM freezes or a process is
//! descheduled: while it stood still its lease ran out and the other site may have taken over and
//! acknowledged writes, so the paused site must never answer a read from its lapsed lease (tracker
//! issue 15). Every read is checked against the writes acknowledged before it was sent: its
//! content must be no older than the last of them (an error status is always allowed).
//!
//! The moments are random: the seed is printed, and `PAUSE_SEED=<seed>` repeats a run.

use nvmetro_perf::{ConnectOptions, Host, HostError, Queue};
use nvmetro_proto::cmds;
use nvmetro_proto::nvme::{Completion, Status};
use nvmetro_tests::{metro, serves, wait_until, Metro, TargetProcess, HOSTNQN, METRO_NQN};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Blocks of 512 bytes holding `(stamp, lba)` 32 times over; 0 is a block never written.
fn block(stamp: u64, lba: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(512);
    for _ in 0..32 {
        b.extend_from_slice(&stamp.to_le_bytes());
        b.extend_from_slice(&lba.to_le_bytes());
    }
    b
}

/// The stamp block `lba` holds, or why it is neither a stamped block of `lba` nor unwritten.
fn stamp_of(data: &[u8], lba: u64) -> Result<u64, String> {
    if data.len() == 512 && data.iter().all(|&b| b == 0) {
        return Ok(0);
    }
    let stamp = u64::from_le_bytes(data.get(..8).and_then(|s| s.try_into().ok()).ok_or("short read")?);
    if data != block(stamp, lba).as_slice() {
        return Err(format!("block {lba} holds neither a whole stamp of its own nor zeros (starts with {stamp})"));
    }
    Ok(stamp)
}

/// SplitMix64: reproducible random moments from a printed seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A duration of `lo..=hi` ms.
    fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

fn seed(test: &str) -> u64 {
    let seed = std::env::var("PAUSE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64));
    eprintln!("{test}: seed {seed} (PAUSE_SEED={seed} repeats it)");
    seed
}

/// One controller at a site: the admin queue kept open (no keep-alive: a paused site must not
/// drop it for that) and one I/O queue.
struct Session {
    _admin: Queue,
    q: Queue,
}

fn session(t: &TargetProcess) -> Result<Session, HostError> {
    let mut o = ConnectOptions::new(t.addr, METRO_NQN);
    o.hostnqn = HOSTNQN.into();
    o.kato_ms = 0;
    o.timeout = Duration::from_secs(20);
    let (admin, mut io) = Host::connect(&o)?.into_parts();
    Ok(Session { _admin: admin, q: io.pop().ok_or(HostError::Closed)? })
}

const SITES: [&str; 2] = ["A", "B"];

fn sites(m: &Metro, paused: usize) -> (&TargetProcess, &TargetProcess) {
    if paused == 0 {
        (&m.a, &m.b)
    } else {
        (&m.b, &m.a)
    }
}

fn ms(d: Duration) -> u128 {
    d.as_millis()
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

/// Counts repeated entries: `["x", "x", "y"]` → `x ×2, y`.
fn tally<'a>(items: impl IntoIterator<Item = &'a String>) -> String {
    let mut n: BTreeMap<&str, usize> = BTreeMap::new();
    for i in items {
        *n.entry(i.as_str()).or_default() += 1;
    }
    n.iter().map(|(k, v)| if *v > 1 { format!("{k} ×{v}") } else { (*k).to_string() }).collect::<Vec<_>>().join(", ")
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

/// The workload's blocks: `BASE..BASE + BLOCKS`.
const BASE: u64 = 1000;
const BLOCKS: u64 = 32;

/// One write of a block: its stamp, when it was sent and when its acknowledgement was seen.
struct Written {
    stamp: u64,
    sent: Instant,
    acked: Option<Instant>,
}

#[derive(Default)]
struct BlockLog {
    /// A write of the block is outstanding: no other is sent (so writes of a block are applied in
    /// the order of their stamps).
    busy: bool,
    /// A write's outcome is unknown (its connection failed): the block is not written again.
    retired: bool,
    writes: Vec<Written>,
}

impl BlockLog {
    /// The stamp a read sent at `sent` must return at least: the last acknowledged before it.
    fn floor(&self, sent: Instant) -> u64 {
        self.writes.iter().filter(|w| w.acked.is_some_and(|a| a < sent)).map(|w| w.stamp).max().unwrap_or(0)
    }

    fn describe(&self, stamp: u64, t0: Instant) -> String {
        let at = |t: Instant| format!("{} ms", ms(t.saturating_duration_since(t0)));
        match self.writes.iter().find(|w| w.stamp == stamp) {
            Some(w) => format!(
                "stamp {stamp} (sent {}, {})",
                at(w.sent),
                w.acked.map_or("not acknowledged".into(), |a| format!("acknowledged {}", at(a)))
            ),
            None => format!("stamp {stamp} (never written)"),
        }
    }
}

struct Shared {
    blocks: Vec<Mutex<BlockLog>>,
    next_stamp: AtomicU64,
    stop: AtomicBool,
    t0: Instant,
}

#[derive(Default)]
struct Figures {
    reads_checked: usize,
    stale: Vec<String>,
    garbled: Vec<String>,
    hung: Vec<String>,
    writes_sent: usize,
    writes_acked: usize,
    write_refusals: Vec<String>,
    read_errors: Vec<String>,
    /// Commands whose connection failed before they completed.
    lost: usize,
}

impl Figures {
    fn add(&mut self, o: Figures) {
        self.reads_checked += o.reads_checked;
        self.stale.extend(o.stale);
        self.garbled.extend(o.garbled);
        self.hung.extend(o.hung);
        self.writes_sent += o.writes_sent;
        self.writes_acked += o.writes_acked;
        self.write_refusals.extend(o.write_refusals);
        self.read_errors.extend(o.read_errors);
        self.lost += o.lost;
    }
}

struct Op {
    lba: u64,
    /// The stamp written, or None for a read.
    write: Option<u64>,
    sent: Instant,
}

/// Checks a read of `lba` sent at `sent` that returned `data`.
fn check_read(sh: &Shared, site: &str, lba: u64, sent: Instant, data: &[u8], fig: &mut Figures) {
    let log = sh.blocks[(lba - BASE) as usize].lock().expect("block log");
    let floor = log.floor(sent);
    match stamp_of(data, lba) {
        Ok(s) if s >= floor && (s == 0 || log.writes.iter().any(|w| w.stamp == s)) => fig.reads_checked += 1,
        Ok(s) if s < floor => fig.stale.push(format!(
            "{site}: a read of block {lba} sent {} ms in returned {} though {} was acknowledged before it was sent",
            ms(sent.saturating_duration_since(sh.t0)),
            log.describe(s, sh.t0),
            log.describe(floor, sh.t0)
        )),
        Ok(s) => fig.garbled.push(format!("{site}: block {lba} returned stamp {s}, which was never written to it")),
        Err(e) => fig.garbled.push(format!("{site}: {e}")),
    }
}

/// Writes stamped blocks and reads them back through `t` until told to stop: up to 4 commands in
/// flight, and while the site does not answer, one more read every 50 ms (they wait in its
/// socket) up to 48.
fn worker(site: &str, t: &TargetProcess, sh: &Shared, seed: u64) -> Figures {
    let mut rng = Rng(seed);
    let mut fig = Figures::default();
    let mut sess: Option<Session> = None;
    let mut pending: HashMap<u16, Op> = HashMap::new();
    let (mut last_sent, mut hold_until) = (Instant::now(), Instant::now());
    let mut drain_until = None;
    loop {
        let stop = sh.stop.load(Ordering::Acquire);
        if stop {
            let until = *drain_until.get_or_insert_with(|| Instant::now() + Duration::from_secs(25));
            if pending.is_empty() || Instant::now() > until {
                break;
            }
        }
        let Some(s) = sess.as_mut() else {
            if stop {
                break;
            }
            match session(t) {
                Ok(s) => sess = Some(s),
                Err(_) => std::thread::sleep(Duration::from_millis(50)), // reconnect backoff
            }
            continue;
        };
        let now = Instant::now();
        while !stop && now >= hold_until && (pending.len() < 4 || (pending.len() < 48 && now - last_sent >= Duration::from_millis(50))) {
            let lba = BASE + rng.below(BLOCKS);
            let mut write = None;
            if pending.len() < 4 && rng.below(2) == 0 {
                let mut log = sh.blocks[(lba - BASE) as usize].lock().expect("block log");
                if !log.busy && !log.retired {
                    let stamp = sh.next_stamp.fetch_add(1, Ordering::AcqRel);
                    log.busy = true;
                    log.writes.push(Written { stamp, sent: Instant::now(), acked: None });
                    write = Some(stamp);
                }
            }
            let sent = Instant::now();
            let cid = match write {
                Some(stamp) => {
                    fig.writes_sent += 1;
                    s.q.submit(cmds::write(0, 1, lba, 1), block(stamp, lba), 0)
                }
                None => s.q.submit(cmds::read(0, 1, lba, 1), vec![], 512),
            };
            pending.insert(cid, Op { lba, write, sent });
            last_sent = sent;
        }
        let mut out = Vec::new();
        let r = s.q.flush().and_then(|()| s.q.poll_timeout(&mut out, Duration::from_millis(10)));
        for (c, data) in out {
            let Some(op) = pending.remove(&c.cid) else { continue };
            let done = Instant::now();
            match op.write {
                Some(stamp) => {
                    let mut log = sh.blocks[(op.lba - BASE) as usize].lock().expect("block log");
                    log.busy = false;
                    if c.status().is_success() {
                        fig.writes_acked += 1;
                        if let Some(w) = log.writes.iter_mut().find(|w| w.stamp == stamp) {
                            w.acked = Some(done);
                        }
                    } else {
                        fig.write_refusals.push(c.status().to_string());
                        hold_until = done + Duration::from_millis(20);
                    }
                }
                None if c.status().is_success() => check_read(sh, site, op.lba, op.sent, &data, &mut fig),
                None => {
                    fig.read_errors.push(c.status().to_string());
                    hold_until = done + Duration::from_millis(20);
                }
            }
        }
        let oldest = pending.values().map(|o| o.sent).min();
        let hung = oldest.filter(|o| o.elapsed() > Duration::from_secs(25));
        if let Some(o) = hung {
            fig.hung.push(format!("{site}: a command sent {} ms in had no answer after 25 s", ms(o.saturating_duration_since(sh.t0))));
        }
        if r.is_err() || hung.is_some() {
            // The connection failed: what was outstanding has an unknown outcome.
            for op in pending.drain().map(|(_, op)| op) {
                fig.lost += 1;
                if op.write.is_some() {
                    let mut log = sh.blocks[(op.lba - BASE) as usize].lock().expect("block log");
                    log.busy = false;
                    log.retired = true;
                }
            }
            sess = None;
            hold_until = Instant::now() + Duration::from_millis(50);
        }
    }
    fig
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
                s.spawn(move || worker(name, t, sh, seed))
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
