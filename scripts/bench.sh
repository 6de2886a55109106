#!/usr/bin/env bash
# Speed, side by side, in one run: the node end to end (image published by an rclpy peer ->
# AnomalyResult received), the engine alone (Inspector::inspect on the same frame), and the
# floor (the model's own forward pass + kNN in libtorch), for PatchCore and DRAEM at 256 and
# 512 px, plus each engine stage and the kNN against memory-bank size. Prints tables and writes
# target/bench/report.json. Numbers, not pass/fail: these machines are shared and noisy.
#
#   scripts/bench.sh [--frames N] [--frame WxH] [--no-node] [--soak SECONDS]
#                    [--only patchcore_256,draem_256] [--busy N] [--node-threads N] [--peer-udp]
#                    [--rounds R]
#
# With the node, the same peer is also timed against examples/transport_echo (an r2r node that
# answers each frame at once with an empty result): the transport floor any node pays. The peer
# publishes as a camera on this host should (README, "QoS and large frames"): with
# config/fastdds_large_frames.xml, so a frame over 512 KB travels through shared memory, not in UDP
# fragments (640x480 rgb8 floor about 2.5 ms instead of 10-14); --peer-udp times it without.
# --busy N: N busy loops run on the cores throughout (another program on an industrial PC);
# --node-threads N: the node's inference_threads (default 0: the cores the others leave free).
# --rounds R: afterwards, R more rounds of the engine (at --frame only) and the node alternating,
# model by model: on a machine whose speed drifts between minutes, the ratio node / engine is
# only meaningful between neighbours, so it is taken per round and its median printed.
#
# The models are fitted on the built-in synthetic data (DRAEM for 2 steps only: its speed does
# not depend on its training). Nothing leaves the machine: ROS stays on loopback.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-63}"
source scripts/env.sh          # also sets ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST

FRAMES=30; FRAME=640x480; NODE=1; SOAK=0; ONLY=""; BUSY=0; NODE_THREADS=0; PEER_UDP=0; ROUNDS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --frames) FRAMES="$2"; shift 2 ;;
    --frame) FRAME="$2"; shift 2 ;;
    --no-node) NODE=0; shift ;;
    --soak) SOAK="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    --busy) BUSY="$2"; shift 2 ;;
    --node-threads) NODE_THREADS="$2"; shift 2 ;;
    --peer-udp) PEER_UDP=1; shift ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done

BIN="$ROOT/target/release"
[ -x "$BIN/anomaly_inspector" ] || { echo "build first: scripts/setup.sh" >&2; exit 1; }
DATA="$ROOT/target/demo_data"
OUT="$ROOT/target/bench"
MODELS="$OUT/models"
mkdir -p "$MODELS"
if [ ! -f "$DATA/.complete" ]; then
  "$BIN/anomaly_inspector" synth --out "$DATA"
  touch "$DATA/.complete"
fi
IMAGE="$(find "$DATA/test" -path '*scratch*' -name '*.png' | sort | head -1)"

for size in 256 512; do
  m="$MODELS/patchcore_$size"
  [ -f "$m/model.json" ] || "$BIN/anomaly_inspector" fit --data "$DATA" --out "$m" --image-size "$size"
  m="$MODELS/draem_$size"
  [ -f "$m/model.json" ] || "$BIN/anomaly_inspector" fit --method draem --data "$DATA" --out "$m" \
      --image-size "$size" --steps 2 --checkpoint-every 0
