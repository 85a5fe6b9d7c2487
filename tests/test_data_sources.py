"""Chat formats (ShareGPT, TRL's conversational prompt-completion) and their exact masks, format detection,
and every data source: files, folders of data files, save_to_disk splits, the Hub offline, mixtures."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
import shutil
from pathlib import Path

import pytest

from qpissa import UserError
from qpissa.data import IGNORE_INDEX, load_train, tokenize
from qpissa.data_formats import detect_format, render
from qpissa.data_sources import load_heldout, load_records, load_source
from qpissa.recipe import DataConfig, DataSource
from qpissa.settings import DataFormat

TURNS = [("system", "be brief"), ("user", "hi"), ("assistant", "yo"), ("user", "2+2"), ("assistant", "4")]


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_chat_model)


def _trained_text(tokenizer, record: dict, data_format: DataFormat) -> str:
    row = tokenize([render(record, data_format, tokenizer)], tokenizer, 512).rows[0]
    return tokenizer.decode(
        [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != IGNORE_INDEX]
    )


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_sharegpt_masks_exactly_as_messages(tokenizer) -> None:
    speakers = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {"conversations": [{"from": speakers[role], "value": text} for role, text in TURNS]}
    messages = {"messages": [{"role": role, "content": text} for role, text in TURNS]}
    assert _trained_text(tokenizer, sharegpt, DataFormat.SHAREGPT) == "yo<|im_end|>\n4<|im_end|>\n"
    ours = tokenize([render(sharegpt, DataFormat.SHAREGPT, tokenizer)], tokenizer, 512).rows[0]
    reference = tokenize([render(messages, DataFormat.MESSAGES, tokenizer)], tokenizer, 512).rows[0]
    assert ours == reference


def test_chat_prompt_completion_trains_the_completion_only(tokenizer) -> None:
    prompt = [{"role": role, "content": text} for role, text in TURNS[:4]]  # an assistant turn in the prompt
    record = {"prompt": prompt, "completion": [{"role": "assistant", "content": "4"}]}
    assert _trained_text(tokenizer, record, DataFormat.CHAT_PROMPT_COMPLETION) == "4<|im_end|>\n"
    sample = render(record, DataFormat.CHAT_PROMPT_COMPLETION, tokenizer)
    assert sample.prompt.endswith("<|im_start|>assistant\n") and sample.response == "4"


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        ({"messages": [{"role": "user", "content": "a"}]}, DataFormat.MESSAGES),
        ({"conversations": [{"from": "human", "value": "a"}]}, DataFormat.SHAREGPT),
        ({"prompt": [{"role": "user", "content": "a"}], "completion": []}, DataFormat.CHAT_PROMPT_COMPLETION),
        ({"prompt": "a", "completion": "b"}, DataFormat.PROMPT_COMPLETION),
        ({"instruction": "a", "input": "", "output": "b"}, DataFormat.ALPACA),
        ({"text": "a"}, DataFormat.TEXT),
    ],
)
def test_format_detection(record: dict, expected: DataFormat) -> None:
    assert detect_format(record, "here") is expected


def test_undetectable_and_bad_chat_records_are_named(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="fields question fit no record format"):
        detect_format({"question": "a"}, "here")
    bad = _write_jsonl(tmp_path / "d.jsonl", [{"conversations": [{"from": "robot", "value": "a"}]}])
    with pytest.raises(UserError, match=r"record 0: conversations\[0\] is from 'robot'; known speakers"):
        load_source(DataSource(bad))
    no_answer = {
        "prompt": [{"role": "user", "content": "a"}],
        "completion": [{"role": "user", "content": "b"}],
    }
    with pytest.raises(UserError, match="`completion` needs an assistant turn"):
        load_source(DataSource(_write_jsonl(tmp_path / "c.jsonl", [no_answer])))
    for opening in [{"messages": [{"role": "assistant", "content": "x"}]},
                    {"conversations": [{"from": "gpt", "value": "x"}]}]:  # fmt: skip
        with pytest.raises(UserError, match="record 0: the conversation opens with the assistant's turn"):
            load_source(DataSource(_write_jsonl(tmp_path / "a.jsonl", [opening])))
    system = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}], "system": 5}
    with pytest.raises(UserError, match="record 0: field `system` must be text, got int"):
        load_source(DataSource(_write_jsonl(tmp_path / "s.jsonl", [system])))
    with pytest.raises(UserError, match="record 0: field `prompt` is missing or null; fill it in"):
        detect_format({"prompt": None, "completion": "x"}, "record 0")


@pytest.mark.parametrize("value", ["null", "true", "5", '"text"'])
def test_a_json_file_holding_one_value_is_refused_in_one_line(tmp_path: Path, value: str) -> None:
    """datasets' JSON reader ended the whole process on `null` (a segfault, nothing said)."""
    (tmp_path / "data.json").write_text(value)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "train.json").write_text(value)
    for path in (tmp_path / "data.json", tmp_path / "folder"):
        with pytest.raises(UserError, match=r"holds a JSON (null|boolean|number|string), not records"):
            load_source(DataSource(path))


