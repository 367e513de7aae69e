//! Work requests on an rdma_cm id's queue pair: one at a time, or a batch behind one doorbell
//! (a reactor posts a turn's requests together).

use super::cm::CmId;
use super::verbs::{RemoteBuf, Sge};
use super::zerocopy::ZERO_COPY_WR_ID;
use super::RdmaError;
use rdma_sys as sys;

/// Flags of a send-queue work request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SendFlags(u32);

impl SendFlags {
    pub const NONE: SendFlags = SendFlags(0);
    /// Produce a completion (without it, a successful request completes silently).
    pub const SIGNALED: SendFlags = SendFlags(sys::ibv_send_flags::IBV_SEND_SIGNALED.0);
    /// Wake a peer that armed its CQ for solicited completions only.
    pub const SOLICITED: SendFlags = SendFlags(sys::ibv_send_flags::IBV_SEND_SOLICITED.0);
    /// Copy the data into the request at post time (up to QpCaps::max_inline_data).
    pub const INLINE: SendFlags = SendFlags(sys::ibv_send_flags::IBV_SEND_INLINE.0);
    /// Start only after earlier RDMA READs completed.
    pub const FENCE: SendFlags = SendFlags(sys::ibv_send_flags::IBV_SEND_FENCE.0);
}

impl std::ops::BitOr for SendFlags {
    type Output = SendFlags;
    fn bitor(self, rhs: SendFlags) -> SendFlags {
        SendFlags(self.0 | rhs.0)
    }
}

/// What a send-queue work request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendOp {
    /// A message into the peer's next posted receive.
    Send,
    /// A message with 32 bits of immediate data.
    SendWithImm(u32),
    /// Writes the gathered bytes into the peer's buffer.
    Write(RemoteBuf),
    /// As Write, then consumes a peer receive that reports the immediate data.
    WriteWithImm(RemoteBuf, u32),
    /// Reads the peer's buffer into the scattered local bytes.
    Read(RemoteBuf),
}

/// One send-queue work request of a batch.
#[derive(Debug, Clone, Copy)]
pub struct SendRequest<'a> {
    pub wr_id: u64,
    pub op: SendOp,
    pub sges: &'a [Sge<'a>],
    pub flags: SendFlags,
}

/// One receive of a batch.
#[derive(Debug, Clone, Copy)]
pub struct RecvRequest<'a> {
    pub wr_id: u64,
    pub sges: &'a [Sge<'a>],
}

/// Requests linked per doorbell in a batch (on the stack: 16 × 128 bytes).
const CHAIN: usize = 16;

fn check_wr_id(wr_id: u64) -> Result<(), RdmaError> {
    if wr_id & ZERO_COPY_WR_ID != 0 {
        return Err(RdmaError::Invalid("wr_ids with bit 63 set are reserved for zero-copy requests"));
    }
    Ok(())
}

