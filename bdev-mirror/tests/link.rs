//! Two mirror legs with their real drivers (link threads, metadata files, channels) in one
//! process, joined by the in-memory transport: writes reach both legs, a cut leaves the preferred
//! leg serving and the secondary fenced, a restore resyncs, and an emulated delay shows up in
//! write latency.

use nvmetro_bdev::malloc::MallocBdev;
use nvmetro_bdev::mirror::core::Role;
use nvmetro_bdev::mirror::driver::{MirrorBdev, MirrorSettings};
use nvmetro_bdev::mirror::transport::mem;
use nvmetro_bdev::{Bdev, BdevChannel, BdevError, BdevOp, BdevOutput};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: u64 = 4 << 20;

fn leg(name: &str, role: Role, transport: mem::MemTransport, dir: &std::path::Path) -> (Arc<MirrorBdev>, Arc<MallocBdev>) {
    leg_on(name, role, transport, dir, false)
}

/// A leg whose link runs as a poller (`on_reactor`) that the test turns itself.
fn leg_on(
    name: &str,
    role: Role,
    transport: mem::MemTransport,
    dir: &std::path::Path,
    on_reactor: bool,
) -> (Arc<MirrorBdev>, Arc<MallocBdev>) {
    leg_with(name, role, transport, dir, on_reactor, 0)
}

/// As [`leg_on`], with a resync rate cap (bytes per second; 0 for none).
fn leg_with(
    name: &str,
    role: Role,
    transport: mem::MemTransport,
    dir: &std::path::Path,
    on_reactor: bool,
    resync_rate: u64,
) -> (Arc<MirrorBdev>, Arc<MallocBdev>) {
    let local = Arc::new(MallocBdev::new(name, 512, SIZE, false).unwrap());
    let settings = MirrorSettings {
        role,
        site: if role == Role::Preferred { 1 } else { 2 },
        meta_path: dir.join(format!("{name}.meta")),
        region_shift: 16,
        resync_rate,
        resync_latency_target: Default::default(),
        heartbeat_timeout: Duration::from_secs(3),
        retry_interval: Duration::from_secs(30),
        secret: b"link test secret".to_vec(),
        link_delay: Duration::ZERO,
        spin: Duration::ZERO,
        metro: None,
    };
    let m = MirrorBdev::start(name, local.clone(), settings, Box::new(transport), on_reactor).unwrap();
    (m, local)
}

fn run(ch: &mut dyn BdevChannel, op: BdevOp) -> Result<BdevOutput, BdevError> {
    ch.submit(7, op);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut done = Vec::new();
    loop {
        ch.poll(&mut done);
        if let Some(c) = done.pop() {
            return c.result;
        }
        assert!(Instant::now() < deadline, "operation never completed");
        std::thread::sleep(Duration::from_micros(50));
    }
}

fn wait(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Turns a link that runs as a poller until `f` holds (30 s at most).
fn turn_until(link: &mut Box<dyn nvmetro_bdev::Poller>, what: &str, f: &mut dyn FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        link.poll(true);
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
    }
}

fn read_leg(l: &Arc<MallocBdev>) -> Vec<u8> {
    let mut c = l.clone().channel().unwrap();
    match run(c.as_mut(), BdevOp::Read { offset: 0, len: SIZE as usize }).unwrap() {
        BdevOutput::Data(d) => d,
        other => panic!("{other:?}"),
    }
}

