//! An error bdev's channel, the data path: each command passes, fails at once, is dropped or is
//! delayed as [`ErrorControl`] decides; delayed completions are held until their deadline, and
//! an alarm thread rings the channel's wake descriptor then so a parked reactor polls them out.

use super::control::Action;
use super::ErrorControl;
use crate::{BdevChannel, BdevCompletion, BdevError, BdevOp, BdevOutput};
use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

pub(super) struct ErrorChannel {
    inner: Box<dyn BdevChannel>,
    control: Arc<ErrorControl>,
    size: u64,
    /// Failed at once, for the next poll.
    ready: Vec<BdevCompletion>,
    /// Completions waiting for their deadline.
    held: Vec<(Instant, BdevCompletion)>,
    /// Tags at the inner device whose completions are to be held until the deadline.
    delayed: HashMap<u64, Instant>,
    /// Commands swallowed (outstanding forever).
    dropped: usize,
    alarm: Alarm,
}

impl ErrorChannel {
    /// A channel over `inner`, a channel of the device `control` belongs to, `size` bytes large.
    pub(super) fn new(inner: Box<dyn BdevChannel>, control: Arc<ErrorControl>, size: u64) -> std::io::Result<ErrorChannel> {
        let alarm = Alarm::new()?;
        Ok(ErrorChannel { inner, control, size, ready: Vec::new(), held: Vec::new(), delayed: HashMap::new(), dropped: 0, alarm })
    }

    /// Runs what the rules decided for `op`; a read offered `buf` passes it on.
    fn apply(&mut self, tag: u64, op: BdevOp, action: Action, buf: Option<crate::IoBufMut>) {
        let pass = |inner: &mut Box<dyn BdevChannel>, op: BdevOp| match (op, buf) {
            (BdevOp::Read { offset, len }, Some(buf)) => inner.submit_read_buf(tag, offset, len, buf),
            (op, _) => inner.submit(tag, op),
        };
        match action {
            Action::Pass => pass(&mut self.inner, op),
            Action::Drop => self.dropped += 1,
            Action::Delay(d) => {
                self.delayed.insert(tag, Instant::now() + d);
                pass(&mut self.inner, op);
            }
            Action::Fail(mut e, delay) => {
                if let BdevError::OutOfRange { offset, len, size } = &mut e {
                    (*offset, *len) = op.range().unwrap_or((0, 0));
                    *size = self.size;
                }
                let c = BdevCompletion { tag, result: Err::<BdevOutput, _>(e) };
                match delay {
                    Some(d) => self.hold(Instant::now() + d, c),
                    None => self.ready.push(c),
                }
            }
        }
    }

    fn hold(&mut self, deadline: Instant, c: BdevCompletion) {
        self.alarm.arm(deadline);
        self.held.push((deadline, c));
    }
}

impl BdevChannel for ErrorChannel {
    fn submit_read_buf(&mut self, tag: u64, offset: u64, len: usize, buf: crate::IoBufMut) {
        let op = BdevOp::Read { offset, len };
        let action = self.control.decide(&op);
        self.apply(tag, op, action, Some(buf));
    }

    fn submit(&mut self, tag: u64, op: BdevOp) {
        let action = self.control.decide(&op);
        self.apply(tag, op, action, None);
    }

    fn poll(&mut self, done: &mut Vec<BdevCompletion>) -> usize {
        let start = done.len();
        self.inner.poll(done);
        if !self.delayed.is_empty() && done.len() > start {
            for c in done.split_off(start) {
                match self.delayed.remove(&c.tag) {
                    Some(deadline) => self.hold(deadline, c),
                    None => done.push(c),
                }
            }
        }
        done.append(&mut self.ready);
        self.alarm.acknowledge();
        if !self.held.is_empty() {
            let now = Instant::now();
            let mut i = 0;
            while i < self.held.len() {
                if self.held[i].0 <= now {
                    done.push(self.held.remove(i).1);
                } else {
                    i += 1;
                }
            }
            if let Some(next) = self.held.iter().map(|h| h.0).min() {
                self.alarm.arm(next);
            }
        }
        done.len() - start
    }

    fn outstanding(&self) -> usize {
        self.inner.outstanding() + self.ready.len() + self.held.len() + self.dropped
    }

    fn wake_fds(&self) -> Vec<RawFd> {
        let mut fds = self.inner.wake_fds();
        fds.push(self.alarm.shared.fd.as_raw_fd());
        fds
    }
}

/// Rings an eventfd at the earliest deadline of the held completions, so a parked reactor wakes
/// to release them. Its thread starts on the first deadline.
struct Alarm {
    shared: Arc<AlarmShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct AlarmShared {
    fd: OwnedFd,
    /// The deadline to ring at, and whether the thread must stop.
    next: Mutex<(Option<Instant>, bool)>,
    wake: Condvar,
    rang: AtomicBool,
}

impl Alarm {
    fn new() -> std::io::Result<Alarm> {
        let fd = nvmetro_ffi::eventfd()?;
        let shared = AlarmShared { fd, next: Mutex::new((None, false)), wake: Condvar::new(), rang: AtomicBool::new(false) };
        Ok(Alarm { shared: Arc::new(shared), thread: None })
    }

    fn lock(&self) -> MutexGuard<'_, (Option<Instant>, bool)> {
        self.shared.next.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn arm(&mut self, deadline: Instant) {
        if self.thread.is_none() {
            let shared = self.shared.clone();
            let spawned = std::thread::Builder::new().name("bdev-error-alarm".into()).spawn(move || shared.run());
            match spawned {
                Ok(t) => self.thread = Some(t),
                // Held completions still leave when the reactor next polls (its tick at worst).
                Err(e) => {
                    tracing::warn!("cannot start the error bdev's alarm thread: {e}");
                    return;
                }
            }
        }
        let mut next = self.lock();
        if next.0.is_none_or(|n| deadline < n) {
            next.0 = Some(deadline);
            self.shared.wake.notify_one();
        }
    }

    /// Drains the eventfd if the alarm rang.
    fn acknowledge(&self) {
        if self.shared.rang.swap(false, Ordering::AcqRel) {
            nvmetro_ffi::eventfd_drain(&self.shared.fd);
        }
    }
}

impl AlarmShared {
    fn run(&self) {
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            match *next {
                (_, true) => return,
                (None, false) => next = self.wake.wait(next).unwrap_or_else(|p| p.into_inner()),
                (Some(at), false) => {
                    let now = Instant::now();
                    if at <= now {
                        next.0 = None;
                        self.rang.store(true, Ordering::Release);
                        nvmetro_ffi::eventfd_signal(&self.fd);
                    } else {
                        next = self.wake.wait_timeout(next, at - now).unwrap_or_else(|p| p.into_inner()).0;
                    }
                }
            }
        }
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.lock().1 = true;
            self.shared.wake.notify_one();
            let _ = t.join();
        }
    }
}
