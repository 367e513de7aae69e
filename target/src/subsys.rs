//! Subsystems at run time: their namespaces over bdevs, the view each listener gives of them
//! (ANA states), their live controllers, and the discovery service.
//!
//! Views are swapped whole (arc-swap), so the I/O path reads them without a lock (an I/O queue
//! through an [`IoCache`], which only checks for a swap); the controller
//! registry takes a mutex, but only on Connect and controller teardown, never per I/O.

use arc_swap::{ArcSwap, Cache};
use nvmetro_conf::{Config, SubsystemConfig};
use nvmetro_proto::subsystem::{AnaState, DiscoveryEntry, Health, NamespaceInfo, SubsystemKind, SubsystemView};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A namespace: its identity, the index of its bdev in [`Target::bdevs`](crate::Target), and
/// its I/O figures (kept across reloads that leave it in place).
#[derive(Debug, Clone)]
pub struct Namespace {
    pub info: NamespaceInfo,
    pub bdev: usize,
    pub stats: Arc<NamespaceStats>,
}

/// What I/O queues and the admin queue of one controller share across reactors.
#[derive(Debug)]
pub struct ControllerHandle {
    pub cntlid: u16,
    pub hostnqn: String,
    /// Cleared when the admin queue goes away (disconnect, keep-alive expiry): I/O queues close.
    pub alive: AtomicBool,
    /// CSTS.RDY as last set by the admin queue.
    pub ready: AtomicBool,
    /// Controller resets seen so far; I/O queues of an older generation close.
    pub generation: AtomicU64,
    pub io_queues_granted: AtomicU64,
    /// The volatile write cache as the host set it (Set Features 06h): while it is off, every
    /// write on every I/O queue is made durable before it completes.
    pub write_cache: AtomicBool,
}

/// Per-subsystem counters for the SMART log (relaxed atomics; read rarely).
#[derive(Debug, Default)]
pub struct HealthCounters {
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub read_commands: AtomicU64,
    pub write_commands: AtomicU64,
}

/// Upper bounds (microseconds) of the per-namespace latency histogram's buckets.
pub const LATENCY_BUCKETS_US: [u64; 12] = [10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 50_000, 100_000];

/// Per-namespace I/O figures for the metrics endpoint (relaxed atomics, updated at completion).
#[derive(Debug, Default)]
pub struct NamespaceStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub errors: AtomicU64,
    /// Commands submitted to the bdev and not yet completed.
    pub inflight: AtomicU64,
    /// Writes submitted with Force Unit Access (the host's or because it disabled the cache).
    pub fua_writes: AtomicU64,
    /// Flushes submitted to the bdev (host Flush commands, shutdown, durable writes).
    pub flushes: AtomicU64,
    /// Counts per bucket of [`LATENCY_BUCKETS_US`], the last one for slower commands.
    pub latency: [AtomicU64; 13],
    pub latency_sum_ns: AtomicU64,
}

impl NamespaceStats {
    pub fn record(&self, write: bool, bytes: u64, ok: bool, latency: std::time::Duration) {
        let r = Ordering::Relaxed;
        if !ok {
            self.errors.fetch_add(1, r);
        } else if write {
            self.writes.fetch_add(1, r);
            self.write_bytes.fetch_add(bytes, r);
        } else {
            self.reads.fetch_add(1, r);
            self.read_bytes.fetch_add(bytes, r);
        }
        let us = latency.as_micros() as u64;
        let bucket = LATENCY_BUCKETS_US.iter().position(|b| us <= *b).unwrap_or(LATENCY_BUCKETS_US.len());
        self.latency[bucket].fetch_add(1, r);
        self.latency_sum_ns.fetch_add(latency.as_nanos() as u64, r);
    }
}

/// A subsystem at run time. Its settings, namespaces and per-listener views are swapped whole
/// by a reload (arc-swap); the I/O path only ever loads them.
#[derive(Debug)]
pub struct Subsystem {
    config: ArcSwap<SubsystemConfig>,
    namespaces: Arc<ArcSwap<Vec<Namespace>>>,
    /// One view per listener slot (slots only grow; see [`crate::Target::listener_slots`]).
    views: ArcSwap<Vec<Arc<ArcSwap<SubsystemView>>>>,
    controllers: Mutex<HashMap<u16, Arc<ControllerHandle>>>,
    pub health: HealthCounters,
    /// When each (listener, ANA group) last changed state (control path only).
    ana_changed: Mutex<HashMap<(usize, u32), std::time::SystemTime>>,
    started: Instant,
}

