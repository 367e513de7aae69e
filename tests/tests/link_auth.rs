//! The replication link admits only its authenticated peer: strangers connecting to the link port
//! in a loop (closing at once, sending garbage, replaying a recorded handshake of the real peer,
//! proving a wrong secret, staying silent) are refused and logged, and neither site notices: no
//! failed host I/O at either, no link down.

use nvmetro_bdev::mirror::auth::{Handshake, Side, HANDSHAKE_LEN};
use nvmetro_perf::load::{self, PathIo, Workload};
use nvmetro_perf::{ConnectOptions, Host};
use nvmetro_tests::{free_port, TargetProcess, HOSTNQN};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NQN: &str = "nqn.2026-11.io.nvmetro:link-auth";
const SECRET: &str = "the sites' shared link secret";

fn site(preferred: bool, link: u16) -> String {
    nvmetro_tests::mirror_site_config(NQN, preferred, link, "", &format!("secret = \"{SECRET}\""))
}

fn wait_serving(t: &TargetProcess) -> Host {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut o = ConnectOptions::new(t.addr, NQN);
        o.hostnqn = HOSTNQN.into();
        if let Ok(mut h) = Host::connect(&o) {
            if h.io_cmd(0, nvmetro_proto::cmds::read(0, 1, 0, 1), vec![], 512).is_ok_and(|(c, _)| c.status().is_success()) {
                return h;
            }
        }
        assert!(Instant::now() < deadline, "site {} never started serving:\n{}", t.addr, t.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Relays B's link connection to A and records the first bytes B sent: a real handshake.
fn recording_relay(to: SocketAddr) -> (u16, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let rec = recorded.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let (Ok(client), Ok(server)) = (client, TcpStream::connect(to)) else { continue };
            for (from, into, record) in [(&client, &server, true), (&server, &client, false)] {
                let (mut r, mut w) = (from.try_clone().unwrap(), into.try_clone().unwrap());
                let rec = rec.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n) = r.read(&mut buf) {
                        if n == 0 || w.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        let mut rec = rec.lock().unwrap();
                        if record && rec.len() < HANDSHAKE_LEN {
                            let take = (HANDSHAKE_LEN - rec.len()).min(n);
                            rec.extend_from_slice(&buf[..take]);
                        }
                    }
                    let _ = w.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    (port, recorded)
}

fn workload(region: (u64, u64)) -> Workload {
    Workload { region, ..nvmetro_tests::mixed_workload(5, 4, true, 7) }
}

/// One stranger's attempt of each kind, in turn, until `until` and each kind was tried at least
/// twice (a loaded machine makes each attempt slower); returns how many were made.
fn strangers(link: SocketAddr, replay: Vec<u8>, until: Instant) -> u64 {
    let mut attempts = 0;
    let mut kind = 0u32;
    while Instant::now() < until || attempts < 10 {
        let Ok(mut s) = TcpStream::connect(link) else { continue };
        attempts += 1;
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        match kind % 5 {
            0 => {}                               // connect and close
            1 => drop(s.write_all(&[0x5a; 300])), // garbage
            2 => drop(s.write_all(&replay)),      // the real peer's old handshake
            3 => {
                // Speaks the protocol, but with the wrong secret.
                let mut h = Handshake::new(b"a guess", Side::Dialer, [kind as u8; 32]);
                let _ = s.write_all(&h.take_output());
                let mut buf = [0u8; 128];
                if let Ok(n) = s.read(&mut buf) {
                    if h.on_bytes(&buf[..n]).is_ok() {
                        let _ = s.write_all(&h.take_output());
                    }
                }
            }
            _ => std::thread::sleep(Duration::from_millis(20)), // silent for a while, then gone
        }
        if !kind.is_multiple_of(5) && kind % 5 != 4 {
            // The target closes a refused connection: wait for it (read returns 0 or an error).
            let mut buf = [0u8; 256];
            while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
        }
        kind += 1;
    }
    attempts
}

#[test]
fn strangers_on_the_link_port_never_disturb_the_live_link() {
    let link = free_port();
    let a = TargetProcess::start(&site(true, link));
    let a_link: SocketAddr = format!("127.0.0.1:{link}").parse().unwrap();
    let (relay, recorded) = recording_relay(a_link);
    let b = TargetProcess::start(&site(false, relay));
    let (ha, hb) = (wait_serving(&a), wait_serving(&b));
    let replay = recorded.lock().unwrap().clone();
    assert_eq!(replay.len(), HANDSHAKE_LEN, "the relay recorded B's handshake");
    let links_before = a.log().matches("replication link up").count();

    let until = Instant::now() + Duration::from_secs(4);
    // More silent connections than may wait in their handshake at once, held meanwhile.
    let silent: Vec<TcpStream> = (0..12).filter_map(|_| TcpStream::connect(a_link).ok()).collect();
    let stranger = std::thread::spawn(move || strangers(a_link, replay, until));
    let at = |h: Host, region| {
        std::thread::spawn(move || {
            let (_admin, mut io) = h.into_parts();
            let mut path = PathIo::single(io.remove(0));
            load::run(&mut path, &workload(region), 512, &mut HashMap::new()).unwrap()
        })
    };
    let (ra, rb) = (at(ha, (0, 8192)), at(hb, (8192, 8192)));
    let (ra, rb, attempts) = (ra.join().unwrap(), rb.join().unwrap(), stranger.join().unwrap());
    drop(silent);
    println!(
        "{attempts} stranger connections; site A {} I/Os, {} errors; site B {} I/Os, {} errors",
        ra.ios(),
        ra.errors,
        rb.ios(),
        rb.errors
    );
    assert_eq!((ra.errors, rb.errors), (0, 0), "no host I/O failed: {:?} / {:?}", ra.first_error, rb.first_error);
    assert!(ra.ios() > 0 && rb.ios() > 0);
    assert!(ra.mismatches.is_empty() && rb.mismatches.is_empty(), "verify found mismatches");
    let log = a.log();
    assert_eq!(log.matches("replication link up").count(), links_before, "no stranger became the link:\n{log}");
    assert!(!log.contains("replication link down"), "the live link never went down:\n{log}");
    assert!(log.contains("replication connection refused"), "refusals are logged:\n{log}");
    assert!(!b.log().contains("replication link down"), "B saw no link loss:\n{}", b.log());
}
