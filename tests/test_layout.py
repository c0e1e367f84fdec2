"""The layout holds: stages never import stages, and dvc.yaml's deps are exactly the code each stage runs.

The import graph is read from the source (module-level and in-function imports alike), so a lazy import that
dvc.yaml does not list, or a listed module the stage no longer uses, fails here before it makes `dvc repro`
rerun too much or too little.
"""

from __future__ import annotations

import ast
import re
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from components.pipeline import load_stages
from tests.conftest import REPO_ROOT

PACKAGES = ("components", "serving", "monitoring", "flows")
STAGES = load_stages(REPO_ROOT)
STAGE_MODULES = {stage.module for stage in STAGES.values()}
# Shared layers a stage may import (see README "Layout"): everything in components/ that is not a stage.
SHARED = sorted(p.stem for p in (REPO_ROOT / "components").glob("*.py") if f"components.{p.stem}" not in STAGE_MODULES)


def module_file(module: str) -> Path | None:
    """The repo file of a local module (`components.common` -> components/common.py), None for a library."""
    if module.split(".")[0] not in PACKAGES:
        return None
    path = REPO_ROOT.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def direct_imports(module: str) -> frozenset[str]:
    """Local modules `module` imports anywhere in its file (`from pkg import name` counts pkg.name if a module)."""
    path = module_file(module)
    assert path is not None, module
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if module_file(name) is not None and not name.endswith("__init__"))
    found.discard(module)
    return frozenset(n for n in found if module_file(n) != REPO_ROOT / n.split(".")[0] / "__init__.py")


def closure(module: str) -> set[str]:
    """`module` and every local module it reaches."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(direct_imports(current))
    return seen


def as_paths(modules: set[str]) -> set[str]:
    return {module_file(m).relative_to(REPO_ROOT).as_posix() for m in modules}  # type: ignore[union-attr]


def stage_code(name: str) -> set[str]:
    """The code a stage runs: its module's closure; for `package`, also the Bento's service it builds."""
    modules = closure(STAGES[name].module)
    if name == "package":
        bentofile = yaml.safe_load((REPO_ROOT / "serving" / "bentofile.yaml").read_text(encoding="utf-8"))
        modules |= closure(bentofile["service"].split(":")[0])
    return as_paths(modules)


def test_no_module_imports_a_stage_module() -> None:
    offenders = []
    for package in PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            module = ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
            offenders += [f"{module} imports {m}" for m in direct_imports(module) if m in STAGE_MODULES]
    assert offenders == [], "import a family, metrics, io or training module instead:\n" + "\n".join(offenders)


def test_shared_modules_are_the_documented_layers() -> None:
    # If this changes, the README's Layout section must say where the new module belongs.
    assert SHARED == sorted([
        "__init__", "checkpoints", "common", "compression", "datasets", "delex", "diffusion_model", "feature_defs", "feature_net",
        "gan_model", "image_generators", "image_io", "launch",
        "metrics", "model_io", "pipeline", "records", "restore_model", "runtime", "slots", "tables", "text_model",
        "textgen", "training", "workers",
    ])  # fmt: skip


@pytest.mark.parametrize("name", list(STAGES))
def test_dvc_deps_are_exactly_the_code_the_stage_runs(name: str) -> None:
    declared = {dep for dep in STAGES[name].deps if dep.endswith(".py")}
    expected = stage_code(name)
    assert declared == expected, (
        f"dvc.yaml stage '{name}': missing {sorted(expected - declared)}, extra {sorted(declared - expected)}"
    )


def test_git_tracks_under_metrics_only_stage_outputs_and_no_timings() -> None:
    # A tracked file that no stage owns is rewritten behind DVC's back and leaves the tree dirty; a file a stage
    # owns is written only when DVC reruns that stage, so a no-op `dvc repro` rewrites nothing. Timings (run
    # to run different) go to each training stage's timing.json, which git ignores and no stage declares.
    from components.training import TIMING_FILE

    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "metrics"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    declared = [Path(p) for s in STAGES.values() for p in (*s.outs, *s.metrics, *s.plots)]
    tracked = [Path(p) for p in listed.stdout.splitlines()]
    assert tracked and [p for p in tracked if not any(d == p or d in p.parents for d in declared)] == []
    assert [d for d in declared if d.name == TIMING_FILE] == []
    timings = [STAGES[name].argument("--metrics-dir") / TIMING_FILE for name in STAGES if "--metrics-dir" in STAGES[name].cmd]
    assert len(timings) == 4  # train_text, train_image, train_diffusion, train_restore
    for timing in timings:
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", str(timing)], cwd=REPO_ROOT)
        assert ignored.returncode == 0, f"{timing} is not gitignored"


def test_the_bento_pins_every_library_as_the_project_does() -> None:
    import tomllib

    bentofile = yaml.safe_load((REPO_ROOT / "serving" / "bentofile.yaml").read_text(encoding="utf-8"))
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    pins = dict(d.split("==") for d in project if "==" in d)
    shipped = [p.split("==") for p in bentofile["python"]["packages"]]
    assert all(len(p) == 2 for p in shipped if p[0] in pins), "a library the project pins ships unpinned in the Bento"
    assert {name: version for name, version in (p for p in shipped if len(p) == 2)} == {
        name: pins[name] for name, _ in (p for p in shipped if len(p) == 2)
    }


def test_the_bento_ships_exactly_the_service_code() -> None:
    bentofile = yaml.safe_load((REPO_ROOT / "serving" / "bentofile.yaml").read_text(encoding="utf-8"))
    service = closure(bentofile["service"].split(":")[0])
    packages = {f"{m.split('.')[0]}/__init__.py" for m in service}
    assert set(bentofile["include"]) == as_paths(service) | packages


def test_only_ingest_uses_the_demo_generator() -> None:
    users = {
        m
        for m in STAGE_MODULES | {"serving.service", "monitoring.drift", "monitoring.promotion"}
        if "components.textgen" in closure(m)
    }
    assert users == {"components.ingest"}


def test_no_code_outside_the_demo_generator_names_a_demo_field() -> None:
    from components.textgen import ATTRIBUTE_ORDER

    # The demo's distinctive keys as words, and any demo key as a drift / log column.
    distinctive = [key for key in ATTRIBUTE_ORDER if key not in ("name", "category", "price", "feature")]
    pattern = re.compile(rf"\b({'|'.join(distinctive)})\b|attr_({'|'.join(ATTRIBUTE_ORDER)})\b")
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()}"
        for folder in ("components", "serving", "monitoring", "flows", "bench")
        for path in sorted((REPO_ROOT / folder).rglob("*.py"))
        if path.name != "textgen.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
        if pattern.search(line)
    ]
    assert offenders == []
