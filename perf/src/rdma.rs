//! One NVMe/RDMA queue of the initiator (cargo feature `rdma`): rdma_cm connect with the
//! NVMe/RDMA private data, command capsules by SEND, data by the target's RDMA READ (writes) and
//! RDMA WRITE (reads) against a keyed SGL naming this queue's registered memory, or in the
//! capsule when the queue allows in-capsule data; completions by RECV.
//!
//! One registered region holds, per command slot (the queue's depth), its capsule, its data
//! buffer of one maximum transfer, and, per receive, a completion. The CQ is kept armed whenever
//! [`RdmaQueue::poll`] returns, so the completion channel's descriptor is readable exactly when
//! something new completed (a caller may wait on it with poll(2) among other queues).

use crate::HostError;
use nvmetro_ffi::rdma::{
    event_name, Access, CmEventKind, CmId, CompletionChannel, CompletionQueue, ConnParam, Device, EventChannel, MemoryRegion,
    ProtectionDomain, QpCaps, RecvRequest, SendFlags, SendOp, WorkCompletion,
};
use nvmetro_ffi::DmaBuf;
use nvmetro_proto::identify;
use nvmetro_proto::nvme::{Command, Completion};
use nvmetro_proto::rdma::{ConnectAccept, ConnectRequest, CQE_LEN, SQE_LEN};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// In-capsule data a capsule slot has room for (the queue uses at most what the target allows).
const CAPSULE_DATA: usize = identify::IO_IN_CAPSULE;
const CAPSULE: usize = SQE_LEN + CAPSULE_DATA;
const WR_SEND: u64 = 1 << 32;

fn rdma_err(e: impl std::fmt::Display) -> HostError {
    HostError::Io(std::io::Error::other(e.to_string()))
}

pub struct RdmaQueue {
    // Dropped first: destroying the QP ends the device's use of `mem`.
    id: CmId,
    _events: Arc<EventChannel>,
    channel: Arc<CompletionChannel>,
    cq: Arc<CompletionQueue>,
    mem: MemoryRegion<DmaBuf>,
    depth: usize,
    in_capsule: usize,
    free: Vec<usize>,
    /// By command id: its slot and how many bytes it reads.
    inflight: HashMap<u16, (usize, usize)>,
    wcs: Vec<WorkCompletion>,
    /// Why the queue pair cannot be used any more (a post failed): the next poll reports it.
    broken: Option<String>,
}

impl std::fmt::Debug for RdmaQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RdmaQueue(depth {}, {} outstanding)", self.depth, self.inflight.len())
    }
}

impl RdmaQueue {
    fn capsule(slot: usize) -> usize {
        slot * CAPSULE
    }
    fn cqe(&self, slot: usize) -> usize {
        self.depth * CAPSULE + slot * CQE_LEN
    }
    fn data(&self, slot: usize) -> usize {
        self.depth * (CAPSULE + CQE_LEN) + slot * identify::MAX_TRANSFER
    }

