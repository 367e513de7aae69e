//! `nvmetro-witness --config conf/witness.toml`: the metro witness for a third site.
//!
//! Answers the sites' reports and elections over UDP (see `nvmetro_bdev::mirror::witness`). Every
//! decision that changes its state is written to the state file (write, fsync, rename, fsync of
//! the directory) before the reply leaves, so a restarted witness decides exactly as before. It
//! holds no user data.
//!
//! `nvmetro-witness --config conf/witness.toml status [--json]` asks the running witness (over the
//! same authenticated UDP protocol, with the config's secret) what it knows: the authority per
//! mirror, the site that holds a grant, and each site's last report.

use anyhow::Context;
use clap::Parser;
use nvmetro_bdev::mirror::witness::{Ask, Request, StatusReply, Verdict, WitnessState, WitnessStatus};
use std::io::Write;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Parser, Debug)]
#[command(name = "nvmetro-witness", version, about = "nvmetro metro witness: decides which site serves when the sites lose each other")]
struct Args {
    /// Configuration file (TOML): listen, secret or secret_file, state.
    #[arg(long, short)]
    config: PathBuf,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
    #[arg(long, default_value = "info", env = "NVMETRO_LOG")]
    log: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Ask the running witness what it knows: authority per mirror, grants, the sites' last reports.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Asks the witness at `listen` (its loopback address when it listens on every address).
fn query_status(listen: std::net::SocketAddr, secret: &[u8]) -> anyhow::Result<WitnessStatus> {
    let mut to = listen;
    if to.ip().is_unspecified() {
        to.set_ip(if to.is_ipv4() { std::net::Ipv4Addr::LOCALHOST.into() } else { std::net::Ipv6Addr::LOCALHOST.into() });
    }
    let sock = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }).context("bind a UDP socket")?;
    sock.set_read_timeout(Some(Duration::from_millis(700)))?;
    let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    let ask = Request { ask: Ask::Status, site: 0, in_sync: false, nonce, seq: 0, current: 0, bitmap: 0, next: 0, resource: String::new() };
    let mut buf = vec![0u8; 65536];
    for _ in 0..3 {
        sock.send_to(&ask.encode(secret), to).with_context(|| format!("send to the witness at {to}"))?;
        let deadline = Instant::now() + Duration::from_millis(700);
        while Instant::now() < deadline {
            let Ok((n, from)) = sock.recv_from(&mut buf) else { break };
            if from != to {
                continue;
            }
            match StatusReply::parse(&buf[..n], secret) {
                Ok(r) if r.nonce == nonce => return Ok(r.status),
                Ok(_) => {}
                Err(e) => anyhow::bail!("the witness at {to} answered, but: {e}"),
            }
        }
    }
    anyhow::bail!("no answer from the witness at {to} (is it running? same secret?)")
}

fn print_status(listen: std::net::SocketAddr, st: &WitnessStatus) {
    println!("witness {listen}: {} mirror(s)", st.resources.len() + st.left_out);
    if st.left_out > 0 {
        println!("({} more not shown: the answer fits one datagram)", st.left_out);
    }
    for r in &st.resources {
        let authority = if r.authority.is_empty() { "not known yet".to_string() } else { format!("generation {}", r.authority) };
        let holder = r
            .holder
            .map_or("no grant outstanding (both sites last seen in sync)".to_string(), |s| format!("site {s} serves alone under a grant"));
        println!("mirror {}: authority {authority}; {holder}", r.name);
        for s in &r.sites {
            let sync = if s.in_sync { "in sync with its peer" } else { "not in sync" };
            println!("  site {}: holds generation {}, {sync}, last report {} ms ago", s.site, s.current, s.last_report_ms_ago);
        }
    }
}

/// The largest status answer (one UDP datagram, with room to spare).
const MAX_STATUS_DATAGRAM: usize = 60_000;

