"""Where do two runs of the same explanation part? Every level's mask, step by step, at two thread counts.

Issue 7 asks where the maps' divergence starts. This runs :func:`hdm_lightning.explain` on one package
photo twice in one process, at ``--threads`` one and two (oneDNN splits a convolution's sums by the
thread count, so the two runs differ by float reassociation alone), records every item's mask after
every optimiser step, and prints, for each level of each chain, the mean elementwise difference
between the two runs' masks at a few steps (and the largest at the level's last step). A difference
that grows by orders of magnitude over the steps is the optimisation amplifying float noise (the
path, not the optimum, decides the mask); one that stays at the noise's size is not.

Usage (stage 1 of chelsea at 224 px, the defaults; about 3 min on 2 cores):
    python benchmarks/divergence_probe.py
    python benchmarks/divergence_probe.py --set deletion_weight=0  # without the deletion term
"""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import torch
import yaml

from hdm_lightning import explain
from hdm_lightning.data import load_image
from hdm_lightning.models import EfficientNetLite0
from hdm_lightning.pool import Item, MaskPool

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mosaics import normalise  # noqa: E402
from stability import correlation  # noqa: E402

STEPS = (1, 2, 4, 8, 16, 32, 48, 64)  # item steps the table reports (and the item's last)


@contextmanager
def recorded_masks():
    """Every in-flight item's mask in ``[0, 1]`` after every pool step: ``{item: [mask, ...]}``."""
    trajectories: dict[Item, list[torch.Tensor]] = {}
    step = MaskPool.step

    def recording(pool: MaskPool, size_of, *args, **kwargs) -> None:
        step(pool, size_of, *args, **kwargs)
        for slot, item in pool.in_flight().items():
            mask = pool.masks[str(size_of(item))][slot].detach()
            trajectories.setdefault(item, []).append(pool.as_mask(mask.clone()))

    with mock.patch.object(MaskPool, "step", recording):
        yield trajectories


def run(image: torch.Tensor, threads: int, overrides: dict) -> tuple[dict, torch.Tensor]:
    """One explanation at ``threads`` threads: (trajectories, fused map)."""
    torch.set_num_threads(threads)
    with recorded_masks() as trajectories:
        result = explain(EfficientNetLite0().eval(), image, **overrides)
    return trajectories, result["maps"][0]


def divergence_rows(first: dict, second: dict) -> list[str]:
    """A table row per item both runs had: the mean elementwise difference of its masks at ``STEPS``, and
    the largest at its last step."""
    rows = []
    for item in sorted(set(first) & set(second), key=lambda i: (i.stage, i.level, i.chain)):
        a, b = first[item], second[item]
        steps = min(len(a), len(b))
        gaps = [f"{float((a[s - 1] - b[s - 1]).abs().mean()):.0e}" if s <= steps else "" for s in STEPS]
        last = float((a[steps - 1] - b[steps - 1]).abs().max())
        rows.append(f"| {item.stage + 1} | {item.chain} | {item.level} | {a[0].shape[0]} | {len(a)} / {len(b)} | "
                    + " | ".join(gaps) + f" | {last:.0e} |")
    return rows


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` settings (YAML values) of :func:`hdm_lightning.explain`."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--set {pair!r}: expected key=value")
        overrides[key] = yaml.safe_load(value)
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo", default="skimage:chelsea", help="a package photo (data.load_image spec)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, nargs=2, default=(1, 2), help="the two runs' thread counts")
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument("--set", dest="settings", nargs="*", default=[], metavar="KEY=VALUE",
                        help="explain() overrides, e.g. deletion_weight=0")
    args = parser.parse_args()
    overrides = {"stages": args.stages, **parse_overrides(args.settings)}
    image = normalise(load_image(args.photo), args.size)[None]
    (first, map_a), (second, map_b) = (run(image, threads, overrides) for threads in args.threads)
    print(f"{args.photo}, {args.size} px, {overrides}; threads {args.threads[0]} against {args.threads[1]}")
    print(f"fused maps' correlation: {correlation(map_a.numpy(), map_b.numpy()):.4f}\n")
    print("mean elementwise difference of the two runs' masks by item step; the largest at the last\n")
    print("| stage | chain | level | size | steps | " + " | ".join(f"step {s}" for s in STEPS) + " | last, max |")
    print("|" + "---|" * (6 + len(STEPS)))
    print("\n".join(divergence_rows(first, second)))


if __name__ == "__main__":
    main()
