"""`qpissa chat`: one-shot and interactive chat through the chat template, on every kind of model dir."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qpissa import cli
from qpissa.artifacts import RUN_MARKER
from qpissa.chat import (
    ChatSettings,
    _fit_context,
    _prompt_length,
    answer,
    generate_reply,
    load_chat_model,
    run_chat,
    stop_token_ids,
)
from qpissa.data import tokenize
from qpissa.data_formats import render
from qpissa.settings import DataFormat

GREEDY = ["--greedy", "--max-new-tokens", "12"]
SAMPLED = [
    "--temperature",
    "1.0",
    "--seed",
    "3",
    "--max-new-tokens",
    "16",
]  # the random model's greedy text is blank


def _convert(model: Path, out: Path, rank: int) -> Path:
    assert cli.main(["--quiet", "convert", str(model), str(out), "--rank", str(rank), "--iters", "1"]) == 0
    return out


def _as_run(qpissa_dir: Path, run: Path) -> Path:
    """A run directory around the QPiSSA directory's adapter, as `qpissa train` lays it out."""
    shutil.copytree(qpissa_dir / "adapter", run / "adapter")
    (run / RUN_MARKER).write_text(json.dumps({"model": str(qpissa_dir)}))
    return run


def _chat(capsys, model_dir: Path, prompt: str, options: list[str]) -> str:
    capsys.readouterr()
    assert cli.main(["--quiet", "chat", str(model_dir), "--prompt", prompt, *options]) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def untied_qpissa(char_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A conversion of a tiny random Llama with untied embeddings, whose greedy answer depends on its
    weights: the tied tiny model answers blank lines whatever its linear weights, adapter or none."""
    from qpissa.models import make_tiny_model

    model = make_tiny_model(tmp_path_factory.mktemp("untied") / "model", tie=False)
    for path in char_tokenizer.iterdir():
        shutil.copy(path, model / path.name)
    return _convert(model, model.parent / "qpissa", rank=4)


def _reference_answer(qpissa_dir: Path, adapter: Path | None, prompt: str) -> str:
    """The greedy answer of plain transformers (+ PEFT with `adapter`) on chat's device and in its dtype,
    for every weight and every 4-bit layer (bitsandbytes' bf16 CPU kernel off), as chat computes."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qpissa.runtime import auto_device, inference_dtype

    device = auto_device()
    dtype = inference_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(qpissa_dir, dtype=dtype, device_map={"": str(device)})
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype, module.support_avx512bf16_for_cpu = dtype, False  # no bf16 CPU kernel
    for param in model.parameters():  # the norms and embeddings stay bf16 in a 4-bit model otherwise
        if param.is_floating_point() and not isinstance(param, bnb.nn.Params4bit):
            param.data = param.data.to(dtype)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    tokenizer = AutoTokenizer.from_pretrained(qpissa_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)  # with the BOS training adds
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=2)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_prompt_prints_only_the_answer_and_every_source_agrees(
    untied_qpissa: Path, moved_run, tmp_path: Path, capsys
):
    """A run's answer is the one plain transformers + PEFT give with the run's adapter, which moved away
    from the conversion's: not the 4-bit residual's alone, nor the conversion's; its merged export
    answers alike; the one-shot API prints the same answer; another seed samples another."""
    run = moved_run(untied_qpissa, tmp_path / "run")
    expected = _reference_answer(untied_qpissa, run / "adapter", "hello")
    converted = _reference_answer(untied_qpissa, untied_qpissa / "adapter", "hello")
    residual = _reference_answer(untied_qpissa, None, "hello")
    assert len({expected, converted, residual}) == 3, "the adapters must change the answer"
    printed = _chat(capsys, run, "hello", GREEDY)
    assert printed == expected + "\n"  # nothing but the answer and a newline
    assert _chat(capsys, untied_qpissa, "hello", GREEDY) == converted + "\n"
    assert _chat(capsys, untied_qpissa, "hello", [*GREEDY, "--no-adapter"]) == residual + "\n"
    sampled = _chat(capsys, run, "hello", SAMPLED)
    settings = ChatSettings(prompt="hello", temperature=1.0, seed=3, max_new_tokens=16)
    reply = answer(run, settings, write=None)
    assert reply.strip() and sampled == reply + "\n"
    merged = tmp_path / "merged"
    assert cli.main(["--quiet", "export", str(run), str(merged), "--dtype", "float32", "--no-verify"]) == 0
    assert _chat(capsys, merged, "hello", GREEDY) == printed
    assert _chat(capsys, merged, "hello", SAMPLED) == sampled
    assert _chat(capsys, run, "hello", [*SAMPLED, "--seed", "4"]) != sampled


def test_prompt_on_a_terminal_hides_the_libraries_bars(
    qpissa_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`--prompt` prints one answer and nothing else, on a terminal too (where transformers would draw
    its "Loading weights" bar): the libraries' bars are switched off, as `--quiet` does."""
    from transformers.utils import logging as transformers_logging

    terminal = io.StringIO()
    terminal.isatty = lambda: True
    monkeypatch.setattr(sys, "stderr", terminal)
    for variable in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(variable, raising=False)  # restored after the test, as the switch below is
    transformers_logging.enable_progress_bar()
    try:
        assert cli.main(["chat", str(qpissa_dir), "--prompt", "hi", *GREEDY]) == 0
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        transformers_logging.enable_progress_bar()


def test_end_of_turn_token_is_found_from_the_template(qpissa_dir: Path):
    chat_model = load_chat_model(qpissa_dir)
    end_of_turn = chat_model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in chat_model.stop_ids
    chat_model.tokenizer.eos_token = "<s>"  # a model whose EOS is not its end-of-turn token
    chat_model.model.generation_config.eos_token_id = None
    assert end_of_turn in stop_token_ids(chat_model.tokenizer, chat_model.model)


def test_generation_stops_at_a_stop_token(qpissa_dir: Path):
    chat_model = load_chat_model(qpissa_dir)
    messages = [{"role": "user", "content": "hello"}]
    settings = ChatSettings(temperature=1.0, max_new_tokens=16)
    torch.manual_seed(3)
    free = generate_reply(chat_model, messages, settings, write=None)
    ids = chat_model.tokenizer(free, add_special_tokens=False)["input_ids"]
    stop = next(j for j in range(2, len(ids)) if ids[j] not in ids[:j])  # a token not generated before
    chat_model.stop_ids = [ids[stop]]  # pretend it is the end-of-turn token
    torch.manual_seed(3)
    stopped = generate_reply(chat_model, messages, settings, write=None)
    # the same tokens up to the stop token (kept here: a real end-of-turn token is special and not decoded)
    assert chat_model.tokenizer(stopped, add_special_tokens=False)["input_ids"] == ids[: stop + 1]


def test_interactive_chat_streams_keeps_history_and_resets(qpissa_dir: Path):
    lines = iter(["hello", "/reset", "", "hi", "more", "/exit", "never read"])
    written: list[str] = []
    messages = run_chat(
        qpissa_dir, ChatSettings(max_new_tokens=8), lambda prompt: next(lines), written.append
    )
    assert next(lines) == "never read"
    assert [(m["role"], m["content"]) for m in messages][::2] == [("user", "hi"), ("user", "more")]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    streamed = "".join(written)
    assert all(m["content"] in streamed for m in messages[1::2])
    assert len(written) > 6  # streamed in pieces, not printed at once


def test_piped_chat_echoes_each_line_as_a_terminal_would(
    qpissa_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    monkeypatch.setattr("sys.stdin", io.StringIO("hi\n/exit\n"))
    assert cli.main(["--quiet", "chat", str(qpissa_dir), "--max-new-tokens", "2", "--greedy"]) == 0
    transcript = capsys.readouterr().out
    assert "you> hi\n" in transcript and transcript.rstrip().endswith("you> /exit")


def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(qpissa_dir: Path):
    """Ctrl-C while an answer streamed ended the whole chat, its message glued to the answer's line."""
    lines = iter(["tell me a story", "hi", "/exit"])
    written: list[str] = []

    def write(text: str) -> None:
        if len(written) == 2:  # the first answer, two pieces in
            written.append("<Ctrl-C>")
            raise KeyboardInterrupt
        written.append(text)

    messages = run_chat(qpissa_dir, ChatSettings(max_new_tokens=8), lambda prompt: next(lines), write)
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hi"]
    assert "<Ctrl-C>\n(answer stopped; this exchange is not kept in the conversation)\n" in "".join(written)


def test_an_answer_piped_into_a_reader_that_leaves_ends_quietly(qpissa_dir: Path):
    """`qpissa chat ... | head -c 5` was a BrokenPipeError traceback labelled a bug."""
    command = [
        sys.executable,
        "-m",
        "qpissa",
        "--quiet",
        "chat",
        str(qpissa_dir),
        "--prompt",
        "hi",
        "--greedy",
    ]
    chat = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    chat.stdout.close()  # the reader leaves before the answer's first piece
    _, errors = chat.communicate(timeout=120)
    assert chat.returncode == 141 and "Traceback" not in errors and "bug" not in errors, errors


def test_a_broken_pipe_that_is_not_stdouts_is_a_bug(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys):
    """Only a reader of stdout that left ends quietly: another broken pipe (a socket) keeps its traceback."""

    def broken(args: object) -> None:
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_cmd_fetch_model", broken)
    assert cli.main(["fetch-model", "smollm2-135m", str(tmp_path / "model")]) == 1
    assert "this is a bug" in capsys.readouterr().err


def test_interactive_chat_skips_a_line_that_is_not_utf8(qpissa_dir: Path):
    lines = iter(["caf\udce9", "hi", "/exit"])  # a terminal's Latin-1 byte, as Python's input() returns it
    written: list[str] = []
    messages = run_chat(
        qpissa_dir, ChatSettings(max_new_tokens=4), lambda prompt: next(lines), written.append
    )
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hi"]
    assert "not UTF-8" in "".join(written)


def test_interactive_chat_ends_on_eof(qpissa_dir: Path):
    def read(prompt: str) -> str:
        raise EOFError

    assert run_chat(qpissa_dir, ChatSettings(greedy=True, max_new_tokens=4), read, lambda text: None) == []


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--temperature", "0"], "--temperature must be positive"),
        (["--top-p", "1.5"], "--top-p must be in"),
        (
            ["--greedy", "--temperature", "1.2"],
            "so --temperature would be ignored; drop it, or drop --greedy",
        ),
        (["--greedy", "--top-p", "0.5"], "--greedy picks the most likely token, so --top-p would be ignored"),
    ],
)
def test_bad_generation_options(qpissa_dir: Path, options: list[str], expected: str, capsys):
    assert cli.main(["--quiet", "chat", str(qpissa_dir), "--prompt", "hi", *options]) == 2
    assert expected in capsys.readouterr().err


@pytest.mark.integration
def test_demo_merged_export_answers_like_the_run(demo_model: Path, tmp_path: Path, capsys):
    qpissa_dir = _convert(demo_model, tmp_path / "qpissa", rank=16)
    run = _as_run(qpissa_dir, tmp_path / "run")
    merged = tmp_path / "merged"
    assert cli.main(["--quiet", "export", str(run), str(merged), "--dtype", "float32"]) == 0
    options = ["--greedy", "--max-new-tokens", "48"]
    # the open question is a coin toss for a 4-bit 135M model under greedy decoding: a change in the
    # 4th decimal of the conversion's error flips its first token; the one-word question does not
    prompt = "What is the capital of France? Answer in one word."
    from_run = _chat(capsys, run, prompt, options)
    assert "Paris" in from_run
    assert _chat(capsys, merged, prompt, options) == from_run


def test_a_directory_without_a_tokenizer_is_refused(qpissa_dir: Path, tmp_path: Path, capsys) -> None:
    """transformers 5 builds a placeholder tokenizer from config.json alone, which reads every text as
    unknown tokens: chat, eval and train would run on nothing without a word."""
    from qpissa.artifacts import TOKENIZER_MARKERS

    bare = tmp_path / "bare"
    shutil.copytree(qpissa_dir, bare)
    removed = [path for path in bare.iterdir() if path.name in TOKENIZER_MARKERS]
    for path in removed:
        path.unlink()
    assert removed
    assert cli.main(["--quiet", "chat", str(bare), "--prompt", "3%10="]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("qpissa: error:") and "\n" not in error and "holds no tokenizer" in error


def test_a_model_whose_generation_config_sets_max_length_chats_quietly_within_its_context(
    qpissa_dir: Path, tmp_path: Path
):
    """Llama 2's and 3's chat checkpoints set `max_length` in generation_config.json: the answer's cap
    reaches transformers as that total length, so it prints no reminder that two lengths were set, and
    an answer run to the end of the context (256 positions) is the one the cap in new tokens gives."""
    model = tmp_path / "qpissa"
    shutil.copytree(qpissa_dir, model)
    generation = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**generation, "max_length": 4096}))
    command = [sys.executable, "-m", "qpissa", "chat", str(model), "--prompt", "hello", *SAMPLED]
    printed = subprocess.run(command, capture_output=True, text=True, timeout=300)  # as a user sees it
    assert printed.returncode == 0 and printed.stdout.strip() and printed.stderr == "", printed.stderr
    replies = []
    for source in (qpissa_dir, model):  # without and with `max_length`: the same cap, the same answer
        chat_model = load_chat_model(source)
        chat_model.stop_ids = []  # no stop token: the answer runs to the end of the context
        torch.manual_seed(3)
        messages = [{"role": "user", "content": "x" * 200}]  # 220 tokens in the template: 36 left
        replies.append(generate_reply(chat_model, messages, ChatSettings(temperature=1.0), write=None))
    assert replies[0] and replies[1] == replies[0]


