"""A stage ends with the program that started it: killed with SIGKILL, its owner leaves no orphan behind.

An owner process (what `dvc repro` is to a stage) starts the guarded worker directly, through `sh -c` (DVC
runs a stage's cmd through `$SHELL -c`, and dash does not exec the last command), or as torchrun's DDP
workers. It is then killed -9 and left unreaped, a zombie, as a busy parent leaves it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from components.common import stage_program
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the guard is Linux only")

WORKER = str(REPO_ROOT / "tests" / "components" / "guarded_worker.py")
OWNER = "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); time.sleep(300)"


def wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture
def owned(tmp_path: Path) -> Iterator[Callable[[list[str], int], tuple[subprocess.Popen[bytes], list[psutil.Process]]]]:
    """Start `command` under an owner; wait for `workers` guarded workers; return the owner and every process of
    the tree below it (relays, workers, their forked children and programs). Whatever survives is killed after."""
    started: list[tuple[subprocess.Popen[bytes], list[psutil.Process]]] = []

    def start(command: list[str], workers: int) -> tuple[subprocess.Popen[bytes], list[psutil.Process]]:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
        with (tmp_path / "stderr.log").open("wb") as stderr:
            owner = subprocess.Popen([sys.executable, "-c", OWNER, *command], env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        tree: list[psutil.Process] = []
        started.append((owner, tree))
        assert wait_for(lambda: len(list(tmp_path.glob("pids-*.txt"))) == workers, timeout=120), "workers did not start"
        tree += psutil.Process(owner.pid).children(recursive=True)
        assert len(tree) >= 3 * workers
        return owner, tree

    yield start
    for owner, tree in started:
        for process in tree:
            if running(process):
                process.kill()
        owner.kill()
        owner.wait()


@pytest.mark.parametrize(
    "through",
    [
        pytest.param("direct", id="direct-child"),  # the kernel's parent-death signal
        pytest.param("shell", id="through-sh"),  # the watcher: the owner is above an orphaned shell
    ],
)
def test_a_stage_ends_when_its_owner_is_killed(owned: Callable, tmp_path: Path, through: str) -> None:
    worker = [sys.executable, WORKER, str(tmp_path)]
    command = worker if through == "direct" else ["sh", "-c", f"{shlex.join(worker)}; true"]
    owner, tree = owned(command, 1)
    (pids,) = tmp_path.glob("pids-*.txt")
    own, forked, _program = (psutil.Process(int(p)) for p in pids.read_text().split())

    os.kill(owner.pid, signal.SIGKILL)  # not reaped: a zombie until the fixture waits for it
    start = time.monotonic()
    assert wait_for(lambda: not running(own) and not running(forked), timeout=5), "the worker outlived its owner"
    assert time.monotonic() - start < 3
    if through == "shell":
        # The watcher ends the whole tree, programs the worker started included, and says why.
        assert wait_for(lambda: not any(map(running, tree)), timeout=3), [p.pid for p in tree if running(p)]
        line = f"guarded_worker: the process that started it (pid {owner.pid}) is gone; stopping"
        assert line in (tmp_path / "stderr.log").read_text()
    # Directly under the owner, the kernel's SIGTERM ends the worker at once and the child it forked (a
    # DataLoader worker) with it; a program it started (`sleep`) is not guarded there, and left to the fixture.


@pytest.mark.slow
def test_torchrun_workers_and_their_agent_end_when_the_owner_is_killed(owned: Callable, tmp_path: Path) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    owner, tree = owned(["sh", "-c", f"{shlex.join([*torchrun, WORKER, str(tmp_path)])}; true"], 2)
    agent = next(p for p in tree if "torch.distributed.run" in p.cmdline())

    os.kill(owner.pid, signal.SIGKILL)
    assert wait_for(lambda: not any(map(running, tree)), timeout=5), [p.cmdline() for p in tree if running(p)]
    assert not running(agent)
    assert (tmp_path / "stderr.log").read_text().count(f"the process that started it (pid {owner.pid}) is gone") >= 1


def test_the_owner_is_the_first_ancestor_that_is_not_a_shell() -> None:
    code = "import os; from components.common import owner_of; r, o = owner_of(os.getpid()); print([p.name for p in r], o.pid)"
    command = ["sh", "-c", f"{shlex.join([sys.executable, '-c', code])}; true"]
    run = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["['sh']", str(os.getpid())]  # the shell relays; this test process owns it


def test_a_stage_main_called_in_process_is_not_guarded() -> None:
    # run_main arms the guard only in a process started to run a stage: pytest here is left alone.
    assert stage_program() is None


def test_an_unreadable_proc_entry_neither_stops_nor_blinds_the_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """/proc may hide other users' processes (hidepid) or run out of file handles: such an entry is skipped
    when looking for this process's children, counted as running when stopping, and never taken as gone."""
    from components import common

    real = common.process_stat
    me = real(os.getpid())
    assert me is not None

    def hidden(pid: int) -> common.ProcessStat | None:
        if pid == 1:
            raise PermissionError(13, "hidepid")
        return real(pid)

    monkeypatch.setattr(common, "process_stat", hidden)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in [p.pid for p in common.descendants(os.getpid())]  # pid 1 skipped, not fatal
        init = common.ProcessStat(1, "init", "S", 0, 0)
        assert common._maybe_running(init) is True
        with pytest.raises(PermissionError):
            common.still_running(init)  # no answer is not "gone": the watcher asks again
    finally:
        child.kill()
        child.wait()
