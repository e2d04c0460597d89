"""Throughput of the engine against the classifier's own forward + backward (issue 8, point 6).

One run, one model (EfficientNet-Lite0 by default), one image size, real photos:

(a) floor: the frozen classifier's forward + backward w.r.t. the input, image-passes per second, at
    the engine's batch size (the mean number of masked images per step of the run); and the *shadow*
    floor: the same passes on exactly the batch sizes each training step sent, timed right after that
    step (a fixed batch at the mean misses what the pool's changing batches cost, and a floor timed
    apart from the run reads the machine's drift; on with ``--shadow``, which synchronises after every
    step); ``--rounds`` repeats the runs;
(b) HDM's useful passes per second (masked images of items still optimising) and all passes per
    second (every masked image sent through the classifier), over the whole run (checks, stage
    changes, fusion and writing the maps included);
(c) their ratios to the floors (per round, and the median over ``--rounds``);
(d) the share of the run's time spent outside the classifier: forward and backward hooks on the
    classifier time every pass through it (CPU: synchronous, so wall time is exact); over the whole
    run, and over the training steps alone (the issue's "share of a step": the masks, the losses and
    the optimiser step, without start-up, admissions, stage changes, fusion and writing);
(e) the same for the engine before issue 8 (``--engine old`` with ``PYTHONPATH`` at a checkout of
    it; ``--compare PATH`` runs it in a subprocess and prints both rows).

Schedules: ``fast`` (``configs/fast.yaml``, the defaults to stop 55) and ``paperlike`` (the fast chains
with a longer, patience-driven schedule, so that items converge at different steps, as with the paper's constants).

    python benchmarks/throughput.py --compare /path/to/old/checkout      # both engines, both schedules
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

#: The checkout whose engine runs: this one, or the one ``--compare`` names (set for its subprocess).
ROOT = Path(os.environ.get("HDM_ROOT", Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(ROOT))

SCHEDULES = {
    "fast": {"min_steps": 20, "max_steps": 40},  # configs/fast.yaml: the defaults to stop 55, as RESULTS.md measured
    "paperlike": {"min_steps": 10, "max_steps": 60, "patience": 10, "min_delta": 1e-3, "check_every": 5},
}
#: Module settings of each schedule (``paper``: the reference chains, configs/paper.yaml).
FAST_RATE = {"lr": 0.05, "lr_horizon": 40}
PRESETS = {"fast": FAST_RATE, "paperlike": FAST_RATE,
           "paper": {"benchmark_sizes": (6, 7, 8, 9, 10, 11), "block_factors": (2, 3, 5), "lr": 0.01}}
SCHEDULES["paper"] = {"min_steps": 800, "max_steps": 2000, "patience": 500, "min_delta": 1e-3, "check_every": 50}
PHOTOS = ["skimage:chelsea", "skimage:coffee", "skimage:astronaut", "matplotlib:grace_hopper.jpg"]


class ClassifierClock:
    """Wall time inside the classifier: forward hooks and full backward hooks. ``batches``: the batch
    size of every forward pass made inside a training step (``in_step``), which the shadow floor repeats."""

    def __init__(self, classifier: torch.nn.Module) -> None:
        self.seconds, self.started, self.in_step, self.batches = 0.0, {}, False, []
        classifier.register_forward_pre_hook(self.forward_starts)
        classifier.register_forward_hook(lambda m, i, o: self.stop("forward"))
        classifier.register_full_backward_pre_hook(lambda m, g: self.start("backward"))
        classifier.register_full_backward_hook(lambda m, gi, go: self.stop("backward"))

    def forward_starts(self, module, inputs) -> None:
        if self.in_step:
            self.batches.append(int(inputs[0].shape[0]))
        self.start("forward")

    def start(self, phase: str) -> None:
        self.started[phase] = time.perf_counter()

    def stop(self, phase: str) -> None:
        self.seconds += time.perf_counter() - self.started.pop(phase)


class StepClock:
    """Wall time of the module's training steps (masks, classifier, losses, optimiser step) and the
    classifier's part of it: the share of a step outside the classifier, without the run's start-up,
    admissions, stage changes, fusion and writing, which the whole-run share includes."""

    def __init__(self, model: torch.nn.Module, clock: ClassifierClock) -> None:
        self.seconds, self.classifier_seconds = 0.0, 0.0
        step = model.training_step

        def timed(*args, **kwargs):
            start, inside = time.perf_counter(), clock.seconds
            clock.in_step = True
            try:
                return step(*args, **kwargs)
            finally:
                clock.in_step = False
                self.seconds += time.perf_counter() - start
                self.classifier_seconds += clock.seconds - inside

        model.training_step = timed


class Passes(Callback):
    """Counts the masked images each step sends through the classifier, and those of items still optimising."""

    def __init__(self, engine: str) -> None:
        self.engine, self.passes, self.useful, self.steps = engine, 0, 0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.should_stop:
            return
        if self.engine == "new":
            count = len(pl_module.pool) * pl_module.passes_per_step  # the deletion term's pass counts too
            self.passes, self.useful = self.passes + count, self.useful + count  # every item in flight optimises
        else:  # the old engine: every chain with an active item sends all the batch's images
            if getattr(pl_module, "idle", False) or not hasattr(pl_module, "active"):
                return
            active = pl_module.active
            self.passes += int(active.any(dim=1).sum()) * active.shape[1]
            self.useful += int(active.sum())
        self.steps += 1


class Shadow(Callback):
    """The floor measured beside the work: after each training step, the classifier passes the step made
    (their batch sizes, from ``ClassifierClock.batches``) again on random images through a frozen copy
    of the classifier, forward + backward w.r.t. the input, timed. A floor timed apart from the run
    reads the machine's drift (this 2-core machine's speed moves by 20 % within a minute); step by step
    the two see the same machine. The run's own time is its wall time less ``seconds``."""

    def __init__(self, clock: ClassifierClock, args) -> None:
        from hdm_lightning.models import freeze

        self.clock, self.seen, self.seconds, self.passes = clock, 0, 0.0, 0
        self.device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
        self.classifier = freeze(build_classifier(args.classifier)).to(self.device)
        if args.shadow_hooks:  # the run's timing hooks on the shadow too: what do they cost?
            ClassifierClock(self.classifier)
        self.size, self.low, self.inputs = args.size, args.precision.startswith("bf16"), {}
        self.layout = arithmetic_of_the_run(self.classifier, args)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        batches, self.seen = self.clock.batches[self.seen:], len(self.clock.batches)
        for b in batches:
            if b not in self.inputs:  # a new shape: made and passed once untimed (warm-up)
                self.inputs[b] = torch.randn(b, 3, self.size, self.size, device=self.device).contiguous(
                    memory_format=self.layout).requires_grad_()
                self.pass_(self.inputs[b])
        synchronise(self.device)
        start = time.perf_counter()
        for b in batches:
            self.pass_(self.inputs[b])
        synchronise(self.device)
        self.seconds += time.perf_counter() - start
        self.passes += sum(batches)

    def pass_(self, images: torch.Tensor) -> None:
        images.grad = None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.low):
            logits = self.classifier(images)
        logits[:, 0].float().sum().backward()


