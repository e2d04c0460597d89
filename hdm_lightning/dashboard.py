"""W&B dashboards worth watching: masks you can see, and run-level metrics of a long run.

Masks are floats in ``[0, 1]``; handed to a logger as they are, W&B stores them as uint8 and every
pixel becomes 0 (the all-black ``masks/stage*/level*`` panels). :func:`mask_image` draws them
through a colour map into uint8 RGB first, on the fixed range ``[0, 1]`` so that panels of
different steps compare. :class:`RunMetrics` logs what a user watches on a cluster: images done
and failed, images per minute, time left and items in flight, from the module's ``progress()``,
and :func:`image_metrics` summarises finished index rows (mean kept-logit ratio, final loss per
stage where the rows carry it).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import Callback
from matplotlib import colormaps
from torch import Tensor
from typing_extensions import override

from hdm_lightning.progress import Throughput, finished

MASK_COLOUR_MAP = "viridis"


def mask_image(mask: Tensor | np.ndarray, colour_map: str = MASK_COLOUR_MAP, low: float = 0.0,
               high: float = 1.0) -> np.ndarray:
    """``(H, W)`` mask values in ``[low, high]`` -> ``(H, W, 3)`` uint8 RGB through ``colour_map``.

    Example:
        >>> image = mask_image(np.array([[0.0, 1.0]]))
        >>> image.dtype, image.shape, image[0, 0].tolist(), image[0, 1].tolist()
        (dtype('uint8'), (1, 2, 3), [68, 1, 84], [253, 231, 37])
    """
    values = mask.detach().float().cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask, dtype=np.float32)
    scaled = np.clip((values - low) / (high - low), 0, 1)  # (H, W)
    return (colormaps[colour_map](scaled)[..., :3] * 255).round().astype(np.uint8)  # (H, W, 3)


def log_mask_images(trainer: pl.Trainer, key: str, masks: list[Tensor | np.ndarray], captions: list[str]) -> None:
    """Masks as coloured uint8 images to every logger that takes images (W&B, TensorBoard)."""
    images = [mask_image(m) for m in masks]
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=images, caption=captions, step=trainer.global_step)


def progress_metrics(progress: dict[str, Any], meter: Throughput) -> dict[str, float]:
    """Run-level numbers of a ``progress()`` dict: ``progress/images_done`` … ``progress/in_flight``.

    Example:
        >>> meter = Throughput()
        >>> meter.start(0, now=0.0)
        >>> progress_metrics({"images_total": 10, "images_done": 4, "images_failed": 1,
        ...                   "in_flight": {"stage1/level0": 3}}, meter)["progress/images_done"]
        4.0
    """
    done, total = finished(progress), int(progress["images_total"])
    metrics = {
        "progress/images_total": float(total),
        "progress/images_done": float(progress["images_done"]),
        "progress/images_failed": float(progress["images_failed"]),
        "progress/in_flight": float(sum(progress["in_flight"].values())),
    }
    rate, left = meter.per_minute(done), meter.seconds_left(done, total)
    if rate is not None:
        metrics["progress/images_per_minute"] = rate
        metrics["progress/minutes_left"] = left / 60
    return metrics


def image_metrics(rows: list[dict]) -> dict[str, float]:
    """Means over finished index rows: the share of the logit the map keeps (rows with a positive
    logit) and, where rows carry ``final_loss`` (one per stage), each stage's final loss.

    Example:
        >>> image_metrics([{"logit": 2.0, "masked_logit": 1.0, "final_loss": [0.5, 0.2]},
        ...                {"logit": 4.0, "masked_logit": 4.0, "final_loss": [0.3]}])
        {'quality/mean_kept_ratio': 0.75, 'quality/stage1_final_loss': 0.4, 'quality/stage2_final_loss': 0.2}
    """
    metrics: dict[str, float] = {}
    ratios = [row["masked_logit"] / row["logit"] for row in rows if row.get("logit", 0) > 0]
    if ratios:
        metrics["quality/mean_kept_ratio"] = float(np.mean(ratios))
    losses: dict[int, list[float]] = {}
    for row in rows:
        for t, loss in enumerate(row.get("final_loss") or [], start=1):
            losses.setdefault(t, []).append(loss)
    metrics.update({f"quality/stage{t}_final_loss": float(np.mean(v)) for t, v in sorted(losses.items())})
    return metrics


class RunMetrics(Callback):
    """Logs :func:`progress_metrics` every ``every_n_steps`` steps and at the end (rank 0's loggers).

    Args:
        every_n_steps: optimisation steps between two logs.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.meter = Throughput()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.meter.start(finished(pl_module.progress()))

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if (trainer.global_step + 1) % self.every_n_steps == 0:
            self.log_now(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_now(trainer, pl_module)

    def log_now(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = progress_metrics(pl_module.progress(), self.meter)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
