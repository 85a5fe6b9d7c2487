"""The architecture matrix: a tiny random checkpoint of each common family converts (QPiSSA r=4, T=2),
loads with plain transformers + PEFT under the Auto class its config names, runs a forward and a
backward, trains 2 steps with `qpissa train` (causal LMs), and its merged export reproduces the trained
model; what cannot be supported is refused in one line before anything is written.

Tolerances: the float32 merged export is compared with the float32 trained model at 1e-4 absolute
(only the summation order differs); deq(Q) + s·B·A is within 15% (Frobenius) of the original weight at
r=4 on 64-wide random matrices, while a transposed factor would be off by more than 100%.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from qpissa import cli

COMMON = {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}  # fmt: skip
GPT2 = {
    "vocab_size": 256, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128,
    "bos_token_id": 1, "eos_token_id": 2,
}  # fmt: skip
BERT = {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 128, "pad_token_id": 0,
}  # fmt: skip
QWEN2_MOE = {
    **COMMON, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
    "shared_expert_intermediate_size": 128,
}  # fmt: skip
# family: (config class, model class, config); every width a multiple of 64, as bitsandbytes' CPU kernel needs
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {**COMMON, "tie_word_embeddings": True}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", COMMON),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**COMMON, "head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", COMMON),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**COMMON, "head_dim": 16}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {**COMMON, "head_dim": 16}),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", {**COMMON, "head_dim": 16}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", COMMON),  # fused qkv_proj, gate_up_proj
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", GPT2),  # Conv1D layers, weights stored [in, out]
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", {**COMMON, "num_local_experts": 4}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", QWEN2_MOE),  # a [1, hidden] gate: left out
    "bert": ("BertConfig", "BertModel", BERT),  # an encoder without a head (sentence-transformers' layout)
    "bert_cls": (
        "BertConfig",
        "BertForSequenceClassification",
        {**BERT, "num_labels": 64},
    ),  # a head, adapted
}
NOT_CAUSAL = {"bert": "AutoModel", "bert_cls": "AutoModelForSequenceClassification"}


def make_family_model(family: str, out_dir: Path, tokenizer_dir: Path, **changes) -> Path:
    """Save a tiny random checkpoint of `family` (bf16) with the character tokenizer beside it."""
    import transformers

    config_class, model_class, config = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**{**config, **changes})
    getattr(transformers, model_class)(config).to(torch.bfloat16).save_pretrained(out_dir)
    for path in tokenizer_dir.iterdir():
        shutil.copy(path, out_dir / path.name)
    return out_dir


@pytest.fixture(scope="module", params=list(FAMILIES))
def converted(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, char_tokenizer: Path
) -> tuple[str, Path, Path]:
    """(family, original checkpoint, its QPiSSA directory)."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    model = make_family_model(family, root / "model", char_tokenizer)
    argv = ["--quiet", "convert", str(model), str(root / "qpissa"), "--rank", "4", "--iters", "2"]
    assert cli.main(argv) == 0
    return family, model, root / "qpissa"


def _auto_class(family: str):
    import transformers

    return getattr(transformers, NOT_CAUSAL.get(family, "AutoModelForCausalLM"))


def _plain(family: str, model_dir: Path, adapter_dir: Path | None = None, trainable: bool = False):
    """Loaded as a user without qpissa would: the Auto class, then PEFT; float32 compute."""
    from peft import PeftModel

    from qpissa.loading import set_compute_dtype

    model = _auto_class(family).from_pretrained(model_dir, dtype=torch.float32)
    set_compute_dtype(model, torch.float32)  # transformers leaves a 4-bit model's norms in bf16
    if adapter_dir is None:
        return model
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)


def _ids() -> torch.Tensor:
    return torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(1))


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    output = model(input_ids=_ids())
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def test_loads_with_plain_transformers_and_peft_and_backpropagates(converted: tuple[str, Path, Path]) -> None:
    import bitsandbytes as bnb
    import transformers

    family, original_dir, qpissa_dir = converted
    report = json.loads((qpissa_dir / "qpissa_report.json").read_text())
    assert report["layers"], "nothing was converted"
    model = _plain(family, qpissa_dir, qpissa_dir / "adapter", trainable=True)
    original = dict(_auto_class(family).from_pretrained(original_dir, dtype=torch.float32).named_modules())
    adapted = {
        name: module for name, module in model.base_model.model.named_modules() if hasattr(module, "lora_A")
    }
    assert len(adapted) == len(report["layers"])
    for name, module in adapted.items():
        assert isinstance(module.base_layer, bnb.nn.Linear4bit)  # the stored codes, not re-quantized
        weight = module.base_layer.weight
        W = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        W = W + module.get_delta_weight("default")
        expected = original[name].weight.float()
        if isinstance(original[name], transformers.pytorch_utils.Conv1D):  # stored [in, out]
            expected = expected.T
        assert (W - expected).norm() / expected.norm() < 0.15, name
    output = model.train()(input_ids=_ids())  # every output: a bare BERT's pooler too
    sum(t.square().mean() for t in output.values() if isinstance(t, torch.Tensor)).backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


