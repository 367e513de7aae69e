//! The replication link's connections on the link thread: dialling or accepting through the
//! [`crate::mirror::transport::Transport`], the authentication handshake of each new connection
//! ([`PendingConn`], refusals logged through [`RefusalLog`], the limits [`AUTH_TIMEOUT`] and
//! [`MAX_PENDING`]), the link going up and down, and the witness's replies. At the acceptor an
//! authenticated connection's first frame says whether it is a new link or a lane of the live
//! one (see `lanes`, which also receives and flushes).

use super::lanes::{FirstFrame, Lane};
use super::{LinkThread, CONN, PENDING};
use crate::mirror::auth::Side;
use crate::mirror::core::Input;
use crate::mirror::outbox::Conn;
use crate::mirror::transport::LinkStream;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

/// A connection must finish the authentication handshake within this.
pub const AUTH_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections in their handshake at once; a newer one closes the oldest.
pub const MAX_PENDING: usize = 8;

/// A connection proving itself (see [`crate::mirror::auth`]).
pub(super) struct PendingConn {
    pub(super) sock: Box<dyn LinkStream>,
    handshake: crate::mirror::auth::Handshake,
    /// Handshake bytes not yet written.
    pub(super) tx: Vec<u8>,
    since: Instant,
    /// At the acceptor, once authenticated: the bytes after the handshake, until they hold the
    /// first frame.
    authed: Option<Vec<u8>>,
}

/// Where a connection's handshake stands after a turn.
enum Outcome {
    Wait,
    Refused(String),
    /// A new link, with the frame bytes that came after the handshake.
    Link(Vec<u8>),
    /// Lane `k` of the live link, with the frame bytes after its naming.
    Lane(Vec<u8>, usize),
}

/// Log lines about refused connections: at most one a second, with a count of the rest.
pub(super) struct RefusalLog {
    last: Option<Instant>,
    suppressed: u64,
    pub(super) total: u64,
}

impl RefusalLog {
    pub(super) fn new() -> RefusalLog {
        RefusalLog { last: None, suppressed: 0, total: 0 }
    }
}

impl LinkThread {
    /// An authenticated connection becomes the link; `early` are frame bytes that arrived with
    /// the end of the handshake, `proof` the handshake bytes still to send (before any frame).
    fn link_up(&mut self, mut sock: Box<dyn LinkStream>, early: &[u8], proof: Vec<u8>) {
        if self.broken {
            return;
        }
        if !self.conns.is_empty() {
            self.link_down("replaced by the peer's new, authenticated connection");
        }
        if sock.register(self.poll.registry(), CONN).is_err() {
            return;
        }
        tracing::info!(mirror = %self.name, peer = %self.transport.describe(), "replication link up (authenticated)");
        let mut rx = vec![0; 4 << 20];
        rx[..early.len()].copy_from_slice(early);
        let mut conn = Conn::new(sock, rx, early.len());
        conn.tx = proof;
        self.conns.push(Lane::Here(Box::new(conn)));
        self.link_ups += 1;
        self.lanes_reset();
        self.handle(Input::LinkUp);
    }

