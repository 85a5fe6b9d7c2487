"""Fidelity to the original: KL, top-1 agreement and perplexity of a converted tiny model."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from qpissa import UserError
from qpissa.artifacts import ModelSource
from qpissa.convert import convert
from qpissa.convert_settings import ConvertSettings, Method
from qpissa.loading import load_model, load_tokenizer
from qpissa.model_source import resolve_source
from qpissa.original_kl import (
    check_heldout,
    default_text,
    heldout_ids,
    measure_fidelity,
    synthetic_ids,
    text_ids,
)
from qpissa.settings import FidelitySettings


@pytest.fixture(scope="module")
def models(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """The original tiny model and its QLoRA-initialized (plain NF4) conversion, both computing in float32."""
    out = tmp_path_factory.mktemp("fidelity") / "qlora"
    convert(tiny_model, out, ConvertSettings(method=Method.QLORA, rank=4), show_progress=False)
    original = load_model(ModelSource(tiny_model, None), compute_dtype=torch.float32)
    quantized = load_model(resolve_source(out), compute_dtype=torch.float32)
    return original, quantized


def test_identical_models_agree_exactly(models) -> None:
    original, _ = models
    ids = synthetic_ids(256, 100)
    result = measure_fidelity(original, original, ids, FidelitySettings(window=32, batch_size=2))
    assert result.kl == pytest.approx(0.0, abs=1e-7)
    assert result.top1 == 1.0
    assert result.ppl_original == result.ppl_model > 1.0
    assert result.tokens == 100 - math.ceil(100 / 32)  # each window predicts all but its first token


def test_quantized_model_matches_direct_computation(models) -> None:
    original, quantized = models
    ids = synthetic_ids(256, 64, seed=3)
    result = measure_fidelity(original, quantized, ids, FidelitySettings(window=64))
    with torch.no_grad():
        log_p = torch.log_softmax(original(input_ids=ids[None]).logits[0, :-1].float(), -1)
        log_q = torch.log_softmax(quantized(input_ids=ids[None]).logits[0, :-1].float(), -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
    nll_q = -log_q.gather(-1, ids[1:, None]).mean()
    assert kl > 0  # NF4 changes the model: the comparison below is not vacuous
    assert result.kl == pytest.approx(float(kl), rel=1e-4)
    assert result.top1 == pytest.approx(float((log_p.argmax(-1) == log_q.argmax(-1)).float().mean()))
    assert result.ppl_model == pytest.approx(math.exp(float(nll_q)), rel=1e-5)


def test_batching_and_windows_do_not_change_the_result(models) -> None:
    original, quantized = models
    ids = synthetic_ids(256, 150, seed=1)  # 150 = 2 full windows of 64 + a short one of 22
    one = measure_fidelity(original, quantized, ids, FidelitySettings(window=64, batch_size=1))
    three = measure_fidelity(original, quantized, ids, FidelitySettings(window=64, batch_size=3))
    assert one.tokens == three.tokens == 150 - 3
    assert three.kl == pytest.approx(one.kl, rel=1e-5)
    assert three.top1 == one.top1
    assert three.ppl_model == pytest.approx(one.ppl_model, rel=1e-6)


def test_ids_without_tokenizer_are_synthetic_and_deterministic(tiny_model: Path, tmp_path: Path) -> None:
    first, source = heldout_ids(tiny_model, FidelitySettings(max_tokens=50), vocab_size=256)
    again, _ = heldout_ids(tiny_model, FidelitySettings(max_tokens=50), vocab_size=256)
    assert "synthetic" in source
    assert torch.equal(first, again) and first.shape == (50,) and int(first.max()) < 256
    text = tmp_path / "text.txt"
    text.write_text("some held-out prose")
    with pytest.raises(UserError, match="needs a tokenizer"):
        heldout_ids(tiny_model, FidelitySettings(text=text), vocab_size=256)


def test_default_text_is_tokenized_with_the_model_tokenizer(tiny_chat_model: Path) -> None:
    text = default_text()
    assert len(text.split()) > 1500
    ids, source = heldout_ids(tiny_chat_model, FidelitySettings(max_tokens=1000), vocab_size=256)
    assert "heldout.txt" in source and ids.shape == (1000,)
    tokenizer = load_tokenizer(ModelSource(tiny_chat_model, None))
    assert torch.equal(ids, text_ids(tokenizer, text, 1000))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"window": 1}, "--window"),
        ({"batch_size": 0}, "--batch-size"),
        ({"text": Path("/nonexistent")}, "--text"),
    ],
)
def test_bad_settings_are_user_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(UserError, match=message):
        FidelitySettings(**kwargs)


@pytest.mark.integration
def test_default_text_length_on_demo_tokenizer(demo_model: Path) -> None:
    ids, _ = heldout_ids(demo_model, FidelitySettings(), vocab_size=49152)
    assert 2000 <= len(ids) <= 3000


def test_a_text_shorter_than_one_window_is_warned_of_before_any_work(
    tiny_chat_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`--text` of one word: compare's KL and top-1 (100 % for every method) rested on one prediction."""
    short, long = tmp_path / "short.txt", tmp_path / "long.txt"
    short.write_text("hi")
    long.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    with caplog.at_level("WARNING", logger="qpissa.original_kl"):
        check_heldout(tiny_chat_model, FidelitySettings(text=long, window=32))
        assert not caplog.records
        check_heldout(tiny_chat_model, FidelitySettings(text=short, window=32))
    (record,) = caplog.records
    assert "less than one --window of 32: too few predictions" in record.getMessage()
