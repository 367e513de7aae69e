//! The Prometheus text endpoint (`[metrics]`): per namespace (and site) commands, bytes, errors,
//! queue depth and a latency histogram; ANA state per listener with the time of its last change;
//! controllers per host; mirror sync state and replication round trip.

use crate::Target;
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

/// Serves `/metrics` on a listener bound before the target started (so it answers as soon as the
/// NVMe listeners do).
pub fn serve(listener: TcpListener, target: Arc<Target>) -> std::io::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    std::thread::Builder::new().name("metrics".into()).spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let _ = conn.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            let mut req = [0u8; 1024];
            let n = conn.read(&mut req).unwrap_or(0);
            let ok = req[..n].starts_with(b"GET /metrics") || req[..n].starts_with(b"GET / ");
            let (status, body) = if ok { ("200 OK", render(&target)) } else { ("404 Not Found", "try /metrics\n".to_string()) };
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })?;
    Ok(bound)
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The metrics, in Prometheus' text format.
pub fn render(t: &Target) -> String {
    let mut o = String::new();
    let site = t.config().site.map_or(String::new(), |s| s.to_string());
    let r = Ordering::Relaxed;
    let help = |o: &mut String, name: &str, kind: &str, text: &str| {
        let _ = writeln!(o, "# HELP {name} {text}\n# TYPE {name} {kind}");
    };
    help(&mut o, "nvmetro_namespace_commands_total", "counter", "Completed read and write commands.");
    for s in t.subsystems().iter() {
        for ns in s.namespaces().iter() {
            let st = &ns.stats;
            let l = format!("subsystem=\"{}\",nsid=\"{}\",site=\"{site}\"", escape(&s.config().nqn), ns.info.nsid);
            let _ = writeln!(o, "nvmetro_namespace_commands_total{{{l},op=\"read\"}} {}", st.reads.load(r));
            let _ = writeln!(o, "nvmetro_namespace_commands_total{{{l},op=\"write\"}} {}", st.writes.load(r));
        }
    }
    help(&mut o, "nvmetro_namespace_bytes_total", "counter", "Bytes read and written.");
    for s in t.subsystems().iter() {
        for ns in s.namespaces().iter() {
            let st = &ns.stats;
            let l = format!("subsystem=\"{}\",nsid=\"{}\",site=\"{site}\"", escape(&s.config().nqn), ns.info.nsid);
            let _ = writeln!(o, "nvmetro_namespace_bytes_total{{{l},op=\"read\"}} {}", st.read_bytes.load(r));
            let _ = writeln!(o, "nvmetro_namespace_bytes_total{{{l},op=\"write\"}} {}", st.write_bytes.load(r));
        }
    }
    help(&mut o, "nvmetro_namespace_durability_total", "counter", "Force Unit Access writes and flushes sent to the block device.");
    for s in t.subsystems().iter() {
        for ns in s.namespaces().iter() {
            let st = &ns.stats;
            let l = format!("subsystem=\"{}\",nsid=\"{}\",site=\"{site}\"", escape(&s.config().nqn), ns.info.nsid);
            let _ = writeln!(o, "nvmetro_namespace_durability_total{{{l},op=\"fua_write\"}} {}", st.fua_writes.load(r));
            let _ = writeln!(o, "nvmetro_namespace_durability_total{{{l},op=\"flush\"}} {}", st.flushes.load(r));
        }
    }
    help(&mut o, "nvmetro_namespace_errors_total", "counter", "Read and write commands that failed.");
    help(&mut o, "nvmetro_namespace_queue_depth", "gauge", "Commands in flight at the block device.");
    help(&mut o, "nvmetro_namespace_latency_seconds", "histogram", "Read and write latency inside the target.");
    for s in t.subsystems().iter() {
        for ns in s.namespaces().iter() {
            let st = &ns.stats;
            let l = format!("subsystem=\"{}\",nsid=\"{}\",site=\"{site}\"", escape(&s.config().nqn), ns.info.nsid);
            let _ = writeln!(o, "nvmetro_namespace_errors_total{{{l}}} {}", st.errors.load(r));
            let _ = writeln!(o, "nvmetro_namespace_queue_depth{{{l}}} {}", st.inflight.load(r));
            let mut cumulative = 0;
            for (i, bound) in crate::subsys::LATENCY_BUCKETS_US.iter().enumerate() {
                cumulative += st.latency[i].load(r);
                let _ = writeln!(o, "nvmetro_namespace_latency_seconds_bucket{{{l},le=\"{}\"}} {cumulative}", *bound as f64 / 1e6);
            }
            cumulative += st.latency[crate::subsys::LATENCY_BUCKETS_US.len()].load(r);
            let _ = writeln!(o, "nvmetro_namespace_latency_seconds_bucket{{{l},le=\"+Inf\"}} {cumulative}");
            let _ = writeln!(o, "nvmetro_namespace_latency_seconds_sum{{{l}}} {}", st.latency_sum_ns.load(r) as f64 / 1e9);
            let _ = writeln!(o, "nvmetro_namespace_latency_seconds_count{{{l}}} {cumulative}");
        }
    }
    help(&mut o, "nvmetro_ana_state", "gauge", "1 for the ANA state each group is in on each listener.");
    help(
        &mut o,
        "nvmetro_ana_state_changed_timestamp_seconds",
        "gauge",
        "When the group's state last changed on the listener (0: as configured since start).",
    );
    for s in t.subsystems().iter() {
        let groups: std::collections::BTreeSet<u32> = s.namespaces().iter().map(|n| n.info.ana_group).collect();
        for (li, (address, lc)) in t.listeners().iter().enumerate() {
            if lc.is_none() {
                continue;
            }
            let view = s.view(li);
            for g in &groups {
                let l = format!("subsystem=\"{}\",listener=\"{}\",group=\"{g}\",site=\"{site}\"", escape(&s.config().nqn), address);
                let _ = writeln!(o, "nvmetro_ana_state{{{l},state=\"{}\"}} 1", view.ana_state(*g).name());
                let when = s.ana_changed_at(li, *g).and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0.0, |d| d.as_secs_f64());
                let _ = writeln!(o, "nvmetro_ana_state_changed_timestamp_seconds{{{l}}} {when}");
            }
        }
    }
    help(&mut o, "nvmetro_host_controllers", "gauge", "Live controllers per host.");
    for s in t.subsystems().iter() {
        for (host, n) in s.controllers_by_host() {
            let _ = writeln!(o, "nvmetro_host_controllers{{subsystem=\"{}\",host=\"{}\"}} {n}", escape(&s.config().nqn), escape(&host));
        }
    }
    help(&mut o, "nvmetro_mirror_out_of_sync_bytes", "gauge", "Bytes a resync would have to copy to the peer.");
    help(&mut o, "nvmetro_mirror_synced_bytes", "gauge", "Bytes copied by the current resync.");
    help(&mut o, "nvmetro_mirror_sync_bytes_per_second", "gauge", "Resync speed.");
    help(&mut o, "nvmetro_mirror_replication_rtt_seconds", "gauge", "Last measured round trip to the peer.");
    help(&mut o, "nvmetro_mirror_serving", "gauge", "1 when this leg serves host I/O.");
    help(&mut o, "nvmetro_mirror_access", "gauge", "1 for the leg's access state (serving, serving alone, transition, fenced).");
    help(&mut o, "nvmetro_mirror_witness_reachable", "gauge", "Metro mode: 1 when the witness answered within the last second.");
    help(&mut o, "nvmetro_mirror_failed_seconds", "gauge", "Seconds since this leg's device failed (present only while Failed).");
    help(&mut o, "nvmetro_mirror_peer_failed", "gauge", "1 while the peer's device is Failed.");
    for (_, b) in t.live_bdevs() {
        let Some(m) = b.mirror_status() else { continue };
        let l = format!(
            "bdev=\"{}\",role=\"{}\",link=\"{}\",disk=\"{}\",site=\"{site}\"",
            escape(&b.info().name),
            // The role that orders now, without the explanation status adds.
            m.role.split(' ').next().unwrap_or_default(),
            escape(&m.link),
            m.disk
        );
        let _ = writeln!(o, "nvmetro_mirror_out_of_sync_bytes{{{l}}} {}", m.out_of_sync_bytes);
        let _ = writeln!(o, "nvmetro_mirror_synced_bytes{{{l}}} {}", m.synced_bytes);
        let _ = writeln!(o, "nvmetro_mirror_sync_bytes_per_second{{{l}}} {}", m.sync_bytes_per_second);
        if let Some(us) = m.replication_rtt_us {
            let _ = writeln!(o, "nvmetro_mirror_replication_rtt_seconds{{{l}}} {}", us as f64 / 1e6);
        }
        let _ = writeln!(o, "nvmetro_mirror_serving{{{l}}} {}", u8::from(m.serving));
        let _ = writeln!(o, "nvmetro_mirror_access{{{l},state=\"{}\"}} 1", m.access);
        if let Some(x) = &m.metro {
            let _ = writeln!(o, "nvmetro_mirror_witness_reachable{{{l}}} {}", u8::from(x.witness_reachable));
        }
        if let Some(s) = m.failed_for_seconds {
            let _ = writeln!(o, "nvmetro_mirror_failed_seconds{{{l}}} {s}");
        }
        let _ = writeln!(o, "nvmetro_mirror_peer_failed{{{l}}} {}", u8::from(m.peer_failure.is_some()));
    }
    grouped(&o)
}

