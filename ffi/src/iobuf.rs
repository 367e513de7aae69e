//! Pooled, reference-counted I/O buffers (SPDK's per-queue buffer pools, with `bytes::Bytes`'s
//! sharing): a write's payload lands once in an [`IoBufMut`] taken from an [`IoBufPool`], is
//! frozen into an [`IoBuf`], and every holder (the local leg's io_uring write, the replication
//! frame in the link's send queue) holds a clone of the same memory. When the last holder drops
//! it, the memory goes back to the pool it came from, so steady-state I/O allocates nothing.
//!
//! The memory is a [`DmaBuf`] (page-aligned), or a page-aligned slot of an arena (below), so an
//! O_DIRECT write goes straight from it.
//! Mutation needs the only reference: an [`IoBufMut`] is never shared, and an [`IoBuf`] becomes
//! one again only through [`IoBuf::try_unique`] when no clone is left: uniqueness is `Arc`'s own
//! count.
//!
//! A pool can also be carved out of one fixed arena of memory ([`IoBufPool::over_arena`]; the
//! RDMA zero-copy pool, registered with a device once). Such a pool never allocates: its
//! buffers are the arena's slots, handed out by [`IoBufPool::take_idle`] and returned when
//! dropped, on any thread; the arena lives until its pool and the last of its buffers are gone.

use crate::dmabuf::{DmaBuf, DMA_ALIGN};
use crossbeam_queue::ArrayQueue;
use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Weak};

/// Size classes: 4 KiB, 8 KiB, ... 128 KiB (larger buffers are not pooled).
const CLASSES: usize = 6;
/// The largest pooled buffer.
pub const IOBUF_POOLED_MAX: usize = DMA_ALIGN << (CLASSES - 1);
/// Memory a pool keeps per size class while its buffers are idle.
const KEEP_BYTES_PER_CLASS: usize = 16 << 20;

/// Memory that a pool carves into buffers ([`IoBufPool::over_arena`]).
///
/// # Safety
///
/// `base()` must point to `size()` bytes, initialised and valid for reads and writes, at a fixed
/// address for as long as the value lives. Nothing but the buffers of the pool built over it may
/// touch those bytes, except a device or the kernel writing a buffer's bytes while that buffer
/// is owned, out of every Rust reference's reach, by the operation performing the write (an RDMA
/// READ or RECV posted with `CmId::post_read_into` or `post_recv_into`, an io_uring read).
#[cfg_attr(not(feature = "rdma"), allow(dead_code))] // only the RDMA pool builds arenas
pub(crate) unsafe trait Arena: Send + Sync {
    fn base(&self) -> NonNull<u8>;
    fn size(&self) -> usize;
}

/// A buffer's bytes: its own heap allocation, or one slot of an arena.
enum Memory {
    Heap(DmaBuf),
    Lent {
        arena: Arc<dyn Arena>,
        offset: usize,
        cap: usize,
        len: usize,
    },
    /// Moved out: a slot being dropped that handed its memory on.
    Gone,
}

impl Memory {
    fn capacity(&self) -> usize {
        match self {
            Memory::Heap(b) => b.capacity(),
            Memory::Lent { cap, .. } => *cap,
            Memory::Gone => 0,
        }
    }

