//! Tests of parsing, validation and `--check` over whole config files (targets and the witness):
//! what each key means and that every error names its file, line and key.

use super::*;

const GOOD: &str = r#"
[target]
cores = [0, 1]
poll_mode = "busy"

[[bdev]]
name = "a"
kind = "malloc"
size = "64MiB"

[[bdev]]
name = "b"
kind = "file"
path = "/tmp/x"
block_size = 4096

[[subsystem]]
nqn = "nqn.2026-11.io.nvmetro:one"
allowed_hosts = ["nqn.2014-08.org.nvmexpress:uuid:1"]
cntlid_range = [1, 100]

[[subsystem.namespace]]
nsid = 1
bdev = "a"
nguid = "00112233445566778899aabbccddeeff"

[[subsystem.namespace]]
nsid = 2
bdev = "b"
ana_group = 2

[[listener]]
address = "127.0.0.1:4420"
ana_states = { "2" = "non-optimized" }
"#;

#[test]
fn good_config_parses() {
    let c = parse(GOOD, "good.toml").unwrap();
    assert_eq!(c.cores, vec![0, 1]);
    assert_eq!(c.poll_mode, PollMode::Busy);
    assert_eq!(c.bdevs[0].size, Some(64 << 20));
    let s = &c.subsystems[0];
    assert_eq!(s.namespaces[0].nguid[0..2], [0x00, 0x11]);
    assert_eq!(s.ana_groups, 2);
    assert!(s.host_allowed("nqn.2014-08.org.nvmexpress:uuid:1"));
    assert!(!s.host_allowed("nqn.2014-08.org.nvmexpress:uuid:2"));
    assert_eq!(c.listeners[0].ana_states.get(&2).map(String::as_str), Some("non-optimized"));
    // Derived IDs are stable and differ per namespace.
    assert_eq!(s.namespaces[1].nguid, derived_id("nqn.2026-11.io.nvmetro:one", 2));
    assert_ne!(derived_id("nqn.x:y", 1), derived_id("nqn.x:y", 2));
}

fn err(text: &str) -> ConfigError {
    parse(text, "bad.toml").unwrap_err()
}

#[test]
fn listener_transport_defaults_to_tcp_and_rdma_needs_the_feature() {
    let c = parse(GOOD, "good.toml").unwrap();
    assert_eq!(c.listeners[0].transport, Transport::Tcp);
    assert_eq!(c.check_transports(false), Ok(()));
    let rdma = GOOD.replace("address = \"127.0.0.1:4420\"", "address = \"127.0.0.1:4420\"\ntransport = \"rdma\"");
    let c = parse(&rdma, "r.toml").unwrap();
    assert_eq!(c.listeners[0].transport, Transport::Rdma);
    assert_eq!(c.check_transports(true), Ok(()));
    let e = c.check_transports(false).unwrap_err().to_string();
    assert!(e.contains("127.0.0.1:4420") && e.contains("`rdma` cargo feature"), "{e}");
    let bad = GOOD.replace("address = \"127.0.0.1:4420\"", "address = \"127.0.0.1:4420\"\ntransport = \"fc\"");
    let e = err(&bad).to_string();
    assert!(e.contains("listener.transport") && e.contains("`fc` is not a transport"), "{e}");
}

