//! Raw NVMe/TCP bytes on a connection to the real target: malformed PDUs, bad digests, a host
//! sending more commands than its queue holds, commands and data before Connect. Each gets the
//! right C2HTermReq or status and ends only its own connection.

use nvmetro_perf::Host;
use nvmetro_proto::cmds;
use nvmetro_proto::nvme::{le_u16, le_u32, Command, Status};
use nvmetro_proto::pdu::{self, Digests};
use nvmetro_tests::{basic_config, basic_options, TargetProcess, HOSTNQN, SUBNQN};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Sends raw bytes on a fresh connection and returns what the target answered before closing.
fn raw_exchange(t: &TargetProcess, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(t.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => panic!("target neither answered nor closed: {e} (got {} bytes)", out.len()),
        }
    }
}

fn icreq() -> Vec<u8> {
    let mut v = Vec::new();
    pdu::encode_icreq(&mut v, 0, Digests::default(), 0);
    v
}

/// The PDUs a raw connection received, parsed (C2HTermReq included).
fn pdus(bytes: &[u8]) -> Vec<pdu::Pdu<'_>> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some((p, n)) = pdu::parse(&bytes[at..], Digests::default(), 1 << 20).expect("well-formed PDUs from the target") {
        out.push(p);
        at += n;
    }
    assert_eq!(at, bytes.len(), "trailing bytes");
    out
}

/// A raw connection past ICReq/ICResp.
fn raw_connection(t: &TargetProcess) -> TcpStream {
    let mut s = TcpStream::connect(t.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&icreq()).unwrap();
    let mut icresp = [0u8; 128];
    s.read_exact(&mut icresp).unwrap();
    assert_eq!(icresp[0], pdu::ICRESP);
    s
}

fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    match s.read_to_end(&mut out) {
        Ok(_) => out,
        Err(e) => panic!("target neither answered nor closed: {e} (got {} bytes)", out.len()),
    }
}

/// A capsule carrying `data`.
fn in_capsule(mut c: Command, data: &[u8]) -> Vec<u8> {
    c.set_sgl(0, data.len() as u32, nvmetro_proto::nvme::sgl::IN_CAPSULE);
    let mut v = Vec::new();
    pdu::encode_capsule_cmd(&mut v, &c, data, Digests::default(), 0);
    v
}

/// A write of `len` bytes whose data is to be pulled with R2T.
fn r2t_write(cid: u16, nsid: u32, len: u32) -> Vec<u8> {
    let mut c = cmds::write(cid, nsid, 0, len / 512);
    c.set_sgl(0, len, nvmetro_proto::nvme::sgl::TRANSPORT);
    let mut v = Vec::new();
    pdu::encode_capsule_cmd(&mut v, &c, &[], Digests::default(), 0);
    v
}

