"""The adapter every baseline shares: input checks, normalisation, and a classifier left as given."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hdm_lightning.baselines import Baseline
from hdm_lightning.baselines.base import require, untouched


class SumOfInput(Baseline):
    def attribute(self, classifier, images, targets):
        return images.sum(dim=1) * 3.0 + 1.0


class Failing(Baseline):
    def attribute(self, classifier, images, targets):
        classifier.eval()
        raise RuntimeError("boom")


def trainable_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


def test_explain_min_max_normalises_each_image():
    images = torch.stack([torch.full((1, 2, 2), v) for v in (1.0, 5.0)])  # (2, 1, 2, 2) constant maps
    images[0, 0, 0, 0] = 3.0
    maps = SumOfInput().explain(nn.Identity(), images, torch.tensor([0, 0]))
    assert torch.equal(maps[0], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(maps[1], torch.zeros(2, 2))  # a constant map becomes 0, not NaN


@pytest.mark.parametrize(
    ("images", "targets", "name"),
    [
        (torch.zeros(3, 4, 4), torch.tensor([0]), "images"),
        (torch.zeros(1, 3, 4, 4, dtype=torch.long), torch.tensor([0]), "images"),
        (torch.zeros(2, 3, 4, 4), torch.tensor([0]), "targets"),
        (torch.zeros(1, 3, 4, 4), torch.tensor([0.0]), "targets"),
    ],
)
def test_explain_rejects_bad_inputs_by_name(images, targets, name):
    with pytest.raises(ValueError, match=f"^{name}="):
        SumOfInput().explain(nn.Identity(), images, targets)


def test_require_names_setting_value_and_allowed():
    with pytest.raises(ValueError, match=r"^p1=1.5 is invalid: expected a probability$"):
        require(False, "p1", 1.5, "a probability")


def test_untouched_restores_modes_requires_grad_and_grads_even_on_error():
    net = trainable_net().train()
    net[1].eval()  # a mixed state must come back as it was
    net[0].bias.requires_grad_(False)
    grad = torch.ones_like(net[6].weight)
    net[6].weight.grad = grad
    with pytest.raises(RuntimeError, match="boom"):
        Failing().explain(net, torch.zeros(1, 3, 4, 4), torch.tensor([0]))
    assert [m.training for m in net.modules()] == [True, True, False, True, True, True, True, True]
    assert [p.requires_grad for p in net.parameters()] == [True, False, True, True, True, True]
    assert net[6].weight.grad is grad


def test_untouched_freezes_parameters_inside():
    net = trainable_net()
    with untouched(net):
        assert not any(p.requires_grad for p in net.parameters())
    assert all(p.requires_grad for p in net.parameters())

