"""`qpissa report` on training runs: unfinished and unevaluated runs, recipes that differ, damaged records."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qpissa import cli
from qpissa.artifacts import EVAL_RESULTS_NAME, LOG_NAME, RUN_MARKER
from qpissa.convert import convert
from qpissa.convert_settings import ConvertSettings, Method
from qpissa.options import from_dict
from qpissa.recipe import TrainConfig
from qpissa.train import train


@pytest.fixture(scope="module")
def run(tiny_chat_model: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-step run of a QLoRA conversion, evaluated on held-out data at its end."""
    root = tmp_path_factory.mktemp("report_runs")
    settings = ConvertSettings(method=Method.QLORA, rank=4)
    convert(tiny_chat_model, root / "qlora", settings, show_progress=False)
    data = {"path": str(data_dir / "train.jsonl"), "eval_path": str(data_dir / "eval.jsonl"),
            "max_seq_len": 32, "eval_generate_samples": 2}  # fmt: skip
    config = from_dict(TrainConfig, {
        "model": str(root / "qlora"), "output_dir": str(root / "run"), "max_steps": 2, "save_steps": 100,
        "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 1e-3, "data": data,
    })  # fmt: skip
    train(config, show_progress=False)
    return root / "run"


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _edit_marker(run: Path, change) -> None:
    marker = json.loads((run / RUN_MARKER).read_text())
    change(marker["config"])
    (run / RUN_MARKER).write_text(json.dumps(marker))


def _report(given: list[Path], out: Path) -> tuple[dict, str]:
    assert cli.main(["--quiet", "report", *map(str, given), "--out", str(out)]) == 0
    return json.loads((out / "summary.json").read_text()), (out / "report.md").read_text()


def test_a_run_stopped_before_its_adapter_is_said_to_be_unfinished(run: Path, tmp_path: Path) -> None:
    """A run interrupted in training showed as a normal row, "trained on ... (2 steps ...)"."""
    stopped = _copy(run, tmp_path / "stopped")
    shutil.rmtree(stopped / "adapter")
    summary, markdown = _report([stopped], tmp_path / "report")
    assert summary["setup"]["runs"]["qlora"]["state"] == "unfinished"
    said = "Run qlora is unfinished: it has no final adapter (its log ends at step 2 of 2 steps: it was"
    assert said in markdown
    assert "| 2 (unfinished) |" in markdown  # the training table's last step
    assert "(last 2 steps, to step 2; unfinished)" in markdown  # the verdict's mean loss


def test_a_run_stopped_in_its_final_evaluation_is_said_to_lack_it(run: Path, tmp_path: Path) -> None:
    """Ctrl-C in the final evaluation left the adapter and no eval_results.json: the report said nothing."""
    stopped = _copy(run, tmp_path / "stopped")
    (stopped / EVAL_RESULTS_NAME).unlink()
    summary, markdown = _report([stopped], tmp_path / "report")
    assert summary["setup"]["runs"]["qlora"]["state"] == "unevaluated" and summary["eval"] == {}
    eval_path = json.loads((run / RUN_MARKER).read_text())["config"]["data"]["eval_path"]
    said = (
        f"Run qlora has no final evaluation: its recipe evaluates on {eval_path}, but {EVAL_RESULTS_NAME} is"
    )
    assert said in markdown
    summary, markdown = _report([run], tmp_path / "finished")
    assert summary["setup"]["runs"]["qlora"]["state"] == "finished" and "no final evaluation" not in markdown


def test_runs_of_other_optimizers_are_not_said_to_share_one_recipe(run: Path, tmp_path: Path) -> None:
    """ "Every run trained on ..." was said of runs with other optimizers, schedules and weight decay."""
    other = _copy(run, tmp_path / "other")
    _edit_marker(other, lambda c: c.update(optim="sgd", lr_scheduler_type="constant", weight_decay=0.5))
    _, markdown = _report([run, other], tmp_path / "report")
    assert "Every run" not in markdown
    assert "The runs' recipes differ in lr_scheduler_type, optim, weight_decay." in markdown
    assert "; lr_scheduler_type constant, optim sgd, weight_decay 0.5." in markdown
    assert "; lr_scheduler_type cosine, optim auto, weight_decay 0.0." in markdown
    same = _copy(run, tmp_path / "same")  # the same recipe elsewhere: said once
    _, markdown = _report([run, same], tmp_path / "same-report")
    assert markdown.count("Every run trained on ") == 1 and "differ in" not in markdown


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        (EVAL_RESULTS_NAME, '{"accuracy": "x"}\n', '(`accuracy` is "x", not a number or null)'),
        (EVAL_RESULTS_NAME, '{"loss": [1]}\n', "(`loss` is [1], not a number or null)"),
        (
            LOG_NAME,
            '{"step": 0, "loss": 5.0}\n{"step": 1, "loss": 4.0, "peak_memory_mb": "515 MB"}\n',
            """(step 1's `peak_memory_mb` is "515 MB", not a number or null)""",
        ),
        (
            LOG_NAME,
            '{"step": 0, "loss": 5.0, "tokens_per_second": true}\n{"step": 1, "loss": 4.0}\n',
            "(step 0's `tokens_per_second` is true, not a number or null)",
        ),
    ],
    ids=["accuracy text", "loss a list", "memory text", "speed a boolean"],
)
def test_a_damaged_evaluation_or_log_is_one_line_naming_it(
    name: str, content: str, problem: str, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """They ended in a ValueError or a TypeError deep in the report's tables."""
    damaged = _copy(run, tmp_path / "run")
    (damaged / name).write_text(content)
    out = tmp_path / "report"
    assert cli.main(["--quiet", "report", str(damaged), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"qpissa: error: {damaged / name} is damaged {problem}; ")
    assert error.count("\n") == 1 and not out.exists()


def test_a_run_that_logged_only_step_0_is_said_to_have_trained_no_step(run: Path, tmp_path: Path) -> None:
    """Its mean training loss was quoted "(last 1 step, to step 0)": step 0 is the converted model."""
    early = _copy(run, tmp_path / "early")
    (early / LOG_NAME).write_text(json.dumps({"step": 0, "loss": 5.5}) + "\n")
    summary, markdown = _report([early], tmp_path / "report")
    assert summary["training"]["qlora"]["tail_loss"] is None
    assert "to step 0" not in markdown and "Mean training loss" not in markdown
    assert "No trained step logged by qlora: only step 0, the converted model before training." in markdown
