"""Run under torchrun by test_train_text: each rank trains a tiny model with components.training.fit (gloo)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from components.training import TrainConfig, fit, hash_seed, setup_runtime, teardown_runtime, unwrap


def main(out: Path) -> None:
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
    runtime = setup_runtime(cfg)
    torch.manual_seed(cfg.seed)
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


if __name__ == "__main__":
    main(Path(sys.argv[1]))
