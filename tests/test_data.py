"""Data formats, chat rendering, token-level loss masks, dropping of cut samples, collators."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

from qpissa import UserError
from qpissa.data import IGNORE_INDEX, collate, load_train, packing_collator, tokenize
from qpissa.data_formats import Sample, check_tokenizer, render
from qpissa.data_sources import load_source
from qpissa.recipe import DataConfig, DataSource
from qpissa.settings import DataFormat


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_model)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _chars(tokenizer, text: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(list(text))


def test_prompt_completion_mask_token_by_token(tokenizer) -> None:
    sample = render({"prompt": "Q: 1+1?\nA:", "completion": " 2"}, DataFormat.PROMPT_COMPLETION, tokenizer)
    data = tokenize([sample], tokenizer, max_seq_len=64)
    row = data.rows[0]
    prompt = [tokenizer.bos_token_id, *_chars(tokenizer, "Q: 1+1?\nA:")]
    response = [*_chars(tokenizer, " 2"), tokenizer.eos_token_id]
    assert row["input_ids"] == prompt + response
    assert row["labels"] == [IGNORE_INDEX] * len(prompt) + response  # loss on the response and EOS only


def test_loss_on_all_tokens_when_asked(tokenizer) -> None:
    sample = render(
        {"prompt": "ab", "completion": "c"}, DataFormat.PROMPT_COMPLETION, tokenizer, response_only=False
    )
    row = tokenize([sample], tokenizer, max_seq_len=64).rows[0]
    assert row["labels"] == row["input_ids"]


def test_messages_train_on_every_assistant_turn(tokenizer) -> None:
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "2+2"},
        {"role": "assistant", "content": "4"},
    ]
    sample = render({"messages": messages}, DataFormat.MESSAGES, tokenizer)
    row = tokenize([sample], tokenizer, max_seq_len=256).rows[0]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(row["input_ids"]) == "<s>" + full
    trained = [
        token for token, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(trained) == "yo<|im_end|>\n4<|im_end|>\n"
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        assert label in (IGNORE_INDEX, token)
    assert sample.prompt.endswith("<|im_start|>assistant\n") and sample.response == "4"


def test_alpaca_uses_chat_template_and_input(tokenizer) -> None:
    record = {"instruction": "Add", "input": "1 and 2", "output": "3"}
    sample = render(record, DataFormat.ALPACA, tokenizer)
    assert "Add\n\n1 and 2" in sample.prompt and sample.segments[-1] == ("3<|im_end|>\n", True)


def test_text_format_trains_everything_and_ends_with_eos(tokenizer) -> None:
    row = tokenize([render({"text": "abc"}, DataFormat.TEXT, tokenizer)], tokenizer, 64).rows[0]
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    assert row["labels"][1:] == row["input_ids"][1:]


def test_cut_responses_are_dropped_and_counted(tokenizer) -> None:
    short = render({"prompt": "ab", "completion": "c"}, DataFormat.PROMPT_COMPLETION, tokenizer)
    long = render({"prompt": "x" * 40, "completion": "y"}, DataFormat.PROMPT_COMPLETION, tokenizer)
    data = tokenize([short, long, short], tokenizer, max_seq_len=16)
    assert (data.dropped, len(data.rows)) == (1, 2)
    with pytest.raises(UserError, match="max_seq_len"):
        tokenize([long], tokenizer, max_seq_len=16)


def _one_sample_cut_at_16(tmp_path: Path) -> DataConfig:
    """Two samples, max_seq_len 16: the second's 40-token response is cut inside."""
    records = [{"prompt": "ab", "completion": "c"}, {"prompt": "ab", "completion": "y" * 40}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return DataConfig(path=tmp_path / "train.jsonl", max_seq_len=16)


def test_training_samples_cut_inside_their_response_are_kept_and_counted(
    tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _one_sample_cut_at_16(tmp_path)
    with caplog.at_level("WARNING", logger="qpissa.data"):
        data = load_train(config, tokenizer, seed=0)
    assert (len(data.rows), data.dropped, data.cut) == (2, 0, 1)
    assert data.rows.column_names == ["input_ids", "labels"]
    long_row = max(data.rows, key=lambda row: len(row["input_ids"]))
    assert len(long_row["input_ids"]) == 16 and long_row["labels"][-1] != tokenizer.eos_token_id
    assert [r.getMessage() for r in caplog.records if r.name == "qpissa.data"] == [
        "1 of 2 training samples are longer than data.max_seq_len=16 and were cut there: response tokens "
        "past it (the end of a turn, or later turns) are not trained; raise `data.max_seq_len` to keep them "
        "whole"
    ]


def test_a_sample_whose_only_label_is_its_first_token_is_dropped(tokenizer) -> None:
    """Nothing predicts the first token: such a sample (an empty text record) would train on no token."""
    lone = Sample([(tokenizer.bos_token, True)], prompt="", response="")
    short = render({"prompt": "ab", "completion": "c"}, DataFormat.PROMPT_COMPLETION, tokenizer)
    data = tokenize([lone, short], tokenizer, max_seq_len=16)
    assert (data.dropped, len(data.rows)) == (1, 1)
    with pytest.raises(
        UserError, match=r"no sample has a response token to score.*check the data for empty records"
    ):
        tokenize([lone], tokenizer, max_seq_len=16)


def test_packing_lays_samples_end_to_end_with_restarting_positions() -> None:
    rows = [{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}, {"input_ids": [8, 9], "labels": [-100, 9]}]
    batch = packing_collator()(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9]] and "attention_mask" not in batch
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7, IGNORE_INDEX, 9]]  # no target across samples


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet", "arrow", "disk"])
def test_every_file_kind_loads(tmp_path: Path, tokenizer, suffix: str, load_eval) -> None:
    import datasets

    records = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    dataset = datasets.Dataset.from_list(records)
    path = tmp_path / f"data.{suffix}"
    {"jsonl": lambda: dataset.to_json(str(path)), "json": lambda: path.write_text(json.dumps(records)),
     "csv": lambda: dataset.to_csv(str(path), index=False), "parquet": lambda: dataset.to_parquet(str(path)),
     "arrow": lambda: _write_arrow(dataset, path),
     "disk": lambda: dataset.save_to_disk(str(path))}[suffix]()  # fmt: skip
    config = DataConfig(path=path, format=DataFormat.PROMPT_COMPLETION, max_seq_len=32)
    samples, data = load_eval(path, config, tokenizer)
    assert [s.response for s in samples] == ["c0", "c1", "c2"] and len(data.rows) == 3


