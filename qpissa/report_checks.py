"""What `qpissa report` reads, checked as it is read: a damaged record is one line naming its file, not a
traceback deep in the tables; conversions of one model are told by their weights, not by its path; and an
original model changed since its conversion is told, so that no number is computed from the wrong weights.
"""

from __future__ import annotations

import filecmp
import json
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qpissa import UserError
from qpissa.artifacts import CONFIG_NAME, REPORT_NAME, RUN_MARKER, read_json, read_jsonl, read_report
from qpissa.checkpoint import CheckpointReader
from qpissa.convert_settings import Method

# the JSON types of the fields the report reads: (Python types, how the error names them)
TEXT = ((str,), "a string")
TEXT_OR_NULL = ((str, type(None)), "a string or null")
INTEGER = ((int,), "an integer")
NUMBER = ((int, float), "a number")
NUMBER_OR_NULL = ((int, float, type(None)), "a number or null")
OBJECT = ((dict,), "an object")
OBJECT_OR_NULL = ((dict, type(None)), "an object or null")
ARRAY = ((list,), "an array")
ARRAY_OR_NULL = ((list, type(None)), "an array or null")

# the fields of qpissa_report.json the report reads; a name ending in `?` may be left out
FINGERPRINT = {"model": TEXT, "settings": OBJECT, "checkpoint?": OBJECT_OR_NULL}
SETTINGS = {"method": TEXT, "rank": INTEGER, "iters": INTEGER, "alpha": NUMBER,
            "calibration?": OBJECT_OR_NULL}  # fmt: skip
CALIBRATION = {"source": TEXT, "tokens": INTEGER, "seq_len": INTEGER}
LAYER = {"name": TEXT, "shape": ARRAY, "err_fro_base": NUMBER, "reduction_fro": NUMBER_OR_NULL,
         "reduction_nuc": NUMBER_OR_NULL}  # fmt: skip
SUMMARY = {"avg": NUMBER_OR_NULL, "avg_fro": NUMBER_OR_NULL, "by_type": OBJECT_OR_NULL, "by_type_fro": OBJECT,
           "total_seconds": NUMBER, "peak_rss_mb": NUMBER, "peak_gpu_mb?": NUMBER_OR_NULL,
           "avg_out?": NUMBER_OR_NULL, "by_type_out?": OBJECT_OR_NULL}  # fmt: skip
# qpissa_fidelity.json, written by `qpissa compare` into each conversion it measured
FIDELITY = {"kl": NUMBER, "top1": NUMBER, "ppl_original": NUMBER, "ppl_model": NUMBER, "tokens": INTEGER,
            "data": TEXT, "key?": OBJECT_OR_NULL}  # fmt: skip
FIDELITY_KEY = {"settings?": OBJECT_OR_NULL, "ids_sha256?": TEXT_OR_NULL}
# export_report.json: where the export came from (and, since it is recorded, the conversion's fingerprint)
EXPORT = {"source": OBJECT, "conversion?": OBJECT_OR_NULL, "verify?": OBJECT_OR_NULL}
EXPORT_SOURCE = {"base_dir?": TEXT, "run?": TEXT_OR_NULL}

# qpissa_run.json: what the report's line on a run's recipe reads there
RUN = {"config": OBJECT, "processes": OBJECT, "runtime?": OBJECT_OR_NULL}
RUN_CONFIG = {"data": OBJECT, "max_steps": NUMBER, "num_train_epochs": NUMBER, "learning_rate": NUMBER,
              "seed": NUMBER, "trainer?": OBJECT_OR_NULL}  # fmt: skip
