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
    leg_with(name, role, transport, dir, Shape { on_reactor, ..Shape::default() })
}

/// How a test leg is made beyond its name, role and link.
#[derive(Clone, Copy)]
struct Shape {
    /// The link runs as a poller that the test turns itself.
    on_reactor: bool,
    /// Resync rate cap, bytes per second (0: none).
    resync_rate: u64,
    lanes: usize,
    size: u64,
}

impl Default for Shape {
    fn default() -> Shape {
        Shape { on_reactor: false, resync_rate: 0, lanes: 1, size: SIZE }
    }
}

/// A leg of the given [`Shape`].
fn leg_with(
    name: &str,
    role: Role,
    transport: impl nvmetro_bdev::mirror::transport::Transport + 'static,
    dir: &std::path::Path,
    shape: Shape,
) -> (Arc<MirrorBdev>, Arc<MallocBdev>) {
    let Shape { on_reactor, resync_rate, lanes, size } = shape;
    let local = Arc::new(MallocBdev::new(name, 512, size, false).unwrap());
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
        lanes,
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

/// A read offered a buffer (as an RDMA queue pair offers its registered ones): the data, and
/// whether it came in that buffer.
fn read_buf(ch: &mut dyn BdevChannel, offset: u64, len: usize) -> (Result<Vec<u8>, BdevError>, bool) {
    let buf = nvmetro_bdev::IoBufPool::new().take(len);
    let addr = buf.as_ptr();
    ch.submit_read_buf(8, offset, len, buf);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut done = Vec::new();
    loop {
        ch.poll(&mut done);
        if let Some(c) = done.pop() {
            return match c.result {
                Ok(BdevOutput::Buffer(b)) => (Ok(b.to_vec()), b.as_ptr() == addr),
                Ok(BdevOutput::Data(d)) => (Ok(d), false),
                Ok(other) => panic!("a read completed with {other:?}"),
                Err(e) => (Err(e), false),
            };
        }
        assert!(Instant::now() < deadline, "read never completed");
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

/// A fresh scratch directory for one test's metadata files.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("nvmetro-link-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn read_leg(l: &Arc<MallocBdev>) -> Vec<u8> {
    let mut c = l.clone().channel().unwrap();
    match run(c.as_mut(), BdevOp::Read { offset: 0, len: l.info().size_bytes() as usize }).unwrap() {
        BdevOutput::Data(d) => d,
        other => panic!("{other:?}"),
    }
}

#[test]
fn cut_restore_and_delay_over_the_in_memory_link() {
    let dir = scratch("cut");
    let (ta, tb, control) = mem::pair(Duration::ZERO);
    let (a, la) = leg("a", Role::Preferred, ta, &dir);
    let (b, lb) = leg("b", Role::Secondary, tb, &dir);
    wait("the secondary serves", || b.serving());
    let mut ca = a.clone().channel().unwrap();
    let mut cb = b.clone().channel().unwrap();

    assert_eq!(run(ca.as_mut(), BdevOp::Write { offset: 0, data: vec![1; 4096].into(), fua: false }), Ok(BdevOutput::Done));
    assert_eq!(run(cb.as_mut(), BdevOp::Write { offset: 8192, data: vec![2; 4096].into(), fua: false }), Ok(BdevOutput::Done));
    assert!(read_leg(&la) == read_leg(&lb), "both legs hold both writes");
    // A read offered a buffer is read by the local leg into it, at either site.
    assert_eq!(read_buf(ca.as_mut(), 8192, 4096), (Ok(vec![2; 4096]), true));
    assert_eq!(read_buf(cb.as_mut(), 0, 4096), (Ok(vec![1; 4096]), true));

    control.cut();
    wait("the secondary fences itself", || !b.serving());
    assert_eq!(read_buf(cb.as_mut(), 0, 4096), (Err(BdevError::Fenced), false), "a fenced leg serves no read, into a buffer or not");
    assert_eq!(read_buf(ca.as_mut(), 0, 4096), (Ok(vec![1; 4096]), true));
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
    let dir = scratch("delay");
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
    let dir = scratch("batch");
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
    let dir = scratch("depth");
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
    let dir = scratch("progress");
    let (ta, tb, control) = mem::pair(Duration::ZERO);
    // 1 MiB/s: 2 MiB to copy take about two seconds.
    let (a, _) = leg_with("a", Role::Preferred, ta, &dir, Shape { resync_rate: 1 << 20, ..Shape::default() });
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

/// Writes from both legs, 4 KiB each, at distinct offsets; the legs then hold the same bytes.
fn write_from_both(ca: &mut dyn BdevChannel, cb: &mut dyn BdevChannel, round: u8) {
    for i in 0..48u64 {
        let (ch, off): (&mut dyn BdevChannel, u64) = if i % 2 == 0 { (&mut *ca, i << 12) } else { (&mut *cb, i << 12) };
        assert_eq!(run(ch, BdevOp::Write { offset: off, data: vec![round ^ i as u8; 4096].into(), fua: false }), Ok(BdevOutput::Done));
    }
}

#[test]
fn a_link_of_three_lanes_carries_writes_on_every_lane_and_a_broken_lane_takes_it_down_until_it_is_whole() {
    let dir = scratch("lanes");
    let (ta, tb, control) = mem::pair(Duration::ZERO);
    let (a, la) = leg_with("a", Role::Preferred, ta, &dir, Shape { lanes: 3, ..Shape::default() });
    let (b, lb) = leg_with("b", Role::Secondary, tb, &dir, Shape { lanes: 3, ..Shape::default() });
    wait("three lanes up at both legs", || a.status().lanes_up == 3 && b.status().lanes_up == 3 && b.serving());
    assert_eq!((a.status().lanes_wanted, b.status().lanes_wanted), (3, 3));
    let ups = a.status().link_ups;
    let before = control.connections();
    assert_eq!(before.len(), 3, "one connection per lane");
    let mut ca = a.clone().channel().unwrap();
    let mut cb = b.clone().channel().unwrap();
    write_from_both(ca.as_mut(), cb.as_mut(), 1);
    let after = control.connections();
    for lane in 0..3 {
        // 48 writes of 4 KiB, a third of the replicated ones per lane at least.
        assert!(after[lane] - before[lane] >= 4 * 4096, "lane {lane} carried replicated writes: {before:?} -> {after:?}");
    }
    assert!(read_leg(&la) == read_leg(&lb), "both legs hold every write");

    // One lane breaks: the whole link goes down, comes back with its three lanes, and what was
    // written meanwhile reaches the other leg.
    control.break_connection(2);
    assert_eq!(run(ca.as_mut(), BdevOp::Write { offset: 1 << 20, data: vec![7; 8192].into(), fua: false }), Ok(BdevOutput::Done));
    wait("the link came up again with three lanes", || {
        let s = a.status();
        s.link_ups > ups && s.lanes_up == 3 && b.status().lanes_up == 3 && b.serving() && s.out_of_sync_bytes == 0
    });
    write_from_both(ca.as_mut(), cb.as_mut(), 2);
    assert!(read_leg(&la) == read_leg(&lb), "both legs hold every write after the lane broke");
    drop((ca, cb, a, b));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_link_takes_the_smaller_number_of_lanes_of_its_two_ends() {
    for (lanes_a, lanes_b, expect) in [(2, 4, 2), (3, 1, 1), (1, 3, 1)] {
        let dir = scratch(&format!("lanes-{lanes_a}-{lanes_b}"));
        let (ta, tb, control) = mem::pair(Duration::ZERO);
        let (a, la) = leg_with("a", Role::Preferred, ta, &dir, Shape { lanes: lanes_a, ..Shape::default() });
        let (b, lb) = leg_with("b", Role::Secondary, tb, &dir, Shape { lanes: lanes_b, ..Shape::default() });
        wait("the link is up and agreed", || {
            let (sa, sb) = (a.status(), b.status());
            b.serving() && sa.lanes_wanted == expect && sb.lanes_wanted == expect && sa.lanes_up == expect && sb.lanes_up == expect
        });
        let mut ca = a.clone().channel().unwrap();
        let mut cb = b.clone().channel().unwrap();
        write_from_both(ca.as_mut(), cb.as_mut(), 3);
        assert!(read_leg(&la) == read_leg(&lb));
        assert_eq!(control.connections().len(), expect, "{lanes_a} and {lanes_b} lanes");
        drop((ca, cb, a, b));
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A free TCP port on the loopback address.
fn free_port() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Authenticates to `addr` as a dialer with `secret`, then sends `first`: returns the stream.
fn authenticated_stranger(addr: std::net::SocketAddr, secret: &[u8], first: &nvmetro_bdev::mirror::frame::Frame) -> std::net::TcpStream {
    use nvmetro_bdev::mirror::auth::{fresh_nonce, Handshake, Side};
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hs = Handshake::new(secret, Side::Dialer, fresh_nonce().unwrap());
    let mut buf = [0u8; 4096];
    while !hs.is_done() {
        s.write_all(&hs.take_output()).unwrap();
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the acceptor closed the handshake");
        hs.on_bytes(&buf[..n]).unwrap();
    }
    s.write_all(&hs.take_output()).unwrap();
    let mut bytes = Vec::new();
    first.encode(&mut bytes);
    s.write_all(&bytes).unwrap();
    s
}

#[test]
fn over_tcp_lanes_join_only_their_own_link_and_a_stranger_lane_is_refused_without_touching_it() {
    use nvmetro_bdev::mirror::frame::{Frame, Kind};
    use nvmetro_bdev::mirror::transport::TcpTransport;
    use std::io::Read;
    let dir = scratch("lanes-tcp");
    let addr = free_port();
    let (a, la) =
        leg_with("a", Role::Preferred, TcpTransport::new(Some(addr), None).unwrap(), &dir, Shape { lanes: 2, ..Shape::default() });
    let (b, lb) =
        leg_with("b", Role::Secondary, TcpTransport::new(None, Some(addr)).unwrap(), &dir, Shape { lanes: 2, ..Shape::default() });
    wait("two lanes up", || a.status().lanes_up == 2 && b.status().lanes_up == 2 && b.serving());
    let (ups, refusals) = (a.status().link_ups, a.status().link_refusals);
    // Someone who knows the secret but not the link's session; then a lane past the link's two.
    for (arg, session) in [(1u32, 12345u64), (5, 0)] {
        let mut lane = Frame::new(Kind::Lane, session);
        lane.arg = arg;
        let mut s = authenticated_stranger(addr, b"link test secret", &lane);
        let mut buf = [0u8; 256];
        let closed = loop {
            match s.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e) => break e.kind() == std::io::ErrorKind::ConnectionReset,
            }
        };
        assert!(closed, "the stranger's lane is closed");
    }
    wait("both refusals are counted", || a.status().link_refusals >= refusals + 2);
    let (sa, sb) = (a.status(), b.status());
    assert_eq!((sa.link_ups, sa.lanes_up, sb.lanes_up), (ups, 2, 2), "the link was not touched");
    let mut ca = a.clone().channel().unwrap();
    let mut cb = b.clone().channel().unwrap();
    write_from_both(ca.as_mut(), cb.as_mut(), 4);
    assert!(read_leg(&la) == read_leg(&lb));
    drop((ca, cb, a, b));
    let _ = std::fs::remove_dir_all(dir);
}

/// The Hello a fresh secondary site sends, advertising `caps`.
fn peer_hello(caps: u8) -> nvmetro_bdev::mirror::frame::Frame {
    use nvmetro_bdev::mirror::frame::{Frame, Hello, Kind};
    let mut hello = Frame::new(Kind::Hello, 0);
    let fresh = Hello {
        site: 2,
        preferred: false,
        caps,
        orders: false,
        generations: Default::default(),
        disk: nvmetro_bdev::mirror::DiskState::Inconsistent,
        size: SIZE,
    };
    hello.payload = fresh.to_payload().into();
    hello
}

/// Reads frames from `s` until one of `kind` arrives.
fn read_until(s: &mut std::net::TcpStream, kind: nvmetro_bdev::mirror::frame::Kind) -> nvmetro_bdev::mirror::frame::Frame {
    use std::io::Read;
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        while let Some((f, n)) = nvmetro_bdev::mirror::frame::Frame::parse(&bytes).unwrap() {
            bytes.drain(..n);
            if f.kind == kind {
                return f;
            }
        }
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed before a {kind:?} frame");
        bytes.extend_from_slice(&buf[..n]);
    }
}

/// A test's peer keeping its link alive with a Ping every 200 ms on lane 0 (the leg's heartbeat
/// timeout is 3 s), until dropped.
struct KeepAlive {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KeepAlive {
    fn start(lane0: &std::net::TcpStream) -> KeepAlive {
        use nvmetro_bdev::mirror::frame::{Frame, Kind};
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (mut s, flag) = (lane0.try_clone().unwrap(), stop.clone());
        let thread = std::thread::spawn(move || {
            use std::io::Write;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let mut bytes = Vec::new();
                Frame::new(Kind::Ping, 0).encode(&mut bytes);
                if s.write_all(&bytes).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        KeepAlive { stop, thread: Some(thread) }
    }
}

impl Drop for KeepAlive {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether the peer closes `s` (it reads nothing else within a second).
fn closed_by_peer(s: &mut std::net::TcpStream) -> bool {
    use std::io::Read;
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// The test dials a leg as its peer would: a Hello makes the link, the leg names the session,
/// and lanes join only when they name it, each after the lanes before it.
#[test]
fn a_lane_joins_only_the_link_whose_session_it_names_and_after_the_lanes_before_it() {
    use nvmetro_bdev::mirror::frame::{caps, Frame, Kind};
    use nvmetro_bdev::mirror::transport::TcpTransport;
    let dir = scratch("lanes-session");
    let addr = free_port();
    let secret = b"link test secret";
    let (a, _) = leg_with("a", Role::Preferred, TcpTransport::new(Some(addr), None).unwrap(), &dir, Shape { lanes: 3, ..Shape::default() });
    let hello = peer_hello(caps::ALL);
    let mut lane0 = authenticated_stranger(addr, secret, &hello);
    let announce = read_until(&mut lane0, Kind::Lane);
    assert_eq!((announce.arg, announce.offset), (0, 3), "lane 0 announces three lanes");
    let session = announce.seq;
    let pinger = KeepAlive::start(&lane0);
    let join = |k: u32, session: u64| {
        let mut f = Frame::new(Kind::Lane, session);
        f.arg = k;
        authenticated_stranger(addr, secret, &f)
    };
    let refusals = a.status().link_refusals;
    let mut wrong = join(1, session ^ 1);
    assert!(closed_by_peer(&mut wrong), "a lane naming another session is closed");
    // Lane 2 before lane 1: it waits for lane 1, then joins.
    let mut lane2 = join(2, session);
    assert!(!closed_by_peer(&mut lane2), "an early lane waits");
    assert_eq!(a.status().lanes_up, 1);
    let mut lane1 = join(1, session);
    wait("lanes 1 and 2 joined", || a.status().lanes_up == 3);
    assert!(!closed_by_peer(&mut lane1) && !closed_by_peer(&mut lane2));
    let mut again = join(1, session);
    assert!(closed_by_peer(&mut again), "a lane already up is not taken twice");
    wait("the refusals are counted", || a.status().link_refusals == refusals + 2);
    assert_eq!(a.status().link_ups, 1, "the link stayed the one lane 0 made");
    drop(pinger);
    drop((lane0, lane1, lane2, a));
    let _ = std::fs::remove_dir_all(dir);
}

/// Over TCP with two lanes, a resync runs while hosts write at the sync source: resync data
/// yields to host frames on lane 0 (they overtake it in the outbox), and nothing counted may
/// wait for it there (a frame counting it ahead of it in lane 0 would wait for good), so the
/// link stays up through the resync and the legs end identical.
#[test]
fn over_lanes_a_resync_under_host_writes_keeps_the_link_up() {
    use nvmetro_bdev::mirror::transport::TcpTransport;
    let dir = scratch("lanes-resync");
    let addr = free_port();
    let shape = Shape { lanes: 2, size: 128 << 20, ..Shape::default() };
    let (a, la) = leg_with("a", Role::Preferred, TcpTransport::new(Some(addr), None).unwrap(), &dir, shape);
    let (b, _) = leg_with("b", Role::Secondary, TcpTransport::new(None, Some(addr)).unwrap(), &dir, shape);
    wait("two lanes up", || a.status().lanes_up == 2 && b.serving());
    // B goes away; A takes writes over the whole device alone.
    drop(b);
    wait("A serves alone", || a.status().link == "Disconnected");
    let mut ca = a.clone().channel().unwrap();
    for i in 0..(shape.size >> 16) {
        assert_eq!(
            run(ca.as_mut(), BdevOp::Write { offset: i << 16, data: vec![i as u8; 65536].into(), fua: false }),
            Ok(BdevOutput::Done)
        );
    }
    // B returns (its leg empty; every region is dirty at A) while A keeps writing.
    let (b, lb) = leg_with("b", Role::Secondary, TcpTransport::new(None, Some(addr)).unwrap(), &dir, shape);
    wait("the link is back", || a.status().lanes_up >= 1 && a.status().link != "Disconnected");
    let ups = a.status().link_ups;
    let mut writes = 0u64;
    while a.status().out_of_sync_bytes > 0 || a.status().link != "Connected" {
        let off = (writes * 7919 % (shape.size >> 12)) << 12;
        assert_eq!(
            run(ca.as_mut(), BdevOp::Write { offset: off, data: vec![writes as u8; 4096].into(), fua: false }),
            Ok(BdevOutput::Done)
        );
        writes += 1;
        assert!(writes < 1_000_000, "the resync never finished");
    }
    assert!(writes > 100, "hosts wrote during the resync: {writes}");
    assert_eq!(a.status().link_ups, ups, "the link stayed up through the resync");
    wait("B serves", || b.serving());
    assert!(read_leg(&la) == read_leg(&lb), "the legs are identical");
    drop((ca, a, b));
    let _ = std::fs::remove_dir_all(dir);
}

/// A peer of an earlier release (its Hello advertises no lanes) gets what it understands: no
/// Lane frame and no barrier counts (it requires header bytes 40..44 to be zero).
#[test]
fn a_peer_without_lanes_gets_neither_lane_frames_nor_barrier_counts() {
    use nvmetro_bdev::mirror::frame::{caps, Frame, Kind};
    use nvmetro_bdev::mirror::transport::TcpTransport;
    use std::io::{Read, Write};
    let dir = scratch("lanes-old-peer");
    let addr = free_port();
    let (a, _) = leg_with("a", Role::Preferred, TcpTransport::new(Some(addr), None).unwrap(), &dir, Shape { lanes: 4, ..Shape::default() });
    let hello = peer_hello(caps::SWITCHOVER | caps::RELEASE_ECHO);
    let mut s = authenticated_stranger(addr, b"link test secret", &hello);
    // Pings (as the earlier release sends them) until a few have been answered.
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    let (mut frames, mut pongs) = (Vec::new(), 0);
    while pongs < 3 {
        let mut ping = Vec::new();
        Frame::new(Kind::Ping, 0).encode(&mut ping);
        s.write_all(&ping).unwrap();
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the leg closed the link");
        bytes.extend_from_slice(&buf[..n]);
        while let Some((f, n)) = Frame::parse(&bytes).unwrap() {
            bytes.drain(..n);
            pongs += usize::from(f.kind == Kind::Pong);
            frames.push(f);
        }
    }
    assert!(frames.iter().any(|f| f.kind == Kind::Hello), "{frames:?}");
    assert!(frames.iter().all(|f| f.kind != Kind::Lane && f.barrier == 0), "{frames:?}");
    // (Status is published every 100 ms.)
    wait("the link shows one lane", || a.status().lanes_up == 1 && a.status().lanes_wanted == 1);
    drop((s, a));
    let _ = std::fs::remove_dir_all(dir);
}

/// A peer that breaks the lane rules on a live link of two lanes loses the link, and the leg's
/// status says why: a control frame on lane 1 (control takes lane 0), bytes on lane 1 that are
/// no frame, and a data frame on lane 1 that counts control frames the peer never sends (it waits
/// for them past the heartbeat timeout while lane 0 stays busy with pings: a stuck lane).
#[test]
fn a_peer_that_breaks_the_lane_rules_loses_the_link_and_status_says_why() {
    use nvmetro_bdev::mirror::frame::{caps, Frame, Kind};
    use nvmetro_bdev::mirror::transport::TcpTransport;
    use std::io::Write;
    let dir = scratch("lanes-rules");
    let addr = free_port();
    let secret = b"link test secret";
    let (a, _) = leg_with("a", Role::Preferred, TcpTransport::new(Some(addr), None).unwrap(), &dir, Shape { lanes: 2, ..Shape::default() });
    let encoded = |f: Frame| {
        let mut bytes = Vec::new();
        f.encode(&mut bytes);
        bytes
    };
    let mut ack = Frame::new(Kind::ReplicateAck, 1);
    ack.barrier = 1_000_000;
    let cases = [
        ("a control frame on lane 1", encoded(Frame::new(Kind::Ping, 0)), "those use lane 0"),
        ("bytes that are no frame", vec![0xa5; 256], "bad frame"),
        ("a data frame counting control frames never sent", encoded(ack), "a lane is stuck"),
    ];
    for (i, (what, bytes, why)) in cases.into_iter().enumerate() {
        let mut lane0 = authenticated_stranger(addr, secret, &peer_hello(caps::ALL));
        let session = read_until(&mut lane0, Kind::Lane).seq;
        let pinger = KeepAlive::start(&lane0);
        let mut join = Frame::new(Kind::Lane, session);
        join.arg = 1;
        let mut lane1 = authenticated_stranger(addr, secret, &join);
        wait("lane 1 joined", || a.status().lanes_up == 2);
        assert_eq!(a.status().link_ups, i as u64 + 1, "{what}: a new link");
        lane1.write_all(&bytes).unwrap();
        // The stuck lane takes the heartbeat timeout (3 s) to be noticed; the status is
        // published every 100 ms.
        let deadline = Instant::now() + Duration::from_secs(10);
        while a.status().lanes_up != 0 {
            assert!(Instant::now() < deadline, "{what}: the link stayed up");
            std::thread::sleep(Duration::from_millis(20));
        }
        let (reason, _) = a.status().last_link_down.expect("a reason");
        assert!(reason.contains(why), "{what}: {reason}");
        assert!(closed_by_peer(&mut lane0) && closed_by_peer(&mut lane1), "{what}: both lanes are closed");
        drop(pinger);
    }
    drop(a);
    let _ = std::fs::remove_dir_all(dir);
}

/// A TCP forwarder between a dialing leg and the leg it dials that refuses or swallows the
/// connections after the first, as told: the extra lanes' dials fail at the TCP level (the port
/// is closed) or hang in their handshake (accepted, never answered).
struct Gate {
    addr: std::net::SocketAddr,
    /// 0: forward, 1: refuse (port closed), 2: accept and say nothing, 3: forward one, then
    /// refuse.
    mode: Arc<std::sync::atomic::AtomicU8>,
    swallowed: Arc<std::sync::atomic::AtomicUsize>,
}

impl Gate {
    fn start(to: std::net::SocketAddr) -> Gate {
        use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
        let addr = free_port();
        let mode = Arc::new(AtomicU8::new(3));
        let swallowed = Arc::new(AtomicUsize::new(0));
        let (m, sw) = (mode.clone(), swallowed.clone());
        std::thread::spawn(move || {
            let mut held = Vec::new();
            loop {
                if m.load(Ordering::Relaxed) == 1 {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                // Bound only while not refusing, so a dial meanwhile finds the port closed.
                let Ok(l) = std::net::TcpListener::bind(addr) else { return };
                l.set_nonblocking(true).unwrap();
                while m.load(Ordering::Relaxed) != 1 {
                    let Ok((inbound, _)) = l.accept() else {
                        std::thread::sleep(Duration::from_millis(2));
                        continue;
                    };
                    if m.load(Ordering::Relaxed) == 2 {
                        sw.fetch_add(1, Ordering::Relaxed);
                        held.push(inbound);
                        continue;
                    }
                    let _ = m.compare_exchange(3, 1, Ordering::Relaxed, Ordering::Relaxed);
                    inbound.set_nonblocking(false).unwrap();
                    let outbound = std::net::TcpStream::connect(to).unwrap();
                    for (mut from, mut into) in [(inbound.try_clone().unwrap(), outbound.try_clone().unwrap()), (outbound, inbound)] {
                        std::thread::spawn(move || {
                            let _ = std::io::copy(&mut from, &mut into);
                            let _ = into.shutdown(std::net::Shutdown::Both);
                        });
                    }
                }
            }
        });
        Gate { addr, mode, swallowed }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The secondary's dials of a second lane fail: first the port is closed, then the connection is
/// accepted but never answers its handshake. The link works on the lane it has meanwhile (writes
/// reach both legs), and once dials go through again the second lane joins.
#[test]
fn a_lane_that_cannot_be_dialled_leaves_the_link_on_its_first_lane_until_a_dial_succeeds() {
    use nvmetro_bdev::mirror::transport::TcpTransport;
    use std::sync::atomic::Ordering;
    let dir = scratch("lanes-dial");
    let addr = free_port();
    let gate = Gate::start(addr);
    let shape = Shape { lanes: 2, ..Shape::default() };
    let (a, la) = leg_with("a", Role::Preferred, TcpTransport::new(Some(addr), None).unwrap(), &dir, shape);
    // The first connection goes through; every later one finds the port closed.
    let (b, lb) = leg_with("b", Role::Secondary, TcpTransport::new(None, Some(gate.addr)).unwrap(), &dir, shape);
    wait("the link is up and B serves", || a.status().lanes_up == 1 && b.status().lanes_wanted == 2 && b.serving());
    let mut ca = a.clone().channel().unwrap();
    let mut cb = b.clone().channel().unwrap();
    write_from_both(ca.as_mut(), cb.as_mut(), 5);
    assert!(read_leg(&la) == read_leg(&lb), "writes replicate over the one lane");
    // A dial that hangs in its handshake (tried again after twice the handshake timeout).
    gate.set(2);
    let deadline = Instant::now() + Duration::from_secs(20);
    while gate.swallowed.load(Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "B dialled no lane");
        write_from_both(ca.as_mut(), cb.as_mut(), 6);
        std::thread::sleep(Duration::from_millis(50));
    }
    let (sa, sb) = (a.status(), b.status());
    assert_eq!((sa.lanes_up, sb.lanes_up, sa.link_ups), (1, 1, 1), "the link kept its lane");
    gate.set(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.status().lanes_up != 2 || b.status().lanes_up != 2 {
        assert!(Instant::now() < deadline, "the second lane never joined: {:?}", b.status());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(a.status().link_ups, 1, "the same link, now of two lanes");
    write_from_both(ca.as_mut(), cb.as_mut(), 7);
    assert!(read_leg(&la) == read_leg(&lb));
    drop((ca, cb, a, b));
    let _ = std::fs::remove_dir_all(dir);
}

/// Reactors of the test's own, a thread each, until dropped: each turns its poller, and when a
/// turn finds nothing, parks in epoll on the poller's descriptors until one turns ready or its
/// deadline (as the target's reactors do).
struct Reactors {
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Reactors {
    fn new() -> Reactors {
        Reactors { stop: Arc::new(std::sync::atomic::AtomicBool::new(false)), threads: Vec::new() }
    }

    fn run(&mut self, p: Box<dyn nvmetro_bdev::Poller>) {
        self.run_with(p, || false);
    }

    /// Runs `p`, and `work` on every turn of its reactor (returning whether it did something).
    fn run_with(&mut self, mut p: Box<dyn nvmetro_bdev::Poller>, mut work: impl FnMut() -> bool + Send + 'static) {
        let stop = self.stop.clone();
        self.threads.push(std::thread::spawn(move || {
            let mut poll = mio::Poll::new().unwrap();
            for (i, fd) in p.wake_fds().into_iter().enumerate() {
                poll.registry().register(&mut mio::unix::SourceFd(&fd), mio::Token(i), mio::Interest::READABLE).unwrap();
            }
            let mut events = mio::Events::with_capacity(8);
            let mut busy = true;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let wait = if busy {
                    Duration::ZERO
                } else {
                    p.parking(true);
                    let due = p.next_deadline().map_or(Duration::from_millis(10), |d| d.saturating_duration_since(Instant::now()));
                    due.min(Duration::from_millis(10))
                };
                let _ = poll.poll(&mut events, Some(wait));
                if !busy {
                    p.parking(false);
                }
                busy = p.poll(!events.is_empty()) | work();
            }
        }));
    }

    /// Runs every helper poller (lane worker) of `m`.
    fn run_helpers(&mut self, m: &MirrorBdev) {
        for h in m.take_helper_pollers() {
            self.run(h);
        }
    }
}

impl Drop for Reactors {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Two legs of a three-lane link over the in-memory transport whose links run as pollers (for
/// the test's reactors): (scratch dir, link control, (A, its leg), (B, its leg)).
type ReactorLegs = (std::path::PathBuf, mem::MemLinkControl, (Arc<MirrorBdev>, Arc<MallocBdev>), (Arc<MirrorBdev>, Arc<MallocBdev>));

fn reactor_legs(name: &str) -> ReactorLegs {
    let dir = scratch(name);
    let (ta, tb, control) = mem::pair(Duration::ZERO);
    let shape = Shape { on_reactor: true, lanes: 3, ..Shape::default() };
    let a = leg_with("a", Role::Preferred, ta, &dir, shape);
    let b = leg_with("b", Role::Secondary, tb, &dir, shape);
    (dir, control, a, b)
}

/// Both legs have two lanes on reactors of their own and are in sync, and the secondary serves.
fn settled_on_reactors(a: &MirrorBdev, b: &MirrorBdev) -> bool {
    [a, b].iter().all(|m| m.status().lanes_on_reactors == 2 && m.status().out_of_sync_bytes == 0) && b.serving()
}

/// Lanes 1 and 2 of a three-lane link run on reactors of their own at both legs (their
/// workers write and read the connections and check the frames; the link thread keeps the core
/// and lane 0): writes from both legs reach both, over every lane; a broken lane on a worker
/// takes the link down, and it comes back with its lanes on their reactors again.
#[test]
fn lanes_on_reactors_of_their_own_carry_writes_and_a_broken_one_takes_the_link_down_until_it_is_whole() {
    let (dir, control, (a, la), (b, lb)) = reactor_legs("lanes-reactors");
    let mut reactors = Reactors::new();
    for m in [&a, &b] {
        reactors.run(m.take_poller().expect("the link"));
        let helpers = m.take_helper_pollers();
        assert_eq!(helpers.len(), 2, "a worker per lane past the first");
        assert!(m.take_helper_pollers().is_empty(), "handed out once");
        for h in helpers {
            reactors.run(h);
        }
    }
    let whole = |ups: u64| {
        [&a, &b].iter().all(|m| {
            let s = m.status();
            s.link_ups > ups && s.lanes_up == 3 && s.lanes_on_reactors == 2 && s.out_of_sync_bytes == 0
        }) && b.serving()
    };
    wait("three lanes, two of them on reactors of their own, at both legs", || whole(0));
    let before = control.connections();
    let mut ca = a.clone().channel().unwrap();
    let mut cb = b.clone().channel().unwrap();
    write_from_both(ca.as_mut(), cb.as_mut(), 1);
    let after = control.connections();
    for lane in 0..3 {
        assert!(after[lane] - before[lane] >= 4 * 4096, "lane {lane} carried replicated writes: {before:?} -> {after:?}");
    }
    assert!(read_leg(&la) == read_leg(&lb), "both legs hold every write");

    let ups = a.status().link_ups;
    control.break_connection(2);
    assert_eq!(run(ca.as_mut(), BdevOp::Write { offset: 1 << 20, data: vec![7; 8192].into(), fua: false }), Ok(BdevOutput::Done));
    wait("the link came up again with its lanes on their reactors", || whole(ups));
    // The leg that noticed first names the lane (the other may see its lane 0 go with it).
    let reasons = [a.status().last_link_down, b.status().last_link_down];
    assert!(reasons.iter().flatten().any(|(why, _)| why.contains("lane 2")), "{reasons:?}");
    write_from_both(ca.as_mut(), cb.as_mut(), 2);
    assert!(read_leg(&la) == read_leg(&lb), "both legs hold every write after the lane broke");
    drop(reactors);
    drop((ca, cb, a, b));
    let _ = std::fs::remove_dir_all(dir);
}

/// A write takes the lane its reactor drives: a channel polled on the thread of lane 1's worker
/// sends every replicated write (and gets every acknowledgement) by lane 1, none by lane 2.
#[test]
fn a_write_takes_the_lane_that_its_reactor_drives() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (dir, control, (a, la), (b, lb)) = reactor_legs("lanes-affinity");
    let mut reactors = Reactors::new();
    reactors.run(b.take_poller().unwrap());
    reactors.run(a.take_poller().unwrap());
    reactors.run_helpers(&b);
    let mut helpers = a.take_helper_pollers();
    let lane2 = helpers.pop().unwrap();
    let lane1 = helpers.pop().unwrap();
    reactors.run(lane2);
    // Lane 1's worker shares its thread with a channel that writes, one write at a time.
    let go = Arc::new(AtomicBool::new(false));
    let (results, done) = std::sync::mpsc::channel();
    let mut ch = a.clone().channel().unwrap();
    let (mut next, mut inflight, mut polled) = (0u64, false, false);
    let started = go.clone();
    reactors.run_with(lane1, move || {
        let mut completed = Vec::new();
        ch.poll(&mut completed);
        for c in completed {
            inflight = false;
            results.send(c.result).unwrap();
        }
        // (Polled once on this thread first: that is how a channel's reactor is known.)
        if polled && started.load(Ordering::Relaxed) && !inflight && next < 64 {
            ch.submit(next, BdevOp::Write { offset: next << 12, data: vec![next as u8 | 1; 4096].into(), fua: false });
            next += 1;
            inflight = true;
        }
        polled = true;
        true
    });
    wait("three lanes, two on reactors of their own, at both legs", || settled_on_reactors(&a, &b));
    let before = control.connections();
    go.store(true, Ordering::Relaxed);
    for _ in 0..64 {
        assert_eq!(done.recv_timeout(Duration::from_secs(10)).expect("a write completes"), Ok(BdevOutput::Done));
    }
    let after = control.connections();
    assert!(after[1] - before[1] >= 64 * 4096, "lane 1 carried every write: {before:?} -> {after:?}");
    assert!(after[2] - before[2] < 4096, "lane 2 carried none: {before:?} -> {after:?}");
    assert!(read_leg(&la) == read_leg(&lb), "both legs hold every write");
    drop(reactors);
    drop((a, b));
    let _ = std::fs::remove_dir_all(dir);
}

/// Lanes that joined before any reactor ran their workers (as at start, or when a reload adds a
/// mirror) move to the workers once they run, mid-link: the link stays up, writes go on over
/// every lane, and both legs end identical.
#[test]
fn lanes_that_joined_before_their_reactors_ran_move_to_them_without_the_link_going_down() {
    let (dir, control, (a, la), (b, lb)) = reactor_legs("lanes-move");
    let mut reactors = Reactors::new();
    reactors.run(a.take_poller().unwrap());
    reactors.run(b.take_poller().unwrap());
    wait("three lanes on the link threads", || {
        [&a, &b].iter().all(|m| m.status().lanes_up == 3 && m.status().lanes_on_reactors == 0) && b.serving()
    });
    let mut ca = a.clone().channel().unwrap();
    let mut cb = b.clone().channel().unwrap();
    write_from_both(ca.as_mut(), cb.as_mut(), 1);
    let ups = (a.status().link_ups, b.status().link_ups);
    reactors.run_helpers(&a);
    reactors.run_helpers(&b);
    wait("the lanes moved to their reactors", || [&a, &b].iter().all(|m| m.status().lanes_on_reactors == 2));
    let before = control.connections();
    write_from_both(ca.as_mut(), cb.as_mut(), 2);
    let after = control.connections();
    for lane in 1..3 {
        assert!(after[lane] - before[lane] >= 4 * 4096, "lane {lane} carried writes after the move: {before:?} -> {after:?}");
    }
    assert_eq!((a.status().link_ups, b.status().link_ups), ups, "the link stayed up");
    assert!(read_leg(&la) == read_leg(&lb), "both legs hold every write");
    wait("the status counts the frames the workers sent", || a.status().frames_sent_by_reactors > 0);
    drop(reactors);
    drop((ca, cb, a, b));
    let _ = std::fs::remove_dir_all(dir);
}

/// When the peer goes away, every lane fails at once: the workers report their lanes' failures
/// while (or after) the link takes itself down. Those reports belong to a link that is gone, and
/// the link's poller must come to rest through the outage (sleep until its next tick) rather
/// than count them as work for good.
#[test]
fn through_an_outage_the_link_of_lanes_on_reactors_comes_to_rest() {
    let (dir, control, (a, _), (b, _)) = reactor_legs("lanes-outage");
    let mut link = a.take_poller().unwrap();
    let mut reactors = Reactors::new();
    reactors.run(b.take_poller().unwrap());
    reactors.run_helpers(&a);
    reactors.run_helpers(&b);
    turn_until(&mut link, "three lanes, two on reactors of their own, at both legs", &mut || settled_on_reactors(&a, &b));
    // No new connection from now on; every lane breaks.
    control.cut();
    for _ in 0..3 {
        control.break_connection(0);
    }
    turn_until(&mut link, "A's link is down", &mut || a.status().lanes_up == 0);
    // Each worker notices by its next tick (10 ms) at the latest; the link must then rest.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut resting = 0;
    while resting < 20 {
        assert!(Instant::now() < deadline, "the link kept finding work with no lane up");
        link.poll(true);
        link.parking(true);
        let due = link.next_deadline();
        link.parking(false);
        resting = if due.is_some_and(|d| d > Instant::now()) { resting + 1 } else { 0 };
        std::thread::sleep(Duration::from_millis(1));
    }
    drop(reactors);
    drop((link, a, b));
    let _ = std::fs::remove_dir_all(dir);
}
