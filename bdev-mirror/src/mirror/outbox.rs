//! The replication link's connection and its two lanes: frames of the host path and control
//! (replication, acknowledgements, pings) go first; resync data yields to them and keeps the
//! kernel's send queue near a fill target, so a resync leaves hosts their latency.
//!
//! A host-path frame's payload is not copied: its header goes into the lane's byte buffer, the
//! payload (the same [`IoBuf`] the local leg writes from) waits beside it, and one `writev`
//! sends headers and payloads together.

use super::frame::Frame;
use super::transport::LinkStream;
use crate::{IoBuf, IoBufPool};
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read};
use std::time::{Duration, Instant};

pub(super) struct Conn {
    pub(super) sock: Box<dyn LinkStream>,
    pub(super) rx: Vec<u8>,
    pub(super) rx_len: usize,
    /// `rx` holds bytes that came with the handshake and were not parsed yet.
    pub(super) rx_fresh: bool,
    /// Encoded frames of the host path and control (replication, acknowledgements, pings),
    /// without their payloads (see `tx_payloads`).
    pub(super) tx: Vec<u8>,
    /// Payloads of frames in `tx`, each with the position in the lane's byte stream (counting
    /// from the first byte ever queued in `tx`) after which it goes out.
    tx_payloads: VecDeque<(u64, IoBuf)>,
    /// Bytes ever drained from the front of `tx`.
    tx_base: u64,
    /// Bytes of the first payload already written.
    tx_payload_sent: usize,
    /// Resync data frames: a lane of their own that yields to `tx` (see [`Conn::write_out`]).
    pub(super) bulk: VecDeque<Vec<u8>>,
    /// Bytes of `bulk`'s first frame already written.
    pub(super) bulk_sent: usize,
    /// Resync data waits for the socket to drain below the fill target (no event announces it).
    pub(super) fill_blocked: bool,
    /// When bytes of `tx` last left: resync data keeps to [`RESYNC_FILL_BUSY`] for a while after.
    pub(super) last_urgent: Option<Instant>,
    /// Frames held back by the emulated link delay: (due, encoded bytes, resync data).
    pub(super) delayed: VecDeque<(Instant, Vec<u8>, bool)>,
    pub(super) last_rx: Instant,
}

/// Resync data in the socket while host frames flow: about one chunk, so a host write's frame
/// waits behind at most that much.
const RESYNC_FILL_BUSY: usize = super::core::RESYNC_CHUNK;
/// Resync data in the socket while the link carries nothing else.
const RESYNC_FILL_IDLE: usize = 4 << 20;
/// Host frames within this keep the resync at [`RESYNC_FILL_BUSY`].
const RESYNC_YIELD: Duration = Duration::from_millis(5);
/// How soon a resync held back by the fill target looks at the socket again.
pub(super) const RESYNC_RECHECK: Duration = Duration::from_micros(50);

/// Writes what the socket takes: Ok(bytes written), 0 when it takes nothing now.
fn write_some(sock: &mut dyn LinkStream, bytes: &[u8]) -> Result<usize, String> {
    loop {
        return match sock.write(bytes) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(format!("write: {e}")),
        };
    }
}

/// `why`, naming lane `lane` unless it is lane 0 (the link itself).
fn on_lane(lane: usize, why: String) -> String {
    if lane == 0 {
        why
    } else {
        format!("lane {lane}: {why}")
    }
}

impl Conn {
    pub(super) fn new(sock: Box<dyn LinkStream>, rx: Vec<u8>, rx_len: usize) -> Conn {
        Conn {
            sock,
            rx,
            rx_len,
            rx_fresh: rx_len > 0,
            tx: Vec::new(),
            tx_payloads: VecDeque::new(),
            tx_base: 0,
            tx_payload_sent: 0,
            bulk: VecDeque::new(),
            bulk_sent: 0,
            fill_blocked: false,
            last_urgent: None,
            delayed: VecDeque::new(),
            last_rx: Instant::now(),
        }
    }

