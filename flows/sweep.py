"""Hyper-parameter sweeps as DVC experiments: grid and random search on DVC's queue, Bayesian search with Optuna.

    python -m flows.sweep grid   -S train_text.lr=1e-3,3e-3 -S train_text.model.n_layer=2,4 --jobs 2
    python -m flows.sweep random --trials 8 -S 'train_text.lr=loguniform(1e-4,1e-2)' --jobs 2
    python -m flows.sweep optuna --trials 20 --objective metrics/text.json:bleu --direction maximize
    python -m flows.sweep show   --name <sweep>          # the table, plot and importances of a sweep again

Every trial is a named DVC experiment (`<sweep>-<trial number>`) of the params.yaml in the workspace with the
trial's values set: `dvc exp show` lists it and `dvc exp apply` brings it back. A trial runs the target stage
and what it depends on, never a stage that runs serving code (`package`), so a sweep adds nothing to BentoML's
store and never moves what is served. Grid and random trials are queued with `dvc exp run --queue` and run by
`dvc queue start -j <jobs>`, each in its own temporary workspace. Optuna's TPE sampler proposes one trial at a
time, run with `dvc exp run --temp`; its pruner reads the trial's dvclive curve while it trains and stops a
hopeless one. Whether a trial counts as pruned depends only on its curve: one that ended before the sweep read
it is judged on the whole curve afterwards (its objective is kept beside the verdict).

Without -S, the space is params.yaml's `sweeps.space`; the other options default to its `sweeps` section. The
study (every trial's params, state, objective and curve) is an SQLite file, `data/sweeps/<name>/study.db`:
running the same command again resumes it. A trial the previous run left unfinished is asked again, so a
search of N trials ends with N, however often it was stopped. Beside the study: `trials.csv` (the table),
`history.html` (the objective against the trial), `importances.json` / `importances.html` and one log per trial.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import itertools
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from components.common import PARAMS_FILE, PR_SET_PDEATHSIG, BusyError, ConfigError, DataError, run_main, write_json
from components.pipeline import load_stages
from flows.remote import dvc_env, dvc_executable

log = logging.getLogger(__name__)

MODES = ("grid", "random", "optuna")
DIRECTIONS = ("maximize", "minimize")
SWEEPS_DIR = Path("data/sweeps")
STUDY_FILE = "study.db"
KINDS = ("choice", "range", "uniform", "loguniform")
POLL_S = 1.0
MAX_FAILED_IN_A_ROW = 3
QUEUE_STATUS_TIMEOUT_S = 60
PENDING = ("queued", "running")
WORKER_START_S = 20.0  # a queue worker started this long ago has written its pid file
STOP_GRACE_S = 10.0


# --- the search space ---------------------------------------------------------------------------------------


def _scalar(text: str) -> Any:
    """A value as written on the command line: an int, a float, true / false / null, else the string."""
    text = text.strip()
    for convert in (int, float):
        with contextlib.suppress(ValueError):
            return convert(text)
    return {"true": True, "false": False, "null": None}.get(text.lower(), text.strip("'\""))


@dataclass(frozen=True)
class Dimension:
    """One swept param: listed values (`a,b,c`, `choice(a,b,c)`), integers (`range(low,high[,step])`, both ends
    included), or floats (`uniform(low,high)`, `loguniform(low,high)`, for learning rates)."""

    param: str
    kind: str
    values: tuple[Any, ...] = ()
    low: float = 0.0
    high: float = 0.0
    step: int = 1

    @classmethod
    def parse(cls, param: str, spec: Any, where: str) -> Dimension:
        if isinstance(spec, list):
            spec = ",".join(json.dumps(v) if isinstance(v, str) else str(v) for v in spec)
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigError(f"{where}: expected values like 'a,b', 'range(1,4)' or 'loguniform(1e-4,1e-2)', got {spec!r}")
        call = re.fullmatch(r"\s*(\w+)\((.*)\)\s*", spec)
        kind, args = (call.group(1), call.group(2)) if call else ("choice", spec)
        values = tuple(_scalar(a) for a in args.split(",")) if args.strip() else ()
        if kind not in KINDS:
            raise ConfigError(f"{where}: unknown '{kind}(...)'; use one of {list(KINDS)} or a comma-separated list")
        if kind == "choice":
            if not values or len(set(map(repr, values))) != len(values):
                raise ConfigError(f"{where}: choice needs distinct values, got {spec!r}")
            return cls(param, kind, values)
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if len(numbers) != len(values) or len(values) not in ((2, 3) if kind == "range" else (2,)):
            usage = "range(low,high[,step])" if kind == "range" else f"{kind}(low,high)"
            raise ConfigError(f"{where}: expected {usage} with numbers, got {spec!r}")
        low, high = numbers[0], numbers[1]
        if kind == "range":
            if not all(isinstance(v, int) for v in numbers) or (len(numbers) == 3 and numbers[2] < 1):
                raise ConfigError(f"{where}: range takes integers and a step >= 1, got {spec!r}")
        if not low < high or (kind == "loguniform" and low <= 0):
            raise ConfigError(f"{where}: need low < high{' and low > 0' if kind == 'loguniform' else ''}, got {spec!r}")
        return cls(param, kind, (), float(low), float(high), int(numbers[2]) if len(numbers) == 3 else 1)

    def grid_values(self, where: str) -> list[Any]:
        if self.kind == "choice":
            return list(self.values)
        if self.kind == "range":
            return list(range(int(self.low), int(self.high) + 1, self.step))
        raise ConfigError(f"{where}: a grid needs listed values or a range, not {self.kind}(); use random or optuna")

    def extremes(self) -> list[Any]:
        """The values a params check tries: every listed value, else both ends."""
        if self.kind == "choice":
            return list(self.values)
        return [int(self.low), int(self.high)] if self.kind == "range" else [self.low, self.high]

    def distribution(self) -> Any:
        import optuna

        d = optuna.distributions
        if self.kind == "choice":
            return d.CategoricalDistribution(list(self.values))
        if self.kind == "range":
            return d.IntDistribution(int(self.low), int(self.high), step=self.step)
        return d.FloatDistribution(self.low, self.high, log=self.kind == "loguniform")

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.values
        number = isinstance(value, int) if self.kind == "range" else isinstance(value, (int, float))
        if isinstance(value, bool) or not number:
            return False
        return self.low <= value <= self.high and (self.kind != "range" or (value - int(self.low)) % self.step == 0)

    def describe(self) -> str:
        if self.kind == "choice":
            return ",".join(map(str, self.values))
        return f"{self.kind}({self.low:g},{self.high:g}{f',{self.step}' if self.step != 1 else ''})"


def parse_space(entries: dict[str, Any], where: str) -> tuple[Dimension, ...]:
    if not entries:
        raise ConfigError(f"{where}: nothing to sweep; give -S <param>=<values> or fill params.yaml 'sweeps.space'")
    return tuple(Dimension.parse(param, spec, f"{where} '{param}'") for param, spec in entries.items())


def space_from_options(options: list[str]) -> dict[str, str]:
    """`-S key=values` options as {key: values}."""
    entries = {}
    for option in options:
        key, sep, values = option.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"-S {option!r}: expected <param>=<values>, e.g. -S train_text.lr=1e-3,3e-3")
        entries[key.strip()] = values
    return entries


# --- what a sweep is ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Objective:
    path: str  # a metrics file of the target's pipeline, as `dvc exp show` names it
    key: str  # dotted, inside that file

    @classmethod
    def parse(cls, text: str, where: str) -> Objective:
        path, sep, key = str(text).rpartition(":")
        if not sep or not path or not key:
            raise ConfigError(f"{where}: expected <metrics file>:<key>, e.g. metrics/text.json:bleu, got {text!r}")
        return cls(path, key)

    def __str__(self) -> str:
        return f"{self.path}:{self.key}"

    def read(self, metrics: dict[str, Any]) -> float | None:
        value: Any = (metrics.get(self.path) or {}).get("data")
        for part in self.key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class Pruning:
    """Optuna's median pruner on a dvclive curve of the trial: `<stage>:<metric>` (the stage's --metrics-dir)."""

    curve: str
    direction: str
    warmup_steps: int
    startup_trials: int


@dataclass(frozen=True)
class Sweep:
    mode: str
    name: str
    space: tuple[Dimension, ...]
    target: str
    objective: Objective
    direction: str
    trials: int | None  # None (grid): every point
    jobs: int
    seed: int
    pruning: Pruning | None
    first: tuple[dict[str, Any], ...] = ()  # points to try before the sampler's (`--enqueue`)

    @property
    def folder(self) -> Path:
        return SWEEPS_DIR / self.name

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed study must share with the run that started it."""
        return {"mode": self.mode, "space": {d.param: d.describe() for d in self.space}, "target": self.target,
                "objective": str(self.objective), "direction": self.direction}  # fmt: skip


