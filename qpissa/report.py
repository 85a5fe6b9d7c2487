"""`qpissa report`: one comparison report from the JSON artifacts of conversions, runs, exports, comparisons.

INPUTS are read, never changed: QPiSSA directories (`qpissa_report.json`, and `qpissa_fidelity.json`
when `qpissa compare` measured them), training runs (`qpissa_run.json`, `trainer_log.jsonl`,
`eval_results.json`), exports (`export_report.json`) and comparison directories (`compare.json`), in
any mix, found and grouped by `report_inputs.py`; `summary.json` holds every number that the tables and
plots show (DESIGN.md principle 6). Rendering lives in `report_render.py`, plotting in `plots.py`.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

from qpissa import UserError
from qpissa.artifacts import (
    REPORT_HTML,
    REPORT_MARKDOWN,
    REPORT_NAME,
    SUMMARY_NAME,
)
from qpissa.checkpoint import write_json
from qpissa.console import counted
from qpissa.convert_settings import Method
from qpissa.output_lock import lock_output
from qpissa.outputs import (
    check_apart,
    check_holds_only,
    check_replaceable,
    finish_partial,
    resolve_output,
    start_partial,
)
from qpissa.plots import assign_colours
from qpissa.report_checks import read_original
from qpissa.report_inputs import MethodData, collect, export_label, method_label
from qpissa.report_render import PLOT_FILES, draw_plots, fidelity_apart, write_documents
from qpissa.report_runs import RunState, run_recipe
from qpissa.report_sizes import checkpoint_sizes, conversion_sizes, export_sizes
from qpissa.settings import ReportOptions
from qpissa.spectrum import layer_spectra

FIDELITY_SETTINGS = ("text", "window", "max_tokens")  # the `compare` settings that change what is measured
log = logging.getLogger(__name__)

TAIL_STEPS = 10  # the verdict quotes the mean loss of the last logged steps: one step's loss is noisy
REPORT_FILES = (REPORT_MARKDOWN, REPORT_HTML, SUMMARY_NAME, *PLOT_FILES)  # all a report directory holds


def create_report(inputs: list[Path], out_dir: Path, options: ReportOptions) -> dict:
    """`qpissa report`: read INPUTS, build the report in `OUT.partial/`, and move it into place as `out_dir`.

    Args:
        inputs: QPiSSA dirs, run dirs, export dirs and comparison dirs, in any mix.
        out_dir: the report directory (created; an earlier report there is replaced whole).
        options: layer for the spectrum, log-scale steps.

    Returns:
        The summary (also `summary.json`).

    Raises:
        UserError: an input that does not exist or is none of the above; no usable input at all; an
            `out_dir` that is, contains or lies inside an input, or holds anything but a report; another
            process writing `out_dir`.
    """
    out_dir = resolve_output(out_dir, "--out")  # a link is written through
    labels = ["" if len(inputs) == 1 else f"#{index}" for index in range(1, len(inputs) + 1)]
    check_apart(out_dir, "--out", dict(zip(labels, inputs, strict=True)))
    methods = collect(inputs)
    check_apart(out_dir, "--out", _read_through(methods))  # what the inputs lead to is read too
    summary = summarize(methods, options)
    with lock_output(out_dir, "--out"):
        check_replaceable(out_dir, "--out", (SUMMARY_NAME,), "a report directory")
        check_holds_only(out_dir, "--out", REPORT_FILES, "a report directory")
        partial = start_partial(out_dir, "--out")
        try:
            _write(summary, partial, options)
        except BaseException:  # this process made `partial`: nothing of it is worth keeping
            shutil.rmtree(partial, ignore_errors=True)
            raise
        finish_partial(partial, out_dir)
    return summary


def build_report(inputs: list[Path], out_dir: Path, options: ReportOptions) -> dict:
    """Read INPUTS and write the report's files into `out_dir`, a directory the caller owns and has
    locked (`qpissa compare` writes its report beside its conversions); each file is replaced whole.

    Returns:
        The summary (also `summary.json`).

    Raises:
        UserError: as `collect` does.
    """
    summary = summarize(collect(inputs), options)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write(summary, out_dir, options)
    return summary


def _read_through(methods: list[MethodData]) -> dict[str, Path | None]:
    """The conversions, runs, exports and original models the report reads, by what they are to the user: a
    run given alone leads to its QPiSSA directory, an export to its run, a conversion to its original."""
    read = {}
    for m in methods:
        read |= {f"{m.label}'s QPiSSA directory": m.conversion_dir, f"{m.label}'s run": m.run_dir}
        if m.conversion:  # `_original` and the spectrum read the model the conversion names
            read[f"{m.label}'s original model"] = Path(m.conversion["fingerprint"]["model"])
        read |= {f"{m.label}'s export #{i}": path for i, (path, _) in enumerate(m.exports, 1)}
    return read


def _write(summary: dict, out_dir: Path, options: ReportOptions) -> None:
    summary["plots"] = draw_plots(summary, out_dir, options)
    write_documents(summary, out_dir, TAIL_STEPS)
    write_json(out_dir / SUMMARY_NAME, summary)


def summarize(methods: list[MethodData], options: ReportOptions) -> dict:
    """Every number the report shows, as plain JSON-ready data (the contents of summary.json)."""
    quality = {m.label: _quality(m.conversion) for m in methods if m.conversion}
    metric = "nuclear" if quality and all(q["avg"] is not None for q in quality.values()) else "Frobenius"
    key = "nuc" if metric == "nuclear" else "fro"
    original, missing = _original(methods)
    summary = {
        "methods": [m.label for m in methods],
        "colours": assign_colours({m.label: _method(m) for m in methods}),  # one per label, in every plot
        "metric": metric,
        "original": original,
        "quality": quality,
        "layers": {m.label: _per_layer(m.conversion["layers"], key) for m in methods if m.conversion},
        "fidelity": {m.label: _fidelity(m.fidelity) for m in methods if m.fidelity},
        "memory": {m.label: _memory(m) for m in methods},
        "training": {m.label: _training(m.steps) for m in methods if m.steps},
        "eval": {m.label: m.evals for m in methods if m.evals},
        "exports": [
            export_sizes(export_label(m, report), path, report) for m in methods for path, report in m.exports
        ],
        "spectrum": _spectrum(methods, options.layer, original, missing),
        "setup": {
            "model": next((m.conversion["fingerprint"]["model"] for m in methods if m.conversion), None),
            "runs": {m.label: run_recipe(m.run, m.run_dir) for m in methods if m.run},
        },
    }
    for row in summary["memory"].values():
        if original and row["residual_disk_mb"] is not None:
            row["disk_vs_original_pct"] = (
                100 * (row["residual_disk_mb"] + row["adapter_disk_mb"]) / original["disk_mb"]
            )
    summary["fidelity_differs"] = _fidelity_differences(summary["fidelity"])  # empty: the rows compare
    summary["verdict"] = verdict(summary, TAIL_STEPS)
    return summary


def verdict(summary: dict, tail_steps: int) -> list[str]:
    """Plain sentences that state what the numbers show, and nothing else."""
    lines = []
    metric = summary["metric"]
    norm = "avg" if metric == "nuclear" else "avg_fro"
    for label, q in summary["quality"].items():
        if q["method"] != Method.QLORA.value or q["avg_out"] is not None:
            change = "cut" if q[norm] >= 0 else "raised"
            named = f" r{q['rank']} T{q['iters']}" in label  # the label says it when methods collide
            settings = "" if named else f" (r={q['rank']}, T={q['iters']})"
            lines.append(f"{label}{settings} {change} the QLoRA (plain NF4) "
                         f"quantization error by {abs(q[norm]):.1f} % on average over {len(q['by_type'])} "
                         f"module types ({metric} norm of the weights).")  # fmt: skip
        if q["avg_out"] is not None:
            c = q["calibration"]
            general = c.get("general_windows", 0) * c["seq_len"]
            prose = f" ({general} of them qpissa's general prose)" if general else ""
            lines.append(
                f"{label} was calibrated on {c['tokens']} tokens of {c['source']}{prose}: it cut the layers' "
                f"output error on them by {q['avg_out']:.1f} % against plain NF4 (the output error is what "
                "the model feels; the weight error may rise as it falls)."
            )
    fid = summary["fidelity"]
    if fid:
        kls = ", ".join(f"{k} {v['kl']:#.3g}" for k, v in fid.items())
        agree = ", ".join(f"{k} {100 * v['top1']:.1f} %" for k, v in fid.items())
        apart = fidelity_apart(summary["fidelity_differs"])
        caveat = f" (measured {apart}: these do not compare)" if apart else ""
        lines.append(
            f"Mean token KL to the original model before training: {kls}; top-1 agreement: {agree}{caveat}."
        )
    lines += _training_lines(summary, tail_steps)
    acc = {k: v["accuracy"] for k, v in summary["eval"].items() if v.get("accuracy") is not None}
    if acc:
        lines.append("Eval accuracy: " + ", ".join(f"{k} {100 * v:.1f} %" for k, v in acc.items()) + ".")
    sizes = {k: v["residual_disk_mb"] + v["adapter_disk_mb"] for k, v in summary["memory"].items()
             if v.get("residual_disk_mb") is not None}  # fmt: skip
    if sizes:
        text = ", ".join(f"{k} {v:.1f} MB" for k, v in sizes.items())
        original = summary["original"]
        against = f" against {original['disk_mb']:.1f} MB for the original model" if original else ""
        lines.append(f"Residual + adapter on disk: {text}{against}.")
    return lines


def _training_lines(summary: dict, tail_steps: int) -> list[str]:
    """Each run's mean loss over its last trained steps, marked where the run did not finish; the runs that
    logged no trained step (step 0 is the converted model, before training) are said to have none."""
    states = {label: recipe["state"] for label, recipe in summary["setup"]["runs"].items()}
    train = summary["training"]
    trained = {k: v for k, v in train.items() if v["tail_steps"]}
    untrained = [k for k, v in train.items() if not v["tail_steps"]]
    lines = []
    if trained:
        losses = ", ".join(
            f"{k} {v['tail_loss']:.4f} (last {counted(v['tail_steps'], 'step')}, to step {v['final_step']}"
            f"{'; unfinished' if states.get(k) == RunState.UNFINISHED.value else ''})"
            for k, v in trained.items()
        )
        lines.append(f"Mean training loss over the last trained steps (at most {tail_steps}): {losses}.")
    if untrained:
        lines.append(f"No trained step logged by {', '.join(untrained)}: only step 0, the converted model "
                     "before training.")  # fmt: skip
    return lines


def _fidelity_differences(fidelity: dict[str, dict]) -> list[str]:
    """What the fidelity rows were not all measured with: "text" (other token ids), "window"; empty when
    they compare. Token ids cover `--text` and `--max-tokens`; a row that did not record one is not judged."""
    rows = list(fidelity.values())
    hashed = all(row.get("ids_sha256") for row in rows)  # else the text's description is all there is
    texts = {row["ids_sha256"] if hashed else row["data"] for row in rows}
    windows = {row.get("window") for row in rows} - {None}
    return [name for name, values in (("text", texts), ("window", windows)) if len(values) > 1]


def _method(entry: MethodData) -> str | None:
    """The entry's method as labels name it (`qpissa+calib`); None for a run without its conversion."""
    return method_label(entry.conversion["settings"]) if entry.conversion else None


