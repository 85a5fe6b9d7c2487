"""`qpissa compare` on a tiny model: conversions, fidelity, report; a re-run redoes nothing finished."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest

from qpissa import cli
from qpissa.artifacts import COMPARE_NAME, FIDELITY_NAME, REPORT_NAME
from qpissa.run_marker import run_model

FLAGS = ["--rank", "4", "--iters", "2", "--max-tokens", "96", "--window", "48"]


@pytest.fixture(scope="module")
def comparison(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished comparison of QLoRA and QPiSSA (LoftQ is added by a later test)."""
    out = tmp_path_factory.mktemp("compare") / "out"
    assert (
        cli.main(["--quiet", "compare", str(tiny_model), str(out), "--methods", "qlora,qpissa", *FLAGS]) == 0
    )
    return out


@pytest.fixture(scope="module")
def chat_comparison(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished comparison of QLoRA alone on the tiny model with a tokenizer (--calib needs one)."""
    out = tmp_path_factory.mktemp("compare_chat") / "out"
    assert cli.main(["--quiet", "compare", str(tiny_chat_model), str(out), "--methods", "qlora", *FLAGS]) == 0
    return out


def test_compare_writes_conversions_fidelity_and_report(comparison: Path) -> None:
    record = json.loads((comparison / COMPARE_NAME).read_text())
    steps = record["history"][0]["steps"]
    assert [(s["method"], s["step"], s["status"]) for s in steps] == [
        ("qlora", "convert", "done"), ("qpissa", "convert", "done"),
        ("qlora", "fidelity", "done"), ("qpissa", "fidelity", "done"),
    ]  # fmt: skip
    for name in ("report.md", "report.html", "summary.json", "reduction_by_type.png", "fidelity.png"):
        assert (comparison / name).is_file(), name
    summary = json.loads((comparison / "summary.json").read_text())
    for method in ("qlora", "qpissa"):
        conversion = comparison / "conversions" / method
        report = json.loads((conversion / REPORT_NAME).read_text())
        fidelity = json.loads((conversion / FIDELITY_NAME).read_text())
        assert report["settings"]["method"] == method and report["settings"]["rank"] == 4
        assert summary["quality"][method]["avg_fro"] == report["summary"]["avg_fro"]
        for key in ("kl", "top1", "ppl_original", "ppl_model", "tokens"):
            assert summary["fidelity"][method][key] == fidelity[key]
        assert fidelity["tokens"] == 96 - 2  # two windows of 48, each predicting 47 tokens
    assert report["settings"]["iters"] == 2 and summary["fidelity"]["qpissa"]["kl"] > 0
    same = ("seed", "blocksize", "double_quant", "rank", "svd")
    settings = [
        json.loads((comparison / "conversions" / m / REPORT_NAME).read_text())["settings"]
        for m in ("qlora", "qpissa")
    ]
    assert all(settings[0][key] == settings[1][key] for key in same)


def test_rerun_reuses_finished_steps_and_adds_a_method(comparison: Path, tiny_model: Path, capsys) -> None:
    watched = [
        p for m in ("qlora", "qpissa") for p in (comparison / "conversions" / m).rglob("*") if p.is_file()
    ]
    stamps = {p: p.stat().st_mtime_ns for p in watched}
    args = ["--quiet", "compare", str(tiny_model), str(comparison), "--methods", "qlora,loftq,qpissa", *FLAGS]
    assert cli.main(args) == 0
    record = json.loads((comparison / COMPARE_NAME).read_text())
    assert len(record["history"]) == 2
    done = {(s["method"], s["step"]) for s in record["history"][1]["steps"] if s["status"] == "done"}
    reused = {(s["method"], s["step"]) for s in record["history"][1]["steps"] if s["status"] == "reused"}
    assert done == {("loftq", "convert"), ("loftq", "fidelity")}
    assert reused == {(m, s) for m in ("qlora", "qpissa") for s in ("convert", "fidelity")}
    printed = capsys.readouterr().out  # the report's verdict, numbers included, then where it went
    assert "Mean token KL to the original model" in printed and ": 2 done now, 4 reused" in printed
    assert {p: p.stat().st_mtime_ns for p in watched} == stamps  # nothing of the first run was rewritten
    summary = json.loads((comparison / "summary.json").read_text())
    assert summary["methods"] == ["qlora", "loftq", "qpissa"]


def test_other_settings_in_the_same_out_are_refused(comparison: Path, tiny_model: Path, capsys) -> None:
    args = ["compare", str(tiny_model), str(comparison), "--methods", "qlora", "--rank", "8"]
    assert cli.main(args) == 2
    error = capsys.readouterr().err
    assert error == (
        f"qpissa: error: {comparison} holds a comparison made with --rank 4, --iters 2, where this run asks "
        "for --rank 8, the default --iters; rerun with the earlier options to continue it, or choose "
        "another OUT for these\n"
    )


def test_a_rerun_refusal_names_only_the_options_given(
    chat_comparison: Path, tiny_chat_model: Path, tmp_path: Path, capsys
) -> None:
    """--power-iters (whose default follows --calib) and the --calib-* options are not named; no None."""
    calib = tmp_path / "calib.txt"
    calib.write_text("a short calibration text. " * 40)
    record = (chat_comparison / COMPARE_NAME).read_text()
    files = sorted(chat_comparison.rglob("*"))
    args = ["compare", str(tiny_chat_model), str(chat_comparison), "--methods", "qlora,qpissa", *FLAGS,
            "--calib", str(calib), "--calib-samples", "8", "--calib-seq-len", "16"]  # fmt: skip
    assert cli.main(args) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"qpissa: error: {chat_comparison} holds a comparison made with no --calib, where this run asks for "
        f"--calib {calib}; rerun with the earlier options to continue it, or choose another OUT for these"
    )
    assert (chat_comparison / COMPARE_NAME).read_text() == record
    assert sorted(chat_comparison.rglob("*")) == files  # nothing converted, whichever test ran first


def test_a_rerun_with_other_fidelity_settings_measures_every_method_with_them(
    chat_comparison: Path,
    tiny_chat_model: Path,
    capfd: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """QLoRA, compared by an earlier run, is measured again on the tokens this run asks for: one report
    never mixes two settings under one label."""
    caplog.set_level(logging.INFO)  # and so the conversion's own process logs its notes
    args = ["compare", str(tiny_chat_model), str(chat_comparison), "--methods", "qpissa", *FLAGS,
            "--max-tokens", "48"]  # fmt: skip
    assert cli.main(args) == 0
    steps = json.loads((chat_comparison / COMPARE_NAME).read_text())["history"][-1]["steps"]
    assert {(s["method"], s["step"], s["status"]) for s in steps} == {
        ("qlora", "convert", "reused"), ("qpissa", "convert", "done"),
        ("qlora", "fidelity", "done"), ("qpissa", "fidelity", "done"),
    }  # fmt: skip
    summary = json.loads((chat_comparison / "summary.json").read_text())
    assert summary["methods"] == ["qlora", "qpissa"]
    assert [row["tokens"] for row in summary["fidelity"].values()] == [47, 47]  # qlora's too: was 94
    assert "Fidelity measured on 48 tokens of" in (chat_comparison / "report.md").read_text()
    printed = capfd.readouterr()
    assert "qlora" in printed.out  # the printed verdict holds every method compared
    assert "--resume" not in printed.err  # qpissa's conversion logs no note on a flag nobody passed
    assert f"{chat_comparison} holds qlora from an earlier run as well" in caplog.text  # told, not silent


def test_a_reused_conversion_is_logged_as_reused(
    chat_comparison: Path, tiny_chat_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not as `convert --resume` logs it, with a colon before a report that compare does not print."""
    args = ["compare", str(tiny_chat_model), str(chat_comparison), "--methods", "qlora", *FLAGS]
    with caplog.at_level(logging.INFO):
        assert cli.main(args) == 0
    messages = [record.getMessage() for record in caplog.records]
    reused = f"{chat_comparison / 'conversions' / 'qlora'}: converted already, with the same settings; reused"
    assert reused in messages
    assert not [message for message in messages if message.endswith(":")]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "qlora,dora"], "--methods"),
        (["--methods", "qlora,qlora"], "names a method twice"),
        (["--train", "/nonexistent.yaml"], "--train"),
        (["--window", "1"], "--window"),
        pytest.param(  # fidelity runs on a CPU
            ["--rank", "4", "--blocksize", "128"],
            "decodes NF4 weights 64 wide",
            marks=pytest.mark.misdecoding_cpu,
        ),
        (["--rank", "4", "--layer", "nope"], "--layer nope is not a matrix the conversions decompose"),  # was
        # said after every conversion and measurement, when the report was drawn
    ],
)
def test_bad_flags_are_user_errors(
    extra: list[str], message: str, tiny_model: Path, tmp_path: Path, capsys
) -> None:
    assert cli.main(["compare", str(tiny_model), str(tmp_path / "out"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_an_occupied_out_is_refused(tiny_model: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert cli.main(["compare", str(tiny_model), str(tmp_path / "out"), "--rank", "4"]) == 2
    assert "is not a comparison directory" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]


def _train_recipe(tmp_path: Path, samples: int, settings: str) -> Path:
    """A recipe training on `samples` sums (`data.jsonl`) in batches of 4, logging every step."""
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(json.dumps({"prompt": f"{i}+1=", "completion": f"{i + 1}"}) + "\n" for i in range(samples))
    )
    config = tmp_path / "train.yaml"
    config.write_text(
        f"data:\n  path: {data}\n  format: prompt_completion\n  max_seq_len: 32\n"
        f"per_device_train_batch_size: 4\nlogging_steps: 1\n{settings}"
    )
    return config


def test_train_runs_each_method_with_one_config_and_reuses_runs(
    tiny_chat_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = tiny_chat_model  # training needs a tokenizer
    config = _train_recipe(tmp_path, 16, "max_steps: 2\nlearning_rate: 1.0e-3\nsave_steps: 100\n")
    out = tmp_path / "out"
    args = [
        "--quiet",
        "compare",
        str(model),
        str(out),
        "--methods",
        "qlora,qpissa",
        "--train",
        str(config),
        *FLAGS,
    ]
    assert cli.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    for method in ("qlora", "qpissa"):
        run = json.loads((out / "runs" / method / "qpissa_run.json").read_text())
        assert Path(run["model"]) == (out / "conversions" / method).resolve()
        assert run["config"]["learning_rate"] == 1e-3 and run["config"]["max_steps"] == 2
        log = [
            json.loads(line)
            for line in (out / "runs" / method / "trainer_log.jsonl").read_text().splitlines()
        ]
        assert summary["training"][method]["curve"] == [[e["step"], e["loss"]] for e in log]
        assert log[-1]["step"] == 2
    assert "loss_curves" in summary["plots"]
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    assert cli.main([*args, "--methods", "qpissa"]) == 0  # qlora stays in the comparison, checked alike
    steps = json.loads((out / COMPARE_NAME).read_text())["history"][-1]["steps"]
    assert {s["status"] for s in steps} == {"reused"} and len(steps) == 6
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()} == stamps
    config.write_text(config.read_text().replace("max_steps: 2", "max_steps: 3"))
    with caplog.at_level(logging.INFO, logger="qpissa"):
        assert cli.main([*args, "--methods", "qpissa"]) == 0  # another recipe: both trained again, told
    again = [r.getMessage() for r in caplog.records if r.getMessage().endswith("training it again")]
    assert len(again) == 2 and "was trained with another --train recipe" in again[0]


def _training_rows(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())["training"]


def test_a_moved_comparison_keeps_its_runs_and_changed_data_trains_again(
    tiny_chat_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Runs recorded their conversion's absolute path: a moved comparison trained every run again, and its
    report split each method into a conversion row and a run row. The same path with other contents was
    reused as if it held the samples the run trained on."""
    config = _train_recipe(tmp_path, 8, "max_steps: 1\n")
    data = tmp_path / "data.jsonl"
    out, moved = tmp_path / "out", tmp_path / "moved"
    flags = ["--methods", "qlora", "--train", str(config), *FLAGS]
    assert cli.main(["--quiet", "compare", str(tiny_chat_model), str(out), *flags]) == 0
    rows = _training_rows(out)
    out.rename(moved)
    assert cli.main(["--quiet", "compare", str(tiny_chat_model), str(moved), *flags]) == 0
    steps = json.loads((moved / COMPARE_NAME).read_text())["history"][-1]["steps"]
    assert [s["status"] for s in steps] == ["reused"] * 3
    assert _training_rows(moved).keys() == rows.keys() == {"qlora"}  # the run is its conversion's row
    assert run_model(moved / "runs" / "qlora") == moved / "conversions" / "qlora"  # eval, export, chat
    shutil.copytree(moved / "conversions", out / "conversions")  # where the runs' markers point
    copy = tmp_path / "copy"
    shutil.copytree(moved, copy)  # its runs name a conversion elsewhere, the same: still one row each
    assert cli.main(["--quiet", "report", str(copy), "--out", str(tmp_path / "report")]) == 0
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["methods"] == ["qlora"]
    again = [
        "--quiet",
        "convert",
        str(tiny_chat_model),
        str(out / "conversions" / "qlora"),
        "--rank",
        "2",
        "--overwrite",
    ]
    assert cli.main(again) == 0  # the old path holds another conversion now
    assert run_model(moved / "runs" / "qlora") == moved / "conversions" / "qlora"
    data.write_text(data.read_text().replace("+1=", "+2="))  # same path, same size, other samples
    with caplog.at_level(logging.INFO, logger="qpissa"):
        assert cli.main(["--quiet", "compare", str(tiny_chat_model), str(moved), *flags]) == 0
    steps = json.loads((moved / COMPARE_NAME).read_text())["history"][-1]["steps"]
    assert [s["status"] for s in steps] == ["reused", "reused", "done"]
    assert any("trained on other samples" in r.getMessage() for r in caplog.records)


def test_a_bad_train_config_is_refused_before_converting(tiny_model: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "train.yaml"
    config.write_text("learning_rate: 1.0e-4\nno_such_key: 1\ndata:\n  path: x.jsonl\n")
    assert cli.main(["compare", str(tiny_model), str(tmp_path / "out"), "--train", str(config)]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("model", "max_seq_len", "extra", "message"),
    [
        ("tiny_chat_model", 100000, "", "`data.max_seq_len` 100000 is longer than the model's context (256"),
        ("tiny_model", 32, "", "holds no tokenizer"),
        ("tiny_chat_model", 32, "chat_template: no_such.jinja", "is neither a file nor a Jinja template"),
    ],
)
def test_a_train_config_the_model_cannot_train_on_is_refused_before_converting(
    model: str, max_seq_len: int, extra: str, message: str, data_dir: Path, tmp_path: Path, capsys, request
) -> None:
    """What `train` would refuse only after every method was converted, for lack of the original's context,
    tokenizer or a chat template."""
    config = tmp_path / "train.yaml"
    config.write_text(f"data:\n  path: {data_dir / 'train.jsonl'}\n  max_seq_len: {max_seq_len}\n{extra}\n")
    model_dir = request.getfixturevalue(model)
    args = ["compare", str(model_dir), str(tmp_path / "out"), "--methods", "qlora", "--train", str(config)]
    assert cli.main([*args, *FLAGS]) == 2
    error = capsys.readouterr().err
    assert error.startswith("qpissa: error: ") and error.count("\n") == 1 and message in error
    assert not (tmp_path / "out").exists()


def test_a_sources_missing_split_is_named_by_its_own_setting_before_converting(
    tiny_chat_model: Path, data_dir: Path, tmp_path: Path, capsys
) -> None:
    """compare's early check told a source's missing split as `data.split`, a key refused beside sources."""
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(data_dir / "train.jsonl", folder / "train.jsonl")
    config = tmp_path / "train.yaml"
    config.write_text(f"data:\n  max_seq_len: 32\n  sources:\n    - path: {folder}\n      split: nosuch\n")
    args = [
        "compare",
        str(tiny_chat_model),
        str(tmp_path / "out"),
        "--methods",
        "qlora",
        "--train",
        str(config),
    ]
    assert cli.main([*args, *FLAGS]) == 2
    error = capsys.readouterr().err
    assert "set data.sources.0.split" in error and error.count("\n") == 1


def test_matching_conversions_already_in_out_are_reused(tiny_model: Path, tmp_path: Path) -> None:
    from qpissa.convert import convert
    from qpissa.convert_settings import ConvertSettings, Method

    out = tmp_path / "out"
    convert(
        tiny_model,
        out / "conversions" / "qlora",
        ConvertSettings(method=Method.QLORA, rank=4),
        show_progress=False,
    )
    stamp = (out / "conversions" / "qlora" / REPORT_NAME).stat().st_mtime_ns
    assert cli.main(["--quiet", "compare", str(tiny_model), str(out), "--methods", "qlora", *FLAGS]) == 0
    steps = json.loads((out / COMPARE_NAME).read_text())["history"][-1]["steps"]
    assert [(s["step"], s["status"]) for s in steps] == [("convert", "reused"), ("fidelity", "done")]
    assert (out / "conversions" / "qlora" / REPORT_NAME).stat().st_mtime_ns == stamp


def test_a_damaged_fidelity_measurement_is_measured_again(tiny_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["--quiet", "compare", str(tiny_model), str(out), "--methods", "qlora", *FLAGS]
    assert cli.main(args) == 0
    saved = out / "conversions" / "qlora" / FIDELITY_NAME
    measured = json.loads(saved.read_text())["kl"]
    saved.write_text('{"key": ')  # a write cut short
    assert cli.main(args) == 0
    steps = json.loads((out / COMPARE_NAME).read_text())["history"][-1]["steps"]
    assert [(s["step"], s["status"]) for s in steps] == [("convert", "reused"), ("fidelity", "done")]
    assert json.loads(saved.read_text())["kl"] == measured


def test_the_conversions_warnings_are_logged_as_the_cli_logs_its_own(
    tiny_chat_model: Path, tmp_path: Path, capfd: pytest.CaptureFixture
) -> None:
    """compare converts in fresh processes; a warning there names its logger, as every other one does."""
    calib = tmp_path / "calib.txt"
    calib.write_text("a short calibration text. " * 40)
    argv = ["compare", str(tiny_chat_model), str(tmp_path / "out"), "--methods", "qlora", "--rank", "4",
            "--iters", "1", "--calib", str(calib), "--calib-samples", "1000",
            "--calib-seq-len", "32"]  # fmt: skip
    assert cli.main(argv) == 0
    assert re.search(
        r"^WARNING qpissa\.convert_calibrated: --calib \S+ holds \d+ windows of 32 tokens, fewer than",
        capfd.readouterr().err, re.MULTILINE,
    )  # fmt: skip
    report = (tmp_path / "out" / "report.md").read_text()  # the general prose is no part of calib.txt
    assert re.search(
        r"was calibrated on \d+ tokens of \S+calib\.txt \(\d+ of them qpissa's general prose\)", report
    )


def test_a_report_of_comparisons_measured_on_other_text_says_so(
    comparison: Path, tiny_model: Path, tmp_path: Path
) -> None:
    """The report's note named the first comparison's text alone, under rows measured on other text."""
    other = tmp_path / "other"
    args = [
        "--quiet",
        "compare",
        str(tiny_model),
        str(other),
        "--methods",
        "qlora",
        *FLAGS,
        "--max-tokens",
        "48",
    ]
    assert cli.main(args) == 0
    out = tmp_path / "report"
    assert cli.main(["--quiet", "report", str(comparison), str(other), "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    assert "Fidelity measured on different text, so its rows do not compare: " in markdown
    assert "(other/conversions/qlora): 48 synthetic ids" in markdown  # labels told apart by their folders


def test_a_damaged_record_says_how_to_continue_and_that_works(
    comparison: Path, tiny_model: Path, tmp_path: Path, capsys
) -> None:
    """It said to choose a new OUT, as if the finished conversions were lost with compare.json."""
    import shutil

    out = tmp_path / "out"
    shutil.copytree(comparison, out)
    (out / COMPARE_NAME).write_text("{")
    args = ["compare", str(tiny_model), str(out), "--methods", "qlora,qpissa", *FLAGS]
    assert cli.main(args) == 2
    assert "to continue, keep conversions/ and runs/ in" in capsys.readouterr().err
    for path in out.iterdir():
        if path.name not in ("conversions", "runs"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    assert cli.main(["--quiet", *args]) == 0
    steps = json.loads((out / COMPARE_NAME).read_text())["history"][-1]["steps"]
    assert {s["status"] for s in steps if s["step"] == "convert"} == {"reused"}


def test_a_model_changed_since_the_comparison_is_refused_with_a_fix_compare_has(
    tiny_model: Path, tmp_path: Path, capsys
) -> None:
    """Reusing the conversion would compare old weights; convert's fix (--overwrite) is not compare's."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    out = tmp_path / "out"
    args = ["--quiet", "compare", str(model), str(out), "--methods", "qlora", *FLAGS]
    assert cli.main(args) == 0
    weights = model / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    capsys.readouterr()
    assert cli.main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"qpissa: error: {re.escape(str(model.resolve()))} changed since .*conversions/qlora was converted "
        r"\(model\.safetensors: another size or modification time\); "
        r"compare into another OUT, or remove .*out",
        error,
    ), error