def _section(params: dict[str, Any]) -> dict[str, Any]:
    section = params.get("sweeps")
    if not isinstance(section, dict):
        raise ConfigError("params.yaml has no 'sweeps' section: add it (see README 'Tuning') or give every option")
    return section


def sweep_from(params: dict[str, Any], mode: str, overrides: dict[str, Any]) -> Sweep:
    """The sweep of params.yaml's `sweeps` section with the command line's options on top (None: not given)."""
    if mode not in MODES:
        raise ConfigError(f"sweep mode must be one of {list(MODES)}, got {mode!r}")
    section = _section(params)

    def option(key: str, kind: type | tuple[type, ...]) -> Any:
        value = overrides.get(key)
        value = section.get(key) if value is None else value
        if value is None or isinstance(value, bool) or not isinstance(value, kind):
            raise ConfigError(f"params key 'sweeps.{key}' (or --{key.replace('_', '-')}) must be a {kind}, got {value!r}")
        return value

    space_entries = overrides.get("space") or section.get("space") or {}
    where = "-S" if overrides.get("space") else "params key 'sweeps.space'"
    space = parse_space(space_entries, where)
    direction = option("direction", str)
    if direction not in DIRECTIONS:
        raise ConfigError(f"params key 'sweeps.direction' must be one of {list(DIRECTIONS)}, got {direction!r}")
    if mode == "grid" and overrides.get("trials") is not None:
        raise ConfigError("--trials: a grid runs every point; use random or optuna for a number of trials")
    if mode == "optuna" and overrides.get("jobs") not in (None, 1):
        raise ConfigError("--jobs: optuna runs one trial at a time (its sampler learns from each)")
    trials = option("trials", int) if mode != "grid" else None
    jobs = option("jobs", int) if mode != "optuna" else 1
    if (trials is not None and trials < 1) or jobs < 1:
        raise ConfigError("sweeps.trials and sweeps.jobs must be >= 1")
    pruning = None
    prune = section.get("prune")
    if mode == "optuna" and prune is not None and not overrides.get("no_prune"):
        if not isinstance(prune, dict) or not isinstance(prune.get("curve"), str) or ":" not in prune["curve"]:
            raise ConfigError(f"params key 'sweeps.prune.curve' must be '<stage>:<dvclive metric>', got {prune!r}")
        if prune.get("direction") not in DIRECTIONS:
            raise ConfigError(f"params key 'sweeps.prune.direction' must be one of {list(DIRECTIONS)}")
        warmup, startup = prune.get("warmup_steps", 0), prune.get("startup_trials", 1)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (warmup, startup)):
            raise ConfigError(f"params keys 'sweeps.prune.warmup_steps' and 'startup_trials' must be integers >= 0, got {prune}")
        pruning = Pruning(prune["curve"], prune["direction"], warmup, startup)
    first = tuple(overrides.get("enqueue") or ())
    dimensions = {d.param: d for d in space}
    for point in first:
        unknown = sorted(set(point) - set(dimensions)) if isinstance(point, dict) else ["(not a mapping)"]
        if unknown or mode == "grid":
            raise ConfigError(f"--enqueue {point}: a random or optuna trial's values of swept params; not {unknown or 'a grid'}")
        for param, value in point.items():
            if not dimensions[param].contains(value):
                raise ConfigError(f"--enqueue {point}: {param}={value!r} is outside its space {dimensions[param].describe()}")
    name = overrides.get("name") or f"{mode}-{'-'.join(re.sub(r'[^A-Za-z0-9]+', '_', d.param) for d in space)}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,80}", name) or ".." in name:
        raise ConfigError(f"sweep name {name!r}: use letters, digits, '.', '_' and '-' (it names git refs)")
    return Sweep(
        mode=mode,
        name=name,
        space=space,
        target=option("target", str),
        objective=Objective.parse(option("objective", str), "params key 'sweeps.objective' (or --objective)"),
        direction=direction,
        trials=trials,
        jobs=jobs,
        seed=option("seed", int),
        pruning=pruning,
        first=first,
    )


