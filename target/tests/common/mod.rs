//! What the allocation-counting tests share: a host queue over 127.0.0.1 driven with PDUs
//! encoded before the measurement, so the host's own loop allocates nothing.

use nvmetro_perf::{ConnectOptions, Host};
use nvmetro_proto::nvme::Command;
use nvmetro_proto::pdu::{self, Digests, Pdu};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// An I/O queue's socket to `port` (queue size twice `qd`, no keep-alive), retrying while the
/// target comes up, and the admin queue, which must stay open as long as the I/O queue is used
/// (the controller ends with it).
pub fn io_queue(port: u16, nqn: &str, qd: u16) -> (nvmetro_perf::Queue, TcpStream) {
    let mut opts = ConnectOptions::new(format!("127.0.0.1:{port}").parse().unwrap(), nqn);
    opts.queue_size = 2 * qd;
    opts.kato_ms = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    let host = loop {
        match Host::connect(&opts) {
            Ok(h) => break h,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("cannot connect: {e}"),
        }
    };
    let (admin, mut io) = host.into_parts();
    let sock = io.remove(0).into_socket().unwrap();
    // Blocking reads without a timeout: a loaded machine may take its time, not fail the test.
    sock.set_nonblocking(false).unwrap();
    sock.set_read_timeout(None).unwrap();
    (admin, sock)
}

/// Each command (command ID 1, 2, ...) encoded as a capsule with its in-capsule data.
pub fn capsules(commands: impl Iterator<Item = (Command, Vec<u8>)>) -> Vec<Vec<u8>> {
    commands
        .map(|(cmd, data)| {
            let mut bytes = Vec::new();
            pdu::encode_capsule_cmd(&mut bytes, &cmd, &data, Digests::default(), 0);
            bytes
        })
        .collect()
}

/// Takes `count` completions off `sock`, sending the next command for each command ID as its
/// previous one completes (so every capsule's command stays in flight).
pub fn drive(sock: &mut TcpStream, capsules: &[Vec<u8>], rx: &mut [u8], count: usize) {
    let (mut have, mut done) = (0, 0);
    while done < count || have > 0 {
        let n = sock.read(&mut rx[have..]).expect("read");
        assert!(n > 0, "target closed the connection");
        have += n;
        let mut used = 0;
        while let Some((p, len)) = pdu::parse(&rx[used..have], Digests::default(), 1 << 20).expect("valid PDU") {
            let cid = match p {
                Pdu::C2HData { cccid, success: true, .. } => Some(cccid),
                Pdu::C2HData { .. } => None,
                Pdu::CapsuleResp { cqe } => {
                    assert!(cqe.status().is_success(), "command failed: {:?}", cqe.status());
                    Some(cqe.cid)
                }
                _ => panic!("unexpected PDU from the target"),
            };
            used += len;
            if let Some(cid) = cid {
                done += 1;
                sock.write_all(&capsules[usize::from(cid - 1)]).expect("write");
            }
        }
        rx.copy_within(used..have, 0);
        have -= used;
    }
}
