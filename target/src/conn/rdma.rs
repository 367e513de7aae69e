//! The NVMe/RDMA side of a queue (NVMe-oF RDMA transport binding): command capsules arrive by
//! RECV, host data moves by RDMA READ (writes) and RDMA WRITE (reads) against the keyed SGL
//! descriptor of each command, and each completion leaves by SEND.
//!
//! One registered region per queue pair holds the device's fixed working memory: a receive slot
//! per capsule the queue may hold (64-byte SQE plus the in-capsule data it accepts), a send slot
//! per completion in flight, and staging slots of one maximum transfer each for data on its way
//! to or from the host. Staging is capped ([`STAGING`]); a command that finds none free waits for
//! one, in order.
//!
//! Host data moves without a copy: each I/O queue pair also registers, once, a pool of I/O
//! buffers (`RegisteredPool`, on hugepages when reserved) sized to its depth. A receive scatters
//! the capsule's SQE into its slot and its in-capsule data into a pool buffer, and an RDMA READ
//! of a write's data lands in one; that buffer is what the bdev writes from and the replication
//! frame carries. A read offers the bdev a pool buffer to read into (`registered_buffer`), and
//! its data goes to the host by RDMA WRITE from it. When the pool has no buffer free (they are
//! held by commands in flight), or the bdev answers with data of its own, the data goes through
//! a staging slot (or the whole receive slot) and is copied once.
//!
//! A work completion with an error (a wrong rkey, a host that went away, a transport timeout)
//! ends the queue pair with a log line naming the operation; the other queues are untouched.

use super::QueueBuffers;
use crate::reactor::RdmaDataStats;
use nvmetro_bdev::{IoBuf, IoBufMut, IoBufPool};
use nvmetro_ffi::rdma::{
    Access, CmHandle, CmId, CompletionChannel, CompletionQueue, ConnParam, MemoryRegion, PostedBuffer, PostedWrite, ProtectionDomain,
    QpCaps, RdmaError, RecvRequest, RegisteredPool, SendFlags, SendOp, WcError, WcOpcode, WorkCompletion, ZERO_COPY_WR_ID,
};
use nvmetro_ffi::DmaBuf;
use nvmetro_proto::identify;
use nvmetro_proto::nvme::{Command, Completion};
use nvmetro_proto::rdma::{plan_sqe, ConnectAccept, DataPlan, HostBuffer, Reject, RejectStatus, CQE_LEN, SQE_LEN};
use nvmetro_proto::tcp::{DataBuffers, TargetEvent};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

/// Most staging slots (of [`identify::MAX_TRANSFER`] bytes each) one queue pair registers.
pub const STAGING: usize = 16;

/// Pool buffers per capsule the queue holds: one posted with each receive for its in-capsule
/// data, one for the command it carried (its write data, or read data on its way to the host).
const ZERO_COPY_PER_CAPSULE: usize = 2;
/// The most memory a pool's in-capsule buffers take (a queue of 128 KiB capsules gets 32).
const ZERO_COPY_CAPSULE_BYTES: usize = 4 << 20;
/// Pool buffers of one maximum transfer, for write data the host leaves for an RDMA READ.
const ZERO_COPY_TRANSFERS: usize = 8;

/// Work completions taken per poll.
const POLL_BATCH: usize = 32;

const KIND_SHIFT: u32 = 56;
const WR_RECV: u64 = 1;
const WR_SEND: u64 = 2;
const WR_READ: u64 = 3;
const WR_WRITE: u64 = 4;
/// A SEND's staging slot (plus one; 0: none) sits above its send slot in the wr_id.
const STAGE_SHIFT: u32 = 20;

const RECV_WHAT: &str = "a command capsule's RECV";
const READ_WHAT: &str = "the RDMA READ of a command's data from the host";
const WRITE_WHAT: &str = "the RDMA WRITE of a command's data to the host";

