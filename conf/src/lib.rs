//! nvmetro's configuration: one TOML file describes reactors, block devices, subsystems with
//! their namespaces and allowed hosts, and listeners. Unknown keys are errors, and every error
//! names the file, the line and the key, so an operator can fix it without guessing.
//!
//! ```toml
//! [target]
//! cores = [0]
//! poll_mode = "adaptive"      # or "busy" (spin; for benchmarks)
//! discovery = ["127.0.0.1:8009"]
//! in_capsule_data_size = "8KiB"  # data in an I/O command capsule; larger writes use R2T
//! max_h2c_data_size = "128KiB"   # MAXH2CDATA: the largest H2CData PDU, one R2T's window
//!
//! [[bdev]]
//! name = "mal0"
//! kind = "malloc"             # malloc | null | file | mirror | error
//! size = "1GiB"
//!
//! [[subsystem]]
//! nqn = "nqn.2026-11.io.nvmetro:demo"
//! allow_any_host = true
//!
//! [[subsystem.namespace]]
//! nsid = 1
//! bdev = "mal0"
//!
//! [[listener]]
//! address = "127.0.0.1:4420"
//! ```

use serde::Deserialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use toml::Spanned;

mod dr;
mod raw;
mod units;
mod validate;

pub use dr::*;
pub use nvmetro_bdev::mirror::core::ResyncLatencyTarget;
pub use raw::*;
pub use units::*;
use validate::*;

/// The configuration served when `nvmetro-tgt` runs without `--config`.
pub const DEFAULT_CONFIG: &str = include_str!("../examples/default.toml");

/// A configuration error: where it is and what is wrong, shown as `file:line: key: message`
/// (line 0: the key has no line of its own, e.g. a missing section). Only an error about the
/// whole file (it cannot be read) has no key, and is shown as `file: message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub key: String,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(f, "{}:{}: {}: {}", self.file, self.line, self.key, self.message)
        }
    }
}

/// Where the witness is, for the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessConfig {
    pub address: SocketAddr,
    pub secret: Vec<u8>,
}

/// In-capsule data accepted on I/O queues when `[target] in_capsule_data_size` is not set.
pub const DEFAULT_IN_CAPSULE_DATA_SIZE: usize = 8192;
/// The most `in_capsule_data_size` and `max_h2c_data_size` may be (one command's largest transfer).
pub const MAX_IN_CAPSULE_DATA_SIZE: usize = 128 * 1024;
/// MAXH2CDATA when `[target] max_h2c_data_size` is not set.
pub const DEFAULT_MAX_H2C_DATA_SIZE: u32 = 128 * 1024;

/// Where metrics are served when `[metrics]` names no address and `[target]` no site.
pub const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:9775";

/// Where `[metrics]` without an address listens: 127.0.0.1:9775 for a target without a site,
/// 9775 + N for site N (so two sites on one machine, as in a lab, never collide).
pub fn default_metrics_address(site: Option<u8>) -> SocketAddr {
    let base: SocketAddr = DEFAULT_METRICS_ADDRESS.parse().expect("valid default");
    SocketAddr::new(base.ip(), base.port() + u16::from(site.unwrap_or(0)))
}

/// A validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub cores: Vec<usize>,
    pub poll_mode: PollMode,
    pub socket: Option<PathBuf>,
    pub discovery: Vec<SocketAddr>,
    pub bdevs: Vec<BdevConfig>,
    pub subsystems: Vec<SubsystemConfig>,
    pub listeners: Vec<ListenerConfig>,
    pub site: Option<u8>,
    /// In-capsule data accepted on I/O queues, in bytes (IOCCSZ reports it).
    pub in_capsule_data_size: usize,
    /// MAXH2CDATA offered in ICResp, in bytes.
    pub max_h2c_data_size: u32,
    /// Whether NVMe/RDMA I/O queue pairs register buffers that host data lands in and leaves
    /// from uncopied.
    pub rdma_zero_copy: bool,
    /// Home site of each host NQN that has one.
    pub host_sites: BTreeMap<String, u8>,
    /// Prometheus endpoint, if enabled.
    pub metrics: Option<SocketAddr>,
    /// Metro mode: every mirror consults this witness.
    pub witness: Option<WitnessConfig>,
    /// Consistency groups this site streams to a DR site.
    pub dr_groups: Vec<DrGroupConfig>,
    /// Groups whose stream this site applies (a DR site).
    pub dr_replicas: Vec<DrReplicaConfig>,
}

