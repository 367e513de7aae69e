//! The malloc device: RAM shared by all reactors, optionally on 2 MiB hugepages. Operations
//! complete within `submit`; the stripe locks of [`SharedMem`] keep concurrent copies apart and
//! make Compare+Write atomic.

use crate::{check_range, Bdev, BdevChannel, BdevError, BdevInfo, BdevOp, BdevOutput, IoBufMut, SyncChannel, Synchronous};
use nvmetro_ffi::SharedMem;
use std::sync::Arc;

#[derive(Debug)]
pub struct MallocBdev {
    info: BdevInfo,
    mem: SharedMem,
}

impl MallocBdev {
    pub fn new(name: &str, block_size: u32, size_bytes: u64, hugepages: bool) -> std::io::Result<MallocBdev> {
        let blocks = size_bytes / u64::from(block_size);
        let len = usize::try_from(blocks * u64::from(block_size)).map_err(std::io::Error::other)?;
        let mem = SharedMem::new(len, hugepages)?;
        if hugepages && !mem.on_hugepages() {
            tracing::warn!(bdev = name, "hugepages requested but not available; using ordinary pages");
        }
        Ok(MallocBdev { info: BdevInfo { name: name.into(), block_size, blocks, volatile_cache: false }, mem })
    }

    pub fn on_hugepages(&self) -> bool {
        self.mem.on_hugepages()
    }
}

impl Synchronous for MallocBdev {
    fn execute(&self, op: BdevOp) -> Result<BdevOutput, BdevError> {
        check_range(&self.info, &op)?;
        let oor = |e: nvmetro_ffi::OutOfRange| BdevError::OutOfRange { offset: e.offset, len: e.len as u64, size: e.size as u64 };
        Ok(match op {
            BdevOp::Read { offset, len } => BdevOutput::Data(self.mem.read_to_vec(offset, len).map_err(oor)?),
            BdevOp::Write { offset, data, .. } => {
                self.mem.write(offset, &data).map_err(oor)?;
                BdevOutput::Done
            }
            BdevOp::Compare { offset, expected } => {
                let mut cur = vec![0u8; expected.len()];
                self.mem.read(offset, &mut cur).map_err(oor)?;
                if cur == expected {
                    BdevOutput::Done
                } else {
                    BdevOutput::Miscompare
                }
            }
            BdevOp::CompareAndWrite { offset, expected, data } => {
                if self.mem.compare_and_write(offset, &expected, &data).map_err(oor)? {
                    BdevOutput::Done
                } else {
                    BdevOutput::Miscompare
                }
            }
            BdevOp::WriteZeroes { offset, len } | BdevOp::Deallocate { offset, len } => {
                self.mem.zero(offset, len as usize).map_err(oor)?;
                BdevOutput::Done
            }
            BdevOp::Flush => BdevOutput::Done,
        })
    }

    fn read_into(&self, offset: u64, len: usize, mut buf: Vec<u8>) -> Result<BdevOutput, BdevError> {
        check_range(&self.info, &BdevOp::Read { offset, len })?;
        let oor = |e: nvmetro_ffi::OutOfRange| BdevError::OutOfRange { offset: e.offset, len: e.len as u64, size: e.size as u64 };
        self.mem.read_into_vec(offset, len, &mut buf).map_err(oor)?;
        Ok(BdevOutput::Data(buf))
    }

    fn read_into_buf(&self, offset: u64, len: usize, mut buf: IoBufMut) -> Result<BdevOutput, BdevError> {
        check_range(&self.info, &BdevOp::Read { offset, len })?;
        let oor = |e: nvmetro_ffi::OutOfRange| BdevError::OutOfRange { offset: e.offset, len: e.len as u64, size: e.size as u64 };
        buf.set_len(len);
        self.mem.read(offset, &mut buf).map_err(oor)?;
        Ok(BdevOutput::Buffer(buf.freeze()))
    }
}

impl Bdev for MallocBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }
    fn channel(self: Arc<Self>) -> std::io::Result<Box<dyn BdevChannel>> {
        Ok(SyncChannel::boxed(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() {
        crate::conformance::check(Arc::new(MallocBdev::new("m", 512, 1 << 20, false).unwrap()));
        crate::conformance::check(Arc::new(MallocBdev::new("m4k", 4096, 4 << 20, true).unwrap()));
    }
}