def test_a_saved_dataset_is_read_without_writing_into_its_directory(tmp_path: Path, tokenizer) -> None:
    """datasets writes a transform's cache files beside the dataset's own; for a save_to_disk directory
    those are the user's files, which no command changes: seeded sampling, tokenization and the dropping
    of cut samples leave them as they were."""
    import datasets

    records = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(8)]
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records)}).save_to_disk(str(saved))
    before = {path: path.read_bytes() for path in saved.rglob("*") if path.is_file()}
    config = DataConfig(path=saved, format=DataFormat.PROMPT_COMPLETION, max_seq_len=32, samples=6)
    assert len(load_train(config, tokenizer, seed=1).rows) == 6
    assert {path: path.read_bytes() for path in saved.rglob("*") if path.is_file()} == before


def _write_arrow(dataset, path: Path) -> None:
    import pyarrow as pa

    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, dataset.data.schema) as writer:
        writer.write_table(dataset.data.table)


def read_records(path: Path, data_format: DataFormat):
    return load_source(DataSource(path, data_format))[0]


def test_missing_field_names_record_and_field(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    with pytest.raises(UserError, match=r"record 1: missing or null field `output`"):
        read_records(path, DataFormat.ALPACA)


def test_bad_messages_are_refused(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(UserError, match=r"record 0: the last turn must be the assistant's .*, not 'user''s"):
        read_records(path, DataFormat.MESSAGES)
    typo = [{"role": "user", "content": "hi"}, {"role": "assitant", "content": "yo"}]
    path = _write_jsonl(tmp_path / "typo.jsonl", [{"messages": typo}])
    with pytest.raises(
        UserError, match="not 'assitant''s; end each conversation with the assistant's answer"
    ):
        read_records(path, DataFormat.MESSAGES)


def test_malformed_and_missing_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "a", "completion": \n')
    with pytest.raises(UserError, match="line 1 is not valid JSON"):
        read_records(broken, DataFormat.PROMPT_COMPLETION)
    with pytest.raises(UserError, match="does not exist"):
        read_records(tmp_path / "nope.jsonl", DataFormat.PROMPT_COMPLETION)
    text_file = tmp_path / "x.txt"
    text_file.write_text("hello")
    with pytest.raises(UserError, match=r"unknown data file type '\.txt'; use \.jsonl"):
        read_records(text_file, DataFormat.TEXT)
    packed = tmp_path / "train.jsonl.zst"
    packed.write_bytes(b"\x28\xb5\x2f\xfd")
    with pytest.raises(
        UserError, match=r"unknown data file type '\.zst'; decompress it first \(train\.jsonl\)"
    ):
        read_records(packed, DataFormat.TEXT)
    damaged = tmp_path / "train.jsonl.gz"
    damaged.write_bytes(b"\x1f\x8b")
    with pytest.raises(UserError, match=r"train\.jsonl\.gz is not a readable \.gz file"):
        read_records(damaged, DataFormat.TEXT)


def test_messages_need_a_chat_template(tokenizer) -> None:
    from copy import deepcopy

    plain = deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(UserError, match="no chat template"):
        check_tokenizer(plain, DataFormat.MESSAGES)
    check_tokenizer(plain, DataFormat.PROMPT_COMPLETION)


def test_a_chat_template_that_drops_the_answer_is_refused(tokenizer) -> None:
    """A template rendering only the first turn would train every record on the end-of-turn token alone."""
    from copy import deepcopy

    dropping = deepcopy(tokenizer)
    dropping.chat_template = "{{ messages[0].content }}"
    record = {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    with pytest.raises(UserError, match=r"renders the assistant's turn without its text .* for '4'\)"):
        render(record, DataFormat.MESSAGES, dropping)
    assert "4" in "".join(
        text for text, trained in render(record, DataFormat.MESSAGES, tokenizer).segments if trained
    )


def test_collate_pads_right_and_masks_padding() -> None:
    batch = collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}], 0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_held_out_samples_are_those_of_the_rows(tokenizer, tmp_path: Path, load_eval) -> None:
    """A sample dropped from the loss (no response token within max_seq_len) is not scored by exact
    match either, and the rows and samples stay aligned for --max-samples."""
    records = [{"prompt": "ab", "completion": "c"}, {"prompt": "x" * 40, "completion": "y"},
               {"prompt": "de", "completion": "f"}]  # fmt: skip
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = DataConfig(path=tmp_path / "eval.jsonl", max_seq_len=16)
    samples, data = load_eval(tmp_path / "eval.jsonl", config, tokenizer)
    assert data.dropped == 1 and len(samples) == len(data.rows) == 2
    assert [sample.segments[-1][0] for sample in samples] == [
        "c" + tokenizer.eos_token,
        "f" + tokenizer.eos_token,
    ]


def test_cut_training_samples_are_not_advised_past_the_models_context(
    tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = _one_sample_cut_at_16(tmp_path)
    for context, advice in (
        (16, ""),
        (32, "; raise `data.max_seq_len` (up to 32, the model's context) to keep"),
    ):
        caplog.clear()
        with caplog.at_level("WARNING", logger="qpissa.data"):
            load_train(config, tokenizer, seed=0, context=context)
        (message,) = [r.getMessage() for r in caplog.records if r.name == "qpissa.data"]
        assert message.endswith("are not trained" + (advice + " them whole" if advice else "")), message


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
WEATHER_CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
# ChatML that shows the tools and renders tool calls and tool call ids, as tool-use templates do
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_call_id %}[{{ m.tool_call_id }}] {% endif %}{{ m.content }}"
    "{% for call in m.tool_calls or [] %}<tool_call>{{ call.function | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tool_tokenizer(tokenizer):
    from copy import deepcopy

    tools = deepcopy(tokenizer)
    tools.chat_template = TOOL_TEMPLATE
    return tools


def _trained_text(sample: Sample, tokenizer) -> tuple[str, str]:
    """The sample as the model reads it, and the part of it the loss is computed on."""
    row = tokenize([sample], tokenizer, max_seq_len=512).rows[0]
    trained = [
        token for token, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX
    ]
    return tokenizer.decode(row["input_ids"]), tokenizer.decode(trained)


def test_tool_calls_are_trained_and_the_tools_shown(
    tool_tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """OpenAI's form: a null content beside the tool calls, the result in a `tool` turn, `tools` beside."""
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    path = _write_jsonl(tmp_path / "tools.jsonl", [{"messages": messages, "tools": TOOLS}])
    with caplog.at_level("WARNING", logger="qpissa.data_sources"):
        (record,) = read_records(path, DataFormat.MESSAGES)
    assert not caplog.records  # the tool-calling turn is no empty answer
    text, trained = _trained_text(render(record, DataFormat.MESSAGES, tool_tokenizer), tool_tokenizer)
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert trained == f"{call}<|im_end|>\nIt is sunny.<|im_end|>\n"
    assert 'Tools: [{"type": "function", "function": {"name": "get_weather"' in text
    assert "<|im_start|>tool\n[call_1] sunny<|im_end|>" in text  # context, not trained

    del messages[1]["tool_calls"]  # a null content alone says what it may stand beside
    path = _write_jsonl(tmp_path / "null.jsonl", [{"messages": messages}])
    with pytest.raises(
        UserError, match=r"record 0: messages\[1\] needs .* \(null content only with `tool_calls`\)"
    ):
        read_records(path, DataFormat.MESSAGES)


def test_a_chat_template_that_drops_tool_calls_or_tools_is_refused(tokenizer) -> None:
    """The tests' ChatML renders role and content only: tool calls would train an empty turn, and tools
    would never be shown."""
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [WEATHER_CALL]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    with pytest.raises(
        UserError,
        match=r"renders no tool calls.*'get_weather'.*convert --calib: a chat_template.jinja",
    ):
        render({"messages": messages}, DataFormat.MESSAGES, tokenizer)
    answer = {"messages": [messages[0], {"role": "assistant", "content": "Ask a forecast."}], "tools": TOOLS}
    with pytest.raises(
        UserError,
        match=r"ignores the record's `tools` \('get_weather'.*eval, convert --calib: a chat_template.jinja",
    ):
        render(answer, DataFormat.MESSAGES, tokenizer)


def test_llama_factory_sharegpt_tool_turns(tool_tokenizer, tmp_path: Path) -> None:
    """function_call holds the call as JSON, observation the result, `tools` JSON text of the schemas."""
    turns = [
        {"from": "human", "value": "weather?"},
        {"from": "function_call", "value": json.dumps(WEATHER_CALL["function"])},
        {"from": "observation", "value": "sunny"},
        {"from": "gpt", "value": "It is sunny."},
    ]
    record = {"conversations": turns, "tools": json.dumps(TOOLS)}
    (read,) = read_records(_write_jsonl(tmp_path / "sharegpt.jsonl", [record]), DataFormat.SHAREGPT)
    text, trained = _trained_text(render(read, DataFormat.SHAREGPT, tool_tokenizer), tool_tokenizer)
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    assert trained == f"{call}<|im_end|>\nIt is sunny.<|im_end|>\n"
    assert '"name": "get_weather"' in text.split("<|im_start|>user")[0]  # the tools, shown first
    assert "<|im_start|>tool\nsunny<|im_end|>" in text
    turns[1]["value"] = "get_weather(Paris)"
    path = _write_jsonl(tmp_path / "bad.jsonl", [record])
    with pytest.raises(
        UserError, match=r"record 0: conversations\[1\] is a function_call, whose value is the call as JSON"
    ):
        read_records(path, DataFormat.SHAREGPT)


ALPACA_WITH_HISTORY = {
    "instruction": "Add", "input": "2 and 2", "output": "4", "system": "You are a calculator.",
    "history": [["hi", "hello"]],
}  # fmt: skip


def test_alpaca_system_and_history_are_turns(tokenizer) -> None:
    """LLaMA-Factory's alpaca columns: history responses are trained too, as LLaMA-Factory does."""
    sample = render(ALPACA_WITH_HISTORY, DataFormat.ALPACA, tokenizer)
    text, trained = _trained_text(sample, tokenizer)
    expected = [
        {"role": "system", "content": "You are a calculator."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Add\n\n2 and 2"},
        {"role": "assistant", "content": "4"},
    ]
    assert text == "<s>" + tokenizer.apply_chat_template(expected, tokenize=False)
    assert trained == "hello<|im_end|>\n4<|im_end|>\n"


def test_alpaca_system_and_history_without_a_chat_template(tokenizer, tmp_path: Path) -> None:
    from copy import deepcopy

    plain = deepcopy(tokenizer)
    plain.chat_template = None
    record = {key: value for key, value in ALPACA_WITH_HISTORY.items() if key != "history"}
    sample = render(record, DataFormat.ALPACA, plain)
    assert sample.prompt == "You are a calculator.\n\n### Instruction:\nAdd\n\n2 and 2\n\n### Response:\n"
    with pytest.raises(
        UserError, match=r"has `history` \(earlier turns\), which only a chat template renders"
    ):
        render(ALPACA_WITH_HISTORY, DataFormat.ALPACA, plain)
    path = _write_jsonl(tmp_path / "bad.jsonl", [{**ALPACA_WITH_HISTORY, "history": [["hi"]]}])
    with pytest.raises(
        UserError, match=r"record 0: `history` must be a list of \[instruction, response\] pairs"
    ):
        read_records(path, DataFormat.ALPACA)


def test_fields_of_no_format_are_refused_with_the_renaming_fix(tmp_path: Path) -> None:
    """No setting maps field names: choosing a format for {question, answer} only moves the error."""
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "2+2?", "answer": "4"}])
    with pytest.raises(UserError) as refused:
        load_source(DataSource(path))
    message = str(refused.value)
    assert "\n" not in message and "fields answer, question fit no record format" in message
    assert "prompt_completion: prompt, completion; alpaca: instruction, output" in message
    assert message.endswith("data.format chooses a format but does not rename fields")


