//! One NVMe/TCP connection (one queue) on its reactor: bytes in, PDUs through the sans-IO
//! transport, Connect, then either the admin controller or an I/O queue whose commands become
//! bdev operations; responses are batched into the connection's send buffer.
//!
//! Reads reuse their data buffers: a buffer whose C2HData went out returns to the connection's
//! pool (at most a queue depth of them) and is offered to the next read's bdev, which fills it
//! in place ([`BdevChannel::submit_read`](nvmetro_bdev::BdevChannel::submit_read)); the bytes are
//! then sent from it by the same writev as the PDU headers, so a read allocates nothing.

use crate::reactor::Channels;
use crate::subsys::{ConnectRefusal, ControllerHandle, IoCache, Subsystem};
use crate::Target;
use mio::net::TcpStream;
use nvmetro_bdev::{BdevError, BdevOp, BdevOutput};
use nvmetro_bdev::{IoBufMut, IoBufPool};
use nvmetro_proto::controller::{self, connect_offset, decode_io, AdminOutcome, Controller, FusePairer, Fused, IoRequest};
use nvmetro_proto::identify;
use nvmetro_proto::nvme::{admin, fctype, Command, Completion, Status};
use nvmetro_proto::subsystem::{SubsystemView, DISCOVERY_NQN};
use nvmetro_proto::tcp::{DataBuffers, PduSink, TargetEvent, TargetLimits, TargetTransport};
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

/// A reactor's connections by token. Tokens are small integers the reactor hands out itself, so
/// they need no DoS-resistant hash; the reactor looks connections up several times per command.
pub type ConnMap = HashMap<u32, Conn, BuildHasherDefault<TokenHasher>>;

/// Multiplicative (Fibonacci) hashing of a `u32` token, spread to the high bits hashbrown uses.
#[derive(Debug, Default, Clone, Copy)]
pub struct TokenHasher(u64);

impl Hasher for TokenHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

/// Which listener a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// A `[[listener]]`, by index: serves subsystems and discovery.
    Subsystems(usize),
    /// A discovery-only address from `target.discovery`.
    DiscoveryOnly,
}

/// What a reactor lends a connection while it works.
pub struct Ctx<'a> {
    pub target: &'a Target,
    pub channels: &'a mut Channels,
    pub registry: &'a mio::Registry,
    pub now_ms: u64,
    /// The reactor's clock for this step of its turn (read once per step, not per command):
    /// commands take it as their start and completions as their end for the latency figures.
    pub now: Instant,
}

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

enum Role {
    Unconnected,
    Admin(Box<AdminQueue>),
    Io(IoQueue),
}

struct AdminQueue {
    ctrl: Controller,
    /// The host belongs to another site: its Optimized paths are reported Non-Optimized.
    remote_host: bool,
    /// The config generation `remote_host` was computed for (a reload may move the host).
    config_generation: u64,
    /// None for a discovery controller.
    subsystem: Option<(Arc<Subsystem>, Arc<ControllerHandle>)>,
    /// The discovery log as this host may see it.
    discovery_view: Option<SubsystemView>,
}

impl AdminQueue {
    /// The subsystem as this controller's host sees it through `listener`.
    fn view_of(&mut self, subsystem: &Subsystem, listener: usize, target: &crate::Target) -> Arc<SubsystemView> {
        let generation = target.config_generation();
        if generation != self.config_generation {
            self.config_generation = generation;
            self.remote_host = target.config().host_is_remote(&self.ctrl.hostnqn);
        }
        let view = subsystem.view(listener);
        if self.remote_host {
            Arc::new(view.for_remote_host())
        } else {
            view
        }
    }
}

struct IoQueue {
    subsystem: Arc<Subsystem>,
    /// The view through this queue's listener and the namespace table, loaded per command.
    cache: IoCache,
    handle: Arc<ControllerHandle>,
    generation: u64,
    pairer: FusePairer<IoBufMut>,
}

#[derive(Debug)]
enum IoKind {
    Read,
    Write,
    Compare,
    CompareAndWrite {
        write_cid: u16,
    },
    Other,
    /// The flushes of a controller shutdown (CC.SHN): no completion is sent.
    Shutdown,
}

#[derive(Debug)]
struct Inflight {
    cid: u16,
    kind: IoKind,
    remaining: u32,
    status: Status,
    bytes: u64,
    data: Vec<u8>,
    /// Index of the namespace in its subsystem, for the per-namespace figures.
    ns: Option<Arc<crate::subsys::NamespaceStats>>,
    start: Instant,
    /// Flush this bdev once the operation succeeded, before completing (the host disabled the
    /// volatile write cache and the operation has no FUA of its own).
    flush_after: Option<usize>,
}

