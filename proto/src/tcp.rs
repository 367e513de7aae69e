//! NVMe/TCP queue state machines, one per connection: [`TargetTransport`] for the controller side
//! and [`HostTransport`] for the initiator side. Both take received bytes, append bytes to send to
//! a caller-owned buffer, and report commands or completions as events.
//!
//! Writes whose data is not in the capsule are pulled with R2T, one window of at most MAXH2CDATA
//! at a time (MAXR2T 1). Reads return data in C2HData PDUs padded to the host's HPDA.
//!
//! A target queue bounds what a hostile host can make it hold: at most the queue's depth of
//! commands outstanding (received and not yet answered; one, the Connect, before Connect
//! succeeded), so at most depth x MDTS bytes of R2T buffers; and no R2T buffer at all before
//! Connect but the Connect's own 1 KiB.

use crate::nvme::{admin, fctype, sgl, Command, Completion, DataDirection, Status};
use crate::pdu::{self, fes, Digests, Pdu, PduError};
use std::collections::HashMap;

/// Where a target writes its responses: header bytes, and data buffers handed over whole so they
/// can be sent without another copy (a plain `Vec<u8>` copies them in).
pub trait PduSink {
    fn bytes(&mut self) -> &mut Vec<u8>;
    fn data(&mut self, data: Vec<u8>);
}

impl PduSink for Vec<u8> {
    fn bytes(&mut self) -> &mut Vec<u8> {
        self
    }
    fn data(&mut self, data: Vec<u8>) {
        self.extend_from_slice(&data);
    }
}

/// Where a target queue puts the host data it receives: a buffer pool in the daemon (so the
/// data reaches the block device without another copy or allocation), plain vectors by default.
pub trait DataBuffers {
    type Buf: AsRef<[u8]> + AsMut<[u8]> + Default;
    /// A buffer of exactly `len` bytes; its contents do not matter (every byte is overwritten).
    fn buffer(&mut self, len: usize) -> Self::Buf;
}

/// Host data in new, zeroed vectors.
#[derive(Debug, Default, Clone, Copy)]
pub struct VecBuffers;

impl DataBuffers for VecBuffers {
    type Buf = Vec<u8>;
    fn buffer(&mut self, len: usize) -> Vec<u8> {
        vec![0; len]
    }
}

/// Limits a target queue enforces.
#[derive(Debug, Clone, Copy)]
pub struct TargetLimits {
    /// Largest in-capsule data accepted (the admin queue takes 8 KiB, as Linux sends).
    pub in_capsule: usize,
    /// MAXH2CDATA advertised in ICResp.
    pub maxh2cdata: u32,
    /// Largest transfer for one command (MDTS in bytes).
    pub max_transfer: usize,
}

impl Default for TargetLimits {
    fn default() -> Self {
        TargetLimits { in_capsule: 8192, maxh2cdata: 128 * 1024, max_transfer: 128 * 1024 }
    }
}

/// What the transport hands to the controller.
#[derive(Debug, PartialEq, Eq)]
pub enum TargetEvent<D = Vec<u8>> {
    /// A command with all of its host-to-controller data (empty for other commands).
    Command { cmd: Command, data: D },
    /// A command that failed at the transport (bad SGL, too long): send this completion as is.
    Reject(Completion),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetState {
    AwaitIcReq,
    Ready,
}

#[derive(Debug)]
struct PendingH2C<D> {
    cmd: Command,
    buf: D,
    received: usize,
    window_end: usize,
}

/// The controller side of one NVMe/TCP connection.
#[derive(Debug)]
pub struct TargetTransport<B: DataBuffers = VecBuffers> {
    state: TargetState,
    limits: TargetLimits,
    digests: Digests,
    hpda: u8,
    buffers: B,
    pending: HashMap<u16, PendingH2C<B::Buf>>,
    /// Most commands the host may have outstanding (the queue size once connected).
    queue_depth: u32,
    /// Commands received and not yet answered through [`TargetTransport::respond`] & co.
    outstanding: u32,
    /// The queue's Connect succeeded: commands other than Connect may pull data.
    connected: bool,
}

/// Bytes of data a Connect carries.
const CONNECT_DATA: usize = 1024;

impl TargetTransport {
    pub fn new(limits: TargetLimits) -> TargetTransport {
        TargetTransport::with_buffers(limits, VecBuffers)
    }
}

impl<B: DataBuffers> TargetTransport<B> {
    /// A queue whose host data lands in buffers from `buffers`.
    pub fn with_buffers(limits: TargetLimits, buffers: B) -> TargetTransport<B> {
        TargetTransport {
            state: TargetState::AwaitIcReq,
            limits,
            digests: Digests::default(),
            hpda: 0,
            buffers,
            pending: HashMap::new(),
            queue_depth: 1,
            outstanding: 0,
            connected: false,
        }
    }

