//! The real nvmetro-tgt binary over 127.0.0.1: a host connects, identifies, reads and writes;
//! bad input of every kind gets the right status or a clean disconnect, and never hurts other
//! connections. Raw NVMe/TCP bytes (malformed PDUs, digests, commands before Connect) are in
//! `tcp_pdus.rs`.

use nvmetro_perf::load::{self, PathIo, Pattern, Workload};
use nvmetro_perf::{ConnectOptions, Host, HostError, Queue};
use nvmetro_proto::cmds;
use nvmetro_proto::nvme::{le_u16, le_u32, le_u64, Command, Status};
use nvmetro_tests::{basic_config, basic_options, TargetProcess, HOSTNQN, SUBNQN};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn status_of(r: Result<(nvmetro_proto::nvme::Completion, Vec<u8>), HostError>) -> Status {
    r.expect("command completes").0.status()
}

#[test]
fn identify_read_write_and_io_errors() {
    let t = TargetProcess::start(&basic_config("[0]"));
    let mut h = Host::connect(&basic_options(&t)).unwrap();
    assert!(h.cntlid >= 10 && h.cntlid <= 20, "cntlid from the configured range: {}", h.cntlid);
    assert_eq!(h.id_ctrl[76], 0x0a, "CMIC");
    assert_eq!(le_u32(&h.id_ctrl, 516), 32, "NN");
    assert_eq!(le_u32(&h.id_ctrl, 540), 32, "MNAN");
    assert_eq!(le_u16(&h.id_ctrl, 320), 1, "KAS");
    let (blocks, bs) = h.namespace_size(1).unwrap();
    assert_eq!((blocks, bs), (64 * 2048, 512));
    let (blocks2, bs2) = h.namespace_size(2).unwrap();
    assert_eq!((blocks2, bs2), (4096, 4096));

    // Active namespace list and descriptors.
    let (_, list) = h.admin_cmd("Identify", cmds::identify(0, 2, 0), vec![], 4096).unwrap();
    assert_eq!((le_u32(&list, 0), le_u32(&list, 4), le_u32(&list, 8)), (1, 2, 0));
    let (_, descs) = h.admin_cmd("Identify", cmds::identify(0, 3, 1), vec![], 4096).unwrap();
    assert_eq!(descs[0], 1, "EUI-64 first");

    // Writes, in-capsule (8 KiB) and through R2T (64 KiB), read back identically.
    for (slba, len) in [(0u64, 8192usize), (1000, 65536), (blocks - 16, 8192)] {
        let data: Vec<u8> = (0..len).map(|i| (i as u64 * 31 + slba) as u8).collect();
        h.write(1, slba, data.clone(), bs).unwrap();
        assert_eq!(h.read(1, slba, (len / 512) as u32, bs).unwrap(), data, "LBA {slba}");
    }
    h.flush(1).unwrap();
    h.flush(0xffff_ffff).unwrap();

    // File-backed namespace through io_uring.
    let data = vec![0x5a; 8192];
    h.write(2, 7, data.clone(), bs2).unwrap();
    assert_eq!(h.read(2, 7, 2, bs2).unwrap(), data);
    h.flush(2).unwrap();

    // Out of range, unknown namespace, unknown opcode, short data.
    assert_eq!(status_of(h.io_cmd(0, cmds::write(0, 1, blocks - 1, 2), vec![0; 1024], 0)), Status::LBA_OUT_OF_RANGE);
    assert_eq!(status_of(h.io_cmd(0, cmds::read(0, 1, blocks, 1), vec![], 512)), Status::LBA_OUT_OF_RANGE);
    assert_eq!(status_of(h.io_cmd(0, cmds::read(0, 9, 0, 1), vec![], 512)), Status::INVALID_NAMESPACE);
    let mut bad = Command::new(0x7e, 0);
    bad.set_nsid(1);
    assert_eq!(status_of(h.io_cmd(0, bad, vec![], 0)), Status::INVALID_OPCODE);
    assert_eq!(status_of(h.io_cmd(0, cmds::write(0, 1, 0, 4), vec![0; 512], 0)), Status::SGL_DATA_LENGTH_INVALID);
    assert_eq!(status_of(h.admin.execute(Command::new(0x55, 0), vec![], 0)), Status::INVALID_OPCODE);

    // Write Zeroes and Deallocate read back as zeroes.
    h.write(1, 50, vec![9; 4096], bs).unwrap();
    assert_eq!(status_of(h.io_cmd(0, cmds::write_zeroes(0, 1, 50, 4, false), vec![], 0)), Status::SUCCESS);
    let (c, d) = cmds::deallocate(0, 1, &[(54, 4)]);
    assert_eq!(status_of(h.io_cmd(0, c, d, 0)), Status::SUCCESS);
    assert_eq!(h.read(1, 50, 8, bs).unwrap(), vec![0; 4096]);

    // Compare and fused Compare+Write.
    h.write(1, 60, vec![1; 512], bs).unwrap();
    assert_eq!(status_of(h.io_cmd(0, cmds::rw(0, 5, 1, 60, 1), vec![1; 512], 0)), Status::SUCCESS);
    assert_eq!(status_of(h.io_cmd(0, cmds::rw(0, 5, 1, 60, 1), vec![2; 512], 0)), Status::COMPARE_FAILURE);
    let q = &mut h.io[0];
    let (cmp, wr) = cmds::compare_and_write(0, 0, 1, 60, 1);
    let c1 = q.submit(cmp, vec![2; 512], 0);
    let c2 = q.submit(wr, vec![3; 512], 0);
    q.flush().unwrap();
    assert_eq!(q.wait_for(c1).unwrap().0.status(), Status::COMPARE_FAILURE);
    assert_eq!(q.wait_for(c2).unwrap().0.status(), Status::FUSED_FAILED);
    let c1 = q.submit(cmp, vec![1; 512], 0);
    let c2 = q.submit(wr, vec![3; 512], 0);
    q.flush().unwrap();
    assert_eq!(q.wait_for(c1).unwrap().0.status(), Status::SUCCESS);
    assert_eq!(q.wait_for(c2).unwrap().0.status(), Status::SUCCESS);
    assert_eq!(h.read(1, 60, 1, bs).unwrap(), vec![3; 512]);

    // Logs: SMART counts our writes; ANA; command effects; firmware.
    let smart = h.log_page(0x02, 512).unwrap();
    assert!(le_u64(&smart, 80) >= 6, "host write commands counted");
    let ana = h.log_page(0x0c, 16 + 32 + 8).unwrap();
    assert_eq!((le_u16(&ana, 8), ana[32], le_u32(&ana, 48), le_u32(&ana, 52)), (1, 1, 1, 2));
    assert_eq!(le_u32(&h.log_page(0x05, 4096).unwrap(), 1024 + 4) & 1, 1, "write supported");
    assert_eq!(h.log_page(0x03, 512).unwrap()[0], 1);
    assert_eq!(status_of(h.admin.execute(cmds::get_log_page(0, 0x42, 0, 512, 0), vec![], 512)), Status::INVALID_LOG_PAGE);

    // Features.
    let (c, _) = h.admin_cmd("Get Features", cmds::get_features(0, 0x0f), vec![], 0).unwrap();
    assert_eq!(c.result, 5000, "KATO from Connect");
    h.keep_alive().unwrap();
    h.shutdown().unwrap();
}

