"""`qpissa report` from tiny-model conversions, a short training run and a merged export."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from qpissa import cli, plots
from qpissa.artifacts import FIDELITY_NAME, REPORT_NAME
from qpissa.convert import convert
from qpissa.convert_settings import ConvertSettings, Method, MetricKind
from qpissa.export import export
from qpissa.options import from_dict
from qpissa.recipe import TrainConfig
from qpissa.settings import ExportSettings
from qpissa.train import train

PLOTS_WITHOUT_TRAINING = ("reduction_by_type", "reduction_by_layer", "spectrum", "memory_speed")
QPISSA_RED = (214, 39, 40)  # plots.COLOURS["qpissa"]


@pytest.fixture(scope="module")
def inputs(tiny_chat_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """QLoRA and QPiSSA conversions of a tiny model, a 3-step run of the QPiSSA one, a merged export."""
    root = tmp_path_factory.mktemp("report_inputs")
    found = {}
    for method in (Method.QLORA, Method.QPISSA):
        iters = None if method is Method.QLORA else 2
        settings = ConvertSettings(method=method, rank=4, iters=iters, metrics=MetricKind.NUC)
        found[method.value] = root / method.value
        convert(tiny_chat_model, found[method.value], settings, show_progress=False)
    found["run"] = _short_run(found["qpissa"], root)
    found["export"] = root / "merged"
    export(found["qpissa"], found["export"], ExportSettings(), show_progress=False)
    return found


def test_report_writes_every_file(inputs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert cli.main(["--quiet", "report", *map(str, inputs.values()), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    expected = [*PLOTS_WITHOUT_TRAINING, "loss_curves"]
    assert set(summary["plots"]) == set(expected)
    for name in ("report.md", "report.html", "summary.json", *[f"{p}.png" for p in expected]):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in expected:
        _check_png(out / f"{name}.png")
    markdown = (out / "report.md").read_text()
    assert "| qpissa |" in markdown and "![reduction_by_type](reduction_by_type.png)" in markdown
    assert "## Exports" in markdown
    for table in markdown.split("\n## ")[1:]:  # every row as many cells as the delimiter row (GFM)
        rows = [line for line in table.splitlines() if line.startswith("|")]
        cells = [len(re.split(r"(?<!\\)\|", row)) for row in rows]
        assert len(set(cells)) <= 1, table
    assert not list(out.glob("*.tmp"))


def test_summary_numbers_equal_the_inputs(inputs: dict[str, Path], tmp_path: Path) -> None:
    summary = _report(inputs, tmp_path)
    assert summary["methods"] == ["qlora", "qpissa"] and summary["metric"] == "nuclear"
    for method in ("qlora", "qpissa"):
        source = json.loads((inputs[method] / REPORT_NAME).read_text())["summary"]
        quality = summary["quality"][method]
        assert quality["avg"] == source["avg"] and quality["by_type"] == source["by_type"]
        assert quality["avg_fro"] == source["avg_fro"] and quality["by_type_fro"] == source["by_type_fro"]
        assert summary["memory"][method]["convert_peak_rss_mb"] == source["peak_rss_mb"]
    assert (
        summary["quality"]["qpissa"]["avg"] > 0
    )  # QPiSSA reduces the error: the comparison above is not vacuous
    assert f"cut the QLoRA (plain NF4) quantization error by {summary['quality']['qpissa']['avg']:.1f} %" in (
        " ".join(summary["verdict"])
    )
    memory = summary["memory"]["qpissa"]
    disk = sum(p.stat().st_size for p in inputs["qpissa"].glob("model*.safetensors")) / 2**20
    assert memory["residual_disk_mb"] == disk and memory["disk_vs_original_pct"] < 100
    assert memory["params_4bit"] + memory["params_unquantized"] == summary["original"]["params"]
    assert memory["adapter_params"] == sum(4 * sum(layer["shape"]) for layer in _layers(inputs["qpissa"]))
    verify = json.loads((inputs["export"] / "export_report.json").read_text())["verify"]
    (row,) = summary["exports"]
    assert row["method"] == "qpissa, exported from the conversion untrained" and row["kind"] == "merged"
    assert row["max_abs_diff"] == verify["max_abs_diff"] and row["kl_mean"] == verify["kl_mean"]
    log = [json.loads(line) for line in (inputs["run"] / "trainer_log.jsonl").read_text().splitlines()]
    training = summary["training"]["qpissa"]
    assert len(log) == 4  # step 0 (the initialized model) and the 3 trained steps
    assert training["curve"] == [[entry["step"], entry["loss"]] for entry in log]
    assert training["final_loss"] == log[-1]["loss"]
    trained = [e["loss"] for e in log[1:]]  # the mean `train` prints: trained steps only
    assert training["tail_loss"] == pytest.approx(sum(trained) / 3) and training["tail_steps"] == 3
    assert training["peak_memory_mb"] == max(e["peak_memory_mb"] for e in log)
    overview = (tmp_path / "report.md").read_text().split("\n\n## ", 2)[1]  # the first table
    assert "train loss, mean of last 10 steps" in overview and f"| {training['tail_loss']:.4f} |" in overview


def test_an_uncalibrated_report_has_no_output_error_column(inputs: dict[str, Path], tmp_path: Path) -> None:
    """It held dashes only."""
    _report(inputs, tmp_path / "report")
    assert "output error" not in (tmp_path / "report" / "report.md").read_text()


def test_log_scale_steps(inputs: dict[str, Path], tmp_path: Path) -> None:
    args = ["--quiet", "report", str(inputs["run"]), "--out", str(tmp_path), "--log-steps"]
    assert cli.main(args) == 0
    _check_png(tmp_path / "loss_curves.png")


def test_html_is_self_contained(inputs: dict[str, Path], tmp_path: Path) -> None:
    summary = _report(inputs, tmp_path)
    page = (tmp_path / "report.html").read_text()
    without_images = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    references = re.findall(r"""(?:src|href|url)\s*[=(]\s*["']?([^"') >]*)""", without_images)
    assert references == [""] * len(references)  # every src= was a data URI (emptied above)
    assert len(re.findall(r"<img ", page)) == len(summary["plots"])
    assert "http" not in without_images and "<link" not in page and "<script" not in page
    assert "<table>" in page


def test_html_renders_in_headless_chromium(inputs: dict[str, Path], tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip(
            "Chromium is not installed and tools/install_chromium.sh could not install it (needs root + apt)"
        )
    _report(inputs, tmp_path)
    shot = tmp_path / "shot.png"
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1400,2400",
               (tmp_path / "report.html").as_uri()]  # fmt: skip
    subprocess.run(command, capture_output=True, timeout=120, check=False)
    assert shot.is_file(), "Chromium wrote no screenshot"
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    dark = int((pixels.max(axis=-1) < 80).sum())  # table text and borders
    red = int((np.abs(pixels - np.array(QPISSA_RED)).max(axis=-1) < 12).sum())
    assert dark > 2000, "the screenshot shows no text"
    assert red > 500, "the screenshot shows none of the embedded plots' QPiSSA bars"


def test_spectrum_is_skipped_with_a_note_without_the_original(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    moved = tmp_path / "qpissa"
    shutil.copytree(inputs["qpissa"], moved)
    report = json.loads((moved / REPORT_NAME).read_text())
    report["fingerprint"]["model"] = str(tmp_path / "gone")
    (moved / REPORT_NAME).write_text(json.dumps(report))
    assert cli.main(["--quiet", "report", str(moved), "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert "is not here" in summary["spectrum"]["note"] and "spectrum" not in summary["plots"]
    assert "Singular value spectrum skipped" in (tmp_path / "out" / "report.md").read_text()


def test_bad_inputs_are_user_errors(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert cli.main(["report", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    assert cli.main(["report", str(tmp_path / "notes"), "--out", str(tmp_path / "o")]) == 2
    assert "is not a QPiSSA directory, training run, export or comparison" in capsys.readouterr().err
    layer = ["--layer", "model.layers.0.nonexistent"]
    assert cli.main(["report", str(inputs["qpissa"]), "--out", str(tmp_path / "o"), *layer]) == 2
    assert "is not a converted matrix" in capsys.readouterr().err


def _report(inputs: dict[str, Path], out: Path) -> dict:
    assert cli.main(["--quiet", "report", *map(str, inputs.values()), "--out", str(out)]) == 0
    return json.loads((out / "summary.json").read_text())


def _layers(conversion: Path) -> list[dict]:
    return json.loads((conversion / REPORT_NAME).read_text())["layers"]


def _check_png(path: Path) -> None:
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200
        colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
        assert colours is not None and len(colours) > 10, f"{path.name} is blank"


def _short_run(conversion: Path, root: Path) -> Path:
    """Three training steps on a tiny alpaca dataset, through the library function `qpissa train` uses."""
    data = root / "data.jsonl"
    records = [
        {"instruction": f"add {i} and {i + 1}", "input": "", "output": f"{2 * i + 1}"} for i in range(12)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    config = from_dict(TrainConfig, {
        "model": str(conversion), "output_dir": str(root / "run"), "max_steps": 3, "learning_rate": 1e-3,
        "per_device_train_batch_size": 4, "save_steps": 100, "logging_steps": 1,
        "data": {"path": str(data), "format": "alpaca", "max_seq_len": 64},
    })  # fmt: skip
    train(config, show_progress=False)
    return root / "run"


def test_every_run_of_one_conversion_gets_its_own_row(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Runs of one conversion (other learning rates, seeds) are what a report compares; none is dropped."""
    import shutil

    other = tmp_path / "other-run"
    shutil.copytree(inputs["run"], other)
    out = tmp_path / "report"
    assert cli.main(["--quiet", "report", str(inputs["run"]), str(other), "--out", str(out)]) == 0
    training = json.loads((out / "summary.json").read_text())["training"]
    assert sorted(training) == ["qpissa r4 T2 (other-run)", "qpissa r4 T2 (run)"]
    verdict = json.loads((out / "summary.json").read_text())["verdict"]
    assert [line for line in verdict if line.startswith("qpissa r4 T2 (run) cut the QLoRA")], verdict
    assert not [line for line in verdict if "(r=4, T=2)" in line], "the label says r and T already"


def test_conversions_in_folders_of_one_name_keep_a_row_each(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Two comparisons both hold `conversions/qpissa`: the folder's name did not tell them apart, and one's
    numbers were shown twice under one label, the other's dropped."""
    import shutil

    for name in ("a", "b"):
        shutil.copytree(inputs["qpissa"], tmp_path / name / "conversions" / "qpissa")
    out = tmp_path / "report"
    given = [str(tmp_path / name / "conversions" / "qpissa") for name in ("a", "b")]
    assert cli.main(["--quiet", "report", *given, "--out", str(out)]) == 0
    quality = json.loads((out / "summary.json").read_text())["quality"]
    assert sorted(quality) == ["qpissa r4 T2 (a/conversions/qpissa)", "qpissa r4 T2 (b/conversions/qpissa)"]


def test_an_export_is_reported_with_the_run_it_was_made_from(inputs: dict[str, Path], tmp_path: Path) -> None:
    """Two runs of one conversion: the export of the second is not credited to the first, in any order."""
    import shutil

    other = tmp_path / "other-run"
    shutil.copytree(inputs["run"], other)
    exported = tmp_path / "other-merged"
    export(other, exported, ExportSettings(verify=False), show_progress=False)
    for order in ([exported, inputs["run"], other], [inputs["run"], other, exported]):
        out = tmp_path / f"report-{len(list(tmp_path.iterdir()))}"
        assert cli.main(["--quiet", "report", *map(str, order), "--out", str(out)]) == 0
        (row,) = json.loads((out / "summary.json").read_text())["exports"]
        assert row["method"] == "qpissa r4 T2 (other-run)", row
    out = tmp_path / "alone"  # its run not among the inputs: it says where it came from
    assert cli.main(["--quiet", "report", str(inputs["run"]), str(exported), "--out", str(out)]) == 0
    (row,) = json.loads((out / "summary.json").read_text())["exports"]
    assert row["method"] == "qpissa, exported from run other-run", row
    (checkpoint,) = other.glob("checkpoint-*")  # an export of a checkpoint is not the run's final adapter
    export(checkpoint, tmp_path / "early", ExportSettings(verify=False), show_progress=False)
    for given, label in (
        (other, "qpissa, exported at"),
        (inputs["run"], "qpissa, exported from run other-run at"),
    ):
        out = tmp_path / f"report-{len(list(tmp_path.iterdir()))}"
        assert cli.main(["--quiet", "report", str(given), str(tmp_path / "early"), "--out", str(out)]) == 0
        (row,) = json.loads((out / "summary.json").read_text())["exports"]
        assert row["method"] == f"{label} {checkpoint.name}", row


def test_the_report_names_the_base_model_and_what_each_run_trained_on(
    inputs: dict[str, Path], tiny_chat_model: Path, tmp_path: Path
) -> None:
    """Said once when every run shares the recipe (as in `qpissa compare`), once per run when they differ."""
    other = tmp_path / "other-run"
    shutil.copytree(inputs["run"], other)
    runs = [str(inputs["run"]), str(other)]
    assert cli.main(["--quiet", "report", *runs, "--out", str(tmp_path / "same")]) == 0
    markdown = (tmp_path / "same" / "report.md").read_text()
    assert f"Base model: {tiny_chat_model}." in markdown
    data = json.loads((inputs["run"] / "qpissa_run.json").read_text())["config"]["data"]["path"]
    shared = f"Every run trained on {data} (3 steps of 4 samples, learning rate 0.001, max_seq_len 64, seed"
    assert markdown.count(shared) == 1
    marker = json.loads((other / "qpissa_run.json").read_text())
    marker["config"]["learning_rate"] = 5e-5
    (other / "qpissa_run.json").write_text(json.dumps(marker))
    assert cli.main(["--quiet", "report", *runs, "--out", str(tmp_path / "apart")]) == 0
    html = (tmp_path / "apart" / "report.html").read_text()
    assert "Every run" not in html and "learning rate 5e-05" in html and "learning rate 0.001" in html
    assert html.count("<p>Run qpissa r4 T2 (") == 2


def test_conversions_of_other_targets_share_a_report(
    inputs: dict[str, Path], tiny_chat_model: Path, tmp_path: Path
) -> None:
    """A conversion of `--targets v_proj` beside all-linear ones: the spectrum read q_proj from every
    conversion, and the report ended in a traceback."""
    settings = ConvertSettings(
        method=Method.QPISSA, rank=4, iters=1, targets="v_proj", metrics=MetricKind.NUC
    )
    convert(tiny_chat_model, tmp_path / "vonly", settings, show_progress=False)
    given = [str(inputs["qlora"]), str(inputs["qpissa"]), str(tmp_path / "vonly")]
    assert cli.main(["--quiet", "report", *given, "--out", str(tmp_path / "default")]) == 0
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    spectrum = summary["spectrum"]  # the default layer is one every conversion holds
    assert spectrum["layer"].endswith("v_proj") and sorted(spectrum["methods"]) == sorted(summary["methods"])
    assert spectrum["left_out"] == [] and "spectrum" in summary["plots"]
    layer = ["--layer", "model.layers.0.self_attn.q_proj"]  # converted by two of the three
    assert cli.main(["--quiet", "report", *given, "--out", str(tmp_path / "q"), *layer]) == 0
    summary = json.loads((tmp_path / "q" / "summary.json").read_text())
    vonly = "qpissa r4 T1"  # its T tells it from the all-linear qpissa r4 T2
    assert summary["spectrum"]["left_out"] == [vonly] and vonly not in summary["spectrum"]["methods"]
    assert len(summary["spectrum"]["methods"]) == 2
    note = f"spectrum of model.layers.0.self_attn.q_proj leaves out {vonly}: not converted there."
    assert note in (tmp_path / "q" / "report.md").read_text()


def test_fidelity_measured_with_other_windows_or_text_does_not_compare(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    """One conversion measured with window 256 and 64 showed two KLs under one note naming the text alone."""
    given = []
    for name, window in (("a", 256), ("b", 64)):
        conversion = tmp_path / name / "qlora"
        shutil.copytree(inputs["qlora"], conversion)
        _write_fidelity(conversion, window, "ids-of-the-text")
        given.append(str(conversion))
    summary = _report_of(given, tmp_path / "windows")
    assert summary["fidelity_differs"] == ["window"]
    assert summary["fidelity"]["qlora r4 T1 (a/qlora)"]["window"] == 256
    markdown = (tmp_path / "windows" / "report.md").read_text()
    assert "Fidelity measured with different windows, so its rows do not compare: " in markdown
    assert "(b/qlora): 40 tokens of heldout.txt, in windows of 64 tokens" in markdown
    assert "(measured with different windows: these do not compare)" in " ".join(summary["verdict"])
    assert "do not compare" in (tmp_path / "windows" / "report.html").read_text()
    _write_fidelity(tmp_path / "b" / "qlora", 256, "ids-of-other-text")  # same file name, other contents
    summary = _report_of(given, tmp_path / "text")
    assert summary["fidelity_differs"] == ["text"]
    assert "Fidelity measured on different text, so" in (tmp_path / "text" / "report.md").read_text()
    _write_fidelity(tmp_path / "b" / "qlora", 256, "ids-of-the-text")
    assert _report_of(given, tmp_path / "same")["fidelity_differs"] == []
    markdown = (tmp_path / "same" / "report.md").read_text()
    assert "Fidelity measured on 40 tokens of heldout.txt, in windows of 256 tokens." in markdown


def test_every_plot_gives_a_label_one_colour(
    inputs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Labels with a suffix took the palette colour of their place in each plot's own labels, and the
    spectrum drew a residual line for QLoRA conversions not labelled plain `qlora`."""
    copy = tmp_path / "copy" / "qlora"
    shutil.copytree(inputs["qlora"], copy)
    _write_fidelity(copy, 256, "ids-of-the-text")  # only one of the four has a fidelity row
    given = [str(inputs["qlora"]), str(copy), str(inputs["qpissa"]), str(inputs["run"])]
    summary = _report_of(given, tmp_path / "report")
    colours = summary["colours"]
    assert sorted(colours) == sorted(summary["methods"]) and len(set(colours.values())) == len(colours)
    shown = {"fidelity": summary["fidelity"], "spectrum": summary["spectrum"]["methods"],
             "loss_curves": summary["training"], "reduction_by_type": summary["quality"]}  # fmt: skip
    for plot, labels in shown.items():
        for label in labels:
            assert _pixels(tmp_path / "report" / f"{plot}.png", colours[label]) > 20, (plot, label)
    drawn = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: drawn.append(fig))
    plots.spectrum(summary["spectrum"], colours, tmp_path / "unused.png")
    residuals = [line.get_label() for line in drawn[0].axes[0].get_lines()][1:]  # after W
    assert residuals == [label for label in summary["methods"] if label.startswith("qpissa")]


def test_runs_on_other_contents_of_one_path_are_not_said_to_share_it(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    """Runs whose data had other contents at the same path were said to have all trained on it."""
    other = tmp_path / "other-run"
    shutil.copytree(inputs["run"], other)
    marker = json.loads((other / "qpissa_run.json").read_text())
    marker["data_fingerprint"] = "0123456789ab" + "0" * 52
    (other / "qpissa_run.json").write_text(json.dumps(marker))
    _report_of([str(inputs["run"]), str(other)], tmp_path / "report")
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "Every run" not in markdown and "The runs trained on different data" in markdown
    assert "(data fingerprint 0123456789ab)" in markdown and markdown.count("Run qpissa r4 T2 (") == 2


def _report_of(given: list[str], out: Path) -> dict:
    assert cli.main(["--quiet", "report", *given, "--out", str(out)]) == 0
    return json.loads((out / "summary.json").read_text())


def _write_fidelity(conversion: Path, window: int, ids: str) -> None:
    """A `qpissa_fidelity.json` as `compare` writes it, its KL depending on the window as measured ones do."""
    key = {
        "ids_sha256": ids,
        "settings": {"text": None, "window": window, "batch_size": 2, "max_tokens": 4096},
    }
    record = {"key": key, "data": "40 tokens of heldout.txt", "kl": 16 / window, "top1": 0.7,
              "ppl_original": 30.0, "ppl_model": 35.0, "tokens": 39, "seconds": 1.0}  # fmt: skip
    (conversion / FIDELITY_NAME).write_text(json.dumps(record))


def _pixels(path: Path, colour: str) -> int:
    """How many pixels of the PNG are within a few levels of `colour` (`#rrggbb`)."""
    import numpy as np
    from PIL import Image

    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    return int((np.abs(pixels - rgb).max(axis=-1) < 8).sum())


def test_long_labels_are_tilted_where_they_would_run_into_each_other() -> None:
    """Four labels such as `qpissa+calib r64 T5` overlapped on the bar plots' axes (memory, fidelity)."""
    from qpissa import plots

    plt = plots._pyplot()
    for labels, rotation in (
        (["qlora", "qpissa"], 0),
        (["qlora r8 T1", "qpissa r64 T5", "qpissa+calib r64 T5"], 20),
    ):
        fig, ax = plt.subplots()
        plots._bars(ax, labels, [1.0] * len(labels), dict.fromkeys(labels, "#000000"), "{:.0f}")
        assert {text.get_rotation() for text in ax.get_xticklabels()} == {rotation}, labels
        plt.close(fig)


def _edited(conversion: Path, to: Path, change) -> Path:
    """A copy of a conversion at `to`, its `qpissa_report.json` passed through `change` (in place)."""
    shutil.copytree(conversion, to)
    report = json.loads((to / REPORT_NAME).read_text())
    change(report)
    (to / REPORT_NAME).write_text(json.dumps(report))
    return to


def test_an_export_of_a_conversion_redone_at_its_path_is_refused(
    inputs: dict[str, Path], moved_run, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A merged export was credited to whatever conversion sat at its base_dir later (`loftq, exported
    from run run`), though `report RUN` refused the run of that same conversion."""
    conversion = tmp_path / "qpissa"
    shutil.copytree(inputs["qpissa"], conversion)
    run = moved_run(conversion, tmp_path / "run")
    exported = tmp_path / "merged"
    export(run, exported, ExportSettings(verify=False), show_progress=False)
    rows = _report_of([str(exported)], tmp_path / "before")["exports"]
    assert [row["method"] for row in rows] == ["qpissa, exported from run run"]
    shutil.rmtree(conversion)
    shutil.copytree(inputs["qlora"], conversion)  # converted again there, with another method
    out = tmp_path / "after"
    assert cli.main(["--quiet", "report", str(exported), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert f"export {exported} was made from a conversion that {conversion} no longer holds" in error
    assert error.count("\n") == 1 and not out.exists()
    record = json.loads((exported / "export_report.json").read_text())
    del record["conversion"]  # an export made before the conversion was recorded: trusted, as then
    (exported / "export_report.json").write_text(json.dumps(record))
    assert [row["method"] for row in _report_of([str(exported)], out)["exports"]] == [
        "qlora, exported from run run"
    ]


def test_an_original_model_replaced_since_the_conversion_is_left_out_with_a_warning(
    inputs: dict[str, Path], tiny_chat_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The spectrum and the original's size were read from whatever model sat at fingerprint.model: another
    one of the same shapes gave a spectrum 17× off, one of other shapes a traceback."""
    from qpissa.models import make_tiny_model

    model = tmp_path / "model"
    shutil.copytree(tiny_chat_model, model)  # its files' sizes and times kept: the model converted

    def moved(report: dict) -> None:
        report["fingerprint"]["model"] = str(model)

    conversion = _edited(inputs["qpissa"], tmp_path / "qpissa", moved)
    summary = _report_of([str(conversion)], tmp_path / "same")
    assert summary["original"]["model"] == str(model) and "spectrum" in summary["plots"]
    for name, options in (("seed", {"seed": 1}), ("shape", {"hidden": 32})):
        shutil.rmtree(model)
        make_tiny_model(model, **options)
        caplog.clear()
        with caplog.at_level("WARNING", logger="qpissa.report"):
            summary = _report_of([str(conversion)], tmp_path / name)
        assert summary["original"] is None and "spectrum" not in summary["plots"], name
        assert f"the original model {model} changed since qpissa was converted" in summary["spectrum"]["note"]
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "leaves out its size and the spectrum" in warnings[0], warnings


def test_conversions_are_of_one_model_by_its_weights_not_its_path(
    inputs: dict[str, Path], tiny_chat_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Conversions of byte-identical copies at two paths were refused as two models; conversions of two
    models that one path held in turn were compared as one."""
    from qpissa.models import make_tiny_model

    copy = tmp_path / "copy"
    shutil.copytree(tiny_chat_model, copy)

    def of_the_copy(report: dict) -> None:
        report["fingerprint"]["model"] = str(copy)

    copied = _edited(inputs["qlora"], tmp_path / "qlora", of_the_copy)
    summary = _report_of([str(copied), str(inputs["qpissa"])], tmp_path / "copies")
    assert summary["methods"] == ["qlora", "qpissa"]
    other = make_tiny_model(tmp_path / "other", seed=1)  # the same shapes, other weights
    convert(other, tmp_path / "converted", ConvertSettings(method=Method.QLORA, rank=4), show_progress=False)

    def at_the_same_path(report: dict) -> None:
        report["fingerprint"]["model"] = str(tiny_chat_model)

    replaced = _edited(tmp_path / "converted", tmp_path / "replaced", at_the_same_path)
    out = tmp_path / "mixed"
    assert cli.main(["--quiet", "report", str(replaced), str(inputs["qpissa"]), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "the inputs were converted from 2 different models" in error and str(replaced) in error
    assert error.count("\n") == 1 and not out.exists()
    # another model at another path, quantized otherwise (its NF4 errors do not compare): two models
    settings = ConvertSettings(method=Method.QLORA, rank=4, blocksize=32)
    convert(other, tmp_path / "blocks32", settings, show_progress=False)
    assert (
        cli.main(["--quiet", "report", str(tmp_path / "blocks32"), str(inputs["qpissa"]), "--out", str(out)])
        == 2
    )
    assert "2 different models" in capsys.readouterr().err

    def config_edited(report: dict) -> None:  # its notes, say: the weights are the same
        report["fingerprint"]["checkpoint"]["config.json"][0] += 7

    edited = _edited(inputs["qlora"], tmp_path / "edited", config_edited)
    assert _report_of([str(edited), str(inputs["qpissa"])], tmp_path / "edits")["methods"] == [
        "qlora",
        "qpissa",
    ]


def test_identical_conversions_of_two_comparisons_keep_their_own_runs(
    inputs: dict[str, Path], tmp_path: Path
) -> None:
    """Both comparisons' qlora conversions are alike: the second's run was put on the first's conversion,
    and the second's conversion shown as a row of its own, untrained."""
    fingerprint = json.loads((inputs["qlora"] / REPORT_NAME).read_text())["fingerprint"]
    for name, loss in (("a", 4.0), ("b", 3.0)):
        comparison = tmp_path / name
        shutil.copytree(inputs["qlora"], comparison / "conversions" / "qlora")
        run = comparison / "runs" / "qlora"
        shutil.copytree(inputs["run"], run)
        marker = json.loads((run / "qpissa_run.json").read_text())
        marker |= {"model": str(comparison / "conversions" / "qlora"), "conversion": fingerprint}
        (run / "qpissa_run.json").write_text(json.dumps(marker))
        log = [{"step": 0, "loss": 5.0}, {"step": 1, "loss": loss}]
        (run / "trainer_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in log))
        (comparison / "compare.json").write_text(json.dumps({"methods": ["qlora"]}))
    summary = _report_of([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "report")
    rows = {label: row["final_loss"] for label, row in summary["training"].items()}
    assert rows == {"qlora r4 T1 (a/runs/qlora)": 4.0, "qlora r4 T1 (b/runs/qlora)": 3.0}
    assert summary["methods"] == list(rows)


DAMAGED_REPORTS = {
    "layers is text": (lambda r: r.update(layers="oops"), "`layers` is not an array"),
    "settings is a list": (lambda r: r.update(settings=[]), "`settings` is not an object"),
    "summary is null": (lambda r: r.update(summary=None), "`summary` is not an object"),
    "rank is text": (lambda r: r["settings"].update(rank="four"), '`settings.rank` is "four", not an'),
    "unknown method": (lambda r: r["settings"].update(method="foo"), '`settings.method` is "foo", not one'),
    "no layers": (lambda r: r.update(layers=[]), "`layers` is empty"),
    "a layer without shape": (lambda r: r["layers"][1].pop("shape"), "`layers[1].shape` is missing"),
    "a layer's reduction is text": (
        lambda r: r["layers"][0].update(reduction_fro="12"),
        '`layers[0].reduction_fro` is "12", not a number',
    ),
    "by_type holds text": (
        lambda r: r["summary"]["by_type_fro"].update(q_proj="x"),
        "`summary.by_type_fro` holds a value that",
    ),
}


@pytest.mark.parametrize("case", DAMAGED_REPORTS, ids=list(DAMAGED_REPORTS))
def test_a_damaged_conversion_report_is_one_line_naming_it(
    case: str, inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Valid JSON of the wrong shape ended in a TypeError, ValueError or KeyError deep in the report."""
    change, problem = DAMAGED_REPORTS[case]
    conversion = _edited(inputs["qpissa"], tmp_path / "qpissa", change)
    out = tmp_path / "report"
    assert cli.main(["--quiet", "report", str(conversion), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"qpissa: error: {conversion / REPORT_NAME} is damaged (") and problem in error
    assert "convert again into a new directory" in error and error.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda m: m.pop("config"), "`config` is missing"),
        (lambda m: m["config"]["data"].update(path=None, sources=None), "names neither a path nor sources"),
        (lambda m: m.update(processes=[]), "`processes` is [], not an object"),
        (lambda m: m["conversion"].update(settings=[]), "`conversion.settings` is [], not an object"),
        (lambda m: m.update(conversion=7), "`conversion` is 7, not an object"),
    ],
    ids=["no config", "no data", "processes is a list", "conversion settings a list", "conversion a number"],
)
def test_a_damaged_run_marker_is_one_line_naming_it(
    change, problem: str, inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A `qpissa_run.json` without the recipe the report quotes ended in KeyError: 'config'."""
    run = tmp_path / "run"
    shutil.copytree(inputs["run"], run)
    marker = json.loads((run / "qpissa_run.json").read_text())
    change(marker)
    (run / "qpissa_run.json").write_text(json.dumps(marker))
    out = tmp_path / "report"
    assert cli.main(["--quiet", "report", str(run), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"qpissa: error: {run / 'qpissa_run.json'} is damaged (") and problem in error
    assert error.count("\n") == 1 and not out.exists()


def test_a_fidelity_record_without_its_numbers_is_one_line_naming_it(
    inputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A `qpissa_fidelity.json` without `kl` ended in KeyError: 'kl'."""
    conversion = tmp_path / "qlora"
    shutil.copytree(inputs["qlora"], conversion)
    (conversion / FIDELITY_NAME).write_text(json.dumps({"key": {"a": 1}}))
    out = tmp_path / "report"
    assert cli.main(["--quiet", "report", str(conversion), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"qpissa: error: {conversion / FIDELITY_NAME} is damaged (`kl` is missing)")
    assert error.count("\n") == 1 and not out.exists()
