"""1×1 convolutions as matrix products (``model.thread_invariant``): the same sums, the same bits at
any thread count."""

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hdm_lightning.pointwise import PointwiseAsMatmul, mkl_service, one_row_differs, pointwise_as_matmul


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(2, 6, 5, 7), (6, 5, 7)])
def test_a_pointwise_convolution_is_the_same_product(bias, shape):
    """Value and input gradient of a 1×1 convolution, batched or not, match ``conv2d``'s to rounding."""
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 4, 1, bias=bias)
    x = torch.randn(shape, requires_grad=True)
    expected = conv(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    with PointwiseAsMatmul():
        found = conv(x)
    (found_grad,) = torch.autograd.grad(found.square().sum(), x)
    assert found.shape == expected.shape
    torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(found_grad, expected_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("conv", [nn.Conv2d(6, 4, 3, padding=1), nn.Conv2d(6, 4, 1, stride=2),
                                  nn.Conv2d(6, 6, 1, groups=3), nn.Conv2d(6, 4, 1, padding=1)])
def test_other_convolutions_are_left_as_they_are(conv):
    x = torch.randn(2, 6, 8, 8)
    with PointwiseAsMatmul():
        found = conv(x)
    assert torch.equal(found, conv(x))


def test_the_hooks_act_during_the_classifier_pass_only_and_come_off():
    """Inside the classifier's forward the 1×1 convolution is a product (another rounding than
    ``conv2d``'s on most inputs); after its pass, and once the hooks are removed, ``conv2d`` again."""
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Conv2d(64, 64, 1), nn.ReLU(), nn.Conv2d(64, 2, 1))
    x = torch.randn(4, 64, 16, 16)
    plain = classifier(x)
    hooks = pointwise_as_matmul(classifier)
    hooked = classifier(x)
    assert torch.equal(F.conv2d(x, classifier[0].weight, classifier[0].bias), classifier[0](x))  # outside the pass
    for handle in hooks:
        handle.remove()
    assert torch.equal(classifier(x), plain)
    torch.testing.assert_close(hooked, plain, rtol=1e-4, atol=1e-5)
    with PointwiseAsMatmul():
        assert torch.equal(classifier(x), hooked)


def test_efficientnet_gradients_are_the_same_bits_at_one_thread_and_two():
    """Why ``model.thread_invariant`` exists: oneDNN's 1×1 convolutions split their sums by the thread
    count, so EfficientNet-Lite0's gradient with respect to a 224-px input moves between one and two
    threads (relative 3e-3 on random inputs, an AMD EPYC: ``benchmarks/row_independence.py --size
    224``); with the hooks it is the same to the bit. The class score of a real photo."""
    from skimage import data

    from hdm_lightning.models import EfficientNetLite

    classifier = EfficientNetLite().eval().requires_grad_(False)
    photo = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float()[None] / 255
    photo = F.interpolate(photo, size=224, mode="bilinear", antialias=True).repeat(2, 1, 1, 1)
    hooks = pointwise_as_matmul(classifier)
    found, threads = {}, torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            image = photo.clone().requires_grad_(True)
            classifier(image)[:, 285].sum().backward()
            found[count] = image.grad
    finally:
        torch.set_num_threads(threads)
        for handle in hooks:
            handle.remove()
    assert torch.equal(found[1], found[2])


@pytest.mark.parametrize("channels_last", [False, True])
def test_the_product_keeps_the_input_memory_format(channels_last):
    """A classifier may ``view`` a convolution's output (a 1×1 head flattened): the product returns
    the layout ``conv2d`` would."""
    conv = nn.Conv2d(6, 4, 1)
    x = torch.randn(2, 6, 5, 5)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=layout)
    with PointwiseAsMatmul():
        found = conv(x)
    assert found.is_contiguous(memory_format=layout)
    if not channels_last:
        assert found.view(2, -1).shape == (2, 100)


