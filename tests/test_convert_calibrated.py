"""`qpissa convert --calib` on the tiny chat model: standard artifacts, exact codes, lower output error,
deterministic bytes, resume after a kill, and one clear line for every bad calibration input."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qpissa.checkpoint import CheckpointReader
from qpissa.cli import main
from qpissa.convert_matrix import decompose_settings_of
from qpissa.convert_settings import CALIB_GENERAL, ConvertSettings
from qpissa.layer_stream import InputStatistics, first_layer_inputs, loaded_layer, open_stack, run_layer
from qpissa.methods import output_error
from qpissa.nf4 import dequantize_stored
from qpissa.options import from_dict
from qpissa.stored import read_adapter
from qpissa.targets import resolve_targets

CALIB = ["--calib-samples", "6", "--calib-seq-len", "32"]
PROSE = (
    "The river rose through the night and by morning the lower road was under water. Farmers moved their "
    "animals to the ridge, children watched from the school steps, and the ferry did not run. By noon the "
    "rain had stopped; by evening the water had begun, slowly, to fall again, leaving a line of mud on every "
    "wall it had touched. Nobody was hurt, and the next week the town voted to raise the bank by a metre. "
)


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "prose.txt"
    path.write_text(PROSE * 2)
    return path


@pytest.fixture(scope="module")
def calibrated(tiny_chat_model: Path, calib_text: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("calibrated") / "out"
    argv = ["--quiet", "convert", str(tiny_chat_model), str(out), "--rank", "4", "--iters", "2", "--calib"]
    assert main([*argv, str(calib_text), *CALIB]) == 0
    return out


def test_calibrated_output_loads_with_plain_transformers_and_peft(calibrated: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(calibrated, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, calibrated / "adapter")
    logits = model(input_ids=torch.tensor([[5, 6, 7, 8]])).logits
    assert logits.shape == (1, 4, 256) and torch.isfinite(logits).all()


def test_report_records_the_calibration_and_both_errors(calibrated: Path, calib_text: Path) -> None:
    report = json.loads((calibrated / "qpissa_report.json").read_text())
    record = report["settings"]["calibration"]
    assert record["source"] == str(calib_text) and record["format"] == "text file"
    assert record["samples"] == 6 and record["seq_len"] == 32 and record["tokens"] == 192
    assert record["general"] == CALIB_GENERAL and record["general_windows"] == 2
    assert len(record["sha256"]) == 64 and record["damping"] > 0 and record["seed"] == 0
    assert report["settings"]["power_iters"] == 2, "the report says which power iterations ran"
    assert record["products_dtype"] == record["dtype"], "H's products in the forward passes' dtype"
    assert record["fit_products_dtype"] == record["products_dtype"], "the fits multiply by H likewise"
    assert all(layer["reduction_out"] is not None for layer in report["layers"])
    assert report["summary"]["avg_out"] > 0, (
        "calibrated codes and adapter must beat plain NF4 in output error"
    )
    assert not (calibrated / "calibration").exists(), "the layer spools are removed from the output"


def test_stored_codes_are_what_the_adapter_was_fitted_against(
    calibrated: Path, tiny_chat_model: Path
) -> None:
    report = json.loads((calibrated / "qpissa_report.json").read_text())
    original, stored = CheckpointReader(tiny_chat_model), CheckpointReader(calibrated)
    adapter = read_adapter(calibrated / "adapter")
    for layer in report["layers"]:
        name = layer["name"]
        state = {
            k.removeprefix(f"{name}.weight."): stored.read(k)
            for k in stored.names()
            if k.startswith(f"{name}.weight.")
        }
        deq = dequantize_stored(stored.read(f"{name}.weight"), state)  # bitsandbytes' own dequantize
        A, B = adapter.factors(name)
        error = original.read(f"{name}.weight").float() - deq - adapter.scale * (B @ A)
        assert error.norm().item() == pytest.approx(layer["err_fro"], rel=1e-5)


def test_calibration_lowers_the_output_error_of_every_matrix(
    calibrated: Path, tiny_chat_model: Path, calib_text: Path, tmp_path: Path
) -> None:
    data_free = tmp_path / "data_free"
    assert (
        main(["--quiet", "convert", str(tiny_chat_model), str(data_free), "--rank", "4", "--iters", "2"]) == 0
    )
    windows = _windows(tiny_chat_model, calib_text)
    reader = CheckpointReader(tiny_chat_model)
    targets = set(resolve_targets("all-linear", reader, 4))
    stack = open_stack(reader, targets, torch.float32, torch.device("cpu"))
    inputs = first_layer_inputs(stack, [windows])
    with loaded_layer(stack, 0, reader, torch.float32) as layer:
        names = sorted(t for t in targets if t.startswith(f"{stack.prefix}.0."))
        linears = {n: layer.get_submodule(n.removeprefix(f"{stack.prefix}.0.")) for n in names}
        with InputStatistics(layer, linears, torch.float32) as stats:
            run_layer(layer, inputs, 0, torch.float32)
    for name in names:
        W = reader.read(f"{name}.weight").float()
        H = stats.hessian(name)
        errors = {label: output_error(W - _converted(path, name), H) for label, path in
                  (("calibrated", calibrated), ("data-free", data_free))}  # fmt: skip
        assert errors["calibrated"] < errors["data-free"], name


class _TwoBranches(torch.nn.Module):
    """A layer whose `up` and `gate` read the same tensor and whose `down` reads another, 200 wide (not
    a multiple of the statistics' block rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.gate, self.down = (
            torch.nn.Linear(70, 200),
            torch.nn.Linear(70, 200),
            torch.nn.Linear(200, 70),
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.gate(hidden_states)) * self.up(hidden_states))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_input_statistics_are_the_mean_outer_product_of_each_input(
    dtype: torch.dtype, tolerance: float
) -> None:
    """In bf16 each input and each batch's product is rounded to bf16's 8 bits: close, not exact."""
    torch.manual_seed(0)
    layer = _TwoBranches()
    batches = [torch.randn(2, 16, 70) * torch.linspace(0.1, 30, 70) for _ in range(3)]
    with InputStatistics(layer, {"up": layer.up, "gate": layer.gate, "down": layer.down}, dtype) as stats:
        for batch in batches:
            layer(batch)
    x = torch.cat(batches).reshape(-1, 70).double()
    inner = torch.cat([torch.relu(layer.gate(b)) * layer.up(b) for b in batches]).reshape(-1, 200).double()
    for name, inputs in (("up", x), ("gate", x), ("down", inner)):
        H = stats.hessian(name)
        expected = inputs.T @ inputs / len(inputs)
        scale = expected.abs().max().item()
        torch.testing.assert_close(H.double(), expected, rtol=tolerance, atol=tolerance * scale / 10)
        assert torch.equal(H, H.T), name
        if dtype != torch.float32:  # the products were formed in bf16, not in float32
            assert (H.double() - expected).abs().max() > 1e-5 * scale, name


