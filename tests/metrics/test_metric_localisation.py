"""Top-p % localisation scores against scikit-learn on hand-binarised maps."""

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, jaccard_score, precision_score, recall_score

from hdm_lightning.metrics import TopPercentLocalisation
from hdm_lightning.metrics.functional import top_percent_masks

PERCENTS = (1, 5, 10, 20, 50)


def reference_scores(maps, masks, percents):
    """Mean over images with a non-empty mask of sklearn's scores at each p, top-k by argsort."""
    scores = {"dice": [], "iou": [], "precision": [], "sensitivity": []}
    for saliency, mask in zip(maps.numpy(), masks.numpy()):
        if not mask.any():
            continue
        flat, truth = saliency.ravel(), mask.ravel()
        rows = {name: [] for name in scores}
        for p in percents:
            binary = np.zeros_like(truth)
            binary[np.argsort(-flat)[: max(1, int(np.round(p * flat.size / 100)))]] = True
            rows["dice"].append(f1_score(truth, binary))
            rows["iou"].append(jaccard_score(truth, binary))
            rows["precision"].append(precision_score(truth, binary, zero_division=0))
            rows["sensitivity"].append(recall_score(truth, binary))
        for name in scores:
            scores[name].append(rows[name])
    return {name: np.mean(values, axis=0) for name, values in scores.items()}


def test_matches_sklearn():
    generator = torch.Generator().manual_seed(0)
    maps = torch.rand(8, 12, 12, generator=generator)  # distinct values: exactly k pixels
    masks = torch.zeros(8, 12, 12, dtype=torch.bool)
    masks[:, 2:7, 3:9] = True
    masks[1] = False  # skipped
    maps[:, 2:7, 3:9] += 0.3 * torch.rand(8, 5, 6, generator=generator)  # some overlap
    expected = reference_scores(maps, masks, PERCENTS)

    metric = TopPercentLocalisation(percents=PERCENTS)
    metric.update(maps[:3], masks[:3])
    metric.update(maps[3:], masks[3:])
    per_percent, means = metric.per_percent(), metric.compute()
    for name, values in expected.items():
        np.testing.assert_allclose(per_percent[name].numpy(), values, rtol=1e-5, atol=1e-7)
        assert means[name].item() == pytest.approx(values.mean(), rel=1e-5)


def test_ties_at_the_threshold_are_kept():
    maps = torch.tensor([[[1.0, 0.5, 0.5], [0.5, 0.0, 0.0]]])
    binary = top_percent_masks(maps, torch.tensor([100 / 6, 2 * 100 / 6]))
    assert binary[0].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]]


def test_default_percents_are_one_to_twenty():
    metric = TopPercentLocalisation()
    assert metric.percents.tolist() == list(range(1, 21))
    maps = torch.linspace(0, 1, 100).view(1, 10, 10)
    masks = maps >= 0.9  # exactly the top 10 pixels
    metric.update(maps, masks)
    per_percent = metric.per_percent()
    # top p pixels of 100: precision 1 up to p = 10, then 10/p; sensitivity min(p, 10)/10
    p = torch.arange(1.0, 21.0)
    torch.testing.assert_close(per_percent["precision"], torch.clamp(10 / p, max=1))
    torch.testing.assert_close(per_percent["sensitivity"], torch.clamp(p / 10, max=1))
    dice = 2 * torch.clamp(p, max=10) / (p + 10)
    torch.testing.assert_close(per_percent["dice"], dice)


@pytest.mark.parametrize("percents", [(), (0, 5), (5, 101)])
def test_bad_percents_fail_by_name(percents):
    with pytest.raises(ValueError, match="percents"):
        TopPercentLocalisation(percents=percents)
