//! `nvmetro-tgt --config FILE`: runs the target until SIGINT or SIGTERM; SIGHUP reloads FILE.

use anyhow::Context;
use clap::Parser;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[derive(Parser, Debug)]
#[command(name = "nvmetro-tgt", version, about = "nvmetro: a polled-mode NVMe-over-Fabrics (NVMe/TCP) target")]
struct Args {
    /// Configuration file (TOML). Without it, a 1 GiB RAM namespace is served on 127.0.0.1:4420.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
    /// Log filter (tracing syntax), e.g. "info" or "nvmetro_tgt=debug".
    #[arg(long, default_value = "info", env = "NVMETRO_LOG")]
    log: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("bad --log filter")?)
        .with_target(false)
        // Colour codes only on a terminal: log files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let config = match &args.config {
        // Validated, and every path the file names can be written: a start that would fail on
        // one (a metadata directory that does not exist) refuses before creating any file.
        Some(path) => nvmetro_conf::check(path).unwrap_or_else(|errors| {
            for e in &errors {
                eprintln!("{e}");
            }
            std::process::exit(1)
        }),
        None => nvmetro_conf::parse(nvmetro_conf::DEFAULT_CONFIG, "(built-in default config)")?,
    };
    config.check_transports(cfg!(feature = "rdma"))?;
    if args.check {
        println!("configuration is valid");
        return Ok(());
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let hangup = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGHUP, hangup.clone())?;
    // Management and metrics are bound first: once hosts can connect, operators can too.
    let mgmt = match &config.socket {
        Some(path) => Some((nvmetro_tgt::mgmt::bind(path).with_context(|| format!("management socket {}", path.display()))?, path.clone())),
        None => None,
    };
    let metrics = match config.metrics {
        Some(addr) => Some(std::net::TcpListener::bind(addr).with_context(|| format!("metrics endpoint {addr}"))?),
        None => None,
    };
    let running = nvmetro_tgt::start(config, args.config.clone())?;
    if let Some((listener, path)) = mgmt {
        nvmetro_tgt::mgmt::serve(listener, running.target.clone())?;
        tracing::info!(socket = %path.display(), "management socket ready");
    }
    if let Some(listener) = metrics {
        let bound = nvmetro_tgt::metrics::serve(listener, running.target.clone())?;
        tracing::info!(address = %bound, "metrics at /metrics");
    }
    for s in running.target.subsystems().iter() {
        tracing::info!(nqn = %s.config().nqn, namespaces = s.namespaces().len(), "subsystem ready");
    }
    running.target.refresh_ana();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(std::time::Duration::from_millis(20));
        running.target.refresh_ana();
        if hangup.swap(false, Ordering::AcqRel) {
            match nvmetro_tgt::reload::reload(&running.target, false) {
                Ok(o) if o.changes.is_empty() => tracing::info!("SIGHUP: the config file has not changed"),
                Ok(_) => {}
                // The running config stays; the error names the file, line and key.
                Err(e) => tracing::error!("SIGHUP: reload refused: {e}"),
            }
        }
    }
    tracing::info!("stopping");
    // Before the reactors stop (a link may run on one): the peer takes over first.
    running.target.depart_mirrors();
    let socket = running.target.config().socket.clone();
    let target = running.target.clone();
    running.stop();
    target.stop_dr();
    if let Some(path) = socket {
        // A clean stop leaves no socket behind.
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
