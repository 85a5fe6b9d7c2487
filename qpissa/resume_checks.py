"""What `train` checks before it resumes from a checkpoint-N directory.

A resume must either continue exactly or be refused before the run directory (log, adapter, later
checkpoints) is touched: every file Trainer restores is whole, and the saved adapter fits the model.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from qpissa import UserError
from qpissa.artifacts import TRAINER_STATE, ModelSource, has_adapter, read_json
from qpissa.stored import read_adapter

RESUMED_FILES = ("optimizer.pt", "scheduler.pt")  # what Trainer restores, as torch zips, and the RNG:
RNG_FILES = "rng_state*.pth"  # rng_state.pth, or rng_state_<rank>.pth per process of a multi-process run


def check_checkpoint(checkpoint: Path, model: Path, source: ModelSource) -> None:
    """`checkpoint` is a whole checkpoint-N of a run on `source` (the model directory `model` names).

    Raises:
        UserError: not a checkpoint, a missing or corrupt file, or an adapter of another shape.
    """
    if not (checkpoint / TRAINER_STATE).is_file():
        raise UserError(f"resume_from_checkpoint {checkpoint} is not a checkpoint-N directory of a run")
    fix = f"resume from an earlier checkpoint-N of the run, or remove {checkpoint.name} if it is the newest"
    state = read_json(checkpoint / TRAINER_STATE, fix, required=("global_step",))
    if not isinstance(state["global_step"], int) or state["global_step"] < 0:
        raise UserError(
            f"{checkpoint / TRAINER_STATE}: global_step {state['global_step']!r} is invalid; {fix}"
        )
    rng = sorted(checkpoint.glob(RNG_FILES)) or [checkpoint / "rng_state.pth"]
    for path in [*(checkpoint / name for name in RESUMED_FILES), *rng]:
        _check_torch_file(path, fix)
    if not has_adapter(checkpoint):
        raise UserError(
            f"{checkpoint} has no adapter (adapter_config.json, adapter_model.safetensors); {fix}"
        )
    saved, initial = read_adapter(checkpoint), read_adapter(source.adapter_dir)
    if (saved.rank, saved.shapes) != (initial.rank, initial.shapes):
        raise UserError(
            f"resume_from_checkpoint {checkpoint} holds a rank-{saved.rank} adapter of {len(saved.shapes)} "
            f"layers, but model {model} has a rank-{initial.rank} adapter of {len(initial.shapes)} layers; "
            "resume with the model the run was trained on (its qpissa_run.json names it)"
        )


def _check_torch_file(path: Path, fix: str) -> None:
    """A file `torch.save` wrote (a zip archive) is there and whole: every part's checksum holds."""
    if not path.is_file():
        raise UserError(f"{path} is missing, so the run cannot continue exactly; {fix}")
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError) as error:
        raise UserError(f"{path} is truncated or corrupt ({error}); {fix}") from None
    if damaged is not None:
        raise UserError(f"{path} is corrupt (its part {damaged} fails its checksum); {fix}")
