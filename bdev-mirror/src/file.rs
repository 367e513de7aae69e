//! A file or block device through a per-reactor io_uring, with O_DIRECT unless the file system
//! refuses it (tmpfs) or the config turns it off. Writes hold their range shared, fused
//! Compare+Write holds it exclusive from its read to the end of its write; an operation whose
//! range is busy waits in the channel's queue and is retried on the next poll.

use crate::range_lock::{Mode, RangeLocks};
use crate::{check_range, Bdev, BdevChannel, BdevCompletion, BdevError, BdevInfo, BdevOp, BdevOutput, IoBufMut};
use nvmetro_ffi::{DmaBuf, Uring, UringCompletion, UringOp};
use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::RawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug)]
pub struct FileBdev {
    info: BdevInfo,
    file: Arc<File>,
    locks: RangeLocks,
    direct: bool,
}

impl FileBdev {
    /// Opens `path`; a regular file that does not exist or is smaller is created/extended to
    /// `size` (when given). Block devices keep their own size. The file is locked exclusively
    /// for as long as the bdev lives: opening it while another process or bdev has it open
    /// fails, naming the file and, where it can be known, the holder's PID.
    pub fn open(name: &str, path: &Path, block_size: u32, size: Option<u64>, direct: bool) -> io::Result<FileBdev> {
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(true);
            if size.is_some() {
                o.create(true);
            }
            if direct {
                o.custom_flags(nvmetro_ffi::O_DIRECT);
            }
            o.open(path)
        };
        let (file, direct) = match open(direct) {
            Ok(f) => (f, direct),
            Err(e) if direct && e.raw_os_error() == Some(22) => {
                tracing::warn!(bdev = name, path = %path.display(), "O_DIRECT not supported here; using buffered I/O with fdatasync on flush");
                (open(false)?, false)
            }
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        };
        // One owner per copy: another target (or bdev) writing the same file would corrupt it.
        nvmetro_ffi::lock_exclusive(&file, path)?;
        let meta = file.metadata()?;
        let mut bytes = if meta.file_type().is_block_device() {
            use std::io::Seek;
            (&file).seek(io::SeekFrom::End(0))?
        } else {
            meta.len()
        };
        if let Some(want) = size {
            if !meta.file_type().is_block_device() && bytes < want {
                file.set_len(want)?;
                bytes = want;
            }
        }
        let blocks = bytes / u64::from(block_size);
        if blocks == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("{}: smaller than one block", path.display())));
        }
        Ok(FileBdev {
            info: BdevInfo { name: name.into(), block_size, blocks, volatile_cache: true },
            file: Arc::new(file),
            locks: RangeLocks::new(blocks * u64::from(block_size), 16),
            direct,
        })
    }

    pub fn is_direct(&self) -> bool {
        self.direct
    }
}

impl Bdev for FileBdev {
    fn info(&self) -> &BdevInfo {
        &self.info
    }
    fn channel(self: Arc<Self>) -> io::Result<Box<dyn BdevChannel>> {
        Ok(Box::new(FileChannel {
            ring: Uring::new(256)?,
            bdev: self,
            waiting: VecDeque::new(),
            ops: Vec::new(),
            free: Vec::new(),
            done: Vec::new(),
            reaped: Vec::new(),
            pool: Vec::new(),
        }))
    }
}

/// Where an operation is in its life.
#[derive(Debug)]
enum Stage {
    Read,
    Compare(Vec<u8>),
    /// Compare+Write: reading, holding the range exclusive; then the data to write.
    CawRead {
        expected: Vec<u8>,
        data: Vec<u8>,
    },
    CawWrite,
    Write {
        fua: bool,
    },
    WriteSync,
    Zero,
    Flush,
}

struct OpState {
    tag: u64,
    stage: Stage,
    lock: Option<(u64, u64, Mode)>,
}

struct FileChannel {
    bdev: Arc<FileBdev>,
    ring: Uring,
    waiting: VecDeque<(u64, BdevOp)>,
    ops: Vec<Option<OpState>>,
    free: Vec<usize>,
    done: Vec<BdevCompletion>,
    reaped: Vec<UringCompletion>,
    /// I/O buffers of finished operations, reused (no allocation and no zeroing per I/O once
    /// the channel has seen its queue depth).
    pool: Vec<DmaBuf>,
}