def test_same_inputs_give_the_same_bytes_with_any_number_of_workers(
    calibrated: Path, tiny_chat_model: Path, calib_text: Path, tmp_path: Path
) -> None:
    again = tmp_path / "again"
    argv = [
        "--quiet",
        "convert",
        str(tiny_chat_model),
        str(again),
        "--rank",
        "4",
        "--iters",
        "2",
        "--workers",
        "1",
    ]
    assert main([*argv, "--calib", str(calib_text), *CALIB]) == 0
    assert _file_bytes(again) == _file_bytes(calibrated)


_KILL_AFTER_FIRST_SPOOL = """
import os, signal, sys
from qpissa import checkpoint
from qpissa.cli import main

close = checkpoint.SafetensorsWriter.close

def close_then_die(self, metadata=None):
    close(self, metadata)
    if self.path.name.startswith("layer-00001"):
        os.kill(os.getpid(), signal.SIGKILL)

checkpoint.SafetensorsWriter.close = close_then_die
sys.exit(main(sys.argv[1:]))
"""


# killed after the last layer's inputs are saved, before the progress records layer 1 done
_KILL_BEFORE_THE_SECOND_RECORD = """
import os, signal, sys
from qpissa import convert_calibrated
from qpissa.cli import main

write_json = convert_calibrated.write_json

def die_before_layer_1_is_recorded(path, data, *args, **kwargs):
    if data.get("calibration", {}).get("layers_done") == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    write_json(path, data, *args, **kwargs)

convert_calibrated.write_json = die_before_layer_1_is_recorded
sys.exit(main(sys.argv[1:]))
"""


