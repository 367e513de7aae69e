//! nvmetro's configuration: one TOML file describes reactors, block devices, subsystems with
//! their namespaces and allowed hosts, and listeners. Unknown keys are errors, and every error
//! names the file, the line and the key, so an operator can fix it without guessing.
//!
//! ```toml
//! [target]
//! cores = [0]
//! poll_mode = "adaptive"      # or "busy" (spin; for benchmarks)
//! discovery = ["127.0.0.1:8009"]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PollMode {
    /// Spin, then yield, then park until a socket, a completion or a message wakes the reactor.
    Adaptive,
    /// Spin forever: lowest latency, one full core per reactor.
    Busy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetSection {
    #[serde(default = "default_cores")]
    pub cores: Spanned<Vec<usize>>,
    #[serde(default = "default_poll_mode")]
    pub poll_mode: PollMode,
    /// Extra discovery-only listeners (the discovery subsystem also answers on every listener).
    #[serde(default)]
    pub discovery: Vec<Spanned<String>>,
    /// Unix socket for management commands (`nvmetro status`, reload).
    pub socket: Option<Spanned<PathBuf>>,
    /// The site this target stands at (for hosts' preferred paths, see `[[host]]`).
    pub site: Option<u8>,
}

fn default_cores() -> Spanned<Vec<usize>> {
    Spanned::new(0..0, vec![0])
}
fn default_poll_mode() -> PollMode {
    PollMode::Adaptive
}

