"""A conversation rendered with the chat template one assistant turn at a time: each trained turn becomes a
segment holding exactly the text the template renders for it within the whole conversation, so the loss
mask is exact at token level. A failure is blamed on the record (`FILE record N`), on the template (whose:
the recipe's, the run's or the tokenizer's), or on both where either could be the fix."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from qpissa import UserError
from qpissa.chat_template import TemplateFailure, apply_template
from qpissa.chat_tools import check_calls_rendered, check_tools_rendered
from qpissa.chat_turns import WEIGHT, is_trained

QUOTED = 24  # characters quoted on either side of where two renderings part
REWRITE = "fix the template, or write the records as prompt_completion"
# why a template must render a conversation's start unchanged as it goes on, and the ways on
INCREMENTAL = (
    "training renders each assistant turn within the conversation, so earlier turns must render unchanged "
    "(only special tokens that end a whole conversation, as Phi-3's EOS, may go); train on the last turn "
    f'alone ("weight": 0 on the earlier assistant turns), or {REWRITE}'
)
# why an assistant's turn must start with the generation prompt
GENERATION = (
    "the turn is trained after the prompt that chat and eval generate from (add_generation_prompt), so it "
    f"must start with it; {REWRITE}"
)


@dataclass
class Sample:
    """One rendered record: prompt and response text, plus the reference answer for exact match."""

    segments: list[tuple[str, bool]]  # (text, trained) in order
    prompt: str  # everything before the last response (what generation starts from)
    response: str  # the last response, without EOS (a tool call as the template writes it)


def render_conversation(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    tokenizer: Any,
    response_only: bool,
    first_trained: int,
    where: str,
    origin: str,
) -> Sample:
    """Render with the chat template one turn at a time; each assistant turn from `first_trained` on is a
    trained segment, unless the data marks it `weight` 0 (earlier ones, and those, are context).

    A template may end a whole conversation with special tokens it leaves out where the conversation goes
    on (Phi-3's EOS): an earlier turn is trained without them, as the whole conversation renders it. An end
    of turn the data writes where the template writes it too (`4<|im_end|>`) is rendered once.

    Args:
        where: the record (`FILE record N`); origin: whose template it is; both for messages.

    Raises:
        UserError: the template fails on the conversation, does not render it incrementally, renders a
            turn without its text or tool calls, or ignores the record's tools.
    """
    messages = [dict(message) for message in messages]  # copies, changed below
    trained = [index >= first_trained and is_trained(message) for index, message in enumerate(messages)]
    for message in messages:
        message.pop(WEIGHT, None)  # not the template's to see
    ends = _special_texts(tokenizer)
    render = partial(_render, tokenizer, tools=tools, count=len(messages), where=where, origin=origin)
    eos = tokenizer.eos_token or ""
    segments: list[tuple[str, bool]] = []
    done = prompt = ""
    rendered = 0  # the messages `done` renders
    answer = messages[-1]["content"]
    for index in (index for index, train in enumerate(trained) if train):
        before, after = _turn(render, messages, index, ends)
        if not after.startswith(before):
            what = f"does not start the assistant's turn after {index} message(s) with its generation prompt"
            raise _parted(before, after, f"{what}: the two", GENERATION, where, origin)
        floor = len(done) - len(segments[-1][0]) if segments else 0  # ends are cut from the last turn only
        kept = _shared_start(done, before, ends, floor)
        if (
            kept is not None
            and kept != done
            and not render(messages[:index], False).endswith(done[len(kept) :])
        ):
            kept = None  # the cut ends no conversation that ends elsewhere: it stands for the turn's own end
        if kept is None:
            what = f"its rendering of the first {rendered} messages and, going on, that of the first {index}"
            what = f"does not render conversations incrementally: {what}"
            raise _parted(done, before, what, INCREMENTAL, where, origin)
        if len(kept) < len(done):
            text, _ = segments[-1]
            segments[-1] = (text[: len(text) - (len(done) - len(kept))], True)
        segments.append((before[len(kept) :], not response_only))
        response = after[len(before) :]
        message = messages[index]
        _check_rendered_turn(message, response, eos, where, origin)
        check_calls_rendered(message, response, where, origin)
        answer = _written_call(response, eos) if message.get("tool_calls") else message["content"]
        if index == len(messages) - 1 and eos and eos not in response:
            response += eos  # earlier turns: the history `chat` renders, without it
        segments.append((response, True))
        done, prompt, rendered = after, before, index + 1
    if tools:
        whole = done if trained[-1] else render(messages, False)
        check_tools_rendered(tools, whole, render(messages, False, tools=None), where, origin)
    return Sample(segments, prompt, answer)


def _turn(
    render: Callable[..., str], messages: list[dict[str, Any]], index: int, ends: tuple[str, ...]
) -> tuple[str, str]:
    """The conversation up to the assistant's turn `index` with the generation prompt, and through that
    turn; an end of turn its text ends with, where the template writes one too, is dropped from it (in
    `messages`, for the turns after it)."""
    before = render(messages[:index], True)
    after = render(messages[: index + 1], False)
    doubled = _doubled_end(messages[index]["content"], after[len(before) :], ends)
    if doubled:
        messages[index]["content"] = messages[index]["content"].removesuffix(doubled)
        after = render(messages[: index + 1], False)
    return before, after


def _render(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    generation: bool,
    *,
    tools: list[dict[str, Any]] | None,
    count: int,
    where: str,
    origin: str,
) -> str:
    """The first messages of a record's `count` rendered; a failure blamed on the template where no
    conversation could cause it (a syntax error), else on the record or the template."""
    try:
        return apply_template(tokenizer, messages, generation, tools)
    except TemplateFailure as failure:
        if failure.syntax:
            raise UserError(f"{origin} is no valid template ({failure.reason}); fix it") from None
        raise UserError(
            f"{where}: {origin} fails on this record's conversation of {count} messages ({failure.reason}); "
            "fix the record (its roles and their order, say) or the template"
        ) from None


def _shared_start(done: str, longer: str, ends: tuple[str, ...], floor: int) -> str | None:
    """What the rendering of a longer conversation keeps of the shorter one's (`done`): all of it, or all
    but special tokens at its end (and not below `floor`) that the template writes only where a
    conversation ends; None where it changes anything else."""
    kept = done
    while not longer.startswith(kept):
        end = next((end for end in ends if kept.endswith(end)), None)
        if end is None or len(kept) - len(end) < floor:
            return None
        kept = kept.removesuffix(end)
    return kept


def _doubled_end(content: str, response: str, ends: tuple[str, ...]) -> str:
    """The special token (EOS, end of turn) an assistant's text ends with where the template writes it
    after the text too (`4<|im_end|><|im_end|>`, or ` 4</s> </s>` as Llama 2 spaces it): trained twice else,
    and compared by exact match."""
    doubled = (end for end in ends if content.endswith(end))
    return next(
        (end for end in doubled if re.search(re.escape(content) + r"\s*" + re.escape(end), response)), ""
    )


def _special_texts(tokenizer: Any) -> tuple[str, ...]:
    """The tokenizer's special tokens as text, longest first (`<|endoftext|>` before `<|end|>`...)."""
    added = (token.content for token in tokenizer.added_tokens_decoder.values() if token.special)
    return tuple(sorted({*tokenizer.all_special_tokens, *added} - {""}, key=len, reverse=True))


def _parted(shorter: str, longer: str, what: str, why: str, where: str, origin: str) -> UserError:
    """The refusal of a template whose two renderings (`what` it does) should agree up to the end of the
    shorter, quoting where they part."""
    pairs = zip(shorter, longer, strict=False)
    at = next((at for at, (one, other) in enumerate(pairs) if one != other), min(len(shorter), len(longer)))
    return UserError(
        f"{where}: {origin} {what} part after {shorter[max(0, at - QUOTED) : at]!r}, where the one has "
        f"{shorter[at : at + QUOTED]!r} and the other {longer[at : at + QUOTED]!r}; {why}"
    )


def _written_call(response: str, eos: str | None) -> str:
    """A tool-calling turn as the template writes it, up to the end of the turn: what exact match compares."""
    return (response.split(eos)[0] if eos else response).strip()


def _check_rendered_turn(message: dict[str, Any], response: str, eos: str, where: str, origin: str) -> None:
    """The template rendered the assistant turn's text: trained without it, the model would learn only to
    end its turn."""
    if message["content"].strip() and not response.replace(eos, "").strip():
        raise UserError(
            f"{where}: {origin} renders the assistant's turn without its text (it rendered {response!r} for "
            f"{message['content'][:40]!r}), so training would learn only the end of turn; fix the template, "
            "or write the records as prompt_completion"
        )
