"""Where a picture lies in the classifier's square input, and maps carried between the two frames.

``data.resize`` chooses how an ``(H, W)`` picture becomes the ``(S, S)`` input: ``squash`` resizes
it to the square (the aspect ratio changes), ``pad`` scales its longer side to ``S`` and centres it,
padding the rest with the normalised mean (zero, what a mask value of 0 shows with the ``mean``
substrate). A :class:`Frame` records the placement; :func:`map_to_original` undoes it for a map,
so maps are always at the original resolution and aligned with the original pixels, and
:func:`map_to_model` does it for maps and ground truth that evaluation compares in the input frame.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch  # noqa: F401 (the doctests use it)
import torch.nn.functional as F
from torch import Tensor

Resize = Literal["squash", "pad"]
RESIZES = ("squash", "pad")


@dataclass(frozen=True)
class Frame:
    """An ``(height, width)`` picture placed at ``(top, left)`` as ``(inner_height, inner_width)``
    pixels of the ``(size, size)`` classifier input."""

    height: int
    width: int
    size: int
    top: int
    left: int
    inner_height: int
    inner_width: int


def frame(height: int, width: int, size: int, resize: Resize = "squash") -> Frame:
    """The placement of an ``(height, width)`` picture in an ``(size, size)`` input.

    Example:
        >>> frame(60, 120, 32, "pad")
        Frame(height=60, width=120, size=32, top=8, left=0, inner_height=16, inner_width=32)
        >>> frame(60, 120, 32, "squash").inner_height
        32
    """
    if resize not in RESIZES:
        raise ValueError(f"data.resize must be one of {RESIZES}, got {resize!r}")
    if resize == "squash":
        return Frame(height, width, size, 0, 0, size, size)
    scale = size / max(height, width)
    inner_h, inner_w = max(1, round(height * scale)), max(1, round(width * scale))
    return Frame(height, width, size, (size - inner_h) // 2, (size - inner_w) // 2, inner_h, inner_w)


def resample(values: Tensor, height: int, width: int) -> Tensor:
    """``(..., h, w)`` -> ``(..., height, width)``, bilinear, antialiased when shrinking."""
    lead = values.shape[:-2]
    flat = values.reshape(-1, 1, *values.shape[-2:]).float()  # (B, 1, h, w)
    shrink = height < values.shape[-2] or width < values.shape[-1]
    out = F.interpolate(flat, size=(height, width), mode="bilinear", antialias=shrink, align_corners=False)
    return out.reshape(*lead, height, width)


def to_model(pixels: Tensor, placement: Frame) -> Tensor:
    """``(C, H, W)`` normalised pixels -> ``(C, S, S)`` classifier input; padding is 0."""
    inner = resample(pixels, placement.inner_height, placement.inner_width)  # (C, h, w)
    bottom = placement.size - placement.top - placement.inner_height
    right = placement.size - placement.left - placement.inner_width
    return F.pad(inner, (placement.left, right, placement.top, bottom))  # (C, S, S)


def map_to_original(saliency: Tensor, placement: Frame) -> Tensor:
    """A map over the classifier input -> float32 ``(H, W)`` map over the original pixels.

    ``saliency`` may be at any resolution ``(h, w)`` of the input square (e.g. ``(S, S)``); the
    padded border is cut off and the picture's part resized to the original size, in ``[0, 1]``.

    Example:
        >>> placement = frame(2, 4, 4, "pad")  # rows 1-2 of the input hold the picture
        >>> saliency = torch.tensor([[0., 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
        >>> map_to_original(saliency, placement)
        tensor([[1., 1., 0., 0.],
                [1., 1., 0., 0.]])
    """
    saliency = saliency.detach().float().cpu()
    if (placement.inner_height, placement.inner_width) != (placement.size, placement.size):
        square = resample(saliency, placement.size, placement.size)  # (S, S)
        rows = slice(placement.top, placement.top + placement.inner_height)
        cols = slice(placement.left, placement.left + placement.inner_width)
        saliency = square[rows, cols]  # (h, w): the picture's part
    return resample(saliency, placement.height, placement.width).clamp(0, 1)  # (H, W)


def map_to_model(saliency: Tensor, placement: Frame) -> Tensor:
    """A map over the original pixels ``(H', W')`` (any resolution of them) -> ``(S, S)`` over the
    classifier input, zero on the padding: what :func:`to_model` does to the picture.

    Example:
        >>> map_to_model(torch.ones(2, 4), frame(2, 4, 4, "pad"))
        tensor([[0., 0., 0., 0.],
                [1., 1., 1., 1.],
                [1., 1., 1., 1.],
                [0., 0., 0., 0.]])
    """
    return to_model(saliency.float()[None], placement)[0]  # (S, S)
