//! Debugging a history: `SIM_ONE=<seed in hex>` runs only that seed of the random tests
//! (`SIM_SKIP=<hex>,<hex>` skips seeds of the metro histories),
//! `SIM_DEBUG=1` prints each seed and its failure plan, `SIM_TRACE=1` both legs' state as it goes
//! (every 50 steps; every step with `SIM_TRACE_ALL=1`) and each crash, `SIM_WITNESS=1` every
//! request the witness answers, `SIM_FRAMES=1` every frame delivered (with `SIM_DEBUG`, which
//! frames each overtook). A failing metro history prints its `SIM_ONE`. (Histories are
//! not quite reproducible: the core iterates hash maps, so a rare one may need a few runs.)
//!
//! Two mirror legs driven against each other through a simulated link, with random operation
//! orders, random completion orders, and one random failure per run (link cut, or a crash of
//! either leg that tears its in-flight local writes). After healing, both copies must be
//! byte-identical and no acknowledged write may be lost. The link delivers resync data late:
//! frames sent after it may overtake it (the outbox's bulk queue yields to everything else);
//! over lanes, replicated writes and their acknowledgements also overtake each other.
//!
//! The metro variant adds a witness (which may be lost too) and elections: after any mix of a
//! link cut, a crash and a lost witness, at most one leg serves while they are apart.
//!
//! Faults beyond cuts and crashes: a leg whose device fails writes (ENOSPC) for a while, and a
//! paused leg (SIGSTOP, a VM stun): its clock and inputs stop while the other's go on; the other
//! detects the silence after a heartbeat and may take over; the paused leg, resumed, first gets
//! the reads that waited for it, then what sat in its socket, then the closed connection. Hosts
//! read at both legs throughout: no read may return data older than an acknowledged write.

use nvmetro_bdev::mirror::core::{Access, Input, LinkState, Metro, MirrorCore, Output, Role};
use nvmetro_bdev::mirror::frame::Frame;
use nvmetro_bdev::mirror::lanes::Class;
use nvmetro_bdev::mirror::meta::Meta;
use nvmetro_bdev::mirror::witness::WitnessState;
use nvmetro_bdev::mirror::DiskState;
use nvmetro_bdev::{BdevError, BdevOp, BdevOutput};
use std::collections::{HashMap, VecDeque};

const BLOCK: usize = 512;
const BLOCKS: usize = 64;
const SIZE: u64 = (BLOCK * BLOCKS) as u64;
const REGION_SHIFT: u32 = 12; // 8 blocks per region

mod common;
use common::Rng;

struct Leg {
    role: Role,
    core: Option<MirrorCore>,
    /// What reads see: the device's volatile cache over its media.
    disk: Vec<u8>,
    /// What survives a power loss: FUA writes and everything completed before a Flush.
    media: Vec<u8>,
    durable: Meta,
    local: Vec<(u64, BdevOp)>,
    /// The device fails writes (ENOSPC) to blocks below this.
    failing_below: usize,
    /// Paused since this step: no input, no clock.
    paused: Option<u64>,
    /// The peer closed the connection while this leg was paused: it sees that when it resumes.
    closed_while_paused: bool,
}

#[derive(Debug, Clone)]
struct WriteRec {
    id: u64,
    blocks: std::ops::Range<usize>,
    issued: u64,
    acked: Option<u64>,
    /// Acknowledged FUA, or a host Flush issued after its acknowledgement completed: it must
    /// survive even a power loss.
    durable: bool,
    fua: bool,
    /// Not durable when a device lost its cache: a later Flush cannot bring it back.
    maybe_lost: bool,
}