/// Transport sizes a connection offers, from `[target]` (read when it is accepted).
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// In-capsule data of I/O queues (IOCCSZ).
    pub io_in_capsule: usize,
    /// MAXH2CDATA of ICResp.
    pub maxh2cdata: u32,
}

pub struct Conn {
    limits: ConnLimits,
    token: u32,
    sock: TcpStream,
    peer: SocketAddr,
    listener: ListenerKind,
    transport: TargetTransport<QueueBuffers>,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    out: Outbox,
    role: Role,
    /// The host disabled SQ flow control at Connect: reads may end with C2HData SUCCESS.
    sq_flow_disabled: bool,
    qid: u16,
    queue_size: u32,
    sqhd: u32,
    inflight: Vec<Option<Inflight>>,
    free_slots: Vec<u32>,
    events: Vec<TargetEvent<IoBufMut>>,
    /// Set when the connection must end once its send buffer is out (or at once if fatal).
    closing: Option<String>,
    fatal: bool,
    /// Reading stopped because the send buffer is over [`OUTBOX_LIMIT`].
    read_paused: bool,
    /// Whether reading was ever paused (logged the first time only).
    was_paused: bool,
}

/// Host data of one queue lands in buffers from the queue's own pool (SPDK's request pool per
/// queue pair: it grows to the queue's depth and no further), shared from there with the bdev.
#[derive(Debug)]
struct QueueBuffers(IoBufPool);

impl DataBuffers for QueueBuffers {
    type Buf = IoBufMut;
    fn buffer(&mut self, len: usize) -> IoBufMut {
        self.0.take(len)
    }
}

impl Conn {
    pub fn new(token: u32, sock: TcpStream, peer: SocketAddr, listener: ListenerKind, conn_limits: ConnLimits) -> Conn {
        let limits = TargetLimits {
            in_capsule: identify::ADMIN_IN_CAPSULE,
            maxh2cdata: conn_limits.maxh2cdata,
            max_transfer: identify::MAX_TRANSFER,
        };
        Conn {
            limits: conn_limits,
            token,
            sock,
            peer,
            listener,
            transport: TargetTransport::with_buffers(limits, QueueBuffers(IoBufPool::new())),
            rx: vec![0; RX_BUFFER],
            rx_start: 0,
            rx_end: 0,
            out: Outbox::default(),
            role: Role::Unconnected,
            sq_flow_disabled: false,
            qid: 0,
            queue_size: 32,
            sqhd: 0,
            inflight: Vec::new(),
            free_slots: Vec::new(),
            events: Vec::new(),
            closing: None,
            fatal: false,
            read_paused: false,
            was_paused: false,
        }
    }

    pub fn socket(&mut self) -> &mut TcpStream {
        &mut self.sock
    }

    /// Ends this connection (a reload removed its listener or its subsystem).
    pub fn end(&mut self, reason: &str) {
        self.close_with(reason.into(), true);
    }

    /// The listener slot the connection came through (None: a discovery-only listener).
    pub fn listener_slot(&self) -> Option<usize> {
        match self.listener {
            ListenerKind::Subsystems(i) => Some(i),
            ListenerKind::DiscoveryOnly => None,
        }
    }

    /// Whether the connection belongs to subsystem `nqn`.
    pub fn serves(&self, nqn: &str) -> bool {
        match &self.role {
            Role::Admin(q) => q.subsystem.as_ref().is_some_and(|(s, _)| s.config().nqn == nqn),
            Role::Io(q) => q.subsystem.config().nqn == nqn,
            Role::Unconnected => false,
        }
    }

    fn close_with(&mut self, reason: String, fatal: bool) {
        if self.closing.is_none() {
            self.closing = Some(reason);
        }
        self.fatal |= fatal;
    }

