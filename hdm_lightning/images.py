"""Decoding pictures as people have them: orientation, bit depth, transparency, DICOM, size limits.

:func:`decode` turns the bytes of one file into float pixels in ``[0, 1]``, shaped ``(H, W, C)``
with ``C = 1`` (grey) or ``3`` (RGB), upright at the size a viewer shows:

- EXIF orientation is applied, so maps and overlays are upright at the displayed size;
- 16-bit and 32-bit grey images (PNG, TIFF) are scaled by a window ``(centre, width)`` when one is
  set, else by their own minimum and maximum (a plain ``convert("RGB")`` clips them to white);
- transparent pixels (RGBA, LA, palette transparency) are composited on a background colour, so
  the classifier never sees the colours hidden under them;
- DICOM (``.dcm``/``.dicom`` or the ``DICM`` marker) goes through pydicom (extra ``medical``):
  rescale slope and intercept, the window from the settings or else the file, else min-max, and
  MONOCHROME1 inverted so that bright is dense, as for MONOCHROME2;
- pictures above Pillow's pixel limit are read only when ``allow_large_images`` is set; otherwise
  they raise ``ValueError`` naming the setting, which the run records as a failure.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DICOM_SUFFIXES = (".dcm", ".dicom")
DICOM_MARKER = (128, b"DICM")  # offset and magic of a DICOM Part 10 file
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
#: ITU-R BT.601 luma weights: RGB pictures for 1-channel classifiers.
LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class Decoding:
    """How raw pixels become values in ``[0, 1]``.

    Args:
        window: ``(centre, width)`` of the raw values mapped linearly onto ``[0, 1]`` (values
            outside are clipped), for 16/32-bit pictures and DICOM (after rescale, e.g. in HU);
            None: the DICOM file's own window, else each picture's minimum and maximum.
        background: RGB colour (0-255) under transparent pixels.
        allow_large_images: read pictures above Pillow's ``Image.MAX_IMAGE_PIXELS``.
    """

    window: tuple[float, float] | None = None
    background: tuple[int, int, int] = (255, 255, 255)
    allow_large_images: bool = False

    def __post_init__(self) -> None:
        if self.window is not None and (len(self.window) != 2 or self.window[1] <= 0):
            raise ValueError(f"data.window must be null or [centre, width] with width > 0, got {self.window}")
        if len(self.background) != 3 or not all(0 <= v <= 255 for v in self.background):
            raise ValueError(f"data.background must be an RGB colour [r, g, b] in 0-255, got {self.background}")


def content_hash(data: bytes) -> str:
    """SHA-256 of a file's bytes, hex: ties a map to the exact picture it explains.

    Example:
        >>> content_hash(b"abc")[:16]
        'ba7816bf8f01cfea'
    """
    return hashlib.sha256(data).hexdigest()


def window_scale(values: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Raw values -> ``[0, 1]``: linear over ``centre ± width / 2``, or min-max when None.

    Example:
        >>> window_scale(np.array([0.0, 50.0, 100.0, 300.0]), (100.0, 200.0)).tolist()
        [0.0, 0.25, 0.5, 1.0]
        >>> window_scale(np.array([1000.0, 3000.0]), None).tolist()
        [0.0, 1.0]
    """
    values = values.astype(np.float64)
    if window is None:
        low, high = float(values.min()), float(values.max())
    else:
        low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
    if high <= low:  # a constant picture: all zeros rather than a division by zero
        return np.zeros(values.shape, dtype=np.float32)
    return np.clip((values - low) / (high - low), 0, 1).astype(np.float32)


def is_dicom(path: str, data: bytes) -> bool:
    offset, marker = DICOM_MARKER
    return path.lower().endswith(DICOM_SUFFIXES) or data[offset : offset + len(marker)] == marker


# ------------------------------------------------------------------------------ Pillow
@contextmanager
def pixel_limit(allow: bool) -> Iterator[None]:
    """Pillow's decompression-bomb limit lifted (``allow``) or made an error from the first pixel
    above it (Pillow only warns between one and two times the limit); restored afterwards."""
    if allow:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved
        return
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def composite(image: Image.Image, background: tuple[int, int, int]) -> np.ndarray:
    """``(H, W, 3)`` in [0, 1]: the colours weighted by alpha over ``background``."""
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255  # (H, W, 4)
    alpha = rgba[..., 3:]
    under = np.asarray(background, dtype=np.float32) / 255
    return rgba[..., :3] * alpha + under * (1 - alpha)


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ALPHA_MODES or (image.mode in ("P", "L", "RGB") and "transparency" in image.info)


