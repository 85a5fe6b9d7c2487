"""The report's rows: one role each (GPT-2's attention and MLP `c_proj` apart, BERT's four `dense`, T5's
encoder and decoder `q`, Gemma 3's vision and language `q_proj`), named briefly enough for the CLI table;
PEFT's `target_modules` still match by the last name part; reports written before still read."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from qpissa import cli
from qpissa.artifacts import REPORT_NAME
from qpissa.roles import role_labels
from qpissa.weight_error import by_type

LLAMA_ROWS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _linear_names(model_class: str, config) -> list[str]:
    """The names of a model's Linear (and Conv1D) layers but its output layer, built on the meta device."""
    import transformers
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        model = getattr(transformers, model_class)(config)
    return [  # as bitsandbytes' loading: exactly nn.Linear (not a subclass), or Conv1D
        name
        for name, module in model.named_modules()
        if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and name != "lm_head"
    ]


def _gemma3_config():
    import transformers

    text = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}  # fmt: skip
    vision = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "image_size": 28, "patch_size": 14}  # fmt: skip
    tokens = {"image_token_index": 299, "boi_token_index": 297, "eoi_token_index": 298}
    return transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, **tokens)


def _configs() -> dict[str, tuple[str, object]]:
    import transformers

    small = {"vocab_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    t5 = {"vocab_size": 256, "d_model": 64, "d_ff": 128, "num_layers": 2, "num_heads": 4, "d_kv": 16}
    return {
        "llama": ("LlamaForCausalLM", transformers.LlamaConfig(**small, hidden_size=64)),
        "gpt2": ("GPT2LMHeadModel", transformers.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4)),
        "bert": ("BertModel", transformers.BertConfig(**small, hidden_size=64)),
        "t5": ("T5ForConditionalGeneration", transformers.T5Config(**t5)),
        "gemma3": ("Gemma3ForConditionalGeneration", _gemma3_config()),
    }  # fmt: skip


EXPECTED = {
    "llama": LLAMA_ROWS,  # the demo model's rows, as ever
    "gpt2": {"c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"},
    "bert": {"query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense",
             "pooler.dense"},
    "t5": {f"{stack}.SelfAttention.{m}" for stack in ("encoder", "decoder") for m in "qkvo"}
    | {f"EncDecAttention.{m}" for m in "qkvo"} | {"encoder.wi", "encoder.wo", "decoder.wi", "decoder.wo"},
    "gemma3": {f"{tower}.{m}_proj" for tower in ("vision_tower", "language_model") for m in "qkv"}
    | {"o_proj", "gate_proj", "up_proj", "down_proj", "out_proj", "mlp.fc1", "mlp.fc2", "head.mlp.fc1",
       "head.mlp.fc2"},
}  # fmt: skip


@pytest.mark.parametrize("family", list(EXPECTED))
def test_each_row_holds_one_role_and_every_layer_of_it(family: str) -> None:
    names = _linear_names(*_configs()[family])
    labels = role_labels(names)
    assert set(labels.values()) == EXPECTED[family]
    roles: dict[str, set[str]] = {}
    for name, label in labels.items():  # a role: the name without its layer (and sub-layer) indices
        roles.setdefault(label, set()).add(re.sub(r"\.\d+(?=\.)", "", name))
    assert all(len(role) == 1 for role in roles.values()), roles
    assert len(names) > len(set(labels.values())), "layers share rows: the check is not vacuous"


def test_a_gpt2_conversion_reports_attention_and_mlp_c_proj_apart(
    tmp_path: Path, char_tokenizer: Path, capsys: pytest.CaptureFixture
) -> None:
    import transformers

    torch.manual_seed(0)
    model = tmp_path / "gpt2"
    class_name, config = _configs()["gpt2"]
    getattr(transformers, class_name)(config).to(torch.bfloat16).save_pretrained(model)
    for path in char_tokenizer.iterdir():
        shutil.copy(path, model / path.name)
    out = tmp_path / "qpissa"
    assert cli.main(["convert", str(model), str(out), "--rank", "4", "--iters", "1"]) == 0
    table = capsys.readouterr().out
    report = json.loads((out / REPORT_NAME).read_text())
    assert set(report["summary"]["by_type_fro"]) == EXPECTED["gpt2"]
    rows = {layer["module_type"]: layer["name"] for layer in report["layers"]}
    assert rows["attn.c_proj"].endswith(".attn.c_proj") and rows["mlp.c_proj"].endswith(".mlp.c_proj")
    assert re.search(r"^attn\.c_proj +\d", table, re.M) and re.search(r"^mlp\.c_proj +\d", table, re.M)
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["c_attn", "c_fc", "c_proj"]  # PEFT matches the last name part

    old = tmp_path / "old"  # as written before: rows by the last name part
    shutil.copytree(out, old)
    layers = [{**layer, "module_type": layer["name"].rsplit(".", 1)[-1]} for layer in report["layers"]]
    summary = {**report["summary"], **by_type(layers)}
    (old / REPORT_NAME).write_text(json.dumps({**report, "layers": layers, "summary": summary}))
    assert cli.main(["--quiet", "report", str(old), str(out), "--out", str(tmp_path / "report")]) == 0
    markdown = (tmp_path / "report" / "report.md").read_text()
    for row in ("c_proj", "attn.c_proj", "mlp.c_proj"):  # each report's rows, with a number
        assert re.search(rf"^\| {re.escape(row)} \|.*\d", markdown, re.M), row

    some = tmp_path / "attention-only"  # a role keeps its row whichever --targets chose
    assert (
        cli.main(["--quiet", "convert", str(model), str(some), "--rank", "4", "--targets", "attn.c_proj"])
        == 0
    )
    assert set(json.loads((some / REPORT_NAME).read_text())["summary"]["by_type_fro"]) == {"attn.c_proj"}
