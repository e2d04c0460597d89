"""Does a row's arithmetic depend on the rest of its batch? EfficientNet-Lite0 on the CPU.

The logit and the input gradient of one image are compared when it is sent alone and with three
others, with and without padding the batch to a fixed number of rows, at the same position and at
another, and with one thread against two. This is what ``model.fixed_batch`` relies on (README,
"Stability of the maps").

Usage:
    python benchmarks/row_independence.py [--size 96]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hdm_lightning.models import EfficientNetLite0  # noqa: E402

TARGET = 285


def logit_and_gradient(model: torch.nn.Module, batch: torch.Tensor, threads: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.set_num_threads(threads)
    batch = batch.clone().requires_grad_(True)
    logit = model(batch)[:, TARGET]
    logit.sum().backward()
    return logit.detach(), batch.grad


def padded(batch: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([batch, batch.new_zeros(rows - len(batch), *batch.shape[1:])])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=96)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = EfficientNetLite0().eval().requires_grad_(False)
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
    one, one_grad = logit_and_gradient(model, padded(images, 8), 1)
    two, two_grad = logit_and_gradient(model, padded(images, 8), 2)
    print(f"padded, 1 thread vs 2: logit equal {torch.equal(one, two)}, gradient max diff "
          f"{(one_grad - two_grad).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
