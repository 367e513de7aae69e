//! Checks the RDMA verbs layer end to end between a server and a client over rdma_cm:
//! SEND/RECV both ways (inline, and with immediate data), RDMA WRITE, WRITE with immediate, RDMA READ against the peer's
//! registered buffer by its rkey (every byte checked), RDMA READs straight into buffers of a
//! registered pool (zero copy: a read is completed only by its own completion, and a read dropped
//! in flight keeps its buffer until the queue pair is destroyed), and an RDMA WRITE with a wrong
//! rkey that must complete with an error status (not hang, not panic). Completions are awaited the way an
//! adaptive reactor parks: poll, arm, poll again, then wait on the completion channel's fd.
//!
//! ```sh
//! cargo run -p nvmetro-ffi --features rdma --example rdma_pingpong -- --loopback 10.0.2.15:7471
//! rdma_pingpong --server 0.0.0.0:7471      # and elsewhere:
//! rdma_pingpong --client 10.0.2.15:7471
//! ```
//!
//! Needs an RDMA device (`modprobe rdma_rxe; rdma link add rxe0 type rxe netdev eth0`); exits 2
//! saying so when there is none, 1 on any failed check, 0 after `rdma_pingpong: PASS`.

use nvmetro_ffi::rdma::{
    event_name, Access, CmEvent, CmEventKind, CmId, CompletionChannel, CompletionQueue, ConnParam, Device, EventChannel, MemoryRegion,
    PostedBuffer, ProtectionDomain, QpCaps, RdmaError, RecvRequest, RegisteredPool, RemoteBuf, SendFlags, SendOp, SendRequest, WcOpcode,
    WorkCompletion, ZERO_COPY_WR_ID,
};
use nvmetro_ffi::{wait_readable, DmaBuf};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const BUF_LEN: usize = 64 << 10;
const CHUNK: usize = 4096;
const MSG_LEN: usize = 64;
const SEND_SLOT: usize = 3 * MSG_LEN;
const IMM: u32 = 0x00C0_FFEE;
const DONE_IMM: u32 = 0xD0_4E00;
const TIMEOUT: Duration = Duration::from_secs(20);

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 8) as u8).collect()
}

/// One end: its connection, queues and two registered regions (a data buffer the peer may read
/// and write, and message slots: three receive slots, then the send slot).
struct End {
    id: CmId,
    cc: Arc<CompletionChannel>,
    cq: Arc<CompletionQueue>,
    buf: MemoryRegion<DmaBuf>,
    msgs: MemoryRegion<DmaBuf>,
    pd: Arc<ProtectionDomain>,
    name: &'static str,
    /// Completions that came before the one awaited (sends and receives share the CQ, and a
    /// peer's answer may complete before our own send's completion is polled).
    early: std::cell::RefCell<std::collections::VecDeque<WorkCompletion>>,
}

impl End {
    fn new(name: &'static str, mut id: CmId, devices: &[Device]) -> Res<End> {
        let dev = id.device_in(devices).ok_or("the rdma_cm id is on no device of this host")?.clone();
        let pd = ProtectionDomain::new(&dev)?;
        let cc = CompletionChannel::new(&dev)?;
        let cq = CompletionQueue::new(&dev, 64, Some(&cc))?;
        let buf = pd.register(DmaBuf::zeroed(BUF_LEN), Access::LOCAL_WRITE | Access::REMOTE_WRITE | Access::REMOTE_READ)?;
        let msgs = pd.register(DmaBuf::zeroed(4 * MSG_LEN), Access::LOCAL_WRITE)?;
        id.create_qp(&pd, &cq, &cq, QpCaps { max_send_wr: 16, max_recv_wr: 16, ..QpCaps::default() })?;
        let end = End { id, cc, cq, buf, msgs, pd, name, early: Default::default() };
        let slots = [end.msgs.sge(0, MSG_LEN)?, end.msgs.sge(MSG_LEN, MSG_LEN)?, end.msgs.sge(2 * MSG_LEN, MSG_LEN)?];
        let recvs: Vec<RecvRequest<'_>> = (0..3).map(|i| RecvRequest { wr_id: i as u64, sges: &slots[i..i + 1] }).collect();
        end.id.post_recvs(&recvs).map_err(|(n, e)| format!("{name}: posted {n} of 3 receives: {e}"))?;
        println!("{name}: device {}, QP {}, buffer {:?}", dev.name(), end.id.qp_num().unwrap_or(0), end.buf);
        Ok(end)
    }

