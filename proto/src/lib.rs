//! NVMe, NVMe over Fabrics and NVMe/TCP for nvmetro, without sockets or clocks (sans-IO).
//!
//! * [`nvme`]: commands, completions, status codes.
//! * [`pdu`]: the NVMe/TCP PDU parser and encoders.
//! * [`tcp`]: per-connection NVMe/TCP state machines for the target and the host.
pub mod nvme;
pub mod pdu;
pub mod tcp;
