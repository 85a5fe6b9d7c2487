"""The report's plots keep what they show inside the figure, whatever the labels."""

from __future__ import annotations

from pathlib import Path

import pytest

from qpissa import plots


def test_fidelity_titles_stay_inside_the_figure_with_many_long_labels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six labels such as `qpissa+calib r64 T5 (run0/conversions/qpissa-calib)` took the plots' room, and
    the titles, wider than the plots left, were cut off at the figure's right edge."""
    labels = [f"qpissa+calib r64 T5 (run{i}/conversions/qpissa-calib)" for i in range(6)]
    values = {label: {"kl": 0.01 * (i + 1), "top1": 0.9} for i, label in enumerate(labels)}
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig))  # the figure, as _save gets it
    plots.fidelity(values, dict.fromkeys(labels, "#d62728"), tmp_path / "unused.png")
    (fig,) = drawn
    fig.tight_layout()  # as _save lays it out
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        title = ax.title.get_window_extent(renderer)
        assert fig.bbox.x0 <= title.x0 and title.x1 <= fig.bbox.x1, ax.get_title()
        assert ax.get_window_extent(renderer).width > 150  # the bars keep room to be read
