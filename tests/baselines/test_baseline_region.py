"""Every baseline must find the one region a hand-built classifier looks at, and ignore a decoy.

The classifier's class-1 logit is the mean brightness of a fixed 8×8 square (``REGION``); the
images are bright in that square and in a decoy square of the same size (``DECOY``), so a method
that merely follows brightness fails.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hdm_lightning.baselines import (
    RISE,
    ExtremalPerturbation,
    GradCAM,
    GradCAMPlusPlus,
    IntegratedGradients,
    Occlusion,
    ScoreCAM,
)

SIZE = 32
REGION = (slice(4, 12), slice(18, 26))
DECOY = (slice(20, 28), slice(4, 12))

FAST_METHODS = [
    GradCAM(),
    GradCAMPlusPlus(),
    ScoreCAM(batch_size=4),
    IntegratedGradients(n_steps=16),
    Occlusion(window=4, stride=2, batch_size=64),
    RISE(n_masks=1000, grid_size=4, batch_size=250),
    ExtremalPerturbation(areas=(0.0625,), steps=40, lr=0.1, mask_stride=2, mask_sigma=3.0, blur_sigma=3.0),
]
IDS = [type(m).__name__ for m in FAST_METHODS]



class RegionWeight(nn.Module):
    """Multiplies the input by a fixed map: 1 inside ``REGION``, 0 elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        weight = torch.zeros(SIZE, SIZE)
        weight[REGION] = 1.0
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def region_classifier() -> nn.Sequential:
    """Logits ``(0, 4·mean(x[REGION]) − 2)``: class 1 rests on the region only."""
    conv = nn.Conv2d(3, 4, kernel_size=1, bias=False)
    fc = nn.Linear(4, 2)
    with torch.no_grad():
        conv.weight.fill_(1 / 3)  # each channel: the mean over colours
        fc.weight.zero_()
        fc.bias.zero_()
        fc.weight[1] = SIZE * SIZE / 64  # undo the pooling over the whole image: mean over the region
        fc.bias[1] = -2.0
    net = nn.Sequential(RegionWeight(), conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc)
    return net.eval().requires_grad_(False)


def scenes(n: int = 2) -> torch.Tensor:
    """``(n, 3, SIZE, SIZE)`` dim noise with two bright squares: the region and the decoy."""
    generator = torch.Generator().manual_seed(0)
    images = 0.1 * torch.rand(n, 3, SIZE, SIZE, generator=generator)
    for rows, cols in (REGION, DECOY):
        images[:, :, rows, cols] += 0.8 + 0.2 * torch.rand(n, 3, 8, 8, generator=generator)
    return images


@pytest.fixture(scope="module")
def explained() -> dict[str, tuple[nn.Module, dict, torch.Tensor]]:
    """Each method's maps, with the classifier it explained and that classifier's state before."""
    results = {}
    for name, method in zip(IDS, FAST_METHODS):
        classifier = region_classifier()
        before = {k: v.clone() for k, v in classifier.state_dict().items()}
        results[name] = classifier, before, method.explain(classifier, scenes(), torch.tensor([1, 1]))
    return results


def assert_concentrated(maps: torch.Tensor) -> None:
    """Each map is > 2× brighter in ``REGION`` than in the decoy and elsewhere, and peaks inside."""
    outside = torch.ones(SIZE, SIZE, dtype=torch.bool)
    outside[REGION] = False
    for saliency in maps.cpu():
        inside = saliency[REGION].mean()
        assert inside > 2 * saliency[DECOY].mean()
        assert inside > 2 * saliency[outside].mean()
        row, col = divmod(int(saliency.argmax()), SIZE)
        assert REGION[0].start <= row < REGION[0].stop and REGION[1].start <= col < REGION[1].stop


@pytest.mark.parametrize("name", IDS)
def test_map_concentrates_on_the_region(explained, name):
    assert_concentrated(explained[name][2])


@pytest.mark.parametrize("name", IDS)
def test_maps_are_normalised_float32_per_image(explained, name):
    maps = explained[name][2]
    assert maps.shape == (2, SIZE, SIZE) and maps.dtype == torch.float32
    assert maps.device == scenes().device
    assert torch.allclose(maps.flatten(1).amin(1), torch.zeros(2))
    assert torch.allclose(maps.flatten(1).amax(1), torch.ones(2))


@pytest.mark.parametrize("name", IDS)
def test_classifier_left_untouched(explained, name):
    classifier, before, _ = explained[name]
    assert not classifier.training and not any(m.training for m in classifier.modules())
    assert not any(p.requires_grad or p.grad is not None for p in classifier.parameters())
    for key, value in classifier.state_dict().items():
        assert torch.equal(value, before[key])
    for module in classifier.modules():  # pytorch-grad-cam's hooks were released
        assert not module._forward_hooks and not module._backward_hooks


GRADIENT_METHODS = [FAST_METHODS[0], FAST_METHODS[3], FAST_METHODS[6]]


@pytest.mark.parametrize("method", GRADIENT_METHODS, ids=["GradCAM", "IG", "Extremal"])
def test_gradient_methods_work_in_inference_mode(method):
    classifier, images, targets = region_classifier(), scenes(1), torch.tensor([1])
    expected = method.explain(classifier, images, targets)
    with torch.inference_mode():  # as in a Lightning predict loop
        maps = method.explain(classifier, images.clone(), targets.clone())
    assert torch.allclose(maps, expected, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", FAST_METHODS, ids=IDS)
def test_maps_stay_on_the_gpu(method):
    classifier, images = region_classifier().cuda(), scenes().cuda()
    maps = method.explain(classifier, images, torch.tensor([1, 1]))  # targets on the CPU are moved
    assert maps.device == images.device and maps.dtype == torch.float32
    assert_concentrated(maps)
