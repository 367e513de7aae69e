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

/// The configuration served when `nvmetro-tgt` runs without `--config`.
mod dr;
mod raw;
mod units;
mod validate;

pub use dr::*;
pub use nvmetro_bdev::mirror::core::ResyncLatencyTarget;
pub use raw::*;
pub use units::*;
use validate::*;

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
mod tests {
    use super::*;

    const GOOD: &str = r#"
[target]
cores = [0, 1]
poll_mode = "busy"

[[bdev]]
name = "a"
kind = "malloc"
size = "64MiB"

[[bdev]]
name = "b"
kind = "file"
path = "/tmp/x"
block_size = 4096

[[subsystem]]
nqn = "nqn.2026-11.io.nvmetro:one"
allowed_hosts = ["nqn.2014-08.org.nvmexpress:uuid:1"]
cntlid_range = [1, 100]

[[subsystem.namespace]]
nsid = 1
bdev = "a"
nguid = "00112233445566778899aabbccddeeff"

[[subsystem.namespace]]
nsid = 2
bdev = "b"
ana_group = 2

[[listener]]
address = "127.0.0.1:4420"
ana_states = { "2" = "non-optimized" }
"#;

    #[test]
    fn good_config_parses() {
        let c = parse(GOOD, "good.toml").unwrap();
        assert_eq!(c.cores, vec![0, 1]);
        assert_eq!(c.poll_mode, PollMode::Busy);
        assert_eq!(c.bdevs[0].size, Some(64 << 20));
        let s = &c.subsystems[0];
        assert_eq!(s.namespaces[0].nguid[0..2], [0x00, 0x11]);
        assert_eq!(s.ana_groups, 2);
        assert!(s.host_allowed("nqn.2014-08.org.nvmexpress:uuid:1"));
        assert!(!s.host_allowed("nqn.2014-08.org.nvmexpress:uuid:2"));
        assert_eq!(c.listeners[0].ana_states.get(&2).map(String::as_str), Some("non-optimized"));
        // Derived IDs are stable and differ per namespace.
        assert_eq!(s.namespaces[1].nguid, derived_id("nqn.2026-11.io.nvmetro:one", 2));
        assert_ne!(derived_id("nqn.x:y", 1), derived_id("nqn.x:y", 2));
    }

    fn err(text: &str) -> ConfigError {
        parse(text, "bad.toml").unwrap_err()
    }

    #[test]
    fn listener_transport_defaults_to_tcp_and_rdma_needs_the_feature() {
        let c = parse(GOOD, "good.toml").unwrap();
        assert_eq!(c.listeners[0].transport, Transport::Tcp);
        assert_eq!(c.check_transports(false), Ok(()));
        let rdma = GOOD.replace("address = \"127.0.0.1:4420\"", "address = \"127.0.0.1:4420\"\ntransport = \"rdma\"");
        let c = parse(&rdma, "r.toml").unwrap();
        assert_eq!(c.listeners[0].transport, Transport::Rdma);
        assert_eq!(c.check_transports(true), Ok(()));
        let e = c.check_transports(false).unwrap_err().to_string();
        assert!(e.contains("127.0.0.1:4420") && e.contains("`rdma` cargo feature"), "{e}");
        let bad = GOOD.replace("address = \"127.0.0.1:4420\"", "address = \"127.0.0.1:4420\"\ntransport = \"fc\"");
        let e = err(&bad).to_string();
        assert!(e.contains("listener.transport") && e.contains("`fc` is not a transport"), "{e}");
    }