    /// Queues a frame on the host-path lane; its payload is shared, not copied.
    pub(super) fn queue(&mut self, f: &Frame) {
        self.tx.extend_from_slice(&f.encode_header());
        if !f.payload.is_empty() {
            self.tx_payloads.push_back((self.tx_base + self.tx.len() as u64, f.payload.clone()));
        }
    }

    /// Queues a frame as the link sends it: host-path frames by reference, resync data in the
    /// yielding lane, and both behind an emulated `delay` when there is one.
    pub(super) fn queue_frame(&mut self, f: &Frame, delay: Duration, now: Instant) {
        let resync_data = super::lanes::Class::of(f) == super::lanes::Class::Bulk;
        if delay.is_zero() && !resync_data {
            return self.queue(f);
        }
        let mut bytes = Vec::with_capacity(f.payload.len() + 64);
        f.encode(&mut bytes);
        if delay.is_zero() {
            self.bulk.push_back(bytes);
        } else {
            self.delayed.push_back((now + delay, bytes, resync_data));
        }
    }

    /// Sends what lane `lane` has due: frames whose emulated delay is over join the outbox, and
    /// the outbox is written. Errors name the lane (lane 0 is the link itself).
    pub(super) fn send_due(&mut self, lane: usize, now: Instant) -> Result<(), String> {
        self.release_due(now);
        self.write_out(now).map_err(|why| on_lane(lane, why))
    }

    /// Frames whose emulated delay is over join their lanes.
    fn release_due(&mut self, now: Instant) {
        while self.delayed.front().is_some_and(|(due, _, _)| *due <= now) {
            let (_, bytes, resync_data) = self.delayed.pop_front().expect("front");
            if resync_data {
                self.bulk.push_back(bytes);
            } else {
                self.tx.extend_from_slice(&bytes);
            }
        }
    }

    /// One read of the socket, its complete frames parsed into `frames` (payloads from `pool`):
    /// Ok((bytes arrived, the socket is empty now)). `lane` names the connection in errors.
    pub(super) fn read_frames(&mut self, lane: usize, pool: &IoBufPool, frames: &mut Vec<Frame>) -> Result<(bool, bool), String> {
        let space = self.rx.len() - self.rx_len;
        let n = loop {
            match self.sock.read(&mut self.rx[self.rx_len..]) {
                Ok(0) => return Err(if lane == 0 { "peer closed the link".into() } else { format!("peer closed lane {lane}") }),
                Ok(n) => break n,
                // Bytes that came with the handshake are parsed even when nothing new arrived.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && self.rx_fresh => break 0,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((false, true)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(on_lane(lane, format!("read: {e}"))),
            }
        };
        self.rx_len += n;
        self.rx_fresh = false;
        self.last_rx = Instant::now();
        let mut used = 0;
        let mut bad = None;
        loop {
            match Frame::parse_into(&self.rx[used..self.rx_len], Some(pool)) {
                Ok(Some((f, len))) => {
                    used += len;
                    frames.push(f);
                }
                Ok(None) => break,
                Err(e) => {
                    bad = Some(format!("bad frame: {e}"));
                    break;
                }
            }
        }
        self.rx.copy_within(used..self.rx_len, 0);
        self.rx_len -= used;
        if bad.is_none() && self.rx_len == self.rx.len() {
            bad = Some("frame larger than the receive buffer".into());
        }
        match bad {
            // Frames before the bad bytes are dropped with the link.
            Some(why) => {
                frames.clear();
                Err(why)
            }
            None => Ok((true, n < space || n == 0)),
        }
    }

    /// Whether the host-path lane has bytes to send.
    pub(super) fn urgent(&self) -> bool {
        !self.tx.is_empty() || !self.tx_payloads.is_empty()
    }

    /// Drops everything queued (the link is gone).
    pub(super) fn clear(&mut self) {
        self.tx_base += self.tx.len() as u64;
        self.tx.clear();
        self.tx_payloads.clear();
        self.tx_payload_sent = 0;
        self.bulk.clear();
        self.bulk_sent = 0;
    }

