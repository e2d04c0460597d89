"""Two CPU processes (gloo) give every image the maps one process gives it, bitwise.

Each image is explained alone (``--data.batch_size=1``): with larger batches the images an image
shares a classifier batch with differ between a 1- and a 2-process run, and so, in the last float
bits, do its maps (as they would in one process with another batch order). With the same batches
the runs agree exactly, so the comparison has no tolerance.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import Callback

from hdm_lightning.cli import HDMCLI
from hdm_lightning.data import ExplanationDataModule
from hdm_lightning.module import MaskExplainer
from hdm_lightning.strategy import IndependentRanksStrategy
from tests.helpers.run import HALF
from tests.helpers.tiny import SpotClassifier, spot_images
from tests.test_cli import SMALL

ROOT = Path(__file__).resolve().parent.parent
NAMES = ("spot0", "spot1", "spot2")
STEPS_PER_IMAGE = 40  # 2 stages × 2 levels × max_steps 10
KILL_AT = 48  # rank 0 is 8 steps into its second image, rank 1 is done and idle


class KillGroupAt(Callback):
    """Kills every rank, like a SIGKILL of the job, before global step ``at`` (after its checkpoint)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            os.killpg(os.getpgid(0), signal.SIGKILL)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    spot_images(folder, count=3)
    return folder


