"""Inputs: folders, image lists and manifests, safe output names, checks, and the DataModule.

Training data of a mask optimisation are its steps, not images: the train dataloader yields one
tick per optimisation step, and the engine takes the images of each batch from
:meth:`ExplanationDataModule.batch` when it starts explaining them. That keeps the image order a
pure function of the inputs, so a resumed run finds the same batch again.

Every bad input is named: a manifest that cannot be read raises ``ValueError`` naming the file and
the line (or entry); a bad row (a target that is no class of the classifier, a file that is
missing or whose header cannot be read) is returned by :func:`validate_records` with its reason,
before the first step, so the engine records it in ``failed.jsonl`` and explains the rest.
Output names are built from file names but never leave the run folder (:func:`stable_names`).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from hdm_lightning.geometry import Frame, Resize, frame, map_to_original, to_model
from hdm_lightning.images import Decoding, channels, content_hash, decode, is_dicom, pixel_limit, to_display

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Real photos that ship inside installed packages: the demo needs no download.
BUILTIN_PHOTOS = ("skimage:chelsea", "skimage:coffee", "matplotlib:grace_hopper.jpg")
PHOTO_SOURCES = ("skimage", "matplotlib", "sklearn")
#: Characters an output name may hold; anything else becomes ``_`` (no separators, no ``..``).
UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")
INTEGER = re.compile(r"\s*[+-]?\d+\s*")


@dataclass(frozen=True)
class ImageRecord:
    """One input image: where it is, its output name, an optional target class, where it was
    listed (``file, line N``) and a problem of its row that makes it fail (e.g. a bad target)."""

    path: str
    name: str
    target: int | None = None
    source: str = ""
    problem: str | None = None


# ---------------------------------------------------------------------------- manifests
@dataclass(frozen=True)
class Row:
    image: str
    target: int | None
    where: str  # "FILE, line N" or "FILE, entry N"
    problem: str | None = None


def read_text(path: Path) -> str:
    """The file's text; a UTF-8 byte-order mark (Excel's CSVs) is dropped."""
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error})") from error


def parse_target(value) -> int:
    """A class index from a manifest cell: an integer, an integral float or a decimal string."""
    if isinstance(value, bool):
        raise ValueError
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and INTEGER.fullmatch(value):
        return int(value)
    raise ValueError


def manifest_row(where: str, entry) -> Row:
    """One ``(image, target)`` row; a missing image raises, a target that is no integer is the
    row's problem (it fails, the others run)."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with an 'image' field, got {type(entry).__name__} {entry!r}")
    image = entry.get("image") or entry.get("path")
    if not image or not isinstance(image, str):
        raise ValueError(f"{where}: needs an 'image' (or 'path') field, got {sorted(entry)}")
    target = entry.get("target")
    if target is None or target == "":
        return Row(image, None, where)
    try:
        return Row(image, parse_target(target), where)
    except ValueError:
        return Row(image, None, where, problem=f"{where}: target {target!r} is not a class index")


def csv_rows(path: Path) -> list[Row]:
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    columns = reader.fieldnames or []
    if "image" not in columns and "path" not in columns:
        raise ValueError(f"{path}: needs an 'image' (or 'path') column; the header has {columns}")
    rows = []
    for entry in reader:
        rows.append(manifest_row(f"{path}, line {reader.line_num}", entry))
    return rows


def json_rows(path: Path) -> list[Row]:
    try:
        entries = json.loads(read_text(path))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {error.lineno}: not valid JSON: {error.msg}") from error
    if not isinstance(entries, list):
        keys = sorted(entries)[:5] if isinstance(entries, dict) else type(entries).__name__
        raise ValueError(f"{path}: a JSON manifest is a list of objects like "
                         f'[{{"image": "a.png", "target": 3}}], got {type(entries).__name__} {keys}')
    return [manifest_row(f"{path}, entry {i}", entry) for i, entry in enumerate(entries, start=1)]


def jsonl_rows(path: Path) -> list[Row]:
    rows = []
    for number, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not valid JSON: {error.msg} (column {error.colno})") from error
        rows.append(manifest_row(f"{path}, line {number}", entry))
    return rows


def txt_rows(path: Path) -> list[Row]:
    lines = [(n, line.strip()) for n, line in enumerate(read_text(path).splitlines(), start=1)]
    return [Row(line, None, f"{path}, line {n}") for n, line in lines if line and not line.startswith("#")]


MANIFESTS = {".txt": txt_rows, ".csv": csv_rows, ".json": json_rows, ".jsonl": jsonl_rows}


def read_manifest(path: Path) -> list[Row]:
    """The rows of a ``.txt``, ``.csv``, ``.json`` or ``.jsonl`` file; errors name file and line."""
    suffix = path.suffix.lower()
    if suffix not in MANIFESTS:
        raise ValueError(f"data.images: {path} has suffix {suffix!r}; expected a folder, .txt, .csv, .json or .jsonl")
    return MANIFESTS[suffix](path)


def resolve(root: Path, image: str) -> str:
    """``image`` relative to ``root``; absolute paths and package photos (``skimage:NAME``) as they are."""
    if Path(image).is_absolute() or image.split(":")[0] in PHOTO_SOURCES:
        return image
    return str(root / image)


