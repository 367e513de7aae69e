//! A 4 KiB read allocates nothing on the target in steady state: the target runs in this process
//! under a counting global allocator, and the host drives reads at queue depth 32 over 127.0.0.1
//! with PDUs encoded before the measurement (its own loop allocates nothing either), so every
//! allocation counted during the measured reads is the target's.

use nvmetro_perf::{ConnectOptions, Host};
use nvmetro_proto::cmds;
use nvmetro_proto::nvme::sgl;
use nvmetro_proto::pdu::{self, Digests, Pdu};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: nvmetro_ffi::CountingAllocator = nvmetro_ffi::CountingAllocator;

const QD: u16 = 32;
const NQN: &str = "nqn.2026-11.io.nvmetro:allocs";

fn config(port: u16) -> nvmetro_conf::Config {
    let text = format!(
        r#"
[target]
cores = [0]
poll_mode = "adaptive"

[[bdev]]
name = "m0"
kind = "malloc"
size = "64MiB"
block_size = 512

[[subsystem]]
nqn = "{NQN}"
serial = "ALLOCS"
allow_any_host = true

[[subsystem.namespace]]
nsid = 1
bdev = "m0"

[[listener]]
address = "127.0.0.1:{port}"
"#
    );
    nvmetro_conf::parse(&text, "read_allocations.toml").expect("valid config")
}

/// Takes `count` read completions off `sock`, sending the next read for each command ID as its
/// previous one completes (so QD reads stay in flight).
fn drive(sock: &mut TcpStream, capsules: &[Vec<u8>], rx: &mut [u8], count: usize) {
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
                    assert!(cqe.status().is_success(), "read failed: {:?}", cqe.status());
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

#[test]
fn steady_state_reads_allocate_nothing_on_the_target() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let running = nvmetro_tgt::start(config(port), None).expect("target starts");
    let mut opts = ConnectOptions::new(format!("127.0.0.1:{port}").parse().unwrap(), NQN);
    opts.queue_size = 2 * QD;
    opts.kato_ms = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    let host = loop {
        match Host::connect(&opts) {
            Ok(h) => break h,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("cannot connect: {e}"),
        }
    };
    let (_admin, mut io) = host.into_parts();
    let mut sock = io.remove(0).into_socket().unwrap();

    // One pre-encoded 4 KiB read per command ID, each at its own LBA.
    let capsules: Vec<Vec<u8>> = (1..=QD)
        .map(|cid| {
            let mut cmd = cmds::read(cid, 1, u64::from(cid) * 8, 8);
            cmd.set_sgl(0, 4096, sgl::TRANSPORT);
            let mut bytes = Vec::new();
            pdu::encode_capsule_cmd(&mut bytes, &cmd, &[], Digests::default(), 0);
            bytes
        })
        .collect();
    let mut rx = vec![0u8; 1 << 20];
    for c in &capsules {
        sock.write_all(c).unwrap();
    }
    // Warm-up: every pool and buffer on the path grows to its steady size.
    drive(&mut sock, &capsules, &mut rx, 5_000);
    let before = nvmetro_ffi::CountingAllocator::allocations();
    const READS: usize = 20_000;
    drive(&mut sock, &capsules, &mut rx, READS);
    let allocations = nvmetro_ffi::CountingAllocator::allocations() - before;
    eprintln!("{allocations} allocations over {READS} reads");
    // The reactor's 100 ms tick may allocate now and then; a read must not.
    assert!(allocations * 100 < READS as u64, "{allocations} allocations over {READS} reads");
    drop(sock);
    running.stop();
}
