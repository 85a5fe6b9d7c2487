"""Write a random Llama-shaped checkpoint, tensor by tensor (for memory and speed benchmarks).

Memory and speed depend on shapes, not on weight values, so random bf16 weights (std 0.02) stand in
for models that cannot be downloaded here: Llama-3-8B's shape with N layers, or (`--like DIR`) the shape
of any Llama-style checkpoint, whose config and tokenizer files are copied along
(`qpissa.models.make_synthetic_checkpoint`).

    python tools/make_synthetic_checkpoint.py /tmp/llama3-8b-2l --layers 2
    python tools/make_synthetic_checkpoint.py /tmp/smollm2-random --like demo/smollm2-135m
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qpissa.models import make_synthetic_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--like", type=Path, help="copy the shape, config and tokenizer of this checkpoint")
    args = parser.parse_args()
    print(make_synthetic_checkpoint(args.out, args.layers, args.seed, args.like))


if __name__ == "__main__":
    main()