/// Buffers kept per channel: the ring's depth.
const POOL_BUFFERS: usize = 256;
/// Larger buffers are not kept (a rare large transfer does not pin its memory).
const POOL_MAX_BYTES: usize = 128 * 1024;

impl FileChannel {
    /// A buffer of `len` bytes from the pool (its bytes are whatever an earlier operation left;
    /// every caller overwrites them), or a new one.
    fn buffer(&mut self, len: usize) -> DmaBuf {
        match self.pool.iter().rposition(|b| b.capacity() >= len) {
            Some(i) => {
                let mut b = self.pool.swap_remove(i);
                b.set_len(len);
                b
            }
            None => DmaBuf::zeroed(len),
        }
    }

    fn buffer_with(&mut self, data: &[u8]) -> DmaBuf {
        let mut b = self.buffer(data.len());
        b.copy_from_slice(data);
        b
    }

    fn recycle(&mut self, buf: Option<DmaBuf>) {
        if let Some(b) = buf.filter(|b| b.capacity() <= POOL_MAX_BYTES) {
            if self.pool.len() < POOL_BUFFERS {
                self.pool.push(b);
            }
        }
    }

    fn alloc(&mut self, st: OpState) -> u64 {
        let i = self.free.pop().unwrap_or_else(|| {
            self.ops.push(None);
            self.ops.len() - 1
        });
        self.ops[i] = Some(st);
        i as u64
    }

    fn finish(&mut self, id: usize, result: Result<BdevOutput, BdevError>) {
        if let Some(st) = self.ops[id].take() {
            if let Some((off, len, mode)) = st.lock {
                self.bdev.locks.unlock(off, len, mode);
            }
            self.free.push(id);
            self.done.push(BdevCompletion { tag: st.tag, result });
        }
    }

    fn push(&mut self, id: u64, op: UringOp) {
        if let Err(e) = self.ring.push(id, op) {
            self.finish(id as usize, Err(e.into()));
        }
    }

    /// Starts an operation; gives it back if its range is busy.
    fn start(&mut self, tag: u64, op: BdevOp) -> Option<(u64, BdevOp)> {
        if let Err(e) = check_range(&self.bdev.info, &op) {
            self.done.push(BdevCompletion { tag, result: Err(e) });
            return None;
        }
        let file = self.bdev.file.clone();
        let lock_mode = match &op {
            BdevOp::CompareAndWrite { .. } => Some(Mode::Exclusive),
            BdevOp::Write { .. } | BdevOp::WriteZeroes { .. } | BdevOp::Deallocate { .. } => Some(Mode::Shared),
            _ => None,
        };
        let lock = match (lock_mode, op.range()) {
            (Some(mode), Some((off, len))) => {
                if !self.bdev.locks.try_lock(off, len, mode) {
                    return Some((tag, op));
                }
                Some((off, len, mode))
            }
            _ => None,
        };
        match op {
            BdevOp::Read { offset, len } => {
                let id = self.alloc(OpState { tag, stage: Stage::Read, lock });
                let buf = self.buffer(len);
                self.push(id, UringOp::Read { file, offset, buf });
            }
            BdevOp::Compare { offset, expected } => {
                let len = expected.len();
                let id = self.alloc(OpState { tag, stage: Stage::Compare(expected), lock });
                let buf = self.buffer(len);
                self.push(id, UringOp::Read { file, offset, buf });
            }
            BdevOp::CompareAndWrite { offset, expected, data } => {
                let len = expected.len();
                let id = self.alloc(OpState { tag, stage: Stage::CawRead { expected, data }, lock });
                let buf = self.buffer(len);
                self.push(id, UringOp::Read { file, offset, buf });
            }
            BdevOp::Write { offset, data, fua } => {
                let id = self.alloc(OpState { tag, stage: Stage::Write { fua }, lock });
                // Straight from the shared payload (page-aligned, so O_DIRECT takes it).
                self.push(id, UringOp::WriteShared { file, offset, buf: data });
            }
            BdevOp::WriteZeroes { offset, len } | BdevOp::Deallocate { offset, len } => {
                let id = self.alloc(OpState { tag, stage: Stage::Zero, lock });
                self.push(id, UringOp::Fallocate { file, offset, len, mode: nvmetro_ffi::PUNCH_HOLE });
            }
            BdevOp::Flush => {
                let id = self.alloc(OpState { tag, stage: Stage::Flush, lock });
                self.push(id, UringOp::Fsync { file });
            }
        }
        None
    }

