"""RISE: mask generation, the saliency formula, and determinism."""

from __future__ import annotations

import torch
from torch import nn

from hdm_lightning.baselines import RISE
from hdm_lightning.baselines.rise import render_masks, rise_grids



def classifier() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3)
    )
    return net.eval().requires_grad_(False)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 3, 12, 10, generator=torch.Generator().manual_seed(1)), torch.tensor([2, 0])


def test_cells_are_kept_with_probability_p1():
    grids, offsets = rise_grids(2000, 5, 0.3, torch.Generator().manual_seed(0))
    assert set(grids.unique().tolist()) == {0.0, 1.0}
    assert abs(grids.mean().item() - 0.3) < 0.01
    assert offsets.min() >= 0 and offsets.max() < 1


def test_offset_shifts_the_crop():
    grids, _ = rise_grids(3, 4, 0.5, torch.Generator().manual_seed(0))
    still = render_masks(grids, torch.zeros(3, 2), (8, 8))
    shifted = render_masks(grids, torch.tensor([[0.5, 0.0]] * 3), (8, 8))  # half of a 2-pixel cell
    assert torch.equal(shifted[:, :-1], still[:, 1:])


def test_saliency_is_the_probability_weighted_mean_of_masks():
    net, (images, targets) = classifier(), data()
    rise = RISE(n_masks=40, grid_size=3, p1=0.4, batch_size=16, seed=5)
    saliency = rise.attribute(net, images, targets)
    masks = render_masks(*rise_grids(40, 3, 0.4, torch.Generator().manual_seed(5)), (12, 10))  # (40, H, W)
    for i, target in enumerate(targets.tolist()):
        probs = net(images[i] * masks[:, None]).softmax(dim=1)[:, target]  # (40,)
        expected = (probs[:, None, None] * masks).sum(dim=0) / (40 * 0.4)
        assert torch.allclose(saliency[i], expected, atol=1e-5)


def test_same_seed_same_maps_whatever_the_batch_size():
    net, (images, targets) = classifier(), data()
    first = RISE(n_masks=60, grid_size=3, batch_size=7, seed=3).explain(net, images, targets)
    again = RISE(n_masks=60, grid_size=3, batch_size=60, seed=3).explain(net, images, targets)
    other = RISE(n_masks=60, grid_size=3, batch_size=7, seed=4).explain(net, images, targets)
    assert torch.allclose(first, again, atol=1e-6)
    assert not torch.allclose(first, other, atol=1e-3)
