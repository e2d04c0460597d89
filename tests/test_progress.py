"""The progress display, on a real Trainer with a module that exposes ``progress()``."""

from __future__ import annotations

import re

from lightning.pytorch import Trainer

from hdm_lightning.progress import ImageProgressBar, Throughput, format_in_flight
from tests.helpers.progressing import IMAGES, Progressing


def fit(bar: ImageProgressBar) -> None:
    trainer = Trainer(callbacks=[bar], logger=False, enable_checkpointing=False, enable_model_summary=False,
                      max_epochs=1, accelerator="cpu")
    trainer.fit(Progressing())


def test_quiet_logs_write_one_line_as_images_finish(capsys):
    fit(ImageProgressBar(quiet=True))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("images ")]
    counts = [int(re.match(r"images (\d+)/", line).group(1)) for line in lines]
    assert counts == sorted(set(counts)) and counts[0] == 1 and counts[-1] == IMAGES + 1  # the failure, then each image
    assert len(lines) == IMAGES + 1
    assert all(f"/{IMAGES + 1} (" in line for line in lines)
    assert "1 failed" in lines[-1] and "in flight s2/l0" in lines[-2] and "in flight s1/l0" in lines[0]
    assert all(re.search(r"(\d+\.\d|\?) images/min · (\d+:\d\d:\d\d|\?) left", line) for line in lines)
    assert "\r" not in capsys.readouterr().out


def test_the_bar_counts_images_not_steps(capsys):
    bar = ImageProgressBar(quiet=False)
    fit(bar)
    out = capsys.readouterr().out
    assert f"{IMAGES + 1}/{IMAGES + 1} images" in out
    assert "Explaining" in out and "failed=1" in out and "in flight=" in out and "img/min=" in out
    assert "it/s" not in out and "Epoch 0" not in out


def test_pace_and_time_left_start_at_a_resume():
    meter = Throughput()
    meter.start(finished=100, now=1000.0)
    assert meter.per_minute(finished=100, now=1060.0) is None  # nothing finished since the resume
    assert meter.per_minute(finished=130, now=1060.0) == 30.0
    assert meter.seconds_left(finished=130, total=160, now=1060.0) == 60.0
    assert format_in_flight({}) == "-"


def test_the_cli_counts_images_with_the_inputs_rejected_before_the_first_step(tmp_path, capsys):
    """Through the real CLI: a file that fails the pre-run check counts as failed of the total, on
    the bar and in the summary, and a rerun of the folder adds no second row to failed.jsonl."""
    import json

    from hdm_lightning.cli import main
    from tests.helpers.tiny import spot_images
    from tests.test_cli import SMALL

    folder = tmp_path / "images"
    folder.mkdir()
    spot_images(folder, count=3)
    (folder / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    args = [f"--data.images={folder}", f"--out_dir={out}", *SMALL, "--trainer.logger=false", "--schedule.stages=1",
            "--data.batch_size=1"]  # one image at a time: each finishes at its own step
    main([*args, "--trainer.enable_progress_bar=true"])  # pytest's stdout is no terminal: one line per image
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("images ")]
    assert [re.match(r"images (\d+)/4 ", line).group(1) for line in lines] == ["2", "3", "4"]  # 1 failed at start
    assert "(3 explained, 1 failed)" in lines[-1]
    assert "Explained 3 of 4 images; 1 failed" in printed

    main(args)  # a rerun of the same folder, without the bar
    printed = capsys.readouterr().out
    assert not [line for line in printed.splitlines() if line.startswith("images ")]  # enable_progress_bar=false
    assert "Explained 3 of 4 images; 1 failed" in printed
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert [f["image"] for f in failed] == [str(folder / "broken.png")]
