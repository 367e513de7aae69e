//! A consistency group's DR stream, simulated: the production site's [`Sequencer`] and the DR
//! site's [`Applier`] joined by a link that is cut and restored, with DR disks that complete
//! writes in any order, keep completed writes volatile until a flush, and crash keeping any
//! subset of what was not flushed. The workload is dependent pairs on two members: a stream
//! writes its data block on member 0 and, once that completed to it, a commit record naming the
//! data's version on member 1. Checked on every step, on a random possible crash image, and on
//! every actual crash: no commit is ever visible without its data. In sync mode a write's
//! release finds it durable at the DR site. After the run the DR image equals the production's.

use nvmetro_bdev::dr::applier::{Applier, ApplyOutput};
use nvmetro_bdev::dr::frame::DrFrame;
use nvmetro_bdev::dr::sequencer::{SeqOutput, Sequencer};
use nvmetro_bdev::dr::DrMode;
use std::collections::{HashMap, VecDeque};

const STREAMS: usize = 4;
const BLOCK: u64 = 512;

mod common;
use common::Rng;

/// Versions per (member, block): what a disk image holds.
type Image = [[u64; STREAMS]; 2];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stream {
    /// Will write its data (next version) or its commit.
    Ready { commit: bool },
    /// Its write is with the sequencer.
    Held { tag: u64 },
    /// Released: completes to the host when the simulation says so.
    Released { tag: u64 },
}

struct World {
    rng: Rng,
    mode: DrMode,
    seq: Sequencer,
    app: Applier,
    streams: [Stream; STREAMS],
    version: [u64; STREAMS],
    /// tag -> (member, block, version)
    writes: HashMap<u64, (usize, usize, u64)>,
    next_tag: u64,
    production: Image,
    connected: bool,
    to_dr: VecDeque<DrFrame>,
    to_production: VecDeque<DrFrame>,
    /// The DR disks: durable media, completed writes not flushed, writes in flight.
    durable: Image,
    volatile: Vec<(usize, usize, u64)>,
    in_flight: Vec<(u64, usize, usize, u64)>,
    flush: bool,
    persist: Option<u64>,
    persisted: u64,
    buffer_limit: u64,
    /// Long-throw: what the sequencer spilled, by journal position.
    journal: HashMap<u64, Vec<u8>>,
    crashes: u64,
}

fn decode(data: &[u8]) -> u64 {
    u64::from_le_bytes(data[..8].try_into().unwrap())
}

impl World {
    fn new(seed: u64) -> World {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let mode = if rng.below(2) == 0 { DrMode::Sync } else { DrMode::Async };
        let buffer_limit = BLOCK * (1 + rng.below(6));
        let mut seq = Sequencer::new(mode, buffer_limit, 0);
        // A third of the async worlds are long-throw, with a journal larger than a run writes:
        // writes spill to it, are sent from it in order, and none overflows.
        let long_throw = mode == DrMode::Async && rng.below(3) == 0;
        if long_throw {
            seq.set_journal(Some(BLOCK * 10_000), &mut Vec::new());
        }
        World {
            rng,
            mode,
            seq,
            journal: HashMap::new(),
            app: Applier::new(0),
            streams: [Stream::Ready { commit: false }; STREAMS],
            version: [0; STREAMS],
            writes: HashMap::new(),
            next_tag: 1,
            production: [[0; STREAMS]; 2],
            connected: false,
            to_dr: VecDeque::new(),
            to_production: VecDeque::new(),
            durable: [[0; STREAMS]; 2],
            volatile: Vec::new(),
            in_flight: Vec::new(),
            flush: false,
            persist: None,
            persisted: 0,
            buffer_limit,
            crashes: 0,
        }
    }

