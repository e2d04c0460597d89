"""How much of the class's evidence does removing what HDM found take away? Read from a run folder.

For each image of a finished run (EfficientNet-Lite0 runs, as ``photos_faithfulness.py`` makes), the
share of the class's evidence ``(f_c(x ⊙ (1 − C_t)) − f_c(x_0)) / (f_c(x) − f_c(x_0))`` left once the
cumulative map of stages 1…t is removed (``x_0`` the mean-colour image, removal as the evidence
fusion scores it, with the run's ``model.removal_threshold``), the fusion weights ``w_t`` that follow from it, and the class's probability on
that image. A share near 1 means the removal leaves the evidence in place, and the weights are
differences of a few hundredths.

    python benchmarks/removal_evidence.py runs/photos7/HDM
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys

import torch
import yaml
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mosaics import normalise  # noqa: E402
from refuse import require_mean_substrate, stage_maps as saved_stage_maps  # noqa: E402

from hdm_lightning import masks as M  # noqa: E402
from hdm_lightning.data import load_image  # noqa: E402
from hdm_lightning.models import EfficientNetLite0, freeze  # noqa: E402


def stage_maps(run: Path, name: str, stages: int, size: int) -> torch.Tensor:
    """``(T, 1, size, size)`` stage maps of one image, resized to the classifier input."""
    return F.interpolate(saved_stage_maps(run, name, stages), size=(size, size), mode="bilinear", align_corners=False)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a finished run folder (index.jsonl, stages/)")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    torch.set_num_threads(1)
    classifier = freeze(EfficientNetLite0())
    config = yaml.safe_load((args.run / "config.yaml").read_text())
    require_mean_substrate(config, args.run)
    threshold = float(config.get("model", {}).get("removal_threshold", 1.0))
    print(f"{args.run}: removal threshold {threshold}\n")
    print("| image | evidence f_c(x) − f_c(x_0) | share left after stage 1 / 2 / 3 | weights w_t | p_c left |")
    print("|---|---|---|---|---|")
    for line in (args.run / "index.jsonl").read_text().splitlines():
        row = json.loads(line)
        image = normalise(load_image(row["image"]), args.size)[None]
        maps = stage_maps(args.run, row["name"], row["stages"], args.size)

        def logits(kept: torch.Tensor) -> torch.Tensor:
            return classifier(M.apply_mask(image, kept, torch.zeros_like(image)))[0]

        full, floor = logits(torch.ones_like(maps[0])), logits(torch.zeros_like(maps[0]))
        evidence = float(full[row["target"]] - floor[row["target"]])
        removed = [logits(1 - M.removal(M.cumulative(maps[: t + 1]), threshold)) for t in range(len(maps))]
        left = [float(r[row["target"]] - floor[row["target"]]) / evidence for r in removed]
        weights = [min(max(a - b, 0.0), 1.0) for a, b in zip([1.0] + left, left)]
        probability = [float(r.softmax(0)[row["target"]]) for r in removed]
        print(f"| {row['name']} | {evidence:.2f} | {' / '.join(f'{v:.2f}' for v in left)} | "
              f"{' / '.join(f'{w:.2f}' for w in weights)} | {' / '.join(f'{p:.2f}' for p in probability)} |")


if __name__ == "__main__":
    main()
