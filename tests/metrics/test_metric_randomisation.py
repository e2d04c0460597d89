"""Model randomisation against scipy's Spearman correlation; the user's model stays untouched."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from hdm_lightning.metrics import ModelRandomisation
from hdm_lightning.metrics.functional import average_ranks, spearman


def classifier() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    return model.eval().requires_grad_(False)


class GradientFactory:
    """``model -> explain``: the absolute input gradient of the target logit; keeps the models."""

    def __init__(self):
        self.models = []

    def __call__(self, model):
        self.models.append(model)

        def explain(images, targets):
            images = images.detach().requires_grad_(True)
            score = model(images)[torch.arange(images.shape[0]), targets].sum()
            (grad,) = torch.autograd.grad(score, images)
            return grad.abs().amax(dim=1)  # (N, H, W)

        return explain


def test_spearman_matches_scipy_with_ties():
    generator = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 5, (4, 6, 7), generator=generator).float()  # many ties
    other = torch.rand(4, 6, 7, generator=generator).round(decimals=1)
    other[1] = 2 * maps[1] + 1  # a perfect monotone relation
    pairs = zip(maps.numpy(), other.numpy())
    expected = [spearmanr(a.ravel(), b.ravel()).statistic for a, b in pairs]
    np.testing.assert_allclose(spearman(maps, other).numpy(), expected, rtol=1e-5, atol=1e-6)
    assert spearman(maps, other)[1].item() == pytest.approx(1.0)


def test_average_ranks_match_scipy():
    from scipy.stats import rankdata

    values = torch.tensor([[0.3, 0.1, 0.3, 0.2, 0.3, 0.1]])
    np.testing.assert_allclose(average_ranks(values).numpy()[0], rankdata(values.numpy()[0]))


def test_constant_maps_correlate_zero():
    maps = torch.rand(1, 3, 3)
    assert spearman(maps, torch.ones(1, 3, 3)).item() == 0.0


@pytest.mark.parametrize(("num_layers", "reset"), [(1, {"7"}), (3, {"7", "3", "1"})])
def test_matches_scipy_on_the_randomised_copy(num_layers, reset):
    model = classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_state = torch.get_rng_state()
    factory = GradientFactory()
    metric = ModelRandomisation(model, factory, num_layers=num_layers, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global generator is untouched

    original, randomised = factory.models
    assert original is model and randomised is not model
    changed = {
        name.split(".")[0]
        for name, value in randomised.state_dict().items()
        if not torch.equal(value, before[name])
    }
    assert changed == reset  # the last parameterised modules: Linear, Conv2d, BatchNorm2d
    assert not randomised.training and not any(p.requires_grad for p in randomised.parameters())

    generator = torch.Generator().manual_seed(1)
    images = torch.randn(5, 3, 8, 8, generator=generator)
    targets = torch.tensor([0, 1, 2, 0, 1])
    metric.update(images[:2], targets[:2])
    metric.update(images[2:], targets[2:])

    explain, explain_randomised = GradientFactory()(model), GradientFactory()(randomised)
    maps, other = explain(images, targets), explain_randomised(images, targets)
    pairs = zip(maps.numpy(), other.numpy())
    expected = np.mean([spearmanr(a.ravel(), b.ravel()).statistic for a, b in pairs])
    assert metric.compute().item() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert abs(expected) < 0.9

    assert not model.training and not any(p.requires_grad for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_seed_fixes_the_randomisation():
    model = classifier()
    first, second = GradientFactory(), GradientFactory()
    ModelRandomisation(model, first, num_layers=2, seed=5)
    ModelRandomisation(model, second, num_layers=2, seed=5)
    for a, b in zip(first.models[1].state_dict().values(), second.models[1].state_dict().values()):
        assert torch.equal(a, b)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return self.weight * x


def test_bad_settings_fail_by_name():
    with pytest.raises(ValueError, match="num_layers"):
        ModelRandomisation(classifier(), GradientFactory(), num_layers=5)
    with pytest.raises(ValueError, match="reset_parameters"):
        ModelRandomisation(nn.Sequential(nn.Linear(2, 2), Scale()), GradientFactory())
