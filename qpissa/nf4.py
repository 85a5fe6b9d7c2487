"""NF4 quantization of one weight matrix, in bitsandbytes' own on-disk format (REFERENCE.md §3).

The quantizer is bitsandbytes itself, so the codes we fit against are byte for byte the codes that
`Linear4bit` later loads. The quant state is recorded in float32: the residual was computed in float32
and dequantizing to anything narrower would add a rounding the adapter was not fitted to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)


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
        """Return `deq(Q)` as float32 `[out, in]`, exactly what `Linear4bit` computes with."""
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.packed, self.state).float()

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """The pre-quantized `Linear4bit` weight under `prefix` (e.g. `model.layers.0.mlp.up_proj.`)."""
        tensors = {f"{prefix}weight": self.packed.cpu()}
        for key, value in self.state.as_dict(packed=True).items():
            tensors[f"{prefix}weight.{key}"] = value.cpu()
        return tensors


def quantize_nf4(W: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Weight:
    """Quantize a weight to NF4 with bitsandbytes.

    Args:
        W: float `[out, in]` on any device bitsandbytes supports; quantized in float32.
        blocksize: values per absmax block (row-major flatten of `W`).
        double_quant: also quantize the absmax values (8-bit, blocks of 256), as QLoRA does.

    Returns:
        The packed codes and quant state; `dequantize()` gives the values a `Linear4bit` would use.
    """
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        W.float().contiguous(), blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
    )
    return NF4Weight(packed=packed, state=state)
