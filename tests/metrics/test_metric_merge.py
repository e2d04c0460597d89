"""Every metric keeps summed states: two halves merged as DDP would equal the whole batch."""

import pytest
import torch
from torch import nn

from hdm_lightning.metrics import (
    AverageDropIncrease,
    DeletionAUC,
    EnergyPointingGame,
    InsertionAUC,
    MaxSensitivity,
    ModelRandomisation,
    PointingGame,
    TopPercentLocalisation,
)


def classifier() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 3))
    return model.eval().requires_grad_(False)


def class_map(model):
    def explain(images, targets):
        return torch.sigmoid(model[0](images)[:, :3])[torch.arange(images.shape[0]), targets]

    return explain


GENERATOR = torch.Generator().manual_seed(0)
IMAGES = torch.randn(6, 3, 8, 8, generator=GENERATOR)
MAPS = torch.rand(6, 8, 8, generator=GENERATOR)
MASKS = torch.rand(6, 8, 8, generator=GENERATOR) > 0.7
TARGETS = torch.tensor([0, 1, 2, 0, 1, 2])
MODEL = classifier()

CASES = [
    (lambda: DeletionAUC(MODEL, num_steps=8), (IMAGES, MAPS, TARGETS)),
    (lambda: InsertionAUC(MODEL, num_steps=8, kernel_size=3, sigma=1.0), (IMAGES, MAPS, TARGETS)),
    (lambda: AverageDropIncrease(MODEL), (IMAGES, MAPS, TARGETS)),
    (lambda: PointingGame(num_classes=3, tolerance=2), (MAPS, MASKS, TARGETS)),
    (lambda: EnergyPointingGame(), (MAPS, MASKS)),
    (lambda: TopPercentLocalisation(percents=(5, 10, 30)), (MAPS, MASKS)),
    (lambda: MaxSensitivity(class_map(MODEL), num_samples=2, seed=0), (IMAGES, TARGETS)),
    (lambda: ModelRandomisation(MODEL, class_map, num_layers=2), (IMAGES, TARGETS)),
]


def halves(arguments):
    return [tuple(a[:3] for a in arguments), tuple(a[3:] for a in arguments)]


@pytest.mark.parametrize(("make", "arguments"), CASES)
def test_merged_halves_equal_the_whole(make, arguments):
    whole = make()
    whole.update(*arguments)
    first, second = make(), make()
    first.update(*halves(arguments)[0])
    second.update(*halves(arguments)[1])
    first.merge_state(second)
    expected, merged = whole.compute(), first.compute()
    if isinstance(expected, dict):
        assert expected.keys() == merged.keys()
        for key in expected:
            torch.testing.assert_close(merged[key], expected[key])
    elif isinstance(whole, MaxSensitivity):
        assert merged > 0  # different noise in the halves: only a plausible value
    else:
        torch.testing.assert_close(merged, expected)


def test_forward_returns_the_batch_value_and_accumulates():
    metric = DeletionAUC(MODEL, num_steps=8)
    first = metric(IMAGES[:3], MAPS[:3], TARGETS[:3])
    second = metric(IMAGES[3:], MAPS[3:], TARGETS[3:])
    torch.testing.assert_close(metric.compute(), (first + second) / 2)
    assert metric.curve().shape == (9,)
