"""Training throughput of the text model: eager fp32 vs the project's tuned path, in one run.

    python bench/train_text.py                          # GPT-2 124M on CUDA, a small model on CPU
    python bench/train_text.py --layers 12 --embd 768 --batch 16 --seq 1024 --steps 30

Tuned = bf16 autocast (CUDA) + torch.compile + fused AdamW (CUDA): the same settings `train_text` uses with
`precision: auto, compile: true`. Prints JSON: tokens/s for both, the ratio, and MFU on CUDA
(6 * parameters * tokens/s over the GPU's dense bf16 peak, `--peak-tflops`, 989 for an H100 SXM).
Needs only torch and transformers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from components.training import TrainConfig, make_optimizer  # noqa: E402


def build(layers: int, embd: int, heads: int, seq: int, vocab: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab,
            n_positions=seq,
            n_embd=embd,
            n_layer=layers,
            n_head=heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
    )


def measure(args: argparse.Namespace, device: torch.device, tuned: bool) -> dict[str, float]:
    torch.manual_seed(0)
    model = build(args.layers, args.embd, args.heads, args.seq, args.vocab).to(device)
    cfg = TrainConfig(
        max_steps=args.steps,
        batch_size=args.batch,
        grad_accum_steps=1,
        lr=3e-4,
        min_lr_ratio=0.1,
        warmup_steps=0,
        weight_decay=0.1,
        betas=(0.9, 0.95),
        grad_clip=1.0,
        device=device.type,
        precision="bf16" if tuned and device.type == "cuda" else "fp32",
        compile=tuned,
        checkpoint_every=10**9,
        keep_checkpoints=1,
        resume="never",
        log_every=10**9,
        seed=0,
    )
    optimizer = make_optimizer(model, cfg, device) if tuned else torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    step_model = torch.compile(model) if tuned else model
    autocast = tuned and device.type == "cuda"
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = step_model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()

    for _ in range(args.warmup):  # compilation and allocator warm-up are not timed
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    parameters = sum(p.numel() for p in model.parameters())
    tokens_per_s = args.steps * args.batch * args.seq / seconds
    result = {"tokens_per_s": round(tokens_per_s), "seconds": round(seconds, 3), "parameters": parameters}
    if device.type == "cuda":
        result["mfu"] = round(6 * parameters * tokens_per_s / (args.peak_tflops * 1e12), 4)
    return result


def main() -> None:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12 if cuda else 3)
    parser.add_argument("--embd", type=int, default=768 if cuda else 128)
    parser.add_argument("--heads", type=int, default=12 if cuda else 4)
    parser.add_argument("--seq", type=int, default=1024 if cuda else 128)
    parser.add_argument("--batch", type=int, default=16 if cuda else 32)
    parser.add_argument("--vocab", type=int, default=50304 if cuda else 1400)
    parser.add_argument("--steps", type=int, default=20 if cuda else 10)
    parser.add_argument("--warmup", type=int, default=5 if cuda else 2)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    device = torch.device("cuda" if cuda else "cpu")
    eager = measure(args, device, tuned=False)
    tuned = measure(args, device, tuned=True)
    print(
        json.dumps(
            {
                "device": torch.cuda.get_device_name() if cuda else "cpu",
                "torch": torch.__version__,
                "config": vars(args),
                "eager_fp32": eager,
                "tuned": tuned,
                "speedup": round(tuned["tokens_per_s"] / eager["tokens_per_s"], 2),
                "goal": {"speedup": 2.5, "mfu": 0.40},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