/// The registered pool of an I/O queue pair of `depth` capsules, or None (logged) when it cannot
/// be registered (the memory lock limit, say): the queue pair then copies through staging.
/// The buffers of an I/O queue pair's pool, as (size, count): per capsule of `depth`, two of the
/// in-capsule size (at most [`ZERO_COPY_CAPSULE_BYTES`] of them), and the transfers.
fn pool_slots(depth: usize, in_capsule: usize) -> Vec<(usize, usize)> {
    let mut slots = vec![(identify::MAX_TRANSFER, ZERO_COPY_TRANSFERS)];
    let capsule_class = (in_capsule > 0).then(|| in_capsule.next_power_of_two().max(identify::PAGE));
    if let Some(c) = capsule_class.filter(|&c| c <= identify::MAX_TRANSFER) {
        slots.insert(0, (c, (depth * ZERO_COPY_PER_CAPSULE).min(ZERO_COPY_CAPSULE_BYTES / c)));
    }
    slots
}

/// The registered pool of an I/O queue pair of `depth` capsules, or None (logged) when it cannot
/// be registered (the memory lock limit, say): the queue pair then copies through staging.
fn zero_copy_pool(pd: &Arc<ProtectionDomain>, depth: usize, in_capsule: usize, peer: SocketAddr, qid: u16) -> Option<RegisteredPool> {
    let slots = pool_slots(depth, in_capsule);
    match RegisteredPool::new(pd, &slots, true) {
        Ok(pool) => {
            tracing::debug!(%peer, qid, "zero-copy pool: {pool:?}");
            Some(pool)
        }
        Err(e) => {
            tracing::warn!(%peer, qid, "no zero-copy pool for this queue pair, its host data is copied once: {e}");
            None
        }
    }
}

fn wr_id(kind: u64, slot: usize) -> u64 {
    kind << KIND_SHIFT | slot as u64
}

/// Where each part of the registered region starts.
#[derive(Debug, Clone, Copy)]
struct Layout {
    recv_slot: usize,
    recvs: usize,
    sends: usize,
    stages: usize,
}

impl Layout {
    fn recv(&self, slot: usize) -> usize {
        slot * self.recv_slot
    }
    fn send(&self, slot: usize) -> usize {
        self.recvs * self.recv_slot + slot * CQE_LEN
    }
    fn stage(&self, slot: usize) -> usize {
        self.recvs * self.recv_slot + self.sends * CQE_LEN + slot * identify::MAX_TRANSFER
    }
    fn len(&self) -> usize {
        self.stage(self.stages)
    }
}

/// A completion waiting for a send slot (and, with data copied for the host, a staging slot).
struct Response {
    cqe: [u8; CQE_LEN],
    data: Option<(HostBuffer, ReadData)>,
}

/// Read data for the host: copied to a staging slot, or written from its registered buffer.
enum ReadData {
    Copied(Vec<u8>),
    Registered(IoBuf),
}

pub struct RdmaWire {
    // Declared first so that it drops first: destroying the QP ends the device's use of `mem`.
    id: CmId,
    cq: Arc<CompletionQueue>,
    mem: MemoryRegion<DmaBuf>,
    layout: Layout,
    /// The queue id the host named in its connect private data (Connect must agree).
    pub(super) cm_qid: u16,
    in_capsule: usize,
    buffers: QueueBuffers,
    free_sends: Vec<usize>,
    free_stages: Vec<usize>,
    /// The host buffer each outstanding read-like command's data goes to, by command id.
    host_buffers: HashMap<u16, HostBuffer>,
    /// Write-like commands waiting for a staging slot to RDMA READ their data into.
    waiting_reads: VecDeque<(Command, HostBuffer)>,
    /// By staging slot: the command whose data an RDMA READ is bringing in.
    reading: Vec<Option<(Command, usize)>>,
    waiting_responses: VecDeque<Response>,
    /// Read buffers handed back after their data was staged, for the next reads.
    read_pool: Vec<Vec<u8>>,
    read_pool_limit: usize,
    pub(super) events: Vec<TargetEvent<IoBufMut>>,
    wcs: Vec<WorkCompletion>,
    /// Signaled sends not yet completed.
    sends_in_flight: usize,
    /// Set once a work completion failed or a post was refused: the queue pair is done.
    pub(super) failed: Option<String>,
    peer: SocketAddr,
    /// Registered buffers the host's data lands in and leaves from (I/O queues; None when it
    /// could not be registered).
    zero_copy: Option<RegisteredPool>,
    /// Receives posted into pool buffers, in the order posted (they complete in that order),
    /// with their receive slots.
    zero_copy_recvs: VecDeque<(PostedBuffer, usize)>,
    /// RDMA READs posted into pool buffers, with their commands.
    zero_copy_reads: VecDeque<(PostedBuffer, Command)>,
    /// RDMA WRITEs of read data posted from pool buffers.
    zero_copy_writes: VecDeque<PostedWrite>,
    stats: Arc<RdmaDataStats>,
}

