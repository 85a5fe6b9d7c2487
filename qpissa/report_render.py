"""Turn a report summary into tables, PNG plots, report.md and a self-contained report.html.

The HTML embeds its PNGs as base64 data URIs and its CSS inline: it opens offline and references
nothing outside itself. Tables come first, each with its plot beside it, under the verdict.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path

from qpissa import plots
from qpissa.artifacts import EVAL_RESULTS_NAME, LOG_NAME, REPORT_HTML, REPORT_MARKDOWN
from qpissa.report_runs import RunState, setup_lines
from qpissa.settings import ReportOptions

# every plot a report can draw, in order: a report directory holds these PNGs and nothing else of its own
PLOTS = ("reduction_by_type", "reduction_by_layer", "spectrum", "fidelity", "loss_curves", "eval_accuracy",
         "memory_speed")  # fmt: skip
PLOT_FILES = tuple(f"{name}.png" for name in PLOTS)


@dataclass
class Table:
    """One table of the report, and the plot shown beside it (a PNG file name, or None)."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    plot: str | None = None
    note: str = ""


def draw_plots(summary: dict, out_dir: Path, options: ReportOptions) -> dict[str, str]:
    """Draw every plot that has data; return name -> PNG file name (relative to `out_dir`)."""
    metric = summary["metric"]
    by_type, avg = ("by_type", "avg") if metric == "nuclear" else ("by_type_fro", "avg_fro")
    quality = {k: {"by_type": v[by_type], "avg": v[avg]} for k, v in summary["quality"].items()}
    curves = {k: v["curve"] for k, v in summary["training"].items()}
    memory = {
        k: {"conversion": v["convert_peak_rss_mb"], "training": v["train_peak_memory_mb"]}
        for k, v in summary["memory"].items()
    }
    speed = {k: v["tokens_per_second"] for k, v in summary["training"].items() if v["tokens_per_second"]}
    accuracy = {k: v["accuracy"] for k, v in summary["eval"].items() if v.get("accuracy") is not None}
    has_memory = any(any(v.values()) for v in memory.values())
    colours = summary["colours"]  # one per label, whichever labels a plot shows
    jobs = {
        "reduction_by_type": (quality, lambda p: plots.reduction_by_type(quality, metric, colours, p)),
        "reduction_by_layer": (
            summary["layers"],
            lambda p: plots.reduction_by_layer(summary["layers"], metric, colours, p),
        ),
        "spectrum": ("W" in summary["spectrum"], lambda p: plots.spectrum(summary["spectrum"], colours, p)),
        "fidelity": (summary["fidelity"], lambda p: plots.fidelity(summary["fidelity"], colours, p)),
        "loss_curves": (curves, lambda p: plots.loss_curves(curves, options.log_steps, colours, p)),
        "eval_accuracy": (accuracy, lambda p: plots.accuracy(accuracy, colours, p)),
        "memory_speed": (has_memory, lambda p: plots.memory_speed(memory, speed, colours, p)),
    }
    drawn = {}
    for name in PLOTS:
        has_data, draw = jobs[name]
        if has_data:
            draw(out_dir / f"{name}.png")
            drawn[name] = f"{name}.png"
    return drawn


def tables(summary: dict, tail_steps: int) -> list[Table]:
    """The report's tables, in order: overview, error per module type, memory, training, exports.

    Args:
        summary: from `report.summarize`.
        tail_steps: how many last logged steps each run's mean loss spans.
    """
    found = [
        _overview(summary, tail_steps), _by_type(summary), _memory(summary), _training(summary, tail_steps),
        _exports(summary),
    ]  # fmt: skip
    return [table for table in found if table is not None and table.rows]


def write_documents(summary: dict, out_dir: Path, tail_steps: int) -> None:
    """Write report.md (PNG links) and report.html (PNGs embedded), each atomically."""
    found = tables(summary, tail_steps)
    _write(out_dir / REPORT_MARKDOWN, _markdown(summary, found))
    _write(out_dir / REPORT_HTML, _html(summary, found, out_dir))


