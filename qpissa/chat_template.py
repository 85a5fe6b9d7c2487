"""A run's own chat template: read from a file or given inline, saved with the run and its adapters so
that `chat`, `eval` and `export` render prompts exactly as training did; conversations rendered with a
template, its own failures told from qpissa's, and rendered prompts tokenized as training tokenizes them."""

from __future__ import annotations

import functools
import traceback
from pathlib import Path
from typing import Any

from qpissa import UserError
from qpissa.artifacts import ModelSource, read_text

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
    saved = _saved_template_file(*directories)
    return None if saved is None else read_text(saved, "chat template", "remove or fix the file")


def template_origin(source: ModelSource, recipe: bool = False) -> str:
    """Whose chat template a tokenizer loaded from `source` renders with (`recipe`: the recipe's, set on
    it), for the messages that ask to fix the template."""
    if recipe:
        return "the recipe's chat_template"
    saved = _saved_template_file(source.adapter_dir, source.run_dir)  # as `loading.load_tokenizer` finds it
    if saved is not None:
        return f"the run's chat_template ({saved})"
    return f"the chat template of the tokenizer in {source.base_dir}"


class TemplateFailure(Exception):
    """The chat template's own code failed, not qpissa's: its error on one line (`reason`), and whether
    the template does not even compile (`syntax`), which no conversation causes."""

    def __init__(self, reason: str, syntax: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.syntax = syntax


def render_chat(
    tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None
) -> str:
    """`messages` rendered as text by the tokenizer's chat template (with the function schemas `tools`).

    Raises:
        UserError: the template fails on them (`apply_template`), naming its error.
    """
    try:
        return apply_template(tokenizer, messages, add_generation_prompt, tools)
    except TemplateFailure as failure:
        raise UserError(
            f"the chat template fails on a conversation of {len(messages)} message(s) ({failure.reason}); "
            f"fix the template (the run's chat_template, or {TEMPLATE_NAME} in the model directory)"
        ) from None


def apply_template(
    tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None
) -> str:
    """`render_chat` for callers that say themselves what failed, and where.

    Raises:
        TemplateFailure: the template's own code failed: a syntax error, an undefined variable, its
            `raise_exception`, or a plain Python error in it (`{{ content + 1 }}`); any other error is a bug.
    """
    import jinja2

    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as error:
        if not isinstance(error, jinja2.TemplateError) and not _raised_in_template(error):
            raise
        reason = " ".join(f"{type(error).__name__}: {error}".split())
        raise TemplateFailure(reason, isinstance(error, jinja2.TemplateSyntaxError)) from None


def prompt_ids(text: str, tokenizer: Any) -> list[int]:
    """The start of a sample (or a prompt) tokenized as training tokenizes it: after the special tokens the
    tokenizer puts before a text (the BOS a Llama-style post-processor adds), unless the text writes the BOS
    itself (a template's `{{ bos_token }}`), and without those it puts after one (an EOS would end the
    prompt before the answer)."""
    written = bool(tokenizer.bos_token) and text.startswith(tokenizer.bos_token)
    lead = [] if written else list(_leading_specials(tokenizer))
    return lead + tokenizer(text, add_special_tokens=False)["input_ids"]


@functools.lru_cache(maxsize=8)
def _leading_specials(tokenizer: Any) -> tuple[int, ...]:
    """The special tokens the tokenizer's post-processor puts before any text (none, or a BOS, a [CLS]);
    kept per tokenizer (by identity): found by two tokenizations, which nearly doubled the time to tokenize
    every training sample's first segment (37 µs on top of 47 µs on the demo tokenizer)."""
    marked = tokenizer("x", add_special_tokens=True)["input_ids"]
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    return next(
        (tuple(marked[:at]) for at in range(len(marked)) if marked[at : at + len(plain)] == plain), ()
    )


def _raised_in_template(error: BaseException) -> bool:
    """The error was raised while the template's code ran: jinja names the frames of that code
    `<template>`, so a TypeError of `{{ content + 1 }}` is the template's, one of the library's is not."""
    frames = traceback.walk_tb(error.__traceback__)
    return any(frame.f_code.co_filename == "<template>" for frame, _ in frames)


def _saved_template_file(*directories: Path | None) -> Path | None:
    return next(
        (d / TEMPLATE_NAME for d in directories if d is not None and (d / TEMPLATE_NAME).is_file()), None
    )
