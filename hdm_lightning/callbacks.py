"""Callbacks: admission and retirement of the mask pool's items, and the map writer.

:class:`HDMSchedule` decides which items are in flight — it admits the successors of items that
converged and the next images, and retires items at their convergence checks — and persists the
images in flight in checkpoints; the items' masks and optimiser state are the module's parameters
and buffers (:mod:`hdm_lightning.pool`). :class:`MapWriter` writes finished explanations to the run
folder and the logger.
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

from hdm_lightning.dashboard import image_metrics, log_mask_images
from hdm_lightning.masks import upsample
from hdm_lightning.module import ImageState
from hdm_lightning.outputs import RunFolder
from hdm_lightning.pool import Convergence, Item, first_items, successors
from hdm_lightning.report import write_figure


@dataclass
class Explanation:
    """A finished image, handed from the schedule to the writer."""

    name: str
    path: str
    fused: Tensor  # (H, W)
    stage_maps: Tensor  # (T, H, W)
    row: dict


def takes_images(trainer: pl.Trainer) -> bool:
    """Whether a logger takes images (W&B, TensorBoard)."""
    return any(hasattr(logger, "log_image") for logger in trainer.loggers)


def log_images(trainer: pl.Trainer, key: str, images: list[np.ndarray], captions: list[str]) -> None:
    """Send images to loggers that take them (W&B, TensorBoard); others are skipped."""
    for logger in trainer.loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key=key, images=images, caption=captions, step=trainer.global_step)


class HDMSchedule(Callback):
    """Admits and retires the items of the mask pool: levels, stages, images, convergence.

    An item (one level of one chain of one image in one stage) stops once it has run ``min_steps``
    and its loss has not improved by more than ``min_delta`` (relative) for ``patience`` steps, or
    at ``max_steps``; it is checked every ``check_every`` of its own steps, on the device, so the
    only host synchronisations are at checks. When an item stops its successors enter the pool at
    once (the next level of its chains; after the stage's last item, the next stage's first
    level), and while there is room the next image's items enter; an image is handed to the
    writer the moment its last stage ends. Every decision reads the image's own numbers only.
    The defaults are 40-80 steps (``configs/fine.yaml``; ``configs/fast.yaml`` 20-40); ``configs/paper.yaml`` sets the
    reference's 800-2000 steps with a patience of 500.

    The run folder is the truth: images whose fused map is there are never started, also when a
    checkpoint had them in flight; the checkpoint holds only the images in flight.

    Args:
        out_dir: the run folder.
        stages: number of DM stages ``T``.
        min_steps: steps before an item may stop.
        max_steps: steps after which an item stops.
        patience: steps without improvement that stop an item.
        min_delta: relative improvement that counts.
        check_every: steps between an item's convergence checks.
        stop_probability: optional stopping rule: an image runs no further stage once the softmax
            probability of its class on the image with the found regions removed is below this.
    """

    def __init__(
        self,
        out_dir: str = "runs/hdm",
        stages: int = 3,
        min_steps: int = 40,
        max_steps: int = 80,
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
        self.stages, self.stop_probability = stages, stop_probability
        self.rule = Convergence(min_steps, max_steps, patience, min_delta, check_every)
        self.images: dict[int, ImageState] = {}  # the images in flight, by record index, in admission order
        self.started: dict[int, float] = {}  # perf_counter at which each image's clock started
        self.failed: list[str] = []  # paths of unreadable images
        self.queue: list[int] = []  # this rank's records still to start
        self.saved: list[dict] = []  # images of a checkpoint, until on_train_start places them
        self.watched: int | None = None  # the image whose masks go to the dashboard
        self.hashes: dict[str, str] = {}  # SHA-256 of the file of each image in flight, by name

    @property
    def check_every(self) -> int:
        return self.rule.check_every

    # ------------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = trainer.datamodule
        self.restore(trainer, pl_module)
        shard = datamodule.shard(trainer.global_rank, trainer.world_size)
        done = {i for i in shard if self.run.is_done(datamodule.records[i].name)}
        self.queue = [i for i in shard if i not in done and i not in self.images
                      and datamodule.records[i].path not in self.failed]
        rejected = datamodule.rejected_share(trainer.global_rank, trainer.world_size)  # failed before the first step
        pl_module.counts.update(images_total=len(shard) + rejected, images_done=len(done),
                                images_failed=len(self.failed) + rejected)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if len(pl_module.pool) == 0:
            self.fill(trainer, pl_module)
        done = len(pl_module.pool) == 0 and not self.images and not self.queue
        if self.every_rank_done(trainer, done):
            trainer.should_stop = True  # the module's hook then ends the epoch before any step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not pl_module.pool.due(self.rule):  # host arithmetic: no device sync between checks
            return
        self.retire(trainer, pl_module, pl_module.pool.converged(self.rule))
        self.fill(trainer, pl_module)

    # ------------------------------------------------------------- admission
    def fill(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Successors of the images in flight first, then new images while there is room."""
        for state in self.images.values():
            self.admit(pl_module, state)
        capacity = trainer.datamodule.batch_size
        while self.queue and pl_module.pool.free() and len(self.images) < capacity:
            state = self.start_image(trainer, pl_module, self.queue.pop(0))
            if state is not None:
                self.admit(pl_module, state)

    def admit(self, pl_module: pl.LightningModule, state: ImageState) -> None:
        pool = pl_module.pool
        while state.pending and pool.free():
            item = state.pending.pop(0)
            slot = pool.admit(item, pl_module.size_of(item), pl_module.guide(state, item), pl_module.start_of(state, item))
            pl_module.item_image[slot] = state.slot
            state.running += 1

    def start_image(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int) -> ImageState | None:
        """Loads record ``index`` and begins its first stage; None if it cannot be read or is done."""
        datamodule = trainer.datamodule
        record = datamodule.records[index]
        if self.run.is_done(record.name):  # written since the queue was made
            return None
        batch = datamodule.batch([index])
        for _, error in batch["failed"]:
            self.failed.append(record.path)
            self.run.record_failure(record.path, error)
            pl_module.counts["images_failed"] += 1
            return None
        capacity = datamodule.batch_size
        pl_module.image_rows(capacity, tuple(batch["images"].shape[1:]))
        slot = min(set(range(capacity)) - {s.slot for s in self.images.values()})
        try:
            state = pl_module.begin_image(index, record.name, record.path, slot, batch["images"][0],
                                          int(batch["targets"][0]))
        except ValueError as error:  # a target the classifier does not have
            raise ValueError(f"data.images {datamodule.images}: images {[record.name]}: {error}") from error
        pl_module.begin_stage(state)
        state.pending = first_items(pl_module.chains, index, 0)
        self.images[index], self.started[index] = state, time.perf_counter()
        if batch.get("hashes"):  # files (not the Python API's tensors): the SHA-256 of the bytes explained
            self.hashes[record.name] = batch["hashes"][0]
        self.watched = index if self.watched is None else self.watched
        return state

    # ------------------------------------------------------------- retirement
    def retire(self, trainer: pl.Trainer, pl_module: pl.LightningModule, slots: list[int]) -> None:
        """Ends the items in ``slots``: level maps, successors, and stage and image ends."""
        pool, logged = pl_module.pool, {}
        for slot in slots:
            item = pool.items[slot]
            state = self.images[item.image]
            state.steps += pool.own_steps(slot)
            loss = pool.loss[slot].clone()  # its last step's loss (a device copy: the row is reused)
            mask, superimposed = pool.retire(slot, pl_module.size_of(item))
            state.running -= 1
            if item.image == self.watched:
                logged.setdefault(f"masks/stage{item.stage}/level{item.level}", []).append(superimposed)
            pl_module.end_item(state, item, mask, superimposed, loss)
            state.pending.extend(successors(pl_module.chains, item))
            if not state.running and not state.pending:
                self.end_stage(trainer, pl_module, state)
        self.log_masks(trainer, pl_module, logged)

    def end_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: ImageState) -> None:
        pl_module.end_stage(state)
        if self.stop_probability is not None:
            state.kept = pl_module.remaining_probability(state) >= self.stop_probability
        if state.stage + 1 < self.stages and state.kept:
            state.stage += 1
            pl_module.begin_stage(state)
            state.pending = first_items(pl_module.chains, state.key, state.stage)
        elif pl_module.next_pass(state):  # ``substrate: both``: the stages again on the other substrate
            state.pending = first_items(pl_module.chains, state.key, 0)
        else:
            self.finish(trainer, pl_module, state)

    def finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: ImageState) -> None:
        """Fuses the image's stage maps and hands its explanation to the writer."""
        fused = pl_module.fuse(state)
        names = pl_module.class_names
        row = {
            "name": state.name,
            "image": state.path,
            "target": state.target,
            "class_name": names[state.target] if names and state.target < len(names) else str(state.target),
            "logit": float(state.logit),
            "masked_logit": float(fused["masked_logit"]),
            "floor": fused["floor"],  # the fused map's values up to it were scaled by 1e-3 (``model.map_floor``)
            "stages": len(fused["stage_maps"]),
            "substrate": "+".join([*state.pass_substrates, state.substrate or pl_module.hparams.substrate]),
            "steps": state.steps,
            "passes": state.steps * pl_module.passes_per_step,  # classifier passes of its items
            "seconds": round(time.perf_counter() - self.started.pop(state.key), 3),
        }
        if state.final_losses:  # per stage run: the mean over its items of each one's last loss
            row["final_loss"] = torch.stack(state.final_losses).tolist()
        digest = self.hashes.pop(state.name, None)
        if digest is not None:  # evaluate checks that the pictures it scores are these files
            row["sha256"] = digest
        pl_module.finished.append(Explanation(state.name, state.path, fused["map"], fused["stage_maps"], row))
        pl_module.counts["images_done"] += 1
        del self.images[state.key]

    # --------------------------------------------------------------------- ranks
    def every_rank_done(self, trainer: pl.Trainer, done: bool) -> bool:
        """Whether no rank has an image left; all ranks stop together.

        Ranks explain different numbers of images, so a rank that is done takes empty steps (its
        ``global_step`` still advances) and the ranks agree on stopping only at global steps that
        are multiples of ``check_every``: the same steps on every rank, so the collective pairs up,
        and no per-step host sync.
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
        rows = [slot for slot in pl_module.pool.in_flight()]
        loss = (pl_module.pool.loss[rows].mean() if rows and pl_module.pool.clock > 0
                else torch.tensor(float("nan"), device=pl_module.device))
        losses = trainer.strategy.all_gather(loss)  # (world,)
        if trainer.is_global_zero:
            metrics = {f"rank{r}/loss": value for r, value in enumerate(losses.tolist()) if value == value}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def log_masks(self, trainer: pl.Trainer, pl_module: pl.LightningModule, logged: dict[str, list[Tensor]]) -> None:
        """The watched image's superimposed masks of the levels that end, for the dashboard."""
        if not logged or not any(hasattr(logger, "log_image") for logger in trainer.loggers):
            return
        size = pl_module.stage_input.shape[-2:]
        for key, masks in logged.items():
            pictures = [upsample(p[None], size)[0] for p in masks]
            log_mask_images(trainer, key, pictures, [f"{p.shape[-1]} cells" for p in masks])  # uint8, coloured

    # ------------------------------------------------------------------ persistence
    def restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Places a checkpoint's images in flight; drops those that have a map now or left the inputs."""
        pool, records = pl_module.pool, trainer.datamodule.records
        index = {r.name: i for i, r in enumerate(records)}
        states = [ImageState.from_state_dict(s, pl_module.device) for s in self.saved]
        keys = {s.key: index.get(s.name) for s in states}  # record indices may have moved
        for slot, item in pool.in_flight().items():
            key = keys.get(item.image)
            if key is None or self.run.is_done(records[key].name):
                pool.retire(slot, pl_module.size_of(item))
            else:
                pool.items[slot] = Item(key, item.stage, item.chain, item.level)
        pool.changed()
        now = time.perf_counter()
        for state in states:
            key = keys[state.key]
            if key is None:
                rank_zero_warn(f"HDMSchedule: {state.name} is no longer among the inputs; dropping its work")
            elif not self.run.is_done(state.name):
                state.key, state.pending = key, [Item(key, i.stage, i.chain, i.level) for i in state.pending]
                pl_module.image_rows(trainer.datamodule.batch_size, tuple(state.image.shape))
                pl_module.load_stage(state)
                self.images[key], self.started[key] = state, now - state.seconds
        self.saved = []

    @override
    def state_dict(self) -> dict[str, Any]:
        now = time.perf_counter()
        for key, state in self.images.items():
            state.seconds = now - self.started[key]
        return {"images": [state.state_dict() for state in self.images.values()], "failed": self.failed,
                "hashes": {s.name: self.hashes[s.name] for s in self.images.values() if s.name in self.hashes}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.saved = list(state_dict.get("images", []))
        self.failed = [f for f in state_dict.get("failed", []) if isinstance(f, str)]
        self.hashes = dict(state_dict.get("hashes", {}))


class MapWriter(Callback):
    """Writes finished explanations (maps, stage maps, overlay, index row) and logs them.

    Each rank writes the images it explained, so every image is written once, by its owner, and
    appends its rows to its own index file; ``index.jsonl`` is their merge, rewritten at the start
    and the end of a run and at most every ``merge_seconds`` in between.

    Where a logger takes images (W&B, TensorBoard), each image's figure (``figures/<name>.png``,
    :func:`~hdm_lightning.report.write_figure`) is drawn as it is written, and its overlay and
    figure go to the loggers; rank 0 logs the other ranks' at the end, from the run folder. Without
    such a logger the figures are left to the end report. At every merge rank 0 logs the run-level
    means of the merged rows (:func:`~hdm_lightning.dashboard.image_metrics`: kept-logit ratio,
    final loss per stage), so they cover every rank's images and those of earlier runs.

    Args:
        out_dir: the run folder.
        merge_seconds: least time between two merges of the index during a run.
    """

    def __init__(self, out_dir: str = "runs/hdm", merge_seconds: float = 30.0) -> None:
        self.run = RunFolder(out_dir)
        self.merge_seconds = merge_seconds
        self.written = 0
        self.merged = 0.0  # perf_counter of the last merge
        self.logged: set[str] = set()  # overlays this rank sent to the loggers

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:  # rows of a killed run's images without a map go
            self.merge(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.flush(trainer, pl_module) and time.perf_counter() - self.merged > self.merge_seconds:
            self.merge(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.flush(trainer, pl_module)
        if trainer.is_global_zero:  # every rank has written its images before the ranks stop together
            self.merge(trainer)
        if trainer.world_size > 1 and trainer.is_global_zero:  # the other ranks' images, from the run folder
            for name, row in self.run.read_index().items():
                if name not in self.logged:
                    self.log_outputs(trainer, name, row)

    def merge(self, trainer: pl.Trainer) -> None:
        """Rewrites ``index.jsonl``; rank 0 logs the run-level means of its rows."""
        rows = self.run.merge_index()
        self.merged = time.perf_counter()
        metrics = image_metrics(list(rows.values())) if trainer.is_global_zero else {}
        for logger in trainer.loggers if metrics else ():
            logger.log_metrics(metrics, step=trainer.global_step)

    def flush(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        """Writes the finished explanations; returns how many."""
        count, datamodule = 0, trainer.datamodule
        while pl_module.finished:
            explanation = pl_module.finished.pop(0)
            picture = datamodule.picture(explanation.path)  # upright, windowed, on the run's background
            height, width = picture.height, picture.width  # maps back onto the original pixels (data.resize)
            fused = datamodule.map_to_original(explanation.fused, height, width)
            stage_maps = [datamodule.map_to_original(m, height, width) for m in explanation.stage_maps]
            self.run.write(explanation.name, picture, fused, stage_maps, explanation.row, rank=trainer.global_rank)
            self.written += 1
            count += 1
            if takes_images(trainer):  # the figure of the dashboard, drawn once: the end report keeps it
                write_figure(self.run, explanation.row, datamodule.decoding)
            self.log_outputs(trainer, explanation.name, explanation.row)
        return count

    def log_outputs(self, trainer: pl.Trainer, name: str, row: dict) -> None:
        """The image's overlay and, where it has been drawn, its figure, to the loggers."""
        self.logged.add(name)
        if not takes_images(trainer):
            return
        caption = [f"{name}: {row['class_name']}"]
        for key, path in (("overlays", self.run.root / "overlays" / f"{name}.png"),
                          ("figures", self.run.root / "figures" / f"{name}.png")):
            if path.is_file():
                with Image.open(path) as picture:
                    log_images(trainer, key, [np.asarray(picture.convert("RGB"))], caption)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"written": self.written}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.written = state_dict.get("written", 0)
