//! Helpers of the DR end-to-end tests (`tests/dr.rs`, `tests/dr_ops.rs`): the production and
//! DR sites' configs, a host's writes, the dependent-pairs workload and its crash-consistency
//! check, and waiting until the DR image equals the production site's.

use crate::{rpc, TargetProcess, HOSTNQN};
use nvmetro_perf::{ConnectOptions, Host};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const NQN: &str = "nqn.2026-12.io.nvmetro:dr";

pub const SECRET: &str = "dr-stream-secret-0123456789";

/// Each member: 4 MiB of 512-byte blocks.
pub const MEMBER: u64 = 4 << 20;

pub const STREAMS: u64 = 4;

/// Data slots per stream on namespace 1 and commit slots per stream on namespace 2.
pub const DATA_SLOTS: u64 = 1000;

pub const COMMIT_SLOTS: u64 = 8;

pub fn dr_site_config() -> String {
    crate::dr_site_toml(&[("dr0", MEMBER), ("dr1", MEMBER)], SECRET)
}

/// The DR site with its members given to hosts (Inaccessible until promoted).
pub fn dr_site_serving_config() -> String {
    dr_site_config().replace(
        "[[subsystem.namespace]]\nnsid = 1\nbdev = \"ram\"",
        "[[subsystem.namespace]]\nnsid = 1\nbdev = \"dr0\"\n\n[[subsystem.namespace]]\nnsid = 2\nbdev = \"dr1\"",
    )
}

pub fn production_config(dr: std::net::SocketAddr, extra: &str) -> String {
    format!(
        r#"
[target]
cores = [0]
socket = "{{DIR}}/mgmt.sock"

[[bdev]]
name = "p0"
kind = "file"
path = "{{DIR}}/p0.img"
size = "{MEMBER}"

[[bdev]]
name = "p1"
kind = "file"
path = "{{DIR}}/p1.img"
size = "{MEMBER}"

[[subsystem]]
nqn = "{NQN}"
allow_any_host = true

[[subsystem.namespace]]
nsid = 1
bdev = "p0"

[[subsystem.namespace]]
nsid = 2
bdev = "p1"

[[listener]]
address = "127.0.0.1:{{PORT}}"

[[dr_group]]
name = "g1"
members = ["p0", "p1"]
dr_site = "{dr}"
state = "{{DIR}}/g1.dr"
secret = "{SECRET}"
{extra}
"#
    )
}

pub fn host(t: &TargetProcess) -> Host {
    host_of(t, NQN)
}

pub fn host_of(t: &TargetProcess, nqn: &str) -> Host {
    let mut o = ConnectOptions::new(t.addr, nqn);
    o.hostnqn = HOSTNQN.into();
    o.kato_ms = 0;
    o.timeout = Duration::from_secs(20);
    Host::connect(&o).expect("connect to the production site")
}

pub fn write(h: &mut Host, nsid: u32, lba: u64, data: Vec<u8>) -> bool {
    let blocks = (data.len() / 512) as u32;
    match h.io_cmd(0, nvmetro_proto::cmds::write(0, nsid, lba, blocks), data, 0) {
        Ok((c, _)) => c.status().is_success(),
        Err(_) => false,
    }
}

/// A block holding (stream, n, extra) repeated.
pub fn record(stream: u64, n: u64, extra: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(512);
    while b.len() < 512 {
        b.extend_from_slice(&(stream + 1).to_le_bytes());
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&extra.to_le_bytes());
        b.extend_from_slice(&0x4e564d4554524f21u64.to_le_bytes());
    }
    b
}

/// (stream, n, extra) of a block, or None for a block never written (or torn).
pub fn parse(b: &[u8]) -> Option<(u64, u64, u64)> {
    let word = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    (word(0) != 0 && word(3) == 0x4e564d4554524f21 && b[..32].repeat(16) == b[..512]).then(|| (word(0) - 1, word(1), word(2)))
}

pub fn data_lba(stream: u64, n: u64) -> u64 {
    stream * DATA_SLOTS + n % DATA_SLOTS
}

/// Streams of dependent pairs until `stop`: returns how many pairs completed, per stream.
pub fn dependent_pairs(t: &TargetProcess, stop: Arc<AtomicBool>, done: Arc<AtomicU64>) -> Vec<std::thread::JoinHandle<u64>> {
    (0..STREAMS)
        .map(|s| {
            let mut h = host(t);
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let lba = data_lba(s, n);
                    if !write(&mut h, 1, lba, record(s, n, lba)) {
                        break;
                    }
                    // Only after the data completed: the commit depends on it.
                    if !write(&mut h, 2, s * COMMIT_SLOTS + n % COMMIT_SLOTS, record(s, n, lba)) {
                        break;
                    }
                    n += 1;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                n
            })
        })
        .collect()
}

/// Checks an image of the group: every commit record's data is there (the same or a later
/// write of its slot). Returns how many commits the image holds.
pub fn check_image(data: &[u8], commits: &[u8], what: &str) -> usize {
    let mut found = 0;
    for (i, c) in commits.chunks(512).enumerate().take((STREAMS * COMMIT_SLOTS) as usize) {
        let Some((s, n, lba)) = parse(c) else { continue };
        assert_eq!(s, i as u64 / COMMIT_SLOTS, "{what}: commit slot {i} holds stream {s}'s record");
        assert_eq!(lba, data_lba(s, n), "{what}: commit {s}/{n} names the wrong block");
        let block = &data[lba as usize * 512..lba as usize * 512 + 512];
        match parse(block) {
            Some((ds, dn, _)) if ds == s && dn >= n => found += 1,
            other => panic!("{what}: commit {s}/{n} is in the DR image but its data block {lba} holds {other:?}"),
        }
    }
    found
}

