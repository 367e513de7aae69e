#!/usr/bin/env bash
# Host-visible pause of a planned switchover of a metro pair, measured: site A, site B and the
# witness as processes on 127.0.0.1, a verifying multipath workload (QD4, 30% reads) from a host
# of site A; `nvmetro switchover m` at A, then (a new load) SIGTERM of A. The pause is the
# slowest command (or the longest stall) of each load. Prints median, worst and best of
# SWITCHOVER_RUNS (default 5) runs.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
SWITCHOVER_RUNS="${SWITCHOVER_RUNS:-5}" cargo test --release -p nvmetro-tests --test metro switchover_pause_benchmark -- --ignored --nocapture 2>&1 |
    grep -E "^run |pause median"