    /// The queue's Connect succeeded with `entries` (one-based) queue entries: the host may have
    /// that many commands outstanding from now on, and may send data for any of them.
    pub fn set_connected(&mut self, entries: u32) {
        self.queue_depth = entries.max(1);
        self.connected = true;
    }

    /// Commands received and not yet answered.
    pub fn outstanding(&self) -> u32 {
        self.outstanding
    }

    /// Bytes of R2T buffers held for commands whose data is still coming.
    pub fn buffered_bytes(&self) -> usize {
        self.pending.values().map(|p| p.buf.as_ref().len()).sum()
    }

    /// `n` outstanding commands end without a response (Async Event Requests a controller
    /// reset dropped).
    pub fn forget_commands(&mut self, n: usize) {
        self.outstanding = self.outstanding.saturating_sub(n as u32);
    }

    fn answered(&mut self) {
        self.outstanding = self.outstanding.saturating_sub(1);
    }

    pub fn digests(&self) -> Digests {
        self.digests
    }

    pub fn is_ready(&self) -> bool {
        self.state == TargetState::Ready
    }

    /// Changes the in-capsule limit once the queue type is known (after Connect).
    pub fn set_in_capsule(&mut self, bytes: usize) {
        self.limits.in_capsule = bytes;
    }

    /// Consumes complete PDUs from `rx`, returns how many bytes it used. On a fatal error the
    /// TermReq (if any) has been appended to `tx` and the connection must be closed after sending.
    pub fn receive(&mut self, rx: &[u8], tx: &mut Vec<u8>, events: &mut Vec<TargetEvent<B::Buf>>) -> Result<usize, PduError> {
        let mut used = 0;
        loop {
            let max_data = self.limits.in_capsule.max(self.limits.maxh2cdata as usize);
            let parsed = match pdu::parse(&rx[used..], self.digests, max_data) {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(used),
                Err(e) => return Err(self.fail(e, tx)),
            };
            let (p, n) = parsed;
            let bad = |fes, fei, reason| PduError::new(fes, fei, reason, &rx[used..used + n]);
            match (self.state, p) {
                (TargetState::AwaitIcReq, Pdu::IcReq { hpda, digests, .. }) => {
                    self.hpda = hpda;
                    self.digests = digests;
                    pdu::encode_icresp(tx, 0, digests, self.limits.maxh2cdata);
                    self.state = TargetState::Ready;
                }
                (_, Pdu::TermReq { fes, fei, .. }) => {
                    return Err(PduError { fes: None, fei, reason: "host sent a TermReq", header: fes.to_le_bytes().to_vec() });
                }
                (TargetState::Ready, Pdu::CapsuleCmd { cmd, data }) => {
                    if self.outstanding >= self.queue_depth {
                        let why = if self.connected {
                            "more commands outstanding than the queue size"
                        } else {
                            "a command before the queue's Connect completed"
                        };
                        return Err(self.fail(bad(fes::PDU_SEQUENCE_ERROR, 0, why), tx));
                    }
                    self.outstanding += 1;
                    self.on_capsule(cmd, data, tx, events)
                }
                (TargetState::Ready, Pdu::H2CData { cccid, ttag, datao, data, last }) => {
                    let Some(p) = self.pending.get_mut(&ttag).filter(|p| p.cmd.cid() == cccid) else {
                        return Err(self.fail(bad(fes::INVALID_HEADER_FIELD, 10, "H2CData for an unknown transfer tag"), tx));
                    };
                    let off = datao as usize;
                    if off != p.received || off + data.len() > p.window_end {
                        return Err(self.fail(bad(fes::DATA_OUT_OF_RANGE, 12, "H2CData outside the R2T window"), tx));
                    }
                    p.buf.as_mut()[off..off + data.len()].copy_from_slice(data);
                    p.received += data.len();
                    let total = p.buf.as_ref().len();
                    if p.received == p.window_end {
                        if p.received == total {
                            let done = self.pending.remove(&ttag).expect("present");
                            events.push(TargetEvent::Command { cmd: done.cmd, data: done.buf });
                        } else {
                            p.window_end = (p.received + self.limits.maxh2cdata as usize).min(total);
                            let len = (p.window_end - p.received) as u32;
                            pdu::encode_r2t(tx, cccid, ttag, p.received as u32, len, self.digests);
                        }
                    } else if last {
                        return Err(self.fail(bad(fes::PDU_SEQUENCE_ERROR, 1, "last H2CData before the R2T window was full"), tx));
                    }
                }
                (TargetState::AwaitIcReq, _) => {
                    return Err(self.fail(bad(fes::PDU_SEQUENCE_ERROR, 0, "PDU before ICReq"), tx));
                }
                (TargetState::Ready, _) => {
                    return Err(self.fail(bad(fes::INVALID_HEADER_FIELD, 0, "PDU type not sent by a host"), tx));
                }
            }
            used += n;
        }
    }

