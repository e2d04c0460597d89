"""RISE (Petsiuk, Das and Saenko, BMVC 2018): saliency from randomly masked inputs.

Implemented here from the paper. ``N`` random masks ``M_i`` are drawn once per call; the map is

    S_c = Σ_i f_c(I ⊙ M_i) · M_i / (N · p1)

where ``f_c`` is the softmax probability of class ``c``: the expected score of the images in
which a pixel is kept. Masking multiplies the normalised image, so a hidden pixel takes the
dataset mean colour.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hdm_lightning.baselines.base import Baseline, require


def rise_grids(n: int, grid_size: int, p1: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Random parts of ``n`` masks: binary grids ``(n, s, s)`` and crop offsets ``(n, 2)``.

    Each cell is 1 with probability ``p1``; offsets are fractions of a cell in ``[0, 1)``.
    Everything comes from ``generator`` in a fixed order, so masks do not depend on batching.

    Example:
        >>> grids, offsets = rise_grids(3, 4, 0.5, torch.Generator().manual_seed(0))
        >>> grids.shape, offsets.shape, sorted(grids.unique().tolist())
        (torch.Size([3, 4, 4]), torch.Size([3, 2]), [0.0, 1.0])
    """
    grids = (torch.rand(n, grid_size, grid_size, generator=generator) < p1).float()  # (n, s, s)
    offsets = torch.rand(n, 2, generator=generator)  # (n, 2)
    return grids, offsets


def render_masks(grids: Tensor, offsets: Tensor, size: tuple[int, int]) -> Tensor:
    """Smooth masks ``(n, H, W)`` in ``[0, 1]`` from :func:`rise_grids`, as in the paper.

    Each ``s × s`` grid is upsampled bilinearly to ``s + 1`` cells of ``ceil(H / s)`` pixels and
    an ``H × W`` window is cropped at its offset (below one cell), so cell borders fall anywhere.

    Example:
        >>> grids = torch.tensor([[[0., 1.], [0., 1.]]])  # (1, 2, 2): right half kept
        >>> render_masks(grids, torch.zeros(1, 2), (4, 4))[0, 0].round(decimals=2)  # 2 cells of 2 px
        tensor([0.0000, 0.0000, 0.3300, 0.6700])
    """
    n, grid_size = grids.shape[:2]
    height, width = size
    cell_h, cell_w = math.ceil(height / grid_size), math.ceil(width / grid_size)
    up = F.interpolate(grids[:, None], size=((grid_size + 1) * cell_h, (grid_size + 1) * cell_w),
                       mode="bilinear", align_corners=False)[:, 0]  # (n, (s+1)·ch, (s+1)·cw)
    dy = (offsets[:, :1] * cell_h).long()  # (n, 1)
    dx = (offsets[:, 1:] * cell_w).long()  # (n, 1)
    rows = (dy + torch.arange(height, device=grids.device))[:, :, None]  # (n, H, 1)
    cols = (dx + torch.arange(width, device=grids.device))[:, None, :]  # (n, 1, W)
    return up[torch.arange(n, device=grids.device)[:, None, None], rows, cols]  # (n, H, W)


def rise_saliency(classifier: nn.Module, image: Tensor, target: int, masks: Tensor) -> Tensor:
    """``Σ_i f_c(I ⊙ M_i) M_i`` for one ``(C, H, W)`` image and ``(B, H, W)`` masks -> ``(H, W)``."""
    masked = image[None] * masks[:, None]  # (B, C, H, W)
    probs = classifier(masked).softmax(dim=1)[:, target]  # (B,)
    return torch.einsum("b,bhw->hw", probs, masks)


class RISE(Baseline):
    """Randomized Input Sampling for Explanation; see the module docstring.

    The same masks explain every image of a call and depend only on the settings, so a seed
    gives identical maps on every run and device.

    Args:
        n_masks: number of random masks ``N``.
        grid_size: cells per side ``s`` of the binary grid; a cell is ``ceil(H / s)`` pixels.
        p1: probability that a cell is kept.
        batch_size: masked images per forward pass.
        seed: seed of the mask generator.
    """

    def __init__(self, n_masks: int = 4000, grid_size: int = 7, p1: float = 0.5, batch_size: int = 100,
                 seed: int = 0) -> None:
        require(n_masks >= 1, "n_masks", n_masks, "an int >= 1")
        require(grid_size >= 1, "grid_size", grid_size, "an int >= 1")
        require(0.0 < p1 <= 1.0, "p1", p1, "a probability in (0, 1]")
        require(batch_size >= 1, "batch_size", batch_size, "an int >= 1")
        self.n_masks = n_masks
        self.grid_size = grid_size
        self.p1 = p1
        self.batch_size = batch_size
        self.seed = seed

    def attribute(self, classifier: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        generator = torch.Generator().manual_seed(self.seed)
        grids, offsets = rise_grids(self.n_masks, self.grid_size, self.p1, generator)  # (N_m, s, s), (N_m, 2)
        saliency = images.new_zeros(images.shape[0], *images.shape[-2:])  # (N, H, W)
        with torch.no_grad():
            for chunk in zip(grids.split(self.batch_size), offsets.split(self.batch_size)):
                masks = render_masks(*(t.to(images.device) for t in chunk), images.shape[-2:])  # (B, H, W)
                for i, target in enumerate(targets.tolist()):
                    saliency[i] += rise_saliency(classifier, images[i], target, masks)
        return saliency / (self.n_masks * self.p1)
