"""Every transformers `TrainingArguments` option in a recipe, checked by the dataclass itself, and the
arguments qpissa hands the Trainer.

A recipe's own keys (`model`, `data`, ...) and the options whose qpissa defaults differ live in
`TrainConfig`; any other top-level key must be a TrainingArguments field (`TrainConfig.trainer`). Its
type is checked against the field's annotation, then TrainingArguments' own `__post_init__` checks the
values (choices, combinations) before anything is written.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import re
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any

from transformers import TrainingArguments
from transformers.integrations import integration_utils
from transformers.trainer_utils import IntervalStrategy, SaveStrategy
from transformers.training_args import OptimizerNames
from transformers.utils import is_liger_kernel_available

from qpissa import UserError
from qpissa.options import got, is_number, typed_text
from qpissa.recipe import TrainConfig
from qpissa.recipe_keys import spelling_hint
from qpissa.runtime import Runtime

# TrainingArguments fields qpissa sets itself, and why (or what to set instead)
SET_BY_QPISSA = {
    "use_cpu": "set device: cpu instead",
    "fp16": "leave it out: qpissa trains in bf16 on GPUs with it, fp16 on those without, float32 on a CPU",
    "remove_unused_columns": "qpissa's collator needs the labels column",
    "disable_tqdm": "use --quiet",
    "include_num_input_tokens_seen": "tokens/s in trainer_log.jsonl needs it",
    "activation_checkpointing": "set the recipe key gradient_checkpointing (transformers 5 renamed it)",
    "logging_strategy": "qpissa logs each step to trainer_log.jsonl; recipe key logging_steps paces printing",
    "label_names": "qpissa's collator gives the Trainer the labels column (`labels`); leave it out",
}
OWN_VALUES = {"logging_strategy": "steps", "label_names": ["labels"]}  # what qpissa sets: accepted as written
# deprecated TrainingArguments names -> their transformers 5 names, which qpissa passes
RENAMED = {"gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}
# DataLoader options only worker processes use: torch's DataLoader refuses them with no workers
WORKER_OPTIONS = ("dataloader_persistent_workers", "dataloader_prefetch_factor",
                  "dataloader_multiprocessing_context")  # fmt: skip


class _ModelNeeded(Exception):
    """Raised when transformers looks into `_ModelStandIn`: every check that needs no model passed."""


class _ModelStandIn:
    """The model, while transformers looks the optimizer up: GaLore and APOLLO read its modules only after
    checking their package and options, which is all that can be checked before the model is loaded."""

    def __getattr__(self, name: str) -> Any:
        raise _ModelNeeded(name)


def training_arguments(
    config: TrainConfig, runtime: Runtime, run_dir: Path, show_progress: bool
) -> TrainingArguments:
    """The Trainer's arguments: qpissa's choices, then every option the recipe sets.

    Raises:
        UserError: a key that is neither a recipe key nor a TrainingArguments field, one qpissa sets
            itself, a value of the wrong type, or one TrainingArguments rejects (naming it and the fix).
    """
    extra = {RENAMED.get(key, key): value for key, value in checked_options(config.trainer).items()}
    evaluate = config.eval_steps is not None
    values = {
        "output_dir": str(run_dir),
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": config.lr_scheduler_type,
        "warmup_steps": config.warmup_ratio,  # transformers 5 reads a float < 1 as a ratio of all steps
        "weight_decay": config.weight_decay,
        "max_grad_norm": config.max_grad_norm,
        "per_device_train_batch_size": config.per_device_train_batch_size,
        "per_device_eval_batch_size": config.per_device_eval_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "max_steps": config.max_steps,
        "num_train_epochs": config.num_train_epochs,
        "optim": runtime.optim,
        # the recipe keeps transformers 4's name; transformers 5 deprecates it for activation_checkpointing
        "activation_checkpointing": config.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "bf16": runtime.bf16,
        "fp16": runtime.device.type == "cuda" and not runtime.bf16,  # GPUs without bf16: loss scaling
        "use_cpu": runtime.device.type == "cpu",
        "seed": config.seed,
        "data_seed": config.seed,
        "logging_steps": 1,  # every step to trainer_log.jsonl; config.logging_steps paces the printing
        "save_strategy": "steps",
        "save_steps": config.save_steps,
        "save_total_limit": config.save_total_limit,
        "eval_strategy": "steps" if evaluate else "no",
        "eval_steps": config.eval_steps,
        "report_to": "none",
        "disable_tqdm": not show_progress,
        "remove_unused_columns": False,
        # packed rows hold no padding (and no attention mask to count it by): every token counts
        "include_num_input_tokens_seen": "all" if config.data.packing else "non_padding",
        "dataloader_num_workers": 0,
        "ddp_find_unused_parameters": False,  # every adapter matrix takes part in each forward pass
    }
    values.update(extra)
    if values["eval_strategy"] == "steps" and values["eval_steps"] is None:
        best = values.get("load_best_model_at_end")  # best-checkpoint saving needs save_steps'
        values["eval_steps"] = config.save_steps if best else config.logging_steps  # the Trainer's: 1 here
    _check_optimizer(values["optim"])
    _check_dataloader(values)
    _check_compile(values.get("torch_compile_backend"), values.get("torch_compile_mode"))
    if values.get("eval_strategy", "no") != "no" and config.data.eval_path is None:
        raise UserError("eval_strategy is set but data.eval_path is not; add held-out data or drop it")
    _check_best(values)
    _check_forms(values)
    values["report_to"] = _checked_reporters(values["report_to"])
    if values.get("use_liger_kernel") and not is_liger_kernel_available():  # else the Trainer fails later
        raise UserError("use_liger_kernel needs liger-kernel (pip install liger-kernel) and a CUDA GPU")
    try:
        arguments = TrainingArguments(**values)
        _build_optimizer_and_schedule(arguments)
    except (ValueError, TypeError, ImportError) as error:
        reason = " ".join(str(error).split())
        raise UserError(f"a Trainer option is invalid: {reason}; fix it in the recipe or overrides") from None
    return arguments


def _check_best(values: dict[str, Any]) -> None:
    """The best checkpoint (save_strategy=best saves it, load_best_model_at_end loads it) is chosen among the
    Trainer's evaluations, of the held-out loss only: else the Trainer fails after training or with a
    traceback, saves nothing, silently, or refuses in its own words."""
    metric, saves_best = values.get("metric_for_best_model"), values["save_strategy"] == SaveStrategy.BEST
    if metric is not None and str(metric).removeprefix("eval_") != "loss":
        raise UserError(
            f"metric_for_best_model={metric}: the Trainer's evaluations measure only the held-out loss "
            "(eval_loss; the exact match logged beside it scores a few generated answers and cannot choose "
            "checkpoints); set metric_for_best_model=loss or leave it out"
        )
    if saves_best and metric is None:
        raise UserError(
            "save_strategy=best needs metric_for_best_model=loss (the held-out loss, which the Trainer's "
            "evaluations measure); set it, or use save_strategy=steps"
        )
    if values["eval_strategy"] == IntervalStrategy.NO and (
        saves_best or values.get("load_best_model_at_end")
    ):
        what = "save_strategy=best saves" if saves_best else "load_best_model_at_end loads"
        raise UserError(
            f"{what} the checkpoint of the lowest held-out loss among the Trainer's evaluations, but the run "
            "evaluates nothing; set eval_steps (with data.eval_path: held-out data), or leave "
            f"{what.split()[0]} out"
        )


def _check_forms(values: dict[str, Any]) -> None:
    """Options that transformers refuses in its own words (a scheduler's TypeError, an unpacking error, a
    missing package), told as the recipe writes them."""
    if values.get("deepspeed"):
        raise UserError(
            "deepspeed: qpissa does not train with DeepSpeed; leave it out, and where the 4-bit weights do "
            "not fit one GPU use FSDP (configs/accelerate/fsdp_qlora.yaml; README: More than one GPU)"
        )
    kwargs = values.get("lr_scheduler_kwargs")
    if isinstance(kwargs, str) and not kwargs.lstrip().startswith("{"):  # transformers reads `{...}` as JSON
        mapping = ", ".join(part.strip().replace("=", ": ", 1) for part in kwargs.split(","))
        raise UserError(
            f"lr_scheduler_kwargs={kwargs} is not a mapping; write lr_scheduler_kwargs={{{mapping}}}"
        )
    optim_args = values.get("optim_args")
    if optim_args and any(part.count("=") != 1 for part in optim_args.replace(" ", "").split(",")):
        raise UserError(
            f"a Trainer option is invalid: optim_args={optim_args} is not of the form key=value,key=value "
            "(split at every comma: a value holds none); AdamW's betas are adam_beta1 and adam_beta2"
        )


def _check_optimizer(name: str) -> None:
    """An optimizer transformers knows; else the closest names and `auto` (TrainingArguments' own error
    lists all 40 names, and not `auto`, which is qpissa's)."""
    known = [option.value for option in OptimizerNames]
    if name in known:
        return
    close = [option for option in known if option.startswith(name)][:3]
    close = close or difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? Otherwise " if close else ""
    raise UserError(
        f"optim={name} is not an optimizer transformers knows; {hint}use auto (adamw_torch on a CPU, "
        "paged_adamw_8bit on a GPU) or another name of transformers' OptimizerNames"
    )


def _check_dataloader(values: dict[str, Any]) -> None:
    """torch's DataLoader refuses worker options without workers, but only as the Trainer starts training,
    after the run directory is written."""
    workers = values["dataloader_num_workers"]
    if workers < 0:
        raise UserError(f"dataloader_num_workers={workers}: use 0 (load in the main process) or more")
    given = [key for key in WORKER_OPTIONS if values.get(key) not in (None, False)]
    if workers == 0 and given:
        raise UserError(
            f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} worker processes, but "
            "dataloader_num_workers is 0; set dataloader_num_workers=2 (or more), or leave "
            f"{'it' if len(given) == 1 else 'them'} out"
        )


