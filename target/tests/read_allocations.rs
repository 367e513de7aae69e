//! A 4 KiB read allocates nothing on the target in steady state: the target runs in this process
//! under a counting global allocator, and the host drives reads at queue depth 32 over 127.0.0.1
//! with PDUs encoded before the measurement (its own loop allocates nothing either), so every
//! allocation counted during the measured reads is the target's.

mod common;

use nvmetro_proto::cmds;
use nvmetro_proto::nvme::sgl;
use std::io::Write;

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

#[test]
fn steady_state_reads_allocate_nothing_on_the_target() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let running = nvmetro_tgt::start(config(port), None).expect("target starts");
    let (_admin, mut sock) = common::io_queue(port, NQN, QD);

    // One pre-encoded 4 KiB read per command ID, each at its own LBA.
    let capsules = common::capsules((1..=QD).map(|cid| {
        let mut cmd = cmds::read(cid, 1, u64::from(cid) * 8, 8);
        cmd.set_sgl(0, 4096, sgl::TRANSPORT);
        (cmd, Vec::new())
    }));
    let mut rx = vec![0u8; 1 << 20];
    for c in &capsules {
        sock.write_all(c).unwrap();
    }
    // Warm-up: every pool and buffer on the path grows to its steady size.
    common::drive(&mut sock, &capsules, &mut rx, 5_000);
    let before = nvmetro_ffi::CountingAllocator::allocations();
    const READS: usize = 20_000;
    common::drive(&mut sock, &capsules, &mut rx, READS);
    let allocations = nvmetro_ffi::CountingAllocator::allocations() - before;
    eprintln!("{allocations} allocations over {READS} reads");
    // The reactor's 100 ms tick may allocate now and then; a read must not.
    assert!(allocations * 100 < READS as u64, "{allocations} allocations over {READS} reads");
    drop(sock);
    running.stop();
}
