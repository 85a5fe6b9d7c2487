"""`qpissa export --verify`: compare the exported model's logits with the trained model's on a few prompts."""

from __future__ import annotations

from pathlib import Path

import torch

from qpissa import UserError
from qpissa.artifacts import ModelSource
from qpissa.chat_template import render_chat
from qpissa.loading import auto_model_class, load_model, load_tokenizer
from qpissa.runtime import auto_device


def verify_export(source: ModelSource, export_dir: Path, details: dict) -> dict:
    """Logits of the export vs the trained model (4-bit residual + adapter) on a few prompts, in float32.

    Args:
        source: the trained model.
        export_dir: a merged checkpoint, or a LoRA adapter (then `details["base_model"]` is its base).
        details: the export's details.

    Returns:
        max/mean absolute logit difference, mean/max KL(trained ‖ export) per token, top-1 agreement;
        for a model without a head, the differences of its last hidden states (KL and top-1 None).
    """
    device = auto_device()
    trained = load_model(source, device=device, compute_dtype=torch.float32).eval()
    inputs, kind = verify_inputs(source, trained.config.get_text_config().vocab_size)
    reference = [_logits(trained, ids.to(device)) for ids in inputs]
    del trained
    if "base_model" not in details:  # merged
        exported = auto_model_class(export_dir).from_pretrained(
            export_dir, dtype=torch.float32, device_map={"": str(device)}
        )
    else:
        exported = load_model(
            ModelSource(Path(details["base_model"]), export_dir), device=device, compute_dtype=torch.float32
        )
    outputs = [_logits(exported.eval(), ids.to(device)) for ids in inputs]
    ref, out = torch.cat(reference), torch.cat(outputs)  # [tokens, vocab] float32
    diff = (ref - out).abs()
    result = {
        "inputs": kind, "prompts": len(inputs), "tokens": ref.shape[0],
        "max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
        "kl_mean": None, "kl_max": None, "top1_agreement": None,
    }  # fmt: skip
    if has_logits(exported):
        log_p, log_q = ref.double().log_softmax(-1), out.double().log_softmax(-1)  # float64: no negative KL
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # KL(trained ‖ export) per token
        result.update(kl_mean=kl.mean().item(), kl_max=kl.max().item())
        result["top1_agreement"] = (ref.argmax(-1) == out.argmax(-1)).float().mean().item()
    return result


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


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logits `[tokens, vocab]`, or the last hidden states `[tokens, hidden]` of a model without a head;
    an encoder-decoder's come from its decoder, fed by `decoder_inputs`."""
    output = model(input_ids=ids, **decoder_inputs(model, ids))
    return (output.logits if has_logits(model) else output.last_hidden_state)[0].float().cpu()
