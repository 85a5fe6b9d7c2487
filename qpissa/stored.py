"""Reading back what qpissa stored, and writing the PEFT adapter config it stores.

A QPiSSA directory holds the residual as bitsandbytes NF4 codes plus quant state (`Residual`
dequantizes them through `nf4.dequantize_stored`) and a plain PEFT LoRA adapter (`Adapter`), both read
one matrix at a time.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from qpissa import UserError
from qpissa.artifacts import ADAPTER_CONFIG, ADAPTER_WEIGHTS, read_json
from qpissa.checkpoint import CheckpointReader, write_json
from qpissa.nf4 import cpu_decodes_by_rows, dequantize_stored
from qpissa.safetensors_file import read_header

QUANT_STATE_SUFFIX = ".weight.quant_state.bitsandbytes__nf4"
ADAPTER_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")


@dataclass
class Adapter:
    """A PEFT LoRA adapter on disk, read one module at a time.

    Attributes:
        path: the adapter directory.
        config: its `adapter_config.json`.
        rank: r (every module has the same).
        scale: s = lora_alpha / r (rsLoRA: / sqrt(r)).
        shapes: `{module: (out, in)}` of the layers it adapts.
    """

    path: Path
    config: dict
    rank: int
    scale: float
    shapes: dict[str, tuple[int, int]]

    def factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """`A` float32 `[r, in]` and `B` float32 `[out, r]` of one module."""
        from safetensors import safe_open

        with safe_open(str(self.path / ADAPTER_WEIGHTS), framework="pt") as f:
            A, B = (f.get_tensor(adapter_key(module, factor)) for factor in ("A", "B"))
        return A.float(), B.float()


class Residual:
    """The base weights of a QPiSSA directory: NF4 (bitsandbytes codes) or 16-bit, dequantized on demand."""

    def __init__(self, model_dir: Path) -> None:
        self.reader = CheckpointReader(model_dir)
        self.quantized = {
            name.removesuffix(QUANT_STATE_SUFFIX): name
            for name in self.reader.location
            if name.endswith(QUANT_STATE_SUFFIX)
        }

    def shape(self, module: str) -> tuple[int, ...] | None:
        """`(out, in)` of a module's weight, or None if the checkpoint has no such weight."""
        if module in self.quantized:
            return tuple(self._quant_state(module)["shape"])
        name = f"{module}.weight"
        return self.reader.shape(name) if name in self.reader.location else None

    def cpu_misdecoded(self) -> list[tuple[int, int]]:
        """`(in_features, blocksize)` of the NF4 weights that bitsandbytes' CPU kernel decodes with other
        block scales than were written (`nf4.cpu_decodes_by_rows`): a directory converted on a GPU, or
        before convert refused such widths on a CPU. Empty for everything else."""
        layouts = set()
        for module in self.quantized:
            state = self._quant_state(module)
            layouts.add((state["shape"][-1], state["blocksize"]))
        return sorted((width, size) for width, size in layouts if cpu_decodes_by_rows(width, size))

    def _quant_state(self, module: str) -> dict:
        blob = self.reader.read(self.quantized[module])  # bitsandbytes' quant state as JSON bytes
        return json.loads(bytes(blob.numpy()).decode())

    def is_quant_aux(self, name: str) -> bool:
        """A tensor that belongs to a quantized weight's state (absmax, quant_map, ...), not a weight."""
        module, _, rest = name.partition(".weight.")
        return bool(rest) and module in self.quantized

    def weight(self, module: str) -> torch.Tensor:
        """The weight as float32 `[out, in]`: for NF4 layers `deq(Q)` as written, what `Linear4bit` computes
        with on a GPU (and on a CPU, but for the widths `cpu_misdecoded` lists)."""
        name = f"{module}.weight"
        if module not in self.quantized:
            return self.reader.read(name).float()
        state = {
            key.removeprefix(name + "."): self.reader.read(key)
            for key in self.reader.location
            if key.startswith(name + ".")
        }
        return dequantize_stored(self.reader.read(name), state)


def adapter_key(module: str, factor: str) -> str:
    """PEFT's tensor name of a module's factor `A` or `B` (`base_model.model.<module>.lora_A.weight`)."""
    return f"base_model.model.{module}.lora_{factor}.weight"


def read_adapter(adapter_dir: Path) -> Adapter:
    """Read a PEFT LoRA adapter's config and tensor shapes (not its values).

    Raises:
        UserError: not a plain LoRA (DoRA, per-module ranks, extra trained tensors), or a corrupt adapter.
    """
    fix = "the adapter is damaged: use another checkpoint-N, or train (or convert) again"
    config = read_json(adapter_dir / ADAPTER_CONFIG, fix, required=("r", "lora_alpha", "peft_type"))
    unsupported = [
        key for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save") if config.get(key)
    ]
    if config.get("peft_type") != "LORA" or unsupported:
        what = ", ".join(unsupported) or f"peft_type {config.get('peft_type')}"
        raise UserError(
            f"{adapter_dir} is not a plain LoRA adapter ({what}); qpissa exports plain LoRA adapters only"
        )
    rank, alpha = config["r"], config["lora_alpha"]
    if not (isinstance(rank, int) and rank >= 1 and isinstance(alpha, (int, float)) and math.isfinite(alpha)):
        raise UserError(
            f"{adapter_dir / ADAPTER_CONFIG}: r {rank!r} or lora_alpha {alpha!r} is invalid; {fix}"
        )
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    other = []
    header, _ = read_header(adapter_dir / ADAPTER_WEIGHTS, fix)  # every tensor's bytes are there
    for key, entry in sorted(header.items()):
        match = ADAPTER_KEY.match(key)
        if match is None:
            other.append(key)
            continue
        factors.setdefault(match[1], {})[match[2]] = tuple(entry["shape"])
    if other:
        raise UserError(
            f"{adapter_dir} holds tensors other than LoRA factors ({', '.join(other[:3])}); "
            "qpissa cannot export them"
        )
    shapes = {}
    for module, pair in sorted(factors.items()):
        a_shape, b_shape = pair.get("A"), pair.get("B")
        if len(a_shape or ()) != 2 or len(b_shape or ()) != 2 or a_shape[0] != rank or b_shape[1] != rank:
            raise UserError(
                f"{adapter_dir}: {module} has lora_A {a_shape} and lora_B {b_shape}, not [r={rank}, in] and "
                "[out, r]; the adapter is corrupt, export another checkpoint"
            )
        shapes[module] = (b_shape[0], a_shape[1])
    alpha = float(alpha)
    scale = alpha / rank**0.5 if config.get("use_rslora") else alpha / rank
    return Adapter(path=adapter_dir, config=config, rank=rank, scale=scale, shapes=shapes)


def write_lora_config(
    adapter_dir: Path,
    rank: int,
    alpha: float,
    target_modules: list[str],
    base_model: str,
    task_type: str | None = "CAUSAL_LM",
    fan_in_fan_out: bool = False,
) -> None:
    """Write `adapter_config.json` of a plain LoRA adapter (`init_lora_weights: true`, no dropout, no bias).

    Args:
        adapter_dir: the adapter directory.
        rank: r. alpha: lora_alpha (scale s = alpha / r).
        target_modules: module names or suffixes the adapter applies to.
        base_model: written as `base_model_name_or_path`.
        task_type: PEFT's task type (None: a plain `PeftModel`).
        fan_in_fan_out: the base layers are GPT-2 `Conv1D`s, whose weights are stored `[in, out]`.
    """
    from peft import LoraConfig

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=sorted(target_modules),
        lora_dropout=0.0,
        init_lora_weights=True,  # never "pissa": the residual is already decomposed
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
        task_type=task_type,
        base_model_name_or_path=base_model,
    ).to_dict()
    # PEFT keeps target_modules as a set; a sorted list keeps the file byte-identical across runs
    config["target_modules"] = sorted(config["target_modules"])
    write_json(adapter_dir / ADAPTER_CONFIG, config)
