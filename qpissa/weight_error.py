"""Weight-space quantization error, the paper's metric (REFERENCE.md §2): per matrix against the QLoRA
baseline, then averaged per module type.

`reduction = 1 − ‖W − (deq(Q) + s·B·A)‖ / ‖W − deq(nf4(W))‖`, in Frobenius and (under `MetricKind.NUC`)
nuclear norm; AVG is the unweighted mean of the module types' means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qpissa.convert_settings import MetricKind


@dataclass(frozen=True)
class ErrorNorms:
    """Norms of one error matrix; `nuc` is None unless `MetricKind.NUC` was asked for."""

    fro: float
    nuc: float | None


def error_norms(E: torch.Tensor, kind: MetricKind) -> ErrorNorms:
    """Frobenius (and under `MetricKind.NUC` nuclear) norm of an error matrix `[out, in]`."""
    return ErrorNorms(fro=_fro(E), nuc=_nuclear(E) if kind is MetricKind.NUC else None)


def error_fields(base: ErrorNorms, method: ErrorNorms) -> dict[str, float | None]:
    """The report's error fields: both norms and `reduction = 1 − ‖method‖ / ‖base‖` in percent.

    Args:
        base: norms of `W − deq(nf4(W))`, the QLoRA baseline's error.
        method: norms of `W − deq(Q) − s·B·A`.
    """
    return {
        "err_fro_base": base.fro, "err_fro": method.fro, "reduction_fro": _reduction(method.fro, base.fro),
        "err_nuc_base": base.nuc, "err_nuc": method.nuc,
        "reduction_nuc": None if base.nuc is None or method.nuc is None else _reduction(method.nuc, base.nuc),
    }  # fmt: skip


def output_fields(base: float, method: float) -> dict[str, float]:
    """The output-space error fields of a calibrated matrix, from `tr(E H Eᵀ)` of each error.

    `err_out*` are root-mean-square output errors per calibration token (plain NF4's and the method's);
    `reduction_out` is in percent, like the weight-space reductions. Weight-space error may rise while
    this falls: the output is what the model feels.
    """
    base_rms, method_rms = math.sqrt(base), math.sqrt(method)
    reduction = _reduction(method_rms, base_rms)
    return {"err_out_base": base_rms, "err_out": method_rms, "reduction_out": reduction}


def by_type(layers: list[dict]) -> dict:
    """Per-type means of the reductions and their unweighted average (the paper's AVG), in both norms.

    Args:
        layers: the report's per-matrix entries (module_type, reduction_fro, reduction_nuc).

    Returns:
        by_type and avg (nuclear; None when not computed), by_type_fro and avg_fro, in percent.
    """
    by_type_fro: dict[str, list[float]] = {}
    by_type_nuc: dict[str, list[float]] = {}
    for layer in layers:
        by_type_fro.setdefault(layer["module_type"], []).append(layer["reduction_fro"])
        if layer["reduction_nuc"] is not None:
            by_type_nuc.setdefault(layer["module_type"], []).append(layer["reduction_nuc"])
    fro = {kind: mean(values) for kind, values in by_type_fro.items()}
    nuc = {kind: mean(values) for kind, values in by_type_nuc.items()} or None
    summary = {
        "by_type": nuc,
        "avg": mean(list(nuc.values())) if nuc else None,
        "by_type_fro": fro,
        "avg_fro": mean(list(fro.values())) if fro else None,
    }
    by_type_out: dict[str, list[float]] = {}
    for layer in layers:
        if layer.get("reduction_out") is not None:
            by_type_out.setdefault(layer["module_type"], []).append(layer["reduction_out"])
    if by_type_out:  # calibrated conversions only
        out = {kind: mean(values) for kind, values in by_type_out.items()}
        summary |= {"by_type_out": out, "avg_out": mean(list(out.values()))}
    return summary


def mean(values: list[float]) -> float:
    """The arithmetic mean, summed in order (the report's numbers depend on that order)."""
    return sum(values) / len(values)


def _fro(E: torch.Tensor) -> float:
    # summed in float64 a block of rows at a time: a float64 copy of a 14336x4096 error would be 470 MB
    rows = max(1, (1 << 18) // E.shape[1])  # 2 MB of float64 per block
    return math.sqrt(sum(E[i : i + rows].double().square().sum().item() for i in range(0, E.shape[0], rows)))


def _nuclear(E: torch.Tensor) -> float:
    return torch.linalg.svdvals(E.float()).double().sum().item()


def _reduction(err: float, err_base: float) -> float:
    return 100.0 * (1.0 - err / err_base) if err_base > 0 else 0.0
