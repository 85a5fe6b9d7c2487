"""A run's own chat template: read from a file or given inline, saved with the run and its adapters so
that `chat`, `eval` and `export` render prompts exactly as training did."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qpissa import UserError
from qpissa.artifacts import read_text

TEMPLATE_NAME = "chat_template.jinja"  # transformers' own file name for a tokenizer's chat template
_JINJA_MARKS = ("{%", "{{")
# where each command takes a chat template from, for messages that ask for one
WHERE_TEMPLATES_COME_FROM = (
    "train: the recipe's chat_template, a .jinja file or the template itself; eval, convert --calib: a "
    f"{TEMPLATE_NAME} in the model's directory"
)


def resolve_chat_template(value: str) -> str:
    """The template text of `chat_template`: the file it names, or the value itself when it is Jinja.

    Raises:
        UserError: neither an existing file nor a Jinja template.
    """
    if any(mark in value for mark in _JINJA_MARKS):
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise UserError(
            f"chat_template {value!r} is neither a file nor a Jinja template; give a .jinja file path "
            "or the template itself ({% for message in messages %}...)"
        )
    text = read_text(path, "chat_template", "give a readable .jinja file")
    if not any(mark in text for mark in _JINJA_MARKS):
        raise UserError(f"chat_template file {path} holds no Jinja template; check the file")
    return text


def save_chat_template(template: str, *directories: Path) -> None:
    """Write the template into each directory under transformers' file name (loaded with the tokenizer)."""
    for directory in directories:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TEMPLATE_NAME).write_text(template)


def saved_chat_template(*directories: Path | None) -> str | None:
    """The first chat template saved in these directories (a run's adapter, the run), if any."""
    for directory in directories:
        if directory is not None and (directory / TEMPLATE_NAME).is_file():
            return read_text(directory / TEMPLATE_NAME, "chat template", "remove or fix the file")
    return None


def render_chat(
    tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None
) -> str:
    """`messages` rendered as text by the tokenizer's chat template (with the function schemas `tools`).

    Raises:
        UserError: the template fails on them (a syntax error, an undefined variable, its own
            `raise_exception`), naming the error.
    """
    import jinja2

    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except jinja2.TemplateError as error:
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise UserError(
            f"the chat template fails on a conversation of {len(messages)} message(s) ({reason}); fix the "
            f"template (the run's chat_template, or {TEMPLATE_NAME} in the model directory)"
        ) from None
