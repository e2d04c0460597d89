"""Pointing game with the TorchRay protocol (Zhang et al., 2016; Fong et al., 2019)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from hdm_lightning.metrics.functional import pointing_hits


class PointingGame(Metric):
    r"""Mean per-class pointing accuracy: does the map's maximum land on the object?

    The point is the argmax of the map; it is a hit when a ground-truth pixel lies at a
    Euclidean distance strictly below ``tolerance`` from it (TorchRay's disk). Then

    .. math:: \mathrm{acc} = \frac{1}{|\mathcal{K}|} \sum_{k \in \mathcal{K}}
              \frac{\mathrm{hits}_k}{\mathrm{hits}_k + \mathrm{misses}_k}

    over the classes :math:`\mathcal{K}` seen at least once (TorchRay averages over all
    classes, which is the same when each occurs). Images with an empty ground-truth mask are
    skipped, not counted as hits (unlike Quantus).

    Args:
        num_classes: number of classes K of the targets.
        tolerance: radius τ of the acceptance disk in pixels (TorchRay: 15).
        kwargs: see torchmetrics' ``Metric``.

    Example:
        >>> maps = torch.zeros(3, 32, 32); maps[:, 0, 0] = 1
        >>> masks = torch.zeros(3, 32, 32, dtype=torch.bool)
        >>> masks[0, 10, 10] = masks[1, 20, 20] = True  # 14.1 px: hit; 28.3 px: miss
        >>> metric = PointingGame(num_classes=2)
        >>> metric.update(maps, masks, torch.tensor([0, 1, 1]))  # the third mask is empty
        >>> metric.compute()
        tensor(0.5000)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    hits: Tensor
    misses: Tensor

    def __init__(self, num_classes: int, tolerance: float = 15, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes}")
        if tolerance <= 0:
            raise ValueError(f"tolerance must be positive (1: the point only), got {tolerance}")
        self.num_classes = num_classes
        self.tolerance = tolerance
        self.add_state("hits", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("misses", torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, maps: Tensor, masks: Tensor, targets: Tensor) -> None:
        """Add a batch.

        Args:
            maps: (N, H, W) saliency maps.
            masks: (N, H, W) bool ground truth of the target class.
            targets: (N,) classes, in ``0 .. num_classes - 1``.
        """
        masks = masks.bool()
        counted = masks.flatten(1).any(dim=1)  # (N,) empty masks are skipped
        hit = pointing_hits(maps, masks, self.tolerance)  # (N,)
        self.hits.index_add_(0, targets, (hit & counted).long())
        self.misses.index_add_(0, targets, (~hit & counted).long())

    def compute(self) -> Tensor:
        """Mean over the classes seen of hits / (hits + misses)."""
        seen = self.hits + self.misses
        accuracy = self.hits / seen.clamp_min(1)  # (K,)
        return (accuracy * (seen > 0)).sum() / (seen > 0).sum()
