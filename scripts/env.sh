# Source this file (bash): `source scripts/env.sh`. It gives builds, tests, the demo and your
# shell the same environment: the venv as an ament prefix, the interface overlay, libtorch.
# Safe to source more than once.
_AI_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_AI_VENV="$_AI_ROOT/.venv"
_AI_SITE="$_AI_VENV/lib/python3.11/site-packages"

export ANOMALY_INSPECTOR_ROOT="$_AI_ROOT"
export AMENT_PREFIX_PATH="$_AI_ROOT/.ros_overlay:$_AI_VENV"
export CMAKE_PREFIX_PATH="$_AI_ROOT/.ros_overlay:$_AI_VENV"
# r2r 0.9.7 panics on ROS_DISTRO=kilted; jazzy selects cfgs that match Kilted's headers.
export ROS_DISTRO=jazzy
export ROS_VERSION=2
export ROS_PYTHON_VERSION=3
export RMW_IMPLEMENTATION=rmw_fastrtps_cpp
# libtorch for tch (torch-sys) comes from the torch 2.13.0 wheel.
export LIBTORCH="$_AI_SITE/torch"
export LIBTORCH_BYPASS_VERSION_CHECK=0
# Python peers (tests, demo) import rclpy and our messages.
export PYTHONPATH="$_AI_ROOT/.ros_overlay/lib/python3.11/site-packages${PYTHONPATH:+:$PYTHONPATH}"
# Shared libraries of the wheels (their RPATHs are wrong once installed) and of our overlay.
# The Rust binaries carry their own rpath and do not need this; Python peers do.
_ai_ld="$_AI_ROOT/.ros_overlay/lib:$_AI_VENV/lib"
for _d in "$_AI_SITE"/ros_*.libs; do [ -d "$_d" ] && _ai_ld="$_ai_ld:$_d"; done
case ":${LD_LIBRARY_PATH:-}:" in
  *":$_AI_VENV/lib:"*) ;;
  *) export LD_LIBRARY_PATH="$_ai_ld${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
esac
# Keep DDS on loopback, always. Pick your own domain with ROS_DOMAIN_ID before sourcing.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-47}"
export ROS_HOME="${ROS_HOME:-$_AI_ROOT/target/ros_home}"
mkdir -p "$ROS_HOME" 2>/dev/null || true
export PATH="$_AI_VENV/bin:$PATH"
unset _d _ai_ld _AI_SITE _AI_VENV _AI_ROOT
