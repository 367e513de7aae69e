//! `nvmetro --config FILE status`: asks the running target (over the management socket that FILE
//! names) for its state, and shows it. `nvmetro --config FILE rpc METHOD` prints any method's
//! JSON result. `nvmetro --config FILE error BDEV [--set JSON | --clear]` shows or changes an
//! error bdev's fault rules. `nvmetro --config FILE events [--json]` streams every state change
//! (`status --watch` shows the status again at each one).

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(name = "nvmetro", version, about = "Talk to a running nvmetro-tgt")]
struct Args {
    /// The target's configuration file (it names the management socket).
    #[arg(long, short)]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum DrCmd {
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// At the DR site: the group's image serves hosts read-write (its namespaces turn from
    /// Inaccessible to Optimized) and the stream from the production site is refused from then
    /// on. Refused while the production site streams here or the image is not consistent.
    Promote {
        /// The DR group's name.
        group: String,
        /// Promote even while the production site streams here or the image is not consistent.
        #[arg(long)]
        force: bool,
        /// Do not ask for confirmation (asked only with --force).
        #[arg(long)]
        yes: bool,
    },
    /// At the DR site, a DR test that does not stop replication: `start` gives the site's hosts
    /// a writable point-in-time view of the group's image (its namespaces turn Optimized) while
    /// the stream keeps being applied; `stop` discards the view and everything written to it.
    Test {
        /// The DR group's name.
        group: String,
        #[arg(value_parser = ["start", "stop"])]
        action: String,
    },
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Namespaces, ANA states, and for mirrors: roles, disk and link states, sync progress.
    Status {
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
        /// Show the status again at every state change (and every 2 s), until interrupted.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
    },
    /// Stream every state change (mirror disk/link/access/role/failure, resync start, progress
    /// and end, witness reachability, ANA changes, controllers per host, reloads), the current
    /// state first, until interrupted.
    Events {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Disaster recovery: `nvmetro dr status` shows every consistency group streamed from here
    /// (mode, connection, recovery point, full copy) and every DR replica applied here.
    Dr {
        #[command(subcommand)]
        cmd: DrCmd,
    },
    /// Call a management method and print its JSON result; PARAMS is a JSON object.
    Rpc { method: String, params: Option<String> },
    /// Re-read the target's config file and apply what changed, live (`--dry-run`: only show it).
    Reload {
        #[arg(long)]
        dry_run: bool,
    },
    /// Metro, manual failback: let a resynced mirror leg serve again.
    Failback {
        /// The mirror bdev's name.
        bdev: String,
    },
    /// Metro, disaster: make this site serve alone while its peer AND the witness are both lost
    /// (DRBD's `primary --force`). Asks for confirmation unless `--yes`.
    Promote {
        /// The mirror bdev's name.
        bdev: String,
        /// Required: this overrides the witness's protection against two writers.
        #[arg(long)]
        force: bool,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Metro, planned maintenance: move write ordering and the hosts' Optimized paths to the
    /// other site, with no failed host I/O (run it at the site that orders writes). Afterwards
    /// this site can be stopped (SIGTERM) without a failover stall.
    Switchover {
        /// The mirror bdev's name.
        bdev: String,
    },
    /// A mirror leg whose device failed: retry the resync from the peer now.
    Resync {
        /// The mirror bdev's name.
        bdev: String,
    },
    /// An error bdev: show its fault rules and what they injected; `--set` replaces the rules,
    /// `--clear` removes them.
    Error {
        /// The error bdev's name.
        bdev: String,
        /// The new rules: JSON, one rule or an array, e.g. '{"op":"write","error":"nospace"}'.
        #[arg(long, conflicts_with = "clear")]
        set: Option<String>,
        /// Remove every rule: commands pass through again.
        #[arg(long)]
        clear: bool,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
}

/// An error bdev's state as `bdev_error_stats` reports it, for operators.
fn show_error(bdev: &str, st: &Value) {
    let inj = &st["injected"];
    println!(
        "{bdev} (over {}): injected {} errors, {} delayed, {} dropped",
        st["base"].as_str().unwrap_or("?"),
        inj["errors"],
        inj["delayed"],
        inj["dropped"]
    );
    let rules = st["rules"].as_array().map(Vec::as_slice).unwrap_or_default();
    if rules.is_empty() {
        println!("  no rules: every command passes");
    }
    for (i, r) in rules.iter().enumerate() {
        println!("  rule {}: {}  (matched {}, fired {})", i + 1, r["rule"], r["matched"], r["fired"]);
    }
}

fn rpc(socket: &PathBuf, method: &str, params: Value) -> anyhow::Result<Value> {
    let mut s = UnixStream::connect(socket).with_context(|| format!("cannot reach the target at {} (is it running?)", socket.display()))?;
    writeln!(s, "{}", json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let reply: Value = serde_json::from_str(&line).context("malformed reply")?;
    if let Some(e) = reply.get("error") {
        bail!("{method}: {}", e["message"]);
    }
    Ok(reply["result"].clone())
}

fn bytes(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

/// The management socket a config file names. A reload must reach the target even when the
/// edited file is broken (the target then says why), so this falls back to reading just
/// `[target] socket` from the text.
fn socket_of(path: &std::path::Path) -> anyhow::Result<PathBuf> {
    match nvmetro_conf::load(path) {
        Ok(c) => c.socket.with_context(|| format!("{}: no [target] socket is configured", path.display())),
        Err(e) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
            let mut in_target = false;
            for line in text.lines().map(str::trim) {
                if line.starts_with('[') {
                    in_target = line == "[target]";
                } else if let Some(v) = line.strip_prefix("socket").map(str::trim).and_then(|r| r.strip_prefix('=')).filter(|_| in_target) {
                    return Ok(PathBuf::from(v.trim().trim_matches('"')));
                }
            }
            Err(e.into())
        }
    }
}

/// The target's event stream, one parsed event per message, read on a thread of its own.
fn subscribe(socket: &PathBuf) -> anyhow::Result<std::sync::mpsc::Receiver<Value>> {
    let mut s = UnixStream::connect(socket).with_context(|| format!("cannot reach the target at {} (is it running?)", socket.display()))?;
    writeln!(s, "{}", json!({"jsonrpc": "2.0", "id": 1, "method": "nvmetro_events"}))?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { return };
            let Ok(e) = serde_json::from_str::<Value>(&line) else { continue };
            if tx.send(e).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// An event as a log line: `TIME CHANGE TYPE OBJECT: OLD -> NEW`.
fn event_line(e: &Value) -> String {
    let secs = e["time"].as_f64().unwrap_or(0.0);
    let when = humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_secs_f64(secs));
    let what = match e["old"].as_str() {
        Some(old) => format!("{old} -> {}", e["new"].as_str().unwrap_or("?")),
        None => e["new"].as_str().unwrap_or("?").to_string(),
    };
    let detail = e.get("detail").map_or(String::new(), |d| format!("  {d}"));
    format!(
        "{when} {} {} {}: {what}{detail}",
        e["change"].as_str().unwrap_or("?"),
        e["type"].as_str().unwrap_or("?"),
        e["object"].as_str().unwrap_or("?")
    )
}

/// Asks the operator to type `name` (the `what`'s name) before a risky command goes on.
fn confirm(what: &str, name: &str) -> anyhow::Result<()> {
    eprint!("Type the {what}'s name ({name}) to go on: ");
    let mut answer = String::new();
    std::io::stdin().read_line(&mut answer)?;
    if answer.trim() != name {
        bail!("not confirmed: nothing changed");
    }
    Ok(())
}

/// The DR part of the status: one block per group and per replica.
fn print_dr(dr: &Value) {
    for g in dr["groups"].as_array().into_iter().flatten() {
        let ms = |v: &Value| v.as_u64().map_or("-".to_string(), |m| format!("{:.1} s", m as f64 / 1000.0));
        println!(
            "DR group {}  ({})  mode {}  to {}: {}",
            g["name"].as_str().unwrap_or("?"),
            g["members"].as_array().into_iter().flatten().filter_map(Value::as_str).collect::<Vec<_>>().join(", "),
            g["mode"].as_str().unwrap_or("?"),
            g["dr_site"].as_str().unwrap_or("?"),
            g["state"].as_str().unwrap_or("?")
        );
        println!(
            "  behind: {} writes, {}, {}  (RPO target {}{})  send buffer {} of {}",
            g["behind_writes"],
            bytes(g["behind_bytes"].as_u64().unwrap_or(0)),
            ms(&g["behind_ms"]),
            ms(&g["rpo_target_ms"]),
            if g["rpo_alarm"] == Value::Bool(true) { ", EXCEEDED" } else { "" },
            bytes(g["buffered_bytes"].as_u64().unwrap_or(0)),
            bytes(g["buffer_limit"].as_u64().unwrap_or(0))
        );
        if let Some(limit) = g["journal_limit"].as_u64() {
            println!(
                "  long-throw journal {} of {}  overflows {}",
                bytes(g["journal_bytes"].as_u64().unwrap_or(0)),
                bytes(limit),
                g["overflows"]
            );
        }
        let c = &g["copy"];
        if c.is_object() {
            println!(
                "  copy: {:.1}%  ({} of {})  speed {}/s  ETA {}  (the DR image is not consistent until it ends)",
                c["percent"].as_f64().unwrap_or(0.0),
                bytes(c["done_bytes"].as_u64().unwrap_or(0)),
                bytes(c["total_bytes"].as_u64().unwrap_or(0)),
                bytes(c["bytes_per_second"].as_u64().unwrap_or(0)),
                c["eta_seconds"].as_u64().map_or("-".into(), |s| format!("{s} s"))
            );
        }
    }
    for r in dr["replicas"].as_array().into_iter().flatten() {
        println!(
            "DR replica {}  ({})  listening on {}: {}  applied through write {}  image {}{}",
            r["name"].as_str().unwrap_or("?"),
            r["members"].as_array().into_iter().flatten().filter_map(Value::as_str).collect::<Vec<_>>().join(", "),
            r["listen"].as_str().unwrap_or("?"),
            if r["connected"] == Value::Bool(true) { "connected" } else { "waiting for the production site" },
            r["applied_seq"],
            if r["consistent"] == Value::Bool(true) { "consistent" } else { "INCONSISTENT (a full copy is under way or has not started)" },
            r["failed"].as_str().map_or(String::new(), |f| format!("  STOPPED: {f}"))
        );
        if r["promoted"] == Value::Bool(true) {
            println!("  PROMOTED: the members serve hosts read-write; the stream is refused");
        }
        if let Some(v) = r["last_consistent"].as_object() {
            println!(
                "  last consistent image kept (write {}, {} of it overwritten so far): a promotion rolls back to it",
                v["since_seq"],
                bytes(v["kept_bytes"].as_u64().unwrap_or(0))
            );
        }
        if let Some(v) = r["test_view"].as_object() {
            println!(
                "  DR TEST: hosts here use a writable view as of write {} ({} held); the stream keeps being applied",
                v["since_seq"],
                bytes(v["held_bytes"].as_u64().unwrap_or(0))
            );
        }
    }
}

fn print_status(st: &Value) {
    println!("nvmetro {} up {:.0} s", st["version"].as_str().unwrap_or("?"), st["uptime_ms"].as_f64().unwrap_or(0.0) / 1000.0);
    for s in st["subsystems"].as_array().into_iter().flatten() {
        println!("{}  ({} controllers)", s["nqn"].as_str().unwrap_or("?"), s["controllers"]);
        for ns in s["namespaces"].as_array().into_iter().flatten() {
            let ana: Vec<String> =
                ns["ana"].as_object().into_iter().flatten().map(|(l, v)| format!("{l} {}", v.as_str().unwrap_or("?"))).collect();
            println!(
                "  nsid {}  bdev {}  serving {}  ANA: {}",
                ns["nsid"],
                ns["bdev"].as_str().unwrap_or("?"),
                ns["serving"],
                ana.join(", ")
            );
            let m = &ns["mirror"];
            if m.is_object() {
                println!(
                    "    mirror: role {}  disk {}/{}  link {}  peer {}  lanes {}/{}{}",
                    m["role"].as_str().unwrap_or("?"),
                    m["disk"].as_str().unwrap_or("?"),
                    m["peer_disk"].as_str().unwrap_or("?"),
                    m["link"].as_str().unwrap_or("?"),
                    m["peer"].as_str().unwrap_or("?"),
                    m["lanes_up"].as_u64().unwrap_or(0),
                    m["lanes"].as_u64().unwrap_or(1),
                    match m["lanes_on_reactors"].as_u64().unwrap_or(0) {
                        0 => String::new(),
                        n => format!(" ({n} on reactors of their own)"),
                    }
                );
                let speed = m["sync_bytes_per_second"].as_u64().unwrap_or(0);
                println!(
                    "    out of sync {}  synced {}  speed {}/s  ETA {}  replication RTT {}",
                    bytes(m["out_of_sync_bytes"].as_u64().unwrap_or(0)),
                    m["sync_percent"].as_f64().map_or("- (no resync under way)".into(), |p| format!("{p:.1}%")),
                    bytes(speed),
                    m["eta_seconds"].as_u64().map_or("-".into(), |s| format!("{s} s")),
                    m["replication_rtt_us"].as_u64().map_or("-".into(), |u| format!("{u} us"))
                );
                if let Some(d) = m["last_link_down"].as_object() {
                    println!(
                        "    link last down {} s ago: {}  (up {} times since start)",
                        d["seconds_ago"],
                        d["why"].as_str().unwrap_or("?"),
                        m["link_ups"]
                    );
                }
                if let Some(f) = m["failure"].as_str() {
                    println!("    this leg FAILED: {f} (fenced; retries, or `nvmetro resync {}`)", ns["bdev"].as_str().unwrap_or("?"));
                }
                if let Some(f) = m["peer_failure"].as_str() {
                    println!("    the peer's leg FAILED: {f} (serving without it; its regions stay dirty)");
                }
                let x = &m["metro"];
                if x.is_object() {
                    println!(
                        "    metro: {}  ({})  witness {}  authority {} held by {}{}",
                        m["access"].as_str().unwrap_or("?"),
                        x["why"].as_str().unwrap_or(""),
                        if x["witness_reachable"] == Value::Bool(true) {
                            format!("reachable (RTT {})", x["witness_rtt_us"].as_u64().map_or("-".into(), |u| format!("{u} us")))
                        } else {
                            format!(
                                "UNREACHABLE (last answer {})",
                                x["witness_seen_ms_ago"].as_u64().map_or("never".into(), |t| format!("{t} ms ago"))
                            )
                        },
                        x["witness_authority"].as_str().unwrap_or("?"),
                        match x["witness_holder_site"].as_u64() {
                            Some(0) | None => "both sites".to_string(),
                            Some(s) => format!("site {s}"),
                        },
                        match x["pre_election"].as_str() {
                            Some(p) if !p.is_empty() => format!("  pre-election: {p}"),
                            _ => String::new(),
                        }
                    );
                    println!("    lease: {}", x["lease"].as_str().unwrap_or("?"));
                }
            }
        }
    }
    print_dr(&st["dr"]);
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let socket = socket_of(&args.config)?;
    match args.cmd {
        Cmd::Rpc { method, params } => {
            let params = match params {
                Some(p) => serde_json::from_str(&p).context("PARAMS is not JSON")?,
                None => json!({}),
            };
            println!("{}", serde_json::to_string_pretty(&rpc(&socket, &method, params)?)?)
        }
        Cmd::Reload { dry_run } => {
            // The file named on the command line is the one to preview or apply.
            let config = std::fs::canonicalize(&args.config).unwrap_or_else(|_| args.config.clone());
            let r = rpc(&socket, "nvmetro_reload", json!({"dry_run": dry_run, "config": config}))?;
            let changes: Vec<&str> = r["changes"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            if changes.is_empty() {
                println!("nothing to change: the running target matches {}", args.config.display());
            } else {
                println!("{}", if dry_run { "would change (dry run; nothing changed):" } else { "changed:" });
                for c in changes {
                    println!("  {c}");
                }
            }
        }
        Cmd::Resync { bdev } => {
            let failed = rpc(&socket, "mirror_resync", json!({"name": bdev}))?;
            println!(
                "{bdev}: {}",
                if failed == Value::Bool(true) { "retrying: resync from the peer" } else { "not Failed: nothing to retry" }
            );
        }
        Cmd::Error { bdev, set, clear, json } => {
            let st = match (set, clear) {
                (Some(rules), _) => {
                    let rules: Value = serde_json::from_str(&rules).context("--set: the rules are not JSON")?;
                    rpc(&socket, "bdev_error_inject", json!({"name": bdev, "rules": rules}))?
                }
                (None, true) => rpc(&socket, "bdev_error_clear", json!({"name": bdev}))?,
                (None, false) => rpc(&socket, "bdev_error_stats", json!({"name": bdev}))?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                show_error(&bdev, &st);
            }
        }
        Cmd::Failback { bdev } => {
            let held = rpc(&socket, "mirror_failback", json!({"name": bdev}))?;
            println!("{bdev}: {}", if held == Value::Bool(true) { "failed back: serving again" } else { "was not waiting for a failback" });
        }
        Cmd::Dr { cmd: DrCmd::Status { json: true } } => {
            println!("{}", serde_json::to_string_pretty(&rpc(&socket, "dr_status", json!({}))?)?)
        }
        Cmd::Dr { cmd: DrCmd::Status { json: false } } => print_dr(&rpc(&socket, "dr_status", json!({}))?),
        Cmd::Dr { cmd: DrCmd::Test { group, action } } => {
            let what = rpc(&socket, "dr_test", json!({"group": group, "action": action}))?;
            println!("{group}: {}", what.as_str().unwrap_or("done"));
        }
        Cmd::Dr { cmd: DrCmd::Promote { group, force, yes } } => {
            if force && !yes {
                eprintln!(
                    "Forcing the DR image of {group} to serve. If the production site still streams or serves, its writes \
                     from now on never reach this image and the two diverge; if the image is not consistent (a full copy \
                     was under way), hosts see a torn image. The promotion is recorded and survives restarts."
                );
                confirm("group", &group)?;
            }
            let what = rpc(&socket, "dr_promote", json!({"group": group, "force": force}))?;
            println!("{group}: {}", what.as_str().unwrap_or("promoted"));
        }
        Cmd::Status { json: true, .. } => println!("{}", serde_json::to_string_pretty(&rpc(&socket, "nvmetro_status", json!({}))?)?),
        Cmd::Status { watch: false, .. } => print_status(&rpc(&socket, "nvmetro_status", json!({}))?),
        Cmd::Status { watch: true, .. } => {
            let changes = subscribe(&socket)?;
            loop {
                print_status(&rpc(&socket, "nvmetro_status", json!({}))?);
                // The next change (and whatever came with it), or 2 s.
                match changes.recv_timeout(std::time::Duration::from_secs(2)) {
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => bail!("the target closed the event stream"),
                    _ => while changes.try_recv().is_ok() {},
                }
                println!("---");
            }
        }
        Cmd::Promote { bdev, force, yes } => {
            if !force {
                bail!("`promote` needs --force: while the witness or the peer answers, they decide who serves");
            }
            eprintln!(
                "Forcing {bdev} to serve alone at this site. Do this only when the other site is lost for good AND the \
                 witness is unreachable. If the other site is in fact still serving, or served since it lost this one, \
                 the two copies diverge: when they meet again they refuse to resync (split brain) and one must be \
                 discarded. Keep the other site down until `nvmetro status` here shows the witness reachable again \
                 (it then records this site's lineage, and the other site, returning, is resynced from here). \
                 The promotion does not survive a restart of this target: run it again if needed."
            );
            if !yes {
                confirm("mirror", &bdev)?;
            }
            let what = rpc(&socket, "mirror_promote", json!({"name": bdev, "force": true}))?;
            println!("{bdev}: {}", what.as_str().unwrap_or("promoted"));
        }
        Cmd::Switchover { bdev } => {
            let what = rpc(&socket, "mirror_switchover", json!({"name": bdev}))?;
            println!("{bdev}: {}", what.as_str().unwrap_or("switched over"));
        }
        Cmd::Events { json } => {
            let changes = subscribe(&socket)?;
            for e in changes {
                if json {
                    println!("{e}");
                } else {
                    println!("{}", event_line(&e));
                }
            }
            bail!("the target closed the event stream");
        }
    }
    Ok(())
}
