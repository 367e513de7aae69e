//! A mirror leg's persistent metadata: generation identifiers and two region bitmaps.
//!
//! * `dirty`: regions that may differ from the peer. A bit is set, and made durable, before the
//!   first write to its region is issued; it is cleared only once the peer has confirmed every
//!   write to the region, or the region was resynced. After any crash, the set bits cover every
//!   region the two copies could disagree on (DRBD's activity log and bitmap in one).
//! * `written`: regions ever written; an initial sync copies only these.
//!
//! Generations (DRBD's UUIDs): `current` names the data this leg holds; when a leg takes writes
//! the peer cannot see, it moves `current` to `bitmap` and draws a new `current`. Comparing both
//! legs' identifiers tells which one is the sync source, or that they diverged (split brain).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Generations {
    /// 0: this leg has never been in sync with anything (a new replica).
    pub current: u64,
    /// The `current` this leg had when it started diverging; 0 when not diverged.
    pub bitmap: u64,
    /// The previous `bitmap`, kept for diagnosis.
    pub history: u64,
}

/// What the comparison of two legs' generations says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDirection {
    /// Same data lineage: only the regions in the bitmaps need copying, from the preferred leg.
    InSync,
    /// This leg holds newer data: it is the sync source.
    ThisIsSource,
    /// The peer holds newer data.
    PeerIsSource,
    /// This leg is new: a full sync (of regions ever written) from the peer.
    FullFromPeer,
    /// The peer is new: a full sync from this leg.
    FullToPeer,
    /// Both legs took writes the other did not see.
    SplitBrain,
    /// No common history: refuse to connect.
    Unrelated,
}

impl Generations {
    pub fn compare(&self, peer: &Generations) -> SyncDirection {
        let (a, b) = (self, peer);
        if a.current == 0 && b.current == 0 {
            SyncDirection::InSync
        } else if a.current == 0 {
            SyncDirection::FullFromPeer
        } else if b.current == 0 {
            SyncDirection::FullToPeer
        } else if a.current == b.current {
            SyncDirection::InSync
        } else if a.bitmap != 0 && a.bitmap == b.bitmap {
            SyncDirection::SplitBrain
        } else if a.bitmap == b.current {
            SyncDirection::ThisIsSource
        } else if b.bitmap == a.current {
            SyncDirection::PeerIsSource
        } else {
            SyncDirection::Unrelated
        }
    }
}

/// Metadata in memory; [`MetaFile`] makes it durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    pub region_shift: u32,
    pub regions: u64,
    pub generations: Generations,
    pub dirty: Vec<u64>,
    pub written: Vec<u64>,
    /// Metro mode: this leg agreed, while the witness was lost, that the peer survives a link
    /// loss; until the peer releases it, it must not ask the witness to serve alone.
    pub deferred: bool,
    /// This leg's device failed I/O: it is not a faithful copy until resynced from the peer.
    pub failed: bool,
    /// A resync into this leg began and has not finished: part of it may be newer than the rest,
    /// so it is no whole copy of anything until a resync completes.
    pub inconsistent: bool,
    /// Which leg orders writes, once it is not the configured one (a failed preferred handed it
    /// over, an election moved it): `Some(true)` this leg, `Some(false)` the peer. A restart keeps
    /// it, so a configured preferred that handed ordering away never comes back serving alone.
    pub ordering: Option<bool>,
    /// The roles are the operator's (a planned switchover made them): a reconnection keeps them
    /// and hosts' paths follow them (the ordering leg Optimized for every host).
    pub switched: bool,
}

impl Meta {
    pub fn new(size: u64, region_shift: u32) -> Meta {
        let regions = size.div_ceil(1 << region_shift);
        let words = regions.div_ceil(64) as usize;
        Meta {
            region_shift,
            regions,
            generations: Generations::default(),
            dirty: vec![0; words],
            written: vec![0; words],
            deferred: false,
            failed: false,
            inconsistent: false,
            ordering: None,
            switched: false,
        }
    }

    /// Regions covering `offset..offset+len`.
    pub fn regions_of(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        let first = offset >> self.region_shift;
        let last = (offset + len.max(1) - 1) >> self.region_shift;
        first..=last.min(self.regions.saturating_sub(1))
    }

    pub fn is_dirty(&self, region: u64) -> bool {
        self.dirty[(region / 64) as usize] & (1 << (region % 64)) != 0
    }

