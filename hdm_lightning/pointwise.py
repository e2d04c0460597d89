"""1×1 convolutions as matrix products with MKL's strict reproducibility, so that a classifier's arithmetic
depends on neither the thread count nor the batch (``model.thread_invariant``, on by default; issue 7,
stops 57, 59, 66).

On CPU, oneDNN's 1×1 convolutions split their sums by the number of threads: 30 of EfficientNet-Lite0's
32 give other bits at one thread than at two (ResNet-50 30 of 36, MobileNetV3 35 of 40), while its
stem, depthwise and strided convolutions and every other layer give the same bits
(``benchmarks/row_independence.py``). The masks' optimisation carries that noise into the map: one
process at two threads against two processes at one each correlate 0.974 at 224 px. As matrix products
the same sums still split at two threads where a product has few rows (one image's 7×7 layers, 49 × 1152
by 192) unless MKL is strict (:func:`strict_mkl`); with both, and the classifier channels-last (where the
products need no copies and a pass costs what oneDNN's does), the defaults' maps are the same to the bit
in a batch of one or four, in one process or two, at one thread or two on one CPU type (stop 66). Where a
pass of one row still takes another kernel path than a row among others (small inputs), the engine pads it
to two rows (:func:`one_row_differs`, stop 68).

:class:`PointwiseAsMatmul` is a function mode, active only while the classifier runs its forward pass
(:func:`pointwise_as_matmul` installs the hooks); the backward pass follows the graph it built.

Example:
    >>> conv = nn.Conv2d(8, 4, 1)
    >>> x = torch.randn(2, 8, 5, 5)
    >>> with PointwiseAsMatmul():
    ...     y = conv(x)
    >>> torch.allclose(y, conv(x), atol=1e-6)
    True
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle


def is_pointwise(weight: Tensor, stride, padding, groups: int) -> bool:
    """Whether a ``conv2d`` call only mixes channels pixel by pixel: a 1×1 kernel (any dilation), stride 1,
    no padding, one group."""
    return (weight.shape[-2:] == (1, 1) and groups == 1 and _pair(stride) == (1, 1)
            and (padding in ("valid", "same") or _pair(padding) == (0, 0)))


def pointwise_matmul(images: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``conv2d`` with a 1×1 kernel as a product over the channel axis, ``(…, C, H, W)`` → ``(…, O, H, W)``,
    in the input's memory format (a classifier may ``view`` what a convolution returns)."""
    out = torch.matmul(images.movedim(-3, -1), weight.flatten(1).t())
    if bias is not None:
        out = out + bias.to(out.dtype)  # under autocast the product is bf16, as conv2d's output
    out = out.movedim(-1, -3)
    channels_last = images.dim() == 4 and images.is_contiguous(memory_format=torch.channels_last)
    return out if channels_last else out.contiguous()


class PointwiseAsMatmul(TorchFunctionMode):
    """Runs every pointwise ``conv2d`` (:func:`is_pointwise`) on CPU as :func:`pointwise_matmul` (a GPU
    has no thread count to depend on; its convolutions are left as they are)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d:
            call = dict(zip(("input", "weight", "bias", "stride", "padding", "dilation", "groups"), args), **kwargs)
            options = {key: call.get(key, default) for key, default in
                       (("stride", 1), ("padding", 0), ("groups", 1))}
            if call["input"].device.type == "cpu" and is_pointwise(call["weight"], **options):
                return pointwise_matmul(call["input"], call["weight"], call.get("bias"))
        return func(*args, **kwargs)


#: MKL's conditional numerical reproducibility: ``AUTO`` (the code path of this CPU) with ``STRICT`` (the
#: same bits at any thread count and row count, where MKL offers it: its matrix products among them)
MKL_STRICT = "AUTO,STRICT"
MKL_CBWR_AUTO, MKL_CBWR_STRICT, MKL_CBWR_ALL = 2, 0x10000, ~0


@cache
def mkl_service() -> ctypes.CDLL | None:
    """The MKL service functions linked into PyTorch's CPU library; None where PyTorch has no MKL (ARM)
    or they are not found in it."""
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        try:
            library = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / name))
        except OSError:
            continue
        return library if hasattr(library, "mkl_serv_cbwr_set") else None
    return None


def strict_mkl() -> bool:
    """Asks MKL for matrix products whose bits depend on neither the thread count nor the number of
    rows; returns whether they now do.

    Without it a product of few rows splits its sum over the threads (a one-row product at the last
    7×7 layers, 49 × 1152 by 192), so :class:`PointwiseAsMatmul` alone needs ``model.fixed_batch``'s
    padding (stop 59). MKL takes the mode only before its first call: the variable ``MKL_CBWR`` (set
    here for child processes too) or the service call. Later it answers no, and the caller warns. A
    ``MKL_CBWR`` the user set is left as it is (and answers whether it is strict). No MKL: False. Float32
    only: a bf16 product on CPU runs in oneDNN.
    """
    user_set = "MKL_CBWR" in os.environ
    os.environ.setdefault("MKL_CBWR", MKL_STRICT)
    service = mkl_service()
    if service is None:
        return False
    if not user_set:
        service.mkl_serv_cbwr_set(MKL_CBWR_AUTO | MKL_CBWR_STRICT)  # refused (-8) once MKL has run: read back
    return bool(service.mkl_serv_cbwr_get(MKL_CBWR_ALL) & MKL_CBWR_STRICT)


def one_row_differs(classify: Callable[[Tensor], Tensor], row: Tensor) -> bool:
    """Whether a pass of the one row ``row`` ``(1, C, H, W)`` through ``classify`` (images to scores,
    ``(N,)``) gives its score or its input gradient other bits than a pass of it above a row of zeros,
    where the row above another image gives the same bits as above zeros (so that padding a one-row
    pass with zeros makes its arithmetic that of any batch).

    On CPU a kernel may take another path for one row where the feature maps are small: EfficientNet-Lite0
    at 64 px (2×2 last maps) gives a row's input gradient other bits alone than among others (from the
    backward of its last BatchNorm on), at 96 px and up the same bits (stop 68).
    """
    other = torch.rand(row.shape, generator=torch.Generator().manual_seed(1)).to(row)

    def score_and_gradient(batch: Tensor) -> tuple[Tensor, Tensor]:
        batch = batch.detach().requires_grad_()
        score = classify(batch)[0]
        return score.detach(), torch.autograd.grad(score, batch)[0][0]

    def same(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> bool:
        return all(torch.equal(x, y) for x, y in zip(a, b))

    alone, padded, among = (score_and_gradient(batch) for batch in
                            (row, torch.cat([row, torch.zeros_like(row)]), torch.cat([row, other])))
    return not same(alone, among) and same(padded, among)


def pointwise_as_matmul(classifier: nn.Module) -> list[RemovableHandle]:
    """Hooks that make ``classifier``'s forward passes run under :class:`PointwiseAsMatmul`; remove
    them to restore it."""
    mode = PointwiseAsMatmul()

    def enter(module: nn.Module, args) -> None:
        mode.__enter__()

    def leave(module: nn.Module, args, output) -> None:
        mode.__exit__(None, None, None)

    return [classifier.register_forward_pre_hook(enter), classifier.register_forward_hook(leave, always_call=True)]
