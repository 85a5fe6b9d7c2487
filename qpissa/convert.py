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
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qpissa import UserError, convert_output
from qpissa.artifacts import REPORT_NAME, partial_dir, read_report
from qpissa.checkpoint import CheckpointReader, SafetensorsWriter, copy_side_files, write_index, write_json
from qpissa.conversion_report import conversion_report
from qpissa.memory import available_memory_bytes
from qpissa.methods import DecomposeSettings, Decomposition, decompose
from qpissa.nf4 import quantize_nf4
from qpissa.options import to_dict
from qpissa.outputs import check_apart, check_replaceable, lock_output
from qpissa.runtime import compute_dtype, dtype_name, resolve_device, sketch_dtype
from qpissa.settings import ConvertSettings
from qpissa.stored import adapter_key
from qpissa.targets import module_type, resolve_targets
from qpissa.weight_error import error_fields, error_norms

log = logging.getLogger(__name__)


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
        UserError: bad input or settings, an existing output, a resume with different settings, another
            process writing OUT.
    """
    for output in (out_dir, partial_dir(out_dir)):
        check_apart(output, "OUT", {"MODEL": model_dir})
    with lock_output(out_dir, "OUT"):  # held until OUT is complete: one writer per output
        return _convert(model_dir, out_dir, settings, resume, overwrite, show_progress)


def _convert(
    model_dir: Path,
    out_dir: Path,
    settings: ConvertSettings,
    resume: bool,
    overwrite: bool,
    show_progress: bool,
) -> dict:
    """`convert` while this process holds OUT's lock."""
    started = time.perf_counter()
    reader = CheckpointReader(model_dir)
    if overwrite:
        check_replaceable(out_dir, "OUT", (REPORT_NAME,), "a QPiSSA directory")
    targets = set(resolve_targets(settings.targets, reader, settings.rank))
    device = resolve_device(
        settings.device, "--device cuda was given but no CUDA GPU is visible; use --device cpu or auto"
    )
    workers = _resolve_workers(settings.workers, device, reader, targets)
    decompose_settings = _decompose_settings(settings, device)
    # the resolved sketch dtype too: `auto` may resolve differently on the machine that resumes
    fingerprint = {
        "model": str(model_dir.resolve()), "settings": settings.output_settings(),
        "sketch": dtype_name(decompose_settings.sketch_dtype),
    }  # fmt: skip
    progress = convert_output.prepare_output(out_dir, fingerprint, resume=resume, overwrite=overwrite)
    if progress is None:  # --resume on a finished conversion with the same settings
        return read_report(out_dir)
    partial = partial_dir(out_dir)
    log.info("converting %s -> %s with %s", model_dir, out_dir, to_dict(settings))

    plan = convert_output.plan_shards(
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
                convert_output.record_shard(partial, progress, shard_file, layers)
    except UserError:  # a damaged weight: nothing written so far is worth resuming
        shutil.rmtree(partial)
        raise
    finally:
        bar.close()

    progress["seconds"] += time.perf_counter() - started
    shard_files = [f for f, _ in plan]
    return _finish(reader, partial, out_dir, targets, settings, device, workers, progress, shard_files)


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
    adapter = SafetensorsWriter(convert_output.adapter_part(shard_path.parent, shard_path.name))
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
        adapter.add(adapter_key(module, "A"), result.A)
        adapter.add(adapter_key(module, "B"), result.B)
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
        sketch_dtype=sketch_dtype(settings.sketch_dtype, settings.svd_dtype, device),
        blocksize=settings.blocksize, double_quant=settings.double_quant,
    )  # fmt: skip


def _decompose_one(
    reader: CheckpointReader,
    module: str,
    settings: ConvertSettings,
    decompose_settings: DecomposeSettings,
    device: torch.device,
) -> tuple[Decomposition, dict]:
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
    convert_output.write_config(
        reader, partial, targets, settings.double_quant, compute_dtype(settings.compute_dtype, device)
    )
    copy_side_files(reader.model_dir, partial)
    convert_output.write_adapter(
        partial, shard_files, targets, settings.rank, settings.resolved_alpha, out_dir
    )
    if len(shard_files) > 1:
        write_index(partial, shard_files)
    report = conversion_report(reader, settings, device, workers, sorted(targets), progress)
    write_json(partial / REPORT_NAME, report)
    convert_output.move_into_place(partial, out_dir)
    return report


def _generator(seed: int, module: str) -> torch.Generator:
    """One generator per matrix, from the seed and its name: results depend on neither order nor resume."""
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(module.encode()))


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
def _one_thread_per_matrix(device: torch.device) -> Iterator[None]:
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
