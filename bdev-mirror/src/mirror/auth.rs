//! Mutual authentication of the replication link, without I/O (DRBD's `cram-hmac-alg` with a
//! `shared-secret`).
//!
//! Both ends send a hello at once, then a proof that they know the secret:
//!
//! ```text
//! hello = "NMAUTH01" || role (1 byte: 1 acceptor, 2 dialer) || nonce (32 bytes)     41 bytes
//! proof = HMAC-SHA256(secret, PROOF_LABEL || own role || peer nonce || own nonce)   32 bytes
//! ```
//!
//! * Each side's proof covers the other side's fresh nonce, so a transcript recorded from an
//!   earlier connection never verifies on a new one.
//! * The role byte is part of the proof and the two directions carry different roles, so a proof
//!   sent back to its author (reflection) does not verify either; a hello claiming the receiver's
//!   own role, or carrying the receiver's own nonce, is refused before any proof is looked at.
//! * Proofs are compared in constant time ([`Mac::verify_slice`]).
//! * The handshake has a fixed size (73 bytes each way): [`Handshake::on_bytes`] never buffers
//!   more than that, checks the magic byte by byte and fails at the first malformed byte. Bytes
//!   after the peer's proof are left unconsumed for the frame layer.
//! * Once done, both ends hold the same 32-byte [`Handshake::session_key`], derived from the
//!   secret and both nonces. The handshake alone proves that the peer knows the secret, not that
//!   the bytes come straight from it: a relay between two honest ends passes it (as with DRBD).
//!   Authenticating the frames that follow with the session key closes that gap.
//!
//! The caller owns the socket and the deadline: it should give up on a peer that has not finished
//! within a few seconds (a silent peer makes the handshake wait, never fail).

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io;

/// The hello's first bytes (and the protocol version).
pub const MAGIC: &[u8; 8] = b"NMAUTH01";
/// Bytes in a nonce, a proof and the session key.
pub const NONCE_LEN: usize = 32;
/// Bytes in a hello.
pub const HELLO_LEN: usize = MAGIC.len() + 1 + NONCE_LEN;
/// Bytes in a proof.
pub const PROOF_LEN: usize = 32;
/// Bytes each side sends (and accepts) in the whole handshake.
pub const HANDSHAKE_LEN: usize = HELLO_LEN + PROOF_LEN;

const PROOF_LABEL: &[u8] = b"nvmetro mirror auth v1 proof";
const KEY_LABEL: &[u8] = b"nvmetro mirror auth v1 session key";

/// Which end of the link: the one that accepted the connection, or the one that dialed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Side {
    Acceptor = 1,
    Dialer = 2,
}

impl Side {
    pub fn from_u8(v: u8) -> Option<Side> {
        match v {
            1 => Some(Side::Acceptor),
            2 => Some(Side::Dialer),
            _ => None,
        }
    }

    pub fn peer(self) -> Side {
        match self {
            Side::Acceptor => Side::Dialer,
            Side::Dialer => Side::Acceptor,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the peer does not speak the nvmetro link authentication protocol (bad magic)")]
    BadMagic,
    #[error("the peer sent an unknown role byte {0:#04x}")]
    BadRole(u8),
    #[error("the peer claims this end's own role ({0:?}): both ends dialed or both accepted, or a reflection")]
    RoleClash(Side),
    #[error("the peer sent this end's own nonce back (reflection)")]
    Reflected,
    #[error("the peer's proof does not verify (wrong shared secret, tampering or replay)")]
    BadProof,
    #[error("the connection closed in the middle of the authentication handshake")]
    Truncated,
}

/// Where the handshake stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting for (the rest of) the peer's hello.
    Hello,
    /// Waiting for (the rest of) the peer's proof.
    Proof,
    /// The peer proved it knows the secret.
    Done,
    /// The peer failed; the connection must be closed.
    Failed,
}

/// What [`Handshake::on_bytes`] did with its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes of the input that belong to the handshake; the rest belongs to the frame layer.
    pub consumed: usize,
    /// The peer is authenticated; [`Handshake::session_key`] is available.
    pub done: bool,
}

