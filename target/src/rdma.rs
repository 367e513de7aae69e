//! NVMe/RDMA listeners on a reactor (cargo feature `rdma`): the rdma_cm listener, connect
//! requests checked against the host's private data and accepted with a queue pair
//! ([`RdmaWire`]), and the descriptors that wake a parked reactor: each listener's rdma_cm
//! event channel and one completion channel per RDMA device, shared by the queue pairs' CQs.
//!
//! Connect requests are checked on the listener's reactor and handed out round-robin, as TCP
//! connections are: the serving reactor moves the rdma_cm id to its own event channel
//! (rdma_migrate_id), so that the connection's later events (established, disconnected) reach
//! it, and creates the queue pair on its own completion channel (SPDK's poll groups).

use crate::conn::rdma::RdmaWire;
use crate::conn::ListenerKind;
use nvmetro_ffi::rdma::{CmEvent, CmHandle, CmId, CompletionChannel, CqHandle, Device, EventChannel, ProtectionDomain};
use nvmetro_proto::identify;
use nvmetro_proto::rdma::{ConnectRequest, Reject, RejectStatus};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

/// A bound rdma_cm listener.
pub struct RdmaListener {
    /// Held so that it keeps listening (its events arrive on `channel`).
    _id: CmId,
    channel: Arc<EventChannel>,
    pub address: SocketAddr,
}

impl RdmaListener {
    /// Listens on `address`; fails with a message saying how to get an RDMA device when the
    /// address has none.
    pub fn bind(address: SocketAddr) -> anyhow::Result<RdmaListener> {
        let listen = || {
            let channel = EventChannel::new()?;
            let id = CmId::new(&channel)?;
            id.set_reuse_addr(true)?;
            id.listen(address, 1024)?;
            Ok::<_, nvmetro_ffi::rdma::RdmaError>((id, channel))
        };
        let (id, channel) = listen().map_err(|e| anyhow::anyhow!("cannot listen for NVMe/RDMA on {address}: {e}"))?;
        let address = id.local_addr().unwrap_or(address);
        Ok(RdmaListener { _id: id, channel, address })
    }

    pub fn fd(&self) -> RawFd {
        self.channel.fd().as_raw_fd()
    }
}

/// A protection domain and completion channel per device the reactor's queue pairs are on.
struct Port {
    device: Device,
    pd: Arc<ProtectionDomain>,
    channel: Arc<CompletionChannel>,
}

/// A checked connect request, to be accepted by the reactor that will serve it.
pub struct Handoff {
    id: CmId,
    req: ConnectRequest,
    pub kind: ListenerKind,
}

/// Where rdma_cm events are read from.
#[derive(Debug, Clone, Copy)]
pub enum CmSource {
    Listener(usize),
    /// The reactor's own channel, of the connections handed to it.
    Own,
}

/// What happened on an event channel.
pub enum CmOutcome {
    /// A connect request whose private data is good: accept it here or hand it to another
    /// reactor ([`RdmaReactor::accept`]).
    Request(Handoff),
    /// The connection with this token ended (the host disconnected, the device went away).
    Ended(u32, &'static str),
}

/// A reactor's RDMA state.
#[derive(Default)]
pub struct RdmaReactor {
    listeners: Vec<Option<(RdmaListener, ListenerKind)>>,
    own: Option<Arc<EventChannel>>,
    devices: Option<Vec<Device>>,
    ports: Vec<Port>,
    by_id: HashMap<CmHandle, u32>,
    by_cq: HashMap<CqHandle, u32>,
    /// The RDMA connections, polled every turn.
    pub tokens: Vec<u32>,
}

impl RdmaReactor {
    /// Adds a listener; returns its index (its token offset).
    pub fn add_listener(&mut self, l: RdmaListener, kind: ListenerKind) -> usize {
        self.listeners.push(Some((l, kind)));
        self.listeners.len() - 1
    }

    /// Removes the listener on `address`; returns its descriptor to deregister.
    pub fn remove_listener(&mut self, address: SocketAddr) -> Option<RawFd> {
        let slot = self.listeners.iter_mut().find(|l| l.as_ref().is_some_and(|(l, _)| l.address == address))?;
        slot.take().map(|(l, _)| l.fd())
    }

    pub fn completion_fd(&self, port: usize) -> Option<RawFd> {
        self.ports.get(port).map(|p| p.channel.fd().as_raw_fd())
    }

    /// The connection tokens whose CQs reported completions on device `port`'s channel; each
    /// such CQ is disarmed until its wire arms it again.
    pub fn completion_events(&mut self, port: usize) -> Vec<u32> {
        let mut tokens = Vec::new();
        let Some(p) = self.ports.get(port) else { return tokens };
        let by_cq = &self.by_cq;
        if let Err(e) = p.channel.take_events(|cq| tokens.extend(by_cq.get(&cq))) {
            tracing::warn!(device = p.device.name(), "reading the completion channel: {e}");
        }
        tokens
    }

    /// The reactor's own event channel, made on first use (`register` gets its descriptor).
    pub fn own_channel(&mut self, register: impl FnOnce(RawFd)) -> Result<Arc<EventChannel>, String> {
        if let Some(ch) = &self.own {
            return Ok(ch.clone());
        }
        let ch = EventChannel::new().map_err(|e| e.to_string())?;
        register(ch.fd().as_raw_fd());
        self.own = Some(ch.clone());
        Ok(ch)
    }

