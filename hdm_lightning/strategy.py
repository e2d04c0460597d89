"""Several processes, each explaining its own images: DDP's process group without DDP's wrapper.

Plain DDP is the wrong tool for HDM. It averages gradients across ranks, and the ranks optimise the
masks of different images, so averaging would mix them; it refuses a module with no trainable
parameter when it wraps it (masks appear only when a level begins); and it broadcasts buffers,
which hold each rank's own batch, at every forward. :class:`IndependentRanksStrategy` keeps the
rest of DDP (launching, the process group, ``reduce``/``broadcast``/``barrier``) and leaves the
module unwrapped, so ranks share no gradient and no buffer: every image is driven by its own
gradients only and gets the maps it gets in a single process.

The ranks' schedules differ, so each rank also saves and loads its own checkpoint, named by
:func:`rank_path`. Select it with ``--trainer.strategy ddp_independent`` (or by ``class_path``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from typing_extensions import override

#: The name ``--trainer.strategy`` takes.
STRATEGY_NAME = "ddp_independent"


def rank_path(path: _PATH, rank: int, world_size: int) -> Path:
    """The checkpoint file of one rank: ``path`` itself in a single process, else ``<stem>-rank<r>``.

    Example:
        >>> rank_path("out/checkpoints/last.ckpt", 1, 2).name
        'last-rank1.ckpt'
        >>> rank_path("out/checkpoints/last.ckpt", 0, 1).name
        'last.ckpt'
    """
    path = Path(path)
    return path if world_size == 1 else path.with_name(f"{path.stem}-rank{rank}{path.suffix}")


class IndependentRanksStrategy(DDPStrategy):
    """DDP's processes with an unwrapped module and one checkpoint file per rank.

    Takes the arguments of :class:`~lightning.pytorch.strategies.DDPStrategy`; those that
    configure the ``DistributedDataParallel`` wrapper have no effect.
    """

    @override
    def configure_ddp(self) -> None:
        """Keeps the plain LightningModule: no gradient all-reduce, no buffer broadcast."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Every rank writes its own file: its masks and schedule differ from the others'.

        SLURM's ``hpc_ckpt_<n>`` files are numbered by global step: Lightning numbers them after the
        files it finds, which differ between ranks as they write (and it reads a rank suffix's digits
        as part of the number), so the ranks' files of one requeue would get different names.
        """
        if Path(filepath).name.startswith("hpc_ckpt_"):
            filepath = Path(filepath).with_name(f"hpc_ckpt_{checkpoint['global_step']}.ckpt")
        self.checkpoint_io.save_checkpoint(checkpoint, self.own_path(filepath), storage_options=storage_options)

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        self.checkpoint_io.remove_checkpoint(self.own_path(filepath))

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """This rank's file of ``checkpoint_path``; every rank's file must be of the same step.

        Ranks meet in collectives (checkpoint barriers, the stop decision) at given global steps,
        so they must resume from the same one. Files of different steps come from a run killed
        between two ranks' writes.
        """
        checkpoint = super().load_checkpoint(self.own_path(checkpoint_path), weights_only=weights_only)
        steps = self.all_gather(torch.tensor(checkpoint["global_step"], device=self.root_device))  # (world,)
        if steps.min() != steps.max():
            raise RuntimeError(
                f"the rank files of checkpoint {checkpoint_path} are of different global steps "
                f"{steps.tolist()}; delete them to restart (finished images are kept)"
            )
        return checkpoint

    def own_path(self, path: _PATH) -> Path:
        return rank_path(path, self.global_rank, self.world_size)


StrategyRegistry.register(
    STRATEGY_NAME, IndependentRanksStrategy, description="DDP processes, each explaining its own images"
)
