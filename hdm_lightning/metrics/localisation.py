"""Localisation of the map's top 1–20 % of pixels against a ground-truth mask (HDM, §5)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from hdm_lightning.metrics.functional import top_percent_scores

SCORES = ("dice", "iou", "precision", "sensitivity")


class TopPercentLocalisation(Metric):
    r"""Dice, IoU, precision (PPV) and sensitivity of the map binarised at its top p % pixels.

    For each p the map is thresholded at its :math:`\mathrm{round}(p\,HW/100)`-th largest
    value (the (100 − p)-th percentile, ties kept) and compared with the ground truth G:

    .. math:: \mathrm{Dice} = \frac{2|B_p \cap G|}{|B_p| + |G|}, \;
              \mathrm{IoU} = \frac{|B_p \cap G|}{|B_p \cup G|}, \;
              \mathrm{PPV} = \frac{|B_p \cap G|}{|B_p|}, \;
              \mathrm{TPR} = \frac{|B_p \cap G|}{|G|}

    each averaged over images (empty masks skipped). :meth:`compute` gives the mean over p,
    :meth:`per_percent` the value for each p.

    Args:
        percents: the p values, in (0, 100]; the default 1..20 are percentiles 80–99 as in HDM.
        kwargs: see torchmetrics' ``Metric``.

    Example:
        >>> maps = torch.tensor([[[0.9, 0.8], [0.1, 0.0]]])
        >>> masks = torch.tensor([[[True, False], [True, False]]])
        >>> metric = TopPercentLocalisation(percents=(25, 50))
        >>> metric.update(maps, masks)
        >>> metric.per_percent()["iou"], metric.compute()["iou"]
        (tensor([0.5000, 0.3333]), tensor(0.4167))
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    percents: Tensor
    total: Tensor

    def __init__(self, percents: Sequence[float] = tuple(range(1, 21)), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if len(percents) == 0 or not all(0 < p <= 100 for p in percents):
            raise ValueError(f"percents must be non-empty, with values in (0, 100], got {percents}")
        percents = torch.tensor(percents, dtype=torch.float)
        self.register_buffer("percents", percents, persistent=False)
        for name in SCORES:
            self.add_state(f"{name}_sum", torch.zeros(len(percents)), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, maps: Tensor, masks: Tensor) -> None:
        """Add a batch.

        Args:
            maps: (N, H, W) saliency maps.
            masks: (N, H, W) bool ground truth.
        """
        masks = masks.bool()
        counted = masks.flatten(1).any(dim=1, keepdim=True)  # (N, 1) empty masks are skipped
        scores = top_percent_scores(maps, masks, self.percents)  # each (N, P)
        for name in SCORES:
            state = getattr(self, f"{name}_sum")
            state += (scores[name] * counted).sum(dim=0)
        self.total += counted.sum()

    def per_percent(self) -> dict[str, Tensor]:
        """Each score averaged over images, one value per p: (P,), synchronised across processes."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            return {name: getattr(self, f"{name}_sum") / self.total for name in SCORES}

    def compute(self) -> dict[str, Tensor]:
        """Each score averaged over images and over p: scalars."""
        return {name: (getattr(self, f"{name}_sum") / self.total).mean() for name in SCORES}
