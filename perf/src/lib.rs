//! The nvmetro initiator: an NVMe/TCP host built on the sans-IO machines of `nvmetro-proto`,
//! and with the `rdma` feature an NVMe/RDMA host ([`rdma`]).
//!
//! [`Host::connect`] performs what a Linux host does (ICReq, admin Connect, CC.EN, Identify,
//! number of queues, I/O queue Connects). Each [`Queue`] is one TCP connection or RDMA queue
//! pair; commands are
//! submitted without waiting and completions collected with [`Queue::poll`] (busy polling) or
//! [`Queue::wait_any`] (blocking), so a load generator can keep any queue depth in flight.

pub mod echo;
pub mod load;
pub mod paths;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod report;

use nvmetro_proto::cmds;
use nvmetro_proto::controller::prop;
use nvmetro_proto::identify;
use nvmetro_proto::nvme::{le_u32, le_u64, Command, Completion, Status};
use nvmetro_proto::pdu::{Digests, PduError};
use nvmetro_proto::tcp::{HostEvent, HostTransport};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("connection to {addr}: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    #[error("protocol error: {0}")]
    Protocol(#[from] PduError),
    #[error("{what} failed: {status}")]
    Status { what: &'static str, status: Status },
    #[error("timed out waiting for the controller")]
    Timeout,
    #[error("the controller closed the connection")]
    Closed,
}

/// How to reach a subsystem.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub addr: SocketAddr,
    pub subnqn: String,
    pub hostnqn: String,
    pub hostid: [u8; 16],
    pub io_queues: u16,
    pub queue_size: u16,
    pub kato_ms: u32,
    pub digests: Digests,
    /// Spin on non-blocking sockets instead of sleeping in the kernel.
    pub busy_poll: bool,
    pub timeout: Duration,
    /// Ask I/O queues to run without SQ flow control (the target may then end reads with a
    /// C2HData SUCCESS flag instead of a response capsule).
    pub disable_sq_flow_control: bool,
    /// NVMe/RDMA instead of NVMe/TCP (needs the `rdma` feature).
    pub rdma: bool,
}

impl ConnectOptions {
    pub fn new(addr: SocketAddr, subnqn: &str) -> ConnectOptions {
        ConnectOptions {
            addr,
            subnqn: subnqn.into(),
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-6e766d657472".into(),
            hostid: *b"nvmetro-perf-hid",
            io_queues: 1,
            queue_size: 128,
            kato_ms: 5000,
            digests: Digests::default(),
            busy_poll: false,
            timeout: Duration::from_secs(10),
            disable_sq_flow_control: true,
            rdma: false,
        }
    }
}

/// How long one blocking read waits before the caller gets control back to check its deadlines
/// (the socket's SO_RCVTIMEO, set once when the queue opens).
pub const READ_TICK: Duration = Duration::from_millis(50);

/// One NVMe/TCP connection: an admin or an I/O queue.
///
/// The socket's mode is set once: non-blocking with `busy_poll`, else blocking with a receive
/// timeout of [`READ_TICK`]. A non-blocking look at a blocking socket is one `recv(MSG_DONTWAIT)`,
/// so no read costs more than one system call.
#[derive(Debug)]
pub struct Queue {
    link: Link,
    next_cid: u16,
    done: HashMap<u16, (Completion, Vec<u8>)>,
    busy_poll: bool,
    timeout: Duration,
    pub qid: u16,
}

/// What carries a queue's commands.
#[derive(Debug)]
enum Link {
    Tcp(Box<TcpLink>),
    #[cfg(feature = "rdma")]
    Rdma(Box<rdma::RdmaQueue>),
}

#[derive(Debug)]
struct TcpLink {
    sock: TcpStream,
    transport: HostTransport,
    rx: Vec<u8>,
    rx_len: usize,
    tx: Vec<u8>,
    events: Vec<HostEvent>,
}

impl Queue {
    /// Opens the TCP connection and completes the ICReq/ICResp exchange, or connects the RDMA
    /// queue pair.
    pub fn open(opts: &ConnectOptions, qid: u16, in_capsule: usize) -> Result<Queue, HostError> {
        if opts.rdma {
            #[cfg(feature = "rdma")]
            {
                let depth = if qid == 0 { 32 } else { opts.queue_size };
                let q = rdma::RdmaQueue::open(opts.addr, qid, depth, opts.timeout)?;
                let link = Link::Rdma(Box::new(q));
                return Ok(Queue { link, next_cid: 1, done: HashMap::new(), busy_poll: opts.busy_poll, timeout: opts.timeout, qid });
            }
            #[cfg(not(feature = "rdma"))]
            return Err(HostError::Io(io::Error::other("NVMe/RDMA needs nvmetro-perf built with the `rdma` cargo feature")));
        }
        let sock = TcpStream::connect_timeout(&opts.addr, opts.timeout).map_err(|source| HostError::Connect { addr: opts.addr, source })?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(READ_TICK))?;
        let mut tx = Vec::new();
        let transport = HostTransport::new(opts.digests, in_capsule, &mut tx);
        let link = Link::Tcp(Box::new(TcpLink { sock, transport, rx: vec![0; 1 << 20], rx_len: 0, tx, events: Vec::new() }));
        let mut q = Queue { link, next_cid: 1, done: HashMap::new(), busy_poll: false, timeout: opts.timeout, qid };
        q.flush()?;
        let deadline = Instant::now() + opts.timeout;
        let mut events = Vec::new();
        while !events.contains(&HostEvent::Connected) {
            if Instant::now() > deadline {
                return Err(HostError::Timeout);
            }
            q.tcp()?.read_once(true, false, &mut events)?;
        }
        q.busy_poll = opts.busy_poll;
        q.tcp()?.sock.set_nonblocking(opts.busy_poll)?;
        Ok(q)
    }

    fn tcp(&mut self) -> Result<&mut TcpLink, HostError> {
        match &mut self.link {
            Link::Tcp(t) => Ok(t),
            #[cfg(feature = "rdma")]
            Link::Rdma(_) => Err(HostError::Io(io::Error::other("not a TCP queue"))),
        }
    }

    pub fn outstanding(&self) -> usize {
        match &self.link {
            Link::Tcp(t) => t.transport.outstanding(),
            #[cfg(feature = "rdma")]
            Link::Rdma(r) => r.outstanding(),
        }
    }

    /// The socket (or RDMA completion channel), for waiting on several queues at once
    /// ([`nvmetro_ffi::wait_readable`]).
    pub fn fd(&self) -> BorrowedFd<'_> {
        match &self.link {
            Link::Tcp(t) => t.sock.as_fd(),
            #[cfg(feature = "rdma")]
            Link::Rdma(r) => r.fd(),
        }
    }

    /// Lets write data of up to `bytes` ride in the command capsule (the target's IOCCSZ).
    pub fn set_in_capsule(&mut self, bytes: usize) {
        match &mut self.link {
            Link::Tcp(t) => t.transport.set_in_capsule(bytes),
            #[cfg(feature = "rdma")]
            Link::Rdma(r) => r.set_in_capsule(bytes),
        }
    }

    pub fn is_busy_poll(&self) -> bool {
        self.busy_poll
    }

    /// The connection itself, for driving PDUs by hand (tests): nothing may be outstanding, and
    /// the socket is left in blocking mode.
    pub fn into_socket(mut self) -> Result<TcpStream, HostError> {
        let outstanding = self.outstanding();
        let t = self.tcp()?;
        assert_eq!((outstanding, t.rx_len), (0, 0), "a queue handed over mid-command");
        t.sock.set_nonblocking(false)?;
        match self.link {
            Link::Tcp(t) => Ok(t.sock),
            #[cfg(feature = "rdma")]
            Link::Rdma(_) => unreachable!("checked above"),
        }
    }

    /// Queues a command (sent at the next [`Queue::flush`]); returns its command identifier.
    pub fn submit(&mut self, mut cmd: Command, write: Vec<u8>, read_len: usize) -> u16 {
        let cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1);
        if self.next_cid == 0xffff {
            self.next_cid = 1;
        }
        cmd.0[2..4].copy_from_slice(&cid.to_le_bytes());
        match &mut self.link {
            Link::Tcp(t) => t.transport.submit(cmd, write, read_len, &mut t.tx),
            #[cfg(feature = "rdma")]
            Link::Rdma(r) => r.submit(cmd, &write, read_len),
        }
        cid
    }

    /// Sends everything queued (an RDMA queue posts each command as it is submitted).
    pub fn flush(&mut self) -> Result<(), HostError> {
        let Ok(t) = self.tcp() else { return Ok(()) };
        t.flush()
    }
}

