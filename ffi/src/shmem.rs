use std::fmt;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};

const STRIPE_SHIFT: u32 = 16; // 64 KiB stripes: an 8 KiB I/O touches one, rarely two
const WRITER: u32 = u32::MAX;
pub(crate) const HUGEPAGE: usize = 2 << 20;

/// Error for a request outside the mapping.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("range {offset}+{len} is outside the {size}-byte region")]
pub struct OutOfRange {
    pub offset: u64,
    pub len: usize,
    pub size: usize,
}

/// A large zero-filled memory region shared by every reactor (the `malloc` bdev's storage).
///
/// Every access takes the 64 KiB stripes it touches, shared for reads and exclusive for writes,
/// with atomics: holders only ever copy memory while holding, so waits are a few hundred
/// nanoseconds, and no two threads ever touch the same bytes with a write in flight.
pub struct SharedMem {
    ptr: NonNull<u8>,
    len: usize,
    map_len: usize,
    on_hugepages: bool,
    stripes: Box<[AtomicU32]>,
}

// SAFETY: the mapping is plain memory; all access is serialised per stripe by the atomics.
unsafe impl Send for SharedMem {}
// SAFETY: as above: &SharedMem only gives stripe-locked copies in and out.
unsafe impl Sync for SharedMem {}

impl SharedMem {
    /// Maps `len` zeroed bytes, on 2 MiB hugepages when `hugepages` is set and enough are free
    /// (falling back to ordinary pages, reported by [`SharedMem::on_hugepages`]).
    pub fn new(len: usize, hugepages: bool) -> io::Result<SharedMem> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "zero-sized region"));
        }
        let mut mapped = None;
        if hugepages {
            let map_len = len.next_multiple_of(HUGEPAGE);
            mapped = map(map_len, libc::MAP_HUGETLB).ok().map(|p| (p, map_len, true));
        }
        let (ptr, map_len, on_hugepages) = match mapped {
            Some(m) => m,
            None => (map(len, libc::MAP_NORESERVE)?, len, false),
        };
        let stripes = (0..len.div_ceil(1 << STRIPE_SHIFT)).map(|_| AtomicU32::new(0)).collect();
        Ok(SharedMem { ptr, len, map_len, on_hugepages, stripes })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn on_hugepages(&self) -> bool {
        self.on_hugepages
    }

    /// The mapping's first byte, for registering the whole pool with an RDMA device.
    #[cfg(feature = "rdma")]
    pub(crate) fn base_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize, OutOfRange> {
        let start = usize::try_from(offset).ok().filter(|s| s.checked_add(len).is_some_and(|e| e <= self.len));
        start.ok_or(OutOfRange { offset, len, size: self.len })
    }

    /// Copies `out.len()` bytes starting at `offset` into `out`.
    pub fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), OutOfRange> {
        let start = self.check(offset, out.len())?;
        let _guard = self.lock(start, out.len(), false);
        // SAFETY: start..start+len is inside the mapping (checked) and the stripes covering it are
        // held shared, so no writer touches these bytes during the copy; `out` is a distinct slice.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(start), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// Returns `len` bytes starting at `offset` in a new vector, without zero-filling it first.
    pub fn read_to_vec(&self, offset: u64, len: usize) -> Result<Vec<u8>, OutOfRange> {
        let mut out = Vec::new();
        self.read_into_vec(offset, len, &mut out)?;
        Ok(out)
    }

    /// Replaces the contents of `out` with the `len` bytes starting at `offset`, reusing its
    /// allocation when it is large enough and never zero-filling it first.
    pub fn read_into_vec(&self, offset: u64, len: usize, out: &mut Vec<u8>) -> Result<(), OutOfRange> {
        let start = self.check(offset, len)?;
        out.clear();
        out.reserve(len);
        let _guard = self.lock(start, len, false);
        // SAFETY: in bounds (checked) and held shared, as in `read`; `out` is empty with capacity
        // for `len` bytes, all of which the copy initialises before `set_len` exposes them.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(start), out.as_mut_ptr(), len);
            out.set_len(len);
        }
        Ok(())
    }

    /// Copies `data` into the region at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), OutOfRange> {
        let start = self.check(offset, data.len())?;
        let _guard = self.lock(start, data.len(), true);
        // SAFETY: in bounds (checked); the stripes are held exclusively, so nothing else reads or
        // writes these bytes during the copy.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(start), data.len()) };
        Ok(())
    }

    /// Sets `len` bytes at `offset` to zero.
    pub fn zero(&self, offset: u64, len: usize) -> Result<(), OutOfRange> {
        let start = self.check(offset, len)?;
        let _guard = self.lock(start, len, true);
        // SAFETY: in bounds and exclusively held, as in `write`.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(start), 0, len) };
        Ok(())
    }

    /// Compares the bytes at `offset` with `expected` and, only if they are equal, writes `data`
    /// (same length) there, as one atomic step against every other access. Returns whether it wrote.
    pub fn compare_and_write(&self, offset: u64, expected: &[u8], data: &[u8]) -> Result<bool, OutOfRange> {
        assert_eq!(expected.len(), data.len(), "compare and write lengths differ");
        let start = self.check(offset, data.len())?;
        let _guard = self.lock(start, data.len(), true);
        // Compared through a stack copy, never a reference into the mapping: the mapping may be
        // registered with an RDMA device (see rdma::RdmaMemory), whose DMA is outside Rust.
        let mut chunk = [0u8; 256];
        for (i, want) in expected.chunks(chunk.len()).enumerate() {
            let part = &mut chunk[..want.len()];
            // SAFETY: in bounds (checked) and exclusively held for the whole compare-then-write;
            // `part` is a distinct stack buffer of exactly `want.len()` bytes.
            unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(start + i * 256), part.as_mut_ptr(), want.len()) };
            if part != want {
                return Ok(false);
            }
        }
        // SAFETY: in bounds and exclusively held, as above.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(start), data.len()) };
        Ok(true)
    }

    fn lock(&self, start: usize, len: usize, exclusive: bool) -> StripeGuard<'_> {
        let first = start >> STRIPE_SHIFT;
        let last = (start + len.max(1) - 1) >> STRIPE_SHIFT;
        // Stripes are taken in ascending order, so two multi-stripe holders cannot deadlock.
        for stripe in &self.stripes[first..=last] {
            let mut spins = 0u32;
            loop {
                let cur = stripe.load(Ordering::Relaxed);
                let next = if exclusive { (cur == 0).then_some(WRITER) } else { (cur < WRITER - 1).then(|| cur + 1) };
                if let Some(next) = next {
                    if stripe.compare_exchange_weak(cur, next, Ordering::Acquire, Ordering::Relaxed).is_ok() {
                        break;
                    }
                }
                spins += 1;
                if spins < 64 {
                    std::hint::spin_loop();
                } else {
                    // The holder may have been preempted mid-copy: give it the CPU.
                    std::thread::yield_now();
                }
            }
        }
        StripeGuard { stripes: &self.stripes[first..=last], exclusive }
    }
}

