"""Extremal perturbations (Fong, Patrick and Vedaldi, ICCV 2019), "preserve" variant.

Implemented here from the paper. For an area ``a`` the extremal mask keeps the fraction ``a`` of
the image that best preserves the target score, the rest being blurred:

    Φ(x; m) = m ⊙ x + (1 − m) ⊙ blur(x)
    m_a = argmax_m  f_c(Φ(x; m)) − λ · R_a(m),    R_a(m) = mean((vecsort(m) − r_a)²)

where ``r_a`` holds ``(1 − a)·HW`` zeros then ``a·HW`` ones, so ``R_a = 0`` exactly when the mask
is binary with area ``a``, whatever its shape. ``f_c`` is the target logit. Masks are smooth by
construction: ``m = smax_v g(u − v) m̄(v)``, a max-convolution of a coarse parameter grid
``m̄ ∈ [0, 1]`` (stride ``mask_stride``) with a Gaussian ``g`` of peak 1. Like the paper, we let
``λ`` grow during the optimisation (here exponentially), so that the score first decides where
the mask goes and the area constraint is then enforced. The blur uses one ``σ`` (the paper
blends a pyramid of blurs by mask value; one level is our simplification).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hdm_lightning.baselines.base import Baseline, require


def gaussian(offsets: Tensor, sigma: float) -> Tensor:
    """``exp(−d² / 2σ²)`` of signed pixel offsets ``d`` (peak 1, not normalised)."""
    return torch.exp(-offsets.float() ** 2 / (2 * sigma**2))


def blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``(N, C, H, W)`` images (replicated borders), same shape.

    Example:
        >>> blur(torch.ones(1, 2, 5, 5), 3.0).allclose(torch.ones(1, 2, 5, 5))
        True
    """
    radius = math.ceil(3 * sigma)
    kernel = gaussian(torch.arange(-radius, radius + 1, device=images.device), sigma)
    kernel = (kernel / kernel.sum()).to(images.dtype)  # (K,)
    n, c, h, w = images.shape
    x = images.reshape(n * c, 1, h, w)  # (N·C, 1, H, W)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return x.reshape(n, c, h, w)