thread_local! {
    /// Frames delivered ahead of an earlier replicated write or acknowledgement, and ahead of
    /// earlier resync data only, on this thread (a test checks that its histories reordered).
    static OVERTAKEN: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// Steps of silence after which a leg's driver drops the link (the heartbeat timeout).
const HEARTBEAT: u64 = 120;

struct Sim {
    legs: [Leg; 2],
    link: bool,
    wire: [VecDeque<Frame>; 2],
    rng: Rng,
    step: u64,
    writes: Vec<WriteRec>,
    tags: HashMap<u64, usize>,
    next_write: u64,
    /// Metro mode: the witness's state, and whether it is reachable.
    witness: Option<WitnessState>,
    witness_up: bool,
    /// Requests on their way to the witness (answered when delivered: late, reordered).
    witness_wire: Vec<(usize, nvmetro_bdev::mirror::witness::Request)>,
    /// A half-dead link: connected, but nothing gets through.
    mute: bool,
    /// The link has several lanes (connections): replicated writes and their acknowledgements
    /// may overtake each other, never a control frame nor a frame sent before one.
    lanes: bool,
    /// When each leg last received a frame (for the heartbeat).
    last_rx: [u64; 2],
    reads: u64,
    /// Host flushes in flight: tag -> step issued.
    flushes: HashMap<u64, u64>,
    /// Reads a leg serves through its peer, in flight: tag -> (block, step sent).
    remote_reads: HashMap<u64, (usize, u64)>,
    /// A crash lost writes from a device's volatile cache: from then on only durable writes must
    /// survive (NVMe's volatile write cache semantics).
    cache_lost: bool,
    /// Host writes answered with an error (hosts would retry them elsewhere).
    failed_writes: usize,
    /// Host writes not answered yet: tag -> the leg they were sent to (a crash of that leg
    /// drops them; every other one must be answered once the legs have settled).
    open_writes: HashMap<u64, usize>,
}

/// Sim timers: leases of 60 steps (both modes), Failed legs retry every 150; regions resync in
/// four chunks each (so chunks of one region arrive, fail and get lost separately).
fn configure(core: &mut MirrorCore, metro_mode: bool, seq_base: u64) {
    core.set_lease_ms(60);
    core.set_resync_chunk((1 << REGION_SHIFT) / 4);
    // Sweeps clear dirty bits within a history.
    core.set_activity_idle_ms(40);
    core.set_retry_ms(150);
    if metro_mode {
        core.set_metro(metro(), seq_base);
    }
}

fn metro() -> Metro {
    Metro { resource: "m".into(), manual_failback: false, fence_ms: 60, settle_ms: 100, startup_grace_ms: 150, transition_ms: 5_000 }
}

fn exec(disk: &mut [u8], op: &BdevOp) -> Result<BdevOutput, BdevError> {
    Ok(match op {
        BdevOp::Write { offset, data, .. } => {
            disk[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
            BdevOutput::Done
        }
        BdevOp::Read { offset, len } => BdevOutput::Data(disk[*offset as usize..*offset as usize + len].to_vec()),
        BdevOp::WriteZeroes { offset, len } | BdevOp::Deallocate { offset, len } => {
            disk[*offset as usize..(*offset + *len) as usize].fill(0);
            BdevOutput::Done
        }
        BdevOp::CompareAndWrite { offset, expected, data } => {
            let at = *offset as usize..*offset as usize + data.len();
            if disk[at.clone()] != expected[..] {
                BdevOutput::Miscompare
            } else {
                disk[at].copy_from_slice(data);
                BdevOutput::Done
            }
        }
        BdevOp::Compare { .. } | BdevOp::Flush => BdevOutput::Done,
    })
}

impl Sim {
    fn new_metro(seed: u64) -> Sim {
        let mut sim = Sim::build(seed, true);
        sim.connect();
        sim
    }

    fn new(seed: u64) -> Sim {
        let mut sim = Sim::build(seed, false);
        sim.connect();
        sim
    }

    fn build(seed: u64, metro_mode: bool) -> Sim {
        let mut legs = [Role::Preferred, Role::Secondary].map(|role| Leg {
            role,
            core: None,
            disk: vec![0; BLOCKS * BLOCK],
            media: vec![0; BLOCKS * BLOCK],
            durable: Meta::new(SIZE, REGION_SHIFT),
            local: Vec::new(),
            failing_below: 0,
            paused: None,
            closed_while_paused: false,
        });
        let mut sim_outputs = Vec::new();
        for (i, leg) in legs.iter_mut().enumerate() {
            let (mut core, out) = MirrorCore::new(leg.role, i as u8 + 1, SIZE, leg.durable.clone(), seed + i as u64);
            configure(&mut core, metro_mode, 0);
            leg.core = Some(core);
            sim_outputs.push((i, out));
        }
        let mut sim = Sim {
            legs,
            link: false,
            wire: [VecDeque::new(), VecDeque::new()],
            rng: Rng(seed | 1),
            step: 0,
            writes: Vec::new(),
            tags: HashMap::new(),
            next_write: 1,
            witness: metro_mode.then(WitnessState::default),
            witness_up: true,
            witness_wire: Vec::new(),
            mute: false,
            lanes: false,
            last_rx: [0; 2],
            reads: 0,
            flushes: HashMap::new(),
            remote_reads: HashMap::new(),
            cache_lost: false,
            failed_writes: 0,
            open_writes: HashMap::new(),
        };
        for (i, out) in sim_outputs {
            sim.run_outputs(i, out);
        }
        sim
    }

    fn feed(&mut self, leg: usize, input: Input) {
        if self.legs[leg].paused.is_some() {
            return;
        }
        let Some(core) = self.legs[leg].core.as_mut() else { return };
        // The driver gives the core the clock before every input.
        core.observe_clock(self.step);
        let mut out = Vec::new();
        core.handle(input, &mut out);
        self.run_outputs(leg, out);
    }

    /// The operator forces `leg` to serve alone (`nvmetro promote --force`).
    fn force(&mut self, leg: usize) -> Result<String, String> {
        if self.legs[leg].paused.is_some() {
            return Err("paused".into());
        }
        let Some(core) = self.legs[leg].core.as_mut() else { return Err("down".into()) };
        core.observe_clock(self.step);
        let mut out = Vec::new();
        let r = core.force_promote(&mut out);
        self.run_outputs(leg, out);
        r
    }

    /// The operator runs `nvmetro switchover` at `leg` (the outcome comes over the link).
    fn switchover(&mut self, leg: usize) -> Result<(), String> {
        if self.legs[leg].paused.is_some() {
            return Err("paused".into());
        }
        let Some(core) = self.legs[leg].core.as_mut() else { return Err("down".into()) };
        core.observe_clock(self.step);
        let mut out = Vec::new();
        let r = core.switchover(&mut out);
        self.run_outputs(leg, out);
        r
    }

    /// A clean stop of `leg` begins (the driver's departure): it fences, then tells its peer.
    /// Returns whether it departs that way.
    fn depart(&mut self, leg: usize) -> bool {
        if self.legs[leg].paused.is_some() {
            return false;
        }
        let Some(core) = self.legs[leg].core.as_mut() else { return false };
        core.observe_clock(self.step);
        if !core.leave() {
            return false;
        }
        let mut out = Vec::new();
        core.send_leave(&mut out);
        self.run_outputs(leg, out);
        true
    }

    fn run_outputs(&mut self, leg: usize, out: Vec<Output>) {
        for o in out {
            match o {
                Output::Local { id, op } => self.legs[leg].local.push((id, op)),
                Output::Send(f) => {
                    if self.link && !self.mute && !self.legs[leg].closed_while_paused {
                        self.wire[leg].push_back(f);
                    }
                }
                Output::Complete { tag, result } => {
                    if let Some((block, sent)) = self.remote_reads.remove(&tag) {
                        if let Ok(BdevOutput::Data(d)) = result {
                            let found = u64::from_le_bytes(d[..8].try_into().unwrap());
                            assert!(
                                self.fresh_at(block, found, sent),
                                "stale read through the peer at leg {leg} (sent at step {sent}): block {block} holds {found}"
                            );
                            self.reads += 1;
                        }
                        continue;
                    }
                    if let Some(issued) = self.flushes.remove(&tag) {
                        if result.is_ok() {
                            for w in self.writes.iter_mut().filter(|w| w.acked.is_some_and(|a| a < issued) && !w.maybe_lost) {
                                w.durable = true;
                            }
                        }
                        continue;
                    }
                    let w = self.tags.remove(&tag).expect("completion for a known write");
                    self.open_writes.remove(&tag);
                    if result.is_err() {
                        self.failed_writes += 1;
                    }
                    if result == Ok(BdevOutput::Done) {
                        self.writes[w].acked = Some(self.step);
                        self.writes[w].durable |= self.writes[w].fua;
                    }
                }
                Output::Persist => {
                    self.legs[leg].durable = self.legs[leg].core.as_ref().expect("core").meta().clone();
                }
                Output::Witness(req) => {
                    if self.witness_up {
                        self.witness_wire.push((leg, req));
                    }
                }
            }
        }
    }

    fn connect(&mut self) {
        if self.legs.iter().all(|l| l.core.is_some()) && (!self.link || self.mute) {
            if self.mute {
                self.cut();
            }
            self.mute = false;
            self.link = true;
            self.feed(0, Input::LinkUp);
            self.feed(1, Input::LinkUp);
        }
    }

    /// The link connects but passes nothing (a half-dead path), until the next cut.
    fn flap(&mut self) {
        if self.legs.iter().all(|l| l.core.is_some()) && !self.link {
            self.mute = true;
            self.link = true;
            self.feed(0, Input::LinkUp);
            self.feed(1, Input::LinkUp);
        }
    }

    fn cut(&mut self) {
        for leg in 0..2 {
            self.resume(leg);
        }
        if self.link {
            self.link = false;
            self.mute = false;
            self.wire = [VecDeque::new(), VecDeque::new()];
            self.feed(0, Input::LinkDown);
            self.feed(1, Input::LinkDown);
        }
    }

    /// The leg stops: no inputs, no clock, until [`Sim::resume`].
    fn pause(&mut self, leg: usize) {
        if self.legs[leg].core.is_some() && self.legs[leg].paused.is_none() {
            self.legs[leg].paused = Some(self.step);
        }
    }

    /// The other leg's driver hears nothing for a heartbeat: it closes the connection. The paused
    /// leg keeps what already sat in its socket and sees the close when it resumes.
    fn heartbeat(&mut self) {
        if !self.link || self.mute {
            return;
        }
        for leg in 0..2 {
            let other = 1 - leg;
            if self.legs[leg].paused.is_some()
                && self.legs[other].paused.is_none()
                && self.step.saturating_sub(self.last_rx[other]) > HEARTBEAT
            {
                self.link = false;
                self.wire[leg].clear();
                self.legs[leg].closed_while_paused = true;
                self.feed(other, Input::LinkDown);
            }
        }
    }

    /// The paused leg runs again, on a clock that jumped: reads that waited for it come first,
    /// then the frames in its socket, then (if the peer closed it) the end of the connection.
    fn resume(&mut self, leg: usize) {
        if self.legs[leg].paused.take().is_none() {
            return;
        }
        for _ in 0..3 {
            self.host_read(leg);
        }
        while self.deliver(1 - leg) {}
        self.host_read(leg);
        if std::mem::take(&mut self.legs[leg].closed_while_paused) {
            self.wire[leg].clear();
            self.feed(leg, Input::LinkDown);
        }
    }

    /// A host flushes at `leg`: once it completes, every write acknowledged before is durable.
    fn host_flush(&mut self, leg: usize) {
        if self.legs[leg].core.is_none() || self.legs[leg].paused.is_some() {
            return;
        }
        let tag = 1 << 40 | self.next_write;
        self.next_write += 1;
        self.flushes.insert(tag, self.step);
        self.feed(leg, Input::Host { tag, op: BdevOp::Flush });
    }

    /// A host reads a random block at `leg`: served only while the leg may serve at this instant
    /// (what the reactor checks); the data must not be older than any acknowledged write.
    fn host_read(&mut self, leg: usize) {
        if self.legs[leg].paused.is_some() {
            return;
        }
        let Some(core) = self.legs[leg].core.as_mut() else { return };
        core.observe_clock(self.step);
        if !(core.serving() && self.step < core.lease_deadline_ms()) {
            return;
        }
        let block = self.rng.below(16) as usize;
        if core.access() == Access::Remote {
            // Its device failed: the read goes to the peer.
            let tag = 2 << 40 | self.next_write;
            self.next_write += 1;
            self.remote_reads.insert(tag, (block, self.step));
            let op = BdevOp::Read { offset: (block * BLOCK) as u64, len: BLOCK };
            return self.feed(leg, Input::Host { tag, op });
        }
        self.reads += 1;
        let found = u64::from_le_bytes(self.legs[leg].disk[block * BLOCK..block * BLOCK + 8].try_into().unwrap());
        if !self.fresh(block, found) {
            panic!(
                "stale read at leg {leg} step {}: block {block} holds {found}, writes {:?}; {:?}",
                self.step,
                self.writes.iter().filter(|w| w.blocks.contains(&block)).collect::<Vec<_>>(),
                self.legs[leg].core.as_ref().map(|c| c.status())
            );
        }
    }

    /// Whether write `found` (0: none) may be what `block` holds: it is the last acknowledged
    /// write, or one not yet acknowledged when that one was issued, or a later one.
    fn fresh(&self, block: usize, found: u64) -> bool {
        self.fresh_at(block, found, u64::MAX)
    }

    /// As [`Sim::fresh`] for a read sent at step `sent`: writes acknowledged later may be missing.
    fn fresh_at(&self, block: usize, found: u64, sent: u64) -> bool {
        let hist: Vec<&WriteRec> = self.writes.iter().filter(|w| w.blocks.contains(&block)).collect();
        let must = |w: &&&WriteRec| w.acked.is_some_and(|a| a < sent) && (w.durable || !self.cache_lost);
        let Some(last) = hist.iter().filter(must).max_by_key(|w| w.acked) else { return true };
        let Some(f) = hist.iter().find(|w| w.id == found) else { return false };
        f.id == last.id || f.issued > last.issued || f.acked.is_none_or(|a| a > last.issued)
    }

    fn crash(&mut self, leg: usize) {
        // Half the crashes are power losses: each block the volatile cache had not written back
        // may be lost (the media's older content comes back).
        let loss = if self.rng.below(2) == 0 { 50 } else { 0 };
        self.crash_losing(leg, loss);
    }

    /// A crash in which each block not yet on the media is lost with `loss_percent` chance.
    fn crash_losing(&mut self, leg: usize, loss_percent: u64) {
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!("{}: crash of leg {leg}: {:?}", self.step, self.legs[leg].core.as_ref().map(|c| (c.status(), c.meta().deferred)));
        }
        self.cut();
        if std::env::var("SIM_TRACE").is_ok() {
            eprintln!("{}: crash of leg {leg}: durable {:?}", self.step, self.legs[leg].durable.generations);
        }
        self.legs[leg].failing_below = 0;
        self.open_writes.retain(|_, l| *l != leg);
        let l = &mut self.legs[leg];
        l.core = None;
        // In-flight local operations either reached the disk whole or not at all.
        let local = std::mem::take(&mut l.local);
        for (_, op) in local {
            if self.rng.below(2) == 0 {
                let _ = exec(&mut l.disk, &op);
                let _ = exec(&mut l.media, &op);
            }
        }
        if loss_percent > 0 {
            for b in 0..BLOCKS {
                let r = b * BLOCK..(b + 1) * BLOCK;
                if l.disk[r.clone()] != l.media[r.clone()] && self.rng.below(100) < loss_percent {
                    l.disk[r.clone()].copy_from_slice(&l.media[r]);
                    self.cache_lost = true;
                }
            }
            for w in self.writes.iter_mut().filter(|w| !w.durable) {
                w.maybe_lost = true;
            }
        }
        l.media.clone_from(&l.disk);
        // Host writes in flight at the crashed leg stay unacknowledged (their tags never complete).
    }

    fn restart(&mut self, leg: usize, seed: u64) {
        if self.legs[leg].core.is_none() {
            let l = &self.legs[leg];
            let (mut core, out) = MirrorCore::new(l.role, leg as u8 + 1, SIZE, l.durable.clone(), seed);
            configure(&mut core, self.witness.is_some(), self.step * 1000);
            core.observe_clock(self.step);
            self.legs[leg].core = Some(core);
            self.run_outputs(leg, out);
        }
    }

    /// Failure `kind`: 0 cuts the link, 1 crashes leg 0, 2 crashes leg 1, 3 and 4 make leg 0 or
    /// leg 1's device fail writes (to some blocks), 5 and 6 pause leg 0 or leg 1.
    fn fail(&mut self, kind: u64) {
        match kind {
            0 => self.cut(),
            1 => self.crash(0),
            2 => self.crash(1),
            3 | 4 => self.legs[kind as usize - 3].failing_below = 1 + self.rng.below(16) as usize,
            _ => self.pause(kind as usize - 5),
        }
    }

    /// Restarts what crashed, resumes what was paused, clears device faults and reconnects.
    fn heal(&mut self, seed: u64) {
        self.resume(0);
        self.resume(1);
        self.legs[0].failing_below = 0;
        self.legs[1].failing_below = 0;
        self.restart(0, seed ^ 0xaaaa);
        self.restart(1, seed ^ 0x5555);
        self.connect();
    }

    /// Heals everything, lets the legs settle, checks the copies; returns (issued, acknowledged,
    /// reads checked).
    fn finish(mut self, seed: u64) -> (usize, usize, u64) {
        self.witness_up = true;
        self.resume(0);
        self.resume(1);
        self.legs[0].failing_below = 0;
        self.legs[1].failing_below = 0;
        self.restart(0, seed ^ 0xbbbb);
        self.restart(1, seed ^ 0xcccc);
        self.connect();
        self.quiesce();
        self.check(seed);
        assert!(self.open_writes.is_empty(), "seed {seed}: host writes never answered: {:?}", self.open_writes);
        (self.writes.len(), self.writes.iter().filter(|w| w.acked.is_some()).count(), self.reads)
    }

    fn host_write(&mut self, leg: usize) {
        if self.legs[leg].core.is_none() {
            return;
        }
        if self.legs[leg].core.is_none() || self.legs[leg].paused.is_some() {
            return;
        }
        let block = self.rng.below(16) as usize; // few blocks: many conflicts
                                                 // Some writes span blocks (and regions), some are FUA.
        let n = if self.rng.below(4) == 0 { 1 + self.rng.below(3) as usize } else { 1 }.min(16 - block);
        let id = self.next_write;
        self.next_write += 1;
        let mut data = vec![0u8; BLOCK * n];
        for b in 0..n {
            data[b * BLOCK..b * BLOCK + 8].copy_from_slice(&id.to_le_bytes());
            data[b * BLOCK + 8] = leg as u8;
        }
        let w = self.writes.len();
        let fua = self.rng.below(4) == 0;
        self.writes.push(WriteRec { id, blocks: block..block + n, issued: self.step, acked: None, durable: false, fua, maybe_lost: false });
        let tag = id;
        self.tags.insert(tag, w);
        self.open_writes.insert(tag, leg);
        self.feed(leg, Input::Host { tag, op: BdevOp::Write { offset: (block * BLOCK) as u64, data: data.into(), fua } });
    }

    fn complete_local(&mut self, leg: usize) -> bool {
        if self.legs[leg].local.is_empty() || self.legs[leg].core.is_none() || self.legs[leg].paused.is_some() {
            return false;
        }
        let i = self.rng.below(self.legs[leg].local.len() as u64) as usize;
        let (id, op) = self.legs[leg].local.swap_remove(i);
        let failing = self.legs[leg].failing_below;
        let hits = |offset: u64| (offset as usize) < failing * BLOCK;
        let result = match &op {
            BdevOp::Write { offset, .. } | BdevOp::CompareAndWrite { offset, .. } if hits(*offset) => Err(BdevError::NoSpace),
            BdevOp::WriteZeroes { offset, .. } | BdevOp::Deallocate { offset, .. } if hits(*offset) => Err(BdevError::NoSpace),
            _ => exec(&mut self.legs[leg].disk, &op),
        };
        let l = &mut self.legs[leg];
        match &op {
            // Completed FUA writes are on the media; a completed Flush put everything there.
            BdevOp::Write { fua: true, .. } if result.is_ok() => {
                let _ = exec(&mut l.media, &op);
            }
            BdevOp::Flush if result.is_ok() => l.media.clone_from(&l.disk),
            // Now and then the cache writes a block back on its own.
            _ if self.rng.below(8) == 0 => {
                let b = self.rng.below(BLOCKS as u64) as usize * BLOCK;
                let (disk, media) = (&l.disk, &mut l.media);
                media[b..b + BLOCK].copy_from_slice(&disk[b..b + BLOCK]);
            }
            _ => {}
        }
        self.feed(leg, Input::LocalDone { id, result });
        true
    }

    fn deliver(&mut self, from: usize) -> bool {
        if self.legs[1 - from].paused.is_some() {
            return false;
        }
        // Frames that may arrive before the front one: resync data yields to everything sent
        // after it (the outbox's bulk queue), and over lanes replicated writes and their
        // acknowledgements overtake each other (what the barrier counts of `mirror::lanes`
        // allow).
        let wire = &self.wire[from];
        let may_pass = |earlier: &Frame, later: &Frame| match (Class::of(earlier), Class::of(later)) {
            (Class::Bulk, Class::Bulk) => false,
            (Class::Bulk, _) => true,
            (Class::Data, Class::Data | Class::Bulk) => self.lanes,
            _ => false,
        };
        let candidates: Vec<usize> = (0..wire.len().min(16)).filter(|&j| (0..j).all(|i| may_pass(&wire[i], &wire[j]))).collect();
        let pick =
            if candidates.len() > 1 && self.rng.below(2) == 0 { candidates[self.rng.below(candidates.len() as u64) as usize] } else { 0 };
        if pick > 0 {
            if std::env::var("SIM_DEBUG").is_ok() {
                eprintln!(
                    "{}: {} -> {}: {:?} overtakes {:?}",
                    self.step,
                    from,
                    1 - from,
                    wire[pick],
                    wire.iter().take(pick).collect::<Vec<_>>()
                );
            }
            let passed_data = (0..pick).any(|i| Class::of(&wire[i]) == Class::Data);
            OVERTAKEN.with(|n| {
                let (data, bulk) = n.get();
                n.set(if passed_data { (data + 1, bulk) } else { (data, bulk + 1) });
            });
        }
        let Some(f) = self.wire[from].remove(pick) else { return false };
        if std::env::var("SIM_FRAMES").is_ok() {
            eprintln!("{}: deliver {} -> {}: {:?}", self.step, from, 1 - from, f);
        }
        self.last_rx[1 - from] = self.step;
        self.feed(1 - from, Input::Frame(f));
        true
    }

    /// The witness answers one request picked at random (requests arrive late, out of order,
    /// sometimes twice; some are lost with the witness).
    fn deliver_witness(&mut self) -> bool {
        if self.witness_wire.is_empty() {
            return false;
        }
        let i = self.rng.below(self.witness_wire.len() as u64) as usize;
        // Now and then the network delivers a datagram twice.
        let (leg, req) = if self.rng.below(8) == 0 { self.witness_wire[i].clone() } else { self.witness_wire.swap_remove(i) };
        let now = self.step;
        if let (Some(w), true) = (self.witness.as_mut(), self.witness_up) {
            let reply = w.handle(&req, now);
            if std::env::var("SIM_WITNESS").is_ok() {
                eprintln!("{now}: witness {req:?} -> {reply:?}");
            }
            self.feed(leg, Input::Witness(reply));
        }
        true
    }

    /// `steps` quiet steps: ticks, and the witness answers everything asked.
    fn advance(&mut self, steps: u64) {
        for _ in 0..steps {
            self.step += 1;
            self.tick();
            while self.deliver_witness() {}
        }
    }

    fn tick(&mut self) {
        let now = self.step;
        self.feed(0, Input::Tick { now_ms: now });
        self.feed(1, Input::Tick { now_ms: now });
    }

    fn random_step(&mut self, writes: bool) {
        self.step += 1;
        self.heartbeat();
        if !self.link || self.mute {
            // Serving means: would serve a command arriving now (a paused leg's clock is real
            // time too, it just has not run).
            let step = self.step;
            let mut serving = 0;
            for l in self.legs.iter_mut() {
                if let Some(c) = l.core.as_mut() {
                    c.observe_clock(step);
                    serving += usize::from(c.serving() && step < c.lease_deadline_ms());
                }
            }
            assert!(
                serving <= 1,
                "two legs serve while apart at step {}: {:?} / {:?}",
                self.step,
                self.legs[0].core.as_ref().map(|c| c.status()),
                self.legs[1].core.as_ref().map(|c| c.status())
            );
        }
        match self.rng.below(100) {
            0..=19 if writes => {
                let leg = self.rng.below(2) as usize;
                self.host_write(leg);
            }
            20..=27 => {
                let leg = self.rng.below(2) as usize;
                self.host_read(leg);
            }
            28..=29 if writes => {
                let leg = self.rng.below(2) as usize;
                self.host_flush(leg);
            }
            0..=59 => {
                let leg = self.rng.below(2) as usize;
                self.complete_local(leg);
            }
            60..=89 => {
                // The link carries more than the hosts send (a saturated link is another test):
                // up to two frames each way, the first direction chosen at random.
                let from = self.rng.below(2) as usize;
                for _ in 0..2 {
                    self.deliver(from);
                    self.deliver(1 - from);
                }
            }
            90..=94 => {
                self.deliver_witness();
            }
            _ => self.tick(),
        }
    }

    fn quiesce(&mut self) {
        for _ in 0..200_000 {
            self.step += 1;
            self.heartbeat();
            let mut busy = self.complete_local(0) | self.complete_local(1);
            busy |= self.deliver(0) | self.deliver(1) | self.deliver_witness();
            if !busy {
                self.tick();
                let synced = self.legs.iter().all(|l| {
                    let c = l.core.as_ref().expect("core");
                    c.status().link == LinkState::Connected && c.status().disk == DiskState::UpToDate
                });
                if synced && self.wire.iter().all(VecDeque::is_empty) && self.legs.iter().all(|l| l.local.is_empty()) {
                    return;
                }
            }
        }
        panic!(
            "did not settle: {:?} {:?} / {:?} {:?}",
            self.legs[0].core,
            self.legs[0].core.as_ref().map(|c| c.meta().generations),
            self.legs[1].core,
            self.legs[1].core.as_ref().map(|c| c.meta().generations)
        );
    }

    fn check(&self, seed: u64) {
        if std::env::var("SIM_DEBUG").is_ok() {
            for block in 0..BLOCKS {
                let r = block * BLOCK..(block + 1) * BLOCK;
                if self.legs[0].disk[r.clone()] != self.legs[1].disk[r.clone()] {
                    let id = |l: usize| u64::from_le_bytes(self.legs[l].disk[r.start..r.start + 8].try_into().unwrap());
                    let w = |id: u64| self.writes.iter().find(|w| w.id == id).cloned();
                    let leg = |l: usize| self.legs[l].disk[r.start + 8];
                    eprintln!(
                        "block {block}: {} (from leg {}) {:?} vs {} (from leg {}) {:?}",
                        id(0),
                        leg(0),
                        w(id(0)),
                        id(1),
                        leg(1),
                        w(id(1))
                    );
                }
            }
        }
        assert!(self.legs[0].disk == self.legs[1].disk, "seed {seed}: the copies differ after resync");
        for block in 0..16 {
            let content = &self.legs[0].disk[block * BLOCK..(block + 1) * BLOCK];
            let found = u64::from_le_bytes(content[..8].try_into().unwrap());
            // Never something an acknowledgement replaced.
            assert!(
                self.fresh(block, found),
                "seed {seed}: block {block} lost an acknowledged write (holds {found}): {:?}",
                self.writes.iter().filter(|w| w.blocks.contains(&block)).collect::<Vec<_>>()
            );
        }
    }
}

fn run(seed: u64, lanes: bool) -> (usize, usize, u64) {
    let mut sim = Sim::new(seed);
    sim.lanes = lanes;
    sim.quiesce();
    let steps = 400 + sim.rng.below(800);
    let fail_at = sim.rng.below(steps);
    let heal_at = fail_at + 50 + sim.rng.below(300);
    let failure = sim.rng.below(7);
    if std::env::var("SIM_DEBUG").is_ok() {
        eprintln!("failure {failure} at {fail_at}, heal at {heal_at}");
    }
    for s in 0..steps + 400 {
        if std::env::var("SIM_TRACE").is_ok() && s % 10 == 0 {
            let st = |l: usize| {
                sim.legs[l]
                    .core
                    .as_ref()
                    .map(|c| (c.status().link, c.status().disk, c.serving(), c.status().out_of_sync_bytes, sim.legs[l].paused.is_some()))
            };
            eprintln!("{s}: A {:?} | B {:?} link {}", st(0), st(1), sim.link);
        }
        if s == fail_at {
            sim.fail(failure);
        }
        if s == heal_at {
            sim.heal(seed);
        }
        sim.random_step(s < steps);
    }
    sim.finish(seed)
}

/// Metro: a failure (cut, crash of either leg), possibly with the witness lost before or after
/// it, healed later; elections decide who serves meanwhile. When a leg crashed while the witness
/// is lost, the operator may force the survivor to serve (the case `promote --force` is for,
/// with the lost site kept away until the witness has recorded the survivor's new generation):
/// still never two writers, and the crashed leg is resynced from the survivor when it returns.
/// The operator may also switch over (before, during or after the failure) and then stop the
/// site that no longer orders (a planned departure).
/// Returns (issued, acknowledged, reads checked, forced promotions, switchovers, departures,
/// failures met by a pre-elected survivor that is the configured secondary, clean stops of the
/// ordering site that switched over and departed).
fn run_metro(seed: u64, lanes: bool) -> (usize, usize, u64, usize, usize, usize, usize, usize) {
    if std::env::var("SIM_DEBUG").is_ok() {
        eprintln!("metro seed {seed:x}");
    }
    let mut sim = Sim::new_metro(seed);
    sim.lanes = lanes;
    sim.quiesce();
    // A quarter of the histories lose the witness long enough before the failure for the legs
    // to pre-elect a survivor (at least 1200 steps: its answers count for 1000).
    let lost_long = sim.rng.below(4) == 0;
    let lead = if lost_long { 2000 } else { 0 };
    let steps = 600 + sim.rng.below(900) + lead;
    let fail_at = lead + sim.rng.below(steps - lead);
    let mut heal_at = fail_at + 50 + sim.rng.below(500);
    let failure = sim.rng.below(7);
    // The witness goes away (before, after or not at all) and comes back.
    let witness_down = match sim.rng.below(3) {
        _ if lost_long => Some(fail_at - 1200 - sim.rng.below(400)),
        0 => Some(fail_at.saturating_sub(300 + sim.rng.below(100))),
        1 => Some(fail_at + sim.rng.below(200)),
        _ => None,
    };
    let witness_back = witness_down.map(|d| d + 100 + sim.rng.below(900) + if lost_long { 1100 + sim.rng.below(600) } else { 0 });
    let crashed = match failure {
        1 => Some(0),
        2 => Some(1),
        _ => None,
    };
    let force_at = (fail_at + 20 + sim.rng.below(200)).min(heal_at.saturating_sub(1));
    // As the operator is told: force only while peer and witness are lost, and let the lost site
    // return only once the witness is back and has heard from the forced site (it records the
    // new generation at the survivor's next confirmation).
    // (Not after a pre-election: the crashed leg may be its survivor and have started a new
    // generation as the link went, the documented risk of forcing.)
    let forcing = crashed.is_some()
        && !lost_long
        && witness_down.is_some_and(|d| d <= force_at)
        && witness_back.is_some_and(|b| b > force_at && b + 1300 < steps + 600)
        && sim.rng.below(2) == 0
        && std::env::var("SIM_NO_FORCE").is_err();
    if forcing {
        heal_at = heal_at.max(witness_back.expect("back") + 1000 + sim.rng.below(300));
    }
    let mut forced = 0;
    // The operator switches over (at either site; refused unless it orders and is in sync),
    // now and then just before the failure (so it fails halfway), and may then stop the site
    // that no longer orders (a planned departure, ended by a stop of the site).
    let switch_at = match sim.rng.below(5) {
        0 => None,
        1 => Some(fail_at.saturating_sub(sim.rng.below(30))),
        // Just before both sites lose the witness: the pre-election follows the move (or
        // meets it halfway).
        2 if lost_long => witness_down.map(|d| d - sim.rng.below(120)),
        _ => Some(sim.rng.below(steps)),
    };
    // Mostly where it is meant to run (the leg that orders writes), sometimes at the other.
    let switch_at_orderer = sim.rng.below(4) != 0;
    let depart_at = switch_at.filter(|_| sim.rng.below(2) == 0).map(|s| s + 20 + sim.rng.below(200));
    let mut departing: Option<(usize, u64)> = None;
    // A clean stop of the site that orders writes: the driver switches over first, then departs
    // (or, refused or broken, just stops).
    let stop_orderer_at = (sim.rng.below(4) == 0).then(|| sim.rng.below(steps));
    let mut stopping: Option<(usize, u64)> = None;
    let (mut switched, mut departed) = (0, 0);
    let mut pre_elected_secondary = 0;
    let mut orderer_stops = 0;
    // Half the cuts come with a half-dead link that connects and passes nothing, again and again.
    let flaps = failure == 0 && sim.rng.below(2) == 0;
    for s in 0..steps + 600 {
        if flaps && s > fail_at && s < heal_at {
            match (s - fail_at) % 40 {
                10 => sim.flap(),
                30 => sim.cut(),
                _ => {}
            }
        }
        if Some(s) == witness_down {
            sim.witness_up = false;
        }
        if Some(s) == witness_back {
            sim.witness_up = true;
        }
        if s == fail_at {
            // Whom the pre-election made the survivor (it must be the leg that orders writes).
            for l in sim.legs.iter().filter_map(|l| l.core.as_ref()) {
                let st = l.status();
                if st.metro.is_some_and(|m| m.pre_elected.contains("this site survives")) {
                    assert_eq!(st.role, Role::Preferred, "seed {seed:x}: a pre-elected survivor that does not order writes");
                    pre_elected_secondary += usize::from(st.configured_role == Role::Secondary);
                }
            }
            sim.fail(failure);
        }
        if s == heal_at {
            sim.heal(seed);
        }
        if std::env::var("SIM_TRACE").is_ok() && (s % 50 == 0 || std::env::var("SIM_TRACE_ALL").is_ok()) {
            let st = |l: usize| {
                sim.legs[l].core.as_ref().map(|c| {
                    (
                        c.status().link,
                        c.status().access,
                        c.meta().generations.current % 1000,
                        c.meta().generations.bitmap % 1000,
                        c.status().metro.map(|m| m.why),
                        c.status().role,
                        c.meta().ordering,
                    )
                })
            };
            eprintln!("{s}: A {:?} | B {:?} witness_up {}", st(0), st(1), sim.witness_up);
        }
        if Some(s) == switch_at {
            let orderer = (0..2).find(|l| sim.legs[*l].core.as_ref().is_some_and(|c| c.status().role == Role::Preferred));
            let switch_leg = if switch_at_orderer { orderer.unwrap_or(0) } else { 1 - orderer.unwrap_or(0) };
            let r = sim.switchover(switch_leg);
            if std::env::var("SIM_DEBUG").is_ok() {
                eprintln!("seed {seed:x}: switchover at leg {switch_leg} at {s}: {r:?}");
            }
        }
        if Some(s) == depart_at {
            // The site that does not order writes (if they are together) stops cleanly.
            let leg = (0..2).find(|l| sim.legs[*l].core.as_ref().is_some_and(|c| c.status().role == Role::Secondary));
            if let Some(leg) = leg.filter(|l| sim.depart(*l)) {
                departing = Some((leg, s));
            }
        }
        if Some(s) == stop_orderer_at && departing.is_none() {
            let orderer = (0..2).find(|l| sim.legs[*l].core.as_ref().is_some_and(|c| c.status().role == Role::Preferred));
            if let Some(leg) = orderer {
                match sim.switchover(leg) {
                    Ok(()) => stopping = Some((leg, s)),
                    Err(_) => sim.crash(leg),
                }
            }
        }
        if let Some((leg, since)) = stopping {
            // (The driver's bound on the switchover, in sim steps.)
            if sim.legs[leg].core.is_none() || s > since + 600 {
                sim.crash(leg);
                stopping = None;
            }
        }
        if let Some((leg, since)) = departing {
            // The driver closes once the peer took over, or gives up waiting.
            if sim.legs[leg].core.as_ref().is_none_or(|c| c.left()) || s > since + 300 {
                departed += usize::from(sim.legs[leg].core.as_ref().is_some_and(|c| c.left()));
                sim.crash(leg);
                departing = None;
            }
        }
        if forcing && s == force_at {
            let survivor = 1 - crashed.expect("a crash");
            let r = sim.force(survivor);
            if std::env::var("SIM_DEBUG").is_ok() {
                eprintln!("seed {seed:x}: failure {failure} at {fail_at}, witness down {witness_down:?} back {witness_back:?}, heal {heal_at}, force {survivor} at {force_at}: {r:?}");
            }
            forced += usize::from(r.is_ok());
        }
        sim.random_step(s < steps);
        for leg in 0..2 {
            let Some(outcome) = sim.legs[leg].core.as_mut().and_then(|c| c.take_switchover_outcome()) else { continue };
            if std::env::var("SIM_DEBUG").is_ok() {
                eprintln!("seed {seed:x}: switchover outcome at leg {leg} at {s}: {outcome:?}");
            }
            switched += usize::from(outcome.is_ok());
            if stopping.is_some_and(|(l, _)| l == leg) {
                stopping = None;
                if departing.is_none() && sim.depart(leg) {
                    orderer_stops += 1;
                    departing = Some((leg, s));
                } else {
                    sim.crash(leg);
                }
            }
        }
    }
    let (issued, acked, reads) = sim.finish(seed);
    (issued, acked, reads, forced, switched, departed, pre_elected_secondary, orderer_stops)
}

#[test]
fn metro_histories_never_have_two_writers_nor_lose_acknowledged_writes() {
    metro_histories(false);
}

/// The same histories over a link of several lanes: replicated writes and their
/// acknowledgements overtake each other (the core needs no FIFO among them).
#[test]
fn metro_histories_over_lanes_never_have_two_writers_nor_lose_acknowledged_writes() {
    metro_histories(true);
}

fn metro_histories(lanes: bool) {
    let (mut issued, mut acked) = (0, 0);
    // SIM_SEEDS=N soaks longer.
    let seeds = std::env::var("SIM_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(500u64);
    let mut reads = 0;
    let mut forced = 0;
    let (mut switched, mut departed) = (0, 0);
    let mut pre_elected = 0;
    let mut orderer_stops = 0;
    for seed in 1..=seeds {
        if std::env::var("SIM_ONE").is_ok_and(|one| u64::from_str_radix(&one, 16) != Ok(seed.wrapping_mul(0x2545_f491_4f6c_dd1d))) {
            continue;
        }
        let hex = format!("{:x}", seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
        if std::env::var("SIM_SKIP").is_ok_and(|skip| skip.split(',').any(|s| s == hex)) {
            continue;
        }
        let (i, a, r, f, sw, d, p, o) = std::panic::catch_unwind(|| run_metro(seed.wrapping_mul(0x2545_f491_4f6c_dd1d), lanes))
            .unwrap_or_else(|e| {
                eprintln!("failing history: SIM_ONE={hex} (among SIM_SEEDS={seeds}, lanes: {lanes})");
                std::panic::resume_unwind(e)
            });
        pre_elected += p;
        orderer_stops += o;
        forced += f;
        switched += sw;
        departed += d;
        issued += i;
        acked += a;
        reads += r;
    }
    println!(
        "metro{}: {seeds} histories, {issued} writes issued, {acked} acknowledged, {reads} reads checked, 0 stale, 0 lost, {forced} forced promotions, {switched} switchovers, {departed} planned departures, {pre_elected} failures met by a pre-elected survivor that switched over to order writes, {orderer_stops} clean stops of the ordering site by a switchover and a departure",
        if lanes { " over lanes" } else { "" }
    );
    assert!(
        orderer_stops > 0 || seeds < 100 || std::env::var("SIM_ONE").is_ok(),
        "some clean stops of the ordering site switched over first"
    );
    assert!(
        pre_elected > 0 || seeds < 100 || std::env::var("SIM_ONE").is_ok(),
        "some histories pre-elected the site a switchover made the orderer"
    );
    assert!(switched > 0 && departed > 0 || seeds < 100 || std::env::var("SIM_ONE").is_ok(), "some histories switched over and departed");
    assert!(acked > issued / 5, "the runs did real work: {acked} of {issued} writes acknowledged");
    assert!(forced > 0 || seeds < 100 || std::env::var("SIM_ONE").is_ok(), "some histories forced a survivor to serve");
    check_overtaking(lanes, seeds);
}

/// Frames overtook resync data, and over lanes, replicated writes and acknowledgements (and
/// never otherwise).
fn check_overtaking(lanes: bool, seeds: u64) {
    let (data, bulk) = OVERTAKEN.with(|n| n.get());
    println!("{data} frames overtook an earlier replicated write or acknowledgement, {bulk} only earlier resync data");
    let one = std::env::var("SIM_ONE").is_ok();
    assert!(bulk > 0 || one || seeds < 100, "frames overtook resync data");
    if lanes {
        assert!(data > seeds || one, "the lanes reordered frames: {data}");
    } else {
        assert_eq!(data, 0);
    }
}

#[test]
fn metro_after_a_switchover_the_ordering_site_survives_the_witness_then_the_link() {
    let mut sim = Sim::new_metro(33);
    // Until the witness has answered both.
    for _ in 0..400 {
        sim.random_step(false);
    }
    sim.quiesce();
    sim.switchover(0).unwrap();
    sim.quiesce();
    assert_eq!(sim.legs[1].core.as_ref().unwrap().status().role, Role::Preferred, "B orders writes");
    sim.witness_up = false;
    for _ in 0..3000 {
        sim.random_step(true);
    }
    let pre = |sim: &Sim, l: usize| sim.legs[l].core.as_ref().unwrap().status().metro.unwrap().pre_elected;
    assert!(pre(&sim, 1).contains("this site survives"), "B: {}", pre(&sim, 1));
    assert!(pre(&sim, 0).contains("the peer survives"), "A: {}", pre(&sim, 0));
    let acked = |sim: &Sim| sim.writes.iter().filter(|w| w.acked.is_some()).count();
    sim.cut();
    let before = acked(&sim);
    for _ in 0..1000 {
        sim.random_step(true);
    }
    let (a, b) = (sim.legs[0].core.as_ref().unwrap(), sim.legs[1].core.as_ref().unwrap());
    assert_eq!(b.status().access, Access::Sole, "B serves alone: {:?}", b.status());
    assert_eq!(a.status().access, Access::Fenced, "A fences: {:?}", a.status());
    assert!(acked(&sim) > before, "B acknowledged writes alone");
    // The witness and the link return: A is resynced from B, nothing acknowledged is lost.
    sim.witness_up = true;
    sim.connect();
    sim.quiesce();
    sim.check(33);
}

#[test]
fn metro_secondary_takes_over_when_the_preferred_dies() {
    let mut sim = Sim::new_metro(5);
    sim.quiesce();
    sim.crash(0);
    for _ in 0..400 {
        sim.step += 1;
        sim.tick();
        while sim.deliver_witness() {}
        while sim.complete_local(1) {}
    }
    let b = sim.legs[1].core.as_ref().unwrap();
    assert!(b.serving(), "the secondary won the witness: {:?}", b.status());
    assert_eq!(b.status().role, Role::Preferred, "and orders writes now");
    sim.host_write(1);
    while sim.complete_local(1) {}
    assert!(sim.writes[0].acked.is_some());
    // The old preferred returns: the witness keeps it out until it is resynced.
    sim.restart(0, 99);
    sim.advance(400);
    assert!(!sim.legs[0].core.as_ref().unwrap().serving(), "the stale leg must not serve");
    sim.connect();
    sim.quiesce();
    sim.check(5);
    assert!(sim.legs[0].core.as_ref().unwrap().serving(), "automatic failback after the resync");
}

#[test]
fn metro_manual_failback_waits_for_the_operator() {
    let mut sim = Sim::new_metro(21);
    sim.quiesce();
    sim.crash(0);
    sim.advance(400);
    assert!(sim.legs[1].core.as_ref().unwrap().serving(), "B took over");
    // A returns with manual failback configured: resynced, but held until the operator says.
    sim.restart(0, 7);
    let mut manual = metro();
    manual.manual_failback = true;
    let fresh = MirrorCore::new(Role::Preferred, 1, SIZE, sim.legs[0].durable.clone(), 8);
    let (mut core, _) = fresh;
    core.set_metro(manual, sim.step * 1000);
    sim.legs[0].core = Some(core);
    sim.connect();
    sim.quiesce();
    sim.check(21);
    let a = sim.legs[0].core.as_ref().unwrap();
    assert!(!a.serving(), "held for the operator");
    assert!(a.status().metro.unwrap().failback_pending);
    sim.feed(0, Input::Failback);
    // (The driver's pings keep a connected leg's peer lease fresh; here one frame does.)
    sim.feed(0, Input::Frame(Frame::new(nvmetro_bdev::mirror::frame::Kind::Ping, 0)));
    assert!(sim.legs[0].core.as_ref().unwrap().serving(), "serves after the failback");
}

#[test]
fn metro_pre_election_decides_a_link_loss_after_the_witness_was_lost() {
    let mut sim = Sim::new_metro(11);
    sim.quiesce();
    sim.witness_up = false;
    for _ in 0..3000 {
        sim.step += 1;
        sim.tick();
        while sim.deliver_witness() {}
        while sim.deliver(0) | sim.deliver(1) {}
    }
    assert!(sim.legs[1].durable.deferred, "the non-survivor deferred, durably");
    sim.cut();
    sim.advance(200);
    assert!(sim.legs[0].core.as_ref().unwrap().serving(), "the pre-elected survivor serves");
    assert!(!sim.legs[1].core.as_ref().unwrap().serving());
    // The witness returns; the survivor records its lineage there; the other is still out.
    sim.witness_up = true;
    sim.restart(1, 3);
    sim.advance(1000);
    assert!(!sim.legs[1].core.as_ref().unwrap().serving(), "a restarted non-survivor stays out");
    sim.connect();
    sim.quiesce();
    sim.check(11);
}

#[test]
fn random_histories_with_one_failure_converge_without_losing_acknowledged_writes() {
    random_histories(false);
}

/// The same histories over a link of several lanes.
#[test]
fn random_histories_over_lanes_converge_without_losing_acknowledged_writes() {
    random_histories(true);
}

fn random_histories(lanes: bool) {
    let (mut issued, mut acked) = (0, 0);
    let seeds = std::env::var("SIM_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(600u64);
    let mut reads = 0;
    for seed in 1..=seeds {
        if std::env::var("SIM_ONE").is_ok_and(|one| u64::from_str_radix(&one, 16) != Ok(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15))) {
            continue;
        }
        if std::env::var("SIM_DEBUG").is_ok() {
            eprintln!("seed {:x}", seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
        let (i, a, r) = run(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), lanes);
        issued += i;
        acked += a;
        reads += r;
    }
    println!(
        "two legs{}: {seeds} histories, {issued} writes issued, {acked} acknowledged, {reads} reads checked, 0 stale, 0 lost",
        if lanes { " over lanes" } else { "" }
    );
    assert!(acked > issued / 4, "the runs did real work: {acked} of {issued} writes acknowledged");
    check_overtaking(lanes, seeds);
}

/// A history found at 20,000 seeds: the preferred leg, paused, lost its link; resumed, it set the
/// timer to complete the writes it held once the peer's lease ran out, and reconnected before it
/// fired. A write replicated on the new connection during the resync was completed by that
/// timer without the peer's answer; the peer, declared UpToDate, then served a read without it.
#[test]
fn a_write_sent_on_a_new_connection_waits_for_its_answer_when_the_old_connections_timer_fires() {
    run(0x2cfa_cc7c_b728_477f, false);
}

/// Found at 20,000 metro histories (present before this release): the secondary forwarded a
/// write that waited at the preferred for the range of a write held while the peer was lost; the
/// secondary crashed, came back, and its resync passed the region while the old forwarded write
/// still waited. Run once the held write completed, it put on the preferred a write the secondary
/// never got: the copies differed. A forward from an earlier connection no longer runs.
/// A history found over lanes at 3,000 seeds: during a planned departure of the ordering site
/// B, site A (fenced, waiting to be resynced) replicated host writes to B, and B crashed before
/// it answered them. A held the writes for good (a fenced leg did nothing with them when the
/// link went down), so the resync after B returned waited behind their range locks forever.
#[test]
fn a_fenced_leg_fails_the_writes_it_replicated_when_the_link_is_lost() {
    run_metro(0xa6d3_75da_bffd_64c3, true);
}

#[test]
fn a_write_forwarded_on_an_earlier_connection_never_runs_after_the_peer_returned() {
    run_metro(0xaf69_4787_e945_2439, false);
}

#[test]
fn preferred_serves_alone_and_secondary_fences() {
    let mut sim = Sim::new(77);
    sim.quiesce();
    sim.cut();
    assert!(sim.legs[0].core.as_ref().unwrap().serving());
    assert!(!sim.legs[1].core.as_ref().unwrap().serving());
    // A write at the secondary is refused; at the preferred it is written and dirties its region,
    // but completes only once the lease its peer may still hold has run out.
    sim.host_write(1);
    assert_eq!(sim.writes[0].acked, None);
    sim.host_write(0);
    while sim.complete_local(0) {}
    assert!(sim.writes[1].acked.is_none(), "held while the peer's lease may hold");
    sim.advance(100);
    assert!(sim.writes[1].acked.is_some());
    assert!(sim.legs[0].durable.dirty_count() > 0, "the dirty bit is durable");
    assert_ne!(sim.legs[0].durable.generations.bitmap, 0, "the preferred leg started a new generation");
    sim.connect();
    sim.quiesce();
    sim.check(77);
    assert_eq!(sim.legs[0].durable.dirty_count(), 0, "resync cleared the bitmap");
}

impl Sim {
    /// `steps` steps in which every frame is delivered, every local operation completes and
    /// every leg ticks (paused legs excepted).
    fn run_quiet(&mut self, steps: u64) {
        for _ in 0..steps {
            self.step += 1;
            self.heartbeat();
            while self.complete_local(0) | self.complete_local(1) | self.deliver(0) | self.deliver(1) | self.deliver_witness() {}
            self.tick();
        }
    }

    fn core(&self, leg: usize) -> &MirrorCore {
        self.legs[leg].core.as_ref().expect("leg runs")
    }

    /// Whether a command arriving at `leg` now would be served (what its reactor checks).
    fn serves_now(&mut self, leg: usize) -> bool {
        let step = self.step;
        let c = self.legs[leg].core.as_mut().expect("leg runs");
        c.observe_clock(step);
        c.serving() && step < c.lease_deadline_ms()
    }
}

#[test]
fn a_secondary_leg_that_fails_writes_is_fenced_recorded_and_resynced_once_space_returns() {
    for metro_mode in [false, true] {
        let mut sim = if metro_mode { Sim::new_metro(31) } else { Sim::new(31) };
        sim.quiesce();
        let generation = sim.legs[0].durable.generations.current;
        sim.legs[1].failing_below = 16; // ENOSPC on every block the writes touch
        sim.host_write(0);
        sim.run_quiet(5);
        assert!(sim.writes[0].acked.is_some(), "the preferred serves on");
        // The preferred recorded durably, before that acknowledgement, that the peer lacks data.
        let g = sim.legs[0].durable.generations;
        assert_eq!(g.bitmap, generation, "a new generation descends from the one both had");
        assert!(sim.legs[0].durable.dirty_count() > 0);
        let a = sim.core(0).status();
        assert_eq!(a.peer_disk, Some(DiskState::Failed));
        assert!(a.peer_failure.as_ref().is_some_and(|f| f.error.contains("no space")), "{a:?}");
        let b = sim.core(1).status();
        assert_eq!(b.disk, DiskState::Failed);
        assert!(sim.legs[1].durable.failed, "Failed is durable on the failing leg");
        // The failed leg serves through its peer (ANA Non-Optimized): nothing from its own device.
        assert_eq!(sim.core(1).access(), Access::Remote);
        assert!(sim.serves_now(1));
        sim.host_write(1);
        sim.host_write(0);
        let reads = sim.reads;
        for _ in 0..20 {
            sim.host_read(1); // checked for staleness when the peer answers
        }
        sim.run_quiet(5);
        assert!(sim.writes[1].acked.is_some() && sim.writes[2].acked.is_some(), "writes at both sites");
        assert_eq!(sim.reads, reads + 20, "reads at the failed site were answered by the peer");
        sim.run_quiet(300);
        assert_eq!(sim.core(1).status().disk, DiskState::Failed, "retries fail while the device is full");
        // Space returns: the next retry resyncs the dirty regions.
        sim.legs[1].failing_below = 0;
        sim.run_quiet(400);
        assert_eq!(sim.core(1).status().disk, DiskState::UpToDate, "metro {metro_mode}");
        assert!(sim.core(1).status().failure.is_none() && sim.core(0).status().peer_failure.is_none());
        assert!(!sim.legs[1].durable.failed);
        sim.quiesce();
        sim.check(31);
    }
}

#[test]
fn a_preferred_leg_that_fails_hands_ordering_to_its_peer() {
    let mut sim = Sim::new_metro(41);
    sim.quiesce();
    sim.legs[0].failing_below = 16;
    sim.host_write(0);
    sim.run_quiet(5);
    assert!(sim.writes[0].acked.is_none(), "the failed write is not acknowledged");
    assert_eq!(sim.core(0).status().disk, DiskState::Failed);
    assert_eq!(sim.core(0).access(), Access::Remote, "the failed site serves through its peer");
    let b = sim.core(1).status();
    assert_eq!(b.role, Role::Preferred, "the peer orders writes now: {b:?}");
    assert!(sim.serves_now(1));
    sim.host_write(1);
    sim.run_quiet(5);
    assert!(sim.writes[1].acked.is_some(), "and serves them alone");
    sim.legs[0].failing_below = 0;
    sim.feed(0, Input::Resync);
    sim.run_quiet(400);
    assert_eq!(sim.core(0).status().disk, DiskState::UpToDate);
    sim.quiesce();
    sim.check(41);
}

#[test]
fn a_paused_leg_serves_nothing_after_its_lease_and_the_other_takes_over_only_after_it() {
    for (metro_mode, paused) in [(true, 0), (true, 1), (false, 1)] {
        let mut sim = if metro_mode { Sim::new_metro(51) } else { Sim::new(51) };
        sim.quiesce();
        sim.run_quiet(100);
        assert!(sim.serves_now(0) && sim.serves_now(1));
        // Paused right after an I/O (mid-burst).
        sim.host_write(paused);
        sim.pause(paused);
        let other = 1 - paused;
        for _ in 0..600 {
            sim.run_quiet(1);
            // Never both while the other has lost the paused leg.
            assert!(sim.link || !(sim.serves_now(paused) && sim.serves_now(other)), "two legs serve at step {}", sim.step);
        }
        assert!(!sim.link, "the heartbeat dropped the paused leg");
        assert!(sim.serves_now(other), "metro {metro_mode}: the other leg serves alone");
        // A write acknowledged by the survivor; then the paused leg runs again: the reads that
        // waited for it are refused (resume() reads first and panics on a stale answer).
        sim.host_write(other);
        sim.run_quiet(5);
        let n = sim.writes.len() - 1;
        assert!(sim.writes[n].acked.is_some());
        assert!(!sim.serves_now(paused), "the resumed leg's lease lapsed during the pause");
        sim.resume(paused);
        assert!(!sim.serves_now(paused));
        sim.connect();
        sim.quiesce();
        sim.check(51);
    }
}

#[test]
fn a_dirty_bit_is_cleared_only_once_both_legs_flushed_its_writes() {
    for (seed, lost) in [(61u64, 1usize), (62, 0)] {
        let mut sim = Sim::new(seed);
        sim.quiesce();
        for i in 0..6 {
            sim.host_write(i % 2);
        }
        // Long enough for the once-a-second sweep after the activity window.
        sim.run_quiet(2500);
        assert_eq!(sim.legs[0].durable.dirty_count(), 0, "the sweep cleared the bits");
        // A leg loses power: whatever its cache held that no flush covered is gone. Had the
        // sweep cleared the bits before both legs flushed, the resync would miss those blocks.
        sim.crash_losing(lost, 100);
        sim.heal(seed);
        sim.quiesce();
        sim.check(seed);
    }
}

#[test]
fn a_preferred_that_handed_ordering_away_does_not_come_back_ordering_after_a_restart() {
    // Without a witness: A (configured preferred) fails, B orders; A is resynced; then A
    // restarts while the link is down. Only B may serve: A must not come back as the preferred.
    let mut sim = Sim::new(71);
    sim.quiesce();
    sim.legs[0].failing_below = 16;
    sim.host_write(0);
    sim.run_quiet(5);
    assert_eq!(sim.core(1).status().role, Role::Preferred, "B orders writes");
    sim.legs[0].failing_below = 0;
    sim.feed(0, Input::Resync);
    sim.run_quiet(400);
    assert_eq!(sim.core(0).status().disk, DiskState::UpToDate, "A resynced");
    assert_eq!(sim.legs[0].durable.ordering, Some(false), "A's metadata says the peer orders");
    sim.crash(0);
    sim.restart(0, 5);
    sim.run_quiet(200);
    assert_eq!(sim.core(0).status().role, Role::Secondary);
    assert!(!sim.serves_now(0), "the restarted A does not serve alone");
    assert!(sim.serves_now(1), "B serves alone");
    sim.host_write(1);
    sim.run_quiet(200);
    sim.connect();
    sim.quiesce();
    sim.check(71);
}

#[test]
fn the_taking_over_leg_waits_out_the_peers_lease_even_when_their_timers_differ() {
    // Leg 1 runs with a longer lease (its site's heartbeat was reloaded to a larger value).
    let mut sim = Sim::new_metro(81);
    let long = Metro { fence_ms: 200, settle_ms: 300, ..metro() };
    sim.legs[1].core.as_mut().unwrap().set_metro_timers(long);
    sim.quiesce();
    sim.run_quiet(100);
    assert!(sim.serves_now(0) && sim.serves_now(1));
    sim.pause(1);
    for _ in 0..600 {
        sim.run_quiet(1);
        // Whenever leg 0 serves without the link, the paused leg's lease has run out.
        assert!(sim.link || !(sim.serves_now(0) && sim.serves_now(1)), "both serve at step {}", sim.step);
    }
    assert!(sim.serves_now(0), "leg 0 took over");
    sim.resume(1);
    sim.connect();
    sim.quiesce();
    sim.check(81);
}

#[test]
fn answers_owed_to_an_earlier_connection_are_never_sent_on_a_later_one() {
    // B applies a write A replicated; the connection drops and a new one comes up (A may have
    // restarted and numbers its operations from 1 again) before B's device completes it: B's
    // acknowledgement must not go out on the new connection, where it would name another write.
    let mut sim = Sim::new(91);
    sim.quiesce();
    sim.host_write(0);
    while sim.deliver(0) {}
    let (id, _) = *sim.legs[1].local.first().expect("B applies the replicated write");
    sim.cut();
    sim.connect();
    sim.wire[1].clear();
    let b = sim.legs[1].core.as_mut().unwrap();
    let mut out = Vec::new();
    b.handle(Input::LocalDone { id, result: Ok(BdevOutput::Done) }, &mut out);
    let acks: Vec<&Frame> = out
        .iter()
        .filter_map(|o| if let Output::Send(f) = o { Some(f) } else { None })
        .filter(|f| f.kind == nvmetro_bdev::mirror::frame::Kind::ReplicateAck)
        .collect();
    assert!(acks.is_empty(), "an answer owed to the old connection went out on the new one: {acks:?}");
}

#[test]
fn a_link_lost_during_a_resync_frees_the_regions_in_flight() {
    let mut sim = Sim::new(101);
    sim.quiesce();
    sim.cut();
    for _ in 0..12 {
        sim.host_write(0);
    }
    sim.run_quiet(100);
    sim.connect();
    // A sends resync regions; none reaches B before the link goes.
    let resync = |sim: &Sim| sim.wire[0].iter().any(|f| f.kind == nvmetro_bdev::mirror::frame::Kind::Resync);
    for _ in 0..40 {
        loop {
            let next_is_resync = sim.wire[0].front().is_some_and(|f| f.kind == nvmetro_bdev::mirror::frame::Kind::Resync);
            if !((!next_is_resync && sim.deliver(0)) | sim.deliver(1) | sim.complete_local(0) | sim.complete_local(1)) {
                break;
            }
        }
        sim.step += 1;
        sim.tick();
    }
    assert!(resync(&sim), "resync frames on their way");
    sim.cut();
    // Writes to those regions complete, and the next resync ends.
    let before = sim.writes.len();
    for _ in 0..8 {
        sim.host_write(0);
    }
    sim.run_quiet(200);
    assert!(sim.writes[before..].iter().all(|w| w.acked.is_some()), "no write waits for a range held by a lost resync");
    sim.connect();
    sim.quiesce();
    sim.check(101);
}

/// A planned switchover under load at both sites (frames and completions in random orders), then
/// a planned departure of the old site under load: no write fails, every one is acknowledged,
/// the new site orders and holds the witness's authority, and writes during the departure wait
/// for no settling (the sim's settle time is 100 steps).
#[test]
fn a_switchover_and_a_planned_departure_under_load_fail_no_write() {
    for seed in 0..40u64 {
        let mut sim = Sim::new_metro(1000 + seed);
        sim.quiesce();
        // Until the witness has answered a report.
        sim.run_quiet(300);
        let switch_at = sim.rng.below(100);
        let mut done = None;
        for s in 0..300 {
            if s == switch_at {
                sim.switchover(0).expect("in sync: the switchover starts");
            }
            if sim.rng.below(2) == 0 {
                let leg = sim.rng.below(2) as usize;
                sim.host_write(leg);
            }
            for _ in 0..sim.rng.below(3) {
                let leg = sim.rng.below(2) as usize;
                sim.complete_local(leg);
            }
            let from = sim.rng.below(2) as usize;
            sim.deliver(from);
            // Every frame gets through within a few steps: the leases hold.
            if s % 4 == 0 {
                sim.run_quiet(1);
            } else {
                sim.step += 1;
                sim.tick();
                while sim.deliver_witness() {}
            }
            if let Some(r) = sim.legs[0].core.as_mut().unwrap().take_switchover_outcome() {
                done = Some(r.expect("the switchover completes"));
            }
        }
        sim.run_quiet(5);
        assert!(done.as_ref().is_some_and(|d| d.contains("site 2 orders writes")), "seed {seed}: {done:?}");
        assert_eq!((sim.core(0).status().role, sim.core(1).status().role), (Role::Secondary, Role::Preferred));
        assert_eq!((sim.core(0).access(), sim.core(1).access()), (Access::Standby, Access::Leading));
        assert_eq!(sim.failed_writes, 0, "seed {seed}: no write failed during the switchover");

        // The old site stops cleanly while hosts write at the new one.
        assert!(sim.depart(0), "the site that no longer orders departs");
        assert!(!sim.serves_now(0));
        let first = sim.writes.len();
        let mut steps = 0;
        while !sim.core(0).left() {
            sim.host_write(1);
            sim.run_quiet(1);
            steps += 1;
            assert!(steps < 50, "seed {seed}: the peer took over: {:?}", sim.core(1).status());
        }
        sim.crash_losing(0, 0);
        for _ in 0..20 {
            sim.host_write(1);
            sim.run_quiet(1);
        }
        for w in &sim.writes[first..] {
            let waited = w.acked.map(|a| a - w.issued);
            assert!(waited.is_some_and(|t| t < 20), "seed {seed}: write {} waited {waited:?} steps", w.id);
        }
        assert_eq!(sim.failed_writes, 0, "seed {seed}: no write failed during the departure");
        assert!(sim.writes.iter().all(|w| w.acked.is_some()), "seed {seed}: every write acknowledged");
        let w = sim.witness.as_ref().unwrap();
        assert_eq!(w.resources["m"].authority, sim.core(1).meta().generations.current, "the authority is site 2's");
        // The old site returns: resynced from the new one, which keeps ordering.
        sim.restart(0, 77);
        sim.connect();
        sim.quiesce();
        sim.check(seed);
        assert_eq!(sim.core(1).status().role, Role::Preferred);
    }
}
