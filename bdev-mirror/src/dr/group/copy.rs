//! Copies of member regions to the DR site: the full copy (a new group's first image, and the
//! image after an unclean restart lost the send buffer) and the catch-up after a long-throw
//! overflow (only the regions whose writes were not numbered). Regions are read under the
//! members' range locks and numbered as the reads complete, so a host write to a region is
//! numbered after the region's copy; a region dirtied again meanwhile is read again.
//!
//! The full copy sends only what differs (DRBD's `csums-alg`): for each region a checksum
//! (`Sum`, CRC32C), which the DR site compares with its own bytes when it gets to it in the
//! group's order, answering `Want` where they differ; only those regions' data follow. A new DR
//! image of zeroes therefore receives the regions ever written, and an image that was nearly
//! current receives what it missed. The image is consistent once the DR site holds the last
//! region's copy and has nothing more to ask for (`CopyDone`).

use super::*;

/// Regions to compare or copy, per member, and where the scan goes on.
struct Regions {
    /// One flag per [`COPY_CHUNK`] region.
    todo: Vec<Vec<bool>>,
    left: u64,
    cursor: (usize, usize),
}

impl Regions {
    fn new(sizes: &[u64], all: bool) -> Regions {
        let todo: Vec<Vec<bool>> = sizes.iter().map(|s| vec![all; s.div_ceil(COPY_CHUNK) as usize]).collect();
        let left = if all { todo.iter().map(|t| t.len() as u64).sum() } else { 0 };
        Regions { todo, left, cursor: (0, 0) }
    }

    /// Sets the regions of the range; returns how many were not set.
    fn mark(&mut self, member: usize, offset: u64, len: u64) -> u64 {
        let Some(t) = self.todo.get_mut(member) else { return 0 };
        let first = (offset / COPY_CHUNK) as usize;
        let last = ((offset + len.max(1) - 1) / COPY_CHUNK) as usize;
        let mut added = 0;
        for r in first..=last.min(t.len().saturating_sub(1)) {
            if !t[r] {
                t[r] = true;
                added += 1;
            }
        }
        self.left += added;
        added
    }

