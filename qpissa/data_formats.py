"""Record formats: which fields each needs, detecting the format, and rendering a record into segments.

A record becomes a list of (text, trained) segments; `data.py` tokenizes them one by one so that the
loss mask is exact at token level. Chat formats are rendered with the tokenizer's chat template one
assistant turn at a time, so the mask covers exactly the assistant's tokens (and its end-of-turn).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qpissa import UserError
from qpissa.chat_template import WHERE_TEMPLATES_COME_FROM, render_chat
from qpissa.chat_tools import (
    TOOL_KEYS,
    check_calls_rendered,
    check_tool_calls,
    check_tools_rendered,
    record_tools,
    sharegpt_call,
    without_nulls,
)
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
    "function_call": "assistant",  # LLaMA-Factory's tool call: its value is the call as JSON
    "observation": "tool",  # LLaMA-Factory's tool result
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
    response: str  # the last response, without EOS (a tool call as the template writes it)


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
        answers = [turn for turn in messages if turn["role"] == "assistant" and not turn.get("tool_calls")]
        empty = any(not turn["content"].strip() for turn in answers)
        return CheckedRecord(frozenset(message["role"] for message in messages), empty)
    for name in REQUIRED_FIELDS[data_format]:
        if not isinstance(record[name], str):
            raise UserError(f"{where}: field `{name}` must be text, got {type(record[name]).__name__}")
    if data_format is DataFormat.ALPACA:
        _alpaca_messages(record, where)
    field = RESPONSE_FIELDS.get(data_format)
    return CheckedRecord(frozenset(), field is not None and not record[field].strip())


def to_messages(record: dict[str, Any], data_format: DataFormat, where: str) -> list[dict[str, Any]]:
    """A chat record's turns as [{role, content, and any TOOL_KEYS}, ...] (ShareGPT's from/value mapped).

    Raises:
        UserError: a turn that is not a {role, content} (or {from, value}) pair of strings (content may be
            null beside tool calls), malformed tool calls, an unknown ShareGPT speaker, or a
            prompt-completion record whose completion has no assistant turn.
    """
    if data_format is DataFormat.SHAREGPT:
        turns = _list(record["conversations"], "conversations", where)
        messages = [_sharegpt_turn(turn, index, where) for index, turn in enumerate(turns)]
        system = _optional_text(record, "system", where)  # LLaMA-Factory's system column
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

    Chat formats use the tokenizer's chat template (with the record's `tools`) and train on every assistant
    turn, tool calls included (chat prompt-completion: on the completion's turns only, as TRL does);
    `alpaca` uses the chat template when the tokenizer has one; the EOS token ends every sample so generation
    stops (in a conversation the last turn; earlier turns end as the template renders them).
    """
    eos = tokenizer.eos_token or ""
    if data_format is DataFormat.TEXT:
        return Sample([(_ended(record["text"], eos), True)], "", record["text"])
    if data_format is DataFormat.PROMPT_COMPLETION:
        prompt, response = record["prompt"], record["completion"]
        answer = response.removesuffix(eos)  # what exact match compares: decoded text
        return Sample([(prompt, not response_only), (_ended(response, eos), True)], prompt, answer)
    if data_format is DataFormat.ALPACA:
        messages = _alpaca_messages(record, "record")
        if tokenizer.chat_template:
            return _render_chat(messages, None, tokenizer, response_only, 0)
        return _render_alpaca(messages, eos, response_only)
    messages = to_messages(record, data_format, "record")
    first_trained = len(record["prompt"]) if data_format is DataFormat.CHAT_PROMPT_COMPLETION else 0
    return _render_chat(messages, record_tools(record, "record"), tokenizer, response_only, first_trained)


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


