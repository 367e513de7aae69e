//! Reload end to end: the real target, its config file edited while a verifying workload runs.
//! Broken files change nothing and say where they are wrong; a dry run shows the difference and
//! changes nothing; SIGHUP applies it: a namespace is added (connected hosts see it without
//! reconnecting, with the notice), another removed (drained, then Invalid Namespace), the host's
//! preferred site moves (its paths turn Non-Optimized) and a listener is added, while the
//! untouched namespace serves every command.

use nvmetro_perf::load::{run_paths, PathIo, PathShared, Pattern, Workload};
use nvmetro_perf::{ConnectOptions, Host};
use nvmetro_proto::cmds;
use nvmetro_proto::nvme::Status;
use nvmetro_tests::{binary, TargetProcess, HOSTNQN, SUBNQN};
use std::collections::HashMap;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn config(host_site: u8, after: bool) -> String {
    let (extra_bdev, ns2, extra_listener) = if after {
        (
            "[[bdev]]\nname = \"fresh\"\nkind = \"malloc\"\nsize = \"8MiB\"\n",
            "[[subsystem.namespace]]\nnsid = 3\nbdev = \"fresh\"\n",
            "[[listener]]\naddress = \"127.0.0.1:{PORT2}\"\n",
        )
    } else {
        ("[[bdev]]\nname = \"gone\"\nkind = \"malloc\"\nsize = \"8MiB\"\n", "[[subsystem.namespace]]\nnsid = 2\nbdev = \"gone\"\n", "")
    };
    format!(
        r#"[target]
cores = [0]
site = 1
socket = "{{DIR}}/mgmt.sock"

[[host]]
nqn = "{HOSTNQN}"
site = {host_site}

[[bdev]]
name = "keep"
kind = "malloc"
size = "16MiB"

{extra_bdev}
[[subsystem]]
nqn = "{SUBNQN}"
allowed_hosts = ["{HOSTNQN}"]

[[subsystem.namespace]]
nsid = 1
bdev = "keep"

{ns2}
[[listener]]
address = "127.0.0.1:{{PORT}}"
{extra_listener}"#
    )
}

/// Writes `text` as the running target's config file (placeholders filled as at start).
fn rewrite(t: &TargetProcess, text: &str) {
    let text = text
        .replace("{PORT}", &t.addr.port().to_string())
        .replace("{PORT2}", &t.addr2.port().to_string())
        .replace("{DIR}", &t.scratch().display().to_string());
    std::fs::write(&t.config_path, text).unwrap();
}

/// `nvmetro --config FILE reload [--dry-run]`: (success, stdout + stderr).
fn cli_reload(t: &TargetProcess, dry_run: bool) -> (bool, String) {
    let mut c = Command::new(binary("nvmetro"));
    c.arg("--config").arg(&t.config_path).arg("reload");
    if dry_run {
        c.arg("--dry-run");
    }
    let out = c.output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

fn active_namespaces(h: &mut Host) -> Vec<u32> {
    let (_, data) = h.admin_cmd("Identify active NS list", cmds::identify(0, 2, 0), vec![], 4096).unwrap();
    data.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).take_while(|n| *n != 0).collect()
}

fn ana_state_of_group1(h: &mut Host) -> u8 {
    let log = h.log_page(0x0c, 16 + 32 + 8).unwrap();
    log[32]
}

fn opts(addr: std::net::SocketAddr) -> ConnectOptions {
    let mut o = ConnectOptions::new(addr, SUBNQN);
    o.hostnqn = HOSTNQN.into();
    o
}