    /// Reads everything the socket has and handles every complete PDU, until the send buffer
    /// is over [`OUTBOX_LIMIT`]: then reading waits for [`Conn::should_resume_reading`].
    /// `read_closed`: the readiness event said the host closed its side (or the socket failed),
    /// which no later event repeats, so reading goes on until end of file or WouldBlock.
    pub fn on_readable(&mut self, ctx: &mut Ctx, read_closed: bool) {
        loop {
            if self.closing.is_some() {
                // Ending: nothing more the host sends is acted on (after a TermReq in particular).
                return;
            }
            let queued = self.out.len();
            if queued >= OUTBOX_LIMIT {
                if !self.was_paused {
                    tracing::info!(peer = %self.peer, qid = self.qid, queued, "host is not taking its responses; not reading until they drain");
                }
                self.read_paused = true;
                self.was_paused = true;
                return;
            }
            self.read_paused = false;
            if self.rx_end == self.rx.len() {
                // Compact: move the partial PDU to the front.
                self.rx.copy_within(self.rx_start..self.rx_end, 0);
                self.rx_end -= self.rx_start;
                self.rx_start = 0;
                if self.rx_end == self.rx.len() {
                    return self.close_with("PDU larger than the receive buffer".into(), true);
                }
            }
            match self.sock.read(&mut self.rx[self.rx_end..]) {
                Ok(0) => {
                    self.close_with("host closed the connection".into(), true);
                    return;
                }
                Ok(n) => {
                    let asked = self.rx.len() - self.rx_end;
                    self.rx_end += n;
                    self.process(ctx);
                    if n < asked && !read_closed {
                        // A short read emptied the socket: bytes arriving from now on raise a new
                        // readiness event (epoll(7), edge-triggered stream sockets), so the read
                        // that would only return WouldBlock is skipped.
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.close_with(format!("read error: {e}"), true);
                    return;
                }
            }
        }
    }

    fn process(&mut self, ctx: &mut Ctx) {
        let mut events = std::mem::take(&mut self.events);
        let result = self.transport.receive(&self.rx[self.rx_start..self.rx_end], self.out.bytes(), &mut events);
        match result {
            Ok(used) => self.rx_start += used,
            Err(e) => {
                tracing::warn!(peer = %self.peer, qid = self.qid, "protocol error, closing connection: {e}");
                self.close_with(format!("protocol error: {}", e.reason), false);
                self.rx_start = self.rx_end;
                // The TermReq is the last thing the host hears: the commands that came with the
                // offending PDU are not acted on.
                events.clear();
            }
        }
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        }
        for ev in events.drain(..) {
            match ev {
                TargetEvent::Reject(cqe) => self.respond(cqe, &[]),
                TargetEvent::Command { cmd, data } => self.on_command(cmd, data, ctx),
            }
        }
        self.events = events;
    }

    fn respond(&mut self, mut cqe: Completion, data: &[u8]) {
        cqe.sqid = self.qid;
        cqe.sqhd = self.sqhd as u16;
        self.transport.respond(&cqe, data, self.out.bytes());
    }

    /// Responds with read data handed over whole (sent from its own buffer).
    fn respond_data(&mut self, mut cqe: Completion, data: Vec<u8>) {
        cqe.sqid = self.qid;
        cqe.sqhd = self.sqhd as u16;
        self.transport.respond_owned(&cqe, data, self.sq_flow_disabled, &mut self.out);
    }

    fn on_command(&mut self, cmd: Command, data: IoBufMut, ctx: &mut Ctx) {
        self.sqhd = (self.sqhd + 1) % self.queue_size.max(1);
        match &mut self.role {
            Role::Unconnected => self.on_connect(cmd, data, ctx),
            Role::Admin(_) => self.on_admin(cmd, data, ctx),
            Role::Io(_) => {
                if cmd.opcode() == admin::FABRICS {
                    let status = if cmd.fctype() == fctype::DISCONNECT { Status::SUCCESS } else { Status::COMMAND_SEQUENCE_ERROR };
                    self.respond(Completion::new(cmd.cid(), status), &[]);
                    if cmd.fctype() == fctype::DISCONNECT {
                        self.close_with("host disconnected the queue".into(), false);
                    }
                    return;
                }
                let Role::Io(q) = &mut self.role else { unreachable!() };
                match q.pairer.push(cmd, data) {
                    Fused::Single(cmd, data) => self.start_io(cmd, data, ctx),
                    Fused::Waiting => {}
                    Fused::Pair { compare, write } => self.start_compare_and_write(compare, write, ctx),
                    Fused::Broken { failed, next } => {
                        for c in failed {
                            self.respond(c, &[]);
                        }
                        if let Some((cmd, data)) = next {
                            self.start_io(cmd, data, ctx);
                        }
                    }
                }
            }
        }
    }

