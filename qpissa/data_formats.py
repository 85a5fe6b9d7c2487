"""Record formats: which fields each needs, detecting the format, and rendering a record into segments.

A record becomes a list of (text, trained) segments; `data.py` tokenizes them one by one so that the
loss mask is exact at token level. Chat formats are rendered with the tokenizer's chat template one
assistant turn at a time, so the mask covers exactly the assistant's tokens (and its end-of-turn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qpissa import UserError
from qpissa.chat_template import render_chat
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
# the trained text of the formats without turns, for the empty-answer count
RESPONSE_FIELDS = {
    DataFormat.PROMPT_COMPLETION: "completion",
    DataFormat.ALPACA: "output",
    DataFormat.TEXT: "text",
}
# ShareGPT speaker names (`from`) as chat roles: the original's and the variants seen in the wild
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}
# the roles today's chat templates know; any other is rendered as given and never trained on, so it is
# named in a warning (not refused: a template may define roles of its own)
KNOWN_ROLES = frozenset({"system", "user", "assistant", "tool", "developer", "ipython", "function"})
CHAT_FORMATS = (DataFormat.MESSAGES, DataFormat.SHAREGPT, DataFormat.CHAT_PROMPT_COMPLETION)


@dataclass
class Sample:
    """One rendered record: prompt and response text, plus the reference answer for exact match."""

    segments: list[tuple[str, bool]]  # (text, trained) in order
    prompt: str  # everything before the last response (what generation starts from)
    response: str  # the last response, without EOS


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
    fix = f"set {format_setting}" if format_setting else "write the records in one of these formats"
    raise UserError(f"{where}: fields {fields} fit no record format ({known}); {fix}")


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
        empty = any(turn["role"] == "assistant" and not turn["content"].strip() for turn in messages)
        return CheckedRecord(frozenset(message["role"] for message in messages), empty)
    for name in REQUIRED_FIELDS[data_format]:
        if not isinstance(record[name], str):
            raise UserError(f"{where}: field `{name}` must be text, got {type(record[name]).__name__}")
    field = RESPONSE_FIELDS.get(data_format)
    return CheckedRecord(frozenset(), field is not None and not record[field].strip())


def to_messages(record: dict[str, Any], data_format: DataFormat, where: str) -> list[dict[str, str]]:
    """A chat record's turns as [{role, content}, ...] (ShareGPT's from/value mapped to roles).

    Raises:
        UserError: a turn that is not a {role, content} (or {from, value}) pair of strings, an unknown
            ShareGPT speaker, or a prompt-completion record whose completion has no assistant turn.
    """
    if data_format is DataFormat.SHAREGPT:
        turns = _list(record["conversations"], "conversations", where)
        messages = [_sharegpt_turn(turn, index, where) for index, turn in enumerate(turns)]
        system = record.get("system")  # LLaMA-Factory's system column
        if system is not None and not isinstance(system, str):
            raise UserError(f"{where}: field `system` must be text, got {type(system).__name__}")
        if system:
            messages.insert(0, {"content": system, "role": "system"})
        return messages
    if data_format is DataFormat.CHAT_PROMPT_COMPLETION:
        prompt = _list(record["prompt"], "prompt", where)
        completion = _list(record["completion"], "completion", where)
        messages = [_chat_turn(m, f"prompt[{i}]", where) for i, m in enumerate(prompt)]
        messages += [_chat_turn(m, f"completion[{i}]", where) for i, m in enumerate(completion)]
        if not any(m["role"] == "assistant" for m in messages[len(prompt) :]):
            raise UserError(f"{where}: `completion` needs an assistant turn (it is what the model learns)")
        return messages
    turns = _list(record["messages"], "messages", where)
    return [_chat_turn(m, f"messages[{i}]", where) for i, m in enumerate(turns)]


def render(
    record: dict[str, Any], data_format: DataFormat, tokenizer: Any, response_only: bool = True
) -> Sample:
    """Turn one record into text segments, marking which ones the loss is computed on.

    Chat formats use the tokenizer's chat template and train on every assistant turn (chat
    prompt-completion: on the completion's turns only, as TRL does); `alpaca` uses the chat template
    when the tokenizer has one; the EOS token ends every response so generation stops.
    """
    eos = tokenizer.eos_token or ""
    if data_format is DataFormat.TEXT:
        return Sample([(record["text"] + eos, True)], "", record["text"])
    if data_format is DataFormat.PROMPT_COMPLETION:
        prompt, response = record["prompt"], record["completion"]
        return Sample([(prompt, not response_only), (response + eos, True)], prompt, response)
    if data_format is DataFormat.ALPACA:
        messages = _alpaca_messages(record)
        if not tokenizer.chat_template:
            prompt = f"### Instruction:\n{messages[0]['content']}\n\n### Response:\n"
            output = record["output"]
            return Sample([(prompt, not response_only), (output + eos, True)], prompt, output)
        return _render_chat(messages, tokenizer, response_only, 0)
    messages = to_messages(record, data_format, "record")
    first_trained = len(record["prompt"]) if data_format is DataFormat.CHAT_PROMPT_COMPLETION else 0
    return _render_chat(messages, tokenizer, response_only, first_trained)


def check_tokenizer(tokenizer: Any, data_format: DataFormat) -> None:
    """Refuse a chat format on a tokenizer that has no chat template.

    Raises:
        UserError: a chat format and no chat template.
    """
    if data_format in CHAT_FORMATS and not tokenizer.chat_template:
        raise UserError(
            f"the data is in the chat format {data_format.value}, but the model's tokenizer has no chat "
            "template; give it one (train: the recipe's chat_template, a .jinja file or the template itself; "
            "eval, convert --calib: a chat_template.jinja in the model's directory), or write the records as "
            "prompt_completion"
        )


def _list(value: Any, name: str, where: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: `{name}` must be a non-empty list of turns")
    return value


def _chat_turn(message: Any, name: str, where: str) -> dict[str, str]:
    if (
        not isinstance(message, dict)
        or not isinstance(message.get("role"), str)
        or not isinstance(message.get("content"), str)
    ):
        raise UserError(f"{where}: {name} needs string fields `role` and `content`")
    return {"content": message["content"], "role": message["role"]}


def _sharegpt_turn(turn: Any, index: int, where: str) -> dict[str, str]:
    if (
        not isinstance(turn, dict)
        or not isinstance(turn.get("from"), str)
        or not isinstance(turn.get("value"), str)
    ):
        raise UserError(f"{where}: conversations[{index}] needs string fields `from` and `value`")
    role = SHAREGPT_ROLES.get(turn["from"].lower())
    if role is None:
        known = ", ".join(SHAREGPT_ROLES)
        raise UserError(f"{where}: conversations[{index}] is from {turn['from']!r}; known speakers: {known}")
    return {"content": turn["value"], "role": role}


def _alpaca_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    instruction = record["instruction"]
    if record.get("input"):
        instruction = f"{instruction}\n\n{record['input']}"
    return [{"content": instruction, "role": "user"}, {"content": record["output"], "role": "assistant"}]


def _render_chat(
    messages: list[dict[str, str]], tokenizer: Any, response_only: bool, first_trained: int
) -> Sample:
    """Render with the chat template one turn at a time; each assistant turn from `first_trained` on is a
    trained segment (earlier ones are context)."""
    segments: list[tuple[str, bool]] = []
    done = ""
    prompt = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or index < first_trained:
            continue
        before = render_chat(tokenizer, messages[:index], add_generation_prompt=True)
        after = render_chat(tokenizer, messages[: index + 1])
        if not before.startswith(done) or not after.startswith(before):
            raise UserError(
                "the tokenizer's chat template does not render conversations incrementally; "
                "use format prompt_completion"
            )
        segments.append((before[len(done) :], not response_only))
        response = after[len(before) :]
        if message["content"].strip() and not response.replace(tokenizer.eos_token or "", "").strip():
            raise UserError(
                f"the chat template renders the assistant's turn without its text (it rendered {response!r} "
                f"for {message['content'][:40]!r}), so training would learn only the end of turn; fix the "
                "template, or write the records as prompt_completion"
            )
        if tokenizer.eos_token and tokenizer.eos_token not in response:
            response += tokenizer.eos_token
        segments.append((response, True))
        done, prompt = after, before
    return Sample(segments, prompt, messages[-1]["content"])
