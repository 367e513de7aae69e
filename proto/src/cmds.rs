//! Builders for the commands a host sends; used by the initiator in `perf` and by tests.

use crate::controller::prop;
use crate::nvme::{admin, fctype, io, put16, put32, put64, put_str, Command, Fuse};

/// Connect for queue `qid` with `queue_size` entries (one-based); returns the command and its data.
pub fn connect(
    cid: u16,
    qid: u16,
    queue_size: u16,
    kato_ms: u32,
    cntlid: u16,
    subnqn: &str,
    hostnqn: &str,
    hostid: [u8; 16],
) -> (Command, Vec<u8>) {
    let mut c = Command::new(admin::FABRICS, cid);
    c.0[4] = fctype::CONNECT;
    put16(&mut c.0, 42, qid);
    put16(&mut c.0, 44, queue_size - 1);
    put32(&mut c.0, 48, kato_ms);
    let mut d = vec![0u8; 1024];
    d[0..16].copy_from_slice(&hostid);
    put16(&mut d, 16, cntlid);
    put_str(&mut d[256..512], subnqn, 0);
    put_str(&mut d[512..768], hostnqn, 0);
    (c, d)
}

pub fn property_get(cid: u16, offset: u32) -> Command {
    let mut c = Command::new(admin::FABRICS, cid);
    c.0[4] = fctype::PROPERTY_GET;
    c.0[40] = if offset == prop::CAP { 1 } else { 0 };
    put32(&mut c.0, 44, offset);
    c
}

pub fn property_set(cid: u16, offset: u32, value: u32) -> Command {
    let mut c = Command::new(admin::FABRICS, cid);
    c.0[4] = fctype::PROPERTY_SET;
    put32(&mut c.0, 44, offset);
    put64(&mut c.0, 48, u64::from(value));
    c
}

/// CC value a host writes to enable the controller (NVM command set, 4 KiB pages, 64/16-byte entries).
pub const CC_ENABLE: u32 = 1 | 6 << 16 | 4 << 20;
/// CC value for a normal shutdown.
pub const CC_SHUTDOWN: u32 = CC_ENABLE | 1 << 14;

pub fn identify(cid: u16, cns: u8, nsid: u32) -> Command {
    let mut c = Command::new(admin::IDENTIFY, cid);
    c.set_nsid(nsid);
    c.set_cdw(10, u32::from(cns));
    c
}

/// Get Log Page of `len` bytes (a multiple of 4) from `offset`.
pub fn get_log_page(cid: u16, lid: u8, lsp: u8, len: usize, offset: u64) -> Command {
    let numd = (len / 4 - 1) as u32;
    let mut c = Command::new(admin::GET_LOG_PAGE, cid);
    c.set_nsid(0xffff_ffff);
    c.set_cdw(10, u32::from(lid) | u32::from(lsp) << 8 | (numd & 0xffff) << 16);
    c.set_cdw(11, numd >> 16);
    c.set_cdw(12, offset as u32);
    c.set_cdw(13, (offset >> 32) as u32);
    c
}

pub fn set_features(cid: u16, fid: u8, dw11: u32) -> Command {
    let mut c = Command::new(admin::SET_FEATURES, cid);
    c.set_cdw(10, u32::from(fid));
    c.set_cdw(11, dw11);
    c
}

pub fn get_features(cid: u16, fid: u8) -> Command {
    let mut c = Command::new(admin::GET_FEATURES, cid);
    c.set_cdw(10, u32::from(fid));
    c
}

pub fn keep_alive(cid: u16) -> Command {
    Command::new(admin::KEEP_ALIVE, cid)
}

pub fn async_event_request(cid: u16) -> Command {
    Command::new(admin::ASYNC_EVENT_REQUEST, cid)
}

pub fn disconnect(cid: u16) -> Command {
    let mut c = Command::new(admin::FABRICS, cid);
    c.0[4] = fctype::DISCONNECT;
    c
}

/// Read, Write or Compare of `blocks` blocks at `slba`.
pub fn rw(cid: u16, opcode: u8, nsid: u32, slba: u64, blocks: u32) -> Command {
    let mut c = Command::new(opcode, cid);
    c.set_nsid(nsid);
    c.set_cdw(10, slba as u32);
    c.set_cdw(11, (slba >> 32) as u32);
    c.set_cdw(12, blocks - 1);
    c
}

pub fn read(cid: u16, nsid: u32, slba: u64, blocks: u32) -> Command {
    rw(cid, io::READ, nsid, slba, blocks)
}

pub fn write(cid: u16, nsid: u32, slba: u64, blocks: u32) -> Command {
    rw(cid, io::WRITE, nsid, slba, blocks)
}

pub fn flush(cid: u16, nsid: u32) -> Command {
    let mut c = Command::new(io::FLUSH, cid);
    c.set_nsid(nsid);
    c
}

pub fn write_zeroes(cid: u16, nsid: u32, slba: u64, blocks: u32, deallocate: bool) -> Command {
    let mut c = rw(cid, io::WRITE_ZEROES, nsid, slba, blocks);
    if deallocate {
        c.set_cdw(12, c.cdw(12) | 1 << 25);
    }
    c
}

/// Dataset Management deallocating `ranges` of (slba, blocks); returns the command and its data.
pub fn deallocate(cid: u16, nsid: u32, ranges: &[(u64, u32)]) -> (Command, Vec<u8>) {
    let mut c = Command::new(io::DATASET_MANAGEMENT, cid);
    c.set_nsid(nsid);
    c.set_cdw(10, ranges.len() as u32 - 1);
    c.set_cdw(11, 1 << 2);
    let mut d = vec![0u8; ranges.len() * 16];
    for (i, (slba, blocks)) in ranges.iter().enumerate() {
        put32(&mut d, i * 16 + 4, *blocks);
        put64(&mut d, i * 16 + 8, *slba);
    }
    (c, d)
}

/// A fused Compare+Write pair over the same range.
pub fn compare_and_write(cid_compare: u16, cid_write: u16, nsid: u32, slba: u64, blocks: u32) -> (Command, Command) {
    let mut cmp = rw(cid_compare, io::COMPARE, nsid, slba, blocks);
    cmp.set_fuse(Fuse::First);
    let mut wr = rw(cid_write, io::WRITE, nsid, slba, blocks);
    wr.set_fuse(Fuse::Second);
    (cmp, wr)
}
