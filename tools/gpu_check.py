"""The GPU checks of `qpissa train` in one run: convert on CUDA (data-free and `--calib`), train 50 CUDA
steps, and compare QLoRA with QPiSSA in peak GPU memory and tokens/s on a Llama-3-8B-shaped model at
sequence length 1024.

The demo model's wheel (93 MB) does not fit a device machine's 64 MiB transfer, so the small model
here has the demo model's config and tokenizer (a few MB, they travel) with random weights; memory
and speed depend on shapes only. The CUDA conversion is checked against the same conversion on the
CPU (equal settings and seed must give the same error reduction) and timed against PEFT's PiSSA flow
on the same GPU by `tools/bench_convert.py --parts speed --sides ours,peft`. Every conversion and
training run goes through `qpissa.worker.in_fresh_process`.

    python tools/gpu_check.py --like demo/smollm2-135m --work /tmp/gpu --out gpu_check.json

A CPU dry run of the whole script (tiny sizes, minutes): add `--device cpu --layers 1 --steps 2
--big-steps 2 --seq-len 64`.

On a lent device machine, whose image lacks bitsandbytes and datasets and has other versions of
transformers and peft, carry the wheels and the demo model's small files (about 60 MB in all;
the download below was checked to resolve):

    echo /.whl/ >> .git/info/exclude; echo /.gpu/ >> .git/info/exclude
    pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl bitsandbytes==0.50.2 transformers==5.25.0 peft==0.21.2 datasets==5.2.0 dill==0.4.1 \
        multiprocess==0.70.19
    mkdir -p .gpu && cp demo/smollm2-135m/{config.json,tokenizer.json,tokenizer_config.json,chat_template.jinja} .gpu/
    # run with carry [".whl", ".gpu"], timeout 560 s:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
    PYTHONPATH=/tmp/site:$PWD python3 tools/gpu_check.py --like .gpu --work /tmp/gpu --out $OUT/gpu_check.json

By estimate (not yet measured) the small part takes ~3 min and the 8b part ~7 min (writing and
reading 16 GB of random weights dominates): if one call's 10 minutes do not hold both, run
`--parts small` and `--parts 8b` in two calls while the machine is still warm.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from qpissa.artifacts import EVAL_RESULTS_NAME, LOG_NAME, RUN_MARKER
from qpissa.cli import main as qpissa_main
from qpissa.convert import convert
from qpissa.convert_settings import ConvertSettings, Method
from qpissa.demo_task import write_task
from qpissa.models import TOKENIZER_FILES, make_synthetic_checkpoint
from qpissa.settings import Device
from qpissa.worker import in_fresh_process

ROOT = Path(__file__).resolve().parent.parent
PROSE = ROOT / "qpissa" / "texts" / "calibration.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--like", type=Path, required=True, help="the demo model's directory (config, tokenizer)"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/qpissa-gpu"), help="scratch directory")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="results JSON")
    parser.add_argument("--device", default="cuda", help="cuda; cpu for a dry run of the script")
    parser.add_argument("--steps", type=int, default=50, help="training steps on the small model")
    parser.add_argument("--layers", type=int, default=32, help="layers of the Llama-3-8B-shaped model")
    parser.add_argument("--big-steps", type=int, default=8, help="training steps per 8B-shaped run")
    parser.add_argument(
        "--seq-len", type=int, default=1024, help="packed sequence length of the 8B-shaped runs"
    )
    parser.add_argument("--parts", default="small,8b", help="small (convert + train), 8b, or both")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    parts = set(args.parts.split(","))
    results = {"date": datetime.date.today().isoformat(), "device": _device_name(args.device)}
    if "small" in parts:
        results["convert"] = small_model_conversion(args)
        results["train"] = small_model_training(args)
    if "8b" in parts:
        results["llama3_8b_shaped"] = llama3_8b_shaped(args)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def small_model_conversion(args: argparse.Namespace) -> dict:
    """QPiSSA r=64 T=5 of the small model, data-free and calibrated, on the device and on the CPU: same
    errors, and the times."""
    small = make_synthetic_checkpoint(args.work / "small", 0, like=args.like)
    device = _convert(
        small, args.work / "small-qpissa", ConvertSettings(rank=64, iters=5, device=Device(args.device))
    )
    # calibrated on the shipped prose, on the device and on the CPU: its cost against the data-free
    # conversion above, and the same output-error reduction wherever the calibration pass runs (random
    # weights: the time and memory hold, the KL does not; bench_calib measures that)
    calibrated = _convert(
        small, args.work / "small-qpissa-calib", ConvertSettings(rank=64, iters=5, device=Device(args.device),
                                                                 calib=PROSE),
    )  # fmt: skip
    calibrated_cpu = _convert(
        small, args.work / "small-qpissa-calib-cpu",
        ConvertSettings(rank=64, iters=5, device=Device.CPU, calib=PROSE),
    )  # fmt: skip
    cpu = _convert(
        small, args.work / "small-qpissa-cpu", ConvertSettings(rank=64, iters=5, device=Device.CPU)
    )
    for name in ("calib", "calib-cpu", "cpu"):
        shutil.rmtree(args.work / f"small-qpissa-{name}")
    # ours (r=64, T=5) against PEFT's pissa_niter_4 flow, both on the device, timed by bench_convert
    speed = _bench_against_peft(small, args.work)
    return {
        "device_seconds": device["total_seconds"], "cpu_seconds": cpu["total_seconds"],
        "device_avg_fro": device["avg_fro"], "cpu_avg_fro": cpu["avg_fro"],
        "device_peak_gpu_mb": device["peak_gpu_mb"], "calibrated_seconds": calibrated["total_seconds"],
        "calibrated_vs_data_free": calibrated["total_seconds"] / device["total_seconds"],
        "calibrated_peak_gpu_mb": calibrated["peak_gpu_mb"],
        "calibrated_cpu_seconds": calibrated_cpu["total_seconds"],
        "calibrated_device_avg_out": calibrated["avg_out"],
        "calibrated_cpu_avg_out": calibrated_cpu["avg_out"],
        "ours_seconds": speed["ours_seconds"], "peft_seconds": speed["peft_seconds"],
        "ours_vs_peft": speed["ours_vs_peft"],
    }  # fmt: skip


def small_model_training(args: argparse.Namespace) -> dict:
    """The demo recipe for `--steps` steps with the device's defaults (bf16, paged 8-bit AdamW on CUDA)."""
    task = _task_data(args.work)
    run = args.work / "runs/small"
    _train(ROOT / "configs/demo.yaml", [
        f"model={args.work / 'small-qpissa'}", f"output_dir={run}", f"data.path={task / 'train.jsonl'}",
        f"data.eval_path={task / 'eval.jsonl'}", f"max_steps={args.steps}", f"eval_steps={args.steps}",
        "data.eval_generate_samples=16", f"save_steps={args.steps}", f"device={args.device}",
    ])  # fmt: skip
    log = _log(run)
    evaluation = json.loads((run / EVAL_RESULTS_NAME).read_text())
    return {
        "steps": log[-1]["step"], "loss_step0": log[0]["loss"], "loss_last": log[-1]["loss"],
        "eval": evaluation, "peak_memory_mb": max(e["peak_memory_mb"] for e in log),
        "tokens_per_second": _tokens_per_second(log),
        "runtime": json.loads((run / RUN_MARKER).read_text()).get("runtime"),
    }  # fmt: skip


