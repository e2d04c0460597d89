"""A quick probe of a setting on stage 1 alone: mosaic tiles and photos, a minute a setting.

Stage 1 decides most of the fused map, and alone it takes a fifth of a full run's time, so a setting
can be screened here before the full benchmarks (``multi_object.py``, ``photos_faithfulness.py``).
For each setting (``NAME=key=value,key=value``, :func:`hdm_lightning.explain` overrides; ``NAME=``
for the defaults), with the packaged EfficientNet-Lite0 at 224 px and ``stages=1``:

- ``--targets``: mosaic targets of ``multi_object.py`` (ids such as ``mosaic_a_285``): the map's share
  in the class's tile, the median of the map over each other tile (the haze) and every tile's share;
- ``--photos``: package photos squashed to 224 px, each for its top-1 class: deletion and insertion
  AUC (``--num_steps`` points; the figures are for comparing settings, not the README's protocol);
  with ``--floor F`` also of the maps set to 0 below ``F`` of their maximum (does the faint part
  of a map, its haze, order the pixels that deletion removes?); with ``--alone`` also each photo
  explained alone, and its map's correlation with the same photo's in the batch (about six minutes a
  setting for four photos: a screen of what ``stability.py``'s batch 1 against 4 measures on three stages).

Usage:
    python benchmarks/stage1_probe.py --set defaults= \\
        --set "del log-odds=deletion_weight=2,deletion_substrate=mean,deletion_score=log_odds" \\
        --targets mosaic_a_285 mosaic_a_457 --photos chelsea coffee astronaut rocket
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import torch
import yaml

from hdm_lightning import explain
from hdm_lightning.data import load_image
from hdm_lightning.metrics.functional import curve_auc, deletion_curve, insertion_curve

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mosaics import build_scenes, normalise, tile_masks  # noqa: E402
from photos_faithfulness import PHOTOS as PHOTO_SPECS  # noqa: E402
from stability import correlation  # noqa: E402

PHOTOS = {spec.split(":")[1].split(".")[0]: spec for spec in PHOTO_SPECS}  # chelsea -> skimage:chelsea
BLUR = {"kernel_size": 11, "sigma": 5.0}  # the insertion curve's blurred start, as in benchmarks/stability.py


def parse_setting(text: str) -> tuple[str, dict]:
    """``"NAME=k=v,k=v"`` -> (NAME, {k: v}) with YAML values (numbers, strings, lists such as
    ``start_range=[0.2,0.8]``: commas inside brackets do not split)."""
    name, _, pairs = text.partition("=")
    overrides = {}
    for pair in filter(None, re.split(r",(?![^\[]*\])", pairs)):
        key, _, value = pair.partition("=")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def tile_scores(classifier, overrides: dict, scenes: dict, targets: list, size: int = 224) -> list[str]:
    """Share in the class's tile and the other tiles' medians of each target's stage-1 map."""
    tiles = tile_masks(size).float()
    lines = []
    for target in targets:
        image = normalise(scenes[target.scene], size)[None]
        saliency = explain(classifier, image, targets=[target.target], stages=1, **overrides)["maps"][0]
        own = target.tiles[0]
        share = float((saliency * tiles[own]).sum() / saliency.sum())
        haze = " ".join(f"{float(saliency[tiles[j] > 0].median()):.3f}" for j in range(4) if j != own)
        shares = " ".join(f"{float((saliency * tiles[j]).sum() / saliency.sum()):.3f}" for j in range(4))
        lines.append(f"{target.id} ({target.class_name}): share {share:.3f}, other tiles' medians {haze}, "
                     f"every tile's share (raster order) {shares}")
    return lines


def photo_scores(classifier, overrides: dict, names: list[str], num_steps: int, floor: float | None,
                 alone: bool = False, size: int = 224) -> list[str]:
    """Mean deletion and insertion AUC of the photos' stage-1 maps, and each photo's (also with the
    maps' values below ``floor`` of their maximum set to 0); with ``alone``, each photo also explained
    by itself, and the correlation of that map with the photo's map from the batch."""
    images = torch.stack([normalise(load_image(PHOTOS[n]), size) for n in names])
    with torch.no_grad():
        targets = classifier(images).argmax(1)
    maps = explain(classifier, images, targets=targets, stages=1, **overrides)["maps"]
    versions = {"maps": maps}
    if floor is not None:
        top = maps.flatten(1).amax(1)[:, None, None]
        versions[f"maps below {floor} of the maximum at 0"] = torch.where(maps < floor * top, 0.0, maps)
    lines = []
    for label, saliency in versions.items():
        with torch.no_grad():
            deletion = curve_auc(deletion_curve(classifier, images, saliency, targets, num_steps,
                                                batch_size=num_steps + 1))
            insertion = curve_auc(insertion_curve(classifier, images, saliency, targets, num_steps,
                                                  batch_size=num_steps + 1, **BLUR))
        each = " ".join(f"{n} {d:.3f}/{i:.3f}" for n, d, i in zip(names, deletion.tolist(), insertion.tolist()))
        lines.append(f"{label}: deletion {deletion.mean():.4f}, insertion {insertion.mean():.4f} ({each})")
    if alone:
        single = [explain(classifier, images[i:i + 1], targets=targets[i:i + 1], stages=1, **overrides)["maps"][0]
                  for i in range(len(names))]
        each = [correlation(a.numpy(), b.numpy()) for a, b in zip(single, maps)]
        lines.append(f"alone against the batch of {len(names)}: worst {min(each):.3f} ("
                     + " ".join(f"{n} {c:.3f}" for n, c in zip(names, each)) + ")")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="NAME=k=v,...", dest="settings")
    parser.add_argument("--targets", nargs="*", default=[], help="mosaic target ids of multi_object.py")
    parser.add_argument("--photos", nargs="*", default=[], choices=sorted(PHOTOS))
    parser.add_argument("--num_steps", type=int, default=56, help="points of the deletion/insertion curves")
    parser.add_argument("--floor", type=float, default=None, help="also score the maps zeroed below this share")
    parser.add_argument("--alone", action="store_true", help="also explain each photo alone: map correlation")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=224, help="input side of the mosaics (px); photos stay at 224")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from hdm_lightning.models import EfficientNetLite0, freeze

    classifier = freeze(EfficientNetLite0())
    scenes, targets = build_scenes(classifier, classifier.class_names(), args.size) if args.targets else ({}, [])
    if unknown := sorted(set(args.targets) - {t.id for t in targets}):  # before the first, long, run
        parser.error(f"--targets {unknown}: no such target at {args.size} px; known: {[t.id for t in targets]}")
    targets = [t for t in targets if t.id in args.targets]
    for name, overrides in map(parse_setting, args.settings or ["defaults="]):
        start = time.perf_counter()
        lines = tile_scores(classifier, overrides, scenes, targets, args.size) if targets else []
        if args.photos:
            lines += photo_scores(classifier, overrides, args.photos, args.num_steps, args.floor, args.alone)
        print(f"## {name} {overrides} ({time.perf_counter() - start:.0f} s)", *lines, sep="\n  ", flush=True)


if __name__ == "__main__":
    main()