def test_a_short_conversation_is_kept_on_a_model_with_a_small_context(qpissa_dir: Path, caplog):
    """256 positions against the default 512 new tokens: the answer's room is capped at half the context,
    so a short conversation is not forgotten before every answer."""
    chat_model = load_chat_model(qpissa_dir, adapter=True)
    assert chat_model.context == 256
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    messages.append({"role": "user", "content": "and now?"})
    with caplog.at_level("INFO", logger="qpissa.chat"):
        _fit_context(chat_model, messages, ChatSettings())
    assert len(messages) == 3 and "forgot" not in caplog.text
    long = [{"role": "user", "content": "x" * 150}, {"role": "assistant", "content": "y"}, messages[-1]]
    _fit_context(chat_model, long, ChatSettings())
    assert long == [messages[-1]], "an exchange that leaves no room for the answer is still forgotten"


def test_sampling_is_nucleus_sampling_over_the_whole_vocabulary(qpissa_dir: Path):
    """--top-p 1 at a high temperature samples from every token: transformers' default top-k of 50 would
    keep at most 50 of them (chat documents nucleus sampling, nothing else)."""
    chat_model = load_chat_model(qpissa_dir, adapter=True)
    settings = ChatSettings(max_new_tokens=1, temperature=50.0, top_p=1.0)
    torch.manual_seed(0)
    messages = [{"role": "user", "content": "hi"}]
    answers = {generate_reply(chat_model, messages, settings, None) for _ in range(250)}
    assert len(answers) > 50


