"""Write a random Llama-shaped checkpoint, tensor by tensor (for memory and speed benchmarks).

Memory and speed depend on shapes, not on weight values, so random bf16 weights (std 0.02) stand in
for models that cannot be downloaded here: Llama-3-8B's shape with N layers, or (`--like DIR`) the shape
of any Llama-style checkpoint, whose config and tokenizer files are copied along.

    python tools/make_synthetic_checkpoint.py /tmp/llama3-8b-2l --layers 2
    python tools/make_synthetic_checkpoint.py /tmp/smollm2-random --like demo/smollm2-135m
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from qpissa.checkpoint import SafetensorsWriter

LLAMA3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "dtype": "bfloat16",
}


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def make_checkpoint(out_dir: Path, layers: int, seed: int = 0, like: Path | None = None) -> Path:
    """Write config.json and model.safetensors of a random Llama-style model.

    Args:
        out_dir: where the checkpoint goes.
        layers: number of decoder layers (ignored with `like`, whose config says it).
        seed: seed of the random weights.
        like: a Llama-style checkpoint whose config (and tokenizer files) to copy; default Llama-3-8B.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    if like is None:
        config = {**LLAMA3_8B, "num_hidden_layers": layers}
    else:
        config = json.loads((like / "config.json").read_text())
        for name in TOKENIZER_FILES:
            if (like / name).is_file():
                shutil.copy(like / name, out_dir / name)
    generator = torch.Generator().manual_seed(seed)
    writer = SafetensorsWriter(out_dir / "model.safetensors")
    for name, shape in _shapes(config).items():
        if len(shape) == 1:
            writer.add(name, torch.ones(shape, dtype=torch.bfloat16))
        else:
            writer.add(name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16))
    writer.close()
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def _shapes(config: dict) -> dict[str, tuple[int, ...]]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        shapes.update({
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (q, hidden),
            prefix + "self_attn.k_proj.weight": (kv, hidden),
            prefix + "self_attn.v_proj.weight": (kv, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, q),
            prefix + "mlp.gate_proj.weight": (inter, hidden),
            prefix + "mlp.up_proj.weight": (inter, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inter),
        })  # fmt: skip
    return shapes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--like", type=Path, help="copy the shape, config and tokenizer of this checkpoint")
    args = parser.parse_args()
    print(make_checkpoint(args.out, args.layers, args.seed, args.like))


if __name__ == "__main__":
    main()
