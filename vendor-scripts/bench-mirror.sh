#!/usr/bin/env bash
# Replicated vs unreplicated 8 KiB random writes, QD1 and QD32, measured in one run, with the
# replication link delayed in-process by 0, 150 us and 1 ms round trip. Legs are files on
# /dev/shm (RAM), so the figures show the cost of replication itself.
#
#   vendor-scripts/bench-mirror.sh [SECONDS]      (default 5 s per case)
# Prints a Markdown table and writes it, with the raw JSON, to bench-mirror.md.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-5}
cargo build --release -q --workspace --bins
BIN=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release
W=$(mktemp -d /dev/shm/nvmetro-bench.XXXX)
trap 'pkill -f "$W" 2>/dev/null || true; rm -rf "$W"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
NQN=nqn.2026-11.io.nvmetro:bench-mirror

target_cfg() { # file listen-port bdev-section cntlid-range bdev [core]
  cat > "$1" <<CFG
[target]
cores = [${6:-0}]
poll_mode = "adaptive"
[[bdev]]
name = "leg"
kind = "file"
path = "$1.img"
size = "512MiB"
$3
[[subsystem]]
nqn = "$NQN"
allow_any_host = true
cntlid_range = [$4]
[[subsystem.namespace]]
nsid = 1
bdev = "$5"
[[listener]]
address = "127.0.0.1:$2"
CFG
}

wait_port() { for _ in $(seq 200); do python3 -c "import socket; socket.create_connection(('127.0.0.1',$1),1)" 2>/dev/null && return; sleep 0.05; done; echo "no listener on $1" >&2; exit 1; }

perf() { # port qd json  (a blocking client on core 1: busy polling would starve site B there)
  "$BIN/nvmetro-perf" --addr 127.0.0.1:$1 --nqn $NQN --rw randwrite --bs 8k --qd $2 --time ${T}s --ramp 1s --cores 1 -q --json "$3" \
    || echo '{"total": {"iops": 0, "latency_us": {"p50": 0, "p99": 0}}}' > "$4"
}

results=()
for delay in 0 75 500; do
  rtt=$((delay * 2))
  # Unreplicated baseline.
  p0=$(port); target_cfg "$W/plain.toml" $p0 "" "1, 99" leg
  "$BIN/nvmetro-tgt" --config "$W/plain.toml" --log warn & PT=$!
  wait_port $p0
  perf $p0 1 "$W/plain-qd1-$delay.json"; perf $p0 32 "$W/plain-qd32-$delay.json"
  kill $PT; wait $PT 2>/dev/null || true; rm -f "$W"/plain.toml.img
  # Replicated pair.
  link=$(port); pa=$(port); pb=$(port)
  d=""; [ $delay -gt 0 ] && d="link_delay = \"${delay}us\""
  target_cfg "$W/a.toml" $pa "[[bdev]]
name = \"m\"
kind = \"mirror\"
local = \"leg\"
role = \"preferred\"
listen = \"127.0.0.1:$link\"
metadata = \"$W/a.meta\"
$d" "1, 99" m
  target_cfg "$W/b.toml" $pb "[[bdev]]
name = \"m\"
kind = \"mirror\"
local = \"leg\"
role = \"secondary\"
peer = \"127.0.0.1:$link\"
metadata = \"$W/b.meta\"
$d" "100, 199" m 1
  "$BIN/nvmetro-tgt" --config "$W/a.toml" --log warn & PA=$!
  "$BIN/nvmetro-tgt" --config "$W/b.toml" --log warn & PB=$!
  wait_port $pa; wait_port $pb; sleep 1
  perf $pa 1 "$W/repl-qd1-$delay.json"; perf $pa 32 "$W/repl-qd32-$delay.json"
  kill $PA $PB; wait $PA $PB 2>/dev/null || true; rm -f "$W"/a.* "$W"/b.*
  results+=("$delay")
done

python3 - "$W" "${results[@]}" > bench-mirror.md <<'PY'
import json, sys
w, delays = sys.argv[1], sys.argv[2:]
rows, raw = [], {}
for d in delays:
    rtt = 2 * int(d)
    for qd in (1, 32):
        p = json.load(open(f"{w}/plain-qd{qd}-{d}.json"))["total"]
        r = json.load(open(f"{w}/repl-qd{qd}-{d}.json"))["total"]
        raw[f"rtt{rtt}-qd{qd}"] = {"unreplicated": p, "replicated": r}
        pp, rp = p["latency_us"].get("p50", 0), r["latency_us"].get("p50", 0)
        if qd == 1:
            goal = f"p50 <= {pp:.1f} + {rtt} + 15 = {pp + rtt + 15:.1f} us"
            met = "met" if rp and rp <= pp + rtt + 15 else "not met"
        else:
            ratio = r["iops"] / p["iops"] if p["iops"] else 0
            goal = ">= 80% of unreplicated IOPS" if rtt == 0 else "-"
            met = ("met" if ratio >= 0.8 else "not met") if rtt == 0 else f"{100 * ratio:.0f}%"
        rows.append(f"| {rtt} us | QD{qd} | {p['iops']:.0f} | {pp:.1f} | {r['iops']:.0f} | {rp:.1f} | {r['latency_us'].get('p99', 0):.1f} | {rp - pp:+.1f} | {goal} | {met} |")
print("# Replicated vs unreplicated, 8 KiB random writes\n")
print("Site A (and the unreplicated target) on core 0, site B on core 1, both adaptive polling; nvmetro-perf (blocking) on core 1; legs on /dev/shm; the link delay is added in-process on both sites.\n")
print("| link RTT | depth | unreplicated IOPS | p50 us | replicated IOPS | p50 us | p99 us | p50 added us | goal | |")
print("|---|---|---:|---:|---:|---:|---:|---:|---|---|")
print("\n".join(rows))
print("\n```json\n" + json.dumps(raw, indent=1) + "\n```")
PY
cat bench-mirror.md | sed -n 1,12p
