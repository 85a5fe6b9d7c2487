"""Loss / perplexity against transformers' own loss, exact match by generation, and `qpissa eval`."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from qpissa import cli
from qpissa.data import Sample, render, tokenize
from qpissa.demo_task import final_answer
from qpissa.settings import DataFormat
from qpissa.task_eval import evaluate_loss, exact_match


@pytest.fixture(scope="module")
def model_and_tokenizer(char_tokenizer: Path, tmp_path_factory: pytest.TempPathFactory):
    """A tiny random Llama whose greedy answer depends on the prompt: untied embeddings (the tied tiny
    model answers every prompt alike, so answers paired with the wrong sample would go unseen)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qpissa.models import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp("untied") / "model", tie=False)
    for file in char_tokenizer.iterdir():
        shutil.copy(file, path / file.name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(path)


def test_final_answer() -> None:
    assert final_answer(" 3 + 4 = 7. #### 7 ") == "7"
    assert final_answer("a #### b #### 12") == "12"
    assert final_answer("  Paris\n") == "Paris"


def test_loss_matches_transformers_and_is_token_weighted(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    records = [{"prompt": "12+3=", "completion": " 15"}, {"prompt": "7-2=", "completion": " 5 and more text"}]
    rows = tokenize([render(r, DataFormat.PROMPT_COMPLETION, tokenizer) for r in records], tokenizer, 64).rows
    reference = []
    for row in rows:
        output = model(input_ids=torch.tensor([row["input_ids"]]), labels=torch.tensor([row["labels"]]))
        count = sum(label != -100 for label in row["labels"][1:])
        reference.append((output.loss.item(), count))
    expected = sum(loss * count for loss, count in reference) / sum(count for _, count in reference)
    assert reference[0][0] != pytest.approx(reference[1][0], abs=1e-3)  # the weighting matters
    for batch_size in (1, 2):
        result = evaluate_loss(model, rows, tokenizer.pad_token_id, torch.device("cpu"), batch_size)
        assert result["loss"] == pytest.approx(expected, abs=1e-5)
        assert result["perplexity"] == pytest.approx(math.exp(expected), rel=1e-5)
        assert result["tokens"] == sum(count for _, count in reference)


def test_exact_match_scores_each_sample_by_its_own_greedy_answer(model_and_tokenizer) -> None:
    """Each prompt's answer generated alone is the one its sample is scored by, in batches of prompts of
    different lengths (left-padded): answered right, every sample matches; given another prompt's answer,
    none does."""
    model, tokenizer = model_and_tokenizer
    prompts = ["1+1=", "long prompt 22+20=", "3%10=", "7-2=", "hello"]
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=2)
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    finals = [final_answer(text) for text in answers]
    assert all(finals) and len(set(finals)) == len(prompts), answers  # the pairing decides the score
    right = [Sample([], prompt, f"work #### {text}") for prompt, text in zip(prompts, answers, strict=True)]
    others = answers[1:] + answers[:1]  # each prompt given the next one's answer
    wrong = [Sample([], prompt, f"#### {text}") for prompt, text in zip(prompts, others, strict=True)]
    cpu = torch.device("cpu")
    for batch_size in (1, 2, 3, 5):
        assert exact_match(model, tokenizer, right, batch_size, cpu, max_new_tokens=6) == {
            "accuracy": 1.0, "correct": 5, "total": 5
        }, batch_size  # fmt: skip
        assert exact_match(model, tokenizer, wrong, batch_size, cpu, max_new_tokens=6)["correct"] == 0
    mixed = [right[0], wrong[1], right[2], wrong[3], right[4]]
    assert exact_match(model, tokenizer, mixed, 2, cpu, max_new_tokens=6) == {
        "accuracy": 0.6, "correct": 3, "total": 5
    }  # fmt: skip


def test_exact_match_never_generates_past_the_context(
    model_and_tokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    model, tokenizer = model_and_tokenizer
    prompt = "long prompt 22+20="
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    answers = {}
    for budget in (2, 6):
        out = model.generate(ids, max_new_tokens=budget, do_sample=False, pad_token_id=0, eos_token_id=2)
        answers[budget] = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert answers[2] != answers[6]  # the context decides which one is generated
    samples = [Sample([], prompt, f"#### {answers[2]}")]
    cpu = torch.device("cpu")
    with caplog.at_level("WARNING", logger="qpissa.task_eval"):
        assert exact_match(model, tokenizer, samples, 1, cpu, max_new_tokens=6, context=ids.shape[1] + 2) == {
            "accuracy": 1.0, "correct": 1, "total": 1
        }  # fmt: skip
    assert "1 of 1 answers were generated with fewer than 6 new tokens" in caplog.text
    assert (
        exact_match(model, tokenizer, samples, 1, cpu, max_new_tokens=6, context=ids.shape[1] + 6)["correct"]
        == 0
    )


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "eval.jsonl"
    records = [{"completion": f" {i % 10}", "prompt": f"{i}%10="} for i in range(5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cli_eval_prints_json(qpissa_dir: Path, tmp_path: Path, capsys) -> None:
    data = _data(tmp_path)
    assert cli.main(["--quiet", "eval", str(qpissa_dir), "--data", str(data), "--format", "prompt_completion",
                     "--max-new-tokens", "4"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 5 and result["total"] == 5 and 0 < result["loss"] < 20
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-6)
    assert result["adapter"] == str(qpissa_dir / "adapter")
    assert (result["format"], result["max_seq_len"]) == ("prompt_completion", 256)  # the model's context


def test_cli_eval_scores_the_split_asked_for(qpissa_dir: Path, tmp_path: Path, capsys) -> None:
    """A folder with train.jsonl and eval.jsonl holds two splits: --split test scores the held-out one,
    as does no --split at all (scoring the training split by default would measure fit, silently)."""
    folder = tmp_path / "task"
    folder.mkdir()
    _data(tmp_path).rename(folder / "train.jsonl")
    (folder / "eval.jsonl").write_text(json.dumps({"prompt": "9+9=", "completion": " 18"}) + "\n")
    for asked, split, samples in (("train", "train", 5), ("test", "test", 1), (None, "test", 1)):
        argv = ["--quiet", "eval", str(qpissa_dir), "--data", str(folder), "--metric", "loss"]
        assert cli.main([*argv, *(["--split", asked] if asked else [])]) == 0
        result = json.loads(capsys.readouterr().out)
        assert (result["split"], result["samples"]) == (split, samples)
    assert (
        cli.main(
            ["--quiet", "eval", str(qpissa_dir), "--data", str(folder / "eval.jsonl"), "--metric", "loss"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["split"] is None  # a file has no split to name


def test_cli_eval_reads_its_data_once_and_asks_the_hub_once(
    qpissa_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Without --format and --split, eval detects the format and picks the held-out split from one read:
    a Hub dataset (here `datasets.load_dataset` stood in for it, offline) is not asked for its split
    names first, and a local file is not read twice."""
    import datasets

    read, real_load = [], datasets.load_dataset
    records = [{"prompt": f"{i}%10=", "completion": f" {i % 10}"} for i in range(5)]

    def load_dataset(name: str, *args, **kwargs):
        read.append(kwargs.get("data_files", name))
        if name != "owner/task":
            return real_load(name, *args, **kwargs)
        splits = {"train": records, "validation": records[:2]}
        return datasets.DatasetDict({split: datasets.Dataset.from_list(r) for split, r in splits.items()})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)

    def split_names(name: str, *args, **kwargs) -> list[str]:
        read.append(name)
        return ["train", "validation"]

    monkeypatch.setattr(datasets, "get_dataset_split_names", split_names)
    data = _data(tmp_path)
    for path, split, samples in (("owner/task", "validation", 2), (str(data), None, 5)):
        read.clear()
        assert cli.main(["--quiet", "eval", str(qpissa_dir), "--data", path, "--metric", "loss"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert (result["split"], result["samples"], result["format"]) == (split, samples, "prompt_completion")
        assert read == [path]


def test_cli_eval_of_a_run_uses_its_data_format(qpissa_dir: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    shutil.copytree(qpissa_dir / "adapter", run / "adapter")
    marker = {
        "config": {"data": {"format": "prompt_completion", "max_seq_len": 64}},
        "model": str(qpissa_dir),
    }
    (run / "qpissa_run.json").write_text(json.dumps(marker))
    assert cli.main(["--quiet", "eval", str(run), "--data", str(_data(tmp_path)), "--metric", "loss"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["adapter"] == str(run / "adapter") and "loss" in result and "accuracy" not in result


def test_cli_eval_of_a_lora_export_without_its_adapter_keeps_its_data_settings(
    qpissa_dir: Path, tiny_chat_model: Path, tmp_path: Path, capsys
) -> None:
    """The original model alone, the baseline of a LoRA export, was read in a detected format and length."""
    lora = tmp_path / "lora"
    shutil.copytree(qpissa_dir / "adapter", lora)
    config = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(
        json.dumps(config | {"base_model_name_or_path": str(tiny_chat_model)})
    )
    recorded = {"format": "prompt_completion", "max_seq_len": 24}
    (lora / "export_report.json").write_text(json.dumps({"data": recorded}))
    for extra in ([], ["--no-adapter"]):
        argv = ["--quiet", "eval", str(lora), "--data", str(_data(tmp_path)), "--metric", "loss", *extra]
        assert cli.main(argv) == 0
        result = json.loads(capsys.readouterr().out)
        assert {"format": result["format"], "max_seq_len": result["max_seq_len"]} == recorded, extra


def test_cli_eval_warns_when_the_data_is_what_the_run_trained_on(
    qpissa_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Scoring what the run trained on measures fit: warned about, by the resolved path and the split,
    whether the run names the data as data.path or among data.sources; held-out data is not."""
    folder = tmp_path / "task"
    folder.mkdir()
    train = _data(tmp_path).rename(folder / "train.jsonl")
    shutil.copy(train, folder / "eval.jsonl")  # the folder's test split
    run = tmp_path / "run"
    shutil.copytree(qpissa_dir / "adapter", run / "adapter")
    monkeypatch.chdir(tmp_path)  # relative paths in a recipe are relative to the working directory
    cases = [
        ({"path": "task/train.jsonl"}, [str(train)], True),
        ({"path": "task/train.jsonl"}, [str(folder / "eval.jsonl")], False),
        ({"sources": [{"path": "other/name"}, {"path": str(folder), "split": "train"}]}, ["task"], False),
        ({"sources": [{"path": "other/name"}, {"path": str(folder), "split": "train"}]},
         ["task", "--split", "train"], True),
    ]  # fmt: skip
    for data, where, warned in cases:
        marker = {"config": {"data": {"format": "prompt_completion", "max_seq_len": 64, **data}}}
        (run / "qpissa_run.json").write_text(json.dumps({**marker, "model": str(qpissa_dir)}))
        caplog.clear()
        with caplog.at_level("WARNING", logger="qpissa.task_eval"):
            assert cli.main(["--quiet", "eval", str(run), "--metric", "loss", "--data", *where]) == 0
        assert ("is what the run trained on" in caplog.text) is warned, (data, where)


def test_cli_eval_errors(qpissa_dir: Path, tmp_path: Path, capsys) -> None:
    # no run and no --format: the format is detected from the data, as training does
    assert cli.main(["--quiet", "eval", str(qpissa_dir), "--data", str(_data(tmp_path))]) == 0
    capsys.readouterr()
    assert cli.main(["--quiet", "eval", str(tmp_path / "nope"), "--data", str(_data(tmp_path))]) == 2
    missing = tmp_path / "missing.jsonl"
    args = ["--quiet", "eval", str(qpissa_dir), "--data", str(missing), "--format", "text"]
    assert cli.main(args) == 2
    assert "does not exist" in capsys.readouterr().err
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"question": "2+2?", "answer": "4"}) + "\n")
    assert cli.main(["--quiet", "eval", str(qpissa_dir), "--data", str(unknown)]) == 2
    assert "fit no record format" in (error := capsys.readouterr().err) and error.strip().endswith(
        "--format chooses a format but does not rename fields"
    )


def test_samples_longer_than_the_models_context_are_advised_only_what_it_allows(
    tmp_path: Path, char_tokenizer: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    """A model of 32 positions and prompts of 40 characters: eval's default length is the whole context,
    which --max-seq-len cannot pass, so raising it is not advised; below the context it is, as far as
    the context. The error is the one line said (no warning about the dropped samples before it)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    model = tmp_path / "model"
    LlamaForCausalLM(config).save_pretrained(model)
    for path in char_tokenizer.iterdir():
        shutil.copy(path, model / path.name)
    data = tmp_path / "long.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": "q" * 40 + f"{i}=", "completion": f" {i}"}) + "\n" for i in range(4))
    )
    errors = []
    for extra in ([], ["--max-seq-len", "16"]):
        capsys.readouterr()
        with caplog.at_level("WARNING", logger="qpissa.data"):
            assert cli.main(["--quiet", "eval", str(model), "--data", str(data), *extra]) == 2
        errors.append(capsys.readouterr().err.strip())
        assert errors[-1].startswith("qpissa: error: ") and "\n" not in errors[-1]
    assert "max_seq_len=32 tokens, the model's whole context" in errors[0] and "raise" not in errors[0]
    assert "max_seq_len=16; raise --max-seq-len (up to 32, the model's context)" in errors[1]
    assert "dropped" not in caplog.text


def test_samples_cut_at_max_seq_len_are_counted_and_said(
    qpissa_dir: Path, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    """A response that runs past --max-seq-len is scored on its first part only: the JSON counts such
    samples and a warning says so, since their loss is not the whole answer's."""
    data = tmp_path / "long.jsonl"
    records = [{"prompt": "1+1=", "completion": " 2"}, {"prompt": "9=", "completion": " nine" * 10}]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    with caplog.at_level("WARNING", logger="qpissa.data"):
        options = ["--data", str(data), "--metric", "loss", "--max-seq-len", "24"]
        assert cli.main(["--quiet", "eval", str(qpissa_dir), *options]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["samples"], result["dropped"], result["cut"]) == (2, 0, 1)
    assert "1 of 2 samples are longer than max_seq_len=24" in caplog.text and "--max-seq-len" in caplog.text


def test_max_samples_counts_only_the_samples_it_takes(
    qpissa_dir: Path, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    """--max-samples 3 scores the file's first 3 samples: the JSON's dropped and cut, and the warnings,
    count among those 3, not the whole file's (here 2 dropped and 2 cut)."""
    short, long_prompt, long_answer = (
        {"prompt": "1+1=", "completion": " 2"}, {"prompt": "q" * 40, "completion": " 4"},
        {"prompt": "9=", "completion": " nine" * 10},
    )  # fmt: skip
    data = tmp_path / "mixed.jsonl"
    records = [short, long_prompt, long_answer, long_prompt, long_answer, short]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    options = ["--data", str(data), "--metric", "loss", "--max-seq-len", "24", "--max-samples", "3"]
    with caplog.at_level("WARNING", logger="qpissa.data"):
        assert cli.main(["--quiet", "eval", str(qpissa_dir), *options]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["samples"], result["dropped"], result["cut"]) == (2, 1, 1)
    assert "dropped 1 of 3 samples" in caplog.text and "1 of 2 samples are longer" in caplog.text


def test_eval_of_a_run_reads_its_data_in_the_format_its_sources_all_name() -> None:
    """As training reads its eval_path (DataConfig.eval_format): the format every data.sources entry
    names, where data.format is left out; detected when they name several, or none."""
    from qpissa.task_eval import _checked_data

    def recorded(*formats: str | None) -> str | None:
        sources = [{"path": f"s{i}.jsonl", "format": name} for i, name in enumerate(formats)]
        return _checked_data({"format": None, "max_seq_len": 8, "sources": sources}, Path("qpissa_run.json"))[
            "format"
        ]

    assert recorded("alpaca", "alpaca") == "alpaca"
    assert recorded("alpaca", "messages") is None and recorded("alpaca", None) is None


def test_data_in_another_format_than_the_run_recorded_says_where_the_format_came_from(
    qpissa_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A run (or its export) records its format; data in another fails in it, and the line says why."""
    run = tmp_path / "run"
    shutil.copytree(qpissa_dir / "adapter", run / "adapter")
    marker = {
        "model": str(qpissa_dir),
        "config": {"data": {"format": "prompt_completion", "max_seq_len": 64}},
    }
    (run / "qpissa_run.json").write_text(json.dumps(marker))
    text = tmp_path / "text.jsonl"
    text.write_text(json.dumps({"text": "some prose to score"}) + "\n")
    assert cli.main(["--quiet", "eval", str(run), "--metric", "loss", "--data", str(text)]) == 2
    error = capsys.readouterr().err
    assert "(format prompt_completion is the trained run's, recorded in" in error
    assert error.strip().endswith("the records fit format text: pass --format text to read them in it)")
    # a mistake no format mends gets no word on formats: a wrong path, a split a file lacks, bad records
    nonsense = tmp_path / "nonsense.jsonl"
    nonsense.write_text(json.dumps({"question": "2+2?"}) + "\n")
    for where in (["--data", str(tmp_path / "missing.jsonl")], ["--data", str(text), "--split", "test"],
                  ["--data", str(nonsense)]):  # fmt: skip
        assert cli.main(["--quiet", "eval", str(run), "--metric", "loss", *where]) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("qpissa: error:") and "--format" not in error, error
    assert (
        cli.main(["--quiet", "eval", str(run), "--metric", "loss", "--data", str(text), "--format", "text"])
        == 0
    )


def test_records_with_an_empty_prompt_are_scored_by_loss_not_by_exact_match(
    qpissa_dir: Path, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    """An empty prompt (unconditional completion) has nothing to answer: generating from it crashed the
    whole evaluation. Its loss counts; exact match scores the others, or, with none left, is left out."""
    records = [{"prompt": "", "completion": "Once upon a time"}, {"prompt": "1+1=", "completion": " 2"}]
    data = tmp_path / "some.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    options = ["--format", "prompt_completion", "--max-new-tokens", "2"]
    with caplog.at_level("INFO", logger="qpissa.task_eval"):
        assert cli.main(["--quiet", "eval", str(qpissa_dir), "--data", str(data), *options]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["samples"], result["total"]) == (2, 1) and result["loss"] > 0
    assert f"1 of 2 samples of {data} have an empty prompt, with nothing to answer" in caplog.text
    none = tmp_path / "none.jsonl"
    none.write_text(json.dumps(records[0]) + "\n")
    assert cli.main(["--quiet", "eval", str(qpissa_dir), "--data", str(none), *options]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 1 and result["loss"] > 0 and "accuracy" not in result
    assert cli.main(["--quiet", "eval", str(qpissa_dir), "--data", str(none), "--metric", "accuracy"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"qpissa: error: dataset {none} has no prompt to answer (every record's prompt is empty); use "
        "--metric loss or ppl"
    )
