"""`qpissa train` under torchrun and `accelerate launch`: 2 CPU processes over gloo on the tiny model.

One log line per step, one adapter, nothing written by the second process, the same losses as one
process with the doubled batch, and an exact resume (or a one-line refusal with another process count).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qpissa import cli

ROOT = Path(__file__).parents[1]
STEPS = 4
# run as each process's program: on ranks other than 0 it records every file it creates, changes or
# removes under WATCHED (Python's audit events), and names them on stderr; but for the Trainer's own
# checkpoint-N directory, in which each process saves its random state (rng_state_<rank>.pth)
WATCHER = """
import os, sys
WATCHED = os.environ["WATCHED"]
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
CHANGES = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate"}
written = []

def watch(event, args):
    if event == "open":
        mode, flags = args[1], args[2] or 0
        changing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or flags & WRITING
    else:
        changing = event in CHANGES
    trainers = event == "os.mkdir" and os.path.basename(args[0]).startswith("checkpoint-")
    if changing and str(args[0]).startswith(WATCHED) and not trainers:
        written.append(f"{event} {args[0]}")

if os.environ.get("RANK", "0") != "0":
    sys.addaudithook(watch)
from qpissa.cli import main
status = main(sys.argv[1:])
if written:
    print("REPLICA WROTE " + "; ".join(written), file=sys.stderr)
sys.exit(status)
"""


def _config(tmp: Path, qpissa_dir: Path, data_dir: Path, **changes) -> Path:
    config = {
        "model": str(qpissa_dir), "output_dir": str(tmp / "run"),
        "data": {"path": str(data_dir / "train.jsonl"), "format": "prompt_completion", "max_seq_len": 32},
        "learning_rate": 1e-2, "max_steps": STEPS, "per_device_train_batch_size": 2, "save_steps": 2,
        "logging_steps": 1, "seed": 3,
    }  # fmt: skip
    config.update(changes)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _launch(launcher: list[str], tmp: Path, *args: str) -> subprocess.CompletedProcess:
    """`qpissa --quiet ARGS` as 2 processes of `launcher`, watched for writes by the second one. Their
    temporary files (the launcher's torchelastic_* logs) go to `_temporary(tmp)`, not to be left in /tmp,
    and not under `tmp`, where a replica's temporary file would read as a write."""
    watcher = tmp / "watched_qpissa.py"
    watcher.write_text(WATCHER)
    temporary = _temporary(tmp)
    temporary.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WATCHED": str(tmp), "OMP_NUM_THREADS": "1",
           "TMPDIR": str(temporary)}  # fmt: skip
    command = [*launcher, str(watcher), "--quiet", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp)


def _temporary(tmp: Path) -> Path:
    return tmp.parent / f"tmp-{tmp.name}"  # not `tmp` + a suffix: the watcher compares path prefixes


