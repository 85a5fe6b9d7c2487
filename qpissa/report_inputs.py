"""The inputs of a report: conversions, runs, exports and comparisons found, grouped by conversion, labelled.

A run or an export joins the conversion it was made from; labels name the method (`qpissa+calib`), then
rank and iterations, then the directory, only where they would collide.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from qpissa import UserError
from qpissa.artifacts import (
    CHECKPOINT_PREFIX,
    COMPARE_NAME,
    CONVERSIONS_DIR,
    EVAL_RESULTS_NAME,
    EXPORT_REPORT,
    FIDELITY_NAME,
    LOG_NAME,
    REPORT_NAME,
    RUN_MARKER,
    RUNS_DIR,
    comparison_members,
)
from qpissa.convert_settings import Method
from qpissa.report_checks import (
    read_conversion,
    read_eval_results,
    read_export,
    read_fidelity,
    read_run_record,
    read_training_log,
    same_model,
)
from qpissa.run_marker import check_trained_on, read_run, run_model, trained_on

CALIBRATED_SUFFIX = "+calib"
METHOD_ORDER = (Method.QLORA.value, Method.LOFTQ.value, Method.QPISSA.value)


@dataclass
class MethodData:
    """Everything found about one method's conversion and what followed from it."""

    label: str
    conversion_dir: Path | None = None
    conversion: dict | None = None  # qpissa_report.json
    fidelity: dict | None = None  # qpissa_fidelity.json
    run_dir: Path | None = None
    steps: list[dict] = field(default_factory=list)  # trainer_log.jsonl
    evals: dict | None = None  # eval_results.json
    run: dict | None = None  # qpissa_run.json: the run's recipe and processes
    exports: list[tuple[Path, dict]] = field(default_factory=list)  # export_report.json


def collect(inputs: list[Path]) -> list[MethodData]:
    """Group the inputs by conversion (a run or export joins the conversion it was made from).

    Raises:
        UserError: naming every input that is missing or of an unknown kind, at once; or inputs
            converted from different base models.
    """
    by_key: dict[str, MethodData] = {}
    problems = []
    exports = [path for path in inputs if (path / EXPORT_REPORT).is_file()]
    conversions = [path for path in inputs if (path / REPORT_NAME).is_file()]  # a run joins one given
    others = [path for path in inputs if path not in exports and path not in conversions]
    for path in conversions + others + exports:  # an export joins its run
        if (path / COMPARE_NAME).is_file():
            for member in comparison_members(path, CONVERSIONS_DIR) + comparison_members(path, RUNS_DIR):
                _add(by_key, member)
        elif not path.exists():
            problems.append(f"{path} does not exist (check the path)")
        elif not _add(by_key, path):
            problems.append(
                f"{path} is not a QPiSSA directory, training run, export or comparison "
                f"(no {REPORT_NAME}, {RUN_MARKER}, {EXPORT_REPORT} or {COMPARE_NAME})"
            )
    if problems:
        raise UserError("; ".join(problems))
    if not by_key:
        raise UserError(
            "no inputs; pass QPiSSA directories, training runs, exports or comparison directories"
        )
    entries = sorted(by_key.values(), key=_method_order)
    _check_one_base_model(entries)
    _assign_labels(entries)
    return entries


def _check_one_base_model(entries: list[MethodData]) -> None:
    """A report compares methods on one base model: its per-layer tables and plots pair layers by name.
    One model is told by its weights (`same_model`): copies of it at two paths are one, two models that
    one path held in turn are two. A run or an export whose conversion is gone is told by the conversion's
    fingerprint it recorded.

    Raises:
        UserError: inputs of different original models, listed by model.
    """
    groups: list[list[tuple[MethodData, dict]]] = []
    for entry in entries:
        known = _model_record(entry)
        if known is None:  # a run or export that predates the record of its conversion
            continue
        group = next((g for g in groups if all(same_model(known, other) for _, other in g)), None)
        if group is None:
            groups.append([(entry, known)])
        else:
            group.append((entry, known))
    if len(groups) > 1:
        models = [", ".join(dict.fromkeys(known["fingerprint"]["model"] for _, known in g)) for g in groups]
        listed = "; ".join(
            f"{model}: {', '.join(str(e.conversion_dir) for e, _ in group)}"
            for model, group in zip(models, groups, strict=True)
        )
        one_path = len(set(models)) < len(groups)
        replaced = " (one path held another model at each conversion)" if one_path else ""
        raise UserError(
            f"the inputs were converted from {len(groups)} different models ({listed}){replaced}; a report "
            "compares methods on one base model: run `qpissa report` once per model, with its own --out"
        )


