r"""Maths of the saliency-map evaluation metrics, as pure functions on tensors.

Shapes throughout: ``images`` (N, C, H, W), already normalised for the classifier; ``maps``
(N, H, W) in [0, 1], higher meaning more important; ``targets`` (N,) class ids; ``masks``
(N, H, W) boolean ground truth. A ``classifier`` is any callable mapping images to logits
(N, K). Nothing here changes its inputs, moves devices or touches a model's mode.

Hyper-parameters have no defaults here: each lives once, in the metric class that exposes it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Classifier = Callable[[Tensor], Tensor]


# ------------------------------------------------------------------------------------ helpers
def class_probability(logits: Tensor, targets: Tensor) -> Tensor:
    r"""Softmax probability of each row's target class, :math:`\mathrm{softmax}(z)_c`.

    Args:
        logits: (N, K).
        targets: (N,) long.

    Returns:
        (N,) probabilities.

    Example:
        >>> class_probability(torch.tensor([[0.0, 0.0], [2.0, 0.0]]), torch.tensor([0, 1]))
        tensor([0.5000, 0.1192])
    """
    return logits.softmax(dim=1).gather(1, targets.unsqueeze(1)).squeeze(1)


def _safe_divide(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` where the denominator is positive, else 0."""
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, 1), 0)


def gaussian_blur(images: Tensor, kernel_size: int, sigma: float) -> Tensor:
    r"""Depthwise Gaussian blur with zero padding, as RISE's insertion substrate.

    The kernel is the normalised sampled Gaussian
    :math:`g_i \propto \exp(-i^2 / 2\sigma^2)`, :math:`|i| \le \lfloor k/2 \rfloor`, applied
    separably. (RISE builds its 11×11, σ=5 kernel with ``scipy.ndimage.gaussian_filter`` on a
    delta, whose reflected tails make it slightly flatter; the difference is a few per cent.)

    Args:
        images: (N, C, H, W).
        kernel_size: odd number of taps k.
        sigma: standard deviation in pixels.

    Returns:
        (N, C, H, W) blurred images.
    """
    channels = images.shape[1]
    offsets = torch.arange(kernel_size, device=images.device, dtype=images.dtype)
    offsets = offsets - (kernel_size - 1) / 2
    taps = torch.exp(-(offsets**2) / (2 * sigma**2))
    taps = taps / taps.sum()  # (k,)
    rows = taps.view(1, 1, 1, kernel_size).expand(channels, 1, 1, kernel_size)  # (C, 1, 1, k)
    cols = taps.view(1, 1, kernel_size, 1).expand(channels, 1, kernel_size, 1)  # (C, 1, k, 1)
    half = kernel_size // 2
    blurred = F.conv2d(images, rows, padding=(0, half), groups=channels)
    return F.conv2d(blurred, cols, padding=(half, 0), groups=channels)


def pixel_ranks(maps: Tensor) -> Tensor:
    """Rank of every pixel when ordered by map value, descending (0 = most important).

    Ties keep raster order (a stable sort), as ``np.argsort`` of the negated map in RISE.

    Args:
        maps: (N, H, W).

    Returns:
        (N, H, W) long ranks, a permutation of ``0 .. H·W-1`` per image.

    Example:
        >>> pixel_ranks(torch.tensor([[[0.1, 0.9], [0.5, 0.9]]]))
        tensor([[[3, 0],
                 [2, 1]]])
    """
    order = maps.flatten(1).argsort(dim=1, descending=True, stable=True)  # (N, HW)
    return order.argsort(dim=1).view_as(maps)  # inverse permutation, (N, H, W)


