//! The load engine: keeps `qd` commands in flight on one queue, records per-command latency in an
//! HdrHistogram (nanoseconds), optionally at a fixed rate, and with `verify` stamps every block it
//! writes (LBA, generation, CRC32C) and checks every block it reads against the last
//! acknowledged write.

use crate::{HostError, Queue};
use hdrhistogram::Histogram;
use nvmetro_proto::cmds;
use nvmetro_proto::nvme::Completion;
use std::collections::HashMap;
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

struct Pending {
    start: Instant,
    lba: u64,
    write: bool,
    generation: u64,
}

/// Runs `wl` on one queue. `generations` holds the last acknowledged generation of every block
/// of the region (shared across runs, so a later read-back can check earlier writes).
pub fn run(q: &mut Queue, wl: &Workload, lba_size: u32, generations: &mut HashMap<u64, u64>) -> Result<JobResult, HostError> {
    let blocks_per_io = (wl.block_size / lba_size as usize).max(1) as u64;
    let slots = (wl.region.1 / blocks_per_io).max(1);
    let mut rng = Rng(wl.seed | 1);
    let mut seq = 0u64;
    let mut res = JobResult::empty();
    let mut inflight: HashMap<u16, Pending> = HashMap::new();
    let mut busy_slots: HashMap<u64, ()> = HashMap::new();
    let start = Instant::now();
    let counted_from = start + wl.ramp;
    let end = counted_from + wl.duration;
    let interval = wl.rate.map(|r| Duration::from_nanos(1_000_000_000 / r.max(1)));
    let mut next_due = start;
    let mut done = Vec::new();
    let mut submitted_counted = 0u64;
    loop {
        let now = Instant::now();
        let stop_submitting = now >= end || wl.max_ios.is_some_and(|m| submitted_counted >= m);
        if stop_submitting && inflight.is_empty() {
            break;
        }
        while !stop_submitting && inflight.len() < wl.qd {
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
            let lba = wl.region.0 + slot * blocks_per_io;
            let write = (rng.next() % 100) as u32 >= wl.read_pct;
            let (cmd, data, read_len, generation) = if write {
                let generation = generations.get(&lba).copied().unwrap_or(0) + 1;
                let mut data = vec![0u8; wl.block_size];
                if wl.verify {
                    for (i, b) in data.chunks_mut(lba_size as usize).enumerate() {
                        stamp(b, lba + i as u64, generation);
                    }
                } else {
                    data[0..8].copy_from_slice(&lba.to_le_bytes());
                }
                (cmds::write(0, wl.nsid, lba, blocks_per_io as u32), data, 0, generation)
            } else {
                (cmds::read(0, wl.nsid, lba, blocks_per_io as u32), Vec::new(), wl.block_size, 0)
            };
            let t = Instant::now();
            if t >= counted_from {
                submitted_counted += 1;
            }
            let cid = q.submit(cmd, data, read_len);
            inflight.insert(cid, Pending { start: t, lba, write, generation });
            busy_slots.insert(slot, ());
        }
        q.flush()?;
        done.clear();
        if inflight.is_empty() {
            if let Some(iv) = interval {
                let wait = next_due.saturating_duration_since(Instant::now()).min(iv);
                std::thread::sleep(wait);
            }
            continue;
        }
        if interval.is_some() {
            q.poll(&mut done)?;
        } else {
            q.wait_any(&mut done)?;
        }
        let now = Instant::now();
        for (cqe, data) in done.drain(..) {
            let Some(p) = inflight.remove(&cqe.cid) else { continue };
            busy_slots.remove(&((p.lba - wl.region.0) / blocks_per_io));
            complete(&mut res, wl, lba_size, generations, &p, &cqe, &data, now, counted_from);
        }
    }
    res.elapsed = Instant::now().saturating_duration_since(counted_from).min(wl.duration.max(Duration::from_nanos(1)));
    if wl.max_ios.is_some() {
        res.elapsed = Instant::now().saturating_duration_since(counted_from);
    }
    Ok(res)
}

#[allow(clippy::too_many_arguments)]
fn complete(
    res: &mut JobResult,
    wl: &Workload,
    lba_size: u32,
    generations: &mut HashMap<u64, u64>,
    p: &Pending,
    cqe: &Completion,
    data: &[u8],
    now: Instant,
    counted_from: Instant,
) {
    if !cqe.status().is_success() {
        res.errors += 1;
        if res.first_error.is_none() {
            res.first_error = Some(format!("LBA {}: {}", p.lba, cqe.status()));
        }
        return;
    }
    if p.write {
        generations.insert(p.lba, p.generation);
    } else if wl.verify {
        let expected = generations.get(&p.lba).copied().unwrap_or(0);
        for (i, b) in data.chunks(lba_size as usize).enumerate() {
            let lba = p.lba + i as u64;
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
    if p.start >= counted_from {
        let ns = now.duration_since(p.start).as_nanos() as u64;
        let _ = res.latency_ns.record(ns.max(1));
        res.bytes += wl.block_size as u64;
        if p.write {
            res.writes += 1;
        } else {
            res.reads += 1;
        }
    }
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
