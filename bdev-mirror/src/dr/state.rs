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
