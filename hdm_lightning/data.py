"""Images for the engine: reading and preprocessing them, checking them, and the DataModule.

Training data of a mask optimisation are its steps, not images: the train dataloader yields one
tick per optimisation step, and the engine takes the images of each batch from
:meth:`ExplanationDataModule.batch` when it starts explaining them. That keeps the image order a
pure function of the inputs, so a resumed run finds the same batch again.

Lists, manifests and output names are :mod:`hdm_lightning.inputs`; decoding is
:mod:`hdm_lightning.images`; where a picture lies in the classifier input is
:mod:`hdm_lightning.geometry`. Every bad row (a target that is no class of the classifier, a file
that is missing or whose header cannot be read) is returned by :func:`validate_records` with its
reason before the first step, so the engine records it in ``failed.jsonl`` and explains the rest.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from hdm_lightning.geometry import Frame, Resize, frame, map_to_original, to_model
from hdm_lightning.images import Decoding, channels, content_hash, decode, is_dicom, pixel_limit, to_display
from hdm_lightning.inputs import (  # noqa: F401 (re-exported: the inputs' API lives here for callers)
    BUILTIN_PHOTOS,
    IMAGE_SUFFIXES,
    ImageRecord,
    is_package_photo,
    read_inputs,
    read_manifest,
    stable_names,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ------------------------------------------------------------------------------ reading
def package_photo(path: str) -> bytes:
    """The file bytes of a photo shipped by a package: ``skimage:NAME``, ``matplotlib:FILE``, ``sklearn:FILE``."""
    source, _, name = path.partition(":")
    if source == "skimage":
        import skimage.data

        shipped = [f for f in Path(skimage.data.__file__).parent.glob(f"{name}.*") if f.suffix in IMAGE_SUFFIXES]
        if shipped:
            return shipped[0].read_bytes()
        buffer = io.BytesIO()
        Image.fromarray(getattr(skimage.data, name)()).save(buffer, format="PNG")
        return buffer.getvalue()
    if source == "matplotlib":
        import matplotlib.cbook

        return Path(matplotlib.cbook.get_sample_data(name, asfileobj=False)).read_bytes()
    import sklearn.datasets

    return (Path(sklearn.datasets.__file__).parent / "images" / name).read_bytes()


def read_bytes(path: str) -> bytes:
    """The bytes of an image file or package photo; ``ValueError`` naming it when it cannot be read."""
    try:
        if is_package_photo(path):
            return package_photo(path)
        return Path(path).read_bytes()
    except (OSError, AttributeError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


def load_pixels(path: str, decoding: Decoding = Decoding()) -> tuple[np.ndarray, str]:
    """``(H, W, C)`` float32 pixels in [0, 1], upright, and the SHA-256 of the file's bytes."""
    data = read_bytes(path)
    return decode(path, data, decoding), content_hash(data)


def load_image(path: str, decoding: Decoding = Decoding()) -> Image.Image:
    """The picture as a viewer shows it (upright, 8-bit RGB): what maps and overlays are drawn on."""
    return to_display(load_pixels(path, decoding)[0])


def file_hash(path: str) -> str:
    """SHA-256 of the bytes of ``path`` (the ``sha256`` of its index row)."""
    return content_hash(read_bytes(path))


def to_tensor(pixels: np.ndarray, placement: Frame, mean: Tensor, std: Tensor) -> Tensor:
    """``(H, W, C)`` pixels -> ``(len(mean), S, S)`` normalised classifier input."""
    matched = torch.from_numpy(np.ascontiguousarray(channels(pixels, len(mean)))).permute(2, 0, 1)  # (C, H, W)
    normalised = (matched - mean[:, None, None]) / std[:, None, None]
    return to_model(normalised, placement)  # (C, S, S)


# ------------------------------------------------------------------------------- checks
def header_problem(path: str, decoding: Decoding) -> str | None:
    """Why the file cannot be opened (missing, unreadable header, above the pixel limit), or None.

    Reads only the header: cheap enough for every image before the first step.
    """
    if is_package_photo(path):
        return None
    file = Path(path)
    if not file.is_file():
        return f"image file not found: {path}"
    try:
        with open(file, "rb") as handle:
            head = handle.read(132)
        if is_dicom(path, head):
            import pydicom

            pydicom.dcmread(path, stop_before_pixels=True)
            return None
        with pixel_limit(decoding.allow_large_images), Image.open(file) as image:
            image.size  # noqa: B018 (the header is parsed on open)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        return f"cannot read image {path}: {error}; set data.allow_large_images=true to read it"
    except ImportError:
        return f"cannot read image {path}: DICOM needs pydicom: pip install 'hdm-lightning[medical]'"
    except Exception as error:  # any reader error: the file is named and the run goes on
        return f"cannot read image {path}: {type(error).__name__}: {error}"
    return None


def record_problem(record: ImageRecord, num_classes: int | None, decoding: Decoding) -> str | None:
    if record.problem is not None:
        return record.problem
    if record.target is not None and (record.target < 0 or (num_classes is not None and record.target >= num_classes)):
        classes = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
        return f"{record.source}: target {record.target} is not a class of the classifier ({classes})"
    return header_problem(record.path, decoding)


def validate_records(
    records: list[ImageRecord], num_classes: int | None, decoding: Decoding = Decoding()
) -> tuple[list[ImageRecord], list[tuple[ImageRecord, str]]]:
    """Splits records into those that can run and ``(record, reason)`` for those that cannot.

    Checks every row before the first step: its manifest problem, its target against the
    classifier's ``num_classes`` (None: only ``>= 0``), and that its file exists with a readable
    header within the pixel limit. The engine writes the failures to ``failed.jsonl``.
    """
    good, failed = [], []
    for record in records:
        problem = record_problem(record, num_classes, decoding)
        if problem is None:
            good.append(record)
        else:
            failed.append((record, problem))
    return good, failed


