//! The replication link's connections on the link thread: dialling or accepting through the
//! [`crate::mirror::transport::Transport`], the authentication handshake of each new connection
//! ([`PendingConn`], refusals logged through [`RefusalLog`], the limits [`AUTH_TIMEOUT`] and
//! [`MAX_PENDING`]), the link going up and down, receiving frames (and the witness's replies)
//! and flushing what the outbox holds.

use super::{LinkThread, CONN, PENDING};
use crate::mirror::core::Input;
use crate::mirror::frame::{Frame, Kind};
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
        if self.conn.is_some() {
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
        self.conn = Some(conn);
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
        self.pending_conns.push(PendingConn { sock, handshake, tx, since: Instant::now() });
    }

    /// Moves every handshake on; promotes the first that completes to the link.
    pub(super) fn drive_handshakes(&mut self) -> bool {
        let mut work = false;
        let mut i = 0;
        while i < self.pending_conns.len() {
            let p = &mut self.pending_conns[i];
            let mut outcome: Result<Option<Vec<u8>>, String> = Ok(None);
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
                        outcome = Err(format!("write: {e}"));
                        break;
                    }
                }
            }
            let mut buf = [0u8; 4096];
            while outcome == Ok(None) {
                match p.sock.read(&mut buf) {
                    Ok(0) => {
                        outcome = Err(p.handshake.on_eof().err().map_or("closed".to_string(), |e| e.to_string()));
                    }
                    Ok(n) => {
                        work = true;
                        match p.handshake.on_bytes(&buf[..n]) {
                            Ok(progress) => {
                                p.tx.extend(p.handshake.take_output());
                                if progress.done {
                                    outcome = Ok(Some(buf[progress.consumed..n].to_vec()));
                                }
                            }
                            Err(e) => outcome = Err(e.to_string()),
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => outcome = Err(format!("read: {e}")),
                }
            }
            if outcome == Ok(None) && p.since.elapsed() > AUTH_TIMEOUT {
                outcome = Err("no handshake within the timeout".into());
            }
            match outcome {
                Ok(None) => i += 1,
                Ok(Some(early)) => {
                    let mut p = self.pending_conns.remove(i);
                    // Our proof may still be on its way: it goes out before any frame.
                    let mut proof = std::mem::take(&mut p.tx);
                    proof.extend(p.handshake.take_output());
                    p.sock.deregister(self.poll.registry());
                    self.link_up(p.sock, &early, proof);
                    work = true;
                }
                Err(why) => {
                    let mut p = self.pending_conns.remove(i);
                    p.sock.deregister(self.poll.registry());
                    self.transport.failed();
                    self.refused(&why);
                }
            }
        }
        work
    }

    pub(super) fn link_down(&mut self, why: &str) {
        if let Some(mut c) = self.conn.take() {
            c.sock.deregister(self.poll.registry());
            tracing::warn!(mirror = %self.name, "replication link down: {why}");
            self.ping_sent = None;
            self.handle(Input::LinkDown);
            self.transport.failed();
        }
    }

    pub(super) fn connect_or_accept(&mut self) {
        if self.departed {
            // A clean stop handed the namespace to the peer: this leg stays away.
            return;
        }
        if let Some(sock) = self.transport.poll_connect(self.conn.is_some() || !self.pending_conns.is_empty()) {
            self.start_handshake(sock);
        }
    }

    /// Reads and handles everything the peer sent; returns whether anything arrived. Frames are
    /// handled as they complete, so the receive buffer only ever holds one partial frame.
    pub(super) fn receive(&mut self) -> bool {
        let mut got = false;
        loop {
            let Some(c) = self.conn.as_mut() else { return got };
            let space = c.rx.len() - c.rx_len;
            let n = match c.sock.read(&mut c.rx[c.rx_len..]) {
                Ok(0) => {
                    self.link_down("peer closed the link");
                    return got;
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.link_down(&format!("read: {e}"));
                    return got;
                }
            };
            c.rx_len += n;
            c.last_rx = Instant::now();
            got = true;
            let mut used = 0;
            let mut frames = std::mem::take(&mut self.frames);
            let mut bad = None;
            loop {
                match Frame::parse_into(&c.rx[used..c.rx_len], Some(&self.payloads)) {
                    Ok(Some((f, len))) => {
                        used += len;
                        frames.push(f);
                    }
                    Ok(None) => break,
                    Err(e) => {
                        bad = Some(e);
                        break;
                    }
                }
            }
            c.rx.copy_within(used..c.rx_len, 0);
            c.rx_len -= used;
            let full = c.rx_len == c.rx.len();
            for f in frames.drain(..) {
                if f.kind == Kind::Pong {
                    if let Some(t) = self.ping_sent.take() {
                        self.rtt = Some(t.elapsed());
                    }
                }
                self.handle(Input::Frame(f));
            }
            self.frames = frames;
            if let Some(e) = bad {
                self.link_down(&format!("bad frame: {e}"));
                return got;
            }
            if full {
                self.link_down("frame larger than the receive buffer");
                return got;
            }
            if n < space {
                // A short read emptied the socket: the next byte brings a new readiness edge
                // (and the tick looks anyway), so no read that would only say EAGAIN.
                return got;
            }
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

    pub(super) fn flush(&mut self) {
        let Some(c) = self.conn.as_mut() else { return };
        let now = Instant::now();
        while c.delayed.front().is_some_and(|(due, _, _)| *due <= now) {
            let (_, bytes, resync_data) = c.delayed.pop_front().expect("front");
            if resync_data {
                c.bulk.push_back(bytes);
            } else {
                c.tx.extend_from_slice(&bytes);
            }
        }
        if let Err(why) = c.write_out(now) {
            c.clear();
            self.link_down(&why);
        }
    }
}
