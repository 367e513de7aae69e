//! Helpers for end-to-end tests: start the real `nvmetro-tgt` with a config on free ports,
//! wait until it listens, and kill it when the test ends.
//!
//! The binaries must be built first (`cargo build --workspace --bins`, which the README's test
//! command does); they are looked up next to the test executable.

pub mod stamped;

pub mod dr;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Path of a workspace binary built in the same profile as the running test.
pub fn binary(name: &str) -> PathBuf {
    let mut dir = std::env::current_exe().expect("test executable path");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --workspace --bins` first", p.display());
    p
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port").local_addr().expect("local addr").port()
}

pub const SUBNQN: &str = "nqn.2026-11.io.nvmetro:e2e";
pub const HOSTNQN: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-6e766d657472";

/// A running target process.
pub struct TargetProcess {
    child: Child,
    pub addr: SocketAddr,
    /// The address `{PORT2}` stood for, if the config used it.
    pub addr2: SocketAddr,
    pub config_path: PathBuf,
    dir: PathBuf,
}

impl TargetProcess {
    /// Starts the target with `config` in which `{PORT}` stands for a free port and `{DIR}` for a
    /// scratch directory of this test.
    pub fn start(config: &str) -> TargetProcess {
        Self::start_on(config, free_port())
    }

    /// As [`TargetProcess::start`], with `{PORT}` standing for `port`.
    pub fn start_on(config: &str, port: u16) -> TargetProcess {
        let port2 = free_port();
        let dir = std::env::temp_dir().join(format!("nvmetro-e2e-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let text =
            config.replace("{PORT}", &port.to_string()).replace("{PORT2}", &port2.to_string()).replace("{DIR}", &dir.display().to_string());
        let config_path = dir.join("target.toml");
        std::fs::write(&config_path, text).expect("write config");
        let child = spawn(&config_path, &dir);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let addr2: SocketAddr = format!("127.0.0.1:{port2}").parse().expect("addr");
        let mut t = TargetProcess { child, addr, addr2, config_path, dir };
        t.wait_listening();
        t
    }

    /// Starts a target on `config` whose `{DIR}` is `dir` (another process's scratch directory)
    /// and expects it to refuse to start: returns what it logged. Panics if it serves instead.
    pub fn start_expecting_refusal(config: &str, dir: &std::path::Path) -> String {
        let port = free_port();
        let own = std::env::temp_dir().join(format!("nvmetro-e2e-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&own).expect("scratch dir");
        let text = config
            .replace("{PORT}", &port.to_string())
            .replace("{PORT2}", &free_port().to_string())
            .replace("{DIR}", &dir.display().to_string());
        let config_path = own.join("target.toml");
        std::fs::write(&config_path, text).expect("write config");
        let mut child = spawn(&config_path, &own);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let deadline = Instant::now() + Duration::from_secs(20);
        let status = loop {
            if let Ok(Some(status)) = child.try_wait() {
                break status;
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                let _ = (child.kill(), child.wait());
                panic!("the second target started serving: {}", std::fs::read_to_string(own.join("target.log")).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "the second target neither served nor exited");
        };
        assert!(!status.success(), "a refused start exits with an error");
        let log = std::fs::read_to_string(own.join("target.log")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(own);
        log
    }

    fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("nvmetro-tgt exited with {status}: {}", self.stderr());
            }
            assert!(Instant::now() < deadline, "nvmetro-tgt did not listen on {}", self.addr);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the process again with the same config, data and port (after [`TargetProcess::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn(&self.config_path, &self.dir);
        self.wait_listening();
    }

    /// SIGKILL, as a site dies.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as an operator stops a site, and waits until it has exited.
    pub fn terminate(&mut self) {
        let pid = self.child.id().to_string();
        let sent = std::process::Command::new("kill").args(["-TERM", &pid]).status().is_ok_and(|s| s.success());
        assert!(sent, "SIGTERM to nvmetro-tgt {pid}");
        let _ = self.child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills the process and returns what it logged.
    pub fn stderr(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(self.dir.join("target.log")).unwrap_or_default()
    }

    /// What the process has logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("target.log")).unwrap_or_default()
    }

    pub fn scratch(&self) -> &PathBuf {
        &self.dir
    }

    /// Sends a signal (e.g. "HUP") to the target process.
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status().is_ok_and(|s| s.success());
        assert!(ok, "kill -{name} failed");
    }
}