/// One end's handshake.
pub struct Handshake {
    mac: Hmac<Sha256>,
    side: Side,
    nonce: [u8; NONCE_LEN],
    peer_nonce: [u8; NONCE_LEN],
    /// The peer's bytes so far (at most [`HANDSHAKE_LEN`]).
    received: Vec<u8>,
    output: Vec<u8>,
    state: State,
    error: Option<AuthError>,
    session_key: Option<[u8; 32]>,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Neither the secret nor the session key.
        f.debug_struct("Handshake").field("side", &self.side).field("state", &self.state).field("error", &self.error).finish()
    }
}

impl Handshake {
    /// Starts a handshake; the hello is ready in [`Handshake::take_output`] at once. `nonce`
    /// must be fresh for every connection: see [`fresh_nonce`].
    pub fn new(secret: &[u8], side: Side, nonce: [u8; NONCE_LEN]) -> Handshake {
        let mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
        let mut output = Vec::with_capacity(HANDSHAKE_LEN);
        output.extend_from_slice(MAGIC);
        output.push(side as u8);
        output.extend_from_slice(&nonce);
        Handshake {
            mac,
            side,
            nonce,
            peer_nonce: [0; NONCE_LEN],
            received: Vec::with_capacity(HANDSHAKE_LEN),
            output,
            state: State::Hello,
            error: None,
            session_key: None,
        }
    }

    pub fn side(&self) -> Side {
        self.side
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Why the handshake failed, if it did.
    pub fn error(&self) -> Option<&AuthError> {
        self.error.as_ref()
    }

    /// The key both ends share once done: HMAC-SHA256(secret, label || acceptor's nonce ||
    /// dialer's nonce).
    pub fn session_key(&self) -> Option<&[u8; 32]> {
        self.session_key.as_ref()
    }

    /// Bytes to send to the peer (the hello first, the proof once the peer's hello is in).
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// Whether [`Handshake::take_output`] has anything.
    pub fn wants_write(&self) -> bool {
        !self.output.is_empty()
    }

    /// Feeds bytes from the peer, in any fragments. Consumes only the handshake's own bytes;
    /// after a failure every call returns the same error.
    pub fn on_bytes(&mut self, input: &[u8]) -> Result<Progress, AuthError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let mut consumed = 0;
        while consumed < input.len() && self.state != State::Done {
            let b = input[consumed];
            consumed += 1;
            let at = self.received.len();
            self.received.push(b);
            if let Err(e) = self.step(at, b) {
                return Err(self.fail(e));
            }
        }
        Ok(Progress { consumed, done: self.state == State::Done })
    }

    /// The peer closed the connection: an error unless the handshake was done.
    pub fn on_eof(&mut self) -> Result<(), AuthError> {
        match &self.error {
            Some(e) => Err(e.clone()),
            None if self.state == State::Done => Ok(()),
            None => Err(self.fail(AuthError::Truncated)),
        }
    }

    fn fail(&mut self, e: AuthError) -> AuthError {
        self.state = State::Failed;
        self.error = Some(e.clone());
        self.output.clear();
        e
    }

    /// Byte `at` of the peer's handshake, `b`, just arrived.
    fn step(&mut self, at: usize, b: u8) -> Result<(), AuthError> {
        if at < MAGIC.len() {
            if b != MAGIC[at] {
                return Err(AuthError::BadMagic);
            }
        } else if at == MAGIC.len() {
            match Side::from_u8(b) {
                None => return Err(AuthError::BadRole(b)),
                Some(s) if s == self.side => return Err(AuthError::RoleClash(s)),
                Some(_) => {}
            }
        } else if at + 1 == HELLO_LEN {
            self.peer_nonce.copy_from_slice(&self.received[MAGIC.len() + 1..HELLO_LEN]);
            if self.peer_nonce == self.nonce {
                return Err(AuthError::Reflected);
            }
            let proof = self.proof(self.side, &self.peer_nonce, &self.nonce);
            self.output.extend_from_slice(&proof);
            self.state = State::Proof;
        } else if at + 1 == HANDSHAKE_LEN {
            let claimed = &self.received[HELLO_LEN..HANDSHAKE_LEN];
            if self.proof_mac(self.side.peer(), &self.nonce, &self.peer_nonce).verify_slice(claimed).is_err() {
                return Err(AuthError::BadProof);
            }
            let mut mac = self.mac.clone();
            mac.update(KEY_LABEL);
            let (a, d) = match self.side {
                Side::Acceptor => (&self.nonce, &self.peer_nonce),
                Side::Dialer => (&self.peer_nonce, &self.nonce),
            };
            mac.update(a);
            mac.update(d);
            self.session_key = Some(mac.finalize().into_bytes().into());
            self.state = State::Done;
        }
        Ok(())
    }

