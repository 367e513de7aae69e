//! The witness: a small arbiter at a third site that decides which site of a metro pair keeps a
//! namespace when the two sites lose each other. It holds no user data, only, per mirror, the
//! *authority*: the generation identifier of the data that may be served.
//!
//! Protocol (UDP, one datagram each way, HMAC-SHA256 over every byte with a shared secret):
//! * `Report`: a site tells what it holds (`current`, and whether it is connected and in sync
//!   with its peer). When both sites report being in sync on the same generation, that
//!   generation becomes the authority (this also heals an election whose winner crashed before
//!   it could use its grant).
//! * `Acquire`: a site that lost its peer asks to serve alone. The witness grants it when the
//!   site's `current` (or the `bitmap` it diverged from) is the authority, and moves the
//!   authority to the `next` generation the site will write under. The first site to reach the
//!   witness therefore wins; the other one's data no longer descends from the authority, so it
//!   is denied, now and after any restart, until it has been resynced from the winner.
//!   Retrying with the same `next` is idempotent, so a late or lost reply cannot strand a grant.
//! * Every request carries a sequence number that grows for the site's whole life (it starts
//!   from the wall clock). The witness ignores a request older than one it already took from
//!   that site, so a datagram delayed in the network cannot speak for a site's past: a stale
//!   in-sync report cannot undo an election the site made since (the grant's sequence number is
//!   kept across witness restarts).
//!
//! * `Status` (an operator's `nvmetro-witness status`): the witness answers with what it knows,
//!   as JSON ([`WitnessStatus`]), authenticated like every other datagram; it changes nothing.
//!
//! [`WitnessState`] is sans-IO; the daemon (`nvmetro-witness`) persists it after every change so
//! that a restarted witness decides exactly as before.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::BTreeMap;

const MAGIC: &[u8; 4] = b"NVMW";
const VERSION: u8 = 1;
const TAG: usize = 32;
/// Largest mirror name carried.
pub const MAX_NAME: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ask {
    Report = 1,
    Acquire = 2,
    /// What the witness knows (read-only; `resource` and `site` unused).
    Status = 3,
}

/// What a site sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub ask: Ask,
    pub site: u8,
    /// Report: connected to the peer and both up to date.
    pub in_sync: bool,
    /// Echoed in the reply: matches replies to requests (a late reply to an old request is
    /// recognised and ignored).
    pub nonce: u64,
    /// Grows with every request of this site (see the module docs).
    pub seq: u64,
    pub current: u64,
    pub bitmap: u64,
    /// Acquire: the generation this site will write under once granted (0: it already diverged
    /// under a grant and only confirms it).
    pub next: u64,
    pub resource: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Noted = 0,
    Granted = 1,
    Denied = 2,
}

/// What the witness answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub verdict: Verdict,
    pub nonce: u64,
    pub authority: u64,
    /// The site granted last (0: none since both were last in sync).
    pub holder: u8,
    pub resource: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WitnessError {
    #[error("datagram too short or malformed")]
    Malformed,
    #[error("not a witness datagram")]
    BadMagic,
    #[error("authentication failed (wrong shared secret?)")]
    BadTag,
}

fn sign(secret: &[u8], body: &[u8]) -> [u8; TAG] {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

fn verify<'a>(secret: &[u8], b: &'a [u8]) -> Result<&'a [u8], WitnessError> {
    if b.len() < 8 + TAG {
        return Err(WitnessError::Malformed);
    }
    if &b[..4] != MAGIC || b[4] != VERSION {
        return Err(WitnessError::BadMagic);
    }
    let (body, tag) = b.split_at(b.len() - TAG);
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    mac.verify_slice(tag).map_err(|_| WitnessError::BadTag)?;
    Ok(body)
}

fn put_name(b: &mut Vec<u8>, name: &str) {
    let n = &name.as_bytes()[..name.len().min(MAX_NAME)];
    b.extend_from_slice(&(n.len() as u16).to_le_bytes());
    b.extend_from_slice(n);
}

fn u64_at(b: &[u8], o: usize) -> Result<u64, WitnessError> {
    b.get(o..o + 8).map(|x| u64::from_le_bytes(x.try_into().expect("8 bytes"))).ok_or(WitnessError::Malformed)
}

