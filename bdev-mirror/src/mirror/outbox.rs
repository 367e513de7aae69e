//! The replication link's connection and its two lanes: frames of the host path and control
//! (replication, acknowledgements, pings) go first; resync data yields to them and keeps the
//! kernel's send queue near a fill target, so a resync leaves hosts their latency.

use super::transport::LinkStream;
use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

pub(super) struct Conn {
    pub(super) sock: Box<dyn LinkStream>,
    pub(super) rx: Vec<u8>,
    pub(super) rx_len: usize,
    /// Encoded frames of the host path and control (replication, acknowledgements, pings).
    pub(super) tx: Vec<u8>,
    /// Resync data frames: a lane of their own that yields to `tx` (see [`Conn::write_out`]).
    pub(super) bulk: VecDeque<Vec<u8>>,
    /// Bytes of `bulk`'s first frame already written.
    pub(super) bulk_sent: usize,
    /// Resync data waits for the socket to drain below the fill target (no event announces it).
    pub(super) fill_blocked: bool,
    /// When bytes of `tx` last left: resync data keeps to [`RESYNC_FILL_BUSY`] for a while after.
    pub(super) last_urgent: Option<Instant>,
    /// Frames held back by the emulated link delay: (due, encoded bytes, resync data).
    pub(super) delayed: VecDeque<(Instant, Vec<u8>, bool)>,
    pub(super) last_rx: Instant,
}

/// Resync data in the socket while host frames flow: about one chunk, so a host write's frame
/// waits behind at most that much.
const RESYNC_FILL_BUSY: usize = super::core::RESYNC_CHUNK;
/// Resync data in the socket while the link carries nothing else.
const RESYNC_FILL_IDLE: usize = 4 << 20;
/// Host frames within this keep the resync at [`RESYNC_FILL_BUSY`].
const RESYNC_YIELD: Duration = Duration::from_millis(5);
/// How soon a resync held back by the fill target looks at the socket again.
pub(super) const RESYNC_RECHECK: Duration = Duration::from_micros(50);

/// Writes what the socket takes: Ok(bytes written), 0 when it takes nothing now.
fn write_some(sock: &mut dyn LinkStream, bytes: &[u8]) -> Result<usize, String> {
    loop {
        return match sock.write(bytes) {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(format!("write: {e}")),
        };
    }
}

impl Conn {
    pub(super) fn new(sock: Box<dyn LinkStream>, rx: Vec<u8>, rx_len: usize) -> Conn {
        Conn {
            sock,
            rx,
            rx_len,
            tx: Vec::new(),
            bulk: VecDeque::new(),
            bulk_sent: 0,
            fill_blocked: false,
            last_urgent: None,
            delayed: VecDeque::new(),
            last_rx: Instant::now(),
        }
    }

