"""Training data as token sequences: tokenization with exact response-only loss masks (`datasets.map`,
cached), several sources mixed, and the collators: right padding, or padding-free packing.

Segments are tokenized one by one so the loss mask is exact at token level. Samples whose response falls
entirely beyond `max_seq_len` are dropped and counted, never trained on with an empty mask
(REFERENCE.md §5). Packing lays a micro-batch's samples end to end in one row with position ids that
restart at every sample: transformers' attention (sdpa, eager, flash) then keeps each sample to itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import datasets
import torch
from transformers import DataCollatorWithFlattening

from qpissa import UserError
from qpissa.artifacts import TOKENIZATION_VERSION, ModelSource
from qpissa.chat_template import prompt_ids, template_origin
from qpissa.data_formats import Sample, check_tokenizer, render
from qpissa.data_sources import RECORD_COLUMN, load_source
from qpissa.loading import load_tokenizer, model_context
from qpissa.recipe import DataConfig, TrainConfig
from qpissa.settings import DataFormat

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips (transformers' convention)
CONTEXT_CHARS = 64  # of the text before a segment, tokenized with it: where tokens could merge across


@dataclass
class TokenizedData:
    """Token sequences ready for the trainer, and what was dropped on the way."""

    rows: datasets.Dataset | list[dict[str, list[int]]]  # input_ids, labels per sample
    dropped: int  # samples whose response was cut entirely by max_seq_len
    cut: int = 0  # samples kept but cut at max_seq_len: response tokens past it are not trained
    kept: list[int] | None = None  # of a list of samples (`tokenize`): the index of each row's sample


def training_data(
    config: TrainConfig, source: ModelSource, template: str | None
) -> tuple[Any, int | None, TokenizedData]:
    """The tokenizer with the run's chat template, the model's context, and the training samples as a run
    tokenizes them (`compare` hashes them to tell whether a finished run trained on the data named now)."""
    tokenizer = load_tokenizer(source)
    if template is not None:
        tokenizer.chat_template = template
    context = model_context(source.base_dir)  # how far max_seq_len could be raised, for the advice
    origin = template_origin(source, recipe=template is not None)
    return tokenizer, context, load_train(config.data, tokenizer, config.seed, context, origin)


def load_train(
    config: DataConfig,
    tokenizer: Any,
    seed: int,
    context: int | None = None,
    origin: str = "the chat template",
) -> TokenizedData:
    """Read, check, render and tokenize every training source with `datasets.map`, then mix them.

    Several sources are concatenated and shuffled with `seed` (each drew its `samples` with it too).
    `context` is the model's (None: not known), which caps how far `max_seq_len` can be raised; `origin`
    says whose chat template the tokenizer has, for messages.

    Raises:
        UserError: unreadable data, bad records, a chat format without a chat template, or nothing left.
    """
    parts = []
    for index, source in enumerate(config.train_sources()):
        setting = config.source_prefix(index)
        dataset, data_format = load_source(source, seed, f"{setting}format", f"{setting}split")
        check_tokenizer(tokenizer, data_format)
        parts.append(
            dataset.map(
                _encode_record,
                with_indices=True,
                fn_kwargs={
                    "data_format": data_format,
                    "tokenizer": tokenizer,
                    "response_only": config.response_only,
                    "max_seq_len": config.max_seq_len,
                    "path": str(source.path),
                    "origin": origin,
                    "version": TOKENIZATION_VERSION,
                },
                remove_columns=dataset.column_names,
                num_proc=config.num_proc,
                desc=f"tokenizing {source.path}",
            )
        )
    tokenized = datasets.concatenate_datasets(parts).shuffle(seed=seed) if len(parts) > 1 else parts[0]
    kept = tokenized.filter(
        _has_target, input_columns="labels", desc="finding samples without a response token"
    )
    length = "`data.max_seq_len`"
    _check_kept(len(kept), len(tokenized) - len(kept), config.max_seq_len, length, "train on", context)
    cut = sum(kept["cut"])
    if cut:
        raising = _raising(length, config.max_seq_len, context)
        log.warning(
            "%d of %d training samples are longer than data.max_seq_len=%d and were cut there: response "
            "tokens past it (the end of a turn, or later turns) are not trained%s",
            cut, len(kept), config.max_seq_len, f"; {raising} to keep them whole" if raising else "",
        )  # fmt: skip
    return TokenizedData(kept.remove_columns("cut"), len(tokenized) - len(kept), cut)


def tokenize_split(
    dataset: datasets.Dataset,
    data_format: DataFormat,
    config: DataConfig,
    tokenizer: Any,
    length_setting: str = "`data.max_seq_len`",
    context: int | None = None,
    path: Path | None = None,
    origin: str = "the chat template",
) -> tuple[list[Sample], TokenizedData]:
    """Render and tokenize held-out records (`data_sources.load_heldout`), keeping the rendered samples for
    exact-match scoring: those of the rows, in their order (a sample dropped from the loss is not scored).

    `context` is the model's (None: not known), which caps how far `max_seq_len` can be raised; `path`
    the records' (their first ones, in order) and `origin` whose chat template renders them, for messages.
    """
    check_tokenizer(tokenizer, data_format)
    # scored on response tokens whatever `response_only` trains on: held-out losses of runs and of
    # `qpissa eval` (which has no such setting) measure the same tokens
    samples = [
        render(record, data_format, tokenizer, where=f"{path or 'data'} record {index}", origin=origin)
        for index, record in enumerate(dataset)
    ]
    tokenized = tokenize(samples, tokenizer, config.max_seq_len, length_setting, context)
    return [samples[index] for index in tokenized.kept], tokenized


def tokenize(
    samples: list[Sample],
    tokenizer: Any,
    max_seq_len: int,
    length_setting: str = "`data.max_seq_len`",
    context: int | None = None,
) -> TokenizedData:
    """Tokenize rendered samples into input_ids and labels (IGNORE_INDEX where the loss is off).

    `length_setting` is how the user sets `max_seq_len` (`--max-seq-len` for `qpissa eval`), and
    `context` the model's positions, past which it cannot be raised (None: not known); for messages.

    Raises:
        UserError: nothing is left after dropping the samples with no response token within `max_seq_len`.
    """
    encoded = [_encode(sample.segments, tokenizer, max_seq_len) for sample in samples]
    kept = [index for index, row in enumerate(encoded) if _has_target(row["labels"])]
    rows = [encoded[index] for index in kept]
    _check_kept(len(rows), len(encoded) - len(rows), max_seq_len, length_setting, "score", context)
    cut = sum(row.pop("cut") for row in rows)
    if cut:
        raising = _raising(length_setting, max_seq_len, context)
        log.warning(
            "%d of %d samples are longer than max_seq_len=%d: their loss is measured on the first %d "
            "tokens only, without the response tokens past them%s", cut, len(rows), max_seq_len, max_seq_len,
            f"; {raising} to score them whole" if raising else "",
        )  # fmt: skip
    return TokenizedData(rows, len(encoded) - len(rows), cut, kept)


def collate(rows: list[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row.

    Returns:
        input_ids, labels, attention_mask: int64 [batch, longest].
    """
    longest = max(len(row["input_ids"]) for row in rows)
    ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for index, row in enumerate(rows):
        length = len(row["input_ids"])
        ids[index, :length] = torch.tensor(row["input_ids"])
        labels[index, :length] = torch.tensor(row["labels"])
        mask[index, :length] = 1
    return {"attention_mask": mask, "input_ids": ids, "labels": labels}