fn name_at(b: &[u8], o: usize) -> Result<String, WitnessError> {
    let len = b.get(o..o + 2).map(|x| u16::from_le_bytes([x[0], x[1]]) as usize).ok_or(WitnessError::Malformed)?;
    let bytes = b.get(o + 2..o + 2 + len).ok_or(WitnessError::Malformed)?;
    if o + 2 + len != b.len() {
        return Err(WitnessError::Malformed);
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| WitnessError::Malformed)
}

impl Request {
    pub fn encode(&self, secret: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(96);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&[VERSION, self.ask as u8, self.site, u8::from(self.in_sync)]);
        for v in [self.nonce, self.current, self.bitmap, self.next, self.seq] {
            b.extend_from_slice(&v.to_le_bytes());
        }
        put_name(&mut b, &self.resource);
        let tag = sign(secret, &b);
        b.extend_from_slice(&tag);
        b
    }

    pub fn parse(b: &[u8], secret: &[u8]) -> Result<Request, WitnessError> {
        let body = verify(secret, b)?;
        let ask = match body.get(5) {
            Some(1) => Ask::Report,
            Some(2) => Ask::Acquire,
            Some(3) => Ask::Status,
            _ => return Err(WitnessError::Malformed),
        };
        Ok(Request {
            ask,
            site: *body.get(6).ok_or(WitnessError::Malformed)?,
            in_sync: body.get(7) == Some(&1),
            nonce: u64_at(body, 8)?,
            current: u64_at(body, 16)?,
            bitmap: u64_at(body, 24)?,
            next: u64_at(body, 32)?,
            seq: u64_at(body, 40)?,
            resource: name_at(body, 48)?,
        })
    }
}

impl Reply {
    pub fn encode(&self, secret: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(80);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&[VERSION, 0x80 | self.verdict as u8, self.holder, 0]);
        b.extend_from_slice(&self.nonce.to_le_bytes());
        b.extend_from_slice(&self.authority.to_le_bytes());
        put_name(&mut b, &self.resource);
        let tag = sign(secret, &b);
        b.extend_from_slice(&tag);
        b
    }

    pub fn parse(b: &[u8], secret: &[u8]) -> Result<Reply, WitnessError> {
        let body = verify(secret, b)?;
        let verdict = match body.get(5) {
            Some(0x80) => Verdict::Noted,
            Some(0x81) => Verdict::Granted,
            Some(0x82) => Verdict::Denied,
            _ => return Err(WitnessError::Malformed),
        };
        Ok(Reply {
            verdict,
            holder: *body.get(6).ok_or(WitnessError::Malformed)?,
            nonce: u64_at(body, 8)?,
            authority: u64_at(body, 16)?,
            resource: name_at(body, 24)?,
        })
    }
}

/// The answer to a [`Ask::Status`] request: the request's nonce and the status as JSON.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReply {
    pub nonce: u64,
    pub status: WitnessStatus,
}

const STATUS_KIND: u8 = 0x90;

impl StatusReply {
    pub fn encode(&self, secret: &[u8]) -> Vec<u8> {
        let mut b = Vec::with_capacity(512);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&[VERSION, STATUS_KIND, 0, 0]);
        b.extend_from_slice(&self.nonce.to_le_bytes());
        b.extend_from_slice(serde_json::to_string(&self.status).expect("plain data serialises").as_bytes());
        let tag = sign(secret, &b);
        b.extend_from_slice(&tag);
        b
    }

    pub fn parse(b: &[u8], secret: &[u8]) -> Result<StatusReply, WitnessError> {
        let body = verify(secret, b)?;
        if body.get(5) != Some(&STATUS_KIND) {
            return Err(WitnessError::Malformed);
        }
        let status = serde_json::from_slice(body.get(16..).ok_or(WitnessError::Malformed)?).map_err(|_| WitnessError::Malformed)?;
        Ok(StatusReply { nonce: u64_at(body, 8)?, status })
    }
}