def test_a_misspelt_role_is_named_once_and_known_roles_pass(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A turn whose role no template knows is never trained on: the user hears of it, once per source."""
    turns = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "{}"}]
    records = [{"messages": [*turns, {"role": role, "content": "4"}, {"role": "assistant", "content": "ok"}]}
               for role in ("assitant", "assitant", "assistant")]  # fmt: skip
    with caplog.at_level("WARNING", logger="qpissa.data_sources"):
        load_source(DataSource(_write_jsonl(tmp_path / "chat.jsonl", records)))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "role 'assitant' in 2 record(s)" in warnings[0], warnings
    assert "'tool'" not in warnings[0]


def test_folder_of_data_files_like_a_hub_snapshot(tmp_path: Path) -> None:
    import datasets

    snapshot = tmp_path / "snapshot"
    (snapshot / "data").mkdir(parents=True)
    records = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(6)]
    datasets.Dataset.from_list(records[:4]).to_parquet(
        str(snapshot / "data" / "train-00000-of-00001.parquet")
    )
    datasets.Dataset.from_list(records[4:]).to_parquet(str(snapshot / "data" / "test-00000-of-00001.parquet"))
    (snapshot / "dataset_info.json").write_text('{"description": ""}')  # metadata, not records
    assert load_records(snapshot)["instruction"] == ["q0", "q1", "q2", "q3"]
    assert load_records(snapshot, split="test")["instruction"] == ["q4", "q5"]
    with pytest.raises(
        UserError, match=r"has splits train, test, not 'dev' \(a folder's files are split by name"
    ):
        load_records(snapshot, split="dev")


def test_a_folder_with_configs_in_its_readme_is_read_as_they_name_its_files(tmp_path: Path) -> None:
    """A Hub snapshot's README.md declares `configs:`, which datasets reads by: a file no config named was
    skipped silently, and several configs without a default failed as an invalid folder."""
    first = [{"prompt": f"A{i}:", "completion": f" a{i}"} for i in range(3)]
    second = [{"prompt": "When?", "completion": "2023-03-01"}]  # date-like: read again, as written
    snap, multi = tmp_path / "snap", tmp_path / "multi"
    for folder in (snap, multi):
        folder.mkdir()
        _write_jsonl(folder / "a.jsonl", first), _write_jsonl(folder / "b.jsonl", second)
    card = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: a.jsonl\n---\n"
    (snap / "README.md").write_text(card)
    with pytest.raises(
        UserError, match=r"snap: b\.jsonl would not be read \(no config of its README\.md names"
    ):
        load_records(snap)
    (multi / "README.md").write_text(
        "---\nconfigs:\n- config_name: first\n  data_files: a.jsonl\n- config_name: second\n  data_files: "
        "b.jsonl\n---\n"
    )
    assert load_source(DataSource(multi, subset="second"))[0].to_list() == second
    _write_jsonl(multi / "b.jsonl", first[:1])  # edited: read again, not from datasets' cache
    assert load_records(multi, subset="second").to_list() == first[:1]
    assert load_records(multi, subset="first").to_list() == first
    where = re.escape(str(multi))
    for split_setting, fix in (
        ("data.split", "set data.subset to one of them"),
        ("data.sources.1.split", "set data.sources.1.subset to one of them"),
        ("--split", "give one's files as the path"),  # eval's --data: no setting chooses a config
    ):
        message = (
            rf"^dataset {where} has the configs first, second \(README\.md\), none is the default; {fix}$"
        )
        with pytest.raises(UserError, match=message):
            load_records(multi, split_setting=split_setting)
    with pytest.raises(
        UserError, match=r"has the configs first, second \(README\.md\), not 'third'; set data\.subset"
    ):
        load_records(multi, subset="third", split_setting="data.split")


def test_a_plain_text_file_is_refused_saying_what_a_folder_of_them_gives(tmp_path: Path) -> None:
    """A .txt file was refused with the advice to use a directory, without a word that each of its lines
    becomes a record there (as datasets reads them; `convert --calib` takes such folders too)."""
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "story.txt").write_text("A story.\nIt goes on.\n")
    with pytest.raises(
        UserError,
        match=r"story\.txt: unknown data file type '\.txt'; use \.jsonl, .*\); write JSON Lines, one "
        r"\{\"text\": \.\.\.\} per sample \(or a folder of \.txt: a record per line\)$",
    ):
        load_records(tmp_path / "txt" / "story.txt")
    assert load_records(tmp_path / "txt")["text"] == ["A story.", "It goes on."]


@pytest.mark.parametrize(
    ("broken", "said"),
    [
        (b'{"prompt": "2+2=", "compl', r"b\.jsonl line 1 is not valid JSON"),
        (b"caf\xe9\n", r"b\.jsonl is not UTF-8"),
    ],
)
def test_a_broken_file_in_a_folder_is_named_as_it_is_alone(tmp_path: Path, broken: bytes, said: str) -> None:
    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "1+1=", "completion": " 2"}) + "\n")
    (tmp_path / "b.jsonl").write_bytes(broken)
    with pytest.raises(UserError, match=said):
        load_records(tmp_path)


def test_a_broken_file_in_a_folder_of_text_is_not_blamed_on_its_type(tmp_path: Path) -> None:
    """A folder's .txt files are data (a record per line), though a .txt alone is refused for training."""
    (tmp_path / "a.txt").write_text("one line\n")
    (tmp_path / "b.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(UserError) as refused:
        load_records(tmp_path)
    assert "unknown data file type" not in str(refused.value) and str(tmp_path) in str(refused.value)


def test_a_folder_without_data_files_is_refused_in_one_line(tmp_path: Path) -> None:
    """An empty folder failed with a KeyError; one holding only notes, with datasets' message about files of
    another kind of folder."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.md").write_text("my data will go here")
    for folder in (tmp_path / "empty", tmp_path / "notes"):
        where = re.escape(str(folder))
        with pytest.raises(UserError, match=rf"^dataset {where} holds no data files \(\.jsonl, "):
            load_records(folder)


def test_small_local_data_is_read_without_the_libraries_bars(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """datasets' "Generating train split" bars would stand above a data error's one line."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.enable_progress_bars()
    try:
        load_records(_write_jsonl(tmp_path / "small.jsonl", [{"text": "first"}]))
        assert "Generating" not in capsys.readouterr().err
        assert not datasets.are_progress_bars_disabled()  # switched back on for the rest of the process
        monkeypatch.setattr("qpissa.data_read.QUIET_READ_BYTES", 0)  # large data keeps its bars
        load_records(_write_jsonl(tmp_path / "large.jsonl", [{"text": "second"}]))
        assert "Generating train split" in capsys.readouterr().err
    finally:
        if was_disabled:
            datasets.disable_progress_bars()


def test_saved_dataset_dict_split(tmp_path: Path) -> None:
    import datasets

    splits = {name: datasets.Dataset.from_list([{"text": name}]) for name in ("train", "validation")}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    assert load_records(tmp_path / "saved", split="validation")["text"] == ["validation"]


def test_an_empty_split_is_an_error_only_when_it_is_read(tmp_path: Path) -> None:
    """datasets reads no split of a folder, or of a saved DatasetDict, once one of them is empty: the
    train split was refused for an empty validation.jsonl beside it."""
    import datasets

    records = [{"text": f"t{i}"} for i in range(3)]
    folder = tmp_path / "folder"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", records)
    (folder / "validation.jsonl").write_text("")
    saved = tmp_path / "saved"
    train = datasets.Dataset.from_list(records)
    datasets.DatasetDict({"train": train, "validation": train.select([])}).save_to_disk(str(saved))
    for path in (folder, saved):
        assert load_records(path)["text"] == ["t0", "t1", "t2"]
        assert load_heldout(path, "train", None, "--split")[0]["text"] == ["t0", "t1", "t2"]
        empty = rf"dataset {re.escape(str(path))} has no records in its split 'validation'; .*set --split"
        with pytest.raises(UserError, match=empty):
            load_records(path, split="validation", split_setting="--split")
        with pytest.raises(UserError, match=empty):
            load_heldout(path, None, None, "--split")  # the held-out split, asked for without its name


def test_a_saved_dataset_has_no_split_or_subset_to_choose(tmp_path: Path) -> None:
    """One saved Dataset (not a DatasetDict) is all its records: a split or subset asked of it would be
    ignored, so it is refused, as for a single file."""
    import datasets

    datasets.Dataset.from_list([{"text": "all"}]).save_to_disk(str(tmp_path / "saved"))
    assert load_records(tmp_path / "saved")["text"] == ["all"]
    with pytest.raises(
        UserError, match=r"is one saved Dataset, which has no subsets or splits \(asked for split"
    ):
        load_records(tmp_path / "saved", split="validation")
    with pytest.raises(UserError, match=r"\(asked for subset 'main'\)"):
        load_records(tmp_path / "saved", subset="main")


def test_evaluation_without_a_split_named_reads_the_held_out_one(tmp_path: Path) -> None:
    import datasets

    def saved(name: str, splits: tuple[str, ...]) -> Path:
        parts = {split: datasets.Dataset.from_list([{"text": split}]) for split in splits}
        datasets.DatasetDict(parts).save_to_disk(str(tmp_path / name))
        return tmp_path / name

    def heldout(path: Path) -> tuple[str, list]:
        records, _, split = load_heldout(path, None, None, "--split")
        return split, records["text"]

    assert heldout(saved("tvt", ("train", "validation", "test"))) == ("validation", ["validation"])
    assert heldout(saved("tt", ("train", "test"))) == ("test", ["test"])
    assert heldout(saved("t", ("train",))) == ("train", ["train"])
    assert heldout(saved("other", ("dev_matched",))) == ("dev_matched", ["dev_matched"])
    with pytest.raises(UserError, match="has splits a, b; set --split to one of them"):
        heldout(saved("ab", ("a", "b")))
    folder = tmp_path / "folder"
    folder.mkdir()
    _write_jsonl(folder / "train.jsonl", [{"text": "x"}])
    _write_jsonl(folder / "eval.jsonl", [{"text": "y"}])  # datasets names it the test split
    assert heldout(folder) == ("test", ["y"])
    assert heldout(folder / "train.jsonl") == ("train", ["x"])  # a file is its one split
    assert load_heldout(folder, "train", None, "--split")[0]["text"] == ["x"]  # a split named is read


def test_a_missing_data_file_is_not_looked_up_on_the_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """`eval --data nope.jsonl` (relative, missing) says it does not exist, without a Hub request first."""
    import datasets

    asked: list[str] = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, *_, **__: asked.append(name))
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name, *_, **__: asked.append(name) or [])
    with pytest.raises(UserError, match=r"dataset nope\.jsonl does not exist"):
        load_heldout(Path("nope.jsonl"), None, None, "--split")
    with pytest.raises(UserError, match=r"dataset nope\.jsonl does not exist"):
        load_records(Path("nope.jsonl"))
    assert asked == []


