//! The replication link over RDMA (`link = "rdma"`, cargo feature `rdma`): the same byte stream
//! the link thread reads and writes over TCP (handshake, authentication and frames unchanged),
//! carried by SEND/RECV on one RC queue pair.
//!
//! Each direction is a ring of [`CHUNK`]-byte registered slots: a write copies up to one chunk
//! into a free send slot and posts it; received chunks are read in order and their slots posted
//! again once read through. A peer that has no receive posted makes the sender's device retry
//! (RNR, without limit), which is the stream's backpressure. The CQ is armed whenever a read or
//! write finds nothing to do, so its completion channel's descriptor (registered with the link
//! thread's poll) announces the next completion. A failed work request (the retries ran out, the
//! queue pair broke) or rdma_cm reporting the connection disconnected (the peer's process ended)
//! fails the stream: the link goes down and is dialled again, exactly as a broken TCP connection.

use super::auth::Side;
use super::transport::{LinkStream, Transport};
use mio::{Registry, Token};
use nvmetro_ffi::rdma::{
    Access, CmEventKind, CmHandle, CmId, CompletionChannel, CompletionQueue, ConnParam, Device, EventChannel, MemoryRegion,
    ProtectionDomain, QpCaps, RecvRequest, SendFlags, SendOp, WorkCompletion,
};
use nvmetro_ffi::DmaBuf;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Bytes per SEND.
pub const CHUNK: usize = 64 * 1024;
const SENDS: usize = 16;
const RECVS: usize = 32;
const WR_SEND: u64 = 1 << 32;

fn os(e: impl std::fmt::Display) -> io::Error {
    io::Error::other(e.to_string())
}

/// One end of an RDMA link connection.
pub struct RdmaStream {
    // Dropped first: destroying the QP ends the device's use of `mem`.
    id: CmId,
    channel: Arc<CompletionChannel>,
    cq: Arc<CompletionQueue>,
    mem: MemoryRegion<DmaBuf>,
    free_sends: Vec<usize>,
    /// Bytes of each send slot's SEND in flight, and their sum.
    sending: [usize; SENDS],
    unacked: usize,
    /// Received chunks not yet read through: (slot, length, bytes already read).
    rx: VecDeque<(usize, usize, usize)>,
    wcs: Vec<WorkCompletion>,
    failed: Option<String>,
    /// Set by the transport when rdma_cm reports the connection disconnected (the peer's
    /// process ended, or it disconnected): an idle queue pair would not learn it otherwise.
    gone: Arc<AtomicBool>,
}

impl RdmaStream {
    /// Queues for a connecting or connected `id` (its route resolved): the QP, its CQ and the
    /// registered rings, with every receive posted.
    fn new(mut id: CmId, devices: &[Device]) -> Result<RdmaStream, String> {
        let device = id.device_in(devices).ok_or("the connection is on no RDMA device this process listed")?.clone();
        let pd = ProtectionDomain::new(&device).map_err(|e| e.to_string())?;
        let channel = CompletionChannel::new(&device).map_err(|e| e.to_string())?;
        let cq = CompletionQueue::new(&device, (SENDS + RECVS) as u32, Some(&channel)).map_err(|e| e.to_string())?;
        let mem = pd.register(DmaBuf::zeroed((SENDS + RECVS) * CHUNK), Access::LOCAL_WRITE).map_err(|e| e.to_string())?;
        let caps = QpCaps { max_send_wr: SENDS as u32, max_recv_wr: RECVS as u32, max_send_sge: 1, max_recv_sge: 1, max_inline_data: 0 };
        id.create_qp(&pd, &cq, &cq, caps).map_err(|e| e.to_string())?;
        cq.arm(false).map_err(|e| e.to_string())?;
        let s = RdmaStream {
            id,
            channel,
            cq,
            mem,
            free_sends: (0..SENDS).rev().collect(),
            sending: [0; SENDS],
            unacked: 0,
            rx: VecDeque::new(),
            wcs: (0..32).map(|_| WorkCompletion::default()).collect(),
            failed: None,
            gone: Arc::new(AtomicBool::new(false)),
        };
        for slot in 0..RECVS {
            s.post_recv(slot).map_err(|e| e.to_string())?;
        }
        Ok(s)
    }