RUN_DATA = {"path": TEXT_OR_NULL, "eval_path": TEXT_OR_NULL, "max_seq_len": NUMBER, "sources?": ARRAY_OR_NULL}
RUN_PROCESSES = {"global_batch_size": NUMBER}
# the fingerprint a run (or an export) is matched to its conversion by, and its model told by
RUN_CONVERSION = {"model?": TEXT, "settings": OBJECT, "checkpoint?": OBJECT_OR_NULL}
# eval_results.json: what the report shows of a run's final evaluation
EVAL_RESULTS = {"loss?": NUMBER_OR_NULL, "accuracy?": NUMBER_OR_NULL}
# a trainer_log.jsonl line: what the report reads besides its step and loss, which `read_jsonl` checks
LOG_LINE = {"tokens_per_second?": NUMBER_OR_NULL, "peak_memory_mb?": NUMBER_OR_NULL}

CONVERT_AGAIN = "it is written by `qpissa convert`: convert again into a new directory"
# with the weights, these settings alone decide each matrix's plain-NF4 error (err_fro_base)
QUANTIZER = ("blocksize", "double_quant", "svd_dtype")
# one model's plain-NF4 error as measured on another device or thread count differs by ~1e-6 relative;
# another model's (another seed, a fine-tune) by far more
NF4_ERROR_TOLERANCE = 1e-3
log = logging.getLogger(__name__)


def read_conversion(qpissa_dir: Path) -> dict:
    """`qpissa_report.json` with every field the report reads there and of its type.

    Raises:
        UserError: naming the file and the first field missing, of another type or out of range.
    """
    report = read_report(qpissa_dir)
    problem = next((problem for problem in _conversion_problems(report) if problem), None)
    if problem:
        raise UserError(f"{qpissa_dir / REPORT_NAME} is damaged ({problem}); {CONVERT_AGAIN}")
    return report


def read_fidelity(path: Path) -> dict:
    """A conversion's `qpissa_fidelity.json`, with the numbers the report shows."""
    fix = "it is written by `qpissa compare`: delete it (the report leaves the fidelity out) or compare again"
    return _read_checked(path, fix, lambda r: _problem(r, FIDELITY, "")
                         or _problem(r.get("key") or {}, FIDELITY_KEY, "key"))  # fmt: skip


def read_export(path: Path) -> dict:
    """An export's `export_report.json`, with what the report reads there (its source, its check, the
    fingerprint of the conversion it was made from)."""
    fix = "it is written by `qpissa export`: export again with --overwrite"
    return _read_checked(path, fix, lambda r: _problem(r, EXPORT, "")
                         or _problem(r["source"], EXPORT_SOURCE, "source")
                         or _fingerprint_problem(r.get("conversion"), "conversion"))  # fmt: skip


def read_eval_results(path: Path) -> dict:
    """A run's `eval_results.json`, with the numbers the report shows (loss, accuracy)."""
    fix = "it is written by `qpissa train`: delete it (the report then says the evaluation is missing)"
    return _read_checked(path, fix, lambda r: _problem(r, EVAL_RESULTS, ""))


def read_training_log(path: Path) -> list[dict]:
    """A run's `trainer_log.jsonl`, each line with the numbers the report shows (throughput, memory).

    Raises:
        UserError: naming the file, the step and the field.
    """
    steps = read_jsonl(path, required=("step", "loss"))
    problem = next((f"step {row['step']}'s {found}" for row in steps
                    if (found := _problem(row, LOG_LINE, ""))), None)  # fmt: skip
    if problem:
        fix = "it is written by `qpissa train`: correct or delete that line, or leave the run out"
        raise UserError(f"{path} is damaged ({problem}); {fix}")
    return steps


def read_run_record(run_dir: Path) -> dict:
    """A run's `qpissa_run.json`, with what the report reads there (its recipe, its global batch)."""
    fix = "it is written by `qpissa train`: leave the run out, or train again into a new output_dir"
    return _read_checked(run_dir / RUN_MARKER, fix, _run_problem)


def _read_checked(path: Path, fix: str, problem_of: Callable[[dict], str | None]) -> dict:
    """A qpissa JSON record whose fields `problem_of` finds right (it names the first that is not).

    Raises:
        UserError: naming the file, the field and `fix`.
    """
    record = read_json(path, fix)
    problem = problem_of(record)
    if problem:
        raise UserError(f"{path} is damaged ({problem}); {fix}")
    return record