def packing_collator() -> DataCollatorWithFlattening:
    """transformers' padding-free collator: a batch becomes one row [1, tokens] with position ids that
    restart at each sample and no attention mask, from which the attention builds a block-diagonal mask.

    Each sample's first label becomes IGNORE_INDEX: alone it is never a target either (position t
    predicts token t+1), so every sample's loss is exactly its loss alone.
    """
    return DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE_INDEX)


def training_collator(model: torch.nn.Module, data: DataConfig, pad_id: int) -> Callable:
    """The training batches' collator: padding-free packing, checked exact on `model`; else right padding."""
    if not data.packing:
        return partial(collate, pad_token_id=pad_id)
    check_packing_exact(model)
    return packing_collator()


def check_packing_exact(model: torch.nn.Module) -> None:
    """Refuse `data.packing` where the model lets a packed sample attend to the samples before it in its row
    (OPT, BLOOM, MPT, state-space models ignore the restarting position ids): a probe packs one sample
    behind two different ones, which must leave its logits unchanged.

    Raises:
        UserError: naming the model type and the fix.
    """
    vocab = model.get_input_embeddings().num_embeddings
    first, other, probe = ([(7 * i + shift) % vocab for i in range(6)] for shift in (1, 2, 3))
    collator = packing_collator()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = []
        for before in (first, other):
            batch = collator([{"input_ids": before, "labels": before}, {"input_ids": probe, "labels": probe}])
            inputs = {key: value.to(model.device) for key, value in batch.items() if key != "labels"}
            logits.append(model(**inputs, use_cache=False).logits[0, len(before) :].float())
    model.train(was_training)
    if not torch.allclose(*logits, atol=1e-3, rtol=1e-3):
        raise UserError(
            f"data.packing: {model.config.model_type} models let a packed sample attend to the samples "
            "before it in its row (its logits change with them), so every loss and gradient would be wrong; "
            "set data.packing=false"
        )


