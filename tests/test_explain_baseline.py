"""The baseline command on a classifier that looks at one square: files, index rows, map peaks, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hdm_lightning.baselines import RISE, GradCAM
from hdm_lightning.explain_baseline import build_parser, explain_batch, main
from hdm_lightning.outputs import RunFolder
from tests.helpers.region_model import DECOY, REGION, SIZE, RegionClassifier, region_slices, square_images

CLASSIFIER = {
    "class_path": "hdm_lightning.models.ImportedClassifier",
    "init_args": {"network": "tests.helpers.region_model.RegionClassifier", "classes": ["other", "square"]},
}



@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    square_images(folder, count=3)
    return folder


def run_args(images, out_dir, *baseline: str) -> list[str]:
    return [
        *baseline, "--data.images", str(images), "--data.image_size", str(SIZE), "--data.mean", "[0.5, 0.5, 0.5]",
        "--data.std", "[0.5, 0.5, 0.5]", "--data.batch_size", "2", "--model.classifier", json.dumps(CLASSIFIER),
        "--out_dir", str(out_dir), "--device", "cpu",
    ]


def square_logit(path) -> float:
    """Class-1 logit by hand: 4 · mean over the region of the normalised grey level (all positive)."""
    pixels = np.asarray(Image.open(path), dtype=np.float64)[region_slices(REGION)] / 255
    return 4 * ((pixels - 0.5) / 0.5).mean()


def test_gradcam_run_folder_has_hdm_layout_and_maps_on_the_region(images, tmp_path):
    run = main(run_args(images, tmp_path / "gradcam", "--baseline", "GradCAM"))

    rows = run.read_index()
    assert sorted(rows) == ["square0", "square1", "square2"]
    assert (run.root / "config.yaml").is_file()
    for name, row in rows.items():
        assert set(row) == {"name", "image", "target", "class_name", "logit", "masked_logit", "steps", "seconds",
                            "sha256"}
        assert (row["target"], row["class_name"], row["steps"]) == (1, "square", 0)
        assert row["logit"] == pytest.approx(square_logit(row["image"]), abs=1e-4)
        # the map is 1 on the region the classifier reads: keeping it keeps the logit
        assert row["masked_logit"] == pytest.approx(row["logit"], abs=1e-4)
        saliency = run.load_map(name)
        assert saliency.shape == (SIZE, SIZE) and saliency.dtype == np.float32
        assert saliency[region_slices(REGION)].min() == pytest.approx(1.0)  # the peak, all over the region
        assert saliency[region_slices(DECOY)].max() == pytest.approx(0.0), "the bright decoy is ignored"
        with Image.open(run.root / "overlays" / f"{name}.png") as picture:
            assert picture.size == (SIZE, SIZE)
    assert not (run.root / "stages").exists()


def test_rise_map_peaks_inside_the_region():
    images = torch.full((1, 3, SIZE, SIZE), -0.8)
    for square in (REGION, DECOY):
        images[(0, slice(None), *region_slices(square))] = 0.9
    result = explain_batch(RISE(n_masks=500, grid_size=4, batch_size=250), RegionClassifier().eval(), images,
                           torch.tensor([-1]))

    saliency = result.maps[0]
    rows, cols = region_slices(REGION)
    peak_row, peak_col = divmod(int(saliency.argmax()), SIZE)
    assert rows.start <= peak_row < rows.stop and cols.start <= peak_col < cols.stop
    assert saliency[region_slices(REGION)].mean() > saliency[region_slices(DECOY)].mean() + 0.3
    assert result.targets.tolist() == [1]  # -1: the top-1 class
    assert result.logit.item() == pytest.approx(4 * 0.9, abs=1e-5)
    assert 0 < result.masked_logit.item() < result.logit.item()


def test_explicit_targets_are_kept():
    images = torch.zeros(2, 3, SIZE, SIZE)
    result = explain_batch(GradCAM(), RegionClassifier().eval(), images, torch.tensor([0, 1]))
    assert result.targets.tolist() == [0, 1]
    assert result.logit.tolist() == pytest.approx([2.0, 0.0])  # threshold, and a dark region


def test_resume_explains_only_missing_images_and_records_unreadable_ones(images, tmp_path):
    out_dir = tmp_path / "rise"
    rise = ["--baseline", "RISE", "--baseline.n_masks", "50", "--baseline.grid_size", "4"]
    main(run_args(images, out_dir, *rise))
    kept = RunFolder(out_dir).load_map("square0")
    RunFolder(out_dir).map_path("square1").unlink()
    (images / "broken.png").write_bytes(b"not a png")

    run = main(run_args(images, out_dir, *rise))

    lines = [json.loads(line)["name"] for line in (out_dir / "index.jsonl").read_text().splitlines()]
    assert lines == ["square0", "square1", "square2", "square1"]
    assert sorted(run.read_index()) == ["square0", "square1", "square2"]
    np.testing.assert_array_equal(run.load_map("square0"), kept)
    failures = [json.loads(line) for line in (out_dir / "failed.jsonl").read_text().splitlines()]
    assert [f["image"] for f in failures] == [str(images / "broken.png")]


def test_parser_picks_the_baseline_by_name_and_reads_the_hdm_data_section(tmp_path):
    config = tmp_path / "shared.yaml"
    config.write_text(
        "data:\n  images: some/folder\n  image_size: 64\n  batch_size: 3\n"
        "model:\n  classifier:\n    class_path: hdm_lightning.models.TorchvisionClassifier\n"
        "    init_args:\n      name: resnet18\n"
    )
    parser = build_parser()
    parsed = parser.parse_args(["--config", str(config), "--baseline", "RISE", "--baseline.n_masks", "2000"])

    assert parsed.baseline.class_path == "hdm_lightning.baselines.RISE"
    assert parsed.baseline.init_args.n_masks == 2000
    assert (parsed.data.images, parsed.data.image_size, parsed.data.batch_size) == ("some/folder", 64, 3)
    assert parsed.model.classifier.init_args.name == "resnet18"
    assert parser.parse_args(["--baseline", "GradCAM"]).model.classifier is None  # EfficientNet-Lite0
    with pytest.raises(SystemExit):
        parser.parse_args(["--baseline", "NoSuchMethod"])
