"""How alike are the maps of two run folders? Pearson correlation per image, fused and per stage.

For every image with a map in both folders (``maps/<name>.npy``, and ``stages/<name>_stage<t>.npy``
where both have them): the correlation of the two maps, and the mean and minimum over images. Use it
to compare two settings, two machines, or a preset with a longer run of itself.

Usage:
    python benchmarks/map_correlation.py RUN_A RUN_B
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stability import correlation  # noqa: E402


def rows(first: Path, second: Path) -> list[tuple[str, str, float]]:
    """(image, which map, correlation) for every map both folders hold."""
    result = []
    for path in sorted((first / "maps").glob("*.npy")):
        other = second / "maps" / path.name
        if not other.exists():
            continue
        result.append((path.stem, "fused", correlation(np.load(path), np.load(other))))
        for stage in sorted((first / "stages").glob(f"{path.stem}_stage*.npy")):
            twin = second / "stages" / stage.name
            if twin.exists():
                result.append((path.stem, stage.stem.rsplit("_", 1)[1], correlation(np.load(stage), np.load(twin))))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args()
    found = rows(args.first, args.second)
    if not found:
        raise SystemExit(f"error: no image has a map in both {args.first}/maps and {args.second}/maps")
    print("| image | map | correlation |\n|---|---|---|")
    for image, which, value in found:
        print(f"| {image} | {which} | {value:.3f} |")
    fused = [value for _, which, value in found if which == "fused"]
    print(f"\nfused maps of {len(fused)} images: mean {np.mean(fused):.3f}, min {min(fused):.3f}")


if __name__ == "__main__":
    main()
