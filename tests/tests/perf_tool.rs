//! The initiator against a target shaped like SPDK's nvmf_tgt (4 KiB in-capsule data, so 8 KiB
//! writes go through R2T; small MAXH2CDATA windows; reads ending with C2HData SUCCESS or with a
//! response capsule), and the `nvmetro-perf` binary's verdicts: verify on a namespace that holds
//! data, no usable path, I/O spread over Optimized paths, the CPU line.

use nvmetro_perf::load::{self, PathIo, PathShared, Pattern, Workload};
use nvmetro_perf::paths::PathMonitor;
use nvmetro_perf::{ConnectOptions, Host};
use nvmetro_proto::nvme::le_u32;
use nvmetro_tests::{basic_config, binary, TargetProcess, HOSTNQN, SUBNQN};
use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The usual config with SPDK's default in-capsule size and a MAXH2CDATA of one page.
fn spdk_like() -> String {
    basic_config("[0]").replace("[target]", "[target]\nin_capsule_data_size = \"4KiB\"\nmax_h2c_data_size = \"4KiB\"")
}

/// `ios` commands on the 4 MiB region `region` (one per block size, so stamps never overlap).
fn workload(read_pct: u32, block_size: usize, qd: usize, ios: u64, region: u64) -> Workload {
    Workload {
        nsid: 1,
        pattern: Pattern::Random,
        read_pct,
        block_size,
        qd,
        duration: Duration::from_secs(30),
        ramp: Duration::ZERO,
        max_ios: Some(ios),
        rate: None,
        verify: true,
        region: (region * 8192, 8192),
        seed: 7 + region * 100 + u64::from(read_pct) + qd as u64,
    }
}

#[test]
fn r2t_writes_and_both_read_endings_round_trip_against_an_spdk_like_target() {
    let t = TargetProcess::start(&spdk_like());
    for sq_flow_control_off in [true, false] {
        let mut o = ConnectOptions::new(t.addr, SUBNQN);
        o.hostnqn = HOSTNQN.into();
        // Off: reads end with C2HData SUCCESS; on: with C2HData then a response capsule.
        o.disable_sq_flow_control = sq_flow_control_off;
        let mut h = Host::connect(&o).unwrap();
        assert_eq!(le_u32(&h.id_ctrl, 1792), (64 + 4096) / 16, "IOCCSZ reports the configured in-capsule size");
        let mut gens = HashMap::new();
        let mut path = PathIo::single(h.io.remove(0));
        // 4 KiB writes in the capsule, 8 and 16 KiB ones through R2T (two and four 4 KiB windows),
        // 32 deep so many commands' R2Ts are outstanding at once; then reads of everything.
        for (i, bs) in [4096usize, 8192, 16384].into_iter().enumerate() {
            // What the previous pass left in this region (nothing, the first time).
            load::learn_stamps(std::slice::from_mut(&mut path), &workload(100, bs, 32, 0, i as u64), 512, &mut gens).unwrap();
            for (read_pct, qd) in [(0, 32), (50, 32), (0, 1), (100, 32), (100, 1)] {
                let wl = workload(read_pct, bs, qd, 600, i as u64);
                let r = load::run(&mut path, &wl, 512, &mut gens).unwrap();
                assert_eq!((r.errors, r.mismatches.len()), (0, 0), "bs {bs} read {read_pct}% qd {qd}: {:?}", r.mismatches.first());
                assert_eq!(r.ios(), 600, "every command completed and counted (bs {bs} qd {qd})");
                if read_pct == 0 {
                    assert_eq!(r.writes, 600);
                }
            }
        }
        // A fresh read pass over the 16 KiB region finds exactly what the runs left there.
        let mut fresh = HashMap::new();
        let learned = load::learn_stamps(std::slice::from_mut(&mut path), &workload(100, 16384, 32, 0, 2), 512, &mut fresh).unwrap();
        assert_eq!((learned.unreadable, learned.foreign), (0, 0), "{learned:?}");
        let written: HashMap<u64, u64> =
            gens.iter().filter(|(lba, _)| (2 * 8192..3 * 8192).contains(*lba)).map(|(l, g)| (*l, *g)).collect();
        assert_eq!(fresh, written, "every 16 KiB write arrived whole");
    }
}