def _quality(report: dict) -> dict:
    s, summary = report["settings"], report["summary"]
    return {
        "method": s["method"], "rank": s["rank"], "iters": s["iters"], "matrices": len(report["layers"]),
        "by_type": summary["by_type"] if summary["by_type"] is not None else summary["by_type_fro"],
        "avg": summary["avg"], "avg_fro": summary["avg_fro"], "by_type_fro": summary["by_type_fro"],
        "convert_seconds": summary["total_seconds"], "convert_peak_rss_mb": summary["peak_rss_mb"],
        "avg_out": summary.get("avg_out"), "by_type_out": summary.get("by_type_out"),
        "calibration": s.get("calibration"),
    }  # fmt: skip


def _per_layer(layers: list[dict], key: str) -> dict[str, float]:
    """Mean reduction per decoder layer index (the first number in the module name)."""
    groups: dict[str, list[float]] = {}
    for layer in layers:
        match = re.search(r"\.(\d+)\.", layer["name"])
        value = layer[f"reduction_{key}"]
        if match and value is not None:
            groups.setdefault(match.group(1), []).append(value)
    return {index: sum(v) / len(v) for index, v in groups.items()}


def _fidelity(record: dict) -> dict:
    """The numbers, and what they were measured on and with: rows of other text or windows do not compare."""
    names = ("kl", "top1", "ppl_original", "ppl_model", "tokens", "data")
    key = record.get("key") or {}
    settings = key.get("settings") or {}
    measured = {name: settings.get(name) for name in FIDELITY_SETTINGS}
    return {**{name: record[name] for name in names}, **measured, "ids_sha256": key.get("ids_sha256")}


