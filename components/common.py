"""Helpers every stage shares: params, errors with exit codes, stable hashing, safe paths, progress, and the
guard that ends a stage with the process that started it.

Only the standard library and yaml are imported here: training stages import this on a GPU machine that has
torch and transformers but no pyarrow, Prefect, DVC or Great Expectations. Parquet helpers live in
components.tables.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)

PARAMS_FILE = "params.yaml"

# sysexits.h codes: the flow retries only what could be transient, never bad data or bad config.
EX_DATAERR = 65
EX_TEMPFAIL = 75
EX_CONFIG = 78

DATASETS = ("text", "images", "restore")
"""The three embedded datasets: data-to-text copy, labelled images to generate, photos to restore."""

SPLITS = ("train", "val", "test")
SPLIT_NAMES = {
    **{name: name for name in SPLITS},
    **dict.fromkeys(("training",), "train"),
    **dict.fromkeys(("valid", "validation", "dev", "development"), "val"),
    **dict.fromkeys(("testing",), "test"),
}
"""Split names a user's split column or split files may use (case-insensitive), and the split each means."""
SPLIT_FILE = "split.json"
"""How the clean stage split the text (`by`, `group`, counts): in the clean and text features folders."""


class ConfigError(ValueError):
    """A params value is missing or invalid; the message names the key."""


class DataError(RuntimeError):
    """The input data cannot be processed as configured (missing columns, empty file, too much quarantined)."""


class TransientError(RuntimeError):
    """A failure that may pass on its own (shared storage unreachable, a folder in use): exit 75, which the flows
    retry."""


class BusyError(TransientError):
    """Another process holds what this one needs (a trainer writing the same checkpoint folder): retry later."""


def load_params(section: str, path: str | os.PathLike[str] = PARAMS_FILE) -> dict[str, Any]:
    """Read one top-level section of params.yaml, with `base` merged in under the key `base`.

    Args:
        section: the stage's own section (`ingest`, `clean`, ...).
        path: the params file; dvc.yaml runs stages from the repo root, so the default is relative.
    """
    params_path = Path(path)
    if not params_path.is_file():
        raise ConfigError(f"params file not found: {params_path.resolve()}")
    with params_path.open(encoding="utf-8") as fh:
        params = yaml.safe_load(fh) or {}
    if section not in params:
        raise ConfigError(f"params.yaml has no section '{section}'")
    return {**params[section], "base": params.get("base", {})}


def require(
    mapping: dict[str, Any],
    key: str,
    kind: type | tuple[type, ...],
    prefix: str,
    low: float | None = None,
    high: float | None = None,
) -> Any:
    """Return mapping[key] checked against `kind` (and, for numbers, [low, high]), or raise a ConfigError
    naming `prefix.key`."""
    if key not in mapping:
        raise ConfigError(f"missing params key '{prefix}.{key}'")
    value = mapping[key]
    if kind is int or kind == (int, float):
        # yaml reads `true` as a bool, which Python counts as an int: never a valid size or ratio here.
        numeric, noun = ((int,), "an integer") if kind is int else ((int, float), "a number")
        if isinstance(value, bool) or not isinstance(value, numeric):
            raise ConfigError(f"params key '{prefix}.{key}' must be {noun}, got {value!r}")
        check_range(value, f"{prefix}.{key}", low, high)
        return value
    if not isinstance(value, kind):
        expected = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ConfigError(f"params key '{prefix}.{key}' must be {expected}, got {value!r}")
    return value


def check_range(value: float, key: str, low: float | None = None, high: float | None = None) -> None:
    """Raise a ConfigError naming `key` when value is outside [low, high]."""
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ConfigError(f"params key '{key}' = {value!r} is outside {bounds}")


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same on every machine and Python run (unlike `hash`)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def unit_interval(text: str, seed: int) -> float:
    """Map `text` to a stable pseudo-random float in [0, 1), salted by `seed`."""
    return stable_hash(f"{seed}:{text}") / 2.0**64