def trial_stages(root: Path, target: str) -> list[str]:
    """The stages a trial runs: `target` and everything it depends on, per DVC's graph."""
    from flows.stages import dvc_stage_order, dvc_upstream

    return dvc_stage_order(root, dvc_upstream(root, target))


def check_sweep(root: Path, sweep: Sweep) -> list[str]:
    """Refuse, before anything runs, a sweep that would touch serving, set a param params.yaml lacks, or give a
    stage a value it rejects (each listed value and each end of a range is tried). Returns the trial's stages."""
    from flows.stages import params_problems

    stages = load_stages(root)
    if sweep.target not in stages:
        raise ConfigError(f"sweep target '{sweep.target}' is not a stage of dvc.yaml (it has {list(stages)})")
    run = trial_stages(root, sweep.target)
    serving = [name for name in run if _module(stages[name]).startswith("serving.")]
    if serving:
        raise ConfigError(f"sweep target '{sweep.target}' runs {serving}, which writes to the served model store: "
                          "sweep up to an evaluation stage")  # fmt: skip
    metrics = {path for name in run for path in stages[name].metrics}
    if sweep.objective.path not in metrics:
        raise ConfigError(f"objective {sweep.objective}: no stage up to '{sweep.target}' writes {sweep.objective.path} "
                          f"(they write {sorted(metrics)})")  # fmt: skip
    written = root / sweep.objective.path
    try:  # the workspace's own run: a key it lacks would fail every trial
        data = json.loads(written.read_text(encoding="utf-8")) if written.is_file() else None
    except (OSError, ValueError):
        data = None
    if isinstance(data, dict) and sweep.objective.read({sweep.objective.path: {"data": data}}) is None:
        keys = sorted(k for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise ConfigError(f"objective {sweep.objective}: the workspace's {sweep.objective.path} has no number "
                          f"'{sweep.objective.key}' (it has {keys})")  # fmt: skip
    if sweep.pruning is not None:
        curve_stage = sweep.pruning.curve.partition(":")[0]
        if curve_stage not in run:
            raise ConfigError(f"params key 'sweeps.prune.curve': stage '{curve_stage}' is not run up to '{sweep.target}'")
        curve_file(root, sweep.pruning)  # a stage without --metrics-dir is refused here
    params = yaml.safe_load((root / PARAMS_FILE).read_text(encoding="utf-8")) or {}
    for dimension in sweep.space:
        if not _has_key(params, dimension.param):
            raise ConfigError(f"-S {dimension.param}: params.yaml has no such key (a typo would be a new, unread param)")
    points = _points_to_check(sweep)
    with tempfile.TemporaryDirectory(prefix="sweep-check-") as tmp:
        for point in points:
            trial_params = _with_values(params, point)
            (Path(tmp) / PARAMS_FILE).write_text(yaml.safe_dump(trial_params, sort_keys=False), encoding="utf-8")
            problems = params_problems(run, repo_root=str(root), params_path=Path(tmp) / PARAMS_FILE)
            if problems:
                values = ", ".join(f"{k}={v}" for k, v in point.items())
                raise ConfigError(f"sweep point {values} is refused by {problems[0]}")
    return run


def _module(stage: Any) -> str:
    try:
        return stage.module
    except ValueError:  # a command that is not `python -m ...`: not this pipeline's serving code
        return ""


def _points_to_check(sweep: Sweep) -> list[dict[str, Any]]:
    if sweep.mode == "grid":
        return grid_points(sweep)
    return [{d.param: value} for d in sweep.space for value in d.extremes()] + list(sweep.first)


def grid_points(sweep: Sweep) -> list[dict[str, Any]]:
    names = [d.param for d in sweep.space]
    values = [d.grid_values(f"-S {d.param}") for d in sweep.space]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]


def _has_key(params: dict[str, Any], dotted: str) -> bool:
    node: Any = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _with_values(params: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(params))
    for dotted, value in point.items():
        *parents, last = dotted.split(".")
        node = out
        for part in parents:
            node = node[part]
        node[last] = value
    return out


def curve_file(root: Path, pruning: Pruning) -> Path:
    """The dvclive curve `<stage>:<metric>` of a workspace: dvclive writes `<dir>/plots/metrics/<metric>.tsv`
    under the folder the stage is given as --metrics-dir."""
    stage_name, _, metric = pruning.curve.partition(":")
    stages = load_stages(root)
    if stage_name not in stages:
        raise ConfigError(f"params key 'sweeps.prune.curve': no stage '{stage_name}' in dvc.yaml")
    try:
        folder = stages[stage_name].argument("--metrics-dir")
    except ValueError as err:
        raise ConfigError(f"params key 'sweeps.prune.curve': stage '{stage_name}' writes no dvclive curves ({err})") from None
    return folder / "plots" / "metrics" / f"{metric}.tsv"


