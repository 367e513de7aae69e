//! The multipath initiator against real targets: it prefers Optimized paths and, when the
//! target behind a path dies, resumes on another path and reports the stall.

use nvmetro_perf::load::{run_paths, PathIo, Workload};
use nvmetro_perf::paths::PathMonitor;
use nvmetro_tests::{basic_config, TargetProcess, HOSTNQN, SUBNQN};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn workload(secs: u64) -> Workload {
    nvmetro_tests::mixed_workload(secs, 4, false, 7)
}

/// One worker's queues on each path, with path monitors.
fn connect_paths(addrs: &[SocketAddr]) -> (Vec<PathIo>, Vec<PathMonitor>) {
    nvmetro_tests::connect_paths(addrs, SUBNQN, HOSTNQN)
}

#[test]
fn io_goes_to_the_optimized_path() {
    let cfg = basic_config("[0]") + "\n[[listener]]\naddress = \"127.0.0.1:{PORT2}\"\nana_states = { \"1\" = \"non-optimized\" }\n";
    let t = TargetProcess::start(&cfg);
    // The non-optimized path first, so order cannot explain the choice.
    let (mut paths, monitors) = connect_paths(&[t.addr2, t.addr]);
    assert_eq!(paths[0].shared.ana.load(Ordering::Acquire), 2, "listener 2 reports non-optimized");
    assert_eq!(paths[1].shared.ana.load(Ordering::Acquire), 1, "listener 1 reports optimized");
    let r = run_paths(&mut paths, &workload(1), 512, &mut HashMap::new(), 0, None).unwrap();
    assert_eq!(r.errors, 0);
    assert!(r.ios() > 100);
    assert_eq!(paths[0].result.ios(), 0, "nothing on the non-optimized path");
    assert_eq!(paths[1].result.ios(), r.ios());
    monitors.into_iter().for_each(PathMonitor::stop);
}

#[test]
fn resumes_on_the_surviving_path_when_a_target_dies() {
    let mut a = TargetProcess::start(&basic_config("[0]"));
    let b = TargetProcess::start(&basic_config("[0]"));
    let (mut paths, monitors) = connect_paths(&[a.addr, b.addr]);
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1000));
        a.kill();
        a
    });
    let r = run_paths(&mut paths, &workload(3), 512, &mut HashMap::new(), 0, None).unwrap();
    let _a = killer.join().unwrap();
    assert_eq!(r.errors, 0, "every command completed, on one path or the other: {:?}", r.first_error);
    assert!(paths[0].result.ios() > 0 && paths[1].result.ios() > 0, "I/O ran on A, then on B");
    assert!(!r.stalls.is_empty(), "the path change was measured");
    let worst = r.stalls.iter().map(|s| s.duration).max().unwrap();
    assert!(worst < Duration::from_secs(2), "I/O stood still for {worst:?}");
    monitors.into_iter().for_each(PathMonitor::stop);
}
