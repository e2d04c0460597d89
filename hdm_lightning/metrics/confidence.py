"""Average Drop and Increase in Confidence (Chattopadhyay et al., 2018, Grad-CAM++)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from hdm_lightning.metrics.functional import (
    class_probability,
    confidence_drop,
    confidence_increase,
    explanation_images,
)


class AverageDropIncrease(Metric):
    r"""Average Drop and Increase in Confidence of the explanation images :math:`x \odot m`.

    .. math:: \mathrm{AvgDrop} = \frac{100}{N} \sum_i \frac{\max(0, Y^i_c - O^i_c)}{Y^i_c},
              \qquad \mathrm{IC} = \frac{100}{N} \sum_i [O^i_c > Y^i_c]

    :math:`Y_c` and :math:`O_c` are the softmax probabilities of the explained class on the
    image and on the explanation image. The paper multiplies the image in pixel space; here
    the product is taken in normalised space, so a map value of 0 yields the dataset mean
    colour (as the masks of HDM do) rather than black.

    Args:
        classifier: frozen model, images -> logits (N, K). It is only called: the metric neither
            moves it, nor changes its mode, nor saves it in its ``state_dict``.
        kwargs: see torchmetrics' ``Metric``.

    Example:
        >>> classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> metric = AverageDropIncrease(classifier)
        >>> images = torch.randn(2, 1, 2, 2)
        >>> metric.update(images, torch.ones(2, 2, 2), torch.tensor([0, 1]))
        >>> metric.compute()  # a map of ones explains without loss
        {'average_drop': tensor(0.), 'increase_in_confidence': tensor(0.)}
    """

    is_differentiable = False
    full_state_update = False

    drop_sum: Tensor
    increase_sum: Tensor
    total: Tensor

    def __init__(self, classifier: nn.Module, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # kept out of nn.Module registration: the metric must not move, train or save the
        # caller's classifier
        object.__setattr__(self, "classifier", classifier)
        self.add_state("drop_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("increase_sum", torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, images: Tensor, maps: Tensor, targets: Tensor) -> None:
        """Add a batch.

        Args:
            images: (N, C, H, W) normalised images.
            maps: (N, H, W) saliency maps in [0, 1].
            targets: (N,) explained classes.
        """
        both = torch.cat((images, explanation_images(images, maps)))  # (2N, C, H, W)
        with torch.no_grad():
            logits = self.classifier(both)  # (2N, K)
        probs, explained_probs = class_probability(logits, targets.repeat(2)).chunk(2)  # (N,) x2
        self.drop_sum += confidence_drop(probs, explained_probs).sum()
        self.increase_sum += confidence_increase(probs, explained_probs).sum()
        self.total += targets.shape[0]

    def compute(self) -> dict[str, Tensor]:
        """``average_drop`` and ``increase_in_confidence``, both in per cent."""
        return {
            "average_drop": self.drop_sum / self.total,
            "increase_in_confidence": 100 * self.increase_sum / self.total,
        }