    /// Writes frames in priority order: the rest of a resync frame already started (frames do
    /// not interleave), then everything of the host path, then resync data, but only while the
    /// socket holds less than the fill target (DRBD's `c-fill-target`): the kernel's send queue
    /// would otherwise fill with resync data that every host frame waits behind.
    pub(super) fn write_out(&mut self, now: Instant) -> Result<(), String> {
        self.fill_blocked = false;
        loop {
            // Between frames: host frames first, then a resync frame if the fill target allows.
            if self.bulk_sent == 0 {
                if !self.tx.is_empty() {
                    let n = write_some(self.sock.as_mut(), &self.tx)?;
                    if n == 0 {
                        return Ok(());
                    }
                    self.tx.drain(..n);
                    self.last_urgent = Some(now);
                    continue;
                }
                if self.bulk.is_empty() {
                    return Ok(());
                }
                let busy = self.last_urgent.is_some_and(|t| now.duration_since(t) < RESYNC_YIELD);
                let fill = if busy { RESYNC_FILL_BUSY } else { RESYNC_FILL_IDLE };
                if self.sock.unsent().unwrap_or(0) >= fill {
                    self.fill_blocked = true;
                    return Ok(());
                }
            }
            // The (rest of the) first resync frame.
            let n = write_some(self.sock.as_mut(), &self.bulk[0][self.bulk_sent..])?;
            if n == 0 {
                return Ok(());
            }
            self.bulk_sent += n;
            if self.bulk_sent == self.bulk[0].len() {
                self.bulk.pop_front();
                self.bulk_sent = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};

    /// A socket that takes at most `room` bytes per write and reports `queued` unsent bytes.
    #[derive(Clone, Default)]
    struct Wire {
        written: Arc<Mutex<Vec<u8>>>,
        room: Arc<Mutex<usize>>,
        queued: Arc<Mutex<usize>>,
    }

    impl Read for Wire {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
    }

    impl Write for Wire {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let mut room = self.room.lock().unwrap();
            if *room == 0 {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(*room);
            *room -= n;
            self.written.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl LinkStream for Wire {
        fn register(&mut self, _: &mio::Registry, _: mio::Token) -> io::Result<()> {
            Ok(())
        }
        fn deregister(&mut self, _: &mio::Registry) {}
        fn unsent(&self) -> Option<usize> {
            Some(*self.queued.lock().unwrap())
        }
    }

    fn conn(wire: &Wire) -> Conn {
        Conn::new(Box::new(wire.clone()), vec![0; 16], 0)
    }

    #[test]
    fn host_frames_go_before_resync_data_and_a_started_resync_frame_finishes_first() {
        let wire = Wire::default();
        let mut c = conn(&wire);
        c.bulk.push_back(vec![b'R'; 10]);
        c.bulk.push_back(vec![b'S'; 10]);
        c.tx.extend_from_slice(b"hh");
        *wire.room.lock().unwrap() = 6;
        c.write_out(Instant::now()).unwrap();
        assert_eq!(&wire.written.lock().unwrap()[..], b"hhRRRR", "host bytes first, then resync data");
        // A host frame queued now waits for the rest of the started resync frame, not the next.
        c.tx.extend_from_slice(b"HH");
        *wire.room.lock().unwrap() = 100;
        c.write_out(Instant::now()).unwrap();
        assert_eq!(&wire.written.lock().unwrap()[..], b"hhRRRRRRRRRRHHSSSSSSSSSS");
        assert!(c.bulk.is_empty() && c.tx.is_empty() && !c.fill_blocked);
    }

    #[test]
    fn resync_data_keeps_the_socket_queue_under_the_fill_target() {
        let wire = Wire::default();
        let mut c = conn(&wire);
        *wire.room.lock().unwrap() = usize::MAX;
        let now = Instant::now();
        // Hosts just wrote: a queue of one chunk holds resync data back.
        c.tx.extend_from_slice(b"h");
        *wire.queued.lock().unwrap() = RESYNC_FILL_BUSY;
        c.bulk.push_back(vec![b'R'; 4]);
        c.write_out(now).unwrap();
        assert_eq!(&wire.written.lock().unwrap()[..], b"h");
        assert!(c.fill_blocked, "held back by the fill target, to be looked at again soon");
        // Without host frames for a while the target is larger: the data goes.
        c.write_out(now + RESYNC_YIELD).unwrap();
        assert_eq!(&wire.written.lock().unwrap()[..], b"hRRRR");
        assert!(!c.fill_blocked);
        // Past even the idle target, nothing more goes.
        *wire.queued.lock().unwrap() = RESYNC_FILL_IDLE;
        c.bulk.push_back(vec![b'S'; 4]);
        c.write_out(now + RESYNC_YIELD).unwrap();
        assert!(c.fill_blocked && c.bulk.len() == 1);
    }

    #[test]
    fn a_socket_error_is_reported() {
        struct Broken;
        impl Read for Broken {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Ok(0)
            }
        }
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        impl LinkStream for Broken {
            fn register(&mut self, _: &mio::Registry, _: mio::Token) -> io::Result<()> {
                Ok(())
            }
            fn deregister(&mut self, _: &mio::Registry) {}
        }
        let mut c = Conn::new(Box::new(Broken), Vec::new(), 0);
        c.bulk.push_back(vec![1]);
        assert!(c.write_out(Instant::now()).unwrap_err().starts_with("write:"));
    }
}
