//! The metrics endpoint read by the real thing: Prometheus' own `promtool check metrics` lints the
//! exposition, and a Prometheus server started on 127.0.0.1 scrapes it and answers queries on what
//! it stored (types included). Both come from Debian's `prometheus` package, which
//! `vendor-scripts/test.sh` installs. A stranger on the replication port shows up in the refused
//! connections' counter.

use nvmetro_tests::{free_port, mirror_site_config, serves, wait_until, TargetProcess, METRO_NQN};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A GET on 127.0.0.1 (HTTP/1.0: no chunked answers): the status line and the body.
fn fetch(addr: SocketAddr, path: &str) -> std::io::Result<(String, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((head.lines().next().unwrap_or_default().to_string(), body.to_string()))
}

/// The body of a GET that must succeed.
fn get(addr: SocketAddr, path: &str) -> String {
    let (status, body) = fetch(addr, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert!(status.ends_with(" 200 OK"), "GET {path}: {status}\n{body}");
    body
}

fn tool(name: &str) -> String {
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()).any(|d| d.join(name).is_file());
    assert!(found, "`{name}` not found: install Debian's `prometheus` package (vendor-scripts/test.sh does)");
    name.to_string()
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Prometheus instant query's result vector.
fn query(prometheus: SocketAddr, expr: &str) -> Vec<serde_json::Value> {
    let body = get(prometheus, &format!("/api/v1/query?query={expr}"));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

#[test]
fn the_metrics_pass_promtool_and_a_real_prometheus_scrapes_them() {
    let link = free_port();
    let cfg = mirror_site_config(
        METRO_NQN,
        true,
        link,
        "site = 1\n\n[metrics]\naddress = \"127.0.0.1:{PORT2}\"",
        "secret = \"metrics-test-secret-0123456789\"",
    );
    let t = TargetProcess::start(&cfg);
    let _peer =
        TargetProcess::start(&mirror_site_config(METRO_NQN, false, link, "site = 2", "secret = \"metrics-test-secret-0123456789\""));
    let metrics = t.addr2;
    wait_until("the preferred leg serves writes", Duration::from_secs(20), || serves(&t) == Some(true));

    // A stranger on the replication port: refused, and counted.
    let mut stranger = TcpStream::connect(("127.0.0.1", link)).unwrap();
    stranger.write_all(b"GET / HTTP/1.0\r\n\r\nnot the replication protocol at all, and long enough to be judged").unwrap();
    let refused = |body: &str| {
        body.lines()
            .find(|l| l.starts_with("nvmetro_mirror_link_refusals_total{bdev=\"m\""))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    wait_until("the stranger is refused and counted", Duration::from_secs(20), || refused(&get(metrics, "/metrics")) >= 1.0);
    drop(stranger);
    // The link (one lane) came up once, and the stranger did not touch it.
    let body = get(metrics, "/metrics");
    let value = |name: &str| {
        body.lines().find(|l| l.starts_with(&format!("{name}{{bdev=\"m\""))).and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert_eq!((value("nvmetro_mirror_lanes_up"), value("nvmetro_mirror_link_ups_total")), (Some(1.0), Some(1.0)), "{body}");
    assert_eq!(value("nvmetro_mirror_lanes_on_reactors"), Some(0.0), "one lane: none on other reactors: {body}");

    // Without an Accept header for OpenMetrics: the classic text format, as promtool reads it.
    let body = get(metrics, "/metrics");
    assert!(body.contains("# TYPE nvmetro_namespace_commands_total counter") && !body.contains("# EOF"), "{body}");
    let mut lint = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    lint.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\n{}{}\non:\n{body}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let port = free_port();
    let dir = t.scratch().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: nvmetro\n    static_configs:\n      - targets: ['{metrics}']\n"
        ),
    )
    .unwrap();
    let server = Prometheus(
        Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let prometheus: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let log = || std::fs::read_to_string(dir.join("log")).unwrap_or_default();
    // Prometheus answers 503 until its storage is ready.
    wait_until("Prometheus is ready", Duration::from_secs(60), || {
        fetch(prometheus, "/-/ready").is_ok_and(|(st, _)| st.ends_with(" 200 OK"))
    });
    wait_until("Prometheus stored a scrape of the target", Duration::from_secs(60), || {
        !query(prometheus, "nvmetro_namespace_commands_total").is_empty()
    });
    let targets = get(prometheus, "/api/v1/targets");
    assert!(targets.contains("\"health\":\"up\"") && targets.contains("\"lastError\":\"\""), "{targets}\n{}", log());

    let writes = query(prometheus, "nvmetro_namespace_commands_total");
    assert!(
        writes.iter().any(|s| s["metric"]["op"] == "write" && s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()) >= Some(1.0)),
        "the writes are counted: {writes:?}"
    );
    assert!(!query(prometheus, "nvmetro_mirror_link_refusals_total").is_empty(), "the refusals counter is stored");
    assert!(!query(prometheus, "nvmetro_namespace_latency_seconds_bucket").is_empty(), "the histogram's buckets are stored");
    let metadata = get(prometheus, "/api/v1/metadata");
    for (family, kind) in
        [("nvmetro_namespace_latency_seconds", "histogram"), ("nvmetro_namespace_commands", "counter"), ("nvmetro_mirror_serving", "gauge")]
    {
        let v: serde_json::Value = serde_json::from_str(&metadata).unwrap();
        let got = v["data"][family][0]["type"].as_str().map(str::to_string);
        assert_eq!(got.as_deref(), Some(kind), "Prometheus' metadata for {family}: {metadata}");
    }
    drop(server);
}
