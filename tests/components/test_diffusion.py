"""The diffusion family on tiny CPU configurations: training through the shared loop, resume, seeded sampling,
conditioning that is learnt, and the params checks. Its evaluation is in test_images.py (shared fixtures)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from components import train_diffusion
from components.common import ConfigError
from components.diffusion_model import ConditionalDiffusion, DiffusionConfig, class_noise, generate, sampling_unet
from components.image_generators import load_image_generator
from components.model_io import PICKLE_SUFFIXES
from tests.conftest import section


def diffusion_config(params: dict[str, Any], model: dict[str, Any] | None = None, **overrides: Any) -> Any:
    raw = section(params, "train_diffusion")
    raw.update(overrides)
    if model:
        raw["model"] = {**raw["model"], **model}
    return train_diffusion.TrainDiffusionConfig.from_params(raw)


def model_config(params: dict[str, Any], size: int, channels: int, classes: int, **model: Any) -> DiffusionConfig:
    return DiffusionConfig.from_params({**params["train_diffusion"]["model"], **model}, "m", size, channels, classes)


def write_split(folder: Path, images: torch.Tensor, labels: torch.Tensor, names: list[str]) -> Path:
    """A features/images folder as the features stage writes it, for data no demo generator made."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"meta": json.dumps({"label_names": names})}
    save_file({"images": images.contiguous(), "labels": labels.contiguous()}, str(folder / "train.safetensors"), meta)
    return folder


def test_tiny_diffusion_trains_saves_safetensors_and_writes_grids(
    tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path
) -> None:
    cfg = diffusion_config(tiny_params)
    result = train_diffusion.train_diffusion(
        cfg, tiny_features / "images", tmp_path / "model", tmp_path / "ckpt", tmp_path / "live", tmp_path / "grids"
    )
    assert result.steps == 6 and math.isfinite(result.final_loss)
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == ["step-00000003.png", "step-00000006.png"]
    assert (tmp_path / "live" / "plots" / "metrics" / "train" / "loss.tsv").is_file()
    assert {p.name for p in (tmp_path / "model").iterdir()} == {"model.safetensors", "config.json", "training.json"}
    assert not [p for p in (tmp_path / "model").rglob("*") if p.suffix in PICKLE_SUFFIXES]
    generator = load_image_generator(tmp_path / "model")
    assert generator.kind == "diffusion" and generator.label_names == [str(i) for i in range(10)]
    noise, labels = generator.class_noise(1, seed=0, classes=[0, 9])
    assert generator.generate(noise, labels).shape == (2, 1, 16, 16)


def test_diffusion_kill_and_resume_ends_bit_identical(tiny_params: dict[str, Any], tiny_features: Path, tmp_path: Path) -> None:
    # The optimiser, its schedule and the EMA UNet (with its update count) have to come back from the checkpoint.
    cfg = diffusion_config(tiny_params)
    features = tiny_features / "images"
    train_diffusion.train_diffusion(cfg, features, tmp_path / "straight", tmp_path / "ckpt_straight")
    interrupted = train_diffusion.train_diffusion(cfg, features, tmp_path / "resumed", tmp_path / "ckpt", stop_after=3)
    assert interrupted.steps == 3 and not (tmp_path / "resumed" / "model.safetensors").exists()
    assert train_diffusion.train_diffusion(cfg, features, tmp_path / "resumed", tmp_path / "ckpt").resumed_from == 3
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    again = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)


