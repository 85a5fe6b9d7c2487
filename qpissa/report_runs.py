"""A report's training runs in words: what each trained on and how, which recipe keys set the runs apart, and
which runs stopped before their final adapter or before their final evaluation.

A run is told finished by what `train` writes last: its adapter, then (where its recipe evaluates) its
`eval_results.json`; `qpissa compare` reuses only finished runs and finishes the others.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Any

from qpissa.artifacts import ADAPTER_DIR, DATA_FINGERPRINT, EVAL_RESULTS_NAME, has_adapter

# recipe keys that say where a run and its conversion lie and how it started, not how it trained
PLACE_KEYS = ("model", "output_dir", "resume_from_checkpoint", "overwrite_output_dir")
MAX_VALUE_CHARS = 40


class RunState(Enum):
    """How far a run got: `train` saves the final adapter, then evaluates it (where its recipe evaluates)."""

    FINISHED = "finished"
    UNFINISHED = "unfinished"  # no final adapter: interrupted in training, or training still
    UNEVALUATED = "unevaluated"  # the final adapter saved, its final evaluation not written


def run_state(run_dir: Path, config: dict[str, Any]) -> RunState:
    """How far the run in `run_dir` got, by what its recipe (`config`, as its marker records it) asks for:
    under FSDP `train` evaluates no final adapter, so none is missing there."""
    if not has_adapter(run_dir / ADAPTER_DIR):
        return RunState.UNFINISHED
    evaluates = config["data"].get("eval_path") and not (config.get("trainer") or {}).get("fsdp")
    if evaluates and not (run_dir / EVAL_RESULTS_NAME).is_file():
        return RunState.UNEVALUATED
    return RunState.FINISHED


def run_recipe(run: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """What a run trained on and how long, how far it got, and every recipe key it trained with (flattened,
    `data.max_seq_len`; and the resolved runtime), from its marker: what a reader of a report asks first."""
    config, data = run["config"], run["config"]["data"]
    how = {key: value for key, value in config.items() if key not in PLACE_KEYS}
    return {
        "data": data["path"] or [source["path"] for source in data["sources"]],
        "eval_path": data["eval_path"], "max_seq_len": data["max_seq_len"],
        "data_fingerprint": run.get(DATA_FINGERPRINT),  # the same path may hold other contents
        "max_steps": config["max_steps"], "num_train_epochs": config["num_train_epochs"],
        "learning_rate": config["learning_rate"], "seed": config["seed"],
        "global_batch_size": run["processes"]["global_batch_size"],
        "state": run_state(run_dir, config).value,
        "options": _flat(how) | _flat({"runtime": run.get("runtime") or {}}),
    }  # fmt: skip


def setup_lines(summary: dict) -> list[str]:
    """What was compared: the base model, what the runs trained on (once if every run shares the recipe,
    else each run's, naming the keys they differ in), and the runs that did not finish."""
    setup = summary["setup"]
    lines = [f"Base model: {setup['model']}."] if setup["model"] else []
    runs = setup["runs"]
    # one path may hold other contents from run to run: the fingerprints of what was read tell them apart
    prints = {recipe.get("data_fingerprint") for recipe in runs.values()} - {None}
    differing = differing_options(runs)
    texts = {label: _recipe_text(recipe, len(prints) > 1) for label, recipe in runs.items()}
    if len(set(texts.values())) == 1 and len(texts) > 1 and not differing:
        lines.append(f"Every run trained on {next(iter(texts.values()))}.")
    else:
        if len(prints) > 1:
            lines.append("The runs trained on different data (their data fingerprints differ), so their "
                         "losses do not compare.")  # fmt: skip
        if differing:
            lines.append(f"The runs' recipes differ in {', '.join(differing)}.")
        lines += [f"Run {label} trained on {text}{_options_text(runs[label], differing)}."
                  for label, text in texts.items()]  # fmt: skip
    training = summary["training"]
    return lines + [_state_line(label, recipe, training.get(label)) for label, recipe in runs.items()
                    if recipe.get("state", RunState.FINISHED.value) != RunState.FINISHED.value]  # fmt: skip


def differing_options(runs: dict[str, dict]) -> list[str]:
    """The recipe keys whose values are not the same in every run (a key one run lacks counts as unset)."""
    options = [recipe.get("options") or {} for recipe in runs.values()]
    keys = sorted({key for found in options for key in found})
    return [key for key in keys if len({json.dumps(found.get(key), sort_keys=True) for found in options}) > 1]


# the recipe keys `_recipe_text` says in words; only the other differing ones are added to it
_DESCRIBED = ("data.path", "data.sources", "data.eval_path", "data.max_seq_len", "max_steps",
              "num_train_epochs", "learning_rate", "seed")  # fmt: skip


def _recipe_text(recipe: dict, fingerprint: bool) -> str:
    """The recipe in words; `fingerprint` names the data's fingerprint too, where runs' data differ."""
    data = recipe["data"] if isinstance(recipe["data"], str) else " + ".join(recipe["data"])
    if fingerprint:
        data += f" (data fingerprint {(recipe.get('data_fingerprint') or 'not recorded')[:12]})"
    evaluated = f", evaluated on {recipe['eval_path']}" if recipe["eval_path"] else ""
    return (
        f"{data} ({_length(recipe)} of {recipe['global_batch_size']} samples, learning rate "
        f"{recipe['learning_rate']:g}, max_seq_len {recipe['max_seq_len']}, seed {recipe['seed']}){evaluated}"
    )


def _length(recipe: dict) -> str:
    if recipe["max_steps"] > 0:
        return f"{recipe['max_steps']} steps"
    return f"{recipe['num_train_epochs']:g} epochs"


def _options_text(recipe: dict, differing: list[str]) -> str:
    """The run's values of the differing keys the recipe's words omit: `; optim sgd, weight_decay 0.5`."""
    options = recipe.get("options") or {}
    shown = [f"{key} {_value(options.get(key))}" for key in differing if key not in _DESCRIBED]
    return f"; {', '.join(shown)}" if shown else ""


def _value(value: Any) -> str:
    """A recipe value as the report quotes it: cut short (an inline chat template is long)."""
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[: MAX_VALUE_CHARS - 3] + "..."


def _state_line(label: str, recipe: dict, training: dict | None) -> str:
    """Why a run's numbers are not a finished run's, and how to finish it."""
    if recipe["state"] == RunState.UNEVALUATED.value:
        return (
            f"Run {label} has no final evaluation: its recipe evaluates on {recipe['eval_path']}, but "
            f"{EVAL_RESULTS_NAME} is missing (stopped while evaluating); finish it with `qpissa train` "
            "resume_from_checkpoint=true, or rerun its `qpissa compare`."
        )
    length = _length(recipe)
    ends = f"its log ends at step {training['final_step']} of {length}" if training else "no step logged"
    return (
        f"Run {label} is unfinished: it has no final adapter ({ends}: it was interrupted, or is still "
        "training), so its numbers are those of a run cut short; continue it with `qpissa train` "
        "resume_from_checkpoint=true, or rerun its `qpissa compare`."
    )


def _flat(options: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested recipe groups as dotted keys, as overrides name them (`data.max_seq_len`, `trainer.fsdp`)."""
    flat = {}
    for key, value in options.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