def test_hub_dataset_offline_from_the_datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`owner/name` with HF_HUB_OFFLINE=1 reads what a previous `load_dataset` download left in the cache."""
    import datasets
    from datasets.packaged_modules.json.json import Json

    source = _write_jsonl(
        tmp_path / "train.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(5)]
    )
    builder = Json(
        cache_dir=str(tmp_path / "build"), dataset_name="alpaca", hash="c0ffee", data_files=str(source)
    )
    builder.download_and_prepare()
    # the layout a download from the Hub leaves: <cache>/<owner>___<name>/<config>/<version>/<commit>/
    cache = tmp_path / "cache"
    shutil.copytree(builder.cache_dir, cache / "tatsu-lab___alpaca" / "default" / "0.0.0" / "c0ffee")
    info_path = cache / "tatsu-lab___alpaca" / "default" / "0.0.0" / "c0ffee" / "dataset_info.json"
    info_path.write_text(json.dumps({**json.loads(info_path.read_text()), "config_name": "default"}))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    dataset, data_format = load_source(DataSource(Path("tatsu-lab/alpaca")))
    assert data_format is DataFormat.ALPACA and dataset["output"] == [f"a{i}" for i in range(5)]
    with pytest.raises(UserError, match="nobody/nothing is no local file or directory, and as a Hub dataset"):
        load_source(DataSource(Path("nobody/nothing")))


def test_sources_mix_with_counts_and_fractions_seeded(tmp_path: Path, tokenizer) -> None:
    import datasets

    first = _write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(10)])
    second = _write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(8)])
    sources = [DataSource(first, samples=3), DataSource(second, samples=0.5)]
    config = DataConfig(sources=sources, max_seq_len=32)
    mixed = load_train(config, tokenizer, seed=1)
    assert len(mixed.rows) == 7 and mixed.dropped == 0
    assert isinstance(mixed.rows, datasets.Dataset)  # Arrow arrays from datasets.map, not Python lists
    again, other = load_train(config, tokenizer, seed=1), load_train(config, tokenizer, seed=2)
    assert again.rows["input_ids"] == mixed.rows["input_ids"] != other.rows["input_ids"]
    with pytest.raises(UserError, match=r"has 10 records; data\.sources\.0\.samples=11 asks for 11"):
        load_train(DataConfig(sources=[DataSource(first, samples=11)]), tokenizer, seed=1)


def test_a_fraction_of_samples_that_rounds_to_no_record_says_so(tmp_path: Path, tokenizer) -> None:
    """The message advised "a fraction in (0, 1)" for a value that is one, and named no setting."""
    path = _write_jsonl(tmp_path / "ten.jsonl", [{"prompt": f"a{i}", "completion": "x"} for i in range(10)])
    advice = "; set {0} to a larger fraction, or to a count from 1 to 10$"
    for config, setting in (
        (DataConfig(path=path, samples=0.04), "data.samples"),
        (DataConfig(sources=[DataSource(path), DataSource(path, samples=0.04)]), "data.sources.1.samples"),
    ):
        message = rf"ten\.jsonl has 10 records; {re.escape(setting)}=0\.04 of them rounds to 0 records"
        with pytest.raises(UserError, match=message + advice.format(re.escape(setting))):
            load_train(config, tokenizer, seed=1)


def test_eval_data_is_read_in_the_format_every_source_names(tmp_path: Path, tokenizer, load_eval) -> None:
    """Records that fit two formats (as the demo task's do) are scored as they were trained, not in the
    format detection would pick (messages, rendered with the chat template)."""
    both = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
             "prompt": "2+2=", "completion": " 4"}]  # fmt: skip
    data = _write_jsonl(tmp_path / "both.jsonl", both)
    named = DataSource(data, DataFormat.PROMPT_COMPLETION)
    config = DataConfig(sources=[named, named], eval_path=data)
    samples, _ = load_eval(data, config, tokenizer)
    assert config.eval_format() is DataFormat.PROMPT_COMPLETION and samples[0].prompt == "2+2="
    mixed = DataConfig(sources=[named, DataSource(data, DataFormat.MESSAGES)], eval_path=data)
    assert mixed.eval_format() is None  # no one format to follow: detected, and said


def test_data_config_needs_exactly_one_of_path_and_sources(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"one of `data\.path`"):
        DataConfig()
    with pytest.raises(UserError, match=r"sets both `data\.path` and `data\.sources`; keep one of them"):
        DataConfig(path=tmp_path, sources=[DataSource(tmp_path)])
    for samples in (2.5, 0, -1):
        with pytest.raises(UserError, match="a whole count of at least 1 or a fraction in \\(0, 1\\)"):
            DataSource(tmp_path, samples=samples)
    with pytest.raises(UserError, match="`path` is empty; give a path"):
        DataConfig(path="")


def test_tokenizing_in_several_processes_gives_the_same_rows(tmp_path: Path, tokenizer) -> None:
    records = [
        {"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": "a"}]}
        for i in range(8)
    ]
    path = _write_jsonl(tmp_path / "d.jsonl", records)
    one = load_train(DataConfig(path=path, max_seq_len=64), tokenizer, seed=0)
    two = load_train(DataConfig(path=path, max_seq_len=64, num_proc=2), tokenizer, seed=0)
    assert two.rows["labels"] == one.rows["labels"] and len(one.rows) == 8


def test_csv_columns_are_read_as_written(tmp_path: Path) -> None:
    """pandas would read the answer ` 37` as the integer 37, which no record format accepts."""
    rows = 'prompt,completion\n"What is 30 plus 7?\nAnswer:", 37\n"And 1 plus 1?",2\n'
    (tmp_path / "qa.csv").write_text(rows)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "train.csv").write_text(rows)
    for path in (tmp_path / "qa.csv", tmp_path / "folder"):
        records, data_format = load_source(DataSource(path))
        assert data_format is DataFormat.PROMPT_COMPLETION
        assert records["completion"] == [" 37", "2"] and records[0]["prompt"] == "What is 30 plus 7?\nAnswer:"


def test_csv_cells_such_as_na_or_none_are_read_as_the_text_written(tmp_path: Path) -> None:
    """pandas read `NA`, `N/A`, `None`, `null` and `NaN` as missing: an optional input vanished from the
    prompt, a required answer was refused as missing. An empty cell is still missing."""
    rows = (
        "instruction,input,output\nRegion code,NA,North America\nSay hi,N/A,hi\nShow x,None,null\nAdd,,NaN\n"
    )
    (tmp_path / "a.csv").write_text(rows)
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "train.tsv").write_text(rows.replace(",", "\t"))
    for path in (tmp_path / "a.csv", tmp_path / "folder"):
        records, _ = load_source(DataSource(path, DataFormat.ALPACA))
        assert records["input"] == ["NA", "N/A", "None", None], path
        assert records["output"] == ["North America", "hi", "null", "NaN"], path
    (tmp_path / "empty.csv").write_text("instruction,output\nAdd,\n")
    with pytest.raises(UserError, match=r"record 0: missing or null field `output`"):
        load_source(DataSource(tmp_path / "empty.csv", DataFormat.ALPACA))


def test_compressed_tab_separated_and_wrapped_files_read_as_their_plain_form(tmp_path: Path) -> None:
    """datasets reads .gz, .bz2 and .xz files, .tsv and JSON wrapped as {"data": [...]}; so does every
    command, with the same checks as the plain files."""
    records = [
        {"prompt": "What is 30 plus 7?", "completion": " 37"},
        {"prompt": "And 1 plus 1?", "completion": "2"},
    ]
    jsonl = "".join(json.dumps(record) + "\n" for record in records)
    table = "prompt\tcompletion\nWhat is 30 plus 7?\t 37\nAnd 1 plus 1?\t2\n"
    for opener, suffix in ((gzip.open, "gz"), (bz2.open, "bz2"), (lzma.open, "xz")):
        with opener(tmp_path / f"train.jsonl.{suffix}", "wt") as file:
            file.write(jsonl)
    with gzip.open(tmp_path / "train.tsv.gz", "wt") as file:
        file.write(table)
    (tmp_path / "train.tsv").write_text(table)
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": 2, "data": records}))
    (tmp_path / "folder").mkdir()
    shutil.copy(tmp_path / "train.tsv.gz", tmp_path / "folder" / "train.tsv.gz")
    names = (
        "train.jsonl.gz",
        "train.jsonl.bz2",
        "train.jsonl.xz",
        "train.tsv.gz",
        "train.tsv",
        "wrapped.json",
    )
    for name in (*names, "folder"):
        read, data_format = load_source(DataSource(tmp_path / name))
        assert data_format is DataFormat.PROMPT_COMPLETION, name
        assert read.to_list() == records, name
    with gzip.open(tmp_path / "bad.jsonl.gz", "wt") as file:
        file.write('{"prompt": "a", "completion": "b"}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"bad\.jsonl\.gz line 2 is not a JSON object"):
        load_source(DataSource(tmp_path / "bad.jsonl.gz"))
    (tmp_path / "two.json").write_text(json.dumps({"train": records, "test": records}))
    with pytest.raises(
        UserError, match=r"two\.json holds lists of records in several fields \(train, test\)"
    ):
        load_source(DataSource(tmp_path / "two.json"))
    one = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    (tmp_path / "one.json").write_text(json.dumps({"messages": one}))  # one record, not a wrapper
    read, data_format = load_source(DataSource(tmp_path / "one.json"))
    assert data_format is DataFormat.MESSAGES and read["messages"] == [one]
    record = {"instruction": "Add", "output": "4", "tools": [{"name": "calculator"}]}
    (tmp_path / "record.json").write_text(json.dumps(record))  # a record with a list of objects in it
    read, data_format = load_source(DataSource(tmp_path / "record.json"))
    assert data_format is DataFormat.ALPACA and read.to_list() == [record]


def test_records_with_an_empty_answer_are_counted_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]
    sources = {
        "pc.jsonl": [{"prompt": "a", "completion": ""}, {"prompt": "b", "completion": "c"}],
        "chat.jsonl": [{"messages": chat}, {"messages": [*chat[:1], {"role": "assistant", "content": "yo"}]}],
    }
    for name, records in sources.items():
        path = _write_jsonl(tmp_path / name, records)
        caplog.clear()
        with caplog.at_level("WARNING", logger="qpissa.data_sources"):
            load_source(DataSource(path))
        assert [r.getMessage() for r in caplog.records] == [
            f"data {path}: 1 of 2 records have an empty answer; trained, they teach the model to answer "
            "nothing (only the end of turn is left to learn): fill or remove them"
        ]


def test_a_read_error_is_said_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """datasets logged the error twice (its handler's line and an ERROR record) above qpissa's one line."""
    bad = tmp_path / "x.parquet"
    bad.write_bytes(b"PAR1garbage")
    with caplog.at_level("DEBUG"), pytest.raises(UserError, match="Parquet magic bytes not found"):
        load_source(DataSource(bad))
    assert not [record for record in caplog.records if record.name.startswith("datasets")]


def test_a_byte_order_mark_is_read_past(tmp_path: Path) -> None:
    """Some editors start UTF-8 files with a BOM; datasets reads past it, and so must qpissa's checks."""
    bom = "\ufeff"
    (tmp_path / "a.jsonl").write_text(bom + '{"prompt": "a", "completion": " b"}\n', encoding="utf-8")
    (tmp_path / "a.json").write_text(bom + '[{"prompt": "a", "completion": " b"}]', encoding="utf-8")
    (tmp_path / "a.csv").write_text(bom + "prompt,completion\na, b\n", encoding="utf-8")
    for name in ("a.jsonl", "a.json", "a.csv"):
        records, data_format = load_source(DataSource(tmp_path / name))
        assert data_format is DataFormat.PROMPT_COMPLETION and records[0]["prompt"] == "a", name


def test_the_detected_format_line_names_the_setting_that_chooses_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Training and eval say which setting chooses the format; `convert --calib`, which has none, does not."""
    path = _write_jsonl(tmp_path / "data.jsonl", [{"text": "a record"}])
    with caplog.at_level("INFO", logger="qpissa.data_sources"):
        load_source(DataSource(path))
        load_source(DataSource(path), format_setting=None)
    lines = [record.getMessage() for record in caplog.records if "detected" in record.getMessage()]
    assert lines == [
        f"data {path}: format text (detected; set data.format to choose)",
        f"data {path}: format text (detected)",
    ]


def test_a_sources_detected_format_line_names_the_sources_own_setting(
    tmp_path: Path, tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    """`data.format` does not choose a source's format: the line named it all the same."""
    path = _write_jsonl(tmp_path / "data.jsonl", [{"text": "a record"}])
    with caplog.at_level("INFO", logger="qpissa.data_sources"):
        load_train(DataConfig(sources=[DataSource(path, DataFormat.TEXT), DataSource(path)]), tokenizer, 0)
    lines = [record.getMessage() for record in caplog.records if "detected" in record.getMessage()]
    assert lines == [f"data {path}: format text (detected; set data.sources.1.format to choose)"]


@pytest.mark.parametrize(("value", "kind"), [([1, 2, 3], "list"), (0, "int")])
def test_an_alpaca_input_that_is_not_text_is_refused(tmp_path: Path, value, kind: str) -> None:
    """It was rendered as "[1, 2, 3]", or dropped (0), where instruction and output are refused."""
    path = _write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "Add", "input": value, "output": "6"}])
    with pytest.raises(UserError) as refused:
        load_source(DataSource(path))
    assert str(refused.value) == f"{path} record 0: field `input` must be text, got {kind}"


