"""Fine-tune the adapter of a QPiSSA directory with transformers' Trainer; the NF4 residual stays frozen.

QLoRA, LoftQ and QPiSSA conversions go through this same path, so runs with one config differ only in
the conversion (DESIGN.md principle 4). Every step is appended to `RUN/trainer_log.jsonl`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import httpx
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import SaveStrategy

from qpissa import UserError
from qpissa.artifacts import (
    ADAPTER_DIR,
    DATA_FINGERPRINT,
    EVAL_LOG_NAME,
    EVAL_RESULTS_NAME,
    LOG_NAME,
    MODEL_FROM_RUN,
    RUN_MARKER,
    TOKENIZATION,
    TOKENIZATION_VERSION,
    ModelSource,
    partial_dir,
    read_json,
    read_jsonl,
    read_report,
)
from qpissa.chat_template import resolve_chat_template, save_chat_template, template_origin
from qpissa.checkpoint import write_json
from qpissa.convert_settings import Method
from qpissa.data import TokenizedData, pad_token_id, training_collator, training_data
from qpissa.distributed import (
    check_fsdp,
    check_gpu_count,
    check_process_count,
    gather,
    on_main,
    process_record,
    processes,
    uses_fsdp,
    wait_for_everyone,
    warn_fewer_processes,
)
from qpissa.loading import load_model
from qpissa.memory import estimate_memory
from qpissa.options import check_api_argument, to_dict
from qpissa.output_lock import lock_output
from qpissa.outputs import readable_as_umask_allows, resolve_output
from qpissa.recipe import TrainConfig
from qpissa.resume_checks import RNG_FILES, check_same_samples, data_fingerprint, warn_unresumable
from qpissa.runtime import Runtime, dtype_name, resolve_runtime
from qpissa.task_eval import evaluate_loss, exact_match, heldout_for_training
from qpissa.train_checks import check_batches, check_inputs, check_output_dir
from qpissa.trainer_eval import TokenWeightedTrainer
from qpissa.trainer_options import checked_options, training_arguments
from qpissa.trainer_resume import resume_or_finish
from qpissa.trainlog import (
    GENERATION_TIME,
    JsonlLogCallback,
    NoEvaluationAtTheEnd,
    QuietProgressCallback,
    append_jsonl,
    drop_records_from,
    peak_memory_mb,
)

log = logging.getLogger(__name__)

# what creating push_to_hub's repository raises without a network or a login (the Hub's own HTTP errors are
# httpx's, the transport huggingface_hub uses)
HUB_ERRORS = (httpx.HTTPError, OfflineModeIsEnabled, LocalTokenNotFoundError)
PISSA_MAX_LR = 1e-4  # the paper trains at 2e-5; users report PiSSA diverging at 2e-4 (REFERENCE.md §5)


def train(config: TrainConfig, show_progress: bool = True) -> dict[str, Any]:
    """Train the adapter of `config.model` on `config.data`; write the run directory.

    Args:
        config: the validated recipe.
        show_progress: the training bar (tqdm.auto: a terminal's stderr or a notebook).

    Returns:
        Summary: output_dir, steps, train_loss (mean over the logged steps of the whole run, resumed or
        not) and loss_steps (the first and last of them), dropped samples, trainable_params, eval (if
        eval data).

    Raises:
        UserError: any input problem, detected before anything is written; another process writing
            output_dir.
    """
    config = check_api_argument(
        config, TrainConfig, "config", "read a recipe with load_config(path, overrides)"
    )
    checked_options(config.trainer)  # a mistyped key first: it may be why the rest looks wrong
    config.output_dir = resolve_output(config.output_dir, "output_dir")  # a link is written through
    runtime = resolve_runtime(config.device, config.bf16, config.optim)
    source, resume = check_inputs(config, runtime.optim)
    check_gpu_count(runtime.device.type)
    # checks the options and, under a launcher, joins the process group
    arguments = training_arguments(config, runtime, config.output_dir, show_progress)
    runtime = dataclasses.replace(runtime, device=arguments.device)  # this rank's own GPU (local rank)
    ranks = processes()
    warn_fewer_processes()
    if uses_fsdp(arguments):
        check_fsdp(runtime.device.type, dtype_name(runtime.dtype), source.base_dir)
    if resume is not None:
        check_process_count(len(list(resume.glob(RNG_FILES))), str(resume), ranks)
    template = resolve_chat_template(config.chat_template) if config.chat_template else None
    with ExitStack() as held:  # the main process holds output_dir's lock; the others write nothing

        def claim() -> None:
            held.enter_context(lock_output(config.output_dir, "output_dir"))
            check_output_dir(config, resume)

        on_main(claim)
        return _train(config, source, resume, runtime, arguments, template)


def _train(
    config: TrainConfig,
    source: ModelSource,
    resume: Path | None,
    runtime: Runtime,
    arguments: TrainingArguments,
    template: str | None,
) -> dict[str, Any]:
    """`train` once the main process holds output_dir's lock; every process trains, the main one writes."""
    tokenizer, context, train_data = training_data(config, source, template)
    check_batches(arguments, len(train_data.rows))
    fingerprint = data_fingerprint(train_data.rows)
    if resume is not None:
        check_same_samples(resume, fingerprint)
    origin = template_origin(source, recipe=template is not None)  # whose template a failure names
    generated, eval_data = heldout_for_training(config.data, tokenizer, context, origin)
    _warn_learning_rate(config, source)
    warn_unresumable(arguments)

    fsdp = uses_fsdp(arguments)  # FSDP moves each rank's shards to its GPU; the whole model stays off it
    device = torch.device("cpu") if fsdp else runtime.device
    model = load_model(source, trainable=True, device=device, compute_dtype=runtime.dtype)
    _adapter_to(model, runtime.dtype if fsdp else torch.float32)
    model.config.use_cache = False  # no KV cache in training; with one, attention ignores packed positions
    # an MoE's routers stay frozen in 16 bits: their load-balancing term would only be added to the logged
    # training loss (not to step 0's or the evaluations') and pull the adapters
    model.config.output_router_logits = False
    pad_id = pad_token_id(tokenizer)
    run_dir = config.output_dir
    generate = partial(
        exact_match,
        tokenizer=tokenizer,
        samples=generated,
        batch_size=config.per_device_eval_batch_size,
        device=runtime.device,
    )
    callback = JsonlLogCallback(
        run_dir / LOG_NAME,
        run_dir / EVAL_LOG_NAME,
        runtime.device,
        generate if generated and not fsdp else None,
        every=config.logging_steps,
        resumed=resume is not None,
    )
    final_evaluation = eval_data is not None and not fsdp  # after training, on the main process
    # the Trainer chooses (or saves) the best checkpoint among its evaluations: the last step's is one of them
    best_at_end = arguments.load_best_model_at_end
    trainer_evaluates_last = best_at_end or arguments.save_strategy == SaveStrategy.BEST
    trainer, refused = _build_trainer(
        arguments,
        model=model,
        train_dataset=train_data.rows,
        eval_dataset=eval_data.rows if eval_data else None,
        data_collator=training_collator(model, config.data, pad_id),  # packing checked exact on the model
        callbacks=[
            callback,
            *([NoEvaluationAtTheEnd()] if final_evaluation and not trainer_evaluates_last else []),
        ],
    )
    marker = _run_marker(config, runtime, source, arguments, fingerprint)
    # written only once the model loads and the Trainer is built: a refused run leaves nothing
    on_main(partial(_prepare_run_dir, config, resume, marker, template, refused))
    if resume is None and not fsdp:  # under FSDP no device holds the whole model before training
        _log_initial_loss(model, train_data, arguments, pad_id, runtime, run_dir)
    memory = estimate_memory(model, config, runtime)  # after a first forward: its kernels and buffers count
    _log_setup(memory, train_data)
    _quiet_progress(trainer)
    resume_or_finish(trainer, resume)
    _save_adapter(trainer, run_dir, template)
    if best_at_end and trainer.state.best_model_checkpoint:
        log.info("load_best_model_at_end: the adapter is the best checkpoint's, %s (%s %.4f)",
                 trainer.state.best_model_checkpoint, arguments.metric_for_best_model,
                 trainer.state.best_metric)  # fmt: skip
    if final_evaluation and processes().is_main:
        log.info("evaluating the final adapter: loss on %d samples, answers generated for %d "
                 "(data.eval_generate_samples chooses how many; generating is slow on a CPU)",
                 len(eval_data.rows), len(generated))  # fmt: skip
        bars = not arguments.disable_tqdm
        evaluating = time.perf_counter()
        final = evaluate_loss(
            model, eval_data.rows, pad_id, runtime.device, config.per_device_eval_batch_size, bars
        )
        seconds = time.perf_counter() - evaluating
        generating = time.perf_counter()
        generation = generate(model, show_progress=bars) if generated else {}
        answered = {GENERATION_TIME: round(time.perf_counter() - generating, 4)} if generation else {}
        write_json(run_dir / EVAL_RESULTS_NAME, {**final, **generation})
        # the last step's line of the eval log, which the Trainer's pass would have written (a run finished
        # again from its last checkpoint evaluates that step again)
        if not trainer_evaluates_last:
            drop_records_from(run_dir / EVAL_LOG_NAME, trainer.state.global_step)
            samples, state = len(eval_data.rows), trainer.state
            batches = -(-samples // config.per_device_eval_batch_size)
            line = {
                "step": state.global_step, "eval_loss": final["loss"], "eval_runtime": round(seconds, 4),
                "eval_samples_per_second": round(samples / seconds, 3),
                "eval_steps_per_second": round(batches / seconds, 3), "epoch": state.epoch,
                "num_input_tokens_seen": float(state.num_input_tokens_seen),  # as the Trainer logs it
            }  # fmt: skip
            append_jsonl(run_dir / EVAL_LOG_NAME, {**line, **generation, **answered})
    if processes().is_main:
        readable_as_umask_allows(run_dir)  # the adapter and checkpoints PEFT and the Trainer wrote
    wait_for_everyone()  # the run directory is complete for every process
    losses = {row["step"]: row["loss"] for row in read_jsonl(run_dir / LOG_NAME, ("step", "loss"))}
    trained = sorted(step for step, loss in losses.items() if step > 0 and loss is not None)
    summary = {
        "dropped": train_data.dropped,
        "loss_steps": [trained[0], trained[-1]] if trained else None,
        "output_dir": str(run_dir),
        "steps": trainer.state.global_step,
        "train_loss": sum(losses[step] for step in trained) / len(trained) if trained else None,
        "trainable_params": memory["trainable_params"],
    }
    if final_evaluation:
        summary["eval"] = read_json(run_dir / EVAL_RESULTS_NAME, "train again")
    return summary


def _log_setup(memory: dict[str, Any], train_data: TokenizedData) -> None:
    """Parameter counts and the memory estimate, before step 1."""
    parts = ", ".join(f"{name} {mb:.0f}" for name, mb in memory["parts_mb"].items())
    log.info(
        "parameters: %s trainable (adapter), %s frozen; estimated peak memory %.0f MB per device (%s)",
        f"{memory['trainable_params']:,}", f"{memory['frozen_params']:,}", memory["total_mb"], parts,
    )  # fmt: skip
    log.info(
        "%d training samples (%d dropped: no response token within max_seq_len; %d cut at max_seq_len)",
        len(train_data.rows), train_data.dropped, train_data.cut,
    )  # fmt: skip


def _log_initial_loss(
    model: torch.nn.Module,
    data: TokenizedData,
    arguments: TrainingArguments,
    pad_id: int,
    runtime: Runtime,
    run_dir: Path,
) -> None:
    """Log the loss of the initialized model on the first global batch (its first rows) as step 0, in a
    fresh log: each process measures its share (a per-device batch for each accumulated micro-batch),
    weighted by tokens as training weighs them."""
    size = arguments.per_device_train_batch_size
    share = size * arguments.gradient_accumulation_steps
    start = arguments.process_index * share
    rows = [data.rows[i] for i in range(start, min(start + share, len(data.rows)))]
    own = evaluate_loss(model, rows, pad_id, runtime.device, size) if rows else {"loss": 0.0, "tokens": 0}
    shares = gather((own["loss"] * own["tokens"], own["tokens"]))
    if not arguments.should_save:  # only the main process writes
        return
    drop_records_from(run_dir / LOG_NAME, 0)
    loss = sum(total for total, _ in shares) / max(sum(tokens for _, tokens in shares), 1)
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
    log.info("step 0 loss %.4f (the converted model, before any training)", loss)


def _warn_learning_rate(config: TrainConfig, source: ModelSource) -> None:
    method = read_report(source.base_dir)["settings"].get("method")
    if method != Method.QLORA.value and config.learning_rate > PISSA_MAX_LR:
        log.warning(
            "learning_rate %g is above %g: PiSSA-style inits (%s) tend to diverge there; the paper uses 2e-5",
            config.learning_rate,
            PISSA_MAX_LR,
            method,
        )


def _build_trainer(arguments: TrainingArguments, **parts: Any) -> tuple[Trainer | None, UserError | None]:
    """The Trainer, built before the run directory is written (one that fails to build leaves none); or,
    where push_to_hub's repository cannot be created (the main process alone creates it, as its Trainer is
    built), no Trainer and the refusal that `_prepare_run_dir` raises on every process."""
    try:
        return TokenWeightedTrainer(args=arguments, **parts), None
    except HUB_ERRORS as error:
        return None, _push_refused(error, arguments)


def _push_refused(error: Exception, arguments: TrainingArguments) -> UserError:
    """push_to_hub's repository, which the Trainer creates as it is built, cannot be created."""
    repo = arguments.hub_model_id or Path(arguments.output_dir).absolute().name
    reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return UserError(
        f"push_to_hub: the Hugging Face Hub repository {repo} cannot be created ({reason}); check the "
        "network and that you are logged in (`hf auth login`, or hub_token), or drop push_to_hub"
    )


def _run_marker(
    config: TrainConfig, runtime: Runtime, source: ModelSource, arguments: TrainingArguments, fingerprint: str
) -> dict[str, Any]:
    """The run marker that `resolve_source` reads and a resume checks: the config, what `auto` became, the
    conversion and the samples trained on, and how many processes train."""
    resolved = {"device": runtime.device.type, "dtype": dtype_name(runtime.dtype), "optim": runtime.optim}
    return {
        "config": to_dict(config),
        "model": str(source.base_dir),
        MODEL_FROM_RUN: os.path.relpath(source.base_dir.resolve(), config.output_dir.resolve()),
        "conversion": read_report(source.base_dir)["fingerprint"],  # what a resume must train on again
        DATA_FINGERPRINT: fingerprint,  # and the samples it must see again
        TOKENIZATION: TOKENIZATION_VERSION,
        "processes": process_record(arguments, processes()),
        "runtime": resolved,
    }


def _prepare_run_dir(
    config: TrainConfig,
    resume: Path | None,
    marker: dict[str, Any],
    template: str | None,
    refused: UserError | None,
) -> None:
    """Create output_dir and write the run `marker` and the run's chat template; first raise what refused
    the main process's Trainer (run by `on_main`, so that every process ends with it)."""
    if refused is not None:
        raise refused
    run_dir = config.output_dir
    if resume is None and run_dir.exists() and config.overwrite_output_dir:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / RUN_MARKER, marker)
    if template is not None:
        save_chat_template(template, run_dir)


def _adapter_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """fp32 master weights for the adapter whatever the compute dtype (autocast handles the rest); under
    FSDP the compute dtype, as FSDP flattens each layer's weights into one tensor of one dtype."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(dtype)


def _quiet_progress(trainer: Trainer) -> None:
    """Keep transformers' bar (when shown) but not its printing of every step's log dict."""
    trainer.remove_callback(PrinterCallback)
    if any(isinstance(callback, ProgressCallback) for callback in trainer.callback_handler.callbacks):
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(QuietProgressCallback())


def _save_adapter(trainer: Trainer, run_dir: Path, template: str | None) -> None:
    """The main process writes the final adapter; under FSDP every process first helps gather it."""
    state = trainer.accelerator.get_state_dict(trainer.model) if trainer.is_fsdp_enabled else None
    if not trainer.args.should_save:
        return
    building = partial_dir(run_dir / ADAPTER_DIR)
    shutil.rmtree(building, ignore_errors=True)
    trainer.accelerator.unwrap_model(trainer.model).save_pretrained(building, state_dict=state)
    if template is not None:  # the adapter carries the template it was trained with
        save_chat_template(template, building)
    shutil.rmtree(run_dir / ADAPTER_DIR, ignore_errors=True)
    building.rename(run_dir / ADAPTER_DIR)
