//! NVMe, NVMe over Fabrics and NVMe/TCP for nvmetro, without sockets or clocks (sans-IO).
//!
//! * [`nvme`]: commands, completions, status codes.
//! * [`pdu`]: the NVMe/TCP PDU parser and encoders.
//! * [`tcp`]: per-connection NVMe/TCP state machines for the target and the host.
//! * [`rdma`]: the NVMe/RDMA binding: RDMA CM private data, SGL data plans, the RDMA TSAS.
//! * [`subsystem`]: what a controller knows of its subsystem through one listener (namespaces,
//!   ANA groups and their states, the discovery log).
//! * [`identify`]: Identify data and log pages.
//! * [`controller`]: Connect, properties, admin commands, asynchronous events, keep-alive, and
//!   validation of I/O commands (including fused Compare+Write pairing).
//! * [`cmds`]: command builders for hosts.
//!
//! The target (`nvmetro-tgt`) and the initiator (`nvmetro-perf`) both drive these machines; the
//! tests in `tests/loopback.rs` drive a host against a controller entirely in memory.
pub mod cmds;
pub mod controller;
pub mod identify;
pub mod nvme;
pub mod pdu;
pub mod rdma;
pub mod subsystem;
pub mod tcp;