    /// Takes the events of `source`: good connect requests are returned to be placed, bad ones
    /// rejected here; ends are reported by token.
    pub fn cm_events(&mut self, source: CmSource) -> Vec<CmOutcome> {
        let mut out = Vec::new();
        loop {
            let (channel, kind) = match source {
                CmSource::Listener(i) => match self.listeners.get(i) {
                    Some(Some((l, kind))) => (l.channel.clone(), Some(*kind)),
                    _ => return out,
                },
                CmSource::Own => match &self.own {
                    Some(ch) => (ch.clone(), None),
                    None => return out,
                },
            };
            let ev = match channel.get_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => return out,
                Err(e) => {
                    tracing::warn!(?source, "rdma_cm event channel: {e}");
                    return out;
                }
            };
            use nvmetro_ffi::rdma::CmEventKind as K;
            match (ev.kind, kind) {
                (K::ConnectRequest, Some(kind)) => out.extend(check(ev).map(|(id, req)| CmOutcome::Request(Handoff { id, req, kind }))),
                (K::Established, _) => tracing::debug!(token = ?self.by_id.get(&ev.id), "RDMA connection established"),
                (K::Disconnected, _) => out.extend(self.by_id.get(&ev.id).map(|&t| CmOutcome::Ended(t, "host disconnected (RDMA)"))),
                (K::DeviceRemoval, _) => out.extend(self.by_id.get(&ev.id).map(|&t| CmOutcome::Ended(t, "RDMA device removed"))),
                _ => {}
            }
        }
    }

    /// Accepts a checked connect request on this reactor: `migrate` when it arrived on another
    /// reactor's listener (the id moves to this reactor's channel, made through `register_cm`).
    /// Returns the wire and the host's address, or None (refused, and logged).
    pub fn accept(
        &mut self,
        h: Handoff,
        migrate: bool,
        limits: crate::conn::ConnLimits,
        token: u32,
        stats: &Arc<crate::reactor::RdmaDataStats>,
        register_cm: impl FnOnce(RawFd),
        register_port: impl FnOnce(usize, RawFd),
    ) -> Option<(Box<RdmaWire>, SocketAddr)> {
        let Handoff { mut id, req, .. } = h;
        let peer = peer_of(&id);
        let refuse = |id: &CmId, why: String| {
            tracing::warn!(%peer, qid = req.qid, "NVMe/RDMA connect refused: {why}");
            let _ = id.reject(&Reject(RejectStatus::NoResources).encode());
        };
        if migrate {
            let moved = self.own_channel(register_cm).and_then(|ch| id.migrate(&ch).map_err(|e| e.to_string()));
            if let Err(e) = moved {
                refuse(&id, format!("cannot move the connection to this reactor: {e}"));
                return None;
            }
        }
        let port = match self.port_for(&id, register_port) {
            Ok(p) => p,
            Err(e) => {
                refuse(&id, e);
                return None;
            }
        };
        let in_capsule = if req.qid == 0 { identify::ADMIN_IN_CAPSULE } else { limits.io_in_capsule };
        let zero_copy = req.qid > 0 && limits.rdma_zero_copy;
        let depth = req.target_recv_depth();
        let p = &self.ports[port];
        match RdmaWire::accept(id, &p.pd, &p.channel, req.qid, depth, in_capsule, zero_copy, peer, stats.clone()) {
            Ok(w) => {
                tracing::debug!(%peer, qid = req.qid, depth, device = p.device.name(), "NVMe/RDMA queue pair accepted");
                self.by_id.insert(w.cm_handle(), token);
                self.by_cq.insert(w.cq().handle(), token);
                self.tokens.push(token);
                Some((Box::new(w), peer))
            }
            Err(e) => {
                tracing::warn!(%peer, qid = req.qid, "NVMe/RDMA connect refused: cannot set up the queue pair: {e}");
                None
            }
        }
    }

    /// The port of the device `id` is on, made the first time (its completion channel is
    /// registered through `register_port`).
    fn port_for(&mut self, id: &CmId, register_port: impl FnOnce(usize, RawFd)) -> Result<usize, String> {
        if let Some(i) = self.ports.iter().position(|p| id.is_on(&p.device)) {
            return Ok(i);
        }
        if self.devices.is_none() {
            self.devices = Some(Device::list().map_err(|e| e.to_string())?);
        }
        let devices = self.devices.as_ref().expect("listed above");
        let device = id.device_in(devices).ok_or("the connection is on an RDMA device this process did not list")?.clone();
        let pd = ProtectionDomain::new(&device).map_err(|e| e.to_string())?;
        let channel = CompletionChannel::new(&device).map_err(|e| e.to_string())?;
        self.ports.push(Port { device, pd, channel });
        let i = self.ports.len() - 1;
        register_port(i, self.ports[i].channel.fd().as_raw_fd());
        Ok(i)
    }

    /// Forgets a connection that was torn down.
    pub fn forget(&mut self, token: u32, wire: &RdmaWire) {
        self.by_id.remove(&wire.cm_handle());
        self.by_cq.remove(&wire.cq().handle());
        self.tokens.retain(|&t| t != token);
    }
}

fn peer_of(id: &CmId) -> SocketAddr {
    id.peer_addr().unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// Checks a connect request's private data; refuses it (with the NVMe/RDMA status) if bad.
fn check(ev: CmEvent) -> Option<(CmId, ConnectRequest)> {
    let id = ev.request?;
    match ConnectRequest::parse(&ev.private_data) {
        Ok(req) => Some((id, req)),
        Err(status) => {
            let shown = &ev.private_data[..ev.private_data.len().min(32)];
            tracing::warn!(peer = %peer_of(&id), "NVMe/RDMA connect refused ({status}): private data {shown:02x?}");
            let _ = id.reject(&Reject(status).encode());
            None
        }
    }
}