/// An I/O queue's copy of its listener's view and of the namespace table: a load checks that
/// the shared value was not swapped (one atomic read) instead of taking a new reference, so it
/// always returns what [`Subsystem::view`] and [`Subsystem::namespaces`] would.
pub struct IoCache {
    /// None when the listener slot did not exist yet: then every load asks the subsystem.
    view: Option<Cache<Arc<ArcSwap<SubsystemView>>, Arc<SubsystemView>>>,
    namespaces: Cache<Arc<ArcSwap<Vec<Namespace>>>, Arc<Vec<Namespace>>>,
}

impl std::fmt::Debug for IoCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IoCache")
    }
}

impl IoCache {
    /// The current view through `listener` of `subsystem` (the one this cache was made from).
    pub fn view(&mut self, subsystem: &Subsystem, listener: usize) -> Arc<SubsystemView> {
        match &mut self.view {
            Some(c) => c.load().clone(),
            None => subsystem.view(listener),
        }
    }

    /// The current namespace table.
    pub fn namespaces(&mut self) -> Arc<Vec<Namespace>> {
        self.namespaces.load().clone()
    }
}

/// Why a Connect was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectRefusal {
    #[error("host {0} is not allowed")]
    HostNotAllowed(String),
    #[error("no free controller ID in the configured range")]
    NoControllerId,
    #[error("no controller {cntlid} for host {hostnqn}")]
    UnknownController { cntlid: u16, hostnqn: String },
    #[error("controller {0} is not enabled")]
    NotReady(u16),
}

impl Subsystem {
    /// `listeners` by slot; `None` for a retired slot.
    pub fn new(config: SubsystemConfig, namespaces: Vec<Namespace>, listeners: &[Option<nvmetro_conf::ListenerConfig>]) -> Subsystem {
        let views = listeners.iter().map(|l| Arc::new(ArcSwap::from_pointee(Self::fresh_view(&config, &namespaces, l.as_ref())))).collect();
        Subsystem {
            config: ArcSwap::from_pointee(config),
            namespaces: Arc::new(ArcSwap::from_pointee(namespaces)),
            views: ArcSwap::from_pointee(views),
            controllers: Mutex::new(HashMap::new()),
            health: HealthCounters::default(),
            ana_changed: Mutex::new(HashMap::new()),
            started: Instant::now(),
        }
    }

    fn fresh_view(config: &SubsystemConfig, namespaces: &[Namespace], l: Option<&nvmetro_conf::ListenerConfig>) -> SubsystemView {
        let ana_groups = (1..=config.ana_groups)
            .map(|g| match l {
                Some(l) => l.ana_states.get(&g).and_then(|s| AnaState::parse(s)).unwrap_or(AnaState::Optimized),
                None => AnaState::Inaccessible,
            })
            .collect();
        SubsystemView {
            kind: SubsystemKind::Nvm,
            nqn: config.nqn.clone(),
            serial: config.serial.clone(),
            model: config.model.clone(),
            firmware: env!("CARGO_PKG_VERSION").into(),
            namespaces: namespaces.iter().map(|n| n.info.clone()).collect(),
            ana_groups,
            ana_change_count: 1,
            ns_change_count: 0,
            changed_namespaces: Vec::new(),
            discovery_log: Vec::new(),
            discovery_genctr: 0,
            max_namespaces: config.max_namespaces,
            ana_transition_time: config.ana_transition_time,
            sole_groups: Vec::new(),
        }
    }

    pub fn config(&self) -> Arc<SubsystemConfig> {
        self.config.load_full()
    }

    pub fn namespaces(&self) -> Arc<Vec<Namespace>> {
        self.namespaces.load_full()
    }

    pub fn view(&self, listener: usize) -> Arc<SubsystemView> {
        self.views.load().get(listener).map_or_else(|| Arc::new(Self::fresh_view(&self.config(), &[], None)), |v| v.load_full())
    }

    /// What an I/O queue on `listener` reads for every command, cached (see [`IoCache`]).
    pub fn io_cache(&self, listener: usize) -> IoCache {
        IoCache { view: self.views.load().get(listener).map(|v| Cache::new(v.clone())), namespaces: Cache::new(self.namespaces.clone()) }
    }

    pub fn namespace(&self, nsid: u32) -> Option<Namespace> {
        self.namespaces.load().iter().find(|n| n.info.nsid == nsid).cloned()
    }