    fn run_seq(&mut self, out: Vec<SeqOutput>) {
        for o in out {
            match o {
                SeqOutput::Send(f) => {
                    if self.connected {
                        self.to_dr.push_back(f);
                    }
                }
                SeqOutput::Spill { at, data, .. } => {
                    self.journal.insert(at, data);
                }
                SeqOutput::SendSpilled { seq, epoch, member, offset, at, len } => {
                    let data = self.journal[&at].clone();
                    assert_eq!(data.len() as u64, len, "write {seq} spilled with another length");
                    if self.connected {
                        self.to_dr.push_back(DrFrame::Write { seq, epoch, member, offset, data });
                    }
                }
                SeqOutput::Overflow { tag, .. } => panic!("write {tag} overflowed a journal sized never to fill"),
                SeqOutput::Release(tag) => {
                    let (m, b, v) = self.writes[&tag];
                    if self.mode == DrMode::Sync {
                        assert!(self.durable[m][b] >= v, "sync mode released write {tag} before the DR site held it durably");
                    }
                    let s = self.streams.iter().position(|s| *s == Stream::Held { tag }).expect("a held write");
                    self.streams[s] = Stream::Released { tag };
                }
            }
        }
        assert!(
            self.seq.buffered_bytes() <= self.buffer_limit.max(BLOCK),
            "{} bytes buffered over a limit of {}",
            self.seq.buffered_bytes(),
            self.buffer_limit
        );
    }

    fn run_app(&mut self, out: Vec<ApplyOutput>) {
        for o in out {
            match o {
                ApplyOutput::Write { id, member, offset, data } => {
                    self.in_flight.push((id, usize::from(member), (offset / BLOCK) as usize, decode(&data)));
                }
                ApplyOutput::Verify { id, .. } => panic!("the simulation copies nothing, yet operation {id} is a checksum"),
                ApplyOutput::WriteZeroes { id, .. } => panic!("the simulation writes no zeroes, yet operation {id} does"),
                ApplyOutput::Flush => {
                    assert!(self.in_flight.is_empty(), "a flush while writes are in flight covers none of them");
                    self.flush = true;
                }
                ApplyOutput::Persist { seq } => self.persist = Some(seq),
                ApplyOutput::Send(f) => {
                    if self.connected {
                        self.to_production.push_back(f);
                    }
                }
            }
        }
    }

    /// A state the DR disks could be left in by a crash now: the media, then each write that
    /// was not flushed (completed or still in flight) or not, at random.
    fn crash_image(&mut self) -> Image {
        let mut img = self.durable;
        let pending: Vec<(usize, usize, u64)> =
            self.volatile.iter().copied().chain(self.in_flight.iter().map(|&(_, m, b, v)| (m, b, v))).collect();
        for (m, b, v) in pending {
            if self.rng.below(2) == 0 {
                img[m][b] = v;
            }
        }
        img
    }

    fn check_consistent(img: &Image, when: &str) {
        for (b, (data, commit)) in img[0].iter().zip(&img[1]).enumerate() {
            assert!(data >= commit, "{when}: block {b} commits version {commit} but holds data version {data}");
        }
    }

    fn cut(&mut self) {
        self.connected = false;
        self.to_dr.clear();
        self.to_production.clear();
        self.seq.disconnected();
    }

