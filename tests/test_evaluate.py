"""The evaluation command on hand-made run folders whose scores are known in advance.

Two methods explain the images of a classifier that reads one square: ``oracle`` maps are exactly
the ground truth (the square), ``decoy`` maps light up a second, equally bright square the
classifier ignores. Ground truth is a mask folder marking the square.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from hdm_lightning.data import file_hash
from hdm_lightning.evaluate import Results, choose_metrics, log_to_wandb, main, write_tables
from hdm_lightning.groundtruth import MaskFolder
from hdm_lightning.outputs import RunFolder
from tests.helpers.region_model import DECOY, REGION, SIZE, region_slices, square_images

CLASSIFIER = {
    "class_path": "hdm_lightning.models.ImportedClassifier",
    "init_args": {"network": "tests.helpers.region_model.RegionClassifier", "classes": ["other", "square"]},
}
PERCENTS = (5.0, 10.0)
AREA = 64  # pixels of the 8 × 8 square



def square_map(square) -> np.ndarray:
    saliency = np.zeros((SIZE, SIZE), dtype=np.float32)
    saliency[region_slices(square)] = 1.0
    return saliency


def write_run(out_dir, paths, square, hashes: bool = True) -> None:
    """A run folder whose every map is 1 on ``square`` and 0 elsewhere; rows carry the file hash."""
    run = RunFolder(out_dir)
    for path in paths:
        row = {"name": path.stem, "image": str(path), "target": 1, "class_name": "square", "logit": 0.0,
               "masked_logit": 0.0, "steps": 0, "seconds": 0.0}
        if hashes:
            row["sha256"] = file_hash(str(path))
        saliency = torch.from_numpy(square_map(square))
        run.write(path.stem, Image.open(path).convert("RGB"), saliency, saliency.new_zeros(0, SIZE, SIZE), row)


@pytest.fixture
def setting(tmp_path):
    """Images, their ground truth, and the two run folders; ``decoy`` lacks one image."""
    images, truth = tmp_path / "images", tmp_path / "truth"
    images.mkdir()
    truth.mkdir()
    paths = square_images(images, count=3)
    for path in paths:
        Image.fromarray(square_map(REGION).astype(np.uint8) * 255).save(truth / path.name)
    write_run(tmp_path / "oracle", paths, REGION)
    write_run(tmp_path / "decoy", paths[:2], DECOY, hashes=False)  # an older run: rows without a hash
    return tmp_path, paths


def eval_args(root, *extra: str) -> list[str]:
    return [
        "--runs", str(root / "oracle"), str(root / "decoy"), "--data.images", str(root / "images"),
        "--data.image_size", str(SIZE), "--data.mean", "[0.5, 0.5, 0.5]", "--data.std", "[0.5, 0.5, 0.5]",
        "--model.classifier", json.dumps(CLASSIFIER), "--out_dir", str(root / "eval"), "--device", "cpu",
        "--deletion.num_steps", "16", "--insertion.num_steps", "16", "--localisation.percents", json.dumps(PERCENTS),
        *extra,
    ]


def probability(logit: float, threshold: float = 2.0) -> float:
    return 1 / (1 + math.exp(threshold - logit))


def test_scores_match_hand_computation(setting):
    root, paths = setting
    results = main(eval_args(root, "--ground_truth.class_path", "MaskFolder",
                             "--ground_truth.init_args.root", str(root / "truth")))

    with open(root / "eval" / "results.csv", newline="") as handle:
        table = {row.pop("method"): {k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)}
    assert list(table) == ["oracle", "decoy"]
    for method, row in table.items():
        assert row == pytest.approx(results.rows[method])
    oracle, decoy = table["oracle"], table["decoy"]
    assert oracle["images"] == decoy["images"] == 2  # only the images both runs explained
    # Top p % of an exact map: 5 % (51 px) keeps the square's 64 tied ones; 10 % (102 px) keeps
    # every pixel, the tied zeros included.
    everything = SIZE * SIZE
    assert oracle["pointing_game"] == 1.0 and oracle["energy_pointing_game"] == 1.0
    assert oracle["dice"] == pytest.approx((1 + 2 * AREA / (everything + AREA)) / 2)
    assert oracle["iou"] == pytest.approx((1 + AREA / everything) / 2)
    assert oracle["precision"] == pytest.approx((1 + AREA / everything) / 2)
    assert oracle["sensitivity"] == pytest.approx(1.0)
    assert decoy["pointing_game"] == 0.0 and decoy["energy_pointing_game"] == 0.0
    assert decoy["dice"] == pytest.approx((0 + 2 * AREA / (everything + AREA)) / 2)
    # Average Drop: the oracle keeps the square as it is; the decoy hides it (class-1 logit 0).
    grey = [np.asarray(Image.open(p), dtype=np.float64)[region_slices(REGION)].mean() / 255 for p in paths[:2]]
    full = [probability(4 * (2 * g - 1)) for g in grey]
    assert oracle["average_drop"] == pytest.approx(0.0, abs=1e-4)
    assert decoy["average_drop"] == pytest.approx(np.mean([100 * (p - probability(0)) / p for p in full]), rel=1e-4)
    assert oracle["increase_in_confidence"] == decoy["increase_in_confidence"] == 0.0
    assert 0 <= oracle["deletion_auc"] < decoy["deletion_auc"] <= 1
    assert 1 >= oracle["insertion_auc"] > decoy["insertion_auc"] >= 0
    curve = results.curves["oracle"]["deletion"]
    assert curve.shape == (17,) and curve[0] == pytest.approx(np.mean(full), rel=1e-4)
    for figure in ("deletion.png", "insertion.png", "gallery.png"):
        with Image.open(root / "eval" / figure) as picture:
            assert min(picture.size) > 100
    markdown = (root / "eval" / "results.md").read_text().splitlines()
    assert markdown[0].startswith("| method | images | deletion_auc") and len(markdown) >= 4
    with open(root / "eval" / "per_image.csv", newline="") as handle:  # one row per image and method
        rows = list(csv.DictReader(handle))
    assert [(r["image"], r["method"]) for r in rows] == [(p.stem, m) for m in table for p in paths[:2]]
    for method, row in table.items():
        mine = [r for r in rows if r["method"] == method]
        for column in ("deletion_auc", "insertion_auc"):
            assert np.mean([float(r[column]) for r in mine]) == pytest.approx(row[column], rel=1e-5)
    assert all(float(r["deletion_auc"]) < 0.5 for r in rows if r["method"] == "oracle")


def test_without_ground_truth_only_perturbation_metrics_are_computed(setting):
    root, _ = setting
    results = main(eval_args(root, "--metrics", "[deletion, confidence]"))

    assert set(results.rows["oracle"]) == {"images", "deletion_auc", "average_drop", "increase_in_confidence"}
    assert (root / "eval" / "deletion.png").is_file() and not (root / "eval" / "insertion.png").exists()


def test_ground_truth_metrics_need_ground_truth(tmp_path):
    assert choose_metrics(None, None) == ["deletion", "insertion", "confidence"]
    assert choose_metrics(None, MaskFolder(tmp_path))[-3:] == ["pointing", "energy", "localisation"]
    with pytest.raises(ValueError, match="pointing"):
        choose_metrics(["deletion", "pointing"], None)


def test_runs_without_an_index_are_refused(setting):
    root, _ = setting
    (root / "decoy" / "index.jsonl").unlink()
    with pytest.raises(ValueError, match="index.jsonl"):
        main(eval_args(root))


def test_wandb_gets_the_table_and_the_figures_offline(tmp_path):
    results = Results(images={"a": "a.png"}, rows={"oracle": {"images": 1.0, "dice": 0.5}})
    columns = write_tables(results, tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "gallery.png")

    log_to_wandb(results, columns, tmp_path, "hdm-lightning-test")

    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    (table,) = (run / "files" / "media" / "table").glob("results_*.table.json")
    assert json.loads(table.read_text())["data"] == [["oracle", 1.0, 0.5]]
    assert len(list((run / "files" / "media" / "images").glob("gallery_*.png"))) == 1


def test_a_run_over_other_pictures_is_refused_naming_the_image(setting):
    """Two pictures swapped in the folder after the run: same names, other pictures."""
    root, paths = setting
    first, second = paths[0].read_bytes(), paths[1].read_bytes()
    paths[0].write_bytes(second)
    paths[1].write_bytes(first)
    with pytest.raises(ValueError, match="oracle: image 'square0' is not the picture its map was made for"):
        main(eval_args(root))


def test_padded_inputs_score_maps_in_the_same_frame(tmp_path):
    """Non-square pictures with ``data.resize=pad``: the oracle map still covers the square."""
    images, truth = tmp_path / "images", tmp_path / "truth"
    images.mkdir()
    truth.mkdir()
    rows, cols = region_slices(REGION)
    paths = []
    for i, path in enumerate(square_images(images, count=2)):
        wide = np.zeros((SIZE, 2 * SIZE, 3), dtype=np.uint8)  # the picture beside a black half
        wide[:, :SIZE] = np.asarray(Image.open(path))
        path.unlink()
        paths.append(images / f"wide{i}.png")
        Image.fromarray(wide).save(paths[-1])
        mask = np.zeros((SIZE, 2 * SIZE), dtype=np.uint8)
        mask[rows, cols] = 255
        Image.fromarray(mask).save(truth / paths[-1].name)
    run = RunFolder(tmp_path / "oracle")
    for path in paths:
        saliency = np.zeros((SIZE, 2 * SIZE), dtype=np.float32)
        saliency[rows, cols] = 1.0
        row = {"name": path.stem, "image": str(path), "target": 1, "class_name": "square", "logit": 0.0,
               "masked_logit": 0.0, "steps": 0, "seconds": 0.0, "sha256": file_hash(str(path))}
        run.write(path.stem, Image.open(path).convert("RGB"), torch.from_numpy(saliency), torch.zeros(0, 1, 1), row)
    results = main([
        "--runs", str(tmp_path / "oracle"), "--data.images", str(images), "--data.image_size", str(2 * SIZE),
        "--data.resize", "pad", "--model.classifier", json.dumps(CLASSIFIER), "--out_dir", str(tmp_path / "eval"),
        "--device", "cpu", "--metrics", "[pointing, energy]", "--ground_truth.class_path", "MaskFolder",
        "--ground_truth.init_args.root", str(truth),
    ])
    assert results.rows["oracle"]["pointing_game"] == 1.0
    assert results.rows["oracle"]["energy_pointing_game"] == pytest.approx(1.0)
