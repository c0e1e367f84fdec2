"""A stand-in stage for the orphan tests: arms `die_with_parent`, starts what a trainer may start, waits.

guarded_worker.py OUT     forks a child (as a DataLoader worker is forked) and starts a program (`sleep`), writes
                          OUT/pids-<pid>.txt ("<own pid> <forked child> <program>"), then waits to be stopped.

Run directly, through `sh -c`, or as torchrun's workers; only the standard library and components.common.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from components.common import die_with_parent


def main(out: Path) -> None:
    die_with_parent("guarded_worker")
    forked = os.fork()
    if forked == 0:
        time.sleep(120)
        os._exit(0)
    program = subprocess.Popen(["sleep", "120"])
    pids = out / f".pids-{os.getpid()}.tmp"
    pids.write_text(f"{os.getpid()} {forked} {program.pid}\n", encoding="utf-8")
    pids.rename(out / f"pids-{os.getpid()}.txt")  # whole, or not there yet
    time.sleep(120)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
