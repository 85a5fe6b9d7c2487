"""One target matrix of a conversion: checked, decomposed and measured; the pool that runs several; and the
check of every tensor copied unchanged beside them.

This is the only place a conversion touches the math (`methods.decompose`), for the data-free streaming
pass and for the calibrated layer-by-layer pass alike.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from qpissa import UserError
from qpissa.checkpoint import FLOAT_DTYPES, CheckpointReader
from qpissa.convert_settings import ConvertSettings, MetricKind, Precision, SvdKind
from qpissa.methods import CalibratedFit, DecomposeSettings, decompose, output_error
from qpissa.nf4 import quantize_nf4
from qpissa.runtime import calibration_dtype, sketch_dtype, statistics_dtype
from qpissa.weight_error import error_fields, error_norms, output_fields


@dataclass
class DecomposedMatrix:
    """What the output gets for one target: the NF4 residual's tensors, the adapter factors, the metrics.

    Attributes:
        tensors: the pre-quantized `Linear4bit` weight under the module's prefix (codes and quant state).
        A: `[r, in]` float32 (CPU). B: `[out, r]` float32 (CPU).
        metrics: the report's per-matrix entry (name, shape, rank, errors, seconds); the report adds
            `module_type`, its row, which depends on every target.
    """

    tensors: dict[str, torch.Tensor]
    A: torch.Tensor
    B: torch.Tensor
    metrics: dict


def decompose_settings_of(settings: ConvertSettings, device: torch.device) -> DecomposeSettings:
    """What `decompose` needs of the settings, resolved once for every matrix."""
    calibration = settings.calibration
    fit = None if calibration is None else CalibratedFit(
        adapter_damping=calibration["damping"], scale_search=calibration["scale_search"],
        compensate=calibration["compensate"], codes_damping=calibration["codes_damping"],
        fit_products_dtype=_fit_products_dtype(settings, device),
    )  # fmt: skip
    return DecomposeSettings(
        method=settings.method, rank=settings.rank, scale=settings.resolved_alpha / settings.rank,
        iters=settings.resolved_iters, svd=settings.svd, oversample=settings.oversample,
        power_iters=settings.resolved_power_iters, warm_power_iters=settings.resolved_warm_power_iters,
        svd_dtype=getattr(torch, settings.svd_dtype.value),
        sketch_dtype=sketch_dtype(settings.sketch_dtype, settings.svd_dtype),
        blocksize=settings.blocksize, double_quant=settings.double_quant, calibrated=fit,
    )  # fmt: skip


def _fit_products_dtype(settings: ConvertSettings, device: torch.device) -> torch.dtype | None:
    """bf16 for the H-weighted fits' products with H where H's own products or the sketch are bf16; else
    None (the weight's dtype), and always for an exact or float64 fit, which are asked for accuracy."""
    if settings.svd is SvdKind.EXACT or settings.svd_dtype is not Precision.FLOAT32:
        return None
    chosen = (
        statistics_dtype(device, settings.calibration["compensate"]),
        sketch_dtype(settings.sketch_dtype, settings.svd_dtype),
    )
    return torch.bfloat16 if torch.bfloat16 in chosen else None


def decompose_matrix(
    module: str,
    W: torch.Tensor,
    settings: DecomposeSettings,
    metrics: MetricKind,
    seed: int,
    device: torch.device,
    hessian: torch.Tensor | None = None,
) -> DecomposedMatrix:
    """Decompose one weight and measure its errors against plain NF4 (and under `hessian`, if given).

    Args:
        module: its module name (its weight is `module.weight`).
        W: `[out, in]` as stored in the checkpoint (any float dtype, CPU).
        settings: the resolved decomposition settings.
        metrics: which weight-space norms to compute. seed: the conversion's seed.
        device: where to compute.
        hessian: `[in, in]` float32 calibration statistics of the layer's inputs: decompose and measure
            the output-space error under them.

    Raises:
        UserError: the weight holds NaN or infinite values.
    """
    t0 = time.perf_counter()
    W = W.to(device=device, dtype=settings.svd_dtype)
    check_finite(f"{module}.weight", W)
    result = decompose(W, settings, _generator(seed, module), None if hessian is None else hessian.to(device))
    result.A, result.B = result.A.cpu(), result.B.cpu()
    _sync(device)
    t1 = time.perf_counter()
    # one error matrix at a time, each formed in place: at 8B scale a float32 copy is 235 MB
    base_error = quantize_nf4(W, settings.blocksize, settings.double_quant).subtracted_from(W)
    base = error_norms(base_error, metrics)
    product_dtype = None if hessian is None else calibration_dtype(device)  # bf16 where multiplied natively
    out_base = None if hessian is None else output_error(base_error, hessian, product_dtype)
    del base_error
    method_error = result.q.subtracted_from(W).addmm_(  # W - deq(Q) - s·B·A
        result.B.to(W), result.A.to(W), alpha=-settings.scale
    )
    errors = error_fields(base, error_norms(method_error, metrics))
    if hessian is not None:
        errors |= output_fields(out_base, output_error(method_error, hessian, product_dtype))
    _sync(device)
    entry = {
        "name": module, "shape": list(W.shape), "rank": settings.rank,
        "seconds": t1 - t0, "metrics_seconds": time.perf_counter() - t1, **errors,
    }  # fmt: skip
    return DecomposedMatrix(result.q.state_dict(f"{module}."), result.A, result.B, entry)


def checked_bytes(reader: CheckpointReader, name: str) -> Iterator[bytes]:
    """The stored bytes of a tensor copied unchanged (`CheckpointReader.read_bytes`), its floating-point
    values checked on the way as a decomposed weight's are: one chunk in memory, never the tensor.

    Raises:
        UserError: the tensor holds NaN or infinite values (`check_finite`).
    """
    dtype = FLOAT_DTYPES.get(reader.dtype_code(name))
    for chunk in reader.read_bytes(name):  # 4 MiB chunks: whole elements of any width
        if dtype is not None:
            values = torch.frombuffer(bytearray(chunk), dtype=dtype)
            wide = values.float() if values.element_size() == 1 else values  # float8_e4m3fn has no isfinite
            check_finite(name, wide)
        yield chunk


def check_finite(name: str, values: torch.Tensor) -> None:
    """Refuse a checkpoint tensor that holds NaN or infinite values, naming it.

    Raises:
        UserError: naming `name` and the fix.
    """
    if not torch.isfinite(values).all():
        raise UserError(
            f"{name} contains NaN or infinite values; the checkpoint is damaged "
            "(or was saved from a diverged run): convert a healthy checkpoint"
        )


@contextmanager
def one_thread_per_matrix(device: torch.device) -> Iterator[None]:
    """On the CPU every matrix is computed on one thread, several matrices at a time (`workers`).

    Most of a decomposition is quantizer passes and small factorizations that leave extra threads idle;
    whole matrices side by side keep every core busy (~1.5x faster on 2 cores), and each matrix's
    result no longer depends on the machine's thread count.
    """
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _generator(seed: int, module: str) -> torch.Generator:
    """One generator per matrix, from the seed and its name: results depend on neither order nor resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(module.encode()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