    /// The next completion, parking on the completion channel when there is none.
    fn completion(&self) -> Res<WorkCompletion> {
        let deadline = Instant::now() + TIMEOUT;
        let mut wcs: [WorkCompletion; 1] = Default::default();
        loop {
            if self.cq.poll(&mut wcs)? == 1 {
                return Ok(std::mem::take(&mut wcs[0]));
            }
            self.cq.arm(false)?;
            if self.cq.poll(&mut wcs)? == 1 {
                return Ok(std::mem::take(&mut wcs[0]));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("{}: no completion within {TIMEOUT:?}", self.name).into());
            }
            let mut ready = [false];
            wait_readable(&[self.cc.fd()], left, &mut ready)?;
            let cq = self.cq.handle();
            self.cc.take_events(|h| assert_eq!(h, cq, "an event for a CQ of another channel"))?;
        }
    }

    /// The next completion, which must be a success of `opcode` (and `wr_id` for sends).
    /// A successful completion that came early and matches is taken first; a successful one of
    /// the other direction (a send's while a receive is awaited, or the reverse) is kept for
    /// later; anything else is an error.
    fn expect(&self, opcode: WcOpcode, wr_id: Option<u64>) -> Res<WorkCompletion> {
        let matches = |wc: &WorkCompletion| wc.opcode() == opcode && wr_id.is_none_or(|w| w == wc.wr_id());
        let found = {
            let mut early = self.early.borrow_mut();
            early.iter().position(matches).and_then(|i| early.remove(i))
        };
        if let Some(wc) = found {
            return Ok(wc);
        }
        loop {
            let wc = self.completion()?;
            if let Some(e) = wc.error() {
                return Err(format!("{}: wr {}: {e}", self.name, wc.wr_id()).into());
            }
            if matches(&wc) {
                return Ok(wc);
            }
            let receive = |o: WcOpcode| matches!(o, WcOpcode::Recv | WcOpcode::RecvRdmaWithImm);
            let other_direction = receive(wc.opcode()) != receive(opcode);
            if !other_direction || self.early.borrow().len() >= 8 {
                return Err(format!("{}: expected {opcode:?} (wr {wr_id:?}), got {wc:?}", self.name).into());
            }
            self.early.borrow_mut().push_back(wc);
        }
    }

    /// Sends a message: a 4-byte tag and a remote buffer, with immediate data if `imm` is set,
    /// copied into the request (inline) if `inline`.
    fn send(&mut self, wr_id: u64, tag: &[u8; 4], remote: RemoteBuf, imm: Option<u32>, inline: bool) -> Res<()> {
        let mut m = [0u8; 20];
        m[..4].copy_from_slice(tag);
        m[4..].copy_from_slice(&remote.to_bytes());
        self.msgs.write(SEND_SLOT, &m)?;
        let op = imm.map_or(SendOp::Send, SendOp::SendWithImm);
        let flags = if inline { SendFlags::SIGNALED | SendFlags::INLINE } else { SendFlags::SIGNALED };
        self.id.post_send(wr_id, op, &[self.msgs.sge(SEND_SLOT, m.len())?], flags)?;
        self.expect(WcOpcode::Send, Some(wr_id))?;
        Ok(())
    }

    /// Receives a message with tag `tag` (and immediate data `imm`) and reposts its slot.
    fn recv(&self, tag: &[u8; 4], imm: Option<u32>) -> Res<RemoteBuf> {
        let wc = self.expect(WcOpcode::Recv, None)?;
        let slot = wc.wr_id() as usize;
        let mut m = [0u8; 20];
        self.msgs.read(slot * MSG_LEN, &mut m)?;
        if wc.byte_len() != 20 || &m[..4] != tag || wc.imm_data() != imm {
            let (n, got) = (wc.byte_len(), wc.imm_data());
            return Err(
                format!("{}: expected a {tag:?} message with immediate {imm:?}, got {n} bytes {:?}, {got:?}", self.name, &m[..4]).into()
            );
        }
        if let Some(imm) = imm {
            println!("{}: SEND with immediate {imm:#x} arrived", self.name);
        }
        self.id.post_recv(slot as u64, &[self.msgs.sge(slot * MSG_LEN, MSG_LEN)?])?;
        Ok(RemoteBuf::from_bytes(&m[4..]).ok_or("short remote buffer")?)
    }

    fn check(&self, offset: usize, want: &[u8], what: &str) -> Res<()> {
        let mut got = vec![0u8; want.len()];
        self.buf.read(offset, &mut got)?;
        if got != want {
            let first = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            return Err(format!("{}: {what}: byte {first} is {:#x}, expected {:#x}", self.name, got[first], want[first]).into());
        }
        println!("{}: {what}: {} bytes match", self.name, want.len());
        Ok(())
    }
}

