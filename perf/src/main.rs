//! `nvmetro-perf`: NVMe/TCP load generator with latency percentiles, multipath failover and
//! data verification; `compare` for two results; `suite` for the standard benchmark cases with
//! the loopback echo floor; `echo-server` for the floor by hand.

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand};
use nvmetro_perf::load::{self, JobResult, PathIo, PathShared, Pattern, Workload};
use nvmetro_perf::paths::{ana_state, PathMonitor};
use nvmetro_perf::report::{self, us};
use nvmetro_perf::{echo, ConnectOptions, Host};
use nvmetro_proto::pdu::Digests;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(name = "nvmetro-perf", version, about = "NVMe/TCP load generator: IOPS, latency percentiles, multipath failover, verification")]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run a workload (the default).
    Run(Box<RunArgs>),
    /// Compare two --json results side by side (B/A ratios).
    Compare { a: PathBuf, b: PathBuf },
    /// The standard benchmark cases against a fresh nvmetro-tgt, each with its echo floor.
    Suite(SuiteArgs),
    /// Serve the echo floor (busy polling) on ADDR.
    EchoServer {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        core: Option<usize>,
    },
}

#[derive(Args, Debug, Clone)]
struct RunArgs {
    /// Target address; repeat for more paths of the same subsystem (multipath).
    #[arg(long, required = true)]
    addr: Vec<SocketAddr>,
    /// Subsystem NQN.
    #[arg(long, required = true)]
    nqn: Option<String>,
    /// Host NQN to connect as.
    #[arg(long, default_value = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-6e766d657472")]
    hostnqn: String,
    /// read, write, randread, randwrite, rw, randrw.
    #[arg(long, default_value = "randwrite")]
    rw: String,
    /// Percentage of reads for rw/randrw.
    #[arg(long, default_value_t = 50)]
    rwmixread: u32,
    /// Block size, e.g. 4k, 8k, 128k.
    #[arg(long, default_value = "8k")]
    bs: String,
    /// Queue depth per connection.
    #[arg(long, default_value_t = 1)]
    qd: usize,
    /// Measured run time, e.g. 10s, 500ms.
    #[arg(long, default_value = "10s")]
    time: String,
    /// Warm-up not counted in the figures.
    #[arg(long, default_value = "1s")]
    ramp: String,
    /// Stop after this many counted commands per connection.
    #[arg(long)]
    number_ios: Option<u64>,
    /// Fixed total rate in IOPS (latency at a load rather than at saturation).
    #[arg(long)]
    rate: Option<u64>,
    /// Connections (I/O queues per path); each runs on its own thread.
    #[arg(long, default_value_t = 1)]
    connections: u16,
    /// Cores to pin connection threads to, round-robin (default: no pinning).
    #[arg(long, value_delimiter = ',')]
    cores: Vec<usize>,
    /// Namespace ID.
    #[arg(long, default_value_t = 1)]
    nsid: u32,
    /// Use only the first SIZE bytes of the namespace.
    #[arg(long)]
    size: Option<String>,
    /// Stamp written blocks (LBA, generation, CRC32C) and check every read; a mismatch fails the run.
    /// The region is read once first to learn what it already holds (stamps of an earlier run are
    /// checked from then on; other data only once this run has written it).
    #[arg(long)]
    verify: bool,
    /// Commands that may fail before the run counts as failed (exit status 1).
    #[arg(long, default_value_t = 0)]
    max_errors: u64,
    /// Spin on the socket instead of sleeping (lowest latency, one busy core per connection).
    #[arg(long)]
    busy_poll: bool,
    /// Header and data digests (CRC32C).
    #[arg(long)]
    digest: bool,
    /// `tcp` (NVMe/TCP) or `rdma` (NVMe/RDMA; needs nvmetro-perf built with `--features rdma`).
    #[arg(long, default_value = "tcp", value_parser = ["tcp", "rdma"])]
    transport: String,
    /// Keep-alive timeout asked for at Connect, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    kato: u32,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the latency distribution as an SVG plot here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// No live progress line.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct SuiteArgs {
    /// The nvmetro-tgt binary (default: next to this one).
    #[arg(long)]
    target_bin: Option<PathBuf>,
    /// Where the Markdown table and JSON go.
    #[arg(long, default_value = "bench-results.md")]
    out: PathBuf,
    /// Measured time per case.
    #[arg(long, default_value = "10s")]
    time: String,
    #[arg(long, default_value_t = 0)]
    target_core: usize,
    #[arg(long, default_value_t = 1)]
    tool_core: usize,
    /// Runs per case; the run with the median IOPS is reported, with the spread.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("us") {
        (n, 0.000_001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.parse().with_context(|| format!("`{s}` is not a duration"))?;
    Ok(Duration::from_secs_f64(v * mult))
}

fn parse_bytes(s: &str) -> anyhow::Result<u64> {
    let lower = s.trim().to_ascii_lowercase();
    let digits = lower.find(|c: char| !c.is_ascii_digit()).unwrap_or(lower.len());
    let n: u64 = lower[..digits].parse().with_context(|| format!("`{s}` is not a size"))?;
    let mult = match lower[digits..].trim_end_matches(['b', 'i']) {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => bail!("`{s}` is not a size"),
    };
    Ok(n * mult)
}

/// CPU seconds used by the calling thread.
fn thread_cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|s| {
            let rest: Vec<&str> = s.rsplit(')').next()?.split_whitespace().collect();
            Some((rest.get(11)?.parse::<f64>().ok()? + rest.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

struct Outcome {
    total: JobResult,
    max_errors: u64,
}

fn run(a: &RunArgs) -> anyhow::Result<Outcome> {
    let nqn = a.nqn.clone().context("--nqn is required")?;
    let (pattern, read_pct) = match a.rw.as_str() {
        "read" => (Pattern::Sequential, 100),
        "write" => (Pattern::Sequential, 0),
        "randread" => (Pattern::Random, 100),
        "randwrite" => (Pattern::Random, 0),
        "rw" => (Pattern::Sequential, a.rwmixread.min(100)),
        "randrw" => (Pattern::Random, a.rwmixread.min(100)),
        other => bail!("--rw {other}: expected read, write, randread, randwrite, rw or randrw"),
    };
    if a.qd == 0 || a.connections == 0 {
        bail!("--qd and --connections must be at least 1");
    }
    let bs = parse_bytes(&a.bs)? as usize;
    let workers = usize::from(a.connections);
    let mut shared_paths = Vec::new();
    let mut monitors = Vec::new();
    let mut worker_queues: Vec<Vec<Option<nvmetro_perf::Queue>>> = (0..workers).map(|_| Vec::new()).collect();
    let mut geometry = None;
    let mut path_opts = Vec::new();
    for (i, addr) in a.addr.iter().enumerate() {
        let mut opts = ConnectOptions::new(*addr, &nqn);
        opts.hostnqn = a.hostnqn.clone();
        opts.io_queues = a.connections;
        opts.queue_size = (a.qd as u16 + 1).max(32);
        opts.busy_poll = a.busy_poll;
        opts.kato_ms = a.kato;
        opts.digests = Digests { header: a.digest, data: a.digest };
        opts.rdma = a.transport == "rdma";
        let shared = Arc::new(PathShared::new(&format!("path{i}:{addr}"), workers));
        let (admin, io) = match Host::connect(&opts) {
            Ok(mut h) => {
                if geometry.is_none() {
                    geometry = Some(h.namespace_size(a.nsid)?);
                }
                let (mut admin, io) = h.into_parts();
                shared.ana.store(ana_state(&mut admin, a.nsid).unwrap_or(0), Ordering::Release);
                (Some(admin), io.into_iter().map(Some).collect::<Vec<_>>())
            }
            Err(e) if a.addr.len() > 1 => {
                eprintln!("nvmetro-perf: path {addr} not reachable yet ({e}); will retry");
                shared.alive.store(false, Ordering::Release);
                (None, Vec::new())
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {addr} {nqn}")),
        };
        let mut io = io.into_iter();
        for wq in worker_queues.iter_mut() {
            wq.push(io.next().flatten());
        }
        monitors.push(PathMonitor::start(shared.clone(), admin, opts.clone(), a.nsid));
        shared_paths.push(shared);
        path_opts.push(opts);
    }
    let (blocks, lba_size) = geometry.context("no path could be connected")?;
    if bs == 0 || !bs.is_multiple_of(lba_size as usize) {
        bail!("--bs {bs} is not a multiple of the namespace's {lba_size}-byte blocks");
    }
    let usable = a.size.as_deref().map(parse_bytes).transpose()?.map_or(blocks, |b| (b / u64::from(lba_size)).min(blocks));
    let duration = parse_duration(&a.time)?;
    let ramp = parse_duration(&a.ramp)?;
    let per_conn = usable / u64::from(a.connections);
    if !a.quiet {
        println!(
            "nvmetro-perf: {} path(s) {} bs={} qd={} connections={} time={:?} ramp={:?}{}",
            a.addr.len(),
            a.rw,
            bs,
            a.qd,
            a.connections,
            duration,
            ramp,
            if a.verify { " verify" } else { "" }
        );
    }
    let counters: Vec<Arc<AtomicU64>> = (0..workers).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let done = Arc::new(AtomicBool::new(false));
    let progress = (!a.quiet).then(|| {
        let counters = counters.clone();
        let done = done.clone();
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut last = 0u64;
            let mut tick = 1u64;
            while !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(50));
                if t0.elapsed() >= Duration::from_secs(tick) {
                    let now: u64 = counters.iter().map(|c| c.load(Ordering::Relaxed)).sum();
                    println!("[{tick:>3}s] {:>9} IOPS", now - last);
                    last = now;
                    tick += 1;
                }
            }
        })
    });
    let threads: Vec<_> = worker_queues
        .into_iter()
        .enumerate()
        .map(|(i, queues)| {
            let wl = Workload {
                nsid: a.nsid,
                pattern,
                read_pct,
                block_size: bs,
                qd: a.qd,
                duration,
                ramp,
                max_ios: a.number_ios,
                rate: a.rate.map(|r| (r / u64::from(a.connections)).max(1)),
                verify: a.verify,
                region: (i as u64 * per_conn, per_conn),
                seed: 0x5eed + i as u64,
            };
            let core = (!a.cores.is_empty()).then(|| a.cores[i % a.cores.len()]);
            let mut paths: Vec<PathIo> = shared_paths.iter().cloned().zip(queues).map(|(s, q)| PathIo::new(s, q)).collect();
            let counter = counters[i].clone();
            let quiet = a.quiet;
            std::thread::spawn(move || -> Result<_, nvmetro_perf::HostError> {
                if let Some(c) = core {
                    let _ = nvmetro_ffi::pin_current_thread(c);
                }
                let mut gens = HashMap::new();
                let learned = if wl.verify { Some(load::learn_stamps(&mut paths, &wl, lba_size, &mut gens)?) } else { None };
                if let (Some(l), false) = (learned, quiet) {
                    println!(
                        "verify: connection {i} found {} unit(s) stamped by an earlier run, {} zero, {} with other data, {} unreadable",
                        l.stamped, l.zero, l.foreign, l.unreadable
                    );
                }
                let cpu0 = thread_cpu_seconds();
                let r = load::run_paths(&mut paths, &wl, lba_size, &mut gens, i, Some(&counter));
                let cpu = thread_cpu_seconds() - cpu0;
                let per_path: Vec<JobResult> = paths.into_iter().map(|p| p.result).collect();
                r.map(|r| (r, per_path, cpu, core))
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in threads {
        results.push(t.join().map_err(|_| anyhow::anyhow!("load thread panicked"))??);
    }
    done.store(true, Ordering::Relaxed);
    if let Some(p) = progress {
        let _ = p.join();
    }
    for m in monitors {
        m.stop();
    }
    let mut total = JobResult::empty();
    let mut per_path: Vec<JobResult> = (0..shared_paths.len()).map(|_| JobResult::empty()).collect();
    let mut cpu = Vec::new();
    for (r, paths, secs, core) in &results {
        total.merge(r);
        for (acc, p) in per_path.iter_mut().zip(paths) {
            acc.merge(p);
        }
        cpu.push(json!({"core": core, "cpu_percent": 100.0 * secs / total.elapsed.max(Duration::from_millis(1)).as_secs_f64()}));
    }
    let stalls: Vec<f64> = total.stalls.iter().map(|s| s.duration.as_secs_f64() * 1000.0).collect();
    let doc = json!({
        "paths": a.addr.iter().map(|x| x.to_string()).collect::<Vec<_>>(), "nqn": nqn, "rw": a.rw, "bs": bs, "qd": a.qd,
        "connections": a.connections, "total": report::result_json(&total),
        "per_path": shared_paths.iter().zip(&per_path).map(|(s, r)| json!({"path": s.name, "figures": report::result_json(r)})).collect::<Vec<_>>(),
        "cpu_per_connection": cpu,
        "stalls_ms": stalls,
        "max_stall_ms": stalls.iter().copied().fold(0.0, f64::max),
        "verify_mismatches": total.mismatches.len(),
    });
    if !a.quiet {
        println!("{}", report::summary_line("total", &total));
        if shared_paths.len() > 1 {
            for (s, r) in shared_paths.iter().zip(&per_path) {
                println!("{}", report::summary_line(&s.name, r));
            }
        }
        for (i, c) in doc["cpu_per_connection"].as_array().into_iter().flatten().enumerate() {
            let core = c["core"].as_u64().map_or("unpinned".to_string(), |n| format!("on core {n}"));
            println!("cpu: connection {i} ({core}) used {:.0}% of a core", c["cpu_percent"].as_f64().unwrap_or(0.0));
        }
        if !stalls.is_empty() {
            println!(
                "path changes: {} stall(s), longest {:.1} ms (I/O stood still from the failure to the next success)",
                stalls.len(),
                doc["max_stall_ms"].as_f64().unwrap_or(0.0)
            );
        }
    }
    if let Some(path) = &a.svg {
        let mut curves = vec![("total", &total.latency_ns)];
        if shared_paths.len() > 1 {
            for (s, r) in shared_paths.iter().zip(&per_path) {
                curves.push((s.name.as_str(), &r.latency_ns));
            }
        }
        let title = format!("{} bs={} qd={} — latency by percentile", a.rw, bs, a.qd);
        std::fs::write(path, report::svg_plot(&title, &curves)).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&doc)?).with_context(|| format!("writing {}", path.display()))?;
    }
    for m in total.mismatches.iter().take(10) {
        eprintln!("VERIFY MISMATCH at LBA {}: expected generation {}, found {}", m.lba, m.expected_generation, m.found);
    }
    Ok(Outcome { total, max_errors: a.max_errors })
}

/// The run's verdict: verify mismatches, more failed commands than `--max-errors`, or no command
/// completed at all (no usable path, say) fail it.
fn check(o: &Outcome) -> anyhow::Result<()> {
    if !o.total.mismatches.is_empty() {
        bail!("{} blocks failed verification", o.total.mismatches.len());
    }
    if o.total.errors > o.max_errors {
        bail!(
            "{} commands failed (more than --max-errors {}); first: {}",
            o.total.errors,
            o.max_errors,
            o.total.first_error.clone().unwrap_or_default()
        );
    }
    if o.total.ios() == 0 {
        bail!("no command completed (errors {}): no usable path, or the target did not answer", o.total.errors);
    }
    Ok(())
}

struct Case {
    name: &'static str,
    rw: &'static str,
    bs: usize,
    qd: usize,
    busy: bool,
    goal: &'static str,
}

const CASES: [Case; 4] = [
    Case { name: "8k randwrite QD1", rw: "randwrite", bs: 8192, qd: 1, busy: true, goal: "p50 <= 24 us, p99.9 <= 70 us" },
    Case { name: "8k randwrite QD32", rw: "randwrite", bs: 8192, qd: 32, busy: false, goal: ">= 210,000 IOPS" },
    Case { name: "4k randread QD32", rw: "randread", bs: 4096, qd: 32, busy: false, goal: ">= 440,000 IOPS" },
    Case { name: "128k seqwrite QD8", rw: "write", bs: 131072, qd: 8, busy: false, goal: "-" },
];

fn goal_met(case: &Case, r: &JobResult) -> &'static str {
    let iops = r.ios() as f64 / r.elapsed.as_secs_f64().max(1e-9);
    let h = &r.latency_ns;
    let met = match case.name {
        "8k randwrite QD1" => us(h.value_at_quantile(0.5)) <= 24.0 && us(h.value_at_quantile(0.999)) <= 70.0,
        "8k randwrite QD32" => iops >= 210_000.0,
        "4k randread QD32" => iops >= 440_000.0,
        _ => return "-",
    };
    if met {
        "met"
    } else {
        "not met"
    }
}

fn suite(s: &SuiteArgs) -> anyhow::Result<()> {
    let bin = match &s.target_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("nvmetro-tgt"),
    };
    let time = s.time.clone();
    let dur = parse_duration(&time)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let dir = std::env::temp_dir().join(format!("nvmetro-suite-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join("target.toml");
    std::fs::write(
        &cfg,
        format!(
            "[target]\ncores = [{}]\npoll_mode = \"busy\"\n[[bdev]]\nname = \"m\"\nkind = \"malloc\"\nsize = \"512MiB\"\n\
             [[subsystem]]\nnqn = \"nqn.2026-11.io.nvmetro:suite\"\nallow_any_host = true\n[[subsystem.namespace]]\nnsid = 1\nbdev = \"m\"\n\
             [[listener]]\naddress = \"127.0.0.1:{port}\"\n",
            s.target_core
        ),
    )?;
    let mut child = std::process::Command::new(&bin)
        .arg("--config")
        .arg(&cfg)
        .arg("--log")
        .arg("warn")
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("nvmetro-tgt did not start listening");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = nvmetro_ffi::pin_current_thread(s.tool_core);
    let mut rows = Vec::new();
    let mut docs = Vec::new();
    let mut targets = Vec::new();
    let mut spreads = Vec::new();
    let mut outcome = Ok(());
    for case in &CASES {
        let args = RunArgs {
            addr: vec![addr],
            nqn: Some("nqn.2026-11.io.nvmetro:suite".into()),
            hostnqn: "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-6e766d657472".into(),
            rw: case.rw.into(),
            rwmixread: 0,
            bs: case.bs.to_string(),
            qd: case.qd,
            time: time.clone(),
            ramp: "1s".into(),
            number_ios: None,
            rate: None,
            connections: 1,
            cores: vec![s.tool_core],
            nsid: 1,
            size: None,
            verify: false,
            max_errors: 0,
            busy_poll: case.busy,
            digest: false,
            transport: "tcp".into(),
            kato: 5000,
            json: None,
            svg: None,
            quiet: true,
        };
        let mut runs = Vec::new();
        for _ in 0..s.runs.max(1) {
            match run(&args) {
                Ok(r) => runs.push(r.total),
                Err(e) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        if outcome.is_err() {
            break;
        }
        let iops = |x: &JobResult| x.ios() as f64 / x.elapsed.as_secs_f64().max(1e-9);
        runs.sort_by(|a, b| iops(a).total_cmp(&iops(b)));
        spreads.push((iops(&runs[0]), iops(&runs[runs.len() - 1])));
        targets.push(runs.swap_remove(runs.len() / 2));
    }
    // The target busy-polls its core: stop it before measuring the floors on that core.
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    outcome?;
    for ((case, t), (lo, hi)) in CASES.iter().zip(&targets).zip(&spreads) {
        // The floor: same sizes, depth and polling over a bare echo pinned like the target.
        let (req, resp) = if case.rw.contains("read") { (72, 24 + 24 + case.bs) } else { (72 + case.bs, 24) };
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let echo_addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let core = s.target_core;
        let server = std::thread::spawn(move || {
            let _ = nvmetro_ffi::pin_current_thread(core);
            echo::serve(listener, flag)
        });
        let floor = echo::run(echo_addr, req, resp, case.qd, dur, Duration::from_secs(1), case.busy)?;
        stop.store(true, Ordering::Relaxed);
        let _ = server.join();
        let iops = |x: &JobResult| x.ios() as f64 / x.elapsed.as_secs_f64().max(1e-9);
        let p = |x: &JobResult, q: f64| us(x.latency_ns.value_at_quantile(q));
        println!(
            "{}: {:.0} IOPS p50 {:.1} us (floor {:.0} IOPS p50 {:.1} us)",
            case.name,
            iops(t),
            p(t, 0.5),
            iops(&floor),
            p(&floor, 0.5)
        );
        rows.push(format!(
            "| {} | {:.0} ({:.0}-{:.0}) | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {:+.1} | {:.2} | {} | {} |",
            case.name,
            iops(t),
            lo,
            hi,
            p(t, 0.5),
            p(t, 0.99),
            p(t, 0.999),
            iops(&floor),
            p(&floor, 0.5),
            p(t, 0.5) - p(&floor, 0.5),
            iops(t) / iops(&floor).max(1e-9),
            case.goal,
            goal_met(case, t)
        ));
        docs.push(json!({"case": case.name, "target": report::result_json(t), "runs": s.runs, "iops_min": lo, "iops_max": hi, "floor": report::result_json(&floor),
            "target_overhead_p50_us": p(t, 0.5) - p(&floor, 0.5), "iops_ratio_to_floor": iops(t) / iops(&floor).max(1e-9),
            "goal": case.goal, "goal_met": goal_met(case, t)}));
    }
    let md = format!(
        "# nvmetro benchmark suite\n\nTarget (busy polling) on core {}, nvmetro-perf on core {}, 512 MiB malloc namespace, {} per run after 1 s ramp; \
         each case is run {} times and the run with the median IOPS is shown (IOPS range of all runs in brackets).\n\
         The floor is a bare loopback TCP echo with the same message sizes, queue depth and polling, measured in the same run.\n\n\
         | case | IOPS (range) | p50 us | p99 us | p99.9 us | floor IOPS | floor p50 us | target cost p50 us | IOPS / floor | goal | goal |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|\n{}\n\n```json\n{}\n```\n",
        s.target_core,
        s.tool_core,
        time,
        s.runs,
        rows.join("\n"),
        serde_json::to_string_pretty(&docs)?
    );
    std::fs::write(&s.out, &md).with_context(|| format!("writing {}", s.out.display()))?;
    println!("{md}");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        None => check(&run(&cli.run)?),
        Some(Cmd::Run(a)) => check(&run(&a)?),
        Some(Cmd::Compare { a, b }) => {
            let read = |p: &PathBuf| -> anyhow::Result<Value> {
                serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
                    .with_context(|| format!("{} is not JSON", p.display()))
            };
            println!("A = {}\nB = {}\n\n{}", a.display(), b.display(), report::compare(&read(&a)?, &read(&b)?));
            Ok(())
        }
        Some(Cmd::Suite(s)) => suite(&s),
        Some(Cmd::EchoServer { addr, core }) => {
            if let Some(c) = core {
                nvmetro_ffi::pin_current_thread(c)?;
            }
            // Runs until killed.
            echo::serve(std::net::TcpListener::bind(addr)?, Arc::new(AtomicBool::new(false)))?;
            Ok(())
        }
    }
}
