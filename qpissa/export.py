"""`qpissa export`: a trained adapter over the NF4 residual → a merged 16-bit model, or a LoRA (rank 2r, r
from a zero initial adapter) for the original model (REFERENCE.md §1, "Merging / exporting").

Both exports stream one matrix at a time: the residual is dequantized from its stored bitsandbytes codes,
the adapter factors are read lazily, and every output tensor goes straight to disk. Output is built in
`OUT.partial/` and renamed to `OUT` only once written and verified (an export whole but too big for the
check to load is kept, its report saying it is unverified).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import qpissa
from qpissa import UserError
from qpissa.architecture import Architecture, read_architecture
from qpissa.artifacts import (
    CHECKPOINT_PREFIX,
    CONFIG_NAME,
    EXPORT_REPORT,
    OWN_JSON,
    PARTIAL_MARKER,
    REPORT_NAME,
    ModelSource,
    has_adapter,
    read_json,
    read_report,
)
from qpissa.chat_template import save_chat_template, saved_chat_template
from qpissa.checkpoint import (
    FLOAT_DTYPES,
    QUANTIZED_KEY_MARKERS,
    CheckpointReader,
    ShardedWriter,
    copy_side_files,
    write_json,
)
from qpissa.export_lora import LoraInputs, check_lora_inputs, check_trained, write_lora, write_readme
from qpissa.export_verify import verify_export
from qpissa.loading import refuse_cpu_misdecoded
from qpissa.memory import error_reason, out_of_memory, peak_rss_mb
from qpissa.model_source import resolve_source
from qpissa.options import api_path, check_api_argument, to_dict
from qpissa.output_lock import lock_output
from qpissa.outputs import (
    check_apart,
    check_only_own,
    check_replaceable,
    files_in,
    finish_partial,
    resolve_output,
    start_partial,
)
from qpissa.run_marker import run_data_settings
from qpissa.runtime import auto_device, dtype_name
from qpissa.settings import ExportKind, ExportSettings, OutputDtype
from qpissa.stored import Adapter, Residual, read_adapter

log = logging.getLogger(__name__)


def export(
    run: Path | str,
    out_dir: Path | str,
    settings: ExportSettings,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
) -> dict:
    """Export a trained (or freshly converted) QPiSSA model as a merged checkpoint or a LoRA for the original.

    Args:
        run: a training run, a `checkpoint-N` inside one, or a QPiSSA directory (its untrained adapter).
        out_dir: the directory to create; must not exist (or be empty), unless `overwrite`.
        settings: kind of export, dtype, optional re-truncation rank, original model, verification.
        overwrite: replace an earlier export in `out_dir` (and nothing else: not one holding a file or
            folder it did not write), once the new one is whole.
        show_progress: show a progress bar (only on a terminal).

    Returns:
        The export report (also written to `out_dir/export_report.json`).

    Raises:
        UserError: no adapter, an adapter that does not fit the residual, a missing original model, an
            `out_dir` that exists (without `overwrite`, or is not an earlier export, or holds what that
            export did not write) or lies inside (or around) an input, or another process writing it;
            raised before anything is written. Also when training, still writing the run, deletes the
            checkpoint being read (nothing is left written then either).
    """
    started = time.perf_counter()
    settings = check_api_argument(settings, ExportSettings, "settings", "e.g. ExportSettings()")
    run, out_dir = api_path(run, "run"), resolve_output(api_path(out_dir, "out_dir"), "OUT")
    source = resolve_source(run)
    try:
        return _export(run, source, out_dir, settings, overwrite, show_progress, started)
    # a deleted file fails safetensors and os.stat with FileNotFoundError, read_json with UserError, PEFT
    # with ValueError: each is told as the vanished checkpoint, and only when that checkpoint is gone
    except (FileNotFoundError, ValueError, UserError):
        if not _checkpoint_vanished(source):
            raise
        raise UserError(
            f"checkpoint {source.adapter_dir} vanished while export read it: training is still writing run "
            f"{source.run_dir} and removed it (save_total_limit keeps the newest checkpoints only); nothing "
            "was written: export again, or when training ends"
        ) from None


def _checkpoint_vanished(source: ModelSource) -> bool:
    """A training run still being written rotates its checkpoints (`save_total_limit`): the one read may
    be deleted under the export, which then fails on a missing file, not on a mistake of the user."""
    adapter = source.adapter_dir
    return (
        source.run_dir is not None
        and adapter is not None
        and adapter.name.startswith(CHECKPOINT_PREFIX)
        and not has_adapter(adapter)
    )


def _export(
    run: Path,
    source: ModelSource,
    out_dir: Path,
    settings: ExportSettings,
    overwrite: bool,
    show_progress: bool,
    started: float,
) -> dict:
    """`export` of the resolved `source`; `started`: when the command started, for the report."""
    if source.adapter_dir is None:
        raise UserError(
            f"{run} has no adapter to export (no complete adapter/ directory); pass a training run, a "
            "checkpoint-N directory or a QPiSSA directory made by `qpissa convert`"
        )
    check_apart(
        out_dir,
        "OUT",
        {
            "RUN": run,
            "the run RUN belongs to": source.run_dir,  # a checkpoint's run: its rotation and overwrite delete
            "RUN's QPiSSA directory": source.base_dir,
            "RUN's adapter": source.adapter_dir,
            "--base": settings.base,
        },
    )
    residual = Residual(source.base_dir)
    trained = read_adapter(source.adapter_dir)
    architecture = read_architecture(residual.reader)
    _check_fits(trained, residual, architecture)
    if settings.verify and auto_device().type == "cpu":  # the check's model would decode them wrongly
        refuse_cpu_misdecoded(
            source.base_dir, "export with --no-verify (the export itself decodes them right)"
        )
    lora_inputs = (
        check_lora_inputs(source, residual, trained, settings, architecture)
        if settings.to is ExportKind.LORA
        else None
    )
    if lora_inputs is not None:  # the original model found from the conversion's report, not only --base
        check_apart(out_dir, "OUT", {"original model": lora_inputs.original.model_dir})
        check_trained(source)
    dtype = _resolve_dtype(settings, residual.reader)
    with lock_output(out_dir, "OUT"):
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"OUT {out_dir} is a file; choose a directory path")
        if out_dir.exists() and any(out_dir.iterdir()):  # --overwrite is advised only where it would do
            _check_overwritable(out_dir)
            if not overwrite:
                raise UserError(
                    f"output {out_dir} already exists; pass --overwrite to replace it, or choose another OUT"
                )
        partial = start_partial(out_dir, "OUT")
        try:
            report = _write(
                run, source, residual, architecture, trained, lora_inputs, partial, dtype, settings,
                show_progress,
            )  # fmt: skip
            if lora_inputs is not None:
                write_readme(partial, out_dir, report)
        except BaseException:  # this process made `partial`: nothing of it is worth keeping
            shutil.rmtree(partial, ignore_errors=True)
            raise
        report["seconds"] = time.perf_counter() - started
        report["files"] = sorted({*files_in(partial), EXPORT_REPORT} - {PARTIAL_MARKER})
        write_json(partial / EXPORT_REPORT, report)
        finish_partial(partial, out_dir)
    if settings.verify and report["verify"] is None:
        # Exit status 0: the export is whole, the same files --no-verify writes; only the check of it
        # failed, for want of memory, which says nothing against it. A failure would have the user rerun
        # the whole export (into an OUT that now exists) for the same files; the report says it is unchecked.
        log.warning(
            "%s is exported but not verified: %s; it is kept: to verify it, export again with --overwrite "
            "where more memory is free, or pass --no-verify to skip the check",
            out_dir, report["verify_skipped"],
        )  # fmt: skip
    return report


def _replace_inline_template(tokenizer_config: Path, template: str) -> None:
    """Put the run's template into a copied tokenizer_config.json that holds the base model's: tools that
    read only that file (llama.cpp's converter, transformers 4.42 and older) would render with the base's."""
    if not tokenizer_config.is_file():
        return
    config = read_json(tokenizer_config, "restore the tokenizer files of the QPiSSA directory")
    inline = config.get("chat_template")
    if isinstance(inline, list):  # named templates: the run's replaces the default one
        inline = [
            {**t, "template": template} if isinstance(t, dict) and t.get("name") == "default" else t
            for t in inline
        ]
    elif inline is not None:
        inline = template
    if inline != config.get("chat_template"):
        tokenizer_config.write_text(json.dumps({**config, "chat_template": inline}, indent=2) + "\n")


def _check_overwritable(out_dir: Path) -> None:
    """`--overwrite` replaces an earlier export, and only what it wrote there (exports write no folder).

    Raises:
        UserError: OUT is not an export, or holds files or folders its export did not write.
    """
    check_replaceable(out_dir, "OUT", (EXPORT_REPORT,), "an export made by qpissa export")
    # a kill right after `finish_partial`'s rename leaves the build marker in OUT
    check_only_own(out_dir, EXPORT_REPORT, {PARTIAL_MARKER}, set(), "export")


def _write(
    run: Path,
    source: ModelSource,
    residual: Residual,
    architecture: Architecture,
    trained: Adapter,
    lora_inputs: LoraInputs | None,
    partial: Path,
    dtype: torch.dtype,
    settings: ExportSettings,
    show_progress: bool,
) -> dict:
    """Write the export into `partial` and verify it; return its report (all but the total time)."""
    started = time.perf_counter()
    bar = tqdm(total=len(trained.shapes), unit="matrix", desc=f"export {settings.to.value}",
               disable=None if show_progress else True)  # fmt: skip
    try:
        if lora_inputs is None:
            shard_bytes = (settings.shard_size_mb or 2048) * 1_000_000
            details = _write_merged(residual, architecture, trained, partial, dtype, shard_bytes, bar)
        else:
            details = write_lora(
                residual, architecture, trained, lora_inputs, partial, dtype, settings.rank, bar
            )
    finally:
        bar.close()
    template = saved_chat_template(source.adapter_dir, source.run_dir)  # the run's own, if it set one
    if template is not None:
        save_chat_template(template, partial)
        _replace_inline_template(partial / "tokenizer_config.json", template)
    write_seconds, write_peak_mb = time.perf_counter() - started, peak_rss_mb()
    report = {
        "kind": settings.to.value,
        "source": {
            "run": str(run.resolve()),
            "base_dir": str(source.base_dir),
            "adapter_dir": str(source.adapter_dir),
        },
        "conversion": _conversion(source.base_dir),
        "data": _run_data(source),
        "settings": to_dict(settings),
        "dtype": dtype_name(dtype),
        "matrices": len(trained.shapes),
        "details": details,
        **_verify(source, partial, details, settings.verify),
        "write_seconds": write_seconds,
        "peak_rss_mb_write": write_peak_mb,  # before --verify loads models
        "versions": {"qpissa": qpissa.__version__, "torch": torch.__version__},
    }
    return report


def _conversion(base_dir: Path) -> dict | None:
    """The fingerprint of the conversion exported, as a run's marker records it: by it `qpissa report` tells
    a conversion redone in `base_dir` since; None for a model directory with an adapter/ (no conversion)."""
    return read_report(base_dir)["fingerprint"] if (base_dir / REPORT_NAME).is_file() else None


def _verify(source: ModelSource, partial: Path, details: dict, verify: bool) -> dict:
    """The report's `verify` (the check's numbers, or None) and `verify_skipped` (why there are none).

    Running out of memory in the check leaves the export whole: it is kept, and said unverified.
    """
    if not verify:
        return {"verify": None, "verify_skipped": "--no-verify"}
    try:
        return {"verify": verify_export(source, partial, details), "verify_skipped": None}
    except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
        if not out_of_memory(error):
            raise
        return {
            "verify": None,
            "verify_skipped": f"the check ran out of memory ({error_reason(error)})",
        }


def _run_data(source: ModelSource) -> dict | None:
    """The run's data settings (format, max_seq_len, training data) as its marker records them, for
    `qpissa eval` of the export to read its data as it would for the run; None without a run."""
    return None if source.run_dir is None else run_data_settings(source.run_dir)


def _check_fits(adapter: Adapter, residual: Residual, architecture: Architecture) -> None:
    """Every adapted module (a model name) exists in the residual (under its stored name) with the
    adapter's `(out, in)`."""
    stored = architecture.stored_names()
    wrong = []
    for module, shape in adapter.shapes.items():
        found = residual.shape(stored.get(module, module))
        if found != shape:
            wrong.append(f"{module} (adapter {list(shape)}, residual {list(found) if found else 'missing'})")
    if wrong:
        raise UserError(
            f"adapter {adapter.path} does not fit the model in {residual.reader.model_dir}: "
            f"{', '.join(wrong[:3])}{' …' if len(wrong) > 3 else ''}; "
            "the run was trained on another QPiSSA directory"
        )


