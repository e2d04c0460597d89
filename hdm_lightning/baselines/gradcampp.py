"""Grad-CAM++ (Chattopadhay et al., WACV 2018): Grad-CAM with pixel-wise gradient weights."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from hdm_lightning.baselines.cam import CAMBaseline

if TYPE_CHECKING:
    from pytorch_grad_cam.base_cam import BaseCAM


class GradCAMPlusPlus(CAMBaseline):
    """Channel weights from positive gradients weighted by higher-order terms (paper eq. 19).

    Args:
        target_layer: see :class:`~hdm_lightning.baselines.cam.CAMBaseline`.
    """

    def make_cam(self, classifier: nn.Module, layer: nn.Module) -> BaseCAM:
        from pytorch_grad_cam import GradCAMPlusPlus as Cam

        return Cam(classifier, [layer])