done
ALL=("$MODELS/patchcore_256" "$MODELS/patchcore_512" "$MODELS/draem_256" "$MODELS/draem_512")
if [ -n "$ONLY" ]; then ALL=(); for n in ${ONLY//,/ }; do ALL+=("$MODELS/$n"); done; fi

BUSY_PIDS=()
stop_busy() { for p in "${BUSY_PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap stop_busy EXIT
for _ in $(seq 1 "$BUSY"); do ( while :; do :; done ) & BUSY_PIDS+=($!); done
[ "$BUSY" = 0 ] || echo "($BUSY busy loops running beside the engine and the node)"

echo "== engine stages (anomaly_inspector bench) =="
ARGS=(); for m in "${ALL[@]}"; do ARGS+=(--model "$m"); done
"$BIN/anomaly_inspector" bench "${ARGS[@]}" --image "$IMAGE" --frame "256x256,$FRAME" --iterations 30 \
    --json "$OUT/engine.json"

# This run's node figures only (the summary below reads whatever is there).
rm -f "$OUT"/node_*.json "$OUT"/node_*.overhead "$OUT/transport.json"
# The peer's own Fast DDS profile: a camera's process is where a large frame's transport is chosen.
if [ "$PEER_UDP" = 1 ]; then
  PEER_PROFILE=(env -u FASTDDS_DEFAULT_PROFILES_FILE -u FASTRTPS_DEFAULT_PROFILES_FILE); PEER_HOW="default transports"
else
  PEER_PROFILE=(env FASTDDS_DEFAULT_PROFILES_FILE="${FASTDDS_DEFAULT_PROFILES_FILE:-$ROOT/config/fastdds_large_frames.xml}")
  PEER_HOW="peer with ${FASTDDS_DEFAULT_PROFILES_FILE:-config/fastdds_large_frames.xml}"
fi
# One timed run of the peer ($FRAMES frames, lock-step) against the ROS process started by the
# command after $1: the peer's summary goes to $1.json, the logs to $1.server.log and $1.peer.log.
time_peer_against() {
  local base="$1" pid; shift
  "$@" > "$base.server.log" 2>&1 &
  pid=$!
  "${PEER_PROFILE[@]}" python scripts/image_peer.py --images "$IMAGE" --repeat "$FRAMES" --resize "$FRAME" --no-images \
      --summary "$base.json" > "$base.peer.log" 2>&1 || echo "peer failed against $1: see $base.peer.log"
  kill -TERM "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true
}
# The node on model $1, timed by the peer (time_peer_against $2), and the node's own median
# work per frame in $2.overhead.
run_node() {
  local model="$1" base="$2"
  time_peer_against "$base" "$BIN/anomaly_inspector_node" --ros-args -p model:="$model" -p input_qos:=reliable \
      -p inference_threads:="$NODE_THREADS"
  # The node's own work (conversion, ROI, messages), timed inside the node on the same frames
  # as the inspection it adds to: immune to the machine being busier in one run.
  sed -n 's/.*node overhead (conversion, ROI, messages) median \([0-9.]*\) ms.*/\1/p' "$base.server.log" > "$base.overhead"
}
if [ "$NODE" = 1 ]; then
  echo; echo "== node end to end ($FRAMES frames of $FRAME rgb8 per model, lock-step, reliable QoS, $PEER_HOW) =="
  # The node publishes its images as usual; the peer does not take them (on a 2-core machine
  # their decoding in Python would compete with the node for the CPU).
  for m in "${ALL[@]}"; do
    name="$(basename "$m")"
    run_node "$m" "$OUT/node_$name"
    tail -1 "$OUT/node_$name.peer.log"
  done
  echo; echo "== transport floor: the same peer against an r2r node that answers each frame at once =="
  [ -x "$BIN/examples/transport_echo" ] || cargo build --release --example transport_echo
  time_peer_against "$OUT/transport" "$BIN/examples/transport_echo"
  tail -1 "$OUT/transport.peer.log"
fi

if [ "$SOAK" != 0 ]; then
  echo; echo "== soak: overload for $SOAK s =="
  python scripts/soak.py --node "$BIN/anomaly_inspector_node" --model "$MODELS/patchcore_256" --node-log "$OUT/soak_node.log" --seconds "$SOAK" --frame "$FRAME" --image "$IMAGE" \
      --out "$OUT/soak.json"
fi

python - "$OUT" "$FRAME" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
node_frame = [int(v) for v in sys.argv[2].split("x")]
engine = json.load(open(out / "engine.json"))
rows = []
print(f"\n== side by side at {sys.argv[2]} (ms per frame, medians) ==")
print(f"{'model':<14} {'floor':>8} {'engine':>8} {'node e2e':>9} {'in node':>8} | {'engine/floor':>12} {'node-engine':>11} {'node/engine':>11} {'node own':>9}")
for e in engine["engine"]:
    if e["frame"] != node_frame:
        continue
    name = e["model"]
    floor, eng = e["stages"]["floor_ms"], e["stages"]["engine_ms"]
    node = inner = own = None
    o = out / f"node_{name}.overhead"
    if o.exists() and o.read_text().strip():
        own = float(o.read_text().split()[0])
    f = out / f"node_{name}.json"
    if f.exists():
        frames = [x for x in json.load(open(f))["frames"] if x.get("received")]
        if frames:
            steady = frames[2:] or frames  # the first frames pay for warm-up
            node = statistics.median(x["latency_ms"] for x in steady)
            inner = statistics.median(x["inference_ms"] for x in steady)
    fmt = lambda v, w=8: f"{v:>{w}.1f}" if v is not None else f"{'-':>{w}}"
    print(f"{name:<14} {fmt(floor)} {fmt(eng)} {fmt(node, 9)} {fmt(inner)} | {eng / floor:>12.3f} "
          f"{fmt(node - eng if node else None, 11)} {fmt(node / eng if node else None, 11)} {fmt(own, 9)}")
    rows.append({"model": name, "floor_ms": floor, "engine_ms": eng, "node_ms": node, "in_node_ms": inner,
                 "node_own_ms": own})
transport = None
t = out / "transport.json"
if t.exists():
    frames = [x for x in json.load(open(t))["frames"] if x.get("received")]
    if frames:
        transport = statistics.median(x["latency_ms"] for x in (frames[2:] or frames))
        for r in rows:
            if r["node_ms"] is not None:
                print(f"{r['model']:<14} node e2e {r['node_ms']:.1f} ms = transport floor {transport:.1f} "
                      f"+ in node {r['node_ms'] - transport:.1f} (engine {r['engine_ms']:.1f}, node own "
                      f"{r['node_own_ms'] if r['node_own_ms'] is not None else float('nan'):.1f})")
json.dump({"engine": engine, "side_by_side": rows, "transport_ms": transport}, open(out / "report.json", "w"), indent=1)
print("floor = model forward + kNN on a ready tensor; engine = Inspector::inspect on the RGB frame;\n"
      "node e2e = rclpy publish -> AnomalyResult received; in node = frame received -> result built;\n"
      "node own = the node's own work per frame (conversion, ROI, messages), timed inside the node")
print(f"\n(report: {out / 'report.json'}; device: {engine['device']})")
PY

if [ "$ROUNDS" -gt 0 ] && [ "$NODE" = 1 ]; then
  echo; echo "== engine and node alternating at $FRAME, $ROUNDS rounds of $FRAMES frames each =="
  ALT="$OUT/alternating"; rm -rf "$ALT"; mkdir -p "$ALT"
  [ -x "$BIN/examples/transport_echo" ] || cargo build --release --example transport_echo
  for r in $(seq 1 "$ROUNDS"); do
    time_peer_against "$ALT/transport_$r" "$BIN/examples/transport_echo"
    for m in "${ALL[@]}"; do
      name="$(basename "$m")"
      "$BIN/anomaly_inspector" bench --model "$m" --image "$IMAGE" --frame "$FRAME" --iterations "$FRAMES" \
          --json "$ALT/engine_${name}_$r.json" > "$ALT/engine_${name}_$r.log" 2>&1 \
          || echo "engine bench failed for $name: see $ALT/engine_${name}_$r.log"
      run_node "$m" "$ALT/node_${name}_$r"
    done
  done
  python - "$ALT" "$ROUNDS" <<'PY'
import json, statistics, sys
from pathlib import Path
alt, rounds = Path(sys.argv[1]), int(sys.argv[2])
names = sorted({p.name[len("engine_"):].rsplit("_", 1)[0] for p in alt.glob("engine_*.json")})


def steady_median(path, key):
    """Median of `key` over a peer summary's received frames but the first two (warm-up)."""
    frames = [x for x in json.load(open(path))["frames"] if x.get("received")]
    return statistics.median(x[key] for x in (frames[2:] or frames)) if frames else None


summary = {}
for name in names:
    print(f"{name}, per round (ms): engine, node e2e, in node, node own, transport floor | "
          "node e2e / engine, (node e2e - floor) / engine")
    ratios, beyond_floor = [], []
    for r in range(1, rounds + 1):
        try:
            eng = json.load(open(alt / f"engine_{name}_{r}.json"))["engine"][0]["stages"]["engine_ms"]
            node = steady_median(alt / f"node_{name}_{r}.json", "latency_ms")
            inner = steady_median(alt / f"node_{name}_{r}.json", "inference_ms")
        except (OSError, KeyError, IndexError, ValueError) as e:
            print(f"  {r}: missing ({e})")
            continue
        if node is None:
            print(f"  {r}: no result received")
            continue
        try:
            floor = steady_median(alt / f"transport_{r}.json", "latency_ms")
        except (OSError, ValueError):
            floor = None
        own = (alt / f"node_{name}_{r}.overhead").read_text().split()
        ratios.append(node / eng)
        line = f"  {r}: {eng:7.1f} {node:7.1f} {inner:7.1f} {own[0] if own else '-':>6}"
        if floor is not None:
            beyond_floor.append((node - floor) / eng)
            line += f" {floor:6.1f} | {node / eng:5.2f}x {(node - floor) / eng:5.2f}x"
        else:
            line += f" {'-':>6} | {node / eng:5.2f}x"
        print(line)
    if ratios:
        print(f"  node e2e / engine: median {statistics.median(ratios):.2f}x, "
              f"range {min(ratios):.2f}-{max(ratios):.2f}x over {len(ratios)} rounds")
        summary[name] = {"ratios": ratios, "median_ratio": statistics.median(ratios)}
    if beyond_floor:
        print(f"  (node e2e - transport floor) / engine: median {statistics.median(beyond_floor):.2f}x, "
              f"range {min(beyond_floor):.2f}-{max(beyond_floor):.2f}x")
        summary[name]["beyond_floor_ratios"] = beyond_floor
json.dump(summary, open(alt / "summary.json", "w"), indent=1)
PY
fi
