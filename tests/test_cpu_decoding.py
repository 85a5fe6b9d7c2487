"""A directory whose NF4 widths bitsandbytes' CPU kernel decodes by rows (converted on a GPU, where they
decode as written): on a CPU the model is refused in one line, and `export --no-verify` is still right.

The tiny model's layers are 64 wide; in blocks of 128 bitsandbytes 0.50's CPU kernel decodes them with
other block scales than its quantizer wrote (`nf4.cpu_decodes_by_rows`).
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import bitsandbytes.functional as bnbf
import pytest
import torch
from safetensors.torch import load_file

import qpissa.targets
from qpissa import UserError, cli
from qpissa.artifacts import ADAPTER_DIR
from qpissa.checkpoint import CheckpointReader
from qpissa.loading import load_model
from qpissa.model_source import resolve_source
from qpissa.stored import read_adapter

pytestmark = pytest.mark.misdecoding_cpu


@pytest.fixture(scope="module")
def gpu_converted(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model converted with --blocksize 128 as on a GPU: convert warns there instead of refusing."""
    out = tmp_path_factory.mktemp("gpu") / "qpissa"
    check = qpissa.targets.check_cpu_decoding
    with pytest.MonkeyPatch.context() as patch:
        convert_module = importlib.import_module("qpissa.convert")  # the package's `convert` is a function
        patch.setattr(convert_module, "check_cpu_decoding", lambda plan, size, _: check(plan, size, "cuda"))
        assert (
            cli.main(["--quiet", "convert", str(tiny_model), str(out), "--rank", "4", "--blocksize", "128"])
            == 0
        )
    return out


def test_loading_on_a_cpu_is_refused(gpu_converted: Path) -> None:
    """train, eval and chat load through `load_model`: their losses and answers would be wrong."""
    with pytest.raises(UserError, match=r"64 wide in blocks of 128\) with the wrong block scales"):
        load_model(resolve_source(gpu_converted))


def test_training_is_refused_before_the_run_is_written(
    gpu_converted: Path, char_tokenizer: Path, data_dir: Path, tmp_path: Path, capsys
) -> None:
    """The run directory was written before the model loaded: the refusal left qpissa_run.json behind,
    and the next run into the same output_dir was refused as an unfinished run."""
    model = tmp_path / "qpissa"
    shutil.copytree(gpu_converted, model)
    shutil.copytree(char_tokenizer, model, dirs_exist_ok=True)
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model: {model}\noutput_dir: {tmp_path / 'run'}\nmax_steps: 1\n"
        f"data: {{path: {data_dir / 'train.jsonl'}, format: prompt_completion, max_seq_len: 32}}\n"
    )
    assert cli.main(["--quiet", "train", str(config)]) == 2
    error = capsys.readouterr().err
    assert "with the wrong block scales" in error and error.count("\n") == 1, error
    assert not (tmp_path / "run").exists()


def test_export_is_right_and_its_check_is_refused(
    gpu_converted: Path, tiny_model: Path, tmp_path: Path, capsys
) -> None:
    status = cli.main(["--quiet", "export", str(gpu_converted), str(tmp_path / "checked")])
    error = capsys.readouterr().err
    assert status == 2 and "--no-verify" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "checked").exists()

    assert (
        cli.main(
            [
                "--quiet",
                "export",
                str(gpu_converted),
                str(tmp_path / "merged"),
                "--no-verify",
                "--dtype",
                "float32",
            ]
        )
        == 0
    )
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    stored, adapter = CheckpointReader(gpu_converted), read_adapter(gpu_converted / ADAPTER_DIR)
    for module in ("model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"):
        name = f"{module}.weight"
        state = bnbf.QuantState.from_dict(
            {
                key.removeprefix(f"{name}."): stored.read(key)
                for key in stored.location
                if key.startswith(f"{name}.")
            },
            device=torch.device("cpu"),
        )
        shape, state.shape = (
            state.shape,
            torch.Size([1, state.shape.numel()]),
        )  # the codes as a GPU decodes them
        written = bnbf.dequantize_4bit(stored.read(name), state).reshape(shape)
        A, B = adapter.factors(module)
        torch.testing.assert_close(merged[name].float(), written + adapter.scale * B @ A, atol=1e-5, rtol=0)
