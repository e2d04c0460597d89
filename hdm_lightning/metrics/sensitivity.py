"""Max-sensitivity of an explanation method (Yeh et al., 2019)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from hdm_lightning.metrics.functional import max_sensitivity

Explain = Callable[[Tensor, Tensor], Tensor]


class MaxSensitivity(Metric):
    r"""Mean over images of the largest relative change of the map under small input noise.

    .. math:: \mathrm{SENS}_{\max} = \max_{s = 1 \dots S}
              \frac{\lVert \Phi(x + \delta_s) - \Phi(x) \rVert_2}{\lVert \Phi(x) \rVert_2},
              \qquad \delta_s \sim \mathcal{U}[-r, r]^{C \times H \times W}

    The noise is drawn in normalised units: the default r = 0.2 is about 0.045 in [0, 1]
    pixel units (11/255) with ImageNet's standard deviations, and is Quantus' default
    radius. Captum's ``sensitivity_max`` computes the same with r = 0.02. The explained class
    stays the one given, not the prediction on the noisy image.

    Args:
        explain: ``explain(images, targets) -> maps`` (N, H, W); called with gradients enabled,
            so gradient-based methods work (not under ``torch.inference_mode``).
        radius: r, half-width of the L∞ ball of the noise, in normalised units.
        num_samples: S, the number of noisy copies per image.
        seed: seed of the metric's own noise generator; None draws from torch's global one.
        kwargs: see torchmetrics' ``Metric``.

    Example:
        >>> metric = MaxSensitivity(lambda x, c: x.mean(dim=1) + 10, radius=0.5, seed=0)
        >>> metric.update(torch.zeros(2, 3, 4, 4), torch.tensor([0, 1]))
        >>> bool(0 < metric.compute() < 0.5 * 4 / 40)  # ||δ̄|| / ||Φ(x)|| < r·4 / 40
        True
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    sensitivity_sum: Tensor
    total: Tensor

    def __init__(
        self,
        explain: Explain,
        radius: float = 0.2,
        num_samples: int = 10,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if radius <= 0:
            raise ValueError(f"radius must be positive, got {radius}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
        # kept out of nn.Module registration: the metric must not move, train or save a
        # caller's module hiding behind the callable
        object.__setattr__(self, "explain", explain)
        self.radius = radius
        self.num_samples = num_samples
        self.seed = seed
        self._generator: torch.Generator | None = None
        self.add_state("sensitivity_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def _noise(self, images: Tensor) -> Tensor:
        """Uniform noise in [-r, r] shaped like ``images``, from the seeded generator if any."""
        if self.seed is not None and self._generator is None:
            self._generator = torch.Generator(device=images.device)
            self._generator.manual_seed(self.seed)
        noise = torch.empty_like(images).uniform_(-1, 1, generator=self._generator)
        return self.radius * noise

    def _maps(self, images: Tensor, targets: Tensor) -> Tensor:
        with torch.enable_grad():
            return self.explain(images, targets).detach()

    def update(self, images: Tensor, targets: Tensor) -> None:
        """Add a batch.

        Args:
            images: (N, C, H, W) normalised images.
            targets: (N,) explained classes.
        """
        maps = self._maps(images, targets)  # (N, H, W)
        perturbed = torch.stack(
            [self._maps(images + self._noise(images), targets) for _ in range(self.num_samples)]
        )  # (S, N, H, W)
        sensitivity = max_sensitivity(maps, perturbed)  # (N,)
        self.sensitivity_sum += sensitivity.sum()
        self.total += targets.shape[0]

    def compute(self) -> Tensor:
        """Mean max-sensitivity over all images seen."""
        return self.sensitivity_sum / self.total
