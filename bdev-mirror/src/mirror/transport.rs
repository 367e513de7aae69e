//! How a mirror leg reaches its peer. The link thread only needs a byte stream it can register
//! for readiness and a way to (re)establish it without blocking: [`TcpTransport`], the RDMA
//! transport of `rdma_link` (cargo feature `rdma`), and [`mem::pair`] in tests, which can cut
//! the link and delay it.

use mio::net::{TcpListener, TcpStream};
use mio::{Registry, Token};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// An established connection to the peer.
pub trait LinkStream: Read + Write + Send {
    fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()>;
    fn deregister(&mut self, registry: &Registry);
    /// Bytes are on their way but cannot be read yet (an emulated delay): keep polling.
    fn pending(&self) -> bool {
        false
    }
    /// Bytes written but not yet acknowledged by the peer (None: not known).
    fn unsent(&self) -> Option<usize> {
        None
    }
}

/// Establishes connections to the peer.
pub trait Transport: Send {
    /// Registers whatever announces incoming connections (a listening socket).
    fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()>;
    /// A new connection, if one was established; never blocks. `connected` says whether the
    /// link has one now (a dialer then waits; an acceptor takes a newer one anyway).
    fn poll_connect(&mut self, connected: bool) -> Option<Box<dyn LinkStream>>;
    /// The current connection failed: back off before the next attempt.
    fn failed(&mut self);
    /// A dialer dials one more connection although it is connected (a lane of the link, see
    /// [`super::lanes`]); it comes out of `poll_connect` as any connection does. False: this
    /// end does not dial, or the transport has one connection per link.
    fn want_lane(&mut self) -> bool {
        false
    }
    /// A connection attempt is under way that no readiness event will announce.
    fn connecting(&self) -> bool;
    /// The peer's address, for status displays.
    fn describe(&self) -> String;
    /// Which end of the authentication handshake this leg's connections are.
    fn side(&self) -> super::auth::Side;
}

impl LinkStream for TcpStream {
    fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        let _ = self.set_nodelay(true);
        registry.register(self, token, mio::Interest::READABLE | mio::Interest::WRITABLE)
    }
    fn deregister(&mut self, registry: &Registry) {
        let _ = registry.deregister(self);
    }
    fn unsent(&self) -> Option<usize> {
        use std::os::fd::AsRawFd;
        nvmetro_ffi::tcp_unsent_bytes(self.as_raw_fd()).ok()
    }
}

/// TCP: the preferred leg listens, the secondary dials with exponential backoff (100 ms to 2 s).
pub struct TcpTransport {
    listener: Option<TcpListener>,
    peer: Option<SocketAddr>,
    dialing: Option<(TcpStream, Instant)>,
    next_dial: Instant,
    backoff: Duration,
    /// Dial although connected: a lane.
    lane_wanted: bool,
}

impl TcpTransport {
    pub fn new(listen: Option<SocketAddr>, peer: Option<SocketAddr>) -> io::Result<TcpTransport> {
        let listener = match listen {
            Some(addr) => {
                let l = std::net::TcpListener::bind(addr).map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
                l.set_nonblocking(true)?;
                Some(TcpListener::from_std(l))
            }
            None => None,
        };
        Ok(TcpTransport {
            listener,
            peer,
            dialing: None,
            next_dial: Instant::now(),
            backoff: Duration::from_millis(100),
            lane_wanted: false,
        })
    }

    fn back_off(&mut self) {
        self.next_dial = Instant::now() + self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(2));
    }
}