fn expect_event(ch: &Arc<EventChannel>, kind: CmEventKind) -> Res<CmEvent> {
    let ev = ch.wait_event(TIMEOUT)?.ok_or_else(|| format!("no rdma_cm event within {TIMEOUT:?} (waiting for {})", event_name(kind)))?;
    if ev.kind != kind {
        return Err(format!("expected {}, got {} (status {})", event_name(kind), event_name(ev.kind), ev.status).into());
    }
    Ok(ev)
}

fn server(addr: SocketAddr, listening: impl FnOnce(SocketAddr)) -> Res<()> {
    let devices = Device::list()?;
    let ch = EventChannel::new()?;
    let listener = CmId::new(&ch)?;
    listener.set_reuse_addr(true)?;
    listener.listen(addr, 4)?;
    let bound = listener.local_addr().unwrap_or(addr);
    println!("server: listening on {bound}");
    listening(bound);
    let req = expect_event(&ch, CmEventKind::ConnectRequest)?;
    if req.listener != Some(listener.handle()) {
        return Err("connect request not from our listener".into());
    }
    let id = req.request.ok_or("connect request without an id")?;
    println!("server: request from {:?}, initiator depth {}", id.peer_addr(), req.initiator_depth);
    let mut end = End::new("server", id, &devices)?;
    end.buf.write(2 * CHUNK, &pattern(0x53, CHUNK))?;
    end.id.accept(&ConnParam::default())?;
    expect_event(&ch, CmEventKind::Established)?;

    let client_buf = end.recv(b"HELO", None)?;
    end.send(100, b"BUF ", end.buf.remote(0, BUF_LEN)?, None, false)?;
    // The client RDMA WRITEs chunk 0, then WRITEs chunk 1 with immediate, which consumes a receive.
    let wc = end.expect(WcOpcode::RecvRdmaWithImm, None)?;
    if wc.imm_data() != Some(IMM) {
        return Err(format!("server: immediate {:?}, expected {IMM:#x}", wc.imm_data()).into());
    }
    println!("server: WRITE with immediate {IMM:#x} arrived ({} bytes)", wc.byte_len());
    end.id.post_recv(wc.wr_id(), &[end.msgs.sge(wc.wr_id() as usize * MSG_LEN, MSG_LEN)?])?;
    end.check(0, &pattern(0xC1, CHUNK), "client's RDMA WRITE")?;
    end.check(CHUNK, &pattern(0xC2, CHUNK), "client's RDMA WRITE with immediate")?;
    // Our RDMA WRITE into the client's buffer, then a SEND it sees only after the data (RC order).
    end.buf.write(3 * CHUNK, &pattern(0x5E, CHUNK))?;
    let target = client_buf.offset(8 * CHUNK as u32).ok_or("client buffer too small")?;
    end.id.post_send(101, SendOp::Write(target), &[end.buf.sge(3 * CHUNK, CHUNK)?], SendFlags::SIGNALED)?;
    end.expect(WcOpcode::RdmaWrite, Some(101))?;
    end.send(102, b"DONE", client_buf, Some(DONE_IMM), false)?;
    // The client ends with a bad-rkey WRITE (the QPs fail) and disconnects.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match ch.wait_event(left)? {
            Some(ev) if ev.kind == CmEventKind::Disconnected => break,
            Some(ev) => println!("server: {} (status {})", event_name(ev.kind), ev.status),
            None => return Err("server: no Disconnected event".into()),
        }
    }
    println!("server: disconnected");
    Ok(())
}

