"""Every baseline validates its settings at construction and names the culprit."""

from __future__ import annotations

import re

import pytest

from hdm_lightning.baselines import (
    RISE,
    ExtremalPerturbation,
    GradCAM,
    GradCAMPlusPlus,
    IntegratedGradients,
    Occlusion,
    ScoreCAM,
)

BAD_SETTINGS = [
    (GradCAM, {"target_layer": ""}),
    (GradCAMPlusPlus, {"target_layer": ""}),
    (ScoreCAM, {"target_layer": ""}),
    (ScoreCAM, {"batch_size": 0}),
    (IntegratedGradients, {"n_steps": 0}),
    (IntegratedGradients, {"internal_batch_size": 0}),
    (Occlusion, {"window": 0}),
    (Occlusion, {"stride": 0}),
    (Occlusion, {"window": 4, "stride": 5}),
    (Occlusion, {"batch_size": 0}),
    (RISE, {"n_masks": 0}),
    (RISE, {"grid_size": 0}),
    (RISE, {"p1": 0.0}),
    (RISE, {"p1": 1.5}),
    (RISE, {"batch_size": 0}),
    (ExtremalPerturbation, {"areas": ()}),
    (ExtremalPerturbation, {"areas": (0.1, 1.0)}),
    (ExtremalPerturbation, {"steps": 0}),
    (ExtremalPerturbation, {"lr": 0.0}),
    (ExtremalPerturbation, {"reg_weight": -1.0}),
    (ExtremalPerturbation, {"reg_growth": 0.5}),
    (ExtremalPerturbation, {"mask_stride": 0}),
    (ExtremalPerturbation, {"mask_sigma": 0.0}),
    (ExtremalPerturbation, {"smoothness": -0.1}),
    (ExtremalPerturbation, {"blur_sigma": 0.0}),
]


IDS = [f"{cls.__name__}-{'-'.join(kwargs)}" for cls, kwargs in BAD_SETTINGS]


@pytest.mark.parametrize(("cls", "kwargs"), BAD_SETTINGS, ids=IDS)
def test_bad_setting_raises_value_error_naming_it(cls, kwargs):
    name = list(kwargs)[-1]
    with pytest.raises(ValueError, match=rf"^{name}={re.escape(repr(kwargs[name]))} is invalid: expected "):
        cls(**kwargs)


@pytest.mark.parametrize(
    "cls", [GradCAM, GradCAMPlusPlus, ScoreCAM, IntegratedGradients, Occlusion, RISE, ExtremalPerturbation]
)
def test_defaults_are_valid(cls):
    cls()
