"""Max-sensitivity against Captum's ``sensitivity_max`` fed the same perturbations."""

import pytest
import torch
from torch import nn

from hdm_lightning.metrics import MaxSensitivity


class Recorder:
    """An explain function that keeps every batch of images it is given."""

    def __init__(self, explain):
        self.explain = explain
        self.calls = []

    def __call__(self, images, targets):
        self.calls.append(images.detach().clone())
        return self.explain(images, targets)


def per_class_map() -> nn.Module:
    torch.manual_seed(0)
    return nn.Conv2d(3, 4, 3, padding=1).eval().requires_grad_(False)


def test_matches_captum_sensitivity_max():
    from captum.metrics import sensitivity_max

    conv = per_class_map()

    def explain(images, targets):
        return torch.sigmoid(conv(images))[torch.arange(images.shape[0]), targets]  # (N, H, W)

    generator = torch.Generator().manual_seed(1)
    images = torch.randn(5, 3, 6, 6, generator=generator)
    targets = torch.tensor([0, 1, 2, 3, 0])
    recorder = Recorder(explain)
    metric = MaxSensitivity(recorder, radius=0.3, num_samples=4, seed=0)
    metric.update(images, targets)

    torch.testing.assert_close(recorder.calls[0], images)
    perturbed = torch.stack(recorder.calls[1:])  # (S, N, C, H, W)
    assert perturbed.shape[0] == 4
    noise = perturbed - images
    assert noise.abs().max() <= 0.3 and noise.abs().max() > 0.25

    def perturb_func(expanded, radius):
        # captum repeats each image S times in a row: (N·S, C, H, W)
        return (perturbed.transpose(0, 1).reshape_as(expanded),)

    def captum_explain(inputs, target):
        # captum calls it with a tuple of inputs and expects a tuple of attributions back
        return (explain(inputs[0], target),)

    expected = sensitivity_max(
        captum_explain, images, perturb_func=perturb_func, n_perturb_samples=4, target=targets
    )
    assert expected.min() > 0 and expected.max() > 1.2 * expected.min()
    assert metric.compute().item() == pytest.approx(expected.mean().item(), rel=1e-5)


def test_gradient_explanations_work_inside_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(64, 3))
    model.eval().requires_grad_(False)

    def gradient_map(images, targets):
        images = images.detach().requires_grad_(True)
        score = model(images)[torch.arange(images.shape[0]), targets].sum()
        (grad,) = torch.autograd.grad(score, images)
        return grad.abs().sum(dim=1)  # (N, H, W)

    images = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([1, 2])
    recorder = Recorder(gradient_map)
    metric = MaxSensitivity(recorder, num_samples=3, seed=0)
    metric.update(images, targets)

    maps = gradient_map(images, targets)
    changes = torch.stack(
        [(gradient_map(x, targets) - maps).flatten(1).norm(dim=1) for x in recorder.calls[1:]]
    )
    expected = (changes.amax(dim=0) / maps.flatten(1).norm(dim=1)).mean()
    assert expected > 0
    torch.testing.assert_close(metric.compute(), expected)
    assert not any(p.requires_grad for p in model.parameters())


def test_seed_makes_it_reproducible():
    conv = per_class_map()

    def explain(images, targets):
        return torch.relu(conv(images))[torch.arange(images.shape[0]), targets]

    images = torch.randn(3, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([0, 1, 2])
    values = []
    for _ in range(2):
        metric = MaxSensitivity(explain, seed=7)
        metric.update(images, targets)
        values.append(metric.compute())
    assert values[0] > 0
    torch.testing.assert_close(values[0], values[1])


@pytest.mark.parametrize(
    ("options", "name"), [({"radius": 0.0}, "radius"), ({"num_samples": 0}, "num_samples")]
)
def test_bad_settings_fail_by_name(options, name):
    with pytest.raises(ValueError, match=name):
        MaxSensitivity(lambda x, c: x.mean(dim=1), **options)