def _torchrun() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def _accelerate() -> list[str]:
    config = ROOT / "configs" / "accelerate" / "ddp.yaml"
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "trainer_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two(qpissa_dir: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 2-process torchrun run, per-device batch 2; its run directory and its stdout."""
    tmp = tmp_path_factory.mktemp("two")
    done = _launch(_torchrun(), tmp, "train", str(_config(tmp, qpissa_dir, data_dir)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "REPLICA WROTE" not in done.stderr, done.stderr[-3000:]
    return tmp / "run", done.stdout


def test_two_processes_write_one_run(two: tuple[Path, str]) -> None:
    run, stdout = two
    assert stdout.count("trained 4 steps") == 1  # the main process prints the result
    assert [row["step"] for row in _rows(run)] == list(range(STEPS + 1))  # one line per step
    assert all(row["tokens_per_second"] > 0 for row in _rows(run)[1:])
    assert sorted(p.name for p in run.iterdir()) == [
        "adapter", "checkpoint-2", "checkpoint-4", "qpissa_run.json", "trainer_log.jsonl",
    ]  # fmt: skip
    assert {p.name for p in (run / "checkpoint-2").glob("rng_state*")} == {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }
    marker = json.loads((run / "qpissa_run.json").read_text())
    assert marker["processes"] == {
        "count": 2, "global_batch_size": 4, "launcher": "torchrun", "per_device_train_batch_size": 2,
    }  # fmt: skip


def test_two_processes_match_one_with_the_doubled_batch(
    two: tuple[Path, str], qpissa_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """Token-weighted loss averaged over devices: 2 x batch 2 trains as 1 x batch 4."""
    config = _config(tmp_path, qpissa_dir, data_dir, per_device_train_batch_size=4)
    assert cli.main(["--quiet", "train", str(config)]) == 0
    one = [row["loss"] for row in _rows(tmp_path / "run")]
    both = [row["loss"] for row in _rows(two[0])]
    assert len(set(both)) == len(both)  # not vacuous: the loss moves
    assert both == pytest.approx(one, rel=1e-5)
    marker = json.loads((tmp_path / "run" / "qpissa_run.json").read_text())
    assert marker["processes"]["count"] == 1 and marker["processes"]["launcher"] == "none"


def test_resume_under_accelerate_launch_continues_exactly(
    two: tuple[Path, str], qpissa_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """checkpoint-2 of the torchrun run resumed by 2 processes of `accelerate launch` (configs/accelerate)."""
    run = tmp_path / "run"
    shutil.copytree(two[0], run)
    shutil.rmtree(run / "checkpoint-4")
    shutil.rmtree(run / "adapter")
    config = _config(tmp_path, qpissa_dir, data_dir)
    done = _launch(
        _accelerate(), tmp_path, "train", str(config), f"resume_from_checkpoint={run}/checkpoint-2"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "REPLICA WROTE" not in done.stderr, done.stderr[-3000:]
    assert [row["loss"] for row in _rows(run)] == [row["loss"] for row in _rows(two[0])]
    assert json.loads((run / "qpissa_run.json").read_text())["processes"]["launcher"] == "accelerate"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_with_another_process_count_is_refused(
    two: tuple[Path, str], qpissa_dir: Path, data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    shutil.copytree(two[0], run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    config = _config(tmp_path, qpissa_dir, data_dir)
    assert cli.main(["--quiet", "train", str(config), f"resume_from_checkpoint={run}/checkpoint-2"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "written by 2 process(es) but 1 are running" in error[0]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # nothing written


def test_accelerate_launch_on_a_cpu_says_it_started_one_process(
    qpissa_dir: Path, data_dir: Path, tmp_path: Path
) -> None:
    """`accelerate launch --cpu --num_processes 2` starts a single process (accelerate's rule without MPI,
    README), which trained alone, silently: the run says so once."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2"]
    done = _launch(launcher, tmp_path, "train", str(_config(tmp_path, qpissa_dir, data_dir, max_steps=1)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("accelerate launch asked for several processes but started one") == 1
    marker = json.loads((tmp_path / "run" / "qpissa_run.json").read_text())
    assert marker["processes"]["count"] == 1 and marker["processes"]["launcher"] == "accelerate"


def test_export_eval_and_chat_take_a_multi_process_run(
    two: tuple[Path, str], data_dir: Path, tmp_path: Path
) -> None:
    """The adapter of a 2-process run is a plain PEFT adapter: eval, export and chat read it as any run's."""
    run = two[0]
    assert cli.main(["--quiet", "eval", str(run), "--data", str(data_dir / "eval.jsonl")]) == 0
    assert cli.main(["--quiet", "export", str(run), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "config.json").is_file()
    assert cli.main(["--quiet", "chat", str(run), "--prompt", "3%10="]) == 0


def test_two_processes_evaluate_every_token_once(qpissa_dir: Path, data_dir: Path, tmp_path: Path) -> None:
    """The Trainer's evaluation, each process on its shard, sums to the main process's final evaluation of
    the same adapter (load_best_model_at_end chooses by the first): answers of 1 to 6 digits, in batches
    of 3 per process, the first global batch's shorter than the second's, which lacks a sample (the
    sampler repeats the first one there, to even out the processes' batches)."""
    records = [{"prompt": f"{i}%10=", "completion": f" {i % 10}" * (1 + i // 2)} for i in range(11)]
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    data = {"path": str(data_dir / "train.jsonl"), "eval_path": str(tmp_path / "eval.jsonl"),
            "format": "prompt_completion", "max_seq_len": 32, "eval_generate_samples": 0}  # fmt: skip
    config = _config(tmp_path, qpissa_dir, data_dir, data=data, eval_steps=2, per_device_eval_batch_size=3,
                     load_best_model_at_end=True, metric_for_best_model="eval_loss")  # fmt: skip
    done = _launch(_torchrun(), tmp_path, "train", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "REPLICA WROTE" not in done.stderr, done.stderr[-3000:]
    run = tmp_path / "run"
    evals = [json.loads(line) for line in (run / "eval_log.jsonl").read_text().splitlines()]
    final = json.loads((run / "eval_results.json").read_text())
    assert [e["step"] for e in evals] == [2, 4]  # save_steps 2: the best is chosen among both
    assert evals[-1]["eval_loss"] == pytest.approx(final["loss"], rel=1e-5)


def test_a_mistyped_command_is_one_line_under_a_launcher(tmp_path: Path) -> None:
    """argparse's error, met by every process, is printed by the main one only."""
    done = _launch(_torchrun(), tmp_path, "trian", "recipe.yaml")
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if line.startswith("qpissa:")]
    assert len(lines) == 1 and "invalid choice: 'trian'" in lines[0], done.stderr[-3000:]
    assert list(_temporary(tmp_path).glob("torchelastic_*"))  # the launcher's logs: in the test's TMPDIR


def test_ctrl_c_is_reported_by_the_main_process_only(
    qpissa_dir: Path,
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """Ctrl-C reaches every process of a launcher; one line says so, not one per process."""

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(importlib.import_module("qpissa.train"), "train", interrupted)
    monkeypatch.setattr(cli, "NON_MAIN_GRACE_S", 0.0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        assert cli.main(["--quiet", "train", str(_config(tmp_path, qpissa_dir, data_dir))]) == 130
        said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qpissa:")]
        assert said == ["qpissa: interrupted"] * lines, said


@pytest.mark.parametrize(
    ("launcher", "named"),
    [("TORCHELASTIC_RUN_ID", "torchrun"), ("ACCELERATE_MIXED_PRECISION", "accelerate launch")],
)
def test_commands_other_than_train_refuse_several_processes(
    tiny_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    launcher: str,
    named: str,
) -> None:
    """Each process did the whole command: eval printed its result once per process, convert met its own
    sibling's lock and left it behind, export failed on one rank without a word."""
    monkeypatch.setattr(cli, "NON_MAIN_GRACE_S", 0.0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(launcher, "no")
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        out = tmp_path / f"out{rank}"
        assert cli.main(["--quiet", "convert", str(tiny_model), str(out), "--rank", "4"]) == 2
        said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qpissa:")]
        refusal = (
            f"qpissa: error: qpissa convert runs in one process, and 2 were launched; run it without {named}"
        )
        assert len(said) == lines and all(line.startswith(refusal) for line in said), said
        assert not out.exists() and not out.with_name(f"{out.name}.lock").exists()


def test_quant_storage_bfloat16_loads_with_plain_transformers(
    tiny_chat_model: Path, qpissa_dir: Path, tmp_path: Path
) -> None:
    """FSDP-QLoRA's storage: the same NF4 bytes as bfloat16, read by transformers as the uint8 ones."""
    import torch
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    args = ["--quiet", "convert", str(tiny_chat_model), str(out), "--rank", "4", "--iters", "1"]
    assert cli.main([*args, "--quant-storage", "bfloat16"]) == 0
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["bnb_4bit_quant_storage"] == "bfloat16"
    with (
        safe_open(str(out / "model.safetensors"), "pt") as stored,
        safe_open(str(qpissa_dir / "model.safetensors"), "pt") as default,
    ):
        key = "model.layers.0.mlp.down_proj.weight"
        assert stored.get_tensor(key).dtype == torch.bfloat16 and default.get_tensor(key).dtype == torch.uint8
        same = stored.get_tensor(key).view(torch.uint8).flatten(), default.get_tensor(key).flatten()
        assert torch.equal(*same)
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    logits = []
    for directory in (qpissa_dir, out):
        base = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        logits.append(PeftModel.from_pretrained(base, directory / "adapter")(ids).logits)
    assert torch.equal(logits[0], logits[1])
    assert cli.main(["--quiet", "export", str(out), str(tmp_path / "merged")]) == 0  # reads the codes back


def test_fsdp_is_refused_on_a_cpu_and_on_uint8_storage(
    qpissa_dir: Path,
    data_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    """accelerate's FSDP plugin has no CPU mode, and FSDP shards only float storage: one line each, early."""
    from qpissa import UserError
    from qpissa.distributed import check_fsdp

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` with fsdp_qlora.yaml sets
    assert cli.main(["--quiet", "train", str(_config(tmp_path, qpissa_dir, data_dir))]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "FSDP needs CUDA GPUs" in error[0]
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="convert again with --quant-storage bfloat16"):
        check_fsdp("cuda", "bfloat16", qpissa_dir)  # its codes are stored as uint8


@pytest.mark.gpu
def test_fsdp_qlora_trains_on_gpus(tiny_chat_model: Path, data_dir: Path, tmp_path: Path) -> None:
    """configs/accelerate/fsdp_qlora.yaml over a --quant-storage bfloat16 conversion (one process per GPU)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_bf16_supported():
        pytest.skip("needs a CUDA GPU with bf16")
    model = tmp_path / "bf16"
    args = ["--quiet", "convert", str(tiny_chat_model), str(model), "--rank", "4", "--iters", "1"]
    assert cli.main([*args, "--quant-storage", "bfloat16", "--compute-dtype", "bfloat16"]) == 0
    config = _config(tmp_path, model, data_dir, bf16=True, gradient_checkpointing=True, optim="adamw_torch")
    count = str(min(torch.cuda.device_count(), 2))
    launcher = [*_accelerate()[:-2], "--config_file", str(ROOT / "configs/accelerate/fsdp_qlora.yaml")]
    done = _launch([*launcher, "--num_processes", count], tmp_path, "train", str(config))
    assert done.returncode == 0, done.stderr[-3000:]
    assert [row["step"] for row in _rows(tmp_path / "run")] == list(
        range(1, STEPS + 1)
    )  # no step 0 under FSDP
    assert cli.main(["--quiet", "eval", str(tmp_path / "run"), "--data", str(data_dir / "eval.jsonl")]) == 0


def test_more_processes_than_gpus_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from qpissa import UserError
    from qpissa.distributed import check_gpu_count

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match="4 processes were launched on this machine but 2 CUDA GPU"):
        check_gpu_count("cuda")
    check_gpu_count("cpu")  # CPU processes share the cores


def test_accelerate_configs_load_with_accelerate() -> None:
    """Every file in configs/accelerate/ loads with accelerate's own reader, as `accelerate launch` does."""
    from accelerate.commands.config.config_args import ClusterConfig

    kinds = {
        path.stem: ClusterConfig.from_yaml_file(str(path)).distributed_type.value
        for path in sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))
    }
    assert kinds == {"ddp": "MULTI_GPU", "fsdp_qlora": "FSDP", "single_gpu": "NO"}
