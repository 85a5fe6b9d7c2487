"""`qpissa train` on the tiny chat model: learning, logs, artifacts, exact resume, and every bad input."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from transformers import TrainerState, TrainingArguments

from qpissa import cli
from qpissa.trainlog import JsonlLogCallback

STEPS = 8


def _config(tmp: Path, qpissa_dir: Path, data_dir: Path, **changes) -> Path:
    config = {
        "model": str(qpissa_dir), "output_dir": str(tmp / "run"),
        "data": {"path": str(data_dir / "train.jsonl"), "eval_path": str(data_dir / "eval.jsonl"),
                 "format": "prompt_completion", "max_seq_len": 32, "eval_generate_samples": 4},
        "learning_rate": 1e-2, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "max_steps": STEPS,
        "per_device_train_batch_size": 4, "save_steps": 4, "save_total_limit": 1, "eval_steps": 4,
        "logging_steps": 4, "seed": 3,
    }  # fmt: skip
    config["data"].update(changes.pop("data", {}))
    config.update(changes)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _evals(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "eval_log.jsonl").read_text().splitlines()]


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows}


@pytest.fixture(scope="module")
def run(qpissa_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert cli.main(["--quiet", "train", str(_config(tmp, qpissa_dir, data_dir))]) == 0
    (tmp / "printed.txt").write_text(printed.getvalue())
    return tmp / "run"


def test_evaluations_read_as_the_step_lines_do(run: Path) -> None:
    """The eval line was the raw JSON entry (16-digit floats, internal fields); the result line gave an
    accuracy of 0.0000 without saying it came from 4 answers while the loss used every sample."""
    from qpissa.trainlog import evaluation_text

    first = _evals(run)[0]
    text = evaluation_text(first)
    assert re.fullmatch(r"loss \d+\.\d{4}, exact match \d+/4 \(\d+\.\d %\), \d+\.\d s", text), text
    (line,) = (run.parent / "printed.txt").read_text().splitlines()
    assert re.fullmatch(r"trained 8 steps, mean loss \d+\.\d{4} \(steps 1-8\), eval loss \d+\.\d{4}, "
                        r"exact match \d+/4 -> .*run", line), line  # fmt: skip


def test_loss_goes_down(run: Path) -> None:
    losses = _losses(run)
    assert sorted(losses) == list(range(STEPS + 1))
    assert sum(losses[s] for s in (6, 7, 8)) / 3 < losses[0] - 0.5


def test_log_has_every_field_every_step(run: Path) -> None:
    rows = [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]
    fields = {
        "step",
        "loss",
        "learning_rate",
        "grad_norm",
        "tokens_per_second",
        "peak_memory_mb",
        "elapsed",
        "eta",
    }
    for row in rows:
        assert set(row) == fields
    assert all(row["tokens_per_second"] > 0 and row["grad_norm"] > 0 for row in rows[1:])
    assert rows[-1]["eta"] == 0 and rows[1]["learning_rate"] < rows[2]["learning_rate"]  # warmup
    evals = [json.loads(line) for line in (run / "eval_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [4, 8] and all("eval_loss" in e and "accuracy" in e for e in evals)
    # the last step is evaluated once, by train's final pass, into a line shaped as the Trainer's
    final = json.loads((run / "eval_results.json").read_text())
    assert set(evals[-1]) == set(evals[0]) and evals[-1]["eval_runtime"] > 0 and evals[-1]["epoch"] > 0
    assert all(type(evals[-1][k]) is type(evals[0][k]) for k in evals[0]), "each field of one type"
    assert evals[-1]["eval_loss"] == final["loss"] and evals[-1]["accuracy"] == final["accuracy"]
    assert all(e["generation_runtime"] > 0 for e in evals), "the answers' time, beside the loss pass's"


def test_run_files_are_readable_as_the_umask_allows(run: Path) -> None:
    """The adapter and checkpoints (written by PEFT through safetensors) get the mode of the run's other
    files, not 0600: a run shared with the user's group must load."""
    expected = (run / "qpissa_run.json").stat().st_mode & 0o777
    weights = list(run.rglob("*.safetensors"))
    assert weights and {path.stat().st_mode & 0o777 for path in weights} == {expected}


