"""Every user mistake in `qpissa convert`: one line on stderr, exit status 2, nothing written."""

from __future__ import annotations

import importlib
import json
import re
import shutil
from pathlib import Path

import pytest

from qpissa.cli import main


def _fails(capsys: pytest.CaptureFixture, out: Path, model: str, *extra: str) -> str:
    status = main(["--quiet", "convert", model, str(out), *extra])
    error = capsys.readouterr().err.strip()
    assert status == 2
    assert error.startswith("qpissa: error: ") and "\n" not in error, error
    assert not out.exists() and not out.with_name(out.name + ".partial").exists(), "no partial output"
    return error


@pytest.fixture
def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "model"
    shutil.copytree(tiny_model, copy)
    return copy


def test_missing_model_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert "does not exist" in _fails(capsys, tmp_path / "out", str(tmp_path / "nope"))


def test_model_path_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    file = tmp_path / "weights.safetensors"
    file.write_text("x")
    assert "not a directory" in _fails(capsys, tmp_path / "out", str(file))


def test_only_pytorch_bin_weights(model_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (model_copy / "model.safetensors").rename(model_copy / "pytorch_model.bin")
    error = _fails(capsys, tmp_path / "out", str(model_copy))
    assert "pytorch_model.bin" in error and "safetensors" in error


def test_garbage_shard(model_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (model_copy / "model.safetensors").write_bytes(b"\xff" * 64)
    assert "model.safetensors" in _fails(capsys, tmp_path / "out", str(model_copy))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weight_names_the_tensor(model_copy: Path, tmp_path: Path, capsys, value: float) -> None:
    from safetensors.torch import load_file, save_file

    shard = model_copy / "model.safetensors"
    tensors = load_file(shard)
    name = next(key for key in sorted(tensors) if key.endswith("mlp.down_proj.weight"))
    tensors[name][0, 0] = value
    save_file(tensors, shard, metadata={"format": "pt"})
    error = _fails(capsys, tmp_path / "out", str(model_copy), "--rank", "4")
    assert f"{name} contains NaN or infinite values" in error, error


def test_already_quantized_checkpoint(
    tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    converted = tmp_path / "converted"
    assert main(["--quiet", "convert", str(tiny_model), str(converted), "--rank", "4"]) == 0
    capsys.readouterr()
    error = _fails(capsys, tmp_path / "out", str(converted))
    assert "already quantized" in error and "full-precision" in error


def test_quantized_weights_without_quantization_config(tiny_model: Path, tmp_path: Path, capsys) -> None:
    """A 4-bit checkpoint whose config lost its quantization_config is still recognized (peft#3742)."""
    converted = tmp_path / "converted"
    assert main(["--quiet", "convert", str(tiny_model), str(converted), "--rank", "4"]) == 0
    config = json.loads((converted / "config.json").read_text())
    del config["quantization_config"]
    (converted / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert "already quantized" in _fails(capsys, tmp_path / "out", str(converted))


def test_rank_too_large(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    error = _fails(capsys, tmp_path / "out", str(tiny_model), "--rank", "64")
    assert re.search(r"--rank 64 is not below min\(out, in\) of \d+ of the 14 targets", error), error
    assert "use --rank 31 at most (the smallest side of the targets is 32, k_proj's (32, 64)" in error, error


def test_targets_matching_nothing_lists_what_exists(tiny_model: Path, tmp_path: Path, capsys) -> None:
    error = _fails(capsys, tmp_path / "out", str(tiny_model), "--targets", "qkv_proj", "--rank", "4")
    assert "qkv_proj" in error and "q_proj" in error and "down_proj" in error


def test_output_layer_is_refused_as_a_target(tiny_model: Path, tmp_path: Path, capsys) -> None:
    assert "lm_head" in _fails(
        capsys, tmp_path / "out", str(tiny_model), "--targets", "q_proj,lm_head", "--rank", "4"
    )


def test_invalid_option_values(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    error = _fails(capsys, tmp_path / "out", str(tiny_model), "--rank", "0", "--blocksize", "48")
    assert "--rank" in error and "--blocksize" in error, "all problems are reported at once"
    assert "--iters" in _fails(capsys, tmp_path / "out", str(tiny_model), "--method", "qlora", "--iters", "3")


def test_unknown_method_is_an_argparse_error(tiny_model: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(tiny_model), str(tmp_path / "out"), "--method", "pissa"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_output_is_kept(tiny_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    status = main(["--quiet", "convert", str(tiny_model), str(out), "--rank", "4"])
    error = capsys.readouterr().err  # --overwrite would be refused too: it is not advised
    assert status == 2 and "is not a QPiSSA directory, so it is not replaced" in error, error
    assert (out / "keep.txt").read_text() == "mine"
    (out / "qpissa_report.json").write_text("{}")  # an earlier conversion: --overwrite would replace it
    status = main(["--quiet", "convert", str(tiny_model), str(out), "--rank", "4"])
    assert status == 2 and "pass --overwrite to replace it" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_interrupted_output_needs_resume_or_overwrite(tiny_model: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "out.partial").mkdir()
    status = main(["--quiet", "convert", str(tiny_model), str(tmp_path / "out"), "--rank", "4"])
    assert status == 2 and "--resume" in capsys.readouterr().err


def test_resume_refuses_an_out_the_user_filled_since_the_interruption(
    tiny_model: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finished, a resumed conversion replaces OUT: a folder made there in between is the user's."""
    convert_module = importlib.import_module("qpissa.convert")  # `qpissa.convert` is the API function
    real = convert_module._read_and_decompose
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    args = ["--quiet", "convert", str(tiny_model), str(tmp_path / "out"), "--rank", "4", "--iters", "1"]
    monkeypatch.setattr(convert_module, "_read_and_decompose", interrupted)
    assert main(args) == 130  # interrupted, as by Ctrl-C
    monkeypatch.setattr(convert_module, "_read_and_decompose", real)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main([*args, "--resume"]) == 2
    assert "is not a QPiSSA directory, so it is not replaced" in capsys.readouterr().err
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine" and (tmp_path / "out.partial").is_dir()


def test_resume_with_other_settings_is_refused(tiny_model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["--quiet", "convert", str(tiny_model), str(out), "--rank", "4"]) == 0
    status = main(["--quiet", "convert", str(tiny_model), str(out), "--rank", "8", "--seed", "3", "--resume"])
    assert (
        status == 2
        and "holds a finished conversion with other settings (--rank, --seed)" in capsys.readouterr().err
    )


def test_resume_names_calibration_data_that_changed(tiny_chat_model: Path, tmp_path: Path, capsys) -> None:
    """The same --calib path with other contents draws other tokens: the refusal says it is the data."""
    calib = tmp_path / "calib.txt"
    calib.write_text("The first version of the calibration text, long enough for a window. " * 40)
    args = ["--quiet", "convert", str(tiny_chat_model), str(tmp_path / "out"), "--rank", "4", "--iters", "1",
            "--calib", str(calib), "--calib-samples", "2", "--calib-seq-len", "16"]  # fmt: skip
    assert main(args) == 0
    calib.write_text("A second, edited version of that text, also long enough for two windows. " * 40)
    assert main([*args, "--resume"]) == 2
    assert "other settings (the --calib data's contents); use --overwrite" in capsys.readouterr().err


def test_resume_takes_a_default_written_out_and_the_same_calib_data_at_another_path(
    tiny_chat_model: Path, tmp_path: Path, capsys
) -> None:
    """`--iters 5` is the default's conversion and a copy of the --calib file holds the same data: both
    were refused as other settings, with the advice to convert again (--overwrite)."""
    calib = tmp_path / "calib.txt"
    calib.write_text("The calibration text, long enough for a window or two of characters. " * 40)
    args = ["--quiet", "convert", str(tiny_chat_model), str(tmp_path / "out"), "--rank", "4", "--iters", "1",
            "--calib-samples", "2", "--calib-seq-len", "16"]  # fmt: skip
    assert main([*args, "--calib", str(calib)]) == 0
    shutil.copy(calib, tmp_path / "copy.txt")
    report = (tmp_path / "out" / "qpissa_report.json").read_bytes()
    for extra in (
        ["--calib", str(tmp_path / "copy.txt")],
        ["--calib", str(calib), "--calib-general", "0.25"],
    ):
        assert main([*args, *extra, "--resume"]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "qpissa_report.json").read_bytes() == report, "nothing converted again"
    assert main([*args, "--calib", str(calib), "--rank", "2", "--resume"]) == 2
    assert "other settings (--rank); use --overwrite" in capsys.readouterr().err


def test_resume_with_nothing_to_resume_says_it_starts_over(tiny_model: Path, tmp_path: Path, caplog) -> None:
    with caplog.at_level("INFO", logger="qpissa.convert_output"):
        assert (
            main(["--quiet", "convert", str(tiny_model), str(tmp_path / "out"), "--rank", "4", "--resume"])
            == 0
        )
    assert "out.partial holds no interrupted conversion: --resume starts it from the beginning" in caplog.text


@pytest.mark.misdecoding_cpu
def test_widths_the_cpu_kernel_decodes_wrongly_are_refused_on_a_cpu(
    tiny_model: Path, tmp_path: Path, capsys
) -> None:
    """bitsandbytes 0.50's CPU kernel decodes 64-wide weights in blocks of 128 by rows, not as its
    quantizer wrote them: a fit against that decoding would be wrong wherever the codes decode right."""
    from qpissa.nf4 import cpu_decodes_by_rows

    assert cpu_decodes_by_rows(64, 128) and not cpu_decodes_by_rows(128, 64)  # the probe sees it here
    error = _fails(capsys, tmp_path / "out", str(tiny_model), "--rank", "4", "--blocksize", "128")
    assert "decodes NF4 weights 64 wide" in error and "convert with --blocksize 64" in error
    assert not (tmp_path / "out").exists()


@pytest.mark.misdecoding_cpu
def test_the_blocksize_advised_for_such_widths_is_one_that_decodes_right(tmp_path: Path, capsys) -> None:
    """96 and 200 wide: no blocksize divides both, but 32 decodes both right: "another --blocksize"
    was advised, with none named."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=96, intermediate_size=200, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    capsys.readouterr()  # transformers' bar while saving
    error = _fails(capsys, tmp_path / "out", str(tmp_path / "model"), "--rank", "4")
    assert "decodes NF4 weights 96 wide" in error and "convert with --blocksize 32" in error
    assert main(["--quiet", "convert", str(tmp_path / "model"), str(tmp_path / "out"), "--rank", "4",
                 "--iters", "1", "--blocksize", "32"]) == 0  # fmt: skip


def _converting_warnings(model: Path, out: Path, caplog: pytest.LogCaptureFixture) -> str:
    """The checkpoint reader's warnings while `model` converts into `out` (which must succeed)."""
    caplog.clear()
    with caplog.at_level("WARNING", logger="qpissa.checkpoint"):
        assert main(["convert", str(model), str(out), "--rank", "4", "--iters", "1"]) == 0
    return caplog.text


def test_weights_beside_model_safetensors_are_ignored_as_transformers_ignores_them(
    model_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A backup copy beside model.safetensors (no index) once made convert write every tensor twice
    (a traceback, and a half-written OUT.partial); transformers loads model.safetensors alone."""
    shutil.copy(model_copy / "model.safetensors", model_copy / "model-copy.safetensors")
    (model_copy / "optimizer.safetensors").write_bytes(b"not read")
    warnings = _converting_warnings(model_copy, tmp_path / "out", caplog)
    assert "model-copy.safetensors, optimizer.safetensors ignored" in warnings


def test_model_safetensors_is_read_before_an_index_and_an_index_ignores_what_it_does_not_list(
    model_copy: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """transformers loads model.safetensors before any index: converting the index's shards instead
    converted other weights than the model loaded from MODEL."""
    from safetensors import safe_open

    with safe_open(str(model_copy / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    shard = "model-00001-of-00001.safetensors"
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, shard)}
    (model_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    (model_copy / shard).write_bytes(b"not read")  # read, it would fail the conversion
    assert f"{shard}, model.safetensors.index.json ignored" in _converting_warnings(
        model_copy, tmp_path / "a", caplog
    )
    (model_copy / "model.safetensors").replace(model_copy / shard)
    (model_copy / "consolidated.safetensors").write_bytes(b"not read")
    warnings = _converting_warnings(model_copy, tmp_path / "b", caplog)
    assert "consolidated.safetensors ignored, as transformers ignores them" in warnings


def test_a_tokenizer_larger_than_the_models_embeddings_is_one_line(
    tiny_chat_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Its later ids index past the embedding table: an IndexError deep in the forward pass, in train,
    eval, chat and convert --calib alike (all read it through one loader)."""
    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_chat_model, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(300)])
    tokenizer.save_pretrained(model)
    (tmp_path / "calib.txt").write_text("Some calibration prose, long enough for a window or two. " * 20)
    error = _fails(
        capsys, tmp_path / "out", str(model), "--rank", "4", "--calib", str(tmp_path / "calib.txt")
    )
    assert f"{model}: the tokenizer has {len(tokenizer)} tokens, the model's embeddings 256" in error


def test_weights_under_another_name_without_an_index(
    model_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (model_copy / "model.safetensors").rename(model_copy / "weights.safetensors")
    error = _fails(capsys, tmp_path / "out", str(model_copy))
    assert "weights.safetensors but neither model.safetensors nor model.safetensors.index.json" in error


@pytest.mark.parametrize("damage", ["tensor removed", "more layers in config", "wider in config"])
def test_a_checkpoint_that_disagrees_with_its_config_is_refused(
    model_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture, damage: str
) -> None:
    """transformers would initialize a missing layer at random (with only a warning) or refuse a shape
    only at load: either way after a whole conversion was written."""
    from safetensors.torch import load_file, save_file

    config_path = model_copy / "config.json"
    config = json.loads(config_path.read_text())
    if damage == "tensor removed":
        weights = load_file(model_copy / "model.safetensors")
        del weights["model.layers.1.self_attn.q_proj.weight"]
        save_file(weights, model_copy / "model.safetensors", metadata={"format": "pt"})
        expected = "lacks model.layers.1.self_attn.q_proj.weight, which config.json's LlamaForCausalLM builds"
    elif damage == "more layers in config":
        config["num_hidden_layers"] += 1
        expected = (
            f"lacks model.layers.{config['num_hidden_layers'] - 1}.self_attn.q_proj.weight (and 6 more)"
        )
    else:
        config["hidden_size"] *= 2
        expected = "has shape [256, 64], but config.json's LlamaForCausalLM expects [256, 128]"
    config_path.write_text(json.dumps(config))
    error = _fails(capsys, tmp_path / "out", str(model_copy), "--rank", "4")
    assert expected in error and "restore the original files" in error, error
