"""Callbacks: the HDM schedule (images, stages, levels, convergence) and the map writer.

:class:`HDMSchedule` owns the position of the run — which images, stage, level and step — and
persists it in checkpoints; the masks and the tensors of the current batch live in the module.
:class:`MapWriter` writes finished explanations to the run folder and the logger.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch import Tensor
from typing_extensions import override

from hdm_lightning.data import load_image
from hdm_lightning.masks import upsample
from hdm_lightning.outputs import RunFolder


@dataclass
class Explanation:
    """A finished image, handed from the schedule to the writer."""

    name: str
    path: str
    fused: Tensor  # (H, W)
    stage_maps: Tensor  # (T, H, W)
    row: dict


def update_patience(best: Tensor, since: Tensor, loss: Tensor, min_delta: float, elapsed: int) -> tuple[Tensor, Tensor]:
    """Best loss so far and steps since it improved by more than ``min_delta`` (relative), per item.

    Example:
        >>> best, since = update_patience(torch.tensor([1.0, 1.0]), torch.tensor([0, 0]),
        ...                               torch.tensor([0.5, 0.9999]), 1e-3, 50)
        >>> best, since
        (tensor([0.5000, 1.0000]), tensor([ 0, 50]))
    """
    improved = loss < best * (1 - min_delta)
    return torch.where(improved, loss, best), torch.where(improved, torch.zeros_like(since), since + elapsed)


def log_images(trainer: pl.Trainer, key: str, images: list[np.ndarray], captions: list[str]) -> None:
    """Send images to loggers that take them (W&B, TensorBoard); others are skipped."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=images, caption=captions, step=trainer.global_step)