def fresh_python(code: str) -> str:
    """``code``'s output in a new interpreter, whose MKL has not run yet (MKL_CBWR left unset)."""
    import os
    import subprocess
    import sys

    env = {key: value for key, value in os.environ.items() if key != "MKL_CBWR"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


ONE_ROW_PRODUCT = """
import torch
from hdm_lightning.pointwise import strict_mkl
{before}
strict = strict_mkl()
a, b = torch.randn(49, 1152), torch.randn(1152, 192)  # one image's 7x7 projection at 224 px
torch.set_num_threads(1)
one = a @ b
torch.set_num_threads(2)
print(strict, torch.equal(one, a @ b))
"""


@pytest.mark.skipif(mkl_service() is None, reason="PyTorch without MKL")
def test_strict_mkl_gives_a_one_row_product_the_same_bits_at_one_thread_and_two():
    """The product that still split its sum by the thread count (stop 59) gives the same bits once MKL is
    strict; asked too late (after MKL's first product) it says so."""
    assert fresh_python(ONE_ROW_PRODUCT.format(before="")).split() == ["True", "True"]
    too_late = fresh_python(ONE_ROW_PRODUCT.format(before="torch.randn(64, 64) @ torch.randn(64, 64)"))
    assert too_late.split()[0] == "False"


@pytest.mark.skipif(mkl_service() is None, reason="PyTorch without MKL: its products' sums are another library's")
def test_the_defaults_give_a_real_classifier_the_same_map_in_any_batch_and_at_any_thread_count():
    """Issue 7, point 3, at the defaults (1×1 products, MKL strict, channels-last): EfficientNet-Lite0
    explaining two real photos (64 px, one stage of 6 steps a level) gives the same maps to the bit in a
    batch of two at one thread and one image at a time at two; with oneDNN's convolutions (both options
    off) they move, where this CPU's oneDNN gives the classifier's gradient other bits at two threads."""
    from skimage import data

    from hdm_lightning.api import explain
    from hdm_lightning.data import IMAGENET_MEAN, IMAGENET_STD
    from hdm_lightning.models import EfficientNetLite

    classifier = EfficientNetLite().eval()
    photos = torch.cat([F.interpolate(torch.from_numpy(photo).permute(2, 0, 1).float()[None] / 255, size=(64, 64),
                                      mode="bilinear", antialias=True) for photo in (data.chelsea(), data.coffee())])
    photos = (photos - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]

    def fused(threads: int, batch_size: int, **options) -> Tensor:
        torch.set_num_threads(threads)
        return explain(classifier, photos, stages=1, min_steps=3, max_steps=6, batch_size=batch_size, **options)["maps"]

    assert torch.equal(fused(1, 2), fused(2, 1))
    gradients = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        image = photos[:1].clone().requires_grad_(True)
        classifier(image)[:, 285].sum().backward()
        gradients.append(image.grad)
    if not torch.equal(*gradients):
        oneDNN = {"thread_invariant": False, "channels_last": False}
        assert not torch.equal(fused(1, 2, **oneDNN), fused(2, 1, **oneDNN))


def row_sums(batch: Tensor) -> Tensor:
    return batch.flatten(1).sum(1)


@pytest.mark.parametrize(("classify", "differs"), [
    (row_sums, False),  # each row its own arithmetic
    (lambda batch: row_sums(batch) * (1 + 2**-20 * (len(batch) == 1)), True),  # another path for one row
    (lambda batch: row_sums(batch) + batch.mean(), False),  # rows coupled: padding with zeros would not help
])
def test_one_row_differs_only_where_padding_with_zeros_gives_the_bits_of_any_batch(classify, differs):
    assert one_row_differs(classify, torch.rand(1, 3, 4, 4)) == differs


@pytest.mark.skipif(mkl_service() is None, reason="PyTorch without MKL: its products' sums are another library's")
def test_an_item_alone_in_its_pass_gets_the_map_it_gets_among_others(monkeypatch):
    """At 64 px EfficientNet-Lite0's backward gives a row passed alone other bits than the same row among others
    (BatchNorm at the 2×2 maps; stop 68). With one chain an image's item runs alone in a batch of one image and
    among others in a batch of two: the engine pads such passes to two rows, so both give the same maps to the
    bit; without the padding they move, where the probe finds this CPU's lone row other bits."""
    from skimage import data

    from hdm_lightning.api import explain
    from hdm_lightning.data import IMAGENET_MEAN, IMAGENET_STD
    from hdm_lightning.models import EfficientNetLite

    classifier = EfficientNetLite().eval()
    photos = torch.cat([F.interpolate(torch.from_numpy(photo).permute(2, 0, 1).float()[None] / 255, size=(64, 64),
                                      mode="bilinear", antialias=True) for photo in (data.chelsea(), data.coffee())])
    photos = (photos - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def fused(batch_size: int) -> Tensor:
        return explain(classifier, photos, stages=1, min_steps=6, max_steps=6, benchmark_sizes=[6], block_factors=[2],
                       batch_size=batch_size)["maps"]

    found = []

    def probe(classify, row):
        found.append(one_row_differs(classify, row))
        return found[-1]

    monkeypatch.setattr("hdm_lightning.module.one_row_differs", probe)
    try:
        assert torch.equal(fused(1), fused(2))
        if found[0]:  # this CPU gives a lone row other bits at 64 px (an Intel Xeon does)
            monkeypatch.setattr("hdm_lightning.module.one_row_differs", lambda classify, row: False)
            assert not torch.equal(fused(1), fused(2))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(mkl_service() is None, reason="PyTorch without MKL")
def test_train_masks_makes_mkl_strict_by_itself(tmp_path):
    """The command line asks MKL first (no ``MKL_CBWR`` in its environment): no warning that it was late."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers.tiny import spot_images
    from tests.test_cli import SMALL

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "images").mkdir()
    spot_images(tmp_path / "images", count=1)
    env = {key: value for key, value in os.environ.items() if key != "MKL_CBWR"} | {"PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, str(root / "train_masks.py"), f"--data.images={tmp_path / 'images'}",
                           f"--out_dir={tmp_path / 'run'}", *SMALL, "--trainer.logger=false"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MKL ran before" not in done.stderr
