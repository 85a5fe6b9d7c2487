"""`qpissa convert`: stream a checkpoint through decompose → quantize → write, one matrix at a time.

Data flows one way: read a tensor, decompose it (targets only), write the NF4 residual and the adapter
factors, record the errors on the side. Output is built in `OUT.partial/` shard by shard, each shard
recorded in `progress.json` once complete, so `--resume` redoes at most one shard; `OUT` appears only
when everything is written.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

import torch
from tqdm.auto import tqdm

import qpissa
from qpissa import UserError, layout
from qpissa.checkpoint import CheckpointReader, SafetensorsWriter, copy_side_files, write_json
from qpissa.config import to_dict
from qpissa.memory import available_memory_bytes, peak_rss_mb
from qpissa.methods import DecomposeSettings, Method, decompose
from qpissa.nf4 import BLOCKSIZES, quantize_nf4
from qpissa.outputs import check_apart, check_replaceable
from qpissa.quality import MetricKind, error_fields, error_norms
from qpissa.svd import SvdKind
from qpissa.targets import ALL_LINEAR, module_type, resolve_targets

log = logging.getLogger(__name__)

REPORT_NAME = layout.REPORT_NAME
ADAPTER_DIR = layout.ADAPTER_DIR


class Device(str, Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"


class Precision(str, Enum):
    FLOAT32 = "float32"
    FLOAT64 = "float64"


class SketchDtype(str, Enum):
    AUTO = "auto"  # bfloat16 where the hardware multiplies it natively and the SVD is float32
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"
    FLOAT64 = "float64"


class ComputeDtype(str, Enum):
    AUTO = "auto"  # bfloat16 on a CUDA GPU that supports it, else float32
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


@dataclass
class ConvertSettings:
    """How to decompose and quantize a checkpoint. Every field is a `qpissa convert` flag."""

    method: Method = field(default=Method.QPISSA, metadata={"help": "initialization: qpissa, loftq or qlora"})
    rank: int = field(default=64, metadata={"help": "adapter rank r (A is [r, in], B is [out, r])"})
    alpha: float | None = field(
        default=None, metadata={"help": "lora_alpha; scale s = alpha/r (default: r, s = 1)"}
    )
    iters: int | None = field(
        default=None,
        metadata={"help": "alternating SVD/quantize iterations T (default 5; T=1 is plain QPiSSA)"},
    )
    svd: SvdKind = field(
        default=SvdKind.RANDOMIZED, metadata={"help": "exact, or randomized (seeded, oversampled)"}
    )
    oversample: int = field(default=32, metadata={"help": "randomized SVD: extra sketch columns beyond r"})
    power_iters: int = field(default=4, metadata={"help": "randomized SVD: power (subspace) iterations"})
    warm_power_iters: int | None = field(
        default=None,
        metadata={
            "help": "randomized SVD: extra power iterations when warm-started from the last iteration, "
            "beyond the subspace step each iteration is (default 0 for qpissa, whose matrix changes only by "
            "a quantization error; 1 for loftq, which factors that error itself)"
        },
    )
    svd_dtype: Precision = field(
        default=Precision.FLOAT32, metadata={"help": "precision of the SVD and residual"}
    )
    sketch_dtype: SketchDtype = field(
        default=SketchDtype.AUTO,
        metadata={
            "help": "randomized SVD: precision of the range finder's products (auto: bfloat16 on CPUs with "
            "AMX or AVX512-BF16 and on bf16 GPUs when --svd-dtype is float32, else --svd-dtype); the factors "
            "are always projected in --svd-dtype"
        },
    )
    targets: str = field(
        default=ALL_LINEAR, metadata={"help": "all-linear, or Linear names/suffixes such as q_proj,v_proj"}
    )
    blocksize: int = field(default=64, metadata={"help": "NF4 values per absmax block"})
    double_quant: bool = field(
        default=True, metadata={"help": "quantize the absmax values too (QLoRA default)"}
    )
    compute_dtype: ComputeDtype = field(
        default=ComputeDtype.AUTO, metadata={"help": "bnb_4bit_compute_dtype written to config.json"}
    )
    device: Device = field(
        default=Device.AUTO, metadata={"help": "where to decompose: auto (CUDA if present), cpu, cuda"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the randomized SVD and of QLoRA's A"})
    metrics: MetricKind = field(
        default=MetricKind.FRO,
        metadata={"help": "fro: Frobenius error only; nuc: also the paper's nuclear norm (slow)"},
    )
    shard_size_mb: float = field(default=2048, metadata={"help": "largest output shard, in MB"})
    workers: int | None = field(
        default=None,
        metadata={
            "help": "CPU only: matrices decomposed at once, one thread each; the output does not depend "
            "on it (default: one per CPU thread, as many as half the available memory holds)"
        },
    )

    def __post_init__(self) -> None:
        problems = []
        if self.rank < 1:
            problems.append(f"--rank must be at least 1, got {self.rank}; try --rank 16")
        if self.iters is not None and self.iters < 1:
            problems.append(f"--iters must be at least 1, got {self.iters}")
        if self.iters is not None and self.iters != 1 and self.method is Method.QLORA:
            problems.append("--iters has no meaning for --method qlora (it quantizes W once); drop --iters")
        if self.alpha is not None and self.alpha <= 0:
            problems.append(f"--alpha must be positive, got {self.alpha}")
        if self.blocksize not in BLOCKSIZES:
            problems.append(
                f"--blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {self.blocksize}"
            )
        if min(self.oversample, self.power_iters, self.warm_power_iters or 0) < 0:
            problems.append("--oversample, --power-iters and --warm-power-iters must be 0 or more")
        if self.shard_size_mb <= 0:
            problems.append(f"--shard-size-mb must be positive, got {self.shard_size_mb}")
        if self.workers is not None and self.workers < 1:
            problems.append(f"--workers must be at least 1, got {self.workers}")
        if problems:
            raise UserError("; ".join(problems))

    @property
    def resolved_iters(self) -> int:
        return 1 if self.method is Method.QLORA else (self.iters or 5)

    @property
    def resolved_warm_power_iters(self) -> int:
        if self.warm_power_iters is not None:
            return self.warm_power_iters
        return 1 if self.method is Method.LOFTQ else 0

    @property
    def resolved_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)

    def output_settings(self) -> dict:
        """The settings the output depends on: all but `workers`, which only sets the speed."""
        return {key: value for key, value in to_dict(self).items() if key != "workers"}


def convert(
    model_dir: Path,
    out_dir: Path,
    settings: ConvertSettings,
    *,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Convert a full-precision HF checkpoint into a QPiSSA directory (DESIGN.md, "The QPiSSA directory").

    Args:
        model_dir: Hugging Face checkpoint directory with safetensors weights.
        out_dir: where the result appears once complete.
        settings: method, rank, quantizer and SVD settings.
        resume: continue `OUT.partial/` from an interrupted run with the same settings.
        overwrite: replace an existing `out_dir`.
        show_progress: show a progress bar (only on a terminal).

    Returns:
        The report (also written to `out_dir/qpissa_report.json`).

    Raises:
        UserError: bad input or settings, an existing output, a resume with different settings.
    """
    started = time.perf_counter()
    reader = CheckpointReader(model_dir)
    for output in (out_dir, layout.partial_dir(out_dir)):
        check_apart(output, "OUT", {"MODEL": model_dir})
    if overwrite:
        check_replaceable(out_dir, "OUT", (REPORT_NAME,), "a QPiSSA directory")
    targets = set(resolve_targets(settings.targets, reader, settings.rank))
    device = _resolve_device(settings.device)
    workers = _resolve_workers(settings.workers, device, reader, targets)
    decompose_settings = _decompose_settings(settings, device)
    # the resolved sketch dtype too: `auto` may resolve differently on the machine that resumes
    fingerprint = {
        "model": str(model_dir.resolve()), "settings": settings.output_settings(),
        "sketch": _dtype_name(decompose_settings.sketch_dtype),
    }  # fmt: skip
    progress = layout.prepare_output(out_dir, fingerprint, resume=resume, overwrite=overwrite)
    if progress is None:  # --resume on a finished conversion with the same settings
        return layout.load_report(out_dir)
    partial = layout.partial_dir(out_dir)
    log.info("converting %s -> %s with %s", model_dir, out_dir, to_dict(settings))

    plan = layout.plan_shards(
        reader, targets, settings.blocksize, settings.double_quant, settings.shard_size_mb
    )
    done = {entry["file"] for entry in progress["shards"]}
    bar = tqdm(
        total=len(targets),
        unit="matrix",
        desc=f"{settings.method.value} r={settings.rank}",
        disable=None if show_progress else True,
    )
    bar.update(sum(len(entry["layers"]) for entry in progress["shards"]))
    try:
        with _one_thread_per_matrix(device):
            for shard_file, names in plan:
                if shard_file in done:
                    continue
                layers = _convert_shard(
                    reader,
                    names,
                    targets,
                    settings,
                    decompose_settings,
                    device,
                    workers,
                    partial / shard_file,
                    bar,
                )
                progress["shards"].append({"file": shard_file, "layers": layers})
                write_json(partial / layout.PROGRESS_NAME, progress)
    except UserError:  # a damaged weight: nothing written so far is worth resuming
        shutil.rmtree(partial)
        raise
    finally:
        bar.close()

    progress["seconds"] += time.perf_counter() - started
    shard_files = [f for f, _ in plan]
    return _finish(reader, partial, out_dir, targets, settings, device, workers, progress, shard_files)


