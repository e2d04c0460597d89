"""The activation-consistency term of the mask loss, as small callables the YAML picks by class.

:class:`SquaredConsistency` is the reference's ``λ_c (f_c(x ⊙ Up(P)) − f_c(x))²``: the masked
logit must *equal* the original. That is ill-posed where the class is not the image's top one
(issue 7): a small logit can be kept without the class's evidence, and keeping only the class's
object, which raises its logit, is punished like a drop. :class:`EvidenceConsistency` punishes
only a drop, measured as a share of the evidence the image holds for the class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor

from hdm_lightning import masks as M


class Consistency(ABC):
    """Per-item consistency loss from the target logits on the masked image, the stage input and
    the substrate alone, each ``(N,)``."""

    @abstractmethod
    def __call__(self, masked_logit: Tensor, reference_logit: Tensor, floor_logit: Tensor) -> Tensor:
        """``(N,)`` losses."""


class SquaredConsistency(Consistency):
    """The reference's squared logit difference (``HDM-METHOD.md`` section 1).

    Args:
        weight: ``λ_c``.

    Example:
        >>> import torch
        >>> SquaredConsistency(0.5)(torch.tensor([1., 3.]), torch.tensor([2., 3.]), torch.zeros(2))
        tensor([0.5000, 0.0000])
    """

    def __init__(self, weight: float = 1e-2) -> None:
        if weight < 0:
            raise ValueError(f"SquaredConsistency: weight must be >= 0, got {weight}")
        self.weight = weight

    def __call__(self, masked_logit: Tensor, reference_logit: Tensor, floor_logit: Tensor) -> Tensor:
        return M.consistency_loss(masked_logit, reference_logit, self.weight)


class EvidenceConsistency(Consistency):
    """One-sided drop relative to the class's evidence (:func:`~hdm_lightning.masks.evidence_loss`).

    With ``weight`` 1 a confident top class (logit about 11 above the substrate's, as for the demo
    photos) has the same balance against the sparsity term as under the reference's ``λ_c = 1e-2``.

    Args:
        weight: ``λ_e``: the loss of losing all the evidence.
        min_evidence: smallest logit gap ``f_c(x) − f_c(x_0)`` the drop is divided by.

    Example:
        >>> import torch
        >>> EvidenceConsistency(1.0)(torch.tensor([6., 12.]), torch.tensor([10., 10.]), torch.tensor([2., 2.]))
        tensor([0.2500, 0.0000])
    """

    def __init__(self, weight: float = 1.0, min_evidence: float = M.MIN_EVIDENCE) -> None:
        if weight < 0:
            raise ValueError(f"EvidenceConsistency: weight must be >= 0, got {weight}")
        if min_evidence <= 0:
            raise ValueError(f"EvidenceConsistency: min_evidence must be > 0, got {min_evidence}")
        self.weight = weight
        self.min_evidence = min_evidence

    def __call__(self, masked_logit: Tensor, reference_logit: Tensor, floor_logit: Tensor) -> Tensor:
        return M.evidence_loss(masked_logit, reference_logit, floor_logit, self.weight, self.min_evidence)
