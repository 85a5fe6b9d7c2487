"""`qpissa chat`: talk to a QPiSSA directory, a training run or a merged export in the terminal.

Prompts are formatted with the tokenizer's own chat template and answers are streamed token by token
through transformers' `TextStreamer`. Generation stops at the end-of-turn token the template writes
after an assistant message (e.g. `<|im_end|>`), as well as at the model's EOS tokens.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qpissa import UserError
from qpissa.chat_template import prompt_ids, render_chat
from qpissa.loading import checked_source, load_model, load_tokenizer, model_context
from qpissa.runtime import auto_device, inference_dtype
from qpissa.settings import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, ChatSettings, is_utf8

if TYPE_CHECKING:
    from transformers import GenerationConfig

log = logging.getLogger(__name__)

Reader = Callable[[str], str]  # like `input`: show a prompt, return a line; EOFError ends the chat
Writer = Callable[[str], None]  # writes text as it is generated


@dataclass
class ChatModel:
    """A loaded model ready to chat.

    Attributes:
        model: transformers model or `PeftModel` (4-bit residual + adapter).
        tokenizer: its tokenizer, with a chat template.
        stop_ids: token ids that end an answer (end-of-turn and EOS).
        device: where the model runs.
        context: the positions the model was built for (None: not said), which prompt and answer share.
    """

    model: torch.nn.Module
    tokenizer: object
    stop_ids: list[int]
    device: torch.device
    context: int | None


def load_chat_model(path: Path, adapter: bool = True) -> ChatModel:
    """Load MODEL_OR_RUN (QPiSSA directory, run, checkpoint-N or merged export) with its chat tokenizer.

    Args:
        path: what to load. adapter: apply its adapter (False: `--no-adapter`, the base weights alone).

    Raises:
        UserError: not a model, a QPiSSA directory without its adapter, or a tokenizer without a chat
            template.
    """
    source = checked_source(path, adapter=adapter)
    tokenizer = load_tokenizer(source)
    if not tokenizer.chat_template:
        raise UserError(
            f"the tokenizer in {source.base_dir} has no chat template (chat_template.jinja or "
            "tokenizer_config.json), and chat needs one: train with `chat_template: FILE.jinja` in the "
            "recipe (it is saved with the run), or chat with an instruction-tuned model's conversion"
        )
    device = auto_device()
    model = load_model(source, device=device, compute_dtype=inference_dtype(device)).eval()
    return ChatModel(
        model=model, tokenizer=tokenizer, stop_ids=stop_token_ids(tokenizer, model), device=device,
        context=model_context(source.base_dir),
    )  # fmt: skip


def stop_token_ids(tokenizer, model: torch.nn.Module) -> list[int]:
    """The end-of-turn token (the special token the template puts after an answer) and the EOS ids."""
    ids = set()
    for eos in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    marker = "qpissa-end-of-turn-probe"
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception as error:  # a template may refuse this conversation (jinja raise_exception)
        log.warning(
            "could not find the end-of-turn token from the chat template (%s); stopping at EOS", error
        )
        return sorted(ids)
    after = rendered[rendered.rfind(marker) + len(marker) :]
    tail = tokenizer(after, add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | {int(i) for i in tokenizer.added_tokens_decoder}
    if tail and tail[0] in special:
        ids.add(tail[0])
    return sorted(ids)


def generate_reply(
    chat_model: ChatModel, messages: list[dict], settings: ChatSettings, write: Writer | None
) -> str:
    """Generate the assistant's answer to `messages`, streaming it to `write`; return the answer text.

    Args:
        chat_model: from `load_chat_model`.
        messages: `[{"role": ..., "content": ...}]`, ending with the user's turn.
        settings: generation settings.
        write: receives the answer piece by piece as it is generated (None: silent).
    """
    tokenizer = chat_model.tokenizer
    ids = _prompt_ids(chat_model, messages)
    inputs = {
        "input_ids": torch.tensor([ids], device=chat_model.device),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=chat_model.device),
    }
    pad = (
        tokenizer.pad_token_id
        if tokenizer.pad_token_id is not None
        else next(iter(chat_model.stop_ids), None)
    )
    prompt_length, context = len(ids), chat_model.context
    if context is not None and prompt_length >= context:
        raise UserError(f"the prompt is {_too_long(prompt_length, context)}; shorten it")
    # models with a table of learned positions (GPT-2, OPT) fail past its end: the answer stops there
    budget = (
        settings.max_new_tokens if context is None else min(settings.max_new_tokens, context - prompt_length)
    )
    config = copy.deepcopy(chat_model.model.generation_config)
    config.update(
        **_answer_length(config, prompt_length, budget), do_sample=not settings.greedy,
        temperature=None if settings.greedy else settings.temperature or DEFAULT_TEMPERATURE,
        top_p=None if settings.greedy else settings.top_p or DEFAULT_TOP_P,
        top_k=None if settings.greedy else 0, eos_token_id=chat_model.stop_ids,
        pad_token_id=pad,
    )  # fmt: skip
    streamer = _streamer(tokenizer, write) if write is not None else None
    with torch.no_grad():
        output = chat_model.model.generate(**inputs, generation_config=config, streamer=streamer)
    return tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)


def answer(path: Path, settings: ChatSettings, write: Writer | None) -> str:
    """One-shot: answer `settings.prompt`, streaming only the answer to `write`; return it."""
    chat_model = load_chat_model(path, settings.adapter)
    torch.manual_seed(settings.seed)  # generate() samples from the global generator
    messages = [*_start(settings), {"role": "user", "content": settings.prompt}]
    return generate_reply(chat_model, messages, settings, write)


def run_chat(path: Path, settings: ChatSettings, read: Reader, write: Writer) -> list[dict]:
    """Interactive chat: read a message, stream the answer, keep the history. `/reset` forgets, `/exit` ends;
    Ctrl-C stops an answer being written.

    The oldest exchanges are forgotten when the conversation outgrows the model's context; a message too
    long for the context on its own is refused with a warning and the chat goes on without it.

    Returns:
        The conversation since the last `/reset`, as chat messages.
    """
    chat_model = load_chat_model(path, settings.adapter)
    torch.manual_seed(settings.seed)
    messages, context = _start(settings), chat_model.context
    keys = "/reset forgets the conversation, Ctrl-C stops an answer, /exit or Ctrl-D quits"
    write(f"chatting with {path} ({keys})\n")
    while True:
        try:
            text = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return messages
        if text in ("/exit", "/quit"):
            return messages
        if text == "/reset":
            messages = _start(settings)
            write("(conversation forgotten)\n")
            continue
        if not text:
            continue
        if not is_utf8(text):
            write("(that line is not UTF-8 text and was not sent; type it again in UTF-8)\n")
            continue
        message = {"role": "user", "content": text}
        alone = _prompt_length(chat_model, [*_start(settings), message])  # the history can all be forgotten
        if context is not None and alone >= context:
            log.warning("that message is %s: it was not sent; type a shorter one", _too_long(alone, context))
            continue
        messages.append(message)
        _fit_context(chat_model, messages, settings)
        try:
            reply = generate_reply(chat_model, messages, settings, write)
        except KeyboardInterrupt:  # stops this answer, not the chat (Ctrl-C at the prompt, or Ctrl-D, quits)
            write("\n(answer stopped; this exchange is not kept in the conversation)\n")
            messages.pop()
            continue
        write("\n")
        messages.append({"role": "assistant", "content": reply})


def _start(settings: ChatSettings) -> list[dict]:
    return [{"role": "system", "content": settings.system}] if settings.system else []


def _fit_context(chat_model: ChatModel, messages: list[dict], settings: ChatSettings) -> None:
    """Forget the oldest exchanges until the prompt plus room for the answer fit the model's context.

    The room is `max_new_tokens`, but at most half the context: the answer stops at the context anyway,
    and a small model (256 positions against the default 512) would otherwise forget every exchange.
    """
    limit = chat_model.context
    if limit is None:
        return
    room = min(settings.max_new_tokens, limit // 2)
    first = 1 if messages and messages[0]["role"] == "system" else 0
    while len(messages) - first > 1:
        if _prompt_length(chat_model, messages) + room <= limit:
            return
        del messages[first : first + 2]
        log.info("conversation too long for the context of %d tokens: forgot the oldest exchange", limit)


def _prompt_length(chat_model: ChatModel, messages: list[dict]) -> int:
    """The tokens of `messages` in the chat template, up to where the answer starts."""
    return len(_prompt_ids(chat_model, messages))


def _prompt_ids(chat_model: ChatModel, messages: list[dict]) -> list[int]:
    """`messages` in the chat template, up to where the answer starts, tokenized as training tokenizes a
    sample: with the BOS a Llama-style tokenizer adds, where the template does not write it."""
    text = render_chat(chat_model.tokenizer, messages, add_generation_prompt=True)
    return prompt_ids(text, chat_model.tokenizer)


def _too_long(length: int, context: int) -> str:
    """Why a prompt of `length` tokens (in the chat template) leaves no room for an answer in `context`."""
    relation = "as long as" if length == context else "longer than"
    return f"{length} tokens in the chat template, {relation} the model's whole context of {context}"


def _answer_length(config: GenerationConfig, prompt_length: int, budget: int) -> dict[str, int]:
    """The answer's length in the terms the model's generation config uses: one whose `max_length` is
    set (Llama 2's and 3's chat checkpoints) takes the whole sequence's length, since transformers
    reminds on every answer that both were set when it also gets `max_new_tokens`."""
    if config.max_length is not None and config.max_new_tokens is None:
        return {"max_length": prompt_length + budget}
    return {"max_new_tokens": budget}


def _streamer(tokenizer, write: Writer):
    """transformers' `TextStreamer`, writing to `write` instead of `print` (its documented hook)."""
    from transformers import TextStreamer

    class WriterStreamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            write(text)

    return WriterStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
