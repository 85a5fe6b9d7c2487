"""`qpissa compare`: convert one model with each method, measure fidelity, optionally train, report.

Every method goes through the same converter, quantizer, seed, fidelity measurement and training
config, so the comparison differs only in the method (DESIGN.md principle 4). OUT holds

    conversions/<method>/      QPiSSA directories (+ qpissa_fidelity.json); with --calib also
                               conversions/<method>-calib/, each method calibrated
    runs/<method>/             training runs (with --train), likewise
    compare.json               settings and a log of every step: done now, or reused
    report.md, report.html, summary.json, *.png

Each step is skipped when its result is already in OUT with the same inputs, so a re-run (or a run
that was interrupted) redoes nothing that is finished. A re-run continues one comparison: its --methods
add to those OUT holds, and every method's fidelity (and, with --train, its run) is brought to this
run's settings, so that one report never mixes measurements made under different ones. Conversions and
training runs execute in a fresh process each, so their recorded peak memory is theirs alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path

import torch

from qpissa import UserError
from qpissa.artifacts import (
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    COMPARE_NAME,
    CONVERSIONS_DIR,
    FIDELITY_NAME,
    REPORT_NAME,
    ModelSource,
    partial_dir,
    read_json,
    read_report,
)
from qpissa.calibration import OVERLAP_NGRAM, calibration_of, overlap_tokens
from qpissa.checkpoint import SHARD_GLOB, CheckpointReader, auto_config, write_json
from qpissa.compare_record import (
    compared_methods,
    fingerprint,
    finished_methods,
    prepare_output,
    record_steps,
    variants,
)
from qpissa.compare_train import check_train_config, train_step
from qpissa.convert import check_conversion, convert
from qpissa.convert_output import ChangedCheckpoint
from qpissa.convert_settings import CompareSettings, ConvertSettings
from qpissa.loading import check_causal_lm, check_context, load_model, load_tokenizer
from qpissa.model_source import resolve_source
from qpissa.options import to_dict
from qpissa.original_kl import check_heldout, heldout_ids, measure_fidelity
from qpissa.output_lock import lock_output
from qpissa.outputs import check_apart, resolve_output
from qpissa.report import build_report
from qpissa.safetensors_file import read_header
from qpissa.settings import FidelitySettings, ReportOptions
from qpissa.targets import check_cpu_decoding
from qpissa.worker import in_fresh_process

log = logging.getLogger(__name__)

# per-token KL is heavy-tailed (a few tokens carry most of it): its mean over fewer tokens than this is off by
# a fifth or more, as much as the methods' KLs differ
MIN_FIDELITY_TOKENS = 256


def compare(
    model_dir: Path,
    out_dir: Path,
    settings: CompareSettings,
    convert_settings: ConvertSettings,
    fidelity_settings: FidelitySettings,
    *,
    report_options: ReportOptions | None = None,
    show_progress: bool = True,
) -> dict:
    """Run (or finish) a comparison in `out_dir` and write its report there.

    Args:
        model_dir: the full-precision Hugging Face checkpoint.
        out_dir: the comparison directory (created; an earlier comparison with the same settings is reused).
        settings: methods and optional training config.
        convert_settings: rank, iterations, quantizer, seed... shared by all methods (`method` is ignored).
        fidelity_settings: held-out text and window sizes.
        report_options: how to draw the report (default: the `qpissa report` defaults).
        show_progress: progress bars on a terminal.

    Returns:
        The contents of `compare.json`: settings and the steps of this invocation and earlier ones.

    Raises:
        UserError: bad inputs, or `out_dir` holds something else or a comparison with other settings.
    """
    out_dir = resolve_output(out_dir, "OUT")  # a link is written through
    CheckpointReader(model_dir)  # fails early, with a clear message, on a missing or broken model
    check_causal_lm(model_dir)  # its fidelity is measured on next-token distributions
    check_context(model_dir, fidelity_settings.window, "--window")
    inputs = {"MODEL": model_dir, "--text": fidelity_settings.text, "--train": settings.train,
              "--calib": convert_settings.calib}  # fmt: skip
    check_apart(out_dir, "OUT", inputs)
    check_heldout(model_dir, fidelity_settings)  # a bad --text fails now, not after the conversions
    _warn_few_tokens(model_dir, fidelity_settings)
    calib_sha256 = _check_calibration(model_dir, convert_settings, fidelity_settings)  # bad --calib data too
    if settings.train is not None:
        check_train_config(settings.train, out_dir, model_dir)
    for variant in variants(settings.method_list, convert_settings).values():  # before OUT is written:
        _, plan, _ = check_conversion(model_dir, variant)  # the targets, rank and device
        check_cpu_decoding(plan, variant.blocksize, "cpu")  # fidelity loads every conversion on the CPU
        layer = report_options.layer if report_options else None
        if layer is not None and layer not in plan.names:  # the report's spectrum, drawn at the very end
            raise UserError(
                f"--layer {layer} is not a matrix the conversions decompose; e.g. --layer {plan.names[0]}"
            )
    recorded = fingerprint(model_dir, convert_settings, calib_sha256)
    with lock_output(out_dir, "OUT"):  # one writer per comparison
        return _compare(
            model_dir, out_dir, recorded, settings, convert_settings, fidelity_settings, report_options,
            show_progress,
        )  # fmt: skip


def _compare(
    model_dir: Path,
    out_dir: Path,
    recorded: dict,
    settings: CompareSettings,
    convert_settings: ConvertSettings,
    fidelity_settings: FidelitySettings,
    report_options: ReportOptions | None,
    show_progress: bool,
) -> dict:
    """`compare` while this process holds OUT's lock (`recorded`: the fingerprint its record must match)."""
    record = prepare_output(out_dir, recorded)
    compared = variants(compared_methods(out_dir, record, settings.method_list), convert_settings)
    record["methods"] = finished_methods(out_dir, record)  # each other one once its conversion is finished
    run = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "finished": None, "steps": []}
    record["history"].append(run)
    write_json(out_dir / COMPARE_NAME, record)  # from here on, an interrupted comparison can be continued
    for name, variant in compared.items():
        step = _convert_step(model_dir, out_dir, name, variant, show_progress)
        record["methods"] += [] if name in record["methods"] else [name]
        record_steps(out_dir, record, [step])
    names = list(compared)
    measured = _fidelity_steps(model_dir, out_dir, names, fidelity_settings, show_progress)
    record_steps(out_dir, record, measured)
    for name in names if settings.train is not None else []:
        run_dir, status, seconds = train_step(out_dir, name, settings.train, show_progress)
        record_steps(out_dir, record, [_step(name, "train", run_dir, status, seconds)])
    build_report([out_dir], out_dir, report_options or ReportOptions())
    run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json(out_dir / COMPARE_NAME, record)
    return record


