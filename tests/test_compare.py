"""`qpissa compare` on a tiny model: conversions, fidelity, report; a re-run redoes nothing finished."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qpissa import cli
from qpissa.compare import COMPARE_NAME
from qpissa.convert import REPORT_NAME
from qpissa.fidelity import FIDELITY_NAME

FLAGS = ["--rank", "4", "--iters", "2", "--max-tokens", "96", "--window", "48"]


@pytest.fixture(scope="module")
def comparison(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished comparison of QLoRA and QPiSSA (LoftQ is added by a later test)."""
    out = tmp_path_factory.mktemp("compare") / "out"
    assert (
        cli.main(["--quiet", "compare", str(tiny_model), str(out), "--methods", "qlora,qpissa", *FLAGS]) == 0
    )
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


def test_rerun_reuses_finished_steps_and_adds_a_method(comparison: Path, tiny_model: Path) -> None:
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
    assert {p: p.stat().st_mtime_ns for p in watched} == stamps  # nothing of the first run was rewritten
    summary = json.loads((comparison / "summary.json").read_text())
    assert summary["methods"] == ["qlora", "loftq", "qpissa"]


def test_other_settings_in_the_same_out_are_refused(comparison: Path, tiny_model: Path, capsys) -> None:
    args = ["compare", str(tiny_model), str(comparison), "--methods", "qlora", "--rank", "8"]
    assert cli.main(args) == 2
    assert "holds a comparison with other settings" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "qlora,dora"], "--methods"),
        (["--methods", "qlora,qlora"], "names a method twice"),
        (["--train", "/nonexistent.yaml"], "--train"),
        (["--window", "1"], "--window"),
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
    assert cli.main(["compare", str(tiny_model), str(tmp_path / "out")]) == 2
    assert "is not a comparison directory" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["notes.txt"]
