"""What `qpissa report` reads, checked as it is read: a damaged record is one line naming its file, not a
traceback deep in the tables; conversions of one model are told by their weights, not by its path; and an
original model changed since its conversion is told, so that no number is computed from the wrong weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from qpissa import UserError
from qpissa.artifacts import CONFIG_NAME, REPORT_NAME, RUN_MARKER, read_json, read_report
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
RUN = {"config": OBJECT, "processes": OBJECT}
RUN_CONFIG = {"data": OBJECT, "max_steps": NUMBER, "num_train_epochs": NUMBER, "learning_rate": NUMBER,
              "seed": NUMBER}  # fmt: skip
RUN_DATA = {"path": TEXT_OR_NULL, "eval_path": TEXT_OR_NULL, "max_seq_len": NUMBER, "sources?": ARRAY_OR_NULL}
RUN_PROCESSES = {"global_batch_size": NUMBER}
RUN_CONVERSION = {"settings": OBJECT}  # the fingerprint a run is matched to its conversion by

CONVERT_AGAIN = "it is written by `qpissa convert`: convert again into a new directory"
# with the weights, these settings alone decide each matrix's plain-NF4 error (err_fro_base)
QUANTIZER = ("blocksize", "double_quant", "svd_dtype")
# one model's plain-NF4 error as measured on another device or thread count differs by ~1e-6 relative;
# another model's (another seed, a fine-tune) by far more
NF4_ERROR_TOLERANCE = 1e-3


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
    """An export's `export_report.json`, with what the report reads there (its source, its check)."""
    fix = "it is written by `qpissa export`: export again with --overwrite"
    return _read_checked(path, fix, lambda r: _problem(r, EXPORT, "")
                         or _problem(r["source"], EXPORT_SOURCE, "source"))  # fmt: skip


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
        or (_problem(record["conversion"], RUN_CONVERSION, "conversion") if "conversion" in record else None)
    )
    if not problem and not (record["config"]["data"]["path"] or record["config"]["data"].get("sources")):
        return "`config.data` names neither a path nor sources"
    return problem


def _conversion_problems(report: dict) -> Iterator[str | None]:
    """What is wrong in a conversion's report, field by field (None: that one is right); a field is looked
    into only once the fields it lies in were found right."""
    yield _problem(report["fingerprint"], FINGERPRINT, "fingerprint")
    stats = report["fingerprint"].get("checkpoint") or {}
    yield next((f"`fingerprint.checkpoint.{name}` is {_shown(stat)}, not [size, mtime]"
                for name, stat in stats.items() if not _integers(stat, 2)), None)  # fmt: skip
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
    """Whether two conversions (their `qpissa_report.json`) were converted from one model.

    Not by its path alone: copies of a model at two paths are one model, and one path may hold two models
    one after the other. The recorded weight files' names and sizes must agree; then each matrix's plain-NF4
    error, which the weights alone decide where both used one quantizer, must too; where the quantizers
    differ, so must the path. A conversion that predates the record of the files is matched by its path.
    """
    files = [_weight_sizes(report["fingerprint"]) for report in (a, b)]
    same_path = a["fingerprint"]["model"] == b["fingerprint"]["model"]
    if None in files:
        return same_path
    if files[0] != files[1]:
        return False
    if any(a["settings"].get(key) != b["settings"].get(key) for key in QUANTIZER):
        return same_path
    errors = {layer["name"]: layer["err_fro_base"] for layer in b["layers"]}
    return all(
        math.isclose(layer["err_fro_base"], errors[layer["name"]], rel_tol=NF4_ERROR_TOLERANCE)
        for layer in a["layers"]
        if layer["name"] in errors
    )


def _weight_sizes(fingerprint: dict) -> dict[str, int] | None:
    """The sizes of the model's weight files (shards and their index; not config.json, which an edit of
    its notes changes), as the conversion recorded them; None where it predates that record."""
    stats = fingerprint.get("checkpoint")
    if stats is None:
        return None
    return {name: size for name, (size, _) in stats.items() if name != CONFIG_NAME}


def original_changes(fingerprint: dict) -> str | None:
    """How the model at a conversion's `fingerprint["model"]` differs from the one it converted, by the
    sizes and modification times of its files that the conversion recorded (as `convert --resume` tells a
    rewritten model); None where they match, or where the conversion predates that record."""
    recorded = fingerprint.get("checkpoint")
    if recorded is None:
        return None
    try:
        current = CheckpointReader(Path(fingerprint["model"])).file_stats()
    except UserError as error:
        return f"it is no checkpoint that can be read now: {error}"
    changed = sorted(name for name in {*recorded, *current} if recorded.get(name) != current.get(name))
    return f"{', '.join(changed)}: another size or modification time" if changed else None
