#!/usr/bin/env bash
# The one-shot GPU check, for the day the `device` tool lends a GPU (issue 18). The lent machine
# (one H200, 16 cores) has no Rust toolchain and reaches no registry, but has Python 3.12 with
# torch 2.11.0+cu130. So the CLI is built HERE, without the ROS feature, against a libtorch of
# the device's version (tch 0.24 <-> torch 2.11, from the CPU-usable PyPI wheel), carried there
# as one binary with a small slice of the shared data sets, and run THERE on the device's own
# libtorch (its CUDA backend found through LIBTORCH, see src/device.rs).
#
#   bash scripts/gpu_check.sh prepare    # here: build (about 6 min cold) and stage .gpu_check/
#   bash scripts/gpu_check.sh dry-run    # here: the device part on the CPU, to prove the script
#   bash scripts/gpu_check.sh device     # there: what the device tool runs (see below)
#
# The device call (the tool's `run`; command well under its 2000 characters):
#   command:  bash scripts/gpu_check.sh device
#   carry:    [".gpu_check", "models/efficientnet_lite0.safetensors"]
#   timeout:  420
# Results come back in $OUT: gpu_check.log (everything printed) and gpu_check.json.
#
# What the device part checks, per data set slice (train: every 4th good image; test: the
# first 6 images of each test folder):
#   1. `fit` PatchCore (the default) on cuda, `predict` its test slice on cuda and on cpu:
#      every image's score equal within 1e-3 relative (the same model on both devices);
#   2. `fit` on cpu too: both fits' eval metrics side by side (coreset picks may differ);
#   3. `bench` on cuda: per-stage and per-frame times at 256x256, 640x480 and 2448x2048, the
#      PatchCore default and a DRAEM paper-preset model (trained 20 steps: its speed does not
#      depend on its training). Target: PatchCore 256 px under 10 ms per frame.
#   4. PatchCore tiled (--tiles 1) on the last set: eval beside the default, and in the bench
#      (the GPU's batch of tiles).
#   5. SuperSimpleNet (cpu-small preset, its 40 epochs) fitted on the first set on the device,
#      evaluated there and timed in the bench beside the others.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
STAGE="$ROOT/.gpu_check"
TORCH_VERSION=2.11.0   # the device's torch (../.library/device/KINDS.md)
TCH_VERSION=0.24.0     # the tch release built for it (torch-sys 0.24's TORCH_VERSION)
SETS=(magnetic_tile mvtec_screw bsdata_pitting)
# ONLY_SETS=a,b runs only those sets; BENCH_IMAGE=good times a defect-free frame.
# The dry run shortens what only the GPU makes quick (DRAEM's paper preset is minutes a step here).
DRAEM_PRESET="${DRAEM_PRESET:-paper}"; DRAEM_STEPS="${DRAEM_STEPS:-20}"; SSN_EPOCHS="${SSN_EPOCHS:-40}"; FRAMES="${FRAMES:-256x256,640x480,2448x2048}"
[ -z "${ONLY_SETS:-}" ] || read -r -a SETS <<< "${ONLY_SETS//,/ }"

