//! The mirror: one namespace on two sites (DRBD protocol C semantics, active-active).
//!
//! * [`frame`]: the replication link's wire format.
//! * [`meta`]: persistent generations and dirty/written region bitmaps.
//! * [`core`]: one leg's state machine, without I/O: ordering, loss, resync.
//! * [`lanes`]: a link of several connections, without I/O: each frame's lane and barrier
//!   count, and the order in which the receiver hands frames to the core.
//!
//! * [`driver`]: binds a core to a local bdev, a transport, the metadata file and the reactors.
//! * [`transport`]: how a leg reaches its peer (TCP; an in-memory pair for tests); with the
//!   `rdma` feature, `rdma_link`: the same byte stream over SEND/RECV of an RC queue pair.
//! * [`witness`]: the third-site arbiter's protocol and state.
//!
//! `tests/sim.rs` drives two cores against each other through a simulated link with cuts,
//! crashes, failing legs and paused sites.

pub mod auth;
pub mod core;
pub mod driver;
pub mod frame;
pub mod lanes;
pub mod meta;
mod outbox;
#[cfg(feature = "rdma")]
pub mod rdma_link;
pub mod transport;
pub mod witness;

/// A leg's disk state, as DRBD users know them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DiskState {
    UpToDate = 1,
    /// Being resynced (or new): not a faithful copy.
    Inconsistent = 2,
    /// Was a faithful copy, but the peer may have moved on.
    Outdated = 3,
    /// This leg's device failed I/O (recorded durably): it serves nothing until a resync from
    /// the peer brings it back.
    Failed = 4,
}

impl DiskState {
    pub fn from_u8(v: u8) -> Option<DiskState> {
        Some(match v {
            1 => DiskState::UpToDate,
            2 => DiskState::Inconsistent,
            3 => DiskState::Outdated,
            4 => DiskState::Failed,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            DiskState::UpToDate => "UpToDate",
            DiskState::Inconsistent => "Inconsistent",
            DiskState::Outdated => "Outdated",
            DiskState::Failed => "Failed",
        }
    }
}
