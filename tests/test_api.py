"""The Python API: `from qpissa import convert, train, export, evaluate`, as README's example uses it."""

from __future__ import annotations

import json
import re
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


def test_settings_built_in_python_are_checked_and_converted_as_flags_are() -> None:
    """Text for a choice or a path works as in a recipe; a wrong type is one UserError naming the keyword,
    not a TypeError from a comparison, nor a text method that every `is Method.QLORA` check misses."""
    import pytest

    from qpissa import ConvertSettings, DataConfig, TrainConfig, UserError
    from qpissa.convert_settings import Method

    settings = ConvertSettings(method="qlora", calib="notes.txt")
    assert (
        settings.method is Method.QLORA
        and settings.resolved_iters == 1
        and settings.calib == Path("notes.txt")
    )
    config = TrainConfig(model="q", output_dir="run", data={"path": "train.jsonl"}, learning_rate=1)
    assert config.model == Path("q") and isinstance(config.data, DataConfig) and config.learning_rate == 1.0
    with pytest.raises(
        UserError, match=r"^`method` must be one of .*, got 'pissa'; `rank` must be int, got '8'$"
    ):
        ConvertSettings(rank="8", method="pissa")
    with pytest.raises(UserError, match=r"^`max_seq_len` must be int, got '512'$"):
        DataConfig(path="train.jsonl", max_seq_len="512")


def test_the_settings_line_names_only_what_the_method_uses() -> None:
    """QLoRA quantizes W once: its log line listed iters, svd and power iterations it never ran."""
    from qpissa import ConvertSettings

    qlora = ConvertSettings(method="qlora").description()
    qpissa = ConvertSettings(rank=16).description()
    exact = ConvertSettings(svd="exact").description()
    assert qlora.startswith("method=qlora, rank=64,") and "iters" not in qlora and "svd=" not in qlora
    assert "svd=exact," in exact and "power_iters" not in exact and "oversample" not in exact
    assert qpissa.startswith("method=qpissa, rank=16, alpha=16.0, iters=5, svd=randomized, oversample=32")


def test_paths_may_be_given_as_text(tiny_chat_model: Path, data_dir: Path, tmp_path: Path) -> None:
    """`convert("/models/x", "out", ...)` failed with AttributeError: 'str' object has no attribute 'name'."""
    from qpissa import ConvertSettings, EvalSettings, ExportSettings, convert, evaluate, export, load_config

    convert(
        str(tiny_chat_model), str(tmp_path / "qpissa"), ConvertSettings(rank=4, iters=1), show_progress=False
    )
    scores = evaluate(str(tmp_path / "qpissa"), str(data_dir / "eval.jsonl"), EvalSettings(max_samples=2))
    assert scores["samples"] == 2
    export(
        str(tmp_path / "qpissa"), str(tmp_path / "merged"), ExportSettings(verify=False), show_progress=False
    )
    assert (tmp_path / "merged" / "config.json").is_file()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model: {tmp_path / 'qpissa'}\noutput_dir: {tmp_path / 'run'}\ndata:\n  path: x.jsonl\n"
    )
    assert load_config(str(recipe), []).model == tmp_path / "qpissa"


def test_arguments_of_the_wrong_kind_are_user_errors(tmp_path: Path) -> None:
    """A recipe path where a TrainConfig belongs, or a dict where settings do, failed with AttributeError
    deep inside; one text of overrides was read character by character."""
    import pytest

    from qpissa import UserError, convert, evaluate, export, load_config, train

    calls = [
        (
            lambda: convert("model", tmp_path / "out", {"rank": 8}),
            "settings: expected ConvertSettings, got dict",
        ),
        (lambda: export("run", tmp_path / "out", None), "settings: expected ExportSettings, got NoneType"),
        (lambda: evaluate("run", "data.jsonl", None), "settings: expected EvalSettings, got NoneType"),
        (
            lambda: train("recipe.yaml"),
            "config: expected TrainConfig, got str; read a recipe with load_config",
        ),
        (lambda: load_config("recipe.yaml", "max_steps=3"), "write ['max_steps=3']"),
        (lambda: load_config(None, []), "path: expected a path (text or a Path), got NoneType"),
    ]
    for call, message in calls:
        with pytest.raises(UserError, match=re.escape(message)):
            call()
    assert not (tmp_path / "out").exists()


def test_settings_changed_after_creation_are_checked_again(tiny_chat_model: Path, tmp_path: Path) -> None:
    """`settings.rank = 0` in a notebook skipped every check: ZeroDivisionError, AttributeError, or
    `iters = 0` silently run as 5; a TrainConfig's batch size 0 left a half-made run behind."""
    import pytest

    from qpissa import ConvertSettings, UserError, convert, load_config, train

    changes = [
        ("rank", 0, "--rank must be at least 1"),
        ("iters", 0, "--iters"),
        ("method", "nope", "method"),
        ("blocksize", 48, "--blocksize"),
        ("targets", ["q_proj"], "targets"),
    ]
    for name, value, message in changes:
        settings = ConvertSettings(rank=4, iters=1)
        setattr(settings, name, value)
        with pytest.raises(UserError, match=re.escape(message)):
            convert(tiny_chat_model, tmp_path / "out", settings, show_progress=False)
    settings = ConvertSettings(rank=4, iters=1)
    settings.method = "qlora"  # text, as the constructor takes it
    assert (
        convert(tiny_chat_model, tmp_path / "out", settings, show_progress=False)["settings"]["method"]
        == "qlora"
    )
    with pytest.raises(
        UserError, match=re.escape("model_dir: expected a path (text or a Path), got NoneType")
    ):
        convert(None, tmp_path / "other", ConvertSettings())
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {tmp_path / 'out'}\noutput_dir: {tmp_path / 'run'}\ndata:\n  path: x.jsonl\n")
    config = load_config(recipe, [])
    config.per_device_train_batch_size = 0
    with pytest.raises(UserError, match="`per_device_train_batch_size` must be at least 1"):
        train(config, show_progress=False)
    config = load_config(recipe, [])
    config.data.max_seq_len = 0
    with pytest.raises(UserError, match="max_seq_len"):
        train(config, show_progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "other").exists()


def test_a_callers_default_dtype_changes_no_byte_of_a_conversion(
    tiny_chat_model: Path, tmp_path: Path
) -> None:
    """With `torch.set_default_dtype(torch.float64)` in a notebook, every NF4 quant_map was stored float64."""
    import torch

    from qpissa import ConvertSettings, convert

    settings = ConvertSettings(rank=4, iters=1)
    convert(tiny_chat_model, tmp_path / "reference", settings, show_progress=False)
    torch.set_default_dtype(torch.float64)
    try:
        convert(tiny_chat_model, tmp_path / "float64", settings, show_progress=False)
        assert torch.get_default_dtype() == torch.float64  # the caller's, given back
    finally:
        torch.set_default_dtype(torch.float32)
    for path in (tmp_path / "reference").rglob("*.safetensors"):
        assert (
            path.read_bytes()
            == (tmp_path / "float64" / path.relative_to(tmp_path / "reference")).read_bytes()
        )


def test_the_api_is_spared_the_library_notes_the_cli_hides() -> None:
    """bitsandbytes' note that its bf16 CPU kernel could not be fetched reached every API user."""
    note = "Failed to load CPU gemm_4bit_forward from kernels-community"
    script = (
        "import logging; from qpissa import convert; "
        f"logging.getLogger('bitsandbytes.backends.cpu.ops').warning({note!r}); "
        "logging.getLogger('bitsandbytes.backends.cpu.ops').warning('another note')"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert note not in done.stderr and "another note" in done.stderr, done.stderr
