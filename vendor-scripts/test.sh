#!/usr/bin/env bash
# nvmetro's whole test suite, as CI runs it (`.ci/run` calls this):
#   formatting, clippy -D warnings, unit + property + end-to-end tests, bounded fuzzing of the
#   PDU parser, the target queue and the NVMe/RDMA capsule decoder, and the Linux-host lab (a real Debian kernel under QEMU).
#
#   vendor-scripts/test.sh            everything
#   LAB=0 vendor-scripts/test.sh      skip the lab (no QEMU)
#   FUZZ_SECONDS=60 ...               longer fuzzing (default 30 s per target)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TERM_COLOR=never
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
step() { echo; echo "=== $*"; }

step "toolchain"
if ! command -v cargo >/dev/null; then
  echo "cargo not found: install Rust 1.87 or newer (rustup) first" >&2; exit 1
fi
cargo --version
# System packages the build and tests need (idempotent; quick when present).
need=()
command -v cc >/dev/null || need+=(gcc libc6-dev)
command -v python3 >/dev/null || need+=(python3)
# nvmetro-ffi's `rdma` feature (RDMA verbs, rdma-sys): rdma-core headers, and libclang for bindgen.
[ -e /usr/include/infiniband/verbs.h ] || need+=(libibverbs-dev)
[ -e /usr/include/rdma/rdma_cma.h ] || need+=(librdmacm-dev)
ls /usr/lib/llvm-*/lib/libclang.so >/dev/null 2>&1 || need+=(libclang-dev)
command -v pkg-config >/dev/null || need+=(pkg-config)
# The metrics test lints the exposition with promtool and has a real Prometheus server scrape it.
command -v promtool >/dev/null && command -v prometheus >/dev/null || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
  $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -D warnings"
cargo clippy -q --workspace --all-targets -- -D warnings
cargo clippy -q -p nvmetro-ffi --features rdma --all-targets -- -D warnings
cargo clippy -q -p nvmetro-tgt --features rdma --all-targets -- -D warnings
cargo clippy -q -p nvmetro-perf --features rdma --all-targets -- -D warnings

step "build binaries (the end-to-end tests run them)"
cargo build -q --workspace --bins

step "cargo test"
log=$(mktemp)
cargo test --workspace 2>&1 | tee "$log"
# The RDMA verbs layer's own tests (a host without RDMA checks the no-device path; the lab runs
# rdma_pingpong on a Soft-RoCE device).
cargo test -p nvmetro-ffi --features rdma --lib -- rdma:: 2>&1 | tee -a "$log"
# nvmetro-tgt with its `rdma` feature: its unit tests, and an RDMA listener on a machine without
# an RDMA device failing to start with a clear reason (the lab serves Linux's nvme-rdma host).
cargo build -q -p nvmetro-tgt --features rdma
cargo test -p nvmetro-tgt --features rdma --lib --test rdma_listener 2>&1 | tee -a "$log"
passed=$(awk '/^test result:/{for(i=1;i<=NF;i++) if($i=="passed;") s+=$(i-1)} END{print s+0}' "$log")
failed=$(awk '/^test result:/{for(i=1;i<=NF;i++) if($i=="failed;") s+=$(i-1)} END{print s+0}' "$log")
rm -f "$log"

step "fuzzing (${FUZZ_SECONDS:-30} s per target)"
if ! command -v cargo-fuzz >/dev/null; then cargo install cargo-fuzz --locked -q; fi
for t in pdu_parse target_queue link_auth mirror_frame dr_frame rdma_capsule; do
  # cargo-fuzz needs nightly-only flags; RUSTC_BOOTSTRAP lets the stable compiler accept them.
  (cd fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run "$t" --target-dir ../build/fuzz -- \
      -max_total_time="${FUZZ_SECONDS:-30}" -print_final_stats=1 2>&1 | grep -E "stat::number_of_executed_units|Done|ERROR|panicked" ) \
    && { echo "fuzz $t: no crash"; passed=$((passed+1)); } \
    || { echo "fuzz $t: FAILED"; failed=$((failed+1)); }
done

if [ "${LAB:-1}" != 0 ]; then
  step "Linux-host lab (QEMU, stock Debian kernel, nvme-cli, fio)"
  if vendor-scripts/lab.sh test; then passed=$((passed+1)); else failed=$((failed+1)); fi
fi

echo
echo "nvmetro: $passed passed, $failed failed"
[ "$failed" = 0 ]
