"""Inputs: folders, image lists and manifests, stable output names, and the DataModule.

Training data of a mask optimisation are its steps, not images: the train dataloader yields one
tick per optimisation step, and :class:`~hdm_lightning.callbacks.HDMSchedule` takes the images of
each batch from :meth:`ExplanationDataModule.batch` when it starts explaining them. That keeps the
image order a pure function of the inputs, so a resumed run finds the same batch again.
"""

from __future__ import annotations

import csv
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Real photos that ship inside installed packages: the demo needs no download.
BUILTIN_PHOTOS = ("skimage:chelsea", "skimage:coffee", "matplotlib:grace_hopper.jpg")
PHOTO_SOURCES = ("skimage", "matplotlib", "sklearn")


@dataclass(frozen=True)
class ImageRecord:
    """One input image: where it is, its output name and an optional target class."""

    path: str
    name: str
    target: int | None = None


def read_inputs(images: str) -> list[ImageRecord]:
    """Records from ``builtin``, a folder, a ``.txt`` list, or a ``.csv``/``.json``/``.jsonl`` manifest.

    Manifests have a column/key ``image`` (or ``path``) and optionally ``target``; relative paths
    are relative to the list file.
    """
    if images == "builtin":
        return with_names([(p, None) for p in BUILTIN_PHOTOS])
    path = Path(images)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"data.images: no image files ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
        return with_names([(str(p), None) for p in files], root=path)
    if not path.is_file():
        raise FileNotFoundError(f"data.images: {path} is neither a folder nor a file")
    rows = read_manifest(path)
    if not rows:
        raise ValueError(f"data.images: {path} lists no images")
    resolved = [(resolve(path.parent, image), target) for image, target in rows]
    return with_names(resolved, root=path.parent)


