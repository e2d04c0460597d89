"""Decoding pictures as people have them, on files the tests write with Pillow and pydicom."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hdm_lightning.data import ExplanationDataModule, load_image, validate_records, read_inputs
from hdm_lightning.images import Decoding, decode
from tests.helpers.dicom import write_dicom


def read(path, **settings) -> np.ndarray:
    return decode(str(path), path.read_bytes(), Decoding(**settings))


def gradient16(height: int = 20, width: int = 30) -> np.ndarray:
    """uint16 values 1000..3000 across the columns: far above 255."""
    return np.tile(np.linspace(1000, 3000, width), (height, 1)).round().astype(np.uint16)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16_bit_pictures_are_scaled_not_clipped_to_white(tmp_path, suffix):
    path = tmp_path / f"deep{suffix}"
    Image.fromarray(gradient16()).save(path)
    pixels = read(path)
    assert pixels.shape == (20, 30, 1)
    assert pixels.min() == 0 and pixels.max() == 1  # per-image min-max by default
    np.testing.assert_allclose(pixels[0, :, 0], np.linspace(0, 1, 30), atol=1e-3)
    windowed = read(path, window=(1500.0, 1000.0))  # shows 1000..2000; 2000..3000 is white
    np.testing.assert_allclose(windowed[0, :, 0], np.clip(np.linspace(0, 2, 30), 0, 1), atol=2e-3)


def test_exif_orientation_6_is_shown_upright(tmp_path):
    stored = np.zeros((64, 96, 3), dtype=np.uint8)  # stored 96 wide, shown 96 tall
    stored[5:15, 70:90] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    Image.fromarray(stored).save(tmp_path / "phone.png", exif=exif)
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = np.rot90(stored, k=-1)  # (96, 64, 3)
    np.testing.assert_array_equal(read(tmp_path / "phone.png"), upright / 255)
    photo = read(tmp_path / "phone.jpg")
    assert photo.shape == (96, 64, 3)
    assert np.abs(photo - upright / 255).mean() < 0.02
    assert load_image(str(tmp_path / "phone.jpg")).size == (64, 96)  # maps are written at this size


def test_transparent_pixels_show_the_background(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red everywhere, hidden where transparent
    rgba[:2, :, 3] = 0
    rgba[2:, :, 3] = 255
    rgba[3, 3, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "logo.png")
    pixels = read(tmp_path / "logo.png", background=(0, 0, 255))
    np.testing.assert_allclose(pixels[0, 0], [0, 0, 1])
    np.testing.assert_allclose(pixels[2, 0], [1, 0, 0])
    np.testing.assert_allclose(pixels[3, 3], [128 / 255, 0, 127 / 255], atol=1e-6)
    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.info["transparency"] = 0
    palette.save(tmp_path / "palette.png", transparency=0)
    assert read(tmp_path / "palette.png").shape == (4, 4, 3)


def test_dicom_rescale_window_and_monochrome1(tmp_path):
    stored = np.array([[0, 100, 200, 300]], dtype=np.uint16)  # HU = 2 * stored - 100: -100, 100, 300, 500
    plain = write_dicom(tmp_path / "a.dcm", stored, slope=2, intercept=-100, window=(200, 400))
    np.testing.assert_allclose(read(plain)[0, :, 0], [0, 0.25, 0.75, 1])  # file window: 0..400 HU
    np.testing.assert_allclose(read(plain, window=(100.0, 200.0))[0, :, 0], [0, 0.5, 1, 1])  # settings win
    inverted = write_dicom(tmp_path / "b.dcm", stored, photometric="MONOCHROME1", slope=2, intercept=-100)
    np.testing.assert_allclose(read(inverted)[0, :, 0], [1, 2 / 3, 1 / 3, 0], atol=1e-6)  # min-max, inverted
    no_suffix = tmp_path / "c"
    no_suffix.write_bytes(plain.read_bytes())
    np.testing.assert_allclose(read(no_suffix)[0, :, 0], [0, 0.25, 0.75, 1])  # found by its DICM marker


def test_dicom_for_a_three_channel_classifier_is_grey_repeated(tmp_path):
    write_dicom(tmp_path / "x.dcm", np.array([[0, 10], [20, 30]], dtype=np.uint16))
    data = ExplanationDataModule(str(tmp_path), image_size=8, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    data.setup()
    images = data.batch([0])["images"]  # (1, 3, 8, 8)
    assert images.shape == (1, 3, 8, 8) and torch_equal(images[0, 0], images[0, 2])
    assert images.min() == 0 and images.max() == 1


def torch_equal(a, b) -> bool:
    return bool((a == b).all())


def test_pictures_above_the_pixel_limit_fail_by_name_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own setting, lowered for a small file
    Image.new("RGB", (40, 40), "white").save(tmp_path / "big.png")
    Image.new("RGB", (20, 20), "white").save(tmp_path / "small.png")
    data = ExplanationDataModule(str(tmp_path), image_size=8)
    data.setup()
    batch = data.batch([0, 1])
    assert batch["indices"] == [1] and "data.allow_large_images" in batch["failed"][0][1]
    _, failed = validate_records(read_inputs(str(tmp_path)), None)
    assert [r.name for r, _ in failed] == ["big"] and "big.png" in failed[0][1]
    allowed = ExplanationDataModule(str(tmp_path), image_size=8, allow_large_images=True)
    allowed.setup()
    assert allowed.batch([0, 1])["indices"] == [0, 1]
    assert Image.MAX_IMAGE_PIXELS == 1000  # the limit is restored after reading


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="data.window"):
        ExplanationDataModule(window=(0.0, -1.0))
    with pytest.raises(ValueError, match="data.background"):
        ExplanationDataModule(background=(0, 0, 300))
    with pytest.raises(ValueError, match="data.resize"):
        ExplanationDataModule(resize="crop")
