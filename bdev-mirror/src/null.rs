//! The null device: writes vanish, reads return zeroes, everything completes at once.

use crate::{check_range, Bdev, BdevChannel, BdevError, BdevInfo, BdevOp, BdevOutput, IoBufMut, SyncChannel, Synchronous};
use std::sync::Arc;

#[derive(Debug)]
pub struct NullBdev {
    info: BdevInfo,
}

impl NullBdev {
    pub fn new(name: &str, block_size: u32, blocks: u64) -> NullBdev {
        NullBdev { info: BdevInfo { name: name.into(), block_size, blocks, volatile_cache: false } }
    }
}

impl Bdev for NullBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }
    fn channel(self: Arc<Self>) -> std::io::Result<Box<dyn BdevChannel>> {
        Ok(SyncChannel::boxed(self))
    }
}

impl Synchronous for NullBdev {
    fn execute(&self, op: BdevOp) -> Result<BdevOutput, BdevError> {
        check_range(&self.info, &op).map(|_| match op {
            BdevOp::Read { len, .. } => BdevOutput::Data(vec![0; len]),
            BdevOp::Compare { expected, .. } | BdevOp::CompareAndWrite { expected, .. } => {
                if expected.iter().all(|&b| b == 0) {
                    BdevOutput::Done
                } else {
                    BdevOutput::Miscompare
                }
            }
            _ => BdevOutput::Done,
        })
    }

    fn read_into(&self, offset: u64, len: usize, mut buf: Vec<u8>) -> Result<BdevOutput, BdevError> {
        check_range(&self.info, &BdevOp::Read { offset, len })?;
        buf.clear();
        buf.resize(len, 0);
        Ok(BdevOutput::Data(buf))
    }

    fn read_into_buf(&self, offset: u64, len: usize, mut buf: IoBufMut) -> Result<BdevOutput, BdevError> {
        check_range(&self.info, &BdevOp::Read { offset, len })?;
        buf.set_len(len);
        buf.fill(0);
        Ok(BdevOutput::Buffer(buf.freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::run_to_completion;

    #[test]
    fn reads_zeroes_into_an_offered_buffer() {
        let b: Arc<dyn crate::Bdev> = Arc::new(NullBdev::new("n", 512, 8));
        let mut ch = b.channel().unwrap();
        let mut stale = crate::IoBufPool::new().take(4096);
        stale.fill(9);
        let (got, in_place) = crate::conformance::read_into_buf(ch.as_mut(), 1, 512, 1024, stale);
        assert_eq!((got, in_place), (Ok(vec![0; 1024]), true));
        let (got, _) = crate::conformance::read_into_buf(ch.as_mut(), 2, 3584, 1024, crate::IoBufPool::new().take(1024));
        assert!(matches!(got, Err(BdevError::OutOfRange { .. })));
    }

    #[test]
    fn reads_zeroes_and_checks_bounds() {
        let b = Arc::new(NullBdev::new("n", 512, 8));
        let mut ch = b.channel().unwrap();
        let w = BdevOp::Write { offset: 0, data: vec![1; 512].into(), fua: false };
        assert_eq!(run_to_completion(ch.as_mut(), 1, w), Ok(BdevOutput::Done));
        assert_eq!(run_to_completion(ch.as_mut(), 2, BdevOp::Read { offset: 3584, len: 512 }), Ok(BdevOutput::Data(vec![0; 512])));
        assert!(run_to_completion(ch.as_mut(), 3, BdevOp::Read { offset: 3584, len: 1024 }).is_err());
        let recycled = crate::conformance::read_into(ch.as_mut(), 4, 0, 512, vec![7; 1024]);
        assert_eq!(recycled, Ok(BdevOutput::Data(vec![0; 512])));
        assert!(crate::conformance::read_into(ch.as_mut(), 5, 3584, 1024, Vec::new()).is_err());
    }
}
