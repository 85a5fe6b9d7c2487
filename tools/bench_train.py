"""Benchmark `qpissa train` on the demo model: QLoRA vs LoftQ vs QPiSSA (data-free and calibrated), seeds.

Every method is converted once at the same rank and trained with the same recipe under each training
seed, each run in a fresh process (`qpissa.worker.in_fresh_process`: peak RSS is per process). Runs
alternate the method order from seed to seed (forward, then reversed), so a drift of the machine's
speed does not favour one method's step time. `qpissa-calib` is QPiSSA calibrated on the task's own
training data (`convert --calib`). With `--baseline`, plain PEFT + Trainer also trains once: the
original checkpoint with transformers' BitsAndBytesConfig (NF4 quantized at load) and a PEFT LoRA, i.e.
the QLoRA users run today, with the same data, Trainer arguments and step log. Results come from the
runs' JSONL files only: per method the mean ± std over seeds of the held-out loss and exact match.

Usage:
    python tools/bench_train.py --model /work/cache/smollm2-135m --work /work/cache/bench \\
        --steps 60 --seeds 0,1,2 --out benchmarks/train.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

from qpissa.artifacts import EVAL_LOG_NAME, EVAL_RESULTS_NAME, LOG_NAME, REPORT_NAME
from qpissa.cli import main as qpissa_main
from qpissa.convert_settings import Method
from qpissa.demo_task import write_task
from qpissa.worker import in_fresh_process

CALIBRATED = "qpissa-calib"  # QPiSSA calibrated on the task's training data
METHODS = (*(method.value for method in (Method.QLORA, Method.LOFTQ, Method.QPISSA)), CALIBRATED)
BASELINE = "peft-baseline"


def main() -> None:
    """Convert, train and tabulate; or (with --baseline-run) train the plain PEFT baseline in this process."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="original HF checkpoint (the demo model)")
    parser.add_argument("--work", type=Path, required=True, help="where conversions, data and runs go")
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"), help="training recipe")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument(
        "--seeds", default="0,1,2", help="comma-separated training seeds; every method runs each"
    )
    parser.add_argument("--rank", type=int, default=64, help="adapter rank for every method")
    parser.add_argument("--iters", type=int, default=5, help="LoftQ / QPiSSA iterations T")
    parser.add_argument("--generate", type=int, default=100, help="eval samples scored by exact match")
    parser.add_argument("--overrides", nargs="*", default=[], help="extra key=value recipe overrides")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset to run now")
    parser.add_argument("--baseline", action="store_true", help="also train plain PEFT + Trainer (seed 0)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/train.md"), help="Markdown result")
    parser.add_argument(
        "--baseline-run",
        type=Path,
        help="only train the PEFT baseline into this run directory (run it beside others)",
    )
    args = parser.parse_args()
    overrides = _overrides(args)
    if args.baseline_run:
        train_peft_baseline(args.model, args.config, overrides, args.rank, args.baseline_run)
        return
    _ensure_data(args.work)
    methods = args.methods.split(",")
    converted = {method: _convert(args.model, args.work, method, args.rank, args.iters) for method in methods}
    runs: dict[tuple[str, int], Path] = {}
    for index, seed in enumerate(int(seed) for seed in args.seeds.split(",")):
        for method in methods if index % 2 == 0 else reversed(methods):
            runs[method, seed] = _train(args, converted[method], method, seed, overrides)
    if args.baseline:
        runs[BASELINE, 0] = _train_baseline(args, overrides)
    table = summarize(runs) + "\n\n" + tabulate(runs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    args.out.write_text(f"# `qpissa train` benchmark\n\nCommand: `python {command}`\n\n{table}\n")
    print(table)


def train_peft_baseline(
    model_dir: Path, config_path: Path, overrides: list[str], rank: int, run_dir: Path
) -> None:
    """Plain QLoRA: NF4 at load (BitsAndBytesConfig) + PEFT LoRA + Trainer, same data and arguments."""
    # imported here, after the fresh process hid the libraries' notes (the top of this file runs first)
    from functools import partial

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer
    from transformers.trainer_callback import PrinterCallback

    from qpissa.data import collate, load_train, pad_token_id
    from qpissa.recipe_file import load_config
    from qpissa.runtime import resolve_runtime
    from qpissa.trainer_options import training_arguments
    from qpissa.trainlog import JsonlLogCallback

    config = load_config(config_path, [*overrides, f"output_dir={run_dir}", "model=."])
    runtime = resolve_runtime(config.device, config.bf16, config.optim)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = load_train(config.data, tokenizer, config.seed)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=runtime.dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quantization, dtype=runtime.dtype, device_map={"": str(runtime.device)}
    )
    lora = LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(
        model=model,
        args=training_arguments(config, runtime, run_dir, show_progress=False),
        train_dataset=data.rows,
        data_collator=partial(collate, pad_token_id=pad_token_id(tokenizer)),
        callbacks=[JsonlLogCallback(run_dir / LOG_NAME, run_dir / EVAL_LOG_NAME, runtime.device, None, 10)],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()


def summarize(runs: dict[tuple[str, int], Path]) -> str:
    """Markdown table per method over its seeds: mean ± std of held-out loss and exact match, step time."""
    header = [
        "method",
        "seeds",
        "step-0 loss",
        "held-out loss",
        "exact match %",
        "s/step (median)",
        "peak RSS MB",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method in dict.fromkeys(label for label, _ in runs):
        results = [_run_numbers(run_dir) for (label, _), run_dir in runs.items() if label == method]
        cells = [method, str(len(results))]
        for key, scale in (("step0", 1), ("eval_loss", 1), ("accuracy", 100)):
            cells.append(_mean_std([r[key] * scale for r in results if r[key] is not None]))
        cells.append(_mean_std([r["step_seconds"] for r in results]))
        cells.append(f"{max(r['peak_mb'] for r in results):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tabulate(runs: dict[tuple[str, int], Path]) -> str:
    """Markdown table of every run, in the order they ran: losses, final eval, memory, speed."""
    header = ["run", "seed", "step 0", "loss@1", "mean loss of last 10", "eval loss", "exact match",
              "peak RSS MB", "s/step (median)", "tokens/s (median)", "wall s"]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (label, seed), run_dir in runs.items():
        r = _run_numbers(run_dir)
        cells = [
            label,
            str(seed),
            _fmt(r["step0"]),
            _fmt(r["loss1"]),
            _fmt(r["last10"]),
            _fmt(r["eval_loss"]),
        ]
        cells += [_percent(r["evaluation"]), f"{r['peak_mb']:.0f}", f"{r['step_seconds']:.2f}"]
        cells += [f"{r['tokens_per_second']:.0f}", f"{r['wall']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _run_numbers(run_dir: Path) -> dict:
    """What the tables show of one run, from its trainer_log.jsonl and eval_results.json."""
    log = {row["step"]: row for row in map(json.loads, (run_dir / LOG_NAME).read_text().splitlines())}
    results = run_dir / EVAL_RESULTS_NAME
    evaluation = json.loads(results.read_text()) if results.is_file() else {}
    steps = [s for s in log if s > 0]
    # time per step between consecutive logged steps (from the second on: the first includes warm-up)
    gaps = [(log[b]["elapsed"] - log[a]["elapsed"]) / (b - a) for a, b in itertools.pairwise(steps[1:])]
    return {
        "step0": log.get(0, {}).get("loss"),
        "loss1": log.get(1, {}).get("loss"),
        "last10": statistics.mean(log[s]["loss"] for s in steps[-10:]),
        "eval_loss": evaluation.get("loss"),
        "accuracy": evaluation.get("accuracy"),
        "evaluation": evaluation,
        "peak_mb": max(log[s]["peak_memory_mb"] for s in steps),
        "step_seconds": statistics.median(gaps) if gaps else log[steps[-1]]["elapsed"] / steps[-1],
        "tokens_per_second": statistics.median(log[s]["tokens_per_second"] for s in steps[1:] or steps),
        "wall": log[steps[-1]]["elapsed"],
    }


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4g} ± {spread:.2g}"


def _overrides(args: argparse.Namespace) -> list[str]:
    data = args.work / "task"
    return [
        f"max_steps={args.steps}",
        f"data.path={data / 'train.jsonl'}",
        f"data.eval_path={data / 'eval.jsonl'}",
        f"data.eval_generate_samples={args.generate}",
        "eval_steps=null",
        f"save_steps={args.steps}",
        *args.overrides,
    ]


def _convert(model: Path, work: Path, method: str, rank: int, iters: int) -> Path:
    out = work / f"{method}-r{rank}"
    if not (out / REPORT_NAME).is_file():
        base_method = Method.QPISSA.value if method == CALIBRATED else method
        flags = [] if method == Method.QLORA.value else ["--iters", str(iters)]
        if method == CALIBRATED:
            flags += ["--calib", str(work / "task" / "train.jsonl")]
        _run(
            [
                "convert",
                str(model),
                str(out),
                "--method",
                base_method,
                "--rank",
                str(rank),
                *flags,
                "--overwrite",
            ]
        )
    return out


def _train(args: argparse.Namespace, qpissa_dir: Path, method: str, seed: int, overrides: list[str]) -> Path:
    run_dir = args.work / "runs" / f"{method}-seed{seed}"
    if not (run_dir / EVAL_RESULTS_NAME).is_file():
        settings = [
            f"model={qpissa_dir}",
            f"output_dir={run_dir}",
            f"seed={seed}",
            "overwrite_output_dir=true",
        ]
        _run(["train", str(args.config), *overrides, *settings])
    return run_dir


def _train_baseline(args: argparse.Namespace, overrides: list[str]) -> Path:
    run_dir = args.work / "runs" / BASELINE
    if not (run_dir / LOG_NAME).is_file():
        in_fresh_process(train_peft_baseline, args.model, args.config, overrides, args.rank, run_dir)
    return run_dir


def _ensure_data(work: Path) -> None:
    if not (work / "task" / "train.jsonl").is_file():
        write_task(work / "task")


def _run(arguments: list[str]) -> None:
    """One `qpissa` command in a fresh process (peak RSS is its own)."""
    start = time.perf_counter()
    if in_fresh_process(qpissa_main, arguments) != 0:
        sys.exit(f"qpissa {' '.join(arguments)} failed")
    print(
        f"{' '.join(arguments[:2])}: {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )


def _fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _percent(evaluation: dict) -> str:
    if "accuracy" not in evaluation:
        return "–"
    return f"{100 * evaluation['accuracy']:.1f} % ({evaluation['correct']}/{evaluation['total']})"


if __name__ == "__main__":
    main()