    fn on_connect(&mut self, cmd: Command, data: IoBufMut, ctx: &mut Ctx) {
        let cid = cmd.cid();
        let req = match controller::parse_connect(&cmd, &data) {
            Ok(r) => r,
            Err(cqe) => {
                tracing::warn!(peer = %self.peer, "bad Connect: {}", cqe.status());
                return self.respond(cqe, &[]);
            }
        };
        let refuse = |this: &mut Conn, status, in_data, offset, why: String| {
            tracing::warn!(peer = %this.peer, host = %req.hostnqn, subsystem = %req.subnqn, "Connect refused: {why}");
            this.respond(controller::connect_error(cid, status, in_data, offset), &[]);
        };
        if req.subnqn == DISCOVERY_NQN {
            if req.qid != 0 {
                return refuse(self, Status::CONNECT_INVALID_PARAMETERS, false, 42, "discovery has no I/O queues".into());
            }
            let view = ctx.target.discovery.view_for(&req.hostnqn, &ctx.target.subsystems());
            let cntlid = ctx.target.next_discovery_cntlid();
            let ctrl = Controller::new(cntlid, &req, &view, ctx.now_ms);
            tracing::info!(peer = %self.peer, host = %req.hostnqn, cntlid, "discovery controller connected");
            self.role = Role::Admin(Box::new(AdminQueue {
                ctrl,
                remote_host: false,
                config_generation: 0,
                subsystem: None,
                discovery_view: Some(view),
            }));
            self.queue_size = req.queue_size;
            self.transport.set_connected(req.queue_size);
            return self.respond(Completion::new(cid, Status::SUCCESS).with_result(u64::from(cntlid)), &[]);
        }
        let ListenerKind::Subsystems(listener) = self.listener else {
            return refuse(self, Status::CONNECT_INVALID_PARAMETERS, true, connect_offset::SUBNQN, "discovery-only listener".into());
        };
        let Some(subsystem) = ctx.target.subsystem(&req.subnqn) else {
            return refuse(self, Status::CONNECT_INVALID_PARAMETERS, true, connect_offset::SUBNQN, "no such subsystem".into());
        };
        let refusal_status = |r: &ConnectRefusal| match r {
            ConnectRefusal::HostNotAllowed(_) => (Status::CONNECT_INVALID_HOST, true, connect_offset::HOSTNQN),
            ConnectRefusal::NoControllerId => (Status::CONNECT_CONTROLLER_BUSY, false, 0),
            ConnectRefusal::UnknownController { .. } => (Status::CONNECT_INVALID_PARAMETERS, true, connect_offset::CNTLID),
            ConnectRefusal::NotReady(_) => (Status::COMMAND_SEQUENCE_ERROR, false, 0),
        };
        self.queue_size = req.queue_size;
        self.qid = req.qid;
        self.sq_flow_disabled = req.sq_flow_disabled;
        if req.qid == 0 {
            let handle = match subsystem.add_controller(&req.hostnqn) {
                Ok(h) => h,
                Err(r) => {
                    let (s, d, o) = refusal_status(&r);
                    return refuse(self, s, d, o, r.to_string());
                }
            };
            let view = subsystem.view(listener);
            let mut ctrl = Controller::new(handle.cntlid, &req, &view, ctx.now_ms);
            ctrl.set_io_in_capsule(self.limits.io_in_capsule);
            tracing::info!(peer = %self.peer, host = %req.hostnqn, subsystem = %req.subnqn, cntlid = handle.cntlid, kato_ms = req.kato_ms, "controller created");
            let cntlid = handle.cntlid;
            let remote_host = ctx.target.config().host_is_remote(&req.hostnqn);
            let config_generation = ctx.target.config_generation();
            self.role = Role::Admin(Box::new(AdminQueue {
                ctrl,
                remote_host,
                config_generation,
                subsystem: Some((subsystem, handle)),
                discovery_view: None,
            }));
            self.transport.set_connected(req.queue_size);
            self.respond(Completion::new(cid, Status::SUCCESS).with_result(u64::from(cntlid)), &[]);
        } else {
            let handle = match subsystem.find_controller(req.cntlid, &req.hostnqn) {
                Ok(h) => h,
                Err(r) => {
                    let (s, d, o) = refusal_status(&r);
                    return refuse(self, s, d, o, r.to_string());
                }
            };
            if u64::from(req.qid) > handle.io_queues_granted.load(Ordering::Acquire) {
                return refuse(self, Status::CONNECT_INVALID_PARAMETERS, false, 42, format!("queue {} beyond those granted", req.qid));
            }
            tracing::debug!(peer = %self.peer, cntlid = handle.cntlid, qid = req.qid, "I/O queue connected");
            self.transport.set_in_capsule(self.limits.io_in_capsule);
            let generation = handle.generation.load(Ordering::Acquire);
            let cntlid = handle.cntlid;
            let cache = subsystem.io_cache(listener);
            self.role = Role::Io(IoQueue { subsystem, cache, handle, generation, pairer: FusePairer::default() });
            self.out.pool_limit = req.queue_size as usize;
            self.transport.set_connected(req.queue_size);
            self.respond(Completion::new(cid, Status::SUCCESS).with_result(u64::from(cntlid)), &[]);
        }
    }

