//! How a mirror leg is set up ([`MirrorSettings`], with [`MetroSettings`] for a metro leg) and
//! what a running mirror takes without a restart ([`MirrorTuning`]).

use crate::mirror::core::{Metro, ResyncLatencyTarget, Role};
use std::path::PathBuf;
use std::time::Duration;

/// How a mirror leg is set up.
#[derive(Debug, Clone)]
pub struct MirrorSettings {
    pub role: Role,
    pub site: u8,
    pub meta_path: PathBuf,
    /// Regions of `1 << region_shift` bytes (dirty tracking and resync unit).
    pub region_shift: u32,
    /// Resync budget in bytes per second; 0 for unlimited.
    pub resync_rate: u64,
    /// The host write latency a resync steers to.
    pub resync_latency_target: ResyncLatencyTarget,
    pub heartbeat_timeout: Duration,
    /// Added to every frame this leg sends (emulated distance).
    pub link_delay: Duration,
    /// How long the idle link thread keeps polling (yielding the CPU between turns) before it
    /// sleeps in epoll; zero sleeps at once, which leaves the cores to reactors on small machines.
    pub spin: Duration,
    /// Metro mode: a witness decides who serves alone.
    pub metro: Option<MetroSettings>,
    /// How often a leg whose device failed retries to resync (zero: only `nvmetro resync`).
    pub retry_interval: Duration,
    /// The replication link's shared secret (both sites the same). Empty: connections still
    /// make the handshake (a stray or garbled connection never becomes the link), but anyone
    /// who speaks the protocol passes it.
    pub secret: Vec<u8>,
    /// Connections the link is made of (see [`crate::mirror::lanes`]); 1 is one connection,
    /// as before lanes. A link uses what both ends configured, at most.
    pub lanes: usize,
}

/// The replication settings a running mirror takes without a restart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MirrorTuning {
    /// Bytes per second; 0 for unlimited.
    pub resync_rate: u64,
    pub resync_latency_target: ResyncLatencyTarget,
    pub link_delay: Duration,
    pub heartbeat_timeout: Duration,
    pub manual_failback: bool,
}

/// A metro leg's witness and timers.
#[derive(Debug, Clone)]
pub struct MetroSettings {
    pub witness: std::net::SocketAddr,
    pub secret: Vec<u8>,
    pub core: Metro,
}
