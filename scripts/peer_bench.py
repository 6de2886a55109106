#!/usr/bin/env python3
"""Side by side with the Python way, in one run: our PatchCore against anomalib's on every shared set.

    source scripts/env.sh
    bash ../shared/peer/setup.sh target/peer-venv        # once, about 5 GB (anomalib 2.7, torch, timm)
    python scripts/peer_bench.py                         # every set under ../shared/data, 40 training images
    python scripts/peer_bench.py --sets mvtec_screw --train-limit 80 --fit-args '--stretch'

For each set, both sides learn from the same training images: the peer's runner
(`../shared/peer/run_patchcore.py --train-limit N`) draws N images of train/good with Python's
`random.Random(0)`, and this script draws the same ones into a symlinked copy for `fit` (full
sets are out of reach: anomalib's coreset on all of Magnetic-Tile takes about 5 hours here).
Both are scored on every test image.

Timing, alternating on the same images: ours (`predict`: Inspector::inspect per image, decode
excluded, resize and post-processing included), then the peer (its runner: model forward with
kNN and map, decode and resize excluded), then ours again. Each is the median over the same 60
test images after 5 warm-up images, batch 1, 2 threads. Ours is reported as the slower of its
two runs, so that a machine that got busier during the peer's turn cannot flatter us.

Accuracy, so that a speed-up cannot hide a loss: image AUROC, pixel AUROC and AUPRO (FPR 0.3)
of both, ours from `eval` (full-size masks), the peer's from anomalib's metrics (masks at
256x256). One table, one JSON (--out/peer_bench.json).

Time only on an idle machine (one busy process makes libtorch here 3-15x slower).
"""
import argparse
import json
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from compare_sets import linked_subset  # scripts/ is on the path when run as a script

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "target" / "release" / "anomaly_inspector"
IMG_EXT = {".png", ".jpg", ".jpeg", ".bmp"}
WARMUP, TIMED = 5, 60  # as the peer's runner: the first 65 test images, 5 of them warm-up


def list_images(d):
    """Images of a folder in the peer's order (sorted paths)."""
    return sorted(p for p in d.iterdir() if p.suffix.lower() in IMG_EXT)


def peer_training_images(root, limit):
    """The training images the peer's runner uses with --train-limit `limit` (its own draw)."""
    train = list_images(root / "train" / "good")
    if limit and limit < len(train):
        train = sorted(random.Random(0).sample(train, limit))
    return train


def peer_timing_images(root):
    """The test images the peer's runner times, in its order (test folders sorted by name)."""
    items = []
    for d in sorted(p for p in (root / "test").iterdir() if p.is_dir()):
        items += list_images(d)
    return items[:WARMUP + TIMED]


