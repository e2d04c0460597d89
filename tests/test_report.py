"""The report of a real run folder made by the CLI: figures, one HTML page, a W&B table."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image

from hdm_lightning.cli import main as train
from hdm_lightning.report import TABLE_COLUMNS, main, wandb_table
from tests.helpers.tiny import spot_images
from tests.test_cli import SMALL


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """Two spot images explained in 2 stages by the CLI, and one file that cannot be read."""
    root = tmp_path_factory.mktemp("report")
    folder = root / "images"
    folder.mkdir()
    spot_images(folder, count=2)
    (folder / "broken.png").write_bytes(b"not a png")
    train([f"--data.images={folder}", f"--out_dir={root / 'run'}", *SMALL, "--trainer.logger=false"])
    return root / "run"


def test_the_training_command_writes_the_figures_and_the_page(run_dir):
    """Before any ``python -m hdm_lightning.report``: the CLI run itself left them."""
    for name in ("spot0", "spot1"):
        with Image.open(run_dir / "figures" / f"{name}.png") as figure:
            assert figure.width > 3 * figure.height and np.asarray(figure.convert("RGB")).std() > 20
    text = (run_dir / "report.html").read_text()
    assert "2 images explained, 1 failed" in text and 'alt="spot0"' in text and 'alt="spot1"' in text


def test_figures_show_the_picture_and_every_map(run_dir):
    page = main(["--run", str(run_dir)])
    assert page == run_dir / "report.html"
    index = [json.loads(line) for line in (run_dir / "index.jsonl").read_text().splitlines()]
    for row in index:
        with Image.open(run_dir / "figures" / f"{row['name']}.png") as figure:
            pixels = np.asarray(figure.convert("RGB"), dtype=np.float32)
        assert figure.width > 3 * figure.height  # 4 panels in a row: picture, 2 stages, fused
        assert pixels.std() > 20  # drawn, not blank


def test_the_page_embeds_every_figure_and_lists_the_failure(run_dir):
    text = main(["--run", str(run_dir)]).read_text()
    index = {json.loads(line)["name"]: json.loads(line) for line in (run_dir / "index.jsonl").read_text().splitlines()}
    images = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)">', text)
    assert sorted(name for name, _ in images) == sorted(index) == ["spot0", "spot1"]
    for name, data in images:
        embedded = base64.b64decode(data)
        assert embedded == (run_dir / "figures" / f"{name}.png").read_bytes()
        assert Image.open(io.BytesIO(embedded)).size[0] > 100
        row = index[name]
        assert f"{row['logit']:.4g}" in text and f"{row['masked_logit']:.4g}" in text
    assert "2 images explained, 1 failed" in text
    assert re.search(r"broken\.png</td><td>cannot read image .*broken\.png", text)
    assert "src=\"http" not in text and "<script" not in text  # one self-contained file


def test_wandb_table_has_the_same_rows(run_dir, tmp_path):
    main(["--run", str(run_dir), "--wandb", "true", "--wandb_project", "hdm-test"])
    table = wandb_table(run_dir)
    assert table.columns == TABLE_COLUMNS
    rows = {r[0]: r for r in table.data}
    assert set(rows) == {"spot0", "spot1", "broken"}
    assert rows["spot0"][2] == "1" and rows["broken"][-1].startswith("cannot read image")
    (offline,) = (run_dir / "wandb").glob("offline-run-*")
    (stored,) = (offline / "files" / "media" / "table").glob("report_*.table.json")
    assert sorted(r[0] for r in json.loads(stored.read_text())["data"]) == ["broken", "spot0", "spot1"]


def test_a_folder_that_is_no_run_is_named(tmp_path):
    with pytest.raises(ValueError, match="no index.jsonl"):
        main(["--run", str(tmp_path)])
