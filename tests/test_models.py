"""Classifiers as people have them: timm by name, outputs in dicts, tuples and objects."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hdm_lightning.models import ImportedClassifier, TimmClassifier, freeze
from tests.helpers.run import explain, maps
from tests.helpers.tiny import SIZE, SPOT, SpotClassifier, spot_images

TINY_VIT = {"img_size": SIZE, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}


@pytest.mark.parametrize(("network", "output"), [("DictNet", "logits"), ("TupleNet", 1), ("ObjectNet", "logits")])
def test_the_output_setting_picks_the_logits(network, output):
    images = torch.rand(2, 3, SIZE, SIZE)
    reference = SpotClassifier().eval()(images)
    wrapped = freeze(ImportedClassifier(f"tests.helpers.wrapped.{network}", output=output))
    torch.testing.assert_close(wrapped(images), reference)


def test_a_missing_or_wrong_output_is_named():
    images = torch.rand(1, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match="returned a dict, not a tensor"):
        ImportedClassifier("tests.helpers.wrapped.DictNet")(images)
    with pytest.raises(ValueError, match=r"output='scores': the network returned keys \['features', 'logits'\]"):
        ImportedClassifier("tests.helpers.wrapped.DictNet", output="scores")(images)
    with pytest.raises(ValueError, match="returned 2 values"):
        ImportedClassifier("tests.helpers.wrapped.TupleNet", output=5)(images)


def test_a_tiny_timm_vit_without_pretrained_weights_loads_its_file_and_is_explained(tmp_path):
    pytest.importorskip("timm")
    vit = TimmClassifier("vit_tiny_patch16_224", num_classes=2, arguments=TINY_VIT)
    torch.save(vit.net.state_dict(), tmp_path / "vit.pt")
    again = freeze(TimmClassifier("vit_tiny_patch16_224", str(tmp_path / "vit.pt"), num_classes=2, arguments=TINY_VIT))
    images = torch.rand(2, 3, SIZE, SIZE)
    torch.testing.assert_close(again(images), freeze(vit)(images))
    assert again(images).shape == (2, 2) and again.class_names() is None
    with pytest.raises(ValueError, match="unknown name 'no_such_net'"):
        TimmClassifier("no_such_net")
    folder = tmp_path / "images"
    folder.mkdir()
    spot_images(folder, count=1)
    run = explain(folder, tmp_path / "run", classifier=again, schedule={"stages": 1, "min_steps": 5, "max_steps": 10,
                                                                         "check_every": 5})
    (saliency,) = maps(run).values()
    assert saliency.shape == (SIZE, SIZE) and np.isfinite(saliency).all() and saliency.max() > 0


def test_a_one_channel_timm_model_takes_grey_input():
    pytest.importorskip("timm")
    grey = freeze(TimmClassifier("resnet10t", num_classes=3, in_chans=1))
    assert grey(torch.rand(2, 1, SIZE, SIZE)).shape == (2, 3)


def test_the_spot_square_decides_the_wrapped_networks():
    images = torch.zeros(1, 3, SIZE, SIZE)
    images[(0, slice(None), *SPOT)] = 1.0
    logits = freeze(ImportedClassifier("tests.helpers.wrapped.ObjectNet", output="logits"))(images)
    assert logits[0, 1] > logits[0, 0]


def test_efficientnet_lite2_from_its_package_sees_the_cat(tmp_path):
    """Selected on the command line by ``EfficientNetLite.options`` (what the benchmarks pass)."""
    from hdm_lightning.cli import HDMCLI
    from hdm_lightning.data import ExplanationDataModule
    from hdm_lightning.models import EfficientNetLite, imagenet_categories
    from hdm_lightning.module import MaskExplainer

    (tmp_path / "photos.txt").write_text("skimage:chelsea\n")
    assert EfficientNetLite.options("lite0") == []
    cli = HDMCLI(MaskExplainer, ExplanationDataModule, run=False, save_config_callback=None,
                 args=[*EfficientNetLite.options("lite2"), "--data.images", str(tmp_path / "photos.txt"),
                       "--data.image_size", "260", "--out_dir", str(tmp_path / "run"), "--trainer.logger", "false"])
    assert cli.config.model.classifier.init_args.variant == "lite2"
    assert len(cli.model.classifier.net._blocks) == 21  # Lite2's MBConv blocks (Lite0 has 16)
    cli.datamodule.setup()
    logits = cli.model.classifier(cli.datamodule.batch([0])["images"])
    assert imagenet_categories()[logits.argmax()] == "Egyptian cat"


def test_an_unknown_or_missing_efficientnet_lite_is_named():
    from hdm_lightning.models import EfficientNetLite

    with pytest.raises(ValueError, match="lite0 ... lite4, got 'lite9'"):
        EfficientNetLite("lite9")
    with pytest.raises(ImportError, match="pip install efficientnet-lite4-pytorch-model"):
        EfficientNetLite("lite4")


class Flattened(torch.nn.Module):
    """A classifier of the old style: ``.view`` on a feature map, which channels-last inputs break."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.head = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Linear(4 * SIZE * SIZE, 2)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.conv(images)
        return self.head(features.view(features.shape[0], -1))


def test_a_classifier_that_views_a_channels_last_tensor_is_told_what_to_change(tmp_path):
    """``model.channels_last`` is on by default: the input check names the setting and the fix, ``explain``
    names its own spelling and hands the classifier back as it came, which then explains with it off."""
    from hdm_lightning.api import explain as explain_tensors
    from hdm_lightning.models import output_classes

    with pytest.raises(ValueError, match=r"\.view.*channels-last.*--model\.channels_last false"):
        output_classes(torch.nn.Module.to(Flattened(), memory_format=torch.channels_last), 3, SIZE)
    classifier, images = Flattened().eval(), torch.rand(1, 3, SIZE, SIZE)
    with pytest.raises(RuntimeError, match=r"explain: .*\.view.*channels_last=False"):
        explain_tensors(classifier, images, stages=1, min_steps=1, max_steps=2)
    assert all(p.is_contiguous() and p.requires_grad for p in classifier.parameters())
    found = explain_tensors(classifier, images, stages=1, min_steps=1, max_steps=2, channels_last=False)
    assert found["maps"].shape == (1, SIZE, SIZE)
