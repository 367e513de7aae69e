//! One NVMe-oF queue on its reactor: Connect, then either the admin controller or an I/O queue
//! whose commands become bdev operations. The queue logic is the same for every transport; what
//! carries the capsules is its [`Wire`]: NVMe/TCP ([`tcp`]: PDUs through the sans-IO transport,
//! responses batched into one writev per flush) or, with the `rdma` feature, NVMe/RDMA
//! ([`rdma`]: capsules by SEND/RECV, host data by RDMA READ and WRITE).

use crate::reactor::Channels;
use crate::subsys::{ConnectRefusal, ControllerHandle, IoCache, Subsystem};
use crate::Target;
use mio::net::TcpStream;
use nvmetro_bdev::{BdevError, BdevOp, BdevOutput};
use nvmetro_bdev::{IoBufMut, IoBufPool};
use nvmetro_proto::controller::{self, connect_offset, decode_io, AdminOutcome, Controller, FusePairer, Fused, IoRequest};
use nvmetro_proto::nvme::{admin, fctype, Command, Completion, Status};
use nvmetro_proto::subsystem::{SubsystemView, DISCOVERY_NQN};
use nvmetro_proto::tcp::{DataBuffers, TargetEvent};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;
use tcp::{ReadStep, TcpWire};

#[cfg(feature = "rdma")]
pub mod rdma;
mod tcp;

pub use tcp::OUTBOX_LIMIT;

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

/// What carries a queue's capsules.
enum Wire {
    Tcp(TcpWire),
    #[cfg(feature = "rdma")]
    Rdma(rdma::RdmaWire),
}

impl Wire {
    fn tcp(&mut self) -> Option<&mut TcpWire> {
        match self {
            Wire::Tcp(w) => Some(w),
            #[cfg(feature = "rdma")]
            Wire::Rdma(_) => None,
        }
    }
}

pub struct Conn {
    limits: ConnLimits,
    token: u32,
    peer: SocketAddr,
    listener: ListenerKind,
    wire: Wire,
    role: Role,
    /// The host disabled SQ flow control at Connect: reads may end with C2HData SUCCESS.
    sq_flow_disabled: bool,
    qid: u16,
    queue_size: u32,
    sqhd: u32,
    inflight: Vec<Option<Inflight>>,
    free_slots: Vec<u32>,
    /// Set when the connection must end once its send buffer is out (or at once if fatal).
    closing: Option<String>,
    fatal: bool,
}

/// Host data of one queue lands in buffers from the queue's own pool (SPDK's request pool per
/// queue pair: it grows to the queue's depth and no further), shared from there with the bdev.
#[derive(Debug)]
pub(crate) struct QueueBuffers(IoBufPool);

impl DataBuffers for QueueBuffers {
    type Buf = IoBufMut;
    fn buffer(&mut self, len: usize) -> IoBufMut {
        self.0.take(len)
    }
}

impl Conn {
    /// A connection accepted on an NVMe/TCP listener.
    pub fn new(token: u32, sock: TcpStream, peer: SocketAddr, listener: ListenerKind, conn_limits: ConnLimits) -> Conn {
        let wire = Wire::Tcp(TcpWire::new(sock, conn_limits.maxh2cdata));
        Conn::with_wire(token, wire, peer, listener, conn_limits)
    }

    fn with_wire(token: u32, wire: Wire, peer: SocketAddr, listener: ListenerKind, limits: ConnLimits) -> Conn {
        Conn {
            limits,
            token,
            peer,
            listener,
            wire,
            role: Role::Unconnected,
            sq_flow_disabled: false,
            qid: 0,
            queue_size: 32,
            sqhd: 0,
            inflight: Vec::new(),
            free_slots: Vec::new(),
            closing: None,
            fatal: false,
        }
    }

    /// A queue pair accepted on an NVMe/RDMA listener.
    #[cfg(feature = "rdma")]
    pub fn rdma(token: u32, wire: rdma::RdmaWire, peer: SocketAddr, listener: ListenerKind, limits: ConnLimits) -> Conn {
        Conn::with_wire(token, Wire::Rdma(wire), peer, listener, limits)
    }

    /// The RDMA queue pair's wire, for a connection over RDMA.
    #[cfg(feature = "rdma")]
    pub fn rdma_wire(&mut self) -> Option<&mut rdma::RdmaWire> {
        match &mut self.wire {
            Wire::Rdma(w) => Some(w),
            Wire::Tcp(_) => None,
        }
    }

    /// Handles the RDMA queue pair's work completions: commands whose data arrived run, sent
    /// completions free their slots. Returns whether there were any.
    #[cfg(feature = "rdma")]
    pub fn on_rdma_completions(&mut self, ctx: &mut Ctx) -> bool {
        let Wire::Rdma(w) = &mut self.wire else { return false };
        let n = w.poll();
        let mut events = std::mem::take(&mut w.events);
        if self.closing.is_none() {
            self.dispatch(&mut events, ctx);
        }
        events.clear();
        if let Wire::Rdma(w) = &mut self.wire {
            w.events = events;
            if let Some(why) = w.failed.clone() {
                self.close_with(why, true);
            }
        }
        n > 0
    }

