//! The floor: a bare TCP echo over loopback with the same message sizes, queue depth and polling
//! as an NVMe/TCP case, so the target's own cost per I/O shows as the difference.
//!
//! A request is `[request length u32][response length u32][payload]`; the server answers each
//! with `response length` bytes, in order.

use crate::load::JobResult;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Serves echo connections, one at a time, busy-polling like a reactor in `busy` mode, until `stop`.
pub fn serve(listener: TcpListener, stop: Arc<AtomicBool>) -> io::Result<()> {
    listener.set_nonblocking(true)?;
    while !stop.load(Ordering::Relaxed) {
        let (mut s, _) = match listener.accept() {
            Ok(c) => c,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(e) => return Err(e),
        };
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
        let mut rx = vec![0u8; 1 << 20];
        let (mut start, mut end) = (0usize, 0usize);
        let mut tx = Vec::new();
        'conn: while !stop.load(Ordering::Relaxed) {
            match s.read(&mut rx[end..]) {
                Ok(0) => break,
                Ok(n) => end += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
            while end - start >= 8 {
                let req = u32::from_le_bytes(rx[start..start + 4].try_into().expect("4")) as usize;
                let resp = u32::from_le_bytes(rx[start + 4..start + 8].try_into().expect("4")) as usize;
                if end - start < 8 + req {
                    break;
                }
                start += 8 + req;
                tx.resize(tx.len() + resp, 0);
            }
            if start == end {
                (start, end) = (0, 0);
            } else if end > rx.len() / 2 {
                rx.copy_within(start..end, 0);
                end -= start;
                start = 0;
            }
            let mut off = 0;
            while off < tx.len() {
                match s.write(&tx[off..]) {
                    Ok(n) => off += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(_) => break 'conn,
                }
            }
            tx.clear();
        }
    }
    Ok(())
}

/// Runs `qd` requests in flight for `duration` after `ramp`; latency per request.
pub fn run(
    addr: SocketAddr,
    req_len: usize,
    resp_len: usize,
    qd: usize,
    duration: Duration,
    ramp: Duration,
    busy: bool,
) -> io::Result<JobResult> {
    let resp_len = resp_len.max(1);
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.set_nonblocking(busy)?;
    let mut msg = vec![0u8; 8 + req_len];
    msg[0..4].copy_from_slice(&(req_len as u32).to_le_bytes());
    msg[4..8].copy_from_slice(&(resp_len as u32).to_le_bytes());
    let mut res = JobResult::empty();
    let mut sent: VecDeque<Instant> = VecDeque::new();
    let mut rx = vec![0u8; 1 << 20];
    let mut have = 0usize;
    let start = Instant::now();
    let counted_from = start + ramp;
    let end = counted_from + duration;
    let mut out = Vec::new();
    loop {
        let now = Instant::now();
        if now >= end && sent.is_empty() {
            break;
        }
        while now < end && sent.len() < qd {
            out.extend_from_slice(&msg);
            sent.push_back(Instant::now());
        }
        let mut off = 0;
        while off < out.len() {
            match s.write(&out[off..]) {
                Ok(n) => off += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        out.clear();
        match s.read(&mut rx) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => have += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        let t = Instant::now();
        while have >= resp_len && !sent.is_empty() {
            have -= resp_len;
            let s0 = sent.pop_front().expect("non-empty");
            if s0 >= counted_from {
                let _ = res.latency_ns.record(t.duration_since(s0).as_nanos().max(1) as u64);
                res.writes += 1;
                res.bytes += req_len as u64;
            }
        }
    }
    res.elapsed = duration;
    Ok(res)
}
