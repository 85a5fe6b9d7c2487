"""One step of a longer command in a fresh interpreter (`compare`'s conversions and training runs, the
benchmarks), so that its peak memory is its own, ended and interrupted along with the process that
started it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from qpissa import LOG_FORMAT, UserError, hide_library_deprecation_notes

INTERRUPT_GRACE_S = 5.0  # a terminal's Ctrl-C reaches the worker too: the time it has to end on its own
PARENT_POLL_S = 1.0


def in_fresh_process(function: Any, *args: Any, **kwargs: Any) -> Any:
    """Run `function` in a new interpreter so that its peak memory (`peak_rss_mb`) is its own.

    Returns:
        What `function` returns; an exception it raises is raised here.

    Raises:
        UserError: the worker died without a word (killed: most often by the system, out of memory), or
            failed to start (a script that calls qpissa without a `__main__` guard).
    """
    context = multiprocessing.get_context("spawn")
    started = context.Event()
    with ProcessPoolExecutor(
        max_workers=1, mp_context=context, initializer=_set_up_like_this_process,
        initargs=(logging.getLogger().level, os.getpid(), started),
    ) as pool:  # fmt: skip
        future = pool.submit(_logged_above_bars, function, *args, **kwargs)
        try:
            return future.result()
        except KeyboardInterrupt:
            _interrupt_worker(future)
            raise
        except BrokenProcessPool:
            if not started.is_set():  # it ended while importing the caller's script, as spawn does first
                raise UserError(
                    "the worker process of this step failed to start (its error is above): a script that "
                    'calls qpissa must do so under `if __name__ == "__main__":`, since each step\'s fresh '
                    "process imports the script first"
                ) from None
            raise UserError(
                "the worker process of this step was killed (most often by the system, out of memory); free "
                "memory, then rerun the same command to continue"
            ) from None


def _interrupt_worker(future: Future) -> None:
    """Pass a Ctrl-C on to the worker unless it had its own: a SIGINT to this process alone (`kill -INT`)
    reaches no worker, and leaving the pool waits for it to finish its whole step."""
    try:
        future.result(timeout=INTERRUPT_GRACE_S)
    except TimeoutError:
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGINT)
    except BaseException:  # interrupted too, or failed: leaving the pool reaps it, then the caller re-raises
        pass


def _set_up_like_this_process(log_level: int, parent: int, started: Any) -> None:
    """A fresh process logs as the CLI's own does (level and `LOG_FORMAT`): unconfigured, it would drop
    notes and print warnings without saying whose they are. It ends when `parent` does."""
    started.set()
    hide_library_deprecation_notes()
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    threading.Thread(target=_end_with, args=(parent,), daemon=True).start()


def _end_with(parent: int) -> None:
    """End this worker once the process that started it is gone: killed, that one cannot stop it, and it
    would work on unseen, holding its output's lock (a rerun was refused) and its memory."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)  # what it wrote so far stays for the next run to continue from, as after any kill


def _logged_above_bars(function: Any, *args: Any, **kwargs: Any) -> Any:
    """`function(...)` with log lines printed above the worker's progress bars, as the CLI does."""
    from tqdm.contrib.logging import logging_redirect_tqdm  # tqdm reads TQDM_DISABLE at import: as late

    with logging_redirect_tqdm():
        return function(*args, **kwargs)
