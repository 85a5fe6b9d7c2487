"""Record formats: which fields each needs, detecting the format, and rendering a record into segments.

A record becomes a list of (text, trained) segments; `data.py` tokenizes them one by one so that the
loss mask is exact at token level. Chat formats are rendered with the tokenizer's chat template one
assistant turn at a time (`chat_render`), so the mask covers exactly the assistant's tokens (and its
end-of-turn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qpissa import UserError
from qpissa.chat_render import Sample, render_conversation
from qpissa.chat_template import WHERE_TEMPLATES_COME_FROM
from qpissa.chat_tools import record_tools
from qpissa.chat_turns import is_trained, optional_text, to_messages
from qpissa.settings import DataFormat

# fields each format needs; detection tries them in this order and takes the first that fits
REQUIRED_FIELDS = {
    DataFormat.MESSAGES: ("messages",),
    DataFormat.SHAREGPT: ("conversations",),
    DataFormat.CHAT_PROMPT_COMPLETION: ("prompt", "completion"),
    DataFormat.PROMPT_COMPLETION: ("prompt", "completion"),
    DataFormat.ALPACA: ("instruction", "output"),
    DataFormat.TEXT: ("text",),
}
# the answer of the formats without turns, for the empty-answer count (an empty text has none: it is
# dropped with nothing to train, `render`)
RESPONSE_FIELDS = {DataFormat.PROMPT_COMPLETION: "completion", DataFormat.ALPACA: "output"}
# the roles today's chat templates know; any other is rendered as given and never trained on, so it is
# named in a warning (not refused: a template may define roles of its own)
KNOWN_ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "ipython", "function"})
CHAT_FORMATS = (DataFormat.MESSAGES, DataFormat.SHAREGPT, DataFormat.CHAT_PROMPT_COMPLETION)


def detect_format(
    record: dict[str, Any], where: str, format_setting: str | None = "data.format"
) -> DataFormat:
    """The record format that fits a record's fields (the first one in REQUIRED_FIELDS' order).

    `format_setting` names the option that chooses a format, for the message (None: there is none).

    Raises:
        UserError: the fields fit no format (listing what each needs).
    """
    for data_format, required in REQUIRED_FIELDS.items():
        if all(record.get(name) is not None for name in required):
            chat = isinstance(record.get("prompt"), list)
            if data_format is DataFormat.CHAT_PROMPT_COMPLETION and not chat:
                continue
            return data_format
    # the fields of a format, one of them null (datasets also fills a field a record lacks with null)
    for required in REQUIRED_FIELDS.values():
        nulls = [name for name in required if name in record and record[name] is None]
        if nulls and all(name in record for name in required):
            raise UserError(
                f"{where}: field `{nulls[0]}` is missing or null; fill it in, or remove the record"
            )
    known = "; ".join(f"{f.value}: {', '.join(names)}" for f, names in REQUIRED_FIELDS.items())
    fields = ", ".join(sorted(record)) or "none"
    # no setting maps other field names, so choosing a format alone cannot help
    choosing = f"; {format_setting} chooses a format but does not rename fields" if format_setting else ""
    raise UserError(
        f"{where}: fields {fields} fit no record format; write the records in one of these formats, with its "
        f"field names ({known}){choosing}"
    )


@dataclass(frozen=True)
class CheckedRecord:
    """What reading a record learnt besides its validity.

    Attributes:
        roles: the chat roles its turns use (none for the formats without turns).
        empty_answer: an assistant turn, `completion` or `output` is blank; trained, such a record teaches
            the model to answer nothing, as only the end of turn is left to learn.
    """

    roles: frozenset[str]
    empty_answer: bool


def check_record(record: dict[str, Any], data_format: DataFormat, where: str) -> CheckedRecord:
    """A record has every field its format needs, with the right types.

    Raises:
        UserError: naming the record, the field and what the format needs.
    """
    for name in REQUIRED_FIELDS[data_format]:
        if record.get(name) is None:  # lacking, or null: datasets fills a field others have with null
            raise UserError(
                f"{where}: missing or null field `{name}` "
                f"(format {data_format.value} needs {', '.join(REQUIRED_FIELDS[data_format])})"
            )
    if data_format in CHAT_FORMATS:
        messages = to_messages(record, data_format, where)
        record_tools(record, where)
        if messages[-1]["role"] != "assistant":
            raise UserError(
                f"{where}: the last turn must be the assistant's (it is what the model learns), not "
                f"{messages[-1]['role']!r}'s; end each conversation with the assistant's answer"
            )
        if messages[0]["role"] == "assistant":  # a chat template renders no prompt before it
            raise UserError(
                f"{where}: the conversation opens with the assistant's turn; add the user's turn (or a "
                "system prompt) it answers before it"
            )
        trained = [turn for turn in messages[_first_trained(record, data_format) :] if is_trained(turn)]
        if not trained:
            raise UserError(
                f"{where}: every assistant turn to learn has weight 0, so the record trains nothing; give "
                "one weight 1 (or no weight), or remove the record"
            )
        empty = any(not turn["content"].strip() for turn in trained if not turn.get("tool_calls"))
        return CheckedRecord(frozenset(message["role"] for message in messages), empty)
    for name in REQUIRED_FIELDS[data_format]:
        if not isinstance(record[name], str):
            raise UserError(f"{where}: field `{name}` must be text, got {type(record[name]).__name__}")
    if data_format is DataFormat.ALPACA:
        _alpaca_messages(record, where)
    field = RESPONSE_FIELDS.get(data_format)
    return CheckedRecord(frozenset(), field is not None and not record[field].strip())


def render(
    record: dict[str, Any],
    data_format: DataFormat,
    tokenizer: Any,
    response_only: bool = True,
    where: str = "a record",
    origin: str = "the chat template",
) -> Sample:
    """Turn one record into text segments, marking which ones the loss is computed on.

    Chat formats use the tokenizer's chat template (with the record's `tools`) and train on every assistant
    turn, tool calls included (chat prompt-completion: on the completion's turns only, as TRL does), but
    those the data marks `weight` 0; `alpaca` uses the chat template when the tokenizer has one; the EOS
    token ends every sample so generation stops (in a conversation the last turn; earlier turns end as the
    template renders them). An empty `text` has nothing to train: no segment, so it is dropped.

    Args:
        where: the record (`FILE record N`); origin: whose chat template the tokenizer has; for messages.

    Raises:
        UserError: the chat template fails on the record or renders it unfit for training (`chat_render`),
            or an alpaca record has `history` and there is no chat template.
    """
    eos = tokenizer.eos_token or ""
    if data_format is DataFormat.TEXT:
        text = record["text"]
        return Sample([(_ended(text, eos), True)] if text.strip() else [], "", text)
    if data_format is DataFormat.PROMPT_COMPLETION:
        prompt, response = record["prompt"], record["completion"]
        answer = response.removesuffix(eos)  # what exact match compares: decoded text
        return Sample([(prompt, not response_only), (_ended(response, eos), True)], prompt, answer)
    if data_format is DataFormat.ALPACA:
        messages = _alpaca_messages(record, where)
        if tokenizer.chat_template:
            return render_conversation(messages, None, tokenizer, response_only, 0, where, origin)
        return _render_alpaca(messages, eos, response_only, where)
    messages = to_messages(record, data_format, where)
    tools = record_tools(record, where)
    first = _first_trained(record, data_format)
    return render_conversation(messages, tools, tokenizer, response_only, first, where, origin)


def check_tokenizer(tokenizer: Any, data_format: DataFormat) -> None:
    """Refuse a chat format on a tokenizer that has no chat template.

    Raises:
        UserError: a chat format and no chat template.
    """
    if data_format in CHAT_FORMATS and not tokenizer.chat_template:
        raise UserError(
            f"the data is in the chat format {data_format.value}, but the model's tokenizer has no chat "
            f"template; give it one ({WHERE_TEMPLATES_COME_FROM}), or write the records as prompt_completion"
        )


def _alpaca_messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    """LLaMA-Factory's alpaca: `system` a system turn, `history` [instruction, response] pairs the turns
    before; history responses are trained like the last one, as LLaMA-Factory does (mask_history=False)."""
    system = optional_text(record, "system", where)
    history = record.get("history") or []
    if not isinstance(history, list) or not all(_is_pair(pair) for pair in history):
        raise UserError(f"{where}: `history` must be a list of [instruction, response] pairs of text")
    instruction = record["instruction"]
    text = optional_text(record, "input", where)  # refused unless text: `0` or `[1, 2]` would read as text
    if text:
        instruction = f"{instruction}\n\n{text}"
    messages = [{"content": system, "role": "system"}] if system else []
    for question, answer in [*history, (instruction, record["output"])]:
        messages += [{"content": question, "role": "user"}, {"content": answer, "role": "assistant"}]
    return messages


def _is_pair(pair: Any) -> bool:
    return isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(text, str) for text in pair)


def _render_alpaca(messages: list[dict[str, str]], eos: str, response_only: bool, where: str) -> Sample:
    """Alpaca's own prompt, for a tokenizer without a chat template; a system prompt stands first, where
    Alpaca's preamble does. It has no form for earlier turns, so `history` is refused."""
    system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
    if len(messages) > 2 + bool(system):
        raise UserError(
            f"{where}: the alpaca record has `history` (earlier turns), which only a chat template renders, "
            f"and the model's tokenizer has none; give it one ({WHERE_TEMPLATES_COME_FROM}), or leave "
            "`history` out"
        )
    prompt = f"{system}### Instruction:\n{messages[-2]['content']}\n\n### Response:\n"
    output = messages[-1]["content"]
    answer = output.removesuffix(eos)  # what exact match compares: decoded text
    return Sample([(prompt, not response_only), (_ended(output, eos), True)], prompt, answer)


def _ended(text: str, eos: str) -> str:
    """`text` ending with the EOS token (once, also where the data already writes it)."""
    return text if text.endswith(eos) else text + eos


def _first_trained(record: dict[str, Any], data_format: DataFormat) -> int:
    """The first turn a record may train: a chat prompt-completion's prompt is context alone, as in TRL."""
    return len(record["prompt"]) if data_format is DataFormat.CHAT_PROMPT_COMPLETION else 0
