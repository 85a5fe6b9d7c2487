"""Fidelity to the original model: KL, top-1 agreement and perplexity of a converted model (REFERENCE §2).

Both models read the same token ids in windows; per token we compare the original's next-token
distribution P with the model's Q: mean KL(P ‖ Q), top-1 agreement, and the perplexity of each on the
text. Turning text into ids happens outside (`text_ids`, `synthetic_ids`), so models without a
tokenizer can be measured too. Everything is computed in float32; memory is bounded by one batch of
windows (`batch_size × window × vocab` logits per model).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qpissa import UserError
from qpissa.artifacts import ModelSource, read_text
from qpissa.loading import load_tokenizer
from qpissa.settings import FidelitySettings

log = logging.getLogger(__name__)

DEFAULT_TEXT = "heldout.txt"  # package data: qpissa/texts/heldout.txt, English prose written for this project


@dataclass
class Fidelity:
    """Fidelity of a model to the original on one token sequence.

    Attributes:
        kl: mean over predicted tokens of KL(original ‖ model), in nats.
        top1: fraction of tokens where both models' most likely next token agree.
        ppl_original: perplexity of the original model on the sequence.
        ppl_model: perplexity of the model on the sequence.
        tokens: number of predicted tokens (all windows).
        seconds: wall time of the measurement.
    """

    kl: float
    top1: float
    ppl_original: float
    ppl_model: float
    tokens: int
    seconds: float


def default_text() -> str:
    """The held-out English prose that ships with qpissa (written for this project; no download)."""
    return resources.files("qpissa").joinpath("texts", DEFAULT_TEXT).read_text(encoding="utf-8")


def text_ids(tokenizer, text: str, max_tokens: int, source: str = "") -> torch.Tensor:
    """Tokenize `text` (no special tokens) and keep at most `max_tokens` ids; `source` names it in errors.

    Returns:
        int64 `[n]`.

    Raises:
        UserError: the text yields fewer than 2 tokens.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    if len(ids) < 2:
        named = f" {source}" if source else ""
        raise UserError(f"the held-out text{named} has fewer than 2 tokens; pass a longer --text file")
    return torch.tensor(ids, dtype=torch.long)


def synthetic_ids(vocab_size: int, count: int, seed: int = 0) -> torch.Tensor:
    """A deterministic pseudo-random id sequence, for models that have no tokenizer (tiny test models).

    Returns:
        int64 `[count]` in `[0, vocab_size)`.
    """
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (count,), generator=generator)


@torch.no_grad()
def measure_fidelity(
    original, model, ids: torch.Tensor, settings: FidelitySettings, show_progress: bool = False
) -> Fidelity:
    """Compare `model` with `original` on `ids`, window by window.

    Args:
        original: the full-precision reference model (transformers causal LM, float32).
        model: the model to measure (e.g. NF4 residual + adapter, float32 compute), same vocabulary.
        ids: int64 `[n]` token ids; cut into windows of `settings.window` (the last may be shorter).
        settings: window and batch sizes.
        show_progress: a bar over the batches (only on a terminal).

    Returns:
        Mean KL, top-1 agreement and both perplexities over all predicted tokens.
    """
    started = time.perf_counter()
    original.eval()
    model.eval()
    totals = {"kl": 0.0, "agree": 0, "nll_original": 0.0, "nll_model": 0.0, "tokens": 0}
    windows = list(torch.split(ids, settings.window))
    windows = [w for w in windows if len(w) >= 2]
    starts = range(0, len(windows), settings.batch_size)
    for start in tqdm(
        starts, desc="fidelity", unit="batch", disable=None if show_progress else True, leave=False
    ):
        for length, batch in _group_by_length(windows[start : start + settings.batch_size]):
            _accumulate(totals, original, model, batch, length)
    count = totals["tokens"]
    return Fidelity(
        kl=totals["kl"] / count,
        top1=totals["agree"] / count,
        ppl_original=math.exp(totals["nll_original"] / count),
        ppl_model=math.exp(totals["nll_model"] / count),
        tokens=count,
        seconds=time.perf_counter() - started,
    )


def heldout_ids(model_dir: Path, settings: FidelitySettings, vocab_size: int) -> tuple[torch.Tensor, str]:
    """The token ids to measure on, and where they came from.

    With a tokenizer in `model_dir`: the `--text` file (or the shipped prose), tokenized. Without one
    (tiny test models): `max_tokens` deterministic synthetic ids, unless a text file was given.

    Returns:
        int64 `[n]` ids and a one-line description of their source.

    Raises:
        UserError: `--text` was given but the model has no tokenizer.
    """
    try:
        tokenizer = load_tokenizer(ModelSource(model_dir, None))
    except UserError:
        if settings.text is not None:
            raise UserError(
                f"--text needs a tokenizer, but {model_dir} has none; add its tokenizer files"
            ) from None
        return synthetic_ids(
            vocab_size, settings.max_tokens
        ), f"{settings.max_tokens} synthetic ids (no tokenizer)"
    text = read_text(settings.text, "--text", "pass a plain-text file") if settings.text else default_text()
    ids = text_ids(tokenizer, text, settings.max_tokens, str(settings.text or ""))
    return ids, f"{len(ids)} tokens of {settings.text or 'qpissa/texts/' + DEFAULT_TEXT}"


def check_heldout(model_dir: Path, settings: FidelitySettings) -> None:
    """Read and tokenize `--text` now, so that a bad file fails before hours of conversion (compare).

    Raises:
        UserError: as `heldout_ids` does.
    """
    if settings.text is None:
        return
    ids, source = heldout_ids(model_dir, settings, vocab_size=0)  # the vocabulary only sizes synthetic ids
    if len(ids) < settings.window:
        log.warning(
            "fidelity will be measured on %s, less than one --window of %d: too few predictions to tell "
            "methods apart; pass a longer --text", source, settings.window,
        )  # fmt: skip


def _accumulate(totals: dict, original, model, batch: torch.Tensor, length: int) -> None:
    """Add one batch `[b, length]` of windows: positions 0..length-2 predict tokens 1..length-1."""
    device = next(original.parameters()).device
    batch = batch.to(device)
    targets = batch[:, 1:]  # [b, length-1]
    log_p = _log_probs(original, batch)  # [b, length-1, vocab]
    log_q = _log_probs(model, batch)
    # KL(P ‖ Q) = Σ_v P (log P − log Q), per position; P is the original's distribution
    totals["kl"] += float((log_p.exp() * (log_p - log_q)).sum(dim=-1).sum())
    totals["agree"] += int((log_p.argmax(dim=-1) == log_q.argmax(dim=-1)).sum())
    totals["nll_original"] -= float(log_p.gather(-1, targets[..., None]).sum())
    totals["nll_model"] -= float(log_q.gather(-1, targets[..., None]).sum())
    totals["tokens"] += targets.numel()


def _log_probs(model, batch: torch.Tensor) -> torch.Tensor:
    """float32 log-softmax of the next-token logits at every position but the last."""
    logits = model(input_ids=batch).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1)


def _group_by_length(windows: list[torch.Tensor]) -> list[tuple[int, torch.Tensor]]:
    """Stack windows of equal length (only the text's last window is shorter), no padding needed."""
    groups: dict[int, list[torch.Tensor]] = {}
    for window in windows:
        groups.setdefault(len(window), []).append(window)
    return [(length, torch.stack(group)) for length, group in groups.items()]