impl TcpLink {
    fn flush(&mut self) -> Result<(), HostError> {
        let mut off = 0;
        while off < self.tx.len() {
            match self.sock.write(&self.tx[off..]) {
                Ok(0) => return Err(HostError::Closed),
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::hint::spin_loop(),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.tx.clear();
        Ok(())
    }

    /// Reads once and hands the bytes to the transport; returns the bytes read (0 when nothing was
    /// there). `wait`: on a blocking socket, block until bytes come or [`READ_TICK`] passes; on a
    /// busy-polling one, return at once either way. Without `wait` it never blocks.
    fn read_once(&mut self, wait: bool, busy_poll: bool, events: &mut Vec<HostEvent>) -> Result<usize, HostError> {
        if self.rx_len == self.rx.len() {
            return Err(HostError::Protocol(PduError { fes: None, fei: 0, reason: "PDU larger than the receive buffer", header: vec![] }));
        }
        let buf = &mut self.rx[self.rx_len..];
        let r = if wait || busy_poll { self.sock.read(buf) } else { nvmetro_ffi::recv_nonblocking(self.sock.as_fd(), buf) };
        let n = match r {
            Ok(0) => return Err(HostError::Closed),
            Ok(n) => n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted) => return Ok(0),
            Err(e) => return Err(e.into()),
        };
        self.rx_len += n;
        let used = self.transport.receive(&self.rx[..self.rx_len], &mut self.tx, events)?;
        self.rx.copy_within(used..self.rx_len, 0);
        self.rx_len -= used;
        if !self.tx.is_empty() {
            self.flush()?; // H2CData answering an R2T, sent at once
        }
        Ok(n)
    }
}

impl Queue {
    /// One look for completions: a read of the socket (blocking up to [`READ_TICK`] if `wait`,
    /// unless busy polling) or of the completion queue (waiting on its channel likewise).
    /// Returns (bytes or completions seen, completions collected into `out`).
    fn fetch(&mut self, wait: bool, out: &mut Vec<(Completion, Vec<u8>)>) -> (Result<usize, HostError>, usize) {
        let busy_poll = self.busy_poll;
        match &mut self.link {
            Link::Tcp(t) => {
                let mut events = std::mem::take(&mut t.events);
                let r = t.read_once(wait, busy_poll, &mut events);
                let n = collect(&mut events, out);
                t.events = events;
                (r, n)
            }
            #[cfg(feature = "rdma")]
            Link::Rdma(r) => {
                let timeout = if wait && !busy_poll { READ_TICK } else { Duration::ZERO };
                match r.poll_timeout(out, timeout) {
                    Ok(n) => (Ok(n), n),
                    Err(e) => (Err(e), 0),
                }
            }
        }
    }

