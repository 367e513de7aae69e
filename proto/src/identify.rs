//! Identify data structures and log pages, laid out as NVMe Base 2.0 and the Linux host
//! (include/linux/nvme.h) read them.

use crate::nvme::{put16, put32, put64, put_str};
use crate::subsystem::{Health, NamespaceInfo, SubsystemKind, SubsystemView};

pub const PAGE: usize = 4096;
/// MDTS as a power of two of 4 KiB pages: 128 KiB per command.
pub const MDTS: u8 = 5;
pub const MAX_TRANSFER: usize = 4096 << MDTS;
/// In-capsule data accepted on I/O queues by default: an 8 KiB write needs no R2T round trip
/// (`[target] in_capsule_data_size` changes it).
pub const IO_IN_CAPSULE: usize = 8192;
/// In-capsule data accepted on the admin queue (Linux sends up to 8 KiB there).
pub const ADMIN_IN_CAPSULE: usize = 8192;
/// Maximum queue entries (CAP.MQES is this minus one).
pub const MAX_QUEUE_ENTRIES: u16 = 1024;
/// Asynchronous event requests a controller holds at once (AERL is this minus one).
pub const MAX_AERS: usize = 4;
pub const VERSION_1_4: u32 = 0x0001_0400;

/// OAES / AEC bits.
pub const AEN_NS_ATTR: u32 = 1 << 8;
pub const AEN_ANA_CHANGE: u32 = 1 << 11;
pub const AEN_DISCOVERY_CHANGE: u32 = 1 << 31;

/// Identify Controller (CNS 01h); `io_in_capsule` is the in-capsule data the I/O queues accept;
/// `keyed_sgls`: the controller is reached over NVMe/RDMA (SGLS bit 2, keyed SGL data blocks).
pub fn controller(view: &SubsystemView, cntlid: u16, io_in_capsule: usize, keyed_sgls: bool) -> Vec<u8> {
    let mut d = vec![0u8; PAGE];
    let nvm = view.kind == SubsystemKind::Nvm;
    put16(&mut d, 0, 0x1b36); // VID/SSVID: an unassigned-in-practice software vendor id
    put16(&mut d, 2, 0x1b36);
    put_str(&mut d[4..24], &view.serial, b' ');
    put_str(&mut d[24..64], &view.model, b' ');
    put_str(&mut d[64..72], &view.firmware, b' ');
    d[72] = 6; // RAB
    d[73..76].copy_from_slice(&[0x6e, 0x76, 0x6d]); // IEEE OUI
                                                    // CMIC: bit 1 multiple controllers, bit 3 ANA reporting.
    d[76] = if nvm { 0x0a } else { 0 };
    d[77] = MDTS;
    put16(&mut d, 78, cntlid);
    put32(&mut d, 80, VERSION_1_4);
    put32(&mut d, 92, if nvm { AEN_NS_ATTR | AEN_ANA_CHANGE } else { AEN_DISCOVERY_CHANGE });
    d[111] = if nvm { 1 } else { 2 }; // CNTRLTYPE: I/O or discovery controller
    put16(&mut d, 256, 0); // OACS: no optional admin commands
    d[258] = 3; // ACL: four outstanding aborts
    d[259] = (MAX_AERS - 1) as u8;
    d[260] = 0x03; // FRMW: one slot, slot 1 read-only
    d[261] = 0x02 | 0x04; // LPA: command effects log, extended data for Get Log Page
    d[262] = 0; // ELPE: one error log entry
    put16(&mut d, 266, 343); // WCTEMP
    put16(&mut d, 268, 373); // CCTEMP
    put16(&mut d, 320, 1); // KAS: keep-alive granularity 100 ms
    if nvm {
        d[342] = view.ana_transition_time;
        d[343] = 0x1f; // ANACAP: every state reportable (as Linux nvmet; bit 6 would make nvme-cli drop the NSID lists)
        put32(&mut d, 344, view.ana_groups.len().max(1) as u32); // ANAGRPMAX
        put32(&mut d, 348, view.ana_groups.len().max(1) as u32); // NANAGRPID
    }
    d[512] = 0x66; // SQES
    d[513] = 0x44; // CQES
    put16(&mut d, 514, MAX_QUEUE_ENTRIES); // MAXCMD
    put32(&mut d, 516, view.max_namespaces); // NN
    if nvm {
        put16(&mut d, 520, 0x01 | 0x04 | 0x08); // ONCS: Compare, Dataset Management, Write Zeroes
        put16(&mut d, 522, 0x01); // FUSES: Compare and Write
        let vwc = view.namespaces.iter().any(|n| n.volatile_cache);
        d[525] = vwc as u8 | 0x06; // VWC present; Flush with NSID FFFFFFFFh supported
        put16(&mut d, 532, 0xff); // ACWU: compare-and-write is atomic up to 256 blocks
        put32(&mut d, 540, view.max_namespaces); // MNAN
    }
    // SGLS: SGLs supported, offsets in data block descriptors; keyed data blocks over RDMA.
    put32(&mut d, 536, 0x1 | 1 << 20 | u32::from(keyed_sgls) << 2);
    put_str(&mut d[768..1024], &view.nqn, 0);
    let in_capsule = if nvm { io_in_capsule } else { 0 };
    put32(&mut d, 1792, ((64 + in_capsule) / 16) as u32); // IOCCSZ
    put32(&mut d, 1796, 1); // IORCSZ
    put16(&mut d, 1800, 0); // ICDOFF
    d[1802] = 0; // FCATT: dynamic controller model
    d[1803] = 1; // MSDBD
                 // Power state 0: 25 W max, so hosts see a valid descriptor.
    put16(&mut d, 2048, 2500);
    d
}

