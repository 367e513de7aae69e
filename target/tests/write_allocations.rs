//! A replicated 8 KiB write allocates nothing in steady state, at either site: both sites of a
//! mirror (file legs, O_DIRECT where the scratch directory allows it) run in this process under
//! a counting global allocator, joined by their TCP replication link on 127.0.0.1, and the host
//! drives in-capsule writes at queue depth 32 to the preferred site with PDUs encoded before the
//! measurement (its own loop allocates nothing), so every allocation counted during the measured
//! writes is one of the two sites'.

mod common;

use nvmetro_proto::cmds;
use nvmetro_proto::nvme::sgl;
use std::io::Write;
use std::time::Instant;

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
    let ok = std::fs::OpenOptions::new().create(true).write(true).custom_flags(nvmetro_ffi::O_DIRECT).open(&probe).is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

/// How both sites run: their reactors' cores and the link's lanes.
#[derive(Clone, Copy)]
struct Layout {
    cores: &'static str,
    lanes: usize,
}

fn site(dir: &std::path::Path, preferred: bool, port: u16, link: u16, layout: Layout) -> nvmetro_conf::Config {
    let (role, cntlids) = if preferred {
        (format!("role = \"preferred\"\nlisten = \"127.0.0.1:{link}\""), "[1, 99]")
    } else {
        (format!("role = \"secondary\"\npeer = \"127.0.0.1:{link}\""), "[100, 199]")
    };
    let name = if preferred { "a" } else { "b" };
    let dir = dir.display();
    let direct = direct_works(std::path::Path::new(&dir.to_string()));
    let Layout { cores, lanes } = layout;
    let text = format!(
        r#"
[target]
cores = [{cores}]
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
lanes = {lanes}

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

#[test]
fn steady_state_replicated_writes_allocate_nothing_at_either_site() {
    replicated_writes_allocate_nothing("one-reactor", Layout { cores: "0", lanes: 1 }, 0);
}

/// Each site on two reactors: the link on one, the workers of lanes 1 and 2 on the other, where
/// the host's I/O queue is too (connections go round-robin, the admin queue first), so its
/// writes take those lanes.
#[test]
fn steady_state_replicated_writes_over_lanes_on_reactors_allocate_nothing_at_either_site() {
    replicated_writes_allocate_nothing("lanes-on-reactors", Layout { cores: "0, 1", lanes: 3 }, 2);
}

/// Mirror status of the one mirror a site runs.
fn mirror_status(site: &nvmetro_tgt::Running) -> nvmetro_bdev::mirror::driver::StatusReport {
    site.target.bdevs().iter().find_map(|b| b.mirror_status()).expect("a mirror")
}

fn replicated_writes_allocate_nothing(name: &str, layout: Layout, lanes_on_reactors: usize) {
    let dir = std::env::temp_dir().join(format!("nvmetro-write-allocs-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (port_a, link) = (free_port(), free_port());
    let a = nvmetro_tgt::start(site(&dir, true, port_a, link, layout), None).expect("site A starts");
    // Site A's own connections take ephemeral ports meanwhile: one may be the port B was to
    // listen on, and then B gets another.
    let b = (0..5)
        .find_map(|_| match nvmetro_tgt::start(site(&dir, false, free_port(), link, layout), None) {
            Ok(b) => Some(b),
            Err(e) if format!("{e:#}").contains("Address already in use") => None,
            Err(e) => panic!("site B starts: {e:#}"),
        })
        .expect("site B starts on one of 5 free ports");

    // The preferred site serves once its peer is connected and in sync; until then the
    // connect is retried.
    // Serving and in sync before the host connects: its first try makes the connections, and
    // round-robin puts the admin queue on reactor 1 (the link's) and the I/O queue on reactor 0.
    let deadline = Instant::now() + std::time::Duration::from_secs(20);
    while [&a, &b].iter().any(|s| {
        let m = mirror_status(s);
        m.lanes_on_reactors != lanes_on_reactors || !m.serving || m.out_of_sync_bytes > 0
    }) {
        assert!(Instant::now() < deadline, "lanes on reactors: {:?}", mirror_status(&a));
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let (_admin, mut sock) = common::io_queue(port_a, NQN, QD);

    // One pre-encoded 8 KiB in-capsule write per command ID, each at its own LBA.
    let capsules = common::capsules((1..=QD).map(|cid| {
        let mut cmd = cmds::write(cid, 1, u64::from(cid) * 16, 16);
        cmd.set_sgl(0, 8192, sgl::IN_CAPSULE);
        (cmd, vec![cid as u8; 8192])
    }));
    let mut rx = vec![0u8; 1 << 20];
    for c in &capsules {
        sock.write_all(c).unwrap();
    }
    // Warm-up: every pool and buffer on the path, at both sites, grows to its steady size.
    common::drive(&mut sock, &capsules, &mut rx, 10_000);
    // (Status is published every 100 ms: this one counts all the warm-up.)
    std::thread::sleep(std::time::Duration::from_millis(200));
    let by_reactors = mirror_status(&a).frames_sent_by_reactors;
    let before = nvmetro_ffi::CountingAllocator::allocations();
    let started = Instant::now();
    const WRITES: usize = 20_000;
    common::drive(&mut sock, &capsules, &mut rx, WRITES);
    let busy = started.elapsed();
    let allocations = nvmetro_ffi::CountingAllocator::allocations() - before;
    // What the two sites' timers (pings, status, ticks) allocate in as long without writes: the
    // allowance for the time the writes took.
    let before_idle = nvmetro_ffi::CountingAllocator::allocations();
    std::thread::sleep(busy);
    let idle = nvmetro_ffi::CountingAllocator::allocations() - before_idle;
    let per_write = allocations.saturating_sub(idle) as f64 / WRITES as f64;
    eprintln!(
        "{name}: {allocations} allocations over {WRITES} replicated writes in {busy:?}; {idle} in as long idle; {per_write:.4} per write beyond the timers'"
    );
    if lanes_on_reactors > 0 {
        // (Status is published every 100 ms.)
        std::thread::sleep(std::time::Duration::from_millis(200));
        let sent = mirror_status(&a).frames_sent_by_reactors - by_reactors;
        assert!(sent >= WRITES as u64 * 9 / 10, "the writes took the lanes on reactors: {sent} frames of {WRITES}");
    }
    // One allocation per write would be 1.0; one per 31 (a segmented queue's blocks) 0.03.
    assert!(per_write < 0.01, "{allocations} allocations over {WRITES} replicated writes ({idle} in as long idle)");
    drop(sock);
    a.stop();
    b.stop();
    let _ = std::fs::remove_dir_all(&dir);
}