impl Default for TargetSection {
    fn default() -> Self {
        TargetSection { cores: default_cores(), poll_mode: PollMode::Adaptive, discovery: Vec::new(), socket: None, site: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BdevKind {
    Malloc,
    Null,
    File,
    /// Synchronous two-site mirror over a local (file) bdev.
    Mirror,
    /// Error injection over another bdev (`base`): fails, delays or drops the commands its
    /// fault rules select (initial `rules` here; changed live over the management socket).
    Error,
}

/// A byte size: an integer or a string such as "512MiB", "1GiB", "4k", "1TB" (see [`parse_size`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl Size {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size in bytes or a string such as \"512MiB\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Size, E> {
                u64::try_from(v).map(Size).map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Size, E> {
                parse_size(s).map(Size).ok_or_else(|| {
                    E::custom(format!(
                        "`{s}` is not a size: use KiB/MiB/GiB/TiB (or K/M/G/T) for powers of 1024, kB/MB/GB/TB for powers of 1000, e.g. \"512MiB\""
                    ))
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// Parses a byte size as `dd` and the SI/IEC standards read it: "4096" or "4096B" bytes;
/// "KiB", "MiB", "GiB", "TiB", "PiB" and the bare "K", "M", "G", "T", "P" are powers of 1024;
/// "kB"/"KB", "MB", "GB", "TB", "PB" are powers of 1000 (so "1TB" is 10^12 bytes, "1TiB" 2^40).
/// Units are case-insensitive except that "m"/"mb" never mean milli. A fraction is allowed when
/// it comes to whole bytes ("1.5GiB"). `None`: not a size, or more than 2^64 - 1 bytes.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if int.is_empty() || frac.len() > 18 || (num.contains('.') && frac.is_empty()) {
        return None;
    }
    let unit = unit.trim().to_ascii_lowercase();
    let (base, power): (u128, u32) = match unit.as_str() {
        "" | "b" => (1, 0),
        "k" | "kib" => (1024, 1),
        "m" | "mib" => (1024, 2),
        "g" | "gib" => (1024, 3),
        "t" | "tib" => (1024, 4),
        "p" | "pib" => (1024, 5),
        "kb" => (1000, 1),
        "mb" => (1000, 2),
        "gb" => (1000, 3),
        "tb" => (1000, 4),
        "pb" => (1000, 5),
        _ => return None,
    };
    let mult = base.pow(power);
    let scale = 10u128.pow(frac.len() as u32);
    let int: u128 = int.parse().ok()?;
    let frac: u128 = if frac.is_empty() { 0 } else { frac.parse().ok()? };
    let scaled = int.checked_mul(scale)?.checked_add(frac)?.checked_mul(mult)?;
    if scaled % scale != 0 {
        return None; // not a whole number of bytes
    }
    u64::try_from(scaled / scale).ok()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevSection {
    pub name: Spanned<String>,
    pub kind: BdevKind,
    pub size: Option<Spanned<Size>>,
    #[serde(default = "default_block_size")]
    pub block_size: Spanned<u32>,
    /// malloc: back the memory with 2 MiB hugepages when reserved.
    #[serde(default)]
    pub hugepages: bool,
    /// file: path of a file or block device.
    pub path: Option<Spanned<PathBuf>>,
    /// file: use O_DIRECT (default true).
    #[serde(default = "yes")]
    pub direct: bool,
    /// mirror: the local leg (a file bdev).
    pub local: Option<Spanned<String>>,
    /// mirror: "preferred" (keeps serving when the peer is lost; listens for the link) or
    /// "secondary" (fences itself; dials the preferred).
    pub role: Option<Spanned<String>>,
    /// mirror: this site's number (1 or 2).
    pub site: Option<u8>,
    /// mirror, preferred: where the replication link is accepted.
    pub listen: Option<Spanned<String>>,
    /// mirror, secondary: the preferred site's link address.
    pub peer: Option<Spanned<String>>,
    /// mirror: the metadata file (generations, dirty-region bitmap).
    pub metadata: Option<Spanned<PathBuf>>,
    /// mirror: resync speed limit per second, e.g. "200MiB" (default unlimited).
    pub resync_rate: Option<Size>,
    /// mirror: dirty-tracking and resync region, a power of two (default 1MiB).
    pub region_size: Option<Spanned<Size>>,
    /// mirror: delay added to every frame this site sends, e.g. "75us" (benchmarks and tests
    /// emulating distance; a round trip gains twice this when both sites set it).
    pub link_delay: Option<Spanned<String>>,
    /// mirror: silence from the peer after which the link counts as lost (default "3s"; "1s"
    /// with a witness). In metro mode a leg stops serving after half of it.
    pub heartbeat_timeout: Option<Spanned<String>>,
    /// mirror, metro mode: "automatic" (default) or "manual": whether a resynced leg serves again
    /// on its own or waits for `nvmetro failback`.
    pub failback: Option<Spanned<String>>,
    /// mirror: the secret shared with the other site that authenticates the replication link
    /// (at least 16 characters), as the `[witness]` secret is given.
    pub secret: Option<Spanned<String>>,
    /// mirror: a file holding that secret (instead of `secret`); it must not be readable by
    /// group or others.
    pub secret_file: Option<Spanned<PathBuf>>,
    /// mirror: how often a leg whose disk failed I/O retries to resync (default "30s"; "0s": only
    /// when the operator asks).
    pub retry_interval: Option<Spanned<String>>,
    /// error: the bdev whose commands it passes on (or fails).
    pub base: Option<Spanned<String>>,
    /// error: the fault rules it starts with, as JSON (one rule or an array of them, e.g.
    /// `'[{"op":"write","error":"nospace","after":100}]'`; see `nvmetro_bdev::error::parse_rules`).
    pub rules: Option<Spanned<String>>,
}

fn default_block_size() -> Spanned<u32> {
    Spanned::new(0..0, 512)
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSection {
    pub nsid: Spanned<u32>,
    pub bdev: Spanned<String>,
    /// 32 hex digits; derived from the subsystem NQN and NSID when absent.
    pub nguid: Option<Spanned<String>>,
    /// 16 hex digits; derived like the NGUID when absent.
    pub eui64: Option<Spanned<String>>,
    /// RFC 4122 form; none when absent.
    pub uuid: Option<Spanned<String>>,
    #[serde(default = "one")]
    pub ana_group: Spanned<u32>,
}

fn one() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubsystemSection {
    pub nqn: Spanned<String>,
    #[serde(default = "default_serial")]
    pub serial: String,
    #[serde(default = "default_model")]
    pub model: String,
    #[serde(default)]
    pub allowed_hosts: Vec<Spanned<String>>,
    #[serde(default)]
    pub allow_any_host: bool,
    /// Controller IDs this site hands out; give each site of a metro its own range.
    #[serde(default = "default_cntlid_range")]
    pub cntlid_range: Spanned<[u16; 2]>,
    #[serde(default = "default_max_namespaces")]
    pub max_namespaces: Spanned<u32>,
    /// ANATT: seconds an ANA transition may take.
    #[serde(default = "default_anatt")]
    pub ana_transition_time: u8,
    #[serde(default, rename = "namespace")]
    pub namespaces: Vec<NamespaceSection>,
}

fn default_serial() -> String {
    "NVMETRO0001".into()
}
fn default_model() -> String {
    "nvmetro".into()
}
fn default_cntlid_range() -> Spanned<[u16; 2]> {
    Spanned::new(0..0, [1, 0xffef])
}
fn default_max_namespaces() -> Spanned<u32> {
    Spanned::new(0..0, 32)
}
fn default_anatt() -> u8 {
    10
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerSection {
    pub address: Spanned<String>,
    /// ANA state of each group on this listener, e.g. `{ "1" = "optimized", "2" = "non-optimized" }`;
    /// groups not named are optimized.
    #[serde(default)]
    pub ana_states: BTreeMap<String, Spanned<String>>,
}

/// The Prometheus endpoint: off unless the section is present; loopback unless told otherwise.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MetricsSection {
    pub address: Option<Spanned<String>>,
}

/// The metro witness this site's mirrors consult when they lose their peer.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessSection {
    pub address: Spanned<String>,
    /// The secret shared with the witness and the other site (at least 16 characters).
    pub secret: Option<Spanned<String>>,
    /// A file holding the secret (instead of `secret`).
    pub secret_file: Option<Spanned<PathBuf>>,
}

/// Where the witness is, for the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessConfig {
    pub address: SocketAddr,
    pub secret: Vec<u8>,
}

/// Where metrics are served when `[metrics]` names no address.
pub const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:9775";

/// A host's home site: its controllers on other sites report Optimized groups as Non-Optimized.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSection {
    pub nqn: Spanned<String>,
    pub site: u8,
}

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub target: TargetSection,
    #[serde(default, rename = "bdev")]
    pub bdevs: Vec<BdevSection>,
    #[serde(default, rename = "subsystem")]
    pub subsystems: Vec<SubsystemSection>,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<ListenerSection>,
    #[serde(default, rename = "host")]
    pub hosts: Vec<HostSection>,
    pub metrics: Option<MetricsSection>,
    pub witness: Option<WitnessSection>,
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
    /// Home site of each host NQN that has one.
    pub host_sites: BTreeMap<String, u8>,
    /// Prometheus endpoint, if enabled.
    pub metrics: Option<SocketAddr>,
    /// Metro mode: every mirror consults this witness.
    pub witness: Option<WitnessConfig>,
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
    pub metadata: PathBuf,
    pub resync_rate: u64,
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
}

struct Ctx<'a> {
    file: &'a str,
    text: &'a str,
}

impl Ctx<'_> {
    fn err(&self, span: std::ops::Range<usize>, key: &str, message: impl Into<String>) -> ConfigError {
        let line =
            if span.is_empty() && span.start == 0 { 0 } else { self.text[..span.start.min(self.text.len())].matches('\n').count() + 1 };
        ConfigError { file: self.file.into(), line, key: key.into(), message: message.into() }
    }
}

