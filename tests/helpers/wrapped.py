"""Networks that return their logits inside a dict, a tuple or an object, and a 1-channel one."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tests.helpers.tiny import SpotClassifier


class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = SpotClassifier()

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        logits = self.inner(images)
        return {"features": logits.detach() * 0, "logits": logits}


class TupleNet(DictNet):
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.inner(images)
        return logits * 0, logits  # (auxiliary head, main head)


@dataclass
class Prediction:
    logits: Tensor
    loss: Tensor | None = None


class ObjectNet(DictNet):
    def forward(self, images: Tensor) -> Prediction:
        return Prediction(self.inner(images))


class GreySpot(nn.Module):
    """1-channel: class 1 is the brightness of the square ``rows x cols`` minus the image mean.

    Args:
        size: side of the input.
        rows: first and last (exclusive) rows of the square.
        cols: first and last (exclusive) columns of the square.
    """

    def __init__(self, size: int = 32, rows: tuple[int, int] = (8, 16), cols: tuple[int, int] = (18, 26)) -> None:
        super().__init__()
        weight = torch.full((size, size), -1.0 / (size * size))
        area = (rows[1] - rows[0]) * (cols[1] - cols[0])
        weight[rows[0]:rows[1], cols[0]:cols[1]] += 1.0 / area
        self.register_buffer("weight", weight * 4)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, images: Tensor) -> Tensor:
        if images.shape[1] != 1:
            raise ValueError(f"GreySpot takes 1 channel, got {images.shape[1]}")
        score = (images[:, 0] * self.weight).flatten(1).sum(1) * self.scale  # (N,)
        return torch.stack([-score, score], dim=1)