    fn on_admin(&mut self, cmd: Command, data: IoBufMut, ctx: &mut Ctx) {
        let Role::Admin(q) = &mut self.role else { return };
        let outcome = match q.subsystem.clone() {
            Some((subsystem, handle)) => {
                let ListenerKind::Subsystems(listener) = self.listener else { return };
                let view = q.view_of(&subsystem, listener, ctx.target);
                let out = q.ctrl.handle_admin(&view, &subsystem.health(), &cmd, &data, ctx.now_ms);
                handle.ready.store(q.ctrl.is_ready(), Ordering::Release);
                handle.generation.store(q.ctrl.reset_generation(), Ordering::Release);
                handle.io_queues_granted.store(u64::from(q.ctrl.io_queues()), Ordering::Release);
                handle.write_cache.store(q.ctrl.write_cache(), Ordering::Release);
                out
            }
            None => {
                let view = q.discovery_view.as_ref().expect("discovery controllers keep a view");
                q.ctrl.handle_admin(view, &Default::default(), &cmd, &data, ctx.now_ms)
            }
        };
        let dropped = q.ctrl.take_dropped_commands();
        let shutdown = q.ctrl.take_shutdown_request();
        self.transport.forget_commands(dropped);
        match outcome {
            AdminOutcome::Complete(cqe, out) => {
                let len = out.len().min(cmd.sgl_len() as usize);
                self.respond(cqe, &out[..len]);
                if cmd.opcode() == admin::FABRICS && cmd.fctype() == fctype::DISCONNECT {
                    self.close_with("host disconnected the admin queue".into(), false);
                }
            }
            AdminOutcome::Held => {}
        }
        if shutdown {
            self.start_shutdown(ctx);
        }
    }

    /// CC.SHN: flushes every namespace's bdev; CSTS.SHST reads "processing" until all are done.
    fn start_shutdown(&mut self, ctx: &mut Ctx) {
        let Role::Admin(q) = &mut self.role else { return };
        let namespaces = match &q.subsystem {
            Some((subsystem, _)) => subsystem.namespaces(),
            None => Arc::new(Vec::new()),
        };
        if namespaces.is_empty() {
            return q.ctrl.shutdown_complete();
        }
        tracing::info!(peer = %self.peer, cntlid = q.ctrl.cntlid, "shutdown: flushing {} namespaces", namespaces.len());
        let slot = self.alloc(Inflight {
            cid: 0,
            kind: IoKind::Shutdown,
            remaining: namespaces.len() as u32,
            status: Status::SUCCESS,
            bytes: 0,
            data: Vec::new(),
            ns: None,
            start: ctx.now,
            flush_after: None,
        });
        for ns in namespaces.iter() {
            ns.stats.flushes.fetch_add(1, Ordering::Relaxed);
            self.submit(ns.bdev, slot, BdevOp::Flush, ctx);
        }
    }

    fn alloc(&mut self, f: Inflight) -> u32 {
        if let Some(st) = &f.ns {
            st.inflight.fetch_add(1, Ordering::Relaxed);
        }
        let slot = self.free_slots.pop().unwrap_or_else(|| {
            self.inflight.push(None);
            (self.inflight.len() - 1) as u32
        });
        self.inflight[slot as usize] = Some(f);
        slot
    }

    fn submit(&mut self, bdev: usize, slot: u32, op: BdevOp, ctx: &mut Ctx) {
        let tag = u64::from(self.token) << 32 | u64::from(slot);
        match ctx.channels.get(bdev, ctx.target, ctx.registry) {
            Ok(ch) => ch.submit(tag, op),
            Err(e) => self.channel_failed(bdev, slot, e, ctx),
        }
    }

    /// [`Conn::submit`] of a Read, offering `buf` for its data.
    fn submit_read(&mut self, bdev: usize, slot: u32, offset: u64, len: usize, buf: Vec<u8>, ctx: &mut Ctx) {
        let tag = u64::from(self.token) << 32 | u64::from(slot);
        match ctx.channels.get(bdev, ctx.target, ctx.registry) {
            Ok(ch) => ch.submit_read(tag, offset, len, buf),
            Err(e) => self.channel_failed(bdev, slot, e, ctx),
        }
    }

    fn channel_failed(&mut self, bdev: usize, slot: u32, e: io::Error, ctx: &mut Ctx) {
        tracing::error!("cannot open a channel to bdev {}: {e}", ctx.target.bdev(bdev).info().name);
        self.on_completion(slot, Err(BdevError::Io(e.to_string())), ctx);
    }

