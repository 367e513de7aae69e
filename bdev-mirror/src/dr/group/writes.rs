//! Host writes into the group's order: taken from the member channels' queues (split to the
//! frame size, reserved durably before they are numbered), and the sequencer's outputs run:
//! frames sent, writes released to their hosts, the long-throw journal written and read.

use super::journal::JournalIo;
use super::*;

impl Engine {
    /// Makes sure `n` more numbers are reserved durably before they are used.
    pub(super) fn reserve(&mut self, n: u64) {
        // Writes waiting for room are numbered later, without coming back here.
        let upto = self.seq.last_numbered() + self.seq.waiting_writes() + n;
        if upto > self.reserved {
            self.reserved = upto + RESERVE;
            if let Err(e) = self.persist(false) {
                // Numbers past the durable reservation could be reused after a restart.
                self.break_off(&format!("cannot store the group's state: {e}"));
            }
        }
    }

    pub(super) fn tag(&mut self) -> u64 {
        let t = self.next_tag;
        self.next_tag += 1;
        t
    }

    pub(super) fn submit(&mut self, tag: u64, member: Member, offset: u64, data: Vec<u8>) {
        let now = self.now_ms();
        if let Err(e) = self.seq.submit(tag, member, offset, data, now, &mut self.out) {
            // Writes are split to the frame size before they get here.
            unreachable!("DR sequencer refused a write: {e}");
        }
    }

    pub(super) fn take_host_writes(&mut self) -> bool {
        let channels = self.shared.channels.load_full();
        let mut any = false;
        for q in channels.iter() {
            while let Some(item) = q.inbox.pop() {
                any = true;
                self.shared.unsequenced.fetch_sub(1, Ordering::AcqRel);
                if self.broken.is_some() || self.standby {
                    // Released at once: the stream is stopped, or the other site feeds it.
                    if self.standby {
                        self.fall_behind();
                    }
                    q.release(item.tag);
                    continue;
                }
                let first = self.tag();
                let data = match item.payload {
                    Payload::Data(d) => d,
                    Payload::Zeros(len) => {
                        // One small frame, whatever the length (a discard of a whole device).
                        self.reserve(1);
                        self.hosts.insert(first, (item.chan, item.tag, 1));
                        let now = self.now_ms();
                        self.seq.submit_zeroes(first, item.member, item.offset, len, now, &mut self.out);
                        continue;
                    }
                };
                let len = data.len() as u64;
                let chunks = len.div_ceil(MAX_PAYLOAD as u64).max(1);
                self.reserve(chunks);
                self.hosts.insert(first, (item.chan, item.tag, chunks as u32));
                if chunks == 1 {
                    self.submit(first, item.member, item.offset, data);
                    continue;
                }
                for c in 0..chunks {
                    let at = c * MAX_PAYLOAD as u64;
                    let n = (len - at).min(MAX_PAYLOAD as u64) as usize;
                    let t = if c == 0 { first } else { self.tag() };
                    self.parts.insert(t, first);
                    self.submit(t, item.member, item.offset + at, data[at as usize..at as usize + n].to_vec());
                }
            }
        }
        any
    }

    pub(super) fn run_outputs(&mut self) {
        let mut out = std::mem::take(&mut self.out);
        let channels = self.shared.channels.load_full();
        for o in out.drain(..) {
            match o {
                SeqOutput::Send(f) => self.send(f),
                SeqOutput::Release(t) => {
                    let first = self.parts.remove(&t).unwrap_or(t);
                    let Some(h) = self.hosts.get_mut(&first) else { continue };
                    h.2 -= 1;
                    if h.2 == 0 {
                        let (chan, tag, _) = self.hosts.remove(&first).expect("present");
                        if let Some(q) = channels.get(chan) {
                            q.release(tag);
                        }
                        // Before the host can see it: what it submits next may depend on it.
                        self.seq.host_completed(first);
                    }
                }
                SeqOutput::Spill { seq, at, data } => {
                    if let Err(e) = self.journal_io(at, JournalIo::Write(&data)) {
                        self.journal_failed(seq, &format!("DR journal write failed: {e}"));
                        self.journal_lost.insert(at);
                    }
                }
                SeqOutput::SendSpilled { seq, epoch, member, offset, at, len } => {
                    let mut data = vec![0; len as usize];
                    if !self.journal_lost.remove(&at) {
                        if let Err(e) = self.journal_io(at, JournalIo::Read(&mut data)) {
                            self.journal_failed(seq, &format!("DR journal read failed: {e}"));
                            data.fill(0);
                        }
                    }
                    // A lost entry goes as zeroes: the image is not consistent past the write
                    // before it until the full copy rewrites its region.
                    self.send(DrFrame::Write { seq, epoch, member, offset, data });
                }
                SeqOutput::Overflow { member, offset, len, after, .. } => {
                    self.overflowed(after);
                    self.copy_again(member as usize, offset, len);
                }
            }
        }
        self.out = out;
    }
}
