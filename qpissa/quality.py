"""Quantization error of one decomposed matrix against the QLoRA baseline (REFERENCE.md §2)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import torch


class MetricKind(str, Enum):
    FRO = "fro"  # Frobenius only: cheap
    NUC = "nuc"  # Frobenius and the paper's nuclear norm: two extra full SVDs per matrix


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


def _fro(E: torch.Tensor) -> float:
    # summed in float64 a block of rows at a time: a float64 copy of a 14336x4096 error would be 470 MB
    rows = max(1, (1 << 18) // E.shape[1])  # 2 MB of float64 per block
    return math.sqrt(sum(E[i : i + rows].double().square().sum().item() for i in range(0, E.shape[0], rows)))


def _nuclear(E: torch.Tensor) -> float:
    return torch.linalg.svdvals(E.float()).double().sum().item()


def _reduction(err: float, err_base: float) -> float:
    return 100.0 * (1.0 - err / err_base) if err_base > 0 else 0.0
