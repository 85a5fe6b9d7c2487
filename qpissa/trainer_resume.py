"""Resuming a run's Trainer from a checkpoint-N, including the checkpoint of its last step.

transformers (5.2x) enters an epoch before it compares the step count with `max_steps`, so a run resumed
from the checkpoint of its last step trains one step more (`step 11/10`), which moves the adapter on any
schedule that does not end at 0. Such a checkpoint only finishes the run: the adapter it saved (or the
best one, with `load_best_model_at_end`) is loaded, with its Trainer state, and nothing is trained.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import Trainer, TrainerState

from qpissa.artifacts import ADAPTER_WEIGHTS, TRAINER_STATE

log = logging.getLogger(__name__)


def resume_or_finish(trainer: Trainer, checkpoint: Path | None) -> None:
    """`trainer.train()` from `checkpoint` (None: from the start), or, at the run's last step, finish."""
    state = None if checkpoint is None else TrainerState.load_from_json(str(checkpoint / TRAINER_STATE))
    if state is None or not _at_last_step(state, trainer):
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        return
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    best = state.best_model_checkpoint if trainer.args.load_best_model_at_end else None
    adapter = checkpoint.parent / Path(best).name if best else checkpoint  # the run's own, wherever it is now
    set_peft_model_state_dict(trainer.model, load_file(adapter / ADAPTER_WEIGHTS))
    trainer.state = state
    log.info("%s is the run's last step (%d): nothing is left to train; finishing the run with %s",
             checkpoint, state.global_step, adapter.name)  # fmt: skip


def _at_last_step(state: TrainerState, trainer: Trainer) -> bool:
    """Whether the checkpoint's step is the run's last (a run given more steps goes on training)."""
    if trainer.args.max_steps > 0:
        return state.global_step >= trainer.args.max_steps
    return state.num_train_epochs == trainer.args.num_train_epochs and state.global_step >= state.max_steps
