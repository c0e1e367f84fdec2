"""Per-batch work across processes, results in input order: a stage's output is the same bytes whichever
number of workers made it."""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import math
import multiprocessing
import os
import pickle
import sys
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from components.common import ConfigError, signal_on_parent_death

Context = TypeVar("Context")
Item = TypeVar("Item")
Result = TypeVar("Result")

IN_FLIGHT_PER_WORKER = 1
"""Batches submitted ahead per worker; memory is bounded by this window, not by the input. Two per worker was
no faster on the features stage at 1 M rows (140.6 s against 136.1 s for one) and took 60 MB more."""

_contexts: dict[str, Any] = {}


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup CPU quota (a container's
    `--cpus` or a pod's limit), not the host's count."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_cpu_quota() -> float | None:
    """CPUs the cgroup may use (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us`), or None without a quota."""
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        return None if quota == "max" else int(quota) / int(period)
    with contextlib.suppress(OSError, ValueError):
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        return None if quota_us <= 0 else quota_us / int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
    return None


def workers_for(rows: int, batch_rows: int, workers: int) -> int:
    """The workers a stage starts for `rows` in batches of `batch_rows`: none (1, its own process) when they fit
    one batch, which is not worth the second it takes to start workers."""
    return workers if rows > batch_rows else 1


def data_workers_from_params(base: dict[str, Any]) -> int:
    """`base.data_workers`, the processes a data stage uses for its per-batch work; 0 (the default): one per
    available core. A machine's choice like `base.checkpoint_root`: the output is the same bytes for any count,
    so dvc.yaml leaves it out of every stage's params and changing it reruns nothing."""
    workers = base.get("data_workers", 0)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"params key 'base.data_workers' must be 0 (one per core) or a positive integer, got {workers!r}")
    return workers if workers > 0 else available_cores()


def _start_worker(stage: int) -> None:
    # Each worker is one of N processes on N cores: the tokenizer's and polars' thread pools would oversubscribe them.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["POLARS_MAX_THREADS"] = "1"
    # A spawned child does not inherit the stage's death signal: without its own, a killed stage would leave
    # its workers waiting on the task queue for ever, each holding its memory.
    if sys.platform.startswith("linux"):
        signal_on_parent_death()
        if os.getppid() != stage:  # the stage died before the kernel was told
            os._exit(1)


def _call(function: Callable[[Any, Any], Any], token: str, context: bytes, item: Any) -> Any:
    if token not in _contexts:  # a map's context is unpickled once per worker, not once per batch
        _contexts.clear()
        _contexts[token] = pickle.loads(context)
    return function(_contexts[token], item)


class Workers:
    """Spawned processes shared by a stage's passes; started by the first pass with more than one batch.

    Spawned, not forked: a fork would copy the parent's tokenizer and Arrow thread pools mid-use.
    """

    def __init__(self, count: int) -> None:
        self.count = count
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None

    def map(self, function: Callable[[Context, Item], Result], context: Context, items: Iterable[Item]) -> Iterator[Result]:
        """`function(context, item)` for each item, yielded in input order.

        With more than one worker and more than one item, the calls run in the workers (`function` must be
        a module-level function, `context` and the items picklable), at most IN_FLIGHT_PER_WORKER per worker
        ahead of the one being yielded; otherwise here, one at a time. `context` is pickled once per map and
        goes with every item, but each worker unpickles it once.
        """
        items = iter(items)
        head = list(itertools.islice(items, 2))
        if self.count <= 1 or len(head) < 2:
            for item in itertools.chain(head, items):
                yield function(context, item)
            return
        if self._pool is None:
            spawn = multiprocessing.get_context("spawn")
            self._pool = concurrent.futures.ProcessPoolExecutor(self.count, spawn, _start_worker, (os.getpid(),))
        token, blob = uuid.uuid4().hex, pickle.dumps(context)
        pending: deque[concurrent.futures.Future[Result]] = deque()
        try:
            for item in itertools.chain(head, items):
                pending.append(self._pool.submit(_call, function, token, blob, item))
                if len(pending) >= self.count * IN_FLIGHT_PER_WORKER:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Workers:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