#[test]
fn cut_restore_and_delay_over_the_in_memory_link() {
    let dir = std::env::temp_dir().join(format!("nvmetro-link-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ta, tb, control) = mem::pair(Duration::ZERO);
    let (a, la) = leg("a", Role::Preferred, ta, &dir);
    let (b, lb) = leg("b", Role::Secondary, tb, &dir);
    wait("the secondary serves", || b.serving());
    let mut ca = a.clone().channel().unwrap();
    let mut cb = b.clone().channel().unwrap();

    assert_eq!(run(ca.as_mut(), BdevOp::Write { offset: 0, data: vec![1; 4096].into(), fua: false }), Ok(BdevOutput::Done));
    assert_eq!(run(cb.as_mut(), BdevOp::Write { offset: 8192, data: vec![2; 4096].into(), fua: false }), Ok(BdevOutput::Done));
    assert!(read_leg(&la) == read_leg(&lb), "both legs hold both writes");

    control.cut();
    wait("the secondary fences itself", || !b.serving());
    assert!(a.serving(), "the preferred leg keeps serving");
    assert_eq!(run(ca.as_mut(), BdevOp::Write { offset: 1 << 20, data: vec![3; 8192].into(), fua: false }), Ok(BdevOutput::Done));
    assert_eq!(run(cb.as_mut(), BdevOp::Write { offset: 0, data: vec![4; 512].into(), fua: false }), Err(BdevError::Fenced));
    wait("the preferred leg counts what the secondary lacks (status is published every 100 ms)", || a.status().out_of_sync_bytes > 0);

    control.restore();
    wait("the secondary resyncs and serves again", || b.serving());
    assert!(read_leg(&la) == read_leg(&lb), "resync made the legs identical");
    wait("nothing is out of sync", || a.status().out_of_sync_bytes == 0);
    drop((ca, cb, a, b));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_emulated_link_delay_shows_in_write_latency() {
    let dir = std::env::temp_dir().join(format!("nvmetro-link-delay-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ta, tb, _control) = mem::pair(Duration::from_millis(2));
    let (a, _) = leg("a", Role::Preferred, ta, &dir);
    let (b, _) = leg("b", Role::Secondary, tb, &dir);
    wait("the secondary serves", || b.serving());
    let mut ca = a.clone().channel().unwrap();
    let t = Instant::now();
    assert_eq!(run(ca.as_mut(), BdevOp::Write { offset: 0, data: vec![1; 4096].into(), fua: false }), Ok(BdevOutput::Done));
    assert!(t.elapsed() >= Duration::from_millis(4), "a write waits one round trip: {:?}", t.elapsed());
    drop((ca, a, b));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn writes_that_arrive_together_make_their_dirty_regions_durable_with_one_sync() {
    let dir = std::env::temp_dir().join(format!("nvmetro-link-batch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ta, tb, control) = mem::pair(Duration::ZERO);
    let (a, _) = leg_on("a", Role::Preferred, ta, &dir, true);
    let mut link = a.take_poller().expect("the link runs as a poller");
    let (b, _) = leg("b", Role::Secondary, tb, &dir);
    turn_until(&mut link, "the secondary serves", &mut || b.serving());
    control.cut();
    turn_until(&mut link, "the preferred leg serves alone", &mut || a.status().link == "Disconnected" && a.serving());
    let before = a.status().metadata_syncs;

    // 32 writes to 32 clean regions (64 KiB each), all waiting when the link next turns.
    let mut ch = a.clone().channel().unwrap();
    for i in 0..32u64 {
        ch.submit(i, BdevOp::Write { offset: (16 + i) << 16, data: vec![i as u8; 4096].into(), fua: false });
    }
    link.poll(true);
    let mut done = Vec::new();
    turn_until(&mut link, "every write completed", &mut || {
        ch.poll(&mut done);
        done.len() == 32
    });
    assert!(done.iter().all(|c| c.result == Ok(BdevOutput::Done)), "{done:?}");
    turn_until(&mut link, "the status shows the dirty regions", &mut || a.status().out_of_sync_bytes >= 32 << 16);
    let syncs = a.status().metadata_syncs - before;
    // One after another they would take 32 syncs, one per newly dirty region.
    assert!(syncs <= 2, "{syncs} metadata syncs for one batch of 32 newly dirty regions");
    drop((ch, link, a, b));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_channel_past_its_depth_waits_in_order_and_loses_nothing() {
    let dir = std::env::temp_dir().join(format!("nvmetro-link-depth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ta, tb, _control) = mem::pair(Duration::ZERO);
    let (a, la) = leg_on("a", Role::Preferred, ta, &dir, true);
    let mut link = a.take_poller().expect("the link runs as a poller");
    let (b, lb) = leg("b", Role::Secondary, tb, &dir);
    turn_until(&mut link, "the secondary serves", &mut || b.serving() && a.status().link == "Connected");

    // 1,500 writes while the link does not turn: 1,024 fill the link's queue, the rest wait in
    // the channel. They rewrite 300 blocks five times over, so a write handed over out of its
    // turn (or lost) leaves a block with another pass's bytes.
    const WRITES: u64 = 1500;
    const BLOCKS: u64 = 300;
    let mut ch = a.clone().channel().unwrap();
    for i in 0..WRITES {
        ch.submit(i, BdevOp::Write { offset: (i % BLOCKS) * 4096, data: vec![(i / BLOCKS + 1) as u8; 4096].into(), fua: false });
    }
    assert_eq!(ch.outstanding(), WRITES as usize, "every write is held, none refused");
    let mut done = Vec::new();
    ch.poll(&mut done);
    assert!(done.is_empty(), "nothing completes before the link turns: {done:?}");
    turn_until(&mut link, "every write completed", &mut || {
        ch.poll(&mut done);
        done.len() == WRITES as usize
    });
    assert!(done.iter().all(|c| c.result == Ok(BdevOutput::Done)), "{:?}", done.iter().find(|c| c.result.is_err()));
    let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert!(tags.iter().copied().eq(0..WRITES), "each write completed exactly once");
    assert_eq!(ch.outstanding(), 0);

    let image = read_leg(&la);
    for block in 0..BLOCKS as usize {
        let last_pass = (WRITES - 1 - block as u64) / BLOCKS + 1;
        assert!(
            image[block * 4096..(block + 1) * 4096].iter().all(|&x| x == last_pass as u8),
            "block {block} holds {} rather than the last pass's {last_pass}",
            image[block * 4096]
        );
    }
    assert!(image == read_leg(&lb), "the secondary holds the same bytes");
    drop((ch, link, a, b));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn both_legs_show_the_resync_progress() {
    let dir = std::env::temp_dir().join(format!("nvmetro-link-progress-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (ta, tb, control) = mem::pair(Duration::ZERO);
    // 1 MiB/s: 2 MiB to copy take about two seconds.
    let (a, _) = leg_with("a", Role::Preferred, ta, &dir, false, 1 << 20);
    let (b, _) = leg("b", Role::Secondary, tb, &dir);
    wait("the secondary serves", || b.serving());
    control.cut();
    wait("the preferred serves alone", || a.serving() && a.status().link == "Disconnected");
    let mut ca = a.clone().channel().unwrap();
    for i in 0..32u64 {
        assert_eq!(run(ca.as_mut(), BdevOp::Write { offset: i << 16, data: vec![i as u8; 4096].into(), fua: false }), Ok(BdevOutput::Done));
    }
    control.restore();
    wait("the secondary shows a resync under way, with its progress", || {
        let s = b.status();
        s.link == "SyncTarget" && s.sync_total_bytes == 32 << 16 && s.synced_bytes > 0 && s.out_of_sync_bytes < s.sync_total_bytes
    });
    let sb = b.status();
    assert!(sb.sync_percent().is_some_and(|p| p > 0.0 && p < 100.0), "{sb:?}");
    // (Each leg publishes its status every 100 ms.)
    wait("both legs count the same resync", || a.status().sync_total_bytes == sb.sync_total_bytes);
    wait("the resync finishes", || b.status().link == "Connected" && b.status().out_of_sync_bytes == 0);
    assert_eq!(b.status().sync_percent(), Some(100.0));
    drop((ca, a, b));
    let _ = std::fs::remove_dir_all(dir);
}