def photos(folder: Path, count: int) -> str:
    """A list of ``count`` images: the shipped photos, repeated under other names where needed."""
    from PIL import Image

    from hdm_lightning.data import load_image

    lines = []
    for i in range(count):
        source = PHOTOS[i % len(PHOTOS)]
        if i < len(PHOTOS):
            lines.append(source)
        else:  # a copy as a file, so that its output name differs
            path = folder / f"copy{i}.png"
            load_image(source).save(path)
            lines.append(str(path))
    listing = folder / "photos.txt"
    listing.write_text("\n".join(lines) + "\n")
    return str(listing)


def build_classifier(name: str) -> torch.nn.Module:
    """The packaged EfficientNet-Lite0 (ImageNet weights) or a torchvision model with random weights."""
    from hdm_lightning.models import EfficientNetLite0, TorchvisionClassifier

    return EfficientNetLite0() if name == "efficientnet_lite0" else TorchvisionClassifier(name)


def run_engine(engine: str, schedule: str, args) -> dict:
    from hdm_lightning.callbacks import HDMSchedule, MapWriter
    from hdm_lightning.data import ExplanationDataModule
    from hdm_lightning.module import MaskExplainer

    classifier = build_classifier(args.classifier)
    clock = ClassifierClock(classifier)
    settings = {"max_items": args.max_items, "compile": args.compile, "channels_last": args.channels_last,
                "thread_invariant": args.thread_invariant} if engine == "new" else {}
    model = MaskExplainer(classifier=classifier, chunk_size=args.chunk_size, **settings, **PRESETS[schedule])
    steps = StepClock(model, clock)
    with tempfile.TemporaryDirectory() as folder:
        data = ExplanationDataModule(photos(Path(folder), args.images), image_size=args.size,
                                     batch_size=args.in_flight or args.images)
        passes = Passes(engine)
        shadow = Shadow(clock, args) if args.shadow else None
        callbacks = [HDMSchedule(folder, stages=args.stages, **SCHEDULES[schedule]), MapWriter(folder), passes,
                     *([shadow] if shadow else [])]
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        trainer = Trainer(accelerator=args.accelerator, devices=1, precision=args.precision, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, max_epochs=-1 if engine == "new" else 1, callbacks=callbacks)
        start = time.perf_counter()
        trainer.fit(model, datamodule=data)
        seconds = time.perf_counter() - start - (shadow.seconds if shadow else 0.0)  # without its shadow
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
    return {"engine": engine, "schedule": schedule, "seconds": seconds, "steps": passes.steps,
            "passes": passes.passes, "useful": passes.useful, "classifier_seconds": clock.seconds,
            "step_seconds": steps.seconds, "step_classifier_seconds": steps.classifier_seconds,
            "batch": passes.passes / max(1, passes.steps), "images_per_s": args.images / seconds,
            "peak_gib": peak, "shadow_floor": shadow.passes / shadow.seconds if shadow else float("nan")}


