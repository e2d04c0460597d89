"""Are HDM maps a stable function of the image? The same photos under different arithmetic.

Four photos shipped with scikit-image and matplotlib, each explained for EfficientNet-Lite0's
(or ``--variant``'s) top-1 class through the real command line, under runs that should give the same map: one image
at a time (``data.batch_size=1``), all four together (``data.batch_size=4``), two CPU processes
(``ddp_independent``), ``bf16-mixed`` against float32, and a channels-last classifier
(``model.channels_last``, faster on CPUs) against the default layout. Reports, per image and pair of runs,
the Pearson correlation of the fused maps (and of each stage's) and how far deletion and insertion
AUC (RISE protocol, 56 steps) move between the two runs. Issue 7 asks for >= 0.99 (batch, processes) and
>= 0.97 with AUCs within 0.005 (bf16).

Usage:
    python benchmarks/stability.py [--size 128] [--photos 4] [--runs batch1 batch4 2proc bf16 channels_last]
                                   [--out runs/stability] [--threads 1] [--variant lite2] [--model.lr=0.02 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PHOTOS = ["skimage:chelsea", "skimage:coffee", "skimage:astronaut", "matplotlib:grace_hopper.jpg"]
RUNS = {
    "batch1": ["--data.batch_size=1"],
    "batch4": ["--data.batch_size=4"],
    "2proc": ["--data.batch_size=2", "--trainer.devices=2", "--trainer.strategy=ddp_independent"],
    "bf16": ["--data.batch_size=1", "--trainer.precision=bf16-mixed"],
    "channels_last": ["--data.batch_size=1", "--model.channels_last=true"],
}
PAIRS = [("batch1", "batch4"), ("batch1", "2proc"), ("batch4", "2proc"), ("batch1", "bf16"), ("batch1", "channels_last")]


def run(name: str, out: Path, listing: Path, size: int, extra: list[str], threads: int | None = None) -> float:
    folder = out / name
    # the user's settings first: a ``--config`` among them must not override the run's folder or its arithmetic
    command = [sys.executable, "train_masks.py", *extra, f"--data.images={listing}", f"--data.image_size={size}",
               f"--out_dir={folder}", "--trainer.accelerator=cpu", "--trainer.logger=false",
               "--trainer.enable_progress_bar=false", *RUNS[name]]
    start = time.perf_counter()
    # OMP_NUM_THREADS set: every process of every run uses that many threads (Lightning otherwise
    # gives each of 2 processes half the cores, and thread counts change a kernel's last bits)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - start


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float((a * b).sum() / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def names(folder: Path) -> list[str]:
    return sorted(p.stem for p in (folder / "maps").glob("*.npy"))


def auc_scores(out: Path, runs: list[str], size: int, variant: str = "lite0") -> dict[str, dict[str, tuple[float, float]]]:
    """Deletion and insertion AUC (RISE protocol, 56 steps) of each run's fused maps, per image."""
    from hdm_lightning.data import ExplanationDataModule
    from hdm_lightning.metrics import functional as MF
    from hdm_lightning.models import EfficientNetLite

    classifier = EfficientNetLite(variant).eval()
    data = ExplanationDataModule(str(out / "photos.txt"), image_size=size)  # the runs' own preprocessing
    data.setup()
    rows = {json.loads(line)["name"]: json.loads(line) for line in (out / runs[0] / "index.jsonl").open()}
    scores: dict[str, dict[str, tuple[float, float]]] = {run_name: {} for run_name in runs}
    with torch.no_grad():
        for index, record in enumerate(data.records):
            image = data.batch([index])["images"]
            target = torch.tensor([rows[record.name]["target"]])
            for run_name in runs:
                saliency = torch.from_numpy(np.load(out / run_name / "maps" / f"{record.name}.npy"))[None, None]
                saliency = F.interpolate(saliency, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
                deletion = MF.curve_auc(MF.deletion_curve(classifier, image, saliency, target, 56, 57))
                insertion = MF.curve_auc(MF.insertion_curve(classifier, image, saliency, target, 56, 57, 11, 5.0))
                scores[run_name][record.name] = (float(deletion), float(insertion))
    return scores


def auc_rows(scores: dict[str, dict[str, tuple[float, float]]], first: str, second: str) -> list[str]:
    """Table rows: how far the second run's deletion and insertion AUC lie from the first's, per image."""
    images = sorted(scores[first])
    lines = []
    for column, metric in ((0, "deletion"), (1, "insertion")):
        changes = [scores[second][n][column] - scores[first][n][column] for n in images]
        lines.append(f"| {second} − {first} {metric} AUC | " + " | ".join(f"{c:+.4f}" for c in changes)
                     + f" | {max(abs(c) for c in changes):.4f} (largest) |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "stability")
    parser.add_argument("--size", type=int, default=128, help="classifier input side (px)")
    parser.add_argument("--set", nargs="*", default=[],
                        help="extra train_masks.py settings for every run (or put them after the script's own)")
    parser.add_argument("--photos", type=int, default=len(PHOTOS), help="how many of the photos (first N)")
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS),
                        help="runs to make (a finished run folder is reused: its rerun does no work)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every process of every run (default: Lightning's choice)")
    parser.add_argument("--no-aucs", dest="aucs", action="store_false",
                        help="skip the deletion and insertion AUC of every run's maps (a pass per curve step)")
    parser.add_argument("--variant", default="lite0",
                        help="EfficientNet-Lite variant explained (lite2: the `lite` extra)")
    args, extra = parser.parse_known_args()  # --model.lr=0.05 ... are train_masks.py settings
    from hdm_lightning.models import EfficientNetLite

    args.set = [*EfficientNetLite.options(args.variant), *args.set, *extra]
    args.out.mkdir(parents=True, exist_ok=True)
    listing = args.out / "photos.txt"
    listing.write_text("\n".join(PHOTOS[: args.photos]) + "\n")
    seconds = {name: run(name, args.out, listing, args.size, args.set, args.threads) for name in args.runs}
    threads = f", {args.threads} thread(s) a process" if args.threads else ""
    lines = [f"Stability, {args.size} px{threads}, settings {args.set or 'defaults'}; seconds per run: "
             + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()), "",
             "| pair | " + " | ".join(names(args.out / "batch1")) + " | min |", "|---|" + "---|" * (args.photos + 1)]
    pairs = [p for p in PAIRS if set(p) <= set(args.runs)]
    paired = [name for name in args.runs if any(name in pair for pair in pairs)]  # only these are compared
    scores = auc_scores(args.out, paired, args.size, args.variant) if args.aucs and pairs else {}
    for first, second in pairs:
        values, gaps = [], []
        for name in names(args.out / first):
            a = np.load(args.out / first / "maps" / f"{name}.npy")
            b = np.load(args.out / second / "maps" / f"{name}.npy")
            values.append(correlation(a, b))
            gaps.append(float(np.abs(a - b).max()))  # 0: the same map to the bit
        lines.append(f"| {first} vs {second} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {min(values):.3f} |")
        lines.append(f"| {first} vs {second}, largest difference | " + " | ".join(f"{g:.1e}" for g in gaps)
                     + f" | {max(gaps):.1e} (largest) |")
        for stage in sorted({p.stem.rsplit("_stage", 1)[1] for p in (args.out / first / "stages").glob("*_stage*.npy")}):
            values = [correlation(np.load(args.out / first / "stages" / f"{name}_stage{stage}.npy"),
                                  np.load(args.out / second / "stages" / f"{name}_stage{stage}.npy"))
                      for name in names(args.out / first)]
            lines.append(f"| {first} vs {second}, stage {stage} | " + " | ".join(f"{v:.3f}" for v in values)
                         + f" | {min(values):.3f} |")
        if scores:
            lines += auc_rows(scores, first, second)
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