def summary_table(report: dict) -> str:
    """A per-module-type table of the QLoRA baseline error, the method's error and the reduction."""
    method = report["settings"]["method"]
    rows = {}
    for layer in report["layers"]:
        row = rows.setdefault(layer["module_type"], {"base": [], "err": []})
        row["base"].append(layer["err_fro_base"])
        row["err"].append(layer["err_fro"])
    summary = report["summary"]
    has_nuc = summary["avg"] is not None
    header = f"{'module':<12} {'QLoRA err':>10} {method + ' err':>12} {'reduction % (fro)':>18}"
    header += f" {'reduction % (nuc)':>18}" if has_nuc else ""
    lines = [header, "-" * len(header)]
    for kind, row in rows.items():
        line = f"{kind:<12} {_mean(row['base']):>10.4f} {_mean(row['err']):>12.4f}"
        line += f" {summary['by_type_fro'][kind]:>18.2f}"
        line += f" {summary['by_type'][kind]:>18.2f}" if has_nuc else ""
        lines.append(line)
    lines.append("-" * len(header))
    last = f"{'AVG':<12} {'':>10} {'':>12} {summary['avg_fro']:>18.2f}"
    lines.append(last + (f" {summary['avg']:>18.2f}" if has_nuc else ""))
    return "\n".join(lines)