    fn post_recv(&self, slot: usize) -> io::Result<()> {
        let sge = self.mem.sge(slot * CHUNK, CHUNK).map_err(os)?;
        self.id.post_recvs(&[RecvRequest { wr_id: slot as u64, sges: &[sge] }]).map_err(|(_, e)| os(e))
    }

    fn handle(&self) -> CmHandle {
        self.id.handle()
    }

    fn check(&self) -> io::Result<()> {
        if let Some(why) = &self.failed {
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, why.clone()));
        }
        if self.gone.load(Ordering::Acquire) {
            return Err(io::Error::new(io::ErrorKind::ConnectionReset, "the peer disconnected (rdma_cm)"));
        }
        Ok(())
    }

    /// Takes what completed: received chunks queue up for reading, sent ones free their slot.
    fn pump(&mut self) -> io::Result<()> {
        loop {
            let mut wcs = std::mem::take(&mut self.wcs);
            let n = self.cq.poll(&mut wcs).map_err(os);
            if let Ok(n) = n {
                for wc in &wcs[..n] {
                    if let Some(e) = wc.error() {
                        self.failed.get_or_insert_with(|| format!("RDMA work request failed: {e}"));
                    } else if wc.wr_id() & WR_SEND != 0 {
                        let slot = (wc.wr_id() & 0xffff) as usize;
                        self.unacked -= std::mem::take(&mut self.sending[slot]);
                        self.free_sends.push(slot);
                    } else {
                        self.rx.push_back((wc.wr_id() as usize, wc.byte_len() as usize, 0));
                    }
                }
            }
            self.wcs = wcs;
            match n? {
                0 => return self.check(),
                _ => continue,
            }
        }
    }

    /// Nothing to do now: take the channel's events, arm the CQ, and look once more (what
    /// completed before the arm is seen here, what completes after it raises an event).
    fn rearm(&mut self) -> io::Result<()> {
        self.channel.take_events(|_| {}).map_err(os)?;
        self.cq.arm(false).map_err(os)?;
        self.pump()
    }
}

impl Read for RdmaStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.pump()?;
        if self.rx.is_empty() {
            self.rearm()?;
        }
        if self.rx.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut n = 0;
        while n < buf.len() {
            let Some(&mut (slot, len, ref mut done)) = self.rx.front_mut() else { break };
            let take = (len - *done).min(buf.len() - n);
            self.mem.read(slot * CHUNK + *done, &mut buf[n..n + take]).map_err(os)?;
            *done += take;
            n += take;
            if *done == len {
                self.rx.pop_front();
                self.post_recv(slot)?;
            }
        }
        Ok(n)
    }
}

impl Write for RdmaStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[io::IoSlice::new(buf)])
    }

    /// Gathers up to one chunk from `bufs` into a send slot and posts it.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.pump()?;
        if self.free_sends.is_empty() {
            self.rearm()?;
        }
        let Some(slot) = self.free_sends.pop() else { return Err(io::ErrorKind::WouldBlock.into()) };
        let base = (RECVS + slot) * CHUNK;
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(CHUNK - n);
            self.mem.write(base + n, &b[..take]).map_err(os)?;
            n += take;
            if n == CHUNK {
                break;
            }
        }
        if n == 0 {
            self.free_sends.push(slot);
            return Ok(0);
        }
        let sge = self.mem.sge(base, n).map_err(os)?;
        if let Err(e) = self.id.post_send(WR_SEND | slot as u64, SendOp::Send, &[sge], SendFlags::SIGNALED) {
            self.failed.get_or_insert_with(|| format!("cannot post a SEND: {e}"));
            return self.check().map(|()| 0);
        }
        self.sending[slot] = n;
        self.unacked += n;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl LinkStream for RdmaStream {
    fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(&mut mio::unix::SourceFd(&self.channel.fd().as_raw_fd()), token, mio::Interest::READABLE)
    }
    fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(&mut mio::unix::SourceFd(&self.channel.fd().as_raw_fd()));
    }
    /// Bytes posted whose SEND has not completed (the peer's device has not acknowledged them).
    fn unsent(&self) -> Option<usize> {
        Some(self.unacked)
    }
}

