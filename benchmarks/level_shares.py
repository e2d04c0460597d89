"""Which level maps of a stage land in the class's tile? Stage 1 of HDM on the mosaics of
``benchmarks/multi_object.py``, each level map of each chain scored like the fused map.

Shows where a stage map's mass outside the class's tile comes from: under ``model.level_maps=all``
(the reference) the stage map sums every level of every chain, the coarse benchmark maps included;
under ``last`` only each chain's finest level, which carries its coarser levels as factors.

    python benchmarks/level_shares.py --size 224 --target mosaic_a_812 --target mosaic_b_832 \
        --set level_maps=last --set relative_eps=0.25

Prints, per target: each level's mask size, the share of its level map in the class's tile, its
mask's median and maximum, and the share of the stage map (about 30 s a target on 2 CPU cores).
"""

from __future__ import annotations

import argparse
from pathlib import Path
import sys

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mosaics import build_scenes, normalise, score  # noqa: E402

from hdm_lightning import explain  # noqa: E402
from hdm_lightning.models import EfficientNetLite0, freeze  # noqa: E402
from hdm_lightning.module import MaskExplainer  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=224, help="input side in pixels (tiles of size/2)")
    parser.add_argument("--target", action="append", default=[], help="target id (repeatable); default: all mosaic targets")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a model setting for explain(), e.g. level_maps=last (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args()


def setting(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        return key, float(value) if "." in value or "e" in value else int(value)
    except ValueError:
        return key, value


class LevelRecorder:
    """Wraps ``MaskExplainer.end_item`` to keep every level map as it enters the stage."""

    def __init__(self) -> None:
        self.levels: list[tuple[int, int, int, torch.Tensor, torch.Tensor]] = []
        self.original = MaskExplainer.end_item

    def __enter__(self) -> LevelRecorder:
        recorder = self

        def end_item(model, state, item, mask, superimposed, loss=None):
            recorder.original(model, state, item, mask, superimposed, loss)
            level_map = state.previous[item.chain][1]
            recorder.levels.append((item.chain, item.level, mask.shape[-1], mask.detach().clone(), level_map.clone()))

        MaskExplainer.end_item = end_item
        return self

    def __exit__(self, *exc) -> None:
        MaskExplainer.end_item = self.original


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    settings = dict(setting(s) for s in args.set)
    classifier = freeze(EfficientNetLite0())
    scenes, targets = build_scenes(classifier, classifier.class_names(), args.size)
    chosen = [t for t in targets if t.kind == "mosaic" and (not args.target or t.id in args.target)]
    print(f"stage 1, {args.size} px, settings {settings or 'defaults'}")
    for target in chosen:
        image = normalise(scenes[target.scene], args.size)[None]
        with LevelRecorder() as recorder:
            result = explain(classifier, image, [target.target], stages=1, **settings)
        print(f"\n{target.id} ({target.class_name}, rank {target.rank_in_scene} in the scene)")
        for chain, level, size, mask, level_map in recorder.levels:
            share = score(level_map, target.tiles)["share"]
            print(f"  chain {chain} level {level} size {size:2d}: share {share:.2f}, mask median "
                  f"{float(mask.median()):.3f} max {float(mask.max()):.3f}")
        print(f"  stage map: share {score(result['stage_maps'][0, 0], target.tiles)['share']:.2f}")


if __name__ == "__main__":
    main()
