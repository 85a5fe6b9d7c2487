"""`qpissa report` on the original model: its size as transformers loads it, its dtype, and which inputs
are of one model (copies, other quantizers, runs whose conversion is gone)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from qpissa import cli
from qpissa.artifacts import REPORT_NAME, RUN_MARKER
from qpissa.checkpoint import CheckpointReader
from qpissa.convert import convert
from qpissa.convert_settings import ConvertSettings, Method
from qpissa.models import make_tiny_model
from qpissa.options import from_dict
from qpissa.recipe import TrainConfig
from qpissa.train import train

QLORA = ConvertSettings(method=Method.QLORA, rank=4)


@pytest.fixture(scope="module")
def float32_model(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny chat model in float32, with a Mistral-style `consolidated.safetensors` copy beside its
    `model.safetensors` (transformers loads the one, not the other)."""
    from safetensors.torch import load_file, save_file

    model = tmp_path_factory.mktemp("float32") / "model"
    shutil.copytree(tiny_chat_model, model)
    tensors = {name: tensor.float() for name, tensor in load_file(model / "model.safetensors").items()}
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(config | {"dtype": "float32"}))
    shutil.copy(model / "model.safetensors", model / "consolidated.safetensors")
    return model


@pytest.fixture(scope="module")
def float32_report(float32_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of a QPiSSA conversion of `float32_model`."""
    root = tmp_path_factory.mktemp("float32_report")
    settings = ConvertSettings(method=Method.QPISSA, rank=4, iters=1)
    convert(float32_model, root / "qpissa", settings, show_progress=False)
    assert cli.main(["--quiet", "report", str(root / "qpissa"), "--out", str(root / "report")]) == 0
    return root / "report"


def test_the_original_counts_only_the_weight_files_transformers_loads(
    float32_model: Path, float32_report: Path
) -> None:
    """A `consolidated.safetensors` beside `model.safetensors` was counted too: twice the parameters."""
    summary = json.loads((float32_report / "summary.json").read_text())
    loaded = float32_model / "model.safetensors"
    header = CheckpointReader(float32_model).headers[loaded]
    params = sum(math.prod(info["shape"]) for info in header.values())
    assert summary["original"]["params"] == params
    assert summary["original"]["disk_mb"] == loaded.stat().st_size / 2**20
    memory = summary["memory"]["qpissa"]
    assert memory["params_4bit"] + memory["params_unquantized"] == params
    converted = memory["residual_disk_mb"] + memory["adapter_disk_mb"]
    assert memory["disk_vs_original_pct"] == pytest.approx(100 * converted / summary["original"]["disk_mb"])


def test_a_float32_original_is_not_called_16_bit(float32_report: Path) -> None:
    """The original row read "original (16-bit)" and the column "16-bit params" for a float32 model."""
    summary = json.loads((float32_report / "summary.json").read_text())
    assert summary["original"]["dtypes"] == ["float32"]
    markdown = (float32_report / "report.md").read_text()
    assert "| original (float32) |" in markdown and "16-bit" not in markdown


@pytest.fixture(scope="module")
def other_model(tmp_path_factory: pytest.TempPathFactory, char_tokenizer: Path) -> Path:
    """A model of the tiny chat model's shapes and file sizes, with other weights."""
    model = make_tiny_model(tmp_path_factory.mktemp("other") / "model", seed=1)
    for path in char_tokenizer.iterdir():
        shutil.copy(path, model / path.name)
    return model


@pytest.fixture(scope="module")
def gone_run(other_model: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-step run of a conversion of `other_model`, whose QPiSSA directory was then removed."""
    root = tmp_path_factory.mktemp("gone_run")
    convert(other_model, root / "qlora", QLORA, show_progress=False)
    config = from_dict(TrainConfig, {
        "model": str(root / "qlora"), "output_dir": str(root / "run"), "max_steps": 1, "save_steps": 100,
        "per_device_train_batch_size": 4, "data": {"path": str(data_dir / "train.jsonl"), "max_seq_len": 32},
    })  # fmt: skip
    train(config, show_progress=False)
    shutil.rmtree(root / "qlora")
    return root / "run"


@pytest.fixture(scope="module")
def tiny_qlora(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny_qlora") / "qlora"
    convert(tiny_chat_model, out, QLORA, show_progress=False)
    return out


def test_a_run_whose_conversion_is_gone_is_of_the_model_it_recorded(
    gone_run: Path, tiny_qlora: Path, tiny_chat_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A run of another model whose QPiSSA directory was gone was ranked beside this model's conversions."""
    out = tmp_path / "report"
    assert cli.main(["--quiet", "report", str(tiny_qlora), str(gone_run), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("qpissa: error: the inputs were converted from 2 different models (")
    assert str(gone_run) in error and error.count("\n") == 1 and not out.exists()
    copy = tmp_path / "copy"  # the same model at another path, its files written anew
    shutil.copytree(tiny_chat_model, copy, copy_function=shutil.copy)
    run = tmp_path / "run"
    shutil.copytree(gone_run, run)
    marker = json.loads((run / RUN_MARKER).read_text())
    stats = CheckpointReader(copy).file_stats()
    marker["conversion"] |= {"model": str(copy), "checkpoint": stats}  # a run of a conversion of the copy
    (run / RUN_MARKER).write_text(json.dumps(marker))
    assert cli.main(["--quiet", "report", str(tiny_qlora), str(run), "--out", str(out)]) == 0


def test_a_copy_converted_with_another_blocksize_is_the_same_model(
    tiny_chat_model: Path, tiny_qlora: Path, tmp_path: Path
) -> None:
    """A copy at another path, converted with --blocksize 32, was refused as another model: the path was
    all that told models apart where the quantizers differ (with the default blocksize it was accepted)."""
    kept = tmp_path / "kept"  # a copy that kept its files' times (cp -a)
    shutil.copytree(tiny_chat_model, kept)
    blocks = ConvertSettings(method=Method.QLORA, rank=4, blocksize=32)
    convert(kept, tmp_path / "blocks32", blocks, show_progress=False)
    summary = _report_of([tiny_qlora, tmp_path / "blocks32"], tmp_path / "kept-report")
    assert len(summary["methods"]) == 2
    written = tmp_path / "written"  # a copy written anew (cp -r): the files themselves tell
    shutil.copytree(tiny_chat_model, written, copy_function=shutil.copy)
    report = json.loads((tmp_path / "blocks32" / REPORT_NAME).read_text())
    report["fingerprint"] |= {"model": str(written), "checkpoint": CheckpointReader(written).file_stats()}
    (tmp_path / "blocks32" / REPORT_NAME).write_text(json.dumps(report))
    assert len(_report_of([tiny_qlora, tmp_path / "blocks32"], tmp_path / "written-report")["methods"]) == 2


def _report_of(given: list[Path], out: Path) -> dict:
    assert cli.main(["--quiet", "report", *map(str, given), "--out", str(out)]) == 0
    return json.loads((out / "summary.json").read_text())
