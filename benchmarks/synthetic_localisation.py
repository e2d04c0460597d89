"""Localisation benchmark with known ground truth: HDM presets against every baseline, on the CPU.

Synthetic 64×64 scenes (``hdm_lightning/synthetic.py``) whose class is decided by red disks only,
some with 2-3 of them; a tiny classifier trained deterministically on them
(``benchmarks/train_synthetic_classifier.py``). Every method runs through its command line into
its own run folder; ``hdm_lightning.evaluate`` scores them against the masks, and this script adds
instance coverage (the share of target instances that hold at least one of the map's top 5 %
pixels): does a map cover every instance or only the most salient one?

Usage:
    python benchmarks/synthetic_localisation.py [--out runs/synthetic] [--scenes 24]

Writes ``<out>/table.md`` (pasted into the README) and ``<out>/eval/`` (curves, gallery).
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hdm_lightning.synthetic import split_instances

ROOT = Path(__file__).resolve().parent.parent
DATA = ["--data.image_size=64", "--data.mean=[0.5,0.5,0.5]", "--data.std=[0.5,0.5,0.5]", "--data.batch_size=8"]
HDM_VARIANTS = {
    "HDM fast (3 stages, sum)": ["--config", "configs/fast.yaml"],
    "HDM fast, learned fusion": ["--config", "configs/fast.yaml", "--model.fusion=LearnedFusion"],
    "HDM fast, re-predict target": ["--config", "configs/fast.yaml", "--model.target_policy=Repredict"],
    "DM (1 stage)": ["--config", "configs/fast.yaml", "--schedule.stages=1"],
    "MDM": ["--config", "configs/mdm.yaml"],
}
BASELINES = {
    "Grad-CAM": ["--baseline=GradCAM"],
    "Grad-CAM++": ["--baseline=GradCAMPlusPlus"],
    "Score-CAM": ["--baseline=ScoreCAM"],
    "Integrated Gradients": ["--baseline=IntegratedGradients"],
    "Occlusion": ["--baseline=Occlusion", "--baseline.window=8", "--baseline.stride=4"],
    "RISE": ["--baseline=RISE", "--baseline.n_masks=2000"],
    "Extremal perturbation": ["--baseline=ExtremalPerturbation", "--baseline.steps=200"],
}


def classifier_args(data: Path) -> list[str]:
    return ["--model.classifier.class_path=hdm_lightning.models.ImportedClassifier",
            "--model.classifier.init_args.network=hdm_lightning.synthetic.TinyClassifier",
            f"--model.classifier.init_args.checkpoint={data / 'tiny_classifier.pt'}"]


def run(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, *command], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def positive_manifest(data: Path) -> Path:
    """The class-1 scenes only (localisation needs an object), target 1.

    It lies beside the images, so an image's path relative to it is its mask's under ``masks/``.
    """
    with (data / "manifest.csv").open() as handle:
        rows = [r for r in csv.DictReader(handle) if r["target"] == "1"]
    path = data / "images" / "positives.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image", "target"])
        writer.writeheader()
        writer.writerows({"image": Path(r["image"]).name, "target": 1} for r in rows)
    return path


def instance_coverage(run_dir: Path, data: Path, top: float = 0.05) -> float:
    """Share of target instances holding at least one of the map's top ``top`` pixels."""
    hits = total = 0
    for mask_file in sorted((data / "masks").glob("*.png")):
        mask = torch.from_numpy(np.asarray(Image.open(mask_file)) > 127)
        map_file = run_dir / "maps" / f"{mask_file.stem}.npy"
        if not mask.any() or not map_file.is_file():
            continue
        saliency = torch.from_numpy(np.load(map_file))
        kept = saliency >= saliency.flatten().quantile(1 - top)
        for instance in split_instances(mask[None])[0]:
            if instance.any():
                total += 1
                hits += int((instance & kept).any())
    return hits / max(total, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "synthetic")
    parser.add_argument("--scenes", type=int, default=24, help="scenes written (half hold targets)")
    args = parser.parse_args()
    data = args.out / "data"
    run(["benchmarks/train_synthetic_classifier.py", str(data), "--scenes", str(args.scenes)])
    manifest = positive_manifest(data)
    seconds, folders = {}, {}
    common = [f"--data.images={manifest}", *DATA, *classifier_args(data)]
    for name, extra in HDM_VARIANTS.items():
        folders[name] = args.out / name.split(" (")[0].replace(" ", "_").replace(",", "")
        seconds[name] = run(["train_masks.py", *extra, *common, f"--out_dir={folders[name]}",
                             "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                             "--trainer.accelerator=cpu"])
    for name, extra in BASELINES.items():
        folders[name] = args.out / name.replace(" ", "_")
        seconds[name] = run(["-m", "hdm_lightning.explain_baseline", *extra, *common, f"--out_dir={folders[name]}"])
    run(["-m", "hdm_lightning.evaluate", "--runs", *map(str, folders.values()), *common,
         "--ground_truth.class_path=hdm_lightning.groundtruth.MaskFolder",
         f"--ground_truth.init_args.root={data / 'masks'}", f"--out_dir={args.out / 'eval'}"])
    write_table(args.out, folders, seconds, data)


def write_table(out: Path, folders: dict[str, Path], seconds: dict[str, float], data: Path) -> None:
    with (out / "eval" / "results.csv").open() as handle:
        results = {row["method"]: row for row in csv.DictReader(handle)}  # method: run folder name
    columns = [c for c in next(iter(results.values())) if c not in ("method", "images")]
    lines = ["| method | " + " | ".join(columns) + " | instance coverage | seconds |",
             "|---" * (len(columns) + 3) + "|"]
    for name, folder in folders.items():
        row = results.get(folder.name, {})
        cells = [f"{float(row[c]):.3f}" if row.get(c) not in (None, "") else "" for c in columns]
        coverage = instance_coverage(folder, data)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {coverage:.3f} | {seconds[name]:.0f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
