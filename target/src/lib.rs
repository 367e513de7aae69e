//! nvmetro-tgt: a polled-mode NVMe-oF target.
//!
//! ```text
//!             hosts (Linux nvme-tcp, ESXi, nvmetro-perf)
//!                 | NVMe/TCP            | NVMe/TCP
//!        +--------v---------+   +-------v----------+
//!        | reactor 0 (core) |   | reactor 1 (core) |   one thread per core, pinned
//!        |  listeners       |   |                  |   accept on reactor 0, connections
//!        |  connections ----+---+-> connections    |   spread round-robin by message
//!        |  proto: PDUs,    |   |  proto ...       |   sans-IO transport + controller
//!        |  controller      |   |                  |
//!        |  bdev channels   |   |  bdev channels   |   one channel per bdev per reactor
//!        +--------+---------+   +--------+---------+
//!                 |  malloc | null | file (io_uring) | mirror | error   shared Bdev objects
//! ```
//!
//! Subsystems, their per-listener views (ANA states) and the controller registry are shared
//! through [`Target`]; views are read lock-free on the I/O path. The config, the bdev table, the
//! subsystem table and each subsystem's namespaces are swapped whole by a reload ([`reload`]),
//! so reactors never wait for one.

pub mod conn;
pub mod events;
pub mod metrics;
pub mod mgmt;
#[cfg(feature = "rdma")]
pub mod rdma;
pub mod reactor;
pub mod reload;
pub mod subsys;

use anyhow::Context;
use arc_swap::ArcSwap;
use nvmetro_bdev::dr::{group::DrGroup, replica::DrReplica};
use nvmetro_bdev::mirror::core::{Metro, Role};
use nvmetro_bdev::mirror::driver::{MetroSettings, MirrorBdev, MirrorSettings};
use nvmetro_bdev::mirror::transport::TcpTransport;
use nvmetro_bdev::{error::ErrorBdev, file::FileBdev, malloc::MallocBdev, null::NullBdev, Access, Bdev};
use nvmetro_conf::{BdevKind, Config};
use nvmetro_proto::subsystem::{AnaState, NamespaceInfo};
use reactor::{Reactor, ReactorHandle};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;
use subsys::{Discovery, Namespace, Subsystem};

/// One ANA group of a subsystem on one listener, and its state there ([`Target::ana_groups`]).
pub struct AnaGroupView {
    pub subsystem: Arc<Subsystem>,
    /// The listener's slot.
    pub listener: usize,
    pub address: std::net::SocketAddr,
    pub group: u32,
    pub state: AnaState,
}

/// Everything reactors share.
#[derive(Debug)]
pub struct Target {
    config: ArcSwap<Config>,
    /// By bdev index; only grows (a removed bdev leaves a retired slot; see [`reload`]).
    bdevs: ArcSwap<Vec<Arc<dyn Bdev>>>,
    subsystems: ArcSwap<Vec<Arc<Subsystem>>>,
    /// The address of each listener slot; slots only grow, a removed listener's slot is retired.
    listener_slots: ArcSwap<Vec<std::net::SocketAddr>>,
    /// The file the config came from (None: the built-in default); reload reads it again.
    pub config_path: Option<std::path::PathBuf>,
    /// One reload at a time (control path only).
    reload_lock: std::sync::Mutex<()>,
    /// Bumped by every applied reload (connections re-derive what they cached from the config).
    config_generation: std::sync::atomic::AtomicU64,
    pub discovery: Discovery,
    reactors: OnceLock<Vec<ReactorHandle>>,
    /// ANA states set by an operator, by (subsystem NQN, listener address, group).
    ana_overrides: std::sync::Mutex<std::collections::HashMap<(String, std::net::SocketAddr, u32), AnaState>>,
    stop: AtomicBool,
    /// State changes for `nvmetro events` (see [`events`]).
    pub events: events::EventLog,
    epoch: Instant,
    discovery_cntlid: AtomicU16,
    /// Consistency groups streamed to a DR site, and groups applied here (fixed at start).
    /// DR groups streamed from here and DR replicas applied here (a reload adds and removes).
    pub dr_groups: ArcSwap<Vec<Arc<DrGroup>>>,
    pub dr_replicas: ArcSwap<Vec<Arc<DrReplica>>>,
}

