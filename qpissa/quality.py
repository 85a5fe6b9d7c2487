"""Quantization error of one decomposed matrix against the QLoRA baseline (REFERENCE.md §2)."""

from __future__ import annotations

import math
from enum import Enum

import torch


class MetricKind(str, Enum):
    FRO = "fro"  # Frobenius only: cheap
    NUC = "nuc"  # Frobenius and the paper's nuclear norm: two extra full SVDs per matrix


def matrix_errors(
    W: torch.Tensor, baseline: torch.Tensor, approximation: torch.Tensor, kind: MetricKind
) -> dict[str, float | None]:
    """Errors of `approximation` and of plain NF4 (`baseline`) with respect to `W`.

    `reduction = 1 − ‖W − approximation‖ / ‖W − baseline‖`, in percent, for each norm.

    Args:
        W: `[out, in]` original weight, float32 or float64.
        baseline: `deq(nf4(W))`, same shape.
        approximation: `deq(Q) + s·B·A`, same shape.
        kind: which norms to compute; the nuclear ones are None under `MetricKind.FRO`.

    Returns:
        `err_fro_base, err_fro, reduction_fro, err_nuc_base, err_nuc, reduction_nuc`.
    """
    base_error = W - baseline.to(W)
    method_error = W - approximation.to(W)
    errors = {"err_fro_base": _fro(base_error), "err_fro": _fro(method_error)}
    errors["reduction_fro"] = _reduction(errors["err_fro"], errors["err_fro_base"])
    if kind is MetricKind.NUC:
        errors["err_nuc_base"] = _nuclear(base_error)
        errors["err_nuc"] = _nuclear(method_error)
        errors["reduction_nuc"] = _reduction(errors["err_nuc"], errors["err_nuc_base"])
    else:
        errors.update(err_nuc_base=None, err_nuc=None, reduction_nuc=None)
    return errors


def _fro(E: torch.Tensor) -> float:
    # summed in float64 a block of rows at a time: a float64 copy of a 14336x4096 error would be 470 MB
    rows = max(1, (1 << 22) // E.shape[1])  # 32 MB of float64 per block
    return math.sqrt(sum(E[i : i + rows].double().square().sum().item() for i in range(0, E.shape[0], rows)))


def _nuclear(E: torch.Tensor) -> float:
    return torch.linalg.svdvals(E.float()).double().sum().item()


def _reduction(err: float, err_base: float) -> float:
    return 100.0 * (1.0 - err / err_base) if err_base > 0 else 0.0
