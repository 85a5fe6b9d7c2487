"""Write the demo task (train/eval JSONL): seeded arithmetic word problems scored by exact match.

The problems and their `#### answer` convention are `qpissa.demo_task`'s; train and eval never coincide.

Usage: python tools/make_task_data.py OUT_DIR [--train 2000] [--eval 200] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qpissa.demo_task import write_task


def main() -> None:
    """Command-line entry: write OUT_DIR/train.jsonl and OUT_DIR/eval.jsonl."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=2000, help="training problems")
    parser.add_argument("--eval", type=int, default=200, help="evaluation problems")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    args = parser.parse_args()
    write_task(args.out_dir, args.train, args.eval, args.seed)
    print(f"{args.train} train and {args.eval} eval problems in {args.out_dir}")


if __name__ == "__main__":
    main()