    fn advance(&mut self, c: UringCompletion) {
        if let Some(into) = c.into {
            // A read into the caller's buffer: done in one step.
            let result = c.result.map(|_| BdevOutput::Buffer(into.freeze())).map_err(BdevError::from);
            return self.finish(c.tag as usize, result);
        }
        let buf = c.buf;
        self.step(c.tag as usize, c.result, buf.as_deref());
        self.recycle(buf);
    }

    /// The next stage of operation `id`, whose last transfer ended with `result` (`buf`: the
    /// bytes it moved, if it moved any).
    fn step(&mut self, id: usize, result: io::Result<usize>, buf: Option<&[u8]>) {
        let Some(st) = self.ops.get_mut(id).and_then(Option::as_mut) else { return };
        if let Err(e) = result {
            return self.finish(id, Err(e.into()));
        }
        let file = self.bdev.file.clone();
        let (offset, _, _) = st.lock.unwrap_or((0, 0, Mode::Shared));
        match std::mem::replace(&mut st.stage, Stage::Flush) {
            Stage::Read => {
                let data = buf.map(<[u8]>::to_vec).unwrap_or_default();
                self.finish(id, Ok(BdevOutput::Data(data)));
            }
            Stage::Compare(expected) => {
                let same = buf.is_some_and(|b| *b == *expected);
                self.finish(id, Ok(if same { BdevOutput::Done } else { BdevOutput::Miscompare }));
            }
            Stage::CawRead { expected, data } => {
                if buf.is_some_and(|b| *b == *expected) {
                    st.stage = Stage::CawWrite;
                    let buf = self.buffer_with(&data);
                    self.push(id as u64, UringOp::Write { file, offset, buf });
                } else {
                    self.finish(id, Ok(BdevOutput::Miscompare));
                }
            }
            Stage::Write { fua: true } => {
                st.stage = Stage::WriteSync;
                self.push(id as u64, UringOp::Fsync { file });
            }
            Stage::CawWrite | Stage::Write { .. } | Stage::WriteSync | Stage::Zero | Stage::Flush => {
                self.finish(id, Ok(BdevOutput::Done));
            }
        }
    }
}

impl BdevChannel for FileChannel {
    fn submit_read_buf(&mut self, tag: u64, offset: u64, len: usize, mut buf: IoBufMut) {
        let op = BdevOp::Read { offset, len };
        if !self.waiting.is_empty() || buf.capacity() < len {
            // Behind operations waiting for their range, as a plain read (the queue holds ops).
            return self.waiting.push_back((tag, op));
        }
        if let Err(e) = check_range(&self.bdev.info, &op) {
            return self.done.push(BdevCompletion { tag, result: Err(e) });
        }
        buf.set_len(len);
        let id = self.alloc(OpState { tag, stage: Stage::Read, lock: None });
        let file = self.bdev.file.clone();
        self.push(id, UringOp::ReadInto { file, offset, buf });
    }

    fn submit(&mut self, tag: u64, op: BdevOp) {
        if self.waiting.is_empty() {
            if let Some(busy) = self.start(tag, op) {
                self.waiting.push_back(busy);
            }
        } else {
            // Keep submission order behind operations already waiting for their range.
            self.waiting.push_back((tag, op));
        }
    }

    fn poll(&mut self, done: &mut Vec<BdevCompletion>) -> usize {
        for _ in 0..self.waiting.len() {
            let Some((tag, op)) = self.waiting.pop_front() else { break };
            if let Some(busy) = self.start(tag, op) {
                self.waiting.push_front(busy);
                break;
            }
        }
        if let Err(e) = self.ring.flush() {
            tracing::error!(bdev = %self.bdev.info.name, "io_uring submit failed: {e}");
        }
        let mut reaped = std::mem::take(&mut self.reaped);
        self.ring.reap(&mut reaped);
        for c in reaped.drain(..) {
            self.advance(c);
        }
        self.reaped = reaped;
        // Follow-up writes and syncs queued by `advance` go out now rather than next poll.
        let _ = self.ring.flush();
        let n = self.done.len();
        done.append(&mut self.done);
        n
    }

