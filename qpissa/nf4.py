"""NF4 quantization of one weight matrix, in bitsandbytes' own on-disk format (REFERENCE.md §3).

The quantizer is bitsandbytes itself, so the codes we fit against are byte for byte the codes that
`Linear4bit` later loads. The quant state is recorded in float32: the residual was computed in float32
and dequantizing to anything narrower would add a rounding the adapter was not fitted to.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import torch

from qpissa import UserError


@dataclass
class NF4Weight:
    """A weight stored as packed NF4 codes plus the bitsandbytes `QuantState` that decodes them.

    Attributes:
        packed: uint8 `[(out*in + 1) // 2, 1]`, two codes per byte, first value in the high nibble.
        state: `bitsandbytes.functional.QuantState` (absmax, blocksize, nested state when double-quantized).
    """

    packed: torch.Tensor
    state: object

    def dequantize(self) -> torch.Tensor:
        """Return `deq(Q)` as float32 `[out, in]`, the values its quantizer wrote (what `Linear4bit`
        computes with on a GPU). On a CPU the codes are decoded as one flat row, then reshaped: for some
        widths bitsandbytes' CPU kernel decodes `[out, in]` by rows (`cpu_decodes_by_rows`)."""
        import bitsandbytes.functional as bnbf

        if self.packed.device.type != "cpu":
            return bnbf.dequantize_4bit(self.packed, self.state).float()
        flat = copy.copy(self.state)
        flat.shape = torch.Size([1, self.state.shape.numel()])
        return bnbf.dequantize_4bit(self.packed, flat).reshape(self.state.shape).float()

    def subtracted_from(self, W: torch.Tensor) -> torch.Tensor:
        """`W - deq(Q)` in `W`'s dtype, reusing the dequantized copy: one full-size allocation, not two."""
        return self.dequantize().to(W).neg_().add_(W)

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """The pre-quantized `Linear4bit` weight under `prefix` (e.g. `model.layers.0.mlp.up_proj.`)."""
        tensors = {f"{prefix}weight": self.packed.cpu()}
        for key, value in self.state.as_dict(packed=True).items():
            tensors[f"{prefix}weight.{key}"] = value.cpu()
        return tensors


@functools.cache
def cpu_decodes_by_rows(in_features: int, blocksize: int) -> bool:
    """Whether bitsandbytes' CPU kernel decodes weights `in_features` wide with other scales than its
    quantizer wrote. The quantizer runs its blocks through the flattened weight, as CUDA decodes them;
    bitsandbytes 0.50's CPU kernel, for some widths that are not a multiple of the blocksize, decodes by
    rows (errors of 25 % of ‖W‖ instead of 9 %). Probed: the same codes decoded as one flat row."""
    import bitsandbytes.functional as bnbf

    if in_features % blocksize == 0:  # blocks within rows: decoded the same either way
        return False
    rows = 4 * blocksize // math.gcd(in_features, blocksize)  # whole blocks, several (one decodes right)
    W = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(0))
    packed, state = bnbf.quantize_4bit(W, blocksize=blocksize, quant_type="nf4")
    by_shape = bnbf.dequantize_4bit(packed, state)
    return not torch.equal(by_shape, NF4Weight(packed, state).dequantize())


def as_storage(packed: torch.Tensor, storage: torch.dtype) -> torch.Tensor:
    """The packed codes as bitsandbytes stores them under `quant_storage`: the same bytes, another dtype
    (`[n/2, 1]` uint8 becomes `[n/4, 1]` bfloat16), as `quantize_4bit(..., quant_storage=)` returns them.

    Raises:
        UserError: the byte count is not a multiple of the storage dtype's width.
    """
    if packed.dtype == storage:
        return packed
    if packed.numel() % storage.itemsize:
        raise UserError(
            f"a weight of {2 * packed.numel()} values cannot be stored as {storage} (its codes are "
            f"{packed.numel()} bytes); convert with --quant-storage uint8"
        )
    return packed.reshape(-1).view(storage).reshape(-1, 1)


def dequantize_stored(packed: torch.Tensor, stored_state: dict[str, torch.Tensor]) -> torch.Tensor:
    """`deq(Q)` of a weight read back from a checkpoint, float32 `[out, in]`.

    Args:
        packed: the stored codes (`<module>.weight`), uint8 or any `quant_storage` dtype.
        stored_state: the stored quant state tensors under their names after `<module>.weight.`
            (`absmax`, `quant_map`, `quant_state.bitsandbytes__nf4`, ...).
    """
    import bitsandbytes.functional as bnbf

    state = bnbf.QuantState.from_dict(stored_state, device=torch.device("cpu"))
    packed = as_storage(packed, torch.uint8)
    return NF4Weight(packed=packed, state=state).dequantize()