def read_manifest(path: Path) -> list[tuple[str, int | None]]:
    """``(image, target)`` rows of a ``.txt``, ``.csv``, ``.json`` or ``.jsonl`` file."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        lines = [line.strip() for line in path.read_text().splitlines()]
        return [(line, None) for line in lines if line and not line.startswith("#")]
    if suffix == ".csv":
        with path.open(newline="") as handle:
            entries = list(csv.DictReader(handle))
    elif suffix == ".json":
        entries = json.loads(path.read_text())
    elif suffix == ".jsonl":
        entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        raise ValueError(f"data.images: {path} has suffix {suffix!r}; expected a folder, .txt, .csv, .json or .jsonl")
    return [manifest_row(path, i, entry) for i, entry in enumerate(entries, start=1)]


def manifest_row(path: Path, row: int, entry: dict) -> tuple[str, int | None]:
    image = entry.get("image") or entry.get("path")
    if not image:
        raise ValueError(f"{path}, entry {row}: needs an 'image' (or 'path') field, got {sorted(entry)}")
    target = entry.get("target")
    if target in (None, ""):
        return str(image), None
    try:
        return str(image), int(target)
    except ValueError as error:
        raise ValueError(f"{path}, entry {row}: target {target!r} is not a class index") from error


def resolve(root: Path, image: str) -> str:
    """``image`` relative to ``root``; absolute paths and package photos (``skimage:NAME``) as they are."""
    if Path(image).is_absolute() or image.split(":")[0] in PHOTO_SOURCES:
        return image
    return str(root / image)


def with_names(rows: list[tuple[str, int | None]], root: Path | None = None) -> list[ImageRecord]:
    names = stable_names([p for p, _ in rows], root)
    return [ImageRecord(path=p, name=n, target=t) for (p, t), n in zip(rows, names)]


def stable_names(paths: list[str], root: Path | None = None) -> list[str]:
    """Output names: the file stem where unique, else the path under ``root`` joined by ``__``.

    Example:
        >>> stable_names(["a/cat.png", "b/dog.png", "c/dog.png"], root=Path("."))
        ['cat', 'b__dog', 'c__dog']
    """
    stems = [Path(p.split(":")[-1]).stem for p in paths]
    counts = {s: stems.count(s) for s in stems}
    names = []
    for path, stem in zip(paths, stems):
        if counts[stem] == 1:
            names.append(stem)
            continue
        relative = Path(path).relative_to(root) if root is not None and Path(path).is_relative_to(root) else Path(path)
        names.append("__".join(relative.with_suffix("").parts).replace(":", "_"))
    if len(set(names)) != len(names):
        raise ValueError("data.images: two inputs map to the same output name; give them distinct paths")
    return names


def load_image(path: str) -> Image.Image:
    """An RGB image from a file, or from a package: ``skimage:NAME``, ``matplotlib:FILE``, ``sklearn:FILE``."""
    source, _, name = path.partition(":")
    if source == "skimage" and name:
        import skimage.data

        return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    if source == "matplotlib" and name:
        import matplotlib.cbook

        return Image.open(matplotlib.cbook.get_sample_data(name)).convert("RGB")
    if source == "sklearn" and name:
        import sklearn.datasets

        return Image.fromarray(sklearn.datasets.load_sample_image(name)).convert("RGB")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def to_tensor(image: Image.Image, size: int, mean: Tensor, std: Tensor) -> Tensor:
    """``(C, size, size)`` normalised float tensor (antialiased bilinear resize)."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (C, h, w)
    resized = F.interpolate(pixels[None], size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    return (resized - mean[:, None, None]) / std[:, None, None]


class StepStream(IterableDataset):
    """Endless optimisation-step ticks: the schedule callback decides when a run is over."""

    def __iter__(self):
        return itertools.count()


class ExplanationDataModule(LightningDataModule):
    """Images to explain, their preprocessing, and this rank's share of them.

    Args:
        images: ``builtin`` (photos shipped by installed packages), a folder, a ``.txt`` list or a
            ``.csv``/``.json``/``.jsonl`` manifest with ``image`` and optional ``target``.
        image_size: side of the square classifier input.
        mean: per-channel normalisation mean (pixel values in [0, 1]).
        std: per-channel normalisation standard deviation.
        batch_size: images explained together in one optimisation.
    """

    def __init__(
        self,
        images: str = "builtin",
        image_size: int = 224,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        batch_size: int = 4,
    ) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"data.image_size must be >= 8, got {image_size}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if len(mean) != len(std) or min(std) <= 0:
            raise ValueError(f"data.mean and data.std need the same length and std > 0, got {mean}, {std}")
        self.images = images
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.batch_size = batch_size
        self.records: list[ImageRecord] = []

    def setup(self, stage: str | None = None) -> None:
        if not self.records:
            self.records = read_inputs(self.images)

    def shard(self, rank: int, world_size: int) -> list[int]:
        """Indices of the records this rank explains: every image on exactly one rank, no padding."""
        return list(range(rank, len(self.records), world_size))

    def batch(self, indices: list[int]) -> dict:
        """The readable images of ``indices``: ``images (N, C, S, S)``, ``targets (N,)`` (-1: top-1),
        their ``indices``, and ``failed`` (index, error) pairs for files that cannot be read."""
        tensors, targets, kept, failed = [], [], [], []
        for i in indices:
            record = self.records[i]
            try:
                picture = load_image(record.path)
            except (ValueError, FileNotFoundError, AttributeError) as error:
                failed.append((i, str(error)))
                continue
            tensors.append(to_tensor(picture, self.image_size, self.mean, self.std))
            targets.append(-1 if record.target is None else record.target)
            kept.append(i)
        return {
            "images": torch.stack(tensors) if tensors else torch.empty(0),
            "targets": torch.tensor(targets, dtype=torch.long),
            "indices": kept,
            "failed": failed,
        }

    def train_dataloader(self) -> DataLoader:
        return DataLoader(StepStream(), batch_size=None)