/// Increments the counter in the first 8 bytes of block `lba` (NSID 1, 512-byte blocks) `times`
/// times with a read and a fused Compare+Write, as VMFS takes its locks; returns how many
/// Compare+Writes succeeded. A failed compare must fail its write too.
pub fn caw_increment(q: &mut nvmetro_perf::Queue, lba: u64, times: usize) -> u64 {
    use nvmetro_proto::{cmds, nvme::Status};
    let mut won = 0;
    for _ in 0..times {
        let (_, cur) = q.execute(cmds::read(0, 1, lba, 1), vec![], 512).expect("read the counter");
        let mut next = cur.clone();
        let v = u64::from_le_bytes(cur[..8].try_into().expect("8 bytes")) + 1;
        next[..8].copy_from_slice(&v.to_le_bytes());
        let (cmp, wr) = cmds::compare_and_write(0, 0, 1, lba, 1);
        let c1 = q.submit(cmp, cur, 0);
        let c2 = q.submit(wr, next, 0);
        q.flush().expect("send");
        let s1 = q.wait_for(c1).expect("compare completes").0.status();
        let s2 = q.wait_for(c2).expect("write completes").0.status();
        if s1.is_success() {
            assert!(s2.is_success(), "compare succeeded but its write failed: {s2}");
            won += 1;
        } else {
            assert_eq!((s1, s2), (Status::COMPARE_FAILURE, Status::FUSED_FAILED));
        }
    }
    won
}

/// A TCP proxy standing in for the inter-site link: it can be cut (open connections reset, new
/// ones refused) and restored.
pub struct Proxy {
    pub addr: SocketAddr,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Bytes are held while set: a silent link loss (no FIN, no RST), as when packets are lost.
    silent: std::sync::Arc<std::sync::atomic::AtomicBool>,
    live: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    pub fn start(to: SocketAddr) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let silent = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let live = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, l, q) = (cut.clone(), live.clone(), silent.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if c.load(Ordering::Acquire) {
                    continue; // dropped: the link is cut
                }
                let Ok(server) = TcpStream::connect(to) else { continue };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                for (from, into) in [(&client, &server), (&server, &client)] {
                    let (mut r, mut w) = (from.try_clone().expect("clone"), into.try_clone().expect("clone"));
                    let quiet = q.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = vec![0u8; 1 << 16];
                        while let Ok(n) = r.read(&mut buf) {
                            if n == 0 {
                                break;
                            }
                            // Silent: hold the bytes, as TCP does while packets are lost; they
                            // arrive if the link heals before either end gives up.
                            while quiet.load(Ordering::Acquire) {
                                std::thread::sleep(std::time::Duration::from_millis(5));
                            }
                            if w.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = w.shutdown(std::net::Shutdown::Both);
                    });
                }
                let mut live = l.lock().expect("proxy list");
                live.push(client);
                live.push(server);
            }
        });
        Proxy { addr, cut, silent, live }
    }

    /// Delivers nothing from now on, without closing anything: only heartbeats can tell.
    pub fn go_silent(&self) {
        self.silent.store(true, std::sync::atomic::Ordering::Release);
    }

    pub fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::Release);
        for s in self.live.lock().expect("proxy list").drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::Release);
        self.silent.store(false, std::sync::atomic::Ordering::Release);
    }
}

fn spawn(config_path: &std::path::Path, dir: &std::path::Path) -> Child {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("target.log")).expect("log file");
    Command::new(binary("nvmetro-tgt"))
        .arg("--config")
        .arg(config_path)
        .env("NVMETRO_LOG", "info")
        // tracing writes to stdout; panics go to stderr: both into the log.
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("spawn nvmetro-tgt")
}

