"""Chat records rendered for training: template failures blamed on the record or the template, templates
that end only a whole conversation (Phi-3), ends the data writes, per-turn weights, text content parts."""

from __future__ import annotations

import json
from copy import deepcopy
from pathlib import Path

import pytest
import yaml

from qpissa import UserError, cli
from qpissa.artifacts import ModelSource
from qpissa.chat_template import TEMPLATE_NAME, prompt_ids, render_chat, template_origin
from qpissa.data import IGNORE_INDEX, load_train, tokenize, tokenize_split
from qpissa.data_formats import Sample, render
from qpissa.data_sources import load_source
from qpissa.recipe import DataConfig, DataSource
from qpissa.settings import DataFormat
from qpissa.task_eval import heldout_for_training

FOUR_TURNS = [
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "2+2"},
    {"role": "assistant", "content": "4"},
]
# Phi-3's: the EOS ends a whole conversation, and is left out where it goes on
PHI3 = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)
# Gemma's check that roles alternate, over the tests' ChatML
ALTERNATING = (
    "{% for m in messages %}{% if (m.role == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ADDS_A_NUMBER = "{% for m in messages %}{{ m.content + 1 }}{% endfor %}"


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_model)


def _with_template(tokenizer, template: str):
    changed = deepcopy(tokenizer)
    changed.chat_template = template
    return changed


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _trained_text(sample: Sample, tokenizer) -> tuple[str, str]:
    """The sample as the model reads it, and the part of it the loss is computed on."""
    row = tokenize([sample], tokenizer, max_seq_len=512).rows[0]
    trained = [token for token, label in zip(*row.values(), strict=True) if label != IGNORE_INDEX]
    return tokenizer.decode(row["input_ids"]), tokenizer.decode(trained)


def test_a_template_that_fails_with_a_python_error_is_a_user_error_naming_it(tokenizer) -> None:
    """`{{ content + 1 }}` raises a plain TypeError inside the template: the template's mistake, said in one
    line, not a traceback; an error of the library's own is still a bug."""
    adding = _with_template(tokenizer, ADDS_A_NUMBER)
    typed = r"\(TypeError: can only concatenate str \(not \"int\"\) to str\)"
    with pytest.raises(
        UserError,
        match=r"^data.jsonl record 7: the chat template fails on this record's conversation of 4 messages "
        + typed,
    ):
        render({"messages": FOUR_TURNS}, DataFormat.MESSAGES, adding, where="data.jsonl record 7")
    with pytest.raises(UserError, match=r"fails on a conversation of 1 message\(s\) " + typed):
        render_chat(adding, FOUR_TURNS[:1], add_generation_prompt=True)  # chat's prompts

    def broken(*args, **kwargs):
        raise TypeError("a bug outside the template")

    buggy = deepcopy(tokenizer)
    buggy.apply_chat_template = broken
    with pytest.raises(TypeError, match="a bug outside the template"):
        render_chat(buggy, FOUR_TURNS[:1])