    /// A view for a new listener slot (reload).
    pub fn add_listener(&self, l: &nvmetro_conf::ListenerConfig) {
        let v = Arc::new(ArcSwap::from_pointee(Self::fresh_view(&self.config(), &self.namespaces(), Some(l))));
        self.views.rcu(|views| {
            let mut views = (**views).clone();
            views.push(v.clone());
            views
        });
    }

    /// Swaps settings and the namespace table (reload) and tells every listener's controllers:
    /// the views list the new namespaces (and ANA groups), `changed` goes into the Changed
    /// Namespace List with a namespace-attribute notice, and an ANA change notice follows.
    pub fn update(&self, config: SubsystemConfig, namespaces: Vec<Namespace>, changed: Vec<u32>) {
        let infos: Vec<NamespaceInfo> = namespaces.iter().map(|n| n.info.clone()).collect();
        self.namespaces.store(Arc::new(namespaces));
        for slot in self.views.load().iter() {
            let mut v = (*slot.load_full()).clone();
            v.namespaces = infos.clone();
            // New groups start Optimized; the next ANA refresh applies what they should be.
            v.ana_groups.resize(config.ana_groups as usize, AnaState::Optimized);
            v.max_namespaces = config.max_namespaces;
            v.ana_transition_time = config.ana_transition_time;
            if !changed.is_empty() {
                v.ns_change_count += 1;
                v.changed_namespaces = changed.clone();
                v.ana_change_count += 1;
            }
            slot.store(Arc::new(v));
        }
        self.config.store(Arc::new(config));
    }

    /// Ends every controller (the subsystem was removed): their queues close.
    pub fn remove_all_controllers(&self) {
        for (_, h) in self.controllers.lock().expect("controller registry poisoned").drain() {
            h.alive.store(false, Ordering::Release);
        }
    }

    /// Every controller re-reads its ANA log (a host's preferred site changed).
    pub fn announce_ana_change(&self) {
        for slot in self.views.load().iter() {
            let mut v = (*slot.load_full()).clone();
            v.ana_change_count += 1;
            slot.store(Arc::new(v));
        }
    }

    /// Sets the ANA state of `group` on `listener`; controllers raise the change event.
    pub fn set_ana_state(&self, listener: usize, group: u32, state: AnaState) -> bool {
        let views = self.views.load();
        let Some(slot) = views.get(listener) else { return false };
        let mut v = (*slot.load_full()).clone();
        let Some(s) = group.checked_sub(1).and_then(|i| v.ana_groups.get_mut(i as usize)) else { return false };
        if *s != state {
            *s = state;
            v.ana_change_count += 1;
            slot.store(Arc::new(v));
            self.ana_changed.lock().expect("ana change times").insert((listener, group), std::time::SystemTime::now());
        }
        true
    }

    /// Marks `group` on `listener` as served alone by this site (remote hosts see it Optimized
    /// too); a change raises the ANA change event like a state change.
    pub fn set_sole(&self, listener: usize, group: u32, sole: bool) -> bool {
        let views = self.views.load();
        let Some(slot) = views.get(listener) else { return false };
        let mut v = (*slot.load_full()).clone();
        if v.sole_groups.contains(&group) == sole {
            return false;
        }
        if sole {
            v.sole_groups.push(group);
        } else {
            v.sole_groups.retain(|g| *g != group);
        }
        v.ana_change_count += 1;
        slot.store(Arc::new(v));
        self.ana_changed.lock().expect("ana change times").insert((listener, group), std::time::SystemTime::now());
        true
    }

    /// When the state of `group` on `listener` last changed (None: as configured since start).
    pub fn ana_changed_at(&self, listener: usize, group: u32) -> Option<std::time::SystemTime> {
        self.ana_changed.lock().ok()?.get(&(listener, group)).copied()
    }

    /// Live controllers per host NQN.
    pub fn controllers_by_host(&self) -> std::collections::BTreeMap<String, usize> {
        let mut m = std::collections::BTreeMap::new();
        for h in self.controllers.lock().expect("controller registry poisoned").values() {
            *m.entry(h.hostnqn.clone()).or_default() += 1;
        }
        m
    }

    pub fn health(&self) -> Health {
        let h = &self.health;
        Health {
            bytes_read: h.bytes_read.load(Ordering::Relaxed),
            bytes_written: h.bytes_written.load(Ordering::Relaxed),
            read_commands: h.read_commands.load(Ordering::Relaxed),
            write_commands: h.write_commands.load(Ordering::Relaxed),
            power_on_seconds: self.started.elapsed().as_secs(),
        }
    }

