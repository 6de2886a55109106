#!/usr/bin/env python3
"""Fit and evaluate settings on every MVTec-layout data set under a folder; one table, one JSON.

    source scripts/env.sh
    python scripts/compare_sets.py                        # default and paper settings, evaluation half
    python scripts/compare_sets.py --quick                # the same in minutes (subsets, see below)
    python scripts/compare_sets.py --configs default,draem --split validation
    python scripts/compare_sets.py --config 'nodensity=--density-neighbors 0'
    python scripts/compare_sets.py --update-readme        # every method, README's results section
    python scripts/compare_sets.py --tables-from target/compare_sets/compare_sets.json --markdown t.md

Why a script and not a subcommand: it only runs the CLI (`fit`, then `eval`) once per data set and
setting and gathers what they write (eval's JSON report, model.json), so every number in its table
is one a user gets from the same two commands.

Defaults are chosen by the MEAN over all sets, on the validation half of each set's test images
(`--split validation`: every second image of each test/ folder, from the second on), and reported
on the evaluation half (`--split evaluation`, the default here): a number in the README is then
not tuned on the images it reports.

--quick: each set shrunk to at most 100 training images (spread evenly over train/good by name) and
20 test images per folder of the chosen half, through symlinks under --out; DRAEM is left out
unless named. For day-to-day checks; the README's numbers come from full runs.

Times: `ms/img` is eval's mean Inspector::inspect time, `fit s` the wall time of `fit`. Time only
on an idle machine (one busy process makes libtorch here 3-15x slower) and compare within a run.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "target" / "release" / "anomaly_inspector"  # --cli picks another build

# name -> (what it is, fit arguments). "default" is whatever fit does without options.
CONFIGS = {
    "default": ("PatchCore with today's defaults", []),
    "paper": ("PatchCore paper settings: stretched input, plain kNN distance, one-scale map",
              ["--stretch", "--guided-bandwidth", "0", "--density-neighbors", "0", "--coarse-blur-sigma", "0"]),
    "draem": ("DRAEM, cpu-small preset", ["--method", "draem", "--preset", "cpu-small"]),
    "ssn": ("SuperSimpleNet, cpu-small preset", ["--method", "supersimplenet", "--preset", "cpu-small"]),
}
METRICS = [("image_auroc", "img AUROC"), ("pixel_auroc", "px AUROC"), ("aupro", "AUPRO"),
           ("image_f1_at_threshold", "F1@thr"), ("ms_per_image", "ms/img"), ("fit_seconds", "fit s"),
           ("bank_size", "bank"), ("synthetic_auroc", "syn AUROC")]
QUICK_TRAIN = 100
QUICK_TEST_PER_FOLDER = 20


def find_sets(data_root):
    """Every folder under data_root in the MVTec layout (train/good and test/), sorted by name."""
    sets = [d for d in sorted(data_root.iterdir()) if (d / "train" / "good").is_dir() and (d / "test").is_dir()]
    if not sets:
        sys.exit(f"no data set in the MVTec layout (train/good, test/) under {data_root}")
    return sets


def quick_copy(src, dst):
    """A symlinked subset of src at dst: QUICK_TRAIN training images spread over train/good, and
    test/ and ground_truth/ linked whole (eval's --limit-per-type takes the test subset)."""
    images = sorted(p for p in (src / "train" / "good").iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp"))
    step = max(1, len(images) // QUICK_TRAIN)
    return linked_subset(src, images[::step][:QUICK_TRAIN], dst)


def linked_subset(src, train, dst):
    """An MVTec-layout folder at dst (replaced if there): train/good holds links to the images
    `train`, test/ and ground_truth/ link to src's own."""
    good = dst / "train" / "good"
    if dst.exists():
        subprocess.run(["rm", "-rf", str(dst)], check=True)
    good.mkdir(parents=True)
    for p in train:
        (good / p.name).symlink_to(p.resolve())
    for sub in ("test", "ground_truth"):
        if (src / sub).is_dir():
            (dst / sub).symlink_to((src / sub).resolve())
    return dst


def run(cmd, log):
    """Runs a CLI command, its output to log; exits with the log's tail when it fails."""
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {shlex.join(map(str, cmd))}\n" + "".join(open(log).readlines()[-20:]))


def one(data, name, fit_args, out, split, limit):
    """fit + eval of one setting on one set; returns its row of metrics."""
    model = out / "models" / data.name / name
    model.parent.mkdir(parents=True, exist_ok=True)
    t = time.monotonic()
    run([CLI, "fit", "--data", data, "--out", model, "--name", f"{data.name}_{name}", *fit_args], out / f"{data.name}_{name}_fit.log")
    fit_seconds = time.monotonic() - t
    report = out / "reports" / f"{data.name}_{name}.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    cmd = [CLI, "eval", "--model", model, "--data", data, "--json", report, "--split", split]
    if limit:
        cmd += ["--limit-per-type", str(limit)]
    run(cmd, out / f"{data.name}_{name}_eval.log")
    r = json.loads(report.read_text())
    manifest = json.loads((model / "model.json").read_text())
    bank = manifest.get("training", {}).get("patchcore", {}).get("bank_size")
    check = manifest.get("training", {}).get("self_check") or {}
    return {
        "set": data.name, "config": name, "n_images": r["n_images"], "image_auroc": r["image_auroc"],
        "pixel_auroc": r["pixel_auroc"], "aupro": r["aupro"], "image_f1_at_threshold": r["image_f1_at_threshold"],
        "ms_per_image": r["ms_per_image"], "fit_seconds": fit_seconds, "bank_size": bank, "device": r["device"],
        "synthetic_auroc": check.get("image_auroc"), "synthetic_pixel_auroc": check.get("pixel_auroc"),
    }


def mean(rows, key):
    values = [r[key] for r in rows if r.get(key) is not None]
    return sum(values) / len(values) if len(values) == len(rows) and values else None


def ranks(values):
    """Ranks 1..n (1 = smallest), ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    r = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a, b):
    """Spearman's rank correlation of two equally long lists (None when either is constant)."""
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    ma, mb = sum(ra) / n, sum(rb) / n
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return None
    return sum((x - ma) * (y - mb) for x, y in zip(ra, rb)) / (va * vb) ** 0.5


def self_check_agreement(rows, configs):
    """Per set: does the synthetic-defect AUROC (good images only) rank the settings as the real
    defects' image AUROC does? Spearman's rho, and what picking the setting with the best
    synthetic figure (`fit --auto`'s rule) would get in real AUROC against the best and the
    default. None when fewer than 3 settings or no self-check."""
    if len(configs) < 3:
        return None
    out = []
    for s in dict.fromkeys(r["set"] for r in rows):
        mine = [r for r in rows if r["set"] == s and r["config"] in configs]
        if len(mine) < 3 or any(r.get("synthetic_auroc") is None for r in mine):
            return None
        syn = [r["synthetic_auroc"] for r in mine]
        real = [r["image_auroc"] for r in mine]
        picked = max(mine, key=lambda r: (r["synthetic_auroc"], -r["ms_per_image"]))
        default = next((r for r in mine if r["config"] == "default"), mine[0])
        out.append({"set": s, "spearman": spearman(syn, real), "picked": picked["config"],
                    "picked_auroc": picked["image_auroc"], "best": max(mine, key=lambda r: r["image_auroc"])["config"],
                    "best_auroc": max(real), "default_auroc": default["image_auroc"]})
    return out


def agreement_table(agree):
    lines = [f"{'set':<16} {'rho':>6} {'picked':>10} {'its AUROC':>9} {'best':>10} {'AUROC':>6} {'default':>7}"]
    for a in agree:
        rho = "-" if a["spearman"] is None else f"{a['spearman']:+.2f}"
        lines.append(f"{a['set']:<16} {rho:>6} {a['picked']:>10} {a['picked_auroc']:>9.3f} {a['best']:>10} "
                     f"{a['best_auroc']:>6.3f} {a['default_auroc']:>7.3f}")
    return "\n".join(lines)


def table(rows, configs):
    """Per set and the mean over the sets, one block per setting."""
    def cell(key, v):
        if v is None:
            return "-"
        if key in ("bank_size", "ms_per_image") or (key == "fit_seconds" and v >= 100):
            return f"{v:.0f}"
        return f"{v:.1f}" if key == "fit_seconds" else f"{v:.3f}"
    head = f"{'setting':<10} {'set':<16} {'images':>6} " + " ".join(f"{h:>9}" for _, h in METRICS)
    lines = [head, "-" * len(head)]
    for name in configs:
        mine = [r for r in rows if r["config"] == name]
        for r in mine:
            lines.append(f"{name:<10} {r['set']:<16} {r['n_images']:>6} " + " ".join(f"{cell(k, r[k]):>9}" for k, _ in METRICS))
        m = {k: mean(mine, k) for k, _ in METRICS}
        lines.append(f"{name:<10} {'MEAN':<16} {sum(r['n_images'] for r in mine):>6} " + " ".join(f"{cell(k, m[k]):>9}" for k, _ in METRICS))
        lines.append("")
    return "\n".join(lines)


def markdown(rows, configs, summary):
    """The README's results section: one table per setting across the sets, with the mean, the
    date, the machine and the command that made it."""
    def cell(key, v):
        if v is None:
            return "-"
        if key in ("bank_size", "ms_per_image", "fit_seconds"):
            return f"{v:,.0f}".replace(",", " ")
        return f"{v:.3f}"
    # The command as anyone would run it: without where this run kept its files and binary.
    words, shown = shlex.split(summary["command"]), []
    while words:
        w = words.pop(0)
        if w in ("--out", "--cli", "--json", "--markdown") and words:
            words.pop(0)
        elif not w.startswith(("--out=", "--cli=", "--json=", "--markdown=")):
            shown.append(w)
    out = [f"Made by `python scripts/compare_sets.py {shlex.join(shown)}` on {summary['date']}, "
           f"{summary['machine']}, {summary['device']}; {summary['split']} half of each set's test images"
           f"{' (quick subsets)' if summary['quick'] else ''}. ms/img: eval's mean inspect time; fit s: wall time of `fit`.", ""]
    head = "| set | images | " + " | ".join(h for _, h in METRICS) + " |"
    for name in configs:
        about, args = summary["settings"][name]["about"], summary["settings"][name]["fit_args"]
        out += [f"**{name}**: {about} (`fit {' '.join(args)}`)" if args else f"**{name}**: {about} (`fit` without options)", "",
                head, "|" + "---|" * (len(METRICS) + 2)]
        mine = [r for r in rows if r["config"] == name]
        for r in mine:
            out.append(f"| {r['set']} | {r['n_images']} | " + " | ".join(cell(k, r[k]) for k, _ in METRICS) + " |")
        m = summary["mean"][name]
        out.append(f"| **mean** | {sum(r['n_images'] for r in mine)} | "
                   + " | ".join(f"**{cell(k, m[k])}**" if k != "bank_size" else "" for k, _ in METRICS) + " |")
        out.append("")
    return "\n".join(out)


# The README's results section: every method with its defaults, and the paper's PatchCore.
README_CONFIGS = ["default", "paper", "ssn", "draem"]
README_BEGIN = "<!-- compare_sets results: begin (regenerate with --update-readme) -->"
README_END = "<!-- compare_sets results: end -->"


def machine_description():
    """Cores, CPU model and its widest vector extension: ms and fit s depend on all three (the
    engine computes in bfloat16 only where the CPU multiplies it natively)."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    isa = next((name for flag, name in [("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"),
                                         ("avx2", "AVX2")] if flag in flags), "")
    return ", ".join(v for v in [f"{os.cpu_count()} CPU cores", model, isa] if v)


def update_readme(text):
    """Replaces the README's section between the two markers with `text`."""
    readme = ROOT / "README.md"
    s = readme.read_text()
    if README_BEGIN not in s or README_END not in s:
        sys.exit(f"README.md has no {README_BEGIN} ... {README_END} section to update")
    head, rest = s.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(head + README_BEGIN + "\n" + text + "\n" + README_END + tail)


def main():
    global CLI
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="settings: " + "; ".join(f"{k} = {v[0]}" for k, v in CONFIGS.items()))
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="folder holding the data sets")
    p.add_argument("--sets", help="comma-separated set names (default: every set found)")
    p.add_argument("--configs", help="comma-separated settings (default: default,paper; with --update-readme "
                   + ",".join(README_CONFIGS) + ")")
    p.add_argument("--config", action="append", default=[], metavar="NAME=FIT ARGS",
                   help="an extra setting, e.g. 'nodensity=--density-neighbors 0' (repeatable)")
    p.add_argument("--split", choices=["validation", "evaluation", "all"], default="evaluation")
    p.add_argument("--quick", action="store_true", help="subsets: minutes instead of an hour")
    p.add_argument("--out", type=Path, default=ROOT / "target" / "compare_sets")
    p.add_argument("--json", type=Path, help="the JSON file (default: <out>/compare_sets.json)")
    p.add_argument("--markdown", type=Path, help="also write the tables as markdown (the README's results section)")
    p.add_argument("--update-readme", action="store_true", help="put the markdown tables into README.md's results section")
    p.add_argument("--tables-from", type=Path, metavar="JSON",
                   help="no fits: print (and with --markdown/--update-readme write) the tables of an earlier run's JSON")
    p.add_argument("--cli", type=Path, default=CLI,
                   help="the anomaly_inspector binary (default: this checkout's release build; a copy keeps a long run "
                        "safe from rebuilds)")
    a = p.parse_args()
    if a.tables_from:
        summary = json.loads(a.tables_from.read_text())
        if a.update_readme and (summary["quick"] or summary["split"] != "evaluation"):
            sys.exit("--update-readme reports full runs on the evaluation half: that JSON is not one")
        chosen = list(summary["settings"])
        print(table(summary["rows"], chosen))
        write_markdown(a, summary["rows"], chosen, summary)
        return
    CLI = a.cli
    if not CLI.exists():
        sys.exit(f"{CLI} not found: run `bash scripts/setup.sh` (or cargo build --release) first")
    configs = dict(CONFIGS)
    for extra in a.config:
        name, _, args = extra.partition("=")
        if not name or not args:
            sys.exit(f"--config wants NAME=FIT ARGS, got {extra!r}")
        configs[name] = (args, shlex.split(args))
    if a.update_readme and (a.quick or a.split != "evaluation"):
        sys.exit("--update-readme reports full runs on the evaluation half: drop --quick and --split")
    if a.configs:
        chosen = a.configs.split(",")
    elif a.update_readme:
        chosen = README_CONFIGS
    else:
        chosen = ["default", "paper"] + [e.partition("=")[0] for e in a.config]
    unknown = [c for c in chosen if c not in configs]
    if unknown:
        sys.exit(f"unknown setting(s) {unknown}; known: {', '.join(configs)}")
    sets = find_sets(a.data)
    if a.sets:
        wanted = a.sets.split(",")
        missing = [w for w in wanted if w not in {s.name for s in sets}]
        if missing:
            sys.exit(f"no data set {missing} under {a.data} (found: {', '.join(s.name for s in sets)})")
        sets = [s for s in sets if s.name in wanted]
    a.out.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = time.monotonic()
    for data in sets:
        used = quick_copy(data, a.out / "quick_data" / data.name) if a.quick else data
        for name in chosen:
            t = time.monotonic()
            print(f"{data.name} / {name}: fit + eval ({a.split} half)...", end="", flush=True)
            row = one(used, name, configs[name][1], a.out, a.split, QUICK_TEST_PER_FOLDER if a.quick else None)
            rows.append(row)
            print(f" {time.monotonic() - t:.0f} s: image AUROC {row['image_auroc']:.3f}", flush=True)
    text = table(rows, chosen)
    print()
    print(text)
    agree = self_check_agreement(rows, chosen)
    if agree:
        print("Self-check: synthetic-defect image AUROC (good images only) against the real image AUROC, per set:")
        print("rho = Spearman's rank correlation over the settings; picked = the best synthetic figure (fit --auto's rule)")
        print(agreement_table(agree))
        print()
    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"), "machine": machine_description(),
        "device": rows[0]["device"] if rows else "?", "command": " ".join(shlex.quote(v) for v in sys.argv[1:]),
        "split": a.split, "quick": a.quick, "seconds": time.monotonic() - t0,
        "settings": {k: {"about": configs[k][0], "fit_args": configs[k][1]} for k in chosen},
        "rows": rows, "self_check_agreement": agree,
        "mean": {k: {m: mean([r for r in rows if r["config"] == k], m) for m, _ in METRICS} for k in chosen},
    }
    out_json = a.json or a.out / "compare_sets.json"
    out_json.write_text(json.dumps(summary, indent=1))
    print(f"written: {out_json} ({summary['seconds']:.0f} s)")
    write_markdown(a, rows, chosen, summary)


def write_markdown(a, rows, chosen, summary):
    """The markdown tables to --markdown's file and/or the README's results section."""
    if a.markdown or a.update_readme:
        md = markdown(rows, chosen, summary)
        if a.markdown:
            a.markdown.write_text(md + "\n")
            print(f"written: {a.markdown}")
        if a.update_readme:
            update_readme(md)
            print("README.md results section updated")


if __name__ == "__main__":
    main()
