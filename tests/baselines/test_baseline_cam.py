"""CAM baselines: the default target layer, explicit layers, and pytorch-grad-cam's side effects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hdm_lightning.baselines import GradCAM, GradCAMPlusPlus, ScoreCAM, find_target_layer


class TinyResNet(nn.Module):
    """The child layout of a torchvision ResNet, at toy size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.layer2 = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU())
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(self.avgpool(x).flatten(1))


class TinyVGG(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.LazyLinear(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def frozen(net: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    for p in net.parameters():
        nn.init.normal_(p)
    return net.eval().requires_grad_(False)


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (TinyResNet(), "layer2"),
        (nn.Sequential(nn.Identity(), TinyResNet()), "1.layer2"),
        (TinyVGG(), "features.2"),
        (nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU(), nn.Flatten()), "0"),
    ],
    ids=["resnet", "wrapped", "vgg", "single-conv"],
)
def test_find_target_layer(model, expected):
    assert find_target_layer(model) == expected


def test_find_target_layer_without_conv_names_the_setting():
    with pytest.raises(ValueError, match="^target_layer="):
        find_target_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


def test_unknown_target_layer_raises_at_explain():
    net, images = frozen(TinyResNet()), torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="^target_layer='layer9'"):
        GradCAM(target_layer="layer9").explain(net, images, torch.tensor([0]))


def test_gradcam_on_an_explicit_layer_matches_the_definition():
    net, images, targets = frozen(TinyResNet()), torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    maps = GradCAM(target_layer="layer1.0").explain(net, images, targets)  # full resolution: no resize

    # Reference from the paper: ReLU(Σ_k mean(∂y_c/∂A_k) A_k), min-max per image.
    activations = net.layer1[0](net.relu(net.bn1(net.conv1(images)))).requires_grad_(True)  # (2, 4, 8, 8)
    logits = net.fc(net.avgpool(net.layer2(net.layer1[1](activations))).flatten(1))
    (grads,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), activations)
    cam = (grads.mean(dim=(2, 3), keepdim=True) * activations).sum(dim=1).relu().detach()  # (2, 8, 8)
    low, high = cam.flatten(1).amin(1)[:, None, None], cam.flatten(1).amax(1)[:, None, None]
    assert torch.allclose(maps, (cam - low) / (high - low), atol=1e-5)


@pytest.mark.parametrize(
    "method", [GradCAM(), GradCAMPlusPlus(), ScoreCAM(batch_size=3)], ids=["gc", "gcpp", "score"]
)
def test_cam_restores_a_trainable_classifier(method):
    torch.manual_seed(0)
    net = TinyResNet().train()  # pytorch-grad-cam calls eval() and zero_grad() on the model
    grad = torch.full_like(net.fc.bias, 2.0)
    net.fc.bias.grad = grad
    before = {k: v.clone() for k, v in net.state_dict().items()}
    maps = method.explain(net, torch.randn(2, 3, 8, 8), torch.tensor([0, 2]))
    assert maps.shape == (2, 8, 8)
    assert all(m.training for m in net.modules())
    assert all(p.requires_grad for p in net.parameters())
    assert net.fc.bias.grad is grad and net.fc.weight.grad is None
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not any(m._forward_hooks for m in net.modules())
