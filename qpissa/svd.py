"""Rank-r truncated SVD of one matrix: exact, or randomized (Halko et al.) with a seed and a warm start."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class SvdKind(str, Enum):
    EXACT = "exact"
    RANDOMIZED = "randomized"


@dataclass
class TruncatedSvd:
    """The top `rank` singular triplets, `M ≈ U @ diag(S) @ Vh`.

    Attributes:
        U: `[m, r]`; S: `[r]`, descending; Vh: `[r, n]`.
        basis: `[n, q]` right subspace (q ≥ r) a later randomized SVD of a nearby matrix can start from.
    """

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    basis: torch.Tensor | None = None


def truncated_svd(
    M: torch.Tensor,
    rank: int,
    kind: SvdKind,
    *,
    oversample: int = 16,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    start: torch.Tensor | None = None,
) -> TruncatedSvd:
    """Top-`rank` SVD of `M` in `M`'s dtype (float32 or float64; never bf16, REFERENCE.md §1).

    Args:
        M: `[m, n]` float32/float64.
        rank: number of singular triplets to keep.
        kind: exact (LAPACK / cuSOLVER) or randomized.
        oversample: extra columns of the randomized sketch, `q = rank + oversample`.
        power_iters: subspace iterations of the randomized sketch.
        generator: CPU generator for the Gaussian sketch (randomized only).
        start: `[n, q]` subspace to start from instead of a Gaussian sketch (warm start).

    Returns:
        The truncated factors and, for randomized, the right subspace to warm-start the next call.
    """
    if kind is SvdKind.EXACT:
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        return TruncatedSvd(U[:, :rank], S[:rank], Vh[:rank])
    return _randomized_svd(M, rank, oversample, power_iters, generator, start)


def _randomized_svd(
    M: torch.Tensor,
    rank: int,
    oversample: int,
    power_iters: int,
    generator: torch.Generator | None,
    start: torch.Tensor | None,
) -> TruncatedSvd:
    m, n = M.shape
    q = min(rank + oversample, m, n)
    # drawn on the CPU generator, then moved: the sketch is the same on every device
    omega = torch.randn(n, q, generator=generator, dtype=M.dtype).to(M.device) if start is None else start
    Y = torch.linalg.qr(M @ omega).Q  # [m, q], orthonormal range estimate
    for _ in range(power_iters):
        Z = torch.linalg.qr(M.T @ Y).Q  # [n, q]
        Y = torch.linalg.qr(M @ Z).Q  # [m, q]
    Ub, S, Vh = torch.linalg.svd(Y.T @ M, full_matrices=False)  # small [q, n] problem
    U = Y @ Ub  # [m, q]
    return TruncatedSvd(U[:, :rank], S[:rank], Vh[:rank], basis=Vh.T.contiguous())
