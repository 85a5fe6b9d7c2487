"""`qpissa_report.json` of a conversion: the settings as resolved, the per-matrix errors, the summary.

DESIGN.md ("The QPiSSA directory") lists its keys; `qpissa report`, `qpissa compare` and the benchmarks
read it, so each number is written here once.
"""

from __future__ import annotations

import torch

import qpissa
from qpissa.architecture import Architecture, read_architecture
from qpissa.checkpoint import CheckpointReader
from qpissa.convert_settings import ConvertSettings
from qpissa.memory import peak_rss_mb
from qpissa.roles import role_labels
from qpissa.runtime import compute_dtype, dtype_name
from qpissa.targets import kept_matrices
from qpissa.weight_error import by_type


def conversion_report(
    reader: CheckpointReader,
    settings: ConvertSettings,
    device: torch.device,
    workers: int,
    targets: list[str],
    progress: dict,
    calibration: dict | None = None,
    architecture: Architecture | None = None,
) -> dict:
    """The report of a finished conversion.

    Args:
        reader: the converted checkpoint.
        settings: the conversion's settings.
        device: where it was decomposed. workers: matrices decomposed at once.
        targets: the decomposed modules, sorted.
        progress: the resume record: fingerprint, every shard's per-matrix metrics, seconds so far.
        calibration: what `--calib` drew (source, format, samples, tokens, sha256...), or None.
        architecture: the checkpoint's model, if built already.

    Returns:
        fingerprint, settings (resolved: iters, alpha, device, dtypes, versions), layers, kept_unquantized,
        summary.
    """
    layers = [layer for entry in progress["shards"] for layer in entry["layers"]]
    architecture = architecture or read_architecture(reader)
    # a row per role among all the model's Linear layers: the same row whichever --targets chose
    labels = role_labels(
        {*architecture.linears, *(layer["name"] for layer in layers)} - {architecture.output}
    )
    layers = [{**layer, "module_type": labels[layer["name"]]} for layer in layers]
    report_settings = _settings(reader, settings, device, workers, targets, progress["fingerprint"]["sketch"])
    if calibration is not None:  # the settings resolved, what was drawn, and how the forward passes ran
        dtypes = progress["fingerprint"]["calibration"]
        chosen = {key: getattr(value, "value", value) for key, value in settings.calibration.items()}
        report_settings["calibration"] = {
            **chosen, **calibration, "dtype": dtypes["dtype"], "products_dtype": dtypes["products"],
            "fit_products_dtype": dtypes["fit_products"],
            "seed": settings.seed,
        }  # fmt: skip
    return {
        "fingerprint": progress["fingerprint"],
        "settings": report_settings,
        "layers": layers,
        "kept_unquantized": kept_matrices(reader, architecture),  # what stays unquantized, and why
        "summary": _summary(layers, progress["seconds"], device),
    }


def _settings(
    reader: CheckpointReader,
    settings: ConvertSettings,
    device: torch.device,
    workers: int,
    targets: list[str],
    sketch_dtype: str,
) -> dict:
    """The settings as resolved on this machine, the dtypes of each stage and the library versions."""
    import bitsandbytes
    import peft
    import transformers

    source_dtypes = sorted({reader.dtype_code(f"{t}.weight") for t in targets})
    return {
        **settings.resolved_dict(),
        "device": str(device),
        "workers": workers,
        "targets": targets,
        "dtypes": {"source": source_dtypes, "svd": settings.svd_dtype.value,
                   "sketch": sketch_dtype,
                   "adapter": "float32",
                   "compute": dtype_name(compute_dtype(settings.compute_dtype, device))},
        "versions": {"qpissa": qpissa.__version__, "torch": torch.__version__,
                     "bitsandbytes": bitsandbytes.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    }  # fmt: skip


def _summary(layers: list[dict], total_seconds: float, device: torch.device) -> dict:
    """The report's summary: errors by module type, one role each (the paper's AVG), timings, peak memory."""
    return {
        **by_type(layers),
        "total_seconds": total_seconds,  # wall time; the two below are summed over matrices (worker time)
        "decompose_seconds": sum(layer["seconds"] for layer in layers),
        "metrics_seconds": sum(layer["metrics_seconds"] for layer in layers),
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }
