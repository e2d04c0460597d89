"""A tiny classifier that looks at one fixed square, with a conv layer for Grad-CAM.

``RegionClassifier`` zeroes everything outside ``region``, takes the colour mean with a 1×1
conv, rectifies it and pools: the class-1 logit is ``gain`` times the mean of ``ReLU(colour mean)``
over the region, the class-0 logit a constant ``threshold``. A bright square on the region makes class 1
the top class; a correct map for class 1 lies on the region, whatever else is bright.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

SIZE = 32
REGION = (4, 18, 8, 8)  # top, left, height, width
DECOY = (20, 4, 8, 8)


def region_slices(region: tuple[int, int, int, int]) -> tuple[slice, slice]:
    top, left, height, width = region
    return slice(top, top + height), slice(left, left + width)


class RegionClassifier(nn.Module):
    """Logits ``(threshold, gain · mean over the region of ReLU(mean over colours))``.

    Args:
        size: side of the square input.
        region: ``(top, left, height, width)`` of the square the decision rests on.
        gain: slope of the class-1 logit.
        threshold: the class-0 logit.
    """

    def __init__(self, size: int = SIZE, region: tuple[int, int, int, int] = REGION, gain: float = 4.0,
                 threshold: float = 2.0) -> None:
        super().__init__()
        weight = torch.zeros(size, size)
        weight[region_slices(region)] = 1.0
        self.register_buffer("weight", weight)
        self.conv = nn.Conv2d(3, 1, kernel_size=1, bias=False)
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.conv.weight.fill_(1 / 3)
            self.fc.weight.copy_(torch.tensor([[0.0], [gain * weight.numel() / weight.sum()]]))  # undo the pooling
            self.fc.bias.copy_(torch.tensor([threshold, 0.0]))

    def forward(self, images: Tensor) -> Tensor:
        features = torch.relu(self.conv(images * self.weight))  # (N, 1, H, W), zero off the region
        return self.fc(features.mean(dim=(2, 3)))  # (N, 2)


def square_images(folder, count: int = 3, seed: int = 0) -> list:
    """PNGs of dim noise with two bright squares, on ``REGION`` and on ``DECOY``; their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = rng.uniform(0.0, 0.2, size=(SIZE, SIZE, 3))
        for square in (REGION, DECOY):
            pixels[region_slices(square)] = rng.uniform(0.85, 1.0)
        path = folder / f"square{i}.png"
        Image.fromarray((pixels * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths
