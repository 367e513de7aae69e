//! NVMe/RDMA listeners on a reactor (cargo feature `rdma`): the rdma_cm listener, connect
//! requests checked against the host's private data and accepted with a queue pair
//! ([`RdmaWire`]), and the descriptors that wake a parked reactor: each listener's rdma_cm
//! event channel and one completion channel per RDMA device, shared by the queue pairs' CQs.
//!
//! A listener's queue pairs are served by the reactor that holds the listener: rdma_cm reports
//! every event of a connection on its listener's channel, and moving a connection to another
//! reactor's channel (rdma_migrate_id) is not done yet.

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

/// What happened on a listener's event channel.
pub enum CmOutcome {
    /// A queue pair to serve, under `token`.
    Accepted { wire: Box<RdmaWire>, peer: SocketAddr, token: u32, kind: ListenerKind },
    /// The connection with this token ended (the host disconnected, the device went away).
    Ended(u32, &'static str),
}

/// A reactor's RDMA state.
#[derive(Default)]
pub struct RdmaReactor {
    listeners: Vec<Option<(RdmaListener, ListenerKind)>>,
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

    /// Takes the events of listener `index`: connect requests are checked and accepted (with
    /// `register_port` called for a device seen for the first time, with its index), ends are
    /// reported by token. `next_token` hands out the accepted connections' tokens.
    pub fn cm_events(
        &mut self,
        index: usize,
        io_in_capsule: usize,
        mut next_token: impl FnMut() -> u32,
        mut register_port: impl FnMut(usize, RawFd),
    ) -> Vec<CmOutcome> {
        let mut out = Vec::new();
        loop {
            let Some(Some((l, kind))) = self.listeners.get(index) else { return out };
            let kind = *kind;
            let ev = match l.channel.get_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => return out,
                Err(e) => {
                    tracing::warn!(address = %l.address, "rdma_cm event channel: {e}");
                    return out;
                }
            };
            use nvmetro_ffi::rdma::CmEventKind as K;
            match ev.kind {
                K::ConnectRequest => {
                    if let Some((wire, peer)) = self.accept(ev, io_in_capsule, &mut register_port) {
                        let token = next_token();
                        self.by_id.insert(wire.cm_handle(), token);
                        self.by_cq.insert(wire.cq().handle(), token);
                        self.tokens.push(token);
                        out.push(CmOutcome::Accepted { wire, peer, token, kind });
                    }
                }
                K::Established => {
                    tracing::debug!(token = ?self.by_id.get(&ev.id), "RDMA connection established");
                }
                K::Disconnected => {
                    if let Some(&t) = self.by_id.get(&ev.id) {
                        out.push(CmOutcome::Ended(t, "host disconnected (RDMA)"));
                    }
                }
                K::DeviceRemoval => {
                    if let Some(&t) = self.by_id.get(&ev.id) {
                        out.push(CmOutcome::Ended(t, "RDMA device removed"));
                    }
                }
                _ => {}
            }
        }
    }

    fn accept(
        &mut self,
        ev: CmEvent,
        io_in_capsule: usize,
        register_port: &mut impl FnMut(usize, RawFd),
    ) -> Option<(Box<RdmaWire>, SocketAddr)> {
        let id = ev.request?;
        let peer = id.peer_addr().unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let reject = |id: &CmId, status: RejectStatus, why: String| {
            tracing::warn!(%peer, "NVMe/RDMA connect refused ({status}): {why}");
            let _ = id.reject(&Reject(status).encode());
        };
        let req = match ConnectRequest::parse(&ev.private_data) {
            Ok(r) => r,
            Err(status) => {
                reject(&id, status, format!("private data {:02x?}", &ev.private_data[..ev.private_data.len().min(32)]));
                return None;
            }
        };
        let port = match self.port_for(&id, register_port) {
            Ok(p) => p,
            Err(e) => {
                reject(&id, RejectStatus::NoResources, e);
                return None;
            }
        };
        let in_capsule = if req.qid == 0 { identify::ADMIN_IN_CAPSULE } else { io_in_capsule };
        let depth = req.target_recv_depth();
        let p = &self.ports[port];
        match RdmaWire::accept(id, &p.pd, &p.channel, req.qid, depth, in_capsule, peer) {
            Ok(w) => {
                tracing::debug!(%peer, qid = req.qid, depth, device = p.device.name(), "NVMe/RDMA queue pair accepted");
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
    fn port_for(&mut self, id: &CmId, register_port: &mut impl FnMut(usize, RawFd)) -> Result<usize, String> {
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