    /// The MAC over what `author` proves: its role, the nonce it received, the nonce it sent.
    fn proof_mac(&self, author: Side, received: &[u8; NONCE_LEN], sent: &[u8; NONCE_LEN]) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(PROOF_LABEL);
        mac.update(&[author as u8]);
        mac.update(received);
        mac.update(sent);
        mac
    }

    fn proof(&self, author: Side, received: &[u8; NONCE_LEN], sent: &[u8; NONCE_LEN]) -> [u8; PROOF_LEN] {
        self.proof_mac(author, received, sent).finalize().into_bytes().into()
    }
}

/// A nonce from the kernel's random source.
pub fn fresh_nonce() -> io::Result<[u8; NONCE_LEN]> {
    use std::io::Read;
    let mut nonce = [0u8; NONCE_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut nonce)?;
    Ok(nonce)
}

/// For fuzzers: feeds arbitrary bytes, in fragments whose sizes the data's first byte chooses,
/// to a handshake of each side, and checks the invariants that must hold whatever arrives.
pub fn fuzz_one(data: &[u8]) {
    let (chunk, rest) = match data.split_first() {
        Some((c, rest)) => (usize::from(*c % 16) + 1, rest),
        None => (1, data),
    };
    for side in [Side::Acceptor, Side::Dialer] {
        let mut hs = Handshake::new(b"fuzz secret", side, [0x5a; NONCE_LEN]);
        let hello = hs.take_output();
        assert_eq!(hello.len(), HELLO_LEN);
        let mut total = 0usize;
        for piece in rest.chunks(chunk) {
            match hs.on_bytes(piece) {
                Ok(p) => {
                    assert!(p.consumed <= piece.len());
                    total += p.consumed;
                    if p.done {
                        assert!(hs.session_key().is_some());
                        break;
                    }
                    assert_eq!(p.consumed, piece.len());
                }
                Err(e) => {
                    assert_eq!(hs.state(), State::Failed);
                    assert_eq!(hs.on_bytes(b"x"), Err(e));
                    break;
                }
            }
            assert!(total <= HANDSHAKE_LEN);
            assert!(hs.take_output().len() <= PROOF_LEN);
        }
        let _ = hs.on_eof();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const SECRET: &[u8] = b"correct horse battery staple";

    fn nonce(seed: u8) -> [u8; NONCE_LEN] {
        std::array::from_fn(|i| seed.wrapping_mul(31).wrapping_add(i as u8))
    }

    /// Each side's result, then what each side sent.
    type Outcome = (Result<(), AuthError>, Result<(), AuthError>, Vec<u8>, Vec<u8>);

    /// Drives two handshakes against each other, delivering at most `chunk` bytes at a time.
    /// Returns each side's outcome and everything each side sent.
    fn run(a: &mut Handshake, d: &mut Handshake, chunk: usize) -> Outcome {
        let (mut to_d, mut to_a) = (Vec::new(), Vec::new());
        let (mut sent_a, mut sent_d) = (Vec::new(), Vec::new());
        let (mut ra, mut rd) = (None, None);
        for _ in 0..10_000 {
            let out = a.take_output();
            sent_a.extend_from_slice(&out);
            to_d.extend(out);
            let out = d.take_output();
            sent_d.extend_from_slice(&out);
            to_a.extend(out);
            for (hs, inbox, result) in [(&mut *a, &mut to_a, &mut ra), (&mut *d, &mut to_d, &mut rd)] {
                if result.is_some() || inbox.is_empty() {
                    continue;
                }
                let n = inbox.len().min(chunk);
                match hs.on_bytes(&inbox[..n]) {
                    Ok(p) => {
                        inbox.drain(..p.consumed);
                        if p.done {
                            *result = Some(Ok(()));
                        }
                    }
                    Err(e) => *result = Some(Err(e)),
                }
            }
            if ra.is_some() && rd.is_some() {
                break;
            }
            if to_a.is_empty() && to_d.is_empty() && !a.wants_write() && !d.wants_write() {
                // Stalled: a side failed and the other waits for bytes that will not come.
                ra.get_or_insert_with(|| a.on_eof());
                rd.get_or_insert_with(|| d.on_eof());
            }
        }
        (ra.unwrap(), rd.unwrap(), sent_a, sent_d)
    }

    fn pair(sa: &[u8], sd: &[u8], seed: u8) -> (Handshake, Handshake) {
        (Handshake::new(sa, Side::Acceptor, nonce(seed)), Handshake::new(sd, Side::Dialer, nonce(seed.wrapping_add(100))))
    }

    #[test]
    fn same_secret_succeeds_and_agrees_on_the_key() {
        let (mut a, mut d) = pair(SECRET, SECRET, 1);
        let (ra, rd, sent_a, sent_d) = run(&mut a, &mut d, usize::MAX);
        assert_eq!((ra, rd), (Ok(()), Ok(())));
        assert_eq!((sent_a.len(), sent_d.len()), (HANDSHAKE_LEN, HANDSHAKE_LEN));
        assert!(a.is_done() && d.is_done());
        assert_eq!(a.session_key(), d.session_key());
        assert!(a.session_key().is_some());
        // Another connection, other nonces: another key.
        let (mut a2, mut d2) = pair(SECRET, SECRET, 2);
        let (ra, rd, _, _) = run(&mut a2, &mut d2, usize::MAX);
        assert_eq!((ra, rd), (Ok(()), Ok(())));
        assert_ne!(a.session_key(), a2.session_key());
        assert!(!format!("{a:?}").contains("horse"));
    }

    #[test]
    fn wrong_secret_fails_on_both_sides() {
        let (mut a, mut d) = pair(SECRET, b"wrong", 3);
        let (ra, rd, _, _) = run(&mut a, &mut d, usize::MAX);
        assert_eq!(ra, Err(AuthError::BadProof));
        assert_eq!(rd, Err(AuthError::BadProof));
        assert_eq!(a.state(), State::Failed);
        assert!(a.session_key().is_none() && d.session_key().is_none());
        // Failure sticks.
        assert_eq!(a.on_bytes(&[0; 4]), Err(AuthError::BadProof));
        assert_eq!(a.on_eof(), Err(AuthError::BadProof));
        assert!(!a.wants_write());
    }

    #[test]
    fn byte_at_a_time_works_and_leaves_the_rest() {
        let (mut a, mut d) = pair(SECRET, SECRET, 4);
        let (ra, rd, _, _) = run(&mut a, &mut d, 1);
        assert_eq!((ra, rd), (Ok(()), Ok(())));
        assert_eq!(a.session_key(), d.session_key());

        // Frame bytes right behind the proof stay with the caller.
        let (mut a, mut d) = pair(SECRET, SECRET, 5);
        let mut from_d = d.take_output();
        d.on_bytes(&a.take_output()).unwrap();
        from_d.extend(d.take_output());
        from_d.extend_from_slice(b"FRAME");
        let p = a.on_bytes(&from_d).unwrap();
        assert_eq!(p, Progress { consumed: HANDSHAKE_LEN, done: true });
        assert_eq!(&from_d[p.consumed..], b"FRAME");
        assert_eq!(a.on_bytes(b"more").unwrap(), Progress { consumed: 0, done: true });
    }

    #[test]
    fn replayed_transcript_fails() {
        // Record what a genuine dialer sent in one session...
        let (mut a1, mut d1) = pair(SECRET, SECRET, 6);
        let (_, _, _, recorded) = run(&mut a1, &mut d1, usize::MAX);
        assert_eq!(recorded.len(), HANDSHAKE_LEN);
        // ...and replay it to the acceptor of a new connection, whose nonce is fresh.
        let mut a2 = Handshake::new(SECRET, Side::Acceptor, nonce(7));
        let _ = a2.take_output();
        assert_eq!(a2.on_bytes(&recorded), Err(AuthError::BadProof));

        // Same the other way: a recorded acceptor replayed to a new dialer.
        let (mut a1, mut d1) = pair(SECRET, SECRET, 8);
        let (_, _, recorded, _) = run(&mut a1, &mut d1, usize::MAX);
        let mut d2 = Handshake::new(SECRET, Side::Dialer, nonce(9));
        assert_eq!(d2.on_bytes(&recorded), Err(AuthError::BadProof));
    }

    #[test]
    fn reflection_fails() {
        // An attacker sends the acceptor's own hello back.
        let mut a = Handshake::new(SECRET, Side::Acceptor, nonce(10));
        let hello = a.take_output();
        assert_eq!(a.on_bytes(&hello), Err(AuthError::RoleClash(Side::Acceptor)));

        // It patches the role byte: the nonce gives it away.
        let mut a = Handshake::new(SECRET, Side::Acceptor, nonce(10));
        let mut hello = a.take_output();
        hello[MAGIC.len()] = Side::Dialer as u8;
        assert_eq!(a.on_bytes(&hello), Err(AuthError::Reflected));

        // It patches the nonce too and reflects the acceptor's proof, computed over the attacker's
        // nonce: the proof names the acceptor's role, so it does not pass as the dialer's.
        let mut a = Handshake::new(SECRET, Side::Acceptor, nonce(10));
        let mut hello = a.take_output();
        hello[MAGIC.len()] = Side::Dialer as u8;
        hello[HELLO_LEN - 1] ^= 1;
        assert_eq!(a.on_bytes(&hello), Ok(Progress { consumed: HELLO_LEN, done: false }));
        let proof = a.take_output();
        assert_eq!(proof.len(), PROOF_LEN);
        assert_eq!(a.on_bytes(&proof), Err(AuthError::BadProof));

        // Relaying a second acceptor's proof back (both connections to acceptors) fails likewise.
        let mut a1 = Handshake::new(SECRET, Side::Acceptor, nonce(11));
        let mut a2 = Handshake::new(SECRET, Side::Acceptor, nonce(12));
        let mut h1 = a1.take_output();
        let mut h2 = a2.take_output();
        h1[MAGIC.len()] = Side::Dialer as u8;
        h2[MAGIC.len()] = Side::Dialer as u8;
        a1.on_bytes(&h2).unwrap();
        a2.on_bytes(&h1).unwrap();
        assert_eq!(a1.on_bytes(&a2.take_output()), Err(AuthError::BadProof));
    }

    #[test]
    fn malformed_input_fails_at_once_and_empty_input_waits() {
        let mut a = Handshake::new(SECRET, Side::Acceptor, nonce(13));
        assert_eq!(a.on_bytes(&[]), Ok(Progress { consumed: 0, done: false }));
        assert_eq!(a.state(), State::Hello);
        assert_eq!(a.on_bytes(b"NMAU"), Ok(Progress { consumed: 4, done: false }));
        assert_eq!(a.on_bytes(b"X"), Err(AuthError::BadMagic));

        let mut a = Handshake::new(SECRET, Side::Acceptor, nonce(13));
        assert_eq!(a.on_bytes(b"GET / HTTP/1.1\r\n"), Err(AuthError::BadMagic));
        assert_eq!(a.error(), Some(&AuthError::BadMagic));

        let mut a = Handshake::new(SECRET, Side::Acceptor, nonce(13));
        assert_eq!(a.on_bytes(b"NMAUTH01\x07"), Err(AuthError::BadRole(7)));

        // An old protocol version is a bad magic too.
        let mut a = Handshake::new(SECRET, Side::Acceptor, nonce(13));
        assert_eq!(a.on_bytes(b"NMAUTH00"), Err(AuthError::BadMagic));

        // A peer that stops halfway.
        let mut a = Handshake::new(SECRET, Side::Acceptor, nonce(13));
        a.on_bytes(b"NMAUTH01\x02").unwrap();
        assert_eq!(a.on_eof(), Err(AuthError::Truncated));
    }

    #[test]
    fn fuzz_entry_handles_genuine_and_empty_input() {
        fuzz_one(&[]);
        fuzz_one(&[0]);
        let mut d = Handshake::new(b"fuzz secret", Side::Dialer, nonce(14));
        let mut data = vec![3];
        data.extend(d.take_output());
        fuzz_one(&data);
    }

    #[test]
    fn fresh_nonces_differ() {
        assert_ne!(fresh_nonce().unwrap(), fresh_nonce().unwrap());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            fuzz_one(&data);
        }

        #[test]
        fn random_bytes_after_a_valid_hello_never_panic(
            tail in proptest::collection::vec(any::<u8>(), 0..100),
            chunk in 1usize..50,
        ) {
            let mut a = Handshake::new(SECRET, Side::Acceptor, nonce(15));
            let mut input = Handshake::new(SECRET, Side::Dialer, nonce(16)).take_output();
            input.extend(tail);
            for piece in input.chunks(chunk) {
                if a.on_bytes(piece).is_err() {
                    break;
                }
            }
            // Random bytes are not a valid proof.
            prop_assert!(!a.is_done());
        }
    }
}
