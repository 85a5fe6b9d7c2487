"""Which Linear layers of a checkpoint get decomposed, found from the model's own definition."""

from __future__ import annotations

from pathlib import Path

import torch

from qpissa import UserError
from qpissa.checkpoint import QUANTIZED_KEY_MARKERS, CheckpointReader, auto_config
from qpissa.convert_settings import ALL_LINEAR


def linear_modules(model_dir: Path) -> tuple[dict[str, tuple[int, int]], str | None]:
    """Every `nn.Linear` of the architecture, built on the meta device (no weights are read).

    Returns:
        `{module name: (out_features, in_features)}` and the output layer's name (e.g. `lm_head`),
        which is never a target: it is often tied to the embeddings (peft#2018).
    """
    import transformers

    config = auto_config(model_dir)
    with torch.device("meta"):
        try:
            model = transformers.AutoModelForCausalLM.from_config(config)
        except ValueError:
            model = transformers.AutoModel.from_config(config)
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears, output_name = {}, None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            linears[name] = (module.out_features, module.in_features)
            if module is output:
                output_name = name
    return linears, output_name


def resolve_targets(spec: str, reader: CheckpointReader, rank: int) -> list[str]:
    """Module names to decompose for `--targets`, checked against the checkpoint.

    Args:
        spec: `all-linear`, or comma-separated module names or name suffixes (`q_proj,v_proj`).
        reader: the checkpoint; its weights must exist, be full precision and be larger than `rank`.
        rank: adapter rank; every target needs `rank < min(out, in)`.

    Raises:
        UserError: a target that matches nothing (listing what exists), the output layer, a quantized
            weight, or a matrix too small for the rank.
    """
    linears, output_name = linear_modules(reader.model_dir)
    candidates = {name: shape for name, shape in linears.items() if f"{name}.weight" in reader.location}
    if spec == ALL_LINEAR:
        targets = [name for name in candidates if name != output_name]
    else:
        targets = _match(spec, candidates, output_name)
    _check_full_precision(targets, reader)
    too_small = [f"{name} {candidates[name]}" for name in targets if rank >= min(candidates[name])]
    if too_small:
        smallest = min(min(candidates[name]) for name in targets)
        raise UserError(
            f"--rank {rank} is not below min(out, in) of {', '.join(too_small[:3])}"
            f"{' …' if len(too_small) > 3 else ''}; "
            f"use --rank {max(1, smallest // 4)} or exclude them with --targets"
        )
    return sorted(targets)


def module_type(name: str) -> str:
    """The module type a matrix is reported under: the last part of its name (`q_proj`, `down_proj`)."""
    return name.rsplit(".", 1)[-1]


def _match(spec: str, candidates: dict[str, tuple[int, int]], output_name: str | None) -> list[str]:
    wanted = [part.strip() for part in spec.split(",") if part.strip()]
    if not wanted:
        raise UserError("--targets is empty; use all-linear or names such as q_proj,v_proj")
    if output_name is not None and any(_matches(output_name, w) for w in wanted):
        raise UserError(
            f"--targets includes the output layer {output_name}; it is often tied to the embeddings and "
            "is kept in 16-bit: leave it out"
        )
    targets = [name for name in candidates if any(_matches(name, w) for w in wanted)]
    unmatched = [w for w in wanted if not any(_matches(name, w) for name in candidates)]
    if unmatched:
        types = sorted({module_type(name) for name in candidates if name != output_name})
        raise UserError(
            f"--targets {','.join(unmatched)} matches no Linear layer of this model; "
            f"its Linear layers are {','.join(types)} (or use all-linear)"
        )
    return targets


def _matches(name: str, wanted: str) -> bool:
    return name == wanted or name.endswith("." + wanted)


def _check_full_precision(targets: list[str], reader: CheckpointReader) -> None:
    config_quant = reader.config.get("quantization_config")
    quantized_keys = [name for name in reader.location if any(m in name for m in QUANTIZED_KEY_MARKERS)]
    int_weights = [t for t in targets if not reader.dtype_code(f"{t}.weight").startswith(("F", "BF"))]
    if config_quant or quantized_keys or int_weights:
        method = (config_quant or {}).get("quant_method", "quantized")
        raise UserError(
            f"{reader.model_dir} is already quantized ({method}); QPiSSA must decompose the full-precision "
            "weights: convert the original 16/32-bit checkpoint instead (the model it was quantized from)"
        )
