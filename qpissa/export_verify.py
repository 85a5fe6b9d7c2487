"""`qpissa export --verify`: compare the exported model's logits with the trained model's on a few prompts."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from qpissa import UserError
from qpissa.artifacts import ModelSource
from qpissa.chat_template import render_chat
from qpissa.export_lora import is_untrained
from qpissa.loading import auto_model_class, load_model, load_tokenizer
from qpissa.runtime import auto_device, dtype_name

# what the export is compared with: a run's trained model, or a conversion's own (exported untrained)
TRAINED = "trained model"
CONVERTED = "converted model (its initial adapter, untrained)"
_ROWS = 16  # tokens compared at once


def verify_export(source: ModelSource, export_dir: Path, details: dict) -> dict:
    """Logits of the export, loaded as a user loads it (in its stored dtype), vs those of the model it
    was exported from (4-bit residual + adapter, computed in float32), on a few prompts.

    It holds one model at a time (the 4-bit one is freed before the export loads) and widens only the
    logits, to float32 (float64 for KL): it needs about the memory that running the export needs, where a
    float32 copy of a 16-bit export would need twice that. The differences are what a user running the
    export gets: its rounded weights, and for a 16-bit export its 16-bit arithmetic too.

    Args:
        source: the model exported (a run's trained adapter, or a conversion's own).
        export_dir: a merged checkpoint, or a LoRA adapter (then `details["base_model"]` is its base).
        details: the export's details.

    Returns:
        `reference` (what the export is compared with, in words), `export_dtype` (what it computed in),
        max/mean absolute logit difference, mean/max KL(reference ‖ export) per token, top-1 agreement;
        for a model without a head, the differences of its last hidden states (KL and top-1 None).

    Raises:
        torch.OutOfMemoryError, RuntimeError, MemoryError: a model does not fit (`memory.out_of_memory`).
    """
    device = auto_device()
    model = load_model(source, device=device, compute_dtype=torch.float32).eval()
    inputs, kind = verify_inputs(source, model.config.get_text_config().vocab_size)
    reference = torch.cat([_logits(model, ids.to(device)) for ids in inputs])
    del model
    gc.collect()  # PEFT's and transformers' modules hold reference cycles: `del` alone frees no weights
    model = _load_export(export_dir, details, device).eval()
    outputs = torch.cat([_logits(model, ids.to(device)) for ids in inputs])
    head, dtype = has_logits(model), dtype_name(model.dtype)
    del model
    gc.collect()  # the comparison's float64 rows, not the export, in memory
    return {
        "reference": CONVERTED if is_untrained(source) else TRAINED, "inputs": kind, "prompts": len(inputs),
        "export_dtype": dtype, **_compare(reference, outputs, head),
    }  # fmt: skip


def has_logits(model: torch.nn.Module) -> bool:
    """The model ends in an output layer (logits over a vocabulary), not in hidden states."""
    return model.get_output_embeddings() is not None


VERIFY_PROMPTS = (
    "Explain in two sentences why the sky is blue.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is the capital of France, and what is it famous for?",
)


def verify_inputs(source: ModelSource, vocab_size: int) -> tuple[list[torch.Tensor], str]:
    """Token ids of the verification prompts (chat-formatted if possible), else seeded random ids."""
    try:
        tokenizer = load_tokenizer(source)
    except UserError:
        generator = torch.Generator().manual_seed(0)
        return [
            torch.randint(vocab_size, (1, 32), generator=generator) for _ in VERIFY_PROMPTS
        ], "random_tokens"
    texts = list(VERIFY_PROMPTS)
    if tokenizer.chat_template:
        messages = [[{"role": "user", "content": text}] for text in texts]
        texts = [render_chat(tokenizer, m, add_generation_prompt=True) for m in messages]
    return [
        tokenizer(t, return_tensors="pt", add_special_tokens=False)["input_ids"] for t in texts
    ], "prompts"


def decoder_inputs(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """An encoder-decoder's decoder reads the prompt `ids [1, tokens]` shifted right behind its start
    token, as training with `labels=ids` feeds it: every position is compared, each seeing the encoder's
    whole prompt. Nothing for a decoder-only or encoder-only model.

    A config may lack a start token (transformers 5 then has no such attribute); T5's convention (the pad
    token) stands in, since the trained model and the export read the same ids.
    """
    config = model.config
    if not config.is_encoder_decoder:
        return {}
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        start = getattr(config, "pad_token_id", None) or 0
    return {"decoder_input_ids": torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)}


def _load_export(export_dir: Path, details: dict, device: torch.device) -> torch.nn.Module:
    """The export as plain transformers (+ PEFT) load it: in its stored dtype, as is the original model
    under a LoRA export; PEFT holds the adapter in float32 (`autocast_adapter_dtype`)."""
    if "base_model" not in details:  # merged
        return auto_model_class(export_dir).from_pretrained(
            export_dir, dtype="auto", device_map={"": str(device)}
        )
    return load_model(ModelSource(Path(details["base_model"]), export_dir), device=device)


def _compare(ref: torch.Tensor, out: torch.Tensor, head: bool) -> dict:
    """Differences of `out` from `ref` (`[tokens, vocab]` float32 logits, or hidden states without a
    `head`), `_ROWS` tokens at a time: float64 copies of all the logits of a large vocabulary would
    outweigh a small model."""
    max_diff, sum_diff, kls, agree = 0.0, 0.0, [], 0
    for r, o in zip(ref.split(_ROWS), out.split(_ROWS), strict=True):
        diff = (r - o).abs()
        max_diff, sum_diff = max(max_diff, diff.max().item()), sum_diff + diff.double().sum().item()
        if head:
            log_p, log_q = r.double().log_softmax(-1), o.double().log_softmax(-1)  # float64: no negative KL
            kls.append((log_p.exp() * (log_p - log_q)).sum(-1))  # KL(reference ‖ export) per token
            agree += (r.argmax(-1) == o.argmax(-1)).sum().item()
    result = {
        "tokens": ref.shape[0], "max_abs_diff": max_diff, "mean_abs_diff": sum_diff / ref.numel(),
        "kl_mean": None, "kl_max": None, "top1_agreement": None,
    }  # fmt: skip
    if head:
        kl = torch.cat(kls)
        result.update(kl_mean=kl.mean().item(), kl_max=kl.max().item(), top1_agreement=agree / ref.shape[0])
    return result


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits `[tokens, vocab]`, or the last hidden states `[tokens, hidden]` of a model without a language
    model head (a bare encoder, or one with a classification or QA head, whose outputs are not per token);
    an encoder-decoder's come from its decoder, fed by `decoder_inputs`."""
    head = has_logits(model)
    output = model(input_ids=ids, output_hidden_states=not head, **decoder_inputs(model, ids))
    if head:
        return output.logits[0].float().cpu()
    hidden = getattr(output, "last_hidden_state", None)
    return (output.hidden_states[-1] if hidden is None else hidden)[0].float().cpu()