def _overview(summary: dict, tail_steps: int) -> Table:
    metric = summary["metric"]
    calibrated = any(q.get("avg_out") is not None for q in summary["quality"].values())  # else no column
    headers = [
        "method",
        "rank",
        "T",
        f"AVG weight error reduction % ({metric})",
        *(["AVG output error reduction % (calibration data)"] if calibrated else []),
        "KL to original",
        "top-1 agreement %",
        "perplexity (original → model)",
        f"train loss, mean of last {tail_steps} steps",  # one step's loss is noise between methods
        "eval accuracy %",
        "conversion s",
    ]
    rows = []
    for label in summary["methods"]:
        q = summary["quality"].get(label, {})
        f = summary["fidelity"].get(label)
        t = summary["training"].get(label)
        e = summary["eval"].get(label) or {}
        rows.append(
            [
                label,
                _num(q.get("rank"), "{}"),
                _num(q.get("iters"), "{}"),
                _num(q.get("avg") if metric == "nuclear" else q.get("avg_fro"), "{:.2f}"),
                *([_num(q.get("avg_out"), "{:.2f}")] if calibrated else []),
                _num(f and f["kl"], "{:#.4g}"),
                _num(f and 100 * f["top1"], "{:.1f}"),
                f"{f['ppl_original']:.2f} → {f['ppl_model']:.2f}" if f else "–",
                _num(t and t["tail_loss"], "{:.4f}"),
                _pct(e.get("accuracy")),
                _num(q.get("convert_seconds"), "{:.1f}"),
            ]
        )
    note = _fidelity_note(summary["fidelity"], summary["fidelity_differs"])
    return Table("Overview", headers, rows, "fidelity", note)


def fidelity_apart(differs: list[str]) -> str:
    """`fidelity_differences` in words: "on different text and with different windows"."""
    words = {"text": "on different text", "window": "with different windows"}
    return " and ".join(words[name] for name in differs)


def _fidelity_note(fidelity: dict[str, dict], differs: list[str]) -> str:
    """What fidelity was measured on: once if every entry shares it, else per entry, with a warning."""
    described = {label: _measured_on(f) for label, f in fidelity.items() if f.get("data")}
    if not differs:
        return f"Fidelity measured on {next(iter(described.values()))}." if described else ""
    each = "; ".join(f"{label}: {text}" for label, text in described.items())
    return f"Fidelity measured {fidelity_apart(differs)}, so its rows do not compare: {each}."


def _measured_on(fidelity: dict) -> str:
    window = fidelity.get("window")
    return fidelity["data"] + (f", in windows of {window} tokens" if window else "")


def _by_type(summary: dict) -> Table | None:
    quality = summary["quality"]
    if not quality:
        return None
    nuclear = summary["metric"] == "nuclear"
    by_type = "by_type" if nuclear else "by_type_fro"
    labels = list(quality)
    # every method's rows: a report written before rows were split by role (GPT-2's `c_proj`) has its own
    kinds = list(dict.fromkeys(kind for q in quality.values() for kind in q[by_type]))
    rows = [[kind] + [_num(quality[k][by_type].get(kind), "{:.2f}") for k in labels] for kind in kinds]
    rows.append(["**AVG**"] + [_num(quality[k]["avg" if nuclear else "avg_fro"], "{:.2f}") for k in labels])
    note = "Reduction of ‖W − (deq(Q) + s·B·A)‖ against ‖W − deq(nf4(W))‖ (QLoRA), mean over layers per type."
    calibrated = [k for k in labels if quality[k]["by_type_out"]]
    for kind in kinds if calibrated else []:
        rows.append(
            [f"{kind} (output)"]
            + [_num((quality[k]["by_type_out"] or {}).get(kind), "{:.2f}") for k in labels]
        )
    if calibrated:
        rows.append(["**AVG (output)**"] + [_num(quality[k]["avg_out"], "{:.2f}") for k in labels])
        note += (" Rows marked (output): calibrated conversions' reduction of the layers' output error "
                 "‖(W − Ŵ)X‖ on their calibration inputs X, against plain NF4's.")  # fmt: skip
    return Table(
        f"Quantization error reduction per module type, % ({summary['metric']} norm)",
        ["module type", *labels],
        rows,
        "reduction_by_type",
        note,
    )