/// Identify Namespace (CNS 00h) for an active namespace.
pub fn namespace(ns: &NamespaceInfo) -> Vec<u8> {
    let mut d = vec![0u8; PAGE];
    put64(&mut d, 0, ns.blocks); // NSZE
    put64(&mut d, 8, ns.blocks); // NCAP
    put64(&mut d, 16, ns.blocks); // NUSE
    d[24] = 0x01 | 0x08; // NSFEAT: deallocate supported, NGUID/EUI-64 never reused
    d[25] = 0; // NLBAF: one format
    d[26] = 0; // FLBAS
    d[30] = 0x01; // NMIC: may be attached to several controllers
    d[33] = 0x01 | 0x08; // DLFEAT: deallocated blocks read as zeroes; Write Zeroes may deallocate
    put32(&mut d, 92, ns.ana_group); // ANAGRPID
    d[104..120].copy_from_slice(&ns.nguid);
    d[120..128].copy_from_slice(&ns.eui64);
    d[128 + 2] = ns.block_size.trailing_zeros() as u8; // LBAF0.LBADS
    d
}

/// Active Namespace ID list (CNS 02h): NSIDs above `after`, ascending.
pub fn active_namespaces(view: &SubsystemView, after: u32) -> Vec<u8> {
    let mut d = vec![0u8; PAGE];
    for (i, ns) in view.namespaces.iter().filter(|n| n.nsid > after).take(PAGE / 4).enumerate() {
        put32(&mut d, i * 4, ns.nsid);
    }
    d
}

/// Namespace Identification Descriptor list (CNS 03h): EUI-64, NGUID, UUID, command set.
pub fn namespace_descriptors(ns: &NamespaceInfo) -> Vec<u8> {
    let mut d = vec![0u8; PAGE];
    let mut off = 0;
    let mut add = |ty: u8, id: &[u8]| {
        d[off] = ty;
        d[off + 1] = id.len() as u8;
        d[off + 4..off + 4 + id.len()].copy_from_slice(id);
        off += 4 + id.len();
    };
    if ns.eui64 != [0; 8] {
        add(1, &ns.eui64);
    }
    if ns.nguid != [0; 16] {
        add(2, &ns.nguid);
    }
    if ns.uuid != [0; 16] {
        add(3, &ns.uuid);
    }
    add(4, &[0]); // CSI: NVM command set
    d
}

/// ANA log page (0Ch). With `groups_only` (RGO), NSID lists are left out.
pub fn ana_log(view: &SubsystemView, groups_only: bool) -> Vec<u8> {
    let mut d = vec![0u8; 16];
    put64(&mut d, 0, view.ana_change_count);
    put16(&mut d, 8, view.ana_groups.len() as u16);
    for (i, state) in view.ana_groups.iter().enumerate() {
        let group = i as u32 + 1;
        let nsids: Vec<u32> =
            if groups_only { Vec::new() } else { view.namespaces.iter().filter(|n| n.ana_group == group).map(|n| n.nsid).collect() };
        let start = d.len();
        d.resize(start + 32 + nsids.len() * 4, 0);
        put32(&mut d, start, group);
        put32(&mut d, start + 4, nsids.len() as u32);
        put64(&mut d, start + 8, view.ana_change_count);
        d[start + 16] = *state as u8;
        for (j, nsid) in nsids.iter().enumerate() {
            put32(&mut d, start + 32 + j * 4, *nsid);
        }
    }
    d
}

