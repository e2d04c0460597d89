"""Mixed precision: bf16 maps agree with float32 maps; masks and losses stay float32."""

import numpy as np
import torch

from hdm_lightning.outputs import RunFolder
from tests.helpers.run import build, maps
from tests.test_localisation import SETTINGS


def test_bf16_maps_correlate_with_float32_maps(synthetic_classifier, synthetic_scenes, tmp_path):
    folder, _, _ = synthetic_scenes
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        model, data, trainer = build(folder, tmp_path / precision, classifier=synthetic_classifier, batch_size=4,
                                     module=SETTINGS, trainer={"precision": precision})
        trainer.fit(model, datamodule=data)
        runs[precision] = maps(RunFolder(tmp_path / precision))
    for name, full in runs["32-true"].items():
        correlation = np.corrcoef(full.ravel(), runs["bf16-mixed"][name].ravel())[0, 1]
        assert correlation >= 0.95, (name, correlation)  # measured 0.99999+ on all 4 scenes


def test_masks_and_losses_stay_float32_under_autocast(synthetic_classifier, synthetic_scenes, tmp_path):
    folder, _, _ = synthetic_scenes
    model, data, trainer = build(folder, tmp_path / "run", classifier=synthetic_classifier, module=SETTINGS,
                                 trainer={"precision": "bf16-mixed", "max_steps": 3})
    trainer.fit(model, datamodule=data)
    assert all(mask.dtype == torch.float32 for mask in model.pool.masks.values())
    assert len(model.pool) > 0  # items in flight after 3 steps
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.classifier(model.stage_input).dtype == torch.bfloat16  # autocast is on
        (chunk,) = model.pool.chunks(model.size_of, None)
        losses = model.chunk_losses(chunk)
    assert losses.dtype == torch.float32 and losses.shape == (len(model.pool),)


class Downsampling(torch.nn.Module):
    """Full size, then stride 2 (a block of two layers), then stride 4; one activation shared by both."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.act = torch.nn.ReLU()
        self.down = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, stride=2, padding=1), torch.nn.ReLU())
        self.down2 = torch.nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.stem(x))
        x = self.act(self.down2(self.down(x)))
        return self.head(x.mean((2, 3)))


def test_high_resolution_modules_are_the_outermost_layers_before_the_maps_shrink():
    from hdm_lightning.precision import high_resolution_modules

    net, example = Downsampling(), torch.zeros(1, 3, 16, 16)
    assert high_resolution_modules(net, example, 1) == ["stem"]
    assert high_resolution_modules(net, example, 2) == ["stem", "down"]  # act is called again at stride 4
    assert high_resolution_modules(net, example, 4) == ["stem", "act", "down", "down2"]
    assert high_resolution_modules(net, torch.zeros(1, 3, 16, 32), 2) == ["stem", "down"]


def test_layers_in_float32_leave_autocast_and_come_back():
    from hdm_lightning.precision import run_in_float32

    torch.manual_seed(0)
    net, x = Downsampling(), torch.randn(2, 3, 16, 16)
    dtypes = {}
    for name in ("stem", "down", "down2", "head"):
        net.get_submodule(name).register_forward_hook(lambda m, a, out, name=name: dtypes.__setitem__(name, out.dtype))
    plain = net(x)
    handles = run_in_float32(net, ["stem", "down"])
    assert torch.equal(net(x), plain)  # outside autocast they change nothing
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)
        assert torch.is_autocast_enabled("cpu")  # the hooks gave autocast back
    assert dtypes == {"stem": torch.float32, "down": torch.float32, "down2": torch.bfloat16, "head": torch.bfloat16}
    for handle in handles:
        handle.remove()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(x)
    assert dtypes["stem"] == torch.bfloat16


def test_high_resolution_layers_in_float32_bring_bf16_mask_gradients_to_float32s():
    """EfficientNet-Lite0 on a real photo: d f_c / d mask under bf16 autocast is closer to float32's with
    the layers to stride 8 in float32 (at 96 and 224 px the cosine rose from 0.90-0.96 to 0.984-0.995)."""
    import torch.nn.functional as F

    from hdm_lightning import masks as M
    from torchvision.transforms.functional import normalize, pil_to_tensor, resize

    from hdm_lightning.data import IMAGENET_MEAN, IMAGENET_STD, load_image
    from hdm_lightning.models import EfficientNetLite0
    from hdm_lightning.module import MaskExplainer
    from hdm_lightning.precision import high_resolution_modules, run_in_float32

    classifier = EfficientNetLite0()
    photo = pil_to_tensor(resize(load_image("skimage:chelsea").convert("RGB"), [96, 96])).float() / 255
    image = normalize(photo, IMAGENET_MEAN, IMAGENET_STD)[None]
    target = int(classifier(image).argmax())
    blurred = MaskExplainer(classifier=classifier).make_substrate(image, "blur")

    def gradient(bf16: bool) -> torch.Tensor:
        mask = torch.full((1, 10, 10), 0.7, requires_grad=True)
        masked = M.apply_mask(image, M.upsample(mask, image.shape[-2:]), blurred)  # the defaults' first step
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logit = classifier(masked)[0, target].float()
        return torch.autograd.grad(logit, mask)[0].flatten()

    full, half = gradient(False), gradient(True)
    handles = run_in_float32(classifier, high_resolution_modules(classifier, image, 8))
    kept = gradient(True)
    for handle in handles:
        handle.remove()
    plain, better = F.cosine_similarity(full, half, dim=0), F.cosine_similarity(full, kept, dim=0)
    # measured 0.928 -> 0.983 alone, 0.959 -> 0.989 after this file's other tests (another thread count)
    assert 1 - better < 0.5 * (1 - plain) and better > 0.97, (float(plain), float(better))


def test_a_bf16_run_keeps_the_classifier_s_first_layers_in_float32_and_hands_it_back(synthetic_classifier,
                                                                                     synthetic_scenes, tmp_path):
    from lightning.pytorch import Callback

    class Hooks(Callback):
        def __init__(self) -> None:
            self.seen: list[int] = []  # hooks installed, after each step

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            self.seen.append(len(pl_module.float32_hooks))

    folder, _, _ = synthetic_scenes
    seen = {}
    for precision, stride in (("bf16-mixed", 8), ("bf16-mixed", 0), ("32-true", 8)):
        hooks = Hooks()
        model, data, trainer = build(folder, tmp_path / f"{precision}{stride}", classifier=synthetic_classifier,
                                     module={**SETTINGS, "float32_stride": stride},
                                     trainer={"precision": precision, "max_steps": 2}, callbacks=[hooks])
        trainer.fit(model, datamodule=data)
        seen[precision, stride] = set(hooks.seen)
        assert model.float32_hooks is None
        assert not any(m._forward_pre_hooks or m._forward_hooks for m in synthetic_classifier.modules())
    assert seen[("bf16-mixed", 8)] and min(seen[("bf16-mixed", 8)]) > 0
    assert seen[("bf16-mixed", 0)] == {0} and seen[("32-true", 8)] == {0}