def test_train_says_in_one_line_which_template_fails_on_which_record(
    qpissa_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": FOUR_TURNS}])
    recipe = {
        "model": str(qpissa_dir), "output_dir": str(tmp_path / "run"), "chat_template": ADDS_A_NUMBER,
        "data": {"path": str(path), "max_seq_len": 64}, "max_steps": 1,
    }  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    assert cli.main(["--quiet", "train", str(tmp_path / "recipe.yaml")]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith(
        f"qpissa: error: {path} record 0: the recipe's chat_template fails on this record's conversation of "
        '4 messages (TypeError: can only concatenate str (not "int") to str); fix the record'
    )


def test_a_records_template_failure_names_the_file_the_record_and_its_messages(
    tokenizer, tmp_path: Path
) -> None:
    """Two user turns in a row: the partial render of two messages failed, and the error blamed the
    template alone; it is the record's (or the template's): named as record-field errors name it, also
    when `samples` drew it to another place."""
    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
               for i in range(5)]  # fmt: skip
    records[3] = {"messages": [{"role": "user", "content": "q3"}, *records[3]["messages"]]}
    path = _write_jsonl(tmp_path / "chat.jsonl", records)
    alternating = _with_template(tokenizer, ALTERNATING)
    expected = (
        f"{path} record 3: the recipe's chat_template fails on this record's conversation of 3 messages "
        "(TemplateError: Conversation roles must alternate user/assistant/user/assistant/...); fix the "
        "record (its roles and their order, say) or the template"
    )
    drawn, _ = load_source(DataSource(path, samples=5), seed=1)
    assert [m[0]["content"] for m in drawn["messages"]].index("q3") != 3  # drawn to another place
    for samples in (None, 5):
        config = DataConfig(path=path, max_seq_len=64, samples=samples)
        with pytest.raises(UserError) as refused:
            load_train(config, alternating, seed=1, origin="the recipe's chat_template")
        assert str(refused.value) == expected
    held_out = load_source(DataSource(path))[0]
    with pytest.raises(UserError, match=rf"^{path} record 3: the run's chat_template \(R\) fails on this"):
        tokenize_split(held_out, DataFormat.MESSAGES, config, alternating, path=path, origin="the run's "
                       "chat_template (R)")  # fmt: skip
    config = DataConfig(path=path, eval_path=path, max_seq_len=64)  # a run's own held-out data
    with pytest.raises(UserError, match=rf"^{path} record 3: the recipe's chat_template fails on this"):
        heldout_for_training(config, alternating, None, "the recipe's chat_template")


def test_template_errors_about_the_whole_template_say_whose_it_is(tokenizer) -> None:
    broken = _with_template(tokenizer, "{% for m in messages %}{{ m.content }")
    with pytest.raises(UserError, match=r"^the recipe's chat_template is no valid template \(TemplateSyntax"):
        render({"messages": FOUR_TURNS}, DataFormat.MESSAGES, broken, origin="the recipe's chat_template")
    typo = _with_template(tokenizer, "{% for m in messages %}{{ m.contnet }}{% endfor %}")
    with pytest.raises(
        UserError, match=r"^d.jsonl record 0: the run's chat_template renders the assistant's turn without"
    ):
        render({"messages": FOUR_TURNS}, DataFormat.MESSAGES, typo, where="d.jsonl record 0",
               origin="the run's chat_template")  # fmt: skip


def test_the_templates_origin_is_the_recipes_the_runs_or_the_tokenizers(tmp_path: Path) -> None:
    base, run = tmp_path / "model", tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    source = ModelSource(base, run / "adapter", run)
    assert template_origin(source) == f"the chat template of the tokenizer in {base}"
    (run / TEMPLATE_NAME).write_text("{{ messages }}")
    assert template_origin(source) == f"the run's chat_template ({run / TEMPLATE_NAME})"
    assert template_origin(source, recipe=True) == "the recipe's chat_template"


def test_a_template_that_ends_only_a_whole_conversation_with_the_eos_is_trained_turn_by_turn(
    tokenizer,
) -> None:
    """Phi-3's template writes the EOS where the conversation ends, not after an earlier turn: that turn
    is trained as the whole conversation renders it (without the EOS), and the text is the whole one."""
    phi3 = _with_template(tokenizer, PHI3)
    text, trained = _trained_text(render({"messages": FOUR_TURNS}, DataFormat.MESSAGES, phi3), phi3)
    assert text == "<s>" + phi3.apply_chat_template(FOUR_TURNS, tokenize=False)
    assert trained == "yo<|end|>\n4<|end|>\n<|im_end|>"


def test_a_template_that_ends_a_conversation_in_place_of_a_turns_end_is_refused(tokenizer) -> None:
    """Writing `<s>` in place of the last turn's `<|im_end|>\n` was taken as Phi-3's conversation end: cut,
    the earlier turn was trained without its end of turn, and the model never learnt to end a turn."""
    replacing = _with_template(
        tokenizer,
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{% if loop.last and m.role == "
        "'assistant' and not add_generation_prompt %}<s>{% else %}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    )
    with pytest.raises(UserError, match="does not render conversations incrementally"):
        render({"messages": FOUR_TURNS}, DataFormat.MESSAGES, replacing)


def test_a_template_that_changes_earlier_turns_is_refused_saying_where_and_how_to_go_on(tokenizer) -> None:
    """Text (not a special token) that only a conversation's end has: the earlier turn cannot be trained
    as the whole conversation renders it. The refusal quotes where the renderings part; marking the
    earlier turn `weight` 0 (trained: the last alone) is one way on."""
    ending = _with_template(
        tokenizer,
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% else %}END\n{% endif %}",
    )
    with pytest.raises(UserError) as refused:
        render({"messages": FOUR_TURNS}, DataFormat.MESSAGES, ending, where="d.jsonl record 2",
               origin="the recipe's chat_template")  # fmt: skip
    message = str(refused.value)
    assert message.startswith(
        "d.jsonl record 2: the recipe's chat_template does not render conversations incrementally: its "
        "rendering of the first 2 messages and, going on, that of the first 3 part after 'user: hi\\n"
        "assistant: yo\\n', where the one has 'END\\n' and the other 'user: 2+2\\nassistant: '; "
    )
    assert message.endswith(
        'train on the last turn alone ("weight": 0 on the earlier assistant turns), or fix the template, or '
        "write the records as prompt_completion"
    )
    last_only = [FOUR_TURNS[0], {**FOUR_TURNS[1], "weight": 0}, *FOUR_TURNS[2:]]
    text, trained = _trained_text(render({"messages": last_only}, DataFormat.MESSAGES, ending), ending)
    assert text == "<s>user: hi\nassistant: yo\nuser: 2+2\nassistant: 4\nEND\n<|im_end|>"
    assert trained == "4\nEND\n<|im_end|>"


def test_an_end_of_turn_the_data_writes_is_trained_once(tokenizer) -> None:
    """`"content": "4<|im_end|>"` rendered `4<|im_end|><|im_end|>`: the model learnt to end its turn twice,
    and exact match compared the answer with the token."""
    eos = tokenizer.eos_token
    written = [FOUR_TURNS[0], {**FOUR_TURNS[1], "content": "yo" + eos}, FOUR_TURNS[2], {**FOUR_TURNS[3],
               "content": "4" + eos}]  # fmt: skip
    sample = render({"messages": written}, DataFormat.MESSAGES, tokenizer)
    assert _trained_text(sample, tokenizer) == _trained_text(
        render({"messages": FOUR_TURNS}, DataFormat.MESSAGES, tokenizer), tokenizer
    )
    assert _trained_text(sample, tokenizer)[1] == "yo<|im_end|>\n4<|im_end|>\n" and sample.response == "4"
    spaced = _with_template(  # Llama 2's: a space between the text and the end of turn
        tokenizer,
        "{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]{% else %} "
        "{{ m.content }} {{ eos_token }}{% endif %}{% endfor %}",
    )
    sample = render({"messages": written[:2]}, DataFormat.MESSAGES, spaced)
    assert _trained_text(sample, spaced)[1] == " yo <|im_end|>" and sample.response == "yo"


def test_a_turn_of_weight_0_is_context_not_trained(tokenizer, tmp_path: Path) -> None:
    """Axolotl's per-turn `weight`: 0 leaves an assistant turn out of the loss, in messages and ShareGPT."""
    weighted = [FOUR_TURNS[0], {**FOUR_TURNS[1], "weight": 0}, FOUR_TURNS[2], {**FOUR_TURNS[3], "weight": 1}]
    sharegpt = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo", "weight": 0},
                {"from": "human", "value": "2+2", "weight": 0}, {"from": "gpt", "value": "4"}]  # fmt: skip
    for record, data_format in (
        ({"messages": weighted}, DataFormat.MESSAGES),
        ({"conversations": sharegpt}, DataFormat.SHAREGPT),
    ):
        (read,) = load_source(DataSource(_write_jsonl(tmp_path / "w.jsonl", [record]), data_format))[0]
        text, trained = _trained_text(render(read, data_format, tokenizer), tokenizer)
        assert text == "<s>" + tokenizer.apply_chat_template(FOUR_TURNS, tokenize=False)  # `weight` unseen
        assert trained == "4<|im_end|>\n"


@pytest.mark.parametrize(
    ("turns", "said"),
    [
        ([{**FOUR_TURNS[1], "weight": 0}], "every assistant turn to learn has weight 0, so the record trains "
         "nothing; give one weight 1 (or no weight), or remove the record"),
        ([{**FOUR_TURNS[1], "weight": 0.5}], "messages[1]'s `weight` is 0.5; write 0 (not trained) or 1"),
        ([FOUR_TURNS[1]], "messages[0] is a 'user' turn with weight 1, but only assistant turns are trained"),
    ],
)  # fmt: skip
def test_weights_that_train_nothing_or_cannot_be_honoured_are_refused(
    tmp_path: Path, turns: list[dict], said: str
) -> None:
    user = {**FOUR_TURNS[0], "weight": 1} if "'user' turn" in said else FOUR_TURNS[0]
    path = _write_jsonl(tmp_path / "w.jsonl", [{"messages": [user, *turns]}])
    with pytest.raises(UserError) as refused:
        load_source(DataSource(path, DataFormat.MESSAGES))
    assert str(refused.value).startswith(f"{path} record 0: {said}")


def test_text_content_parts_are_joined_and_other_parts_refused(tokenizer, tmp_path: Path) -> None:
    """OpenAI's content parts: text parts read as their text one after the other, as chat templates that
    take parts join them; an image part cannot be trained on a text model, and is named."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "2+"}, {"type": "text", "text": "2"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "4"}]}]  # fmt: skip
    (read,) = load_source(DataSource(_write_jsonl(tmp_path / "parts.jsonl", [{"messages": parts}])))[0]
    plain = [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]
    assert render(read, DataFormat.MESSAGES, tokenizer) == render(
        {"messages": plain}, DataFormat.MESSAGES, tokenizer
    )
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    parts[0]["content"].insert(0, image)
    path = _write_jsonl(tmp_path / "image.jsonl", [{"messages": parts}])
    with pytest.raises(UserError) as refused:
        load_source(DataSource(path))
    assert str(refused.value) == (
        f"{path} record 0: messages[0]'s content part 0 is of type 'image_url'; only text parts "
        '({"type": "text", "text": ...}) are trained: remove the record, or the parts that are not text'
    )


def test_a_turn_that_does_not_start_with_the_generation_prompt_is_refused_quoting_both(tokenizer) -> None:
    spaced = _with_template(
        tokenizer,
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:\n{% endif %}",
    )
    with pytest.raises(UserError) as refused:
        render({"messages": FOUR_TURNS[:2]}, DataFormat.MESSAGES, spaced, where="d.jsonl record 0")
    assert str(refused.value) == (
        "d.jsonl record 0: the chat template does not start the assistant's turn after 1 message(s) with its "
        "generation prompt: the two part after 'user: hi\\nassistant:', where the one has '\\n' and the "
        "other ' yo\\n'; the turn is trained after the prompt that chat and eval generate from "
        "(add_generation_prompt), so it must start with it; fix the template, or write the records as "
        "prompt_completion"
    )


def test_a_file_mixing_text_and_parts_is_read_unless_datasets_turns_text_into_numbers(
    tokenizer, tmp_path: Path
) -> None:
    """datasets reads a field that is text in some records and a list in others as JSON, and text such as
    "4" back as the number 4: the record is fine as written, and the refusal says what happened."""
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "3+3?"}]},
                          {"role": "assistant", "content": "six"}]}  # fmt: skip
    text = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "four"}]}
    read, _ = load_source(DataSource(_write_jsonl(tmp_path / "mixed.jsonl", [text, parts])))
    assert render(read[1], DataFormat.MESSAGES, tokenizer).segments[-1] == ("six<|im_end|>\n", True)
    text["messages"][1]["content"] = "4"
    path = _write_jsonl(tmp_path / "number.jsonl", [text, parts])
    with pytest.raises(UserError) as refused:
        load_source(DataSource(path))
    assert str(refused.value).startswith(f"{path} record 0: messages[1] needs string fields")
    assert str(refused.value).endswith(
        'is read as JSON, so text such as "4" turns into a number); write that field in one form in every '
        "record (chat content: all text, or all lists of text parts)"
    )


def test_a_tokenizer_that_appends_an_eos_gets_none_inside_a_sample_or_at_a_prompts_end(tokenizer) -> None:
    """With `add_eos_token` (a post-processor `<s> $A <|im_end|>`), the first segment of every sample got an
    EOS between the generation prompt and the answer, and chat's prompt ended with it."""
    from tokenizers import processors

    appending = deepcopy(tokenizer)
    appending.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A <|im_end|>", special_tokens=[("<s>", 1), ("<|im_end|>", 2)]
    )
    question = [{"role": "user", "content": "2+2?"}]
    prompt = prompt_ids(render_chat(appending, question, add_generation_prompt=True), appending)
    assert prompt == prompt_ids(render_chat(tokenizer, question, add_generation_prompt=True), tokenizer)
    assert prompt[0] == 1 and prompt[-1] != 2
    record = {"messages": [*question, {"role": "assistant", "content": "4"}]}
    sample = render(record, DataFormat.MESSAGES, appending)
    assert tokenize([sample], appending, 64).rows[0] == tokenize([sample], tokenizer, 64).rows[0]