def _killed_after_the_first_layer(
    model: Path, calib_text: Path, tmp_path: Path, kill: str = _KILL_AFTER_FIRST_SPOOL
) -> list[str]:
    """Run a calibrated conversion into `tmp_path/out` killed once layer 0 is recorded; its arguments."""
    script = tmp_path / "killed.py"
    script.write_text(kill)
    args = ["convert", str(model), str(tmp_path / "out"), "--rank", "4", "--iters", "2",
            "--calib", str(calib_text), *CALIB]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(script), "--quiet", *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    progress = json.loads((tmp_path / "out.partial" / "progress.json").read_text())
    assert progress["calibration"]["layers_done"] == 1, "killed after layer 1's spool, before its record"
    return args


def test_resume_after_a_kill_between_layers_gives_identical_bytes(
    calibrated: Path, tiny_chat_model: Path, calib_text: Path, tmp_path: Path
) -> None:
    args = _killed_after_the_first_layer(tiny_chat_model, calib_text, tmp_path)
    assert main(["--quiet", *args, "--resume"]) == 0
    assert _file_bytes(tmp_path / "out") == _file_bytes(calibrated)


def test_resume_after_a_kill_before_a_layer_is_recorded_gives_identical_bytes(
    calibrated: Path, tiny_chat_model: Path, calib_text: Path, tmp_path: Path
) -> None:
    """The next layer's inputs are saved before the progress that records the layer: the resumed layer
    must read its own inputs, not the ones its outputs became."""
    args = _killed_after_the_first_layer(
        tiny_chat_model, calib_text, tmp_path, _KILL_BEFORE_THE_SECOND_RECORD
    )
    assert main(["--quiet", *args, "--resume"]) == 0
    assert _file_bytes(tmp_path / "out") == _file_bytes(calibrated)