fn witness_config(ctx: &Ctx, w: &WitnessSection) -> Result<WitnessConfig, ConfigError> {
    let address = w
        .address
        .get_ref()
        .parse()
        .map_err(|_| ctx.err(w.address.span(), "witness.address", format!("`{}` is not an address:port", w.address.get_ref())))?;
    let secret = read_secret(ctx, "witness.", w.secret.as_ref(), w.secret_file.as_ref(), &w.address)?;
    Ok(WitnessConfig { address, secret })
}

/// A shared secret given inline or in a file; at least 16 bytes. `prefix` is the keys' section
/// ("witness.", "bdev.", or "" at the top level); `anchor` places the error when neither is given.
fn read_secret(
    ctx: &Ctx,
    prefix: &str,
    inline: Option<&Spanned<String>>,
    file: Option<&Spanned<PathBuf>>,
    anchor: &Spanned<String>,
) -> Result<Vec<u8>, ConfigError> {
    read_optional_secret(ctx, prefix, inline, file)?
        .ok_or_else(|| ctx.err(anchor.span(), &format!("{prefix}secret"), "give exactly one of `secret` and `secret_file`"))
}

/// As [`read_secret`], where giving neither key is allowed (`None`).
fn read_optional_secret(
    ctx: &Ctx,
    prefix: &str,
    inline: Option<&Spanned<String>>,
    file: Option<&Spanned<PathBuf>>,
) -> Result<Option<Vec<u8>>, ConfigError> {
    let (secret, span, key) = match (inline, file) {
        (None, None) => return Ok(None),
        (Some(s), None) => (s.get_ref().as_bytes().to_vec(), s.span(), "secret"),
        (None, Some(f)) => {
            let key = format!("{prefix}secret_file");
            let path = f.get_ref();
            let meta = std::fs::metadata(path).map_err(|e| ctx.err(f.span(), &key, format!("cannot read {}: {e}", path.display())))?;
            let mode = std::os::unix::fs::PermissionsExt::mode(&meta.permissions());
            if mode & 0o077 != 0 {
                return Err(ctx.err(
                    f.span(),
                    &key,
                    format!("{} is readable by group or others (mode {:o}): chmod 600 it", path.display(), mode & 0o777),
                ));
            }
            let text =
                std::fs::read_to_string(path).map_err(|e| ctx.err(f.span(), &key, format!("cannot read {}: {e}", path.display())))?;
            (text.trim().as_bytes().to_vec(), f.span(), "secret_file")
        }
        (Some(s), Some(_)) => return Err(ctx.err(s.span(), &format!("{prefix}secret"), "give exactly one of `secret` and `secret_file`")),
    };
    if secret.len() < 16 {
        return Err(ctx.err(span, &format!("{prefix}{key}"), "the shared secret needs at least 16 characters"));
    }
    Ok(Some(secret))
}

/// The witness daemon's file (`conf/witness.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessDaemonSection {
    /// UDP address to answer on.
    pub listen: Spanned<String>,
    pub secret: Option<Spanned<String>>,
    pub secret_file: Option<Spanned<PathBuf>>,
    /// Where decisions are kept across restarts.
    pub state: Spanned<PathBuf>,
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
    let config = parse(&text, &file).map_err(|e| vec![e])?;
    let raw: RawConfig = toml::from_str(&text).map_err(|e| vec![toml_error(&e, &text, &file)])?;
    let ctx = Ctx { file: &file, text: &text };
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

/// The directory `p` is created in ("." for a bare name).
fn parent_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A file opened for writing and created when absent (unless `creatable` says why not).
fn check_file(ctx: &Ctx, p: &Spanned<PathBuf>, key: &str, creatable: Result<(), &str>) -> Option<ConfigError> {
    let path = p.get_ref();
    let problem = match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Some(format!("{} is a directory", path.display())),
        Ok(_) => nvmetro_ffi::check_writable(path).err().map(|e| format!("{} is not writable: {e}", path.display())),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory) => {
            if let Some(e) = check_parent(ctx, p, key) {
                return Some(e);
            }
            creatable.err().map(|why| format!("{} does not exist and {why}", path.display()))
        }
        Err(e) => Some(format!("{}: {e}", path.display())),
    };
    problem.map(|m| ctx.err(p.span(), key, m))
}

