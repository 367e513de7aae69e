//! A replicated 8 KiB write allocates nothing in steady state, at either site: both sites of a
//! mirror (file legs, O_DIRECT where the scratch directory allows it) run in this process under
//! a counting global allocator, joined by their TCP replication link on 127.0.0.1, and the host
//! drives in-capsule writes at queue depth 32 to the preferred site with PDUs encoded before the
//! measurement (its own loop allocates nothing), so every allocation counted during the measured
//! writes is one of the two sites'.

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
const NQN: &str = "nqn.2026-12.io.nvmetro:write-allocs";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Whether files in `dir` take O_DIRECT (tmpfs does not).
fn direct_works(dir: &std::path::Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join("direct-probe");
    let ok = std::fs::OpenOptions::new().create(true).write(true).custom_flags(libc_o_direct()).open(&probe).is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

fn libc_o_direct() -> i32 {
    // O_DIRECT on x86_64 and aarch64 Linux respectively.
    if cfg!(target_arch = "aarch64") {
        0o200000
    } else {
        0o40000
    }
}

fn site(dir: &std::path::Path, preferred: bool, port: u16, link: u16) -> nvmetro_conf::Config {
    let (role, cntlids) = if preferred {
        (format!("role = \"preferred\"\nlisten = \"127.0.0.1:{link}\""), "[1, 99]")
    } else {
        (format!("role = \"secondary\"\npeer = \"127.0.0.1:{link}\""), "[100, 199]")
    };
    let name = if preferred { "a" } else { "b" };
    let dir = dir.display();
    let direct = direct_works(std::path::Path::new(&dir.to_string()));
    let text = format!(
        r#"
[target]
cores = [0]
poll_mode = "adaptive"

[[bdev]]
name = "leg"
kind = "file"
path = "{dir}/{name}.img"
size = "64MiB"
direct = {direct}

[[bdev]]
name = "m"
kind = "mirror"
local = "leg"
{role}
metadata = "{dir}/{name}.meta"
region_size = "256KiB"
secret = "write allocations test"

[[subsystem]]
nqn = "{NQN}"
allow_any_host = true
cntlid_range = {cntlids}

[[subsystem.namespace]]
nsid = 1
bdev = "m"

[[listener]]
address = "127.0.0.1:{port}"
"#
    );
    nvmetro_conf::parse(&text, &format!("{name}.toml")).expect("valid config")
}

/// Takes `count` write completions off `sock`, sending the next write for each command ID as
/// its previous one completes (so QD writes stay in flight).
fn drive(sock: &mut TcpStream, capsules: &[Vec<u8>], rx: &mut [u8], count: usize) {
    let (mut have, mut done) = (0, 0);
    while done < count {
        let n = sock.read(&mut rx[have..]).expect("read");
        assert!(n > 0, "target closed the connection");
        have += n;
        let mut used = 0;
        while let Some((p, len)) = pdu::parse(&rx[used..have], Digests::default(), 1 << 20).expect("valid PDU") {
            let Pdu::CapsuleResp { cqe } = p else { panic!("unexpected PDU from the target") };
            assert!(cqe.status().is_success(), "write failed: {:?}", cqe.status());
            used += len;
            done += 1;
            sock.write_all(&capsules[usize::from(cqe.cid - 1)]).expect("write");
        }
        rx.copy_within(used..have, 0);
        have -= used;
    }
}

fn connect(port: u16) -> Host {
    let mut opts = ConnectOptions::new(format!("127.0.0.1:{port}").parse().unwrap(), NQN);
    opts.queue_size = 2 * QD;
    opts.kato_ms = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Host::connect(&opts) {
            Ok(h) => return h,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connect: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("cannot connect: {e}"),
        }
    }
}

#[test]
fn steady_state_replicated_writes_allocate_nothing_at_either_site() {
    let dir = std::env::temp_dir().join(format!("nvmetro-write-allocs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (port_a, port_b, link) = (free_port(), free_port(), free_port());
    let a = nvmetro_tgt::start(site(&dir, true, port_a, link), None).expect("site A starts");
    let b = nvmetro_tgt::start(site(&dir, false, port_b, link), None).expect("site B starts");

    // The preferred site serves once its peer is connected and in sync; until then writes may
    // be refused, so the host retries its connect and the warm-up waits for successes.
    let host = connect(port_a);
    let (_admin, mut io) = host.into_parts();
    let mut sock = io.remove(0).into_socket().unwrap();

    // One pre-encoded 8 KiB in-capsule write per command ID, each at its own LBA.
    let capsules: Vec<Vec<u8>> = (1..=QD)
        .map(|cid| {
            let mut cmd = cmds::write(cid, 1, u64::from(cid) * 16, 16);
            cmd.set_sgl(0, 8192, sgl::IN_CAPSULE);
            let mut bytes = Vec::new();
            pdu::encode_capsule_cmd(&mut bytes, &cmd, &vec![cid as u8; 8192], Digests::default(), 0);
            bytes
        })
        .collect();
    let mut rx = vec![0u8; 1 << 20];
    for c in &capsules {
        sock.write_all(c).unwrap();
    }
    // Warm-up: every pool and buffer on the path, at both sites, grows to its steady size.
    drive(&mut sock, &capsules, &mut rx, 10_000);
    let before = nvmetro_ffi::CountingAllocator::allocations();
    let started = Instant::now();
    const WRITES: usize = 20_000;
    drive(&mut sock, &capsules, &mut rx, WRITES);
    let busy = started.elapsed();
    let allocations = nvmetro_ffi::CountingAllocator::allocations() - before;
    // What the two sites' timers (pings, status, ticks) allocate in as long without writes: the
    // allowance for the time the writes took.
    let before_idle = nvmetro_ffi::CountingAllocator::allocations();
    std::thread::sleep(busy);
    let idle = nvmetro_ffi::CountingAllocator::allocations() - before_idle;
    let per_write = allocations.saturating_sub(idle) as f64 / WRITES as f64;
    eprintln!(
        "{allocations} allocations over {WRITES} replicated writes in {busy:?}; {idle} in as long idle; {per_write:.4} per write beyond the timers'"
    );
    // One allocation per write would be 1.0; one per 31 (a segmented queue's blocks) 0.03.
    assert!(per_write < 0.01, "{allocations} allocations over {WRITES} replicated writes ({idle} in as long idle)");
    drop(sock);
    a.stop();
    b.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
