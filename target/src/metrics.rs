//! The metrics endpoint (`[metrics]`), in OpenMetrics text through `prometheus-client`: per
//! namespace (and site) commands, bytes, errors, queue depth and a latency histogram; ANA state per
//! listener with the time of its last change; controllers per host; mirror sync state, replication
//! round trip, leg failures and refused replication connections. A collector reads the target's
//! per-namespace statistics at every scrape.

use crate::Target;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

/// What a scrape that asks for OpenMetrics gets (Prometheus asks for it).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// What any other scrape gets: Prometheus' classic text format (curl, `promtool check metrics`).
pub const CLASSIC: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Serves `/metrics` on a listener bound before the target started (so it answers as soon as the
/// NVMe listeners do).
pub fn serve(listener: TcpListener, target: Arc<Target>) -> std::io::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    let registry = registry(target);
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            // One scraper that stops reading must not hold the others up.
            let _ = conn.set_write_timeout(Some(std::time::Duration::from_secs(2)));
            // The request may come in pieces: read until the end of its headers (or 4 KiB).
            let mut req = [0u8; 4096];
            let mut n = 0;
            while n < req.len() && !req[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut req[n..]) {
                    Ok(0) | Err(_) => break,
                    Ok(got) => n += got,
                }
            }
            let req = String::from_utf8_lossy(&req[..n]);
            let ok = req.starts_with("GET /metrics") || req.starts_with("GET / ");
            let openmetrics =
                req.to_ascii_lowercase().lines().any(|l| l.starts_with("accept:") && l.contains("application/openmetrics-text"));
            let mut body = String::new();
            let (status, kind) = match ok.then(|| prometheus_client::encoding::text::encode(&mut body, &registry)) {
                Some(Ok(())) if openmetrics => ("200 OK", OPENMETRICS),
                Some(Ok(())) => {
                    body = classic(&body);
                    ("200 OK", CLASSIC)
                }
                Some(Err(_)) => ("500 Internal Server Error", "text/plain"),
                None => {
                    body = "try /metrics\n".into();
                    ("404 Not Found", "text/plain")
                }
            };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
    Ok(bound)
}

/// A registry whose one collector reads the target's statistics at every scrape.
pub fn registry(target: Arc<Target>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(TargetCollector(target)));
    registry
}