fn client(addr: SocketAddr) -> Res<()> {
    let devices = Device::list()?;
    let ch = EventChannel::new()?;
    let mut tries = 0;
    let mut end = loop {
        let id = CmId::new(&ch)?;
        id.resolve_addr(None, addr, Duration::from_secs(5))?;
        expect_event(&ch, CmEventKind::AddrResolved)?;
        id.resolve_route(Duration::from_secs(5))?;
        expect_event(&ch, CmEventKind::RouteResolved)?;
        let end = End::new("client", id, &devices)?;
        end.id.connect(&ConnParam { private_data: b"nvmetro", ..ConnParam::default() })?;
        let ev = ch.wait_event(TIMEOUT)?.ok_or("client: no answer to connect")?;
        match ev.kind {
            CmEventKind::Established => break end,
            CmEventKind::Rejected if tries < 40 => {
                tries += 1; // the server does not listen yet
                std::thread::sleep(Duration::from_millis(250));
            }
            k => return Err(format!("client: connect: {} (status {})", event_name(k), ev.status).into()),
        }
    };
    println!("client: connected to {addr}");
    end.send(1, b"HELO", end.buf.remote(0, BUF_LEN)?, None, true)?;
    let server_buf = end.recv(b"BUF ", None)?;
    println!("client: server buffer {server_buf:?}");

    end.buf.write(0, &pattern(0xC1, CHUNK))?;
    end.buf.write(CHUNK, &pattern(0xC2, CHUNK))?;
    // Both WRITEs behind one doorbell; they complete in order.
    let second = server_buf.offset(CHUNK as u32).ok_or("server buffer too small")?;
    let (first_sge, second_sge) = ([end.buf.sge(0, CHUNK)?], [end.buf.sge(CHUNK, CHUNK)?]);
    let batch = [
        SendRequest { wr_id: 2, op: SendOp::Write(server_buf), sges: &first_sge, flags: SendFlags::SIGNALED },
        SendRequest { wr_id: 3, op: SendOp::WriteWithImm(second, IMM), sges: &second_sge, flags: SendFlags::SIGNALED },
    ];
    end.id.post_sends(&batch).map_err(|(n, e)| format!("client: posted {n} of 2 WRITEs: {e}"))?;
    end.expect(WcOpcode::RdmaWrite, Some(2))?;
    end.expect(WcOpcode::RdmaWrite, Some(3))?;
    end.recv(b"DONE", Some(DONE_IMM))?;
    end.check(8 * CHUNK, &pattern(0x5E, CHUNK), "server's RDMA WRITE")?;

    let third = server_buf.offset(2 * CHUNK as u32).ok_or("server buffer too small")?;
    end.id.post_send(4, SendOp::Read(third), &[end.buf.sge(4 * CHUNK, CHUNK)?], SendFlags::SIGNALED)?;
    let wc = end.expect(WcOpcode::RdmaRead, Some(4))?;
    println!("client: RDMA READ of {} bytes", wc.byte_len());
    end.check(4 * CHUNK, &pattern(0x53, CHUNK), "RDMA READ of the server's buffer")?;

    let pool = zero_copy_reads(&end, third)?;

    // A request longer than the remote buffer is refused before it reaches the device.
    let tail = server_buf.offset(BUF_LEN as u32 - 8).ok_or("server buffer too small")?;
    match end.id.post_send(5, SendOp::Read(tail), &[end.buf.sge(0, 64)?], SendFlags::SIGNALED) {
        Err(RdmaError::Invalid(m)) => println!("client: overlong READ refused locally: {m}"),
        other => return Err(format!("client: overlong READ was not refused: {other:?}").into()),
    }
    // A wrong rkey: the server's device refuses, and we get an error completion.
    let bad = RemoteBuf { rkey: server_buf.rkey ^ 0x00ab_cd00, ..server_buf };
    end.id.post_send(6, SendOp::Write(bad), &[end.buf.sge(0, CHUNK)?], SendFlags::SIGNALED)?;
    let wc = end.completion()?;
    let err = wc.error().ok_or_else(|| format!("client: a WRITE with a wrong rkey succeeded: {wc:?}"))?;
    if wc.wr_id() != 6 {
        return Err(format!("client: error completion for wr {}, expected 6", wc.wr_id()).into());
    }
    println!("client: WRITE with a wrong rkey failed as it must: {err} (remote access error: {})", err.is_remote_access());
    // A zero-copy read on the failed queue pair is refused, or flushed: either way the buffer
    // comes back with the error.
    let buf = pool.take(CHUNK).ok_or("client: no idle zero-copy buffer")?;
    match end.id.post_read_into(&pool, buf, third) {
        Err((_buf, e)) => println!("client: zero-copy READ on the failed queue pair refused: {e}"),
        Ok(mut posted) => {
            // The failed queue pair flushes its receives too; the read's completion is among them.
            let err = loop {
                let wc = end.completion()?;
                match posted.complete(&wc) {
                    Ok((_buf, err)) => break err.ok_or("client: a zero-copy READ on a failed queue pair succeeded")?,
                    Err(p) if wc.error().is_some_and(|e| e.is_flush()) => posted = p,
                    Err(p) => return Err(format!("client: {p:?} waiting for its completion, got {wc:?}").into()),
                }
            };
            println!("client: zero-copy READ on the failed queue pair completed with an error: {err}");
        }
    }
    end.id.disconnect()?;
    let _ = ch.wait_event(Duration::from_secs(5))?; // Disconnected, or nothing: either is fine here

    // The buffer of the read dropped in flight comes back only once the queue pair is gone.
    let total = pool.size() / CHUNK;
    if pool.idle() != total - 1 {
        return Err(format!(
            "client: {} of {total} zero-copy buffers idle before the QP is destroyed, expected {}",
            pool.idle(),
            total - 1
        )
        .into());
    }
    drop(end);
    if pool.idle() != total {
        return Err(format!("client: {} of {total} zero-copy buffers idle after the QP was destroyed", pool.idle()).into());
    }
    println!("client: the buffer of the read dropped in flight came back when the queue pair was destroyed");
    Ok(())
}

