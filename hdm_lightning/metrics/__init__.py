"""Saliency-map evaluation metrics as torchmetrics ``Metric`` classes; maths in ``functional``."""

from hdm_lightning.metrics.confidence import AverageDropIncrease
from hdm_lightning.metrics.deletion import DeletionAUC
from hdm_lightning.metrics.energy import EnergyPointingGame
from hdm_lightning.metrics.insertion import InsertionAUC
from hdm_lightning.metrics.localisation import TopPercentLocalisation
from hdm_lightning.metrics.perturbation import PerturbationAUC
from hdm_lightning.metrics.pointing import PointingGame
from hdm_lightning.metrics.randomisation import ModelRandomisation
from hdm_lightning.metrics.sensitivity import MaxSensitivity

__all__ = [
    "AverageDropIncrease",
    "DeletionAUC",
    "EnergyPointingGame",
    "InsertionAUC",
    "MaxSensitivity",
    "ModelRandomisation",
    "PerturbationAUC",
    "PointingGame",
    "TopPercentLocalisation",
]
