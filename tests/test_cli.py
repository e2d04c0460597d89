"""End to end through ``train_masks.py``'s CLI, in-process."""

import json

import numpy as np
import pytest
import yaml
from PIL import Image

from hdm_lightning.cli import main
from tests.helpers.tiny import spot_images

SMALL = [
    "--model.classifier.class_path=hdm_lightning.models.ImportedClassifier",
    "--model.classifier.init_args.network=tests.helpers.tiny.SpotClassifier",
    "--model.benchmark_sizes=[3,4]", "--model.block_factors=[2]", "--model.max_size=8", "--model.lr=0.05",
    "--data.image_size=32", "--data.mean=[0.5,0.5,0.5]", "--data.std=[0.5,0.5,0.5]", "--data.batch_size=2",
    "--schedule.stages=2", "--schedule.min_steps=5", "--schedule.max_steps=10", "--schedule.check_every=5",
    "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
]


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    paths = spot_images(folder, count=3)
    Image.open(paths[0]).resize((48, 40)).save(paths[0])  # maps come back at each file's resolution
    return folder


def run(images, out_dir, *extra):
    main([f"--data.images={images}", f"--out_dir={out_dir}", *SMALL, *extra])


def test_cli_writes_every_output_and_skips_done_images(images, tmp_path, capsys):
    out = tmp_path / "run"
    run(images, out, "--trainer.logger.init_args.mode=offline")
    assert "Explained 3 of 3 images" in capsys.readouterr().out
    assert np.load(out / "maps" / "spot0.npy").shape == (40, 48)
    assert np.load(out / "maps" / "spot1.npy").dtype == np.float32
    for name in ("spot0", "spot1", "spot2"):
        assert (out / "stages" / f"{name}_stage1.npy").is_file()
        assert (out / "stages" / f"{name}_stage2.npy").is_file()
        assert Image.open(out / "overlays" / f"{name}.png").size[0] > 0
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert sorted(r["name"] for r in rows) == ["spot0", "spot1", "spot2"]
    assert all(r["target"] == 1 and r["class_name"] == "1" and r["steps"] > 0 for r in rows)
    assert all(set(r) >= {"image", "logit", "masked_logit", "seconds"} for r in rows)
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert any((out / "wandb").glob("offline-run-*")), "W&B logs offline into the run folder"

    mtime = (out / "maps" / "spot1.npy").stat().st_mtime_ns
    run(images, out, "--trainer.logger=false")
    assert (out / "maps" / "spot1.npy").stat().st_mtime_ns == mtime
    assert len((out / "index.jsonl").read_text().splitlines()) == 3