enum Dial {
    /// Address, then route resolution under way.
    Resolving(CmId, Instant),
    /// Connect sent; the stream is ready once established.
    Connecting(Box<RdmaStream>, Instant),
}

/// RDMA: the preferred leg listens on its rdma_cm address, the secondary dials it with
/// exponential backoff (100 ms to 2 s), as [`super::transport::TcpTransport`].
pub struct RdmaTransport {
    channel: Arc<EventChannel>,
    listener: Option<CmId>,
    listen: Option<SocketAddr>,
    peer: Option<SocketAddr>,
    devices: Vec<Device>,
    dialing: Option<Dial>,
    /// Accepted, waiting to be established.
    accepting: Vec<RdmaStream>,
    /// Streams handed to the link, to tell when rdma_cm reports them disconnected.
    live: Vec<(CmHandle, Weak<AtomicBool>)>,
    next_dial: Instant,
    backoff: Duration,
    /// Dial although connected: a lane (its own RC queue pair).
    lane_wanted: bool,
}

impl RdmaTransport {
    pub fn new(listen: Option<SocketAddr>, peer: Option<SocketAddr>) -> io::Result<RdmaTransport> {
        let devices = Device::list().map_err(os)?;
        let channel = EventChannel::new().map_err(os)?;
        let listener = match listen {
            Some(addr) => {
                let id = CmId::new(&channel).map_err(os)?;
                id.set_reuse_addr(true).map_err(os)?;
                id.listen(addr, 16).map_err(|e| io::Error::other(format!("cannot listen for the RDMA link on {addr}: {e}")))?;
                Some(id)
            }
            None => None,
        };
        Ok(RdmaTransport {
            channel,
            listener,
            listen,
            peer,
            devices,
            dialing: None,
            accepting: Vec::new(),
            live: Vec::new(),
            next_dial: Instant::now(),
            backoff: Duration::from_millis(100),
            lane_wanted: false,
        })
    }