    /// Collects finished commands into `out` without blocking; returns how many.
    pub fn poll(&mut self, out: &mut Vec<(Completion, Vec<u8>)>) -> Result<usize, HostError> {
        self.read_and_collect(false, out)
    }

    /// Waits until bytes arrive (at most [`READ_TICK`]; busy-polling queues do not wait) and
    /// collects finished commands into `out`; returns how many (0 if the wait ended first).
    pub fn poll_wait(&mut self, out: &mut Vec<(Completion, Vec<u8>)>) -> Result<usize, HostError> {
        self.read_and_collect(true, out)
    }

    fn read_and_collect(&mut self, wait: bool, out: &mut Vec<(Completion, Vec<u8>)>) -> Result<usize, HostError> {
        let (r, n) = self.fetch(wait, out);
        r.map(|_| n)
    }

    /// Waits up to `timeout` for bytes (poll(2), then one non-blocking read) and collects finished
    /// commands into `out`; returns how many. Busy-polling queues do not wait.
    pub fn poll_timeout(&mut self, out: &mut Vec<(Completion, Vec<u8>)>, timeout: Duration) -> Result<usize, HostError> {
        let busy_poll = self.busy_poll;
        match &mut self.link {
            Link::Tcp(t) => {
                if !busy_poll && t.rx_len < t.rx.len() {
                    let mut ready = [false];
                    nvmetro_ffi::wait_readable(&[t.sock.as_fd()], timeout, &mut ready)?;
                }
                self.poll(out)
            }
            #[cfg(feature = "rdma")]
            Link::Rdma(r) => r.poll_timeout(out, if busy_poll { Duration::ZERO } else { timeout }),
        }
    }

