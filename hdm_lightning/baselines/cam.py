"""Class activation maps through pytorch-grad-cam, and how their target layer is chosen.

:class:`CAMBaseline` runs any ``pytorch_grad_cam`` method on one layer of the classifier and
always releases the hooks that library registers; a subclass only says which CAM to build
(:meth:`CAMBaseline.make_cam`). pytorch-grad-cam (the ``eval`` extra) is imported only when a
CAM is built: it pulls in torchvision and scikit-learn, too slow for every import of the package.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from hdm_lightning.baselines.base import Baseline, require

if TYPE_CHECKING:
    from pytorch_grad_cam.base_cam import BaseCAM


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def find_target_layer(model: nn.Module) -> str:
    """Dotted path of the default CAM layer: the last child of ``model`` that contains a conv.

    Wrappers are looked through: while exactly one child contains ``nn.Conv2d`` layers (say a
    normalisation layer followed by the network, or VGG's ``features``) the search descends into
    it. So a ResNet gives ``layer4``, ``Sequential(Normalize, resnet)`` gives ``1.layer4`` and a
    plain stack of layers gives its last conv.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Conv2d(4, 4, 3)),
        ...                     nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
        >>> find_target_layer(net)
        '2'
        >>> find_target_layer(nn.Sequential(nn.Identity(), net))
        '1.2'

    Raises:
        ValueError: if ``model`` holds no ``nn.Conv2d``.
    """
    path: list[str] = []
    module = model
    while True:
        candidates = [(name, child) for name, child in module.named_children() if _has_conv(child)]
        if not candidates:
            break
        name, module = candidates[-1]
        path.append(name)
        if len(candidates) > 1:
            break
    require(bool(path), "target_layer", None, "a dotted module path; the model has no nn.Conv2d")
    return ".".join(path)


class CAMBaseline(Baseline):
    """Base of the pytorch-grad-cam methods.

    Args:
        target_layer: dotted path of the layer whose activations are weighted (e.g.
            ``"layer4"``); ``None`` picks one with :func:`find_target_layer`.
    """

    def __init__(self, target_layer: str | None = None) -> None:
        require(target_layer is None or bool(target_layer), "target_layer", target_layer,
                "None or a non-empty dotted module path")
        self.target_layer = target_layer

    @abstractmethod
    def make_cam(self, classifier: nn.Module, layer: nn.Module) -> BaseCAM:
        """The pytorch-grad-cam object for ``layer`` of ``classifier``."""

    def attribute(self, classifier: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cam = self.make_cam(classifier, self._layer(classifier))
        try:
            # The classifier is frozen: gradients reach the layer only through the input.
            maps = cam(images.requires_grad_(True), [ClassifierOutputTarget(t) for t in targets.tolist()])
        finally:
            cam.activations_and_grads.release()
        return torch.from_numpy(maps).to(images.device)  # (N, H, W)

    def _layer(self, classifier: nn.Module) -> nn.Module:
        path = self.target_layer or find_target_layer(classifier)
        try:
            return classifier.get_submodule(path)
        except AttributeError as error:
            raise ValueError(f"target_layer={path!r} is invalid: no such submodule ({error})") from error
