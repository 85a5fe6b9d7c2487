"""QPiSSA, LoftQ and QLoRA: one weight in, `(Q, A, B)` out (REFERENCE.md §1).

The three methods share the quantizer and the SVD and differ only in the loop below, so a comparison
between them differs only in the method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qpissa.nf4 import NF4Weight, quantize_nf4
from qpissa.settings import Method, SvdKind
from qpissa.svd import truncated_svd


@dataclass(frozen=True)
class DecomposeSettings:
    """Everything `decompose` needs besides the weight; see `ConvertSettings` for the help texts."""

    method: Method
    rank: int
    scale: float  # s = lora_alpha / r
    iters: int
    svd: SvdKind
    oversample: int
    power_iters: int
    warm_power_iters: int  # once the previous iteration's subspace is the starting point
    svd_dtype: torch.dtype
    sketch_dtype: torch.dtype  # of the randomized range finder's products
    blocksize: int
    double_quant: bool


@dataclass
class Decomposition:
    """`W ≈ deq(q) + scale · B @ A`.

    Attributes:
        q: the NF4 residual, exactly as it is written to disk.
        A: `[r, in]` float32. B: `[out, r]` float32.
    """

    q: NF4Weight
    A: torch.Tensor
    B: torch.Tensor


def decompose(W: torch.Tensor, settings: DecomposeSettings, generator: torch.Generator) -> Decomposition:
    """Split one weight into an NF4 residual and a rank-r adapter with the chosen method.

    Args:
        W: `[out, in]` in any float dtype, on the device to compute on.
        settings: method, rank, scale, iterations, SVD and quantizer settings.
        generator: CPU generator for this matrix (randomized SVD sketch, QLoRA's A).

    Returns:
        The residual codes and the adapter factors; float32 on `W`'s device.
    """
    W = W.to(settings.svd_dtype)
    if settings.method is Method.QLORA:
        return _qlora(W, settings, generator)
    if settings.method is Method.QPISSA:
        return _qpissa(W, settings, generator)
    return _loftq(W, settings, generator)


def principal_factors(svd_U: torch.Tensor, svd_S: torch.Tensor, svd_Vh: torch.Tensor, scale: float):
    """PiSSA's split of `U S Vh` into `B = U sqrt(S/s)`, `A = sqrt(S/s) Vh`, so that `s·B·A = U S Vh`."""
    root = torch.sqrt(svd_S / scale)  # [r]
    return (svd_U * root).float(), (root[:, None] * svd_Vh).float()  # B [out, r], A [r, in]


def _qpissa(W: torch.Tensor, st: DecomposeSettings, generator: torch.Generator) -> Decomposition:
    # Iterative QPiSSA (paper Appendix E): SVD first, then quantize the residual; each later SVD
    # sees W minus the dequantized residual, so the adapter also absorbs the quantization error.
    q, start = None, None
    for _ in range(st.iters):
        # W - deq(Q) lives only for its SVD: besides W, one full-size matrix is alive at a time
        B, A, start = _fit_adapter(W if q is None else q.subtracted_from(W), st, generator, start)
        q = _quantize_residual(W, A, B, st)
    return Decomposition(q=q, A=A, B=B)


def _loftq(W: torch.Tensor, st: DecomposeSettings, generator: torch.Generator) -> Decomposition:
    # LoftQ: quantize first (A = B = 0), then fit the adapter to the quantization error; repeat.
    out_features, in_features = W.shape
    A = torch.zeros(st.rank, in_features, device=W.device)
    B = torch.zeros(out_features, st.rank, device=W.device)
    start = None
    for _ in range(st.iters):
        q = _quantize_residual(W, A, B, st)
        B, A, start = _fit_adapter(q.subtracted_from(W), st, generator, start)
    return Decomposition(q=q, A=A, B=B)


def _qlora(W: torch.Tensor, st: DecomposeSettings, generator: torch.Generator) -> Decomposition:
    # QLoRA: Q = nf4(W); A as PEFT's default (Kaiming-uniform, a = sqrt(5)), B = 0.
    out_features, in_features = W.shape
    bound = 1 / math.sqrt(in_features)  # kaiming_uniform_ with a = sqrt(5) on fan_in = in
    A = (torch.rand(st.rank, in_features, generator=generator) * 2 - 1) * bound
    B = torch.zeros(out_features, st.rank)
    q = quantize_nf4(W, st.blocksize, st.double_quant)
    return Decomposition(q=q, A=A.to(W.device), B=B.to(W.device))


def _fit_adapter(
    M: torch.Tensor, st: DecomposeSettings, generator: torch.Generator, start: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rank-r principal factors `B [out, r]`, `A [r, in]` of `M`, and the subspace to warm-start from."""
    svd = truncated_svd(
        M, st.rank, st.svd, oversample=st.oversample, generator=generator, start=start,
        power_iters=st.power_iters if start is None else st.warm_power_iters, sketch_dtype=st.sketch_dtype,
    )  # fmt: skip
    B, A = principal_factors(svd.U, svd.S, svd.Vh, st.scale)
    return B, A, svd.basis


def _quantize_residual(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, st: DecomposeSettings) -> NF4Weight:
    # The residual is W - s·B·A computed from the adapter as stored (float32), not from the tail
    # singular values, so deq(Q) + s·B·A reproduces W up to the quantization error alone.
    residual = torch.addmm(W, B.to(W), A.to(W), alpha=-st.scale)  # W - s·B·A, [out, in]
    return quantize_nf4(residual, st.blocksize, st.double_quant)
