"""A training run's marker, `qpissa_run.json`: the QPiSSA directory it trained, its data settings, and
whether that directory still holds the conversion the run was trained on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qpissa import UserError
from qpissa.artifacts import MODEL_FROM_RUN, RUN_MARKER, is_qpissa_dir, read_json, read_report


def read_run(run_dir: Path) -> dict:
    """The run marker `qpissa_run.json`: the QPiSSA directory trained, the config, the resolved runtime."""
    fix = "it is written by `qpissa train`: train again into a new output_dir"
    marker = read_json(run_dir / RUN_MARKER, fix, required=("model",))
    conversion = marker.get("conversion")  # None: a run recorded before the fingerprint was kept
    if conversion is not None and not (
        isinstance(conversion, dict) and isinstance(conversion.get("settings"), dict)
    ):
        raise UserError(
            f"{run_dir / RUN_MARKER} is damaged (`conversion`, the fingerprint of the conversion it trained, "
            f"is not an object with a `settings` object); {fix}"
        )
    return marker


def run_data_settings(run_dir: Path) -> Any:
    """The run's `data` group as its marker records it (format, max_seq_len, paths), or None."""
    config = read_run(run_dir).get("config")
    return config.get("data") if isinstance(config, dict) else None


def run_model(run_dir: Path) -> Path:
    """The QPiSSA directory a run trained, as its marker names it (a relative path is relative to the run);
    where that is gone or holds another conversion now, the one at the same place relative to the run, if
    it holds the run's: the two were moved together."""
    marker = read_run(run_dir)
    named, relative = marker["model"], marker.get(MODEL_FROM_RUN)
    if not isinstance(named, str) or not named:
        raise UserError(f"{run_dir / RUN_MARKER} has no model path; train again into a new output_dir")
    model = run_dir / named if not Path(named).is_absolute() else Path(named)
    if is_qpissa_dir(model) and trained_on(marker, model) is not False:
        return model
    beside = Path(os.path.normpath(run_dir / relative)) if isinstance(relative, str) else None
    if beside is not None and is_qpissa_dir(beside) and trained_on(marker, beside) is not False:
        return beside
    return model


# conversion settings that change only the report or how the tensors are split into files: a conversion
# redone with other values of these holds the same tensors, so the runs trained on it still belong to it
REPORT_ONLY_SETTINGS = ("metrics", "shard_size_mb")


def trained_on(marker: dict, qpissa_dir: Path) -> bool | None:
    """Whether a run (its qpissa_run.json `marker`) trained the conversion `qpissa_dir` holds now, by the
    conversion's fingerprint (a copy of the directory is the same); None for a run that predates it."""
    recorded = marker.get("conversion")
    if recorded is None:
        return None
    current = as_recorded(read_report(qpissa_dir)["fingerprint"], recorded)
    return _tensor_identity(recorded) == _tensor_identity(current)


def as_recorded(fingerprint: dict, recorded: dict) -> dict:
    """A conversion's `fingerprint` as `recorded` would hold it: without the checkpoint files' stats when
    it was recorded before they were kept, so it is matched by its settings alone, as it was then."""
    if not isinstance(recorded, dict) or "checkpoint" in recorded:
        return fingerprint
    return {key: value for key, value in fingerprint.items() if key != "checkpoint"}


def _tensor_identity(fingerprint: dict) -> dict:
    """A fingerprint without the settings that do not change its tensors; a damaged one matches none."""
    settings = fingerprint.get("settings") if isinstance(fingerprint, dict) else None
    if not isinstance(settings, dict):
        return {"damaged": fingerprint}
    return {**fingerprint, "settings": {k: v for k, v in settings.items() if k not in REPORT_ONLY_SETTINGS}}


def trained_model(run_dir: Path) -> Path:
    """The QPiSSA directory a run trained (`run_model`), refused where it is gone or holds another
    conversion now."""
    model = run_model(run_dir)
    if not is_qpissa_dir(model):
        raise UserError(
            f"{run_dir / RUN_MARKER} names model {read_run(run_dir)['model']}, which "
            f"{'is not a QPiSSA directory' if model.exists() else 'does not exist'} (resolved to {model}); "
            "put the run's QPiSSA directory back there, or correct `model` in that file"
        )
    check_trained_on(run_dir, model, "train again")
    return model


def check_trained_on(run_dir: Path, model: Path, otherwise: str) -> None:
    """Refuse a run whose QPiSSA directory `model` holds another conversion now (`trained_on`).

    Raises:
        UserError: naming the run and the directory; the fix ends with `otherwise`.
    """
    if trained_on(read_run(run_dir), model) is False:
        raise UserError(
            f"run {run_dir} was trained on a conversion that {model} no longer holds (converted again, with "
            f"other settings or from another model); put the run's conversion back there, or {otherwise}"
        )
