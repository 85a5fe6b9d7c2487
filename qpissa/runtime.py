"""The runtime policy: which device computes, in which dtype, and what the hardware does natively.

One rule runs through it: on a CPU everything computes in float32, because a bf16 matmul there is
about 100x slower than float32 (REFERENCE.md, machine facts; PEFT casts for the same reason), unless
the CPU multiplies bf16 natively (AMX, AVX512-BF16). Choices come from hardware facts, never from
timings, so outputs stay fixed on a given machine.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qpissa import UserError
from qpissa.convert_settings import ComputeDtype, Precision, SketchDtype
from qpissa.recipe import AUTO_OPTIM
from qpissa.settings import Device


@dataclass
class Runtime:
    """Training settings resolved against the hardware."""

    device: torch.device
    dtype: torch.dtype  # compute dtype of activations and 16-bit weights
    bf16: bool
    optim: str  # transformers optimizer name


def resolve_device(choice: Device, cuda_missing: str) -> torch.device:
    """The device `choice` names; `auto` is CUDA when a GPU is visible, else the CPU.

    Args:
        choice: auto, cpu or cuda.
        cuda_missing: the error for `cuda` without a GPU, in the words of the caller's option.

    Raises:
        UserError: `cuda` was asked for and no CUDA GPU is visible.
    """
    cuda = torch.cuda.is_available()
    if choice is Device.CUDA and not cuda:
        raise UserError(cuda_missing)
    return torch.device("cuda" if choice is not Device.CPU and cuda else "cpu")


def auto_device() -> torch.device:
    """CUDA when a GPU is visible, else the CPU."""
    return resolve_device(Device.AUTO, "")


def inference_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a CUDA GPU that supports it, else float32 (a bf16 matmul on a CPU is ~100x slower)."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def compute_dtype(choice: ComputeDtype, device: torch.device) -> torch.dtype:
    """`bnb_4bit_compute_dtype` of a conversion: the asked dtype, or `inference_dtype` for auto."""
    return inference_dtype(device) if choice is ComputeDtype.AUTO else getattr(torch, choice.value)


def sketch_dtype(choice: SketchDtype, svd_dtype: Precision) -> torch.dtype:
    """Dtype of the randomized range finder's products: the SVD's unless asked otherwise (auto).

    Not bf16 by default even where the hardware multiplies it natively: on the demo model a bf16 sketch
    saved no measurable time (at most 12 % in a one-thread measurement) and raised the held-out KL by 6 %
    (BENCHMARKS.md).
    """
    return getattr(torch, (svd_dtype if choice is SketchDtype.AUTO else choice).value)


def calibration_dtype(device: torch.device) -> torch.dtype:
    """Dtype of a calibrated conversion's forward passes and of its output-error metric's `E·H`: bf16
    where multiplied natively, else float32.

    The statistics H are products of these activations, in this dtype too (float32 for error-compensated
    codes), summed in float64.
    """
    return torch.bfloat16 if _multiplies_bf16_natively(device) else torch.float32


def statistics_dtype(device: torch.device, compensate: bool) -> torch.dtype:
    """Dtype of the products `xᵀx` that sum to H: the forward passes', but float32 for error-compensated
    codes, whose Cholesky factor of H bf16-rounded products break (`layer_stream.InputStatistics`)."""
    return torch.float32 if compensate else calibration_dtype(device)


def resolve_runtime(
    device_choice: Device = Device.AUTO, bf16: bool | None = None, optim: str = AUTO_OPTIM
) -> Runtime:
    """Pick device, compute dtype and optimizer for training; float32 and AdamW on a CPU.

    On CUDA without bf16 the compute dtype is float16 (the Trainer adds loss scaling).

    Raises:
        UserError: CUDA asked for but absent, or a CUDA-only option (bf16, paged optimizer) on CPU.
    """
    device = resolve_device(
        device_choice, "device is cuda but no CUDA GPU is visible; set device=cpu or device=auto"
    )
    if device.type == "cpu":
        if bf16:
            raise UserError(
                "bf16=true needs a CUDA GPU (on CPU bf16 matmuls are ~100x slower); drop bf16 or set it false"
            )
        if optim.startswith("paged_"):
            raise UserError(f"optim={optim} pages to a GPU and needs CUDA; use adamw_torch on CPU")
        chosen = "adamw_torch" if optim == AUTO_OPTIM else optim
        return Runtime(device, torch.float32, False, chosen)
    use_bf16 = torch.cuda.is_bf16_supported() if bf16 is None else bf16
    chosen = "paged_adamw_8bit" if optim == AUTO_OPTIM else optim
    return Runtime(device, torch.bfloat16 if use_bf16 else torch.float16, use_bf16, chosen)


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `bfloat16`, as reports and configs write it."""
    return str(dtype).removeprefix("torch.")


def _multiplies_bf16_natively(device: torch.device) -> bool:
    """Whether bf16 products are faster than float32 here: several times on AMX, ~100x slower without
    AVX512-BF16 (REFERENCE.md, machine facts). A hardware fact, never a timing, so outputs stay fixed."""
    if device.type == "cuda":  # emulated bf16 (before Ampere) is slower than float32
        return torch.cuda.is_bf16_supported(including_emulation=False)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch's own CPU feature checks
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


@contextmanager
def float32_default() -> Iterator[None]:
    """torch's default dtype float32 while the body runs: a caller's float64 (`torch.set_default_dtype`, in
    a notebook) made tensors that bitsandbytes and qpissa create without a dtype float64 in the output."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
