"""Runs HDM on small images through a real Trainer, without the CLI."""

from pathlib import Path

import numpy as np
from lightning.pytorch import Trainer

from hdm_lightning.callbacks import HDMSchedule, MapWriter
from hdm_lightning.data import ExplanationDataModule
from hdm_lightning.module import MaskExplainer
from hdm_lightning.outputs import RunFolder
from tests.helpers.tiny import SIZE, SpotClassifier

HALF = (0.5, 0.5, 0.5)
SMALL_MASKS = {"benchmark_sizes": (3, 4), "block_factors": (2, 3), "max_size": 16}
SHORT_SCHEDULE = {"stages": 2, "min_steps": 20, "max_steps": 40, "patience": 10, "check_every": 10}
SHORT_RATE = {"lr": 0.05, "lr_horizon": 40}  # configs/fast.yaml's rate, decayed over SHORT_SCHEDULE's steps


def build(images, out_dir, classifier=None, batch_size=1, module=None, schedule=None, trainer=None, callbacks=()):
    """Module, data, callbacks and Trainer of a small HDM run."""
    model = MaskExplainer(
        classifier=classifier or SpotClassifier(), mean=HALF, std=HALF, **{**SHORT_RATE, **SMALL_MASKS, **(module or {})}
    )
    data = ExplanationDataModule(str(images), image_size=SIZE, mean=HALF, std=HALF, batch_size=batch_size)
    callbacks = [HDMSchedule(str(out_dir), **{**SHORT_SCHEDULE, **(schedule or {})}), MapWriter(str(out_dir)), *callbacks]
    settings = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False, "max_epochs": -1, "accelerator": "cpu", "deterministic": True}
    return model, data, Trainer(callbacks=callbacks, **{**settings, **(trainer or {})})


def explain(images, out_dir, **kwargs) -> RunFolder:
    model, data, trainer = build(images, out_dir, **kwargs)
    trainer.fit(model, datamodule=data)
    return RunFolder(out_dir)


def maps(run: RunFolder) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p) for p in sorted(Path(run.root, "maps").glob("*.npy"))}