#[test]
fn hosts_not_allowed_and_unknown_subsystems_are_refused() {
    let t = TargetProcess::start(&basic_config("[0]"));
    let mut o = basic_options(&t);
    o.hostnqn = "nqn.2014-08.org.nvmexpress:uuid:11111111-2222-3333-4444-555555555555".into();
    match Host::connect(&o) {
        Err(HostError::Status { status, .. }) => assert_eq!(status, Status::CONNECT_INVALID_HOST),
        other => panic!("unexpected: {other:?}"),
    }
    let mut o = basic_options(&t);
    o.subnqn = "nqn.2026-11.io.nvmetro:nope".into();
    match Host::connect(&o) {
        Err(HostError::Status { status, .. }) => assert_eq!(status, Status::CONNECT_INVALID_PARAMETERS),
        other => panic!("unexpected: {other:?}"),
    }
    // An I/O queue naming a controller that does not exist.
    let o = basic_options(&t);
    let mut q = Queue::open(&o, 1, 8192).unwrap();
    let (c, d) = cmds::connect(0, 1, 32, 0, 17, SUBNQN, HOSTNQN, [0; 16]);
    let (cqe, _) = q.execute(c, d, 0).unwrap();
    assert_eq!(cqe.status(), Status::CONNECT_INVALID_PARAMETERS);
    assert_eq!(cqe.result, 1 << 16 | 16, "IATTR=data, IPO=CNTLID offset");
    // And the allowed host still works.
    Host::connect(&basic_options(&t)).unwrap();
}

