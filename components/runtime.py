"""Where a stage computes: the device, the autocast dtype, a process's place in a torchrun job.

Training (`components.training`) and evaluation stages both import this; it knows nothing of the loop, so a
change to the training loop does not invalidate any evaluation. Only torch and the standard library.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from components.common import ConfigError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class Runtime:
    """Where this process trains: device, autocast dtype and its place in a torchrun job."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints."""
        return self.rank == 0

    @property
    def writes_outputs(self) -> bool:
        """The first process of each node: it writes the stage's outputs (model, curves) on its node, so that
        `dvc repro` on every node of a multi-node job finds them, with the same bytes everywhere."""
        return self.local_rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def wants_cuda(choice: str) -> bool:
    """`cuda`, `cpu` or `auto` (CUDA when present); asking for CUDA where there is none is a params error."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("params asks for device 'cuda' but no CUDA device is visible")
    return choice == "cuda" or (choice == "auto" and torch.cuda.is_available())


def device_from_params(section: dict[str, Any], prefix: str) -> str:
    """A stage's `device` key: one of `auto` (CUDA when present), `cpu`, `cuda`."""
    device = section.get("device")
    if device not in DEVICES:
        raise ConfigError(f"params key '{prefix}.device' must be one of {list(DEVICES)}, got {device!r}")
    return device


def cpu_threads_from_params(base: dict[str, Any]) -> int | None:
    """`base.cpu_threads`: a positive integer, or null for torch's default (every core)."""
    threads = base.get("cpu_threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ConfigError(f"params key 'base.cpu_threads' must be a positive integer or null, got {threads!r}")
    return threads


def pin_cpu_threads(threads: int | None) -> None:
    """Fix torch's CPU thread count. Float sums are split across threads, so the count changes the last bits of
    every trained weight and metric: with the same count, every machine of one CPU kind writes the same bytes."""
    if threads is not None:
        torch.set_num_threads(threads)


def setup_runtime(device_choice: str, precision: str, cpu_threads: int | None = None) -> Runtime:
    """Pick the device (CUDA when present unless told otherwise) and join the torchrun group if there is one."""
    pin_cpu_threads(cpu_threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = wants_cuda(device_choice)
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if cuda else "gloo")
    bf16 = precision == "bf16" or (precision == "auto" and cuda and torch.cuda.is_bf16_supported())
    return Runtime(device, torch.bfloat16 if bf16 else None, rank, world_size, local_rank)


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def evaluation_device(choice: str, cpu_threads: int | None = None) -> torch.device:
    """The device an evaluation stage runs on: `cuda`, `cpu`, or `auto` (CUDA when present)."""
    pin_cpu_threads(cpu_threads)
    return torch.device("cuda" if wants_cuda(choice) else "cpu")