#[test]
fn transport_sizes_default_and_are_validated() {
    let c = parse(GOOD, "good.toml").unwrap();
    assert_eq!((c.in_capsule_data_size, c.max_h2c_data_size), (8192, 128 * 1024));
    let with = |keys: &str| GOOD.replace("poll_mode = \"busy\"", &format!("poll_mode = \"busy\"\n{keys}"));
    let c = parse(&with("in_capsule_data_size = \"4KiB\"\nmax_h2c_data_size = \"8KiB\""), "t.toml").unwrap();
    assert_eq!((c.in_capsule_data_size, c.max_h2c_data_size), (4096, 8192));
    assert_eq!(parse(&with("in_capsule_data_size = 0"), "t.toml").unwrap().in_capsule_data_size, 0);
    assert!(c.rdma_zero_copy, "zero copy is on unless turned off");
    assert!(!parse(&with("rdma_zero_copy = false"), "t.toml").unwrap().rdma_zero_copy);
    assert!(parse(&with("rdma_zero_copy = \"no\""), "t.toml").is_err());
    for (bad, key) in [
        ("in_capsule_data_size = 4100", "target.in_capsule_data_size"),
        ("in_capsule_data_size = \"1MiB\"", "target.in_capsule_data_size"),
        ("max_h2c_data_size = 2048", "target.max_h2c_data_size"),
        ("max_h2c_data_size = 4098", "target.max_h2c_data_size"),
    ] {
        let e = err(&with(bad));
        assert_eq!((e.key.as_str(), e.line), (key, 5), "{bad}: {e}");
    }
}

#[test]
fn errors_name_file_line_and_key() {
    let e = err(&GOOD.replace("poll_mode = \"busy\"", "poll_mode = \"busy\"\nspeed = 3"));
    assert_eq!((e.file.as_str(), e.line, e.key.as_str()), ("bad.toml", 5, "target.speed"), "{e}");

    let e = err(&GOOD.replace("nsid = 2", "nsid = 1"));
    assert_eq!(e.key, "subsystem.namespace.nsid");
    assert_eq!(e.line, 28, "{e}");
    assert!(e.to_string().starts_with("bad.toml:28: subsystem.namespace.nsid: NSID 1 is used twice"), "{e}");

    let e = err(&GOOD.replace("bdev = \"b\"", "bdev = \"missing\""));
    assert_eq!((e.key.as_str(), e.line), ("subsystem.namespace.bdev", 29));
    assert!(e.message.contains("no bdev named `missing`"));

    let e = err(&GOOD.replace("[[listener]]", "[[listener"));
    assert_eq!((e.line, e.key.as_str()), (32, "listener"), "{e}");

    let e = err(&GOOD.replace("64MiB", "lots"));
    assert!(e.message.contains("size"), "{e}");
    assert_eq!((e.line, e.key.as_str()), (9, "bdev.size"), "{e}");
    let e = err(&GOOD.replace("cntlid_range = [1, 100]", "cntlid_range = [100, 1]"));
    assert_eq!(e.key, "subsystem.cntlid_range");
    let e = err(&GOOD.replace("\"non-optimized\"", "\"fast\""));
    assert_eq!(e.key, "listener.ana_states");
    let e = err(&GOOD.replace("allowed_hosts = [\"nqn.2014-08.org.nvmexpress:uuid:1\"]", ""));
    assert_eq!(e.key, "subsystem.allowed_hosts");
    let e = err(&GOOD.replace("ana_group = 2", "ana_group = 3"));
    assert!(e.message.contains("group 2 is unused"), "{e}");
    let e = err(&GOOD.replace("127.0.0.1:4420", "localhost"));
    assert_eq!(e.key, "listener.address");
}

