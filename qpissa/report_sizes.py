"""What a report says of sizes: the original model's, each conversion's and each export's files on disk and
parameter counts, read from their safetensors headers without reading any tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from qpissa.artifacts import ADAPTER_DIR, ADAPTER_WEIGHTS
from qpissa.checkpoint import FLOAT_DTYPES, SHARD_GLOB, CheckpointReader
from qpissa.report_checks import CONVERT_AGAIN
from qpissa.runtime import dtype_name
from qpissa.safetensors_file import read_header


def checkpoint_sizes(reader: CheckpointReader) -> dict:
    """Size, parameter count and floating-point dtypes of an original model: only the weight files
    transformers loads count (Mistral's `consolidated.safetensors` beside `model.safetensors` is a copy),
    and its dtype is its own (an original is not always 16-bit)."""
    tensors = [info for header in reader.headers.values() for info in header.values()]
    dtypes = {dtype_name(FLOAT_DTYPES[t["dtype"]]) for t in tensors if t["dtype"] in FLOAT_DTYPES}
    return {"disk_mb": _size_mb(reader.shards), "params": sum(map(_numel, tensors)), "dtypes": sorted(dtypes)}


def conversion_sizes(directory: Path, report: dict) -> dict:
    """On-disk sizes and parameter counts of a conversion (its `qpissa_report.json` is `report`), and the
    peak memory of converting it."""
    quantized = {layer["name"] for layer in report["layers"]}
    shards = sorted(directory.glob(SHARD_GLOB))
    headers = {name: info for shard in shards for name, info in _header(shard).items()}
    adapter = directory / ADAPTER_DIR / ADAPTER_WEIGHTS
    return {
        "convert_peak_rss_mb": report["summary"]["peak_rss_mb"],
        "convert_peak_gpu_mb": report["summary"].get("peak_gpu_mb"),
        "residual_disk_mb": _size_mb(shards),
        "adapter_disk_mb": _size_mb([adapter]),
        "params_4bit": sum(layer["shape"][0] * layer["shape"][1] for layer in report["layers"]),
        "params_unquantized": sum(
            _numel(info) for name, info in headers.items() if not _is_quantized(name, quantized)
        ),
        "adapter_params": sum(_numel(info) for info in _header(adapter).values()),
    }


def export_sizes(label: str, path: Path, report: dict) -> dict:
    """An export's row: what it is, its size on disk, and its check against the trained model."""
    verify = report.get("verify") or {}
    return {
        "method": label, "path": str(path), "kind": report.get("kind"), "dtype": report.get("dtype"),
        "disk_mb": _size_mb(path.glob("*.safetensors")), "max_abs_diff": verify.get("max_abs_diff"),
        "kl_mean": verify.get("kl_mean"), "seconds": report.get("seconds"),
    }  # fmt: skip


def _is_quantized(name: str, quantized: set[str]) -> bool:
    """`<module>.weight` and its quant state (`.weight.absmax`, ...) of a quantized module."""
    return name.split(".weight")[0] in quantized


def _header(path: Path) -> dict[str, dict]:
    """The tensor entries of a conversion's safetensors file (dtype, shape), without reading any data; a
    file cut short or damaged is the conversion's to redo, not a download's."""
    return read_header(path, CONVERT_AGAIN)[0]


def _numel(info: dict) -> int:
    return math.prod(info["shape"])


def _size_mb(paths: Iterable[Path]) -> float:
    return sum(path.stat().st_size for path in paths if path.is_file()) / 2**20