def _model_record(entry: MethodData) -> dict | None:
    """What tells the model an entry was converted from: its conversion's report, or else the fingerprint of
    the conversion its run or its export recorded (None: none is recorded, or none names its model)."""
    if entry.conversion:
        return entry.conversion
    recorded = [entry.run.get("conversion") if entry.run else None]
    recorded += [report.get("conversion") for _, report in entry.exports]
    fingerprint = next((found for found in recorded if found and "model" in found), None)
    return {"fingerprint": fingerprint} if fingerprint else None


def _add(by_key: dict[str, MethodData], path: Path) -> bool:
    """Add one input directory; False if it is none of the known kinds."""
    if (path / REPORT_NAME).is_file():
        entry = _entry(by_key, path)
        entry.conversion = read_conversion(path)
        entry.fidelity = read_fidelity(path / FIDELITY_NAME) if (path / FIDELITY_NAME).is_file() else None
        return True
    if (path / RUN_MARKER).is_file():
        record = read_run_record(path)  # checked before its fingerprint is matched to a conversion
        model = _given_conversion(by_key, path) or run_model(path)
        if (model / REPORT_NAME).is_file():  # else the run is reported alone
            check_trained_on(path, model, "leave the run out (its results would be credited to it)")
        entry = _add_linked(by_key, model, path)
        if entry.run_dir is not None and entry.run_dir.resolve() != path.resolve():
            # another run of the same conversion: a row of its own, labelled by its directory if need be
            entry = by_key.setdefault(
                str(path.resolve()),
                replace(entry, label=path.name, steps=[], evals=None, run=None, exports=[]),
            )
        entry.run_dir = path
        entry.run = record
        entry.steps = read_training_log(path / LOG_NAME)
        results = path / EVAL_RESULTS_NAME
        entry.evals = read_eval_results(results) if results.is_file() else None
        return True
    if (path / EXPORT_REPORT).is_file():
        report = read_export(path / EXPORT_REPORT)
        run = export_run(report)
        base = report.get("source", {}).get("base_dir")
        same_run = [e for e in by_key.values() if run is not None and _made_from(e, run)]
        if same_run:
            entry = same_run[0]
        elif base:
            _check_exported_from(path, report, Path(base))
            entry = _add_linked(by_key, Path(base), path)
        else:
            entry = _entry(by_key, path)
        entry.exports.append((path, report))
        return True
    return False


def _check_exported_from(export_dir: Path, report: dict, base: Path) -> None:
    """Refuse an export whose QPiSSA directory `base` holds another conversion now, as `check_trained_on`
    refuses such a run: by the conversion's fingerprint the export recorded (`trained_on` reads it as a run
    marker's); an export made before it was recorded is taken to be of what `base` holds.

    Raises:
        UserError: naming the export and the directory.
    """
    if (base / REPORT_NAME).is_file() and trained_on(report, base) is False:
        raise UserError(
            f"export {export_dir} was made from a conversion that {base} no longer holds (converted again, "
            "with other settings or from another model); put the export's conversion back there, or leave "
            "the export out (its numbers would be credited to it)"
        )


def export_run(report: dict) -> Path | None:
    """The training run an export (its export_report.json) was made from; None for an exported conversion."""
    run = report.get("source", {}).get("run")
    if not isinstance(run, str):
        return None
    for candidate in (Path(run), Path(run).parent):  # the run, or the run of a checkpoint-N
        if (candidate / RUN_MARKER).is_file():
            return candidate
    return None


