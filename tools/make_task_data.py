"""Write a deterministic arithmetic word-problem task (train/eval JSONL) scored by exact match.

Each problem has two or three steps of addition and subtraction on small counts, and the response
shows the steps before the final answer after `####` (as GSM8K does), e.g.

    Mia has 7 apples. She buys 4 more. Then she gives 3 to Sam. How many apples does Mia have now?
    7 + 4 = 11. 11 - 3 = 8. #### 8

Every record carries `prompt`/`completion` (format prompt_completion) and `messages` (format messages),
so either format can train on it. Train and eval problems never coincide.

Usage: python tools/make_task_data.py OUT_DIR [--train 2000] [--eval 200] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

NAMES = ["Mia", "Sam", "Ava", "Leo", "Zoe", "Max", "Ivy", "Ben", "Eli", "Kim", "Noa", "Tom"]
ITEMS = ["apples", "books", "coins", "pens", "shells", "cards", "stamps", "marbles", "eggs", "cookies"]
GAIN = ["buys {n} more", "finds {n} more", "gets {n} more from {other}"]
LOSS = ["gives {n} to {other}", "loses {n}", "sells {n}", "eats {n}"]


def make_problem(rng: random.Random) -> dict:
    """One word problem with its worked answer.

    Args:
        rng: the seeded generator all choices draw from.

    Returns:
        {"prompt", "completion", "messages", "answer"}.
    """
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    total = rng.randint(2, 20)
    sentences = [f"{name} has {total} {item}."]
    steps = []
    for index in range(rng.randint(2, 3)):
        gain = total < 3 or rng.random() < 0.5
        amount = rng.randint(1, 12) if gain else rng.randint(1, total)
        phrase = rng.choice(GAIN if gain else LOSS).format(n=amount, other=other)
        opener = "Then she" if index else "She"
        sentences.append(f"{opener} {phrase}.")
        new_total = total + amount if gain else total - amount
        steps.append(f"{total} {'+' if gain else '-'} {amount} = {new_total}.")
        total = new_total
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    completion = " ".join(steps) + f" #### {total}"
    return {
        "answer": str(total),
        "completion": " " + completion,
        "messages": [{"content": question, "role": "user"}, {"content": completion, "role": "assistant"}],
        "prompt": f"Question: {question}\nAnswer:",
    }


def make_splits(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Draw `n_train + n_eval` distinct problems and split them.

    Returns:
        (train records, eval records).
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    records: list[dict] = []
    while len(records) < n_train + n_eval:
        problem = make_problem(rng)
        if problem["prompt"] not in seen:
            seen.add(problem["prompt"])
            records.append(problem)
    return records[:n_train], records[n_train:]


def main() -> None:
    """Command-line entry: write OUT_DIR/train.jsonl and OUT_DIR/eval.jsonl."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--train", type=int, default=2000, help="training problems")
    parser.add_argument("--eval", type=int, default=200, help="evaluation problems")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    args = parser.parse_args()
    train, held_out = make_splits(args.train, args.eval, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, records in (("train", train), ("eval", held_out)):
        lines = "".join(json.dumps(record, sort_keys=True) + "\n" for record in records)
        (args.out_dir / f"{name}.jsonl").write_text(lines)
    print(f"{len(train)} train and {len(held_out)} eval problems in {args.out_dir}")


if __name__ == "__main__":
    main()
