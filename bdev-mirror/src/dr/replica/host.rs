//! The members as hosts at the DR site see them: Inaccessible until the image is promoted, then
//! the bdevs themselves; while a DR test is open, its writable point-in-time view (reads of the
//! image overlaid with what the view holds, writes into the view's store).

use super::*;

/// A member as hosts at the DR site see it: Inaccessible (every command fails as fenced) until
/// the image is promoted, then the bdev itself; while a DR test is open, its view.
#[derive(Debug)]
pub(super) struct ReplicaMember {
    pub(super) inner: Arc<dyn Bdev>,
    pub(super) member: usize,
    pub(super) shared: Arc<Shared>,
}

impl Bdev for ReplicaMember {
    fn info(&self) -> &crate::BdevInfo {
        self.inner.info()
    }
    fn access(&self) -> crate::Access {
        if self.shared.promoted.load(Ordering::Acquire) || self.shared.view.load().is_some() {
            self.inner.access()
        } else {
            crate::Access::Fenced
        }
    }
    fn as_error(&self) -> Option<&crate::error::ErrorBdev> {
        self.inner.as_error()
    }
    fn channel(self: Arc<Self>) -> std::io::Result<Box<dyn BdevChannel>> {
        Ok(Box::new(ReplicaMemberChannel {
            inner: self.inner.clone().channel()?,
            member: self.member,
            shared: self.shared.clone(),
            local: Vec::new(),
            view_reads: Default::default(),
        }))
    }
}

pub(super) type BdevResult = Result<crate::BdevOutput, crate::BdevError>;

/// A read of the image that a test view completes: what the host asked.
enum ViewRead {
    Read,
    Compare(Vec<u8>),
    CompareAndWrite(Vec<u8>, Vec<u8>),
}

struct ReplicaMemberChannel {
    inner: Box<dyn BdevChannel>,
    member: usize,
    shared: Arc<Shared>,
    /// Completed here (refused, or done in the test view's store).
    local: Vec<BdevCompletion>,
    /// Reads of the image under way for the test view: tag -> (the view, offset, what for).
    view_reads: std::collections::HashMap<u64, (Arc<TestView>, u64, ViewRead)>,
}

impl ReplicaMemberChannel {
    fn submit_to_view(&mut self, view: Arc<TestView>, tag: u64, op: BdevOp) {
        let m = &view.members[self.member];
        let io = |r: std::io::Result<()>| r.map(|()| crate::BdevOutput::Done).map_err(crate::BdevError::from);
        let result = match op {
            BdevOp::Read { offset, len } => {
                self.inner.submit(tag, BdevOp::Read { offset, len });
                self.view_reads.insert(tag, (view, offset, ViewRead::Read));
                return;
            }
            BdevOp::Compare { offset, expected } => {
                self.inner.submit(tag, BdevOp::Read { offset, len: expected.len() });
                self.view_reads.insert(tag, (view, offset, ViewRead::Compare(expected)));
                return;
            }
            BdevOp::CompareAndWrite { offset, expected, data } => {
                self.inner.submit(tag, BdevOp::Read { offset, len: expected.len() });
                self.view_reads.insert(tag, (view, offset, ViewRead::CompareAndWrite(expected, data)));
                return;
            }
            BdevOp::Write { offset, data, .. } => io(m.write(offset, &data)),
            BdevOp::WriteZeroes { offset, len } | BdevOp::Deallocate { offset, len } => io(m.write_zeroes(offset, len)),
            // The view is discarded afterwards: nothing of it needs to be durable.
            BdevOp::Flush => Ok(crate::BdevOutput::Done),
        };
        self.local.push(BdevCompletion { tag, result });
    }

    /// The image's bytes read for the view, overlaid with what the view holds.
    fn finish_view_read(&self, view: &TestView, offset: u64, what: ViewRead, read: BdevResult) -> BdevResult {
        let m = &view.members[self.member];
        let crate::BdevOutput::Data(mut data) = read? else { return Err(crate::BdevError::Io("a read returned no data".into())) };
        match what {
            ViewRead::Read => {
                m.overlay(offset, &mut data)?;
                Ok(crate::BdevOutput::Data(data))
            }
            ViewRead::Compare(expected) => {
                m.overlay(offset, &mut data)?;
                Ok(if data == expected { crate::BdevOutput::Done } else { crate::BdevOutput::Miscompare })
            }
            ViewRead::CompareAndWrite(expected, new) => Ok(if m.compare_and_write(offset, data, &expected, &new)? {
                crate::BdevOutput::Done
            } else {
                crate::BdevOutput::Miscompare
            }),
        }
    }
}

impl BdevChannel for ReplicaMemberChannel {
    fn submit_read_buf(&mut self, tag: u64, offset: u64, len: usize, buf: crate::IoBufMut) {
        if self.shared.promoted.load(Ordering::Acquire) {
            return self.inner.submit_read_buf(tag, offset, len, buf);
        }
        self.submit(tag, BdevOp::Read { offset, len });
    }

    fn submit(&mut self, tag: u64, op: BdevOp) {
        if self.shared.promoted.load(Ordering::Acquire) {
            return self.inner.submit(tag, op);
        }
        match self.shared.view.load_full() {
            Some(view) => self.submit_to_view(view, tag, op),
            // The stream owns the image until it is promoted.
            None => self.local.push(BdevCompletion { tag, result: Err(crate::BdevError::Fenced) }),
        }
    }
    fn poll(&mut self, done: &mut Vec<BdevCompletion>) -> usize {
        let n = self.local.len();
        done.append(&mut self.local);
        let first = done.len();
        let m = self.inner.poll(done);
        if !self.view_reads.is_empty() {
            for c in done[first..].iter_mut() {
                if let Some((view, offset, what)) = self.view_reads.remove(&c.tag) {
                    let read = std::mem::replace(&mut c.result, Ok(crate::BdevOutput::Done));
                    c.result = self.finish_view_read(&view, offset, what, read);
                }
            }
        }
        n + m
    }
    fn outstanding(&self) -> usize {
        self.inner.outstanding() + self.local.len()
    }
    fn wake_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.inner.wake_fds()
    }
}
