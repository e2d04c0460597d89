"""Extremal perturbations: smooth masks, the area loss, the λ schedule and the optimised masks."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from hdm_lightning.baselines import ExtremalPerturbation
from hdm_lightning.baselines.extremal import (
    area_loss,
    blur,
    gaussian,
    grid_shape,
    reg_weight_at,
    smooth_mask,
)



def brute_force_max_conv(params: Tensor, stride: int, sigma: float, size: tuple[int, int]) -> Tensor:
    """``max_v g(u − v) m̄(v)`` over every grid point ``v`` at pixel ``v·stride``."""
    h, w = params.shape[1:]
    ys, xs = torch.arange(size[0]), torch.arange(size[1])
    gy = gaussian(ys[:, None] - stride * torch.arange(h)[None], sigma)  # (H, h)
    gx = gaussian(xs[:, None] - stride * torch.arange(w)[None], sigma)  # (W, w)
    weights = gy[:, None, :, None] * gx[None, :, None, :]  # (H, W, h, w)
    return (weights[None] * params[:, None, None]).flatten(3).amax(dim=3)  # (N, H, W)


@pytest.mark.parametrize(
    ("stride", "sigma", "size"), [(2, 3.0, (15, 12)), (4, 2.0, (16, 16)), (3, 5.0, (10, 20))]
)
def test_smooth_mask_is_the_2d_max_convolution(stride, sigma, size):
    params = torch.rand(2, *grid_shape(size, stride), generator=torch.Generator().manual_seed(0))
    expected = brute_force_max_conv(params, stride, sigma, size)
    assert torch.allclose(smooth_mask(params, stride, sigma, 0.0, size), expected, atol=1e-6)


def test_smooth_max_lies_below_the_max_and_tends_to_it():
    params = torch.rand(1, 6, 6, generator=torch.Generator().manual_seed(0))
    hard = smooth_mask(params, 3, 3.0, 0.0, (16, 16))
    assert (smooth_mask(params, 3, 3.0, 0.5, (16, 16)) <= hard + 1e-6).all()
    assert torch.allclose(smooth_mask(params, 3, 3.0, 1e-4, (16, 16)), hard, atol=1e-3)


def test_area_loss_is_zero_for_any_binary_mask_of_the_area():
    masks = torch.zeros(3, 8, 8)
    masks[0, :2] = 1.0  # 16 / 64 pixels in a band
    masks[1].view(-1)[torch.randperm(64, generator=torch.Generator().manual_seed(0))[:16]] = 1.0  # scattered
    masks[2] = 0.25  # right area on average, but not binary
    expected = torch.tensor([0.0, 0.0, (0.75**2 * 16 + 0.25**2 * 48) / 64])
    assert torch.equal(area_loss(masks, torch.full((3,), 0.25)), expected)


def test_reg_weight_grows_from_weight_over_growth_to_weight():
    weights = [reg_weight_at(s, 5, 300.0, 10.0) for s in range(5)]
    assert weights[0] == pytest.approx(30.0) and weights[-1] == pytest.approx(300.0)
    assert all(b / a == pytest.approx(10 ** 0.25) for a, b in zip(weights, weights[1:]))
    assert reg_weight_at(0, 1, 300.0, 10.0) == 300.0


def test_blur_keeps_the_mean_and_smooths():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    blurred = blur(images, 2.0)
    assert blurred.shape == images.shape
    assert torch.allclose(blurred.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=0.02)
    assert (blurred.std(dim=(2, 3)) < 0.5 * images.std(dim=(2, 3))).all()


SPOTS = ((6, 17), (18, 5))


def distance_to(spot: tuple[int, int], size: int = 24) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(float(size)), torch.arange(float(size)), indexing="ij")
    return ((ys - spot[0]) ** 2 + (xs - spot[1]) ** 2).sqrt()  # (H, W)


class SpotClassifier(nn.Module):
    """Logit ``k`` is the input's mean under a Gaussian spot of σ = 2 pixels at ``SPOTS[k]``."""

    def __init__(self) -> None:
        super().__init__()
        spots = torch.stack([torch.exp(-distance_to(s) ** 2 / 8) for s in SPOTS])  # (2, H, W)
        self.register_buffer("weight", spots / spots.sum(dim=(1, 2), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nchw,khw->nk", x, self.weight)


@pytest.mark.parametrize("areas", [(0.1,), (0.05, 0.1)])
def test_masks_keep_the_evidence_at_the_requested_area(areas):
    # One image, bright at both spots, explained for each class: the masks must part ways.
    dots = sum((distance_to(s) <= 2).float() for s in SPOTS)
    image = 1 + 2 * dots + 0.1 * torch.rand(3, 24, 24, generator=torch.Generator().manual_seed(0))
    method = ExtremalPerturbation(
        areas=areas, steps=40, lr=0.1, mask_stride=1, mask_sigma=2.0, blur_sigma=4.0
    )
    images = image.expand(2, 3, 24, 24)  # (2, C, H, W)
    masks = method.attribute(SpotClassifier().eval(), images, torch.tensor([0, 1]))  # (2, H, W): sum over areas
    assert masks.min() >= 0 and masks.max() <= len(areas) + 1e-6
    assert masks.mean(dim=(1, 2)).sub(sum(areas)).abs().max() < 0.3 * sum(areas)
    for mask, own, other in zip(masks, SPOTS, SPOTS[::-1]):
        assert mask[own] > 0.9 * len(areas) and mask[distance_to(own) <= 2].mean() > 0.7 * len(areas)
        assert mask[distance_to(other) <= 2].max() < 0.1