def _convert_step(
    model_dir: Path, out_dir: Path, name: str, settings: ConvertSettings, show_progress: bool
) -> dict:
    """Convert one variant, unless a finished conversion with identical settings is already there."""
    target = out_dir / CONVERSIONS_DIR / name
    if (target / REPORT_NAME).is_file():
        _check_finished(model_dir, target, settings)
        log.info("%s: converted already, with the same settings; reused", target)
        return _step(name, "convert", target, "reused", 0.0)
    started = time.perf_counter()
    interrupted = partial_dir(target).exists()  # continued; else no note on a --resume nobody passed
    log.info("%s %s -> %s", "continuing" if interrupted else "converting", name, target)
    in_fresh_process(convert, model_dir, target, settings, resume=interrupted, show_progress=show_progress)
    return _step(name, "convert", target, "done", time.perf_counter() - started)


def _check_finished(model_dir: Path, target: Path, settings: ConvertSettings) -> None:
    """Check a finished conversion against `settings` as `convert --resume` does, without its note, and its
    weight files whole (the report and training read them).

    Raises:
        UserError: with compare's fix, not convert's (compare has no --overwrite): the conversion is
            removed and done again, or the comparison goes into another OUT.
    """
    notes = logging.getLogger(convert.__module__)
    level = notes.level
    notes.setLevel(max(logging.WARNING, notes.getEffectiveLevel()))  # its warnings still show
    redo = f"remove {target} and rerun to convert it again, or compare into another OUT"
    try:
        convert(model_dir, target, settings, resume=True)
        for weights in [*target.glob(SHARD_GLOB), target / ADAPTER_DIR / ADAPTER_WEIGHTS]:
            read_header(weights, redo)
    except ChangedCheckpoint as changed:  # every step read the old MODEL: the whole comparison is stale
        raise UserError(
            f"{changed.what}; compare into another OUT, or remove {target.parent.parent}"
        ) from None
    except UserError as refused:
        raise UserError(f"{_without_fix(str(refused))}; {redo}") from None
    finally:
        notes.setLevel(level)