    /// The next set region from the cursor on (and once around), cleared.
    fn take(&mut self) -> Option<(usize, usize)> {
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

/// Regions still to copy, and the copy's progress.
pub(super) struct Copy {
    /// Regions whose data must be sent (overflowed, wanted by the DR site, failed to read).
    data: Regions,
    /// Regions to compare by checksum first (the full copy).
    sums: Regions,
    /// Copy reads in flight: tag -> (member, offset, len, for data rather than a checksum).
    pub(super) reads: HashMap<u64, (usize, u64, u64, bool)>,
    pub(super) done_bytes: u64,
    pub(super) total: u64,
    /// Bytes of data the copy sent (the rest was found equal by checksum).
    pub(super) sent_bytes: u64,
    /// The last copy write's sequence, once every region is numbered.
    pub(super) last_seq: Option<u64>,
    pub(super) speed: (Instant, u64, u64),
    /// A catch-up after an overflow, not a full copy.
    pub(super) catch_up: bool,
}

impl Copy {
    fn new(sizes: &[u64], full: bool) -> Copy {
        Copy {
            data: Regions::new(sizes, false),
            sums: Regions::new(sizes, full),
            reads: HashMap::new(),
            done_bytes: 0,
            sent_bytes: 0,
            total: if full { sizes.iter().sum() } else { 0 },
            last_seq: None,
            speed: (Instant::now(), 0, 0),
            catch_up: !full,
        }
    }

    pub(super) fn full(sizes: &[u64]) -> Copy {
        Copy::new(sizes, true)
    }

    pub(super) fn catch_up(sizes: &[u64]) -> Copy {
        Copy::new(sizes, false)
    }

    /// The data of `len` bytes at `offset` of `member` must be sent (again).
    pub(super) fn mark(&mut self, member: usize, offset: u64, len: u64) {
        self.total += self.data.mark(member, offset, len) * COPY_CHUNK;
        self.last_seq = None;
    }

    /// The next region to read: data first, then checksums.
    fn next(&mut self) -> Option<(usize, usize, bool)> {
        if let Some((m, r)) = self.data.take() {
            return Some((m, r, true));
        }
        self.sums.take().map(|(m, r)| (m, r, false))
    }

    fn idle(&self) -> bool {
        self.data.left == 0 && self.sums.left == 0 && self.reads.is_empty()
    }
}

impl Engine {
    /// Room for one more copy read: copy data counts against the buffer (and the journal) as
    /// host writes do.
    fn copy_room(&self, reads: usize) -> bool {
        let journal = self.journal.as_ref().filter(|_| !self.journal_off).map_or(0, |j| j.1);
        let limit = (self.settings.buffer_limit + journal).max(COPY_CHUNK);
        self.seq.buffered_bytes() + self.seq.spilled_bytes() + COPY_CHUNK * (reads as u64 + 1) <= limit
    }

    /// Whether `copy_rate` lets another region's read start now (and takes its bytes): a token
    /// bucket holding at most one region, so a copy that waited does not burst.
    fn copy_rate_allows(&mut self) -> bool {
        let Some(rate) = self.settings.copy_rate else { return true };
        let now = Instant::now();
        let (at, tokens) = self.copy_tokens;
        let tokens = (tokens + now.duration_since(at).as_secs_f64() * rate as f64).min(COPY_CHUNK as f64);
        let allowed = tokens >= COPY_CHUNK as f64;
        self.copy_tokens = (now, if allowed { tokens - COPY_CHUNK as f64 } else { tokens });
        allowed
    }

    /// Regions whose writes reach the DR site only by a copy (an overflow, a failed journal).
    pub(super) fn copy_again(&mut self, member: usize, offset: u64, len: u64) {
        if self.broken.is_some() {
            return;
        }
        if self.copied {
            // A restart before this copy ends copies everything.
            self.copied = false;
            if let Err(e) = self.persist(false) {
                self.break_off(&format!("cannot store the group's state: {e}"));
            }
        }
        if self.broken.is_some() {
            return;
        }
        let sizes = self.member_size.clone();
        self.copy.get_or_insert_with(|| Copy::catch_up(&sizes)).mark(member, offset, len);
    }

    /// Moves the copy on: reads under the range locks, numbered as they complete.
    pub(super) fn pump_copy(&mut self) -> bool {
        let Some(mut copy) = self.copy.take() else { return false };
        let mut work = false;
        while copy.reads.len() < COPY_READS && self.copy_room(copy.reads.len()) {
            let Some((member, region, data)) = copy.next() else { break };
            let offset = region as u64 * COPY_CHUNK;
            let len = COPY_CHUNK.min(self.member_size[member] - offset);
            let locked = self.locks[member].try_lock(offset, len, Mode::Exclusive);
            if !locked || !self.copy_rate_allows() {
                if locked {
                    self.locks[member].unlock(offset, len, Mode::Exclusive);
                }
                // A host write holds it, or over the copy rate: later, the same way.
                if data {
                    copy.data.mark(member, offset, len);
                } else {
                    copy.sums.mark(member, offset, len);
                }
                break;
            }
            let t = self.tag();
            self.member_ch[member].submit(t, BdevOp::Read { offset, len: len as usize });
            copy.reads.insert(t, (member, offset, len, data));
            work = true;
        }
        self.completions.clear();
        for ch in self.member_ch.iter_mut() {
            ch.poll(&mut self.completions);
        }
        let mut completions = std::mem::take(&mut self.completions);
        for c in completions.drain(..) {
            let Some((member, offset, len, data)) = copy.reads.remove(&c.tag) else { continue };
            work = true;
            match c.result {
                Ok(BdevOutput::Data(d)) => {
                    self.reserve(1);
                    if data {
                        copy.sent_bytes += len;
                        self.submit(c.tag, member as Member, offset, d);
                    } else {
                        let now = self.now_ms();
                        self.seq.submit_sum(c.tag, member as Member, offset, len, crc32c::crc32c(&d), now, &mut self.out);
                    }
                    // Submitted: a host write to the range from now on comes after it.
                    self.locks[member].unlock(offset, len, Mode::Exclusive);
                    self.shared.wake_lock_waiters(usize::MAX);
                    copy.done_bytes += len;
                }
                other => {
                    self.locks[member].unlock(offset, len, Mode::Exclusive);
                    self.shared.wake_lock_waiters(usize::MAX);
                    tracing::error!(group = %self.settings.name, member, offset, "DR copy: reading the member failed ({other:?}); reading it again");
                    copy.data.mark(member, offset, len);
                }
            }
        }
        self.completions = completions;
        // A chunk that overflowed marked its region again (in `run_outputs`, on the next turn).
        // Every chunk numbered (none waiting for room in the buffer) before the last is known.
        if copy.idle() && copy.last_seq.is_none() && self.seq.waiting_writes() == 0 {
            copy.last_seq = Some(self.seq.last_numbered());
            tracing::info!(group = %self.settings.name, bytes = copy.done_bytes, catch_up = copy.catch_up, "DR copy: every region read and queued");
        }
        // Every `Want` for a checksum comes before the acknowledgement that covers it.
        if let Some(last) = copy.last_seq.filter(|last| self.seq.acked() >= *last && copy.idle()) {
            self.copy_done_seq = Some(last);
            self.copied = true;
            self.gap = None;
            if let Err(e) = self.persist(false) {
                self.break_off(&format!("cannot store the group's state: {e}"));
            }
            tracing::info!(group = %self.settings.name, catch_up = copy.catch_up, read = copy.done_bytes, sent = copy.sent_bytes, "DR copy ended: the DR image is consistent");
            self.copy_sent = (copy.done_bytes, copy.sent_bytes);
            self.send_copy_done();
            return true;
        }
        self.copy = Some(copy);
        work
    }
}
