//! Figures out of a run: the JSON document, the text summary, an SVG latency plot, and the
//! side-by-side comparison of two JSON results.

use crate::load::JobResult;
use hdrhistogram::Histogram;
use serde_json::{json, Value};

pub fn us(ns: u64) -> f64 {
    ns as f64 / 1000.0
}

/// Latency figures of a histogram in microseconds.
pub fn latency_json(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return json!({});
    }
    let q = |p: f64| us(h.value_at_quantile(p));
    json!({"min": us(h.min()), "avg": h.mean() / 1000.0, "p50": q(0.5), "p90": q(0.9), "p99": q(0.99),
           "p99.9": q(0.999), "p99.99": q(0.9999), "max": us(h.max())})
}

/// The figures of one result (a path, or the total).
pub fn result_json(r: &JobResult) -> Value {
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    json!({
        "iops": r.ios() as f64 / secs,
        "mib_s": r.bytes as f64 / secs / f64::from(1 << 20),
        "reads": r.reads, "writes": r.writes, "errors": r.errors, "seconds": secs,
        "latency_us": latency_json(&r.latency_ns),
    })
}

pub fn summary_line(name: &str, r: &JobResult) -> String {
    let secs = r.elapsed.as_secs_f64().max(1e-9);
    let h = &r.latency_ns;
    let mut s = format!(
        "{name}: IOPS {:.0}  MiB/s {:.1}  reads {}  writes {}  errors {}",
        r.ios() as f64 / secs,
        r.bytes as f64 / secs / f64::from(1 << 20),
        r.reads,
        r.writes,
        r.errors
    );
    if !h.is_empty() {
        s += &format!(
            "\n{name}: latency us: min {:.1}  avg {:.1}  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  p99.99 {:.1}  max {:.1}",
            us(h.min()),
            h.mean() / 1000.0,
            us(h.value_at_quantile(0.5)),
            us(h.value_at_quantile(0.9)),
            us(h.value_at_quantile(0.99)),
            us(h.value_at_quantile(0.999)),
            us(h.value_at_quantile(0.9999)),
            us(h.max())
        );
    }
    s
}

/// A latency-by-percentile plot (x: 0 to 99.999% on a log scale of 1/(1-p), y: microseconds).
pub fn svg_plot(title: &str, curves: &[(&str, &Histogram<u64>)]) -> String {
    let (w, h, m) = (800.0, 480.0, 60.0);
    let max_x = 5.0f64; // up to 99.999%
    let max_y = curves.iter().filter(|(_, c)| !c.is_empty()).map(|(_, c)| us(c.value_at_quantile(0.99999))).fold(1.0f64, f64::max) * 1.1;
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{m}\" y=\"24\" font-size=\"15\">{title}</text>\n"
    );
    let px = |x: f64| m + (w - 2.0 * m) * x / max_x;
    let py = |y: f64| h - m - (h - 2.0 * m) * y / max_y;
    s += &format!("<line x1=\"{m}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n", h - m, w - m, h - m);
    s += &format!("<line x1=\"{m}\" y1=\"{m}\" x2=\"{m}\" y2=\"{}\" stroke=\"black\"/>\n", h - m);
    for (i, label) in ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%"].iter().enumerate() {
        let x = px(i as f64);
        s += &format!("<line x1=\"{x}\" y1=\"{m}\" x2=\"{x}\" y2=\"{}\" stroke=\"#ddd\"/><text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{label}</text>\n", h - m, h - m + 18.0);
    }
    for i in 0..=5 {
        let v = max_y * f64::from(i) / 5.0;
        s += &format!("<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{v:.0}</text>\n", m - 6.0, py(v) + 4.0);
    }
    s += &format!("<text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\">latency (us)</text>\n", h / 2.0, h / 2.0);
    for (ci, (name, c)) in curves.iter().enumerate() {
        if c.is_empty() {
            continue;
        }
        let mut pts = String::new();
        for step in 0..=500 {
            let x = max_x * f64::from(step) / 500.0;
            let q = (1.0 - 10f64.powf(-x)).min(0.99999);
            pts += &format!("{:.1},{:.1} ", px(x), py(us(c.value_at_quantile(q))));
        }
        let color = colors[ci % colors.len()];
        s += &format!("<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{pts}\"/>\n");
        s += &format!("<text x=\"{}\" y=\"{}\" fill=\"{color}\">{name}</text>\n", w - m - 150.0, m + 16.0 * ci as f64);
    }
    s + "</svg>\n"
}

/// Side-by-side table of the numeric figures two results share, with B/A ratios.
pub fn compare(a: &Value, b: &Value) -> String {
    let mut rows = Vec::new();
    fn walk(prefix: &str, a: &Value, b: &Value, rows: &mut Vec<(String, f64, f64)>) {
        match (a, b) {
            (Value::Object(ma), Value::Object(mb)) => {
                for (k, va) in ma {
                    if let Some(vb) = mb.get(k) {
                        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                        walk(&key, va, vb, rows);
                    }
                }
            }
            (Value::Number(x), Value::Number(y)) => rows.push((prefix.to_string(), x.as_f64().unwrap_or(0.0), y.as_f64().unwrap_or(0.0))),
            _ => {}
        }
    }
    walk("", a, b, &mut rows);
    let mut out = String::from("| figure | A | B | B/A |\n|---|---:|---:|---:|\n");
    for (k, x, y) in rows {
        let ratio = if x != 0.0 { format!("{:.3}", y / x) } else { "-".into() };
        out += &format!("| {k} | {x:.2} | {y:.2} | {ratio} |\n");
    }
    out
}
