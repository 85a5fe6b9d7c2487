"""Training metrics: the per-step JSONL log and a quieter progress bar.

Metrics go to `RUN/trainer_log.jsonl` (one line per optimizer step) and `RUN/eval_log.jsonl` (one line
per evaluation); events go to the logger; the bar goes to stderr (STYLE.md rule 11).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback
from transformers.trainer_utils import has_length

from qpissa.artifacts import read_jsonl
from qpissa.memory import peak_rss_mb

GENERATION_TIME = "generation_runtime"  # beside the Trainer's eval_runtime, which times the loss pass

log = logging.getLogger(__name__)


class JsonlLogCallback(TrainerCallback):
    """Append one JSON line per optimizer step (and per evaluation) with the metrics users watch; with
    several processes the main one writes, and tokens/s counts every process's tokens (the Trainer
    gathers them), while peak memory is the main process's own device."""

    def __init__(
        self,
        path: Path,
        eval_path: Path,
        device: torch.device,
        generate: Callable | None,
        every: int | float = 10,
        resumed: bool = False,
    ) -> None:
        self.path, self.eval_path, self.device, self.generate, self.every = (
            path,
            eval_path,
            device,
            generate,
            every,
        )
        self.resumed = resumed
        self.start = self.step_start = self.training_since = time.perf_counter()
        self.evaluating = 0.0  # seconds spent in evaluations, which the ETA's training rate leaves out
        self.first_step = 0
        self.tokens_at_step_start = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # the checkpoint is loaded: only now are later records redone (eval_on_start redoes its step's too)
        if self.resumed and state.is_world_process_zero:
            drop_records_from(self.path, state.global_step + 1)
            drop_records_from(self.eval_path, state.global_step + (0 if args.eval_on_start else 1))
        self.start = self.training_since = time.perf_counter()
        self.evaluating = 0.0
        self.first_step = state.global_step
        if self.every < 1:  # a ratio of the run's steps, counted as the Trainer counts its own
            self.every = max(math.ceil(state.max_steps * self.every), 1)
        if torch.cuda.is_available() and self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.step_start = time.perf_counter()
        self.tokens_at_step_start = state.num_input_tokens_seen

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.training_since = time.perf_counter()  # an evaluation, if any, starts now

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if "loss" not in logs or not state.is_world_process_zero:
            return
        now = time.perf_counter()
        done = max(state.global_step - self.first_step, 1)
        elapsed = now - self.start
        per_step = (elapsed - self.evaluating) / done
        tokens = state.num_input_tokens_seen - self.tokens_at_step_start
        entry = {
            "elapsed": round(elapsed, 3),
            "eta": round(per_step * max(state.max_steps - state.global_step, 0), 1),
            "grad_norm": _float(logs.get("grad_norm")),
            "learning_rate": _float(logs.get("learning_rate")),
            "loss": _float(logs["loss"]),
            "peak_memory_mb": round(peak_memory_mb(self.device), 1),
            "step": state.global_step,
            "tokens_per_second": round(tokens / max(now - self.step_start, 1e-9), 1),
        }
        append_jsonl(self.path, entry)
        if state.global_step % self.every == 0:
            log.info(
                "step %d/%d loss %.4f lr %.2e grad_norm %.3f %.0f tokens/s peak %.0f MB eta %.0f s",
                state.global_step,
                state.max_steps,
                entry["loss"],
                entry["learning_rate"] or 0.0,
                entry["grad_norm"] or 0.0,
                entry["tokens_per_second"],
                entry["peak_memory_mb"],
                entry["eta"],
            )

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict | None = None, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:  # every process evaluates its shard; the metrics are gathered
            self._log_evaluation(state.global_step, metrics or {}, kwargs.get("model"))
        now = time.perf_counter()  # the evaluation, generation included, is over
        self.evaluating += now - self.training_since
        self.training_since = now

    def _log_evaluation(self, step: int, metrics: dict, model: torch.nn.Module | None) -> None:
        entry = {"step": step, **{k: _float(v) for k, v in metrics.items()}}
        if self.generate is not None and model is not None:
            started = time.perf_counter()  # the answers' own time: eval_runtime is the loss pass's
            entry.update(self.generate(model), **{GENERATION_TIME: round(time.perf_counter() - started, 4)})
        append_jsonl(self.eval_path, entry)
        log.info("eval at step %d: %s", step, evaluation_text(entry))


