"""One writer per output: the OS lock `OUT.lock` a command holds while it writes OUT.

The lock is an flock(2) on the file beside OUT, which holds the writer's pid. A process forked while it is
held (a DataLoader's workers) closes its copy at once: an flock belongs to the open file, so a copy would
keep it held after its writer was killed, until the last worker noticed and ended. That takes the module's
one piece of state, the descriptors held, and a fork hook registered at import: a `lockf` lock, which no
child inherits, is the process's, and would let the nested writers of one process in (compare's).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qpissa import UserError
from qpissa.artifacts import LOCK_SUFFIX

log = logging.getLogger(__name__)

_held: set[int] = set()  # descriptors of the locks this process holds, closed in a forked child


def _close_held_in_child() -> None:
    for descriptor in _held:
        os.close(descriptor)
    _held.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


@contextmanager
def lock_output(output: Path, output_flag: str) -> Iterator[None]:
    """Hold an OS advisory lock on `output` while the body runs: a second writer is refused.

    The lock is the file `OUT.lock` beside OUT, holding the writer's pid. The kernel drops the lock when
    its process ends, however it ends, so the file a killed process leaves behind locks nothing: the next
    command takes it over (`--resume` works after a kill). Missing parent directories are created, and
    removed again if they are still empty at the end: a refused command leaves nothing behind.

    Args:
        output: the directory the command writes.
        output_flag: how the user names it (`OUT`, `output_dir`, `--out`), for messages.

    Raises:
        UserError: another live process holds the lock, or the location cannot be written.
    """
    path = lock_path(output)
    created = _make_parents(path.parent, output, output_flag)
    try:
        descriptor, owner = _acquire(path, output, output_flag), os.getpid()
        _held.add(descriptor)
        try:
            yield
        finally:
            if os.getpid() == owner:  # not in a forked child leaving the body: the lock is its parent's
                path.unlink(missing_ok=True)  # before the lock goes: a waiting opener sees the file is gone
                _held.discard(descriptor)
                os.close(descriptor)
    finally:
        for directory in reversed(created):
            try:
                directory.rmdir()
            except OSError:  # not empty: the command's output is in it
                break


def lock_path(output: Path) -> Path:
    """The lock file of `output`: `OUT.lock` beside it."""
    resolved = output.expanduser().resolve()
    if not resolved.name:
        raise UserError(f"{output} is the file-system root; choose a directory to write")
    return resolved.with_name(resolved.name + LOCK_SUFFIX)


def _make_parents(directory: Path, output: Path, output_flag: str) -> list[Path]:
    """Create `directory` and its missing parents; return the ones created, outermost first."""
    missing = [path for path in (directory, *directory.parents) if not path.exists()][::-1]
    existing = missing[0].parent if missing else directory
    if not existing.is_dir():
        raise UserError(
            f"{output_flag} {output} cannot be created: {existing} is a file, not a directory; "
            f"choose another {output_flag}"
        )
    for made, path in enumerate(missing):
        try:
            path.mkdir()
        except OSError as error:
            for directory in reversed(missing[:made]):
                directory.rmdir()
            raise UserError(
                f"{output_flag} {output} cannot be created ({path}: {error.strerror}); "
                f"choose a location you can write to"
            ) from None
    return missing


def _acquire(path: Path, output: Path, output_flag: str) -> int:
    """Lock `path` without waiting; return its open descriptor."""
    while True:
        try:
            # never through a link: the file is truncated and removed, and must be nobody else's
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise UserError(_not_a_lock(path, output_flag, "a symbolic link")) from None
            if error.errno == errno.EISDIR:
                raise UserError(_not_a_lock(path, output_flag, "a directory")) from None
            raise UserError(
                f"{output_flag} {output} cannot be written ({path}: {error.strerror}); "
                f"choose a location you can write to"
            ) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(descriptor)
            os.close(descriptor)
            who = f"another process (pid {holder})" if holder else "another process"
            raise UserError(
                f"{who} is writing {output}; wait for it to finish, or choose another {output_flag}"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(descriptor)  # its holder removed the file as we opened it: lock the new one
    if not stat.S_ISREG(os.fstat(descriptor).st_mode) or (
        os.pread(descriptor, 1, 0) and not _read_pid(descriptor)
    ):
        os.close(descriptor)
        raise UserError(_not_a_lock(path, output_flag, "not one qpissa wrote"))
    previous = _read_pid(descriptor)
    if previous:
        log.info(
            "%s was left by process %d, which ended without releasing it; taking it over", path, previous
        )
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{os.getpid()}\n".encode(), 0)
    return descriptor


def _not_a_lock(path: Path, output_flag: str, why: str) -> str:
    return (
        f"{path} is where {output_flag}'s lock file goes, but it is {why}, so it is left alone; "
        f"move it away, or choose another {output_flag}"
    )


def _read_pid(descriptor: int) -> int | None:
    text = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