# ---------------------------------------------------------------- deletion and insertion (RISE)
@torch.no_grad()
def perturbation_curve(
    classifier: Classifier,
    start: Tensor,
    finish: Tensor,
    maps: Tensor,
    targets: Tensor,
    num_steps: int,
    batch_size: int,
) -> Tensor:
    r"""Class probability while pixels move from ``start`` to ``finish`` in map order.

    With :math:`r(p)` the rank of pixel :math:`p` (:func:`pixel_ranks`) and :math:`P = HW`,
    point :math:`i = 0 \dots n` of the curve is

    .. math:: y_i = \mathrm{softmax}\big(f(x_i)\big)_c, \qquad
              x_i = \begin{cases} \text{finish} & r(p) < \lfloor iP/n \rfloor \\
                                  \text{start} & \text{otherwise.} \end{cases}

    For 224×224 images and n = 224 this is RISE's ``step=224`` exactly. All (point, image)
    pairs are flattened and sent to the classifier ``batch_size`` at a time.

    Args:
        classifier: images (B, C, H, W) -> logits (B, K).
        start: (N, C, H, W) image at i = 0.
        finish: (N, C, H, W) image at i = n.
        maps: (N, H, W) saliency, higher first.
        targets: (N,) explained classes.
        num_steps: n, the number of intervals of the curve.
        batch_size: images per forward pass.

    Returns:
        (N, n + 1) probabilities.
    """
    num_images = start.shape[0]
    num_pixels = maps.shape[1] * maps.shape[2]
    ranks = pixel_ranks(maps)  # (N, H, W)
    points = torch.arange(num_steps + 1, device=maps.device)
    counts = points * num_pixels // num_steps  # (n+1,) pixels changed at each point
    point_of = points.repeat_interleave(num_images)  # ((n+1)·N,)
    image_of = torch.arange(num_images, device=maps.device).repeat(num_steps + 1)  # ((n+1)·N,)
    scores = []
    for first in range(0, point_of.numel(), batch_size):
        point = point_of[first : first + batch_size]  # (B,)
        image = image_of[first : first + batch_size]  # (B,)
        changed = ranks[image] < counts[point].view(-1, 1, 1)  # (B, H, W)
        inputs = torch.where(changed.unsqueeze(1), finish[image], start[image])  # (B, C, H, W)
        scores.append(class_probability(classifier(inputs), targets[image]))
    return torch.cat(scores).view(num_steps + 1, num_images).T  # (N, n+1)


def deletion_curve(
    classifier: Classifier,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    num_steps: int,
    batch_size: int,
) -> Tensor:
    """Deletion curve: the most important pixels are set to 0 (the dataset mean) first.

    See :func:`perturbation_curve` with ``start = images`` and ``finish = 0``.

    Returns:
        (N, num_steps + 1) probabilities.
    """
    return perturbation_curve(
        classifier, images, torch.zeros_like(images), maps, targets, num_steps, batch_size
    )


def insertion_curve(
    classifier: Classifier,
    images: Tensor,
    maps: Tensor,
    targets: Tensor,
    num_steps: int,
    batch_size: int,
    kernel_size: int,
    sigma: float,
) -> Tensor:
    """Insertion curve: original pixels replace a blurred copy, most important first.

    See :func:`perturbation_curve` with ``start = gaussian_blur(images)``, ``finish = images``.

    Returns:
        (N, num_steps + 1) probabilities.
    """
    blurred = gaussian_blur(images, kernel_size, sigma)
    return perturbation_curve(classifier, blurred, images, maps, targets, num_steps, batch_size)


def curve_auc(curve: Tensor) -> Tensor:
    r"""Normalised trapezoidal area under curves sampled at n + 1 even points of [0, 1].

    .. math:: \mathrm{AUC} = \frac{1}{n} \sum_{i=0}^{n-1} \frac{y_i + y_{i+1}}{2}

    Args:
        curve: (..., n + 1).

    Returns:
        (...) areas.

    Example:
        >>> curve_auc(torch.tensor([1.0, 0.5, 0.0]))
        tensor(0.5000)
    """
    num_steps = curve.shape[-1] - 1
    return (curve[..., :-1] + curve[..., 1:]).sum(dim=-1) / (2 * num_steps)


# ------------------------------------------------- average drop, increase in confidence
def explanation_images(images: Tensor, maps: Tensor) -> Tensor:
    r"""Grad-CAM++'s explanation map :math:`E = x \odot m`, taken in normalised space.

    A map value of 0 turns a pixel into 0, the dataset mean colour, rather than black.

    Args:
        images: (N, C, H, W).
        maps: (N, H, W).

    Returns:
        (N, C, H, W).
    """
    return images * maps.unsqueeze(1)


def confidence_drop(probs: Tensor, explained_probs: Tensor) -> Tensor:
    r"""Per-image drop in confidence, in per cent: :math:`100 \max(0, Y_c - O_c) / Y_c`.

    Args:
        probs: (N,) :math:`Y_c`, on the images.
        explained_probs: (N,) :math:`O_c`, on the explanation images.

    Returns:
        (N,) drops in [0, 100].

    Example:
        >>> confidence_drop(torch.tensor([0.8, 0.5]), torch.tensor([0.2, 0.6]))
        tensor([75.,  0.])
    """
    drop = (probs - explained_probs).clamp_min(0)
    return 100 * drop / probs.clamp_min(torch.finfo(probs.dtype).tiny)


def confidence_increase(probs: Tensor, explained_probs: Tensor) -> Tensor:
    r"""Per-image indicator :math:`[O_c > Y_c]` of Increase in Confidence.

    Returns:
        (N,) bool.
    """
    return explained_probs > probs


