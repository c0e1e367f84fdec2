"""Training infrastructure shared by every model family: the loop, and the one runner every training stage uses.

A family supplies its model, a `batch(step, micro, rank, world)` function and a `loss(model, batch)`
function (or, for adversarial training, several `Phase`s, each a loss with its own parameters and optimizer,
run in order every step); `fit` does the rest: `torch.compile`, fused AdamW with a warm-up + cosine schedule,
gradient accumulation and clipping, DDP (the stage launches its own workers: `components.launch`), atomic
checkpoints with automatic resume, on shared storage too (`components.checkpoints`), and metric curves
through dvclive (when installed; a GPU box may lack it) plus a progress bar. `run_training` wraps it for a
stage: device and precision (`components.runtime`), seeding, data hash and run fingerprint, the checkpoint
folder's lock (rank 0: one trainer per folder), saving (the first process of each node) and the
`training.json` record, which says the world size. Wall time and throughput go to `timing.json` beside the curves, which neither
git nor DVC tracks: everything DVC hashes is a function of params, code and data.

Resuming is exact: batches are a pure function of (seed, step), and a checkpoint holds model, optimizer,
scheduler, every rank's RNG state and the step, so an interrupted run resumed from step k ends with the
same weights as one that never stopped (checked bit for bit on CPU).

Only torch, numpy and the standard library are imported here.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from components.checkpoints import (
    ROOT_ENV,
    CheckpointMirror,
    check_url,
    checkpoint_location,
    checkpoint_lock,
    checkpoint_path,
    gather_rng_states,
    newest_shared_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from components.common import ConfigError, is_url, load_params, progress, require, run_main, write_json
from components.image_io import save_grid
from components.launch import Launch, check_devices, launch_workers, needs_launch
from components.runtime import DEVICES, PRECISIONS, Runtime, cpu_threads_from_params, setup_runtime, teardown_runtime

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
TIMING_FILE = "timing.json"
"""Beside a training stage's curves (`<metrics-dir>/timing.json`): gitignored, owned by no stage."""