/// RDMA READs straight into buffers of a registered pool: the data lands in the buffer, a read
/// is completed only by its own completion, requests that would break the pool's rules are
/// refused, and a read dropped in flight keeps its buffer out of the pool (checked at the end).
fn zero_copy_reads(end: &End, remote: RemoteBuf) -> Res<RegisteredPool> {
    let pool = RegisteredPool::new(&end.pd, &[(CHUNK, 4)], true)?;
    println!("client: {pool:?}");
    let read = |len: usize| -> Res<PostedBuffer> {
        let mut buf = pool.take(CHUNK).ok_or("client: no idle zero-copy buffer")?;
        buf.set_len(len);
        Ok(end.id.post_read_into(&pool, buf, remote).map_err(|(_, e)| e)?)
    };
    let (a, b) = (read(CHUNK)?, read(CHUNK / 2)?);
    let wc_a = end.expect(WcOpcode::RdmaRead, Some(a.wr_id()))?;
    let wc_b = end.expect(WcOpcode::RdmaRead, Some(b.wr_id()))?;
    let a = match a.complete(&wc_b) {
        Err(a) => a,
        Ok(_) => return Err("client: a zero-copy read took another read's completion".into()),
    };
    let (got_a, err) = a.complete(&wc_a).map_err(|_| "client: a zero-copy read refused its own completion")?;
    let (got_b, _) = b.complete(&wc_b).map_err(|_| "client: a zero-copy read refused its own completion")?;
    let want = pattern(0x53, CHUNK);
    if err.is_some() || got_a[..] != want[..] || got_b[..] != want[..CHUNK / 2] {
        return Err(format!("client: zero-copy READs brought the wrong bytes ({err:?})").into());
    }
    println!("client: zero-copy RDMA READs of {} and {} bytes match", got_a.len(), got_b.len());
    drop((got_a, got_b));
    // A buffer from elsewhere, and a wr_id of the reserved kind, are refused before the device.
    match end.id.post_read_into(&pool, nvmetro_ffi::IoBufMut::unpooled(CHUNK), remote) {
        Err((_, RdmaError::Invalid(m))) => println!("client: a buffer of no registered pool refused: {m}"),
        other => return Err(format!("client: a buffer of no registered pool was not refused: {other:?}").into()),
    }
    match end.id.post_send(ZERO_COPY_WR_ID | 7, SendOp::Read(remote), &[end.buf.sge(0, 64)?], SendFlags::SIGNALED) {
        Err(RdmaError::Invalid(m)) => println!("client: a reserved wr_id refused: {m}"),
        other => return Err(format!("client: a reserved wr_id was not refused: {other:?}").into()),
    }
    // Dropped in flight: its buffer stays with the queue pair.
    let c = read(CHUNK)?;
    let c_wr = c.wr_id();
    drop(c);
    end.expect(WcOpcode::RdmaRead, Some(c_wr))?;
    if pool.idle() != 3 {
        return Err(format!("client: {} zero-copy buffers idle after a read was dropped in flight, expected 3", pool.idle()).into());
    }
    Ok(pool)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: rdma_pingpong --loopback ADDR:PORT | --server ADDR:PORT | --client ADDR:PORT";
    let (mode, addr) = match (args.first().map(String::as_str), args.get(1).and_then(|a| a.parse::<SocketAddr>().ok())) {
        (Some(m @ ("--loopback" | "--server" | "--client")), Some(a)) => (m.to_string(), a),
        _ => {
            eprintln!("{usage}");
            std::process::exit(64);
        }
    };
    let result = match mode.as_str() {
        "--server" => server(addr, |_| ()),
        "--client" => client(addr),
        _ => {
            let (tx, rx) = std::sync::mpsc::channel();
            let srv = std::thread::spawn(move || {
                server(addr, |a| {
                    let _ = tx.send(a);
                })
            });
            match rx.recv() {
                Ok(bound) => {
                    let c = client(bound);
                    let s = srv.join().unwrap_or_else(|_| Err("server thread panicked".into()));
                    c.and(s)
                }
                Err(_) => srv.join().unwrap_or_else(|_| Err("server thread panicked".into())),
            }
        }
    };
    match result {
        Ok(()) => println!("rdma_pingpong: PASS ({mode} {addr})"),
        Err(e) => {
            eprintln!("rdma_pingpong: FAIL: {e}");
            let no_device = e.downcast_ref::<RdmaError>().is_some_and(RdmaError::is_no_device);
            std::process::exit(if no_device { 2 } else { 1 });
        }
    }
}
