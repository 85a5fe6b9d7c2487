"""The memory of `qpissa export`'s check (`--verify`): it holds one model at a time, the export in its
stored dtype, and running out of memory in it keeps the finished export, said unverified.

A tiny QPiSSA directory stands in for a model; its "run" is the converted adapter with B moved by hand
(the check compares whatever adapter the run holds, trained or not).
"""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import qpissa.export_verify
from qpissa import cli
from qpissa.artifacts import EXPORT_REPORT

# torch's own words when memory runs out: a GPU's OutOfMemoryError, the CPU allocator's RuntimeError
CPU_OUT_OF_MEMORY = (
    "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
    "to allocate 3538944 bytes. Error code 12 (Cannot allocate memory)"
)
OUT_OF_MEMORY = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB."),
    RuntimeError(CPU_OUT_OF_MEMORY),
]


@pytest.fixture(scope="module")
def run(qpissa_dir: Path, tmp_path_factory: pytest.TempPathFactory, moved_run) -> Path:
    """A run of `qpissa_dir` whose adapter moved away from the converted one."""
    return moved_run(qpissa_dir, tmp_path_factory.mktemp("memory") / "run")


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers (tied weights once)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@pytest.mark.parametrize("kind", ["merged", "lora"])
def test_the_check_holds_one_model_at_a_time_no_larger_than_the_export(
    kind: str, run: Path, tiny_chat_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """A float32 copy of a 16-bit export would need twice the memory that using the export needs (an 8B
    model: 32 GB): the check runs the export as it is stored, once the 4-bit model is gone."""
    models: list[weakref.ref] = []
    weights: list[list[weakref.ref]] = []  # each model's tensors: a model's wrapper may go before them
    sizes: list[int] = []
    alive: list[int] = []  # models with tensors alive at each forward pass, then at the comparison
    logits, compare = qpissa.export_verify._logits, qpissa.export_verify._compare

    def count_alive() -> int:
        return sum(any(t() is not None for t in tensors) for tensors in weights)

    def logits_spy(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
        if all(seen() is not model for seen in models):
            models.append(weakref.ref(model))
            weights.append([weakref.ref(t) for t in model.parameters()])
            sizes.append(_weight_bytes(model))
        alive.append(count_alive())
        return logits(model, ids)

    def compare_spy(*args: object) -> dict:
        alive.append(count_alive())
        return compare(*args)

    monkeypatch.setattr(qpissa.export_verify, "_logits", logits_spy)
    monkeypatch.setattr(qpissa.export_verify, "_compare", compare_spy)
    out = tmp_path / kind
    gc.disable()  # the check frees the 4-bit model itself, not at the collector's leisure
    try:
        assert cli.main(["--quiet", "export", str(run), str(out), "--to", kind]) == 0
    finally:
        gc.enable()
    verify = json.loads((out / EXPORT_REPORT).read_text())["verify"]
    assert verify["tokens"] > 3 * 20 and 0 < verify["kl_mean"] < 1  # checked, and close: not vacuous
    # the 4-bit model, then the export, never both; neither while the logits are compared
    assert len(models) == 2 and max(alive) == 1 and alive[-1] == 0
    stored = [*out.glob("*.safetensors")]
    if kind == "lora":  # the original model, stored in bf16, under the float32 adapter
        stored += [*tiny_chat_model.glob("*.safetensors")]
    assert sizes[1] <= sum(path.stat().st_size for path in stored)
    assert verify["export_dtype"] == "bfloat16"  # the model's, which a merged export keeps by default


def _raising(error: Exception):
    """A stand-in for the check's loading of the export that fails with `error`."""

    def load(*args: object) -> None:
        raise error

    return load


@pytest.mark.parametrize("error", OUT_OF_MEMORY, ids=["gpu", "cpu"])
@pytest.mark.parametrize("kind", ["merged", "lora"])
def test_running_out_of_memory_in_the_check_keeps_the_export_unverified(
    kind: str,
    error: Exception,
    run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture,
):
    """The export is whole when the check loads it: running out of memory there keeps it (exit 0, the
    same files as --no-verify), records why it is unverified, and says so in one warning line."""
    unchecked = tmp_path / "unchecked"
    assert cli.main(["--quiet", "export", str(run), str(unchecked), "--to", kind, "--no-verify"]) == 0
    monkeypatch.setattr(qpissa.export_verify, "_load_export", _raising(error))
    out = tmp_path / kind
    with caplog.at_level("WARNING"):
        assert cli.main(["--quiet", "export", str(run), str(out), "--to", kind]) == 0
    assert not (tmp_path / f"{kind}.partial").exists()
    weights = sorted(path.name for path in out.glob("*.safetensors"))
    assert weights and weights == sorted(path.name for path in unchecked.glob("*.safetensors"))
    for name in weights:
        exported, expected = load_file(out / name), load_file(unchecked / name)
        assert exported.keys() == expected.keys()
        assert all(torch.equal(exported[key], expected[key]) for key in expected)
    report = json.loads((out / EXPORT_REPORT).read_text())
    assert report["verify"] is None and report["settings"]["verify"] is True
    assert report["verify_skipped"].startswith("the check ran out of memory (")
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"{out} is exported but not verified: the check ran out of memory")
    assert "--overwrite" in warnings[0] and "--no-verify" in warnings[0]
    assert "; not verified (the check ran out of memory (" in capsys.readouterr().out


def test_another_error_in_the_check_is_still_a_bug(
    run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
):
    """Only running out of memory is forgiven: any other failure of the check keeps its traceback, and
    leaves no export behind."""
    error = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr(qpissa.export_verify, "_load_export", _raising(error))
    out = tmp_path / "merged"
    assert cli.main(["--quiet", "export", str(run), str(out)]) == 1
    assert "Traceback" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "merged.partial").exists()
