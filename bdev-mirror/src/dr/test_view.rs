//! A DR test that does not stop replication: a writable point-in-time view of a DR image's
//! members (`nvmetro dr test GROUP start`), served to hosts at the DR site while the stream
//! keeps arriving, and discarded afterwards (`... stop`) without a trace on the image.
//!
//! Each member's view keeps, in a sparse store file beside the replica's state, the blocks it
//! holds: the image's bytes of a block just before the stream first overwrote it, and whatever
//! hosts wrote into the view. One bit per block says which; the rest of the view is the image
//! itself. A block's bit is set only once its bytes are in the store, and the stream writes a
//! block of the image only once its bit is set, so a host's read of the image followed by
//! [`ViewMember::overlay`] always yields the view's bytes, whenever the stream's write lands.
//! The bits cost one per block of the member (32 MiB per TiB at 4 KiB blocks). The view is not
//! durable: a restart of the DR site discards it (its store files are removed).

use fixedbitset::FixedBitSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The zeroes a view writes at a time (Write Zeroes, Deallocate).
const ZERO_CHUNK: usize = 1 << 20;

/// A point-in-time view of every member of a DR image.
#[derive(Debug)]
pub struct TestView {
    /// The image's applied sequence when the view was taken.
    pub since: u64,
    pub members: Vec<ViewMember>,
}

impl TestView {
    /// Opens a view over members of the given (size in bytes, block size), keeping their stores
    /// at `store_path(i)`.
    pub fn open(since: u64, members: &[(u64, u32)], store_path: impl Fn(usize) -> PathBuf) -> std::io::Result<TestView> {
        let members = members
            .iter()
            .enumerate()
            .map(|(i, &(size, block))| ViewMember::create(store_path(i), size, block))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(TestView { since, members })
    }

    /// Bytes the view holds in its stores (kept from the image, or written by hosts).
    pub fn held_bytes(&self) -> u64 {
        self.members.iter().map(|m| m.held_blocks.load(Ordering::Relaxed) * m.block).sum()
    }
}

/// The blocks of `block` bytes that `offset..offset + len` touches, within `held`'s blocks.
pub(super) fn block_span(held: &FixedBitSet, block: u64, offset: u64, len: u64) -> std::ops::Range<usize> {
    let first = (offset / block) as usize;
    let end = (offset + len).div_ceil(block) as usize;
    first.min(held.len())..end.min(held.len())
}

/// Runs of consecutive blocks in `range` whose bit in `held` is `set`, as byte ranges.
pub(super) fn block_runs(held: &FixedBitSet, block: u64, range: std::ops::Range<usize>, set: bool) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for b in range.filter(|b| held.contains(*b) == set) {
        let at = b as u64 * block;
        match runs.last_mut() {
            Some((o, l)) if *o + *l == at => *l += block,
            _ => runs.push((at, block)),
        }
    }
    runs
}

/// Where member `i`'s store of the `n`th view opened since the start goes, beside `state`: a
/// name of its own, so a discarded view still read by a host never shares its file with the next.
pub fn store_path(state: &Path, i: usize, n: u64) -> PathBuf {
    state.with_extension(format!("view{i}.{n}"))
}