/// A path created (or replaced) in its directory: that directory must exist and be writable.
fn check_parent(ctx: &Ctx, p: &Spanned<PathBuf>, key: &str) -> Option<ConfigError> {
    let path = p.get_ref();
    let dir = parent_of(path);
    let problem = match std::fs::metadata(&dir) {
        Ok(m) if !m.is_dir() => Some(format!("cannot create {}: {} is not a directory", path.display(), dir.display())),
        Ok(_) => nvmetro_ffi::check_writable(&dir)
            .err()
            .map(|e| format!("cannot create {}: its directory {} is not writable ({e})", path.display(), dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Some(format!("cannot create {}: its directory {} does not exist", path.display(), dir.display()))
        }
        Err(e) => Some(format!("cannot create {}: {}: {e}", path.display(), dir.display())),
    };
    problem.map(|m| ctx.err(p.span(), key, m))
}

/// Parses and validates config text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    let ctx = Ctx { file, text };
    let raw: RawConfig = toml::from_str(text).map_err(|e| toml_error(&e, text, file))?;
    validate(raw, &ctx)
}

fn toml_error(e: &toml::de::Error, text: &str, file: &str) -> ConfigError {
    let span = e.span().unwrap_or(0..0);
    let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
    let msg = e.message().to_string();
    let field = msg.split('`').nth(1).filter(|_| msg.starts_with("unknown field") || msg.starts_with("missing field"));
    let (section, line_key) = key_at(text, span.start);
    let key = match (field.or(line_key.as_deref()), section.is_empty()) {
        (Some(k), true) => k.to_string(),
        (Some(k), false) => format!("{section}.{k}"),
        (None, false) => section,
        (None, true) => "(top level)".to_string(),
    };
    ConfigError { file: file.into(), line, key, message: msg }
}

/// Whether `name` (what stands between a header's brackets) is a table name.
fn table_name(header: &str) -> Option<&str> {
    let name = header.trim().trim_start_matches('[').split(']').next()?.trim();
    let ok = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.\"' ".contains(c));
    ok.then_some(name)
}

/// The table (`bdev`, `subsystem.namespace`, "" at the top) and the key written on the line of
/// byte `pos` of `text`, found from the text itself (for errors the TOML parser reports with a
/// position only).
fn key_at(text: &str, pos: usize) -> (String, Option<String>) {
    let pos = pos.min(text.len());
    let line_end = text[pos..].find('\n').map_or(text.len(), |i| pos + i);
    let mut section = String::new();
    let mut here = "";
    for l in text[..line_end].lines() {
        let t = l.trim();
        if t.starts_with('[') {
            if let Some(name) = table_name(t) {
                section = name.replace(['"', '\'', ' '], "");
            }
        }
        here = t;
    }
    let line_key = if here.starts_with('[') || here.starts_with('#') {
        None
    } else {
        here.split_once('=').map(|(k, _)| k.trim().replace(['"', '\''], "")).filter(|k| !k.is_empty())
    };
    (section, line_key)
}

fn hex<const N: usize>(ctx: &Ctx, s: &Spanned<String>, key: &str) -> Result<[u8; N], ConfigError> {
    let clean: String = s.get_ref().chars().filter(|c| *c != '-' && *c != ':').collect();
    if clean.len() != N * 2 || !clean.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ctx.err(s.span(), key, format!("`{}` is not {} hex digits", s.get_ref(), N * 2)));
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&clean[i * 2..i * 2 + 2], 16).expect("checked hex");
    }
    Ok(out)
}

