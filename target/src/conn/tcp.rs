//! The NVMe/TCP side of a connection: its socket, the sans-IO PDU transport, the receive buffer,
//! and the outbox that batches responses into one writev per flush.
//!
//! Reads reuse their data buffers: a buffer whose C2HData went out returns to the outbox's pool
//! (at most a queue depth of them) and is offered to the next read's bdev, which fills it in
//! place ([`BdevChannel::submit_read`](nvmetro_bdev::BdevChannel::submit_read)); the bytes are
//! then sent from it by the same writev as the PDU headers, so a read allocates nothing.

use super::QueueBuffers;
use mio::net::TcpStream;
use nvmetro_bdev::{IoBufMut, IoBufPool};
use nvmetro_proto::identify;
use nvmetro_proto::nvme::Completion;
use nvmetro_proto::tcp::{PduSink, TargetEvent, TargetLimits, TargetTransport};
use std::collections::VecDeque;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;

const RX_BUFFER: usize = 512 * 1024;

/// A connection with this much queued to send is not read until the socket took some of it
/// (backpressure): a host that does not read its responses cannot make the target queue more than
/// this plus what its outstanding commands return (at most queue depth x MDTS).
pub const OUTBOX_LIMIT: usize = 4 << 20;

/// Read buffers larger than this are not kept for reuse (MDTS is the largest a read needs).
const POOLED_BUFFER: usize = identify::MAX_TRANSFER;

/// Most bytes of read buffers one connection keeps for reuse.
const POOL_BYTES: usize = 4 << 20;

/// Most iovecs one writev takes.
const IOVECS: usize = 128;

/// A queued piece of the send stream.
struct Segment {
    bytes: Vec<u8>,
    /// Read data (returns to the read buffer pool once sent) rather than header bytes.
    data: bool,
}

/// The send side of a connection: header bytes accumulate in `tail`; read data is queued as its own
/// buffer, and everything goes out with one writev per flush, so data is never copied here. Sent
/// read buffers are kept (up to `pool_limit`) for the next reads.
#[derive(Default)]
struct Outbox {
    segments: VecDeque<Segment>,
    /// Bytes in `segments`, sent ones included.
    queued: usize,
    /// Bytes of the first segment already sent.
    sent: usize,
    tail: Vec<u8>,
    spare: Vec<Vec<u8>>,
    /// Sent read buffers, for [`Outbox::take_buffer`].
    pool: Vec<Vec<u8>>,
    /// Most buffers `pool` keeps: the queue depth (no more reads than that are ever in flight).
    pool_limit: usize,
    /// Capacity of the buffers in `pool` (at most [`POOL_BYTES`]).
    pool_bytes: usize,
}

impl PduSink for Outbox {
    fn bytes(&mut self) -> &mut Vec<u8> {
        &mut self.tail
    }
    fn data(&mut self, data: Vec<u8>) {
        self.seal_tail();
        self.queued += data.len();
        self.segments.push_back(Segment { bytes: data, data: true });
    }
}

impl Outbox {
    fn seal_tail(&mut self) {
        if !self.tail.is_empty() {
            let fresh = self.spare.pop().unwrap_or_default();
            self.queued += self.tail.len();
            self.segments.push_back(Segment { bytes: std::mem::replace(&mut self.tail, fresh), data: false });
        }
    }

    /// A buffer for a read's data: a sent one if any (its contents are stale), else an empty one.
    fn take_buffer(&mut self) -> Vec<u8> {
        let buf = self.pool.pop().unwrap_or_default();
        self.pool_bytes -= buf.capacity();
        buf
    }

    fn is_empty(&self) -> bool {
        self.segments.is_empty() && self.tail.is_empty()
    }

    /// Bytes waiting to be sent.
    fn len(&self) -> usize {
        self.queued - self.sent + self.tail.len()
    }

    fn clear(&mut self) {
        self.segments.clear();
        self.queued = 0;
        self.tail.clear();
        self.sent = 0;
    }

    /// Writes as much as the socket takes.
    fn flush(&mut self, sock: &mut TcpStream) -> io::Result<()> {
        self.seal_tail();
        while !self.segments.is_empty() {
            let mut slices = [IoSlice::new(&[]); IOVECS];
            let mut n = 0;
            for (i, seg) in self.segments.iter().take(IOVECS).enumerate() {
                slices[i] = IoSlice::new(if i == 0 { &seg.bytes[self.sent..] } else { &seg.bytes });
                n += 1;
            }
            let mut written = match sock.write_vectored(&slices[..n]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            while written > 0 {
                let left = self.segments[0].bytes.len() - self.sent;
                if written < left {
                    self.sent += written;
                    break;
                }
                written -= left;
                self.sent = 0;
                let Segment { bytes: mut done, data } = self.segments.pop_front().expect("segment");
                self.queued -= done.len();
                if data {
                    let size = done.capacity();
                    if self.pool.len() < self.pool_limit && size <= POOLED_BUFFER && self.pool_bytes + size <= POOL_BYTES {
                        self.pool_bytes += size;
                        self.pool.push(done);
                    }
                } else if self.spare.len() < 64 && done.capacity() <= 256 * 1024 {
                    done.clear();
                    self.spare.push(done);
                }
            }
        }
        Ok(())
    }
}

/// What one read of the socket came to.
pub(super) enum ReadStep {
    /// Commands (maybe none) are in `events`; `more`: the socket may hold more bytes.
    Received { more: bool },
    /// Nothing more to read now (WouldBlock, or paused for backpressure).
    Stop,
    /// The connection must end: the reason, and whether at once (else after the outbox drains).
    Close(String, bool),
}

pub(super) struct TcpWire {
    sock: TcpStream,
    transport: TargetTransport<QueueBuffers>,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    out: Outbox,
    pub(super) events: Vec<TargetEvent<IoBufMut>>,
    /// Reading stopped because the send buffer is over [`OUTBOX_LIMIT`].
    read_paused: bool,
    /// Whether reading was ever paused (logged the first time only).
    was_paused: bool,
}

impl TcpWire {
    pub(super) fn new(sock: TcpStream, maxh2cdata: u32) -> TcpWire {
        let limits = TargetLimits { in_capsule: identify::ADMIN_IN_CAPSULE, maxh2cdata, max_transfer: identify::MAX_TRANSFER };
        TcpWire {
            sock,
            transport: TargetTransport::with_buffers(limits, QueueBuffers(IoBufPool::new())),
            rx: vec![0; RX_BUFFER],
            rx_start: 0,
            rx_end: 0,
            out: Outbox::default(),
            events: Vec::new(),
            read_paused: false,
            was_paused: false,
        }
    }