def quantize_nf4(W: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """Quantize a weight to NF4, byte for byte as `bitsandbytes.functional.quantize_4bit` does.

    On the CPU the codes come from `_nf4_codes_cpu` (same arithmetic, several times faster than bitsandbytes'
    own CPU path, whose binary search dominates a conversion); elsewhere from bitsandbytes itself.

    Args:
        W: float `[out, in]` on any device bitsandbytes supports; quantized in float32.
        blocksize: values per absmax block (row-major flatten of `W`).
        double_quant: also quantize the absmax values (8-bit, blocks of 256), as QLoRA does.

    Returns:
        The packed codes and quant state; `dequantize()` gives the values as written, which a `Linear4bit`
        computes with on a GPU (on a CPU too, but for the widths `cpu_decodes_by_rows` finds).
    """
    import bitsandbytes.functional as bnbf

    W = W.float().contiguous()
    if W.device.type != "cpu" or W.numel() % (2 * blocksize):
        packed, state = bnbf.quantize_4bit(
            W, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
        )
        return NF4Weight(packed=packed, state=state)
    packed, absmax = _nf4_codes_cpu(W, blocksize)
    code = bnbf.get_4bit_type("nf4", device=W.device)
    if not double_quant:
        state = bnbf.QuantState(absmax=absmax, shape=W.shape, dtype=W.dtype, blocksize=blocksize, code=code,
                                quant_type="nf4")  # fmt: skip
        return NF4Weight(packed=packed, state=state)
    offset = absmax.mean()  # double quant exactly as bitsandbytes: 8-bit blockwise absmax - mean
    qabsmax, state2 = bnbf.quantize_blockwise(absmax - offset, blocksize=256)
    state = bnbf.QuantState(absmax=qabsmax, shape=W.shape, dtype=W.dtype, blocksize=blocksize, code=code,
                            quant_type="nf4", offset=offset, state2=state2)  # fmt: skip
    return NF4Weight(packed=packed, state=state)


def _nf4_codes_cpu(W: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' CPU NF4 kernel with its binary search replaced by a table lookup.

    The code of a scaled value x is the number of level midpoints below x (`torch.bucketize`). A table
    over 4096 cells of [-1, 1] gives the count below each cell and the one midpoint that may fall in
    it (midpoints are ≥ 0.08 apart, cells 0.0005 wide), so one comparison settles the code exactly.
    Returns packed uint8 `[n/2, 1]` and float32 absmax `[n/blocksize]`.
    """
    # whole blocks at a time: the temporaries stay ~4x a chunk instead of ~4x the matrix (GBs at 70B)
    flat, step = W.reshape(-1), max(1, _CHUNK_VALUES // blocksize) * blocksize
    parts = [_nf4_codes_chunk(flat[i : i + step], blocksize) for i in range(0, flat.numel(), step)]
    return torch.cat([packed for packed, _ in parts]), torch.cat([absmax for _, absmax in parts])


def nearest_codes(scaled: torch.Tensor) -> torch.Tensor:
    """The nearest NF4 level's code of each value of a flat float32 tensor in [-1, 1] (uint8, same shape).

    The code is the number of level midpoints below the value, bitsandbytes' rounding, found with a
    table over 4096 cells of [-1, 1] that gives the count below each cell and the one midpoint that may
    fall in it (midpoints are ≥ 0.08 apart, cells 0.0005 wide): one comparison settles the code exactly.
    """
    # (scaled + 1) * _CELLS / 2 in one pass: the cell only has to be right within the table's slack
    cell = torch.add(_HALF_CELLS, scaled, alpha=_CELLS / 2).to(torch.int32)
    below, midpoint = (table.to(scaled.device) for table in _code_table())
    codes = below.index_select(0, cell)  # index_select: several times faster than [] indexing here
    codes += scaled > midpoint.index_select(0, cell)
    return codes


def _nf4_codes_chunk(values: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    blocks = values.view(-1, blocksize)
    absmax = torch.maximum(blocks.amax(dim=-1), -blocks.amin(dim=-1))  # max |x|, without a copy of |W|
    inverse = 1.0 / absmax.clamp(min=1e-38).view(-1, 1)
    # the same float operations as bitsandbytes, so the values compared below are bit-identical to its
    # scaled values; bitsandbytes' clamp to [-1, 1] changes no code, so it is left out
    codes = nearest_codes((blocks * inverse).view(-1))
    # two codes per byte, first in the high nibble: each little-endian int16 holds a pair as lo | hi << 8
    pairs = codes.view(torch.int16)
    packed = ((pairs << 4) | (pairs >> 8)).to(torch.uint8)
    return packed.unsqueeze(1), absmax


_CELLS = 4096
_CHUNK_VALUES = 1 << 17  # 512 KB of float32: its temporaries stay in the CPU's cache
_HALF_CELLS = torch.tensor(_CELLS / 2)


@functools.cache
def _code_table() -> tuple[torch.Tensor, torch.Tensor]:
    import bitsandbytes.functional as bnbf

    levels = bnbf.get_4bit_type("nf4", device="cpu")
    midpoints = ((levels[:-1] + levels[1:]) / 2).tolist()  # the boundaries bitsandbytes bucketizes on
    slack = 1e-4  # cell index rounding error is far smaller; midpoints are far farther apart
    below, midpoint = [], []
    for i in range(_CELLS + 1):  # the last row holds x = 1 exactly
        lo, hi = i * 2 / _CELLS - 1 - slack, (i + 1) * 2 / _CELLS - 1 + slack
        below.append(sum(m < lo for m in midpoints))
        inside = [m for m in midpoints if lo <= m <= hi]
        midpoint.append(inside[0] if inside else float("inf"))
    return torch.tensor(below, dtype=torch.uint8), torch.tensor(midpoint, dtype=torch.float32)
