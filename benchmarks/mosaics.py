"""Scenes and scores of ``benchmarks/multi_object.py``: 2×2 mosaics of package-shipped photos.

A scene is four tiles in raster order (top-left, top-right, bottom-left, bottom-right); a tile is a
photo resized (aspect not kept, as the CLI does for a single photo) to half the input side, or its
mirror image (``"chelsea/mirrored"``). Each target is a class with the tiles that hold it:

- in a *mosaic* of four photos, every tile is a target, its class being the one the classifier
  gives that tile alone (so not always the mosaic's top-1 class);
- in a *two-instance* scene, one class appears in two tiles, and the target is that class.

Scores (maps are clamped at 0 first, so the mass is the positive mass):

- ``share``: the map's mass inside the target's tiles over its total mass, the energy-based grid
  pointing game of Rao, Boehle and Schiele (CVPR 2022); chance 0.25 for one tile;
- ``pointing``: 1 when the map's maximum (first in raster order on ties) is inside them;
- ``both_covered`` (two instances only): every instance's tile holds at least one of the map's
  top 5 % pixels and at least 0.15 of its positive mass (:data:`COVER_RULE`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from hdm_lightning.data import IMAGENET_MEAN, IMAGENET_STD, load_image
from hdm_lightning.metrics.functional import energy_pointing, pointing_hits, top_percent_masks

#: Photos shipped with scikit-image, matplotlib and scikit-learn (see ``hdm_lightning.data.load_image``).
PHOTOS = {
    "chelsea": "skimage:chelsea",
    "coffee": "skimage:coffee",
    "grace_hopper": "matplotlib:grace_hopper.jpg",
    "rocket": "skimage:rocket",
    "camera": "skimage:camera",
    "china": "sklearn:china.jpg",
    "clock": "skimage:clock",
    "coins": "skimage:coins",
}
#: Tiles in raster order. Chosen among the shipped photos that EfficientNet-Lite0 classifies with
#: the highest confidence on their own at 112 and 224 px (``--check-photos`` prints them).
MOSAICS = {
    "mosaic_a": ("chelsea", "coffee", "grace_hopper", "rocket"),
    "mosaic_b": ("camera", "china", "clock", "coins"),
}
#: Two instances of one class on a diagonal; the target is the class of the first instance alone.
TWO_INSTANCES = {"two_cats": ("chelsea", "china", "camera", "chelsea/mirrored")}
TOP_PERCENT = 5.0
MIN_INSTANCE_SHARE = 0.15
COVER_RULE = (f"both covered: each instance's tile holds at least one of the map's top {TOP_PERCENT:g} % "
              f"pixels and at least {MIN_INSTANCE_SHARE:g} of its positive mass")


@dataclass(frozen=True)
class Target:
    """One explained class in one scene, with what the classifier says about it."""

    id: str  # "<scene>_<class>": file names of its map and scores
    scene: str
    kind: str  # "mosaic" or "two_instances"
    target: int
    class_name: str
    tiles: tuple[int, ...]  # raster indices of the tiles holding the class
    photos: tuple[str, ...]  # tile specs of those tiles
    prob_alone: float  # softmax probability of the class on (the first of) its tile(s) alone
    logit_alone: float
    logit_in_scene: float
    rank_in_scene: int  # 1 = the scene's top-1 class

    def as_dict(self) -> dict:
        return asdict(self)


def normalise(image: Image.Image, size: int) -> Tensor:
    """``(3, size, size)`` classifier input: RGB in [0, 1] (antialiased bilinear resize to ``size``, a
    no-op for the scenes and tiles here, which are made at that size), then ImageNet mean/std."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    if pixels.shape[-2:] != (size, size):
        pixels = F.interpolate(pixels[None], size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False)[0]
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    return (pixels - mean[:, None, None]) / std[:, None, None]