impl RdmaWire {
    /// Sets up a queue pair for a connect request on `id` and accepts it: `depth` capsules at
    /// once (CRQSIZE), each with up to `in_capsule` bytes of data; with `zero_copy`, write data
    /// lands in a registered pool.
    #[allow(clippy::too_many_arguments)]
    pub fn accept(
        mut id: CmId,
        pd: &Arc<ProtectionDomain>,
        channel: &Arc<CompletionChannel>,
        cm_qid: u16,
        depth: u16,
        in_capsule: usize,
        zero_copy: bool,
        peer: SocketAddr,
        stats: Arc<RdmaDataStats>,
    ) -> Result<RdmaWire, RdmaError> {
        let depth = usize::from(depth.max(1));
        let zero_copy = zero_copy.then(|| zero_copy_pool(pd, depth, in_capsule, peer, cm_qid)).flatten();
        let layout = Layout { recv_slot: SQE_LEN + in_capsule, recvs: depth, sends: depth, stages: depth.min(STAGING) };
        // Every SEND is signaled, and so are READs and a pool buffer's WRITE; a staged WRITE is
        // not (its SEND completes after it). A send slot is freed only when its SEND's completion
        // is polled, so at most `sends` SENDs and as many WRITEs are queued, plus a READ per
        // command whose data is being fetched (at most one per capsule, `recvs`); the staged
        // READs are among those.
        let send_wrs = 2 * layout.sends + layout.recvs;
        let parts = (|| {
            let mem = pd.register(DmaBuf::zeroed(layout.len()), Access::LOCAL_WRITE)?;
            let cq = CompletionQueue::new(pd.device(), (send_wrs + layout.recvs) as u32, Some(channel))?;
            let caps = QpCaps {
                max_send_wr: send_wrs as u32,
                max_recv_wr: layout.recvs as u32,
                max_send_sge: 1,
                max_recv_sge: 2,
                max_inline_data: 0,
            };
            id.create_qp(pd, &cq, &cq, caps)?;
            cq.arm(false)?;
            Ok((mem, cq))
        })();
        let (mem, cq) = match parts {
            Ok(p) => p,
            Err(e) => {
                let _ = id.reject(&Reject(RejectStatus::NoResources).encode());
                return Err(e);
            }
        };
        let mut wire = RdmaWire {
            id,
            cq,
            mem,
            layout,
            cm_qid,
            in_capsule,
            buffers: QueueBuffers(IoBufPool::new()),
            free_sends: (0..layout.sends).rev().collect(),
            free_stages: (0..layout.stages).rev().collect(),
            host_buffers: HashMap::new(),
            waiting_reads: VecDeque::new(),
            reading: vec![None; layout.stages],
            waiting_responses: VecDeque::new(),
            read_pool: Vec::new(),
            read_pool_limit: 0,
            events: Vec::new(),
            wcs: (0..POLL_BATCH).map(|_| WorkCompletion::default()).collect(),
            sends_in_flight: 0,
            failed: None,
            peer,
            zero_copy,
            zero_copy_recvs: VecDeque::with_capacity(layout.recvs),
            zero_copy_reads: VecDeque::with_capacity(ZERO_COPY_TRANSFERS),
            zero_copy_writes: VecDeque::with_capacity(layout.sends),
            stats,
        };
        let posted = (0..layout.recvs).try_for_each(|slot| wire.post_recv(slot));
        if let Err(e) = posted {
            let _ = wire.id.reject(&Reject(RejectStatus::NoResources).encode());
            return Err(e);
        }
        let accept = ConnectAccept { crqsize: depth as u16 }.encode();
        wire.id.accept(&ConnParam { private_data: &accept, ..ConnParam::default() })?;
        Ok(wire)
    }

    pub fn cm_handle(&self) -> CmHandle {
        self.id.handle()
    }

    pub fn cq(&self) -> &Arc<CompletionQueue> {
        &self.cq
    }

    /// Asks for a completion event again (after the channel reported one for this CQ).
    pub fn arm(&mut self) {
        if let Err(e) = self.cq.arm(false) {
            self.fail(format!("cannot arm the completion queue: {e}"));
        }
    }

