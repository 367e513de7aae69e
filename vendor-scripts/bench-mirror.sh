#!/usr/bin/env bash
# Replicated vs unreplicated 8 KiB random writes, all measured in one run:
#   * unreplicated: one target on core 0;
#   * shared: sites A and B both on core 0 (two sites sharing a core);
#   * split: site A on core 0, site B on core 1, with 0, 150 us and 1 ms of link round trip
#     added in-process;
#   * busy host: the split layout with a busy-polling host spinning on core 1 beside site B;
#   * lanes: the shared and split layouts again over a link of LANES (default 3) connections
#     (LANES=1 repeats them with one: the run's own noise);
#   * lanes on reactors: both sites with two reactors (cores 0 and 1; the link on one, the
#     workers of lanes 1.. on the other) over LANES lanes, beside the split layout over as many
#     lanes, each at QD1 and at QD32 as two connections of QD16;
#   * during a resync: QD1 writes at A while B, restarted after 2 s of QD32 writes without it,
#     resyncs (and how long the resync took);
#   * reads: 4 KiB random reads at QD32, unreplicated and at replicated site A (served locally);
#   * syscalls per replicated write at site A (strace -c, when strace is installed), heap
#     allocations per replicated write and per read (the counting-allocator tests, release build);
#   * the echo floor: `nvmetro-perf suite` (a bare loopback TCP echo with the same sizes beside
#     each unreplicated case), unless SUITE=0.
# Every target polls in adaptive mode; the host is nvmetro-perf on core 1 (blocking unless the
# case says busy). Legs are files on /dev/shm (RAM), so the figures show the cost of replication.
#
#   vendor-scripts/bench-mirror.sh [SECONDS]      (default 5 s per case; NVMETRO_BIN=DIR for
#                                                  another build's binaries)
# Prints a Markdown table and writes it, with the raw JSON, to bench-mirror.md.
set -euo pipefail
cd "$(dirname "$0")/.."
T=${1:-5}
# NVMETRO_BIN: the directory of another build's binaries (a baseline), instead of this tree's.
if [ -z "${NVMETRO_BIN:-}" ]; then
  cargo build --release -q --workspace --bins
  BIN=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release
else
  BIN=$NVMETRO_BIN
fi
W=$(mktemp -d /dev/shm/nvmetro-bench.XXXX)
trap 'pkill -f "$W" 2>/dev/null || true; [ -n "${KEEP:-}" ] || rm -rf "$W"' EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
NQN=nqn.2026-11.io.nvmetro:bench-mirror

target_cfg() { # file listen-port bdev-section cntlid-range bdev core
  cat > "$1" <<CFG
[target]
cores = [$6]
poll_mode = "adaptive"
socket = "$1.sock"
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

perf() { # port qd json [extra flags]; RW, BS: other than 8 KiB random writes
  local p=$1 qd=$2 out=$3; shift 3
  "$BIN/nvmetro-perf" --addr 127.0.0.1:$p --nqn $NQN --rw ${RW:-randwrite} --bs ${BS:-8k} --qd $qd --time ${T}s --ramp 1s --cores 1 -q --json "$out" "$@" \
    || echo '{"total": {"iops": 0, "latency_us": {"p50": 0, "p99": 0}}}' > "$out"
}

# SPDK_PERF=path/to/spdk_nvme_perf: the unreplicated and both-on-core-0 cases also run with SPDK's
# host (busy polling on core 1; it wants 2 MiB hugepages reserved and hugetlbfs on /dev/hugepages).
spdk_perf() { # port qd json
  [ -n "${SPDK_PERF:-}" ] || return 0
  "$SPDK_PERF" -c 0x2 -q $2 -o 8192 -w randwrite -t $T -L \
    -r "trtype:TCP adrfam:IPv4 traddr:127.0.0.1 trsvcid:$1 subnqn:$NQN" > "$3.txt" 2>&1 || true
  python3 - "$3.txt" > "$3" <<'PY'
import json, re, sys
text = open(sys.argv[1]).read()
iops = re.search(r"^Total\s*:\s*([\d.]+)", text, re.M)
pct = {float(p): float(v) for p, v in re.findall(r"^\s*([\d.]+)%\s*:\s*([\d.]+)us", text, re.M)}
def at(p):
    return min((v for q, v in pct.items() if q >= p), default=0)
print(json.dumps({"total": {"iops": float(iops.group(1)) if iops else 0, "latency_us": {"p50": at(50), "p99": at(99)}}}))
PY
}

mirror_section() { # role link-port meta delay [lanes]
  local end="peer = \"127.0.0.1:$2\""
  [ "$1" = preferred ] && end="listen = \"127.0.0.1:$2\""
  printf '[[bdev]]\nname = "m"\nkind = "mirror"\nlocal = "leg"\nrole = "%s"\n%s\nmetadata = "%s"\nsecret = "bench-mirror-secret-0123"\n%s\n%s\n' \
    "$1" "$end" "$3" "$([ "${5:-1}" -gt 1 ] && echo "lanes = $5")" "$([ "$4" -gt 0 ] && echo "link_delay = \"${4}us\"")"
}