def export_label(entry: MethodData, report: dict) -> str:
    """The method an export's row names: its entry's label, and where the export was not made from that
    entry's run's final adapter, what it was (a checkpoint, another run, the untrained conversion)."""
    run = export_run(report)
    adapter = Path(str(report["source"].get("adapter_dir")))  # the run's adapter/, or a checkpoint-N
    step = f" at {adapter.name}" if run is not None and adapter.name.startswith(CHECKPOINT_PREFIX) else ""
    if _made_from(entry, run):
        return entry.label + (f", exported{step}" if step else "")
    return f"{entry.label}, exported from {f'run {run.name}{step}' if run else 'the conversion untrained'}"


def _made_from(entry: MethodData, run: Path | None) -> bool:
    """Whether `run` (None: no run, the conversion itself) is the entry's own run."""
    if run is None or entry.run_dir is None:
        return run is None and entry.run_dir is None
    return run.resolve() == entry.run_dir.resolve()


def _given_conversion(by_key: dict[str, MethodData], run_dir: Path) -> Path | None:
    """A conversion among the inputs that holds what the run trained: the one its marker names (`run_model`),
    else a copy of it (a copied comparison's), which is the run's row, not a row beside it. Identical
    conversions (two comparisons' qlora) each keep their own runs."""
    marker = read_run(run_dir)
    held = [e.conversion_dir for e in by_key.values() if e.conversion is not None and e.conversion_dir]
    named = run_model(run_dir).resolve()
    if any(directory.resolve() == named for directory in held) and trained_on(marker, named) is not False:
        return named
    return next((directory for directory in held if trained_on(marker, directory)), None)


def _add_linked(by_key: dict[str, MethodData], model: Path, path: Path) -> MethodData:
    """The entry of the conversion `model` (read it if it still exists), else one of `path` alone."""
    if (model / REPORT_NAME).is_file():
        if str(model.resolve()) not in by_key:
            _add(by_key, model)
        return by_key[str(model.resolve())]
    return _entry(by_key, path)


def _entry(by_key: dict[str, MethodData], path: Path) -> MethodData:
    key = str(path.resolve())
    return by_key.setdefault(key, MethodData(label=path.name, conversion_dir=path))


def method_label(settings: dict) -> str:
    """A conversion's method as reports name it: `qpissa`, or `qpissa+calib` when calibrated."""
    return settings["method"] + (CALIBRATED_SUFFIX if "calibration" in settings else "")


def _assign_labels(entries: list[MethodData]) -> None:
    """Label by method; add rank and iterations, then the directory with as many of its parent folders as
    tell the entries apart, only where labels collide: every table and plot is keyed by label.

    Raises:
        UserError: two entries no directory tells apart (the same input given twice).
    """
    for entry in entries:
        if entry.conversion:
            entry.label = method_label(entry.conversion["settings"])
    if _distinct(entries):
        return
    for entry in entries:
        entry.label = _label_with_settings(entry)
    labels = [e.label for e in entries]
    paths = [(e.run_dir or e.conversion_dir) for e in entries]  # runs of one conversion differ by their own
    parts = [path.resolve().parts if path else () for path in paths]
    for depth in range(max(len(p) for p in parts) + 1):  # depth 0: the settings alone
        for entry, label, path_parts in zip(entries, labels, parts, strict=True):
            entry.label = f"{label} ({'/'.join(path_parts[-depth:])})" if depth and path_parts else label
        if _distinct(entries):
            return
    labels = [e.label for e in entries]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    raise UserError(f"the inputs give {', '.join(twice)} more than once; pass each once")


def _distinct(entries: list[MethodData]) -> bool:
    return len({e.label for e in entries}) == len(entries)


def _label_with_settings(entry: MethodData) -> str:
    if not entry.conversion:
        return entry.label
    s = entry.conversion["settings"]
    return f"{method_label(s)} r{s['rank']} T{s['iters']}"


def _method_order(entry: MethodData) -> tuple[int, str]:
    method = entry.conversion["settings"]["method"] if entry.conversion else ""
    rank = METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)
    return rank, str(entry.conversion_dir)
