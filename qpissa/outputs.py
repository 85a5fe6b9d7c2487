"""Where commands write: outputs are kept apart from inputs, so no command can delete what it reads.

Every command that creates or replaces a directory checks it here first, before anything is written.
"""

from __future__ import annotations

from pathlib import Path

from qpissa import UserError


def check_apart(output: Path, output_flag: str, inputs: dict[str, Path | None]) -> None:
    """Refuse an output that is, contains, or lies inside one of the inputs.

    Args:
        output: the directory the command will create, fill or replace.
        output_flag: how the user names it (`OUT`, `output_dir`), for the message.
        inputs: how the user names each input (`MODEL`, `data.path`) -> its path (None: not given).

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
        raise UserError(
            f"{output_flag} {output} {relation} the input {flag} {path}; writing there could delete or "
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