    /// Connects queue `qid` of `depth` entries to the NVMe/RDMA listener at `addr`.
    pub fn open(addr: SocketAddr, qid: u16, depth: u16, timeout: Duration) -> Result<RdmaQueue, HostError> {
        let devices = Device::list().map_err(rdma_err)?;
        let events = EventChannel::new().map_err(rdma_err)?;
        let expect = |kind: CmEventKind| -> Result<nvmetro_ffi::rdma::CmEvent, HostError> {
            let ev = events.wait_event(timeout).map_err(rdma_err)?.ok_or(HostError::Timeout)?;
            if ev.kind != kind {
                return Err(rdma_err(format!("{addr}: expected {}, got {} (status {})", event_name(kind), event_name(ev.kind), ev.status)));
            }
            Ok(ev)
        };
        let mut id = CmId::new(&events).map_err(rdma_err)?;
        id.resolve_addr(None, addr, timeout).map_err(rdma_err)?;
        expect(CmEventKind::AddrResolved)?;
        id.resolve_route(timeout).map_err(rdma_err)?;
        expect(CmEventKind::RouteResolved)?;
        let device =
            id.device_in(&devices).ok_or_else(|| rdma_err(format!("{addr}: the route is on no RDMA device of this host")))?.clone();
        let depth = usize::from(depth.max(2));
        let pd = ProtectionDomain::new(&device).map_err(rdma_err)?;
        let channel = CompletionChannel::new(&device).map_err(rdma_err)?;
        let cq = CompletionQueue::new(&device, (2 * depth) as u32, Some(&channel)).map_err(rdma_err)?;
        let len = depth * (CAPSULE + CQE_LEN + identify::MAX_TRANSFER);
        let mem = pd.register(DmaBuf::zeroed(len), Access::LOCAL_WRITE | Access::REMOTE_READ | Access::REMOTE_WRITE).map_err(rdma_err)?;
        let caps = QpCaps { max_send_wr: depth as u32, max_recv_wr: depth as u32, max_send_sge: 1, max_recv_sge: 1, max_inline_data: 0 };
        id.create_qp(&pd, &cq, &cq, caps).map_err(rdma_err)?;
        cq.arm(false).map_err(rdma_err)?;
        let q = RdmaQueue {
            id,
            _events: events.clone(),
            channel,
            cq,
            mem,
            depth,
            in_capsule: 0,
            free: (0..depth).rev().collect(),
            inflight: HashMap::new(),
            wcs: (0..32).map(|_| WorkCompletion::default()).collect(),
            broken: None,
        };
        for slot in 0..depth {
            q.post_recv(slot)?;
        }
        let private = ConnectRequest { qid, hrqsize: depth as u16, hsqsize: depth as u16 - 1, cntlid: 0 }.encode();
        q.id.connect(&ConnParam { private_data: &private, ..ConnParam::default() }).map_err(rdma_err)?;
        let ev = events.wait_event(timeout).map_err(rdma_err)?.ok_or(HostError::Timeout)?;
        match ev.kind {
            CmEventKind::Established => {}
            CmEventKind::Rejected => {
                let sts = ev.private_data.get(2..4).map(|b| u16::from_le_bytes([b[0], b[1]]));
                return Err(rdma_err(format!("{addr}: the target rejected queue {qid} (NVMe/RDMA status {sts:?})")));
            }
            k => return Err(rdma_err(format!("{addr}: connect: {} (status {})", event_name(k), ev.status))),
        }
        if let Some(a) = ConnectAccept::parse(&ev.private_data) {
            if usize::from(a.crqsize) < depth {
                return Err(rdma_err(format!("{addr}: the target takes {} capsules at once, fewer than the queue's {depth}", a.crqsize)));
            }
        }
        Ok(q)
    }

    fn post_recv(&self, slot: usize) -> Result<(), HostError> {
        let sge = self.mem.sge(self.cqe(slot), CQE_LEN).map_err(rdma_err)?;
        self.id.post_recvs(&[RecvRequest { wr_id: slot as u64, sges: &[sge] }]).map_err(|(_, e)| rdma_err(e))
    }

    /// Lets write data of up to `bytes` ride in the capsule (the target's IOCCSZ allows it).
    pub fn set_in_capsule(&mut self, bytes: usize) {
        self.in_capsule = bytes.min(CAPSULE_DATA);
    }

    pub fn outstanding(&self) -> usize {
        self.inflight.len()
    }

