"""Training checkpoints: atomic writes, newest-good-first resume, pruning, the RNG states they carry, the
lock that keeps a second trainer out of a checkpoint folder, and shared storage.

A checkpoint is scratch state of one run (`<checkpoints>/<family>/<run fingerprint>/step-*.ckpt`), written
by `torch.save` and read back with `weights_only=True`, so loading one runs no code from the file.

Where (`base.checkpoint_root`, or `$AIGC_CHECKPOINT_ROOT`): null keeps each stage's `--checkpoints` folder; a
path (a mounted shared disk) replaces its parent, `<root>/<family>`; an fsspec URL (s3://, gs://, file://...)
is a mirror: the run trains into its local folder as usual, every checkpoint (and sample grid) is copied to
`<url>/<family>/<run>/` as it is written, and a run that finds a newer checkpoint there than it has locally
copies it down first, so a run stopped on one machine resumes on another. Only torch and the standard
library (fsspec, imported for a URL only).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from components.common import BusyError, ConfigError, is_url
from components.runtime import Runtime

log = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^step-(\d{8})\.ckpt$")
LOCK_FILE = "trainer.lock"
ROOT_ENV = "AIGC_CHECKPOINT_ROOT"
"""Overrides `base.checkpoint_root` on one machine."""


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step:08d}.ckpt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files, newest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write atomically: temp file, fsync, rename, fsync the folder. A crash leaves the old set intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load tensors and plain containers only (`weights_only`): no code runs from the file."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not {"model", "optimizers", "step", "fingerprint"} <= set(state):
        raise ValueError("not a checkpoint of this project (missing keys)")
    return state


def newest_good_checkpoint(directory: Path, fingerprint: str) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads and matches this run; unreadable ones are reported and skipped."""
    for path in list_checkpoints(directory):
        try:
            state = load_checkpoint(path)
        except Exception as err:  # a truncated or garbled file: torch raises several types
            # Moved aside, not deleted: kept for inspection, and out of the way of pruning and of the
            # new checkpoint that will be written for the same step.
            kept = path.with_name(path.name + ".corrupt")
            os.replace(path, kept)
            log.warning(
                "checkpoint %s is unreadable (%s: %s); kept as %s, resuming from the previous one",
                path,
                type(err).__name__,
                err,
                kept.name,
            )
            continue
        if state["fingerprint"] != fingerprint:
            raise ValueError(f"{path} belongs to run {state['fingerprint']}, not {fingerprint}")
        return path, state
    return None


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Keep the newest `keep` readable-looking checkpoints; never touch anything else in the folder."""
    for old in list_checkpoints(directory)[keep:]:
        old.unlink(missing_ok=True)


@contextlib.contextmanager
def checkpoint_lock(directory: Path) -> Iterator[None]:
    """Hold `<directory>/trainer.lock` while this process trains into the folder; a second trainer is refused.

    Two trainers on one folder would resume, prune and overwrite each other's checkpoints, and both would save
    the model. The lock is an `flock`, which ends with its process however that ends (SIGKILL included), so a
    dead trainer never leaves a stale lock; the pid in the file only names the holder in the refusal.

    Raises:
        BusyError: another process holds the folder.
    """
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", errors="replace").strip() or "unknown"
            raise BusyError(
                f"checkpoint folder {directory} is in use by another trainer (pid {holder}); "
                f"wait for it to finish, or stop it (kill {holder}), then run the stage again"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # no pid left behind to be named by mistake
    finally:
        os.close(fd)  # releases the lock


def checkpoint_location(folder: Path, root: str | None) -> tuple[Path, CheckpointMirror | None]:
    """Where a stage with `--checkpoints folder` keeps its checkpoints under `root`: the local folder it trains
    into, and the mirror on shared storage (for a URL root)."""
    if not root:
        return folder, None
    if is_url(root):
        return folder, CheckpointMirror(f"{root.rstrip('/')}/{folder.name}")
    return Path(root).expanduser() / folder.name, None


def check_url(url: str, where: str) -> None:
    """A checkpoint URL whose filesystem fsspec has installed, else a ConfigError saying which package to add."""
    try:
        import fsspec

        fsspec.get_filesystem_class(url.split("://", 1)[0])
    except (ImportError, ValueError) as err:
        raise ConfigError(
            f"{where} is {url!r}, which fsspec cannot open here ({type(err).__name__}: {err}); install the package "
            "for its scheme (s3fs, gcsfs, adlfs, ...) or use a mounted path"
        ) from None


class CheckpointMirror:
    """A run folder's copy on shared storage (any fsspec URL). Rank 0 alone calls it.

    The local checkpoint is the one that counts: a failed copy up is a warning and training goes on, and a
    mirror that cannot be read resumes from the local folder. An upload runs inside the training step, so the
    other ranks wait for it (a checkpoint of many GB on a slow link wants a mounted path instead).
    """

    def __init__(self, url: str) -> None:
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def child(self, name: str) -> CheckpointMirror:
        return CheckpointMirror(f"{self.url}/{name}")

    def _names(self, folder: str) -> list[str]:
        if not self.fs.isdir(folder):
            return []
        return [str(p).rstrip("/").rpartition("/")[2] for p in self.fs.ls(folder, detail=False)]

    def _steps(self) -> list[tuple[int, str]]:
        """The mirror's checkpoints, newest first."""
        return sorted(((int(m.group(1)), n) for n in self._names(self.root) if (m := CHECKPOINT_PATTERN.match(n))), reverse=True)

    def push(self, path: Path, relative: str | None = None) -> None:
        """Copy a file of the local run folder up (`relative`: its path in the run folder, default its name);
        through a temporary name, so a reader never sees half a checkpoint."""
        target = f"{self.root}/{relative or path.name}"
        parent, _, name = target.rpartition("/")
        try:
            self.fs.makedirs(parent, exist_ok=True)
            partial = f"{parent}/.{name}.tmp"
            self.fs.put_file(str(path), partial)
            self.fs.mv(partial, target)
        except Exception as err:  # fsspec backends raise their own types; the local copy is safe either way
            log.warning("could not copy %s up to %s (%s: %s); training goes on", path.name, self.url, type(err).__name__, err)

    def prune(self, keep: int) -> None:
        try:
            for _, name in self._steps()[keep:]:
                self.fs.rm(f"{self.root}/{name}")
        except Exception as err:
            log.warning("could not prune old checkpoints at %s (%s: %s)", self.url, type(err).__name__, err)

    def pull(self, local: Path) -> None:
        """Copy the mirror's newest checkpoint down when it is newer than the local folder's, and the sample
        grids the local folder lacks: the run then resumes where the last machine stopped."""
        try:
            self._pull(local)
        except Exception as err:
            log.warning("could not read checkpoints at %s (%s: %s); resuming from %s", self.url, type(err).__name__, err, local)

    def _pull(self, local: Path) -> None:
        steps = self._steps()
        newest_local = next((int(CHECKPOINT_PATTERN.match(p.name)[1]) for p in list_checkpoints(local)), -1)  # type: ignore[index]
        if steps and steps[0][0] > newest_local:
            self._get(f"{self.root}/{steps[0][1]}", local / steps[0][1])
            log.info("copied checkpoint %s down from %s", steps[0][1], self.url)
        for name in self._names(f"{self.root}/samples"):
            if not (local / "samples" / name).exists():
                self._get(f"{self.root}/samples/{name}", local / "samples" / name)

    def _get(self, source: str, target: Path) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.tmp")
        self.fs.get_file(source, str(partial))
        os.replace(partial, target)


def newest_shared_checkpoint(directory: Path, fingerprint: str, runtime: Runtime) -> tuple[Path, dict[str, Any]] | None:
    """`newest_good_checkpoint` as rank 0 finds it, on every rank: only rank 0 reads the folder (another node
    may not have it), and sends the state to the others."""
    found = newest_good_checkpoint(directory, fingerprint) if runtime.is_main else None
    if not runtime.distributed:
        return found
    box: list[Any] = [found]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states(runtime: Runtime) -> list[dict[str, torch.Tensor]]:
    if not runtime.distributed:
        return [rng_state()]
    gathered: list[Any] = [None] * runtime.world_size
    torch.distributed.all_gather_object(gathered, rng_state())
    return gathered
