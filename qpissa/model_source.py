"""A MODEL_OR_RUN argument resolved to what to load: a QPiSSA directory, a training run or one of its
checkpoints, a LoRA export (on the model it names), or a plain Hugging Face model directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

from qpissa import UserError
from qpissa.artifacts import (
    ADAPTER_DIR,
    ADAPTER_FILES,
    CONFIG_NAME,
    RUN_MARKER,
    ModelSource,
    checkpoints,
    has_adapter,
    latest_checkpoint,
    read_json,
)
from qpissa.run_marker import trained_model

log = logging.getLogger(__name__)


def resolve_source(path: Path) -> ModelSource:
    """Interpret MODEL_OR_RUN: a QPiSSA dir, a run dir (final adapter, else latest checkpoint), a
    `checkpoint-N` dir inside a run, a LoRA export (on the model it names), or a plain HF checkpoint.

    A run's model is the one its marker names (relative to the run when relative), and must be a QPiSSA
    directory: a run file from elsewhere cannot point a command at an arbitrary directory.

    Raises:
        UserError: the path does not exist or is none of these, or a run names no QPiSSA directory.
    """
    if not path.is_dir():
        problem = "is not a directory" if path.exists() else "does not exist"
        if not path.exists() and (path.parent / RUN_MARKER).is_file():  # save_total_limit removed it
            kept = ", ".join(checkpoint.name for checkpoint in checkpoints(path.parent))
            problem += f" (the run keeps {kept or 'no checkpoint'})"
        raise UserError(f"{path} {problem}; pass a QPiSSA directory, a training run or a model directory")
    if (path / RUN_MARKER).is_file():
        adapter = path / ADAPTER_DIR if has_adapter(path / ADAPTER_DIR) else latest_checkpoint(path)
        if adapter is None or not has_adapter(adapter):
            raise UserError(
                f"run {path} has no adapter yet (no adapter/ and no checkpoint-N/); train it first"
            )
        if adapter.name != ADAPTER_DIR:
            log.warning("run %s did not finish (no adapter/): using its newest checkpoint, %s; resume the "
                        "run to finish it, or name a checkpoint-N to choose", path, adapter.name)  # fmt: skip
        return ModelSource(trained_model(path), adapter, run_dir=path)
    if has_adapter(path) and (path.parent / RUN_MARKER).is_file():
        return ModelSource(trained_model(path.parent), path, run_dir=path.parent)
    if has_adapter(path) and not (path / CONFIG_NAME).is_file():  # a LoRA export: an adapter alone
        return ModelSource(_adapter_base(path), path)
    if (path / CONFIG_NAME).is_file():
        adapter = path / ADAPTER_DIR if has_adapter(path / ADAPTER_DIR) else None
        return ModelSource(path, adapter)
    if (path.parent / RUN_MARKER).is_file():  # a folder of a run: a checkpoint missing its adapter
        missing = " and ".join(name for name in ADAPTER_FILES if not (path / name).is_file())
        kept = ", ".join(c.name for c in checkpoints(path.parent) if has_adapter(c)) or "none"
        raise UserError(
            f"{path}, in run {path.parent}, has no {missing}; pass the run itself or a checkpoint holding "
            f"its adapter (whole ones: {kept})"
        )
    raise UserError(
        f"{path} is not a QPiSSA directory, a training run or a model directory (no config.json); point at "
        "the output of qpissa convert, qpissa train or qpissa export, or a Hugging Face model directory"
    )


def _adapter_base(adapter_dir: Path) -> Path:
    """The local model a PEFT adapter directory names (`base_model_name_or_path`), as a LoRA export
    names the original model."""
    config = read_json(adapter_dir / "adapter_config.json", "export the adapter again")
    base = config.get("base_model_name_or_path")
    if not isinstance(base, str) or not (Path(base) / CONFIG_NAME).is_file():
        raise UserError(
            f"adapter {adapter_dir} names base model {base!r}, which is no local model directory; put the "
            "original model there, or correct base_model_name_or_path in its adapter_config.json"
        )
    return Path(base)
