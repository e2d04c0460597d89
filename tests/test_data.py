"""Inputs: folders, lists, manifests, names, and errors that name the file."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from hdm_lightning.data import ExplanationDataModule, read_inputs, stable_names, validate_records
from hdm_lightning.inputs import resolve
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


def test_one_picture_is_an_input_as_a_file_or_a_package_photo(tmp_path):
    spot_images(tmp_path, count=2)
    (record,) = read_inputs(str(tmp_path / "spot1.png"))
    assert (record.path, record.name, record.target) == (str(tmp_path / "spot1.png"), "spot1", None)
    (photo,) = read_inputs("skimage:coffee")
    assert (photo.path, photo.name) == ("skimage:coffee", "coffee")
    with pytest.raises(FileNotFoundError, match="missing.png is neither"):
        read_inputs(str(tmp_path / "missing.png"))


def test_a_manifest_entry_is_a_package_photo_only_with_its_source_and_a_colon(tmp_path):
    assert resolve(tmp_path, "skimage:coffee") == "skimage:coffee"
    assert resolve(tmp_path, "skimage") == str(tmp_path / "skimage")  # a file that happens to be called so
    assert resolve(tmp_path, "photos/skimage:x.png") == str(tmp_path / "photos/skimage:x.png")


def test_duplicate_stems_get_distinct_names():
    assert stable_names(["a/x.png", "b/x.png", "y.png"]) == ["a__x", "b__x", "y"]


@pytest.mark.parametrize(
    ("content", "suffix", "message"),
    [('[{"target": 1}]', ".json", "entry 1: needs an 'image'"),
     ("target\n3\n", ".csv", "needs an 'image' .* column"),
     ('{"images": ["a.png"]}', ".json", "a JSON manifest is a list of objects"),
     ('{"image": "a.png"}\n{"image": "b.png",\n', ".jsonl", "line 2: not valid JSON"),
     ('[{"image": "a.png"}, "b.png"]', ".json", "entry 2: expected an object"),
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


def test_excel_csv_with_a_byte_order_mark_reads(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    spot_images(folder, count=2)
    (tmp_path / "excel.csv").write_bytes("image,target\r\nimages/spot0.png,1\r\nimages/spot1.png,0\r\n".encode("utf-8-sig"))
    records = read_inputs(str(tmp_path / "excel.csv"))
    assert [(r.name, r.target) for r in records] == [("spot0", 1), ("spot1", 0)]
    assert records[1].source == f"{tmp_path / 'excel.csv'}, line 3"


def test_bad_rows_fail_with_their_line_and_the_rest_run(tmp_path):
    """Targets out of range, a word for a target, a missing file and a broken header fail before
    the first step, each named; the good rows stay."""
    folder = tmp_path / "images"
    folder.mkdir()
    spot_images(folder, count=2)
    (folder / "broken.png").write_bytes(b"not a png at all")
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,target\nimages/spot0.png,1\nimages/spot1.png,5000\nimages/spot0.png,-5\n"
                        "images/spot1.png,cat\nimages/gone.png,0\nimages/broken.png,0\n".replace(
                            "images/spot0.png,-5", "./images/spot0.png,-5").replace(
                            "images/spot1.png,cat", "./images/spot1.png,cat"))
    records = read_inputs(str(manifest))
    good, failed = validate_records(records, num_classes=2)
    assert [r.path for r in good] == [str(tmp_path / "images" / "spot0.png")]
    reasons = {r.source.split(", ")[-1]: why for r, why in failed}
    assert set(reasons) == {"line 3", "line 4", "line 5", "line 6", "line 7"}
    assert "target 5000 is not a class of the classifier (0..1)" in reasons["line 3"]
    assert "target -5" in reasons["line 4"] and "target 'cat' is not a class index" in reasons["line 5"]
    assert "not found" in reasons["line 6"] and "broken.png" in reasons["line 7"]
    assert all(str(manifest) in why for why in list(reasons.values())[:3])


def test_datamodule_validate_drops_failures_and_batch_fails_bad_rows(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    spot_images(folder, count=2)
    (tmp_path / "m.jsonl").write_text('{"image": "images/spot0.png", "target": "x"}\n{"image": "images/spot1.png"}\n')
    data = ExplanationDataModule(str(tmp_path / "m.jsonl"), image_size=32)
    data.setup()
    batch = data.batch([0, 1])  # an engine that never validates still records the bad row
    assert batch["indices"] == [1] and "target 'x'" in batch["failed"][0][1]
    failed = data.validate(num_classes=10)
    assert [r.name for r in data.records] == ["spot1"] and "line 1" in failed[0][1]


@pytest.mark.parametrize(
    ("paths", "root"),
    [(["/abs/one/cat.png", "/abs/two/cat.png"], None),
     (["../up/cat.png", "cat.png"], "."),
     (["/x/../../etc/cat.png", "/y/cat.png"], None),
     (["a/b.png", "a__b.png", "a/b.jpg"], "."),
     (["weird name?.png", "weird name?.jpg"], None)],
)
def test_output_names_never_leave_the_run_folder(tmp_path, paths, root):
    names = stable_names(paths, None if root is None else Path(root))
    assert len(set(names)) == len(names)
    out = tmp_path / "out"
    for name in names:
        target = (out / "maps" / f"{name}.npy").resolve()
        assert target.parent == (out / "maps").resolve(), name
        assert "/" not in name and "\\" not in name and not name.startswith(".")


def test_a_repeated_row_fails_as_a_duplicate_and_another_target_gets_its_own_name(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    spot_images(folder, count=1)
    (tmp_path / "m.csv").write_text("image,target\nimages/spot0.png,1\nimages/spot0.png,0\nimages/spot0.png,1\n")
    records = read_inputs(str(tmp_path / "m.csv"))
    assert [r.name for r in records[:2]] == ["images__spot0.png__target1", "images__spot0.png__target0"]
    good, failed = validate_records(records, num_classes=2)
    assert len(good) == 2 and "line 4: the same image and target as" in failed[0][1] and "line 2" in failed[0][1]


def test_same_stem_two_suffixes_in_one_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for suffix in (".png", ".jpg"):
        Image.new("RGB", (8, 8)).save(folder / f"a{suffix}")
    assert sorted(r.name for r in read_inputs(str(folder))) == ["a.jpg", "a.png"]


def test_batch_hashes_are_the_file_bytes(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    paths = spot_images(folder, count=2)
    data = ExplanationDataModule(str(folder), image_size=32)
    data.setup()
    batch = data.batch([0, 1])
    assert batch["hashes"] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    assert [(f.height, f.width) for f in batch["frames"]] == [(32, 32), (32, 32)]
