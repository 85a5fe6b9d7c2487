"""`qpissa export`: merged and rank-2r LoRA exports of a tiny QPiSSA model trained with `qpissa train`.

Tolerances: float32 exports are compared with the float32 trained model at 1e-4 absolute on logits of
magnitude ~1 (only the summation order differs); weight identities hold to 1e-5 (float32 rounding).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qpissa import cli
from qpissa.artifacts import EXPORT_REPORT, RUN_MARKER
from qpissa.checkpoint import CheckpointReader
from qpissa.export_verify import CONVERTED, TRAINED, decoder_inputs
from qpissa.loading import load_model
from qpissa.model_source import resolve_source
from qpissa.models import make_tiny_model
from qpissa.nf4 import quantize_nf4
from qpissa.stored import Residual, read_adapter

RANK = 8


def _train_config(qpissa_dir: Path, tmp: Path) -> Path:
    """A `qpissa train` recipe: 6 steps at a high rate (so B', A' move), a checkpoint at step 3."""
    records = [{"completion": f" {i % 10}", "prompt": f"{i}%10="} for i in range(16)]
    (tmp / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = {
        "model": str(qpissa_dir), "output_dir": str(tmp / "run"),
        "data": {"path": str(tmp / "train.jsonl"), "format": "prompt_completion", "max_seq_len": 32},
        "learning_rate": 1e-2, "max_steps": 6, "per_device_train_batch_size": 4, "save_steps": 3,
        "save_total_limit": 2, "logging_steps": 3, "seed": 3,
    }  # fmt: skip
    (tmp / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp / "config.yaml"


@pytest.fixture(scope="module")
def qpissa_dir(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("export") / "qpissa"
    argv = ["--quiet", "convert", str(tiny_chat_model), str(out), "--rank", str(RANK), "--iters", "1"]
    assert cli.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def trained_run(qpissa_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("export_run")
    assert cli.main(["--quiet", "train", str(_train_config(qpissa_dir, tmp))]) == 0
    assert (tmp / "run" / "checkpoint-3").is_dir()
    return tmp / "run"


def _ids() -> torch.Tensor:
    return torch.randint(256, (2, 24), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model: torch.nn.Module) -> torch.Tensor:
    return model.eval()(input_ids=_ids()).logits.float()


def _plain(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _adapters(qpissa_dir: Path, run: Path, out: Path) -> tuple:
    return tuple(read_adapter(path) for path in (qpissa_dir / "adapter", run / "adapter", out))


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> float:
    log_p, log_q = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()


def test_merged_export_is_the_trained_model(
    trained_run: Path, qpissa_dir: Path, tiny_chat_model: Path, tmp_path: Path
):
    out = tmp_path / "merged"
    assert cli.main(["--quiet", "export", str(trained_run), str(out), "--dtype", "float32"]) == 0
    trained = _logits(load_model(resolve_source(trained_run), compute_dtype=torch.float32))
    untrained = _logits(load_model(resolve_source(qpissa_dir), compute_dtype=torch.float32))
    assert (
        trained - untrained
    ).abs().max() > 1e-2  # training moved the model: the match below is not vacuous
    assert (_logits(_plain(out)) - trained).abs().max() < 1e-4

    report = json.loads((out / "export_report.json").read_text())
    assert report["verify"]["inputs"] == "prompts" and report["verify"]["max_abs_diff"] < 1e-4
    assert report["verify"]["reference"] == TRAINED
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert config["tie_word_embeddings"] is True
    tensors = load_file(out / "model.safetensors")
    assert "lm_head.weight" not in tensors and not any(".absmax" in name for name in tensors)
    original = CheckpointReader(tiny_chat_model)
    assert torch.equal(
        tensors["model.embed_tokens.weight"], original.read("model.embed_tokens.weight").float()
    )
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template
    assert (out / "generation_config.json").is_file() and not (out / "qpissa_report.json").exists()


def test_merged_export_default_dtype_keeps_the_model_dtype(trained_run: Path, tmp_path: Path):
    out = tmp_path / "merged"
    assert cli.main(["--quiet", "export", str(trained_run), str(out)]) == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}  # noqa: SIM118
    verify = json.loads((out / "export_report.json").read_text())["verify"]
    # loaded as stored: bf16 weights and arithmetic against the trained model's float32
    assert verify["export_dtype"] == "bfloat16"
    assert 0 < verify["max_abs_diff"] < 0.1 and verify["kl_mean"] < 1e-3


def test_a_float32_model_whose_config_names_no_dtype_is_merged_in_float32(
    tiny_chat_model: Path, tmp_path: Path
) -> None:
    """Without a dtype in config.json the merged export was bf16 whatever the checkpoint stored."""
    from transformers import AutoModelForCausalLM

    model = tmp_path / "model"
    AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32).save_pretrained(model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "dtype"}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_chat_model / name, model / name)
    assert (
        cli.main(["--quiet", "convert", str(model), str(tmp_path / "q"), "--rank", "4", "--iters", "1"]) == 0
    )
    assert cli.main(["--quiet", "export", str(tmp_path / "q"), str(tmp_path / "merged"), "--no-verify"]) == 0
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"F32"}  # noqa: SIM118


def test_checkpoint_dir_exports_that_checkpoint(trained_run: Path, qpissa_dir: Path, tmp_path: Path):
    out = tmp_path / "merged"
    checkpoint = trained_run / "checkpoint-3"
    assert (
        cli.main(["--quiet", "export", str(checkpoint), str(out), "--dtype", "float32", "--no-verify"]) == 0
    )
    assert json.loads((out / "export_report.json").read_text())["verify"] is None
    module = "model.layers.1.mlp.down_proj"
    adapter = read_adapter(checkpoint)
    A, B = adapter.factors(module)
    expected = Residual(qpissa_dir).weight(module) + adapter.scale * (B @ A)
    torch.testing.assert_close(load_file(out / "model.safetensors")[f"{module}.weight"], expected)
    A_final, _ = read_adapter(trained_run / "adapter").factors(module)
    assert not torch.allclose(A, A_final)  # the checkpoint is not the final adapter


def test_lora_export_differs_by_the_residual_nf4_error(
    trained_run: Path, qpissa_dir: Path, tiny_chat_model: Path, tmp_path: Path
):
    out = tmp_path / "lora"
    assert cli.main(["--quiet", "export", str(trained_run), str(out), "--to", "lora"]) == 0
    initial, trained, exported = _adapters(qpissa_dir, trained_run, out)
    assert exported.rank == 2 * initial.rank and exported.scale == pytest.approx(initial.scale)
    assert exported.config["lora_alpha"] == pytest.approx(2 * initial.config["lora_alpha"])
    assert exported.config["base_model_name_or_path"] == str(tiny_chat_model.resolve())

    # On W the export is W_res + s·B'A', the trained model deq(Q) + s·B'A': they differ by W_res − deq(Q).
    residual, original, s = Residual(qpissa_dir), CheckpointReader(tiny_chat_model), initial.scale
    merged_4bit = {}
    for module in trained.shapes:
        W, deq = original.read(f"{module}.weight").float(), residual.weight(module)
        (A0, B0), (A1, B1), (A2, B2) = (adapter.factors(module) for adapter in (initial, trained, exported))
        gap = (W + s * B2 @ A2) - (deq + s * B1 @ A1)
        torch.testing.assert_close(gap, W - s * B0 @ A0 - deq, atol=1e-5, rtol=0)
        merged_4bit[module] = quantize_nf4(deq + s * B1 @ A1, 64, True).dequantize()  # QLoRA-style merge

    trained_logits = _logits(load_model(resolve_source(trained_run), compute_dtype=torch.float32))
    from peft import PeftModel

    lora_logits = _logits(PeftModel.from_pretrained(_plain(tiny_chat_model), out))
    # eval and chat take the export as MODEL_OR_RUN: the original model it names, with the adapter
    source = resolve_source(out)
    assert (source.base_dir, source.adapter_dir) == (tiny_chat_model.resolve(), out)
    torch.testing.assert_close(_logits(load_model(source, compute_dtype=torch.float32)), lora_logits)
    requantized = _plain(tiny_chat_model)
    for module, weight in merged_4bit.items():
        requantized.get_submodule(module).weight.data = weight
    lora_kl, requantized_kl = _kl(trained_logits, lora_logits), _kl(trained_logits, _logits(requantized))
    assert 0 < lora_kl < requantized_kl
    assert (lora_logits - trained_logits).abs().mean() < (_logits(requantized) - trained_logits).abs().mean()

    report = json.loads((out / "export_report.json").read_text())
    nf4 = report["details"]["residual_nf4_error"]["relative_fro"]
    assert report["details"]["distance"]["relative_fro"] == pytest.approx(nf4, rel=1e-3)
    readme = (out / "README.md").read_text()
    assert f"r = {RANK} -> 2r = {2 * RANK}" in readme and f"{nf4:.3%}" in readme
    assert f"adapter of rank {2 * RANK} for the original model `{tiny_chat_model.resolve()}`" in readme
    assert f'PeftModel.from_pretrained(base, "{out.resolve()}")' in readme  # where it is, not a placeholder


def test_lora_rank_truncation_is_the_best_rank_k(trained_run: Path, qpissa_dir: Path, tmp_path: Path, capsys):
    out = tmp_path / "lora"
    k = 5
    argv = ["--quiet", "export", str(trained_run), str(out), "--to", "lora", "--rank", str(k), "--no-verify"]
    assert cli.main(argv) == 0
    initial, trained, exported = _adapters(qpissa_dir, trained_run, out)
    assert exported.rank == k and exported.scale == pytest.approx(initial.scale)
    s, dropped, total = initial.scale, 0.0, 0.0
    for module in trained.shapes:
        (A0, B0), (A1, B1), (A2, B2) = (adapter.factors(module) for adapter in (initial, trained, exported))
        delta = s * (B1 @ A1 - B0 @ A0)  # exact ΔW, dense
        tail = torch.linalg.svdvals(delta.double())[k:].square().sum().item()  # Eckart–Young optimum
        error = (delta - s * B2 @ A2).double().square().sum().item()
        assert error == pytest.approx(tail, rel=1e-3, abs=1e-10)
        dropped, total = dropped + tail, total + delta.double().square().sum().item()
    assert f"adapter of rank {k} for the original model" in (out / "README.md").read_text()
    truncation = json.loads((out / "export_report.json").read_text())["details"]["truncation"]
    assert truncation["abs_fro"] == pytest.approx(dropped**0.5, rel=1e-3)
    assert 0 < truncation["relative_to_delta_fro"] == pytest.approx((dropped / total) ** 0.5, rel=1e-3)
    printed = capsys.readouterr().out
    assert printed.startswith(f"rank-{k} LoRA for ")
    assert f"Why rank {k} (r = {RANK} -> 2r = {2 * RANK}, re-truncated to {k} by --rank)" in printed
    assert "Why the rank doubled" not in printed + (out / "README.md").read_text()


def test_a_run_that_changed_nothing_is_warned_about_and_drops_no_more_than_all(
    trained_run: Path, qpissa_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """A run stopped while its learning rate was 0 exported rounding noise, said to drop 181 % of ΔW."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.copy(
        qpissa_dir / "adapter" / "adapter_model.safetensors", run / "adapter" / "adapter_model.safetensors"
    )
    out = tmp_path / "lora"
    argv = ["--quiet", "export", str(run), str(out), "--to", "lora", "--rank", "5", "--no-verify"]
    with caplog.at_level("WARNING", logger="qpissa"):
        assert cli.main(argv) == 0
    assert "training changed nothing" in caplog.text
    truncation = json.loads((out / "export_report.json").read_text())["details"]["truncation"]
    assert truncation["relative_to_delta_fro"] <= 1


