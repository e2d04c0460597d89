"""Train the tiny synthetic classifier and write a scene set with its ground truth, for CPU benchmarks.

Writes to OUT:

- ``tiny_classifier.pt``: state dict of ``hdm_lightning.synthetic.TinyClassifier`` (inputs
  normalised with mean 0.5, std 0.5 per channel);
- ``images/scene_00000.png``, ...: RGB scenes drawn with ``--scene-seed`` (not the training seed);
- ``masks/scene_00000.png``, ...: ground truth, 255 on target pixels, readable with
  ``hdm_lightning.groundtruth.MaskFolder(OUT / "masks")``;
- ``manifest.csv``: columns ``image``, ``target`` (the label), ``instances``, ``mask``; paths are
  relative to OUT, as ``hdm_lightning.data`` reads manifests;
- ``summary.json``: seeds, training seconds and held-out accuracy.

Usage:
    python benchmarks/train_synthetic_classifier.py OUT [--scenes 32] [--seed 0] [--scene-seed 1234]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hdm_lightning.synthetic import accuracy, make_scenes, train_tiny_classifier

HELD_OUT = 2000  # scenes the accuracy is measured on


def write_scenes(out: Path, scenes_count: int, seed: int) -> None:
    """Scene PNGs, mask PNGs and the manifest, all under ``out``."""
    scenes = make_scenes(scenes_count, seed=seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    pixels = (scenes.images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()  # (N, H, W, 3)
    masks = scenes.masks.numpy().astype(np.uint8) * 255  # (N, H, W)
    rows = []
    for i in range(scenes_count):
        name = f"scene_{i:05d}.png"
        Image.fromarray(pixels[i]).save(out / "images" / name)
        Image.fromarray(masks[i]).save(out / "masks" / name)
        rows.append({"image": f"images/{name}", "target": int(scenes.labels[i]),
                     "instances": int(scenes.instances[i]), "mask": f"masks/{name}"})
    with (out / "manifest.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--scenes", type=int, default=32, help="number of scenes to write")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--scene-seed", type=int, default=1234,
                        help="seed of the written and the held-out scenes")
    args = parser.parse_args()
    if args.scenes < 1:
        parser.error(f"--scenes must be at least 1, got {args.scenes}")

    start = time.perf_counter()
    model = train_tiny_classifier(seed=args.seed)
    seconds = time.perf_counter() - start
    held_out = float(accuracy(model, make_scenes(HELD_OUT, seed=args.scene_seed)))

    args.out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out / "tiny_classifier.pt")
    write_scenes(args.out, args.scenes, args.scene_seed)
    summary = {"seed": args.seed, "scene_seed": args.scene_seed, "scenes": args.scenes,
               "train_seconds": round(seconds, 2), "torch_threads": torch.get_num_threads(),
               "held_out_scenes": HELD_OUT, "held_out_accuracy": held_out}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
