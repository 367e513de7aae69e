//! Pooled, reference-counted I/O buffers (SPDK's per-queue buffer pools, with `bytes::Bytes`'s
//! sharing): a write's payload lands once in an [`IoBufMut`] taken from an [`IoBufPool`], is
//! frozen into an [`IoBuf`], and every holder (the local leg's io_uring write, the replication
//! frame in the link's send queue) holds a clone of the same memory. When the last holder drops
//! it, the memory goes back to the pool it came from, so steady-state I/O allocates nothing.
//!
//! The memory is a [`DmaBuf`] (page-aligned), so an O_DIRECT write goes straight from it.
//! Mutation needs the only reference: an [`IoBufMut`] is never shared, and an [`IoBuf`] becomes
//! one again only through [`IoBuf::try_unique`] when no clone is left. No `unsafe` is needed:
//! uniqueness is `Arc`'s own count.

use crate::dmabuf::{DmaBuf, DMA_ALIGN};
use crossbeam_queue::ArrayQueue;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Weak};

/// Size classes: 4 KiB, 8 KiB, ... 128 KiB (larger buffers are not pooled).
const CLASSES: usize = 6;
/// The largest pooled buffer.
pub const IOBUF_POOLED_MAX: usize = DMA_ALIGN << (CLASSES - 1);
/// Memory a pool keeps per size class while its buffers are idle.
const KEEP_BYTES_PER_CLASS: usize = 16 << 20;

struct Slot {
    buf: DmaBuf,
    /// The pool it returns to (none for a buffer made outside any pool).
    home: Weak<PoolInner>,
}

struct PoolInner {
    classes: Vec<ArrayQueue<Arc<Slot>>>,
}

impl PoolInner {
    fn give_back(&self, slot: Arc<Slot>) {
        if let Some(class) = class_of(slot.buf.capacity()) {
            // A full class drops the buffer: the pool keeps a bounded amount of idle memory.
            let _ = self.classes[class].push(slot);
        }
    }
}

/// The size class whose buffers hold `len` bytes, if pooled.
fn class_of(len: usize) -> Option<usize> {
    let pages = len.max(1).div_ceil(DMA_ALIGN).next_power_of_two();
    let class = pages.trailing_zeros() as usize;
    (class < CLASSES).then_some(class)
}

/// A pool of I/O buffers, cheap to clone (clones share the pool). Buffers can be taken on one
/// thread and returned (dropped) on another.
#[derive(Clone)]
pub struct IoBufPool {
    inner: Arc<PoolInner>,
}

impl Default for IoBufPool {
    fn default() -> Self {
        IoBufPool::new()
    }
}

impl fmt::Debug for IoBufPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let idle: Vec<usize> = self.inner.classes.iter().map(ArrayQueue::len).collect();
        write!(f, "IoBufPool(idle per class {idle:?})")
    }
}

impl IoBufPool {
    pub fn new() -> IoBufPool {
        let classes = (0..CLASSES).map(|c| ArrayQueue::new((KEEP_BYTES_PER_CLASS / (DMA_ALIGN << c)).max(1))).collect();
        IoBufPool { inner: Arc::new(PoolInner { classes }) }
    }

    /// A buffer of `len` bytes; its contents are whatever an earlier user left (callers fill
    /// it). From the pool when one is idle, else newly allocated (and zeroed).
    pub fn take(&self, len: usize) -> IoBufMut {
        let Some(class) = class_of(len) else { return IoBufMut::unpooled(len) };
        let slot = match self.inner.classes[class].pop() {
            Some(mut slot) => {
                Arc::get_mut(&mut slot).expect("an idle pooled buffer has no other holder").buf.set_len(len);
                slot
            }
            None => {
                let mut buf = DmaBuf::zeroed(DMA_ALIGN << class);
                buf.set_len(len);
                Arc::new(Slot { buf, home: Arc::downgrade(&self.inner) })
            }
        };
        IoBufMut { slot: Some(slot) }
    }

    /// A buffer holding a copy of `data`.
    pub fn copy_of(&self, data: &[u8]) -> IoBuf {
        let mut b = self.take(data.len());
        b.copy_from_slice(data);
        b.freeze()
    }

    /// Idle buffers the pool holds now (for tests and statistics).
    pub fn idle(&self) -> usize {
        self.inner.classes.iter().map(ArrayQueue::len).sum()
    }
}

/// A buffer with one owner, to be filled; [`IoBufMut::freeze`] makes it shareable. The default
/// is the empty buffer, which holds no memory.
#[derive(Default)]
pub struct IoBufMut {
    /// None for the empty buffer.
    slot: Option<Arc<Slot>>,
}

impl IoBufMut {
    /// A zeroed buffer that belongs to no pool (tests, control paths).
    pub fn unpooled(len: usize) -> IoBufMut {
        IoBufMut { slot: Some(Arc::new(Slot { buf: DmaBuf::zeroed(len), home: Weak::new() })) }
    }

    fn buf_mut(&mut self) -> Option<&mut DmaBuf> {
        self.slot.as_mut().map(|s| &mut Arc::get_mut(s).expect("an IoBufMut is never shared").buf)
    }

    /// Changes the length within the buffer's capacity.
    pub fn set_len(&mut self, len: usize) {
        match self.buf_mut() {
            Some(b) => b.set_len(len),
            None => assert_eq!(len, 0, "IoBufMut::set_len beyond capacity"),
        }
    }

    pub fn capacity(&self) -> usize {
        self.slot.as_ref().map_or(0, |s| s.buf.capacity())
    }

    /// The buffer, shareable from now on.
    pub fn freeze(mut self) -> IoBuf {
        IoBuf { slot: self.slot.take() }
    }
}

