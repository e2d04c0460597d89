"""The classifier's high-resolution layers in float32 under mixed precision (issue 7, stop 37).

Under ``bf16-mixed`` the gradient of a class's logit with respect to a mask is 27-44 % off float32's
(cosine 0.90-0.96, EfficientNet-Lite0; ``benchmarks/bf16_gradients.py``), and the masks follow it
into other maps. Most of that error is made in the layers that still see the input at high
resolution: with the stem and the blocks up to output stride 8 in float32 the cosine is 0.984-0.995
at 96 and 224 px, and the fused maps of four photos at 96 px correlate 0.965-0.992 with float32's
against 0.930-0.979 all in bf16 (docs/experiments.md, stop 37). :func:`high_resolution_modules` finds
those layers of any convolutional classifier from one traced forward pass; :func:`run_in_float32`
makes them leave autocast.

Example:
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
    ...                           torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 2))
    >>> high_resolution_modules(net, torch.zeros(1, 3, 32, 32), stride=8)
    ['0', '1']
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def high_resolution_modules(classifier: nn.Module, example: Tensor, stride: int) -> list[str]:
    """Names of the outermost submodules of ``classifier`` that run before its feature maps first
    fall below ``1/stride`` of the input's side, ``example`` ``(1, C, H, W)``.

    One forward pass in float32 records each call's output: a module qualifies when every call of
    it returned a 4-D tensor at least ``H/stride × W/stride`` and came before the first output that
    did not (a smaller map, pooled features, tokens, logits). A module shared by early and late
    calls (one activation module used everywhere) does not qualify; its children may.
    """
    height, width = example.shape[-2:]
    names = {module: name for name, module in classifier.named_modules() if name}
    calls: dict[str, bool] = {}
    passed = False

    def record(module: nn.Module, args, output) -> None:
        nonlocal passed
        early = (torch.is_tensor(output) and output.ndim == 4 and output.shape[-2] * stride >= height
                 and output.shape[-1] * stride >= width)
        passed = passed or not early
        name = names[module]
        calls[name] = calls.get(name, True) and early and not passed

    handles = [module.register_forward_hook(record) for module in names]
    try:
        with torch.no_grad(), torch.autocast(example.device.type, enabled=False):
            classifier(example)
    finally:
        for handle in handles:
            handle.remove()
    early = [name for name, ok in calls.items() if ok]  # in the order their first calls returned
    return [name for name in early if not any(name.startswith(f"{outer}.") for outer in early)]


def run_in_float32(classifier: nn.Module, names: list[str]) -> list[RemovableHandle]:
    """Hooks that run the named submodules of ``classifier`` outside autocast, on float32 inputs.

    Outside autocast (a float32 run) they change nothing. Remove them with ``handle.remove()``.
    """
    handles = []
    for name in names:
        module = classifier.get_submodule(name)
        devices: list[str | None] = []  # the autocast each call left, restored when it returns

        def leave(module: nn.Module, args: tuple, devices=devices) -> tuple | None:
            device = next((a.device.type for a in args if torch.is_tensor(a)), None)
            if device is None or not torch.is_autocast_enabled(device):
                devices.append(None)
                return None
            torch.set_autocast_enabled(device, False)
            devices.append(device)
            return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

        def come_back(module: nn.Module, args: tuple, output, devices=devices) -> None:
            device = devices.pop()
            if device is not None:
                torch.set_autocast_enabled(device, True)

        handles.append(module.register_forward_pre_hook(leave))
        handles.append(module.register_forward_hook(come_back, always_call=True))
    return handles
