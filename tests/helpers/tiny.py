"""A tiny classifier whose decision is known: class 1 is the brightness of one square.

``SpotClassifier`` smooths the first channel with a fixed 3×3 conv and BatchNorm (so that eval
mode matters), then scores class 1 as the mean of the square ``SPOT`` minus the image mean;
class 0 is its negative. A correct saliency map for class 1 lies on the square.
"""

import numpy as np
import torch
from PIL import Image
from torch import nn

SIZE = 32
SPOT = (slice(8, 16), slice(18, 26))  # rows, columns of the deciding square


class SpotClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(1)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 1 / 9
        weight = torch.full((SIZE, SIZE), -1.0 / (SIZE * SIZE))
        weight[SPOT] += 1.0 / 64
        self.register_buffer("weight", weight * 4)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.norm(self.conv(images))[:, 0]  # (N, H, W)
        score = (features * self.weight).flatten(1).sum(1)
        return torch.stack([-score, score], dim=1)


def spot_images(folder, count: int = 2, seed: int = 0, squares: tuple = (SPOT,), prefix: str = "spot") -> list:
    """PNG files with bright ``squares`` over noise; returns their paths."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = rng.uniform(0.2, 0.5, size=(SIZE, SIZE, 3))
        for square in squares:
            pixels[square] = rng.uniform(0.9, 1.0)
        path = folder / f"{prefix}{i}.png"
        Image.fromarray((pixels * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


SHARED = (slice(20, 28), slice(4, 12))  # a second square that raises class 1 and, more, class 2


class SharedSpotClassifier(nn.Module):
    """Three classes: class 1 is ``4 (a + b)``, class 2 is ``3 b``, class 0 is 0, where ``a`` and
    ``b`` are the brightness of ``SPOT`` and ``SHARED`` against the image mean (each ``(N,)``).

    With both squares bright, class 1 is the top class. Either square alone keeps half its logit,
    but only ``SPOT`` keeps what sets class 1 apart from class 2: the class's log-odds live there.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        brightness = images[:, 0]
        centred = brightness - brightness.flatten(1).mean(1)[:, None, None]
        a = centred[:, SPOT[0], SPOT[1]].flatten(1).mean(1)
        b = centred[:, SHARED[0], SHARED[1]].flatten(1).mean(1)
        return torch.stack([torch.zeros_like(a), 4 * (a + b), 3 * b], dim=1)


def shared_spot_images(folder, count: int = 1, seed: int = 0) -> list:
    """PNG files with bright squares on ``SPOT`` and ``SHARED`` over noise; returns their paths."""
    return spot_images(folder, count, seed, squares=(SPOT, SHARED), prefix="shared")


DECOY = (slice(16, 24), slice(0, 8))  # a square that raises class 1 where its neighbour is gone
CONTEXT = (slice(16, 24), slice(8, 16))  # the neighbour, a little darker than the decoy


class DecoyClassifier(nn.Module):
    """Class 1 is ``4 a + 8 max(0, d − c)``, class 0 is 0, where ``a``, ``d`` and ``c`` are the mean
    brightness (normalised) of ``SPOT``, ``DECOY`` and ``CONTEXT``.

    In the images of :func:`decoy_images` ``d`` is a little above ``c``: the class's evidence is
    ``SPOT`` (removing it takes most of the logit, removing ``DECOY`` a sixth). But a mask that keeps
    ``DECOY`` and shows the mean colour (0) on ``CONTEXT`` keeps the logit with part of ``DECOY``
    alone: an artefact of the mask, like a kept patch of bright sky that reads as a spotlight on a
    grey substrate. The image without that patch keeps its evidence.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        brightness = images[:, 0]
        a, d, c = (brightness[:, rows, columns].flatten(1).mean(1) for rows, columns in (SPOT, DECOY, CONTEXT))
        return torch.stack([torch.zeros_like(a), 4 * a + 8 * (d - c).clamp_min(0)], dim=1)


def decoy_images(folder, count: int = 1, seed: int = 0) -> list:
    """PNG files with ``SPOT`` and ``DECOY`` at 0.95 and ``CONTEXT`` at 0.9 over noise in [0.2, 0.5]."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        pixels = rng.uniform(0.2, 0.5, size=(SIZE, SIZE, 3))
        pixels[SPOT] = pixels[DECOY] = 0.95
        pixels[CONTEXT] = 0.9
        path = folder / f"decoy{i}.png"
        Image.fromarray((pixels * 255).astype(np.uint8)).save(path)
        paths.append(path)
    return paths


class GenericSpotClassifier(nn.Module):
    """Three classes: class 1 is ``4 a + 2 g``, classes 0 and 2 are ``2 g``, where ``a`` and ``g`` are
    the mean brightness (normalised) of ``SPOT`` and ``SHARED``.

    ``SHARED`` raises every logit alike, as unrelated content does in a real network (another tile of
    a mosaic): it holds part of class 1's logit but none of its log-odds, ``4 a − log 2``. The image
    without ``SPOT`` keeps class 1's logit above the mean-colour image's, not its log-odds.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        brightness = images[:, 0]
        a, g = (brightness[:, rows, columns].flatten(1).mean(1) for rows, columns in (SPOT, SHARED))
        return torch.stack([2 * g, 4 * a + 2 * g, 2 * g], dim=1)
