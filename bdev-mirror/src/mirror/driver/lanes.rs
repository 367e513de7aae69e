//! The link's lanes on the link thread: several connections to the peer carry one link
//! ([`crate::mirror::lanes`] says which frame takes which lane and in which order the receiver
//! hands them to the core).
//!
//! Lane 0 is the connection that came up first; it carries the Hellos. Once an end has the
//! peer's Hello (and the peer understands lanes), it announces on lane 0 how many lanes it
//! takes (the link takes the smaller number); the acceptor's announcement also names the link's
//! session (a random number). The dialer then dials the other lanes one at a time; each proves
//! the shared secret as every connection does, and its first frame names the lane and the
//! session, so a lane only ever joins the link it was dialled for (the acceptor closes any other,
//! and keeps one that came early until the lanes before it have joined). A lane that fails takes
//! the whole link down, as a broken connection always has; lanes that cannot be dialled leave the
//! link working on those it has. A frame held for another lane past the heartbeat timeout means
//! a lane is stuck: the link goes down too.

use super::{LinkThread, CONN};
use crate::mirror::core::Input;
use crate::mirror::frame::{caps, Frame, Hello, Kind};
use crate::mirror::lanes::{LaneReceiver, LaneSender};
use crate::mirror::outbox::Conn;
use crate::mirror::transport::LinkStream;
use std::time::Instant;

/// Most lanes a link has (the configuration's bound).
pub const MAX_LANES: usize = 16;

/// One lane of the link.
pub(super) enum Lane {
    /// Driven by the link thread (boxed: a lane on a reactor is a number).
    Here(Box<Conn>),
    /// Driven by the worker behind port `i` on a reactor of its own ([`super::worker`]).
    Reactor(usize),
}

impl Lane {
    pub(super) fn here_ref(&self) -> Option<&Conn> {
        match self {
            Lane::Here(c) => Some(c),
            Lane::Reactor(_) => None,
        }
    }

    pub(super) fn here(&mut self) -> Option<&mut Conn> {
        match self {
            Lane::Here(c) => Some(c),
            Lane::Reactor(_) => None,
        }
    }
}

/// Remembered lane choices for data frames, by sequence number (see [`LaneLink::hint`]).
const HINTS: usize = 4096;

/// The state of the link's lanes while it is up.
pub(super) struct LaneLink {
    pub(super) tx: LaneSender,
    pub(super) rx: LaneReceiver,
    /// The acceptor's name for this link (a lane joins only the link it names).
    pub(super) session: u64,
    /// Lanes both ends take (at the dialer: once the acceptor announced its number).
    pub(super) wanted: usize,
    /// The peer's Hello on this link has been seen.
    hello_seen: bool,
    /// A lane is being dialled (since then).
    pub(super) dial_since: Option<Instant>,
    /// Frames have waited for another lane since then.
    held_since: Option<Instant>,
    /// By sequence number modulo [`HINTS`]: the lane (plus one) for the data frames of that
    /// write, chosen by the reactor it came from or the lane it arrived on; 0: none. A slot
    /// reused or stale only sends a frame by another lane, which is as correct.
    hints: Box<[u8; HINTS]>,
}

impl LaneLink {
    pub(super) fn new() -> LaneLink {
        LaneLink {
            tx: LaneSender::new(1),
            rx: LaneReceiver::new(1),
            session: 0,
            wanted: 1,
            hello_seen: false,
            dial_since: None,
            held_since: None,
            hints: Box::new([0; HINTS]),
        }
    }

    /// Data frames of write `seq` take `lane`.
    pub(super) fn hint(&mut self, seq: u64, lane: usize) {
        self.hints[(seq % HINTS as u64) as usize] = lane as u8 + 1;
    }

    /// The lane data frames of write `seq` take, if one was chosen.
    pub(super) fn hinted(&self, seq: u64) -> Option<usize> {
        usize::from(self.hints[(seq % HINTS as u64) as usize]).checked_sub(1)
    }

    /// Frames have waited for another lane since this instant.
    pub(super) fn held_since(&self) -> Option<Instant> {
        self.held_since
    }
}

/// What an authenticated connection's first frame makes of it at the acceptor.
pub(super) enum FirstFrame {
    /// Not complete yet.
    Incomplete,
    /// A new link (lane 0).
    Link,
    /// Lane `k` of the live link; its first frame is `len` bytes long.
    Lane {
        k: usize,
        len: usize,
    },
    /// A lane that joins after lanes still missing: it waits.
    Early,
    Refused(String),
}

impl LinkThread {
    /// The lanes of a link that came up now.
    pub(super) fn lanes_reset(&mut self) {
        self.lanes = LaneLink::new();
        if self.transport.side() == crate::mirror::auth::Side::Acceptor {
            let nonce = crate::mirror::auth::fresh_nonce().unwrap_or_default();
            self.lanes.session = u64::from_le_bytes(nonce[..8].try_into().expect("8 bytes")) | 1;
            self.lanes.wanted = self.settings.lanes.clamp(1, MAX_LANES);
        }
    }

    /// Lanes up now.
    pub(super) fn lanes_up(&self) -> usize {
        self.conns.len()
    }

    /// Lanes up now that workers on other reactors drive.
    pub(super) fn lanes_on_reactors(&self) -> usize {
        self.conns.iter().filter(|l| matches!(l, Lane::Reactor(_))).count()
    }

    /// The lanes the link thread drives itself.
    pub(super) fn here(&self) -> impl Iterator<Item = &Conn> {
        self.conns.iter().filter_map(Lane::here_ref)
    }

    /// Queues `f` for the worker behind port `i` (in order behind frames that found its queue
    /// full); the worker is woken once per turn ([`LinkThread::kick_ports`]).
    pub(super) fn send_on_port(&mut self, i: usize, f: Frame) {
        let overflow = &mut self.port_overflow[i];
        if !overflow.is_empty() {
            overflow.push_back(f);
        } else if let Err(f) = self.ports[i].send(self.epoch, f) {
            overflow.push_back(f);
        }
        self.ports_sent |= 1 << i;
    }

    /// Wakes the workers that were sent frames, after moving what waited into their queues.
    pub(super) fn kick_ports(&mut self) {
        for (i, port) in self.ports.iter().enumerate() {
            let overflow = &mut self.port_overflow[i];
            while let Some(f) = overflow.pop_front() {
                if let Err(f) = port.send(self.epoch, f) {
                    overflow.push_front(f);
                    break;
                }
            }
            if self.ports_sent & (1 << i) != 0 {
                port.sent();
            }
            if !overflow.is_empty() {
                // Sent again next turn.
                self.ports_sent |= 1 << i;
            } else {
                self.ports_sent &= !(1 << i);
            }
        }
    }

    /// Whether a worker of a live lane has frames the receiver takes now or a failure for the
    /// link, or frames wait for a worker.
    pub(super) fn ports_have_news(&self) -> bool {
        self.ports_sent != 0
            || self.conns.iter().enumerate().any(|(k, l)| matches!(l, Lane::Reactor(i) if self.ports[*i].has_news(self.lanes.rx.wants(k))))
    }

    /// Ports of no live lane: what their workers left behind is dropped (a failure or frames
    /// of a link that is gone would otherwise look like news for good).
    pub(super) fn discard_stale_ports(&mut self) {
        for (i, port) in self.ports.iter().enumerate() {
            let live = matches!(self.conns.get(i + 1), Some(Lane::Reactor(j)) if *j == i);
            if !live {
                port.discard_stale();
            }
        }
    }

    /// Lanes that joined before a reactor ran their worker (at start, or after a reload) move to
    /// it once it runs.
    pub(super) fn move_lanes_to_reactors(&mut self) {
        for k in 1..self.conns.len() {
            if self.lane_to_worker(k) {
                tracing::info!(mirror = %self.name, "replication lane {k} moved to a reactor of its own");
            }
        }
    }

    /// Hands lane `k`, driven here, to the worker of port `k - 1` if a reactor runs it: the
    /// connection, with what it has queued and half-read, changes hands between frames, so the
    /// lane stays in order. Whether it did.
    fn lane_to_worker(&mut self, k: usize) -> bool {
        let i = k.wrapping_sub(1);
        if !matches!(self.conns.get(k), Some(Lane::Here(_))) || !self.ports.get(i).is_some_and(|p| p.running()) {
            return false;
        }
        let Lane::Here(mut c) = std::mem::replace(&mut self.conns[k], Lane::Reactor(i)) else { return false };
        c.sock.deregister(self.poll.registry());
        self.ports[i].hand_over(self.epoch, k, *c);
        true
    }

    /// At the acceptor: what the first frame of an authenticated connection (`bytes`, after
    /// its handshake) makes of it.
    pub(super) fn first_frame(&self, bytes: &[u8]) -> FirstFrame {
        let (f, len) = match Frame::parse(bytes) {
            Ok(Some(parsed)) => parsed,
            Ok(None) => return FirstFrame::Incomplete,
            Err(e) => return FirstFrame::Refused(format!("bad first frame: {e}")),
        };
        if f.kind != Kind::Lane {
            return FirstFrame::Link;
        }
        let k = f.arg as usize;
        if self.conns.is_empty() || f.seq != self.lanes.session {
            return FirstFrame::Refused(format!("a lane (#{k}) for a link that is not this one's"));
        }
        if k == 0 || k >= self.lanes.wanted {
            return FirstFrame::Refused(format!("lane #{k}: this link takes {} lanes", self.lanes.wanted));
        }
        match k.cmp(&self.conns.len()) {
            std::cmp::Ordering::Equal => FirstFrame::Lane { k, len },
            std::cmp::Ordering::Greater => FirstFrame::Early,
            std::cmp::Ordering::Less => FirstFrame::Refused(format!("lane #{k} is already up")),
        }
    }

