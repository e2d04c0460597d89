"""Compose a run folder's overlays side by side into one PNG (the README's picture).

Usage:
    python benchmarks/readme_figure.py runs/demo docs/demo.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

HEIGHT = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    rows = [json.loads(line) for line in (args.run / "index.jsonl").read_text().splitlines() if line.strip()]
    tiles = []
    for row in rows:
        overlay = Image.open(args.run / "overlays" / f"{row['name']}.png").convert("RGB")
        tile = overlay.resize((round(overlay.width * HEIGHT / overlay.height), HEIGHT))
        ImageDraw.Draw(tile).text((6, 6), row["class_name"], fill=(255, 255, 255))
        tiles.append(tile)
    figure = Image.new("RGB", (sum(t.width for t in tiles) + 4 * (len(tiles) - 1), HEIGHT), "white")
    x = 0
    for tile in tiles:
        figure.paste(tile, (x, 0))
        x += tile.width + 4
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.save(args.out)


if __name__ == "__main__":
    main()