def read_curve(path: Path, stale: str | None = None) -> list[tuple[int, float]]:
    """(step, value) rows of a dvclive .tsv; a row being written is skipped. A file whose text is `stale` (what
    the trial's workspace started with, before the stage rewrote it) has none."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    return [] if text == stale else curve_rows(text)


def curve_rows(text: str) -> list[tuple[int, float]]:
    rows = []
    for line in text.splitlines()[1:]:
        parts = line.split("\t")
        with contextlib.suppress(ValueError, IndexError):
            rows.append((int(parts[0]), float(parts[-1])))
    return rows


# --- DVC ----------------------------------------------------------------------------------------------------


def dvc(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([dvc_executable(), *args], cwd=root, env=dvc_env(), capture_output=True, text=True)
    if check and done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise DataError(f"dvc {' '.join(args[:3])} failed (exit {done.returncode}): {' | '.join(tail)}")
    return done


@dataclass(frozen=True)
class Experiment:
    name: str
    rev: str


def experiments(root: Path) -> dict[str, Experiment]:
    """The saved DVC experiments by name, from their git refs (`refs/exps/<baseline>/<name>`); one of HEAD's
    baseline wins a name. Read every second while trials run: git answers at once, where `dvc exp show` reads
    every experiment's data and asks the queue's workers."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps"],
                          cwd=root, capture_output=True, text=True, check=False).stdout.split("\n")  # fmt: skip
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=False).stdout.strip()
    found: dict[str, Experiment] = {}
    for line in refs:
        rev, _, ref = line.partition(" ")
        parts = ref.split("/")
        if len(parts) != 5 or parts[1] != "exps":
            continue  # refs/exps/exec/..., stash and other bookkeeping refs
        name, baseline = parts[4], parts[2] + parts[3]
        if name not in found or baseline == head:
            found[name] = Experiment(name, rev)
    return found


def committed_json(root: Path, rev: str, path: str) -> Any:
    shown = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True, check=False)
    try:
        return json.loads(shown.stdout) if shown.returncode == 0 else None
    except ValueError:
        return None


def queue_status(root: Path) -> dict[str, str]:
    """{experiment name: queued | running | success | failed} from `dvc queue status` (given a minute)."""
    try:
        done = subprocess.run([dvc_executable(), "queue", "status"], cwd=root, env=dvc_env(), capture_output=True,
                              text=True, timeout=QUEUE_STATUS_TIMEOUT_S)  # fmt: skip
    except subprocess.TimeoutExpired:
        log.warning("dvc queue status did not answer in %d s", QUEUE_STATUS_TIMEOUT_S)
        return {}
    status = {}
    for line in done.stdout.splitlines()[1:]:
        columns = re.split(r"\s{2,}", line.strip())
        if len(columns) >= 4:
            status[columns[1]] = columns[-1].lower()
    return status


def set_options(point: dict[str, Any]) -> list[str]:
    options = []
    for param, value in point.items():
        options += ["-S", f"{param}={json.dumps(value) if isinstance(value, (str, bool)) or value is None else repr(value)}"]
    return options


# --- the study ----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def owning(folder: Path, name: str) -> Iterator[None]:
    """One search per study at a time; a killed search lets go (the kernel drops its lock)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BusyError(f"sweep '{name}' is already running (its lock: {folder / '.lock'})") from None
        yield


def open_study(root: Path, sweep: Sweep) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = root / sweep.folder
    folder.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.RDBStorage(f"sqlite:///{(folder / STUDY_FILE).resolve()}")
    study = optuna.create_study(study_name=sweep.name, storage=storage, direction=sweep.direction,
                                pruner=_pruner(sweep), load_if_exists=True)  # fmt: skip
    started = study.user_attrs.get("sweep")
    if started is None:
        study.set_user_attr("sweep", sweep.fingerprint())
    elif started != sweep.fingerprint():
        raise ConfigError(f"sweep '{sweep.name}' was started as {started}, not {sweep.fingerprint()}: pick another --name")
    return study


def _pruner(sweep: Sweep) -> Any:
    import optuna

    if sweep.pruning is None:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=sweep.pruning.startup_trials, n_warmup_steps=sweep.pruning.warmup_steps)


def finished(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))


def recover(root: Path, study: Any, sweep: Sweep) -> list[Any]:
    """The trials a stopped run left RUNNING. An Optuna trial's `dvc exp run` may outlive the run that started it
    (DVC ignores the interrupt while a stage runs): it is interrupted first. Then those DVC finished are told
    their result (an Optuna trial's after the pruner has read its curve); those still in DVC's queue are
    returned, to be waited for; the rest failed with the run, and their params are asked again first."""
    from optuna.trial import Trial, TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not stale:
        return []
    for trial in stale:
        if "pgid" in trial.user_attrs:
            _interrupt_leftover(int(trial.user_attrs["pgid"]), trial.user_attrs.get("experiment", ""))
    found = experiments(root)
    queued = queue_status(root) if sweep.mode != "optuna" else {}
    waiting = []
    for trial in stale:
        name = trial.user_attrs.get("experiment")
        if name in found:
            pruned_at = None
            if sweep.pruning is not None:
                rows = _committed_curve(root, found[name].rev, curve_file(root, sweep.pruning))
                pruned_at = _report(Trial(study, trial._trial_id), rows, set(trial.intermediate_values), _sign(sweep))
            tell(root, study, trial, sweep, found[name], pruned_at)
        elif queued.get(name) in PENDING:
            waiting.append(trial)
        else:
            study.tell(trial.number, state=TrialState.FAIL)
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            log.info("trial %d (%s) was cut off by a stopped run: it runs again", trial.number, name)
    return waiting


def _interrupt_leftover(pgid: int, name: str) -> None:
    """Interrupt the process group of a trial a killed sweep started, if it still runs: its leader is that
    trial's `dvc exp run` (checked by name, since a pid can be reused once its group is empty)."""
    try:
        command = Path(f"/proc/{pgid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        command = None  # the leader is gone; the group lives on only while a member of it does
    if command is not None and f"--name {name} " not in f"{command} ":
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGINT)
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline:
            os.killpg(pgid, 0)  # ProcessLookupError once every member is gone
            time.sleep(0.2)
        os.killpg(pgid, signal.SIGKILL)


def tell(root: Path, study: Any, trial: Any, sweep: Sweep, experiment: Experiment | None, pruned_at: int | None) -> str:
    """Record a trial's end: complete with its objective, pruned (its objective kept aside if it has one), or
    failed. Returns the state's name."""
    from optuna.trial import TrialState

    number = trial.number
    data = committed_json(root, experiment.rev, sweep.objective.path) if experiment is not None else None
    value = sweep.objective.read({sweep.objective.path: {"data": data}}) if isinstance(data, dict) else None
    if experiment is not None:
        study._storage.set_trial_user_attr(trial._trial_id, "rev", experiment.rev)
    if pruned_at is not None:
        if value is not None:
            study._storage.set_trial_user_attr(trial._trial_id, "objective_if_completed", value)
        study.tell(number, state=TrialState.PRUNED)
        return "PRUNED"
    if value is None or not math.isfinite(value):
        study.tell(number, state=TrialState.FAIL)
        return "FAIL"
    study.tell(number, value)
    return "COMPLETE"


def _ask(study: Any, sweep: Sweep) -> Any:
    trial = study.ask({d.param: d.distribution() for d in sweep.space})
    trial.set_user_attr("experiment", f"{sweep.name}-{trial.number}")
    return trial


def _taken(study: Any) -> list[dict[str, Any]]:
    """The points of every trial but the failed ones; a queued (waiting) trial's are its fixed params."""
    from optuna.trial import TrialState

    kept = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL]
    return [t.system_attrs.get("fixed_params") or t.params for t in kept]