@pytest.fixture(scope="module")
def one_process(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    done = train(images, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def command(images, out_dir, *extra):
    return [sys.executable, str(ROOT / "train_masks.py"), f"--data.images={images}", f"--out_dir={out_dir}", *SMALL,
            "--trainer.logger=false", "--trainer.deterministic=true", "--data.batch_size=1", *extra]


def train(images, out_dir, *extra) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run(command(images, out_dir, *extra), env=environment, capture_output=True, text=True,
                          cwd=ROOT, timeout=300, start_new_session=True)  # a killed group spares pytest


def two_processes(images, out_dir, *extra) -> subprocess.CompletedProcess:
    return train(images, out_dir, "--trainer.devices=2", *extra)


def assert_same_maps(run: Path, reference: Path) -> None:
    for name in NAMES:
        np.testing.assert_array_equal(np.load(run / "maps" / f"{name}.npy"), np.load(reference / "maps" / f"{name}.npy"))
        for stage in (1, 2):
            stage_map = f"{name}_stage{stage}.npy"
            np.testing.assert_array_equal(np.load(run / "stages" / stage_map), np.load(reference / "stages" / stage_map))


def index_names(run: Path) -> list[str]:
    return sorted(json.loads(line)["name"] for line in (run / "index.jsonl").read_text().splitlines())


def written_by_rank(run: Path) -> list[int]:
    files = [run / "checkpoints" / f"last-rank{rank}.ckpt" for rank in (0, 1)]
    return [torch.load(f, weights_only=False)["callbacks"]["MapWriter"]["written"] for f in files]


@pytest.mark.slow
def test_two_processes_give_the_maps_of_one(images, one_process, tmp_path):
    out = tmp_path / "two"
    done = two_processes(images, out, "--trainer.strategy=ddp", "--checkpoint.every_n_train_steps=5",
                         "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "using 'ddp_independent'" in done.stderr  # plain DDP is replaced, with a note
    assert_same_maps(out, one_process)
    assert index_names(out) == list(NAMES)  # each image once: no padding duplicate
    assert written_by_rank(out) == [2, 1]  # rank 0: spot0 and spot2, rank 1: spot1
    assert not (out / "checkpoints" / "last.ckpt").exists()
    (metrics,) = out.glob("lightning_logs/version_*/metrics.csv")
    assert {"rank0/loss", "rank1/loss"} <= set(metrics.read_text().splitlines()[0].split(","))  # gathered to rank 0


@pytest.mark.slow
def test_killed_two_process_run_resumes_with_the_same_command(images, one_process, tmp_path):
    out = tmp_path / "killed"
    strategy, every = "--trainer.strategy=ddp_independent", "--checkpoint.every_n_train_steps=4"
    killed = two_processes(images, out, strategy, every, "--trainer.callbacks+=tests.test_ddp.KillGroupAt",
                           f"--trainer.callbacks.at={KILL_AT}")
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "maps" / "spot2.npy").exists() and (out / "maps" / "spot1.npy").exists()
    finished = {name: (out / "maps" / f"{name}.npy").stat().st_mtime_ns for name in ("spot0", "spot1")}

    resumed = two_processes(images, out, strategy, every)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states" in resumed.stderr
    assert_same_maps(out, one_process)
    assert {name: (out / "maps" / f"{name}.npy").stat().st_mtime_ns for name in finished} == finished
    assert index_names(out) == list(NAMES)
    assert written_by_rank(out) == [2, 1]


class RequeueAt(Callback):
    """SLURM's preemption, step-aligned: SIGUSR1 to each rank at global step ``at`` (Lightning writes
    its ``hpc_ckpt`` and calls ``scontrol requeue``), then the job is killed one step later."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)
        elif trainer.global_step == self.at + 1:
            os.killpg(os.getpgid(0), signal.SIGKILL)


def slurm_job(images, out_dir, bin_dir, *extra) -> subprocess.CompletedProcess:
    """Two ranks started as SLURM starts the tasks of one job (no Lightning launcher), in one process group."""
    job = {"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0",
           "SLURM_JOB_ID": str(3000 + os.getpid() % 5000), "SLURM_JOB_NAME": "hdm", "MASTER_ADDR": "127.0.0.1"}
    ranks = " & ".join(
        f"SLURM_PROCID={r} SLURM_LOCALID={r} " + " ".join(f"'{a}'" for a in command(images, out_dir, *extra))
        for r in (0, 1)
    )
    environment = {**os.environ, **job, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                   "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", f"{ranks} & wait"], env=environment, capture_output=True, text=True,
                          cwd=ROOT, timeout=300, start_new_session=True)


@pytest.mark.slow
def test_a_requeued_two_rank_slurm_job_resumes_each_rank_from_its_own_file(images, one_process, tmp_path):
    bin_dir = tmp_path / "bin"  # a stand-in for SLURM's scontrol that records the requeue
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'requeued.txt'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    out = tmp_path / "job"
    extra = ("--trainer.devices=2", "--trainer.strategy=ddp_independent", "--checkpoint.every_n_train_steps=100")
    slurm_job(images, out, bin_dir, *extra, "--trainer.callbacks+=tests.test_ddp.RequeueAt",
              "--trainer.callbacks.at=47")
    assert (tmp_path / "requeued.txt").read_text().startswith("requeue ")
    files = sorted(p.name for p in out.glob("hpc_ckpt_*"))
    assert files == ["hpc_ckpt_47-rank0.ckpt", "hpc_ckpt_47-rank1.ckpt"]
    assert not (out / "maps" / "spot2.npy").exists()  # rank 0 was inside its second image
    steps = [torch.load(out / f, weights_only=False)["global_step"] for f in files]
    assert steps == [47, 47]

    resumed = slurm_job(images, out, bin_dir, *extra)  # the requeued job: the same command
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Restoring states from the checkpoint path at" in resumed.stderr, resumed.stderr[-3000:]
    assert "hpc_ckpt_47.ckpt" in resumed.stderr
    assert_same_maps(out, one_process)
    assert index_names(out) == list(NAMES)


@pytest.mark.parametrize("strategy", ["ddp", "lightning.pytorch.strategies.DDPStrategy", "auto"])
def test_cli_replaces_plain_ddp_over_several_devices(images, tmp_path, strategy):
    args = [f"--data.images={images}", f"--out_dir={tmp_path}", *SMALL, "--trainer.logger=false",
            "--trainer.devices=2", f"--trainer.strategy={strategy}"]
    cli = HDMCLI(MaskExplainer, ExplanationDataModule, args=args, run=False, save_config_callback=None)
    assert isinstance(cli.trainer.strategy, IndependentRanksStrategy)


def test_module_refuses_a_strategy_that_averages_gradients():
    model = MaskExplainer(SpotClassifier(), benchmark_sizes=(3,), block_factors=(), mean=HALF, std=HALF)
    model.trainer = Trainer(strategy="ddp", accelerator="cpu", devices=1, logger=False)
    with pytest.raises(ValueError, match="trainer.strategy DDPStrategy .*trainer.strategy='ddp_independent'"):
        model.setup("fit")
