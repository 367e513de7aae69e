//! NVMe/TCP PDUs (NVMe/TCP Transport Specification 1.0): parsing and encoding, with header and data
//! digests (CRC32C). [`parse`] never panics on any input: the fuzz target `pdu_parse` holds it to that.

use crate::nvme::{le16, le32, put16, put32, Command, Completion};

pub const ICREQ: u8 = 0x00;
pub const ICRESP: u8 = 0x01;
pub const H2C_TERM_REQ: u8 = 0x02;
pub const C2H_TERM_REQ: u8 = 0x03;
pub const CAPSULE_CMD: u8 = 0x04;
pub const CAPSULE_RESP: u8 = 0x05;
pub const H2C_DATA: u8 = 0x06;
pub const C2H_DATA: u8 = 0x07;
pub const R2T: u8 = 0x09;

pub const FLAG_HDGST: u8 = 0x01;
pub const FLAG_DDGST: u8 = 0x02;
pub const FLAG_LAST_PDU: u8 = 0x04;
pub const FLAG_SUCCESS: u8 = 0x08;

/// Fatal error status values carried by a TermReq.
pub mod fes {
    pub const INVALID_HEADER_FIELD: u16 = 0x01;
    pub const PDU_SEQUENCE_ERROR: u16 = 0x02;
    pub const HEADER_DIGEST_ERROR: u16 = 0x03;
    pub const DATA_OUT_OF_RANGE: u16 = 0x04;
    pub const DATA_LIMIT_EXCEEDED: u16 = 0x05;
    pub const UNSUPPORTED_PARAMETER: u16 = 0x06;
}

/// Size of the common header every PDU starts with.
pub const COMMON_HEADER: usize = 8;
/// The largest header of any PDU (ICReq/ICResp).
pub const MAX_HEADER: usize = 128;

/// Which digests a connection negotiated.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Digests {
    pub header: bool,
    pub data: bool,
}

impl Digests {
    pub fn from_bits(b: u8) -> Digests {
        Digests { header: b & 1 != 0, data: b & 2 != 0 }
    }
    pub fn bits(self) -> u8 {
        self.header as u8 | (self.data as u8) << 1
    }
    fn hd_len(self) -> usize {
        if self.header {
            4
        } else {
            0
        }
    }
    fn dd_len(self) -> usize {
        if self.data {
            4
        } else {
            0
        }
    }
}