prepare() {
  source scripts/env.sh
  local work="$ROOT/target/gpu_check"
  local torch="$work/torch$TORCH_VERSION"
  mkdir -p "$work"
  # 1. libtorch of the device's version, from the PyPI wheel (download.pytorch.org is
  #    unreachable). Only its headers and libraries are unpacked; the two small CUDA runtime
  #    libraries libtorch_cpu always needs come from our venv, where its RPATH looks for them.
  if [ ! -f "$torch/torch/lib/libtorch_cpu.so" ]; then
    python -m pip download -q --no-deps --only-binary=:all: "torch==$TORCH_VERSION" -d "$work/wheel"
    mkdir -p "$torch"
    unzip -q -o "$work"/wheel/torch-"$TORCH_VERSION"-*.whl 'torch/include/*' 'torch/lib/*' 'torch/share/*' -d "$torch"
  fi
  ln -sfn "$ROOT/.venv/lib/python3.11/site-packages/nvidia" "$torch/nvidia"

  # 2. The same crate with tch pinned to the device's release: a manifest beside the sources
  #    (links to src/, build.rs, ...), its own Cargo.lock and target dir, so the everyday build
  #    is untouched.
  local crate="$work/crate"
  mkdir -p "$crate"
  for p in src build.rs config models examples; do ln -sfn "$ROOT/$p" "$crate/$p"; done
  sed -e "s/^tch = \"[0-9.]*\"/tch = \"=$TCH_VERSION\"/" \
      -e "s/^torch-sys = \"[0-9.]*\"/torch-sys = \"=$TCH_VERSION\"/" Cargo.toml > "$crate/Cargo.toml.new"
  grep -q "^tch = \"=$TCH_VERSION\"" "$crate/Cargo.toml.new" || { echo "could not pin tch in the manifest copy" >&2; exit 1; }
  cmp -s "$crate/Cargo.toml.new" "$crate/Cargo.toml" || mv "$crate/Cargo.toml.new" "$crate/Cargo.toml"
  rm -f "$crate/Cargo.toml.new"
  [ -f "$crate/Cargo.lock" ] || cp Cargo.lock "$crate/Cargo.lock"
  LIBTORCH="$torch/torch" LIBTORCH_BYPASS_VERSION_CHECK=0 \
  LD_LIBRARY_PATH="$ROOT/.venv/lib/python3.11/site-packages/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}" \
    cargo build --release --no-default-features --bin anomaly_inspector \
      --manifest-path "$crate/Cargo.toml" --target-dir "$work/target"

  # 3. The stage that travels: the binary (stripped), the data slices, this script's inputs.
  rm -rf "$STAGE"; mkdir -p "$STAGE/data"
  strip -o "$STAGE/anomaly_inspector" "$work/target/release/anomaly_inspector"
  for s in "${SETS[@]}"; do slice "$ROOT/../shared/data/$s" "$STAGE/data/$s"; done
  echo "staged: $(du -sh "$STAGE" | cut -f1) in .gpu_check; with the tracked files and the weights:"
  du -cb "$STAGE" models/efficientnet_lite0.safetensors $(git ls-files) 2>/dev/null | tail -1 \
    | awk '{printf "  %.1f MiB of the 64 MiB a call may carry\n", $1/1048576}'
}

