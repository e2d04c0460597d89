"""Fuse a finished run's stage maps again under other fusion rules, without optimising anything.

Each rule writes a run folder beside the others (``maps/``, ``index.jsonl``; the stage maps are
the source run's), which ``hdm_lightning.evaluate`` scores like any run. Rules:

- ``evidence``: every stage at its evidence weight ``w_t`` (``EvidenceFusion(anchored=False)``, the
  default before stage 1 was anchored);
- ``anchored``: stage 1 at weight 1, each later stage at its ``w_t`` (``EvidenceFusion()``, the default);
- ``sum``: the reference's plain normalised sum; ``stage1``: stage 1 alone.

The evidence weights are scored here with the removals onto the mean colour (the masks' substrate
under ``--model.substrate mean``, and what the deletion AUC removes to): for a run on the mean
colour these are its own weights; for a run on the blur they are what the fusion would weigh if its
removals showed the mean colour instead. The logit score, whatever ``model.score`` the run kept; ``model.removal_threshold`` is read from the run's ``config.yaml``;
``--variant`` names the EfficientNet-Lite the run explained.

    python benchmarks/refuse.py runs/photos7_last/HDM_last --out runs/refuse/photos7 [--rules anchored sum]
    python benchmarks/refuse.py runs/photos7_lite2/HDM --variant lite2 --out runs/refuse/lite2
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mosaics import normalise  # noqa: E402

from hdm_lightning import masks as M  # noqa: E402
from hdm_lightning.data import load_image  # noqa: E402
from hdm_lightning.fusion import EvidenceFusion, SumFusion  # noqa: E402
from hdm_lightning.models import EfficientNetLite, freeze  # noqa: E402

RULES = {
    "evidence": EvidenceFusion(anchored=False),
    "anchored": EvidenceFusion(),
    "sum": SumFusion(),
    "stage1": lambda stages, score, reference, removal: M.minmax(stages[0]),
}


def stage_maps(run: Path, name: str, stages: int) -> torch.Tensor:
    """``(T, 1, H, W)`` stage maps of one image, at the size the run saved them."""
    maps = [torch.from_numpy(np.load(run / "stages" / f"{name}_stage{t + 1}.npy")).float() for t in range(stages)]
    return torch.stack(maps)[:, None]


@torch.no_grad()
def refuse(run: Path, out: Path, rules: list[str], classifier: torch.nn.Module) -> dict[str, Path]:
    """Writes ``out/<rule>`` for each rule; returns the folders."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    size = int(config["data"]["image_size"])
    removal = partial(M.removal, threshold=float(config.get("model", {}).get("removal_threshold", 1.0)))
    folders = {rule: out / rule for rule in rules}
    for folder in folders.values():
        (folder / "maps").mkdir(parents=True, exist_ok=True)
        shutil.copy(run / "index.jsonl", folder / "index.jsonl")
    for line in (run / "index.jsonl").read_text().splitlines():
        row = json.loads(line)
        image = normalise(load_image(row["image"]), size)[None]
        saved = stage_maps(run, row["name"], row["stages"])  # at the photo's size, as the run wrote them
        maps = F.interpolate(saved, size=(size, size), mode="bilinear", align_corners=False)  # as fused

        def score(kept: torch.Tensor) -> torch.Tensor:
            return classifier(M.apply_mask(image.expand(len(kept), -1, -1, -1), kept,
                                           torch.zeros_like(image)))[:, row["target"]]

        reference = score(torch.ones(1, size, size))
        for rule, folder in folders.items():
            fused = RULES[rule](maps, score, reference, removal)  # (1, size, size)
            fused = F.interpolate(fused[None], size=saved.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
            np.save(folder / "maps" / f"{row['name']}.npy", fused.numpy().astype(np.float32))
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run folder (config.yaml, index.jsonl, stages/)")
    parser.add_argument("--out", type=Path, required=True, help="folder for one run folder per rule")
    parser.add_argument("--rules", nargs="+", default=list(RULES), choices=list(RULES))
    parser.add_argument("--variant", default="lite0", help="the EfficientNet-Lite the run explained")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for rule, folder in refuse(args.run, args.out, args.rules, freeze(EfficientNetLite(args.variant))).items():
        print(f"{rule}: {folder}")


if __name__ == "__main__":
    main()