def _without_fix(message: str) -> str:
    """A refusal of `convert` without its fix (`...; use --overwrite to replace it`), which is convert's:
    every qpissa refusal ends in `; FIX`."""
    return message.rsplit("; ", 1)[0]


def _fidelity_steps(
    model_dir: Path, out_dir: Path, names: list[str], settings: FidelitySettings, show_progress: bool
) -> list[dict]:
    """Measure each conversion against the original; load the original only if anything is left to measure."""
    vocab_size = auto_config(model_dir).get_text_config().vocab_size
    ids, source = heldout_ids(model_dir, settings, vocab_size)
    key = {"ids_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(), "settings": to_dict(settings)}
    steps, original = [], None
    for name in names:
        target = out_dir / CONVERSIONS_DIR / name
        key_here = {**key, "conversion": read_report(target)["fingerprint"]}
        path = target / FIDELITY_NAME
        measured = _measured_key(path)
        if measured == key_here:
            steps.append(_step(name, "fidelity", path, "reused", 0.0))
            continue
        if measured is not None:
            log.info("%s was measured with other fidelity settings or text: measuring it again", path)
        log.info("measuring %s against the original model on %s", name, source)
        if original is None:
            original = load_model(ModelSource(model_dir, None), compute_dtype=torch.float32)
        model = load_model(resolve_source(target), compute_dtype=torch.float32)
        result = measure_fidelity(original, model, ids, settings, show_progress)
        del model
        write_json(path, {"key": key_here, "data": source, **dataclasses.asdict(result)})
        steps.append(_step(name, "fidelity", path, "done", result.seconds))
    return steps


def _measured_key(path: Path) -> dict | None:
    """The key a saved fidelity measurement was made under; None when there is none or it is damaged
    (it is then measured again)."""
    try:
        return read_json(path, "it is measured again").get("key") if path.is_file() else None
    except UserError:
        return None


def _check_calibration(model_dir: Path, settings: ConvertSettings, fidelity: FidelitySettings) -> str | None:
    """Read `--calib` now (a bad file fails before any conversion) and warn if it overlaps the held-out
    text: fidelity must be measured on text the calibration did not see.

    Returns:
        The hash of the token windows drawn (the data as a conversion records it); None without --calib.
    """
    if settings.calibration is None:
        return None
    tokenizer = load_tokenizer(ModelSource(model_dir, None))
    tokens = calibration_of(settings, tokenizer)
    ids, source = heldout_ids(model_dir, fidelity, tokenizer.vocab_size)
    shared = overlap_tokens(tokens.windows, ids)
    if shared:
        log.warning(
            "%d of the %d held-out tokens (%s) lie in runs of %d tokens that also occur in --calib %s: "
            "fidelity measured on them overstates what calibration does for unseen text; pass another --text",
            shared, len(ids), source, OVERLAP_NGRAM, settings.calib,
        )  # fmt: skip
    return tokens.sha256


def _warn_few_tokens(model_dir: Path, settings: FidelitySettings) -> None:
    """Warn, before any conversion, when the held-out text is too short for its mean KL to rank methods."""
    ids, source = heldout_ids(model_dir, settings, auto_config(model_dir).get_text_config().vocab_size)
    if len(ids) < MIN_FIDELITY_TOKENS:
        log.warning(
            "fidelity is measured on %s, fewer than %d: a mean token KL over so few varies more than the "
            "methods differ; pass a longer --text (or a larger --max-tokens)", source, MIN_FIDELITY_TOKENS,
        )  # fmt: skip


def _step(name: str, step: str, path: Path, status: str, seconds: float) -> dict:
    return {"method": name, "step": step, "path": str(path), "status": status, "seconds": seconds}