class HDMSchedule(Callback):
    """Drives the module through images, stages and levels; stops a level when it has converged.

    A level's item (one chain of one image) stops once it has run ``min_steps`` and its loss has
    not improved by more than ``min_delta`` (relative) for ``patience`` steps, or at
    ``max_steps``; the level ends when all its items have stopped. Convergence is checked every
    ``check_every`` steps, on the device. The defaults are the ``fast`` preset's (20-40 steps);
    ``configs/paper.yaml`` sets the reference's 800-2000 steps with a patience of 500.

    Args:
        out_dir: the run folder (images whose fused map is there are skipped).
        stages: number of DM stages ``T``.
        min_steps: steps before a level may stop.
        max_steps: steps after which a level stops.
        patience: steps without improvement that stop an item.
        min_delta: relative improvement that counts.
        check_every: steps between convergence checks.
        stop_probability: optional stopping rule: an image runs no further stage once the softmax
            probability of its class on the image with the found regions removed is below this.
    """

    def __init__(
        self,
        out_dir: str = "runs/hdm",
        stages: int = 3,
        min_steps: int = 20,
        max_steps: int = 40,
        patience: int = 10,
        min_delta: float = 1e-2,
        check_every: int = 10,
        stop_probability: float | None = None,
    ) -> None:
        for name, value in (("stages", stages), ("max_steps", max_steps), ("check_every", check_every)):
            if value < 1:
                raise ValueError(f"schedule.{name} must be >= 1, got {value}")
        if not 0 <= min_steps <= max_steps:
            raise ValueError(f"schedule.min_steps must be in [0, max_steps={max_steps}], got {min_steps}")
        if patience < 0 or not 0 <= min_delta < 1:
            raise ValueError(f"schedule.patience must be >= 0 and min_delta in [0, 1), got {patience}, {min_delta}")
        if stop_probability is not None and not 0 < stop_probability < 1:
            raise ValueError(f"schedule.stop_probability must be in (0, 1) or null, got {stop_probability}")
        self.run = RunFolder(out_dir)
        self.stages, self.min_steps, self.max_steps = stages, min_steps, max_steps
        self.patience, self.min_delta, self.check_every = patience, min_delta, check_every
        self.stop_probability = stop_probability
        self.batch: list[int] | None = None  # record indices being explained
        self.failed: list[str] = []  # paths of unreadable images
        self.names: list[str] = []  # names of the batch's images: a resume finds them by name
        self.queue: list[int] | None = None  # this rank's records still to look at
        self.stage = self.level = self.step = self.batch_steps = 0
        self.seconds = 0.0
        self.best = self.since = self.kept = torch.empty(0)
        self.clock = time.perf_counter()

    # ------------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock = time.perf_counter()
        self.best, self.since, self.kept = (t.to(pl_module.device) for t in (self.best, self.since, self.kept))
        pl_module.explaining, pl_module.idle = True, False
        datamodule = trainer.datamodule
        self.queue = [i for i in datamodule.shard(trainer.global_rank, trainer.world_size)
                      if datamodule.records[i].path not in self.failed]
        if self.batch is not None:  # resumed inside a batch: find its images again by name
            index = {r.name: i for i, r in enumerate(datamodule.records)}
            if all(name in index for name in self.names):
                self.batch = [index[name] for name in self.names]
            else:
                rank_zero_warn(f"HDMSchedule: the inputs changed since the checkpoint; restarting batch {self.names}")
                self.batch = None

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.batch is None and not pl_module.idle and not self.start_next_batch(trainer, pl_module):
            pl_module.idle = True  # the module takes empty steps until every rank is done
        if self.every_rank_done(trainer, pl_module.idle):
            pl_module.explaining = False  # the module's hook then ends the epoch
            trainer.should_stop = True

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.batch is None:  # an empty step, or the batch just finished
            return
        self.step += 1
        self.batch_steps += 1
        if self.step % self.check_every and self.step < self.max_steps:
            return
        elapsed = self.check_every if self.step % self.check_every == 0 else self.step % self.check_every
        self.best, self.since = update_patience(self.best, self.since, pl_module.last_loss, self.min_delta, elapsed)
        converged = (self.step >= self.min_steps) & (self.since >= self.patience)
        pl_module.active &= ~converged
        pl_module.live = None
        if self.step >= self.max_steps or not bool(pl_module.active.any()):  # one host sync per check
            self.next_level(trainer, pl_module)

    # --------------------------------------------------------------------- schedule
    def every_rank_done(self, trainer: pl.Trainer, done: bool) -> bool:
        """Whether no rank has an image left; all ranks stop together.

        Ranks explain different numbers of images and levels converge after different numbers of
        steps, so a rank that is done takes empty steps (its ``global_step`` still advances) and
        the ranks agree on stopping only at global steps that are multiples of ``check_every``:
        the same steps on every rank, so the collective pairs up, and no per-step host sync.
        """
        if trainer.world_size == 1:
            return done
        if trainer.global_step % self.check_every:
            return False
        self.log_every_rank(trainer, trainer.lightning_module)
        return trainer.strategy.reduce_boolean_decision(done, all=True)

    @staticmethod
    def log_every_rank(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Each rank's mean item loss, gathered to rank 0 (loggers write from rank 0 only)."""
        busy = pl_module.last_loss is not None and not pl_module.idle
        loss = pl_module.last_loss.mean() if busy else torch.tensor(float("nan"), device=pl_module.device)
        losses = trainer.strategy.all_gather(loss)  # (world,)
        if trainer.is_global_zero:
            metrics = {f"rank{r}/loss": value for r, value in enumerate(losses.tolist()) if value == value}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def start_next_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        """Loads the next images of this rank that are not done; False when none is left."""
        datamodule = trainer.datamodule
        while True:
            pending = []
            while self.queue and len(pending) < datamodule.batch_size:
                index = self.queue.pop(0)
                if not self.run.is_done(datamodule.records[index].name):
                    pending.append(index)
            if not pending:
                return False
            batch = datamodule.batch(pending)
            for index, error in batch["failed"]:
                self.failed.append(datamodule.records[index].path)
                self.run.record_failure(datamodule.records[index].path, error)
            if batch["indices"]:
                break
        self.batch, self.batch_steps, self.seconds, self.clock = batch["indices"], 0, 0.0, time.perf_counter()
        self.names = [datamodule.records[i].name for i in self.batch]
        try:
            pl_module.begin_batch(batch["images"], batch["targets"])
        except ValueError as error:  # a target the classifier does not have
            raise ValueError(f"data.images {datamodule.images}: images {self.names}: {error}") from error
        self.begin_stage(trainer, pl_module, 0)
        return True

    def begin_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: int) -> None:
        self.stage = stage
        pl_module.begin_stage(stage)
        if stage == 0:
            self.kept = torch.ones(len(self.batch), dtype=torch.bool, device=pl_module.device)
        self.begin_level(trainer, pl_module, 0)

    def begin_level(self, trainer: pl.Trainer, pl_module: pl.LightningModule, level: int) -> None:
        self.level, self.step = level, 0
        pl_module.begin_level(level)
        pl_module.active &= self.kept[None]  # images the stopping rule stopped are not optimised
        self.best = torch.full(pl_module.active.shape, float("inf"), device=pl_module.device)
        self.since = torch.zeros(pl_module.active.shape, dtype=torch.long, device=pl_module.device)
        trainer.strategy.setup_optimizers(trainer)  # Adam for the new masks

    def next_level(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_masks(trainer, pl_module)
        pl_module.end_level()
        if self.level + 1 < pl_module.num_levels:
            return self.begin_level(trainer, pl_module, self.level + 1)
        pl_module.end_stage(self.kept)
        if self.stop_probability is not None:
            self.kept &= pl_module.remaining_probability() >= self.stop_probability
        if self.stage + 1 < self.stages and bool(self.kept.any()):
            return self.begin_stage(trainer, pl_module, self.stage + 1)
        self.finish_batch(trainer, pl_module)

    def finish_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fuses the stage maps and hands each image's explanation to the writer."""
        fused = pl_module.fuse()
        self.seconds += time.perf_counter() - self.clock
        records = [trainer.datamodule.records[i] for i in self.batch]
        names = pl_module.class_names
        for n, record in enumerate(records):
            target = int(pl_module.original_targets[n])
            row = {
                "name": record.name,
                "image": record.path,
                "target": target,
                "class_name": names[target] if names and target < len(names) else str(target),
                "logit": float(pl_module.original_reference[n]),
                "masked_logit": float(fused["masked_logit"][n]),
                "stages": int(fused["stages_run"][n]),
                "steps": self.batch_steps,
                "seconds": round(self.seconds / len(records), 3),
            }
            pl_module.finished.append(
                Explanation(record.name, record.path, fused["map"][n], fused["stage_maps"][n], row)
            )
        self.batch = None

    def log_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The first image's superimposed masks of the level that ends, for the dashboard."""
        if not any(hasattr(logger, "log_image") for logger in trainer.loggers):
            return
        size = pl_module.stage_input.shape[-2:]
        chains = list(range(len(pl_module.masks)))
        masks = [upsample(p[:1].detach(), size)[0].cpu().numpy() for p in pl_module.superimposed(chains)]
        captions = [f"chain {c}: {pl_module.chains[c].sizes[self.level]}" for c in pl_module.chain_ids]
        log_images(trainer, f"masks/stage{self.stage}/level{self.level}", masks, captions)

    # ------------------------------------------------------------------ persistence
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "batch": self.batch, "names": self.names, "failed": self.failed, "stage": self.stage, "level": self.level,
            "step": self.step, "batch_steps": self.batch_steps,
            "seconds": self.seconds + time.perf_counter() - self.clock,
            "best": self.best.cpu(), "since": self.since.cpu(), "kept": self.kept.cpu(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key, value in state_dict.items():  # keys a newer version added keep their defaults
            setattr(self, key, value)
        self.failed = [f for f in self.failed if isinstance(f, str)]


class MapWriter(Callback):
    """Writes finished explanations (maps, stage maps, overlay, index row) and logs the overlays.

    Each rank writes the images it explained, so every image is written once, by its owner.
    """

    def __init__(self, out_dir: str = "runs/hdm") -> None:
        self.run = RunFolder(out_dir)
        self.written = 0
        self.logged: set[str] = set()  # overlays this rank sent to the loggers

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self.flush(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.flush(trainer, pl_module)
        if trainer.world_size > 1 and trainer.is_global_zero:  # the other ranks' images, from the run folder
            for name, row in self.run.read_index().items():
                if name not in self.logged:
                    self.log_overlay(trainer, name, row)

    def flush(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        while pl_module.finished:
            explanation = pl_module.finished.pop(0)
            picture = load_image(explanation.path)
            self.run.write(explanation.name, picture, explanation.fused, explanation.stage_maps, explanation.row)
            self.written += 1
            self.log_overlay(trainer, explanation.name, explanation.row)

    def log_overlay(self, trainer: pl.Trainer, name: str, row: dict) -> None:
        self.logged.add(name)
        if any(hasattr(logger, "log_image") for logger in trainer.loggers):
            with Image.open(self.run.root / "overlays" / f"{name}.png") as overlay:
                log_images(trainer, "overlays", [np.asarray(overlay)], [f"{name}: {row['class_name']}"])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"written": self.written}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.written = state_dict.get("written", 0)

