//! Any bytes as an NVMe/RDMA command capsule (SQE plus in-capsule data) and as RDMA CM connect
//! private data: planning a capsule's data never panics and names only bytes inside the capsule
//! (in-capsule data) or a transfer within the limit (keyed SGL); private data parses or names a
//! reject status, and what parses re-encodes to the same request.
#![no_main]
use libfuzzer_sys::fuzz_target;
use nvmetro_proto::rdma::{self, ConnectRequest, DataPlan};

fuzz_target!(|input: &[u8]| {
    let Some((&flags, capsule)) = input.split_first() else { return };
    let in_capsule = [0usize, 4096, 8192, 16384][flags as usize & 3];
    let max_transfer = [4096usize, 131072][(flags >> 2) as usize & 1];
    match rdma::plan_data(capsule, in_capsule, max_transfer) {
        Ok(DataPlan::InCapsule { offset, len }) => assert!(offset >= rdma::SQE_LEN && offset + len <= capsule.len() && len <= in_capsule),
        Ok(DataPlan::ReadFromHost(b) | DataPlan::WriteToHost(b)) => assert!(b.len > 0 && b.len as usize <= max_transfer),
        Ok(DataPlan::None) | Err(_) => {}
    }
    if let Ok(req) = ConnectRequest::parse(capsule) {
        assert_eq!(ConnectRequest::parse(&req.encode()), Ok(req));
        assert!(req.target_recv_depth() <= req.hrqsize);
    }
});
