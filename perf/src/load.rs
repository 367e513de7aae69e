//! The load engine: keeps `qd` commands in flight on one queue, records per-command latency in an
//! HdrHistogram (nanoseconds), optionally at a fixed rate, and with `verify` stamps every block it
//! writes (LBA, generation, CRC32C) and checks every block it reads against the last
//! acknowledged write.

use crate::{HostError, Queue};
use hdrhistogram::Histogram;
use nvmetro_proto::cmds;
use nvmetro_proto::nvme::Completion;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    Random,
    Sequential,
}

#[derive(Debug, Clone)]
pub struct Workload {
    pub nsid: u32,
    pub pattern: Pattern,
    /// Percentage of reads, 0 to 100.
    pub read_pct: u32,
    pub block_size: usize,
    pub qd: usize,
    pub duration: Duration,
    /// Time at the start that is run but not counted.
    pub ramp: Duration,
    /// Stop after this many commands (counted ones), if set.
    pub max_ios: Option<u64>,
    /// Fixed rate in commands per second for this queue, if set.
    pub rate: Option<u64>,
    pub verify: bool,
    /// First LBA and number of LBAs of the region used.
    pub region: (u64, u64),
    pub seed: u64,
}

/// A verify failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub lba: u64,
    pub expected_generation: u64,
    pub found: String,
}

#[derive(Debug, Clone)]
pub struct JobResult {
    pub reads: u64,
    pub writes: u64,
    pub bytes: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    pub latency_ns: Histogram<u64>,
    pub mismatches: Vec<Mismatch>,
    /// Times I/O stood still between a path failure and the next success.
    pub stalls: Vec<Stall>,
}

/// I/O stood still for `duration` until it resumed on `path`.
#[derive(Debug, Clone)]
pub struct Stall {
    pub path: String,
    pub duration: Duration,
}