    fn refused(&mut self, why: &str) {
        self.refusals.total += 1;
        let now = Instant::now();
        if self.refusals.last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1)) {
            let more = std::mem::take(&mut self.refusals.suppressed);
            let more = if more > 0 { format!(" ({more} more refused in the last second)") } else { String::new() };
            tracing::warn!(mirror = %self.name, "replication connection refused: {why}{more}");
            self.refusals.last = Some(now);
        } else {
            self.refusals.suppressed += 1;
        }
    }

    /// A new connection starts its handshake (the live link, if any, is not touched).
    fn start_handshake(&mut self, mut sock: Box<dyn LinkStream>) {
        let nonce = match crate::mirror::auth::fresh_nonce() {
            Ok(n) => n,
            Err(e) => return self.refused(&format!("no randomness for a nonce: {e}")),
        };
        if sock.register(self.poll.registry(), PENDING).is_err() {
            return;
        }
        if self.pending_conns.len() >= MAX_PENDING {
            let mut oldest = self.pending_conns.remove(0);
            oldest.sock.deregister(self.poll.registry());
            self.refused("too many connections in their handshake: closed the oldest");
        }
        let mut handshake = crate::mirror::auth::Handshake::new(&self.settings.secret, self.transport.side(), nonce);
        let tx = handshake.take_output();
        self.pending_conns.push(PendingConn { sock, handshake, tx, since: Instant::now(), authed: None });
    }

    /// Moves every handshake on; promotes those that complete to the link or one of its lanes.
    pub(super) fn drive_handshakes(&mut self) -> bool {
        let mut work = false;
        let mut i = 0;
        while i < self.pending_conns.len() {
            let p = &mut self.pending_conns[i];
            let mut outcome = Outcome::Wait;
            // Write what the handshake has to say.
            while !p.tx.is_empty() {
                match p.sock.write(&p.tx) {
                    Ok(0) => break,
                    Ok(n) => {
                        p.tx.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        outcome = Outcome::Refused(format!("write: {e}"));
                        break;
                    }
                }
            }
            let mut buf = [0u8; 4096];
            while matches!(outcome, Outcome::Wait) {
                match p.sock.read(&mut buf) {
                    Ok(0) if p.authed.is_some() => outcome = Outcome::Refused("closed before its first frame".into()),
                    Ok(0) => {
                        outcome = Outcome::Refused(p.handshake.on_eof().err().map_or("closed".to_string(), |e| e.to_string()));
                    }
                    Ok(n) => {
                        work = true;
                        if let Some(bytes) = p.authed.as_mut() {
                            bytes.extend_from_slice(&buf[..n]);
                            continue;
                        }
                        match p.handshake.on_bytes(&buf[..n]) {
                            Ok(progress) => {
                                p.tx.extend(p.handshake.take_output());
                                if progress.done {
                                    let early = buf[progress.consumed..n].to_vec();
                                    match p.handshake.side() {
                                        // The first frame tells a new link from a lane.
                                        Side::Acceptor => p.authed = Some(early),
                                        // While the link is up, the dialer's connection is the
                                        // lane it dialled.
                                        Side::Dialer if !self.conns.is_empty() && self.lanes.dial_since.is_some() => {
                                            outcome = Outcome::Lane(early, self.conns.len());
                                        }
                                        Side::Dialer => outcome = Outcome::Link(early),
                                    }
                                }
                            }
                            Err(e) => outcome = Outcome::Refused(e.to_string()),
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => outcome = Outcome::Refused(format!("read: {e}")),
                }
            }
            let p = &self.pending_conns[i];
            if let (Outcome::Wait, Some(bytes)) = (&outcome, p.authed.as_ref()) {
                outcome = match self.first_frame(bytes) {
                    FirstFrame::Incomplete | FirstFrame::Early => Outcome::Wait,
                    FirstFrame::Link => Outcome::Link(bytes.clone()),
                    FirstFrame::Lane { k, len } => Outcome::Lane(bytes[len..].to_vec(), k),
                    FirstFrame::Refused(why) => Outcome::Refused(why),
                };
            }
            if matches!(outcome, Outcome::Wait) && p.since.elapsed() > AUTH_TIMEOUT {
                outcome = Outcome::Refused(if p.authed.is_some() {
                    "no first frame (or its lane never came next) within the timeout".into()
                } else {
                    "no handshake within the timeout".into()
                });
            }
            match outcome {
                Outcome::Wait => i += 1,
                Outcome::Link(early) => {
                    let (sock, proof) = self.take_authenticated(i);
                    self.link_up(sock, &early, proof);
                    work = true;
                }
                Outcome::Lane(early, k) => {
                    let (sock, proof) = self.take_authenticated(i);
                    self.join_lane(sock, &early, proof, k);
                    work = true;
                }
                Outcome::Refused(why) => {
                    let mut p = self.pending_conns.remove(i);
                    p.sock.deregister(self.poll.registry());
                    if p.handshake.side() == Side::Dialer && !self.conns.is_empty() {
                        // A lane that did not come up is dialled again later.
                        self.lanes.dial_since = None;
                    }
                    self.transport.failed();
                    self.refused(&why);
                }
            }
        }
        work
    }

    /// Takes an authenticated connection out of the handshakes: its socket and the handshake
    /// bytes still to send (before any frame).
    fn take_authenticated(&mut self, i: usize) -> (Box<dyn LinkStream>, Vec<u8>) {
        let mut p = self.pending_conns.remove(i);
        let mut proof = std::mem::take(&mut p.tx);
        proof.extend(p.handshake.take_output());
        p.sock.deregister(self.poll.registry());
        (p.sock, proof)
    }

    pub(super) fn link_down(&mut self, why: &str) {
        if self.conns.is_empty() {
            return;
        }
        for lane in self.conns.drain(..) {
            if let Lane::Here(mut c) = lane {
                c.sock.deregister(self.poll.registry());
            }
        }
        // Lanes on reactors of their own go down with the link.
        self.epoch += 1;
        for (port, overflow) in self.ports.iter().zip(&mut self.port_overflow) {
            port.new_epoch(self.epoch);
            overflow.clear();
        }
        if self.transport.side() == Side::Dialer {
            // Lanes being dialled were for this link.
            for mut p in self.pending_conns.drain(..) {
                p.sock.deregister(self.poll.registry());
            }
        }
        tracing::warn!(mirror = %self.name, "replication link down: {why}");
        self.last_down = Some((why.to_string(), Instant::now()));
        self.ping_sent = None;
        self.handle(Input::LinkDown);
        self.transport.failed();
    }

    pub(super) fn connect_or_accept(&mut self) {
        if self.departed {
            // A clean stop handed the namespace to the peer: this leg stays away.
            return;
        }
        if let Some(sock) = self.transport.poll_connect(!self.conns.is_empty() || !self.pending_conns.is_empty()) {
            self.start_handshake(sock);
        }
    }

    /// Hands the witness's answers to the core; datagrams that fail authentication are dropped.
    pub(super) fn receive_witness(&mut self) -> bool {
        let mut got = false;
        let mut buf = [0u8; 512];
        loop {
            let Some(w) = self.witness.as_mut() else { return got };
            let n = match w.sock.recv_from(&mut buf) {
                Ok((n, from)) if from == w.addr => n,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return got,
            };
            match crate::mirror::witness::Reply::parse(&buf[..n], &w.secret) {
                Ok(reply) => {
                    if let Some(t) = w.sent.take() {
                        w.rtt = Some(t.elapsed());
                    }
                    got = true;
                    self.handle(Input::Witness(reply));
                }
                Err(e) => tracing::warn!(mirror = %self.name, "witness reply dropped: {e}"),
            }
        }
    }
}
