"""QPiSSA, LoftQ and QLoRA: one weight in, `(Q, A, B)` out (REFERENCE.md §1), data-free or calibrated.

The three methods share the quantizer and the SVD and differ only in the loops below, so a comparison
between them differs only in the method. Given calibration statistics H = X Xᵀ / n of the layer's inputs,
the same loops minimise the output error tr((W − Ŵ) H (W − Ŵ)ᵀ) instead of the weight error
(REFERENCE.md §7): the adapter is the closed-form H-weighted best fit, the codes are chosen under H.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qpissa.convert_settings import Method, SvdKind
from qpissa.nf4 import NF4Weight, quantize_nf4
from qpissa.nf4_codes import block_absmax, block_scales, compensated_codes, round_to_nearest, searched_absmax
from qpissa.svd import truncated_svd, weighted_svd


@dataclass(frozen=True)
class CalibratedFit:
    """How calibration statistics H shape a decomposition; see `ConvertSettings` for the help texts.

    Attributes:
        adapter_damping: λ of the adapter's `damped(H, λ)`; λ → ∞ is the data-free fit.
        scale_search: each NF4 block's scale searched for the least H-weighted rounding error.
        compensate: a last rounding pass with error compensation (GPTQ) before the final adapter fit.
        codes_damping: λ of the compensation's `damped(H, λ)`.
        fit_products_dtype: dtype of the adapter fits' products with H; None: the weight's. bf16 (where
            H's own products are bf16) halved their time for the same held-out KL.
    """

    adapter_damping: float
    scale_search: bool
    compensate: bool
    codes_damping: float
    fit_products_dtype: torch.dtype | None = None


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
    calibrated: CalibratedFit | None = None  # used for matrices that come with calibration statistics


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


def decompose(
    W: torch.Tensor,
    settings: DecomposeSettings,
    generator: torch.Generator,
    hessian: torch.Tensor | None = None,
) -> Decomposition:
    """Split one weight into an NF4 residual and a rank-r adapter with the chosen method.

    Args:
        W: `[out, in]` in any float dtype, on the device to compute on.
        settings: method, rank, scale, iterations, SVD and quantizer settings.
        generator: CPU generator for this matrix (randomized SVD sketch, QLoRA's A).
        hessian: `[in, in]` float32 mean of x xᵀ over calibration inputs (undamped); with
            `settings.calibrated` it turns the decomposition into the calibrated one.

    Returns:
        The residual codes and the adapter factors; float32 on `W`'s device.
    """
    W = W.to(settings.svd_dtype)
    if hessian is not None and settings.calibrated is not None:
        return _calibrated(W, hessian, settings, generator)
    if settings.method is Method.QLORA:
        return _qlora(W, settings, generator)
    if settings.method is Method.QPISSA:
        return _qpissa(W, settings, generator)
    return _loftq(W, settings, generator)


def principal_factors(svd_U: torch.Tensor, svd_S: torch.Tensor, svd_Vh: torch.Tensor, scale: float):
    """PiSSA's split of `U S Vh` into `B = U sqrt(S/s)`, `A = sqrt(S/s) Vh`, so that `s·B·A = U S Vh`."""
    root = torch.sqrt(svd_S / scale)  # [r]
    return (svd_U * root).float(), (root[:, None] * svd_Vh).float()  # B [out, r], A [r, in]


def damped(H: torch.Tensor, damping: float) -> torch.Tensor:
    """`H + λ·mean(diag H)·I`: a larger λ weighs every input direction more alike (λ → ∞: data-free)."""
    damped_H = H.clone()
    damped_H.diagonal().add_(damping * H.diagonal().mean().clamp(min=1e-12))
    return damped_H


def output_error(E: torch.Tensor, H: torch.Tensor, product_dtype: torch.dtype | None = None) -> float:
    """`tr(E H Eᵀ)` of an error `E [out, in]`: the mean squared output error per calibration token.

    `product_dtype` (default E's) is the dtype of `E H`: bf16 on AMX is 4x faster than float32 for a
    report metric, and within 1e-4 of it (each term's rounding is random and the trace sums millions).
    """
    dtype = product_dtype or E.dtype
    trace = float(((E.to(dtype) @ H.to(dtype)).to(E.dtype) * E).sum(dtype=torch.float64))
    return max(trace, 0.0)  # a PSD form: below 0 only by rounding, where E lies in H's null space


def weighted_factors(
    M: torch.Tensor,
    H: torch.Tensor,
    st: DecomposeSettings,
    generator: torch.Generator,
    start: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The rank-r `B [out, r]`, `A [r, in]` minimising `tr((M − s·B·A) H (M − s·B·A)ᵀ)`, H damped (in the
    dtype of the products with it).

    The minimiser is the truncated SVD of M in the H-weighted norm (QERA, EoRA, CLoQ): `U S G` with
    H-orthonormal rows of G (`weighted_svd`). Each component `σ u g` is split so that its column of B
    and its row of A have equal norms, as PiSSA's √σ split does when H = I.

    Returns:
        B, A (float32) and the subspace to warm-start the next fit.
    """
    svd = weighted_svd(M, H, st.rank, st.svd, **_sketch_options(st, generator, start))
    norms = svd.Vh.norm(dim=1).clamp(min=1e-30)  # [r]
    B = svd.U * torch.sqrt(svd.S * norms / st.scale)  # [out, r]
    A = svd.Vh * torch.sqrt(svd.S / (norms * st.scale))[:, None]  # [r, in]
    return B.float(), A.float(), svd.basis


def _calibrated(W: torch.Tensor, H: torch.Tensor, st: DecomposeSettings, generator: torch.Generator):
    """The method's loop under H: H-weighted adapter fits, codes chosen under H; then, if asked, one
    error-compensated rounding, and always a last adapter fit to the final codes (REFERENCE.md §7).

    Error compensation inside the loop made the held-out KL worse on the demo model (the adapter then
    fits the compensated errors, which spread over every direction); once at the end it helps.
    """
    cal = st.calibrated
    # float32 is enough: the damping bounds the condition number by ~in / λ; bf16 products only tilt the
    # subspace the factors are projected on (weighted_svd), so H is rounded once here where they are bf16
    H_adapter = damped(H, cal.adapter_damping).to(cal.fit_products_dtype or W.dtype)
    by_column = W.shape[1] % st.blocksize == 0  # blocks are runs of one row's columns

    def codes(T: torch.Tensor, final: bool, compensate: bool = False) -> NF4Weight:
        if not by_column:  # a block spans two rows: bitsandbytes' own rounding
            return quantize_nf4(T, st.blocksize, st.double_quant)
        # scales searched for the written codes only: searching in every iteration cost half of the fit's
        # time for 3 % lower held-out KL on the demo model (0.0288 vs 0.0297)
        absmax = searched_absmax(T, H.diagonal(), st.blocksize) if cal.scale_search and final else None
        scales = block_scales(block_absmax(T, st.blocksize) if absmax is None else absmax, st.double_quant)
        if compensate:
            return compensated_codes(T, damped(H, cal.codes_damping), scales, st.blocksize)
        return round_to_nearest(T, scales, st.blocksize)

    def residual(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return torch.addmm(W, B.to(W), A.to(W), alpha=-st.scale)  # W − s·B·A

    if st.method is Method.QLORA:  # calibrated codes under PEFT's default LoRA init
        A, B = _peft_default_init(W, st, generator)
        return Decomposition(q=codes(W, final=True, compensate=cal.compensate), A=A, B=B)
    q, start = None, None
    A = torch.zeros(st.rank, W.shape[1], device=W.device)
    B = torch.zeros(W.shape[0], st.rank, device=W.device)
    for iteration in range(st.iters):
        final = iteration == st.iters - 1 and not cal.compensate
        if st.method is Method.QPISSA:  # the H-weighted principal part first (from Q = 0), then codes
            B, A, start = weighted_factors(
                W if q is None else q.subtracted_from(W), H_adapter, st, generator, start
            )
            q = codes(residual(A, B), final)
        else:  # LoftQ: codes first (from A = B = 0), then the adapter
            q = codes(residual(A, B), final)
            B, A, start = weighted_factors(q.subtracted_from(W), H_adapter, st, generator, start)
    if cal.compensate:
        q = codes(residual(A, B), final=True, compensate=True)
    if cal.compensate or st.method is Method.QPISSA:
        B, A, _ = weighted_factors(q.subtracted_from(W), H_adapter, st, generator, start)
    return Decomposition(q=q, A=A, B=B)


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
    # QLoRA: Q = nf4(W), and PEFT's default LoRA init
    A, B = _peft_default_init(W, st, generator)
    return Decomposition(q=quantize_nf4(W, st.blocksize, st.double_quant), A=A, B=B)


def _peft_default_init(
    W: torch.Tensor, st: DecomposeSettings, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's default LoRA init: A Kaiming-uniform (a = sqrt(5)) `[r, in]`, B = 0 `[out, r]`."""
    out_features, in_features = W.shape
    bound = 1 / math.sqrt(in_features)  # kaiming_uniform_ with a = sqrt(5) on fan_in = in
    A = (torch.rand(st.rank, in_features, generator=generator) * 2 - 1) * bound
    return A.to(W.device), torch.zeros(out_features, st.rank, device=W.device)


def _fit_adapter(
    M: torch.Tensor, st: DecomposeSettings, generator: torch.Generator, start: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Rank-r principal factors `B [out, r]`, `A [r, in]` of `M`, and the subspace to warm-start from."""
    svd = truncated_svd(M, st.rank, st.svd, **_sketch_options(st, generator, start))
    B, A = principal_factors(svd.U, svd.S, svd.Vh, st.scale)
    return B, A, svd.basis


def _quantize_residual(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor, st: DecomposeSettings) -> NF4Weight:
    # The residual is W - s·B·A computed from the adapter as stored (float32), not from the tail
    # singular values, so deq(Q) + s·B·A reproduces W up to the quantization error alone.
    residual = torch.addmm(W, B.to(W), A.to(W), alpha=-st.scale)  # W - s·B·A, [out, in]
    return quantize_nf4(residual, st.blocksize, st.double_quant)


def _sketch_options(st: DecomposeSettings, generator: torch.Generator, start: torch.Tensor | None) -> dict:
    """The randomized SVD's options for one fit, plain or H-weighted: a warm start (the last fit's
    subspace) takes `warm_power_iters` power steps, a cold one `power_iters`."""
    return {
        "oversample": st.oversample, "generator": generator, "start": start, "sketch_dtype": st.sketch_dtype,
        "power_iters": st.power_iters if start is None else st.warm_power_iters,
    }  # fmt: skip
