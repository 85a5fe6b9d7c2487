"""NF4 codes on fixed block scales, chosen under calibration statistics H = X Xᵀ / n (REFERENCE.md §7).

Three ways to pick the codes of one target `T [out, in]`: round-to-nearest (bitsandbytes' own rounding
when the scales are the block maxima), an H-weighted search of each block's scale, and error-compensated
rounding (GPTQ, arXiv 2210.17323) on the NF4 grid. The result is an ordinary `NF4Weight` (standard codes,
standard optionally double-quantized absmax), so bitsandbytes dequantizes it unchanged.

A block is `blocksize` consecutive values of the row-major tensor; when `in` is a multiple of `blocksize`
it is a run of input columns of one row. Every block's scale is fixed (and double-quantized, since
bitsandbytes quantizes all of a tensor's absmax values together) before any code is chosen; GPTQ then
rounds input columns one at a time and pushes each column's error onto the later columns through H⁻¹.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from qpissa import UserError, nf4
from qpissa.convert_settings import CALIB_CODES_DAMPING
from qpissa.nf4 import NF4Weight

LAZY_COLUMNS = 128  # columns rounded between two full updates of the rest (GPTQ's lazy batch)
# the scales a search tries: 1, 0.92, 0.83, 0.75 of the block maximum; on the demo model 4, 6 and 11 steps
# gave the same held-out KL (within 3 %), and each step costs a trial rounding of the whole matrix
SCALE_SHRINK = tuple(1 - i / 12 for i in range(4))
CHUNK_VALUES = 1 << 16  # values rounded at a time: the temporaries stay in the CPU's cache


@dataclass
class BlockScales:
    """The absmax of every NF4 block, as stored and as bitsandbytes dequantizes with it.

    Attributes:
        stored: float32 `[blocks]`, the values before double quant (QuantState.absmax without it).
        used: float32 `[blocks]`, what `dequantize_4bit` multiplies the levels by (after double quant).
        nested: `(uint8 codes, QuantState of the absmax, offset)` with double quant, else None.
    """

    stored: torch.Tensor
    used: torch.Tensor
    nested: tuple[torch.Tensor, object, torch.Tensor] | None


def block_scales(absmax: torch.Tensor, double_quant: bool) -> BlockScales:
    """Fix each block's scale: `absmax` as given, double-quantized exactly as bitsandbytes does.

    Args:
        absmax: float32 `[blocks]` (the block maxima of |T|, or searched scales).
        double_quant: 8-bit blockwise quantization of `absmax − mean` in blocks of 256 (QLoRA).
    """
    import bitsandbytes.functional as bnbf

    absmax = absmax.float().contiguous()
    if not double_quant:
        return BlockScales(stored=absmax, used=absmax, nested=None)
    offset = absmax.mean()
    codes, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
    used = bnbf.dequantize_blockwise(codes, state2) + offset  # the same two steps as dequantize_4bit
    return BlockScales(stored=absmax, used=used.float(), nested=(codes, state2, offset))


def block_absmax(T: torch.Tensor, blocksize: int) -> torch.Tensor:
    """max |T| of each block of `blocksize` consecutive row-major values: float32 `[numel / blocksize]`."""
    blocks = T.float().reshape(-1, blocksize)
    return torch.maximum(blocks.amax(dim=-1), -blocks.amin(dim=-1))


def searched_absmax(
    T: torch.Tensor,
    weights: torch.Tensor,
    blocksize: int,
    shrink: tuple[float, ...] = SCALE_SHRINK,
) -> torch.Tensor:
    """Per block, the scale `c·absmax` (c from `shrink`) whose nearest-level rounding has the least error
    weighted by `weights [in]` (the diagonal of H): a smaller scale clips the largest value but rounds the
    rest more finely. Blocks must be runs of one row's columns (`in` a multiple of `blocksize`).

    Returns:
        float32 `[T.numel() // blocksize]` scales for `block_scales`.
    """
    in_features = T.shape[1]
    column_weight = weights.float().view(1, in_features // blocksize, blocksize)  # h_j of each column
    levels = _levels(T.device)
    # a few rows at a time: the temporaries of the trial roundings stay in the CPU's cache
    rows = max(1, CHUNK_VALUES // in_features)
    best = []
    for chunk in T.float().split(rows):
        blocks = chunk.view(len(chunk), -1, blocksize)  # [rows, in / blocksize, blocksize]
        absmax = block_absmax(chunk, blocksize).view(blocks.shape[:2])
        chosen, chosen_error = absmax, None
        for c in shrink:
            scale = (absmax * c).clamp(min=1e-38).unsqueeze(-1)
            rounded = levels.index_select(0, nearest_codes(blocks * (1.0 / scale)).view(-1).int())
            error = ((blocks - rounded.view(blocks.shape) * scale).square_() * column_weight).sum(dim=-1)
            if chosen_error is None:
                chosen_error = error
                continue
            better = error < chosen_error
            chosen = torch.where(better, absmax * c, chosen)
            chosen_error = torch.where(better, error, chosen_error)
        best.append(chosen.reshape(-1))
    return torch.cat(best)


def round_to_nearest(T: torch.Tensor, scales: BlockScales, blocksize: int) -> NF4Weight:
    """NF4 codes of `T` by nearest level on fixed scales (bitsandbytes' rounding on absmax scales)."""
    # times the inverse, as bitsandbytes scales: the same floats, so the same codes where scales are absmax
    inverse = (1.0 / scales.used.clamp(min=1e-38)).split(CHUNK_VALUES // blocksize)
    blocks = T.float().reshape(-1, blocksize).split(CHUNK_VALUES // blocksize)
    codes = torch.cat(
        [nearest_codes(b * i[:, None]).reshape(-1) for b, i in zip(blocks, inverse, strict=True)]
    )
    return nf4_weight(codes, scales, T.shape, blocksize)


def compensated_codes(
    T: torch.Tensor, hessian: torch.Tensor, scales: BlockScales, blocksize: int
) -> NF4Weight:
    """NF4 codes of `T` chosen column by column, each rounding error compensated through H⁻¹ (GPTQ).

    Args:
        T: `[out, in]` float32 target (e.g. `W − s·B·A`); not modified.
        hessian: `[in, in]` damped `X Xᵀ / n`, positive definite (float32 or float64).
        scales: fixed block scales (`block_scales`); `in` must be a multiple of `blocksize`.
        blocksize: NF4 block size.

    Returns:
        The codes and quant state; `dequantize()` is what bitsandbytes computes with.
    """
    out_features, in_features = T.shape
    if in_features % blocksize:
        raise ValueError(f"error-compensated rounding needs in ({in_features}) divisible by {blocksize}")
    levels = _levels(T.device)
    # U: upper Cholesky factor of H⁻¹; row j says how column j's error spreads to later columns
    H = hessian.float()  # float32, as GPTQ does: the damping keeps H well conditioned
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() == 0:
        U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info.item() != 0:
        raise UserError(
            f"the calibration statistics of a [{out_features}, {in_features}] matrix, damped by "
            "--calib-codes-damping, are not positive definite in float32; raise --calib-codes-damping "
            f"(default {CALIB_CODES_DAMPING}) or calibrate on more tokens"
        )
    # column-major: one input column is one contiguous row here; updated in place as errors move on
    work = T.float().T.contiguous()  # [in, out]
    scale = scales.used.view(out_features, in_features // blocksize).T.contiguous()  # [in / blocksize, out]
    inverse = 1.0 / scale.clamp(min=1e-38)
    codes = torch.empty(in_features, out_features, dtype=torch.uint8)
    for start in range(0, in_features, LAZY_COLUMNS):
        end = min(start + LAZY_COLUMNS, in_features)
        errors = torch.empty(end - start, out_features)
        for j in range(start, end):
            block = j // blocksize
            code = nearest_codes(work[j] * inverse[block])  # [out]
            codes[j] = code
            error = (work[j] - levels[code.long()] * scale[block]) / U[j, j]  # [out]
            work[j + 1 : end] -= U[j, j + 1 : end, None] * error
            errors[j - start] = error
        work[end:] -= U[start:end, end:].T @ errors  # the block's errors reach the columns after it
    codes = codes.T
    return nf4_weight(codes, scales, T.shape, blocksize)


def nearest_codes(scaled: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 level of each value of `scaled` (values beyond ±1 take the end levels)."""
    flat = scaled.float().reshape(-1).clamp(-1.0, 1.0)
    return nf4.nearest_codes(flat).view(scaled.shape)


def nf4_weight(codes: torch.Tensor, scales: BlockScales, shape: torch.Size, blocksize: int) -> NF4Weight:
    """Pack codes (any shape, row-major order) into bitsandbytes' layout with the quant state of `scales`.

    Two codes per byte, the first in the high nibble, as `Linear4bit` stores them (REFERENCE.md §3).
    """
    import bitsandbytes.functional as bnbf

    flat = codes.reshape(-1, 2).to(torch.uint8)
    packed = ((flat[:, 0] << 4) | flat[:, 1]).unsqueeze(1)  # [n / 2, 1]
    code = bnbf.get_4bit_type("nf4", device="cpu")
    common = {"shape": torch.Size(shape), "dtype": torch.float32, "blocksize": blocksize, "code": code,
              "quant_type": "nf4"}  # fmt: skip
    if scales.nested is None:
        return NF4Weight(packed=packed, state=bnbf.QuantState(absmax=scales.stored, **common))
    nested_codes, state2, offset = scales.nested
    state = bnbf.QuantState(absmax=nested_codes, offset=offset, state2=state2, **common)
    return NF4Weight(packed=packed, state=state)


@functools.cache
def _levels_cpu() -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    return bnbf.get_4bit_type("nf4", device="cpu").float()


def _levels(device: torch.device) -> torch.Tensor:
    return _levels_cpu().to(device)
