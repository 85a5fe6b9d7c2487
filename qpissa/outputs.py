"""Where commands write: outputs kept apart from inputs, one writer per output, finished or absent.

Every command that creates or replaces a directory resolves it here first (`resolve_output`: a symbolic
link is written through), checks it before anything is written (`check_apart`, `check_replaceable`),
holds its lock while it writes (`output_lock.lock_output`), and builds it in `OUT.partial/`, which
appears under its name only when complete (`start_partial`, `finish_partial`).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from qpissa import UserError
from qpissa.artifacts import PARTIAL_MARKER, partial_dir, read_json

log = logging.getLogger(__name__)


def resolve_output(output: Path, output_flag: str) -> Path:
    """Where `output` is written: itself, or the path it points at when it is a symbolic link.

    A link (the usual way to put an output on another disk) is written through, resolved once here:
    OUT.partial/ and OUT.lock go beside the directory it points at, on that disk, so the finished build
    is renamed into place there, and the link goes on pointing at it. A dangling link is written through
    too, where its directory exists.

    Args:
        output: the directory the command will create, fill or replace, as the user gave it.
        output_flag: how the user names it (`OUT`, `--out`), for messages.

    Returns:
        `output` with `~` expanded (a quoted one too, as the Trainer's output_dir), or its link's target.

    Raises:
        UserError: `output` is the file-system root, a link that loops, or a link into a directory that
            does not exist (an unmounted disk, say), all before anything is written.
    """
    output = output.expanduser()
    if output.is_symlink():
        try:
            target = output.resolve()
        except (RuntimeError, OSError):  # a loop: RuntimeError up to Python 3.12, OSError after
            raise UserError(
                f"{output_flag} {output} is a symbolic link that loops; point it at a directory, or "
                f"choose another {output_flag}"
            ) from None
        if not target.parent.is_dir():
            raise UserError(
                f"{output_flag} {output} is a symbolic link to {target}, but {target.parent} does not exist "
                f"(a disk not mounted?); create it, or choose another {output_flag}"
            )
        log.info("%s %s is a symbolic link to %s, which holds the output", output_flag, output, target)
        output = target
    if not output.resolve().name:
        raise UserError(f"{output_flag} {output} is the file-system root; choose a directory to write")
    return output


def check_not_current(output: Path, output_flag: str) -> None:
    """Refuse an output a finished build replaces by a rename (`finish_partial`, a conversion's) that is the
    current directory or holds it (`.`, `..`): the shell would be left in a deleted directory. (train
    writes its run in place, so a run's own directory may be the current one.)"""
    if Path.cwd().is_relative_to(output.resolve()):
        raise UserError(
            f"{output_flag} {output} is the current directory or holds it, which the finished output would "
            "replace, leaving your shell in a deleted directory; name a new directory, such as ./out"
        )


def check_apart(output: Path, output_flag: str, inputs: dict[str, Path | None]) -> None:
    """Refuse an output that is, contains, or lies inside one of the inputs.

    Args:
        output: the directory the command will create, fill or replace.
        output_flag: how the user names it (`OUT`, `output_dir`), for the message.
        inputs: how the user names each input (`MODEL`, `data.path`; "" where it has no name of its own)
            -> its path (None: not given).

    Raises:
        UserError: naming the first clash and what to do.
    """
    out = output.expanduser().resolve()
    for flag, path in inputs.items():
        if path is None:
            continue
        source = path.expanduser().resolve()
        if out == source:
            relation = "is"
        elif out in source.parents:
            relation = "contains"
        elif source in out.parents:
            relation = "is inside"
        else:
            continue
        named = f"{flag} {path}" if flag else str(path)
        raise UserError(
            f"{output_flag} {output} {relation} the input {named}; writing there could delete or "
            f"change it: choose an {output_flag} outside every input"
        )


def check_replaceable(output: Path, output_flag: str, markers: tuple[str, ...], what: str) -> None:
    """Refuse to replace a non-empty directory that is not a qpissa output of the expected kind.

    Args:
        output: the existing directory an overwrite would remove.
        output_flag: how the user names it.
        markers: file names of which at least one marks the expected kind (e.g. `qpissa_report.json`).
        what: the kind in words (`a QPiSSA directory`).

    Raises:
        UserError: the directory holds something else, which an overwrite would destroy.
    """
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not any((output / marker).exists() for marker in markers):
        raise UserError(
            f"{output_flag} {output} exists and is not {what}, so it is not replaced; "
            f"choose another {output_flag}, or empty it yourself"
        )


def check_holds_only(output: Path, output_flag: str, patterns: tuple[str, ...], what: str) -> None:
    """Refuse to replace a directory that holds anything but what its writer names (`patterns`, globs).

    Args:
        output: the directory that would be replaced.
        output_flag: how the user names it.
        patterns: the names a directory of the expected kind holds (`report.md`, `*.png`); a folder's
            ends with `/` (`checkpoint-*/`).
        what: the kind in words (`a report directory`).

    Raises:
        UserError: `output` is a file, or holds something else, which replacing it would destroy.
    """
    if output.exists() and not output.is_dir():
        raise UserError(f"{output_flag} {output} is a file; choose a directory path")
    if not output.is_dir():
        return
    # a kill right after `finish_partial`'s rename leaves the marker in OUT
    own = (*patterns, PARTIAL_MARKER)
    names = (f"{path.name}/" if path.is_dir() else path.name for path in output.iterdir())
    other = sorted(name for name in names if not any(fnmatch.fnmatchcase(name, pattern) for pattern in own))
    if other:
        listed = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise UserError(
            f"{output_flag} {output} holds {listed}, which {what} does not and replacing it would delete; "
            f"move that out of {output_flag}, or choose a new or empty {output_flag}"
        )


def check_only_own(out_dir: Path, report: str, ours: set[str], folders: set[str], writer: str) -> None:
    """`--overwrite` replaces OUT whole: refuse one holding a file or folder its writer did not put there
    (a training run moved in, the user's notes).

    Args:
        report: the name of the writer's report in `out_dir`, whose `files` list (`files_in`) is what it
            wrote; a report from before that list, or a damaged one, is judged by its folders alone.
        ours: the writer's files the list leaves out (resume and build markers, compare's record).
        folders: the folders the writer makes.
        writer: `conversion`, `export`: for the message.

    Raises:
        UserError: naming the first three others.
    """
    try:
        recorded = read_json(out_dir / report, "").get("files")
    except UserError:
        recorded = None
    others = sorted(f"{p.name}/" for p in out_dir.iterdir() if p.is_dir() and p.name not in folders)
    if recorded is not None:
        kept = {*recorded, *ours}
        others += [
            name for name in files_in(out_dir) if name not in kept and f"{name.split('/')[0]}/" not in others
        ]
    if others:
        named = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise UserError(
            f"OUT {out_dir} holds {named}, which its {writer} did not write and --overwrite would delete; "
            "move it out of OUT, or choose another OUT"
        )


def files_in(directory: Path) -> list[str]:
    """Every file under `directory`, as a relative POSIX path: what an output's report lists as its own."""
    return sorted(
        path.relative_to(directory).as_posix() for path in directory.rglob("*") if not path.is_dir()
    )


def start_partial(output: Path, output_flag: str) -> Path:
    """Create `OUT.partial/` to build `output` in, replacing only an interrupted build of qpissa's own.

    Call it while holding `lock_output(output)`: no live process is writing `OUT.partial/` then, so one
    that holds qpissa's marker (or nothing) is an interrupted build and safe to remove. Anything else
    there belongs to the user and is never removed.

    Raises:
        UserError: `OUT.partial` exists and is not a build of qpissa's.
    """
    check_not_current(output, output_flag)
    partial = partial_dir(output)
    if partial.exists() or partial.is_symlink():
        ours = (
            partial.is_dir()
            and not partial.is_symlink()
            and ((partial / PARTIAL_MARKER).is_file() or not any(partial.iterdir()))
        )
        if not ours:
            raise UserError(
                f"{partial} exists and was not made by qpissa, so it is not removed; move it away or "
                f"choose another {output_flag}"
            )
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    (partial / PARTIAL_MARKER).write_text(json.dumps({"pid": os.getpid()}) + "\n")
    return partial


def finish_partial(partial: Path, output: Path) -> None:
    """Make the finished build appear as `output`, replacing an earlier one the caller checked.

    The marker goes only once the build is in place: if the rename fails, `OUT.partial/` is still
    recognised as qpissa's and the next run replaces it.
    """
    readable_as_umask_allows(partial)
    replace_dir(partial, output)
    (output / PARTIAL_MARKER).unlink()


def readable_as_umask_allows(directory: Path) -> None:
    """Give the .safetensors files below `directory` the mode any new file gets (0644 under umask 022).

    safetensors writes through a temporary file created 0600 whatever the umask (safetensors issue
    782), so a model or adapter saved by transformers or PEFT was unreadable to the user's group.
    """
    umask = os.umask(0)
    os.umask(umask)
    for path in directory.rglob("*.safetensors"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def replace_dir(source: Path, target: Path) -> None:
    """Rename `source` to `target`; a non-empty `target` is swapped out first and removed after.

    `target` is never half of each. On Linux the two are exchanged in one atomic step, so `target` always
    exists; elsewhere the old one is moved aside first, which leaves a moment with no `target`, and is
    put back if the rename fails.
    """
    if not (target.is_dir() and any(target.iterdir())):
        source.rename(target)  # an empty directory is replaced by rename(2) itself
    elif _exchange(source, target):
        shutil.rmtree(source)  # now the old directory
    else:
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.replaced-", dir=target.parent))
        target.rename(aside / target.name)
        try:
            source.rename(target)
        except BaseException:  # the old one goes back: `target` is never lost
            (aside / target.name).rename(target)
            aside.rmdir()
            raise
        shutil.rmtree(aside)


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL("libc.so.6").renameat2
    except (OSError, AttributeError):  # musl, or a glibc older than 2.28
        return False
    at_cwd, rename_exchange = -100, 2
    return renameat2(at_cwd, os.fsencode(first), at_cwd, os.fsencode(second), rename_exchange) == 0