struct StripeGuard<'a> {
    stripes: &'a [AtomicU32],
    exclusive: bool,
}

impl Drop for StripeGuard<'_> {
    fn drop(&mut self) {
        for stripe in self.stripes {
            if self.exclusive {
                stripe.store(0, Ordering::Release);
            } else {
                stripe.fetch_sub(1, Ordering::Release);
            }
        }
    }
}

pub(crate) fn map(len: usize, extra_flags: libc::c_int) -> io::Result<NonNull<u8>> {
    // SAFETY: an anonymous private mapping with no address hint; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra_flags,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(p.cast()).ok_or_else(|| io::Error::other("mmap returned null"))
}

impl Drop for SharedMem {
    fn drop(&mut self) {
        // SAFETY: ptr/map_len are exactly what mmap returned; nothing borrows the region now.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.map_len) };
    }
}

impl fmt::Debug for SharedMem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SharedMem({} bytes, hugepages: {})", self.len, self.on_hugepages)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn read_write_bounds() {
        let m = SharedMem::new(1 << 20, false).unwrap();
        let mut out = [1u8; 16];
        m.read(100, &mut out).unwrap();
        assert_eq!(out, [0; 16]);
        m.write(65530, &[9; 12]).unwrap(); // spans two stripes
        assert_eq!(m.read_to_vec(65530, 12).unwrap(), vec![9; 12]);
        assert!(m.read_to_vec(1 << 20, 1).is_err());
        m.read(65530, &mut out[..12]).unwrap();
        assert_eq!(&out[..12], &[9; 12]);
        assert!(m.write((1 << 20) - 4, &[0; 8]).is_err());
        assert!(m.read(u64::MAX, &mut out).is_err());
        assert!(!m.compare_and_write(0, &[1; 4], &[2; 4]).unwrap());
        assert!(m.compare_and_write(0, &[0; 4], &[2; 4]).unwrap());
        // Longer than one comparison chunk, differing only in the last byte of the third chunk.
        m.write(8192, &[3; 700]).unwrap();
        let mut expected = vec![3u8; 700];
        expected[699] = 4;
        assert!(!m.compare_and_write(8192, &expected, &[6; 700]).unwrap());
        assert_eq!(m.read_to_vec(8192, 700).unwrap(), vec![3; 700]);
        expected[699] = 3;
        assert!(m.compare_and_write(8192, &expected, &[6; 700]).unwrap());
        assert_eq!(m.read_to_vec(8192, 700).unwrap(), vec![6; 700]);
        m.zero(0, 4).unwrap();
        m.read(0, &mut out[..4]).unwrap();
        assert_eq!(&out[..4], &[0; 4]);
    }

    #[test]
    fn read_into_vec_reuses_the_buffer() {
        let m = SharedMem::new(1 << 20, false).unwrap();
        m.write(4096, &[5; 4096]).unwrap();
        let mut buf = vec![0xaa; 8192];
        let at = buf.as_ptr();
        m.read_into_vec(4096, 4096, &mut buf).unwrap();
        assert_eq!(buf, vec![5; 4096]);
        assert_eq!(buf.as_ptr(), at, "no new allocation");
        m.read_into_vec(0, 12288, &mut buf).unwrap();
        assert_eq!((&buf[..4096], &buf[4096..8192], &buf[8192..]), (&[0; 4096][..], &[5; 4096][..], &[0; 4096][..]));
        assert!(m.read_into_vec(1 << 20, 1, &mut buf).is_err());
    }

    #[test]
    fn concurrent_writers_never_tear() {
        let m = Arc::new(SharedMem::new(1 << 17, false).unwrap());
        let threads: Vec<_> = (1..=2u8)
            .map(|v| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..2000 {
                        m.write(60000, &[v; 8192]).unwrap();
                        let mut out = vec![0u8; 8192];
                        m.read(60000, &mut out).unwrap();
                        assert!(out.iter().all(|&b| b == out[0]), "torn read");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn hugepage_request_falls_back() {
        let m = SharedMem::new(4 << 20, true).unwrap();
        m.write(3 << 20, b"hello").unwrap();
        let mut out = [0u8; 5];
        m.read(3 << 20, &mut out).unwrap();
        assert_eq!(&out, b"hello");
    }
}