# ---------------------------------------------------------------------------- pointing games
def map_points(maps: Tensor) -> Tensor:
    """Row and column of each map's maximum (the first one in raster order on ties).

    Args:
        maps: (N, H, W).

    Returns:
        (N, 2) long ``(row, col)``.

    Example:
        >>> map_points(torch.tensor([[[0.0, 0.2], [0.7, 0.1]]]))
        tensor([[1, 0]])
    """
    flat = maps.flatten(1).argmax(dim=1)  # (N,)
    width = maps.shape[2]
    return torch.stack((flat // width, flat % width), dim=1)


def pointing_hits(maps: Tensor, masks: Tensor, tolerance: float) -> Tensor:
    r"""TorchRay pointing game: a hit when ground truth lies strictly within ``tolerance``.

    .. math:: \mathrm{hit} = \exists p \in G:\ \lVert p - \arg\max m \rVert_2 < \tau

    Args:
        maps: (N, H, W).
        masks: (N, H, W) bool ground truth G.
        tolerance: τ in pixels.

    Returns:
        (N,) bool hits (always False where the mask is empty).

    Example:
        >>> maps = torch.zeros(1, 5, 5); maps[0, 0, 0] = 1
        >>> masks = torch.zeros(1, 5, 5, dtype=torch.bool); masks[0, 0, 3] = True
        >>> pointing_hits(maps, masks, 3.0), pointing_hits(maps, masks, 3.5)
        (tensor([False]), tensor([True]))
    """
    _, height, width = maps.shape
    point = map_points(maps)  # (N, 2)
    rows = torch.arange(height, device=maps.device).view(1, height, 1)
    cols = torch.arange(width, device=maps.device).view(1, 1, width)
    distance2 = (rows - point[:, :1, None]) ** 2 + (cols - point[:, 1:, None]) ** 2  # (N, H, W)
    accept = distance2 < tolerance**2
    return (accept & masks).flatten(1).any(dim=1)


def energy_pointing(maps: Tensor, masks: Tensor) -> Tensor:
    r"""Score-CAM's energy-based pointing game: the share of the map inside the ground truth.

    .. math:: \mathrm{proportion} = \frac{\sum_{p \in G} m_p}{\sum_p m_p}

    Args:
        maps: (N, H, W), non-negative.
        masks: (N, H, W) bool.

    Returns:
        (N,) proportions in [0, 1]; 0 for an all-zero map.

    Example:
        >>> maps = torch.tensor([[[1.0, 3.0], [0.0, 0.0]]])
        >>> energy_pointing(maps, torch.tensor([[[False, True], [True, True]]]))
        tensor([0.7500])
    """
    inside = (maps * masks).flatten(1).sum(dim=1)
    return _safe_divide(inside, maps.flatten(1).sum(dim=1))


# ---------------------------------------------------------------- localisation at top p %
def top_percent_masks(maps: Tensor, percents: Tensor) -> Tensor:
    r"""Binarise each map at its top p % of pixels, for every p.

    With :math:`k_p = \mathrm{round}(p\,HW/100)` (at least 1) and :math:`t_p` the
    :math:`k_p`-th largest value, the binary map is :math:`m \ge t_p`. Pixels tied with
    :math:`t_p` are all kept, as thresholding at the (100 − p)-th percentile does.

    Args:
        maps: (N, H, W).
        percents: (P,) values in (0, 100].

    Returns:
        (N, P, H·W) bool.
    """
    flat = maps.flatten(1)  # (N, HW)
    num_pixels = flat.shape[1]
    # float32 whatever the dtype of percents: p·HW/100 overflows float16 on large images
    counts = torch.round(percents.float() * num_pixels / 100).long().clamp(1, num_pixels)  # (P,)
    thresholds = flat.sort(dim=1, descending=True).values[:, counts - 1]  # (N, P)
    return flat.unsqueeze(1) >= thresholds.unsqueeze(2)  # (N, P, HW)


def top_percent_scores(maps: Tensor, masks: Tensor, percents: Tensor) -> dict[str, Tensor]:
    r"""Dice, IoU, precision and sensitivity of the top-p % binary maps B against G.

    .. math:: \mathrm{Dice} = \frac{2|B \cap G|}{|B| + |G|}, \quad
              \mathrm{IoU} = \frac{|B \cap G|}{|B \cup G|}, \quad
              \mathrm{PPV} = \frac{|B \cap G|}{|B|}, \quad
              \mathrm{TPR} = \frac{|B \cap G|}{|G|}

    Args:
        maps: (N, H, W).
        masks: (N, H, W) bool.
        percents: (P,) values in (0, 100].

    Returns:
        ``dice``, ``iou``, ``precision``, ``sensitivity``: each (N, P); 0 where |G| = 0.

    Example:
        >>> maps = torch.tensor([[[0.9, 0.8], [0.1, 0.0]]])
        >>> masks = torch.tensor([[[True, False], [True, False]]])
        >>> scores = top_percent_scores(maps, masks, torch.tensor([25.0, 50.0]))
        >>> scores["dice"], scores["iou"]
        (tensor([[0.6667, 0.5000]]), tensor([[0.5000, 0.3333]]))
    """
    binary = top_percent_masks(maps, percents)  # (N, P, HW)
    truth = masks.flatten(1).unsqueeze(1)  # (N, 1, HW)
    # pixel counts in float32: float16 cannot hold them exactly
    overlap = (binary & truth).sum(dim=2).float()  # (N, P)
    predicted = binary.sum(dim=2).float()  # (N, P)
    actual = truth.sum(dim=2).float()  # (N, 1)
    return {
        "dice": _safe_divide(2 * overlap, predicted + actual),
        "iou": _safe_divide(overlap, predicted + actual - overlap),
        "precision": _safe_divide(overlap, predicted),
        "sensitivity": _safe_divide(overlap, actual.expand_as(overlap)),
    }


# ------------------------------------------------------------------------ max-sensitivity
def max_sensitivity(maps: Tensor, perturbed_maps: Tensor) -> Tensor:
    r"""Max-sensitivity of Yeh et al. (2019), normalised by the map's norm as in Captum.

    .. math:: \mathrm{SENS}_{\max} = \max_{s} \frac{\lVert \Phi(x + \delta_s) - \Phi(x) \rVert_2}
                                                {\lVert \Phi(x) \rVert_2}

    An all-zero :math:`\Phi(x)` is divided by 1 instead.

    Args:
        maps: (N, H, W) :math:`\Phi(x)`.
        perturbed_maps: (S, N, H, W) :math:`\Phi(x + \delta_s)`.

    Returns:
        (N,) sensitivities.

    Example:
        >>> maps = torch.tensor([[[3.0, 4.0]]])
        >>> max_sensitivity(maps, torch.stack([maps + 1, maps - 0.5]))
        tensor([0.2828])
    """
    change = (perturbed_maps - maps.unsqueeze(0)).flatten(2).norm(dim=2)  # (S, N)
    norm = maps.flatten(1).norm(dim=1)  # (N,)
    return change.amax(dim=0) / torch.where(norm > 0, norm, 1)


# ------------------------------------------------------------- rank correlation (sanity check)
def average_ranks(values: Tensor) -> Tensor:
    """1-based ranks along the last dimension, ties sharing their average rank.

    A value with L smaller and E equal values (itself included) gets ``L + (E + 1) / 2``.

    Args:
        values: (N, P).

    Returns:
        (N, P) ranks, in float32 or float64 (float16 cannot count the pixels of an image).

    Example:
        >>> average_ranks(torch.tensor([[0.3, 0.1, 0.3, 0.2]]))
        tensor([[3.5000, 1.0000, 3.5000, 2.0000]])
    """
    ordered = values.sort(dim=1).values.contiguous()
    values = values.contiguous()
    below = torch.searchsorted(ordered, values, right=False)  # (N, P) count of smaller values
    up_to = torch.searchsorted(ordered, values, right=True)  # (N, P) count of values <= it
    dtype = torch.promote_types(values.dtype, torch.float32)
    return (below + up_to + 1).to(dtype) / 2


def spearman(maps: Tensor, other_maps: Tensor) -> Tensor:
    r"""Spearman rank correlation between two maps of each image (ties: average ranks).

    .. math:: \rho = \frac{\sum_p (r_p - \bar r)(s_p - \bar s)}
                          {\sqrt{\sum_p (r_p - \bar r)^2 \sum_p (s_p - \bar s)^2}}

    Args:
        maps: (N, H, W).
        other_maps: (N, H, W).

    Returns:
        (N,) correlations in [-1, 1]; 0 when either map is constant.

    Example:
        >>> a = torch.tensor([[[0.1, 0.2], [0.3, 0.4]]])
        >>> spearman(a, a ** 2), spearman(a, 1 - a)
        (tensor([1.]), tensor([-1.]))
    """
    num_pixels = maps.shape[1] * maps.shape[2]
    # ranks scaled to (0, 1] keep the float32 sums below well conditioned
    ranks = average_ranks(maps.flatten(1)) / num_pixels  # (N, HW)
    other = average_ranks(other_maps.flatten(1)) / num_pixels  # (N, HW)
    ranks = ranks - ranks.mean(dim=1, keepdim=True)
    other = other - other.mean(dim=1, keepdim=True)
    covariance = (ranks * other).sum(dim=1)
    scale = (ranks.square().sum(dim=1) * other.square().sum(dim=1)).sqrt()
    return _safe_divide(covariance, scale)
