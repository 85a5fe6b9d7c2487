"""`qpissa train`'s refusals before anything is loaded or written: the model, the data paths, the
checkpoint to resume, what output_dir holds, and (once tokenized) whether the data fills one batch."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from qpissa import UserError
from qpissa.artifacts import (
    ADAPTER_DIR,
    CHECKPOINT_PREFIX,
    CONFIG_NAME,
    EVAL_LOG_NAME,
    EVAL_RESULTS_NAME,
    LOG_NAME,
    REPORT_NAME,
    RUN_MARKER,
    RUN_MARKERS,
    ModelSource,
    checkpoints,
    has_adapter,
    is_qpissa_dir,
    latest_checkpoint,
)
from qpissa.chat_template import TEMPLATE_NAME
from qpissa.hub import is_hub_name, resolve_model
from qpissa.loading import check_causal_lm, check_context, check_source
from qpissa.outputs import check_apart, check_holds_only, check_replaceable
from qpissa.recipe import TrainConfig
from qpissa.resume_checks import check_checkpoint
from qpissa.run_marker import run_model

if TYPE_CHECKING:
    from transformers import TrainingArguments

# what a run writes into output_dir: overwrite_output_dir replaces a run holding nothing else. A `.tmp` is a
# write cut short; `runs/` the Trainer's default TensorBoard logging_dir; with push_to_hub the Trainer copies
# the last checkpoint's adapter and arguments to the top (`last-checkpoint/` with hub_strategy=checkpoint)
RUN_FILES = (
    *(f"{name}{cut}" for name in (RUN_MARKER, LOG_NAME, EVAL_LOG_NAME, EVAL_RESULTS_NAME)
      for cut in ("", ".tmp")),
    TEMPLATE_NAME, f"{ADAPTER_DIR}/", f"{ADAPTER_DIR}.partial/", f"{CHECKPOINT_PREFIX}*/", "runs/",
    "adapter_config.json", "adapter_model.*", "training_args.bin", "last-checkpoint/",
)  # fmt: skip


def check_inputs(config: TrainConfig, optim: str) -> tuple[ModelSource, Path | None]:
    """Validate model, data paths, checkpoint (saved by the optimizer `optim`, what `config.optim` resolves
    to) and where output_dir lies, reading only."""
    model_dir = resolve_model(config.model, "model").resolve()
    if not model_dir.exists():
        raise UserError(
            f"model {config.model} does not exist; set model= to a QPiSSA directory made by `qpissa convert`"
        )
    if (model_dir / RUN_MARKER).is_file():  # a run where its conversion belongs: convert cannot read it
        raise UserError(
            f"model {config.model} is a training run, not a QPiSSA directory; set model= to the one it "
            f"trained, {run_model(model_dir)} (resume_from_checkpoint continues the run itself)"
        )
    if not (model_dir / CONFIG_NAME).is_file():
        raise UserError(
            f"model {config.model} is not a QPiSSA directory nor a model (no {CONFIG_NAME}); set model= to "
            "a directory made by `qpissa convert`"
        )
    if not is_qpissa_dir(model_dir) or not has_adapter(model_dir / ADAPTER_DIR):
        raise UserError(
            f"model {config.model} is not a QPiSSA directory (no {REPORT_NAME} and adapter/); "
            f"make one with `qpissa convert {config.model} NEW_DIR` and set model=NEW_DIR"
        )
    source = ModelSource(model_dir, model_dir / ADAPTER_DIR)
    check_source(source)
    check_causal_lm(model_dir)
    check_context(model_dir, config.data.max_seq_len, "`data.max_seq_len`")
    inputs = config.data_inputs()
    for key, path in inputs.items():
        if key.startswith("data.") and path is not None and not path.exists() and not is_hub_name(path):
            raise UserError(
                f"dataset {path} does not exist; check {key} (a relative path is relative to the working "
                f"directory, {Path.cwd()})"
            )
    check_apart(config.output_dir, "output_dir", {"model": config.model, **inputs})
    resume = config.resume_from_checkpoint
    if resume is not None:
        check_checkpoint(resume, config, source, optim)
    return source, resume


def check_output_dir(config: TrainConfig, resume: Path | None) -> None:
    """What is in output_dir may be replaced or continued (checked under its lock)."""
    # a marker whose write was cut short (a full disk) still marks a run of qpissa's
    markers = (*RUN_MARKERS, LOG_NAME)
    if resume is None and config.overwrite_output_dir:
        check_replaceable(config.output_dir, "output_dir", markers, "a training run")
        check_holds_only(config.output_dir, "output_dir", RUN_FILES, "a training run")
    if resume is None and config.output_dir.is_file():
        raise UserError(f"output_dir {config.output_dir} is a file; choose a directory path")
    if resume is None and _is_occupied(config.output_dir) and not config.overwrite_output_dir:
        started = any((config.output_dir / marker).is_file() for marker in RUN_MARKERS)
        checkpoint = latest_checkpoint(config.output_dir)  # complete ones only: a cut write is no checkpoint
        if not any((config.output_dir / marker).is_file() for marker in markers) and not checkpoints(
            config.output_dir
        ):
            raise UserError(
                f"output_dir {config.output_dir} holds files that are not a training run (no {RUN_MARKER}), "
                "which qpissa does not replace; choose a new or empty output_dir"
            )
        if started and checkpoint is None:
            raise UserError(
                f"output_dir {config.output_dir} holds a run that stopped before its first complete "
                "checkpoint; set overwrite_output_dir=true to start it again, or choose a new output_dir"
            )
        resume_hint = (
            f"resume_from_checkpoint={checkpoint}" if checkpoint else "resume_from_checkpoint=<checkpoint-N>"
        )
        raise UserError(
            f"output_dir {config.output_dir} exists; choose a new one, set overwrite_output_dir=true, "
            f"or {resume_hint}"
        )


def _is_occupied(directory: Path) -> bool:
    return directory.is_dir() and any(directory.iterdir())


def check_batches(arguments: TrainingArguments, samples: int) -> None:
    """With dataloader_drop_last, `samples` training samples (tokenized, as the Trainer gets them) fill at
    least one batch on each process: else the Trainer trains 0 steps and exits as done (max_steps > 0) or
    fails with a traceback (max_steps=-1). Called once the data is tokenized, before the model is loaded.

    Raises:
        UserError: too few samples for one batch, naming the batch size that fits.
    """
    batch, processes = arguments.per_device_train_batch_size, arguments.world_size
    if not arguments.dataloader_drop_last or samples >= batch * processes:
        return
    across = f" × {processes} processes" if processes > 1 else ""
    fits = samples // processes
    fix = (
        f"set per_device_train_batch_size={fits} or less (gradient_accumulation_steps keeps the batch), add "
        "training data, or drop dataloader_drop_last"
        if fits
        else "add training data, or drop dataloader_drop_last"
    )
    raise UserError(
        f"the data holds {samples} training sample{'s' if samples != 1 else ''} (as tokenized), fewer than "
        f"one batch (per_device_train_batch_size={batch}{across}), and dataloader_drop_last=true drops an "
        f"incomplete batch, so nothing would be trained; {fix}"
    )