def _resolve_dtype(settings: ExportSettings, reader: CheckpointReader) -> torch.dtype:
    """The asked dtype; else float32 for a LoRA, and for a merged model the one config.json names, or,
    where it names none, the one its largest unquantized tensor (the embeddings, mostly) is stored in."""
    if settings.dtype is not OutputDtype.AUTO:
        return getattr(torch, settings.dtype.value)
    if settings.to is ExportKind.LORA:
        return torch.float32
    kept = (torch.bfloat16, torch.float16, torch.float32)
    name = reader.config.get("dtype") or reader.config.get("torch_dtype")
    if name is not None:
        return getattr(torch, name) if name in ("bfloat16", "float16", "float32") else torch.bfloat16
    floats = [
        n for n in reader.names()
        if reader.dtype_code(n) in FLOAT_DTYPES and not any(m in n for m in QUANTIZED_KEY_MARKERS)
    ]  # fmt: skip
    largest = max(floats, key=lambda n: math.prod(reader.shape(n)), default=None)
    stored = FLOAT_DTYPES[reader.dtype_code(largest)] if largest else None
    return stored if stored in kept else torch.bfloat16


def _write_merged(
    residual: Residual,
    architecture: Architecture,
    adapter: Adapter,
    partial: Path,
    dtype: torch.dtype,
    shard_bytes: int,
    bar: tqdm,
) -> dict:
    """Write `deq(Q) + s·B'·A'` for adapted layers, every other tensor cast to `dtype`, config, side files.

    Tensors keep the QPiSSA directory's (the original checkpoint's) names and layout: a `Conv1D`'s
    merged weight is stored `[in, out]` again.
    """
    reader = residual.reader
    adapted = {architecture.stored_names().get(module, module): module for module in adapter.shapes}
    shards = ShardedWriter(partial, shard_bytes)
    for name in reader.names():
        if residual.is_quant_aux(name):
            continue
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and (module in adapted or module in residual.quantized):
            W = residual.weight(module)  # [out, in] float32
            if module in adapted:
                A, B = adapter.factors(adapted[module])  # [r, in], [out, r]
                W = W + adapter.scale * (B @ A)  # merge in float32, round once
                bar.update(1)
            shards.add(name, architecture.swap_layout(module, W).to(dtype))
        else:
            # embeddings (tied lm_head included), norms: unchanged but for the dtype
            tensor = reader.read(name)
            shards.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    files = shards.close()
    config = {key: value for key, value in reader.config.items() if key != "quantization_config"}
    config["dtype"] = dtype_name(dtype)
    if "torch_dtype" in config:  # transformers 4's name, still read by tools of its time: the same value
        config["torch_dtype"] = config["dtype"]
    write_json(partial / CONFIG_NAME, config)
    copy_side_files(reader.model_dir, partial)
    for path in partial.glob(OWN_JSON):  # our reports describe the QPiSSA dir, not this model
        path.unlink()
    return {"shards": files, "tie_word_embeddings": bool(config.get("tie_word_embeddings", False))}