in_sync() { # config: the leg and its peer UpToDate and connected
  "$BIN/nvmetro" --config "$1" rpc bdev_get_bdevs 2>/dev/null | python3 -c '
import json, sys
ms = [b["mirror"] for b in json.load(sys.stdin) if b.get("mirror")]
sys.exit(0 if ms and all(m["disk"] == "UpToDate" and m["peer_disk"] == "UpToDate" and m["link"] == "Connected" for m in ms) else 1)'
}

wait_sync() { # config -> prints seconds until in sync
  local start=$(date +%s.%N)
  for _ in $(seq 1200); do in_sync "$1" && { python3 -c "print(f'{$(date +%s.%N) - $start:.2f}')"; return; }; sleep 0.05; done
  echo "nan"
}

start_pair() { # name cores-of-B delay [lanes [cores-of-A]] -> sets PA PB pa pb
  local name=$1 bcore=$2 delay=$3 lanes=${4:-1} acore=${5:-0} link
  link=$(port); pa=$(port); pb=$(port)
  target_cfg "$W/$name-a.toml" $pa "$(mirror_section preferred $link "$W/$name-a.meta" $delay $lanes)" "1, 99" m "$acore"
  target_cfg "$W/$name-b.toml" $pb "$(mirror_section secondary $link "$W/$name-b.meta" $delay $lanes)" "100, 199" m "$bcore"
  "$BIN/nvmetro-tgt" --config "$W/$name-a.toml" --log warn & PA=$!
  "$BIN/nvmetro-tgt" --config "$W/$name-b.toml" --log warn & PB=$!
  wait_port $pa; wait_port $pb
  wait_sync "$W/$name-a.toml" > /dev/null
}

stop_pair() { kill $PA $PB 2>/dev/null || true; wait $PA $PB 2>/dev/null || true; rm -f "$W/$1"-a.* "$W/$1"-b.*; }

# Unreplicated baseline.
p0=$(port); target_cfg "$W/plain.toml" $p0 "" "1, 99" leg 0
"$BIN/nvmetro-tgt" --config "$W/plain.toml" --log warn & PT=$!
wait_port $p0
perf $p0 1 "$W/plain-qd1.json"; perf $p0 32 "$W/plain-qd32.json"
RW=randread BS=4k perf $p0 32 "$W/plain-read.json"
spdk_perf $p0 1 "$W/spdk-plain-qd1.json"; spdk_perf $p0 32 "$W/spdk-plain-qd32.json"
kill $PT; wait $PT 2>/dev/null || true; rm -f "$W"/plain.toml*

