"""Benchmark calibrated conversion (`convert --calib`) against data-free conversion and QLoRA, in one run.

    python tools/bench_calib.py --model DIR --work /tmp/bench_calib --out bench_calib.json
    python tools/bench_calib.py --model DIR --work W --parts variants --variants "propagate=converted;compensate=on"

Parts (quality, speed and memory by default):
  quality   `qpissa compare --calib` for each scenario of the calibration targets, all with NF4 block 64 and
            double quant: general prose (qpissa/texts/calibration.txt) at r=64 and r=16, T=5, and the demo
            task's training data at r=64, T=5; QLoRA and QPiSSA, each data-free and calibrated. KL, top-1
            agreement and perplexity are measured on the shipped held-out prose (qpissa/texts/heldout.txt,
            which no calibration text overlaps) with plain transformers + peft loading the written files.
  speed     data-free vs calibrated QPiSSA (r=64, T=5, default calibration on the prose), each in a fresh
            process, the sides interleaved, `--repeats` times: fastest time by the conversion's own clock
            and as a whole `qpissa convert` command (process start and imports included, what a user
            waits), and median peak RSS.
  memory    calibrated conversions of synthetic Llama-3-8B-shaped checkpoints with 2 and 8 layers (the
            demo model's tokenizer, a small calibration set): peak RSS must not grow with depth.
  defaults  data-free QPiSSA r=64 T=5 with today's defaults (randomized SVD with a float32 sketch, double
            quant) against a bf16 sketch, no double quant and the exact SVD, one change each:
            what each default costs in held-out KL, and what it saves in time.
  variants  extra calibrated settings on the prose r=64 scenario, as `name=value` flags of `convert`
            (`--variants "damping=1.0;propagate=converted"`): how each default was chosen.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from qpissa.artifacts import SUMMARY_NAME
from qpissa.compare import compare
from qpissa.convert import convert
from qpissa.convert_settings import CompareSettings, ConvertSettings
from qpissa.demo_task import write_task
from qpissa.models import TOKENIZER_FILES, make_synthetic_checkpoint
from qpissa.options import from_dict
from qpissa.settings import FidelitySettings
from qpissa.worker import in_fresh_process

PROSE = Path(__file__).resolve().parent.parent / "qpissa" / "texts" / "calibration.txt"
SCENARIOS = {  # name -> (calibration data, rank, methods)
    "prose r64": ("prose", 64, "qlora,qpissa"),
    "task r64": ("task", 64, "qlora,qpissa"),
    "prose r16": ("prose", 16, "qpissa"),
}
TARGETS = {  # scenario -> KL of calibrated QPiSSA, at most this times QLoRA's
    "prose r64": 0.08, "task r64": 0.15, "prose r16": 0.2,
}  # fmt: skip


def quality(model: Path, work: Path) -> dict:
    """Each scenario's comparison; returns {scenario: {label: numbers}}."""
    results = {}
    for scenario, (data, rank, methods) in SCENARIOS.items():
        calib = PROSE if data == "prose" else _task_data(work)
        results[scenario] = _compare(model, work / scenario.replace(" ", "-"), calib, rank, methods, {})
    return results


DEFAULT_CHANGES = {  # label -> convert settings changed from the defaults
    "defaults": {}, "bf16 sketch": {"sketch_dtype": "bfloat16"}, "no double quant": {"double_quant": False},
    "exact SVD": {"svd": "exact"},
}  # fmt: skip


def defaults(model: Path, work: Path) -> dict:
    """Data-free QPiSSA r=64 T=5 under each of `DEFAULT_CHANGES`: {"data-free": {label: numbers}}."""
    rows = {}
    for label, changes in DEFAULT_CHANGES.items():
        out = work / ("defaults-" + label.replace(" ", "-"))
        rows[label] = _compare(model, out, None, 64, "qpissa", changes)["qpissa"]
    return {"data-free r64": rows}