def arithmetic_of_the_run(classifier: torch.nn.Module, args) -> torch.memory_format:
    """Gives a floor's copy of the classifier the run's arithmetic: its memory format (returned, for the
    inputs) and, on CPU, its 1×1 convolutions as products (``model.thread_invariant``)."""
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    classifier.to(memory_format=layout)
    if args.thread_invariant and args.accelerator == "cpu" and not args.compile:
        from hdm_lightning.pointwise import pointwise_as_matmul

        pointwise_as_matmul(classifier)
    return layout


def floor(batch: int, args) -> float:
    """Forward + backward w.r.t. the input of the frozen classifier: image-passes per second (the
    median of three blocks of ``--repeats`` batches)."""
    from hdm_lightning.models import freeze

    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    classifier = freeze(build_classifier(args.classifier)).to(device)
    layout = arithmetic_of_the_run(classifier, args)
    images = torch.randn(batch, 3, args.size, args.size, device=device).contiguous(memory_format=layout).requires_grad_()
    low = args.precision.startswith("bf16")

    def pass_() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=low):
            logits = classifier(images)
        logits[:, 0].float().sum().backward()

    for _ in range(2):  # warm-up
        pass_()
    rates = []
    for _ in range(3):  # the median of three timed blocks: one slow or fast moment of the machine decides less
        synchronise(device)
        start = time.perf_counter()
        for _ in range(args.repeats):
            images.grad = None
            pass_()
        synchronise(device)
        rates.append(batch * args.repeats / (time.perf_counter() - start))
    return sorted(rates)[1]


def synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=["new", "old"], default="new")
    parser.add_argument("--schedules", nargs="+", default=["fast", "paperlike"], choices=list(SCHEDULES))
    parser.add_argument("--images", type=int, default=4, help="photos (and images in flight)")
    parser.add_argument("--in_flight", type=int, default=None, help="most images in flight (default: all)")
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--max_items", type=int, default=16)
    parser.add_argument("--chunk_size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10, help="batches in each of the three timed blocks of the floor")
    parser.add_argument("--rounds", type=int, default=1, help="runs of each schedule, each followed by its floors")
    parser.add_argument("--compare", type=Path, default=None, help="a checkout of the old engine to run as well")
    parser.add_argument("--classifier", default="efficientnet_lite0", help="efficientnet_lite0 or a torchvision name")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--compile", action="store_true", help="model.compile (new engine)")
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=True,
                        help="model.channels_last (new engine; on by default since stop 66)")
    parser.add_argument("--thread_invariant", action=argparse.BooleanOptionalAction, default=True,
                        help="model.thread_invariant (new engine; on by default since stop 66)")
    parser.add_argument("--shadow", action="store_true",
                        help="time the shadow floor (synchronises after every step: for CPUs, or a GPU's floor only)")
    parser.add_argument("--shadow_hooks", action="store_true", help="time the shadow floor with the run's hooks on")
    parser.add_argument("--paper", action="store_true", help="add the paper preset's own schedule (GPU)")
    args = parser.parse_args()
    if args.engine == "old":  # the engine before issue 8 knows neither setting
        args.channels_last = args.thread_invariant = False
    else:
        from hdm_lightning.pointwise import strict_mkl

        print("MKL strict:", strict_mkl())  # as train_masks.py, before anything multiplies matrices
    if args.paper:
        args.schedules = [*args.schedules, "paper"]
    torch.set_num_threads(args.threads)
    rows = []
    for round_ in range(args.rounds):  # each row printed once measured: a run stopped early keeps them
        for schedule in args.schedules:
            rows.append({**with_floor(run_engine(args.engine, schedule, args), args), "round": round_})
            print(json.dumps(rows[-1]), flush=True)
    if args.engine == "old":  # a subprocess of --compare: its rows went to the parent on stdout
        return
    if args.compare is not None:
        command = [sys.executable, __file__, "--engine", "old", *sys.argv[1:]]
        command = [c for i, c in enumerate(command) if c != "--compare" and command[i - 1] != "--compare"]
        environment = {**os.environ, "PYTHONPATH": str(args.compare), "HDM_ROOT": str(args.compare)}
        done = subprocess.run(command, cwd=args.compare, env=environment, capture_output=True, text=True, check=True)
        rows += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    print_table(rows)
    print_medians(rows)


def with_floor(row: dict, args) -> dict:
    """``row`` with the floor at its mean batch (measured now, right after the run) and the ratios to it
    and to the shadow floor (measured during the run)."""
    row["floor"] = floor(max(1, round(row["batch"])), args)
    row["useful_to_shadow"] = row["useful"] / row["seconds"] / row["shadow_floor"]
    row["useful_per_s"], row["all_per_s"] = row["useful"] / row["seconds"], row["passes"] / row["seconds"]
    row["useful_to_floor"], row["all_to_floor"] = row["useful_per_s"] / row["floor"], row["all_per_s"] / row["floor"]
    row["outside_share"] = 1 - row["classifier_seconds"] / row["seconds"]
    row["outside_step_share"] = 1 - row["step_classifier_seconds"] / max(row["step_seconds"], 1e-9)
    return row


def print_table(rows: list[dict]) -> None:
    print("\n| engine | schedule | round | steps | mean batch | floor (img/s) | shadow floor (img/s) | useful passes/s "
          "| all passes/s | useful/floor | useful/shadow | all/floor | outside classifier: run | in steps | images/s "
          "| peak GiB | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['schedule']} | {r.get('round', 0)} | {r['steps']} | {r['batch']:.1f} | "
              f"{r['floor']:.1f} | {r['shadow_floor']:.1f} | {r['useful_per_s']:.1f} | {r['all_per_s']:.1f} | "
              f"{r['useful_to_floor']:.2f} | {r['useful_to_shadow']:.2f} | {r['all_to_floor']:.2f} | "
              f"{100 * r['outside_share']:.1f} % | {100 * r['outside_step_share']:.1f} % | "
              f"{r.get('images_per_s', float('nan')):.3f} | "
              f"{r.get('peak_gib', float('nan')):.2f} | {r['seconds']:.0f} |")


def print_medians(rows: list[dict]) -> None:
    """Per engine and schedule, the median over rounds of useful passes against each floor."""
    print("\n| engine | schedule | rounds | useful/floor (median, range) | useful/shadow (median, range) |")
    print("|---|---|---|---|---|")
    for key in dict.fromkeys((r["engine"], r["schedule"]) for r in rows):
        group = [r for r in rows if (r["engine"], r["schedule"]) == key]
        cells = []
        for ratio in ("useful_to_floor", "useful_to_shadow"):
            values = sorted(r[ratio] for r in group)
            cells.append(f"{statistics.median(values):.2f} ({values[0]:.2f}–{values[-1]:.2f})")
        print(f"| {key[0]} | {key[1]} | {len(group)} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
