//! A hostile NVMe/RDMA host, for the lab: each case on its own RDMA connection to a running
//! nvmetro-tgt, each of which must end only that connection, with the right answer:
//!
//! * `bad-private-data`: a connect request whose private data has record format 1: rejected,
//!   with the NVMe/RDMA reject status "invalid record format" (2).
//! * `too-long-sgl`: a Connect capsule whose keyed SGL names 1 MiB (past MDTS): completed with
//!   status SGL Data Block Length Invalid (generic status 0x0f), and nothing is transferred.
//! * `wrong-rkey`: a Connect capsule whose keyed SGL has a key the host never registered: the
//!   target's RDMA READ fails and it ends the queue pair (the host sees it disconnect).
//! * `vanish`: connects, sends a capsule whose data the target must RDMA READ, and destroys its
//!   queue pair at once, without a disconnect.
//!
//! ```sh
//! rdma_hostile_host 10.0.2.15:4420 nqn.2026-11.io.nvmetro:rdma
//! ```
//! Prints `CASE <name>: ok ...` per case; exits 1 if any case did not go as it must.

use nvmetro_ffi::rdma::{
    event_name, Access, CmEvent, CmEventKind, CmId, CompletionChannel, CompletionQueue, ConnParam, Device, EventChannel, MemoryRegion,
    ProtectionDomain, QpCaps, SendFlags, SendOp, WorkCompletion,
};
use nvmetro_ffi::{wait_readable, DmaBuf};
use nvmetro_proto::nvme::Status;
use nvmetro_proto::rdma::{ConnectRequest, CQE_LEN, SQE_LEN};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const TIMEOUT: Duration = Duration::from_secs(20);
const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:6c0a5b8e-0d1b-4c8e-9d6a-1ab0c0ffee0d";

struct Host {
    ch: Arc<EventChannel>,
    id: CmId,
    cc: Arc<CompletionChannel>,
    cq: Arc<CompletionQueue>,
    /// 0..64: the capsule; 64..80: the received completion; 1024..2048: Connect data.
    mem: MemoryRegion<DmaBuf>,
}

fn expect_event(ch: &Arc<EventChannel>, kind: CmEventKind) -> Res<CmEvent> {
    let ev = ch.wait_event(TIMEOUT)?.ok_or_else(|| format!("no rdma_cm event within {TIMEOUT:?} (waiting for {})", event_name(kind)))?;
    if ev.kind != kind {
        return Err(format!("expected {}, got {} (status {})", event_name(kind), event_name(ev.kind), ev.status).into());
    }
    Ok(ev)
}

/// Resolves `addr` and sets up a queue pair; the connect is the caller's.
fn host(addr: SocketAddr, devices: &[Device]) -> Res<Host> {
    let ch = EventChannel::new()?;
    let mut id = CmId::new(&ch)?;
    id.resolve_addr(None, addr, Duration::from_secs(5))?;
    expect_event(&ch, CmEventKind::AddrResolved)?;
    id.resolve_route(Duration::from_secs(5))?;
    expect_event(&ch, CmEventKind::RouteResolved)?;
    let dev = id.device_in(devices).ok_or("the rdma_cm id is on no device of this host")?.clone();
    let pd = ProtectionDomain::new(&dev)?;
    let cc = CompletionChannel::new(&dev)?;
    let cq = CompletionQueue::new(&dev, 16, Some(&cc))?;
    let mem = pd.register(DmaBuf::zeroed(4096), Access::LOCAL_WRITE | Access::REMOTE_READ | Access::REMOTE_WRITE)?;
    id.create_qp(&pd, &cq, &cq, QpCaps { max_send_wr: 8, max_recv_wr: 8, max_send_sge: 1, max_recv_sge: 1, max_inline_data: 0 })?;
    Ok(Host { ch, id, cc, cq, mem })
}

impl Host {
    fn connect(&self, private_data: &[u8]) -> Res<CmEvent> {
        self.id.post_recv(1, &[self.mem.sge(SQE_LEN, CQE_LEN)?])?;
        self.id.connect(&ConnParam { private_data, ..ConnParam::default() })?;
        Ok(self.ch.wait_event(TIMEOUT)?.ok_or("no answer to the connect request")?)
    }

    /// Sends a Connect capsule whose keyed SGL names `len` bytes at our data buffer with `key`.
    fn send_connect(&mut self, len: u32, key: u32, subnqn: &str) -> Res<()> {
        let (mut sqe, data) = nvmetro_proto::cmds::connect(7, 0, 32, 0, 0xffff, subnqn, HOSTNQN, [0x5a; 16]);
        sqe.set_keyed_sgl(self.mem.addr() + 1024, len, key);
        self.mem.write(1024, &data)?;
        self.mem.write(0, &sqe.0)?;
        self.id.post_send(2, SendOp::Send, &[self.mem.sge(0, SQE_LEN)?], SendFlags::SIGNALED)?;
        Ok(())
    }

