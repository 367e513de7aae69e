//! `nvmetro events`: a subscriber gets the current state, then every change an operator cares
//! about, as it happens: a host connecting, the peer dying and coming back, an operator's ANA
//! change (old and new state), an applied reload (with what it changed). `nvmetro status --watch`
//! shows the status again at each change.

use nvmetro_tests::{binary, connect, mirror_site_config, rpc, serves, wait_until, TargetProcess, METRO_NQN};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

const SECRET: &str = "events-test-secret-0123456789";

struct Subscriber {
    child: Child,
    lines: Receiver<String>,
}

impl Subscriber {
    fn start(t: &TargetProcess, args: &[&str]) -> Subscriber {
        let mut child =
            Command::new(binary("nvmetro")).arg("--config").arg(&t.config_path).args(args).stdout(Stdio::piped()).spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Subscriber { child, lines }
    }

    /// The first event (from now on) that `pred` accepts; panics after 20 s, listing what came.
    fn expect(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = self.lines.recv_timeout(left) else { break };
            let e: Value = serde_json::from_str(&line).unwrap_or_else(|err| panic!("not JSON: {line}: {err}"));
            if pred(&e) {
                return e;
            }
            seen.push(line);
        }
        panic!("no event {what}; got:\n{}", seen.join("\n"));
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn is(e: &Value, change: &str, kind: &str, object: &str) -> bool {
    e["change"] == change && e["type"] == kind && e["object"].as_str().is_some_and(|o| o.contains(object))
}

#[test]
fn the_event_stream_shows_the_state_then_every_change() {
    let link = nvmetro_tests::free_port();
    let site =
        |preferred: bool| mirror_site_config(METRO_NQN, preferred, link, "socket = \"{DIR}/mgmt.sock\"", &format!("secret = \"{SECRET}\""));
    let a = TargetProcess::start(&site(true));
    let mut b = TargetProcess::start(&site(false));
    wait_until("both sites serve", Duration::from_secs(30), || serves(&a) == Some(true) && serves(&b) == Some(true));

    let events = Subscriber::start(&a, &["events", "--json"]);
    // The state first (the mirror publishes its status every 100 ms: the link may show
    // Connected in the dump, or in a change just after it).
    events.expect("showing the link connected", |e| e["type"] == "mirror-link" && e["new"] == "Connected");

    // A host connects.
    let host = connect(&a).expect("a controller at A");
    let e = events.expect("for the host's controller", |e| is(e, "change", "controllers", METRO_NQN));
    assert_eq!((e["old"].clone(), e["new"].clone()), (Value::Null, json!("1")), "{e}");

    // The peer dies, and comes back.
    b.kill();
    let e = events.expect("for the lost link", |e| is(e, "change", "mirror-link", "m"));
    assert_eq!(e["old"], "Connected", "{e}");
    assert_ne!(e["new"], "Connected", "{e}");
    events.expect("for the peer's disk no longer known", |e| is(e, "change", "mirror-peer-disk", "m"));
    b.restart();
    events.expect("for the link back", |e| is(e, "change", "mirror-link", "m") && e["new"] == "Connected");

    // An operator's ANA change, with the old and new state.
    let port = a.addr.port();
    rpc(
        &a,
        "nvmf_subsystem_listener_set_ana_state",
        json!({"nqn": METRO_NQN, "listen_address": {"trtype": "tcp", "adrfam": "ipv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}, "ana_state": "inaccessible"}),
    )
    .unwrap();
    let e = events.expect("for the ANA change", |e| is(e, "change", "ana", METRO_NQN));
    assert_eq!((e["old"].as_str(), e["new"].as_str()), (Some("optimized"), Some("inaccessible")), "{e}");

    // A reload, with what it changed.
    let text = std::fs::read_to_string(&a.config_path).unwrap();
    std::fs::write(
        &a.config_path,
        text.replace(&format!("secret = \"{SECRET}\""), &format!("secret = \"{SECRET}\"\nresync_rate = \"100MiB\"")),
    )
    .unwrap();
    let out = Command::new(binary("nvmetro")).arg("--config").arg(&a.config_path).arg("reload").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let e = events.expect("for the reload", |e| is(e, "change", "reload", ""));
    assert!(e["detail"]["changes"].to_string().contains("resync rate"), "{e}");
    drop(host);

    // `status --watch` shows the status again at a change.
    let watch = Subscriber::start(&a, &["status", "--watch"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut shown = 0;
    while shown < 2 {
        let line = watch.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("status --watch keeps showing");
        shown += usize::from(line.starts_with("nvmetro "));
    }
}