    fn step(&mut self, submitting: bool) {
        match self.rng.below(100) {
            // A stream writes (its data, or its commit once its data completed).
            0..=24 if submitting => {
                let s = self.rng.below(STREAMS as u64) as usize;
                if let Stream::Ready { commit } = self.streams[s] {
                    if !commit {
                        self.version[s] += 1;
                    }
                    let (member, v) = (usize::from(commit), self.version[s]);
                    let tag = self.next_tag;
                    self.next_tag += 1;
                    self.writes.insert(tag, (member, s, v));
                    self.production[member][s] = v;
                    self.streams[s] = Stream::Held { tag };
                    let mut data = v.to_le_bytes().to_vec();
                    data.resize(BLOCK as usize, 0);
                    let mut out = Vec::new();
                    self.seq.submit(tag, member as u16, s as u64 * BLOCK, data, 0, &mut out).expect("a block fits a frame");
                    self.run_seq(out);
                }
            }
            // A released write completes to its host.
            25..=39 => {
                let s = self.rng.below(STREAMS as u64) as usize;
                if let Stream::Released { tag } = self.streams[s] {
                    self.seq.host_completed(tag);
                    let (member, _, _) = self.writes[&tag];
                    self.streams[s] = Stream::Ready { commit: member == 0 };
                }
            }
            40..=54 if !self.to_dr.is_empty() => {
                if let Some(f) = self.to_dr.pop_front() {
                    let mut out = Vec::new();
                    self.app.on_frame(f, &mut out).expect("the sequencer's frames are in order");
                    self.run_app(out);
                }
            }
            55..=64 => {
                if let Some(f) = self.to_production.pop_front() {
                    let mut out = Vec::new();
                    match f {
                        DrFrame::Ack { seq } => self.seq.on_ack(seq, &mut out),
                        DrFrame::Hello { applied_seq, .. } => {
                            self.seq.connected(applied_seq, &mut out).expect("the DR site holds what it acknowledged")
                        }
                        other => panic!("the DR site sent {other:?}"),
                    }
                    self.run_seq(out);
                }
            }
            65..=79 if !self.in_flight.is_empty() => {
                let i = self.rng.below(self.in_flight.len() as u64) as usize;
                let (id, m, b, v) = self.in_flight.remove(i);
                self.volatile.push((m, b, v));
                let mut out = Vec::new();
                self.app.write_done(id, Ok(()), &mut out).expect("the simulated disks do not fail");
                self.run_app(out);
            }
            80..=86 => {
                let mut out = Vec::new();
                if self.flush {
                    self.flush = false;
                    for (m, b, v) in self.volatile.drain(..) {
                        self.durable[m][b] = v;
                    }
                    self.app.flush_done(Ok(()), &mut out).expect("the simulated disks do not fail");
                } else if let Some(seq) = self.persist.take() {
                    self.persisted = seq;
                    self.app.persisted(&mut out);
                }
                self.run_app(out);
            }
            87..=89 if !self.connected => {
                self.connected = true;
                let mut out = Vec::new();
                self.app.connected(0, &mut out);
                self.run_app(out);
            }
            90 if submitting => self.cut(),
            91 if submitting && self.rng.below(4) == 0 => {
                // The DR site crashes: its disks keep a possible crash image, it restarts from
                // the sequence it persisted.
                let img = self.crash_image();
                Self::check_consistent(&img, "after a DR crash");
                self.durable = img;
                self.volatile.clear();
                self.in_flight.clear();
                self.flush = false;
                self.persist = None;
                self.app = Applier::new(self.persisted);
                self.crashes += 1;
                self.cut();
            }
            _ => {}
        }
        let img = self.crash_image();
        Self::check_consistent(&img, "a possible crash image");
    }

    fn settled(&self) -> bool {
        self.streams.iter().all(|s| matches!(s, Stream::Ready { .. }))
            && self.seq.recovery_point(0).writes == 0
            && self.in_flight.is_empty()
            && self.volatile.is_empty()
            && !self.flush
            && self.persist.is_none()
    }
}

#[test]
fn the_dr_image_of_a_group_is_crash_consistent_at_every_step_and_converges() {
    let seeds = std::env::var("SIM_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(400u64);
    let (mut crashes, mut writes) = (0, 0);
    for seed in 1..=seeds {
        let mut w = World::new(seed);
        for _ in 0..8000 {
            w.step(true);
        }
        let mut steps = 0;
        while !w.settled() {
            w.step(false);
            steps += 1;
            assert!(steps < 200_000, "seed {seed}: the stream never drained ({:?}, {:?})", w.streams, w.seq.recovery_point(0));
        }
        assert_eq!(w.durable, w.production, "seed {seed}: the DR image equals the production image once drained");
        assert_eq!(w.app.applied(), w.next_tag - 1, "seed {seed}: every write persisted as applied");
        crashes += w.crashes;
        writes += w.next_tag - 1;
    }
    assert!(crashes > seeds / 4, "the runs crashed the DR site ({crashes} times)");
    assert!(writes > seeds * 100, "the runs wrote ({writes} writes)");
}