def llama3_8b_shaped(args: argparse.Namespace) -> dict:
    """Convert a random Llama-3-8B-shaped model with QLoRA and QPiSSA, then train each with the 24 GB
    recipe (batch 4, packed sequences of `--seq-len`) and read peak GPU memory and tokens/s."""
    big = in_fresh_process(make_synthetic_checkpoint, args.work / "llama3-8b", args.layers)
    for name in TOKENIZER_FILES:  # any tokenizer will do for shapes: the demo model's ids fit the vocab
        if (args.like / name).is_file():
            shutil.copy(args.like / name, big / name)
    task = _task_data(args.work)
    results = {"layers": args.layers, "seq_len": args.seq_len, "batch": 4}
    methods = (Method.QLORA, Method.QPISSA)
    for method in methods:
        # T=1: training memory and speed depend on the shapes of Q, A and B, not on how they were fitted
        iters = 1 if method is Method.QPISSA else None
        settings = ConvertSettings(method=method, rank=64, iters=iters, device=Device(args.device))
        report = _convert(big, args.work / f"llama3-8b-{method.value}", settings)
        results[f"{method.value}_convert_seconds"] = report["total_seconds"]
    shutil.rmtree(big)
    for method in (m.value for m in methods):
        run = args.work / f"runs/llama3-8b-{method}"
        _train(ROOT / "configs/llama3-8b-24gb.yaml", [
            f"model={args.work / f'llama3-8b-{method}'}", f"output_dir={run}",
            f"data.path={task / 'train.jsonl'}", "data.eval_path=null", "data.packing=true",
            f"data.max_seq_len={args.seq_len}", "gradient_accumulation_steps=1", f"max_steps={args.big_steps}",
            "eval_steps=null", f"save_steps={10 * args.big_steps}", "logging_steps=1", f"device={args.device}",
            *(("bf16=null", "optim=auto") if args.device == "cpu" else ()),  # the recipe's CUDA-only options
        ])  # fmt: skip
        log = _log(run)
        results[f"{method}_peak_memory_mb"] = max(e["peak_memory_mb"] for e in log)
        results[f"{method}_tokens_per_second"] = _tokens_per_second(log)
    results["memory_ratio"] = results["qpissa_peak_memory_mb"] / results["qlora_peak_memory_mb"]
    results["throughput_ratio"] = results["qpissa_tokens_per_second"] / results["qlora_tokens_per_second"]
    return results


