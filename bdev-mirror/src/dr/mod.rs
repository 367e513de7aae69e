//! Disaster recovery at a third site: the asynchronous (or synchronous) stream of a
//! **consistency group**, a named set of namespaces whose writes are put in one order and applied
//! at the DR site so that its image of the whole group is crash-consistent at every instant.
//!
//! * [`sequencer`]: the production side, without I/O: numbers the group's writes, marks the
//!   epochs that keep dependent writes apart, holds what the DR site has not made durable
//!   (bounded: short-throw backpressure), releases host completions by mode, and measures the
//!   recovery point (bytes and age behind).
//! * [`applier`]: the DR side, without I/O: applies one epoch at a time (the writes of an epoch
//!   concurrently, overlapping ones in order), makes each epoch durable and records how far it
//!   got before the next begins, and acknowledges what is durable.
//! * [`frame`]: the stream's wire format.
//!
//! Why epochs: a host issues a write that depends on another (a commit record naming its data)
//! only after the first completed. The sequencer starts a new epoch at the first write submitted
//! after any completion it released, so two writes in one epoch were in flight together at the
//! host and either order (or either one alone) is a state the production site could have crashed
//! in. The applier never lets a write of epoch e + 1 reach a disk before every write of epoch e
//! is durable, so a crash of the DR site, or a cut of the stream at any point, leaves an image
//! that the production site could have had. `tests/dr_sim.rs` checks this with dependent pairs on
//! two members, random delays, reordering and crashes that keep an arbitrary subset of writes
//! that were not yet flushed.
//!
//! The daemon's side ([`group`], [`member`], [`replica`], [`link`], [`state`]):
//! * member bdevs report each write to the group before its host sees the completion, and keep
//!   overlapping writes range-locked until the group numbered them, so the epochs separate what
//!   depends on what and overlapping writes reach the DR site in the order the local copy has;
//! * the production site keeps, durably, the acknowledged sequence, a numbering reservation
//!   (written before any number past it is used), whether the copy ended and whether the last
//!   stop was clean; after an unclean stop the lost send buffer is made good by a `Rebase` and a
//!   copy that sends only the regions whose checksums differ;
//! * the DR site records its applied sequence (in place, two slots) before acknowledging it, and
//!   the regions it asked for before asking. A member's disk failure stops the DR image (it
//!   answers `Stopped` until it is repaired and restarted).
//! * over metro mirrors the group runs at both sites, each wrapping its own leg: the site that
//!   orders the writes feeds the DR site, the other stands by; each site's stream has a producer
//!   id, and when the ordering moves the new site takes the stream over (`Rebase` naming it, then
//!   a checksum copy), after which the DR site refuses the old producer's `Resume`.

pub mod applier;
pub mod frame;
pub mod group;
pub mod link;
pub mod member;
pub mod replica;
pub mod rollback;
pub mod sequencer;
pub mod state;
pub mod test_view;

/// A member of a consistency group (its index in the group's list of namespaces).
pub type Member = u16;

/// How the production site acknowledges the group's host writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrMode {
    /// A host write completes once the DR site holds it durably.
    Sync,
    /// A host write completes once it is queued in the bounded send buffer (short-throw); when
    /// the buffer is full, new writes wait for room.
    Async,
}
