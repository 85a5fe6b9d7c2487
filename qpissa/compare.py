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
    CALIBRATED_DIR_SUFFIX,
    COMPARE_NAME,
    CONVERSIONS_DIR,
    FIDELITY_NAME,
    REPORT_NAME,
    RUNS_DIR,
    ModelSource,
    partial_dir,
    read_json,
    read_report,
)
from qpissa.calibration import OVERLAP_NGRAM, calibration_of, overlap_tokens
from qpissa.checkpoint import CheckpointReader, auto_config, write_json
from qpissa.compare_train import check_train_config, train_step
from qpissa.convert import check_conversion, convert
from qpissa.convert_output import ChangedCheckpoint
from qpissa.convert_settings import CompareSettings, ConvertSettings, Method
from qpissa.loading import check_causal_lm, check_context, load_model, load_tokenizer
from qpissa.model_source import resolve_source
from qpissa.options import to_dict
from qpissa.original_kl import check_heldout, heldout_ids, measure_fidelity
from qpissa.output_lock import lock_output
from qpissa.outputs import check_apart, resolve_output
from qpissa.report import build_report
from qpissa.settings import FidelitySettings, ReportOptions
from qpissa.targets import check_cpu_decoding
from qpissa.worker import in_fresh_process

log = logging.getLogger(__name__)

OWN_DIRS = (CONVERSIONS_DIR, RUNS_DIR)


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
    _check_calibration(model_dir, convert_settings, fidelity_settings)  # and bad --calib data too
    if settings.train is not None:
        check_train_config(settings.train, out_dir, model_dir)
    for variant in _variants(settings.method_list, convert_settings).values():  # before OUT is written:
        _, plan, _ = check_conversion(model_dir, variant)  # the targets, rank and device
        check_cpu_decoding(plan, variant.blocksize, "cpu")  # fidelity loads every conversion on the CPU
        layer = report_options.layer if report_options else None
        if layer is not None and layer not in plan.names:  # the report's spectrum, drawn at the very end
            raise UserError(
                f"--layer {layer} is not a matrix the conversions decompose; e.g. --layer {plan.names[0]}"
            )
    with lock_output(out_dir, "OUT"):  # one writer per comparison
        return _compare(
            model_dir, out_dir, settings, convert_settings, fidelity_settings, report_options, show_progress
        )


