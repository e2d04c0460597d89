"""Pointing games against TorchRay's per-image loop and hand-made cases."""

import numpy as np
import pytest
import torch

from hdm_lightning.metrics import EnergyPointingGame, PointingGame
from hdm_lightning.metrics.functional import map_points, pointing_hits


def torchray_evaluate(mask, point, tolerance):
    """TorchRay's ``PointingGame.evaluate``; the point is (u, v) = (column, row)."""
    v, u = torch.meshgrid(
        (torch.arange(mask.shape[0], dtype=torch.float32) - point[1]) ** 2,
        (torch.arange(mask.shape[1], dtype=torch.float32) - point[0]) ** 2,
        indexing="ij",
    )
    accept = (v + u) < tolerance**2
    return +1 if (mask & accept).view(-1).any() else -1


def random_boxes(generator, count, size):
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    corners = torch.randint(0, size - 4, (count, 2), generator=generator)
    sides = torch.randint(1, 8, (count, 2), generator=generator)
    for mask, (y, x), (h, w) in zip(masks, corners.tolist(), sides.tolist()):
        mask[y : y + h, x : x + w] = True
    return masks


def test_matches_torchray_protocol():
    generator = torch.Generator().manual_seed(0)
    num_images, size, num_classes = 60, 48, 4
    maps = torch.rand(num_images, size, size, generator=generator)
    masks = random_boxes(generator, num_images, size)
    masks[::7] = False  # empty ground truth: skipped
    # class 3 never occurs: the mean runs over the classes seen
    targets = torch.randint(0, num_classes - 1, (num_images,), generator=generator)

    hits, misses = np.zeros(num_classes), np.zeros(num_classes)
    for saliency, mask, target in zip(maps, masks, targets.tolist()):
        if not mask.any():
            continue
        row, col = np.unravel_index(np.argmax(saliency.numpy()), saliency.shape)
        if torchray_evaluate(mask, (col, row), 15) == 1:
            hits[target] += 1
        else:
            misses[target] += 1
    seen = hits + misses > 0
    expected = np.mean(hits[seen] / (hits + misses)[seen])
    assert 0 < expected < 1

    metric = PointingGame(num_classes=num_classes)
    metric.update(maps[:25], masks[:25], targets[:25])
    metric.update(maps[25:], masks[25:], targets[25:])
    assert metric.compute().item() == pytest.approx(expected)
    assert int((metric.hits + metric.misses).sum()) == int(masks.flatten(1).any(1).sum())


def test_tolerance_is_a_strict_disk():
    maps = torch.zeros(1, 40, 40)
    maps[0, 20, 20] = 1
    for offset, expected in [((9, 12), False), ((9, 11), True), ((15, 0), False), ((0, 14), True)]:
        masks = torch.zeros(1, 40, 40, dtype=torch.bool)
        masks[0, 20 + offset[0], 20 + offset[1]] = True  # distances 15, 14.2, 15, 14
        assert pointing_hits(maps, masks, 15).item() is expected


def test_point_is_the_first_maximum():
    maps = torch.tensor([[[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]])
    assert map_points(maps).tolist() == [[0, 1]]


def test_empty_masks_are_skipped_not_hits():
    metric = PointingGame(num_classes=2, tolerance=1)
    maps = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(2, 6, 6, dtype=torch.bool)
    masks[0] = maps[0] < maps[0].max()  # everything but the point: a miss at tolerance 1
    metric.update(maps, masks, torch.tensor([0, 1]))
    assert metric.hits.tolist() == [0, 0] and metric.misses.tolist() == [1, 0]
    assert metric.compute().item() == 0.0


def test_energy_pointing_matches_a_loop():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(10, 16, 16, generator=generator)
    maps[3] = 0  # an all-zero map scores 0
    masks = random_boxes(generator, 10, 16)
    masks[5] = False  # skipped
    proportions = [
        float(m[g].sum() / m.sum()) if m.sum() > 0 else 0.0
        for m, g in zip(maps.numpy(), masks.numpy())
        if g.any()
    ]
    metric = EnergyPointingGame()
    metric.update(maps[:4], masks[:4])
    metric.update(maps[4:], masks[4:])
    assert metric.compute().item() == pytest.approx(np.mean(proportions), rel=1e-5)
    assert int(metric.total) == 9


@pytest.mark.parametrize(
    ("options", "name"),
    [({"num_classes": 0}, "num_classes"), ({"num_classes": 2, "tolerance": 0}, "tolerance")],
)
def test_bad_settings_fail_by_name(options, name):
    with pytest.raises(ValueError, match=name):
        PointingGame(**options)