    /// Sets the dirty and written bits of a range; returns whether any bit changed (then the
    /// metadata must be made durable before the write is issued).
    pub fn mark(&mut self, offset: u64, len: u64) -> bool {
        let mut changed = false;
        for r in self.regions_of(offset, len) {
            let (w, bit) = ((r / 64) as usize, 1u64 << (r % 64));
            changed |= self.dirty[w] & bit == 0 || self.written[w] & bit == 0;
            self.dirty[w] |= bit;
            self.written[w] |= bit;
        }
        changed
    }

    /// Sets only the written bits (a leg applying what its peer ordered tracks no dirt of its
    /// own); returns whether any bit changed.
    pub fn mark_written(&mut self, offset: u64, len: u64) -> bool {
        let mut changed = false;
        for r in self.regions_of(offset, len) {
            let (w, bit) = ((r / 64) as usize, 1u64 << (r % 64));
            changed |= self.written[w] & bit == 0;
            self.written[w] |= bit;
        }
        changed
    }

    pub fn clear_dirty(&mut self, region: u64) {
        self.dirty[(region / 64) as usize] &= !(1 << (region % 64));
    }

    pub fn dirty_count(&self) -> u64 {
        self.dirty.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The first dirty region at or after `from`.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        (from..self.regions).find(|r| self.is_dirty(*r))
    }

    /// Marks every region ever written as dirty (before a full sync from this leg).
    pub fn dirty_all_written(&mut self) {
        for (d, w) in self.dirty.iter_mut().zip(&self.written) {
            *d |= *w;
        }
    }

    /// Bytes of one slot: a 4 KiB header block, then the dirty and written bitmaps, rounded up
    /// to 4 KiB so the two slots never share a block.
    fn slot_len(words: usize) -> u64 {
        (4096 + 16 * words as u64).next_multiple_of(4096)
    }

    /// One slot: header (magic, region shift, flags, regions, generations, sequence number,
    /// CRC32C of the header and both bitmaps) and the bitmaps.
    fn encode(&self, seq: u64) -> Vec<u8> {
        let words = self.dirty.len();
        let mut b = vec![0u8; Self::slot_len(words) as usize];
        b[0..8].copy_from_slice(SLOT_MAGIC);
        b[8..12].copy_from_slice(&self.region_shift.to_le_bytes());
        let ordering = match self.ordering {
            None => 0,
            Some(false) => 4,
            Some(true) => 12,
        };
        b[12..16].copy_from_slice(
            &(u32::from(self.deferred)
                | u32::from(self.failed) << 1
                | ordering
                | u32::from(self.inconsistent) << 4
                | u32::from(self.switched) << 5)
                .to_le_bytes(),
        );
        b[16..24].copy_from_slice(&self.regions.to_le_bytes());
        b[24..32].copy_from_slice(&self.generations.current.to_le_bytes());
        b[32..40].copy_from_slice(&self.generations.bitmap.to_le_bytes());
        b[40..48].copy_from_slice(&self.generations.history.to_le_bytes());
        b[48..56].copy_from_slice(&seq.to_le_bytes());
        for (i, w) in self.dirty.iter().chain(&self.written).enumerate() {
            b[4096 + i * 8..4096 + i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        let crc = slot_crc(&b, words);
        b[56..60].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// A slot's metadata and sequence number, if the slot is whole (its checksum matches).
    fn decode(b: &[u8]) -> Option<(Meta, u64)> {
        if b.len() < 4096 {
            return None;
        }
        let u64at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let flags = u32::from_le_bytes(b[12..16].try_into().expect("4 bytes"));
        let region_shift = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
        let regions = u64at(16);
        let words = usize::try_from(regions.div_ceil(64)).ok()?;
        let seq = match &b[0..8] {
            m if m == SLOT_MAGIC => {
                if b.len() < 4096 + 16 * words || slot_crc(b, words) != u32::from_le_bytes(b[56..60].try_into().expect("4 bytes")) {
                    return None;
                }
                u64at(48)
            }
            // The first format: one copy, a checksum over the header only.
            m if m == b"NVMRMETA" => {
                if crc32c::crc32c(&b[..48]) != u32::from_le_bytes(b[48..52].try_into().expect("4 bytes")) || b.len() < 4096 + 16 * words {
                    return None;
                }
                0
            }
            _ => return None,
        };
        let word = |i: usize| u64at(4096 + i * 8);
        let meta = Meta {
            region_shift,
            regions,
            generations: Generations { current: u64at(24), bitmap: u64at(32), history: u64at(40) },
            dirty: (0..words).map(word).collect(),
            written: (words..2 * words).map(word).collect(),
            deferred: flags & 1 != 0,
            failed: flags & 2 != 0,
            inconsistent: flags & 16 != 0,
            ordering: (flags & 4 != 0).then_some(flags & 8 != 0),
            switched: flags & 32 != 0,
        };
        Some((meta, seq))
    }
}

const SLOT_MAGIC: &[u8; 8] = b"NVMRMET2";

fn slot_crc(b: &[u8], words: usize) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&b[..56]), &b[4096..4096 + 16 * words])
}