# Both sites on core 0.
start_pair shared 0 0
perf $pa 1 "$W/shared-qd1.json"; perf $pa 32 "$W/shared-qd32.json"
RW=randread BS=4k perf $pa 32 "$W/shared-read.json"
spdk_perf $pa 1 "$W/spdk-shared-qd1.json"; spdk_perf $pa 32 "$W/spdk-shared-qd32.json"
stop_pair shared

# Site B on core 1, with distance.
for delay in 0 75 500; do
  start_pair split$delay 1 $delay
  perf $pa 1 "$W/split$delay-qd1.json"; perf $pa 32 "$W/split$delay-qd32.json"
  if [ $delay = 0 ]; then
    perf $pa 1 "$W/busyhost-qd1.json" --busy-poll
    if command -v strace > /dev/null; then
      # Syscalls per replicated write at A (strace slows the site: only counts mean anything).
      timeout 20 strace -c -f -q -p $PA -o "$W/strace.txt" & ST=$!
      sleep 1
      perf $pa 1 "$W/strace-qd1.json"
      kill -INT $ST 2>/dev/null || true; wait $ST 2>/dev/null || true
    fi
    # During a resync: B stops, A takes 2 s of writes alone, B comes back and resyncs under load.
    kill -9 $PB; wait $PB 2>/dev/null || true
    "$BIN/nvmetro-perf" --addr 127.0.0.1:$pa --nqn $NQN --rw randwrite --bs 8k --qd 32 --time 2s --ramp 0s --cores 1 -q > /dev/null
    "$BIN/nvmetro-tgt" --config "$W/split$delay-b.toml" --log warn & PB=$!
    wait_port $pb
    (wait_sync "$W/split$delay-a.toml" > "$W/resync-seconds") &
    SYNC=$!
    perf $pa 1 "$W/resync-qd1.json"
    wait $SYNC
  fi
  stop_pair split$delay
done

# The same layouts over a link of several lanes.
LANES=${LANES:-3}
start_pair lanes-shared 0 0 $LANES
perf $pa 1 "$W/lanes-shared-qd1.json"; perf $pa 32 "$W/lanes-shared-qd32.json"
stop_pair lanes-shared
start_pair lanes-split 1 0 $LANES
perf $pa 1 "$W/lanes-split-qd1.json"; perf $pa 32 "$W/lanes-split-qd32.json"
perf $pa 16 "$W/lanes-split-2x16.json" --connections 2
stop_pair lanes-split
# Lanes on reactors of their own: both sites on two reactors.
start_pair lanes-reactors "1, 0" 0 $LANES "0, 1"
perf $pa 1 "$W/lanes-reactors-qd1.json"; perf $pa 16 "$W/lanes-reactors-2x16.json" --connections 2
"$BIN/nvmetro" --config "$W/lanes-reactors-a.toml" rpc nvmetro_status > "$W/lanes-reactors-status.json" 2>/dev/null || true
stop_pair lanes-reactors

# Heap allocations per I/O (both sites in one process, under a counting allocator).
if [ -z "${NVMETRO_BIN:-}" ]; then
  cargo test --release -q -p nvmetro-tgt --test write_allocations --test read_allocations -- --nocapture > "$W/allocs.txt" 2>&1 || true
fi
if [ "${SUITE:-1}" != 0 ]; then
  "$BIN/nvmetro-perf" suite --target-bin "$BIN/nvmetro-tgt" --time ${T}s --runs 1 --out "$W/suite.md" > /dev/null 2>&1 || true
fi

python3 - "$W" "$T" > "${OUT:-bench-mirror.md}" <<'PY'
import json, os, re, sys
w, secs = sys.argv[1], sys.argv[2]
def load(name):
    return json.load(open(f"{w}/{name}.json"))["total"]
def lat(r, p):
    return r["latency_us"].get(p, 0)
