//! Copies of member regions to the DR site: the full copy (a new group's first image, and the
//! image after an unclean restart lost the send buffer) and the catch-up after a long-throw
//! overflow (only the regions whose writes were not numbered). Regions are read under the
//! members' range locks and numbered as the reads complete, so a host write to a region is
//! numbered after the region's copy; a region dirtied again meanwhile is read again. The image
//! is consistent once the DR site holds the last region's copy (`CopyDone`).

use super::*;

/// Regions still to copy, and the copy's progress.
pub(super) struct Copy {
    /// Per member, one flag per [`COPY_CHUNK`] region still to copy.
    todo: Vec<Vec<bool>>,
    left: u64,
    /// Where the scan goes on: (member, region).
    cursor: (usize, usize),
    /// Copy reads in flight: tag -> (member, offset, len).
    reads: HashMap<u64, (usize, u64, u64)>,
    pub(super) done_bytes: u64,
    pub(super) total: u64,
    /// The last copy write's sequence, once every region is numbered.
    last_seq: Option<u64>,
    pub(super) speed: (Instant, u64, u64),
    /// A catch-up after an overflow, not a full copy.
    pub(super) catch_up: bool,
}

impl Copy {
    fn new(sizes: &[u64], all: bool) -> Copy {
        let todo: Vec<Vec<bool>> = sizes.iter().map(|s| vec![all; s.div_ceil(COPY_CHUNK) as usize]).collect();
        let left = if all { todo.iter().map(|t| t.len() as u64).sum() } else { 0 };
        Copy {
            todo,
            left,
            cursor: (0, 0),
            reads: HashMap::new(),
            done_bytes: 0,
            total: if all { sizes.iter().sum() } else { 0 },
            last_seq: None,
            speed: (Instant::now(), 0, 0),
            catch_up: !all,
        }
    }

    pub(super) fn full(sizes: &[u64]) -> Copy {
        Copy::new(sizes, true)
    }

    pub(super) fn catch_up(sizes: &[u64]) -> Copy {
        Copy::new(sizes, false)
    }

    /// `len` bytes at `offset` of `member` must be copied (again).
    pub(super) fn mark(&mut self, member: usize, offset: u64, len: u64) {
        let Some(t) = self.todo.get_mut(member) else { return };
        let first = (offset / COPY_CHUNK) as usize;
        let last = ((offset + len.max(1) - 1) / COPY_CHUNK) as usize;
        for r in first..=last.min(t.len().saturating_sub(1)) {
            if !t[r] {
                t[r] = true;
                self.left += 1;
                self.total += COPY_CHUNK;
            }
        }
        self.last_seq = None;
    }

    /// The next region to read, scanning on from the cursor (and once around).
    fn next(&mut self) -> Option<(usize, usize)> {
        if self.left == 0 {
            return None;
        }
        let (mut m, mut r) = self.cursor;
        loop {
            if m >= self.todo.len() {
                (m, r) = (0, 0);
            }
            if r >= self.todo[m].len() {
                (m, r) = (m + 1, 0);
                continue;
            }
            if self.todo[m][r] {
                self.todo[m][r] = false;
                self.left -= 1;
                self.cursor = (m, r + 1);
                return Some((m, r));
            }
            r += 1;
        }
    }
}

impl Engine {
    /// Room for one more copy read: copy data counts against the buffer (and the journal) as
    /// host writes do.
    fn copy_room(&self, reads: usize) -> bool {
        let limit = (self.settings.buffer_limit + self.journal.as_ref().map_or(0, |j| j.1)).max(COPY_CHUNK);
        self.seq.buffered_bytes() + self.seq.spilled_bytes() + COPY_CHUNK * (reads as u64 + 1) <= limit
    }

    /// Regions whose writes reach the DR site only by a copy (an overflow, a failed journal).
    pub(super) fn copy_again(&mut self, member: usize, offset: u64, len: u64) {
        let sizes = self.member_size.clone();
        self.copy.get_or_insert_with(|| Copy::catch_up(&sizes)).mark(member, offset, len);
    }

    /// Moves the copy on: reads under the range locks, numbered as they complete.
    pub(super) fn pump_copy(&mut self) -> bool {
        let Some(mut copy) = self.copy.take() else { return false };
        let mut work = false;
        while copy.reads.len() < COPY_READS && self.copy_room(copy.reads.len()) {
            let Some((member, region)) = copy.next() else { break };
            let offset = region as u64 * COPY_CHUNK;
            let len = COPY_CHUNK.min(self.member_size[member] - offset);
            if !self.locks[member].try_lock(offset, len, Mode::Exclusive) {
                // A host write holds it: later.
                copy.mark(member, offset, len);
                copy.total -= COPY_CHUNK;
                break;
            }
            let t = self.tag();
            self.member_ch[member].submit(t, BdevOp::Read { offset, len: len as usize });
            copy.reads.insert(t, (member, offset, len));
            work = true;
        }
        self.completions.clear();
        for ch in self.member_ch.iter_mut() {
            ch.poll(&mut self.completions);
        }
        let mut completions = std::mem::take(&mut self.completions);
        for c in completions.drain(..) {
            let Some((member, offset, len)) = copy.reads.remove(&c.tag) else { continue };
            work = true;
            match c.result {
                Ok(BdevOutput::Data(d)) => {
                    self.reserve(1);
                    self.submit(c.tag, member as Member, offset, d);
                    // Numbered: a host write to the range from now on comes after it.
                    self.locks[member].unlock(offset, len, Mode::Exclusive);
                    copy.done_bytes += len;
                }
                other => {
                    self.locks[member].unlock(offset, len, Mode::Exclusive);
                    tracing::error!(group = %self.settings.name, member, offset, "DR copy: reading the member failed ({other:?}); reading it again");
                    copy.mark(member, offset, len);
                    copy.total -= COPY_CHUNK;
                }
            }
        }
        self.completions = completions;
        // A chunk that overflowed marked its region again (in `run_outputs`, on the next turn).
        if copy.left == 0 && copy.reads.is_empty() && copy.last_seq.is_none() {
            copy.last_seq = Some(self.seq.last_numbered());
            tracing::info!(group = %self.settings.name, bytes = copy.done_bytes, catch_up = copy.catch_up, "DR copy: every region read and queued");
        }
        if let Some(last) = copy.last_seq.filter(|last| self.seq.acked() >= *last) {
            self.copy_done_seq = Some(last);
            self.copied = true;
            self.gap = None;
            if let Err(e) = self.persist(false) {
                tracing::error!(group = %self.settings.name, "cannot store the DR group's state: {e}");
            }
            tracing::info!(group = %self.settings.name, catch_up = copy.catch_up, "DR copy ended: the DR image is consistent");
            self.send_copy_done();
            return true;
        }
        self.copy = Some(copy);
        work
    }
}