impl JobResult {
    pub fn ios(&self) -> u64 {
        self.reads + self.writes
    }
    pub fn merge(&mut self, o: &JobResult) {
        self.reads += o.reads;
        self.writes += o.writes;
        self.bytes += o.bytes;
        self.errors += o.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&o.first_error);
        }
        self.elapsed = self.elapsed.max(o.elapsed);
        let _ = self.latency_ns.add(&o.latency_ns);
        self.mismatches.extend(o.mismatches.iter().cloned());
        self.stalls.extend(o.stalls.iter().cloned());
    }
    pub fn empty() -> JobResult {
        JobResult {
            reads: 0,
            writes: 0,
            bytes: 0,
            errors: 0,
            first_error: None,
            elapsed: Duration::ZERO,
            latency_ns: Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("histogram bounds"),
            mismatches: Vec::new(),
            stalls: Vec::new(),
        }
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*: fast and good enough to spread LBAs.
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Fills a block with a verifiable stamp: LBA, generation, pattern, CRC32C of the rest.
pub fn stamp(block: &mut [u8], lba: u64, generation: u64) {
    block[0..8].copy_from_slice(&lba.to_le_bytes());
    block[8..16].copy_from_slice(&generation.to_le_bytes());
    let n = block.len();
    let mut x = lba ^ generation.rotate_left(32) ^ 0x9e37_79b9_7f4a_7c15;
    for chunk in block[16..n - 4].chunks_mut(8) {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    let crc = crc32c::crc32c(&block[..n - 4]);
    block[n - 4..].copy_from_slice(&crc.to_le_bytes());
}

/// Reads a stamp back: `Ok(None)` for a never-written (zero) block, `Ok(Some((lba, generation)))`
/// for a valid stamp, `Err` with what was wrong.
pub fn read_stamp(block: &[u8]) -> Result<Option<(u64, u64)>, String> {
    if block.iter().all(|&b| b == 0) {
        return Ok(None);
    }
    let n = block.len();
    let crc = u32::from_le_bytes(block[n - 4..].try_into().expect("4 bytes"));
    if crc32c::crc32c(&block[..n - 4]) != crc {
        return Err("checksum mismatch (torn or foreign data)".into());
    }
    Ok(Some((u64::from_le_bytes(block[0..8].try_into().expect("8")), u64::from_le_bytes(block[8..16].try_into().expect("8")))))
}

/// A path (one controller of the subsystem) as the load engine sees it, shared with the
/// [`crate::paths::PathMonitor`] that keeps it alive, follows its ANA state and reconnects it.
#[derive(Debug)]
pub struct PathShared {
    pub name: String,
    /// The admin queue answers; false while the path is down.
    pub alive: AtomicBool,
    /// ANA state of the namespace's group on this path (`AnaState as u8`; 0 = not yet known).
    pub ana: AtomicU8,
    /// Fresh I/O queues after a reconnect, one per worker.
    pub mailbox: Mutex<Vec<Option<Queue>>>,
    pub has_mail: AtomicBool,
}

impl PathShared {
    pub fn new(name: &str, workers: usize) -> PathShared {
        PathShared {
            name: name.into(),
            alive: AtomicBool::new(true),
            ana: AtomicU8::new(0),
            mailbox: Mutex::new((0..workers).map(|_| None).collect()),
            has_mail: AtomicBool::new(false),
        }
    }

    /// Lower is better: optimized 0, unknown 1, non-optimized 2; `None` when unusable.
    fn rank(&self) -> Option<u8> {
        if !self.alive.load(Ordering::Acquire) {
            return None;
        }
        match self.ana.load(Ordering::Acquire) {
            1 => Some(0),
            0 => Some(1),
            2 => Some(2),
            _ => None,
        }
    }
}

/// How long a path that answered with a path error is avoided while its ANA state stays the same.
pub const PATH_ERROR_BACKOFF: Duration = Duration::from_millis(250);

/// One worker's queue on one path.
pub struct PathIo {
    pub shared: Arc<PathShared>,
    pub queue: Option<Queue>,
    inflight: HashMap<u16, Pending>,
    /// Set after a path error until the monitor reports a new ANA state, or (as a host that
    /// re-reads the ANA log and finds the path usable) until [`PATH_ERROR_BACKOFF`] has passed:
    /// a transient ANA Transition answer may never show in the log.
    avoid_until_ana_changes: Option<(u8, Instant)>,
    pub result: JobResult,
}

impl PathIo {
    pub fn new(shared: Arc<PathShared>, queue: Option<Queue>) -> PathIo {
        PathIo { shared, queue, inflight: HashMap::new(), avoid_until_ana_changes: None, result: JobResult::empty() }
    }

    /// A single path that is always considered usable.
    pub fn single(queue: Queue) -> PathIo {
        PathIo::new(Arc::new(PathShared::new("path0", 1)), Some(queue))
    }

    fn usable_rank(&mut self) -> Option<u8> {
        self.queue.as_ref()?;
        let ana = self.shared.ana.load(Ordering::Acquire);
        if let Some((bad, until)) = self.avoid_until_ana_changes {
            if bad == ana && Instant::now() < until {
                return None;
            }
            self.avoid_until_ana_changes = None;
        }
        self.shared.rank()
    }
}

#[derive(Debug, Clone)]
struct Op {
    start: Instant,
    lba: u64,
    slot: u64,
    write: bool,
    generation: u64,
}

/// The data a write carries: stamps when verifying, else the LBA in the first bytes. Derived from
/// (LBA, generation), so a retry on another path rebuilds it instead of keeping a copy.
fn write_data(wl: &Workload, lba_size: u32, lba: u64, generation: u64) -> Vec<u8> {
    let mut data = vec![0u8; wl.block_size];
    if wl.verify {
        for (i, b) in data.chunks_mut(lba_size as usize).enumerate() {
            stamp(b, lba + i as u64, generation);
        }
    } else {
        data[0..8].copy_from_slice(&lba.to_le_bytes());
    }
    data
}

#[derive(Debug)]
struct Pending {
    op: Op,
}

/// Runs `wl` on one path. `generations` holds the last acknowledged generation of every block
/// of the region (shared across runs, so a later read-back can check earlier writes).
pub fn run(path: &mut PathIo, wl: &Workload, lba_size: u32, generations: &mut HashMap<u64, u64>) -> Result<JobResult, HostError> {
    run_paths(std::slice::from_mut(path), wl, lba_size, generations, 0, None)
}

/// Runs `wl` over several paths of one namespace: commands go to the best path (Optimized, then
/// Non-Optimized), path errors and lost connections send them to another path, and the time from
/// the first failure to the next success is recorded as a stall (the failover time).
/// `progress`, when given, counts completed commands for a live display.
pub fn run_paths(
    paths: &mut [PathIo],
    wl: &Workload,
    lba_size: u32,
    generations: &mut HashMap<u64, u64>,
    worker: usize,
    progress: Option<&AtomicU64>,
) -> Result<JobResult, HostError> {
    let blocks_per_io = (wl.block_size / lba_size as usize).max(1) as u64;
    let slots = (wl.region.1 / blocks_per_io).max(1);
    let mut rng = Rng(wl.seed | 1);
    let mut seq = 0u64;
    let mut res = JobResult::empty();
    let mut busy_slots: HashMap<u64, ()> = HashMap::new();
    let mut retry: Vec<Op> = Vec::new();
    let mut stall_since: Option<Instant> = None;
    let start = Instant::now();
    let counted_from = start + wl.ramp;
    let end = counted_from + wl.duration;
    let interval = wl.rate.map(|r| Duration::from_nanos(1_000_000_000 / r.max(1)));
    let mut next_due = start;
    let mut done = Vec::new();
    let mut submitted_counted = 0u64;
    let mut turn = 0usize;
    let mut ready = Vec::new();
    let give_up = wl.duration + wl.ramp + Duration::from_secs(60);
    loop {
        for p in paths.iter_mut() {
            if p.shared.has_mail.load(Ordering::Acquire) {
                let mut mail = p.shared.mailbox.lock().expect("mailbox");
                if let Some(q) = mail.get_mut(worker).and_then(Option::take) {
                    // Commands still in flight on the replaced queue will never be answered there.
                    retry.extend(p.inflight.drain().map(|(_, pending)| pending.op));
                    p.queue = Some(q);
                    p.avoid_until_ana_changes = None;
                }
                if mail.iter().all(Option::is_none) {
                    p.shared.has_mail.store(false, Ordering::Release);
                }
            }
        }
        let inflight: usize = paths.iter().map(|p| p.inflight.len()).sum();
        let now = Instant::now();
        let stop_submitting = now >= end || wl.max_ios.is_some_and(|m| submitted_counted >= m);
        if stop_submitting && inflight == 0 && retry.is_empty() {
            break;
        }
        if now > start + give_up {
            return Err(HostError::Timeout);
        }
        let mut budget = wl.qd.saturating_sub(inflight);
        while budget > 0 {
            // The best rank present, and among the paths of that rank the next in turn: two
            // Optimized paths share the load.
            let ranks: Vec<Option<u8>> = paths.iter_mut().map(PathIo::usable_rank).collect();
            let Some(best) = ranks.iter().flatten().min().copied() else {
                stall_since.get_or_insert_with(Instant::now);
                break;
            };
            let candidates = ranks.iter().filter(|r| **r == Some(best)).count();
            let pick = turn % candidates;
            turn = turn.wrapping_add(1);
            let pi = ranks.iter().enumerate().filter(|(_, r)| **r == Some(best)).nth(pick).map(|(i, _)| i).expect("counted above");
            let op = if let Some(op) = retry.pop() {
                op
            } else {
                if stop_submitting || wl.max_ios.is_some_and(|m| submitted_counted >= m) {
                    break;
                }
                if let Some(iv) = interval {
                    if Instant::now() < next_due {
                        break;
                    }
                    next_due += iv;
                }
                let mut slot = match wl.pattern {
                    Pattern::Random => rng.next() % slots,
                    Pattern::Sequential => {
                        seq += 1;
                        (seq - 1) % slots
                    }
                };
                // Never two commands on one block at once: verify needs a known last writer.
                let mut tries = 0;
                while busy_slots.contains_key(&slot) && tries < 64 {
                    slot = (slot + 1) % slots;
                    tries += 1;
                }
                if busy_slots.contains_key(&slot) {
                    break;
                }
                busy_slots.insert(slot, ());
                let lba = wl.region.0 + slot * blocks_per_io;
                let write = (rng.next() % 100) as u32 >= wl.read_pct;
                let generation = if write { known_generation(generations, lba) + 1 } else { 0 };
                let t = Instant::now();
                if t >= counted_from {
                    submitted_counted += 1;
                }
                Op { start: t, lba, slot, write, generation }
            };
            let cmd = if op.write {
                cmds::write(0, wl.nsid, op.lba, blocks_per_io as u32)
            } else {
                cmds::read(0, wl.nsid, op.lba, blocks_per_io as u32)
            };
            let p = &mut paths[pi];
            let q = p.queue.as_mut().expect("usable path has a queue");
            let (data, read_len) =
                if op.write { (write_data(wl, lba_size, op.lba, op.generation), 0) } else { (Vec::new(), wl.block_size) };
            let cid = q.submit(cmd, data, read_len);
            p.inflight.insert(cid, Pending { op });
            budget -= 1;
        }
        let mut failed_paths = Vec::new();
        for (i, p) in paths.iter_mut().enumerate() {
            if let Some(q) = p.queue.as_mut() {
                if q.flush().is_err() {
                    failed_paths.push(i);
                }
            }
        }
        for i in failed_paths {
            lose_path(&mut paths[i], &mut retry, &mut stall_since);
        }
        let active = paths.iter().filter(|p| !p.inflight.is_empty()).count();
        if active == 0 {
            let wait = match interval {
                Some(iv) => next_due.saturating_duration_since(Instant::now()).min(iv),
                None if !retry.is_empty() || stall_since.is_some() => Duration::from_millis(1),
                None => Duration::ZERO,
            };
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            continue;
        }
        // Completions: a busy-polling worker looks at each active queue without waiting; one
        // active queue is read with one blocking read (it returns as soon as bytes come); several,
        // or a fixed rate whose next command is due sooner, wait in poll(2) for whichever
        // is readable first. Nothing here sleeps past the arrival of a response.
        let busy = paths.iter().any(|p| p.queue.as_ref().is_some_and(Queue::is_busy_poll));
        let rate_due =
            interval.filter(|_| !stop_submitting && budget_left(wl.qd, paths)).map(|_| next_due.saturating_duration_since(Instant::now()));
        let single_blocking = !busy && active == 1 && rate_due.is_none();
        ready.clear();
        ready.resize(paths.len(), true);
        if !busy && !single_blocking {
            let idx: Vec<usize> = (0..paths.len()).filter(|&i| !paths[i].inflight.is_empty()).collect();
            let fds: Vec<_> = idx.iter().map(|&i| paths[i].queue.as_ref().expect("inflight implies a queue").fd()).collect();
            let mut got = vec![false; fds.len()];
            let limit = rate_due.unwrap_or(crate::READ_TICK).min(crate::READ_TICK);
            nvmetro_ffi::wait_readable(&fds, limit, &mut got)?;
            drop(fds);
            ready.fill(false);
            for (&i, g) in idx.iter().zip(got) {
                ready[i] = g;
            }
        }
        for (pi, p) in paths.iter_mut().enumerate() {
            if p.inflight.is_empty() || !ready[pi] {
                continue;
            }
            done.clear();
            let q = p.queue.as_mut().expect("inflight implies a queue");
            let r = if single_blocking { q.poll_wait(&mut done) } else { q.poll(&mut done) };
            if let Err(e) = r {
                eprintln!("nvmetro-perf: path {} lost: {e}", p.shared.name);
                lose_path(p, &mut retry, &mut stall_since);
                continue;
            }
            let now = Instant::now();
            for (cqe, data) in done.drain(..) {
                let Some(pending) = p.inflight.remove(&cqe.cid) else { continue };
                let op = pending.op;
                if cqe.status().is_path_error() {
                    // The path cannot serve now: avoid it until its ANA state changes, retry elsewhere.
                    p.avoid_until_ana_changes = Some((p.shared.ana.load(Ordering::Acquire), now + PATH_ERROR_BACKOFF));
                    stall_since.get_or_insert(now);
                    retry.push(op);
                    continue;
                }
                if cqe.status().is_success() {
                    if let Some(since) = stall_since.take() {
                        res.stalls.push(Stall { path: p.shared.name.clone(), duration: now.duration_since(since) });
                    }
                }
                busy_slots.remove(&op.slot);
                if let Some(c) = progress {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                let counted = complete(&mut res, wl, lba_size, generations, &op, &cqe, &data, now, counted_from);
                if counted {
                    let ns = now.duration_since(op.start).as_nanos() as u64;
                    let _ = p.result.latency_ns.record(ns.max(1));
                    if op.write {
                        p.result.writes += 1;
                    } else {
                        p.result.reads += 1;
                    }
                    p.result.bytes += wl.block_size as u64;
                }
            }
        }
    }
    res.elapsed = Instant::now().saturating_duration_since(counted_from).min(wl.duration.max(Duration::from_nanos(1)));
    if wl.max_ios.is_some() {
        res.elapsed = Instant::now().saturating_duration_since(counted_from);
    }
    for p in paths.iter_mut() {
        p.result.elapsed = res.elapsed;
    }
    Ok(res)
}

/// Generation recorded for an I/O unit whose content is not this tool's stamps of that unit (data
/// of another tool, another block size, or unreadable): reads of it are not checked until it is
/// written in this run.
pub const UNKNOWN_GENERATION: u64 = u64::MAX;

/// The last generation known for the unit at `lba` (0 for zeroes and unknown content).
fn known_generation(generations: &HashMap<u64, u64>, lba: u64) -> u64 {
    generations.get(&lba).copied().filter(|&g| g != UNKNOWN_GENERATION).unwrap_or(0)
}

/// What [`learn_stamps`] found in the region.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Learned {
    /// I/O units holding this tool's stamps of themselves (their generation is now known).
    pub stamped: u64,
    /// Units reading as zeroes.
    pub zero: u64,
    /// Units with other content: not checked until written.
    pub foreign: u64,
    /// Units whose read failed: not checked until written.
    pub unreadable: u64,
}

/// The generation of a unit read back whole: `Some(0)` for zeroes, `Some(g)` when every block is
/// this tool's stamp of itself with generation `g`, `None` for anything else.
fn unit_generation(data: &[u8], lba: u64, lba_size: u32) -> Option<u64> {
    let mut unit = None;
    for (i, b) in data.chunks(lba_size as usize).enumerate() {
        let g = match read_stamp(b) {
            Ok(None) => 0,
            Ok(Some((l, g))) if l == lba + i as u64 && g != UNKNOWN_GENERATION => g,
            _ => return None,
        };
        if *unit.get_or_insert(g) != g {
            return None;
        }
    }
    unit
}

/// Reads every I/O unit of `wl.region` once, before a verifying run on a namespace that may
/// already hold data (stamps of an earlier run, or anything else), and records in `generations`
/// what each holds, so the run checks its reads against what is really there instead of expecting
/// zeroes. Uses the best usable path; reads run at `wl.qd`, at least 32 deep.
pub fn learn_stamps(paths: &mut [PathIo], wl: &Workload, lba_size: u32, generations: &mut HashMap<u64, u64>) -> Result<Learned, HostError> {
    let blocks_per_io = (wl.block_size / lba_size as usize).max(1) as u64;
    let slots = (wl.region.1 / blocks_per_io).max(1);
    let mut learned = Learned::default();
    let best = paths.iter_mut().enumerate().filter_map(|(i, p)| p.usable_rank().map(|r| (r, i))).min().map(|(_, i)| i);
    let Some(pi) = best else {
        // No path to read through: nothing is known, so nothing old is checked.
        for slot in 0..slots {
            generations.insert(wl.region.0 + slot * blocks_per_io, UNKNOWN_GENERATION);
        }
        learned.unreadable = slots;
        return Ok(learned);
    };
    let q = paths[pi].queue.as_mut().expect("usable path has a queue");
    let depth = wl.qd.max(32);
    let (mut next, mut inflight, mut out) = (0u64, HashMap::new(), Vec::new());
    while next < slots || !inflight.is_empty() {
        while next < slots && inflight.len() < depth {
            let lba = wl.region.0 + next * blocks_per_io;
            let cid = q.submit(cmds::read(0, wl.nsid, lba, blocks_per_io as u32), Vec::new(), wl.block_size);
            inflight.insert(cid, lba);
            next += 1;
        }
        q.flush()?;
        out.clear();
        q.wait_any(&mut out)?;
        for (cqe, data) in out.drain(..) {
            let Some(lba) = inflight.remove(&cqe.cid) else { continue };
            let found = if cqe.status().is_success() { unit_generation(&data, lba, lba_size) } else { None };
            match found {
                Some(0) => {
                    learned.zero += 1;
                    generations.remove(&lba);
                }
                Some(g) => {
                    learned.stamped += 1;
                    generations.insert(lba, g);
                }
                None => {
                    if cqe.status().is_success() {
                        learned.foreign += 1;
                    } else {
                        learned.unreadable += 1;
                    }
                    generations.insert(lba, UNKNOWN_GENERATION);
                }
            }
        }
    }
    Ok(learned)
}

/// Whether the queue depth leaves room for another command.
fn budget_left(qd: usize, paths: &[PathIo]) -> bool {
    paths.iter().map(|p| p.inflight.len()).sum::<usize>() < qd
}

/// A path's connection failed: everything in flight on it goes to the retry list.
fn lose_path(p: &mut PathIo, retry: &mut Vec<Op>, stall_since: &mut Option<Instant>) {
    p.queue = None;
    stall_since.get_or_insert_with(Instant::now);
    retry.extend(p.inflight.drain().map(|(_, pending)| pending.op));
}

/// Records a finished command; returns whether it counted in the figures.
#[allow(clippy::too_many_arguments)]
fn complete(
    res: &mut JobResult,
    wl: &Workload,
    lba_size: u32,
    generations: &mut HashMap<u64, u64>,
    op: &Op,
    cqe: &Completion,
    data: &[u8],
    now: Instant,
    counted_from: Instant,
) -> bool {
    if !cqe.status().is_success() {
        res.errors += 1;
        if res.first_error.is_none() {
            res.first_error = Some(format!("LBA {}: {}", op.lba, cqe.status()));
        }
        return false;
    }
    if op.write {
        generations.insert(op.lba, op.generation);
    } else if wl.verify && generations.get(&op.lba) != Some(&UNKNOWN_GENERATION) {
        let expected = generations.get(&op.lba).copied().unwrap_or(0);
        for (i, b) in data.chunks(lba_size as usize).enumerate() {
            let lba = op.lba + i as u64;
            let found = match read_stamp(b) {
                Ok(None) if expected == 0 => continue,
                Ok(Some((l, g))) if l == lba && g == expected => continue,
                Ok(None) => "zeroes".to_string(),
                Ok(Some((l, g))) => format!("stamp of LBA {l} generation {g}"),
                Err(e) => e,
            };
            if res.mismatches.len() < 100 {
                res.mismatches.push(Mismatch { lba, expected_generation: expected, found });
            }
        }
    }
    if op.start < counted_from {
        return false;
    }
    let ns = now.duration_since(op.start).as_nanos() as u64;
    let _ = res.latency_ns.record(ns.max(1));
    res.bytes += wl.block_size as u64;
    if op.write {
        res.writes += 1;
    } else {
        res.reads += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip_and_detect_damage() {
        let mut b = vec![0u8; 512];
        assert_eq!(read_stamp(&b), Ok(None));
        stamp(&mut b, 77, 3);
        assert_eq!(read_stamp(&b), Ok(Some((77, 3))));
        b[100] ^= 1;
        assert!(read_stamp(&b).is_err());
    }
}