    fn outstanding(&self) -> usize {
        self.ring.inflight() + self.waiting.len() + self.done.len()
    }

    fn wake_fds(&self) -> Vec<RawFd> {
        vec![self.ring.eventfd()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("nvmetro-{name}-{}", std::process::id()))
    }

    #[test]
    fn conformance_direct_and_buffered() {
        for direct in [true, false] {
            let p = temp(&format!("file-{direct}"));
            let b = FileBdev::open("f", &p, 4096, Some(1 << 20), direct).unwrap();
            crate::conformance::check(Arc::new(b));
            std::fs::remove_file(p).unwrap();
        }
    }

    #[test]
    fn caw_excludes_concurrent_writes() {
        let p = temp("caw");
        let b = Arc::new(FileBdev::open("f", &p, 4096, Some(1 << 20), false).unwrap());
        let mut a = b.clone().channel().unwrap();
        let mut c = b.clone().channel().unwrap();
        a.submit(1, BdevOp::CompareAndWrite { offset: 0, expected: vec![0; 4096], data: vec![1; 4096] });
        c.submit(2, BdevOp::Write { offset: 0, data: vec![2; 4096].into(), fua: false });
        // The write waits until the compare-and-write is complete.
        let mut done = Vec::new();
        while done.iter().filter(|d: &&BdevCompletion| d.result.is_ok()).count() < 2 {
            a.poll(&mut done);
            c.poll(&mut done);
        }
        assert_eq!(done[0].tag, 1, "compare-and-write finished first");
        let r = crate::conformance::run_to_completion(a.as_mut(), 3, BdevOp::Read { offset: 0, len: 4096 });
        assert_eq!(r, Ok(BdevOutput::Data(vec![2; 4096])));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_file_has_one_owner_in_this_process() {
        let p = temp("owner");
        let first = FileBdev::open("a", &p, 4096, Some(1 << 20), false).unwrap();
        let e = FileBdev::open("b", &p, 4096, Some(1 << 20), false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy);
        assert!(e.to_string().contains(&p.display().to_string()), "{e}");
        drop(first);
        // A child a sibling test forks at this moment holds a copy of every descriptor until its
        // exec closes them (close-on-exec): the lock is free once that copy is gone too.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while let Err(e) = FileBdev::open("b", &p, 4096, Some(1 << 20), false) {
            assert!(std::time::Instant::now() < deadline, "still locked after the first bdev is gone: {e}");
            std::thread::yield_now();
        }
        std::fs::remove_file(p).unwrap();
    }

    /// Run by `a_file_open_in_another_process_is_refused`: keeps a file bdev open until stdin closes.
    #[test]
    fn file_owner_helper() {
        let Some(p) = std::env::var_os("NVMETRO_FILE_OWNER_HELPER") else { return };
        let _b = FileBdev::open("other", Path::new(&p), 4096, Some(1 << 20), false).unwrap();
        println!("opened");
        let _ = io::Read::read_to_end(&mut io::stdin(), &mut Vec::new());
    }

    #[test]
    fn a_file_open_in_another_process_is_refused() {
        use io::BufRead;
        let p = temp("owner-child");
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "file::tests::file_owner_helper", "--nocapture", "--test-threads=1"])
            .env("NVMETRO_FILE_OWNER_HELPER", &p)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = io::BufReader::new(child.stdout.take().unwrap()).lines();
        assert!(lines.any(|l| l.unwrap().ends_with("opened")), "the helper did not open the file");
        let e = FileBdev::open("f", &p, 4096, Some(1 << 20), false).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
        assert!(e.contains(&format!("process {}", child.id())), "{e}");
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
        FileBdev::open("f", &p, 4096, Some(1 << 20), false).expect("free once the other process exited");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn missing_path_is_a_clear_error() {
        let e = FileBdev::open("f", Path::new("/nonexistent/dir/disk"), 512, None, true).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/dir/disk"), "{e}");
    }
}
