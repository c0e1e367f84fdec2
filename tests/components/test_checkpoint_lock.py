"""One trainer per checkpoint folder: a second is refused at once with the holder's pid; a killed holder frees it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from components import train_text
from components.checkpoints import LOCK_FILE, checkpoint_lock
from components.common import EX_TEMPFAIL, BusyError
from tests.conftest import REPO_ROOT, write_params

HOLD = """
import sys, time
from pathlib import Path
from components.checkpoints import checkpoint_lock
with checkpoint_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(300)
"""


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another trainer: a process that holds tmp_path/ckpt's lock until it is killed."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "ckpt")], env=env, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    yield process
    process.kill()
    process.wait()


def test_a_second_holder_is_refused_with_the_pid_and_a_killed_holder_leaves_no_stale_lock(
    holder: subprocess.Popen[str], tmp_path: Path
) -> None:
    ckpt = tmp_path / "ckpt"
    with pytest.raises(BusyError) as refused, checkpoint_lock(ckpt):
        pytest.fail("two holders")
    message = str(refused.value)
    assert str(ckpt) in message and f"pid {holder.pid}" in message and f"kill {holder.pid}" in message
    assert "\n" not in message

    holder.kill()  # SIGKILL: no chance to release anything
    holder.wait()
    with checkpoint_lock(ckpt):
        assert (ckpt / LOCK_FILE).read_text() == f"{os.getpid()}\n"
    with checkpoint_lock(ckpt):  # released on leaving, and again free
        pass


def test_a_training_stage_on_a_busy_folder_stops_at_once_with_one_line(
    holder: subprocess.Popen[str],
    tiny_params: dict[str, Any],
    tiny_features: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ckpt = tmp_path / "ckpt"
    params = write_params(tiny_params, tmp_path / "params.yaml")
    argv = [str(tiny_features / "text"), str(tmp_path / "model"), "--checkpoints", str(ckpt), "--params", str(params)]
    with caplog.at_level(logging.INFO), pytest.raises(SystemExit) as stopped:
        train_text.main(argv)
    assert stopped.value.code == EX_TEMPFAIL  # sysexits' "try again later": the flow retries it
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"busy: checkpoint folder {ckpt} is in use by another trainer (pid {holder.pid})")
    # Refused before the job was built: nothing trained, nothing written.
    assert "trainable parameters" not in caplog.text
    assert not (tmp_path / "model").exists() and [p.name for p in ckpt.iterdir()] == [LOCK_FILE]
