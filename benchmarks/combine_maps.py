"""Combine finished runs' maps into a new run folder, without optimising anything.

Each source run's map of an image is min-max normalised, the sources are combined pixelwise
(``mean``: what ``--model.substrate both`` does with its two passes' maps; ``max``), optionally
smoothed by a Gaussian of ``--sigma`` times the map's shorter side, and min-max normalised again.
The folder gets the first run's ``index.jsonl`` and ``config.yaml``, so that
``hdm_lightning.evaluate`` scores it like any run. An image missing from a source is left out.

    python benchmarks/combine_maps.py runs/photos7_lite2/HDM runs/photos7_lite2c/HDM_mean --out runs/both_lite2
    python benchmarks/combine_maps.py runs/photos7_lite2/HDM --sigma 0.02 --out runs/smooth_lite2
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from hdm_lightning.masks import minmax as minmax_maps

RULES = {"mean": lambda maps: np.mean(maps, axis=0), "max": lambda maps: np.max(maps, axis=0)}


def minmax(saliency: np.ndarray) -> np.ndarray:
    """``hdm_lightning.masks.minmax`` of one ``(H, W)`` map, in float64."""
    return minmax_maps(torch.from_numpy(saliency)[None])[0].numpy()


def combine(sources: list[Path], name: str, rule: str, sigma: float) -> np.ndarray:
    """One image's combined map, float32 ``(H, W)``; every source's map must have the same shape."""
    maps = [minmax(np.load(run / "maps" / f"{name}.npy").astype(np.float64)) for run in sources]
    shapes = {m.shape for m in maps}
    if len(shapes) > 1:
        raise ValueError(f"{name}: the runs' maps differ in shape {sorted(shapes)}")
    combined = RULES[rule](np.stack(maps))
    if sigma:
        combined = gaussian_filter(combined, sigma * min(combined.shape), mode="nearest")
    return minmax(combined).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+", help="finished run folders (maps/, index.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="the new run folder (must not exist)")
    parser.add_argument("--rule", choices=sorted(RULES), default="mean")
    parser.add_argument("--sigma", type=float, default=0.0, help="Gaussian smoothing, a share of the shorter side")
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"--out {args.out} exists; choose a new folder")
    names = [json.loads(line)["name"] for line in (args.runs[0] / "index.jsonl").read_text().splitlines()]
    names = [n for n in names if all((run / "maps" / f"{n}.npy").is_file() for run in args.runs)]
    (args.out / "maps").mkdir(parents=True)
    rows = [line for line in (args.runs[0] / "index.jsonl").read_text().splitlines() if json.loads(line)["name"] in names]
    (args.out / "index.jsonl").write_text("".join(f"{line}\n" for line in rows))
    shutil.copy(args.runs[0] / "config.yaml", args.out / "config.yaml")
    for name in names:
        np.save(args.out / "maps" / f"{name}.npy", combine(args.runs, name, args.rule, args.sigma))
    print(f"{args.out}: {len(names)} maps ({args.rule} of {len(args.runs)} runs, sigma {args.sigma:g})")


if __name__ == "__main__":
    main()
