"""1×1 convolutions as matrix products (``model.thread_invariant``): the same sums, the same bits at
any thread count."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hdm_lightning.pointwise import PointwiseAsMatmul, pointwise_as_matmul


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
