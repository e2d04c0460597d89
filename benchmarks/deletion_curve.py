"""The deletion curve of one photo under several runs' maps: where one map's ranking loses the class sooner.

Prints ``p(class)`` at every step of the RISE deletion (pixels set to the mean colour, most important
first; ``--steps`` intervals) and the AUC, one line per run folder, for the class that run explained
(its ``index.jsonl`` row). The photo is read as the default ``data.resize`` (squash) reads it, as in
the photo benchmarks; ``--size`` and ``--variant`` must be the runs'.

Usage:
    python benchmarks/deletion_curve.py skimage:coffee --variant lite2 --size 260 \\
        --runs runs/photos7_lite2/HDM runs/photos7_lite2/Grad-CAM
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hdm_lightning.data import ExplanationDataModule
from hdm_lightning.metrics import functional as MF
from hdm_lightning.models import EfficientNetLite, freeze


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", help="the photo as the runs were given it, e.g. skimage:coffee")
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="run folders with maps/<name>.npy")
    parser.add_argument("--variant", default="lite0", help="the EfficientNet-Lite the runs explained")
    parser.add_argument("--size", type=int, default=224, help="the runs' data.image_size")
    parser.add_argument("--steps", type=int, default=28, help="intervals of the curve")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        listing = Path(folder) / "photo.txt"
        listing.write_text(args.image + "\n")
        data = ExplanationDataModule(str(listing), image_size=args.size)  # the runs' own preprocessing
        data.setup()
        image, name = data.batch([0])["images"], data.records[0].name
    classifier = freeze(EfficientNetLite(args.variant))
    print(f"{name}: p(class) at 0 … 100 % of the pixels removed, {args.steps} steps")
    for run in args.runs:
        rows = [json.loads(line) for line in (run / "index.jsonl").read_text().splitlines() if line.strip()]
        target = torch.tensor([next(r["target"] for r in rows if r["name"] == name)])
        saliency = torch.from_numpy(np.load(run / "maps" / f"{name}.npy")).float()[None, None]
        saliency = F.interpolate(saliency, size=image.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        curve = MF.deletion_curve(classifier, image, saliency, target, args.steps, args.steps + 1)
        points = " ".join(f"{p:.2f}" for p in curve[0].tolist())
        print(f"{run} (class {int(target)}): AUC {float(MF.curve_auc(curve)[0]):.3f} | {points}")


if __name__ == "__main__":
    main()
