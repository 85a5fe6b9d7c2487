"""Training data: local dataset files in four formats, chat templates, response-only loss masks, packing.

A record becomes a list of (text, trained) segments; segments are tokenized one by one so the loss mask
is exact at token level. Samples whose response falls entirely beyond `max_seq_len` are dropped and
counted, never trained on with an empty mask (REFERENCE.md §5).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qpissa import UserError
from qpissa.artifacts import read_text
from qpissa.recipe import DataConfig
from qpissa.settings import DataFormat

log = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the loss skips (transformers' convention)
_LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
REQUIRED_FIELDS = {
    DataFormat.ALPACA: ("instruction", "output"),
    DataFormat.MESSAGES: ("messages",),
    DataFormat.PROMPT_COMPLETION: ("prompt", "completion"),
    DataFormat.TEXT: ("text",),
}


@dataclass
class Sample:
    """One rendered record: prompt and response text, plus the reference answer for exact match."""

    segments: list[tuple[str, bool]]  # (text, trained) in order
    prompt: str  # everything before the last response (what generation starts from)
    response: str  # the last response, without EOS


@dataclass
class TokenizedData:
    """Token sequences ready for the trainer, and what was dropped on the way."""

    rows: list[dict[str, list[int]]]  # input_ids, labels
    dropped: int  # samples whose response was cut entirely by max_seq_len


def read_records(path: Path, data_format: DataFormat) -> list[dict[str, Any]]:
    """Read a local dataset file or `save_to_disk` directory and check every record's fields.

    Raises:
        UserError: missing or unreadable file, unknown extension, or a record without a required field.
    """
    records = _load_dataset(path).to_list()
    for index, record in enumerate(records):
        _check_record(record, data_format, f"{path} record {index}")
    if not records:
        raise UserError(f"dataset {path} is empty")
    return records


def detect_format(path: Path) -> DataFormat:
    """The record format of a dataset, from its first record's fields (the first format that fits).

    Raises:
        UserError: the dataset cannot be read, or its fields fit no format (listing what each needs).
    """
    dataset = _load_dataset(path)
    fields = set(dataset.column_names)
    for data_format, required in REQUIRED_FIELDS.items():
        if fields.issuperset(required):
            return data_format
    known = "; ".join(f"{f.value}: {', '.join(names)}" for f, names in REQUIRED_FIELDS.items())
    raise UserError(f"{path}: fields {', '.join(sorted(fields))} fit no record format ({known})")


def _load_dataset(path: Path):
    """A local data file or `save_to_disk` directory as a `datasets.Dataset` (its train split)."""
    import datasets

    if not path.exists():
        raise UserError(f"dataset {path} does not exist; check the path")
    if path.is_file() and path.suffix.lower() in (".jsonl", ".json"):
        _check_json_file(path)
    if path.is_file() and path.stat().st_size == 0:
        raise UserError(f"dataset {path} is empty; it needs at least one record")
    try:
        if path.is_dir():
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if "train" not in dataset:
                    raise UserError(f"{path} holds splits {list(dataset)}; point at one split's directory")
                dataset = dataset["train"]
        else:
            loader = _LOADERS.get(path.suffix.lower())
            if loader is None:
                raise UserError(
                    f"{path}: unknown data file type {path.suffix!r}; use .jsonl, .json, .csv or .parquet"
                )
            dataset = datasets.load_dataset(loader, data_files=str(path), split="train")
    except UserError:
        raise
    except Exception as error:  # datasets wraps parse errors in several exception types
        cause = error.__cause__ or error
        reason = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
        if "corresponds to no data" in reason:
            raise UserError(f"dataset {path} has no records; it needs at least one") from None
        raise UserError(
            f"cannot read dataset {path} ({type(cause).__name__}: {reason}); check that it is a valid "
            f"{path.suffix.lstrip('.') or 'save_to_disk'} file"
        ) from None
    return dataset


def render(
    record: dict[str, Any], data_format: DataFormat, tokenizer: Any, response_only: bool = True
) -> Sample:
    """Turn one record into text segments, marking which ones the loss is computed on.

    `messages` use the tokenizer's chat template and train on every assistant turn; `alpaca` uses the
    chat template when the tokenizer has one; the EOS token ends every response so generation stops.
    """
    eos = tokenizer.eos_token or ""
    if data_format is DataFormat.TEXT:
        return Sample([(record["text"] + eos, True)], "", record["text"])
    if data_format is DataFormat.PROMPT_COMPLETION:
        prompt, response = record["prompt"], record["completion"]
        return Sample([(prompt, not response_only), (response + eos, True)], prompt, response)
    messages = record["messages"] if data_format is DataFormat.MESSAGES else _alpaca_messages(record)
    if data_format is DataFormat.ALPACA and not tokenizer.chat_template:
        prompt = f"### Instruction:\n{messages[0]['content']}\n\n### Response:\n"
        return Sample([(prompt, not response_only), (record["output"] + eos, True)], prompt, record["output"])
    return _render_chat(messages, tokenizer, response_only)


def tokenize(
    samples: list[Sample],
    tokenizer: Any,
    max_seq_len: int,
    packing: bool = False,
    length_setting: str = "`data.max_seq_len`",
) -> TokenizedData:
    """Tokenize rendered samples into input_ids and labels (IGNORE_INDEX where the loss is off).

    `length_setting` is how the user sets `max_seq_len` (`--max-seq-len` for `qpissa eval`), for messages.

    Raises:
        UserError: nothing is left to train on after dropping cut samples.
    """
    rows, dropped = [], 0
    for sample in samples:
        ids, labels = _tokenize_segments(sample.segments, tokenizer)
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if all(label == IGNORE_INDEX for label in labels):
            dropped += 1
            continue
        rows.append({"input_ids": ids, "labels": labels})
    if dropped:
        log.warning(
            "dropped %d of %d samples whose response lies beyond max_seq_len=%d",
            dropped,
            len(samples),
            max_seq_len,
        )
    if not rows:
        raise UserError(f"no sample has a response within max_seq_len={max_seq_len}; raise {length_setting}")
    if packing:
        rows = _pack(rows, max_seq_len)
    return TokenizedData(rows, dropped)


def load_split(
    path: Path, config: DataConfig, tokenizer: Any, length_setting: str = "`data.max_seq_len`"
) -> tuple[list[Sample], TokenizedData]:
    """Read, render and tokenize one data file with the settings of `config`."""
    records = read_records(path, config.format)
    samples = [render(record, config.format, tokenizer, config.response_only) for record in records]
    return samples, tokenize(samples, tokenizer, config.max_seq_len, config.packing, length_setting)


def check_tokenizer(tokenizer: Any, data_format: DataFormat) -> None:
    """Refuse a chat format on a tokenizer that has no chat template.

    Raises:
        UserError: format `messages` and no chat template.
    """
    if data_format is DataFormat.MESSAGES and not tokenizer.chat_template:
        raise UserError(
            "data.format is messages but the model's tokenizer has no chat template; "
            "use format prompt_completion or add chat_template.jinja to the model directory"
        )


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


def pad_token_id(tokenizer: Any) -> int:
    """The padding id: the tokenizer's pad token, else its EOS (padding is masked out either way)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id
    raise UserError("the tokenizer has neither a pad nor an EOS token; add one to tokenizer_config.json")


