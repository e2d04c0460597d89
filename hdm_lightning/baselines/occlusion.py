"""Occlusion (Zeiler and Fergus, ECCV 2014) through captum."""

from __future__ import annotations

from torch import Tensor, nn

from hdm_lightning.baselines.base import Baseline, require


class Occlusion(Baseline):
    """Drop of the target logit when a square window is set to zero, averaged over the windows
    that cover a pixel.

    Zero is the baseline in normalised space (the dataset mean colour). The window spans all
    channels, so every channel of a pixel gets the same attribution; the signed attributions are
    summed over channels: a pixel whose occlusion lowers the logit is important, one whose
    occlusion raises it gets the lowest value. Pixels that no window covers (when ``H − window``
    is not a multiple of ``stride``) get zero.

    Args:
        window: side of the square occluding window, in pixels.
        stride: step between windows, in pixels; at most ``window`` so windows leave no gaps.
        batch_size: occluded images per forward pass.
    """

    def __init__(self, window: int = 16, stride: int = 8, batch_size: int = 32) -> None:
        require(window >= 1, "window", window, "an int >= 1")
        require(1 <= stride <= window, "stride", stride, f"an int in [1, window={window}]")
        require(batch_size >= 1, "batch_size", batch_size, "an int >= 1")
        self.window = window
        self.stride = stride
        self.batch_size = batch_size

    def attribute(self, classifier: nn.Module, images: Tensor, targets: Tensor) -> Tensor:
        from captum.attr import Occlusion as _CaptumOcclusion  # optional ("eval" extra) and slow to import

        channels = images.shape[1]
        attr = _CaptumOcclusion(classifier).attribute(
            images,
            sliding_window_shapes=(channels, self.window, self.window),
            strides=(channels, self.stride, self.stride),
            baselines=0.0,
            target=targets,
            perturbations_per_eval=self.batch_size,
        )  # (N, C, H, W)
        return attr.sum(dim=1)  # (N, H, W)