def tile_pixels(spec: str, side: int) -> np.ndarray:
    """``(side, side, 3)`` uint8 tile of a spec ``"photo"`` or ``"photo/mirrored"``."""
    name, _, modifier = spec.partition("/")
    if name not in PHOTOS or modifier not in ("", "mirrored"):
        raise ValueError(f"tile {spec!r}: expected one of {sorted(PHOTOS)}, optionally with '/mirrored'")
    pixels = np.asarray(load_image(PHOTOS[name]), dtype=np.float32) / 255.0
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # (1, 3, h, w)
    resized = F.interpolate(tensor, size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0]
    tile = (resized.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    return tile[:, ::-1].copy() if modifier == "mirrored" else tile


def compose(tiles: list[np.ndarray]) -> Image.Image:
    """2×2 mosaic of four equal square tiles in raster order."""
    return Image.fromarray(np.vstack([np.hstack(tiles[:2]), np.hstack(tiles[2:])]))


def tile_masks(size: int) -> Tensor:
    """``(4, size, size)`` bool masks of the tiles in raster order."""
    half = size // 2
    masks = torch.zeros(4, size, size, dtype=torch.bool)
    for i in range(4):
        row, col = divmod(i, 2)
        masks[i, row * half:(row + 1) * half, col * half:(col + 1) * half] = True
    return masks


@torch.no_grad()
def logits_of(classifier: torch.nn.Module, images: list[Image.Image], size: int) -> Tensor:
    return classifier(torch.stack([normalise(image, size) for image in images]))  # (N, K)


def rank_of(logits: Tensor, target: int) -> int:
    """1-based rank of ``target`` in a ``(K,)`` logit vector (1 = top-1)."""
    return int((logits > logits[target]).sum()) + 1


def build_scenes(classifier: torch.nn.Module, names: list[str], size: int) -> tuple[dict, list[Target]]:
    """The scenes (``name -> PIL image``) at input side ``size`` and their targets.

    Raises ``ValueError`` when the tiles of a mosaic do not give four distinct classes, or when
    the two instances of a two-instance scene are not given the same class alone, or another
    tile of that scene has it: the scores would then be ambiguous.
    """
    if size % 2:
        raise ValueError(f"size={size} is invalid: expected an even input side (two tiles)")
    side = size // 2
    scenes, targets = {}, []
    for scene, specs in {**MOSAICS, **TWO_INSTANCES}.items():
        tiles = [tile_pixels(spec, side) for spec in specs]
        scenes[scene] = compose(tiles)
        alone = logits_of(classifier, [Image.fromarray(t) for t in tiles], side)  # (4, K)
        classes = alone.argmax(dim=1).tolist()
        probs = alone.softmax(dim=1)
        in_scene = logits_of(classifier, [scenes[scene]], size)[0]  # (K,)

        def target(tile_ids: tuple[int, ...], kind: str, scene=scene, specs=specs, classes=classes,
                   probs=probs, alone=alone, in_scene=in_scene) -> Target:
            c = classes[tile_ids[0]]
            return Target(f"{scene}_{c}", scene, kind, c, names[c], tile_ids, tuple(specs[i] for i in tile_ids),
                          round(float(probs[tile_ids[0], c]), 4), round(float(alone[tile_ids[0], c]), 3),
                          round(float(in_scene[c]), 3), rank_of(in_scene, c))

        if scene in MOSAICS:
            if len(set(classes)) != 4:
                raise ValueError(f"{scene}: tiles {specs} get classes {[names[c] for c in classes]} alone at "
                                 f"{side} px; a mosaic needs four distinct classes")
            targets += [target((i,), "mosaic") for i in range(4)]
            continue
        pair = tuple(i for i, spec in enumerate(specs) if spec.split("/")[0] == specs[0].split("/")[0])
        holders = [i for i, c in enumerate(classes) if c == classes[pair[0]]]
        if len(pair) != 2 or tuple(holders) != pair:
            raise ValueError(f"{scene}: tiles {specs} get classes {[names[c] for c in classes]} alone at {side} px; "
                             "the two instances need the same class and the other tiles other classes")
        targets.append(target(pair, "two_instances"))
    return scenes, targets


def score(saliency: Tensor, tiles: tuple[int, ...]) -> dict:
    """Scores of one ``(H, W)`` map for a target held by ``tiles``; see the module docstring."""
    maps = saliency.float().clamp_min(0)[None]  # (1, H, W)
    masks = tile_masks(maps.shape[-1])[list(tiles)]  # (T, H, W)
    shares = [float(energy_pointing(maps, m[None])[0]) for m in masks]
    union = masks.any(dim=0)[None]
    result = {
        "share": float(energy_pointing(maps, union)[0]),
        "pointing": int(pointing_hits(maps, union, tolerance=1.0)[0]),  # tolerance 1: the point itself
        "instance_shares": shares,
    }
    if len(tiles) > 1:
        top = top_percent_masks(maps, torch.tensor([TOP_PERCENT]))[0, 0].view(maps.shape[-2:])  # (H, W)
        covered = [bool((top & m).any()) and s >= MIN_INSTANCE_SHARE for m, s in zip(masks, shares)]
        result["both_covered"] = int(all(covered))
    return result