impl Transport for TcpTransport {
    fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
        match self.listener.as_mut() {
            Some(l) => registry.register(l, token, mio::Interest::READABLE),
            None => Ok(()),
        }
    }

    fn poll_connect(&mut self, connected: bool) -> Option<Box<dyn LinkStream>> {
        if let Some(l) = self.listener.as_ref() {
            match l.accept() {
                Ok((sock, _)) => {
                    self.backoff = Duration::from_millis(100);
                    return Some(Box::new(sock));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => tracing::warn!("mirror link accept: {e}"),
            }
        }
        // Dialing never blocks: the connect completes in the background and is checked here.
        if let Some((sock, deadline)) = self.dialing.take() {
            match (sock.take_error(), sock.peer_addr()) {
                (Ok(None), Ok(_)) => {
                    self.backoff = Duration::from_millis(100);
                    return Some(Box::new(sock));
                }
                (Ok(None), Err(e)) if e.kind() == io::ErrorKind::NotConnected && Instant::now() < deadline => {
                    self.dialing = Some((sock, deadline));
                    return None;
                }
                _ => self.back_off(),
            }
        }
        if (!connected || self.lane_wanted) && Instant::now() >= self.next_dial {
            if let Some(peer) = self.peer {
                match TcpStream::connect(peer) {
                    Ok(s) => {
                        self.lane_wanted = false;
                        self.dialing = Some((s, Instant::now() + Duration::from_millis(500)));
                    }
                    Err(_) => self.back_off(),
                }
            }
        }
        None
    }

    fn failed(&mut self) {
        self.back_off();
    }

    fn want_lane(&mut self) -> bool {
        self.lane_wanted = self.peer.is_some();
        self.lane_wanted
    }

    fn connecting(&self) -> bool {
        self.dialing.is_some()
    }

    fn side(&self) -> super::auth::Side {
        if self.listener.is_some() {
            super::auth::Side::Acceptor
        } else {
            super::auth::Side::Dialer
        }
    }

    fn describe(&self) -> String {
        match (self.peer, self.listener.as_ref().and_then(|l| l.local_addr().ok())) {
            (Some(p), _) => p.to_string(),
            (None, Some(l)) => format!("listening on {l}"),
            _ => String::new(),
        }
    }
}

/// An in-memory link for tests: both legs in one process, with cuts and delay.
pub mod mem {
    use super::*;
    use crossbeam_queue::SegQueue;
    use std::collections::VecDeque;
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    type Pipe = Arc<SegQueue<(Instant, Vec<u8>)>>;

    pub struct MemStream {
        rx: Pipe,
        tx: Pipe,
        held: Vec<u8>,
        readable: Arc<OwnedFd>,
        peer_readable: Arc<OwnedFd>,
        alive: Arc<AtomicBool>,
        /// Bytes written on this end (the pair's count, shared with the link's control).
        sent: Arc<std::sync::atomic::AtomicU64>,
        delay: Duration,
        /// A chunk taken from `rx` that is not due yet.
        early: Option<(Instant, Vec<u8>)>,
    }

