//! Long-throw: the journal ring the send buffer spills to, and the overflow of writes that found
//! buffer and journal full (tracked by region and sent by a catch-up copy; the DR image is not
//! consistent until it ends); a journal entry lost to a failed write or read retires the journal
//! until a restart and is made good by a full copy.

use super::*;

pub(super) enum JournalIo<'a> {
    Write(&'a [u8]),
    Read(&'a mut [u8]),
}

impl Engine {
    /// Long-throw: a write was not numbered; the DR image is inconsistent past `after` until
    /// the catch-up copy ends.
    pub(super) fn overflowed(&mut self, after: u64) {
        self.overflows += 1;
        if self.broken.is_some() || self.gap.is_some_and(|g| g <= after) {
            return;
        }
        if self.gap.is_none() {
            tracing::warn!(group = %self.settings.name, after, "DR send buffer and journal full: writes are tracked by region and copied later; the DR image is not consistent until the catch-up ends");
        }
        self.gap = Some(after);
        // A restart before the catch-up ends copies everything.
        self.copied = false;
        if let Err(e) = self.persist(false) {
            self.break_off(&format!("cannot store the group's state: {e}"));
        }
        if self.greeted && self.broken.is_none() {
            self.send(DrFrame::Gap { seq: after });
        }
    }

    /// Long-throw: write `seq`'s journal entry was lost (its write or read failed). The DR image
    /// is not consistent past the write before it until a full copy ends, and nothing more is
    /// spilled until a restart (the copy's own chunks would fail the same way).
    pub(super) fn journal_failed(&mut self, seq: u64, why: &str) {
        if !self.journal_off {
            tracing::error!(group = %self.settings.name, seq, "{why}; the journal is not used until a restart (writes past the buffer are tracked by region), and the DR image is not consistent until a full copy ends");
            self.journal_off = true;
            self.seq.set_journal(Some(0), &mut Vec::new());
        }
        self.overflowed(seq - 1);
        for m in 0..self.member_size.len() {
            self.copy_again(m, 0, self.member_size[m]);
        }
    }

    /// Reads or writes the journal ring at logical position `at`.
    pub(super) fn journal_io(&self, at: u64, io: JournalIo<'_>) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let (f, size) = self.journal.as_ref().ok_or_else(|| std::io::Error::other("no journal"))?;
        let start = at % size;
        let len = match &io {
            JournalIo::Write(d) => d.len(),
            JournalIo::Read(d) => d.len(),
        } as u64;
        // Wraps at the end of the ring.
        let first = (size - start).min(len) as usize;
        match io {
            JournalIo::Write(d) => {
                f.write_all_at(&d[..first], start)?;
                f.write_all_at(&d[first..], 0)
            }
            JournalIo::Read(d) => {
                f.read_exact_at(&mut d[..first], start)?;
                f.read_exact_at(&mut d[first..], 0)
            }
        }
    }
}
