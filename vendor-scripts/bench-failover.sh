#!/usr/bin/env bash
# Failover time of a metro pair, measured: site A, site B and the witness as processes on
# 127.0.0.1, a verifying multipath workload (QD4, 30% reads) from a host of site A; site A is
# SIGKILLed; the load tool reports how long I/O stood still (from the first failed or stranded
# command to the first completion on site B). Prints median, worst and best of FAILOVER_RUNS
# (default 10) runs, with the default timers (heartbeat_timeout 1s).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
FAILOVER_RUNS="${FAILOVER_RUNS:-10}" cargo test --release -p nvmetro-tests --test metro failover_time_benchmark -- --ignored --nocapture 2>&1 |
    grep -E "^run |^failover"