/// Discovery log page (70h): a 1 KiB header and a 1 KiB entry per listener.
pub fn discovery_log(view: &SubsystemView) -> Vec<u8> {
    let mut d = vec![0u8; 1024 * (1 + view.discovery_log.len())];
    put64(&mut d, 0, view.discovery_genctr);
    put64(&mut d, 8, view.discovery_log.len() as u64);
    for (i, e) in view.discovery_log.iter().enumerate() {
        let b = &mut d[1024 * (i + 1)..1024 * (i + 2)];
        b[0] = if e.rdma { crate::rdma::TRTYPE_RDMA } else { crate::rdma::TRTYPE_TCP };
        b[1] = if e.ipv6 { 2 } else { 1 }; // ADRFAM
        b[2] = e.subtype;
        // TREQ: secure channel not required. (Bit 2, "SQ flow control disable supported", is left
        // out: Debian 12's nvme-cli prints the combination as "unrecognized".)
        b[3] = 0x02;
        put16(b, 4, e.portid);
        put16(b, 6, 0xffff); // CNTLID: dynamic
        put16(b, 8, 32); // ASQSZ
        put_str(&mut b[32..64], &e.trsvcid, b' ');
        put_str(&mut b[256..512], &e.subnqn, 0);
        put_str(&mut b[512..768], &e.traddr, b' ');
        if e.rdma {
            b[768..1024].copy_from_slice(&crate::rdma::tsas());
        } else {
            b[768] = 0; // TSAS.SECTYPE: none
        }
    }
    d
}

/// SMART / Health Information (02h).
pub fn smart_log(h: &Health) -> Vec<u8> {
    let mut d = vec![0u8; 512];
    put16(&mut d, 1, 298); // composite temperature, kelvin
    d[3] = 100; // available spare
    d[4] = 10; // threshold
    let units = |bytes: u64| bytes.div_ceil(512_000) as u128; // thousands of 512-byte units
    d[32..48].copy_from_slice(&units(h.bytes_read).to_le_bytes());
    d[48..64].copy_from_slice(&units(h.bytes_written).to_le_bytes());
    d[64..80].copy_from_slice(&(h.read_commands as u128).to_le_bytes());
    d[80..96].copy_from_slice(&(h.write_commands as u128).to_le_bytes());
    d[128..144].copy_from_slice(&((h.power_on_seconds / 3600) as u128).to_le_bytes());
    d
}

/// Firmware Slot Information (03h).
pub fn firmware_log(view: &SubsystemView) -> Vec<u8> {
    let mut d = vec![0u8; 512];
    d[0] = 1; // AFI: slot 1 active
    put_str(&mut d[8..16], &view.firmware, b' ');
    d
}

/// Commands Supported and Effects (05h).
pub fn command_effects() -> Vec<u8> {
    use crate::nvme::{admin, io};
    let mut d = vec![0u8; PAGE];
    const CSUPP: u32 = 1;
    const LBCC: u32 = 1 << 1;
    for op in [
        admin::GET_LOG_PAGE,
        admin::IDENTIFY,
        admin::ABORT,
        admin::SET_FEATURES,
        admin::GET_FEATURES,
        admin::ASYNC_EVENT_REQUEST,
        admin::KEEP_ALIVE,
    ] {
        put32(&mut d, op as usize * 4, CSUPP);
    }
    for op in [io::FLUSH, io::READ, io::COMPARE] {
        put32(&mut d, 1024 + op as usize * 4, CSUPP);
    }
    for op in [io::WRITE, io::WRITE_ZEROES, io::DATASET_MANAGEMENT] {
        put32(&mut d, 1024 + op as usize * 4, CSUPP | LBCC);
    }
    d
}

/// Changed Namespace List (04h).
pub fn changed_namespaces(list: &[u32]) -> Vec<u8> {
    let mut d = vec![0u8; PAGE];
    if list.len() > 1024 {
        put32(&mut d, 0, 0xffff_ffff); // more changed than fit: the host rescans all
    } else {
        for (i, nsid) in list.iter().enumerate() {
            put32(&mut d, i * 4, *nsid);
        }
    }
    d
}
