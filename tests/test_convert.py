"""`qpissa convert` on tiny random models: the on-disk format, the invariants, determinism, resume."""

from __future__ import annotations

import importlib
import json
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from qpissa.cli import main
from qpissa.convert import convert
from qpissa.convert_settings import ConvertSettings, Method, SvdKind
from qpissa.run_marker import trained_on

RANK = 8


def _convert(model: Path, out: Path, *extra: str) -> dict:
    assert main(["--quiet", "convert", str(model), str(out), "--rank", str(RANK), *extra]) == 0
    return json.loads((out / "qpissa_report.json").read_text())


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118
    return tensors


def _reconstruct(out: Path, module: str) -> torch.Tensor:
    """deq(Q) + s·B·A for one module, from the files alone (bitsandbytes' own decoder)."""
    import bitsandbytes.functional as bnbf

    residual = _tensors(out)
    state = bnbf.QuantState.from_dict(
        {
            k.removeprefix(f"{module}.weight."): v
            for k, v in residual.items()
            if k.startswith(f"{module}.weight.")
        },
        device=torch.device("cpu"),
    )
    deq = bnbf.dequantize_4bit(residual[f"{module}.weight"], state).float()
    adapter = _tensors(out / "adapter")
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    A = adapter[f"base_model.model.{module}.lora_A.weight"]
    B = adapter[f"base_model.model.{module}.lora_B.weight"]
    return deq + config["lora_alpha"] / config["r"] * (B @ A)