def test_an_empty_tool_calls_list_is_no_call(tokenizer, tmp_path: Path) -> None:
    """Exported chat data often writes `"tool_calls": []` on every turn: a turn without calls, as before."""
    messages = [
        {"role": "user", "content": "Q0", "tool_calls": []},
        {"role": "assistant", "content": "A0", "tool_calls": []},
    ]
    (record,) = read_records(
        _write_jsonl(tmp_path / "empty.jsonl", [{"messages": messages}]), DataFormat.MESSAGES
    )
    plain = [{key: turn[key] for key in ("role", "content")} for turn in messages]
    assert render(record, DataFormat.MESSAGES, tokenizer) == render(
        {"messages": plain}, DataFormat.MESSAGES, tokenizer
    )


def test_a_conversation_ending_in_a_tool_call_is_scored_on_the_call(tool_tokenizer) -> None:
    """Its answer text is empty: exact match scored a model that said nothing as right, the call as wrong."""
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [WEATHER_CALL]},
    ]
    sample = render({"messages": messages, "tools": TOOLS}, DataFormat.MESSAGES, tool_tokenizer)
    assert sample.response == '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """transformers' Llama tokenizer (Metaspace, byte fallback) over single characters."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{byte:02X}>": 3 + byte for byte in range(256)}}
    for character in "▁" + string.ascii_letters + string.punctuation:
        vocab.setdefault(character, len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=[])


