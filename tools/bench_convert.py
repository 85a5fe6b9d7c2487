"""Benchmark `qpissa convert` against the references and PEFT's own PiSSA flow, side by side in one run.

    python tools/bench_convert.py --model /path/to/smollm2-135m --work /tmp/bench --out bench_convert.json
    python tools/bench_convert.py --model DIR --parts speed --sides ours,peft --repeats 1   # ours vs PEFT only

Parts (all by default):
  quality  AVG nuclear-norm reduction of LoftQ and QPiSSA at r ∈ {16, 64}, T ∈ {1, 5} (randomized SVD,
           NF4 blocksize 64, no double quant: the paper's setting) against REFERENCE.md §6;
  speed    ours (randomized, r=64, T=5) vs PEFT's flow (load bf16, get_peft_model with
           init_lora_weights="pissa_niter_4", save the residual) vs the straightforward exact-SVD
           iterative loop of REFERENCE.md §6 (torch.linalg.svd + bitsandbytes NF4 each iteration);
  memory   peak RSS of ours vs the PEFT flow on the demo model, and ours on a synthetic
           Llama-3-8B-shaped checkpoint with 2 vs 8 layers.
Each measurement runs in a fresh process (`qpissa.worker.in_fresh_process`), so peak RSS is that
run's own. Timed sides import the same libraries (torch, transformers with the model's class, peft,
bitsandbytes) before their clock starts, and each runs `--repeats` times, the sides interleaved: the fastest time counts (the machine's speed
drifts between runs), and the median peak RSS (which varies by ~10 % from run to run). Our own error
metrics are excluded from our time: the report sums them over matrices, measured `workers` at a time,
so their share of the wall time is that sum divided by the workers.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

from qpissa.checkpoint import CheckpointReader
from qpissa.convert import convert
from qpissa.convert_settings import ALL_LINEAR, ConvertSettings, Method, MetricKind
from qpissa.memory import peak_rss_mb
from qpissa.models import make_synthetic_checkpoint
from qpissa.targets import resolve_targets
from qpissa.worker import in_fresh_process

# REFERENCE.md §6: AVG nuclear-norm reduction (%) of the straightforward exact-SVD implementations
REFERENCE_AVG = {
    ("loftq", 16, 1): 9.03, ("qpissa", 16, 1): 9.07, ("loftq", 16, 5): 16.77, ("qpissa", 16, 5): 18.45,
    ("loftq", 64, 1): 29.69, ("qpissa", 64, 1): 28.07, ("loftq", 64, 5): 38.21, ("qpissa", 64, 5): 46.75,
}  # fmt: skip
TOLERANCE = 0.3
SIDES = ("ours", "peft", "reference")


def run_ours(model: Path, out: Path, settings: ConvertSettings) -> dict:
    """One conversion in a fresh process; returns its report (timings and peak RSS included) and
    removes the output."""
    report = in_fresh_process(convert, model, out, settings, overwrite=True, show_progress=False)
    shutil.rmtree(out)
    return report


def quality(model: Path, work: Path) -> list[dict]:
    rows = []
    for (method, rank, iters), reference in REFERENCE_AVG.items():
        settings = ConvertSettings(
            method=Method(method), rank=rank, iters=iters, double_quant=False, metrics=MetricKind.NUC
        )
        report = run_ours(model, work / "quality", settings)
        avg = report["summary"]["avg"]
        rows.append({
            "method": method, "rank": rank, "iters": iters, "avg_nuc": avg, "avg_fro": report["summary"]["avg_fro"],
            "reference": reference, "delta": avg - reference, "ok": avg >= reference - TOLERANCE,
            "convert_seconds": report["summary"]["total_seconds"] - _metric_wall_seconds(report),
        })  # fmt: skip
        print(
            f"quality {method} r={rank} T={iters}: {avg:.2f} % (reference {reference:.2f})", file=sys.stderr
        )
    return rows


def speed_and_memory(model: Path, work: Path, repeats: int, sides: tuple[str, ...] = SIDES) -> dict:
    """Each side `repeats` times, interleaved so that every side samples the machine's speed drift
    alike: the fastest time counts, and the median peak RSS. Ratios are given where both sides ran."""
    runs = {side: [] for side in sides}
    for _ in range(repeats):
        for side in sides:
            runs[side].append(run_side(side, model, work / side))
    every = {side: [r["seconds"] for r in results] for side, results in runs.items()}
    seconds = {side: min(times) for side, times in every.items()}
    median = {side: statistics.median(times) for side, times in every.items()}
    rss = {side: statistics.median(r["peak_rss_mb"] for r in results) for side, results in runs.items()}
    result = {"all_seconds": every, "repeats": repeats, "ours_seconds": seconds["ours"],
              "ours_avg_fro": runs["ours"][0]["avg_fro"], "ours_rss_mb": rss["ours"]}  # fmt: skip
    if "peft" in sides:
        result.update({
            "peft_seconds": seconds["peft"], "ours_vs_peft": seconds["ours"] / seconds["peft"],
            "ours_vs_peft_median": median["ours"] / median["peft"], "peft_rss_mb": rss["peft"],
            "rss_ratio": rss["ours"] / rss["peft"],
        })  # fmt: skip
    if "reference" in sides:
        result.update({
            "exact_loop_seconds": seconds["reference"], "exact_vs_ours": seconds["reference"] / seconds["ours"],
            "exact_avg_fro": runs["reference"][0]["avg_fro"],
        })  # fmt: skip
    return result


def run_side(side: str, model: Path, out: Path) -> dict:
    """One timed side in a fresh process (see `time_side`): seconds, peak RSS, AVG Frobenius reduction."""
    shutil.rmtree(out, ignore_errors=True)
    result = in_fresh_process(time_side, side, model, out)
    shutil.rmtree(out, ignore_errors=True)
    print(
        f"speed {side}: {result['seconds']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB", file=sys.stderr
    )
    return result


def layer_scaling(work: Path) -> dict:
    """Peak RSS of converting 2 and 8 Llama-3-8B-shaped layers (the checkpoints, GBs of random
    weights, are made in a fresh process too, so that this one stays small)."""
    rss = {}
    for layers in (2, 8):
        checkpoint = in_fresh_process(make_synthetic_checkpoint, work / f"llama3-8b-{layers}l", layers)
        report = run_ours(checkpoint, work / "synthetic-out", ConvertSettings(rank=16, iters=1))
        rss[layers] = report["summary"]["peak_rss_mb"]
        shutil.rmtree(checkpoint)
        print(f"memory 8B-shaped {layers} layers: peak RSS {rss[layers]:.0f} MB", file=sys.stderr)
    return {"rss_2_layers_mb": rss[2], "rss_8_layers_mb": rss[8], "growth": rss[8] / rss[2] - 1}


def to_markdown(results: dict) -> str:
    lines = []
    if "quality" in results:
        lines += [
            "| method | r | T | AVG nuc % (ours) | reference | delta | ≥ ref − 0.3 | convert s |",
            "|---" * 8 + "|",
        ]
        for row in results["quality"]:
            lines.append(
                f"| {row['method']} | {row['rank']} | {row['iters']} | {row['avg_nuc']:.2f} | {row['reference']:.2f} "
                f"| {row['delta']:+.2f} | {'yes' if row['ok'] else 'NO'} | {row['convert_seconds']:.1f} |"
            )
        lines.append("")
    if "speed" in results:
        s = results["speed"]
        lines += [
            "| measure | ours (randomized, r=64, T=5) | PEFT pissa_niter_4 (r=64, T=1) | reference exact-SVD loop (r=64, T=5) |",
            "|---|---|---|---|",
            f"| conversion seconds | {s['ours_seconds']:.1f} | {_cell(s, 'peft_seconds', '{:.1f}')} | {_cell(s, 'exact_loop_seconds', '{:.1f}')} |",
            "| every repeat, in order | "
            + " | ".join(_listed(s["all_seconds"].get(side, [])) for side in SIDES)
            + " |",
            f"| peak RSS MB | {s['ours_rss_mb']:.0f} | {_cell(s, 'peft_rss_mb', '{:.0f}')} | |",
            f"| AVG Frobenius reduction % | {s['ours_avg_fro']:.2f} | | {_cell(s, 'exact_avg_fro', '{:.2f}')} |",
            "",
            f"ours / PEFT time: {_cell(s, 'ours_vs_peft', '{:.2f}')}x fastest to fastest, "
            f"{_cell(s, 'ours_vs_peft_median', '{:.2f}')}x median to median (target ≤ 1.5); exact loop / ours: "
            f"{_cell(s, 'exact_vs_ours', '{:.1f}')}x (target ≥ 5); ours / PEFT peak RSS: "
            f"{_cell(s, 'rss_ratio', '{:.2f}')} (target ≤ 0.5)",
            "",
        ]
    if "memory" in results:
        m = results["memory"]
        lines.append(
            f"Llama-3-8B-shaped synthetic checkpoint, r=16 T=1: peak RSS {m['rss_2_layers_mb']:.0f} MB with 2 layers, "
            f"{m['rss_8_layers_mb']:.0f} MB with 8 layers ({m['growth'] * 100:+.1f} %; target within ±10 %)"
        )
    return "\n".join(lines)


def time_side(side: str, model: Path, out: Path) -> dict:
    """Import what every side needs, then time one side from loading to written output.

    Returns:
        seconds (the side's own metric time excluded), peak_rss_mb, avg_fro (None for PEFT's side).
    """
    import bitsandbytes  # noqa: F401  (imported before the clock by every side alike)
    import peft  # noqa: F401
    import transformers

    config = transformers.AutoConfig.from_pretrained(model)
    transformers.AutoModelForCausalLM._model_mapping[type(config)]  # imports the model's class
    start = time.perf_counter()
    avg_fro, excluded = {"ours": _ours, "peft": _peft, "reference": _reference}[side](model, out)
    seconds = time.perf_counter() - start - excluded
    return {"seconds": seconds, "peak_rss_mb": peak_rss_mb(), "avg_fro": avg_fro}


def _listed(seconds: list[float]) -> str:
    return ", ".join(f"{value:.1f}" for value in seconds)


def _cell(results: dict, key: str, fmt: str) -> str:
    return fmt.format(results[key]) if key in results else "–"


def _ours(model: Path, out: Path) -> tuple[float, float]:
    """`qpissa convert` at r=64, T=5 (randomized defaults); its own metric time is excluded."""
    settings = ConvertSettings(rank=64, iters=5, double_quant=False)
    report = convert(model, out, settings, overwrite=True, show_progress=False)
    return report["summary"]["avg_fro"], _metric_wall_seconds(report)


def _metric_wall_seconds(report: dict) -> float:
    """Wall time of our error metrics: the report sums them over matrices, which `workers` threads
    measure side by side, so their share of the wall time is that sum spread over the workers."""
    return report["summary"]["metrics_seconds"] / report["settings"]["workers"]


def _peft(model: Path, out: Path) -> tuple[None, float]:
    """PEFT's documented PiSSA flow: load bf16, pissa_niter_4 init, save adapter and 16-bit residual."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    device_map = "cuda" if torch.cuda.is_available() else None  # PEFT's SVD runs where the weight is
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, device_map=device_map)
    config = LoraConfig(
        r=64, lora_alpha=64, lora_dropout=0.0, target_modules="all-linear", init_lora_weights="pissa_niter_4"
    )
    peft_model = get_peft_model(base, config)
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(out / "pissa_init")
    peft_model.unload().save_pretrained(out / "residual")
    return None, 0.0