impl Drop for TargetProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One site of a two-site mirror on 127.0.0.1 exporting `nqn` NSID 1 over a 32 MiB file leg:
/// the preferred site accepts the link on `link`, the secondary dials it. `target_extra` follows
/// `[target] cores` (more target keys, then whole sections); `mirror_extra` adds mirror keys.
pub fn mirror_site_config(nqn: &str, preferred: bool, link: u16, target_extra: &str, mirror_extra: &str) -> String {
    let (role, range) = if preferred {
        (format!("role = \"preferred\"\nlisten = \"127.0.0.1:{link}\""), "[1, 99]")
    } else {
        (format!("role = \"secondary\"\npeer = \"127.0.0.1:{link}\""), "[100, 199]")
    };
    format!(
        r#"
[target]
cores = [0]
{target_extra}

[[bdev]]
name = "leg"
kind = "file"
path = "{{DIR}}/leg.img"
size = "32MiB"
direct = false

[[bdev]]
name = "m"
kind = "mirror"
local = "leg"
{role}
metadata = "{{DIR}}/leg.meta"
region_size = "256KiB"
{mirror_extra}

[[subsystem]]
nqn = "{nqn}"
allow_any_host = true
cntlid_range = {range}

[[subsystem.namespace]]
nsid = 1
bdev = "m"

[[listener]]
address = "127.0.0.1:{{PORT}}"
"#
    )
}

/// The usual single-subsystem config: a malloc namespace (and a file one) for one allowed host.
pub fn basic_config(cores: &str) -> String {
    format!(
        r#"
[target]
cores = {cores}
poll_mode = "adaptive"

[[bdev]]
name = "ram"
kind = "malloc"
size = "64MiB"

[[bdev]]
name = "disk"
kind = "file"
path = "{{DIR}}/disk.img"
size = "16MiB"
block_size = 4096

[[subsystem]]
nqn = "{SUBNQN}"
allowed_hosts = ["{HOSTNQN}"]
cntlid_range = [10, 20]

[[subsystem.namespace]]
nsid = 1
bdev = "ram"

[[subsystem.namespace]]
nsid = 2
bdev = "disk"

[[listener]]
address = "127.0.0.1:{{PORT}}"
"#
    )
}

/// Options connecting the test host ([`HOSTNQN`]) to [`SUBNQN`] at `t`, the subsystem of
/// [`basic_config`].
pub fn basic_options(t: &TargetProcess) -> nvmetro_perf::ConnectOptions {
    let mut o = nvmetro_perf::ConnectOptions::new(t.addr, SUBNQN);
    o.hostnqn = HOSTNQN.into();
    o
}

/// A running `nvmetro-witness` on a free UDP port of 127.0.0.1, its state in a scratch dir.
pub struct WitnessProcess {
    child: Child,
    pub addr: SocketAddr,
    pub config_path: PathBuf,
    dir: PathBuf,
}

/// The secret the tests' witness and sites share.
pub const WITNESS_SECRET: &str = "e2e-metro-witness-secret";

impl WitnessProcess {
    pub fn start() -> WitnessProcess {
        let port = std::net::UdpSocket::bind("127.0.0.1:0").and_then(|s| s.local_addr()).expect("free udp port").port();
        let dir = std::env::temp_dir().join(format!("nvmetro-witness-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let config_path = dir.join("witness.toml");
        let text =
            format!("listen = \"127.0.0.1:{port}\"\nsecret = \"{WITNESS_SECRET}\"\nstate = \"{}\"\n", dir.join("state.json").display());
        std::fs::write(&config_path, text).expect("write witness config");
        let addr = format!("127.0.0.1:{port}").parse().expect("addr");
        let child = Self::spawn(&config_path, &dir);
        WitnessProcess { child, addr, config_path, dir }
    }

    fn spawn(config_path: &std::path::Path, dir: &std::path::Path) -> Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("witness.log")).expect("log file");
        Command::new(binary("nvmetro-witness"))
            .arg("--config")
            .arg(config_path)
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn nvmetro-witness")
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn restart(&mut self) {
        self.kill();
        self.child = Self::spawn(&self.config_path, &self.dir);
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("witness.log")).unwrap_or_default()
    }
}