def evaluation_text(entry: dict) -> str:
    """An evaluation for the terminal, as the step lines read: loss, exact match over how many, its time
    (the eval log keeps every field)."""
    parts = [f"loss {entry['eval_loss']:.4f}"] if entry.get("eval_loss") is not None else []
    if entry.get("total"):
        parts.append(f"exact match {entry['correct']}/{entry['total']} ({100 * entry['accuracy']:.1f} %)")
    if entry.get("eval_runtime") is not None:
        parts.append(f"{entry['eval_runtime'] + entry.get(GENERATION_TIME, 0.0):.1f} s")
    return ", ".join(parts)


class NoEvaluationAtTheEnd(TrainerCallback):
    """The Trainer evaluates at the last step (transformers 5.2x: always); `train` evaluates the final
    adapter right after, with generation, into eval_results.json. One pass is enough."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step >= state.max_steps:
            control.should_evaluate = False

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.on_step_end(args, state, control)  # eval_strategy=epoch asks here, after the last step


class QuietProgressCallback(ProgressCallback):
    """transformers' tqdm.auto bar without its per-log dict printing (the logger and the JSONL have them),
    shown in a terminal and in a notebook (tqdm.notebook), not in a plain redirected stderr. The bar is
    paused while the Trainer evaluates, so its rate and ETA are the training steps' own."""

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:  # disable=None: off where stderr is no terminal, but for notebooks
            self.training_bar = tqdm(
                total=state.max_steps, desc="train", unit="step", dynamic_ncols=True, disable=None
            )
        self.current_step = 0

    def on_prediction_step(
        self, args: Any, state: Any, control: Any, eval_dataloader: Any = None, **kwargs: Any
    ) -> None:
        """The evaluation's bar, hidden where the training bar is (transformers shows it everywhere)."""
        if state.is_world_process_zero and self.prediction_bar is None and has_length(eval_dataloader):
            total = len(eval_dataloader)
            self.prediction_bar = tqdm(
                total=total, desc="eval", unit="batch", leave=self.training_bar is None, dynamic_ncols=True,
                disable=None,
            )  # fmt: skip
        super().on_prediction_step(args, state, control, eval_dataloader=eval_dataloader, **kwargs)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """tqdm's unpause: the evaluation's time counts neither in the next step's rate nor as elapsed."""
        super().on_evaluate(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.unpause()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        return


def drop_records_from(path: Path, step: int) -> None:
    """Drop the log's records of `step` and later (a resumed run writes them again), and a half-written
    last line. The file is replaced whole: a kill meanwhile leaves the old one or the new one."""
    if not path.exists():
        return
    kept = [row for row in read_jsonl(path, required=("step",)) if row["step"] < step]
    partial = path.with_name(path.name + ".tmp")
    partial.write_text("".join(json.dumps(row, sort_keys=True) + "\n" for row in kept))
    partial.replace(path)


def peak_memory_mb(device: torch.device) -> float:
    """GPU max allocated on CUDA, else the process's peak RSS, in MB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mb()


def append_jsonl(path: Path, entry: dict[str, Any]) -> None:
    """Append one JSON line with sorted keys."""
    with path.open("a") as handle:
        handle.write(json.dumps(entry, sort_keys=True) + "\n")


def _float(value: Any) -> float | None:
    if value is None:
        return None
    return float(value.item() if hasattr(value, "item") else value)
