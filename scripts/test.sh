#!/usr/bin/env bash
# Everything the tests need, then the tests: set-up (idempotent), unit tests, whole-flow tests
# (node + rclpy peer, CLI on real images). `.ci/run` calls exactly this.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-73}"
source scripts/env.sh
# The tests run the node, an rclpy peer and the test process on 2 cores at once: OpenMP threads
# that busy-wait between torch ops would starve the others (measured: DRAEM steps 8x slower under
# load). On an idle machine active waiting is faster (node at 640x480: 74 vs 124 ms median), so
# only the tests ask for passive waiting.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# The rules that check themselves (CODE_STYLE.md): formatting, then clippy with the [lints] of
# Cargo.toml on every target, on the studies in examples/ (feature studies), and on the core and
# the CLI without ROS (checked, not linked: a second full build with other feature sets of
# shared dependencies costs minutes for nothing more).
cargo fmt --check
cargo clippy --release --all-targets -- -D warnings
cargo clippy --release --features studies --examples -- -D warnings
cargo clippy --release --no-default-features --lib --bins -- -D warnings
# Integration tests start ROS nodes; run them one at a time so their DDS traffic stays apart.
cargo test --release -- --test-threads=1
# The colcon route a ROS developer takes (README, "In a ROS 2 workspace"): colcon from PyPI, a
# fresh workspace built by `colcon build`, the installed node answering an rclpy peer. About
# 5 minutes on 2 cores; ANOMALY_INSPECTOR_SKIP_COLCON=1 leaves it out of a quick local run.
if [ "${ANOMALY_INSPECTOR_SKIP_COLCON:-0}" != 1 ]; then
  bash scripts/colcon_check.sh
fi
