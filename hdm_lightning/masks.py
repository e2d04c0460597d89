"""Pure tensor maths of Dynamic Masks and HDM (``HDM-METHOD.md`` sections 1-3).

Notation follows the reference: ``a_l`` is the trainable mask of level ``l`` of a chain,
``P_l = R_b(P_{l-1}) ⊙ a_l`` its superimposed mask, ``M_l`` its full-resolution level map,
``S`` a stage map and ``C_t`` the cumulative map after stage ``t``. Nothing here logs, touches
files or changes its inputs in place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-8


@dataclass(frozen=True)
class Chain:
    """One chain of the DM module: a benchmark size and the sizes of its auxiliary masks.

    ``sizes[0]`` is the benchmark size ``s0``; ``sizes[l] = s0 * b**l``.
    """

    block: int
    sizes: tuple[int, ...]

    @property
    def benchmark(self) -> int:
        return self.sizes[0]


def build_chains(benchmark_sizes: list[int], block_factors: list[int], max_size: int) -> list[Chain]:
    """All chains ``s0 → s0·b → s0·b² …`` kept while the size is at most ``max_size``.

    A chain with no auxiliary level is still listed (it contributes its benchmark mask). With no
    block factors every size is a single-level chain: the independent masks of MDM.

    Example:
        >>> [c.sizes for c in build_chains([6], [2, 3, 5], 50)]
        [(6, 12, 24, 48), (6, 18), (6, 30)]
        >>> [c.sizes for c in build_chains([11], [5], 50)]
        [(11,)]
        >>> [c.sizes for c in build_chains([6, 56], [], 50)]
        [(6,), (56,)]
    """
    if any(b < 2 for b in block_factors):
        raise ValueError(f"model.block_factors must all be >= 2, got {block_factors}")
    if not block_factors:
        return [Chain(block=1, sizes=(s0,)) for s0 in benchmark_sizes]
    chains = []
    for s0 in benchmark_sizes:
        for b in block_factors:
            sizes = [s0]
            while sizes[-1] * b <= max_size:
                sizes.append(sizes[-1] * b)
            chains.append(Chain(block=b, sizes=tuple(sizes)))
    return chains


def chains_at_level(chains: list[Chain], level: int) -> list[int]:
    """Indices of the chains that have a mask at ``level``.

    Level 0 lists one chain per benchmark size: chains of the same ``s0`` share their benchmark
    mask, since the same initial value and loss give the same optimum (the original code learns
    it once per chain, 3× the work for the same result).

    Example:
        >>> chains = build_chains([6, 11], [2, 5], 50)
        >>> chains_at_level(chains, 0), chains_at_level(chains, 1), chains_at_level(chains, 3)
        ([0, 2], [0, 1, 2], [0])
    """
    if level == 0:
        first: dict[int, int] = {}
        for i, chain in enumerate(chains):
            first.setdefault(chain.benchmark, i)
        return list(first.values())
    return [i for i, chain in enumerate(chains) if len(chain.sizes) > level]


def num_levels(chains: list[Chain]) -> int:
    return max(len(c.sizes) for c in chains)


def replicate(mask: Tensor, block: int) -> Tensor:
    """``R_b``: each cell becomes a ``b×b`` block (nearest-neighbour upsampling by ``b``).

    Shapes: ``(..., s, s) -> (..., s·b, s·b)``.

    Example:
        >>> replicate(torch.tensor([[1., 2.], [3., 4.]]), 2)[0]
        tensor([1., 1., 2., 2.])
    """
    return mask.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)


def superimpose(previous: Tensor | None, mask: Tensor, block: int) -> Tensor:
    """``P_l = R_b(P_{l-1}) ⊙ a_l``; ``P_0 = a_0`` when ``previous`` is None."""
    if previous is None:
        return mask
    return replicate(previous, block) * mask


def upsample(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """``Up``: bilinear upsampling of ``(N, s, s)`` masks to ``(N, H, W)`` (computed in float32)."""
    return F.interpolate(mask.float().unsqueeze(1), size=size, mode="bilinear", align_corners=False)[:, 0]


def minmax(maps: Tensor) -> Tensor:
    """Min-max normalise each map of ``(N, H, W)`` to ``[0, 1]``; a constant map becomes 0.

    Example:
        >>> minmax(torch.tensor([[[1., 3.], [2., 5.]]]))
        tensor([[[0.0000, 0.5000],
                 [0.2500, 1.0000]]])
    """
    flat = maps.flatten(1)
    low = flat.min(dim=1).values[:, None, None]
    high = flat.max(dim=1).values[:, None, None]
    return (maps - low) / (high - low).clamp_min(EPS)


def apply_mask(images: Tensor, mask: Tensor, baseline: Tensor) -> Tensor:
    """Masked image ``baseline + (x − baseline) ⊙ M``.

    With a zero baseline in normalised space this is the reference's ``x ⊙ Up(P)`` (a kept value
    of 0 shows the dataset mean colour). Shapes: images and baseline ``(N, C, H, W)``, mask
    ``(N, H, W)``.
    """
    return baseline + (images - baseline) * mask.unsqueeze(1)


def class_score(logits: Tensor, targets: Tensor, kind: str | Tensor = "logit") -> Tensor:
    """The score of each image's class that a mask must keep, float32 ``(N,)``.

    ``logit`` is the reference's ``f_c``. ``log_odds`` is ``log p_c/(1 − p_c) = f_c − logsumexp_{k≠c} f_k``:
    it rises only where the class gains on the others, so in a scene of several objects the tile of
    another class keeps a class's logit but not its log-odds (issue 7), and it is monotone in the
    probability that deletion and insertion measure. A bool ``(N,)`` tensor picks ``log_odds`` for
    the rows where it is true and ``logit`` for the others.

    Example:
        >>> class_score(torch.tensor([[2., 0., 0.]]), torch.tensor([0]), "log_odds")
        tensor([1.3069])
        >>> class_score(torch.tensor([[2., 0., 0.]] * 2), torch.tensor([0, 0]), torch.tensor([True, False]))
        tensor([1.3069, 2.0000])
    """
    logits = logits.float()
    score = logits.gather(1, targets[:, None])[:, 0]
    if isinstance(kind, str) and kind == "logit":
        return score
    others = logits.scatter(1, targets[:, None], float("-inf")).logsumexp(dim=1)
    return score - others if isinstance(kind, str) else torch.where(kind, score - others, score)


def consistency_loss(masked_logit: Tensor, reference_logit: Tensor, weight: float) -> Tensor:
    """Activation consistency ``λ_c (f_c(x ⊙ Up(P)) − f_c(x))²``, one value per item ``(N,)``."""
    return weight * (masked_logit.float() - reference_logit.float()) ** 2


#: Smallest class evidence ``f_c(x) − f_c(x_0)`` a share of it is computed from.
MIN_EVIDENCE = 0.5


def evidence_loss(
    masked_logit: Tensor, reference_logit: Tensor, floor_logit: Tensor, weight: float, min_evidence: float
) -> Tensor:
    """One-sided consistency relative to the class's evidence, one value per item ``(N,)``::

        λ_e (max(0, f_c(x) − f_c(x ⊙ Up(P))) / max(f_c(x) − f_c(x_0), ε))²

    ``x_0`` is the stage input with everything removed (the substrate alone), so the denominator
    is the evidence the image holds for ``c``. A rise of the logit is not punished (in a scene of
    several objects, keeping only the class's object raises its logit), and the term has the same
    scale for a weak class as for the top class: losing all the evidence costs ``λ_e``.
    ``ε = min_evidence`` keeps the term finite for a class the image holds no evidence for.

    Example:
        >>> evidence_loss(torch.tensor([4., 12.]), torch.tensor([10., 10.]), torch.tensor([2., 2.]), 1.0, 0.5)
        tensor([0.5625, 0.0000])
    """
    evidence = (reference_logit.float() - floor_logit.float()).clamp_min(min_evidence)
    drop = (reference_logit.float() - masked_logit.float()).clamp_min(0)
    return weight * (drop / evidence) ** 2


def deletion_loss(
    left_logit: Tensor, empty_logit: Tensor, evidence: Tensor, weight: float, min_evidence: float
) -> Tensor:
    """The complement's share of the class's evidence, one value per item ``(N,)``::

        λ_d (max(0, f_c(x ⊙ (1 − Up(P))) − f_c(x_0)) / max(evidence, ε))²

    A mask that keeps the class's score may do so with regions that are not the class's evidence:
    on a mean-colour substrate a kept bright patch of sky reads as a spotlight, a few bright blobs
    as an abacus (issue 7, mosaics). Removing such regions takes nothing from the class, so the
    image without them still holds its evidence and this term stays high; it is low only when
    what the mask keeps is what the class needs (Fong and Vedaldi's preservation and deletion
    games, played by one mask). ``x_0`` is everything removed: the substrate alone, or the mean colour
    under ``deletion_substrate: mean`` (in the stage's score the share is then of the evidence over
    the substrate, and can exceed 1 where the substrate keeps less of the class than the mean colour
    does; under ``deletion_score: log_odds`` of the evidence over ``x_0``).

    Example:
        >>> deletion_loss(torch.tensor([6., 1.]), torch.tensor([2., 2.]), torch.tensor([8., 8.]), 1.0, 0.5)
        tensor([0.2500, 0.0000])
    """
    left = (left_logit.float() - empty_logit.float()).clamp_min(0)
    return weight * (left / evidence.float().clamp_min(min_evidence)) ** 2


def sparsity_loss(mask: Tensor, weight: float) -> Tensor:
    """Mask value constraint ``λ_1 mean|a_l|`` of the trainable level only, per item ``(N,)``."""
    return weight * mask.abs().flatten(1).mean(dim=1)


def smoothness_loss(mask: Tensor, weight: float) -> Tensor:
    """Squared differences between neighbouring elements of the trainable level, per item ``(N,)``::

        λ_s (Σ (a[i+1, j] − a[i, j])² + Σ (a[i, j+1] − a[i, j])²) / s²

    Not in the paper. Many masks keep a class's score about equally well; a quadratic penalty on
    their roughness makes the objective favour the smooth, compact one, so that the optimum rather
    than float rounding on Adam's path picks it (issue 7, stability). Per element its gradient is on
    the scale of the sparsity term's ``λ_1/s²``.

    Example:
        >>> smoothness_loss(torch.tensor([[[0., 1.], [0., 1.]]]), 1.0)  # two unit steps over 4 elements
        tensor([0.5000])
    """
    rows = (mask[..., 1:, :] - mask[..., :-1, :]).pow(2).flatten(1).sum(dim=1)
    cols = (mask[..., :, 1:] - mask[..., :, :-1]).pow(2).flatten(1).sum(dim=1)
    return weight * (rows + cols) / mask[0].numel()


def level_map(mask: Tensor, previous_map: Tensor | None, size: tuple[int, int], stretch: bool = True) -> Tensor:
    """``M_l = minmax(Up(a_l) ⊙ M_{l−1})`` with ``M_{-1} = 1``; ``(N, s, s) -> (N, H, W)``.

    With non-negative masks ``M_l`` is zero wherever ``M_{l−1}`` is: a fine level only refines
    what the coarse level kept. ``stretch=False`` leaves out the ``minmax``: the level map is then
    what the masks kept, on their own ``[0, 1]`` scale (``model.map_scale=mask``).
    """
    up = upsample(mask, size)
    product = up if previous_map is None else up * previous_map
    return minmax(product) if stretch else product.clamp(0, 1)


def sum_maps(maps: Tensor) -> Tensor:
    """``minmax(Σ_k minmax(m_k))`` over the first dim: ``(K, N, H, W) -> (N, H, W)``.

    The reference's normalised sum, for maps that do not yet share a scale (e.g. stage maps read
    from files); the engine's stage maps do, and go through :func:`cumulative`.
    """
    normalised = torch.stack([minmax(m) for m in maps])  # (K, N, H, W)
    return minmax(normalised.sum(dim=0))


def cumulative(stage_maps: Tensor) -> Tensor:
    """``C_t = minmax(Σ_{τ≤t} S_τ)``: ``(t, N, H, W) -> (N, H, W)``.

    The stage maps are not stretched first: they already share a scale (each one min-max
    normalised, or each on its masks' own scale), so a stage that found little adds little.

    Example:
        >>> cumulative(torch.tensor([[[[0., 1., 0.]]], [[[0., 0., 0.2]]]]))  # stage 2 found little, at pixel 3
        tensor([[[0.0000, 1.0000, 0.2000]]])
    """
    return minmax(stage_maps.sum(dim=0))


#: Values a map's floor is tried at (:func:`floor_map`), lowest first.
FLOOR_LEVELS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
#: What the values at or below the floor are multiplied by: their mass goes, their order stays.
BELOW_FLOOR = 1e-3


def floor_map(
    fused: Tensor, score: Callable[[Tensor], Tensor], tolerance: float, levels: tuple[float, ...] = FLOOR_LEVELS,
) -> tuple[Tensor, float, Tensor]:
    """The map ``(H, W)`` with its values up to its floor scaled by :data:`BELOW_FLOOR`; the floor; the
    scores it keeps ``(v,)``.

    The masks leave a faint floor over the image (the deletion term's first steps raise every element
    whose removal lowers the class at all, and the sparsity term does not bring all of them back to
    0 in the steps a level runs; issue 7); where the classifier shows it does not need it, its mass
    only takes the map's mass off the object. ``score`` maps kept images
    ``(k, H, W)`` to the class's score in each of ``v`` views ``(k, v)`` (a substrate and a score:
    what the masks kept, what the deletion term removed to). The floor is the highest of ``levels``,
    tried from the lowest, up to which the map with its values at or below the level scaled by
    :data:`BELOW_FLOOR` keeps every view's score within ``tolerance`` of that view's evidence (the score of the whole image
    over that of nothing kept) of what the whole map keeps; the first level that costs more ends the
    search. Values above the floor are unchanged and the map's order of pixels is kept: a map is read
    both as mass (the energy in a box, Average Drop) and as a ranking (deletion and insertion AUC),
    and the faint values still rank what the masks found there (cut to 0 they tie, and the curves
    follow the raster order: on seven photos insertion fell from 0.360 to 0.350). ``tolerance`` 0
    leaves the map as it is.

    Example:
        >>> fused = torch.tensor([[1.0, 0.3, 0.05, 0.0]])
        >>> score = lambda kept: (10 * kept[:, 0, 0] + 3 * kept[:, 0, 1])[:, None]  # pixel 2 holds a little
        >>> floor_map(fused, score, 0.05)  # the evidence is 13; cutting pixel 2 would cost 0.9 > 0.05 · 13
        (tensor([[1.0000e+00, 3.0000e-01, 5.0000e-05, 0.0000e+00]]), 0.2, tensor([10.9000]))
    """
    kept = score(fused[None])[0]
    if tolerance <= 0:
        return fused, 0.0, kept
    ends = score(torch.stack([torch.ones_like(fused), torch.zeros_like(fused)]))  # (2, v)
    allowed = kept - tolerance * (ends[0] - ends[1]).clamp_min(MIN_EVIDENCE)
    floor, floored = 0.0, fused
    for level in levels:
        if level >= float(fused.max()):
            break
        candidate = torch.where(fused > level, fused, BELOW_FLOOR * fused)
        candidate_kept = score(candidate[None])[0]
        if bool((candidate_kept < allowed).any()):
            break
        floor, floored, kept = level, candidate, candidate_kept
    return floored, floor, kept


def removal(found: Tensor, threshold: float = 1.0) -> Tensor:
    """How much of each pixel the next stage loses: ``clamp(C_t / threshold, 0, 1)``.

    ``threshold=1`` is the reference's soft removal ``x ⊙ (1 − C_t)``: only the map's maximum is
    removed entirely, a pixel at ``C_t = 0.5`` keeps half its contrast, and the class's evidence
    mostly survives. Below 1 every pixel at ``C_t ≥ threshold`` is removed entirely.

    Example:
        >>> removal(torch.tensor([0.0, 0.25, 0.5, 1.0]), 0.5)
        tensor([0.0000, 0.5000, 1.0000, 1.0000])
    """
    return (found / threshold).clamp(0, 1)


def smooth_removal(found: Tensor, threshold: float = 1.0) -> Tensor:
    """:func:`removal` with a smooth edge: ``1 − (1 − clamp(C / threshold, 0, 1))²``.

    Zero at 0 and 1 from ``threshold`` on, like :func:`removal`, but its slope falls to 0 at the
    threshold instead of dropping there from ``1 / threshold``: a gradient through it has no kink
    for the masks to chatter across.

    Example:
        >>> smooth_removal(torch.tensor([0.0, 0.25, 0.5, 1.0]), 0.5)
        tensor([0.0000, 0.7500, 1.0000, 1.0000])
    """
    return 1 - (1 - (found / threshold).clamp(0, 1)) ** 2


def rounded_removal(found: Tensor, threshold: float, width: float) -> Tensor:
    """:func:`removal` with its kink at the threshold rounded over ``x = C / threshold`` in ``1 ± width``.

    The slope is ``1 / threshold`` below ``1 − width``, falls linearly to 0 across the band and is 0
    above it (``x − (x − 1 + width)² / (4 width)`` inside), so the removal equals :func:`removal`
    outside the band and its gradient has no jump for the masks to chatter across.

    Example:
        >>> rounded_removal(torch.tensor([0.0, 0.2, 0.5, 1.0]), 0.5, 0.2)
        tensor([0.0000, 0.4000, 0.9500, 1.0000])
    """
    x = found / threshold
    inside = x - (x - 1 + width).clamp_min(0) ** 2 / (4 * width)
    return inside.masked_fill(x >= 1 + width, 1).clamp_min(0)


def floored_removal(found: Tensor, threshold: float, width: float, floor: float) -> Tensor:
    """:func:`rounded_removal` that removes nothing of a value at or below ``floor``.

    The ramp ``z = (C − floor) / (threshold − floor)`` runs from 0 at the floor to 1 at the threshold,
    and both of its kinks are rounded over ``z`` in ``± width`` (bottom) and ``1 ± width`` (top), so
    its slope rises from 0 to ``1 / (threshold − floor)`` across the bottom band. A gradient through
    it does not reach a mask element well below the floor: the deletion term cannot raise faint
    values over everything the class does not hold (issue 7's haze), and the sparsity term takes
    them to 0.

    Example:
        >>> floored_removal(torch.tensor([0.0, 0.2, 0.35, 0.5]), 0.5, 0.2, 0.2)
        tensor([0.0000, 0.0500, 0.5000, 0.9500])
    """
    z = (found - floor) / (threshold - floor)
    if not width:
        return z.clamp(0, 1)
    bottom = (z + width).clamp(0, 2 * width) ** 2 / (4 * width)  # the top band as rounded_removal's, mirrored
    return torch.where(z < width, bottom, rounded_removal(z, 1.0, width))


def strong_part(grad: Tensor, gate: float) -> Tensor:
    """The deletion term's gradient on each item's mask elements ``(k, s, s)``, its weak part dropped.

    Adam moves an element by about its rate whatever its gradient's size, so while the deletion term
    is unsatisfied it raises every element whose removal lowers the class at all: over a scene of
    several objects, a faint haze on the other objects (issue 7). An element keeps its gradient in
    full at ``gate`` of the row's largest ``|g|`` or more, none below half of that, and a linear share
    between (no jump for float noise to flip), so only the sparsity term moves the weak ones.

    Example:
        >>> strong_part(torch.tensor([[[1.0, -0.4, 0.3, 0.1]]]), 0.4)
        tensor([[[ 1.0000, -0.4000,  0.1500,  0.0000]]])
    """
    magnitude = grad.abs()
    peak = magnitude.flatten(1).amax(1).view(-1, *[1] * (grad.dim() - 1))
    return grad * (2 * magnitude / (gate * peak).clamp_min(torch.finfo(grad.dtype).tiny) - 1).clamp(0, 1)


def remove_found(
    images: Tensor, found: Tensor, mean: Tensor, std: Tensor
) -> Tensor:
    """Next stage's input ``x^(t+1) = x_rgb ⊙ (1 − C_t)``, in pixel space, re-normalised.

    Shapes: images ``(N, C, H, W)`` normalised, found ``(N, H, W)`` in ``[0, 1]``, mean and std
    ``(C,)``.
    """
    mean = mean.view(1, -1, 1, 1)
    std = std.view(1, -1, 1, 1)
    rgb = images * std + mean  # (N, C, H, W) in pixel space
    return (rgb * (1 - found).unsqueeze(1) - mean) / std
