"""What each stage adds to the fused map: stored maps, refused without rerunning HDM.

The evidence-weighted fusion writes ``F = minmax(S_1 + w_2 S_2 + w_3 S_3)``; the weights are not
stored, so they are recovered from ``F`` and the stage maps by least squares (``S_1 = a F − w_2 S_2
− w_3 S_3 + b``). Variants written and scored with ``hdm_lightning.evaluate``:

- ``recon``: the weights recovered, refused (checks the recovery: must score as the run);
- ``stage1``: stage 1 alone;
- with ``--other RUN``: ``other_stage1``, the other run's stage 1 alone, and ``mix``, the other
  run's stage 1 with this run's later stages and weights (what more steps in stage 1 alone might give).

Usage:
    python benchmarks/stage_mix.py runs/photos7_e5/HDM_blur_eps_0.5 --other runs/photos7_200/HDM_200_steps \\
        --images runs/photos7_e5/photos.txt --out runs/stage_mix
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def minmax(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / max(x.max() - x.min(), 1e-12)


def stages_and_weights(run: Path, name: str) -> tuple[list[np.ndarray], np.ndarray]:
    """The stage maps of one image and the later stages' fusion weights recovered from its fused map."""
    stages = [np.load(p).astype(np.float64) for p in sorted((run / "stages").glob(f"{name}_stage*.npy"))]
    fused = np.load(run / "maps" / f"{name}.npy").astype(np.float64)
    columns = [fused.ravel(), *(-s.ravel() for s in stages[1:]), np.ones(fused.size)]
    coef, *_ = np.linalg.lstsq(np.stack(columns, 1), stages[0].ravel(), rcond=None)
    return stages, coef[1:-1]


def write(folder: Path, index: Path, maps: dict[str, np.ndarray]) -> Path:
    (folder / "maps").mkdir(parents=True, exist_ok=True)
    shutil.copy(index, folder / "index.jsonl")
    for name, fused in maps.items():
        np.save(folder / "maps" / f"{name}.npy", fused.astype(np.float32))
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--other", type=Path, help="a run of the same images whose stage 1 is mixed in")
    parser.add_argument("--images", type=Path, required=True, help="the --data.images of the runs")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "stage_mix")
    parser.add_argument("--num_steps", type=int, default=224)
    args = parser.parse_args()
    names = sorted(p.stem for p in (args.run / "maps").glob("*.npy"))
    variants: dict[str, dict[str, np.ndarray]] = {"recon": {}, "stage1": {}, "other_stage1": {}, "mix": {}}
    for name in names:
        stages, weights = stages_and_weights(args.run, name)
        print(name, "later-stage weights", np.round(weights, 3))
        later = sum(w * s for w, s in zip(weights, stages[1:]))
        variants["recon"][name], variants["stage1"][name] = minmax(stages[0] + later), minmax(stages[0])
        if args.other:
            other = np.load(args.other / "stages" / f"{name}_stage1.npy").astype(np.float64)
            variants["other_stage1"][name], variants["mix"][name] = minmax(other), minmax(other + later)
    folders = [write(args.out / v, args.run / "index.jsonl", maps) for v, maps in variants.items() if maps]
    subprocess.run([sys.executable, "-m", "hdm_lightning.evaluate", "--runs", *map(str, folders),
                    f"--data.images={args.images}", "--data.batch_size=4", "--metrics=[deletion,insertion,confidence]",
                    f"--deletion.num_steps={args.num_steps}", f"--insertion.num_steps={args.num_steps}",
                    f"--out_dir={args.out / 'eval'}"], check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