    /// The socket to (de)register with the reactor's poll, for a TCP connection.
    pub fn socket(&mut self) -> Option<&mut TcpStream> {
        match &mut self.wire {
            Wire::Tcp(w) => Some(w.socket()),
            #[cfg(feature = "rdma")]
            Wire::Rdma(_) => None,
        }
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
    /// `read_closed`: the readiness event said the host closed its side (or the socket failed).
    pub fn on_readable(&mut self, ctx: &mut Ctx, read_closed: bool) {
        loop {
            if self.closing.is_some() {
                // Ending: nothing more the host sends is acted on (after a TermReq in particular).
                return;
            }
            let Some(w) = self.wire.tcp() else { return };
            let step = w.read_some(self.peer, self.qid, read_closed);
            let mut events = std::mem::take(&mut w.events);
            self.dispatch(&mut events, ctx);
            if let Some(w) = self.wire.tcp() {
                w.events = events;
            }
            match step {
                ReadStep::Received { more: true } => {}
                ReadStep::Received { more: false } | ReadStep::Stop => return,
                ReadStep::Close(why, fatal) => return self.close_with(why, fatal),
            }
        }
    }

    /// Handles what the transport made of the host's capsules.
    fn dispatch(&mut self, events: &mut Vec<TargetEvent<IoBufMut>>, ctx: &mut Ctx) {
        for ev in events.drain(..) {
            match ev {
                TargetEvent::Reject(cqe) => self.respond(cqe, &[]),
                TargetEvent::Command { cmd, data } => self.on_command(cmd, data, ctx),
            }
        }
    }

    fn respond(&mut self, mut cqe: Completion, data: &[u8]) {
        cqe.sqid = self.qid;
        cqe.sqhd = self.sqhd as u16;
        match &mut self.wire {
            Wire::Tcp(w) => w.respond(&cqe, data),
            #[cfg(feature = "rdma")]
            Wire::Rdma(w) => w.respond(&cqe, data),
        }
    }

    /// Responds with read data handed over whole (sent from its own buffer).
    fn respond_data(&mut self, mut cqe: Completion, data: Vec<u8>) {
        cqe.sqid = self.qid;
        cqe.sqhd = self.sqhd as u16;
        match &mut self.wire {
            Wire::Tcp(w) => w.respond_owned(&cqe, data, self.sq_flow_disabled),
            #[cfg(feature = "rdma")]
            Wire::Rdma(w) => w.respond_owned(&cqe, data),
        }
    }

    /// The queue is connected: `io_in_capsule` for an I/O queue.
    fn wire_connected(&mut self, queue_size: u32, io_in_capsule: Option<usize>) {
        match &mut self.wire {
            Wire::Tcp(w) => w.connected(queue_size, io_in_capsule),
            #[cfg(feature = "rdma")]
            Wire::Rdma(w) => w.connected(queue_size),
        }
    }

    fn is_rdma(&self) -> bool {
        !matches!(self.wire, Wire::Tcp(_))
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
            let mut ctrl = Controller::new(cntlid, &req, &view, ctx.now_ms);
            ctrl.set_keyed_sgls(self.is_rdma());
            tracing::info!(peer = %self.peer, host = %req.hostnqn, cntlid, "discovery controller connected");
            self.role = Role::Admin(Box::new(AdminQueue {
                ctrl,
                remote_host: false,
                config_generation: 0,
                subsystem: None,
                discovery_view: Some(view),
            }));
            self.queue_size = req.queue_size;
            self.wire_connected(req.queue_size, None);
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
        #[cfg(feature = "rdma")]
        if let Wire::Rdma(w) = &self.wire {
            if w.cm_qid != req.qid {
                let why = format!("Connect names queue {} but the RDMA connection was made for queue {}", req.qid, w.cm_qid);
                return refuse(self, Status::CONNECT_INVALID_PARAMETERS, false, 42, why);
            }
        }
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
            ctrl.set_keyed_sgls(self.is_rdma());
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
            self.wire_connected(req.queue_size, None);
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
            let generation = handle.generation.load(Ordering::Acquire);
            let cntlid = handle.cntlid;
            let cache = subsystem.io_cache(listener);
            self.role = Role::Io(IoQueue { subsystem, cache, handle, generation, pairer: FusePairer::default() });
            self.wire_connected(req.queue_size, Some(self.limits.io_in_capsule));
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
        if let Some(w) = self.wire.tcp() {
            w.forget_commands(dropped);
        }
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
                let buf = match &mut self.wire {
                    Wire::Tcp(w) => w.take_read_buffer(),
                    #[cfg(feature = "rdma")]
                    Wire::Rdma(w) => w.take_read_buffer(),
                };
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
        self.closing.is_none() && matches!(&self.wire, Wire::Tcp(w) if w.should_resume_reading())
    }

    /// Sends what the turn queued: one writev of the outbox (TCP); the posted work requests'
    /// doorbell (RDMA).
    pub fn flush(&mut self) {
        let result = match &mut self.wire {
            Wire::Tcp(w) => w.flush().map_err(|e| format!("write error: {e}")),
            #[cfg(feature = "rdma")]
            Wire::Rdma(w) => w.flush(),
        };
        if let Err(why) = result {
            self.close_with(why, true);
        }
    }

    /// Whether the connection should be torn down now.
    pub fn finished(&self) -> bool {
        let drained = match &self.wire {
            Wire::Tcp(w) => w.drained(),
            #[cfg(feature = "rdma")]
            Wire::Rdma(w) => w.drained(),
        };
        self.closing.is_some() && (self.fatal || drained)
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
        match &mut self.wire {
            Wire::Tcp(w) => w.shutdown(),
            #[cfg(feature = "rdma")]
            Wire::Rdma(w) => w.shutdown(),
        }
    }
}
