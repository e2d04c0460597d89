"""Python API: explain a batch of tensors from a notebook, and a Captum-style attribution class.

``explain(classifier, images)`` runs the same engine as ``train_masks.py`` (the mask pool, the
schedule, a Lightning ``Trainer`` on the classifier's device) on tensors instead of files, and
returns the maps as tensors; nothing is written outside a temporary folder, which is removed.
:class:`HDM` wraps it in Captum's ``attribute`` interface, and :func:`quantus_explain` in Quantus's
``explain_func`` one.

Example (a notebook, the packaged EfficientNet-Lite0, ``x`` a normalised ``(N, 3, 224, 224)``)::

    from hdm_lightning import explain
    result = explain(model, x)                       # the defaults (configs/fine.yaml)
    result["maps"].shape                             # (N, 224, 224), in [0, 1]
    HDM(model).attribute(x, target=207).shape        # (N, 1, 224, 224), for Captum and Quantus
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import tempfile
import warnings
from itertools import chain
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from lightning.pytorch import Callback, LightningDataModule, Trainer
from torch import Tensor, nn

from hdm_lightning.callbacks import HDMSchedule
from hdm_lightning.data import IMAGENET_MEAN, IMAGENET_STD, ImageRecord, StepStream
from hdm_lightning.models import layout_advice
from hdm_lightning.module import MaskExplainer

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
SCHEDULE_DEFAULTS = {name: p.default for name, p in inspect.signature(HDMSchedule).parameters.items()}
#: Lightning warnings that an in-notebook run triggers by design.
QUIET = (r".*module\(s\) in eval mode.*", r".*does not have many workers.*", r".*LeafSpec.*")


class TensorInputs(LightningDataModule):
    """The images of an :func:`explain` call, served to :class:`HDMSchedule` like files would be."""

    def __init__(self, images: Tensor, targets: Tensor, batch_size: int) -> None:
        super().__init__()
        self.images, self.targets, self.batch_size = images, targets, batch_size
        self.records = [ImageRecord(path=f"tensor:{i}", name=f"image{i}") for i in range(len(images))]

    def shard(self, rank: int, world_size: int) -> list[int]:
        return list(range(rank, len(self.records), world_size))

    def rejected_share(self, rank: int, world_size: int) -> int:
        return 0  # tensors are checked before the run starts

    def batch(self, indices: list[int]) -> dict:
        return {"images": self.images[indices], "targets": self.targets[indices], "indices": indices, "failed": []}

    def train_dataloader(self):
        return torch.utils.data.DataLoader(StepStream(), batch_size=None)


class Collect(Callback):
    """Takes the finished explanations from the module (in place of the run folder's writer)."""

    def __init__(self) -> None:
        self.results: dict[str, Any] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        while pl_module.finished:
            explanation = pl_module.finished.pop(0)
            self.results[explanation.name] = explanation


class ForwardFunction(nn.Module):
    """A plain ``forward_func`` (Captum's name) as a module, so that it can be the classifier."""

    def __init__(self, forward_func: Callable[[Tensor], Tensor]) -> None:
        super().__init__()
        self.forward_func = forward_func

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_func(images)


def preset_settings(preset: str) -> dict[str, Any]:
    """The ``model`` and ``schedule`` settings of ``configs/<preset>.yaml``, flat."""
    path = CONFIGS / f"{preset}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
        raise ValueError(f"preset {preset!r} unknown; choose one of {known}")
    config = yaml.safe_load(path.read_text()) or {}
    return {**config.get("model", {}), **config.get("schedule", {})}


def split_settings(settings: dict[str, Any]) -> tuple[dict, dict, dict]:
    """Settings by owner: the module, the schedule, the run (``batch_size``, ``precision``)."""
    model_keys = set(inspect.signature(MaskExplainer).parameters) - {"classifier"}
    schedule_keys = set(inspect.signature(HDMSchedule).parameters) - {"out_dir"}
    run_keys = {"batch_size", "precision"}
    unknown = sorted(set(settings) - model_keys - schedule_keys - run_keys)
    if unknown:
        raise ValueError(f"explain: unknown settings {unknown}; settings are the names of --model.*, --schedule.*, "
                         f"batch_size and precision")
    pick = lambda keys: {k: v for k, v in settings.items() if k in keys}  # noqa: E731
    return pick(model_keys), pick(schedule_keys), pick(run_keys)


def explain(
    classifier: nn.Module | Callable[[Tensor], Tensor],
    images: Tensor,
    targets: Tensor | list[int] | int | None = None,
    preset: str = "fine",
    **overrides: Any,
) -> dict[str, Tensor]:
    """HDM maps of a batch of images, on the classifier's device.

    Args:
        classifier: a module (or function) from normalised images ``(N, C, H, W)`` to logits.
        images: normalised images ``(N, C, H, W)``; ``mean`` and ``std`` (ImageNet by default) say
            how they were normalised, for the removal of found regions in pixel space.
        targets: class per image (a tensor, a list or one int); None: each image's top-1 class.
        preset: ``fine`` (the defaults), ``fast`` (half the passes), ``paper``, ``mdm``, …
            (``configs/<preset>.yaml``).
        overrides: any ``--model.*`` or ``--schedule.*`` setting by its name (``stages=2``,
            ``lr=0.01``, ``max_items=64``, ``mean=...``), ``batch_size`` (images in flight; default
            all) and ``precision`` (a Lightning precision, default ``32-true``).

    Returns:
        ``maps`` ``(N, H, W)`` fused maps in ``[0, 1]``; ``stage_maps`` ``(N, T, H, W)`` (stages an
        image did not run are zero); ``logits`` ``(N,)`` the target scores on the images (logits,
        or log-odds under ``model.score=log_odds``);
        ``masked_logits`` ``(N,)`` those on the images kept by the maps; ``targets`` ``(N,)``.
    """
    if images.ndim != 4:
        raise ValueError(f"explain: images must be (N, C, H, W), got shape {tuple(images.shape)}")
    module = classifier if isinstance(classifier, nn.Module) else ForwardFunction(classifier)
    device = images.device
    count = images.shape[0]
    targets = resolve_targets(targets, count)
    model_settings, schedule_settings, run = split_settings({**preset_settings(preset), **overrides})
    model_settings.setdefault("lr_horizon", schedule_settings.get("max_steps", SCHEDULE_DEFAULTS["max_steps"]))
    model_settings.setdefault("mean", IMAGENET_MEAN)
    model_settings.setdefault("std", IMAGENET_STD)
    state = {name: p.requires_grad for name, p in module.named_parameters()}, module.training, strides_of(module)
    with tempfile.TemporaryDirectory(prefix="hdm-") as folder, warnings.catch_warnings(), quiet_lightning():
        for message in QUIET:
            warnings.filterwarnings("ignore", message=message)
        model = MaskExplainer(classifier=module, **model_settings)
        collect = Collect()
        schedule = HDMSchedule(out_dir=folder, **schedule_settings)
        trainer = Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu", devices=[device.index or 0] if device.type == "cuda"
            else 1, precision=run.get("precision", "32-true"), logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, max_epochs=-1, callbacks=[schedule, collect],
            default_root_dir=folder,
        )
        data = TensorInputs(images.detach().cpu(), targets, run.get("batch_size", count))
        try:
            trainer.fit(model, datamodule=data)
        except RuntimeError as error:
            if not layout_advice(error):
                raise
            raise RuntimeError(f"explain: {error}{layout_advice(error, 'channels_last=False')}") from error
        finally:
            restore(module, device, *state)
    return gather(collect.results, count, schedule.stages, device)


