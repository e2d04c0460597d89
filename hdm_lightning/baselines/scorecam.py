"""Score-CAM (Wang et al., CVPR 2020 workshops): activations weighted by the scores they keep."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from hdm_lightning.baselines.base import require
from hdm_lightning.baselines.cam import CAMBaseline

if TYPE_CHECKING:
    from pytorch_grad_cam.base_cam import BaseCAM


class ScoreCAM(CAMBaseline):
    """Each channel ``A_k``, upsampled and min-max normalised, masks the image; the softmax over
    channels of the target logits of these masked images weights the channels. Gradient-free,
    one forward pass per channel and image.

    Args:
        target_layer: see :class:`~hdm_lightning.baselines.cam.CAMBaseline`.
        batch_size: masked images per forward pass.
    """

    def __init__(self, target_layer: str | None = None, batch_size: int = 32) -> None:
        super().__init__(target_layer)
        require(batch_size >= 1, "batch_size", batch_size, "an int >= 1")
        self.batch_size = batch_size

    def make_cam(self, classifier: nn.Module, layer: nn.Module) -> BaseCAM:
        from pytorch_grad_cam import ScoreCAM as Cam

        cam = Cam(classifier, [layer])
        cam.batch_size = self.batch_size  # read by ScoreCAM.get_cam_weights
        return cam