    /// Admits a new controller for `hostnqn`, with the lowest free ID of the configured range.
    pub fn add_controller(&self, hostnqn: &str) -> Result<Arc<ControllerHandle>, ConnectRefusal> {
        if !self.config.load().host_allowed(hostnqn) {
            return Err(ConnectRefusal::HostNotAllowed(hostnqn.into()));
        }
        let mut live = self.controllers.lock().expect("controller registry poisoned");
        let config = self.config.load();
        let cntlid = (config.cntlid_min..=config.cntlid_max).find(|id| !live.contains_key(id)).ok_or(ConnectRefusal::NoControllerId)?;
        let handle = Arc::new(ControllerHandle {
            cntlid,
            hostnqn: hostnqn.into(),
            alive: AtomicBool::new(true),
            ready: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            io_queues_granted: AtomicU64::new(u64::from(nvmetro_proto::controller::MAX_IO_QUEUES)),
            write_cache: AtomicBool::new(true),
        });
        live.insert(cntlid, handle.clone());
        Ok(handle)
    }

    /// Finds the controller an I/O queue Connect names.
    pub fn find_controller(&self, cntlid: u16, hostnqn: &str) -> Result<Arc<ControllerHandle>, ConnectRefusal> {
        if !self.config.load().host_allowed(hostnqn) {
            return Err(ConnectRefusal::HostNotAllowed(hostnqn.into()));
        }
        let live = self.controllers.lock().expect("controller registry poisoned");
        let h = live
            .get(&cntlid)
            .filter(|h| h.hostnqn == hostnqn && h.alive.load(Ordering::Acquire))
            .ok_or_else(|| ConnectRefusal::UnknownController { cntlid, hostnqn: hostnqn.into() })?;
        if !h.ready.load(Ordering::Acquire) {
            return Err(ConnectRefusal::NotReady(cntlid));
        }
        Ok(h.clone())
    }

    pub fn remove_controller(&self, handle: &ControllerHandle) {
        handle.alive.store(false, Ordering::Release);
        self.controllers.lock().expect("controller registry poisoned").remove(&handle.cntlid);
    }

    pub fn controller_count(&self) -> usize {
        self.controllers.lock().expect("controller registry poisoned").len()
    }
}

/// The discovery subsystem: one log listing every subsystem on every listener.
#[derive(Debug)]
pub struct Discovery {
    view: ArcSwap<SubsystemView>,
}

impl Discovery {
    pub fn new(config: &Config) -> Discovery {
        Discovery { view: ArcSwap::from_pointee(SubsystemView::discovery(Self::entries(config), 1)) }
    }

    /// After a reload: the log lists the new config's subsystems and listeners, under a new
    /// generation counter (discovery controllers raise the log-change notice).
    pub fn rebuild(&self, config: &Config) {
        let genctr = self.genctr() + 1;
        self.view.store(Arc::new(SubsystemView::discovery(Self::entries(config), genctr)));
    }

    fn entries(config: &Config) -> Vec<DiscoveryEntry> {
        let mut entries = Vec::new();
        for (portid, l) in config.listeners.iter().enumerate() {
            let entry = |subnqn: &str, subtype| DiscoveryEntry {
                portid: portid as u16 + 1,
                ipv6: l.address.is_ipv6(),
                traddr: l.address.ip().to_string(),
                trsvcid: l.address.port().to_string(),
                subnqn: subnqn.into(),
                subtype,
                rdma: l.transport == nvmetro_conf::Transport::Rdma,
            };
            for s in &config.subsystems {
                entries.push(entry(&s.nqn, 2));
            }
            entries.push(entry(nvmetro_proto::subsystem::DISCOVERY_NQN, 3));
        }
        entries
    }

    /// The log as `hostnqn` may see it: only subsystems that admit the host.
    pub fn view_for(&self, hostnqn: &str, subsystems: &[Arc<Subsystem>]) -> SubsystemView {
        let mut v = (*self.view.load_full()).clone();
        v.discovery_log
            .retain(|e| e.subtype == 3 || subsystems.iter().any(|s| s.config().nqn == e.subnqn && s.config().host_allowed(hostnqn)));
        v
    }

    pub fn genctr(&self) -> u64 {
        self.view.load().discovery_genctr
    }
}
