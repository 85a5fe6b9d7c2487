"""Every file and directory name qpissa writes or looks for, and the finders that read them back.

A QPiSSA directory, a training run, an export and a comparison are plain directories; these names
are what tells them apart (`resolve_source` turns a MODEL_OR_RUN argument into what to load).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qpissa import UserError

# Hugging Face and PEFT names qpissa reads and writes
CONFIG_NAME = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
TRAINER_STATE = "trainer_state.json"  # written last into a Trainer checkpoint: it marks one complete
CHECKPOINT_PREFIX = "checkpoint-"  # checkpoint-N: Trainer's checkpoint after step N

# a QPiSSA directory (`qpissa convert`)
REPORT_NAME = "qpissa_report.json"
ADAPTER_DIR = "adapter"  # also the final adapter of a run
PROGRESS_NAME = "progress.json"  # in OUT.partial/: the finished shards and their metrics
FIDELITY_NAME = "qpissa_fidelity.json"  # written by `qpissa compare` into each QPiSSA directory it measured
OWN_JSON = "qpissa_*.json"  # every qpissa record above: they describe the QPiSSA directory only

# a training run (`qpissa train`)
RUN_MARKER = "qpissa_run.json"  # {"model": QPiSSA dir, "config": ..., "runtime": ...}
LOG_NAME = "trainer_log.jsonl"
EVAL_LOG_NAME = "eval_log.jsonl"
EVAL_RESULTS_NAME = "eval_results.json"

# an export, a comparison, a report, a fetched demo model
EXPORT_REPORT = "export_report.json"
ADAPTER_README = "README.md"  # of a LoRA export
COMPARE_NAME = "compare.json"
CONVERSIONS_DIR = "conversions"  # conversions/<method>/ of a comparison
RUNS_DIR = "runs"  # runs/<method>/ of a comparison
SUMMARY_NAME = "summary.json"
REPORT_MARKDOWN = "report.md"
REPORT_HTML = "report.html"
FETCH_MARKER = "qpissa_fetch.json"


@dataclass
class ModelSource:
    """Where the weights of a model come from.

    Attributes:
        base_dir: a QPiSSA directory (4-bit residual) or a plain HF checkpoint (e.g. a merged export).
        adapter_dir: the PEFT adapter to apply on top, or None for a plain checkpoint.
        run_dir: the training run it belongs to, if any.
    """

    base_dir: Path
    adapter_dir: Path | None
    run_dir: Path | None = None


def partial_dir(out_dir: Path) -> Path:
    """Where `out_dir` is built until it is complete."""
    return out_dir.with_name(out_dir.name + ".partial")


def has_adapter(path: Path) -> bool:
    """Whether `path` holds a PEFT adapter (its config and weights)."""
    return all((path / name).is_file() for name in ADAPTER_FILES)


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete `checkpoint-N` of a run (one with trainer_state.json), if any."""
    found = [
        path
        for path in run_dir.glob(CHECKPOINT_PREFIX + "*")
        if path.name.removeprefix(CHECKPOINT_PREFIX).isdigit() and (path / TRAINER_STATE).is_file()
    ]
    return max(found, key=lambda path: int(path.name.removeprefix(CHECKPOINT_PREFIX)), default=None)


def read_report(qpissa_dir: Path) -> dict:
    """`qpissa_report.json` of a finished QPiSSA directory."""
    return json.loads((qpissa_dir / REPORT_NAME).read_text())


def read_run(run_dir: Path) -> dict:
    """The run marker `qpissa_run.json`: the QPiSSA directory trained, the config, the resolved runtime."""
    return json.loads((run_dir / RUN_MARKER).read_text())


def comparison_members(compare_dir: Path, kind: str) -> list[Path]:
    """The conversion (`kind=CONVERSIONS_DIR`) or run (`RUNS_DIR`) directories of a comparison, by method."""
    record = json.loads((compare_dir / COMPARE_NAME).read_text())
    paths = [compare_dir / kind / name for name in record["methods"]]
    return [path for path in paths if path.is_dir()]


def resolve_source(path: Path) -> ModelSource:
    """Interpret MODEL_OR_RUN: a QPiSSA dir, a run dir (final adapter, else latest checkpoint), a
    `checkpoint-N` dir inside a run, or a plain HF checkpoint.

    Raises:
        UserError: the path does not exist or is none of these.
    """
    if not path.is_dir():
        raise UserError(
            f"{path} is not a directory; pass a QPiSSA directory, a training run or a model directory"
        )
    if (path / RUN_MARKER).is_file():
        adapter = path / ADAPTER_DIR if has_adapter(path / ADAPTER_DIR) else latest_checkpoint(path)
        if adapter is None or not has_adapter(adapter):
            raise UserError(
                f"run {path} has no adapter yet (no adapter/ and no checkpoint-N/); train it first"
            )
        return ModelSource(Path(read_run(path)["model"]), adapter, run_dir=path)
    if has_adapter(path) and (path.parent / RUN_MARKER).is_file():
        return ModelSource(Path(read_run(path.parent)["model"]), path, run_dir=path.parent)
    if (path / CONFIG_NAME).is_file():
        adapter = path / ADAPTER_DIR if has_adapter(path / ADAPTER_DIR) else None
        return ModelSource(path, adapter)
    raise UserError(f"{path} is not a QPiSSA directory, a training run or a model directory (no config.json)")
