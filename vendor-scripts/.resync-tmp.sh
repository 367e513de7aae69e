#!/usr/bin/env bash
# Replicated vs unreplicated 8 KiB random writes, all measured in one run:
#   * unreplicated: one target on core 0;
#   * shared: sites A and B both on core 0 (two sites sharing a core);
#   * split: site A on core 0, site B on core 1, with 0, 150 us and 1 ms of link round trip
#     added in-process;
#   * busy host: the split layout with a busy-polling host spinning on core 1 beside site B;
#   * lanes: the shared and split layouts again over a link of LANES (default 3) connections
#     (LANES=1 repeats them with one: the run's own noise);
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
  true
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

start_pair() { # name core-of-B delay [lanes] -> sets PA PB pa pb
  local name=$1 bcore=$2 delay=$3 lanes=${4:-1} link
  link=$(port); pa=$(port); pb=$(port)
  target_cfg "$W/$name-a.toml" $pa "$(mirror_section preferred $link "$W/$name-a.meta" $delay $lanes)" "1, 99" m 0
  target_cfg "$W/$name-b.toml" $pb "$(mirror_section secondary $link "$W/$name-b.meta" $delay $lanes)" "100, 199" m $bcore
  "$BIN/nvmetro-tgt" --config "$W/$name-a.toml" --log warn & PA=$!
  "$BIN/nvmetro-tgt" --config "$W/$name-b.toml" --log warn & PB=$!
  wait_port $pa; wait_port $pb
  wait_sync "$W/$name-a.toml" > /dev/null
}

stop_pair() { kill $PA $PB 2>/dev/null || true; wait $PA $PB 2>/dev/null || true; rm -f "$W/$1"-a.* "$W/$1"-b.*; }
start_pair rs 1 0 ${L:-1}
"$BIN/nvmetro-perf" --addr 127.0.0.1:$pa --nqn $NQN --rw randwrite --bs 8k --qd 1 --time 3s --ramp 0s --cores 1 -q --json $W/pre.json > /dev/null
kill -9 $PB; wait $PB 2>/dev/null || true
"$BIN/nvmetro-perf" --addr 127.0.0.1:$pa --nqn $NQN --rw randwrite --bs 8k --qd 32 --time 2s --ramp 0s --cores 1 -q > /dev/null
"$BIN/nvmetro-tgt" --config "$W/rs-b.toml" --log warn & PB=$!
wait_port $pb
(wait_sync "$W/rs-a.toml" > "$W/resync-seconds") &
SYNC=$!
perf $pa 1 "$W/resync-qd1.json"
wait $SYNC
python3 -c "
import json; a=json.load(open('$W/pre.json'))['total']; b=json.load(open('$W/resync-qd1.json'))['total']
print(f'before {a[\"iops\"]:.0f} IOPS, during resync {b[\"iops\"]:.0f} IOPS p50 {b[\"latency_us\"][\"p50\"]:.0f} ({100*b[\"iops\"]/a[\"iops\"]:.0f}%), sync {open(\"$W/resync-seconds\").read().strip()} s')"
stop_pair rs