def grid_shape(size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Parameter grid ``(h, w)`` whose points, ``stride`` pixels apart from pixel 0, reach ``H − 1``.

    Example:
        >>> grid_shape((9, 10), 4)
        (3, 4)
    """
    return math.ceil((size[0] - 1) / stride) + 1, math.ceil((size[1] - 1) / stride) + 1


def smax(values: Tensor, temperature: float) -> Tensor:
    """Smooth max over the last dim: ``Σ z softmax(z / T)``; ``T = 0`` gives the plain max."""
    if temperature == 0:
        return values.amax(dim=-1)
    return (values * torch.softmax(values / temperature, dim=-1)).sum(dim=-1)


def max_conv1d(values: Tensor, stride: int, sigma: float, smoothness: float) -> Tensor:
    """``smax_v g(u − v) m̄(v)`` along the last dim: ``(..., n)`` grid -> ``(..., n·stride)`` pixels.

    Grid point ``v`` sits at pixel ``v·stride``; each pixel looks at the points within ``3σ``.
    """
    r = math.ceil(3 * sigma / stride) + 1  # grid radius of the window
    window = F.pad(values, (r, r)).unfold(-1, 2 * r + 1, 1)  # (..., n, k)
    pixels = torch.arange(stride, device=values.device)[:, None]  # (stride, 1): offset in the cell
    points = stride * torch.arange(-r, r + 1, device=values.device)  # (k,): grid displacements
    z = window[..., None, :] * gaussian(pixels - points, sigma)  # (..., n, stride, k)
    return smax(z, smoothness).flatten(-2)  # (..., n·stride)


def smooth_mask(
    params: Tensor, stride: int, sigma: float, smoothness: float, size: tuple[int, int]
) -> Tensor:
    """Smooth max-convolution ``m(u) = smax_v g(u − v) m̄(v)`` of ``(N, h, w)`` grids -> ``(N, H, W)``.

    Grid point ``v = (i, j)`` sits at pixel ``(i·stride, j·stride)``; ``g`` is a Gaussian of
    standard deviation ``sigma`` pixels and peak 1, so ``m ∈ [0, 1]`` when ``m̄`` is. As ``g`` is
    a product of 1-D Gaussians and ``m̄ ≥ 0``, the max over the plane is a max over columns of a
    max over rows, so two 1-D passes compute it exactly at a fraction of the cost. With
    ``smoothness`` ``T > 0`` the softmax-weighted smooth max replaces the max in each pass (a
    separable variant of the paper's 2-D smooth max).

    Example:
        >>> params = torch.zeros(1, 3, 3)
        >>> params[0, 1, 1] = 1.0  # one grid point, at pixel (4, 4)
        >>> m = smooth_mask(params, stride=4, sigma=2.0, smoothness=0.0, size=(9, 9))
        >>> m.shape, m[0, 4, 4].item(), round(m[0, 4, 6].item(), 4), m[0, 0, 0].item() < 0.02
        (torch.Size([1, 9, 9]), 1.0, 0.6065, True)
    """
    rows = max_conv1d(params, stride, sigma, smoothness)  # (N, h, w·stride)
    cols = max_conv1d(rows.transpose(1, 2), stride, sigma, smoothness)  # (N, w·stride, h·stride)
    m = cols.transpose(1, 2)  # (N, h·stride, w·stride)
    return m[:, : size[0], : size[1]]  # (N, H, W)


def area_loss(masks: Tensor, areas: Tensor) -> Tensor:
    """``R_a(m) = mean((vecsort(m) − r_a)²)`` of ``(N, H, W)`` masks and ``(N,)`` areas -> ``(N,)``.

    Example:
        >>> masks = torch.tensor([[[0., 1.], [0., 0.]], [[1., 1.], [0., 0.]]])
        >>> area_loss(masks, torch.tensor([0.25, 0.25]))
        tensor([0.0000, 0.2500])
    """
    values = masks.flatten(1).sort(dim=1).values  # (N, HW) ascending
    pixels = values.shape[1]
    kept = torch.round(areas * pixels)[:, None]  # (N, 1)
    ranks = torch.arange(pixels, device=masks.device)[None]  # (1, HW)
    reference = (ranks >= pixels - kept).to(values.dtype)  # (N, HW): r_a
    return ((values - reference) ** 2).mean(dim=1)


def reg_weight_at(step: int, steps: int, weight: float, growth: float) -> float:
    """``λ`` at ``step``: exponential growth from ``weight / growth`` (first) to ``weight`` (last).

    Example:
        >>> [reg_weight_at(s, 3, 100.0, 100.0) for s in range(3)]
        [1.0, 10.0, 100.0]
    """
    progress = step / (steps - 1) if steps > 1 else 1.0
    return weight * growth ** (progress - 1.0)


class ExtremalPerturbation(Baseline):
    """Sum over ``areas`` of the extremal "preserve" masks; see the module docstring.

    Each image and area gets its own parameter grid, all optimised in one batch with Adam and
    projected to ``[0, 1]`` after each step. The default sizes suit 224 × 224 inputs.

    Args:
        areas: target areas ``a``, fractions of the image in ``(0, 1)``; their masks are summed.
        steps: optimisation steps.
        lr: Adam learning rate of the parameter grids.
        reg_weight: final weight ``λ`` of the area loss ``R_a``.
        reg_growth: ``λ`` grows exponentially from ``reg_weight / reg_growth`` to ``reg_weight``.
        mask_stride: pixels between points of the parameter grid.
        mask_sigma: standard deviation, in pixels, of the Gaussian of the max-convolution.
        smoothness: temperature of the smooth max; ``0`` uses the plain max.
        blur_sigma: standard deviation, in pixels, of the blur that replaces deleted pixels.
    """

    def __init__(
        self,
        areas: tuple[float, ...] = (0.1,),
        steps: int = 300,
        lr: float = 0.05,
        reg_weight: float = 300.0,
        reg_growth: float = 100.0,
        mask_stride: int = 7,
        mask_sigma: float = 21.0,
        smoothness: float = 0.0,
        blur_sigma: float = 20.0,
    ) -> None:
        require(len(areas) > 0 and all(0.0 < a < 1.0 for a in areas), "areas", areas,
                "a non-empty tuple of fractions in (0, 1)")
        require(steps >= 1, "steps", steps, "an int >= 1")
        require(lr > 0, "lr", lr, "a float > 0")
        require(reg_weight >= 0, "reg_weight", reg_weight, "a float >= 0")
        require(reg_growth >= 1, "reg_growth", reg_growth, "a float >= 1")
        require(mask_stride >= 1, "mask_stride", mask_stride, "an int >= 1")
        require(mask_sigma > 0, "mask_sigma", mask_sigma, "a float > 0")
        require(smoothness >= 0, "smoothness", smoothness, "a float >= 0")
        require(blur_sigma > 0, "blur_sigma", blur_sigma, "a float > 0")
        self.areas = tuple(areas)
        self.steps = steps
        self.lr = lr
        self.reg_weight = reg_weight
        self.reg_growth = reg_growth
        self.mask_stride = mask_stride
        self.mask_sigma = mask_sigma
        self.smoothness = smoothness
        self.blur_sigma = blur_sigma

    def masks(self, params: Tensor, size: tuple[int, int]) -> Tensor:
        """Smooth masks ``(B, H, W)`` of ``(B, h, w)`` parameter grids."""
        return smooth_mask(params, self.mask_stride, self.mask_sigma, self.smoothness, size)

    def attribute(self, classifier: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        n, size, n_areas = images.shape[0], images.shape[-2:], len(self.areas)
        x = images.repeat_interleave(n_areas, dim=0)  # (N·A, C, H, W): image i, area j at i·A + j
        blurred = blur(x, self.blur_sigma)  # (N·A, C, H, W)
        target = targets.repeat_interleave(n_areas)[:, None]  # (N·A, 1)
        areas = torch.tensor(self.areas, device=images.device).repeat(n)  # (N·A,)
        params = torch.full((n * n_areas, *grid_shape(size, self.mask_stride)), 0.5,
                            device=images.device, requires_grad=True)  # (N·A, h, w)
        optimizer = torch.optim.Adam([params], lr=self.lr)
        for step in range(self.steps):
            mask = self.masks(params, size)[:, None]  # (N·A, 1, H, W)
            score = classifier(mask * x + (1 - mask) * blurred).gather(1, target)[:, 0]  # (N·A,)
            weight = reg_weight_at(step, self.steps, self.reg_weight, self.reg_growth)
            # Images and areas have separate parameters: summing keeps their gradients apart.
            loss = (weight * area_loss(mask[:, 0], areas) - score).sum()
            (params.grad,) = torch.autograd.grad(loss, params)
            optimizer.step()
            with torch.no_grad():
                params.clamp_(0.0, 1.0)
        with torch.no_grad():
            masks = self.masks(params, size)  # (N·A, H, W)
        return masks.view(n, n_areas, *size).sum(dim=1)  # (N, H, W)
