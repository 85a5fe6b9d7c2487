"""What `train` checks before it resumes from a checkpoint-N directory.

A resume must either continue exactly or be refused before the run directory (log, adapter, later
checkpoints) is touched: every file Trainer restores is whole, and the saved adapter fits the model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qpissa import UserError
from qpissa.artifacts import (
    CHECKPOINT_PREFIX,
    DATA_FINGERPRINT,
    RUN_MARKER,
    TOKENIZATION,
    TOKENIZATION_VERSION,
    TRAINER_STATE,
    ModelSource,
    has_adapter,
    latest_checkpoint,
    read_json,
)
from qpissa.options import to_dict
from qpissa.recipe import DataConfig, TrainConfig
from qpissa.run_marker import run_model, trained_on
from qpissa.stored import read_adapter
from qpissa.trainer_options import checked_options

if TYPE_CHECKING:
    import datasets
    from transformers import TrainingArguments

log = logging.getLogger(__name__)

RESUMED_FILES = ("optimizer.pt", "scheduler.pt")  # what Trainer restores, as torch zips, and the RNG:
RNG_FILES = "rng_state*.pth"  # rng_state.pth, or rng_state_<rank>.pth per process of a multi-process run
# what fixes the batches a resumed run replays up to its step: changed, the run would not continue exactly
CONTINUED_SETTINGS = ("per_device_train_batch_size", "gradient_accumulation_steps", "seed")
CONTINUED_TRAINER_OPTIONS = ("data_seed", "train_sampling_strategy", "dataloader_drop_last")
# every data setting is compared but these, which do not change what is trained on: the held-out data, how
# many of its answers are generated, how many processes tokenize, and beside data.sources, data.format (the
# held-out data's format only); and the paths, as a moved or copied file is the same data: what they hold
# is compared instead, by the fingerprint of the tokenized samples (`check_same_samples`)
NOT_TRAINED_ON = ("path", "eval_path", "eval_split", "eval_generate_samples", "num_proc")
# what fixes the learning rate of every step and each update: the Trainer restores the optimizer's and the
# scheduler's state, so a changed value would be ignored (the saved parameter groups keep their learning
# rate, betas, epsilon and weight decay), break the schedule (its length) or fail (another optimizer)
SCHEDULE_SETTINGS = ("learning_rate", "lr_scheduler_type", "warmup_ratio", "weight_decay")
SCHEDULE_TRAINER_OPTIONS = (
    "warmup_steps", "lr_scheduler_kwargs", "adam_beta1", "adam_beta2", "adam_epsilon", "optim_args",
    "optim_target_modules",
)  # fmt: skip
# what fixes the run's length: max_steps, or num_train_epochs where max_steps is -1 (the Trainer ignores the
# epochs otherwise); free to change on a schedule that does not depend on it (`_length`)
RUN_LENGTH = ("max_steps", "num_train_epochs")


def check_checkpoint(checkpoint: Path, config: TrainConfig, source: ModelSource, optim: str) -> None:
    """`checkpoint` is a whole checkpoint-N of a run on `source` (the model directory `config.model`
    names), resumed with the settings that fix its data order and steps, and with the optimizer `optim`
    (what `config.optim` resolves to) that saved its state.

    Raises:
        UserError: not a checkpoint, a missing or corrupt file, an adapter of another shape, or a run on
            another model or with other batches, data, seed or optimizer settings.
    """
    model = config.model
    if not checkpoint.exists() and not checkpoint.is_absolute():  # `checkpoint-5`, meaning output_dir's
        beside = config.output_dir / checkpoint
        named = f"resume_from_checkpoint={beside}, or " if beside.is_dir() else ""
        raise UserError(
            f"resume_from_checkpoint {checkpoint} does not exist (a relative path is relative to the working "
            f"directory, {Path.cwd()}); write {named}resume_from_checkpoint=true for output_dir's newest"
        )
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
    _check_saved_for_resuming(checkpoint)
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
    _check_same_run(checkpoint, config, source, optim)


def warn_unresumable(arguments: TrainingArguments) -> None:
    """save_only_model saves checkpoints that a resume refuses (`_check_saved_for_resuming`): told as the
    run starts, not after a kill."""
    if arguments.save_only_model and arguments.save_strategy != "no":
        log.warning(
            "save_only_model=true: checkpoints hold the adapter but not the optimizer, scheduler and random "
            "states, so this run cannot be resumed from them; leave save_only_model out to keep that possible"
        )


def _check_saved_for_resuming(checkpoint: Path) -> None:
    """A whole checkpoint (its trainer state is written last) without the optimizer's and the scheduler's
    state is one saved with save_only_model: every checkpoint of its run is, so none is named as the fix."""
    if any((checkpoint / name).is_file() for name in RESUMED_FILES) or not has_adapter(checkpoint):
        return
    marker_path = checkpoint.parent / RUN_MARKER
    marker = (
        read_json(marker_path, "resume from a checkpoint of an intact run") if marker_path.is_file() else {}
    )
    recorded = ((marker.get("config") or {}).get("trainer") or {}).get("save_only_model")
    how = "its run was saved with save_only_model=true" if recorded else "as save_only_model=true saves them"
    raise UserError(
        f"resume_from_checkpoint {checkpoint} holds the adapter but not the optimizer, scheduler and random "
        f"states that a resume continues ({how}), so no checkpoint of the run can be resumed; start the run "
        "again without save_only_model (overwrite_output_dir=true)"
    )


def _check_same_run(checkpoint: Path, config: TrainConfig, source: ModelSource, optim: str) -> None:
    """The run the checkpoint belongs to (its qpissa_run.json, when it is still beside it) trained the
    same conversion (a copy of it is the same) with the same batches, data, seed and optimizer: anything
    else would not continue it exactly."""
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
    changed = _changed(_continued(marker["config"]), _continued(to_dict(config)))
    if changed:
        raise UserError(
            f"resume_from_checkpoint {checkpoint} continues a run with {', '.join(changed)}, which this "
            "config changes; resume with the run's settings (its qpissa_run.json), or start a new run"
        )
    recorded = (marker.get("runtime") or {}).get("optim", marker["config"].get("optim"))
    changed = _changed(_schedule(marker["config"], recorded), _schedule(to_dict(config), optim))
    if changed:
        raise UserError(
            f"resume_from_checkpoint {checkpoint} continues a run with {', '.join(changed)}, which this "
            "config changes, but the checkpoint's optimizer and learning-rate schedule go on as they were "
            "saved; resume with the run's values, or start a new run"
        )
    length = _length(marker["config"])  # the run's, as it had it: epochs only where they counted
    changed = [
        change for change in _changed(length, _length(to_dict(config))) if change.split("=")[0] in length
    ]
    if changed:
        raise UserError(
            f"resume_from_checkpoint {checkpoint} continues a run with {', '.join(changed)}, which this "
            f"config changes, but its learning-rate schedule ({config.lr_scheduler_type}, or a warmup given "
            "as a ratio) is laid over the run's length: every step left would get another learning rate; "
            "resume with the run's length, or start a new run (a constant schedule may resume longer)"
        )


def _changed(before: dict, now: dict) -> list[str]:
    """`key=value` as the run had it for every setting that differs now (None: the run had none)."""
    keys = [*before, *(key for key in now if key not in before)]
    return [f"{key}={before.get(key)!r}" for key in keys if now.get(key) != before.get(key)]


def _continued(config: dict) -> dict:
    """A run's settings that fix the batches it replays, by the keys overrides name them with
    (`data.max_seq_len`, `data.sources.1.samples`); a key the run's record lacks has its default."""
    defaults = {field.name: field.default for field in dataclasses.fields(DataConfig)}
    data = _trained_on({**defaults, **config.get("data", {})})
    if data["sources"] is not None:
        del data["format"]
        data["sources"] = [_trained_on(source) for source in data["sources"]]
    trainer = config.get("trainer") or {}
    given = checked_options({key: trainer[key] for key in CONTINUED_TRAINER_OPTIONS if key in trainer})
    settings = {key: config.get(key) for key in CONTINUED_SETTINGS}
    settings |= {key: given.get(key, _trainer_default(key)) for key in CONTINUED_TRAINER_OPTIONS}
    if settings["data_seed"] is None:  # the seed: qpissa's default
        settings["data_seed"] = config.get("seed")
    return settings | _flat("data", data)