def _memory(summary: dict) -> Table:
    headers = ["model", "residual on disk MB", "adapter on disk MB", "total vs original %", "4-bit params",
               "unquantized params", "adapter params", "conversion peak RSS MB", "conversion peak GPU MB",
               "training peak MB"]  # fmt: skip
    rows = []
    original = summary["original"]
    if original:
        name = f"original ({', '.join(original.get('dtypes') or ['unquantized'])})"
        params = f"{original['params']:,}"
        rows.append([name, f"{original['disk_mb']:.1f}", "–", "100.0", "–", params, *["–"] * 4])
    for label, m in summary["memory"].items():
        rows.append([
            label, _num(m.get("residual_disk_mb"), "{:.1f}"), _num(m.get("adapter_disk_mb"), "{:.1f}"),
            _num(m.get("disk_vs_original_pct"), "{:.1f}"), _num(m.get("params_4bit"), "{:,}"),
            _num(m.get("params_unquantized"), "{:,}"), _num(m.get("adapter_params"), "{:,}"),
            _num(m.get("convert_peak_rss_mb"), "{:.0f}"), _num(m.get("convert_peak_gpu_mb"), "{:.0f}"),
            _num(m.get("train_peak_memory_mb"), "{:.0f}"),
        ])  # fmt: skip
    note = (
        "Peak memory: process RSS on CPU (max allocated on CUDA for training). Each conversion and training "
        "run ran in its own process. Original: the checkpoint the conversions were made from, in its own "
        "dtype; unquantized params are kept in it (embeddings, norms, layers not targeted)."
    )
    return Table("Memory", headers, rows, "memory_speed", note)


def _training(summary: dict, tail_steps: int) -> Table | None:
    rows = []
    runs = summary["setup"]["runs"]
    for label, t in summary["training"].items():
        e = summary["eval"].get(label) or {}
        unfinished = runs.get(label, {}).get("state") == RunState.UNFINISHED.value
        rows.append([
            label, str(t["first_step"]), f"{t['first_loss']:.4f}",
            f"{t['final_step']}{' (unfinished)' if unfinished else ''}",
            f"{t['final_loss']:.4f}", _num(t["tail_loss"], "{:.4f}"), _num(e.get("loss"), "{:.4f}"),
            _pct(e.get("accuracy")),
            _num(t["tokens_per_second"], "{:.0f}"), _num(t["peak_memory_mb"], "{:.0f}"),
        ])  # fmt: skip
    headers = ["method", "first step", "first loss", "last step", "last loss",
               f"mean loss, last {tail_steps} trained steps", "eval loss", "eval accuracy %",
               "tokens/s", "peak memory MB"]  # fmt: skip
    note = f"Loss per step from {LOG_NAME} (step 0: the initialized model); eval from {EVAL_RESULTS_NAME}."
    return Table("Training", headers, rows, "loss_curves", note) if rows else None


def _exports(summary: dict) -> Table | None:
    rows = [
        [
            e["method"],
            str(e["kind"]),
            str(e["dtype"]),
            f"{e['disk_mb']:.1f}",
            _num(e["max_abs_diff"], "{:.2e}"),
            _num(e["kl_mean"], "{:.2e}"),
            _num(e["seconds"], "{:.1f}"),
        ]
        for e in summary["exports"]
    ]
    headers = ["method", "kind", "dtype", "on disk MB", "max |Δlogit|", "mean KL vs trained", "seconds"]
    return Table("Exports", headers, rows) if rows else None


def _markdown_row(cells: list[str]) -> str:
    """One table row; a `|` inside a cell (`max |Δlogit|`) is escaped, or it would split the cell."""
    return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"


