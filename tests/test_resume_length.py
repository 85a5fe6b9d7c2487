"""A resume compares the run's length by what decides it: max_steps, and num_train_epochs only where
max_steps is -1 (the Trainer ignores the epochs otherwise)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_train import _config, _losses


def test_epochs_are_free_to_change_when_max_steps_sets_the_length(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A changed num_train_epochs beside max_steps > 0 was refused, as if it changed the cosine schedule."""
    from qpissa import cli

    changes = {"max_steps": 4, "save_steps": 2, "save_total_limit": 3, "eval_steps": None}
    config = _config(tmp_path, qpissa_dir, data_dir, **changes)
    run = tmp_path / "run"
    assert cli.main(["--quiet", "train", str(config)]) == 0
    whole = _losses(run)
    shutil.rmtree(run / "adapter")
    shutil.rmtree(run / "checkpoint-4")
    resume = f"resume_from_checkpoint={run / 'checkpoint-2'}"
    assert cli.main(["--quiet", "train", str(config), "num_train_epochs=3", resume]) == 0
    assert _losses(run) == whole  # the same run, continued exactly
    # what does decide the length is still compared, and the refusal says why it matters
    assert cli.main(["--quiet", "train", str(config), "max_steps=-1", "num_train_epochs=3", resume]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith(
        f"qpissa: error: resume_from_checkpoint {run / 'checkpoint-2'} continues a run with max_steps=4, "
        "which this config changes, but its learning-rate schedule (cosine, or a warmup given as a ratio) "
        "is laid over the run's length"
    )