def _check_compile(backend: str | None, mode: str | None) -> None:
    """accelerate reads the backend, and torch.compile inductor's mode, only once the Trainer is built:
    after the model is loaded, with a traceback."""
    from accelerate.utils import DynamoBackend

    if backend is not None and backend.upper() not in DynamoBackend.__members__:
        names = ", ".join(member.value.lower() for member in DynamoBackend if member != DynamoBackend.NO)
        raise UserError(
            f"torch_compile_backend={backend} is not a backend accelerate knows; use one of {names}"
        )
    if mode is not None and (backend or "inductor").lower() == "inductor":
        from torch._inductor import list_mode_options

        modes = list(dict.fromkeys(["default", *list_mode_options()]))  # which lists default too
        if mode not in modes:
            raise UserError(
                f"torch_compile_mode={mode} is not a mode of torch.compile's inductor backend; use one of "
                f"{', '.join(modes)}, or leave it out"
            )


def _build_optimizer_and_schedule(arguments: TrainingArguments) -> None:
    """Build the optimizer and the schedule the Trainer will build, on a stand-in parameter: their own
    checks (package installed, betas, epsilon, `optim_args`, `lr_scheduler_kwargs`) then fail before
    anything is written, not after the model is loaded. Optimizers built from the model's own modules
    (GaLore, APOLLO, LOMO) are checked up to the model, then stand in as SGD."""
    import torch
    from transformers import get_scheduler

    parameters = [torch.nn.Parameter(torch.zeros(1))]
    found = _optimizer_class(arguments)
    if found is None:
        optimizer = torch.optim.SGD(parameters, lr=arguments.learning_rate)
    else:
        optimizer_class, optimizer_kwargs = found
        optimizer = optimizer_class(parameters, **optimizer_kwargs)
    get_scheduler(
        arguments.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=2,
        scheduler_specific_kwargs=arguments.lr_scheduler_kwargs,
    )  # fmt: skip


