"""A chat record's turns as chat templates read them: `messages`, ShareGPT's from/value, TRL's prompt and
completion; OpenAI's text content parts joined into text, and Axolotl's per-turn `weight` kept, so that a
turn the data marks 0 is rendered as context and never trained."""

from __future__ import annotations

from typing import Any

from qpissa import UserError
from qpissa.chat_tools import TOOL_KEYS, check_tool_calls, sharegpt_call, without_nulls
from qpissa.settings import DataFormat

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
WEIGHT = "weight"  # Axolotl's per-turn switch: 0 = this turn is not trained; kept only where it is 0
TEXT_PART = '{"type": "text", "text": ...}'  # OpenAI's text content part


def to_messages(record: dict[str, Any], data_format: DataFormat, where: str) -> list[dict[str, Any]]:
    """A chat record's turns as [{role, content, and any TOOL_KEYS}, ...] (ShareGPT's from/value mapped;
    `weight` where a turn's is 0).

    Raises:
        UserError: a turn that is not a {role, content} (or {from, value}) pair of strings (content may be
            null beside tool calls, or a list of text parts), malformed tool calls, a `weight` other than
            0 or 1 (1 only on an assistant turn), an unknown ShareGPT speaker, or a prompt-completion
            record whose completion has no assistant turn.
    """
    if data_format is DataFormat.SHAREGPT:
        turns = _list(record["conversations"], "conversations", where)
        messages = [_sharegpt_turn(turn, index, where) for index, turn in enumerate(turns)]
        system = optional_text(record, "system", where)  # LLaMA-Factory's system column
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


def is_trained(message: dict[str, Any]) -> bool:
    """An assistant turn the data does not mark `weight` 0."""
    return message["role"] == "assistant" and message.get(WEIGHT) != 0


def optional_text(record: dict[str, Any], name: str, where: str) -> str:
    """A field that may be missing or null, else text ("" for missing)."""
    value = record.get(name)
    if value is not None and not isinstance(value, str):
        raise UserError(f"{where}: field `{name}` must be text, got {type(value).__name__}")
    return value or ""


def _list(value: Any, name: str, where: str) -> list[Any]:
    if not isinstance(value, list) or not value:
        raise UserError(f"{where}: `{name}` must be a non-empty list of turns")
    return value


def _chat_turn(message: Any, name: str, where: str) -> dict[str, Any]:
    """A turn with the tool keys it has; a null one is left out, as `datasets` fills a key that other turns
    have with null and templates test whether it is defined."""
    fields = message if isinstance(message, dict) else {}
    turn = {key: fields[key] for key in TOOL_KEYS if fields.get(key) not in (None, [])}  # [] is no calls
    content = _joined_parts(fields.get("content"), name, where)
    if content is None and "tool_calls" in turn:
        content = ""  # OpenAI's null content beside tool calls; templates add content to text
    if not isinstance(fields.get("role"), str) or not isinstance(content, str):
        raise UserError(
            f"{where}: {name} needs string fields `role` and `content`, or content as a list of text parts "
            f"{TEXT_PART} (null content only with `tool_calls`)"
        )
    if "tool_calls" in turn:
        check_tool_calls(turn["tool_calls"], name, where)
        turn["tool_calls"] = without_nulls(turn["tool_calls"])
    weight = _weight(fields.get(WEIGHT), fields["role"], name, where)
    return {**turn, **weight, "content": content, "role": fields["role"]}


def _sharegpt_turn(turn: Any, index: int, where: str) -> dict[str, Any]:
    name = f"conversations[{index}]"
    if (
        not isinstance(turn, dict)
        or not isinstance(turn.get("from"), str)
        or not isinstance(turn.get("value"), str)
    ):
        raise UserError(f"{where}: {name} needs string fields `from` and `value`")
    role = SHAREGPT_ROLES.get(turn["from"].lower())
    if role is None:
        known = ", ".join(SHAREGPT_ROLES)
        raise UserError(f"{where}: {name} is from {turn['from']!r}; known speakers: {known}")
    weight = _weight(turn.get(WEIGHT), role, name, where)  # Axolotl's ShareGPT turns carry it
    if turn["from"].lower() == "function_call":
        return {**sharegpt_call(turn["value"], name, where), **weight}
    return {**weight, "content": turn["value"], "role": role}


def _joined_parts(content: Any, name: str, where: str) -> Any:
    """OpenAI's content parts as one text, joined as chat templates that take parts join them (Llama 4's,
    Mistral's, Gemma 3's: one after the other); other content as it is. Only text parts: qpissa trains
    text models, and an image dropped would leave the answer about it without its question."""
    if not isinstance(content, list):
        return content
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            continue
        found = f"of type {kind!r}" if kind not in (None, "text") else f"not a text part ({part!r:.40})"
        raise UserError(
            f"{where}: {name}'s content part {index} is {found}; only text parts ({TEXT_PART}) are "
            "trained: remove the record, or the parts that are not text"
        )
    return "".join(part["text"] for part in content)


def _weight(weight: Any, role: str, name: str, where: str) -> dict[str, int]:
    """Axolotl's `weight` of a turn, {WEIGHT: 0} where the turn is not to be trained, else {}."""
    if weight is None:  # also datasets' null, where other turns have one
        return {}
    if weight not in (0, 1):
        raise UserError(f"{where}: {name}'s `weight` is {weight!r}; write 0 (not trained) or 1 (trained)")
    if weight == 1 and role != "assistant":
        raise UserError(
            f"{where}: {name} is a {role!r} turn with weight 1, but only assistant turns are trained; write "
            "0, or leave `weight` out"
        )
    return {WEIGHT: 0} if weight == 0 else {}
