"""Model-randomisation sanity check (Adebayo et al., 2018)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from hdm_lightning.metrics.functional import spearman

Explain = Callable[[Tensor, Tensor], Tensor]
ExplainFactory = Callable[[nn.Module], Explain]


def parameterised_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that own parameters directly, in registration order (input side first)."""
    return [m for m in model.modules() if next(m.parameters(recurse=False), None) is not None]


def randomised_copy(model: nn.Module, num_layers: int, seed: int) -> nn.Module:
    """A deep copy of ``model`` whose last ``num_layers`` parameterised modules are re-initialised.

    Each module gets its own ``reset_parameters`` (PyTorch's default initialisation, running
    statistics included for batch norm), drawn on the CPU with torch's generator seeded with
    ``seed`` inside ``fork_rng``, so the global random state is left as it was. The copy keeps
    the model's device, mode and ``requires_grad`` flags; ``model`` itself is not touched.
    """
    randomised = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        for module in parameterised_modules(randomised)[-num_layers:]:
            fresh = copy.deepcopy(module).cpu()
            fresh.reset_parameters()
            module.load_state_dict(fresh.state_dict())
    return randomised


class ModelRandomisation(Metric):
    r"""Mean Spearman correlation between maps of the model and of a partly randomised copy.

    .. math:: \bar\rho = \frac{1}{N} \sum_i \rho\big(\Phi_f(x_i, c_i),\,
              \Phi_{\tilde f}(x_i, c_i)\big)

    where :math:`\tilde f` is :math:`f` with its top ``num_layers`` parameterised modules
    re-initialised (the last ones in registration order: for torchvision classifiers the head,
    then the last blocks). A method that explains the model should score well below 1; ranks
    of tied pixels are averaged, as ``scipy.stats.spearmanr`` does. Adebayo et al.'s cascading
    test is one instance per ``num_layers``, e.g. in a ``MetricCollection``.

    Args:
        model: the frozen classifier, already on its device; it is deep-copied at
            construction, never modified.
        explain_factory: ``explain_factory(model) -> explain``, where
            ``explain(images, targets) -> maps`` (N, H, W); called once for ``model`` and once
            for the copy, at construction. Maps are computed with gradients enabled.
        num_layers: how many of the last parameterised modules are re-initialised.
        seed: seed of the re-initialisation.
        kwargs: see torchmetrics' ``Metric``.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.Flatten())
        >>> factory = lambda m: (lambda x, c: m(x).view(-1, 4, 4))
        >>> metric = ModelRandomisation(model, factory, num_layers=1)
        >>> metric.update(torch.randn(2, 1, 4, 4), torch.tensor([0, 0]))
        >>> bool(-1 <= metric.compute() <= 1)
        True
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    correlation_sum: Tensor
    total: Tensor

    def __init__(
        self,
        model: nn.Module,
        explain_factory: ExplainFactory,
        num_layers: int = 1,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        modules = parameterised_modules(model)
        if not 1 <= num_layers <= len(modules):
            raise ValueError(
                f"num_layers must be in 1..{len(modules)}, the modules with parameters, "
                f"got {num_layers}"
            )
        top = modules[-num_layers:]
        lacking = [type(m).__name__ for m in top if not hasattr(m, "reset_parameters")]
        if lacking:
            raise ValueError(
                f"num_layers={num_layers} reaches modules without reset_parameters: {lacking}"
            )
        self.num_layers = num_layers
        self.seed = seed
        # kept out of nn.Module registration: the metric must not move, train or save the
        # models behind the callables
        object.__setattr__(self, "explain", explain_factory(model))
        object.__setattr__(self, "randomised", randomised_copy(model, num_layers, seed))
        object.__setattr__(self, "explain_randomised", explain_factory(self.randomised))
        self.add_state("correlation_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, images: Tensor, targets: Tensor) -> None:
        """Add a batch.

        Args:
            images: (N, C, H, W) normalised images.
            targets: (N,) explained classes.
        """
        with torch.enable_grad():
            maps = self.explain(images, targets).detach()  # (N, H, W)
            randomised_maps = self.explain_randomised(images, targets).detach()  # (N, H, W)
        self.correlation_sum += spearman(maps, randomised_maps).sum()
        self.total += targets.shape[0]

    def compute(self) -> Tensor:
        """Mean Spearman correlation over all images seen."""
        return self.correlation_sum / self.total
