//! One NVMe-oF queue on its reactor: Connect, then either the admin controller or an I/O queue
//! whose commands become bdev operations. The queue logic is the same for every transport; what
//! carries the capsules is its [`Wire`]: NVMe/TCP ([`tcp`]: PDUs through the sans-IO transport,
//! responses batched into one writev per flush) or, with the `rdma` feature, NVMe/RDMA
//! ([`rdma`]: capsules by SEND/RECV, host data by RDMA READ and WRITE).
//!
//! This module holds the connection's state and its side of the wire (reading, responding,
//! flushing, closing); a queue's Connect is in `connect`, admin commands, shutdown and the
//! periodic tick in `admin_queue`, I/O commands and their completions in `io_queue`.

use crate::reactor::Channels;
use crate::subsys::{ControllerHandle, IoCache, Subsystem};
use crate::Target;
use mio::net::TcpStream;
use nvmetro_bdev::{IoBuf, IoBufMut, IoBufPool};
use nvmetro_proto::controller::{Controller, FusePairer, Fused};
use nvmetro_proto::nvme::{admin, fctype, Command, Completion, Status};
use nvmetro_proto::subsystem::SubsystemView;
use nvmetro_proto::tcp::{DataBuffers, TargetEvent};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use tcp::{ReadStep, TcpWire};

mod admin_queue;
mod connect;
mod io_queue;
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
    /// A read's data in a buffer the transport sends from uncopied (registered RDMA memory).
    buffer: IoBuf,
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
    /// NVMe/RDMA I/O queue pairs register a pool that host data lands in and leaves from uncopied.
    pub rdma_zero_copy: bool,
}

impl ConnLimits {
    /// What `[target]` of `cfg` offers a connection accepted now.
    pub fn of(cfg: &nvmetro_conf::Config) -> ConnLimits {
        ConnLimits { io_in_capsule: cfg.in_capsule_data_size, maxh2cdata: cfg.max_h2c_data_size, rdma_zero_copy: cfg.rdma_zero_copy }
    }
}

/// What carries a queue's capsules.
// One wire per connection, held in place in its Conn: a box would cost every TCP command an
// indirection to save a few hundred bytes per connection.
#[allow(clippy::large_enum_variant)]
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

    /// Responds with read data in a buffer of the wire's registered pool (sent uncopied).
    fn respond_buffer(&mut self, mut cqe: Completion, data: IoBuf) {
        cqe.sqid = self.qid;
        cqe.sqhd = self.sqhd as u16;
        match &mut self.wire {
            Wire::Tcp(w) => w.respond_owned(&cqe, data.to_vec(), self.sq_flow_disabled),
            #[cfg(feature = "rdma")]
            Wire::Rdma(w) => w.respond_registered(&cqe, data),
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
