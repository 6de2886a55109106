#!/usr/bin/env bash
# The colcon route, proven: what a ROS developer does instead of scripts/setup.sh.
#
#   scripts/colcon_check.sh          (scripts/test.sh, hence CI, runs it after the tests; about
#                                    5 minutes on 2 cores, most of it the release build)
#
# 1. colcon and its cargo extensions from PyPI, in their own venv (they are tools, not part of
#    the ROS environment); colcon-ros-cargo brings cargo-ament-build as a PyPI wheel;
# 2. a fresh workspace target/colcon_ws/src/anomaly_inspector holding this checkout's files;
# 3. `colcon build` of both packages (anomaly_inspector_msgs with ament_cmake, the node with
#    ament_cargo) against the ROS "underlay" only, i.e. without this repository's .ros_overlay;
# 4. from the install space: the installed CLI makes and fits a small synthetic part, the
#    installed node runs on it, and an rclpy peer using the interfaces from the install space
#    gets a result for every frame.
#
# The underlay. On an apt install it is `source /opt/ros/kilted/setup.bash`. Here ROS 2 comes
# from PyPI wheels in .venv (../shared/PLATFORM.md), so the same variables are set by hand:
# AMENT_PREFIX_PATH/CMAKE_PREFIX_PATH = .venv, the wheels' library dirs on LD_LIBRARY_PATH, the
# venv's Python for CMake (-DPython3_EXECUTABLE: the wheels' CMake files need it), and
# ROS_DISTRO=jazzy (r2r 0.9.7 does not know kilted; Jazzy's cfgs match Kilted's headers).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
t_start=$(date +%s)
step() { printf '\n\033[1m==> %s\033[0m (%d s)\n' "$*" "$(( $(date +%s) - t_start ))"; }

bash scripts/setup.sh --no-build > target/colcon_setup.log 2>&1 || { tail -30 target/colcon_setup.log; exit 1; }
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
SITE="$VENV/lib/python3.11/site-packages"
TOOLS="$ROOT/target/colcon_tools"
WS="$ROOT/target/colcon_ws"

step "colcon and its cargo extensions (PyPI) in $TOOLS"
COLCON_PKGS=(colcon-common-extensions==0.3.0 colcon-cargo==0.2.0 colcon-ros-cargo==0.2.0)
if [ "$(cat "$TOOLS/.done" 2>/dev/null)" != "${COLCON_PKGS[*]}" ]; then
  rm -rf "$TOOLS"
  /usr/bin/python3.11 -m venv "$TOOLS"
  "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check "${COLCON_PKGS[@]}"
  [ -x "$TOOLS/bin/cargo-ament-build" ] || { echo "colcon-ros-cargo did not bring cargo-ament-build" >&2; exit 1; }
  echo "${COLCON_PKGS[*]}" > "$TOOLS/.done"
else
  echo "already installed"
fi

step "fresh workspace $WS"
rm -rf "$WS"
mkdir -p "$WS/src/anomaly_inspector"
# This checkout's files as git sees them (committed or not, ignored ones left out), plus the
# converted ImageNet weights a user makes once with scripts/convert_weights.py.
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$WS/src/anomaly_inspector"
cp models/efficientnet_lite0.safetensors "$WS/src/anomaly_inspector/models/"

# cargo from rustup (CI's runner) or wherever this shell finds it.
CARGO_BIN="$(dirname "$(command -v cargo || echo "$HOME/.cargo/bin/cargo")")"
# The underlay, and nothing of this repository's own environment (scripts/env.sh is not sourced).
ld="$VENV/lib"
for d in "$SITE"/ros_*.libs; do ld="$ld:$d"; done
underlay=(
  env -i HOME="$HOME" USER="${USER:-user}" TERM="${TERM:-dumb}"
  PATH="$TOOLS/bin:$CARGO_BIN:/usr/local/bin:/usr/bin:/bin"
  AMENT_PREFIX_PATH="$VENV" CMAKE_PREFIX_PATH="$VENV" LD_LIBRARY_PATH="$ld"
  ROS_DISTRO=jazzy ROS_VERSION=2 ROS_PYTHON_VERSION=3 RMW_IMPLEMENTATION=rmw_fastrtps_cpp
  LIBTORCH="$SITE/torch"
  ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_DOMAIN_ID=86 ROS_HOME="$WS/ros_home"
  OMP_WAIT_POLICY=PASSIVE
)