def _list(value: Any, name: str, where: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: `{name}` must be a non-empty list of turns")
    return value


def _optional_text(record: dict[str, Any], name: str, where: str) -> str:
    value = record.get(name)
    if value is not None and not isinstance(value, str):
        raise UserError(f"{where}: field `{name}` must be text, got {type(value).__name__}")
    return value or ""


def _chat_turn(message: Any, name: str, where: str) -> dict[str, Any]:
    """A turn with the tool keys it has; a null one is left out, as `datasets` fills a key that other turns
    have with null and templates test whether it is defined."""
    fields = message if isinstance(message, dict) else {}
    turn = {key: fields[key] for key in TOOL_KEYS if fields.get(key) not in (None, [])}  # [] is no calls
    content = fields.get("content")
    if content is None and "tool_calls" in turn:
        content = ""  # OpenAI's null content beside tool calls; templates add content to text
    if not isinstance(fields.get("role"), str) or not isinstance(content, str):
        raise UserError(
            f"{where}: {name} needs string fields `role` and `content` (null content only with `tool_calls`)"
        )
    if "tool_calls" in turn:
        check_tool_calls(turn["tool_calls"], name, where)
        turn["tool_calls"] = without_nulls(turn["tool_calls"])
    return {**turn, "content": content, "role": fields["role"]}


def _sharegpt_turn(turn: Any, index: int, where: str) -> dict[str, Any]:
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
    if turn["from"].lower() == "function_call":
        return sharegpt_call(turn["value"], f"conversations[{index}]", where)
    return {"content": turn["value"], "role": role}


def _alpaca_messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    """LLaMA-Factory's alpaca: `system` a system turn, `history` [instruction, response] pairs the turns
    before; history responses are trained like the last one, as LLaMA-Factory does (mask_history=False)."""
    system = _optional_text(record, "system", where)
    history = record.get("history") or []
    if not isinstance(history, list) or not all(_is_pair(pair) for pair in history):
        raise UserError(f"{where}: `history` must be a list of [instruction, response] pairs of text")
    instruction = record["instruction"]
    if record.get("input"):
        instruction = f"{instruction}\n\n{record['input']}"
    messages = [{"content": system, "role": "system"}] if system else []
    for question, answer in [*history, (instruction, record["output"])]:
        messages += [{"content": question, "role": "user"}, {"content": answer, "role": "assistant"}]
    return messages


def _is_pair(pair: Any) -> bool:
    return isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(text, str) for text in pair)


def _render_alpaca(messages: list[dict[str, str]], eos: str, response_only: bool) -> Sample:
    """Alpaca's own prompt, for a tokenizer without a chat template; a system prompt stands first, where
    Alpaca's preamble does. It has no form for earlier turns, so `history` is refused."""
    system = messages[0]["content"] + "\n\n" if messages[0]["role"] == "system" else ""
    if len(messages) > 2 + bool(system):
        raise UserError(
            "an alpaca record has `history` (earlier turns), which only a chat template renders; give the "
            f"model one ({WHERE_TEMPLATES_COME_FROM}), or leave `history` out"
        )
    prompt = f"{system}### Instruction:\n{messages[-2]['content']}\n\n### Response:\n"
    output = messages[-1]["content"]
    answer = output.removesuffix(eos)  # what exact match compares: decoded text
    return Sample([(prompt, not response_only), (_ended(output, eos), True)], prompt, answer)


def _render_chat(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    tokenizer: Any,
    response_only: bool,
    first_trained: int,
) -> Sample:
    """Render with the chat template one turn at a time; each assistant turn from `first_trained` on is a
    trained segment (earlier ones are context)."""
    segments: list[tuple[str, bool]] = []
    done = ""
    prompt = ""
    answer = messages[-1]["content"]
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or index < first_trained:
            continue
        before = render_chat(tokenizer, messages[:index], add_generation_prompt=True, tools=tools)
        after = render_chat(tokenizer, messages[: index + 1], tools=tools)
        if not before.startswith(done) or not after.startswith(before):
            raise UserError(
                "the tokenizer's chat template does not render conversations incrementally; "
                "use format prompt_completion"
            )
        segments.append((before[len(done) :], not response_only))
        response = after[len(before) :]
        _check_rendered_turn(message, response, tokenizer.eos_token or "")
        check_calls_rendered(message, response)
        answer = (
            _written_call(response, tokenizer.eos_token) if message.get("tool_calls") else message["content"]
        )
        if index == len(messages) - 1 and tokenizer.eos_token and tokenizer.eos_token not in response:
            response += tokenizer.eos_token  # earlier turns: the history `chat` renders, without it
        segments.append((response, True))
        done, prompt = after, before
    if tools:
        check_tools_rendered(tools, done, render_chat(tokenizer, messages))
    return Sample(segments, prompt, answer)


def _ended(text: str, eos: str) -> str:
    """`text` ending with the EOS token (once, also where the data already writes it)."""
    return text if text.endswith(eos) else text + eos


def _written_call(response: str, eos: str | None) -> str:
    """A tool-calling turn as the template writes it, up to the end of the turn: what exact match compares."""
    return (response.split(eos)[0] if eos else response).strip()


def _check_rendered_turn(message: dict[str, Any], response: str, eos: str) -> None:
    """The template rendered the assistant turn's text: trained without it, the model would learn only to
    end its turn."""
    if message["content"].strip() and not response.replace(eos, "").strip():
        raise UserError(
            f"the chat template renders the assistant's turn without its text (it rendered {response!r} "
            f"for {message['content'][:40]!r}), so training would learn only the end of turn; fix the "
            "template, or write the records as prompt_completion"
        )
