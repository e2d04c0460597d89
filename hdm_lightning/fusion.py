"""Fusion of the stage maps ``S_1 … S_T`` into one saliency map (``HDM-METHOD.md`` section 3).

:class:`SumFusion` is the released code's equal-weight sum. :class:`LearnedFusion` is our
definition of the paper's "learning-based" fusion, which the public material leaves open: one
weight per stage and image, ``w = sigmoid(θ)``, learned with the same two losses as a mask,

    F = clamp(Σ_t w_t S_t, 0, 1)
    L(θ) = λ_c (f_c(x ⊙ F) − f_c(x))² + λ_1 mean(F)

so a stage whose regions do not help keep the decision is weighted down, and the fused map keeps
only as much area as the decision needs. The weights are few and bounded, so the fusion cannot
invent structure that no stage found.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch
from torch import Tensor

from hdm_lightning.masks import EPS, consistency_loss, cumulative, minmax

#: ``score(mask)`` maps ``(N, H, W)`` masks to the target logits ``(N,)`` of the masked images.
Score = Callable[[Tensor], Tensor]
#: ``removal(C_t)``: how much of each pixel a cumulative map ``C_t`` removes (``masks.removal``).
Removal = Callable[[Tensor], Tensor]


def whole(found: Tensor) -> Tensor:
    """The reference's removal: ``C_t`` itself (``x ⊙ (1 − C_t)``)."""
    return found


class Fusion(ABC):
    """Fuses ``(T, N, H, W)`` stage maps into ``(N, H, W)`` maps in ``[0, 1]``.

    The stage maps share one scale (``model.map_scale``: each one min-max normalised, or each on
    its masks' own scale) and are used as they are: a faint stage stays faint.
    """

    @abstractmethod
    def __call__(self, stage_maps: Tensor, score: Score, reference: Tensor, removal: Removal = whole) -> Tensor:
        """``reference`` holds the ``(N,)`` target logits on the unmasked images; ``removal`` is how
        the method removed what the stages found (``model.removal_threshold``), for a fusion that
        scores removals."""


class SumFusion(Fusion):
    """``minmax(Σ_t S_t)``, the plain sum (the reference's ``minmax(Σ_t minmax(S_t))`` under
    ``map_scale=minmax``, where every ``S_t`` is already min-max normalised).

    Example:
        >>> maps = torch.tensor([[[[0., 1.]]], [[[1., 0.]]], [[[0., 1.]]]])  # (T=3, N=1, 1, 2)
        >>> SumFusion()(maps, score=None, reference=None)
        tensor([[[0., 1.]]])
    """

    def __call__(self, stage_maps: Tensor, score: Score, reference: Tensor, removal: Removal = whole) -> Tensor:
        return cumulative(stage_maps)