#[test]
fn keep_alive_timeout_drops_a_silent_host() {
    let t = TargetProcess::start(&basic_config("[0]"));
    let mut o = basic_options(&t);
    o.kato_ms = 500;
    let mut h = Host::connect(&o).unwrap();
    let first = h.cntlid;
    // Stay silent past KATO: the target closes both queues.
    std::thread::sleep(Duration::from_millis(1500));
    let err = h.read(1, 0, 1, 512).unwrap_err();
    assert!(matches!(err, HostError::Closed | HostError::Io(_)), "{err:?}");
    // The controller ID was released.
    let again = Host::connect(&basic_options(&t)).unwrap();
    assert_eq!(again.cntlid, first);

    // A host that keeps sending Keep Alive stays.
    let mut o = basic_options(&t);
    o.kato_ms = 500;
    let mut h = Host::connect(&o).unwrap();
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        h.keep_alive().unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    h.read(1, 0, 1, 512).unwrap();
}

#[test]
fn discovery_on_listener_and_discovery_port() {
    let port = nvmetro_tests::free_port();
    let cfg = basic_config("[0]").replace("[target]", &format!("[target]\ndiscovery = [\"127.0.0.1:{port}\"]"));
    let t = TargetProcess::start(&cfg);
    for addr in [t.addr, format!("127.0.0.1:{port}").parse().unwrap()] {
        let mut o = ConnectOptions::new(addr, "nqn.2014-08.org.nvmexpress.discovery");
        o.hostnqn = HOSTNQN.into();
        o.kato_ms = 0;
        let mut h = Host::connect(&o).unwrap();
        assert!(h.is_discovery());
        let header = h.log_page(0x70, 1024).unwrap();
        let n = le_u64(&header, 8) as usize;
        assert_eq!(n, 2, "the subsystem and the discovery subsystem on the one listener");
        let log = h.log_page(0x70, 1024 * (1 + n)).unwrap();
        let e = &log[1024..2048];
        assert_eq!((e[0], e[2]), (3, 2), "TCP, NVM subsystem");
        let subnqn = nvmetro_proto::nvme::get_str(&e[256..512]);
        assert_eq!(subnqn, SUBNQN);
        assert_eq!(nvmetro_proto::nvme::get_str(&e[32..64]), t.addr.port().to_string());
        // Discovery does not serve I/O queues.
        let mut q = Queue::open(&o, 1, 8192).unwrap();
        let (c, d) = cmds::connect(0, 1, 32, 0, h.cntlid, "nqn.2014-08.org.nvmexpress.discovery", HOSTNQN, [0; 16]);
        assert_eq!(q.execute(c, d, 0).unwrap().0.status(), Status::CONNECT_INVALID_PARAMETERS);
    }
    // A host that is not allowed sees no subsystem in the log.
    let mut o = ConnectOptions::new(t.addr, "nqn.2014-08.org.nvmexpress.discovery");
    o.hostnqn = "nqn.2014-08.org.nvmexpress:uuid:99999999-2222-3333-4444-555555555555".into();
    let mut h = Host::connect(&o).unwrap();
    assert_eq!(le_u64(&h.log_page(0x70, 1024).unwrap(), 8), 1);
}

