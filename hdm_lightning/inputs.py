"""Lists of images: folders, ``.txt`` lists and ``.csv``/``.json``/``.jsonl`` manifests, and the
output names they get.

A manifest that cannot be read raises ``ValueError`` naming the file and the line (or entry); a
row that is readable but wrong (a target that is no integer, a repeat of an earlier row) keeps its
problem in :attr:`ImageRecord.problem`, so it fails alone and the others run. Output names come
from the file names and never leave the run folder (:func:`stable_names`).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm", ".dicom")

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


def is_package_photo(image: str) -> bool:
    """Whether ``image`` names a photo inside an installed package (``skimage:chelsea``), not a file."""
    return ":" in image and image.split(":")[0] in PHOTO_SOURCES


def resolve(root: Path, image: str) -> str:
    """``image`` relative to ``root``; absolute paths and package photos (``skimage:NAME``) as they are."""
    if Path(image).is_absolute() or is_package_photo(image):
        return image
    return str(root / image)


def read_inputs(images: str) -> list[ImageRecord]:
    """Records from ``builtin``, one picture (a file or ``skimage:NAME``), a folder, a ``.txt`` list,
    or a ``.csv``/``.json``/``.jsonl`` manifest.

    Manifests have a column/key ``image`` (or ``path``) and optionally ``target``; relative paths
    are relative to the list file.
    """
    if images == "builtin":
        return with_names([Row(p, None, "builtin") for p in BUILTIN_PHOTOS])
    if is_package_photo(images):
        return with_names([Row(images, None, "data.images")])
    path = Path(images)
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return with_names([Row(str(path), None, "data.images")], root=path.parent)
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
    file = Path(path.split(":", 1)[-1]) if is_package_photo(path) else Path(path)
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
