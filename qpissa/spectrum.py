"""Singular value spectra of one layer: the original W, each method's residual and its quantization error.

Read from the original checkpoint and the QPiSSA directories as stored, for `qpissa report`'s plot.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qpissa.architecture import read_architecture
from qpissa.artifacts import ADAPTER_DIR
from qpissa.checkpoint import CheckpointReader
from qpissa.stored import Residual, read_adapter


def layer_spectra(model_dir: Path, layer: str, conversions: dict[str, tuple[Path, dict]]) -> dict:
    """Singular values of `layer`'s W, each method's residual `W − s·B·A` and its error `W − deq(Q) − s·B·A`.

    Args:
        model_dir: the original checkpoint (W is read from it, in float32).
        layer: module name in the checkpoint, e.g. `model.layers.0.self_attn.q_proj`.
        conversions: label -> (QPiSSA dir, its qpissa_report.json).

    Returns:
        {"layer", "W": [σ], "methods": {label: {"method", "residual": [σ], "error": [σ]}}}, σ in descending
        order; "method" as converted (not the label, which may carry a suffix): QLoRA's residual is W.
    """
    reader = CheckpointReader(model_dir)
    architecture = read_architecture(reader)
    W = architecture.swap_layout(layer, reader.read(f"{layer}.weight").float())  # [out, in]
    module = architecture.model_names().get(layer, layer)  # the adapter's name for it
    methods = {}
    for label, (directory, report) in conversions.items():
        deq = Residual(directory).weight(layer)  # [out, in]
        A, B = read_adapter(directory / ADAPTER_DIR).factors(module)  # [r, in], [out, r]
        s = report["settings"]["alpha"] / report["settings"]["rank"]
        residual = W - s * (B @ A)  # what was quantized (REFERENCE.md §1)
        errors = {"residual": _svdvals(residual), "error": _svdvals(residual - deq)}
        methods[label] = {"method": report["settings"]["method"], **errors}
    return {"layer": layer, "W": _svdvals(W), "methods": methods}


def _svdvals(M: torch.Tensor) -> list[float]:
    return [float(v) for v in torch.linalg.svdvals(M.double())]
