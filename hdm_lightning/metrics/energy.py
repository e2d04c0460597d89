"""Energy-based pointing game (Wang et al., 2020, Score-CAM)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from hdm_lightning.metrics.functional import energy_pointing


class EnergyPointingGame(Metric):
    r"""Mean share of the map's energy that falls inside the ground truth G.

    .. math:: \mathrm{proportion} = \frac{1}{N} \sum_i
              \frac{\sum_{p \in G_i} m^i_p}{\sum_p m^i_p}

    Images with an empty ground-truth mask are skipped; an all-zero map scores 0.

    Args:
        kwargs: see torchmetrics' ``Metric``.

    Example:
        >>> maps = torch.tensor([[[1.0, 3.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]]])
        >>> masks = torch.tensor([[[False, True], [False, False]], [[True, False], [False, False]]])
        >>> metric = EnergyPointingGame()
        >>> metric.update(maps, masks)
        >>> metric.compute()  # (3/4 + 1/4) / 2
        tensor(0.5000)
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    proportion_sum: Tensor
    total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("proportion_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, maps: Tensor, masks: Tensor) -> None:
        """Add a batch.

        Args:
            maps: (N, H, W) non-negative saliency maps.
            masks: (N, H, W) bool ground truth.
        """
        masks = masks.bool()
        counted = masks.flatten(1).any(dim=1)  # (N,) empty masks are skipped
        self.proportion_sum += (energy_pointing(maps, masks) * counted).sum()
        self.total += counted.sum()

    def compute(self) -> Tensor:
        """Mean proportion over the images with a non-empty mask."""
        return self.proportion_sum / self.total