    impl Read for MemStream {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if !self.alive.load(Ordering::Acquire) {
                return Err(io::ErrorKind::ConnectionReset.into());
            }
            nvmetro_ffi::eventfd_drain(&self.readable);
            while self.held.len() < buf.len() {
                let next = self.early.take().or_else(|| self.rx.pop());
                match next {
                    Some((due, bytes)) if due <= Instant::now() => self.held.extend_from_slice(&bytes),
                    Some(early) => {
                        self.early = Some(early);
                        break;
                    }
                    None => break,
                }
            }
            if self.held.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = self.held.len().min(buf.len());
            buf[..n].copy_from_slice(&self.held[..n]);
            self.held.drain(..n);
            Ok(n)
        }
    }

    impl Write for MemStream {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            if !self.alive.load(Ordering::Acquire) {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
            self.tx.push((Instant::now() + self.delay, buf.to_vec()));
            self.sent.fetch_add(buf.len() as u64, Ordering::Relaxed);
            nvmetro_ffi::eventfd_signal(&self.peer_readable);
            Ok(buf.len())
        }
        fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
            // One message for the lot, as a socket's writev sends it.
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            self.write(&all)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl LinkStream for MemStream {
        fn register(&mut self, registry: &Registry, token: Token) -> io::Result<()> {
            registry.register(&mut mio::unix::SourceFd(&self.readable.as_raw_fd()), token, mio::Interest::READABLE)
        }
        fn deregister(&mut self, registry: &Registry) {
            let _ = registry.deregister(&mut mio::unix::SourceFd(&self.readable.as_raw_fd()));
        }
        fn pending(&self) -> bool {
            self.early.is_some() || !self.rx.is_empty() || !self.held.is_empty()
        }
    }

    struct State {
        cut: bool,
        delay: Duration,
        /// One flag per pair of streams alive now (a link's lanes), the first first: clearing
        /// one kills that pair. Beside it, the bytes written on the pair, both ways.
        alive: Vec<(Arc<AtomicBool>, Arc<std::sync::atomic::AtomicU64>)>,
        /// Ends of new pairs, not yet taken by their side.
        waiting: [VecDeque<MemStream>; 2],
    }

    /// One leg's end of the in-memory link.
    pub struct MemTransport {
        side: usize,
        state: Arc<Mutex<State>>,
        /// Dial although connected: a lane.
        lane_wanted: bool,
    }

    /// Cuts and restores an in-memory link.
    #[derive(Clone)]
    pub struct MemLinkControl {
        state: Arc<Mutex<State>>,
    }

    impl MemLinkControl {
        /// Both ends fail at their next read or write; no new connection until [`restore`].
        ///
        /// [`restore`]: MemLinkControl::restore
        pub fn cut(&self) {
            let mut s = self.state.lock().expect("mem link");
            s.cut = true;
            for (a, _) in s.alive.drain(..) {
                a.store(false, Ordering::Release);
            }
            s.waiting = Default::default();
        }
        pub fn restore(&self) {
            self.state.lock().expect("mem link").cut = false;
        }
        /// Bytes written on each pair of streams alive now, both ways, the first made first (a
        /// link of several lanes has one pair per lane).
        pub fn connections(&self) -> Vec<u64> {
            let s = self.state.lock().expect("mem link");
            s.alive.iter().filter(|(a, _)| a.load(Ordering::Acquire)).map(|(_, n)| n.load(Ordering::Relaxed)).collect()
        }
        /// Breaks the `i`-th pair of streams alive (0: the first made), new ones may follow.
        pub fn break_connection(&self, i: usize) {
            let mut s = self.state.lock().expect("mem link");
            s.alive.retain(|(a, _)| a.load(Ordering::Acquire));
            if i < s.alive.len() {
                s.alive.remove(i).0.store(false, Ordering::Release);
            }
        }
    }

    /// A link between two legs, each frame delayed by `delay` one way.
    pub fn pair(delay: Duration) -> (MemTransport, MemTransport, MemLinkControl) {
        let state = Arc::new(Mutex::new(State { cut: false, delay, alive: Vec::new(), waiting: Default::default() }));
        (
            MemTransport { side: 0, state: state.clone(), lane_wanted: false },
            MemTransport { side: 1, state: state.clone(), lane_wanted: false },
            MemLinkControl { state },
        )
    }

    impl Transport for MemTransport {
        fn register(&mut self, _: &Registry, _: Token) -> io::Result<()> {
            Ok(())
        }

        fn poll_connect(&mut self, connected: bool) -> Option<Box<dyn LinkStream>> {
            let mut s = self.state.lock().expect("mem link");
            if let Some(end) = s.waiting[self.side].pop_front() {
                return Some(Box::new(end));
            }
            if (connected && !self.lane_wanted) || s.cut {
                return None;
            }
            if !connected {
                // A new link's first pair kills whatever pairs existed.
                for (a, _) in s.alive.drain(..) {
                    a.store(false, Ordering::Release);
                }
            }
            self.lane_wanted = false;
            let alive = Arc::new(AtomicBool::new(true));
            let sent = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let (ab, ba): (Pipe, Pipe) = Default::default();
            let fds = [Arc::new(nvmetro_ffi::eventfd().ok()?), Arc::new(nvmetro_ffi::eventfd().ok()?)];
            let end = |i: usize| MemStream {
                rx: if i == 0 { ba.clone() } else { ab.clone() },
                tx: if i == 0 { ab.clone() } else { ba.clone() },
                held: Vec::new(),
                readable: fds[i].clone(),
                peer_readable: fds[1 - i].clone(),
                alive: alive.clone(),
                sent: sent.clone(),
                delay: s.delay,
                early: None,
            };
            let (mine, theirs) = (end(self.side), end(1 - self.side));
            s.waiting[1 - self.side].push_back(theirs);
            s.alive.push((alive, sent));
            Some(Box::new(mine))
        }

        fn want_lane(&mut self) -> bool {
            self.lane_wanted = self.side == 1;
            self.lane_wanted
        }

        fn failed(&mut self) {}

        fn connecting(&self) -> bool {
            false
        }

        fn describe(&self) -> String {
            format!("in-memory link, side {}", self.side)
        }

        fn side(&self) -> crate::mirror::auth::Side {
            if self.side == 0 {
                crate::mirror::auth::Side::Acceptor
            } else {
                crate::mirror::auth::Side::Dialer
            }
        }
    }
}
