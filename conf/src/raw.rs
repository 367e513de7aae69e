//! The file as written: serde structures mirroring the TOML, with spans for error messages.

use super::*;

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
    /// Data a host may put in an I/O command capsule (Identify IOCCSZ); larger writes are pulled
    /// with R2T. 8 KiB unless set.
    pub in_capsule_data_size: Option<Spanned<Size>>,
    /// The largest H2CData PDU a host may send (ICResp MAXH2CDATA), so the window of one R2T.
    /// 128 KiB unless set.
    pub max_h2c_data_size: Option<Spanned<Size>>,
    /// NVMe/RDMA host data lands in and leaves from buffers registered once per I/O queue pair,
    /// which the bdev writes from and reads into (no copy). True unless set.
    pub rdma_zero_copy: Option<bool>,
}

fn default_cores() -> Spanned<Vec<usize>> {
    Spanned::new(0..0, vec![0])
}
fn default_poll_mode() -> PollMode {
    PollMode::Adaptive
}

impl Default for TargetSection {
    fn default() -> Self {
        TargetSection {
            cores: default_cores(),
            poll_mode: PollMode::Adaptive,
            discovery: Vec::new(),
            socket: None,
            site: None,
            in_capsule_data_size: None,
            max_h2c_data_size: None,
            rdma_zero_copy: None,
        }
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
    /// mirror: what carries the replication link, "tcp" (default) or "rdma" (RC queue pairs
    /// over rdma_cm at the `listen`/`peer` addresses; both sites must say the same).
    pub link: Option<Spanned<String>>,
    /// mirror: connections (TCP) or RC queue pairs (RDMA) the replication link is made of
    /// (default 1, at most 16); the link takes the smaller number of the two sites'. Replicated
    /// writes and their acknowledgements spread over them; everything else keeps to the first.
    pub lanes: Option<Spanned<u32>>,
    /// mirror: the metadata file (generations, dirty-region bitmap).
    pub metadata: Option<Spanned<PathBuf>>,
    /// mirror: resync speed limit per second, e.g. "200MiB" (default unlimited).
    pub resync_rate: Option<Size>,
    /// mirror: the host write latency a resync steers to: "125%" (default) of the latency
    /// without a resync, a fixed one such as "500us", or "off" (only `resync_rate` limits it).
    pub resync_latency_target: Option<Spanned<String>>,
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
    /// `"tcp"` (the default) or `"rdma"`.
    #[serde(default)]
    pub transport: Option<Spanned<String>>,
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
    #[serde(default, rename = "dr_group")]
    pub dr_groups: Vec<DrGroupSection>,
    #[serde(default, rename = "dr_replica")]
    pub dr_replicas: Vec<DrReplicaSection>,
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
