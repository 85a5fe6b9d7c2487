"""The CLI surface: every subcommand of DESIGN.md is listed and has help."""

from __future__ import annotations

import pytest

from qpissa.cli import main

COMMANDS = ["fetch-model", "convert", "train", "eval", "export", "chat", "compare", "report"]


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert all(command in text for command in COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_subcommand_has_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: qpissa " + command in capsys.readouterr().out
