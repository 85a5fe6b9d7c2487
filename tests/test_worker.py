"""A step in a fresh process ends with the process that started it, is interrupted with it, and its
death is one line: `compare` runs its conversions and training runs so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qpissa import UserError
from qpissa.worker import in_fresh_process

# a parent whose worker sleeps for ten minutes: what a long conversion or training run looks like to it
# SIGINT handled as on a terminal: a test run started as a script's `&` job inherits it ignored
SLEEPING_PARENT = (
    "import signal, time; from qpissa.worker import in_fresh_process; "
    "signal.signal(signal.SIGINT, signal.default_int_handler); in_fresh_process(time.sleep, 600)"
)


def _children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux's /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended while we looked
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended, only not yet been reaped


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _sleeping_worker() -> tuple[subprocess.Popen, int]:
    """A parent process and its worker, once the worker is running."""
    parent = subprocess.Popen([sys.executable, "-c", SLEEPING_PARENT], stderr=subprocess.PIPE)
    workers: list[int] = []
    assert _wait_for(lambda: bool(workers.extend(_spawned(parent.pid)) or workers), 60), "no worker started"
    time.sleep(3.0)  # the worker imports and reaches its sleep
    return parent, workers[0]


def _spawned(pid: int) -> list[int]:
    """The worker processes `pid` started: not multiprocessing's resource tracker, also its child."""
    found = []
    for child in _children(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:  # ended while we looked
            continue
        if b"spawn_main" in command:
            found.append(child)
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux's /proc")
def test_a_worker_ends_when_its_parent_is_killed() -> None:
    """Killed, the parent cannot stop its worker: it worked on unseen, holding its output's lock (a rerun
    was refused) and its memory."""
    parent, worker = _sleeping_worker()
    parent.kill()
    parent.wait()
    ended = _wait_for(lambda: not _alive(worker), 10)
    if not ended:
        os.kill(worker, signal.SIGKILL)
    assert ended, "the worker outlived its parent"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads processes from Linux's /proc")
def test_an_interrupt_of_the_parent_alone_reaches_its_worker() -> None:
    """`kill -INT` of the parent (not of the whole process group, as a terminal's Ctrl-C) waited for the
    worker to finish its whole step."""
    parent, worker = _sleeping_worker()
    os.kill(parent.pid, signal.SIGINT)
    try:
        parent.wait(timeout=120)  # far below the step: a loaded machine may start slowly
    finally:
        parent.kill()
    assert b"KeyboardInterrupt" in parent.stderr.read()
    assert _wait_for(lambda: not _alive(worker), 10)


def test_a_worker_that_dies_is_one_line_saying_how_to_go_on() -> None:
    """A worker killed (by the system, out of memory) was a BrokenProcessPool traceback and a bug report."""
    with pytest.raises(
        UserError, match=r"^the worker process of this step was killed .*rerun the same command"
    ):
        in_fresh_process(os._exit, 3)


def test_a_script_without_a_main_guard_is_told_to_add_one(tmp_path: Path) -> None:
    """Each step's process imports the calling script first: without the guard the script runs again
    there and the step died, reported as killed for memory."""
    script = tmp_path / "convert_all.py"
    script.write_text(
        "from qpissa import UserError\n"
        "from qpissa.worker import in_fresh_process\n"
        "try:\n"
        "    in_fresh_process(abs, -1)\n"
        "except UserError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("the worker process of this step failed to start"), done
    assert 'under `if __name__ == "__main__":`' in done.stdout