@dataclass(frozen=True)
class Phase:
    """One optimizer's share of a training step: the parameters it updates and the loss it minimises.

    A GAN has two (discriminator, then generator); most models have one over all their parameters.
    `loss` receives the (possibly DDP/compile-wrapped) model, so it must call it through `forward`.
    """

    name: str
    loss: LossFn
    parameters: Callable[[nn.Module], list[nn.Parameter]] | None = None  # None: every trainable parameter


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int
    batch_size: int
    grad_accum_steps: int
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    betas: tuple[float, float]
    grad_clip: float
    device: str
    precision: str
    compile: bool
    checkpoint_every: int
    keep_checkpoints: int
    resume: str
    log_every: int
    seed: int
    cpu_threads: int | None = None
    validate_every: int = 0  # steps between validations of a family that has them (0: none; the last step's model is kept)
    # Where checkpoints live (components.checkpoints.checkpoint_location): a machine's choice, so neither part of
    # the run fingerprint nor of training.json (MACHINE_FIELDS).
    checkpoint_root: str | None = None

    @classmethod
    def from_params(cls, section: dict[str, Any], prefix: str, seed: int | None = None) -> TrainConfig:
        """Read the training keys of a family's params section (e.g. `train_text`); the seed and the CPU thread
        count come from its `base` (as `load_params` merges it in) unless a seed is given."""
        base = section.get("base", {})
        betas = require(section, "betas", list, prefix)
        if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas):
            raise ConfigError(f"params key '{prefix}.betas' must be two numbers in [0, 1), got {betas!r}")
        cfg = cls(
            max_steps=require(section, "max_steps", int, prefix, low=1),
            batch_size=require(section, "batch_size", int, prefix, low=1),
            grad_accum_steps=require(section, "grad_accum_steps", int, prefix, low=1),
            lr=float(require(section, "lr", (int, float), prefix, low=0, high=1)),
            min_lr_ratio=float(require(section, "min_lr_ratio", (int, float), prefix, low=0, high=1)),
            warmup_steps=require(section, "warmup_steps", int, prefix, low=0),
            weight_decay=float(require(section, "weight_decay", (int, float), prefix, low=0)),
            betas=(float(betas[0]), float(betas[1])),
            grad_clip=float(require(section, "grad_clip", (int, float), prefix, low=0)),
            device=require(section, "device", str, prefix),
            precision=require(section, "precision", str, prefix),
            compile=require(section, "compile", bool, prefix),
            checkpoint_every=require(section, "checkpoint_every", int, prefix, low=1),
            keep_checkpoints=require(section, "keep_checkpoints", int, prefix, low=1),
            resume=require(section, "resume", str, prefix),
            log_every=require(section, "log_every", int, prefix, low=1),
            seed=require(base, "seed", int, "base") if seed is None else seed,
            cpu_threads=cpu_threads_from_params(base),
            validate_every=require(section, "validate_every", int, prefix, low=0) if "validate_every" in section else 0,
            checkpoint_root=checkpoint_root_of(base),
        )
        choices = {"device": DEVICES, "precision": PRECISIONS, "resume": ("auto", "never")}
        for key, allowed in choices.items():
            if getattr(cfg, key) not in allowed:
                raise ConfigError(f"params key '{prefix}.{key}' must be one of {list(allowed)}, got {getattr(cfg, key)!r}")
        return cfg

    def fingerprint(self, *extra: Any) -> str:
        """What a checkpoint must match to be resumed: everything but the checkpoint/resume/logging knobs."""
        ignored = ("checkpoint_every", "keep_checkpoints", "resume", "log_every", *MACHINE_FIELDS)
        relevant = {k: v for k, v in asdict(self).items() if k not in ignored}
        if not self.validate_every:  # families without validation keep the fingerprints (and checkpoints) they had
            relevant.pop("validate_every")
        payload = json.dumps([relevant, *extra], sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def record(self) -> dict[str, Any]:
        """The config as `training.json` states it: what shaped the model, not where its checkpoints were."""
        return {k: v for k, v in asdict(self).items() if k not in MACHINE_FIELDS}


MACHINE_FIELDS = ("checkpoint_root",)
"""TrainConfig fields that say where a run keeps its state, not what it trains."""


def checkpoint_root_of(base: dict[str, Any]) -> str | None:
    """`$AIGC_CHECKPOINT_ROOT`, else `base.checkpoint_root`: a path, an fsspec URL whose filesystem is installed,
    or null."""
    where, root = (f"${ROOT_ENV}", os.environ[ROOT_ENV]) if os.environ.get(ROOT_ENV) else (
        "params key 'base.checkpoint_root'", base.get("checkpoint_root"))  # fmt: skip
    if root is not None and (not isinstance(root, str) or not root.strip()):
        raise ConfigError(f"{where} must be a path, a URL or null, got {root!r}")
    if root is not None and is_url(root):
        check_url(root, where)
    return root


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The RNG for one micro-batch: a pure function of its coordinates, so resume replays the same data."""
    return torch.Generator().manual_seed(hash_seed(seed, step, micro, rank))


def hash_seed(*parts: int) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


def data_hash(paths: list[Path]) -> str:
    """Short content hash of the training inputs, part of the run fingerprint and of training.json."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def architecture_signature(model: nn.Module) -> str:
    """Short hash of the state dict's names, shapes and dtypes."""
    layout = [(name, tuple(t.shape), str(t.dtype)) for name, t in model.state_dict().items()]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:8]


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to `min_lr_ratio` of the peak at `max_steps`."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(
    model: nn.Module, cfg: TrainConfig, device: torch.device, params: list[nn.Parameter] | None = None
) -> torch.optim.Optimizer:
    """AdamW over `params` (default: every trainable one), no weight decay on biases and norms (1-d
    parameters), fused kernels on CUDA."""
    params = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=device.type == "cuda")