    fn start_io(&mut self, cmd: Command, data: IoBufMut, ctx: &mut Ctx) {
        let cid = cmd.cid();
        let ListenerKind::Subsystems(listener) = self.listener else { return };
        let Role::Io(q) = &mut self.role else { return };
        let write_cache = q.handle.write_cache.load(Ordering::Acquire);
        let view = q.cache.view(&q.subsystem, listener);
        let req = match decode_io(&view, &cmd, &data) {
            Ok(r) => r.under_write_cache(write_cache),
            Err(status) => return self.respond(Completion::new(cid, status), &[]),
        };
        // One lookup serves the bdev and the statistics. The view decode_io checked and the
        // namespace table may differ for an instant while a reload swaps them: then the
        // namespace is treated as gone.
        let table = q.cache.namespaces();
        let ns_found = table.iter().find(|n| n.info.nsid == cmd.nsid());
        if ns_found.is_none() && !matches!(req, IoRequest::Flush { .. } | IoRequest::Hint) {
            return self.respond(Completion::new(cid, Status::INVALID_NAMESPACE), &[]);
        }
        let ns_of = || ns_found.expect("checked above");
        // With the host's write cache off, writes without a FUA of their own are flushed.
        let durable = |ns: &crate::subsys::Namespace| (!write_cache && ns.info.volatile_cache).then_some(ns.bdev);
        let new = |kind, remaining, bytes| Inflight {
            cid,
            kind,
            remaining,
            status: Status::SUCCESS,
            bytes,
            data: Vec::new(),
            ns: ns_found.map(|n| n.stats.clone()),
            start: ctx.now,
            flush_after: None,
        };
        match req {
            IoRequest::Read { slba, blocks, .. } => {
                let ns = ns_of();
                let bs = u64::from(ns.info.block_size);
                let len = u64::from(blocks) * bs;
                let slot = self.alloc(new(IoKind::Read, 1, len));
                let buf = self.out.take_buffer();
                self.submit_read(ns.bdev, slot, slba * bs, len as usize, buf, ctx);
            }
            IoRequest::Write { slba, fua, .. } => {
                let ns = ns_of();
                let bs = u64::from(ns.info.block_size);
                let slot = self.alloc(new(IoKind::Write, 1, data.len() as u64));
                if fua {
                    ns.stats.fua_writes.fetch_add(1, Ordering::Relaxed);
                }
                self.submit(ns.bdev, slot, BdevOp::Write { offset: slba * bs, data: data.freeze(), fua }, ctx);
            }
            IoRequest::Compare { slba, .. } => {
                let ns = ns_of();
                let bs = u64::from(ns.info.block_size);
                let slot = self.alloc(new(IoKind::Compare, 1, 0));
                self.submit(ns.bdev, slot, BdevOp::Compare { offset: slba * bs, expected: data.to_vec() }, ctx);
            }
            IoRequest::WriteZeroes { slba, blocks, .. } => {
                let ns = ns_of();
                let bs = u64::from(ns.info.block_size);
                let slot = self.alloc(Inflight { flush_after: durable(ns), ..new(IoKind::Other, 1, 0) });
                self.submit(ns.bdev, slot, BdevOp::WriteZeroes { offset: slba * bs, len: u64::from(blocks) * bs }, ctx);
            }
            IoRequest::Deallocate { ranges, .. } => {
                let ns = ns_of();
                let bs = u64::from(ns.info.block_size);
                let ranges: Vec<_> = ranges.into_iter().filter(|r| r.1 > 0).collect();
                if ranges.is_empty() {
                    return self.respond(Completion::new(cid, Status::SUCCESS), &[]);
                }
                let slot = self.alloc(Inflight { flush_after: durable(ns), ..new(IoKind::Other, ranges.len() as u32, 0) });
                for (slba, blocks) in ranges {
                    self.submit(ns.bdev, slot, BdevOp::Deallocate { offset: slba * bs, len: u64::from(blocks) * bs }, ctx);
                }
            }
            IoRequest::Hint => self.respond(Completion::new(cid, Status::SUCCESS), &[]),
            IoRequest::Flush { nsid } => {
                let bdevs: Vec<usize> = table
                    .iter()
                    .filter(|n| (nsid == 0xffff_ffff || n.info.nsid == nsid) && n.info.volatile_cache)
                    .map(|n| n.bdev)
                    .collect();
                if bdevs.is_empty() {
                    return self.respond(Completion::new(cid, Status::SUCCESS), &[]);
                }
                let slot = self.alloc(new(IoKind::Other, bdevs.len() as u32, 0));
                for n in table.iter().filter(|n| bdevs.contains(&n.bdev) && (nsid == 0xffff_ffff || n.info.nsid == nsid)) {
                    n.stats.flushes.fetch_add(1, Ordering::Relaxed);
                }
                for b in bdevs {
                    self.submit(b, slot, BdevOp::Flush, ctx);
                }
            }
        }
    }

