"""Ground-truth masks from dataset annotations, at the size an image is explained at.

Each loader answers one question: which pixels of image ``image_name``, shown at
``(height, width)``, belong to the annotated objects? Three formats:

- ``BBoxCSV``: NIH ChestX-ray14 ``BBox_List_2017.csv`` (boxes in pixels of the 1024x1024 original);
- ``MaskFolder``: one mask image per image, same relative path and stem (CUB-200-2011 style);
- ``VOCAnnotations``: PASCAL VOC XML files (1-based inclusive ``bndbox``, image size in ``<size>``).

Boxes are rescaled from the annotation's frame and rasterised with ``boxes_to_mask``; mask images
are thresholded, then resized with nearest-neighbour sampling.
"""

from __future__ import annotations

import csv
import os
import xml.etree.ElementTree as ET
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

CHESTX_SIZE = (1024, 1024)  # (height, width) of the ChestX-ray14 originals
CHESTX_COLUMNS = ("Image Index", "Finding Label", "Bbox [x", "y", "w", "h]")
MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def boxes_to_mask(boxes: Tensor, source_size: tuple[int, int], height: int, width: int) -> Tensor:
    """Rasterise boxes given in a ``source_size`` frame onto a ``(height, width)`` pixel grid.

    Each box ``(x0, y0, x1, y1)`` is half-open in 0-based pixel units of the source frame
    (``source_size`` is ``(height, width)``). It is scaled by ``width / source_w`` and
    ``height / source_h``, and a pixel is in the mask when its square overlaps a scaled box with
    positive area, so a box smaller than a pixel still marks one.

    Args:
        boxes: ``(K, 4)`` float, possibly ``K = 0``.
        source_size: ``(height, width)`` of the frame the boxes are given in.
        height: rows of the output mask.
        width: columns of the output mask.

    Returns:
        ``(height, width)`` bool, the union of the boxes.

    Example:
        >>> boxes_to_mask(torch.tensor([[2.0, 0.0, 6.0, 4.0]]), (8, 8), 4, 4).int()
        tensor([[0, 1, 1, 0],
                [0, 1, 1, 0],
                [0, 0, 0, 0],
                [0, 0, 0, 0]], dtype=torch.int32)
    """
    scaled = boxes.double() * torch.tensor(
        [width / source_size[1], height / source_size[0]] * 2, dtype=torch.float64)  # (K, 4)
    cols = torch.arange(width, dtype=torch.float64)  # pixel c spans [c, c + 1)
    rows = torch.arange(height, dtype=torch.float64)
    in_x = (cols + 1 > scaled[:, 0:1]) & (cols < scaled[:, 2:3])  # (K, W)
    in_y = (rows + 1 > scaled[:, 1:2]) & (rows < scaled[:, 3:4])  # (K, H)
    return (in_y.unsqueeze(2) & in_x.unsqueeze(1)).any(0)  # (H, W)


def _check_size(height: int, width: int) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got height={height}, width={width}")


def _check_names(setting: str, names: Sequence[str] | None) -> tuple[str, ...] | None:
    """``None`` stays ``None`` (no filter); otherwise a non-empty tuple of non-empty strings."""
    if names is None:
        return None
    if isinstance(names, str) or not names or not all(isinstance(s, str) and s for s in names):
        raise ValueError(f"{setting} must be None or a non-empty list of names, got {names!r}")
    return tuple(names)


def _existing_dir(root: str | os.PathLike, setting: str) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise FileNotFoundError(f"{setting}={str(path)!r} is not an existing folder")
    return path


class GroundTruth(ABC):
    """Where the annotated objects of an image are, as a boolean mask at a requested size."""

    @abstractmethod
    def mask_for(self, image_name: str, height: int, width: int) -> Tensor:
        """The ``(height, width)`` bool mask of the annotated objects of ``image_name``.

        Args:
            image_name: the image's path relative to its image folder, or its file name.
            height: rows of the mask, the height the image is explained at.
            width: columns of the mask.
        """


