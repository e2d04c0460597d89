"""The run folder: atomic writes of maps, overlays and the index, and which images are done.

Layout under ``out_dir``::

    maps/<name>.npy            fused map, float32, at the original image's resolution
    stages/<name>_stage<t>.npy every stage map, same resolution
    overlays/<name>.png        the fused map over the image
    index.jsonl                one row per finished image (the merge of index/rank<r>.jsonl)
    index/rank<r>.jsonl        the rows each rank appended

Every file is written to a temporary name and renamed, and the fused map is written last: an
image counts as done exactly when ``maps/<name>.npy`` exists, so a killed run never takes a
half-written file for a finished one. Several ranks share one folder: each writes the files of its
own images and appends its rows to its own index file (appends from several nodes to one file on a
shared filesystem are not atomic); ``index.jsonl`` is rewritten atomically from them, one row per
image that has a map, the latest where a killed run had written a row twice.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import torch.nn.functional as F
from matplotlib import colormaps
from PIL import Image
from torch import Tensor

OVERLAY_MAX_SIDE = 512


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def append_line(path: Path, row: dict) -> None:
    """Appends ``row`` as one JSON line with a single ``O_APPEND`` write: atomic across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(handle, (json.dumps(row) + "\n").encode())
        os.fsync(handle)
    finally:
        os.close(handle)


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def resize_map(saliency: Tensor, height: int, width: int) -> np.ndarray:
    """``(h, w)`` map -> float32 ``(height, width)`` array, bilinear."""
    resized = F.interpolate(saliency[None, None].float().cpu(), size=(height, width), mode="bilinear", align_corners=False)
    return resized[0, 0].clamp(0, 1).numpy().astype(np.float32)


def overlay(picture: Image.Image, saliency: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The map in the ``jet`` colour map blended over the picture (longest side at most 512)."""
    scale = min(1.0, OVERLAY_MAX_SIDE / max(picture.size))
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    base = np.asarray(picture.convert("RGB").resize(size), dtype=np.float32) / 255
    heat = np.asarray(Image.fromarray((saliency * 255).astype(np.uint8)).resize(size), dtype=np.float32) / 255
    coloured = colormaps["jet"](heat)[..., :3]
    blended = (1 - alpha) * base + alpha * coloured
    return Image.fromarray((blended * 255).round().astype(np.uint8))


class RunFolder:
    """Reads and writes one run's outputs."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def map_path(self, name: str) -> Path:
        return self.root / "maps" / f"{name}.npy"

    def is_done(self, name: str) -> bool:
        return self.map_path(name).is_file()

    def write(self, name: str, picture: Image.Image, fused: Tensor, stage_maps: Tensor, row: dict,
              rank: int | None = None) -> None:
        """Stage maps, overlay and index row first; the fused map, the 'done' marker, last.

        With a ``rank`` the row goes to that rank's index file (see :meth:`merge_index`).
        """
        height, width = picture.height, picture.width
        for t, stage_map in enumerate(stage_maps):
            stage_array = resize_map(stage_map, height, width)
            atomic_write_bytes(self.root / "stages" / f"{name}_stage{t + 1}.npy", npy_bytes(stage_array))
        fused_array = resize_map(fused, height, width)
        png = io.BytesIO()
        overlay(picture, fused_array).save(png, format="PNG")
        atomic_write_bytes(self.root / "overlays" / f"{name}.png", png.getvalue())
        self.append_index(row, rank)
        atomic_write_bytes(self.map_path(name), npy_bytes(fused_array))

    def append_index(self, row: dict, rank: int | None = None) -> None:
        append_line(self.root / "index.jsonl" if rank is None else self.rank_index(rank), row)

    def rank_index(self, rank: int) -> Path:
        return self.root / "index" / f"rank{rank}.jsonl"

    def read_index(self) -> dict[str, dict]:
        """Rows by image name, of images that have a map: ``index.jsonl`` and the ranks' index files;
        a row written twice (a kill between row and map) keeps its latest version."""
        paths = [self.root / "index.jsonl", *sorted((self.root / "index").glob("rank*.jsonl"))]
        rows = [json.loads(line) for p in paths if p.is_file() for line in p.read_text().splitlines() if line.strip()]
        return {row["name"]: row for row in rows if self.is_done(row["name"])}

    def merge_index(self) -> dict[str, dict]:
        """Rewrites ``index.jsonl`` atomically: one row per image with a map. Returns the rows."""
        rows = self.read_index()
        atomic_write_bytes(self.root / "index.jsonl", "".join(json.dumps(row) + "\n" for row in rows.values()).encode())
        return rows

    def load_map(self, name: str) -> np.ndarray:
        return np.load(self.map_path(name))

    def record_failure(self, path: str, error: str) -> None:
        """Appends ``{"image", "error"}`` to ``failed.jsonl``, unless that row is there already: a
        rerun, which checks every input again, adds no duplicate."""
        self.record_failures([(path, error)])

    def record_failures(self, failures: list[tuple[str, str]]) -> None:
        """:meth:`record_failure` for many, reading ``failed.jsonl`` once."""
        file = self.root / "failed.jsonl"
        lines = file.read_text().splitlines() if file.is_file() else []
        seen = {(row.get("image"), row.get("error")) for row in map(json.loads, filter(str.strip, lines))}
        for path, error in failures:
            if (path, error) not in seen:
                append_line(file, {"image": path, "error": error})
                seen.add((path, error))

