#!/usr/bin/env bash
# The label curve of issue 17: SuperSimpleNet fitted with K labelled defective images (spread
# over the defect types, with masks and with verdicts only), evaluated on the test images left,
# beside PatchCore on the same images. One line per run in OUT/curve.tsv, reports in OUT/.
#
#   bash scripts/label_curve.sh [DATA] [OUT] [K ...]
#   bash scripts/label_curve.sh ../shared/data/magnetic_tile /tmp/curve 0 5 10 20 50
#
# Needs the release binary (cargo build --release); BIN overrides it, LABELS="masks" (or
# "verdicts") runs one kind of label only, FIT_ARGS adds options to the SuperSimpleNet fits,
# PATCHCORE_KS="0 50" fits the PatchCore reference at those K only (default: every K). Hours of CPU: every run
# is a full fit. The splits are symbolic links (scripts/split_labels.py); the data is never changed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
data=${1:-$here/../shared/data/magnetic_tile}
out=${2:-/tmp/label_curve}
shift $(( $# >= 2 ? 2 : $# ))
ks=("$@"); [ ${#ks[@]} -gt 0 ] || ks=(0 5 10 20 50)
bin=${BIN:-$here/target/release/anomaly_inspector}
mkdir -p "$out"
tsv=$out/curve.tsv
[ -f "$tsv" ] || printf 'method\tlabels\tk\tn_test\timage_auroc\tpixel_auroc\taupro\tf1_at_threshold\tms_per_image\tfit_s\n' > "$tsv"

row() { # method labels k json fit_s
  python3 - "$@" >> "$tsv" <<'PY'
import json, sys
m, labels, k, f, fit_s = sys.argv[1:]
d = json.load(open(f))
print("\t".join([m, labels, k, str(d["n_images"])] + [f"{d[x]:.3f}" for x in
      ("image_auroc", "pixel_auroc", "aupro", "image_f1_at_threshold")] + [f"{d['ms_per_image']:.1f}", fit_s]))
PY
}

run() { # method labels k split_dir
  local m=$1 labels=$2 k=$3 split=$4 name=$1_${2}_k$3
  [ -f "$out/$name.eval.json" ] && return 0
  local t0=$SECONDS
  local extra=(); [ "$m" = supersimplenet ] && read -r -a extra <<< "${FIT_ARGS:-}"
  "$bin" fit --method "$m" --data "$split" --out "$out/$name.model" "${extra[@]}" > "$out/$name.fit.log" 2>&1
  local fit_s=$((SECONDS - t0))
  "$bin" eval --model "$out/$name.model" --data "$split" --json "$out/$name.eval.json" > "$out/$name.eval.log" 2>&1
  row "$m" "$labels" "$k" "$out/$name.eval.json" "$fit_s"
  rm -rf "$out/$name.model"
}

for k in "${ks[@]}"; do
  for labels in ${LABELS:-masks verdicts}; do
    [ "$k" = 0 ] && [ "$labels" = verdicts ] && continue
    split=$out/split_${labels}_k$k
    if [ "$k" = 0 ]; then
      split=$data
    elif [ ! -d "$split" ]; then
      weak=(); [ "$labels" = verdicts ] && weak=(--weak)
      python3 "$here/scripts/split_labels.py" --data "$data" --out "$split" --total "$k" "${weak[@]}" > /dev/null
    fi
    run supersimplenet "$labels" "$k" "$split"
    # PatchCore learns from good images only: one run per set of test images is enough.
    if [ "$labels" = masks ] && [[ " ${PATCHCORE_KS:-${ks[*]}} " == *" $k "* ]]; then
      run patchcore none "$k" "$split"
    fi
  done
done
column -t -s$'\t' "$tsv"