    fn fail(&mut self, e: PduError, tx: &mut Vec<u8>) -> PduError {
        if let Some(code) = e.fes {
            pdu::encode_term_req(tx, true, code, e.fei, &e.header);
        }
        e
    }

    fn on_capsule(&mut self, cmd: Command, data: &[u8], tx: &mut Vec<u8>, events: &mut Vec<TargetEvent<B::Buf>>) {
        let reject = |status| TargetEvent::Reject(Completion::new(cmd.cid(), status));
        let len = cmd.sgl_len() as usize;
        let dir = cmd.direction();
        match cmd.sgl_type() {
            sgl::IN_CAPSULE => {
                if cmd.sgl_addr() != 0 || dir != DataDirection::HostToController {
                    return events.push(reject(Status::INVALID_FIELD));
                }
                if len != data.len() || len > self.limits.in_capsule {
                    return events.push(reject(Status::SGL_DATA_LENGTH_INVALID));
                }
                let mut buf = self.buffers.buffer(len);
                buf.as_mut().copy_from_slice(data);
                events.push(TargetEvent::Command { cmd, data: buf });
            }
            sgl::TRANSPORT => {
                if !data.is_empty() {
                    return events.push(reject(Status::INVALID_FIELD));
                }
                if len > self.limits.max_transfer {
                    return events.push(reject(Status::SGL_DATA_LENGTH_INVALID));
                }
                if dir == DataDirection::HostToController && len > 0 {
                    if !self.connected {
                        // Nothing but the Connect's own data is buffered before Connect.
                        if cmd.opcode() != admin::FABRICS || cmd.fctype() != fctype::CONNECT {
                            return events.push(reject(Status::COMMAND_SEQUENCE_ERROR));
                        }
                        if len != CONNECT_DATA {
                            return events.push(reject(Status::SGL_DATA_LENGTH_INVALID));
                        }
                    }
                    let ttag = cmd.cid();
                    if self.pending.contains_key(&ttag) {
                        return events.push(reject(Status::CID_CONFLICT));
                    }
                    let window = len.min(self.limits.maxh2cdata as usize);
                    pdu::encode_r2t(tx, cmd.cid(), ttag, 0, window as u32, self.digests);
                    let buf = self.buffers.buffer(len);
                    self.pending.insert(ttag, PendingH2C { cmd, buf, received: 0, window_end: window });
                } else {
                    events.push(TargetEvent::Command { cmd, data: B::Buf::default() });
                }
            }
            _ if len == 0 && data.is_empty() => events.push(TargetEvent::Command { cmd, data: B::Buf::default() }),
            _ => events.push(reject(Status::SGL_DESCRIPTOR_TYPE_INVALID)),
        }
    }

    /// Responds with `data` handed over whole. With `success_only` (the host disabled SQ flow
    /// control and the command succeeded) a read ends with a C2HData carrying the SUCCESS flag and
    /// no response capsule.
    pub fn respond_owned(&mut self, cqe: &Completion, data: Vec<u8>, success_only: bool, sink: &mut impl PduSink) {
        const CHUNK: usize = 128 * 1024;
        if data.is_empty() || data.len() > CHUNK {
            return self.respond(cqe, &data, sink.bytes());
        }
        self.answered();
        let success = success_only && cqe.status().is_success();
        let flags = pdu::FLAG_LAST_PDU | if success { pdu::FLAG_SUCCESS } else { 0 };
        let align = (self.hpda as usize + 1) * 4;
        pdu::encode_data_header(sink.bytes(), pdu::C2H_DATA, flags, cqe.cid, 0, 0, data.len(), self.digests, align);
        let digest = self.digests.data.then(|| crc32c::crc32c(&data));
        sink.data(data);
        if let Some(d) = digest {
            sink.bytes().extend_from_slice(&d.to_le_bytes());
        }
        if !success {
            pdu::encode_capsule_resp(sink.bytes(), cqe, self.digests);
        }
    }