def assign_splits(keys: list[str], fractions: dict[str, float], seed: int) -> list[str]:
    """Split by a hash of each key, so a key's split never depends on the other keys.

    Equal keys always land in the same split. When a split comes out empty although there are at least as
    many distinct keys as splits, the key whose hash lies nearest that split's interval moves there, so
    small sets (a dozen photos) still get a test image.

    Args:
        keys: the grouping key of each row (e.g. the canonical source record).
        fractions: split name -> fraction, in order; fractions sum to 1.
        seed: salts the hash so a different seed gives a different split.
    """
    names = list(fractions)
    distinct = sorted(set(keys))
    codes = split_codes([unit_interval(key, seed) for key in distinct], fractions)
    assigned = {key: names[code] for key, code in zip(distinct, codes.tolist(), strict=True)}
    return [assigned[key] for key in keys]


def split_codes(positions: Any, fractions: dict[str, float]) -> Any:
    """The split (an index into `fractions`) of each distinct key from its `unit_interval` position, as
    assign_splits describes; vectorised, so the streaming clean stage splits millions of keys from their
    positions alone. On a tie for the key nearest an empty split, the first key wins."""
    import numpy as np

    positions = np.asarray(positions, dtype=np.float64)
    names = list(fractions)
    highs, start = [], 0.0
    for name in names:
        start += fractions[name]
        highs.append(start)
    # The first split whose [low, high) holds the position (a zero-width split holds none); past the last: the last.
    codes = np.minimum(np.searchsorted(np.array(highs), positions, side="right"), len(names) - 1)
    if len(positions) >= len(names):
        for index, name in enumerate(names):
            counts = np.bincount(codes, minlength=len(names))
            if fractions[name] <= 0 or counts[index]:
                continue
            donors = np.flatnonzero(counts[codes] > 1)
            centre = ((highs[index - 1] if index else 0.0) + highs[index]) / 2
            codes[donors[np.argmin(np.abs(positions[donors] - centre))]] = index
    return codes