def _reference(model: Path, out: Path) -> tuple[float, float]:
    """REFERENCE.md §6's straightforward iterative QPiSSA (r=64, T=5): an exact float32 SVD and
    bitsandbytes' own NF4 (blocksize 64, no double quant) every iteration; error metric excluded."""
    import bitsandbytes.functional as bnbf
    import torch
    from safetensors.torch import save_file

    rank, iters, reductions, excluded, outputs = 64, 5, {}, 0.0, {}
    reader = CheckpointReader(model)
    for module in resolve_targets(ALL_LINEAR, reader, rank):
        W = reader.read(f"{module}.weight").float()
        M = W
        for _ in range(iters):
            U, S, Vh = torch.linalg.svd(M, full_matrices=False)
            B, A = U[:, :rank] * S[:rank].sqrt(), S[:rank].sqrt()[:, None] * Vh[:rank]
            packed, state = bnbf.quantize_4bit(W - B @ A, blocksize=64, quant_type="nf4")
            M = W - bnbf.dequantize_4bit(packed, state)
        outputs |= {
            f"{module}.weight": packed,
            f"{module}.lora_A": A.contiguous(),
            f"{module}.lora_B": B.contiguous(),
        }
        tick = time.perf_counter()
        baseline = W - bnbf.dequantize_4bit(*bnbf.quantize_4bit(W, blocksize=64, quant_type="nf4"))
        reduction = 1 - torch.linalg.norm(
            W - B @ A - bnbf.dequantize_4bit(packed, state)
        ) / torch.linalg.norm(baseline)
        reductions.setdefault(module.rsplit(".", 1)[-1], []).append(100 * reduction.item())
        excluded += time.perf_counter() - tick
    out.mkdir(parents=True)
    save_file(outputs, out / "reference.safetensors")
    per_type = [sum(values) / len(values) for values in reductions.values()]
    return sum(per_type) / len(per_type), excluded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, required=True, help="the demo model (qpissa fetch-model smollm2-135m DIR)"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/qpissa-bench"), help="scratch directory")
    parser.add_argument("--out", type=Path, default=Path("bench_convert.json"), help="results JSON")
    parser.add_argument("--parts", default="quality,speed,memory", help="comma-separated subset")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per side; the fastest counts")
    parser.add_argument(
        "--sides", default=",".join(SIDES), help="speed: comma-separated subset of " + ", ".join(SIDES)
    )
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    results: dict = {}
    if "speed" in parts:
        sides = tuple(side for side in SIDES if side in args.sides.split(","))
        results["speed"] = speed_and_memory(args.model, args.work, args.repeats, sides)
    if "quality" in parts:
        results["quality"] = quality(args.model, args.work)
    if "memory" in parts:
        results["memory"] = layer_scaling(args.work)
    args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(to_markdown(results))


if __name__ == "__main__":
    main()
