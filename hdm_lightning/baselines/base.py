"""One adapter for every baseline saliency method: ``classifier + images + targets -> maps``.

:meth:`Baseline.explain` is the only entry point. It checks the inputs, runs the subclass's
:meth:`Baseline.attribute` with gradients enabled (even when called under ``torch.no_grad`` or
``torch.inference_mode``, as in a Lightning predict loop), restores everything a method may touch
on the classifier (module modes, ``requires_grad``, ``.grad``) and min-max normalises each map.
A new baseline is one short subclass that overrides :meth:`Baseline.attribute` only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from hdm_lightning.masks import minmax


def require(ok: bool, name: str, value: object, allowed: str) -> None:
    """Raise ``ValueError`` naming a setting, its value and what is allowed unless ``ok``.

    Example:
        >>> require(3 > 0, "steps", 3, "a positive int")
        >>> require(0 > 0, "steps", 0, "a positive int")
        Traceback (most recent call last):
        ...
        ValueError: steps=0 is invalid: expected a positive int
    """
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: expected {allowed}")


@contextmanager
def untouched(classifier: nn.Module) -> Iterator[None]:
    """Freeze ``classifier`` for the block, then restore modes, ``requires_grad`` and ``.grad``.

    Methods only need gradients with respect to inputs or activations, so parameters are frozen
    while they run; third-party code that calls ``model.eval()`` or ``model.zero_grad()``
    (pytorch-grad-cam does both) is undone on exit, even if the block raises.
    """
    modes = [(module, module.training) for module in classifier.modules()]
    params = [(p, p.requires_grad, p.grad) for p in classifier.parameters()]
    try:
        for p, _, _ in params:
            p.requires_grad_(False)
        yield
    finally:
        for module, training in modes:
            module.training = training
        for p, requires_grad, grad in params:
            p.requires_grad_(requires_grad)
            p.grad = grad


def _check_inputs(images: Tensor, targets: Tensor) -> None:
    require(images.ndim == 4 and images.is_floating_point(), "images", tuple(images.shape),
            "a float tensor of shape (N, C, H, W)")
    require(targets.shape == images.shape[:1] and targets.dtype == torch.long, "targets",
            (tuple(targets.shape), targets.dtype), f"a long tensor of shape ({images.shape[0]},)")


class Baseline(ABC):
    """A saliency method that explains a frozen classifier's decision for target classes.

    Example:
        >>> class Brightness(Baseline):  # a toy method: importance = summed input
        ...     def attribute(self, classifier, images, targets):
        ...         return images.sum(dim=1)
        >>> Brightness().explain(nn.Identity(), torch.tensor([[[[1., 3.]]]]), torch.tensor([0]))
        tensor([[[0., 1.]]])
    """

    def explain(self, classifier: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        """Saliency maps of ``classifier`` for ``targets``.

        Args:
            classifier: frozen classifier in eval mode, returning logits ``(N, K)``; it is left
                exactly as it was given.
            images: ``(N, C, H, W)`` images, already normalised for the classifier.
            targets: ``(N,)`` long class indices to explain.

        Returns:
            ``(N, H, W)`` float32 maps in ``[0, 1]`` (min-max per image, higher = more
            important) on the images' device.
        """
        _check_inputs(images, targets)
        # Inference tensors cannot enter autograd: clone them outside inference mode.
        with untouched(classifier), torch.inference_mode(False), torch.enable_grad():
            raw = self.attribute(classifier, images.detach().clone(), targets.to(images.device, copy=True))
        return minmax(raw.detach().float()).to(images.device)  # (N, H, W)

    @abstractmethod
    def attribute(self, classifier: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        """Unnormalised importance ``(N, H, W)`` for ``(N, C, H, W)`` images; higher = more important.

        Called by :meth:`explain` with gradients enabled and the classifier's parameters frozen;
        ``images`` and ``targets`` are private copies the method may modify.
        """
