"""The image families on tiny CPU configurations: GAN, feature network + FID/KID, restorer + PSNR/SSIM."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from components import evaluate_image, evaluate_restore, train_feature_net, train_image, train_restore
from components.common import ConfigError
from components.feature_net import DomainFeatures, FeatureNet, FeatureNetConfig, extract, load_reference
from components.gan_model import GANConfig, load_generator
from components.metrics import fid_from_features, kid_from_features, luma, restoration_scores
from components.model_io import PICKLE_SUFFIXES
from components.restore_model import RestoreConfig, Restorer, baseline, degrade, load_restorer
from components.runtime import setup_runtime
from components.training import TIMING_FILE, Phase, TrainConfig, fit
from tests.conftest import section


def image_config(params: dict[str, Any], **overrides: Any) -> train_image.TrainImageConfig:
    raw = section(params, "train_image")
    raw.update(overrides)
    return train_image.TrainImageConfig.from_params(raw)


def restore_config(params: dict[str, Any], **overrides: Any) -> train_restore.TrainRestoreConfig:
    raw = section(params, "train_restore")
    raw.update(overrides)
    return train_restore.TrainRestoreConfig.from_params(raw)


def no_pickles(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.suffix in PICKLE_SUFFIXES]


# --- GAN -------------------------------------------------------------------------------------------------


def test_tiny_gan_trains_with_finite_losses_and_writes_grids(
    tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path
) -> None:
    cfg = image_config(tiny_params)
    result = train_image.train_image(
        cfg, tiny_features / "images", tmp_path / "model", tmp_path / "ckpt", tmp_path / "live", tmp_path / "grids"
    )
    assert result.steps == 8
    for _, losses in result.phase_losses:
        assert set(losses) == {"discriminator", "generator"} and all(math.isfinite(v) for v in losses.values())
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == ["step-00000004.png", "step-00000008.png"]
    assert (tmp_path / "live" / "plots" / "metrics" / "train" / "loss_generator.tsv").is_file()
    assert {p.name for p in (tmp_path / "model").iterdir()} == {"model.safetensors", "config.json", "training.json"}
    assert no_pickles(tmp_path / "model")
    generator, config = load_generator(tmp_path / "model")
    assert config["label_names"] == [str(i) for i in range(10)]
    z = torch.randn(3, generator.cfg.latent_dim)
    assert generator(z, torch.tensor([0, 4, 9])).shape == (3, 1, 16, 16)


def test_gan_kill_and_resume_ends_bit_identical(tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path) -> None:
    # Two optimisers, two schedules and the EMA generator all have to come back from the checkpoint.
    cfg = image_config(tiny_params)
    features = tiny_features / "images"
    train_image.train_image(cfg, features, tmp_path / "straight", tmp_path / "ckpt_straight")
    interrupted = train_image.train_image(cfg, features, tmp_path / "resumed", tmp_path / "ckpt", stop_after=4)
    assert interrupted.steps == 4 and not (tmp_path / "resumed" / "model.safetensors").exists()
    resumed = train_image.train_image(cfg, features, tmp_path / "resumed", tmp_path / "ckpt")
    assert resumed.resumed_from == 4
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    again = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)


def test_curves_and_grids_after_a_crash_and_resume_are_those_of_a_straight_run(
    tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path
) -> None:
    # Curves logged after the checkpoint a crashed run resumes from must not appear twice, and whatever the
    # plot folders held before (another experiment's grids) must go: DVC hashes these folders.
    cfg = image_config(tiny_params, log_every=2)  # checkpoints every 4 steps, curves every 2
    features = tiny_features / "images"

    def run(name: str, **kwargs: Any) -> Any:
        out = tmp_path / name
        return train_image.train_image(cfg, features, out / "model", out / "ckpt", out / "live", out / "grids", **kwargs)

    run("straight")
    run("crashed", stop_after=6)
    (run_dir,) = [p for p in (tmp_path / "crashed" / "ckpt").iterdir() if p.is_dir()]  # beside it: the lock file
    (run_dir / "step-00000006.ckpt").unlink()  # the crash came before step 6 was saved: resume from 4
    (tmp_path / "crashed" / "grids").mkdir()  # grids appear only once the run is done
    (tmp_path / "crashed" / "grids" / "step-00000099.png").write_bytes(b"another experiment's grid")
    assert run("crashed").resumed_from == 4

    def files(folder: Path) -> dict[str, bytes]:
        # timing.json (wall time, throughput) differs on every run by design: git ignores it and DVC does not own it.
        found = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != TIMING_FILE)
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in found}

    for folder in ("live", "grids", "model"):
        assert files(tmp_path / "crashed" / folder) == files(tmp_path / "straight" / folder), folder
    assert (tmp_path / "straight" / "live" / "plots" / "metrics" / "train" / "loss_generator.tsv").read_text().count("\n") == 5


def test_gan_params_are_checked_with_the_key_named(tiny_params: dict[str, Any]) -> None:
    model = dict(tiny_params["train_image"]["model"], loss="wasserstein")
    with pytest.raises(ConfigError, match=r"'train_image.model.loss'"):
        image_config(tiny_params, model=model)
    with pytest.raises(ConfigError, match="image size 12 is not 4·2"):
        GANConfig.from_params(tiny_params["train_image"]["model"], "train_image.model", 12, 1, 10)


def test_loading_refuses_a_pickle_only_model_folder(tmp_path: Path) -> None:
    folder = tmp_path / "image"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"family": "conditional-dcgan"}))
    (folder / "model.pt").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ConfigError, match=r"refusing .*only pickle weights \['model.pt'\]"):
        load_generator(folder)


# --- feature network, FID and KID ------------------------------------------------------------------------


def random_extractor(seed: int = 0) -> DomainFeatures:
    """An untrained network whose BatchNorm statistics are calibrated on random images, so features vary."""
    torch.manual_seed(seed)
    net = FeatureNet(FeatureNetConfig(image_size=16, channels=1, num_classes=10, width=4, feature_dim=8, dropout=0.0))
    for module in net.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average over the calibration batch
    with torch.no_grad():
        net.train()(images(256, seed=99).float().div(127.5).sub(1))
    return DomainFeatures(net)


def images(n: int, seed: int, shift: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randint(0, 200, (n, 1, 16, 16), generator=generator) + shift).clamp(0, 255).to(torch.uint8)


def test_fid_of_a_set_against_itself_is_zero_and_a_shifted_set_is_not() -> None:
    extractor = random_extractor()
    real = extract(extractor, images(64, seed=1))
    assert fid_from_features(real, real) == pytest.approx(0.0, abs=1e-6)
    shifted = extract(extractor, images(64, seed=2, shift=60))
    assert fid_from_features(real, shifted) > 0.5
    assert kid_from_features(real, shifted, subsets=10, subset_size=32, seed=0)[0] > 0


def test_fid_and_kid_equal_torchmetrics_reference_path_on_the_same_features() -> None:
    extractor = random_extractor()
    real_images, fake_images = images(50, seed=3), images(40, seed=4, shift=30)
    reference = FrechetInceptionDistance(feature=extractor)
    reference.update(real_images, real=True)
    reference.update(fake_images, real=False)
    ours = fid_from_features(extract(extractor, real_images), extract(extractor, fake_images))
    assert ours == pytest.approx(float(reference.compute()), rel=1e-5)

    kid = KernelInceptionDistance(feature=extractor, subsets=5, subset_size=20)
    kid.update(real_images, real=True)
    kid.update(fake_images, real=False)
    torch.manual_seed(7)
    expected_mean, _ = kid.compute()
    mean, _ = kid_from_features(
        extract(extractor, real_images), extract(extractor, fake_images), subsets=5, subset_size=20, seed=7
    )
    assert mean == pytest.approx(float(expected_mean), rel=1e-4)


def test_domain_features_accept_any_size_and_channel_count() -> None:
    extractor = random_extractor()
    rgb = torch.randint(0, 255, (2, 3, 299, 299), dtype=torch.uint8)  # what torchmetrics probes with
    assert extractor(rgb).shape == (2, 8)


@pytest.fixture(scope="module")
def image_models(tiny_features: Path, tmp_path_factory: pytest.TempPathFactory, real_params: dict[str, Any]) -> Path:
    from tests.conftest import shrink

    tiny = shrink(real_params)
    root = tmp_path_factory.mktemp("image-models")
    net_cfg = train_feature_net.TrainFeatureNetConfig.from_params(section(tiny, "train_feature_net"))
    summary = train_feature_net.train_feature_net(
        net_cfg, tiny_features / "images", root / "feature_net", root / "reference", root / "ckpt_net", root / "net.json"
    )
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    train_image.train_image(image_config(tiny), tiny_features / "images", root / "image", root / "ckpt_image")
    return root


def test_feature_net_stage_caches_reference_features_of_the_real_images(image_models: Path, tiny_features: Path) -> None:
    test = load_file(str(tiny_features / "images" / "test.safetensors"))
    reference = load_reference(image_models / "reference" / "test.safetensors")
    assert reference.shape == (len(test["labels"]), 8) and reference.dtype == torch.float64
    train = load_file(str(tiny_features / "images" / "train.safetensors"))
    floor = load_reference(image_models / "reference" / "train.safetensors")
    assert len(floor) == int((train["augmented"] == 0).sum()) < len(train["labels"])  # real images only
    assert json.loads((image_models / "net.json").read_text())["test_images"] == len(test["labels"])
    assert no_pickles(image_models / "feature_net")


def test_evaluate_image_writes_the_documented_metrics(
    image_models: Path, tiny_features: Path, tiny_params: dict[str, Any], tmp_path: Path
) -> None:
    raw = section(tiny_params, "evaluate_image")
    raw.update(inception=True, inception_weights=str(tmp_path / "missing-inception.pth"))
    cfg = evaluate_image.EvaluateImageConfig.from_params(raw)
    metrics = evaluate_image.evaluate_image(
        cfg, image_models / "image", image_models / "feature_net", image_models / "reference", tiny_features / "images",
        tmp_path / "image.json", tmp_path / "eval",
    )  # fmt: skip
    assert {"fid_domain", "kid_domain", "fid_domain_floor", "feature_net_accuracy"} <= set(metrics)
    assert metrics["generated_images"] == 60 and metrics["fid_domain"] >= 0
    assert "fid_inception" not in metrics and "does not exist" in metrics["fid_inception_status"]
    assert json.loads((tmp_path / "image.json").read_text()) == metrics
    assert (tmp_path / "eval" / "samples.png").is_file()


def test_evaluate_image_scores_a_diffusion_model_with_the_gans_keys_and_fid_by_steps(
    image_models: Path, tiny_features: Path, tiny_params: dict[str, Any], tmp_path: Path
) -> None:
    from components import train_diffusion

    raw = section(tiny_params, "train_diffusion")
    train_diffusion.train_diffusion(
        train_diffusion.TrainDiffusionConfig.from_params(raw), tiny_features / "images", tmp_path / "diffusion", tmp_path / "ckpt"
    )
    cfg = evaluate_image.EvaluateImageConfig.from_params(section(tiny_params, "evaluate_image"))  # steps [2, 3]; model: 3
    run = lambda model, name: evaluate_image.evaluate_image(  # noqa: E731
        cfg, model, image_models / "feature_net", image_models / "reference", tiny_features / "images",
        tmp_path / f"{name}.json", tmp_path / name,
    )  # fmt: skip
    gan, diffusion = run(image_models / "image", "gan"), run(tmp_path / "diffusion", "diffusion")
    assert set(gan) < set(diffusion)  # one `dvc exp show` lists both
    assert set(diffusion) - set(gan) == {"sampling_steps", "fid_domain_steps_2", "fid_domain_steps_3"}
    assert diffusion["sampling_steps"] == 3 and diffusion["generated_images"] == 60
    rows = (tmp_path / "diffusion" / "fid_by_steps.csv").read_text().splitlines()
    assert rows[0] == "sampling_steps,fid_domain" and [r.split(",")[0] for r in rows[1:]] == ["2", "3"]
    assert not (tmp_path / "gan" / "fid_by_steps.csv").exists()
    timing = json.loads((tmp_path / "diffusion" / "timing.json").read_text())
    assert timing["generator"] == "diffusion" and timing["ms_per_image"] > 0 and "ms_per_image_steps_2" in timing
    assert run(tmp_path / "diffusion", "again") == diffusion  # seeded: the same numbers every time


# --- restoration ----------------------------------------------------------------------------------------


def test_psnr_and_luma_match_hand_computed_values() -> None:
    clean = torch.zeros(1, 3, 16, 16)
    off_by_a_tenth = torch.full((1, 3, 16, 16), 0.1)  # MSE 0.01 -> 10·log10(1/0.01) = 20 dB
    scores = restoration_scores(off_by_a_tenth, clean, border=2)
    assert scores["psnr"] == pytest.approx(20.0, abs=1e-5)  # 0.1 is not exact in float32
    # Y of a uniform 0.1 grey vs black: (65.481 + 128.553 + 24.966)·0.1/255 = 0.085882 -> 21.32 dB
    assert scores["psnr_y"] == pytest.approx(-20 * math.log10(219.0 * 0.1 / 255.0), abs=1e-5)
    assert luma(torch.ones(1, 3, 1, 1)).item() == pytest.approx(235 / 255)
    assert scores["ssim"] < restoration_scores(clean, clean, border=2)["ssim"] == pytest.approx(1.0)


def smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Random sums of low-frequency sinusoids in [0, 1]: images bicubic cannot get exactly right."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    out = torch.zeros(n, 3, size, size)
    for _ in range(4):
        freq = torch.rand(n, 3, 2, 1, 1, generator=generator) * 0.5
        phase = torch.rand(n, 3, 1, 1, generator=generator) * 6.28
        out += torch.sin(freq[:, :, 0] * xs + freq[:, :, 1] * ys + phase)
    return (out / 8 + 0.5).clamp(0, 1)


def test_restorer_beats_bicubic_on_smooth_images_after_a_few_hundred_steps(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    cfg = restore_config(tiny_params, max_steps=300, lr=3e-3, batch_size=8)
    model_cfg = RestoreConfig("super_resolution", 2, 0.0, 3, width=16, blocks=2)
    train_images = smooth_images(64, 32, seed=0)

    def batch_fn(step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        clean = train_images[torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(step))]
        return {"degraded": degrade(clean, model_cfg), "clean": clean}

    torch.manual_seed(0)
    model = Restorer(model_cfg)
    fit(
        model,
        batch_fn,
        train_restore.restore_loss,
        cfg.train,
        setup_runtime(cfg.train.device, cfg.train.precision),
        tmp_path / "ckpt",
        "smooth",
    )
    held_out = smooth_images(4, 64, seed=1)
    degraded = degrade(held_out, model_cfg)
    with torch.no_grad():
        ours = restoration_scores(model(degraded), held_out, border=2)["psnr"]
    bicubic = restoration_scores(baseline(degraded, model_cfg), held_out, border=2)["psnr"]
    assert ours > bicubic + 1.0, (ours, bicubic)


def test_restore_stage_trains_saves_and_evaluates(tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path) -> None:
    train_restore.train_restore(restore_config(tiny_params), tiny_features / "restore", tmp_path / "model", tmp_path / "ckpt")
    assert no_pickles(tmp_path / "model") and load_restorer(tmp_path / "model").cfg.scale == 2
    cfg = evaluate_restore.EvaluateRestoreConfig.from_params(section(tiny_params, "evaluate_restore"))
    metrics = evaluate_restore.evaluate_restore(
        cfg, tmp_path / "model", tiny_features / "restore", tmp_path / "restore.json", tmp_path / "eval"
    )
    expected = {"psnr", "ssim", "psnr_y", "psnr_baseline", "ssim_baseline", "psnr_y_baseline", "task"}
    assert expected <= set(metrics) and metrics["task"] == "super_resolution"
    assert (tmp_path / "eval" / "comparison.png").is_file()
    assert len(json.loads((tmp_path / "eval" / "per_image.json").read_text())) == metrics["images"]


def test_denoising_degrades_with_the_configured_noise(tiny_params: dict[str, Any]) -> None:
    model_cfg = RestoreConfig.from_params(dict(tiny_params["train_restore"]["model"], task="denoise", noise_sigma=25), "m")
    clean = torch.full((1, 3, 64, 64), 0.5)
    noisy = degrade(clean, model_cfg, torch.Generator().manual_seed(0))
    assert model_cfg.scale == 1 and (noisy - clean).std().item() == pytest.approx(25 / 255, rel=0.05)
    assert Restorer(model_cfg)(noisy).shape == clean.shape


def test_restore_params_are_checked_with_the_key_named(tiny_params: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"'train_restore.model.scale'"):
        restore_config(tiny_params, model=dict(tiny_params["train_restore"]["model"], scale=5))
    with pytest.raises(ConfigError, match=r"'train_restore.crop_size' \(15\) must be a multiple"):
        restore_config(tiny_params, crop_size=15)


def test_restorer_corrupt_newest_checkpoint_falls_back(
    tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = restore_config(tiny_params)
    features = tiny_features / "restore"
    train_restore.train_restore(cfg, features, tmp_path / "model", tmp_path / "ckpt", stop_after=10)
    (run_dir,) = [p for p in (tmp_path / "ckpt").iterdir() if p.is_dir()]  # beside it: the trainer's lock file
    (run_dir / "step-00000010.ckpt").write_bytes(b"\x00" * 64)
    with caplog.at_level(logging.WARNING):
        result = train_restore.train_restore(cfg, features, tmp_path / "model", tmp_path / "ckpt")
    assert result.resumed_from == 5 and result.steps == 10
    assert "step-00000010.ckpt is unreadable" in caplog.text
    assert (run_dir / "step-00000010.ckpt.corrupt").stat().st_size == 64


def test_phases_need_distinct_names(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    cfg = TrainConfig.from_params(section(tiny_params, "train_restore"), "train_restore", 0)
    phase = Phase("same", lambda model, batch: model(batch["x"]).sum())
    with pytest.raises(ValueError, match="distinct names"):
        fit(
            torch.nn.Linear(2, 1),
            lambda *a: {"x": torch.ones(1, 2)},
            [phase, phase],
            cfg,
            setup_runtime(cfg.device, cfg.precision),
            tmp_path,
            "x",
        )
