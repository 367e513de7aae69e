//! The full copy of every member: a new group's first image at the DR site, and the image after
//! an unclean restart lost the send buffer. Chunks are read under the members' range locks and
//! numbered as the reads complete, so a host write to a chunk is numbered after the chunk's copy;
//! the image is consistent once the DR site holds the last chunk (`CopyDone`).

use super::*;

/// The full copy of every member, in order.
pub(super) struct Copy {
    pub(super) member: usize,
    pub(super) next: u64,
    /// Copy reads in flight: tag -> (member, offset, len).
    pub(super) reads: HashMap<u64, (usize, u64, u64)>,
    /// Chunks whose read failed, to read again.
    pub(super) retry: Vec<(usize, u64, u64)>,
    pub(super) done_bytes: u64,
    pub(super) total: u64,
    /// The last copy write's sequence, once every chunk is numbered.
    pub(super) last_seq: Option<u64>,
    pub(super) speed: (Instant, u64, u64),
}

impl Engine {
    /// Moves the full copy on: reads under the range locks, numbered as they complete.
    pub(super) fn pump_copy(&mut self) -> bool {
        let Some(mut copy) = self.copy.take() else { return false };
        let mut work = false;
        // Copy data counts against the send buffer like host writes: read no more than it takes.
        while copy.reads.len() < COPY_READS
            && (copy.member < self.member_ch.len() || !copy.retry.is_empty())
            && self.seq.buffered_bytes() + COPY_CHUNK * (copy.reads.len() as u64 + 1) <= self.settings.buffer_limit.max(COPY_CHUNK)
        {
            let (member, offset, len) = match copy.retry.last() {
                Some(r) => *r,
                None => {
                    let size = self.member_size[copy.member];
                    if copy.next >= size {
                        copy.member += 1;
                        copy.next = 0;
                        continue;
                    }
                    (copy.member, copy.next, COPY_CHUNK.min(size - copy.next))
                }
            };
            if !self.locks[member].try_lock(offset, len, Mode::Exclusive) {
                break;
            }
            if copy.retry.pop().is_none() {
                copy.next += len;
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
                    tracing::error!(group = %self.settings.name, member, offset, "DR full copy: reading the member failed ({other:?}); reading it again");
                    copy.retry.push((member, offset, len));
                }
            }
        }
        self.completions = completions;
        if copy.member >= self.member_ch.len() && copy.reads.is_empty() && copy.retry.is_empty() && copy.last_seq.is_none() {
            copy.last_seq = Some(self.seq.last_numbered());
            tracing::info!(group = %self.settings.name, bytes = copy.done_bytes, "DR full copy: every member read and queued");
        }
        if let Some(last) = copy.last_seq {
            if self.seq.acked() >= last {
                self.copy_done_seq = Some(last);
                self.copied = true;
                if let Err(e) = self.persist(false) {
                    tracing::error!(group = %self.settings.name, "cannot store the DR group's state: {e}");
                }
                tracing::info!(group = %self.settings.name, "DR full copy ended: the DR image is consistent");
                self.send_copy_done();
                return true;
            }
        }
        self.copy = Some(copy);
        work
    }
}