def _convert_shard(
    reader: CheckpointReader,
    names: list[str],
    targets: set[str],
    settings: ConvertSettings,
    decompose_settings: DecomposeSettings,
    device: torch.device,
    workers: int,
    shard_path: Path,
    bar: tqdm,
) -> list[dict]:
    """Write one output shard and its adapter part; return the metrics of its decomposed matrices.

    Up to `workers` target matrices are decomposed at once, while everything is written in `names`
    order: the bytes do not depend on `workers`.
    """
    writer = SafetensorsWriter(shard_path)
    adapter = SafetensorsWriter(layout.adapter_part(shard_path.parent, shard_path.name))
    layers = []
    pending: deque[tuple[str, Future | None]] = deque()  # in `names` order; None: copied unchanged

    def write_oldest() -> None:
        name, decomposition = pending.popleft()
        if decomposition is None:  # not a target weight: copied byte for byte, never loaded
            writer.add_bytes(name, reader.dtype_code(name), list(reader.shape(name)), reader.read_bytes(name))
            return
        result, layer = decomposition.result()
        module = layer["name"]
        for key, value in result.q.state_dict(f"{module}.").items():
            writer.add(key, value)
        adapter.add(f"base_model.model.{module}.lora_A.weight", result.A)
        adapter.add(f"base_model.model.{module}.lora_B.weight", result.B)
        layers.append(layer)
        bar.update(1)

    with ThreadPoolExecutor(workers) as pool:
        for name in names:
            module = name.removesuffix(".weight")
            is_target = module in targets and name.endswith(".weight")
            decomposition = (
                pool.submit(_decompose_one, reader, module, settings, decompose_settings, device)
                if is_target
                else None
            )
            pending.append((name, decomposition))
            # twice as many matrices queued as computed: a worker that finishes a small matrix starts the
            # next instead of idling until the oldest is written; a finished result is ~1/8 of its W
            while pending and (pending[0][1] is None or sum(f is not None for _, f in pending) > 2 * workers):
                write_oldest()
        while pending:
            write_oldest()
    writer.close()
    adapter.close()
    return layers