    fn fail(&mut self, why: String) {
        if self.failed.is_none() {
            tracing::warn!(peer = %self.peer, qid = self.cm_qid, "RDMA queue pair ends: {why}");
            self.failed = Some(why);
        }
    }

    /// Posts receive slot `slot`: its SQE part and a pool buffer for in-capsule data, or the
    /// whole slot when the pool has none free.
    fn post_recv(&mut self, slot: usize) -> Result<(), RdmaError> {
        if let Some(pool) = self.zero_copy.as_ref().filter(|_| self.in_capsule > 0) {
            if let Some(buf) = pool.take(self.in_capsule) {
                let head = self.mem.sge(self.layout.recv(slot), SQE_LEN)?;
                let posted = self.id.post_recv_into(pool, head, buf).map_err(|(_, e)| e)?;
                self.zero_copy_recvs.push_back((posted, slot));
                return Ok(());
            }
        }
        let sge = self.mem.sge(self.layout.recv(slot), self.layout.recv_slot)?;
        self.id.post_recvs(&[RecvRequest { wr_id: wr_id(WR_RECV, slot), sges: &[sge] }]).map_err(|(_, e)| e)
    }

    /// Handles what the completion queue holds; commands whose data is here land in `events`.
    /// Returns how many completions there were.
    pub fn poll(&mut self) -> usize {
        let mut total = 0;
        loop {
            let mut wcs = std::mem::take(&mut self.wcs);
            let n = match self.cq.poll(&mut wcs) {
                Ok(n) => n,
                Err(e) => {
                    self.wcs = wcs;
                    self.fail(format!("polling the completion queue: {e}"));
                    return total;
                }
            };
            for wc in &wcs[..n] {
                self.on_completion(wc);
            }
            self.wcs = wcs;
            total += n;
            if n < POLL_BATCH {
                return total;
            }
        }
    }

    fn on_completion(&mut self, wc: &WorkCompletion) {
        if wc.wr_id() & ZERO_COPY_WR_ID != 0 {
            return self.on_zero_copy(wc);
        }
        let kind = wc.wr_id() >> KIND_SHIFT;
        let slot = (wc.wr_id() & ((1 << STAGE_SHIFT) - 1)) as usize;
        if let Some(err) = wc.error() {
            let what = match kind {
                WR_RECV => RECV_WHAT,
                WR_SEND => "a completion's SEND",
                WR_READ => READ_WHAT,
                WR_WRITE => WRITE_WHAT,
                _ => "a work request",
            };
            return self.request_failed(what, err);
        }
        match (kind, wc.opcode()) {
            (WR_RECV, WcOpcode::Recv) => self.on_capsule(slot, wc.byte_len() as usize, None),
            (WR_SEND, WcOpcode::Send) => {
                self.sends_in_flight -= 1;
                self.free_sends.push(slot);
                let stage = (wc.wr_id() >> STAGE_SHIFT) & ((1 << (KIND_SHIFT - STAGE_SHIFT)) - 1);
                if stage > 0 {
                    self.free_stages.push(stage as usize - 1);
                }
                self.start_waiting();
            }
            (WR_READ, WcOpcode::RdmaRead) => self.on_data_read(slot),
            (_, op) => self.fail(format!("unexpected work completion {op:?} for wr_id {:#x}", wc.wr_id())),
        }
    }

    fn request_failed(&mut self, what: &str, err: WcError) {
        if !err.is_flush() {
            self.fail(format!("{what} failed: {err}"));
        } else if self.failed.is_none() {
            self.fail(format!("{what} was flushed: the queue pair is in the error state"));
        }
    }

