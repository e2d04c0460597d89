"""Synthetic scenes with known object masks, and a tiny classifier that must find the object.

A scene is a smooth, noisy colour background with a few flat objects, each in its own cell of a
3x3 grid (jittered inside the cell), so objects never overlap and the ground-truth mask is exactly
the pixels of the target objects. Class 1 scenes hold 1..``max_instances`` *targets*: red disks.
Every scene also holds distractors, so that a map on anything but the targets is wrong:

- 1..``max_other_disks`` disks of other colours, black and grey included: shape alone does not
  decide the class, and a target blacked out or set to the mean colour (as a saliency method
  removes it) reads as class 0;
- red squares of the same area and colour as a target, so that colour statistics do not decide
  the class: where a class 1 scene has its 1..``max_instances`` targets, a class 0 scene has
  0..``max_instances`` red squares, and both classes get 0..``max_red_squares`` more. The count
  of red pixels alone classifies at most about 58 % of the scenes.

A classifier that separates the classes therefore has to look at the target objects, which is
what a saliency map of it must show. Everything is drawn from one ``torch.Generator``: the same
arguments give identical tensors.

Example:
    >>> scenes = make_scenes(4, seed=0)
    >>> scenes.images.shape, scenes.labels.tolist(), scenes.masks.shape
    (torch.Size([4, 3, 64, 64]), [1, 0, 1, 0], torch.Size([4, 64, 64]))
    >>> bool((scenes.masks.flatten(1).any(1) == scenes.labels.bool()).all())
    True
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
GRID = 3  # objects sit in distinct cells of a GRID x GRID grid
TARGET_COLOUR = (0.9, 0.1, 0.1)
# Disk distractors. Black and grey ones look like a removed target: HDM blacks out found regions
# and a zero mask turns a pixel into the MEAN grey.
OTHER_COLOURS = (
    (0.15, 0.75, 0.2),  # green
    (0.15, 0.3, 0.9),  # blue
    (0.9, 0.85, 0.15),  # yellow
    (0.85, 0.15, 0.8),  # magenta
    (0.15, 0.8, 0.85),  # cyan
    (0.05, 0.05, 0.05),  # black
    (0.5, 0.5, 0.5),  # grey
)
CACHE_VERSION = 1  # bump when the scenes, the network or the training change


@dataclass(frozen=True)
class SyntheticScenes:
    """A batch of scenes.

    Attributes:
        images: ``(N, 3, H, W)`` float in [0, 1], not normalised.
        labels: ``(N,)`` long, 1 when the scene holds a target object.
        masks: ``(N, H, W)`` bool, the pixels of all target objects (empty for class 0).
        instances: ``(N,)`` long, the number of target objects (0 for class 0).
    """

    images: Tensor
    labels: Tensor
    masks: Tensor
    instances: Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]


def normalize(images: Tensor) -> Tensor:
    """Normalise ``(N, 3, H, W)`` images in [0, 1] with ``MEAN`` and ``STD``, as the classifier expects.

    Example:
        >>> normalize(torch.full((1, 3, 2, 2), 0.5)).abs().max().item()
        0.0
    """
    mean = images.new_tensor(MEAN).view(1, 3, 1, 1)
    std = images.new_tensor(STD).view(1, 3, 1, 1)
    return (images - mean) / std


def _background(n: int, size: int, generator: torch.Generator) -> Tensor:
    """Smooth muted colour fields, a random 4x4 grid upsampled bilinearly: ``(n, 3, size, size)``."""
    coarse = 0.25 + 0.5 * torch.rand(n, 3, 4, 4, generator=generator)  # (n, 3, 4, 4)
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _centres(n: int, slots: int, size: int, radius: float, generator: torch.Generator) -> Tensor:
    """Centres ``(n, slots, 2)`` as (y, x): distinct grid cells per scene, jittered inside the cell."""
    cells = torch.rand(n, GRID * GRID, generator=generator).argsort(1)[:, :slots]  # (n, slots)
    cell = size / GRID
    grid_yx = torch.stack([cells // GRID, cells % GRID], dim=-1).float()  # (n, slots, 2)
    jitter = cell / 2 - radius - 1  # keeps the largest object inside its cell
    offset = (2 * torch.rand(n, slots, 2, generator=generator) - 1) * jitter
    return (grid_yx + 0.5) * cell + offset


def _shape(centre: Tensor, radius: Tensor, disk: Tensor, size: int) -> Tensor:
    """Pixels ``(n, size, size)`` of a disk (``disk`` True) or of a square of the same area."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    dy = coords.view(1, size, 1) - centre[:, 0].view(-1, 1, 1)  # (n, size, 1)
    dx = coords.view(1, 1, size) - centre[:, 1].view(-1, 1, 1)  # (n, 1, size)
    r = radius.view(-1, 1, 1)
    in_disk = dy**2 + dx**2 <= r**2  # (n, size, size)
    in_square = torch.maximum(dy.abs(), dx.abs()) <= r * math.sqrt(math.pi) / 2  # same area
    return torch.where(disk.view(-1, 1, 1), in_disk, in_square)


