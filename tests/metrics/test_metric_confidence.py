"""Average Drop and Increase in Confidence against pytorch-grad-cam and a hand-computed case."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from hdm_lightning.metrics import AverageDropIncrease
from hdm_lightning.metrics.functional import confidence_drop, confidence_increase


def conv_classifier() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 5),
    )
    return model.eval().requires_grad_(False)


def test_matches_pytorch_grad_cam():
    from pytorch_grad_cam.metrics.cam_mult_image import CamMultImageConfidenceChange
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 8, 8, generator=generator)
    maps = torch.rand(6, 8, 8, generator=generator)
    targets = torch.tensor([0, 1, 2, 3, 4, 0])
    model = conv_classifier()

    softmax_targets = [ClassifierOutputSoftmaxTarget(int(c)) for c in targets]
    change = CamMultImageConfidenceChange()(images, maps.numpy(), softmax_targets, model)  # O − Y
    probs = torch.softmax(model(images), dim=1)[torch.arange(6), targets].numpy()  # Y
    expected_drop = 100 * np.mean(np.maximum(-change, 0) / probs)
    expected_increase = 100 * np.mean(change > 0)
    assert 0 < expected_increase < 100  # both kinds of images are present

    metric = AverageDropIncrease(model)
    metric.update(images[:4], maps[:4], targets[:4])
    metric.update(images[4:], maps[4:], targets[4:])
    result = metric.compute()
    assert result["average_drop"].item() == pytest.approx(expected_drop, rel=1e-5)
    assert result["increase_in_confidence"].item() == pytest.approx(expected_increase)


def test_by_hand_with_a_linear_classifier():
    # class-0 logit = 2·(sum of the pixels), class-1 logit = 0, one unit pixel per image
    model = nn.Sequential(nn.Flatten(), nn.Linear(1, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[2.0], [0.0]]))
        model[1].bias.zero_()
    images = torch.ones(3, 1, 1, 1)
    maps = torch.tensor([0.5, 1.0, 0.0]).view(3, 1, 1)
    targets = torch.tensor([0, 0, 1])
    metric = AverageDropIncrease(model)
    metric.update(images, maps, targets)
    y0, o0 = 1 / (1 + math.exp(-2)), 1 / (1 + math.exp(-1))  # image 0, class 0
    y2, o2 = 1 / (1 + math.exp(2)), 0.5  # image 2, class 1: confidence rises
    expected_drop = 100 * ((y0 - o0) / y0 + 0 + 0) / 3
    result = metric.compute()
    assert result["average_drop"].item() == pytest.approx(expected_drop, rel=1e-6)
    assert result["increase_in_confidence"].item() == pytest.approx(100 / 3)
    assert o2 > y2


def test_functional_edge_cases():
    probs = torch.tensor([0.5, 0.5, 0.0])
    explained = torch.tensor([0.5, 0.0, 0.0])
    torch.testing.assert_close(confidence_drop(probs, explained), torch.tensor([0.0, 100.0, 0.0]))
    assert confidence_increase(probs, explained).tolist() == [False, False, False]