def enqueue_first(study: Any, sweep: Sweep) -> None:
    """The `--enqueue` points the study has not run or queued yet, before anything the sampler proposes."""

    taken = _taken(study)
    for point in sweep.first:
        if not any(all(params.get(k) == v for k, v in point.items()) for params in taken):
            study.enqueue_trial(point)


def _remaining(study: Any, sweep: Sweep, total: int, waiting: int = 0) -> int:
    return max(0, total - len(finished(study)) - waiting)


# --- running trials -----------------------------------------------------------------------------------------


def run_queued(root: Path, sweep: Sweep, study: Any, total: int, say: Callable[[str], None]) -> None:
    """Grid and random: queue the trials with `dvc exp run --queue`, run them with `dvc queue start -j`, and
    record each as DVC finishes it."""
    waiting = {t.user_attrs["experiment"]: t for t in recover(root, study, sweep)}
    enqueue_grid(study, sweep) if sweep.mode == "grid" else enqueue_first(study, sweep)
    for _ in range(_remaining(study, sweep, total, len(waiting))):
        trial = _ask(study, sweep)
        name = trial.user_attrs["experiment"]
        dvc(root, "exp", "run", "--queue", sweep.target, "--name", name, *set_options(trial.params))
        waiting[name] = trial
        say(f"queued {name}: {_describe(trial.params)}")
    if not waiting:
        return
    start_queue(root, sweep)
    started, idle_polls, failed = time.monotonic(), 0, []
    while waiting:
        time.sleep(POLL_S)
        found = experiments(root)
        for name in [name for name in waiting if name in found]:
            state = tell(root, study, waiting.pop(name), sweep, found[name], None)
            say(f"{name}: {state.lower()}")
            failed += [name] if state == "FAIL" else []
        idle_polls = 0 if queue_workers(root) else idle_polls + 1
        if not waiting or idle_polls < 3 or time.monotonic() - started < WORKER_START_S:
            continue
        # No worker left: they end once the queue is empty, or were killed. What DVC did not save failed (or
        # was left running by a killed worker); what is still queued needs workers again.
        status, found = queue_status(root), experiments(root)
        for name in [name for name in waiting if status.get(name, "queued") != "queued" and name not in found]:
            tell(root, study, waiting.pop(name), sweep, None, None)
            say(f"{name}: fail ({status[name]}; its log: dvc queue logs {name})")
            failed.append(name)
        if any(status.get(name) == "queued" for name in waiting):
            start_queue(root, sweep)
            started, idle_polls = time.monotonic(), 0
    if failed:
        raise DataError(f"sweep '{sweep.name}': trials {failed} failed (`dvc queue logs <name>` says why); the same "
                        "command runs them again")  # fmt: skip


def start_queue(root: Path, sweep: Sweep) -> None:
    """`dvc queue start -j <jobs>`. Its workers inherit its output, so it writes to a file: through a pipe, the
    call would last as long as they do (and was seen to hang their shutdown). They end on their own once the
    queue stays empty; `dvc queue stop` would leave a shutdown message in the broker that stops the next
    sweep's workers after one task."""
    logs = root / sweep.folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / "queue.log").open("ab") as out:
        done = subprocess.run([dvc_executable(), "queue", "start", "-j", str(sweep.jobs)], cwd=root, env=dvc_env(),
                              stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=False)  # fmt: skip
    if done.returncode != 0:
        raise DataError(f"dvc queue start failed (exit {done.returncode}); see {sweep.folder / 'logs' / 'queue.log'}")


def queue_workers(root: Path) -> list[int]:
    """The live pids of `root`'s DVC queue workers (`dvc queue start` records each in a pid file; a pid reused
    by another program is not one)."""
    pids = []
    for pid_file in (root / ".dvc" / "tmp" / "exps" / "celery").glob("dvc-exp-worker-*.pid"):
        with contextlib.suppress(ValueError, OSError):
            pid = int(pid_file.read_text(encoding="utf-8").strip())
            if b"queue-worker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
    return pids


def end_queue_workers(root: Path) -> None:
    """End DVC's queue workers of `root` now and wait for them, for a script that must leave no process behind
    (they otherwise end on their own a while after the queue empties)."""
    for pid in queue_workers(root):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while queue_workers(root) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in queue_workers(root):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _trial_workspace(root: Path, name: str) -> Path | None:
    """The temporary workspace DVC runs experiment `name` in, from its run info files."""
    for info in (root / ".dvc" / "tmp" / "exps" / "run").glob("*/*.run"):
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(info.read_text(encoding="utf-8"))
            if data.get("name") == name and Path(data.get("root_dir", "")).is_dir():
                return Path(data["root_dir"])
    return None