def test_segments_are_tokenized_as_the_whole_text(sentencepiece_tokenizer) -> None:
    """Tokenized alone, every segment would start with Metaspace's "▁": the model would learn to answer
    " yes" where the text (and generation after the prompt) has "yes"."""
    tokenizer = sentencepiece_tokenizer
    for record, data_format in (
        ({"prompt": "Q: hi\nA:\n", "completion": "yes"}, DataFormat.PROMPT_COMPLETION),
        ({"instruction": "Say yes", "output": "yes"}, DataFormat.ALPACA),
    ):
        sample = render(record, data_format, tokenizer)
        row = tokenize([sample], tokenizer, max_seq_len=256).rows[0]
        whole = "".join(text for text, _ in sample.segments)
        assert row["input_ids"] == tokenizer(whole)["input_ids"]
        trained = [token for token, label in zip(*row.values(), strict=True) if label != IGNORE_INDEX]
        assert tokenizer.convert_ids_to_tokens(trained) == ["y", "e", "s", "</s>"]


def test_only_a_conversations_last_turn_gets_the_eos(tokenizer) -> None:
    """Where the template ends turns without the EOS, earlier turns are trained as the template renders
    the history that `chat` gives the model."""
    from copy import deepcopy

    plain = deepcopy(tokenizer)
    plain.chat_template = (
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "2+2"},
        {"role": "assistant", "content": "4"},
    ]
    text, trained = _trained_text(render({"messages": messages}, DataFormat.MESSAGES, plain), plain)
    assert text == "<s>" + plain.apply_chat_template(messages, tokenize=False) + "<|im_end|>"
    assert trained == "yo\n4\n<|im_end|>"