    /// A receive or an RDMA READ into a pool buffer, or an RDMA WRITE from one, completed.
    fn on_zero_copy(&mut self, wc: &WorkCompletion) {
        // Each kind completes in the order posted, so the match is the first one of its queue.
        if let Some(i) = self.zero_copy_recvs.iter().position(|(p, _)| p.is_completed_by(wc)) {
            let (posted, slot) = self.zero_copy_recvs.remove(i).expect("found above");
            let (buf, err) = posted.complete(wc).unwrap_or_else(|_| unreachable!("matched above"));
            match err {
                Some(err) => self.request_failed(RECV_WHAT, err),
                None => self.on_capsule(slot, wc.byte_len() as usize, Some(buf)),
            }
        } else if let Some(i) = self.zero_copy_reads.iter().position(|(p, _)| p.is_completed_by(wc)) {
            let (posted, cmd) = self.zero_copy_reads.remove(i).expect("found above");
            let (data, err) = posted.complete(wc).unwrap_or_else(|_| unreachable!("matched above"));
            if let Some(err) = err {
                return self.request_failed(READ_WHAT, err);
            }
            RdmaDataStats::add(&self.stats.from_host_zero_copy, data.len());
            self.events.push(TargetEvent::Command { cmd, data });
            self.start_waiting();
        } else if let Some(i) = self.zero_copy_writes.iter().position(|p| p.is_completed_by(wc)) {
            let posted = self.zero_copy_writes.remove(i).expect("found above");
            let (_sent, err) = posted.complete(wc).unwrap_or_else(|_| unreachable!("matched above"));
            if let Some(err) = err {
                self.request_failed(WRITE_WHAT, err);
            }
        } else {
            self.fail(format!("a completion for no zero-copy request of this queue pair (wr_id {:#x})", wc.wr_id()));
        }
    }

    /// A command capsule arrived in receive slot `slot`, its in-capsule data in `tail` when
    /// the receive had a pool buffer (else in the slot, after the SQE).
    fn on_capsule(&mut self, slot: usize, len: usize, tail: Option<IoBufMut>) {
        let mut sqe = [0u8; SQE_LEN];
        let off = self.layout.recv(slot);
        if len >= SQE_LEN {
            // In range: the slot is inside the region by construction.
            let _ = self.mem.read(off, &mut sqe);
        }
        let plan = plan_sqe(&sqe, len, self.in_capsule, identify::MAX_TRANSFER);
        let cmd = Command::from_bytes(&sqe);
        match plan {
            Err(status) => {
                tracing::warn!(peer = %self.peer, qid = self.cm_qid, cid = cmd.cid(), opcode = cmd.opcode(), "bad data descriptor: {status}");
                self.events.push(TargetEvent::Reject(Completion::new(cmd.cid(), status)));
            }
            Ok(DataPlan::None) => self.events.push(TargetEvent::Command { cmd, data: IoBufMut::default() }),
            Ok(DataPlan::InCapsule { offset, len }) => {
                let data = match tail {
                    Some(mut buf) if offset == SQE_LEN => {
                        // plan_sqe checked offset + len against what arrived, all in the buffer.
                        buf.set_len(len);
                        RdmaDataStats::add(&self.stats.from_host_zero_copy, len);
                        buf
                    }
                    Some(buf) => {
                        // Data placed after a gap in the capsule: copied to a buffer of its own.
                        let mut data = self.buffers.buffer(len);
                        data.copy_from_slice(&buf[offset - SQE_LEN..][..len]);
                        RdmaDataStats::add(&self.stats.from_host_copied, len);
                        data
                    }
                    None => {
                        let mut data = self.buffers.buffer(len);
                        let _ = self.mem.read(off + offset, &mut data[..len]);
                        RdmaDataStats::add(&self.stats.from_host_copied, len);
                        data
                    }
                };
                self.events.push(TargetEvent::Command { cmd, data });
            }
            Ok(DataPlan::ReadFromHost(hb)) => {
                self.waiting_reads.push_back((cmd, hb));
                self.start_waiting();
            }
            Ok(DataPlan::WriteToHost(hb)) => {
                self.host_buffers.insert(cmd.cid(), hb);
                self.events.push(TargetEvent::Command { cmd, data: IoBufMut::default() });
            }
        }
        // The capsule is copied out: the slot takes the next one.
        if let Err(e) = self.post_recv(slot) {
            self.fail(format!("cannot post a receive: {e}"));
        }
    }

    /// The RDMA READ into staging slot `stage` completed: its command runs.
    fn on_data_read(&mut self, stage: usize) {
        let Some((cmd, len)) = self.reading.get_mut(stage).and_then(Option::take) else {
            return self.fail(format!("RDMA READ completion for idle staging slot {stage}"));
        };
        let mut data = self.buffers.buffer(len);
        let _ = self.mem.read(self.layout.stage(stage), &mut data[..len]);
        RdmaDataStats::add(&self.stats.from_host_copied, len);
        self.free_stages.push(stage);
        self.events.push(TargetEvent::Command { cmd, data });
        self.start_waiting();
    }