    /// Readable when something completed since the last [`RdmaQueue::poll`].
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.channel.fd()
    }

    /// Sends a command (its command identifier already set) with its data now; a failure to
    /// post is reported by the next [`RdmaQueue::poll`].
    pub fn submit(&mut self, cmd: Command, write: &[u8], read_len: usize) {
        if let Err(e) = self.try_submit(cmd, write, read_len) {
            self.broken.get_or_insert(e.to_string());
        }
    }

    fn try_submit(&mut self, mut cmd: Command, write: &[u8], read_len: usize) -> Result<(), HostError> {
        let slot = self.free.pop().ok_or_else(|| rdma_err("more commands outstanding than the queue's depth"))?;
        let len = write.len().max(read_len);
        if len > identify::MAX_TRANSFER {
            self.free.push(slot);
            return Err(rdma_err(format!("a {len}-byte transfer is larger than MDTS")));
        }
        let mut capsule_len = SQE_LEN;
        if !write.is_empty() && write.len() <= self.in_capsule {
            cmd.set_sgl(0, write.len() as u32, nvmetro_proto::rdma::sgl::IN_CAPSULE);
            self.mem.write(Self::capsule(slot) + SQE_LEN, write).map_err(rdma_err)?;
            capsule_len += write.len();
        } else if len > 0 {
            if !write.is_empty() {
                self.mem.write(self.data(slot), write).map_err(rdma_err)?;
            }
            cmd.set_keyed_sgl(self.mem.addr() + self.data(slot) as u64, len as u32, self.mem.rkey());
        } else {
            // Without data: the null keyed descriptor Linux's host sends.
            cmd.set_keyed_sgl(0, 0, 0);
        }
        self.mem.write(Self::capsule(slot), &cmd.0).map_err(rdma_err)?;
        let sge = self.mem.sge(Self::capsule(slot), capsule_len).map_err(rdma_err)?;
        self.id.post_send(WR_SEND | slot as u64, SendOp::Send, &[sge], SendFlags::SIGNALED).map_err(rdma_err)?;
        self.inflight.insert(cmd.cid(), (slot, read_len));
        Ok(())
    }

    /// Collects finished commands into `out` without waiting; leaves the CQ armed.
    pub fn poll(&mut self, out: &mut Vec<(Completion, Vec<u8>)>) -> Result<usize, HostError> {
        if let Some(why) = &self.broken {
            return Err(rdma_err(why));
        }
        let mut got = 0;
        let mut rearmed = false;
        loop {
            let mut wcs = std::mem::take(&mut self.wcs);
            let n = self.cq.poll(&mut wcs).map_err(rdma_err);
            let result = n.and_then(|n| {
                for wc in &wcs[..n] {
                    got += self.on_completion(wc, out)?;
                }
                Ok(n)
            });
            self.wcs = wcs;
            if result? > 0 {
                continue;
            }
            // Empty: take the channel's events (each disarms its CQ), arm, and look once more.
            let mut events = 0;
            self.channel.take_events(|_| events += 1).map_err(rdma_err)?;
            if events == 0 && rearmed {
                return Ok(got);
            }
            if events > 0 || !rearmed {
                self.cq.arm(false).map_err(rdma_err)?;
                rearmed = true;
            }
        }
    }

    fn on_completion(&mut self, wc: &WorkCompletion, out: &mut Vec<(Completion, Vec<u8>)>) -> Result<usize, HostError> {
        if let Some(e) = wc.error() {
            let what = if wc.wr_id() & WR_SEND != 0 { "a command's SEND" } else { "a completion's RECV" };
            return Err(rdma_err(format!("{what} failed: {e}")));
        }
        if wc.wr_id() & WR_SEND != 0 {
            return Ok(0);
        }
        let recv = wc.wr_id() as usize;
        let mut bytes = [0u8; CQE_LEN];
        self.mem.read(self.cqe(recv), &mut bytes).map_err(rdma_err)?;
        self.post_recv(recv)?;
        let cqe = Completion::decode(&bytes);
        let Some((slot, read_len)) = self.inflight.remove(&cqe.cid) else {
            return Ok(0); // not ours (an answer to something already given up on)
        };
        let mut data = vec![0u8; if cqe.status().is_success() { read_len } else { 0 }];
        self.mem.read(self.data(slot), &mut data).map_err(rdma_err)?;
        self.free.push(slot);
        out.push((cqe, data));
        Ok(1)
    }

    /// Waits up to `timeout` for a completion event, then collects what finished.
    pub fn poll_timeout(&mut self, out: &mut Vec<(Completion, Vec<u8>)>, timeout: Duration) -> Result<usize, HostError> {
        let got = self.poll(out)?;
        if got > 0 || timeout.is_zero() {
            return Ok(got);
        }
        let mut ready = [false];
        let deadline = Instant::now() + timeout;
        nvmetro_ffi::wait_readable(&[self.channel.fd()], deadline.saturating_duration_since(Instant::now()), &mut ready)?;
        self.poll(out)
    }
}
