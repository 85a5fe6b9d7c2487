"""Write a random Llama-3-8B-shaped checkpoint with N layers, tensor by tensor (for memory benchmarks).

Memory and speed of a conversion depend on shapes, not on weight values, so random bf16 weights
(std 0.02) stand in for the real model, which cannot be downloaded here.

    python tools/make_synthetic_checkpoint.py /tmp/llama3-8b-2l --layers 2
"""

from __future__ import annotations

import argparse
import json
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


def make_checkpoint(out_dir: Path, layers: int, seed: int = 0) -> Path:
    """Write config.json and model.safetensors of a `layers`-layer Llama-3-8B-shaped model."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {**LLAMA3_8B, "num_hidden_layers": layers}
    hidden, inter, kv = config["hidden_size"], config["intermediate_size"], 8 * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    for i in range(layers):
        prefix = f"model.layers.{i}."
        shapes.update({
            prefix + "input_layernorm.weight": (hidden,),
            prefix + "post_attention_layernorm.weight": (hidden,),
            prefix + "self_attn.q_proj.weight": (hidden, hidden),
            prefix + "self_attn.k_proj.weight": (kv, hidden),
            prefix + "self_attn.v_proj.weight": (kv, hidden),
            prefix + "self_attn.o_proj.weight": (hidden, hidden),
            prefix + "mlp.gate_proj.weight": (inter, hidden),
            prefix + "mlp.up_proj.weight": (inter, hidden),
            prefix + "mlp.down_proj.weight": (hidden, inter),
        })  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    writer = SafetensorsWriter(out_dir / "model.safetensors")
    for name, shape in shapes.items():
        if len(shape) == 1:
            writer.add(name, torch.ones(shape, dtype=torch.bfloat16))
        else:
            writer.add(name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16))
    writer.close()
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(make_checkpoint(args.out, args.layers, args.seed))


if __name__ == "__main__":
    main()
