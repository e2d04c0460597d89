"""Baseline saliency methods behind one adapter, :class:`Baseline`.

``Baseline.explain(classifier, images, targets)`` returns ``(N, H, W)`` maps in ``[0, 1]`` for
every method; a YAML config picks the method by class name. The CAM methods need pytorch-grad-cam
and the captum methods need captum (the ``eval`` extra); both are imported on first use.
"""

from hdm_lightning.baselines.base import Baseline
from hdm_lightning.baselines.cam import CAMBaseline, find_target_layer
from hdm_lightning.baselines.extremal import ExtremalPerturbation
from hdm_lightning.baselines.gradcam import GradCAM
from hdm_lightning.baselines.gradcampp import GradCAMPlusPlus
from hdm_lightning.baselines.integrated_gradients import IntegratedGradients
from hdm_lightning.baselines.occlusion import Occlusion
from hdm_lightning.baselines.rise import RISE
from hdm_lightning.baselines.scorecam import ScoreCAM

__all__ = [
    "RISE",
    "Baseline",
    "CAMBaseline",
    "ExtremalPerturbation",
    "GradCAM",
    "GradCAMPlusPlus",
    "IntegratedGradients",
    "Occlusion",
    "ScoreCAM",
    "find_target_layer",
]
