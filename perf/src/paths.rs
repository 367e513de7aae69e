//! Path monitors for multipath runs: one thread per path that owns the path's admin queue, sends
//! Keep Alive every half KATO, reads the ANA log every 200 ms to publish the namespace's ANA state,
//! and, when the path is lost, reconnects it every half second and hands fresh I/O queues to the
//! workers through their mailboxes.
//!
//! A path is lost only when its connection fails (I/O error, timeout, protocol error). A command
//! the controller answers with an error status shows the path is alive: a controller without ANA
//! reporting (SPDK's nvmf_tgt unless asked for it) refuses the ANA log page, and its paths stay in
//! use with their state unknown.

use crate::load::PathShared;
use crate::{ConnectOptions, Host, HostError, Queue};
use nvmetro_proto::cmds;
use nvmetro_proto::nvme::{le_u16, le_u32};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Reads the ANA log and returns the state of the group holding `nsid` (0 if not listed).
pub fn ana_state(admin: &mut Queue, nsid: u32) -> Result<u8, HostError> {
    let (cqe, log) = admin.execute(cmds::get_log_page(0, 0x0c, 0, 4096, 0), vec![], 4096)?;
    if !cqe.status().is_success() {
        return Err(HostError::Status { what: "Get Log Page (ANA)", status: cqe.status() });
    }
    let groups = le_u16(&log, 8) as usize;
    let mut off = 16;
    for _ in 0..groups {
        if off + 32 > log.len() {
            break;
        }
        let n = le_u32(&log, off + 4) as usize;
        let state = log[off + 16];
        if (0..n).any(|i| off + 36 + i * 4 <= log.len() && le_u32(&log, off + 32 + i * 4) == nsid) {
            return Ok(state);
        }
        off += 32 + n * 4;
    }
    Ok(0)
}

#[derive(Debug)]
pub struct PathMonitor {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PathMonitor {
    /// Watches one path; `opts.io_queues` is the number of workers to give queues to on reconnect.
    pub fn start(shared: Arc<PathShared>, admin: Option<Queue>, opts: ConnectOptions, nsid: u32) -> PathMonitor {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut admin = admin;
            let kato = Duration::from_millis(u64::from(opts.kato_ms) / 2);
            let (mut last_ka, mut last_ana, mut last_try) = (Instant::now(), Instant::now() - Duration::from_secs(1), Instant::now());
            // Cleared when the controller refuses the ANA log: its state stays unknown (usable).
            let mut ana_log = true;
            while !flag.load(Ordering::Relaxed) {
                match admin.as_mut() {
                    None => {
                        if last_try.elapsed() >= Duration::from_millis(500) {
                            last_try = Instant::now();
                            let mut quick = opts.clone();
                            quick.timeout = Duration::from_secs(2);
                            if let Ok(h) = Host::connect(&quick) {
                                let (mut a, io) = h.into_parts();
                                ana_log = true;
                                match ana_state(&mut a, nsid) {
                                    Ok(state) => shared.ana.store(state, Ordering::Release),
                                    Err(HostError::Status { .. }) => {
                                        ana_log = false;
                                        shared.ana.store(0, Ordering::Release);
                                    }
                                    Err(_) => {}
                                }
                                let mut mail = shared.mailbox.lock().expect("mailbox");
                                for (slot, q) in mail.iter_mut().zip(io) {
                                    *slot = Some(q);
                                }
                                shared.has_mail.store(true, Ordering::Release);
                                shared.alive.store(true, Ordering::Release);
                                eprintln!("nvmetro-perf: path {} reconnected", shared.name);
                                admin = Some(a);
                                last_ka = Instant::now();
                            }
                        }
                    }
                    Some(a) => {
                        let mut result = Ok(());
                        if ana_log && last_ana.elapsed() >= Duration::from_millis(200) {
                            last_ana = Instant::now();
                            result = match ana_state(a, nsid) {
                                Ok(s) => {
                                    shared.ana.store(s, Ordering::Release);
                                    Ok(())
                                }
                                Err(HostError::Status { .. }) => {
                                    ana_log = false;
                                    shared.ana.store(0, Ordering::Release);
                                    Ok(())
                                }
                                Err(e) => Err(e),
                            };
                        }
                        if result.is_ok() && opts.kato_ms > 0 && last_ka.elapsed() >= kato {
                            last_ka = Instant::now();
                            // An error status still is an answer: only a failed connection loses the path.
                            result = a.execute(cmds::keep_alive(0), vec![], 0).map(|_| ());
                        }
                        if result.is_err() {
                            shared.alive.store(false, Ordering::Release);
                            admin = None;
                            last_try = Instant::now();
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        PathMonitor { stop, thread: Some(thread) }
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