/// A stable identifier derived from the subsystem NQN and NSID (FNV-1a), so that both sites of a
/// metro derive the same NGUID for the same namespace without configuring one.
fn derived_id(nqn: &str, nsid: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    for (half, seed) in [(0usize, 0xcbf2_9ce4_8422_2325u64), (8, 0x6c62_272e_07bb_0142)] {
        let mut h = seed;
        for b in nqn.bytes().chain(nsid.to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        out[half..half + 8].copy_from_slice(&h.to_be_bytes());
    }
    out
}

fn valid_nqn(s: &str) -> bool {
    s.len() <= 223 && s.starts_with("nqn.") && s.len() > 4 && s.is_ascii() && !s.contains(char::is_whitespace)
}

fn mirror_config(ctx: &Ctx, b: &BdevSection) -> Result<MirrorConfig, ConfigError> {
    let name = b.name.get_ref();
    let need = |key: &str| ctx.err(b.name.span(), &format!("bdev.{key}"), format!("mirror `{name}` needs `{key}`"));
    let local = b.local.as_ref().ok_or_else(|| need("local"))?.get_ref().clone();
    let role = b.role.as_ref().ok_or_else(|| need("role"))?;
    let preferred = match role.get_ref().as_str() {
        "preferred" => true,
        "secondary" => false,
        other => return Err(ctx.err(role.span(), "bdev.role", format!("`{other}` is not \"preferred\" or \"secondary\""))),
    };
    let addr = |v: &Option<Spanned<String>>, key: &str| -> Result<Option<SocketAddr>, ConfigError> {
        v.as_ref()
            .map(|a| {
                a.get_ref()
                    .parse()
                    .map_err(|_| ctx.err(a.span(), &format!("bdev.{key}"), format!("`{}` is not an address:port", a.get_ref())))
            })
            .transpose()
    };
    let listen = addr(&b.listen, "listen")?;
    let peer = addr(&b.peer, "peer")?;
    if preferred && listen.is_none() {
        return Err(need("listen"));
    }
    if !preferred && peer.is_none() {
        return Err(need("peer"));
    }
    let metadata = b.metadata.as_ref().ok_or_else(|| need("metadata"))?.get_ref().clone();
    let region = b.region_size.as_ref().map_or(1 << 20, |r| r.get_ref().bytes());
    if !region.is_power_of_two() || !(65536..=(64 << 20)).contains(&region) {
        let span = b.region_size.as_ref().map_or(b.name.span(), Spanned::span);
        return Err(ctx.err(span, "bdev.region_size", "must be a power of two from 64KiB to 64MiB"));
    }
    let link_delay_us = match &b.link_delay {
        None => 0,
        Some(d) => parse_micros(d.get_ref()).ok_or_else(|| {
            ctx.err(d.span(), "bdev.link_delay", format!("`{}` is not a duration such as \"75us\" or \"1ms\"", d.get_ref()))
        })?,
    };
    let heartbeat_timeout_ms = match &b.heartbeat_timeout {
        None => None,
        Some(d) => match parse_micros(d.get_ref()) {
            Some(us) if (100_000..=60_000_000).contains(&us) => Some(us / 1000),
            _ => return Err(ctx.err(d.span(), "bdev.heartbeat_timeout", format!("`{}` is not a duration from 100ms to 60s", d.get_ref()))),
        },
    };
    let manual_failback = match &b.failback {
        None => false,
        Some(f) => match f.get_ref().as_str() {
            "automatic" => false,
            "manual" => true,
            other => return Err(ctx.err(f.span(), "bdev.failback", format!("`{other}` is not \"automatic\" or \"manual\""))),
        },
    };
    let secret = read_optional_secret(ctx, "bdev.", b.secret.as_ref(), b.secret_file.as_ref())?;
    let retry_interval = match &b.retry_interval {
        None => Some(DEFAULT_RETRY_INTERVAL),
        Some(d) => match parse_duration(d.get_ref()) {
            Some(t) if t.is_zero() => None,
            Some(t) => Some(t),
            None => {
                return Err(ctx.err(
                    d.span(),
                    "bdev.retry_interval",
                    format!("`{}` is not a duration such as \"30s\", \"5m\" or \"1h 30m\" (\"0s\": only on request)", d.get_ref()),
                ))
            }
        },
    };
    Ok(MirrorConfig {
        secret,
        retry_interval,
        heartbeat_timeout_ms,
        manual_failback,
        link_delay_us,
        local,
        preferred,
        site: b.site.unwrap_or(if preferred { 1 } else { 2 }),
        listen,
        peer,
        metadata,
        resync_rate: b.resync_rate.map_or(0, Size::bytes),
        region_shift: region.trailing_zeros(),
    })
}

/// Parses a duration as humantime writes them: one or more `<number><unit>` terms, optionally
/// separated by spaces ("30s", "1m 30s", "1h30m", "250ms"), units ns, us/µs, ms, s/sec/secs/
/// second/seconds, m/min/mins/minute/minutes, h/hr/hrs/hour/hours, d/day/days; a bare "0" is
/// zero. `None`: not a duration.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let s = s.trim();
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c.is_whitespace()).unwrap_or(rest.len());
        let term = match &rest[..unit_len] {
            "ns" | "nsec" => Duration::from_nanos(n),
            "us" | "µs" | "usec" => Duration::from_micros(n),
            "ms" | "msec" => Duration::from_millis(n),
            "s" | "sec" | "secs" | "second" | "seconds" => Duration::from_secs(n),
            "m" | "min" | "mins" | "minute" | "minutes" => Duration::from_secs(n.checked_mul(60)?),
            "h" | "hr" | "hrs" | "hour" | "hours" => Duration::from_secs(n.checked_mul(3600)?),
            "d" | "day" | "days" => Duration::from_secs(n.checked_mul(86400)?),
            _ => return None,
        };
        total = total.checked_add(term)?;
        rest = rest[unit_len..].trim_start();
    }
    Some(total)
}

/// Parses "75us", "1ms", "2s" into microseconds.
pub fn parse_micros(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let n: u64 = s[..split].parse().ok()?;
    Some(match &s[split..] {
        "us" => n,
        "ms" => n * 1000,
        "s" => n * 1_000_000,
        _ => return None,
    })
}

const ANA_STATES: [&str; 4] = ["optimized", "non-optimized", "inaccessible", "persistent-loss"];