impl Drop for WitnessProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One worker's queues to namespace 1 of `subnqn` on each of `addrs` (as host `hostnqn`), with
/// path monitors that follow ANA and reconnect: the multipath initiator's view of the paths.
pub fn connect_paths(
    addrs: &[SocketAddr],
    subnqn: &str,
    hostnqn: &str,
) -> (Vec<nvmetro_perf::load::PathIo>, Vec<nvmetro_perf::paths::PathMonitor>) {
    use nvmetro_perf::load::{PathIo, PathShared};
    use nvmetro_perf::paths::{ana_state, PathMonitor};
    let mut paths = Vec::new();
    let mut monitors = Vec::new();
    for (i, addr) in addrs.iter().enumerate() {
        let mut o = nvmetro_perf::ConnectOptions::new(*addr, subnqn);
        o.hostnqn = hostnqn.into();
        let h = nvmetro_perf::Host::connect(&o).expect("connect a path");
        let (mut admin, mut io) = h.into_parts();
        let shared = std::sync::Arc::new(PathShared::new(&format!("path{}", i + 1), 1));
        shared.ana.store(ana_state(&mut admin, 1).expect("ANA log"), std::sync::atomic::Ordering::Release);
        monitors.push(PathMonitor::start(shared.clone(), Some(admin), o, 1));
        paths.push(PathIo::new(shared, io.pop()));
    }
    (paths, monitors)
}

/// Random 4 KiB commands, 30 % reads, at `qd` over the first 4 MiB of NSID 1 for `secs`.
pub fn mixed_workload(secs: u64, qd: usize, verify: bool, seed: u64) -> nvmetro_perf::load::Workload {
    nvmetro_perf::load::Workload {
        nsid: 1,
        pattern: nvmetro_perf::load::Pattern::Random,
        read_pct: 30,
        block_size: 4096,
        qd,
        duration: Duration::from_secs(secs),
        ramp: Duration::ZERO,
        max_ios: None,
        rate: None,
        verify,
        region: (0, 8192),
        seed,
    }
}

/// The subsystem of the metro tests ([`metro`]).
pub const METRO_NQN: &str = "nqn.2026-11.io.nvmetro:metro-ha";
/// A host of site B (the test host, [`HOSTNQN`], belongs to site A).
pub const HOST_B: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-4000-8000-0000000000b2";

/// The config of metro site `n`: site 1 (preferred, the pre-elected survivor) listens for the
/// link on `link`; site 2 dials it. The test host belongs to site 1, [`HOST_B`] to site 2.
pub fn site(n: u8, link: u16, witness: SocketAddr, extra: &str) -> String {
    let target = format!(
        "site = {n}\nsocket = \"{{DIR}}/mgmt.sock\"\n\n[witness]\naddress = \"{witness}\"\nsecret = \"{WITNESS_SECRET}\"\n\n[[host]]\nnqn = \"{HOSTNQN}\"\nsite = 1\n\n[[host]]\nnqn = \"{HOST_B}\"\nsite = 2\n"
    );
    mirror_site_config(METRO_NQN, n == 1, link, &target, extra)
}

