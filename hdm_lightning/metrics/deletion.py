"""RISE deletion AUC (Petsiuk et al., 2018): lower means the map found what the model uses."""

from __future__ import annotations

from torch import Tensor

from hdm_lightning.metrics.functional import deletion_curve
from hdm_lightning.metrics.perturbation import PerturbationAUC


class DeletionAUC(PerturbationAUC):
    r"""Deletion AUC: pixels are set to 0 (the dataset mean colour) most important first.

    .. math:: \mathrm{AUC} = \frac{1}{n} \sum_{i=0}^{n-1} \frac{y_i + y_{i+1}}{2}, \qquad
              y_i = \mathrm{softmax}\big(f(x \odot [r \ge \lfloor iHW/n \rfloor])\big)_c

    where :math:`r` ranks the pixels by map value, descending. Arguments as
    :class:`~hdm_lightning.metrics.perturbation.PerturbationAUC`.

    Example:
        A classifier whose class-0 logit is the sum of the pixels, the other logit 0: deleting
        one of four unit pixels per step gives :math:`y_i = \sigma(4 - i)`.

        >>> import torch
        >>> classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
        >>> with torch.no_grad():
        ...     _ = classifier[1].weight.copy_(torch.tensor([[1.0] * 4, [0.0] * 4]))
        ...     _ = classifier[1].bias.zero_()
        >>> metric = DeletionAUC(classifier, num_steps=4)
        >>> metric.update(torch.ones(1, 1, 2, 2), torch.rand(1, 2, 2), torch.tensor([0]))
        >>> metric.curve()
        tensor([0.9820, 0.9526, 0.8808, 0.7311, 0.5000])
        >>> metric.compute()
        tensor(0.8264)
    """

    higher_is_better = False

    def _curve(self, images: Tensor, maps: Tensor, targets: Tensor) -> Tensor:
        return deletion_curve(
            self.classifier, images, maps, targets, self.num_steps, self.batch_size
        )