# A slice of an MVTec-layout set: every 4th training image (at most 50), the first 6 images of
# each test folder and their masks. Files are linked as they are (no re-encoding).
slice() {
  local from="$1" to="$2" d f n
  [ -d "$from/train/good" ] || { echo "no data set at $from" >&2; exit 1; }
  mkdir -p "$to/train/good"
  ls "$from/train/good" | sort | awk 'NR % 4 == 1' | head -50 | while read -r f; do cp "$from/train/good/$f" "$to/train/good/"; done
  for d in "$from"/test/*/; do
    d="$(basename "$d")"; mkdir -p "$to/test/$d"
    ls "$from/test/$d" | sort | head -6 | while read -r f; do
      cp "$from/test/$d/$f" "$to/test/$d/"
      if [ "$d" != good ]; then
        mkdir -p "$to/ground_truth/$d"
        for m in "$from/ground_truth/$d/${f%.*}_mask".*; do [ -f "$m" ] && cp "$m" "$to/ground_truth/$d/"; done
      fi
    done
  done
}

secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }

# The check itself. DEVICE=cuda there; the dry run here passes DEVICE=cpu and this repo's
# torch 2.11 so that every line of the script has run before device time is spent.
check() {
  local device="$1" out="$2" bin="$STAGE/anomaly_inspector"
  [ -x "$bin" ] || { echo "nothing staged: run 'bash scripts/gpu_check.sh prepare' here first" >&2; exit 1; }
  export ANOMALY_INSPECTOR_ROOT="$ROOT"
  mkdir -p "$out"
  local work; work="$(mktemp -d)"
  echo "== gpu_check on $(hostname), device $device, $(date -u +%FT%TZ) =="
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$bin" --version
  local json="$out/gpu_check.json"
  echo "{" > "$json"
  local first=1 s
  for s in "${SETS[@]}"; do
    local data="$STAGE/data/$s" m="$work/$s"
    echo; echo "== $s: fit PatchCore (default) on $device and on cpu =="
    local t0 t1 t2
    t0=$(date +%s.%N)
    "$bin" fit --data "$data" --out "$m.dev" --device "$device" 2>&1 | tail -2
    t1=$(date +%s.%N)
    "$bin" fit --data "$data" --out "$m.cpu" --device cpu 2>&1 | tail -2
    t2=$(date +%s.%N)
    echo "fit seconds: $device $(secs "$t0" "$t1"), cpu $(secs "$t1" "$t2")"
    echo "-- the $device-fitted model scored on $device and on cpu --"
    "$bin" predict --model "$m.dev" --device "$device" --out "$m.pred_dev" $(find "$data/test" -type f | sort) > "$m.dev.jsonl"
    "$bin" predict --model "$m.dev" --device cpu --out "$m.pred_cpu" $(find "$data/test" -type f | sort) > "$m.cpu.jsonl"
    python3 - "$m.dev.jsonl" "$m.cpu.jsonl" <<'PY'
import json, sys
a = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
b = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
assert len(a) == len(b) > 0, (len(a), len(b))
bad = [x for x in a + b if "error" in x]
assert not bad, bad[:2]
TOL = 5e-3  # relative: cuDNN and cuBLAS sum in another order (measured worst 1.2e-3)
worst = max(abs(x["raw_score"] - y["raw_score"]) / max(abs(y["raw_score"]), 1e-6) for x, y in zip(a, b))
same = sum((x["is_anomalous"] == y["is_anomalous"]) for x, y in zip(a, b))
# A verdict may flip only for a score within the tolerance of the threshold (both normalised).
odd = [x["image"] for x, y in zip(a, b)
       if x["is_anomalous"] != y["is_anomalous"] and abs(y["score"] - y["threshold"]) > TOL * max(abs(y["threshold"]), 1e-6)]
ms = sorted(x["ms"] for x in a[1:]) or [a[0]["ms"]]
print(f"{len(a)} images: worst relative raw-score difference {worst:.2e}; same verdict on {same}/{len(a)}; "
      f"predict median {ms[len(ms) // 2]:.1f} ms per image (decode to regions, first image left out)")
print("SCORES", "EQUAL within %g" % TOL if worst < TOL and not odd else "DIFFER", *odd)
PY
    echo "-- eval of both fits (on $device) --"
    "$bin" eval --model "$m.dev" --data "$data" --device "$device" --json "$m.dev.eval.json" 2>&1 | tail -n 12
    "$bin" eval --model "$m.cpu" --data "$data" --device "$device" --json "$m.cpu.eval.json" 2>&1 | tail -n 12
    [ $first = 1 ] || echo "," >> "$json"; first=0
    printf '"%s": {"fit_on_device": %s, "fit_on_cpu": %s}\n' "$s" "$(cat "$m.dev.eval.json")" "$(cat "$m.cpu.eval.json")" >> "$json"
  done

  echo; echo "== DRAEM $DRAEM_PRESET preset: $DRAEM_STEPS training steps on $device (timing only) =="
  t0=$(date +%s.%N)
  "$bin" fit --method draem --preset "$DRAEM_PRESET" --data "$STAGE/data/${SETS[0]}" --out "$work/draem" \
      --device "$device" --steps "$DRAEM_STEPS" --checkpoint-every 0 2>&1 | tail -2
  echo "draem fit seconds (training and calibration): $(secs "$t0" "$(date +%s.%N)")"
  echo; echo "== SuperSimpleNet cpu-small preset: $SSN_EPOCHS epochs on $device =="
  t0=$(date +%s.%N)
  "$bin" fit --method supersimplenet --data "$STAGE/data/${SETS[0]}" --out "$work/ssn" \
      --device "$device" --epochs "$SSN_EPOCHS" --checkpoint-every 0 2>&1 | tail -3
  echo "supersimplenet fit seconds: $(secs "$t0" "$(date +%s.%N)")"
  "$bin" eval --model "$work/ssn" --data "$STAGE/data/${SETS[0]}" --device "$device" --json "$out/ssn.eval.json" 2>&1 | tail -n 6
  # Tiled inference (fit --tiles 1: the frame cut into 256 px tiles at its own scale, one
  # forward per batch of tiles): the set with the smallest defects, eval and bench beside the
  # default. TILED=0 leaves it out (the dry run on 2 CPU cores: a 5 MP frame is ~140 tiles).
  local tiled=()
  if [ "${TILED:-1}" = 1 ]; then
    echo; echo "== ${SETS[-1]}: PatchCore tiled (--tiles 1) on $device =="
    t0=$(date +%s.%N)
    "$bin" fit --data "$STAGE/data/${SETS[-1]}" --out "$work/tiled" --device "$device" --tiles 1 2>&1 | tail -2
    echo "tiled fit seconds: $(secs "$t0" "$(date +%s.%N)")"
    "$bin" eval --model "$work/tiled" --data "$STAGE/data/${SETS[-1]}" --device "$device" --pixel-max-side 1024 \
        --json "$out/tiled.eval.json" 2>&1 | tail -n 6
    "$bin" eval --model "$work/${SETS[-1]}.dev" --data "$STAGE/data/${SETS[-1]}" --device "$device" --pixel-max-side 1024 \
        --json "$out/untiled.eval.json" 2>&1 | tail -n 6
    tiled=(--model "$work/tiled")
  fi
  echo; echo "== engine stages on $device (anomaly_inspector bench) =="
  local image models=()
  # BENCH_IMAGE=good: a defect-free test image (the usual frame on a line) instead of a defective one.
  if [ "${BENCH_IMAGE:-}" = good ]; then
    image="$(find "$STAGE/data/${SETS[-1]}/test/good" -type f | sort | head -1)"
  else
    image="$(find "$STAGE/data/${SETS[-1]}/test" -type f | sort | tail -1)"
  fi
  for s in "${SETS[@]}"; do models+=(--model "$work/$s.dev"); done
  "$bin" bench "${models[@]}" "${tiled[@]}" --model "$work/draem" --model "$work/ssn" --image "$image" --frame "$FRAMES" --iterations 30 \
      --bank-rows 1000,40000,100000 --device "$device" --json "$out/bench.json"
  echo "}" >> "$json"
  rm -rf "$work"
}

case "${1:-}" in
  prepare) prepare ;;
  dry-run)
    torch="$ROOT/target/gpu_check/torch$TORCH_VERSION/torch"
    TILED="${TILED:-0}" DRAEM_PRESET=cpu-small DRAEM_STEPS=2 SSN_EPOCHS=1 LIBTORCH="$torch" check cpu "$ROOT/target/gpu_check/dry_run" 2>&1 | tee "$ROOT/target/gpu_check/dry_run.log" ;;
  device)
    # The device's own libtorch (with CUDA): the python3 there is the one that holds torch.
    torch="$(python3 -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
    export LIBTORCH="$torch" LD_LIBRARY_PATH="$torch/lib:${LD_LIBRARY_PATH:-}"
    set -o pipefail
    # If CUDA does not come up, say why before anything else runs.
    python3 -c 'import torch; print("torch", torch.__version__, "sees", torch.cuda.get_device_name(0))' 2>&1 | tee "$OUT/gpu_check.log"
    ls "$torch/lib" | grep -E 'libtorch_(cpu|cuda)\.so' | tee -a "$OUT/gpu_check.log"
    check cuda "${OUT:?the device tool sets OUT}" 2>&1 | tee -a "$OUT/gpu_check.log" ;;
  *) sed -n '2,30p' "$0"; exit 2 ;;
esac
