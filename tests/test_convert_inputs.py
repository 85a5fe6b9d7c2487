"""What `qpissa convert` checks of its input beyond the target matrices: every parameter the model builds is
stored, every copied tensor is finite, a resumed conversion reads the checkpoint it started on, and the
messages for layers no setting can convert. Each refusal is one line, exit status 2, nothing written."""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from qpissa.artifacts import FIDELITY_NAME, REPORT_NAME
from qpissa.cli import main
from qpissa.convert import convert
from qpissa.convert_settings import ConvertSettings, Method
from qpissa.loading import refuse_cpu_misdecoded
from qpissa.models import make_tiny_model
from qpissa.nf4 import cpu_decodes_by_rows
from qpissa.run_marker import trained_on


def _fails(capsys: pytest.CaptureFixture, out: Path, model: Path, *extra: str) -> str:
    status = main(["--quiet", "convert", str(model), str(out), "--rank", "4", "--iters", "1", *extra])
    error = capsys.readouterr().err.strip()
    assert status == 2, error
    assert error.startswith("qpissa: error: ") and "\n" not in error, error
    assert not out.exists() and not out.with_name(out.name + ".partial").exists(), "no partial output"
    return error


def _edit(model: Path, change) -> None:
    """Rewrite model.safetensors with `change(tensors)` applied."""
    tensors = load_file(model / "model.safetensors")
    change(tensors)
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def _file_bytes(directory: Path, *, weights_only: bool = False) -> dict[str, bytes]:
    """Every file's bytes; with `weights_only`, the tensor files' alone (a report's timings differ)."""
    paths = directory.rglob("*.safetensors" if weights_only else "*")
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(paths) if p.is_file()}


@pytest.fixture
def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    """The tiny tied Llama, copied (modification times kept) so that a test may change it."""
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


@pytest.fixture(scope="module")
def untied_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama with its own `lm_head` (tie_word_embeddings false)."""
    return make_tiny_model(tmp_path_factory.mktemp("untied") / "model", tie=False)


@pytest.mark.parametrize(
    ("tied", "missing"),
    [
        (False, "lm_head.weight"),
        (True, "model.embed_tokens.weight"),
        (True, "model.layers.1.input_layernorm.weight"),
        (True, "model.norm.weight"),
    ],
)
def test_a_parameter_no_tensor_fills_is_refused(
    tiny_model: Path, untied_model: Path, tmp_path: Path, capsys, tied: bool, missing: str
) -> None:
    """transformers would fill it with random values at load, with no more than a warning."""
    model = Path(shutil.copytree(tiny_model if tied else untied_model, tmp_path / "model"))
    _edit(model, lambda tensors: tensors.pop(missing))
    error = _fails(capsys, tmp_path / "out", model)
    assert f"lacks {missing}" in error and "config.json's LlamaForCausalLM builds" in error, error


def test_a_tied_output_layer_need_not_be_stored(tiny_model: Path, tmp_path: Path) -> None:
    assert "lm_head.weight" not in load_file(tiny_model / "model.safetensors")  # not vacuous
    assert main(["--quiet", "convert", str(tiny_model), str(tmp_path / "out"), "--rank", "4"]) == 0


def test_a_shard_the_index_no_longer_names_is_refused(untied_model: Path, tmp_path: Path, capsys) -> None:
    """An index pointing `lm_head.weight` at another shard leaves the shard holding it unread."""
    model = Path(shutil.copytree(untied_model, tmp_path / "model"))
    tensors = load_file(model / "model.safetensors")
    (model / "model.safetensors").unlink()
    head = {"lm_head.weight": tensors.pop("lm_head.weight")}
    save_file(tensors, model / "model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(head, model / "model-00002-of-00002.safetensors", metadata={"format": "pt"})
    weight_map = dict.fromkeys([*tensors, *head], "model-00001-of-00002.safetensors")  # lm_head: wrong
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    assert "lacks lm_head.weight" in _fails(capsys, tmp_path / "out", model)


@pytest.mark.parametrize(
    ("name", "value", "extra"),
    [
        ("model.embed_tokens.weight", float("inf"), ()),
        ("model.layers.1.mlp.up_proj.weight", float("nan"), ("--targets", "q_proj,v_proj")),
        ("model.norm.weight", float("-inf"), ("--shard-size-mb", "0.01")),  # found after shards are written
    ],
)
def test_a_copied_tensor_with_non_finite_values_is_refused(
    model_copy: Path, tmp_path: Path, capsys, name: str, value: float, extra: tuple[str, ...]
) -> None:
    _edit(model_copy, lambda tensors: tensors[name].view(-1)[-1].fill_(value))
    error = _fails(capsys, tmp_path / "out", model_copy, *extra)
    assert f"{name} contains NaN or infinite values" in error, error


def _interrupt(model: Path, out: Path, settings: ConvertSettings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stop a conversion with a KeyboardInterrupt at its 9th matrix, after some shards are recorded."""
    convert_module = importlib.import_module("qpissa.convert")  # `qpissa.convert` is the API function
    real, calls = convert_module._read_and_decompose, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(convert_module, "_read_and_decompose", interrupted)
        with pytest.raises(KeyboardInterrupt):
            convert(model, out, settings, show_progress=False)
    progress = json.loads((out.with_name(out.name + ".partial") / "progress.json").read_text())
    assert progress["shards"], "the interruption must come after a recorded shard"