def test_run_dir_and_adapter_load_with_plain_peft(run: Path, qpissa_dir: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    marker = json.loads((run / "qpissa_run.json").read_text())
    assert marker["model"] == str(qpissa_dir.resolve()) and marker["config"]["max_steps"] == STEPS
    assert marker["runtime"] == {"device": "cpu", "dtype": "float32", "optim": "adamw_torch"}  # auto resolved
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [f"checkpoint-{STEPS}"]  # keeps the last 1
    ids = torch.tensor([[1, 20, 30, 40]])
    outputs = []
    for adapter in (qpissa_dir / "adapter", run / "adapter"):
        base = AutoModelForCausalLM.from_pretrained(qpissa_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, adapter)
        outputs.append(model(ids).logits)
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-3)  # the trained adapter changed the model


@pytest.mark.parametrize("named", [True, False], ids=["checkpoint-4", "true (the newest)"])
def test_resume_reproduces_losses_exactly(
    named: bool, run: Path, qpissa_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    # an interrupted run: its first checkpoint and log, then a resume with the same config
    tmp = tmp_path
    first = tmp / "first"
    assert cli.main(["--quiet", "train", str(_config(tmp, qpissa_dir, data_dir, save_total_limit=3)),
                     f"output_dir={first}", "max_steps=8"]) == 0  # fmt: skip
    shutil.rmtree(first / "adapter")
    shutil.rmtree(first / f"checkpoint-{STEPS}")
    config = _config(tmp, qpissa_dir, data_dir, save_total_limit=3)
    resume = first / "checkpoint-4" if named else "true"
    overrides = [f"output_dir={first}", f"resume_from_checkpoint={resume}"]
    assert cli.main(["--quiet", "train", str(config), *overrides]) == 0
    assert _losses(first) == _losses(run)
    assert len(_losses(first)) == STEPS + 1


def test_a_run_on_a_constant_schedule_resumes_longer_at_its_learning_rate(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """On a constant schedule more steps change no step's learning rate, so resuming longer is allowed
    (on a decaying one it is refused: the saved schedule would go on as it was)."""
    constant = {"lr_scheduler_type": "constant", "warmup_ratio": 0.0, "save_steps": 2, "eval_steps": None}
    config = _config(tmp_path, qpissa_dir, data_dir, max_steps=2, **constant)
    assert cli.main(["--quiet", "train", str(config)]) == 0
    resume = f"resume_from_checkpoint={tmp_path / 'run' / 'checkpoint-2'}"
    assert cli.main(["--quiet", "train", str(config), "max_steps=4", resume]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "trainer_log.jsonl").read_text().splitlines()]
    assert [row["learning_rate"] for row in rows if row["step"] > 0] == [1e-2] * 4


def test_a_warmup_given_as_a_ratio_of_the_run_refuses_a_resume_of_another_length(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path, capsys
) -> None:
    """constant_with_warmup keeps every step's learning rate in a longer run only when its warmup is a count
    of steps: a ratio of the run would end the warmup later, and the learning rate would drop mid-run."""
    rates = {}
    for name, warmup in (
        ("ratio", {"warmup_ratio": 0.5}),
        ("count", {"warmup_ratio": 0.0, "warmup_steps": 1}),
    ):
        changes = {"lr_scheduler_type": "constant_with_warmup", "save_steps": 2, "eval_steps": None, **warmup}
        config = _config(
            tmp_path, qpissa_dir, data_dir, max_steps=2, output_dir=str(tmp_path / name), **changes
        )
        assert cli.main(["--quiet", "train", str(config)]) == 0
        resume = f"resume_from_checkpoint={tmp_path / name / 'checkpoint-2'}"
        status = cli.main(["--quiet", "train", str(config), "max_steps=4", resume])
        rows = [json.loads(line) for line in (tmp_path / name / "trainer_log.jsonl").read_text().splitlines()]
        rates[name] = (status, [row["learning_rate"] for row in rows if row["step"] > 0])
    assert rates["count"] == (0, [0.0, 1e-2, 1e-2, 1e-2])
    assert rates["ratio"] == (2, [0.0, 1e-2])  # refused: the log and checkpoints are as they were
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("qpissa: error: resume_from_checkpoint") and "with max_steps=2, which" in error


def test_the_step_0_loss_is_the_first_global_batchs_however_it_is_accumulated(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """Step 0 measured one micro-batch: with gradient accumulation, fewer samples than every later step."""
    losses = []
    for batch, accumulated in ((4, 1), (2, 2)):
        out = tmp_path / f"batch-{batch}"
        changes = {"max_steps": 1, "eval_steps": None, "save_strategy": "no", "output_dir": str(out),
                   "per_device_train_batch_size": batch,
                   "gradient_accumulation_steps": accumulated}  # fmt: skip
        assert cli.main(["--quiet", "train", str(_config(tmp_path, qpissa_dir, data_dir, **changes))]) == 0
        losses.append(_losses(out)[0])
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_a_run_saved_with_save_only_model_is_told_unresumable_when_it_starts_and_resumes(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path, caplog, capsys
) -> None:
    """Its checkpoints hold no optimizer state: the resume said optimizer.pt was missing and pointed to an
    earlier checkpoint-N, which lacks it too."""
    from qpissa.recipe_file import load_config
    from qpissa.train import train

    changes = {"max_steps": 2, "save_steps": 1, "save_total_limit": None, "eval_steps": None}
    config = _config(tmp_path, qpissa_dir, data_dir, save_only_model=True, **changes)
    with caplog.at_level("WARNING"):
        train(load_config(config, []), show_progress=False)
    assert any("save_only_model=true: checkpoints hold the adapter" in r.getMessage() for r in caplog.records)
    run = tmp_path / "run"
    log = (run / "trainer_log.jsonl").read_bytes()
    assert cli.main(["--quiet", "train", str(config), f"resume_from_checkpoint={run / 'checkpoint-1'}"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"qpissa: error: resume_from_checkpoint {run / 'checkpoint-1'} holds the adapter")
    assert "its run was saved with save_only_model=true" in error and "earlier checkpoint" not in error
    assert (run / "trainer_log.jsonl").read_bytes() == log


@pytest.fixture(scope="module")
def mixed_run(qpissa_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two steps on two data sources, 8 records drawn from each; checkpoint-2 is the last step."""
    tmp = tmp_path_factory.mktemp("mixed")
    sources = [{"path": str(data_dir / name), "samples": 8} for name in ("train.jsonl", "eval.jsonl")]
    data = {"path": None, "sources": sources}
    config = _config(tmp, qpissa_dir, data_dir, max_steps=2, save_steps=2, eval_steps=None, data=data)
    assert cli.main(["--quiet", "train", str(config)]) == 0
    return tmp / "run"


def _resume_a_copy(run: Path, tmp_path: Path, *overrides: str) -> tuple[Path, int]:
    """Resume a copy of `run` from its newest checkpoint with the recipe it was trained with, overridden."""
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(json.loads((copy / "qpissa_run.json").read_text())["config"]))
    status = cli.main(["--quiet", "train", str(recipe), f"output_dir={copy}", "resume_from_checkpoint=true",
                       *overrides])  # fmt: skip
    return copy, status


@pytest.mark.parametrize(
    ("base", "overrides", "message"),
    [
        ("run", ["optim=adafactor"], "with optim='adamw_torch', which this config changes, but the check"),
        ("run", ["adam_beta2=0.99", "adam_epsilon=1e-6"], "with adam_beta2=0.999, adam_epsilon=1e-08, which"),
        ("run", ["weight_decay=0.1", "optim_args=amsgrad=True"], "weight_decay=0.0, optim_args=None, which"),
        ("run", ["data.path=DATA/eval.jsonl"], "continues a run on other training samples: what the config"),
        ("run", ["data_seed=7"], "with data_seed=3, which this config changes"),
        ("run", ["train_sampling_strategy=sequential"], "with train_sampling_strategy='random', which"),
        ("run", ["dataloader_drop_last=true"], "with dataloader_drop_last=False, which this config changes"),
        (
            "mixed_run",
            ["data.sources.0.samples=16", "data.sources.1.samples=2"],
            "with data.sources.0.samples=8.0, data.sources.1.samples=8.0, which this config changes",
        ),
        (
            "mixed_run",
            ["data.sources=[{path: DATA/train.jsonl}]"],
            "with data.sources.0.samples=8.0, data.sources.1.samples=8.0, data.sources.1.split='train', whi",
        ),
        ("mixed_run", ["data.sources.1.path=DATA/train.jsonl"], "continues a run on other training samples"),
    ],
)
def test_a_resume_with_other_optimizer_or_data_settings_is_refused_and_touches_nothing(
    base: str,
    overrides: list[str],
    message: str,
    data_dir: Path,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    capsys,
) -> None:
    """The saved optimizer state would win over other optimizer settings, silently; other data would not
    continue the run: both are refused before anything in the run directory changes."""
    original = request.getfixturevalue(base)
    overrides = [override.replace("DATA", str(data_dir)) for override in overrides]
    copy, status = _resume_a_copy(original, tmp_path, *overrides)
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("qpissa: error: resume_from_checkpoint")
    assert message.replace("DATA", str(data_dir)) in error
    assert sorted(path.relative_to(copy) for path in copy.rglob("*")) == sorted(
        path.relative_to(original) for path in original.rglob("*")
    )
    for name in ("qpissa_run.json", "trainer_log.jsonl"):
        assert (copy / name).read_bytes() == (original / name).read_bytes()


def test_a_checkpoint_named_relative_to_output_dir_is_pointed_to(run: Path, tmp_path: Path, capsys) -> None:
    """`resume_from_checkpoint=checkpoint-8` is relative to the working directory: it was said to be no
    checkpoint-N directory of a run, which the one in output_dir is."""
    copy, status = _resume_a_copy(run, tmp_path, f"resume_from_checkpoint=checkpoint-{STEPS}")
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(
        f"qpissa: error: resume_from_checkpoint checkpoint-{STEPS} does not exist (a relative"
    )
    assert (
        f"write resume_from_checkpoint={copy / f'checkpoint-{STEPS}'}, or resume_from_checkpoint=true"
        in error
    )


def test_a_run_an_earlier_tokenization_started_is_said_to_be_one(run: Path, tmp_path: Path, capsys) -> None:
    """A run whose samples an earlier qpissa tokenized otherwise was refused as if its data had changed."""
    earlier = tmp_path / "earlier"
    shutil.copytree(run, earlier)
    marker = json.loads((earlier / "qpissa_run.json").read_text())
    del marker["tokenization"]
    marker["data_fingerprint"] = "0" * 64  # what the earlier tokenization hashed to
    (earlier / "qpissa_run.json").write_text(json.dumps(marker))
    _, status = _resume_a_copy(earlier, tmp_path)
    assert status == 2
    assert "whose samples an earlier qpissa tokenized otherwise" in capsys.readouterr().err


def test_a_resume_with_what_does_not_change_the_training_is_accepted(
    run: Path, data_dir: Path, tmp_path: Path
) -> None:
    """`auto` is the optimizer it resolved to, the Trainer's defaults are as good as left out, the held-out
    data's settings and tokenizing processes do not change what is trained, and a moved data file is the
    same data."""
    moved = tmp_path / "moved" / "train.jsonl"
    moved.parent.mkdir()
    shutil.copy(data_dir / "train.jsonl", moved)
    overrides = [
        "optim=adamw_torch",
        "adam_beta2=0.999",
        "adam_epsilon=1e-8",
        "data.eval_generate_samples=0",
        "data.num_proc=1",
        f"data.path={moved}",
    ]  # fmt: skip  (YAML reads 1e-8 as text)
    copy, status = _resume_a_copy(run, tmp_path, *overrides)
    assert status == 0 and _losses(copy) == _losses(run)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {"path": "nope.jsonl", "format": "prompt_completion"}}, "does not exist"),
        (
            {"data": {"path": "BAD", "format": "prompt_completion"}},
            "record 1: missing or null field `completion`",
        ),
        ({"data": {"path": "TRAIN", "format": "messages"}}, "missing or null field `messages`"),
        ({"bf16": True}, "bf16=true needs a CUDA GPU"),
        ({"optim": "paged_adamw_8bit"}, "needs CUDA"),
        ({"device": "cuda"}, "no CUDA GPU"),
        ({"learning_rat": 1e-4}, "unknown setting `learning_rat`"),
        ({"max_steps": "ten"}, "`max_steps` must be int"),
        ({"data": {"max_seq_len": "long"}}, "`data.max_seq_len` must be int"),
        ({"eval_steps": 5, "data": {"eval_path": None}}, "eval_path"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    change: dict,
    message: str,
    qpissa_dir: Path,
    data_dir: Path,
    tmp_path: Path,
    capsys,
) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    names = {"BAD": str(bad), "TRAIN": str(data_dir / "train.jsonl")}
    for key, value in change.items():
        if isinstance(value, str):
            change[key] = names.get(value, value)
        elif isinstance(value, dict) and "path" in value:
            value["path"] = names.get(value["path"], value["path"])
    assert cli.main(["--quiet", "train", str(_config(tmp_path, qpissa_dir, data_dir, **change))]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # datasets may draw a progress bar before it
    assert error.startswith("qpissa: error:") and message in error
    assert not (tmp_path / "run").exists()


def test_chat_format_without_template_is_refused(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path, capsys
) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(qpissa_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((plain / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    messages = tmp_path / "m.jsonl"
    messages.write_text(
        json.dumps({"messages": [{"content": "a", "role": "user"}, {"content": "b", "role": "assistant"}]})
    )
    data = {"path": str(messages), "format": "messages"}
    assert cli.main(["--quiet", "train", str(_config(tmp_path, plain, data_dir, data=data))]) == 2
    assert "no chat template" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_a_run_cut_short_by_a_full_disk_can_be_overwritten(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """All that a run killed by a full disk may leave is its marker's temporary file: it is still a run."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "qpissa_run.json.tmp").write_text('{"conf')
    config = _config(tmp_path, qpissa_dir, data_dir, max_steps=1, eval_steps=None, overwrite_output_dir=True)
    assert cli.main(["--quiet", "train", str(config)]) == 0
    assert not (tmp_path / "run" / "qpissa_run.json.tmp").exists() and (tmp_path / "run" / "adapter").is_dir()


def test_high_learning_rate_warns(qpissa_dir: Path, data_dir: Path, tmp_path: Path, caplog) -> None:
    from qpissa.recipe_file import load_config
    from qpissa.train import train

    config = load_config(_config(tmp_path, qpissa_dir, data_dir, max_steps=1, eval_steps=None), [])
    with caplog.at_level("WARNING"):
        train(config, show_progress=False)
    assert any("tend to diverge" in record.message for record in caplog.records)


def test_eval_path_folder_is_evaluated_on_its_held_out_split(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path, caplog
) -> None:
    """A folder given as both data and eval_path trains on train.jsonl and evaluates eval.jsonl (its test
    split); asking for its train split is evaluating training data, and is said."""
    from qpissa.recipe_file import load_config
    from qpissa.train import train

    folder = tmp_path / "task"
    folder.mkdir()
    shutil.copy(data_dir / "train.jsonl", folder / "train.jsonl")
    (folder / "eval.jsonl").write_text("".join((data_dir / "eval.jsonl").read_text().splitlines(True)[:2]))
    tokens = {}
    for split in (None, "train"):
        run = tmp_path / f"run-{split}"
        data = {"path": str(folder), "eval_path": str(folder), "eval_split": split}
        config = load_config(
            _config(tmp_path, qpissa_dir, data_dir, max_steps=1, output_dir=str(run), data=data), []
        )
        caplog.clear()
        with caplog.at_level("WARNING", logger="qpissa.train"):
            train(config, show_progress=False)
        warned = [r.getMessage() for r in caplog.records if "is training data" in r.getMessage()]
        assert len(warned) == (split == "train"), warned
        tokens[split] = json.loads((run / "eval_results.json").read_text())["tokens"]
    assert tokens[None] * 4 < tokens["train"]  # 2 held-out records, not the 16 trained on


def test_held_out_text_or_empty_prompts_are_evaluated_without_generating_from_nothing(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path, caplog
) -> None:
    """Held-out text (continued pretraining), with the default data.eval_generate_samples, crashed the run
    at its first evaluation, as did a held-out prompt_completion record with an empty prompt: such records
    are scored by loss only; a generation asked for in the recipe is said to be skipped, once."""
    from qpissa.recipe_file import load_config
    from qpissa.train import train

    prose = [{"text": f"Record {i} is prose."} for i in range(4)]
    (tmp_path / "text.jsonl").write_text("".join(json.dumps(record) + "\n" for record in prose))
    pairs = [{"prompt": "", "completion": "Once upon a time"}, {"prompt": "1+1=", "completion": " 2"}]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(record) + "\n" for record in pairs))
    text = {"path": str(tmp_path / "text.jsonl"), "eval_path": str(tmp_path / "text.jsonl"), "format": "text"}
    cases = {
        "default": ({**text, "eval_generate_samples": 64}, None),  # the default, as a recipe leaves it
        "asked": ({**text, "eval_generate_samples": 8}, None),
        "pairs": ({"eval_path": str(tmp_path / "pairs.jsonl"), "eval_generate_samples": 8}, 1),
    }
    for name, (data, answered) in cases.items():
        run = tmp_path / name
        changes = {"max_steps": 2, "eval_steps": 1, "save_steps": 2, "output_dir": str(run), "data": data}
        caplog.clear()
        with caplog.at_level("INFO", logger="qpissa.task_eval"):
            train(load_config(_config(tmp_path, qpissa_dir, data_dir, **changes), []), show_progress=False)
        evals = [*_evals(run), json.loads((run / "eval_results.json").read_text())]
        assert [row.get("total") for row in evals] == [answered] * 3, name
        assert all(row.get("eval_loss", row.get("loss")) > 0 for row in evals), name
        said = [r.getMessage() for r in caplog.records if "no answers to generate" in r.getMessage()]
        assert len(said) == (name == "asked"), (name, said)


def test_a_log_gets_no_progress_bars(qpissa_dir: Path, data_dir: Path, tmp_path: Path, capsys) -> None:
    """stderr redirected to a file (here: captured) gets neither the training bar nor the evaluations'."""
    config = _config(tmp_path, qpissa_dir, data_dir, max_steps=2, eval_steps=1)
    assert cli.main(["train", str(config)]) == 0
    err = capsys.readouterr().err
    assert "it/s]" not in err and "s/it]" not in err and "%|" not in err, err


def test_load_best_model_at_end_chooses_among_every_step_the_trainer_evaluated(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    changes = {"max_steps": 2, "eval_steps": 1, "save_steps": 1, "save_total_limit": None,
               "load_best_model_at_end": True, "metric_for_best_model": "eval_loss"}  # fmt: skip
    assert cli.main(["--quiet", "train", str(_config(tmp_path, qpissa_dir, data_dir, **changes))]) == 0
    run = tmp_path / "run"
    evals = [json.loads(line) for line in (run / "eval_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [1, 2]  # the last step too, so it can be the best
    state = json.loads((run / "checkpoint-2" / "trainer_state.json").read_text())
    best = min(evals, key=lambda e: e["eval_loss"])["step"]
    assert state["best_model_checkpoint"] == str(run / f"checkpoint-{best}")
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    chosen = load_file(run / f"checkpoint-{best}" / "adapter_model.safetensors")
    assert adapter.keys() == chosen.keys() and all(adapter[k].equal(chosen[k]) for k in adapter)


def test_save_strategy_best_saves_the_last_step_when_it_is_the_best(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """Without load_best_model_at_end train evaluated the last step itself, after the Trainer: the Trainer
    never saw that step's loss, and never saved it, however good."""
    changes = {"max_steps": 2, "eval_steps": 1, "save_strategy": "best", "metric_for_best_model": "loss",
               "save_total_limit": None, "data": {"eval_generate_samples": 0}}  # fmt: skip
    assert cli.main(["--quiet", "train", str(_config(tmp_path, qpissa_dir, data_dir, **changes))]) == 0
    run = tmp_path / "run"
    evals = _evals(run)
    assert [e["step"] for e in evals] == [1, 2] and evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    final = json.loads((run / "eval_results.json").read_text())
    assert final["loss"] == pytest.approx(evals[1]["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_the_trainers_eval_loss_is_weighted_by_tokens_as_the_final_evaluation(
    packing: bool, qpissa_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """The Trainer's evaluations (which load_best_model_at_end chooses by) and train's final evaluation of
    one adapter agree: answers of 1 to 7 digits in batches of 3 hold different token counts, which a mean
    of batch means weighs alike; packed, each batch is one row of 3 samples."""
    records = [{"prompt": f"{i}%10=", "completion": f" {i % 10}" * (1 + i % 7)} for i in range(11)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    changes = {"max_steps": 4, "eval_steps": 4, "save_steps": 4, "per_device_eval_batch_size": 3,
               "load_best_model_at_end": True, "metric_for_best_model": "eval_loss",
               "data": {"eval_path": str(tmp_path / "eval.jsonl"), "packing": packing}}  # fmt: skip
    assert cli.main(["--quiet", "train", str(_config(tmp_path, qpissa_dir, data_dir, **changes))]) == 0
    run = tmp_path / "run"
    evals = [json.loads(line) for line in (run / "eval_log.jsonl").read_text().splitlines()]
    final = json.loads((run / "eval_results.json").read_text())
    assert [e["step"] for e in evals] == [4]
    assert evals[0]["eval_loss"] == pytest.approx(final["loss"], rel=1e-5)


def test_every_evaluated_step_has_one_line_in_the_eval_log(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """Evaluations per epoch end with the final evaluation's line only; eval_on_start, resumed, evaluates
    the checkpoint's step again in place of its line."""
    changes = {"max_steps": -1, "num_train_epochs": 2, "eval_steps": None, "eval_strategy": "epoch",
               "save_strategy": "epoch", "data": {"eval_generate_samples": 0}}  # fmt: skip
    assert cli.main(["--quiet", "train", str(_config(tmp_path, qpissa_dir, data_dir, **changes))]) == 0
    assert [row["step"] for row in _evals(tmp_path / "run")] == [4, 8]
    changes = {"max_steps": 4, "eval_steps": 2, "save_steps": 2, "save_total_limit": None,
               "eval_on_start": True, "data": {"eval_generate_samples": 0}}  # fmt: skip
    config = _config(tmp_path, qpissa_dir, data_dir, output_dir=str(tmp_path / "start"), **changes)
    assert cli.main(["--quiet", "train", str(config)]) == 0
    run = tmp_path / "start"
    whole = _evals(run)
    assert [row["step"] for row in whole] == [0, 2, 4]
    shutil.rmtree(run / "checkpoint-4")
    assert cli.main(["--quiet", "train", str(config), f"resume_from_checkpoint={run / 'checkpoint-2'}"]) == 0
    resumed = _evals(run)
    assert [row["step"] for row in resumed] == [0, 2, 4]
    assert [row["eval_loss"] for row in resumed] == pytest.approx(
        [row["eval_loss"] for row in whole], rel=1e-5
    )


@pytest.mark.integration
def test_demo_recipe_runs_on_the_demo_model(demo_model: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    qpissa_dir = tmp_path / "qpissa-r8"
    assert (
        cli.main(["--quiet", "convert", str(demo_model), str(qpissa_dir), "--rank", "8", "--iters", "1"]) == 0
    )
    tool = Path(__file__).parents[1] / "tools" / "make_task_data.py"
    subprocess.run(
        [sys.executable, str(tool), str(tmp_path / "task"), "--train", "64", "--eval", "8"], check=True
    )
    config = Path(__file__).parents[1] / "configs" / "demo.yaml"
    task = tmp_path / "task"
    overrides = [f"model={qpissa_dir}", f"output_dir={tmp_path / 'run'}", f"data.path={task / 'train.jsonl'}",
                 f"data.eval_path={task / 'eval.jsonl'}", "max_steps=3", "eval_steps=3", "save_steps=3",
                 "data.eval_generate_samples=4"]  # fmt: skip
    assert cli.main(["--quiet", "train", str(config), *overrides]) == 0
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == [0, 1, 2, 3] and all(0 < loss < 10 for loss in losses.values())
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    results = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert results["total"] == 4 and results["loss"] > 0


def test_a_resume_from_the_last_steps_checkpoint_finishes_without_training(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """Ctrl-C during the final evaluation points at the last checkpoint: resuming there trains no step more
    (transformers would train one past max_steps), and the run ends as the uninterrupted one did."""
    constant = {"lr_scheduler_type": "constant", "warmup_ratio": 0.0, "save_steps": 2, "eval_steps": None}
    config = _config(tmp_path, qpissa_dir, data_dir, max_steps=2, **constant)
    run = tmp_path / "run"
    assert cli.main(["--quiet", "train", str(config)]) == 0
    finished = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    evaluated = json.loads((run / "eval_results.json").read_text())
    shutil.rmtree(run / "adapter")
    (run / "eval_results.json").unlink()
    assert cli.main(["--quiet", "train", str(config), f"resume_from_checkpoint={run / 'checkpoint-2'}"]) == 0
    assert sorted(_losses(run)) == [0, 1, 2] and not (run / "checkpoint-3").exists()
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == finished
    assert json.loads((run / "eval_results.json").read_text()) == evaluated
    assert [row["step"] for row in _evals(run)] == [2]  # the final evaluation's line, once


def test_samples_beyond_the_models_context_are_not_advised_a_longer_max_seq_len(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path, capsys
) -> None:
    """At max_seq_len = the model's context (256 positions) raising it is refused, so it is not advised."""
    long = tmp_path / "long.jsonl"
    long.write_text(
        "".join(json.dumps({"prompt": "q" * 300, "completion": f" {i}"}) + "\n" for i in range(4))
    )
    config = _config(tmp_path, qpissa_dir, data_dir, data={"path": str(long), "max_seq_len": 256})
    assert cli.main(["--quiet", "train", str(config)]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "max_seq_len=256 tokens, the model's whole context" in error and "raise" not in error
    assert not (tmp_path / "run").exists()


def test_step_line_writes_every_learning_rate_in_one_notation(tmp_path: Path, caplog) -> None:
    """Warmup from 0, peak 1e-4, then 5e-5: one notation reads as one schedule (%g mixed 0.0001, 5e-05)."""
    callback = JsonlLogCallback(
        tmp_path / "log.jsonl", tmp_path / "eval.jsonl", torch.device("cpu"), None, every=1
    )
    state = TrainerState(max_steps=3, is_world_process_zero=True)
    with caplog.at_level("INFO", logger="qpissa.trainlog"):
        for step, learning_rate in enumerate([0.0, 1e-4, 5e-5], start=1):
            state.global_step = step
            callback.on_log(
                None, state, None, logs={"loss": 1.0, "learning_rate": learning_rate, "grad_norm": 1.0}
            )
    rates = [re.search(r" lr (\S+) ", record.getMessage()).group(1) for record in caplog.records]
    assert rates == ["0.00e+00", "1.00e-04", "5.00e-05"]


def test_a_ratio_of_logging_steps_prints_that_share_of_the_runs_steps(tmp_path: Path, caplog) -> None:
    callback = JsonlLogCallback(
        tmp_path / "log.jsonl", tmp_path / "eval.jsonl", torch.device("cpu"), None, every=0.25
    )
    state = TrainerState(max_steps=8, is_world_process_zero=True)
    callback.on_train_begin(TrainingArguments(tmp_path, eval_on_start=False), state, None)
    with caplog.at_level("INFO", logger="qpissa.trainlog"):
        for step in range(1, 9):
            state.global_step = step
            callback.on_log(None, state, None, logs={"loss": 1.0, "learning_rate": 1e-4, "grad_norm": 1.0})
    assert [re.search(r"step (\d+)/8", r.getMessage()).group(1) for r in caplog.records] == [
        "2",
        "4",
        "6",
        "8",
    ]


def test_a_run_trained_on_all_tokens_is_evaluated_as_qpissa_eval_evaluates_it(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path, capsys
) -> None:
    """With `data.response_only: false` the run's held-out loss counted prompt tokens too, `qpissa eval`
    only responses: two losses of one adapter on one file. Both are on the responses."""
    config = _config(
        tmp_path, qpissa_dir, data_dir, max_steps=2, eval_steps=None, data={"response_only": False}
    )
    assert cli.main(["--quiet", "train", str(config)]) == 0
    capsys.readouterr()
    trained = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    eval_file = str(data_dir / "eval.jsonl")
    assert cli.main(["--quiet", "eval", str(tmp_path / "run"), "--data", eval_file, "--metric", "loss"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["tokens"] == trained["tokens"]
    assert evaluated["loss"] == pytest.approx(trained["loss"], rel=1e-4)


def test_an_output_dir_that_is_a_link_is_written_through(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """overwrite_output_dir over a linked run ended in `rmtree` on the link (a traceback)."""
    (tmp_path / "disk").mkdir()
    link = tmp_path / "runlink"
    link.symlink_to(tmp_path / "disk")
    config = _config(tmp_path, qpissa_dir, data_dir, output_dir=str(link), max_steps=1, eval_steps=None)
    assert cli.main(["--quiet", "train", str(config)]) == 0
    assert cli.main(["--quiet", "train", str(config), "overwrite_output_dir=true"]) == 0
    assert link.is_symlink() and (tmp_path / "disk" / "adapter" / "adapter_model.safetensors").is_file()
