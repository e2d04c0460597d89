"""What users see while a run goes: images done of the total, items in flight, speed, time left.

The engine's module exposes ``progress() -> dict`` with ``images_total``, ``images_done``,
``images_failed`` and ``in_flight`` (``"stage{t}/level{l}" -> items``). :class:`ImageProgressBar`
is Lightning's TQDM progress bar counting images instead of optimisation steps::

    Explaining: 41%|████▏     | 412/1000 images [12:03, failed=2, in flight=s1/l0 8 · s2/l1 4, 34.1 img/min, left=0:17:14]

On a console that is not a terminal (a cluster's log file) it draws no bar and writes one line
per finished image instead, so logs stay readable. :class:`Throughput` measures images per minute
since the run (or the resumed run) started; it is shared with :mod:`hdm_lightning.dashboard`.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from typing_extensions import override

BAR_FORMAT = "{desc}{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} images [{elapsed}{postfix}]"


def format_duration(seconds: float | None) -> str:
    """``H:MM:SS``, or ``?`` when unknown.

    Example:
        >>> format_duration(3725.2), format_duration(None)
        ('1:02:05', '?')
    """
    if seconds is None:
        return "?"
    whole = int(round(seconds))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def format_in_flight(in_flight: dict[str, int]) -> str:
    """``stage1/level0 -> 8`` as ``s1/l0 8``, busiest stage and level first; ``-`` when idle.

    Example:
        >>> format_in_flight({"stage1/level0": 8, "stage2/level1": 4, "stage1/level1": 0})
        's1/l0 8 · s2/l1 4'
    """
    busy = [(key, count) for key, count in in_flight.items() if count > 0]
    short = [(key.replace("stage", "s").replace("level", "l"), count) for key, count in busy]
    return " · ".join(f"{key} {count}" for key, count in short) or "-"


class Throughput:
    """Images finished per minute since :meth:`start`, and the time the rest will take at that pace.

    Example:
        >>> meter = Throughput()
        >>> meter.start(finished=10, now=0.0)
        >>> meter.per_minute(finished=40, now=120.0), meter.seconds_left(finished=40, total=100, now=120.0)
        (15.0, 240.0)
    """

    def __init__(self) -> None:
        self.clock: float | None = None
        self.finished_at_start = 0

    def start(self, finished: int, now: float | None = None) -> None:
        """Counts from here: a resumed run's earlier images do not inflate the pace."""
        self.clock = time.monotonic() if now is None else now
        self.finished_at_start = finished

    def per_minute(self, finished: int, now: float | None = None) -> float | None:
        if self.clock is None:
            return None
        minutes = ((time.monotonic() if now is None else now) - self.clock) / 60
        count = finished - self.finished_at_start
        return count / minutes if count > 0 and minutes > 0 else None

    def seconds_left(self, finished: int, total: int, now: float | None = None) -> float | None:
        rate = self.per_minute(finished, now)
        return None if rate is None else 60 * max(0, total - finished) / rate


def finished(progress: dict[str, Any]) -> int:
    """Images that will not run again: explained or failed."""
    return int(progress["images_done"]) + int(progress["images_failed"])


def status_line(progress: dict[str, Any], per_minute: float | None, seconds_left: float | None) -> str:
    """One line for logs.

    Example:
        >>> status_line({"images_total": 10, "images_done": 3, "images_failed": 1,
        ...              "in_flight": {"stage1/level0": 4}}, 12.0, 30.0)
        'images 4/10 (3 explained, 1 failed) · in flight s1/l0 4 · 12.0 images/min · 0:00:30 left'
    """
    rate = "? images/min" if per_minute is None else f"{per_minute:.1f} images/min"
    return (f"images {finished(progress)}/{progress['images_total']} ({progress['images_done']} explained, "
            f"{progress['images_failed']} failed) · in flight {format_in_flight(progress['in_flight'])} · "
            f"{rate} · {format_duration(seconds_left)} left")


class ImageProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar over images: done of the total, in flight by stage and level, speed, time left.

    Args:
        refresh_rate: steps between redraws of the bar.
        process_position: line of the bar when several run (as in :class:`TQDMProgressBar`).
        quiet: no bar, one line per finished image; None: quiet when stdout is not a terminal.
    """

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, quiet: bool | None = None) -> None:
        super().__init__(refresh_rate=refresh_rate, process_position=process_position, leave=False)
        self.quiet = quiet
        self.throughput = Throughput()
        self.reported = 0  # finished images already written as lines (quiet mode)

    @property
    def is_quiet(self) -> bool:
        return not sys.stdout.isatty() if self.quiet is None else self.quiet

    @override
    def init_train_tqdm(self) -> Tqdm:
        return Tqdm(desc="Explaining", position=2 * self.process_position, disable=self.is_disabled or self.is_quiet,
                    leave=True, dynamic_ncols=True, file=sys.stdout, smoothing=0, bar_format=BAR_FORMAT)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        progress = trainer.lightning_module.progress()
        self.throughput.start(finished(progress))
        self.reported = finished(progress)
        self.train_progress_bar.reset(total=int(progress["images_total"]))  # images, not steps
        self.train_progress_bar.initial = 0

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if batch_idx % self.refresh_rate and not self.is_quiet:
            return
        self.show(trainer, pl_module.progress())

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.show(trainer, pl_module.progress())

    def show(self, trainer: pl.Trainer, progress: dict[str, Any]) -> None:
        done, total = finished(progress), int(progress["images_total"])
        rate, left = self.throughput.per_minute(done), self.throughput.seconds_left(done, total)
        if self.is_quiet:
            if done > self.reported and trainer.is_global_zero:
                sys.stdout.write(status_line(progress, rate, left) + "\n")
                sys.stdout.flush()
            self.reported = max(self.reported, done)
            return
        bar = self.train_progress_bar
        if bar.disable:
            return
        bar.total = total
        bar.n = done
        bar.set_postfix({"failed": progress["images_failed"], "in flight": format_in_flight(progress["in_flight"]),
                         "img/min": "?" if rate is None else f"{rate:.1f}", "left": format_duration(left)},
                        refresh=False)
        bar.refresh()
