"""Which substrate does ``model.substrate: auto`` choose for the benchmarks' images, and why?

For each image and class of the project's benchmarks (single photos at their size, the mosaic
targets of ``benchmarks/multi_object.py``): the class's logit on the image, on its blur (σ 10 px)
and on the mean colour, the share of the evidence ``f_c(x) − f_c(mean)`` that the blur keeps, and
the choice (``mean`` where the blur keeps more than ``blur_keeps``, default 0.5). Images go through
the same code as a run (``MaskExplainer.choose_substrate``), prepared as the benchmarks prepare
them (squashed to the square).

Usage:
    python benchmarks/substrate_choice.py [--sizes 96 224 448]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mosaics import build_scenes, normalise  # noqa: E402

PHOTOS = ["skimage:chelsea", "skimage:coffee", "skimage:astronaut", "skimage:rocket",
          "matplotlib:grace_hopper.jpg", "sklearn:china.jpg", "sklearn:flower.jpg"]


@torch.no_grad()
def row(model, name: str, image: torch.Tensor, target: int | None) -> str:
    logits = model.classifier(image[None]).float()[0]
    target = int(logits.argmax()) if target is None else target
    blurred = model.make_substrate(image[None], "blur")
    on = model.classifier(torch.cat([blurred, torch.zeros_like(blurred)])).float()[:, target]
    kept = float((on[0] - on[1]) / (logits[target] - on[1]))
    choice = model.choose_substrate(image, logits[target], torch.tensor([target]))
    return f"| {name} | {target} | {logits[target]:.2f} | {on[0]:.2f} | {on[1]:.2f} | {kept:.2f} | {choice} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 224, 448])
    args = parser.parse_args()
    from hdm_lightning.data import load_image
    from hdm_lightning.module import MaskExplainer

    model = MaskExplainer()  # the defaults: substrate auto, EfficientNet-Lite0
    for size in args.sizes:
        print(f"\n{size} px\n\n| image | class | f_c(x) | f_c(blur) | f_c(mean) | share the blur keeps | choice |")
        print("|---|---|---|---|---|---|---|")
        for photo in PHOTOS:
            print(row(model, photo, normalise(load_image(photo), size), None))
        scenes, targets = build_scenes(model.classifier, model.class_names, size)
        for target in targets:
            image = normalise(scenes[target.scene], size)
            print(row(model, f"{target.id} ({target.class_name})", image, target.target))


if __name__ == "__main__":
    main()
