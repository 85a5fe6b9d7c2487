"""`qpissa convert`: stream a checkpoint through decompose → quantize → write, one matrix at a time.

Data flows one way: read a tensor, decompose it (targets only), write the NF4 residual and the adapter
factors, record the errors on the side. Output is built in `OUT.partial/` shard by shard, each shard
recorded in `progress.json` once complete, so `--resume` redoes at most one shard; `OUT` appears only
when everything is written. With `--calib` the decompositions come first, layer by layer under the
calibration statistics (`convert_calibrated.py`), and the shards are then written from their spools.
"""

from __future__ import annotations

import functools
import logging
import math
import shutil
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qpissa import UserError, convert_output
from qpissa.architecture import Architecture
from qpissa.artifacts import (
    CALIBRATION_DIR,
    REPORT_NAME,
    TOKENIZER_MARKERS,
    partial_dir,
    read_report,
)
from qpissa.calibration import CalibrationTokens
from qpissa.checkpoint import CheckpointReader, SafetensorsWriter, copy_side_files, write_index, write_json
from qpissa.conversion_report import conversion_report
from qpissa.convert_calibrated import calibrate_layers, calibration_run, calibration_tokens, spooled
from qpissa.convert_matrix import (
    DecomposedMatrix,
    checked_bytes,
    decompose_matrix,
    decompose_settings_of,
    one_thread_per_matrix,
)
from qpissa.convert_settings import ConvertSettings
from qpissa.memory import available_memory_bytes
from qpissa.methods import DecomposeSettings
from qpissa.nf4 import as_storage
from qpissa.options import api_path, check_api_argument
from qpissa.output_lock import lock_output
from qpissa.outputs import check_apart, resolve_output
from qpissa.runtime import (
    calibration_dtype,
    compute_dtype,
    dtype_name,
    float32_default,
    resolve_device,
    statistics_dtype,
)
from qpissa.stored import adapter_key
from qpissa.targets import TargetPlan, check_cpu_decoding, check_quant_storage, plan_targets, warn_cpu_kernel

log = logging.getLogger(__name__)