def _trained_on(data: dict) -> dict:
    """Data settings without those that do not change what is trained on (`NOT_TRAINED_ON`)."""
    return {key: value for key, value in data.items() if key not in NOT_TRAINED_ON}


def _flat(name: str, value: Any) -> dict[str, Any]:
    """Nested settings one per key, as overrides name them: `data.sources.1.samples`."""
    if isinstance(value, dict | list):
        parts = value.items() if isinstance(value, dict) else enumerate(value)
        return {key: inner for part, item in parts for key, inner in _flat(f"{name}.{part}", item).items()}
    return {name: value}


def _schedule(config: dict, optim: str | None) -> dict:
    """A run's settings that fix its optimizer's updates and its learning rate at every step (but its
    length, `_length`); a Trainer option left out has the Trainer's default."""
    trainer = config.get("trainer") or {}
    # typed as training types them (YAML 1.1 reads `1e-6` as text): compared however they were written
    given = checked_options({key: trainer[key] for key in SCHEDULE_TRAINER_OPTIONS if key in trainer})
    settings = {"optim": optim} | {key: config.get(key) for key in SCHEDULE_SETTINGS}
    return settings | {key: given.get(key, _trainer_default(key)) for key in SCHEDULE_TRAINER_OPTIONS}


def _length(config: dict) -> dict:
    """What decides a run's length, where its learning-rate schedule depends on it (a decaying schedule, or
    a warmup given as a ratio of the run): max_steps, and num_train_epochs only where max_steps is -1 (the
    Trainer ignores the epochs otherwise); nothing on a schedule that is the same at any length."""
    trainer = config.get("trainer") or {}
    given = checked_options({"warmup_steps": trainer["warmup_steps"]} if "warmup_steps" in trainer else {})
    schedule = config.get("lr_scheduler_type")
    # as `training_arguments` passes it: a warmup below 1 is a ratio of the run, so it ends at another step
    # when the run's length changes (the learning rate would drop, then warm up again)
    warmup = given.get("warmup_steps", config.get("warmup_ratio") or 0)
    if schedule == "constant" or (schedule == "constant_with_warmup" and not 0 < warmup < 1):
        return {}
    steps = config.get("max_steps", -1)
    return {"max_steps": steps} if steps > 0 else {key: config.get(key) for key in RUN_LENGTH}