def test_an_empty_text_record_is_dropped_and_said_once(
    tmp_path: Path, tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    """It was warned about as trained ("they teach the model to answer nothing") and then, on a tokenizer
    without a BOS, said dropped; on one with a BOS, trained on the EOS alone. It has nothing to train."""
    path = _write_jsonl(tmp_path / "text.jsonl", [{"text": ""}, {"text": "some prose"}])
    with caplog.at_level("WARNING", logger="qpissa"):
        data = load_train(DataConfig(path=path, max_seq_len=64), tokenizer, seed=0)
    assert (len(data.rows), data.dropped) == (1, 1)
    assert [record.getMessage() for record in caplog.records] == [
        "dropped 1 of 2 samples with no response token to train on within max_seq_len=64 (empty, or cut off)"
    ]


def test_a_split_a_saved_dataset_lacks_is_refused_with_the_splits_it_was_saved_with(tmp_path: Path) -> None:
    """The hint for a folder's files (split by their names) misled about a save_to_disk directory."""
    import datasets

    splits = {name: datasets.Dataset.from_list([{"text": name}]) for name in ("train", "validation")}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(UserError) as refused:
        load_records(tmp_path / "saved", split="nosuch", split_setting="--split")
    assert str(refused.value) == (
        f"dataset {tmp_path / 'saved'} has splits train, validation, not 'nosuch' (the splits it was saved "
        "with, as its dataset_dict.json lists them); set --split"
    )