    /// Starts what waited for a staging or send slot, in arrival order per kind.
    fn start_waiting(&mut self) {
        while self.failed.is_none() {
            if let Some(&(cmd, hb)) = self.waiting_reads.front() {
                match self.start_read(cmd, hb) {
                    Ok(true) => {
                        self.waiting_reads.pop_front();
                        continue;
                    }
                    Ok(false) => {}
                    Err(e) => return self.fail(format!("cannot post an RDMA READ: {e}")),
                }
            }
            let Some(r) = self.waiting_responses.front() else { return };
            let stage_needed = matches!(r.data, Some((_, ReadData::Copied(_))));
            if self.free_sends.is_empty() || (stage_needed && self.free_stages.is_empty()) {
                return;
            }
            let r = self.waiting_responses.pop_front().expect("checked");
            if let Err(e) = self.post_response(r) {
                return self.fail(format!("cannot post a completion: {e}"));
            }
        }
    }

    /// RDMA READs a write's data into a pool buffer, or else a staging slot; false when
    /// neither is free.
    fn start_read(&mut self, cmd: Command, hb: HostBuffer) -> Result<bool, RdmaError> {
        let remote = nvmetro_ffi::rdma::RemoteBuf { addr: hb.addr, rkey: hb.key, len: hb.len };
        if let Some(pool) = self.zero_copy.as_ref().filter(|_| hb.len > 0) {
            if let Some(buf) = pool.take(hb.len as usize) {
                let posted = self.id.post_read_into(pool, buf, remote).map_err(|(_, e)| e)?;
                self.zero_copy_reads.push_back((posted, cmd));
                return Ok(true);
            }
        }
        let Some(stage) = self.free_stages.pop() else { return Ok(false) };
        self.post_read(stage, cmd, hb)?;
        Ok(true)
    }

    fn post_read(&mut self, stage: usize, cmd: Command, hb: HostBuffer) -> Result<(), RdmaError> {
        let remote = nvmetro_ffi::rdma::RemoteBuf { addr: hb.addr, rkey: hb.key, len: hb.len };
        let sge = self.mem.sge(self.layout.stage(stage), hb.len as usize)?;
        self.reading[stage] = Some((cmd, hb.len as usize));
        self.id.post_send(wr_id(WR_READ, stage), SendOp::Read(remote), &[sge], SendFlags::SIGNALED)
    }

    fn post_response(&mut self, r: Response) -> Result<(), RdmaError> {
        let send = self.free_sends.pop().expect("caller checked");
        let mut stage_tag = 0u64;
        let mut returned = None;
        match r.data {
            Some((hb, ReadData::Registered(data))) => {
                let remote = nvmetro_ffi::rdma::RemoteBuf { addr: hb.addr, rkey: hb.key, len: hb.len };
                let pool = self.zero_copy.as_ref().expect("registered read data comes from the pool");
                let len = data.len();
                let posted = self.id.post_write_from(pool, data, remote).map_err(|(_, e)| e)?;
                self.zero_copy_writes.push_back(posted);
                RdmaDataStats::add(&self.stats.to_host_zero_copy, len);
            }
            Some((hb, ReadData::Copied(data))) => {
                let stage = self.free_stages.pop().expect("caller checked");
                let len = data.len().min(hb.len as usize).min(identify::MAX_TRANSFER);
                self.mem.write(self.layout.stage(stage), &data[..len])?;
                RdmaDataStats::add(&self.stats.to_host_copied, len);
                let remote = nvmetro_ffi::rdma::RemoteBuf { addr: hb.addr, rkey: hb.key, len: len as u32 };
                let sge = self.mem.sge(self.layout.stage(stage), len)?;
                self.id.post_send(wr_id(WR_WRITE, stage), SendOp::Write(remote), &[sge], SendFlags::NONE)?;
                stage_tag = (stage as u64 + 1) << STAGE_SHIFT;
                returned = Some(data);
            }
            None => {}
        }
        self.mem.write(self.layout.send(send), &r.cqe)?;
        let sge = self.mem.sge(self.layout.send(send), CQE_LEN)?;
        self.id.post_send(wr_id(WR_SEND, send) | stage_tag, SendOp::Send, &[sge], SendFlags::SIGNALED)?;
        self.sends_in_flight += 1;
        if let Some(mut buf) = returned {
            if self.read_pool.len() < self.read_pool_limit && buf.capacity() <= identify::MAX_TRANSFER {
                buf.clear();
                self.read_pool.push(buf);
            }
        }
        Ok(())
    }