    fn start_compare_and_write(&mut self, compare: (Command, IoBufMut), write: (Command, IoBufMut), ctx: &mut Ctx) {
        let ListenerKind::Subsystems(listener) = self.listener else { return };
        let Role::Io(q) = &mut self.role else { return };
        let subsystem = q.subsystem.clone();
        let write_cache = q.handle.write_cache.load(Ordering::Acquire);
        let view = q.cache.view(&subsystem, listener);
        let (ccmd, cdata) = compare;
        let (wcmd, wdata) = write;
        if let Err(status) = decode_io(&view, &ccmd, &cdata).and_then(|_| decode_io(&view, &wcmd, &wdata)) {
            self.respond(Completion::new(ccmd.cid(), status), &[]);
            return self.respond(Completion::new(wcmd.cid(), Status::FUSED_FAILED), &[]);
        }
        let Some(ns) = subsystem.namespace(ccmd.nsid()) else {
            self.respond(Completion::new(ccmd.cid(), Status::INVALID_NAMESPACE), &[]);
            return self.respond(Completion::new(wcmd.cid(), Status::FUSED_FAILED), &[]);
        };
        let offset = ccmd.slba() * u64::from(ns.info.block_size);
        let bytes = wdata.len() as u64;
        let slot = self.alloc(Inflight {
            cid: ccmd.cid(),
            kind: IoKind::CompareAndWrite { write_cid: wcmd.cid() },
            remaining: 1,
            status: Status::SUCCESS,
            bytes,
            data: Vec::new(),
            ns: Some(ns.stats.clone()),
            start: ctx.now,
            // Compare and Write has no FUA of its own: with the cache off it is flushed.
            flush_after: (!write_cache && ns.info.volatile_cache).then_some(ns.bdev),
        });
        self.submit(ns.bdev, slot, BdevOp::CompareAndWrite { offset, expected: cdata.to_vec(), data: wdata.to_vec() }, ctx);
    }