    /// Blocks until at least one command finishes (or the queue's timeout passes without any
    /// bytes); collects finished ones into `out`.
    pub fn wait_any(&mut self, out: &mut Vec<(Completion, Vec<u8>)>) -> Result<usize, HostError> {
        let mut quiet_since = Instant::now();
        loop {
            let (r, got) = self.fetch(true, out);
            let read = r?;
            if got > 0 {
                return Ok(got);
            }
            if read > 0 {
                quiet_since = Instant::now();
            } else if quiet_since.elapsed() > self.timeout {
                return Err(HostError::Timeout);
            }
        }
    }

    /// Submits one command and waits for it (other completions seen meanwhile are kept).
    pub fn execute(&mut self, cmd: Command, write: Vec<u8>, read_len: usize) -> Result<(Completion, Vec<u8>), HostError> {
        let cid = self.submit(cmd, write, read_len);
        self.flush()?;
        self.wait_for(cid)
    }

    /// Waits for the completion of `cid`.
    pub fn wait_for(&mut self, cid: u16) -> Result<(Completion, Vec<u8>), HostError> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if let Some(r) = self.done.remove(&cid) {
                return Ok(r);
            }
            if Instant::now() > deadline {
                return Err(HostError::Timeout);
            }
            let mut out = Vec::new();
            self.wait_any(&mut out)?;
            for (cqe, data) in out {
                self.done.insert(cqe.cid, (cqe, data));
            }
        }
    }
}

fn collect(events: &mut Vec<HostEvent>, out: &mut Vec<(Completion, Vec<u8>)>) -> usize {
    let mut n = 0;
    for ev in events.drain(..) {
        if let HostEvent::Completed { cqe, data } = ev {
            out.push((cqe, data));
            n += 1;
        }
    }
    n
}

/// A connected controller: its admin queue and I/O queues.
#[derive(Debug)]
pub struct Host {
    pub admin: Queue,
    pub io: Vec<Queue>,
    pub cntlid: u16,
    /// Identify Controller data.
    pub id_ctrl: Vec<u8>,
    opts: ConnectOptions,
}

fn ok(what: &'static str, r: (Completion, Vec<u8>)) -> Result<(Completion, Vec<u8>), HostError> {
    if r.0.status().is_success() {
        Ok(r)
    } else {
        Err(HostError::Status { what, status: r.0.status() })
    }
}

