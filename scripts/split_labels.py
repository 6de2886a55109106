#!/usr/bin/env python3
"""Make a labelled-defects copy of an MVTec-layout data set: K defective images per type move from
test/ to train/ (with their masks, or without them to simulate image-level labels), so the label
curve (accuracy against the number of labelled defects) can be measured on any set.

    python scripts/split_labels.py --data ../shared/data/magnetic_tile --out /tmp/mt_k5 --per-type 5
    python scripts/split_labels.py --data SRC --out DST --total 20          # 20 spread over the types
    python scripts/split_labels.py --data SRC --out DST --per-type 5 --weak # verdicts only, no masks

The source is never changed: DST is built from symbolic links (train/good, test/, ground_truth/),
so it costs no space and every image stays the user's own file. The choice is deterministic: the
K images of a type are spread evenly over its sorted file names (`--seed` shifts where the
spreading starts), so the same command gives the same split on every machine. The images left
in DST/test/ are exactly those not used for training, so `eval` on DST never scores a training
image (and `MvtecDataset` refuses a file name that is in both).
"""
import argparse
import json
import sys
from pathlib import Path

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp"}


def images(folder):
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


def spread(items, k, seed):
    """k of items, evenly spread over the sorted list, starting at an offset that seed chooses."""
    if k >= len(items):
        return list(items)
    step = len(items) / k
    offset = (seed % max(1, int(step))) if step >= 1 else 0
    return [items[min(len(items) - 1, int(offset + i * step))] for i in range(k)]


def mask_of(src, defect, image):
    """The image's mask in src/ground_truth/<defect>/ (<stem>_mask.png, else <stem>.png), or None."""
    folder = src / "ground_truth" / defect
    for name in (f"{image.stem}_mask.png", f"{image.stem}.png"):
        if (folder / name).is_file():
            return folder / name
    return None


def per_type_counts(types, total):
    """total spread over the types as evenly as possible (the first types get the remainder)."""
    base, extra = divmod(total, len(types))
    return {t: base + (1 if i < extra else 0) for i, t in enumerate(types)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="source data set (MVTec layout); never changed")
    p.add_argument("--out", type=Path, required=True, help="new folder to create (must not exist)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--per-type", type=int, help="labelled defective images per defect type")
    how.add_argument("--total", type=int, help="labelled defective images in all, spread over the types")
    p.add_argument("--weak", action="store_true", help="leave the training images' masks out (image-level labels)")
    p.add_argument("--seed", type=int, default=0, help="shifts which images are chosen (default 0)")
    a = p.parse_args()

    src = a.data.resolve()
    if not (src / "train" / "good").is_dir() or not (src / "test").is_dir():
        sys.exit(f"{src}: expected the MVTec layout with train/good/ and test/<defect>/")
    if a.out.exists():
        sys.exit(f"{a.out} exists; choose a new folder (nothing is overwritten)")
    count = a.per_type if a.per_type is not None else a.total
    if count < 0:
        sys.exit("the number of labelled images cannot be negative")
    types = sorted(d.name for d in (src / "test").iterdir() if d.is_dir() and d.name != "good" and not d.name.startswith("."))
    if not types:
        sys.exit(f"{src}/test holds no defect folders")
    wanted = {t: a.per_type for t in types} if a.per_type is not None else per_type_counts(types, a.total)

    out = a.out
    (out / "train").mkdir(parents=True)
    (out / "train" / "good").symlink_to(src / "train" / "good")
    if (src / "test" / "good").is_dir():
        (out / "test").mkdir()
        (out / "test" / "good").symlink_to(src / "test" / "good")
    summary = {"source": str(src), "weak": a.weak, "seed": a.seed, "types": {}}
    for t in types:
        all_images = images(src / "test" / t)
        chosen = spread(all_images, wanted[t], a.seed)
        left = [im for im in all_images if im not in chosen]
        if not left:
            sys.exit(f"{t}: all {len(all_images)} images would move to train/; ask for fewer")
        for folder, group in (("train", chosen), ("test", left)):
            if not group:
                continue
            (out / folder / t).mkdir(parents=True, exist_ok=True)
            for im in group:
                (out / folder / t / im.name).symlink_to(im)
                mask = mask_of(src, t, im)
                if mask is not None and not (folder == "train" and a.weak):
                    (out / "ground_truth" / t).mkdir(parents=True, exist_ok=True)
                    (out / "ground_truth" / t / mask.name).symlink_to(mask)
        summary["types"][t] = {"train": [im.name for im in chosen], "test": len(left)}
        print(f"{t}: {len(chosen)} to train/{' (no masks)' if a.weak else ''}, {len(left)} left in test/")
    (out / "split_labels.json").write_text(json.dumps(summary, indent=1))
    print(f"written: {out} (links into {src}); the split is in {out / 'split_labels.json'}")


if __name__ == "__main__":
    main()
