"""What `train` checks before it resumes from a checkpoint-N directory.

A resume must either continue exactly or be refused before the run directory (log, adapter, later
checkpoints) is touched: every file Trainer restores is whole, and the saved adapter fits the model.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from qpissa import UserError
from qpissa.artifacts import (
    CHECKPOINT_PREFIX,
    RUN_MARKER,
    TRAINER_STATE,
    ModelSource,
    has_adapter,
    latest_checkpoint,
    read_json,
    run_model,
    trained_on,
)
from qpissa.options import to_dict
from qpissa.recipe import TrainConfig
from qpissa.stored import read_adapter

RESUMED_FILES = ("optimizer.pt", "scheduler.pt")  # what Trainer restores, as torch zips, and the RNG:
RNG_FILES = "rng_state*.pth"  # rng_state.pth, or rng_state_<rank>.pth per process of a multi-process run
# what fixes the batches a resumed run replays up to its step: changed, the run would not continue exactly
CONTINUED_SETTINGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "seed")
# (the data's path is not among them: a moved or copied file is the same data)
CONTINUED_DATA = ("format", "subset", "split", "samples", "max_seq_len", "packing", "response_only")
# what fixes the learning rate of every step: the Trainer restores the optimizer's and the scheduler's
# state, so a changed value would be ignored (the learning rate) or break the schedule (its length)
SCHEDULE_SETTINGS = ("learning_rate", "lr_scheduler_type", "warmup_ratio")
SCHEDULE_TRAINER_OPTIONS = ("warmup_steps", "lr_scheduler_kwargs")
RUN_LENGTH = ("max_steps", "num_train_epochs")  # free to change on a constant schedule only
CONSTANT_SCHEDULES = ("constant", "constant_with_warmup")


def check_checkpoint(checkpoint: Path, config: TrainConfig, source: ModelSource) -> None:
    """`checkpoint` is a whole checkpoint-N of a run on `source` (the model directory `config.model`
    names), resumed with the settings that fix its data order and steps.

    Raises:
        UserError: not a checkpoint, a missing or corrupt file, an adapter of another shape, or a run on
            another model or with other batches, data or seed.
    """
    model = config.model
    if not (checkpoint / TRAINER_STATE).is_file():
        if (
            not checkpoint.name.startswith(CHECKPOINT_PREFIX)
            or not checkpoint.is_dir()
            or not (checkpoint.parent / RUN_MARKER).is_file()
        ):
            raise UserError(f"resume_from_checkpoint {checkpoint} is not a checkpoint-N directory of a run")
        complete = latest_checkpoint(checkpoint.parent)
        earlier = (
            f"resume_from_checkpoint={complete}"
            if complete
            else "overwrite_output_dir=true (no resume) to start again"
        )
        raise UserError(
            f"resume_from_checkpoint {checkpoint} is incomplete (its write was cut short: no "
            f"{TRAINER_STATE}); use {earlier}"
        )
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
    _check_same_run(checkpoint, config, source)


def _check_same_run(checkpoint: Path, config: TrainConfig, source: ModelSource) -> None:
    """The run the checkpoint belongs to (its qpissa_run.json, when it is still beside it) trained the
    same conversion (a copy of it is the same) with the same batches, data and seed: anything else would
    not continue it exactly."""
    marker_path = checkpoint.parent / RUN_MARKER
    if not marker_path.is_file():
        return
    marker = read_json(marker_path, "resume from a checkpoint of an intact run", required=("model", "config"))
    same = trained_on(marker, source.base_dir)
    if same is None:  # a run recorded before the fingerprint was kept: its model's path
        same = Path(marker["model"]).resolve() == source.base_dir.resolve()
    if not same and run_model(checkpoint.parent).resolve() == source.base_dir.resolve():
        raise UserError(
            f"resume_from_checkpoint {checkpoint} belongs to a run on a conversion that {config.model} no "
            "longer holds (converted again, with other settings or from another model); put the run's "
            "conversion back there, or start a new run"
        )
    if not same:
        raise UserError(
            f"resume_from_checkpoint {checkpoint} belongs to a run on {marker['model']}, not on model "
            f"{config.model}; resume with model={marker['model']}"
        )
    before, now = _continued(marker["config"]), _continued(to_dict(config))
    changed = [f"{key}={value!r}" for key, value in before.items() if now[key] != value]
    if changed:
        raise UserError(
            f"resume_from_checkpoint {checkpoint} continues a run with {', '.join(changed)}, which this "
            "config changes; resume with the run's settings (its qpissa_run.json), or start a new run"
        )
    before, now = _schedule(marker["config"]), _schedule(to_dict(config))
    changed = [f"{key}={value!r}" for key, value in before.items() if now.get(key) != value]
    if changed:
        raise UserError(
            f"resume_from_checkpoint {checkpoint} continues a run with {', '.join(changed)}, which this "
            "config changes, but the checkpoint's optimizer and learning-rate schedule go on as they were "
            "saved; resume with the run's values, or start a new run"
        )


def _continued(config: dict) -> dict:
    """A run's settings that fix the batches it replays, flat (`data.max_seq_len`)."""
    data = config.get("data", {})
    return {key: config.get(key) for key in CONTINUED_SETTINGS} | {
        f"data.{key}": data.get(key) for key in CONTINUED_DATA
    }


def _schedule(config: dict) -> dict:
    """A run's settings that fix its learning rate at every step (its length too, on a decaying one)."""
    trainer = config.get("trainer") or {}
    settings = {key: config.get(key) for key in SCHEDULE_SETTINGS}
    settings |= {key: trainer.get(key) for key in SCHEDULE_TRAINER_OPTIONS}
    if config.get("lr_scheduler_type") not in CONSTANT_SCHEDULES:
        settings |= {key: config.get(key) for key in RUN_LENGTH}
    return settings


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