    #[test]
    fn transport_sizes_default_and_are_validated() {
        let c = parse(GOOD, "good.toml").unwrap();
        assert_eq!((c.in_capsule_data_size, c.max_h2c_data_size), (8192, 128 * 1024));
        let with = |keys: &str| GOOD.replace("poll_mode = \"busy\"", &format!("poll_mode = \"busy\"\n{keys}"));
        let c = parse(&with("in_capsule_data_size = \"4KiB\"\nmax_h2c_data_size = \"8KiB\""), "t.toml").unwrap();
        assert_eq!((c.in_capsule_data_size, c.max_h2c_data_size), (4096, 8192));
        assert_eq!(parse(&with("in_capsule_data_size = 0"), "t.toml").unwrap().in_capsule_data_size, 0);
        for (bad, key) in [
            ("in_capsule_data_size = 4100", "target.in_capsule_data_size"),
            ("in_capsule_data_size = \"1MiB\"", "target.in_capsule_data_size"),
            ("max_h2c_data_size = 2048", "target.max_h2c_data_size"),
            ("max_h2c_data_size = 4098", "target.max_h2c_data_size"),
        ] {
            let e = err(&with(bad));
            assert_eq!((e.key.as_str(), e.line), (key, 5), "{bad}: {e}");
        }
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let e = err(&GOOD.replace("poll_mode = \"busy\"", "poll_mode = \"busy\"\nspeed = 3"));
        assert_eq!((e.file.as_str(), e.line, e.key.as_str()), ("bad.toml", 5, "target.speed"), "{e}");

        let e = err(&GOOD.replace("nsid = 2", "nsid = 1"));
        assert_eq!(e.key, "subsystem.namespace.nsid");
        assert_eq!(e.line, 28, "{e}");
        assert!(e.to_string().starts_with("bad.toml:28: subsystem.namespace.nsid: NSID 1 is used twice"), "{e}");

        let e = err(&GOOD.replace("bdev = \"b\"", "bdev = \"missing\""));
        assert_eq!((e.key.as_str(), e.line), ("subsystem.namespace.bdev", 29));
        assert!(e.message.contains("no bdev named `missing`"));

        let e = err(&GOOD.replace("[[listener]]", "[[listener"));
        assert_eq!((e.line, e.key.as_str()), (32, "listener"), "{e}");

        let e = err(&GOOD.replace("64MiB", "lots"));
        assert!(e.message.contains("size"), "{e}");
        assert_eq!((e.line, e.key.as_str()), (9, "bdev.size"), "{e}");
        let e = err(&GOOD.replace("cntlid_range = [1, 100]", "cntlid_range = [100, 1]"));
        assert_eq!(e.key, "subsystem.cntlid_range");
        let e = err(&GOOD.replace("\"non-optimized\"", "\"fast\""));
        assert_eq!(e.key, "listener.ana_states");
        let e = err(&GOOD.replace("allowed_hosts = [\"nqn.2014-08.org.nvmexpress:uuid:1\"]", ""));
        assert_eq!(e.key, "subsystem.allowed_hosts");
        let e = err(&GOOD.replace("ana_group = 2", "ana_group = 3"));
        assert!(e.message.contains("group 2 is unused"), "{e}");
        let e = err(&GOOD.replace("127.0.0.1:4420", "localhost"));
        assert_eq!(e.key, "listener.address");
    }