def test_unreadable_image_is_reported_and_the_rest_explained(images, tmp_path, capsys):
    (images / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    run(images, out, "--trainer.logger=false", "--schedule.stages=1")
    failed = [json.loads(line) for line in (out / "failed.jsonl").read_text().splitlines()]
    assert [f["image"] for f in failed] == [str(images / "broken.png")]
    assert len(list((out / "maps").glob("*.npy"))) == 3


def test_help_lists_the_settings(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for option in ("--data.images", "--out_dir", "--trainer.devices", "--schedule.stages", "--model.fusion"):
        assert option in text


def test_missing_input_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run(tmp_path / "nowhere", tmp_path / "run", "--trainer.logger=false")


def test_resume_takes_the_newest_complete_checkpoint(tmp_path):
    import os

    from hdm_lightning.cli import resume_path

    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    assert resume_path(str(tmp_path), resume=True) == str(last)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"  # written by Lightning on SLURM's SIGUSR1
    hpc.write_bytes(b"x")
    os.utime(last, (1, 1))
    assert resume_path(str(tmp_path), resume=True) == str(hpc)
    assert resume_path(str(tmp_path), resume=False) is None
    (tmp_path / "hpc_ckpt_2-rank0.ckpt").write_bytes(b"x")  # rank 1's file missing: incomplete
    assert resume_path(str(tmp_path), resume=True, world_size=2) is None


def test_imported_classifier_loads_its_checkpoint(tmp_path):
    import torch

    from hdm_lightning.models import ImportedClassifier
    from tests.helpers.tiny import SpotClassifier

    original = SpotClassifier()
    with torch.no_grad():
        original.conv.weight.fill_(0.25)
    torch.save({"state_dict": {f"model.{k}": v for k, v in original.state_dict().items()}}, tmp_path / "w.ckpt")
    loaded = ImportedClassifier("tests.helpers.tiny.SpotClassifier", checkpoint=str(tmp_path / "w.ckpt"),
                                state_dict_key="state_dict", strip_prefix="model.")
    assert torch.equal(loaded.net.conv.weight, original.conv.weight)
    with pytest.raises(ValueError, match="nowhere.Model"):
        ImportedClassifier("nowhere.Model")


@pytest.mark.parametrize("preset", ["paper", "fast", "thorough", "deletion", "mdm", "demo", "cluster", "fine", "reproducible"])
def test_every_preset_parses(preset, capsys):
    from hdm_lightning.cli import CONFIGS

    with pytest.raises(SystemExit) as stop:
        main(["--config", str(CONFIGS / f"{preset}.yaml"), "--print_config"])
    assert stop.value.code in (0, None)
    assert "schedule:" in capsys.readouterr().out


def test_paper_preset_restores_the_reference_method(capsys):
    from hdm_lightning.cli import CONFIGS

    with pytest.raises(SystemExit):
        main(["--config", str(CONFIGS / "paper.yaml"), "--print_config"])
    paper = capsys.readouterr().out
    assert "SquaredConsistency" in paper and "SumFusion" in paper and "lr_schedule: constant" in paper


def printed_presets(capsys, *presets: str) -> list[dict]:
    """Each preset's full configuration as ``--print_config`` prints it."""
    from hdm_lightning.cli import CONFIGS

    printed = []
    for preset in presets:
        with pytest.raises(SystemExit):
            main(["--config", str(CONFIGS / f"{preset}.yaml"), "--print_config"])
        printed.append(yaml.safe_load(capsys.readouterr().out))
    return printed


TERMS = ("deletion_weight", "deletion_substrate", "deletion_score")


def without_keys(config: dict, keys: tuple[str, ...]) -> dict:
    """``config`` without ``out_dir`` and the given ``model`` keys, to compare what else two presets set."""
    rest = {key: value for key, value in config.items() if key != "out_dir"}
    rest["model"] = {key: value for key, value in config["model"].items() if key not in keys}
    return rest


def test_fine_preset_writes_out_the_defaults(capsys):
    """Since stop 56 the defaults are ``fine``'s rate and steps: a run without ``--config`` and one with
    ``configs/fine.yaml`` are configured alike but for the run folder."""
    with pytest.raises(SystemExit):
        main(["--print_config"])
    defaults = yaml.safe_load(capsys.readouterr().out)
    (fine,) = printed_presets(capsys, "fine")
    steps = (defaults["schedule"]["min_steps"], defaults["schedule"]["max_steps"])
    assert (defaults["model"]["lr"], *steps) == (0.025, 40, 80)
    assert without_keys(defaults, ()) == without_keys(fine, ())


def test_reproducible_preset_is_the_defaults_with_a_fixed_batch(capsys):
    """``configs/reproducible.yaml`` changes how the classifier's batches are shaped, not the method; the
    defaults already run the 1×1 convolutions as thread-invariant products, channels-last (stop 66)."""
    fine, reproducible = printed_presets(capsys, "fine", "reproducible")
    keys = ("fixed_batch", "chunk_size")
    assert tuple(reproducible["model"][key] for key in keys) == (True, 4)
    assert tuple(fine["model"][key] for key in keys) == (False, None)
    assert fine["model"]["thread_invariant"] and fine["model"]["channels_last"]
    assert without_keys(reproducible, keys) == without_keys(fine, keys)


def test_defaults_carry_the_deletion_term_in_log_odds_to_the_mean_colour(capsys):
    (fine,) = printed_presets(capsys, "fine")
    assert tuple(fine["model"][key] for key in TERMS) == (2.0, "mean", "log_odds")
    assert fine["model"]["deletion_restart"] == 0  # Adam never starts over (stop 29: photos' deletion AUC rose)
    assert fine["model"]["map_floor"] == 0.0  # the map as fused (stop 30: the floor that keeps Average Drop barely cuts)


def test_sufficient_and_deletion_presets_change_only_the_deletion_term(capsys):
    """Against ``fast`` (the defaults to stop 55, whose rate and steps both keep): ``sufficient`` leaves the
    term out (the defaults before stop 28), ``deletion`` measures it in logits; both keep the constant start
    they were measured with (the defaults start from Grad-CAM since stop 47), and ``deletion`` removes the
    kept regions as kept (the defaults at half or more since stop 50); nothing else moves: data, trainer,
    schedule, the other model keys."""
    fast, sufficient, deletion = printed_presets(capsys, "fast", "sufficient", "deletion")
    assert tuple(sufficient["model"][key] for key in TERMS) == (0.0, "same", "same")
    assert tuple(deletion["model"][key] for key in TERMS) == (2.0, "mean", "same")
    assert (fast["model"]["start"], sufficient["model"]["start"], deletion["model"]["start"]) == (
        "gradcam", "constant", "constant")
    assert fast["model"]["deletion_gate"] == 0.0  # as measured (the defaults gate the term since stop 60) ...
    gate = ("deletion_gate",)  # ... a setting of the term, which sufficient leaves out
    assert without_keys(sufficient, (*TERMS, "start", *gate)) == without_keys(fast, (*TERMS, "start", *gate))
    assert (fast["model"]["deletion_threshold"], deletion["model"]["deletion_threshold"]) == (0.5, 1.0)  # stop 50
    assert without_keys(deletion, (*TERMS, "start", "deletion_threshold")) == without_keys(
        fast, (*TERMS, "start", "deletion_threshold"))


def test_thorough_preset_is_the_sufficient_preset_with_longer_levels(capsys):
    sufficient, thorough = printed_presets(capsys, "sufficient", "thorough")
    assert thorough["model"] == sufficient["model"]
    assert (thorough["schedule"]["min_steps"], thorough["schedule"]["max_steps"]) == (100, 200)
    assert (sufficient["schedule"]["min_steps"], sufficient["schedule"]["max_steps"]) == (20, 40)


def test_scenes_preset_is_fast_warmed_up_at_twice_the_rate_with_one_stage(capsys):
    """Against ``fast`` (the defaults to stop 55, whose steps it keeps): only the rate, the warm-up (issue 7,
    stop 34), the number of stages (stop 35) and the start's range move; both start from Grad-CAM (stop 47), `scenes` at the range and the hard deletion edge it was
    measured with (stops 48 and 52)."""
    fast, scenes = printed_presets(capsys, "fast", "scenes")
    assert (fast["model"]["lr"], fast["model"]["deletion_warmup"], fast["schedule"]["stages"]) == (0.05, 0, 3)
    assert (scenes["model"]["lr"], scenes["model"]["deletion_warmup"], scenes["schedule"]["stages"]) == (0.1, 40, 1)
    assert fast["model"]["start"] == scenes["model"]["start"] == "gradcam"
    assert (list(fast["model"]["start_range"]), list(scenes["model"]["start_range"])) == ([0.2, 0.8], [0.1, 0.7])
    assert (fast["model"]["deletion_edge_width"], scenes["model"]["deletion_edge_width"]) == (0.2, 0.0)
    keys = ("lr", "deletion_warmup", "start_range", "deletion_edge_width")
    assert {**scenes["schedule"], "stages": 3} == fast["schedule"]
    assert without_keys(scenes, keys) | {"schedule": None} == without_keys(fast, keys) | {"schedule": None}


def test_fine_preset_is_fast_at_half_the_rate_over_twice_the_steps(capsys):
    """Only the rate, the steps a level (issue 7, stop 55; the defaults since stop 56) and the deletion term's
    gate (stop 60; ``fast`` keeps the whole gradient it was measured with) move; the cosine
    decay follows ``max_steps`` (``test_cosine_horizon_is_linked_to_max_steps``)."""
    fast, fine = printed_presets(capsys, "fast", "fine")
    assert (fine["model"]["lr"], fast["model"]["lr"]) == (0.025, 0.05)
    assert (fine["model"]["deletion_gate"], fast["model"]["deletion_gate"]) == (0.1, 0.0)  # since stop 60
    assert (fine["schedule"]["min_steps"], fine["schedule"]["max_steps"]) == (40, 80)
    assert {**fine["schedule"], "min_steps": 20, "max_steps": 40} == fast["schedule"]
    keys = ("lr", "deletion_gate")
    assert without_keys(fine, keys) | {"schedule": None} == without_keys(fast, keys) | {"schedule": None}


def test_reference_presets_leave_the_deletion_term_and_the_floor_out(capsys):
    for config in printed_presets(capsys, "paper", "mdm"):
        assert config["model"]["deletion_weight"] == 0.0
        assert config["model"]["map_floor"] == 0.0


def test_cosine_horizon_is_linked_to_max_steps(tmp_path):
    from hdm_lightning.cli import HDMCLI
    from hdm_lightning.consistency import EvidenceConsistency
    from hdm_lightning.data import ExplanationDataModule
    from hdm_lightning.fusion import EvidenceFusion
    from hdm_lightning.module import MaskExplainer

    cli = HDMCLI(MaskExplainer, ExplanationDataModule, run=False, save_config_callback=None,
                 args=["--model.classifier", "hdm_lightning.models.ImportedClassifier",
                       "--model.classifier.network", "tests.helpers.tiny.SpotClassifier",
                       "--schedule.max_steps", "60", "--out_dir", str(tmp_path), "--trainer.logger", "false"])
    assert cli.model.hparams.lr_horizon == 60 and cli.model.hparams.lr_schedule == "cosine"
    assert isinstance(cli.model.consistency, EvidenceConsistency) and isinstance(cli.model.fusion, EvidenceFusion)


SPOT_CLASSIFIER = {"class_path": "hdm_lightning.models.ImportedClassifier",
                   "init_args": {"network": "tests.helpers.tiny.SpotClassifier"}}


def test_rows_carry_the_picture_hash_and_evaluate_refuses_swapped_pictures(images, tmp_path):
    import hashlib

    from hdm_lightning.evaluate import main as evaluate

    out = tmp_path / "run"
    run(images, out, "--trainer.logger=false", "--schedule.stages=1")
    rows = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert {r["name"]: r["sha256"] for r in rows} == {
        p.stem: hashlib.sha256(p.read_bytes()).hexdigest() for p in images.glob("*.png")}
    args = ["--runs", str(out), "--data.images", str(images), "--data.image_size", "32", "--data.mean", "[0.5,0.5,0.5]",
            "--data.std", "[0.5,0.5,0.5]", "--model.classifier", json.dumps(SPOT_CLASSIFIER), "--device", "cpu",
            "--out_dir", str(tmp_path / "eval"), "--metrics", "[confidence]"]
    assert set(evaluate(args).images) == {"spot0", "spot1", "spot2"}  # the run's own pictures pass
    first, second = (images / "spot1.png").read_bytes(), (images / "spot2.png").read_bytes()
    (images / "spot1.png").write_bytes(second)
    (images / "spot2.png").write_bytes(first)
    with pytest.raises(ValueError, match="image 'spot1' is not the picture its map was made for"):
        evaluate(args)


def test_padded_maps_lie_on_the_region_of_the_original_picture(tmp_path):
    """A 32 x 64 picture padded into the 32 x 32 input: its rows 0-16, columns 36-52 fall on the
    classifier's square (input rows 8-16, columns 18-26), so the map must be there, at 32 x 64.
    Undoing a squash instead would put the map on rows 8-16 only (input rows 0-8 are padding)."""
    folder = tmp_path / "images"
    folder.mkdir()
    pixels = np.random.default_rng(0).uniform(0.2, 0.5, size=(32, 64, 3))
    region = np.zeros((32, 64), dtype=bool)
    region[0:16, 36:52] = True
    pixels[region] = 0.95
    Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / "wide.png")
    out = tmp_path / "run"
    run(folder, out, "--data.resize=pad", "--trainer.logger=false", "--schedule.min_steps=20",
        "--schedule.max_steps=40", "--schedule.check_every=10")
    saliency = np.load(out / "maps" / "wide.npy")
    assert saliency.shape == (32, 64)
    outside = saliency[~region].mean()
    assert saliency[region].mean() > 2 * outside
    assert saliency[0:8, 36:52].mean() > 2 * outside  # the region's top half, padding in the input's frame
    for stage in (1, 2):
        stage_map = np.load(out / "stages" / f"wide_stage{stage}.npy")
        assert stage_map.shape == (32, 64)
    assert np.load(out / "stages" / "wide_stage1.npy")[region].mean() > 2 * np.load(
        out / "stages" / "wide_stage1.npy")[~region].mean()


def test_a_folder_made_before_the_anchored_fusion_is_told_apart_from_the_new_default():
    """A stored configuration without ``model.fusion`` (maps of the unanchored evidence fusion) differs
    from today's default in the one key that changes its maps, and equals it with that key set back."""
    from hdm_lightning.cli import config_differences

    evidence = "hdm_lightning.fusion.EvidenceFusion"
    before = {"model": {"lr": 0.05}}
    now = {"model": {"lr": 0.05, "fusion": {"class_path": evidence, "init_args": {"anchored": True}}}}
    assert config_differences(before, now) == ["model.fusion.init_args.anchored"]
    now["model"]["fusion"]["init_args"]["anchored"] = False
    assert config_differences(before, now) == []
    plain_sum = {"class_path": "hdm_lightning.fusion.SumFusion"}
    assert config_differences({"model": {"fusion": plain_sum}},
                              {"model": {"fusion": {**plain_sum, "init_args": {}}}}) == []


def test_a_folder_made_before_blur_keeps_and_the_deletion_term_is_accepted_where_its_maps_would_not_change():
    """``blur_keeps`` only acts under ``substrate: auto``, which came with it; ``deletion_weight`` 0 and
    ``later_score`` None are what folders before them used. A stored blur run without those keys equals
    today's blur run, and still differs where a setting that changes maps does."""
    from hdm_lightning.cli import config_differences

    before = {"model": {"substrate": "blur", "relative_eps": 0.5, "lr_schedule": "cosine"}}
    now = {"model": {"substrate": "blur", "relative_eps": 0.5, "lr_schedule": "cosine", "blur_keeps": 0.5,
                     "deletion_weight": 0.0, "later_score": None}}
    assert config_differences(before, now) == []
    now["model"]["deletion_weight"] = 0.25
    assert config_differences(before, now) == ["model.deletion_weight"]


def test_a_folder_made_before_the_restart_and_the_floor_reads_them_as_off():
    """A stored configuration without ``deletion_restart`` or ``map_floor`` (folders before stops 29 and
    30) made its maps with both off, as today's defaults do: it equals today's run with them off and
    differs from a run with a floor in that one key."""
    from hdm_lightning.cli import config_differences

    before = {"model": {"deletion_weight": 2.0}}
    assert config_differences(before, {"model": {"deletion_weight": 2.0, "deletion_restart": 0, "map_floor": 0.0}}) == []
    assert config_differences(before, {"model": {"deletion_weight": 2.0, "deletion_restart": 0, "map_floor": 0.05}}) == [
        "model.map_floor"]


def test_a_folder_made_before_float32_stride_differs_from_today_only_under_mixed_precision():
    """``float32_stride`` changes no float32 map: a float32 folder without it is today's float32 run; a bf16
    folder without it made its maps with every layer in bf16 and is told apart."""
    from hdm_lightning.cli import config_differences

    now = {"model": {"lr": 0.05, "float32_stride": 8}}
    assert config_differences({"model": {"lr": 0.05}, "trainer": {"precision": "32-true"}},
                              {**now, "trainer": {"precision": "32-true"}}) == []
    assert config_differences({"model": {"lr": 0.05}, "trainer": {"precision": "bf16-mixed"}},
                              {**now, "trainer": {"precision": "bf16-mixed"}}) == ["model.float32_stride"]
    assert config_differences({"model": {"lr": 0.05}, "trainer": {"precision": "bf16-mixed"}},
                              {"model": {"lr": 0.05, "float32_stride": 0}, "trainer": {"precision": "bf16-mixed"}}) == []