#[test]
fn default_and_examples_are_valid() {
    parse(DEFAULT_CONFIG, "default.toml").unwrap();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(dir.join("examples")).unwrap().map(|e| e.unwrap().path()).collect();
    files.extend(["site-a.toml", "site-b.toml"].map(|f| dir.join(f)));
    for p in files {
        load(&p).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn mirror_bdevs() {
    // The check test's mirror, without its [target] section and with paths in /tmp.
    let base =
        &MIRROR[MIRROR.find("[[bdev]]").unwrap()..].replace("{DIR}/data/leg.img", "/tmp/leg").replace("{DIR}/meta/m.meta", "/tmp/m.meta");
    let base = base.as_str();
    let c = parse(base, "m.toml").unwrap();
    let m = c.bdevs[1].mirror.as_ref().unwrap();
    assert!(m.preferred && m.site == 1 && m.region_shift == 20);
    let e = err(&base.replace("role = \"preferred\"", "role = \"secondary\""));
    assert_eq!(e.key, "bdev.peer");
    let e = err(&base.replace("kind = \"file\"", "kind = \"malloc\"").replace("path = \"/tmp/leg\"\n", ""));
    assert!(e.message.contains("must survive a restart"), "{e}");
    let e = err(&base.replace("bdev = \"m\"", "bdev = \"leg\""));
    assert!(e.message.contains("export the mirror"), "{e}");
}

#[test]
fn mirror_resync_latency_target() {
    let base =
        &MIRROR[MIRROR.find("[[bdev]]").unwrap()..].replace("{DIR}/data/leg.img", "/tmp/leg").replace("{DIR}/meta/m.meta", "/tmp/m.meta");
    let with = |v: &str| base.replace("role = \"preferred\"", &format!("role = \"preferred\"\nresync_latency_target = \"{v}\""));
    let target = |text: &str| parse(text, "m.toml").unwrap().bdevs[1].mirror.as_ref().unwrap().resync_latency_target;
    assert_eq!(target(base), ResyncLatencyTarget::Relative(125), "the default");
    assert_eq!(target(&with("150%")), ResyncLatencyTarget::Relative(150));
    assert_eq!(target(&with("2ms")), ResyncLatencyTarget::Absolute(2000));
    assert_eq!(target(&with("off")), ResyncLatencyTarget::Off);
    for bad in ["50%", "fast", "5us", "20s", "%", "18446744073709552s"] {
        let e = err(&with(bad));
        assert_eq!(e.key, "bdev.resync_latency_target", "{bad}: {e}");
        assert!(e.message.contains(bad) && e.message.contains("\"off\""), "{e}");
    }
}

#[test]
fn error_bdevs() {
    // The mirror's leg is an error bdev over the file bdev, defined after the mirror (order
    // does not matter, as for a mirror's `local`).
    let base = r#"
[[bdev]]
name = "disk"
kind = "file"
path = "/tmp/leg"
size = "64MiB"

[[bdev]]
name = "m"
kind = "mirror"
local = "flaky"
role = "preferred"
listen = "127.0.0.1:7700"
metadata = "/tmp/m.meta"

[[bdev]]
name = "flaky"
kind = "error"
base = "disk"
rules = '[{"op":"write","error":"nospace","after":3}]'

[[subsystem]]
nqn = "nqn.2026-11.io.nvmetro:m"
allow_any_host = true

[[subsystem.namespace]]
nsid = 1
bdev = "m"

[[listener]]
address = "127.0.0.1:4420"
"#;
    let c = parse(base, "e.toml").unwrap();
    let e = c.bdevs[2].error.as_ref().unwrap();
    assert_eq!((c.bdevs[2].kind, e.base.as_str()), (BdevKind::Error, "disk"));
    assert_eq!(nvmetro_bdev::error::parse_rules(e.rules.as_deref().unwrap()).unwrap().len(), 1);
    assert_eq!(c.bdevs[1].depends_on(), Some("flaky"));
    let order = c.open_order();
    let pos = |n: &str| order.iter().position(|&i| c.bdevs[i].name == n).unwrap();
    assert!(pos("disk") < pos("flaky") && pos("flaky") < pos("m"), "{order:?}");
    // No rules: every command passes. A single rule object is accepted too.
    assert_eq!(
        parse(&base.replace("rules = '[{\"op\":\"write\",\"error\":\"nospace\",\"after\":3}]'\n", ""), "e.toml").unwrap().bdevs[2]
            .error
            .as_ref()
            .unwrap()
            .rules,
        None
    );
    parse(&base.replace("'[{\"op\":\"write\",\"error\":\"nospace\",\"after\":3}]'", "'{\"error\":\"eio\",\"fraction\":0.5}'"), "e.toml")
        .unwrap();

    // Bad rules are refused with the rule's problem, at the rules' line.
    let rules = "'[{\"op\":\"write\",\"error\":\"nospace\",\"after\":3}]'";
    for (bad, says) in [
        ("'[{\"op\":\"write\"}]'", "injects nothing"),
        ("'{\"error\":\"bogus\"}'", "bad fault rule"),
        ("'{\"error\":\"eio\",\"fraction\":2}'", "fraction"),
        ("'not json'", "bad fault rule"),
        ("'{\"error\":\"eio\",\"colour\":\"red\"}'", "colour"),
    ] {
        let e = err(&base.replace(rules, bad));
        assert_eq!((e.key.as_str(), e.line), ("bdev.rules", 20), "{e}");
        assert!(e.message.contains(says), "{bad}: {e}");
        assert!(e.to_string().starts_with("bad.toml:20: bdev.rules: "), "{e}");
    }
    // The base must exist, not be the bdev itself, and not lead back to it.
    let e = err(&base.replace("base = \"disk\"", "base = \"nothere\""));
    assert_eq!((e.key.as_str(), e.line), ("bdev.base", 19), "{e}");
    assert!(e.message.contains("no bdev named `nothere`"), "{e}");
    let e = err(&base.replace("base = \"disk\"", "base = \"flaky\""));
    assert!(e.key == "bdev.base" && e.message.contains("itself"), "{e}");
    let e = err(&base.replace("base = \"disk\"", "base = \"m\""));
    assert!(e.key == "bdev.base" && e.message.contains("cycle"), "{e}");
    let e = err(&base.replace("base = \"disk\"\n", ""));
    assert_eq!((e.key.as_str(), e.line), ("bdev.base", 17), "{e}");
    // Keys that belong elsewhere.
    let e = err(&base.replace("base = \"disk\"", "base = \"disk\"\nsize = \"1MiB\""));
    assert_eq!(e.key, "bdev.size", "{e}");
    let e = err(&base.replace("base = \"disk\"", "base = \"disk\"\npath = \"/tmp/x\""));
    assert_eq!(e.key, "bdev.path", "{e}");
    let e = err(&base.replace("base = \"disk\"", "base = \"disk\"\nblock_size = 4096"));
    assert_eq!(e.key, "bdev.block_size", "{e}");
    let e = err(&base.replace("size = \"64MiB\"", "size = \"64MiB\"\nrules = '{\"error\":\"eio\"}'"));
    assert_eq!(e.key, "bdev", "{e}");
    assert!(e.message.contains("error bdevs"), "{e}");
    // A mirror leg over RAM is refused even behind an error bdev; the leg and the file under
    // it are the mirror's, not exportable on their own.
    let ram = base.replace("kind = \"file\"\npath = \"/tmp/leg\"", "kind = \"malloc\"");
    let e = err(&ram);
    assert_eq!(e.key, "bdev.local", "{e}");
    assert!(e.message.contains("an error bdev over a Malloc bdev") && e.message.contains("survive a restart"), "{e}");
    for leg in ["flaky", "disk"] {
        let e = err(&base.replace("bdev = \"m\"", &format!("bdev = \"{leg}\"")));
        assert!(e.message.contains("export the mirror"), "{leg}: {e}");
    }
    // An error bdev over a plain bdev can be exported itself.
    let plain = GOOD
        .replace("[[subsystem]]", "[[bdev]]\nname = \"e\"\nkind = \"error\"\nbase = \"a\"\n\n[[subsystem]]")
        .replace("bdev = \"b\"", "bdev = \"e\"");
    let c = parse(&plain, "p.toml").unwrap();
    assert_eq!(c.subsystems[0].namespaces[1].bdev, "e");
}

#[test]
fn host_sites() {
    let base = GOOD.replace("poll_mode = \"busy\"", "poll_mode = \"busy\"\nsite = 1")
        + "\n[[host]]\nnqn = \"nqn.2014-08.org.nvmexpress:uuid:1\"\nsite = 1\n\n[[host]]\nnqn = \"nqn.2014-08.org.nvmexpress:uuid:2\"\nsite = 2\n";
    let c = parse(&base, "h.toml").unwrap();
    assert!(!c.host_is_remote("nqn.2014-08.org.nvmexpress:uuid:1"));
    assert!(c.host_is_remote("nqn.2014-08.org.nvmexpress:uuid:2"));
    assert!(!c.host_is_remote("nqn.2014-08.org.nvmexpress:uuid:3"), "hosts without a site prefer every path alike");
    assert_eq!(err(&base.replacen("poll_mode = \"busy\"\nsite = 1", "poll_mode = \"busy\"", 1)).key, "target.site");
    assert_eq!(err(&base.replace("uuid:2", "uuid:1")).key, "host");
}

#[test]
fn si_and_iec_sizes_mean_what_they_say() {
    // SI: powers of 1000; "1TB" is not a TiB.
    assert_eq!(parse_size("1TB"), Some(1_000_000_000_000));
    assert_eq!(parse_size("1tb"), Some(1_000_000_000_000));
    assert_eq!(parse_size("500GB"), Some(500_000_000_000));
    assert_eq!(parse_size("4kB"), Some(4000));
    assert_eq!(parse_size("2MB"), Some(2_000_000));
    assert_eq!(parse_size("1PB"), Some(10u64.pow(15)));
    // IEC (and the bare letters, as dd reads them): powers of 1024.
    assert_eq!(parse_size("1TiB"), Some(1 << 40));
    assert_eq!(parse_size("1T"), Some(1 << 40));
    assert_eq!(parse_size("4KiB"), Some(4096));
    assert_eq!(parse_size("512MiB"), Some(512 << 20));
    assert_eq!(parse_size("1 GiB"), Some(1 << 30));
    assert_eq!(parse_size("1PiB"), Some(1 << 50));
    assert_eq!(parse_size("4096B"), Some(4096));
    // Fractions that come to whole bytes.
    assert_eq!(parse_size("1.5GiB"), Some(3 << 29));
    assert_eq!(parse_size("1.5TB"), Some(1_500_000_000_000));
    assert_eq!(parse_size("0.5k"), Some(512));
    assert_eq!(parse_size("1.3B"), None);
    assert_eq!(parse_size("1."), None);
    assert_eq!(parse_size(".5G"), None);
    assert_eq!(parse_size("1..5G"), None);
    // Overflow and junk.
    assert_eq!(parse_size("16EiB"), None);
    assert_eq!(parse_size("18446744073709551615"), Some(u64::MAX));
    assert_eq!(parse_size("18446744073709551616"), None);
    assert_eq!(parse_size("1TiBs"), None);
    assert_eq!(parse_size("GiB"), None);
    assert_eq!(parse_size(""), None);
    // In a file: 1GB is 10^9 bytes (not a block multiple of 4096 here, so it is refused).
    let c = parse(&GOOD.replace("64MiB", "64MB"), "si.toml").unwrap();
    assert_eq!(c.bdevs[0].size, Some(64_000_000));
    let e = err(&GOOD.replace("64MiB", "64XB"));
    assert!(e.message.contains("powers of 1000") && e.message.contains("powers of 1024"), "{e}");
    assert_eq!(e.key, "bdev.size");
}

#[test]
fn every_error_names_its_key() {
    let cases = [
        GOOD.replace("cores = [0, 1]", "cores = \"two\""),
        GOOD.replace("block_size = 4096", "block_size = \"big\""),
        GOOD.replace("nsid = 2", "nsid = -2"),
        GOOD.replace("[[subsystem]]", "[[subsystem]]\nmodel = 3"),
        GOOD.replace("ana_states = { \"2\" = \"non-optimized\" }", "ana_states = { \"2\" = 2 }"),
        GOOD.replace("name = \"a\"\n", ""),
        GOOD.replace("poll_mode = \"busy\"", "poll_mode = \"busy\"\npoll_mode = \"busy\""),
        GOOD.replace("kind = \"malloc\"", "kind = \"ramdisk\""),
        GOOD.replace("size = \"64MiB\"", "size = 64MiB"),
        "= 3\n".to_string(),
    ];
    for text in &cases {
        let e = err(text);
        assert!(!e.key.is_empty(), "{e}");
        assert!(!e.to_string().contains(": : "), "{e}");
    }
    assert_eq!(err(&cases[0]).key, "target.cores");
    assert_eq!(err(&cases[1]).key, "bdev.block_size");
    assert_eq!(err(&cases[3]).key, "subsystem.model");
    assert_eq!(err(&cases[4]).key, "listener.ana_states");
    assert_eq!(err(&cases[5]).key, "bdev.name");
    assert_eq!(err(&cases[7]).key, "bdev.kind");
    assert_eq!(parse_witness("listen = 3\n", "w.toml").unwrap_err().key, "listen");
    // A file that cannot be read has no key: it is named alone.
    let e = load(Path::new("/nonexistent/nvmetro.toml")).unwrap_err();
    assert!(e.to_string().starts_with("/nonexistent/nvmetro.toml: cannot read"), "{e}");
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nvmetro-conf-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

const MIRROR: &str = r#"
[target]
socket = "{DIR}/sock/mgmt.sock"

[[bdev]]
name = "leg"
kind = "file"
path = "{DIR}/data/leg.img"
size = "64MiB"

[[bdev]]
name = "m"
kind = "mirror"
local = "leg"
role = "preferred"
listen = "127.0.0.1:7700"
metadata = "{DIR}/meta/m.meta"

[[subsystem]]
nqn = "nqn.2026-11.io.nvmetro:m"
allow_any_host = true

[[subsystem.namespace]]
nsid = 1
bdev = "m"

[[listener]]
address = "127.0.0.1:4420"
"#;

#[test]
fn a_mirror_link_is_tcp_unless_it_says_rdma_which_needs_the_feature() {
    let c = parse(MIRROR, "m.toml").unwrap();
    assert_eq!(c.bdevs[1].mirror.as_ref().unwrap().link, Transport::Tcp);
    let rdma = MIRROR.replace("role = \"preferred\"", "role = \"preferred\"\nlink = \"rdma\"");
    let c = parse(&rdma, "m.toml").unwrap();
    assert_eq!(c.bdevs[1].mirror.as_ref().unwrap().link, Transport::Rdma);
    assert_eq!(c.check_transports(true), Ok(()));
    let e = c.check_transports(false).unwrap_err().to_string();
    assert!(e.contains("mirror m (link)") && e.contains("`rdma` cargo feature"), "{e}");
    let e = err(&MIRROR.replace("role = \"preferred\"", "role = \"preferred\"\nlink = \"udp\""));
    assert_eq!((e.line, e.key.as_str()), (16, "bdev.link"), "{e}");
    assert!(e.message.contains("`udp` is not a transport"), "{e}");
}

#[test]
fn a_mirror_link_has_one_lane_unless_it_says_more_up_to_16() {
    let c = parse(MIRROR, "m.toml").unwrap();
    assert_eq!(c.bdevs[1].mirror.as_ref().unwrap().lanes, 1);
    let c = parse(&MIRROR.replace("role = \"preferred\"", "role = \"preferred\"\nlanes = 4"), "m.toml").unwrap();
    assert_eq!(c.bdevs[1].mirror.as_ref().unwrap().lanes, 4);
    for bad in ["0", "17"] {
        let e = err(&MIRROR.replace("role = \"preferred\"", &format!("role = \"preferred\"\nlanes = {bad}")));
        assert_eq!((e.line, e.key.as_str()), (16, "bdev.lanes"), "{e}");
        assert!(e.message.contains(&format!("{bad} lanes: from 1 to 16")), "{e}");
    }
    let e = err(&MIRROR.replace("size = \"64MiB\"", "size = \"64MiB\"\nlanes = 2"));
    assert!(e.message.contains("belong to mirror bdevs"), "{e}");
}

#[test]
fn check_verifies_every_path_can_be_written() {
    let dir = scratch("check");
    let file = dir.join("target.toml");
    std::fs::write(&file, MIRROR.replace("{DIR}", &dir.display().to_string())).unwrap();
    // None of the directories exists: three errors, each with its line and key.
    let errors = check(&file).unwrap_err();
    let found: Vec<(usize, &str)> = errors.iter().map(|e| (e.line, e.key.as_str())).collect();
    assert_eq!(found, [(3, "target.socket"), (8, "bdev.path"), (17, "bdev.metadata")], "{errors:?}");
    for e in &errors {
        assert!(e.message.contains("does not exist"), "{e}");
        assert!(e.to_string().starts_with(&format!("{}:{}: {}: ", file.display(), e.line, e.key)), "{e}");
    }
    assert!(errors[1].message.contains(&format!("{}/data", dir.display())), "{}", errors[1]);
    for d in ["sock", "data", "meta"] {
        std::fs::create_dir(dir.join(d)).unwrap();
    }
    let c = check(&file).unwrap();
    assert_eq!(c.bdevs.len(), 2);
    // A parent that is a file, not a directory.
    std::fs::remove_dir(dir.join("meta")).unwrap();
    std::fs::write(dir.join("meta"), b"").unwrap();
    let errors = check(&file).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].key, "bdev.metadata");
    assert!(errors[0].message.contains("is not a directory"), "{}", errors[0]);
    // A file bdev that does not exist and has no size cannot be created.
    std::fs::remove_file(dir.join("meta")).unwrap();
    std::fs::create_dir(dir.join("meta")).unwrap();
    std::fs::write(&file, MIRROR.replace("{DIR}", &dir.display().to_string()).replace("size = \"64MiB\"\n", "")).unwrap();
    let errors = check(&file).unwrap_err();
    assert_eq!((errors.len(), errors[0].key.as_str()), (1, "bdev.path"), "{errors:?}");
    assert!(errors[0].message.contains("`size` is not set"), "{}", errors[0]);
    // It exists: fine without a size.
    std::fs::write(dir.join("data/leg.img"), vec![0u8; 4096]).unwrap();
    check(&file).unwrap();
    // A path that is a directory.
    std::fs::create_dir(dir.join("meta/m.meta")).unwrap();
    let errors = check(&file).unwrap_err();
    assert!(errors[0].message.contains("is a directory"), "{}", errors[0]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn check_witness_state_directory() {
    let dir = scratch("check-witness");
    let file = dir.join("witness.toml");
    let write = |state: &str| {
        std::fs::write(&file, format!("listen = \"127.0.0.1:7900\"\nsecret = \"0123456789abcdef\"\nstate = \"{state}\"\n")).unwrap()
    };
    // Absent directories the witness creates at start are fine.
    write(&format!("{}/a/b/state.json", dir.display()));
    check_witness(&file).unwrap();
    // Under a regular file they cannot be created.
    std::fs::write(dir.join("plain"), b"").unwrap();
    write(&format!("{}/plain/b/state.json", dir.display()));
    let errors = check_witness(&file).unwrap_err();
    assert_eq!((errors[0].line, errors[0].key.as_str()), (3, "state"), "{errors:?}");
    assert!(errors[0].message.contains("cannot be created"), "{}", errors[0]);
    write(&format!("{}/plain/state.json", dir.display()));
    let errors = check_witness(&file).unwrap_err();
    assert!(errors[0].message.contains("is not a directory"), "{}", errors[0]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn mirror_secret_and_retry_interval() {
    let base = MIRROR.replace("{DIR}", "/tmp");
    let c = parse(&base, "m.toml").unwrap();
    let m = c.bdevs[1].mirror.as_ref().unwrap();
    assert_eq!((m.secret.as_deref(), m.retry_interval), (None, Some(DEFAULT_RETRY_INTERVAL)));
    let with = |extra: &str| base.replace("metadata = ", &format!("{extra}\nmetadata = "));
    let mirror = |text: &str| parse(text, "m.toml").unwrap().bdevs[1].mirror.clone().unwrap();

    let m = mirror(&with("secret = \"replication-secret-16\"\nretry_interval = \"1m 30s\""));
    assert_eq!(m.secret.as_deref(), Some(&b"replication-secret-16"[..]));
    assert_eq!(m.retry_interval, Some(std::time::Duration::from_secs(90)));
    assert_eq!(mirror(&with("retry_interval = \"0s\"")).retry_interval, None, "0s: only on request");
    assert_eq!(mirror(&with("retry_interval = \"250ms\"")).retry_interval, Some(std::time::Duration::from_millis(250)));

    let e = err(&with("retry_interval = \"soon\""));
    assert_eq!((e.key.as_str(), e.line), ("bdev.retry_interval", 17), "{e}");
    let e = err(&with("secret = \"short\""));
    assert_eq!(e.key, "bdev.secret");
    assert!(e.message.contains("16 characters"), "{e}");
    let e = err(&with("secret = \"replication-secret-16\"\nsecret_file = \"/tmp/x\""));
    assert_eq!(e.key, "bdev.secret");
    assert!(e.message.contains("exactly one"), "{e}");
    // Mirror keys on another kind of bdev.
    let e = err(&base.replace("size = \"64MiB\"", "size = \"64MiB\"\nretry_interval = \"1s\""));
    assert_eq!(e.key, "bdev");

    // A secret file: only its owner may read it.
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch("secret");
    let secret = dir.join("link.secret");
    std::fs::write(&secret, "replication-secret-from-file\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let text = with(&format!("secret_file = \"{}\"", secret.display()));
    let e = err(&text);
    assert_eq!((e.key.as_str(), e.line), ("bdev.secret_file", 17), "{e}");
    assert!(e.message.contains(&secret.display().to_string()) && e.message.contains("group or others"), "{e}");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(mirror(&text).secret.as_deref(), Some(&b"replication-secret-from-file"[..]));
    // The witness's secret file is held to the same rule (one code path).
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).unwrap();
    let w = format!("listen = \"127.0.0.1:7900\"\nsecret_file = \"{}\"\nstate = \"/tmp/s.json\"\n", secret.display());
    let e = parse_witness(&w, "w.toml").unwrap_err();
    assert_eq!(e.key, "secret_file", "{e}");
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o400)).unwrap();
    assert_eq!(parse_witness(&w, "w.toml").unwrap().secret, b"replication-secret-from-file");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn the_default_metrics_port_differs_per_site() {
    let base =
        &MIRROR[MIRROR.find("[[bdev]]").unwrap()..].replace("{DIR}/data/leg.img", "/tmp/leg").replace("{DIR}/meta/m.meta", "/tmp/m.meta");
    let with = |target: &str| parse(&format!("[target]\ncores = [0]\n{target}\n[metrics]\n{base}"), "m.toml").unwrap().metrics;
    assert_eq!(with(""), Some("127.0.0.1:9775".parse().unwrap()));
    assert_eq!(with("site = 1"), Some("127.0.0.1:9776".parse().unwrap()));
    assert_eq!(with("site = 2"), Some("127.0.0.1:9777".parse().unwrap()));
}

#[test]
fn a_subsystem_without_namespaces_yet_is_valid_and_a_gap_in_ana_groups_is_not() {
    let empty =
        "[[subsystem]]\nnqn = \"nqn.2026-11.io.nvmetro:empty\"\nallow_any_host = true\n\n[[listener]]\naddress = \"127.0.0.1:4420\"\n";
    let c = parse(empty, "e.toml").expect("a subsystem whose namespaces come later (a reload adds them)");
    assert!(c.subsystems[0].namespaces.is_empty());
    let gap = GOOD.replace("ana_group = 2", "ana_group = 3");
    let e = parse(&gap, "g.toml").unwrap_err();
    assert!(e.message.contains("group 2 is unused"), "{e}");
}
