"""Packing is exact: in a padding-free packed batch, each sample's loss equals its loss alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qpissa.data import IGNORE_INDEX, collate, packing_collator
from qpissa.loading import checked_source, load_model


def _rows() -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(0)
    rows = []
    for length in (7, 12, 5, 9):
        ids = torch.randint(5, 100, (length,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * 2 + ids[2:]  # a masked prompt of two tokens, as response-only data
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def _token_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of every position's next-token target, IGNORE_INDEX positions as NaN. [tokens-1]"""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits.float()[0, :-1]  # as in training
    targets = batch["labels"][0, 1:]
    losses = torch.nn.functional.cross_entropy(logits, targets.clamp(min=0), reduction="none")
    return torch.where(targets == IGNORE_INDEX, torch.nan, losses)


@pytest.fixture(scope="module")
def model(qpissa_dir: Path) -> torch.nn.Module:
    """The converted tiny model as training loads it (NF4 residual + adapter), in eval mode."""
    return load_model(checked_source(qpissa_dir), device="cpu", compute_dtype=torch.float32).eval()


@torch.no_grad()
def test_each_sample_loss_in_a_packed_batch_equals_its_loss_alone(model: torch.nn.Module) -> None:
    rows = _rows()
    packed = packing_collator()(rows)
    losses = _token_losses(model, packed)
    start = 0
    for row in rows:
        alone = _token_losses(model, collate([row], pad_token_id=0))
        inside = losses[start : start + len(row["input_ids"]) - 1]
        assert torch.allclose(inside, alone, atol=1e-5, rtol=1e-5, equal_nan=True)
        assert alone.isfinite().sum() == len(row["input_ids"]) - 2  # the check is not vacuous
        start += len(row["input_ids"])
    assert losses[start - len(rows[-1]["input_ids"]) - 1].isnan()  # no target across a boundary


@torch.no_grad()
def test_concatenating_without_position_ids_would_leak(model: torch.nn.Module) -> None:
    """The old packing (one causal row, mask all ones) lets later samples see earlier ones."""
    rows = _rows()
    packed = packing_collator()(rows)
    leaky = {"input_ids": packed["input_ids"], "labels": packed["labels"]}
    second = slice(len(rows[0]["input_ids"]), len(rows[0]["input_ids"]) + len(rows[1]["input_ids"]) - 1)
    exact, leaked = _token_losses(model, packed)[second], _token_losses(model, leaky)[second]
    assert not torch.allclose(exact, leaked, atol=1e-4, equal_nan=True)
