"""A resumed run equals an uninterrupted one (bitwise on the CPU) and never redoes an image."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from hdm_lightning.callbacks import HDMSchedule
from hdm_lightning.data import file_hash
from hdm_lightning.module import ImageState
from hdm_lightning.outputs import RunFolder
from tests.helpers.run import build, explain, maps
from tests.helpers.tiny import spot_images
from tests.test_cli import SMALL

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    spot_images(folder, count=3)
    return folder


class Kill(Callback):
    """Stops the run like a SIGKILL right after step ``at``: nothing after the checkpoint runs."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at:
            raise Killed


class Killed(Exception):
    pass


class Finished(Callback):
    """Records the global step at which each image's map appeared (runs after MapWriter)."""

    def __init__(self, out_dir) -> None:
        self.run, self.at = RunFolder(out_dir), {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name in ("spot0", "spot1", "spot2"):
            if name not in self.at and self.run.is_done(name):
                self.at[name] = trainer.global_step


@pytest.mark.parametrize("stop_at", [7, 45, "after a map"])  # mid level, mid stage 2, after the first image
def test_resumed_run_equals_uninterrupted_run(images, tmp_path, stop_at):
    finished = Finished(tmp_path / "whole")
    expected = maps(explain(images, tmp_path / "whole", batch_size=2, callbacks=[finished]))
    assert len(finished.at) == 3
    if stop_at == "after a map":
        stop_at = 7 + min(finished.at.values())
    out = tmp_path / "cut"
    saver = ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=stop_at, save_top_k=0, save_last=True)
    model, data, trainer = build(images, out, batch_size=2, trainer={"enable_checkpointing": True},
                                 callbacks=[saver, Kill(stop_at)])
    with pytest.raises(Killed):
        trainer.fit(model, datamodule=data)
    done_before = set(maps(RunFolder(out)))

    model, data, trainer = build(images, out, batch_size=2)
    trainer.fit(model, datamodule=data, ckpt_path=out / "checkpoints" / "last.ckpt")
    resumed = maps(RunFolder(out))
    assert resumed.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name])
    assert trainer.global_step == max(finished.at.values())  # no step redone or skipped
    rows = [json.loads(x) for x in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in rows) == sorted(expected)  # no image written twice
    for row in rows:  # images in flight at the kill keep the hash of the file they started from
        assert row["sha256"] == file_hash(row["image"])
    assert done_before == {name for name, at in finished.at.items() if at <= stop_at}


def test_a_run_on_both_substrates_resumed_in_its_second_pass_equals_an_uninterrupted_one(images, tmp_path):
    """``substrate: both``: killed while the first image runs its stages on the mean colour (the first
    pass's maps only in the checkpoint), the resumed run writes the uninterrupted run's maps."""
    both = {"substrate": "both"}
    finished = Finished(tmp_path / "whole")
    expected = maps(explain(images, tmp_path / "whole", batch_size=2, module=both, callbacks=[finished]))
    stop_at = 3 * min(finished.at.values()) // 4  # the first image is in its second pass: 2 × 2 stages
    out = tmp_path / "cut"
    saver = ModelCheckpoint(dirpath=out / "checkpoints", every_n_train_steps=stop_at, save_top_k=0, save_last=True)
    model, data, trainer = build(images, out, batch_size=2, module=both, trainer={"enable_checkpointing": True},
                                 callbacks=[saver, Kill(stop_at)])
    with pytest.raises(Killed):
        trainer.fit(model, datamodule=data)
    schedule = next(c for c in trainer.callbacks if isinstance(c, HDMSchedule))
    assert [len(s.pass_maps) for s in schedule.images.values()] == [1, 1]  # both images in their second pass
    model, data, trainer = build(images, out, batch_size=2, module=both)
    trainer.fit(model, datamodule=data, ckpt_path=out / "checkpoints" / "last.ckpt")
    resumed = maps(RunFolder(out))
    assert resumed.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name])


def test_schedule_state_round_trips_through_a_checkpoint(images, tmp_path):
    model, data, trainer = build(images, tmp_path / "run", trainer={"max_steps": 13})
    trainer.fit(model, datamodule=data)
    path = tmp_path / "state.ckpt"
    trainer.save_checkpoint(path)
    schedule = next(c for c in trainer.callbacks if isinstance(c, HDMSchedule))
    checkpoint = torch.load(path, weights_only=False)
    saved = checkpoint["callbacks"][schedule.state_key]
    assert [s["name"] for s in saved["images"]] == ["spot0"]  # only the image in flight
    restored = HDMSchedule(str(tmp_path / "run"), stages=2, min_steps=20, max_steps=40, patience=10, check_every=10)
    restored.load_state_dict(saved)
    state = ImageState.from_state_dict(restored.saved[0], torch.device("cpu"))
    original = schedule.images[0]
    assert (state.stage, state.target, state.running, state.pending) == (
        original.stage, original.target, original.running, original.pending)
    assert torch.equal(state.image, original.image) and torch.equal(state.reference, original.reference)
    fresh, _, _ = build(images, tmp_path / "other")
    fresh.load_state_dict(checkpoint["state_dict"], strict=False)
    assert fresh.pool.items == model.pool.items and fresh.pool.clock == model.pool.clock == 13
    assert torch.equal(fresh.pool.exp_avg_3, model.pool.exp_avg_3)
    assert not any(k.startswith("classifier.") for k in checkpoint["state_dict"])


def cli_command(images, out_dir):
    return [sys.executable, str(ROOT / "train_masks.py"), f"--data.images={images}", f"--out_dir={out_dir}", *SMALL,
            "--trainer.logger=false", "--trainer.deterministic=true", "--data.batch_size=1",
            "--schedule.max_steps=60", "--schedule.min_steps=60", "--checkpoint.every_n_train_steps=3"]


def test_sigkill_in_the_middle_of_a_stage_then_same_command_resumes(images, tmp_path):
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    whole = tmp_path / "whole"
    subprocess.run(cli_command(images, whole), check=True, env=environment, capture_output=True, cwd=ROOT)
    killed = tmp_path / "killed"
    process = subprocess.Popen(cli_command(images, killed), env=environment, cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "maps" / "spot0.npy").is_file() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # now inside the second image's first stage
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "maps" / "spot2.npy").is_file(), "the run finished before it was killed"
    first_map = (killed / "maps" / "spot0.npy").stat().st_mtime_ns
    subprocess.run(cli_command(images, killed), check=True, env=environment, capture_output=True, cwd=ROOT)
    assert (killed / "maps" / "spot0.npy").stat().st_mtime_ns == first_map  # never recomputed
    for name in ("spot0", "spot1", "spot2"):
        np.testing.assert_array_equal(np.load(killed / "maps" / f"{name}.npy"), np.load(whole / "maps" / f"{name}.npy"))