class EvidenceFusion(Fusion):
    """Stage 1 whole, each later stage weighted by the evidence for the class that removing its new
    regions takes away.

    ``w_t = clamp((f_c(x ⊙ (1 − C_{t−1})) − f_c(x ⊙ (1 − C_t))) / (f_c(x) − f_c(x_0)), 0, 1)`` with
    ``C_t = cumulative(S_1 … S_t)`` the method's own cumulative map (``C_0 = 0``) and ``x_0`` the
    substrate alone: the share of the class's evidence that stage ``t`` adds to what the earlier
    stages removed. ``F = minmax(S_1 + Σ_{t≥2} w_t S_t)``. A stage that runs once the evidence is
    gone (under ``map_scale=minmax`` still stretched to full range) gets a weight near 0 instead of
    ``1/T`` (issue 7, "stage pollution"), and a broad stage map counts for what it adds to the
    cumulative removal, not for everything it covers. Stage 1 is anchored at weight 1: its masks
    keep the class's evidence by construction, while its ``w_1`` under the soft removal is a few
    hundredths on most photos (the removal leaves most evidence in place), so weighting it too let
    float noise in those hundredths decide the mix (``anchored=False``, every stage at its ``w_t``,
    is the form before; an image whose weights are then all 0 falls back to equal weights). Costs
    ``T + 1`` classifier passes. ``removal`` turns ``C_t`` into what is removed, as for the stages'
    inputs (``model.removal_threshold``; the module passes it).

    Example:
        >>> maps = torch.tensor([[[[1., 0.]]], [[[0., 1.]]]])  # (T=2, N=1, 1, 2): stage 2 finds pixel 2
        >>> score = lambda kept: 10 * kept[:, 0, 0]  # only pixel 1 holds evidence
        >>> EvidenceFusion()(maps, score, torch.tensor([10.]))
        tensor([[[1., 0.]]])
    """

    def __init__(self, anchored: bool = True) -> None:
        self.anchored = anchored

    def __call__(self, stage_maps: Tensor, score: Score, reference: Tensor, removal: Removal = whole) -> Tensor:
        weights = self.weights(stage_maps, score, reference, removal)  # (T, N)
        if self.anchored:
            weights[0] = 1.0
        weights = torch.where(weights.sum(dim=0, keepdim=True) > 0, weights, torch.ones_like(weights))
        return minmax((weights[:, :, None, None] * stage_maps).sum(dim=0))

    @staticmethod
    @torch.no_grad()
    def weights(stages: Tensor, score: Score, reference: Tensor, removal: Removal = whole) -> Tensor:
        """``(T, N, H, W)`` stage maps -> ``(T, N)`` weights ``w_t``."""
        evidence = (reference - score(torch.zeros_like(stages[0]))).clamp_min(EPS)  # (N,)
        # f_c(x ⊙ (1 − C_t)) for t = 0 … T
        left = [reference] + [score(1 - removal(cumulative(stages[: t + 1]))) for t in range(len(stages))]
        return torch.stack([((left[t] - left[t + 1]) / evidence).clamp(0, 1) for t in range(len(stages))])


class LearnedFusion(Fusion):
    """Per-stage weights learned against the classifier (see the module docstring).

    Args:
        steps: optimisation steps of the weights.
        lr: Adam learning rate of the logits ``θ`` of the weights.
        consistency_weight: ``λ_c``.
        sparsity_weight: ``λ_1``.
    """

    def __init__(
        self, steps: int = 100, lr: float = 0.1, consistency_weight: float = 1e-2, sparsity_weight: float = 1.0
    ) -> None:
        if steps < 1:
            raise ValueError(f"LearnedFusion: steps must be >= 1, got {steps}")
        if lr <= 0:
            raise ValueError(f"LearnedFusion: lr must be > 0, got {lr}")
        self.steps = steps
        self.lr = lr
        self.consistency_weight = consistency_weight
        self.sparsity_weight = sparsity_weight

    def __call__(self, stage_maps: Tensor, score: Score, reference: Tensor, removal: Removal = whole) -> Tensor:
        stages = stage_maps.detach()  # (T, N, H, W)
        reference = reference.detach()
        theta = torch.zeros(stages.shape[:2], device=stages.device, requires_grad=True)  # (T, N)
        optimiser = torch.optim.Adam([theta], lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                fused = self.combine(stages, theta)
                loss = consistency_loss(score(fused), reference, self.consistency_weight)
                loss = loss + self.sparsity_weight * fused.flatten(1).mean(dim=1)
                optimiser.zero_grad()
                loss.sum().backward()  # a sum keeps each image's gradient its own
                optimiser.step()
        return self.combine(stages, theta.detach())  # not re-normalised: the scale is what λ_1 learns

    @staticmethod
    def combine(stages: Tensor, theta: Tensor) -> Tensor:
        """``clamp(Σ_t sigmoid(θ_t) S_t, 0, 1)``: ``(T, N, H, W), (T, N) -> (N, H, W)``."""
        weights = torch.sigmoid(theta)[:, :, None, None]  # (T, N, 1, 1)
        return (weights * stages).sum(dim=0).clamp(0, 1)
