"""Target policies: which class a later HDM stage explains (``HDM-METHOD.md`` section 3).

The default is :class:`KeepTarget`: one explanation answers one question ("why class c?"), so
every stage looks for further evidence of the same class — a second instance, a part the first
stage left out. :class:`Repredict` follows the authors' research code: after the found regions are
removed the model may predict another class, and the later stage explains that one, which mixes
evidence for different classes into one fused map.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor


class TargetPolicy(ABC):
    """Chooses the class a stage explains from the logits on that stage's input."""

    @abstractmethod
    def __call__(self, stage_logits: Tensor, original_targets: Tensor) -> Tensor:
        """``(N, K)`` logits on ``x^(t)`` and ``(N,)`` original targets -> ``(N,)`` targets."""


class KeepTarget(TargetPolicy):
    """Every stage explains the original class.

    Example:
        >>> import torch
        >>> KeepTarget()(torch.tensor([[0., 5.]]), torch.tensor([0]))
        tensor([0])
    """

    def __call__(self, stage_logits: Tensor, original_targets: Tensor) -> Tensor:
        return original_targets


class Repredict(TargetPolicy):
    """Each later stage explains the class the model predicts on the masked image.

    Example:
        >>> import torch
        >>> Repredict()(torch.tensor([[0., 5.]]), torch.tensor([0]))
        tensor([1])
    """

    def __call__(self, stage_logits: Tensor, original_targets: Tensor) -> Tensor:
        return stage_logits.argmax(dim=1)