#[test]
fn reload_under_a_verifying_workload_changes_only_what_differs() {
    let t = TargetProcess::start(&config(1, false));
    let mut h = Host::connect(&opts(t.addr)).unwrap();
    h.admin_cmd("Set Features (async event config)", cmds::set_features(0, 0x0b, (1 << 8) | (1 << 11)), vec![], 0).unwrap();
    let aer = h.admin.submit(cmds::async_event_request(0), vec![], 0);
    h.admin.flush().unwrap();
    assert_eq!(active_namespaces(&mut h), vec![1, 2]);
    assert_eq!(ana_state_of_group1(&mut h), 1, "the host's own site: Optimized");
    h.write(2, 0, vec![0x22; 512], 512).unwrap();

    // The untouched namespace runs a verifying workload through everything below.
    let worker = {
        let load = Host::connect(&opts(t.addr)).unwrap();
        std::thread::spawn(move || {
            let (_admin, mut io) = load.into_parts();
            let mut paths = vec![PathIo::new(Arc::new(PathShared::new("site1", 1)), io.pop())];
            let wl = Workload {
                nsid: 1,
                pattern: Pattern::Random,
                read_pct: 30,
                block_size: 4096,
                qd: 4,
                duration: Duration::from_secs(5),
                ramp: Duration::ZERO,
                max_ios: None,
                rate: None,
                verify: true,
                region: (0, 8192),
                seed: 5,
            };
            let r = run_paths(&mut paths, &wl, 512, &mut HashMap::new(), 0, None).unwrap();
            (r, _admin)
        })
    };
    std::thread::sleep(Duration::from_millis(500));

    // Broken files: each refused with the file, line and key; nothing changes.
    let good = config(2, true);
    let broken = [
        ("syntax", good.replacen("[[bdev]]", "[[bdev]", 1), "target.toml:"),
        ("unknown key", good.replacen("kind = \"malloc\"", "kind = \"malloc\"\ncolour = \"blue\"", 1), "colour"),
        ("duplicate NSID", good.replace("nsid = 3", "nsid = 1"), "nsid"),
        ("missing bdev", good.replace("bdev = \"fresh\"", "bdev = \"nope\""), "nope"),
    ];
    for (what, text, says) in broken {
        rewrite(&t, &text);
        let (ok, out) = cli_reload(&t, false);
        assert!(!ok, "{what}: a broken file must be refused:\n{out}");
        assert!(out.contains("target.toml:") && out.contains(says), "{what}: the error names file, line and key:\n{out}");
        assert_eq!(active_namespaces(&mut h), vec![1, 2], "{what}: nothing changed");
    }
    t.signal("HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(active_namespaces(&mut h), vec![1, 2], "SIGHUP with a broken file changes nothing");
    assert!(t.log().contains("reload refused"), "and says so in the log:\n{}", t.log());

    // A dry run shows the difference and changes nothing.
    rewrite(&t, &good);
    let (ok, out) = cli_reload(&t, true);
    assert!(ok, "{out}");
    for want in ["add bdev fresh", "add NSID 3", "remove NSID 2", "home site 1 -> 2", "add listener", "remove bdev gone"] {
        assert!(out.contains(want), "dry run lists {want:?}:\n{out}");
    }
    assert_eq!(active_namespaces(&mut h), vec![1, 2], "a dry run changes nothing");
    assert!(std::net::TcpStream::connect(t.addr2).is_err(), "no new listener yet");

    // Apply with SIGHUP.
    t.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    while active_namespaces(&mut h) != vec![1, 3] {
        assert!(Instant::now() < deadline, "the new namespace never appeared:\n{}", t.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    // The connected host was told, and sees the change on its existing connection.
    let (cqe, _) = h.admin.wait_for(aer).unwrap();
    assert!([0x04_0002, 0x0c_0302].contains(&cqe.result), "a namespace or ANA change notice: {:#x}", cqe.result);
    let changed = h.log_page(0x04, 16).unwrap();
    let changed: Vec<u32> = changed.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).filter(|n| *n != 0).collect();
    assert_eq!(changed, vec![2, 3], "the Changed Namespace List names the removed and the added namespace");
    h.write(3, 7, vec![0x33; 512], 512).unwrap();
    assert_eq!(h.read(3, 7, 1, 512).unwrap(), vec![0x33; 512]);
    let status = h.io_cmd(0, cmds::read(0, 2, 0, 1), vec![], 512).unwrap().0.status();
    assert_eq!(status, Status::INVALID_NAMESPACE, "the removed namespace is gone");
    assert_eq!(ana_state_of_group1(&mut h), 2, "the host now belongs to site 2: Non-Optimized here");
    let mut h2 = Host::connect(&opts(t.addr2)).expect("the added listener serves");
    assert_eq!(active_namespaces(&mut h2), vec![1, 3]);

    let (r, _admin) = worker.join().unwrap();
    assert_eq!(r.errors, 0, "no I/O error on the untouched namespace: {:?}", r.first_error);
    assert!(r.mismatches.is_empty());
    assert!(r.ios() > 100, "the workload ran through the reloads: {}", r.ios());
    // Reloading the same file again changes nothing.
    let (ok, out) = cli_reload(&t, false);
    assert!(ok && out.contains("nothing to change"), "{out}");

    // Removing the listener again ends its connections only.
    rewrite(&t, &good.replace("[[listener]]\naddress = \"127.0.0.1:{PORT2}\"\n", ""));
    let (ok, out) = cli_reload(&t, false);
    assert!(ok && out.contains("remove listener"), "{out}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while h2.read(1, 0, 1, 512).is_ok() {
        assert!(Instant::now() < deadline, "the removed listener's connection still serves");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(std::net::TcpStream::connect(t.addr2).is_err(), "the removed listener no longer accepts");
    h.read(1, 0, 1, 512).expect("the other listener's host is untouched");
}

#[test]
fn a_dry_run_previews_the_file_it_is_given_and_applies_only_the_running_one() {
    let t = TargetProcess::start(&config(1, false));
    let candidate = t.scratch().join("candidate.toml");
    let write = |text: &str| {
        let text = text
            .replace("{PORT}", &t.addr.port().to_string())
            .replace("{PORT2}", &t.addr2.port().to_string())
            .replace("{DIR}", &t.scratch().display().to_string());
        std::fs::write(&candidate, text).unwrap();
    };
    let cli = |dry_run: bool| {
        let mut c = Command::new(binary("nvmetro"));
        c.arg("--config").arg(&candidate).arg("reload");
        if dry_run {
            c.arg("--dry-run");
        }
        let out = c.output().unwrap();
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    // An edited copy: previewed, nothing changes.
    write(&config(1, true));
    let (ok, out) = cli(true);
    assert!(ok && out.contains("would change") && out.contains("fresh"), "{out}");
    let (ok, out) = cli_reload(&t, true);
    assert!(ok && out.contains("nothing to change"), "the running target is as it was: {out}");
    // An invalid copy: the error names the copy, its line and key.
    write(&config(1, true).replace("size = \"8MiB\"", "size = \"8 parsecs\""));
    let (ok, out) = cli(true);
    assert!(!ok && out.contains("candidate.toml:") && out.contains("bdev.size"), "{out}");
    // Applying is only from the file the target runs with.
    write(&config(1, true));
    let (ok, out) = cli(false);
    assert!(!ok && out.contains("is not the file the target runs with"), "{out}");
}