def pillow_pixels(image: Image.Image, decoding: Decoding) -> np.ndarray:
    """``(H, W, C)`` float32 in [0, 1] of an opened, upright Pillow image."""
    if image.mode in HIGH_DEPTH_MODES:
        return window_scale(np.asarray(image), decoding.window)[..., None]  # (H, W, 1)
    if has_alpha(image):
        return composite(image, decoding.background)  # (H, W, 3)
    if image.mode in ("1", "L"):
        return (np.asarray(image.convert("L"), dtype=np.float32) / 255)[..., None]  # (H, W, 1)
    return np.asarray(image.convert("RGB"), dtype=np.float32) / 255  # (H, W, 3)


def decode_pillow(path: str, data: bytes, decoding: Decoding) -> np.ndarray:
    try:
        with pixel_limit(decoding.allow_large_images), Image.open(io.BytesIO(data)) as image:
            upright = ImageOps.exif_transpose(image)  # (displayed H, W)
            return pillow_pixels(upright, decoding)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"cannot read image {path}: {error}; set data.allow_large_images=true to read it") from error
    except UnidentifiedImageError as error:
        raise ValueError(f"cannot read image {path}: not a picture format Pillow knows (nor DICOM)") from error
    except (OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error


# ------------------------------------------------------------------------------- DICOM
def dicom_window(dataset, decoding: Decoding) -> tuple[float, float] | None:
    """The settings' window, else the file's first ``WindowCenter``/``WindowWidth``, else None."""
    if decoding.window is not None:
        return decoding.window
    if "WindowCenter" not in dataset or "WindowWidth" not in dataset:
        return None
    from pydicom.multival import MultiValue

    centre, width = (v[0] if isinstance(v, MultiValue) else v for v in (dataset.WindowCenter, dataset.WindowWidth))
    return float(centre), float(width)


def decode_dicom(path: str, data: bytes, decoding: Decoding) -> np.ndarray:
    """``(H, W, C)`` float32 in [0, 1] of a single-frame DICOM file."""
    try:
        import pydicom
    except ImportError as error:
        raise ValueError(f"cannot read image {path}: DICOM needs pydicom: pip install 'hdm-lightning[medical]'") from error
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        raw = dataset.pixel_array
    except Exception as error:  # pydicom raises many types for broken or unsupported files
        raise ValueError(f"cannot read image {path}: {type(error).__name__}: {error}") from error
    photometric = str(dataset.get("PhotometricInterpretation", "MONOCHROME2"))
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(f"cannot read image {path}: {frames} frames; explain one frame per file")
    if photometric == "RGB":
        return raw.astype(np.float32) / float(2 ** int(dataset.BitsStored) - 1)  # (H, W, 3)
    slope, intercept = float(dataset.get("RescaleSlope", 1) or 1), float(dataset.get("RescaleIntercept", 0) or 0)
    values = raw.astype(np.float64) * slope + intercept  # modality units (e.g. HU)
    scaled = window_scale(values, dicom_window(dataset, decoding))  # (H, W)
    if photometric == "MONOCHROME1":  # low values are bright: invert to the MONOCHROME2 convention
        scaled = 1 - scaled
    return scaled[..., None]  # (H, W, 1)


# ----------------------------------------------------------------------------- entries
def decode(path: str, data: bytes, decoding: Decoding = Decoding()) -> np.ndarray:
    """``(H, W, C)`` float32 in [0, 1], upright; ``ValueError`` naming ``path`` when unreadable."""
    if is_dicom(path, data):
        return decode_dicom(path, data, decoding)
    return decode_pillow(path, data, decoding)


def channels(pixels: np.ndarray, count: int) -> np.ndarray:
    """``(H, W, C)`` -> ``(H, W, count)``: grey repeated for RGB, luma for grey.

    Example:
        >>> channels(np.ones((1, 1, 1), dtype=np.float32), 3).shape
        (1, 1, 3)
        >>> round(float(channels(np.array([[[1.0, 0.0, 0.0]]], dtype=np.float32), 1)[0, 0, 0]), 3)
        0.299
    """
    if pixels.shape[-1] == count:
        return pixels
    if count == 3:
        return np.repeat(pixels, 3, axis=-1)
    if count == 1:
        return (pixels @ np.asarray(LUMA, dtype=np.float32))[..., None]
    raise ValueError(f"data.mean has {count} values; pictures have 1 (grey) or 3 (RGB) channels")


def to_display(pixels: np.ndarray) -> Image.Image:
    """An 8-bit RGB Pillow image of ``(H, W, C)`` pixels in [0, 1] (figures and overlays)."""
    rgb = channels(pixels, 3)
    return Image.fromarray((np.clip(rgb, 0, 1) * 255).round().astype(np.uint8))
