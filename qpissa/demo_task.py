"""The demo task: seeded arithmetic word problems whose answers follow GSM8K's `#### answer` convention.

Each problem has two or three steps of addition and subtraction on small counts, and the response
shows the steps before the final answer after `####`, e.g.

    Mia has 7 apples. She buys 4 more. Then she gives 3 to Sam. How many apples does Mia have now?
    7 + 4 = 11. 11 - 3 = 8. #### 8

Every record carries `prompt`/`completion` (format prompt_completion) and `messages` (format messages),
so either format can train on it. `qpissa eval` scores any data by `final_answer`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ANSWER_MARK = "####"
NAMES = ["Mia", "Sam", "Ava", "Leo", "Zoe", "Max", "Ivy", "Ben", "Eli", "Kim", "Noa", "Tom"]
ITEMS = ["apples", "books", "coins", "pens", "shells", "cards", "stamps", "marbles", "eggs", "cookies"]
GAIN = ["buys {n} more", "finds {n} more", "gets {n} more from {other}"]
LOSS = ["gives {n} to {other}", "loses {n}", "sells {n}", "eats {n}"]


def final_answer(text: str) -> str:
    """The answer part of a response: after the last `####` if present, else the whole text, stripped."""
    return text.rsplit(ANSWER_MARK, 1)[-1].strip()


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
    completion = " ".join(steps) + f" {ANSWER_MARK} {total}"
    return {
        "answer": str(total),
        "completion": " " + completion,
        "messages": [{"content": question, "role": "user"}, {"content": completion, "role": "assistant"}],
        "prompt": f"Question: {question}\nAnswer:",
    }


def make_splits(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Draw `n_train + n_eval` distinct problems and split them: train and eval never coincide.

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


def write_task(out_dir: Path, n_train: int = 2000, n_eval: int = 200, seed: int = 0) -> tuple[Path, Path]:
    """Write `out_dir/train.jsonl` and `out_dir/eval.jsonl` (one record a line, sorted keys).

    Returns:
        The two files' paths.
    """
    train, held_out = make_splits(n_train, n_eval, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    for path, records in zip(paths, (train, held_out), strict=True):
        path.write_text("".join(json.dumps(record, sort_keys=True) + "\n" for record in records))
    return paths
