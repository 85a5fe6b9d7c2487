"""The PNG plots of `qpissa report`, drawn with matplotlib's Agg backend from `summary.json` data only.

Each function takes plain data (the matching section of the summary) and a PNG path, and draws one
figure; the report decides which plots have data. Every label keeps one colour across all plots: the
report assigns them once (`assign_colours`) and passes the mapping to each plot.
"""

from __future__ import annotations

import math
from pathlib import Path

from qpissa.convert_settings import Method

COLOURS = {Method.QLORA.value: "#7f7f7f", Method.LOFTQ.value: "#1f77b4", Method.QPISSA.value: "#d62728"}
FALLBACK_COLOURS = ("#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#bcbd22", "#17becf")
DPI = 110
CROWDED_CHARS = 36  # label characters one half-width plot's x axis holds level
CROWDED_INCHES_PER_CHAR = 0.06  # the width a tilted label's character takes, added to two-plot figures


def assign_colours(methods: dict[str, str | None]) -> dict[str, str]:
    """label -> colour for every plot of one report, from label -> method label (`qpissa+calib`; None for a
    run alone): the first label of each of the three methods takes its fixed colour, every other label the
    next palette colour, so a colour never depends on which labels one plot happens to show."""
    found, spare = {}, 0
    for label, method in methods.items():
        if method in COLOURS and COLOURS[method] not in found.values():
            found[label] = COLOURS[method]
        else:
            found[label] = FALLBACK_COLOURS[spare % len(FALLBACK_COLOURS)]
            spare += 1
    return found


def reduction_by_type(quality: dict[str, dict], metric: str, colours: dict[str, str], path: Path) -> None:
    """Grouped bars: error reduction (%) per module type, one bar per method; AVG set apart and hatched.

    Args:
        quality: label -> {"by_type": {type: %}, "avg": %} in the chosen norm.
        metric: "nuclear" or "Frobenius", for the axis label.
        colours: label -> colour, from `assign_colours`.
        path: PNG to write.
    """
    plt = _pyplot()
    labels = list(quality)
    kinds = list(dict.fromkeys(kind for q in quality.values() for kind in q["by_type"]))  # every method's
    positions = [*range(len(kinds)), len(kinds) + 0.6]  # AVG sits apart from the module types
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for i, label in enumerate(labels):
        # a type this method did not convert gets no bar (NaN), not a 0 % one
        values = [quality[label]["by_type"].get(kind, math.nan) for kind in kinds] + [quality[label]["avg"]]
        xs = [x - 0.4 + width * (i + 0.5) for x in positions]
        bars = ax.bar(xs, values, width, label=label, color=colours[label])
        bars[-1].set_hatch("//")
        bars[-1].set_edgecolor("black")
        ax.annotate(f"{values[-1]:.1f}", (xs[-1], values[-1]), ha="center", va="bottom", fontsize=8)
    ax.axvline(len(kinds) + 0.05, color="black", linewidth=0.6, linestyle=":")
    long = max(map(len, kinds), default=0) > 10  # roles such as T5's `decoder.SelfAttention.q`
    ax.set_xticks(positions, [*kinds, "AVG"], rotation=30 if long else 0, ha="right" if long else "center")
    ax.set_ylabel(f"error reduction vs QLoRA, % ({metric} norm)")
    ax.set_title("Quantization error reduction per module type")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.legend(frameon=False)
    _save(fig, path)


