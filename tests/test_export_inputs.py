"""`qpissa export`'s inputs and output: what `--overwrite` may replace, what `--base` may name, and the
LoRA's rank by how the conversion initialized its adapter. Runs are converted adapters with B moved by
hand (`moved_run`), of conftest's rank-4 conversion: no training needed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from qpissa import cli
from qpissa.artifacts import EXPORT_REPORT
from qpissa.checkpoint import CheckpointReader
from qpissa.export_verify import TRAINED
from qpissa.stored import Residual, read_adapter

RANK = 4  # conftest's qpissa_dir


@pytest.fixture(scope="module")
def run(qpissa_dir: Path, moved_run, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return moved_run(qpissa_dir, tmp_path_factory.mktemp("export_inputs") / "run")


def _export(run: Path, out: Path, *extra: str) -> int:
    return cli.main(["--quiet", "export", str(run), str(out), "--no-verify", *extra])


def _errors(capsys: pytest.CaptureFixture) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("qpissa: error:")]


def _tree(directory: Path) -> list[str]:
    return sorted(path.relative_to(directory).as_posix() for path in directory.rglob("*"))


def test_overwrite_refuses_an_export_holding_what_it_did_not_write(run: Path, tmp_path: Path, capsys):
    """A run moved into an earlier export, the user's notes beside it: --overwrite would delete them
    with the export; it is refused, and so is the advice to use it."""
    out = tmp_path / "out"
    assert _export(run, out, "--to", "lora") == 0
    shutil.copytree(run, out / "myrun")
    (out / "NOTES.txt").write_text("mine")
    before = _tree(out)
    for extra in ([], ["--overwrite"]):
        capsys.readouterr()
        assert _export(run, out, "--to", "lora", *extra) == 2
        errors = _errors(capsys)
        assert len(errors) == 1
        assert f"OUT {out} holds myrun/, NOTES.txt, which its export did not write" in errors[0]
    assert _tree(out) == before and not (tmp_path / "out.partial").exists()


def test_an_export_recorded_before_its_file_list_is_judged_by_its_folders(run: Path, tmp_path: Path, capsys):
    """An export whose report lists no files: exports write no folders, so a folder in it is not the
    export's and is kept; a file there cannot be told from the export's own, and is replaced with it."""
    out = tmp_path / "out"
    assert _export(run, out) == 0
    report = json.loads((out / EXPORT_REPORT).read_text())
    del report["files"]
    (out / EXPORT_REPORT).write_text(json.dumps(report))
    (out / "NOTES.txt").write_text("mine")
    (out / "kept").mkdir()
    capsys.readouterr()
    assert _export(run, out, "--overwrite") == 2
    assert f"OUT {out} holds kept/, which its export did not write" in _errors(capsys)[0]
    (out / "kept").rmdir()
    assert _export(run, out, "--overwrite") == 0
    assert not (out / "NOTES.txt").exists() and "files" in json.loads((out / EXPORT_REPORT).read_text())
    (out / EXPORT_REPORT).write_text('{"files": ')  # damaged: judged by its folders too, and replaced
    assert _export(run, out, "--overwrite") == 0 and "files" in json.loads((out / EXPORT_REPORT).read_text())


def test_base_may_be_the_export_its_conversion_was_made_from(qpissa_dir: Path, moved_run, tmp_path: Path):
    """An export is refused as --base (a merged one of the run holds the training already), but not
    the one the conversion was made from: that is the original model."""
    merged, converted = tmp_path / "merged", tmp_path / "again"
    assert _export(qpissa_dir, merged) == 0
    argv = ["--quiet", "convert", str(merged), str(converted), "--rank", str(RANK), "--iters", "1"]
    assert cli.main(argv) == 0
    run = moved_run(converted, tmp_path / "run")
    assert _export(run, tmp_path / "lora", "--to", "lora", "--base", str(merged)) == 0
    assert read_adapter(tmp_path / "lora").config["base_model_name_or_path"] == str(merged.resolve())


@pytest.mark.parametrize(("method", "exact"), [("qlora", RANK), ("loftq", 2 * RANK)])
def test_lora_rank_is_r_from_a_zero_initial_adapter(
    method: str, exact: int, tiny_chat_model: Path, moved_run, tmp_path: Path, capsys
):
    """QLoRA starts from B = 0: its trained B', A' alone are the change on the original, at rank r, and
    `[B', −B]` would be half zeros. LoftQ's initial adapter is not zero: its LoRA keeps rank 2r. Both are
    verified against the trained model and differ from it by the residual's NF4 error."""
    converted = tmp_path / method
    argv = ["--quiet", "convert", str(tiny_chat_model), str(converted), "--method", method]
    assert cli.main([*argv, "--rank", str(RANK), "--iters", "1"]) == 0
    initial = read_adapter(converted / "adapter")
    run = moved_run(converted, tmp_path / "run")
    out = tmp_path / "lora"
    argv = ["--quiet", "export", str(run), str(out), "--to", "lora", "--dtype", "float32"]
    assert cli.main(argv) == 0
    trained, exported = read_adapter(run / "adapter"), read_adapter(out)
    assert exported.rank == exact and exported.scale == pytest.approx(trained.scale)
    residual, original, s = Residual(converted), CheckpointReader(tiny_chat_model), trained.scale
    for module in trained.shapes:  # on W the export is W_res + s·B'A', the trained model deq(Q) + s·B'A'
        W, deq = original.read(f"{module}.weight").float(), residual.weight(module)
        (A0, B0), (A1, B1), (A2, B2) = (a.factors(module) for a in (initial, trained, exported))
        gap = (W + s * B2 @ A2) - (deq + s * B1 @ A1)
        torch.testing.assert_close(gap, W - s * B0 @ A0 - deq, atol=1e-5, rtol=0)
        assert (method == "qlora") == (not B0.any())
    report = json.loads((out / EXPORT_REPORT).read_text())
    nf4 = report["details"]["residual_nf4_error"]["relative_fro"]
    assert report["details"]["distance"]["relative_fro"] == pytest.approx(nf4, rel=1e-3)
    assert report["verify"]["reference"] == TRAINED and report["verify"]["top1_agreement"] > 0.5
    readme = (out / "README.md").read_text()
    assert f"the conversion (--method {method})" in readme
    doubled = f"Why the rank doubled (r = {RANK} -> 2r = {2 * RANK})"
    assert (doubled in readme) == (method == "loftq") and ("Why rank 4, as trained" in readme) == (
        method == "qlora"
    )
    assert ("started from a zero adapter" in readme) == (method == "qlora")
    capsys.readouterr()
    assert _export(run, tmp_path / "above", "--to", "lora", "--rank", str(exact + 1)) == 2
    named = "r" if method == "qlora" else "2r"
    assert f"--rank {exact + 1} is above the exact rank {named} = {exact}" in _errors(capsys)[0]