def test_a_message_too_long_for_the_context_is_refused_and_the_chat_goes_on(
    qpissa_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A message longer than the whole context (256 positions) is refused with a warning: the session
    goes on to the next line and keeps the conversation so far, which that message would have pushed out."""
    lines = iter(["hi", "x" * 300, "more", "/exit"])
    settings = ChatSettings(greedy=True, max_new_tokens=4)
    with caplog.at_level("WARNING", logger="qpissa.chat"):
        messages = run_chat(qpissa_dir, settings, lambda prompt: next(lines), lambda text: None)
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hi", "more"]
    refusals = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert refusals == [
        "that message is 320 tokens in the chat template, longer than the model's whole context of 256: "
        "it was not sent; type a shorter one"
    ]


@pytest.mark.parametrize(("length", "relation"), [(236, "as long as"), (237, "longer than")])
def test_a_prompt_too_long_for_the_context_ends_a_one_shot_answer(
    qpissa_dir: Path, length: int, relation: str, capsys: pytest.CaptureFixture
) -> None:
    """--prompt has nothing to go on to: a prompt that fills the context (19 tokens of template and the BOS
    around it, 256 positions) is one error line that says how it compares with the context."""
    assert cli.main(["--quiet", "chat", str(qpissa_dir), "--prompt", "x" * length, *GREEDY]) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        f"qpissa: error: the prompt is {length + 20} tokens in the chat template, {relation} the model's "
        "whole context of 256; shorten it"
    )


def test_chat_prompts_get_the_bos_training_gives_them(qpissa_dir: Path, monkeypatch: pytest.MonkeyPatch):
    """The tests' tokenizer adds a BOS itself (Llama-style) and its template writes none: training and
    eval start every sample with it, so chat's prompt must too, token for token up to the answer."""
    chat_model = load_chat_model(qpissa_dir)
    tokenizer = chat_model.tokenizer
    generated: list[list[int]] = []

    def generate(input_ids: torch.Tensor, **options) -> torch.Tensor:
        generated.append(input_ids[0].tolist())
        return input_ids

    monkeypatch.setattr(chat_model.model, "generate", generate)
    question = [{"role": "user", "content": "2+2?"}]
    generate_reply(chat_model, question, ChatSettings(greedy=True), write=None)
    record = {"messages": [*question, {"role": "assistant", "content": "4"}]}
    trained = tokenize([render(record, DataFormat.MESSAGES, tokenizer)], tokenizer, 256).rows[0]
    answer = tokenizer("4<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert generated == [trained["input_ids"][: -len(answer)]]
    assert generated[0][0] == tokenizer.bos_token_id
    assert _prompt_length(chat_model, question) == len(generated[0])