def _markdown(summary: dict, found: list[Table]) -> str:
    lines = ["# qpissa comparison report", ""]
    lines += [part for line in setup_lines(summary) for part in (line, "")]  # a paragraph each
    lines += [*[f"- {line}" for line in summary["verdict"]], ""]
    for table in found:
        lines += [
            f"## {table.title}",
            "",
            _markdown_row(table.headers),
            "|" + "---|" * len(table.headers),
        ]
        lines += [_markdown_row(row) for row in table.rows]
        lines += ["", table.note] if table.note else []
        if table.plot in summary["plots"]:
            lines += ["", f"![{table.plot}]({summary['plots'][table.plot]})"]
        lines.append("")
    shown = {t.plot for t in found}
    extra = [name for name in summary["plots"] if name not in shown]
    notes = _spectrum_notes(summary["spectrum"])
    if extra or notes:
        lines += ["## More plots", ""] + [f"![{name}]({summary['plots'][name]})" for name in extra]
        lines += [part for note in notes for part in ("", note)]
    return "\n".join(lines).rstrip() + "\n"


def _html(summary: dict, found: list[Table], out_dir: Path) -> str:
    def image(name: str) -> str:
        data = base64.b64encode((out_dir / summary["plots"][name]).read_bytes()).decode("ascii")
        return f'<img alt="{name}" src="data:image/png;base64,{data}">'

    parts = [
        "<h1>qpissa comparison report</h1>",
        *[f"<p>{html.escape(line)}</p>" for line in setup_lines(summary)],
    ]
    parts.append("<ul class='verdict'>")
    parts += [f"<li>{html.escape(line)}</li>" for line in summary["verdict"]] + ["</ul>"]
    for table in found:
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in table.headers)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c.strip('*'))}</td>" for c in row) + "</tr>"
            for row in table.rows
        )
        side = image(table.plot) if table.plot in summary["plots"] else ""
        note = f"<p class='note'>{html.escape(table.note)}</p>" if table.note else ""
        parts.append(
            f"<section><h2>{html.escape(table.title)}</h2><div class='row'><div><table><tr>{cells}</tr>"
            f"{body}</table>{note}</div><div>{side}</div></div></section>"
        )
    shown = {t.plot for t in found}
    extra = [image(name) for name in summary["plots"] if name not in shown]
    extra += [f"<p class='note'>{html.escape(note)}</p>" for note in _spectrum_notes(summary["spectrum"])]
    if extra:
        parts.append("<section><h2>More plots</h2>" + "".join(extra) + "</section>")
    head = f"<meta charset='utf-8'><title>qpissa report</title><style>{_CSS}</style>"
    return f"<!DOCTYPE html><html><head>{head}</head><body>{''.join(parts)}</body></html>\n"


def _spectrum_notes(spectrum: dict) -> list[str]:
    """Why the spectrum plot is missing, or which conversions it leaves out (their `--targets` lacked it)."""
    if "note" in spectrum:
        return [f"Singular value spectrum skipped: {spectrum['note']}."]
    if spectrum.get("left_out"):
        left_out = ", ".join(spectrum["left_out"])
        return [
            f"The singular value spectrum of {spectrum['layer']} leaves out {left_out}: not converted there."
        ]
    return []


_CSS = (
    "body{font-family:sans-serif;margin:2em;color:#222}"
    "table{border-collapse:collapse;font-size:13px}"
    "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}th{background:#eee}"
    "td:first-child{text-align:left}"
    ".row{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}img{max-width:720px}"
    ".verdict{font-size:15px;background:#f4f8fb;padding:0.8em 2em}"
    ".note{font-size:12px;color:#555;max-width:640px}"
)


def _pct(fraction: float | None) -> str:
    return "–" if fraction is None else f"{100 * fraction:.1f}"


def _num(value, fmt: str) -> str:
    return "–" if value is None else fmt.format(value)


def _write(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text, encoding="utf-8")
    partial.replace(path)
