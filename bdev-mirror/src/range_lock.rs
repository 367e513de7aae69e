//! Lock-free byte-range locks over fixed stripes, taken without blocking: a caller that cannot
//! get its range now keeps the operation queued and tries again on its next poll.
//!
//! Writers take their stripes shared (writes may overlap one another, as on any disk); a fused
//! Compare+Write takes them exclusive, so no write lands between its compare and its write.

use std::sync::atomic::{AtomicU32, Ordering};

const EXCLUSIVE: u32 = u32::MAX;

#[derive(Debug)]
pub struct RangeLocks {
    shift: u32,
    stripes: Box<[AtomicU32]>,
}

/// Which way a range is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

impl RangeLocks {
    /// Locks for a device of `size` bytes, in stripes of `1 << shift` bytes.
    pub fn new(size: u64, shift: u32) -> RangeLocks {
        let n = size.div_ceil(1 << shift).max(1) as usize;
        RangeLocks { shift, stripes: (0..n).map(|_| AtomicU32::new(0)).collect() }
    }

    fn span(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<usize> {
        let first = (offset >> self.shift) as usize;
        let last = ((offset + len.max(1) - 1) >> self.shift) as usize;
        first.min(self.stripes.len() - 1)..=last.min(self.stripes.len() - 1)
    }

    /// Takes the range or nothing at all.
    pub fn try_lock(&self, offset: u64, len: u64, mode: Mode) -> bool {
        let span = self.span(offset, len);
        for i in span.clone() {
            let s = &self.stripes[i];
            let ok = match mode {
                Mode::Exclusive => s.compare_exchange(0, EXCLUSIVE, Ordering::Acquire, Ordering::Relaxed).is_ok(),
                Mode::Shared => s.fetch_update(Ordering::Acquire, Ordering::Relaxed, |c| (c < EXCLUSIVE - 1).then(|| c + 1)).is_ok(),
            };
            if !ok {
                for j in *span.start()..i {
                    self.release_stripe(j, mode);
                }
                return false;
            }
        }
        true
    }

    pub fn unlock(&self, offset: u64, len: u64, mode: Mode) {
        for i in self.span(offset, len) {
            self.release_stripe(i, mode);
        }
    }

    fn release_stripe(&self, i: usize, mode: Mode) {
        match mode {
            Mode::Exclusive => self.stripes[i].store(0, Ordering::Release),
            Mode::Shared => {
                self.stripes[i].fetch_sub(1, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_shared_and_shared_coexist() {
        let l = RangeLocks::new(1 << 20, 16);
        assert!(l.try_lock(0, 8192, Mode::Shared));
        assert!(l.try_lock(4096, 8192, Mode::Shared));
        assert!(!l.try_lock(0, 512, Mode::Exclusive));
        l.unlock(0, 8192, Mode::Shared);
        l.unlock(4096, 8192, Mode::Shared);
        assert!(l.try_lock(65000, 1000, Mode::Exclusive), "spans stripes 0 and 1");
        assert!(!l.try_lock(70000, 10, Mode::Shared));
        assert!(l.try_lock(200000, 10, Mode::Shared), "other stripes are free");
        l.unlock(65000, 1000, Mode::Exclusive);
        assert!(l.try_lock(70000, 10, Mode::Shared));
    }

    #[test]
    fn failed_multi_stripe_lock_leaves_nothing_held() {
        let l = RangeLocks::new(1 << 20, 16);
        assert!(l.try_lock(1 << 16, 1, Mode::Exclusive));
        assert!(!l.try_lock(0, 3 << 16, Mode::Shared));
        l.unlock(1 << 16, 1, Mode::Exclusive);
        assert!(l.try_lock(0, 1, Mode::Exclusive), "stripe 0 was released on failure");
    }
}