    fn set_len(&mut self, new: usize) {
        match self {
            Memory::Heap(b) => b.set_len(new),
            Memory::Lent { cap, len, .. } => {
                assert!(new <= *cap, "IoBufMut::set_len beyond capacity");
                *len = new;
            }
            Memory::Gone => assert_eq!(new, 0, "IoBufMut::set_len beyond capacity"),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Memory::Heap(b) => b,
            // SAFETY: the slot [offset, offset + cap) lies inside the arena (checked when the
            // pool was built), which the Arc keeps mapped; each slot is made once, so this
            // buffer alone reaches these bytes, and while a device writes them the buffer is
            // owned by the posted operation, so no reference made here can exist then.
            Memory::Lent { arena, offset, len, .. } => unsafe { std::slice::from_raw_parts(arena.base().as_ptr().add(*offset), *len) },
            Memory::Gone => &[],
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match self {
            Memory::Heap(b) => b,
            // SAFETY: as in `bytes`; `&mut self` comes through the buffer's only reference.
            Memory::Lent { arena, offset, len, .. } => unsafe { std::slice::from_raw_parts_mut(arena.base().as_ptr().add(*offset), *len) },
            Memory::Gone => &mut [],
        }
    }
}

struct Slot {
    mem: Memory,
    /// The pool it returns to (none for a buffer made outside any pool).
    home: Weak<PoolInner>,
}

impl Drop for Slot {
    /// Runs when a slot is freed rather than kept idle: its pool is gone, or refused it (a full
    /// class), or no holder handed it back (the last two clones of an [`IoBuf`] dropped at the
    /// same instant on two threads, each seeing the other). Heap memory is then freed (in the
    /// last case an allocation later), but an arena's slot is its pool's for good: while the
    /// pool lives it goes back in a new handle.
    fn drop(&mut self) {
        if !matches!(self.mem, Memory::Lent { .. }) {
            return;
        }
        let Some(home) = self.home.upgrade() else { return };
        let mem = std::mem::replace(&mut self.mem, Memory::Gone);
        if let Some(mut refused) = home.give_back(Arc::new(Slot { mem, home: self.home.clone() })) {
            // No room (never, for an arena's classes are sized to its slots): dropped for good.
            if let Some(s) = Arc::get_mut(&mut refused) {
                s.home = Weak::new();
            }
        }
    }
}

struct PoolInner {
    classes: Vec<ArrayQueue<Arc<Slot>>>,
    /// Whether `take` may allocate when a class is empty (not for a pool over an arena).
    grows: bool,
}

impl PoolInner {
    /// Keeps `slot` idle; gives it back when its class is full (the pool keeps a bounded
    /// amount of idle memory), for the caller to drop.
    fn give_back(&self, slot: Arc<Slot>) -> Option<Arc<Slot>> {
        match class_of(slot.mem.capacity()) {
            Some(class) => self.classes[class].push(slot).err(),
            None => Some(slot),
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
        IoBufPool { inner: Arc::new(PoolInner { classes, grows: true }) }
    }

    /// A pool whose buffers are `arena`'s slots, laid out from its start: `count` slots of
    /// `size` bytes for each `(size, count)` of `slots` (sizes are size classes: 4 KiB times a
    /// power of two, at most [`IOBUF_POOLED_MAX`]). Its `take` allocates when no slot of a
    /// large enough class is idle; `take_idle` never does.
    #[cfg_attr(not(feature = "rdma"), allow(dead_code))]
    pub(crate) fn over_arena(arena: Arc<dyn Arena>, slots: &[(usize, usize)]) -> IoBufPool {
        let mut per_class = [0usize; CLASSES];
        for &(size, count) in slots {
            let class = class_of(size).filter(|&c| DMA_ALIGN << c == size).expect("arena slots are whole size classes");
            per_class[class] += count;
        }
        let classes = per_class.iter().map(|&n| ArrayQueue::new(n.max(1))).collect();
        let inner = Arc::new(PoolInner { classes, grows: false });
        let mut offset = 0;
        for &(size, count) in slots {
            for _ in 0..count {
                assert!(offset + size <= arena.size(), "arena slots beyond the arena");
                let mem = Memory::Lent { arena: arena.clone(), offset, cap: size, len: size };
                let refused = inner.give_back(Arc::new(Slot { mem, home: Arc::downgrade(&inner) }));
                assert!(refused.is_none(), "each class holds all of its slots");
                offset += size;
            }
        }
        IoBufPool { inner }
    }

    /// A buffer of `len` bytes; its contents are whatever an earlier user left (callers fill
    /// it). From the pool when one is idle, else newly allocated (and zeroed).
    pub fn take(&self, len: usize) -> IoBufMut {
        if let Some(b) = self.take_idle(len) {
            return b;
        }
        let Some(class) = class_of(len).filter(|_| self.inner.grows) else { return IoBufMut::unpooled(len) };
        let mut buf = DmaBuf::zeroed(DMA_ALIGN << class);
        buf.set_len(len);
        IoBufMut { slot: Some(Arc::new(Slot { mem: Memory::Heap(buf), home: Arc::downgrade(&self.inner) })) }
    }

    /// An idle buffer of `len` bytes, or None: never allocates. A pool over an arena takes one
    /// of the smallest class holding `len` that has one idle; others only of `len`'s own class
    /// (a small buffer taking a large idle one would make the next large request allocate).
    pub fn take_idle(&self, len: usize) -> Option<IoBufMut> {
        let first = class_of(len)?;
        let last = if self.inner.grows { first } else { CLASSES - 1 };
        let mut slot = self.inner.classes[first..=last].iter().find_map(ArrayQueue::pop)?;
        Arc::get_mut(&mut slot).expect("an idle pooled buffer has no other holder").mem.set_len(len);
        Some(IoBufMut { slot: Some(slot) })
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
        IoBufMut { slot: Some(Arc::new(Slot { mem: Memory::Heap(DmaBuf::zeroed(len)), home: Weak::new() })) }
    }

    fn mem_mut(&mut self) -> Option<&mut Memory> {
        self.slot.as_mut().map(|s| &mut Arc::get_mut(s).expect("an IoBufMut is never shared").mem)
    }

    /// Where the bytes are, for a device to write them: (first byte, length).
    #[cfg(feature = "rdma")]
    pub(crate) fn raw_parts(&mut self) -> (*mut u8, usize) {
        let b = self.as_mut();
        (b.as_mut_ptr(), b.len())
    }

    /// Changes the length within the buffer's capacity.
    pub fn set_len(&mut self, len: usize) {
        match self.mem_mut() {
            Some(m) => m.set_len(len),
            None => assert_eq!(len, 0, "IoBufMut::set_len beyond capacity"),
        }
    }

    pub fn capacity(&self) -> usize {
        self.slot.as_ref().map_or(0, |s| s.mem.capacity())
    }

    /// The buffer, shareable from now on.
    pub fn freeze(mut self) -> IoBuf {
        IoBuf { slot: self.slot.take() }
    }
}

impl Deref for IoBufMut {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.slot.as_ref().map_or(&[], |s| s.mem.bytes())
    }
}

impl DerefMut for IoBufMut {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self.mem_mut() {
            Some(m) => m.bytes_mut(),
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
                drop(home.give_back(slot));
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
            // two threads may both see the other: then the slot's own drop gives an arena's
            // memory back, and heap memory is freed (see there).
            if Arc::strong_count(&slot) == 1 {
                if let Some(home) = slot.home.upgrade() {
                    drop(home.give_back(slot));
                }
            }
        }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.slot.as_ref().map_or(&[], |s| s.mem.bytes())
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
    fn a_heap_pool_takes_only_its_own_class() {
        let pool = IoBufPool::new();
        drop(pool.take(IOBUF_POOLED_MAX));
        assert!(pool.take_idle(4096).is_none(), "a small request leaves the large buffer idle");
        assert!(pool.take_idle(IOBUF_POOLED_MAX).is_some());
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

    /// An arena on the heap, counting its drops.
    struct HeapArena(DmaBuf, Arc<std::sync::atomic::AtomicUsize>);

    // SAFETY: the DmaBuf's allocation is fixed and initialised; the tests reach it only through
    // the pool's buffers.
    unsafe impl Arena for HeapArena {
        fn base(&self) -> NonNull<u8> {
            NonNull::new(self.0.as_ptr().cast_mut()).expect("an allocation")
        }
        fn size(&self) -> usize {
            self.0.len()
        }
    }

    impl Drop for HeapArena {
        fn drop(&mut self) {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_pool_over_an_arena_hands_out_its_slots_and_never_allocates() {
        let dropped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let arena = Arc::new(HeapArena(DmaBuf::zeroed(4 * 8192 + 2 * 32768), dropped.clone()));
        let base = arena.0.as_ptr() as usize;
        let pool = IoBufPool::over_arena(arena, &[(8192, 4), (32768, 2)]);
        assert!(pool.take_idle(IOBUF_POOLED_MAX + 1).is_none(), "no class holds that");
        assert_eq!(pool.idle(), 6);
        // Small requests take the small class first, then spill into the larger one.
        let mut taken: Vec<IoBufMut> = (0..6).map(|i| pool.take_idle(4096 + i).expect("a slot is idle")).collect();
        assert!(pool.take_idle(1).is_none(), "every slot is out");
        let mut addrs: Vec<(usize, usize)> = taken.iter().map(|b| (b.as_ptr() as usize - base, b.capacity())).collect();
        addrs.sort();
        assert_eq!(addrs, vec![(0, 8192), (8192, 8192), (16384, 8192), (24576, 8192), (32768, 32768), (65536, 32768)]);
        assert_eq!(taken[5].len(), 4101);
        // Slots do not overlap: each keeps what was written into it.
        for (i, b) in taken.iter_mut().enumerate() {
            b.fill(i as u8);
        }
        for (i, b) in taken.iter().enumerate() {
            assert!(b.iter().all(|&x| x == i as u8));
        }
        // take on an empty arena pool falls back to memory of its own, which never joins it.
        let extra = pool.take(4096);
        assert!(!(base..base + 98304).contains(&(extra.as_ptr() as usize)));
        drop(extra);
        assert_eq!(pool.idle(), 0);
        // Buffers come back from another thread, through their frozen clones.
        let frozen: Vec<IoBuf> = taken.drain(..).map(IoBufMut::freeze).collect();
        std::thread::spawn(move || drop(frozen)).join().unwrap();
        assert_eq!(pool.idle(), 6);
        // The last two clones dropping at once on two threads, each seeing the other, skip the
        // hand-back; the slot itself still goes back.
        let mut a = pool.take_idle(8192).expect("a slot").freeze();
        let mut b = a.clone();
        let (sa, sb) = (a.slot.take(), b.slot.take());
        drop((sa, sb, a, b));
        assert_eq!(pool.idle(), 6, "an arena slot is never lost");
        let held = pool.take_idle(32768).expect("a large slot");
        assert_eq!(held.capacity(), 32768);
        drop(pool);
        assert_eq!(dropped.load(std::sync::atomic::Ordering::SeqCst), 0, "a buffer still holds the arena");
        drop(held);
        assert_eq!(dropped.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn buffers_outlive_their_pool() {
        let pool = IoBufPool::new();
        let b = pool.copy_of(&[5; 4096]);
        drop(pool);
        assert_eq!(b[4095], 5);
    }
}
