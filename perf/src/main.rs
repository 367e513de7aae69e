//! `nvmetro-perf`: NVMe/TCP load generator with latency percentiles and data verification.

use anyhow::{bail, Context};
use clap::Parser;
use nvmetro_perf::load::{self, JobResult, Pattern, Workload};
use nvmetro_perf::{ConnectOptions, Host};
use nvmetro_proto::pdu::Digests;
use serde_json::json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(name = "nvmetro-perf", version, about = "NVMe/TCP load generator: IOPS, latency percentiles, verification")]
struct Args {
    /// Target address, e.g. 127.0.0.1:4420.
    #[arg(long)]
    addr: SocketAddr,
    /// Subsystem NQN.
    #[arg(long)]
    nqn: String,
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
    /// Connections (I/O queues); each runs on its own thread, pinned to a core.
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
    /// Stamp written blocks and check every read; a mismatch fails the run.
    #[arg(long)]
    verify: bool,
    /// Spin on the socket instead of sleeping (lowest latency, one busy core per connection).
    #[arg(long)]
    busy_poll: bool,
    /// Header and data digests (CRC32C).
    #[arg(long)]
    digest: bool,
    /// Write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
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
    let lower = s.to_ascii_lowercase();
    let (num, mult) = match lower.trim_end_matches(['b', 'i']).chars().last() {
        Some('k') => (&lower[..lower.find('k').unwrap_or(0)], 1u64 << 10),
        Some('m') => (&lower[..lower.find('m').unwrap_or(0)], 1 << 20),
        Some('g') => (&lower[..lower.find('g').unwrap_or(0)], 1 << 30),
        _ => (lower.as_str(), 1),
    };
    Ok(num.trim().parse::<u64>().with_context(|| format!("`{s}` is not a size"))? * mult)
}

fn cpu_seconds() -> f64 {
    // utime + stime of this process, in clock ticks (100 per second on Linux).
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit(')').next()?.split_whitespace().collect::<Vec<_>>().clone();
            Some((rest.get(11)?.parse::<f64>().ok()? + rest.get(12)?.parse::<f64>().ok()?) / 100.0)
        })
        .unwrap_or(0.0)
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
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
    let mut opts = ConnectOptions::new(a.addr, &a.nqn);
    opts.hostnqn = a.hostnqn.clone();
    opts.io_queues = a.connections;
    opts.queue_size = (a.qd as u16 + 1).max(32);
    opts.busy_poll = a.busy_poll;
    opts.digests = Digests { header: a.digest, data: a.digest };
    let mut host = Host::connect(&opts).with_context(|| format!("connecting to {} {}", a.addr, a.nqn))?;
    let (blocks, lba_size) = host.namespace_size(a.nsid)?;
    if bs == 0 || !bs.is_multiple_of(lba_size as usize) {
        bail!("--bs {bs} is not a multiple of the namespace's {lba_size}-byte blocks");
    }
    let usable = a.size.as_deref().map(parse_bytes).transpose()?.map_or(blocks, |b| (b / u64::from(lba_size)).min(blocks));
    let duration = parse_duration(&a.time)?;
    let ramp = parse_duration(&a.ramp)?;
    let (admin, queues) = host.into_parts();
    let keep_alive = nvmetro_perf::KeepAlive::start(admin, opts.kato_ms);
    let per_conn = usable / u64::from(a.connections);
    println!(
        "nvmetro-perf: {} {} bs={} qd={} connections={} time={:?} ramp={:?}{}",
        a.addr,
        a.rw,
        bs,
        a.qd,
        a.connections,
        duration,
        ramp,
        if a.verify { " verify" } else { "" }
    );
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let threads: Vec<_> = queues
        .into_iter()
        .enumerate()
        .map(|(i, mut q)| {
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
            std::thread::spawn(move || {
                if let Some(c) = core {
                    let _ = nvmetro_ffi::pin_current_thread(c);
                }
                let mut gens = HashMap::new();
                load::run(&mut q, &wl, lba_size, &mut gens)
            })
        })
        .collect();
    let mut per_path = Vec::new();
    for t in threads {
        per_path.push(t.join().map_err(|_| anyhow::anyhow!("load thread panicked"))??);
    }
    let wall = t0.elapsed();
    keep_alive.stop().context("keep-alive on the admin queue")?;
    let cpu = cpu_seconds() - cpu0;
    let mut total = JobResult::empty();
    for r in &per_path {
        total.merge(r);
    }
    let secs = total.elapsed.as_secs_f64().max(1e-9);
    let h = &total.latency_ns;
    let iops = total.ios() as f64 / secs;
    println!(
        "IOPS {:.0}  MiB/s {:.1}  reads {}  writes {}  errors {}  cpu {:.0}% of one core",
        iops,
        total.bytes as f64 / secs / (1 << 20) as f64,
        total.reads,
        total.writes,
        total.errors,
        100.0 * cpu / wall.as_secs_f64()
    );
    if total.ios() > 0 {
        println!(
            "latency us: min {:.1}  avg {:.1}  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  p99.99 {:.1}  max {:.1}",
            us(h.min()),
            h.mean() / 1000.0,
            us(h.value_at_quantile(0.5)),
            us(h.value_at_quantile(0.9)),
            us(h.value_at_quantile(0.99)),
            us(h.value_at_quantile(0.999)),
            us(h.value_at_quantile(0.9999)),
            us(h.max())
        );
    }
    if let Some(path) = &a.json {
        let pct = |q: f64| us(h.value_at_quantile(q));
        let doc = json!({
            "addr": a.addr.to_string(), "nqn": a.nqn, "rw": a.rw, "bs": bs, "qd": a.qd,
            "connections": a.connections, "seconds": secs, "iops": iops,
            "mib_s": total.bytes as f64 / secs / (1 << 20) as f64,
            "reads": total.reads, "writes": total.writes, "errors": total.errors,
            "cpu_percent": 100.0 * cpu / wall.as_secs_f64(),
            "latency_us": {"min": us(h.min()), "avg": h.mean() / 1000.0, "p50": pct(0.5), "p90": pct(0.9),
                "p99": pct(0.99), "p99.9": pct(0.999), "p99.99": pct(0.9999), "max": us(h.max())},
            "verify_mismatches": total.mismatches.len(),
        });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?).with_context(|| format!("writing {}", path.display()))?;
    }
    for m in total.mismatches.iter().take(10) {
        eprintln!("VERIFY MISMATCH at LBA {}: expected generation {}, found {}", m.lba, m.expected_generation, m.found);
    }
    if !total.mismatches.is_empty() {
        bail!("{} blocks failed verification", total.mismatches.len());
    }
    if total.errors > 0 {
        bail!("{} commands failed; first: {}", total.errors, total.first_error.unwrap_or_default());
    }
    Ok(())
}