# --- metrics ------------------------------------------------------------------------------------------


class MetricLogger:
    """dvclive when it is installed (curves for `dvc plots`), else JSON lines in the run folder.

    The curves are written afresh by every run: a resumed run first replays the rows its checkpoint carries
    (`history`), so they hold exactly this run's steps, whatever the folder held before (another
    experiment's curves, or steps logged after the checkpoint a crashed run resumes from).
    """

    def __init__(self, directory: Path | None, enabled: bool, history: list[tuple[int, dict[str, float]]] | None = None) -> None:
        self._live: Any = None
        self._jsonl: Path | None = None
        self.history: list[tuple[int, dict[str, float]]] = []
        if not enabled or directory is None:
            return
        try:
            from dvclive import Live

            self._live = Live(dir=str(directory), resume=False, save_dvc_exp=False, dvcyaml=None, report=None)
        except Exception as err:  # not installed (GPU boxes), or it cannot read the git state: curves only
            directory.mkdir(parents=True, exist_ok=True)
            self._jsonl = directory / "metrics.jsonl"
            self._jsonl.unlink(missing_ok=True)
            log.warning("dvclive unavailable (%s: %s); curves go to %s", type(err).__name__, err, self._jsonl)
        for step, metrics in history or []:
            self.log(int(step), dict(metrics))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.history.append((step, metrics))
        if self._live is not None:
            self._live.step = step
            for name, value in metrics.items():
                self._live.log_metric(name, value)
            self._live.next_step()
        elif self._jsonl is not None:
            with self._jsonl.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        if self._live is not None:
            self._live.end()


# --- the loop -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Validation:
    """Model selection on generated output: `run(model)` scores the model (it generates from held-out
    sources), and the best score of `metric` (`mode` max or min) so far decides which weights are saved."""

    run: Callable[[nn.Module], dict[str, float]]
    metric: str
    mode: str = "max"

    def better(self, value: float, best: float | None) -> bool:
        return best is None or (value > best if self.mode == "max" else value < best)


@dataclass
class Selection:
    """The best validated step: its score, every metric, and its weights (on CPU)."""

    step: int
    value: float
    metrics: dict[str, float]
    state: dict[str, torch.Tensor]

    def record(self, metric: str) -> dict[str, Any]:
        return {"step": self.step, "metric": metric, "value": self.value, "metrics": self.metrics}


@dataclass
class TrainResult:
    steps: int
    resumed_from: int | None
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, summed loss of every phase)
    phase_losses: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    record: dict[str, Any] = field(default_factory=dict)  # training.json, once run_training has saved the model
    best: Selection | None = None  # the validated model kept, when the family validates
    items: int = 0  # tokens / images this process trained on in this run (for timing.json)

    @property
    def final_loss(self) -> float:
        return self.losses[-1][1] if self.losses else float("nan")


