"""`compare --train`: the shared recipe checked before any conversion, and each method's run trained, or
reused when it trained this conversion on these samples with this recipe and finished (evaluated too).

A comparison's runs are `runs/<method>`, each on `conversions/<method>`: compare sets both paths, so a run
is told apart by the rest of its recipe, the conversion it trained (its fingerprint) and its samples (the
hash `train` records), not by where the comparison lies; a moved comparison is reused whole.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from qpissa.artifacts import (
    CONVERSIONS_DIR,
    DATA_FINGERPRINT,
    RUN_MARKER,
    RUNS_DIR,
    ModelSource,
    latest_checkpoint,
)
from qpissa.chat_template import resolve_chat_template
from qpissa.data import training_data
from qpissa.data_sources import load_heldout, load_source
from qpissa.loading import check_context, load_tokenizer
from qpissa.options import to_dict
from qpissa.outputs import check_apart
from qpissa.recipe import TrainConfig
from qpissa.recipe_file import load_config
from qpissa.report_runs import RunState, run_state
from qpissa.resume_checks import data_fingerprint
from qpissa.run_marker import read_run, trained_on
from qpissa.runtime import resolve_runtime
from qpissa.train import train
from qpissa.trainer_options import training_arguments
from qpissa.worker import in_fresh_process

log = logging.getLogger(__name__)

_SET_BY_COMPARE = ("model", "output_dir", "resume_from_checkpoint", "overwrite_output_dir")


def check_train_config(config_path: Path, out_dir: Path, model_dir: Path) -> None:
    """Validate the training config and its data before any conversion (model and output_dir are compare's),
    and what `train` would refuse only after them: a conversion has the original's context and tokenizer."""
    overrides = [f"model={out_dir / CONVERSIONS_DIR}", f"output_dir={out_dir / RUNS_DIR}"]
    config = load_config(config_path, overrides)
    check_apart(out_dir, "OUT", config.data_inputs())
    runtime = resolve_runtime(config.device, config.bf16, config.optim)
    training_arguments(config, runtime, out_dir / RUNS_DIR, show_progress=False)  # every Trainer option
    data = config.data
    for index, source in enumerate(data.train_sources()):
        load_source(source, format_setting=f"{data.source_prefix(index)}format",
                    split_setting=f"{data.source_prefix(index)}split")  # fmt: skip
    if data.eval_path is not None:
        load_heldout(data.eval_path, data.eval_split, data.eval_format(), "data.eval_split")
    check_context(model_dir, data.max_seq_len, f"--train {config_path}: `data.max_seq_len`")
    load_tokenizer(ModelSource(model_dir, None))  # training reads the tokenizer a conversion copies
    if config.chat_template:
        resolve_chat_template(config.chat_template)


def train_step(out_dir: Path, name: str, config_path: Path, show_progress: bool) -> tuple[Path, str, float]:
    """Train one conversion with the shared config; reuse a finished run, resume an interrupted one. A run
    stopped in its final evaluation (its adapter saved, `eval_results.json` not) is finished as `train`
    finishes one: from the checkpoint of its last step, nothing is trained and the adapter is evaluated.

    Returns:
        The run directory, `done` or `reused`, and the seconds spent.
    """
    run_dir = (out_dir / RUNS_DIR / name).resolve()
    overrides = [f"model={(out_dir / CONVERSIONS_DIR / name).resolve()}", f"output_dir={run_dir}"]
    config = load_config(config_path, overrides)
    why_not = _why_not_reused(run_dir, config) if (run_dir / RUN_MARKER).is_file() else None
    state = run_state(run_dir, to_dict(config))
    if why_not is None and state is RunState.FINISHED:
        return run_dir, "reused", 0.0
    if why_not is None:  # interrupted: continue from its last checkpoint
        if state is RunState.UNEVALUATED:
            log.info("%s was trained, but stopped before its final evaluation: finishing it", run_dir)
        checkpoint = latest_checkpoint(run_dir)
        extra = [f"resume_from_checkpoint={checkpoint}"] if checkpoint else ["overwrite_output_dir=true"]
        config = load_config(config_path, overrides + extra)
    elif run_dir.exists():  # start over, as fidelity does with other settings, saying so
        log.info("%s was trained %s: training it again", run_dir, why_not)
        config = load_config(config_path, [*overrides, "overwrite_output_dir=true"])
    started = time.perf_counter()
    log.info("training %s -> %s", name, run_dir)
    in_fresh_process(train, config, show_progress=show_progress)
    return run_dir, "done", time.perf_counter() - started


def _why_not_reused(run_dir: Path, config: TrainConfig) -> str | None:
    """How the run in `run_dir` differs from the one `config` asks for (None: it is that run)."""
    marker = read_run(run_dir)
    if _identity(marker.get("config", {})) != _identity(to_dict(config)):
        return "with another --train recipe"
    if trained_on(marker, config.model) is False:
        return "on another conversion"
    recorded = marker.get(DATA_FINGERPRINT)  # a run recorded before the samples' hash is taken at its word
    if recorded is not None and recorded != _samples_hash(config):
        return "on other samples (the recipe's data files changed since)"
    return None


def _samples_hash(config: TrainConfig) -> str:
    """The hash `train` records of the samples `config` trains on, tokenized as the run tokenizes them;
    quietly: the run said what its data held when it trained (formats detected, samples dropped)."""
    template = resolve_chat_template(config.chat_template) if config.chat_template else None
    notes = [logging.getLogger(name) for name in ("qpissa.data", "qpissa.data_sources")]
    levels = [logger.level for logger in notes]
    for logger in notes:
        logger.setLevel(logging.ERROR)
    try:
        _, _, samples = training_data(config, ModelSource(config.model, None), template)
    finally:
        for logger, level in zip(notes, levels, strict=True):
            logger.setLevel(level)
    return data_fingerprint(samples.rows)


def _identity(config: dict) -> dict:
    """A run's recipe without what compare sets (where the run and its conversion lie, how to start)."""
    return {key: value for key, value in config.items() if key not in _SET_BY_COMPARE}