/// A metro: site A, site B and the witness, as separate processes.
pub struct Metro {
    pub a: TargetProcess,
    pub b: TargetProcess,
    pub w: WitnessProcess,
    /// Between B and A's link port, when the test cuts the link.
    pub proxy: Option<Proxy>,
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// One metro (three processes) at a time: on a 2-core machine several at once would starve the
/// sites' heartbeats and test the scheduler instead.
pub static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Starts a metro (`extra`: more mirror keys for both sites) and waits until both sites serve.
pub fn metro(with_proxy: bool, extra: &str) -> Metro {
    metro_with(with_proxy, extra, |c| c)
}

/// As [`metro`], with both sites' configs passed through `edit` (e.g. [`with_error_leg`]).
pub fn metro_with(with_proxy: bool, extra: &str, edit: fn(String) -> String) -> Metro {
    let guard = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let w = WitnessProcess::start();
    let link = free_port();
    let a = TargetProcess::start(&edit(site(1, link, w.addr, extra)));
    let proxy = with_proxy.then(|| Proxy::start(format!("127.0.0.1:{link}").parse().expect("addr")));
    let b_link = proxy.as_ref().map_or(link, |p| p.addr.port());
    let b = TargetProcess::start(&edit(site(2, b_link, w.addr, extra)));
    let m = Metro { a, b, w, proxy, _serial: guard };
    wait_until("both sites serve", Duration::from_secs(30), || serves(&m.a) == Some(true) && serves(&m.b) == Some(true));
    m
}

/// A controller of [`METRO_NQN`] at `t` for the test host (None: the site does not answer).
pub fn connect(t: &TargetProcess) -> Option<nvmetro_perf::Host> {
    let mut o = nvmetro_perf::ConnectOptions::new(t.addr, METRO_NQN);
    o.hostnqn = HOSTNQN.into();
    o.timeout = Duration::from_secs(3);
    nvmetro_perf::Host::connect(&o).ok()
}

/// Whether a write through `t` succeeds now (None: the site is down).
pub fn serves(t: &TargetProcess) -> Option<bool> {
    let mut h = connect(t)?;
    let (c, _) = h.io_cmd(0, nvmetro_proto::cmds::write(0, 1, 60_000, 1), vec![7; 512], 0).ok()?;
    Some(c.status().is_success())
}

/// Polls `cond` every 100 ms; panics after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A [`mirror_site_config`] whose mirror leg is the error bdev `flaky` over the file bdev `leg`
/// (faults are injected with [`rpc`] `bdev_error_inject`).
pub fn with_error_leg(config: String) -> String {
    config
        .replace("local = \"leg\"", "local = \"flaky\"")
        .replace("[[bdev]]\nname = \"m\"", "[[bdev]]\nname = \"flaky\"\nkind = \"error\"\nbase = \"leg\"\n\n[[bdev]]\nname = \"m\"")
}

/// What `nvmetro status` says of the mirror under the first namespace of the first subsystem
/// (the site's config has `socket = "{DIR}/mgmt.sock"`).
pub fn mirror_status(t: &TargetProcess) -> serde_json::Value {
    let st = rpc(t, "nvmetro_status", serde_json::json!({})).unwrap();
    st["subsystems"][0]["namespaces"][0]["mirror"].clone()
}

/// One JSON-RPC call on a site's management socket (`{DIR}/mgmt.sock`); the result, or the
/// error's message.
pub fn rpc(t: &TargetProcess, method: &str, params: serde_json::Value) -> Result<serde_json::Value, String> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(t.scratch().join("mgmt.sock")).expect("management socket");
    writeln!(s, "{}", serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})).expect("send");
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).expect("reply");
    let reply: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{method}: bad reply {line:?}: {e}"));
    match reply.get("error") {
        Some(e) => Err(e["message"].as_str().unwrap_or("?").to_string()),
        None => Ok(reply["result"].clone()),
    }
}

/// `nvmetro switchover m` at `t` (the metro mirror of [`site`]): (success, stdout + stderr).
pub fn switchover(t: &TargetProcess) -> (bool, String) {
    let out = Command::new(binary("nvmetro")).arg("--config").arg(&t.config_path).args(["switchover", "m"]).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// A DR site's config: replica `g1` over file bdevs `members` (name, size in bytes) at
/// `{DIR}/NAME.img`, listening on `{PORT2}` with `secret`; its subsystem
/// `nqn.2026-12.io.nvmetro:dr-site` serves a small malloc bdev `ram` as namespace 1.
pub fn dr_site_toml(members: &[(&str, u64)], secret: &str) -> String {
    let bdevs: String = members
        .iter()
        .map(|(name, size)| format!("[[bdev]]\nname = \"{name}\"\nkind = \"file\"\npath = \"{{DIR}}/{name}.img\"\nsize = \"{size}\"\n\n"))
        .collect();
    let names = members.iter().map(|(n, _)| format!("\"{n}\"")).collect::<Vec<_>>().join(", ");
    format!(
        "[target]\ncores = [0]\nsocket = \"{{DIR}}/mgmt.sock\"\n\n[[bdev]]\nname = \"ram\"\nkind = \"malloc\"\nsize = \"1MiB\"\n\n{bdevs}\
         [[subsystem]]\nnqn = \"nqn.2026-12.io.nvmetro:dr-site\"\nallow_any_host = true\n\n[[subsystem.namespace]]\nnsid = 1\nbdev = \"ram\"\n\n\
         [[listener]]\naddress = \"127.0.0.1:{{PORT}}\"\n\n[[dr_replica]]\nname = \"g1\"\nmembers = [{names}]\nlisten = \"127.0.0.1:{{PORT2}}\"\n\
         state = \"{{DIR}}/g1.applied\"\nsecret = \"{secret}\"\n"
    )
}