def _run_problem(record: dict) -> str | None:
    """The first field of a run marker the report's recipe line reads that is missing or of another type."""
    problem = (
        _problem(record, RUN, "")
        or _problem(record["config"], RUN_CONFIG, "config")
        or _problem(record["config"]["data"], RUN_DATA, "config.data")
        or _problem(record["processes"], RUN_PROCESSES, "processes")
        or _fingerprint_problem(record.get("conversion"), "conversion")
    )
    if not problem and not (record["config"]["data"]["path"] or record["config"]["data"].get("sources")):
        return "`config.data` names neither a path nor sources"
    return problem


def _conversion_problems(report: dict) -> Iterator[str | None]:
    """What is wrong in a conversion's report, field by field (None: that one is right); a field is looked
    into only once the fields it lies in were found right."""
    yield _problem(report["fingerprint"], FINGERPRINT, "fingerprint")
    yield _stats_problem(report["fingerprint"], "fingerprint")
    settings = report["settings"]
    yield _problem(settings, SETTINGS, "settings")
    methods = [method.value for method in Method]
    if settings["method"] not in methods:
        yield f"`settings.method` is {_shown(settings['method'])}, not one of {', '.join(methods)}"
    yield None if settings["rank"] > 0 else f"`settings.rank` is {settings['rank']}, not positive"
    if settings.get("calibration") is not None:
        yield _problem(settings["calibration"], CALIBRATION, "settings.calibration")
    summary = report["summary"]
    yield _problem(summary, SUMMARY, "summary")
    for name in ("by_type", "by_type_fro", "by_type_out"):
        if not all(_is(value, NUMBER) for value in (summary.get(name) or {}).values()):
            yield f"`summary.{name}` holds a value that is not a number"
    yield None if report["layers"] else "`layers` is empty"
    for index, layer in enumerate(report["layers"]):
        yield _problem(layer, LAYER, f"layers[{index}]")
        if not _integers(layer["shape"], 2) or min(layer["shape"]) < 1:
            yield f"`layers[{index}].shape` is {_shown(layer['shape'])}, not [out, in]"


def _fingerprint_problem(fingerprint: Any, where: str) -> str | None:
    """What is wrong in the fingerprint of a conversion that a run or an export recorded (None: nothing, or
    none recorded, as before qpissa kept it)."""
    if fingerprint is None:
        return None
    return _problem(fingerprint, RUN_CONVERSION, where) or _stats_problem(fingerprint, where)


def _stats_problem(fingerprint: dict, where: str) -> str | None:
    """The first recorded model file whose stats are not [size, mtime]."""
    stats = fingerprint.get("checkpoint") or {}
    return next((f"`{where}.checkpoint.{name}` is {_shown(stat)}, not [size, mtime]"
                 for name, stat in stats.items() if not _integers(stat, 2)), None)  # fmt: skip


def _problem(record: Any, fields: dict[str, tuple], where: str) -> str | None:
    """The first of `fields` that `record` lacks or holds with another type, as the error says it."""
    if not isinstance(record, dict):
        return f"`{where}` is {_shown(record)}, not an object"
    for name, kind in fields.items():
        key = name.removesuffix("?")
        path = f"{where}.{key}" if where else key
        if key not in record and key == name:
            return f"`{path}` is missing"
        if key in record and not _is(record[key], kind):
            return f"`{path}` is {_shown(record[key])}, not {kind[1]}"
    return None


def _is(value: Any, kind: tuple) -> bool:
    """Whether a JSON value is of `kind` (true and false are no numbers, though Python's bool is an int)."""
    return isinstance(value, kind[0]) and not (isinstance(value, bool) and bool not in kind[0])


def _integers(value: Any, count: int) -> bool:
    """Whether a JSON value is a list of `count` integers (a shape, a file's [size, mtime])."""
    return isinstance(value, list) and len(value) == count and all(_is(item, INTEGER) for item in value)


