"""Fine-tune the adapter of a QPiSSA directory with transformers' Trainer; the NF4 residual stays frozen.

QLoRA, LoftQ and QPiSSA conversions go through this same path, so runs with one config differ only in
the conversion (DESIGN.md principle 4). Every step is appended to `RUN/trainer_log.jsonl`.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any

import torch

from qpissa import UserError
from qpissa.checkpoint import write_json
from qpissa.config import from_dict, to_dict
from qpissa.convert import ADAPTER_DIR, REPORT_NAME, Device
from qpissa.data import DataConfig, Sample, TokenizedData, check_tokenizer, collate, load_split, pad_token_id
from qpissa.loading import RUN_MARKER, ModelSource, load_model, load_tokenizer
from qpissa.outputs import check_apart, check_replaceable

log = logging.getLogger(__name__)

LOG_NAME = "trainer_log.jsonl"
EVAL_LOG_NAME = "eval_log.jsonl"
PISSA_MAX_LR = 1e-4  # the paper trains at 2e-5; users report PiSSA diverging at 2e-4 (REFERENCE.md §5)


class Optimizer(str, Enum):
    """Optimizers by their transformers `optim` names; `auto` is paged 8-bit AdamW on CUDA, AdamW on CPU."""

    AUTO = "auto"
    ADAMW_TORCH = "adamw_torch"
    ADAMW_8BIT = "adamw_bnb_8bit"
    PAGED_ADAMW_8BIT = "paged_adamw_8bit"
    PAGED_ADAMW_32BIT = "paged_adamw_32bit"


class Scheduler(str, Enum):
    """Learning-rate schedules by their transformers names."""

    COSINE = "cosine"
    LINEAR = "linear"
    CONSTANT = "constant"
    CONSTANT_WITH_WARMUP = "constant_with_warmup"


@dataclass
class TrainConfig:
    """A training run; names follow transformers' TrainingArguments where one exists."""

    model: Path | None = field(
        default=None, metadata={"help": "QPiSSA directory written by `qpissa convert`"}
    )
    output_dir: Path | None = field(
        default=None, metadata={"help": "run directory (checkpoints, logs, adapter/)"}
    )
    data: DataConfig | None = field(
        default=None, metadata={"help": "training data (path, format, max_seq_len, ...)"}
    )
    learning_rate: float = field(default=2e-5, metadata={"help": "peak learning rate (PiSSA wants ≤ 1e-4)"})
    lr_scheduler_type: Scheduler = field(
        default=Scheduler.COSINE, metadata={"help": "learning-rate schedule"}
    )
    warmup_ratio: float = field(default=0.03, metadata={"help": "fraction of steps with linear warmup"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping norm"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "samples per micro-batch"})
    per_device_eval_batch_size: int = field(default=8, metadata={"help": "samples per evaluation batch"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1 uses num_train_epochs"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs when max_steps is -1"})
    optim: Optimizer = field(default=Optimizer.AUTO, metadata={"help": "optimizer"})
    gradient_checkpointing: bool = field(default=True, metadata={"help": "recompute activations in backward"})
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 compute; default: on CUDA when supported"}
    )
    device: Device = field(default=Device.AUTO, metadata={"help": "auto, cpu or cuda"})
    seed: int = field(default=42, metadata={"help": "seed of data order and all other randomness"})
    logging_steps: int = field(
        default=10, metadata={"help": "print a log line every N steps (the JSONL gets every step)"}
    )
    save_steps: int = field(default=100, metadata={"help": "write output_dir/checkpoint-N every N steps"})
    save_total_limit: int | None = field(default=2, metadata={"help": "keep the last K checkpoints"})
    eval_steps: int | None = field(
        default=None, metadata={"help": "evaluate every N steps (needs data.eval_path)"}
    )
    resume_from_checkpoint: Path | None = field(
        default=None, metadata={"help": "checkpoint-N directory to resume"}
    )
    overwrite_output_dir: bool = field(default=False, metadata={"help": "replace an existing output_dir"})

    def __post_init__(self) -> None:
        missing = [name for name in ("model", "output_dir", "data") if getattr(self, name) is None]
        if missing:
            raise UserError(f"the config needs {', '.join(f'`{m}`' for m in missing)}; see configs/demo.yaml")
        positive = (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "save_steps",
        )
        problems = [f"`{name}` must be at least 1" for name in positive if getattr(self, name) < 1]
        if not 0 <= self.warmup_ratio < 1:
            problems.append(f"`warmup_ratio` must be in [0, 1), got {self.warmup_ratio}")
        if self.learning_rate <= 0:
            problems.append(f"`learning_rate` must be positive, got {self.learning_rate}")
        if self.max_steps == 0 or self.max_steps < -1:
            problems.append(f"`max_steps` must be -1 or positive, got {self.max_steps}")
        if self.eval_steps is not None and self.data.eval_path is None:
            problems.append(
                "`eval_steps` is set but `data.eval_path` is not; add held-out data or drop eval_steps"
            )
        if problems:
            raise UserError("; ".join(problems))


@dataclass
class Runtime:
    """Settings resolved against the hardware."""

    device: torch.device
    dtype: torch.dtype  # compute dtype of activations and 16-bit weights
    bf16: bool
    optim: str  # transformers optimizer name


def load_config(path: Path, overrides: list[str]) -> TrainConfig:
    """Read a YAML recipe, apply `key=value` overrides and validate it.

    Raises:
        UserError: missing/unparseable file, unknown keys, wrong types, bad combinations.
    """
    import yaml

    from qpissa.config import apply_overrides

    if not path.is_file():
        raise UserError(f"config {path} does not exist; see configs/demo.yaml for an example")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config {path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise UserError(f"config {path} must be a mapping of settings, not {type(values).__name__}")
    return from_dict(TrainConfig, apply_overrides(values, overrides))


def resolve_runtime(
    device_choice: Device = Device.AUTO, bf16: bool | None = None, optim: Optimizer = Optimizer.AUTO
) -> Runtime:
    """Pick device, compute dtype and optimizer; float32 on CPU, where bf16 matmuls are ~100x slower.

    Raises:
        UserError: CUDA asked for but absent, or a CUDA-only option (bf16, paged optimizer) on CPU.
    """
    cuda = torch.cuda.is_available()
    if device_choice is Device.CUDA and not cuda:
        raise UserError("device is cuda but no CUDA GPU is visible; set device=cpu or device=auto")
    device = torch.device("cuda" if device_choice is not Device.CPU and cuda else "cpu")
    if device.type == "cpu":
        if bf16:
            raise UserError(
                "bf16=true needs a CUDA GPU (on CPU bf16 matmuls are ~100x slower); drop bf16 or set it false"
            )
        if optim.value.startswith("paged_"):
            raise UserError(f"optim={optim.value} pages to a GPU and needs CUDA; use adamw_torch on CPU")
        chosen = Optimizer.ADAMW_TORCH if optim is Optimizer.AUTO else optim
        return Runtime(device, torch.float32, False, chosen.value)
    use_bf16 = torch.cuda.is_bf16_supported() if bf16 is None else bf16
    chosen = Optimizer.PAGED_ADAMW_8BIT if optim is Optimizer.AUTO else optim
    return Runtime(device, torch.bfloat16 if use_bf16 else torch.float16, use_bf16, chosen.value)


def train(config: TrainConfig, show_progress: bool = True) -> dict[str, Any]:
    """Train the adapter of `config.model` on `config.data`; write the run directory.

    Args:
        config: the validated recipe.
        show_progress: tqdm bar on stderr.

    Returns:
        Summary: output_dir, steps, train_loss (mean), dropped samples, trainable_params, eval (if eval data).

    Raises:
        UserError: any input problem, detected before anything is written.
    """
    from transformers import Trainer

    from qpissa.evaluate import evaluate_loss, exact_match
    from qpissa.trainlog import JsonlLogCallback, QuietProgressCallback, estimate_memory, truncate_log

    source, resume = _check_inputs(config)
    runtime = resolve_runtime(config.device, config.bf16, config.optim)
    tokenizer = load_tokenizer(source)
    check_tokenizer(tokenizer, config.data.format)
    _, train_data = load_split(config.data.path, config.data, tokenizer)
    eval_samples, eval_data = _load_eval(config, tokenizer)
    _warn_learning_rate(config, source)

    run_dir = _prepare_run_dir(config, runtime, source, resume)
    model = load_model(source, trainable=True, device=runtime.device, compute_dtype=runtime.dtype)
    _adapter_to_float32(model)
    memory = estimate_memory(model, config, runtime)
    _log_setup(memory, train_data)

    pad_id = pad_token_id(tokenizer)
    if resume is None:
        _log_initial_loss(
            model, train_data.rows[: config.per_device_train_batch_size], pad_id, runtime, run_dir
        )
    else:
        truncate_log(run_dir / LOG_NAME, _checkpoint_step(resume))

    generate = partial(
        exact_match,
        tokenizer=tokenizer,
        samples=eval_samples[: config.data.eval_generate_samples],
        batch_size=config.per_device_eval_batch_size,
        device=runtime.device,
    )
    callback = JsonlLogCallback(
        run_dir / LOG_NAME,
        run_dir / EVAL_LOG_NAME,
        runtime.device,
        generate if eval_samples and config.data.eval_generate_samples else None,
        every=config.logging_steps,
    )
    trainer = Trainer(
        model=model,
        args=_training_arguments(config, runtime, run_dir, show_progress),
        train_dataset=train_data.rows,
        eval_dataset=eval_data.rows if eval_data else None,
        data_collator=partial(collate, pad_token_id=pad_id),
        callbacks=[callback],
    )
    _quiet_progress(trainer, QuietProgressCallback)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    _save_adapter(model, run_dir)
    summary = {
        "dropped": train_data.dropped,
        "output_dir": str(run_dir),
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "trainable_params": memory["trainable_params"],
    }
    if eval_data:
        final = evaluate_loss(
            model, eval_data.rows, pad_id, runtime.device, config.per_device_eval_batch_size
        )
        summary["eval"] = {**final, **(generate(model) if config.data.eval_generate_samples else {})}
        write_json(run_dir / "eval_results.json", summary["eval"])
    return summary


def _log_setup(memory: dict[str, Any], train_data: TokenizedData) -> None:
    """Parameter counts and the memory estimate, before step 1."""
    parts = ", ".join(f"{name} {mb:.0f}" for name, mb in memory["parts_mb"].items())
    log.info(
        "parameters: %s trainable (adapter, fp32), %s frozen; estimated peak memory %.0f MB (%s)",
        f"{memory['trainable_params']:,}", f"{memory['frozen_params']:,}", memory["total_mb"], parts,
    )  # fmt: skip
    log.info(
        "%d training samples (%d dropped: response beyond max_seq_len)",
        len(train_data.rows),
        train_data.dropped,
    )


def _log_initial_loss(
    model: torch.nn.Module, rows: list[dict[str, list[int]]], pad_id: int, runtime: Runtime, run_dir: Path
) -> None:
    """Log the loss of the initialized model on the first training batch as step 0 (a fresh log)."""
    from qpissa.evaluate import evaluate_loss
    from qpissa.trainlog import append_jsonl, peak_memory_mb, truncate_log

    truncate_log(run_dir / LOG_NAME, 0)
    loss = evaluate_loss(model, rows, pad_id, runtime.device)["loss"]
    entry = {
        "elapsed": 0.0,
        "eta": None,
        "grad_norm": None,
        "learning_rate": 0.0,
        "loss": loss,
        "peak_memory_mb": peak_memory_mb(runtime.device),
        "step": 0,
        "tokens_per_second": None,
    }
    append_jsonl(run_dir / LOG_NAME, entry)
    log.info("step 0 loss %.4f (the initialized model; QPiSSA's matches the original model's)", loss)


def _check_inputs(config: TrainConfig) -> tuple[ModelSource, Path | None]:
    """Validate model, data paths, output_dir and checkpoint before anything is written."""
    model_dir = config.model.resolve()
    if (
        not (model_dir / REPORT_NAME).is_file()
        or not (model_dir / ADAPTER_DIR / "adapter_config.json").is_file()
    ):
        raise UserError(
            f"model {config.model} is not a QPiSSA directory (no {REPORT_NAME} and adapter/); "
            f"make one with `qpissa convert {config.model} NEW_DIR` and set model=NEW_DIR"
        )
    for path in (config.data.path, config.data.eval_path):
        if path is not None and not path.exists():
            raise UserError(f"dataset {path} does not exist; check data.path / data.eval_path")
    check_apart(
        config.output_dir,
        "output_dir",
        {"model": config.model, "data.path": config.data.path, "data.eval_path": config.data.eval_path},
    )
    resume = config.resume_from_checkpoint
    if resume is None and config.overwrite_output_dir:
        check_replaceable(config.output_dir, "output_dir", (RUN_MARKER, LOG_NAME), "a training run")
    if resume is not None:
        if not (resume / "trainer_state.json").is_file():
            raise UserError(f"resume_from_checkpoint {resume} is not a checkpoint-N directory of a run")
    elif config.output_dir.exists() and any(config.output_dir.iterdir()) and not config.overwrite_output_dir:
        raise UserError(
            f"output_dir {config.output_dir} exists; choose a new one, set overwrite_output_dir=true, "
            "or resume_from_checkpoint=<output_dir>/checkpoint-N"
        )
    source = ModelSource(model_dir, model_dir / ADAPTER_DIR)
    return source, resume


def _load_eval(config: TrainConfig, tokenizer: Any) -> tuple[list[Sample], TokenizedData | None]:
    if config.data.eval_path is None:
        return [], None
    return load_split(config.data.eval_path, config.data, tokenizer)


def _warn_learning_rate(config: TrainConfig, source: ModelSource) -> None:
    method = json.loads((source.base_dir / REPORT_NAME).read_text())["settings"].get("method")
    if method != "qlora" and config.learning_rate > PISSA_MAX_LR:
        log.warning(
            "learning_rate %g is above %g: PiSSA-style inits (%s) tend to diverge there; the paper uses 2e-5",
            config.learning_rate,
            PISSA_MAX_LR,
            method,
        )


def _prepare_run_dir(config: TrainConfig, runtime: Runtime, source: ModelSource, resume: Path | None) -> Path:
    """Create output_dir and write the run marker that `resolve_source` reads (with what `auto` became)."""
    run_dir = config.output_dir
    if resume is None and run_dir.exists() and config.overwrite_output_dir:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = {"device": str(runtime.device), "dtype": str(runtime.dtype).removeprefix("torch."),
                "optim": runtime.optim}  # fmt: skip
    marker = {"config": to_dict(config), "model": str(source.base_dir), "runtime": resolved}
    write_json(run_dir / RUN_MARKER, marker)
    return run_dir


def _training_arguments(config: TrainConfig, runtime: Runtime, run_dir: Path, show_progress: bool):
    from transformers import TrainingArguments

    evaluate = config.eval_steps is not None
    # transformers 5 reads a float warmup_steps < 1 as a ratio of the total steps
    return TrainingArguments(
        output_dir=str(run_dir),
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler_type.value,
        warmup_steps=config.warmup_ratio,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_steps=config.max_steps,
        num_train_epochs=config.num_train_epochs,
        optim=runtime.optim,
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=runtime.bf16,
        fp16=runtime.device.type == "cuda" and not runtime.bf16,  # GPUs without bf16: fp16 + loss scaling
        use_cpu=runtime.device.type == "cpu",
        seed=config.seed,
        data_seed=config.seed,
        logging_steps=1,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        eval_strategy="steps" if evaluate else "no",
        eval_steps=config.eval_steps,
        report_to="none",
        disable_tqdm=not (show_progress and sys.stderr.isatty()),
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0,
    )


def _adapter_to_float32(model: torch.nn.Module) -> None:
    """Keep fp32 master weights for the adapter whatever the compute dtype (autocast handles the rest)."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()


def _quiet_progress(trainer: Any, quiet_class: type) -> None:
    """Keep transformers' bar (when shown) but not its printing of every step's log dict."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    if any(isinstance(callback, ProgressCallback) for callback in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(quiet_class())


def _save_adapter(model: Any, run_dir: Path) -> None:
    partial_dir = run_dir / (ADAPTER_DIR + ".partial")
    shutil.rmtree(partial_dir, ignore_errors=True)
    model.save_pretrained(partial_dir)
    shutil.rmtree(run_dir / ADAPTER_DIR, ignore_errors=True)
    partial_dir.rename(run_dir / ADAPTER_DIR)


def _checkpoint_step(checkpoint: Path) -> int:
    return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"]