def _training(steps: list[dict]) -> dict:
    """First/last loss, mean throughput and peak memory of a run, plus its loss curve; the tail's mean
    loss is over trained steps (step 0 is the initialized model), as `train` prints it."""
    speeds = [s["tokens_per_second"] for s in steps if s.get("tokens_per_second")]
    memory = [s["peak_memory_mb"] for s in steps if s.get("peak_memory_mb") is not None]
    tail = [s for s in steps if s["step"] > 0][-TAIL_STEPS:]  # none where only step 0 was logged
    return {
        "first_loss": steps[0]["loss"], "first_step": steps[0]["step"],
        "final_loss": steps[-1]["loss"], "final_step": steps[-1]["step"],
        "tail_loss": sum(s["loss"] for s in tail) / len(tail) if tail else None, "tail_steps": len(tail),
        "tokens_per_second": sum(speeds) / len(speeds) if speeds else None,
        "peak_memory_mb": max(memory) if memory else None,
        "curve": [[s["step"], s["loss"]] for s in steps],
    }  # fmt: skip


def _memory(entry: MethodData) -> dict:
    """On-disk sizes and parameter counts of a conversion, peak memory of its conversion and training."""
    row = conversion_sizes(entry.conversion_dir, entry.conversion) if entry.conversion else {
        "convert_peak_rss_mb": None, "residual_disk_mb": None}  # fmt: skip
    row["train_peak_memory_mb"] = _training(entry.steps)["peak_memory_mb"] if entry.steps else None
    return row


