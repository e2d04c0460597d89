"""Presets on the quality/cost frontier: how far is each preset's map from the paper constants'?

Real photos (scikit-image, matplotlib, scikit-learn), each explained for EfficientNet-Lite0's (or
``--variant``'s; its runs go to ``<out>/<variant>/``) top-1 class through the real command line with
``configs/paper.yaml``, the defaults (``fine``), ``fast`` and presets between them; then, per preset:
classifier passes per image (the index rows' ``passes``: masked images sent through the classifier),
the preset's wall seconds over the photos this call explained, start-up included (images share the pool, so an index
row's own ``seconds`` is its time in flight, not its cost), deletion and insertion AUC (RISE
protocol, ``hdm_lightning.evaluate``) and the Pearson correlation of each map with the ``paper`` map
of the same photo. ``paper`` costs about 55 000 passes an image a stage, so on a CPU run it at a
small input size (``--size 64``) and one stage (``--schedule.stages=1``), and say so. Finished run
folders are reused (the run folder is the truth).

Usage:
    python benchmarks/presets.py --size 64 --photos 6 [--out runs/presets] [--threads 2] [--variant lite2]
                                 [--schedule.stages=1 ...]

Settings after the script's own (``--schedule.stages=1``) go to every preset's run; give such a
comparison its own ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stability import correlation  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PHOTOS = ["skimage:chelsea", "skimage:coffee", "skimage:astronaut", "skimage:rocket",
          "matplotlib:grace_hopper.jpg", "sklearn:china.jpg", "sklearn:flower.jpg"]
#: preset name -> train_masks.py arguments; ``paper`` is the reference every other map is compared with.
PRESETS = {
    "fine (defaults)": [],  # the defaults since stop 56 (configs/fine.yaml)
    "fast": ["--config=configs/fast.yaml"],  # twice the rate over half the steps: the defaults to stop 55
    # the defaults before stop 28 (configs/sufficient.yaml: the constant start and fast's rate and steps too),
    # and two variants of them
    "sufficient": ["--config=configs/sufficient.yaml"],
    "sufficient, 200 steps": ["--config=configs/sufficient.yaml", "--schedule.min_steps=100",
                              "--schedule.max_steps=200", "--schedule.patience=50", "--schedule.check_every=25"],
    "sufficient, paper's 30 masks": ["--config=configs/sufficient.yaml",
                                     "--model.benchmark_sizes=[6,7,8,9,10,11]", "--model.block_factors=[2,3,5]"],
    "paper, fast's schedule": ["--config=configs/paper.yaml", "--model.lr=0.05", "--model.lr_schedule=cosine",
                               "--schedule.min_steps=20", "--schedule.max_steps=40", "--schedule.patience=10",
                               "--schedule.check_every=10", "--schedule.min_delta=0.01"],
    "paper, 150 steps": ["--config=configs/paper.yaml", "--schedule.min_steps=150", "--schedule.max_steps=150",
                         "--schedule.check_every=50"],
    "paper": ["--config=configs/paper.yaml"],
}
COMMON = ["--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
          "--model.chunk_size=32", "--engine.max_items=32"]


def folder_of(out: Path, preset: str) -> Path:
    return out / preset.split(" (")[0].replace(" ", "_").replace(",", "").replace("'", "")


def run_preset(preset: str, out: Path, listing: Path, size: int, photos: int, extra: list[str]) -> tuple[float, int]:
    """Explain the photos without a map (a finished folder costs nothing); seconds of this call and the
    photos it explained (an extended folder explains only the new ones)."""
    folder = folder_of(out, preset)
    start = time.perf_counter()
    missing = photos - len(list((folder / "maps").glob("*.npy")))
    if missing > 0:
        subprocess.run([sys.executable, "train_masks.py", *PRESETS[preset], *COMMON, *extra, f"--data.images={listing}",
                        f"--data.image_size={size}", "--data.batch_size=4", f"--out_dir={folder}"],
                       check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, max(missing, 0)


def rows(folder: Path) -> dict[str, dict]:
    return {r["name"]: r for r in map(json.loads, (folder / "index.jsonl").read_text().splitlines())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "presets")
    parser.add_argument("--size", type=int, default=64, help="classifier input side (px)")
    parser.add_argument("--photos", type=int, default=6, help="how many of the photos (first N)")
    parser.add_argument("--presets", nargs="*", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", default="lite0",
                        help="EfficientNet-Lite variant explained (lite2: the `lite` extra)")
    args, extra = parser.parse_known_args()  # --schedule.stages=1 ...: settings of every preset's run
    from hdm_lightning.models import EfficientNetLite

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    classifier = EfficientNetLite.options(args.variant)
    out = args.out / ("" if args.variant == "lite0" else args.variant) / f"size{args.size}"
    out.mkdir(parents=True, exist_ok=True)
    listing = out / "photos.txt"
    listing.write_text("\n".join(PHOTOS[: args.photos]) + "\n")
    presets = ["paper", *[p for p in args.presets if p != "paper"]]
    calls = {p: run_preset(p, out, listing, args.size, args.photos, [*classifier, *extra]) for p in presets}
    folders = [str(folder_of(out, p)) for p in presets]
    subprocess.run([sys.executable, "-m", "hdm_lightning.evaluate", "--runs", *folders, *classifier,
                    f"--data.images={listing}", f"--data.image_size={args.size}", "--metrics=[deletion,insertion]", "--deletion.num_steps=32",
                    "--insertion.num_steps=32", f"--out_dir={out / 'eval'}"], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL)
    with open(out / "eval" / "results.csv", newline="") as handle:
        scores = {row["method"]: {k: float(v) for k, v in row.items() if k != "method"} for row in csv.DictReader(handle)}
    paper = rows(folder_of(out, "paper"))
    variant = ["--variant", args.variant] if classifier else []
    command = ["--size", str(args.size), "--photos", str(args.photos), *variant, *extra]
    lines = [f"Presets at {args.size} px on {args.photos} photos, EfficientNet-{args.variant.capitalize()}, "
             f"`python benchmarks/presets.py {' '.join(command)}`", "",
             "| preset | passes per image | wall seconds per image | deletion AUC | insertion AUC | correlation with paper (mean, min) |",
             "|---|---|---|---|---|---|"]
    for preset in presets:
        folder = folder_of(out, preset)
        own = rows(folder)
        passes = np.mean([r.get("passes", r["steps"]) for r in own.values()])  # rows before "passes": one a step
        seconds, explained = calls[preset]  # a finished folder is reused: its time is not this call's
        per_image = f"{seconds / explained:.1f}" if explained else "(reused folder)"
        corr = [correlation(np.load(folder / "maps" / f"{n}.npy"), np.load(folder_of(out, "paper") / "maps" / f"{n}.npy"))
                for n in paper]
        score = scores.get(folder.name, {})
        lines.append(f"| {preset} | {passes:.0f} | {per_image} | {score.get('deletion_auc', float('nan')):.4f} | "
                     f"{score.get('insertion_auc', float('nan')):.4f} | {np.mean(corr):.3f}, {np.min(corr):.3f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print({p: round(s) for p, (s, _) in calls.items()}, "seconds of this call per preset")


if __name__ == "__main__":
    main()