@pytest.mark.parametrize("sampler", ["dpm_solver", "ddim"])
@pytest.mark.parametrize(("size", "channels"), [(8, 3), (16, 1)], ids=["rgb8", "grey16"])
def test_samples_depend_only_on_their_own_noise_and_label(
    tiny_params: dict[str, Any], sampler: str, size: int, channels: int
) -> None:
    torch.manual_seed(0)
    cfg = model_config(tiny_params, size, channels, 3, sampler=sampler, label_dropout=0.1, guidance_scale=2.0)
    unet = sampling_unet(ConditionalDiffusion(cfg))
    noise, labels = class_noise(cfg, 2, seed=5)
    together = generate(unet, cfg, noise, labels, batch_size=6)
    one_by_one = torch.cat([generate(unet, cfg, noise[i : i + 1], labels[i : i + 1], batch_size=1) for i in range(6)])
    assert together.shape == (6, channels, size, size) and together.dtype == torch.uint8
    assert torch.equal(together, one_by_one)
    assert torch.equal(together, generate(unet, cfg, *class_noise(cfg, 2, seed=5), batch_size=4))
    assert not torch.equal(together, generate(unet, cfg, *class_noise(cfg, 2, seed=6)))
    assert not torch.equal(together, generate(unet, cfg, noise, labels, guidance_scale=1.0))


def test_the_class_label_is_learnt(tiny_params: dict[str, Any], tmp_path: Path) -> None:
    # Two classes that differ only in brightness (dark and light, 8×8 RGB with texture): after a short run the
    # samples asked for the light class are lighter, so the class embedding reaches the denoiser.
    generator = torch.Generator().manual_seed(0)
    dark = torch.randint(0, 70, (64, 3, 8, 8), generator=generator, dtype=torch.uint8)
    light = torch.randint(185, 256, (64, 3, 8, 8), generator=generator, dtype=torch.uint8)
    images, labels = torch.cat([dark, light]), torch.tensor([0] * 64 + [1] * 64)
    features = write_split(tmp_path / "features", images, labels, ["dark", "light"])
    cfg = diffusion_config(
        tiny_params, model={"block_channels": [16, 16], "sampling_steps": 10}, max_steps=150, batch_size=16, lr=3e-3,
        warmup_steps=10, checkpoint_every=150, log_every=50, sample_every=150,
    )  # fmt: skip
    train_diffusion.train_diffusion(cfg, features, tmp_path / "model", tmp_path / "ckpt")
    model = load_image_generator(tmp_path / "model")
    noise, asked = model.class_noise(16, seed=1)
    samples = model.generate(noise, asked).float()
    dark_mean, light_mean = samples[asked == 0].mean().item(), samples[asked == 1].mean().item()
    assert light_mean - dark_mean > 60, (dark_mean, light_mean)


def test_diffusion_params_are_checked_with_the_key_named(tiny_params: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"'train_diffusion.model.sampler' must be one of"):
        diffusion_config(tiny_params, model={"sampler": "euler"})
    with pytest.raises(ConfigError, match=r"'train_diffusion.model.block_channels'.*multiple of norm_groups"):
        diffusion_config(tiny_params, model={"block_channels": [8, 10]})
    with pytest.raises(ConfigError, match=r"'train_diffusion.model.guidance_scale'.*label_dropout"):
        diffusion_config(tiny_params, model={"guidance_scale": 3.0, "label_dropout": 0.0})
    with pytest.raises(ConfigError, match=r"'train_diffusion.model.sampling_steps'.*exceeds"):
        diffusion_config(tiny_params, model={"sampling_steps": 60})
    with pytest.raises(ConfigError, match=r"sample size 10 cannot be halved 2 times"):
        model_config(tiny_params, 10, 1, 2, block_channels=[8, 8, 8], sample_size=None)
    with pytest.raises(ConfigError, match=r"sample size 6 cannot be halved 2 times.*'train_diffusion.model.sample_size'"):
        diffusion_config(tiny_params, model={"block_channels": [8, 8, 8], "sample_size": 6})
    with pytest.raises(ConfigError, match=r"'train_diffusion.model.sample_size' must be an integer"):
        diffusion_config(tiny_params, model={"sample_size": 2})


def test_an_image_generator_folder_of_another_family_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"family": "restorer"}')
    save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    with pytest.raises(ConfigError, match="holds a 'restorer' model, not an image generator"):
        load_image_generator(folder)