def convert(
    model_dir: Path | str,
    out_dir: Path | str,
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
    settings = check_api_argument(settings, ConvertSettings, "settings", "e.g. ConvertSettings(rank=64)")
    model_dir, out_dir = api_path(model_dir, "model_dir"), resolve_output(api_path(out_dir, "out_dir"), "OUT")
    for output in (out_dir, partial_dir(out_dir)):
        check_apart(output, "OUT", {"MODEL": model_dir, "--calib": settings.calib})
    with lock_output(out_dir, "OUT"), float32_default():  # the lock held until OUT is complete
        return _convert(model_dir, out_dir, settings, resume, overwrite, show_progress)


def check_conversion(
    model_dir: Path, settings: ConvertSettings
) -> tuple[CheckpointReader, TargetPlan, torch.device]:
    """The checkpoint, its targets and the device, checked as `convert` checks them before it writes
    anything (`compare` runs it for every method before it starts).

    Raises:
        UserError: a missing, damaged or already quantized checkpoint, targets that match nothing or are
            too small for the rank or the --quant-storage, an unavailable device.
    """
    reader = CheckpointReader(model_dir)
    target_plan = plan_targets(settings.targets, reader, settings.rank, calibrated=settings.calib is not None)
    storage = settings.quant_storage.value
    check_quant_storage(target_plan, getattr(torch, storage).itemsize, storage)
    device = resolve_device(
        settings.device, "--device cuda was given but no CUDA GPU is visible; use --device cpu or auto"
    )
    return reader, target_plan, device


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
    if overwrite:
        convert_output.check_overwritable(out_dir)
    reader, target_plan, device = check_conversion(model_dir, settings)
    check_cpu_decoding(target_plan, settings.blocksize, device.type)
    warn_cpu_kernel(target_plan, settings.blocksize)
    if settings.calib is None and not any((model_dir / name).is_file() for name in TOKENIZER_MARKERS):
        log.warning(
            "%s holds no tokenizer (no %s), so %s will hold none either; train, eval and chat need one: "
            "copy the original model's tokenizer files into it",
            model_dir, " or ".join(TOKENIZER_MARKERS), out_dir,
        )  # fmt: skip
    targets = set(target_plan.names)
    workers = _resolve_workers(settings.workers, device, reader, targets, settings.calib is not None)
    decompose_settings = decompose_settings_of(settings, device)
    tokens = calibration_tokens(reader, settings)
    # the resolved sketch dtype (`auto` may resolve otherwise where it resumes), the checkpoint's files too
    fingerprint = {
        "model": str(model_dir.resolve()), "settings": settings.output_settings(),
        "sketch": dtype_name(decompose_settings.sketch_dtype), "checkpoint": reader.file_stats(),
    }  # fmt: skip
    if tokens is not None:  # what was drawn, and the dtypes of the forwards and of H's products chosen here
        fit = decompose_settings.calibrated
        fingerprint["calibration"] = {
            "sha256": tokens.sha256, "dtype": dtype_name(calibration_dtype(device)),
            "products": dtype_name(statistics_dtype(device, settings.calibration["compensate"])),
            "fit_products": dtype_name(fit.fit_products_dtype or decompose_settings.svd_dtype),
        }  # fmt: skip
    progress = convert_output.prepare_output(out_dir, fingerprint, resume=resume, overwrite=overwrite)
    if progress is None:  # --resume on a finished conversion with the same settings
        log.info("%s is complete already, with the same settings: nothing to resume; its report:", out_dir)
        return read_report(out_dir)
    partial = partial_dir(out_dir)
    log.info("converting %s -> %s with %s", model_dir, out_dir, settings.description())

    plan = convert_output.plan_shards(
        reader, targets, settings.blocksize, settings.double_quant, settings.shard_size_mb
    )
    done = {entry["file"] for entry in progress["shards"]}
    description = f"{settings.method.value} r={settings.rank}"
    decompose_one = functools.partial(
        _read_and_decompose, reader, decompose_settings, settings, device, target_plan.transposed
    )
    try:
        if tokens is not None:
            calibration = progress.get("calibration", {})
            if "layer_of" not in calibration:
                run = calibration_run(tokens, settings, decompose_settings, device, workers)
                with _bar(len(targets), f"{description} calibrated", show_progress) as bar:
                    bar.update(len(calibration.get("metrics", {})))
                    calibrate_layers(reader, targets, run, partial, progress, bar)
            decompose_one = functools.partial(_spooled_or_decomposed, partial, progress, decompose_one)
            description = "writing"
        with _bar(len(targets), description, show_progress) as bar, one_thread_per_matrix(device):
            bar.update(sum(len(entry["layers"]) for entry in progress["shards"]))
            for shard_file, names in plan:
                if shard_file in done:
                    continue
                layers = _convert_shard(
                    reader, names, targets, decompose_one, workers, partial / shard_file, bar,
                    getattr(torch, settings.quant_storage.value),
                )  # fmt: skip
                convert_output.record_shard(partial, progress, shard_file, layers)
    except UserError:  # a damaged weight: nothing written so far is worth resuming
        shutil.rmtree(partial)
        raise

    progress["seconds"] += time.perf_counter() - started
    shard_files = [f for f, _ in plan]
    return _finish(
        reader, target_plan.architecture, partial, out_dir, targets, settings, device, workers, progress,
        shard_files, tokens,
    )  # fmt: skip


def _convert_shard(
    reader: CheckpointReader,
    names: list[str],
    targets: set[str],
    decompose_one: Callable[[str], DecomposedMatrix],
    workers: int,
    shard_path: Path,
    bar: tqdm,
    storage: torch.dtype,
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
        if decomposition is None:  # not a target weight: copied byte for byte, checked chunk by chunk
            writer.add_bytes(
                name, reader.dtype_code(name), list(reader.shape(name)), checked_bytes(reader, name)
            )
            return
        result = decomposition.result()
        module = result.metrics["name"]
        for key, value in result.tensors.items():
            writer.add(key, as_storage(value, storage) if key == f"{module}.weight" else value)
        adapter.add(adapter_key(module, "A"), result.A)
        adapter.add(adapter_key(module, "B"), result.B)
        layers.append(result.metrics)
        bar.update(1)

    with ThreadPoolExecutor(workers) as pool:
        for name in names:
            module = name.removesuffix(".weight")
            is_target = module in targets and name.endswith(".weight")
            pending.append((name, pool.submit(decompose_one, module) if is_target else None))
            # twice as many matrices queued as computed: a worker that finishes a small matrix starts the
            # next instead of idling until the oldest is written; a finished result is ~1/8 of its W
            while pending and (pending[0][1] is None or sum(f is not None for _, f in pending) > 2 * workers):
                write_oldest()
        while pending:
            write_oldest()
    writer.close()
    adapter.close()
    return layers


def _read_and_decompose(
    reader: CheckpointReader,
    decompose_settings: DecomposeSettings,
    settings: ConvertSettings,
    device: torch.device,
    transposed: set[str],
    module: str,
) -> DecomposedMatrix:
    """A target decomposed data-free, read from the checkpoint as the writer reaches it."""
    W = reader.read(f"{module}.weight")
    if module in transposed:  # GPT-2's Conv1D stores [in, out]; its Linear4bit holds [out, in]
        W = W.T.contiguous()
    return decompose_matrix(module, W, decompose_settings, settings.metrics, settings.seed, device)


def _spooled_or_decomposed(
    partial: Path, progress: dict, decompose_one: Callable[[str], DecomposedMatrix], module: str
) -> DecomposedMatrix:
    """A calibrated target from its spool; a target outside the decoder layers, decomposed data-free."""
    return spooled(partial, progress, module) or decompose_one(module)


def _finish(
    reader: CheckpointReader,
    architecture: Architecture,
    partial: Path,
    out_dir: Path,
    targets: set[str],
    settings: ConvertSettings,
    device: torch.device,
    workers: int,
    progress: dict,
    shard_files: list[str],
    tokens: CalibrationTokens | None,
) -> dict:
    """Write config, side files, adapter and report into `partial`, then move it to `out_dir`."""
    convert_output.write_config(
        reader, architecture, partial, targets, settings.double_quant,
        compute_dtype(settings.compute_dtype, device), getattr(torch, settings.quant_storage.value),
    )  # fmt: skip
    copy_side_files(reader.model_dir, partial)
    convert_output.write_adapter(
        architecture, partial, shard_files, targets, settings.rank, settings.resolved_alpha, out_dir
    )
    if len(shard_files) > 1:
        write_index(partial, shard_files)
    calibration = None if tokens is None else tokens.describe()
    report = conversion_report(
        reader, settings, device, workers, sorted(targets), progress, calibration, architecture
    ) | {"files": convert_output.written_files(partial)}
    write_json(partial / REPORT_NAME, report)
    shutil.rmtree(partial / CALIBRATION_DIR, ignore_errors=True)
    convert_output.move_into_place(partial, out_dir)
    return report


def _bar(total: int, description: str, show: bool) -> tqdm:
    return tqdm(total=total, unit="matrix", desc=description, disable=None if show else True)


def _resolve_workers(
    requested: int | None, device: torch.device, reader: CheckpointReader, targets: set[str], calibrated: bool
) -> int:
    """Matrices decomposed at once: one on a GPU; on the CPU one per thread, within half the free memory."""
    if device.type != "cpu":
        return 1
    if requested is not None:
        return min(requested, len(targets))  # more would wait for matrices that are not there
    shapes = [reader.shape(f"{module}.weight") for module in targets]
    # float32 copies alive while one matrix is decomposed and measured (W, residual, dequantized, errors)
    per_matrix = _FLOAT32_COPIES_PER_MATRIX * 4 * max(math.prod(shape) for shape in shapes)
    if calibrated:  # and [in, in] ones: H, the adapter's damped H, the compensation's or the metric's copy
        per_matrix += 3 * 4 * max(shape[1] for shape in shapes) ** 2
    return max(1, min(torch.get_num_threads(), available_memory_bytes() // 2 // per_matrix))


_FLOAT32_COPIES_PER_MATRIX = 7