class BBoxCSV(GroundTruth):
    """Boxes of NIH ChestX-ray14 ``BBox_List_2017.csv``; several rows of an image are united.

    The file is read once, at construction. Images are matched by file name (``Path.name``), else
    by stem, so a DICOM ``00000001_000.dcm`` finds the boxes of ``00000001_000.png``.

    Args:
        path: the CSV file.
        labels: keep only boxes whose "Finding Label" is one of these; ``None`` keeps all.
        source_size: ``(height, width)`` of the images the boxes are given in.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if a column is missing, a row is malformed, or a label never occurs.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        labels: Sequence[str] | None = None,
        source_size: tuple[int, int] = CHESTX_SIZE,
    ) -> None:
        self.path = Path(path)
        self.labels = _check_names("labels", labels)
        _check_size(*source_size)
        self.source_size = source_size
        rows = self._read()
        if self.labels is not None and (unknown := set(self.labels) - {label for _, label, _ in rows}):
            known = sorted({label for _, label, _ in rows})
            raise ValueError(f"labels {sorted(unknown)} never occur in {self.path}; it has {known}")
        self._boxes: dict[str, list[list[float]]] = {}
        for name, label, box in rows:
            if self.labels is None or label in self.labels:
                self._boxes.setdefault(name, []).append(box)
        self._stems = {Path(name).stem: name for name in self._boxes}

    @property
    def names(self) -> tuple[str, ...]:
        """The image names that have at least one box of the chosen labels, sorted."""
        return tuple(sorted(self._boxes))

    def mask_for(self, image_name: str, height: int, width: int) -> Tensor:
        """Union of the image's boxes; ``KeyError`` if it has none of the chosen labels."""
        _check_size(height, width)
        name = Path(image_name).name
        name = name if name in self._boxes else self._stems.get(Path(image_name).stem, name)
        if name not in self._boxes:
            raise KeyError(f"{self.path} has no box for image {name!r} (labels={self.labels})")
        return boxes_to_mask(torch.tensor(self._boxes[name]), self.source_size, height, width)

    def _read(self) -> list[tuple[str, str, list[float]]]:
        """Rows as (image name, label, [x0, y0, x1, y1]) in the source frame."""
        if not self.path.is_file():
            raise FileNotFoundError(f"bounding-box CSV {str(self.path)!r} does not exist")
        with self.path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = [cell.strip() for cell in next(reader, [])]
            missing = [c for c in CHESTX_COLUMNS if c not in header]
            if missing:
                raise ValueError(f"{self.path}: missing columns {missing}; header is {header}")
            index = [header.index(c) for c in CHESTX_COLUMNS]
            rows = (row for row in reader if any(cell.strip() for cell in row))
            return [self._parse(row, index, reader.line_num) for row in rows]

    def _parse(self, row: list[str], index: list[int], line: int) -> tuple[str, str, list[float]]:
        try:
            name, label, *xywh = (row[i].strip() for i in index)
            x, y, w, h = (float(v) for v in xywh)
        except (IndexError, ValueError) as error:
            raise ValueError(f"{self.path}, line {line}: malformed row {row}: {error}") from None
        if not (w > 0 and h > 0):
            raise ValueError(f"{self.path}, line {line}: box width and height must be positive, "
                             f"got {row}")
        return name, label, [x, y, x + w, y + h]