step "colcon build (anomaly_inspector_msgs, then anomaly_inspector with cargo --release)"
t_build=$(date +%s)
(cd "$WS" && "${underlay[@]}" colcon build \
    --paths src/anomaly_inspector src/anomaly_inspector/msg \
    --event-handlers console_cohesion+ \
    --cargo-args --release \
    --cmake-args -DPython3_EXECUTABLE="$VPY" -DBUILD_TESTING=OFF) > "$WS/build.log" 2>&1 \
  || { tail -60 "$WS/build.log"; echo "colcon build failed (log: $WS/build.log)" >&2; exit 1; }
build_s=$(( $(date +%s) - t_build ))
echo "colcon build took ${build_s} s"
LIB="$WS/install/anomaly_inspector/lib/anomaly_inspector"
for f in "$LIB/anomaly_inspector_node" "$LIB/anomaly_inspector" \
         "$WS/install/anomaly_inspector/share/anomaly_inspector/launch/anomaly_inspector.launch.py" \
         "$WS/install/anomaly_inspector/share/anomaly_inspector/package.xml" \
         "$WS/install/anomaly_inspector/share/ament_index/resource_index/packages/anomaly_inspector" \
         "$WS/install/anomaly_inspector_msgs/share/anomaly_inspector_msgs/msg/AnomalyResult.msg"; do
  [ -e "$f" ] || { echo "not installed: $f" >&2; exit 1; }
done
# The node must take the interfaces from the install space, not from this repository.
if readelf -d "$LIB/anomaly_inspector_node" | grep -q "$ROOT/.ros_overlay"; then
  echo "the installed node links this repository's .ros_overlay" >&2; exit 1
fi

step "from the install space: fit a small synthetic part, run the node, an rclpy peer"
# `source install/setup.bash` as a user does, inside the underlay. The binaries are in
# lib/anomaly_inspector (what `ros2 run anomaly_inspector ...` starts; ros2cli is not on PyPI).
in_ws() { (cd "$WS" && "${underlay[@]}" bash -c "set -e; source install/setup.bash; $1"); }
msgs_at=$(in_ws "'$VPY' -c 'import anomaly_inspector_msgs; print(anomaly_inspector_msgs.__file__)'")
case "$msgs_at" in
  "$WS/install/"*) echo "peer imports anomaly_inspector_msgs from $msgs_at" ;;
  *) echo "anomaly_inspector_msgs not taken from the install space: $msgs_at" >&2; exit 1 ;;
esac
in_ws "$LIB/anomaly_inspector synth --out data --n-train 20 > synth.log"
in_ws "$LIB/anomaly_inspector fit --data data --out model --name colcon_check > fit.log 2>&1" \
  || { tail -20 "$WS/fit.log"; exit 1; }
mapfile -t IMAGES < <(find "$WS/data/test" -name '*.png' | sort)
(cd "$WS" && exec "${underlay[@]}" bash -c "source install/setup.bash; exec $LIB/anomaly_inspector_node --ros-args -p model:=$WS/model") \
  > "$WS/node.log" 2>&1 &
NODE_PID=$!
cleanup() { kill -TERM "$NODE_PID" 2>/dev/null || true; wait "$NODE_PID" 2>/dev/null || true; }
trap cleanup EXIT
peer_ok=1
in_ws "'$VPY' '$ROOT/scripts/image_peer.py' --images ${IMAGES[*]} --summary '$WS/summary.json'" || peer_ok=0
cleanup; trap - EXIT
grep -E "loaded|waiting for frames" "$WS/node.log" | sed 's/^/node: /' || true
[ "$peer_ok" = 1 ] || { tail -30 "$WS/node.log"; echo "the peer failed" >&2; exit 1; }
"$VPY" - "$WS/summary.json" "${#IMAGES[@]}" <<'PY'
import json, sys
frames = json.load(open(sys.argv[1]))["frames"]
answered = [f for f in frames if f["received"] and f["result_stamp_ns"] == f["stamp_ns"]]
assert len(answered) == int(sys.argv[2]), f"{len(answered)} of {sys.argv[2]} frames answered"
print(f"{len(answered)}/{sys.argv[2]} frames answered by the colcon-installed node")
PY
echo "colcon check passed in $(( $(date +%s) - t_start )) s (colcon build ${build_s} s)"
