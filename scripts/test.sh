#!/usr/bin/env bash
# Everything the tests need, then the tests: set-up (idempotent), unit tests, whole-flow tests
# (node + rclpy peer, CLI on real images). `.ci/run` calls exactly this.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup.sh
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-73}"
source scripts/env.sh
# Integration tests start ROS nodes; run them one at a time so their DDS traffic stays apart.
cargo test --release -- --test-threads=1
# The core and the CLI also build without ROS (checked, not linked: a full second build with
# other feature sets of shared dependencies costs minutes for nothing more).
cargo check --release --no-default-features --lib --bins
