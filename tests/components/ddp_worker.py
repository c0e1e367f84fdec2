"""Run under torchrun by the DDP tests: each rank trains a tiny model with components.training.fit (gloo).

ddp_worker.py OUT            a two-layer regression net, one phase, gradient accumulation
ddp_worker.py OUT gan        the conditional GAN: two phases (discriminator, generator) and the EMA hook
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from components.runtime import Runtime, setup_runtime, teardown_runtime
from components.training import TrainConfig, fit, hash_seed, unwrap


def main(out: Path, family: str) -> None:
    cfg = TrainConfig(
        max_steps=5,
        batch_size=8,
        grad_accum_steps=2,
        lr=0.05,
        min_lr_ratio=0.1,
        warmup_steps=1,
        weight_decay=0.0,
        betas=(0.9, 0.95),
        grad_clip=1.0,
        device="cpu",
        precision="fp32",
        compile=False,
        checkpoint_every=100,
        keep_checkpoints=1,
        resume="never",
        log_every=1,
        seed=3,
    )
    runtime = setup_runtime(cfg.device, cfg.precision, cfg.cpu_threads)
    torch.manual_seed(cfg.seed)
    if family == "gan":
        train_gan(cfg, runtime, out)
        return
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    if runtime.is_main:
        torch.save(model.state_dict(), out / "initial.pt")

    def batch(step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(hash_seed(cfg.seed, step, micro, rank))
        x = torch.randn(cfg.batch_size, 4, generator=generator)  # each rank its own data
        return {"x": x, "y": x.sum(dim=1, keepdim=True)}

    def loss(m: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.mse_loss(m(b["x"]), b["y"])

    fit(model, batch, loss, cfg, runtime, out / "ckpt", "ddp-test")
    torch.save(unwrap(model).state_dict(), out / f"rank{runtime.rank}.pt")
    teardown_runtime(runtime)


def train_gan(cfg: TrainConfig, runtime: Runtime, out: Path) -> None:
    from components.gan_model import ConditionalGAN, GANConfig
    from components.train_image import PHASES

    model = ConditionalGAN(GANConfig(16, 1, 3, 8, 4, 8, 8, "nonsaturating", 0.9))
    # Parameters only: BatchNorm running statistics are per rank by design (DDP broadcasts rank 0's at each
    # forward, then every rank updates them with its own batch).
    if runtime.is_main:
        torch.save(dict(model.named_parameters()), out / "initial.pt")

    def batch(step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(hash_seed(cfg.seed, step, micro, rank))
        return {
            "images": torch.rand(4, 1, 16, 16, generator=generator) * 2 - 1,
            "labels": torch.randint(0, 3, (4,), generator=generator),
            "fake_labels": torch.randint(0, 3, (4,), generator=generator),
            "z_discriminator": torch.randn(4, 8, generator=generator),
            "z_generator": torch.randn(4, 8, generator=generator),
        }

    fit(model, batch, PHASES, cfg, runtime, out / "ckpt", "ddp-gan", after_step=lambda m, done: m.update_ema(done))
    torch.save({k: v.detach() for k, v in unwrap(model).named_parameters()}, out / f"rank{runtime.rank}.pt")
    teardown_runtime(runtime)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "mlp")
