"""The diffusion family: a class-conditional denoising UNet (diffusers' `UNet2DModel`), trained with the DDPM
objective and sampled with DPM-Solver++ or DDIM in a few steps.

Training (Ho et al., 2020): noise a real image to a random timestep with `DDPMScheduler.add_noise` and
regress the noise (or v, `prediction_type`). Labels enter through the UNet's class embedding; one extra
embedding is the "no class" label, given instead of the real one with probability `label_dropout`, so the
same network also predicts unconditionally and sampling can apply classifier-free guidance (Ho & Salimans,
2022) with `guidance_scale` > 1 (two UNet passes a step) or skip it at 1. The UNet's weights are also kept
as an exponential moving average (`torch.optim.swa_utils.AveragedModel`), which is what gets saved and
sampled.

Sampling is deterministic for a given seed: the starting noise comes from it, and both samplers take no
further random draws (DDIM with eta 0; DPM-Solver++ is an ODE solver). Pixels are in [-1, 1] inside the
model; `to_uint8` / `from_uint8` convert at the edges (the GAN's, so both generators see the same pixels).

diffusers is imported when a model is built, so importing this module needs only torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from components.common import ConfigError, require
from components.gan_model import from_uint8, to_uint8

FAMILY = "conditional-diffusion"
SAMPLERS = ("dpm_solver", "ddim")
PREDICTIONS = ("epsilon", "v_prediction")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class DiffusionConfig:
    image_size: int  # the data's: what `generate` returns
    channels: int
    num_classes: int
    sample_size: int  # the UNet's resolution: training images are resized to it, samples back from it
    block_channels: tuple[int, ...]  # UNet widths, one per resolution (each but the last halves it)
    layers_per_block: int
    attention: bool  # self-attention in the lowest-resolution blocks
    norm_groups: int
    train_timesteps: int
    beta_schedule: str
    prediction_type: str
    label_dropout: float  # share of training labels replaced by the "no class" label, for guidance
    ema_decay: float
    sampler: str
    sampling_steps: int
    guidance_scale: float  # 1: plain conditional sampling, one UNet pass a step

    @classmethod
    def from_params(
        cls, section: dict[str, Any], prefix: str, image_size: int, channels: int, num_classes: int
    ) -> DiffusionConfig:
        widths = require(section, "block_channels", list, prefix)
        groups = require(section, "norm_groups", int, prefix, low=1, high=1024)
        if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w >= 1 for w in widths):
            raise ConfigError(f"params key '{prefix}.block_channels' must be a list of positive integers, got {widths!r}")
        if any(w % groups for w in widths):
            raise ConfigError(
                f"params key '{prefix}.block_channels' {widths}: every width must be a multiple of norm_groups ({groups})"
            )
        sample_size = section.get("sample_size")
        if sample_size is not None and (not isinstance(sample_size, int) or isinstance(sample_size, bool) or sample_size < 4):
            raise ConfigError(
                f"params key '{prefix}.sample_size' must be an integer ≥ 4 or null (the data's size), got {sample_size!r}"
            )
        cfg = cls(
            image_size=image_size,
            channels=channels,
            num_classes=num_classes,
            sample_size=min(sample_size or image_size, image_size),
            block_channels=tuple(widths),
            layers_per_block=require(section, "layers_per_block", int, prefix, low=1, high=16),
            attention=require(section, "attention", bool, prefix),
            norm_groups=groups,
            train_timesteps=require(section, "train_timesteps", int, prefix, low=2, high=100_000),
            beta_schedule=require(section, "beta_schedule", str, prefix),
            prediction_type=require(section, "prediction_type", str, prefix),
            label_dropout=float(require(section, "label_dropout", (int, float), prefix, low=0, high=1)),
            ema_decay=float(require(section, "ema_decay", (int, float), prefix, low=0, high=1)),
            sampler=require(section, "sampler", str, prefix),
            sampling_steps=require(section, "sampling_steps", int, prefix, low=1, high=10_000),
            guidance_scale=float(require(section, "guidance_scale", (int, float), prefix, low=0, high=100)),
        )
        for key, allowed in (("sampler", SAMPLERS), ("prediction_type", PREDICTIONS), ("beta_schedule", BETA_SCHEDULES)):
            if getattr(cfg, key) not in allowed:
                raise ConfigError(f"params key '{prefix}.{key}' must be one of {list(allowed)}, got {getattr(cfg, key)!r}")
        if cfg.sampling_steps > cfg.train_timesteps:
            raise ConfigError(
                f"params key '{prefix}.sampling_steps' ({cfg.sampling_steps}) exceeds train_timesteps ({cfg.train_timesteps})"
            )
        if cfg.guidance_scale != 1 and cfg.label_dropout == 0:
            raise ConfigError(
                f"params key '{prefix}.guidance_scale' is {cfg.guidance_scale} but label_dropout is 0: guidance needs the "
                "unconditional prediction that label dropout trains; set label_dropout (e.g. 0.1) or guidance_scale: 1"
            )
        downsamplings = len(cfg.block_channels) - 1
        if cfg.sample_size % 2**downsamplings:
            raise ConfigError(
                f"sample size {cfg.sample_size} cannot be halved {downsamplings} times: use fewer "
                f"'{prefix}.block_channels' or another '{prefix}.sample_size' (null: the image size, {image_size})"
            )
        return cfg

    def to_json(self) -> dict[str, Any]:
        return {"family": FAMILY, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DiffusionConfig:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**{**fields, "block_channels": tuple(fields["block_channels"])})

    @property
    def null_label(self) -> int:
        """The class-embedding index that means "no class" (classifier-free guidance's unconditional input)."""
        return self.num_classes


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError:
        raise ConfigError("the diffusion family needs diffusers: pip install diffusers==0.42.1") from None
    return diffusers


def build_unet(cfg: DiffusionConfig) -> nn.Module:
    UNet2DModel = _diffusers().UNet2DModel  # noqa: N806

    levels = len(cfg.block_channels)
    attended = lambda i: cfg.attention and i == levels - 1  # noqa: E731  (attention only where maps are smallest)
    return UNet2DModel(
        sample_size=cfg.sample_size,
        in_channels=cfg.channels,
        out_channels=cfg.channels,
        block_out_channels=cfg.block_channels,
        layers_per_block=cfg.layers_per_block,
        down_block_types=tuple("AttnDownBlock2D" if attended(i) else "DownBlock2D" for i in range(levels)),
        up_block_types=tuple("AttnUpBlock2D" if attended(levels - 1 - i) else "UpBlock2D" for i in range(levels)),
        add_attention=cfg.attention,
        norm_num_groups=cfg.norm_groups,
        attention_head_dim=min(cfg.block_channels[-1], 32),
        num_class_embeds=cfg.num_classes + 1,  # + the "no class" label
        num_train_timesteps=cfg.train_timesteps,
    )


def noise_scheduler(cfg: DiffusionConfig) -> Any:
    return _diffusers().DDPMScheduler(
        num_train_timesteps=cfg.train_timesteps, beta_schedule=cfg.beta_schedule, prediction_type=cfg.prediction_type
    )


def sampling_scheduler(cfg: DiffusionConfig) -> Any:
    """The few-step sampler over the training noise schedule (its config comes from the DDPM scheduler's).

    "trailing" spacing: the first step is the last training timestep, where the starting noise is pure noise
    (the DDPM default, "leading", starts below it, at 950 of 1000 for 25 steps, and at 0 for as many steps as
    training timesteps)."""
    diffusers = _diffusers()
    config = noise_scheduler(cfg).config
    if cfg.sampler == "ddim":
        return diffusers.DDIMScheduler.from_config(config, clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing")
    return diffusers.DPMSolverMultistepScheduler.from_config(
        config, algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing"
    )


class ConditionalDiffusion(nn.Module):
    """The UNet and its EMA in one module, so one state dict checkpoints both.

    `forward(batch)` returns the denoising loss: training goes through `forward` so that DDP sees it.
    """

    def __init__(self, cfg: DiffusionConfig) -> None:
        super().__init__()
        from torch.optim.swa_utils import AveragedModel

        self.cfg = cfg
        self.unet = build_unet(cfg)
        self.unet_ema = AveragedModel(self.unet, multi_avg_fn=ramped_ema(cfg.ema_decay), use_buffers=True)
        self.unet_ema.requires_grad_(False).eval()
        self.scheduler = noise_scheduler(cfg)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        clean = batch["images"]
        timesteps = batch["timesteps"].to(clean.device)
        noise = batch["noise"].to(clean.device, clean.dtype)
        noisy = self.scheduler.add_noise(clean, noise, timesteps)
        predicted = self.unet(noisy, timesteps, class_labels=batch["labels"]).sample
        target = noise if self.cfg.prediction_type == "epsilon" else self.scheduler.get_velocity(clean, noise, timesteps)
        return F.mse_loss(predicted.float(), target.float())

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        self.unet_ema.update_parameters(self.unet)


def ramped_ema(decay: float) -> Any:
    """AveragedModel's update with the decay ramped up over the first updates, min(decay, (1 + n) / (10 + n)),
    so the random initial weights fade in a short run too (the GAN's EMA does the same)."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = int(num_averaged)
        torch._foreach_lerp_(averaged, current, 1 - min(decay, (1 + n) / (10 + n)))

    return update


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float images (N, C, S, S) resized to (size, size), bilinear with antialiasing as the features stage does."""
    if images.shape[-1] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def training_batch(
    images: torch.Tensor, labels: torch.Tensor, cfg: DiffusionConfig, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """What `ConditionalDiffusion.forward` takes: real uint8 images (B, C, S, S) in [-1, 1], their labels (some
    dropped to the "no class" label), and the noise and timesteps drawn from `generator`."""
    size = len(labels)
    dropped = torch.rand(size, generator=generator) < cfg.label_dropout
    return {
        "images": resize(from_uint8(images), cfg.sample_size),
        "labels": torch.where(dropped, torch.full_like(labels, cfg.null_label), labels),
        "noise": torch.randn(size, cfg.channels, cfg.sample_size, cfg.sample_size, generator=generator),
        "timesteps": torch.randint(0, cfg.train_timesteps, (size,), generator=generator),
    }


def class_noise(
    cfg: DiffusionConfig, per_class: int, seed: int, classes: list[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed starting noise and labels for `per_class` samples of each class: the same seed gives the same images."""
    classes = list(range(cfg.num_classes)) if classes is None else classes
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(classes) * per_class, cfg.channels, cfg.sample_size, cfg.sample_size, generator=generator)
    return noise, torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class)


@torch.no_grad()
def generate(
    unet: nn.Module, cfg: DiffusionConfig, noise: torch.Tensor, labels: torch.Tensor, batch_size: int = 500,
    steps: int | None = None, guidance_scale: float | None = None,
) -> torch.Tensor:  # fmt: skip
    """uint8 images (N, C, S, S) denoised from `noise` (N, C, s, s: the sample size) for `labels`, in batches, on
    the UNet's device, resized to the image size.

    `steps` and `guidance_scale` default to the config's. Each image depends only on its own noise and label.
    """
    device = next(unet.parameters()).device
    steps = cfg.sampling_steps if steps is None else steps
    scale = cfg.guidance_scale if guidance_scale is None else guidance_scale
    was_training = unet.training
    unet.eval()
    out = []
    for i in range(0, len(noise), batch_size):
        scheduler = sampling_scheduler(cfg)  # multistep solvers keep state: one per batch
        scheduler.set_timesteps(steps)
        sample = noise[i : i + batch_size].to(device) * scheduler.init_noise_sigma
        batch_labels = labels[i : i + batch_size].to(device)
        if scale != 1:
            batch_labels = torch.cat([batch_labels, torch.full_like(batch_labels, cfg.null_label)])
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([sample, sample]) if scale != 1 else sample, t)
            predicted = unet(model_in, t, class_labels=batch_labels).sample
            if scale != 1:
                conditional, unconditional = predicted.chunk(2)
                predicted = unconditional + scale * (conditional - unconditional)
            sample = scheduler.step(predicted, t, sample).prev_sample
        out.append(to_uint8(resize(sample.clamp(-1, 1), cfg.image_size)).cpu())
    unet.train(was_training)
    size = cfg.image_size
    return torch.cat(out) if out else torch.zeros(0, cfg.channels, size, size, dtype=torch.uint8)


def sampling_unet(model: ConditionalDiffusion) -> nn.Module:
    """The EMA UNet, the one that is saved and sampled."""
    return model.unet_ema.module


def save_diffusion(model: ConditionalDiffusion, label_names: list[str], folder: Path) -> None:
    from components.model_io import save_model

    save_model(sampling_unet(model), {**model.cfg.to_json(), "label_names": label_names}, folder)


def load_diffusion(folder: Any, key: str = "diffusion model folder") -> tuple[nn.Module, DiffusionConfig, dict[str, Any]]:
    """The saved (EMA) UNet in eval mode, its config, and the config JSON, from a `models/diffusion` folder."""
    from components.model_io import load_model_files

    config, state = load_model_files(Path(folder), key, FAMILY)
    cfg = DiffusionConfig.from_json(config)
    unet = build_unet(cfg)
    unet.load_state_dict(state)
    return unet.eval(), cfg, config
