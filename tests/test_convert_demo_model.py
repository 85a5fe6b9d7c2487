"""`qpissa convert` on the real demo model (SmolLM2-135M-Instruct): the paper's metric and fidelity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qpissa.cli import main

pytestmark = pytest.mark.integration

REFERENCE_QPISSA_R16_T1 = 9.07  # REFERENCE.md §6, exact SVD, blocksize 64, no double quant


@pytest.fixture(scope="module")
def conversions(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo-convert")
    common = ["--rank", "16", "--no-double-quant", "--quiet"]
    qpissa = root / "qpissa"
    argv = ["convert", str(demo_model), str(qpissa), "--iters", "1", "--svd", "exact", "--metrics", "nuc"]
    assert main(argv + common) == 0
    qlora = root / "qlora"
    assert main(["convert", str(demo_model), str(qlora), "--method", "qlora", *common]) == 0
    return {"qpissa": qpissa, "qlora": qlora}


def test_error_reduction_matches_the_reference(conversions: dict[str, Path]) -> None:
    report = json.loads((conversions["qpissa"] / "qpissa_report.json").read_text())
    assert len(report["layers"]) == 210, "30 layers x 7 linear types"
    assert report["summary"]["avg"] == pytest.approx(REFERENCE_QPISSA_R16_T1, abs=0.3)


def test_plain_transformers_and_peft_load_it_and_it_beats_qlora_in_kl(
    demo_model: Path, conversions: dict[str, Path]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qpissa.loading import set_compute_dtype
    from qpissa.original_kl import default_text, measure_fidelity, text_ids
    from qpissa.settings import FidelitySettings

    settings = FidelitySettings(max_tokens=1024)
    ids = text_ids(AutoTokenizer.from_pretrained(demo_model), default_text(), settings.max_tokens)
    original = AutoModelForCausalLM.from_pretrained(demo_model, dtype=torch.float32)
    kl = {}
    for method, directory in conversions.items():
        base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        set_compute_dtype(base, torch.float32)
        model = PeftModel.from_pretrained(base, directory / "adapter")
        kl[method] = measure_fidelity(original, model, ids, settings).kl
    assert 0 < kl["qpissa"] < kl["qlora"], kl