fn num_sge(sges: &[Sge<'_>]) -> Result<libc::c_int, RdmaError> {
    libc::c_int::try_from(sges.len()).map_err(|_| RdmaError::Invalid("too many scatter/gather entries"))
}

fn zeroed_send_wr() -> sys::ibv_send_wr {
    // SAFETY: ibv_send_wr is plain data (integers, pointers, unions of those); zero is valid.
    unsafe { std::mem::zeroed() }
}

/// Fills `wr` (zeroed) for `r`; refuses a transfer longer than its remote buffer.
fn fill_send(wr: &mut sys::ibv_send_wr, r: &SendRequest<'_>) -> Result<(), RdmaError> {
    check_wr_id(r.wr_id)?;
    let total: u64 = r.sges.iter().map(|s| u64::from(s.len())).sum();
    wr.wr_id = r.wr_id;
    wr.sg_list = r.sges.as_ptr() as *mut sys::ibv_sge;
    wr.num_sge = num_sge(r.sges)?;
    wr.send_flags = r.flags.0;
    let remote = |b: RemoteBuf| {
        if total > u64::from(b.len) {
            return Err(RdmaError::Invalid("the request is longer than the remote buffer"));
        }
        Ok(sys::rdma_t { remote_addr: b.addr, rkey: b.rkey })
    };
    use sys::ibv_wr_opcode as o;
    match r.op {
        SendOp::Send => wr.opcode = o::IBV_WR_SEND,
        SendOp::SendWithImm(imm) => {
            wr.opcode = o::IBV_WR_SEND_WITH_IMM;
            wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
        }
        SendOp::Write(b) => {
            wr.opcode = o::IBV_WR_RDMA_WRITE;
            wr.wr.rdma = remote(b)?;
        }
        SendOp::WriteWithImm(b, imm) => {
            wr.opcode = o::IBV_WR_RDMA_WRITE_WITH_IMM;
            wr.wr.rdma = remote(b)?;
            wr.imm_data_invalidated_rkey_union.imm_data = imm.to_be();
        }
        SendOp::Read(b) => {
            wr.opcode = o::IBV_WR_RDMA_READ;
            wr.wr.rdma = remote(b)?;
        }
    }
    Ok(())
}

/// How many requests of a chain starting at `first` were posted before `bad`.
fn posted_before<T>(first: *const T, bad: *const T, len: usize) -> usize {
    if bad.is_null() {
        return 0;
    }
    let i = (bad as usize).wrapping_sub(first as usize) / std::mem::size_of::<T>();
    i.min(len)
}

impl CmId {
    /// Posts one send-queue work request gathering `sges`. Its completion (if signaled, or on
    /// failure) carries `wr_id`. A Write, WriteWithImm or Read longer than the remote buffer is
    /// refused here; the peer's device checks the rkey and bounds.
    pub fn post_send(&self, wr_id: u64, op: SendOp, sges: &[Sge<'_>], flags: SendFlags) -> Result<(), RdmaError> {
        self.post_sends(&[SendRequest { wr_id, op, sges, flags }]).map_err(|(_, e)| e)
    }

    /// Posts `reqs` in order, up to 16 per doorbell. On failure, says how many were posted
    /// (those complete as usual) along with the error; none after them was.
    pub fn post_sends(&self, reqs: &[SendRequest<'_>]) -> Result<(), (usize, RdmaError)> {
        let qp = self.qp().map_err(|e| (0, e))?;
        let mut done = 0;
        for chunk in reqs.chunks(CHAIN) {
            let mut wrs: [sys::ibv_send_wr; CHAIN] = std::array::from_fn(|_| zeroed_send_wr());
            for (i, r) in chunk.iter().enumerate() {
                fill_send(&mut wrs[i], r).map_err(|e| (done, e))?;
            }
            let base = wrs.as_mut_ptr();
            for i in 1..chunk.len() {
                // SAFETY: i - 1 and i are below chunk.len() <= CHAIN, inside `wrs`.
                unsafe { (*base.add(i - 1)).next = base.add(i) };
            }
            let mut bad: *mut sys::ibv_send_wr = std::ptr::null_mut();
            // SAFETY: the QP is live (self keeps it); the chain of chunk.len() requests lives in
            // `wrs` for the call, each with a valid sg_list (Sge is repr(transparent) over
            // ibv_sge, only read). Each entry names memory of a region alive for the borrow (an
            // INLINE copy reads live memory); the device reaches the rest only through its lkey,
            // checked against the registration.
            let rc = unsafe { sys::ibv_post_send(qp, base, &mut bad) };
            if rc != 0 {
                let posted = posted_before(base, bad, chunk.len());
                return Err((done + posted, RdmaError::os_code("ibv_post_send", rc)));
            }
            done += chunk.len();
        }
        Ok(())
    }

    /// Posts one receive scattering into `sges`; its completion carries `wr_id`.
    pub fn post_recv(&self, wr_id: u64, sges: &[Sge<'_>]) -> Result<(), RdmaError> {
        self.post_recvs(&[RecvRequest { wr_id, sges }]).map_err(|(_, e)| e)
    }

    /// Posts `reqs` in order, up to 16 per doorbell; on failure, how many were posted.
    pub fn post_recvs(&self, reqs: &[RecvRequest<'_>]) -> Result<(), (usize, RdmaError)> {
        let qp = self.qp().map_err(|e| (0, e))?;
        let mut done = 0;
        for chunk in reqs.chunks(CHAIN) {
            let empty = sys::ibv_recv_wr { wr_id: 0, next: std::ptr::null_mut(), sg_list: std::ptr::null_mut(), num_sge: 0 };
            let mut wrs = [empty; CHAIN];
            for (wr, r) in wrs.iter_mut().zip(chunk) {
                check_wr_id(r.wr_id).map_err(|e| (done, e))?;
                wr.wr_id = r.wr_id;
                wr.sg_list = r.sges.as_ptr() as *mut sys::ibv_sge;
                wr.num_sge = num_sge(r.sges).map_err(|e| (done, e))?;
            }
            let base = wrs.as_mut_ptr();
            for i in 1..chunk.len() {
                // SAFETY: i - 1 and i are below chunk.len() <= CHAIN, inside `wrs`.
                unsafe { (*base.add(i - 1)).next = base.add(i) };
            }
            let mut bad: *mut sys::ibv_recv_wr = std::ptr::null_mut();
            // SAFETY: as in post_sends: the QP is live, the chain and its entries are valid for
            // the call, and the device writes only memory the entries' lkeys registered for
            // local write.
            let rc = unsafe { sys::ibv_post_recv(qp, base, &mut bad) };
            if rc != 0 {
                let posted = posted_before(base, bad, chunk.len());
                return Err((done + posted, RdmaError::os_code("ibv_post_recv", rc)));
            }
            done += chunk.len();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_chain_counts_what_was_posted() {
        let wrs = [zeroed_send_wr(), zeroed_send_wr(), zeroed_send_wr()];
        let base = wrs.as_ptr();
        assert_eq!(posted_before(base, std::ptr::null(), 3), 0);
        assert_eq!(posted_before(base, base, 3), 0);
        assert_eq!(posted_before(base, base.wrapping_add(2), 3), 2);
        assert_eq!(posted_before(base, base.wrapping_add(9), 3), 3);
    }

    #[test]
    fn send_requests_fill_opcodes_and_remote_fields() {
        let remote = RemoteBuf { addr: 0x1000, rkey: 7, len: 0 };
        let mut wr = zeroed_send_wr();
        fill_send(&mut wr, &SendRequest { wr_id: 9, op: SendOp::WriteWithImm(remote, 0xAB), sges: &[], flags: SendFlags::SIGNALED })
            .unwrap();
        assert_eq!((wr.wr_id, wr.opcode, wr.send_flags), (9, sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE_WITH_IMM, SendFlags::SIGNALED.0));
        // SAFETY: fill_send wrote these union members for a write with immediate.
        let (addr, rkey, imm) = unsafe { (wr.wr.rdma.remote_addr, wr.wr.rdma.rkey, wr.imm_data_invalidated_rkey_union.imm_data) };
        assert_eq!((addr, rkey, u32::from_be(imm)), (0x1000, 7, 0xAB));
        let mut wr = zeroed_send_wr();
        fill_send(&mut wr, &SendRequest { wr_id: 1, op: SendOp::Read(remote), sges: &[], flags: SendFlags::NONE }).unwrap();
        assert_eq!(wr.opcode, sys::ibv_wr_opcode::IBV_WR_RDMA_READ);
        // No request may carry a zero-copy read's wr_id, or its completion could free the buffer.
        let forged = SendRequest { wr_id: ZERO_COPY_WR_ID | 1, op: SendOp::Send, sges: &[], flags: SendFlags::NONE };
        assert!(matches!(fill_send(&mut zeroed_send_wr(), &forged), Err(RdmaError::Invalid(m)) if m.contains("reserved")));
    }
}
