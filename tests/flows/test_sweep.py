"""Hyper-parameter sweeps (flows/sweep.py): the space, the checks made before anything runs, and real sweeps on
a tiny pipeline: grid trials on DVC's queue with two workers, an Optuna search that prunes a diverging trial and
resumes after a kill, and `dvc exp apply` of the best trial reproduced by `dvc repro`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.common import ConfigError
from flows.sweep import Dimension, check_sweep, end_queue_workers, grid_points, read_curve, sweep_from
from tests.conftest import Reproduced, copy_repo, copy_reproduced, venv_env

SWEEPS = {
    "target": "evaluate_text",
    "objective": "metrics/text.json:bleu",
    "direction": "maximize",
    "trials": 4,
    "jobs": 1,
    "seed": 0,
    "space": {"train_text.lr": "loguniform(1e-3, 1e-2)"},
    "prune": {"curve": "train_text:train/loss", "direction": "minimize", "warmup_steps": 0, "startup_trials": 1},
}


def test_space_syntax() -> None:
    lr = Dimension.parse("train_text.lr", "1e-3,3e-3", "-S")
    assert lr.kind == "choice" and lr.values == (0.001, 0.003)
    assert Dimension.parse("x", "choice(a, 'b')", "-S").values == ("a", "b")
    assert Dimension.parse("x", [2, 4], "params").values == (2, 4)
    assert Dimension.parse("x", "range(0, 200, 50)", "-S").grid_values("-S") == [0, 50, 100, 150, 200]
    log = Dimension.parse("x", "loguniform(1e-4, 1e-2)", "-S").distribution()
    assert log.log and (log.low, log.high) == (1e-4, 1e-2)
    assert Dimension.parse("x", "range(1, 8)", "-S").distribution().high == 8
    for bad, message in [
        ("loguniform(0, 1)", "low > 0"),
        ("uniform(2, 1)", "low < high"),
        ("normal(0, 1)", "unknown 'normal"),
        ("range(1.5, 3)", "integers"),
        ("1,1", "distinct"),
        ("", "expected values"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Dimension.parse("x", bad, "-S x")
    with pytest.raises(ConfigError, match="grid needs listed values"):
        Dimension.parse("x", "uniform(0, 1)", "-S x").grid_values("-S x")


def test_sweep_options_come_from_params_and_the_command_line_wins() -> None:
    params = {"sweeps": SWEEPS}
    grid = sweep_from(params, "grid", {"space": {"a.b": "1,2", "c": "range(1,3)"}, "jobs": 2})
    assert grid.jobs == 2 and grid.trials is None and grid.pruning is None and grid.name == "grid-a_b-c"
    assert grid_points(grid) == [{"a.b": 1, "c": c} for c in (1, 2, 3)] + [{"a.b": 2, "c": c} for c in (1, 2, 3)]
    search = sweep_from(params, "optuna", {"name": "lr"})
    assert search.trials == 4 and search.pruning is not None and search.space[0].kind == "loguniform"
    assert sweep_from(params, "optuna", {"no_prune": True}).pruning is None
    assert sweep_from({"sweeps": {**SWEEPS, "jobs": 2}}, "optuna", {}).jobs == 1  # the grid's default is not optuna's
    assert sweep_from(params, "random", {"enqueue": [{"train_text.lr": 0.005}]}).first == ({"train_text.lr": 0.005},)
    for mode, overrides, message in [
        ("optuna", {"jobs": 2}, "one trial at a time"),
        ("random", {"objective": "bleu"}, "<metrics file>:<key>"),
        ("random", {"direction": "up"}, "maximize"),
        ("random", {"name": "../x"}, "names git refs"),
        ("grid", {"enqueue": [{"train_text.lr": 0.1}]}, "not a grid"),
        ("random", {"enqueue": [{"train_text.nope": 1}]}, "nope"),
        ("random", {"enqueue": [{"train_text.lr": 0.5}]}, r"train_text.lr=0.5 is outside its space loguniform\(0.001,0.01\)"),
        ("grid", {"trials": 3}, "a grid runs every point"),
        ("sweep", {}, "mode must be one of"),
    ]:
        with pytest.raises(ConfigError, match=message):
            sweep_from(params, mode, overrides)
    with pytest.raises(ConfigError, match="no 'sweeps' section"):
        sweep_from({}, "grid", {"space": {"a": "1,2"}})
    with pytest.raises(ConfigError, match="warmup_steps"):
        sweep_from({"sweeps": {**SWEEPS, "prune": {**SWEEPS["prune"], "warmup_steps": "soon"}}}, "optuna", {})


def test_random_search_draws_from_the_declared_ranges_with_its_seed() -> None:
    import optuna

    from flows.sweep import _ask, _sampler

    space = {"train_text.lr": "loguniform(1e-4, 1e-1)", "train_text.warmup_steps": "range(0, 200, 50)", "x": "choice(a, b)"}
    sweep = sweep_from({"sweeps": SWEEPS}, "random", {"space": space, "trials": 8})

    def draws(seed: int) -> list[dict[str, Any]]:
        study = optuna.create_study(direction="maximize", sampler=_sampler(sweep, seed))
        return [_ask(study, sweep).params for _ in range(40)]

    points = draws(0)
    assert points == draws(0) and points != draws(1)
    rates = sorted(p["train_text.lr"] for p in points)
    assert 1e-4 <= rates[0] and rates[-1] <= 1e-1
    assert rates[len(rates) // 2] < 1e-2  # log-uniform: the median is near 3e-3, not 0.05
    assert {p["train_text.warmup_steps"] for p in points} <= {0, 50, 100, 150, 200} and {p["x"] for p in points} == {"a", "b"}


def test_a_curve_the_workspace_started_with_is_not_the_trials(tmp_path: Path) -> None:
    curve = tmp_path / "loss.tsv"
    curve.write_text("step\tloss\n4\t5.5\n8\t5.25\n12\t5.0", encoding="utf-8")  # the last row half written
    assert read_curve(curve) == [(4, 5.5), (8, 5.25), (12, 5.0)]
    assert read_curve(curve, stale=curve.read_text(encoding="utf-8")) == []
    assert read_curve(tmp_path / "missing.tsv") == []


@pytest.fixture
def sweep_repo(tmp_path: Path, tiny_params: dict[str, Any]) -> Path:
    return copy_repo(tmp_path / "repo", {**tiny_params, "sweeps": SWEEPS})


def _sweep(root: Path, mode: str, space: dict[str, str], **overrides: Any) -> Any:
    with (root / "params.yaml").open(encoding="utf-8") as fh:
        return sweep_from(yaml.safe_load(fh), mode, {"space": space, **overrides})


def test_a_sweep_is_refused_before_anything_runs(sweep_repo: Path) -> None:
    """Serving stages, unknown keys, values a stage rejects and objectives the trial never writes: one line each."""
    (sweep_repo / "metrics").mkdir()
    (sweep_repo / "metrics" / "text.json").write_text('{"bleu": 1.5, "chrf": 20.0, "chrf_signature": "x"}', encoding="utf-8")
    assert check_sweep(sweep_repo, _sweep(sweep_repo, "grid", {"train_text.lr": "1e-3,3e-3"}))[-1] == "evaluate_text"
    for mode, space, overrides, message in [
        ("grid", {"train_text.lr": "1e-3"}, {"target": "package"}, r"runs \['package'\], which writes to the served model store"),
        ("grid", {"train_text.lrr": "1e-3"}, {}, "params.yaml has no such key"),
        ("grid", {"train_text.lr": "3e-3,2.0"}, {}, r"train_text.lr=2.0 is refused by train_text: .*outside \[0, 1\]"),
        ("random", {"train_text.lr": "uniform(0.001, 1.5)"}, {}, "train_text.lr=1.5 is refused"),
        ("grid", {"train_text.lr": "1e-3"}, {"target": "train_text"}, "no stage up to 'train_text' writes metrics/text.json"),
        ("grid", {"train_text.lr": "1e-3"}, {"target": "train_everything"}, "not a stage of dvc.yaml"),
        ("grid", {"train_text.lr": "1e-3"}, {"objective": "metrics/text.json:bleuu"}, r"'bleuu' \(it has \['bleu', 'chrf'\]"),
    ]:
        with pytest.raises(ConfigError, match=message) as caught:
            check_sweep(sweep_repo, _sweep(sweep_repo, mode, space, **overrides))
        assert "\n" not in str(caught.value)
    assert not (sweep_repo / "data" / "sweeps").exists()


def test_show_prints_a_running_sweep_without_writing_under_it(sweep_repo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.sweep import BusyError, main, open_study, owning

    sweep = _sweep(sweep_repo, "grid", {"train_text.lr": "1e-3,3e-3"}, name="busy")
    open_study(sweep_repo, sweep).enqueue_trial({"train_text.lr": 0.001})
    with owning(sweep_repo / sweep.folder, sweep.name):  # as a running search holds it
        main(["show", "--name", "busy", "--repo", str(sweep_repo)])
        with pytest.raises(BusyError, match="already running"):
            with owning(sweep_repo / sweep.folder, sweep.name):
                pass
    out = capsys.readouterr().out
    assert "sweep busy is running" in out and "waiting" in out
    assert not (sweep_repo / sweep.folder / "trials.csv").exists()
    with pytest.raises(SystemExit):
        main(["show", "--name", "nothing", "--repo", str(sweep_repo)])


# --- real sweeps on a tiny pipeline ---------------------------------------------------------------------------


def _dvc(root: Path, *args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, env=venv_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=tests", "-c", "user.email=tests@localhost", *args], cwd=root, check=True)


@pytest.fixture(scope="module")
def reproduced_repo(
    reproduced: Reproduced, tmp_path_factory: pytest.TempPathFactory, real_params: dict[str, Any]
) -> Iterator[Path]:
    """The tiny pipeline reproduced and committed, with the sweeps section (no stage reads it): the baseline
    every trial starts from."""
    from tests.conftest import shrink

    params = {**shrink(real_params), "sweeps": SWEEPS}
    root = copy_reproduced(reproduced, tmp_path_factory.mktemp("sweeps") / "repo", params)
    assert "Data and pipelines are up to date." in _dvc(root, "status")
    yield root
    end_queue_workers(root)


def _experiments(root: Path) -> dict[str, dict[str, Any]]:
    found = {}
    for baseline in json.loads(_dvc(root, "exp", "show", "--json", "--no-pager", "-A")):
        for experiment in baseline.get("experiments") or []:
            for rev in experiment["revs"]:
                found[rev["name"]] = {"rev": rev["rev"], "state": (experiment.get("executor") or {}).get("state"),
                                      "metrics": rev["data"]["metrics"], "params": rev["data"]["params"]}  # fmt: skip
    return found


def _processes_of(marker: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            pass
    return found


def _study(root: Path, name: str) -> Any:
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{root / 'data' / 'sweeps' / name / 'study.db'}")


@pytest.mark.slow
def test_optuna_prunes_a_diverging_trial_and_resumes_after_a_kill(reproduced_repo: Path) -> None:
    """Trial 0 is the baseline's lr, trial 1 a learning rate that makes the loss diverge: the median pruner
    stops it. The search is SIGKILLed once two trials are done; run again (as the Prefect flow), it ends with
    four finished trials, not six."""
    from optuna.trial import TrialState

    from flows.sweep import sweep_flow

    root = reproduced_repo
    space = {"train_text.lr": "loguniform(1e-3, 1.0)"}
    command = [sys.executable, "-m", "flows.sweep", "optuna", "--trials", "4", "-S", f"train_text.lr={space['train_text.lr']}",
               "--name", "search", "--enqueue", '{"train_text.lr": 0.003}', "--enqueue", '{"train_text.lr": 0.9}']  # fmt: skip
    search = subprocess.Popen(command, cwd=root, env=venv_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        # Killed while the third trial trains: its `dvc exp run` outlives the sweep (DVC ignores the interrupt
        # the kernel sends it while a stage runs) until the resumed run interrupts it.
        third = root / "data/sweeps/search/logs/search-2.log"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and search.poll() is None:
            if third.is_file() and "Running stage 'train_text'" in third.read_text(encoding="utf-8", errors="replace"):
                break
            time.sleep(0.1)
        assert search.poll() is None, search.communicate()[0].decode()[-3000:]
    finally:
        search.kill()
        output = search.communicate()[0].decode()
    first = _study(root, "search").trials
    assert [t.state for t in first[:2]] == [TrialState.COMPLETE, TrialState.PRUNED], output[-3000:]
    assert first[1].params == {"train_text.lr": 0.9} and first[1].last_step == 4  # stopped at its first logged step
    # Reported as -loss (the study maximises BLEU): it diverged, far above the baseline's loss at that step.
    assert first[1].intermediate_values[4] < first[0].intermediate_values[4] - 1.0
    assert "search-1: pruned at step 4" in output

    result = sweep_flow(mode="optuna", repo_root=str(root), space=space, name="search", trials=4)
    trials = _study(root, "search").trials
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) == 4 and len(trials) <= 5, [(t.number, t.state) for t in trials]
    assert len({t.params["train_text.lr"] for t in done}) == 4  # a resumed sampler does not propose old points again
    assert not _processes_of("--name search-")
    assert result["best"]["Experiment"] in {t.user_attrs["experiment"] for t in done if t.state == TrialState.COMPLETE}
    shown = _experiments(root)
    for trial in done:
        if trial.state == TrialState.COMPLETE:
            experiment = shown[trial.user_attrs["experiment"]]
            assert experiment["metrics"]["metrics/text.json"]["data"]["bleu"] == trial.value
            assert experiment["params"]["params.yaml"]["data"]["train_text"]["lr"] == trial.params["train_text.lr"]
    assert "search-1" not in shown  # stopped mid-training: no experiment was saved
    complete = {t.user_attrs["experiment"] for t in trials if t.state == TrialState.COMPLETE}
    assert {n for n in shown if n.startswith("search-")} == complete  # no trial left "running" in `dvc exp show`
    assert all(shown[n]["state"] in (None, "success") for n in complete)
    table = (root / "data/sweeps/search/trials.csv").read_text(encoding="utf-8").splitlines()
    assert table[0].startswith("trial,Experiment,rev,State,train_text.lr,metrics/text.json:bleu,pruned_at")
    assert ",search-1,,pruned,0.9,,4," in table[2]


@pytest.mark.slow
def test_grid_runs_on_dvc_queue_and_the_best_trial_reproduces(reproduced_repo: Path) -> None:
    """2 x 2 grid, two queue workers: four experiments with their own metrics; `--apply-best` brings the best
    into the workspace and retraining it with `dvc repro` gives the same metrics. BentoML's store is untouched."""
    root = reproduced_repo
    store = Path(os.environ["BENTOML_HOME"])
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    packaged = (root / "models" / "bento.json").read_bytes()  # the baseline's package stage
    command = [sys.executable, "-m", "flows.sweep", "grid", "-S", "train_text.lr=1e-3,3e-3", "-S", "train_text.model.n_layer=1,2",
               "--jobs", "2", "--name", "grid", "--apply-best"]  # fmt: skip
    done = subprocess.run(command, cwd=root, env=venv_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "applied grid-" in done.stdout
    assert len(list((root / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.pid"))) == 2  # --jobs 2: two queue workers
    end_queue_workers(root)  # no idle worker outlives the test

    shown = {name: e for name, e in _experiments(root).items() if name.startswith("grid-")}
    assert sorted(shown) == ["grid-0", "grid-1", "grid-2", "grid-3"]
    assert len({e["rev"] for e in shown.values()}) == 4
    trained = [e["params"]["params.yaml"]["data"]["train_text"] for e in shown.values()]
    points = {(t["lr"], t["model"]["n_layer"]) for t in trained}
    assert points == {(0.001, 1), (0.001, 2), (0.003, 1), (0.003, 2)}
    assert all("bleu" in e["metrics"]["metrics/text.json"]["data"] for e in shown.values())
    best = json.loads((root / "data/sweeps/grid/best.json").read_text(encoding="utf-8"))
    assert best["metrics/text.json:bleu"] == max(e["metrics"]["metrics/text.json"]["data"]["bleu"] for e in shown.values())
    importances = json.loads((root / "data/sweeps/grid/importances.json").read_text(encoding="utf-8"))
    assert set(importances) == {"train_text.lr", "train_text.model.n_layer"}
    assert (root / "data/sweeps/grid/history.html").stat().st_size > 10_000

    applied = shown[best["Experiment"]]
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8"))
    assert params["train_text"]["lr"] == best["train_text.lr"]
    assert params["train_text"]["model"]["n_layer"] == best["train_text.model.n_layer"]
    _dvc(root, "repro", "--force", "--single-item", "train_text")
    _dvc(root, "repro", "--force", "--single-item", "evaluate_text")
    committed = subprocess.run(["git", "show", f"{applied['rev']}:metrics/text.json"], cwd=root, capture_output=True, text=True)
    assert json.loads((root / "metrics/text.json").read_text(encoding="utf-8")) == json.loads(committed.stdout)

    assert (root / "models" / "bento.json").read_bytes() == packaged  # trials end at evaluate_text: nothing packaged
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before

    shown_again = subprocess.run([sys.executable, "-m", "flows.sweep", "show", "--name", "grid"], cwd=root, env=venv_env(),
                                 capture_output=True, text=True)  # fmt: skip
    assert shown_again.returncode == 0 and f"best: {best['Experiment']}" in shown_again.stdout, shown_again.stderr[-2000:]
