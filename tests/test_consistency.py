"""The consistency term: known answers, one-sidedness and invariance to the logit's scale."""

import pytest
import torch

from hdm_lightning.consistency import EvidenceConsistency, SquaredConsistency


def test_squared_consistency_punishes_a_rise_like_a_drop():
    loss = SquaredConsistency(0.01)(torch.tensor([8.0, 12.0]), torch.tensor([10.0, 10.0]), torch.zeros(2))
    assert torch.allclose(loss, torch.tensor([0.04, 0.04]))


def test_evidence_consistency_punishes_only_a_drop():
    loss = EvidenceConsistency(1.0)(torch.tensor([8.0, 12.0]), torch.tensor([10.0, 10.0]), torch.zeros(2))
    assert torch.allclose(loss, torch.tensor([0.04, 0.0]))


def test_evidence_consistency_has_the_same_scale_for_a_weak_and_a_strong_class():
    # Losing half the evidence costs the same whether the class's logit gap is 1.2 or 12.
    consistency = EvidenceConsistency(1.0)
    weak = consistency(torch.tensor([0.6]), torch.tensor([1.2]), torch.tensor([0.0]))
    strong = consistency(torch.tensor([6.0]), torch.tensor([12.0]), torch.tensor([0.0]))
    assert weak == pytest.approx(0.25) and strong == pytest.approx(0.25)
    squared = SquaredConsistency(0.01)
    assert squared(torch.tensor([6.0]), torch.tensor([12.0]), torch.zeros(1)) > 90 * squared(
        torch.tensor([0.6]), torch.tensor([1.2]), torch.zeros(1))


def test_evidence_consistency_is_finite_without_evidence():
    loss = EvidenceConsistency(1.0, min_evidence=0.5)(torch.tensor([-1.0]), torch.tensor([0.0]), torch.tensor([3.0]))
    assert loss == pytest.approx(4.0)


@pytest.mark.parametrize("cls, kwargs, match", [(SquaredConsistency, {"weight": -1}, "weight"),
                                                (EvidenceConsistency, {"min_evidence": 0}, "min_evidence")])
def test_bad_settings_name_the_setting(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)