    fn queue_response(&mut self, cqe: &Completion, data: Option<ReadData>) {
        let mut bytes = [0u8; CQE_LEN];
        cqe.encode(&mut bytes);
        let hb = self.host_buffers.remove(&cqe.cid);
        let data = match (hb, data) {
            (Some(hb), Some(ReadData::Copied(d))) if !d.is_empty() => Some((hb, ReadData::Copied(d))),
            // Longer than the host's buffer (never, for a read the host sized): copied, and cut.
            (Some(hb), Some(ReadData::Registered(b))) if b.len() > hb.len as usize => Some((hb, ReadData::Copied(b.to_vec()))),
            (Some(hb), Some(ReadData::Registered(b))) if self.zero_copy.as_ref().is_some_and(|p| p.contains(&b)) => {
                Some((hb, ReadData::Registered(b)))
            }
            // Not this queue pair's memory (a bdev that answered with a buffer of its own).
            (Some(hb), Some(ReadData::Registered(b))) if !b.is_empty() => Some((hb, ReadData::Copied(b.to_vec()))),
            _ => None,
        };
        self.waiting_responses.push_back(Response { cqe: bytes, data });
        self.start_waiting();
    }

    pub(super) fn respond(&mut self, cqe: &Completion, data: &[u8]) {
        let data = (!data.is_empty() && self.host_buffers.contains_key(&cqe.cid)).then(|| ReadData::Copied(data.to_vec()));
        self.queue_response(cqe, data);
    }

    pub(super) fn respond_owned(&mut self, cqe: &Completion, data: Vec<u8>) {
        self.queue_response(cqe, Some(ReadData::Copied(data)));
    }

    /// Responds with read data in a buffer of this queue pair's pool (see [`Self::registered_buffer`]).
    pub(super) fn respond_registered(&mut self, cqe: &Completion, data: IoBuf) {
        self.queue_response(cqe, Some(ReadData::Registered(data)));
    }

    /// A buffer of the pool for a read's `len` bytes of data, which the bdev may read into and
    /// the data then goes to the host from, uncopied; None without a pool or a free buffer.
    pub(super) fn registered_buffer(&mut self, len: usize) -> Option<IoBufMut> {
        self.zero_copy.as_ref().filter(|_| len > 0).and_then(|pool| pool.take(len))
    }

    pub(super) fn take_read_buffer(&mut self) -> Vec<u8> {
        self.read_pool.pop().unwrap_or_default()
    }

    pub(super) fn connected(&mut self, queue_size: u32) {
        self.read_pool_limit = (queue_size as usize).min(self.layout.sends);
    }

    /// Work requests are posted as they are made, so there is nothing to push; reports a failed
    /// queue pair so the connection ends.
    pub(super) fn flush(&mut self) -> Result<(), String> {
        match &self.failed {
            Some(why) => Err(why.clone()),
            None => Ok(()),
        }
    }

    /// Every completion is out (the host got it).
    pub(super) fn drained(&self) -> bool {
        self.failed.is_some() || (self.waiting_responses.is_empty() && self.sends_in_flight == 0)
    }

    pub(super) fn shutdown(&mut self) {
        let _ = self.id.disconnect();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_is_sized_to_its_depth_and_bounded() {
        // The default: 256 buffers of 8 KiB and 8 of 128 KiB, 3 MiB (two hugepages).
        let default = pool_slots(128, identify::IO_IN_CAPSULE);
        assert_eq!(default, vec![(8192, 256), (identify::MAX_TRANSFER, ZERO_COPY_TRANSFERS)]);
        assert_eq!(default.iter().map(|(s, n)| s * n).sum::<usize>(), 3 << 20);
        // In-capsule sizes round up to a class; large ones are bounded in bytes, not by depth.
        assert_eq!(pool_slots(32, 4000)[0], (4096, 64));
        assert_eq!(pool_slots(128, 128 << 10)[0], (128 << 10, 32));
        // No in-capsule data: only the transfers.
        assert_eq!(pool_slots(128, 0), vec![(identify::MAX_TRANSFER, ZERO_COPY_TRANSFERS)]);
    }
}
