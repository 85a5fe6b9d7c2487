"""Benchmark `qpissa train` on 1 process vs several (torchrun): tokens/s and peak memory per process.

The demo recipe (configs/demo.yaml) trains the same QPiSSA conversion of the demo model with the same
global batch: `--batch` on one process, `--batch / N` per device on N. Each process of a run records its
own peak memory (peak RSS on a CPU, max allocated on a GPU) when it ends; tokens/s is the run's global
rate from trainer_log.jsonl (steps after the first, which warms up). On a CPU the processes share the
machine's cores (OMP_NUM_THREADS = cores / processes), so more processes do not add compute there.

Usage:
    python tools/bench_processes.py --model /tmp/demo/smollm2-135m --work /tmp/bench-processes \\
        --processes 1,2 --steps 3 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from qpissa.artifacts import LOG_NAME
from qpissa.cli import main as qpissa_main
from qpissa.demo_task import write_task

ROOT = Path(__file__).parents[1]
# each process's program: the `qpissa` command, then its own peak memory into PEAKS/<rank>.json
RECORDING = """
import json, os, sys
from pathlib import Path
from qpissa.cli import main
status = main(sys.argv[1:])
import torch
from qpissa.memory import peak_rss_mb
peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss_mb()
Path(os.environ["PEAKS"], os.environ.get("RANK", "0") + ".json").write_text(json.dumps({"peak_mb": peak}))
sys.exit(status)
"""


def main() -> None:
    """Convert once, train once per process count, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="original HF checkpoint (the demo model)")
    parser.add_argument("--work", type=Path, required=True, help="where the conversion, data and runs go")
    parser.add_argument("--processes", default="1,2", help="comma-separated process counts")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=8, help="global batch (per device: batch / processes)")
    args = parser.parse_args()
    qpissa_dir, task = args.work / "qpissa-r64", args.work / "task"
    if not qpissa_dir.is_dir():
        write_task(task)
        convert = ["--quiet", "convert", str(args.model), str(qpissa_dir), "--rank", "64", "--iters", "1"]
        assert qpissa_main(convert) == 0
    print("| processes | per-device batch | global tokens/s | peak memory per process (MB) |")
    print("|---|---|---|---|")
    for count in (int(part) for part in args.processes.split(",")):
        rate, peaks = _run(args, count, qpissa_dir, task)
        listed = ", ".join(f"{peak:.0f}" for peak in peaks)
        print(f"| {count} | {args.batch // count} | {rate:.0f} | {listed} |", flush=True)


def _run(args: argparse.Namespace, count: int, qpissa_dir: Path, task: Path) -> tuple[float, list[float]]:
    """Train the demo recipe on `count` processes; its global tokens/s and each process's peak MB."""
    run, peaks = args.work / f"run-{count}", args.work / f"peaks-{count}"
    peaks.mkdir(parents=True, exist_ok=True)
    program = args.work / "recording_qpissa.py"
    program.write_text(RECORDING)
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={count}"]
        if count > 1
        else [sys.executable]
    )
    overrides = [
        f"model={qpissa_dir}", f"output_dir={run}", "overwrite_output_dir=true", f"max_steps={args.steps}",
        f"per_device_train_batch_size={args.batch // count}", f"data.path={task / 'train.jsonl'}",
        "data.eval_path=null", "eval_steps=null", f"save_steps={args.steps + 1}",
    ]  # fmt: skip
    threads = max((os.cpu_count() or 1) // count, 1)
    env = {**os.environ, "PEAKS": str(peaks), "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    command = [*launcher, str(program), "--quiet", "train", str(ROOT / "configs" / "demo.yaml"), *overrides]
    subprocess.run(command, env=env, check=True)
    rows = [json.loads(line) for line in (run / LOG_NAME).read_text().splitlines()]
    rate = statistics.mean(row["tokens_per_second"] for row in rows if row["step"] >= 2)
    memory = [json.loads((peaks / f"{rank}.json").read_text())["peak_mb"] for rank in range(count)]
    return rate, memory


if __name__ == "__main__":
    main()