def write_json(data: Any, path: Path) -> None:
    """Write pretty JSON atomically (metrics files are read by DVC while other stages run)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (a `.<name>.lock` file beside it) for a whole read-modify-write, so two
    processes appending to the same JSON file (the retrain flow, a person at the CLI) never lose each other's
    entry; write_json alone only makes each rewrite atomic. Blocks until the other writer is done.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.with_name(f".{path.name}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def resolve_inside(root: Path, candidate: Path) -> Path | None:
    """Return candidate's real path if it stays inside root's real path, else None (symlink or `..` escape)."""
    real_root = root.resolve()
    real = (root / candidate).resolve() if not candidate.is_absolute() else candidate.resolve()
    return real if real == real_root or real_root in real.parents else None


def is_url(location: str) -> bool:
    """Whether `location` is a URL (s3://, gs://, file://, ssh://, ...) rather than a local path; DVC's own test."""
    return re.match(r"\w+://", location) is not None


def run_main(body: Callable[[], None]) -> None:
    """Run a stage's main body: log to stderr, turn known errors into one clear line and a sysexits code, and
    (in a process started to run the stage) end the stage with the program that started it (`die_with_parent`)."""
    logging.basicConfig(
        level=os.environ.get("AIGC_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("great_expectations", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    stage = stage_program()
    if stage is not None:
        die_with_parent(stage)
    try:
        body()
    except ConfigError as err:
        log.error("configuration error: %s", err)
        raise SystemExit(EX_CONFIG) from err
    except DataError as err:
        log.error("data error: %s", err)
        raise SystemExit(EX_DATAERR) from err
    except BusyError as err:
        log.error("busy: %s", err)
        raise SystemExit(EX_TEMPFAIL) from err
    except TransientError as err:
        log.error("temporary failure: %s", err)
        raise SystemExit(EX_TEMPFAIL) from err


def progress(iterable: Iterable[Any], silent: bool = False, **kwargs: Any) -> Any:
    """tqdm on a terminal, quiet in CI logs and DVC's captured output unless AIGC_PROGRESS=1 asks for it."""
    from tqdm.auto import tqdm

    disable = silent or (not sys.stderr.isatty() and os.environ.get("AIGC_PROGRESS") != "1")
    return tqdm(iterable, disable=disable, **kwargs)


# --- a stage ends with the process that started it ----------------------------------------------------------

RELAY_SHELLS = frozenset({"sh", "dash", "bash", "zsh", "ksh", "mksh", "busybox", "fish", "csh", "tcsh"})
"""Programs that only pass a command on (DVC runs a stage's cmd through `$SHELL -c`): never a stage's owner."""
RELAY_LAUNCHERS = frozenset({"torchrun", "torch.distributed.run", "torch.distributed.launch"})
"""Launchers whose children are the stage (DDP workers): part of the stage's process tree, not its owner."""
WATCH_EVERY_S = 0.2
STOP_GRACE_S = 0.5
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_GUARDED = threading.Event()


@dataclass(frozen=True)
class ProcessStat:
    """The fields of /proc/<pid>/stat the guard reads; `start` (clock ticks after boot) tells a reused pid apart."""

    pid: int
    name: str
    state: str
    ppid: int
    start: int


def process_stat(pid: int) -> ProcessStat | None:
    """/proc/<pid>/stat, or None when there is no such process (or no /proc). Any other failure to read it
    (too many open files, no memory) raises: it says nothing about whether the process runs."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The name sits in parentheses and may itself hold spaces or parentheses: the fields follow the last ")".
    name, fields = text[text.index("(") + 1 : text.rindex(")")], text[text.rindex(")") + 2 :].split()
    return ProcessStat(pid, name, fields[0], int(fields[1]), int(fields[19]))


def still_running(process: ProcessStat) -> bool:
    """Whether `process` itself (not a newer one that reuses its pid) runs; a zombie has exited, unreaped.
    Raises OSError when /proc cannot say (the watcher then asks again rather than guess)."""
    now = process_stat(process.pid)
    return now is not None and now.start == process.start and now.state not in ("Z", "X")


def _maybe_running(process: ProcessStat) -> bool:
    """still_running, counting a process /proc cannot tell about as running: while stopping, err on signalling."""
    try:
        return still_running(process)
    except OSError:
        return True


def is_relay(process: ProcessStat) -> bool:
    """A shell or a torchrun agent: a process between a stage and the program that started it."""
    if process.name in RELAY_SHELLS:
        return True
    try:
        argv = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # `torchrun ...`, `python .../bin/torchrun ...`, `python -m torch.distributed.run ...`
    return any(Path(arg.decode("utf-8", errors="replace")).name in RELAY_LAUNCHERS for arg in argv[:3])


def owner_of(pid: int) -> tuple[list[ProcessStat], ProcessStat | None]:
    """The relays above `pid` (its parent first) and the first ancestor that is not one (e.g. `dvc`): the
    process whose death ends the stage. No owner when the walk reaches init, which never exits."""
    relays: list[ProcessStat] = []
    current = process_stat(pid)
    while current is not None and current.ppid > 1:
        parent = process_stat(current.ppid)
        if parent is None or not is_relay(parent):
            return relays, parent
        relays.append(parent)
        current = parent
    return relays, None


def descendants(pid: int) -> list[ProcessStat]:
    """Every process below `pid` (DataLoader workers, whatever they started), parents before children."""
    children: dict[int, list[ProcessStat]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = process_stat(int(entry))
        except OSError:  # another user's process under hidepid, or out of file handles: not ours to stop
            continue
        if stat is not None:
            children.setdefault(stat.ppid, []).append(stat)
    found: list[ProcessStat] = []
    todo = [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += [child.pid for child in below]
    return found


def end_processes(processes: list[ProcessStat], grace: float = STOP_GRACE_S) -> None:
    """SIGTERM each (a torchrun agent then stops its workers), SIGKILL whatever still runs `grace` s later."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for process in processes:
            if _maybe_running(process):
                with contextlib.suppress(OSError):
                    os.kill(process.pid, sig)
        deadline = time.monotonic() + grace
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(map(_maybe_running, processes)):
            time.sleep(0.05)


@functools.cache
def _prctl() -> Any:
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


def signal_on_parent_death() -> bool:
    """Ask the kernel for SIGTERM when this process's parent exits (Linux); False when it refused.

    Also run in every child this process forks, so `prctl` is looked up here first: a forked child of a
    threaded process must not load libraries."""
    return _prctl()(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0


def _write_stderr(data: bytes) -> None:
    with contextlib.suppress(OSError):
        os.write(2, data)


def _stop(name: str, gone: ProcessStat, relays: list[ProcessStat]) -> None:
    """Say why on stderr, end this process's tree and the relays above it, and exit at once."""
    # From a helper thread: with its reader dead, a full stderr pipe would block the write, and the stop, forever.
    writer = threading.Thread(
        target=_write_stderr, args=(f"{name}: the process that started it (pid {gone.pid}) is gone; stopping\n".encode(),)
    )
    writer.daemon = True
    writer.start()
    writer.join(STOP_GRACE_S)
    try:
        end_processes(descendants(os.getpid()) + [r for r in relays if r.pid != gone.pid])
    finally:  # whatever failed above, this process must not outlive its owner
        os._exit(128 + signal.SIGTERM)


def _watch(name: str, parent: ProcessStat, relays: list[ProcessStat], owner: ProcessStat | None) -> None:
    while True:
        time.sleep(WATCH_EVERY_S)
        try:
            if os.getppid() != parent.pid:  # the parent exited (PR_SET_PDEATHSIG normally got here first)
                _stop(name, parent, relays)
            if owner is not None and not still_running(owner):
                _stop(name, owner, relays)
        except (OSError, ValueError, IndexError) as err:  # a /proc read failed: no answer, so no stop; ask again
            log.debug("die-with-parent watcher: %s", err)


def die_with_parent(name: str) -> None:
    """End this process, and every process it started, when the program that started it is gone.

    `dvc repro` runs a stage through `$SHELL -c`; killed with SIGKILL it cannot stop the stage, which would
    train on as an orphan while a rerun starts a second trainer, then overwrite the rerun's outputs. Two
    guards, on Linux (elsewhere this does nothing):

    - the kernel sends SIGTERM when the direct parent exits (`PR_SET_PDEATHSIG`), and to every process this
      one forks (DataLoader workers) when this one exits, however it exits;
    - a daemon thread watches the owner, the first ancestor that is neither a shell nor a torchrun agent (the
      `dvc` process), by pid and start time, so a reused pid is not taken for it. Once the owner is gone it
      writes `<name>: the process that started it (pid N) is gone; stopping` to stderr, ends every process
      below this one (DataLoader workers) and the relays above it (the orphaned shell; the torchrun agent,
      whose other workers stop with it) and exits within about a second.

    Armed once per process; `run_main` arms it when the process was started to run a stage. A stage meant to
    outlive the shell it is typed in should be started detached (`setsid -f`, tmux), not under `nohup`.

    Args:
        name: the stage, as the stderr line names it.
    """
    if not sys.platform.startswith("linux") or _GUARDED.is_set():
        return
    _GUARDED.set()
    if not signal_on_parent_death():
        log.debug("prctl(PR_SET_PDEATHSIG) failed; the watcher alone guards this process")
    os.register_at_fork(after_in_child=signal_on_parent_death)
    try:
        parent = process_stat(os.getppid())
        relays, owner = owner_of(os.getpid())
    except OSError as err:  # /proc unreadable: the kernel's signal alone guards this stage
        log.warning("%s: cannot read /proc (%s); the stage stops with its parent only", name, err)
        return
    if parent is None:
        return
    if os.getppid() != parent.pid:  # the parent exited before the kernel was told
        _stop(name, parent, relays)
    threading.Thread(target=_watch, args=(name, parent, relays, owner), name="die-with-parent", daemon=True).start()


def stage_program() -> str | None:
    """The stage this process was started to run (`python -m components.train_text` -> `train_text`), or None
    when a stage's main is called from another program (a test, a notebook), whose process is left alone."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is None or not spec.origin or len(Path(spec.origin).parents) < 2:
        return None
    project = Path(__file__).resolve().parents[1]
    return spec.name.rpartition(".")[2] if Path(spec.origin).resolve().parents[1] == project else None