# ---------------------------------------------------------------------------- DataModule
class StepStream(IterableDataset):
    """Endless optimisation-step ticks: the schedule callback decides when a run is over."""

    def __iter__(self):
        return itertools.count()


class ExplanationDataModule(LightningDataModule):
    """Images to explain, their decoding and preprocessing, and this rank's share of them.

    Args:
        images: ``builtin`` (photos shipped by installed packages), a folder, a ``.txt`` list or a
            ``.csv``/``.json``/``.jsonl`` manifest with ``image`` and optional ``target``.
        image_size: side of the square classifier input.
        mean: per-channel normalisation mean (pixel values in [0, 1]); its length is the number of
            channels the classifier takes (1: grey, 3: RGB), and pictures are converted to it.
        std: per-channel normalisation standard deviation.
        batch_size: images explained together in one optimisation.
        resize: ``squash`` (resize to the square) or ``pad`` (keep the aspect ratio, pad with the
            mean); maps are written at the original resolution either way.
        window: ``[centre, width]`` of raw values shown, for 16-bit pictures and DICOM; null: the
            DICOM file's window, else each picture's minimum and maximum.
        background: RGB colour (0-255) under transparent pixels.
        allow_large_images: read pictures above Pillow's pixel limit (else they fail, named).
    """

    def __init__(
        self,
        images: str = "builtin",
        image_size: int = 224,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        batch_size: int = 4,
        resize: Resize = "squash",
        window: tuple[float, float] | None = None,
        background: tuple[int, int, int] = (255, 255, 255),
        allow_large_images: bool = False,
    ) -> None:
        super().__init__()
        if image_size < 8:
            raise ValueError(f"data.image_size must be >= 8, got {image_size}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        if len(mean) != len(std) or min(std) <= 0 or len(mean) not in (1, 3):
            raise ValueError(f"data.mean and data.std need 1 or 3 values each and std > 0, got {mean}, {std}")
        frame(image_size, image_size, image_size, resize)  # validates data.resize by name
        self.images = images
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.batch_size = batch_size
        self.resize = resize
        self.decoding = Decoding(tuple(window) if window is not None else None, tuple(background), allow_large_images)
        self.records: list[ImageRecord] = []
        self.rejected: list[tuple[ImageRecord, str]] = []  # records :meth:`validate` took out, with why

    def setup(self, stage: str | None = None) -> None:
        if not self.records:
            self.records = read_inputs(self.images)

    def validate(self, num_classes: int | None) -> list[tuple[ImageRecord, str]]:
        """Keeps only the records that can run; returns ``(record, reason)`` of the others.

        Call once after :meth:`setup`, before the first step, with the classifier's number of
        classes, and write each failure to ``failed.jsonl``. Indices into :attr:`records` change.
        """
        self.records, failed = validate_records(self.records, num_classes, self.decoding)
        self.rejected = [*self.rejected, *failed]
        return failed

    def rejected_share(self, rank: int, world_size: int) -> int:
        """How many of the rejected records count as this rank's (for its image counts): every one on
        exactly one rank, as :meth:`shard` shares the others."""
        return len(range(rank, len(self.rejected), world_size))

    def shard(self, rank: int, world_size: int) -> list[int]:
        """Indices of the records this rank explains: every image on exactly one rank, no padding."""
        return list(range(rank, len(self.records), world_size))

    def frame(self, height: int, width: int) -> Frame:
        """Where an ``(height, width)`` picture lies in the classifier input."""
        return frame(height, width, self.image_size, self.resize)

    def picture(self, path: str) -> Image.Image:
        """The picture as shown (upright, 8-bit RGB, windowed): what maps are drawn over."""
        return load_image(path, self.decoding)

    def map_to_original(self, saliency: Tensor, height: int, width: int) -> Tensor:
        """A map over the classifier input (any resolution of the square) -> float32 ``(height,
        width)`` over the original picture: undoes ``pad`` or ``squash``. Call it before writing."""
        return map_to_original(saliency, self.frame(height, width))

    def batch(self, indices: list[int]) -> dict:
        """The readable images of ``indices``: ``images (N, C, S, S)``, ``targets (N,)`` (-1: top-1),
        their ``indices``, ``frames`` (placements, with the original size), ``hashes`` (SHA-256 of
        each file, for the index row), and ``failed`` (index, error) pairs for the others."""
        tensors, targets, kept, frames, hashes, failed = [], [], [], [], [], []
        for i in indices:
            record = self.records[i]
            problem = record.problem or (f"{record.source}: target {record.target} is negative"
                                         if record.target is not None and record.target < 0 else None)
            try:
                if problem is not None:
                    raise ValueError(problem)
                pixels, digest = load_pixels(record.path, self.decoding)
            except ValueError as error:
                failed.append((i, str(error)))
                continue
            placement = self.frame(*pixels.shape[:2])
            tensors.append(to_tensor(pixels, placement, self.mean, self.std))
            targets.append(-1 if record.target is None else record.target)
            kept.append(i)
            frames.append(placement)
            hashes.append(digest)
        return {
            "images": torch.stack(tensors) if tensors else torch.empty(0),
            "targets": torch.tensor(targets, dtype=torch.long),
            "indices": kept,
            "frames": frames,
            "hashes": hashes,
            "failed": failed,
        }

    def train_dataloader(self) -> DataLoader:
        return DataLoader(StepStream(), batch_size=None)