impl Deref for IoBufMut {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.slot.as_ref().map_or(&[], |s| &s.buf)
    }
}

impl DerefMut for IoBufMut {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self.buf_mut() {
            Some(b) => b,
            None => &mut [],
        }
    }
}

impl AsRef<[u8]> for IoBufMut {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl AsMut<[u8]> for IoBufMut {
    fn as_mut(&mut self) -> &mut [u8] {
        self
    }
}

impl Drop for IoBufMut {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            if let Some(home) = slot.home.upgrade() {
                home.give_back(slot);
            }
        }
    }
}

impl fmt::Debug for IoBufMut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IoBufMut({} bytes)", self.len())
    }
}

/// Shared, immutable bytes (clones share the memory). The empty buffer holds no memory.
#[derive(Default)]
pub struct IoBuf {
    slot: Option<Arc<Slot>>,
}

impl IoBuf {
    /// The empty buffer (allocates nothing).
    pub const fn empty() -> IoBuf {
        IoBuf { slot: None }
    }

    /// Back to a mutable buffer when this is the only reference to its memory.
    pub fn try_unique(mut self) -> Result<IoBufMut, IoBuf> {
        match self.slot.take() {
            Some(slot) if Arc::strong_count(&slot) == 1 => Ok(IoBufMut { slot: Some(slot) }),
            slot => Err(IoBuf { slot }),
        }
    }

    /// Whether another clone of this buffer is alive.
    pub fn is_shared(&self) -> bool {
        self.slot.as_ref().is_some_and(|s| Arc::strong_count(s) > 1)
    }
}

impl Clone for IoBuf {
    fn clone(&self) -> IoBuf {
        IoBuf { slot: self.slot.clone() }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            // The last holder returns the memory. Two holders dropping at the same instant on
            // two threads may both see the other: then the memory is freed, not pooled, which
            // costs an allocation later and nothing else.
            if Arc::strong_count(&slot) == 1 {
                if let Some(home) = slot.home.upgrade() {
                    home.give_back(slot);
                }
            }
        }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.slot.as_ref().map_or(&[], |s| &s.buf)
    }
}

impl AsRef<[u8]> for IoBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl PartialEq for IoBuf {
    fn eq(&self, other: &IoBuf) -> bool {
        **self == **other
    }
}

impl Eq for IoBuf {}

impl PartialEq<[u8]> for IoBuf {
    fn eq(&self, other: &[u8]) -> bool {
        **self == *other
    }
}

impl PartialEq<Vec<u8>> for IoBuf {
    fn eq(&self, other: &Vec<u8>) -> bool {
        **self == **other
    }
}

impl From<&[u8]> for IoBuf {
    /// A copy, in memory of its own (no pool).
    fn from(data: &[u8]) -> IoBuf {
        if data.is_empty() {
            return IoBuf::empty();
        }
        let mut b = IoBufMut::unpooled(data.len());
        b.copy_from_slice(data);
        b.freeze()
    }
}

impl From<Vec<u8>> for IoBuf {
    /// A copy, in memory of its own (no pool): for tests and control paths.
    fn from(data: Vec<u8>) -> IoBuf {
        IoBuf::from(&data[..])
    }
}

impl<const N: usize> From<[u8; N]> for IoBuf {
    fn from(data: [u8; N]) -> IoBuf {
        IoBuf::from(&data[..])
    }
}

impl fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IoBuf({} bytes)", self.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_holder_returns_the_memory_to_its_pool() {
        let pool = IoBufPool::new();
        let mut b = pool.take(8192);
        b.fill(7);
        let addr = b.as_ptr();
        assert_eq!(addr as usize % DMA_ALIGN, 0);
        let shared = b.freeze();
        let other = shared.clone();
        assert!(shared.is_shared());
        drop(shared);
        assert_eq!(pool.idle(), 0, "a clone still holds the memory");
        assert_eq!(other, vec![7u8; 8192]);
        drop(other);
        assert_eq!(pool.idle(), 1);
        // The same memory comes back, with the length asked for.
        let again = pool.take(5000);
        assert_eq!((again.as_ptr(), again.len(), again.capacity()), (addr, 5000, 8192));
    }

    #[test]
    fn a_unique_buffer_can_be_written_again_a_shared_one_cannot() {
        let pool = IoBufPool::new();
        let b = pool.copy_of(&[1, 2, 3]);
        let c = b.clone();
        let b = b.try_unique().expect_err("a clone is alive");
        drop(c);
        let mut m = b.try_unique().expect("the only reference");
        m[0] = 9;
        assert_eq!(&m[..], &[9, 2, 3]);
    }

    #[test]
    fn sizes_beyond_the_classes_and_the_empty_buffer_stay_out_of_the_pool() {
        let pool = IoBufPool::new();
        drop(pool.take(IOBUF_POOLED_MAX + 1).freeze());
        drop(IoBuf::empty());
        drop(IoBuf::from(vec![1u8; 100]));
        drop(IoBufMut::default().freeze());
        assert_eq!(pool.idle(), 0);
        drop(pool.take(IOBUF_POOLED_MAX));
        assert_eq!(pool.idle(), 1);
        assert_eq!(class_of(1), Some(0));
        assert_eq!(class_of(4097), Some(1));
        assert_eq!(class_of(IOBUF_POOLED_MAX), Some(CLASSES - 1));
        assert_eq!(class_of(IOBUF_POOLED_MAX + 1), None);
    }

    #[test]
    fn buffers_outlive_their_pool() {
        let pool = IoBufPool::new();
        let b = pool.copy_of(&[5; 4096]);
        drop(pool);
        assert_eq!(b[4095], 5);
    }
}