@pytest.mark.parametrize("change", ["weights scaled", "touched"])
def test_resume_from_a_checkpoint_that_changed_is_refused(
    model_copy: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    settings = ConvertSettings(method=Method.QPISSA, rank=4, iters=1, shard_size_mb=0.03)
    args = ["--quiet", "convert", str(model_copy), str(tmp_path / "out"), "--rank", "4", "--iters", "1"]
    args += ["--shard-size-mb", "0.03", "--resume"]
    reference = tmp_path / "reference"
    convert(model_copy, reference, settings, show_progress=False)
    out = tmp_path / "out"
    _interrupt(model_copy, out, settings, monkeypatch)
    assert main(args) == 0  # unchanged: it resumes, to the same bytes
    assert _file_bytes(out, weights_only=True) == _file_bytes(reference, weights_only=True)
    shutil.rmtree(out)

    _interrupt(model_copy, out, settings, monkeypatch)
    partial = _file_bytes(out.with_name("out.partial"))
    shard = model_copy / "model.safetensors"
    if change == "weights scaled":  # same names, shapes and file size: other values
        size = shard.stat().st_size
        _edit(model_copy, lambda tensors: tensors.update({k: t * 0.5 for k, t in tensors.items()}))
        assert shard.stat().st_size == size
    else:
        stat = shard.stat()
        os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("qpissa: error: ") and "\n" not in error, error
    assert f"{model_copy} changed since the conversion in {out}.partial started (model.safetensors" in error
    assert "use --overwrite to start over" in error, error
    assert not out.exists() and _file_bytes(out.with_name("out.partial")) == partial, "nothing written"


def test_resume_of_a_finished_conversion_of_a_changed_checkpoint_is_refused(
    model_copy: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    args = ["--quiet", "convert", str(model_copy), str(out), "--rank", "4", "--iters", "1"]
    assert main(args) == 0
    before = _file_bytes(out)
    assert main([*args, "--resume"]) == 0  # unchanged: nothing to do
    config = model_copy / "config.json"
    config.write_text(config.read_text() + "\n")
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    error = capsys.readouterr().err.strip()
    assert f"changed since {out} was converted (config.json: another size" in error, error
    assert "use --overwrite to convert it again" in error and _file_bytes(out) == before


def test_layers_no_rank_fits_are_named_for_targets(tmp_path: Path, capsys) -> None:
    """Qwen2-MoE's shared_expert_gate is 1 x hidden: `--rank 0 at most` would be no advice at all."""
    import transformers

    config = transformers.Qwen2MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
        shared_expert_intermediate_size=128, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Qwen2MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "model")
    capsys.readouterr()  # transformers' bar while saving
    targets = "q_proj,shared_expert_gate"  # all-linear leaves it out
    error = _fails(capsys, tmp_path / "out", tmp_path / "model", "--targets", targets)
    assert "shared_expert_gate (1, 64)" in error and "--rank 0" not in error, error
    assert "no rank fits shared_expert_gate's (1, 64): leave those layers out with --targets " in error
    assert "q_proj" in error.rsplit("--targets ", 1)[1]


@pytest.mark.misdecoding_cpu
def test_the_cpu_decoding_refusal_names_the_layers(tiny_model: Path, tmp_path: Path, capsys) -> None:
    error = _fails(capsys, tmp_path / "out", tiny_model, "--blocksize", "128")
    assert "decodes NF4 weights 64 wide" in error, error
    assert "(model.layers.0.mlp.gate_proj, model.layers.0.mlp.up_proj, " in error, error
    assert "and 9 more)" in error, error  # 12 targets of the 14 are 64 wide


def test_widths_this_cpu_decodes_right_are_converted(tiny_model: Path, tmp_path: Path) -> None:
    """The refusal above is for CPUs whose kernel decodes such blocks by rows; where it decodes them as
    written (no AVX512-BF16), the same conversion is allowed and loads."""
    if cpu_decodes_by_rows(64, 128):
        pytest.skip("this CPU's kernel decodes 64-wide blocks of 128 by rows: refused (the test above)")
    out = tmp_path / "out"
    assert main(["--quiet", "convert", str(tiny_model), str(out), "--rank", "4", "--blocksize", "128"]) == 0
    refuse_cpu_misdecoded(out, "unused")  # raises where a layer would decode wrong here
    assert json.loads((out / REPORT_NAME).read_text())["summary"]["avg_fro"] > 0  # below plain NF4


def test_int8_weights_are_named_as_such(model_copy: Path, tmp_path: Path, capsys) -> None:
    name = "model.layers.0.self_attn.q_proj.weight"
    _edit(model_copy, lambda tensors: tensors.update({name: tensors[name].to(torch.int8)}))
    error = _fails(capsys, tmp_path / "out", model_copy)
    assert f"is already quantized ({name} is stored as I8)" in error, error


def test_a_conversion_recorded_before_the_files_stats_resumes_as_it_did(
    model_copy: Path, tmp_path: Path
) -> None:
    """`make demo` reruns convert with --resume over its earlier outputs: one written by an older qpissa,
    without the checkpoint files' stats, is reused by its settings, not refused as a changed checkpoint."""
    out = tmp_path / "out"
    args = ["--quiet", "convert", str(model_copy), str(out), "--rank", "4", "--iters", "1"]
    assert main(args) == 0
    report = json.loads((out / REPORT_NAME).read_text())
    del report["fingerprint"]["checkpoint"]
    (out / REPORT_NAME).write_text(json.dumps(report))
    before = _file_bytes(out)
    assert main([*args, "--resume"]) == 0
    assert _file_bytes(out) == before  # nothing converted again


def test_overwrite_replaces_a_conversion_compare_measured(tiny_model: Path, tmp_path: Path) -> None:
    """`compare` keeps its fidelity record in each conversion it measured: qpissa's, not the user's."""
    out = tmp_path / "out"
    args = ["--quiet", "convert", str(tiny_model), str(out), "--rank", "4", "--iters", "1"]
    assert main(args) == 0
    (out / FIDELITY_NAME).write_text("{}")
    assert main([*args, "--overwrite"]) == 0 and not (out / FIDELITY_NAME).exists()


def test_overwrite_of_a_conversion_recorded_before_its_file_list_is_judged_by_its_folders(
    tiny_model: Path, tmp_path: Path
) -> None:
    """An older qpissa's report lists no files: --overwrite replaces that conversion as it did."""
    out = tmp_path / "out"
    args = ["--quiet", "convert", str(tiny_model), str(out), "--rank", "4", "--iters", "1"]
    assert main(args) == 0
    report = json.loads((out / REPORT_NAME).read_text())
    assert "adapter/adapter_model.safetensors" in report.pop("files")
    (out / REPORT_NAME).write_text(json.dumps(report))
    (out / "tokenizer.model").write_text("a side file of that older conversion")
    assert main([*args, "--overwrite"]) == 0
    assert not (out / "tokenizer.model").exists() and "files" in json.loads((out / REPORT_NAME).read_text())
    (out / REPORT_NAME).write_text('{"settings": ')  # damaged: judged by its folders too, and replaced
    assert main([*args, "--overwrite"]) == 0 and "files" in json.loads((out / REPORT_NAME).read_text())


def test_a_run_recorded_before_the_files_stats_still_belongs_to_its_conversion(
    tiny_model: Path, tmp_path: Path
) -> None:
    """A run's marker written by an older qpissa holds a fingerprint without the checkpoint's file stats."""
    out = tmp_path / "out"
    convert(tiny_model, out, ConvertSettings(method=Method.QPISSA, rank=4, iters=1), show_progress=False)
    recorded = json.loads((out / REPORT_NAME).read_text())["fingerprint"]
    assert trained_on({"conversion": recorded}, out)
    del recorded["checkpoint"]
    assert trained_on({"conversion": recorded}, out)


def test_calibrating_a_model_without_a_tokenizer_is_one_line(
    tiny_model: Path, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
) -> None:
    """The warning that OUT would hold no tokenizer came before the refusal that --calib needs one."""
    calib = tmp_path / "calib.txt"
    calib.write_text("some calibration text. " * 50)
    args = ["convert", str(tiny_model), str(tmp_path / "out"), "--rank", "4", "--calib", str(calib)]
    with caplog.at_level("WARNING"):
        assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qpissa: error:") and "tokenizer" in lines[0], lines
    assert not [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]


def test_a_quant_storage_that_cannot_hold_a_target_is_refused_naming_it(tmp_path: Path, capsys) -> None:
    """`--quant-storage bfloat16` on a weight of an odd number of code bytes was refused only at write time,
    after every earlier matrix was decomposed, and without the weight's name."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=66, intermediate_size=33, num_hidden_layers=1, num_attention_heads=3,
        num_key_value_heads=3, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    capsys.readouterr()  # transformers' bar while saving
    error = _fails(capsys, tmp_path / "out", tmp_path / "model", "--quant-storage", "bfloat16")
    assert error == (
        "qpissa: error: target model.layers.0.mlp.down_proj (66, 33) has 1089 bytes of NF4 codes, not a "
        "multiple of bfloat16's 2, so it cannot be stored as bfloat16; convert with --quant-storage uint8, "
        "or leave it out of --targets"
    )