def _compare(
    model_dir: Path,
    out_dir: Path,
    settings: CompareSettings,
    convert_settings: ConvertSettings,
    fidelity_settings: FidelitySettings,
    report_options: ReportOptions | None,
    show_progress: bool,
) -> dict:
    """`compare` while this process holds OUT's lock."""
    record = _prepare_output(out_dir, _fingerprint(model_dir, convert_settings))
    variants = _variants(_compared_methods(out_dir, record, settings.method_list), convert_settings)
    record["methods"] += [name for name in variants if name not in record["methods"]]
    run = {"started": time.strftime("%Y-%m-%dT%H:%M:%S"), "finished": None, "steps": []}
    record["history"].append(run)
    write_json(out_dir / COMPARE_NAME, record)  # from here on, an interrupted comparison can be continued
    for name, variant in variants.items():
        _record(out_dir, record, [_convert_step(model_dir, out_dir, name, variant, show_progress)])
    _record(
        out_dir, record, _fidelity_steps(model_dir, out_dir, list(variants), fidelity_settings, show_progress)
    )
    for name in variants if settings.train is not None else []:
        run_dir, status, seconds = train_step(out_dir, name, settings.train, show_progress)
        _record(out_dir, record, [_step(name, "train", run_dir, status, seconds)])
    build_report([out_dir], out_dir, report_options or ReportOptions())
    run["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    write_json(out_dir / COMPARE_NAME, record)
    return record


def _compared_methods(out_dir: Path, record: dict, asked: list[Method]) -> list[Method]:
    """The methods of an earlier run of OUT, then the new ones asked now: the report shows every method
    OUT holds, so each is measured (and trained) with this run's settings, not left with older ones.

    Raises:
        UserError: compare.json names a method qpissa does not know (it was edited or damaged).
    """
    known = {method.value for method in Method}
    earlier = [str(name).removesuffix(CALIBRATED_DIR_SUFFIX) for name in record["methods"]]
    unknown = [name for name in earlier if name not in known]
    if unknown:
        raise UserError(
            f"{out_dir / COMPARE_NAME} names unknown methods ({', '.join(unknown)}); it is written by "
            "`qpissa compare`: choose a new OUT"
        )
    methods = list(dict.fromkeys([*map(Method, earlier), *asked]))
    kept = [method.value for method in methods if method not in asked]
    if kept:
        log.info(
            "%s holds %s from an earlier run as well: compared too, with this run's fidelity settings "
            "(and --train)", out_dir, ", ".join(kept),
        )  # fmt: skip
    return methods


def _variants(methods: list[Method], base: ConvertSettings) -> dict[str, ConvertSettings]:
    """The conversions to compare, by directory name: each method data-free, and with `--calib` also
    calibrated (`<method>-calib`); everything else shared."""
    data_free = {f.name: None for f in dataclasses.fields(base) if f.name.startswith("calib")}
    variants = {}
    for method in methods:
        settings = dataclasses.replace(
            base, method=method, iters=None if method is Method.QLORA else base.iters
        )
        variants[method.value] = dataclasses.replace(settings, **data_free)
        if base.calib is not None:
            variants[method.value + CALIBRATED_DIR_SUFFIX] = settings
    return variants


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
    """Check a finished conversion against `settings` as `convert --resume` does, without its note."""
    notes = logging.getLogger(convert.__module__)
    level = notes.level
    notes.setLevel(max(logging.WARNING, notes.getEffectiveLevel()))  # its warnings still show
    try:
        convert(model_dir, target, settings, resume=True)
    except ChangedCheckpoint as changed:  # compare has no --overwrite: every step read the old MODEL
        raise UserError(
            f"{changed.what}; compare into another OUT, or remove {target.parent.parent}"
        ) from None
    finally:
        notes.setLevel(level)


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


def _check_calibration(model_dir: Path, settings: ConvertSettings, fidelity: FidelitySettings) -> None:
    """Read `--calib` now (a bad file fails before any conversion) and warn if it overlaps the held-out
    text: fidelity must be measured on text the calibration did not see."""
    if settings.calibration is None:
        return
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


def _fingerprint(model_dir: Path, convert_settings: ConvertSettings) -> dict:
    """What an existing OUT must match to be continued: the model and the shared conversion settings
    (methods may be added; fidelity and training steps check their own inputs)."""
    shared = {k: v for k, v in convert_settings.output_settings().items() if k != "method"}
    return {"model": str(model_dir.resolve()), "convert": shared}


def _mismatch(out_dir: Path, before: dict, now: dict) -> str:
    """Why OUT's comparison cannot be continued, in the options the user gives (`--rank 4`, `no --calib`,
    `the default --iters`), and how to go on."""
    if before.get("model") != now["model"]:
        return (
            f"{out_dir} holds a comparison of another model ({before.get('model')}); rerun with that MODEL "
            "to continue it, or choose another OUT"
        )
    earlier, asked = _as_given(before.get("convert", {})), _as_given(now["convert"])
    calibrated = earlier.get("calib") is not None and asked.get("calib") is not None
    keys = [key for key in dict.fromkeys([*asked, *earlier]) if calibrated or not key.startswith("calib_")]
    changed = [key for key in keys if earlier.get(key) != asked.get(key)]  # calib_*: only beside --calib
    if not changed:
        return f"{out_dir} holds a comparison made with other settings; choose another OUT"
    made = ", ".join(_option(key, earlier.get(key)) for key in changed)
    wanted = ", ".join(_option(key, asked.get(key)) for key in changed)
    return (
        f"{out_dir} holds a comparison made with {made}, where this run asks for {wanted}; rerun with the "
        "earlier options to continue it, or choose another OUT for these"
    )


def _as_given(convert_settings: dict) -> dict:
    """Recorded conversion settings as a user gives them: the recorded --power-iters is resolved, and is
    None here where it is the default of its --calib (4 without, 2 with), which nobody passed."""
    default = ConvertSettings(calib=convert_settings.get("calib")).resolved_power_iters
    if convert_settings.get("power_iters") == default:
        return convert_settings | {"power_iters": None}
    return convert_settings


def _option(key: str, value: object) -> str:
    """One setting as its flag reads: `--rank 4`, `--no-double-quant`, `no --calib`, `the default --iters`."""
    flag = "--" + key.replace("_", "-")
    if value is None:
        return f"no {flag}" if key == "calib" else f"the default {flag}"
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"{flag} {value}"


def _prepare_output(out_dir: Path, fingerprint: dict) -> dict:
    """Load the record of an earlier comparison with the same settings, or start a new one."""
    record_path = out_dir / COMPARE_NAME
    if record_path.is_file():
        fix = (
            f"to continue, keep {CONVERSIONS_DIR}/ and {RUNS_DIR}/ in {out_dir} and delete the rest (each "
            "conversion and run is checked and reused), or choose a new OUT"
        )
        record = read_json(record_path, fix, required=("fingerprint", "history", "methods"))
        if record["fingerprint"] != fingerprint:
            raise UserError(_mismatch(out_dir, record["fingerprint"], fingerprint))
        return record
    # a directory holding only conversions/ and runs/ is a comparison begun elsewhere (or before compare.json
    # was written): continue it; each conversion and run is still checked against the settings
    if out_dir.exists() and (not out_dir.is_dir() or any(p.name not in OWN_DIRS for p in out_dir.iterdir())):
        raise UserError(f"{out_dir} exists and is not a comparison directory; choose a new or empty OUT")
    out_dir.mkdir(parents=True, exist_ok=True)
    return {"fingerprint": fingerprint, "history": [], "methods": []}


def _record(out_dir: Path, record: dict, steps: list[dict]) -> None:
    """Log finished steps in compare.json at once, so the record is true even if a later step fails."""
    record["history"][-1]["steps"] += steps
    write_json(out_dir / COMPARE_NAME, record)


def _step(name: str, step: str, path: Path, status: str, seconds: float) -> dict:
    return {"method": name, "step": step, "path": str(path), "status": status, "seconds": seconds}