impl Config {
    /// Whether `hostnqn` belongs to another site than this target's.
    pub fn host_is_remote(&self, hostnqn: &str) -> bool {
        matches!((self.site, self.host_sites.get(hostnqn)), (Some(here), Some(home)) if here != *home)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BdevConfig {
    pub name: String,
    pub kind: BdevKind,
    pub size: Option<u64>,
    pub block_size: u32,
    pub hugepages: bool,
    pub path: Option<PathBuf>,
    pub direct: bool,
    pub mirror: Option<MirrorConfig>,
    pub error: Option<ErrorConfig>,
}

impl BdevConfig {
    /// The bdev this one is built on (a mirror's local leg, an error bdev's base), which must be
    /// opened first.
    pub fn depends_on(&self) -> Option<&str> {
        match (&self.mirror, &self.error) {
            (Some(m), _) => Some(&m.local),
            (_, Some(e)) => Some(&e.base),
            _ => None,
        }
    }
}

/// An error-injection bdev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorConfig {
    pub base: String,
    /// The initial fault rules as JSON (validated: `nvmetro_bdev::error::parse_rules` accepts
    /// them); `None`: none, every command passes.
    pub rules: Option<String>,
}

impl Config {
    /// Bdev indexes in an order where each comes after the bdev it is built on.
    pub fn open_order(&self) -> Vec<usize> {
        dependency_order(&self.bdevs, |_| false)
    }
}

/// Indexes of `bdevs` ordered so that each comes after the one it depends on, unless that one is
/// already open (`open`). Bdevs whose dependency is neither (validation rules that out) go last.
pub fn dependency_order(bdevs: &[BdevConfig], open: impl Fn(&str) -> bool) -> Vec<usize> {
    let mut order = Vec::new();
    let mut placed = vec![false; bdevs.len()];
    loop {
        let before = order.len();
        for (i, b) in bdevs.iter().enumerate() {
            if placed[i] {
                continue;
            }
            let ready = match b.depends_on() {
                None => true,
                Some(d) => open(d) || bdevs.iter().enumerate().any(|(j, x)| placed[j] && x.name == d),
            };
            if ready {
                placed[i] = true;
                order.push(i);
            }
        }
        if order.len() == before {
            break;
        }
    }
    order.extend((0..bdevs.len()).filter(|i| !placed[*i]));
    order
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorConfig {
    pub local: String,
    pub preferred: bool,
    pub site: u8,
    pub listen: Option<SocketAddr>,
    pub peer: Option<SocketAddr>,
    /// What carries the replication link.
    pub link: Transport,
    /// Connections the replication link is made of (1 to 16).
    pub lanes: usize,
    pub metadata: PathBuf,
    pub resync_rate: u64,
    pub resync_latency_target: ResyncLatencyTarget,
    pub region_shift: u32,
    pub link_delay_us: u64,
    pub heartbeat_timeout_ms: Option<u64>,
    pub manual_failback: bool,
    /// The replication link's shared secret (`secret` or `secret_file`); `None`: not configured.
    pub secret: Option<Vec<u8>>,
    /// How often a leg whose disk failed I/O retries to resync; `None` ("0s"): only when the
    /// operator asks.
    pub retry_interval: Option<std::time::Duration>,
}

/// The default of a mirror's `retry_interval`.
pub const DEFAULT_RETRY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceConfig {
    pub nsid: u32,
    pub bdev: String,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    pub uuid: [u8; 16],
    pub ana_group: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsystemConfig {
    pub nqn: String,
    pub serial: String,
    pub model: String,
    /// Empty with `allow_any_host`.
    pub allowed_hosts: Vec<String>,
    pub allow_any_host: bool,
    pub cntlid_min: u16,
    pub cntlid_max: u16,
    pub max_namespaces: u32,
    pub ana_transition_time: u8,
    pub ana_groups: u32,
    pub namespaces: Vec<NamespaceConfig>,
}

impl SubsystemConfig {
    pub fn host_allowed(&self, hostnqn: &str) -> bool {
        self.allow_any_host || self.allowed_hosts.iter().any(|h| h == hostnqn)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    /// State per ANA group (index 0 = group 1); groups beyond the list are optimized.
    pub ana_states: BTreeMap<u32, String>,
    pub transport: Transport,
}

/// The NVMe-oF transport a listener speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    #[default]
    Tcp,
    Rdma,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Rdma => "rdma",
        }
    }
}

/// A listener or a mirror's link asks for a transport this binary was built without.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: \"rdma\" needs nvmetro-tgt built with the `rdma` cargo feature (cargo build --release -p nvmetro-tgt --features rdma; it needs libibverbs-dev, librdmacm-dev and libclang-dev)")]
pub struct TransportNotBuilt {
    /// `listener ADDRESS` (its transport) or `mirror NAME` (its link).
    pub what: String,
}

impl Config {
    /// Refuses listeners and mirror links whose transport is not built in (`rdma_built`: the
    /// binary's `rdma` feature).
    pub fn check_transports(&self, rdma_built: bool) -> Result<(), TransportNotBuilt> {
        if rdma_built {
            return Ok(());
        }
        if let Some(l) = self.listeners.iter().find(|l| l.transport == Transport::Rdma) {
            return Err(TransportNotBuilt { what: format!("listener {} (transport)", l.address) });
        }
        match self.bdevs.iter().find(|b| b.mirror.as_ref().is_some_and(|m| m.link == Transport::Rdma)) {
            Some(b) => Err(TransportNotBuilt { what: format!("mirror {} (link)", b.name) }),
            None => Ok(()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessDaemonConfig {
    pub listen: SocketAddr,
    pub secret: Vec<u8>,
    pub state: PathBuf,
}

/// Reads and validates the witness daemon's config file.
pub fn load_witness(path: &Path) -> Result<WitnessDaemonConfig, ConfigError> {
    let (text, file) = read(path)?;
    parse_witness(&text, &file)
}

pub fn parse_witness(text: &str, file: &str) -> Result<WitnessDaemonConfig, ConfigError> {
    let ctx = Ctx { file, text };
    let raw: WitnessDaemonSection = toml::from_str(text).map_err(|e| toml_error(&e, text, file))?;
    let listen = raw
        .listen
        .get_ref()
        .parse()
        .map_err(|_| ctx.err(raw.listen.span(), "listen", format!("`{}` is not an address:port", raw.listen.get_ref())))?;
    let secret = read_secret(&ctx, "", raw.secret.as_ref(), raw.secret_file.as_ref(), &raw.listen)?;
    Ok(WitnessDaemonConfig { listen, secret, state: raw.state.get_ref().clone() })
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let (text, file) = read(path)?;
    parse(&text, &file)
}

fn read(path: &Path) -> Result<(String, String), ConfigError> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((text, file)),
        Err(e) => Err(ConfigError { file, line: 0, key: String::new(), message: format!("cannot read: {e}") }),
    }
}

/// `--check`: validates like [`load`], then checks every path the file names the way the target
/// will use it: a file bdev's `path` and a mirror's `metadata` must be writable, or, when absent,
/// creatable (the directory they go in exists and is writable; a file bdev also needs a `size`
/// to be created); the management socket's directory must exist and be writable. Every problem
/// is reported, each as `file:line: key: message`.
pub fn check(path: &Path) -> Result<Config, Vec<ConfigError>> {
    let (text, file) = read(path).map_err(|e| vec![e])?;
    let raw: RawConfig = toml::from_str(&text).map_err(|e| vec![toml_error(&e, &text, &file)])?;
    let ctx = Ctx { file: &file, text: &text };
    let config = validate(raw.clone(), &ctx).map_err(|e| vec![e])?;
    let mut errors = Vec::new();
    if let Some(s) = &raw.target.socket {
        errors.extend(check_parent(&ctx, s, "target.socket"));
    }
    for b in &raw.bdevs {
        match (b.kind, &b.path, &b.metadata) {
            (BdevKind::File, Some(p), _) => {
                let creatable = if b.size.is_some() { Ok(()) } else { Err("`size` is not set, so it cannot be created") };
                errors.extend(check_file(&ctx, p, "bdev.path", creatable));
            }
            (BdevKind::Mirror, _, Some(m)) => errors.extend(check_file(&ctx, m, "bdev.metadata", Ok(()))),
            _ => {}
        }
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

/// `nvmetro-witness --check`: validates like [`load_witness`], then checks that the state file
/// can be written: its directory exists and is writable, or can be created (the witness creates
/// it at start).
pub fn check_witness(path: &Path) -> Result<WitnessDaemonConfig, Vec<ConfigError>> {
    let (text, file) = read(path).map_err(|e| vec![e])?;
    let config = parse_witness(&text, &file).map_err(|e| vec![e])?;
    let raw: WitnessDaemonSection = toml::from_str(&text).map_err(|e| vec![toml_error(&e, &text, &file)])?;
    let ctx = Ctx { file: &file, text: &text };
    let state = raw.state.get_ref();
    let dir = parent_of(state);
    let mut existing = dir.as_path();
    while !existing.exists() {
        match existing.parent() {
            Some(up) if !up.as_os_str().is_empty() => existing = up,
            _ => {
                existing = Path::new(".");
                break;
            }
        }
    }
    let problem = if existing == dir {
        check_parent(&ctx, &raw.state, "state")
    } else {
        match (existing.is_dir(), nvmetro_ffi::check_writable(existing)) {
            (true, Ok(())) => None,
            (false, _) => {
                Some(format!("the state directory {} cannot be created: {} is not a directory", dir.display(), existing.display()))
            }
            (true, Err(e)) => {
                Some(format!("the state directory {} cannot be created: {} is not writable ({e})", dir.display(), existing.display()))
            }
        }
        .map(|m| ctx.err(raw.state.span(), "state", m))
    };
    match problem {
        None => Ok(config),
        Some(e) => Err(vec![e]),
    }
}

/// Parses and validates config text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    let ctx = Ctx { file, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(&e, text, file))?;
    validate(raw, &ctx)
}

#[cfg(test)]
mod tests;
