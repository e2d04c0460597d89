"""The divergence probe's recording: every item's mask after every step, and the table built from two runs."""

import sys
from pathlib import Path

import torch

from hdm_lightning import explain
from hdm_lightning.pool import MaskPool
from tests.helpers.tiny import SpotClassifier
from tests.test_api import SMALL, spot_batch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import divergence_probe  # noqa: E402  (a benchmark script, not a package: its folder on the path)


def test_every_item_is_recorded_at_every_step_and_the_pool_step_is_restored():
    step = MaskPool.step
    with divergence_probe.recorded_masks() as trajectories:
        explain(SpotClassifier(), spot_batch(1), **{**SMALL, "stages": 1})
    assert MaskPool.step is step
    # chains (3, 6) and (4, 8): two items a level
    assert len(trajectories) == 4 and {item.level for item in trajectories} == {0, 1}
    for item, masks in trajectories.items():
        assert SMALL["min_steps"] <= len(masks) <= SMALL["max_steps"]
        assert all(0 <= float(m.min()) and float(m.max()) <= 1 for m in masks)
        assert not torch.equal(masks[0], masks[-1])  # copies, not the pool's row seen at the end


def test_the_table_shows_no_gap_between_a_run_and_itself_and_the_gap_of_a_moved_mask():
    with divergence_probe.recorded_masks() as trajectories:
        explain(SpotClassifier(), spot_batch(1), **{**SMALL, "stages": 1})
    same = divergence_probe.divergence_rows(trajectories, trajectories)
    assert len(same) == len(trajectories) and all(row.split("|")[-2].strip() == "0e+00" for row in same)
    moved = {item: [m.clone() for m in masks] for item, masks in trajectories.items()}
    first = min(moved, key=lambda i: (i.level, i.chain))
    moved[first][-1][0, 0] += 0.3
    rows = divergence_probe.divergence_rows(trajectories, moved)
    assert rows[0].split("|")[-2].strip() == "3e-01" and all(r.split("|")[-2].strip() == "0e+00" for r in rows[1:])
