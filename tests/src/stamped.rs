//! A stamped, verifying workload for fault tests: every block holds a unique stamp, every write's
//! send and acknowledgement times are kept, and every read is checked against the writes
//! acknowledged before it was sent (its content must be no older than the last of them; an error
//! status is always allowed). [`worker`] drives one site until told to stop.

use crate::{TargetProcess, HOSTNQN, METRO_NQN};
use nvmetro_perf::{ConnectOptions, Host, HostError, Queue};
use nvmetro_proto::cmds;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Blocks of 512 bytes holding `(stamp, lba)` 32 times over; 0 is a block never written.
pub fn block(stamp: u64, lba: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(512);
    for _ in 0..32 {
        b.extend_from_slice(&stamp.to_le_bytes());
        b.extend_from_slice(&lba.to_le_bytes());
    }
    b
}

/// The stamp block `lba` holds, or why it is neither a stamped block of `lba` nor unwritten.
pub fn stamp_of(data: &[u8], lba: u64) -> Result<u64, String> {
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
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// A duration of `lo..=hi` ms.
    pub fn ms(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi - lo + 1))
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

pub fn seed(test: &str) -> u64 {
    let seed = std::env::var("PAUSE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64));
    eprintln!("{test}: seed {seed} (PAUSE_SEED={seed} repeats it)");
    seed
}

/// One controller at a site: the admin queue kept open (no keep-alive: a paused site must not
/// drop it for that) and one I/O queue.
pub struct Session {
    pub admin: Queue,
    pub q: Queue,
}

pub fn session(t: &TargetProcess) -> Result<Session, HostError> {
    session_at(t.addr)
}

/// A [`Session`] with the site listening at `addr`.
pub fn session_at(addr: std::net::SocketAddr) -> Result<Session, HostError> {
    let mut o = ConnectOptions::new(addr, METRO_NQN);
    o.hostnqn = HOSTNQN.into();
    o.kato_ms = 0;
    o.timeout = Duration::from_secs(20);
    let (admin, mut io) = Host::connect(&o)?.into_parts();
    Ok(Session { admin, q: io.pop().ok_or(HostError::Closed)? })
}

pub fn ms(d: Duration) -> u128 {
    d.as_millis()
}

/// Counts repeated entries: `["x", "x", "y"]` → `x ×2, y`.
pub fn tally<'a>(items: impl IntoIterator<Item = &'a String>) -> String {
    let mut n: BTreeMap<&str, usize> = BTreeMap::new();
    for i in items {
        *n.entry(i.as_str()).or_default() += 1;
    }
    n.iter().map(|(k, v)| if *v > 1 { format!("{k} ×{v}") } else { (*k).to_string() }).collect::<Vec<_>>().join(", ")
}

/// The workload's blocks: `BASE..BASE + BLOCKS`.
pub const BASE: u64 = 1000;
pub const BLOCKS: u64 = 32;

/// One write of a block: its stamp, when it was sent and when its acknowledgement was seen.
pub struct Written {
    pub stamp: u64,
    pub sent: Instant,
    pub acked: Option<Instant>,
}

#[derive(Default)]
pub struct BlockLog {
    /// A write of the block is outstanding: no other is sent (so writes of a block are applied in
    /// the order of their stamps).
    pub busy: bool,
    /// A write's outcome is unknown (its connection failed): the block is not written again.
    pub retired: bool,
    pub writes: Vec<Written>,
}

impl BlockLog {
    /// The stamp a read sent at `sent` must return at least: the last acknowledged before it.
    pub fn floor(&self, sent: Instant) -> u64 {
        self.writes.iter().filter(|w| w.acked.is_some_and(|a| a < sent)).map(|w| w.stamp).max().unwrap_or(0)
    }

    pub fn describe(&self, stamp: u64, t0: Instant) -> String {
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

pub struct Shared {
    pub blocks: Vec<Mutex<BlockLog>>,
    pub next_stamp: AtomicU64,
    pub stop: AtomicBool,
    pub t0: Instant,
}

#[derive(Default)]
pub struct Figures {
    pub reads_checked: usize,
    pub stale: Vec<String>,
    pub garbled: Vec<String>,
    pub hung: Vec<String>,
    pub writes_sent: usize,
    pub writes_acked: usize,
    pub write_refusals: Vec<String>,
    pub read_errors: Vec<String>,
    /// Commands whose connection failed before they completed.
    pub lost: usize,
}

impl Figures {
    pub fn add(&mut self, o: Figures) {
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

pub struct Op {
    pub lba: u64,
    /// The stamp written, or None for a read.
    pub write: Option<u64>,
    pub sent: Instant,
}

/// Checks a read of `lba` sent at `sent` that returned `data`.
pub fn check_read(sh: &Shared, site: &str, lba: u64, sent: Instant, data: &[u8], fig: &mut Figures) {
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
pub fn worker(site: &str, addr: std::net::SocketAddr, sh: &Shared, seed: u64) -> Figures {
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
            match session_at(addr) {
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