pub fn dr_image(dr: &TargetProcess, what: &str) -> usize {
    let data = std::fs::read(dr.scratch().join("dr0.img")).expect("dr0");
    let commits = std::fs::read(dr.scratch().join("dr1.img")).expect("dr1");
    check_image(&data, &commits, what)
}

pub fn dr_status(t: &TargetProcess) -> serde_json::Value {
    rpc(t, "dr_status", serde_json::json!({})).expect("dr_status")
}

pub fn consistent(dr: &TargetProcess) -> bool {
    dr_status(dr)["replicas"][0]["consistent"] == serde_json::Value::Bool(true)
}

/// Waits until the DR site holds everything the production site numbered, then compares the
/// members byte for byte.
pub fn wait_caught_up_and_compare(p: &TargetProcess, dr: &TargetProcess) {
    // The status is a snapshot (published every 100 ms): the images themselves decide.
    let differ = || {
        [("p0.img", "dr0.img"), ("p1.img", "dr1.img")].into_iter().find_map(|(a, b)| {
            let (x, y) = (std::fs::read(p.scratch().join(a)).expect(a), std::fs::read(dr.scratch().join(b)).expect(b));
            let first = x.iter().zip(&y).position(|(p, q)| p != q)?;
            Some(format!("{a} and the DR site's {b} differ, first at byte {first}: {} vs {}", x[first], y[first]))
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let g = &dr_status(p)["groups"][0];
        let caught_up = consistent(dr) && g["connected"] == true && g["behind_writes"] == 0 && g["copy"].is_null();
        let why = if caught_up { differ() } else { Some(format!("not caught up: {g}")) };
        match why {
            None => return,
            Some(why) => assert!(std::time::Instant::now() < deadline, "the DR site did not catch up: {why}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A member read whole through NVMe/TCP.
pub fn read_member(h: &mut Host, nsid: u32) -> Vec<u8> {
    let mut image = Vec::new();
    for lba in (0..MEMBER / 512).step_by(256) {
        let (c, data) = h.io_cmd(0, nvmetro_proto::cmds::read(0, nsid, lba, 256), Vec::new(), 256 * 512).expect("read");
        assert!(c.status().is_success(), "read nsid {nsid} lba {lba}: {:?}", c.status());
        image.extend_from_slice(&data);
    }
    image
}

pub fn promote(dr: &TargetProcess, force: bool) -> Result<serde_json::Value, String> {
    rpc(dr, "dr_promote", serde_json::json!({"group": "g1", "force": force}))
}

pub fn dr_test(dr: &TargetProcess, action: &str) -> Result<serde_json::Value, String> {
    rpc(dr, "dr_test", serde_json::json!({"group": "g1", "action": action}))
}

/// `len` bytes of `byte` written at `lba` of both production namespaces, in 64 KiB commands.
pub fn fill(h: &mut Host, lba: u64, len: u64, byte: u8) {
    for nsid in [1, 2] {
        for at in (0..len).step_by(64 << 10) {
            assert!(write(h, nsid, lba + at / 512, vec![byte; (64 << 10).min(len - at) as usize]), "nsid {nsid} at {at}");
        }
    }
}

/// Writes `text` (its placeholders filled for `t`) as `t`'s config file and reloads it.
pub fn reload_with(t: &TargetProcess, text: &str) -> Result<serde_json::Value, String> {
    let text = text
        .replace("{PORT}", &t.addr.port().to_string())
        .replace("{PORT2}", &t.addr2.port().to_string())
        .replace("{DIR}", &t.scratch().display().to_string());
    std::fs::write(&t.config_path, text).expect("config");
    rpc(t, "nvmetro_reload", serde_json::json!({}))
}

/// Replaces the DR tables of `t`'s config file with `tables` (placeholders already filled).
pub fn with_dr_tables(t: &TargetProcess, tables: &str) {
    let text = std::fs::read_to_string(&t.config_path).expect("config");
    let cut = ["[[dr_group]]", "[[dr_replica]]"].iter().filter_map(|k| text.find(k)).min().unwrap_or(text.len());
    std::fs::write(&t.config_path, format!("{}{tables}", &text[..cut])).expect("config");
}

/// `config` with the first member `base` (and its namespace) behind an error bdev `name`
/// starting with `rules`.
pub fn behind_error_bdev(config: String, base: &str, name: &str, rules: Option<&str>) -> String {
    let rules = rules.map(|r| format!("rules = '{r}'\n")).unwrap_or_default();
    config
        .replace(&format!("members = [\"{base}\""), &format!("members = [\"{name}\""))
        .replace(&format!("bdev = \"{base}\""), &format!("bdev = \"{name}\""))
        .replace("[[subsystem]]", &format!("[[bdev]]\nname = \"{name}\"\nkind = \"error\"\nbase = \"{base}\"\n{rules}\n[[subsystem]]"))
}
