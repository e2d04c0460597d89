"""What a step's classifier passes cost in two orders and two memory layouts (issue 8).

A step of the defaults makes two passes of the same items through the frozen classifier: the kept
images and the deletion term's images without the kept regions. This probe times, for EfficientNet-Lite0
(or a torchvision model) at a given size and batch, a step's two forward + backward passes w.r.t. a
mask upsampled from 7 × 7 (as the engine's):

- ``joint``: both forwards, then one backward of their sum (both graphs held at once; the engine
  before stop 32);
- ``each``: each pass backpropagated before the next (the engine now);
- ``each, channels_last``: as ``each``, with the classifier and its inputs channels-last
  (``--model.channels_last true``).

Medians of ``--blocks`` blocks of ``--steps`` steps, seconds a step. Usage::

    python benchmarks/pass_order.py --size 224 --batches 2 4 8 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from hdm_lightning.models import EfficientNetLite0, TorchvisionClassifier, freeze


def step(classifier, image: torch.Tensor, mask: torch.Tensor, joint: bool) -> None:
    """Two passes (kept, removed) of one step, forward + backward w.r.t. ``mask``."""
    kept = F.interpolate(mask[:, None], size=image.shape[-2:], mode="bilinear", align_corners=False)
    if joint:
        (classifier(image * kept)[:, 0].sum() + classifier(image * (1 - kept))[:, 0].sum()).backward()
        return
    up = kept.detach().requires_grad_()
    classifier(image * up)[:, 0].sum().backward()
    classifier(image * (1 - up))[:, 0].sum().backward()
    kept.backward(up.grad)


def seconds_a_step(classifier, batch: int, size: int, joint: bool, layout, blocks: int, steps: int) -> float:
    classifier.to(memory_format=layout)
    image = torch.randn(batch, 3, size, size).contiguous(memory_format=layout)
    mask = torch.full((batch, 7, 7), 0.5, requires_grad=True)
    step(classifier, image, mask, joint)  # warm-up
    times = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(steps):
            mask.grad = None
            step(classifier, image, mask, joint)
        times.append((time.perf_counter() - start) / steps)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", default="efficientnet_lite0", help="or a torchvision model name")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    classifier = freeze(EfficientNetLite0() if args.classifier == "efficientnet_lite0"
                        else TorchvisionClassifier(args.classifier))
    orders = {"joint": (True, torch.contiguous_format), "each": (False, torch.contiguous_format),
              "each, channels_last": (False, torch.channels_last)}
    print("| batch | " + " | ".join(f"{name} (s a step)" for name in orders) + " | joint / each | each / channels_last |")
    print("|---" * (len(orders) + 3) + "|")
    for batch in args.batches:
        t = {name: seconds_a_step(classifier, batch, args.size, joint, layout, args.blocks, args.steps)
             for name, (joint, layout) in orders.items()}
        print(f"| {batch} | " + " | ".join(f"{v:.3f}" for v in t.values())
              + f" | {t['joint'] / t['each']:.2f} | {t['each'] / t['each, channels_last']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
