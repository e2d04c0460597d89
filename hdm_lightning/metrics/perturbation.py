"""Base of the RISE deletion and insertion metrics: a curve per image, its AUC, their means."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from hdm_lightning.metrics.functional import curve_auc


class PerturbationAUC(Metric):
    r"""Mean area under a perturbation curve, and the mean curve itself.

    Subclasses define :meth:`_curve`, the (N, n + 1) class probabilities along the curve
    (see :func:`hdm_lightning.metrics.functional.perturbation_curve`). The state holds summed
    AUCs and summed curves, so the result is exact under DDP, and each image's AUC in the order
    the images came (:meth:`per_image`, for paired comparisons of methods).

    Args:
        classifier: frozen model, images -> logits (N, K). It is only called: the metric neither
            moves it, nor changes its mode, nor saves it in its ``state_dict``.
        num_steps: n, the number of intervals of the curve; ``floor(i·H·W/n)`` pixels are
            changed at point i. The default 224 is RISE's ``step=224`` on 224×224 images.
        batch_size: perturbed images per forward pass of the classifier.
        kwargs: see torchmetrics' ``Metric``.
    """

    is_differentiable = False
    full_state_update = False

    auc_sum: Tensor
    curve_sum: Tensor
    total: Tensor

    def __init__(
        self, classifier: nn.Module, num_steps: int = 224, batch_size: int = 256, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
        # kept out of nn.Module registration: the metric must not move, train or save the
        # caller's classifier
        object.__setattr__(self, "classifier", classifier)
        self.num_steps = num_steps
        self.batch_size = batch_size
        self.add_state("auc_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("curve_sum", torch.zeros(num_steps + 1), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("aucs", [], dist_reduce_fx="cat")

    def _curve(self, images: Tensor, maps: Tensor, targets: Tensor) -> Tensor:
        """The (N, num_steps + 1) curve of each image."""
        raise NotImplementedError

    def update(self, images: Tensor, maps: Tensor, targets: Tensor) -> None:
        """Add a batch.

        Args:
            images: (N, C, H, W) normalised images.
            maps: (N, H, W) saliency maps, higher = more important.
            targets: (N,) explained classes.
        """
        curve = self._curve(images, maps, targets)  # (N, n+1)
        aucs = curve_auc(curve)  # (N,)
        self.aucs.append(aucs)
        self.auc_sum += aucs.sum()
        self.curve_sum += curve.sum(dim=0)
        self.total += curve.shape[0]

    def compute(self) -> Tensor:
        """Mean AUC over all images seen."""
        return self.auc_sum / self.total

    def per_image(self) -> Tensor:
        """Each image's AUC, ``(N,)``, in the order of the updates (ranks concatenated under DDP)."""
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            return torch.cat(self.aucs) if self.aucs else torch.zeros(0)

    def curve(self) -> Tensor:
        """Mean curve over all images seen, (num_steps + 1,), synchronised across processes.

        Point i lies at fraction ``i / num_steps`` of the pixels, e.g. for a plot:
        ``plt.plot(torch.linspace(0, 1, metric.num_steps + 1), metric.curve())``.
        """
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync):
            return self.curve_sum / self.total
