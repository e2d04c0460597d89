"""Inputs: folders, lists, manifests, names, and errors that name the file."""

import json

import pytest
import torch

from hdm_lightning.data import ExplanationDataModule, read_inputs, stable_names
from tests.helpers.tiny import spot_images


def test_folder_list_and_manifests_agree(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    spot_images(folder, count=2)
    (tmp_path / "list.txt").write_text("# two images\nimages/spot0.png\nimages/spot1.png\n")
    (tmp_path / "m.csv").write_text("image,target\nimages/spot0.png,3\nimages/spot1.png,\n")
    (tmp_path / "m.json").write_text(json.dumps([{"image": "images/spot0.png", "target": 3}, {"path": "images/spot1.png"}]))
    by_folder = read_inputs(str(folder))
    by_list = read_inputs(str(tmp_path / "list.txt"))
    assert [r.name for r in by_folder] == [r.name for r in by_list] == ["spot0", "spot1"]
    for manifest in ("m.csv", "m.json"):
        records = read_inputs(str(tmp_path / manifest))
        assert [r.target for r in records] == [3, None]
        assert records[0].path == str(tmp_path / "images" / "spot0.png")


def test_builtin_photos_and_package_paths_in_lists(tmp_path):
    assert [r.name for r in read_inputs("builtin")] == ["chelsea", "coffee", "grace_hopper"]
    (tmp_path / "photos.txt").write_text("skimage:chelsea\n")
    data = ExplanationDataModule(str(tmp_path / "photos.txt"), image_size=64)
    data.setup()
    batch = data.batch([0])
    assert batch["images"].shape == (1, 3, 64, 64) and batch["targets"].tolist() == [-1]
    # normalised with the ImageNet statistics: a mid-grey pixel is near zero
    assert batch["images"].mean().abs() < 2


def test_duplicate_stems_get_distinct_names():
    assert stable_names(["a/x.png", "b/x.png", "y.png"]) == ["a__x", "b__x", "y"]


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [("image,target\nimages/a.png,cat\n", ".csv", "entry 1: target 'cat'"),
     ('[{"target": 1}]', ".json", "entry 1: needs an 'image'"),
     ("a.png\n", ".xml", "suffix '.xml'")],
)
def test_bad_manifests_name_the_file_and_entry(tmp_path, content, suffix, message):
    path = tmp_path / f"manifest{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        read_inputs(str(path))
    assert str(path) in str(error.value) or suffix == ".xml"


def test_settings_are_validated_by_name():
    with pytest.raises(ValueError, match="data.batch_size"):
        ExplanationDataModule(batch_size=0)
    with pytest.raises(ValueError, match="data.image_size"):
        ExplanationDataModule(image_size=2)
    assert torch.equal(ExplanationDataModule().mean, torch.tensor([0.485, 0.456, 0.406]))