plain = {qd: load(f"plain-qd{qd}") for qd in (1, 32)}
rows, raw = [], {"unreplicated": plain}
def row(case, qd, r, rtt, goal_kind):
    p = plain[qd]
    pp, rp = lat(p, "p50"), lat(r, "p50")
    ratio = r["iops"] / p["iops"] if p["iops"] else 0
    if goal_kind == "shared1":
        goal, met = f"p50 <= {pp:.1f} + 40 us", rp and rp <= pp + 40
    elif goal_kind == "shared32":
        goal, met = ">= 70% of unreplicated IOPS", ratio >= 0.7
    elif goal_kind == "split1":
        goal, met = f"p50 <= {pp:.1f} + loopback RTT + {rtt} + 15 us", None
    elif goal_kind == "split32":
        goal, met = ">= 80% of unreplicated IOPS" if rtt == 0 else "-", (ratio >= 0.8) if rtt == 0 else None
    else:
        goal, met = goal_kind, None
    mark = "" if met is None else ("met" if met else "not met")
    rows.append(f"| {case} | QD{qd} | {p['iops']:.0f} / {pp:.1f} | {r['iops']:.0f} / {rp:.1f} / {lat(r, 'p99'):.1f} | {rp - pp:+.1f} | {100 * ratio:.0f}% | {goal} | {mark} |")
for qd in (1, 32):
    r = load(f"shared-qd{qd}"); raw[f"shared-qd{qd}"] = r
    row("both sites on core 0", qd, r, 0, f"shared{qd}")
for d in (0, 75, 500):
    for qd in (1, 32):
        r = load(f"split{d}-qd{qd}"); raw[f"split{d}-qd{qd}"] = r
        row(f"B on core 1, +{2 * d} us RTT", qd, r, 2 * d, f"split{qd}")
lanes = os.environ.get("LANES", "3")
for layout, name, one in (("both sites on core 0", "shared", "shared"), ("B on core 1", "split", "split0")):
    for qd in (1, 32):
        r = load(f"lanes-{name}-qd{qd}"); raw[f"lanes-{name}-qd{qd}"] = r
        one_lane = raw[f"{one}-qd{qd}"]
        row(f"{layout}, {lanes} lanes", qd, r, 0, f"vs 1 lane: {r['iops'] / one_lane['iops'] if one_lane['iops'] else 0:.2f}x IOPS, p50 {lat(r, 'p50') - lat(one_lane, 'p50'):+.1f} us")
ls1, ls2 = load("lanes-split-qd1"), load("lanes-split-2x16")
lr1, lr2 = load("lanes-reactors-qd1"), load("lanes-reactors-2x16")
raw.update({"lanes-split-2x16": ls2, "lanes-reactors-qd1": lr1, "lanes-reactors-2x16": lr2})
on = "?"
try:
    m = json.load(open(f"{w}/lanes-reactors-status.json"))["subsystems"][0]["namespaces"][0]["mirror"]
    on = f"{m['lanes_on_reactors']} of {m['lanes_up']}"
except Exception:
    pass