def _original(methods: list[MethodData]) -> tuple[dict | None, str]:
    """Size, parameter count and dtypes of the original model named in the conversions' fingerprints, where
    it is still there as converted; else None, and why (the spectrum's note). Only the weight files
    transformers loads count (Mistral's `consolidated.safetensors` beside `model.safetensors` is a copy).
    A model changed since (another model at its path) would give wrong numbers: it is left out with a
    warning, and the report goes on."""
    missing, changed = f"the original model named in {REPORT_NAME} (fingerprint.model) is not here", ""
    for entry in methods:
        model = Path(entry.conversion["fingerprint"]["model"]) if entry.conversion else None
        if model is None or not model.is_dir():
            continue
        reader, changes = read_original(entry.conversion["fingerprint"])
        if reader is not None and changes is None:
            return {"model": str(model), **checkpoint_sizes(reader)}, ""
        if changes and not changed:
            changed = f"the original model {model} changed since {entry.label} was converted ({changes})"
    if changed:
        log.warning("%s; the report leaves out its size and the spectrum: put the converted model back "
                    "there, or convert again from this one", changed)  # fmt: skip
    return None, changed or missing


def _spectrum(methods: list[MethodData], layer: str | None, original: dict | None, missing: str) -> dict:
    """Singular values of one layer's W, residuals and errors; a note instead when they cannot be computed.

    Conversions with other `--targets` lack some layers: the default layer is one that most of them (all,
    where one is common) converted, and those without the layer are listed under `left_out`.

    Raises:
        UserError: `layer` given and converted by none of the conversions.
    """
    conversions = [m for m in methods if m.conversion]
    if not conversions:
        return {"note": "no conversions among the inputs"}
    if original is None:
        return {"note": missing}
    held = {m.label: {entry["name"] for entry in m.conversion["layers"]} for m in conversions}
    names = list(dict.fromkeys(entry["name"] for m in conversions for entry in m.conversion["layers"]))
    if layer is not None and layer not in names:
        common = [name for name in names if all(name in layers for layers in held.values())]
        raise UserError(f"--layer {layer} is not a converted matrix; e.g. --layer {(common or names)[0]}")
    most = max(sum(name in layers for layers in held.values()) for name in names)
    widest = [name for name in names if sum(name in layers for layers in held.values()) == most]
    chosen = layer or next((n for n in widest if n.endswith("q_proj")), widest[0])
    spectra = layer_spectra(
        Path(original["model"]),
        chosen,
        {m.label: (m.conversion_dir, m.conversion) for m in conversions if chosen in held[m.label]},
    )
    return {**spectra, "left_out": [label for label, layers in held.items() if chosen not in layers]}