def _check_json_file(path: Path) -> None:
    """UTF-8, not empty, and (JSON Lines) every line a JSON object: datasets names neither line nor fix."""
    text = read_text(path, "dataset", "check the path")
    if not text.strip():
        raise UserError(f"dataset {path} is empty; it needs at least one record")
    if path.suffix.lower() != ".jsonl":
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(
                f"dataset {path} line {number} is not valid JSON ({error.msg}, column {error.colno}); "
                "fix or remove that line"
            ) from None
        if not isinstance(record, dict):
            raise UserError(f"dataset {path} line {number} is not a JSON object (one record per line)")


def _check_record(record: dict[str, Any], data_format: DataFormat, where: str) -> None:
    for name in REQUIRED_FIELDS[data_format]:
        if record.get(name) is None:
            raise UserError(
                f"{where}: missing field `{name}` "
                f"(format {data_format.value} needs {', '.join(REQUIRED_FIELDS[data_format])})"
            )
    if data_format is DataFormat.MESSAGES:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise UserError(f"{where}: `messages` must be a non-empty list of {{role, content}}")
        for turn, message in enumerate(messages):
            if (
                not isinstance(message, dict)
                or not isinstance(message.get("role"), str)
                or not isinstance(message.get("content"), str)
            ):
                raise UserError(f"{where}: messages[{turn}] needs string fields `role` and `content`")
        if messages[-1]["role"] != "assistant":
            raise UserError(
                f"{where}: the last message must have role assistant (it is what the model learns)"
            )
    else:
        for name in REQUIRED_FIELDS[data_format]:
            if not isinstance(record[name], str):
                raise UserError(f"{where}: field `{name}` must be text, got {type(record[name]).__name__}")


def _alpaca_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    instruction = record["instruction"]
    if record.get("input"):
        instruction = f"{instruction}\n\n{record['input']}"
    return [{"content": instruction, "role": "user"}, {"content": record["output"], "role": "assistant"}]


def _render_chat(messages: list[dict[str, str]], tokenizer: Any, response_only: bool) -> Sample:
    """Render with the chat template one turn at a time; each assistant turn is a trained segment."""
    segments: list[tuple[str, bool]] = []
    done = ""
    prompt = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True)
        after = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False)
        if not before.startswith(done) or not after.startswith(before):
            raise UserError(
                "the tokenizer's chat template does not render conversations incrementally; "
                "use format prompt_completion"
            )
        segments.append((before[len(done) :], not response_only))
        response = after[len(before) :]
        if tokenizer.eos_token and tokenizer.eos_token not in response:
            response += tokenizer.eos_token
        segments.append((response, True))
        done, prompt = after, before
    return Sample(segments, prompt, messages[-1]["content"])


def _tokenize_segments(segments: list[tuple[str, bool]], tokenizer: Any) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    for index, (text, trained) in enumerate(segments):
        # only the very first segment gets the tokenizer's own specials (BOS), as a whole text would
        piece = tokenizer(text, add_special_tokens=index == 0 and not _starts_with_bos(text, tokenizer))[
            "input_ids"
        ]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def _starts_with_bos(text: str, tokenizer: Any) -> bool:
    return bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)


def _pack(rows: list[dict[str, list[int]]], max_seq_len: int) -> list[dict[str, list[int]]]:
    """Concatenate rows and cut the stream into blocks of `max_seq_len` (the last one may be shorter)."""
    ids = [token for row in rows for token in row["input_ids"]]
    labels = [label for row in rows for label in row["labels"]]
    blocks = []
    for start in range(0, len(ids), max_seq_len):
        block_labels = labels[start : start + max_seq_len]
        if any(label != IGNORE_INDEX for label in block_labels):
            blocks.append({"input_ids": ids[start : start + max_seq_len], "labels": block_labels})
    return blocks
