"""Synthetic scenes and the tiny classifier: determinism, ground truth, and reliance on the object."""

from __future__ import annotations

import pytest
import torch

from hdm_lightning import synthetic
from hdm_lightning.synthetic import (
    GRID,
    TARGET_COLOUR,
    TinyClassifier,
    accuracy,
    cached_tiny_classifier,
    make_scenes,
    normalize,
    split_instances,
    train_tiny_classifier,
)

HELD_OUT_SEED = 1234  # the training scenes use seed 0


@pytest.fixture(scope="session")
def classifier() -> TinyClassifier:
    return train_tiny_classifier(seed=0)


@pytest.fixture(scope="session")
def held_out():
    return make_scenes(1000, seed=HELD_OUT_SEED)


def _margin(model: TinyClassifier, images: torch.Tensor) -> torch.Tensor:
    """Class 1 logit minus class 0 logit, ``(N,)``, for already normalised images."""
    with torch.no_grad():
        logits = model(images)
    return logits[:, 1] - logits[:, 0]


# --- scenes --------------------------------------------------------------------------------------


def test_same_seed_same_scenes_other_seed_other_scenes():
    a, b, c = make_scenes(16, seed=7), make_scenes(16, seed=7), make_scenes(16, seed=8)
    for field in ("images", "labels", "masks", "instances"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert not torch.equal(a.images, c.images)
    assert not torch.equal(a.masks, c.masks)


def test_scene_tensors_and_labels():
    scenes = make_scenes(300, size=48, seed=1, radius=(4.0, 6.0))
    assert scenes.images.shape == (300, 3, 48, 48) and scenes.images.dtype == torch.float32
    assert scenes.images.min() >= 0 and scenes.images.max() <= 1
    assert scenes.labels.tolist() == [1, 0] * 150
    assert torch.equal(scenes.masks.flatten(1).any(1), scenes.labels.bool())  # empty iff class 0
    positives = scenes.instances[scenes.labels == 1]
    assert set(positives.tolist()) == {1, 2, 3}
    assert not scenes.instances[scenes.labels == 0].any()


def test_each_instance_is_one_red_disk_in_its_own_cell():
    scenes = make_scenes(200, seed=2)
    cells = split_instances(scenes.masks)  # (N, 9, H, W)
    assert torch.equal(cells.any(1), scenes.masks)
    assert torch.equal(cells.flatten(2).any(2).sum(1), scenes.instances)
    areas = cells.flatten(2).sum(2)[cells.flatten(2).any(2)].float()
    assert areas.min() >= 0.8 * torch.pi * 6**2 and areas.max() <= 1.2 * torch.pi * 8**2
    colour = scenes.images.permute(0, 2, 3, 1)[scenes.masks].mean(0)  # mean colour under the mask
    assert torch.allclose(colour, torch.tensor(TARGET_COLOUR), atol=0.03)


def test_red_pixel_count_does_not_decide_the_class():
    scenes = make_scenes(1000, seed=3)
    images = scenes.images
    red = (images[:, 0] > 0.7) & (images[:, 1] < 0.35) & (images[:, 2] < 0.35)  # (N, H, W)
    count = red.flatten(1).sum(1)
    positive = scenes.labels.bool()
    best = max(((count > t) == positive).float().mean() for t in range(0, 1500, 10))
    assert best < 0.65  # red squares of the same area make the count nearly uninformative


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_instances": 0}, "max_instances"),
        ({"max_other_disks": 0}, "max_other_disks >= 1"),
        ({"max_instances": 4, "max_red_squares": 3, "max_other_disks": 3}, "at most 9"),
        ({"radius": (6.0, 10.0)}, "radius="),  # does not fit a 64 / 3 pixel cell
        ({"n": 0}, "n=0"),
    ],
)
def test_make_scenes_rejects_impossible_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_scenes(**{"n": 2, **kwargs})


def test_split_instances_uses_grid_cells():
    masks = torch.zeros(1, 6, 6, dtype=torch.bool)
    masks[0, 0, 0] = masks[0, 5, 5] = masks[0, 2, 3] = True
    cells = split_instances(masks)
    assert cells.shape == (1, GRID * GRID, 6, 6)
    assert cells[0, 0, 0, 0] and cells[0, 8, 5, 5] and cells[0, 4, 2, 3]
    assert cells.sum() == 3


# --- classifier ----------------------------------------------------------------------------------


def test_held_out_accuracy(classifier, held_out):
    assert accuracy(classifier, held_out) >= 0.95


@pytest.mark.parametrize("fill", [0.0, -1.0], ids=["mean-grey", "black"])
def test_removing_the_targets_removes_the_class(classifier, held_out, fill):
    positive = held_out.labels == 1
    images = normalize(held_out.images[positive])
    removed = torch.where(held_out.masks[positive].unsqueeze(1), torch.tensor(fill), images)
    before, after = _margin(classifier, images), _margin(classifier, removed)
    assert (before - after).mean() > 5
    assert (after < 0).float().mean() >= 0.9


def test_the_targets_alone_keep_the_class(classifier, held_out):
    positive = held_out.labels == 1
    kept = normalize(held_out.images[positive]) * held_out.masks[positive].unsqueeze(1)  # rest -> 0
    assert (_margin(classifier, kept) > 0).float().mean() >= 0.95
    assert _margin(classifier, torch.zeros(1, 3, 64, 64)) < 0  # an all-mean image is class 0


def test_every_instance_counts(classifier, held_out):
    multi = held_out.instances >= 2
    images = normalize(held_out.images[multi])
    cells = split_instances(held_out.masks[multi])  # (M, 9, H, W)
    first = cells.flatten(2).any(2).float().argmax(1)  # (M,) first non-empty cell
    one = cells[torch.arange(cells.shape[0]), first]  # (M, H, W)
    before, after = _margin(classifier, images), _margin(classifier, images * ~one.unsqueeze(1))
    assert (after < before).float().mean() >= 0.95  # one instance less, less evidence ...
    assert (after > 0).float().mean() >= 0.9  # ... but the others still decide the class


def test_training_is_reproducible_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    a = train_tiny_classifier(seed=5, n_train=100, epochs=1, batch_size=50)
    b = train_tiny_classifier(seed=5, n_train=100, epochs=1, batch_size=50)
    assert torch.equal(torch.get_rng_state(), state)
    assert not a.training
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_accuracy_restores_the_model_mode():
    model = TinyClassifier().train()
    accuracy(model, make_scenes(4))
    assert model.training


def test_cached_classifier_trains_once(tmp_path, monkeypatch):
    calls = []

    def quick(seed: int) -> TinyClassifier:
        calls.append(seed)
        return train_tiny_classifier(seed=seed, n_train=50, epochs=1, batch_size=50)

    monkeypatch.setattr(synthetic, "train_tiny_classifier", quick)
    first = cached_tiny_classifier(tmp_path / "cache", seed=2)
    second = cached_tiny_classifier(tmp_path / "cache", seed=2)
    assert calls == [2] and not second.training
    expected = f"tiny_classifier_v{synthetic.CACHE_VERSION}_seed2.pt"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [expected]  # no temporary left
    for x, y in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(x, y)
