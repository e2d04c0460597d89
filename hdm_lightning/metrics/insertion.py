"""RISE insertion AUC (Petsiuk et al., 2018): higher means the map found what the model uses."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from hdm_lightning.metrics.functional import insertion_curve
from hdm_lightning.metrics.perturbation import PerturbationAUC


class InsertionAUC(PerturbationAUC):
    r"""Insertion AUC: original pixels replace a blurred image, most important first.

    .. math:: y_i = \mathrm{softmax}\big(f(x_i)\big)_c, \qquad
              x_i = [r < \lfloor iHW/n \rfloor]\, x + [r \ge \lfloor iHW/n \rfloor]\, (g * x)

    with :math:`g` a Gaussian of ``kernel_size`` taps and standard deviation ``sigma`` (RISE:
    11 and 5) and the AUC as in :class:`~hdm_lightning.metrics.deletion.DeletionAUC`.

    Args:
        classifier: frozen model, images -> logits (N, K).
        kernel_size: odd number of taps of the blur.
        sigma: standard deviation of the blur, in pixels.
        kwargs: ``num_steps``, ``batch_size`` of
            :class:`~hdm_lightning.metrics.perturbation.PerturbationAUC`, and torchmetrics'
            ``Metric`` arguments.

    Example:
        >>> import torch
        >>> classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> metric = InsertionAUC(classifier, num_steps=4, kernel_size=3, sigma=1.0)
        >>> metric.update(torch.randn(3, 1, 2, 2), torch.rand(3, 2, 2), torch.tensor([0, 1, 1]))
        >>> metric.curve().shape
        torch.Size([5])
    """

    higher_is_better = True

    def __init__(
        self, classifier: nn.Module, kernel_size: int = 11, sigma: float = 5.0, **kwargs: Any
    ) -> None:
        super().__init__(classifier, **kwargs)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.kernel_size = kernel_size
        self.sigma = sigma

    def _curve(self, images: Tensor, maps: Tensor, targets: Tensor) -> Tensor:
        return insertion_curve(
            self.classifier,
            images,
            maps,
            targets,
            self.num_steps,
            self.batch_size,
            self.kernel_size,
            self.sigma,
        )
