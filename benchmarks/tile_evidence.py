"""Where is a class's evidence in a mosaic? Its logit with only one tile kept, and with one removed.

For every mosaic target of ``benchmarks/multi_object.py``: the class's logit on the whole scene,
on each tile alone (the other three at the dataset mean colour, what a mask value of 0 shows) and
on the scene without that tile. Where another tile alone keeps the logit, a mask that must keep
the logit may keep that tile, and the share-in-tile score counts it as wrong.

``--score log_odds`` prints the class's log-odds instead (``f_c − logsumexp_{k≠c} f_k``), which
content that raises every class alike does not raise; the last column is the mean-colour image's.

Usage:
    python benchmarks/tile_evidence.py [--size 224] [--score log_odds]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mosaics import build_scenes, normalise, tile_masks  # noqa: E402


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--score", choices=["logit", "log_odds"], default="logit")
    args = parser.parse_args()
    from hdm_lightning.masks import class_score
    from hdm_lightning.models import EfficientNetLite0, freeze

    classifier = freeze(EfficientNetLite0())
    scenes, targets = build_scenes(classifier, classifier.class_names(), args.size)
    tiles = tile_masks(args.size).float()  # (4, H, W)
    print(f"| target | its tile | {args.score} in the scene | tile k alone, k = 0..3 | scene without tile k, "
          f"k = 0..3 | the mean-colour image |")
    print("|---|---|---|---|---|---|")
    for target in [t for t in targets if t.kind == "mosaic"]:
        image = normalise(scenes[target.scene], args.size)[None]  # zero = the mean colour
        rows = torch.cat([image, image * tiles[:, None], image * (1 - tiles[:, None]), torch.zeros_like(image)])
        scores = class_score(classifier(rows), torch.full((len(rows),), target.target), args.score)
        whole, alone, without, empty = scores[0], scores[1:5], scores[5:9], scores[9]
        print(f"| {target.id} ({target.class_name}) | {target.tiles[0]} | {whole:.2f} | "
              f"{' / '.join(f'{v:.2f}' for v in alone.tolist())} | {' / '.join(f'{v:.2f}' for v in without.tolist())} "
              f"| {empty:.2f} |")


if __name__ == "__main__":
    main()