@contextlib.contextmanager
def quiet_lightning():
    """Lightning's start-up notes (GPU available, tips) are noise in a notebook."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def resolve_targets(targets: Tensor | list[int] | int | None, count: int) -> Tensor:
    """``(N,)`` class indices; -1 means the top-1 class."""
    if targets is None:
        return torch.full((count,), -1, dtype=torch.long)
    targets = torch.as_tensor(targets, dtype=torch.long).flatten().cpu()
    if targets.numel() == 1:
        targets = targets.expand(count)
    if targets.numel() != count:
        raise ValueError(f"explain: {targets.numel()} targets for {count} images")
    return targets.clone()


def strides_of(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """The strides of ``module``'s 4-D parameters and buffers (``model.channels_last`` changes them)."""
    tensors = chain(module.named_parameters(), module.named_buffers())
    return {name: tensor.stride() for name, tensor in tensors if tensor.dim() == 4}


def restore(module: nn.Module, device: torch.device, requires_grad: dict[str, bool], training: bool,
            strides: dict[str, tuple[int, ...]]) -> None:
    """Gives the user's classifier back as it came: device, memory layout, gradient flags, train/eval mode."""
    module.to(device)
    for name, tensor in chain(module.named_parameters(), module.named_buffers()):
        if name in strides and tensor.stride() != strides[name]:
            tensor.data = torch.empty_strided(tensor.shape, strides[name], dtype=tensor.dtype,
                                              device=tensor.device).copy_(tensor.data)
    for name, parameter in module.named_parameters():
        parameter.requires_grad_(requires_grad[name])
    module.train(training)


def gather(results: dict, count: int, stages: int, device: torch.device) -> dict[str, Tensor]:
    explanations = [results[f"image{i}"] for i in range(count)]
    maps = torch.stack([e.fused for e in explanations]).to(device)  # (N, H, W)
    stage_maps = maps.new_zeros((count, stages, *maps.shape[1:]))  # (N, T, H, W)
    for i, e in enumerate(explanations):
        stage_maps[i, : len(e.stage_maps)] = e.stage_maps.to(device)
    rows = [e.row for e in explanations]
    return {
        "maps": maps,
        "stage_maps": stage_maps,
        "logits": torch.tensor([r["logit"] for r in rows], device=device),
        "masked_logits": torch.tensor([r["masked_logit"] for r in rows], device=device),
        "targets": torch.tensor([r["target"] for r in rows], device=device),
    }


class HDM:
    """Captum-style attribution: ``HDM(forward_func).attribute(inputs, target=...)`` -> ``(N, 1, H, W)``.

    The maps are non-negative (``[0, 1]``), so Captum's visualisation takes them with
    ``sign="positive"``. Settings as for :func:`explain`.

    Args:
        forward_func: the classifier (a module or a function of a batch).
        preset: the settings preset.
        settings: any :func:`explain` override.
    """

    def __init__(self, forward_func: nn.Module | Callable[[Tensor], Tensor], preset: str = "fine", **settings: Any) -> None:
        self.forward_func = forward_func
        self.preset, self.settings = preset, settings

    def attribute(self, inputs: Tensor, target: Tensor | list[int] | int | None = None, **settings: Any) -> Tensor:
        result = explain(self.forward_func, inputs, target, self.preset, **{**self.settings, **settings})
        return result["maps"][:, None].to(inputs.dtype)


def quantus_explain(model: nn.Module, inputs, targets, device: str | torch.device | None = None, **settings: Any):
    """Quantus's ``explain_func``: numpy ``(N, C, H, W)`` inputs and ``(N,)`` targets -> ``(N, 1, H, W)``.

    ``device`` is the one Quantus passes; by default the model's.
    """
    import numpy as np

    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    inputs = torch.as_tensor(np.asarray(inputs), dtype=torch.float32, device=device)
    targets = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    return HDM(model, **settings).attribute(inputs, target=targets).cpu().numpy()
