"""Hostile inputs across commands: one `qpissa: error:` line, exit 2, inputs unchanged, nothing stray.

Each case hashes every file under the test's directory before and after, so a command that deletes or
changes an input, or leaves a half-written output, fails here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml

from qpissa.cli import main


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def _refused(capsys: pytest.CaptureFixture, root: Path, argv: list[str], pattern: str) -> str:
    """Run the CLI; assert exit 2, one error line containing `pattern`, and no file changed under root."""
    before = _snapshot(root)
    status = main(["--quiet", *argv])
    error = capsys.readouterr().err.strip()
    assert status == 2, error
    assert error.startswith("qpissa: error: ") and "\n" not in error, error
    assert pattern in error, error
    assert _snapshot(root) == before, "an input changed or an output was left behind"
    return error


@pytest.fixture
def workspace(tmp_path: Path, qpissa_dir: Path, tiny_model: Path) -> Path:
    """A directory holding a model, a QPiSSA directory and training data, as a user's project would."""
    shutil.copytree(tiny_model, tmp_path / "model")
    shutil.copytree(qpissa_dir, tmp_path / "qpissa")
    records = [{"prompt": f"{i}+1=", "completion": f" {i + 1}"} for i in range(8)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def _train_config(root: Path, **changes: object) -> Path:
    config = {
        "model": str(root / "qpissa"), "output_dir": str(root / "run"),
        "data": {"path": str(root / "data" / "train.jsonl"), "format": "prompt_completion",
                 "max_seq_len": 16},
        "max_steps": 1, "per_device_train_batch_size": 2, "save_steps": 1,
    }  # fmt: skip
    config.update(changes)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("out", ["model", ".", "model/sub"])
def test_convert_overwrite_never_deletes_the_model(workspace: Path, capsys, out: str) -> None:
    target = workspace / out
    _refused(
        capsys,
        workspace,
        ["convert", str(workspace / "model"), str(target), "--overwrite"],
        "the input MODEL",
    )


def test_convert_overwrite_refuses_a_directory_that_is_no_conversion(workspace: Path, capsys) -> None:
    other = workspace / "notes"
    other.mkdir()
    (other / "thesis.txt").write_text("years of work")
    argv = ["convert", str(workspace / "model"), str(other), "--overwrite"]
    _refused(capsys, workspace, argv, "is not a QPiSSA directory")


@pytest.mark.parametrize(
    ("output", "pattern"),
    [("qpissa", "the input model"), (".", "the input model"), ("data", "the input data.path")],
)
def test_train_overwrite_never_deletes_model_or_data(
    workspace: Path, capsys, output: str, pattern: str
) -> None:
    config = _train_config(workspace, output_dir=str(workspace / output), overwrite_output_dir=True)
    _refused(capsys, workspace, ["train", str(config)], pattern)


def test_train_overwrite_refuses_a_directory_that_is_no_run(workspace: Path, capsys) -> None:
    (workspace / "run").mkdir()
    (workspace / "run" / "keep.txt").write_text("mine")
    config = _train_config(workspace, overwrite_output_dir=True)
    _refused(capsys, workspace, ["train", str(config)], "is not a training run")


def test_unconverted_model_error_suggests_a_new_directory(workspace: Path, capsys) -> None:
    config = _train_config(workspace, model=str(workspace / "model"))
    error = _refused(capsys, workspace, ["train", str(config)], "is not a QPiSSA directory")
    assert f"convert {workspace / 'model'} NEW_DIR" in error
