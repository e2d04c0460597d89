"""Where a level's mask starts: the reference's constant, or the class's Grad-CAM on the stage input.

From the constant 0.5 a mask has to travel to 0 over everything that is not evidence, and the
defaults' 20-40 decayed steps leave it part of the way: a faint haze over the whole image, which on a
scene of several objects holds more of the map than the class's own object (issue 7). Starting each
mask from Grad-CAM (Selvaraju et al. 2017; pytorch-grad-cam) puts the start near the class's regions
and the rest low; the optimisation then decides the map as before, from a start that is one
classifier pass and one backward of the image alone (so it does not depend on the batch).
"""

from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)
_warned: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # classifiers warned about: once, not per image


def gradcam_map(classifier: nn.Module, image: Tensor, target: int, layer: str | None = None) -> Tensor | None:
    """Grad-CAM of ``target`` on ``image`` ``(C, H, W)``, ``(H, W)`` in ``[0, 1]`` on its device, in
    float32; None where it is empty (no activation weighs for the class: Grad-CAM's ReLU leaves
    nothing) and, with a warning, where the classifier has no layer Grad-CAM can weigh or the map is
    not finite, so that the caller starts from its constant instead."""
    from hdm_lightning.baselines import GradCAM

    try:
        with torch.autocast(image.device.type, enabled=False):
            cam = GradCAM(layer).explain(classifier, image[None].float(), torch.tensor([target], device=image.device))
    except Exception as error:  # noqa: BLE001 (a start, not the method: any failure leaves the constant)
        warn_once(classifier, f"no Grad-CAM for this classifier ({error})")
        return None
    if cam.shape[-2:] != image.shape[-2:] or not torch.isfinite(cam).all():
        warn_once(classifier, f"Grad-CAM of shape {tuple(cam.shape)} is unusable")
        return None
    return cam[0] if cam.max() > 0 else None


def warn_once(classifier: nn.Module, reason: str) -> None:
    """Warns that ``classifier``'s masks start from the constant, once per classifier."""
    if classifier not in _warned:
        _warned.add(classifier)
        log.warning("model.start gradcam: %s; masks start at model.init_value", reason)


def start_values(start_map: Tensor, size: int, low: float, high: float) -> Tensor:
    """A mask's start ``(size, size)``: ``low + (high − low) · m``, ``m`` the start map averaged over
    each cell and divided by its largest cell (its peak cell starts at ``high``)."""
    cells = F.adaptive_avg_pool2d(start_map[None, None], size)[0, 0]
    return low + (high - low) * cells / cells.max().clamp_min(1e-8)