impl Target {
    pub fn reactors(&self) -> &[ReactorHandle] {
        self.reactors.get().map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Milliseconds since the target started (the clock the sans-IO controllers are fed).
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn config_generation(&self) -> u64 {
        self.config_generation.load(Ordering::Acquire)
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn bdevs(&self) -> Arc<Vec<Arc<dyn Bdev>>> {
        self.bdevs.load_full()
    }

    /// The bdevs the running config names, with their slots (a name re-added by a reload maps
    /// to its newest slot).
    pub fn live_bdevs(&self) -> Vec<(usize, Arc<dyn Bdev>)> {
        let bdevs = self.bdevs();
        self.config()
            .bdevs
            .iter()
            .filter_map(|c| bdevs.iter().enumerate().rev().find(|(_, b)| b.info().name == c.name).map(|(i, b)| (i, b.clone())))
            .collect()
    }

    pub fn bdev(&self, index: usize) -> Arc<dyn Bdev> {
        self.bdevs.load()[index].clone()
    }

    pub fn subsystems(&self) -> Arc<Vec<Arc<Subsystem>>> {
        self.subsystems.load_full()
    }

    pub fn subsystem(&self, nqn: &str) -> Option<Arc<Subsystem>> {
        self.subsystems.load().iter().find(|s| s.config().nqn == nqn).cloned()
    }

    /// Listener slots with the config of each (None: retired by a reload).
    pub fn listeners(&self) -> Vec<(std::net::SocketAddr, Option<nvmetro_conf::ListenerConfig>)> {
        let config = self.config();
        self.listener_slots.load().iter().map(|a| (*a, config.listeners.iter().find(|l| l.address == *a).cloned())).collect()
    }

    /// Every ANA group of every subsystem on every live listener, with its state there now (what
    /// metrics and the event stream show).
    pub fn ana_groups(&self) -> Vec<AnaGroupView> {
        let mut out = Vec::new();
        let listeners = self.listeners();
        for s in self.subsystems().iter() {
            let groups: std::collections::BTreeSet<u32> = s.namespaces().iter().map(|n| n.info.ana_group).collect();
            for (li, (address, lc)) in listeners.iter().enumerate() {
                if lc.is_none() {
                    continue;
                }
                let view = s.view(li);
                for g in &groups {
                    out.push(AnaGroupView { subsystem: s.clone(), listener: li, address: *address, group: *g, state: view.ana_state(*g) });
                }
            }
        }
        out
    }

    /// Follows each namespace's bdev into ANA: a fenced mirror leg makes its group Inaccessible on
    /// every listener; serving again restores the configured state. Returns the changes made.
    /// Sets the state an operator wants for `group` on `listener` (over the configured one).
    pub fn override_ana(&self, subsystem: &str, listener: std::net::SocketAddr, group: u32, state: AnaState) {
        if let Ok(mut o) = self.ana_overrides.lock() {
            o.insert((subsystem.to_string(), listener, group), state);
        }
    }

    pub fn refresh_ana(&self) -> usize {
        let mut changes = 0;
        let overrides = self.ana_overrides.lock().map(|o| o.clone()).unwrap_or_default();
        let listeners = self.listeners();
        let bdevs = self.bdevs();
        for s in self.subsystems().iter() {
            let nqn = s.config().nqn.clone();
            for ns in s.namespaces().iter() {
                let access = bdevs[ns.bdev].access();
                for (li, (addr, l)) in listeners.iter().enumerate() {
                    let Some(l) = l else { continue };
                    let configured = overrides
                        .get(&(nqn.clone(), *addr, ns.info.ana_group))
                        .copied()
                        .or_else(|| l.ana_states.get(&ns.info.ana_group).and_then(|st| AnaState::parse(st)))
                        .unwrap_or(AnaState::Optimized);
                    let want = match access {
                        Access::Serving => configured,
                        // Alone, this site is every host's best path (unless the operator
                        // made the group unusable here).
                        Access::Sole if matches!(configured, AnaState::Optimized | AnaState::NonOptimized) => AnaState::Optimized,
                        Access::Sole => configured,
                        Access::Transition => AnaState::Change,
                        Access::Fenced => AnaState::Inaccessible,
                        // Every command crosses the link: a worse path than the peer's own.
                        Access::Remote if matches!(configured, AnaState::Optimized | AnaState::NonOptimized) => AnaState::NonOptimized,
                        Access::Remote => configured,
                        // A planned switchover moved the sites' roles: the ordering site is
                        // every host's best path, the other one every host's second best.
                        Access::Leading if matches!(configured, AnaState::Optimized | AnaState::NonOptimized) => AnaState::Optimized,
                        Access::Standby if matches!(configured, AnaState::Optimized | AnaState::NonOptimized) => AnaState::NonOptimized,
                        Access::Leading | Access::Standby => configured,
                    };
                    // (Alone, or leading after a switchover: not demoted for other sites' hosts.)
                    if s.set_sole(li, ns.info.ana_group, matches!(access, Access::Sole | Access::Leading)) {
                        changes += 1;
                    }
                    if s.view(li).ana_state(ns.info.ana_group) != want {
                        s.set_ana_state(li, ns.info.ana_group, want);
                        tracing::info!(subsystem = %nqn, nsid = ns.info.nsid, listener = %l.address, state = want.name(), "ANA state changed");
                        changes += 1;
                    }
                }
            }
        }
        changes
    }

    /// A clean stop: every metro mirror leg lets its peer take over without a failover stall
    /// (one that orders writes switches over to the peer first, then each stops serving).
    pub fn depart_mirrors(&self) {
        let bdevs = self.bdevs();
        // All at once: each may wait for its peer.
        std::thread::scope(|s| {
            let departures: Vec<_> = bdevs
                .iter()
                .filter(|b| b.as_mirror().is_some())
                .map(|b| {
                    s.spawn(move || {
                        let what = b.as_mirror().map(|m| m.depart()).unwrap_or_default();
                        tracing::info!(mirror = %b.info().name, "{what}");
                    })
                })
                .collect();
            // Hosts follow a switchover's new Optimized site while the departures go on.
            while !departures.iter().all(|d| d.is_finished()) {
                self.refresh_ana();
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        });
        self.refresh_ana();
    }

    /// After the reactors stopped (no host writes any more): every DR group gives its DR site
    /// what it buffered and records whether it stopped clean; DR replicas stop.
    pub fn stop_dr(&self) {
        let groups = self.dr_groups.load_full();
        std::thread::scope(|s| {
            for g in groups.iter() {
                s.spawn(move || g.stop());
            }
        });
        for r in self.dr_replicas.load().iter() {
            r.stop();
        }
    }

    pub fn next_discovery_cntlid(&self) -> u16 {
        self.discovery_cntlid.fetch_add(1, Ordering::Relaxed) % 0xffef + 1
    }
}

/// A running target: its reactor threads.
pub struct Running {
    pub target: Arc<Target>,
    threads: Vec<JoinHandle<()>>,
}

impl Running {
    /// Asks every reactor to stop and waits for them.
    pub fn stop(self) {
        self.target.stop.store(true, Ordering::Release);
        for r in self.target.reactors() {
            r.send(Box::new(|_| {}));
        }
        for t in self.threads {
            let _ = t.join();
        }
    }
}

pub(crate) fn open_bdev(
    b: &nvmetro_conf::BdevConfig,
    leg_of: &dyn Fn(&str) -> Option<Arc<dyn Bdev>>,
    config_poll_mode: nvmetro_conf::PollMode,
    witness: Option<&nvmetro_conf::WitnessConfig>,
    anatt_secs: u8,
) -> anyhow::Result<Arc<dyn Bdev>> {
    Ok(match b.kind {
        BdevKind::Mirror => {
            let m = b.mirror.as_ref().context("mirror bdev without settings")?;
            let transport: Box<dyn nvmetro_bdev::mirror::transport::Transport> = match m.link {
                nvmetro_conf::Transport::Tcp => {
                    Box::new(TcpTransport::new(m.listen, m.peer).with_context(|| format!("mirror {}", b.name))?)
                }
                #[cfg(feature = "rdma")]
                nvmetro_conf::Transport::Rdma => Box::new(
                    nvmetro_bdev::mirror::rdma_link::RdmaTransport::new(m.listen, m.peer)
                        .with_context(|| format!("mirror {}: the RDMA replication link", b.name))?,
                ),
                #[cfg(not(feature = "rdma"))]
                nvmetro_conf::Transport::Rdma => unreachable!("check_transports refused it"),
            };
            let heartbeat = mirror_tuning(m, witness.is_some()).heartbeat_timeout;
            let metro = witness.map(|w| {
                let mut core = Metro::new(&b.name, m.manual_failback, heartbeat.as_millis() as u64);
                // ANA Change may last ANATT at most (then Inaccessible while still undecided).
                core.transition_ms = u64::from(anatt_secs.max(1)) * 1000;
                MetroSettings { witness: w.address, secret: w.secret.clone(), core }
            });
            let settings = MirrorSettings {
                metro,
                role: if m.preferred { Role::Preferred } else { Role::Secondary },
                site: m.site,
                meta_path: m.metadata.clone(),
                region_shift: m.region_shift,
                resync_rate: m.resync_rate,
                resync_latency_target: m.resync_latency_target,
                heartbeat_timeout: heartbeat,
                retry_interval: m.retry_interval.unwrap_or(std::time::Duration::ZERO),
                secret: match &m.secret {
                    Some(s) => s.clone(),
                    None => {
                        tracing::warn!(
                            mirror = %b.name,
                            "replication link not authenticated by a secret: set `secret` or `secret_file` on both sites"
                        );
                        Vec::new()
                    }
                },
                link_delay: std::time::Duration::from_micros(m.link_delay_us),
                spin: match config_poll_mode {
                    nvmetro_conf::PollMode::Busy => std::time::Duration::from_millis(1),
                    nvmetro_conf::PollMode::Adaptive => std::time::Duration::ZERO,
                },
                lanes: m.lanes,
            };
            // The link runs as a poller on a reactor (taken in `start`).
            let leg = leg_of(&m.local).context("mirror leg not opened yet")?;
            MirrorBdev::start(&b.name, leg, settings, transport, true).with_context(|| format!("bdev {}", b.name))?
        }
        BdevKind::Error => {
            let e = b.error.as_ref().context("error bdev without settings")?;
            let base = leg_of(&e.base).with_context(|| format!("bdev {}: its base {} is not opened yet", b.name, e.base))?;
            let dev = ErrorBdev::new(&b.name, base);
            if let Some(rules) = &e.rules {
                let rules = nvmetro_bdev::error::parse_rules(rules).with_context(|| format!("bdev {}", b.name))?;
                tracing::warn!(bdev = %b.name, ?rules, "error injection armed from the config");
                dev.control().set(rules).with_context(|| format!("bdev {}", b.name))?;
            }
            Arc::new(dev)
        }
        BdevKind::Malloc => {
            let size = b.size.context("malloc bdev without size")?;
            Arc::new(MallocBdev::new(&b.name, b.block_size, size, b.hugepages).with_context(|| format!("bdev {}", b.name))?)
        }
        BdevKind::Null => {
            let size = b.size.context("null bdev without size")?;
            Arc::new(NullBdev::new(&b.name, b.block_size, size / u64::from(b.block_size)))
        }
        BdevKind::File => {
            let path = b.path.as_ref().context("file bdev without path")?;
            Arc::new(FileBdev::open(&b.name, path, b.block_size, b.size, b.direct).with_context(|| format!("bdev {}", b.name))?)
        }
    })
}

/// The shortest ANATT any subsystem promises its hosts.
pub(crate) fn min_anatt(config: &Config) -> u8 {
    config.subsystems.iter().map(|s| s.ana_transition_time).min().unwrap_or(10)
}

/// The live-changeable part of a mirror's config.
pub(crate) fn mirror_tuning(m: &nvmetro_conf::MirrorConfig, metro: bool) -> nvmetro_bdev::mirror::driver::MirrorTuning {
    nvmetro_bdev::mirror::driver::MirrorTuning {
        resync_rate: m.resync_rate,
        resync_latency_target: m.resync_latency_target,
        link_delay: std::time::Duration::from_micros(m.link_delay_us),
        heartbeat_timeout: std::time::Duration::from_millis(m.heartbeat_timeout_ms.unwrap_or(if metro { 1000 } else { 3000 })),
        manual_failback: m.manual_failback,
    }
}

/// A namespace over bdev `index`.
pub(crate) fn namespace(n: &nvmetro_conf::NamespaceConfig, index: usize, bdev: &dyn Bdev) -> Namespace {
    let info = bdev.info();
    Namespace {
        bdev: index,
        stats: Arc::new(subsys::NamespaceStats::default()),
        info: NamespaceInfo {
            nsid: n.nsid,
            block_size: info.block_size,
            blocks: info.blocks,
            nguid: n.nguid,
            eui64: n.eui64,
            uuid: n.uuid,
            ana_group: n.ana_group,
            volatile_cache: info.volatile_cache,
        },
    }
}

/// Builds bdevs and subsystems, binds every listener, and starts one reactor per core.
/// `config_path` is where a reload reads the config again.
pub fn start(config: Config, config_path: Option<std::path::PathBuf>) -> anyhow::Result<Running> {
    config.check_transports(cfg!(feature = "rdma"))?;
    let available = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if let Some(c) = config.cores.iter().find(|c| **c >= available) {
        anyhow::bail!("target.cores names core {c}, but this machine has {available}");
    }
    // Each bdev after the one it is built on (a mirror's local leg, an error bdev's base).
    let mut bdevs: Vec<Option<Arc<dyn Bdev>>> = vec![None; config.bdevs.len()];
    let position = |name: &str| config.bdevs.iter().position(|x| x.name == name);
    // DR groups over mirrors wrap each mirror's local leg before the mirror opens on it.
    let mut metro_groups = Vec::new();
    for g in config.dr_groups.iter().filter(|g| g.follows_metro) {
        let builder = DrGroup::builder(dr_group_settings(g), g.members.len()).with_context(|| format!("DR group {}", g.name))?;
        metro_groups.push((g, builder));
    }
    for i in config.open_order() {
        let b = &config.bdevs[i];
        if let Some(m) = b.mirror.as_ref().filter(|_| b.kind == BdevKind::Mirror) {
            for (g, builder) in metro_groups.iter_mut() {
                if let (Some(k), Some(leg)) = (g.members.iter().position(|x| *x == b.name), position(&m.local)) {
                    let opened = bdevs[leg].clone().context("mirror leg not opened yet")?;
                    bdevs[leg] = Some(builder.wrap(k, opened));
                }
            }
        }
        let leg_of = |name: &str| position(name).and_then(|j| bdevs[j].clone());
        bdevs[i] = Some(open_bdev(b, &leg_of, config.poll_mode, config.witness.as_ref(), min_anatt(&config))?);
    }
    let mut bdevs: Vec<Arc<dyn Bdev>> = bdevs.into_iter().map(|b| b.expect("every bdev opened")).collect();
    let mut followers = Vec::new();
    for (g, builder) in metro_groups {
        let mirrors: Vec<Arc<dyn Bdev>> = g.members.iter().map(|m| bdevs[position(m).expect("validated member")].clone()).collect();
        // Only the site that orders every member's writes (and serves) feeds the DR site.
        let active: nvmetro_bdev::dr::group::ActiveCheck =
            Arc::new(move || mirrors.iter().all(|m| m.as_mirror().is_some_and(|m| m.feeds_dr())));
        let group = builder.start_with(Some(active)).with_context(|| format!("DR group {} (state {})", g.name, g.state.display()))?;
        tracing::info!(group = %g.name, members = ?g.members, dr_site = %g.dr_site, mode = ?g.mode, "DR group started over the mirrors' legs (fed while this site orders their writes)");
        followers.push(group);
    }
    let (mut dr_groups, dr_replicas) = start_dr(&config, &mut bdevs)?;
    dr_groups.extend(followers);
    let listeners: Vec<Option<nvmetro_conf::ListenerConfig>> = config.listeners.iter().cloned().map(Some).collect();
    let subsystems = config
        .subsystems
        .iter()
        .map(|s| {
            let namespaces = s
                .namespaces
                .iter()
                .map(|n| {
                    let bdev = bdevs.iter().position(|b| b.info().name == n.bdev).expect("validated bdev reference");
                    namespace(n, bdev, bdevs[bdev].as_ref())
                })
                .collect();
            Arc::new(Subsystem::new(s.clone(), namespaces, &listeners))
        })
        .collect();
    let mut sockets = Vec::new();
    #[cfg(feature = "rdma")]
    let mut rdma_listeners = Vec::new();
    for (i, l) in config.listeners.iter().enumerate() {
        match l.transport {
            nvmetro_conf::Transport::Tcp => sockets.push((bind(l.address)?, conn::ListenerKind::Subsystems(i))),
            #[cfg(feature = "rdma")]
            nvmetro_conf::Transport::Rdma => rdma_listeners.push((rdma::RdmaListener::bind(l.address)?, conn::ListenerKind::Subsystems(i))),
            #[cfg(not(feature = "rdma"))]
            nvmetro_conf::Transport::Rdma => unreachable!("check_transports refused it"),
        }
    }
    for addr in &config.discovery {
        sockets.push((bind(*addr)?, conn::ListenerKind::DiscoveryOnly));
    }
    let target = Arc::new(Target {
        discovery: Discovery::new(&config),
        listener_slots: ArcSwap::from_pointee(config.listeners.iter().map(|l| l.address).collect()),
        config: ArcSwap::from_pointee(config),
        bdevs: ArcSwap::from_pointee(bdevs),
        subsystems: ArcSwap::from_pointee(subsystems),
        config_path,
        reload_lock: std::sync::Mutex::new(()),
        config_generation: std::sync::atomic::AtomicU64::new(1),
        reactors: OnceLock::new(),
        ana_overrides: Default::default(),
        stop: AtomicBool::new(false),
        events: Default::default(),
        epoch: Instant::now(),
        discovery_cntlid: AtomicU16::new(0),
        dr_groups: ArcSwap::from_pointee(dr_groups),
        dr_replicas: ArcSwap::from_pointee(dr_replicas),
    });
    let mut reactors = Vec::new();
    let mut handles = Vec::new();
    for (i, core) in target.config().cores.iter().enumerate() {
        let (r, h) = Reactor::new(i, *core, target.clone())?;
        reactors.push(r);
        handles.push(h);
    }
    target.reactors.set(handles).expect("reactors set once");
    // Bdev pollers (mirror links) go round-robin over the reactors, last reactor first, so that
    // with several cores the link shares a core with fewer connections.
    let n = reactors.len();
    let mut next = n - 1;
    for b in target.bdevs().iter() {
        if let Some(p) = b.take_poller() {
            reactors[next].add_poller(p)?;
            for (i, helper) in helpers_of(b.as_ref(), n) {
                reactors[helper_reactor(next, i, n)].add_poller(helper)?;
            }
            next = (next + n - 1) % n;
        }
    }
    for (sock, kind) in sockets {
        tracing::info!(address = %sock.local_addr()?, ?kind, "listening");
        reactors[0].add_listener(sock, kind)?;
    }
    #[cfg(feature = "rdma")]
    for (l, kind) in rdma_listeners {
        tracing::info!(address = %l.address, ?kind, transport = "rdma", "listening");
        reactors[0].add_rdma_listener(l, kind)?;
    }
    let threads = reactors
        .into_iter()
        .map(|r| std::thread::Builder::new().name(format!("reactor-{}", r.index)).spawn(move || r.run()))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Running { target, threads })
}

/// A bdev's helper pollers (a mirror's lanes), numbered, when there are other reactors than
/// its main poller's to run them; with one reactor their work stays with the main poller.
pub(crate) fn helpers_of(b: &dyn nvmetro_bdev::Bdev, reactors: usize) -> Vec<(usize, Box<dyn nvmetro_bdev::Poller>)> {
    if reactors < 2 {
        return Vec::new();
    }
    b.take_helper_pollers().into_iter().enumerate().collect()
}

/// The reactor of helper `i` of a bdev whose main poller runs on reactor `main`: round-robin
/// over the others.
pub(crate) fn helper_reactor(main: usize, i: usize, reactors: usize) -> usize {
    (main + 1 + i % (reactors - 1)) % reactors
}

/// Starts the DR groups (their members then serve in place of the bdevs they wrap) and the DR
/// replicas of `config`.
/// The live-changeable part of a DR group's config.
pub(crate) fn dr_tuning(g: &nvmetro_conf::DrGroupConfig) -> nvmetro_bdev::dr::group::DrTuning {
    nvmetro_bdev::dr::group::DrTuning {
        mode: match g.mode {
            nvmetro_conf::DrModeConfig::Sync => nvmetro_bdev::dr::DrMode::Sync,
            nvmetro_conf::DrModeConfig::Async | nvmetro_conf::DrModeConfig::LongThrow => nvmetro_bdev::dr::DrMode::Async,
        },
        buffer_limit: g.buffer,
        rpo_target: g.rpo_target,
        link_delay: g.link_delay,
        copy_rate: g.copy_rate,
    }
}

type DrParts = (Vec<Arc<DrGroup>>, Vec<Arc<DrReplica>>);

pub(crate) fn dr_group_settings(g: &nvmetro_conf::DrGroupConfig) -> nvmetro_bdev::dr::group::DrGroupSettings {
    let t = dr_tuning(g);
    nvmetro_bdev::dr::group::DrGroupSettings {
        name: g.name.clone(),
        dr_site: g.dr_site,
        mode: t.mode,
        buffer_limit: t.buffer_limit,
        rpo_target: t.rpo_target,
        secret: g.secret.clone(),
        state: g.state.clone(),
        link_delay: t.link_delay,
        copy_rate: t.copy_rate,
        journal: g.journal.clone(),
        follows_metro: g.follows_metro,
    }
}

pub(crate) fn dr_replica_settings(r: &nvmetro_conf::DrReplicaConfig) -> nvmetro_bdev::dr::replica::DrReplicaSettings {
    nvmetro_bdev::dr::replica::DrReplicaSettings {
        name: r.name.clone(),
        listen: r.listen,
        secret: r.secret.clone(),
        state: r.state.clone(),
    }
}

/// Starts the DR groups not over mirrors (wrapping their member bdevs) and the DR replicas.
fn start_dr(config: &Config, bdevs: &mut [Arc<dyn Bdev>]) -> anyhow::Result<DrParts> {
    // Names stay as they were: a member serves under its bdev's name.
    let names: Vec<String> = bdevs.iter().map(|b| b.info().name.clone()).collect();
    let index = |name: &str| names.iter().position(|b| b == name).expect("validated member");
    let mut groups = Vec::new();
    for g in config.dr_groups.iter().filter(|g| !g.follows_metro) {
        let slots: Vec<usize> = g.members.iter().map(|m| index(m)).collect();
        let group = DrGroup::start(dr_group_settings(g), slots.iter().map(|&i| bdevs[i].clone()).collect())
            .with_context(|| format!("DR group {} (state {})", g.name, g.state.display()))?;
        for (slot, member) in slots.into_iter().zip(group.members()) {
            bdevs[slot] = member;
        }
        tracing::info!(group = %g.name, members = ?g.members, dr_site = %g.dr_site, mode = ?g.mode, "DR group started");
        groups.push(group);
    }
    let mut replicas = Vec::new();
    for r in &config.dr_replicas {
        let settings = dr_replica_settings(r);
        let slots: Vec<usize> = r.members.iter().map(|m| index(m)).collect();
        let replica = DrReplica::start(settings, slots.iter().map(|&i| bdevs[i].clone()).collect())
            .with_context(|| format!("DR replica {} (listen {}, state {})", r.name, r.listen, r.state.display()))?;
        // Hosts given these namespaces see them Inaccessible until the image is promoted.
        for (slot, member) in slots.into_iter().zip(replica.members()) {
            bdevs[slot] = member;
        }
        replicas.push(replica);
        tracing::info!(group = %r.name, members = ?r.members, listen = %r.listen, "DR replica listening");
    }
    Ok((groups, replicas))
}

pub(crate) fn bind(addr: std::net::SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into()).with_context(|| format!("cannot listen on {addr}"))?;
    s.listen(1024)?;
    Ok(s.into())
}
