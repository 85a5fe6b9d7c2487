"""Artifact finders: the latest checkpoint of a run, and what a MODEL_OR_RUN argument points at."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qpissa import UserError
from qpissa.artifacts import (
    ADAPTER_FILES,
    CONFIG_NAME,
    REPORT_NAME,
    RUN_MARKER,
    TRAINER_STATE,
    latest_checkpoint,
    partial_dir,
    read_json,
)
from qpissa.model_source import resolve_source


def _checkpoint(run: Path, step: int, *, complete: bool = True, adapter: bool = True) -> Path:
    path = run / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in ADAPTER_FILES if adapter else ():
        (path / name).write_text("{}")
    if complete:
        (path / TRAINER_STATE).write_text(json.dumps({"global_step": step}))
    return path


def _run(tmp_path: Path, model: str | None = None) -> Path:
    """A run of the QPiSSA directory `tmp_path/qpissa`, named in its marker by `model` (default absolute)."""
    qpissa = tmp_path / "qpissa"
    qpissa.mkdir(exist_ok=True)
    (qpissa / CONFIG_NAME).write_text("{}")
    (qpissa / REPORT_NAME).write_text("{}")
    run = tmp_path / "run"
    run.mkdir()
    (run / RUN_MARKER).write_text(json.dumps({"config": {}, "model": model or str(qpissa)}))
    return run


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path: Path) -> None:
    run = _run(tmp_path)
    assert latest_checkpoint(run) is None
    _checkpoint(run, 5)
    newest = _checkpoint(run, 20)  # by number, not by name: checkpoint-5 sorts after checkpoint-20
    _checkpoint(run, 30, complete=False)  # being written when the run stopped
    (run / "checkpoint-final").mkdir()
    assert latest_checkpoint(run) == newest


def test_a_run_resolves_to_its_final_adapter_else_its_latest_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = _run(tmp_path)
    with pytest.raises(UserError, match="has no adapter yet"):
        resolve_source(run)
    _checkpoint(run, 40, adapter=False)  # complete, yet without adapter files: not loadable
    with pytest.raises(UserError, match="has no adapter yet"):
        resolve_source(run)
    checkpoint = _checkpoint(run, 50)
    with caplog.at_level("WARNING", logger="qpissa.artifacts"):
        source = resolve_source(run)
    assert (source.base_dir, source.adapter_dir, source.run_dir) == (tmp_path / "qpissa", checkpoint, run)
    assert (
        f"run {run} did not finish (no adapter/): using its newest checkpoint, checkpoint-50" in caplog.text
    )
    assert resolve_source(checkpoint).adapter_dir == checkpoint  # a checkpoint-N given directly
    for name in ADAPTER_FILES:
        (run / "adapter").mkdir(exist_ok=True)
        (run / "adapter" / name).write_text("{}")
    assert resolve_source(run).adapter_dir == run / "adapter"


def test_a_plain_model_has_no_adapter_and_anything_else_is_refused(tmp_path: Path) -> None:
    (tmp_path / CONFIG_NAME).write_text("{}")
    assert resolve_source(tmp_path).adapter_dir is None
    (tmp_path / "notes").mkdir()
    with pytest.raises(UserError, match=r"\(no config.json\); point at the output of qpissa convert"):
        resolve_source(tmp_path / "notes")
    with pytest.raises(UserError, match="missing does not exist; pass a QPiSSA directory"):
        resolve_source(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("")
    with pytest.raises(UserError, match=r"file\.txt is not a directory; pass a QPiSSA directory"):
        resolve_source(tmp_path / "file.txt")
    assert partial_dir(tmp_path / "out") == tmp_path / "out.partial"


def test_a_run_names_its_model_relative_to_itself_and_only_a_qpissa_directory(tmp_path: Path) -> None:
    run = _run(tmp_path, model="../qpissa")  # a run shared together with its model
    _checkpoint(run, 10)
    assert resolve_source(run).base_dir.resolve() == (tmp_path / "qpissa").resolve()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / CONFIG_NAME).write_text("{}")  # a model directory, yet no QPiSSA directory
    marker = json.loads((run / RUN_MARKER).read_text())
    (run / RUN_MARKER).write_text(json.dumps({**marker, "model": "../notes"}))
    with pytest.raises(UserError, match="not a QPiSSA directory"):
        resolve_source(run)


def test_a_replaced_output_is_always_there_and_nothing_is_left_beside_it(tmp_path: Path, monkeypatch) -> None:
    import os
    import shutil

    from qpissa import outputs

    new, out = tmp_path / "out.partial", tmp_path / "out"
    for directory, name in ((new, "new.txt"), (out, "old.txt")):
        directory.mkdir()
        (directory / name).write_text(name)
    seen = []  # what `out` holds while the old directory is being removed
    real_rmtree = shutil.rmtree
    monkeypatch.setattr(
        outputs.shutil, "rmtree", lambda path: seen.append(os.listdir(out)) or real_rmtree(path)
    )
    outputs.replace_dir(new, out)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["new.txt"]
    assert seen == [["new.txt"]]


def test_broken_json_is_named_with_where_it_breaks_in_plain_words(tmp_path: Path) -> None:
    """Python's message ends in "at" for some errors: the line said "starting at at line 3"."""
    path = tmp_path / "record.json"
    path.write_text('{\n  "a": 1,\n  "b": "unterminated')
    with pytest.raises(UserError) as raised:
        read_json(path, "write it again")
    message = str(raised.value)
    assert message == (
        f"{path} is not valid JSON (Unterminated string starting at line 3, column 8); write it again"
    )
    path.write_text("{")
    with pytest.raises(UserError, match=r"\(Expecting property name enclosed in double quotes at line 1, "):
        read_json(path, "write it again")


@pytest.mark.parametrize("damaged", [{"settings": []}, 7], ids=["settings a list", "a number"])
def test_a_run_whose_recorded_conversion_is_damaged_is_refused_in_one_line(tmp_path: Path, damaged) -> None:
    """A fingerprint damaged inside the run marker was an AttributeError deep in the match, then blamed on the
    QPiSSA directory ("no longer holds" the conversion): the marker is named as what is damaged."""
    run = _run(tmp_path)
    _checkpoint(run, 10)
    fingerprint = {"settings": {"rank": 4}}
    report = {"fingerprint": fingerprint, "settings": {}, "layers": [], "summary": {}}
    (tmp_path / "qpissa" / REPORT_NAME).write_text(json.dumps(report))
    marker = json.loads((run / RUN_MARKER).read_text())
    (run / RUN_MARKER).write_text(json.dumps({**marker, "conversion": fingerprint}))
    assert resolve_source(run).base_dir == tmp_path / "qpissa"
    (run / RUN_MARKER).write_text(json.dumps({**marker, "conversion": damaged}))
    with pytest.raises(UserError) as raised:
        resolve_source(run)
    assert str(raised.value).startswith(f"{run / RUN_MARKER} is damaged (`conversion`")
    assert "train again into a new output_dir" in str(raised.value)
