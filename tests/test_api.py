"""The Python API: `from qpissa import convert, train, export, evaluate`, as README's example uses it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_readme_example_runs(tiny_chat_model: Path, data_dir: Path, tmp_path: Path) -> None:
    from qpissa import (
        ConvertSettings,
        DataConfig,
        EvalSettings,
        ExportSettings,
        TrainConfig,
        convert,
        evaluate,
        export,
        train,
    )

    convert(tiny_chat_model, tmp_path / "qpissa", ConvertSettings(rank=4, iters=1), show_progress=False)
    config = TrainConfig(
        model=tmp_path / "qpissa",
        output_dir=tmp_path / "run",
        data=DataConfig(path=data_dir / "train.jsonl", max_seq_len=32, eval_generate_samples=0),
        max_steps=2,
    )
    summary = train(config, show_progress=False)
    assert summary["steps"] == 2
    scores = evaluate(tmp_path / "run", data_dir / "eval.jsonl", EvalSettings(max_samples=4))
    assert scores["loss"] > 0 and scores["samples"] == 4
    export(tmp_path / "run", tmp_path / "merged", ExportSettings(), show_progress=False)
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "llama"


def test_import_stays_light_and_submodules_stay_reachable() -> None:
    script = (
        "import sys, qpissa\n"
        "assert 'torch' not in sys.modules\n"
        "from qpissa.convert import convert as function\n"
        "from qpissa import convert\n"
        "assert convert is function and sys.modules['qpissa.convert'].convert is function\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
