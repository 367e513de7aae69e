//! The DR stream's connection: TCP, authenticated by the same HMAC challenge-response as the
//! replication link ([`crate::mirror::auth`]) before any frame, then [`DrFrame`]s both ways.
//!
//! The handshake runs blocking, within [`HANDSHAKE_TIMEOUT`] in all, off the stream's thread
//! (the production site's dialer; at the DR site a thread per connection, a few at a time), so a
//! slow or silent stranger never holds up the stream; the authenticated socket then becomes
//! non-blocking and moves to the thread that owns the stream.

use super::frame::{DrFrame, FrameError, HEADER_LEN, MAX_PAYLOAD};
use crate::mirror::auth::{fresh_nonce, Handshake, Side};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A connection must finish its handshake within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);

/// Proves to the other end that this one knows `secret`, and checks that it does too. Returns
/// the bytes that arrived after the handshake (the first frames).
pub fn authenticate(sock: &mut TcpStream, secret: &[u8], side: Side) -> io::Result<Vec<u8>> {
    // The whole handshake, not each read: a peer dribbling bytes gets no longer.
    let deadline = std::time::Instant::now() + HANDSHAKE_TIMEOUT;
    let mut hs = Handshake::new(secret, side, fresh_nonce()?);
    let refused = |e: String| io::Error::new(io::ErrorKind::PermissionDenied, format!("authentication failed: {e}"));
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no handshake within the timeout"));
        }
        sock.set_read_timeout(Some(left))?;
        sock.set_write_timeout(Some(left))?;
        let tx = hs.take_output();
        sock.write_all(&tx)?;
        if hs.is_done() {
            return Ok(Vec::new());
        }
        let n = sock.read(&mut buf)?;
        if n == 0 {
            return Err(refused(hs.on_eof().err().map_or("closed".into(), |e| e.to_string())));
        }
        let progress = hs.on_bytes(&buf[..n]).map_err(|e| refused(e.to_string()))?;
        if progress.done {
            sock.write_all(&hs.take_output())?;
            return Ok(buf[progress.consumed..n].to_vec());
        }
    }
}

/// Hands `frames` to `on_frame` in order and empties it; the first refusal stops it and is
/// returned (the connection then ends).
pub fn each_frame(frames: &mut Vec<DrFrame>, mut on_frame: impl FnMut(DrFrame) -> Result<(), String>) -> Option<String> {
    let refused = frames.drain(..).try_for_each(&mut on_frame).err();
    frames.clear();
    refused
}

/// An authenticated connection carrying frames, non-blocking.
pub struct FramedConn {
    pub sock: mio::net::TcpStream,
    rx: Vec<u8>,
    rx_len: usize,
    tx: Vec<u8>,
    tx_at: usize,
}

impl FramedConn {
    pub fn new(sock: TcpStream, early: Vec<u8>) -> io::Result<FramedConn> {
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(None)?;
        sock.set_write_timeout(None)?;
        let mut rx = vec![0; 2 * (HEADER_LEN + MAX_PAYLOAD)];
        rx[..early.len()].copy_from_slice(&early);
        Ok(FramedConn { sock: mio::net::TcpStream::from_std(sock), rx_len: early.len(), rx, tx: Vec::new(), tx_at: 0 })
    }

    pub fn queue(&mut self, f: &DrFrame) {
        f.encode(&mut self.tx);
    }

    /// Bytes queued and not yet written.
    pub fn unsent(&self) -> usize {
        self.tx.len() - self.tx_at
    }

    /// Writes what the socket takes now.
    pub fn flush(&mut self) -> io::Result<()> {
        while self.tx_at < self.tx.len() {
            match self.sock.write(&self.tx[self.tx_at..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.tx_at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.tx_at == self.tx.len() {
            self.tx.clear();
            self.tx_at = 0;
        } else if self.tx_at > (1 << 20) {
            self.tx.drain(..self.tx_at);
            self.tx_at = 0;
        }
        Ok(())
    }

    /// Reads what has arrived and appends the whole frames to `frames`; an error ends the
    /// connection (a closed socket is `UnexpectedEof`, a malformed frame `InvalidData`).
    pub fn read_frames(&mut self, frames: &mut Vec<DrFrame>) -> io::Result<()> {
        loop {
            let mut at = 0;
            while let Some((f, n)) =
                DrFrame::parse(&self.rx[at..self.rx_len]).map_err(|e: FrameError| io::Error::new(io::ErrorKind::InvalidData, e))?
            {
                frames.push(f);
                at += n;
            }
            self.rx.copy_within(at..self.rx_len, 0);
            self.rx_len -= at;
            match self.sock.read(&mut self.rx[self.rx_len..]) {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed by the other end")),
                Ok(n) => self.rx_len += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}
