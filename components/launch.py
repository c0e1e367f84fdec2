"""A training stage that starts its own DDP workers, so `dvc repro` trains on every device of every node.

    params.yaml  train_text.distributed: {nproc_per_node: 8, nnodes: 1, rdzv_endpoint: null}
    dvc repro train_text                     # one process per GPU (gloo on CPU), a versioned DDP model
    AIGC_RDZV_ENDPOINT=node-0:29400 dvc repro train_text     # on every node, with nnodes: 2

With `nproc_per_node` or `nnodes` above 1, the stage's process becomes an elastic agent (torch.distributed's
launcher, the one `torchrun` runs) and starts `nproc_per_node` copies of the same command as its workers;
they train together and the agent returns once they are done. Several nodes: the same `dvc repro` on each,
with the same rendezvous endpoint (host:port of one of them; its agent hosts the c10d rendezvous), best given
as `$AIGC_RDZV_ENDPOINT`: it names a machine, not the model, so it stays out of `dvc.lock` (params'
`rdzv_endpoint` is the fallback). Workers take their rank at the rendezvous, so which node holds rank 0 is
not fixed: every node's first worker writes the model, `training.json`, the curves and the sample grids
(rank 0 sends its grids to the others), identical bytes on every node, so each node's `dvc.lock` is the
same; rank 0 alone writes checkpoints (`base.checkpoint_root` on shared storage lets any node resume them).

The failing worker's error is on stderr (one line for bad params, bad data or a busy folder); the agent
then exits with its status (65, 75, 78 keep their meaning for the flows), not with the launcher's traceback.
Only torch and the standard library.
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from dataclasses import dataclass
from typing import Any

from components.common import EX_CONFIG, EX_DATAERR, EX_TEMPFAIL, ConfigError

log = logging.getLogger(__name__)

WORKER_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")
"""Set in every process a torch.distributed launcher started: such a process trains, it never launches."""
KEPT_EXIT_CODES = (EX_DATAERR, EX_TEMPFAIL, EX_CONFIG)
"""A worker's exit status the agent passes on as its own: bad data, busy, bad params (flows act on them)."""
ENDPOINT_ENV = "AIGC_RDZV_ENDPOINT"
"""The rendezvous endpoint of a multi-node job (host:port); wins over params' `rdzv_endpoint`."""


@dataclass(frozen=True)
class Launch:
    """A training stage's `distributed` params: processes per node, nodes, and where they meet."""

    nproc_per_node: int = 1
    nnodes: int = 1
    rdzv_endpoint: str | None = None

    @classmethod
    def from_params(cls, section: dict[str, Any], prefix: str) -> Launch:
        """Read `<prefix>.distributed` (absent: one process)."""
        found = section.get("distributed") or {}
        if not isinstance(found, dict):
            raise ConfigError(f"params key '{prefix}.distributed' must be a mapping, got {found!r}")
        unknown = sorted(set(found) - {"nproc_per_node", "nnodes", "rdzv_endpoint"})
        if unknown:
            raise ConfigError(f"params key '{prefix}.distributed' has unknown keys {unknown}")
        counts = {}
        for key in ("nproc_per_node", "nnodes"):
            value = found.get(key, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"params key '{prefix}.distributed.{key}' must be a positive integer, got {value!r}")
            counts[key] = value
        endpoint = found.get("rdzv_endpoint")
        if endpoint is not None and not valid_endpoint(endpoint):
            raise ConfigError(f"params key '{prefix}.distributed.rdzv_endpoint' must be 'host:port' or null, got {endpoint!r}")
        if os.environ.get(ENDPOINT_ENV):
            endpoint = os.environ[ENDPOINT_ENV]
            if not valid_endpoint(endpoint):
                raise ConfigError(f"${ENDPOINT_ENV} must be 'host:port', got {endpoint!r}")
        if counts["nnodes"] > 1 and endpoint is None:
            raise ConfigError(
                f"params key '{prefix}.distributed.nnodes' is {counts['nnodes']}: set ${ENDPOINT_ENV} (or "
                f"'{prefix}.distributed.rdzv_endpoint') to the host:port of one node, the same on every node"
            )
        return cls(counts["nproc_per_node"], counts["nnodes"], endpoint)

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @property
    def standalone(self) -> bool:
        """One node with no endpoint: a private rendezvous on a free local port."""
        return self.nnodes == 1 and self.rdzv_endpoint is None


def valid_endpoint(endpoint: Any) -> bool:
    if not isinstance(endpoint, str):
        return False
    host, _, port = endpoint.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def launched_worker() -> bool:
    """True in a process a torch.distributed launcher started (this stage's agent, or `torchrun` by hand)."""
    return any(name in os.environ for name in WORKER_ENV)


def needs_launch(launch: Launch) -> bool:
    return launch.world_size > 1 and not launched_worker()


def check_devices(launch: Launch, device: str, prefix: str) -> None:
    """More workers than GPUs would fail in every worker at once; say so here, before any starts."""
    import torch

    gpus = torch.cuda.device_count() if device != "cpu" and torch.cuda.is_available() else 0
    if gpus and launch.nproc_per_node > gpus:
        raise ConfigError(
            f"params key '{prefix}.distributed.nproc_per_node' is {launch.nproc_per_node} but this node has {gpus} GPUs: "
            f"one worker per GPU (or set '{prefix}.device: cpu' to train on the CPU with gloo)"
        )


def launch_workers(launch: Launch, stage: str, argv: list[str], module: str | None = None) -> None:
    """Run `python -m components.<stage> <argv>` (or `module`) as `nproc_per_node` DDP workers of this node;
    returns when they all finished, or exits with the status of the first one that failed.

    Raises:
        SystemExit: a worker failed (its status when it says bad data, busy or bad params; else 1).
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The launcher logs its whole config and every state change at INFO; the stage's own lines are what matter.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    config = LaunchConfig(
        min_nodes=launch.nnodes,
        max_nodes=launch.nnodes,
        nproc_per_node=launch.nproc_per_node,
        # Nodes of one job must name the same run; a standalone job gets its own, as torchrun --standalone.
        run_id=f"aigc-{stage}" if not launch.standalone else uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0" if launch.standalone else str(launch.rdzv_endpoint),
        max_restarts=0,  # a failed worker is a failed stage: DVC and the flows decide what to retry
        monitor_interval=0.5,
        start_method="spawn",
    )
    where = "this machine" if launch.standalone else f"rendezvous {launch.rdzv_endpoint}, {launch.nnodes} nodes"
    log.info("%s: starting %d workers (%s, world size %d)", stage, launch.nproc_per_node, where, launch.world_size)
    try:
        elastic_launch(config, sys.executable)("-m", module or f"components.{stage}", *argv)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode
        log.error("%s: worker rank %d of %d exited with %d; its error is above", stage, rank, launch.world_size, code)
        raise SystemExit(code if code in KEPT_EXIT_CODES else 1) from None
    except RendezvousError as err:  # a node that never came, or an endpoint nobody can bind or reach
        log.error(
            "%s: the rendezvous at %s failed (%s: %s); start the stage on all %d nodes with the same rdzv_endpoint",
            stage, config.rdzv_endpoint, type(err).__name__, err, launch.nnodes,
        )  # fmt: skip
        raise SystemExit(EX_TEMPFAIL) from None
    except SignalException as err:  # the agent was told to stop; its workers are stopped by then
        log.error("%s: stopped by %s", stage, err.sigval.name)
        raise SystemExit(128 + int(err.sigval)) from None