def _report(trial: Any, curve: list[tuple[int, float]], reported: set[int], sign: float) -> int | None:
    """Report the curve's new steps to the trial; the step at which the pruner gives up on it, or None."""
    for step, value in curve:
        if step in reported:
            continue
        reported.add(step)
        trial.report(sign * value if math.isfinite(value) else float("nan"), step)
        if trial.should_prune():
            return step
    return None


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    """Interrupt a trial as Ctrl-C would: DVC then removes its temporary workspace and run record (after a
    SIGTERM, `dvc exp show` would list the trial as running for good). SIGKILL if it does not end in time."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _interrupted_with_parent() -> None:
    """A killed sweep interrupts its trial as _stop_group does: SIGINT on the parent's death (Linux prctl),
    where components.common.signal_on_parent_death sends SIGTERM, after which DVC keeps a stale run record."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGINT, 0, 0, 0)


def _sign(sweep: Sweep) -> float:
    """Optuna's pruner compares reports in the study's direction; a curve going the other way is negated."""
    return 1.0 if sweep.pruning is None or sweep.pruning.direction == sweep.direction else -1.0


def run_optuna_trial(root: Path, sweep: Sweep, study: Any, trial: Any, say: Callable[[str], None]) -> str:
    """One proposed trial as `dvc exp run --temp`, its curve reported to the pruner while it trains."""
    name = trial.user_attrs["experiment"]
    logs = root / sweep.folder / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    curve = curve_file(root, sweep.pruning) if sweep.pruning is not None else None
    sign = _sign(sweep)
    # The trial's workspace starts as a copy of this one: until the stage rewrites the curve, it is this one's.
    stale = (root / curve).read_text(encoding="utf-8") if curve is not None and (root / curve).is_file() else None
    say(f"{name}: {_describe(trial.params)}")
    with (logs / f"{name}.log").open("wb") as out:
        process = subprocess.Popen(
            [dvc_executable(), "exp", "run", "--temp", sweep.target, "--name", name, *set_options(trial.params)],
            cwd=root, env=dvc_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=_interrupted_with_parent,
        )  # fmt: skip
    trial.set_user_attr("pgid", process.pid)  # its own session: the group a later run interrupts if this one is killed
    reported: set[int] = set()
    pruned_at = None
    try:
        while process.poll() is None:
            time.sleep(POLL_S / 4)
            workspace = _trial_workspace(root, name) if curve is not None else None
            if workspace is not None and curve is not None:
                pruned_at = _report(trial, read_curve(workspace / curve, stale), reported, sign)
                if pruned_at is not None:
                    say(f"{name}: pruned at step {pruned_at}, stopping it")
                    _stop_group(process)
                    break
    except BaseException:
        _stop_group(process)
        raise
    experiment = experiments(root).get(name) if process.returncode == 0 and pruned_at is None else None
    if curve is not None and pruned_at is None:
        # The rest of the curve, from the experiment (or the failed run's workspace, gone by now: then what
        # was read live): the verdict must not depend on how often the sweep looked.
        rows = _committed_curve(root, experiment.rev, curve) if experiment is not None else []
        pruned_at = _report(trial, rows, reported, sign)
    return tell(root, study, trial, sweep, experiment, pruned_at)


def _committed_curve(root: Path, rev: str, curve: Path) -> list[tuple[int, float]]:
    shown = subprocess.run(["git", "show", f"{rev}:{curve.as_posix()}"], cwd=root, capture_output=True, text=True)
    return curve_rows(shown.stdout) if shown.returncode == 0 else []


def run_optuna(root: Path, sweep: Sweep, study: Any, total: int, say: Callable[[str], None]) -> None:
    recover(root, study, sweep)
    enqueue_first(study, sweep)
    failed_in_a_row = 0
    while _remaining(study, sweep, total):
        trial = _ask(study, sweep)
        state = run_optuna_trial(root, sweep, study, trial, say)
        failed_in_a_row = failed_in_a_row + 1 if state == "FAIL" else 0
        if failed_in_a_row == MAX_FAILED_IN_A_ROW:
            raise DataError(f"sweep '{sweep.name}': {failed_in_a_row} trials in a row failed; see their logs in "
                            f"{sweep.folder / 'logs'} (the study resumes once fixed)")  # fmt: skip
        value = study.trials[trial.number].value
        shown = f", {sweep.objective.key} {value:g}" if value is not None else ""
        say(f"{trial.user_attrs['experiment']}: {state.lower()}{shown}")


def _describe(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def _sampler(sweep: Sweep, seed: int) -> Any:
    import optuna

    # A grid's points are enqueued in order (enqueue_grid); Optuna's GridSampler would stop the study from
    # outside an objective function, which ask-and-tell cannot take.
    if sweep.mode == "optuna":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)


def enqueue_grid(study: Any, sweep: Sweep) -> None:
    """Every grid point the study has not run, or queued, yet (a failed point runs again)."""

    taken = _taken(study)
    for point in grid_points(sweep):
        if point not in taken:
            study.enqueue_trial(point)


@dataclass
class Outcome:
    sweep: str
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    importances: dict[str, float] | None = None
    files: dict[str, str] = field(default_factory=dict)
    applied: str | None = None