def variants(model: Path, work: Path, specs: list[str]) -> dict:
    """Calibrated QPiSSA r=64 with other settings: {spec: {label: numbers}}. `data=task` calibrates on the
    demo task instead of the prose; every other `name=value` is a `--calib-NAME` flag (on/off for flags)."""
    results = {}
    for spec in specs:
        changes = dict(item.split("=", 1) for item in spec.split(",") if item)
        calib = _task_data(work) if changes.pop("data", "prose") == "task" else PROSE
        typed = {f"calib_{key}": json.loads(value) if value[:1].isdigit() else _flag(value)
                 for key, value in changes.items()}  # fmt: skip
        out = work / ("variant-" + spec.replace("=", "-").replace(",", "_"))
        results[spec] = _compare(model, out, calib, 64, "qpissa", typed)
    return results


def speed(model: Path, work: Path, repeats: int) -> dict:
    """Data-free and calibrated QPiSSA r=64 T=5 conversions, interleaved, each in a fresh process."""
    sides = {
        "data-free": ConvertSettings(rank=64, iters=5),
        "calibrated": ConvertSettings(rank=64, iters=5, calib=PROSE),
    }
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    commands: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, settings in sides.items():
            out = work / "speed" / name
            report = in_fresh_process(convert, model, out, settings, overwrite=True, show_progress=False)
            runs[name].append(report["summary"])
            shutil.rmtree(out)
            calib = ["--calib", str(settings.calib)] if settings.calib else []
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "qpissa", "--quiet", "convert", str(model), str(out), *calib],
                check=True, stdout=subprocess.DEVNULL,
            )  # fmt: skip
            commands[name].append(time.perf_counter() - started)
            shutil.rmtree(out)
    table = {
        name: {"seconds": [r["total_seconds"] for r in rows], "fastest": min(r["total_seconds"] for r in rows),
               "command_seconds": commands[name], "command_fastest": min(commands[name]),
               "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rows)}
        for name, rows in runs.items()
    }  # fmt: skip
    table["ratio"] = {
        "time": table["calibrated"]["fastest"] / table["data-free"]["fastest"],
        "command_time": table["calibrated"]["command_fastest"] / table["data-free"]["command_fastest"],
        "peak_rss": table["calibrated"]["peak_rss_mb"] / table["data-free"]["peak_rss_mb"],
    }
    return table


def memory(model: Path, work: Path) -> dict:
    """Peak RSS of calibrated conversions of 2- and 8-layer Llama-3-8B-shaped checkpoints (r=16, T=1)."""
    peaks = {}
    for layers in (2, 8):
        checkpoint = in_fresh_process(make_synthetic_checkpoint, work / f"synthetic-{layers}", layers)
        for name in TOKENIZER_FILES:  # a tokenizer for the calibration text; its ids fit the 128k vocab
            if (model / name).is_file():
                shutil.copy(model / name, checkpoint / name)
        settings = ConvertSettings(rank=16, iters=1, calib=PROSE, calib_samples=4, calib_seq_len=128)
        out = work / f"synthetic-{layers}-out"
        report = in_fresh_process(convert, checkpoint, out, settings, overwrite=True, show_progress=False)
        peaks[f"{layers} layers"] = {
            "peak_rss_mb": report["summary"]["peak_rss_mb"],
            "seconds": report["summary"]["total_seconds"],
        }
        shutil.rmtree(out)
        shutil.rmtree(checkpoint)
    peaks["growth"] = peaks["8 layers"]["peak_rss_mb"] / peaks["2 layers"]["peak_rss_mb"] - 1
    return peaks


def to_markdown(results: dict) -> str:
    lines = []
    for title, scenarios in (
        ("quality", results.get("quality", {})),
        ("variants", results.get("variants", {})),
        ("defaults", results.get("defaults", {})),
    ):
        if not scenarios:
            continue
        lines += [f"### {title}", "", "| scenario | conversion | KL | × QLoRA | top-1 % | perplexity | ppl gap closed % | "
                  "weight err red. % | output err red. % | seconds | peak RSS MB |", "|" + "---|" * 11]  # fmt: skip
        for scenario, rows in scenarios.items():
            qlora = rows.get("qlora", {}).get("kl")
            for label, row in rows.items():
                ratio = f"{row['kl'] / qlora:.3f}" if qlora else "–"
                lines.append(
                    f"| {scenario} | {label} | {row['kl']:.4f} | {ratio} | {100 * row['top1']:.1f} | "
                    f"{row['ppl']:.2f} (original {row['ppl_original']:.2f}) | {_gap_closed(row, rows.get('qlora'))} | "
                    f"{row['avg_fro']:.2f} | {_opt(row['avg_out'])} | {row['seconds']:.1f} | {row['peak_rss_mb']:.0f} |"
                )
        lines.append("")
    if "speed" in results:
        s = results["speed"]
        lines += [
            "### speed (r=64, T=5)",
            "",
            "| side | conversion s (every repeat) | fastest | whole command s (every repeat) | fastest | peak RSS MB |",
            "|---|---|---|---|---|---|",
        ]
        for name in ("data-free", "calibrated"):
            row = s[name]
            lines.append(
                f"| {name} | {', '.join(f'{x:.1f}' for x in row['seconds'])} | {row['fastest']:.1f} | "
                f"{', '.join(f'{x:.1f}' for x in row['command_seconds'])} | {row['command_fastest']:.1f} | "
                f"{row['peak_rss_mb']:.0f} |"
            )
        lines += [
            "",
            f"calibrated / data-free: time {s['ratio']['time']:.2f}x by the conversion's clock, "
            f"{s['ratio']['command_time']:.2f}x as whole commands; peak RSS {s['ratio']['peak_rss']:.2f}x",
            "",
        ]
    if "memory" in results:
        m = results["memory"]
        lines += ["### memory (Llama-3-8B-shaped, calibrated, r=16, T=1)", "",
                  *(f"{n}: {m[n]['peak_rss_mb']:.0f} MB ({m[n]['seconds']:.0f} s)" for n in ("2 layers", "8 layers")),
                  f"growth: {100 * m['growth']:+.1f} %", ""]  # fmt: skip
    return "\n".join(lines)


def _compare(model: Path, out: Path, calib: Path | None, rank: int, methods: str, changes: dict) -> dict:
    """One `qpissa compare` (with calibrated variants if `calib`); {label: KL, top-1, perplexities, errors,
    time, RSS}."""
    calibration = {} if calib is None else {"calib": str(calib)}
    settings = from_dict(ConvertSettings, {"rank": rank, "iters": 5, **calibration, **changes})
    compare(model, out, CompareSettings(methods=methods), settings, FidelitySettings(), show_progress=False)
    summary = json.loads((out / SUMMARY_NAME).read_text())
    rows = {}
    for label in summary["methods"]:
        f, q = summary["fidelity"][label], summary["quality"][label]
        rows[label] = {"kl": f["kl"], "top1": f["top1"], "ppl": f["ppl_model"], "ppl_original": f["ppl_original"],
                       "avg_fro": q["avg_fro"], "avg_out": q["avg_out"], "seconds": q["convert_seconds"],
                       "peak_rss_mb": q["convert_peak_rss_mb"]}  # fmt: skip
    return rows


def _task_data(work: Path) -> Path:
    train, _ = write_task(work / "task")
    return train


def _gap_closed(row: dict, qlora: dict | None) -> str:
    if not qlora or qlora["ppl"] <= row["ppl_original"]:
        return "–"
    return f"{100 * (qlora['ppl'] - row['ppl']) / (qlora['ppl'] - row['ppl_original']):.1f}"


def _flag(value: str) -> object:
    return {"on": True, "off": False}.get(value, value)


def _opt(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="the demo model's checkpoint directory")
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (comparisons are kept)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--parts", default="quality,speed,memory")
    parser.add_argument("--repeats", type=int, default=3, help="speed: conversions per side")
    parser.add_argument("--variants", default="", help="variants: ';'-separated lists of name=value")
    args = parser.parse_args()
    parts = args.parts.split(",")
    results: dict = {}
    if "quality" in parts:
        results["quality"] = quality(args.model, args.work)
    if "defaults" in parts:
        results["defaults"] = defaults(args.model, args.work)
    if "variants" in parts:
        results["variants"] = variants(args.model, args.work, [v for v in args.variants.split(";") if v])
    if "speed" in parts:
        results["speed"] = speed(args.model, args.work, args.repeats)
    if "memory" in parts:
        results["memory"] = memory(args.model, args.work)
    print(to_markdown(results))  # first: a long run's numbers are on screen whatever happens to the file
    if args.out:
        args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