/// The text format wants each family's samples right after its HELP and TYPE lines (parsers read
/// samples under the last TYPE: interleaved families come out untyped, histograms split).
fn grouped(text: &str) -> String {
    let mut order: Vec<&str> = Vec::new();
    let mut heads: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    let mut samples: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    let mut histograms = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ").or_else(|| line.strip_prefix("# TYPE ")) {
            let mut words = rest.split(' ');
            let name = words.next().unwrap_or_default();
            if line.starts_with("# TYPE ") && words.next() == Some("histogram") {
                histograms.insert(name);
            }
            if !heads.contains_key(name) {
                order.push(name);
            }
            heads.entry(name).or_default().push(line);
        } else if !line.is_empty() {
            let metric = line.split(['{', ' ']).next().unwrap_or_default();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|suffix| metric.strip_suffix(suffix))
                .find(|base| histograms.contains(base))
                .unwrap_or(metric);
            samples.entry(family).or_default().push(line);
        }
    }
    let mut out = String::with_capacity(text.len());
    for name in &order {
        for line in heads.get(name).into_iter().flatten().chain(samples.get(name).into_iter().flatten()) {
            out.push_str(line);
            out.push('\n');
        }
    }
    // Samples of a family without HELP (none today) go last.
    for (family, lines) in &samples {
        if !heads.contains_key(family) {
            for line in lines {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_family_is_one_block_under_its_help_and_type() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\n# HELP h_seconds H.\n# TYPE h_seconds histogram\n\
                    a_total{x=\"1\"} 3\nh_seconds_bucket{le=\"+Inf\"} 2\nh_seconds_sum 0.5\nh_seconds_count 2\na_total{x=\"2\"} 4\n";
        let g = super::grouped(text);
        assert_eq!(
            g,
            "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\"} 3\na_total{x=\"2\"} 4\n\
             # HELP h_seconds H.\n# TYPE h_seconds histogram\nh_seconds_bucket{le=\"+Inf\"} 2\nh_seconds_sum 0.5\nh_seconds_count 2\n"
        );
    }
}