    fn back_off(&mut self, why: &str) {
        tracing::debug!(peer = ?self.peer, "RDMA link dial failed: {why}");
        self.dialing = None;
        self.next_dial = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(2));
    }

    fn on_event(&mut self, ev: nvmetro_ffi::rdma::CmEvent) -> Option<RdmaStream> {
        match ev.kind {
            CmEventKind::ConnectRequest => {
                let id = ev.request?;
                match RdmaStream::new(id, &self.devices) {
                    Ok(s) => match s.id.accept(&ConnParam::default()) {
                        Ok(()) => self.accepting.push(s),
                        Err(e) => tracing::warn!("RDMA link: cannot accept a connection: {e}"),
                    },
                    Err(e) => tracing::warn!("RDMA link: cannot set up an accepted connection: {e}"),
                }
                None
            }
            CmEventKind::Established => {
                if let Some(i) = self.accepting.iter().position(|s| s.handle() == ev.id) {
                    return Some(self.accepting.swap_remove(i));
                }
                match self.dialing.take() {
                    Some(Dial::Connecting(s, _)) if s.handle() == ev.id => {
                        self.backoff = Duration::from_millis(100);
                        Some(*s)
                    }
                    other => {
                        self.dialing = other;
                        None
                    }
                }
            }
            CmEventKind::AddrResolved | CmEventKind::RouteResolved => {
                let Some(Dial::Resolving(id, deadline)) = self.dialing.take() else { return None };
                if id.handle() != ev.id {
                    self.dialing = Some(Dial::Resolving(id, deadline));
                    return None;
                }
                if ev.kind == CmEventKind::AddrResolved {
                    match id.resolve_route(Duration::from_millis(500)) {
                        Ok(()) => self.dialing = Some(Dial::Resolving(id, deadline)),
                        Err(e) => self.back_off(&e.to_string()),
                    }
                    return None;
                }
                match RdmaStream::new(id, &self.devices) {
                    Ok(s) => match s.id.connect(&ConnParam::default()) {
                        Ok(()) => self.dialing = Some(Dial::Connecting(Box::new(s), deadline)),
                        Err(e) => self.back_off(&e.to_string()),
                    },
                    Err(e) => self.back_off(&e),
                }
                None
            }
            CmEventKind::AddrError
            | CmEventKind::RouteError
            | CmEventKind::ConnectError
            | CmEventKind::Unreachable
            | CmEventKind::Rejected => {
                let ours = match &self.dialing {
                    Some(Dial::Resolving(id, _)) => id.handle() == ev.id,
                    Some(Dial::Connecting(s, _)) => s.handle() == ev.id,
                    None => false,
                };
                if ours {
                    self.back_off(&nvmetro_ffi::rdma::event_name(ev.kind));
                }
                self.accepting.retain(|s| s.handle() != ev.id);
                None
            }
            CmEventKind::Disconnected | CmEventKind::DeviceRemoval => {
                for (_, gone) in self.live.iter().filter(|(h, _)| *h == ev.id) {
                    if let Some(g) = gone.upgrade() {
                        g.store(true, Ordering::Release);
                    }
                }
                None
            }
            _ => None,
        }
    }
}

impl Transport for RdmaTransport {
    fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        registry.register(&mut mio::unix::SourceFd(&self.channel.fd().as_raw_fd()), token, mio::Interest::READABLE)
    }

    fn poll_connect(&mut self, connected: bool) -> Option<Box<dyn LinkStream>> {
        loop {
            match self.channel.get_event() {
                Ok(Some(ev)) => {
                    if let Some(s) = self.on_event(ev) {
                        self.live.retain(|(_, g)| g.strong_count() > 0);
                        self.live.push((s.handle(), Arc::downgrade(&s.gone)));
                        return Some(Box::new(s));
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!("RDMA link: rdma_cm events: {e}");
                    break;
                }
            }
        }
        let expired = match &self.dialing {
            Some(Dial::Resolving(_, d)) | Some(Dial::Connecting(_, d)) => Instant::now() >= *d,
            None => false,
        };
        if expired {
            self.back_off("no answer within 2 s");
        }
        if (!connected || self.lane_wanted) && self.dialing.is_none() && Instant::now() >= self.next_dial {
            if let Some(peer) = self.peer {
                let dial = CmId::new(&self.channel).and_then(|id| id.resolve_addr(None, peer, Duration::from_millis(500)).map(|()| id));
                match dial {
                    Ok(id) => {
                        self.lane_wanted = false;
                        self.dialing = Some(Dial::Resolving(id, Instant::now() + Duration::from_secs(2)));
                    }
                    Err(e) => self.back_off(&e.to_string()),
                }
            }
        }
        None
    }

    fn failed(&mut self) {
        self.next_dial = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(2));
    }

    fn want_lane(&mut self) -> bool {
        self.lane_wanted = self.peer.is_some();
        self.lane_wanted
    }

    fn connecting(&self) -> bool {
        // Resolution and connection steps arrive as rdma_cm events on the registered channel;
        // the retry timer and the 2 s give-up are looked at on the link thread's tick.
        false
    }

    fn side(&self) -> Side {
        if self.listener.is_some() {
            Side::Acceptor
        } else {
            Side::Dialer
        }
    }

    fn describe(&self) -> String {
        match (self.peer, self.listen) {
            (Some(p), _) => format!("rdma {p}"),
            (None, Some(l)) => format!("rdma, listening on {l}"),
            _ => "rdma".into(),
        }
    }
}
