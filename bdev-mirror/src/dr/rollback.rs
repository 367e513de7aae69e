//! The last consistent DR image, kept while the image is not consistent (the copy after a
//! `Rebase` or a metro takeover, the catch-up after a long-throw overflow): before the stream
//! first overwrites a block, the block's bytes are appended to a log beside the replica's state
//! and made durable, and only then is the write submitted. A promotion while the image is not
//! consistent writes them back: the image is again the last consistent one. The log goes once
//! the image is consistent again.
//!
//! The file: a header (magic, the applied sequence the kept image is at, CRC32C), then records,
//! each a header (magic, member, offset, length, CRC32C of header and data) and the bytes. A
//! record is durable before its block is overwritten, so a record torn by a crash was never
//! needed: opening stops at the first record that does not check, and appends go on from there.

use super::test_view::{block_runs, block_span};
use fixedbitset::FixedBitSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

const MAGIC: &[u8; 8] = b"NVDRRBK1";
const HEADER: u64 = 24;
const RECORD_MAGIC: u32 = 0x4b42_5244;
const RECORD: u64 = 24;

/// A block's kept bytes: where they go back and where they are in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    pub member: usize,
    pub offset: u64,
    pub len: u64,
    at: u64,
}

#[derive(Debug)]
pub struct RollbackLog {
    path: PathBuf,
    file: File,
    /// The applied sequence of the image the log keeps.
    pub since: u64,
    end: u64,
    /// Per member: its block size and the blocks kept.
    held: Vec<(u64, FixedBitSet)>,
    kept: Vec<Kept>,
    kept_bytes: u64,
}

fn record_crc(member: u32, offset: u64, len: u32, data: &[u8]) -> u32 {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&member.to_le_bytes());
    h.extend_from_slice(&offset.to_le_bytes());
    h.extend_from_slice(&len.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&h), data)
}

impl RollbackLog {
    fn empty(path: PathBuf, file: File, since: u64, geometry: &[(u64, u32)]) -> RollbackLog {
        let held = geometry
            .iter()
            .map(|&(size, block)| {
                let block = u64::from(block.max(1));
                (block, FixedBitSet::with_capacity(size.div_ceil(block) as usize))
            })
            .collect();
        RollbackLog { path, file, since, end: HEADER, held, kept: Vec::new(), kept_bytes: 0 }
    }

