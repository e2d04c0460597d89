"""The chest X-ray preset end to end: DICOM files, a 1-channel classifier, padded input, maps on
the original pixels, and evaluation against ChestX-ray14-style boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hdm_lightning.cli import CONFIGS, main
from hdm_lightning.evaluate import main as evaluate
from tests.helpers.dicom import write_dicom
from tests.helpers.wrapped import GreySpot

pytest.importorskip("pydicom")
HEIGHT, WIDTH = 32, 64  # a non-square detector, shown to a 32 x 32 classifier
#: The dense square, where each ``data.resize`` puts it on GreySpot's square (rows 8-16, columns
#: 18-26 of the input): padded, the picture fills rows 8-24 at half scale; squashed, columns halve.
SQUARES = {"pad": (slice(0, 16), slice(36, 52)), "squash": (slice(8, 16), slice(36, 52))}
CLASSIFIER = {"class_path": "hdm_lightning.models.ImportedClassifier",
              "init_args": {"network": "tests.helpers.wrapped.GreySpot", "classes": ["normal", "finding"]}}
SMALL = ["--model.benchmark_sizes=[3,4]", "--model.block_factors=[2]", "--model.max_size=8",
         "--data.image_size=32", "--data.batch_size=3", "--schedule.stages=2", "--schedule.min_steps=20",
         "--schedule.max_steps=40", "--schedule.check_every=10", "--trainer.accelerator=cpu",
         "--trainer.enable_progress_bar=false", "--trainer.logger=false"]


def square_mask(resize: str) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), dtype=bool)
    mask[SQUARES[resize]] = True
    return mask


@pytest.fixture(params=["squash", "pad"])
def xrays(tmp_path, request):
    """Three DICOM files (one MONOCHROME1) with a dense square, their manifest and box list."""
    folder = tmp_path / "xrays"
    folder.mkdir()
    rng = np.random.default_rng(0)
    lines, boxes = ["image,target"], ["Image Index,Finding Label,Bbox [x,y,w,h]"]
    for i in range(3):
        stored = rng.uniform(200, 900, size=(HEIGHT, WIDTH))
        stored[SQUARES[request.param]] = 3000
        photometric = "MONOCHROME1" if i == 2 else "MONOCHROME2"
        if i == 2:
            stored = 4000 - stored  # stored dark, shown bright
        write_dicom(folder / f"xray{i}.dcm", stored.round().astype(np.uint16), photometric, slope=1.0,
                    intercept=-1024.0, window=None)
        lines.append(f"xrays/xray{i}.dcm,1")
        top = SQUARES[request.param][0].start
        boxes.append(f"xray{i}.png,Mass,36,{top},16,16")  # NIH names the PNG; the DICOM matches by stem
    (tmp_path / "xrays.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "boxes.csv").write_text("\n".join(boxes) + "\n")
    checkpoint = tmp_path / "greyspot.pt"
    torch.save(GreySpot().state_dict(), checkpoint)
    classifier = {**CLASSIFIER, "init_args": {**CLASSIFIER["init_args"], "checkpoint": str(checkpoint)}}
    return tmp_path, json.dumps(classifier), request.param


def test_chestxray_preset_explains_dicom_files_and_scores_them_on_boxes(xrays, capsys):
    root, classifier, resize = xrays
    out = root / "run"
    main(["--config", str(CONFIGS / "chestxray.yaml"), f"--data.images={root / 'xrays.csv'}",
          f"--model.classifier={classifier}", f"--out_dir={out}", f"--data.resize={resize}", *SMALL])
    assert "Explained 3 of 3 images" in capsys.readouterr().out
    rows = {json.loads(line)["name"]: json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()}
    assert sorted(rows) == ["xray0", "xray1", "xray2"] and {r["class_name"] for r in rows.values()} == {"finding"}
    for name in rows:
        saliency = np.load(out / "maps" / f"{name}.npy")
        assert saliency.shape == (HEIGHT, WIDTH)  # the original detector's pixels
        share, area = saliency[square_mask(resize)].sum() / saliency.sum(), square_mask(resize).mean()
        assert share > 2 * area, (name, share)  # the map lies on the dense square, MONOCHROME1 included

    results = evaluate(["--config", str(CONFIGS / "chestxray-evaluate.yaml"), "--runs", str(out),
                        "--data.images", str(root / "xrays.csv"), "--data.image_size", "32", "--data.resize", resize,
                        "--model.classifier", classifier, "--out_dir", str(root / "eval"), "--device", "cpu",
                        "--metrics", "[pointing, energy]", "--ground_truth.init_args.path", str(root / "boxes.csv"),
                        "--ground_truth.init_args.source_size", f"[{HEIGHT}, {WIDTH}]"])
    assert results.rows["run"]["pointing_game"] == 1.0  # boxes found by stem, placed as the pictures are
    assert results.rows["run"]["energy_pointing_game"] > 2 * 8 * 8 / (32 * 32)  # twice the square's share


def test_chestxray_presets_parse(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(CONFIGS / "chestxray.yaml"), "--print_config"])
    assert stop.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "TimmClassifier" in printed and "in_chans: 1" in printed and "resize: pad" in printed