fn load_state(path: &Path) -> anyhow::Result<WitnessState> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).with_context(|| format!("{}: damaged witness state", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(WitnessState::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

fn store_state(path: &Path, state: &WitnessState) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(serde_json::to_string_pretty(state).map_err(std::io::Error::other)?.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Makes sure decisions can be kept before any is taken: creates the state directory, reads the
/// state, and writes it back once (so a witness that cannot persist refuses to start instead of
/// announcing itself ready).
fn open_state(path: &Path) -> anyhow::Result<WitnessState> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create the witness state directory {}", dir.display()))?;
    }
    let state = load_state(path)?;
    store_state(path, &state).with_context(|| format!("cannot persist the witness state to {}", path.display()))?;
    Ok(state)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&args.log).context("bad --log filter")?)
        .with_target(false)
        // Colour codes only on a terminal: log files and journald get plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    if args.check {
        if let Err(errors) = nvmetro_conf::check_witness(&args.config) {
            for e in &errors {
                eprintln!("{e}");
            }
            std::process::exit(1);
        }
        println!("configuration is valid");
        return Ok(());
    }
    let config = nvmetro_conf::load_witness(&args.config)?;
    if let Some(Command::Status { json }) = args.command {
        let st = query_status(config.listen, &config.secret)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&st)?);
        } else {
            print_status(config.listen, &st);
        }
        return Ok(());
    }
    let mut state = open_state(&config.state)?;
    let sock = UdpSocket::bind(config.listen).with_context(|| format!("bind {}", config.listen))?;
    tracing::info!(listen = %config.listen, state = %config.state.display(), resources = state.resources.len(), "witness ready");
    let epoch = Instant::now();
    let mut buf = [0u8; 1024];
    let mut last_auth_warning: Option<Instant> = None;
    loop {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("receive"),
        };
        let req = match Request::parse(&buf[..n], &config.secret) {
            Ok(r) => r,
            Err(e) => {
                if last_auth_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
                    last_auth_warning = Some(Instant::now());
                    tracing::warn!(%from, "datagram dropped: {e}");
                }
                continue;
            }
        };
        if req.ask == Ask::Status {
            let mut status = state.status(epoch.elapsed().as_millis() as u64);
            // One datagram: as many mirrors as fit, and how many were left out.
            let mut bytes = StatusReply { nonce: req.nonce, status: status.clone() }.encode(&config.secret);
            while bytes.len() > MAX_STATUS_DATAGRAM && !status.resources.is_empty() {
                status.resources.truncate(status.resources.len() * 3 / 4);
                status.left_out = state.resources.len() - status.resources.len();
                bytes = StatusReply { nonce: req.nonce, status: status.clone() }.encode(&config.secret);
            }
            if let Err(e) = sock.send_to(&bytes, from) {
                tracing::warn!(%from, "status answer not sent: {e}");
            }
            continue;
        }
        let reply = state.handle(&req, epoch.elapsed().as_millis() as u64);
        if std::mem::take(&mut state.changed) {
            if let Err(e) = store_state(&config.state, &state) {
                // Unrecorded decisions are not handed out: the sites retry.
                tracing::error!(state = %config.state.display(), "cannot persist witness state: {e}; not answering");
                state = load_state(&config.state).unwrap_or_default();
                continue;
            }
            let r = &state.resources[&req.resource];
            tracing::info!(resource = %req.resource, site = req.site, authority = format!("{:x}", r.authority), holder = r.holder, "witness state changed");
        }
        if reply.verdict != Verdict::Noted {
            tracing::info!(resource = %req.resource, site = req.site, verdict = ?reply.verdict, "election");
        }
        let _ = sock.send_to(&reply.encode(&config.secret), from);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nvmetro-witness-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_missing_state_directory_is_created_and_written_before_ready() {
        let dir = scratch("create");
        let state = dir.join("not/yet/state.json");
        let w = open_state(&state).unwrap();
        assert!(w.resources.is_empty());
        assert!(state.is_file(), "the state is persisted before the witness serves");
        // A restart reads it back.
        open_state(&state).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_state_directory_that_cannot_be_created_refuses_the_start() {
        let dir = scratch("refuse");
        std::fs::write(dir.join("plain"), b"").unwrap();
        let state = dir.join("plain/sub/state.json");
        let e = format!("{:#}", open_state(&state).unwrap_err());
        assert!(e.contains(&dir.join("plain/sub").display().to_string()), "{e}");
        assert!(e.contains("cannot create the witness state directory"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_state_that_cannot_be_written_refuses_the_start() {
        let dir = scratch("unwritable");
        // The state path is a directory: reading and replacing it both fail.
        let state = dir.join("state.json");
        std::fs::create_dir(&state).unwrap();
        let e = format!("{:#}", open_state(&state).unwrap_err());
        assert!(e.contains(&state.display().to_string()), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
