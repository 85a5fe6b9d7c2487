"""`qpissa compare` rerun: the same settings however spelled, compare's own fixes, methods that never
finished, a run stopped in its final evaluation, and too little held-out text."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from qpissa import cli
from qpissa.artifacts import COMPARE_NAME, EVAL_RESULTS_NAME, LOG_NAME
from qpissa.convert import convert
from qpissa.convert_settings import ConvertSettings, Method

FLAGS = ["--rank", "4", "--iters", "2", "--max-tokens", "96", "--window", "48"]
CALIB = ["--calib-samples", "8", "--calib-seq-len", "16"]


@pytest.fixture(scope="module")
def comparison(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished comparison of QLoRA alone."""
    out = tmp_path_factory.mktemp("compare_record") / "out"
    assert cli.main(["--quiet", "compare", str(tiny_chat_model), str(out), "--methods", "qlora", *FLAGS]) == 0
    return out


def _steps(out: Path) -> list[tuple[str, str, str]]:
    steps = json.loads((out / COMPARE_NAME).read_text())["history"][-1]["steps"]
    return [(s["method"], s["step"], s["status"]) for s in steps]


def test_the_same_settings_however_spelled_continue_a_comparison(
    tiny_chat_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`--alpha 4` (the default at rank 4) and --calib by its absolute path were refused as other settings,
    which `convert --resume` accepts; the same relative --calib from elsewhere, another file, was not."""
    here = tmp_path / "here"
    here.mkdir()
    (here / "calib.txt").write_text("a short calibration text. " * 40)
    monkeypatch.chdir(here)
    out = tmp_path / "out"
    args = ["compare", str(tiny_chat_model), str(out), "--methods", "qlora", *FLAGS, *CALIB]
    assert cli.main(["--quiet", *args, "--calib", "calib.txt"]) == 0
    assert cli.main(["--quiet", *args, "--calib", str(here / "calib.txt"), "--alpha", "4"]) == 0
    assert {status for _, _, status in _steps(out)} == {"reused"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "calib.txt").write_text("quite another text, with other words in it. " * 40)
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert cli.main(["--quiet", *args, "--calib", "calib.txt"]) == 2
    error = capsys.readouterr().err
    assert error == (
        f"qpissa: error: {out} holds a comparison made with --calib {here / 'calib.txt'}, where this run "
        f"asks for --calib {elsewhere / 'calib.txt'}; rerun with the earlier options to continue it, or "
        "choose another OUT for these\n"
    )
    (here / "calib.txt").write_text("the file changed since. " * 40)  # its contents changed in place
    assert cli.main(["--quiet", *args, "--calib", str(here / "calib.txt")]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"qpissa: error: {out} holds a comparison calibrated on other --calib data: ")
    assert "--overwrite" not in error and error.count("\n") == 1


def test_a_conversion_compare_cannot_reuse_is_refused_with_compares_fix(
    comparison: Path, tiny_chat_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """compare passed on convert's fix (`use --overwrite`, which compare lacks) and, for a conversion cut
    short, a download's (`download it again`)."""
    out = tmp_path / "out"
    shutil.copytree(comparison, out)
    conversion = out / "conversions" / "qlora"
    weights = conversion / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    args = ["compare", str(tiny_chat_model), str(out), "--methods", "qlora", *FLAGS]
    assert cli.main(args) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith(f"qpissa: error: {weights} is truncated or corrupt: ")
    assert error.endswith(f"; remove {conversion} and rerun to convert it again, or compare into another OUT")
    shutil.rmtree(out)
    other = ConvertSettings(method=Method.QLORA, rank=2)  # a comparison begun with conversions/ alone
    convert(tiny_chat_model, conversion, other, show_progress=False)
    assert cli.main(args) == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error == (
        f"qpissa: error: {conversion} holds a finished conversion with other settings (--rank); remove "
        f"{conversion} and rerun to convert it again, or compare into another OUT"
    )


def test_a_method_whose_conversion_never_finished_can_be_dropped(
    comparison: Path, tiny_chat_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`--methods qlora,loftq` stopped while converting loftq: a rerun with `--methods qlora` converted loftq
    too, as a method OUT held ("compared too")."""
    out = tmp_path / "out"
    shutil.copytree(comparison, out)
    record = json.loads((out / COMPARE_NAME).read_text())
    (out / COMPARE_NAME).write_text(json.dumps(record | {"methods": ["qlora", "loftq"]}))  # loftq unfinished
    args = ["--quiet", "compare", str(tiny_chat_model), str(out), "--methods", "qlora", *FLAGS]
    with caplog.at_level(logging.INFO, logger="qpissa"):
        assert cli.main(args) == 0
    assert _steps(out) == [("qlora", "convert", "reused"), ("qlora", "fidelity", "reused")]
    assert not (out / "conversions" / "loftq").exists()
    assert json.loads((out / COMPARE_NAME).read_text())["methods"] == ["qlora"]
    assert json.loads((out / "summary.json").read_text())["methods"] == ["qlora"]
    said = f"{out} holds no finished conversion of loftq (an earlier run stopped before): left out"
    assert any(said in r.getMessage() for r in caplog.records)


def test_too_little_held_out_text_is_warned_before_converting(
    comparison: Path, tiny_chat_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A --text of 3 tokens gave a KL over 2 tokens, without a word."""
    args = ["--quiet", "compare", str(tiny_chat_model), str(comparison), "--methods", "qlora", *FLAGS]
    with caplog.at_level(logging.WARNING, logger="qpissa"):
        assert cli.main(args) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    said = [w for w in warnings if w.startswith("fidelity is measured on 96 tokens of ")]
    assert len(said) == 1 and "fewer than 256" in said[0]


def test_a_run_stopped_in_its_final_evaluation_is_evaluated_on_a_rerun(
    tiny_chat_model: Path, data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Ctrl-C in a --train run's final evaluation left its adapter and no eval_results.json: the rerun
    reused the run, and its evaluation never appeared."""
    config = tmp_path / "train.yaml"
    config.write_text(
        f"data:\n  path: {data_dir / 'train.jsonl'}\n  eval_path: {data_dir / 'eval.jsonl'}\n"
        "  max_seq_len: 32\n  eval_generate_samples: 2\nmax_steps: 2\nsave_steps: 100\nlogging_steps: 1\n"
        "per_device_train_batch_size: 4\nlearning_rate: 1.0e-3\n"
    )
    out = tmp_path / "out"
    args = ["--quiet", "compare", str(tiny_chat_model), str(out), "--methods", "qlora", "--train",
            str(config), *FLAGS]  # fmt: skip
    assert cli.main(args) == 0
    run = out / "runs" / "qlora"
    evaluated = json.loads((run / EVAL_RESULTS_NAME).read_text())
    log = (run / LOG_NAME).read_text()
    (run / EVAL_RESULTS_NAME).unlink()  # what the interrupted evaluation left
    with caplog.at_level(logging.INFO, logger="qpissa"):
        assert cli.main(args) == 0
    assert _steps(out)[-1] == ("qlora", "train", "done")
    assert any("stopped before its final evaluation: finishing it" in r.getMessage() for r in caplog.records)
    again = json.loads((run / EVAL_RESULTS_NAME).read_text())
    assert again["loss"] == pytest.approx(evaluated["loss"], rel=1e-6)
    assert again["total"] == evaluated["total"]
    assert (run / LOG_NAME).read_text() == log  # nothing trained again
    assert json.loads((out / "summary.json").read_text())["eval"]["qlora"] == again