    #[test]
    fn default_and_examples_are_valid() {
        parse(DEFAULT_CONFIG, "default.toml").unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let mut files: Vec<_> = std::fs::read_dir(dir.join("examples")).unwrap().map(|e| e.unwrap().path()).collect();
        files.extend(["site-a.toml", "site-b.toml"].map(|f| dir.join(f)));
        for p in files {
            load(&p).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn mirror_bdevs() {
        // The check test's mirror, without its [target] section and with paths in /tmp.
        let base = &MIRROR[MIRROR.find("[[bdev]]").unwrap()..]
            .replace("{DIR}/data/leg.img", "/tmp/leg")
            .replace("{DIR}/meta/m.meta", "/tmp/m.meta");
        let base = base.as_str();
        let c = parse(base, "m.toml").unwrap();
        let m = c.bdevs[1].mirror.as_ref().unwrap();
        assert!(m.preferred && m.site == 1 && m.region_shift == 20);
        let e = err(&base.replace("role = \"preferred\"", "role = \"secondary\""));
        assert_eq!(e.key, "bdev.peer");
        let e = err(&base.replace("kind = \"file\"", "kind = \"malloc\"").replace("path = \"/tmp/leg\"\n", ""));
        assert!(e.message.contains("must survive a restart"), "{e}");
        let e = err(&base.replace("bdev = \"m\"", "bdev = \"leg\""));
        assert!(e.message.contains("export the mirror"), "{e}");
    }

    #[test]
    fn mirror_resync_latency_target() {
        let base = &MIRROR[MIRROR.find("[[bdev]]").unwrap()..]
            .replace("{DIR}/data/leg.img", "/tmp/leg")
            .replace("{DIR}/meta/m.meta", "/tmp/m.meta");
        let with = |v: &str| base.replace("role = \"preferred\"", &format!("role = \"preferred\"\nresync_latency_target = \"{v}\""));
        let target = |text: &str| parse(text, "m.toml").unwrap().bdevs[1].mirror.as_ref().unwrap().resync_latency_target;
        assert_eq!(target(base), ResyncLatencyTarget::Relative(125), "the default");
        assert_eq!(target(&with("150%")), ResyncLatencyTarget::Relative(150));
        assert_eq!(target(&with("2ms")), ResyncLatencyTarget::Absolute(2000));
        assert_eq!(target(&with("off")), ResyncLatencyTarget::Off);
        for bad in ["50%", "fast", "5us", "20s", "%", "18446744073709552s"] {
            let e = err(&with(bad));
            assert_eq!(e.key, "bdev.resync_latency_target", "{bad}: {e}");
            assert!(e.message.contains(bad) && e.message.contains("\"off\""), "{e}");
        }
    }

    #[test]
    fn error_bdevs() {
        // The mirror's leg is an error bdev over the file bdev, defined after the mirror (order
        // does not matter, as for a mirror's `local`).
        let base = r#"
[[bdev]]
name = "disk"
kind = "file"
path = "/tmp/leg"
size = "64MiB"

[[bdev]]
name = "m"
kind = "mirror"
local = "flaky"
role = "preferred"
listen = "127.0.0.1:7700"
metadata = "/tmp/m.meta"

[[bdev]]
name = "flaky"
kind = "error"
base = "disk"
rules = '[{"op":"write","error":"nospace","after":3}]'

[[subsystem]]
nqn = "nqn.2026-11.io.nvmetro:m"
allow_any_host = true

[[subsystem.namespace]]
nsid = 1
bdev = "m"

[[listener]]
address = "127.0.0.1:4420"
"#;
        let c = parse(base, "e.toml").unwrap();
        let e = c.bdevs[2].error.as_ref().unwrap();
        assert_eq!((c.bdevs[2].kind, e.base.as_str()), (BdevKind::Error, "disk"));
        assert_eq!(nvmetro_bdev::error::parse_rules(e.rules.as_deref().unwrap()).unwrap().len(), 1);
        assert_eq!(c.bdevs[1].depends_on(), Some("flaky"));
        let order = c.open_order();
        let pos = |n: &str| order.iter().position(|&i| c.bdevs[i].name == n).unwrap();
        assert!(pos("disk") < pos("flaky") && pos("flaky") < pos("m"), "{order:?}");
        // No rules: every command passes. A single rule object is accepted too.
        assert_eq!(
            parse(&base.replace("rules = '[{\"op\":\"write\",\"error\":\"nospace\",\"after\":3}]'\n", ""), "e.toml").unwrap().bdevs[2]
                .error
                .as_ref()
                .unwrap()
                .rules,
            None
        );
        parse(
            &base.replace("'[{\"op\":\"write\",\"error\":\"nospace\",\"after\":3}]'", "'{\"error\":\"eio\",\"fraction\":0.5}'"),
            "e.toml",
        )
        .unwrap();

        // Bad rules are refused with the rule's problem, at the rules' line.
        let rules = "'[{\"op\":\"write\",\"error\":\"nospace\",\"after\":3}]'";
        for (bad, says) in [
            ("'[{\"op\":\"write\"}]'", "injects nothing"),
            ("'{\"error\":\"bogus\"}'", "bad fault rule"),
            ("'{\"error\":\"eio\",\"fraction\":2}'", "fraction"),
            ("'not json'", "bad fault rule"),
            ("'{\"error\":\"eio\",\"colour\":\"red\"}'", "colour"),
        ] {
            let e = err(&base.replace(rules, bad));
            assert_eq!((e.key.as_str(), e.line), ("bdev.rules", 20), "{e}");
            assert!(e.message.contains(says), "{bad}: {e}");
            assert!(e.to_string().starts_with("bad.toml:20: bdev.rules: "), "{e}");
        }
        // The base must exist, not be the bdev itself, and not lead back to it.
        let e = err(&base.replace("base = \"disk\"", "base = \"nothere\""));
        assert_eq!((e.key.as_str(), e.line), ("bdev.base", 19), "{e}");
        assert!(e.message.contains("no bdev named `nothere`"), "{e}");
        let e = err(&base.replace("base = \"disk\"", "base = \"flaky\""));
        assert!(e.key == "bdev.base" && e.message.contains("itself"), "{e}");
        let e = err(&base.replace("base = \"disk\"", "base = \"m\""));
        assert!(e.key == "bdev.base" && e.message.contains("cycle"), "{e}");
        let e = err(&base.replace("base = \"disk\"\n", ""));
        assert_eq!((e.key.as_str(), e.line), ("bdev.base", 17), "{e}");
        // Keys that belong elsewhere.
        let e = err(&base.replace("base = \"disk\"", "base = \"disk\"\nsize = \"1MiB\""));
        assert_eq!(e.key, "bdev.size", "{e}");
        let e = err(&base.replace("base = \"disk\"", "base = \"disk\"\npath = \"/tmp/x\""));
        assert_eq!(e.key, "bdev.path", "{e}");
        let e = err(&base.replace("base = \"disk\"", "base = \"disk\"\nblock_size = 4096"));
        assert_eq!(e.key, "bdev.block_size", "{e}");
        let e = err(&base.replace("size = \"64MiB\"", "size = \"64MiB\"\nrules = '{\"error\":\"eio\"}'"));
        assert_eq!(e.key, "bdev", "{e}");
        assert!(e.message.contains("error bdevs"), "{e}");
        // A mirror leg over RAM is refused even behind an error bdev; the leg and the file under
        // it are the mirror's, not exportable on their own.
        let ram = base.replace("kind = \"file\"\npath = \"/tmp/leg\"", "kind = \"malloc\"");
        let e = err(&ram);
        assert_eq!(e.key, "bdev.local", "{e}");
        assert!(e.message.contains("an error bdev over a Malloc bdev") && e.message.contains("survive a restart"), "{e}");
        for leg in ["flaky", "disk"] {
            let e = err(&base.replace("bdev = \"m\"", &format!("bdev = \"{leg}\"")));
            assert!(e.message.contains("export the mirror"), "{leg}: {e}");
        }
        // An error bdev over a plain bdev can be exported itself.
        let plain = GOOD
            .replace("[[subsystem]]", "[[bdev]]\nname = \"e\"\nkind = \"error\"\nbase = \"a\"\n\n[[subsystem]]")
            .replace("bdev = \"b\"", "bdev = \"e\"");
        let c = parse(&plain, "p.toml").unwrap();
        assert_eq!(c.subsystems[0].namespaces[1].bdev, "e");
    }

    #[test]
    fn host_sites() {
        let base = GOOD.replace("poll_mode = \"busy\"", "poll_mode = \"busy\"\nsite = 1")
            + "\n[[host]]\nnqn = \"nqn.2014-08.org.nvmexpress:uuid:1\"\nsite = 1\n\n[[host]]\nnqn = \"nqn.2014-08.org.nvmexpress:uuid:2\"\nsite = 2\n";
        let c = parse(&base, "h.toml").unwrap();
        assert!(!c.host_is_remote("nqn.2014-08.org.nvmexpress:uuid:1"));
        assert!(c.host_is_remote("nqn.2014-08.org.nvmexpress:uuid:2"));
        assert!(!c.host_is_remote("nqn.2014-08.org.nvmexpress:uuid:3"), "hosts without a site prefer every path alike");
        assert_eq!(err(&base.replacen("poll_mode = \"busy\"\nsite = 1", "poll_mode = \"busy\"", 1)).key, "target.site");
        assert_eq!(err(&base.replace("uuid:2", "uuid:1")).key, "host");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB"), Some(1 << 30));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("1X"), None);
        assert_eq!(parse_size("99999999999999T"), None);
    }

    #[test]
    fn si_and_iec_sizes_mean_what_they_say() {
        // SI: powers of 1000; "1TB" is not a TiB.
        assert_eq!(parse_size("1TB"), Some(1_000_000_000_000));
        assert_eq!(parse_size("1tb"), Some(1_000_000_000_000));
        assert_eq!(parse_size("500GB"), Some(500_000_000_000));
        assert_eq!(parse_size("4kB"), Some(4000));
        assert_eq!(parse_size("2MB"), Some(2_000_000));
        assert_eq!(parse_size("1PB"), Some(10u64.pow(15)));
        // IEC (and the bare letters, as dd reads them): powers of 1024.
        assert_eq!(parse_size("1TiB"), Some(1 << 40));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size("4KiB"), Some(4096));
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("1 GiB"), Some(1 << 30));
        assert_eq!(parse_size("1PiB"), Some(1 << 50));
        assert_eq!(parse_size("4096B"), Some(4096));
        // Fractions that come to whole bytes.
        assert_eq!(parse_size("1.5GiB"), Some(3 << 29));
        assert_eq!(parse_size("1.5TB"), Some(1_500_000_000_000));
        assert_eq!(parse_size("0.5k"), Some(512));
        assert_eq!(parse_size("1.3B"), None);
        assert_eq!(parse_size("1."), None);
        assert_eq!(parse_size(".5G"), None);
        assert_eq!(parse_size("1..5G"), None);
        // Overflow and junk.
        assert_eq!(parse_size("16EiB"), None);
        assert_eq!(parse_size("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_size("18446744073709551616"), None);
        assert_eq!(parse_size("1TiBs"), None);
        assert_eq!(parse_size("GiB"), None);
        assert_eq!(parse_size(""), None);
        // In a file: 1GB is 10^9 bytes (not a block multiple of 4096 here, so it is refused).
        let c = parse(&GOOD.replace("64MiB", "64MB"), "si.toml").unwrap();
        assert_eq!(c.bdevs[0].size, Some(64_000_000));
        let e = err(&GOOD.replace("64MiB", "64XB"));
        assert!(e.message.contains("powers of 1000") && e.message.contains("powers of 1024"), "{e}");
        assert_eq!(e.key, "bdev.size");
    }

    #[test]
    fn every_error_names_its_key() {
        let cases = [
            GOOD.replace("cores = [0, 1]", "cores = \"two\""),
            GOOD.replace("block_size = 4096", "block_size = \"big\""),
            GOOD.replace("nsid = 2", "nsid = -2"),
            GOOD.replace("[[subsystem]]", "[[subsystem]]\nmodel = 3"),
            GOOD.replace("ana_states = { \"2\" = \"non-optimized\" }", "ana_states = { \"2\" = 2 }"),
            GOOD.replace("name = \"a\"\n", ""),
            GOOD.replace("poll_mode = \"busy\"", "poll_mode = \"busy\"\npoll_mode = \"busy\""),
            GOOD.replace("kind = \"malloc\"", "kind = \"ramdisk\""),
            GOOD.replace("size = \"64MiB\"", "size = 64MiB"),
            "= 3\n".to_string(),
        ];
        for text in &cases {
            let e = err(text);
            assert!(!e.key.is_empty(), "{e}");
            assert!(!e.to_string().contains(": : "), "{e}");
        }
        assert_eq!(err(&cases[0]).key, "target.cores");
        assert_eq!(err(&cases[1]).key, "bdev.block_size");
        assert_eq!(err(&cases[3]).key, "subsystem.model");
        assert_eq!(err(&cases[4]).key, "listener.ana_states");
        assert_eq!(err(&cases[5]).key, "bdev.name");
        assert_eq!(err(&cases[7]).key, "bdev.kind");
        assert_eq!(parse_witness("listen = 3\n", "w.toml").unwrap_err().key, "listen");
        // A file that cannot be read has no key: it is named alone.
        let e = load(Path::new("/nonexistent/nvmetro.toml")).unwrap_err();
        assert!(e.to_string().starts_with("/nonexistent/nvmetro.toml: cannot read"), "{e}");
    }

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("nvmetro-conf-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const MIRROR: &str = r#"
[target]
socket = "{DIR}/sock/mgmt.sock"

[[bdev]]
name = "leg"
kind = "file"
path = "{DIR}/data/leg.img"
size = "64MiB"

[[bdev]]
name = "m"
kind = "mirror"
local = "leg"
role = "preferred"
listen = "127.0.0.1:7700"
metadata = "{DIR}/meta/m.meta"

[[subsystem]]
nqn = "nqn.2026-11.io.nvmetro:m"
allow_any_host = true

[[subsystem.namespace]]
nsid = 1
bdev = "m"

[[listener]]
address = "127.0.0.1:4420"
"#;

    #[test]
    fn a_mirror_link_is_tcp_unless_it_says_rdma_which_needs_the_feature() {
        let c = parse(MIRROR, "m.toml").unwrap();
        assert_eq!(c.bdevs[1].mirror.as_ref().unwrap().link, Transport::Tcp);
        let rdma = MIRROR.replace("role = \"preferred\"", "role = \"preferred\"\nlink = \"rdma\"");
        let c = parse(&rdma, "m.toml").unwrap();
        assert_eq!(c.bdevs[1].mirror.as_ref().unwrap().link, Transport::Rdma);
        assert_eq!(c.check_transports(true), Ok(()));
        let e = c.check_transports(false).unwrap_err().to_string();
        assert!(e.contains("mirror m (link)") && e.contains("`rdma` cargo feature"), "{e}");
        let e = err(&MIRROR.replace("role = \"preferred\"", "role = \"preferred\"\nlink = \"udp\""));
        assert_eq!((e.line, e.key.as_str()), (16, "bdev.link"), "{e}");
        assert!(e.message.contains("`udp` is not a transport"), "{e}");
    }

    #[test]
    fn check_verifies_every_path_can_be_written() {
        let dir = scratch("check");
        let file = dir.join("target.toml");
        std::fs::write(&file, MIRROR.replace("{DIR}", &dir.display().to_string())).unwrap();
        // None of the directories exists: three errors, each with its line and key.
        let errors = check(&file).unwrap_err();
        let found: Vec<(usize, &str)> = errors.iter().map(|e| (e.line, e.key.as_str())).collect();
        assert_eq!(found, [(3, "target.socket"), (8, "bdev.path"), (17, "bdev.metadata")], "{errors:?}");
        for e in &errors {
            assert!(e.message.contains("does not exist"), "{e}");
            assert!(e.to_string().starts_with(&format!("{}:{}: {}: ", file.display(), e.line, e.key)), "{e}");
        }
        assert!(errors[1].message.contains(&format!("{}/data", dir.display())), "{}", errors[1]);
        for d in ["sock", "data", "meta"] {
            std::fs::create_dir(dir.join(d)).unwrap();
        }
        let c = check(&file).unwrap();
        assert_eq!(c.bdevs.len(), 2);
        // A parent that is a file, not a directory.
        std::fs::remove_dir(dir.join("meta")).unwrap();
        std::fs::write(dir.join("meta"), b"").unwrap();
        let errors = check(&file).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].key, "bdev.metadata");
        assert!(errors[0].message.contains("is not a directory"), "{}", errors[0]);
        // A file bdev that does not exist and has no size cannot be created.
        std::fs::remove_file(dir.join("meta")).unwrap();
        std::fs::create_dir(dir.join("meta")).unwrap();
        std::fs::write(&file, MIRROR.replace("{DIR}", &dir.display().to_string()).replace("size = \"64MiB\"\n", "")).unwrap();
        let errors = check(&file).unwrap_err();
        assert_eq!((errors.len(), errors[0].key.as_str()), (1, "bdev.path"), "{errors:?}");
        assert!(errors[0].message.contains("`size` is not set"), "{}", errors[0]);
        // It exists: fine without a size.
        std::fs::write(dir.join("data/leg.img"), vec![0u8; 4096]).unwrap();
        check(&file).unwrap();
        // A path that is a directory.
        std::fs::create_dir(dir.join("meta/m.meta")).unwrap();
        let errors = check(&file).unwrap_err();
        assert!(errors[0].message.contains("is a directory"), "{}", errors[0]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn check_witness_state_directory() {
        let dir = scratch("check-witness");
        let file = dir.join("witness.toml");
        let write = |state: &str| {
            std::fs::write(&file, format!("listen = \"127.0.0.1:7900\"\nsecret = \"0123456789abcdef\"\nstate = \"{state}\"\n")).unwrap()
        };
        // Absent directories the witness creates at start are fine.
        write(&format!("{}/a/b/state.json", dir.display()));
        check_witness(&file).unwrap();
        // Under a regular file they cannot be created.
        std::fs::write(dir.join("plain"), b"").unwrap();
        write(&format!("{}/plain/b/state.json", dir.display()));
        let errors = check_witness(&file).unwrap_err();
        assert_eq!((errors[0].line, errors[0].key.as_str()), (3, "state"), "{errors:?}");
        assert!(errors[0].message.contains("cannot be created"), "{}", errors[0]);
        write(&format!("{}/plain/state.json", dir.display()));
        let errors = check_witness(&file).unwrap_err();
        assert!(errors[0].message.contains("is not a directory"), "{}", errors[0]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn mirror_secret_and_retry_interval() {
        let base = MIRROR.replace("{DIR}", "/tmp");
        let c = parse(&base, "m.toml").unwrap();
        let m = c.bdevs[1].mirror.as_ref().unwrap();
        assert_eq!((m.secret.as_deref(), m.retry_interval), (None, Some(DEFAULT_RETRY_INTERVAL)));
        let with = |extra: &str| base.replace("metadata = ", &format!("{extra}\nmetadata = "));
        let mirror = |text: &str| parse(text, "m.toml").unwrap().bdevs[1].mirror.clone().unwrap();

        let m = mirror(&with("secret = \"replication-secret-16\"\nretry_interval = \"1m 30s\""));
        assert_eq!(m.secret.as_deref(), Some(&b"replication-secret-16"[..]));
        assert_eq!(m.retry_interval, Some(std::time::Duration::from_secs(90)));
        assert_eq!(mirror(&with("retry_interval = \"0s\"")).retry_interval, None, "0s: only on request");
        assert_eq!(mirror(&with("retry_interval = \"250ms\"")).retry_interval, Some(std::time::Duration::from_millis(250)));

        let e = err(&with("retry_interval = \"soon\""));
        assert_eq!((e.key.as_str(), e.line), ("bdev.retry_interval", 17), "{e}");
        let e = err(&with("secret = \"short\""));
        assert_eq!(e.key, "bdev.secret");
        assert!(e.message.contains("16 characters"), "{e}");
        let e = err(&with("secret = \"replication-secret-16\"\nsecret_file = \"/tmp/x\""));
        assert_eq!(e.key, "bdev.secret");
        assert!(e.message.contains("exactly one"), "{e}");
        // Mirror keys on another kind of bdev.
        let e = err(&base.replace("size = \"64MiB\"", "size = \"64MiB\"\nretry_interval = \"1s\""));
        assert_eq!(e.key, "bdev");

        // A secret file: only its owner may read it.
        use std::os::unix::fs::PermissionsExt;
        let dir = scratch("secret");
        let secret = dir.join("link.secret");
        std::fs::write(&secret, "replication-secret-from-file\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = with(&format!("secret_file = \"{}\"", secret.display()));
        let e = err(&text);
        assert_eq!((e.key.as_str(), e.line), ("bdev.secret_file", 17), "{e}");
        assert!(e.message.contains(&secret.display().to_string()) && e.message.contains("group or others"), "{e}");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(mirror(&text).secret.as_deref(), Some(&b"replication-secret-from-file"[..]));
        // The witness's secret file is held to the same rule (one code path).
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
        let w = format!("listen = \"127.0.0.1:7900\"\nsecret_file = \"{}\"\nstate = \"/tmp/s.json\"\n", secret.display());
        let e = parse_witness(&w, "w.toml").unwrap_err();
        assert_eq!(e.key, "secret_file", "{e}");
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(parse_witness(&w, "w.toml").unwrap().secret, b"replication-secret-from-file");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_default_metrics_port_differs_per_site() {
        let base = &MIRROR[MIRROR.find("[[bdev]]").unwrap()..]
            .replace("{DIR}/data/leg.img", "/tmp/leg")
            .replace("{DIR}/meta/m.meta", "/tmp/m.meta");
        let with = |target: &str| parse(&format!("[target]\ncores = [0]\n{target}\n[metrics]\n{base}"), "m.toml").unwrap().metrics;
        assert_eq!(with(""), Some("127.0.0.1:9775".parse().unwrap()));
        assert_eq!(with("site = 1"), Some("127.0.0.1:9776".parse().unwrap()));
        assert_eq!(with("site = 2"), Some("127.0.0.1:9777".parse().unwrap()));
    }

    #[test]
    fn durations() {
        use std::time::Duration;
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("1h 30m 15s"), Some(Duration::from_secs(5415)));
        assert_eq!(parse_duration("2 days"), None, "the unit follows the number");
        assert_eq!(parse_duration("2days"), Some(Duration::from_secs(172_800)));
        assert_eq!(parse_duration("75us"), Some(Duration::from_micros(75)));
        assert_eq!(parse_duration("10"), None, "a unit is needed");
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("1.5s"), None);
    }
}
