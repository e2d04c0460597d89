"""The run folder is the truth: what a rerun of ``train_masks.py`` in an existing folder does."""

import json
import shutil

import numpy as np
import pytest
from lightning.pytorch.callbacks import Callback

from hdm_lightning.cli import main
from tests.helpers.tiny import spot_images
from tests.test_cli import SMALL
from tests.test_resume import Kill, Killed  # noqa: F401 (Kill: named on the command line below)


class CountSteps(Callback):
    """Counts the optimisation steps of the runs in this process and where each run started."""

    steps = 0
    started_at: list[int] = []

    def on_train_start(self, trainer, pl_module):
        CountSteps.started_at.append(trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        CountSteps.steps += 1


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    spot_images(folder, count=3)
    return folder


@pytest.fixture(autouse=True)
def counted():
    CountSteps.steps, CountSteps.started_at = 0, []


def run(images, out, *extra):
    main([f"--data.images={images}", f"--out_dir={out}", *SMALL, "--trainer.logger=false",
          "--trainer.callbacks+=tests.test_rerun.CountSteps", *extra])


def index_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]


def stamps(out) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "maps").glob("*.npy")}


def test_rerun_of_a_finished_run_takes_no_step_and_adds_no_row(images, tmp_path):
    out = tmp_path / "run"
    run(images, out, "--checkpoint.every_n_train_steps=7")  # the last periodic checkpoint is mid-run
    first_steps, before, rows = CountSteps.steps, stamps(out), index_rows(out)
    assert first_steps > 0 and len(rows) == 3
    run(images, out, "--checkpoint.every_n_train_steps=5")  # a setting that cannot change a map
    assert CountSteps.steps == first_steps  # no optimisation step
    assert stamps(out) == before and index_rows(out) == rows


def test_rerun_explains_exactly_the_images_without_a_map(images, tmp_path):
    out = tmp_path / "run"
    shutil.move(images / "spot2.png", tmp_path / "spot2.png")
    run(images, out)
    assert sorted(stamps(out)) == ["spot0.npy", "spot1.npy"]
    spot1 = np.load(out / "maps" / "spot1.npy")

    shutil.move(tmp_path / "spot2.png", images / "spot2.png")  # an image added to the inputs
    (out / "maps" / "spot1.npy").unlink()  # a map deleted
    kept = (out / "maps" / "spot0.npy").stat().st_mtime_ns
    CountSteps.steps = 0
    run(images, out)
    assert (out / "maps" / "spot0.npy").stat().st_mtime_ns == kept  # never touched
    assert sorted(stamps(out)) == ["spot0.npy", "spot1.npy", "spot2.npy"]
    np.testing.assert_array_equal(np.load(out / "maps" / "spot1.npy"), spot1)  # the same map again
    assert CountSteps.steps == 40  # 2 stages × 2 levels × 10 steps, the two images side by side (3 would take 80)
    names = [row["name"] for row in index_rows(out)]
    assert sorted(names) == ["spot0", "spot1", "spot2"]  # one row per image, also for the redone spot1


@pytest.mark.parametrize(("change", "keys"), [
    (["--schedule.stages=3"], "schedule.stages"),
    (["--model.lr=0.01", "--model.benchmark_sizes=[3,5]"], "model.benchmark_sizes, model.lr"),
])
def test_a_changed_setting_is_refused_before_any_work(images, tmp_path, change, keys):
    out = tmp_path / "run"
    run(images, out)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    CountSteps.steps = 0
    with pytest.raises(SystemExit) as stop:
        run(images, out, *change)
    message = str(stop.value.code)
    assert "\n" not in message and f"(differing keys: {keys};" in message and str(out) in message
    assert "--out_dir" in message  # says how to start a new folder
    assert CountSteps.started_at == [0] and CountSteps.steps == 0  # refused before the trainer started
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before  # nothing touched


def test_a_corrupt_checkpoint_gets_one_line_naming_the_file(images, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run(images, out, "--data.batch_size=1", "--trainer.callbacks+=tests.test_resume.Kill",
            "--trainer.callbacks.at=55", "--checkpoint.every_n_train_steps=5")
    assert (out / "maps" / "spot0.npy").is_file()
    done = stamps(out)
    checkpoint = out / "checkpoints" / "last.ckpt"
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])  # cut short, as by a full disk
    with pytest.raises(SystemExit) as stop:
        run(images, out, "--data.batch_size=1")
    message = str(stop.value.code)
    assert "\n" not in message and f"checkpoint {checkpoint} cannot be read" in message
    assert "--resume false" in message
    assert stamps(out) == done  # maps already written are never touched
    run(images, out, "--data.batch_size=1", "--resume=false")  # the advice works
    assert len(stamps(out)) == 3 and stamps(out)["spot0.npy"] == done["spot0.npy"]


def test_resume_false_starts_the_work_in_flight_over_also_with_a_slurm_checkpoint(images, tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    run(images, whole)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run(images, out, "--trainer.callbacks+=tests.test_resume.Kill", "--trainer.callbacks.at=17",
            "--checkpoint.every_n_train_steps=5")
    hpc = out / "hpc_ckpt_1.ckpt"  # what Lightning writes on SLURM's SIGUSR1, and loads by itself under SLURM
    shutil.copy(out / "checkpoints" / "last.ckpt", hpc)
    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "hdm", "SLURM_JOB_ID": "7", "SLURM_PROCID": "0",
                        "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(name, value)
    CountSteps.started_at = []
    run(images, out, "--resume=false")
    assert CountSteps.started_at == [0]  # nothing restored
    assert not hpc.exists()
    for name in ("spot0", "spot1", "spot2"):
        np.testing.assert_array_equal(np.load(out / "maps" / f"{name}.npy"), np.load(whole / "maps" / f"{name}.npy"))
    assert len(index_rows(out)) == 3


def test_a_folder_of_the_defaults_before_the_deletion_term_continues_with_its_own_config(images, tmp_path):
    """Stop 28 added the deletion term to the defaults, stop 47 the Grad-CAM start: a folder made without them
    (``configs/sufficient.yaml``) is refused by a plain run, naming their keys, and continued, with no step
    and no new row, by ``--config <folder>/config.yaml``."""
    from hdm_lightning.cli import CONFIGS

    out = tmp_path / "run"
    main(["--config", str(CONFIGS / "sufficient.yaml"), f"--data.images={images}", f"--out_dir={out}", *SMALL,
          "--trainer.logger=false"])
    assert len(index_rows(out)) == 3
    with pytest.raises(SystemExit) as stop:
        run(images, out)
    message = str(stop.value.code)
    assert "model.deletion_score, model.deletion_substrate, model.deletion_weight, model.start;" in message
    assert f"--config {out / 'config.yaml'}" in message
    CountSteps.steps = 0
    main(["--config", str(out / "config.yaml"), "--trainer.callbacks+=tests.test_rerun.CountSteps"])
    assert CountSteps.steps == 0 and len(index_rows(out)) == 3