def _decompose_settings(settings: ConvertSettings, device: torch.device) -> DecomposeSettings:
    """What `decompose` needs of the settings, resolved once for every matrix."""
    return DecomposeSettings(
        method=settings.method, rank=settings.rank, scale=settings.resolved_alpha / settings.rank,
        iters=settings.resolved_iters, svd=settings.svd, oversample=settings.oversample,
        power_iters=settings.power_iters, warm_power_iters=settings.resolved_warm_power_iters,
        svd_dtype=getattr(torch, settings.svd_dtype.value),
        sketch_dtype=_sketch_dtype(settings.sketch_dtype, settings.svd_dtype, device),
        blocksize=settings.blocksize, double_quant=settings.double_quant,
    )  # fmt: skip


def _decompose_one(
    reader: CheckpointReader,
    module: str,
    settings: ConvertSettings,
    decompose_settings: DecomposeSettings,
    device: torch.device,
):
    """Read, decompose and measure one matrix: the only place convert touches the math."""
    t0 = time.perf_counter()
    W = reader.read(f"{module}.weight").to(device=device, dtype=decompose_settings.svd_dtype)
    if not torch.isfinite(W).all():
        raise UserError(
            f"{module}.weight contains NaN or infinite values; the checkpoint is damaged "
            "(or was saved from a diverged run): convert a healthy checkpoint"
        )
    result = decompose(W, decompose_settings, _generator(settings.seed, module))
    result.A, result.B = result.A.cpu(), result.B.cpu()
    _sync(device)
    t1 = time.perf_counter()
    # one error matrix at a time, each formed in place: at 8B scale a float32 copy is 235 MB
    baseline = quantize_nf4(W, settings.blocksize, settings.double_quant)
    base = error_norms(baseline.subtracted_from(W), settings.metrics)
    method_error = result.q.subtracted_from(W).addmm_(  # W - deq(Q) - s·B·A
        result.B.to(W), result.A.to(W), alpha=-decompose_settings.scale
    )
    errors = error_fields(base, error_norms(method_error, settings.metrics))
    _sync(device)
    layer = {
        "name": module, "module_type": module_type(module), "shape": list(W.shape), "rank": settings.rank,
        "seconds": t1 - t0, "metrics_seconds": time.perf_counter() - t1, **errors,
    }  # fmt: skip
    return result, layer


def _finish(
    reader: CheckpointReader,
    partial: Path,
    out_dir: Path,
    targets: set[str],
    settings: ConvertSettings,
    device: torch.device,
    workers: int,
    progress: dict,
    shard_files: list[str],
) -> dict:
    """Write config, side files, adapter and report into `partial`, then move it to `out_dir`."""
    layout.write_config(
        reader, partial, targets, settings.double_quant, _compute_dtype(settings.compute_dtype, device)
    )
    copy_side_files(reader.model_dir, partial)
    layout.write_adapter(partial, shard_files, targets, settings.rank, settings.resolved_alpha, out_dir)
    if len(shard_files) > 1:
        layout.write_index(partial, shard_files)
    layers = [layer for entry in progress["shards"] for layer in entry["layers"]]
    report = {
        "fingerprint": progress["fingerprint"],
        "settings": _report_settings(
            reader, settings, device, workers, sorted(targets), progress["fingerprint"]["sketch"]
        ),
        "layers": layers,
        "summary": _summarize(layers, progress["seconds"], device),
    }
    write_json(partial / REPORT_NAME, report)
    layout.move_into_place(partial, out_dir)
    return report