def _optimizer_class(arguments: TrainingArguments) -> tuple[Any, dict[str, Any]] | None:
    """The optimizer class and keyword arguments the Trainer will use, asked of transformers itself; None
    for one built from the model (which `_ModelStandIn` stands for).

    Raises:
        UserError: the optimizer's package is not installed (wrong options raise as the Trainer raises).
    """
    from transformers import Trainer

    model = _ModelStandIn()
    try:
        optimizer_class, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(arguments, model)
    except _ModelNeeded:
        return None
    except (ImportError, ValueError) as error:  # the optimizer's package; other errors are the options'
        reason = " ".join(str(error).split())
        # transformers raises ValueError for a few missing packages (grokadamw, torchdistx, torch_xla, npu)
        if isinstance(error, ValueError) and not re.search(r"\binstall\b|failed to import", reason, re.I):
            raise
        raise UserError(
            f"optim={arguments.optim.value} cannot be used: {reason}; fix that, or choose another optim "
            "(auto: adamw_torch on a CPU, paged_adamw_8bit on a GPU)"
        ) from None
    if any(value is model for value in optimizer_kwargs.values()):  # LOMO takes the model itself
        return None
    return optimizer_class, optimizer_kwargs


def _trainer_fields() -> set[str]:
    """Names of the TrainingArguments fields a recipe may set."""
    return {field.name for field in dataclasses.fields(TrainingArguments) if field.init}


