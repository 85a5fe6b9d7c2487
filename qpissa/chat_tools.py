"""Tool use in chat data: the function schemas a record shows the model (`tools`), the calls its assistant
turns make (`tool_calls`, OpenAI's shape, which chat templates read), LLaMA-Factory's ShareGPT form of
them, and the checks that a chat template renders both (else training would teach calls never shown)."""

from __future__ import annotations

import json
from typing import Any

from qpissa import UserError
from qpissa.chat_template import WHERE_TEMPLATES_COME_FROM

# what chat templates read from a turn for tool use besides role and content (OpenAI's, transformers' names)
TOOL_KEYS = ("tool_calls", "tool_call_id", "name")


def record_tools(record: dict[str, Any], where: str) -> list[dict[str, Any]] | None:
    """A chat record's `tools`: the function schemas its template shows the model, as a list or as JSON
    text of one (LLaMA-Factory writes them so)."""
    tools = record.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools) if tools.strip() else None
        except json.JSONDecodeError:
            tools = "not JSON"  # refused below, as any other non-list
    if tools is not None and not (isinstance(tools, list) and all(function_name(t) for t in tools)):
        raise UserError(
            f"{where}: `tools` must be a list of function schemas, each with a `name` (or JSON text of one)"
        )
    return without_nulls(tools) or None


def without_nulls(value: Any) -> Any:
    """`value` without null entries in its mappings, at any depth. Parquet, Arrow and `save_to_disk` data
    give every record's schemas and call arguments the keys other records have, as null: rendered, they
    would show parameters a function lacks and train calls that pass them. A file cannot tell those from
    nulls written on purpose, so every source drops them alike (as TRL does)."""
    if isinstance(value, dict):
        return {key: without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [without_nulls(item) for item in value]
    return value


def check_tool_calls(calls: Any, name: str, where: str) -> None:
    if not isinstance(calls, list) or not calls or not all(function_name(call) for call in calls):
        raise UserError(
            f"{where}: {name}'s `tool_calls` must be a list of calls, each with a function `name` "
            '({"type": "function", "function": {"name": ..., "arguments": {...}}})'
        )


def function_name(entry: Any) -> str | None:
    """The function a tool call or tool schema names: OpenAI's {"function": {"name"}} or a bare {"name"}."""
    function = entry.get("function", entry) if isinstance(entry, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    return name if isinstance(name, str) and name else None


def sharegpt_call(value: str, name: str, where: str) -> dict[str, Any]:
    """LLaMA-Factory's function_call turn, whose value is a call {"name", "arguments"} (or a list of them)
    as JSON, as an assistant turn with OpenAI's tool_calls."""
    try:
        calls = json.loads(value)
    except json.JSONDecodeError:
        calls = None
    calls = calls if isinstance(calls, list) else [calls]
    if not all(function_name(call) for call in calls):
        raise UserError(
            f'{where}: {name} is a function_call, whose value is the call as JSON ({{"name": ..., '
            '"arguments": {...}}) or a list of them'
        )
    return {
        "content": "",
        "role": "assistant",
        "tool_calls": [{"function": c, "type": "function"} for c in calls],
    }


def check_calls_rendered(message: dict[str, Any], response: str, where: str, origin: str) -> None:
    """The template rendered the assistant turn's tool calls: trained without them, the model would learn
    to end its turn in their place (`where`: the record, `origin`: whose template, for the message)."""
    missing = [name for name in map(function_name, message.get("tool_calls", [])) if name not in response]
    if missing:
        raise UserError(
            f"{where}: {origin} renders no tool calls (the record's call to {missing[0]!r} is missing from "
            f"the rendered turn {response[:60]!r}); use a chat template that renders them "
            f"({WHERE_TEMPLATES_COME_FROM}), or leave the tool calls out of the data"
        )


def check_tools_rendered(
    tools: list[dict[str, Any]], with_tools: str, without_tools: str, where: str, origin: str
) -> None:
    """The template showed the record's `tools`: else the model would learn to call functions it is never
    shown."""
    if with_tools == without_tools:
        raise UserError(
            f"{where}: {origin} ignores the record's `tools` ({function_name(tools[0])!r}...), so the model "
            "would learn to call functions it is never shown; use a chat template that renders "
            f"tools ({WHERE_TEMPLATES_COME_FROM}), or leave `tools` out of the data"
        )
