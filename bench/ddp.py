"""DDP scaling of the shared training loop: tokens/s of one GPT-style model on 1 process and on N, in one run.

    python bench/ddp.py                       # CPU: 1 vs 2 processes (gloo); CUDA: 1 GPU vs every visible GPU
    python bench/ddp.py --procs 1 4 8 --layers 12 --embd 768 --seq 1024 --batch 8

Each configuration runs `components.training.fit` (the loop every training stage uses: DDP, fused AdamW,
autocast, gradient clipping) in workers started by the stages' own launcher (`components.launch`), with the
same per-process batch (weak scaling: N processes train on N times the tokens per step). Timing starts after
`--warmup` steps. On CPU the machine's cores are split between the processes, so 1 vs 2 compares threads
against processes on the same cores. Prints JSON: tokens/s per process count, the speed-up over one process
and the scaling efficiency (speed-up / N). Needs only torch and transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components.launch import Launch, launch_workers  # noqa: E402
from components.runtime import setup_runtime, teardown_runtime  # noqa: E402
from components.training import TrainConfig, fit, hash_seed  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--procs", type=int, nargs="+", default=None, help="process counts (default: 1 and 2, or every GPU)")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--embd", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--batch", type=int, default=None, help="sequences per process and step")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=None, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--worker-out", type=Path, default=None, help=argparse.SUPPRESS)  # set for the launched workers
    return parser.parse_args(argv)


def defaults(args: argparse.Namespace, cuda: bool) -> argparse.Namespace:
    """GPT-2 124M on CUDA, a small model on CPU, unless given."""
    sizes = {"layers": 12, "embd": 768, "heads": 12, "seq": 1024, "batch": 8, "steps": 30} if cuda else {
        "layers": 2, "embd": 128, "heads": 4, "seq": 128, "batch": 16, "steps": 30}  # fmt: skip
    for key, value in sizes.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def worker(args: argparse.Namespace) -> None:
    """One DDP rank: train for warmup + steps; rank 0 writes tokens/s of the timed steps."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cuda = torch.cuda.is_available()
    threads = None if cuda else max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    runtime = setup_runtime("auto", "auto", threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.embd, n_layer=args.layers, n_head=args.heads,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    )  # fmt: skip
    total = args.warmup + args.steps
    cfg = TrainConfig(
        max_steps=total, batch_size=args.batch, grad_accum_steps=1, lr=3e-4, min_lr_ratio=0.1, warmup_steps=0,
        weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0, device="auto", precision="auto", compile=False,
        checkpoint_every=10**9, keep_checkpoints=1, resume="never", log_every=10**9, seed=0, cpu_threads=threads,
    )  # fmt: skip

    def batch(step: int, micro: int, rank: int, world: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(hash_seed(0, step, micro, rank))
        tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
        return {"input_ids": tokens, "labels": tokens}

    marks: dict[int, float] = {}

    def mark(_: torch.nn.Module, done: int) -> None:
        if done in (args.warmup, total):
            if runtime.device.type == "cuda":
                torch.cuda.synchronize()
            marks[done] = time.perf_counter()

    with tempfile.TemporaryDirectory() as scratch:
        fit(model, batch, lambda m, b: m(**b).loss, cfg, runtime, Path(scratch), "bench-ddp", after_step=mark)
    if runtime.is_main:
        seconds = marks[total] - marks[args.warmup]
        tokens = args.steps * args.batch * args.seq * runtime.world_size
        result = {"tokens_per_s": round(tokens / seconds, 1), "seconds": round(seconds, 3), "device": str(runtime.device),
                  "threads_per_process": threads}  # fmt: skip
        args.worker_out.write_text(json.dumps(result), encoding="utf-8")
    teardown_runtime(runtime)


def run(args: argparse.Namespace, procs: int, out: Path) -> dict[str, float]:
    forwarded = ["--layers", str(args.layers), "--embd", str(args.embd), "--heads", str(args.heads), "--seq", str(args.seq),
                 "--batch", str(args.batch), "--vocab", str(args.vocab), "--steps", str(args.steps),
                 "--warmup", str(args.warmup), "--worker-out", str(out)]  # fmt: skip
    launch_workers(Launch(nproc_per_node=procs), "bench-ddp", forwarded, module="bench.ddp")
    return json.loads(out.read_text(encoding="utf-8"))


def main() -> None:
    args = parse_args()
    if args.worker_out is not None:
        worker(args)
        return
    cuda = torch.cuda.is_available()
    args = defaults(args, cuda)
    procs = args.procs or ([1, torch.cuda.device_count()] if cuda and torch.cuda.device_count() > 1 else [1, 2])
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.chdir(REPO)  # the workers run `python -m bench.ddp`
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for count in procs:
            results[count] = run(args, count, Path(scratch) / f"{count}.json")
    first = results[procs[0]]["tokens_per_s"]
    report = {
        "model": {"layers": args.layers, "embd": args.embd, "seq": args.seq, "batch_per_process": args.batch},
        "device": results[procs[0]]["device"],
        "tokens_per_s": {str(n): r["tokens_per_s"] for n, r in results.items()},
        "threads_per_process": {str(n): r["threads_per_process"] for n, r in results.items()},
        "speedup": {str(n): round(r["tokens_per_s"] / first, 3) for n, r in results.items()},
        "scaling_efficiency": {str(n): round(r["tokens_per_s"] / first * procs[0] / n, 3) for n, r in results.items()},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
