"""The pipeline as dvc.yaml declares it: stage names, their modules, command-line paths and outputs.

dvc.yaml is the one definition of the graph and of where every output lives. Code that needs a stage list
or a path (the Prefect flows, the drift check, the promotion gate, packaging, the tests) reads it here
instead of writing it again. Only the standard library and yaml.
"""

from __future__ import annotations

import importlib
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DVC_FILE = "dvc.yaml"


@dataclass(frozen=True)
class Stage:
    name: str
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]  # `outs:` only; metrics and plots are listed apart
    metrics: tuple[str, ...]
    plots: tuple[str, ...]
    params: tuple[str, ...]

    @property
    def module(self) -> str:
        """The module the command runs (`python -m <module> ...`)."""
        words = shlex.split(self.cmd)
        if len(words) < 3 or words[1] != "-m":
            raise ValueError(f"stage '{self.name}': command {self.cmd!r} is not `python -m <module> ...`")
        return words[2]

    def argument(self, which: int | str) -> Path:
        """A path from the command line: the `which`-th positional argument, or the value of option `which`."""
        words = shlex.split(self.cmd)[3:]
        positional: list[str] = []
        options: dict[str, str] = {}
        index = 0
        while index < len(words):
            if words[index].startswith("--"):
                options[words[index]] = words[index + 1] if index + 1 < len(words) else ""
                index += 2
            else:
                positional.append(words[index])
                index += 1
        if isinstance(which, int):
            if which >= len(positional):
                raise ValueError(f"stage '{self.name}' has no positional argument {which}: {self.cmd!r}")
            return Path(positional[which])
        if which not in options:
            raise ValueError(f"stage '{self.name}' has no option {which}: {self.cmd!r}")
        return Path(options[which])

    def only_out(self) -> Path:
        """The stage's single cached output (e.g. an evaluation's per-item results)."""
        if len(self.outs) != 1:
            raise ValueError(f"stage '{self.name}' has {len(self.outs)} outs in {DVC_FILE}, expected one")
        return Path(self.outs[0])

    def only_metrics(self) -> Path:
        if len(self.metrics) != 1:
            raise ValueError(f"stage '{self.name}' has {len(self.metrics)} metrics files in {DVC_FILE}, expected one")
        return Path(self.metrics[0])

    @property
    def params_section(self) -> str:
        """The params.yaml section the command reads: its module's name, so two stages running one module
        (evaluate_image and evaluate_diffusion) share one section."""
        return self.module.rsplit(".", 1)[-1]

    def config(self) -> Any | None:
        """The stage module's params config class (`CONFIG`), or None for a stage that reads no params."""
        return getattr(importlib.import_module(self.module), "CONFIG", None)


def _paths(entries: list[Any] | None) -> tuple[str, ...]:
    """Paths of a deps / outs / metrics / plots list, whose items are strings or `{path: options}`."""
    return tuple(next(iter(e)) if isinstance(e, dict) else str(e) for e in entries or [])


def load_stages(root: Path | str = ".") -> dict[str, Stage]:
    """Every stage of `<root>/dvc.yaml`, in file order."""
    path = Path(root) / DVC_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {DVC_FILE} in {Path(root).resolve()}")
    stages = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages", {})
    return {
        name: Stage(
            name=name,
            cmd=" ".join(str(spec["cmd"]).split()),
            deps=_paths(spec.get("deps")),
            outs=_paths(spec.get("outs")),
            metrics=_paths(spec.get("metrics")),
            plots=_paths(spec.get("plots")),
            params=_paths(spec.get("params")),
        )
        for name, spec in stages.items()
    }


def stage(name: str, root: Path | str = ".") -> Stage:
    stages = load_stages(root)
    if name not in stages:
        raise KeyError(f"{DVC_FILE} has no stage '{name}' (it has {list(stages)})")
    return stages[name]