def checked_options(options: dict[str, Any]) -> dict[str, Any]:
    """The recipe's TrainingArguments options with their types checked (every problem at once): called
    before the data is read too, so that a mistyped key is told before a data path's problem."""
    known = _trainer_fields()
    hints = typing.get_type_hints(TrainingArguments)
    problems, values = [], {}
    for key, value in options.items():
        if key in SET_BY_QPISSA and not (key in OWN_VALUES and value == OWN_VALUES[key]):
            problems.append(f"`{key}` is set by qpissa: {SET_BY_QPISSA[key]}")
        elif key not in known:
            problems.append(
                f"unknown setting `{key}`: neither a recipe key nor an option of this transformers "
                f"version's TrainingArguments; {spelling_hint(key, sorted(known))}"
            )
        else:
            try:
                values[key] = _coerce(hints[key], value, key)
            except UserError as error:
                problems.append(str(error))
    if problems:
        raise UserError("; ".join(problems))
    return values


def _coerce(hint: Any, value: Any, key: str) -> Any:
    """`value` as a value of the field's annotation (`float | None`, `str | IntervalStrategy`, ...)."""
    allowed = _types(hint)
    if value is None and type(None) in allowed:
        return None
    textual = str in allowed or any(_is_enum(kind) for kind in allowed)
    if isinstance(value, bool):
        if bool in allowed:
            return value
        if value is False and textual:
            return "no"  # YAML 1.1 reads `save_strategy: no` as false
    elif isinstance(value, int) and int in allowed:
        return value
    elif isinstance(value, (int, float)) and float in allowed:
        return float(value)
    elif isinstance(value, str) and float in allowed and is_number(value):
        return float(value)  # YAML 1.1 reads `2e-5` (no dot) as text
    elif isinstance(value, str) and textual:
        return value  # TrainingArguments turns choices into its enums and rejects unknown ones
    elif isinstance(value, (int, float, datetime.date)) and str in allowed:
        return typed_text(value)  # YAML reads `run_name: 2024` as a number: the text typed is meant
    elif isinstance(value, (list, dict)) and type(value) in allowed:
        return value
    elif any(isinstance(kind, type) and isinstance(value, kind) for kind in allowed):
        return value  # an object given through the Python API (a ParallelismConfig, ...)
    names = " or ".join(sorted({getattr(kind, "__name__", str(kind)) for kind in allowed} - {"NoneType"}))
    raise UserError(f"`{key}` must be {names}, {got(value)}")


def _types(hint: Any) -> set[Any]:
    """The plain types an annotation admits: `dict[str, Any] | str | None` -> {dict, str, NoneType}."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return set().union(*(_types(arg) for arg in typing.get_args(hint)))
    if typing.get_origin(hint) is typing.Literal:
        return {type(arg) for arg in typing.get_args(hint)}
    return {typing.get_origin(hint) or hint}


def _is_enum(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, Enum)


def _checked_reporters(report_to: Any) -> Any:
    """`report_to` as the Trainer takes it (`a,b` as a list, as users type it; YAML's null as none), each
    integration known and installed, none and all alone: the Trainer would fail only after setup, with a
    traceback."""
    if report_to is None:
        return "none"
    if isinstance(report_to, str) and "," in report_to:
        report_to = [name.strip() for name in report_to.split(",") if name.strip()]
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    alone = [name for name in ("none", "all") if name in names]
    if alone and len(names) > 1:
        raise UserError(
            f"report_to {','.join(map(str, names))}: {alone[0]} stands alone; write report_to={alone[0]}, "
            "or list only the integrations to report to"
        )
    for name in names:
        if name in ("none", "all"):
            continue
        if name not in integration_utils.INTEGRATION_TO_CALLBACK:
            known = ", ".join(sorted(integration_utils.INTEGRATION_TO_CALLBACK))
            raise UserError(f"report_to {name}: not an integration transformers knows; use one of {known}")
        available = getattr(integration_utils, f"is_{name}_available", None)
        if available is not None and not available():
            raise UserError(f"report_to {name}: the {name} package is not installed; pip install {name}")
    return report_to
