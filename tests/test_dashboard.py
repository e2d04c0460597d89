"""W&B dashboards, read back from the offline run file with W&B's own record schema."""

from __future__ import annotations

import numpy as np
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

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
    """A real CLI run with offline W&B: the watched image's level masks are visible images, and the
    run-level metrics count the images."""
    from hdm_lightning.cli import main
    from tests.helpers.tiny import spot_images
    from tests.test_cli import SMALL

    folder = tmp_path / "images"
    folder.mkdir()
    spot_images(folder, count=2)
    out = tmp_path / "run"
    main([f"--data.images={folder}", f"--out_dir={out}", *SMALL, "--schedule.stages=1",
          "--trainer.logger.init_args.mode=offline"])
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
