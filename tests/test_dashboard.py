"""W&B dashboards, read back from the offline run file with W&B's own record schema."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from hdm_lightning import masks as M
from hdm_lightning.dashboard import RunMetrics, log_mask_images, mask_image
from tests.helpers.progressing import IMAGES, STEPS, Progressing
from tests.helpers.wandb_file import history_rows


class LogsMasks(Callback):
    """Logs two masks in [0, 1] (a ramp and a square) the way the engine does at a level's end."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 3:
            ramp = torch.linspace(0, 1, 16).repeat(16, 1)  # (16, 16)
            square = torch.zeros(16, 16)
            square[4:8, 4:8] = 0.8
            log_mask_images(trainer, "masks/stage0/level0", [ramp, square], ["ramp", "square"])


def test_offline_run_holds_visible_masks_and_run_metrics(tmp_path):
    import wandb

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="hdm-test")
    trainer = Trainer(callbacks=[LogsMasks(), RunMetrics(every_n_steps=2)], logger=logger, enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=False, max_epochs=1, accelerator="cpu")
    trainer.fit(Progressing())
    wandb.finish()

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("*.wandb")
    rows = history_rows(run_file)
    (masks,) = [row for row in rows if "masks/stage0/level0/filenames" in row]  # W&B flattens the image dict
    assert masks["masks/stage0/level0/count"] == 2 and masks["masks/stage0/level0/captions"] == ["ramp", "square"]
    for name in masks["masks/stage0/level0/filenames"]:
        with Image.open(run_dir / "files" / name) as stored:
            pixels = np.asarray(stored.convert("RGB"))
        assert pixels.std() > 10 and pixels.max() > 100  # not the all-black panel of float masks
    done = [row["progress/images_done"] for row in rows if "progress/images_done" in row]
    assert len(done) == STEPS // 2 + 1 and done == sorted(done) and done[-1] == IMAGES
    assert rows[-1]["progress/images_failed"] == 1 and "progress/images_per_minute" in rows[-1]
    assert "progress/minutes_left" in rows[-1] and rows[-1]["progress/minutes_left"] == 0


def test_mask_image_keeps_the_scale_fixed():
    low, high = mask_image(np.full((2, 2), 0.1)), mask_image(np.full((2, 2), 0.9))
    assert low.dtype == np.uint8 and not np.array_equal(low, high)  # not min-max per image: 0.1 stays dark
    assert np.array_equal(mask_image(np.full((2, 2), 1.5)), mask_image(np.ones((2, 2))))


def test_the_engine_logs_coloured_masks_and_run_metrics_through_the_cli(tmp_path):
    """A real CLI run with offline W&B (2 stages): the watched image's level masks are visible images,
    the run-level metrics count the images and give the mean kept-logit ratio and the final loss of
    each stage of the index rows, and each image's figure is logged and not blank."""
    from hdm_lightning.cli import main
    from tests.helpers.tiny import spot_images
    from tests.test_cli import SMALL

    folder = tmp_path / "images"
    folder.mkdir()
    spot_images(folder, count=2)
    out = tmp_path / "run"
    main([f"--data.images={folder}", f"--out_dir={out}", *SMALL, "--trainer.logger.init_args.mode=offline"])
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("*.wandb")
    rows = history_rows(run_file)
    masks = [row for row in rows if any(key.startswith("masks/stage0/level") and key.endswith("/filenames")
                                        for key in row)]
    assert masks, "level masks logged"
    for row in masks:
        for key in [k for k in row if k.endswith("/filenames")]:
            for name in row[key]:
                with Image.open(run_dir / "files" / name) as stored:
                    pixels = np.asarray(stored.convert("RGB"))
                assert pixels.shape[:2] == (32, 32) and pixels.std() > 10  # coloured, not the black float panel
    final = [row for row in rows if "progress/images_done" in row][-1]
    assert final["progress/images_done"] == 2 and final["progress/images_total"] == 2
    assert final["progress/images_failed"] == 0

    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert len(index) == 2
    for row in index:  # one final loss per stage run, each the mean of that stage's items' last losses
        assert row["stages"] == 2 and len(row["final_loss"]) == 2
        assert all(np.isfinite(loss) and loss > 0 for loss in row["final_loss"])
    quality = [row for row in rows if "quality/mean_kept_ratio" in row][-1]
    ratios = [row["masked_logit"] / row["logit"] for row in index if row["logit"] > 0]
    assert ratios and quality["quality/mean_kept_ratio"] == pytest.approx(np.mean(ratios))
    for t in (1, 2):
        expected = np.mean([row["final_loss"][t - 1] for row in index])
        assert quality[f"quality/stage{t}_final_loss"] == pytest.approx(expected)
    assert "quality/stage3_final_loss" not in quality
    figures = [(caption.split(":")[0], name) for row in rows if "figures/filenames" in row
               for caption, name in zip(row["figures/captions"], row["figures/filenames"])]
    assert sorted(image for image, _ in figures) == sorted(row["name"] for row in index)  # each image once
    for image, name in figures:
        with Image.open(run_dir / "files" / name) as stored, Image.open(out / "figures" / f"{image}.png") as kept:
            pixels = np.asarray(stored.convert("RGB"))
            assert np.array_equal(pixels, np.asarray(kept.convert("RGB")))  # the run folder's figure, drawn once
        assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # picture and maps, not blank


def test_a_stage_final_loss_is_the_mean_of_its_items_last_losses_and_survives_a_checkpoint(tmp_path):
    """``end_item`` adds each item's last loss, ``end_stage`` appends their mean; an image state saved
    and restored mid-stage (a resume) ends with the same numbers, bitwise."""
    from hdm_lightning.module import ImageState
    from hdm_lightning.pool import Item
    from tests.helpers.run import build
    from tests.helpers.tiny import spot_images

    folder = tmp_path / "images"
    folder.mkdir()
    spot_images(folder, count=1)
    model, data, _ = build(folder, tmp_path / "run", module={"benchmark_sizes": (3,), "block_factors": (2,),
                                                               "max_size": 6})
    data.setup()
    image = data.batch([0])["images"][0]
    model.image_rows(1, tuple(image.shape))
    a0, a1 = torch.rand(3, 3), torch.rand(6, 6)
    losses = [torch.tensor(0.7), torch.tensor(0.2), torch.tensor(0.4)]

    def run(resume: bool) -> ImageState:
        state = model.begin_image(0, "spot0", "", 0, image, -1)
        model.begin_stage(state)
        model.end_item(state, Item(0, 0, 0, 0), a0, a0, losses[0])
        if resume:
            state = ImageState.from_state_dict(state.state_dict(), torch.device("cpu"))
        model.end_item(state, Item(0, 0, 0, 1), a1, M.replicate(a0, 2) * a1, losses[1])
        model.end_stage(state)
        state.stage = 1
        model.begin_stage(state)
        model.end_item(state, Item(0, 1, 0, 0), a0, a0, losses[2])
        model.end_item(state, Item(0, 1, 0, 1), a1, M.replicate(a0, 2) * a1)  # no loss given: not counted
        model.end_stage(state)
        return state

    whole, resumed = run(resume=False), run(resume=True)
    assert torch.stack(whole.final_losses).tolist() == pytest.approx([0.45, 0.4])
    assert torch.equal(torch.stack(whole.final_losses), torch.stack(resumed.final_losses))
    assert whole.stage_loss is None and whole.stage_items == 0  # reset for the next stage
