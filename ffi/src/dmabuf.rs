use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every I/O buffer: the largest logical block size O_DIRECT may demand.
pub const DMA_ALIGN: usize = 4096;

/// A zero-initialised heap buffer aligned to [`DMA_ALIGN`], with a length that may be shorter than
/// its capacity (capacity is rounded up to the alignment so O_DIRECT transfers stay legal).
pub struct DmaBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: DmaBuf owns its allocation exclusively, like Vec<u8>; moving it between threads is sound.
unsafe impl Send for DmaBuf {}
// SAFETY: shared references only permit reads of the owned bytes.
unsafe impl Sync for DmaBuf {}

impl DmaBuf {
    /// A zeroed buffer of `len` bytes.
    pub fn zeroed(len: usize) -> DmaBuf {
        let cap = len.max(1).next_multiple_of(DMA_ALIGN);
        let layout = Layout::from_size_align(cap, DMA_ALIGN).expect("buffer layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        DmaBuf { ptr, len, cap }
    }

    /// A buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> DmaBuf {
        let mut buf = DmaBuf::zeroed(data.len());
        buf.copy_from_slice(data);
        buf
    }

    /// Bytes allocated (a multiple of the alignment).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Changes the visible length within the capacity; new bytes are whatever was there (zero
    /// for a fresh buffer).
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "DmaBuf::set_len beyond capacity");
        self.len = len;
    }

    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for DmaBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for `cap` >= `len` initialised (zeroed at allocation) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for DmaBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for DmaBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap, DMA_ALIGN).expect("buffer layout");
        // SAFETY: ptr was allocated with exactly this layout and is freed once.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl Clone for DmaBuf {
    fn clone(&self) -> DmaBuf {
        DmaBuf::from_slice(self)
    }
}

impl fmt::Debug for DmaBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DmaBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_and_zeroed() {
        let mut b = DmaBuf::zeroed(8192);
        assert_eq!(b.as_ptr() as usize % DMA_ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0));
        b[100] = 7;
        let c = b.clone();
        assert_eq!(c[100], 7);
        assert_eq!(c.len(), 8192);
        let mut d = DmaBuf::zeroed(10);
        assert_eq!(d.capacity(), 4096);
        d.set_len(4096);
        assert_eq!(d.len(), 4096);
    }
}