def run_sweep(root: Path, sweep: Sweep, apply_best: bool = False, say: Callable[[str], None] = print) -> Outcome:
    """Check the sweep, run its missing trials (resuming its study), write the results; `apply_best` then runs
    `dvc exp apply` on the best trial."""
    check_sweep(root, sweep)
    total = sweep.trials if sweep.trials is not None else len(grid_points(sweep))
    with owning(root / sweep.folder, sweep.name):
        study = open_study(root, sweep)
        # Seeded anew for each run of the study: the same seed would propose a resumed study's first points again.
        study.sampler = _sampler(sweep, sweep.seed + len(study.trials))
        names = {t.user_attrs.get("experiment") for t in study.trials}
        clash = sorted(n for n in experiments(root) if re.fullmatch(rf"{re.escape(sweep.name)}-\d+", n) and n not in names)
        if clash:
            raise ConfigError(
                f"experiments {clash[:3]} exist but are not trials of sweep '{sweep.name}' ({sweep.folder / STUDY_FILE}): "
                "remove them (dvc exp remove ...) or pick another --name"
            )
        done = len(finished(study))
        say(f"sweep {sweep.name}: {sweep.mode}, {total} trials, {done} already done; study {sweep.folder / STUDY_FILE}")
        if sweep.mode == "optuna":
            run_optuna(root, sweep, study, total, say)
        else:
            run_queued(root, sweep, study, total, say)
        outcome = write_results(root, sweep, study)
    if apply_best:
        outcome.applied = apply(root, outcome, sweep)
        say(f"applied {outcome.applied} to the workspace (dvc exp apply)")
    return outcome


def apply(root: Path, outcome: Outcome, sweep: Sweep) -> str:
    """`dvc exp apply` the best trial, then check that the workspace holds its objective."""
    if outcome.best is None:
        raise DataError(f"sweep '{outcome.sweep}' has no completed trial to apply")
    name = outcome.best["Experiment"]
    # Exit 255 when outputs of stages the trial did not run are missing from the cache: DVC leaves those as
    # they were, after applying the trial's params, lock and outputs.
    done = dvc(root, "exp", "apply", name, check=False)
    said = done.stdout + done.stderr
    if done.returncode != 0 and "missing" not in said.lower():
        raise DataError(f"dvc exp apply {name} failed (exit {done.returncode}): {' | '.join(said.strip().splitlines()[-3:])}")
    path = root / sweep.objective.path
    try:
        value = sweep.objective.read({sweep.objective.path: {"data": json.loads(path.read_text(encoding="utf-8"))}})
    except (OSError, ValueError):
        value = None
    if value != outcome.best[str(sweep.objective)]:
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        raise DataError(f"dvc exp apply {name} did not bring its {sweep.objective} back ({value}): {tail}")
    return name


# --- results ------------------------------------------------------------------------------------------------


def summarise(sweep: Sweep, study: Any) -> Outcome:
    """One row per trial (columns named as `dvc exp show` names them), the best, the importances."""
    from optuna.trial import TrialState

    objective = str(sweep.objective)
    rows = []
    for trial in study.trials:
        rows.append({
            "trial": trial.number,
            "Experiment": trial.user_attrs.get("experiment", ""),
            "rev": (trial.user_attrs.get("rev") or "")[:7],
            "State": trial.state.name.lower(),
            **{d.param: trial.params.get(d.param) for d in sweep.space},
            # A pruned trial's `value` is its last curve value, not the objective.
            objective: trial.value if trial.state == TrialState.COMPLETE else trial.user_attrs.get("objective_if_completed"),
            "pruned_at": trial.last_step if trial.state == TrialState.PRUNED else None,
            "seconds": round(trial.duration.total_seconds(), 1) if trial.duration else None,
        })  # fmt: skip
    outcome = Outcome(sweep.name, rows)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if complete:
        outcome.best = next(r for r in rows if r["trial"] == study.best_trial.number)
    outcome.importances = _importances(study, complete)
    return outcome


