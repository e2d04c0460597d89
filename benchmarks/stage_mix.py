"""What each stage adds to the fused map: stored maps, refused without rerunning HDM.

The evidence-weighted fusion writes ``F = minmax(S_1 + w_2 S_2 + w_3 S_3)``; the weights are not
stored, so they are recovered from ``F`` and the stage maps by least squares (``S_1 = a F − w_2 S_2
− w_3 S_3 + b``): unlike ``benchmarks/refuse.py``, which recomputes them with the classifier and removals
onto the mean colour, these are the weights the run itself used, whatever its substrate. Variants written and scored with
``hdm_lightning.evaluate``:

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
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from refuse import stage_maps  # noqa: E402

from hdm_lightning.masks import minmax  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def stages_and_weights(run: Path, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(T, H, W)`` stage maps of one image and the later stages' fusion weights ``(T - 1,)``
    recovered from its fused map."""
    stages = stage_maps(run, row["name"], row["stages"])[:, 0].double()
    fused = torch.from_numpy(np.load(run / "maps" / f"{row['name']}.npy")).double()
    columns = torch.stack([fused.ravel(), *(-stages[1:]).flatten(1), torch.ones(fused.numel(), dtype=fused.dtype)], 1)
    coef = torch.linalg.lstsq(columns, stages[0].ravel()[:, None]).solution[:, 0]
    return stages, coef[1:-1]


def write(folder: Path, index: Path, maps: dict[str, torch.Tensor]) -> Path:
    (folder / "maps").mkdir(parents=True, exist_ok=True)
    shutil.copy(index, folder / "index.jsonl")
    for name, fused in maps.items():
        np.save(folder / "maps" / f"{name}.npy", minmax(fused[None])[0].float().numpy())
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--other", type=Path, help="a run of the same images whose stage 1 is mixed in")
    parser.add_argument("--images", type=Path, required=True, help="the --data.images of the runs")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "stage_mix")
    parser.add_argument("--num_steps", type=int, default=224)
    args = parser.parse_args()
    variants: dict[str, dict[str, torch.Tensor]] = {"recon": {}, "stage1": {}, "other_stage1": {}, "mix": {}}
    for line in (args.run / "index.jsonl").read_text().splitlines():
        row = json.loads(line)
        name = row["name"]
        stages, weights = stages_and_weights(args.run, row)
        print(name, "later-stage weights", [round(w, 3) for w in weights.tolist()])
        later = (weights[:, None, None] * stages[1:]).sum(0)
        variants["recon"][name], variants["stage1"][name] = stages[0] + later, stages[0]
        if args.other:
            other = stage_maps(args.other, name, 1)[0, 0].double()
            variants["other_stage1"][name], variants["mix"][name] = other, other + later
    folders = [write(args.out / v, args.run / "index.jsonl", maps) for v, maps in variants.items() if maps]
    subprocess.run([sys.executable, "-m", "hdm_lightning.evaluate", "--runs", *map(str, folders),
                    f"--data.images={args.images}", "--data.batch_size=4", "--metrics=[deletion,insertion,confidence]",
                    f"--deletion.num_steps={args.num_steps}", f"--insertion.num_steps={args.num_steps}",
                    f"--out_dir={args.out / 'eval'}"], check=True, cwd=ROOT)


if __name__ == "__main__":
    main()