    /// An authenticated connection becomes lane `k` of the live link; `early` are the frame
    /// bytes that came after its handshake (at the acceptor, after its first, Lane, frame). The
    /// dialer names the lane first.
    pub(super) fn join_lane(&mut self, mut sock: Box<dyn LinkStream>, early: &[u8], proof: Vec<u8>, k: usize) {
        if sock.register(self.poll.registry(), CONN).is_err() {
            return self.link_down("a new lane could not be registered");
        }
        let mut rx = vec![0; 4 << 20];
        rx[..early.len()].copy_from_slice(early);
        let mut conn = Conn::new(sock, rx, early.len());
        conn.tx = proof;
        if self.transport.side() == crate::mirror::auth::Side::Dialer {
            let mut join = Frame::new(Kind::Lane, self.lanes.session);
            join.arg = k as u32;
            conn.queue(&join);
            self.lanes.dial_since = None;
        }
        self.conns.push(Lane::Here(Box::new(conn)));
        let on = if self.lane_to_worker(k) { " on a reactor of its own" } else { "" };
        self.lanes.tx.set_lanes(self.conns.len());
        self.lanes.rx.set_lanes(self.conns.len());
        tracing::info!(mirror = %self.name, "replication lane {k} up{on} ({} of {})", self.conns.len(), self.lanes.wanted);
    }

    /// At the dialer: asks the transport for the next lane when one is missing.
    pub(super) fn dial_lanes(&mut self) {
        if self.conns.is_empty() || self.conns.len() >= self.lanes.wanted || !self.pending_conns.is_empty() {
            return;
        }
        // A dial that came to nothing (refused, timed out) is tried again.
        if self.lanes.dial_since.is_some_and(|t| t.elapsed() < super::AUTH_TIMEOUT * 2) {
            return;
        }
        self.lanes.dial_since = self.transport.want_lane().then(Instant::now);
    }

    /// The peer's Hello: a peer that understands lanes counts its frames, and so do we; the
    /// acceptor announces its lanes and names the link.
    fn on_peer_hello(&mut self, f: &Frame) {
        if self.lanes.hello_seen {
            return;
        }
        self.lanes.hello_seen = true;
        if Hello::from_payload(&f.payload).is_none_or(|h| h.caps & caps::LANES == 0) {
            // A peer of an earlier release: one connection, frames as it knows them.
            self.lanes.wanted = 1;
            return;
        }
        self.lanes.tx.start_stamping();
        self.lanes.rx.start_checking();
        let acceptor = self.transport.side() == crate::mirror::auth::Side::Acceptor;
        if acceptor {
            self.lanes.rx.set_lanes(self.lanes.wanted);
        }
        // Both ends say how many lanes they take; the acceptor names the link too.
        let mut announce = Frame::new(Kind::Lane, if acceptor { self.lanes.session } else { 0 });
        announce.offset = self.settings.lanes.clamp(1, MAX_LANES) as u64;
        if let Some(c) = self.conns.first_mut().and_then(Lane::here) {
            c.queue(&announce);
        }
    }

    /// A Lane frame on a live lane: only the peer's announcement, on lane 0.
    fn on_lane_frame(&mut self, lane: usize, f: &Frame) -> Result<(), String> {
        if lane != 0 || f.arg != 0 {
            return Err(format!("unexpected lane frame (lane #{} on lane {lane})", f.arg));
        }
        if self.transport.side() == crate::mirror::auth::Side::Dialer {
            self.lanes.session = f.seq;
        }
        self.lanes.wanted = (f.offset as usize).min(self.settings.lanes).clamp(1, MAX_LANES);
        Ok(())
    }