fn validate(raw: RawConfig, ctx: &Ctx) -> Result<Config, ConfigError> {
    let cores = raw.target.cores.get_ref().clone();
    if cores.is_empty() {
        return Err(ctx.err(raw.target.cores.span(), "target.cores", "needs at least one core"));
    }
    let mut seen = HashSet::new();
    for c in &cores {
        if !seen.insert(c) {
            return Err(ctx.err(raw.target.cores.span(), "target.cores", format!("core {c} is listed twice")));
        }
    }
    let mut discovery = Vec::new();
    for d in &raw.target.discovery {
        discovery.push(
            d.get_ref().parse().map_err(|_| ctx.err(d.span(), "target.discovery", format!("`{}` is not an address:port", d.get_ref())))?,
        );
    }

    let mut bdevs = Vec::new();
    let mut bdev_sizes = HashMap::new();
    for b in &raw.bdevs {
        let name = b.name.get_ref();
        if name.is_empty() || bdev_sizes.contains_key(name.as_str()) {
            return Err(ctx.err(b.name.span(), "bdev.name", format!("`{name}` is empty or used twice")));
        }
        let bs = *b.block_size.get_ref();
        if bs != 512 && bs != 4096 {
            return Err(ctx.err(b.block_size.span(), "bdev.block_size", format!("{bs} is not 512 or 4096")));
        }
        let size = b.size.as_ref().map(|s| s.get_ref().bytes());
        let mirror_keys = b.local.is_some()
            || b.role.is_some()
            || b.listen.is_some()
            || b.peer.is_some()
            || b.metadata.is_some()
            || b.failback.is_some()
            || b.heartbeat_timeout.is_some()
            || b.secret.is_some()
            || b.secret_file.is_some()
            || b.retry_interval.is_some();
        if b.kind != BdevKind::Mirror && mirror_keys {
            return Err(ctx.err(
                b.name.span(),
                "bdev",
                format!("bdev `{name}`: local/role/listen/peer/metadata/secret/retry_interval belong to mirror bdevs"),
            ));
        }
        if b.kind != BdevKind::Error && (b.base.is_some() || b.rules.is_some()) {
            return Err(ctx.err(b.name.span(), "bdev", format!("bdev `{name}`: base/rules belong to error bdevs")));
        }
        if b.kind == BdevKind::Error {
            if let Some(p) = &b.path {
                return Err(ctx.err(p.span(), "bdev.path", "an error bdev has no path: it passes commands on to its `base`"));
            }
            if let Some(s) = &b.size {
                return Err(ctx.err(s.span(), "bdev.size", "an error bdev has no size of its own: it has its `base`'s"));
            }
            if b.block_size.span() != (0..0) {
                return Err(ctx.err(b.block_size.span(), "bdev.block_size", "an error bdev has its `base`'s block size"));
            }
            let base = b
                .base
                .as_ref()
                .ok_or_else(|| ctx.err(b.name.span(), "bdev.base", format!("error bdev `{name}` needs `base` (the bdev it wraps)")))?;
            if base.get_ref() == name {
                return Err(ctx.err(base.span(), "bdev.base", format!("error bdev `{name}` cannot wrap itself")));
            }
            let rules = match &b.rules {
                None => None,
                Some(r) => {
                    nvmetro_bdev::error::parse_rules(r.get_ref()).map_err(|e| {
                        ctx.err(
                            r.span(),
                            "bdev.rules",
                            format!("{e} (rules are JSON: one rule or an array, e.g. '[{{\"op\":\"write\",\"error\":\"eio\"}}]')"),
                        )
                    })?;
                    Some(r.get_ref().clone())
                }
            };
            bdev_sizes.insert(name.as_str(), ());
            bdevs.push(BdevConfig {
                name: name.clone(),
                kind: b.kind,
                size: None,
                block_size: bs,
                hugepages: false,
                path: None,
                direct: false,
                mirror: None,
                error: Some(ErrorConfig { base: base.get_ref().clone(), rules }),
            });
            continue;
        }
        if b.kind == BdevKind::Mirror {
            bdev_sizes.insert(name.as_str(), ());
            bdevs.push(BdevConfig {
                name: name.clone(),
                kind: b.kind,
                size: None,
                block_size: bs,
                hugepages: false,
                path: None,
                direct: false,
                mirror: Some(mirror_config(ctx, b)?),
                error: None,
            });
            continue;
        }
        match (b.kind, &b.size, &b.path) {
            (BdevKind::Malloc | BdevKind::Null, None, _) => {
                return Err(ctx.err(b.name.span(), "bdev.size", format!("bdev `{name}` needs a size")))
            }
            (BdevKind::File, _, None) => return Err(ctx.err(b.name.span(), "bdev.path", format!("file bdev `{name}` needs a path"))),
            (BdevKind::Malloc | BdevKind::Null, Some(_), Some(p)) => {
                return Err(ctx.err(p.span(), "bdev.path", "only file bdevs have a path"))
            }
            _ => {}
        }
        if let (Some(bytes), Some(s)) = (size, &b.size) {
            if bytes < u64::from(bs) || bytes % u64::from(bs) != 0 {
                return Err(ctx.err(s.span(), "bdev.size", format!("{bytes} bytes is not a positive multiple of the {bs}-byte block")));
            }
        }
        bdev_sizes.insert(name.as_str(), ());
        bdevs.push(BdevConfig {
            name: name.clone(),
            kind: b.kind,
            size,
            block_size: bs,
            hugepages: b.hugepages,
            path: b.path.as_ref().map(|p| p.get_ref().clone()),
            direct: b.direct,
            mirror: None,
            error: None,
        });
    }
    // An error bdev's base must exist, and chains of bdevs built on each other end somewhere.
    for b in &raw.bdevs {
        let (Some(base), BdevKind::Error) = (&b.base, b.kind) else { continue };
        let Some(under) = bdevs.iter().find(|x| &x.name == base.get_ref()) else {
            return Err(ctx.err(base.span(), "bdev.base", format!("no bdev named `{}`", base.get_ref())));
        };
        let mut seen = HashSet::from([b.name.get_ref().as_str()]);
        let mut at = under;
        while let Some(next) = at.depends_on() {
            if !seen.insert(at.name.as_str()) {
                return Err(ctx.err(base.span(), "bdev.base", format!("bdev `{}` is built on itself (a cycle)", b.name.get_ref())));
            }
            match bdevs.iter().find(|x| x.name == next) {
                Some(x) => at = x,
                None => break, // reported at that bdev
            }
        }
    }
    // A mirror's local leg must be a persistent bdev (a file bdev, or an error bdev over one),
    // and serves only through the mirror.
    let mut legs = HashSet::new();
    for b in &raw.bdevs {
        let Some(local) = &b.local else { continue };
        let leg = bdevs.iter().find(|x| &x.name == local.get_ref());
        let persistent = |l: &BdevConfig| l.kind == BdevKind::File;
        let base_of = |l: &BdevConfig| l.error.as_ref().and_then(|e| bdevs.iter().find(|x| x.name == e.base));
        let mut beneath = None;
        match leg {
            None => return Err(ctx.err(local.span(), "bdev.local", format!("no bdev named `{}`", local.get_ref()))),
            Some(l) if persistent(l) => {}
            Some(l) if l.kind == BdevKind::Error && base_of(l).is_some_and(persistent) => beneath = base_of(l),
            Some(l) => {
                return Err(ctx.err(
                    local.span(),
                    "bdev.local",
                    format!(
                        "`{}` is {}; a mirror leg must survive a restart (use kind = \"file\", or an error bdev over a file bdev)",
                        local.get_ref(),
                        match base_of(l) {
                            Some(under) => format!("an error bdev over a {:?} bdev", under.kind),
                            None => format!("a {:?} bdev", l.kind),
                        }
                    ),
                ))
            }
        }
        for name in std::iter::once(local.get_ref()).chain(beneath.map(|x| &x.name)) {
            if !legs.insert(name.clone()) {
                return Err(ctx.err(local.span(), "bdev.local", format!("`{name}` is already the leg of another mirror")));
            }
        }
    }

    let mut subsystems = Vec::new();
    let mut nqns = HashSet::new();
    let mut used_bdevs = HashSet::new();
    for s in &raw.subsystems {
        let nqn = s.nqn.get_ref();
        if !valid_nqn(nqn) {
            return Err(ctx.err(s.nqn.span(), "subsystem.nqn", format!("`{nqn}` is not an NQN (nqn.yyyy-mm.reverse.domain:name)")));
        }
        if nqn == "nqn.2014-08.org.nvmexpress.discovery" || !nqns.insert(nqn.clone()) {
            return Err(ctx.err(s.nqn.span(), "subsystem.nqn", format!("`{nqn}` is reserved or used twice")));
        }
        for h in &s.allowed_hosts {
            if !valid_nqn(h.get_ref()) {
                return Err(ctx.err(h.span(), "subsystem.allowed_hosts", format!("`{}` is not a host NQN", h.get_ref())));
            }
        }
        if s.allowed_hosts.is_empty() && !s.allow_any_host {
            return Err(ctx.err(
                s.nqn.span(),
                "subsystem.allowed_hosts",
                format!("subsystem `{nqn}` admits no host: list allowed_hosts or set allow_any_host = true"),
            ));
        }
        let [lo, hi] = *s.cntlid_range.get_ref();
        if lo == 0 || hi > 0xffef || lo > hi {
            return Err(ctx.err(
                s.cntlid_range.span(),
                "subsystem.cntlid_range",
                format!("[{lo}, {hi}] must lie within [1, 65519], low first"),
            ));
        }
        let max_ns = *s.max_namespaces.get_ref();
        if max_ns == 0 || max_ns > 1024 {
            return Err(ctx.err(s.max_namespaces.span(), "subsystem.max_namespaces", "must be 1 to 1024"));
        }
        let mut namespaces = Vec::new();
        let mut nsids = HashSet::new();
        let mut groups = HashSet::new();
        for ns in &s.namespaces {
            let nsid = *ns.nsid.get_ref();
            if nsid == 0 || nsid > max_ns {
                return Err(ctx.err(ns.nsid.span(), "subsystem.namespace.nsid", format!("{nsid} is outside 1..={max_ns}")));
            }
            if !nsids.insert(nsid) {
                return Err(ctx.err(ns.nsid.span(), "subsystem.namespace.nsid", format!("NSID {nsid} is used twice in `{nqn}`")));
            }
            let bdev = ns.bdev.get_ref();
            if !bdev_sizes.contains_key(bdev.as_str()) {
                return Err(ctx.err(ns.bdev.span(), "subsystem.namespace.bdev", format!("no bdev named `{bdev}`")));
            }
            if legs.contains(bdev) {
                return Err(ctx.err(
                    ns.bdev.span(),
                    "subsystem.namespace.bdev",
                    format!("bdev `{bdev}` is a mirror's local leg; export the mirror instead"),
                ));
            }
            if !used_bdevs.insert(bdev.clone()) {
                return Err(ctx.err(ns.bdev.span(), "subsystem.namespace.bdev", format!("bdev `{bdev}` already backs another namespace")));
            }
            let group = *ns.ana_group.get_ref();
            if group == 0 || group > 128 {
                return Err(ctx.err(ns.ana_group.span(), "subsystem.namespace.ana_group", "must be 1 to 128"));
            }
            groups.insert(group);
            let derived = derived_id(nqn, nsid);
            let nguid = match &ns.nguid {
                Some(s) => hex::<16>(ctx, s, "subsystem.namespace.nguid")?,
                None => derived,
            };
            let eui64 = match &ns.eui64 {
                Some(s) => hex::<8>(ctx, s, "subsystem.namespace.eui64")?,
                None => derived[8..].try_into().expect("8 bytes"),
            };
            let uuid = match &ns.uuid {
                Some(s) => hex::<16>(ctx, s, "subsystem.namespace.uuid")?,
                None => [0; 16],
            };
            namespaces.push(NamespaceConfig { nsid, bdev: bdev.clone(), nguid, eui64, uuid, ana_group: group });
        }
        namespaces.sort_by_key(|n| n.nsid);
        let ana_groups = groups.iter().copied().max().unwrap_or(1);
        if let Some(gap) = (1..=ana_groups).find(|g| !groups.contains(g)) {
            return Err(ctx.err(
                s.nqn.span(),
                "subsystem.namespace.ana_group",
                format!("ANA groups must be dense from 1; group {gap} is unused"),
            ));
        }
        subsystems.push(SubsystemConfig {
            nqn: nqn.clone(),
            serial: s.serial.clone(),
            model: s.model.clone(),
            allowed_hosts: s.allowed_hosts.iter().map(|h| h.get_ref().clone()).collect(),
            allow_any_host: s.allow_any_host,
            cntlid_min: lo,
            cntlid_max: hi,
            max_namespaces: max_ns,
            ana_transition_time: s.ana_transition_time,
            ana_groups,
            namespaces,
        });
    }

    if raw.listeners.is_empty() {
        return Err(ctx.err(0..0, "listener", "no [[listener]]: add one with address = \"127.0.0.1:4420\""));
    }
    let mut listeners = Vec::new();
    let mut addrs = HashSet::new();
    for l in &raw.listeners {
        let address: SocketAddr = l
            .address
            .get_ref()
            .parse()
            .map_err(|_| ctx.err(l.address.span(), "listener.address", format!("`{}` is not an address:port", l.address.get_ref())))?;
        if !addrs.insert(address) || discovery.contains(&address) {
            return Err(ctx.err(l.address.span(), "listener.address", format!("{address} is listed twice")));
        }
        let mut ana_states = BTreeMap::new();
        for (group, state) in &l.ana_states {
            let g: u32 = group
                .parse()
                .ok()
                .filter(|g| *g >= 1)
                .ok_or_else(|| ctx.err(state.span(), "listener.ana_states", format!("`{group}` is not an ANA group number")))?;
            if !ANA_STATES.contains(&state.get_ref().as_str()) {
                return Err(ctx.err(state.span(), "listener.ana_states", format!("`{}` is not one of {ANA_STATES:?}", state.get_ref())));
            }
            ana_states.insert(g, state.get_ref().clone());
        }
        listeners.push(ListenerConfig { address, ana_states });
    }

    let mut host_sites = BTreeMap::new();
    for h in &raw.hosts {
        if !valid_nqn(h.nqn.get_ref()) {
            return Err(ctx.err(h.nqn.span(), "host.nqn", format!("`{}` is not a host NQN", h.nqn.get_ref())));
        }
        if h.site == 0 || host_sites.insert(h.nqn.get_ref().clone(), h.site).is_some() {
            return Err(ctx.err(h.nqn.span(), "host", format!("host `{}` is listed twice or has site 0", h.nqn.get_ref())));
        }
    }
    if !host_sites.is_empty() && raw.target.site.is_none() {
        return Err(ctx.err(0..0, "target.site", "[[host]] sites need this target's own site: set [target] site"));
    }
    let metrics = match &raw.metrics {
        None => None,
        Some(MetricsSection { address: None }) => Some(DEFAULT_METRICS_ADDRESS.parse().expect("valid default")),
        Some(MetricsSection { address: Some(a) }) => Some(
            a.get_ref().parse().map_err(|_| ctx.err(a.span(), "metrics.address", format!("`{}` is not an address:port", a.get_ref())))?,
        ),
    };
    let witness = match &raw.witness {
        None => None,
        Some(w) => Some(witness_config(ctx, w)?),
    };
    Ok(Config {
        witness,
        metrics,
        cores,
        poll_mode: raw.target.poll_mode,
        socket: raw.target.socket.as_ref().map(|s| s.get_ref().clone()),
        discovery,
        bdevs,
        subsystems,
        listeners,
        site: raw.target.site,
        host_sites,
    })
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
        let base = r#"
[[bdev]]
name = "leg"
kind = "file"
path = "/tmp/leg"
size = "64MiB"

[[bdev]]
name = "m"
kind = "mirror"
local = "leg"
role = "preferred"
listen = "127.0.0.1:7700"
metadata = "/tmp/m.meta"

[[subsystem]]
nqn = "nqn.2026-11.io.nvmetro:m"
allow_any_host = true

[[subsystem.namespace]]
nsid = 1
bdev = "m"

[[listener]]
address = "127.0.0.1:4420"
"#;
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