def test_a_calibrated_conversion_an_earlier_qpissa_left_is_said_to_be_one(
    tiny_chat_model: Path, calib_text: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """It kept every layer's inputs in one hidden.pt: refused as missing or corrupt, as if damaged."""
    args = _killed_after_the_first_layer(tiny_chat_model, calib_text, tmp_path)
    folder = tmp_path / "out.partial" / "calibration"
    (folder / "hidden-1.pt").rename(folder / "hidden.pt")
    assert main(["--quiet", *args, "--resume"]) == 2
    assert "was written by an earlier qpissa, which this one cannot resume; use --overwrite" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("damaged", ["hidden-1.pt", "layer-00000.safetensors"])
def test_resume_names_a_damaged_calibration_file(
    tiny_chat_model: Path, calib_text: Path, tmp_path: Path, capsys: pytest.CaptureFixture, damaged: str
) -> None:
    args = _killed_after_the_first_layer(tiny_chat_model, calib_text, tmp_path)
    path = tmp_path / "out.partial" / "calibration" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert main(["--quiet", *args, "--resume"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("qpissa: error: ") and "\n" not in error, error
    assert "use --overwrite" in error, error
    assert re.search(f"{damaged} is (missing, )?truncated or corrupt", error), error


def test_data_free_conversion_records_no_calibration(tiny_chat_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["--quiet", "convert", str(tiny_chat_model), str(out), "--rank", "4", "--iters", "1"]) == 0
    report = json.loads((out / "qpissa_report.json").read_text())
    assert not [key for key in report["settings"] if key.startswith("calib")]
    assert report["settings"]["power_iters"] == 4, "data-free settings are as before calibration existed"
    assert "calibration" not in report["fingerprint"] and "avg_out" not in report["summary"]


def _test_split_only(path: Path) -> None:
    """A folder whose one data file datasets reads as the test split (convert has no --split)."""
    path.with_suffix("").mkdir()
    (path.with_suffix("") / "test.jsonl").write_text(json.dumps({"text": PROSE}) + "\n")


@pytest.mark.parametrize(
    ("make", "extra", "pattern"),
    [
        (None, [], "does not exist"),
        (lambda p: p.write_text("   \n"), [], "is empty"),
        (lambda p: p.write_bytes(b"caf\xe9 au lait " * 40), [], "is not UTF-8"),
        (lambda p: p.write_text("too short"), [], "fewer than one window"),
        (
            lambda p: p.with_suffix(".jsonl").write_text('{"question": "a", "answer": "b"}\n'),
            [],
            "; write the records in one of these formats",
        ),
        (_test_split_only, [], "has splits test, not 'train' (a folder's files are split by name"),
        (lambda p: p.write_text(PROSE), ["--calib-samples", "0"], "--calib-samples must be at least 1"),
        (lambda p: p.write_text(PROSE), ["--calib-seq-len", "1"], "--calib-seq-len must be at least 8, got"),
        (lambda p: p.write_text(PROSE), ["--calib-damping", "nan"], "--calib-damping must be"),
        (
            lambda p: p.write_text(PROSE),
            ["--calib-general", "1"],
            "--calib-general must be at least 0 and below 1",
        ),
        (
            lambda p: p.write_text(PROSE),
            ["--calib-damping", "1e38"],
            "--calib-damping must be positive and at most 1e+06",
        ),
        (
            lambda p: p.write_text(PROSE),
            ["--calib-compensate", "--calib-codes-damping", "1e-30", "--calib-samples", "2"],
            "are not positive definite in float32; raise --calib-codes-damping",
        ),
        (lambda p: p.write_text(PROSE), ["--calib-seq-len", "257"], "longer than the model's context (256"),
    ],
)
def test_bad_calibration_input_is_one_line_and_writes_nothing(
    tiny_chat_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture, make, extra: list[str], pattern: str
) -> None:
    data = tmp_path / "calib.txt"
    if make is not None:
        make(data)
    for made in (data.with_suffix(".jsonl"), data.with_suffix("")):
        if made.exists():
            data = made
    out = tmp_path / "out"
    status = main(
        ["--quiet", "convert", str(tiny_chat_model), str(out), "--rank", "4", "--calib", str(data), *extra]
    )
    error = capsys.readouterr().err.strip()
    assert status == 2 and error.startswith("qpissa: error: ") and "\n" not in error, error
    assert pattern in error, error
    assert not out.exists() and not out.with_name("out.partial").exists()


def test_asking_for_more_windows_than_the_data_holds_says_how_many_were_used(
    tiny_chat_model: Path, calib_text: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    argv = ["--quiet", "convert", str(tiny_chat_model), str(out), "--rank", "4", "--iters", "1"]
    with caplog.at_level("WARNING", logger="qpissa.convert_calibrated"):
        status = main([*argv, "--calib", str(calib_text), "--calib-samples", "1000", "--calib-seq-len", "32"])
    assert status == 0
    calibration = json.loads((out / "qpissa_report.json").read_text())["settings"]["calibration"]
    general = calibration["general_windows"]
    own = calibration["samples"] - general
    assert 1 < own < 750 and general == round(own / 3), "the general prose keeps its share, a quarter"
    assert [r.getMessage() for r in caplog.records if r.name == "qpissa.convert_calibrated"] == [
        f"--calib {calib_text} holds {own} windows of 32 tokens, fewer than the 750 it is asked for "
        "(--calib-samples 1000, less 250 of qpissa's general prose): calibrating on all of them, with "
        f"{general} of the general prose to keep its --calib-general share"
    ]


def test_a_share_of_the_windows_is_general_prose_unless_the_data_is_that_prose(
    tiny_chat_model: Path, calib_text: Path
) -> None:
    from importlib import resources

    from transformers import AutoTokenizer

    from qpissa.calibration import GENERAL_TEXT, calibration_tokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    mixed = calibration_tokens(calib_text, tokenizer, 8, 32, 0, 0.25)
    own = calibration_tokens(calib_text, tokenizer, 6, 32, 0, 0.0)
    shipped = Path(str(resources.files("qpissa").joinpath("texts", GENERAL_TEXT)))
    general = calibration_tokens(shipped, tokenizer, 2, 32, 0, 0.25)
    assert mixed.general == 2 and own.general == 0 and general.general == 0, (
        "the prose is not mixed into itself"
    )
    assert torch.equal(mixed.windows, torch.cat([own.windows, general.windows]))
    assert calibration_tokens(calib_text, tokenizer, 2, 32, 0, 0.9).general == 1, (
        "one window stays the data's"
    )


def test_calibration_flags_need_calib(
    tiny_chat_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    status = main(["--quiet", "convert", str(tiny_chat_model), str(tmp_path / "out"), "--calib-samples", "8"])
    assert status == 2 and "only apply with --calib" in capsys.readouterr().err


def _windows(model: Path, text: Path) -> torch.Tensor:
    from transformers import AutoTokenizer

    from qpissa.calibration import calibration_tokens

    return calibration_tokens(text, AutoTokenizer.from_pretrained(model), 6, 32, 0, CALIB_GENERAL).windows


def _converted(directory: Path, name: str) -> torch.Tensor:
    """`deq(Q) + s·B·A` of one matrix of a QPiSSA directory, float32."""
    stored = CheckpointReader(directory)
    state = {
        k.removeprefix(f"{name}.weight."): stored.read(k)
        for k in stored.names()
        if k.startswith(f"{name}.weight.")
    }
    adapter = read_adapter(directory / "adapter")
    A, B = adapter.factors(name)
    return dequantize_stored(stored.read(f"{name}.weight"), state) + adapter.scale * (B @ A)


def _file_bytes(directory: Path) -> dict[str, bytes]:
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name not in ("qpissa_report.json", "adapter_config.json"):
            files[str(path.relative_to(directory))] = path.read_bytes()
    return files


def test_a_compressed_calibration_text_draws_the_same_windows(
    tiny_chat_model: Path, calib_text: Path, tmp_path: Path
) -> None:
    import gzip

    packed = tmp_path / "calibration.txt.gz"
    packed.write_bytes(gzip.compress(calib_text.read_bytes()))
    assert torch.equal(_windows(tiny_chat_model, packed), _windows(tiny_chat_model, calib_text))


def test_error_compensated_codes_sum_h_from_float32_products(
    tiny_chat_model: Path, calib_text: Path, tmp_path: Path
) -> None:
    """GPTQ rounding (qlora's default with --calib) factors H, which bf16-rounded products can break."""
    out = tmp_path / "qlora"
    argv = ["--quiet", "convert", str(tiny_chat_model), str(out), "--method", "qlora", "--rank", "4"]
    assert main([*argv, "--calib", str(calib_text), *CALIB]) == 0
    record = json.loads((out / "qpissa_report.json").read_text())["settings"]["calibration"]
    assert record["compensate"] is True and record["products_dtype"] == "float32"
    assert record["fit_products_dtype"] == "float32"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"svd": "exact"}, None),
        ({"svd_dtype": "float64"}, None),
        ({"calib_compensate": True, "sketch_dtype": "bfloat16"}, torch.bfloat16),
        ({"calib_compensate": True}, None),
    ],
)
def test_fits_multiply_by_h_in_bf16_only_where_speed_was_asked_for(changes: dict, expected) -> None:
    """An exact or float64 fit is asked for accuracy: its products with H stay in the weight's dtype."""
    settings = from_dict(ConvertSettings, {"calib": "data.txt", **changes})
    fit = decompose_settings_of(settings, torch.device("cpu")).calibrated
    assert fit.fit_products_dtype == expected


def test_records_that_fit_a_chat_format_and_prompt_completion_calibrate_a_model_without_a_template(
    tiny_chat_model: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The demo task's records (messages and prompt/completion) were refused for a base model without a
    chat template, with no flag to choose the other format."""
    import json

    from transformers import AutoTokenizer

    from qpissa import UserError
    from qpissa.calibration import calibration_tokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    tokenizer.chat_template = None
    turns = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    both = tmp_path / "both.jsonl"
    both.write_text(json.dumps({"messages": turns, "prompt": "2+2?", "completion": " 4"}) + "\n")
    with caplog.at_level("INFO", logger="qpissa"):
        tokens = calibration_tokens(both, tokenizer, 1, 8, 0, 0.0)
    assert tokens.format == "prompt_completion" and "messages" not in caplog.text  # read once, as that
    chat_only = tmp_path / "chat.jsonl"
    chat_only.write_text(json.dumps({"messages": turns}) + "\n")
    with pytest.raises(UserError, match="the model's tokenizer has no chat template"):
        calibration_tokens(chat_only, tokenizer, 1, 8, 0, 0.0)
