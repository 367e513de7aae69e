//! What a controller knows of its subsystem, as one listener sees it. The target rebuilds a
//! [`SubsystemView`] whenever something changes (ANA state, namespaces) and controllers compare its
//! change counters to raise asynchronous events.

/// Asymmetric Namespace Access state of a group on one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AnaState {
    Optimized = 1,
    NonOptimized = 2,
    Inaccessible = 3,
    PersistentLoss = 4,
    Change = 15,
}

impl AnaState {
    /// The status an I/O command gets on a path in this state, if it cannot be served.
    pub fn io_status(self) -> Option<crate::nvme::Status> {
        use crate::nvme::Status;
        match self {
            AnaState::Optimized | AnaState::NonOptimized => None,
            AnaState::Inaccessible => Some(Status::ANA_INACCESSIBLE),
            AnaState::PersistentLoss => Some(Status::ANA_PERSISTENT_LOSS),
            AnaState::Change => Some(Status::ANA_TRANSITION),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AnaState::Optimized => "optimized",
            AnaState::NonOptimized => "non-optimized",
            AnaState::Inaccessible => "inaccessible",
            AnaState::PersistentLoss => "persistent-loss",
            AnaState::Change => "change",
        }
    }

    pub fn parse(s: &str) -> Option<AnaState> {
        Some(match s {
            "optimized" => AnaState::Optimized,
            "non-optimized" | "non_optimized" | "nonoptimized" => AnaState::NonOptimized,
            "inaccessible" => AnaState::Inaccessible,
            "persistent-loss" | "persistent_loss" => AnaState::PersistentLoss,
            "change" => AnaState::Change,
            _ => return None,
        })
    }
}

/// One namespace of the subsystem.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub nsid: u32,
    pub block_size: u32,
    pub blocks: u64,
    pub nguid: [u8; 16],
    pub eui64: [u8; 8],
    pub uuid: [u8; 16],
    /// ANA group, 1-based and dense.
    pub ana_group: u32,
    /// The backing device has a volatile write cache (Flush matters).
    pub volatile_cache: bool,
}

/// Whether a subsystem serves storage or the discovery log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubsystemKind {
    Nvm,
    Discovery,
}

/// One entry of the discovery log (log page 70h).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryEntry {
    pub portid: u16,
    pub ipv6: bool,
    pub traddr: String,
    pub trsvcid: String,
    pub subnqn: String,
    /// 2 = NVM subsystem, 3 = this discovery subsystem.
    pub subtype: u8,
    /// The listener speaks NVMe/RDMA (TRTYPE 1 with the RDMA TSAS) rather than NVMe/TCP.
    pub rdma: bool,
}

/// The well-known discovery subsystem NQN.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// A subsystem through one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubsystemView {
    pub kind: SubsystemKind,
    pub nqn: String,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    /// Sorted by NSID.
    pub namespaces: Vec<NamespaceInfo>,
    /// State of each ANA group on this listener; index 0 is group 1.
    pub ana_groups: Vec<AnaState>,
    /// Bumped on every ANA state change of this listener.
    pub ana_change_count: u64,
    /// Bumped whenever namespaces are added or removed.
    pub ns_change_count: u64,
    /// Namespaces whose attributes changed at the last bump (for log page 04h).
    pub changed_namespaces: Vec<u32>,
    pub discovery_log: Vec<DiscoveryEntry>,
    pub discovery_genctr: u64,
    /// Highest NSID this subsystem may ever use (Identify NN, also MNAN).
    pub max_namespaces: u32,
    /// Seconds within which an ANA transition completes (ANATT).
    pub ana_transition_time: u8,
    /// Groups this site serves alone (its metro peer is lost): Optimized for every host.
    pub sole_groups: Vec<u32>,
}

impl SubsystemView {
    pub fn namespace(&self, nsid: u32) -> Option<&NamespaceInfo> {
        self.namespaces.binary_search_by_key(&nsid, |n| n.nsid).ok().map(|i| &self.namespaces[i])
    }

    pub fn ana_state(&self, group: u32) -> AnaState {
        group.checked_sub(1).and_then(|i| self.ana_groups.get(i as usize)).copied().unwrap_or(AnaState::Inaccessible)
    }

    /// The view for a host of another site: Optimized groups are reported Non-Optimized, so the
    /// host prefers its own site's paths; states that cannot serve are left as they are.
    pub fn for_remote_host(&self) -> SubsystemView {
        let mut v = self.clone();
        for (i, s) in v.ana_groups.iter_mut().enumerate() {
            if *s == AnaState::Optimized && !self.sole_groups.contains(&(i as u32 + 1)) {
                *s = AnaState::NonOptimized;
            }
        }
        v
    }

    /// A discovery subsystem view listing `entries`.
    pub fn discovery(entries: Vec<DiscoveryEntry>, genctr: u64) -> SubsystemView {
        SubsystemView {
            kind: SubsystemKind::Discovery,
            nqn: DISCOVERY_NQN.into(),
            serial: "nvmetro-discovery".into(),
            model: "nvmetro discovery".into(),
            firmware: env!("CARGO_PKG_VERSION").into(),
            namespaces: Vec::new(),
            ana_groups: Vec::new(),
            ana_change_count: 0,
            ns_change_count: 0,
            changed_namespaces: Vec::new(),
            discovery_log: entries,
            discovery_genctr: genctr,
            max_namespaces: 0,
            ana_transition_time: 0,
            sole_groups: Vec::new(),
        }
    }
}

/// I/O counters reported in the SMART / health log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Health {
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub read_commands: u64,
    pub write_commands: u64,
    pub power_on_seconds: u64,
}
