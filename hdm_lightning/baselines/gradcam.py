"""Grad-CAM (Selvaraju et al., ICCV 2017): activations weighted by their mean gradient."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from hdm_lightning.baselines.cam import CAMBaseline

if TYPE_CHECKING:
    from pytorch_grad_cam.base_cam import BaseCAM


class GradCAM(CAMBaseline):
    """``ReLU(Σ_k α_k A_k)`` with ``α_k`` the spatial mean of ``∂f_c/∂A_k``, upsampled to H×W.

    Args:
        target_layer: see :class:`~hdm_lightning.baselines.cam.CAMBaseline`.
    """

    def make_cam(self, classifier: nn.Module, layer: nn.Module) -> BaseCAM:
        from pytorch_grad_cam import GradCAM as Cam

        return Cam(classifier, [layer])
