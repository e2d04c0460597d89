"""How far are the mask gradients under ``bf16-mixed`` from float32's? Where bf16 maps diverge.

For the stability benchmark's photos, each at the given sizes, with EfficientNet-Lite0: a 10×10 mask
at 0.7 everywhere, upsampled bilinearly, keeps the photo over the blurred substrate (the defaults'
masked image); the top-1 class's logit and its gradient with respect to the mask are computed in
float32 and under CPU autocast to bfloat16, as a ``bf16-mixed`` run computes them. Reports the logit
change, and the cosine and relative error of the bf16 gradient against float32's. The masks follow
these gradients for 20–40 steps, so their error is what sends a bf16 run's masks elsewhere. The last
columns repeat the bf16 pass with the classifier's layers to output stride ``--float32_stride`` in
float32, as a run does under ``model.float32_stride`` (:mod:`hdm_lightning.precision`).

Usage:
    python benchmarks/bf16_gradients.py [--sizes 96 224] [--float32_stride 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mosaics import normalise  # noqa: E402
from stability import PHOTOS  # noqa: E402


def logit_and_gradient(model, image: torch.Tensor, target: int, bf16: bool) -> tuple[float, torch.Tensor]:
    """``f_c`` of the image kept by a uniform 10×10 mask over its blur, and ``d f_c / d mask``."""
    from hdm_lightning import masks as M

    mask = torch.full((1, 10, 10), 0.7, requires_grad=True)
    substrate = model.make_substrate(image[None], "blur")
    kept = M.upsample(mask, image.shape[-2:])  # (1, H, W), float32 as in a run
    masked = M.apply_mask(image[None], kept, substrate)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logit = model.classifier(masked)[0, target].float()
    (gradient,) = torch.autograd.grad(logit, mask)
    return float(logit.detach()), gradient.flatten()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[96, 224])
    parser.add_argument("--float32_stride", type=int, default=8)
    args = parser.parse_args()
    from hdm_lightning.data import load_image
    from hdm_lightning.module import MaskExplainer
    from hdm_lightning.precision import high_resolution_modules, run_in_float32

    model = MaskExplainer()
    stride = args.float32_stride
    print(f"| photo | size | logit float32 | logit bf16 | gradient cosine | gradient relative error "
          f"| logit, stride {stride} in float32 | cosine | relative error |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for photo in PHOTOS:
            image = normalise(load_image(photo), size)
            with torch.no_grad():
                target = int(model.classifier(image[None]).argmax())
            full, g_full = logit_and_gradient(model, image, target, bf16=False)
            half, g_half = logit_and_gradient(model, image, target, bf16=True)
            handles = run_in_float32(model.classifier, high_resolution_modules(model.classifier, image[None], stride))
            kept, g_kept = logit_and_gradient(model, image, target, bf16=True)
            for handle in handles:
                handle.remove()
            row = [f"{full:.3f}", f"{half:.3f}", *compare(g_full, g_half), f"{kept:.3f}", *compare(g_full, g_kept)]
            print(f"| {photo} | {size} | " + " | ".join(row) + " |")


def compare(reference: torch.Tensor, other: torch.Tensor) -> tuple[str, str]:
    """Cosine and relative error of a gradient against the float32 one."""
    cosine = float(F.cosine_similarity(reference, other, dim=0))
    return f"{cosine:.3f}", f"{float((other - reference).norm() / reference.norm()):.2f}"


if __name__ == "__main__":
    main()