def _objects(
    labels: Tensor, counts: tuple[int, int, int], radius: tuple[float, float], jitter: float,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Draw the objects of each scene, one per slot.

    Slots come in three kinds: ``counts[0]`` primary slots (targets in class 1, red squares in
    class 0), ``counts[1]`` extra red squares, ``counts[2]`` disks of other colours. A scene fills
    the first 1..counts[0] (class 1) or 0..counts[0] (class 0), 0..counts[1] and 1..counts[2]
    slots of each kind.

    Returns:
        present, disk, target ``(n, slots)`` bool; colour ``(n, slots, 3)``; radius ``(n, slots)``.
    """
    n, slots = labels.shape[0], sum(counts)
    kind = torch.repeat_interleave(torch.arange(3), torch.tensor(counts))  # (slots,)
    rank = torch.cat([torch.arange(c) for c in counts])  # (slots,) index within the kind
    low = torch.stack([labels, torch.zeros_like(labels), torch.ones_like(labels)], dim=1)  # (n, 3)
    high = torch.tensor(counts) + 1  # (3,) exclusive
    filled = low + (torch.rand(n, 3, generator=generator) * (high - low)).long()  # (n, 3) uniform
    present = rank < filled[:, kind]  # (n, slots)
    target = (kind == 0) & labels.bool().view(-1, 1)  # (n, slots)
    disk = target | (kind == 2)
    choice = torch.randint(len(OTHER_COLOURS), (n, slots), generator=generator)
    other = (kind == 2).view(1, slots, 1)
    palette = torch.tensor(OTHER_COLOURS)[choice]  # (n, slots, 3)
    base = torch.where(other, palette, torch.tensor(TARGET_COLOUR))  # (n, slots, 3)
    colour = (base + jitter * (2 * torch.rand(n, slots, 3, generator=generator) - 1)).clamp(0, 1)
    radii = radius[0] + (radius[1] - radius[0]) * torch.rand(n, slots, generator=generator)
    return present, disk, target & present, colour, radii


def _validate(size: int, n: int, counts: tuple[int, int, int], radius: tuple[float, float]) -> None:
    if n < 1 or counts[0] < 1 or counts[1] < 0 or counts[2] < 1:
        raise ValueError(f"need n >= 1, max_instances >= 1, max_red_squares >= 0 and "
                         f"max_other_disks >= 1, got n={n}, "
                         f"(max_instances, max_red_squares, max_other_disks)={counts}")
    if sum(counts) > GRID * GRID:
        raise ValueError(f"at most {GRID * GRID} objects fit, got max_instances + max_red_squares "
                         f"+ max_other_disks = {sum(counts)}")
    if not 0 < radius[0] <= radius[1] < size / GRID / 2 - 1:
        raise ValueError(f"radius={radius} must satisfy 0 < min <= max < {size / GRID / 2 - 1} "
                         f"(half a grid cell minus one pixel) for size={size}")


def make_scenes(
    n: int,
    size: int = 64,
    seed: int = 0,
    max_instances: int = 3,
    radius: tuple[float, float] = (6.0, 8.0),
    max_red_squares: int = 2,
    max_other_disks: int = 2,
    noise: float = 0.05,
    colour_jitter: float = 0.08,
) -> SyntheticScenes:
    """Draw ``n`` scenes; labels alternate 1, 0, 1, 0, ... (object positions are random).

    Args:
        n: number of scenes.
        size: height and width in pixels.
        seed: seed of the generator; the same arguments give identical tensors.
        max_instances: a class 1 scene holds 1..max_instances targets (uniformly).
        radius: (min, max) radius of every object in pixels.
        max_red_squares: extra red squares per scene, 0..max_red_squares (both classes).
        max_other_disks: disks of other colours per scene, 1..max_other_disks (both classes).
        noise: largest standard deviation of the Gaussian pixel noise; each scene draws its own
            from [0, noise], so that noise-free (e.g. masked) regions are in distribution.
        colour_jitter: half-width of the uniform jitter of each object's colour.

    Returns:
        The scenes.

    Raises:
        ValueError: if a count is out of range or the objects cannot fit in distinct grid cells.
    """
    counts = (max_instances, max_red_squares, max_other_disks)
    _validate(size, n, counts, radius)
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.arange(n) % 2 == 0).long()  # (n,)
    background = _background(n, size, generator)  # (n, 3, size, size)
    centres = _centres(n, sum(counts), size, radius[1], generator)  # (n, slots, 2)
    present, disk, target, colour, radii = _objects(labels, counts, radius, colour_jitter, generator)
    ids = torch.zeros(n, size, size, dtype=torch.long)  # 0 is background, slot + 1 an object
    for slot in range(sum(counts)):
        region = _shape(centres[:, slot], radii[:, slot], disk[:, slot], size)  # (n, size, size)
        ids.masked_fill_(region & present[:, slot].view(-1, 1, 1), slot + 1)  # cells never overlap
    flat = ids.view(n, size * size, 1)  # (n, size * size, 1)
    colour = torch.cat([torch.zeros(n, 1, 3), colour], dim=1)  # (n, slots + 1, 3)
    painted = colour.gather(1, flat.expand(-1, -1, 3)).transpose(1, 2).view(n, 3, size, size)
    images = torch.where((ids > 0).unsqueeze(1), painted, background)  # (n, 3, size, size)
    sigma = noise * torch.rand(n, 1, 1, 1, generator=generator)
    images = (images + sigma * torch.randn(images.shape, generator=generator)).clamp(0, 1)
    target = torch.cat([torch.zeros(n, 1, dtype=torch.bool), target], dim=1)  # (n, slots + 1)
    masks = target.gather(1, flat.squeeze(2)).view(n, size, size)
    return SyntheticScenes(images, labels, masks, target.sum(1))


def split_instances(masks: Tensor) -> Tensor:
    """Split target masks into one mask per grid cell, i.e. one per target instance.

    Objects never cross a cell border (``make_scenes`` keeps a one-pixel margin), so each
    non-empty cell mask is exactly one instance.

    Args:
        masks: ``(N, H, W)`` bool, as in ``SyntheticScenes.masks``.

    Returns:
        ``(N, GRID * GRID, H, W)`` bool; their union over dim 1 is ``masks``.

    Example:
        >>> scenes = make_scenes(2, seed=0)
        >>> split_instances(scenes.masks).flatten(2).any(2).sum(1).tolist(), scenes.instances.tolist()
        ([3, 0], [3, 0])
    """
    _, height, width = masks.shape
    rows = ((torch.arange(height) + 0.5) * GRID / height).long()  # (H,) cell row of pixel centres
    cols = ((torch.arange(width) + 0.5) * GRID / width).long()  # (W,)
    cell = rows.view(-1, 1) * GRID + cols.view(1, -1)  # (H, W)
    one_hot = cell == torch.arange(GRID * GRID).view(-1, 1, 1)  # (GRID * GRID, H, W)
    return masks.unsqueeze(1) & one_hot  # (N, GRID * GRID, H, W)


class TinyClassifier(nn.Module):
    """Three conv blocks (3x3 conv, BatchNorm, ReLU; the first two with stride 2), global average
    pooling and a linear layer: 23,826 parameters at ``width=16``.

    It expects images normalised with ``MEAN`` and ``STD`` and returns ``(N, num_classes)`` logits.
    Average pooling makes the class 1 logit grow with the number of targets, so removing one of
    several instances lowers it without flipping the class: what a multi-stage map must find.

    Example:
        >>> TinyClassifier()(torch.zeros(2, 3, 64, 64)).shape
        torch.Size([2, 2])
    """

    def __init__(self, width: int = 16, num_classes: int = 2) -> None:
        super().__init__()
        if width < 1 or num_classes < 2:
            raise ValueError(f"need width >= 1 and num_classes >= 2, got width={width}, "
                             f"num_classes={num_classes}")
        channels, strides = (3, width, 2 * width, 4 * width), (2, 2, 1)
        layers: list[nn.Module] = []
        for c_in, c_out, stride in zip(channels[:-1], channels[1:], strides):
            layers += [nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels[-1], num_classes)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.features(x).mean(dim=(2, 3))  # (N, 4 * width)
        return self.head(pooled)  # (N, num_classes)


@torch.no_grad()
def accuracy(model: nn.Module, scenes: SyntheticScenes, batch_size: int = 256) -> Tensor:
    """Fraction of ``scenes`` that ``model`` classifies correctly, as a 0-dim tensor.

    The model is run in eval mode and its previous mode is restored.
    """
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long)
    for start in range(0, len(scenes), batch_size):
        images = normalize(scenes.images[start:start + batch_size])
        correct += (model(images).argmax(1) == scenes.labels[start:start + batch_size]).sum()
    model.train(was_training)
    return correct / len(scenes)


def train_tiny_classifier(
    seed: int = 0,
    n_train: int = 2000,
    epochs: int = 4,
    batch_size: int = 100,
    lr: float = 2e-2,
    size: int = 64,
    width: int = 16,
) -> TinyClassifier:
    """Train a ``TinyClassifier`` on ``make_scenes(n_train, size, seed)``, deterministically.

    The weights come from ``seed`` (under a forked global RNG, which is left as it was) and the
    batches from a local generator, so two calls give identical weights on the same machine and
    thread count. AdamW with a one-cycle learning-rate schedule.

    Measured with the defaults on held-out ``make_scenes(2000, seed=1234)``: 99.6 % accuracy
    (seed 0, 2 threads; 99.0-99.6 % over seeds 0-2 and 1 or 2 threads). Setting the targets of
    the class 1 scenes to 0 (the mean grey) makes 99.8-100 % of them class 0, blacking them out
    98-100 %; keeping only the targets (the rest 0) keeps 100 % class 1. Training takes 7-9 s on
    2 idle CPU cores, 10-15 s on one thread, and several times longer when other jobs share the
    cores.

    Args:
        seed: seed of the training scenes, the initial weights and the batch order.
        n_train: number of training scenes.
        epochs: passes over the training scenes.
        batch_size: scenes per optimiser step.
        lr: peak learning rate of the one-cycle schedule.
        size: scene height and width.
        width: channels of the first conv block.

    Returns:
        The trained model, in eval mode.

    Raises:
        ValueError: if ``n_train``, ``epochs``, ``batch_size`` or ``lr`` is not positive.
    """
    if min(n_train, epochs, batch_size) < 1 or lr <= 0:
        raise ValueError(f"n_train, epochs and batch_size must be >= 1 and lr > 0, got "
                         f"n_train={n_train}, epochs={epochs}, batch_size={batch_size}, lr={lr}")
    scenes = make_scenes(n_train, size=size, seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyClassifier(width=width)
    generator = torch.Generator().manual_seed(seed)
    steps = epochs * math.ceil(n_train / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(n_train, generator=generator).split(batch_size):
            loss = F.cross_entropy(model(normalize(scenes.images[batch])), scenes.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def cached_tiny_classifier(cache_dir: str | os.PathLike, seed: int = 0) -> TinyClassifier:
    """``train_tiny_classifier(seed)``, trained once: weights are saved in ``cache_dir``, then loaded.

    The file is written atomically (a temporary file in the same folder, then ``os.replace``), so
    concurrent callers never read a partial file. Its name carries ``CACHE_VERSION``.

    Returns:
        The model, in eval mode.
    """
    path = Path(cache_dir) / f"tiny_classifier_v{CACHE_VERSION}_seed{seed}.pt"
    if path.is_file():
        model = TinyClassifier()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    model = train_tiny_classifier(seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(model.state_dict(), f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return model
