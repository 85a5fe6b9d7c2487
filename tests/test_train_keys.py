"""An unknown recipe key is told what it may mean: qpissa's own recipe keys first (a data key written at the
top level), then what another fine-tuner's name is called here, then a TrainingArguments option."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_train import _config

from qpissa import UserError, cli
from qpissa.trainer_options import checked_options

UNKNOWN = "neither a recipe key nor an option of this transformers version's TrainingArguments; "


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        # data keys at the top level: were `max_steps`, `prediction_loss_only`, `eval_strategy`
        ("max_seq_len", "did you mean `data.max_seq_len`?"),
        ("response_only", "did you mean `data.response_only`?"),
        ("eval_path", "did you mean `data.eval_path`?"),
        ("max_seq_lenn", "did you mean `data.max_seq_len`?"),
        # other fine-tuners' names: were `lr_scheduler_type`, `auto_find_batch_size`, `optim_target_modules`
        ("lr", "qpissa takes it as `learning_rate`"),
        ("micro_batch_size", "qpissa takes it as `per_device_train_batch_size`"),
        ("batch_size", "qpissa takes it as `per_device_train_batch_size`"),
        ("num_epochs", "qpissa takes it as `num_train_epochs`"),
        ("target_modules", "qpissa takes it as `qpissa convert --targets q_proj,v_proj` (the conversion"),
        ("max_length", "qpissa takes it as `data.max_seq_len`"),
        ("completion_only_loss", "qpissa takes it as `data.response_only`"),
        ("assistant_only_loss", "qpissa takes it as `data.response_only`"),
        (
            "train_on_inputs",
            "qpissa takes it as `data.response_only`, inverted (train_on_inputs=true is "
            "data.response_only=false)",
        ),
        # misspellings still find their key
        ("max_stepz", "did you mean `max_steps`?"),
        ("learning_rat", "did you mean `learning_rate`?"),
        ("eval_stratgy", "did you mean `eval_strategy`?"),
        ("epochs", "did you mean `num_train_epochs`?"),
    ],
)
def test_an_unknown_key_is_pointed_to_the_key_qpissa_takes(key: str, hint: str) -> None:
    with pytest.raises(UserError) as error:
        checked_options({key: 1})
    assert str(error.value).startswith(f"unknown setting `{key}`: {UNKNOWN}{hint}")


def test_a_data_key_at_the_top_level_is_pointed_to_data(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """`max_seq_len=64` was told `did you mean max_steps?`: one line, exit 2, nothing written."""
    config = _config(tmp_path, qpissa_dir, data_dir)
    assert cli.main(["--quiet", "train", str(config), "max_seq_len=64"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [
        f"qpissa: error: unknown setting `max_seq_len`: {UNKNOWN}did you mean `data.max_seq_len`?"
    ]
    assert not (tmp_path / "run").exists()