    /// Appends the response to a command: its data (for reads) in C2HData PDUs, then the capsule.
    pub fn respond(&mut self, cqe: &Completion, data: &[u8], tx: &mut Vec<u8>) {
        self.answered();
        const CHUNK: usize = 128 * 1024;
        let chunks = data.len().div_ceil(CHUNK);
        for (i, chunk) in data.chunks(CHUNK).enumerate() {
            pdu::encode_c2h_data(tx, cqe.cid, (i * CHUNK) as u32, chunk, i + 1 == chunks, false, self.digests, self.hpda);
        }
        pdu::encode_capsule_resp(tx, cqe, self.digests);
    }
}

/// Events of the host side.
#[derive(Debug, PartialEq, Eq)]
pub enum HostEvent {
    /// ICResp arrived: the queue can carry commands.
    Connected,
    /// A command finished, with the data it returned (reads).
    Completed { cqe: Completion, data: Vec<u8> },
}

#[derive(Debug)]
struct HostPending {
    write: Vec<u8>,
    read: Vec<u8>,
    read_len: usize,
}

/// The host side of one NVMe/TCP connection.
#[derive(Debug)]
pub struct HostTransport {
    digests: Digests,
    connected: bool,
    maxh2cdata: u32,
    cpda: u8,
    in_capsule: usize,
    pending: HashMap<u16, HostPending>,
}

impl HostTransport {
    /// Starts a connection: appends the ICReq asking for `digests`; `in_capsule` is the most data
    /// this queue may put in a capsule (8 KiB on admin queues, IOCCSZ-derived on I/O queues).
    pub fn new(digests: Digests, in_capsule: usize, tx: &mut Vec<u8>) -> HostTransport {
        pdu::encode_icreq(tx, 0, digests, 0);
        HostTransport { digests, connected: false, maxh2cdata: 0, cpda: 0, in_capsule, pending: HashMap::new() }
    }

    pub fn set_in_capsule(&mut self, bytes: usize) {
        self.in_capsule = bytes;
    }

    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// Appends a command. `write` is its host-to-controller data, `read_len` the bytes it returns.
    pub fn submit(&mut self, mut cmd: Command, write: Vec<u8>, read_len: usize, tx: &mut Vec<u8>) {
        if !write.is_empty() && write.len() <= self.in_capsule {
            cmd.set_sgl(0, write.len() as u32, sgl::IN_CAPSULE);
            pdu::encode_capsule_cmd(tx, &cmd, &write, self.digests, self.cpda);
            self.pending.insert(cmd.cid(), HostPending { write: Vec::new(), read: Vec::new(), read_len });
        } else {
            let len = if write.is_empty() { read_len } else { write.len() };
            cmd.set_sgl(0, len as u32, sgl::TRANSPORT);
            pdu::encode_capsule_cmd(tx, &cmd, &[], self.digests, self.cpda);
            self.pending.insert(cmd.cid(), HostPending { write, read: Vec::new(), read_len });
        }
    }