    /// The next completion (parks on the completion channel), or None after `timeout`.
    fn completion(&self, timeout: Duration) -> Res<Option<WorkCompletion>> {
        let deadline = Instant::now() + timeout;
        let mut wcs: [WorkCompletion; 1] = Default::default();
        loop {
            if self.cq.poll(&mut wcs)? == 1 {
                return Ok(Some(std::mem::take(&mut wcs[0])));
            }
            self.cq.arm(false)?;
            if self.cq.poll(&mut wcs)? == 1 {
                return Ok(Some(std::mem::take(&mut wcs[0])));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut ready = [false];
            wait_readable(&[self.cc.fd()], left.min(Duration::from_millis(200)), &mut ready)?;
            self.cc.take_events(|_| {})?;
        }
    }

    /// The status of the completion the target sends for our capsule.
    fn response_status(&self) -> Res<u16> {
        loop {
            let wc = self.completion(TIMEOUT)?.ok_or("no completion from the target")?;
            if let Some(e) = wc.error() {
                return Err(format!("work request {} failed: {e}", wc.wr_id()).into());
            }
            if wc.wr_id() == 1 {
                let mut cqe = [0u8; CQE_LEN];
                self.mem.read(SQE_LEN, &mut cqe)?;
                return Ok(u16::from_le_bytes([cqe[14], cqe[15]]) >> 1);
            }
        }
    }

    /// Waits for the target to end the connection: a Disconnected event or flushed receives.
    fn ended_by_target(&self) -> Res<String> {
        let deadline = Instant::now() + TIMEOUT;
        while Instant::now() < deadline {
            if let Some(ev) = self.ch.wait_event(Duration::from_millis(100))? {
                if ev.kind == CmEventKind::Disconnected {
                    return Ok("Disconnected event".into());
                }
            }
            if let Some(wc) = self.completion(Duration::from_millis(100))? {
                if wc.wr_id() == 1 && wc.error().is_none() {
                    let mut cqe = [0u8; CQE_LEN];
                    self.mem.read(SQE_LEN, &mut cqe)?;
                    return Err(format!("the target answered instead: status {:#x}", u16::from_le_bytes([cqe[14], cqe[15]]) >> 1).into());
                }
            }
        }
        Err("the target did not end the connection".into())
    }
}

/// A host whose admin queue pair is connected.
fn connected(addr: SocketAddr, devices: &[Device]) -> Res<Host> {
    let h = host(addr, devices)?;
    let ev = h.connect(&private(0))?;
    if ev.kind != CmEventKind::Established {
        return Err(format!("connect: {}", event_name(ev.kind)).into());
    }
    Ok(h)
}

fn private(qid: u16) -> [u8; 32] {
    ConnectRequest { qid, hrqsize: 32, hsqsize: 31, cntlid: 0xffff }.encode()
}

fn run_case(name: &str, f: impl FnOnce() -> Res<String>) -> bool {
    match f() {
        Ok(what) => {
            println!("CASE {name}: ok: {what}");
            true
        }
        Err(e) => {
            println!("CASE {name}: FAILED: {e}");
            false
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(addr), Some(subnqn)) = (args.get(1).and_then(|a| a.parse::<SocketAddr>().ok()), args.get(2)) else {
        eprintln!("usage: rdma_hostile_host ADDR:PORT SUBSYSTEM-NQN");
        std::process::exit(2);
    };
    let devices = match Device::list() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let mut ok = true;
    ok &= run_case("bad-private-data", || {
        let h = host(addr, &devices)?;
        let mut bad = private(0);
        bad[0] = 1;
        let ev = h.connect(&bad)?;
        if ev.kind != CmEventKind::Rejected {
            return Err(format!("expected a reject, got {}", event_name(ev.kind)).into());
        }
        let sts = ev.private_data.get(2..4).map(|b| u16::from_le_bytes([b[0], b[1]]));
        if sts != Some(2) {
            return Err(format!("reject status {sts:?}, expected 2 (invalid record format)").into());
        }
        Ok("rejected with status 2 (invalid record format)".into())
    });
    ok &= run_case("too-long-sgl", || {
        let mut h = connected(addr, &devices)?;
        h.send_connect(1 << 20, h.mem.rkey(), subnqn)?;
        let status = h.response_status()?;
        let want = Status::SGL_DATA_LENGTH_INVALID.0 & 0x7ff;
        if status & 0x7ff != want {
            return Err(format!("status {status:#x}, expected {want:#x}").into());
        }
        let _ = h.id.disconnect();
        Ok(format!("completed with status {status:#x} (SGL data block length invalid)"))
    });
    ok &= run_case("wrong-rkey", || {
        let mut h = connected(addr, &devices)?;
        h.send_connect(1024, h.mem.rkey() ^ 0x5a5a_0000, subnqn)?;
        let how = h.ended_by_target()?;
        Ok(format!("the target ended the queue pair ({how})"))
    });
    ok &= run_case("vanish", || {
        let mut h = connected(addr, &devices)?;
        h.send_connect(1024, h.mem.rkey(), subnqn)?;
        drop(h);
        Ok("queue pair destroyed with a transfer outstanding".into())
    });
    std::process::exit(if ok { 0 } else { 1 });
}