#[test]
fn bad_configs_are_refused_with_file_line_and_key() {
    let dir = std::env::temp_dir().join(format!("nvmetro-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("unknown.toml", basic_config("[0]").replace("poll_mode", "colour = 1\npoll_mode"), ":4: target.colour"),
        ("dupnsid.toml", basic_config("[0]").replace("nsid = 2", "nsid = 1"), "subsystem.namespace.nsid: NSID 1 is used twice"),
        ("nobdev.toml", basic_config("[0]").replace("bdev = \"disk\"", "bdev = \"dsk\""), "no bdev named `dsk`"),
        ("syntax.toml", basic_config("[0]").replace("[[listener]]", "[[listener"), "syntax.toml:"),
        ("cores.toml", basic_config("[0, 999]"), "core 999"),
    ];
    for (name, text, want) in cases {
        let path = dir.join(name);
        std::fs::write(&path, text.replace("{PORT}", "1").replace("{DIR}", "/tmp")).unwrap();
        let out = std::process::Command::new(nvmetro_tests::binary("nvmetro-tgt")).arg("--config").arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name} was accepted");
        assert!(err.contains(want), "{name}: `{want}` not in: {err}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn two_reactors_many_queues_verified_load() {
    let t = TargetProcess::start(&basic_config("[0, 1]"));
    let mut o = basic_options(&t);
    o.io_queues = 4;
    let mut h = Host::connect(&o).unwrap();
    assert_eq!(h.io.len(), 4);
    let queues = std::mem::take(&mut h.io);
    let threads: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(i, q)| {
            std::thread::spawn(move || {
                let mut q = PathIo::single(q);
                let wl = Workload {
                    nsid: 1,
                    pattern: Pattern::Random,
                    read_pct: 50,
                    block_size: 8192,
                    qd: 8,
                    duration: Duration::from_secs(2),
                    ramp: Duration::ZERO,
                    max_ios: None,
                    rate: None,
                    verify: true,
                    region: (i as u64 * 16384, 16384),
                    seed: i as u64 + 1,
                };
                let mut gens = HashMap::new();
                let r = load::run(&mut q, &wl, 512, &mut gens).unwrap();
                // Read everything back once more after the run.
                let check =
                    Workload { read_pct: 100, pattern: Pattern::Sequential, max_ios: Some(1024), duration: Duration::from_secs(30), ..wl };
                let r2 = load::run(&mut q, &check, 512, &mut gens).unwrap();
                (r, r2)
            })
        })
        .collect();
    for th in threads {
        let (r, r2) = th.join().unwrap();
        assert!(r.ios() > 100, "load ran: {} I/Os", r.ios());
        assert_eq!((r.errors, r.mismatches.len()), (0, 0), "{:?} {:?}", r.first_error, r.mismatches.first());
        assert_eq!((r2.errors, r2.mismatches.len()), (0, 0), "{:?}", r2.mismatches.first());
    }
}

#[test]
fn compare_and_write_is_atomic_across_reactors() {
    // Two queues on two reactors increment one counter block with read + Compare+Write; the final
    // value must equal the number of successful Compare+Writes, or some were not atomic.
    let t = TargetProcess::start(&basic_config("[0, 1]"));
    let mut o = basic_options(&t);
    o.io_queues = 2;
    let mut h = Host::connect(&o).unwrap();
    h.write(1, 100, vec![0; 512], 512).unwrap();
    let queues = std::mem::take(&mut h.io);
    let threads: Vec<_> =
        queues.into_iter().map(|mut q| std::thread::spawn(move || nvmetro_tests::caw_increment(&mut q, 100, 300))).collect();
    let total: u64 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    let mut h = Host::connect(&basic_options(&t)).unwrap();
    let v = u64::from_le_bytes(h.read(1, 100, 1, 512).unwrap()[..8].try_into().unwrap());
    assert_eq!(v, total, "every successful Compare+Write counted exactly once");
    assert!(total >= 300, "at least one side always wins: {total}");
}

#[test]
fn target_survives_abrupt_host_loss_with_io_in_flight() {
    let mut t = TargetProcess::start(&basic_config("[0, 1]"));
    for _ in 0..5 {
        let mut o = basic_options(&t);
        o.io_queues = 2;
        let mut h = Host::connect(&o).unwrap();
        for q in h.io.iter_mut() {
            for i in 0..32 {
                q.submit(cmds::write(0, 1, i * 16, 16), vec![1; 8192], 0);
            }
            q.flush().unwrap();
        }
        drop(h); // sockets close with writes in flight
    }
    assert!(t.is_running());
    let mut h = Host::connect(&basic_options(&t)).unwrap();
    h.write(1, 0, vec![2; 512], 512).unwrap();
    assert_eq!(h.read(1, 0, 1, 512).unwrap(), vec![2; 512]);
}

#[test]
fn hosts_prefer_their_own_site() {
    // This target is site 1. A host of site 1 sees its paths Optimized; a host of site 2 sees
    // them Non-Optimized (so it prefers its own site); a host without a site sees them as set.
    let cfg = basic_config("[0]").replace("[target]", "[target]\nsite = 1").replace("allowed_hosts = [", "allow_any_host = true\nallowed_hosts = [")
        + "\n[[host]]\nnqn = \"nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-0000000000a1\"\nsite = 1\n\n[[host]]\nnqn = \"nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-0000000000b2\"\nsite = 2\n";
    let t = TargetProcess::start(&cfg);
    for (host, want) in [("a1", 1u8), ("b2", 2), ("c3", 1)] {
        let mut o = basic_options(&t);
        o.hostnqn = format!("nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-0000000000{host}");
        let mut h = Host::connect(&o).unwrap();
        let ana = h.log_page(0x0c, 16 + 32 + 8).unwrap();
        assert_eq!(ana[32], want, "ANA state for host {host}");
        // Non-Optimized paths still serve I/O.
        h.write(1, 5, vec![9; 512], 512).unwrap();
    }
}

/// Scrapes the metrics endpoint and returns the value of the sample whose line starts with `prefix`.
fn scrape(addr: std::net::SocketAddr, prefix: &str) -> f64 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    families_are_blocks(&body);
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no `{prefix}` in:\n{body}"))
}