#[test]
fn malformed_pdus_end_only_their_connection() {
    let t = TargetProcess::start(&basic_config("[0]"));
    // A healthy host stays connected through all of this.
    let mut h = Host::connect(&basic_options(&t)).unwrap();

    // Unknown PDU type: C2HTermReq with the offending offset 0, then close.
    let mut bad = icreq();
    bad.extend_from_slice(&[0x42, 0, 24, 0, 24, 0, 0, 0]);
    bad.resize(bad.len() + 16, 0);
    let out = raw_exchange(&t, &bad);
    let term = &out[128..];
    assert_eq!(term[0], pdu::C2H_TERM_REQ);
    assert_eq!((le_u16(term, 8), le_u32(term, 10)), (pdu::fes::INVALID_HEADER_FIELD, 0));

    // Wrong header length.
    let mut bad = icreq();
    bad.extend_from_slice(&[pdu::CAPSULE_CMD, 0, 60, 0, 60, 0, 0, 0]);
    bad.resize(bad.len() + 60, 0);
    let out = raw_exchange(&t, &bad);
    assert_eq!((out[128], le_u32(&out[128..], 10)), (pdu::C2H_TERM_REQ, 2));

    // A PDU length far beyond any limit.
    let mut bad = icreq();
    bad.extend_from_slice(&[pdu::CAPSULE_CMD, 0, 72, 72, 0xff, 0xff, 0xff, 0x7f]);
    let out = raw_exchange(&t, &bad);
    assert_eq!((le_u16(&out[128..], 8), le_u32(&out[128..], 10)), (pdu::fes::DATA_LIMIT_EXCEEDED, 4));

    // A capsule before ICReq.
    let mut bad = Vec::new();
    pdu::encode_capsule_cmd(&mut bad, &cmds::keep_alive(1), &[], Digests::default(), 0);
    let out = raw_exchange(&t, &bad);
    assert_eq!(le_u16(&out, 8), pdu::fes::PDU_SEQUENCE_ERROR);

    // Truncated PDUs, then the peer vanishes.
    for cut in [3usize, 8, 50, 127] {
        let mut s = TcpStream::connect(t.addr).unwrap();
        s.write_all(&icreq()[..cut]).unwrap();
        drop(s);
    }
    // Random garbage.
    let mut x = 0x1234_5678u64;
    let garbage: Vec<u8> = (0..5000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let _ = raw_exchange(&t, &garbage);

    // The healthy host never noticed.
    h.write(1, 3, vec![7; 512], 512).unwrap();
    assert_eq!(h.read(1, 3, 1, 512).unwrap(), vec![7; 512]);
}

#[test]
fn digests_are_negotiated_and_enforced() {
    let t = TargetProcess::start(&basic_config("[0]"));
    let mut o = basic_options(&t);
    o.digests = Digests { header: true, data: true };
    let mut h = Host::connect(&o).unwrap();
    h.write(1, 0, vec![3; 65536], 512).unwrap();
    assert_eq!(h.read(1, 0, 128, 512).unwrap(), vec![3; 65536]);

    // A corrupted header digest gets a TermReq.
    let mut bytes = Vec::new();
    pdu::encode_icreq(&mut bytes, 0, Digests { header: true, data: false }, 0);
    let mut cap = Vec::new();
    pdu::encode_capsule_cmd(&mut cap, &cmds::keep_alive(1), &[], Digests { header: true, data: false }, 0);
    cap[73] ^= 0xff;
    bytes.extend_from_slice(&cap);
    let out = raw_exchange(&t, &bytes);
    assert_eq!((out[128], le_u16(&out[128..], 8)), (pdu::C2H_TERM_REQ, pdu::fes::HEADER_DIGEST_ERROR));
}

#[test]
fn a_host_beyond_its_queue_size_is_cut_off() {
    let t = TargetProcess::start(&basic_config("[0]"));
    let mut o = basic_options(&t);
    o.io_queues = 0;
    let mut h = Host::connect(&o).unwrap();
    // An I/O queue of 8 entries, then 8 + 2 writes of 128 KiB sent without waiting, whose data
    // never comes: each of the first 8 gets its R2T, the 9th ends the connection.
    let mut s = raw_connection(&t);
    let (c, d) = cmds::connect(1, 1, 8, 0, h.cntlid, SUBNQN, HOSTNQN, [3; 16]);
    let bytes = in_capsule(c, &d);
    s.write_all(&bytes).unwrap();
    let mut resp = [0u8; 24];
    s.read_exact(&mut resp).unwrap();
    let [pdu::Pdu::CapsuleResp { cqe }] = pdus(&resp)[..] else { panic!("no Connect response") };
    assert_eq!(cqe.status(), Status::SUCCESS);
    let mut burst = Vec::new();
    for cid in 10..20 {
        burst.extend_from_slice(&r2t_write(cid, 1, 128 * 1024));
    }
    s.write_all(&burst).unwrap();
    let out = read_to_end(&mut s);
    let got = pdus(&out);
    assert_eq!(got.len(), 9, "{got:?}");
    for (i, p) in got[..8].iter().enumerate() {
        assert!(matches!(p, pdu::Pdu::R2T { cccid, r2to: 0, .. } if *cccid == 10 + i as u16), "{p:?}");
    }
    assert!(matches!(got[8], pdu::Pdu::TermReq { fes: pdu::fes::PDU_SEQUENCE_ERROR, .. }), "{:?}", got[8]);
    assert!(t.log().contains("more commands outstanding than the queue size"), "a clear error in the log:\n{}", t.log());
    // The controller and its other queues are unharmed.
    h.keep_alive().unwrap();
}

#[test]
fn nothing_is_buffered_for_a_queue_before_connect() {
    let t = TargetProcess::start(&basic_config("[0]"));
    // A 128 KiB write before Connect: refused at once, without an R2T (so without a buffer).
    let mut s = raw_connection(&t);
    s.write_all(&r2t_write(4, 1, 128 * 1024)).unwrap();
    let mut resp = [0u8; 24];
    s.read_exact(&mut resp).unwrap();
    let [pdu::Pdu::CapsuleResp { cqe }] = pdus(&resp)[..] else { panic!("not a response: {resp:?}") };
    assert_eq!((cqe.cid, cqe.status()), (4, Status::COMMAND_SEQUENCE_ERROR));
    // Its data sent anyway is a protocol error.
    let mut h2c = Vec::new();
    pdu::encode_h2c_data(&mut h2c, 4, 4, 0, &[0; 8192], false, Digests::default(), 0);
    s.write_all(&h2c).unwrap();
    let out = read_to_end(&mut s);
    assert!(matches!(pdus(&out)[..], [pdu::Pdu::TermReq { fes: pdu::fes::INVALID_HEADER_FIELD, .. }]), "{out:?}");

    // Commands piled up behind a Connect that has not completed end the connection.
    let mut s = raw_connection(&t);
    let (c, d) = cmds::connect(1, 0, 32, 0, 0xffff, SUBNQN, HOSTNQN, [3; 16]);
    let mut bytes = in_capsule(c, &d);
    for cid in 2..6 {
        bytes.extend_from_slice(&r2t_write(cid, 1, 4096));
    }
    s.write_all(&bytes).unwrap();
    let out = read_to_end(&mut s);
    assert!(matches!(pdus(&out)[..], [pdu::Pdu::TermReq { fes: pdu::fes::PDU_SEQUENCE_ERROR, .. }]), "{:?}", pdus(&out));
    assert!(t.log().contains("a command before the queue's Connect completed"), "{}", t.log());
}
