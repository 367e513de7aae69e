//! A DR stream's small durable state (`key = number` lines), replaced atomically: written to a
//! temporary file, synced, renamed over the old one, and the directory synced, so a crash leaves
//! the old state or the new one, never a torn one.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: &Path) -> StateFile {
        StateFile { path: path.to_path_buf() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored values; `None` when there is no state yet (a new group).
    pub fn load(&self) -> io::Result<Option<BTreeMap<String, u64>>> {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut values = BTreeMap::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let bad =
                || io::Error::new(io::ErrorKind::InvalidData, format!("{}:{}: not `key = number`: {line}", self.path.display(), i + 1));
            let (k, v) = line.split_once('=').ok_or_else(bad)?;
            values.insert(k.trim().to_string(), v.trim().parse().map_err(|_| bad())?);
        }
        Ok(Some(values))
    }

    pub fn store(&self, values: &BTreeMap<String, u64>) -> io::Result<()> {
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        for (k, v) in values {
            writeln!(f, "{k} = {v}")?;
        }
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        let dir = self.path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::File::open(dir)?.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_a_garbled_file_is_an_error_naming_its_line() {
        let dir = std::env::temp_dir().join(format!("nvmetro-dr-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let s = StateFile::new(&dir.join("g.state"));
        assert_eq!(s.load().unwrap(), None);
        let v: BTreeMap<String, u64> = [("acked".to_string(), 7), ("copied".to_string(), 1)].into();
        s.store(&v).unwrap();
        assert_eq!(s.load().unwrap(), Some(v));
        std::fs::write(s.path(), "acked = 7\nrubbish\n").unwrap();
        let e = s.load().unwrap_err().to_string();
        assert!(e.contains("g.state:2"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// A record rewritten often (the DR site's applied sequence, once per epoch): two fixed slots
/// written alternately in place, each with a counter and a CRC, made durable by one
/// `fdatasync`. A crash mid-write can tear only the slot being written; loading takes the valid
/// slot with the higher counter, so the previous record survives.
#[derive(Debug)]
pub struct RecordFile {
    file: std::fs::File,
    path: PathBuf,
    counter: u64,
}

const RECORD_MAGIC: &[u8; 8] = b"NVDRREC2";
/// Records written before the producer was recorded: four values (the fifth reads as 0).
const RECORD_MAGIC_V1: &[u8; 8] = b"NVDRREC1";
const SLOT: u64 = 4096;
/// Values per record.
pub const RECORD_VALUES: usize = 5;

impl RecordFile {
    /// Opens (creating) the file and returns the last record (zeroes for a new file).
    pub fn open(path: &Path) -> io::Result<(RecordFile, [u64; RECORD_VALUES])> {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        nvmetro_ffi::lock_exclusive(&file, path)?;
        let mut best: Option<(u64, [u64; RECORD_VALUES])> = None;
        for slot in 0..2 {
            let mut full = [0u8; 8 + 8 + 8 * RECORD_VALUES + 4];
            if file.read_exact_at(&mut full[..8], slot * SLOT).is_err() {
                continue;
            }
            let values_in_slot = match &full[..8] {
                m if m == RECORD_MAGIC => RECORD_VALUES,
                m if m == RECORD_MAGIC_V1 => 4,
                _ => continue,
            };
            let buf = &mut full[..8 + 8 + 8 * values_in_slot + 4];
            if file.read_exact_at(buf, slot * SLOT).is_err() {
                continue;
            }
            let body = buf.len() - 4;
            let crc = u32::from_le_bytes(buf[body..].try_into().expect("4 bytes"));
            if crc32c::crc32c(&buf[..body]) != crc {
                continue;
            }
            let word = |i: usize| u64::from_le_bytes(buf[8 + 8 * i..16 + 8 * i].try_into().expect("8 bytes"));
            let counter = word(0);
            let values = std::array::from_fn(|i| if i < values_in_slot { word(i + 1) } else { 0 });
            if best.is_none_or(|(c, _)| counter > c) {
                best = Some((counter, values));
            }
        }
        let (counter, values) = best.unwrap_or((0, [0; RECORD_VALUES]));
        Ok((RecordFile { file, path: path.to_path_buf(), counter }, values))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `values` into the slot not holding the current record and syncs it.
    pub fn store(&mut self, values: [u64; RECORD_VALUES]) -> io::Result<()> {
        use std::os::unix::fs::FileExt;
        let counter = self.counter + 1;
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(RECORD_MAGIC);
        buf.extend_from_slice(&counter.to_le_bytes());
        for v in values {
            buf.extend_from_slice(&v.to_le_bytes());
        }
        let crc = crc32c::crc32c(&buf);
        buf.extend_from_slice(&crc.to_le_bytes());
        self.file.write_all_at(&buf, (counter % 2) * SLOT)?;
        self.file.sync_data()?;
        self.counter = counter;
        Ok(())
    }
}

#[cfg(test)]
mod record_tests {
    use super::*;

    #[test]
    fn the_newest_intact_record_is_loaded_and_a_torn_slot_leaves_the_previous_one() {
        use std::os::unix::fs::FileExt;
        let path = std::env::temp_dir().join(format!("nvmetro-dr-record-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        {
            let (mut r, v) = RecordFile::open(&path).unwrap();
            assert_eq!(v, [0; RECORD_VALUES]);
            r.store([5, 1, 0, 0, 3]).unwrap();
            r.store([9, 1, 0, 0, 3]).unwrap();
        }
        {
            let (mut r, v) = RecordFile::open(&path).unwrap();
            assert_eq!(v, [9, 1, 0, 0, 3]);
            r.store([12, 0, 0, 0, 3]).unwrap();
        }
        // Tear the newest slot (counter 3 lives in slot 1): the one before it is loaded.
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff; 8], SLOT + 16).unwrap();
        drop(f);
        assert_eq!(RecordFile::open(&path).unwrap().1, [9, 1, 0, 0, 3]);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_record_from_before_the_producer_was_kept_loads_with_no_producer() {
        use std::os::unix::fs::FileExt;
        let path = std::env::temp_dir().join(format!("nvmetro-dr-record-v1-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut slot = Vec::new();
        slot.extend_from_slice(RECORD_MAGIC_V1);
        for v in [1u64, 40, 1, 0, 0] {
            slot.extend_from_slice(&v.to_le_bytes());
        }
        let crc = crc32c::crc32c(&slot);
        slot.extend_from_slice(&crc.to_le_bytes());
        std::fs::File::create(&path).unwrap().write_all_at(&slot, SLOT).unwrap();
        let (mut r, v) = RecordFile::open(&path).unwrap();
        assert_eq!(v, [40, 1, 0, 0, 0]);
        r.store([41, 1, 0, 0, 7]).unwrap();
        drop(r);
        assert_eq!(RecordFile::open(&path).unwrap().1, [41, 1, 0, 0, 7]);
        std::fs::remove_file(&path).unwrap();
    }
}