    pub(super) fn socket(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    /// One read of the socket, and every complete PDU in the buffer through the transport
    /// (commands land in `events`). Reads nothing while the send buffer is over [`OUTBOX_LIMIT`].
    /// `read_closed`: the readiness event said the host closed its side (or the socket failed),
    /// which no later event repeats, so reading goes on until end of file or WouldBlock.
    pub(super) fn read_some(&mut self, peer: SocketAddr, qid: u16, read_closed: bool) -> ReadStep {
        loop {
            let queued = self.out.len();
            if queued >= OUTBOX_LIMIT {
                if !self.was_paused {
                    tracing::info!(%peer, qid, queued, "host is not taking its responses; not reading until they drain");
                }
                self.read_paused = true;
                self.was_paused = true;
                return ReadStep::Stop;
            }
            self.read_paused = false;
            if self.rx_end == self.rx.len() {
                // Compact: move the partial PDU to the front.
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
                if self.rx_end == self.rx.len() {
                    return ReadStep::Close("PDU larger than the receive buffer".into(), true);
                }
            }
            match self.sock.read(&mut self.rx[self.rx_end..]) {
                Ok(0) => return ReadStep::Close("host closed the connection".into(), true),
                Ok(n) => {
                    let asked = self.rx.len() - self.rx_end;
                    self.rx_end += n;
                    if let Some(why) = self.receive(peer, qid) {
                        return ReadStep::Close(why, false);
                    }
                    // A short read emptied the socket: bytes arriving from now on raise a new
                    // readiness event (epoll(7), edge-triggered stream sockets), so the read
                    // that would only return WouldBlock is skipped.
                    return ReadStep::Received { more: n == asked || read_closed };
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadStep::Stop,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return ReadStep::Close(format!("read error: {e}"), true),
            }
        }
    }

    /// Feeds the buffered bytes to the transport; a protocol error's reason if one ends the
    /// connection.
    fn receive(&mut self, peer: SocketAddr, qid: u16) -> Option<String> {
        let result = self.transport.receive(&self.rx[self.rx_start..self.rx_end], self.out.bytes(), &mut self.events);
        let mut failed = None;
        match result {
            Ok(used) => self.rx_start += used,
            Err(e) => {
                tracing::warn!(%peer, qid, "protocol error, closing connection: {e}");
                failed = Some(format!("protocol error: {}", e.reason));
                self.rx_start = self.rx_end;
                // The TermReq is the last thing the host hears: the commands that came with the
                // offending PDU are not acted on.
                self.events.clear();
            }
        }
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        }
        failed
    }

    pub(super) fn respond(&mut self, cqe: &Completion, data: &[u8]) {
        self.transport.respond(cqe, data, self.out.bytes());
    }

    /// Responds with read data handed over whole (sent from its own buffer, then pooled).
    pub(super) fn respond_owned(&mut self, cqe: &Completion, data: Vec<u8>, success_only: bool) {
        self.transport.respond_owned(cqe, data, success_only, &mut self.out);
    }

    pub(super) fn take_read_buffer(&mut self) -> Vec<u8> {
        self.out.take_buffer()
    }

    pub(super) fn connected(&mut self, queue_size: u32, io_in_capsule: Option<usize>) {
        if let Some(bytes) = io_in_capsule {
            self.transport.set_in_capsule(bytes);
            self.out.pool_limit = queue_size as usize;
        }
        self.transport.set_connected(queue_size);
    }

    pub(super) fn forget_commands(&mut self, n: usize) {
        self.transport.forget_commands(n);
    }

    pub(super) fn should_resume_reading(&self) -> bool {
        self.read_paused && self.out.len() < OUTBOX_LIMIT
    }

    pub(super) fn flush(&mut self) -> io::Result<()> {
        let r = self.out.flush(&mut self.sock);
        if r.is_err() {
            self.out.clear();
        }
        r
    }

    pub(super) fn drained(&self) -> bool {
        self.out.is_empty()
    }

    pub(super) fn shutdown(&mut self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}