def _plain_logits(directory: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of a conversion loaded as README says, with transformers, bitsandbytes and PEFT alone (no
    qpissa), plus README's two lines for float32 compute on a CPU."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    for module in base.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    for parameter in base.parameters():
        if parameter.is_floating_point() and not isinstance(parameter, bnb.nn.Params4bit):
            parameter.data = parameter.data.float()
    with torch.no_grad():
        return PeftModel.from_pretrained(base, directory / "adapter")(tokens).logits


def _original_logits(model: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)(tokens).logits


@pytest.fixture(scope="module")
def converted(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("conv") / "qpissa"
    _convert(tiny_model, out, "--iters", "2", "--alpha", "16", "--metrics", "nuc", "--shard-size-mb", "0.05")
    return out


def test_output_is_a_standard_prequantized_checkpoint(converted: Path) -> None:
    config = json.loads((converted / "config.json").read_text())
    quant = config["quantization_config"]
    assert quant["quant_method"] == "bitsandbytes" and quant["load_in_4bit"]
    assert quant["bnb_4bit_quant_type"] == "nf4" and quant["bnb_4bit_use_double_quant"]
    assert "lm_head" in quant["llm_int8_skip_modules"]
    assert len(list(converted.glob("model-*-of-*.safetensors"))) > 1, "small shards expected"
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_tensors(converted))
    adapter_config = json.loads((converted / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["init_lora_weights"] is True and adapter_config["lora_dropout"] == 0
    assert adapter_config["r"] == RANK and adapter_config["lora_alpha"] == 16
    assert not list(converted.parent.glob("*.partial"))


def test_stored_codes_are_bitsandbytes_quantization_of_the_residual(
    tiny_model: Path, converted: Path
) -> None:
    import bitsandbytes.functional as bnbf

    original, residual, adapter = _tensors(tiny_model), _tensors(converted), _tensors(converted / "adapter")
    module = "model.layers.1.mlp.down_proj"
    W = original[f"{module}.weight"].float()
    A = adapter[f"base_model.model.{module}.lora_A.weight"]
    B = adapter[f"base_model.model.{module}.lora_B.weight"]
    packed, _ = bnbf.quantize_4bit(
        W - 2.0 * (B @ A), blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    assert torch.equal(residual[f"{module}.weight"], packed)


def test_reconstruction_error_is_exactly_the_reported_error(tiny_model: Path, converted: Path) -> None:
    report = json.loads((converted / "qpissa_report.json").read_text())
    original = _tensors(tiny_model)
    assert len(report["layers"]) == 14
    for layer in report["layers"]:
        W = original[f"{layer['name']}.weight"].float()
        error = torch.linalg.matrix_norm((W - _reconstruct(converted, layer["name"])).double()).item()
        assert error == pytest.approx(layer["err_fro"], rel=1e-5)
        assert 0 < layer["err_fro"] < layer["err_fro_base"], "QPiSSA must beat plain NF4 on every matrix"
    summary = report["summary"]
    assert set(summary["by_type"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert summary["avg"] == pytest.approx(sum(summary["by_type"].values()) / 7)


def test_tied_embeddings_and_untargeted_tensors_are_copied_unchanged(
    tiny_model: Path, converted: Path
) -> None:
    original, residual = _tensors(tiny_model), _tensors(converted)
    copied = [name for name in original if not name.endswith("_proj.weight")]
    assert "model.embed_tokens.weight" in copied
    for name in copied:
        assert torch.equal(original[name], residual[name]), name


def test_side_files_are_copied_but_not_the_inputs_qpissa_records(tiny_model: Path, tmp_path: Path) -> None:
    """A fetched demo model's marker describes the original: a copy would make the output pass for it."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    (model / "qpissa_fetch.json").write_text('{"name": "smollm2-135m"}')
    (model / "special_tokens_map.json").write_text("{}")
    _convert(model, tmp_path / "out", "--iters", "1")
    assert (tmp_path / "out" / "special_tokens_map.json").is_file()
    assert not (tmp_path / "out" / "qpissa_fetch.json").exists()


def test_a_model_without_a_tokenizer_is_said_before_the_conversion(
    tiny_model: Path, tiny_chat_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """train, eval and chat need the tokenizer the output copies from the model: say so at once."""
    for model, warned in ((tiny_model, True), (tiny_chat_model, False)):
        caplog.clear()
        with caplog.at_level("WARNING", logger="qpissa.convert"):
            _convert(model, tmp_path / model.parent.name, "--iters", "1")
        messages = [r.getMessage() for r in caplog.records if "holds no tokenizer" in r.getMessage()]
        assert len(messages) == warned, messages


def test_transformers_and_peft_load_it_without_requantizing(tiny_model: Path, converted: Path) -> None:
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(converted)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert torch.equal(layer.weight.data, _tensors(converted)["model.layers.0.self_attn.q_proj.weight"])
    peft_model = PeftModel.from_pretrained(model, converted / "adapter", is_trainable=True)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert len(trainable) == 28 and all("lora_" in n for n in trainable)


def test_initialized_model_is_closer_to_the_original_than_qlora(
    tiny_model: Path, converted: Path, tmp_path: Path
) -> None:
    """Logits error of the initialized model; the KL version runs on the real model (test_demo_model)."""
    qlora = tmp_path / "qlora"
    _convert(tiny_model, qlora, "--method", "qlora")
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    reference = _original_logits(tiny_model, tokens)
    error_qpissa, error_qlora = ((_plain_logits(d, tokens) - reference).norm() for d in (converted, qlora))
    assert 0 < error_qpissa < error_qlora


def test_a_subset_of_targets_loads_with_the_other_layers_in_full_precision(
    tiny_model: Path, converted: Path, tmp_path: Path
) -> None:
    """Linear layers outside --targets are stored unchanged and must be listed in llm_int8_skip_modules:
    else transformers takes them for pre-quantized codes at load, and the forward fails."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    subset = tmp_path / "subset"
    report = _convert(tiny_model, subset, "--targets", "q_proj,v_proj", "--iters", "2")
    decomposed = sorted(layer["name"].rsplit(".", 1)[1] for layer in report["layers"])
    assert decomposed == ["q_proj", "q_proj", "v_proj", "v_proj"]
    original = _tensors(tiny_model)
    loaded = AutoModelForCausalLM.from_pretrained(subset, dtype=torch.float32)
    linears = {n: m for n, m in loaded.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    assert len(linears) == 14
    for name, module in linears.items():
        targeted = name.endswith(("q_proj", "v_proj"))
        assert isinstance(module, bnb.nn.Linear4bit) == targeted, name
        if not targeted:  # full precision: the checkpoint's weight itself
            assert torch.equal(module.weight.data.float(), original[f"{name}.weight"].float()), name
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    reference = _original_logits(tiny_model, tokens)
    error_subset = (_plain_logits(subset, tokens) - reference).norm() / reference.norm()
    error_all = (_plain_logits(converted, tokens) - reference).norm() / reference.norm()
    assert 0 < error_subset < error_all < 0.08, (error_subset, error_all)  # measured 0.041 < 0.062


@pytest.mark.parametrize(
    ("flags", "written"), [((), "float32"), (("--compute-dtype", "bfloat16"), "bfloat16")]
)
def test_compute_dtype_written_for_transformers(
    tiny_model: Path, tmp_path: Path, flags: tuple[str, ...], written: str
) -> None:
    """A CPU conversion's default is float32 (a bf16 matmul on a CPU is ~100x slower); --compute-dtype
    sets it; transformers' Linear4bit layers compute in what config.json says."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    _convert(tiny_model, out, "--device", "cpu", "--iters", "1", *flags)
    quantization = json.loads((out / "config.json").read_text())["quantization_config"]
    assert quantization["bnb_4bit_compute_dtype"] == written
    layers = [
        m for m in AutoModelForCausalLM.from_pretrained(out).modules() if isinstance(m, bnb.nn.Linear4bit)
    ]
    assert len(layers) == 14 and {layer.compute_dtype for layer in layers} == {getattr(torch, written)}


@pytest.mark.parametrize("method", ["qpissa", "loftq"])
def test_iterations_lower_the_error(tiny_model: Path, tmp_path: Path, method: str) -> None:
    one = _convert(tiny_model, tmp_path / "t1", "--method", method, "--iters", "1", "--svd", "exact")
    five = _convert(tiny_model, tmp_path / "t5", "--method", method, "--iters", "5", "--svd", "exact")
    assert five["summary"]["avg_fro"] > one["summary"]["avg_fro"] > 0


@pytest.mark.parametrize("sketch_dtype", ["float32", "bfloat16"])
def test_randomized_svd_matches_exact_quality(tiny_model: Path, tmp_path: Path, sketch_dtype: str) -> None:
    exact = _convert(tiny_model, tmp_path / "exact", "--svd", "exact", "--iters", "1")
    randomized = _convert(
        tiny_model, tmp_path / "rand", "--svd", "randomized", "--iters", "1", "--sketch-dtype", sketch_dtype
    )
    assert randomized["settings"]["dtypes"]["sketch"] == sketch_dtype
    assert randomized["summary"]["avg_fro"] == pytest.approx(exact["summary"]["avg_fro"], abs=0.5)


def test_qlora_residual_is_plain_nf4_of_the_weight(tiny_model: Path, tmp_path: Path) -> None:
    report = _convert(tiny_model, tmp_path / "qlora", "--method", "qlora", "--no-double-quant")
    adapter = _tensors(tmp_path / "qlora" / "adapter")
    assert all(t.abs().sum() == 0 for k, t in adapter.items() if "lora_B" in k)
    assert all(t.abs().sum() > 0 for k, t in adapter.items() if "lora_A" in k)
    assert all(layer["reduction_fro"] == 0 for layer in report["layers"])


def test_same_inputs_and_seed_give_identical_bytes_with_any_number_of_workers(
    tiny_model: Path, tmp_path: Path
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    _convert(tiny_model, first, "--seed", "3", "--workers", "1")
    _convert(tiny_model, second, "--seed", "3", "--workers", "100")
    assert _file_bytes(first) == _file_bytes(second)
    report = json.loads((second / "qpissa_report.json").read_text())
    assert report["settings"]["workers"] == len(report["layers"]) == 14  # no more than there are matrices
    third = tmp_path / "c"
    _convert(tiny_model, third, "--seed", "4")
    assert (
        _file_bytes(third)["adapter/adapter_model.safetensors"]
        != _file_bytes(first)["adapter/adapter_model.safetensors"]
    )


def test_a_conversion_redone_with_other_metrics_or_shards_holds_the_same_tensors_for_its_runs(
    tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "qpissa"
    _convert(tiny_model, out, "--metrics", "fro")
    marker = {"conversion": json.loads((out / "qpissa_report.json").read_text())["fingerprint"]}
    tensors = {**_tensors(out), **_tensors(out / "adapter")}
    _convert(tiny_model, out, "--metrics", "nuc", "--shard-size-mb", "0.01", "--overwrite")
    assert len(list(out.glob("*.safetensors"))) > 1
    redone = {**_tensors(out), **_tensors(out / "adapter")}
    assert redone.keys() == tensors.keys() and all(torch.equal(redone[k], t) for k, t in tensors.items())
    assert trained_on(marker, out)  # eval, export, chat and report still take the run
    _convert(tiny_model, out, "--seed", "1", "--overwrite")
    assert trained_on(marker, out) is False


def test_resume_after_an_exception_at_a_random_matrix_gives_identical_bytes(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    convert_module = importlib.import_module("qpissa.convert")  # `qpissa.convert` is the API function

    settings = ConvertSettings(
        method=Method.QPISSA, rank=RANK, iters=2, svd=SvdKind.RANDOMIZED, shard_size_mb=0.03
    )
    reference = tmp_path / "reference"
    convert(tiny_model, reference, settings, show_progress=False)

    fail_at = random.Random(5).randint(1, 13)
    real = convert_module._read_and_decompose
    calls = {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    out = tmp_path / "out"
    monkeypatch.setattr(convert_module, "_read_and_decompose", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(tiny_model, out, settings, show_progress=False)
    assert not out.exists(), "an interrupted run must not look complete"
    monkeypatch.setattr(convert_module, "_read_and_decompose", real)
    convert(tiny_model, out, settings, resume=True, show_progress=False)
    assert _file_bytes(out) == _file_bytes(reference), f"interrupted at matrix {fail_at}"


# Runs `qpissa ARGV...` and SIGKILLs itself right after the Nth safetensors file is closed: two per
# shard (the shard, then its adapter part), so N = 3 dies with shard 2 written but its adapter part
# not, and N = 4 with both written but not yet recorded in progress.json.
_KILL_AFTER_NTH_CLOSE = """
import os, signal, sys
from qpissa import checkpoint
from qpissa.cli import main

close, closed = checkpoint.SafetensorsWriter.close, []

def close_then_die(self, metadata=None):
    close(self, metadata)
    closed.append(self.path)
    if len(closed) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint.SafetensorsWriter.close = close_then_die
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("kill_after", [3, 4])
def test_resume_after_sigkill_gives_identical_bytes(
    tiny_model: Path, tmp_path: Path, kill_after: int
) -> None:
    args = [str(tiny_model), "--rank", str(RANK), "--iters", "3", "--shard-size-mb", "0.02", "--quiet"]
    reference = tmp_path / "reference"
    assert main(["convert", args[0], str(reference), *args[1:]]) == 0
    assert len(list(reference.glob("model-*.safetensors"))) >= 3, "the kill must come before the last shard"
    out = tmp_path / "out"
    script = tmp_path / "killed_convert.py"
    script.write_text(_KILL_AFTER_NTH_CLOSE)
    command = [sys.executable, str(script), str(kill_after), "convert", args[0], str(out), *args[1:]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not out.exists(), "a killed conversion must not look complete"
    progress = json.loads((tmp_path / "out.partial" / "progress.json").read_text())
    assert len(progress["shards"]) == 1  # shard 2 was being written: the resume redoes it
    assert main(["convert", args[0], str(out), *args[1:], "--resume"]) == 0
    assert _file_bytes(out) == _file_bytes(reference)


def test_resume_of_a_finished_conversion_does_nothing(tiny_model: Path, converted: Path) -> None:
    before = (converted / "qpissa_report.json").stat().st_mtime_ns
    args = ["--iters", "2", "--alpha", "16", "--metrics", "nuc", "--shard-size-mb", "0.05", "--resume"]
    _convert(tiny_model, converted, *args)
    assert (converted / "qpissa_report.json").stat().st_mtime_ns == before


def test_overwrite_replaces_an_existing_output(tiny_model: Path, tmp_path: Path) -> None:
    """The earlier conversion's files the new one does not write (its shards, their index) are gone."""
    out = tmp_path / "out"
    _convert(tiny_model, out, "--rank", "2", "--shard-size-mb", "0.03")
    assert (out / "model.safetensors.index.json").is_file()
    _convert(tiny_model, out, "--overwrite")
    assert sorted(p.name for p in out.glob("model*")) == ["model.safetensors"]


def _file_bytes(directory: Path) -> dict[str, bytes]:
    """Every output file's bytes; the report's timings and the adapter's own path may differ."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name not in ("qpissa_report.json", "adapter_config.json"):
            files[str(path.relative_to(directory))] = path.read_bytes()
    adapter_config = json.loads((directory / "adapter" / "adapter_config.json").read_text())
    assert adapter_config.pop("base_model_name_or_path") == str(directory.resolve())
    files["adapter_config"] = json.dumps(adapter_config, sort_keys=True).encode()
    report = json.loads((directory / "qpissa_report.json").read_text())
    for layer in report["layers"]:
        layer.pop("seconds"), layer.pop("metrics_seconds")
    files["layers"] = json.dumps(report["layers"], sort_keys=True).encode()
    return files


def test_a_moved_output_loads_alone_with_its_adapter_and_computes_the_same(
    tiny_chat_model: Path, tmp_path: Path
) -> None:
    """The artifacts are self-contained: moved elsewhere (as `mv` does; links stay links), the copy's
    tokenizer, shards and adapter load with transformers + PEFT and give the original output's logits,
    those of a model close to the full-precision one."""
    from transformers import AutoTokenizer

    original = tmp_path / "qpissa"
    _convert(tiny_chat_model, original, "--iters", "1", "--shard-size-mb", "0.05")
    assert (original / "model.safetensors.index.json").is_file()
    text = "The moved copy computes the same."
    tokens = AutoTokenizer.from_pretrained(original)(text, return_tensors="pt").input_ids
    before = _plain_logits(original, tokens)
    reference = _original_logits(tiny_chat_model, tokens)
    assert (before - reference).norm() / reference.norm() < 0.075  # measured 0.060; QLoRA's init: 0.088
    (tmp_path / "elsewhere").mkdir()
    moved = Path(shutil.move(original, tmp_path / "elsewhere" / "moved"))
    assert not original.exists()
    assert torch.equal(AutoTokenizer.from_pretrained(moved)(text, return_tensors="pt").input_ids, tokens)
    assert torch.equal(_plain_logits(moved, tokens), before)
