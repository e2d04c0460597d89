"""HDM on a classifier trained on synthetic scenes whose class is decided by the target objects.

The scenes (hdm_lightning/synthetic.py) hold red disks (the targets) among same-colour squares and
other-colour disks; the tiny classifier is trained on them deterministically. The HDM map must put
its mass on the targets, far above their share of the image.
"""

import numpy as np

from hdm_lightning.outputs import RunFolder
from tests.helpers.run import build, maps

SETTINGS = {"benchmark_sizes": (4, 6), "block_factors": (2,), "max_size": 24}


def test_hdm_mass_lies_on_the_target_objects(synthetic_classifier, synthetic_scenes, tmp_path):
    folder, scenes, chosen = synthetic_scenes
    model, data, trainer = build(folder, tmp_path / "run", classifier=synthetic_classifier, batch_size=4,
                                 module=SETTINGS)
    trainer.fit(model, datamodule=data)
    result = maps(RunFolder(tmp_path / "run"))
    mass = np.array([result[f"scene{i}"][scenes.masks[i].numpy()].sum() / result[f"scene{i}"].sum() for i in chosen])
    area = np.array([scenes.masks[i].float().mean().item() for i in chosen])
    # measured: mass 0.53, 0.22, 0.00, 0.30 on targets covering 3.7, 3.2, 3.3, 3.0 % of the image with
    # configs/sufficient.yaml, the defaults before stop 28 (the current defaults, with the deletion term in
    # log-odds, pass but were not measured here; blur substrate, relative_eps 0.5; 0.51, 0.22, 0.05, 0.33 with configs/deletion.yaml's
    # deletion term; 0.54, 0.28, 0.00, 0.31 with the mean substrate;
    # 0.50, 0.32, 0.16, 0.43 without the smoothness term, smoothness_weight 0)
    assert mass.mean() > 3 * area.mean()
    assert (mass > 4 * area).sum() >= 3
