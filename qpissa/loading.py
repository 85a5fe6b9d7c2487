"""Find and load what a command points at: a QPiSSA directory, a run, a checkpoint, a merged model.

Loading uses plain transformers + PEFT, exactly as a user without qpissa would (REFERENCE.md §4).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from qpissa import UserError

RUN_MARKER = "qpissa_run.json"  # written by `qpissa train` into its output_dir: {"model": QPiSSA dir, ...}
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class ModelSource:
    """Where the weights of a model come from.

    Attributes:
        base_dir: a QPiSSA directory (4-bit residual) or a plain HF checkpoint (e.g. a merged export).
        adapter_dir: the PEFT adapter to apply on top, or None for a plain checkpoint.
        run_dir: the training run it belongs to, if any.
    """

    base_dir: Path
    adapter_dir: Path | None
    run_dir: Path | None = None


def resolve_source(path: Path) -> ModelSource:
    """Interpret MODEL_OR_RUN: a QPiSSA dir, a run dir (final adapter, else latest checkpoint), a
    `checkpoint-N` dir inside a run, or a plain HF checkpoint.

    Raises:
        UserError: the path does not exist or is none of these.
    """
    if not path.is_dir():
        raise UserError(
            f"{path} is not a directory; pass a QPiSSA directory, a training run or a model directory"
        )
    if (path / RUN_MARKER).is_file():
        run = json.loads((path / RUN_MARKER).read_text())
        adapter = path / "adapter" if _has_adapter(path / "adapter") else _latest_checkpoint(path)
        if adapter is None:
            raise UserError(
                f"run {path} has no adapter yet (no adapter/ and no checkpoint-N/); train it first"
            )
        return ModelSource(Path(run["model"]), adapter, run_dir=path)
    if _has_adapter(path) and (path.parent / RUN_MARKER).is_file():
        run = json.loads((path.parent / RUN_MARKER).read_text())
        return ModelSource(Path(run["model"]), path, run_dir=path.parent)
    if (path / "config.json").is_file():
        adapter = path / "adapter" if _has_adapter(path / "adapter") else None
        return ModelSource(path, adapter)
    raise UserError(f"{path} is not a QPiSSA directory, a training run or a model directory (no config.json)")


def load_model(
    source: ModelSource,
    *,
    trainable: bool = False,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype | None = None,
):
    """Load the base model (4-bit residual or plain) and, if any, the adapter on top of it.

    Args:
        source: from `resolve_source`.
        trainable: load the adapter with `is_trainable=True`.
        device: where to put the model.
        compute_dtype: dtype of activations and of the 16-bit weights; None keeps the checkpoint's
            setting (float32 is the fast choice on a CPU).

    Returns:
        A `PeftModel` (with an adapter) or a transformers model.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": compute_dtype} if compute_dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(source.base_dir, device_map={"": str(device)}, **kwargs)
    if compute_dtype is not None:
        set_compute_dtype(model, compute_dtype)
    if source.adapter_dir is None:
        return model
    return PeftModel.from_pretrained(model, source.adapter_dir, is_trainable=trainable)


def set_compute_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Make every `Linear4bit` compute in `dtype` (its stored codes are unchanged), and cast the 16-bit
    weights (embeddings, norms, lm_head), which transformers leaves in the checkpoint's dtype for a
    4-bit model even when asked for another: bf16 norms would otherwise turn the activations bf16."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = dtype
            # on CPUs with AVX512-BF16, bitsandbytes' inference kernel would compute in bf16 with bf16
            # absmax: other numbers than training's forward, and than the quantization qpissa fitted
            module.support_avx512bf16_for_cpu = False
    for param in model.parameters():  # tied weights are one Parameter: they stay tied
        if param.is_floating_point() and param.dtype != dtype and not isinstance(param, bnb.nn.Params4bit):
            param.data = param.data.to(dtype)


def load_tokenizer(source: ModelSource):
    """The tokenizer saved beside the base model (QPiSSA dirs and exports carry it)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.base_dir)
    except (OSError, ValueError) as error:
        raise UserError(
            f"{source.base_dir} has no usable tokenizer ({error}); "
            "copy the original model's tokenizer files there"
        ) from None


def _has_adapter(path: Path) -> bool:
    return all((path / name).is_file() for name in ADAPTER_FILES)


def _latest_checkpoint(run_dir: Path) -> Path | None:
    checkpoints = [
        p for p in run_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit() and _has_adapter(p)
    ]
    return max(checkpoints, key=lambda p: int(p.name.split("-")[-1]), default=None)