def run(cmd, log):
    """Runs cmd with its output in log; exits with the log's tail when it fails. Returns seconds."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = Path(log).read_text().splitlines()[-15:]
        sys.exit(f"failed ({r.returncode}): {shlex.join(map(str, cmd))}\n" + "\n".join(tail))
    return time.perf_counter() - t0


def our_latency(cli, model, images, out, log):
    """Median Inspector::inspect ms of `predict` over images[WARMUP:] (one process, in order)."""
    run([cli, "predict", "--model", model, "--out", out, *images], log)
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
    ms = [x["ms"] for x in lines if "ms" in x]
    if len(ms) != len(images):
        sys.exit(f"predict inspected {len(ms)} of {len(images)} images: see {log}")
    return statistics.median(ms[WARMUP:])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--sets", default="", help="comma-separated set names (default: every MVTec-layout set under --data)")
    ap.add_argument("--train-limit", type=int, default=40, help="training images per set, drawn as the peer draws them")
    ap.add_argument("--fit-args", default="", help="extra arguments for our fit (default: today's defaults)")
    ap.add_argument("--peer-python", type=Path, default=ROOT / "target" / "peer-venv" / "bin" / "python")
    ap.add_argument("--peer-runner", type=Path, default=ROOT.parent / "shared" / "peer" / "run_patchcore.py")
    ap.add_argument("--cli", type=Path, default=CLI)
    ap.add_argument("--out", type=Path, default=ROOT / "target" / "peer_bench")
    a = ap.parse_args()

    if not a.peer_python.exists():
        sys.exit(f"no peer environment at {a.peer_python}: run  bash ../shared/peer/setup.sh target/peer-venv  "
                 "(about 5 GB), or pass --peer-python")
    if not a.cli.exists():
        sys.exit(f"no CLI at {a.cli}: build first (scripts/setup.sh)")
    sets = sorted(d for d in a.data.iterdir() if (d / "train" / "good").is_dir() and (d / "test").is_dir())
    if a.sets:
        wanted = a.sets.split(",")
        sets = [d for d in sets if d.name in wanted]
        missing = set(wanted) - {d.name for d in sets}
        if missing:
            sys.exit(f"no such set under {a.data}: {', '.join(sorted(missing))}")
    a.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for root in sets:
        name = root.name
        work = a.out / name
        work.mkdir(parents=True, exist_ok=True)
        train = peer_training_images(root, a.train_limit)
        data = linked_subset(root, train, work / "data")
        timing = peer_timing_images(root)
        model = work / "model"
        print(f"== {name}: {len(train)} training images, {len(timing) - WARMUP} timed test images", flush=True)

        fit_s = run([a.cli, "fit", "--data", data, "--out", model, *shlex.split(a.fit_args)], work / "fit.log")
        run([a.cli, "eval", "--model", model, "--data", data, "--split", "all", "--json", work / "eval.json"],
            work / "eval.log")
        ours = json.loads((work / "eval.json").read_text())
        bank = json.loads((model / "model.json").read_text()).get("training", {}).get("patchcore", {}).get("bank_size")

        ours_ms = [our_latency(a.cli, model, timing, work / "predict1", work / "predict1.log")]
        run([a.peer_python, a.peer_runner, "--data", root, "--train-limit", a.train_limit,
             "--latency-n", TIMED, "--out", work / "peer.json"], work / "peer.log")
        peer = json.loads((work / "peer.json").read_text())
        ours_ms.append(our_latency(a.cli, model, timing, work / "predict2", work / "predict2.log"))

        row = {
            "set": name, "train_images": len(train), "test_images": ours["n_images"],
            "ours": {"image_auroc": ours["image_auroc"], "pixel_auroc": ours.get("pixel_auroc"),
                     "aupro": ours.get("aupro"), "ms": max(ours_ms), "ms_runs": ours_ms, "fit_s": fit_s,
                     "bank_rows": bank},
            "peer": {"image_auroc": peer["image_auroc"], "pixel_auroc": peer["pixel_auroc"], "aupro": peer["aupro"],
                     "ms": peer["latency_model_ms"], "ms_e2e": peer["latency_e2e_ms"], "fit_s": peer["fit_s"],
                     "bank_rows": peer["memory_bank"][0], "test_images": peer["test_images"]},
        }
        row["speedup"] = row["peer"]["ms"] / row["ours"]["ms"]
        rows.append(row)
        print(f"   ours {row['ours']['ms']:.1f} ms (runs {', '.join(f'{m:.1f}' for m in ours_ms)}), "
              f"peer {row['peer']['ms']:.1f} ms: {row['speedup']:.2f}x", flush=True)

    def f(v, w=6, p=3):
        return f"{v:>{w}.{p}f}" if isinstance(v, (int, float)) else f"{'-':>{w}}"

    print(f"\n== side by side with anomalib PatchCore ({a.train_limit} training images per set; "
          f"our fit args: '{a.fit_args}') ==")
    print(f"{'set':<16} | {'img AUROC':>15} | {'px AUROC':>15} | {'AUPRO':>15} | {'ms per image':>15} | "
          f"{'speed-up':>8} | {'fit s':>13} | {'bank rows':>13}")
    print(f"{'':<16} | {'ours':>7} {'peer':>7} | {'ours':>7} {'peer':>7} | {'ours':>7} {'peer':>7} | "
          f"{'ours':>7} {'peer':>7} | {'':>8} | {'ours':>6} {'peer':>6} | {'ours':>6} {'peer':>6}")
    for r in rows:
        o, p = r["ours"], r["peer"]
        print(f"{r['set']:<16} | {f(o['image_auroc'], 7)} {f(p['image_auroc'], 7)} | {f(o['pixel_auroc'], 7)} "
              f"{f(p['pixel_auroc'], 7)} | {f(o['aupro'], 7)} {f(p['aupro'], 7)} | {f(o['ms'], 7, 1)} {f(p['ms'], 7, 1)} | "
              f"{f(r['speedup'], 7, 2)}x | {f(o['fit_s'], 6, 1)} {f(p['fit_s'], 6, 1)} | {o['bank_rows'] or '-':>6} "
              f"{p['bank_rows']:>6}")
    if rows:
        mean = lambda side, k: statistics.mean(r[side][k] for r in rows)  # noqa: E731
        print(f"{'mean':<16} | {f(mean('ours', 'image_auroc'), 7)} {f(mean('peer', 'image_auroc'), 7)} | "
              f"{f(mean('ours', 'pixel_auroc'), 7)} {f(mean('peer', 'pixel_auroc'), 7)} | "
              f"{f(mean('ours', 'aupro'), 7)} {f(mean('peer', 'aupro'), 7)} | {f(mean('ours', 'ms'), 7, 1)} "
              f"{f(mean('peer', 'ms'), 7, 1)} | {f(min(r['speedup'] for r in rows), 7, 2)}x (lowest)")
    print("ms: median over the same 60 test images, batch 1, 2 threads; ours = Inspector::inspect (resize and "
          "post-processing included), peer = model forward (resize excluded)")
    report = {"date": time.strftime("%Y-%m-%d"), "train_limit": a.train_limit, "fit_args": a.fit_args, "rows": rows}
    (a.out / "peer_bench.json").write_text(json.dumps(report, indent=1))
    print(f"(report: {a.out / 'peer_bench.json'})")


if __name__ == "__main__":
    main()
