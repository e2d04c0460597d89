"""The issue's bad inputs through the real CLI: each named in failed.jsonl, the rest explained."""

from __future__ import annotations

import json

from PIL import Image

from hdm_lightning.cli import main
from tests.helpers.tiny import spot_images
from tests.test_cli import SMALL


def test_bad_rows_are_recorded_before_the_first_step_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    spot_images(folder, count=2)
    (folder / "broken.png").write_bytes(b"not a png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 2000)  # Pillow's own limit, lowered for a small file
    Image.new("RGB", (60, 60)).save(folder / "huge.png")
    manifest = tmp_path / "m.csv"
    manifest.write_bytes("image,target\nimages/spot0.png,5000\nimages/spot1.png,1\nimages/broken.png,1\n"
                         "images/huge.png,1\nimages/spot0.png,-5\n".encode("utf-8-sig"))  # as Excel saves it
    out = tmp_path / "run"
    main([f"--data.images={manifest}", f"--out_dir={out}", *SMALL, "--trainer.logger=false", "--schedule.stages=1"])

    printed = capsys.readouterr().out
    assert "Explained 1 of 5 images; 4 failed, reasons in" in printed and "failed.jsonl" in printed
    assert [p.stem for p in (out / "maps").glob("*.npy")] == ["spot1"]
    reasons = {json.loads(line)["error"].split(": ", 1)[0]: json.loads(line)["error"]
               for line in (out / "failed.jsonl").read_text().splitlines()}
    assert "target 5000 is not a class of the classifier (0..1)" in reasons[f"{manifest}, line 2"]
    assert "target -5" in reasons[f"{manifest}, line 6"]
    assert any("broken.png" in why for why in reasons.values())
    assert any("huge.png" in why and "data.allow_large_images" in why for why in reasons.values())


def test_a_phone_photo_is_explained_upright_at_its_displayed_size(tmp_path):
    import numpy as np

    folder = tmp_path / "images"
    folder.mkdir()
    stored = np.zeros((32, 48, 3), dtype=np.uint8)  # stored 48 wide; EXIF 6 shows it 48 tall
    stored[2:10, 30:44] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(folder / "phone.jpg", exif=exif, quality=95)
    out = tmp_path / "run"
    main([f"--data.images={folder}", f"--out_dir={out}", *SMALL, "--trainer.logger=false", "--schedule.stages=1"])
    assert np.load(out / "maps" / "phone.npy").shape == (48, 32)
    with Image.open(out / "overlays" / "phone.png") as overlay:
        assert overlay.size == (32, 48)
        upright = np.asarray(overlay.convert("L"), dtype=np.float32)
    rotated = np.rot90(stored.mean(axis=2), k=-1)  # where the bright patch is once upright
    assert upright[rotated > 128].mean() > upright[rotated < 128].mean() + 20  # the picture under the map is upright
