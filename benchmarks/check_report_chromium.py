"""Renders a run's ``report.html`` in headless Chromium: a screenshot, and a check that every image loads.

Chromium loads a copy of the page with a small script appended that, once the page has loaded,
counts the ``<img>`` elements whose data decoded (``complete`` and ``naturalWidth > 0``) and
writes ``loaded/total`` into ``<body data-images=...>``; ``--dump-dom`` prints the DOM after the
scripts ran. The page itself stays script-free. Needs Chromium (``apt-get install -y chromium``).

Usage:
    python benchmarks/check_report_chromium.py --run runs/hdm [--out runs/hdm]
    python benchmarks/check_report_chromium.py            # makes a small run first (tiny classifier)

Exits 1 when an image did not load. Writes ``report-screenshot.png`` next to the page.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECK = """<script>window.addEventListener("load", () => {
  const all = Array.from(document.images);
  const loaded = all.filter((img) => img.complete && img.naturalWidth > 0).length;
  document.body.setAttribute("data-images", loaded + "/" + all.length);
});</script>"""
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=10000"]


def small_run(out: Path) -> Path:
    """Two spot pictures explained by the tests' tiny classifier through ``train_masks.py``, and one
    broken file, so the report shows figures and a failure."""
    sys.path.insert(0, str(ROOT))
    from tests.helpers.tiny import spot_images
    from tests.test_cli import SMALL

    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    spot_images(images, count=2)
    (images / "broken.png").write_bytes(b"not a png")
    run = out / "run"
    subprocess.run([sys.executable, "train_masks.py", f"--data.images={images}", f"--out_dir={run}", *SMALL,
                    "--trainer.logger=false"], cwd=ROOT, check=True)
    return run


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    sys.exit("Chromium not found: apt-get install -y chromium")


def check(run: Path, out: Path) -> tuple[int, int]:
    """Loaded and total images of the page, and the screenshot ``out/report-screenshot.png``."""
    page = run / "report.html"
    probe = out / "report-check.html"
    probe.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    dom = subprocess.run([chromium(), *FLAGS, "--dump-dom", probe.resolve().as_uri()], capture_output=True,
                         text=True, check=True).stdout
    screenshot = out / "report-screenshot.png"
    subprocess.run([chromium(), *FLAGS, "--window-size=1280,1800", f"--screenshot={screenshot.resolve()}",
                    page.resolve().as_uri()], capture_output=True, check=True)
    marker = re.search(r'data-images="(\d+)/(\d+)"', dom)
    if marker is None:
        sys.exit(f"the check script did not run; DOM starts {dom[:200]!r}")
    return int(marker.group(1)), int(marker.group(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, help="a run folder; none: make a small one under --out")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "report-check", help="where files go")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    run = args.run or small_run(args.out)
    subprocess.run([sys.executable, "-m", "hdm_lightning.report", "--run", str(run)], cwd=ROOT, check=True)
    loaded, total = check(run, args.out)
    print(f"{run / 'report.html'}: {loaded} of {total} images loaded in Chromium; "
          f"screenshot {args.out / 'report-screenshot.png'}")
    if total == 0 or loaded != total:
        sys.exit(1)


if __name__ == "__main__":
    main()
