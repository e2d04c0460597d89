"""``data.resize``: maps come back at the original resolution, on the original pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hdm_lightning.data import ExplanationDataModule
from hdm_lightning.geometry import frame, map_to_model, map_to_original

HEIGHT, WIDTH = 60, 100
ROWS, COLS = slice(10, 25), slice(70, 90)  # the marked region of the original picture


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.fixture
def marked(tmp_path):
    """A non-square grey picture, black but for the region, and its region mask."""
    pixels = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    pixels[ROWS, COLS] = 255
    Image.fromarray(pixels).save(tmp_path / "marked.png")
    region = np.zeros((HEIGHT, WIDTH), dtype=bool)
    region[ROWS, COLS] = True
    return tmp_path, region


@pytest.mark.parametrize("resize", ["squash", "pad"])
def test_a_map_on_the_region_the_model_sees_returns_onto_the_original_region(marked, resize):
    folder, region = marked
    data = ExplanationDataModule(str(folder), image_size=64, mean=(0.0,), std=(1.0,), resize=resize)
    data.setup()
    batch = data.batch([0])
    seen = batch["images"][0, 0]  # (64, 64), what the classifier gets
    saliency = (seen > 0.5).float()  # a perfect map in the classifier's frame
    back = data.map_to_original(saliency, HEIGHT, WIDTH)
    assert back.shape == (HEIGHT, WIDTH) and back.dtype == torch.float32
    assert iou(back.numpy() > 0.5, region) > 0.85
    placement = batch["frames"][0]
    if resize == "pad":  # 60 x 100 scaled by 0.64: 38 x 64, centred; the padding is the mean (0)
        assert (placement.top, placement.inner_height, placement.inner_width) == (13, 38, 64)
        assert seen[:13].abs().max() == 0 and seen[13 + 38:].abs().max() == 0
        squashed_inverse = map_to_original(saliency, frame(HEIGHT, WIDTH, 64, "squash"))
        assert iou(squashed_inverse.numpy() > 0.5, region) < 0.6  # the wrong inverse misses the region


def test_map_to_model_places_an_original_map_where_the_picture_lies(marked):
    _, region = marked
    placement = frame(HEIGHT, WIDTH, 64, "pad")
    in_model = map_to_model(torch.from_numpy(region.astype(np.float32)), placement)  # (64, 64)
    again = map_to_original(in_model, placement)
    assert iou(again.numpy() > 0.5, region) > 0.85
    assert in_model[:placement.top].max() == 0


def test_low_resolution_stage_maps_are_mapped_like_full_ones(marked):
    folder, region = marked
    placement = frame(HEIGHT, WIDTH, 64, "pad")
    full = map_to_model(torch.from_numpy(region.astype(np.float32)), placement)
    coarse = torch.nn.functional.avg_pool2d(full[None, None], 2)[0, 0]  # (32, 32) map of the same square
    assert iou(map_to_original(coarse, placement).numpy() > 0.5, region) > 0.8