def test_data_that_ends_with_the_eos_gets_no_second_one(tokenizer) -> None:
    """Nor does exact match compare a generated answer, decoded without it, against the EOS."""
    eos = tokenizer.eos_token
    sample = render({"prompt": "Q:", "completion": " 4" + eos}, DataFormat.PROMPT_COMPLETION, tokenizer)
    text, _ = _trained_text(sample, tokenizer)
    assert text.endswith("Q: 4" + eos) and text.count(eos) == 1 and sample.response == " 4"
    text, _ = _trained_text(render({"text": "abc" + eos}, DataFormat.TEXT, tokenizer), tokenizer)
    assert text.endswith("abc" + eos) and text.count(eos) == 1


def test_nulls_that_arrow_fills_into_calls_and_schemas_are_not_rendered(tool_tokenizer) -> None:
    """Parquet and Arrow give every record's arguments and schemas the keys other records have, as null."""
    call = {
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris", "tz": None}},
    }
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "tz": None}}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": schema}}]
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call], "tool_call_id": None},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    sample = render({"messages": messages, "tools": tools}, DataFormat.MESSAGES, tool_tokenizer)
    text, trained = _trained_text(sample, tool_tokenizer)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in trained
    assert "null" not in text and '"properties": {"city": {"type": "string"}}' in text