def _task_data(work: Path) -> Path:
    task = work / "task"
    if not (task / "train.jsonl").is_file():
        write_task(task)
    return task


def _convert(model: Path, out: Path, settings: ConvertSettings) -> dict:
    """One conversion in a fresh process (its peak memory is its own); returns the report's summary."""
    report = in_fresh_process(convert, model, out, settings, overwrite=True, show_progress=False)
    summary = report["summary"]
    print(
        f"convert {out.name}: {summary['total_seconds']:.1f} s, AVG fro {summary['avg_fro']:.2f} %",
        flush=True,
    )
    return summary


def _bench_against_peft(model: Path, work: Path) -> dict:
    """`tools/bench_convert.py`'s speed part, ours against PEFT's flow only, once; its speed results."""
    out = work / "bench_convert.json"
    command = [sys.executable, str(ROOT / "tools/bench_convert.py"), "--model", str(model), "--work",
               str(work / "bench"), "--out", str(out), "--parts", "speed", "--sides", "ours,peft", "--repeats", "1"]  # fmt: skip
    subprocess.run(command, check=True)
    return json.loads(out.read_text())["speed"]


def _train(config: Path, overrides: list[str]) -> None:
    if in_fresh_process(qpissa_main, ["--quiet", "train", str(config), *overrides]) != 0:
        sys.exit(f"qpissa train {config} failed")


def _tokens_per_second(log: list[dict]) -> float:
    """Median over the steps after the first two, which pay for allocation and warm-up."""
    rates = [entry["tokens_per_second"] for entry in log if entry["tokens_per_second"] is not None]
    return statistics.median(rates[2:] or rates)


def _log(run: Path) -> list[dict]:
    lines = (run / LOG_NAME).read_text().splitlines()
    return [entry for entry in map(json.loads, lines) if "loss" in entry]


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


if __name__ == "__main__":
    main()