/// What `nvmetro-witness status` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessStatus {
    pub resources: Vec<ResourceStatus>,
    /// Mirrors left out of this answer (it is one datagram).
    #[serde(default)]
    pub left_out: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceStatus {
    pub name: String,
    /// The generation that may be served, in hex (empty: not known yet).
    pub authority: String,
    /// The site granted last; none once both sites were seen in sync again.
    pub holder: Option<u8>,
    /// Each site's last report since the witness started.
    pub sites: Vec<SiteStatus>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteStatus {
    pub site: u8,
    /// The generation the site reported holding, in hex.
    pub current: String,
    pub in_sync: bool,
    pub last_report_ms_ago: u64,
}

/// One site's last report, as the witness saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SiteReport {
    pub current: u64,
    pub in_sync: bool,
    #[serde(skip)]
    pub seq: u64,
    /// Witness clock, milliseconds.
    #[serde(skip)]
    pub at_ms: u64,
}

/// What the witness knows of one mirror.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resource {
    /// The generation that may be served (0: not known yet; the first site to ask sets it).
    pub authority: u64,
    /// The site granted last; 0 once both sites were seen in sync again.
    pub holder: u8,
    /// The sequence number of the holder's granted request: anything older from it is stale.
    #[serde(default)]
    pub holder_seq: u64,
    #[serde(skip)]
    pub sites: BTreeMap<u8, SiteReport>,
}

/// The witness's decisions, without I/O. `changed` tells the daemon to persist.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct WitnessState {
    pub resources: BTreeMap<String, Resource>,
    #[serde(skip)]
    pub changed: bool,
}

/// Two in-sync reports older than this do not count as agreement.
const AGREEMENT_WINDOW_MS: u64 = 5_000;

