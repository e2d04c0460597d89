"""Ground-truth loaders: hand-computed masks from small files written to tmp_path."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hdm_lightning.groundtruth import BBoxCSV, GroundTruth, MaskFolder, VOCAnnotations, boxes_to_mask

CHESTX_HEADER = "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"


def _grid(rows: int, cols: int, ones: list[tuple[slice, slice]]) -> torch.Tensor:
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    for r, c in ones:
        mask[r, c] = True
    return mask


# --- boxes_to_mask -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("box", "source", "size", "expected"),
    [
        # identity frame: half-open [x0, x1) x [y0, y1)
        ([1, 2, 3, 4], (4, 4), (4, 4), [(slice(2, 4), slice(1, 3))]),
        # 8 -> 4 halves coordinates
        ([2, 0, 6, 4], (8, 8), (4, 4), [(slice(0, 2), slice(1, 3))]),
        # a box smaller than an output pixel still marks the pixel it overlaps
        ([5, 5, 6, 6], (8, 8), (2, 2), [(slice(1, 2), slice(1, 2))]),
        # non-square scaling: x by 1/2, y by 2
        ([2, 1, 4, 2], (4, 8), (8, 4), [(slice(2, 4), slice(1, 2))]),
        # fractional edges: [0.5, 1.5) overlaps pixels 0 and 1
        ([0.5, 0.5, 1.5, 1.5], (4, 4), (4, 4), [(slice(0, 2), slice(0, 2))]),
        # boxes past the border are clipped
        ([-3, 2, 10, 3], (4, 4), (4, 4), [(slice(2, 3), slice(0, 4))]),
    ],
)
def test_boxes_to_mask_known_answers(box, source, size, expected):
    mask = boxes_to_mask(torch.tensor([box], dtype=torch.float32), source, *size)
    assert torch.equal(mask, _grid(*size, expected))


def test_boxes_to_mask_unions_boxes_and_handles_none():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [2.0, 2.0, 3.0, 4.0]])
    assert torch.equal(boxes_to_mask(boxes, (4, 4), 4, 4),
                       _grid(4, 4, [(slice(0, 1), slice(0, 1)), (slice(2, 4), slice(2, 3))]))
    assert not boxes_to_mask(torch.zeros(0, 4), (4, 4), 3, 5).any()


# --- BBoxCSV -------------------------------------------------------------------------------------


@pytest.fixture
def chestx_csv(tmp_path):
    path = tmp_path / "BBox_List_2017.csv"
    path.write_text(
        CHESTX_HEADER
        + "a.png,Atelectasis,0,0,256,512,,,\n"  # left quarter, top half of 1024
        + "a.png,Nodule,768,768,256,256,,,\n"  # bottom-right sixteenth
        + "b.png,Nodule,512,0,512,128,,,\n"
    )
    return path


def test_bbox_csv_unites_rows_of_an_image(chestx_csv):
    gt = BBoxCSV(chestx_csv)
    assert isinstance(gt, GroundTruth)
    expected = _grid(8, 8, [(slice(0, 4), slice(0, 2)), (slice(6, 8), slice(6, 8))])
    assert torch.equal(gt.mask_for("a.png", 8, 8), expected)
    assert gt.names == ("a.png", "b.png")


def test_bbox_csv_matches_by_file_name_and_scales_to_any_size(chestx_csv):
    mask = BBoxCSV(chestx_csv).mask_for("/data/images/b.png", 16, 4)
    assert torch.equal(mask, _grid(16, 4, [(slice(0, 2), slice(2, 4))]))


def test_bbox_csv_filters_labels(chestx_csv):
    gt = BBoxCSV(chestx_csv, labels=["Atelectasis"])
    assert torch.equal(gt.mask_for("a.png", 4, 4), _grid(4, 4, [(slice(0, 2), slice(0, 1))]))
    assert gt.names == ("a.png",)
    with pytest.raises(KeyError, match="b.png"):
        gt.mask_for("b.png", 4, 4)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("Image Index,Finding Label,x,y,w,h\n", r"missing columns \['Bbox \[x', 'h\]'\]"),
        (CHESTX_HEADER + "a.png,Nodule,1,2,three,4,,,\n", "line 2"),
        (CHESTX_HEADER + "a.png,Nodule,1,2\n", "line 2"),
        (CHESTX_HEADER + "a.png,Nodule,1,2,0,4,,,\n", "positive"),
    ],
)
def test_bbox_csv_rejects_malformed_files_by_name(tmp_path, content, match):
    path = tmp_path / "boxes.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        BBoxCSV(path)
    assert "boxes.csv" in str(info.value)


def test_bbox_csv_rejects_missing_file_and_unknown_labels(tmp_path, chestx_csv):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        BBoxCSV(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="Infiltrate"):
        BBoxCSV(chestx_csv, labels=["Infiltrate"])
    with pytest.raises(ValueError, match="labels"):
        BBoxCSV(chestx_csv, labels="Nodule")
    with pytest.raises(KeyError, match="c.png"):
        BBoxCSV(chestx_csv).mask_for("c.png", 4, 4)


# --- MaskFolder ----------------------------------------------------------------------------------


def _save_grey(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def test_mask_folder_thresholds_and_mirrors_relative_paths(tmp_path):
    _save_grey(tmp_path / "001.Albatross" / "bird_1.png", [[0, 100, 128], [255, 127, 200]])
    gt = MaskFolder(tmp_path)
    expected = torch.tensor([[False, False, True], [True, False, True]])
    assert torch.equal(gt.mask_for("001.Albatross/bird_1.jpg", 2, 3), expected)
    assert torch.equal(MaskFolder(tmp_path, threshold=0).mask_for("001.Albatross/bird_1.jpg", 2, 3),
                       torch.tensor([[False, True, True], [True, True, True]]))


def test_mask_folder_resizes_with_nearest_neighbour(tmp_path):
    _save_grey(tmp_path / "x.png", [[255, 0], [0, 255]])
    up = MaskFolder(tmp_path).mask_for("x.jpg", 4, 6)
    expected = _grid(4, 6, [(slice(0, 2), slice(0, 3)), (slice(2, 4), slice(3, 6))])
    assert torch.equal(up, expected)
    _save_grey(tmp_path / "y.png", np.kron([[1, 0], [0, 0]], np.full((4, 4), 255)))  # 8x8
    assert torch.equal(MaskFolder(tmp_path).mask_for("y.png", 2, 2),
                       torch.tensor([[True, False], [False, False]]))


def test_mask_folder_finds_jpg_and_rgb_masks(tmp_path):
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 1] = 255
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=100)
    assert torch.equal(MaskFolder(tmp_path).mask_for("c.jpeg", 2, 2),
                       torch.tensor([[False, True], [False, False]]))


def test_mask_folder_errors_name_the_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        MaskFolder(tmp_path / "missing_dir")
    with pytest.raises(ValueError, match="threshold"):
        MaskFolder(tmp_path, threshold=255)
    with pytest.raises(FileNotFoundError, match="absent.png"):
        MaskFolder(tmp_path).mask_for("absent.jpg", 2, 2)
    (tmp_path / "broken.png").write_text("not an image")
    with pytest.raises(ValueError, match="broken.png"):
        MaskFolder(tmp_path).mask_for("broken.jpg", 2, 2)


# --- VOCAnnotations ------------------------------------------------------------------------------


def _voc(objects: str, width: int = 8, height: int = 4) -> str:
    return (f"<annotation><filename>img.jpg</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size>{objects}</annotation>")


def _object(name: str, xmin, ymin, xmax, ymax, difficult: int = 0) -> str:
    return (f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
            f"<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>")


@pytest.fixture
def voc_root(tmp_path):
    objects = _object("dog", 1, 1, 2, 2) + _object("cat", 5, 3, 8, 4)
    objects += _object("cat", 4, 1, 4, 1, difficult=1)
    (tmp_path / "img.xml").write_text(_voc(objects))
    return tmp_path


def test_voc_boxes_are_one_based_inclusive(voc_root):
    mask = VOCAnnotations(voc_root).mask_for("img.jpg", 4, 8)
    boxes = [(slice(0, 2), slice(0, 2)), (slice(2, 4), slice(4, 8)), (slice(0, 1), slice(3, 4))]
    expected = _grid(4, 8, boxes)
    assert torch.equal(mask, expected)


def test_voc_filters_classes_and_difficult_and_scales(voc_root):
    cats = VOCAnnotations(voc_root, classes=["cat"], include_difficult=False).mask_for("img.jpg", 2, 2)
    assert torch.equal(cats, torch.tensor([[False, False], [False, True]]))
    assert not VOCAnnotations(voc_root, classes=["bird"]).mask_for("img.jpg", 4, 8).any()
    dogs = VOCAnnotations(voc_root, classes=["dog"]).mask_for("img.jpg", 8, 16)  # x2 both ways
    assert torch.equal(dogs, _grid(8, 16, [(slice(0, 4), slice(0, 4))]))


@pytest.mark.parametrize(
    "content",
    [
        "<annotation><size>",  # not XML
        "<annotation><object><name>a</name></object></annotation>",  # no <size>
        _voc(_object("dog", 1, 1, "x", 2)),  # non-numeric coordinate
        _voc("<object><name>dog</name><bndbox><xmin>1</xmin></bndbox></object>"),  # missing fields
        _voc(_object("dog", 3, 1, 2, 2)),  # xmax < xmin
        _voc("", width=0),
    ],
)
def test_voc_rejects_malformed_annotations_by_name(tmp_path, content):
    (tmp_path / "bad.xml").write_text(content)
    with pytest.raises(ValueError, match="bad.xml"):
        VOCAnnotations(tmp_path).mask_for("bad.jpg", 4, 4)


def test_voc_missing_files_and_settings(tmp_path):
    with pytest.raises(FileNotFoundError, match="ghost.xml"):
        VOCAnnotations(tmp_path).mask_for("ghost.jpg", 4, 4)
    with pytest.raises(FileNotFoundError, match="Annotations"):
        VOCAnnotations(tmp_path / "Annotations")
    with pytest.raises(ValueError, match="classes"):
        VOCAnnotations(tmp_path, classes=[])


def test_requested_size_must_be_positive(voc_root):
    with pytest.raises(ValueError, match="height"):
        VOCAnnotations(voc_root).mask_for("img.jpg", 0, 4)