/// As a text-format parser reads it: every sample belongs to the family of the last TYPE line
/// (a histogram's `_bucket`, `_sum` and `_count` to the histogram), and no family comes twice.
fn families_are_blocks(body: &str) {
    let (mut current, mut kind, mut seen) = (String::new(), String::new(), std::collections::HashSet::new());
    for line in body.lines().skip_while(|l| !l.is_empty()).skip(1) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut w = rest.split(' ');
            current = w.next().unwrap().to_string();
            kind = w.next().unwrap().to_string();
            assert!(seen.insert(current.clone()), "family {current} comes twice");
        } else if !line.starts_with('#') && !line.is_empty() {
            let metric = line.split(['{', ' ']).next().unwrap();
            let ok = metric == current
                || (kind == "histogram" && ["_bucket", "_sum", "_count"].iter().any(|x| metric.strip_suffix(x) == Some(current.as_str())));
            assert!(ok, "sample `{line}` sits under the TYPE of {current}");
        }
    }
}

#[test]
fn metrics_match_the_load_tools_own_counts() {
    let cfg = basic_config("[0]").replace("[target]", "[target]\nsite = 1") + "\n[metrics]\naddress = \"127.0.0.1:{PORT2}\"\n";
    let t = TargetProcess::start(&cfg);
    let m = t.addr2;
    let reads = "nvmetro_namespace_commands_total{subsystem=\"nqn.2026-11.io.nvmetro:e2e\",nsid=\"1\",site=\"1\",op=\"read\"}";
    let writes = "nvmetro_namespace_commands_total{subsystem=\"nqn.2026-11.io.nvmetro:e2e\",nsid=\"1\",site=\"1\",op=\"write\"}";
    let count = "nvmetro_namespace_latency_seconds_count{subsystem=\"nqn.2026-11.io.nvmetro:e2e\",nsid=\"1\"";
    let (r0, w0) = (scrape(m, reads), scrape(m, writes));
    let mut h = Host::connect(&basic_options(&t)).unwrap();
    let mut path = PathIo::single(h.io.remove(0));
    let wl = Workload {
        nsid: 1,
        pattern: Pattern::Random,
        read_pct: 40,
        block_size: 4096,
        qd: 8,
        duration: Duration::from_secs(1),
        ramp: Duration::ZERO,
        max_ios: None,
        rate: None,
        verify: true,
        region: (0, 65536),
        seed: 9,
    };
    let r = load::run(&mut path, &wl, 512, &mut HashMap::new()).unwrap();
    assert_eq!((r.errors, r.mismatches.len()), (0, 0));
    let (dr, dw) = (scrape(m, reads) - r0, scrape(m, writes) - w0);
    let within = |target: f64, tool: u64| (target - tool as f64).abs() <= (tool as f64 * 0.01).max(1.0);
    assert!(r.reads > 100 && r.writes > 100, "the load ran: {} reads {} writes", r.reads, r.writes);
    assert!(within(dr, r.reads), "target counted {dr} reads, the load tool {}", r.reads);
    assert!(within(dw, r.writes), "target counted {dw} writes, the load tool {}", r.writes);
    assert!(scrape(m, count) >= dr + dw, "the latency histogram counts every command");
    assert_eq!(scrape(m, "nvmetro_host_controllers{"), 1.0);
    assert_eq!(scrape(m, "nvmetro_ana_state{subsystem=\"nqn.2026-11.io.nvmetro:e2e\",listener="), 1.0);
}