    pub fn on_completion(&mut self, slot: u32, result: Result<BdevOutput, BdevError>, ctx: &mut Ctx) {
        let Some(Some(f)) = self.inflight.get_mut(slot as usize) else { return };
        match result {
            Ok(BdevOutput::Data(d)) => f.data = d,
            Ok(BdevOutput::Done) => {}
            Ok(BdevOutput::Miscompare) => f.status = Status::COMPARE_FAILURE,
            Err(e) => {
                let status = match (&e, &f.kind) {
                    (BdevError::OutOfRange { .. }, _) => Status::LBA_OUT_OF_RANGE,
                    (BdevError::NoSpace, _) => Status::CAPACITY_EXCEEDED,
                    (BdevError::Fenced, _) => Status::ANA_INACCESSIBLE,
                    (BdevError::Transition, _) => Status::ANA_TRANSITION,
                    (BdevError::Io(_), IoKind::Read | IoKind::Compare) => Status::UNRECOVERED_READ_ERROR,
                    (BdevError::Io(_), _) => Status::WRITE_FAULT,
                };
                tracing::error!(peer = %self.peer, cid = f.cid, "I/O failed: {e}");
                f.status = status;
            }
        }
        f.remaining -= 1;
        if f.remaining > 0 {
            return;
        }
        if let Some(bdev) = f.flush_after.take().filter(|_| f.status.is_success()) {
            // Durable before it completes: the flush finishes this command.
            f.remaining = 1;
            if let Some(st) = &f.ns {
                st.flushes.fetch_add(1, Ordering::Relaxed);
            }
            return self.submit(bdev, slot, BdevOp::Flush, ctx);
        }
        let f = self.inflight[slot as usize].take().expect("present");
        self.free_slots.push(slot);
        if let Some(st) = &f.ns {
            st.inflight.fetch_sub(1, Ordering::Relaxed);
            if !matches!(f.kind, IoKind::Other) {
                let write = matches!(f.kind, IoKind::Write | IoKind::CompareAndWrite { .. });
                st.record(write, f.bytes, f.status.is_success(), ctx.now.saturating_duration_since(f.start));
            }
        }
        if let Role::Io(q) = &self.role {
            let h = &q.subsystem.health;
            if f.status.is_success() {
                match f.kind {
                    IoKind::Read => {
                        h.read_commands.fetch_add(1, Ordering::Relaxed);
                        h.bytes_read.fetch_add(f.bytes, Ordering::Relaxed);
                    }
                    IoKind::Write | IoKind::CompareAndWrite { .. } => {
                        h.write_commands.fetch_add(1, Ordering::Relaxed);
                        h.bytes_written.fetch_add(f.bytes, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        }
        match f.kind {
            IoKind::Shutdown => {
                let Role::Admin(q) = &mut self.role else { return };
                if f.status.is_success() {
                    q.ctrl.shutdown_complete();
                    tracing::info!(peer = %self.peer, cntlid = q.ctrl.cntlid, "shutdown complete");
                } else {
                    // Not reported complete: the host must not take its data for durable.
                    tracing::error!(peer = %self.peer, cntlid = q.ctrl.cntlid, "shutdown: a namespace flush failed; CSTS.SHST stays at processing");
                }
            }
            IoKind::CompareAndWrite { write_cid } => {
                let write_status = if f.status.is_success() { Status::SUCCESS } else { Status::FUSED_FAILED };
                self.respond(Completion::new(f.cid, f.status), &[]);
                self.respond(Completion::new(write_cid, write_status), &[]);
            }
            _ if f.status.is_success() && !f.data.is_empty() => self.respond_data(Completion::new(f.cid, f.status), f.data),
            _ => self.respond(Completion::new(f.cid, f.status), &[]),
        }
    }

    /// Periodic work: keep-alive, asynchronous events, and noticing a dead controller.
    pub fn on_tick(&mut self, ctx: &mut Ctx) {
        let mut aens = Vec::new();
        match &mut self.role {
            Role::Admin(q) => {
                if q.ctrl.keep_alive_expired(ctx.now_ms) {
                    tracing::warn!(peer = %self.peer, host = %q.ctrl.hostnqn, cntlid = q.ctrl.cntlid, "keep-alive timeout ({} ms); dropping controller", q.ctrl.kato_ms());
                    self.close_with("keep-alive timeout".into(), true);
                    return;
                }
                match (q.subsystem.clone(), &mut q.discovery_view) {
                    (Some((subsystem, _)), _) => {
                        if let ListenerKind::Subsystems(listener) = self.listener {
                            let view = q.view_of(&subsystem, listener, ctx.target);
                            aens = q.ctrl.poll_events(&view);
                        }
                    }
                    (None, Some(view)) => {
                        if ctx.target.discovery.genctr() != view.discovery_genctr {
                            *view = ctx.target.discovery.view_for(&q.ctrl.hostnqn, &ctx.target.subsystems());
                        }
                        aens = q.ctrl.poll_events(view);
                    }
                    (None, None) => {}
                }
            }
            Role::Io(q) => {
                if !q.handle.alive.load(Ordering::Acquire) || q.handle.generation.load(Ordering::Acquire) != q.generation {
                    let why = format!("controller {} went away", q.handle.cntlid);
                    self.close_with(why, true);
                }
            }
            Role::Unconnected => {}
        }
        for cqe in aens {
            self.respond(cqe, &[]);
        }
    }

    /// Reading was paused for backpressure and the send buffer is below the limit again: the
    /// reactor must call [`Conn::on_readable`] (the socket will not signal the unread bytes again).
    pub fn should_resume_reading(&self) -> bool {
        self.read_paused && self.closing.is_none() && self.out.len() < OUTBOX_LIMIT
    }

    /// Sends as much of the send buffer as the socket takes.
    pub fn flush(&mut self) {
        if let Err(e) = self.out.flush(&mut self.sock) {
            self.close_with(format!("write error: {e}"), true);
            self.out.clear();
        }
    }

    /// Whether the connection should be torn down now.
    pub fn finished(&self) -> bool {
        self.closing.is_some() && (self.fatal || self.out.is_empty())
    }

    /// Releases what the connection holds: its controller, if it was the admin queue.
    pub fn close(&mut self, _target: &Target) {
        let reason = self.closing.take().unwrap_or_else(|| "target stopping".into());
        match &self.role {
            Role::Admin(q) => {
                if let Some((subsystem, handle)) = &q.subsystem {
                    subsystem.remove_controller(handle);
                    tracing::info!(peer = %self.peer, cntlid = handle.cntlid, "controller removed: {reason}");
                } else {
                    tracing::debug!(peer = %self.peer, "discovery controller closed: {reason}");
                }
            }
            Role::Io(q) => tracing::debug!(peer = %self.peer, cntlid = q.handle.cntlid, qid = self.qid, "I/O queue closed: {reason}"),
            Role::Unconnected => tracing::debug!(peer = %self.peer, "connection closed before Connect: {reason}"),
        }
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
    }
}