    /// Reads and handles everything the peer sent, on every lane; returns whether anything
    /// arrived. Frames go to the core as soon as the barrier counts let them.
    pub(super) fn receive(&mut self) -> bool {
        let mut got = false;
        // Lanes a short read emptied: the next byte brings a new readiness edge.
        let mut drained = 0u32;
        loop {
            let mut progress = false;
            let mut lane = 0;
            while lane < self.conns.len() {
                if drained & (1 << lane) == 0 && self.lanes.rx.wants(lane) {
                    let read = match self.conns[lane] {
                        Lane::Here(_) => self.read_lane(lane),
                        Lane::Reactor(i) => self.read_port(lane, i),
                    };
                    match read {
                        Ok((read, empty)) => {
                            progress |= read;
                            if empty {
                                drained |= 1 << lane;
                            }
                        }
                        Err(why) => {
                            self.link_down(&why);
                            return got;
                        }
                    }
                }
                if !self.hand_on() {
                    return got;
                }
                lane += 1;
            }
            got |= progress;
            if !progress {
                return got;
            }
        }
    }

    /// One read of `lane`, its complete frames parsed and taken by the lanes' receiver:
    /// Ok((bytes arrived, the socket is empty now)).
    fn read_lane(&mut self, lane: usize) -> Result<(bool, bool), String> {
        let mut frames = std::mem::take(&mut self.frames);
        let Some(c) = self.conns[lane].here() else { return Ok((false, true)) };
        let read = c.read_frames(lane, &self.payloads, &mut frames);
        let mut taken = Ok(());
        for f in frames.drain(..) {
            if taken.is_ok() {
                taken = self.take_frame(lane, f);
            }
        }
        self.frames = frames;
        taken?;
        read
    }

    /// Takes what the worker behind port `i` read from `lane` while the receiver wants it:
    /// Ok((frames arrived, nothing more is there)). Its failure takes the link down.
    fn read_port(&mut self, lane: usize, i: usize) -> Result<(bool, bool), String> {
        let mut got = false;
        // Frames the worker read before its connection failed go first, as on the link thread.
        while self.lanes.rx.wants(lane) {
            let Some(f) = self.ports[i].receive(self.epoch) else { break };
            got = true;
            self.take_frame(lane, f)?;
        }
        if let Some(why) = self.ports[i].failure(self.epoch) {
            return Err(why);
        }
        Ok((got, self.lanes.rx.wants(lane)))
    }

    /// A frame that arrived on `lane`, for the lanes' receiver (Lane frames are the driver's).
    fn take_frame(&mut self, lane: usize, f: Frame) -> Result<(), String> {
        match f.kind {
            Kind::Lane => return self.on_lane_frame(lane, &f),
            Kind::Hello => self.on_peer_hello(&f),
            Kind::Pong => {
                if let Some(t) = self.ping_sent.take() {
                    self.rtt = Some(t.elapsed());
                }
            }
            // Its acknowledgement goes back on the lane it came by.
            Kind::Replicate => self.lanes.hint(f.seq, lane),
            _ => {}
        }
        self.lanes.rx.push(lane, f).map_err(|e| e.to_string())
    }

    /// The lane for data frames of writes submitted on `reactor` (a channel's consumer,
    /// [`super::thread_tag`]): one a worker on that reactor drives (several: by `seq`), lane 0
    /// on the link's own reactor; none (spread by sequence number) when the link has no lane on
    /// a worker.
    pub(super) fn lane_of_reactor(&self, reactor: u64, seq: u64) -> Option<usize> {
        if self.lanes_on_reactors() == 0 {
            return None;
        }
        if reactor == super::thread_tag() {
            return Some(0);
        }
        let mine = |k: &usize| matches!(self.conns[*k], Lane::Reactor(i) if self.ports[i].reactor() == reactor);
        let n = (1..self.conns.len()).filter(mine).count();
        (n > 0).then(|| (1..self.conns.len()).filter(mine).nth((seq % n as u64) as usize)).flatten()
    }

    /// Hands the core every frame the barrier counts let go; false if the link went down.
    fn hand_on(&mut self) -> bool {
        while let Some(f) = self.lanes.rx.pop() {
            self.handle(Input::Frame(f));
            if self.conns.is_empty() {
                return false;
            }
        }
        self.lanes.held_since = match (self.lanes.rx.holding(), self.lanes.held_since) {
            (0, _) => None,
            (_, Some(t)) => Some(t),
            (_, None) => Some(Instant::now()),
        };
        true
    }

    /// Writes what every lane's outbox holds (emulated delay first).
    pub(super) fn flush(&mut self) {
        self.kick_ports();
        let now = Instant::now();
        let mut failed = None;
        for (lane, c) in self.conns.iter_mut().enumerate().filter_map(|(k, l)| Some((k, l.here()?))) {
            if let Err(why) = c.send_due(lane, now) {
                failed = Some(why);
                break;
            }
        }
        if let Some(why) = failed {
            for c in self.conns.iter_mut().filter_map(Lane::here) {
                c.clear();
            }
            self.link_down(&why);
        }
    }
}