/// Removes the store files views left beside `state` (a DR site stopped with a view open).
pub fn remove_stale_stores(state: &Path) {
    let (Some(dir), Some(stem)) = (state.parent(), state.file_stem().and_then(|s| s.to_str())) else { return };
    let prefix = format!("{stem}.view");
    for entry in std::fs::read_dir(if dir.as_os_str().is_empty() { Path::new(".") } else { dir }).into_iter().flatten().flatten() {
        if entry.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// One member's view.
#[derive(Debug)]
pub struct ViewMember {
    block: u64,
    path: PathBuf,
    store: File,
    /// The blocks whose view bytes are in `store`.
    held: Mutex<FixedBitSet>,
    held_blocks: AtomicU64,
}

impl ViewMember {
    fn create(path: PathBuf, size: u64, block: u32) -> std::io::Result<ViewMember> {
        let store = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
        store.set_len(size)?;
        let block = u64::from(block.max(1));
        Ok(ViewMember {
            block,
            path,
            store,
            held: Mutex::new(FixedBitSet::with_capacity(size.div_ceil(block) as usize)),
            held_blocks: AtomicU64::new(0),
        })
    }

    fn held(&self) -> std::sync::MutexGuard<'_, FixedBitSet> {
        // A panic while holding it leaves the bits as they were before the store write.
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The blocks `offset..offset + len` touches (whole blocks, within the member).
    fn blocks(&self, held: &FixedBitSet, offset: u64, len: u64) -> std::ops::Range<usize> {
        block_span(held, self.block, offset, len)
    }

    /// Runs of consecutive blocks in `range` whose bit is `set`, as byte ranges.
    fn runs(&self, held: &FixedBitSet, range: std::ops::Range<usize>, set: bool) -> Vec<(u64, u64)> {
        block_runs(held, self.block, range, set)
    }

    fn mark(&self, held: &mut FixedBitSet, range: std::ops::Range<usize>) {
        let before = held.count_ones(range.clone());
        held.insert_range(range.clone());
        self.held_blocks.fetch_add((range.len() - before) as u64, Ordering::Relaxed);
    }

    /// The byte ranges (whole blocks) of `offset..offset + len` the view does not hold yet: what
    /// must be kept before the stream writes there.
    pub fn unheld(&self, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let held = self.held();
        let range = self.blocks(&held, offset, len);
        self.runs(&held, range, false)
    }

    /// Keeps the image's bytes `data` (read at `offset`, block aligned) for each block the view
    /// does not hold yet; blocks it holds (a host wrote them meanwhile) stay as they are.
    pub fn keep(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut held = self.held();
        let range = self.blocks(&held, offset, data.len() as u64);
        for (at, len) in self.runs(&held, range, false) {
            let from = (at - offset) as usize;
            self.store.write_all_at(&data[from..from + len as usize], at)?;
            let first = (at / self.block) as usize;
            self.mark(&mut held, first..first + (len / self.block) as usize);
        }
        Ok(())
    }

    /// A host's write into the view (block aligned, as NVMe commands are).
    pub fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut held = self.held();
        self.store.write_all_at(data, offset)?;
        let range = self.blocks(&held, offset, data.len() as u64);
        self.mark(&mut held, range);
        Ok(())
    }

    /// A host's Write Zeroes or Deallocate in the view: the store's blocks become a hole (no
    /// I/O, however long the range), or zeroes are written where the file system has no holes.
    pub fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let mut held = self.held();
        if nvmetro_ffi::punch_hole(&self.store, offset, len).is_err() {
            let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
            let mut at = offset;
            while at < offset + len {
                let n = (offset + len - at).min(ZERO_CHUNK as u64) as usize;
                self.store.write_all_at(&zeroes[..n], at)?;
                at += n as u64;
            }
        }
        let range = self.blocks(&held, offset, len);
        self.mark(&mut held, range);
        Ok(())
    }

    fn overlay_held(&self, held: &FixedBitSet, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        let range = self.blocks(held, offset, data.len() as u64);
        for (at, len) in self.runs(held, range, true) {
            let from = (at - offset) as usize;
            self.store.read_exact_at(&mut data[from..from + len as usize], at)?;
        }
        Ok(())
    }

    /// The view's bytes at `offset`: `data` holds the image's bytes read there, and the blocks
    /// the view holds replace them.
    pub fn overlay(&self, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        let held = self.held();
        self.overlay_held(&held, offset, data)
    }

    /// A fused Compare and Write in the view, atomic against the view's other writes: `image`
    /// holds the image's bytes read at `offset`. Whether it compared equal (and wrote).
    pub fn compare_and_write(&self, offset: u64, mut image: Vec<u8>, expected: &[u8], data: &[u8]) -> std::io::Result<bool> {
        let mut held = self.held();
        self.overlay_held(&held, offset, &mut image)?;
        if image != expected {
            return Ok(false);
        }
        self.store.write_all_at(data, offset)?;
        let range = self.blocks(&held, offset, data.len() as u64);
        self.mark(&mut held, range);
        Ok(true)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ViewMember {
    fn drop(&mut self) {
        // Discarded with the view: nothing of it outlives it.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(dir: &Path) -> ViewMember {
        ViewMember::create(dir.join("v0"), 64 << 10, 4096).expect("store")
    }

    #[test]
    fn the_view_keeps_what_the_stream_overwrites_and_what_hosts_write_and_nothing_else() {
        let dir = std::env::temp_dir().join(format!("nvmetro-view-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let m = member(&dir);
        // The stream is about to write blocks 1-3: the view keeps the image's bytes first.
        assert_eq!(m.unheld(4096, 3 * 4096), [(4096, 3 * 4096)]);
        m.keep(4096, &vec![0xaa; 3 * 4096]).unwrap();
        assert!(m.unheld(4096, 3 * 4096).is_empty(), "kept once");
        // A host writes block 5 of the view; the stream's later write there keeps nothing over it.
        m.write(5 * 4096, &[0x55; 4096]).unwrap();
        assert_eq!(m.unheld(4 * 4096, 3 * 4096), [(4 * 4096, 4096), (6 * 4096, 4096)]);
        m.keep(4 * 4096, &vec![0x11; 3 * 4096]).unwrap();
        // A read of the (since overwritten) image shows the view.
        let mut read = vec![0xff; 8 * 4096];
        m.overlay(0, &mut read).unwrap();
        assert!(read[..4096].iter().all(|&b| b == 0xff), "block 0: never held, the image's bytes");
        assert!(read[4096..4 * 4096].iter().all(|&b| b == 0xaa), "blocks 1-3: kept from the image");
        assert!(read[4 * 4096..5 * 4096].iter().all(|&b| b == 0x11));
        assert!(read[5 * 4096..6 * 4096].iter().all(|&b| b == 0x55), "block 5: the host's write, not the image's");
        assert!(read[7 * 4096..].iter().all(|&b| b == 0xff));
        assert_eq!(m.held_blocks.load(Ordering::Relaxed), 6);
        // Compare and Write against the view's bytes.
        assert!(!m.compare_and_write(0, vec![0; 4096], &[1; 4096], &[2; 4096]).unwrap(), "miscompare writes nothing");
        assert!(m.compare_and_write(4096, vec![0; 4096], &[0xaa; 4096], &[2; 4096]).unwrap());
        let mut read = vec![0; 4096];
        m.overlay(4096, &mut read).unwrap();
        assert_eq!(read, [2; 4096]);
        // A host's deallocation in the view: zeroes there (a hole in the store), the image
        // unchanged beneath.
        m.write_zeroes(5 * 4096, 2 * 4096).unwrap();
        let mut read = vec![0xff; 2 * 4096];
        m.overlay(5 * 4096, &mut read).unwrap();
        assert_eq!(read, vec![0; 2 * 4096], "blocks 5 and 6 read as zeroes in the view");
        let path = m.path().to_path_buf();
        drop(m);
        assert!(!path.exists(), "the store goes with the view");
    }
}
