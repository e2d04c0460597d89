"""Deletion and insertion AUC against a port of RISE's single-image loop and hand-computed cases."""

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from hdm_lightning.metrics import DeletionAUC, InsertionAUC
from hdm_lightning.metrics.functional import gaussian_blur, pixel_ranks


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


def sum_classifier(num_pixels: int) -> nn.Module:
    """Class-0 logit = sum of the pixels of a one-channel image, class-1 logit = 0."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(num_pixels, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.ones(num_pixels), torch.zeros(num_pixels)]))
        model[1].bias.zero_()
    return model.eval().requires_grad_(False)


def rise_single_run(model, image, explanation, target, step, start, finish):
    """RISE's ``CausalMetric.single_run`` (Petsiuk et al.), with softmax scores, as numpy."""
    _, channels, height, width = image.shape
    num_pixels = height * width
    n_steps = (num_pixels + step - 1) // step
    salient_order = np.flip(np.argsort(explanation.reshape(-1, num_pixels), axis=1), axis=-1)
    start, finish = start.clone().numpy(), finish.numpy()
    scores = np.empty(n_steps + 1)
    for i in range(n_steps + 1):
        pred = torch.softmax(model(torch.from_numpy(start)), dim=1)
        scores[i] = pred[0, target].item()
        if i < n_steps:
            coords = salient_order[:, step * i : step * (i + 1)]
            start.reshape(1, channels, num_pixels)[0, :, coords] = finish.reshape(
                1, channels, num_pixels
            )[0, :, coords]
    return scores


def rise_auc(arr):
    return (arr.sum() - arr[0] / 2 - arr[-1] / 2) / (arr.shape[0] - 1)


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 8, 8, generator=generator)
    maps = torch.rand(3, 8, 8, generator=generator)  # distinct values: tie order is moot
    targets = torch.tensor([0, 3, 4])
    return images, maps, targets


def scipy_blur(images, kernel_size, sigma):
    radius = kernel_size // 2
    blurred = [
        gaussian_filter(channel.numpy(), sigma, mode="constant", truncate=radius / sigma)
        for channel in images.reshape(-1, *images.shape[2:])
    ]
    return torch.from_numpy(np.stack(blurred)).view_as(images)


def test_gaussian_blur_matches_scipy():
    images = torch.randn(2, 3, 9, 7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(gaussian_blur(images, 5, 1.5), scipy_blur(images, 5, 1.5))
    torch.testing.assert_close(gaussian_blur(images, 11, 5.0), scipy_blur(images, 11, 5.0))


def test_pixel_ranks_are_descending_and_stable():
    maps = torch.tensor([[[0.2, 0.5, 0.2], [0.9, 0.0, 0.5]]])
    assert pixel_ranks(maps).flatten().tolist() == [3, 1, 4, 0, 5, 2]


@pytest.mark.parametrize("metric_class", [DeletionAUC, InsertionAUC])
def test_curve_and_auc_match_rise(batch, metric_class):
    images, maps, targets = batch
    model = conv_classifier()
    options = {"kernel_size": 5, "sigma": 1.5} if metric_class is InsertionAUC else {}
    metric = metric_class(model, num_steps=16, batch_size=7, **options)  # RISE step = 64/16
    metric.update(images, maps, targets)

    curves = []
    for i in range(3):
        image = images[i : i + 1]
        if metric_class is DeletionAUC:
            start, finish = image, torch.zeros_like(image)
        else:
            start, finish = scipy_blur(image, 5, 1.5), image
        curves.append(rise_single_run(model, image, maps[i].numpy(), targets[i], 4, start, finish))
    expected_curve = torch.tensor(np.mean(curves, axis=0), dtype=torch.float)
    expected_auc = float(np.mean([rise_auc(curve) for curve in curves]))

    torch.testing.assert_close(metric.curve(), expected_curve, atol=1e-5, rtol=1e-5)
    assert metric.compute().item() == pytest.approx(expected_auc, abs=1e-5)


def test_deletion_by_hand_when_steps_do_not_divide_the_pixels():
    # 6 unit pixels, 4 steps: floor(i·6/4) = 0, 1, 3, 4, 6 pixels deleted, y_i = σ(6 − that)
    metric = DeletionAUC(sum_classifier(6), num_steps=4)
    maps = torch.tensor([[[0.6, 0.5, 0.4], [0.3, 0.2, 0.1]]])
    metric.update(torch.ones(1, 1, 2, 3), maps, torch.tensor([0]))
    sigmoid = [1 / (1 + math.exp(-(6 - deleted))) for deleted in (0, 1, 3, 4, 6)]
    expected_auc = sum((a + b) / 2 for a, b in zip(sigmoid, sigmoid[1:])) / 4
    torch.testing.assert_close(metric.curve(), torch.tensor(sigmoid))
    assert metric.compute().item() == pytest.approx(expected_auc, abs=1e-6)


def test_deletion_follows_the_map_order():
    # weights 1..4 on pixels; the map picks the order in which they are deleted
    model = sum_classifier(4)
    with torch.no_grad():
        model[1].weight[0] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    images = torch.ones(2, 1, 2, 2)
    maps = torch.tensor([[[0.1, 0.2], [0.3, 0.4]], [[0.4, 0.3], [0.2, 0.1]]])
    metric = DeletionAUC(model, num_steps=4)
    metric.update(images, maps, torch.tensor([0, 0]))
    # logits left after each deletion: 10,6,3,1,0 (good order) and 10,9,7,4,0 (bad order)
    good = torch.sigmoid(torch.tensor([10.0, 6.0, 3.0, 1.0, 0.0]))
    bad = torch.sigmoid(torch.tensor([10.0, 9.0, 7.0, 4.0, 0.0]))
    torch.testing.assert_close(metric.curve(), (good + bad) / 2)


def test_updates_accumulate_and_batch_size_does_not_matter(batch):
    images, maps, targets = batch
    model = conv_classifier()
    whole = InsertionAUC(model, num_steps=8, batch_size=1000)
    whole.update(images, maps, targets)
    split = InsertionAUC(model, num_steps=8, batch_size=2)
    split.update(images[:1], maps[:1], targets[:1])
    split.update(images[1:], maps[1:], targets[1:])
    torch.testing.assert_close(split.compute(), whole.compute())
    torch.testing.assert_close(split.curve(), whole.curve())


def test_classifier_is_neither_changed_nor_owned(batch):
    images, maps, targets = batch
    model = conv_classifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metric = DeletionAUC(model, num_steps=4)
    metric.train()
    metric.update(images, maps, targets)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert list(metric.children()) == []
    assert set(metric.state_dict()) <= {"auc_sum", "curve_sum", "total"}
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"num_steps": 0}, "num_steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"kernel_size": 4}, "kernel_size"),
        ({"sigma": 0.0}, "sigma"),
    ],
)
def test_bad_settings_fail_by_name(options, name):
    with pytest.raises(ValueError, match=name):
        InsertionAUC(conv_classifier(), **options)
