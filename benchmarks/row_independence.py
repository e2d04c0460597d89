"""Does a row's arithmetic depend on the rest of its batch? EfficientNet-Lite0 on the CPU.

The logit and the input gradient of one image are compared when it is sent alone and with three
others, with and without padding the batch to a fixed number of rows, at the same position and at
another, and with one thread against two: with oneDNN, with the 1×1 convolutions as matrix products
(padded to 8 rows, and unpadded at 1, 2 and 4 rows) and without oneDNN; then which convolutions give
other bits at another thread count, and what a pass costs each way. This is what
``model.fixed_batch`` and ``model.thread_invariant`` rely on (README, "Stability"). MKL is asked for
thread-independent sums first, as ``train_masks.py`` does (``--loose_mkl``: not; stop 66); ``--channels_last``
runs the classifier channels-last, as the defaults do since stop 66.

Usage:
    python benchmarks/row_independence.py [--size 96] [--channels_last] [--loose_mkl]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hdm_lightning.models import EfficientNetLite0  # noqa: E402
from hdm_lightning.pointwise import pointwise_as_matmul, strict_mkl  # noqa: E402

TARGET = 285


def logit_and_gradient(model: torch.nn.Module, batch: torch.Tensor, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.set_num_threads(threads)
    batch = batch.clone().contiguous(memory_format=layout_of(model)).requires_grad_(True)
    logit = model(batch)[:, TARGET]
    logit.sum().backward()
    return logit.detach(), batch.grad


def layout_of(model: torch.nn.Module) -> torch.memory_format:
    """Channels-last where the model's first convolution weight is (``--channels_last``)."""
    weight = next(p for p in model.parameters() if p.dim() == 4)
    return torch.contiguous_format if weight.is_contiguous() else torch.channels_last