/// A parsed PDU; data fields borrow from the input.
#[derive(Debug, PartialEq, Eq)]
pub enum Pdu<'a> {
    IcReq { pfv: u16, hpda: u8, digests: Digests, maxr2t: u32 },
    IcResp { pfv: u16, cpda: u8, digests: Digests, maxh2cdata: u32 },
    TermReq { from_controller: bool, fes: u16, fei: u32 },
    CapsuleCmd { cmd: Command, data: &'a [u8] },
    CapsuleResp { cqe: Completion },
    H2CData { cccid: u16, ttag: u16, datao: u32, data: &'a [u8], last: bool },
    C2HData { cccid: u16, datao: u32, data: &'a [u8], last: bool, success: bool },
    R2T { cccid: u16, ttag: u16, r2to: u32, r2tl: u32 },
}

/// A protocol error that ends the connection. `fes` is `None` where no TermReq applies (a data
/// digest mismatch), and `header` holds the offending PDU header to echo back in the TermReq.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason} (fatal error status {fes:?}, field offset {fei})")]
pub struct PduError {
    pub fes: Option<u16>,
    pub fei: u32,
    pub reason: &'static str,
    pub header: Vec<u8>,
}

impl PduError {
    pub fn new(fes: u16, fei: u32, reason: &'static str, buf: &[u8]) -> PduError {
        PduError { fes: Some(fes), fei, reason, header: buf[..buf.len().min(MAX_HEADER)].to_vec() }
    }
}

fn expected_hlen(ty: u8) -> Option<usize> {
    Some(match ty {
        ICREQ | ICRESP => 128,
        H2C_TERM_REQ | C2H_TERM_REQ => 24,
        CAPSULE_CMD => 72,
        CAPSULE_RESP | H2C_DATA | C2H_DATA | R2T => 24,
        _ => return None,
    })
}

/// Parses one PDU from the front of `buf`. `Ok(None)` means more bytes are needed; on success the
/// PDU and the number of bytes it took are returned. `max_data` bounds a PDU's data section (the
/// receiver's in-capsule or MAXH2CDATA limit), so a hostile length cannot make us buffer without end.
pub fn parse(buf: &[u8], digests: Digests, max_data: usize) -> Result<Option<(Pdu<'_>, usize)>, PduError> {
    if buf.len() < COMMON_HEADER {
        return Ok(None);
    }
    let ty = buf[0];
    let flags = buf[1];
    let hlen = buf[2] as usize;
    let pdo = buf[3] as usize;
    let plen = le32(buf, 4) as usize;
    let Some(want_hlen) = expected_hlen(ty) else {
        return Err(PduError::new(fes::INVALID_HEADER_FIELD, 0, "unknown PDU type", buf));
    };
    if hlen != want_hlen {
        return Err(PduError::new(fes::INVALID_HEADER_FIELD, 2, "wrong header length", buf));
    }
    let is_ic = ty == ICREQ || ty == ICRESP;
    let is_term = ty == H2C_TERM_REQ || ty == C2H_TERM_REQ;
    let hd = if is_ic || is_term { 0 } else { digests.hd_len() };
    if !is_ic && !is_term && digests.header != (flags & FLAG_HDGST != 0) {
        return Err(PduError::new(fes::INVALID_HEADER_FIELD, 1, "header digest flag differs from negotiation", buf));
    }
    if plen < hlen + hd {
        return Err(PduError::new(fes::INVALID_HEADER_FIELD, 4, "PDU length shorter than its header", buf));
    }
    let has_data = plen > hlen + hd;
    let dd = if has_data && !is_ic && !is_term && flags & FLAG_DDGST != 0 { 4 } else { 0 };
    if has_data && !is_ic && !is_term && digests.data != (flags & FLAG_DDGST != 0) {
        return Err(PduError::new(fes::INVALID_HEADER_FIELD, 1, "data digest flag differs from negotiation", buf));
    }
    let limit = match ty {
        ICREQ | ICRESP => 128,
        H2C_TERM_REQ | C2H_TERM_REQ => hlen + MAX_HEADER,
        CAPSULE_RESP | R2T => hlen + hd,
        _ => hlen + hd + 255 + max_data + dd, // room for the largest padding PDO allows
    };
    if plen > limit {
        let fes = if matches!(ty, CAPSULE_CMD | H2C_DATA) { fes::DATA_LIMIT_EXCEEDED } else { fes::INVALID_HEADER_FIELD };
        return Err(PduError::new(fes, 4, "PDU length over the negotiated limit", buf));
    }
    let data_start = if has_data && !is_ic && !is_term {
        if pdo < hlen + hd || pdo + dd > plen {
            return Err(PduError::new(fes::INVALID_HEADER_FIELD, 3, "data offset outside the PDU", buf));
        }
        pdo
    } else {
        hlen + hd
    };
    if buf.len() < hlen {
        return Ok(None);
    }
    if hd == 4 {
        if buf.len() < hlen + 4 {
            return Ok(None);
        }
        let want = crc32c::crc32c(&buf[..hlen]);
        if le32(buf, hlen) != want {
            return Err(PduError::new(fes::HEADER_DIGEST_ERROR, 0, "header digest mismatch", buf));
        }
    }
    if buf.len() < plen {
        return Ok(None);
    }
    let data = if has_data { &buf[data_start..plen - dd] } else { &buf[..0] };
    if dd == 4 && le32(buf, plen - 4) != crc32c::crc32c(data) {
        return Err(PduError { fes: None, fei: 0, reason: "data digest mismatch", header: buf[..hlen].to_vec() });
    }
    let h = &buf[..hlen];
    let pdu = match ty {
        ICREQ => {
            let pfv = le16(h, 8);
            if pfv != 0 {
                return Err(PduError::new(fes::UNSUPPORTED_PARAMETER, 8, "unsupported PDU format version", buf));
            }
            if h[10] > 31 {
                return Err(PduError::new(fes::INVALID_HEADER_FIELD, 10, "HPDA out of range", buf));
            }
            Pdu::IcReq { pfv, hpda: h[10], digests: Digests::from_bits(h[11]), maxr2t: le32(h, 12) }
        }
        ICRESP => Pdu::IcResp { pfv: le16(h, 8), cpda: h[10], digests: Digests::from_bits(h[11]), maxh2cdata: le32(h, 12) },
        H2C_TERM_REQ | C2H_TERM_REQ => Pdu::TermReq { from_controller: ty == C2H_TERM_REQ, fes: le16(h, 8), fei: le32(h, 10) },
        CAPSULE_CMD => Pdu::CapsuleCmd { cmd: Command::from_bytes(&h[8..72]), data },
        CAPSULE_RESP => Pdu::CapsuleResp { cqe: Completion::decode(&h[8..24]) },
        H2C_DATA | C2H_DATA => {
            let datal = le32(h, 16) as usize;
            if datal != data.len() {
                return Err(PduError::new(fes::INVALID_HEADER_FIELD, 16, "data length differs from PDU length", buf));
            }
            let last = flags & FLAG_LAST_PDU != 0;
            if ty == H2C_DATA {
                Pdu::H2CData { cccid: le16(h, 8), ttag: le16(h, 10), datao: le32(h, 12), data, last }
            } else {
                Pdu::C2HData { cccid: le16(h, 8), datao: le32(h, 12), data, last, success: flags & FLAG_SUCCESS != 0 }
            }
        }
        R2T => Pdu::R2T { cccid: le16(h, 8), ttag: le16(h, 10), r2to: le32(h, 12), r2tl: le32(h, 16) },
        _ => unreachable!("type checked above"),
    };
    Ok(Some((pdu, plen)))
}

/// Appends a PDU with the given 8-byte-prefixed header `hdr` (length `hlen`), optional data aligned
/// to `align` bytes, and digests.
fn emit(out: &mut Vec<u8>, hdr: &mut [u8], digests: Digests, data: Option<&[u8]>, align: usize) {
    let hlen = hdr.len();
    let is_ic = matches!(hdr[0], ICREQ | ICRESP | H2C_TERM_REQ | C2H_TERM_REQ);
    let hd = if is_ic { 0 } else { digests.hd_len() };
    let mut flags = hdr[1];
    if hd == 4 {
        flags |= FLAG_HDGST;
    }
    let (pdo, dd) = match data {
        Some(d) if !d.is_empty() => {
            let pdo = (hlen + hd).next_multiple_of(align.max(1));
            let dd = if is_ic { 0 } else { digests.dd_len() };
            if dd == 4 {
                flags |= FLAG_DDGST;
            }
            (pdo, dd)
        }
        _ => (0, 0),
    };
    let dlen = data.map_or(0, <[u8]>::len);
    let plen = if pdo > 0 { pdo + dlen + dd } else { hlen + hd };
    hdr[1] = flags;
    hdr[2] = hlen as u8;
    hdr[3] = if is_ic { 0 } else { pdo as u8 };
    put32(hdr, 4, plen as u32);
    out.reserve(plen);
    out.extend_from_slice(hdr);
    if hd == 4 {
        out.extend_from_slice(&crc32c::crc32c(hdr).to_le_bytes());
    }
    if let Some(d) = data.filter(|d| !d.is_empty()) {
        out.resize(out.len() + pdo - hlen - hd, 0);
        out.extend_from_slice(d);
        if dd == 4 {
            out.extend_from_slice(&crc32c::crc32c(d).to_le_bytes());
        }
    }
}

pub fn encode_icreq(out: &mut Vec<u8>, hpda: u8, digests: Digests, maxr2t: u32) {
    let mut h = [0u8; 128];
    h[0] = ICREQ;
    h[10] = hpda;
    h[11] = digests.bits();
    put32(&mut h, 12, maxr2t);
    emit(out, &mut h, Digests::default(), None, 0);
}

pub fn encode_icresp(out: &mut Vec<u8>, cpda: u8, digests: Digests, maxh2cdata: u32) {
    let mut h = [0u8; 128];
    h[0] = ICRESP;
    h[10] = cpda;
    h[11] = digests.bits();
    put32(&mut h, 12, maxh2cdata);
    emit(out, &mut h, Digests::default(), None, 0);
}

/// A TermReq (controller to host when `from_controller`), echoing up to 128 bytes of the bad header.
pub fn encode_term_req(out: &mut Vec<u8>, from_controller: bool, fes: u16, fei: u32, bad_header: &[u8]) {
    let mut h = [0u8; 24];
    h[0] = if from_controller { C2H_TERM_REQ } else { H2C_TERM_REQ };
    put16(&mut h, 8, fes);
    put32(&mut h, 10, fei);
    let echo = &bad_header[..bad_header.len().min(MAX_HEADER)];
    h[2] = 24;
    put32(&mut h, 4, (24 + echo.len()) as u32);
    out.extend_from_slice(&h);
    out.extend_from_slice(echo);
}

pub fn encode_capsule_cmd(out: &mut Vec<u8>, cmd: &Command, data: &[u8], digests: Digests, cpda: u8) {
    let mut h = [0u8; 72];
    h[0] = CAPSULE_CMD;
    h[8..72].copy_from_slice(&cmd.0);
    emit(out, &mut h, digests, Some(data), (cpda as usize + 1) * 4);
}

pub fn encode_capsule_resp(out: &mut Vec<u8>, cqe: &Completion, digests: Digests) {
    let mut h = [0u8; 24];
    h[0] = CAPSULE_RESP;
    cqe.encode(&mut h[8..24]);
    emit(out, &mut h, digests, None, 0);
}

pub fn encode_r2t(out: &mut Vec<u8>, cccid: u16, ttag: u16, r2to: u32, r2tl: u32, digests: Digests) {
    let mut h = [0u8; 24];
    h[0] = R2T;
    put16(&mut h, 8, cccid);
    put16(&mut h, 10, ttag);
    put32(&mut h, 12, r2to);
    put32(&mut h, 16, r2tl);
    emit(out, &mut h, digests, None, 0);
}

/// Appends the header of a data PDU carrying `dlen` bytes (header digest and padding included);
/// the caller appends the data and then, with data digests, `crc32c(data)` in little-endian.
#[allow(clippy::too_many_arguments)]
pub fn encode_data_header(
    out: &mut Vec<u8>,
    ty: u8,
    flags: u8,
    cccid: u16,
    ttag: u16,
    datao: u32,
    dlen: usize,
    digests: Digests,
    align: usize,
) {
    let hd = digests.hd_len();
    let dd = digests.dd_len();
    let pdo = (24 + hd).next_multiple_of(align.max(1));
    let mut h = [0u8; 24];
    h[0] = ty;
    h[1] = flags | if hd == 4 { FLAG_HDGST } else { 0 } | if dd == 4 { FLAG_DDGST } else { 0 };
    h[2] = 24;
    h[3] = pdo as u8;
    put32(&mut h, 4, (pdo + dlen + dd) as u32);
    put16(&mut h, 8, cccid);
    put16(&mut h, 10, ttag);
    put32(&mut h, 12, datao);
    put32(&mut h, 16, dlen as u32);
    out.extend_from_slice(&h);
    if hd == 4 {
        out.extend_from_slice(&crc32c::crc32c(&h).to_le_bytes());
    }
    out.resize(out.len() + pdo - 24 - hd, 0);
}

#[allow(clippy::too_many_arguments)]
fn encode_data(out: &mut Vec<u8>, ty: u8, cccid: u16, ttag: u16, datao: u32, data: &[u8], flags: u8, digests: Digests, align: usize) {
    encode_data_header(out, ty, flags, cccid, ttag, datao, data.len(), digests, align);
    out.extend_from_slice(data);
    if digests.data {
        out.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
    }
}

pub fn encode_h2c_data(out: &mut Vec<u8>, cccid: u16, ttag: u16, datao: u32, data: &[u8], last: bool, digests: Digests, cpda: u8) {
    let flags = if last { FLAG_LAST_PDU } else { 0 };
    encode_data(out, H2C_DATA, cccid, ttag, datao, data, flags, digests, (cpda as usize + 1) * 4);
}

/// A C2HData PDU whose data starts at the host's HPDA alignment (ESXi depends on the padding).
#[allow(clippy::too_many_arguments)]
pub fn encode_c2h_data(out: &mut Vec<u8>, cccid: u16, datao: u32, data: &[u8], last: bool, success: bool, digests: Digests, hpda: u8) {
    let flags = if last { FLAG_LAST_PDU } else { 0 } | if success { FLAG_SUCCESS } else { 0 };
    encode_data(out, C2H_DATA, cccid, 0, datao, data, flags, digests, (hpda as usize + 1) * 4);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BOTH: Digests = Digests { header: true, data: true };

    #[test]
    fn round_trips_with_and_without_digests() {
        for d in [Digests::default(), BOTH] {
            let mut out = Vec::new();
            let mut cmd = Command::new(1, 9);
            cmd.set_nsid(1);
            encode_capsule_cmd(&mut out, &cmd, &[5u8; 100], d, 0);
            let (pdu, n) = parse(&out, d, 8192).unwrap().unwrap();
            assert_eq!(n, out.len());
            assert_eq!(pdu, Pdu::CapsuleCmd { cmd, data: &[5u8; 100] });

            out.clear();
            encode_c2h_data(&mut out, 3, 4096, &[1, 2, 3, 4], true, false, d, 7);
            assert_eq!(out[3], 32, "data aligned to (HPDA+1)*4");
            let (pdu, _) = parse(&out, d, 8192).unwrap().unwrap();
            assert_eq!(pdu, Pdu::C2HData { cccid: 3, datao: 4096, data: &[1, 2, 3, 4], last: true, success: false });

            out.clear();
            encode_r2t(&mut out, 3, 4, 0, 65536, d);
            let (pdu, _) = parse(&out, d, 0).unwrap().unwrap();
            assert_eq!(pdu, Pdu::R2T { cccid: 3, ttag: 4, r2to: 0, r2tl: 65536 });
        }
    }

    #[test]
    fn incomplete_input_waits() {
        let mut out = Vec::new();
        encode_capsule_cmd(&mut out, &Command::new(1, 1), &[0u8; 512], BOTH, 0);
        for cut in 0..out.len() {
            assert_eq!(parse(&out[..cut], BOTH, 8192).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn malformed_headers_name_the_field() {
        let mut out = Vec::new();
        encode_capsule_resp(&mut out, &Completion::new(1, crate::nvme::Status::SUCCESS), Digests::default());
        let mut bad = out.clone();
        bad[0] = 0x42;
        assert_eq!(parse(&bad, Digests::default(), 0).unwrap_err().fei, 0);
        let mut bad = out.clone();
        bad[2] = 30;
        assert_eq!(parse(&bad, Digests::default(), 0).unwrap_err().fei, 2);
        let mut bad = out.clone();
        put32(&mut bad, 4, 1 << 30);
        assert_eq!(parse(&bad, Digests::default(), 0).unwrap_err().fei, 4);

        out.clear();
        encode_capsule_cmd(&mut out, &Command::new(1, 1), &[0u8; 64], BOTH, 0);
        out[20] ^= 1;
        assert_eq!(parse(&out, BOTH, 8192).unwrap_err().fes, Some(fes::HEADER_DIGEST_ERROR));
        out[20] ^= 1;
        let n = out.len();
        out[n - 10] ^= 1;
        assert_eq!(parse(&out, BOTH, 8192).unwrap_err().fes, None, "data digest: close without TermReq");

        out.clear();
        encode_capsule_cmd(&mut out, &Command::new(1, 1), &[0u8; 9000], Digests::default(), 0);
        assert_eq!(parse(&out, Digests::default(), 8192).unwrap_err().fes, Some(fes::DATA_LIMIT_EXCEEDED));
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400), hd: bool, dd: bool) {
            let _ = parse(&bytes, Digests { header: hd, data: dd }, 256);
        }

        #[test]
        fn h2c_round_trip(data in proptest::collection::vec(any::<u8>(), 1..3000), off: u32, hd: bool, dd: bool) {
            let d = Digests { header: hd, data: dd };
            let mut out = Vec::new();
            encode_h2c_data(&mut out, 1, 2, off, &data, true, d, 0);
            let (pdu, n) = parse(&out, d, 4096).unwrap().unwrap();
            prop_assert_eq!(n, out.len());
            prop_assert_eq!(pdu, Pdu::H2CData { cccid: 1, ttag: 2, datao: off, data: &data, last: true });
        }
    }
}
