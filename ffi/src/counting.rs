//! A global allocator that counts, for tests that prove a path allocates nothing per I/O: a test
//! binary installs it with `#[global_allocator]` and reads [`CountingAllocator::allocations`]
//! (every allocation) and [`CountingAllocator::dma_allocations`] (those aligned to a page, which
//! only I/O buffers ask for) before and after the work it measures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};

/// Passes everything to the system allocator and counts allocations.
#[derive(Debug)]
pub struct CountingAllocator;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static DMA_ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

impl CountingAllocator {
    /// Allocations (and reallocations) so far, by every thread.
    pub fn allocations() -> u64 {
        ALLOCATIONS.load(Ordering::Relaxed)
    }

    /// Allocations aligned to 4 KiB or more so far (DMA buffers).
    pub fn dma_allocations() -> u64 {
        DMA_ALLOCATIONS.load(Ordering::Relaxed)
    }

    fn count(layout: Layout) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        if layout.align() >= crate::dmabuf::DMA_ALIGN {
            DMA_ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
    }
}

// SAFETY: every call goes unchanged to the system allocator, which upholds GlobalAlloc's
// contract; counting touches only atomics and never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Self::count(layout);
        // SAFETY: the caller's layout obligations are passed on as they are.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Self::count(layout);
        // SAFETY: as in `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Self::count(layout);
        // SAFETY: `ptr` was allocated by the system allocator (through this one) with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by the system allocator (through this one) with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}