class MaskFolder(GroundTruth):
    """Segmentation masks in a folder that mirrors the image folder (CUB-200-2011 style).

    The mask of ``"001.Albatross/a_0001.jpg"`` is ``root/001.Albatross/a_0001.png`` (the first of
    ``suffixes`` that exists). Pixels brighter than ``threshold`` (grey levels 0-255) are object;
    the mask is then resized to the requested size with nearest-neighbour sampling.

    Args:
        root: the mask folder.
        threshold: grey level above which a pixel is object; 0 means "any non-zero".
        suffixes: mask file suffixes to try, in order.

    Raises:
        FileNotFoundError: if ``root`` is not a folder.
        ValueError: if ``threshold`` is not in 0..254 or ``suffixes`` is empty.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        threshold: int = 127,
        suffixes: Sequence[str] = MASK_SUFFIXES,
    ) -> None:
        self.root = _existing_dir(root, "root")
        if not 0 <= threshold <= 254:
            raise ValueError(f"threshold must be in 0..254, got {threshold}")
        self.threshold = threshold
        self.suffixes = _check_names("suffixes", suffixes)

    def mask_for(self, image_name: str, height: int, width: int) -> Tensor:
        _check_size(height, width)
        path = self._find(image_name)
        try:
            with Image.open(path) as image:
                grey = torch.from_numpy(np.array(image.convert("L")))  # (h, w) uint8
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"mask {path} cannot be read as an image: {error}") from None
        mask = (grey > self.threshold).float()[None, None]  # (1, 1, h, w)
        return F.interpolate(mask, size=(height, width), mode="nearest-exact")[0, 0].bool()

    def _find(self, image_name: str) -> Path:
        candidates = [self.root / Path(image_name).with_suffix(s) for s in self.suffixes]
        for path in candidates:
            if path.is_file():
                return path
        raise FileNotFoundError(f"no mask for {image_name!r}; tried {[str(p) for p in candidates]}")


class VOCAnnotations(GroundTruth):
    """Boxes of PASCAL VOC XML annotations, one file per image.

    The annotation of ``"2007_000032.jpg"`` is ``root/2007_000032.xml``. ``bndbox`` coordinates are
    1-based and inclusive: ``xmin=1, xmax=3`` covers the first three columns. The frame is the
    file's ``<size>``. An annotated image without objects of ``classes`` gets an empty mask.

    Args:
        root: the ``Annotations`` folder.
        classes: keep only objects whose ``<name>`` is one of these; ``None`` keeps all.
        include_difficult: keep objects marked ``<difficult>1</difficult>``.

    Raises:
        FileNotFoundError: if ``root`` is not a folder.
        ValueError: if ``classes`` is given but empty.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        classes: Sequence[str] | None = None,
        include_difficult: bool = True,
    ) -> None:
        self.root = _existing_dir(root, "root")
        self.classes = _check_names("classes", classes)
        self.include_difficult = include_difficult

    def mask_for(self, image_name: str, height: int, width: int) -> Tensor:
        _check_size(height, width)
        path = self.root / Path(image_name).with_suffix(".xml")
        if not path.is_file():
            raise FileNotFoundError(f"no VOC annotation for {image_name!r}: {path} does not exist")
        try:
            annotation = ET.parse(path).getroot()
            size = annotation.find("size")
            source_size = (int(size.findtext("height")), int(size.findtext("width")))
            _check_size(*source_size)
            boxes = [self._box(obj) for obj in annotation.findall("object") if self._keep(obj)]
        except (ET.ParseError, AttributeError, TypeError, ValueError) as error:
            raise ValueError(f"malformed VOC annotation {path}: {error}") from None
        return boxes_to_mask(torch.tensor(boxes).view(-1, 4), source_size, height, width)

    def _keep(self, obj: ET.Element) -> bool:
        name = (obj.findtext("name") or "").strip()
        difficult = (obj.findtext("difficult") or "0").strip() == "1"
        wanted = self.classes is None or name in self.classes
        return wanted and (self.include_difficult or not difficult)

    @staticmethod
    def _box(obj: ET.Element) -> list[float]:
        """``[x0, y0, x1, y1]`` half-open and 0-based from the 1-based inclusive ``bndbox``."""
        keys = ("xmin", "ymin", "xmax", "ymax")
        xmin, ymin, xmax, ymax = (float(obj.findtext(f"bndbox/{key}")) for key in keys)
        if xmax < xmin or ymax < ymin:
            raise ValueError(f"bndbox has max < min: {(xmin, ymin, xmax, ymax)}")
        return [xmin - 1, ymin - 1, xmax, ymax]
