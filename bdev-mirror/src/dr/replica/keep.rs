//! Writes of the stream that wait until the image's bytes they overwrite are kept: for a DR
//! test's view, read first (in chunks) and kept in its store, then the write is submitted.

use super::host::BdevResult;
use super::*;

/// A write of the stream held until the test view kept the image's bytes it overwrites.
pub(super) struct Keep {
    view: Arc<TestView>,
    member: usize,
    id: u64,
    op: BdevOp,
    /// The range being read now, and those to read after it.
    reading: (u64, u64),
    rest: VecDeque<(u64, u64)>,
}

/// The image's bytes a test view keeps at a time, before a write of the stream.
const KEEP_CHUNK: u64 = 1 << 20;
/// Tags of the reads that keep the image's bytes for a test view (below [`FLUSH_TAG`], above
/// every write's sequence).
const KEEP_TAG: u64 = 1 << 62;

impl Stream {
    /// Submits a write of the stream; while a test view is open, only once the view kept the
    /// image's bytes it overwrites.
    pub(super) fn submit_write(&mut self, member: usize, id: u64, op: BdevOp) {
        if let (Some(view), Some((offset, len))) = (self.shared.view.load_full(), op.range()) {
            let mut rest: VecDeque<(u64, u64)> = VecDeque::new();
            for (mut at, mut n) in view.members[member].unheld(offset, len) {
                while n > 0 {
                    let step = n.min(KEEP_CHUNK);
                    rest.push_back((at, step));
                    (at, n) = (at + step, n - step);
                }
            }
            if let Some(reading) = rest.pop_front() {
                return self.keep_next(Keep { view, member, id, op, reading, rest });
            }
        }
        self.member_ch[member].submit(id, op);
    }

    fn keep_next(&mut self, k: Keep) {
        let tag = KEEP_TAG | self.next_keep;
        self.next_keep += 1;
        self.member_ch[k.member].submit(tag, BdevOp::Read { offset: k.reading.0, len: k.reading.1 as usize });
        self.keeping.insert(tag, k);
    }

    /// The image's bytes a test view keeps were read: kept, then the next range or the write.
    pub(super) fn kept(&mut self, mut k: Keep, read: BdevResult) {
        let current = self.shared.view.load_full().is_some_and(|v| Arc::ptr_eq(&v, &k.view));
        if current {
            let kept = match read {
                Ok(crate::BdevOutput::Data(d)) => k.view.members[k.member].keep(k.reading.0, &d).map_err(|e| e.to_string()),
                Ok(_) => Err("a read returned no data".into()),
                Err(e) => Err(e.to_string()),
            };
            match kept {
                Err(e) => {
                    // The stream goes on; a view that cannot be kept is no view.
                    self.discard_view(&format!("the image's bytes could not be kept for it ({e})"));
                }
                Ok(()) => {
                    if let Some(next) = k.rest.pop_front() {
                        k.reading = next;
                        return self.keep_next(k);
                    }
                }
            }
        }
        self.member_ch[k.member].submit(k.id, k.op);
    }
}