def pad_token_id(tokenizer: Any) -> int:
    """The padding id: the tokenizer's pad token, else its EOS (padding is masked out either way)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise UserError("the tokenizer has neither a pad nor an EOS token; add one to tokenizer_config.json")


def _encode_record(
    record: dict[str, Any],
    index: int,
    data_format: DataFormat,
    tokenizer: Any,
    response_only: bool,
    max_seq_len: int,
    path: str,
    origin: str,
    version: int = TOKENIZATION_VERSION,
) -> dict[str, Any]:
    """One record to input_ids and labels (`datasets.map`'s function); `index` is its place among the
    records mapped, its number in `path` unless `samples` drew it. `version` is unused but part of
    datasets' cache key, which names this function without its code: samples an earlier encoding cached
    would be read back."""
    where = f"{path} record {record.get(RECORD_COLUMN, index)}"
    sample = render(record, data_format, tokenizer, response_only, where, origin)
    return _encode(sample.segments, tokenizer, max_seq_len)


def _encode(segments: list[tuple[str, bool]], tokenizer: Any, max_seq_len: int) -> dict[str, Any]:
    ids: list[int] = []
    labels: list[int] = []
    previous = ""  # the text before a segment (its last CONTEXT_CHARS): the context it is tokenized in
    for text, trained in segments:
        piece = _segment_ids(text, previous, tokenizer, first=not ids)
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
        previous = (previous + text)[-CONTEXT_CHARS:]
    return {"input_ids": ids[:max_seq_len], "labels": labels[:max_seq_len], "cut": len(ids) > max_seq_len}


def _segment_ids(text: str, previous: str, tokenizer: Any, first: bool) -> list[int]:
    """A segment's tokens as the whole text tokenizes them: after the text before it, not alone, since a
    SentencePiece (Metaspace) tokenizer would start every segment with a space token ("▁") that the whole
    text does not have. Where a token spans the boundary, the segment's own tokens (as at generation,
    where the prompt is tokenized alone). Only the very first segment gets the tokenizer's specials (BOS)."""
    if first:
        return prompt_ids(text, tokenizer)  # with the tokenizer's specials (BOS), as generation's prompt
    if not previous:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    context = tokenizer(previous, add_special_tokens=False)["input_ids"]
    joined = tokenizer(previous + text, add_special_tokens=False)["input_ids"]
    if joined[: len(context)] == context:
        return joined[len(context) :]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _has_target(labels: list[int]) -> bool:
    """A label the loss sees: the first token is never one (nothing before it predicts it)."""
    return any(label != IGNORE_INDEX for label in labels[1:])


def _check_kept(
    kept: int, dropped: int, max_seq_len: int, length_setting: str, use: str, context: int | None = None
) -> None:
    """Refuse data with nothing left to `use` (train on, or score) in one line, else say what was dropped.

    Raising `max_seq_len` is advised only as far as the model's `context` allows (None: not known).
    """
    if not kept:
        raising = _raising(length_setting, max_seq_len, context)
        if raising:
            remedy = f"; {raising}"
        else:
            remedy = (
                f" tokens, the model's whole context (max_position_embeddings): this model cannot {use} "
                "these samples; shorten their prompts"
            )
        raise UserError(
            f"no sample has a response token to {use} within max_seq_len={max_seq_len}{remedy}, or check "
            "the data for empty records"
        )
    if dropped:
        log.warning(
            "dropped %d of %d samples with no response token to %s within max_seq_len=%d (empty, or cut off)",
            dropped, kept + dropped, use, max_seq_len,
        )  # fmt: skip


def _raising(length_setting: str, max_seq_len: int, context: int | None) -> str | None:
    """The advice to raise `max_seq_len`, as far as the model's `context` allows; None at the context."""
    if context is not None and max_seq_len >= context:
        return None
    return f"raise {length_setting}" + (f" (up to {context}, the model's context)" if context else "")