def test_a_merged_export_states_its_dtype_under_both_names(qpissa_dir: Path, tmp_path: Path):
    """config.json written by transformers 4 names the dtype `torch_dtype`, which tools of that time
    still read: the export's states the dtype written under that name too, not the input's."""
    legacy = tmp_path / "legacy"
    shutil.copytree(qpissa_dir, legacy)
    config = json.loads((legacy / "config.json").read_text())
    (legacy / "config.json").write_text(json.dumps({**config, "torch_dtype": "bfloat16"}))
    out = tmp_path / "merged"
    assert cli.main(["--quiet", "export", str(legacy), str(out), "--dtype", "float32", "--no-verify"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == config["torch_dtype"] == "float32"
    tensors = load_file(out / "model.safetensors")
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float32}


def test_lora_readme_loads_the_runs_own_chat_template(
    trained_run: Path, tiny_chat_model: Path, tmp_path: Path
):
    """The adapter folder keeps a run's own chat template, the base tokenizer has another: the README's
    code, run as it is, gives a tokenizer rendering prompts as the run trained."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert AutoTokenizer.from_pretrained(tiny_chat_model).chat_template != template
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    for directory in (run, run / "adapter"):  # as `qpissa train` saves a recipe's chat_template
        (directory / "chat_template.jinja").write_text(template)
    readmes = {}
    for name, source in (("own", run), ("base", trained_run)):
        out = tmp_path / name
        assert cli.main(["--quiet", "export", str(source), str(out), "--to", "lora", "--no-verify"]) == 0
        readmes[name] = (out / "README.md").read_text()
    namespace: dict = {}
    exec(readmes["own"].split("```python\n")[1].split("```")[0], namespace)
    assert isinstance(namespace["model"], PeftModel) and namespace["tokenizer"].chat_template == template
    assert "chat_template.jinja" in readmes["own"] and "chat_template" not in readmes["base"]


def test_a_merged_export_holds_the_runs_template_where_the_base_tokenizer_config_held_its_own(
    trained_run: Path, qpissa_dir: Path, tmp_path: Path
):
    """A base template kept inside tokenizer_config.json stayed there beside the run's chat_template.jinja:
    tools that read only that file rendered prompts as the run never trained."""
    from transformers import AutoTokenizer

    conversion, run, out = tmp_path / "qpissa", tmp_path / "run", tmp_path / "merged"
    shutil.copytree(qpissa_dir, conversion)
    tokenizer_config = json.loads((conversion / "tokenizer_config.json").read_text())
    base = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    (conversion / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chat_template": base}))
    shutil.copytree(trained_run, run)
    marker = json.loads((run / "qpissa_run.json").read_text())
    (run / "qpissa_run.json").write_text(
        json.dumps({**marker, "model": str(conversion), "model_from_run": None})
    )
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    for directory in (run, run / "adapter"):  # as `qpissa train` saves a recipe's chat_template
        (directory / "chat_template.jinja").write_text(template)
    assert cli.main(["--quiet", "export", str(run), str(out), "--no-verify"]) == 0
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template
    assert AutoTokenizer.from_pretrained(out).chat_template == template


def test_a_merged_export_converts_again_without_its_export_record(qpissa_dir: Path, tmp_path: Path):
    """export_report.json describes the export, not a conversion of it: a copy would make a later
    `export --overwrite` into that conversion take it for an earlier export and replace it."""
    merged, converted = tmp_path / "merged", tmp_path / "again"
    assert cli.main(["--quiet", "export", str(qpissa_dir), str(merged), "--no-verify"]) == 0
    assert cli.main(["--quiet", "convert", str(merged), str(converted), "--rank", "4", "--iters", "1"]) == 0
    assert (merged / "export_report.json").is_file() and not (converted / "export_report.json").exists()
    assert cli.main(["--quiet", "export", str(qpissa_dir), str(converted), "--overwrite", "--no-verify"]) == 2


def test_untrained_export_reproduces_the_original(qpissa_dir: Path, tiny_chat_model: Path, tmp_path: Path):
    out = tmp_path / "merged"
    assert cli.main(["--quiet", "export", str(qpissa_dir), str(out), "--dtype", "float32"]) == 0
    verify = json.loads((out / EXPORT_REPORT).read_text())["verify"]
    assert verify["reference"] == CONVERTED  # nothing was trained: it is checked against the conversion
    exported, original = load_file(out / "model.safetensors"), CheckpointReader(tiny_chat_model)
    layers = json.loads((qpissa_dir / "qpissa_report.json").read_text())["layers"]
    for layer in layers:  # the weight error is exactly the quantization error the conversion reported
        name = f"{layer['name']}.weight"
        error = (exported[name] - original.read(name).float()).norm()
        assert error.item() == pytest.approx(layer["err_fro"], rel=1e-4) and error < layer["err_fro_base"]
    assert set(exported) == set(original.names())
    original_logits = _logits(_plain(tiny_chat_model))
    plain_nf4 = _plain(tiny_chat_model)  # QLoRA: the original quantized as it is
    for layer in layers:
        weight = plain_nf4.get_submodule(layer["name"]).weight
        weight.data = quantize_nf4(weight.data, 64, True).dequantize()
    assert 0 < _kl(original_logits, _logits(_plain(out))) < _kl(original_logits, _logits(plain_nf4))


def _tiny_t5(out_dir: Path, tokenizer_dir: Path, **tokens: int) -> Path:
    """A 2+2-layer, 64-wide random T5 (bf16) with the character tokenizer beside it; `tokens` replace its
    special token ids (pad 0, eos 2, decoder start 0)."""
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        **{"pad_token_id": 0, "eos_token_id": 2, "decoder_start_token_id": 0, **tokens},
    )  # fmt: skip
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).to(torch.bfloat16).save_pretrained(out_dir)
    for path in tokenizer_dir.iterdir():
        shutil.copy(path, out_dir / path.name)
    return out_dir


def test_encoder_decoder_exports_are_verified(tmp_path: Path, char_tokenizer: Path, moved_run):
    """A T5's decoder needs inputs of its own: verification feeds it the prompt, shifted right, in both
    exports. qpissa trains causal LMs only, so the run is the converted adapter with B moved by hand."""
    model, qpissa_dir = _tiny_t5(tmp_path / "t5", char_tokenizer), tmp_path / "qpissa"
    assert cli.main(["--quiet", "convert", str(model), str(qpissa_dir), "--rank", "4", "--iters", "1"]) == 0
    run = moved_run(qpissa_dir, tmp_path / "run")
    reports = {}
    for kind in ("merged", "lora"):
        argv = ["--quiet", "export", str(run), str(tmp_path / kind), "--to", kind, "--dtype", "float32"]
        assert cli.main(argv) == 0
        reports[kind] = json.loads((tmp_path / kind / "export_report.json").read_text())["verify"]
        assert reports[kind]["inputs"] == "prompts" and reports[kind]["tokens"] > 3 * 20
    assert reports["merged"]["max_abs_diff"] < 1e-4 and reports["merged"]["top1_agreement"] == 1.0
    assert reports["lora"]["kl_mean"] > 100 * reports["merged"]["kl_mean"]  # W_res's NF4 error shows


def test_encoder_decoder_without_a_start_token_is_verified_from_its_pad_token(
    tmp_path: Path, char_tokenizer: Path
):
    """A T5 config may lack `decoder_start_token_id` (T5's convention: the decoder starts at the pad
    token); the export is still verified, its decoder fed the prompt behind the pad token."""
    from transformers import AutoModelForSeq2SeqLM

    model, qpissa_dir = _tiny_t5(tmp_path / "t5", char_tokenizer, pad_token_id=1), tmp_path / "qpissa"
    config = json.loads((model / "config.json").read_text())
    config.pop("decoder_start_token_id", None)
    (model / "config.json").write_text(json.dumps(config))
    assert cli.main(["--quiet", "convert", str(model), str(qpissa_dir), "--rank", "4", "--iters", "1"]) == 0
    out = tmp_path / "merged"
    assert cli.main(["--quiet", "export", str(qpissa_dir), str(out), "--dtype", "float32"]) == 0
    verify = json.loads((out / "export_report.json").read_text())["verify"]
    assert verify["inputs"] == "prompts" and verify["tokens"] > 3 * 20
    assert verify["max_abs_diff"] < 1e-4 and verify["top1_agreement"] == 1.0
    ids = torch.tensor([[5, 6, 7]])
    decoder = decoder_inputs(AutoModelForSeq2SeqLM.from_pretrained(out), ids)["decoder_input_ids"]
    assert decoder.tolist() == [[1, 5, 6]]


def _wrong_shapes(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bad_run"
    shutil.copytree(run, copy)
    path = copy / "adapter" / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[key] = torch.zeros(tensors[key].shape[0] + 8, tensors[key].shape[1])
    save_file(tensors, path)
    return copy


def _report_names_missing_model(run: Path, qpissa_dir: Path, tmp_path: Path) -> Path:
    moved = tmp_path / "qpissa_copy"
    shutil.copytree(qpissa_dir, moved)
    report = json.loads((moved / "qpissa_report.json").read_text())
    report["fingerprint"]["model"] = str(tmp_path / "deleted_original")
    (moved / "qpissa_report.json").write_text(json.dumps(report))
    copy = tmp_path / "run_copy"
    shutil.copytree(run, copy)
    (copy / RUN_MARKER).write_text(json.dumps({"model": str(moved)}))
    return copy


def _wrong_base(case: str, run: Path, qpissa_dir: Path, tmp_path: Path) -> Path:
    """What `--base` names by mistake in `case`: a qpissa output, a file, a directory of no model."""
    if case == "base_is_merged_export":
        assert cli.main(["--quiet", "export", str(run), str(tmp_path / "merged"), "--no-verify"]) == 0
        return tmp_path / "merged"
    if case == "base_is_file":
        (tmp_path / "recipe.yaml").write_text("model: x\n")
        return tmp_path / "recipe.yaml"
    if case == "base_without_config":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    return {"base_is_qpissa_dir": qpissa_dir, "base_is_run": run, "base_is_checkpoint": run / "checkpoint-3"}[
        case
    ]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no_adapter", "has no adapter"),
        ("wrong_shapes", "does not fit"),
        ("missing_base", "is missing"),
        # a merged export of the run holds the training already: the LoRA would add it twice
        ("base_is_merged_export", "is an export made by qpissa export, not an original model; --base must"),
        ("base_is_qpissa_dir", "is a QPiSSA directory made by qpissa convert, not an original model"),
        ("base_is_run", "is a training run, not an original model"),
        ("base_is_checkpoint", "is a part of the training run"),
        ("base_is_file", "is a file, not a model; --base must name the full-precision model"),
        ("base_without_config", "is a directory without config.json, not a model"),
        ("no_report", "has no qpissa_report.json, which names the original model"),
        ("report_names_missing_model", "deleted_original"),
        ("existing_out", "already exists; pass --overwrite to replace it"),
        ("other_out", "exists and is not an export made by qpissa export"),  # --overwrite would not do
        ("overwrite_other", "exists and is not an export made by qpissa export"),
        ("rank_with_merged", "--rank applies to --to lora only"),
        ("rank_above_2r", "above the exact rank"),
        ("wrong_base", "of its norm away from deq(Q) + s·B·A"),  # same shapes, another seed's weights
        ("shards_with_lora", "--shard-size-mb applies to --to merged only"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_no_output(
    case: str,
    expected: str,
    trained_run: Path,
    qpissa_dir: Path,
    tiny_chat_model: Path,
    tmp_path: Path,
    capsys,
):
    out = tmp_path / "out"
    run, extra = trained_run, []
    if case == "no_adapter":
        run = tiny_chat_model
    elif case == "wrong_shapes":
        run = _wrong_shapes(trained_run, tmp_path)
    elif case == "missing_base":
        extra = ["--to", "lora", "--base", str(tmp_path / "nowhere")]
    elif case.startswith("base_"):
        extra = ["--to", "lora", "--base", str(_wrong_base(case, trained_run, qpissa_dir, tmp_path))]
    elif case == "no_report":
        run, extra = tmp_path / "no_report", ["--to", "lora"]
        shutil.copytree(qpissa_dir, run)
        (run / "qpissa_report.json").unlink()
    elif case == "report_names_missing_model":
        run, extra = _report_names_missing_model(trained_run, qpissa_dir, tmp_path), ["--to", "lora"]
    elif case in ("existing_out", "other_out", "overwrite_other"):
        out.mkdir()
        # an export's report, of an export recorded before reports listed its files; or the user's file
        (out / ("keep.txt" if case != "existing_out" else EXPORT_REPORT)).write_text("{}")
        extra = ["--overwrite"] if case == "overwrite_other" else []
    elif case == "rank_with_merged":
        extra = ["--rank", "4"]
    elif case == "rank_above_2r":
        extra = ["--to", "lora", "--rank", str(2 * RANK + 1)]
    elif case == "wrong_base":
        extra = ["--to", "lora", "--base", str(make_tiny_model(tmp_path / "other_seed", seed=1))]
    elif case == "shards_with_lora":
        extra = ["--to", "lora", "--shard-size-mb", "100"]
    capsys.readouterr()
    assert cli.main(["--quiet", "export", str(run), str(out), *extra]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qpissa: error:")]
    assert len(errors) == 1 and expected in errors[0]
    assert not (tmp_path / "out.partial").exists()
    if case in ("existing_out", "other_out", "overwrite_other"):
        assert len(list(out.iterdir())) == 1
    else:
        assert not out.exists()


def test_overwrite_replaces_an_earlier_export_once_the_new_one_is_whole(trained_run: Path, tmp_path: Path):
    out = tmp_path / "out"
    assert cli.main(["--quiet", "export", str(trained_run), str(out), "--dtype", "float32"]) == 0
    first = json.loads((out / EXPORT_REPORT).read_text())
    assert first["files"] == sorted(path.name for path in out.iterdir())  # what --overwrite may delete
    argv = ["--quiet", "export", str(trained_run), str(out), "--to", "lora", "--dtype", "bfloat16"]
    assert cli.main([*argv, "--overwrite"]) == 0
    second = json.loads((out / EXPORT_REPORT).read_text())
    assert (first["dtype"], second["dtype"]) == ("float32", "bfloat16")
    assert second["files"] == sorted(path.name for path in out.iterdir())
    assert "model.safetensors" in first["files"] and not (out / "model.safetensors").exists()
    assert not (tmp_path / "out.partial").exists()


def _ambiguous_data(tmp_path: Path) -> Path:
    """Records that fit two formats: detected, they read as messages; the run trained prompt_completion."""
    records = [
        {"prompt": f"{i}%10=", "completion": f" {i % 10}",
         "messages": [{"role": "user", "content": f"{i}%10="}, {"role": "assistant", "content": f"{i % 10}"}]}
        for i in range(20, 26)
    ]  # fmt: skip
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


@pytest.mark.parametrize("kind", ["merged", "lora"])
def test_eval_of_an_export_reads_the_data_as_the_run_does(
    kind: str, trained_run: Path, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture
):
    """The export keeps its run's data.format and max_seq_len: eval of the export scores the same
    samples as eval of the run (the merged export, the same loss), and says where the settings came from."""
    data, out = _ambiguous_data(tmp_path), tmp_path / kind
    argv = ["--quiet", "export", str(trained_run), str(out), "--to", kind, "--dtype", "float32"]
    assert cli.main([*argv, "--no-verify"]) == 0
    results = {}
    for name, model in (("run", trained_run), ("export", out)):
        capsys.readouterr()
        with caplog.at_level("INFO", logger="qpissa.task_eval"):
            assert cli.main(["--quiet", "eval", str(model), "--data", str(data), "--metric", "loss"]) == 0
        results[name] = json.loads(capsys.readouterr().out)
    run, exported = results["run"], results["export"]
    assert (exported["format"], exported["max_seq_len"]) == (run["format"], run["max_seq_len"])
    assert (run["format"], run["max_seq_len"]) == ("prompt_completion", 32)  # as trained, not detected
    assert exported["tokens"] == run["tokens"]
    if kind == "merged":  # the trained model exactly, in float32
        assert exported["loss"] == pytest.approx(run["loss"], abs=1e-4)
    said = f"format prompt_completion, max_seq_len 32, the trained run's (recorded in {out / EXPORT_REPORT}"
    assert said in caplog.text


def test_export_of_a_checkpoint_that_training_deletes_is_one_line(
    trained_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    """Training still writing the run rotates its checkpoints (save_total_limit): the checkpoint export
    reads may be deleted under it. That is said in one line, with nothing written."""
    from qpissa.stored import Adapter

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "adapter")  # not finished: export takes the newest checkpoint
    newest = max(run.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))
    read = Adapter.factors

    def rotated(adapter: Adapter, module: str) -> tuple:
        shutil.rmtree(newest, ignore_errors=True)  # as the Trainer's _rotate_checkpoints does
        return read(adapter, module)

    monkeypatch.setattr(Adapter, "factors", rotated)
    out = tmp_path / "out"
    assert cli.main(["--quiet", "export", str(run), str(out), "--no-verify"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qpissa: error:")]
    assert len(errors) == 1 and f"checkpoint {newest} vanished while export read it" in errors[0]
    assert errors[0].endswith("export again, or when training ends")
    assert not out.exists() and not (tmp_path / "out.partial").exists()