def write_results(root: Path, sweep: Sweep, study: Any) -> Outcome:
    """trials.csv, best.json, importances.json and the plots, beside the study."""
    outcome = summarise(sweep, study)
    folder = root / sweep.folder
    with (folder / "trials.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(outcome.trials[0]) if outcome.trials else ["trial"])
        writer.writeheader()
        writer.writerows(outcome.trials)
    outcome.files["table"] = str(sweep.folder / "trials.csv")
    if outcome.best is not None:
        write_json(outcome.best, folder / "best.json")
        outcome.files["best"] = str(sweep.folder / "best.json")
    if outcome.importances is not None:
        write_json(outcome.importances, folder / "importances.json")
        outcome.files["importances"] = str(sweep.folder / "importances.json")
    outcome.files.update(_plots(study, folder, sweep, outcome.best is not None, outcome.importances is not None))
    return outcome


def _importances(study: Any, complete: list[Any]) -> dict[str, float] | None:
    """Optuna's default importances (PED-ANOVA in Optuna 5), once two complete trials differ in some param."""
    import optuna

    if len(complete) < 2 or all(t.params == complete[0].params for t in complete):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "importances will be equal" on a flat objective: they say so
            return {k: round(float(v), 4) for k, v in optuna.importance.get_param_importances(study).items()}
    except (ValueError, RuntimeError) as err:
        log.warning("no parameter importances: %s", err)
        return None


def _plots(study: Any, folder: Path, sweep: Sweep, history: bool, importances: bool) -> dict[str, str]:
    """The objective against the trial and the importances as self-contained HTML (plotly, no network)."""
    try:
        from optuna import visualization
    except ImportError:
        return {}
    files = {}
    figures = {"history": (history, visualization.plot_optimization_history),
               "importances": (importances, visualization.plot_param_importances)}  # fmt: skip
    for name, (wanted, plot) in figures.items():
        if not wanted:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                plot(study).write_html(folder / f"{name}.html", include_plotlyjs=True)
            files[f"{name}_plot"] = str(sweep.folder / f"{name}.html")
        except ImportError as err:  # plotly missing: the table and JSON files still say everything
            log.warning("no %s plot: %s", name, err)
    return files


def table(outcome: Outcome) -> str:
    rows = outcome.trials
    if not rows:
        return "(no trials)"
    columns = [c for c in rows[0] if c != "trial"]
    cells = [[_cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def report(outcome: Outcome, sweep: Sweep) -> str:
    lines = [table(outcome), ""]
    if outcome.best is not None:
        lines.append(f"best: {outcome.best['Experiment']} ({sweep.objective} {outcome.best[str(sweep.objective)]:g}); "
                     f"`dvc exp apply {outcome.best['Experiment']}` brings it into the workspace")  # fmt: skip
    if outcome.importances:
        lines.append("importances: " + ", ".join(f"{k} {v:.2f}" for k, v in outcome.importances.items()))
    lines += [f"{what}: {path}" for what, path in outcome.files.items()]
    return "\n".join(lines)


# --- Prefect and the command line ---------------------------------------------------------------------------


def load_sweep(root: Path, mode: str, overrides: dict[str, Any]) -> Sweep:
    path = root / PARAMS_FILE
    if not path.is_file():
        raise ConfigError(f"params file not found: {path.resolve()}")
    return sweep_from(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, mode, overrides)


@flow(name="sweep", log_prints=True)
def sweep_flow(
    mode: str = "optuna",
    repo_root: str = ".",
    space: dict[str, str] | None = None,
    name: str | None = None,
    trials: int | None = None,
    jobs: int | None = None,
    target: str | None = None,
    objective: str | None = None,
    direction: str | None = None,
    seed: int | None = None,
    no_prune: bool = False,
    enqueue: list[dict[str, Any]] | None = None,
    apply_best: bool = False,
) -> dict[str, Any]:
    """A sweep as a Prefect flow, so a deployment can run it: the same as `python -m flows.sweep <mode>`; the
    table goes to a markdown artifact."""
    logger = get_run_logger()
    root = Path(repo_root)
    overrides = {"space": space, "name": name, "trials": trials, "jobs": jobs, "target": target,
                 "objective": objective, "direction": direction, "seed": seed, "no_prune": no_prune,
                 "enqueue": enqueue}  # fmt: skip
    sweep = load_sweep(root, mode, overrides)
    outcome = run_sweep(root, sweep, apply_best, say=logger.info)
    create_markdown_artifact(f"```\n{report(outcome, sweep)}\n```", key=f"sweep-{re.sub(r'[^a-z0-9]+', '-', sweep.name.lower())}",
                             description=f"Trials of sweep {sweep.name}")  # fmt: skip
    return {"sweep": sweep.name, "best": outcome.best, "importances": outcome.importances, "applied": outcome.applied}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m flows.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("mode", choices=[*MODES, "show"])
    parser.add_argument(
        "-S", "--set", dest="space", action="append", default=[], metavar="PARAM=VALUES",
        help="a swept param: a,b | choice(a,b) | range(lo,hi[,step]) | uniform(lo,hi) | loguniform(lo,hi)",
    )  # fmt: skip
    parser.add_argument("--name", help="the sweep (and its experiments' prefix); default: the mode and swept params")
    parser.add_argument("--trials", type=int, help="random / optuna: how many (default: sweeps.trials); grid: every point")
    parser.add_argument("--jobs", type=int, help="grid / random: trials run at once by DVC's queue (default: sweeps.jobs)")
    parser.add_argument("--target", help="the stage a trial runs up to (default: sweeps.target)")
    parser.add_argument("--objective", help="<metrics file>:<key> (default: sweeps.objective)")
    parser.add_argument("--direction", choices=DIRECTIONS, help="(default: sweeps.direction)")
    parser.add_argument("--seed", type=int, help="the sampler's seed (default: sweeps.seed)")
    parser.add_argument(
        "--enqueue", action="append", default=[], type=_point, metavar="JSON",
        help='random / optuna: a trial to run first, e.g. \'{"train_text.lr": 0.003}\' (the current value)',
    )  # fmt: skip
    parser.add_argument("--no-prune", action="store_true", help="optuna: run every trial to its end")
    parser.add_argument("--apply-best", action="store_true", help="then `dvc exp apply` the best trial")
    parser.add_argument("--repo", type=Path, default=Path("."), help="repository root (default: .)")
    return parser.parse_args(argv)


def _point(text: str) -> dict[str, Any]:
    try:
        point = json.loads(text)
    except ValueError:
        point = None
    if not isinstance(point, dict):
        raise argparse.ArgumentTypeError(f'expected a JSON object like {{"train_text.lr": 0.003}}, got {text!r}')
    return point


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)

    def body() -> None:
        overrides = {"space": space_from_options(args.space), "name": args.name, "trials": args.trials, "jobs": args.jobs,
                     "target": args.target, "objective": args.objective, "direction": args.direction, "seed": args.seed,
                     "no_prune": args.no_prune, "enqueue": args.enqueue}  # fmt: skip
        if args.mode == "show":
            if not args.name:
                raise ConfigError("show needs --name <sweep> (see data/sweeps/)")
            sweep = _shown(args.repo, args.name)
            try:
                with owning(args.repo / sweep.folder, sweep.name):
                    outcome = write_results(args.repo, sweep, open_study(args.repo, sweep))
            except BusyError:
                if args.apply_best:
                    raise
                # The search is running: its table so far, without writing under it.
                outcome = summarise(sweep, open_study(args.repo, sweep))
                print(f"sweep {sweep.name} is running; its files are rewritten when it ends")
            if args.apply_best:
                outcome.applied = apply(args.repo, outcome, sweep)
        else:
            sweep = load_sweep(args.repo, args.mode, overrides)
            outcome = run_sweep(args.repo, sweep, args.apply_best)
        print(report(outcome, sweep))

    run_main(body)


def _shown(root: Path, name: str) -> Sweep:
    """The sweep a study was started as, from the study itself."""
    import optuna

    path = root / SWEEPS_DIR / name / STUDY_FILE
    if not path.is_file():
        raise ConfigError(f"no sweep '{name}': {path} does not exist")
    try:
        started = optuna.load_study(study_name=name, storage=f"sqlite:///{path.resolve()}").user_attrs["sweep"]
    except KeyError:
        raise ConfigError(f"{path} holds no study of sweep '{name}' (made by something else?)") from None
    return Sweep(
        mode=started["mode"],
        name=name,
        space=parse_space(started["space"], f"sweep '{name}'"),
        target=started["target"],
        objective=Objective.parse(started["objective"], f"sweep '{name}'"),
        direction=started["direction"],
        trials=None,
        jobs=1,
        seed=0,
        pruning=None,
    )


if __name__ == "__main__":
    sys.exit(main())