def run_folder(checkpoint_dir: Path, fingerprint: str, model: nn.Module) -> Path:
    """One folder per configuration + data + architecture: a run never resumes, prunes or overwrites another's
    checkpoints, and a code change that alters the network's parameters starts afresh instead of failing to
    load the old state."""
    return checkpoint_dir / f"{fingerprint}-{architecture_signature(model)}"


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers (what gets saved)."""
    model = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


def fit(
    model: nn.Module,
    batch_fn: Callable[[int, int, int, int], Batch],
    loss_fn: LossFn | list[Phase],
    cfg: TrainConfig,
    runtime: Runtime,
    checkpoint_dir: Path,
    fingerprint: str,
    metrics_dir: Path | None = None,
    stop_after: int | None = None,
    items_per_batch: Callable[[Batch], int] | None = None,
    after_step: Callable[[nn.Module, int], None] | None = None,
    validation: Validation | None = None,
    mirror: CheckpointMirror | None = None,
) -> TrainResult:
    """Train `model` for `cfg.max_steps` optimizer steps, resuming from `checkpoint_dir` when allowed.

    Args:
        model: the family's model, on CPU; moved to the runtime's device here.
        batch_fn: (step, micro, rank, world) -> batch of CPU tensors; must be a pure function of its arguments.
        loss_fn: (model, batch on device) -> scalar mean loss; or a list of phases, each with its own
            optimizer (and schedule), run in order on the same batch every step.
        cfg: the training config.
        runtime: from setup_runtime.
        checkpoint_dir: checkpoints go to `<checkpoint_dir>/<fingerprint>/step-*.ckpt` (rank 0 writes; a stage's
            `run_training` holds the folder's `checkpoint_lock` meanwhile).
        fingerprint: identifies config + data; only checkpoints of the same fingerprint are resumed.
        metrics_dir: dvclive folder for the curves (the first process of each node; losses are averaged over
            every rank); None logs nothing.
        stop_after: stop (after checkpointing) once this step is reached; simulates a crash in tests.
        items_per_batch: counts tokens / images in a batch for the throughput shown on the progress bar.
        after_step: (unwrapped model, steps done) after every optimizer step, on every rank: EMA updates
            (state kept in the model, so checkpoints hold it) and side outputs such as sample grids.
        validation: scored every `cfg.validate_every` steps and at the last one, by the first process of each
            node (curves `val/*`); the best step's weights are kept (in checkpoints too) and returned as
            `result.best`.
        mirror: shared storage the checkpoints are copied to (and resumed from), `<mirror>/<run>/`.
    """
    checkpoint_dir = run_folder(checkpoint_dir, fingerprint, model)
    fingerprint = checkpoint_dir.name
    model.to(runtime.device)
    phases = loss_fn if isinstance(loss_fn, list) else [Phase("model", loss_fn)]
    if not phases or len({p.name for p in phases}) != len(phases):
        raise ValueError(f"phases need distinct names, got {[p.name for p in phases]}")
    optimizers = [make_optimizer(model, cfg, runtime.device, p.parameters(model) if p.parameters else None) for p in phases]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: lr_factor(step, cfg)) for o in optimizers]
    start_step, resumed_from = 0, None
    resumed_losses: dict[str, float] = {}
    curves: list[tuple[int, dict[str, float]]] = []
    best: Selection | None = None
    run_mirror = mirror.child(checkpoint_dir.name) if mirror is not None and runtime.is_main else None
    if cfg.resume == "auto":
        if run_mirror is not None:
            run_mirror.pull(checkpoint_dir)
        found = newest_shared_checkpoint(checkpoint_dir, fingerprint, runtime)
        if found is not None:
            path, state = found
            model.load_state_dict(state["model"])
            for optimizer, saved in zip(optimizers, state["optimizers"], strict=True):
                optimizer.load_state_dict(saved)
            for scheduler, saved in zip(schedulers, state["schedulers"], strict=True):
                scheduler.load_state_dict(saved)
            rngs = state["rng"]
            set_rng_state(rngs[runtime.rank])  # the fingerprint holds the world size: one state per rank
            start_step = resumed_from = int(state["step"])
            resumed_losses = {name: float(value) for name, value in state.get("losses", {}).items()}
            curves = list(state.get("curves", []))
            if state.get("best"):
                best = Selection(**state["best"])
            log.info("resuming from %s (step %d of %d)", path, start_step, cfg.max_steps)
    train_model: nn.Module = model
    if runtime.distributed:
        ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        # With several phases, each backward reaches only part of the model (the discriminator's loss
        # does not touch the generator), which DDP must be told about.
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=len(phases) > 1)
    if cfg.compile:
        train_model = torch.compile(train_model)

    logger = MetricLogger(metrics_dir, runtime.writes_outputs, history=curves)
    result = TrainResult(steps=start_step, resumed_from=resumed_from)
    if resumed_losses:  # the last step's losses, so a run resumed at its end still reports them
        result.losses.append((start_step, sum(resumed_losses.values())))
        result.phase_losses.append((start_step, resumed_losses))
    bar = progress(
        range(start_step, cfg.max_steps),
        desc="train",
        unit="step",
        initial=start_step,
        total=cfg.max_steps,
        silent=not runtime.is_main,
    )
    names = [p.name for p in phases]
    window_losses = dict.fromkeys(names, 0.0)
    window_items, window_start = 0, time.perf_counter()
    autocast = torch.autocast(
        runtime.device.type, dtype=runtime.autocast_dtype or torch.float32, enabled=runtime.autocast_dtype is not None
    )
    rank, world = runtime.rank, runtime.world_size
    train_model.train()
    for step in bar:
        step_losses = dict.fromkeys(names, 0.0)
        batches = [
            {k: v.to(runtime.device, non_blocking=True) for k, v in batch_fn(step, micro, rank, world).items()}
            for micro in range(cfg.grad_accum_steps)
        ]
        for phase, optimizer in zip(phases, optimizers, strict=True):
            optimizer.zero_grad(set_to_none=True)
            for micro, batch in enumerate(batches):
                last = micro == cfg.grad_accum_steps - 1
                sync = last or not runtime.distributed
                context = train_model.no_sync() if not sync else contextlib.nullcontext()
                with context, autocast:
                    loss = phase.loss(train_model, batch) / cfg.grad_accum_steps
                loss.backward()
                step_losses[phase.name] += float(loss.detach())
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if cfg.grad_clip > 0:
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        # Over every rank: the curves, checkpoints and training.json of each node then say the same.
        step_losses = mean_over_ranks(step_losses, runtime)
        counted = sum(items_per_batch(b) for b in batches) if items_per_batch else 0
        window_items += counted
        result.items += counted
        done = step + 1
        if after_step is not None:
            after_step(unwrap(model), done)
        for name in names:
            window_losses[name] += step_losses[name]
        result.losses.append((done, sum(step_losses.values())))
        result.phase_losses.append((done, step_losses))
        result.steps = done
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            elapsed = time.perf_counter() - window_start
            steps_in_window = done - max(start_step, done - cfg.log_every) or 1
            if len(phases) == 1:
                metrics = {"train/loss": window_losses[names[0]] / steps_in_window}
            else:
                metrics = {f"train/loss_{name}": window_losses[name] / steps_in_window for name in names}
            metrics["train/lr"] = schedulers[0].get_last_lr()[0]
            logger.log(done, metrics)
            # Throughput is shown, never written to the curves: DVC hashes those and git tracks them, and a
            # timing would make every rerun's dvc.lock differ. run_training writes it to timing.json.
            shown = {k.removeprefix("train/"): f"{v:.3f}" for k, v in metrics.items() if "loss" in k}
            if items_per_batch:
                shown["items/s"] = f"{window_items * runtime.world_size / max(elapsed, 1e-9):.0f}"
            bar.set_postfix(shown)
            log.debug("step %d: %s", done, shown)
            window_losses = dict.fromkeys(names, 0.0)
            window_items, window_start = 0, time.perf_counter()
        validate_now = cfg.validate_every and (done % cfg.validate_every == 0 or done == cfg.max_steps)
        if validation is not None and validate_now and runtime.writes_outputs:
            best = validate_step(validation, unwrap(model), done, best, logger)
            train_model.train()
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps or done == stop_after:
            rngs = gather_rng_states(runtime)
            if runtime.is_main:
                save_checkpoint(
                    {
                        "model": unwrap(model).state_dict(),
                        "optimizers": [o.state_dict() for o in optimizers],
                        "schedulers": [sch.state_dict() for sch in schedulers],
                        "rng": rngs,
                        "step": done,
                        "fingerprint": fingerprint,
                        "losses": step_losses,
                        "curves": logger.history,
                        "best": asdict(best) if best is not None else None,
                    },
                    checkpoint_path(checkpoint_dir, done),
                )
                prune_checkpoints(checkpoint_dir, cfg.keep_checkpoints)
                if run_mirror is not None:
                    run_mirror.push(checkpoint_path(checkpoint_dir, done))
                    run_mirror.prune(cfg.keep_checkpoints)
        if stop_after is not None and done >= stop_after:
            break
    logger.close()
    result.best = best
    return result


def mean_over_ranks(values: dict[str, float], runtime: Runtime) -> dict[str, float]:
    """The mean of each value over every rank (the same on all of them); the values themselves on one process."""
    if not runtime.distributed:
        return values
    summed = torch.tensor(list(values.values()), dtype=torch.float64, device=runtime.device)
    torch.distributed.all_reduce(summed)
    return dict(zip(values, (summed / runtime.world_size).tolist(), strict=True))


def validate_step(
    validation: Validation, model: nn.Module, step: int, best: Selection | None, logger: MetricLogger
) -> Selection | None:
    """Score the model; keep its weights when it is the best so far. The RNG is left as it was, so training
    goes on exactly as without validation (and a resumed run matches an uninterrupted one)."""
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]):
        metrics = {k: float(v) for k, v in validation.run(model).items()}
    model.train(was_training)
    if validation.metric not in metrics:
        raise ValueError(f"validation returned {sorted(metrics)}, not the selection metric {validation.metric!r}")
    logger.log(step, {f"val/{k}": v for k, v in metrics.items()})
    value = metrics[validation.metric]
    log.info("step %d: validation %s", step, {k: round(v, 4) for k, v in metrics.items()})
    if not math.isfinite(value) or not validation.better(value, best.value if best else None):
        return best
    return Selection(step, value, metrics, {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})


# --- one runner for every training stage ----------------------------------------------------------------


@dataclass
class TrainingJob:
    """What a family's training stage hands `run_training`, built after the seed is set (same weights on every rank).

    Attributes:
        model: the module `fit` trains (on CPU).
        batches: (step, micro, rank, world) -> batch, a pure function of its arguments.
        loss: one loss, or the phases of an adversarial step.
        params: what the run depends on besides the `TrainConfig` (model config, init weights, crop size...):
            part of the run fingerprint and recorded in `training.json`.
        data_files: the training inputs, hashed into the fingerprint and `training.json`.
        save: writes the finished model folder (rank 0) and returns extra `training.json` fields.
        description: one log line about the model and data.
        items: counts tokens / images in a batch, for the throughput on the progress bar.
        after_step: (unwrapped model, steps done) after every optimizer step (e.g. an EMA update).
        samples: (unwrapped model) -> uint8 images (N, C, H, W) from fixed seeds: a grid of them is drawn
            every `sample_every` steps and at the end, `sample_columns` a row.
        validation: model selection on generated output (every `validate_every` steps); the best step's
            weights are the ones saved, and `training.json` says which step that was.
    """

    model: nn.Module
    batches: Callable[[int, int, int, int], Batch]
    loss: LossFn | list[Phase]
    params: dict[str, Any]
    data_files: list[Path]
    save: Callable[[Path, TrainResult], dict[str, Any]]
    description: str
    items: Callable[[Batch], int] | None = None
    after_step: Callable[[nn.Module, int], None] | None = None
    samples: Callable[[nn.Module], torch.Tensor] | None = None
    sample_every: int = 0
    sample_columns: int = 8
    validation: Validation | None = None


def run_training(
    cfg: TrainConfig,
    build: Callable[[Runtime], TrainingJob],
    out_dir: Path,
    checkpoint_dir: Path,
    metrics_dir: Path | None = None,
    stop_after: int | None = None,
    samples_dir: Path | None = None,
) -> TrainResult:
    """Set up the runtime, build the family's job, train it, and save the model with `training.json` (the first
    process of each node: under DDP every node ends with the same model).

    The model folder is written only once `max_steps` are done; `result.record` is then its `training.json`.
    Sample grids are drawn into the run's checkpoint folder, which holds this run's alone, and copied to
    `samples_dir` at the end, so that folder shows exactly this run's grids even after a crash and resume.
    `cfg.checkpoint_root` moves the checkpoint folder, or mirrors it to a URL (`checkpoint_location`).
    """
    checkpoint_dir, mirror = checkpoint_location(checkpoint_dir, cfg.checkpoint_root)
    runtime = setup_runtime(cfg.device, cfg.precision, cfg.cpu_threads)
    with contextlib.ExitStack() as stack:
        stack.callback(teardown_runtime, runtime)
        if runtime.is_main:  # the one writer of checkpoints; refused here if another trainer holds the folder
            stack.enter_context(checkpoint_lock(checkpoint_dir))
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        job = build(runtime)
        hashed = data_hash(job.data_files)
        # A run on another number of processes sees other batches: its checkpoints are not this run's.
        fingerprint = cfg.fingerprint(job.params, hashed, *([runtime.world_size] if runtime.distributed else []))
        grids = run_folder(checkpoint_dir, fingerprint, job.model) / "samples"
        grid_mirror = mirror.child(grids.parent.name) if mirror is not None and runtime.is_main else None
        drawing = job.samples is not None and samples_dir is not None
        log.info(
            "%s; %.3fM trainable parameters, device %s%s",
            job.description,
            sum(p.numel() for p in job.model.parameters() if p.requires_grad) / 1e6,
            runtime.device,
            f", {runtime.world_size} processes" if runtime.distributed else "",
        )

        def draw(model: nn.Module, step: int) -> None:
            # Rank 0 draws (other nodes may share its folder); every node's writer gets the grids at the end.
            if drawing and runtime.is_main:
                grid = grids / f"step-{step:08d}.png"
                if save_grid(job.samples(model), grid, job.sample_columns) and grid_mirror is not None:
                    grid_mirror.push(grid, f"samples/{grid.name}")

        def after_step(model: nn.Module, done: int) -> None:
            if job.after_step is not None:
                job.after_step(model, done)
            if job.sample_every and (done % job.sample_every == 0 or done == cfg.max_steps):
                draw(model, done)

        start = time.perf_counter()
        result = fit(
            job.model, job.batches, job.loss, cfg, runtime, checkpoint_dir, fingerprint,
            metrics_dir=metrics_dir, stop_after=stop_after, items_per_batch=job.items, after_step=after_step,
            validation=job.validation if cfg.validate_every else None, mirror=mirror,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        finished = result.steps >= cfg.max_steps
        if finished and drawing:
            if runtime.is_main and not (grids / f"step-{result.steps:08d}.png").exists():  # resumed at the end
                draw(unwrap(job.model), result.steps)
            share_grids(grids, runtime)
        # No collective is left, and libraries save on global rank 0 alone while a process group is up
        # (transformers' save_pretrained): out of it, every node's writer saves its own copy.
        teardown_runtime(runtime)
        log.info(
            "trained to step %d in %.1f s%s",
            result.steps,
            seconds,
            f" (resumed from step {result.resumed_from})" if result.resumed_from is not None else "",
        )
        if runtime.writes_outputs and metrics_dir is not None:
            write_json(timing_record(result, seconds, runtime), metrics_dir / TIMING_FILE)
        if runtime.writes_outputs and finished:
            if drawing:
                shutil.rmtree(samples_dir, ignore_errors=True)  # type: ignore[arg-type]
                if grids.is_dir():  # none without torchvision (a bare GPU box)
                    shutil.copytree(grids, samples_dir)
            selected = {}
            if result.best is not None and job.validation is not None:
                unwrap(job.model).load_state_dict(result.best.state)
                selected = {"selected": result.best.record(job.validation.metric)}
                log.info(
                    "saving the weights of step %d (best validation %s %.4f)",
                    result.best.step,
                    job.validation.metric,
                    result.best.value,
                )
            extra = job.save(out_dir, result)
            result.record = training_record({**job.params, "train": cfg.record()}, hashed, result, runtime) | selected | extra
            write_json(result.record, out_dir / "training.json")
        return result


def share_grids(grids: Path, runtime: Runtime) -> None:
    """Rank 0's sample grids (drawn by it during the run, or copied down from the mirror) into the grids folder
    of every node's writer, which lacks them: each node's samples output then holds the same files. A
    collective: every rank calls it."""
    if not runtime.distributed:
        return
    box: list[Any] = [{p.name: p.read_bytes() for p in sorted(grids.glob("step-*.png"))} if runtime.is_main else None]
    torch.distributed.broadcast_object_list(box, src=0)
    if runtime.writes_outputs and not runtime.is_main:
        grids.mkdir(parents=True, exist_ok=True)
        for name, data in box[0].items():
            if not (grids / name).exists():  # a shared folder has rank 0's already
                partial = grids / f".{name}.{os.getpid()}.tmp"
                partial.write_bytes(data)
                os.replace(partial, grids / name)


def timing_record(result: TrainResult, seconds: float, runtime: Runtime) -> dict[str, Any]:
    """`timing.json`: how long this run took and how fast it went. It differs on every run, so it is kept out
    of the curves, the metrics and `training.json` (git tracks or DVC hashes those) and git ignores it."""
    steps = result.steps - (result.resumed_from or 0)
    return {
        "seconds": round(seconds, 3),
        "steps": steps,
        "steps_per_s": round(steps / max(seconds, 1e-9), 3),
        "items_per_s": round(result.items * runtime.world_size / max(seconds, 1e-9), 1) if result.items else None,
        "resumed_from": result.resumed_from,
        "device": str(runtime.device),
        "processes": runtime.world_size,
    }


def training_record(params: dict[str, Any], data_hash: str, result: TrainResult, runtime: Runtime) -> dict[str, Any]:
    """`training.json` of a model folder: what produced it, on how many processes (DDP's world size shapes the
    model: every rank trains on its own batches). Nothing that depends on the machine, the clock or on whether
    the run was resumed, so every rerun writes the same bytes (and DVC hash)."""
    return {
        "params": params,
        "data_hash": data_hash,
        "world_size": runtime.world_size,
        "steps": result.steps,
        "final_loss": result.final_loss,
        "final_losses": result.phase_losses[-1][1] if result.phase_losses else {},
    }


def parameter_count(module: nn.Module) -> dict[str, int]:
    """The `parameters` field of `training.json`, for the module that was saved."""
    return {"parameters": sum(p.numel() for p in module.parameters())}


def training_main(
    argv: list[str] | None,
    stage: str,
    doc: str | None,
    config: Any,
    train: Callable[[Any, argparse.Namespace], Any],
    features_help: str,
    out_help: str,
    curves: bool = True,
    options: dict[str, str] | None = None,
    required: tuple[str, ...] = (),
) -> None:
    """The `main` of a training stage: `<features> <out> --checkpoints DIR [--metrics-dir DIR] [--params FILE]`
    plus the stage's own path `options` (flag -> help; those in `required` must be given), then
    `train(config from params, args)` under `run_main`; with `<stage>.distributed` above one process, the
    same command as that many DDP workers (`components.launch`).
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m components.{stage}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("features", type=Path, help=features_help)
    parser.add_argument("out", type=Path, help=out_help)
    parser.add_argument("--checkpoints", type=Path, required=True, help="checkpoint folder (kept between runs)")
    if curves:
        parser.add_argument("--metrics-dir", type=Path, default=None, help="dvclive folder for the training curves")
    for flag, help_text in (options or {}).items():
        parser.add_argument(flag, type=Path, default=None, required=flag in required, help=help_text)
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    def body() -> None:
        params = load_params(stage, args.params)
        cfg = config.from_params(params)  # bad params stop here, before any worker starts
        launch = Launch.from_params(params, stage)
        if needs_launch(launch):  # this process becomes the agent of the stage's DDP workers
            check_devices(launch, str(params.get("device", "auto")), stage)
            launch_workers(launch, stage, list(sys.argv[1:] if argv is None else argv))
        else:
            train(cfg, args)

    run_main(body)