impl Host {
    /// Connects the admin queue, enables the controller, identifies it and connects I/O queues.
    pub fn connect(opts: &ConnectOptions) -> Result<Host, HostError> {
        let mut admin = Queue::open(opts, 0, identify::ADMIN_IN_CAPSULE)?;
        let (c, d) = cmds::connect(0, 0, 32, opts.kato_ms, 0xffff, &opts.subnqn, &opts.hostnqn, opts.hostid);
        let (cqe, _) = ok("Connect", admin.execute(c, d, 0)?)?;
        let cntlid = cqe.result as u16;
        ok("Property Set CC", admin.execute(cmds::property_set(0, prop::CC, cmds::CC_ENABLE), vec![], 0)?)?;
        let deadline = Instant::now() + opts.timeout;
        loop {
            let (cqe, _) = ok("Property Get CSTS", admin.execute(cmds::property_get(0, prop::CSTS), vec![], 0)?)?;
            if cqe.result & 1 == 1 {
                break;
            }
            if Instant::now() > deadline {
                return Err(HostError::Timeout);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let (_, id_ctrl) = ok("Identify Controller", admin.execute(cmds::identify(0, 1, 0), vec![], 4096)?)?;
        let mut host = Host { admin, io: Vec::new(), cntlid, id_ctrl, opts: opts.clone() };
        if host.is_discovery() || opts.io_queues == 0 {
            return Ok(host);
        }
        let want = u32::from(opts.io_queues - 1);
        let (cqe, _) =
            ok("Set Features (number of queues)", host.admin.execute(cmds::set_features(0, 0x07, want | want << 16), vec![], 0)?)?;
        let granted = (cqe.result as u16).min((cqe.result >> 16) as u16) + 1;
        let in_capsule = (le_u32(&host.id_ctrl, 1792) as usize * 16).saturating_sub(64);
        for qid in 1..=opts.io_queues.min(granted) {
            let mut q = Queue::open(opts, qid, identify::ADMIN_IN_CAPSULE)?;
            let (mut c, d) = cmds::connect(0, qid, opts.queue_size, 0, cntlid, &opts.subnqn, &opts.hostnqn, opts.hostid);
            if opts.disable_sq_flow_control {
                c.0[46] |= 0x04; // CATTR: disable SQ flow control
            }
            ok("Connect (I/O queue)", q.execute(c, d, 0)?)?;
            q.set_in_capsule(in_capsule);
            host.io.push(q);
        }
        Ok(host)
    }

    pub fn is_discovery(&self) -> bool {
        self.id_ctrl.get(111) == Some(&2)
    }

    /// Runs an admin command, failing on an error status.
    pub fn admin_cmd(
        &mut self,
        what: &'static str,
        cmd: Command,
        write: Vec<u8>,
        read_len: usize,
    ) -> Result<(Completion, Vec<u8>), HostError> {
        ok(what, self.admin.execute(cmd, write, read_len)?)
    }

    /// (blocks, block size) of a namespace.
    pub fn namespace_size(&mut self, nsid: u32) -> Result<(u64, u32), HostError> {
        let (_, d) = self.admin_cmd("Identify Namespace", cmds::identify(0, 0, nsid), vec![], 4096)?;
        let lbads = d[128 + 2];
        Ok((le_u64(&d, 0), 1u32 << lbads))
    }

    /// Runs an I/O command on queue `q`, returning its completion whatever the status.
    pub fn io_cmd(&mut self, q: usize, cmd: Command, write: Vec<u8>, read_len: usize) -> Result<(Completion, Vec<u8>), HostError> {
        self.io[q].execute(cmd, write, read_len)
    }

    pub fn read(&mut self, nsid: u32, slba: u64, blocks: u32, block_size: u32) -> Result<Vec<u8>, HostError> {
        let len = blocks as usize * block_size as usize;
        Ok(ok("Read", self.io_cmd(0, cmds::read(0, nsid, slba, blocks), vec![], len)?)?.1)
    }

    pub fn write(&mut self, nsid: u32, slba: u64, data: Vec<u8>, block_size: u32) -> Result<(), HostError> {
        let blocks = (data.len() / block_size as usize) as u32;
        ok("Write", self.io_cmd(0, cmds::write(0, nsid, slba, blocks), data, 0)?)?;
        Ok(())
    }

    pub fn flush(&mut self, nsid: u32) -> Result<(), HostError> {
        ok("Flush", self.io_cmd(0, cmds::flush(0, nsid), vec![], 0)?)?;
        Ok(())
    }

    pub fn keep_alive(&mut self) -> Result<(), HostError> {
        self.admin_cmd("Keep Alive", cmds::keep_alive(0), vec![], 0)?;
        Ok(())
    }

    /// Reads a whole log page of `len` bytes.
    pub fn log_page(&mut self, lid: u8, len: usize) -> Result<Vec<u8>, HostError> {
        Ok(self.admin_cmd("Get Log Page", cmds::get_log_page(0, lid, 0, len, 0), vec![], len)?.1)
    }

    /// Shuts the controller down cleanly (CC.SHN) and closes every queue.
    pub fn shutdown(mut self) -> Result<(), HostError> {
        self.admin_cmd("Property Set CC (shutdown)", cmds::property_set(0, prop::CC, cmds::CC_SHUTDOWN), vec![], 0)?;
        Ok(())
    }

    pub fn options(&self) -> &ConnectOptions {
        &self.opts
    }
}

/// Sends Keep Alive on an admin queue every half KATO from its own thread, as Linux hosts do,
/// while the I/O queues are busy elsewhere.
#[derive(Debug)]
pub struct KeepAlive {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<Queue, HostError>>>,
}

impl KeepAlive {
    pub fn start(mut admin: Queue, kato_ms: u32) -> KeepAlive {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let period = Duration::from_millis(u64::from(kato_ms.max(2)) / 2);
        let thread = std::thread::spawn(move || {
            let mut last = Instant::now();
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if kato_ms > 0 && last.elapsed() >= period {
                    ok("Keep Alive", admin.execute(cmds::keep_alive(0), vec![], 0)?)?;
                    last = Instant::now();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(admin)
        });
        KeepAlive { stop, thread: Some(thread) }
    }

    /// Stops sending and gives the admin queue back.
    pub fn stop(mut self) -> Result<Queue, HostError> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().expect("joined once").join().map_err(|_| HostError::Closed)?
    }
}

impl Host {
    /// Splits the host into its admin queue and its I/O queues.
    pub fn into_parts(self) -> (Queue, Vec<Queue>) {
        (self.admin, self.io)
    }
}