impl WitnessState {
    /// What the witness knows at `now_ms` (its clock).
    pub fn status(&self, now_ms: u64) -> WitnessStatus {
        let hex = |g: u64| if g == 0 { String::new() } else { format!("{g:x}") };
        WitnessStatus {
            left_out: 0,
            resources: self
                .resources
                .iter()
                .map(|(name, r)| ResourceStatus {
                    name: name.clone(),
                    authority: hex(r.authority),
                    holder: (r.holder != 0).then_some(r.holder),
                    sites: r
                        .sites
                        .iter()
                        .map(|(site, s)| SiteStatus {
                            site: *site,
                            current: hex(s.current),
                            in_sync: s.in_sync,
                            last_report_ms_ago: now_ms.saturating_sub(s.at_ms),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    /// A site's Report or Acquire (a Status request is answered with [`WitnessState::status`]
    /// and changes nothing: here it is only noted).
    pub fn handle(&mut self, req: &Request, now_ms: u64) -> Reply {
        if req.ask == Ask::Status {
            return Reply { verdict: Verdict::Noted, nonce: req.nonce, authority: 0, holder: 0, resource: req.resource.clone() };
        }
        let r = self.resources.entry(req.resource.clone()).or_default();
        let stale = r.sites.get(&req.site).is_some_and(|s| req.seq <= s.seq) || (req.site == r.holder && req.seq <= r.holder_seq);
        if stale {
            // A delayed datagram: it cannot speak for the site any more. The site retries.
            return Reply { verdict: Verdict::Noted, nonce: 0, authority: r.authority, holder: r.holder, resource: req.resource.clone() };
        }
        r.sites.insert(req.site, SiteReport { current: req.current, in_sync: req.in_sync, seq: req.seq, at_ms: now_ms });
        let before = (r.authority, r.holder);
        let verdict = match req.ask {
            Ask::Status => Verdict::Noted,
            Ask::Report => {
                if req.in_sync && req.current != 0 {
                    let agreed = r
                        .sites
                        .iter()
                        .filter(|(s, _)| **s != req.site)
                        .any(|(_, o)| o.in_sync && o.current == req.current && now_ms.saturating_sub(o.at_ms) <= AGREEMENT_WINDOW_MS);
                    if r.authority == 0 || agreed {
                        r.authority = req.current;
                        r.holder = 0;
                    } else if r.authority == req.current && r.holder == req.site {
                        // The site that served alone has resynced its peer.
                        r.holder = 0;
                    }
                }
                Verdict::Noted
            }
            Ask::Acquire => {
                let descends = r.authority == 0
                    || r.authority == req.current
                    || (req.bitmap != 0 && r.authority == req.bitmap)
                    || (req.next != 0 && r.authority == req.next);
                if descends && req.current != 0 {
                    if req.next != 0 {
                        r.authority = req.next;
                    } else if r.authority == req.bitmap || r.authority == 0 {
                        // A confirmation of the lineage the site serves under (also when this
                        // witness never knew the mirror: a later, older copy must not win it).
                        r.authority = req.current;
                    }
                    r.holder = req.site;
                    r.holder_seq = req.seq;
                    Verdict::Granted
                } else {
                    Verdict::Denied
                }
            }
        };
        self.changed |= before != (r.authority, r.holder);
        Reply { verdict, nonce: req.nonce, authority: r.authority, holder: r.holder, resource: req.resource.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ask: Ask, site: u8, current: u64, bitmap: u64, next: u64) -> Request {
        Request { ask, site, in_sync: false, nonce: 9, seq: 0, current, bitmap, next, resource: "m".into() }
    }

    #[test]
    fn datagrams_round_trip_and_are_authenticated() {
        let r = Request { in_sync: true, ..req(Ask::Report, 2, 5, 6, 7) };
        let b = r.encode(b"secret");
        assert_eq!(Request::parse(&b, b"secret"), Ok(r));
        assert_eq!(Request::parse(&b, b"other"), Err(WitnessError::BadTag));
        let mut flipped = b.clone();
        flipped[20] ^= 1;
        assert_eq!(Request::parse(&flipped, b"secret"), Err(WitnessError::BadTag));
        assert_eq!(Request::parse(&b[..10], b"secret"), Err(WitnessError::Malformed));
        let rep = Reply { verdict: Verdict::Denied, nonce: 3, authority: 8, holder: 1, resource: "m".into() };
        assert_eq!(Reply::parse(&rep.encode(b"k"), b"k"), Ok(rep));
    }

    /// Handles `req` at `now`, as sent at `now` (its sequence number).
    fn at(w: &mut WitnessState, req: &Request, now: u64) -> Reply {
        w.handle(&Request { seq: now + 1, ..req.clone() }, now)
    }

    #[test]
    fn first_site_to_ask_wins_and_the_other_stays_out() {
        let mut w = WitnessState::default();
        let insync = Request { in_sync: true, ..req(Ask::Report, 1, 5, 0, 0) };
        at(&mut w, &insync, 0);
        assert_eq!(w.resources["m"].authority, 5);
        assert_eq!(at(&mut w, &req(Ask::Acquire, 2, 5, 0, 77), 10).verdict, Verdict::Granted);
        assert_eq!(at(&mut w, &req(Ask::Acquire, 1, 5, 0, 88), 11).verdict, Verdict::Denied);
        // The winner retries (its reply was lost): still granted, nothing moves.
        assert_eq!(at(&mut w, &req(Ask::Acquire, 2, 5, 0, 77), 12).verdict, Verdict::Granted);
        // The winner, diverged, confirms later; the loser restarted is still out.
        assert_eq!(at(&mut w, &req(Ask::Acquire, 2, 77, 5, 0), 13).verdict, Verdict::Granted);
        assert_eq!(at(&mut w, &req(Ask::Acquire, 1, 5, 0, 99), 14).verdict, Verdict::Denied);
        // An in-sync report from the loser alone does not move the authority back.
        at(&mut w, &Request { site: 1, ..insync.clone() }, 15);
        assert_eq!(w.resources["m"].authority, 77);
        // Resynced: both report 77 in sync; the holder is released.
        for site in [1, 2] {
            at(&mut w, &Request { site, current: 77, ..insync.clone() }, 20 + u64::from(site));
        }
        assert_eq!((w.resources["m"].authority, w.resources["m"].holder), (77, 0));
    }

    #[test]
    fn delayed_datagrams_cannot_undo_an_election() {
        let mut w = WitnessState::default();
        let insync = |site| Request { in_sync: true, seq: 10 + u64::from(site), ..req(Ask::Report, site, 5, 0, 0) };
        // Both sites reported in sync at 5; a second pair of such reports is still in flight.
        w.handle(&insync(1), 0);
        w.handle(&insync(2), 0);
        // The link breaks; site 2 wins.
        let won = Request { seq: 20, ..req(Ask::Acquire, 2, 5, 0, 77) };
        assert_eq!(w.handle(&won, 1).verdict, Verdict::Granted);
        // The stale reports arrive: ignored (older than what each site sent since, or than
        // the grant), so site 1 is still denied.
        w.handle(&Request { seq: 15, ..insync(1) }, 2);
        w.handle(&Request { seq: 15, ..insync(2) }, 2);
        assert_eq!(w.resources["m"].authority, 77);
        assert_eq!(w.handle(&Request { seq: 30, ..req(Ask::Acquire, 1, 5, 0, 88) }, 3).verdict, Verdict::Denied);
        // Also after a witness restart (the grant's sequence number is persisted).
        let mut back: WitnessState = serde_json::from_str(&serde_json::to_string(&w).unwrap()).unwrap();
        back.handle(&Request { seq: 16, ..insync(2) }, 0);
        back.handle(&Request { seq: 31, ..insync(1) }, 0);
        assert_eq!(back.resources["m"].authority, 77, "a stale report from the winner cannot heal");
    }

    #[test]
    fn both_sites_in_sync_heal_a_grant_nobody_used() {
        let mut w = WitnessState::default();
        at(&mut w, &req(Ask::Acquire, 1, 5, 0, 77), 0); // granted, then site 1 crashed
        let insync = Request { in_sync: true, ..req(Ask::Report, 1, 5, 0, 0) };
        at(&mut w, &insync, 100);
        assert_eq!(w.resources["m"].authority, 77, "one site alone cannot move it back");
        at(&mut w, &Request { site: 2, ..insync }, 200);
        assert_eq!(w.resources["m"].authority, 5);
    }

    #[test]
    fn a_status_answer_tells_authority_holder_and_reports_and_is_authenticated() {
        let mut w = WitnessState::default();
        at(&mut w, &req(Ask::Report, 1, 7, 7, 0), 100);
        at(&mut w, &req(Ask::Acquire, 2, 7, 7, 9), 300);
        let st = w.status(1000);
        assert_eq!(st.resources.len(), 1);
        let r = &st.resources[0];
        assert_eq!((r.name.as_str(), r.authority.as_str(), r.holder), ("m", "9", Some(2)));
        assert_eq!(r.sites.iter().map(|s| (s.site, s.last_report_ms_ago)).collect::<Vec<_>>(), [(1, 900), (2, 700)]);
        let reply = StatusReply { nonce: 5, status: st };
        let b = reply.encode(b"s");
        assert_eq!(StatusReply::parse(&b, b"s"), Ok(reply));
        assert_eq!(StatusReply::parse(&b, b"other"), Err(WitnessError::BadTag));
        let ask = Request { ask: Ask::Status, ..req(Ask::Report, 0, 0, 0, 0) };
        assert_eq!(Request::parse(&ask.encode(b"s"), b"s").map(|r| r.ask), Ok(Ask::Status));
    }

    #[test]
    fn a_witness_that_never_knew_the_mirror_records_the_lineage_a_site_confirms() {
        let mut w = WitnessState::default();
        // A site that served alone without the witness (forced, or pre-elected) confirms
        // generation 77, diverged from 5; a returning site with the older 5 is then denied.
        assert_eq!(at(&mut w, &req(Ask::Acquire, 2, 77, 5, 0), 10).verdict, Verdict::Granted);
        assert_eq!(w.resources["m"].authority, 77);
        assert_eq!(at(&mut w, &req(Ask::Acquire, 1, 5, 0, 88), 20).verdict, Verdict::Denied);
    }

    #[test]
    fn state_survives_serialisation() {
        let mut w = WitnessState::default();
        w.handle(&req(Ask::Acquire, 1, 5, 0, 77), 0);
        assert!(w.changed);
        let text = serde_json::to_string(&w).unwrap();
        let back: WitnessState = serde_json::from_str(&text).unwrap();
        assert_eq!(back.resources["m"].authority, 77);
        assert_eq!(back.resources["m"].holder, 1);
    }
}
