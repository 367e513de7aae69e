#!/usr/bin/env bash
# DR figures: host latency in sync and async mode and the recovery point with 0, 1 and 10 ms added
# to each direction of the DR link, and the full copy's speed. Both nvmetro-tgt processes run
# adaptive on core 0; the host is the test process. DR_SECS sets each case's length (default 4).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --workspace --bins
cargo test --release -p nvmetro-tests --test dr dr_figures_benchmark -- --ignored --nocapture