def _shown(value: Any) -> str:
    """A JSON value as the error quotes it: its text, cut short."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def same_model(a: dict, b: dict) -> bool:
    """Whether two inputs were converted from one model: each a conversion's `qpissa_report.json`, or only
    the fingerprint of one (`{"fingerprint": ...}`), as a run or an export records the conversion it was
    made from.

    Not by its path alone: copies of a model at two paths are one model, and one path may hold two models
    one after the other. The recorded weight files' names and sizes must agree; with their modification
    times too they are the same files (a copy that kept them, or the model itself). Else each matrix's
    plain-NF4 error decides, which the weights alone decide where both used one quantizer; else the files
    themselves, where both are still there as converted; else the path. A conversion that predates the
    record of the files is matched by its path.
    """
    stats = [_weight_stats(record["fingerprint"]) for record in (a, b)]
    same_path = a["fingerprint"]["model"] == b["fingerprint"]["model"]
    if stats[0] is None or stats[1] is None:
        return same_path
    if _sizes(stats[0]) != _sizes(stats[1]):
        return False
    if stats[0] == stats[1]:
        return True
    errors = _same_nf4_errors(a, b)
    if errors is not None:
        return errors
    contents = _same_contents(a["fingerprint"], b["fingerprint"])
    return same_path if contents is None else contents


def _weight_stats(fingerprint: dict) -> dict[str, list[int]] | None:
    """The [size, mtime] of the model's weight files (shards and their index; not config.json, which an
    edit of its notes changes), as the conversion recorded them; None where it predates that record."""
    stats = fingerprint.get("checkpoint")
    if stats is None:
        return None
    return {name: stat for name, stat in stats.items() if name != CONFIG_NAME}


def _sizes(stats: dict[str, list[int]]) -> dict[str, int]:
    return {name: size for name, (size, _) in stats.items()}


def _same_nf4_errors(a: dict, b: dict) -> bool | None:
    """Whether two conversions' matrices have the plain-NF4 errors of one model's weights; None where that
    cannot tell (another quantizer, or a fingerprint alone, with no errors recorded)."""
    if "layers" not in a or "layers" not in b:
        return None
    if any(a["settings"].get(key) != b["settings"].get(key) for key in QUANTIZER):
        return None
    errors = {layer["name"]: layer["err_fro_base"] for layer in b["layers"]}
    return all(
        math.isclose(layer["err_fro_base"], errors[layer["name"]], rel_tol=NF4_ERROR_TOLERANCE)
        for layer in a["layers"]
        if layer["name"] in errors
    )


def _same_contents(a: dict, b: dict) -> bool | None:
    """Whether the weight files of two fingerprints' models hold the same bytes, where both are still there
    as converted (read whole: this is asked only where nothing recorded tells); None where one is not."""
    if any(reader is None or changes for reader, changes in map(read_original, (a, b))):
        return None
    models = [Path(fingerprint["model"]) for fingerprint in (a, b)]
    log.info("comparing the weights of %s and %s byte by byte: are they one model?", *models)
    names = _weight_stats(a) or {}
    return all(filecmp.cmp(models[0] / name, models[1] / name, shallow=False) for name in names)


def read_original(fingerprint: dict) -> tuple[CheckpointReader | None, str | None]:
    """The original model at a conversion's `fingerprint["model"]`, read as transformers loads it (the weight
    files it loads, not others beside them), and how it differs from the one converted, by the sizes and
    modification times of its files that the conversion recorded (as `convert --resume` tells a rewritten
    model): None where they match, or where the conversion predates that record; no reader where the
    model cannot be read now."""
    try:
        reader = CheckpointReader(Path(fingerprint["model"]))
    except UserError as error:
        return None, f"it is no checkpoint that can be read now: {error}"
    recorded = fingerprint.get("checkpoint")
    if recorded is None:
        return reader, None
    current = reader.file_stats()
    changed = sorted(name for name in {*recorded, *current} if recorded.get(name) != current.get(name))
    return reader, f"{', '.join(changed)}: another size or modification time" if changed else None