fn perf(args: &[&str]) -> (bool, String) {
    let out = Command::new(binary("nvmetro-perf")).args(args).output().expect("run nvmetro-perf");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn verify_on_a_namespace_that_already_holds_data() {
    let t = TargetProcess::start(&basic_config("[0]"));
    let addr = t.addr.to_string();
    let args = [
        "--addr", &addr, "--nqn", SUBNQN, "--rw", "randrw", "--bs", "4k", "--qd", "8", "--size", "1MiB", "--time", "1s", "--ramp", "0s",
        "--verify", "-q",
    ];
    let (ok, out) = perf(&args);
    assert!(ok, "first run on a fresh namespace: {out}");
    // The second run finds the first one's stamps and checks against them, not against zeroes.
    let (ok, out) = perf(&args);
    assert!(ok, "second run over the first one's data: {out}");
    // Data that is not ours (written with another block size) is left unchecked until written.
    let (ok, out) = perf(&[
        "--addr",
        &addr,
        "--nqn",
        SUBNQN,
        "--rw",
        "randwrite",
        "--bs",
        "8k",
        "--size",
        "1MiB",
        "--time",
        "300ms",
        "--ramp",
        "0s",
        "--verify",
        "-q",
    ]);
    assert!(ok, "{out}");
    let mut loud = args.to_vec();
    loud.retain(|a| *a != "-q");
    let (ok, out) = perf(&loud);
    assert!(ok, "run over another block size's stamps: {out}");
    assert!(out.contains("with other data"), "the learning pass is reported: {out}");
    assert!(!out.contains("MISMATCH"), "{out}");
}

#[test]
fn a_run_with_no_usable_path_fails() {
    let cfg = basic_config("[0]")
        .replace("address = \"127.0.0.1:{PORT}\"", "address = \"127.0.0.1:{PORT}\"\nana_states = { \"1\" = \"inaccessible\" }");
    let t = TargetProcess::start(&cfg);
    let addr = t.addr.to_string();
    let (ok, out) = perf(&["--addr", &addr, "--nqn", SUBNQN, "--rw", "randread", "--bs", "4k", "--time", "500ms", "--ramp", "0s", "-q"]);
    assert!(!ok, "no command can complete on an Inaccessible-only path: {out}");
    assert!(out.contains("no command completed"), "{out}");
}

#[test]
fn two_optimized_paths_share_the_load_and_the_cpu_line_names_the_core() {
    let cfg = basic_config("[0]") + "\n[[listener]]\naddress = \"127.0.0.1:{PORT2}\"\n";
    let t = TargetProcess::start(&cfg);
    let dir = std::env::temp_dir().join(format!("nvmetro-perf-tool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("two.json");
    let (a, b) = (t.addr.to_string(), t.addr2.to_string());
    let (ok, out) = perf(&[
        "--addr",
        &a,
        "--addr",
        &b,
        "--nqn",
        SUBNQN,
        "--rw",
        "randwrite",
        "--bs",
        "4k",
        "--qd",
        "4",
        "--time",
        "1s",
        "--ramp",
        "0s",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let per: Vec<u64> = doc["per_path"].as_array().unwrap().iter().map(|p| p["figures"]["writes"].as_u64().unwrap()).collect();
    let total: u64 = per.iter().sum();
    assert_eq!(total, doc["total"]["writes"].as_u64().unwrap());
    for w in &per {
        assert!(*w * 3 >= total, "both Optimized paths carry a fair share: {per:?}");
    }
    assert!(out.contains("cpu: connection 0 (unpinned)"), "{out}");
    assert!(!out.contains("null"), "{out}");
    let (ok, out) = perf(&["--addr", &a, "--nqn", SUBNQN, "--time", "200ms", "--ramp", "0s", "--cores", "0"]);
    assert!(ok, "{out}");
    assert!(out.contains("cpu: connection 0 (on core 0)"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A minimal controller shaped like SPDK's nvmf_tgt with its defaults: no ANA reporting (the ANA
/// log page is refused with Invalid Field), 4 KiB in-capsule data, 4 KiB MAXH2CDATA, reads
/// answered with C2HData and a response capsule. Counts admin Connects and I/O commands.
struct FakeSpdk {
    addr: std::net::SocketAddr,
    admin_connects: Arc<AtomicU64>,
    io_commands: Arc<AtomicU64>,
}

fn fake_spdk() -> FakeSpdk {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let admin_connects = Arc::new(AtomicU64::new(0));
    let io_commands = Arc::new(AtomicU64::new(0));
    let media = Arc::new(Mutex::new(vec![0u8; 3 * 8192 * 512]));
    let (ac, ic) = (admin_connects.clone(), io_commands.clone());
    std::thread::spawn(move || {
        for sock in l.incoming() {
            let Ok(sock) = sock else { return };
            let (ac, ic, media) = (ac.clone(), ic.clone(), media.clone());
            std::thread::spawn(move || serve_fake(sock, &ac, &ic, &media));
        }
    });
    FakeSpdk { addr, admin_connects, io_commands }
}

fn serve_fake(mut sock: std::net::TcpStream, admin_connects: &AtomicU64, io_commands: &AtomicU64, media: &Mutex<Vec<u8>>) {
    use nvmetro_proto::nvme::{admin, fctype, io, Completion, Status};
    use nvmetro_proto::tcp::{TargetEvent, TargetLimits, TargetTransport};
    use std::io::{Read, Write};
    let _ = sock.set_nodelay(true);
    let mut t = TargetTransport::new(TargetLimits { in_capsule: 8192, maxh2cdata: 4096, max_transfer: 128 * 1024 });
    let (mut rx, mut buf, mut events) = (Vec::new(), vec![0u8; 1 << 16], Vec::new());
    let mut qid = 0;
    loop {
        let Ok(n) = sock.read(&mut buf) else { return };
        if n == 0 {
            return;
        }
        rx.extend_from_slice(&buf[..n]);
        let mut tx = Vec::new();
        let Ok(used) = t.receive(&rx, &mut tx, &mut events) else { return };
        rx.drain(..used);
        for ev in events.drain(..) {
            let (cmd, data) = match ev {
                TargetEvent::Command { cmd, data } => (cmd, data),
                TargetEvent::Reject(c) => {
                    t.respond(&c, &[], &mut tx);
                    continue;
                }
            };
            let ok = Completion::new(cmd.cid(), Status::SUCCESS);
            let mut out = Vec::new();
            let cqe = match (qid, cmd.opcode()) {
                (_, admin::FABRICS) if cmd.fctype() == fctype::CONNECT => {
                    let req = nvmetro_proto::controller::parse_connect(&cmd, &data).unwrap();
                    qid = req.qid;
                    t.set_connected(req.queue_size);
                    if qid == 0 {
                        admin_connects.fetch_add(1, Ordering::Relaxed);
                    } else {
                        t.set_in_capsule(4096);
                    }
                    ok.with_result(1)
                }
                (_, admin::FABRICS) if cmd.fctype() == fctype::PROPERTY_GET => ok.with_result(if cmd.cdw(11) == 0x1c { 1 } else { 0x3ff }),
                (_, admin::FABRICS) => ok,
                (0, admin::IDENTIFY) => {
                    out = vec![0u8; 4096];
                    match cmd.cdw(10) & 0xff {
                        1 => {
                            out[111] = 1;
                            out[1792..1796].copy_from_slice(&((64u32 + 4096) / 16).to_le_bytes());
                            // IOCCSZ
                        }
                        0 => {
                            out[0..8].copy_from_slice(&(3 * 8192u64).to_le_bytes());
                            out[130] = 9;
                        }
                        _ => {}
                    }
                    ok
                }
                (0, admin::GET_LOG_PAGE) => Completion::new(cmd.cid(), Status::INVALID_FIELD),
                (0, _) => ok,
                (_, io::READ) => {
                    io_commands.fetch_add(1, Ordering::Relaxed);
                    let (off, len) = (cmd.slba() as usize * 512, cmd.nlb() as usize * 512);
                    out = media.lock().unwrap()[off..off + len].to_vec();
                    ok
                }
                (_, io::WRITE) => {
                    io_commands.fetch_add(1, Ordering::Relaxed);
                    let off = cmd.slba() as usize * 512;
                    media.lock().unwrap()[off..off + data.len()].copy_from_slice(&data);
                    ok
                }
                _ => ok,
            };
            t.respond(&cqe, &out, &mut tx);
        }
        if sock.write_all(&tx).is_err() {
            return;
        }
    }
}

#[test]
fn a_controller_without_ana_reporting_keeps_its_path() {
    let fake = fake_spdk();
    let mut o = ConnectOptions::new(fake.addr, SUBNQN);
    o.hostnqn = HOSTNQN.into();
    let h = Host::connect(&o).unwrap();
    let (admin, mut io) = h.into_parts();
    let shared = Arc::new(PathShared::new("fake", 1));
    let monitor = PathMonitor::start(shared.clone(), Some(admin), o.clone(), 1);
    let mut paths = vec![PathIo::new(shared.clone(), Some(io.remove(0)))];
    let mut gens = HashMap::new();
    // Enough commands that the monitor reads (and is refused) the ANA log several times meanwhile.
    for (i, (read_pct, bs, qd)) in [(0, 8192, 32), (50, 16384, 8), (100, 4096, 1)].into_iter().enumerate() {
        let mut wl = workload(read_pct, bs, qd, 3000, i as u64);
        wl.max_ios = Some(3000);
        let r = load::run_paths(&mut paths, &wl, 512, &mut gens, 0, None).unwrap();
        assert_eq!((r.errors, r.mismatches.len(), r.ios()), (0, 0, 3000), "{:?}", r.mismatches.first());
        assert!(r.stalls.is_empty(), "I/O never stood still: {:?}", r.stalls);
        assert!(shared.alive.load(Ordering::Acquire), "the refused ANA log did not cost the path");
    }
    monitor.stop();
    assert_eq!(fake.admin_connects.load(Ordering::Relaxed), 1, "the path was never reconnected");
    assert_eq!(fake.io_commands.load(Ordering::Relaxed), 9000, "every command reached the controller once");
    assert_eq!(shared.ana.load(Ordering::Acquire), 0, "ANA state unknown");
}