def read_inputs(images: str) -> list[ImageRecord]:
    """Records from ``builtin``, a folder, a ``.txt`` list, or a ``.csv``/``.json``/``.jsonl`` manifest.

    Manifests have a column/key ``image`` (or ``path``) and optionally ``target``; relative paths
    are relative to the list file.
    """
    if images == "builtin":
        return with_names([Row(p, None, "builtin") for p in BUILTIN_PHOTOS])
    path = Path(images)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"data.images: no image files ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
        return with_names([Row(str(p), None, str(path)) for p in files], root=path)
    if not path.is_file():
        raise FileNotFoundError(f"data.images: {path} is neither a folder nor a file")
    rows = read_manifest(path)
    if not rows:
        raise ValueError(f"data.images: {path} lists no images")
    resolved = [replace(row, image=resolve(path.parent, row.image)) for row in rows]
    return with_names(resolved, root=path.parent)


# -------------------------------------------------------------------------------- names
def safe_part(part: str) -> str:
    """A path component as a file-name-safe word: no separators, never ``.``, ``..`` or empty.

    Example:
        >>> [safe_part(p) for p in ["cat", "..", "/", "my photo", ".hidden"]]
        ['cat', 'up', '_', 'my_photo', 'hidden']
    """
    if part == "..":
        return "up"
    return UNSAFE.sub("_", part).lstrip(".") or "_"


def path_parts(path: str, root: Path | None) -> tuple[str, ...]:
    """The components of ``path`` under ``root`` (all of them, less the anchor, elsewhere)."""
    file = Path(path.split(":", 1)[-1]) if path.split(":")[0] in PHOTO_SOURCES else Path(path)
    if root is not None and file.is_relative_to(root):
        file = file.relative_to(root)
    return tuple(p for p in file.parts if p != file.anchor)


def stable_names(paths: list[str], root: Path | None = None, targets: list[int | None] | None = None) -> list[str]:
    """Output names, safe as file names under the run folder: the file stem where unique, else the
    path under ``root`` joined by ``__``, else that path with its suffix, else that plus the
    target (one picture explained for several classes), else that plus the position in the list
    (``a/b.png`` and ``a__b.png``); a name still shared raises ``ValueError`` listing the clashes.

    Example:
        >>> stable_names(["a/cat.png", "b/dog.png", "c/dog.png"], root=Path("."))
        ['cat', 'b__dog', 'c__dog']
        >>> stable_names(["/x/cat.png", "/y/cat.png", "a.png", "a.jpg"])
        ['x__cat', 'y__cat', 'a.png', 'a.jpg']
        >>> stable_names(["cat.png", "cat.png"], targets=[3, None])
        ['cat.png__target3', 'cat.png__top1']
    """
    parts = [path_parts(p, root) for p in paths]
    targets = targets or [None] * len(paths)
    full = ["__".join(safe_part(c) for c in q) for q in parts]
    choices = [
        [safe_part(Path(q[-1]).stem) for q in parts],
        ["__".join(safe_part(c) for c in (*q[:-1], Path(q[-1]).stem)) for q in parts],
        full,
        [f"{f}__{'top1' if t is None else f'target{t}'}" for f, t in zip(full, targets)],
        [f"{f}__{'top1' if t is None else f'target{t}'}__{i}" for i, (f, t) in enumerate(zip(full, targets))],
    ]
    names = list(choices[0])
    for choice in choices[1:]:
        counts = {n: names.count(n) for n in names}
        names = [better if counts[n] > 1 else n for n, better in zip(names, choice)]
    clashes = {n: [p for p, m in zip(paths, names) if m == n] for n in names if names.count(n) > 1}
    if clashes:
        listed = "; ".join(f"{n!r}: {', '.join(ps)}" for n, ps in clashes.items())
        raise ValueError(f"data.images: several inputs would write the same output name: {listed}")
    return names


def with_names(rows: list[Row], root: Path | None = None) -> list[ImageRecord]:
    """Records with their output names; a row repeating an earlier one (same file and target)
    fails as a duplicate, named by both lines, instead of writing over its maps."""
    first: dict[tuple[str, int | None], str] = {}
    unique, repeated = [], []
    for row in rows:
        key = (str(Path(row.image)), row.target)
        if key in first:
            repeated.append(replace(row, problem=f"{row.where}: the same image and target as {first[key]}"))
        else:
            first[key] = row.where
            unique.append(row)
    names = stable_names([r.image for r in unique], root, [r.target for r in unique])
    records = [ImageRecord(r.image, n, r.target, r.where, r.problem) for r, n in zip(unique, names)]
    taken = set(names)
    for k, row in enumerate(repeated):  # never written: the problem fails them; names stay unique
        name = next(f"duplicate{k}_{j}" for j in itertools.count() if f"duplicate{k}_{j}" not in taken)
        records.append(ImageRecord(row.image, name, row.target, row.where, row.problem))
    return records


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
        if path.split(":")[0] in PHOTO_SOURCES and ":" in path:
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
    if path.split(":")[0] in PHOTO_SOURCES and ":" in path:
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

    def setup(self, stage: str | None = None) -> None:
        if not self.records:
            self.records = read_inputs(self.images)

    def validate(self, num_classes: int | None) -> list[tuple[ImageRecord, str]]:
        """Keeps only the records that can run; returns ``(record, reason)`` of the others.

        Call once after :meth:`setup`, before the first step, with the classifier's number of
        classes, and write each failure to ``failed.jsonl``. Indices into :attr:`records` change.
        """
        self.records, failed = validate_records(self.records, num_classes, self.decoding)
        return failed

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