    /// A new log for an image consistent at `since`, durable (with its directory entry) before
    /// it returns.
    pub fn create(path: PathBuf, since: u64, geometry: &[(u64, u32)]) -> std::io::Result<RollbackLog> {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
        let mut h = [0u8; HEADER as usize];
        h[..8].copy_from_slice(MAGIC);
        h[8..16].copy_from_slice(&since.to_le_bytes());
        let crc = crc32c::crc32c(&h[..16]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        file.write_all_at(&h, 0)?;
        file.sync_data()?;
        if let Some(dir) = path.parent() {
            File::open(dir)?.sync_all()?;
        }
        Ok(RollbackLog::empty(path, file, since, geometry))
    }

    /// The log left at `path` (none: there is none, or its header is not one).
    pub fn open(path: PathBuf, geometry: &[(u64, u32)]) -> std::io::Result<Option<RollbackLog>> {
        let file = match std::fs::OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut h = [0u8; HEADER as usize];
        if file.read_exact_at(&mut h, 0).is_err()
            || &h[..8] != MAGIC
            || u32::from_le_bytes(h[16..20].try_into().expect("4")) != crc32c::crc32c(&h[..16])
        {
            return Ok(None);
        }
        let since = u64::from_le_bytes(h[8..16].try_into().expect("8"));
        let mut log = RollbackLog::empty(path, file, since, geometry);
        let size = log.file.metadata()?.len();
        let mut at = HEADER;
        let mut rh = [0u8; RECORD as usize];
        while at + RECORD <= size && log.file.read_exact_at(&mut rh, at).is_ok() {
            let word = |i: usize| u32::from_le_bytes(rh[i..i + 4].try_into().expect("4"));
            let (magic, member, offset, len, crc) =
                (word(0), word(4), u64::from_le_bytes(rh[8..16].try_into().expect("8")), word(16), word(20));
            if magic != RECORD_MAGIC || member as usize >= log.held.len() || at + RECORD + u64::from(len) > size {
                break;
            }
            let mut data = vec![0; len as usize];
            if log.file.read_exact_at(&mut data, at + RECORD).is_err() || record_crc(member, offset, len, &data) != crc {
                break;
            }
            log.mark(Kept { member: member as usize, offset, len: u64::from(len), at: at + RECORD });
            at += RECORD + u64::from(len);
        }
        // A torn tail was never relied on: appends go on over it.
        log.end = at;
        log.file.set_len(at)?;
        Ok(Some(log))
    }

    fn mark(&mut self, k: Kept) {
        let (block, held) = &mut self.held[k.member];
        let range = block_span(held, *block, k.offset, k.len);
        held.insert_range(range);
        self.kept_bytes += k.len;
        self.kept.push(k);
    }

    /// The byte ranges (whole blocks) of `offset..offset + len` of `member` not kept yet.
    pub fn unheld(&self, member: usize, offset: u64, len: u64) -> Vec<(u64, u64)> {
        let Some((block, held)) = self.held.get(member) else { return Vec::new() };
        block_runs(held, *block, block_span(held, *block, offset, len), false)
    }

    /// Keeps the image's bytes `data` (read at `offset` of `member`, block aligned) of every
    /// block not kept yet, durably before it returns.
    pub fn keep(&mut self, member: usize, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let runs = self.unheld(member, offset, data.len() as u64);
        if runs.is_empty() {
            return Ok(());
        }
        let mut added = Vec::new();
        let mut at = self.end;
        for (o, l) in runs {
            let bytes = &data[(o - offset) as usize..(o - offset + l) as usize];
            let mut rh = [0u8; RECORD as usize];
            rh[..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
            rh[4..8].copy_from_slice(&(member as u32).to_le_bytes());
            rh[8..16].copy_from_slice(&o.to_le_bytes());
            rh[16..20].copy_from_slice(&(l as u32).to_le_bytes());
            rh[20..24].copy_from_slice(&record_crc(member as u32, o, l as u32, bytes).to_le_bytes());
            self.file.write_all_at(&rh, at)?;
            self.file.write_all_at(bytes, at + RECORD)?;
            added.push(Kept { member, offset: o, len: l, at: at + RECORD });
            at += RECORD + l;
        }
        self.file.sync_data()?;
        self.end = at;
        for k in added {
            self.mark(k);
        }
        Ok(())
    }

    /// What was kept, each block once.
    pub fn kept(&self) -> &[Kept] {
        &self.kept
    }

    pub fn kept_bytes(&self) -> u64 {
        self.kept_bytes
    }

    /// The bytes kept as `k`.
    pub fn read(&self, k: &Kept) -> std::io::Result<Vec<u8>> {
        let mut data = vec![0; k.len as usize];
        self.file.read_exact_at(&mut data, k.at)?;
        Ok(data)
    }

    /// The log is no longer needed (the image is consistent, or was rolled back and recorded).
    pub fn remove(self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), "cannot remove the DR image's rollback log: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_blocks_survive_a_reopen_each_once_and_a_torn_tail_is_dropped() {
        let dir = std::env::temp_dir().join(format!("nvmetro-rollback-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("g.rollback");
        let geometry = [(64 << 10, 4096), (64 << 10, 512)];
        let mut log = RollbackLog::create(path.clone(), 41, &geometry).unwrap();
        log.keep(0, 4096, &[1; 8192]).unwrap();
        log.keep(0, 0, &[2; 3 * 4096]).unwrap();
        log.keep(1, 512, &[3; 512]).unwrap();
        assert_eq!(log.unheld(0, 0, 4 * 4096), [(3 * 4096, 4096)], "blocks 0-2 kept, 3 not");
        let kept: Vec<(usize, u64, u64)> = log.kept().iter().map(|k| (k.member, k.offset, k.len)).collect();
        assert_eq!(kept, [(0, 4096, 8192), (0, 0, 4096), (1, 512, 512)], "each block once, its first bytes");
        drop(log);
        // A crash mid-append leaves a torn record: dropped, the rest kept.
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
            f.write_all(&RECORD_MAGIC.to_le_bytes()).unwrap();
            f.write_all(&[0; 10]).unwrap();
        }
        let log = RollbackLog::open(path.clone(), &geometry).unwrap().expect("a log");
        assert_eq!(log.since, 41);
        assert_eq!(log.kept().len(), 3);
        assert_eq!(log.read(&log.kept()[0]).unwrap(), vec![1; 8192]);
        assert_eq!(log.read(&log.kept()[1]).unwrap(), vec![2; 4096]);
        assert_eq!(log.kept_bytes(), 8192 + 4096 + 512);
        log.remove();
        assert!(RollbackLog::open(path, &geometry).unwrap().is_none());
    }
}
