//! One owner per copy: an exclusive, whole-file OFD lock (`fcntl(F_OFD_SETLK)`) on a bdev's file
//! or a mirror's metadata file, so that two targets (or two bdevs of one target) never write the
//! same copy. OFD locks belong to the open file description: a second `open` of the same file,
//! even in the same process, conflicts, and the lock goes away with the last descriptor of the
//! description (also when the process dies).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

fn whole_file_write_lock() -> libc::flock {
    // SAFETY: `flock` is plain data (integers); all zeroes is a valid value, completed below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0; // to the end of the file, however it grows
    fl.l_pid = 0; // F_OFD_SETLK requires 0
    fl
}

/// How long a lock with no holder in any process's descriptors is waited for: a process that was
/// just killed with io_uring requests in flight releases its files only when the kernel has torn
/// its rings down, a moment after it was reaped.
const DYING_HOLDER_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Takes an exclusive lock over the whole of `file` (which must be open for writing), or fails
/// when another open of it holds one: the error (kind [`io::ErrorKind::ResourceBusy`]) names
/// `path` and, where it can be found, the holder's PID. A holder that is a live process fails at
/// once; a lock that no process's descriptor holds (a killed owner's files still being released)
/// is waited for up to [`DYING_HOLDER_WAIT`]. The lock lasts as long as `file` (and any
/// descriptor duplicated from it) stays open.
pub fn lock_exclusive(file: &File, path: &Path) -> io::Result<()> {
    let since = std::time::Instant::now();
    loop {
        match try_lock_exclusive(file, path) {
            Err((_, None)) if since.elapsed() < DYING_HOLDER_WAIT => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            r => return r.map_err(|(e, _)| e),
        }
    }
}

/// One attempt; a busy lock's error comes with its holder's PID when one was found.
fn try_lock_exclusive(file: &File, path: &Path) -> Result<(), (io::Error, Option<i32>)> {
    let mut fl = whole_file_write_lock();
    // SAFETY: F_OFD_SETLK reads and writes the `flock` we pass, which is valid for the call;
    // `file` keeps the descriptor open meanwhile.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl as *mut libc::flock) };
    if rc == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
        return Err((io::Error::new(e.kind(), format!("{}: cannot lock: {e}", path.display())), Some(0)));
    }
    let holder = lock_holder(file);
    let who = match holder {
        Some(pid) if pid == std::process::id() as i32 => format!("this process (PID {pid}) already has it open"),
        Some(pid) => format!("process {pid} holds its lock"),
        None => "another process holds its lock".to_string(),
    };
    Err((io::Error::new(io::ErrorKind::ResourceBusy, format!("{}: already in use: {who}; one owner per copy", path.display())), holder))
}

/// The PID of whoever holds a lock conflicting with ours on `file`, where it can be known.
fn lock_holder(file: &File) -> Option<i32> {
    // A classic POSIX lock's holder is reported directly (OFD holders show as -1).
    let mut fl = whole_file_write_lock();
    // SAFETY: F_GETLK reads and writes the `flock` we pass, which is valid for the call.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut fl as *mut libc::flock) };
    if rc == 0 && fl.l_type != libc::F_UNLCK as libc::c_short && fl.l_pid > 0 {
        return Some(fl.l_pid);
    }
    // An OFD lock: find a descriptor of the same file whose fdinfo lists a lock.
    let meta = file.metadata().ok()?;
    let (dev, ino) = (meta.dev(), meta.ino());
    for proc_entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = proc_entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(fds) = std::fs::read_dir(proc_entry.path().join("fd")) else { continue };
        for fd in fds.flatten() {
            let same = std::fs::metadata(fd.path()).is_ok_and(|m| m.dev() == dev && m.ino() == ino);
            if !same {
                continue;
            }
            let info = std::fs::read_to_string(proc_entry.path().join("fdinfo").join(fd.file_name())).unwrap_or_default();
            if info.lines().any(|l| l.starts_with("lock:") && l.contains("WRITE")) {
                return Some(pid);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};

    fn scratch(name: &str) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("nvmetro-lock-{name}-{}", std::process::id()));
        std::fs::write(&p, [0u8; 4096]).unwrap();
        p
    }

    fn open_rw(p: &Path) -> File {
        std::fs::OpenOptions::new().read(true).write(true).open(p).unwrap()
    }

    #[test]
    fn second_open_in_the_same_process_is_refused() {
        let p = scratch("same");
        let first = open_rw(&p);
        lock_exclusive(&first, &p).unwrap();
        let second = open_rw(&p);
        let e = lock_exclusive(&second, &p).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy);
        let msg = e.to_string();
        assert!(msg.contains(&p.display().to_string()), "{msg}");
        assert!(msg.contains(&format!("PID {}", std::process::id())), "{msg}");
        drop(first);
        // A child another test forks at this moment holds a copy of every descriptor until its
        // exec closes them (close-on-exec): the lock is free once that copy is gone too.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while let Err(e) = lock_exclusive(&second, &p) {
            assert!(std::time::Instant::now() < deadline, "still locked after the first owner closed it: {e}");
            std::thread::yield_now();
        }
        std::fs::remove_file(p).unwrap();
    }

    /// Run by `another_process_holding_the_lock_is_named`: holds the lock until stdin closes.
    #[test]
    fn lock_holder_helper() {
        let Some(p) = std::env::var_os("NVMETRO_LOCK_HELPER") else { return };
        let f = open_rw(Path::new(&p));
        lock_exclusive(&f, Path::new(&p)).unwrap();
        println!("locked");
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
    }

    #[test]
    fn another_process_holding_the_lock_is_named() {
        let p = scratch("child");
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "lock::tests::lock_holder_helper", "--nocapture", "--test-threads=1"])
            .env("NVMETRO_LOCK_HELPER", &p)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        assert!(lines.any(|l| l.unwrap().ends_with("locked")), "the helper did not take the lock");
        let f = open_rw(&p);
        let msg = lock_exclusive(&f, &p).unwrap_err().to_string();
        assert!(msg.contains(&p.display().to_string()), "{msg}");
        assert!(msg.contains(&format!("process {}", child.id())), "{msg}");
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success());
        lock_exclusive(&f, &p).expect("free once the holder exited");
        std::fs::remove_file(p).unwrap();
    }
}
