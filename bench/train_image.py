"""Training throughput of the image families: eager fp32 vs the project's tuned path, in one run.

    python bench/train_image.py                    # both families, sizes for the device found
    python bench/train_image.py --family gan --gan-batch 512 --steps 50

Each step is what the shared loop does for the family: the GAN's discriminator phase then generator phase
(two Adams) and the EMA update; the restorer's single L1 phase. Tuned = bf16 autocast (CUDA only) +
torch.compile + fused Adam (CUDA), i.e. `precision: auto, compile: true`. Prints JSON: images/s for both and
the ratio. Compilation and warm-up steps are not timed. Needs only torch and safetensors.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.gan_model import ConditionalGAN, GANConfig  # noqa: E402
from components.restore_model import RestoreConfig, Restorer, degrade  # noqa: E402
from components.train_image import PHASES  # noqa: E402
from components.train_restore import restore_loss  # noqa: E402
from components.training import Phase, TrainConfig, make_optimizer  # noqa: E402


def train_config(device: torch.device, tuned: bool, betas: tuple[float, float]) -> TrainConfig:
    return TrainConfig(
        max_steps=10**9, batch_size=1, grad_accum_steps=1, lr=2e-4, min_lr_ratio=1.0, warmup_steps=0,
        weight_decay=0.0, betas=betas, grad_clip=0.0, device=device.type,
        precision="bf16" if tuned and device.type == "cuda" else "fp32", compile=tuned,
        checkpoint_every=10**9, keep_checkpoints=1, resume="never", log_every=10**9, seed=0,
    )  # fmt: skip


def measure(
    model: torch.nn.Module,
    phases: list[Phase],
    batch: dict[str, torch.Tensor],
    images: int,
    args: argparse.Namespace,
    tuned: bool,
) -> dict[str, Any]:
    device = torch.device(args.device)
    model.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    cfg = train_config(device, tuned, (0.5, 0.999))
    optimizers = [make_optimizer(model, cfg, device, p.parameters(model) if p.parameters else None) for p in phases]
    if not tuned:  # plain torch.optim defaults: foreach kernels, no fusion
        optimizers = [
            torch.optim.Adam([q for g in o.param_groups for q in g["params"]], lr=2e-4, betas=(0.5, 0.999)) for o in optimizers
        ]
    step_model = torch.compile(model) if tuned else model
    autocast = tuned and device.type == "cuda"

    def step(done: int) -> None:
        for phase, optimizer in zip(phases, optimizers, strict=True):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = phase.loss(step_model, batch)
            loss.backward()
            optimizer.step()
        if hasattr(model, "update_ema"):
            model.update_ema(done)

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(args.steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"images_per_s": round(args.steps * images / seconds, 1), "seconds": round(seconds, 3)}


def gan_case(args: argparse.Namespace) -> tuple[Any, list[Phase], dict[str, torch.Tensor], int]:
    cfg = GANConfig(32, 1, 10, 64, 32, args.gan_width, args.gan_width, "nonsaturating", 0.999)
    torch.manual_seed(0)
    b = args.gan_batch
    batch = {
        "images": torch.rand(b, 1, 32, 32) * 2 - 1,
        "labels": torch.randint(0, 10, (b,)),
        "fake_labels": torch.randint(0, 10, (b,)),
        "z_discriminator": torch.randn(b, 64),
        "z_generator": torch.randn(b, 64),
    }
    return lambda: ConditionalGAN(cfg), PHASES, batch, b


def restore_case(args: argparse.Namespace) -> tuple[Any, list[Phase], dict[str, torch.Tensor], int]:
    cfg = RestoreConfig("super_resolution", 2, 0.0, 3, args.restore_width, args.restore_blocks)
    torch.manual_seed(0)
    clean = torch.rand(args.restore_batch, 3, args.crop, args.crop)
    return (
        lambda: Restorer(cfg),
        [Phase("model", restore_loss)],
        {"degraded": degrade(clean, cfg), "clean": clean},
        args.restore_batch,
    )


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=["gan", "restore", "both"], default="both")
    parser.add_argument("--gan-batch", type=int, default=512 if cuda else 64)
    parser.add_argument("--gan-width", type=int, default=64 if cuda else 32)
    parser.add_argument("--restore-batch", type=int, default=64 if cuda else 16)
    parser.add_argument("--restore-width", type=int, default=64 if cuda else 32)
    parser.add_argument("--restore-blocks", type=int, default=8 if cuda else 4)
    parser.add_argument("--crop", type=int, default=96 if cuda else 64)
    parser.add_argument("--steps", type=int, default=50 if cuda else 10)
    parser.add_argument("--warmup", type=int, default=10 if cuda else 3)
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    args = parser.parse_args()
    families = ["gan", "restore"] if args.family == "both" else [args.family]
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "config": vars(args),
    }
    for family in families:
        build, phases, batch, images = (gan_case if family == "gan" else restore_case)(args)
        eager = measure(build(), phases, batch, images, args, tuned=False)
        tuned = measure(build(), phases, batch, images, args, tuned=True)
        results[family] = {
            "eager_fp32": eager,
            "tuned": tuned,
            "speedup": round(tuned["images_per_s"] / eager["images_per_s"], 2),
        }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