def _train_config(qpissa_dir: Path, tmp: Path) -> Path:
    records = [{"completion": f" {i % 10}", "prompt": f"{i}%10="} for i in range(8)]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {
        "model": str(qpissa_dir), "output_dir": str(tmp / "run"),
        "data": {"path": str(tmp / "train.jsonl"), "format": "prompt_completion", "max_seq_len": 16},
        "learning_rate": 1e-2, "max_steps": 2, "per_device_train_batch_size": 4, "save_steps": 2,
        "logging_steps": 1, "seed": 3,
    }  # fmt: skip
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp / "config.yaml"


def test_trains_and_the_merged_export_reproduces_it(
    converted: tuple[str, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    family, _, qpissa_dir = converted
    if family in NOT_CAUSAL:  # train, chat, compare are for causal LMs: refused in one line
        for out, argv in (
            ("run", ["train", str(_train_config(qpissa_dir, tmp_path))]),
            ("run", ["chat", str(qpissa_dir), "--prompt", "hi"]),
            ("run", ["eval", str(qpissa_dir), "--data", str(tmp_path / "train.jsonl")]),
            ("compare", ["compare", str(converted[1]), str(tmp_path / "compare"), "--methods", "qlora"]),
        ):
            error = _error(capsys, tmp_path / out, *argv)
            assert "not a causal language model" in error and "AutoModel" in error
        run = qpissa_dir  # its converted adapter is exported, and verified against the hidden states
        assert (
            cli.main(["--quiet", "export", str(run), str(tmp_path / "verified"), "--dtype", "float32"]) == 0
        )
    else:
        assert cli.main(["--quiet", "train", str(_train_config(qpissa_dir, tmp_path))]) == 0
        run = tmp_path / "run"
        initial = _plain(family, qpissa_dir, qpissa_dir / "adapter")
        trained = _plain(family, qpissa_dir, run / "adapter")
        with torch.no_grad():  # training moved the model: the match below is not vacuous
            assert (_outputs(trained.eval()) - _outputs(initial.eval())).abs().max() > 1e-3
    out = tmp_path / "merged"
    assert cli.main(["--quiet", "export", str(run), str(out), "--dtype", "float32", "--no-verify"]) == 0
    with torch.no_grad():
        expected = _outputs(_plain(family, qpissa_dir, run / "adapter").eval())
        merged = _outputs(_plain(family, out).eval())
    assert (merged - expected).abs().max() < 1e-4


def _convert(model: Path, out: Path, *extra: str) -> int:
    return cli.main(["--quiet", "convert", str(model), str(out), "--rank", "4", "--iters", "2", *extra])


def _error(capsys: pytest.CaptureFixture, out: Path, *argv: str) -> str:
    """Run `qpissa ARGV`, expecting one error line, exit status 2 and nothing written to `out`."""
    capsys.readouterr()
    status = cli.main(["--quiet", *argv])
    error = capsys.readouterr().err.strip()
    assert status == 2 and error.startswith("qpissa: error: ") and "\n" not in error, error
    assert not out.exists() and not out.with_name(out.name + ".partial").exists(), "no partial output"
    return error


def _fails(capsys: pytest.CaptureFixture, out: Path, model: Path, *extra: str) -> str:
    """`_error` of converting `model` into `out`."""
    return _error(capsys, out, "convert", str(model), str(out), "--rank", "4", "--iters", "2", *extra)


def test_conv1d_lora_export_applies_to_the_original_gpt2(tmp_path: Path, char_tokenizer: Path) -> None:
    """The rank-2r LoRA goes onto GPT-2's own Conv1D layers (fan_in_fan_out), in their [in, out] layout."""
    import warnings

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qpissa.stored import read_adapter

    model = make_family_model("gpt2", tmp_path / "model", char_tokenizer)
    assert _convert(model, tmp_path / "qpissa") == 0
    assert cli.main(["--quiet", "train", str(_train_config(tmp_path / "qpissa", tmp_path))]) == 0
    out = tmp_path / "lora"
    argv = ["--quiet", "export", str(tmp_path / "run"), str(out), "--to", "lora", "--no-verify"]
    assert cli.main(argv) == 0
    assert json.loads((out / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    original = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    W = original.transformer.h[0].attn.c_proj.weight.detach().clone()  # [in, out], square: orientation shows
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # PEFT warns when it has to fix fan_in_fan_out
        merged = PeftModel.from_pretrained(original, out).merge_and_unload()
    module = "transformer.h.0.attn.c_proj"
    trained, initial = (read_adapter(tmp_path / path / "adapter") for path in ("run", "qpissa"))
    (A1, B1), (A0, B0) = trained.factors(module), initial.factors(module)
    delta = trained.scale * (B1 @ A1 - B0 @ A0)  # [out, in]
    assert delta.norm() > 1e-3 * W.norm()  # training moved it: the check below is not vacuous
    torch.testing.assert_close(merged.transformer.h[0].attn.c_proj.weight, W + delta.T, atol=1e-5, rtol=1e-5)


def test_moe_experts_stay_16bit_and_are_said_so(
    tmp_path: Path, char_tokenizer: Path, capsys: pytest.CaptureFixture
) -> None:
    model = make_family_model("mixtral", tmp_path / "model", char_tokenizer)
    assert cli.main(["convert", str(model), str(tmp_path / "qpissa"), "--rank", "4", "--iters", "1"]) == 0
    summary = capsys.readouterr().out
    assert "kept unquantized, not adapted: 24 tensors (196,608 parameters" in summary
    assert "MoE expert" in summary
    kept = json.loads((tmp_path / "qpissa" / "qpissa_report.json").read_text())["kept_unquantized"]
    experts = next(entry for entry in kept if entry["reason"].startswith("MoE expert"))
    assert len(experts["tensors"]) == 2 * 4 * 3 and experts["params"] == 2 * 4 * 3 * 64 * 128
    assert all(".experts." in name for name in experts["tensors"])
    routers = next(entry for entry in kept if "router" in entry["reason"])
    assert routers["tensors"] == [f"model.layers.{i}.block_sparse_moe.gate.weight" for i in range(2)]
    error = _fails(capsys, tmp_path / "out", model, "--targets", "q_proj,w1")
    assert "w1" in error and "stay unquantized" in error and "MoE expert" in error


def test_tensors_no_module_holds_are_said_unused_and_copied(
    tmp_path: Path, char_tokenizer: Path, capsys: pytest.CaptureFixture
) -> None:
    """Extra tensors in a checkpoint (one under a module that lacks it, one under no module at all, an old
    1-D `rotary_emb.inv_freq` buffer) are neither matrices held outside a Linear layer nor dropped: the
    report says the model does not load them, and they reach the output unchanged."""
    from safetensors.torch import load_file, save_file

    model = make_family_model("llama", tmp_path / "model", char_tokenizer)
    weights = model / "model.safetensors"
    tensors = load_file(weights)
    generator = torch.Generator().manual_seed(0)
    extra = {
        "model.layers.0.mlp.extra_matrix": torch.randn(64, 64, generator=generator).to(torch.bfloat16),
        "model.mtp.0.proj.weight": torch.randn(64, 128, generator=generator).to(torch.bfloat16),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.rand(8, generator=generator),
    }
    save_file({**tensors, **extra}, weights, {"format": "pt"})
    assert cli.main(["convert", str(model), str(tmp_path / "qpissa"), "--rank", "4", "--iters", "1"]) == 0
    summary = capsys.readouterr().out
    assert "kept unquantized, not adapted: 3 tensors (12,296 parameters" in summary
    assert "the model does not load" in summary and "router" not in summary
    kept = json.loads((tmp_path / "qpissa" / "qpissa_report.json").read_text())["kept_unquantized"]
    assert [entry["tensors"] for entry in kept] == [sorted(extra)]
    assert "copied to the output unchanged" in kept[0]["reason"]
    output = {}
    for shard in (tmp_path / "qpissa").glob("model*.safetensors"):
        output |= load_file(shard)
    assert all(torch.equal(output[name], tensor) for name, tensor in extra.items())
    loaded = _plain("llama", tmp_path / "qpissa").state_dict()
    assert "model.layers.0.mlp.down_proj.weight" in loaded and not set(extra) & set(loaded)


def test_bare_encoder_targets_resolve_against_its_own_names(
    tmp_path: Path, char_tokenizer: Path, capsys: pytest.CaptureFixture
) -> None:
    model = make_family_model("bert", tmp_path / "model", char_tokenizer)
    assert _convert(model, tmp_path / "qpissa", "--targets", "query,key,value,dense") == 0
    config = json.loads((tmp_path / "qpissa" / "adapter" / "adapter_config.json").read_text())
    assert config["target_modules"] == ["dense", "key", "query", "value"]
    assert config["task_type"] == "FEATURE_EXTRACTION"
    error = _fails(capsys, tmp_path / "out", model, "--targets", "q_proj")
    assert "matches no Linear layer of this BertModel; its Linear layers are dense,key,query,value" in error


@pytest.mark.parametrize("family", ["gpt2", "bert", "mixtral"])  # Conv1D, an encoder, renamed tensors
def test_calibration_of_what_it_cannot_run_is_refused(
    family: str, tmp_path: Path, char_tokenizer: Path, capsys: pytest.CaptureFixture
) -> None:
    model = make_family_model(family, tmp_path / "model", char_tokenizer)
    (tmp_path / "calib.txt").write_text("some calibration text. " * 50)
    error = _fails(capsys, tmp_path / "out", model, "--calib", str(tmp_path / "calib.txt"))
    assert "--calib cannot convert this model" in error


def test_nothing_to_convert_is_one_line(
    tmp_path: Path, char_tokenizer: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    from qpissa import architecture, targets

    def without_linears(reader):  # a model with no layer bitsandbytes can hold in 4 bits
        return dataclasses.replace(architecture.read_architecture(reader), linears={}, output=None)

    monkeypatch.setattr(targets, "read_architecture", without_linears)
    model = make_family_model("llama", tmp_path / "model", char_tokenizer)
    error = _fails(capsys, tmp_path / "out", model)
    assert "nothing to convert" in error and "LlamaForCausalLM" in error


def test_widths_the_cpu_kernel_rejects_are_named_in_one_warning(
    tmp_path: Path, char_tokenizer: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = make_family_model("llama", tmp_path / "m", char_tokenizer, hidden_size=64, intermediate_size=100)
    with caplog.at_level("WARNING", logger="qpissa.targets"):
        assert _convert(model, tmp_path / "qpissa") == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "qpissa.targets"]
    assert len(warnings) == 1 and warnings[0].startswith("6 target(s) will not run"), warnings
    assert "support_avx512bf16_for_cpu" in warnings[0] and "mlp.down_proj [64, 100]" in warnings[0]


def test_report_refuses_conversions_of_different_base_models(
    tmp_path: Path, char_tokenizer: Path, capsys: pytest.CaptureFixture
) -> None:
    for family in ("gpt2", "llama"):
        model = make_family_model(family, tmp_path / family, char_tokenizer)
        assert _convert(model, tmp_path / f"{family}-qpissa") == 0
    out = tmp_path / "report"
    assert cli.main(["--quiet", "report", str(tmp_path / "gpt2-qpissa"), "--out", str(out)]) == 0
    spectrum = json.loads((out / "summary.json").read_text())["spectrum"]
    assert spectrum["layer"].endswith("c_attn") and len(spectrum["W"]) == 64  # a Conv1D, read [out, in]
    inputs = [str(tmp_path / "gpt2-qpissa"), str(tmp_path / "llama-qpissa")]
    error = _error(capsys, tmp_path / "mixed", "report", *inputs, "--out", str(tmp_path / "mixed"))
    assert "2 different models" in error


def test_tensors_renamed_at_load_keep_their_adapter(tmp_path: Path, char_tokenizer: Path) -> None:
    """A bare BERT stored with its base-model prefix (`bert.encoder...`, as a model with a head saves it):
    the adapter is keyed by the model's names, the export by the checkpoint's."""
    from safetensors.torch import load_file, save_file

    model = make_family_model("bert", tmp_path / "model", char_tokenizer)
    weights = model / "model.safetensors"
    save_file({f"bert.{name}": t for name, t in load_file(weights).items()}, weights, {"format": "pt"})
    assert _convert(model, tmp_path / "qpissa") == 0
    loaded = _plain("bert", tmp_path / "qpissa", tmp_path / "qpissa" / "adapter")
    assert sum(hasattr(module, "lora_A") for module in loaded.modules()) == 13  # 2 × 6 + the pooler
    argv = ["--quiet", "export", str(tmp_path / "qpissa"), str(tmp_path / "merged"), "--dtype", "float32"]
    assert cli.main([*argv, "--no-verify"]) == 0
    assert all(name.startswith("bert.") for name in load_file(tmp_path / "merged" / "model.safetensors"))
    with torch.no_grad():
        expected = _outputs(loaded.eval())
        assert (_outputs(_plain("bert", tmp_path / "merged").eval()) - expected).abs().max() < 1e-4


def test_architecture_transformers_does_not_ship_is_refused(
    tmp_path: Path, char_tokenizer: Path, capsys: pytest.CaptureFixture
) -> None:
    model = make_family_model("llama", tmp_path / "model", char_tokenizer)
    config = json.loads((model / "config.json").read_text())
    config.update(architectures=["MyLlamaForCausalLM"], auto_map={"AutoModelForCausalLM": "my.MyLlama"})
    (model / "config.json").write_text(json.dumps(config))
    error = _fails(capsys, tmp_path / "out", model)
    assert "no model class MyLlamaForCausalLM" in error and "custom code in auto_map" in error


def test_a_shipped_model_of_a_kind_not_converted_and_gguf_weights_are_named_as_such(
    tmp_path: Path, char_tokenizer: Path, capsys: pytest.CaptureFixture
) -> None:
    """Whisper was said to have "no model class" in transformers, which ships it; a GGUF file was advised a
    `from_pretrained(DIR)` that cannot read it."""
    import transformers

    config = transformers.WhisperConfig(
        d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128,
    )  # fmt: skip
    transformers.WhisperForConditionalGeneration(config).save_pretrained(tmp_path / "whisper")
    capsys.readouterr()
    error = _fails(capsys, tmp_path / "out", tmp_path / "whisper")
    assert (
        "WhisperForConditionalGeneration (model_type 'whisper') is not a kind of model qpissa converts"
        in error
    )
    (tmp_path / "gguf").mkdir()
    shutil.copy(tmp_path / "whisper" / "config.json", tmp_path / "gguf")
    (tmp_path / "gguf" / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    error = _fails(capsys, tmp_path / "out", tmp_path / "gguf")
    assert "has only GGUF weights (model-Q4_K_M.gguf)" in error and "gguf_file=NAME" in error
    llama = make_family_model(
        "llama", tmp_path / "llama", char_tokenizer
    )  # a kind qpissa builds, mislabelled
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "model_type": "mistral"}))
    error = _fails(capsys, tmp_path / "out", llama)
    assert "has no model class LlamaForCausalLM for model_type 'mistral'" in error


def test_chat_and_compare_stay_within_a_table_of_learned_positions(
    tmp_path: Path, char_tokenizer: Path, capsys: pytest.CaptureFixture
) -> None:
    """GPT-2's 128 learned positions: the default answer budget of 512 tokens stops at the table's end
    (generating past it was an IndexError), and a prompt as long as the table, or compare's windows
    longer than it, are one line."""
    model = make_family_model("gpt2", tmp_path / "gpt2", char_tokenizer)
    assert _convert(model, tmp_path / "qpissa") == 0
    assert cli.main(["--quiet", "chat", str(tmp_path / "qpissa"), "--prompt", "hi", "--greedy"]) == 0
    capsys.readouterr()
    long = ["--quiet", "chat", str(tmp_path / "qpissa"), "--prompt", "x" * 200, "--greedy"]
    assert cli.main(long) == 2
    error = capsys.readouterr().err.strip()
    assert "longer than the model's whole context of 128; shorten it" in error and "\n" not in error
    out = tmp_path / "compare"
    error = _error(capsys, out, "compare", str(model), str(out))  # its default --window is 256 tokens
    assert "--window 256 is longer than the model's context (128 tokens" in error


def test_a_multimodal_gemma3_trains_and_exports(tmp_path: Path, char_tokenizer: Path) -> None:
    """Gemma3ForConditionalGeneration keeps its sizes in a text config (no top-level hidden_size or
    vocab_size): the memory estimate and the export's check read the language model's."""
    import transformers

    text = {
        "vocab_size": 300,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 128,
    }
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
              "image_size": 28, "patch_size": 14}  # fmt: skip
    config = transformers.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
        boi_token_index=297, eoi_token_index=298,
    )  # fmt: skip
    torch.manual_seed(0)
    model = tmp_path / "gemma3"
    transformers.Gemma3ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(model)
    for path in char_tokenizer.iterdir():
        shutil.copy(path, model / path.name)
    assert _convert(model, tmp_path / "qpissa") == 0
    assert cli.main(["--quiet", "train", str(_train_config(tmp_path / "qpissa", tmp_path))]) == 0
    assert cli.main(["--quiet", "export", str(tmp_path / "run"), str(tmp_path / "merged")]) == 0
    assert json.loads((tmp_path / "merged" / "export_report.json").read_text())["verify"]["kl_mean"] < 1e-3


def test_packing_is_refused_where_the_model_lets_packed_samples_see_each_other(
    tmp_path: Path, char_tokenizer: Path, capsys: pytest.CaptureFixture
) -> None:
    """OPT builds its mask without the restarting position ids: with data.packing every sample attended to
    those before it in its row, and the losses, gradients and evaluations were wrong without a word."""
    import transformers

    config = transformers.OPTConfig(
        vocab_size=256, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=64, dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.OPTForCausalLM(config).save_pretrained(tmp_path / "model")
    for path in char_tokenizer.iterdir():
        shutil.copy(path, tmp_path / "model" / path.name)
    assert _convert(tmp_path / "model", tmp_path / "qpissa") == 0
    recipe = _train_config(tmp_path / "qpissa", tmp_path)
    error = _error(capsys, tmp_path / "run", "train", str(recipe), "data.packing=true")
    assert error == (
        "qpissa: error: data.packing: opt models let a packed sample attend to the samples before it in its "
        "row (its logits change with them), so every loss and gradient would be wrong; set data.packing=false"
    )
    assert cli.main(["--quiet", "train", str(recipe)]) == 0  # unpacked, the same run trains


def test_an_moe_router_loss_is_not_added_to_the_training_loss(tmp_path: Path, char_tokenizer: Path) -> None:
    """With `output_router_logits: true` in an MoE's config, steps from 1 on logged cross-entropy plus the
    frozen routers' load-balancing term, while step 0 and every evaluation logged cross-entropy alone."""
    model = make_family_model(
        "mixtral", tmp_path / "model", char_tokenizer, output_router_logits=True, router_aux_loss_coef=0.5
    )
    assert _convert(model, tmp_path / "qpissa") == 0
    recipe = _train_config(tmp_path / "qpissa", tmp_path)
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "12%10=", "completion": " 2"}) + "\n")
    assert cli.main(["--quiet", "train", str(recipe), "max_steps=1", "learning_rate=1e-6"]) == 0
    steps = [json.loads(line) for line in (tmp_path / "run" / "trainer_log.jsonl").read_text().splitlines()]
    losses = {entry["step"]: entry["loss"] for entry in steps if "loss" in entry}
    assert losses[1] == pytest.approx(losses[0], abs=1e-3), losses  # one batch, before any update


def test_mamba_out_proj_is_left_out_because_peft_loads_no_adapter_there(
    tmp_path: Path, char_tokenizer: Path, capsys: pytest.CaptureFixture
) -> None:
    """A converted Mamba's adapter on out_proj made train, eval, chat, export and plain PEFT fail with
    PEFT's ValueError (and qpissa's "this is a bug" line)."""
    import transformers
    from peft import PeftModel

    config = transformers.MambaConfig(
        vocab_size=256, hidden_size=64, state_size=8, num_hidden_layers=2, time_step_rank=16
    )
    torch.manual_seed(0)
    transformers.MambaForCausalLM(config).save_pretrained(tmp_path / "model")
    error = _fails(capsys, tmp_path / "named", tmp_path / "model", "--targets", "in_proj,out_proj")
    assert "PEFT loads no LoRA adapter on the conv1d or out_proj layers of a mamba model" in error, error
    assert _convert(tmp_path / "model", tmp_path / "qpissa") == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qpissa")
    model = PeftModel.from_pretrained(base, tmp_path / "qpissa" / "adapter")  # refused with out_proj
    assert not [name for name in model.targeted_module_names if name.endswith("out_proj")]
