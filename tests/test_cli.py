"""The CLI surface: every subcommand of DESIGN.md is listed and has help; a full disk is one line."""

from __future__ import annotations

import errno
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qpissa.artifacts import PROGRESS_NAME
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
    printed = capsys.readouterr().out
    assert "usage: qpissa " + command in printed
    assert "--quiet only warnings and the result" in " ".join(printed.split())  # global, after a command too


def test_train_help_lists_the_recipe_keys_with_their_defaults(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    printed = capsys.readouterr().out
    for line in ("  learning_rate (2e-05): peak learning rate", "  device (auto): auto, cpu or cuda",
                 "  data.max_seq_len (1024): tokens per sample", "  data.format: record format"):  # fmt: skip
        assert line in printed, line


def test_help_says_the_default_of_on_off_flags(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "quantize the absmax values too (QLoRA default) (default: True)" in text
    assert "(default: None)" not in text  # --calib-compensate: chosen per method, as its help says


@pytest.mark.parametrize(
    ("command", "module", "continue_with"),
    [("export", "qpissa.export", "; then rerun the same command"),
     ("convert", "qpissa.convert", "; rerun the same command with --resume to continue")],
)  # fmt: skip
def test_a_full_disk_is_one_line_that_says_how_to_go_on(
    command: str, module: str, continue_with: str, tmp_path: Path, monkeypatch, capsys: pytest.CaptureFixture
) -> None:
    written = tmp_path / "out.partial" / "model.safetensors"
    written.parent.mkdir()
    (written.parent / PROGRESS_NAME).write_text(
        "{}"
    )  # a conversion records what it has done; export does not

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(written))

    monkeypatch.setattr(importlib.import_module(module), command, disk_full)
    assert main(["--quiet", command, str(tmp_path / "model"), str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"qpissa: error: {written}: No space left on device; free some space{continue_with}"


def test_usage_mistakes_are_one_line_that_points_at_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "model"])  # OUT missing
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == (
        "qpissa: error: the following arguments are required: out; see `qpissa convert --help`\n"
    )
    with pytest.raises(SystemExit):
        main(["train"])  # the overrides after CONFIG are optional
    assert capsys.readouterr().err == (
        "qpissa: error: the following arguments are required: config; see `qpissa train --help`\n"
    )
    assert main(["convert", "model", "out", "--rnak", "3"]) == 2
    assert (
        capsys.readouterr().err
        == "qpissa: error: unrecognized arguments: --rnak 3; see `qpissa convert --help`\n"
    )


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("qpissa ")


def test_a_log_gets_no_bar_from_a_library_without_a_switch(tmp_path: Path) -> None:
    """transformers' GGUF reader (what fetch-model runs) draws a plain tqdm bar that no switch of
    transformers hides; with stderr redirected (a fresh process's, as a user's shell) no bar lands in it."""
    program = """
import sys, types
from qpissa import cli
assert "tqdm" not in sys.modules, "tqdm was imported before the CLI chose whether to show bars"

def fetch_demo_model(name, out):  # what the GGUF reader does: a bar of tqdm, imported as the command runs
    from tqdm.auto import tqdm
    for _ in tqdm(range(3), desc="Converting and de-quantizing GGUF tensors..."):
        pass
    return out

sys.modules["qpissa.models"] = types.SimpleNamespace(fetch_demo_model=fetch_demo_model)
sys.exit(cli.main(["fetch-model", "smollm2-135m", sys.argv[1]]))
"""
    done = subprocess.run(
        [sys.executable, "-c", program, str(tmp_path / "model")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "GGUF" not in done.stderr and "%|" not in done.stderr, done.stderr


def test_ctrl_c_in_a_finalizer_still_interrupts_the_command(tmp_path: Path) -> None:
    """Python drops a KeyboardInterrupt raised in a `__del__` (a Ctrl-C as a tokenizer loads): the command
    must still stop with the interrupt's line and status, not run on to its end."""
    program = """
import signal, sys, time, types
from qpissa import cli

signal.signal(signal.SIGINT, signal.default_int_handler)  # as on a terminal: a script's `&` job ignores it
class Finalized:
    def __del__(self):
        raise KeyboardInterrupt  # what Ctrl-C does when it lands while a finalizer runs

def fetch_demo_model(name, out):
    Finalized()
    time.sleep(30)  # the work that follows
    print("ran on to its end")
    return out

sys.modules["qpissa.models"] = types.SimpleNamespace(fetch_demo_model=fetch_demo_model)
sys.argv = ["qpissa", "fetch-model", "smollm2-135m", sys.argv[1]]
cli.main_entry()
"""
    done = subprocess.run(
        [sys.executable, "-c", program, str(tmp_path / "model")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 130, done.stdout + done.stderr
    assert "ran on" not in done.stdout and done.stderr.strip() == "qpissa: interrupted", done.stderr


def test_ctrl_c_in_a_finalizer_at_exit_lets_the_command_end(tmp_path: Path) -> None:
    """At interpreter exit no thread can start: the interrupt is left dropped there, not waited on forever."""
    program = """
import sys, types
from qpissa import cli

class Finalized:
    def __del__(self):
        raise KeyboardInterrupt

KEPT = Finalized()  # finalized as the interpreter exits
sys.modules["qpissa.models"] = types.SimpleNamespace(fetch_demo_model=lambda name, out: out)
sys.argv = ["qpissa", "fetch-model", "smollm2-135m", sys.argv[1]]
cli.main_entry()
"""
    done = subprocess.run(
        [sys.executable, "-c", program, str(tmp_path / "model")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and "Hugging Face checkpoint in" in done.stdout, done.stderr


def test_bitsandbytes_kernel_notes_are_hidden() -> None:
    """On import, bitsandbytes tries to fetch a bf16 CPU kernel from the Hub that qpissa never uses; its
    failure (and offline, the `kernels` package's skipped trust check) is noise a user cannot act on."""
    program = (
        "import logging\n"
        "from qpissa import LOG_FORMAT, hide_library_deprecation_notes\n"
        "logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)\n"
        "hide_library_deprecation_notes()\n"
        "import bitsandbytes\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "kernels-community" not in done.stderr, done.stderr


def test_the_error_table_says_what_its_numbers_are() -> None:
    """The columns are absolute Frobenius norms and the reduction a mean of per-matrix ratios, so a row's
    reduction is not its columns' ratio: without a legend a stranger read a contradiction."""
    from qpissa.console import summary_table

    layers = [
        {"module_type": "q_proj", "err_fro_base": 1.0, "err_fro": 1.0},  # an all-zero matrix: nothing gained
        {"module_type": "q_proj", "err_fro_base": 0.1, "err_fro": 0.05},
    ]
    summary = {"avg": None, "avg_fro": 25.0, "by_type_fro": {"q_proj": 25.0}}
    table = summary_table({"layers": layers, "settings": {"method": "qpissa"}, "summary": summary})
    assert "q_proj           0.5500       0.5250" in table  # columns 0.55 and 0.525: their ratio is −4.5 %
    assert "err: the weight error ‖W − Ŵ‖ (Frobenius), mean of each type's matrices" in table
    assert "1 − err/QLoRA err, averaged (not the ratio of the two columns)" in table