    /// One `writev` of the host-path lane: header bytes and payloads in order. Ok(bytes written).
    fn write_urgent(&mut self) -> Result<usize, String> {
        const MAX_SLICES: usize = 64;
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut used = 0;
        let mut pos = 0usize;
        let mut every_payload = true;
        for (i, (at, payload)) in self.tx_payloads.iter().enumerate() {
            if used + 2 > MAX_SLICES {
                every_payload = false;
                break;
            }
            let at = (at - self.tx_base) as usize;
            if at > pos {
                slices[used] = IoSlice::new(&self.tx[pos..at]);
                used += 1;
                pos = at;
            }
            let skip = if i == 0 { self.tx_payload_sent } else { 0 };
            slices[used] = IoSlice::new(&payload[skip..]);
            used += 1;
        }
        if every_payload && used < MAX_SLICES && pos < self.tx.len() {
            slices[used] = IoSlice::new(&self.tx[pos..]);
            used += 1;
        }
        let n = loop {
            match self.sock.write_vectored(&slices[..used]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(format!("write: {e}")),
            }
        };
        self.consume_urgent(n);
        Ok(n)
    }

    /// Forgets the first `n` bytes of the host-path lane (written).
    fn consume_urgent(&mut self, mut n: usize) {
        while n > 0 {
            let header_bytes = match self.tx_payloads.front() {
                Some((at, _)) => (at - self.tx_base) as usize,
                None => self.tx.len(),
            };
            if header_bytes > 0 {
                let m = n.min(header_bytes);
                self.tx.drain(..m);
                self.tx_base += m as u64;
                n -= m;
                continue;
            }
            let Some((_, payload)) = self.tx_payloads.front() else { break };
            let m = n.min(payload.len() - self.tx_payload_sent);
            self.tx_payload_sent += m;
            n -= m;
            if self.tx_payload_sent == payload.len() {
                self.tx_payloads.pop_front();
                self.tx_payload_sent = 0;
            }
        }
    }