    /// Consumes complete PDUs from `rx`, returns how many bytes it used.
    pub fn receive(&mut self, rx: &[u8], tx: &mut Vec<u8>, events: &mut Vec<HostEvent>) -> Result<usize, PduError> {
        let mut used = 0;
        loop {
            let max = if self.connected { 4 << 20 } else { 0 };
            let Some((p, n)) = pdu::parse(&rx[used..], self.digests, max)? else { return Ok(used) };
            let bad = |fes, fei, reason| PduError::new(fes, fei, reason, &rx[used..used + n]);
            match p {
                Pdu::IcResp { digests, maxh2cdata, cpda, .. } if !self.connected => {
                    if digests != self.digests {
                        return Err(bad(fes::UNSUPPORTED_PARAMETER, 11, "controller changed the digest settings"));
                    }
                    if maxh2cdata < 4096 || maxh2cdata % 4 != 0 {
                        return Err(bad(fes::INVALID_HEADER_FIELD, 12, "MAXH2CDATA below 4096 or not a multiple of 4"));
                    }
                    self.maxh2cdata = maxh2cdata;
                    self.cpda = cpda;
                    self.connected = true;
                    events.push(HostEvent::Connected);
                }
                Pdu::CapsuleResp { cqe } => {
                    let data = self.pending.remove(&cqe.cid).map(|p| p.read).unwrap_or_default();
                    events.push(HostEvent::Completed { cqe, data });
                }
                Pdu::C2HData { cccid, datao, data, last, success } => {
                    let Some(p) = self.pending.get_mut(&cccid) else {
                        return Err(bad(fes::INVALID_HEADER_FIELD, 8, "C2HData for an unknown command"));
                    };
                    if datao as usize != p.read.len() || p.read.len() + data.len() > p.read_len {
                        return Err(bad(fes::DATA_OUT_OF_RANGE, 12, "C2HData outside the read buffer"));
                    }
                    p.read.extend_from_slice(data);
                    if last && success {
                        let p = self.pending.remove(&cccid).expect("present");
                        events.push(HostEvent::Completed { cqe: Completion::new(cccid, Status::SUCCESS), data: p.read });
                    }
                }
                Pdu::R2T { cccid, ttag, r2to, r2tl } => {
                    let Some(p) = self.pending.get(&cccid) else {
                        return Err(bad(fes::INVALID_HEADER_FIELD, 8, "R2T for an unknown command"));
                    };
                    let (start, end) = (r2to as usize, r2to as usize + r2tl as usize);
                    if end > p.write.len() || r2tl == 0 {
                        return Err(bad(fes::DATA_OUT_OF_RANGE, 12, "R2T outside the write buffer"));
                    }
                    let mut off = start;
                    while off < end {
                        let len = (end - off).min(self.maxh2cdata as usize);
                        let last = off + len == end;
                        pdu::encode_h2c_data(tx, cccid, ttag, off as u32, &p.write[off..off + len], last, self.digests, self.cpda);
                        off += len;
                    }
                }
                Pdu::TermReq { fes, fei, .. } => {
                    return Err(PduError { fes: Some(fes), fei, reason: "controller terminated the connection", header: Vec::new() });
                }
                _ => return Err(bad(fes::INVALID_HEADER_FIELD, 0, "PDU type not sent by a controller")),
            }
            used += n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::io;

    /// A host and a target past ICReq/ICResp whose queue is connected with 128 entries.
    fn pair(d: Digests, limits: TargetLimits) -> (HostTransport, TargetTransport) {
        let (host, mut tgt) = pair_unconnected(d, limits);
        tgt.set_connected(128);
        (host, tgt)
    }

    /// A host and a target past ICReq/ICResp, before the Fabrics Connect.
    fn pair_unconnected(d: Digests, limits: TargetLimits) -> (HostTransport, TargetTransport) {
        let mut tx = Vec::new();
        let mut host = HostTransport::new(d, 4096, &mut tx);
        let mut tgt = TargetTransport::new(limits);
        let (mut back, mut ev, mut hev) = (Vec::new(), Vec::new(), Vec::new());
        assert_eq!(tgt.receive(&tx, &mut back, &mut ev).unwrap(), tx.len());
        assert_eq!(host.receive(&back, &mut Vec::new(), &mut hev).unwrap(), back.len());
        assert_eq!(hev, vec![HostEvent::Connected]);
        (host, tgt)
    }

    #[test]
    fn large_write_goes_through_r2t_windows() {
        for d in [Digests::default(), Digests { header: true, data: true }] {
            let limits = TargetLimits { maxh2cdata: 16384, ..TargetLimits::default() };
            let (mut host, mut tgt) = pair(d, limits);
            let data: Vec<u8> = (0..40000u32).map(|i| i as u8).collect();
            let mut h2t = Vec::new();
            host.submit(Command::new(io::WRITE, 5), data.clone(), 0, &mut h2t);
            let mut events = Vec::new();
            // Bounce bytes until the target has the whole command.
            for _ in 0..10 {
                let mut t2h = Vec::new();
                let used = tgt.receive(&h2t, &mut t2h, &mut events).unwrap();
                h2t.drain(..used);
                let used = host.receive(&t2h, &mut h2t, &mut Vec::new()).unwrap();
                assert_eq!(used, t2h.len());
            }
            assert_eq!(events.len(), 1);
            let TargetEvent::Command { cmd, data: got } = &events[0] else { panic!() };
            assert_eq!(cmd.cid(), 5);
            assert_eq!(got, &data);
        }
    }

    /// A host past ICResp from a controller shaped like SPDK's, with the given MAXH2CDATA and CPDA.
    fn host_of(d: Digests, maxh2cdata: u32, cpda: u8) -> HostTransport {
        let mut host = HostTransport::new(d, 4096, &mut Vec::new());
        let mut icresp = Vec::new();
        pdu::encode_icresp(&mut icresp, cpda, d, maxh2cdata);
        let mut ev = Vec::new();
        host.receive(&icresp, &mut Vec::new(), &mut ev).unwrap();
        assert_eq!(ev, vec![HostEvent::Connected]);
        host
    }

    #[test]
    fn r2ts_are_answered_at_once_within_maxh2cdata_and_cpda() {
        for d in [Digests::default(), Digests { header: true, data: true }] {
            let mut host = host_of(d, 4096, 3);
            // Two 12 KiB writes (over the 4 KiB in-capsule size) and one of 4 KiB (in the capsule).
            let data = |cid: u16| -> Vec<u8> { (0..12288u32).map(|i| (i as u8) ^ cid as u8).collect() };
            let mut h2t = Vec::new();
            host.submit(Command::new(io::WRITE, 1), data(1), 0, &mut h2t);
            host.submit(Command::new(io::WRITE, 2), data(2), 0, &mut h2t);
            host.submit(Command::new(io::WRITE, 3), vec![9; 4096], 0, &mut h2t);
            let mut sgls = Vec::new();
            let mut rest = &h2t[..];
            while let Some((p, n)) = pdu::parse(rest, d, 1 << 20).unwrap() {
                let Pdu::CapsuleCmd { cmd, data } = p else { panic!("{p:?}") };
                sgls.push((cmd.sgl_type(), data.len()));
                rest = &rest[n..];
            }
            assert_eq!(sgls, vec![(sgl::TRANSPORT, 0), (sgl::TRANSPORT, 0), (sgl::IN_CAPSULE, 4096)]);
            // Both commands' R2Ts outstanding at once, the second asking for more than MAXH2CDATA.
            let mut t2h = Vec::new();
            pdu::encode_r2t(&mut t2h, 2, 20, 4096, 8192, d);
            pdu::encode_r2t(&mut t2h, 1, 10, 0, 4096, d);
            let mut out = Vec::new();
            assert_eq!(host.receive(&t2h, &mut out, &mut Vec::new()).unwrap(), t2h.len());
            let mut got = Vec::new();
            let mut rest = &out[..];
            while let Some((p, n)) = pdu::parse(rest, d, 4096).unwrap() {
                assert_eq!(rest[3] as usize % 16, 0, "data placed at a multiple of (CPDA + 1) * 4");
                let Pdu::H2CData { cccid, ttag, datao, data: bytes, last } = p else { panic!("{p:?}") };
                assert!(bytes.len() <= 4096);
                assert_eq!(bytes, &data(cccid)[datao as usize..datao as usize + bytes.len()]);
                got.push((cccid, ttag, datao, bytes.len(), last));
                rest = &rest[n..];
            }
            assert!(rest.is_empty());
            assert_eq!(got, vec![(2, 20, 4096, 4096, false), (2, 20, 8192, 4096, true), (1, 10, 0, 4096, true)]);
        }
    }

    #[test]
    fn reads_end_with_success_or_with_a_capsule_and_data_may_come_in_pieces() {
        let d = Digests::default();
        let mut host = host_of(d, 4096, 0);
        let payload: Vec<u8> = (0..8192u32).map(|i| (i / 7) as u8).collect();
        host.submit(Command::new(io::READ, 5), Vec::new(), 8192, &mut Vec::new());
        host.submit(Command::new(io::READ, 6), Vec::new(), 8192, &mut Vec::new());
        let mut t2h = Vec::new();
        // Command 5: three C2HData PDUs, the last without SUCCESS, then its response capsule.
        pdu::encode_c2h_data(&mut t2h, 5, 0, &payload[..1000], false, false, d, 1);
        pdu::encode_c2h_data(&mut t2h, 5, 1000, &payload[1000..4096], false, false, d, 1);
        pdu::encode_c2h_data(&mut t2h, 5, 4096, &payload[4096..], true, false, d, 1);
        // Command 6: one PDU with SUCCESS and no capsule.
        pdu::encode_c2h_data(&mut t2h, 6, 0, &payload, true, true, d, 0);
        // The capsule of 5 is cut: its first 3 bytes come with the rest, the others in a later read.
        let split = t2h.len() + 3;
        pdu::encode_capsule_resp(&mut t2h, &Completion::new(5, Status::SUCCESS), d);
        let mut ev = Vec::new();
        // Fed in small pieces, as a socket may hand them over.
        let mut buf = Vec::new();
        for chunk in t2h[..split].chunks(777) {
            buf.extend_from_slice(chunk);
            let used = host.receive(&buf, &mut Vec::new(), &mut ev).unwrap();
            buf.drain(..used);
        }
        assert_eq!(ev, vec![HostEvent::Completed { cqe: Completion::new(6, Status::SUCCESS), data: payload.clone() }]);
        assert_eq!(host.outstanding(), 1);
        buf.extend_from_slice(&t2h[split..]);
        ev.clear();
        host.receive(&buf, &mut Vec::new(), &mut ev).unwrap();
        assert_eq!(ev, vec![HostEvent::Completed { cqe: Completion::new(5, Status::SUCCESS), data: payload }]);
        assert_eq!(host.outstanding(), 0);
    }

    #[test]
    fn read_data_and_completion_reach_the_host() {
        let (mut host, mut tgt) = pair(Digests { header: true, data: false }, TargetLimits::default());
        let mut tx = Vec::new();
        host.submit(Command::new(io::READ, 9), Vec::new(), 300_000, &mut tx);
        let mut t2h = Vec::new();
        let payload = vec![0xab; 300_000];
        tgt.respond(&Completion::new(9, Status::SUCCESS), &payload, &mut t2h);
        let mut ev = Vec::new();
        host.receive(&t2h, &mut Vec::new(), &mut ev).unwrap();
        assert_eq!(ev, vec![HostEvent::Completed { cqe: Completion::new(9, Status::SUCCESS), data: payload }]);
    }

    #[test]
    fn owned_responses_match_copied_ones_and_success_skips_the_capsule() {
        for d in [Digests::default(), Digests { header: true, data: true }] {
            let (mut host, mut tgt) = pair(d, TargetLimits::default());
            let cqe = Completion::new(4, Status::SUCCESS);
            let (mut copied, mut owned) = (Vec::new(), Vec::new());
            tgt.respond(&cqe, &[7; 4096], &mut copied);
            tgt.respond_owned(&cqe, vec![7; 4096], false, &mut owned);
            assert_eq!(copied, owned);
            let mut tx = Vec::new();
            host.submit(Command::new(io::READ, 4), Vec::new(), 4096, &mut tx);
            let mut short = Vec::new();
            tgt.respond_owned(&cqe, vec![7; 4096], true, &mut short);
            assert_eq!(short.len() + 24 + if d.header { 4 } else { 0 }, owned.len(), "no response capsule");
            let mut ev = Vec::new();
            host.receive(&short, &mut Vec::new(), &mut ev).unwrap();
            assert_eq!(ev, vec![HostEvent::Completed { cqe, data: vec![7; 4096] }]);
        }
    }

    #[test]
    fn hostile_input_ends_with_term_req() {
        let mut tgt = TargetTransport::new(TargetLimits::default());
        let mut tx = Vec::new();
        // A capsule before ICReq.
        let mut bad = Vec::new();
        pdu::encode_capsule_cmd(&mut bad, &Command::new(1, 1), &[], Digests::default(), 0);
        let err = tgt.receive(&bad, &mut tx, &mut Vec::new()).unwrap_err();
        assert_eq!(err.fes, Some(fes::PDU_SEQUENCE_ERROR));
        assert_eq!(tx[0], pdu::C2H_TERM_REQ);

        // H2CData nobody asked for.
        let (_, mut tgt) = pair(Digests::default(), TargetLimits::default());
        let mut bad = Vec::new();
        pdu::encode_h2c_data(&mut bad, 1, 77, 0, &[1; 16], true, Digests::default(), 0);
        let mut tx = Vec::new();
        let err = tgt.receive(&bad, &mut tx, &mut Vec::new()).unwrap_err();
        assert_eq!((err.fes, err.fei), (Some(fes::INVALID_HEADER_FIELD), 10));
    }

    #[test]
    fn bad_sgl_is_rejected_per_command() {
        let (_, mut tgt) = pair(Digests::default(), TargetLimits::default());
        let mut cmd = Command::new(io::WRITE, 3);
        cmd.set_sgl(0, 1 << 30, sgl::TRANSPORT);
        let mut bytes = Vec::new();
        pdu::encode_capsule_cmd(&mut bytes, &cmd, &[], Digests::default(), 0);
        let mut ev = Vec::new();
        tgt.receive(&bytes, &mut Vec::new(), &mut ev).unwrap();
        assert_eq!(ev, vec![TargetEvent::Reject(Completion::new(3, Status::SGL_DATA_LENGTH_INVALID))]);
    }

    #[test]
    fn commands_beyond_the_queue_size_end_the_connection() {
        let limits = TargetLimits::default();
        let (mut host, mut tgt) = pair_unconnected(Digests::default(), limits);
        tgt.set_connected(4);
        // Four writes whose data the host never sends: each holds an R2T buffer.
        let mut h2t = Vec::new();
        for cid in 1..=4 {
            host.submit(Command::new(io::WRITE, cid), vec![0; 128 * 1024], 0, &mut h2t);
        }
        let (mut t2h, mut ev) = (Vec::new(), Vec::new());
        assert_eq!(tgt.receive(&h2t, &mut t2h, &mut ev).unwrap(), h2t.len());
        assert!(ev.is_empty());
        assert_eq!(tgt.outstanding(), 4);
        assert_eq!(tgt.buffered_bytes(), 4 * limits.max_transfer, "bounded by queue depth x MDTS");
        // One more, still without waiting for anything: the connection ends, and no buffer grew.
        let mut h2t = Vec::new();
        host.submit(Command::new(io::WRITE, 5), vec![0; 128 * 1024], 0, &mut h2t);
        let mut t2h = Vec::new();
        let err = tgt.receive(&h2t, &mut t2h, &mut ev).unwrap_err();
        assert_eq!((err.fes, err.reason), (Some(fes::PDU_SEQUENCE_ERROR), "more commands outstanding than the queue size"));
        assert_eq!(t2h[0], pdu::C2H_TERM_REQ);
        assert_eq!(tgt.buffered_bytes(), 4 * limits.max_transfer);
    }

    #[test]
    fn answered_commands_free_their_queue_entries() {
        let (mut host, mut tgt) = pair_unconnected(Digests::default(), TargetLimits::default());
        tgt.set_connected(2);
        let mut ev = Vec::new();
        let send = |host: &mut HostTransport, tgt: &mut TargetTransport, cid: u16, ev: &mut Vec<TargetEvent>| {
            let mut h2t = Vec::new();
            host.submit(Command::new(io::READ, cid), Vec::new(), 512, &mut h2t);
            tgt.receive(&h2t, &mut Vec::new(), ev).map(|_| ())
        };
        send(&mut host, &mut tgt, 1, &mut ev).unwrap();
        send(&mut host, &mut tgt, 2, &mut ev).unwrap();
        // The first is answered (plain and owned responses both count): room for one more.
        tgt.respond(&Completion::new(1, Status::SUCCESS), &[], &mut Vec::new());
        send(&mut host, &mut tgt, 3, &mut ev).unwrap();
        tgt.respond_owned(&Completion::new(2, Status::SUCCESS), vec![1; 512], true, &mut Vec::new());
        send(&mut host, &mut tgt, 4, &mut ev).unwrap();
        assert_eq!(tgt.outstanding(), 2);
        assert!(send(&mut host, &mut tgt, 5, &mut ev).is_err(), "a third outstanding command on a 2-entry queue");
        assert_eq!(ev.len(), 4);
    }

    #[test]
    fn no_data_buffer_before_connect() {
        let (mut host, mut tgt) = pair_unconnected(Digests::default(), TargetLimits::default());
        host.set_in_capsule(0);
        // A write before Connect: refused without an R2T or a buffer.
        let mut h2t = Vec::new();
        host.submit(Command::new(io::WRITE, 1), vec![0; 128 * 1024], 0, &mut h2t);
        let (mut t2h, mut ev) = (Vec::new(), Vec::new());
        tgt.receive(&h2t, &mut t2h, &mut ev).unwrap();
        assert_eq!(ev, vec![TargetEvent::Reject(Completion::new(1, Status::COMMAND_SEQUENCE_ERROR))]);
        assert!(t2h.is_empty(), "no R2T");
        assert_eq!(tgt.buffered_bytes(), 0);
        // Unsolicited H2CData for it ends the connection.
        let mut bad = Vec::new();
        pdu::encode_h2c_data(&mut bad, 1, 1, 0, &[0; 4096], false, Digests::default(), 0);
        let (mut tgt2, mut tx) = (pair_unconnected(Digests::default(), TargetLimits::default()).1, Vec::new());
        assert!(tgt2.receive(&bad, &mut tx, &mut Vec::new()).is_err());
        assert_eq!(tgt2.buffered_bytes(), 0);
        tgt.respond(&Completion::new(1, Status::COMMAND_SEQUENCE_ERROR), &[], &mut Vec::new());

        // A Connect whose data comes by R2T is pulled (its 1 KiB is the only buffer), but
        // nothing else may be sent while it is outstanding.
        let (c, d) = crate::cmds::connect(2, 1, 32, 0, 1, "s", "h", [0; 16]);
        let mut h2t = Vec::new();
        host.submit(c, d, 0, &mut h2t);
        let mut t2h = Vec::new();
        tgt.receive(&h2t, &mut t2h, &mut ev).unwrap();
        assert_eq!(t2h[0], pdu::R2T);
        assert_eq!(tgt.buffered_bytes(), CONNECT_DATA);
        let mut h2t = Vec::new();
        host.submit(Command::new(io::READ, 3), Vec::new(), 512, &mut h2t);
        let err = tgt.receive(&h2t, &mut Vec::new(), &mut ev).unwrap_err();
        assert_eq!(err.reason, "a command before the queue's Connect completed");
    }
}