def reduction_by_layer(
    layers: dict[str, dict[str, float]], metric: str, colours: dict[str, str], path: Path
) -> None:
    """Lines: mean error reduction (%) per decoder layer index, one line per method.

    Args:
        layers: label -> {layer index (as a string): mean reduction %}.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for label, points in layers.items():
        xs = sorted(points, key=int)
        ax.plot([int(x) for x in xs], [points[x] for x in xs], marker="o", markersize=3, label=label,
                color=colours[label])  # fmt: skip
    ax.set_xlabel("decoder layer")
    ax.set_ylabel(f"error reduction, % ({metric})")
    ax.set_title("Error reduction per layer (mean over the layer's matrices)")
    ax.legend(frameon=False)
    _save(fig, path)


def spectrum(spectra: dict, colours: dict[str, str], path: Path) -> None:
    """Singular values of one layer: W and each method's residual (left), the residual's NF4 error (right).

    Args:
        spectra: {"layer": name, "W": [σ...], "methods": {label: {"method", "residual": [σ...],
            "error": [σ...]}}}.
    """
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.semilogy(spectra["W"], color="black", label="W (original)")
    for label, values in spectra["methods"].items():
        style = {"color": colours[label], "label": label}
        if values["method"] != Method.QLORA.value:  # QLoRA's residual is W itself
            left.semilogy(values["residual"], linestyle="--", **style)
        right.semilogy(values["error"], **style)
    left.set_title("σ of W and of the residual W − s·B·A")
    right.set_title("σ of the error W − (deq(Q) + s·B·A)")
    for ax in (left, right):
        ax.set_xlabel("index")
        ax.legend(frameon=False, fontsize=8)
    left.set_ylabel("singular value")
    fig.suptitle(spectra["layer"], fontsize=9)
    _save(fig, path)


def fidelity(values: dict[str, dict], colours: dict[str, str], path: Path) -> None:
    """Bars: mean token KL to the original (left) and top-1 agreement in % (right) per method."""
    plt = _pyplot()
    labels = list(values)
    fig, (left, right) = plt.subplots(1, 2, figsize=(_width(labels, 9), 3.6))
    _bars(left, labels, [values[k]["kl"] for k in labels], colours, "{:.3g}")
    left.set_title("Mean token KL(original ‖ model),\nnats (lower is closer)")
    _bars(right, labels, [100 * values[k]["top1"] for k in labels], colours, "{:.1f}")
    right.set_title("Top-1 agreement\nwith the original, %")
    _save(fig, path)


def loss_curves(
    curves: dict[str, list[list[float]]], log_steps: bool, colours: dict[str, str], path: Path
) -> None:
    """Training loss per step, one line per method; `log_steps` puts the step axis on a log scale."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for label, points in curves.items():
        if log_steps:
            points = [p for p in points if p[0] > 0]  # step 0 has no place on a log axis
        ax.plot(
            [p[0] for p in points], [p[1] for p in points], label=label, color=colours[label], linewidth=1.2
        )
    if log_steps:
        ax.set_xscale("log")
    else:  # steps are whole: no ticks at 0.5 on a short run
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.set_xlabel("step" + (" (log scale)" if log_steps else ""))
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.legend(frameon=False)
    _save(fig, path)


def accuracy(values: dict[str, float], colours: dict[str, str], path: Path) -> None:
    """Bars: eval accuracy (%) per method."""
    plt = _pyplot()
    labels = list(values)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    _bars(ax, labels, [100 * values[k] for k in labels], colours, "{:.1f}")
    ax.set_ylim(0, 100)  # a percentage: all-zero bars would get a ±0.04 % axis
    ax.set_title("Eval accuracy (exact match), %")
    _save(fig, path)


def memory_speed(
    memory: dict[str, dict[str, float]], speed: dict[str, float], colours: dict[str, str], path: Path
) -> None:
    """Bars: peak memory (MB) of conversion and training per method (left), training tokens/s (right)."""
    plt = _pyplot()
    labels = list(memory)
    fig, (left, right) = plt.subplots(1, 2, figsize=(_width(labels, 10), 3.8))
    kinds = sorted({kind for values in memory.values() for kind in values})
    width = 0.8 / max(len(kinds), 1)
    for j, kind in enumerate(kinds):
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(labels))]
        ys = [memory[label].get(kind) or 0.0 for label in labels]
        left.bar(xs, ys, width, label=kind, color=("#9ecae1", "#3182bd", "#08519c")[j % 3])
    left.set_xticks(range(len(labels)), labels)
    _tilt_if_crowded(left, labels)
    left.set_title("Peak memory, MB")
    left.legend(frameon=False, fontsize=8)
    if speed:
        names = list(speed)
        _bars(right, names, [speed[k] for k in names], colours, "{:.0f}")
        right.set_title("Training throughput, tokens/s")
    else:
        right.axis("off")
        right.text(0.5, 0.5, "no training runs", ha="center", va="center")
    _save(fig, path)


def _bars(ax, labels: list[str], values: list[float], colours: dict[str, str], fmt: str) -> None:
    bars = ax.bar(labels, values, color=[colours[label] for label in labels])
    _tilt_if_crowded(ax, labels)
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(
            fmt.format(value),
            (bar.get_x() + bar.get_width() / 2, value),
            ha="center",
            va="bottom",
            fontsize=8,
        )


def _tilt_if_crowded(ax, labels: list[str]) -> None:
    """Tilt the x labels where, level, they would run into each other (several long method labels)."""
    if sum(len(label) for label in labels) > CROWDED_CHARS:
        ax.tick_params(axis="x", labelrotation=20)
        for text in ax.get_xticklabels():
            text.set_horizontalalignment("right")


def _width(labels: list[str], width: float) -> float:
    """A two-plot figure's width in inches, wider for long tilted labels: they take the plots' room, and
    the plots' titles, wider than the plots left, were cut off at the figure's edge."""
    crowded = sum(len(label) for label in labels) > CROWDED_CHARS
    return width + (CROWDED_INCHES_PER_CHAR * max(map(len, labels)) if crowded else 0)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Write the PNG atomically and free the figure."""
    plt = _pyplot()
    fig.tight_layout()
    partial = path.with_name(path.name + ".tmp")
    fig.savefig(partial, dpi=DPI, format="png", metadata={"Software": None})
    plt.close(fig)
    partial.replace(path)
