"""Shared test settings."""

import pytest
import torch

from hdm_lightning.pointwise import strict_mkl

strict_mkl()  # as train_masks.py does, before anything multiplies matrices (model.thread_invariant)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one thread avoids oversubscription on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def synthetic_classifier(tmp_path_factory):
    """The tiny CNN trained on synthetic scenes (hdm_lightning/synthetic.py), trained once a session."""
    from hdm_lightning.synthetic import cached_tiny_classifier

    return cached_tiny_classifier(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def synthetic_scenes(tmp_path):
    """The class-1 scenes of ``make_scenes(8, seed=7)`` as PNG files; returns (folder, scenes, indices)."""
    import numpy as np
    from PIL import Image

    from hdm_lightning.synthetic import make_scenes

    scenes = make_scenes(8, seed=7)
    folder = tmp_path / "scenes"
    folder.mkdir()
    chosen = [i for i in range(8) if scenes.labels[i] == 1]
    for i in chosen:
        pixels = (scenes.images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"scene{i}.png")
    return folder, scenes, chosen