fn rpc(socket: &std::path::Path, request: &str) -> String {
    use std::io::BufRead;
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    writeln!(s, "{request}").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).unwrap();
    line
}

#[test]
fn ana_change_by_the_operator_reaches_the_host() {
    let cfg = basic_config("[0]").replace("[target]", "[target]\nsocket = \"{DIR}/mgmt.sock\"");
    let t = TargetProcess::start(&cfg);
    let socket = t.scratch().join("mgmt.sock");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600, "the socket is root-only");
    let mut h = Host::connect(&basic_options(&t)).unwrap();
    h.admin_cmd("Set Features (async event config)", cmds::set_features(0, 0x0b, 1 << 11), vec![], 0).unwrap();
    let aer = h.admin.submit(cmds::async_event_request(0), vec![], 0);
    h.admin.flush().unwrap();

    let set = |state: &str| {
        let port = t.addr.port();
        rpc(
            &socket,
            &format!(
                r#"{{"jsonrpc":"2.0","id":7,"method":"nvmf_subsystem_listener_set_ana_state","params":{{"nqn":"{SUBNQN}","listen_address":{{"trtype":"tcp","adrfam":"ipv4","traddr":"127.0.0.1","trsvcid":"{port}"}},"ana_state":"{state}"}}}}"#
            ),
        )
    };
    assert!(set("inaccessible").contains("\"result\":true"));
    let (cqe, _) = h.admin.wait_for(aer).unwrap();
    assert_eq!(cqe.result, 0x0c0302, "ANA change notice for log page 0Ch");
    let ana = h.log_page(0x0c, 16 + 32 + 8).unwrap();
    assert_eq!(ana[32], 3, "inaccessible in the ANA log");
    assert_eq!(status_of(h.io_cmd(0, cmds::read(0, 1, 0, 1), vec![], 512)), Status::ANA_INACCESSIBLE);

    assert!(set("optimized").contains("\"result\":true"));
    h.read(1, 0, 1, 512).unwrap();
    // Bad requests get JSON-RPC errors, not silence.
    assert!(rpc(&socket, r#"{"jsonrpc":"2.0","id":1,"method":"no_such_method"}"#).contains("-32601"));
    assert!(rpc(&socket, "not json").contains("-32700"));
    assert!(set("sideways").contains("-32602"));
    assert!(rpc(&socket, r#"{"jsonrpc":"2.0","id":2,"method":"nvmf_get_subsystems"}"#).contains(SUBNQN));
}

#[test]
fn a_host_that_does_not_read_stops_being_read() {
    let cfg = basic_config("[0]").replace("[target]", "[target]\nsite = 1") + "\n[metrics]\naddress = \"127.0.0.1:{PORT2}\"\n";
    let t = TargetProcess::start(&cfg);
    let reads = format!("nvmetro_namespace_commands_total{{subsystem=\"{SUBNQN}\",nsid=\"1\",site=\"1\",op=\"read\"}}");
    let paused = "host is not taking its responses; not reading until they drain";
    let mut h = Host::connect(&basic_options(&t)).unwrap();
    let q = &mut h.io[0];
    // Batches of 100 reads of 128 KiB, each sent once the target answered the one before, and
    // none of the answers read: the target must stop reading rather than queue them all.
    let (mut cids, mut batches) = (Vec::new(), 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !t.log().contains(paused) {
        assert!(batches < 20, "{} MiB of responses queued and the target still reads", batches * 100 / 8);
        for i in 0..100u64 {
            cids.push(q.submit(cmds::read(0, 1, i * 256, 256), vec![], 128 * 1024));
        }
        q.flush().unwrap();
        batches += 1;
        while scrape(t.addr2, &reads) < cids.len() as f64 && !t.log().contains(paused) {
            assert!(Instant::now() < deadline, "reads never completed:\n{}", t.log());
            std::thread::yield_now();
        }
    }
    let queued: usize = strip_ansi(&t.log())
        .lines()
        .find(|l| l.contains(paused))
        .and_then(|l| l.split("queued=").nth(1))
        .and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse().ok())
        .expect("the queued bytes are logged");
    let bound = OUTBOX_LIMIT + o_queue_size(&h) * 128 * 1024;
    assert!((OUTBOX_LIMIT..bound).contains(&queued), "paused with {queued} bytes queued");
    // Once the host reads, the target reads again: every command completes.
    let q = &mut h.io[0];
    for cid in cids {
        let (cqe, data) = q.wait_for(cid).unwrap();
        assert_eq!((cqe.status(), data.len()), (Status::SUCCESS, 128 * 1024));
    }
    h.read(1, 0, 1, 512).unwrap();
}

/// The target's send-buffer bound (`conn::OUTBOX_LIMIT`).
const OUTBOX_LIMIT: usize = 4 << 20;

fn o_queue_size(h: &Host) -> usize {
    usize::from(h.options().queue_size)
}

/// The log without terminal colours.
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn durability(m: std::net::SocketAddr, nsid: u32, op: &str) -> f64 {
    scrape(m, &format!("nvmetro_namespace_durability_total{{subsystem=\"{SUBNQN}\",nsid=\"{nsid}\",site=\"1\",op=\"{op}\"}}"))
}

#[test]
fn write_cache_off_makes_every_write_durable() {
    let cfg = basic_config("[0]").replace("[target]", "[target]\nsite = 1") + "\n[metrics]\naddress = \"127.0.0.1:{PORT2}\"\n";
    let t = TargetProcess::start(&cfg);
    let m = t.addr2;
    let mut h = Host::connect(&basic_options(&t)).unwrap();
    assert_eq!(h.id_ctrl[525] & 1, 1, "VWC present: namespace 2 is a file with a page cache");
    let get = |h: &mut Host| h.admin_cmd("Get Features (VWC)", cmds::get_features(0, 0x06), vec![], 0).unwrap().0.result;
    assert_eq!(get(&mut h), 1);
    h.write(2, 0, vec![1; 4096], 4096).unwrap();
    assert_eq!(durability(m, 2, "fua_write"), 0.0, "the cache is on: no FUA");

    h.admin_cmd("Set Features (VWC off)", cmds::set_features(0, 0x06, 0), vec![], 0).unwrap();
    assert_eq!(get(&mut h), 0, "Get Features returns the value set");
    assert_eq!(h.id_ctrl[525] & 1, 1);
    for i in 0..3 {
        h.write(2, i, vec![2; 4096], 4096).unwrap();
    }
    h.write(1, 0, vec![2; 512], 512).unwrap();
    assert_eq!(durability(m, 2, "fua_write"), 3.0, "every write carries FUA");
    assert_eq!(durability(m, 1, "fua_write"), 1.0);
    // Write Zeroes has no FUA: it is flushed before it completes.
    let flushes = durability(m, 2, "flush");
    assert_eq!(status_of(h.io_cmd(0, cmds::write_zeroes(0, 2, 8, 1, false), vec![], 0)), Status::SUCCESS);
    assert_eq!(durability(m, 2, "flush"), flushes + 1.0);
    assert_eq!(h.read(2, 0, 1, 4096).unwrap(), vec![2; 4096]);

    h.admin_cmd("Set Features (VWC on)", cmds::set_features(0, 0x06, 1), vec![], 0).unwrap();
    assert_eq!(get(&mut h), 1);
    h.write(2, 0, vec![3; 4096], 4096).unwrap();
    assert_eq!(durability(m, 2, "fua_write"), 3.0, "back to cached writes");
}

#[test]
fn shutdown_flushes_every_namespace_first() {
    let cfg = basic_config("[0]").replace("[target]", "[target]\nsite = 1") + "\n[metrics]\naddress = \"127.0.0.1:{PORT2}\"\n";
    let t = TargetProcess::start(&cfg);
    let m = t.addr2;
    let mut h = Host::connect(&basic_options(&t)).unwrap();
    h.write(2, 0, vec![5; 4096], 4096).unwrap();
    let before = (durability(m, 1, "flush"), durability(m, 2, "flush"));
    assert_eq!(before, (0.0, 0.0));
    h.admin_cmd("Property Set CC.SHN", cmds::property_set(0, nvmetro_proto::controller::prop::CC, cmds::CC_SHUTDOWN), vec![], 0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (cqe, _) = h.admin_cmd("Property Get CSTS", cmds::property_get(0, nvmetro_proto::controller::prop::CSTS), vec![], 0).unwrap();
        let shst = (cqe.result >> 2) & 3;
        if shst == 2 {
            break;
        }
        assert_eq!(shst, 1, "shutdown processing occurring meanwhile");
        assert!(Instant::now() < deadline, "shutdown never completed");
    }
    assert_eq!((durability(m, 1, "flush"), durability(m, 2, "flush")), (1.0, 1.0), "each namespace flushed once");
    assert!(t.log().contains("shutdown complete"), "{}", t.log());
}

#[test]
fn a_clean_stop_leaves_no_socket_and_the_log_has_no_colour_codes() {
    let cfg = basic_config("[0]").replace("[target]", "[target]\nsocket = \"{DIR}/mgmt.sock\"");
    let mut t = TargetProcess::start(&cfg);
    let socket = t.scratch().join("mgmt.sock");
    assert!(socket.exists());
    t.signal("TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while t.is_running() {
        assert!(std::time::Instant::now() < deadline, "the target did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!socket.exists(), "the socket file was removed");
    let log = t.log();
    assert!(log.contains("stopping"), "{log}");
    assert!(!log.contains('\x1b'), "no terminal colour codes in a log file: {log:?}");
}

#[test]
fn a_start_refused_for_a_bad_path_creates_no_file() {
    let dir = std::env::temp_dir().join(format!("nvmetro-badpath-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = nvmetro_tests::mirror_site_config("nqn.2026-11.io.nvmetro:badpath", true, 1, "", "")
        .replace("{DIR}/leg.meta", "{DIR}/no-such-dir/leg.meta")
        .replace("{PORT}", "1")
        .replace("{DIR}", &dir.display().to_string());
    let path = dir.join("t.toml");
    std::fs::write(&path, cfg).unwrap();
    let out = std::process::Command::new(nvmetro_tests::binary("nvmetro-tgt")).arg("--config").arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {err}");
    assert!(err.contains("bdev.metadata") && err.contains("no-such-dir"), "{err}");
    assert!(!dir.join("leg.img").exists(), "no leg image was created by the refused start");
    let _ = std::fs::remove_dir_all(dir);
}
