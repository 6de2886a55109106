#!/usr/bin/env bash
# The main job, end to end: the anomaly_inspector node on its built-in default model, fed by a
# replayed camera stream, printing one verdict per frame and writing heatmap/overlay PNGs.
#
#   scripts/demo.sh            (after scripts/setup.sh)
#
# The default data is made by the project itself (a synthetic machined-metal surface with
# scratches, dents and stains, `anomaly_inspector synth`), so the demo needs no download.
# Outputs: demo_output/*.png (heatmaps, overlays), demo_output/summary.json.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export ROS_DOMAIN_ID="${ROS_DOMAIN_ID:-61}"
source scripts/env.sh          # also sets ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST

BIN="$ROOT/target/release"
[ -x "$BIN/anomaly_inspector_node" ] || { echo "build first: scripts/setup.sh" >&2; exit 1; }
DATA="$ROOT/target/demo_data"
MODEL="$ROOT/models/demo_patchcore"
OUT="$ROOT/demo_output"

if [ ! -f "$DATA/.complete" ]; then
  "$BIN/anomaly_inspector" synth --out "$DATA"
  touch "$DATA/.complete"
fi
if [ ! -f "$MODEL/model.json" ]; then
  "$BIN/anomaly_inspector" fit --data "$DATA" --out "$MODEL" --name demo_patchcore
fi

rm -rf "$OUT"; mkdir -p "$OUT"
"$BIN/anomaly_inspector_node" --ros-args -p model:="$MODEL" > "$OUT/node.log" 2>&1 &
NODE_PID=$!
cleanup() { kill -TERM "$NODE_PID" 2>/dev/null || true; wait "$NODE_PID" 2>/dev/null || true; }
trap cleanup EXIT

mapfile -t IMAGES < <(find "$DATA/test" -name '*.png' | sort)
echo "replaying ${#IMAGES[@]} frames to the node (ROS_DOMAIN_ID=$ROS_DOMAIN_ID, loopback only)"
python scripts/image_peer.py --images "${IMAGES[@]}" --save-dir "$OUT" --summary "$OUT/summary.json"
cleanup; trap - EXIT
echo
grep -E "loaded|device|stopped" "$OUT/node.log" | sed 's/^/node: /' || true
python - "$OUT/summary.json" <<'PY'
import json, sys
frames = json.load(open(sys.argv[1]))["frames"]
good = [f for f in frames if "/good/" in f["image"]]
bad = [f for f in frames if "/good/" not in f["image"]]
tp = sum(f["is_anomalous"] for f in bad); fp = sum(f["is_anomalous"] for f in good)
print(f"\n{len(frames)} frames: {tp}/{len(bad)} defective parts flagged, {fp}/{len(good)} good parts flagged")

# A contact sheet a person can open: input | heatmap | overlay, one row per defect type + a good part.
from pathlib import Path
from PIL import Image, ImageDraw
out = Path(sys.argv[1]).parent
rows, seen = [], set()
for f in frames:
    kind = Path(f["image"]).parent.name
    if kind in seen or "overlay_png" not in f:
        continue
    seen.add(kind)
    rows.append((kind, f))
tile = 200
sheet = Image.new("RGB", (3 * tile, len(rows) * (tile + 18)), "white")
draw = ImageDraw.Draw(sheet)
for r, (kind, f) in enumerate(rows):
    y = r * (tile + 18)
    for c, path in enumerate([f["image"], f["heatmap_png"], f["overlay_png"]]):
        sheet.paste(Image.open(path).convert("RGB").resize((tile, tile)), (c * tile, y + 18))
    verdict = "ANOMALOUS" if f["is_anomalous"] else "good"
    draw.text((4, y + 3), f"{kind}: score {f['score']:.2f} -> {verdict}, {len(f['regions'])} region(s)   [input | heatmap | overlay]", fill="black")
sheet.save(out / "demo_sheet.png")
print(f"contact sheet: {out / 'demo_sheet.png'}")
PY
echo "heatmaps and overlays: $OUT/"
