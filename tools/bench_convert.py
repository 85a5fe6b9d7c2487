"""Benchmark `qpissa convert` against the references and PEFT's own PiSSA flow, side by side in one run.

    python tools/bench_convert.py --model /path/to/smollm2-135m --work /tmp/bench --out bench_convert.json

Parts (all by default):
  quality  AVG nuclear-norm reduction of LoftQ and QPiSSA at r ∈ {16, 64}, T ∈ {1, 5} (randomized SVD,
           NF4 blocksize 64, no double quant: the paper's setting) against REFERENCE.md §6;
  speed    ours (randomized, r=64, T=5) vs PEFT's flow (load bf16, get_peft_model with
           init_lora_weights="pissa_niter_4", save the residual) vs the exact-SVD iterative loop;
  memory   peak RSS of ours vs the PEFT flow on the demo model, and ours on a synthetic
           Llama-3-8B-shaped checkpoint with 2 vs 8 layers.
Each measurement runs in a fresh process, so peak RSS is that run's own.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

# REFERENCE.md §6: AVG nuclear-norm reduction (%) of the straightforward exact-SVD implementations
REFERENCE_AVG = {
    ("loftq", 16, 1): 9.03, ("qpissa", 16, 1): 9.07, ("loftq", 16, 5): 16.77, ("qpissa", 16, 5): 18.45,
    ("loftq", 64, 1): 29.69, ("qpissa", 64, 1): 28.07, ("loftq", 64, 5): 38.21, ("qpissa", 64, 5): 46.75,
}  # fmt: skip
TOLERANCE = 0.3


def run_ours(model: Path, out: Path, *flags: str) -> dict:
    """One `qpissa convert` in a fresh process; returns its report (timings and peak RSS included)."""
    command = [
        sys.executable,
        "-m",
        "qpissa.cli",
        "--quiet",
        "convert",
        str(model),
        str(out),
        "--overwrite",
        *flags,
    ]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    report = json.loads((out / "qpissa_report.json").read_text())
    shutil.rmtree(out)
    return report


def run_peft(model: Path, out: Path, rank: int) -> dict:
    """PEFT's PiSSA flow in a fresh process (see `_peft_child`)."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, __file__, "--peft-child", str(model), str(out), str(rank)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    shutil.rmtree(out)
    return json.loads(done.stdout.strip().splitlines()[-1])


def quality(model: Path, work: Path) -> list[dict]:
    rows = []
    for (method, rank, iters), reference in REFERENCE_AVG.items():
        flags = ["--method", method, "--rank", str(rank), "--iters", str(iters), "--no-double-quant"]
        report = run_ours(model, work / "quality", *flags, "--metrics", "nuc")
        avg = report["summary"]["avg"]
        rows.append({
            "method": method, "rank": rank, "iters": iters, "avg_nuc": avg, "avg_fro": report["summary"]["avg_fro"],
            "reference": reference, "delta": avg - reference, "ok": avg >= reference - TOLERANCE,
            "convert_seconds": report["summary"]["total_seconds"] - report["summary"]["metrics_seconds"],
        })  # fmt: skip
        print(
            f"quality {method} r={rank} T={iters}: {avg:.2f} % (reference {reference:.2f})", file=sys.stderr
        )
    return rows


def speed_and_memory(model: Path, work: Path) -> dict:
    flags = ["--rank", "64", "--iters", "5", "--no-double-quant"]
    ours = run_ours(model, work / "ours", *flags)
    exact = run_ours(model, work / "exact", *flags, "--svd", "exact")
    peft = run_peft(model, work / "peft", 64)
    ours_s = ours["summary"]["total_seconds"] - ours["summary"]["metrics_seconds"]
    exact_s = exact["summary"]["total_seconds"] - exact["summary"]["metrics_seconds"]
    return {
        "ours_seconds": ours_s, "peft_seconds": peft["seconds"], "exact_loop_seconds": exact_s,
        "ours_vs_peft": ours_s / peft["seconds"], "exact_vs_ours": exact_s / ours_s,
        "ours_avg_fro": ours["summary"]["avg_fro"], "exact_avg_fro": exact["summary"]["avg_fro"],
        "ours_rss_mb": ours["summary"]["peak_rss_mb"], "peft_rss_mb": peft["peak_rss_mb"],
        "rss_ratio": ours["summary"]["peak_rss_mb"] / peft["peak_rss_mb"],
    }  # fmt: skip


def layer_scaling(work: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from make_synthetic_checkpoint import make_checkpoint

    rss = {}
    for layers in (2, 8):
        checkpoint = make_checkpoint(work / f"llama3-8b-{layers}l", layers)
        report = run_ours(checkpoint, work / "synthetic-out", "--rank", "16", "--iters", "1")
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
            "| measure | ours (randomized, r=64, T=5) | PEFT pissa_niter_4 (r=64, T=1) | exact-SVD loop (r=64, T=5) |",
            "|---|---|---|---|",
            f"| conversion seconds | {s['ours_seconds']:.1f} | {s['peft_seconds']:.1f} | {s['exact_loop_seconds']:.1f} |",
            f"| peak RSS MB | {s['ours_rss_mb']:.0f} | {s['peft_rss_mb']:.0f} | |",
            f"| AVG Frobenius reduction % | {s['ours_avg_fro']:.2f} | | {s['exact_avg_fro']:.2f} |",
            "",
            f"ours / PEFT time: {s['ours_vs_peft']:.2f}x (target ≤ 1.5); exact loop / ours: {s['exact_vs_ours']:.1f}x "
            f"(target ≥ 5); ours / PEFT peak RSS: {s['rss_ratio']:.2f} (target ≤ 0.5)",
            "",
        ]
    if "memory" in results:
        m = results["memory"]
        lines.append(
            f"Llama-3-8B-shaped synthetic checkpoint, r=16 T=1: peak RSS {m['rss_2_layers_mb']:.0f} MB with 2 layers, "
            f"{m['rss_8_layers_mb']:.0f} MB with 8 layers ({m['growth'] * 100:+.1f} %; target within ±10 %)"
        )
    return "\n".join(lines)


def _peft_child(model: Path, out: Path, rank: int) -> None:
    """PEFT's documented PiSSA flow, timed from loading to the saved residual; prints JSON."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules="all-linear",
        init_lora_weights="pissa_niter_4",
    )
    peft_model = get_peft_model(base, config)
    peft_model.peft_config["default"].init_lora_weights = True
    peft_model.save_pretrained(out / "pissa_init")
    peft_model.unload().save_pretrained(out / "residual")
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
        )
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--peft-child":
        _peft_child(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, required=True, help="the demo model (qpissa fetch-model smollm2-135m DIR)"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/qpissa-bench"), help="scratch directory")
    parser.add_argument("--out", type=Path, default=Path("bench_convert.json"), help="results JSON")
    parser.add_argument("--parts", default="quality,speed,memory", help="comma-separated subset")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    results: dict = {}
    if "speed" in parts:
        results["speed"] = speed_and_memory(args.model, args.work)
    if "quality" in parts:
        results["quality"] = quality(args.model, args.work)
    if "memory" in parts:
        results["memory"] = layer_scaling(args.work)
    args.out.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(to_markdown(results))


if __name__ == "__main__":
    main()
