"""`qpissa eval`: task loss / perplexity and exact-match accuracy of a QPiSSA directory, run or model.

Exact match compares final answers (`demo_task.final_answer`): the text after the last `####` when
the reference has one (GSM8K style, as the demo task writes), otherwise the whole stripped response.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from qpissa import UserError
from qpissa.artifacts import EXPORT_REPORT, RUN_MARKER, ModelSource, is_qpissa_dir, read_json
from qpissa.chat_template import prompt_ids, template_origin
from qpissa.data import IGNORE_INDEX, TokenizedData, collate, pad_token_id, tokenize_split
from qpissa.data_formats import Sample
from qpissa.data_sources import load_heldout
from qpissa.demo_task import final_answer
from qpissa.loading import check_context, checked_source, load_model, load_tokenizer, model_context
from qpissa.options import api_path, check_api_argument
from qpissa.recipe import DataConfig
from qpissa.run_marker import run_data_settings
from qpissa.runtime import resolve_runtime
from qpissa.settings import DataFormat, EvalSettings, Metric

log = logging.getLogger(__name__)

# tokens per sample without a run's max_seq_len (or the model's context, if shorter)
DEFAULT_EVAL_LENGTH = 1024


def evaluate(
    model_or_run: Path | str, data_path: Path | str, settings: EvalSettings, show_progress: bool = True
) -> dict[str, Any]:
    """Load MODEL_OR_RUN and score it on `data_path`; `show_progress`: bars on a terminal.

    Returns:
        JSON-ready: model, adapter, data, samples, dropped, cut, and loss / perplexity / accuracy as asked;
        with `max_samples`, samples + dropped is the first `max_samples` records, and cut counts among them.

    Raises:
        UserError: bad path, unknown format, unreadable data, a QPiSSA directory without its adapter
            (unless `settings.adapter` is False).
    """
    settings = check_api_argument(settings, EvalSettings, "settings", "e.g. EvalSettings(max_samples=64)")
    model_or_run, data_path = api_path(model_or_run, "model_or_run"), api_path(data_path, "data_path")
    source = checked_source(model_or_run, adapter=settings.adapter)
    run_data = _run_data(source, model_or_run)
    recorded = run_data.settings["format"] if run_data else None
    data_format = settings.format or (DataFormat(recorded) if recorded else None)
    # no format given or recorded: detected, as training does
    try:
        records, data_format, split = load_heldout(
            data_path, settings.split, data_format, "--split", "--format"
        )
    except UserError as error:
        if settings.format is not None or not recorded:
            raise
        raise UserError(f"{error}{_other_format(data_path, settings.split, run_data)}") from None
    if run_data is not None:
        _say_recorded(run_data, data_path, settings)
        _warn_training_data(run_data, data_path, split)
    if settings.metric is Metric.ACCURACY and data_format is DataFormat.TEXT:
        raise UserError("format text has no answers to match; use --metric loss or ppl")
    if settings.max_seq_len is not None:
        check_context(source.base_dir, settings.max_seq_len, "--max-seq-len")
    context = model_context(source.base_dir)
    default_length = min(DEFAULT_EVAL_LENGTH, context or DEFAULT_EVAL_LENGTH)
    max_seq_len = settings.max_seq_len or (run_data.settings["max_seq_len"] if run_data else default_length)
    data = DataConfig(path=data_path, format=data_format, max_seq_len=max_seq_len)
    tokenizer = load_tokenizer(source)
    if settings.max_samples:  # before tokenizing: dropped, cut and their warnings count what is scored
        records = records.select(range(min(settings.max_samples, len(records))))
    samples, tokenized = tokenize_split(
        records, data_format, data, tokenizer, "--max-seq-len", context, data_path, template_origin(source)
    )
    scored = answerable(samples, data_format, data_path)
    if settings.metric is Metric.ACCURACY and not scored:
        raise UserError(
            f"dataset {data_path} has no prompt to answer (every record's prompt is empty); use --metric "
            "loss or ppl"
        )
    runtime = resolve_runtime()
    model = load_model(source, device=runtime.device, compute_dtype=runtime.dtype)
    result: dict[str, Any] = {
        "adapter": str(source.adapter_dir) if source.adapter_dir else None,
        "data": str(data_path),
        "split": None if data_path.is_file() else split,  # a single file has no splits
        "dropped": tokenized.dropped,
        "cut": tokenized.cut,  # scored on their first max_seq_len tokens only
        "format": data_format.value,  # with max_seq_len, what makes two losses on one file comparable
        "max_seq_len": max_seq_len,
        "model": str(source.base_dir),
        "samples": len(samples),
    }
    if settings.metric is not Metric.ACCURACY:
        result.update(
            evaluate_loss(
                model,
                tokenized.rows,
                pad_token_id(tokenizer),
                runtime.device,
                settings.batch_size,
                show_progress,
            )
        )
    if settings.metric in (Metric.ALL, Metric.ACCURACY) and scored:
        result.update(
            exact_match(
                model,
                tokenizer,
                scored,
                settings.batch_size,
                runtime.device,
                settings.max_new_tokens,
                show_progress,
                context,
            )
        )
    return result


def answerable(samples: list[Sample], data_format: DataFormat, where: Path) -> list[Sample]:
    """The samples exact match scores: those with a prompt. Text has none to answer, nor has a
    prompt_completion record whose prompt is empty (unconditional completion); these are skipped, not
    refused: their loss still counts, and an answer generated from nothing would match by chance."""
    if data_format is DataFormat.TEXT:
        return []
    scored = [sample for sample in samples if sample.prompt]
    if len(scored) < len(samples):
        log.info(
            "exact match: %d of %d samples of %s have an empty prompt, with nothing to answer; they are not "
            "scored", len(samples) - len(scored), len(samples), where,
        )  # fmt: skip
    return scored


def heldout_for_training(
    data: DataConfig, tokenizer: Any, context: int | None, origin: str
) -> tuple[list[Sample], TokenizedData | None]:
    """A run's held-out data (`data.eval_path`, none without it): the samples whose answers are generated,
    the first `data.eval_generate_samples` of those with a prompt, and the tokenized rows scored by loss;
    `origin` says whose chat template renders them, for messages."""
    if data.eval_path is None:
        return [], None
    records, data_format, split = load_heldout(
        data.eval_path, data.eval_split, data.eval_format(), "data.eval_split"
    )
    trained = {(source.path.resolve(), source.split) for source in data.train_sources()}
    if (data.eval_path.resolve(), split) in trained:
        log.warning(
            "eval_path %s (split %s) is training data: its loss measures fit, not held-out loss; "
            "evaluate on data the run does not train on", data.eval_path, split,
        )  # fmt: skip
    samples, tokenized = tokenize_split(
        records, data_format, data, tokenizer, context=context, path=data.eval_path, origin=origin
    )
    if not data.eval_generate_samples:
        return [], tokenized
    if data_format is DataFormat.TEXT and data.eval_generate_samples != DataConfig.eval_generate_samples:
        # set in the recipe, not left at its default: say why nothing is generated
        log.info(
            "data.eval_generate_samples: eval_path %s is text, with no answers to generate", data.eval_path
        )
    return answerable(samples, data_format, data.eval_path)[: data.eval_generate_samples], tokenized


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    rows: list[dict[str, list[int]]],
    pad_id: int,
    device: torch.device,
    batch_size: int = 8,
    show_progress: bool = False,
) -> dict[str, float]:
    """Token-weighted mean cross-entropy over the trained (label) tokens.

    Returns:
        loss (nats/token), perplexity, tokens.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in _batches(len(rows), batch_size, "eval loss", show_progress):
        batch = {k: v.to(device) for k, v in collate(rows[start : start + batch_size], pad_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        batch_total, batch_count = sample_sums(logits, batch["labels"], None).sum(0).tolist()
        total, count = total + batch_total, count + int(batch_count)
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


def sample_sums(
    logits: torch.Tensor, labels: torch.Tensor, position_ids: torch.Tensor | None
) -> torch.Tensor:
    """Each sample's summed loss over its target tokens and their count, [samples, 2] float64, in batch
    order; a packed row (padding-free collator) holds several samples, split where positions restart."""
    found = []
    for row in range(labels.shape[0]):  # one row's float32 logits at a time: a batch's may not fit
        targets = labels[row, 1:]  # position t predicts token t+1
        losses = torch.nn.functional.cross_entropy(
            logits[row, :-1].float(), targets, ignore_index=IGNORE_INDEX, reduction="none"
        )
        pairs = torch.stack([losses, (targets != IGNORE_INDEX).float()], 1).double()
        if position_ids is None:  # a padded row is one sample
            found.append(pairs.sum(0, keepdim=True))
            continue
        starts = position_ids[row] == 0
        sample = (starts.cumsum(0) - 1)[1:]  # the sample of each target token
        sums = torch.zeros(int(starts.sum()), 2, dtype=torch.float64, device=pairs.device)
        found.append(sums.index_add_(0, sample, pairs))
    return torch.cat(found)


@torch.no_grad()
def exact_match(
    model: torch.nn.Module,
    tokenizer: Any,
    samples: list[Sample],
    batch_size: int,
    device: torch.device,
    max_new_tokens: int = 64,
    show_progress: bool = False,
    context: int | None = None,
) -> dict[str, float]:
    """Greedy-generate each sample's response and compare final answers; never past the model's
    `context` (positions beyond it were never trained, and GPT-2's fail outright).

    Returns:
        accuracy (0..1), correct, total.
    """
    was_training = model.training
    model.eval()
    pad_id = pad_token_id(tokenizer)
    correct = shortened = 0
    for start in _batches(len(samples), batch_size, "exact match", show_progress):
        chunk = samples[start : start + batch_size]
        prompts = [prompt_ids(sample.prompt, tokenizer) for sample in chunk]
        longest = max(len(ids) for ids in prompts)
        # left padding so every prompt ends where generation starts
        ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
        budget = max_new_tokens if context is None else min(max_new_tokens, context - longest)
        shortened += len(chunk) if budget < max_new_tokens else 0
        output = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=budget,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=pad_id,
        )
        for sample, generated in zip(chunk, output[:, longest:], strict=True):
            text = tokenizer.decode(generated, skip_special_tokens=True)
            correct += final_answer(text) == final_answer(sample.response)
    model.train(was_training)
    if shortened:
        log.warning(
            "exact match: %d of %d answers were generated with fewer than %d new tokens: their prompts, "
            "padded to the longest of their batch, leave less room in the model's context of %d tokens",
            shortened, len(samples), max_new_tokens, context,
        )  # fmt: skip
    return {"accuracy": correct / max(len(samples), 1), "correct": correct, "total": len(samples)}


def _batches(total: int, batch_size: int, description: str, show_progress: bool) -> Iterator[int]:
    """Each batch's first index, with a bar over the samples (on a terminal) that goes when done."""
    with tqdm(
        total=total, unit="sample", desc=description, leave=False, disable=None if show_progress else True
    ) as bar:
        for start in range(0, total, batch_size):
            yield start
            bar.update(min(batch_size, total - start))


@dataclass(frozen=True)
class RunData:
    """The data settings of the run a model was trained in, and the file that records them.

    Attributes:
        settings: the run's `data` group (format, max_seq_len, path or sources), as the run recorded it.
        record: the run's qpissa_run.json, or the export_report.json of an export of the run.
    """

    settings: dict[str, Any]
    record: Path


def _run_data(source: ModelSource, given: Path) -> RunData | None:
    """The data settings of the run MODEL_OR_RUN (`given`) was trained in: its marker's, or those an
    export of it keeps (detected instead, the format could be another one the records also fit, and the
    loss with it); a LoRA export's also with --no-adapter, for the baseline its loss is compared to."""
    if source.run_dir is not None:
        marker = source.run_dir / RUN_MARKER
        return RunData(_checked_data(run_data_settings(source.run_dir), marker), marker)
    report = _export_report(source, given)
    data = read_json(report, "export again").get("data") if report is not None else None
    return None if data is None else RunData(_checked_data(data, report), report)


def _export_report(source: ModelSource, given: Path) -> Path | None:
    """The export_report.json of a merged export (the model) or a LoRA export (the adapter); a QPiSSA
    directory converted from a merged export may hold a copy of one, which describes another model."""
    for directory in (source.adapter_dir, source.base_dir, given):
        if directory is not None and (directory / EXPORT_REPORT).is_file() and not is_qpissa_dir(directory):
            return directory / EXPORT_REPORT
    return None


def _checked_data(data: Any, record: Path) -> dict[str, Any]:
    """A recorded `data` group with a valid format (None: the run detected it; with `data.sources` that
    all name one, that one) and max_seq_len.

    Raises:
        UserError: either is missing or invalid in `record`.
    """
    formats = {None, *(f.value for f in DataFormat)}  # None: the run detected it
    if not isinstance(data, dict) or data.get("format") not in formats:
        raise UserError(f"{record} records no valid data.format; pass --format and --max-seq-len")
    if not isinstance(data.get("max_seq_len"), int):
        raise UserError(f"{record} records no valid data.max_seq_len; pass --max-seq-len")
    named = {source.get("format") for source in data.get("sources") or [] if isinstance(source, dict)}
    if data["format"] is None and len(named) == 1 and None not in named and named <= formats:
        return {**data, "format": named.pop()}  # the format training read its eval_path in (eval_format)
    return data


def _other_format(data_path: Path, split: str | None, run_data: RunData) -> str:
    """The hint for data that fails in the run's recorded format but fits another (else none): read again
    with the format detected, as without a run, so a path or split mistake gets no word on formats."""
    try:
        _, detected, _ = load_heldout(data_path, split, None, "--split", "--format")
    except UserError:
        return ""
    return (
        f" (format {run_data.settings['format']} is the trained run's, recorded in {run_data.record}; the "
        f"records fit format {detected.value}: pass --format {detected.value} to read them in it)"
    )


def _say_recorded(run_data: RunData, data_path: Path, settings: EvalSettings) -> None:
    """Log which of the run's data settings eval takes, and from where: an export keeps them too."""
    taken = []
    if settings.format is None and run_data.settings["format"] is not None:
        taken.append(f"format {run_data.settings['format']}")
    if settings.max_seq_len is None:
        taken.append(f"max_seq_len {run_data.settings['max_seq_len']}")
    if taken:
        log.info(
            "data %s: %s, the trained run's (recorded in %s; --format and --max-seq-len choose)",
            data_path, ", ".join(taken), run_data.record,
        )  # fmt: skip


def _warn_training_data(run_data: RunData, data_path: Path, split: str) -> None:
    """Warn when the eval data is what the run trained on (the same resolved path and split as its
    data.path or one of its data.sources, as training checks its eval_path): that loss measures fit."""
    data = run_data.settings
    sources = data.get("sources") or [{"path": data.get("path"), "split": data.get("split")}]
    trained = {
        (Path(source["path"]).resolve(), source.get("split") or "train")
        for source in sources
        if isinstance(source, dict) and isinstance(source.get("path"), str)
    }
    if (data_path.resolve(), split) in trained:
        log.warning(
            "eval data %s (split %s) is what the run trained on (its data.path or data.sources, as %s "
            "records them): its loss measures fit, not held-out loss; evaluate on data the run does not "
            "train on", data_path, split, run_data.record,
        )  # fmt: skip