def _report_settings(
    reader: CheckpointReader,
    settings: ConvertSettings,
    device: torch.device,
    workers: int,
    targets: list[str],
    sketch_dtype: str,
) -> dict:
    import bitsandbytes
    import peft
    import transformers

    source_dtypes = sorted({reader.dtype_code(f"{t}.weight") for t in targets})
    return {
        **to_dict(settings),
        "iters": settings.resolved_iters,
        "warm_power_iters": settings.resolved_warm_power_iters,
        "alpha": settings.resolved_alpha,
        "device": str(device),
        "workers": workers,
        "targets": targets,
        "dtypes": {"source": source_dtypes, "svd": settings.svd_dtype.value,
                   "sketch": sketch_dtype,
                   "adapter": "float32",
                   "compute": _dtype_name(_compute_dtype(settings.compute_dtype, device))},
        "versions": {"qpissa": qpissa.__version__, "torch": torch.__version__,
                     "bitsandbytes": bitsandbytes.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    }  # fmt: skip


def _summarize(layers: list[dict], total_seconds: float, device: torch.device) -> dict:
    """Per-type means and their unweighted average (the paper's AVG), in nuclear and Frobenius norm."""
    by_type_fro: dict[str, list[float]] = {}
    by_type_nuc: dict[str, list[float]] = {}
    for layer in layers:
        by_type_fro.setdefault(layer["module_type"], []).append(layer["reduction_fro"])
        if layer["reduction_nuc"] is not None:
            by_type_nuc.setdefault(layer["module_type"], []).append(layer["reduction_nuc"])
    fro = {kind: _mean(values) for kind, values in by_type_fro.items()}
    nuc = {kind: _mean(values) for kind, values in by_type_nuc.items()} or None
    return {
        "by_type": nuc,
        "avg": _mean(list(nuc.values())) if nuc else None,
        "by_type_fro": fro,
        "avg_fro": _mean(list(fro.values())) if fro else None,
        "total_seconds": total_seconds,  # wall time; the two below are summed over matrices (worker time)
        "decompose_seconds": sum(layer["seconds"] for layer in layers),
        "metrics_seconds": sum(layer["metrics_seconds"] for layer in layers),
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }


def _generator(seed: int, module: str) -> torch.Generator:
    """One generator per matrix, from the seed and its name: results depend on neither order nor resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(module.encode()))


def _resolve_device(device: Device) -> torch.device:
    if device is Device.CUDA and not torch.cuda.is_available():
        raise UserError("--device cuda was given but no CUDA GPU is visible; use --device cpu or auto")
    if device is Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device.value)


def _resolve_workers(
    requested: int | None, device: torch.device, reader: CheckpointReader, targets: set[str]
) -> int:
    """Matrices decomposed at once: one on a GPU; on the CPU one per thread, within half the free memory."""
    if device.type != "cpu":
        return 1
    if requested is not None:
        return requested
    largest = max(math.prod(reader.shape(f"{module}.weight")) for module in targets)
    # float32 copies alive while one matrix is decomposed and measured (W, residual, dequantized, errors)
    per_matrix = _FLOAT32_COPIES_PER_MATRIX * 4 * largest
    return max(1, min(torch.get_num_threads(), available_memory_bytes() // 2 // per_matrix))


_FLOAT32_COPIES_PER_MATRIX = 7


@contextmanager
def _one_thread_per_matrix(device: torch.device):
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


def _compute_dtype(choice: ComputeDtype, device: torch.device) -> torch.dtype:
    if choice is ComputeDtype.AUTO:
        # bf16 matmuls are ~100x slower than fp32 on a CPU (REFERENCE.md, machine facts)
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if gpu_bf16 else torch.float32
    return getattr(torch, choice.value)


def _sketch_dtype(choice: SketchDtype, svd_dtype: Precision, device: torch.device) -> torch.dtype:
    if choice is not SketchDtype.AUTO:
        return getattr(torch, choice.value)
    if svd_dtype is Precision.FLOAT32 and _multiplies_bf16_natively(device):
        return torch.bfloat16
    return getattr(torch, svd_dtype.value)


def _multiplies_bf16_natively(device: torch.device) -> bool:
    """Whether bf16 products are faster than float32 here: several times on AMX, ~100x slower without
    AVX512-BF16 (REFERENCE.md, machine facts). A hardware fact, never a timing, so outputs stay fixed."""
    if device.type == "cuda":  # emulated bf16 (before Ampere) is slower than float32
        return torch.cuda.is_bf16_supported(including_emulation=False)
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch's own CPU feature checks
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
