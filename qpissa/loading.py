"""Load what a command points at (a `ModelSource`: QPiSSA directory, run, checkpoint, merged model).

Loading uses plain transformers + PEFT, exactly as a user without qpissa would (REFERENCE.md §4).
"""

from __future__ import annotations

import torch

from qpissa import UserError
from qpissa.artifacts import ModelSource


def load_model(
    source: ModelSource,
    *,
    trainable: bool = False,
    device: torch.device | str = "cpu",
    compute_dtype: torch.dtype | None = None,
):
    """Load the base model (4-bit residual or plain) and, if any, the adapter on top of it.

    Args:
        source: from `artifacts.resolve_source`.
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