    /// Writes frames in priority order: the rest of a resync frame already started (frames do
    /// not interleave), then everything of the host path, then resync data, but only while the
    /// socket holds less than the fill target (DRBD's `c-fill-target`): the kernel's send queue
    /// would otherwise fill with resync data that every host frame waits behind.
    pub(super) fn write_out(&mut self, now: Instant) -> Result<(), String> {
        self.fill_blocked = false;
        loop {
            // Between frames: host frames first, then a resync frame if the fill target allows.
            if self.bulk_sent == 0 {
                if self.urgent() {
                    if self.write_urgent()? == 0 {
                        return Ok(());
                    }
                    self.last_urgent = Some(now);
                    continue;
                }
                if self.bulk.is_empty() {
                    return Ok(());
                }
                let busy = self.last_urgent.is_some_and(|t| now.duration_since(t) < RESYNC_YIELD);
                let fill = if busy { RESYNC_FILL_BUSY } else { RESYNC_FILL_IDLE };
                if self.sock.unsent().unwrap_or(0) >= fill {
                    self.fill_blocked = true;
                    return Ok(());
                }
            }
            // The (rest of the) first resync frame.
            let n = write_some(self.sock.as_mut(), &self.bulk[0][self.bulk_sent..])?;
            if n == 0 {
                return Ok(());
            }
            self.bulk_sent += n;
            if self.bulk_sent == self.bulk[0].len() {
                self.bulk.pop_front();
                self.bulk_sent = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};

    /// A socket that takes at most `room` bytes per write and reports `queued` unsent bytes.
    #[derive(Clone, Default)]
    struct Wire {
        written: Arc<Mutex<Vec<u8>>>,
        room: Arc<Mutex<usize>>,
        queued: Arc<Mutex<usize>>,
    }

    impl Read for Wire {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    impl Write for Wire {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut room = self.room.lock().unwrap();
            if *room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(*room);
            *room -= n;
            self.written.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl LinkStream for Wire {
        fn register(&mut self, _: &mio::Registry, _: mio::Token) -> io::Result<()> {
            Ok(())
        }
        fn deregister(&mut self, _: &mio::Registry) {}
        fn unsent(&self) -> Option<usize> {
            Some(*self.queued.lock().unwrap())
        }
    }

    fn conn(wire: &Wire) -> Conn {
        Conn::new(Box::new(wire.clone()), vec![0; 16], 0)
    }

    #[test]
    fn host_frames_go_before_resync_data_and_a_started_resync_frame_finishes_first() {
        let wire = Wire::default();
        let mut c = conn(&wire);
        c.bulk.push_back(vec![b'R'; 10]);
        c.bulk.push_back(vec![b'S'; 10]);
        c.tx.extend_from_slice(b"hh");
        *wire.room.lock().unwrap() = 6;
        c.write_out(Instant::now()).unwrap();
        assert_eq!(&wire.written.lock().unwrap()[..], b"hhRRRR", "host bytes first, then resync data");
        // A host frame queued now waits for the rest of the started resync frame, not the next.
        c.tx.extend_from_slice(b"HH");
        *wire.room.lock().unwrap() = 100;
        c.write_out(Instant::now()).unwrap();
        assert_eq!(&wire.written.lock().unwrap()[..], b"hhRRRRRRRRRRHHSSSSSSSSSS");
        assert!(c.bulk.is_empty() && c.tx.is_empty() && !c.fill_blocked);
    }

    #[test]
    fn shared_payloads_go_out_in_order_with_their_headers_across_partial_writes() {
        use super::super::frame::{Frame, Kind};
        let wire = Wire::default();
        let mut c = conn(&wire);
        let mut frames = Vec::new();
        for i in 0..100u8 {
            let mut f = Frame::new(Kind::Replicate, u64::from(i));
            if i % 3 != 0 {
                f.payload = vec![i; 100 + usize::from(i)].into();
            }
            c.queue(&f);
            frames.push(f);
        }
        let mut expected = Vec::new();
        for f in &frames {
            f.encode(&mut expected);
        }
        // Writes of odd sizes split headers and payloads anywhere.
        let mut rounds = 0;
        while c.urgent() {
            *wire.room.lock().unwrap() = 37 + rounds % 500;
            c.write_out(Instant::now()).unwrap();
            rounds += 1;
        }
        assert_eq!(*wire.written.lock().unwrap(), expected);
        // The lane holds no payload any more: each frame's buffer is unique again.
        for f in frames {
            assert!(!f.payload.is_shared());
        }
    }

    #[test]
    fn resync_data_keeps_the_socket_queue_under_the_fill_target() {
        let wire = Wire::default();
        let mut c = conn(&wire);
        *wire.room.lock().unwrap() = usize::MAX;
        let now = Instant::now();
        // Hosts just wrote: a queue of one chunk holds resync data back.
        c.tx.extend_from_slice(b"h");
        *wire.queued.lock().unwrap() = RESYNC_FILL_BUSY;
        c.bulk.push_back(vec![b'R'; 4]);
        c.write_out(now).unwrap();
        assert_eq!(&wire.written.lock().unwrap()[..], b"h");
        assert!(c.fill_blocked, "held back by the fill target, to be looked at again soon");
        // Without host frames for a while the target is larger: the data goes.
        c.write_out(now + RESYNC_YIELD).unwrap();
        assert_eq!(&wire.written.lock().unwrap()[..], b"hRRRR");
        assert!(!c.fill_blocked);
        // Past even the idle target, nothing more goes.
        *wire.queued.lock().unwrap() = RESYNC_FILL_IDLE;
        c.bulk.push_back(vec![b'S'; 4]);
        c.write_out(now + RESYNC_YIELD).unwrap();
        assert!(c.fill_blocked && c.bulk.len() == 1);
    }

    #[test]
    fn a_socket_error_is_reported() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Ok(0)
            }
        }
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        impl LinkStream for Broken {
            fn register(&mut self, _: &mio::Registry, _: mio::Token) -> io::Result<()> {
                Ok(())
            }
            fn deregister(&mut self, _: &mio::Registry) {}
        }
        let mut c = Conn::new(Box::new(Broken), Vec::new(), 0);
        c.bulk.push_back(vec![1]);
        assert!(c.write_out(Instant::now()).unwrap_err().starts_with("write:"));
    }
}
