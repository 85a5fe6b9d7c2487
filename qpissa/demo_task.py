"""The demo task: seeded multi-step arithmetic word problems, answered GSM8K-style after `####`.

Each problem takes three to five steps of addition, subtraction, multiplication and exact division,
and the response shows every step before the final answer, e.g.

    Mia has 14 apples. Mia buys 3 bags of 6. Then Mia gives 8 to Sam. Then Mia shares them equally
    among 2 friends and keeps one share. How many apples does Mia have now?
    14 + 3 * 6 = 32. 32 - 8 = 24. 24 / 2 = 12. #### 12

The held-out split is harder than training on purpose, so the task does not saturate: its problems use
sentence templates, names and items that never occur in training, and larger starting amounts. A
model has to learn the arithmetic, not the phrasing. Every record carries `prompt`/`completion`
(format prompt_completion) and `messages` (format messages); `qpissa eval` scores by `final_answer`.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

ANSWER_MARK = "####"


@dataclass(frozen=True)
class Templates:
    """The wording of one split: who, what, and a phrase per operation (`{n}`, `{k}`, `{other}`)."""

    names: tuple[str, ...]
    items: tuple[str, ...]
    add: tuple[str, ...]
    subtract: tuple[str, ...]
    multiply: tuple[str, ...]  # k groups of n more: total + k * n
    divide: tuple[str, ...]  # shared equally among k: total / k
    start: tuple[int, int]  # range of the starting amount


TRAIN = Templates(
    names=("Mia", "Sam", "Ava", "Leo", "Zoe", "Max", "Ivy", "Ben", "Eli", "Kim", "Noa", "Tom"),
    items=("apples", "books", "coins", "pens", "shells", "cards", "stamps", "marbles", "eggs", "cookies"),
    add=("buys {n} more", "finds {n} more", "gets {n} more from {other}"),
    subtract=("gives {n} to {other}", "loses {n}", "sells {n}", "eats {n}"),
    multiply=("buys {k} bags of {n}", "gets {k} boxes with {n} each"),
    divide=("shares them equally among {k} friends and keeps one share",),
    start=(2, 40),
)
HELD_OUT = Templates(
    names=("Ada", "Raj", "Lea", "Omar", "Sofia", "Yuki", "Nils", "Ines"),
    items=("stickers", "beads", "buttons", "tickets", "candles", "pencils", "seeds", "rocks"),
    add=("receives {n} as a gift", "picks up another {n}", "is handed {n} by {other}"),
    subtract=("donates {n}", "trades away {n}", "hands {n} over to {other}"),
    multiply=("orders {k} packs holding {n} apiece", "wins {k} prizes of {n} each"),
    divide=("splits them into {k} equal piles and keeps one pile",),
    start=(41, 99),
)


def final_answer(text: str) -> str:
    """The answer part of a response: after the last `####` if present, else the whole text, stripped."""
    return text.rsplit(ANSWER_MARK, 1)[-1].strip()


def make_problem(rng: random.Random, templates: Templates = TRAIN) -> dict:
    """One word problem with its worked answer, in the wording of `templates`.

    Args:
        rng: the seeded generator every choice draws from.
        templates: the split's wording.

    Returns:
        {"prompt", "completion", "messages", "answer"}.
    """
    name, other = rng.sample(templates.names, 2)
    item = rng.choice(templates.items)
    total = rng.randint(*templates.start)
    sentences = [f"{name} has {total} {item}."]
    steps = []
    for index in range(rng.randint(3, 5)):
        phrase, step, total = _step(rng, templates, total, other)
        sentences.append(f"{'Then ' if index else ''}{name} {phrase}.")
        steps.append(step)
    question = " ".join(sentences) + f" How many {item} does {name} have now?"
    completion = " ".join(steps) + f" {ANSWER_MARK} {total}"
    return {
        "answer": str(total),
        "completion": " " + completion,
        "messages": [{"content": question, "role": "user"}, {"content": completion, "role": "assistant"}],
        "prompt": f"Question: {question}\nAnswer:",
    }


def make_splits(n_train: int, n_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Draw distinct training problems and distinct held-out problems (other wording, larger numbers).

    Returns:
        (train records, eval records).
    """
    rng = random.Random(seed)
    return _distinct(rng, n_train, TRAIN), _distinct(rng, n_eval, HELD_OUT)


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


def _step(rng: random.Random, templates: Templates, total: int, other: str) -> tuple[str, str, int]:
    """One operation on `total`: its phrase, its worked line, and the new total (always ≥ 1)."""
    divisors = [k for k in (2, 3, 4, 5) if total % k == 0 and total // k >= 1]
    operations = ["add", "multiply"] + (["subtract"] if total > 1 else []) + (["divide"] if divisors else [])
    operation = rng.choice(operations)
    if operation == "add":
        n = rng.randint(1, 30)
        return rng.choice(templates.add).format(n=n, other=other), f"{total} + {n} = {total + n}.", total + n
    if operation == "subtract":
        n = rng.randint(1, total - 1)
        phrase = rng.choice(templates.subtract).format(n=n, other=other)
        return phrase, f"{total} - {n} = {total - n}.", total - n
    if operation == "multiply":
        k, n = rng.randint(2, 5), rng.randint(2, 12)
        phrase = rng.choice(templates.multiply).format(k=k, n=n)
        return phrase, f"{total} + {k} * {n} = {total + k * n}.", total + k * n
    k = rng.choice(divisors)
    phrase = rng.choice(templates.divide).format(k=k)
    return phrase, f"{total} / {k} = {total // k}.", total // k


def _distinct(rng: random.Random, count: int, templates: Templates) -> list[dict]:
    seen: set[str] = set()
    records: list[dict] = []
    while len(records) < count:
        problem = make_problem(rng, templates)
        if problem["prompt"] not in seen:
            seen.add(problem["prompt"])
            records.append(problem)
    return records