/// The metadata file of one leg: two slots written alternately, each with a sequence number and
/// a checksum over all of it, so a write torn by a crash leaves the other (older) slot whole.
/// Writes are synchronous and followed by fdatasync: they happen only when a region turns dirty,
/// generations change or a resync clears bits. The file is locked (one owner per copy).
#[derive(Debug)]
pub struct MetaFile {
    file: File,
    slot_len: u64,
    /// The sequence number of the newest slot on disk.
    seq: u64,
    /// The newest slot's contents (encoded with sequence 0): storing the same again is skipped,
    /// so several changes made durable together cost one write and one sync.
    durable: Vec<u8>,
    /// Writes and syncs so far.
    syncs: u64,
}

impl MetaFile {
    /// Opens the file, or creates it with fresh metadata for a device of `size` bytes (and makes
    /// the new directory entry durable).
    pub fn open(path: &Path, size: u64, region_shift: u32) -> io::Result<(MetaFile, Meta)> {
        let existed = path.exists();
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        nvmetro_ffi::lock_exclusive(&file, path)?;
        if !existed {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                File::open(dir)?.sync_all()?;
            }
        }
        let mut buf = Vec::new();
        use std::io::Read;
        (&file).read_to_end(&mut buf)?;
        let regions = size.div_ceil(1 << region_shift);
        let slot_len = Meta::slot_len(regions.div_ceil(64) as usize);
        let slots = [Meta::decode(&buf), buf.get(slot_len as usize..).and_then(Meta::decode)];
        let newest = slots.into_iter().flatten().max_by_key(|(_, seq)| *seq);
        let (meta, seq) = match newest {
            Some((m, seq)) if m.regions == regions && m.region_shift == region_shift => (m, seq),
            Some(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: metadata is for a device of another size", path.display()),
                ))
            }
            None if buf.iter().any(|&b| b != 0) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: damaged mirror metadata (both copies)", path.display()),
                ))
            }
            None => (Meta::new(size, region_shift), 0),
        };
        let mut mf = MetaFile { file, slot_len, seq, durable: Vec::new(), syncs: 0 };
        mf.store(&meta)?;
        Ok((mf, meta))
    }

    /// Writes the slot the newest one is not, then syncs: the newest stays whole until then.
    /// Nothing is written when the newest slot already holds `meta`.
    pub fn store(&mut self, meta: &Meta) -> io::Result<()> {
        let image = meta.encode(0);
        if image == self.durable {
            return Ok(());
        }
        let seq = self.seq + 1;
        self.file.write_all_at(&meta.encode(seq), (seq % 2) * self.slot_len)?;
        self.file.sync_data()?;
        self.seq = seq;
        self.durable = image;
        self.syncs += 1;
        Ok(())
    }

    /// Writes and syncs so far (each made everything before it durable).
    pub fn syncs(&self) -> u64 {
        self.syncs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generations_decide_direction() {
        let g = |c, b| Generations { current: c, bitmap: b, history: 0 };
        assert_eq!(g(5, 0).compare(&g(5, 0)), SyncDirection::InSync);
        assert_eq!(g(7, 5).compare(&g(5, 0)), SyncDirection::ThisIsSource);
        assert_eq!(g(5, 0).compare(&g(7, 5)), SyncDirection::PeerIsSource);
        assert_eq!(g(7, 5).compare(&g(8, 5)), SyncDirection::SplitBrain);
        assert_eq!(g(0, 0).compare(&g(5, 0)), SyncDirection::FullFromPeer);
        assert_eq!(g(5, 0).compare(&g(0, 0)), SyncDirection::FullToPeer);
        assert_eq!(g(5, 0).compare(&g(6, 0)), SyncDirection::Unrelated);
    }

    #[test]
    fn storing_what_is_already_durable_writes_nothing() {
        let p = std::env::temp_dir().join(format!("nvmetro-meta-same-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let (mut f, mut m) = MetaFile::open(&p, 100 << 20, 20).unwrap();
        let opened = f.syncs();
        f.store(&m).unwrap();
        assert_eq!(f.syncs(), opened, "unchanged: no write, no sync");
        assert!(m.mark(5 << 20, 1));
        f.store(&m).unwrap();
        f.store(&m).unwrap();
        assert_eq!(f.syncs(), opened + 1, "one change: one sync");
        drop(f);
        let (_, again) = MetaFile::open(&p, 100 << 20, 20).unwrap();
        assert_eq!(again.dirty_count(), 1, "the change is durable");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn bitmap_survives_a_reopen() {
        let p = std::env::temp_dir().join(format!("nvmetro-meta-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let (mut f, mut m) = MetaFile::open(&p, 100 << 20, 20).unwrap();
        assert!(m.mark(5 << 20, 3 << 20));
        assert!(!m.mark(5 << 20, 4096), "already dirty");
        m.generations = Generations { current: 42, bitmap: 7, history: 1 };
        m.deferred = true;
        m.failed = true;
        m.inconsistent = true;
        m.ordering = Some(false);
        m.switched = true;
        f.store(&m).unwrap();
        drop(f);
        let (_, again) = MetaFile::open(&p, 100 << 20, 20).unwrap();
        assert_eq!(again, m);
        assert_eq!(again.dirty_count(), 3);
        assert_eq!(again.next_dirty(0), Some(5));
        assert!(MetaFile::open(&p, 200 << 20, 20).is_err(), "size change is refused");
        {
            let (_held, _) = MetaFile::open(&p, 100 << 20, 20).unwrap();
            let e = MetaFile::open(&p, 100 << 20, 20).unwrap_err();
            assert!(e.to_string().contains(&p.display().to_string()), "a second owner is refused, naming the file: {e}");
        }
        std::fs::write(&p, b"garbage").unwrap();
        assert!(MetaFile::open(&p, 100 << 20, 20).is_err(), "damage is refused");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_torn_store_keeps_the_previous_copy() {
        let p = std::env::temp_dir().join(format!("nvmetro-meta-torn-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let (mut f, mut m) = MetaFile::open(&p, 64 << 20, 20).unwrap();
        m.generations.current = 11;
        f.store(&m).unwrap();
        let older = m.clone();
        m.generations.current = 12;
        m.mark(0, 4096);
        f.store(&m).unwrap();
        let slot = f.slot_len;
        let newest_at = (f.seq % 2) * slot;
        drop(f);
        // A crash in the middle of the newest store: half of its slot is garbage.
        let mut bytes = std::fs::read(&p).unwrap();
        for b in &mut bytes[newest_at as usize + 20..newest_at as usize + 4200] {
            *b = 0xee;
        }
        std::fs::write(&p, &bytes).unwrap();
        let (f, back) = MetaFile::open(&p, 64 << 20, 20).unwrap();
        assert_eq!(back, older, "the torn copy is ignored, the previous one is whole");
        drop(f);
        // Both copies damaged: refused, never taken for fresh metadata.
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[30] ^= 1;
        bytes[slot as usize + 30] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        let e = MetaFile::open(&p, 64 << 20, 20).unwrap_err();
        assert!(e.to_string().contains("damaged"), "{e}");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn the_first_format_is_read_and_rewritten() {
        let p = std::env::temp_dir().join(format!("nvmetro-meta-v1-{}", std::process::id()));
        let mut m = Meta::new(64 << 20, 20);
        m.generations = Generations { current: 9, bitmap: 3, history: 0 };
        m.mark(5 << 20, 1);
        // The first format: one copy, "NVMRMETA", a CRC over the 48-byte header.
        let words = m.dirty.len();
        let mut b = vec![0u8; 4096 + 16 * words];
        b[0..8].copy_from_slice(b"NVMRMETA");
        b[8..12].copy_from_slice(&20u32.to_le_bytes());
        b[16..24].copy_from_slice(&m.regions.to_le_bytes());
        b[24..32].copy_from_slice(&9u64.to_le_bytes());
        b[32..40].copy_from_slice(&3u64.to_le_bytes());
        let crc = crc32c::crc32c(&b[..48]);
        b[48..52].copy_from_slice(&crc.to_le_bytes());
        for (i, w) in m.dirty.iter().chain(&m.written).enumerate() {
            b[4096 + i * 8..4096 + i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        std::fs::write(&p, &b).unwrap();
        let (f, back) = MetaFile::open(&p, 64 << 20, 20).unwrap();
        assert_eq!(back, m);
        drop(f);
        let (_, again) = MetaFile::open(&p, 64 << 20, 20).unwrap();
        assert_eq!(again, m, "rewritten in the two-slot format");
        std::fs::remove_file(p).unwrap();
    }
}
