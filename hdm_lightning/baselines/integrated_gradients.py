"""Integrated Gradients (Sundararajan et al., ICML 2017) through captum."""

from __future__ import annotations

from torch import Tensor, nn

from hdm_lightning.baselines.base import Baseline, require


class IntegratedGradients(Baseline):
    """``(x − x') ⊙ ∫_0^1 ∂f_c(x' + α(x − x'))/∂x dα`` with the baseline ``x' = 0``.

    The baseline is zero in normalised space, i.e. the dataset mean colour. Attributions are
    reduced over channels by summing their absolute values (default): in normalised space the
    channels' signs often cancel, and a saliency map ranks pixels by how much they matter, not
    in which direction. ``absolute=False`` sums the signed attributions instead, so pixels that
    speak against the class get the lowest values.

    Args:
        n_steps: points of the Gauss-Legendre quadrature along the path.
        internal_batch_size: path points per forward pass; ``None`` evaluates all at once.
        absolute: sum ``|attr|`` over channels (``True``) or signed ``attr`` (``False``).
    """

    def __init__(
        self, n_steps: int = 50, internal_batch_size: int | None = None, absolute: bool = True
    ) -> None:
        require(n_steps >= 1, "n_steps", n_steps, "an int >= 1")
        require(internal_batch_size is None or internal_batch_size >= 1, "internal_batch_size",
                internal_batch_size, "None or an int >= 1")
        self.n_steps = n_steps
        self.internal_batch_size = internal_batch_size
        self.absolute = absolute

    def attribute(self, classifier: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        from captum.attr import IntegratedGradients as _CaptumIG  # optional ("eval" extra) and slow to import

        attr = _CaptumIG(classifier).attribute(
            images, baselines=0.0, target=targets, n_steps=self.n_steps,
            internal_batch_size=self.internal_batch_size,
        )  # (N, C, H, W)
        return (attr.abs() if self.absolute else attr).sum(dim=1)  # (N, H, W)