def padded(batch: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([batch, batch.new_zeros(rows - len(batch), *batch.shape[1:])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--torchvision", nargs="*", default=[], metavar="NAME",
                        help="also list the thread-dependent convolutions of these torchvision architectures "
                             "(random weights: the arithmetic, not the answer, is compared), e.g. resnet50")
    parser.add_argument("--channels_last", action="store_true", help="the classifier channels-last (the default since stop 66)")
    parser.add_argument("--loose_mkl", action="store_true", help="leave MKL's default (sums split by the thread count)")
    args = parser.parse_args()
    print("MKL strict:", False if args.loose_mkl else strict_mkl())
    torch.manual_seed(0)
    for name in args.torchvision:
        import torchvision

        other = getattr(torchvision.models, name)().eval().requires_grad_(False)
        batch = torch.randn(2, 3, 224, 224)
        print(f"{name}: thread-dependent convolutions", thread_dependent_convolutions(other, batch))
        for arithmetic in ARITHMETIC[:2]:
            with arithmetic_of(arithmetic, other):
                (_, one), (_, two) = (logit_and_gradient(other, batch, threads) for threads in (1, 2))
            print(f"{name}, 1 thread vs 2, {arithmetic}: input gradient equal {torch.equal(one, two)}, "
                  f"relative change {((one - two).norm() / one.norm()).item():.1e}")
    model = EfficientNetLite0().eval().requires_grad_(False)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    images = torch.randn(4, 3, args.size, args.size)
    for threads in (1, 2):
        alone, alone_grad = logit_and_gradient(model, padded(images[:1], 8), threads)
        four, four_grad = logit_and_gradient(model, padded(images, 8), threads)
        moved, moved_grad = logit_and_gradient(model, padded(images[[3, 1, 2, 0]], 8), threads)
        bare, bare_grad = logit_and_gradient(model, images[:1], threads)
        bare4, bare4_grad = logit_and_gradient(model, images, threads)
        print(f"{threads} thread(s): padded to 8, alone vs with 3 others: logit equal "
              f"{torch.equal(alone[0], four[0])}, "
              f"gradient equal {torch.equal(alone_grad[0], four_grad[0])}; row 0 vs row 3: "
              f"{torch.equal(four[0], moved[3]) and torch.equal(four_grad[0], moved_grad[3])}; unpadded, batch 1 vs 4: "
              f"logit equal {torch.equal(bare[0], bare4[0])}, gradient max diff "
              f"{(bare_grad[0] - bare4_grad[0]).abs().max().item():.2e}")
    for arithmetic in ARITHMETIC:
        with arithmetic_of(arithmetic, model):
            one, one_grad = logit_and_gradient(model, padded(images, 8), 1)
            two, two_grad = logit_and_gradient(model, padded(images, 8), 2)
        change = ((one_grad - two_grad).norm() / one_grad.norm()).item()
        print(f"padded, 1 thread vs 2, {arithmetic}: logit equal {torch.equal(one, two)}, "
              f"gradient max diff {(one_grad - two_grad).abs().max().item():.2e}, relative change {change:.1e}")
    with arithmetic_of("1x1 as products", model):  # unpadded: does a product's split depend on its rows?
        for rows in (1, 2, 4):
            (one, one_grad), (two, two_grad) = (logit_and_gradient(model, images[:rows], t) for t in (1, 2))
            print(f"unpadded, {rows} row(s), 1 thread vs 2, 1x1 as products: logit equal {torch.equal(one, two)}, "
                  f"gradient equal {torch.equal(one_grad, two_grad)}")
    print("convolutions whose output or input gradient changes between 1 and 2 threads (oneDNN):",
          thread_dependent_convolutions(model, images))
    for arithmetic in ARITHMETIC:
        with arithmetic_of(arithmetic, model):
            costs = [f"{threads} thread(s) {seconds_a_pass(model, images, threads):.3f} s" for threads in (1, 2)]
        print(f"a pass and backward of 4 rows, {arithmetic}: " + ", ".join(costs))


#: How the classifier's convolutions run: as PyTorch chooses (oneDNN on CPU), with the 1×1 ones as matrix
#: products (``model.thread_invariant``), or without oneDNN (the fallback kernels, not adopted: slower)
ARITHMETIC = ("oneDNN", "1x1 as products", "oneDNN off")


@contextmanager
def arithmetic_of(arithmetic: str, model: torch.nn.Module) -> Iterator[None]:
    """``model``'s convolutions run as ``arithmetic`` (one of :data:`ARITHMETIC`) inside the block."""
    hooks = pointwise_as_matmul(model) if arithmetic == "1x1 as products" else []
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = arithmetic != "oneDNN off"
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before
        for hook in hooks:
            hook.remove()


def thread_dependent_convolutions(model: torch.nn.Module, images: torch.Tensor) -> dict[str, int]:
    """Kernel size → how many of the classifier's convolutions give other bits at another thread
    count, each run alone on random inputs of the shape it sees (and of all, in brackets)."""
    inputs: dict[str, tuple[torch.nn.Conv2d, torch.Size]] = {}
    hooks = [module.register_forward_hook(lambda m, i, o, n=name: inputs.setdefault(n, (m, i[0].shape)) and None)
             for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    counts: dict[str, list[int]] = {}
    generator = torch.Generator().manual_seed(1)
    for convolution, shape in inputs.values():
        x, upstream = torch.randn(shape, generator=generator), None
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            leaf = x.clone().requires_grad_(True)
            out = convolution(leaf)
            upstream = torch.randn(out.shape, generator=generator) if upstream is None else upstream
            out.backward(upstream)
            results.append((out.detach(), leaf.grad))
        kind = f"{'depthwise ' if convolution.groups > 1 else ''}{convolution.kernel_size[0]}x{convolution.kernel_size[1]}"
        differs = not all(torch.equal(a, b) for a, b in zip(*results))
        counts.setdefault(kind, [0, 0])[0] += differs
        counts[kind][1] += 1
    return {kind: f"{differ} of {total}" for kind, (differ, total) in counts.items()}


def seconds_a_pass(model: torch.nn.Module, images: torch.Tensor, threads: int, repeats: int = 5) -> float:
    logit_and_gradient(model, images, threads)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        logit_and_gradient(model, images, threads)
    return (time.perf_counter() - start) / repeats


if __name__ == "__main__":
    main()
