"""The calibrated decomposition's math on small matrices: optimality, compensation, bitsandbytes' format."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from qpissa.convert_settings import Method, SvdKind
from qpissa.methods import CalibratedFit, DecomposeSettings, damped, decompose, output_error, weighted_factors
from qpissa.nf4 import quantize_nf4
from qpissa.nf4_codes import block_absmax, block_scales, compensated_codes, round_to_nearest, searched_absmax


def _settings(method: Method = Method.QPISSA, rank: int = 4, svd: SvdKind = SvdKind.EXACT, iters: int = 3):
    return DecomposeSettings(
        method=method, rank=rank, scale=0.5, iters=iters, svd=svd, oversample=8, power_iters=4,
        warm_power_iters=1, svd_dtype=torch.float32, sketch_dtype=torch.float32, blocksize=64,
        double_quant=False,
    )  # fmt: skip


def _activations(n: int, width: int, seed: int) -> torch.Tensor:
    """Correlated inputs with a few large channels, as LLM activations have: `[n, width]`."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=g) / width**0.5
    x = torch.randn(n, width, generator=g) @ mixing
    x[:, :3] *= 20
    return x


def test_weighted_adapter_is_the_optimum_found_by_alternating_least_squares() -> None:
    g = torch.Generator().manual_seed(0)
    R = torch.randn(24, 16, generator=g, dtype=torch.float64)
    X = _activations(200, 16, 1).double()
    H = X.T @ X / 200
    st = _settings(rank=3)
    B, A, _ = weighted_factors(R.float(), H.float(), st, g, None)
    ours = output_error(R - st.scale * (B.double() @ A.double()), H)
    # brute force: alternate exact least-squares steps in B and A from many random starts
    best = float("inf")
    for seed in range(5):
        A_als = torch.randn(3, 16, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for _ in range(300):
            B_als = R @ H @ A_als.T @ torch.linalg.inv(A_als @ H @ A_als.T)
            A_als = torch.linalg.solve(B_als.T @ B_als, B_als.T @ R)
        best = min(best, output_error(R - B_als @ A_als, H))
    plain = output_error(R - _best_unweighted(R, 3), H)
    assert ours < plain * 0.95, "not vacuous: the weighted fit must beat the unweighted one on E"
    assert ours == pytest.approx(best, rel=1e-4)


def test_weighted_adapter_halves_are_balanced() -> None:
    g = torch.Generator().manual_seed(2)
    R = torch.randn(32, 64, generator=g)
    X = _activations(300, 64, 3)
    H = (X.T.double() @ X.double() / 300).float()
    B, A, _ = weighted_factors(R, H, _settings(rank=4), g, None)
    torch.testing.assert_close(B.norm(dim=0), A.norm(dim=1), rtol=1e-4, atol=1e-6)


def test_round_to_nearest_on_absmax_scales_is_bitsandbytes_quantization() -> None:
    T = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    ours = round_to_nearest(T, block_scales(block_absmax(T, 64), False), 64)
    reference = quantize_nf4(T, 64, False)
    assert torch.equal(ours.packed, reference.packed)
    assert torch.equal(ours.dequantize(), reference.dequantize())


def test_double_quantized_scales_are_bitsandbytes_and_codes_round_against_them() -> None:
    T = torch.randn(64, 128, generator=torch.Generator().manual_seed(4))
    ours = round_to_nearest(T, block_scales(block_absmax(T, 64), True), 64)
    reference = quantize_nf4(T, 64, True)
    for key in ("absmax", "offset"):
        assert torch.equal(getattr(ours.state, key), getattr(reference.state, key))
    assert torch.equal(ours.state.state2.absmax, reference.state.state2.absmax)
    # bitsandbytes rounds against the exact absmax, ours against the scale it dequantizes with
    assert (T - ours.dequantize()).norm() <= (T - reference.dequantize()).norm()


@pytest.mark.parametrize("double_quant", [False, True])
def test_compensated_rounding_lowers_the_output_error(double_quant: bool) -> None:
    T = torch.randn(48, 128, generator=torch.Generator().manual_seed(5))
    X = _activations(512, 128, 6)
    H = X.T.double() @ X.double() / 512
    scales = block_scales(block_absmax(T, 64), double_quant)
    nearest = round_to_nearest(T, scales, 64)
    compensated = compensated_codes(T, damped(H, 0.01), scales, 64)
    e_nearest = output_error(T - nearest.dequantize(), H)
    e_compensated = output_error(T - compensated.dequantize(), H)
    assert e_compensated < 0.8 * e_nearest
    # standard codes on the same scales: what bitsandbytes dequantizes is levels × the fixed scales
    import bitsandbytes.functional as bnbf

    levels = bnbf.get_4bit_type("nf4", device="cpu")
    codes = torch.stack([compensated.packed[:, 0] >> 4, compensated.packed[:, 0] & 15], 1).reshape(48, 128)
    expected = levels[codes.long()] * scales.used.view(48, 2).repeat_interleave(64, dim=1)
    assert torch.equal(compensated.dequantize(), expected)


@pytest.mark.parametrize("method", [Method.QPISSA, Method.LOFTQ, Method.QLORA])
@pytest.mark.parametrize("compensate", [False, True])
def test_calibrated_decomposition_beats_data_free_on_the_output_error(
    method: Method, compensate: bool
) -> None:
    g = torch.Generator().manual_seed(7)
    W = torch.randn(64, 128, generator=g) * 0.05
    X = _activations(512, 128, 8)
    H = X.T.double() @ X.double() / 512
    fit = CalibratedFit(adapter_damping=0.01, scale_search=True, compensate=compensate, codes_damping=0.01)
    data_free = _settings(method=method, rank=8)
    calibrated = dataclasses.replace(data_free, calibrated=fit)

    def error(settings: DecomposeSettings, hessian: torch.Tensor | None) -> float:
        d = decompose(W, settings, torch.Generator().manual_seed(0), hessian)
        return output_error(W - d.q.dequantize() - settings.scale * (d.B @ d.A), H)

    assert error(calibrated, None) == error(data_free, None), "without H the data-free path runs"
    assert error(calibrated, H) < 0.8 * error(data_free, None)


def test_randomized_weighted_fit_matches_the_exact_one() -> None:
    g = torch.Generator().manual_seed(9)
    # a clear rank-6 part plus noise: the randomized SVD must find it through M H Mᵀ
    M = torch.randn(96, 6, generator=g) @ torch.randn(6, 128, generator=g) + 0.01 * torch.randn(
        96, 128, generator=g
    )
    X = _activations(400, 128, 10)
    H = damped(X.T.double() @ X.double() / 400, 0.01).float()
    exact = weighted_factors(M, H, _settings(rank=6), g, None)
    randomized = weighted_factors(M, H, _settings(rank=6, svd=SvdKind.RANDOMIZED), g, None)
    product = [st.scale * (B @ A) for st, (B, A, _) in ((_settings(), exact), (_settings(), randomized))]
    torch.testing.assert_close(product[0], product[1], rtol=0, atol=2e-3 * product[0].abs().max().item())


def test_weighted_fit_with_bf16_products_captures_what_the_exact_fit_captures() -> None:
    """Products with H in bf16 (where the statistics are bf16) only tilt the subspace the factors are
    projected on: cold and warm-started, the fit misses under 1e-4 of the output error the exact fit
    removes."""
    g = torch.Generator().manual_seed(13)
    M = torch.randn(96, 192, generator=g) @ torch.diag(torch.logspace(0, -2, 192))
    nearby = M + 1e-3 * torch.randn(96, 192, generator=g)
    X = _activations(600, 192, 14)
    H = damped(X.T @ X / 600, 0.1)
    st = _settings(rank=8, svd=SvdKind.RANDOMIZED)

    def missed(target: torch.Tensor, B: torch.Tensor, A: torch.Tensor) -> float:
        B_exact, A_exact, _ = weighted_factors(target, H, _settings(rank=8), g, None)
        best = output_error(target - st.scale * B_exact @ A_exact, H)
        return (output_error(target - st.scale * B @ A, H) - best) / (output_error(target, H) - best)

    H_bf16 = H.to(torch.bfloat16)
    B, A, basis = weighted_factors(M, H_bf16, st, torch.Generator().manual_seed(0), None)
    warm = dataclasses.replace(st, power_iters=0)
    B_warm, A_warm, _ = weighted_factors(nearby, H_bf16, warm, torch.Generator().manual_seed(0), basis)
    assert missed(M, B, A) < 1e-4
    assert missed(nearby, B_warm, A_warm) < 1e-4
    B32, A32, _ = weighted_factors(M, H, st, torch.Generator().manual_seed(0), None)
    assert not torch.equal(B @ A, B32 @ A32), "the products must have run in bf16"


def test_weighted_fit_warm_started_from_a_nearby_matrix_needs_no_power_iterations() -> None:
    """Each alternation starts from the last fit's subspace (stored already multiplied by H)."""
    g = torch.Generator().manual_seed(11)
    M = torch.randn(96, 128, generator=g) @ torch.diag(torch.logspace(0, -3, 128))
    X = _activations(400, 128, 12)
    H = damped(X.T @ X / 400, 0.1)
    no_power = dataclasses.replace(
        _settings(rank=6, svd=SvdKind.RANDOMIZED), power_iters=0, warm_power_iters=0
    )
    _, _, basis = weighted_factors(M, H, dataclasses.replace(no_power, power_iters=6), g, None)
    nearby = M + 1e-4 * torch.randn(96, 128, generator=g)

    def error(start: torch.Tensor | None, settings: DecomposeSettings) -> float:
        B, A, _ = weighted_factors(nearby, H, settings, g, start)
        return output_error(nearby - settings.scale * B @ A, H)

    best = error(None, _settings(rank=6))
    assert error(basis, no_power) <= best * 1.001
    assert error(None, no_power) > best * 1.01  # a cold start without power steps is not enough


def test_scale_search_never_rounds_worse_than_the_block_maxima() -> None:
    T = torch.randn(32, 128, generator=torch.Generator().manual_seed(11))
    weights = torch.rand(128, generator=torch.Generator().manual_seed(12)) + 0.1

    def weighted_error(absmax: torch.Tensor) -> float:
        q = round_to_nearest(T, block_scales(absmax, False), 64)
        return float(((T - q.dequantize()).square() * weights).sum())

    searched, plain = searched_absmax(T, weights, 64), block_absmax(T, 64)
    assert weighted_error(searched) < 0.97 * weighted_error(plain)
    assert bool((searched <= plain).all())


def _best_unweighted(R: torch.Tensor, rank: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(R, full_matrices=False)
    return U[:, :rank] * S[:rank] @ Vh[:rank]


def test_output_error_of_an_error_in_the_null_space_of_repetitive_inputs_is_zero() -> None:
    """Calibration text that repeats one token gives a rank-1 H; an error with E·x = 0 has no output
    error, and the bf16 product must not make its square negative (its root was a traceback)."""
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        x = torch.randn(64, 1, generator=generator)
        E = torch.randn(32, 64, generator=generator)
        E -= (E @ x) @ x.T / (x.T @ x)
        largest = float(E.square().sum() * x.square().sum())  # the form's value for E along x
        assert 0.0 <= output_error(E, x @ x.T, torch.bfloat16) < 1e-2 * largest