def _trainer_default(key: str) -> Any:
    """TrainingArguments' default of option `key`."""
    from transformers import TrainingArguments

    return next(field.default for field in dataclasses.fields(TrainingArguments) if field.name == key)


def data_fingerprint(rows: datasets.Dataset) -> str:
    """A hash of the tokenized training samples in their order: recorded with the run, it tells a resume
    whether the data it names still holds what the run trained on, wherever it lies now."""
    import numpy as np
    import pyarrow.compute as pc

    digest = hashlib.sha256()
    for batch in rows.with_format("arrow").iter(batch_size=4096):
        for name in sorted(batch.column_names):  # input_ids, labels: lists of token ids
            column = batch.column(name)
            digest.update(pc.list_value_length(column).to_numpy().astype(np.int64).tobytes())
            digest.update(pc.list_flatten(column).to_numpy().astype(np.int64).tobytes())
    return digest.hexdigest()


def check_same_samples(checkpoint: Path, fingerprint: str) -> None:
    """The resumed run's data tokenizes to the samples the checkpoint's run trained on (`data_fingerprint`;
    a run recorded before the fingerprint was kept is not checked).

    Raises:
        UserError: other samples: another file or other contents at a data path, another chat_template, or
            a run an earlier qpissa tokenized otherwise (`TOKENIZATION_VERSION`).
    """
    marker_path = checkpoint.parent / RUN_MARKER
    if not marker_path.is_file():
        return
    marker = read_json(marker_path, "resume from a checkpoint of an intact run")
    recorded = marker.get(DATA_FINGERPRINT)
    if recorded is not None and recorded != fingerprint and marker.get(TOKENIZATION) != TOKENIZATION_VERSION:
        raise UserError(
            f"resume_from_checkpoint {checkpoint} continues a run whose samples an earlier qpissa tokenized "
            "otherwise (an end-of-turn the data writes trained twice, empty texts and turns of weight 0 "
            "trained; before that, each segment alone), or whose data changed since; start a new run (or "
            "resume it with the qpissa that started it)"
        )
    if recorded is not None and recorded != fingerprint:
        raise UserError(
            f"resume_from_checkpoint {checkpoint} continues a run on other training samples: what the "
            "config's data paths hold now (or its chat_template) tokenizes to other samples than the run "
            "trained on; resume with the run's data, or start a new run"
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