/// OpenMetrics text as the classic text format says it: a counter family is named with its
/// `_total` (OpenMetrics names it without), and there is no `# EOF`.
pub fn classic(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(name) = line.strip_prefix("# TYPE ").and_then(|rest| rest.strip_suffix(" counter")) {
            counters.insert(name.to_string());
        }
    }
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let head = ["# HELP ", "# TYPE "].into_iter().find_map(|p| line.strip_prefix(p).map(|rest| (p, rest)));
        match head.and_then(|(p, rest)| rest.split_once(' ').filter(|(name, _)| counters.contains(*name)).map(|(n, r)| (p, n, r))) {
            Some((prefix, name, rest)) => {
                let _ = writeln!(out, "{prefix}{name}_total {rest}");
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

type Labels = Vec<(&'static str, String)>;

enum Value {
    Counter(u64),
    Gauge(f64),
    /// Sum, count, and per-bucket counts by upper bound (the last bound is `f64::MAX`: +Inf).
    Histogram(f64, u64, Vec<(f64, u64)>),
}

/// One family: a name (counters without their `_total`, which the encoder adds), its help, type
/// and samples. Every family is encoded as one block under its descriptor.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    samples: Vec<(Labels, Value)>,
}

impl Family {
    fn new(name: &'static str, kind: MetricType, help: &'static str) -> Family {
        Family { name, help, kind, samples: Vec::new() }
    }

    fn add(&mut self, labels: Labels, value: Value) {
        self.samples.push((labels, value));
    }

    fn encode(&self, encoder: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        let mut family = encoder.encode_descriptor(self.name, self.help, None, self.kind)?;
        for (labels, value) in &self.samples {
            let mut metric = family.encode_family(labels)?;
            match value {
                Value::Counter(v) => ConstCounter::new(*v).encode(metric)?,
                Value::Gauge(v) => ConstGauge::new(*v).encode(metric)?,
                Value::Histogram(sum, count, buckets) => {
                    metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(*sum, *count, buckets, None)?
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
struct TargetCollector(Arc<Target>);

impl Collector for TargetCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> std::fmt::Result {
        for family in families(&self.0) {
            family.encode(&mut encoder)?;
        }
        Ok(())
    }
}

fn families(t: &Target) -> Vec<Family> {
    use MetricType::{Counter, Gauge, Histogram};
    let site = t.config().site.map_or(String::new(), |s| s.to_string());
    let r = Ordering::Relaxed;
    let mut commands = Family::new("nvmetro_namespace_commands", Counter, "Completed read and write commands.");
    let mut bytes = Family::new("nvmetro_namespace_bytes", Counter, "Bytes read and written.");
    let mut durability =
        Family::new("nvmetro_namespace_durability", Counter, "Force Unit Access writes and flushes sent to the block device.");
    let mut errors = Family::new("nvmetro_namespace_errors", Counter, "Read and write commands that failed.");
    let mut depth = Family::new("nvmetro_namespace_queue_depth", Gauge, "Commands in flight at the block device.");
    let mut latency = Family::new("nvmetro_namespace_latency_seconds", Histogram, "Read and write latency inside the target.");
    for s in t.subsystems().iter() {
        for ns in s.namespaces().iter() {
            let st = &ns.stats;
            let l =
                || -> Labels { vec![("subsystem", s.config().nqn.clone()), ("nsid", ns.info.nsid.to_string()), ("site", site.clone())] };
            let op = |what: &str| -> Labels {
                let mut v = l();
                v.push(("op", what.to_string()));
                v
            };
            commands.add(op("read"), Value::Counter(st.reads.load(r)));
            commands.add(op("write"), Value::Counter(st.writes.load(r)));
            bytes.add(op("read"), Value::Counter(st.read_bytes.load(r)));
            bytes.add(op("write"), Value::Counter(st.write_bytes.load(r)));
            durability.add(op("fua_write"), Value::Counter(st.fua_writes.load(r)));
            durability.add(op("flush"), Value::Counter(st.flushes.load(r)));
            errors.add(l(), Value::Counter(st.errors.load(r)));
            depth.add(l(), Value::Gauge(st.inflight.load(r) as f64));
            let bounds = crate::subsys::LATENCY_BUCKETS_US.iter().map(|us| *us as f64 / 1e6).chain([f64::MAX]);
            let buckets: Vec<(f64, u64)> = bounds.zip(st.latency.iter().map(|c| c.load(r))).collect();
            let count = buckets.iter().map(|b| b.1).sum();
            latency.add(l(), Value::Histogram(st.latency_sum_ns.load(r) as f64 / 1e9, count, buckets));
        }
    }
    let mut ana = Family::new("nvmetro_ana_state", Gauge, "1 for the ANA state each group is in on each listener.");
    let mut ana_changed = Family::new(
        "nvmetro_ana_state_changed_timestamp_seconds",
        Gauge,
        "When the group's state last changed on the listener (0: as configured since start).",
    );
    for a in t.ana_groups() {
        let l: Labels = vec![
            ("subsystem", a.subsystem.config().nqn.clone()),
            ("listener", a.address.to_string()),
            ("group", a.group.to_string()),
            ("site", site.clone()),
        ];
        let mut with_state = l.clone();
        with_state.push(("state", a.state.name().to_string()));
        ana.add(with_state, Value::Gauge(1.0));
        let when = a
            .subsystem
            .ana_changed_at(a.listener, a.group)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        ana_changed.add(l, Value::Gauge(when));
    }
    let mut hosts = Family::new("nvmetro_host_controllers", Gauge, "Live controllers per host.");
    for s in t.subsystems().iter() {
        for (host, n) in s.controllers_by_host() {
            hosts.add(vec![("subsystem", s.config().nqn.clone()), ("host", host)], Value::Gauge(n as f64));
        }
    }
    let mut out_of_sync = Family::new("nvmetro_mirror_out_of_sync_bytes", Gauge, "Bytes a resync would have to copy to the peer.");
    let mut synced = Family::new("nvmetro_mirror_synced_bytes", Gauge, "Bytes copied by the current resync.");
    let mut speed = Family::new("nvmetro_mirror_sync_bytes_per_second", Gauge, "Resync speed.");
    let mut rtt = Family::new("nvmetro_mirror_replication_rtt_seconds", Gauge, "Last measured round trip to the peer.");
    let mut serving = Family::new("nvmetro_mirror_serving", Gauge, "1 when this leg serves host I/O.");
    let mut access =
        Family::new("nvmetro_mirror_access", Gauge, "1 for the leg's access state (serving, serving alone, transition, fenced).");
    let mut witness =
        Family::new("nvmetro_mirror_witness_reachable", Gauge, "Metro mode: 1 when the witness answered within the last second.");
    let mut failed_for =
        Family::new("nvmetro_mirror_failed_seconds", Gauge, "Seconds since this leg's device failed (present only while Failed).");
    let mut peer_failed = Family::new("nvmetro_mirror_peer_failed", Gauge, "1 while the peer's device is Failed.");
    let mut leg_failures =
        Family::new("nvmetro_mirror_leg_failures", Counter, "Times this leg's device failed I/O and was faulted, since start.");
    let mut refusals = Family::new(
        "nvmetro_mirror_link_refusals",
        Counter,
        "Replication connections refused since start (authentication failed or timed out, too many in their handshake).",
    );
    let mut lanes = Family::new("nvmetro_mirror_lanes_up", Gauge, "Connections (lanes) the replication link is made of now.");
    let mut link_ups = Family::new("nvmetro_mirror_link_ups", Counter, "Times the replication link came up since start.");
    let mut on_reactors = Family::new(
        "nvmetro_mirror_lanes_on_reactors",
        Gauge,
        "Lanes of the replication link that reactors other than the link's drive now.",
    );
    for (_, b) in t.live_bdevs() {
        let Some(m) = b.mirror_status() else { continue };
        let l: Labels = vec![
            ("bdev", b.info().name.clone()),
            // The role that orders now, without the explanation status adds.
            ("role", m.role.split(' ').next().unwrap_or_default().to_string()),
            ("link", m.link.clone()),
            ("disk", m.disk.clone()),
            ("site", site.clone()),
        ];
        out_of_sync.add(l.clone(), Value::Gauge(m.out_of_sync_bytes as f64));
        synced.add(l.clone(), Value::Gauge(m.synced_bytes as f64));
        speed.add(l.clone(), Value::Gauge(m.sync_bytes_per_second as f64));
        if let Some(us) = m.replication_rtt_us {
            rtt.add(l.clone(), Value::Gauge(us as f64 / 1e6));
        }
        serving.add(l.clone(), Value::Gauge(f64::from(u8::from(m.serving))));
        let mut with_state = l.clone();
        with_state.push(("state", m.access.clone()));
        access.add(with_state, Value::Gauge(1.0));
        if let Some(x) = &m.metro {
            witness.add(l.clone(), Value::Gauge(f64::from(u8::from(x.witness_reachable))));
        }
        if let Some(s) = m.failed_for_seconds {
            failed_for.add(l.clone(), Value::Gauge(s as f64));
        }
        peer_failed.add(l.clone(), Value::Gauge(f64::from(u8::from(m.peer_failure.is_some()))));
        // Counters keep one series however the state labels move.
        let name: Labels = vec![("bdev", b.info().name.clone()), ("site", site.clone())];
        leg_failures.add(name.clone(), Value::Counter(m.leg_failures));
        refusals.add(name.clone(), Value::Counter(m.link_refusals));
        link_ups.add(name.clone(), Value::Counter(m.link_ups));
        lanes.add(name.clone(), Value::Gauge(m.lanes_up as f64));
        on_reactors.add(name, Value::Gauge(m.lanes_on_reactors as f64));
    }
    let mut families = vec![
        commands,
        bytes,
        durability,
        errors,
        depth,
        latency,
        ana,
        ana_changed,
        hosts,
        out_of_sync,
        synced,
        speed,
        rtt,
        serving,
        access,
        witness,
        failed_for,
        peer_failed,
        leg_failures,
        refusals,
        link_ups,
        lanes,
        on_reactors,
    ];
    families.extend(dr_families(t, &site));
    families.push(rdma_data_family(t, &site));
    families
}

/// Host data of the NVMe/RDMA queue pairs, summed over the reactors, by direction and by whether
/// it was copied between staging and the bdev's buffers.
fn rdma_data_family(t: &Target, site: &str) -> Family {
    let mut data = Family::new(
        "nvmetro_rdma_host_data_bytes",
        MetricType::Counter,
        "NVMe/RDMA host data, by direction, placed straight in the bdev's buffers (zero_copy) or copied once.",
    );
    let r = Ordering::Relaxed;
    let (mut zero_copy_in, mut copied_in, mut zero_copy_out, mut copied_out) = (0, 0, 0, 0);
    for h in t.reactors() {
        let d = h.rdma_data();
        zero_copy_in += d.from_host_zero_copy.load(r);
        copied_in += d.from_host_copied.load(r);
        zero_copy_out += d.to_host_zero_copy.load(r);
        copied_out += d.to_host_copied.load(r);
    }
    for (direction, path, bytes) in [
        ("from_host", "zero_copy", zero_copy_in),
        ("from_host", "copied", copied_in),
        ("to_host", "zero_copy", zero_copy_out),
        ("to_host", "copied", copied_out),
    ] {
        let labels = vec![("direction", direction.to_string()), ("path", path.to_string()), ("site", site.to_string())];
        data.add(labels, Value::Counter(bytes));
    }
    data
}

/// The recovery point of every DR group (production side) and the applied sequence of every
/// DR replica.
fn dr_families(t: &Target, site: &str) -> Vec<Family> {
    use MetricType::*;
    let mut behind_bytes = Family::new("nvmetro_dr_behind_bytes", Gauge, "Bytes of host writes not yet durable at the DR site.");
    let mut behind_writes = Family::new("nvmetro_dr_behind_writes", Gauge, "Host writes not yet durable at the DR site.");
    let mut behind_seconds = Family::new(
        "nvmetro_dr_behind_seconds",
        Gauge,
        "Age of the oldest host write not yet durable at the DR site (the recovery point).",
    );
    let mut rpo_target = Family::new("nvmetro_dr_rpo_target_seconds", Gauge, "The group's recovery point objective, when set.");
    let mut alarm = Family::new("nvmetro_dr_rpo_alarm", Gauge, "1 while the recovery point is older than its target.");
    let mut alarms = Family::new("nvmetro_dr_rpo_alarms", Counter, "Times the recovery point went past its target, since start.");
    let mut buffered = Family::new("nvmetro_dr_buffered_bytes", Gauge, "Bytes in the group's send buffer.");
    let mut connected = Family::new("nvmetro_dr_connected", Gauge, "1 while the DR stream is connected.");
    let mut copy_left =
        Family::new("nvmetro_dr_copy_remaining_bytes", Gauge, "Bytes the full copy has yet to read (present while it runs).");
    let mut applied = Family::new("nvmetro_dr_replica_applied_sequence", Gauge, "DR site: the last write of the stream applied durably.");
    let mut consistent =
        Family::new("nvmetro_dr_replica_consistent", Gauge, "DR site: 1 when the image is crash-consistent (no full copy under way).");
    for g in t.dr_groups.load().iter() {
        let s = g.status();
        let l: Labels = vec![("group", s.name.clone()), ("mode", s.mode.clone()), ("site", site.to_string())];
        behind_bytes.add(l.clone(), Value::Gauge(s.behind_bytes as f64));
        behind_writes.add(l.clone(), Value::Gauge(s.behind_writes as f64));
        behind_seconds.add(l.clone(), Value::Gauge(s.behind_ms as f64 / 1e3));
        if let Some(ms) = s.rpo_target_ms {
            rpo_target.add(l.clone(), Value::Gauge(ms as f64 / 1e3));
        }
        alarm.add(l.clone(), Value::Gauge(f64::from(u8::from(s.rpo_alarm))));
        alarms.add(l.clone(), Value::Counter(s.rpo_alarms));
        buffered.add(l.clone(), Value::Gauge(s.buffered_bytes as f64));
        connected.add(l.clone(), Value::Gauge(f64::from(u8::from(s.connected))));
        if s.copy_total_bytes > 0 {
            copy_left.add(l, Value::Gauge(s.copy_total_bytes.saturating_sub(s.copy_done_bytes) as f64));
        }
    }
    for r in t.dr_replicas.load().iter() {
        let s = r.status();
        let l: Labels = vec![("group", s.name.clone()), ("site", site.to_string())];
        applied.add(l.clone(), Value::Gauge(s.applied_seq as f64));
        consistent.add(l, Value::Gauge(f64::from(u8::from(s.consistent))));
    }
    vec![behind_bytes, behind_writes, behind_seconds, rpo_target, alarm, alarms, buffered, connected, copy_left, applied, consistent]
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_classic_format_names_counters_with_their_total_and_has_no_eof() {
        let om = "# HELP a A.\n# TYPE a counter\na_total{x=\"1\"} 3\n# HELP g G.\n# TYPE g gauge\ng 1.0\n# EOF\n";
        assert_eq!(
            super::classic(om),
            "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 3\n# HELP g G.\n# TYPE g gauge\ng 1.0\n"
        );
    }
}