row(f"both sites on 2 reactors, {lanes} lanes ({on} on reactors of their own)", 1, lr1, 0, f"vs A core 0 / B core 1 over {lanes} lanes: {lr1['iops'] / ls1['iops'] if ls1['iops'] else 0:.2f}x IOPS, p50 {lat(lr1, 'p50') - lat(ls1, 'p50'):+.1f} us")
row(f"both sites on 2 reactors, {lanes} lanes, 2 connections x QD16", 32, lr2, 0, f"vs A core 0 / B core 1 over {lanes} lanes, same load: {lr2['iops'] / ls2['iops'] if ls2['iops'] else 0:.2f}x IOPS ({ls2['iops']:.0f})")
split1 = load("split0-qd1")
busy = load("busyhost-qd1"); raw["busyhost-qd1"] = busy
row("B on core 1 beside a busy-polling host", 1, busy, 0, f"p50 <= 2 x {lat(split1, 'p50'):.1f} (blocking host)")
res = load("resync-qd1"); raw["resync-qd1"] = res
resync_s = open(f"{w}/resync-seconds").read().strip()
ratio = res["iops"] / split1["iops"] if split1["iops"] else 0
print("# Replicated vs unreplicated, 8 KiB random writes\n")
print(f"All targets adaptive polling; nvmetro-perf on core 1 (blocking unless stated); legs on /dev/shm; {secs} s per case; link delay added in-process on both sites.\n")
print("| case | depth | unreplicated IOPS / p50 us | replicated IOPS / p50 / p99 us | p50 added us | IOPS ratio | goal | |")
print("|---|---|---:|---:|---:|---:|---|---|")
print("\n".join(rows))
print(f"\nDuring a resync (B restarted after 2 s of QD32 writes at A alone): QD1 {res['iops']:.0f} IOPS, p50 {lat(res, 'p50'):.1f} us, p99 {lat(res, 'p99'):.1f} us = {100 * ratio:.0f}% of the IOPS without a resync (goal >= 80%); back in sync {resync_s} s after B restarted.\n")
pr, sr = load("plain-read"), load("shared-read")
raw["plain-read"], raw["shared-read"] = pr, sr
print(f"Reads, 4 KiB random QD32: unreplicated {pr['iops']:.0f} IOPS, p50 {lat(pr, 'p50'):.1f} us; at replicated site A (both sites on core 0) {sr['iops']:.0f} IOPS, p50 {lat(sr, 'p50'):.1f} us ({100 * sr['iops'] / pr['iops'] if pr['iops'] else 0:.0f}%).\n")
if os.path.exists(f"{w}/strace.txt"):
    st = load("strace-qd1")
    writes = st["iops"] * (float(secs) + 1)  # the ramp second is traced too
    calls = {m.group(2): int(m.group(1)) for m in re.finditer(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", open(f"{w}/strace.txt").read(), re.M)}
    if writes and calls:
        top = sorted(((k, v) for k, v in calls.items() if k != "total"), key=lambda kv: -kv[1])[:8]
        print("Syscalls per replicated 8 KiB write at site A (QD1, B on core 1, strace -c -f): " + ", ".join(f"{name} {n / writes:.2f}" for name, n in top) + ".\n")
if os.path.exists(f"{w}/allocs.txt"):
    for line in open(f"{w}/allocs.txt"):
        if "allocations over" in line:
            print(f"Heap allocations (counting allocator, release build): {line.strip()}\n")
if os.path.exists(f"{w}/suite.md"):
    print("`nvmetro-perf suite` (unreplicated, each case beside its loopback echo floor):\n")
    text = open(f"{w}/suite.md").read()
    print(text.split("```json")[0].strip() + "\n")
if os.path.exists(f"{w}/spdk-plain-qd1.json"):
    print("With SPDK's `spdk_nvme_perf` as the host (busy polling on core 1), both sites on core 0:\n")
    print("| depth | unreplicated IOPS / p50 us | replicated IOPS / p50 / p99 us | p50 added us | IOPS ratio | goal | |")
    print("|---|---:|---:|---:|---:|---|---|")
    for qd in (1, 32):
        p, r = load(f"spdk-plain-qd{qd}"), load(f"spdk-shared-qd{qd}")
        raw[f"spdk-plain-qd{qd}"], raw[f"spdk-shared-qd{qd}"] = p, r
        pp, rp = lat(p, "p50"), lat(r, "p50")
        ratio = r["iops"] / p["iops"] if p["iops"] else 0
        goal, met = (f"p50 <= {pp:.1f} + 40 us", rp and rp <= pp + 40) if qd == 1 else (">= 70% of unreplicated IOPS", ratio >= 0.7)
        print(f"| QD{qd} | {p['iops']:.0f} / {pp:.1f} | {r['iops']:.0f} / {rp:.1f} / {lat(r, 'p99'):.1f} | {rp - pp:+.1f} | {100 * ratio:.0f}% | {goal} | {'met' if met else 'not met'} |")
    print()
print("```json\n" + json.dumps(raw, indent=1) + "\n```")
PY
sed -n 1,20p "${OUT:-bench-mirror.md}"
